"""Message specs and datatypes (local, no communication)."""

from __future__ import annotations

import array

import numpy as np
import pytest

from guest_lib.mpi import MPI, buffers


def test_inferred_datatypes():
    for code in "bhilqBHILQfd":
        spec = buffers.parse(np.zeros(4, code))
        assert spec.count == 4 and spec.datatype.Get_size() == np.dtype(code).itemsize
    assert buffers.parse(b"abc").datatype is MPI.BYTE
    assert buffers.parse(array.array("d", [1.0, 2.0])).datatype is MPI.DOUBLE
    assert buffers.parse(None).count == 0


def test_forms():
    data = np.arange(10, dtype="i")
    assert buffers.parse([data, MPI.INT]).count == 10
    assert buffers.parse([data, "i"]).datatype is MPI.INT
    assert buffers.parse([data, 4, MPI.INT]).view.tobytes() == data[:4].tobytes()
    assert buffers.parse([data, (3, 2), MPI.INT]).view.tobytes() == data[2:5].tobytes()
    assert buffers.parse([data, 3, 5, MPI.INT]).view.tobytes() == data[5:8].tobytes()
    assert buffers.parse([data, 5]).count == 5
    assert buffers.parse([data, MPI.BYTE]).count == 40


def test_errors():
    with pytest.raises(ValueError):
        buffers.parse([np.zeros(3, "i"), 4, MPI.INT])
    with pytest.raises(BufferError):
        buffers.parse(b"read-only", writable=True)
    with pytest.raises(TypeError):
        buffers.parse(object())
    with pytest.raises(ValueError):
        buffers.parse(np.zeros((4, 4))[:, 1])


def test_vector_specs():
    data = np.arange(6, dtype="d")
    spec = buffers.parse_vector([data, [1, 2, 3], [0, 1, 3], MPI.DOUBLE], 3)
    assert np.frombuffer(spec.part(2), "d").tolist() == [3.0, 4.0, 5.0]
    spec = buffers.parse_vector(data, 3)
    assert spec.counts == [2, 2, 2] and spec.displs == [0, 2, 4]


def test_datatypes():
    assert MPI.DOUBLE.Get_size() == 8 and MPI.DOUBLE.tocode() == "d"
    assert MPI.INT.Get_extent() == (0, 4)
    assert MPI.TypeDict["d"] is MPI.DOUBLE
    assert MPI.INT64_T.Get_size() == 8 and MPI.FLOAT.size == 4
    assert MPI.DOUBLE_INT.Get_size() == 16
    vec = MPI.DOUBLE.Create_contiguous(3).Commit()
    assert vec.Get_size() == 24
    assert buffers.parse([np.zeros(6), 2, vec]).count == 2


def test_ops_on_objects():
    assert MPI.SUM(1, 2) == 3 and MPI.MAX(1, 2) == 2 and MPI.PROD(2, 3) == 6
    assert MPI.MAXLOC((1, 0), (1, 1)) == (1, 0)
    assert MPI.MINLOC((2, 5), (1, 9)) == (1, 9)
