"""THREAD_MULTIPLE (issue #11 point 4): several threads of every rank calling MPI at once.

Each test starts its threads, joins them with a bound (a hang fails the test instead of the
job) and re-raises the first exception a thread met. Thread t of every rank talks to thread t
of the others, by tag t or on its own communicator, so the traffic of one thread pair never
matches another's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from guest_lib.mpi import MPI

THREADS = 4
JOIN_S = 90.0  # bound on a whole test's threads


def _across_regions() -> bool:
    """True when some ranks of the world are reached through mpi4py (hybrid jobs)."""
    return any(route == 2 for route, _ in MPI._internal_state()["routes"])


def _run_threads(body: Callable[[int], None], count: int = THREADS) -> None:
    """Run body(t) in `count` threads; fail with the first error, or if any is still running
    after JOIN_S seconds (a hang)."""
    errors: list[BaseException] = []

    def runner(t: int) -> None:
        try:
            body(t)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(t,), daemon=True) for t in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    stuck = [t for t, thread in enumerate(threads) if thread.is_alive()]
    assert not stuck, f"threads {stuck} still running after {JOIN_S} s"


def test_thread_level():
    """mpi4py's default: THREAD_MULTIPLE, granted and reported; the importing thread is the
    main one, another is not."""
    assert MPI.Query_thread() == MPI.THREAD_MULTIPLE
    assert MPI.Init_thread(MPI.THREAD_MULTIPLE) == MPI.THREAD_MULTIPLE
    assert MPI.Is_thread_main()
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(MPI.Is_thread_main()))
    thread.start()
    thread.join()
    assert seen == [False]
    if _across_regions():
        from guest_lib.mpi import native  # MPICH, carrying the other threads' traffic too

        assert native.MPI().Query_thread() == native.MPI().THREAD_MULTIPLE


def test_pickled_objects_distinct_tags():
    """The issue's reproducer: 4 threads per rank, each exchanging 2,000 pickled objects with
    its neighbours on its own tag (before the engine was thread-safe: `list.remove(x): x not
    in list` in _match_posted, and the other threads hung)."""
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    right, left = (rank + 1) % size, (rank - 1) % size
    count = 500 if _across_regions() else 2000  # (MPICH's route: ~4x slower per message)

    def body(t: int) -> None:
        for i in range(count):
            request = comm.isend({"t": t, "i": i, "from": rank, "pad": [i] * (i % 7)}, right, t)
            got = comm.recv(source=left, tag=t)
            assert got == {"t": t, "i": i, "from": left, "pad": [i] * (i % 7)}, got
            request.wait()

    _run_threads(body)
    comm.Barrier()


def test_blocking_buffers_distinct_tags():
    """Blocking Send/Recv of numpy buffers (the fast paths) from 4 threads at once."""
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    right, left = (rank + 1) % size, (rank - 1) % size

    def body(t: int) -> None:
        out = np.empty(64, "i")
        got = np.empty(64, "i")
        for i in range(300):
            out[:] = rank * 1000 + t * 100 + i % 100
            if rank % 2 == 0:
                comm.Send(out, right, t)
                comm.Recv(got, left, t)
            else:
                comm.Recv(got, left, t)
                comm.Send(out, right, t)
            assert (got == left * 1000 + t * 100 + i % 100).all(), (t, i, got[:4])

    if size % 2 == 0 or size == 1:  # (an odd ring of blocking sends could wait on itself)
        _run_threads(body)
    comm.Barrier()


def _mixed(comm: MPI.Intracomm, t: int, rounds: int) -> None:
    """One thread's share of the stress test on its own communicator `comm`: blocking,
    nonblocking (Test, Wait, Waitany) and collective calls, checked."""
    size, rank = comm.Get_size(), comm.Get_rank()
    right, left = (rank + 1) % size, (rank - 1) % size
    for i in range(rounds):
        # nonblocking buffers, completed by Test polling then Waitany
        sbuf = np.full(16 + i % 5, rank * 10 + t, "d")
        rbuf = np.empty(16 + i % 5, "d")
        requests = [comm.Irecv(rbuf, left, 1000 + i), comm.Isend(sbuf, right, 1000 + i)]
        while not requests[0].Test():
            pass
        assert MPI.Request.Waitany(requests) in (0, 1, MPI.UNDEFINED)
        MPI.Request.Waitall(requests)
        assert (rbuf == left * 10 + t).all()
        # objects: isend + blocking recv, then irecv + wait
        request = comm.isend((t, i, rank), right, 7)
        assert comm.recv(source=left, tag=7) == (t, i, left)
        request.wait()
        incoming = comm.irecv(source=left, tag=8)
        comm.send([t, i] * (i % 3), right, 8)
        assert incoming.wait() == [t, i] * (i % 3)
        # collectives: objects, buffers, a nonblocking barrier
        assert comm.allreduce(i + rank, op=MPI.SUM) == size * i + size * (size - 1) // 2
        assert comm.bcast((t, i) if rank == i % size else None, root=i % size) == (t, i)
        total = np.empty(3, "i")
        comm.Allreduce(np.full(3, rank + t, "i"), total, MPI.SUM)
        assert (total == size * t + size * (size - 1) // 2).all()
        comm.Ibarrier().Wait()
        # nonblocking collectives started together (Idup among them), completed at once
        summed = np.empty(2, "i")
        requests = [comm.Iallreduce(np.full(2, rank + i, "i"), summed, MPI.SUM)]
        gathered = np.empty(size, "i")
        requests.append(comm.Iallgather(np.full(1, rank * 3 + t, "i"), gathered))
        dup = None
        if i % 10 == 0:
            dup, request = comm.Idup()
            requests.append(request)
        requests.append(comm.Ibarrier())
        MPI.Request.Waitall(requests)
        assert (summed == size * i + size * (size - 1) // 2).all()
        assert list(gathered) == [r * 3 + t for r in range(size)]
        if dup is not None:
            assert dup.allreduce(rank) == size * (size - 1) // 2
            dup.Free()
            comm.Barrier()


def test_stress_mixed_calls_own_comm():
    """Threads on every rank, each on its own Dup (the Dups made by the threads at once, on
    parents of their own), mixing blocking, nonblocking and collective calls; then Split and
    Free from the threads too."""
    world = MPI.COMM_WORLD
    parents = [world.Dup() for _ in range(THREADS)]

    def body(t: int) -> None:
        comm = parents[t].Dup()
        try:
            _mixed(comm, t, 40)
            half = comm.Split(comm.Get_rank() % 2, comm.Get_rank())
            assert half.allreduce(1) == len(range(comm.Get_rank() % 2, comm.Get_size(), 2))
            half.Free()
        finally:
            comm.Free()

    _run_threads(body)
    for parent in parents:
        parent.Free()
    world.Barrier()


def test_blocked_recv_leaves_sends_going():
    """One thread blocked in Recv (its message comes last) while another thread of the same
    rank sends and receives 4 MiB messages, which need the receiving rank to make progress
    while its own blocked thread waits: the blocked Recv must not stop it."""
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    right, left = (rank + 1) % size, (rank - 1) % size
    late = np.zeros(4, "i")
    big = np.full(1 << 20, rank, "i")
    got = np.empty(1 << 20, "i")

    def body(t: int) -> None:
        if t == 0:
            comm.Recv(late, left, 999)  # blocks until the other thread's traffic is over
            assert (late == left).all()
            return
        time.sleep(0.05)  # the receive above blocks before this traffic starts
        for _ in range(3):
            if rank % 2 == 0:
                comm.Send(big, right, 998)
                comm.Recv(got, left, 998)
            else:
                comm.Recv(got, left, 998)
                comm.Send(big, right, 998)
            assert (got == left).all()
        comm.Send(np.full(4, rank, "i"), right, 999)

    if size % 2 == 0 or size == 1:  # (an odd ring of blocking sends could wait on itself)
        _run_threads(body, 2)
    comm.Barrier()


def test_waiters_see_completions_of_others():
    """Many threads block in Wait at once on receives that one late send completes each: a
    thread woken by the engine must let the others see their requests complete."""
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    right, left = (rank + 1) % size, (rank - 1) % size
    got: dict[int, object] = {}

    def waiter(t: int) -> None:
        got[t] = comm.irecv(source=left, tag=100 + t).wait()

    threads = [threading.Thread(target=waiter, args=(t,), daemon=True) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)  # the waiters block before anything comes
    for t in reversed(range(THREADS)):
        comm.send(("late", t, rank), right, 100 + t)
    for thread in threads:
        thread.join(JOIN_S)
    assert got == {t: ("late", t, left) for t in range(THREADS)}
    comm.Barrier()


def test_windows_from_threads():
    """Windows used from several threads at once: threads 1..3 of every rank run passive
    epochs (Lock/Unlock, shared and exclusive) on window A with Accumulate, Put, Flush and
    Get, while thread 0 runs Fence epochs (Put to the right neighbour, checked) on window B.
    A process has one epoch per target at a time (MPI): the threads of a rank take turns on
    a target through a lock of their own, not on the window. Accumulated counts come out
    exact and every Get reads what its own thread put. Then every thread accumulates to
    every target inside one Lock_all epoch of the main thread: one LOCK request per target
    (several threads making the first request at once), no lock left behind."""
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    rounds = 8 * size
    counts = MPI.Win.Allocate(size * 8, 8, comm=comm)  # slot r: accumulates of rank r
    slots = np.zeros(THREADS * size, "i8")  # slot t * size + r: what thread t of rank r put
    puts = MPI.Win.Create(slots, 8, comm=comm)
    ring = np.zeros(2, "i8")
    fences = MPI.Win.Create(ring, 8, comm=comm)
    turns = [threading.Lock() for _ in range(size)]
    for win in (counts, puts, fences):
        win.Fence()

    def passive(t: int) -> None:
        for i in range(rounds):
            target = (rank + i + t) % size
            kind = MPI.LOCK_EXCLUSIVE if i % 3 == 0 else MPI.LOCK_SHARED
            with turns[target]:
                counts.Lock(target, kind)
                counts.Accumulate(np.array([1], "i8"), target, rank, MPI.SUM)
                counts.Unlock(target)
                value = np.array([1000 * t + i], "i8")
                got = np.zeros(1, "i8")
                puts.Lock(target, kind)
                puts.Put(value, target, t * size + rank)
                puts.Flush(target)
                puts.Get(got, target, t * size + rank)
                puts.Unlock(target)
                assert got[0] == value[0], (t, i, target, got)

    def active() -> None:
        for i in range(rounds):
            fences.Put(np.array([rank, i], "i8"), (rank + 1) % size)
            fences.Fence()
            assert ring.tolist() == [(rank - 1) % size, i], (i, ring)
            fences.Fence()

    def shared(t: int) -> None:  # every thread inside the main thread's Lock_all epoch
        for i in range(rounds):
            target = (i + t) % size
            counts.Accumulate(np.array([1], "i8"), target, rank, MPI.SUM)
            old = np.zeros(1, "i8")
            counts.Fetch_and_op(np.array([1], "i8"), old, target, rank, MPI.SUM)
            counts.Flush(target)

    _run_threads(lambda t: active() if t == 0 else passive(t))
    counts.Fence()
    puts.Fence()
    mine = np.frombuffer(counts.tomemory(), "i8")
    assert mine.tolist() == [(THREADS - 1) * rounds // size] * size, mine
    counts.Fence()  # every rank has checked before the next phase adds to its memory
    counts.Lock_all()
    _run_threads(shared)
    counts.Unlock_all()
    for target in range(size):  # no lock left behind: an exclusive one is granted
        total = np.zeros(1, "i8")
        counts.Lock(target, MPI.LOCK_EXCLUSIVE)
        counts.Fetch_and_op(np.zeros(1, "i8"), total, target, rank, MPI.NO_OP)
        counts.Unlock(target)
        assert total[0] == (THREADS - 1 + 2 * THREADS) * rounds // size, total
    counts.Fence()
    for win in (counts, puts, fences):
        win.Free()


THINK_S = 10e-6  # rank 1's work before each answer


def _pingpong_best(comm: MPI.Intracomm, chunks: int = 5, iters: int = 50) -> float:
    """Seconds of the fastest of `chunks` runs of `iters` blocking Send/Recv round trips of
    4 bytes between ranks 0 and 1 (the others wait at the barriers), rank 1 computing for
    THINK_S before each answer: rank 0's receive waits longer than a crowded wait's spin
    (2 us), as a real code's does, so a receive that then slept on the doorbell shows."""
    rank = comm.Get_rank()
    out, got = np.zeros(1, "i"), np.zeros(1, "i")
    best = float("inf")
    for _ in range(chunks):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(iters if rank < 2 else 0):
            if rank == 0:
                comm.Send(out, 1, 5)
                comm.Recv(got, 1, 5)
            else:
                comm.Recv(got, 0, 5)
                busy_until = time.perf_counter() + THINK_S
                while time.perf_counter() < busy_until:
                    pass
                comm.Send(out, 0, 5)
        best = min(best, time.perf_counter() - start)
    return best


def test_idle_thread_keeps_blocking_latency():
    """A second Python thread that never calls MPI (a logger, a pool's idle worker) turns
    the engine lock on, but blocking Send/Recv latency stays that of a lone thread: the
    receive still waits in the core (before: it only polled, then slept on the doorbell
    through the engine for every message: 500x slower on a loaded machine; and where ranks
    outnumber CPUs it skipped the crowded wait's yield phase, so it slept whenever the answer
    took longer than the 2 us spin: 6x slower with THINK_S, 7-18x in CI). Best-of-chunks
    figures, states interleaved, up to 3 attempts: a loaded machine only ever adds time."""
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        pytest.skip("needs two ranks")
    cpus = sorted(os.sched_getaffinity(0))
    if comm.Get_rank() < 2 and len(cpus) >= 2:  # ranks 0 and 1 on CPUs of their own
        os.sched_setaffinity(0, {cpus[comm.Get_rank()]})
    try:
        _compare_latency(comm)
    finally:
        os.sched_setaffinity(0, cpus)


def _compare_latency(comm: MPI.Intracomm) -> None:
    figures = []
    for _ in range(3):
        alone = _pingpong_best(comm)
        stop = threading.Event()
        idle = threading.Thread(target=stop.wait, daemon=True)
        idle.start()
        try:
            threaded = _pingpong_best(comm)
        finally:
            stop.set()
            idle.join()
        figures.append((alone, threaded))
        if comm.bcast(threaded < 4 * alone, root=0):  # (rank 0's figures decide for all)
            return
    pytest.fail(f"ping-pong (alone s, with an idle thread s), 3 attempts: {figures}")
