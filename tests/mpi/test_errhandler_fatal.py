"""ERRORS_ARE_FATAL ends the job (issue #11 point 3): real ranks under ivshmem-run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.mpi.conftest import PYTHON, ROOT, job_env

PROGRAM = str(Path(__file__).with_name("programs") / "errors_fatal.py")


def test_errors_are_fatal_aborts_the_job():
    start = time.monotonic()
    done = subprocess.run(
        [PYTHON, "-m", "guest_lib.mpi.launcher", "-n", "2", "--timeout", "60", PROGRAM],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 6, (done.returncode, done.stderr[-3000:])  # MPI_ERR_RANK
    assert "ERRORS_ARE_FATAL" in done.stderr and "rank 1 went on" not in done.stdout
    assert time.monotonic() - start < 40
