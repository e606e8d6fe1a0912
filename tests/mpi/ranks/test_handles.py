"""Integer handles (handle/fromhandle/toint/fromint/py2f/f2py) as mpi4py's: a handle's
number gives back an equal handle; null handles are 0."""

from __future__ import annotations

import pytest

from guest_lib.mpi import MPI


def test_numbers_give_back_equal_handles():
    comm = MPI.COMM_WORLD.Dup()
    request = comm.Irecv(bytearray(1), source=MPI.PROC_NULL)
    objects = [comm, MPI.COMM_WORLD, comm.Get_group(), MPI.DOUBLE.Create_vector(2, 1, 3),
               MPI.SUM, MPI.Op.Create(lambda a, b, t: None), request, MPI.Info.Create(),
               MPI.ERRORS_RETURN, MPI.MESSAGE_NO_PROC]  # fmt: skip
    numbers = set()
    for obj in objects:
        kind = type(obj)
        assert kind.fromhandle(obj.handle) == obj and kind.fromhandle(obj.handle) is not obj
        assert kind.fromint(obj.toint()) == obj and kind.f2py(obj.py2f()) == obj
        assert obj.handle == kind(obj).handle != 0  # handles on one object share it
        numbers.add(obj.handle)
    assert len(numbers) == len(objects)
    request.Wait()
    assert MPI.Request.fromhandle(request.handle) == MPI.REQUEST_NULL  # complete: null
    for null in (MPI.COMM_NULL, MPI.GROUP_NULL, MPI.DATATYPE_NULL, MPI.OP_NULL, MPI.INFO_NULL):
        assert null.handle == 0 and type(null).fromhandle(0) == null
    with pytest.raises(ValueError):
        MPI.Comm.fromhandle(MPI.SUM.handle)  # a number of another class
    comm.Free()


def test_dup_gives_a_subclass_shaped_like_pkl5_its_own_type():
    """mpi4py.util.pkl5's communicators are `Intracomm(Comm, MPI.Intracomm)` with
    `Comm(MPI.Comm)`; Dup must give that type back (it failed with "__class__ assignment:
    'Intracomm' object layout differs" once the handle mixins carried empty __slots__)."""

    class Comm(MPI.Comm):
        pass

    class Intracomm(Comm, MPI.Intracomm):
        pass

    comm = Intracomm(MPI.COMM_WORLD)
    dup = comm.Dup()
    assert type(dup) is Intracomm
    assert dup.allreduce(1) == MPI.COMM_WORLD.Get_size()
    dup.Free()


def test_comm_fromhandle_gives_the_communicators_own_kind():
    """mpi4py's Comm.fromhandle/fromint/f2py give an Intercomm for an intercommunicator and
    a Cartcomm for a Cartesian one, not a plain Comm."""
    world = MPI.COMM_WORLD
    cart = world.Create_cart([world.Get_size()], periods=[True])
    made = [cart]
    if world.Get_size() > 1:
        low = world.Get_rank() < world.Get_size() // 2
        half = world.Split(int(low))
        made.append(half.Create_intercomm(0, world, world.Get_size() // 2 if low else 0, 7))
        half.Free()
    for comm in made:
        for back in (MPI.Comm.fromhandle(comm.handle), MPI.Comm.f2py(comm.py2f())):
            assert type(back) is type(comm) and back == comm
        comm.Free()


def test_mpi_namespace_holds_no_modules():
    """mpi4py's MPI namespace holds no module objects (its test_doc walks vars(MPI) and
    would descend into one, numpy's or threading's, without end), and `from MPI import *`
    gives none."""
    import types

    assert [name for name, value in vars(MPI).items() if isinstance(value, types.ModuleType)] == []
    assert not [name for name in MPI.__all__ if isinstance(getattr(MPI, name), types.ModuleType)]
    assert MPI.Wtick() > 0 and MPI.Wtime() > 0 and MPI.Get_processor_name()
    assert MPI.Is_thread_main() and MPI.Query_thread() in (MPI.THREAD_SINGLE, MPI.THREAD_MULTIPLE)
    lock = MPI._comm_lock(MPI.COMM_SELF, "x")
    assert MPI._comm_lock_table(MPI.COMM_SELF)["x"] is lock


def test_handles_are_unhashable_as_mpi4pys():
    """hash() of every handle class (and Status) raises TypeError, as mpi4py's; what this
    library keys by handles still works through another handle on the same object: the
    numbers, attributes, the pair types of MINLOC/MAXLOC."""
    comm = MPI.COMM_WORLD.Dup()
    vector = MPI.DOUBLE.Create_vector(2, 1, 3)
    info = MPI.Info.Create()
    handles = [comm, MPI.COMM_NULL, MPI.COMM_SELF.Create_cart([1]), comm.Get_group(),
               MPI.GROUP_EMPTY, vector, MPI.INT, MPI.SUM, MPI.Op.Create(lambda a, b, t: None),
               MPI.REQUEST_NULL, comm.Irecv(bytearray(1), MPI.PROC_NULL),
               comm.Recv_init(bytearray(1), MPI.PROC_NULL), MPI.MESSAGE_NO_PROC, info,
               MPI.INFO_ENV, MPI.ERRORS_RETURN, MPI.WIN_NULL, MPI.FILE_NULL, MPI.SESSION_NULL,
               MPI.Status()]  # fmt: skip
    for handle in handles:
        with pytest.raises(TypeError):
            hash(handle)
    assert hash(MPI.Exception(MPI.ERR_ARG)) == hash(MPI.ERR_ARG)  # (mpi4py's hash too)
    for kind, obj in ((MPI.Comm, comm), (MPI.Datatype, vector)):
        keyval = kind.Create_keyval()
        obj.Set_attr(keyval, "value")
        assert kind(obj).Get_attr(keyval) == "value"  # another handle: the same attributes
        kind(obj).Delete_attr(keyval)
        assert obj.Get_attr(keyval) is None
        kind.Free_keyval(keyval)
    assert MPI.Datatype.Get_value_index(MPI.Datatype(MPI.DOUBLE), MPI.INT) == MPI.DOUBLE_INT
    assert MPI.Datatype.Get_value_index(MPI.DOUBLE, MPI.DOUBLE) == MPI.DATATYPE_NULL
    dup = MPI.INT.Dup()
    other = MPI.Datatype(dup)  # a second handle on dup's type
    number = dup.handle
    dup.Free()  # the handle numbered is null now: so is what its number gives
    assert MPI.Datatype.fromhandle(number) == MPI.DATATYPE_NULL
    assert other.handle == number and MPI.Datatype.fromhandle(number) == other
    vector.Free()
    info.Free()
    comm.Free()


@pytest.mark.parametrize("name", ["BOTTOM", "IN_PLACE", "BUFFER_AUTOMATIC"])
def test_buffer_constants_as_mpi4pys(name):
    """BOTTOM, IN_PLACE and BUFFER_AUTOMATIC as mpi4py's (on MPICH): int() is MPICH's address
    (0, -1, -2), equal to and hashed as that integer, true iff not 0, no arithmetic, one
    object per type, pickled by name; memoryview() of one is an empty writable buffer owned
    by no object on the C path (a C type exports it: ring.EmptyExporter), a TypeError in
    the pure-Python mode, where Python 3.11 classes cannot export buffers."""
    import operator
    import pickle

    import numpy as np

    from ivshmem_comm import ring

    constant = getattr(MPI, name)
    value = {"BOTTOM": 0, "IN_PLACE": -1, "BUFFER_AUTOMATIC": -2}[name]
    assert int(constant) == value and constant == value and value == constant
    assert constant == np.int64(value) and constant != value + 1 and constant != None  # noqa: E711
    assert {value: "x"}[constant] == "x" and hash(constant) == hash(value)
    assert bool(constant) is bool(value) and repr(constant) == name
    assert type(constant)() is constant and MPI.Get_address(constant) == value
    assert pickle.loads(pickle.dumps(constant)) is constant
    with pytest.raises(TypeError):
        assert constant + 1
    with pytest.raises(TypeError):
        assert constant < 1
    if name == "BOTTOM":
        assert operator.index(constant) == 0 and [7][constant] == 7
    else:
        with pytest.raises(TypeError):
            operator.index(constant)
    if ring.EmptyExporter is None:
        with pytest.raises(TypeError):
            memoryview(constant)
        return
    view = memoryview(constant)
    assert view.obj is None and view.nbytes == 0 and not view.readonly and view.format == "B"
    assert np.frombuffer(constant, np.uint8).size == 0
