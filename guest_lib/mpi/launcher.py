"""`ivshmem-run`: start N ranks of a program on this host, talking through one region.

    ivshmem-run -n N [--region NAME] [--size 64M] [--broker] [--timeout S] prog.py [args...]
    ivshmem-run -n N -m package.module [args...]
    ivshmem-run -n N -- python prog.py [args...]         (any command)

It creates the region (POSIX shm, 0600; a unique name unless --region), or with --broker
starts `python -m host_broker serve` for it (peers then get eventfd doorbells and broker-
assigned peer ids), starts N processes with IVSHMEM_MPI_RANK, IVSHMEM_MPI_SIZE and
IVSHMEM_COMM_REGION (or IVSHMEM_COMM_SOCKET) set, waits for them, and removes the region
(and its doorbell semaphores) and stops the broker afterwards. If a rank fails (non-zero exit
or signal), the others are terminated after a grace period of 2 s, as mpiexec does.

Signals, as MPICH's mpiexec (hydra) does: SIGTERM, SIGINT, SIGHUP and SIGQUIT sent to the
launcher are forwarded to every rank's process group; ranks still running 2 s after the first
are killed. Ranks die with the launcher even when it is killed with SIGKILL (each asks the
kernel for SIGKILL when its parent dies, PR_SET_PDEATHSIG), and a small guardian process
that outlives the launcher then removes the region, its semaphores and the broker. Ranks'
stdout and stderr pass through the launcher in whole lines, so two ranks printing at once
never mix within a line; --prepend-rank puts "[rank] " before each line.

Exit status: 0 if every rank exited 0, else the first failing rank's status (128+signal for a
signal), 124 after --timeout, 128+N after forwarding signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import IO, Any

from guest_lib.launch import (
    BrokerProcess,
    BrokerStartError,
    job_environ,
    signal_group,
    supervise,
)
from ivshmem_comm.units import parse_size

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MAX_PARTIAL_LINE = 1 << 20  # a longer line is passed on in pieces of this size


def default_size(n: int) -> int:
    """64 MiB, or 8 MiB per one-way queue when that is more."""
    return max(64 << 20, n * (n - 1) * (8 << 20))


def _command(args: argparse.Namespace) -> list[str]:
    """The command line of every rank. Python programs (prog.py, -m module, or a command
    `python prog.py|-m mod|-c cmd ...`) run through `python -m guest_lib.mpi`, so that
    `from mpi4py import MPI` in them gets this project's MPI (zero-change mode), unless
    IVSHMEM_MPI_ZERO_CHANGE=0; any other command runs as given."""
    from guest_lib.mpi import mpi4py_shim

    shim = ["-m", "guest_lib.mpi"] if mpi4py_shim.enabled() else []
    if args.module:
        return [sys.executable, *shim, "-m", args.module, *args.args]
    if not args.args:
        raise SystemExit("ivshmem-run: no program given")
    first = args.args[0]
    if first.endswith(".py"):
        return [sys.executable, *shim, *args.args]
    rest = args.args[1:]
    python = re.fullmatch(r"python[0-9.]*", os.path.basename(first))
    if shim and python and rest and (rest[0].endswith(".py") or rest[0] in ("-m", "-c")):
        return [first, *shim, *rest]
    return list(args.args)


def _size(text: str) -> int:
    """An argparse type: parse_size, its ValueError message shown as the option's error."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivshmem-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "-np", dest="n", type=int, required=True, help="number of ranks")
    parser.add_argument("--region", help="region name (default: a unique one)")
    parser.add_argument(
        "--size", type=_size, help="region size, e.g. 64M (default: 64M or 8M per queue)"
    )
    parser.add_argument("--broker", action="store_true", help="serve the region by a broker")
    parser.add_argument(
        "--max-span",
        type=_size,
        default=os.environ.get("IVSHMEM_MPI_MAX_SPAN", "128K"),
        help="largest span published at once (smaller: more pipelining)",
    )
    parser.add_argument(
        "--queue-num",
        type=int,
        default=int(os.environ.get("IVSHMEM_MPI_QUEUE_NUM", "256")),
        help="descriptors per queue (default 256)",
    )
    parser.add_argument("--timeout", type=float, help="kill everything after S seconds")
    parser.add_argument(
        "--prepend-rank",
        "-prepend-rank",
        action="store_true",
        help="put '[rank] ' before every line a rank prints (as hydra's -prepend-rank)",
    )
    parser.add_argument("-m", dest="module", help="run a module (python -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="program and its arguments")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the job, return the exit status (see the module docstring)."""
    from ivshmem_comm import layout
    from ivshmem_comm.notify import SemaphoreNotifier
    from ivshmem_comm.region import Region, validate_name

    args = make_parser().parse_args(argv)
    if args.args and args.args[0] == "--":
        args.args = args.args[1:]
    n = args.n
    if n < 1:
        raise SystemExit("ivshmem-run: -n must be at least 1")
    command = _command(args)
    name = args.region or f"mpi-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    size = args.size or default_size(n)
    try:
        validate_name(name)
        layout.Geometry.fit(size, max(n, 2), args.queue_num, max_span=args.max_span)
    except ValueError as exc:  # a bad --region, or a --size/--max-span/--queue-num misfit
        raise SystemExit(f"ivshmem-run: {exc}") from None
    env = job_environ()
    broker = None
    region = None
    procs: list[subprocess.Popen[bytes]] = []
    guardian = _Guardian()
    made = False  # the region is ours to remove (never one that existed before)
    output = _Output(args.prepend_rank)
    received: list[int] = []  # signals forwarded to the ranks, first one first
    old_handlers = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}

    def forward(sig: int, frame: Any) -> None:
        received.append(sig)
        for proc in procs:
            signal_group(proc, sig)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    try:
        if args.broker:
            broker = BrokerProcess(
                name, size, max_peers=max(n, 2), log_level="warning",
                args=["--max-span", str(args.max_span),
                      "--queue-num", str(args.queue_num)],
            )  # fmt: skip
            guardian.tell(state_dir=broker.state_dir)
            try:
                broker.start(wait=False)
                assert broker.proc is not None
                guardian.tell(broker=broker.proc.pid)
                broker.wait_ready()
            except BrokerStartError as exc:
                raise SystemExit(f"ivshmem-run: {exc}") from None
            made = True
            guardian.tell(region=name)
            env["IVSHMEM_COMM_SOCKET"] = broker.socket
        elif n > 1:
            try:
                region = Region.create(
                    name, size, n, queue_num=args.queue_num, max_span=args.max_span
                )
            except FileExistsError as exc:
                raise SystemExit(f"ivshmem-run: {exc}: choose another --region") from None
            made = True
            guardian.tell(region=name)
            env["IVSHMEM_COMM_REGION"] = name
        die_with_us = _die_with(os.getpid())
        for rank in range(n):
            if received:
                break
            rank_env = dict(env, IVSHMEM_MPI_RANK=str(rank), IVSHMEM_MPI_SIZE=str(n))
            # Own process group per rank, so that killing a rank kills what it started.
            proc = subprocess.Popen(
                command,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=die_with_us,
            )
            procs.append(proc)
            guardian.tell(group=proc.pid)
            assert proc.stdout is not None and proc.stderr is not None
            output.add(rank, proc.stdout, sys.stdout.buffer)
            output.add(rank, proc.stderr, sys.stderr.buffer)
        status = supervise(procs, args.timeout, signalled=received, idle=output.pump)
        return 128 + received[0] if received else status
    finally:
        for proc in procs:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
        output.drain(1.0)
        if broker is not None:
            broker.close()
        if region is not None:
            region.close()
        if made:
            with contextlib.suppress(FileNotFoundError):
                Region.unlink(name)
            SemaphoreNotifier.unlink_all(name)
        guardian.release()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn that makes the child get SIGKILL when `parent` (this process) dies,
    however it dies; a child whose parent is already gone exits at once."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # died between our fork and the prctl
            os._exit(1)

    return preexec


class _Guardian:
    """A process that outlives the launcher to clean up after it, however it ends.

    Forked at once (before any thread starts); the launcher tells it, one JSON object a line
    over a pipe, what a cleanup would concern (`region` name, rank process `group`s, `broker`
    pid, broker `state_dir`). If the pipe closes without `release` (the launcher was killed),
    the guardian kills the rank groups, stops the broker (SIGTERM, SIGKILL after 5 s) and
    removes the region, its semaphores and the state dir; then it exits.
    """

    def __init__(self) -> None:
        read_fd, self._write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self._write_fd)
            _guard(read_fd)
        os.close(read_fd)

    def tell(self, **facts: Any) -> None:
        os.write(self._write_fd, json.dumps(facts).encode() + b"\n")

    def release(self) -> None:
        """The launcher cleaned up itself: let the guardian go."""
        self.tell(done=True)
        os.close(self._write_fd)
        os.waitpid(self.pid, 0)


def _guard(read_fd: int) -> None:
    """The guardian's life (see _Guardian); never returns."""
    from ivshmem_comm.notify import SemaphoreNotifier
    from ivshmem_comm.region import Region

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
            if "state_dir" in f:
                shutil.rmtree(f["state_dir"], ignore_errors=True)
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


class _Output:
    """Ranks' stdout/stderr pipes relayed to ours in whole lines (prefixed with "[rank] "
    when `prefix`). Single-threaded: `pump` moves what is there; the one writer never
    interleaves two ranks within a line."""

    def __init__(self, prefix: bool) -> None:
        self.prefix = prefix
        self.selector = selectors.DefaultSelector()
        self.partial: dict[int, bytes] = {}

    def add(self, rank: int, pipe: IO[bytes], out: IO[bytes]) -> None:
        os.set_blocking(pipe.fileno(), False)
        self.selector.register(pipe, selectors.EVENT_READ, (rank, out))
        self.partial[pipe.fileno()] = b""

    def pump(self, timeout: float) -> None:
        """Relay what arrives within `timeout` seconds (at once if something is there)."""
        if not self.partial:
            time.sleep(timeout)
            return
        for key, _ in self.selector.select(timeout):
            rank, out = key.data
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
                    self._write(rank, out, data + b"\n")
                continue
            cut = data.rfind(b"\n") + 1
            if not cut and len(data) >= MAX_PARTIAL_LINE:
                cut = len(data)
            if cut:
                self._write(rank, out, data[:cut])
            self.partial[fd] = data[cut:]

    def _write(self, rank: int, out: IO[bytes], lines: bytes) -> None:
        if self.prefix:
            tag = b"[%d] " % rank
            lines = b"".join(tag + line for line in lines.splitlines(keepends=True))
        out.write(lines)
        out.flush()

    def drain(self, timeout: float) -> None:
        """Relay what is left until every pipe ends or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while self.partial and time.monotonic() < deadline:
            self.pump(0.05)


def main() -> None:
    """Console entry point (`ivshmem-run`)."""
    sys.exit(run())


if __name__ == "__main__":
    main()
