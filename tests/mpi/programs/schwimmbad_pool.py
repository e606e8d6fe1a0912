"""Unmodified schwimmbad program: MPIPool.map of squares (rank 0 the master, the others
workers: send/ssend, recv(ANY_SOURCE, ANY_TAG, status), Iprobe), checked; then the master
prints "schwimmbad ok <world size> <sum>"."""

import sys

from mpi4py import MPI
from schwimmbad import MPIPool


def work(x):
    return x * x


with MPIPool() as pool:
    if not pool.is_master():
        pool.wait()
        sys.exit(0)
    results = list(pool.map(work, range(200)))
    assert results == [x * x for x in range(200)], results
    print("schwimmbad ok", MPI.COMM_WORLD.Get_size(), sum(results), flush=True)
