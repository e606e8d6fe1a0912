"""Collectives with buffers."""

from __future__ import annotations

import numpy as np
import pytest

from guest_lib.mpi import MPI, area, buffers
from ivshmem_comm import layout

TYPECODES = "ilfd"


@pytest.mark.parametrize("typecode", TYPECODES)
def test_bcast(comm, typecode):
    size, rank = comm.Get_size(), comm.Get_rank()
    for root in range(size):
        for count in (0, 1, 100, 300_000):
            buf = np.arange(count, dtype=typecode) if rank == root else np.zeros(count, typecode)
            comm.Bcast(buf, root)
            assert np.array_equal(buf, np.arange(count, dtype=typecode))


def _shm_bytes_sent() -> int:
    """Bytes this rank has sent into its region's queues so far (0 without a region)."""
    ep = MPI._internal_state()["endpoint"]
    if ep is None:
        return 0
    region = ep.region
    return sum(
        region.queue_counters(ep.peer_id, other)["sent_bytes"]
        for other in range(region.max_peers)
        if other != ep.peer_id
    )


def test_bcast_large_is_written_once(comm):
    """A large Bcast among ranks of one region: the root writes the data into shared memory
    once (in the collective area's slab, or without one in message pieces of at most
    4 MiB), the others only read it (and acknowledge)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    expect = np.arange(5 << 20, dtype=np.uint8)  # 5 MiB: two pieces
    one_region = all(route != 2 for route, _ in MPI._internal_state()["routes"])  # no mpi4py
    for root in range(size):
        buf = expect.copy() if rank == root else np.zeros_like(expect)
        before, in_area = _shm_bytes_sent(), area.completed(comm)
        comm.Bcast(buf, root)
        sent = _shm_bytes_sent() - before
        assert np.array_equal(buf, expect)
        if area.completed(comm) > in_area:  # the collective area: each piece written once
            assert sent < 4096, sent  # into the root's slab, nothing through messages
        elif size >= 3 and one_region:
            if rank == root:
                assert expect.nbytes <= sent < expect.nbytes + 4096, sent
            else:
                assert sent < 4096, sent


@pytest.mark.parametrize("extra", [0, 8])
@pytest.mark.parametrize("call", ["Bcast", "Allgather", "Scatter", "Alltoall"])
def test_payloads_at_the_slab_limit(comm, call, extra):
    """Payloads of exactly what one round of the area holds (a Bcast or an Allgather block of
    a slab, a Scatter or Alltoall block of a segment) run in the area with nothing through the
    queues; 8 bytes more take messages (a Scatter: 8 more than a root takes in the
    area, see CollectiveGroup.scatterv); the data is right either way (1, 2 and 4 ranks).
    Fit gives slabs of a power of two for a region of a power of two (test_collective_area),
    so such payloads are where the limit lies."""
    size, rank = comm.Get_size(), comm.Get_rank()
    shared = area.current(comm)
    if shared is None:
        comm.Barrier()  # (binds the area at the first collective)
        shared = area.current(comm)
    group = shared.group if shared else None
    limit = {
        "Bcast": group.slab_size if group else 1 << 18,
        "Allgather": group.slab_size if group else 1 << 18,
        "Scatter": group._scatter_segment() if group else 1 << 17,
        "Alltoall": group._scatter_segment() if group else 1 << 17,
    }[call]
    if call == "Scatter" and extra:  # (a root takes up to COLL_CELLS rounds)
        limit *= layout.COLL_CELLS
    n = limit + extra
    blocks = size if call in ("Allgather", "Alltoall") or rank == 0 else 1
    send = (np.arange(n * blocks, dtype=np.uint64) * 7 + rank).astype(np.uint8)
    before, in_area = _shm_bytes_sent(), area.completed(comm)
    if call == "Bcast":
        buf = send[:n].copy() if rank == 0 else np.zeros(n, np.uint8)
        comm.Bcast(buf, 0)
        want = (np.arange(n, dtype=np.uint64) * 7).astype(np.uint8)
    elif call == "Allgather":
        buf = np.zeros(n * size, np.uint8)
        comm.Allgather(send[:n], buf)
        want = np.concatenate([(np.arange(n, dtype=np.uint64) * 7 + r).astype(np.uint8)
                               for r in range(size)])  # fmt: skip
    elif call == "Scatter":
        buf = np.zeros(n, np.uint8)
        comm.Scatter(send if rank == 0 else None, buf, 0)
        want = (np.arange(n * rank, n * (rank + 1), dtype=np.uint64) * 7).astype(np.uint8)
    else:
        buf = np.zeros(n * size, np.uint8)
        comm.Alltoall(send, buf)
        want = np.concatenate([
            (np.arange(n * rank, n * (rank + 1), dtype=np.uint64) * 7 + r).astype(np.uint8)
            for r in range(size)
        ])  # fmt: skip
    assert np.array_equal(buf, want)
    sent = _shm_bytes_sent() - before
    if group is None or size == 1:
        return
    if extra == 0:
        assert area.completed(comm) == in_area + 1
        assert sent < 4096, sent  # the payload went through the slabs alone
    elif rank == 0 or call in ("Allgather", "Alltoall"):  # a sender: on messages
        assert sent >= n, sent


@pytest.mark.parametrize("typecode", TYPECODES)
def test_gather_scatter(comm, typecode):
    size, rank = comm.Get_size(), comm.Get_rank()
    for root in range(size):
        sbuf = np.full(3, rank, typecode)
        rbuf = np.full(3 * size, -1, typecode) if rank == root else None
        comm.Gather(sbuf, rbuf, root)
        if rank == root:
            assert np.array_equal(rbuf, np.repeat(np.arange(size, dtype=typecode), 3))
        sbuf = np.repeat(np.arange(size, dtype=typecode), 2) if rank == root else None
        rbuf = np.full(2, -1, typecode)
        comm.Scatter(sbuf, rbuf, root)
        assert list(rbuf) == [rank, rank]


def test_gatherv_scatterv_allgatherv(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    counts = [r + 1 for r in range(size)]
    displs = [sum(counts[:r]) for r in range(size)]
    sbuf = np.full(rank + 1, rank, "d")
    rbuf = np.full(sum(counts), -1.0)
    comm.Gatherv(sbuf, [rbuf, counts, displs, MPI.DOUBLE], root=0)
    expect = np.concatenate([np.full(r + 1, r, "d") for r in range(size)])
    if rank == 0:
        assert np.array_equal(rbuf, expect)
    rbuf[:] = -1
    comm.Allgatherv(sbuf, [rbuf, counts, displs, MPI.DOUBLE])
    assert np.array_equal(rbuf, expect)
    part = np.zeros(rank + 1)
    comm.Scatterv([expect, counts, displs, MPI.DOUBLE] if rank == 0 else None, part, root=0)
    assert list(part) == [rank] * (rank + 1)


@pytest.mark.parametrize("typecode", TYPECODES)
def test_allgather_alltoall(comm, typecode):
    size, rank = comm.Get_size(), comm.Get_rank()
    rbuf = np.full(2 * size, -1, typecode)
    comm.Allgather(np.full(2, rank, typecode), rbuf)
    assert np.array_equal(rbuf, np.repeat(np.arange(size, dtype=typecode), 2))
    rbuf[:] = rank
    comm.Allgather(MPI.IN_PLACE, rbuf) if size == 1 else None
    sbuf = np.array([rank * 100 + d for d in range(size)], typecode)
    rbuf = np.full(size, -1, typecode)
    comm.Alltoall(sbuf, rbuf)
    assert list(rbuf) == [src * 100 + rank for src in range(size)]


def test_alltoall_in_place_larger_than_a_slab_then_allreduce(comm):
    """In the area a large alltoall is declined after one round that already wrote into
    recvbuf: in place, the message path must send the data as it was before; and the
    collective after it must run once (an in-place Allreduce run twice doubles)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    for n in (8, 300_000):
        buf = np.empty((size, n), np.uint8)
        for dest in range(size):
            buf[dest] = (rank * 7 + dest * 13) % 251
        comm.Alltoall(MPI.IN_PLACE, buf)
        for src in range(size):
            assert (buf[src] == (src * 7 + rank * 13) % 251).all(), (n, src)
        total = np.full(4, rank + 1, "i")
        comm.Allreduce(MPI.IN_PLACE, total, MPI.SUM)
        assert list(total) == [size * (size + 1) // 2] * 4


@pytest.mark.parametrize("typecode", TYPECODES)
@pytest.mark.parametrize("op", [MPI.SUM, MPI.PROD, MPI.MAX, MPI.MIN])
def test_reduce_allreduce(comm, typecode, op):
    size, rank = comm.Get_size(), comm.Get_rank()
    for count in (1, 10, 1000):
        sbuf = np.full(count, rank + 1, typecode)
        values = np.arange(1, size + 1, dtype=typecode)
        expect = {"SUM": values.sum(), "PROD": values.prod(), "MAX": values.max(),
                  "MIN": values.min()}[op.name]  # fmt: skip
        for root in range(size):
            rbuf = np.zeros(count, typecode)
            comm.Reduce(sbuf, rbuf if rank == root else None, op, root)
            if rank == root:
                assert np.all(rbuf == expect)
        rbuf = np.zeros(count, typecode)
        comm.Allreduce(sbuf, rbuf, op)
        assert np.all(rbuf == expect)
        rbuf = sbuf.copy()
        comm.Allreduce(MPI.IN_PLACE, rbuf, op)
        assert np.all(rbuf == expect)


def _blocks(counts: list[int]) -> list[np.ndarray]:
    return [np.arange(c, dtype="d") + 1000 * r for r, c in enumerate(counts)]


@pytest.mark.parametrize("vector", [False, True], ids=["array", "vector"])
@pytest.mark.parametrize("in_place", [False, True], ids=["buffers", "IN_PLACE"])
def test_allgather_over_a_slab_parses_its_spec_once(comm, in_place, vector, monkeypatch):
    """Allgather(v) of blocks over a slab of the area (messages): the right blocks, for a
    plain array (equal blocks) and a vector spec, IN_PLACE or not; the receive spec parsed
    once per call (the area's plan and the messages share it: it was parsed twice)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    parses = []
    parse_vector = buffers.parse_vector

    def counted(*args, **kwargs):
        parses.append(args)
        return parse_vector(*args, **kwargs)

    monkeypatch.setattr(buffers, "parse_vector", counted)
    n = 70_000  # float64 per block: 560 KB, over any slab
    counts = [n + 7 * r for r in range(size)] if vector else [n] * size
    displs = [sum(counts[:r]) for r in range(size)]
    blocks = _blocks(counts)
    rbuf = np.zeros(sum(counts))
    if in_place:
        rbuf[displs[rank] :][: counts[rank]] = blocks[rank]
    send = MPI.IN_PLACE if in_place else blocks[rank]
    comm.Allgather(send, [rbuf, (counts, displs), MPI.DOUBLE] if vector else rbuf)
    assert np.array_equal(rbuf, np.concatenate(blocks))
    assert len(parses) <= 1, len(parses)


def test_allreduce_large(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    sbuf = np.arange(1_000_000, dtype="d") * (rank + 1)
    rbuf = np.empty_like(sbuf)
    comm.Allreduce(sbuf, rbuf, MPI.SUM)
    assert np.array_equal(rbuf, np.arange(1_000_000, dtype="d") * (size * (size + 1) // 2))


@pytest.mark.parametrize("count", [100_003, 1 << 20])
def test_allreduce_large_blocks(comm, count):
    """Large operands (reduce-scatter + allgather): uneven blocks, IN_PLACE, MAXLOC, and the
    very same bits on every rank for a floating-point sum."""
    rank = comm.Get_rank()
    sbuf = np.random.default_rng(rank).random(count)
    rbuf = np.empty_like(sbuf)
    comm.Allreduce(sbuf, rbuf, MPI.SUM)
    everyone = comm.allgather(sbuf)
    assert np.allclose(rbuf, np.sum(everyone, axis=0), rtol=1e-12, atol=0)
    assert all(r.tobytes() == rbuf.tobytes() for r in comm.allgather(rbuf))
    inplace = sbuf.copy()
    comm.Allreduce(MPI.IN_PLACE, inplace, MPI.MAX)
    assert np.array_equal(inplace, np.max(everyone, axis=0))
    pairs = np.zeros(count // 4, MPI.DOUBLE_INT.dtype)
    pairs["v"] = sbuf[: count // 4]
    pairs["i"] = rank
    best = np.zeros_like(pairs)
    comm.Allreduce(pairs, [best, MPI.DOUBLE_INT], MPI.MAXLOC)
    values = np.array([e[: count // 4] for e in everyone])
    assert np.array_equal(best["v"], values.max(axis=0))
    assert np.array_equal(best["i"], values.argmax(axis=0))


def test_bitwise_logical(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    rbuf = np.zeros(1, "i")
    comm.Allreduce(np.array([1 << rank], "i"), rbuf, MPI.BOR)
    assert rbuf[0] == (1 << size) - 1
    comm.Allreduce(np.array([rank == 0], "i"), rbuf, MPI.LAND)
    assert rbuf[0] == (1 if size == 1 else 0)
    comm.Allreduce(np.array([rank == 0], "i"), rbuf, MPI.LOR)
    assert rbuf[0] == 1


def test_maxloc_minloc(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dtype = MPI.DOUBLE_INT.dtype
    sbuf = np.zeros(2, dtype)
    sbuf["v"] = [rank % 2, -rank]
    sbuf["i"] = rank
    rbuf = np.zeros(2, dtype)
    comm.Allreduce(sbuf, [rbuf, MPI.DOUBLE_INT], MPI.MAXLOC)
    assert rbuf["v"][0] == (1 if size > 1 else 0) and rbuf["i"][0] == (1 if size > 1 else 0)
    assert rbuf["v"][1] == 0 and rbuf["i"][1] == 0
    comm.Allreduce(sbuf, [rbuf, MPI.DOUBLE_INT], MPI.MINLOC)
    assert rbuf["i"][1] == size - 1 and rbuf["v"][1] == -(size - 1)


def test_reduce_scatter_block(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    sbuf = np.arange(3 * size, dtype="d") + rank
    rbuf = np.zeros(3)
    comm.Reduce_scatter_block(sbuf, rbuf, MPI.SUM)
    base = np.arange(3 * size, dtype="d")[3 * rank : 3 * rank + 3]
    assert np.array_equal(rbuf, base * size + sum(range(size)))


def test_scan_exscan(comm):
    rank = comm.Get_rank()
    rbuf = np.zeros(4, "i")
    comm.Scan(np.full(4, rank + 1, "i"), rbuf, MPI.SUM)
    assert list(rbuf) == [sum(range(1, rank + 2))] * 4
    rbuf[:] = -7
    comm.Exscan(np.full(4, rank + 1, "i"), rbuf, MPI.SUM)
    assert list(rbuf) == ([-7] * 4 if rank == 0 else [sum(range(1, rank + 1))] * 4)


def test_barrier(comm):
    for _ in range(10):
        comm.Barrier()


def test_nonblocking_collectives_overlap_point_to_point(comm):
    """Ibarrier returns before the others arrive: rank 0 starts it, then sends to everyone,
    who receive before they start theirs (blocking inside Ibarrier would deadlock here)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    token = np.zeros(1, "i")
    if rank == 0:
        barrier = comm.Ibarrier()
        for other in range(1, size):
            comm.Send(np.array([7], "i"), other, 30)
    else:
        comm.Recv(token, 0, 30)
        assert token[0] == 7
        barrier = comm.Ibarrier()
    barrier.Wait()


def test_nonblocking_collectives_in_flight_together(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    data = np.arange(50_000, dtype="d") if rank == size - 1 else np.zeros(50_000)
    operand = np.random.default_rng(rank).random(1000)
    total = np.empty_like(operand)
    inplace = np.full(10, float(rank))
    requests = [
        comm.Ibcast(data, size - 1),
        comm.Iallreduce(operand, total, MPI.SUM),
        comm.Ibarrier(),
        comm.Iallreduce(MPI.IN_PLACE, inplace, MPI.MAX),
    ]
    for request in reversed(requests):  # completed in any order
        request.Wait()
    assert np.array_equal(data, np.arange(50_000, dtype="d"))
    assert np.allclose(total, np.sum(comm.allgather(operand), axis=0), rtol=1e-12, atol=0)
    assert all(t.tobytes() == total.tobytes() for t in comm.allgather(total))
    assert np.all(inplace == size - 1)
    blocking = np.empty_like(operand)
    comm.Allreduce(operand, blocking, MPI.SUM)  # blocking and nonblocking ones do not mix
    assert np.allclose(blocking, total)


def test_nonblocking_gather_scatter_allgather_alltoall_reduce(comm):
    """Each nonblocking collective gives what its blocking form gives, all five in flight at
    once and completed in reverse order."""
    size, rank = comm.Get_size(), comm.Get_rank()
    root = size - 1
    gathered = np.full(3 * size, -1, "i") if rank == root else None
    scattered = np.full(2, -1, "i")
    everyone = np.full(2 * size, -1, "i")
    exchanged = np.full(size, -1, "i")
    reduced = np.zeros(4) if rank == root else None
    operand = np.random.default_rng(rank + 7).random(4)
    requests = [
        comm.Igather(np.full(3, rank, "i"), gathered, root),
        comm.Iscatter(
            np.repeat(np.arange(size, dtype="i"), 2) if rank == root else None, scattered, root
        ),
        comm.Iallgather(np.full(2, rank, "i"), everyone),
        comm.Ialltoall(np.array([rank * 100 + d for d in range(size)], "i"), exchanged),
        comm.Ireduce(operand, reduced, MPI.SUM, root),
    ]
    MPI.Request.Waitall(requests[::-1])
    if rank == root:
        assert np.array_equal(gathered, np.repeat(np.arange(size, dtype="i"), 3))
        expect = np.zeros(4)
        comm.Reduce(operand, expect, MPI.SUM, root)
        assert np.allclose(reduced, expect)
    else:
        comm.Reduce(operand, None, MPI.SUM, root)
    assert list(scattered) == [rank, rank]
    assert np.array_equal(everyone, np.repeat(np.arange(size, dtype="i"), 2))
    assert list(exchanged) == [src * 100 + rank for src in range(size)]
