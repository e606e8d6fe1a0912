"""`ivshmem-lab run -n` and `ivshmem-lab mpiexec`: ranks' output in whole lines (issue 10,
item 6), relayed in the guest by guest_lib.launch.OutputRelay (the relay `ivshmem-run` uses;
under mpiexec each rank runs behind `python -m guest_lib.launch --`, as hydra passes on
partial lines as they come), with and without --prepend-rank.

Two ranks in one guest print lines of 2500 characters, each line in 1000-byte writes, on
stdout and stderr at once: every line must come out whole, in order, once.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import vm_marks

REPO = Path(__file__).resolve().parents[2]
PROGRAM = "tests/mpi/programs/launcher_rank.py"
# CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
pytestmark = [*vm_marks(240), pytest.mark.full]


@pytest.mark.parametrize("prepend", [False, True], ids=["plain", "prepend_rank"])
def test_ranks_in_a_guest_print_whole_lines(prepend: bool) -> None:
    count, length = 20, 2500
    done = subprocess.run(
        [sys.executable, "-m", "ivshmem_lab.cli", "run", "--vms", "1", "-n", "2",
         "--memory", "384M", "--timeout", "180", *(["--prepend-rank"] if prepend else []),
         "--", sys.executable, PROGRAM, "chatter", str(count), str(length)],
        cwd=REPO, capture_output=True, timeout=220,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pattern = re.compile(rb"\[vm0\] (\[rank (\d)\] )?(\d):(\d+):(x*)")
    seen: dict[int, list[int]] = {0: [], 1: []}
    for line in done.stdout.splitlines():
        match = pattern.fullmatch(line)
        if match is None:  # "rank R pid P" and the exit lines; nothing else
            assert re.fullmatch(
                rb"\[vm0\] (\[rank \d\] )?rank \d pid \d+|\[vm0\] ivshmem-lab-mpi: rank \d exit 0",
                line,
            ), line[:200]
            continue
        assert (match[1] is not None) == prepend, line[:80]
        rank = int(match[3])
        if prepend:
            assert int(match[2]) == rank
        assert len(match[5]) == length, line[:80]
        seen[rank].append(int(match[4]))
    # each rank's stdout then its stderr (one pipe per rank in the guest)
    assert seen == {0: list(range(count)) * 2, 1: list(range(count)) * 2}


@pytest.mark.parametrize("prepend", [False, True], ids=["plain", "prepend_rank"])
def test_ranks_under_mpiexec_print_whole_lines(prepend: bool) -> None:
    """Many short lines, each in two writes (the text, then its newline), from two ranks at
    once: what hydra, reading each rank's pipe as data comes, mixed (``upup``)."""
    count, length = 300, 20
    done = subprocess.run(
        [sys.executable, "-m", "ivshmem_lab.cli", "mpiexec", "--vms", "1", "-n", "2",
         "--memory", "384M", "--timeout", "180", *(["--prepend-rank"] if prepend else []),
         "--", sys.executable, PROGRAM, "chatter", str(count), str(length)],
        cwd=REPO, capture_output=True, timeout=220,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pattern = re.compile(rb"(\[(\d)\] )?(\d):(\d+):(x*)")
    for stream in (done.stdout, done.stderr):
        seen: dict[int, list[int]] = {0: [], 1: []}
        for line in stream.splitlines():
            match = pattern.fullmatch(line)
            if match is None:  # "rank R pid P", the lab's own messages
                assert not re.search(rb"\d:\d+:x", line), line[:200]
                continue
            assert (match[1] is not None) == prepend, line[:80]
            rank = int(match[3])
            if prepend:
                assert int(match[2]) == rank
            assert len(match[5]) == length, line[:80]
            seen[rank].append(int(match[4]))
        assert seen == {0: list(range(count)), 1: list(range(count))}
