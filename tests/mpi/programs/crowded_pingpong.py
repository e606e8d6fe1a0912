"""Rank program of the crowded ping-pong test: 2 ranks that share one CPU (the job is pinned
to it) exchange small messages in the buffer forms real codes write (numpy array,
[mmap, n, BYTE], (array, DOUBLE), pickled object), data checked, in batches of BATCH round
trips, and print per form and batch its voluntary context switches per message and whether
the rank's waits were calm (skipping the yield phase after a long yield: see
Endpoint.yield_us) at any time of it ("switches FORM BATCH N CALM"). A waiting rank that
sleeps on the doorbell switches voluntarily once per message; one that hands the CPU over
with sched_yield does not (a yield is an involuntary switch)."""

from __future__ import annotations

import array
import mmap
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from guest_lib.mpi import MPI

BATCH = 100
BATCHES = 30


def forms(
    comm: MPI.Intracomm, peer: int
) -> dict[str, tuple[Callable[[int], None], Callable[[], Any]]]:
    """Per form: send(i) of message i, recv() -> what came (as comparable bytes)."""
    out_np, in_np = np.zeros(8, "u1"), np.zeros(8, "u1")
    out_mm, in_mm = mmap.mmap(-1, 8), mmap.mmap(-1, 8)
    out_d, in_d = array.array("d", [0.0]), array.array("d", [0.0])

    def fill(i: int) -> bytes:
        return bytes([i % 251]) * 8

    def send_np(i: int) -> None:
        out_np[:] = np.frombuffer(fill(i), "u1")
        comm.Send(out_np, peer, 1)

    def send_mm(i: int) -> None:
        out_mm[:] = fill(i)
        comm.Send([out_mm, 8, MPI.BYTE], peer, 2)

    def send_d(i: int) -> None:
        out_d[0] = float(i)
        comm.Send((out_d, MPI.DOUBLE), peer, 3)

    def recv_np() -> bytes:
        comm.Recv(in_np, peer, 1)
        return in_np.tobytes()

    def recv_mm() -> bytes:
        comm.Recv([in_mm, 8, MPI.BYTE], peer, 2)
        return bytes(in_mm)

    def recv_d() -> bytes:
        comm.Recv((in_d, MPI.DOUBLE), peer, 3)
        return in_d.tobytes()

    return {
        "numpy": (send_np, recv_np),
        "mmap": (send_mm, recv_mm),
        "double": (send_d, recv_d),
        "pickle": (lambda i: comm.send(fill(i), peer, 4), lambda: comm.recv(source=peer, tag=4)),
    }


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    peer = 1 - rank
    endpoint = MPI._internal_state()["endpoint"]
    for name, (send, recv) in forms(comm, peer).items():
        expect = {
            "double": lambda i: array.array("d", [float(i)]).tobytes(),
        }.get(name, lambda i: bytes([i % 251]) * 8)
        comm.Barrier()
        i = 0
        for batch in range(BATCHES):
            calm = endpoint._calm_until
            began = time.monotonic_ns()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            for _ in range(BATCH):
                if rank == 0:
                    send(i)
                    got = recv()
                else:
                    got = recv()
                    send(i)
                assert got == expect(i), (name, i, got)
                i += 1
            after = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            calmed = calm > began or endpoint._calm_until != calm
            print(f"rank {rank} switches {name} {batch} {(after - before) / (2 * BATCH):.3f} "
                  f"{calmed}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
