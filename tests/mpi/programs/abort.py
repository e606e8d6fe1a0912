"""Unmodified mpi4py program: rank 0 aborts with status argv[1] (default 3), the others wait
in a Barrier."""

import sys

from mpi4py import MPI

if MPI.COMM_WORLD.Get_rank() == 0:
    MPI.COMM_WORLD.Abort(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
MPI.COMM_WORLD.Barrier()
