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


def _owned(g: int, kind: int, darg: int, p: int, c: int) -> list[int]:
    """The global indices process coordinate `c` of `p` owns in a dimension of `g`: the
    rules of MPI's darray written out plainly (the reference for Create_darray)."""
    if kind == MPI.DISTRIBUTE_NONE:
        return list(range(g))
    if kind == MPI.DISTRIBUTE_BLOCK:
        block = (g + p - 1) // p if darg == MPI.DISTRIBUTE_DFLT_DARG else darg
        return [i for i in range(g) if c * block <= i < (c + 1) * block]
    block = 1 if darg == MPI.DISTRIBUTE_DFLT_DARG else darg
    return [i for i in range(g) if (i // block) % p == c]


@pytest.mark.parametrize("order", ["C", "F"])
def test_darray_assembles_the_global_array(comm, order):
    """Each rank sends its darray part of a global array as a dense local array; rank 0
    receives every part through that rank's darray type into one global array: it must
    come out whole, and each local part must be what numpy's indexing gives."""
    size, rank = comm.Get_size(), comm.Get_rank()
    mpi_order = MPI.ORDER_C if order == "C" else MPI.ORDER_FORTRAN
    gsizes = [5, 7]
    psizes = MPI.Compute_dims(size, [0, 0])
    layouts = [
        ([MPI.DISTRIBUTE_BLOCK, MPI.DISTRIBUTE_CYCLIC], [MPI.DISTRIBUTE_DFLT_DARG, 2]),
        ([MPI.DISTRIBUTE_CYCLIC, MPI.DISTRIBUTE_BLOCK], [1, MPI.DISTRIBUTE_DFLT_DARG]),
    ]
    if psizes[1] == 1:
        layouts.append(([MPI.DISTRIBUTE_BLOCK, MPI.DISTRIBUTE_NONE], [5, MPI.DISTRIBUTE_DFLT_DARG]))
    world = np.arange(35, dtype="d").reshape(gsizes, order=order) + 0.5
    for distribs, dargs in layouts:
        types = [
            MPI.DOUBLE.Create_darray(size, r, gsizes, distribs, dargs, psizes, mpi_order).Commit()
            for r in range(size)
        ]
        assert types[rank].Get_extent() == (0, 35 * 8)
        coords = [rank // psizes[1], rank % psizes[1]]
        rows, cols = (_owned(g, k, d, p, c) for g, k, d, p, c in
                      zip(gsizes, distribs, dargs, psizes, coords, strict=True))  # fmt: skip
        local = np.ascontiguousarray(world[np.ix_(rows, cols)]).ravel(order=order)
        assert types[rank].Get_size() == local.nbytes
        packed = bytearray(local.nbytes)
        types[rank].Pack(world.ravel(order="K"), packed, 0, comm)  # the array's own order
        assert bytes(packed) == local.tobytes()
        if rank == 0:
            got = np.full(35, -1.0)
            requests = [comm.Irecv([got, 1, types[r]], r, 7) for r in range(size)]
            comm.Send([local, MPI.DOUBLE], 0, 7)
            MPI.Request.Waitall(requests)
            assert np.array_equal(got, world.ravel(order="K"))
        else:
            comm.Send([local, MPI.DOUBLE], 0, 7)
    if comm.Get_size() == 1:
        return
    with pytest.raises(MPI.Exception):  # a grid that is not the communicator's
        MPI.DOUBLE.Create_darray(size, rank, gsizes, distribs, dargs, [size + 1, 1])


def test_bottom_struct_over_several_arrays(comm):
    """A struct type of absolute addresses (Get_address) over three separate numpy arrays,
    sent and received with MPI.BOTTOM between ranks, blocking and nonblocking."""
    rank, dest, source = _ring(comm)
    ints = np.arange(4, dtype="i") + 100 * rank
    reals = np.linspace(0, 1, 3) + rank
    flags = np.array([rank % 2 == 0, True], dtype="?")
    parts = [ints, reals, flags]
    send_type = MPI.Datatype.Create_struct(
        [4, 3, 2], [MPI.Get_address(a) for a in parts], [MPI.INT, MPI.DOUBLE, MPI.C_BOOL]
    ).Commit()
    into = [np.full(4, -1, "i"), np.full(3, -1.0), np.zeros(2, "?")]
    recv_type = MPI.Datatype.Create_struct(
        [4, 3, 2], [MPI.Get_address(a) for a in into], [MPI.INT, MPI.DOUBLE, MPI.C_BOOL]
    ).Commit()
    comm.Sendrecv([MPI.BOTTOM, 1, send_type], dest, 8, [MPI.BOTTOM, 1, recv_type], source, 8)
    assert list(into[0]) == list(np.arange(4) + 100 * source)
    assert np.allclose(into[1], np.linspace(0, 1, 3) + source)
    assert list(into[2]) == [source % 2 == 0, True]
    for array in into:
        array[...] = 0
    request = comm.Irecv([MPI.BOTTOM, 1, recv_type], source, 9)
    comm.Send([MPI.BOTTOM, 1, send_type], dest, 9)
    request.Wait()
    assert list(into[0]) == list(np.arange(4) + 100 * source)
    assert MPI.Get_address(MPI.BOTTOM) == 0


def test_pack_external32_is_big_endian_canonical(comm):
    """Pack/Unpack round trips, and external32 is MPI's canonical form: big-endian, LONG
    4 bytes, a long double as an IEEE quad."""
    data = np.array([1, -2, 3], dtype="i")
    size = MPI.INT.Pack_size(3, comm)
    assert size == 12
    out = bytearray(size + 8)
    end = MPI.INT.Pack(data, out, 4, comm)
    assert end == 16 and bytes(out[4:16]) == data.tobytes()
    back = np.zeros(3, "i")
    assert MPI.INT.Unpack(out, 4, back, comm) == 16 and list(back) == [1, -2, 3]
    with pytest.raises(MPI.Exception):
        MPI.INT.Pack(data, bytearray(8), 0, comm)
    assert MPI.LONG.Pack_external_size("external32", 2) == 8
    ext = bytearray(8)
    MPI.LONG.Pack_external("external32", np.array([1, -1], "l"), ext, 0)
    assert bytes(ext) == b"\x00\x00\x00\x01\xff\xff\xff\xff"
    quad = bytearray(16)
    MPI.LONG_DOUBLE.Pack_external("external32", np.array([1.5], "g"), quad, 0)
    assert bytes(quad) == bytes.fromhex("3fff8000000000000000000000000000")
    column = MPI.DOUBLE.Create_vector(2, 1, 3)
    ext = bytearray(column.Pack_external_size("external32", 1))
    MPI.DOUBLE.Create_vector(2, 1, 3).Pack_external("external32", np.arange(4.0), ext, 0)
    assert bytes(ext) == np.array([0.0, 3.0], ">f8").tobytes()
    got = np.zeros(4)
    column.Unpack_external("external32", ext, 0, got)
    assert list(got) == [0.0, 0.0, 0.0, 3.0]
    with pytest.raises(MPI.Exception):
        MPI.LONG.Pack_external("external32", np.array([1 << 40], "l"), bytearray(4), 0)


def test_f90_match_size_and_codes():
    assert MPI.Datatype.Create_f90_integer(4).size == 2
    real = MPI.Datatype.Create_f90_real(15, 300)
    assert real.size == 8 and real.combiner == MPI.COMBINER_F90_REAL and real.is_predefined
    assert real.decode()[1:] == ("F90_REAL", {"p": 15, "r": 300})
    assert MPI.Datatype.Create_f90_complex(6, 30).tocode() == "c8"
    with pytest.raises(MPI.Exception):
        MPI.Datatype.Create_f90_integer(40)
    assert MPI.Datatype.Match_size(MPI.TYPECLASS_REAL, 8) == MPI.REAL8
    assert MPI.Datatype.Get_value_index(MPI.DOUBLE, MPI.INT) == MPI.DOUBLE_INT
    assert MPI.INT32_T.tocode() == "i4" and MPI.INT32_T.typechar == "i"
    assert MPI.INT.Get_name() == "MPI_INT" and MPI._typealign(MPI.DOUBLE) == 8
    vector = MPI.DOUBLE.Create_vector(2, 1, 2)
    assert vector.typestr == "V24" and MPI._typecode(vector) is None
    assert MPI.BYTE.Create_contiguous(1 << 32).decode()[1] == "STRUCT"  # MPI-3 large count


def test_bottom_alltoallw(comm):
    """Alltoallw with MPI.BOTTOM: each rank's part to and from every rank in its own numpy
    array, the displacements their absolute addresses; then the w-form's default (no
    counts or displacements: one element of each type at byte 0), which BOTTOM refuses."""
    size, rank = comm.Get_size(), comm.Get_rank()
    send = [np.full(2, 10 * rank + j, "i") for j in range(size)]
    recv = [np.full(2, -1, "i") for _ in range(size)]
    smsg = [MPI.BOTTOM, [2] * size, [MPI.Get_address(a) for a in send], [MPI.INT] * size]
    rmsg = [MPI.BOTTOM, ([2] * size, [MPI.Get_address(a) for a in recv]), [MPI.INT] * size]
    comm.Alltoallw(smsg, rmsg)
    assert [list(r) for r in recv] == [[10 * j + rank] * 2 for j in range(size)]
    out = np.full(2, -1, "i")  # the default form, where parts cannot overlap: one rank
    MPI.COMM_SELF.Alltoallw([np.array([rank + 5, 9], "i"), [MPI.INT]], [out, [MPI.INT]])
    assert list(out) == [rank + 5, -1]
    with pytest.raises(ValueError):
        comm.Alltoallw([MPI.BOTTOM, [MPI.INT] * size], rmsg)


def test_free_nulls_the_handle_not_what_was_made_from_it(comm):
    """Datatype.Free makes the handle DATATYPE_NULL (a second Free raises ERR_TYPE); a
    struct, a vector and a Dup made from the freed type still work (MPI: freeing a type
    does not affect those built from it); the handles decode and Get_contents give are new
    ones, which the caller may free without harm."""
    rank, size = comm.Get_rank(), comm.Get_size()
    pair = MPI.Datatype.Create_struct([1, 1], [0, 8], [MPI.INT, MPI.DOUBLE])
    vector = pair.Create_vector(3, 1, 2).Commit()
    twice = MPI.Datatype.Create_struct([1, 1], [0, 16], [pair, pair]).Commit()
    dup = pair.Dup()
    second = MPI.Datatype(pair)  # another handle on it: stays as it was
    pair.Free()
    assert pair == MPI.DATATYPE_NULL and not pair
    assert second.Get_size() == 12 and dup.Get_size() == 12
    with pytest.raises(MPI.Exception) as error:
        pair.Free()
    assert error.value.Get_error_class() == MPI.ERR_TYPE
    old, combiner, params = twice.decode()
    for handle in params["datatypes"][:1]:
        handle.Free()
    for handle in vector.Get_contents()[3]:
        handle.Free()
    assert old == MPI.DATATYPE_NULL and combiner == "STRUCT"
    assert twice.Get_size() == 24 and twice.Get_extent() == (0, 32)
    dest, source = (rank + 1) % size, (rank - 1) % size

    def pairs(value: int) -> np.ndarray:  # 6 pairs of 16 bytes: an int, a double at 8
        data = np.zeros(12, "d")
        data.view("i4")[0::4] = value + 1
        data[1::2] = value + 0.5
        return data

    got = np.zeros(12, "d")
    comm.Sendrecv([pairs(rank), 1, vector], dest, 9, [got, 1, vector], source, 9)
    expect = np.zeros(12, "d")
    for k in (0, 2, 4):  # the vector: every other pair of 5
        expect[2 * k : 2 * k + 2] = pairs(source)[2 * k : 2 * k + 2]
    assert np.array_equal(got, expect)
    got[:] = 0
    comm.Sendrecv([pairs(rank), 1, twice], dest, 10, [got, 1, twice], source, 10)
    assert np.array_equal(got[:4], pairs(source)[:4]) and not got[4:].any()
    for made in (vector, twice, dup):
        made.Free()
