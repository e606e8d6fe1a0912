"""Nonblocking collectives on their lane in the collective area (guest_lib/mpi/collectives.py
`started`: the round started in one C call, the Request polls it): completed by Test loops,
by Waitall/Waitany beside point-to-point requests, several pending at once, and a blocking
collective after pending ones (which completes them first, in order).

Where the communicator's area is bound and the C accelerator built, the first of each call
must take the lane (its request is no staged engine operation); elsewhere (COMM_SELF, one
rank, IVSHMEM_COMM_PUREPYTHON) the same checks hold for the other paths.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from guest_lib.mpi import MPI, area
from guest_lib.mpi.engine import StagedOp

Check = Callable[[], None]


def _lane_ready(comm: MPI.Intracomm) -> bool:
    comm.Barrier()  # binds the area (nonblocking collectives never bind it)
    shared = area.current(comm)
    return (
        shared is not None
        and shared.group._c is not None
        and not shared.group._pending
        and shared.untroubled()
    )


def _start(call: str, comm: MPI.Intracomm, salt: int) -> tuple[MPI.Request, Check]:
    """Start `call` with small numpy buffers; the check of its results once complete."""
    size, rank = comm.Get_size(), comm.Get_rank()
    root = size - 1
    if call == "Ibarrier":
        return comm.Ibarrier(), lambda: None
    if call == "Ibcast":
        buf = np.arange(salt, salt + 8, dtype="i4") if rank == root else np.zeros(8, "i4")
        want = np.arange(salt, salt + 8, dtype="i4")
        return comm.Ibcast(buf, root), lambda: np.testing.assert_array_equal(buf, want)
    if call == "Iallreduce":
        send, recv = np.full(3, rank + salt, "f8"), np.zeros(3, "f8")
        total = sum(r + salt for r in range(size))
        return comm.Iallreduce(send, recv, MPI.SUM), lambda: np.testing.assert_array_equal(
            recv, np.full(3, total, "f8")
        )
    if call == "Ireduce":
        send, recv = np.full(2, rank * salt, "i8"), np.full(2, -1, "i8")
        most = (size - 1) * salt

        def reduced() -> None:
            expect = most if rank == root else -1
            np.testing.assert_array_equal(recv, np.full(2, expect, "i8"))

        return comm.Ireduce(send, recv, MPI.MAX, root), reduced
    assert call == "Iallgather"
    send, recv = np.full(2, rank + salt, "i2"), np.zeros(2 * size, "i2")
    want = np.repeat(np.arange(size, dtype="i2") + salt, 2)
    return comm.Iallgather(send, recv), lambda: np.testing.assert_array_equal(recv, want)


CALLS = ["Ibarrier", "Ibcast", "Iallreduce", "Ireduce", "Iallgather"]


@pytest.mark.parametrize("call", CALLS)
def test_several_pending_completed_by_test_loops(comm, call):
    """Three instances at once, completed by Test loops in reverse order; Test returns a
    bool, Get_status does not free a request, and the first took the lane."""
    lane = _lane_ready(comm)
    started = [_start(call, comm, salt) for salt in (1, 5, 9)]
    if lane:
        assert not isinstance(started[0][0]._op, StagedOp)
    for request, check in reversed(started):
        while not request.Get_status():
            pass
        status = MPI.Status()
        flag = request.Test(status)
        assert flag is True and not request
        assert status.Get_error() == MPI.SUCCESS
        check()
    assert all(request.Test() is True for request, _ in started)  # null requests now


@pytest.mark.parametrize("call", CALLS)
def test_waitall_with_point_to_point(comm, call):
    """Waitall (then Waitany) over a collective's request between a ring's Irecv and
    Isend."""
    size, rank = comm.Get_size(), comm.Get_rank()
    for wait in ("all", "any"):
        lane = _lane_ready(comm)
        got = np.zeros(4, "i4")
        recv = comm.Irecv(got, (rank - 1) % size, tag=7)
        coll, check = _start(call, comm, 3)
        if lane:
            assert not isinstance(coll._op, StagedOp)
        send = comm.Isend(np.full(4, rank, "i4"), (rank + 1) % size, tag=7)
        requests = [recv, coll, send]
        if wait == "all":
            statuses = [MPI.Status() for _ in requests]
            assert MPI.Request.Waitall(requests, statuses) is True
            assert statuses[0].Get_source() == (rank - 1) % size
        else:
            for _ in requests:
                assert MPI.Request.Waitany(requests) in range(3)
            assert MPI.Request.Waitany(requests) == MPI.UNDEFINED
        assert not any(requests)
        np.testing.assert_array_equal(got, np.full(4, (rank - 1) % size, "i4"))
        check()


def test_blocking_collective_after_pending_ones(comm):
    """Blocking Allreduce and Bcast behind pending nonblocking ones complete those first;
    the instance numbers of both kinds stay aligned on every rank (a Barrier then an
    Ibarrier after them still meet)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    _lane_ready(comm)
    started = [_start(call, comm, 2) for call in ("Ibcast", "Iallreduce", "Iallgather")]
    total = np.zeros(1, "i8")
    comm.Allreduce(np.full(1, rank, "i8"), total, MPI.SUM)
    assert total[0] == size * (size - 1) // 2
    word = np.full(2, 42 if rank == 0 else 0, "i4")
    comm.Bcast(word, 0)
    assert list(word) == [42, 42]
    for request, check in started:
        request.Wait()
        check()
    comm.Barrier()
    comm.Ibarrier().Wait()
    request, check = _start("Iallreduce", comm, 11)
    while not request.Test():
        pass
    check()


@pytest.mark.parametrize("call", ["Ibcast", "Iallreduce", "Iallgather"])
def test_waited_in_another_thread(comm, call):
    """THREAD_MULTIPLE: a thread waits for a started collective while the main thread runs a
    ring exchange of blocking sends and receives; both complete, the data is right."""
    size, rank = comm.Get_size(), comm.Get_rank()
    _lane_ready(comm)
    request, check = _start(call, comm, 4)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            request.Wait()
        except BaseException as exc:  # (reported by the main thread)
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    got = np.zeros(2, "i4")
    for _ in range(20):
        comm.Sendrecv(np.full(2, rank, "i4"), (rank + 1) % size, 3, got, (rank - 1) % size, 3)
        assert list(got) == [(rank - 1) % size] * 2
    thread.join(60)
    assert not thread.is_alive() and not errors
    assert not request
    check()
