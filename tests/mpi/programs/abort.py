"""Unmodified mpi4py program: rank 0 aborts with status 3, the others wait in a Barrier."""

from mpi4py import MPI

if MPI.COMM_WORLD.Get_rank() == 0:
    MPI.COMM_WORLD.Abort(3)
MPI.COMM_WORLD.Barrier()
