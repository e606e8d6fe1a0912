"""Shared fixtures: uniquely named regions that are always unlinked, and peer processes."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ivshmem_comm as ic
from ivshmem_comm.notify import SemaphoreNotifier


def vm_marks(timeout: float) -> list[pytest.MarkDecorator]:
    """The marks of a test that boots lab guests: `vm`, a skip where the lab cannot run here
    (an error under IVSHMEM_REQUIRE_VM=1, see below), and a timeout."""
    from host_broker.lab import lab_available

    ok, why = lab_available()
    return [
        pytest.mark.vm,
        pytest.mark.skipif(not ok, reason=f"VM lab unavailable: {why}"),
        pytest.mark.timeout(timeout),
    ]


def vm_test(timeout: float) -> Callable[[Any], Any]:
    """A decorator giving one test the marks of `vm_marks(timeout)`."""

    def mark(test: Any) -> Any:
        for each in vm_marks(timeout):
            test = each(test)
        return test

    return mark


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def destroy(name: str, max_peers: int) -> None:
    try:
        ic.Region.unlink(name)
    except FileNotFoundError:
        pass
    SemaphoreNotifier.unlink_all(name, max_peers)


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


def run_peer(body: Callable[..., None], name: str, peer: int, *args: Any) -> None:
    """Process entry: open region `name`, join as `peer`, run body(ep, *args), exit 0/1."""
    code = 1
    try:
        region = ic.Region.open(name)
        with region.endpoint(peer) as ep:
            body(ep, *args)
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under IVSHMEM_REQUIRE_VM=1 (CI), a machine that cannot boot lab guests is an error."""
    if os.environ.get("IVSHMEM_REQUIRE_VM") == "1":
        from host_broker.lab import lab_available

        ok, reason = lab_available()
        if not ok:
            raise pytest.UsageError(f"IVSHMEM_REQUIRE_VM=1 but the VM lab is unavailable: {reason}")
