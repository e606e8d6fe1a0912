"""Waiting and kicking: how a peer sleeps when it has nothing to do and how others wake it.

A `Notifier` belongs to one endpoint: `wait` blocks on that peer's own doorbell, `kick(p)`
rings peer p's. Kicks are hints: a woken peer re-checks its queues, so a spurious or
coalesced kick is harmless. What makes a lost kick impossible is the EVENT_IDX handshake in
the rings (arm, fence, re-check), not the notifier.

Implementations:
- `SemaphoreNotifier`: one named POSIX semaphore per peer slot; host processes without a
  broker (`Region.create` / `Region.open`).
- `EventfdNotifier`: eventfds handed out by the broker (QEMU's ivshmem-server protocol).
- `PollingNotifier`: no doorbell at all (ivshmem-plain in a guest): sleeps with backoff.
The guest's BAR0-doorbell / UIO notifier lives in guest_lib.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import posix_ipc

if TYPE_CHECKING:
    from ivshmem_comm.region import Region


def crowded(region: Region, peers: Iterable[int], me: int) -> bool:
    """Whether `peers` (peer ids of `region`, `me` among them: this process) that run on this
    kernel outnumber the CPUs they may run on, the union of their affinity masks: then a peer
    that spins takes the CPU from the one it waits for, and waits should block early.

    A peer runs on this kernel unless its slot names another kernel's host id: peers there
    (another VM) have CPUs of their own and are not counted. A peer whose mask cannot be read
    (no pid in its slot yet, gone, not ours to look at) counts with this process's mask. A VM whose
    vCPUs outnumber the host's cores cannot be seen from here. Slot fields are advice:
    a hostile pid only changes this verdict, which only changes how long waits spin.
    """
    from ivshmem_comm.region import host_id

    cpus = set(os.sched_getaffinity(0))
    here = host_id()
    count = 0
    for p in peers:
        if p != me:
            info = region.peer(p)
            if info.host_id not in (0, here):
                continue
            if info.host_id == here and info.pid > 0:
                try:
                    cpus |= os.sched_getaffinity(info.pid)
                except OSError:
                    pass
        count += 1
    return count > len(cpus)


class Notifier(Protocol):
    """The waiting policy of one endpoint. `blocking` is False when `wait` only sleeps."""

    blocking: bool

    def kick(self, peer: int) -> None:
        """Ring peer `peer`'s doorbell. Never raises for a peer that is gone."""

    def wait(self, timeout: float) -> bool:
        """Sleep until kicked or `timeout` seconds pass. True iff a kick was consumed."""

    def close(self) -> None:
        """Release what the notifier holds; safe to call twice."""


SEM_DIR = "/dev/shm"  # where glibc keeps named semaphore "/x", as file "sem.x"


def semaphore_name(region: str, peer: int) -> str:
    """POSIX name of region `region`'s doorbell semaphore for peer `peer`."""
    return f"/{region}.doorbell.{peer}"


class SemaphoreNotifier:
    """Doorbells as named POSIX semaphores `/<region>.doorbell.<peer>` (mode 0600)."""

    blocking = True

    def __init__(self, region: str, peer: int, max_peers: int) -> None:
        self._region = region
        self._peer = peer
        self._sems: dict[int, posix_ipc.Semaphore] = {}
        self._own = self._sem(peer)
        # Kicks meant for an earlier holder of this slot would only cause one spurious wake;
        # drain them so the first wait is not one.
        self._drain()
        self.max_peers = max_peers

    def _sem(self, peer: int) -> posix_ipc.Semaphore:
        sem = self._sems.get(peer)
        if sem is None:
            sem = posix_ipc.Semaphore(
                semaphore_name(self._region, peer), posix_ipc.O_CREAT, mode=0o600, initial_value=0
            )
            self._sems[peer] = sem
        return sem

    def _drain(self) -> None:
        try:
            while True:
                self._own.acquire(0)
        except posix_ipc.BusyError:
            pass

    def kick(self, peer: int) -> None:
        self._sem(peer).release()

    def wait(self, timeout: float) -> bool:
        try:
            self._own.acquire(max(timeout, 0.0))
        except posix_ipc.BusyError:
            return False
        self._drain()  # several kicks coalesce into this one wake
        return True

    def close(self) -> None:
        for sem in self._sems.values():
            sem.close()
        self._sems.clear()

    @staticmethod
    def unlink_all(region: str, max_peers: int | None = None) -> None:
        """Remove the semaphores of every peer slot of `region` (missing ones are skipped).

        `max_peers` None: those found under the region's name in SEM_DIR, however many."""
        if max_peers is None:
            prefix = "sem." + semaphore_name(region, 0)[1:-1]  # files "sem.<region>.doorbell.N"
            found = [f[len(prefix) :] for f in os.listdir(SEM_DIR) if f.startswith(prefix)]
            max_peers = max((int(n) + 1 for n in found if n.isdigit()), default=0)
        for peer in range(max_peers):
            try:
                posix_ipc.unlink_semaphore(semaphore_name(region, peer))
            except posix_ipc.ExistentialError:
                pass


class EventfdNotifier:
    """Doorbells as eventfds from the broker: vector 0 of each peer is its doorbell.

    `own_fds` are this peer's eventfds (vector order), `peer_fds` those of the other peers;
    the broker client updates the latter with `set_peer` / `drop_peer` as peers come and go.
    """

    blocking = True
    RETIRE_DELAY = 1.0

    def __init__(self, own_fds: list[int], peer_fds: dict[int, list[int]] | None = None) -> None:
        if not own_fds:
            raise ValueError("an eventfd notifier needs at least one own eventfd")
        self._own = own_fds
        self._peers: dict[int, list[int]] = dict(peer_fds or {})
        self._retired: list[tuple[float, list[int]]] = []
        os.set_blocking(own_fds[0], False)

    def set_peer(self, peer: int, fds: list[int]) -> None:
        """Take `fds` as peer `peer`'s eventfds (retiring ones it replaces)."""
        old = self._peers.get(peer)
        self._peers[peer] = fds
        if old and old is not fds:
            self._retire(old)

    def drop_peer(self, peer: int) -> None:
        """Forget peer `peer`'s eventfds (retired, closed a little later)."""
        old = self._peers.pop(peer, None)
        if old:
            self._retire(old)

    def _retire(self, fds: list[int]) -> None:
        # The broker client calls set_peer/drop_peer from its own thread while the endpoint's
        # thread may be inside kick() with the old fd number in hand: closing at once could
        # let that number be reused and the kick write 8 bytes into an unrelated file. Retired
        # fds are closed only after RETIRE_DELAY seconds, far longer than any kick takes.
        now = time.monotonic()
        keep = []
        for retired_at, old in self._retired:
            if now - retired_at > self.RETIRE_DELAY:
                for fd in old:
                    os.close(fd)
            else:
                keep.append((retired_at, old))
        keep.append((now, fds))
        self._retired = keep

    def kick(self, peer: int) -> None:
        fds = self._peers.get(peer)
        if fds:
            try:
                os.eventfd_write(fds[0], 1)
            except OSError:
                pass  # the peer is gone; the broker announces it

    def wait(self, timeout: float) -> bool:
        # A poll object per call: Python's poll() refuses concurrent use of one object, and
        # MPI threads may wait here at once (the eventfd read below takes the ring once).
        poller = select.poll()
        poller.register(self._own[0], select.POLLIN)
        if not poller.poll(max(int(timeout * 1000), 0)):
            return False
        try:
            os.eventfd_read(self._own[0])
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        for fds in [*self._peers.values(), *(old for _, old in self._retired)]:
            for fd in fds:
                os.close(fd)
        self._peers.clear()
        self._retired.clear()
        for fd in self._own:
            try:
                os.close(fd)
            except OSError:
                pass
        self._own = []


class PollingNotifier:
    """No doorbell: `wait` sleeps with exponential backoff (50 µs doubling to 2 ms).

    A wait that starts long after the previous one ended begins a new episode at 50 µs.
    """

    blocking = False
    MIN_SLEEP = 50e-6
    MAX_SLEEP = 2e-3

    def __init__(self) -> None:
        self._sleep = self.MIN_SLEEP
        self._last_end = 0.0

    def kick(self, peer: int) -> None:
        pass  # nobody to wake: the peer polls

    def wait(self, timeout: float) -> bool:
        if time.monotonic() - self._last_end > 2 * self.MAX_SLEEP:
            self._sleep = self.MIN_SLEEP
        time.sleep(min(self._sleep, max(timeout, 0.0)))
        self._sleep = min(self._sleep * 2, self.MAX_SLEEP)
        self._last_end = time.monotonic()
        return False

    def close(self) -> None:
        pass
