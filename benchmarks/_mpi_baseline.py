"""The mpi4py baseline: `mpiexec -n 2 python -m benchmarks._mpi_baseline PLAN_JSON LABEL`.

Rank 0 and rank 1 run, size by size, the same schedule as our peers (benchmarks._plan):
- latency: blocking `Send`/`Recv` of a numpy buffer, ping-pong, one-way = half a round trip;
- bandwidth (osu_bw): rank 0 `Isend`s a window of messages back to back from one buffer,
  rank 1 `Irecv`s them into one buffer, then sends a 4-byte ack.
Rank 0 prints one JSON line (see `_plan.emit`). Which transport MPICH uses is the caller's
business (environment variables); the result reports the TCP connections each rank holds as
evidence of it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from benchmarks._plan import ACK_BYTES, Step, emit, pin, plan_from_json, tcp_connections


def _latency(comm: Any, rank: int, step: Step, sbuf: np.ndarray, rbuf: np.ndarray) -> float:
    """One-way latency in microseconds (rank 0's figure; rank 1 returns 0)."""
    send, recv = comm.Send, comm.Recv
    peer = 1 - rank
    elapsed = 0
    for count, timed in ((step.lat_warmup, False), (step.lat_iters, True)):
        comm.Barrier()
        start = time.perf_counter_ns()
        if rank == 0:
            for _ in range(count):
                send(sbuf, peer)
                recv(rbuf, peer)
        else:
            for _ in range(count):
                recv(rbuf, peer)
                send(rbuf, peer)
        if timed:
            elapsed = time.perf_counter_ns() - start
    return elapsed / step.lat_iters / 2 / 1e3


def _bandwidth(comm: Any, rank: int, step: Step, sbuf: np.ndarray, rbuf: np.ndarray) -> float:
    """osu_bw-style bandwidth in MB/s (10**6 bytes), rank 0's figure."""
    peer = 1 - rank
    ack = np.zeros(ACK_BYTES, np.uint8)
    elapsed = 0
    for count, timed in ((step.bw_warmup, False), (step.bw_loops, True)):
        comm.Barrier()
        start = time.perf_counter_ns()
        for _ in range(count):
            if rank == 0:
                MPI.Request.Waitall([comm.Isend(sbuf, peer) for _ in range(step.window)])
                comm.Recv(ack, peer)
            else:
                MPI.Request.Waitall([comm.Irecv(rbuf, peer) for _ in range(step.window)])
                comm.Send(ack, peer)
        if timed:
            elapsed = time.perf_counter_ns() - start
    moved = step.size * step.window * step.bw_loops
    return moved / (elapsed / 1e9) / 1e6


def main(argv: list[str]) -> None:
    """Run the plan in argv[0]; rank 0 prints the result."""
    plan = plan_from_json(argv[0])
    label = argv[1] if len(argv) > 1 else "mpi"
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() != 2:
        raise SystemExit("run with mpiexec -n 2")
    cpu = pin(rank)
    latency: dict[str, float] = {}
    bandwidth: dict[str, float] = {}
    for step in plan:
        sbuf = np.full(step.size, 0x5A, np.uint8)
        rbuf = np.zeros(step.size, np.uint8)
        latency[str(step.size)] = _latency(comm, rank, step, sbuf, rbuf)
        if rank == 1 and step.size and rbuf[-1] != 0x5A:
            raise SystemExit(f"content check failed at {step.size} B")
        bandwidth[str(step.size)] = _bandwidth(comm, rank, step, sbuf, rbuf)
    cpus = comm.gather(cpu, root=0)
    connections = comm.gather(tcp_connections(), root=0)
    if rank == 0:
        emit(
            {
                "label": label,
                "library": MPI.Get_library_version().splitlines()[0].strip(),
                "cpus": cpus,
                "tcp_connections": connections,
                "latency_us": latency,
                "bandwidth_MBps": bandwidth,
            }
        )


if __name__ == "__main__":
    main(sys.argv[1:])
