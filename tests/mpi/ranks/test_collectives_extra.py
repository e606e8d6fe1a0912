"""Iscan/Iexscan, Ireduce_scatter(_block), Alltoallw/Ialltoallw, Split_type, Idup and user
ops in them (issue #11 point 3)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from guest_lib.mpi import MPI


def _matmul(inbuf, inoutbuf, datatype):
    """An associative, non-commutative user op: products of 2x2 int64 matrices, x op y =
    x @ y (x from the lower rank)."""
    x = np.frombuffer(inbuf, dtype="i8").reshape(-1, 2, 2)
    y = np.frombuffer(inoutbuf, dtype="i8").reshape(-1, 2, 2)
    y[...] = x @ y


MATMUL = MPI.Op.Create(_matmul, commute=False)


def _mat(rank: int) -> np.ndarray:
    return np.array([[1, rank + 1], [1, 0]], dtype="i8")


def _product(ranks) -> list[int]:
    return list(functools.reduce(np.matmul, [_mat(r) for r in ranks]).ravel())


def test_iscan_iexscan(comm):
    rank = comm.Get_rank()
    send = np.array([rank + 1, 2 * rank], "i")
    scan = np.zeros(2, "i")
    exscan = np.full(2, -7, "i")
    reqs = [comm.Iscan(send, scan, MPI.SUM), comm.Iexscan(send, exscan, MPI.SUM)]
    MPI.Request.Waitall(reqs)
    assert list(scan) == [sum(r + 1 for r in range(rank + 1)), sum(2 * r for r in range(rank + 1))]
    if rank == 0:
        assert list(exscan) == [-7, -7]
    else:
        assert list(exscan) == [sum(r + 1 for r in range(rank)), sum(2 * r for r in range(rank))]
    inplace = _mat(rank).ravel()
    comm.Iscan(MPI.IN_PLACE, inplace, MATMUL).Wait()
    assert list(inplace) == _product(range(rank + 1))


def test_ireduce_scatter(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    counts = [r + 1 for r in range(size)]
    send = np.arange(sum(counts), dtype="d") * (rank + 1)
    out = np.full(counts[rank] + 1, -1.0)
    comm.Ireduce_scatter(send, out, counts, MPI.SUM).Wait()
    start = sum(counts[:rank])
    factor = size * (size + 1) / 2
    assert list(out[:-1]) == [factor * i for i in range(start, start + counts[rank])]
    assert out[-1] == -1.0
    none_counts = np.zeros(counts[rank], "d")  # recvcounts None: each rank's recvbuf count
    comm.Ireduce_scatter(send, none_counts, None, MPI.SUM).Wait()
    assert list(none_counts) == list(out[:-1])
    block = np.zeros(4, "i8")
    comm.Ireduce_scatter_block(np.tile(_mat(rank).ravel(), size), block, MATMUL).Wait()
    assert list(block) == _product(range(size))
    inplace = np.arange(2 * size, dtype="i")
    comm.Ireduce_scatter_block(MPI.IN_PLACE, inplace, MPI.SUM).Wait()
    assert list(inplace[:2]) == [size * (2 * rank), size * (2 * rank + 1)]
    with pytest.raises(ValueError):
        comm.Ireduce_scatter(send, out, [1] * (size + 1), MPI.SUM)


@pytest.mark.parametrize("blocking", [True, False])
def test_alltoallw(comm, blocking):
    """Each destination's part has its own datatype and byte displacement: two ints to even
    ranks, a vector (ints 0 and 2) to odd ones; every rank receives two ints per peer."""
    size, rank = comm.Get_size(), comm.Get_rank()
    every_other = MPI.INT.Create_vector(2, 1, 2).Commit()  # ints 0 and 2 of 3
    sendbuf = np.arange(4 * size, dtype="i") + 100 * rank
    stypes = [MPI.INT if j % 2 == 0 else every_other for j in range(size)]
    scounts = [2 if j % 2 == 0 else 1 for j in range(size)]
    sdispls = [16 * j for j in range(size)]  # bytes: part j starts at int 4j
    recvbuf = np.full(4 * size, -1, "i")
    rtypes = [MPI.INT] * size
    rcounts = [2] * size
    rdispls = [16 * j for j in range(size)]
    smsg = [sendbuf, (scounts, sdispls), stypes]
    rmsg = [recvbuf, (rcounts, rdispls), rtypes]
    if blocking:
        comm.Alltoallw(smsg, rmsg)
    else:
        comm.Ialltoallw(smsg, rmsg).Wait()
    for j in range(size):
        first = 100 * j + 4 * rank
        expect = [first, first + 1] if rank % 2 == 0 else [first, first + 2]
        assert list(recvbuf[4 * j : 4 * j + 4]) == [*expect, -1, -1]
    inplace = np.arange(2 * size, dtype="i") + 10 * rank
    comm.Alltoallw(MPI.IN_PLACE, [inplace, ([2] * size, [8 * j for j in range(size)]),
                                  [MPI.INT] * size])  # fmt: skip
    assert list(inplace) == [v for j in range(size) for v in (10 * j + 2 * rank,
                                                               10 * j + 2 * rank + 1)]  # fmt: skip


def test_split_type_shared(comm):
    """Every rank of these jobs shares one region: COMM_TYPE_SHARED gives the whole
    communicator (ordered by key); UNDEFINED gives COMM_NULL."""
    size, rank = comm.Get_size(), comm.Get_rank()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=size - rank)
    routes = MPI._internal_state()["routes"]  # (code, peer); code 2: through mpi4py
    world = comm.Get_group().Translate_ranks(None, MPI.COMM_WORLD.Get_group())
    shares = [r for r in range(size) if routes[world[r]][0] != 2]
    assert node.Get_size() == len(shares)
    assert node.Get_rank() == len(shares) - 1 - shares.index(rank)
    assert node.allreduce(1) == len(shares)
    node.Free()
    assert comm.Split_type(MPI.UNDEFINED) == MPI.COMM_NULL
    with pytest.raises(MPI.Exception):
        comm.Split_type(12345)


def test_idup(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dup, req = comm.Idup()
    req.Wait()
    assert dup.Compare(comm) == MPI.CONGRUENT
    assert dup.allreduce(rank) == size * (size - 1) // 2
    dup.Free()


def test_idup_is_nonblocking(comm):
    """Idup returns before the other members call it (rank 0 tells them to, afterwards);
    the duplicate is null until the request completes by progress, then usable. A
    communicator made meanwhile on rank 0 (a Dup of COMM_SELF, which may take the context
    the Idup's first round proposes) keeps its own context: its message is not the dup's."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if rank == 0:
        dup, req = comm.Idup_with_info(MPI.Info.Create({"k": "v"}))
        if size > 1:
            assert not req.Test() and not dup  # the others have not called it yet
        other = MPI.COMM_SELF.Dup()
        pending = other.irecv(source=0, tag=5)
        for r in range(1, size):
            comm.send("go", r, 9)
    else:
        assert comm.recv(source=0, tag=9) == "go"
        dup, req = comm.Idup_with_info(MPI.Info.Create({"k": "v"}))
    req.Wait()
    assert dup and dup.Compare(comm) == MPI.CONGRUENT and dup.Get_info().items() == [("k", "v")]
    dup.send(("dup", rank), 0, 5)
    if rank == 0:
        other.send(("other", 0), 0, 5)
        assert pending.wait() == ("other", 0)
        assert sorted(dup.recv(source=r, tag=5) for r in range(size)) == [
            ("dup", r) for r in range(size)
        ]
        other.Free()
    assert dup.allreduce(rank) == size * (size - 1) // 2
    dup.Free()


def test_user_op_in_reductions(comm):
    """A non-commutative user op (with its datatype argument) in Reduce, Allreduce, Scan
    and the object forms: the fold is in rank order."""
    size, rank = comm.Get_size(), comm.Get_rank()
    seen = []

    def matmul(inbuf, inoutbuf, datatype):
        seen.append(datatype)
        _matmul(inbuf, inoutbuf, datatype)

    op = MPI.Op.Create(matmul, commute=False)
    assert not op.Is_commutative()
    mine = _mat(rank).ravel()
    out = np.zeros(4, "i8")
    comm.Allreduce(mine, out, op)
    assert list(out) == _product(range(size))
    out[:] = 0
    comm.Reduce(mine, out, op, root=size - 1)
    assert list(out) == (_product(range(size)) if rank == size - 1 else [0] * 4)
    comm.Scan(mine, out, op)
    assert list(out) == _product(range(rank + 1))
    if size > 1:
        assert seen and all(d == MPI.LONG for d in seen), seen  # numpy's int64
    assert comm.allreduce(str(rank), MPI.Op.Create(lambda a, b, _datatype: a + b)) == "".join(
        str(r) for r in range(size)
    )
    op.Free()
