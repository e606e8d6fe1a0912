"""An error found at completion (a truncated receive at Wait/Waitall) goes through the
communicator's error handler: argv[1] "fatal" (ERRORS_ARE_FATAL: the job ends) or "user"
(a user handler runs, then Wait raises MPI.Exception)."""

import sys
import time

from mpi4py import MPI

mode = sys.argv[1]
comm = MPI.COMM_WORLD.Dup()  # the Dup inherits nothing here: the handler is set on it
seen = []
if mode == "fatal":
    comm.Set_errhandler(MPI.ERRORS_ARE_FATAL)
else:
    comm.Set_errhandler(MPI.Comm.Create_errhandler(lambda c, e: seen.append((c is comm, e))))
if comm.Get_rank() == 0:
    small = bytearray(1)
    request = comm.Irecv(small, source=1, tag=5)
    try:
        if mode == "fatal":
            request.Wait()
        else:
            MPI.Request.Waitall([request, comm.Irecv(bytearray(1), source=1, tag=6)])
    except MPI.Exception as exc:
        print(f"raised {exc.Get_error_class()} handler saw {seen}", flush=True)
    else:
        print("rank 0 went on", flush=True)
else:
    comm.Send(b"12345678", dest=0, tag=5)
    comm.Send(b"1", dest=0, tag=6)
    if mode == "fatal":
        time.sleep(60)  # ended by rank 0's abort, not by waiting
comm.Barrier()
