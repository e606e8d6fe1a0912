"""Under ERRORS_ARE_FATAL, a bad call on rank 1 ends the whole job with the error class."""

import time

from mpi4py import MPI

comm = MPI.COMM_WORLD
comm.Set_errhandler(MPI.ERRORS_ARE_FATAL)
if comm.Get_rank() == 1:
    comm.Send(b"x", dest=comm.Get_size() + 3)  # an invalid rank: MPI_ERR_RANK
    print("rank 1 went on", flush=True)
else:
    time.sleep(60)  # ended by the abort, not by waiting
