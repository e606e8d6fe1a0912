"""Starting a job's processes on this host: a broker for its region, clean environments, and
supervision of the ranks.

:class:`BrokerProcess` runs ``python -m host_broker serve`` for one region made for a job, as
a context manager: started and ready on entry (its socket listens), stopped and every trace
removed on exit. It is used by ``ivshmem-run --broker``, the VM lab, the demo and the tests.

Why here, in guest_lib: the broker's interface to others is its command line, its socket and
its record (:mod:`ivshmem_comm.records`); guest_lib holds the clients of the other two
(``host_client`` speaks the socket, ``attach`` reads records) and ``ivshmem-run``, the first
user of this one. It starts a subprocess and imports nothing of host_broker, so the rule "the
broker and guest_lib depend on the core only" holds; the lab and the examples, above both,
use it from here.

:func:`job_environ` is the environment of a process started for a job: the caller's, less
every variable that would point it at another job's region or rank (see ``SCRUB_VARS``).
:func:`supervise` waits for a job's ranks as mpiexec does (a failure stops the others after
a grace period; a timeout kills them all); :func:`signal_group` signals one rank's process
group; :func:`forward_signals` passes SIGTERM, SIGINT, SIGHUP and SIGQUIT on to the ranks (as
hydra does); :func:`die_with` makes a child die with the process that started it.
:class:`AbortChannel` is the pipe on which a rank reports MPI_Abort's errorcode to its
launcher (:func:`report_abort`), so that the job ends at once with that status, 0 included,
as under mpiexec.

:class:`OutputRelay` relays the ranks' output pipes to ours in whole lines (optionally each
line prefixed, e.g. with the rank: hydra's ``-prepend-rank``), so that two ranks printing at
once never mix within a line.

:class:`Guardian` is a process that outlives a launcher to clean up after it however the
launcher ends, SIGKILL included: the launcher (and what it starts: :class:`BrokerProcess`,
the lab's guests) tells it, through :func:`guard`, what there is to remove.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ivshmem_comm.hostos import ensure_private_dir
from ivshmem_comm.records import record_path
from ivshmem_comm.region import Region

__all__ = [
    "ABORT_FD_VAR",
    "FORWARDED_SIGNALS",
    "GRACE_S",
    "SCRUB_VARS",
    "AbortChannel",
    "BrokerProcess",
    "BrokerStartError",
    "Guardian",
    "OutputRelay",
    "die_with",
    "exit_status",
    "forward_signals",
    "guard",
    "job_environ",
    "rank_session",
    "report_abort",
    "signal_group",
    "supervise",
]

#: The signals a launcher passes on to its ranks, as MPICH's mpiexec (hydra) does.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MAX_PARTIAL_LINE = 1 << 20  # OutputRelay passes a longer line on in pieces of this size

#: Seconds the other ranks of a job may run on after one failed, before they are stopped.
GRACE_S = 2.0

#: The variable holding the fd (inherited from the launcher) on which a rank reports MPI_Abort.
ABORT_FD_VAR = "IVSHMEM_MPI_ABORT_FD"

#: Variables a job's process must not inherit from whoever started the job: where to attach
#: (guest_lib.attach, guest_lib.mpi.bootstrap) and which rank it is (ours, and those of the
#: MPI launchers the bootstrap recognises). Each launcher sets the ones its ranks need.
SCRUB_VARS = (
    "IVSHMEM_COMM_REGION",
    "IVSHMEM_COMM_SOCKET",
    "IVSHMEM_COMM_DEVICE",
    "IVSHMEM_COMM_GUEST",
    "IVSHMEM_MPI_RANK",
    "IVSHMEM_MPI_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "PMI_FD",
    "PMI_PORT",
    "OMPI_COMM_WORLD_RANK",
    "PMIX_RANK",
    ABORT_FD_VAR,
)


def job_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: os.environ) without the variables of SCRUB_VARS."""
    env = dict(os.environ if base is None else base)
    for var in SCRUB_VARS:
        env.pop(var, None)
    return env


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group `proc` leads (a rank started by
    :meth:`OutputRelay.start`: the rank and whatever it started). A group that is gone, or
    that this user may not signal, is left alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_status(code: int) -> int:
    """A Popen return code as a shell reports it: 128+N for a process killed by signal N."""
    return 128 - code if code < 0 else code


class AbortChannel:
    """A pipe on which the ranks of one job report MPI_Abort to their launcher.

    The launcher makes one per job, starts each rank with :attr:`write_fd` inherited
    (``pass_fds``) and :meth:`environ` in its environment, and passes :meth:`code` to
    :func:`supervise` as `aborted`. A rank's :func:`report_abort` writes its errorcode as one
    line (one write of a few bytes: atomic on a pipe) before the rank exits, so a launcher that
    has seen the rank's exit finds the line. The read end is non-blocking and never inherited.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._code: int | None = None

    def environ(self) -> dict[str, str]:
        """The variable a rank needs to find :attr:`write_fd`."""
        return {ABORT_FD_VAR: str(self.write_fd)}

    def code(self) -> int | None:
        """The errorcode of the first MPI_Abort reported (it stays), or None if none yet."""
        if self._code is None:
            try:
                data = os.read(self.read_fd, 4096)
            except BlockingIOError:
                return None
            first = data.split(b"\n", 1)[0]
            if first.lstrip(b"-").isdigit():
                self._code = int(first)
        return self._code

    def close(self) -> None:
        """Close both ends (after the ranks have exited)."""
        os.close(self.read_fd)
        os.close(self.write_fd)


def report_abort(errorcode: int) -> bool:
    """Tell this rank's launcher (through its :class:`AbortChannel`) that the job aborts with
    `errorcode`. Returns False, having done nothing, where the launcher gave no channel (not
    started by ivshmem-run, or the fd was closed)."""
    fd = os.environ.get(ABORT_FD_VAR, "")
    if not fd.isdigit():
        return False
    try:
        os.write(int(fd), b"%d\n" % errorcode)
    except OSError:
        return False
    return True


def supervise(
    procs: Sequence[subprocess.Popen[bytes]],
    timeout: float | None,
    *,
    grace: float = GRACE_S,
    who: str = "ivshmem-run",
    signalled: Sequence[int] = (),
    idle: Callable[[float], None] = time.sleep,
    aborted: Callable[[], int | None] = lambda: None,
) -> int:
    """Wait until every rank in `procs` (each leading its own process group) has exited;
    return the job's status: 0 if all exited 0, else the first failure's :func:`exit_status`.

    When `aborted()` (e.g. :meth:`AbortChannel.code`) returns a code, a rank has called
    MPI_Abort: every group gets SIGKILL at once and the result is that code (masked to 0-255),
    whatever the ranks' own statuses, as mpiexec does.

    After the first failure the others run on for `grace` seconds, then their groups get
    SIGTERM and, 0.2 s later, SIGKILL. `signalled`: signals the caller forwarded to the ranks
    (a list its handler appends to); `grace` seconds after the first, every group gets
    SIGKILL. After `timeout` seconds (None: no limit) every group gets SIGKILL, "<who>: timed
    out" goes to stderr and the result is 124 at once (the caller reaps the processes).
    Between polls it calls `idle(0.01)` (default: sleep; a caller may relay output there)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    failed: int | None = None
    fail_time = signal_time = 0.0
    while True:
        codes = [p.poll() for p in procs]
        abort_code = aborted()  # after the polls: a reporter seen exited has written its code
        if abort_code is not None:
            for proc in procs:
                signal_group(proc, signal.SIGKILL)
            return abort_code & 0xFF
        if all(c is not None for c in codes):
            if failed is not None:
                return failed
            bad = [c for c in codes if c]
            return exit_status(bad[0]) if bad else 0
        now = time.monotonic()
        if failed is None:
            for code in codes:
                if code:
                    failed, fail_time = exit_status(code), now
                    break
        if signalled and not signal_time:
            signal_time = now
        if failed is not None and now - fail_time > grace:
            for proc in procs:
                signal_group(proc, signal.SIGTERM)
            time.sleep(0.2)
            for proc in procs:
                signal_group(proc, signal.SIGKILL)
        if signal_time and now - signal_time > grace:
            for proc in procs:
                signal_group(proc, signal.SIGKILL)
        if deadline is not None and now > deadline:
            for proc in procs:
                signal_group(proc, signal.SIGKILL)
            print(f"{who}: timed out", file=sys.stderr)
            return 124
        idle(0.01)


@contextlib.contextmanager
def forward_signals(
    to: Sequence[subprocess.Popen[bytes]] | Callable[[int], None],
) -> Iterator[list[int]]:
    """For the duration of the block, SIGTERM, SIGINT, SIGHUP and SIGQUIT sent to this
    process are passed on instead of having their usual effect: to the process group of
    every process in `to` (a list the caller may still append to; each leads its own
    group), or, if `to` is a function, by calling it with the signal. Yields the list of
    signals received, first one first (pass it to :func:`supervise` as `signalled`). The
    previous handlers are back after the block. Off the main thread (where Python takes no
    handlers) it installs nothing and the list stays empty."""
    received: list[int] = []

    def forward(sig: int, frame: Any) -> None:
        received.append(sig)
        if callable(to):
            to(sig)
        else:
            for proc in to:
                signal_group(proc, sig)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    old = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def rank_session() -> bool:
    """Whether a rank needs a session of its own (:meth:`OutputRelay.start`): True iff our
    stdin is a terminal whose foreground process group is ours (a rank outside that group
    but in our session would be stopped reading it)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get SIGKILL when `parent` (the process, i.e.
    the thread, that starts it: call from the main thread) dies, however it dies; a child
    whose parent is already gone exits at once (PR_SET_PDEATHSIG)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # died between our fork and the prctl
            os._exit(1)

    return preexec


class OutputRelay:
    """Output pipes of processes relayed to our streams in whole lines.

    :meth:`add` a pipe with the stream it goes to and a prefix put before each of its lines
    (b"" for none). Single-threaded: :meth:`pump` moves what is there; the one writer never
    interleaves two pipes within a line. A line longer than 1 MiB is passed on in pieces;
    a last line without a newline gets one. Pass ``pump`` as :func:`supervise`'s `idle`.
    """

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.partial: dict[int, bytes] = {}  # fd -> the start of its next line

    def add(self, pipe: IO[bytes], out: IO[bytes], prefix: bytes = b"") -> None:
        """Relay `pipe` (made non-blocking; closed at its end) to `out` (flushed per write)."""
        os.set_blocking(pipe.fileno(), False)
        self.selector.register(pipe, selectors.EVENT_READ, (prefix, out))
        self.partial[pipe.fileno()] = b""

    def start(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        prefix: bytes = b"",
        *,
        merge_stderr: bool = False,
        preexec_fn: Callable[[], None] | None = None,
        keep_fds: bool = False,
        pass_fds: Sequence[int] = (),
    ) -> subprocess.Popen[bytes]:
        """Start a rank: `command` with `env` leading a process group of its own (which holds
        what it starts, see :func:`signal_group`), its stdout relayed to ours and its
        stderr to ours (to our stdout with `merge_stderr`), each line after `prefix`; this
        process's :class:`Guardian`, if any, is told its group. `keep_fds`: the rank
        inherits our inheritable fds (a PMI_FD from hydra); `pass_fds`: these fds only (not
        with `keep_fds`; e.g. an :class:`AbortChannel`'s write end). Returns the Popen; raises what
        Popen raises (OSError for a command that cannot start).

        The group is in our session (see :func:`rank_session`), so that a job's ranks share
        one scheduler autogroup: Linux (CONFIG_SCHED_AUTOGROUP, on by default) schedules
        each session as one group, and a sched_yield() hardly ever hands the CPU to a task
        of another group. A rank per session made every yield of a crowded wait (4
        ranks on 2 CPUs) return at once, the rank it waits for left unrun, and the wait
        fell to a doorbell sleep. Where our stdin is the terminal we run in the foreground
        of, each rank still gets a session of its own: in ours, a rank that read the
        terminal (pdb, input()) would be stopped by SIGTTIN."""
        own_session = rank_session()
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            start_new_session=own_session,
            process_group=None if own_session else 0,
            preexec_fn=preexec_fn,
            close_fds=not keep_fds,
            pass_fds=pass_fds,
        )
        guard(group=proc.pid)
        assert proc.stdout is not None
        self.add(proc.stdout, sys.stdout.buffer, prefix)
        if proc.stderr is not None:
            self.add(proc.stderr, sys.stderr.buffer, prefix)
        return proc

    def pump(self, timeout: float) -> None:
        """Relay what arrives within `timeout` seconds (at once if something is there)."""
        if not self.partial:
            time.sleep(timeout)
            return
        for key, _ in self.selector.select(timeout):
            prefix, out = key.data
            fd = key.fd
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            data = self.partial[fd] + chunk
            if not chunk:  # end of stream: a last line without its newline gets one
                self.selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                del self.partial[fd]
                if data:
                    self._write(prefix, out, data + b"\n")
                continue
            cut = data.rfind(b"\n") + 1
            if not cut and len(data) >= MAX_PARTIAL_LINE:
                cut = len(data)
            if cut:
                self._write(prefix, out, data[:cut])
            self.partial[fd] = data[cut:]

    @staticmethod
    def _write(prefix: bytes, out: IO[bytes], lines: bytes) -> None:
        if prefix:
            lines = b"".join(prefix + line for line in lines.splitlines(keepends=True))
        out.write(lines)
        out.flush()

    def drain(self, timeout: float) -> None:
        """Relay what is left until every pipe ends or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while self.partial and time.monotonic() < deadline:
            self.pump(0.05)


_guardian: Guardian | None = None  # the one this process started, until released


class Guardian:
    """A process that outlives its launcher to clean up after it, however the launcher ends.

    Construct it first thing (it forks; before any thread starts): it becomes this
    process's guardian, which :func:`guard` tells what a cleanup would concern, one JSON
    object a line over a pipe: rank or guest process `group`s, `broker` pids, `region`
    names, `path`s (files or directories). If the pipe closes without :meth:`release` (the
    launcher died: SIGKILL included), the guardian SIGKILLs the groups, stops the brokers
    (SIGTERM, SIGKILL after 5 s), removes the regions with their semaphores and the paths,
    then exits. It ignores the terminal's signals and writes nothing. Raises RuntimeError
    if this process has a guardian already.
    """

    def __init__(self) -> None:
        global _guardian
        if _guardian is not None:
            raise RuntimeError("this process has a guardian already")
        read_fd, self._write_fd = os.pipe()  # not inherited by children (O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self._write_fd)
            _guard(read_fd)
        os.close(read_fd)
        _guardian = self

    def tell(self, **facts: Any) -> None:
        """Add `facts` (see the class docstring) to what the guardian cleans up."""
        os.write(self._write_fd, json.dumps(facts).encode() + b"\n")

    def release(self) -> None:
        """The launcher cleaned up itself: let the guardian go (and reap it)."""
        global _guardian
        self.tell(done=True)
        os.close(self._write_fd)
        os.waitpid(self.pid, 0)
        _guardian = None

    def __enter__(self) -> Guardian:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def guard(**facts: Any) -> None:
    """Tell this process's :class:`Guardian`, if it has one, `facts` to clean up should
    this process die: ``group=PID`` (a process group), ``broker=PID``, ``region=NAME``,
    ``path=PATH``. Without a guardian it does nothing."""
    if _guardian is not None:
        _guardian.tell(**{k: v for k, v in facts.items() if v is not None})


def _guard(read_fd: int) -> None:
    """The guardian's life (see Guardian); never returns."""
    from ivshmem_comm.notify import SemaphoreNotifier

    try:
        os.setsid()  # out of the launcher's terminal signals
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        with os.fdopen(read_fd, "rb") as pipe:
            facts = [json.loads(line) for line in pipe]
        if any(f.get("done") for f in facts):
            os._exit(0)
        for f in facts:
            if "group" in f:
                with contextlib.suppress(OSError):
                    os.killpg(f["group"], signal.SIGKILL)
        for f in facts:
            if "broker" in f:
                _stop(f["broker"])
        for f in facts:
            if "region" in f:
                with contextlib.suppress(FileNotFoundError):
                    Region.unlink(f["region"])
                SemaphoreNotifier.unlink_all(f["region"])
            if "path" in f:
                if os.path.isdir(f["path"]) and not os.path.islink(f["path"]):
                    shutil.rmtree(f["path"], ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(f["path"])
    finally:
        os._exit(0)


def _stop(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM process `pid` (not our child), SIGKILL if it still runs after `timeout` s."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises once it is gone
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)


class BrokerStartError(RuntimeError):
    """The broker exited or did not get ready in time; the message has its log's tail."""


class BrokerProcess:
    """``python -m host_broker serve`` for region `name` (see the module docstring).

    `size`: bytes or a size string ("64M"); `max_peers`, `vectors`: the broker's options of
    those names; `args`: more ``serve`` options. `state_dir`: the broker's (private) state
    directory; default a fresh temporary one, removed by :meth:`close`. The socket is
    `socket` if given, else ``<state_dir>/<name>.sock``. `log`: a file the broker's output
    goes to (appended; the tail goes into BrokerStartError), or None for this process's
    stdout/stderr. `unlink_on_exit`: pass ``--unlink-on-exit`` (the broker removes the
    region, its record and lock when it stops). `env`, `cwd`: of the broker process. A
    process with a :class:`Guardian` has it told the broker, its region and (if made here)
    the state directory at each start.

    Attributes: `name`, `socket`, `state_dir`, `proc` (the Popen of the last start, None
    before). Not thread-safe.
    """

    def __init__(
        self,
        name: str,
        size: int | str,
        *,
        max_peers: int = 2,
        vectors: int = 1,
        args: Sequence[str] = (),
        state_dir: str | os.PathLike[str] | None = None,
        socket: str | os.PathLike[str] | None = None,
        log: str | os.PathLike[str] | None = None,
        log_level: str = "info",
        unlink_on_exit: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self._own_dir = state_dir is None
        self.state_dir = tempfile.mkdtemp(prefix="ivshmem-broker-") if state_dir is None else (
            os.fspath(state_dir)
        )  # fmt: skip
        self.socket = os.fspath(socket) if socket else os.path.join(self.state_dir, f"{name}.sock")
        self.log_path = os.fspath(log) if log is not None else None
        self.argv = [
            sys.executable, "-m", "host_broker", "serve", "--name", name, "--size", str(size),
            "--max-peers", str(max_peers), "--vectors", str(vectors),
            "--state-dir", self.state_dir, "--socket", self.socket, "--log-level", log_level,
            *(["--unlink-on-exit"] if unlink_on_exit else []), *args,
        ]  # fmt: skip
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._before: tuple[int, int, int] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float = 20.0) -> BrokerProcess:
        """Start the broker (again, if a previous one has exited); with `wait`, return once
        its socket listens (see :meth:`wait_ready`). Raises RuntimeError if one still runs,
        BrokerStartError if it exits or is not ready within `timeout` seconds (it is then
        killed; the temporary directory stays until :meth:`close`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"the broker of {self.name} is already running")
        ensure_private_dir(self.state_dir)
        self._before = self._record_identity()
        out: IO[bytes] | None = None
        if self.log_path is not None:
            out = open(self.log_path, "ab")  # noqa: SIM115 - closed below, the child keeps a copy
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=out, env=self.env, cwd=self.cwd
            )
        finally:
            if out is not None:
                out.close()
        guard(broker=self.proc.pid, region=self.name,
              path=self.state_dir if self._own_dir else None)  # fmt: skip
        if wait:
            self.wait_ready(timeout)
        return self

    def _record_identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(record_path(self.state_dir, self.name))
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the broker of the last :meth:`start` has written its record (it does
        so once its socket listens; a record left by an earlier broker does not count) and
        the socket exists. Raises BrokerStartError as :meth:`start` says."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            if self._record_identity() != self._before and os.path.exists(self.socket):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                status = self.proc.poll()
                self.kill()
                what = f"exited with status {status}" if status is not None else "was not ready"
                raise BrokerStartError(
                    f"the broker of region {self.name} {what} within {timeout} s"
                    + (f"; its log ends:\n{self.log()[-2000:]}" if self.log_path else "")
                )
            time.sleep(0.01)

    def log(self) -> str:
        """The broker's log so far ("" without a log file or before it exists)."""
        if self.log_path is None:
            return ""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        """True while the broker process runs."""
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int, timeout: float = 10.0) -> int:
        """Send `sig` to the broker and wait for it to exit; return its exit status
        (negative: killed by that signal). subprocess.TimeoutExpired after `timeout` s."""
        assert self.proc is not None, "start() first"
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the broker if it runs, and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker as its users do: SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.signal(signal.SIGTERM, timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        """Stop the broker, remove the region (a BrokerProcess serves a region made for its
        job) and the temporary state directory if this object made it. Idempotent."""
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            Region.unlink(self.name)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> BrokerProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lines_main(argv: Sequence[str] | None = None) -> int:
    """``python -m guest_lib.launch -- CMD ARGS...``: run CMD as a rank whose output leaves
    in whole lines. A launcher that mixes its ranks' writes (hydra's mpiexec passes on
    whatever each read of a rank's pipe gives) then mixes whole lines only. CMD inherits
    our environment and inheritable fds (hydra's PMI_FD), dies with us (SIGKILL), gets the
    signals we get (SIGKILL 2 s after the first). Returns CMD's :func:`exit_status`
    (2 with a message if no command is given)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m guest_lib.launch -- CMD [ARGS...]", file=sys.stderr)
        return 2
    output = OutputRelay()
    procs: list[subprocess.Popen[bytes]] = []
    with forward_signals(procs) as received:
        procs.append(
            output.start(args, os.environ, preexec_fn=die_with(os.getpid()), keep_fds=True)
        )
        try:
            status = supervise(procs, None, who=args[0], signalled=received, idle=output.pump)
        finally:
            signal_group(procs[0], signal.SIGKILL)
            procs[0].wait()
            output.drain(5.0)
    return status


if __name__ == "__main__":
    sys.exit(lines_main())
