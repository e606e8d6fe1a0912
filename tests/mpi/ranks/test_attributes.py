"""Attribute caching on communicators and datatypes (Create_keyval, Set/Get/Delete_attr):
copy_fn at Dup, delete_fn at replacement, Delete_attr and Free, errors as mpi4py's."""

from __future__ import annotations

import pytest

from guest_lib.mpi import MPI


def test_comm_attribute_copied_at_dup_and_deleted_at_free():
    calls = []
    keyval = MPI.Comm.Create_keyval(
        copy_fn=lambda obj, key, value: [*value, "copied"],
        delete_fn=lambda obj, key, value: calls.append(list(value)),
    )
    comm = MPI.COMM_WORLD.Dup()
    comm.Set_attr(keyval, ["v"])
    dup = comm.Dup()
    assert dup.Get_attr(keyval) == ["v", "copied"] and comm.Get_attr(keyval) == ["v"]
    comm.Set_attr(keyval, ["w"])  # the replaced value goes to delete_fn
    assert calls == [["v"]]
    dup.Free()
    comm.Delete_attr(keyval)
    assert calls == [["v"], ["v", "copied"], ["w"]] and comm.Get_attr(keyval) is None
    comm.Free()
    assert MPI.Comm.Free_keyval(keyval) == MPI.KEYVAL_INVALID
    with pytest.raises(MPI.Exception) as error:
        MPI.COMM_WORLD.Set_attr(keyval, 1)  # freed key
    assert error.value.Get_error_class() == MPI.ERR_KEYVAL


def test_datatype_attribute_not_copied_without_copy_fn():
    deleted = []
    keyval = MPI.Datatype.Create_keyval(delete_fn=lambda t, k, v: deleted.append(v))
    vector = MPI.INT.Create_vector(2, 1, 2)
    vector.Set_attr(keyval, 7)
    assert vector.Dup().Get_attr(keyval) is None and vector.Get_attr(keyval) == 7
    assert MPI.Datatype(vector).Get_attr(keyval) == 7  # a second handle on the same type
    vector.Free()
    assert deleted == [7]
    with pytest.raises(MPI.Exception) as error:
        MPI.INT.Get_attr(MPI.KEYVAL_INVALID)
    assert error.value.Get_error_class() == MPI.ERR_KEYVAL
    MPI.Datatype.Free_keyval(keyval)
