"""Status objects."""

from __future__ import annotations

import numpy as np

from guest_lib.mpi import MPI


def test_defaults():
    status = MPI.Status()
    assert status.Get_source() == MPI.ANY_SOURCE
    assert status.Get_tag() == MPI.ANY_TAG
    assert status.Get_error() == MPI.SUCCESS
    assert status.Get_count() == 0
    assert not status.Is_cancelled()


def test_setters_and_copy():
    status = MPI.Status()
    status.Set_source(3)
    status.Set_tag(4)
    status.Set_error(MPI.ERR_OTHER)
    status.Set_elements(MPI.INT, 5)
    copy = MPI.Status(status)
    assert (copy.source, copy.tag, copy.error) == (3, 4, MPI.ERR_OTHER)
    assert copy.Get_count(MPI.INT) == 5 and copy.Get_elements(MPI.INT) == 5
    assert copy.Get_count(MPI.DOUBLE) == MPI.UNDEFINED
    assert copy == status


def test_status_of_receive(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    dest, source = (rank + 1) % size, (rank - 1) % size
    comm.Send(np.zeros(6, "f"), dest, 50)
    status = MPI.Status()
    comm.Recv(np.zeros(6, "f"), MPI.ANY_SOURCE, MPI.ANY_TAG, status)
    assert status.source == source and status.tag == 50
    assert status.Get_count(MPI.FLOAT) == 6 and status.Get_count(MPI.BYTE) == 24
    assert status.Get_elements(MPI.FLOAT) == 6


def test_environment():
    assert MPI.Is_initialized() and not MPI.Is_finalized()
    assert MPI.Wtime() > 0 and 0 < MPI.Wtick() < 1
    assert isinstance(MPI.Get_processor_name(), str)
    assert MPI.COMM_WORLD.Get_attr(MPI.TAG_UB) == MPI.TAG_UB_VALUE >= 32767  # mpi4py's key
    assert MPI.KEYVAL_TAG_UB == MPI.TAG_UB
    assert MPI.COMM_SELF.Get_size() == 1 and MPI.COMM_SELF.Get_rank() == 0
    assert not MPI.COMM_NULL
    assert MPI.Exception(MPI.ERR_TRUNCATE).Get_error_class() == MPI.ERR_TRUNCATE
