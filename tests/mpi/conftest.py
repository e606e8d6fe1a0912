"""Driver-side fixtures of the MPI tests: run jobs of real processes and check them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest_lib.launch import job_environ

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).with_name("mpiexec"))
RANKS = str(Path(__file__).with_name("ranks"))
PYTEST_RANK_ARGS = ["-m", "pytest", RANKS, "-x", "-q", "-p", "no:cacheprovider",
                    "-o", "faulthandler_timeout=120"]  # fmt: skip


def job_env(**extra: str) -> dict[str, str]:
    env = job_environ()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_job(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a job to completion (stdin: /dev/null, as in CI, wherever pytest runs: a launcher
    reading a terminal starts its ranks otherwise, see guest_lib.launch.rank_session); fail the
    test with its output if it does not exit 0."""
    try:
        done = subprocess.run(command, cwd=ROOT, env=job_env(**env), capture_output=True,
                              stdin=subprocess.DEVNULL, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"job timed out: {command}\n{exc.stdout}\n{exc.stderr}")
    if done.returncode != 0:
        pytest.fail(f"job exited {done.returncode}: {command}\n{done.stdout[-20000:]}\n"
                    f"{done.stderr[-4000:]}")  # fmt: skip
    return done


@pytest.fixture
def regions() -> Iterator[Callable[[int, int], str]]:
    """Factory of named regions (size, max_peers) -> name; unlinked with their doorbells."""
    import ivshmem_comm as ic
    from ivshmem_comm.notify import SemaphoreNotifier

    made: list[tuple[ic.Region, int]] = []

    def make(size: int, max_peers: int) -> str:
        region = ic.Region.create(f"mpit-{os.getpid()}-{uuid.uuid4().hex[:8]}", size, max_peers)
        made.append((region, max_peers))
        return region.name

    yield make
    for region, max_peers in made:
        name = region.name
        region.close()
        try:
            ic.Region.unlink(name)
        except FileNotFoundError:
            pass
        SemaphoreNotifier.unlink_all(name, max_peers)
