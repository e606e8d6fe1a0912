"""ERRORS_ARE_FATAL ends the job (issue #11 point 3): real ranks under ivshmem-run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.mpi.conftest import PYTHON, ROOT, job_env

PROGRAM = str(Path(__file__).with_name("programs") / "errors_fatal.py")
AT_WAIT = str(Path(__file__).with_name("programs") / "errors_at_wait.py")


def _job(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "guest_lib.mpi.launcher", "-n", "2", "--timeout", "60", *args],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def test_errors_are_fatal_aborts_the_job():
    start = time.monotonic()
    done = _job(PROGRAM)
    assert done.returncode == 6, (done.returncode, done.stderr[-3000:])  # MPI_ERR_RANK
    assert "ERRORS_ARE_FATAL" in done.stderr and "rank 1 went on" not in done.stdout
    assert time.monotonic() - start < 40


def test_truncation_found_at_wait_aborts_under_errors_are_fatal():
    """The error a request reports at Wait goes through its communicator's handler: the
    whole job ends with ERR_TRUNCATE (14) and the error printed, rank 1 is not waited for."""
    start = time.monotonic()
    done = _job(AT_WAIT, "fatal")
    assert done.returncode == 14, (done.returncode, done.stderr[-3000:])
    assert "ERRORS_ARE_FATAL" in done.stderr and "receive of" in done.stderr
    assert "rank 0 went on" not in done.stdout and "raised" not in done.stdout
    assert time.monotonic() - start < 40


def test_truncation_found_at_waitall_calls_the_user_handler():
    """Under a user handler, Waitall calls it once with (the communicator, ERR_IN_STATUS),
    then raises MPI.Exception with that class (MPI); the job goes on to a clean end."""
    done = _job(AT_WAIT, "user")
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "raised 17 handler saw [(True, 17)]" in done.stdout, done.stdout
