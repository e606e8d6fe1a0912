"""Collectives with Python objects."""

from __future__ import annotations

import pytest

from guest_lib.mpi import MPI

OBJECTS = [None, 7, "text", [1, (2, 3)], {"k": 1.5}]


def test_barrier(comm):
    for _ in range(5):
        comm.barrier()


def test_bcast(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    for root in range(size):
        for obj in OBJECTS:
            assert comm.bcast(obj if rank == root else None, root=root) == obj
    big = list(range(300_000)) if rank == 0 else None
    assert comm.bcast(big, root=0) == list(range(300_000))


def test_gather_scatter(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    for root in range(size):
        got = comm.gather((rank, "x"), root=root)
        assert got == ([(r, "x") for r in range(size)] if rank == root else None)
        items = [r * 10 for r in range(size)] if rank == root else None
        assert comm.scatter(items, root=root) == rank * 10


def test_allgather_alltoall(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    assert comm.allgather({"r": rank}) == [{"r": r} for r in range(size)]
    got = comm.alltoall([(rank, dest) for dest in range(size)])
    assert got == [(src, rank) for src in range(size)]


def test_scatter_alltoall_of_every_size(comm):
    """Pickles from empty to over a collective slab (bundled in the area up to a slab, by
    messages above), mixed within one alltoall (odd ranks send large items, even ones
    small); every item is checked and of its own length."""
    size, rank = comm.Get_size(), comm.Get_rank()
    for n in (0, 1, 1000, 40_000, 300_000):
        for root in range(size):
            items = [bytes([r % 251]) * (n + r) for r in range(size)] if rank == root else None
            assert comm.scatter(items, root) == bytes([rank % 251]) * (n + rank)
        items = [bytes([(rank * 7 + q) % 251]) * (n * (rank % 2) + q) for q in range(size)]
        got = comm.alltoall(items)
        assert got == [bytes([(r * 7 + rank) % 251]) * (n * (r % 2) + rank) for r in range(size)]
    assert comm.alltoall(None) == [None] * size
    assert comm.scatter(None, 0) is None


def test_scatter_alltoall_lengths_checked(comm):
    """A sequence of the wrong length is an error on the rank that passes it (MPI.Exception
    on the others, which that rank's abandonment tells), and the next calls work."""
    if any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip("an abandoned collective is told over shared memory only (issue #11)")
    size, rank = comm.Get_size(), comm.Get_rank()
    with pytest.raises((ValueError, MPI.Exception)):
        comm.alltoall([0] * (size + 1) if rank == 0 else [0] * size)
    with pytest.raises((ValueError, MPI.Exception)):
        comm.scatter([0] * (size + 1), 0)
    assert comm.alltoall(list(range(size))) == [rank] * size
    assert comm.scatter(list(range(size)) if rank == 0 else None, 0) == rank


@pytest.mark.parametrize("call", ["gather", "alltoall"])
def test_bad_argument_of_one_rank_in_a_first_collective(comm, call):
    """A communicator's first collective binds its collective area on every member before
    any argument is looked at: an argument only one rank gets wrong (an unpicklable object,
    a sequence of the wrong length) fails that call on that rank and on those that wait for
    it (gather: the root; alltoall: all), and the members still agree on the path of the
    next ones (they hung when the bad rank raised before binding)."""
    if any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip("an abandoned collective is told over shared memory only (issue #11)")
    size, rank = comm.Get_size(), comm.Get_rank()
    if size < 2:
        pytest.skip("one rank")
    fresh = comm.Dup()
    bad = rank == size - 1
    try:
        if call == "gather":
            fresh.gather((lambda: None) if bad else rank, 0)
        else:
            fresh.alltoall([0] * (size + 1) if bad else [0] * size)
    except (ValueError, TypeError, AttributeError, MPI.Exception):
        pass
    else:
        assert call == "gather" and not bad and rank != 0, "no error"
    assert fresh.allgather(rank) == list(range(size))
    assert fresh.gather(rank, 0) == (list(range(size)) if rank == 0 else None)
    assert fresh.alltoall([rank] * size) == list(range(size))
    fresh.Free()


@pytest.mark.parametrize("op", [MPI.SUM, MPI.PROD, MPI.MAX, MPI.MIN])
def test_reduce_allreduce(comm, op):
    size, rank = comm.Get_size(), comm.Get_rank()
    values = [r + 1 for r in range(size)]
    expect = values[0]
    for v in values[1:]:
        expect = op(expect, v)
    for root in range(size):
        got = comm.reduce(rank + 1, op=op, root=root)
        assert got == (expect if rank == root else None)
    assert comm.allreduce(rank + 1, op=op) == expect


def test_loc_ops(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    value = (rank % 2, rank)
    assert comm.allreduce(value, op=MPI.MAXLOC) == ((1, 1) if size > 1 else (0, 0))
    assert comm.allreduce(value, op=MPI.MINLOC) == (0, 0)


def test_scan_exscan(comm):
    rank = comm.Get_rank()
    assert comm.scan(rank + 1) == sum(range(1, rank + 2))
    got = comm.exscan(rank + 1)
    assert got == (None if rank == 0 else sum(range(1, rank + 1)))


@pytest.mark.parametrize("call", ["reduce", "allreduce", "scan", "exscan"])
def test_error_of_a_reduction_op_then_more(comm, call):
    """An error of an object reduction's op is raised where it folds (after its gather moved
    every object); the ranks that fold nothing return; the communicator's next collectives
    run as before."""
    if any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip(
            "ranks across regions (a hybrid job): each region's lead folds, inside the instance"
        )
    size, rank = comm.Get_size(), comm.Get_rank()

    def failing(a, b):
        raise ZeroDivisionError("op")

    runs = {
        "reduce": (lambda op: comm.reduce(rank, op, 0), rank == 0 and size > 1),
        "allreduce": (lambda op: comm.allreduce(rank, op), size > 1),
        "scan": (lambda op: comm.scan(rank, op), rank > 0),
        "exscan": (lambda op: comm.exscan(rank, op), rank > 1),
    }
    run, folds = runs[call]
    if folds:
        with pytest.raises(ZeroDivisionError):
            run(failing)
    else:
        run(failing)
    wants = {
        "reduce": sum(range(size)) if rank == 0 else None,
        "allreduce": sum(range(size)),
        "scan": sum(range(rank + 1)),
        "exscan": sum(range(rank)) if rank else None,
    }
    assert run(MPI.SUM) == wants[call]
    assert comm.allgather(rank) == list(range(size))
    assert comm.bcast(rank, 0) == 0


def test_user_op_noncommutative(comm):
    size = comm.Get_size()
    concat = MPI.Op.Create(lambda a, b, _datatype: a + b, commute=False)
    assert comm.allreduce([comm.Get_rank()], op=concat) == list(range(size))


@pytest.mark.parametrize("thread", [False, True], ids=["alone", "with_a_thread"])
@pytest.mark.parametrize("call", ["bcast", "gather", "scatter", "allgather", "alltoall"])
def test_each_object_pickled_once(comm, call, thread):
    """An object collective pickles each object once, on its front's way (one C call) and on
    its body's (taken with another thread alive: the lock of mpi4py's name) alike."""
    import pickle
    import threading

    if any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip("ranks across regions (a hybrid job): the hierarchy pickles per level")
    size, rank = comm.Get_size(), comm.Get_rank()
    calls = []

    def counting(obj, *protocol):
        calls.append(obj)
        return pickle.dumps(obj, *protocol)

    comm.Barrier()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait) if thread else None
    if other is not None:
        other.start()
    MPI.pickle.__init__(counting, pickle.loads)
    try:
        root = size - 1
        if call == "bcast":
            assert comm.bcast("b" if rank == root else None, root) == "b"
            want = int(rank == root)
        elif call == "gather":
            assert comm.gather(rank, root) == (list(range(size)) if rank == root else None)
            want = int(rank != root)
        elif call == "scatter":
            items = [("s", q) for q in range(size)] if rank == root else None
            assert comm.scatter(items, root) == ("s", rank)
            want = size - 1 if rank == root else 0
        elif call == "allgather":
            assert comm.allgather(rank) == list(range(size))
            want = 1
        else:
            got = comm.alltoall([(rank, q) for q in range(size)])
            assert got == [(q, rank) for q in range(size)]
            want = size - 1
    finally:
        MPI.pickle.__init__(pickle.dumps, pickle.loads)
        stop.set()
        if other is not None:
            other.join()
    assert len(calls) == (want if size > 1 else 0), calls
