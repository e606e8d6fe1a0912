"""The guest kernel as QEMU boots it fastest: the uncompressed ELF ``vmlinux`` (PVH entry).

A Debian ``/boot/vmlinuz-<ver>`` is a bzImage whose payload is the kernel ELF compressed
with xz. Booted as is, the guest first runs the kernel's own decompressor, which under TCG
(no KVM: CI, nested guests) is half of a guest's boot (measured: 17 s of 33 s from QEMU's
start to ``/init`` on a loaded 2-core host, and the whole gap between SeaBIOS's "Booting
from ROM" and the kernel's first line). A kernel built with ``CONFIG_PVH`` carries a Xen
``PHYS32_ENTRY`` ELF note, through which QEMU (>= 4.0) starts the uncompressed ELF directly,
initrd and command line included, so that step is gone.

:func:`boot_image` extracts that ELF once per kernel image into the lab's cache and returns
it; when the image is no bzImage, its payload is neither xz nor gzip, or the ELF has no PVH
entry, it returns the image itself (QEMU boots it the slow way, as before).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import os
import struct
import time
import zlib
from pathlib import Path

from ivshmem_lab.host import KernelInfo

__all__ = ["boot_image", "bzimage_payload", "decompress_payload", "has_pvh_entry"]

_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the note QEMU looks for to boot an ELF kernel through PVH
_PT_NOTE = 4
_UNUSED_S = 7 * 86400  # cached ELFs of other images unused this long are removed


def bzimage_payload(image: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage (boot protocol >= 2.08: ``payload_offset`` and
    ``payload_length`` of the setup header), or None if `image` is no such bzImage."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    if struct.unpack_from("<H", image, 0x206)[0] < 0x208:
        return None
    setup_sects = image[0x1F1] or 4  # (0 means 4, as the boot protocol says)
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(image):
        return None
    return image[start : start + length]


def decompress_payload(payload: bytes) -> bytes | None:
    """The payload decompressed (xz or gzip; the kernel build appends the size after the
    stream, which is ignored), or None for another format or a corrupt or cut stream."""
    stream: lzma.LZMADecompressor | zlib._Decompress
    if payload.startswith(b"\xfd7zXZ\x00"):
        stream = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif payload.startswith(b"\x1f\x8b"):
        stream = zlib.decompressobj(wbits=31)
    else:
        return None
    try:
        out = stream.decompress(payload)
    except (lzma.LZMAError, zlib.error):
        return None
    return out if stream.eof else None  # (a stream cut short is corrupt too)


def has_pvh_entry(elf: bytes) -> bool:
    """True if `elf` is a little-endian ELF64 with a Xen ``PHYS32_ENTRY`` note in one of its
    PT_NOTE segments (what QEMU needs to boot it directly); False for anything else."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", elf, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        entry = phoff + i * phentsize
        if entry + 56 > len(elf) or struct.unpack_from("<I", elf, entry)[0] != _PT_NOTE:
            continue
        offset = struct.unpack_from("<Q", elf, entry + 8)[0]  # p_offset
        filesz = struct.unpack_from("<Q", elf, entry + 32)[0]  # p_filesz
        end = min(offset + filesz, len(elf))
        at = offset
        while at + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, at)
            name = elf[at + 12 : at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def boot_image(kernel: KernelInfo, cache: Path) -> Path:
    """The file to give QEMU's ``-kernel`` for `kernel`: the PVH-bootable ELF extracted from
    its image, cached as ``<cache>/<version>/vmlinux-<hash of the image>.elf`` (extracted
    under the cache's lock, written atomically, so concurrent labs extract it once), or the
    image itself when it holds no such ELF or the cache cannot be written."""
    image = kernel.image.read_bytes()
    directory = cache / kernel.version
    path = directory / f"vmlinux-{hashlib.sha256(image).hexdigest()[:16]}.elf"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            if path.is_file():
                os.utime(path)
                return path
            payload = bzimage_payload(image)
            elf = decompress_payload(payload) if payload is not None else None
            if elf is None or not has_pvh_entry(elf):
                return kernel.image
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            try:
                tmp.write_bytes(elf)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            for old in directory.glob("vmlinux-*.elf"):
                with contextlib.suppress(OSError):
                    if old != path and time.time() - old.stat().st_mtime > _UNUSED_S:
                        old.unlink()
    except OSError:
        return kernel.image
    return path
