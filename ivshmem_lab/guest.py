"""One guest: a QEMU process booting the lab's kernel and initramfs to run one command.

A :class:`Guest` (made by :meth:`ivshmem_lab.lab.Lab.guest`) writes the command, its
working directory and environment into a private control directory shared with the guest
over 9p, starts QEMU in its own process group (under ``setpriv --pdeathsig KILL`` when it
can, so QEMU dies with us), and reads the serial console: ``/init`` prints a nonce-tagged
begin marker, the command's output, and an exit marker with its status, which become a
:class:`GuestResult`. Every live guest is killed at interpreter exit; control directories
left by a lab process that died are swept by the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from guest_lib.launch import guard
from ivshmem_comm.hostos import pid_alive
from ivshmem_lab.devices import DeviceSpec, parse_device, qemu_device_args
from ivshmem_lab.errors import LabError
from ivshmem_lab.net import GuestNetwork, hosts_file, qemu_net_args

if TYPE_CHECKING:
    from ivshmem_lab.lab import Lab

__all__ = [
    "CTL_TAG",
    "HOSTROOT_TAG",
    "Command",
    "Guest",
    "GuestOptions",
    "GuestResult",
    "command_script",
]

#: A shell command line (run by ``/bin/sh -c``) or an argv list.
Command = str | Sequence[str]
#: 9p mount tags of the host root and of the guest's control directory (``/init`` uses them).
HOSTROOT_TAG = "hostroot"
CTL_TAG = "labctl"


class GuestOptions(TypedDict, total=False):
    """The options of a guest beyond its index and command (see :class:`Guest`)."""

    devices: Sequence[DeviceSpec]
    cwd: str | os.PathLike[str] | None
    env: Mapping[str, str] | None
    inherit_env: bool
    vms: int
    on_output: Callable[[int, str], None] | None
    extra_qemu_args: Sequence[str]
    network: GuestNetwork | None


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
            if pid != os.getpid() and not pid_alive(pid):
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


def command_script(command: Command, cwd: str, env: Mapping[str, str], index: int, vms: int) -> str:
    """The shell script the guest's ``/init`` runs (from the control directory): change to
    `cwd` (exit 125 with a message if the guest cannot see it), export `env` plus
    ``IVSHMEM_LAB_GUEST``/``IVSHMEM_LAB_VMS``/``PWD`` (names that are not shell identifiers,
    and values with NUL, are left out), then exec `command`. LabError for an empty argv."""
    if isinstance(command, str):
        argv = ["/bin/sh", "-c", command]
    else:
        argv = [str(a) for a in command]
        if not argv:
            raise LabError("empty command")
    lines = [
        "# written by ivshmem_lab.guest; run by /bin/sh of the host root inside the guest",
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
    lines.append("echo $$ > /run/ivshmem-lab/pid  # where /init sends signals (Guest.signal)")
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
        devices: Sequence[DeviceSpec] = (),
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
                command_script(self.command, self.cwd, self.env, self.index, self.vms)
            )
            (ctl / "rootopts").write_text(lab.root_mount_options + "\n")
            (ctl / "cwd").write_text(self.cwd + "\n")  # /init keeps it visible under /tmp
            if self.network is not None:
                (ctl / "net").write_text(self.network.config_lines())
                (ctl / "hosts").write_text(hosts_file(self.network.vms))
            self._argv = self._build_argv(initrd.path, ctl)
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
        guard(group=self._proc.pid, path=self._tmp)  # QEMU leads its group (new session)
        self._state = "boot"
        _LIVE.add(self)
        for stream, fn in ((self._proc.stdout, self._read_console), (self._proc.stderr, None)):
            t = threading.Thread(
                target=self._reader, args=(stream, fn), daemon=True, name=f"lab-vm{self.index}"
            )
            t.start()
            self._threads.append(t)
        return self

    def _build_argv(self, initrd: Path, ctl: Path) -> list[str]:
        """QEMU's command line for this guest: the lab's machine, this guest's devices."""
        lab = self.lab
        if self.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        # no_timer_check: the kernel's check that the IO-APIC timer ticks during a busy-wait
        # of 10 ticks panics a TCG guest whose vCPU thread the loaded host preempts ("IO-APIC +
        # timer doesn't work!", seen at load 30 on 2 cores); KVM guests skip it (kvmclock).
        append = (
            "console=ttyS0 quiet loglevel=3 panic=-1 8250.nr_uarts=1 mitigations=off"
            " no_timer_check"
            f" ivshmem_lab.guest={self.index} ivshmem_lab.nonce={self._nonce}"
        )
        if "," in str(ctl):
            raise LabError(f"temporary directory {ctl} contains a comma")
        net: list[str] = []
        if self.network is not None:
            net = qemu_net_args(self.network)
        return [
            lab.qemu,
            "-machine", lab.machine,
            *accel,
            "-m", lab.memory,
            "-smp", str(lab.smp),
            "-kernel", str(lab.boot_image()),
            "-initrd", str(initrd),
            "-append", append,
            "-nographic", "-nodefaults", "-no-reboot",
            "-serial", "stdio",
            "-virtfs",
            f"local,path=/,mount_tag={HOSTROOT_TAG},security_model=none,readonly=on,"
            "multidevs=remap",
            "-virtfs", f"local,path={ctl},mount_tag={CTL_TAG},security_model=none",
            *qemu_device_args(self.devices),
            *net,
            *self.extra_qemu_args,
        ]  # fmt: skip

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

    def signal(self, sig: int) -> None:
        """Send signal `sig` to the guest's command, as ``kill -SIG PID`` in the guest would:
        through the control directory, where ``/init``'s watcher looks every 0.2 s (a
        signal sent before the command started reaches it once it starts; a second signal
        before the first was delivered replaces it). No-op if the guest is not running."""
        if self._tmp is None or not self.running:
            return
        tmp = Path(self._tmp, "signal.tmp")
        tmp.write_text(f"{int(sig)}\n")
        os.replace(tmp, Path(self._tmp, "signal"))

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
