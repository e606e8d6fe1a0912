"""A program written for mpi4py, unmodified: run by tests/mpi/test_zero_change.py.

argv: OUT. Writes OUT.<rank> as JSON: what `mpi4py.MPI` is here, results of p2p and
collectives, and (for the hybrid route) how many messages went to the real mpi4py.
"""

import json
import sys

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
ring = comm.sendrecv(rank, dest=(rank + 1) % size, source=(rank - 1) % size)
total = np.zeros(4)
comm.Allreduce(np.full(4, rank, "d"), total, op=MPI.SUM)
dup = comm.Dup()
gathered = dup.allgather(rank)
dup.Free()
result = {
    "module": MPI.__name__,
    "rank": rank,
    "size": size,
    "ring": ring,
    "allreduce": total.tolist(),
    "allgather": gathered,
}
if MPI.__name__ == "guest_lib.mpi.MPI":
    result["mode"] = MPI._internal_state()["mode"]
    result["mpi_messages"] = MPI._internal_state()["engine"].mpi_messages
with open(f"{sys.argv[1]}.{rank}", "w") as out:
    json.dump(result, out)
