"""Rank program of the crowded collectives test: ranks that share one CPU (the job is pinned to
it) run small Bcast and Gather calls through the collective area, data checked, in batches of
BATCH calls, and print per collective and batch its voluntary context switches per call
("switches NAME BATCH N"). A member whose wait sleeps on the doorbell switches voluntarily
once per sleep; one whose yields hand the CPU to the member it waits for (which shares it)
does not (a yield is an involuntary switch). Each rank also prints whether it shares the
launcher's session ("session RANK SHARED").
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

import numpy as np

from guest_lib.mpi import MPI

BATCH = 100
BATCHES = 20


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    print(f"rank {rank} session {os.getsid(0) != os.getpid()}", flush=True)
    buf = np.zeros(8, "u1")
    send = np.zeros(8, "u1")
    gathered = np.zeros(8 * size, "u1")

    def bcast(i: int) -> None:
        buf[:] = i % 251 if rank == 0 else 0
        comm.Bcast(buf, root=0)
        assert (buf == i % 251).all(), (i, buf)

    def gather(i: int) -> None:
        send[:] = (i + rank) % 251
        comm.Gather(send, gathered if rank == 0 else None, root=0)
        if rank == 0:
            want = np.repeat((i + np.arange(size)) % 251, 8).astype("u1")
            assert (gathered == want).all(), (i, gathered)

    calls: dict[str, Callable[[int], None]] = {"bcast": bcast, "gather": gather}
    for name, call in calls.items():
        comm.Barrier()
        i = 0
        for batch in range(BATCHES):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            for _ in range(BATCH):
                call(i)
                i += 1
            after = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            print(f"rank {rank} switches {name} {batch} {(after - before) / BATCH:.3f}", flush=True)


if __name__ == "__main__":
    main()
