"""Helpers shared by the test groups: unique region names, teardown, peer processes, VM marks."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import ivshmem_comm as ic
from ivshmem_comm.notify import SemaphoreNotifier


def vm_marks(timeout: float) -> list[pytest.MarkDecorator]:
    """The marks of a test that boots lab guests: `vm`, a skip where the lab cannot run here
    (an error under IVSHMEM_REQUIRE_VM=1, see below), and a timeout."""
    from ivshmem_lab import lab_available

    ok, why = lab_available()
    return [
        pytest.mark.vm,
        pytest.mark.skipif(not ok, reason=f"VM lab unavailable: {why}"),
        pytest.mark.timeout(timeout),
    ]


# IVSHMEM_COMM_PUREPYTHON=1 swaps the queue code alone (ivshmem_comm.ring: the rings under
# channels, endpoints and collectives). A test that runs none of it (the broker, QEMU and the
# broker's clients only) runs the same code on both paths: once, on the C pass.
queue_free = pytest.mark.skipif(
    os.environ.get("IVSHMEM_COMM_PUREPYTHON") == "1",
    reason="runs no queue code (broker, QEMU, broker clients): the C pass runs the same",
)


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


def descendants(root: int) -> list[int]:
    """Pids of the live processes below process `root` (from /proc, children first)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found: list[int] = []
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier}
        found.extend(frontier)
    return found


def gone(pid: int) -> bool:
    """True once process `pid` has exited (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def cmdline(pid: int) -> list[str]:
    """The argv of process `pid` ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
