"""MPI jobs across VM-lab guests: ``ivshmem-lab run --vms V -n N -- CMD`` (issue 5).

Host side (:func:`run_job`): start a broker for a fresh region (``--vectors 2``), boot V
guests where guest g gets one ``ivshmem-doorbell`` device per rank it hosts (ranks are dealt
round robin: rank r runs in guest ``r % V``), and run this module's guest side in each.

Guest side (``python -m ivshmem_lab.mpi guest --ranks 0,2 --size N -- CMD``): start
one process per local rank with ``IVSHMEM_MPI_RANK``, ``IVSHMEM_MPI_SIZE`` and
``IVSHMEM_COMM_GUEST=1`` (the MPI bootstrap then calls ``guest_lib.attach()``), and, when
the guest hosts several ranks, ``IVSHMEM_COMM_DEVICE`` = the rank's own doorbell device (one
broker slot per device). The ranks' output is relayed in whole lines (each prefixed
``[rank R] `` with ``--prepend-rank``); at the end one ``ivshmem-lab-mpi: rank R exit C``
line per rank. If a rank fails, the guest's other ranks
are killed after a grace period (as ``ivshmem-run`` does); the guest side exits with the
first failing status.

The host collects those lines, prints a per-rank summary, stops the broker and removes its
state directory, socket and the region. Exit status: 0 if every rank exited 0, 1 if any
rank or guest failed, 124 if a guest timed out (and nothing failed otherwise).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from guest_lib import pci
from guest_lib.launch import (
    BrokerProcess,
    BrokerStartError,
    OutputRelay,
    exit_status,
    forward_signals,
    guard,
    job_environ,
    signal_group,
    supervise,
)
from guest_lib.mpi.launcher import default_size
from ivshmem_lab.devices import DoorbellDevice
from ivshmem_lab.errors import LabError
from ivshmem_lab.guest import GuestResult
from ivshmem_lab.lab import Lab

EXIT_LINE = re.compile(r"^ivshmem-lab-mpi: rank (\d+) exit (-?\d+)$")


def placement(n: int, vms: int) -> list[list[int]]:
    """Ranks of each guest, round robin: guest g runs ranks g, g+V, g+2V, ..."""
    return [list(range(g, n, vms)) for g in range(vms)]


def region_size(n: int) -> int:
    """The launcher's default size rounded up to a power of two (QEMU wants one)."""
    size = default_size(n)
    return 1 << (size - 1).bit_length()


# --------------------------------------------------------------------------------------------
# Host side


def job_broker(name: str, size: int, peers: int, directory: str) -> BrokerProcess:
    """The broker of a lab job, not yet started: region `name` of `size` bytes for `peers`
    ranks (at least 2 slots), 2 vectors (a doorbell device per rank), state, socket
    (``broker.sock``) and log (``broker.log``, warnings only) in `directory`, the region
    removed when it stops. Start it with ``with job_broker(...) as broker:``; a broker that
    does not start raises LabError with its log's tail."""
    return _LabBroker(
        name,
        size,
        max_peers=max(peers, 2),
        vectors=2,
        state_dir=directory,
        socket=os.path.join(directory, "broker.sock"),
        log=os.path.join(directory, "broker.log"),
        log_level="warning",
    )


class _LabBroker(BrokerProcess):
    """A BrokerProcess whose start failure is a LabError (what the lab's callers expect)."""

    def start(self, wait: bool = True, timeout: float = 20.0) -> BrokerProcess:
        try:
            return super().start(wait, timeout)
        except BrokerStartError as exc:
            raise LabError(f"the job's broker did not start: {exc}") from None


@dataclass
class JobResult:
    """What :func:`run_job` saw: exit code per rank (None: never reported) and per guest."""

    rank_exit: dict[int, int | None]
    guests: list[GuestResult] = field(default_factory=list)  # one per guest
    status: int = 0


def run_job(
    lab: Lab,
    command: Sequence[str],
    *,
    vms: int,
    n: int,
    timeout: float | None = 300.0,
    cwd: str | None = None,
    on_output: Callable[[int, str], None] | None = None,
    prepend_rank: bool = False,
) -> JobResult:
    """Run an N-rank MPI job over V guests of `lab` (see the module docstring); with
    `prepend_rank` each line a rank prints comes with ``[rank R] `` first."""
    if vms < 1 or n < vms:
        raise ValueError(f"need 1 <= vms <= n (vms={vms}, n={n})")
    places = placement(n, vms)
    name = f"labmpi-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rank_exit: dict[int, int | None] = dict.fromkeys(range(n))

    def collect(index: int, line: str) -> None:
        m = EXIT_LINE.match(line)
        if m:
            rank_exit[int(m.group(1))] = int(m.group(2))
        if on_output is not None:
            on_output(index, line)

    with tempfile.TemporaryDirectory(prefix="ivshmem-lab-mpi-") as tmpdir:
        guard(path=tmpdir)
        broker = job_broker(name, region_size(n), n, tmpdir)
        with broker:
            commands = [
                [sys.executable, "-m", "ivshmem_lab.mpi", "guest",
                 "--ranks", ",".join(map(str, ranks)), "--size", str(n),
                 *(["--prepend-rank"] if prepend_rank else []), "--", *command]
                for ranks in places
            ]  # fmt: skip
            devices = [[DoorbellDevice(broker.socket, 2)] * len(ranks) for ranks in places]
            results = lab.run_many(
                commands,
                guest_devices=devices,
                timeout=timeout,
                cwd=cwd,
                env=job_environ(),
                inherit_env=False,
                on_output=collect,
            )
    failed = any(code != 0 for code in rank_exit.values()) or any(
        r.returncode not in (0, None) or (r.returncode is None and not r.timed_out) for r in results
    )
    timed_out = any(r.timed_out for r in results)
    status = 124 if timed_out and not any(c not in (0, None) for c in rank_exit.values()) else 0
    if failed and status == 0:
        status = 1
    return JobResult(rank_exit, list(results), status)


# --------------------------------------------------------------------------------------------
# Guest side


def guest_main(
    ranks: list[int],
    size: int,
    command: list[str],
    timeout: float | None,
    prepend_rank: bool = False,
) -> int:
    """Start this guest's ranks, relay their output in whole lines (``[rank R] `` first
    with `prepend_rank`), return the first failing status. SIGTERM, SIGINT, SIGHUP and
    SIGQUIT are forwarded to the ranks (killed 2 s after the first)."""
    env = job_environ()
    env["PYTHONUNBUFFERED"] = "1"

    devices = pci.doorbell_devices()
    if len(ranks) > 1 and len(devices) != len(ranks):
        print(
            f"ivshmem-lab-mpi: {len(ranks)} ranks but {len(devices)} doorbell devices here",
            file=sys.stderr,
        )
        for rank in ranks:
            print(f"ivshmem-lab-mpi: rank {rank} exit 125", flush=True)
        return 125
    procs: list[subprocess.Popen[bytes]] = []
    output = OutputRelay()
    with forward_signals(procs) as received:
        try:
            for i, rank in enumerate(ranks):
                rank_env = dict(
                    env,
                    IVSHMEM_MPI_RANK=str(rank),
                    IVSHMEM_MPI_SIZE=str(size),
                    IVSHMEM_COMM_GUEST="1",
                )
                if len(ranks) > 1:
                    rank_env["IVSHMEM_COMM_DEVICE"] = devices[i]
                prefix = f"[rank {rank}] ".encode() if prepend_rank else b""
                procs.append(output.start(command, rank_env, prefix, merge_stderr=True))
            status = supervise(
                procs, timeout, who="ivshmem-lab-mpi", signalled=received, idle=output.pump
            )
        finally:
            for proc in procs:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
            output.drain(5.0)
    for rank, proc in zip(ranks, procs, strict=True):
        code = proc.returncode
        print(f"ivshmem-lab-mpi: rank {rank} exit {exit_status(code)}", flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ivshmem_lab.mpi")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("guest", help="run this guest's ranks (inside a lab guest)")
    g.add_argument("--ranks", required=True, help="comma-separated world ranks")
    g.add_argument("--size", type=int, required=True, help="world size")
    g.add_argument("--timeout", type=float, default=None)
    g.add_argument("--prepend-rank", action="store_true", help="'[rank R] ' before each line")
    g.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        p.error("no command given")
    ranks = [int(r) for r in args.ranks.split(",") if r]
    return guest_main(ranks, args.size, command, args.timeout, args.prepend_rank)


if __name__ == "__main__":
    sys.exit(main())
