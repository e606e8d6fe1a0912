"""Guest devices: ivshmem PCI devices a lab guest gets, and their QEMU options.

:class:`ShmDevice` is an ``ivshmem-plain`` device over a host shared-memory file (no broker,
no interrupts); :class:`DoorbellDevice` an ``ivshmem-doorbell`` device connected to a
broker's UNIX socket (peer id and interrupts from the broker). :func:`parse_device` reads the
command line's spelling of either, :func:`qemu_device_args` gives QEMU's options.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from host_broker.qemu import ivshmem_args
from ivshmem_comm.units import parse_size
from ivshmem_lab.errors import LabError

__all__ = ["DeviceSpec", "DoorbellDevice", "ShmDevice", "parse_device", "qemu_device_args"]


@dataclass(frozen=True)
class ShmDevice:
    """An ``ivshmem-plain`` device backed by a host shared-memory file.

    ``name`` is a POSIX shm name (``"r0"`` or ``"/r0"`` -> ``/dev/shm/r0``) or an absolute
    path. ``size`` in bytes (int or ``"16M"``) is needed only when the file does not exist
    yet (QEMU then creates it); otherwise the file's size is used. The size must be a power
    of two (a PCI BAR).
    """

    name: str
    size: int | str | None = None

    @property
    def path(self) -> str:
        """Host path of the backing file."""
        n = self.name
        if n.startswith("/dev/shm/") or (n.startswith("/") and n.count("/") > 1):
            return n
        return "/dev/shm/" + n.lstrip("/")

    def resolved_size(self) -> int:
        """Size for QEMU: the file's size if it exists, else ``size`` (whether QEMU takes
        it, a power of two, is checked by :func:`qemu_device_args`).

        Raises :class:`LabError` if neither is known.
        """
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if not size:
            if self.size is None:
                raise LabError(f"{self.path} does not exist and no size was given")
            size = parse_size(self.size)
        return size


@dataclass(frozen=True)
class DoorbellDevice:
    """An ``ivshmem-doorbell`` device served by an ivshmem-server-protocol broker.

    ``socket`` is the broker's UNIX socket; ``vectors`` the number of MSI-X vectors
    (interrupts) the guest gets (QEMU 7.2's ivshmem-doorbell is MSI-X only); ``ioeventfd``
    lets KVM deliver doorbells without a trip through QEMU.
    """

    socket: str
    vectors: int = 1
    ioeventfd: bool = True


#: A device, or its command-line spelling (see :func:`parse_device`).
DeviceSpec = ShmDevice | DoorbellDevice | str


def parse_device(spec: DeviceSpec) -> ShmDevice | DoorbellDevice:
    """Turn a device spec into a device.

    Strings: ``"sock:PATH[:VECTORS]"`` or an existing UNIX socket path -> :class:`DoorbellDevice`;
    ``"shm:NAME[:SIZE]"`` or ``"NAME[:SIZE]"`` -> :class:`ShmDevice`. Raises ValueError on a
    malformed spec.
    """
    if isinstance(spec, ShmDevice | DoorbellDevice):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"bad device spec {spec!r}")
    if spec.startswith("sock:"):
        path, _, vec = spec[5:].partition(":")
        return DoorbellDevice(path, int(vec) if vec else 1)
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(spec).st_mode):
            return DoorbellDevice(spec)
    if spec.startswith("shm:"):
        spec = spec[4:]
    name, _, size = spec.partition(":")
    return ShmDevice(name, parse_size(size) if size else None)


def qemu_device_args(devices: Sequence[ShmDevice | DoorbellDevice]) -> list[str]:
    """QEMU options giving a guest `devices`, in order (:func:`host_broker.qemu.ivshmem_args`
    with ids ``ivm<i>``/``ivc<i>`` by position, so one socket may back several doorbell
    devices of one guest). Raises LabError for what ivshmem_args refuses (a size QEMU would
    refuse, vectors outside 1..MAX_VECTORS, ...) or an object that is not a device."""
    args: list[str] = []
    for i, dev in enumerate(devices):
        try:
            if isinstance(dev, ShmDevice):
                args += ivshmem_args(f"ivm{i}", mem_path=dev.path, size=dev.resolved_size())
            elif isinstance(dev, DoorbellDevice):
                args += ivshmem_args(
                    f"ivc{i}", socket=dev.socket, vectors=dev.vectors, ioeventfd=dev.ioeventfd
                )
            else:
                raise LabError(f"not a device: {dev!r}")
        except ValueError as exc:
            raise LabError(str(exc)) from None
    return args
