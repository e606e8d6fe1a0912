"""ivshmem_lab.kernel_image: the uncompressed PVH-bootable ELF QEMU gets instead of vmlinuz.

Synthetic bzImages (a setup header pointing at an xz or gzip payload of a tiny ELF64 with or
without the Xen PHYS32_ENTRY note) check the extraction, the cache and every fallback to the
image itself; one test checks that this host's kernel, when built with CONFIG_PVH, is really
booted through its ELF (else every guest would silently pay the decompression again).
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from pathlib import Path

import pytest

from ivshmem_lab.host import KernelInfo, cache_dir, find_kernel, lab_available
from ivshmem_lab.kernel_image import (
    boot_image,
    bzimage_payload,
    decompress_payload,
    has_pvh_entry,
)


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    pad = b"\0" * (-len(name) % 4), b"\0" * (-len(desc) % 4)
    return struct.pack("<III", len(name), len(desc), kind) + name + pad[0] + desc + pad[1]


def _elf(*notes: bytes) -> bytes:
    """An ELF64 little-endian file: its header, one PT_LOAD and one PT_NOTE of `notes`."""
    body = b"".join(notes)
    phoff, phnum = 64, 2
    notes_at = phoff + 56 * phnum
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x1000000, phoff, 0, 0, 64, 56, phnum,
                          64, 0, 0)  # fmt: skip
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x1000000, 0x1000000, notes_at, notes_at, 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(body), len(body), 4)
    return header + load + note + body


PVH_ELF = _elf(_note(b"Xen\0", 6, b"linux\0"), _note(b"Xen\0", 18, struct.pack("<I", 0x1000)))
PLAIN_ELF = _elf(_note(b"Xen\0", 6, b"linux\0"), _note(b"GNU\0", 3, b"\x01" * 20))


def _bzimage(payload: bytes, setup_sects: int = 3, version: int = 0x20F) -> bytes:
    """A bzImage: `setup_sects` setup sectors with the header, then `payload` behind 100
    bytes of decompressor stub (the kernel build appends the payload's size, 4 bytes)."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<II", setup, 0x248, 100, len(payload) + 4)
    return bytes(setup) + b"\x90" * 100 + payload + struct.pack("<I", 1234) + b"\0" * 64


def _kernel(tmp_path: Path, image: bytes) -> KernelInfo:
    path = tmp_path / "vmlinuz-9.9.9-test"
    path.write_bytes(image)
    return KernelInfo("9.9.9-test", path, tmp_path / "modules")


XZ = lzma.compress(PVH_ELF, format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_X86},
                                                            {"id": lzma.FILTER_LZMA2}])  # fmt: skip


def test_the_payload_is_found_and_decompressed() -> None:
    assert bzimage_payload(_bzimage(XZ))[: len(XZ)] == XZ
    assert decompress_payload(bzimage_payload(_bzimage(XZ))) == PVH_ELF  # (size ignored)
    assert decompress_payload(bzimage_payload(_bzimage(gzip.compress(PVH_ELF)))) == PVH_ELF
    assert bzimage_payload(_bzimage(XZ, setup_sects=0)) is not None  # 0 means 4 sectors
    assert decompress_payload(b"(\xb5/\xfd" + XZ) is None  # zstd: not supported here
    assert decompress_payload(XZ[:40]) is None  # a cut stream
    assert bzimage_payload(_bzimage(XZ, version=0x207)) is None  # before payload_offset
    assert bzimage_payload(b"\x7fELF" + b"\0" * 2000) is None
    cut = _bzimage(XZ)
    assert bzimage_payload(cut[: len(cut) - 200]) is None  # the payload runs past the end


def test_only_an_elf_with_a_xen_phys32_entry_note_is_pvh() -> None:
    assert has_pvh_entry(PVH_ELF)
    assert not has_pvh_entry(PLAIN_ELF)
    assert not has_pvh_entry(PVH_ELF[:150])  # the note segment cut off
    assert not has_pvh_entry(b"MZ" + PVH_ELF[2:])
    assert not has_pvh_entry(PVH_ELF[:4] + b"\x01" + PVH_ELF[5:])  # ELF32


@pytest.mark.parametrize("compress", [lambda elf: XZ, gzip.compress], ids=["xz", "gzip"])
def test_boot_image_extracts_once_into_the_cache(tmp_path: Path, compress) -> None:
    kernel = _kernel(tmp_path, _bzimage(compress(PVH_ELF)))
    cache = tmp_path / "cache"
    elf = boot_image(kernel, cache)
    assert elf.parent == cache / "9.9.9-test" and elf.name.startswith("vmlinux-")
    assert elf.read_bytes() == PVH_ELF
    os.utime(elf, (1, 1))
    assert boot_image(kernel, cache) == elf  # from the cache: found, not written again
    assert elf.stat().st_mtime > 1
    assert [p.name for p in elf.parent.iterdir() if p.name != ".lock"] == [elf.name]


def test_boot_image_falls_back_to_the_image(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for image in (_bzimage(lzma.compress(PLAIN_ELF)), _bzimage(b"(\xb5/\xfd" + XZ), b"x" * 4096):
        kernel = _kernel(tmp_path, image)
        assert boot_image(kernel, cache) == kernel.image
    assert not list((cache / "9.9.9-test").glob("vmlinux-*"))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    kernel = _kernel(tmp_path, _bzimage(XZ))
    assert boot_image(kernel, blocked) == kernel.image  # the cache cannot be made


def test_a_pvh_kernel_of_this_host_boots_through_its_elf() -> None:
    ok, why = lab_available()
    if not ok:
        pytest.skip(f"VM lab unavailable: {why}")
    kernel = find_kernel()
    config = Path("/boot") / f"config-{kernel.version}"
    if not config.is_file() or "CONFIG_PVH=y\n" not in config.read_text():
        pytest.skip(f"{kernel.image} is not built with CONFIG_PVH")
    elf = boot_image(kernel, cache_dir())  # (the lab's own cache: the guests reuse it)
    assert elf != kernel.image and has_pvh_entry(elf.read_bytes())
