"""Rank program of the service-thread test: prints the threads running in this process
besides the main one and what the MPI fast paths count of them (`other_threads`), before and
while a thread of the program's own runs, after a Send/Recv ring checked byte for byte."""

from __future__ import annotations

import threading

import numpy as np

from guest_lib.mpi import MPI
from guest_lib.mpi.fastpath import other_threads


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    got = np.zeros(8, np.uint8)
    for step in range(100):
        comm.Send(np.full(8, rank + step, np.uint8), (rank + 1) % size, 3)
        comm.Recv(got, (rank - 1) % size, 3)
        assert (got == (rank - 1) % size + step).all(), got
    idle = other_threads()
    release = threading.Event()
    user = threading.Thread(target=release.wait)
    user.start()
    busy = other_threads()
    release.set()
    user.join()
    print("rank", rank, "threads", threading.active_count() - 1, "counted", idle, busy, flush=True)


main()
