"""Oversubscription (issue #12 item 4): a job with more ranks on its region than CPUs in the
ranks' affinity mask judges itself crowded, shortens the endpoint's spin so that waits block
on the doorbell almost at once, and completes windows of small nonblocking messages in
every buffer form with the data checked; a job with a CPU per rank keeps its spin."""

from __future__ import annotations

import os

import pytest

from guest_lib.mpi.engine import CROWDED_SPIN_US
from ivshmem_comm.endpoint import DEFAULT_SPIN_US
from tests.mpi.conftest import PYTHON, ROOT, run_job

PROGRAM = str(ROOT / "tests" / "mpi" / "programs" / "crowded_rank.py")


def job(ranks: int, cpus: set[int] | None) -> list[tuple[bool, float]]:
    """Run the program on `ranks` ranks pinned to `cpus` (None: as we are); each rank's
    (crowded, spin_us), after checking every rank finished its windows."""
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    command = [*pin, PYTHON, "-m", "guest_lib.mpi.launcher", "-n", str(ranks),
               "--timeout", "100", PROGRAM]  # fmt: skip
    out = run_job(command, 120).stdout
    seen = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) == 6 and words[2] == "crowded":
            seen[int(words[1])] = (words[3] == "True", float(words[5]))
    assert sorted(seen) == list(range(ranks)), out
    assert out.count(" ok ") == ranks, out
    return [seen[r] for r in range(ranks)]


def test_crowded_job_blocks_early():
    cpu = min(os.sched_getaffinity(0))
    assert job(3, {cpu}) == [(True, CROWDED_SPIN_US)] * 3


def test_uncrowded_job_keeps_its_spin():
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    assert job(2, set(sorted(cpus)[:2])) == [(False, DEFAULT_SPIN_US)] * 2
