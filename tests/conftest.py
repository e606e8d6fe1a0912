"""Shared fixtures: uniquely named regions that are always unlinked, and peer processes."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ivshmem_comm as ic
from tests.support import destroy, unique_name


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


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under IVSHMEM_REQUIRE_VM=1 (CI), a machine that cannot boot lab guests is an error."""
    if os.environ.get("IVSHMEM_REQUIRE_VM") == "1":
        from ivshmem_lab import lab_available

        ok, reason = lab_available()
        if not ok:
            raise pytest.UsageError(f"IVSHMEM_REQUIRE_VM=1 but the VM lab is unavailable: {reason}")
