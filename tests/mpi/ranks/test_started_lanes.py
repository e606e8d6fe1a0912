"""Nonblocking collectives on their lane in the collective area (guest_lib/mpi/collectives.py
`started`: the round started in one C call, the Request polls it): completed by Test loops,
by Waitall/Waitany beside point-to-point requests, several pending at once, and a blocking
collective after pending ones (which completes them first, in order).

Where the communicator's area is bound and the C accelerator built, the first of each call
must take the lane (its request is no staged engine operation); elsewhere (COMM_SELF, one
rank, IVSHMEM_COMM_PUREPYTHON) the same checks hold for the other paths.
"""

from __future__ import annotations

import array
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI, area, collectives
from guest_lib.mpi.engine import StagedOp
from ivshmem_comm.collective import CollectiveGroup

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
    if call == "Iallgather":
        send, recv = np.full(2, rank + salt, "i2"), np.zeros(2 * size, "i2")
        want = np.repeat(np.arange(size, dtype="i2") + salt, 2)
        return comm.Iallgather(send, recv), lambda: np.testing.assert_array_equal(recv, want)
    return _start_blocks(call, comm, salt)


def _expect(got: np.ndarray, want: np.ndarray) -> Check:
    return lambda: np.testing.assert_array_equal(got, want)


def _start_blocks(call: str, comm: MPI.Intracomm, salt: int) -> tuple[MPI.Request, Check]:
    """`_start` of the collectives of one block per member (odd sizes: 3-byte blocks, 6-byte
    int16 blocks, rank-dependent vector counts)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    root = size - 1
    if call == "Igather":
        send = np.full(3, rank + salt, "i2")
        recv = np.zeros(3 * size, "i2") if rank == root else None
        want = np.repeat(np.arange(size, dtype="i2") + salt, 3)
        if rank != root:
            return comm.Igather(send, recv, root), lambda: None
        return comm.Igather(send, recv, root), _expect(recv, want)
    if call == "Iscatter":
        send = (np.arange(3 * size) + salt).astype("u1") if rank == root else None
        recv = np.zeros(3, "u1")
        want = (np.arange(3 * rank, 3 * rank + 3) + salt).astype("u1")
        return comm.Iscatter(send, recv, root), _expect(recv, want)
    if call == "Ialltoall":
        send = (rank * 100 + np.arange(3 * size) + salt).astype("i4")
        recv = np.zeros(3 * size, "i4")
        want = np.concatenate([r * 100 + np.arange(3 * rank, 3 * rank + 3) + salt
                               for r in range(size)]).astype("i4")  # fmt: skip
        return comm.Ialltoall(send, recv), _expect(recv, want)
    counts = [r + 1 for r in range(size)]
    displs = [sum(counts[:r]) for r in range(size)]
    total = sum(counts)
    every = np.concatenate([np.full(r + 1, r + salt, "i4") for r in range(size)])
    if call == "Igatherv":
        send = np.full(rank + 1, rank + salt, "i4")
        got = np.zeros(total, "i4")
        if rank != root:
            return comm.Igatherv(send, None, root), lambda: None
        return comm.Igatherv(send, [got, counts, displs, MPI.INT], root), _expect(got, every)
    if call == "Iscatterv":
        spec = [every.copy(), counts, displs, MPI.INT] if rank == root else None
        got = np.zeros(rank + 1, "i4")
        return comm.Iscatterv(spec, got, root), _expect(got, np.full(rank + 1, rank + salt, "i4"))
    if call == "Iallgatherv":
        got = np.zeros(total, "i4")
        request = comm.Iallgatherv(np.full(rank + 1, rank + salt, "i4"),
                                   [got, counts, displs, MPI.INT])  # fmt: skip
        return request, _expect(got, every)
    assert call == "Ialltoallv"
    # rank r sends (r + q) % 3 + 1 elements r*1000 + q*10 + salt + i to rank q
    scounts = [(rank + q) % 3 + 1 for q in range(size)]
    rcounts = [(r + rank) % 3 + 1 for r in range(size)]
    sdispls = [sum(scounts[:q]) for q in range(size)]
    rdispls = [sum(rcounts[:r]) for r in range(size)]
    send = np.concatenate([rank * 1000 + q * 10 + salt + np.arange(scounts[q])
                           for q in range(size)]).astype("i4")  # fmt: skip
    want = np.concatenate([r * 1000 + rank * 10 + salt + np.arange(rcounts[r])
                           for r in range(size)]).astype("i4")  # fmt: skip
    got = np.zeros(sum(rcounts), "i4")
    request = comm.Ialltoallv([send, scounts, sdispls, MPI.INT], [got, rcounts, rdispls, MPI.INT])
    return request, _expect(got, want)


BLOCKS = ["Igather", "Iscatter", "Ialltoall", "Igatherv", "Iscatterv", "Iallgatherv",
          "Ialltoallv"]  # fmt: skip
CALLS = ["Ibarrier", "Ibcast", "Iallreduce", "Ireduce", "Iallgather", *BLOCKS]


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


def _over_a_slab(call: str, comm: MPI.Intracomm, salt: int) -> tuple[MPI.Request, Check]:
    """`call` (Igatherv, Iscatterv, Ialltoallv) where one member's block is over a slab of
    the area (7 bytes past it; the other blocks 1-3 bytes): the members decline the round
    (not every member can size it) and the instance goes on over messages (Iscatterv: from
    the last rank, the big block rank 0's)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    shared = area.current(comm)
    big = (shared.group.slab_size if shared is not None else 1 << 16) + 7
    root, far = (size - 1, 0) if call == "Iscatterv" else (0, 1)
    counts = [big if r == far else r + 1 for r in range(size)]
    displs = [sum(counts[:r]) for r in range(size)]
    every = np.concatenate([np.full(counts[r], r + salt, "u1") for r in range(size)])
    mine = np.full(counts[rank], rank + salt, "u1")
    if call == "Igatherv":
        got = np.zeros(sum(counts), "u1")
        spec = [got, counts, displs, MPI.BYTE] if rank == root else None
        check = _expect(got, every) if rank == root else (lambda: None)
        return comm.Igatherv(mine, spec, root), check
    if call == "Iscatterv":
        got = np.zeros(counts[rank], "u1")
        spec = [every.copy(), counts, displs, MPI.BYTE] if rank == root else None
        return comm.Iscatterv(spec, got, root), _expect(got, mine)
    assert call == "Ialltoallv"
    # rank 0 sends `big` bytes to rank 1, every other pair 2 bytes: value sender*16 + dest
    scounts = [big if (rank, q) == (0, 1) else 2 for q in range(size)]
    rcounts = [big if (r, rank) == (0, 1) else 2 for r in range(size)]
    send = np.concatenate([np.full(scounts[q], (rank * 16 + q + salt) % 256, "u1")
                           for q in range(size)])  # fmt: skip
    want = np.concatenate([np.full(rcounts[r], (r * 16 + rank + salt) % 256, "u1")
                           for r in range(size)])  # fmt: skip
    got = np.zeros(sum(rcounts), "u1")
    sd = [sum(scounts[:q]) for q in range(size)]
    rd = [sum(rcounts[:r]) for r in range(size)]
    request = comm.Ialltoallv([send, scounts, sd, MPI.BYTE], [got, rcounts, rd, MPI.BYTE])
    return request, _expect(got, want)


@pytest.mark.parametrize("call", ["Igatherv", "Iscatterv", "Ialltoallv"])
def test_declined_round_goes_on_over_messages(comm, call):
    """A started gatherv/scatterv/alltoallv whose data is over one round is declined by its
    members in the area and completes over messages, in the same instance: alone (on its
    lane), between small ones of the same call (several pending: the later ones run as
    the area's started steps), beside p2p, then a blocking collective. The area stays."""
    if comm.Get_size() < 2:
        pytest.skip("one member: nothing is declined")
    size, rank = comm.Get_size(), comm.Get_rank()
    lane = _lane_ready(comm)
    request, check = _over_a_slab(call, comm, 1)
    request.Wait()
    check()
    started = [
        _start_blocks(call, comm, 2),
        _over_a_slab(call, comm, 3),
        _start_blocks(call, comm, 4),
        _over_a_slab(call, comm, 5),
    ]
    got = np.zeros(2, "i4")
    p2p = [comm.Irecv(got, (rank - 1) % size, tag=9),
           comm.Isend(np.full(2, rank, "i4"), (rank + 1) % size, tag=9)]  # fmt: skip
    assert MPI.Request.Waitall([r for r, _ in reversed(started)] + p2p) is True
    for _, check in started:
        check()
    assert list(got) == [(rank - 1) % size] * 2
    total = np.zeros(1, "i8")
    comm.Allreduce(np.ones(1, "i8"), total, MPI.SUM)
    assert total[0] == size
    if lane:
        assert area.current(comm) is not None  # (declining is no failure)


@pytest.mark.parametrize("call", BLOCKS)
def test_mixed_with_blocking_collectives_and_a_subcommunicator(comm, call):
    """A started collective left pending across blocking collectives of the same
    communicator and a nonblocking one of a split of it, then Waited: every result right."""
    size, rank = comm.Get_size(), comm.Get_rank()
    _lane_ready(comm)
    half = comm.Split(rank % 2, rank)
    try:
        _lane_ready(half)
        request, check = _start(call, comm, 6)
        inner, inner_check = _start(call, half, 7)
        word = np.full(1, 5 if rank == 0 else 0, "i8")
        comm.Bcast(word, 0)
        out = np.zeros(3 * size, "i4")
        comm.Allgather(np.full(3, rank, "i4"), out)
        assert word[0] == 5 and list(out) == [r for r in range(size) for _ in range(3)]
        MPI.Request.Waitall([inner, request])
        check()
        inner_check()
    finally:
        half.Free()


def test_declined_round_moves_in_a_blocking_receive(comm):
    """A started Ialltoallv that rank 0's block to rank 1 (over a slab) makes the members
    decline, pending on the others (rank 0 starts late) while they block in a Recv from
    rank 0 that it sends only once its own Wait returned: their engine's progress in that
    Recv must see the round declined and send their blocks by messages (MPI's progress
    rule), or every rank waits for ever."""
    if comm.Get_size() < 2:
        pytest.skip("one member: nothing is declined")
    size, rank = comm.Get_size(), comm.Get_rank()
    _lane_ready(comm)
    if rank == 0:
        time.sleep(0.2)  # the others start first: their rounds are pending
    request, check = _over_a_slab("Ialltoallv", comm, 8)
    word = np.zeros(1, "i4")
    if rank == 0:
        request.Wait()
        for r in range(1, size):
            comm.Send(np.full(1, 77, "i4"), r, tag=12)
    else:
        comm.Recv(word, 0, tag=12)
        request.Wait()
        assert word[0] == 77
    check()


def _large(call: str, comm: MPI.Intracomm, salt: int, form: str) -> tuple[MPI.Request, Check]:
    """`call` (Ialltoall: blocks 5 bytes over a segment of the area; Iallreduce: 80 KiB of
    float64, a reduce-scatter and an allgather on messages) in buffer form `form`:
    "numpy", "spec" (`[buf, count, datatype]`, Ialltoall's count per block; Iallreduce
    `(buf, MPI.DOUBLE)`), "in_place"; Iallreduce also "max" (MPI.MAX) and "user" (a
    non-commutative user op: rank 0 folds in rank order)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if call == "Ialltoall":
        shared = area.current(comm)
        n = (shared.group._scatter_segment() if shared is not None else 1 << 16) + 5
        send = ((rank * 31 + np.arange(n * size) + salt) % 251).astype("u1")
        want = np.concatenate([(r * 31 + np.arange(n * rank, n * rank + n) + salt) % 251
                               for r in range(size)]).astype("u1")  # fmt: skip
        recv = send.copy() if form == "in_place" else np.zeros(n * size, "u1")
        sendbuf = {"numpy": send, "spec": [send, n, MPI.BYTE], "in_place": MPI.IN_PLACE}[form]
        recvbuf = [recv, n, MPI.BYTE] if form == "spec" else recv
        return comm.Ialltoall(sendbuf, recvbuf), _expect(recv, want)
    count = 10240 + 4
    every = [np.arange(count, dtype="f8") % (r + 2) + salt for r in range(size)]
    mine = every[rank]
    recv = mine.copy() if form == "in_place" else np.zeros(count, "f8")
    sendbuf: object = MPI.IN_PLACE if form == "in_place" else mine
    recvbuf: object = (recv, MPI.DOUBLE) if form == "spec" else recv
    op, want = MPI.SUM, sum(every)
    if form == "max":
        op, want = MPI.MAX, np.maximum.reduce(every)
    elif form == "user":  # pairs (a, b): t -> a*t + b, composed (associative, not commutative)
        op = MPI.Op.Create(_compose, commute=False)
        want = every[0]
        for x in every[1:]:
            want = _composed(want, x)
    return comm.Iallreduce(sendbuf, recvbuf, op), _expect(recv, want)


def _composed(f: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Elementwise pairs (a, b) of f and g as maps t -> a*t + b: those of f after g."""
    out = np.empty_like(g)
    out[0::2] = f[0::2] * g[0::2]
    out[1::2] = f[0::2] * g[1::2] + f[1::2]
    return out


def _compose(invec: object, inout: object, datatype: object) -> None:
    """The user op of `_composed`: inout := invec after inout (MPI's order: in op inout)."""
    x, y = np.frombuffer(invec, "f8"), np.frombuffer(inout, "f8")  # type: ignore[call-overload]
    y[...] = _composed(x, y)


@pytest.mark.parametrize(
    "call,form",
    [("Ialltoall", f) for f in ("numpy", "spec", "in_place")]
    + [("Iallreduce", f) for f in ("numpy", "spec", "in_place", "max", "user")],
)
def test_large_sizes_on_messages(comm, call, form):
    """Large Ialltoall (blocks over one round of the area: messages at once, the area's
    round counter untouched) and Iallreduce (over a slab): alone, then two pending with
    small ones of the same call between and point-to-point requests, completed by a Test
    loop in reverse order and Waitall; every result checked."""
    size, rank = comm.Get_size(), comm.Get_rank()
    lane = _lane_ready(comm)
    shared = area.current(comm)
    before = shared.group._round if shared is not None else None
    request, check = _large(call, comm, 1, form)
    request.Wait()
    check()
    if call == "Ialltoall" and shared is not None:
        assert shared.group._round == before  # (no round to decline them)
    started = [_large(call, comm, 2, form), _start(call, comm, 3), _large(call, comm, 4, form)]
    got = np.zeros(2, "i4")
    p2p = [comm.Irecv(got, (rank - 1) % size, tag=9),
           comm.Isend(np.full(2, rank, "i4"), (rank + 1) % size, tag=9)]  # fmt: skip
    requests = [r for r, _ in reversed(started)] + p2p
    deadline = time.monotonic() + 60
    while not MPI.Request.Testall(requests):
        assert time.monotonic() < deadline
    for _, check in started:
        check()
    assert list(got) == [(rank - 1) % size] * 2
    if lane:
        assert area.current(comm) is not None


def _doubles(form: str, values: list[float]) -> tuple[Any, Callable[[], list[float]]]:
    """`values` as doubles in `form` (numpy; spec: [bytearray, count, DOUBLE]; double:
    (array('d'), DOUBLE)), and a reader of the values it holds."""
    if form == "spec":
        raw = bytearray(np.array(values, "f8").tobytes())
        return [raw, len(values), MPI.DOUBLE], lambda: np.frombuffer(raw, "f8").tolist()
    if form == "double":
        dbl = array.array("d", values)
        return (dbl, MPI.DOUBLE), lambda: list(dbl)
    arr = np.array(values, "f8")
    return arr, lambda: arr.tolist()


@pytest.mark.parametrize("form", ["numpy", "spec", "double", "in_place"])
@pytest.mark.parametrize(
    "call",
    [
        "Ibcast", "Iallgather", "Ireduce", "Iallreduce", "Iscan", "Iexscan", "Ibarrier",
        "Ialltoall", "Ialltoallv", "Igather", "Iscatter", "Iscatterv",
    ],
)  # fmt: skip
def test_started_through_the_c_front(comm, monkeypatch, call, form):
    """Ibcast, Iallgather, Ireduce, Iallreduce, Iscan, Iexscan, Igather, Iscatter(v),
    Ialltoall and Ialltoallv (uneven counts, a gap) in the forms codes pass on every call
    start their round through CollectiveRound.front (collectives._c_start: no Python lane
    builder, no Area.begin, no CollectiveGroup.start_round_as), at every root, with the
    right data; Ibarrier too (its barrier round)."""
    if form == "in_place" and call in ("Ibcast", "Iexscan"):
        pytest.skip(f"{call} has no IN_PLACE here")
    if call == "Ibarrier" and form != "numpy":
        pytest.skip("Ibarrier has no buffers")
    if not _lane_ready(comm) or collectives.ring.set_front is None:
        pytest.skip("no area with its C accelerator here")
    size, rank = comm.Get_size(), comm.Get_rank()
    fronts: list[int] = []  # (the F_* code of each front call)

    class Spy:
        """The group's C round, its front calls noted."""

        def __init__(self, real: Any) -> None:
            self._real = real

        def front(self, *args: Any) -> Any:
            fronts.append(args[3])
            return self._real.front(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

    group = comm._area.group
    monkeypatch.setattr(group, "_c", Spy(group._c))
    monkeypatch.setattr(CollectiveGroup, "start_round_as", None)  # (the general start)
    monkeypatch.setattr(area.Area, "begin", None)  # (a lane builder's start would fail)
    base = "numpy" if form == "in_place" else form
    mine = [rank + 1.0, rank + 2.0]
    for root in range(size):
        if call == "Ibcast":
            buf, read = _doubles(base, [root + 0.5] * 2 if rank == root else [-1.0] * 2)
            comm.Ibcast(buf, root).Wait()
            assert read() == [root + 0.5] * 2
        elif call == "Iallgather":
            every = [q + 1.0 + i for q in range(size) for i in range(2)]
            recv, read = _doubles(base, every if form == "in_place" else [0.0] * 2 * size)
            if isinstance(recv, list):
                recv[1] = 2  # (one rank's block)
            send = MPI.IN_PLACE if form == "in_place" else _doubles(base, mine)[0]
            comm.Iallgather(send, recv).Wait()
            assert read() == every
            break
        elif call == "Ibarrier":
            comm.Ibarrier().Wait()
            break
        elif call == "Igather":
            every = [q + 1.0 + i for q in range(size) for i in range(2)]
            recv, read = _doubles(base, every if form == "in_place" else [0.0] * 2 * size)
            if isinstance(recv, list):
                recv[1] = 2  # (one rank's block)
            send = _doubles(base, mine)[0]
            if form == "in_place" and rank == root:
                send = MPI.IN_PLACE
            comm.Igather(send, recv if rank == root else None, root).Wait()
            if rank == root:
                assert read() == every
        elif call == "Ialltoall":
            mine = [rank * 10.0 + q + i / 2 for q in range(size) for i in range(2)]
            want = [q * 10.0 + rank + i / 2 for q in range(size) for i in range(2)]
            recv, read = _doubles(base, mine if form == "in_place" else [0.0] * 2 * size)
            send = MPI.IN_PLACE if form == "in_place" else _doubles(base, mine)[0]
            for spec in (send, recv):
                if isinstance(spec, list):
                    spec[1] = 2  # (one rank's block)
            comm.Ialltoall(send, recv).Wait()
            assert read() == want
            break
        elif call == "Ialltoallv":  # rank r sends q + 1 doubles to rank q, then a gap of 1
            counts = [q + 1 for q in range(size)]
            displs = [sum(counts[:q]) + q for q in range(size)]
            rcounts, rdispls = [rank + 1] * size, [(rank + 2) * q for q in range(size)]
            mine = [-1.0] * (displs[-1] + counts[-1])
            for q in range(size):
                mine[displs[q] : displs[q] + counts[q]] = [rank * 10.0 + q] * counts[q]
            recv, read = _doubles("numpy", [0.0] * (rdispls[-1] + rank + 1))
            if form in ("in_place", "double"):
                pytest.skip("Ialltoallv: vector specs only (numpy and spec cases)")
            sbuf, _ = _doubles("numpy", mine)
            if form == "numpy":
                rspec = [recv, rcounts, rdispls, MPI.DOUBLE]
            else:
                rspec = [recv, (rcounts, rdispls), MPI.DOUBLE]
            comm.Ialltoallv([sbuf, (counts, displs), MPI.DOUBLE], rspec).Wait()
            got = read()
            for q in range(size):
                block = got[rdispls[q] : rdispls[q] + rank + 1]
                assert block == [q * 10.0 + rank] * (rank + 1)
            break
        elif call in ("Iscatter", "Iscatterv"):  # Iscatterv: the blocks in reverse order
            every = [q + 0.5 + i for q in range(size) for i in range(2)]
            send = None
            if rank == root:
                order = range(size) if call == "Iscatter" else reversed(range(size))
                send, _ = _doubles(base, [q + 0.5 + i for q in order for i in range(2)])
                if isinstance(send, list):
                    send[1] = 2  # (one rank's block)
                if call == "Iscatterv":
                    obj = send if isinstance(send, np.ndarray) else send[0]
                    displs = [2 * (size - 1 - q) for q in range(size)]
                    send = [obj, ([2] * size, displs), MPI.DOUBLE]
            if rank == root and form == "in_place":
                getattr(comm, call)(send, MPI.IN_PLACE, root).Wait()
                continue
            recv, read = _doubles(base, [-1.0] * 2)
            getattr(comm, call)(send, recv, root).Wait()
            assert read() == every[2 * rank : 2 * rank + 2]
        elif call in ("Iscan", "Iexscan"):
            upto = rank + 1 if call == "Iscan" else rank
            want = [sum(q + 1.0 + i for q in range(upto)) for i in range(2)]
            recv, read = _doubles(base, mine if form == "in_place" else [0.0] * 2)
            send = MPI.IN_PLACE if form == "in_place" else _doubles(base, mine)[0]
            getattr(comm, call)(send, recv, MPI.SUM).Wait()
            if upto:
                assert read() == want
            break
        else:
            total = [sum(q + 1.0 + i for q in range(size)) for i in range(2)]
            recv, read = _doubles(base, mine if form == "in_place" else [0.0] * 2)
            send = MPI.IN_PLACE if form == "in_place" else _doubles(base, mine)[0]
            if call == "Iallreduce":
                comm.Iallreduce(send, recv, MPI.SUM).Wait()
                assert read() == total
                break
            if form == "in_place" and rank != root:
                send = _doubles(base, mine)[0]  # (IN_PLACE is the root's)
            comm.Ireduce(send, recv, MPI.SUM, root).Wait()
            if rank == root:
                assert read() == total
    barrier = call == "Ibarrier"
    assert fronts and all((f == collectives.F_BARRIER) == barrier for f in fronts), fronts
    monkeypatch.undo()  # (the group's own C round again before the next test)


@pytest.mark.parametrize("wait", ["Wait", "Waitall"])
@pytest.mark.parametrize("call", ["Ibarrier", "Ibcast"])
def test_wait_for_late_members_sleeps(comm, call, wait):
    """A Wait (or a Waitall of it) on a started round whose other members come 0.5 s late,
    with nothing else in flight, sleeps on the word the round waits for as a blocking
    collective does (spin, then the doorbell; a look at the engine every watch slice)
    instead of polling the engine every millisecond: it takes little CPU (polling took ~20
    ms here; sleeping ~3.5 ms), and the data arrive."""
    if not _lane_ready(comm):
        pytest.skip("no area with its C accelerator here")
    size, rank = comm.Get_size(), comm.Get_rank()
    root = size - 1  # (a late one)
    buf = np.full(4, rank == root, np.uint8)
    if rank == 0:
        request = comm.Ibarrier() if call == "Ibarrier" else comm.Ibcast(buf, root)
        assert type(request._op) is area.StartedRound  # pending: the others are not there yet
        cpu = time.thread_time()
        request.Wait() if wait == "Wait" else MPI.Request.Waitall([request])
        cpu = time.thread_time() - cpu
        assert cpu < 0.010, f"{cpu * 1e3:.1f} ms of CPU in a {wait} of 0.5 s"
    else:
        time.sleep(0.5)
        (comm.Ibarrier() if call == "Ibarrier" else comm.Ibcast(buf, root)).Wait()
    if call == "Ibcast":
        assert buf.tolist() == [1] * 4


@pytest.mark.parametrize("how", ["Wait", "Test", "wait", "test"])
def test_round_found_complete_ends_in_one_poll(comm, how):
    """A Wait or a Test (and the lowercase ones) of a started round that every member has
    entered ends it in one C poll of the round (StartedRound.complete_here): no poll
    through the engine operation's `done` (its lock, the spin loop), the request null, the
    collective counted as completed by the area."""
    if not _lane_ready(comm):
        pytest.skip("no area with its C accelerator here")
    size, rank = comm.Get_size(), comm.Get_rank()
    token = np.zeros(1, "i4")
    if rank != 0:
        comm.Recv(token, 0, tag=3)
        request = comm.Ibarrier()  # (rank 0 is there: pending at most on the others)
        comm.Send(token, 0, tag=4)
        request.Wait()
        return
    shared = area.current(comm)
    assert shared is not None
    request = comm.Ibarrier()
    assert type(request._op) is area.StartedRound  # pending: the others are not there yet
    for peer in range(1, size):
        comm.Send(token, peer, tag=3)
    for peer in range(1, size):
        comm.Recv(token, peer, tag=4)  # (peer entered the round)
    completed = shared.completed
    called: list[str] = []

    def record(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            called.append(frame.f_code.co_name)
        elif event == "c_call":
            called.append(arg.__name__)

    sys.setprofile(record)
    try:
        result = getattr(request, how)()
    finally:
        sys.setprofile(None)
    assert result == {"Wait": True, "Test": True, "wait": None, "test": (True, None)}[how]
    assert not request
    assert called.count("resume") == 1 and "_look" not in called and "spin" not in called, called
    if how == "Wait":  # (no status: nothing of _fill's is left to do)
        assert "_fill" not in called, called
    assert shared.completed == completed + 1


def test_wait_status_of_a_round_found_complete(comm):
    """Wait(status) of a started round that every member has entered (ended in one C poll,
    StartedRound.complete_here) fills the status of a collective: no source, no tag, no
    data, no error; the request null."""
    if not _lane_ready(comm):
        pytest.skip("no area with its C accelerator here")
    size, rank = comm.Get_size(), comm.Get_rank()
    token = np.zeros(1, "i4")
    buf = np.full(2, rank, "f8")
    if rank != 0:
        comm.Recv(token, 0, tag=3)
        request = comm.Ibcast(buf, 0)
        comm.Send(token, 0, tag=4)
        request.Wait()
        assert buf.tolist() == [0.0, 0.0]
        return
    request = comm.Ibcast(buf, 0)
    for peer in range(1, size):
        comm.Send(token, peer, tag=3)
    for peer in range(1, size):
        comm.Recv(token, peer, tag=4)
    status = MPI.Status()
    status.source, status.tag, status.error = 5, 7, 3
    assert request.Wait(status) is True
    assert not request
    assert (status.source, status.tag, status.error) == (MPI.ANY_SOURCE, MPI.ANY_TAG, 0)
    assert status.Get_count(MPI.BYTE) == 0
