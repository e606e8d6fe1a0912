"""PCI discovery of ivshmem devices inside a guest (Linux sysfs), and mapping their BARs.

An ivshmem device is PCI vendor 0x1af4, device 0x1110 (QEMU's `ivshmem-plain` and
`ivshmem-doorbell`). Its BARs (see /work/shared/reference/ivshmem.md):

- BAR0: 256 bytes of 32-bit registers (IntrMask 0, IntrStatus 4, IVPosition 8, Doorbell 12);
- BAR1: the MSI-X table, present only on `ivshmem-doorbell` (so "has BAR1" = doorbell model);
- BAR2: the shared memory, which holds a region of this project when a broker or host
  process formatted it.

Mapping. BAR0 is mapped from sysfs `resource0` (uncached, as MMIO must be). BAR2 is mapped
through the project's UIO driver (`/dev/uioN`, map1) when that driver is bound to the
device, because the driver maps it write-back cacheable (it is RAM on the host); sysfs
`resource2` (which the kernel maps uncached) is the fallback. Under TCG both behave the
same; under KVM the cacheable mapping avoids uncached accesses to the data area.

Nothing here writes to the shared memory; the only stores are to sysfs `enable` (memory
decoding on, if off) and, in `UioVector.enable`, the UIO interrupt-enable word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import uuid as uuid_mod

from ivshmem_comm import layout
from ivshmem_comm.errors import RegionFormatError

PCI_ROOT = "/sys/bus/pci/devices"
UIO_ROOT = "/sys/class/uio"
IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
REG_IVPOSITION = 8
REG_DOORBELL = 12
BAR0_SIZE = 256


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    """What a device's BAR2 superblock says (checked: magic, version, CRC, size)."""

    name: str
    uuid: uuid_mod.UUID
    size: int
    max_peers: int


@dataclasses.dataclass(frozen=True)
class IvshmemDevice:
    """One ivshmem PCI function seen in sysfs.

    `path`: its sysfs directory; `bdf`: "0000:00:04.0"; `bar_sizes`: sizes of BAR0..BAR2
    (0 where absent); `driver`: the bound driver's name or None.
    """

    path: str
    bdf: str
    bar_sizes: tuple[int, int, int]
    driver: str | None

    @property
    def doorbell_model(self) -> bool:
        """True for `ivshmem-doorbell` (it has the MSI-X BAR1), False for `ivshmem-plain`."""
        return self.bar_sizes[1] > 0

    @property
    def shm_size(self) -> int:
        return self.bar_sizes[2]

    def describe(self) -> str:
        model = "ivshmem-doorbell" if self.doorbell_model else "ivshmem-plain"
        return f"{self.bdf} ({model}, BAR2 {self.shm_size} bytes, driver {self.driver})"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _bar_sizes(dev_path: str) -> tuple[int, int, int]:
    """Sizes of BAR0..2 from sysfs `resource` (one "start end flags" hex line per BAR)."""
    sizes = [0, 0, 0]
    with contextlib.suppress(OSError, ValueError):
        lines = _read(os.path.join(dev_path, "resource")).splitlines()
        for i in range(3):
            start, end, _flags = (int(x, 16) for x in lines[i].split())
            sizes[i] = end - start + 1 if end > start else 0
    return sizes[0], sizes[1], sizes[2]


def is_ivshmem(dev_path: str) -> bool:
    """True iff the sysfs PCI device at `dev_path` is 1af4:1110."""
    try:
        vendor = int(_read(os.path.join(dev_path, "vendor")), 16)
        device = int(_read(os.path.join(dev_path, "device")), 16)
    except (OSError, ValueError):
        return False
    return (vendor, device) == (IVSHMEM_VENDOR, IVSHMEM_DEVICE)


def device_at(dev_path: str) -> IvshmemDevice:
    """Describe the ivshmem device at sysfs path `dev_path`.

    Raises FileNotFoundError if there is no such device, ValueError if it is not 1af4:1110.
    """
    path = os.path.realpath(dev_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no PCI device at {dev_path}")
    if not is_ivshmem(path):
        raise ValueError(f"{dev_path} is not an ivshmem device (vendor 1af4, device 1110)")
    driver_link = os.path.join(path, "driver")
    driver = os.path.basename(os.readlink(driver_link)) if os.path.islink(driver_link) else None
    return IvshmemDevice(path, os.path.basename(path), _bar_sizes(path), driver)


def scan(root: str = PCI_ROOT) -> list[IvshmemDevice]:
    """Every ivshmem device under `root`, in bus order. Empty if `root` does not exist."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    return [device_at(os.path.join(root, n)) for n in names if is_ivshmem(os.path.join(root, n))]


def doorbell_devices(root: str = PCI_ROOT) -> list[str]:
    """Sysfs paths of the ivshmem-doorbell devices under `root`, in bus order."""
    return [device.path for device in scan(root) if device.doorbell_model]


def enable(device: IvshmemDevice) -> None:
    """Turn on the device's memory decoding via sysfs `enable` unless it already is.

    With uio_ivshmem bound the device is enabled and writing `enable` would fail with EBUSY,
    hence read first. Raises OSError (e.g. EACCES: not root) if enabling fails.
    """
    path = os.path.join(device.path, "enable")
    if _read(path) != "0":
        return
    with open(path, "w") as f:
        f.write("1")


def uio_devices(device: IvshmemDevice, uio_root: str = UIO_ROOT) -> dict[int, str]:
    """{vector: "/dev/uioN"} of the UIO devices of `device` that have an interrupt.

    Matches /sys/class/uio/uioN whose `device` link is this PCI function and whose
    `version` (written by uio_ivshmem: "vector=K nvectors=N mode=msix|intx|none") says it
    has an interrupt (mode msix or intx). Empty when the driver is not bound.
    """
    found: dict[int, str] = {}
    try:
        names = sorted(os.listdir(uio_root))
    except OSError:
        return found
    for name in names:
        base = os.path.join(uio_root, name)
        try:
            if os.path.realpath(os.path.join(base, "device")) != device.path:
                continue
            if _read(os.path.join(base, "name")) != "uio_ivshmem":
                continue
            fields = dict(
                item.split("=", 1) for item in _read(os.path.join(base, "version")).split()
            )
        except (OSError, ValueError):
            continue
        if fields.get("mode") in ("msix", "intx") and "vector" in fields:
            found[int(fields["vector"])] = "/dev/" + name
    return found


def uio_any(device: IvshmemDevice, uio_root: str = UIO_ROOT) -> str | None:
    """The first "/dev/uioN" bound to `device` by uio_ivshmem (interrupt or not), or None."""
    try:
        names = sorted(os.listdir(uio_root), key=lambda n: (len(n), n))
    except OSError:
        return None
    for name in names:
        base = os.path.join(uio_root, name)
        with contextlib.suppress(OSError):
            if (
                os.path.realpath(os.path.join(base, "device")) == device.path
                and _read(os.path.join(base, "name")) == "uio_ivshmem"
            ):
                return "/dev/" + name
    return None


def map_registers(device: IvshmemDevice) -> mmap.mmap:
    """Map BAR0 (sysfs `resource0`, 256 bytes of registers; use aligned 32-bit accesses)."""
    fd = os.open(os.path.join(device.path, "resource0"), os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, BAR0_SIZE)
    finally:
        os.close(fd)


def map_shared_memory(device: IvshmemDevice, length: int | None = None) -> mmap.mmap:
    """Map the first `length` bytes (default: all) of BAR2, the shared memory.

    Through the UIO driver's map1 (write-back) when uio_ivshmem is bound, else sysfs
    `resource2`. Raises OSError if neither can be mapped.
    """
    size = device.shm_size if length is None else length
    uio = uio_any(device)
    if uio is not None:
        with contextlib.suppress(OSError):
            map1 = os.path.join(UIO_ROOT, os.path.basename(uio), "maps", "map1", "size")
            if int(_read(map1), 16) >= size:
                fd = os.open(uio, os.O_RDWR | os.O_CLOEXEC)
                try:
                    return mmap.mmap(fd, size, offset=mmap.PAGESIZE)
                finally:
                    os.close(fd)
    fd = os.open(os.path.join(device.path, "resource2"), os.O_RDWR | os.O_CLOEXEC)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def read_ivposition(registers: mmap.mmap) -> int:
    """IVPosition (BAR0 offset 8): this guest's ivshmem id under a broker, 0 without one.

    Not a peer-table slot: the VM's slot is the one whose `doorbell` field holds this id
    (guest_lib.attach.vm_slot)."""
    return memoryview(registers).cast("I")[REG_IVPOSITION // 4]


def region_info(device: IvshmemDevice) -> RegionInfo:
    """Read and check the superblock at the start of `device`'s BAR2.

    Enables the device first if needed. Raises RegionFormatError (its `field` says what is
    wrong: "magic" when the memory holds no region of this project), OSError if the BAR
    cannot be mapped.
    """
    if device.shm_size < layout.SUPERBLOCK_SIZE:
        raise RegionFormatError("size", f"BAR2 is only {device.shm_size} bytes")
    enable(device)
    page = map_shared_memory(device, layout.SUPERBLOCK_SIZE)
    try:
        raw = bytes(page[: layout.SUPERBLOCK_SIZE])
    finally:
        page.close()
    sb = layout.unpack_superblock(raw, device.shm_size)
    return RegionInfo(sb.name, uuid_mod.UUID(bytes=sb.uuid), sb.geometry.region_size,
                      sb.geometry.max_peers)  # fmt: skip
