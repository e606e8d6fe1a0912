"""Shared fixtures: uniquely named regions that are always unlinked, and peer processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ivshmem_comm as ic
from ivshmem_comm.region import SHM_DIR
from tests.support import descendants, destroy, unique_name

# ------------------------------------------------------------------------------ residue
# Other test runs may share this machine's /dev/shm: an object counts as this run's only if
# its name carries the pid of this pytest process or of one of its descendants (test names
# t-<pid>-<hex>, tb-..., mpit-..., ivshmem-run's mpi-<launcher pid>-<hex>). Descendants are
# sampled while a module runs, so those gone by its end still count.
RESIDUE_GRACE_S = 5.0  # processes a module stopped may still be removing what they made
SAMPLE_S = 0.25
_PID_TOKEN = re.compile(r"(?:^|[-._])([0-9]+)(?=$|[-._])")


def _residue_places() -> list[str]:
    """Where a test run may leave objects: POSIX shm and semaphores, the brokers' default
    state dir, and the temporary dirs of `ivshmem-run --broker`."""
    from ivshmem_comm.records import default_state_dir

    return [SHM_DIR, default_state_dir(), tempfile.gettempdir()]


def _snapshot() -> set[str]:
    found = set()
    for place in _residue_places():
        try:
            names = os.listdir(place)
        except OSError:
            continue
        if place == tempfile.gettempdir():
            names = [n for n in names if n.startswith("ivshmem-run-")]
        found.update(os.path.join(place, name) for name in names)
    return found


class _Sampler(threading.Thread):
    """Collects the pids of this process's descendants every SAMPLE_S until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pids = {os.getpid()}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.pids |= set(descendants(os.getpid()))

    def stop(self) -> set[int]:
        self.done.set()
        self.join()
        return self.pids | set(descendants(os.getpid()))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


@pytest.fixture(scope="module", autouse=True)
def no_residue(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a module that leaves shm objects, semaphores, broker sockets/records or
    `ivshmem-run` dirs behind (new since it started, named after this run's processes), then
    remove them. Off inside the ranks of a job (they share their launcher's objects) and with
    IVSHMEM_RESIDUE_CHECK=0."""
    ranks = ("IVSHMEM_MPI_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
    if os.environ.get("IVSHMEM_RESIDUE_CHECK") == "0" or any(v in os.environ for v in ranks):
        yield
        return
    before = _snapshot()
    sampler = _Sampler()
    sampler.start()
    yield
    ours = sampler.stop()
    deadline = time.monotonic() + RESIDUE_GRACE_S
    while True:
        left = sorted(
            path
            for path in _snapshot() - before
            if ours & {int(t) for t in _PID_TOKEN.findall(os.path.basename(path))}
        )
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for path in left:
        _remove(path)
    if left:
        pytest.fail(f"{request.module.__name__} left behind (now removed): {', '.join(left)}")


@pytest.fixture
def make_region() -> Iterator[Callable[..., ic.Region]]:
    """Factory of fresh regions, unlinked (with their doorbells) after the test."""
    made: list[tuple[ic.Region, int]] = []

    def make(size: int = 8 << 20, max_peers: int = 2, **geometry: Any) -> ic.Region:
        region = ic.Region.create(unique_name(), size, max_peers, **geometry)
        made.append((region, max_peers))
        return region

    yield make
    for region, max_peers in made:
        name = region.name
        region.close()
        destroy(name, max_peers)


@pytest.fixture
def spawn() -> Iterator[Callable[..., multiprocessing.Process]]:
    """Start a function in a forked process; every process is joined (or killed) after."""
    ctx = multiprocessing.get_context("fork")
    procs: list[multiprocessing.Process] = []

    def start(target: Callable[..., Any], *args: Any) -> multiprocessing.Process:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, the `slow` tests (whole jobs, up to minutes) go first, in their
    order, so that no long job is left to end the run on one worker while the others idle.
    Every worker collects the same order, as xdist requires."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under IVSHMEM_REQUIRE_VM=1 (CI), a machine that cannot boot lab guests is an error."""
    if os.environ.get("IVSHMEM_REQUIRE_VM") == "1":
        from ivshmem_lab import lab_available

        ok, reason = lab_available()
        if not ok:
            raise pytest.UsageError(f"IVSHMEM_REQUIRE_VM=1 but the VM lab is unavailable: {reason}")
