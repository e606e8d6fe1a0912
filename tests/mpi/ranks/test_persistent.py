"""Persistent requests, Isendrecv(_replace), Waitsome/Testsome (issue #11 point 3)."""

from __future__ import annotations

import numpy as np
import pytest

from guest_lib.mpi import MPI


def test_persistent_ring_reused(comm):
    """One Send_init/Recv_init pair started 50 times around the ring, the send buffer
    changed between starts (each Start reads it anew); the requests stay non-null while
    inactive, Free makes them null."""
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    sbuf = np.zeros(1000, "d")
    rbuf = np.zeros(1000, "d")
    send = comm.Send_init(sbuf, dest, 7)
    recv = comm.Recv_init(rbuf, source, 7)
    for i in range(50):
        sbuf[:] = rank * 1000 + i
        MPI.Prequest.Startall([recv, send])
        statuses: list[MPI.Status] = []
        MPI.Request.Waitall([send, recv], statuses)
        assert np.all(rbuf == source * 1000 + i)
        assert statuses[1].Get_source() == source and statuses[1].Get_tag() == 7
        assert send != MPI.REQUEST_NULL and recv != MPI.REQUEST_NULL and send and recv
    assert MPI.Request.Waitany([send, recv]) == MPI.UNDEFINED  # inactive counts as null
    with pytest.raises(MPI.Exception):
        send.Start()
        send.Start()  # already active
    send.Wait()
    recv.Start()
    recv.Wait()
    send.Free()
    recv.Free()
    assert send == MPI.REQUEST_NULL and not send
    with pytest.raises(MPI.Exception):
        send.Start()


def test_persistent_ssend_waitany(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    rbuf = np.zeros(3, "i")
    reqs = [comm.Ssend_init(np.full(3, rank, "i"), dest, 1), comm.Recv_init(rbuf, source, 1)]
    for _ in range(5):
        rbuf[:] = -1
        MPI.Prequest.Startall(reqs)
        first = MPI.Request.Waitany(reqs)
        second = MPI.Request.Waitany(reqs)
        assert {first, second} == {0, 1}
        assert MPI.Request.Waitany(reqs) == MPI.UNDEFINED
        assert list(rbuf) == [source] * 3
    for r in reqs:
        r.Free()
    nul = comm.Recv_init(None, MPI.PROC_NULL)
    nul.Start()
    status = MPI.Status()
    nul.Wait(status)
    assert status.Get_source() == MPI.PROC_NULL
    nul.Free()


def test_isendrecv(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    sbuf = np.arange(10, dtype="i") + rank
    rbuf = np.zeros(10, "i")
    req = comm.Isendrecv(sbuf, dest, 3, rbuf, source, 3)
    status = MPI.Status()
    req.Wait(status)
    assert list(rbuf) == list(np.arange(10) + source)
    assert status.Get_source() == source and status.Get_tag() == 3
    assert status.Get_count(MPI.INT) == 10
    buf = np.full(5, rank, "d")
    req = comm.Isendrecv_replace(buf, dest, 4, source, 4)
    req.Wait()
    assert list(buf) == [source] * 5


def test_isendrecv_truncate(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    rbuf = np.zeros(2, "i")
    req = comm.Isendrecv(np.ones(4, "i"), dest, 5, rbuf, source, 5)
    with pytest.raises(MPI.Exception) as info:
        req.Wait()
    assert info.value.Get_error_class() == MPI.ERR_TRUNCATE


def test_waitsome_testsome_objects(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    reqs = [comm.irecv(source=source, tag=40 + t) for t in range(3)]
    assert MPI.Request.testsome(reqs) == ([], [])  # nothing sent before the barrier
    comm.Barrier()
    for t in range(3):
        comm.send({"t": t, "from": rank}, dest, 40 + t)
    got: dict[int, object] = {}
    statuses: list[MPI.Status] = []
    while len(got) < 3:
        indices, objects = MPI.Request.waitsome(reqs, statuses)
        assert indices is not None and objects is not None
        for k, (i, obj) in enumerate(zip(indices, objects, strict=True)):
            assert statuses[k].Get_tag() == 40 + i
            got[i] = obj
    assert got == {t: {"t": t, "from": source} for t in range(3)}
    assert MPI.Request.waitsome(reqs) == (None, None)
    assert MPI.Request.testsome([MPI.REQUEST_NULL]) == (None, None)


def test_null_requests_in_lists():
    statuses = [MPI.Status() for _ in range(2)]
    for s in statuses:
        s.Set_source(5)
    assert MPI.Request.Waitall([MPI.REQUEST_NULL, MPI.REQUEST_NULL], statuses)
    assert [s.Get_source() for s in statuses] == [MPI.ANY_SOURCE] * 2
    assert MPI.Request.Testall([MPI.REQUEST_NULL])
    assert MPI.Request.Testany([MPI.REQUEST_NULL]) == (MPI.UNDEFINED, True)
    assert MPI.Request.Waitsome([MPI.REQUEST_NULL]) is None
    assert MPI.Request.Testsome([MPI.REQUEST_NULL]) is None


def test_persistent_collectives_restarted(comm):
    """MPI-4 persistent collectives: one Allreduce_init/Bcast_init/Scan_init/Barrier_init
    set started 20 times (the operands changed between starts: each Start reads them
    anew), interleaved with a nonblocking Iallgather (the same start order on every rank);
    inactive between starts, null after Free."""
    size, rank = comm.Get_size(), comm.Get_rank()
    sbuf, rbuf = np.zeros(5, "i"), np.zeros(5, "i")
    bbuf, scan = np.zeros(3, "d"), np.zeros(5, "i")
    reqs = [
        comm.Allreduce_init(sbuf, rbuf, MPI.SUM),
        comm.Bcast_init(bbuf, root=size - 1),
        comm.Scan_init(sbuf, scan, MPI.MAX),
        comm.Barrier_init(),
    ]
    gathered = np.zeros(size, "i")
    for i in range(20):
        sbuf[:] = rank + i
        bbuf[:] = i * 10 + rank if rank == size - 1 else -1
        MPI.Prequest.Startall(reqs)
        extra = comm.Iallgather(np.array([rank * i], "i"), gathered)
        MPI.Request.Waitall([*reqs, extra])
        assert list(rbuf) == [size * i + size * (size - 1) // 2] * 5
        assert list(bbuf) == [i * 10 + size - 1] * 3
        assert list(scan) == [rank + i] * 5
        assert list(gathered) == [r * i for r in range(size)]
        assert all(reqs) and MPI.Request.Testall(reqs)  # inactive: complete at once
    for req in reqs:
        req.Free()
    assert not any(reqs)
    with pytest.raises(MPI.Exception):
        reqs[0].Start()
    with pytest.raises(MPI.Exception):
        MPI.COMM_NULL.Barrier_init()


def test_handles_on_one_persistent_request(comm):
    """MPI.Request(preq) and MPI.Prequest(preq) are handles on the same request: equal to
    it while inactive and active, a Wait through one completes it for all (inactive again,
    not null), and Free through any makes every handle null."""
    rank = comm.Get_rank()
    sbuf, rbuf = bytearray(b"x" * 8), bytearray(8)
    send = comm.Send_init(sbuf, rank, 3)
    recv = comm.Recv_init(rbuf, rank, 3)
    plain, twin = MPI.Request(recv), MPI.Prequest(recv)
    assert type(plain) is MPI.Request and plain == recv and twin == recv and plain
    assert plain.handle == recv.handle != 0  # one request, one number
    with pytest.raises(TypeError):
        MPI.Grequest(recv)
    for _ in range(3):
        twin.Start()  # started through one handle: active on all
        assert plain == recv and plain._op is not None
        send.Start()
        status = MPI.Status()
        plain.Wait(status)  # completed through another
        assert status.Get_source() == rank and status.Get_count() == 8
        assert recv and plain and twin and recv._op is None and twin._op is None
        assert recv.Test()  # inactive: at once
        send.Wait()
        assert rbuf == sbuf
    recv.Start()
    send.Start()
    MPI.Request.Waitall([plain, send])  # (Waitall's quick path for plain requests too)
    assert recv._op is None and twin._op is None and recv
    plain.Free()
    assert recv == MPI.REQUEST_NULL and not recv and not twin and not plain
    send.Free()


def test_partitioned_ready_in_any_order_from_threads(comm):
    """Psend_init/Precv_init around the ring: the sender's 8 partitions are marked by 4
    threads in reverse order; the receiver splits the same buffer in 2 partitions. Rounds
    restart the same pair; each round's data arrive whole."""
    import threading

    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    sbuf = np.zeros(800, "i")
    rbuf = np.full(800, -1, "i")
    send = comm.Psend_init(sbuf, 8, dest, 11)
    recv = comm.Precv_init([rbuf, MPI.INT], 2, source, 11)
    for round_ in range(4):
        sbuf[:] = np.arange(800) + 1000 * rank + round_
        recv.Start()
        send.Start()
        threads = [
            threading.Thread(target=lambda t=t: [send.Pready(p) for p in (7 - t, 3 - t)])
            for t in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        MPI.Request.Waitall([send, recv])
        assert np.array_equal(rbuf, np.arange(800) + 1000 * source + round_)
        assert recv.Parrived(0) and recv.Parrived(1)  # inactive: all there
    with pytest.raises(MPI.Exception):
        send.Pready(0)  # inactive
    send.Free()
    recv.Free()
    assert send == MPI.REQUEST_NULL and recv == MPI.REQUEST_NULL


def test_partitioned_each_partition_goes_when_ready(comm):
    """A partition is sent when it is marked, not at the end: with half the partitions
    marked, the receiver sees its first half arrive (and not the second) before the sender
    marks the rest; Pready_range/Pready_list mark several."""
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    sbuf = bytearray(bytes([rank]) * 4000)
    rbuf = bytearray(4000)
    send = comm.Psend_init(sbuf, 4, dest, 5)
    recv = comm.Precv_init(rbuf, 2, source, 5)
    recv.Start()
    assert not recv.Parrived(0) and not recv.Parrived(1)
    comm.Barrier()
    send.Start()
    send.Pready_list([1, 0])
    comm.Barrier()
    while not recv.Parrived(0):
        pass
    assert not recv.Parrived(1)
    assert rbuf[:2000] == bytes([source]) * 2000 and rbuf[2000:] == bytes(2000)
    comm.Barrier()
    send.Pready_range(2, 3)
    with pytest.raises(MPI.Exception):
        send.Pready(3)  # marked already in this round
    MPI.Request.Waitall([recv, send])
    assert rbuf == bytes([source]) * 4000
    send.Free()
    recv.Free()


def test_partitioned_arguments(comm):
    """Wildcards are not allowed on a partitioned receive (MPI-4); partitions < 1 and a
    buffer that does not split evenly are refused; Parrived is for receives only."""
    with pytest.raises(MPI.Exception) as error:
        comm.Precv_init(bytearray(4), 1, MPI.ANY_SOURCE, 0)
    assert error.value.Get_error_class() == MPI.ERR_RANK
    with pytest.raises(MPI.Exception) as error:
        comm.Precv_init(bytearray(4), 1, 0, MPI.ANY_TAG)
    assert error.value.Get_error_class() == MPI.ERR_TAG
    with pytest.raises(MPI.Exception):
        comm.Psend_init(bytearray(4), 0, 0, 0)
    with pytest.raises(ValueError):
        comm.Psend_init(bytearray(5), 2, 0, 0)
    send = comm.Psend_init(bytearray(4), 2, MPI.PROC_NULL, 0)
    send.Start()
    with pytest.raises(MPI.Exception):
        send.Parrived(0)
    send.Pready_range(0, 1)
    send.Wait()
    send.Free()
