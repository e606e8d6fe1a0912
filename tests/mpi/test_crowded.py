"""Oversubscription (issue #12 item 4): a job with more ranks on its region than CPUs in the
ranks' affinity masks judges itself crowded, shortens the spin of the endpoint's and the
collective area's waits (the area's yielding between polls), gives the endpoint's waits a
yield phase (polls with the CPU yielded between them) before they block on the doorbell, and
completes windows of small nonblocking messages in every buffer form with the data checked;
a job with a CPU per rank keeps its spin. Object collectives go through the collective area
whether crowded or not (in the OSU loop the area took 0.4-0.7x the time of messages at 4
ranks on 2 CPUs)."""

from __future__ import annotations

import os

import pytest

from guest_lib.mpi.engine import CROWDED_SPIN_US
from ivshmem_comm.endpoint import DEFAULT_SPIN_US
from tests.mpi.conftest import PYTHON, ROOT, run_job

PROGRAM = str(ROOT / "tests" / "mpi" / "programs" / "crowded_rank.py")
PINGPONG = str(ROOT / "tests" / "mpi" / "programs" / "crowded_pingpong.py")
COLLECTIVES = str(ROOT / "tests" / "mpi" / "programs" / "crowded_collectives.py")


def job(
    ranks: int, cpus: set[int] | None, pin_each: bool = False
) -> list[tuple[bool, float, bool, float]]:
    """Run the program on `ranks` ranks pinned to `cpus` (None: as we are; `pin_each`: each
    rank then pins itself to one of them before MPI starts); each rank's (crowded, endpoint
    spin_us, collective area yields, area spin_us), after checking every rank finished its
    windows and ran every object collective through the area."""
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    command = [*pin, PYTHON, "-m", "guest_lib.mpi.launcher", "-n", str(ranks),
               "--timeout", "100", PROGRAM, *(["--pin"] if pin_each else [])]  # fmt: skip
    out = run_job(command, 120).stdout
    seen: dict[int, tuple[bool, float]] = {}
    area: dict[int, tuple[bool, float]] = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) == 6 and words[2] in ("crowded", "area-yields"):
            into = seen if words[2] == "crowded" else area
            into[int(words[1])] = (words[3] == "True", float(words[5]))
    assert sorted(seen) == sorted(area) == list(range(ranks)), out
    assert out.count(" ok ") == ranks, out
    rounds = [line.split()[3:] for line in out.splitlines() if " object-rounds " in line]
    assert len(rounds) == ranks and all(r[0] == r[2] for r in rounds), out
    return [seen[r] + area[r] for r in range(ranks)]


def test_crowded_job_blocks_early():
    cpu = min(os.sched_getaffinity(0))
    assert job(3, {cpu}) == [(True, CROWDED_SPIN_US, True, CROWDED_SPIN_US)] * 3


def test_uncrowded_job_keeps_its_spin():
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    assert job(2, set(sorted(cpus)[:2])) == [(False, DEFAULT_SPIN_US, False, DEFAULT_SPIN_US)] * 2


def test_ranks_pinned_to_a_cpu_each_are_not_crowded():
    """Crowding counts the CPUs of every rank's mask: ranks pinned one per CPU (as benchmarks
    and mpiexec's binding do) are not crowded though each one's own mask has one CPU."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    expect = (False, DEFAULT_SPIN_US, False, DEFAULT_SPIN_US)
    assert job(2, set(sorted(cpus)[:2]), pin_each=True) == [expect] * 2


def test_crowded_pingpong_hands_the_cpu_over_without_sleeping():
    """Two ranks on one CPU ping-pong small messages in every buffer form: the waiting rank
    yields the CPU to the one it waits for (which shares it) instead of sleeping on the
    doorbell, as MPICH's polling waits do: next to no voluntary context switch per message
    (a doorbell sleep takes one per message) in every batch of round trips where neither
    rank's waits were calm (others' processes made a yield long: the ranks then sleep for a
    while, see Endpoint.yield_us)."""
    cpu = min(os.sched_getaffinity(0))
    command = ["taskset", "-c", str(cpu), PYTHON, "-m", "guest_lib.mpi.launcher", "-n", "2",
               "--timeout", "100", PINGPONG]  # fmt: skip
    out = run_job(command, 120).stdout
    seen: dict[tuple[str, int], list[tuple[float, bool]]] = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) == 7 and words[2] == "switches":
            seen.setdefault((words[3], int(words[4])), []).append(
                (float(words[5]), words[6] == "True")
            )
    forms = ("numpy", "mmap", "double", "pickle")
    assert {form for form, _ in seen} == set(forms) and all(len(v) == 2 for v in seen.values()), out
    for form in forms:
        clear = [
            max(s for s, _ in v)
            for (f, _), v in seen.items()
            if f == form and not any(c for _, c in v)
        ]
        if not clear:
            pytest.skip(f"{form}: every batch met a long yield (others' processes ran on the CPU)")
        assert min(clear) < 0.1, (form, sorted(clear))


@pytest.mark.serial  # scheduling-bound: another test's processes on the CPU take its yields
def test_crowded_collectives_hand_the_cpu_over_without_sleeping():
    """Two ranks on one CPU run small Bcast and Gather calls: the ranks share the launcher's
    session (one scheduler autogroup, see guest_lib.launch.OutputRelay.start), so a member
    waiting in the collective area's yielding spin hands the CPU to the one it waits for
    instead of sleeping on the doorbell: next to no voluntary context switch per call in
    some batch of calls (others' processes on the CPU may spoil a batch). A rank per session
    (the yields then return at once) slept every other call: 0.5 switches per call. The
    C accelerator's spin only: the pure-Python wait (CollectiveGroup._await) polls for its
    2 us and stops yielding while waits are calm, so it sleeps after a yield or two."""
    if os.environ.get("IVSHMEM_COMM_PUREPYTHON") == "1":
        pytest.skip("the pure-Python wait sleeps after a yield or two (see the docstring)")
    cpu = min(os.sched_getaffinity(0))
    command = ["taskset", "-c", str(cpu), PYTHON, "-m", "guest_lib.mpi.launcher", "-n", "2",
               "--timeout", "100", COLLECTIVES]  # fmt: skip
    out = run_job(command, 120).stdout
    sessions = [line.split()[3] for line in out.splitlines() if " session " in line]
    assert sessions == ["True", "True"], out
    worst: dict[tuple[str, int], float] = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) == 6 and words[2] == "switches":
            key = (words[3], int(words[4]))
            worst[key] = max(worst.get(key, 0.0), float(words[5]))
    for name in ("bcast", "gather"):
        batches = [v for (n, _), v in worst.items() if n == name]
        assert len(batches) == 20, out
        assert min(batches) < 0.1, (name, sorted(batches))
