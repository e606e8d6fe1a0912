"""VM lab: boot throw-away QEMU guests that run a command in the host's own file system.

Each guest boots the host's Debian kernel (``/boot/vmlinuz-<ver>``) with a tiny initramfs
built here on the fly (busybox-static, the kernel's virtio-pci / 9p / uio modules and the
project's ``uio_ivshmem`` driver). Its ``/init`` mounts the host root read-only over 9p,
chroots into it and runs the command in the caller's working directory with the caller's
environment plus ``IVSHMEM_LAB_GUEST=<index>`` and ``IVSHMEM_LAB_VMS=<count>``, then powers
off. No disk image, and no network unless a guest is given a
:class:`~ivshmem_lab.net.GuestNetwork` (``network=``): then it has ``host0`` (slirp, the
host's loopback as 10.0.2.2) and ``lan0`` (a LAN between the lab's guests only), its
``/etc/hosts`` names the guests ``vm0``.. and the host ``lab-host`` (see
:mod:`ivshmem_lab.net`). Inside the guest ``/tmp``, ``/run``, ``/dev/shm`` are fresh
tmpfs; of the host's ``/tmp`` only the top folder of the working directory is visible.

Guests get ivshmem devices: :class:`ShmDevice` (``ivshmem-plain`` over a ``/dev/shm`` file)
or :class:`DoorbellDevice` (``ivshmem-doorbell`` connected to a broker's UNIX socket).

Typical use::

    lab = Lab()                                   # accel="auto": KVM if it works, else TCG
    results = lab.run(["python3", "-c", "print(1)"], vms=2, devices=[ShmDevice("r0", 1 << 20)])
    with lab.guest(0, "sleep 100") as g:          # started; killed and cleaned up at exit
        g.wait_for_line("ready", timeout=60)
        g.kill()                                  # hard power-off

Nothing is left behind: every QEMU runs in its own process group and is killed (SIGKILL) on
timeout, on :meth:`Guest.close` and at interpreter exit; per-guest temporary directories are
removed. Built artefacts are cached in ``$XDG_CACHE_HOME/ivshmem_comm/lab`` (default
``~/.cache/ivshmem_comm/lab``; override with ``IVSHMEM_LAB_CACHE``).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import lzma
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ivshmem_lab.net import GuestNetwork, hosts_file, qemu_net_args

__all__ = [
    "DoorbellDevice",
    "Guest",
    "GuestResult",
    "Initramfs",
    "KernelInfo",
    "KvmProbe",
    "Lab",
    "LabError",
    "LabUnavailable",
    "ShmDevice",
    "build_initramfs",
    "cache_dir",
    "find_kernel",
    "find_qemu",
    "lab_available",
    "parse_device",
]

Accel = Literal["auto", "kvm", "tcg"]
Command = str | Sequence[str]

#: Bumped whenever the initramfs layout or the /init protocol changes (part of the cache key).
INITRAMFS_FORMAT = 2
#: Kernel modules the guest needs (with their modules.dep dependencies), in load order.
#: virtio_net is always there (loading it costs nothing without a NIC) for networked guests.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "uio", "virtio_net")
HOSTROOT_TAG = "hostroot"
CTL_TAG = "labctl"

_REPO_ROOT = Path(__file__).resolve().parent.parent
_INIT_SCRIPT = Path(__file__).resolve().parent / "initramfs" / "init.sh"
_KMOD_DIR = _REPO_ROOT / "guest_lib" / "kmod"
_KMOD_SOURCES = ("uio_ivshmem.c", "Kbuild", "Makefile")


class LabError(RuntimeError):
    """The lab could not do what was asked (bad argument, QEMU failed to start, ...)."""


class LabUnavailable(LabError):
    """QEMU, a kernel image or busybox-static is missing on this host."""


# --------------------------------------------------------------------------------------------
# Host discovery


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


def _find_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.is_file() and _is_static_elf(p):
            return p
    raise LabUnavailable("no statically linked busybox found; install busybox-static")


def _is_static_elf(path: Path) -> bool:
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
        _find_busybox()
    except LabUnavailable as e:
        return False, str(e)
    return True, ""


def _qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


# --------------------------------------------------------------------------------------------
# Devices


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise ValueError(f"bad size {text!r} (expected e.g. 4096, 64K, 16M, 1G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * mult


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
        """Size for QEMU: the file's size if it exists, else ``size``.

        Raises :class:`LabError` if neither is known or the size is not a power of two.
        """
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if not size:
            if self.size is None:
                raise LabError(f"{self.path} does not exist and no size was given")
            size = _parse_size(self.size)
        if size < 4096 or size & (size - 1):
            raise LabError(f"ivshmem size {size} of {self.path} is not a power of two >= 4096")
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


def parse_device(spec: ShmDevice | DoorbellDevice | str) -> ShmDevice | DoorbellDevice:
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
    return ShmDevice(name, _parse_size(size) if size else None)


def _device_args(devices: Sequence[ShmDevice | DoorbellDevice]) -> list[str]:
    args: list[str] = []
    for i, dev in enumerate(devices):
        if isinstance(dev, ShmDevice):
            size = dev.resolved_size()
            args += [
                "-object",
                f"memory-backend-file,id=ivm{i},size={size},share=on,mem-path={dev.path}",
                "-device",
                f"ivshmem-plain,memdev=ivm{i}",
            ]
        elif isinstance(dev, DoorbellDevice):
            if "," in dev.socket:
                raise LabError(f"socket path {dev.socket!r} contains a comma")
            if not 1 <= dev.vectors <= 64:
                raise LabError(f"vectors={dev.vectors}: expected 1..64")
            opts = f"ivshmem-doorbell,chardev=ivc{i},vectors={dev.vectors}"
            opts += f",ioeventfd={'on' if dev.ioeventfd else 'off'}"
            args += ["-chardev", f"socket,path={dev.socket},id=ivc{i}", "-device", opts]
        else:
            raise LabError(f"not a device: {dev!r}")
    return args


# --------------------------------------------------------------------------------------------
# Initramfs


class _Cpio:
    """A minimal writer of the ``newc`` cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
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


def _module_load_order(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """Resolve ``wanted`` module names through modules.dep: dependencies first, no repeats.

    Built-in modules (modules.builtin) are skipped; a name that is neither raises LabError.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[_modname(mod)] = mod
    builtin: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        builtin = {_modname(x) for x in (moddir / "modules.builtin").read_text().split()}
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


def _modname(relpath: str) -> str:
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


def _build_uio_module(kernel: KernelInfo, cache: Path) -> tuple[Path | None, str]:
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
    busybox = _find_busybox()
    with open(cache / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        ko, log = _build_uio_module(kernel, cache) if with_uio else (None, "not requested")
        modules = _module_load_order(kernel.moddir, GUEST_MODULES)
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
        c = _Cpio()
        for d in ("bin", "dev", "proc", "sys", "mnt", "ctl", "tmp", "lib", "lib/lab-modules"):
            c.dir(d)
        c.chardev("dev/console", 5, 1)
        c.chardev("dev/null", 1, 3)
        c.file("bin/busybox", bb, 0o755)
        c.symlink("bin/sh", "busybox")
        c.file("init", init, 0o755)
        names = []
        for i, (m, data) in enumerate(mod_data):
            name = f"{i:02d}-{_modname(m.name)}.ko"
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


# --------------------------------------------------------------------------------------------
# Guests

_BEGIN = "IVSHMEM-LAB-BEGIN"
_EXIT = "IVSHMEM-LAB-EXIT"
_FAIL = "IVSHMEM-LAB-FAIL"
_LIVE: weakref.WeakSet[Guest] = weakref.WeakSet()
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _sweep_stale_tmpdirs() -> None:
    """Remove guest temp dirs left by a lab process that died without cleaning up
    (SIGKILL: its QEMUs died with it through PDEATHSIG). Only dirs of this user."""
    for d in Path(tempfile.gettempdir()).glob("ivshmem-lab-vm*-*"):
        with contextlib.suppress(OSError, ValueError):
            if d.stat().st_uid != os.getuid():
                continue
            pid = int((d / ".owner").read_text().split()[0])
            if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(d, ignore_errors=True)


def _kill_all_live() -> None:
    for g in list(_LIVE):
        with contextlib.suppress(Exception):
            g.close()


atexit.register(_kill_all_live)


@dataclass(frozen=True)
class GuestResult:
    """What one guest did.

    ``returncode``: the command's exit status inside the guest, or None if it did not finish
    (``timed_out``, ``killed``, the guest crashed, or setup failed: then ``error`` says why).
    ``output``: the command's stdout+stderr (console lines between the lab's markers, CR
    stripped). ``console``: the whole serial console. ``boot_seconds``: from QEMU's start to
    the command's start (None if it never started). ``accel``: "kvm" or "tcg".
    """

    index: int
    returncode: int | None
    output: str
    boot_seconds: float | None
    accel: str
    console: str = ""
    wall_seconds: float = 0.0
    timed_out: bool = False
    killed: bool = False
    error: str | None = None
    qemu_stderr: str = ""

    @property
    def ok(self) -> bool:
        """True when the command ran and exited 0."""
        return self.returncode == 0


def _command_script(
    command: Command, cwd: str, env: Mapping[str, str], index: int, vms: int
) -> str:
    if isinstance(command, str):
        argv = ["/bin/sh", "-c", command]
    else:
        argv = [str(a) for a in command]
        if not argv:
            raise LabError("empty command")
    lines = [
        "# written by ivshmem_lab.lab; run by /bin/sh of the host root inside the guest",
        f"cd -- {shlex.quote(cwd)} 2>/dev/null || {{",
        f"  echo 'ivshmem-lab: working directory {shlex.quote(cwd)} is not visible in the"
        " guest' >&2",
        "  exit 125",
        "}",
    ]
    full = dict(env)
    full["IVSHMEM_LAB_GUEST"] = str(index)
    full["IVSHMEM_LAB_VMS"] = str(vms)
    full["PWD"] = cwd
    for k, v in full.items():
        if _ENV_NAME.match(k) and "\0" not in v:
            lines.append(f"export {k}={shlex.quote(v)}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


class Guest:
    """One QEMU guest running one command. Use :meth:`Lab.guest` to make one.

    Lifecycle: :meth:`start` boots it (returns at once); :meth:`wait` waits for it to power
    off and returns a :class:`GuestResult`; :meth:`kill` powers it off hard at any time
    (SIGKILL to QEMU, what a host crash looks like to its peers); :meth:`close` kills it if
    still running and frees everything (idempotent). As a context manager it starts on
    entry (if not started) and closes on exit.
    """

    def __init__(
        self,
        lab: Lab,
        index: int,
        command: Command,
        *,
        devices: Sequence[ShmDevice | DoorbellDevice | str] = (),
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        vms: int = 1,
        accel: str | None = None,
        on_output: Callable[[int, str], None] | None = None,
        extra_qemu_args: Sequence[str] = (),
        network: GuestNetwork | None = None,
    ) -> None:
        self.lab = lab
        self.index = index
        self.command = command
        self.devices = [parse_device(d) for d in devices]
        self.cwd = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
        base = dict(os.environ) if inherit_env else {"PATH": "/usr/local/bin:/usr/bin:/bin"}
        base.update(env or {})
        self.env = base
        self.vms = vms
        self.accel = accel or lab.accel_in_use()
        self.on_output = on_output
        self.extra_qemu_args = list(extra_qemu_args)
        self.network = network
        self._nonce = secrets.token_hex(8)
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: str | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Condition()
        self._console: list[str] = []
        self._output: list[str] = []
        self._stderr: list[str] = []
        self._state = "new"  # new -> boot -> run -> done
        self._rc: int | None = None
        self._error: str | None = None
        self._t0 = 0.0
        self._t_begin: float | None = None
        self._t_end: float | None = None
        self._killed = False
        self._timed_out = False
        self._closed = False
        self._result: GuestResult | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the QEMU process (None before start)."""
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        """True while QEMU runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def output(self) -> str:
        """The command's output so far (complete lines)."""
        with self._lock:
            return "".join(line + "\n" for line in self._output)

    @property
    def console(self) -> str:
        """The serial console so far."""
        with self._lock:
            return "".join(line + "\n" for line in self._console)

    @property
    def control_dir(self) -> str | None:
        """Host path of the guest's control directory (``/run/ivshmem-lab`` in the guest):
        files put there before or during the run are visible to the guest, and its files
        to the host. None before start and after close."""
        return self._tmp

    def qemu_argv(self) -> list[str]:
        """The QEMU command line this guest uses (valid after :meth:`start`)."""
        return list(self._argv)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Guest:
        """Boot the guest (returns without waiting). Raises LabError if already started."""
        if self._proc is not None or self._closed:
            raise LabError("guest already started")
        lab = self.lab
        initrd = lab.initramfs()
        _sweep_stale_tmpdirs()
        self._tmp = tempfile.mkdtemp(prefix=f"ivshmem-lab-vm{self.index}-")
        try:
            ctl = Path(self._tmp)
            os.chmod(ctl, 0o700)
            (ctl / ".owner").write_text(f"{os.getpid()}\n")
            (ctl / "cmd.sh").write_text(
                _command_script(self.command, self.cwd, self.env, self.index, self.vms)
            )
            (ctl / "rootopts").write_text(lab.root_mount_options + "\n")
            (ctl / "cwd").write_text(self.cwd + "\n")  # /init keeps it visible under /tmp
            if self.network is not None:
                (ctl / "net").write_text(self.network.config_lines())
                (ctl / "hosts").write_text(hosts_file(self.network.vms))
            self._argv = lab._qemu_argv(self, initrd.path, ctl)
            argv = self._argv
            setpriv = shutil.which("setpriv")
            if setpriv and threading.current_thread() is threading.main_thread():
                # QEMU dies with us even if we are SIGKILLed (PDEATHSIG is per thread, hence
                # only when started from the main thread).
                argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
            self._t0 = time.monotonic()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except BaseException:
            self._cleanup_tmp()
            raise
        self._state = "boot"
        _LIVE.add(self)
        for stream, fn in ((self._proc.stdout, self._read_console), (self._proc.stderr, None)):
            t = threading.Thread(
                target=self._reader, args=(stream, fn), daemon=True, name=f"lab-vm{self.index}"
            )
            t.start()
            self._threads.append(t)
        return self

    def _reader(self, stream: io.BufferedReader, on_line: Callable[[str], None] | None) -> None:
        pending = b""
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                text = raw.decode(errors="replace").replace("\r", "")
                if on_line:
                    on_line(text)
                else:
                    with self._lock:
                        self._stderr.append(text)
        if pending:
            text = pending.decode(errors="replace").replace("\r", "")
            if on_line:
                on_line(text)
            else:
                with self._lock:
                    self._stderr.append(text)
        with self._lock:
            self._lock.notify_all()

    def _read_console(self, line: str) -> None:
        emit = None
        with self._lock:
            self._console.append(line)
            if self._state == "boot":
                if line.endswith(f"{_BEGIN} {self._nonce}"):
                    self._state = "run"
                    self._t_begin = time.monotonic()
                elif f"{_FAIL} {self._nonce} " in line:
                    self._state = "done"
                    self._error = line.split(f"{_FAIL} {self._nonce} ", 1)[1]
            elif self._state == "run":
                m = re.search(rf"{_EXIT} {self._nonce} (\d+)$", line)
                if m:
                    self._state = "done"
                    self._rc = int(m.group(1))
                    self._t_end = time.monotonic()
                    line = line[: m.start()]
                    if line:
                        self._output.append(line)
                        emit = line
                else:
                    self._output.append(line)
                    emit = line
            self._lock.notify_all()
        if emit is not None and self.on_output:
            try:
                self.on_output(self.index, emit)
            except Exception as e:  # a broken callback must not stall the console reader
                self.on_output = None
                with self._lock:
                    self._stderr.append(f"ivshmem-lab: on_output callback failed: {e!r}")

    def wait_booted(self, timeout: float | None = None) -> float:
        """Block until the command starts; returns the boot time in seconds.

        Raises TimeoutError after ``timeout`` s, LabError if the guest ended without
        starting the command.
        """
        self._wait_for(lambda: self._state != "boot", timeout, "boot")
        if self._t_begin is None:
            raise LabError(f"vm{self.index} did not start the command: {self._why()}")
        return self._t_begin - self._t0

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float | None = None) -> str:
        """Block until an output line matches ``pattern`` (``re.search``); return that line.

        Raises TimeoutError after ``timeout`` s, LabError if the command ends (or the guest
        dies) first without such a line.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0
        found: list[str] = []

        def check() -> bool:
            nonlocal seen
            for line in self._output[seen:]:
                seen += 1
                if rx.search(line):
                    found.append(line)
                    return True
            return self._state == "done" or not self._alive()

        self._wait_for(check, timeout, f"a line matching {rx.pattern!r}")
        if not found:
            raise LabError(f"vm{self.index} ended without printing {rx.pattern!r}: {self._why()}")
        return found[0]

    def _alive(self) -> bool:
        # The console reader ends at EOF, i.e. once QEMU has exited and its output is drained.
        return bool(self._threads) and self._threads[0].is_alive()

    def _why(self) -> str:
        if self._error:
            return self._error
        if self._killed:
            return "killed"
        tail = "\n".join((self._stderr + self._console)[-15:])
        return f"QEMU exited ({self._proc.returncode if self._proc else '?'}); last lines:\n{tail}"

    def _wait_for(self, pred: Callable[[], bool], timeout: float | None, what: str) -> None:
        if self._proc is None:
            raise LabError("guest not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not pred():
                if not self._alive() and not pred():
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"vm{self.index}: no {what} within {timeout} s")
                self._lock.wait(0.2 if left is None else min(left, 0.2))

    def kill(self) -> None:
        """Power the guest off hard: SIGKILL to QEMU's process group. No-op if not running."""
        if self._proc is not None and self._proc.poll() is None:
            self._killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait until the guest powers off and return its result; frees its resources.

        After ``timeout`` seconds the guest is killed and the result has ``timed_out=True``
        and ``returncode=None``. Calling it again returns the same result.
        """
        if self._result is not None:
            return self._result
        if self._proc is None:
            raise LabError("guest not started")
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._timed_out = True
            self.kill()
        self.close()
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Kill QEMU if it still runs, reap it, join the readers, remove the temp dir."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc is not None:
                if self._proc.poll() is None:
                    self.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(10)
                # Anything left in the group (there should be nothing) goes too.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                for t in self._threads:
                    t.join(5)
                for s in (self._proc.stdout, self._proc.stderr):
                    if s:
                        s.close()
                self._result = self._make_result()
        finally:
            self._cleanup_tmp()
            _LIVE.discard(self)

    def _make_result(self) -> GuestResult:
        rc = self._rc
        if rc is None and self._tmp and not self._killed and not self._timed_out:
            with contextlib.suppress(OSError, ValueError):
                rc = int(Path(self._tmp, "rc").read_text().strip())
        error = self._error
        if rc is None and error is None:
            if self._timed_out:
                error = "timed out"
            elif self._killed:
                error = "killed"
            else:
                error = self._why()
        end = self._t_end or time.monotonic()
        with self._lock:
            return GuestResult(
                index=self.index,
                returncode=rc,
                output="".join(line + "\n" for line in self._output),
                boot_seconds=None if self._t_begin is None else self._t_begin - self._t0,
                accel=self.accel,
                console="".join(line + "\n" for line in self._console),
                wall_seconds=end - self._t0,
                timed_out=self._timed_out,
                killed=self._killed and not self._timed_out,
                error=error,
                qemu_stderr="".join(line + "\n" for line in self._stderr),
            )

    def _cleanup_tmp(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Guest:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self._closed:
                self.close()


# --------------------------------------------------------------------------------------------
# KVM probe and the Lab


@dataclass(frozen=True)
class KvmProbe:
    """Verdict of booting a trivial guest under KVM: ``ok``, a ``reason`` and ``seconds``."""

    ok: bool
    reason: str
    seconds: float
    cached: bool = False


class Lab:
    """Boots guests. Cheap to create; builds the initramfs and probes KVM lazily.

    ``accel``: "auto" (KVM if a probe boot under KVM succeeds within ``kvm_probe_timeout``
    seconds, verdict cached per host kernel / QEMU / guest kernel; else TCG), "kvm" or "tcg".
    ``$IVSHMEM_LAB_ACCEL`` overrides "auto". ``memory``: guest RAM (QEMU syntax, "512M").
    ``root_cache``: 9p cache mode of the host root ("loose" is fast; "none" sees host changes
    at once). Raises :class:`LabUnavailable` at once if QEMU or the kernel is missing.
    """

    def __init__(
        self,
        accel: Accel = "auto",
        memory: str = "512M",
        *,
        kernel: str | None = None,
        machine: str = "q35",
        smp: int = 1,
        root_cache: str = "loose",
        kvm_probe_timeout: float = 20.0,
        with_uio: bool = True,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
        qemu = find_qemu()
        if qemu is None:
            raise LabUnavailable("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
        self.qemu = qemu
        self.kernel = find_kernel(kernel)
        self.accel = accel
        self.memory = memory
        self.machine = machine
        self.smp = smp
        self.root_cache = root_cache
        self.kvm_probe_timeout = kvm_probe_timeout
        self.with_uio = with_uio
        self.cache = Path(cache) if cache else cache_dir()
        self._initramfs: Initramfs | None = None
        self._accel_resolved: str | None = None
        self._probe: KvmProbe | None = None
        self._lock = threading.RLock()

    @property
    def root_mount_options(self) -> str:
        """Mount options of the host root in the guest."""
        opts = "trans=virtio,version=9p2000.L,ro,msize=262144"
        return opts + (f",cache={self.root_cache}" if self.root_cache != "none" else "")

    def initramfs(self, rebuild: bool = False) -> Initramfs:
        """The guest initramfs (built on first use; see :func:`build_initramfs`)."""
        with self._lock:
            if self._initramfs is None or rebuild:
                self._initramfs = build_initramfs(
                    self.kernel, with_uio=self.with_uio, rebuild=rebuild, cache=self.cache
                )
            return self._initramfs

    def probe_kvm(self, force: bool = False) -> KvmProbe:
        """Boot a guest under KVM running ``true``; ok if it exits 0 within the timeout.

        The verdict is cached on disk (unless ``force``). Never raises for a KVM failure.
        """
        if self._probe is not None and not force:
            return self._probe
        key = {
            "host": platform.release(),
            "qemu": _qemu_version(self.qemu),
            "guest": self.kernel.version,
        }
        fname = self.cache / "kvm-probe.json"
        if not force:
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(fname.read_text())
                if data["key"] == key:
                    self._probe = KvmProbe(data["ok"], data["reason"], data["seconds"], True)
                    return self._probe
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            probe = KvmProbe(False, "/dev/kvm missing or not accessible", 0.0)
        else:
            g = Guest(self, 0, "true", accel="kvm", cwd="/", inherit_env=False)
            t0 = time.monotonic()
            try:
                g.start()
                res = g.wait(self.kvm_probe_timeout)
            finally:
                g.close()
            secs = time.monotonic() - t0
            if res.returncode == 0:
                probe = KvmProbe(True, f"KVM guest booted in {res.boot_seconds:.1f} s", secs)
            elif res.timed_out:
                probe = KvmProbe(
                    False, f"KVM guest did not finish within {self.kvm_probe_timeout} s", secs
                )
            else:
                why = (res.error or "").strip().splitlines()
                probe = KvmProbe(False, f"KVM guest failed: {why[-1] if why else '?'}", secs)
        self._probe = probe
        with contextlib.suppress(OSError):
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = fname.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(
                json.dumps(
                    {"key": key, "ok": probe.ok, "reason": probe.reason, "seconds": probe.seconds}
                )
            )
            os.replace(tmp, fname)
        return probe

    def accel_in_use(self) -> str:
        """The accelerator guests get: "kvm" or "tcg" (probes KVM once under "auto")."""
        with self._lock:
            return self._resolve_accel()

    def _resolve_accel(self) -> str:
        if self._accel_resolved is None:
            want = self.accel
            if want == "auto":
                env = os.environ.get("IVSHMEM_LAB_ACCEL", "auto")
                want = env if env in ("kvm", "tcg") else "auto"
            if want == "auto":
                want = "kvm" if self.probe_kvm().ok else "tcg"
            self._accel_resolved = want
        return self._accel_resolved

    def _qemu_argv(self, guest: Guest, initrd: Path, ctl: Path) -> list[str]:
        if guest.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        append = (
            "console=ttyS0 quiet loglevel=3 panic=-1 8250.nr_uarts=1 mitigations=off"
            f" ivshmem_lab.guest={guest.index} ivshmem_lab.nonce={guest._nonce}"
        )
        if "," in str(ctl):
            raise LabError(f"temporary directory {ctl} contains a comma")
        net: list[str] = []
        if guest.network is not None:
            net = qemu_net_args(guest.network)
        return [
            self.qemu,
            "-machine", self.machine,
            *accel,
            "-m", self.memory,
            "-smp", str(self.smp),
            "-kernel", str(self.kernel.image),
            "-initrd", str(initrd),
            "-append", append,
            "-nographic", "-nodefaults", "-no-reboot",
            "-serial", "stdio",
            "-virtfs",
            f"local,path=/,mount_tag={HOSTROOT_TAG},security_model=none,readonly=on,"
            "multidevs=remap",
            "-virtfs", f"local,path={ctl},mount_tag={CTL_TAG},security_model=none",
            *_device_args(guest.devices),
            *net,
            *guest.extra_qemu_args,
        ]  # fmt: skip

    def guest(
        self,
        index: int,
        command: Command,
        *,
        devices: Sequence[ShmDevice | DoorbellDevice | str] = (),
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        vms: int = 1,
        on_output: Callable[[int, str], None] | None = None,
        extra_qemu_args: Sequence[str] = (),
        network: GuestNetwork | None = None,
    ) -> Guest:
        """A not yet started :class:`Guest` (``with lab.guest(...) as g:`` starts it).

        ``command``: a shell command line (str, run by ``/bin/sh -c``) or an argv list.
        ``cwd`` defaults to the caller's cwd; the environment is the caller's (unless
        ``inherit_env=False``) updated with ``env``, plus ``IVSHMEM_LAB_GUEST=index`` and
        ``IVSHMEM_LAB_VMS=vms``. ``on_output(index, line)`` is called from a reader thread
        for each output line. ``network``: the guest's NICs (see :mod:`ivshmem_lab.net`).
        """
        return Guest(
            self,
            index,
            command,
            devices=devices,
            cwd=cwd,
            env=env,
            inherit_env=inherit_env,
            vms=vms,
            on_output=on_output,
            extra_qemu_args=extra_qemu_args,
            network=network,
        )

    def run_many(
        self,
        commands: Sequence[Command],
        *,
        devices: Sequence[ShmDevice | DoorbellDevice | str] = (),
        guest_devices: Sequence[Sequence[ShmDevice | DoorbellDevice | str]] | None = None,
        timeout: float | None = 300.0,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        on_output: Callable[[int, str], None] | None = None,
    ) -> list[GuestResult]:
        """Run ``commands[i]`` in guest i, all guests in parallel; results in index order.

        ``devices`` go to every guest; ``guest_devices[i]`` (if given) replaces them for
        guest i. ``timeout`` bounds each guest's whole life (boot included): a guest still
        running then is killed (``timed_out=True``). A guest that fails never raises: look
        at ``returncode`` / ``error``. Raises LabError/LabUnavailable only if the lab itself
        cannot start guests; every started guest is killed and cleaned up before returning
        or raising.
        """
        n = len(commands)
        if guest_devices is not None and len(guest_devices) != n:
            raise ValueError(f"guest_devices has {len(guest_devices)} entries for {n} guests")
        self.initramfs()
        self.accel_in_use()
        guests = [
            self.guest(
                i,
                cmd,
                devices=guest_devices[i] if guest_devices is not None else devices,
                cwd=cwd,
                env=env,
                inherit_env=inherit_env,
                vms=n,
                on_output=on_output,
            )
            for i, cmd in enumerate(commands)
        ]
        try:
            for g in guests:
                g.start()
            deadline = None if timeout is None else time.monotonic() + timeout
            results = []
            for g in guests:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                results.append(g.wait(left))
            return results
        finally:
            for g in guests:
                g.close()

    def run(
        self,
        command: Command,
        *,
        vms: int = 1,
        devices: Sequence[ShmDevice | DoorbellDevice | str] = (),
        guest_devices: Sequence[Sequence[ShmDevice | DoorbellDevice | str]] | None = None,
        timeout: float | None = 300.0,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        on_output: Callable[[int, str], None] | None = None,
    ) -> list[GuestResult]:
        """Run the same ``command`` in ``vms`` guests in parallel (see :meth:`run_many`)."""
        if vms < 1:
            raise ValueError("vms must be >= 1")
        return self.run_many(
            [command] * vms,
            devices=devices,
            guest_devices=guest_devices,
            timeout=timeout,
            cwd=cwd,
            env=env,
            inherit_env=inherit_env,
            on_output=on_output,
        )
