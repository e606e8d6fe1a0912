"""The library's service threads do not count as threads calling MPI: a job whose ranks
joined through a broker (each runs the broker client's socket reader) keeps the lock-free
single-threaded fast paths (`other_threads()` is 0), while a thread of the program's own
still counts."""

from __future__ import annotations

from tests.mpi.conftest import PYTHON, ROOT, run_job

PROGRAM = str(ROOT / "tests" / "mpi" / "programs" / "service_threads.py")


def test_broker_client_thread_is_not_an_mpi_thread():
    command = [PYTHON, "-m", "guest_lib.mpi.launcher", "-n", "2", "--broker",
               "--timeout", "100", PROGRAM]  # fmt: skip
    out = run_job(command, 120).stdout
    lines = sorted(line.split() for line in out.splitlines() if line.startswith("rank "))
    # each rank: the broker client's thread runs beside the main one; counted: 0, then 1
    assert lines == [["rank", str(r), "threads", "1", "counted", "0", "1"] for r in range(2)], out
