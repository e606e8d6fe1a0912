"""MPI jobs across VM-lab guests (issue 5): `ivshmem-lab run --vms V -n N -- python prog`.

Two TCG guests, one rank each, each with an ivshmem-doorbell device on the job's own broker;
the ranks bootstrap with IVSHMEM_COMM_GUEST=1 (guest_lib.attach() in the guest) and run
p2p (objects and buffers) and collectives (bcast, allreduce, gather, barrier), checked in
the program (tests/mpi/programs/vm_job.py). Also: a failing rank makes the job fail, and
the job leaves no region behind; 3 ranks in 2 guests (two doorbell devices in guest 0); a
shared window (Win.Allocate_shared) whose data one guest stores and the other loads, no
message carrying it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ivshmem_lab.mpi import placement, region_size
from tests.support import vm_test

REPO = Path(__file__).resolve().parents[2]
PROGRAM = "tests/mpi/programs/vm_job.py"

vm = vm_test(180)  # the marks of a test that boots guests


def _lab(*args: str, timeout: float = 150) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ivshmem_lab.cli", "run", "--memory", "384M",
         "--timeout", "120", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return proc, time.monotonic() - t0


def _shm_names() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("labmpi-")}
    except OSError:
        return set()


def test_placement_round_robin() -> None:
    assert placement(2, 2) == [[0], [1]]
    assert placement(5, 2) == [[0, 2, 4], [1, 3]]
    assert placement(3, 3) == [[0], [1], [2]]
    assert region_size(2) == 64 << 20
    assert region_size(5) & (region_size(5) - 1) == 0


@vm
def test_two_guests_p2p_and_collectives() -> None:
    shm_before = _shm_names()
    proc, dt = _lab("--prepend-rank", "--vms", "2", "-n", "2", "--", sys.executable, PROGRAM)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"status {proc.returncode}\n{out}\n{err}"
    for rank in (0, 1):
        vm_i = rank  # round robin: rank r in guest r % 2
        prefix = rf"^\[vm{vm_i}\] \[rank {rank}\] "
        assert re.search(prefix + rf"rank {rank}/2 up: peer \d attached doorbell$", out, re.M), out
        for what in ("ring of objects ok", "buffers and sendrecv with every rank ok"):
            assert re.search(prefix + f"rank {rank}: {what}$", out, re.M), out
        assert re.search(prefix + rf"rank {rank}: collectives ok .*allreduce 3", out, re.M), out
        assert re.search(prefix + rf"rank {rank}/2 ok attached=doorbell", out, re.M), out
        assert re.search(rf"^\[vm{vm_i}\] ivshmem-lab-mpi: rank {rank} exit 0$", out, re.M), out
        assert f"ivshmem-lab: rank {rank} (vm{vm_i}): exit 0" in err, err
    assert "gather ['r0', 'r1']" in out
    assert _shm_names() <= shm_before, "the job's region was left in /dev/shm"
    print(f"\n2 guests x 1 rank: {dt:.1f} s wall (boot included)")
    for line in err.splitlines():
        if re.match(r"ivshmem-lab: (vm\d|rank \d)", line):
            print(line)


@vm
@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_failing_rank_fails_the_job() -> None:
    # rank 1 exits 3 at once; rank 0 then loses its peer (or times out joining) and fails too
    code = (
        "import os, sys\n"
        "r = int(os.environ['IVSHMEM_MPI_RANK'])\n"
        "assert os.environ['IVSHMEM_COMM_GUEST'] == '1'\n"
        "print('rank', r, 'of', os.environ['IVSHMEM_MPI_SIZE'], flush=True)\n"
        "sys.exit(3 if r == 1 else 0)\n"
    )
    proc, dt = _lab("--prepend-rank", "--vms", "2", "-n", "--", sys.executable, "-c", code)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, f"status {proc.returncode}\n{out}\n{err}"
    assert "[vm0] [rank 0] rank 0 of 2" in out and "[vm1] [rank 1] rank 1 of 2" in out, out
    assert "ivshmem-lab: rank 1 (vm1): exit 3" in err, err
    assert "ivshmem-lab: rank 0 (vm0): exit 0" in err, err
    print(f"\nfailing job: status {proc.returncode} in {dt:.1f} s")


@vm
@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_three_ranks_in_two_guests() -> None:
    # guest 0 runs ranks 0 and 2, each on its own doorbell device (IVSHMEM_COMM_DEVICE)
    proc, dt = _lab("--prepend-rank", "--vms", "2", "-n", "3", "--", sys.executable, PROGRAM)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"status {proc.returncode}\n{out}\n{err}"
    for rank in range(3):
        prefix = rf"^\[vm{rank % 2}\] \[rank {rank}\] "
        assert re.search(prefix + rf"rank {rank}/3 ok attached=doorbell", out, re.M), out
        assert f"ivshmem-lab: rank {rank} (vm{rank % 2}): exit 0" in err, err
    peers = sorted(re.findall(r"rank \d/3 up: peer (\d) attached doorbell", out))
    assert peers == ["0", "1", "2"], out
    print(f"\n2 guests x 3 ranks: {dt:.1f} s wall")


@vm_test(420)
@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_shared_window_between_two_guests() -> None:
    program = "tests/mpi/programs/win_shared_vm.py"
    proc, dt = _lab("--prepend-rank", "--vms", "2", "--timeout", "300", "-n", "2", "--",
                    sys.executable, program, timeout=360)  # fmt: skip
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"status {proc.returncode}\n{out}\n{err}"
    for rank in (0, 1):
        line = re.search(rf"^\[vm{rank}\] \[rank {rank}\] rank {rank}: shared window ok: "
                         r"1048576 bytes seen through the region, (\d+) bytes through the "
                         r"queues", out, re.M)  # fmt: skip
        assert line and int(line.group(1)) < 4096, out
        print(f"\n{line.group(0)}", end="")
    print(f"\nshared window across 2 guests: {dt:.1f} s wall (boot included)")
