"""Requests: Wait/Test families, null requests, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from guest_lib.mpi import MPI


def test_request_null():
    status = MPI.Status()
    assert MPI.REQUEST_NULL.Wait(status) is True
    assert MPI.REQUEST_NULL.Test() is True
    assert not MPI.REQUEST_NULL
    assert MPI.Request.Waitany([MPI.REQUEST_NULL]) == MPI.UNDEFINED
    assert MPI.Request.Testall([]) is True


def test_waitall_testall(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    bufs = [np.zeros(5, "i") for _ in range(4)]
    reqs = [comm.Irecv(b, source, t) for t, b in enumerate(bufs)]
    assert not any(r.Test() for r in reqs[:0])
    sends = [comm.Isend(np.full(5, t, "i"), dest, t) for t in range(4)]
    statuses: list[MPI.Status] = []
    MPI.Request.Waitall(reqs + sends, statuses)
    assert [list(b) for b in bufs] == [[t] * 5 for t in range(4)]
    assert [s.Get_tag() for s in statuses[:4]] == [0, 1, 2, 3]
    assert all(not r for r in reqs)


def test_lowercase_waitall(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    reqs = [comm.irecv(source=source, tag=t) for t in range(3)]
    for t in range(3):
        comm.isend({"t": t}, dest, tag=t).wait()
    assert MPI.Request.waitall(reqs) == [{"t": t} for t in range(3)]


def test_waitany_testany_waitsome(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    bufs = [np.zeros(1, "i") for _ in range(3)]
    reqs = [comm.Irecv(b, source, 30 + t) for t, b in enumerate(bufs)]
    index, _ = MPI.Request.Testany(reqs)
    done = [] if index == MPI.UNDEFINED else [index]  # a fast neighbour may have sent
    comm.Send(np.array([5], "i"), dest, 31)
    status = MPI.Status()
    first = MPI.Request.Waitany(reqs, status)
    assert status.Get_tag() == 30 + first and not reqs[first]
    done.append(first)
    comm.Send(np.array([6], "i"), dest, 30)
    comm.Send(np.array([7], "i"), dest, 32)
    while len(done) < 3:
        done += MPI.Request.Waitsome(reqs) or []
    assert sorted(done) == [0, 1, 2]
    assert [b[0] for b in bufs] == [6, 5, 7]
    assert MPI.Request.Waitsome(reqs) is None
    assert MPI.Request.Testany(reqs) == (MPI.UNDEFINED, True)


def test_test_polls_until_done(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    req = comm.irecv(source=source, tag=40)
    comm.send("late", dest, tag=40)
    while True:
        flag, obj = req.test()
        if flag:
            break
    assert obj == "late"


def test_cancel_recv(comm):
    req = comm.Irecv(np.zeros(1), MPI.ANY_SOURCE, 41)
    req.Cancel()
    status = MPI.Status()
    req.Wait(status)
    assert status.Is_cancelled()


def test_grequest_completed_by_another_thread():
    """A generalized request that another thread completes while this one waits on it:
    query_fn fills the status, then free_fn runs; a callback that raises makes Wait raise
    MPI.Exception (ERR_OTHER for a Python error)."""
    calls = []

    def query(status):
        status.Set_source(3)
        calls.append("query")

    greq = MPI.Grequest.Start(query, lambda: calls.append("free"))
    assert not greq.Test() and calls == []
    timer = threading.Timer(0.2, greq.complete, args=("done",))
    timer.start()
    status = MPI.Status()
    assert greq.wait(status) == "done"
    timer.join()
    assert status.Get_source() == 3 and status.Get_tag() == MPI.ANY_TAG
    assert calls == ["query", "free"] and not greq
    failing = MPI.Grequest.Start(lambda status: 1 / 0)
    failing.Complete()
    with pytest.raises(MPI.Exception) as raised:
        failing.Wait()
    assert raised.value.Get_error_class() == MPI.ERR_OTHER and not failing
    with pytest.raises(TypeError):
        MPI.Prequest(MPI.Grequest.Start())
