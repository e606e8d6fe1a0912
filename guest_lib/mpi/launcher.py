"""`ivshmem-run`: start N ranks of a program on this host, talking through one region.

    ivshmem-run -n N [--region NAME] [--size 64M] [--broker] [--timeout S] prog.py [args...]
    ivshmem-run -n N -m package.module [args...]
    ivshmem-run -n N -- python prog.py [args...]         (any command)

It creates the region (POSIX shm, 0600; a unique name unless --region), or with --broker
starts `python -m host_broker serve` for it (peers then get eventfd doorbells and broker-
assigned peer ids), starts N processes with IVSHMEM_MPI_RANK, IVSHMEM_MPI_SIZE and
IVSHMEM_COMM_REGION (or IVSHMEM_COMM_SOCKET) set, waits for them, and removes the region
(and its doorbell semaphores) and stops the broker afterwards. If a rank fails (non-zero exit
or signal), the others are terminated after a grace period of 2 s, as mpiexec does. A rank
calling MPI_Abort(comm, code) ends the job at once with status `code` (0 included), as
mpiexec does: it reports the code on a pipe (guest_lib.launch.AbortChannel) before exiting.

Signals, as MPICH's mpiexec (hydra) does: SIGTERM, SIGINT, SIGHUP and SIGQUIT sent to the
launcher are forwarded to every rank's process group; ranks still running 2 s after the first
are killed. Ranks die with the launcher even when it is killed with SIGKILL (each asks the
kernel for SIGKILL when its parent dies, PR_SET_PDEATHSIG), and a small guardian process
that outlives the launcher then removes the region, its semaphores and the broker. Ranks'
stdout and stderr pass through the launcher in whole lines, so two ranks printing at once
never mix within a line; --prepend-rank puts "[rank] " before each line.

Exit status: the code of an MPI_Abort, else 0 if every rank exited 0, else the first failing
rank's status (128+signal for a signal), 124 after --timeout, 128+N after forwarding signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence

from guest_lib.launch import (
    AbortChannel,
    BrokerProcess,
    BrokerStartError,
    Guardian,
    OutputRelay,
    die_with,
    forward_signals,
    guard,
    job_environ,
    signal_group,
    supervise,
)
from ivshmem_comm.units import parse_size


def default_size(n: int) -> int:
    """64 MiB, or 8 MiB per one-way queue when that is more."""
    return max(64 << 20, n * (n - 1) * (8 << 20))


_PYTHON_NAME = re.compile(r"python[0-9.]*")


def _script_python(command: str) -> str | None:
    """The Python interpreter that runs `command` when it is a Python script by its `#!` line
    (a console script such as `dask-mpi`: `#!/venv/bin/python` or `#!/usr/bin/env python3`),
    else None (no such file on PATH, unreadable, or another interpreter)."""
    path = shutil.which(command)
    if path is None:
        return None
    try:
        with open(path, "rb") as script:
            first = script.readline(512)
    except OSError:
        return None
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    if len(words) >= 2 and os.path.basename(words[0]) == "env":
        words = words[1:]  # `#!/usr/bin/env python3`: the interpreter is found on PATH
    if not words or not _PYTHON_NAME.fullmatch(os.path.basename(words[0])):
        return None
    return words[0]


def _command(args: argparse.Namespace) -> list[str]:
    """The command line of every rank. Python programs (prog.py, -m module, a command
    `python prog.py|-m mod|-c cmd ...`, or a Python script by its `#!` line, such as a
    package's console script) run through `python -m guest_lib.mpi`, so that
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
    python = _PYTHON_NAME.fullmatch(os.path.basename(first))
    if shim and python and rest and (rest[0].endswith(".py") or rest[0] in ("-m", "-c")):
        return [first, *shim, *rest]
    interpreter = _script_python(first) if shim and not python else None
    if interpreter is not None:  # as the kernel would run it, with the shim in between
        return [interpreter, *shim, str(shutil.which(first)), *rest]
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
    made = False  # the region is ours to remove (never one that existed before)
    output = OutputRelay()
    abort = AbortChannel()
    env.update(abort.environ())
    with Guardian(), forward_signals(procs) as received:
        try:
            if args.broker:
                broker = BrokerProcess(
                    name, size, max_peers=max(n, 2), log_level="warning",
                    args=["--max-span", str(args.max_span),
                          "--queue-num", str(args.queue_num)],
                )  # fmt: skip
                try:
                    broker.start()
                except BrokerStartError as exc:
                    raise SystemExit(f"ivshmem-run: {exc}") from None
                made = True
                env["IVSHMEM_COMM_SOCKET"] = broker.socket
            elif n > 1:
                try:
                    region = Region.create(
                        name, size, n, queue_num=args.queue_num, max_span=args.max_span
                    )
                except FileExistsError as exc:
                    raise SystemExit(f"ivshmem-run: {exc}: choose another --region") from None
                made = True
                guard(region=name)
                env["IVSHMEM_COMM_REGION"] = name
            die_with_us = die_with(os.getpid())
            for rank in range(n):
                if received:
                    break
                rank_env = dict(env, IVSHMEM_MPI_RANK=str(rank), IVSHMEM_MPI_SIZE=str(n))
                prefix = b"[%d] " % rank if args.prepend_rank else b""
                procs.append(
                    output.start(
                        command, rank_env, prefix, preexec_fn=die_with_us, pass_fds=[abort.write_fd]
                    )
                )
            status = supervise(
                procs, args.timeout, signalled=received, idle=output.pump, aborted=abort.code
            )
            return 128 + received[0] if received else status
        finally:
            for proc in procs:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
            output.drain(1.0)
            abort.close()
            if broker is not None:
                broker.close()
            if region is not None:
                region.close()
            if made:
                with contextlib.suppress(FileNotFoundError):
                    Region.unlink(name)
                SemaphoreNotifier.unlink_all(name)


def main() -> None:
    """Console entry point (`ivshmem-run`)."""
    sys.exit(run())


if __name__ == "__main__":
    main()
