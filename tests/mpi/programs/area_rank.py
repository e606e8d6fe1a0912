"""A rank of tests/mpi/test_collective_area_mpi.py: the MPI face's collectives through the
region's collective area. Mode (argv[1]):

all      every collective (blocking and nonblocking, buffer forms, IN_PLACE) on COMM_WORLD
         and on a Dup, checked against numpy, and counted: the area's `completed` counter
         must grow by exactly the number of collectives run (so it fails if any of them
         took the message path; 0 at one rank, which has no area); then payloads over a
         slab (Bcast/Allreduce on messages, Gather/Scatter/Alltoall and their nonblocking
         forms declined in the area, then on messages); prints "AREA OK <n>".
loop     200 Dup / collectives / Free: the slot is claimed and released each time (its claim
         word is 0 after Free, its generation grows); prints "LOOP OK <slot> <generations>".
exhaust  Dups without Free until one finds no slot: that one runs its collectives on
         messages, correctly; after freeing them a new Dup binds again; prints "EXHAUST OK".
kill     the last rank SIGKILLs itself instead of joining an Allreduce: the others raise
         MPI.Exception within seconds; prints "LOST <seconds>".
ikill    the same with an Iallreduce the others Wait for: its Wait raises within seconds.
igkill   the same with an Igather to rank 0 (the second rank's request completes at once:
         it sends only; it then Waits for an Ialltoall).
"""

from __future__ import annotations

import array
import os
import signal
import sys
import time

import numpy as np

from guest_lib.mpi import MPI, area


def check_all(comm: MPI.Intracomm) -> int:
    """Every collective once per size and form; returns how many ran (all in the area)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()  # binds the area
    start = area.completed(comm)
    shared = size > 1  # one member: no area, the same results
    assert start >= 1 if shared else start == 0, "the first collective did not run in the area"
    ran = 0

    def counted(k: int = 1, empty: int = 0) -> None:
        """`k` collectives ran, `empty` of them block collectives that move no byte at
        n == 0, where every member returns without a round (collectives._skip)."""
        nonlocal ran
        ran += k - (empty if n == 0 else 0)

    for n in (0, 1, 8, 1000, 5000):  # every payload within one slab (256 KiB)
        root = n % size
        # Bcast: numpy, [bytearray, count, BYTE], (array, DOUBLE)
        data = np.arange(n, dtype="f8") + 1
        buf = data.copy() if rank == root else np.zeros(n)
        comm.Bcast(buf, root)
        assert np.array_equal(buf, data)
        raw = bytearray(data.tobytes()) if rank == root else bytearray(8 * n)
        comm.Bcast([raw, 8 * n, MPI.BYTE], root)
        assert raw == data.tobytes()
        arr = array.array("d", data.tolist() if rank == root else [0.0] * n)
        comm.Bcast((arr, MPI.DOUBLE), root)
        assert list(arr) == data.tolist()
        counted(3, empty=3)
        # Gather / Gatherv / Scatter / Scatterv
        mine = np.full(n, rank, "i4")
        every = np.repeat(np.arange(size, dtype="i4"), n)
        got = np.full(size * n, -1, "i4") if rank == root else None
        comm.Gather(mine, got, root)
        if rank == root:
            assert np.array_equal(got, every)
            inplace = every.copy()
            inplace[root * n : (root + 1) * n] = -5  # overwritten by nothing: IN_PLACE keeps it
            comm.Gather(MPI.IN_PLACE, inplace, root)
            every_root = every.copy()
            every_root[root * n : (root + 1) * n] = -5
            assert np.array_equal(inplace, every_root)
        else:
            comm.Gather(mine, None, root)
        counted(2, empty=2)
        counts = [r + n for r in range(size)]
        displs = [sum(counts[:r]) for r in range(size)]
        vsend = np.full(counts[rank], rank * 10, "i8")
        vrecv = np.zeros(sum(counts), "i8")
        comm.Gatherv(vsend, [vrecv, (counts, displs), MPI.INT64_T] if rank == root else None, root)
        if rank == root:
            assert np.array_equal(vrecv, np.repeat(np.arange(size) * 10, counts))
        counted()
        part = np.full(n, -1, "i4")
        comm.Scatter(every if rank == root else None, part, root)
        assert (part == rank).all()
        if rank == root:
            comm.Scatter(every, None, root)  # None at the root: in place
        else:
            comm.Scatter(None, part, root)
        vpart = np.zeros(counts[rank], "i8")
        comm.Scatterv([np.repeat(np.arange(size) * 10, counts), counts, displs, MPI.INT64_T]
                      if rank == root else None, vpart, root)  # fmt: skip
        assert (vpart == rank * 10).all()
        counted(3, empty=2)
        # Allgather(v), IN_PLACE, Alltoall(v)
        out = np.full(size * n, -1, "i4")
        comm.Allgather(mine, out)
        assert np.array_equal(out, every)
        out[:] = -1
        out[rank * n : (rank + 1) * n] = rank
        comm.Allgather(MPI.IN_PLACE, out)
        assert np.array_equal(out, every)
        vout = np.zeros(sum(counts), "i8")
        comm.Allgatherv(vsend, [vout, counts, displs, MPI.INT64_T])
        assert np.array_equal(vout, np.repeat(np.arange(size) * 10, counts))
        counted(3, empty=2)
        send = np.arange(size * n, dtype="i4") + 1000 * rank  # block q goes to rank q
        recv = np.zeros(size * n, "i4")
        comm.Alltoall(send, recv)
        for q in range(size):
            got_q = recv[q * n : (q + 1) * n]
            assert np.array_equal(got_q, np.arange(rank * n, (rank + 1) * n) + 1000 * q)
        comm.Alltoall(MPI.IN_PLACE, send)
        assert np.array_equal(send, recv)
        scounts = [n + q for q in range(size)]  # to rank q: n + q elements
        sdispls = [sum(scounts[:q]) for q in range(size)]
        rcounts = [n + rank] * size
        rdispls = [q * (n + rank) for q in range(size)]
        sv = np.concatenate([np.full(scounts[q], rank * 100 + q, "i2") for q in range(size)])
        rv = np.zeros(sum(rcounts), "i2")
        comm.Alltoallv([sv, (scounts, sdispls), MPI.SHORT], [rv, (rcounts, rdispls), MPI.SHORT])
        assert np.array_equal(rv, np.repeat(np.arange(size) * 100 + rank, n + rank).astype("i2"))
        counted(3, empty=2)
        # Reductions: numpy reference, rank order
        values = [np.arange(n, dtype="f8") * (r + 1) + r for r in range(size)]
        total = np.sum(values, axis=0) if n else np.zeros(0)
        res = np.zeros(n)
        comm.Allreduce(values[rank], res, MPI.SUM)
        assert np.allclose(res, total)
        res = values[rank].copy()
        comm.Allreduce(MPI.IN_PLACE, res, MPI.MAX)
        assert np.array_equal(res, np.max(values, axis=0) if n else res)
        ints = np.full(n, rank + 1, "i8")
        rres = np.zeros(n, "i8") if rank == root else None
        comm.Reduce(ints, rres, MPI.PROD, root)
        if rank == root:
            assert (rres == np.prod(np.arange(1, size + 1))).all()
        sres = np.zeros(n)
        comm.Scan(values[rank], sres)
        assert np.allclose(sres, np.sum(values[: rank + 1], axis=0) if n else sres)
        eres = np.full(n, -7.0)
        comm.Exscan(values[rank], eres)
        if rank > 0:
            assert np.allclose(eres, np.sum(values[:rank], axis=0) if n else eres)
        else:
            assert (eres == -7.0).all()
        block = np.zeros(n, "i8")
        comm.Reduce_scatter_block(np.tile(np.arange(n, dtype="i8") + rank, size), block)
        assert np.array_equal(block, size * np.arange(n) + sum(range(size)))
        rcount = [n + q for q in range(size)]
        rs = np.zeros(rcount[rank], "i8")
        comm.Reduce_scatter(np.ones(sum(rcount), "i8"), rs, rcount, MPI.SUM)
        assert (rs == size).all()
        counted(7, empty=6)
        # Nonblocking: several started, completed out of order, interleaved with messages
        ib = np.arange(n, dtype="f8") if rank == root else np.zeros(n)
        ia = np.zeros(n)
        ig = np.full(size * n, -1, "i4")
        requests = [
            comm.Ibarrier(),
            comm.Ibcast(ib, root),
            comm.Iallreduce(values[rank], ia),
            comm.Iallgather(mine, ig),
        ]
        token = comm.isend(rank, (rank + 1) % size, 77)
        assert comm.recv(None, (rank - 1) % size, 77) == (rank - 1) % size
        token.wait()
        for request in reversed(requests):
            request.Wait()
        assert np.array_equal(ib, np.arange(n)) and np.allclose(ia, total)
        assert np.array_equal(ig, every)
        ired = np.zeros(n, "i8")
        it = np.zeros(size * n, "i4")
        r1 = comm.Ireduce(ints, ired if rank == root else None, MPI.SUM, root)
        r2 = comm.Ialltoall(np.arange(size * n, dtype="i4") + 1000 * rank, it)
        r3 = comm.Igather(mine, ig if rank == root else None, root)
        r4 = comm.Iscatter(every if rank == root else None, part, root)
        MPI.Request.Waitall([r4, r2, r3, r1])
        if rank == root:
            assert (ired == sum(range(1, size + 1))).all()
        assert np.array_equal(it, recv)
        counted(8, empty=7)
        # Nonblocking prefix folds and reduce-scatters whose counts every member knows
        iscan, iexscan = np.zeros(n), np.full(n, -7.0)
        irsb = np.zeros(n, "i8")
        irs = np.zeros(rcount[rank], "i8")
        requests = [
            comm.Iscan(values[rank], iscan),
            comm.Ireduce_scatter_block(np.tile(np.arange(n, dtype="i8") + rank, size), irsb),
            comm.Ireduce_scatter(np.ones(sum(rcount), "i8"), irs, rcount, MPI.SUM),
            comm.Iexscan(values[rank], iexscan),
        ]
        MPI.Request.Waitall(requests)
        assert np.allclose(iscan, sres) and np.array_equal(iexscan, eres)
        assert np.array_equal(irsb, block) and (irs == size).all()
        counted(4, empty=3)
        # Objects: each pickle in its sender's slab (allreduce is an allgather)
        for obj in ({"n": n, "root": root}, "x" * (3 * n + 600)):
            assert comm.bcast(obj if rank == root else None, root) == obj
        assert comm.allgather(rank) == list(range(size))
        assert comm.allreduce(rank + n) == sum(range(size)) + size * n
        gathered = comm.gather((rank, n), root)
        assert gathered == ([(r, n) for r in range(size)] if rank == root else None)
        counted(5)
    # Pickles over a slab go by messages within the same (area) collective
    bound = area.current(comm)
    if bound:
        big = b"y" * (bound.group.slab_size + 100)
        assert comm.bcast(big if rank == size - 1 else None, size - 1) == big
        mixed = comm.allgather(big if rank % 2 else rank)
        assert mixed == [big if r % 2 else r for r in range(size)]
        assert comm.gather(big if rank else 0, 0) == (
            [0] + [big] * (size - 1) if not rank else None
        )
        counted(3)
    got_count = area.completed(comm) - start
    assert got_count == ran if shared else got_count == 0, (got_count, ran)
    return got_count


def check_large(comm: MPI.Intracomm) -> None:
    """Payloads larger than a slab: Bcast and Allreduce take messages (every member knows
    the size), so do Gather, Scatter and Alltoall (the area declines them in its first
    round; a Scatter block takes up to two segments in two rounds, so the blocks here are
    over two slabs: 800 KB against 2 ranks' 256 KiB slab); their nonblocking forms alike
    (declined in the area, then over messages in the same instance)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    n = 200_000
    comm.Barrier()
    before = area.completed(comm)
    buf = np.arange(n, dtype="f8") if rank == 0 else np.zeros(n)
    comm.Bcast(buf, 0)
    assert np.array_equal(buf, np.arange(n))
    out = np.zeros(n)
    comm.Allreduce(np.full(n, rank, "f8"), out)
    assert (out == sum(range(size))).all()
    assert area.completed(comm) == before, "a payload over a slab went through the area"
    mine = np.full(n, rank, "i4")
    every = np.repeat(np.arange(size, dtype="i4"), n)
    got = np.zeros(size * n, "i4")
    comm.Gather(mine, got if rank == 0 else None, 0)
    assert rank != 0 or np.array_equal(got, every)
    part = np.zeros(n, "i4")
    comm.Scatter(every if rank == 0 else None, part, 0)
    assert (part == rank).all()
    send = np.arange(size * n, dtype="i4") + rank
    recv = np.zeros(size * n, "i4")
    comm.Alltoall(send, recv)
    for q in range(size):
        assert np.array_equal(recv[q * n : (q + 1) * n], np.arange(rank * n, (rank + 1) * n) + q)
    assert area.completed(comm) == before, "a payload over a slab went through the area"
    got[:], part[:], recv[:] = -1, -1, -1
    requests = [
        comm.Igather(mine, got if rank == 0 else None, 0),
        comm.Iscatter(every if rank == 0 else None, part, 0),
        comm.Ialltoall(send, recv),
    ]
    MPI.Request.Waitall(requests)
    assert rank != 0 or np.array_equal(got, every)
    assert (part == rank).all()
    for q in range(size):
        assert np.array_equal(recv[q * n : (q + 1) * n], np.arange(rank * n, (rank + 1) * n) + q)
    # declined in the area as the blocking ones (over one round), moved by messages
    assert area.completed(comm) == before, "a payload over a slab went through the area"


def main() -> None:
    mode = sys.argv[1]
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    if mode == "all":
        count = check_all(comm)
        if size > 1:
            check_large(comm)
        dup = comm.Dup()
        count += check_all(dup)
        dup.Free()
        comm.Barrier()
        print(f"AREA OK {count}", flush=True)
    elif mode == "loop":
        comm.Barrier()
        region = comm._area.group.region
        geometry = region.geometry
        slots = set()
        generations = []
        for i in range(200):
            dup = comm.Dup()
            value = dup.allreduce(i)
            assert value == i * size
            total = np.zeros(1)
            dup.Allreduce(np.ones(1), total)
            assert total[0] == size and area.completed(dup) == 2  # (allreduce, Allreduce)
            slot = dup._area.group.slot
            slots.add(slot)
            offset = geometry.coll_slot_offset(slot) // 8
            generations.append(region.u64[offset + 1])
            dup.Free()
            comm.Barrier()  # rank 0 has released it
            assert region.u64[offset] == 0, "the slot is still claimed after Free"
        assert len(slots) == 1 and generations == sorted(set(generations)), generations
        print(f"LOOP OK {slots.pop()} {len(generations)}", flush=True)
    elif mode == "exhaust":
        comm.Barrier()
        slots = comm._area.group.region.geometry.coll_slots
        dups = []
        while True:
            dup = comm.Dup()
            dups.append(dup)
            values = np.zeros(size, "i4")
            dup.Allgather(np.full(1, rank, "i4"), values)
            assert list(values) == list(range(size))
            if not dup._area:
                break
            assert len(dups) < slots, "more communicators bound than there are slots"
        assert area.completed(dup) == 0 and len(dups) == slots  # COMM_WORLD holds one
        assert dup.allreduce(rank) == sum(range(size))
        dup.Ibarrier().Wait()
        for d in dups:
            d.Free()
        again = comm.Dup()
        again.Barrier()
        assert area.completed(again) == 1
        again.Free()
        print(f"EXHAUST OK {slots}", flush=True)
    elif mode in ("kill", "ikill", "igkill"):
        comm.Barrier()
        out = np.zeros(4)
        comm.Allreduce(np.ones(4), out)  # the area is bound and working
        if rank == size - 1:
            time.sleep(0.2)  # the others are waiting in the area by now
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.monotonic()
        try:
            if mode == "kill":
                comm.Allreduce(np.ones(4), out)
            elif mode == "ikill":
                comm.Iallreduce(np.ones(4), out).Wait()
            else:
                got = np.zeros(3 * size) if rank == 0 else None
                comm.Igather(np.ones(3), got, 0).Wait()
                comm.Ialltoall(np.ones(2 * size), np.zeros(2 * size)).Wait()
        except MPI.Exception as exc:
            print(f"LOST {time.monotonic() - t0:.2f} {exc}", flush=True)
        else:
            print("NO ERROR", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
