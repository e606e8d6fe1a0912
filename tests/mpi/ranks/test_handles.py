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
