"""The C fronts of the object send, isend and recv (ring.obj_methods): every form of call a
user writes gives what the Python methods give (results, statuses, errors, MPI.pickle's
dumps/loads/protocol), whether the front takes it or hands it to the Python method."""

from __future__ import annotations

import pickle
import warnings

import pytest

from guest_lib.mpi import MPI
from ivshmem_comm import ring


def peers(comm: MPI.Intracomm) -> tuple[int, int]:
    size, rank = comm.Get_size(), comm.Get_rank()
    return (rank + 1) % size, (rank - 1) % size


def test_the_methods_are_c_fronts_on_the_c_path(comm):
    kind = type(MPI.Comm.__dict__["send"]).__name__
    assert kind == ("method_descriptor" if ring.obj_methods is not None else "function")
    for name in ("send", "isend", "recv"):
        assert MPI.Comm.__dict__[name].__doc__.strip()


def test_every_form_of_call(comm):
    dest, source = peers(comm)
    forms = [
        (lambda m: comm.send(m, dest, 5), lambda: comm.recv(None, source, 5)),
        (lambda m: comm.send(m, dest=dest, tag=5), lambda: comm.recv(source=source, tag=5)),
        (lambda m: comm.send(obj=m, dest=dest), lambda: comm.recv(source=source)),
        (lambda m: comm.send(m, dest), lambda: comm.recv()),
        (lambda m: comm.send(m, **{"dest": dest, "tag": 6}), lambda: comm.recv(**{"tag": 6})),
        (lambda m: MPI.Comm.send(comm, m, dest, 7), lambda: MPI.Comm.recv(comm, None, source, 7)),
        (lambda m: comm.isend(m, dest, 8).wait(), lambda: comm.recv(source=source, tag=8)),
        (lambda m: comm.isend(m, dest=dest).wait(), lambda: comm.recv(buf=None, tag=MPI.ANY_TAG)),
        (lambda m: comm.send(m, dest, 9), lambda: comm.recv(source=MPI.ANY_SOURCE, tag=9)),
    ]
    for message in (None, 0, b"", b"x" * 100, "text", [1, {"k": (2, 3.5)}], bytes(70000)):
        for send, recv in forms:
            send(message)
            assert recv() == message
    comm.Barrier()


def test_status_of_every_source(comm):
    dest, source = peers(comm)
    for src in (source, MPI.ANY_SOURCE):
        for tag in (3, MPI.ANY_TAG):
            status = MPI.Status()
            comm.send([1, 2, 3], dest, 3)
            assert comm.recv(source=src, tag=tag, status=status) == [1, 2, 3]
            assert (status.Get_source(), status.Get_tag()) == (source, 3)
            assert status.Get_count(MPI.BYTE) == len(pickle.dumps([1, 2, 3], MPI.pickle.PROTOCOL))
    status = MPI.Status()
    comm.send(None, dest, 4)
    assert comm.recv(None, source, 4, status) is None
    assert status.Get_source() == source
    comm.Barrier()


class Unpicklable:
    """An object whose pickling raises Refused."""

    class Refused(Exception):
        pass

    def __reduce__(self):
        raise self.Refused


def test_errors_are_the_python_methods(comm):
    dest, _ = peers(comm)
    size = comm.Get_size()
    for call in (
        lambda: comm.send(1, size, 0),
        lambda: comm.send(1, dest, -5),
        lambda: comm.send(1, dest, MPI.TAG_UB_VALUE + 1),
        lambda: comm.isend(1, dest, -5),
        lambda: comm.recv(source=size),
        lambda: comm.recv(source=dest, tag=-7),
    ):
        with pytest.raises(MPI.Exception):
            call()
    with pytest.raises(TypeError):
        comm.send(1, dest, 0, 4)
    with pytest.raises(TypeError):
        comm.send(1, dest, nosuch=1)
    with pytest.raises(TypeError):
        comm.send(1, dest, dest=dest)
    with pytest.raises(TypeError):
        comm.recv(None, 0, 0, None, 5)
    with pytest.raises((TypeError, AttributeError)):  # (the descriptor's; the function's)
        MPI.Comm.send(object(), 1, 0)
    for send in (comm.send, comm.isend):
        with pytest.raises(Unpicklable.Refused):
            send(Unpicklable(), dest, 0)
    comm.Barrier()


def test_a_buffer_argument_warns_as_before(comm):
    dest, source = peers(comm)
    comm.send("a", dest, 1)
    comm.send("b", dest, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert comm.recv(bytearray(10), source, 1) == "a"
        assert comm.recv(100, source, 1) == "b"
    assert [w.category for w in caught] == [UserWarning]
    comm.Barrier()


def test_a_custom_pickle_is_honoured(comm):
    dest, source = peers(comm)
    calls = []

    def dumps(obj, *protocol):
        calls.append(("dumps", protocol))
        return pickle.dumps(("wrapped", obj), 2)

    def loads(data):
        calls.append(("loads", ()))
        return ("loaded", pickle.loads(data))

    saved = MPI.pickle.__dict__.copy()
    try:
        MPI.pickle.__init__(dumps, loads, None)
        comm.send({"a": 1}, dest, 2)
        assert comm.recv(source=source, tag=2) == ("loaded", ("wrapped", {"a": 1}))
        comm.isend([5], dest, 2).wait()
        assert comm.recv(source=source, tag=2) == ("loaded", ("wrapped", [5]))
        MPI.pickle.PROTOCOL = 3
        comm.send(7, dest, 2)
        assert comm.recv(source=source, tag=2) == ("loaded", ("wrapped", 7))
    finally:
        MPI.pickle.__dict__.update(saved)
    assert ("dumps", ()) in calls and ("dumps", (3,)) in calls and ("loads", ()) in calls
    comm.send(b"plain", dest, 2)
    assert comm.recv(source=source, tag=2) == b"plain"
    comm.Barrier()


def test_a_subclass_and_a_freed_communicator(comm):
    class Sub(MPI.Intracomm):
        pass

    sub = Sub(comm.Dup())
    dest, source = peers(sub)
    sub.send("sub", dest, 1)
    assert sub.recv(source=source, tag=1) == "sub"
    sub.Free()
    with pytest.raises(MPI.Exception):
        sub.send("x", dest, 1)
    with pytest.raises(MPI.Exception):
        sub.recv(source=source, tag=1)
    comm.Barrier()


def test_an_errhandler_on_the_communicator_still_applies(comm):
    dup = comm.Dup()
    dup.Set_errhandler(MPI.ERRORS_RETURN)
    dest, source = peers(dup)
    dup.send(3, dest, 1)
    assert dup.recv(source=source, tag=1) == 3
    dup.Free()
    comm.Barrier()
