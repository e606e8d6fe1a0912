"""The guest's notifier: kicks through BAR0's Doorbell register, waits on a UIO vector.

`DoorbellNotifier` implements ivshmem_comm.notify.Notifier for an `ivshmem-doorbell` device:

- kick(slot): one aligned 32-bit store of `(id << 16) | vector` to BAR0 offset 12, where `id`
  is the ivshmem id of the peer in peer-table slot `slot` (the broker hands out ids that are
  not slots and writes each peer's id into its slot's `doorbell` field; `target_of` reads
  it). QEMU turns the store into a write to that peer's eventfd `vector` (another guest's
  MSI-X vector, or a host process's eventfd). A doorbell to a peer that is gone is silently
  dropped by QEMU. The `doorbell` field is written by others: a value that is no 16-bit id
  (or a slot out of range) makes the kick a no-op (counted in `bad_kicks`), never an error.
- wait(timeout): poll() + read() of the `/dev/uioN` of our own vector 0 (uio_ivshmem): the
  vCPU halts, no polling. The 4-byte read returns the interrupt count and consumes every
  interrupt seen so far (several kicks coalesce into one wake). MSI-X is edge-triggered and
  the driver never masks it on delivery, so no re-enable is needed after each read; the
  vector is enabled once at construction (writing int32 1; harmless when already on).
- Without a UIO device (driver absent) waits fall back to ivshmem_comm's PollingNotifier
  (sleep with backoff; `blocking` is then False). Kicks still go through the register.

Counters (plain ints, for tests and the demo): `kicks`, `waits` (calls of wait), `wakeups`
(waits ended by an interrupt), `timeouts` (waits that ended without one), `bad_kicks` (kicks
not sent: the target slot carried no valid ivshmem id).
"""

from __future__ import annotations

import math
import mmap
import os
import select
import struct
from collections.abc import Callable

from guest_lib.pci import REG_DOORBELL
from ivshmem_comm.notify import PollingNotifier
from ivshmem_comm.region import Region

MAX_DOORBELL_ID = 0xFFFF  # the Doorbell register carries the target id in bits 16..31


def region_target(region: Region) -> Callable[[int], int | None]:
    """`target_of` for DoorbellNotifier: slot -> the ivshmem id in that slot's `doorbell`
    field (one aligned 8-byte load), None for a slot out of range."""
    u64 = region.u64
    offsets = [region.peer_slot_offset(p) // 8 + 2 for p in range(region.max_peers)]

    def target_of(slot: int) -> int | None:
        if not 0 <= slot < len(offsets):
            return None
        try:
            return int(u64[offsets[slot]])
        except (ValueError, IndexError):  # the region was closed meanwhile
            return None

    return target_of


class DoorbellNotifier:
    """Notifier over BAR0 (`registers`, a mapping of at least 16 bytes) and `uio_path`.

    `uio_path`: the /dev/uioN of this device's vector 0, or None to poll. `target_of` maps
    the slot given to kick() to the ivshmem id to ring (see `region_target`); None rings
    the slot number itself (only right where ids equal slots). The notifier owns
    `registers` and the UIO fd from here on: close() closes both. Raises OSError if
    `uio_path` cannot be opened.
    """

    def __init__(
        self,
        registers: mmap.mmap,
        uio_path: str | None,
        vector: int = 0,
        target_of: Callable[[int], int | None] | None = None,
    ) -> None:
        self._registers = registers
        self._regs32 = memoryview(registers).cast("I")
        self.vector = vector
        self.uio_path = uio_path
        self._target_of = target_of
        self.bad_kicks = 0
        self.kicks = 0
        self.waits = 0
        self.wakeups = 0
        self.timeouts = 0
        self._fd: int | None = None
        self._fallback: PollingNotifier | None = None
        if uio_path is None:
            self._fallback = PollingNotifier()
            self.blocking = False
            return
        self._fd = os.open(uio_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(self._fd, struct.pack("<i", 1))  # (re)enable this vector's interrupt
        except OSError:
            pass  # EIO: a device without interrupts; poll() below then never fires
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self.blocking = True

    def kick(self, peer: int) -> None:
        """Ring the vector `self.vector` of the peer in slot `peer`. Never raises for a peer
        that is gone or a slot whose `doorbell` field holds garbage."""
        self.kicks += 1
        target = peer if self._target_of is None else self._target_of(peer)
        if target is None or not 0 <= target <= MAX_DOORBELL_ID:
            self.bad_kicks += 1  # a peer-written value that is no ivshmem id: don't ring
            return
        # Ownership: BAR0 is this guest's own device register, not shared memory. A single
        # aligned 32-bit store (memoryview 'I' item: one mov) that QEMU traps; the ring
        # updates it announces were stored before it (x86 TSO keeps store order, and the
        # MMIO write is serialising under both KVM and TCG).
        self._regs32[REG_DOORBELL // 4] = (target << 16) | (self.vector & 0xFF)

    def wait(self, timeout: float) -> bool:
        """Sleep until our vector fires or `timeout` seconds pass. True iff it fired."""
        self.waits += 1
        if self._fallback is not None:
            self._fallback.wait(timeout)
            self.timeouts += 1
            return False
        assert self._fd is not None
        ms = max(math.ceil(timeout * 1000), 0)
        if not self._poll.poll(ms):
            self.timeouts += 1
            return False
        try:
            os.read(self._fd, 4)
        except BlockingIOError:
            self.timeouts += 1
            return False
        self.wakeups += 1
        return True

    def counters(self) -> dict[str, int]:
        """{"kicks", "waits", "wakeups", "timeouts"}: what this notifier did so far."""
        return {
            "kicks": self.kicks,
            "waits": self.waits,
            "wakeups": self.wakeups,
            "timeouts": self.timeouts,
            "bad_kicks": self.bad_kicks,
        }

    def close(self) -> None:
        """Close the UIO fd and unmap BAR0. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._registers is not None:
            self._regs32.release()
            self._registers.close()
            self._registers = None  # type: ignore[assignment]
