"""C handle cells (MPI._sizeof/_addressof/_handleof), used through ctypes as C code would:
a null handle whose cell is written with a live handle's value works as that handle."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI


def _cell(obj: object) -> ctypes.c_uint64:
    """The handle's cell, as C sees it (`MPI_Comm *` and the like)."""
    assert MPI._sizeof(obj) == MPI._sizeof(type(obj)) == ctypes.sizeof(ctypes.c_uint64)
    return ctypes.c_uint64.from_address(MPI._addressof(obj))


def _written(kind: type, handle: int) -> Any:
    """A new null handle of `kind` whose cell C wrote `handle` into."""
    new = kind()
    cell = _cell(new)
    assert cell.value == 0 == MPI._handleof(new)
    cell.value = handle
    return new


def test_an_adopted_comm_sends_as_the_communicator():
    world = MPI.COMM_WORLD
    comm = world.Dup()
    new = _written(MPI.Comm, MPI._handleof(comm))
    assert new == comm and comm == new and type(new) is MPI.Comm
    rank, size = new.Get_rank(), new.Get_size()
    assert (rank, size) == (world.Get_rank(), world.Get_size())
    out = np.array([rank], dtype="i")
    got = np.empty(1, dtype="i")
    request = new.Isend(out, dest=(rank + 1) % size, tag=7)
    comm.Recv(got, source=(rank - 1) % size, tag=7)  # the Dup's context: the same communicator
    request.Wait()
    assert got[0] == (rank - 1) % size
    assert MPI._handleof(new) == MPI._handleof(comm) == _cell(new).value
    new.Free()  # frees the communicator (every handle on it is null after, as `comm` here)
    assert not new and not comm


def test_an_adopted_datatype_and_op_work_as_theirs():
    vector = MPI.DOUBLE.Create_vector(3, 1, 2).Commit()
    datatype = _written(MPI.Datatype, MPI._handleof(vector))
    assert datatype == vector and datatype.Get_extent() == vector.Get_extent()
    source = np.arange(6, dtype="d")
    target = np.zeros(6, dtype="d")
    MPI.COMM_SELF.Sendrecv([source, 1, datatype], 0, 3, [target, 1, datatype], 0, 3)
    assert target.tolist() == [0.0, 0.0, 2.0, 0.0, 4.0, 0.0]
    vector.Free()

    op = MPI.Op.Create(lambda a, b, _t: np.maximum(np.asarray(a), np.asarray(b), out=b))
    adopted = _written(MPI.Op, MPI._handleof(op))
    assert adopted == op and adopted.Is_commutative() == op.Is_commutative()
    world = MPI.COMM_WORLD
    got = np.empty(1, dtype="i")
    world.Allreduce(np.array([world.Get_rank()], dtype="i"), got, op=adopted)
    assert got[0] == world.Get_size() - 1
    op.Free()


def test_an_adopted_request_completes_the_operation():
    comm = MPI.COMM_SELF
    got = bytearray(3)
    request = comm.Irecv(got, source=0, tag=5)
    new = _written(MPI.Request, MPI._handleof(request))
    assert new == request
    comm.Send(b"abc", dest=0, tag=5)
    status = MPI.Status()
    new.Wait(status)
    assert bytes(got) == b"abc" and status.Get_source() == 0 and status.Get_tag() == 5
    assert not new and MPI._handleof(new) == 0 == _cell(new).value


def test_a_cell_naming_no_live_handle_leaves_the_handle_null():
    comm = MPI.COMM_WORLD.Dup()
    number = MPI._handleof(comm)
    comm.Free()  # its number names no live communicator now
    for value in (number, MPI._handleof(MPI.SUM), 1 << 60):  # a freed one, another kind, none
        new = _written(MPI.Comm, value)
        assert not new and new == MPI.COMM_NULL
        with pytest.raises(MPI.Exception):
            new.Get_size()
        assert MPI._handleof(new) == 0 == _cell(new).value  # written back
        assert type(type(new).fromhandle(0)) is MPI.Comm  # (not the class that reads the cell)
        assert type(type(new).fromhandle(MPI.COMM_WORLD.handle)) is MPI.Intracomm


def test_a_live_handles_cell_is_read_at_handleof():
    """Another live communicator's value makes it that one; 0 a null handle (not freeing
    the communicator); a value naming nothing raises ValueError and is overwritten."""
    world = MPI.COMM_WORLD
    one, two = world.Dup(), world.Dup()
    handle = MPI.Comm(one)
    cell = _cell(handle)
    assert cell.value == MPI._handleof(one) != MPI._handleof(two)
    cell.value = MPI._handleof(two)
    assert MPI._handleof(handle) == MPI._handleof(two) and handle == two
    cell.value = 0
    assert MPI._handleof(handle) == 0 and not handle
    assert one and two and one.Get_size() == world.Get_size()
    cell.value = MPI._handleof(one)  # a null one again: it adopts at its next use
    assert handle.Get_size() == world.Get_size() and handle == one
    cell.value = 1 << 60
    with pytest.raises(ValueError):
        MPI._handleof(handle)
    assert cell.value == MPI._handleof(one) and handle == one
    one.Free()
    two.Free()


def test_predefined_handles_keep_their_cells():
    cell = _cell(MPI.COMM_NULL)
    cell.value = MPI._handleof(MPI.COMM_WORLD)
    with pytest.raises(ValueError):
        MPI._addressof(MPI.COMM_NULL)
    assert cell.value == 0 and not MPI.COMM_NULL and type(MPI.COMM_NULL) is MPI.Intracomm


def test_a_status_cell_is_its_fields():
    status = MPI.Status()
    assert MPI._sizeof(status) == MPI._sizeof(MPI.Status) == 40
    fields = (ctypes.c_int64 * 5).from_address(MPI._addressof(status))
    assert MPI._handleof(status) == MPI._addressof(status)
    fields[2], fields[3], fields[4] = 3, 9, MPI.ERR_TAG  # source, tag, error as C writes them
    assert (status.source, status.tag, status.error) == (3, 9, MPI.ERR_TAG)
    status.Set_source(1)
    assert fields[2] == 1


@pytest.mark.parametrize("call", [MPI._sizeof, MPI._addressof, MPI._handleof])
def test_not_a_handle_is_a_type_error(call):
    for value in (None, 1, "x", object(), MPI.buffer(bytearray(1))):
        with pytest.raises(TypeError):
            call(value)
    if call is not MPI._sizeof:
        with pytest.raises(TypeError):
            call(MPI.Comm)
