"""Rank program of the oversubscription test: prints whether its engine judged the job
crowded (more ranks on the region than CPUs in their affinity masks) and its endpoint's spin,
then (after a Barrier, which binds COMM_WORLD's collective area) whether the area's group
yields while it spins and its spin, then runs windows of small Isend/Irecv (ring: each rank
to its right, from its left) in the buffer forms real codes write, completed by Waitall,
checking every byte, and prints "ok" with the wall time the windows took; then runs the object
collectives (checked) and prints how many of them went through the area ("object-rounds").
`--pin`: each rank pins itself to a CPU of its own (round-robin over its mask) before MPI
starts."""

from __future__ import annotations

import array
import mmap
import os
import sys
import time

import numpy as np

if sys.argv[1:] == ["--pin"]:  # each rank on a CPU of its own, before MPI starts
    _cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cpus[int(os.environ["IVSHMEM_MPI_RANK"]) % len(_cpus)]})

from guest_lib.mpi import MPI, area

WINDOW = 64
ROUNDS = 20


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    state = MPI._internal_state()
    print(f"rank {rank} crowded {state['engine'].crowded} spin {state['endpoint'].spin_us}")
    comm.Barrier()
    group = comm._area.group
    print(f"rank {rank} area-yields {group._yield} spin {group._spin * 1e6:g}")
    right, left = (rank + 1) % size, (rank - 1) % size
    started = time.monotonic()
    for round_ in range(ROUNDS):
        value = (left * 31 + round_) % 251
        outs = [mmap.mmap(-1, 8), bytearray(8), array.array("d", [0.0]), np.zeros(1)]
        for out in outs[:2]:
            out[:] = bytes([rank * 31 % 251 + round_ % 5]) * 8
        outs[2][0] = outs[3][0] = float(rank * 1000 + round_)
        ins = [mmap.mmap(-1, 8), bytearray(8), array.array("d", [0.0]), np.zeros(1)]
        forms = [lambda b: [b, 8, MPI.BYTE], lambda b: [b, 8, MPI.BYTE],
                 lambda b: (b, MPI.DOUBLE), lambda b: b]  # fmt: skip
        recvs = [comm.Irecv(form(ins[k]), left, k) for _ in range(WINDOW // 4)
                 for k, form in enumerate(forms)]  # fmt: skip
        recvs.append(comm.Irecv([bytearray(0), 0, MPI.BYTE], left, 9))
        recvs.append(comm.Irecv([bytearray(8), 8, MPI.BYTE], MPI.PROC_NULL, 9))
        sends = [comm.Isend(form(outs[k]), right, k) for _ in range(WINDOW // 4)
                 for k, form in enumerate(forms)]  # fmt: skip
        sends.append(comm.Isend([bytearray(0), 0, MPI.BYTE], right, 9))
        sends.append(comm.Isend([bytearray(8), 8, MPI.BYTE], MPI.PROC_NULL, 9))
        MPI.Request.Waitall(recvs)
        MPI.Request.Waitall(sends)
        assert bytes(ins[0]) == bytes(ins[1]) == bytes([left * 31 % 251 + round_ % 5]) * 8
        assert ins[2][0] == ins[3][0] == float(left * 1000 + round_), (ins, value)
    comm.Barrier()
    print(f"rank {rank} ok {time.monotonic() - started:.3f} s", flush=True)
    print(f"rank {rank} object-rounds {objects(comm)} of {len(OBJECT_CALLS)}", flush=True)


OBJECT_CALLS = ("bcast", "gather", "allgather", "scatter", "alltoall")


def objects(comm: MPI.Intracomm) -> int:
    """Run OBJECT_CALLS on `comm` (data checked); how many went through its collective area."""
    rank, size = comm.Get_rank(), comm.Get_size()
    root = size - 1
    before = area.completed(comm)
    assert comm.bcast({"from": rank} if rank == root else None, root) == {"from": root}
    got = comm.gather(b"g%d" % rank, root)
    assert got == ([b"g%d" % r for r in range(size)] if rank == root else None)
    assert comm.allgather((rank, "a")) == [(r, "a") for r in range(size)]
    items = [{"to": r} for r in range(size)] if rank == root else None
    assert comm.scatter(items, root) == {"to": rank}
    assert comm.alltoall([(rank, q) for q in range(size)]) == [(r, rank) for r in range(size)]
    return area.completed(comm) - before


if __name__ == "__main__":
    main()
