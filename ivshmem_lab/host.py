"""Host checks: can guests boot here, with what, and under KVM or TCG.

:func:`lab_available` answers "can the lab boot guests on this host?" without booting one:
QEMU (:func:`find_qemu`), a Debian kernel with its modules (:func:`find_kernel`) and a
static busybox (:func:`find_busybox`). Whether KVM works is only known by booting a guest
under it (:meth:`ivshmem_lab.lab.Lab.probe_kvm`); its verdict, a :class:`KvmProbe`, is
cached in :func:`cache_dir` under a key of the host kernel, QEMU and guest kernel
(:func:`kvm_probe_key`, :func:`load_kvm_probe`, :func:`save_kvm_probe`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ivshmem_lab.errors import LabUnavailable

__all__ = [
    "KernelInfo",
    "KvmProbe",
    "cache_dir",
    "find_busybox",
    "find_kernel",
    "find_qemu",
    "is_static_elf",
    "kvm_probe_key",
    "lab_available",
    "load_kvm_probe",
    "qemu_version",
    "save_kvm_probe",
]


def cache_dir() -> Path:
    """The lab's cache directory (created on demand by the functions that write it)."""
    env = os.environ.get("IVSHMEM_LAB_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ivshmem_comm" / "lab"


def find_qemu() -> str | None:
    """Path of ``qemu-system-x86_64`` (``$IVSHMEM_LAB_QEMU`` first), or None if not found."""
    env = os.environ.get("IVSHMEM_LAB_QEMU")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("qemu-system-x86_64")


@dataclass(frozen=True)
class KernelInfo:
    """A bootable kernel: its release string, image and module tree."""

    version: str
    image: Path
    moddir: Path

    @property
    def headers(self) -> Path:
        """Kbuild directory for out-of-tree modules (may not exist)."""
        return self.moddir / "build"


def _version_key(v: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", v)]


def find_kernel(version: str | None = None) -> KernelInfo:
    """Find a kernel image with a matching module tree.

    ``version`` (or ``$IVSHMEM_LAB_KERNEL``) picks a release; otherwise the newest
    ``/boot/vmlinuz-*`` that has ``/lib/modules/<ver>/modules.dep`` wins.
    Raises :class:`LabUnavailable` if there is none (or the image is unreadable).
    """
    version = version or os.environ.get("IVSHMEM_LAB_KERNEL") or None
    candidates = (
        [version]
        if version
        else sorted(
            (p.name[len("vmlinuz-") :] for p in Path("/boot").glob("vmlinuz-*")),
            key=_version_key,
            reverse=True,
        )
    )
    for ver in candidates:
        image = Path("/boot") / f"vmlinuz-{ver}"
        moddir = Path("/lib/modules") / ver
        if image.is_file() and (moddir / "modules.dep").is_file():
            if not os.access(image, os.R_OK):
                raise LabUnavailable(f"{image} is not readable by this user")
            return KernelInfo(ver, image, moddir)
    what = f"kernel {version}" if version else "a kernel"
    raise LabUnavailable(
        f"no {what} with modules found (/boot/vmlinuz-<ver> and /lib/modules/<ver>/modules.dep);"
        " install linux-image-amd64"
    )


def find_busybox() -> Path:
    """A statically linked busybox of this host; LabUnavailable if there is none."""
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.is_file() and is_static_elf(p):
            return p
    raise LabUnavailable("no statically linked busybox found; install busybox-static")


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF64 executable without a PT_INTERP (dynamic loader) entry."""
    with open(path, "rb") as f:
        hdr = f.read(64)
        if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2:
            return False
        phoff, phentsize, phnum = (
            struct.unpack_from("<Q", hdr, 32)[0],
            *struct.unpack_from("<HH", hdr, 54),
        )
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def lab_available(kernel: str | None = None) -> tuple[bool, str]:
    """Whether guests can be booted here: ``(True, "")`` or ``(False, reason)``.

    Checks for ``qemu-system-x86_64``, a kernel with modules and a static busybox;
    does not boot anything.
    """
    if find_qemu() is None:
        return False, "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    try:
        find_kernel(kernel)
        find_busybox()
    except LabUnavailable as e:
        return False, str(e)
    return True, ""


def qemu_version(qemu: str) -> str:
    """The first line of ``qemu --version`` ("unknown" if it cannot be run)."""
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


@dataclass(frozen=True)
class KvmProbe:
    """Verdict of booting a trivial guest under KVM: ``ok``, a ``reason`` and ``seconds``;
    ``cached`` if it was read from the cache rather than measured now."""

    ok: bool
    reason: str
    seconds: float
    cached: bool = False


def kvm_probe_key(qemu: str, kernel: KernelInfo) -> dict[str, str]:
    """What a cached KVM verdict is valid for: this host kernel, QEMU and guest kernel."""
    return {"host": platform.release(), "qemu": qemu_version(qemu), "guest": kernel.version}


def _probe_file(cache: Path) -> Path:
    return cache / "kvm-probe.json"


def load_kvm_probe(cache: Path, key: dict[str, str]) -> KvmProbe | None:
    """The verdict cached in `cache` for `key` (``cached=True``), or None if there is none
    (or it is unreadable, or for another key)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(_probe_file(cache).read_text())
        if data["key"] == key:
            return KvmProbe(
                bool(data["ok"]), str(data["reason"]), float(data["seconds"]), cached=True
            )
    return None


def save_kvm_probe(cache: Path, key: dict[str, str], probe: KvmProbe) -> None:
    """Cache `probe` for `key` in `cache` (atomically; a failure to write is ignored: the
    next lab probes again)."""
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
        fname = _probe_file(cache)
        tmp = fname.with_suffix(f".tmp{os.getpid()}")
        record = {"key": key, "ok": probe.ok, "reason": probe.reason, "seconds": probe.seconds}
        tmp.write_text(json.dumps(record))
        os.replace(tmp, fname)
