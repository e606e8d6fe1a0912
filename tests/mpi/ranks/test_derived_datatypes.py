"""Derived datatypes: layouts, and messages of them in p2p and collectives (issue #11
point 3). Every receive checks that the bytes outside the type map are left alone."""

from __future__ import annotations

import numpy as np
import pytest

from guest_lib.mpi import MPI


def test_layouts():
    vector = MPI.INT.Create_vector(3, 2, 4)
    assert (vector.Get_size(), vector.Get_extent(), vector.Get_true_extent()) == (
        24, (0, 40), (0, 40))  # fmt: skip
    hvector = MPI.DOUBLE.Create_hvector(2, 1, 24)
    assert hvector.Get_extent() == (0, 32) and hvector.size == 16
    indexed = MPI.INT.Create_indexed([2, 1], [1, 5])
    assert indexed.Get_extent() == (4, 20) and indexed.Get_true_extent() == (4, 20)
    block = MPI.SHORT.Create_indexed_block(2, [3, 0])
    assert block.Get_extent() == (0, 10) and block.size == 8
    hindexed = MPI.FLOAT.Create_hindexed([1, 2], [8, 0])
    assert hindexed.Get_extent() == (0, 12)
    struct = MPI.Datatype.Create_struct([1, 1], [0, 8], [MPI.INT, MPI.DOUBLE])
    assert struct.Get_size() == 12 and struct.Get_extent() == (0, 16)
    padded = MPI.Datatype.Create_struct([1, 1], [0, 8], [MPI.DOUBLE, MPI.CHAR])
    assert padded.Get_extent() == (0, 16)  # rounded up to the double's alignment
    resized = MPI.INT.Create_resized(-4, 12)
    assert resized.Get_extent() == (-4, 12) and resized.Get_true_extent() == (0, 4)
    assert (resized.lb, resized.ub, resized.extent) == (-4, 8, 12)
    sub = MPI.DOUBLE.Create_subarray([4, 5], [2, 3], [1, 1])
    assert sub.Get_extent() == (0, 160) and sub.Get_size() == 48
    assert sub.Get_true_extent() == (48, 64)  # elements (1, 1) .. (2, 3)
    dup = vector.Dup()
    assert dup.Get_extent() == vector.Get_extent() and dup.Commit() is dup
    contiguous = MPI.INT.Create_contiguous(3)
    assert not contiguous.packs and contiguous.Get_extent() == (0, 12)
    with pytest.raises(ValueError):
        MPI.Datatype.Create_struct([1], [0], [MPI.INT, MPI.FLOAT])
    with pytest.raises(MPI.Exception):
        MPI.INT.Create_vector(-1, 1, 1)
    with pytest.raises(MPI.Exception):
        MPI.INT.Create_subarray([4], [3], [2])


def _ring(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    return rank, (rank + 1) % size, (rank - 1) % size


def test_vector_p2p(comm):
    """A column of a matrix (vector type) sent, received into another column."""
    rank, dest, source = _ring(comm)
    column = MPI.DOUBLE.Create_vector(6, 1, 4).Commit()
    matrix = np.arange(24, dtype="d").reshape(6, 4) + 100 * rank
    out = np.full((6, 4), -1.0)
    comm.Sendrecv([matrix.ravel()[1:], 1, column], dest, 0, [out.ravel()[2:], 1, column], source, 0)
    expect = np.full((6, 4), -1.0)
    expect[:, 2] = np.arange(24).reshape(6, 4)[:, 1] + 100 * source
    assert np.array_equal(out, expect)
    req = comm.Irecv([out, 1, column], source, 1)
    comm.Send([matrix, 1, column], dest, 1)
    status = MPI.Status()
    req.Wait(status)
    expect[:, 0] = np.arange(24).reshape(6, 4)[:, 0] + 100 * source
    assert np.array_equal(out, expect)
    assert status.Get_count(column) == 1 and status.Get_count(MPI.DOUBLE) == 6
    comm.Send([matrix.ravel()[3:], 1, column], dest, 2)  # a small message: sent at once
    comm.Recv([out.ravel()[1:], 1, column], source, 2)
    expect[:, 1] = np.arange(24).reshape(6, 4)[:, 3] + 100 * source
    assert np.array_equal(out, expect)
    column.Free()


def test_struct_and_subarray_p2p(comm):
    rank, dest, source = _ring(comm)
    record = np.dtype([("i", "i4"), ("d", "f8")], align=True)
    struct = MPI.Datatype.Create_struct([1, 1], [0, 8], [MPI.INT, MPI.DOUBLE]).Commit()
    data = np.zeros(3, record)
    data["i"], data["d"] = np.arange(3) + rank, np.arange(3) * 0.5 + rank
    got = np.zeros(3, record)
    raw = got.view(np.uint8).reshape(3, 16)
    raw[:, 4:8] = 7  # the padding: left alone
    comm.Sendrecv([data, 3, struct], dest, 2, [got, 3, struct], source, 2)
    assert list(got["i"]) == list(np.arange(3) + source)
    assert list(got["d"]) == list(np.arange(3) * 0.5 + source)
    assert np.all(raw[:, 4:8] == 7)
    sub = MPI.INT.Create_subarray([5, 6], [2, 3], [3, 2], order=MPI.ORDER_C).Commit()
    grid = np.arange(30, dtype="i").reshape(5, 6) + 1000 * rank
    into = np.zeros((5, 6), "i")
    comm.Sendrecv([grid, 1, sub], dest, 3, [into, 1, sub], source, 3)
    expect = np.zeros((5, 6), "i")
    expect[3:5, 2:5] = (np.arange(30).reshape(5, 6) + 1000 * source)[3:5, 2:5]
    assert np.array_equal(into, expect)
    fortran = MPI.INT.Create_subarray([5, 6], [2, 3], [3, 2], order=MPI.ORDER_FORTRAN)
    assert fortran.Get_extent() == (0, 120) and fortran.Get_size() == 24


def test_persistent_indexed(comm):
    rank, dest, source = _ring(comm)
    indexed = MPI.INT.Create_indexed([2, 1], [0, 4]).Commit()  # ints 0, 1, 4; extent 5
    sbuf = np.arange(10, dtype="i")
    rbuf = np.full(10, -1, "i")
    send = comm.Send_init([sbuf, 2, indexed], dest, 4)
    recv = comm.Recv_init([rbuf, 2, indexed], source, 4)
    for i in range(3):
        sbuf[:] = np.arange(10) + 10 * i + 100 * rank
        MPI.Prequest.Startall([recv, send])
        MPI.Request.Waitall([send, recv])
        base = 10 * i + 100 * source
        expect = [base + 0, base + 1, -1, -1, base + 4, base + 5, base + 6, -1, -1, base + 9]
        assert list(rbuf) == expect
    send.Free()
    recv.Free()


def test_bcast_indexed_block(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    blocks = MPI.INT.Create_indexed_block(2, [0, 3]).Commit()  # ints 0,1 and 3,4 of 5
    for root in range(size):
        buf = np.arange(10, dtype="i") if rank == root else np.full(10, -1, "i")
        comm.Bcast([buf, 2, blocks], root)
        expect = [0, 1, -1, 3, 4, 5, 6, -1, 8, 9] if rank != root else list(range(10))
        assert list(buf) == expect


def test_gather_allreduce_vector(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    every_other = MPI.INT.Create_vector(3, 1, 2).Commit()  # extent 5 ints
    mine = np.arange(6, dtype="i") + 10 * rank
    whole = np.full((size, 3), -1, "i")
    comm.Allgather([mine, 1, every_other], [whole, MPI.INT])
    for r in range(size):
        assert list(whole[r]) == [10 * r, 10 * r + 2, 10 * r + 4]
    total = np.full(6, -1, "i")
    comm.Allreduce([mine, 1, every_other], [total, 1, every_other], MPI.SUM)
    s = sum(10 * r for r in range(size))
    assert list(total) == [s, -1, s + 2 * size, -1, s + 4 * size, -1]
    resized = MPI.INT.Create_resized(0, 8).Commit()  # every other int, by extent
    spread = np.full(2 * size, -1, "i")
    comm.Gather([np.array([rank], "i"), 1, MPI.INT], [spread, 1, resized], root=0)
    if rank == 0:
        assert list(spread[::2]) == list(range(size)) and np.all(spread[1::2] == -1)


def test_envelope_decode_pickle(comm):
    """Every constructor's envelope/contents/decode, remade from decode and sent between
    ranks pickled (the receiver rebuilds the type and uses it)."""
    rank, dest, source = _ring(comm)
    made = [
        MPI.INT.Dup(),
        MPI.INT.Create_contiguous(3),
        MPI.INT.Create_vector(2, 1, 3),
        MPI.INT.Create_hvector(2, 1, 12),
        MPI.INT.Create_indexed([1, 2], [0, 3]),
        MPI.INT.Create_hindexed([1, 2], [0, 12]),
        MPI.INT.Create_indexed_block(2, [0, 3]),
        MPI.INT.Create_hindexed_block(2, [0, 12]),
        MPI.Datatype.Create_struct([1, 2], [0, 4], [MPI.INT, MPI.INT]),
        MPI.INT.Create_subarray([4], [2], [1]),
        MPI.INT.Create_resized(0, 16),
    ]
    envelopes = [(0, 0, 0, 1), (1, 0, 0, 1), (3, 0, 0, 1), (2, 1, 0, 1), (5, 0, 0, 1),
                 (3, 2, 0, 1), (4, 0, 0, 1), (2, 2, 0, 1), (3, 2, 0, 2), (5, 0, 0, 1),
                 (0, 2, 0, 1)]  # fmt: skip
    for datatype, envelope in zip(made, envelopes, strict=True):
        assert datatype.Get_envelope()[:4] == envelope and not datatype.is_predefined
        ints, addresses, counts, types = datatype.Get_contents()
        assert (len(ints), len(addresses), len(counts), len(types)) == envelope
        old, combiner, params = datatype.decode()
        again = (MPI.Datatype.Create_struct(**params) if combiner == "STRUCT" else
                 getattr(old, "Create_" + combiner.lower())(**params))  # fmt: skip
        assert again.Get_extent() == datatype.Get_extent() and again.size == datatype.size
        assert datatype.combiner == getattr(MPI, "COMBINER_" + combiner)
    assert MPI.INT.decode() == (MPI.INT, "NAMED", {}) and MPI.INT.Get_envelope()[4] == 1
    sent = comm.sendrecv(made, dest, 5, None, source, 5)
    for mine, theirs in zip(made, sent, strict=True):
        assert theirs.decode()[1:] == mine.decode()[1:] and theirs != mine
    column = sent[2].Commit()  # ints 0 and 3
    data = np.arange(8, dtype="i") + 10 * rank
    got = np.full(8, -1, "i")
    comm.Sendrecv([data, 2, column], dest, 6, [got, 2, column], source, 6)
    base = 10 * source
    assert list(got) == [base, -1, -1, base + 3, base + 4, -1, -1, base + 7]
    assert MPI.Datatype(MPI.INT) == MPI.INT and MPI.Datatype(MPI.INT) is not MPI.INT
    assert MPI.Datatype() == MPI.DATATYPE_NULL and not MPI.Datatype()
