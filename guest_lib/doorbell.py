"""The guest's notifier: kicks through BAR0's Doorbell register, waits on a UIO vector.

`DoorbellNotifier` implements ivshmem_comm.notify.Notifier for an `ivshmem-doorbell` device:

- kick(p): one aligned 32-bit store of `(p << 16) | vector` to BAR0 offset 12. QEMU turns it
  into a write to peer p's eventfd `vector` (another guest's MSI-X vector, or a host
  process's eventfd). A doorbell to a peer that is gone is silently dropped by QEMU.
- wait(timeout): poll() + read() of the `/dev/uioN` of our own vector 0 (uio_ivshmem): the
  vCPU halts, no polling. The 4-byte read returns the interrupt count and consumes every
  interrupt seen so far (several kicks coalesce into one wake). MSI-X is edge-triggered and
  the driver never masks it on delivery, so no re-enable is needed after each read; the
  vector is enabled once at construction (writing int32 1; harmless when already on).
- Without a UIO device (driver absent) waits fall back to ivshmem_comm's PollingNotifier
  (sleep with backoff; `blocking` is then False). Kicks still go through the register.

Counters (plain ints, for tests and the demo): `kicks`, `waits` (calls of wait), `wakeups`
(waits ended by an interrupt), `timeouts` (waits that ended without one).
"""

from __future__ import annotations

import math
import mmap
import os
import select
import struct

from guest_lib.pci import REG_DOORBELL
from ivshmem_comm.notify import PollingNotifier


class DoorbellNotifier:
    """Notifier over BAR0 (`registers`, a mapping of at least 16 bytes) and `uio_path`.

    `uio_path`: the /dev/uioN of this device's vector 0, or None to poll. The notifier owns
    `registers` and the UIO fd from here on: close() closes both. Raises OSError if
    `uio_path` cannot be opened.
    """

    def __init__(self, registers: mmap.mmap, uio_path: str | None, vector: int = 0) -> None:
        self._registers = registers
        self._regs32 = memoryview(registers).cast("I")
        self.vector = vector
        self.uio_path = uio_path
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
        """Ring `peer`'s vector `self.vector`. Never raises for a peer that is gone."""
        self.kicks += 1
        # Ownership: BAR0 is this guest's own device register, not shared memory. A single
        # aligned 32-bit store (memoryview 'I' item: one mov) that QEMU traps; the ring
        # updates it announces were stored before it (x86 TSO keeps store order, and the
        # MMIO write is serialising under both KVM and TCG).
        self._regs32[REG_DOORBELL // 4] = ((peer & 0xFFFF) << 16) | (self.vector & 0xFF)

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
