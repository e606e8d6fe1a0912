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
group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from ivshmem_comm.hostos import ensure_private_dir
from ivshmem_comm.records import record_path
from ivshmem_comm.region import Region

__all__ = [
    "GRACE_S",
    "SCRUB_VARS",
    "BrokerProcess",
    "BrokerStartError",
    "exit_status",
    "job_environ",
    "signal_group",
    "supervise",
]

#: Seconds the other ranks of a job may run on after one failed, before they are stopped.
GRACE_S = 2.0

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
)


def job_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: os.environ) without the variables of SCRUB_VARS."""
    env = dict(os.environ if base is None else base)
    for var in SCRUB_VARS:
        env.pop(var, None)
    return env


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group `proc` leads (a rank started with
    ``start_new_session=True``: the rank and whatever it started). A group that is gone, or
    that this user may not signal, is left alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_status(code: int) -> int:
    """A Popen return code as a shell reports it: 128+N for a process killed by signal N."""
    return 128 - code if code < 0 else code


def supervise(
    procs: Sequence[subprocess.Popen[bytes]],
    timeout: float | None,
    *,
    grace: float = GRACE_S,
    who: str = "ivshmem-run",
    signalled: Sequence[int] = (),
    idle: Callable[[float], None] = time.sleep,
) -> int:
    """Wait until every rank in `procs` (each leading its own process group) has exited;
    return the job's status: 0 if all exited 0, else the first failure's :func:`exit_status`.

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
    region, its record and lock when it stops). `env`, `cwd`: of the broker process.

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
