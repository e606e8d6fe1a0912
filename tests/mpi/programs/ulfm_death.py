"""A rank of tests/mpi/test_ulfm_death.py: one rank really dies and the others go on (ULFM).

The last world rank leaves with os._exit(0) (no Finalize, its peer slot left READY: only
its process is gone) instead of joining an Allreduce on a Dup of COMM_WORLD. The others
(argv[1]: where each writes its JSON result, as FILE.<rank>):
1. get MPI.Exception(ERR_PROC_FAILED) from that Allreduce, and see the dead rank in
   Get_failed (the time from entering the Allreduce to both is recorded);
2. survivor 0 revokes the communicator while the others wait in a receive posted on it
   before: theirs completes with ERR_REVOKED (the REVOKE notice), and Is_revoked holds;
   a Barrier then raises ERR_REVOKED everywhere;
3. Agree before Ack_failed raises ERR_PROC_FAILED; after it, Agree gives the AND of
   the survivors' flags;
4. Shrink gives a communicator of the survivors in their order, on which an Allreduce,
   point-to-point and a Barrier work; then the program ends normally (Finalize skips the
   world barrier, a world rank being failed).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from guest_lib.mpi import MPI


def error_class(call, *args):
    """The error class `call(*args)` raises (MPI.SUCCESS if it returns)."""
    try:
        call(*args)
    except MPI.Exception as exc:
        return exc.Get_error_class()
    return MPI.SUCCESS


def main() -> None:
    out = sys.argv[1]
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    victim = size - 1
    comm = world.Dup()
    comm.Allreduce(np.ones(4), np.zeros(4))  # everything set up and working
    if rank == victim:
        time.sleep(0.2)  # the others are inside the Allreduce by now
        os._exit(0)
    result: dict[str, object] = {"rank": rank}
    t0 = time.monotonic()
    result["allreduce"] = error_class(comm.Allreduce, np.ones(4), np.zeros(4))
    result["allreduce_s"] = round(time.monotonic() - t0, 3)
    while True:
        group = comm.Get_failed()
        failed = group.Translate_ranks(list(range(group.Get_size())), world.Get_group())
        if failed or time.monotonic() - t0 > 20:
            break
        time.sleep(0.01)
    result["failed"] = failed
    result["detect_s"] = round(time.monotonic() - t0, 3)
    # 2. revoke: survivor 0 revokes, the others are waiting in a receive from survivor 0
    if rank == 0:
        time.sleep(0.2)
        comm.Revoke()
        result["pending"] = MPI.ERR_REVOKED
    else:
        request = comm.Irecv(np.zeros(1), 0, 5)
        result["pending"] = error_class(request.Wait)
    result["is_revoked"] = comm.Is_revoked()
    result["barrier"] = error_class(comm.Barrier)
    result["send"] = error_class(comm.Send, np.zeros(1), MPI.PROC_NULL)
    # 3. agreement over the survivors
    result["agree_unacked"] = error_class(comm.Agree, 1)
    result["acked"] = comm.Ack_failed()
    result["agree"] = comm.Agree(0b111 if rank == 0 else 0b110 | rank % 2)
    # 4. shrink and go on
    shrunk = comm.Shrink()
    result["shrunk"] = [shrunk.Get_rank(), shrunk.Get_size()]
    result["shrunk_sum"] = shrunk.allreduce(rank)
    total = np.zeros(1)
    shrunk.Allreduce(np.array([float(rank + 1)]), total)
    result["shrunk_total"] = float(total[0])
    peer = (shrunk.Get_rank() + 1) % shrunk.Get_size()
    result["ring"] = shrunk.sendrecv(rank, peer, 1, None, MPI.ANY_SOURCE, 1)
    shrunk.Barrier()
    shrunk.Free()
    comm.Free()
    with open(f"{out}.{rank}", "w") as sink:
        json.dump(result, sink)


main()
