"""`ivshmem-broker doctor`: what this host has and lacks for brokers and their guests.

Each check returns one `Finding`: ``ok``, ``info`` (worth knowing, nothing wrong), ``warn``
(works, but something will bite) or ``fail`` (something the broker or its guests need is
missing), with the fix as a command or a setting where there is one. Nothing is changed.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable
from typing import Any

from host_broker.access import SocketDirError, blocked_parent, check_socket_dir, group_name
from ivshmem_comm.region import SHM_DIR

QEMU_CONF = "/etc/libvirt/qemu.conf"
SHM_WARN_BYTES = 256 << 20  # docker's default /dev/shm is 64 MiB
MIN_QEMU = (2, 6)  # ivshmem-doorbell and ivshmem-plain appeared in QEMU 2.6


@dataclasses.dataclass
class Finding:
    """The outcome of one check."""

    check: str
    status: str  # "ok", "info", "warn" or "fail"
    detail: str
    fix: str | None = None


def _run(argv: list[str]) -> str:
    """stdout+stderr of `argv`; OSError or subprocess errors propagate."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, check=True, stdin=subprocess.DEVNULL
    )
    return done.stdout + done.stderr


def check_qemu(binary: str) -> Finding:
    """QEMU is there, runs, is recent enough and has the ivshmem-doorbell device."""
    path = shutil.which(binary)
    install = "apt-get install qemu-system-x86 (or point --qemu at your QEMU)"
    if path is None:
        return Finding("qemu", "fail", f"{binary} not found in PATH", install)
    try:
        version_text = _run([path, "--version"])
        devices = _run([path, "-nodefaults", "-machine", "none", "-device", "help"])
    except (OSError, subprocess.SubprocessError) as exc:
        return Finding("qemu", "fail", f"{path} does not run: {exc}", install)
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", version_text)
    version = tuple(int(x) for x in match.groups(default="0")) if match else None
    shown = ".".join(map(str, version)) if version else "of unknown version"
    if version is not None and version[:2] < MIN_QEMU:
        return Finding(
            "qemu", "fail", f"QEMU {shown} at {path} predates ivshmem-doorbell (2.6)", install
        )
    missing = [d for d in ("ivshmem-doorbell", "ivshmem-plain") if f'"{d}"' not in devices]
    if missing:
        return Finding(
            "qemu",
            "fail",
            f"QEMU {shown} at {path} has no {' or '.join(missing)} device",
            "use a QEMU built with CONFIG_IVSHMEM_DEVICE (Debian's qemu-system-x86 is)",
        )
    return Finding("qemu", "ok", f"QEMU {shown} at {path}: ivshmem-doorbell and ivshmem-plain")


def check_kvm() -> Finding:
    """/dev/kvm: guests under KVM, or under TCG (slow, but everything works)."""
    if not os.path.exists("/dev/kvm"):
        return Finding(
            "kvm",
            "info",
            "no /dev/kvm: guests run under TCG, many times slower",
            "enable virtualisation in the firmware and load kvm_intel or kvm_amd",
        )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Finding(
            "kvm", "warn", "/dev/kvm is not usable by this user", "add the user to group kvm"
        )
    return Finding("kvm", "ok", "/dev/kvm is usable")


def _mount_of(path: str) -> tuple[str, str] | None:
    """(fstype, options) of the mount at `path`, from /proc/mounts."""
    try:
        with open("/proc/mounts") as f:
            entries = [line.split() for line in f]
    except OSError:
        return None
    for fields in reversed(entries):  # the last mount over a path is the visible one
        if len(fields) >= 4 and fields[1] == path:
            return fields[2], fields[3]
    return None


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n < 10 << 30 else f"{n / (1 << 30):.1f} GiB"


def check_shm() -> Finding:
    """/dev/shm: a tmpfs, world-writable with the sticky bit, big enough for regions."""
    remount = f"mount -o remount,size=4G {SHM_DIR} (docker: --shm-size=4g)"
    mount = _mount_of(SHM_DIR)
    try:
        st = os.stat(SHM_DIR)
        vfs = os.statvfs(SHM_DIR)
    except OSError as exc:
        return Finding(
            "shm", "fail", f"{SHM_DIR}: {exc.strerror}", f"mount -t tmpfs tmpfs {SHM_DIR}"
        )
    total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    detail = f"{SHM_DIR}: {mount[0] if mount else 'not a mount'}, {_mib(total)}, {_mib(free)} free"
    if mount is None or mount[0] != "tmpfs":
        return Finding("shm", "warn", detail + ": regions belong on a tmpfs", remount)
    if stat.S_IMODE(st.st_mode) != 0o1777:
        return Finding(
            "shm",
            "warn",
            f"{detail}; mode {stat.S_IMODE(st.st_mode):04o}: only some users can create regions",
            f"chmod 1777 {SHM_DIR}",
        )
    if total < SHM_WARN_BYTES:
        return Finding("shm", "warn", f"{detail}: too small for most jobs", remount)
    return Finding("shm", "ok", detail)


def check_state_dir(state_dir: str, group: int | None) -> Finding:
    """The broker's socket directory: safe for its sockets, reachable by `group`."""
    with_group = f" for group {group_name(group)}" if group is not None else ""
    if not os.path.lexists(state_dir):
        parent = os.path.dirname(state_dir)
        if not os.access(parent if os.path.isdir(parent) else "/", os.W_OK):
            return Finding(
                "state-dir",
                "fail",
                f"{state_dir} does not exist and this user cannot create it",
                f"mkdir -m 0700 {state_dir}, or serve with --state-dir DIR",
            )
        return Finding(
            "state-dir", "ok", f"{state_dir} does not exist yet; serve creates it{with_group}"
        )
    try:
        check_socket_dir(state_dir, group)
    except SocketDirError as exc:
        if group is not None and stat.S_IMODE(os.lstat(state_dir).st_mode) & 0o077 == 0:
            return Finding(
                "state-dir",
                "ok",
                f"{state_dir} is private; serve --socket-group opens it to group "
                f"{group_name(group)}",
            )
        return Finding("state-dir", "fail", exc.problem, exc.fix)
    except OSError as exc:
        return Finding("state-dir", "fail", f"{state_dir}: {exc.strerror}")
    if group is not None:
        blocked = blocked_parent(state_dir, group)
        if blocked:
            return Finding(
                "state-dir",
                "fail",
                f"group {group_name(group)} cannot enter {blocked}, above {state_dir}",
                f"chmod o+x {blocked}, or keep sockets under /run",
            )
    stale = []
    for entry in sorted(os.listdir(state_dir)):
        path = os.path.join(state_dir, entry)
        if entry.endswith(".sock") and stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                stale.append(entry)
            finally:
                probe.close()
    mode = stat.S_IMODE(os.lstat(state_dir).st_mode)
    detail = f"{state_dir}: mode {mode:04o}{with_group}"
    if stale:
        return Finding(
            "state-dir",
            "warn",
            f"{detail}; nothing listens on {', '.join(stale)}",
            "restart their broker, or `ivshmem-broker destroy NAME`",
        )
    return Finding("state-dir", "ok", detail)


def libvirt_qemu_user() -> tuple[str, str] | None:
    """(user, group) libvirt's system QEMU runs as: qemu.conf's ``user``/``group`` when
    set, else the distribution's built-in default (``libvirt-qemu`` on Debian and Ubuntu,
    ``qemu`` elsewhere, root if neither exists). None without libvirt."""
    try:
        with open(QEMU_CONF) as f:
            text = f.read()
    except OSError:
        return None
    settings: dict[str, str] = dict(
        re.findall(r'^\s*(user|group)\s*=\s*"([^"]*)"', text, re.MULTILINE)
    )
    default = next((u for u in ("libvirt-qemu", "qemu") if _exists(pwd.getpwnam, u)), "root")
    user = settings.get("user", default)
    return user, settings.get("group", user if _exists(grp.getgrnam, user) else "root")


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    """True iff `lookup` (pwd.getpwnam or grp.getgrnam) knows `name`."""
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def check_libvirt(state_dir: str, group: int | None) -> Finding:
    """Whether QEMU started by libvirt (stock qemu.conf) can reach the broker's sockets."""
    who = libvirt_qemu_user()
    if who is None:
        return Finding("libvirt", "info", f"no {QEMU_CONF}: libvirt is not installed")
    user, qemu_group = who
    if user in ("root", "+0"):
        return Finding("libvirt", "ok", "libvirt runs QEMU as root: it reaches any socket")
    fix = f"serve with --socket-group {qemu_group}"
    try:
        entry = pwd.getpwnam(user)
        gids = set(os.getgrouplist(user, grp.getgrnam(qemu_group).gr_gid))
    except KeyError:
        return Finding(
            "libvirt", "warn", f"{QEMU_CONF} names unknown user/group {user}:{qemu_group}"
        )
    try:
        st = os.lstat(state_dir)
        reach = st.st_uid == entry.pw_uid or (st.st_gid in gids and st.st_mode & 0o010)
    except OSError:  # not there yet: what serve will make of it
        reach = group is not None and group in gids
    if not reach:  # a warning: the broker works, only guests of libvirt cannot join
        return Finding(
            "libvirt",
            "warn",
            f"libvirt runs QEMU as {user}:{qemu_group}, which cannot reach the sockets in "
            f"{state_dir}",
            fix,
        )
    return Finding("libvirt", "ok", f"libvirt runs QEMU as {user}:{qemu_group}: it can connect")


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


def check_hugepages() -> Finding:
    """Which pages regions get: tmpfs pages (4 KiB), or transparent huge pages of /dev/shm."""
    mount = _mount_of(SHM_DIR)
    huge = "never"
    if mount:
        for option in mount[1].split(","):
            if option.startswith("huge="):
                huge = option.removeprefix("huge=")
    meminfo = _meminfo()
    reserved = (
        f"; hugetlbfs: {meminfo.get('HugePages_Total', 0)} pages of "
        f"{meminfo.get('Hugepagesize', 0)} KiB (not used by regions)"
    )
    if huge in ("always", "within_size"):
        return Finding("hugepages", "ok", f"{SHM_DIR} gives regions huge pages (huge={huge})")
    return Finding(
        "hugepages",
        "info",
        f"regions in {SHM_DIR} use 4 KiB pages (huge={huge}){reserved}",
        f"for large regions: mount -o remount,huge=within_size {SHM_DIR}",
    )


def run_checks(qemu: str, state_dir: str, group: int | None) -> list[Finding]:
    """Every check, in the order `format_findings` prints them."""
    return [
        check_qemu(qemu),
        check_kvm(),
        check_shm(),
        check_state_dir(state_dir, group),
        check_libvirt(state_dir, group),
        check_hugepages(),
    ]


def format_findings(findings: list[Finding]) -> list[str]:
    """One line per finding (``status check detail``), plus a ``fix:`` line under each that
    is not ok, and a closing verdict."""
    lines = []
    for f in findings:
        lines.append(f"{f.status:5s} {f.check:10s} {f.detail}")
        if f.fix and f.status != "ok":
            lines.append(f"{'':16s} fix: {f.fix}")
    failed = [f.check for f in findings if f.status == "fail"]
    warned = [f.check for f in findings if f.status == "warn"]
    if failed:
        lines.append(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    elif warned:
        lines.append(f"nothing failed; warnings: {', '.join(warned)}")
    else:
        lines.append("nothing failed")
    return lines


def to_json(findings: list[Finding]) -> dict[str, Any]:
    """``{"ok": no check failed, "checks": [Finding fields, ...]}``."""
    return {
        "ok": not any(f.status == "fail" for f in findings),
        "checks": [dataclasses.asdict(f) for f in findings],
    }
