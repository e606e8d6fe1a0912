"""Rank program of the oversubscription test: prints whether its engine judged the job
crowded (more ranks on the region than CPUs in their affinity masks) and its endpoint's spin,
then (after a Barrier, which binds COMM_WORLD's collective area) whether the area's group
yields while it spins and its spin, then the rounds of the area that rooted collectives
(Bcast, Scatter(v), Gather, Reduce, data checked) and one Allreduce took, then runs windows
of small Isend/Irecv (ring: each rank to its right, from its left) in the buffer forms real
codes write, completed by Waitall, checking every byte, and prints "ok" with the wall time
the windows took. `--pin`: each rank pins itself to a CPU of its own (round-robin over its
mask) before MPI starts."""

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

from guest_lib.mpi import MPI

WINDOW = 64
ROUNDS = 20


def rooted(comm, group) -> int:
    """Bcast, Scatter(v), Gather(v) and Reduce of small numpy arrays from root 1, the data
    checked; the rounds of the collective area they took."""
    rank, size = comm.Get_rank(), comm.Get_size()
    before = group._round
    for step in range(3):
        buf = np.full(16, rank + 7 * step, np.int64)
        comm.Bcast(buf, root=1)
        assert (buf == 1 + 7 * step).all(), buf
        parts = np.arange(size * 4, dtype=np.int64) + step
        mine = np.zeros(4, np.int64)
        comm.Scatter(parts, mine, root=1)
        assert (mine == parts[rank * 4 : rank * 4 + 4]).all(), mine
        counts, displs = [2] * size, [3 * r for r in range(size)]
        comm.Scatterv([np.arange(3 * size, dtype=np.int64), counts, displs, MPI.INT64_T],
                      mine[:2], root=1)  # fmt: skip
        assert (mine[:2] == [3 * rank, 3 * rank + 1]).all(), mine
        got = np.zeros(size * 4, np.int64)
        comm.Gather(np.full(4, rank + step, np.int64), got, root=1)
        if rank == 1:
            assert (got == np.repeat(np.arange(size) + step, 4)).all(), got
        total = np.zeros(4)
        comm.Reduce(np.full(4, rank + 1.0), total, root=1)
        if rank == 1:
            assert (total == size * (size + 1) / 2).all(), total
    return group._round - before


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    state = MPI._internal_state()
    print(f"rank {rank} crowded {state['engine'].crowded} spin {state['endpoint'].spin_us}")
    comm.Barrier()
    group = comm._area.group
    print(f"rank {rank} area-yields {group._yield} spin {group._spin * 1e6:g}")
    rooted_rounds = rooted(comm, group)
    before = group._round
    total = np.zeros(4)
    comm.Allreduce(np.full(4, rank + 1.0), total)
    assert (total == size * (size + 1) / 2).all(), total
    print(f"rank {rank} area-rounds rooted {rooted_rounds} allreduce {group._round - before}")
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


if __name__ == "__main__":
    main()
