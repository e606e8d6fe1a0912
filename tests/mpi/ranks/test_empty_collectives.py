"""Block collectives of no byte (collectives._skip): every member returns without a word, as
MPICH does, in every buffer form, on every path (the C front, the Python lanes and bodies,
members on different paths in one call), in step with the calls of data around them; argument
errors still raised; vector collectives of no byte still run."""

from __future__ import annotations

import array
import functools
import mmap
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI, collectives, wire

FORMS = ("numpy", "mmap", "bytearray", "array", "double", "derived")


def _empty(form: str) -> Any:
    """A message of no byte in `form` (doubles where the form names a type)."""
    if form == "numpy":
        return np.zeros(0)
    if form == "mmap":
        return [mmap.mmap(-1, 16), 0, MPI.BYTE]
    if form == "bytearray":
        return bytearray(0)
    if form == "array":
        return array.array("d")
    if form == "double":
        return (array.array("d"), MPI.DOUBLE)
    return [np.zeros(4), 0, _pair()]


@functools.cache
def _pair() -> MPI.Datatype:
    """A derived datatype (two doubles), one for the process (the send and receive sides of a
    fold must name the same one)."""
    return MPI.DOUBLE.Create_contiguous(2).Commit()


def _calls(
    comm: MPI.Intracomm, form: str, place: bool, started: bool = False
) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(name, call) of each block collective of no byte in `form` (`place`: IN_PLACE where
    the collective takes it; `started`: its nonblocking form, the call returning its
    Request), root 1 % size."""
    root = 1 % comm.Get_size()
    me = comm.Get_rank()

    def send() -> Any:
        return MPI.IN_PLACE if place else _empty(form)

    def of(name: str) -> Any:
        return getattr(comm, "I" + name[0].lower() + name[1:] if started else name)

    yield "Bcast", lambda: of("Bcast")(_empty(form), root)
    yield (
        "Gather",
        lambda: of("Gather")(
            send() if me == root else _empty(form), _empty(form) if me == root else None, root
        ),
    )
    yield (
        "Scatter",
        lambda: of("Scatter")(
            _empty(form) if me == root else None, send() if me == root else _empty(form), root
        ),
    )
    yield "Allgather", lambda: of("Allgather")(send(), _empty(form))
    yield "Alltoall", lambda: of("Alltoall")(send(), _empty(form))
    yield (
        "Reduce",
        lambda: of("Reduce")(
            send() if me == root else _empty(form),
            _empty(form) if me == root else None,
            MPI.SUM,
            root,
        ),
    )
    yield "Allreduce", lambda: of("Allreduce")(send(), _empty(form), MPI.SUM)
    yield "Reduce_scatter_block", lambda: of("Reduce_scatter_block")(send(), _empty(form), MPI.SUM)
    yield "Scan", lambda: of("Scan")(send(), _empty(form), MPI.SUM)
    yield "Exscan", lambda: of("Exscan")(send(), _empty(form), MPI.SUM)


def _started(comm: MPI.Intracomm, form: str, place: bool) -> list[Callable[[], Any]]:
    """The nonblocking forms of `_calls`' collectives (each call returns its Request)."""
    return [call for _, call in _calls(comm, form, place, started=True)]


def _data_round(comm: MPI.Intracomm) -> None:
    """Collectives of data between the empty ones: results right, members in step."""
    size, rank = comm.Get_size(), comm.Get_rank()
    buf = np.full(3, float(rank))
    comm.Bcast(buf, size - 1)
    assert buf.tolist() == [size - 1.0] * 3
    out = np.zeros(3)
    comm.Allreduce(np.full(3, rank + 1.0), out, MPI.SUM)
    assert out.tolist() == [size * (size + 1) / 2] * 3
    got = np.zeros(size)
    comm.Allgather(np.array([rank * 2.0]), got)
    assert got.tolist() == [2.0 * q for q in range(size)]


@pytest.fixture(params=["WORLD", "Dup"])
def world(request: pytest.FixtureRequest) -> Iterator[MPI.Intracomm]:
    comm = MPI.COMM_WORLD if request.param == "WORLD" else MPI.COMM_WORLD.Dup()
    yield comm
    if comm is not MPI.COMM_WORLD:
        comm.Free()


@pytest.mark.parametrize("place", [False, True], ids=["send", "in_place"])
@pytest.mark.parametrize("form", FORMS)
def test_empty_block_collectives(world: MPI.Intracomm, form: str, place: bool) -> None:
    """Each collective of no byte returns (its buffers untouched: they hold none), between
    collectives of data, in every form."""
    _data_round(world)
    for _, call in _calls(world, form, place):
        call()
        _data_round(world)


@pytest.mark.parametrize("place", [False, True], ids=["send", "in_place"])
@pytest.mark.parametrize("form", FORMS)
def test_empty_started_collectives(world: MPI.Intracomm, form: str, place: bool) -> None:
    """The nonblocking forms of no byte return a complete Request, between collectives of
    data (blocking and nonblocking), in every form."""
    for start in _started(world, form, place):
        request = start()
        if world.Get_size() > 1:
            assert request.Test()  # (complete at once)
        request.Wait()
        done = np.zeros(world.Get_size())
        world.Iallgather(np.array([1.0]), done).Wait()
        assert done.tolist() == [1.0] * world.Get_size()
        _data_round(world)


def _area_round(comm: MPI.Intracomm) -> int | None:
    shared = comm._area  # type: ignore[attr-defined]
    return shared.group._round if shared else None


@pytest.mark.parametrize("form", ["numpy", "mmap", "bytearray"])
def test_empty_takes_no_round(
    world: MPI.Intracomm, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No area round is taken and no message posted: the instance counter alone moves, by
    one per call (deterministic counts, no timing)."""
    if world.Get_size() == 1:
        pytest.skip("a collective of one member is no instance")
    world.Barrier()  # (the area bound, where there is one)
    posted: list[str] = []
    for name in ("_c_isend", "_c_irecv"):
        real = getattr(collectives.Collectives, name)

        def counted(self: Any, *args: Any, _real: Any = real, _name: str = name) -> Any:
            posted.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(collectives.Collectives, name, counted)
    calls = list(_calls(world, form, False))
    starts = list(_started(world, form, False))
    rounds, seq = _area_round(world), world._coll_seq  # type: ignore[attr-defined]
    nb_seq = world._nb_seq  # type: ignore[attr-defined]
    for _, call in calls:
        call()
    for start in starts:
        start().Wait()
    assert _area_round(world) == rounds
    assert world._coll_seq == seq + len(calls)  # type: ignore[attr-defined]
    assert world._nb_seq == nb_seq + len(starts)  # type: ignore[attr-defined]
    assert posted == []
    _data_round(world)


def test_empty_on_mixed_paths(world: MPI.Intracomm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 without the C front (its Python lanes and bodies decide) and the others with it
    decide alike: nobody waits."""
    if world.Get_rank() == 0:
        monkeypatch.setattr(collectives, "_c_front", lambda *args: False)
        monkeypatch.setattr(collectives, "_c_start", lambda *args, **kwargs: None)
    for form in ("numpy", "mmap", "double"):
        for place in (False, True):
            for _, call in _calls(world, form, place):
                call()
            MPI.Request.Waitall([start() for start in _started(world, form, place)])
            _data_round(world)
    world.Allgather(None, np.zeros(0))  # (None: in place, on the C front as in Python)
    world.Iallgather(None, np.zeros(0)).Wait()
    _data_round(world)


def test_empty_argument_errors(world: MPI.Intracomm) -> None:
    """A bad root or mismatched fold datatypes at no byte still raise, on every rank, and
    the communicator goes on."""
    size = world.Get_size()
    for call in (
        lambda: world.Bcast(np.zeros(0), size),
        lambda: world.Gather(np.zeros(0), np.zeros(0), -1),
        lambda: world.Scatter(np.zeros(0), np.zeros(0), size + 3),
        lambda: world.Reduce(np.zeros(0), np.zeros(0), MPI.SUM, size),
    ):
        with pytest.raises(MPI.Exception) as info:
            call()
        assert info.value.Get_error_class() == MPI.ERR_ROOT
        _data_round(world)
    with pytest.raises(ValueError, match="mismatch"):  # (mpi4py's check, at no byte too)
        world.Reduce_scatter_block(np.zeros(0), np.zeros(0, np.int32), MPI.SUM)
    _data_round(world)


def test_empty_vector_collectives_run(world: MPI.Intracomm) -> None:
    """The vector forms of no byte run (a member cannot tell the others' counts): all zero
    here, every rank returns, in step."""
    size = world.Get_size()
    zeros = [0] * size
    world.Gatherv(np.zeros(0), [np.zeros(0), zeros, zeros, MPI.DOUBLE], 0)
    world.Scatterv([np.zeros(0), zeros, zeros, MPI.DOUBLE], np.zeros(0), 0)
    world.Allgatherv(np.zeros(0), [np.zeros(0), zeros, zeros, MPI.DOUBLE])
    world.Igatherv(np.zeros(0), [np.zeros(0), zeros, zeros, MPI.DOUBLE], 0).Wait()
    world.Iallgatherv(np.zeros(0), [np.zeros(0), zeros, zeros, MPI.DOUBLE]).Wait()
    vector = [np.zeros(0), zeros, zeros, MPI.DOUBLE]
    world.Alltoallv(vector, [np.zeros(0), zeros, zeros, MPI.DOUBLE])
    _data_round(world)


def test_empty_persistent_vector_collectives_run(world: MPI.Intracomm) -> None:
    """The persistent vector forms of no byte run as the nonblocking ones (a sender whose
    own part holds no byte while the root's vector spec, counts of zero over a buffer that
    holds some, runs it: mpi4py's test_cco_pr_vec.py, where a sender of Gatherv_init with
    count 0 skipped the round its root took), in step with the calls of data around them."""
    size, rank = world.Get_size(), world.Get_rank()
    zeros, displs = [0] * size, list(range(size))

    def vector() -> list[Any]:
        return [np.full(size, -1.0), zeros, displs, MPI.DOUBLE]

    for root in range(size):
        here = rank == root
        starts = [
            world.Gatherv_init(np.zeros(0), vector() if here else None, root),
            world.Scatterv_init(vector() if here else None, np.zeros(0), root),
            world.Allgatherv_init(np.zeros(0), vector()),
            world.Alltoallv_init(vector(), vector()),
        ]
        for request in starts:
            request.Start()
            request.Wait()
            request.Free()
            got = np.zeros(size) if here else None
            world.Gatherv(np.array([rank + 0.5]), got, root)
            if here:
                assert got.tolist() == [q + 0.5 for q in range(size)]


def test_empty_instances_retire_abandonment_records() -> None:
    """An instance of no byte enters the numbering as a run one does: the record of an
    instance every member abandoned goes half the numbering later, skipped or not, and the
    instance that comes to its tag base next takes its messages (a member on the messages
    path that sends early, before the late root enters: was dropped as the abandoned
    instance's, the root waited for good)."""
    if any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip(
            "ranks across regions (a hybrid job): ABANDON notices come through mpi4py, late"
        )
    comm = MPI.COMM_WORLD.Dup()
    size, rank = comm.Get_size(), comm.Get_rank()
    if size == 1:
        comm.Free()
        pytest.skip("a collective of one member is no instance")
    with pytest.raises(MPI.Exception):  # (every member: a bad root; the area is left)
        comm.Bcast(np.zeros(2), size)
    abandoned = comm._coll_seq - 1  # type: ignore[attr-defined]
    while comm._coll_seq < abandoned + wire.COLL_INSTANCES:  # type: ignore[attr-defined]
        comm.Bcast(np.zeros(0), 0)  # (instances of no byte, up to the base's next turn)
    key = (comm._ctx + 1, wire.coll_base(abandoned))  # type: ignore[attr-defined]
    assert key not in comm._engine.abandoned  # type: ignore[attr-defined]
    if rank == 0:
        time.sleep(0.2)  # (the others' blocks arrive before the root enters)
    got = np.zeros(size) if rank == 0 else None
    comm.Gather(np.array([rank + 0.5]), got, 0)
    if rank == 0:
        assert got.tolist() == [q + 0.5 for q in range(size)]
    comm.Free()
