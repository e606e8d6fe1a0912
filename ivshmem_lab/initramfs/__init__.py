"""The guest's initramfs: busybox, the kernel modules a guest needs, ``/init``, the UIO driver.

:func:`build_initramfs` writes (or finds in the cache, keyed by a hash of every input) a
``newc`` cpio archive holding a static busybox, the host kernel's virtio-pci / 9p / uio /
virtio-net / tcp_diag modules in load order (:func:`module_load_order`), the project's
``uio_ivshmem`` driver built against the kernel's headers (:func:`build_uio_module`; left
out, with the reason, when it does not build) and ``/init`` (``init.sh`` in this package: it
mounts the host root read-only over 9p, chroots into it and runs the guest's command).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ivshmem_lab.errors import LabError
from ivshmem_lab.host import KernelInfo, cache_dir, find_busybox, find_kernel

__all__ = [
    "GUEST_MODULES",
    "INITRAMFS_FORMAT",
    "CpioWriter",
    "Initramfs",
    "build_initramfs",
    "build_uio_module",
    "modname",
    "module_load_order",
]

#: Bumped whenever the initramfs layout or the /init protocol changes (part of the cache key).
INITRAMFS_FORMAT = 2
#: Kernel modules the guest needs (with their modules.dep dependencies), in load order.
#: virtio_net is always there (loading it costs nothing without a NIC) for networked guests;
#: tcp_diag lets ``ss -ti`` in a guest show its TCP connections' byte counts.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "uio", "virtio_net", "tcp_diag")

_INIT_SCRIPT = Path(__file__).resolve().parent / "init.sh"
#: The uio_ivshmem driver's sources: guest_lib ships them (the guest side's driver).
_KMOD_DIR = Path(__file__).resolve().parents[2] / "guest_lib" / "kmod"
_KMOD_SOURCES = ("uio_ivshmem.c", "Kbuild", "Makefile")


class CpioWriter:
    """A minimal writer of the ``newc`` cpio format the kernel unpacks: add entries, then
    :meth:`finish` returns the archive (padded to 512 bytes)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nb = name.encode() + b"\0"
        fields = (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0,
        )  # fmt: skip
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.buf.write(hdr + nb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def _read_module(path: Path) -> bytes:
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def module_load_order(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """Resolve ``wanted`` module names through modules.dep: dependencies first, no repeats.

    Built-in modules (modules.builtin) are skipped; a name that is neither raises LabError.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[modname(mod)] = mod
    builtin: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        builtin = {modname(x) for x in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in deps.get(mod, []):
            visit(d)
        order.append(mod)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise LabError(f"kernel module {name} not found in {moddir}")
    return [moddir / m for m in order]


def modname(relpath: str) -> str:
    """The module name of a modules.dep path: ``kernel/fs/9p/9p.ko.xz`` -> ``9p``."""
    base = relpath.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


@dataclass(frozen=True)
class Initramfs:
    """A built initramfs: ``path`` (cached file), whether it carries ``uio_ivshmem.ko``,
    and the module build log (the compiler's output on failure, "" on a cache hit)."""

    path: Path
    kernel: KernelInfo
    uio_module: bool
    uio_build_log: str


def build_uio_module(kernel: KernelInfo, cache: Path) -> tuple[Path | None, str]:
    """Build uio_ivshmem.ko for ``kernel`` (cached by source hash). Returns (ko or None, log)."""
    if not all((_KMOD_DIR / n).is_file() for n in _KMOD_SOURCES[:2]):
        return None, f"module sources not found in {_KMOD_DIR}"
    h = hashlib.sha256(kernel.version.encode())
    for n in _KMOD_SOURCES:
        p = _KMOD_DIR / n
        if p.is_file():
            h.update(n.encode() + b"\0" + p.read_bytes())
    out = cache / f"uio_ivshmem-{h.hexdigest()[:16]}.ko"
    if out.is_file():
        return out, ""
    if not (kernel.headers / "Makefile").is_file():
        return None, (
            f"{kernel.headers} missing: install linux-headers-{kernel.version} to build the"
            " uio_ivshmem driver"
        )
    with tempfile.TemporaryDirectory(prefix="ivshmem-kmod-") as tmp:
        for n in _KMOD_SOURCES[:2]:
            shutil.copy(_KMOD_DIR / n, tmp)
        try:
            proc = subprocess.run(
                ["make", "-C", str(kernel.headers), f"M={tmp}", "modules"],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"module build could not run: {e}"
        log = proc.stdout + proc.stderr
        ko = Path(tmp) / "uio_ivshmem.ko"
        if proc.returncode != 0 or not ko.is_file():
            return None, log
        tmp_out = out.with_suffix(f".tmp{os.getpid()}")
        shutil.copy(ko, tmp_out)
        os.replace(tmp_out, out)
    return out, log


def build_initramfs(
    kernel: KernelInfo | None = None,
    *,
    with_uio: bool = True,
    rebuild: bool = False,
    cache: Path | None = None,
) -> Initramfs:
    """Build (or fetch from the cache) the guest initramfs for ``kernel``.

    The cache key is the kernel version plus a hash of every input (busybox, modules, /init,
    the UIO driver). If the UIO driver does not build, the initramfs is built without it
    (``uio_module=False``, the reason in ``uio_build_log``). Raises :class:`LabUnavailable`
    without busybox-static or a kernel, :class:`LabError` if a needed module is missing.
    """
    kernel = kernel or find_kernel()
    cache = (cache or cache_dir()) / kernel.version
    cache.mkdir(parents=True, exist_ok=True)
    busybox = find_busybox()
    with open(cache / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        ko, log = build_uio_module(kernel, cache) if with_uio else (None, "not requested")
        modules = module_load_order(kernel.moddir, GUEST_MODULES)
        init = _INIT_SCRIPT.read_bytes()
        h = hashlib.sha256(f"{INITRAMFS_FORMAT}\0{kernel.version}\0".encode())
        bb = busybox.read_bytes()
        h.update(hashlib.sha256(bb).digest() + hashlib.sha256(init).digest())
        mod_data = [(m, _read_module(m)) for m in modules]
        for m, data in mod_data:
            h.update(m.name.encode() + hashlib.sha256(data).digest())
        ko_data = ko.read_bytes() if ko else b""
        h.update(hashlib.sha256(ko_data).digest())
        path = cache / f"initramfs-{h.hexdigest()[:16]}.cpio"
        if path.is_file() and not rebuild:
            with contextlib.suppress(OSError):
                os.utime(path)
                if ko:
                    os.utime(ko)
            return Initramfs(path, kernel, ko is not None, log)
        c = CpioWriter()
        for d in ("bin", "dev", "proc", "sys", "mnt", "ctl", "tmp", "lib", "lib/lab-modules"):
            c.dir(d)
        c.chardev("dev/console", 5, 1)
        c.chardev("dev/null", 1, 3)
        c.file("bin/busybox", bb, 0o755)
        c.symlink("bin/sh", "busybox")
        c.file("init", init, 0o755)
        names = []
        for i, (m, data) in enumerate(mod_data):
            name = f"{i:02d}-{modname(m.name)}.ko"
            names.append(name)
            c.file(f"lib/lab-modules/{name}", data)
        c.file("lib/lab-modules/order", ("\n".join(names) + "\n").encode())
        if ko_data:
            c.dir("lib/lab-modules/extra")
            c.file("lib/lab-modules/extra/uio_ivshmem.ko", ko_data)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(c.finish())
        os.replace(tmp, path)
        # Prune entries unused for a week (never a fresh one: another lab may be using it).
        for old in (*cache.glob("initramfs-*.cpio"), *cache.glob("uio_ivshmem-*.ko")):
            with contextlib.suppress(OSError):
                if old != path and old != ko and time.time() - old.stat().st_mtime > 7 * 86400:
                    old.unlink()
    return Initramfs(path, kernel, ko is not None, log)
