"""MPI.Info, MPI.buffer / Alloc_mem / Get_address, error handlers (issue #11 point 3)."""

from __future__ import annotations

import array
import pickle

import numpy as np
import pytest

from guest_lib.mpi import MPI


def test_info_table():
    info = MPI.Info.Create({"a": "1"})
    info.Set("b", "2")
    assert info.Get_nkeys() == 2 and info.Get_nthkey(1) == "b" and info.Get("a") == "1"
    assert info.Get("missing") is None and "b" in info and info.items() == [("a", "1"), ("b", "2")]
    info.Delete("a")
    with pytest.raises(MPI.Exception) as err:
        info.Delete("a")
    assert err.value.Get_error_class() == MPI.ERR_INFO_NOKEY
    same = MPI.Info(info)
    dup = info.Dup()
    assert same == info and dup != info and dup.items() == info.items()
    again = pickle.loads(pickle.dumps(info))
    assert again != info and again.items() == info.items()
    assert info.pop("b") == "2" and len(info) == 0
    info.Free()
    assert info == MPI.INFO_NULL and not info and same.Get_nkeys() == 0
    with pytest.raises(KeyError):
        MPI.INFO_NULL["k"] = "v"
    with pytest.raises(TypeError):
        MPI.Info.Create(123)
    assert MPI.INFO_ENV.Get("host") and pickle.loads(pickle.dumps(MPI.INFO_ENV)) is MPI.INFO_ENV
    assert MPI.COMM_WORLD.Dup(MPI.INFO_NULL).Compare(MPI.COMM_WORLD) == MPI.CONGRUENT


def test_alloc_mem_as_message_buffer(comm):
    """Alloc_mem memory is a buffer messages go through; Free_mem empties the handle."""
    size, rank = comm.Get_size(), comm.Get_rank()
    send = MPI.Alloc_mem(64)
    recv = MPI.Alloc_mem(64, MPI.INFO_NULL)
    assert type(send) is MPI.buffer and len(send) == 64 and send.address
    send.cast("i")[:] = array.array("i", range(rank, rank + 16))
    comm.Sendrecv([send, MPI.INT], (rank + 1) % size, 9, [recv, MPI.INT], (rank - 1) % size, 9)
    assert list(recv.cast("i")) == list(range((rank - 1) % size, (rank - 1) % size + 16))
    assert recv[1:5].tobytes() == bytes(memoryview(recv)[1:5])
    with pytest.raises(IndexError):
        recv[::2]
    with pytest.raises(TypeError):
        MPI.buffer(b"ro")[:] = 0
    MPI.Free_mem(send)
    MPI.Free_mem(recv)
    assert (send.address, send.nbytes, send.readonly) == (0, 0, False)


def test_get_address():
    location = array.array("i", range(10))
    assert MPI.Get_address(location) == location.buffer_info()[0]
    values = np.arange(10, dtype="i")
    assert MPI.Get_address(values) == values.__array_interface__["data"][0]
    assert MPI.Aint_diff(MPI.Aint_add(MPI.Get_address(values), 8), MPI.Get_address(values)) == 8
    assert MPI.Get_address(MPI.BOTTOM) == MPI.Get_address(None) == 0
    struct_type = MPI.Datatype.Create_struct(
        [1, 1],
        [0, MPI.Get_address(values[4:]) - MPI.Get_address(values)],
        [MPI.INT, MPI.INT],
    )
    assert struct_type.Get_extent() == (0, 20)


def test_errhandler_return_and_user(comm):
    size = comm.Get_size()
    assert comm.Get_errhandler() == MPI.ERRORS_RETURN
    with pytest.raises(MPI.Exception):
        comm.Send(b"x", size + 5)
    calls = []
    handler = MPI.Comm.Create_errhandler(lambda c, code: calls.append((c, code)))
    comm.Set_errhandler(handler)
    assert comm.Get_errhandler() == handler
    with pytest.raises(MPI.Exception):
        comm.Send(b"x", size + 5)
    with pytest.raises(MPI.Exception):
        comm.send("x", dest=0, tag=-5)
    assert calls == [(comm, MPI.ERR_RANK), (comm, MPI.ERR_TAG)]
    comm.Call_errhandler(MPI.ERR_OTHER)
    assert calls[-1] == (comm, MPI.ERR_OTHER)
    assert comm.allreduce(1) == size  # calls still work through the handler
    dup = comm.Dup()  # inherits the handler
    assert dup.Get_errhandler() == handler
    with pytest.raises(MPI.Exception):
        dup.Send(b"x", size + 5)
    assert calls[-1] == (dup, MPI.ERR_RANK)
    calls.pop()
    dup.Free()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    with pytest.raises(MPI.Exception):
        comm.Send(b"x", size + 5)
    assert len(calls) == 3
    handler.Free()
    assert not handler and pickle.loads(pickle.dumps(MPI.ERRORS_RETURN)) is MPI.ERRORS_RETURN
    with pytest.raises(MPI.Exception):
        comm.Set_errhandler(MPI.ERRHANDLER_NULL)


def test_errhandler_in_effect_at_the_error_and_err_in_status(comm):
    """A handler set after a request was made applies to its error at Wait (MPI: the
    handler in effect when the error is raised). Waitall with two failing requests of three
    calls the handler once, with ERR_IN_STATUS, raises that class, and each status holds
    its request's error (SUCCESS for the one that did not fail); Waitsome likewise."""
    dup = comm.Dup()
    rank = dup.Get_rank()
    calls: list[int] = []
    handler = MPI.Comm.Create_errhandler(lambda c, code: calls.append(code))
    early = dup.Irecv(bytearray(2), rank, 1)  # made under ERRORS_RETURN
    dup.Set_errhandler(handler)
    dup.Send(b"12345", rank, 1)
    with pytest.raises(MPI.Exception) as error:
        early.Wait()
    assert error.value.Get_error_class() == MPI.ERR_TRUNCATE and calls == [MPI.ERR_TRUNCATE]
    calls.clear()
    dup.Set_errhandler(MPI.ERRORS_RETURN)
    requests = [
        dup.Irecv(bytearray(1), rank, 2),
        dup.Irecv(bytearray(8), rank, 3),
        dup.Irecv(bytearray(1), rank, 4),
    ]
    dup.Set_errhandler(handler)
    for tag in (2, 3, 4):
        dup.Send(b"abc", rank, tag)
    statuses = [MPI.Status() for _ in requests]
    with pytest.raises(MPI.Exception) as error:
        MPI.Request.Waitall(requests, statuses)
    assert error.value.Get_error_class() == MPI.ERR_IN_STATUS
    assert calls == [MPI.ERR_IN_STATUS]
    assert [s.Get_error() for s in statuses] == [MPI.ERR_TRUNCATE, MPI.SUCCESS, MPI.ERR_TRUNCATE]
    assert all(r == MPI.REQUEST_NULL for r in requests)
    calls.clear()
    failing = dup.Irecv(bytearray(1), rank, 5)
    dup.Send(b"abc", rank, 5)
    with pytest.raises(MPI.Exception) as error:
        MPI.Request.Waitsome([failing])
    assert error.value.Get_error_class() == MPI.ERR_IN_STATUS and calls == [MPI.ERR_IN_STATUS]
    dup.Free()
    handler.Free()
