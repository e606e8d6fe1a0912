"""Point-to-point with buffers and mpi4py's message specs."""

from __future__ import annotations

import array
import mmap

import numpy as np
import pytest

from guest_lib.mpi import MPI

TYPECODES = "bhilqBHILQfd"


def ring(comm: MPI.Intracomm) -> tuple[int, int, int, int]:
    size, rank = comm.Get_size(), comm.Get_rank()
    return size, rank, (rank + 1) % size, (rank - 1) % size


@pytest.mark.parametrize("typecode", TYPECODES)
def test_sendrecv_typecodes(comm, typecode):
    _, rank, dest, source = ring(comm)
    for count in (0, 1, 7, 1000):
        sbuf = np.arange(count, dtype=typecode) + rank
        rbuf = np.zeros(count, dtype=typecode)
        status = MPI.Status()
        comm.Sendrecv(sbuf, dest, 1, rbuf, source, 1, status)
        assert np.array_equal(rbuf, np.arange(count, dtype=typecode) + source)
        assert status.Get_count(MPI.TypeDict[typecode]) == count
        assert status.Get_source() == source


@pytest.mark.parametrize("count", [0, 1, 100, 100_000, 2_500_000])
def test_isend_irecv_sizes(comm, count):
    _, rank, dest, source = ring(comm)
    sbuf = np.full(count, rank + 1, np.float64)
    rbuf = np.zeros(count, np.float64)
    rreq = comm.Irecv(rbuf, source, 2)
    sreq = comm.Isend(sbuf, dest, 2)
    MPI.Request.Waitall([sreq, rreq])
    assert count == 0 or (rbuf[0] == source + 1 and rbuf[-1] == source + 1)


def test_blocking_send_recv(comm):
    size, rank, dest, source = ring(comm)
    sbuf = np.arange(10, dtype="i") * (rank + 1)
    rbuf = np.empty(10, dtype="i")
    if size == 1 or rank % 2 == 0:
        comm.Send(sbuf, dest, 3)
        comm.Recv(rbuf, source, 3)
    else:
        comm.Recv(rbuf, source, 3)
        comm.Send(sbuf, dest, 3)
    assert np.array_equal(rbuf, np.arange(10, dtype="i") * (source + 1))


def test_exchange_huge_nonblocking(comm):
    """Both directions at once, far larger than any queue: must not deadlock."""
    _, rank, dest, source = ring(comm)
    sbuf = np.full(4_000_000, rank, np.float64)  # 32 MB
    rbuf = np.empty_like(sbuf)
    rreq = comm.Irecv(rbuf, source, 4)
    sreq = comm.Isend(sbuf, dest, 4)
    MPI.Request.Waitall([sreq, rreq])
    assert rbuf[0] == source and rbuf[-1] == source
    comm.Sendrecv(sbuf, dest, 5, rbuf, source, 5)
    assert rbuf[2_000_000] == source


def test_message_specs(comm):
    _, rank, dest, source = ring(comm)
    data = np.arange(10, dtype="i") + 100 * rank
    specs = [
        (data, np.empty(10, "i"), slice(None)),
        ([data, MPI.INT], [np.empty(10, "i"), MPI.INT], slice(None)),
        ([data, "i"], [np.empty(10, "i"), "i"], slice(None)),
        ([data, 4, MPI.INT], [np.empty(10, "i"), 4, MPI.INT], slice(0, 4)),
        ([data, (3, 2), MPI.INT], [np.empty(10, "i"), (3, 2), MPI.INT], slice(2, 5)),
        ([data, 3, 5, MPI.INT], [np.empty(10, "i"), 3, 5, MPI.INT], slice(5, 8)),
    ]
    for send, recv, part in specs:
        comm.Sendrecv(send, dest, 6, recv, source, 6)
        rbuf = recv[0] if isinstance(recv, list) else recv
        assert np.array_equal(rbuf[part], (np.arange(10, dtype="i") + 100 * source)[part])


def test_python_buffers(comm):
    _, rank, dest, source = ring(comm)
    rb1, rb2, rb3 = bytearray(5), memoryview(bytearray(5)), array.array("d", [0.0] * 3)
    comm.Sendrecv(bytes([rank]) * 5, dest, 7, rb1, source, 7)
    comm.Sendrecv(bytearray([rank]) * 5, dest, 7, rb2, source, 7)
    comm.Sendrecv(array.array("d", [rank] * 3), dest, 7, rb3, source, 7)
    assert rb1 == bytes([source]) * 5 and rb2.tobytes() == bytes([source]) * 5
    assert list(rb3) == [float(source)] * 3


def test_truncation(comm):
    _, _, dest, source = ring(comm)
    comm.Isend(np.arange(10, dtype="i"), dest, 8)
    comm.Isend(np.arange(3, dtype="i"), dest, 8)
    small = np.zeros(5, "i")
    with pytest.raises(MPI.Exception) as info:
        comm.Recv(small, source, 8)
    assert info.value.Get_error_class() == MPI.ERR_TRUNCATE
    rbuf = np.zeros(5, "i")
    status = MPI.Status()
    comm.Recv(rbuf, source, 8, status)  # the truncated message was consumed
    assert status.Get_count(MPI.INT) == 3 and list(rbuf[:3]) == [0, 1, 2]
    comm.Barrier()


def test_truncation_large(comm):
    _, _, dest, source = ring(comm)
    req = comm.Isend(np.ones(1_000_000), dest, 9)
    small = np.zeros(10)
    with pytest.raises(MPI.Exception) as info:
        comm.Recv(small, source, 9)
    assert info.value.Get_error_class() == MPI.ERR_TRUNCATE
    req.Wait()


def test_truncation_inside_a_large_message(comm):
    """A buffer that holds the first pieces of a message sent in pieces, not all of them."""
    _, rank, dest, source = ring(comm)
    req = comm.Isend(np.full(3_000_000, rank, np.float64), dest, 10)  # 24 MB: in pieces
    part = np.zeros(1_000_000)
    status = MPI.Status()
    with pytest.raises(MPI.Exception) as info:
        comm.Recv(part, source, 10, status)
    assert info.value.Get_error_class() == MPI.ERR_TRUNCATE
    assert part[0] == source and part[-1] == source
    req.Wait()
    comm.Send(np.array([rank], "i"), dest, 10)  # the truncated one was consumed whole
    nxt = np.zeros(1, "i")
    comm.Recv(nxt, source, 10)
    assert nxt[0] == source


def test_any_source_any_tag_status(comm):
    _, rank, dest, _ = ring(comm)
    comm.Send(np.array([rank], "i"), dest, 20 + rank)
    rbuf = np.zeros(1, "i")
    status = MPI.Status()
    comm.Recv(rbuf, MPI.ANY_SOURCE, MPI.ANY_TAG, status)
    assert status.Get_source() == rbuf[0] and status.Get_tag() == 20 + rbuf[0]
    assert status.Get_count(MPI.INT) == 1


def test_proc_null(comm):
    comm.Send(np.zeros(3), MPI.PROC_NULL)
    status = MPI.Status()
    comm.Recv(np.zeros(3), MPI.PROC_NULL, 0, status)
    assert status.Get_source() == MPI.PROC_NULL and status.Get_count() == 0
    comm.Sendrecv(np.zeros(3), MPI.PROC_NULL, 0, np.zeros(3), MPI.PROC_NULL, 0)
    MPI.Request.Waitall([comm.Isend(np.zeros(3), MPI.PROC_NULL),
                         comm.Irecv(np.zeros(3), MPI.PROC_NULL)])  # fmt: skip


@pytest.mark.parametrize("form", ["mmap", "bytearray", "double"])
def test_proc_null_specs(comm, form):
    """Isend/Irecv/Recv with PROC_NULL over the spec forms: complete at once, the status says
    PROC_NULL, ANY_TAG and 0 bytes, the buffer is left alone; a spec that is wrong (a count
    past the buffer's end, a read-only receive buffer) raises as to a real rank."""
    if form == "double":
        buf = array.array("d", [1.5, 2.5])
        spec, bad = (buf, MPI.DOUBLE), [buf, 3, MPI.DOUBLE]
    else:
        buf = mmap.mmap(-1, 16) if form == "mmap" else bytearray(16)
        buf[:] = bytes(range(16))
        spec, bad = [buf, 16, MPI.BYTE], [buf, 17, MPI.BYTE]
    before = bytes(buf)
    for request in (comm.Isend(spec, MPI.PROC_NULL, 3), comm.Irecv(spec, MPI.PROC_NULL, 3)):
        status = MPI.Status()
        assert request.Test(status)
        assert (status.Get_source(), status.Get_tag(), status.Get_count()) == (
            MPI.PROC_NULL, MPI.ANY_TAG, 0)  # fmt: skip
        assert request == MPI.REQUEST_NULL
    status = MPI.Status()
    comm.Recv(spec, MPI.PROC_NULL, 3, status)
    assert (status.Get_source(), status.Get_count()) == (MPI.PROC_NULL, 0)
    assert bytes(buf) == before
    for call in (comm.Isend, comm.Irecv):
        with pytest.raises(ValueError, match="runs past"):
            call(bad, MPI.PROC_NULL, 3)
    with pytest.raises(BufferError):
        comm.Irecv([bytes(16), 16, MPI.BYTE], MPI.PROC_NULL, 3)


def test_probe_count(comm):
    _, _, dest, source = ring(comm)
    comm.Send(np.zeros(17, "d"), dest, 10)
    status = MPI.Status()
    comm.Probe(source, 10, status)
    assert status.Get_count(MPI.DOUBLE) == 17 and status.Get_source() == source
    rbuf = np.empty(status.Get_count(MPI.DOUBLE))
    comm.Recv(rbuf, source, 10)


def test_non_overtaking_mixed_sizes(comm):
    _, _, dest, source = ring(comm)
    sizes = [1, 2_000_000, 3, 1_000_000, 0, 5]
    reqs = [comm.Isend(np.full(n, i, np.float64), dest, 11) for i, n in enumerate(sizes)]
    for i, n in enumerate(sizes):
        rbuf = np.empty(n)
        comm.Recv(rbuf, source, 11)
        assert n == 0 or (rbuf[0] == i and rbuf[-1] == i)
    MPI.Request.Waitall(reqs)


def test_ssend_buffers(comm):
    _, rank, dest, source = ring(comm)
    rbuf = np.zeros(4, "i")
    rreq = comm.Irecv(rbuf, source, 12)
    comm.Ssend(np.full(4, rank, "i"), dest, 12)
    rreq.Wait()
    assert list(rbuf) == [source] * 4


def test_sendrecv_replace(comm):
    _, rank, dest, source = ring(comm)
    buf = np.full(6, rank, "i")
    comm.Sendrecv_replace(buf, dest, 13, source, 13)
    assert list(buf) == [source] * 6


def test_sendrecv_bad_receive_buffer_sends_nothing(comm):
    """Sendrecv checks its receive buffer before anything is sent (its fast path too)."""
    _, _, dest, source = ring(comm)
    sbuf = np.arange(4, dtype="i")
    with pytest.raises((MPI.Exception, ValueError, TypeError, BufferError)):
        comm.Sendrecv(sbuf, dest, 31, memoryview(bytes(16)), source, 31)
    comm.Barrier()
    assert not comm.Iprobe(source, 31)
    rbuf = np.zeros(4, dtype="i")
    status = MPI.Status()
    comm.Sendrecv([sbuf, 4, MPI.INT], dest, 32, [rbuf, MPI.INT], source, 32, status)
    assert np.array_equal(rbuf, sbuf)
    assert (status.Get_source(), status.Get_tag(), status.Get_count(MPI.INT)) == (source, 32, 4)


def test_any_source_on_a_pair(comm):
    """ANY_SOURCE on a two-member communicator (the blocking receives' fast path takes it as
    the other member): statuses name the sender, a message from this process itself waiting
    first is still received, truncation raises ERR_TRUNCATE."""
    pair = comm.Split(comm.Get_rank() // 2, comm.Get_rank())
    try:
        if pair.Get_size() != 2:
            return
        me, other = pair.Get_rank(), 1 - pair.Get_rank()
        status = MPI.Status()
        pair.Send(np.full(4, me, "i"), other, 3)
        got = np.zeros(4, "i")
        pair.Recv(got, MPI.ANY_SOURCE, 3, status)
        assert np.array_equal(got, np.full(4, other, "i"))
        assert (status.Get_source(), status.Get_tag(), status.Get_count(MPI.INT)) == (other, 3, 4)
        pair.send(("obj", me), other, 4)
        assert pair.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status) == ("obj", other)
        assert (status.Get_source(), status.Get_tag()) == (other, 4)
        mine = pair.isend(("self", me), me, 5)
        pair.send(("peer", me), other, 5)
        got_both = set()
        for _ in range(2):
            item = pair.recv(source=MPI.ANY_SOURCE, tag=5, status=status)
            assert item[1] == status.Get_source()
            got_both.add(item)
        assert got_both == {("self", me), ("peer", other)}
        mine.wait()
        pair.Send(np.zeros(8, "i"), other, 6)
        with pytest.raises(MPI.Exception) as info:
            pair.Recv(np.zeros(2, "i"), MPI.ANY_SOURCE, 6)
        assert info.value.Get_error_class() == MPI.ERR_TRUNCATE
    finally:
        pair.Free()


def test_one_call_isend_irecv_keep_their_rules(comm):
    """Irecv's later posts from a source and Isend's later sends to a destination take their
    one-call paths (ring.irecv_post, ring.isend_post: C) and keep the rules of the first: the
    data and status arrive, a float source is taken and bad tags raise as on the first call, and a
    freed communicator's Irecv and Isend raise ERR_COMM."""
    _, rank, dest, source = ring(comm)
    dup = comm.Dup()
    for _ in range(3):  # (the first post makes the one-call entry, the others take it)
        got = np.zeros(4, "i")
        request = dup.Irecv(got, source, 5)
        sent = dup.Isend(np.arange(4, dtype="i") + rank, dest, 5)
        status = MPI.Status()
        request.Wait(status)
        sent.Wait()
        assert list(got) == [source, source + 1, source + 2, source + 3]
        assert status.Get_source() == source and status.Get_tag() == 5
    if ring_post := getattr(dup, "_irecv_at", None):  # (C path: the entry was made)
        assert source in ring_post
    if send_post := getattr(dup, "_isend_at", None):
        assert dest in send_post
    got = np.zeros(4, "i")  # a float rank is that rank, as mpi4py takes it (comm.rank_arg)
    request = dup.Irecv(got, float(source), 5)
    dup.Isend(np.arange(4, dtype="i") + rank, dest, 5).Wait()
    request.Wait()
    assert list(got) == [source, source + 1, source + 2, source + 3]
    with pytest.raises(MPI.Exception):
        dup.Isend(np.zeros(4, "i"), dest, -7)
    with pytest.raises(MPI.Exception):
        dup.Irecv(np.zeros(4, "i"), source, -7)
    dup.Free()
    with pytest.raises(MPI.Exception) as info:
        dup.Irecv(np.zeros(4, "i"), source, 5)
    assert info.value.Get_error_class() == MPI.ERR_COMM
    with pytest.raises(MPI.Exception) as info:
        dup.Isend(np.zeros(4, "i"), dest, 5)
    assert info.value.Get_error_class() == MPI.ERR_COMM
