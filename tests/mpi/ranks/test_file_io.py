"""MPI-IO (guest_lib/mpi/file.py) on every communicator of the rank-side suite.

Runs in every rank of a job (see conftest.py): the ranks share one file in a directory rank
0 makes. What mpi4py's own test_io.py does not check: the shared file pointer under
contention from every rank (disjoint places, none lost), ordered access with a different
count per rank, a vector filetype interleaving the ranks' blocks, atomic mode against
concurrent overlapping writes, external32 data in the file, and the error classes of the
failures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

from guest_lib.mpi import MPI

RDWR_NEW = MPI.MODE_RDWR | MPI.MODE_CREATE


@pytest.fixture
def path(comm: MPI.Intracomm) -> Iterator[str]:
    """A file name in a directory rank 0 of `comm` made (removed afterwards); nothing is
    left in it by the test but the file itself."""
    top = tempfile.mkdtemp(prefix="mpiio-") if comm.Get_rank() == 0 else None
    top = comm.bcast(top, 0)
    yield os.path.join(top, "data")
    comm.Barrier()
    if comm.Get_rank() == 0:
        leftovers = sorted(set(os.listdir(top)) - {"data"})
        shutil.rmtree(top)
        assert not leftovers, f"left behind: {leftovers}"


def test_shared_pointer_gives_every_record_one_place(comm, path):
    rank, size = comm.Get_rank(), comm.Get_size()
    records = 60
    fh = MPI.File.Open(comm, path, RDWR_NEW)
    fh.Set_view(0, MPI.INT64_T)
    for i in range(records):  # every rank at once: a fetch-and-add each
        fh.Write_shared(np.array([rank, i], np.int64))
    fh.Sync()
    comm.Barrier()
    assert fh.Get_position_shared() == 2 * records * size
    assert fh.Get_size() == 16 * records * size
    data = np.empty(2 * records * size, np.int64)
    status = MPI.Status()
    fh.Read_at(0, data, status)
    assert status.Get_count(MPI.INT64_T) == len(data)
    pairs = data.reshape(-1, 2)
    for r in range(size):  # each rank's records all there, once, in its own order
        assert pairs[pairs[:, 0] == r, 1].tolist() == list(range(records))
    comm.Barrier()
    fh.Close()
    assert not fh


def test_ordered_calls_follow_rank_order(comm, path):
    rank, size = comm.Get_rank(), comm.Get_size()
    fh = MPI.File.Open(comm, path, RDWR_NEW | MPI.MODE_DELETE_ON_CLOSE)
    fh.Set_view(8, MPI.INT)  # 8 bytes of header before the view
    fh.Write_ordered(np.full(rank + 1, rank, np.intc))
    fh.Write_ordered(np.full(2, 100 + rank, np.intc))
    total = size * (size + 1) // 2 + 2 * size
    assert fh.Get_position_shared() == total
    fh.Sync()
    comm.Barrier()
    whole = np.empty(total, np.intc)
    fh.Read_at_all(0, whole)
    expected = [r for r in range(size) for _ in range(r + 1)] + [
        100 + r for r in range(size) for _ in range(2)
    ]
    assert whole.tolist() == expected
    fh.Seek_shared(0)
    mine = np.empty(rank + 1, np.intc)
    fh.Read_ordered(mine)
    assert mine.tolist() == [rank] * (rank + 1)
    fh.Close()
    comm.Barrier()
    assert not os.path.exists(path)


@pytest.mark.parametrize("atomic", [False, True])  # atomic: sieved read-modify-writes
def test_vector_filetype_interleaves_the_ranks(comm, path, atomic):
    rank, size = comm.Get_rank(), comm.Get_size()
    block, tiles_per_type = 2, 3
    stride = block * size  # in INTs: each rank owns `block` INTs of every `stride`
    vector = MPI.INT.Create_vector(tiles_per_type, block, stride)
    filetype = vector.Create_resized(0, tiles_per_type * stride * MPI.INT.size).Commit()
    vector.Free()
    fh = MPI.File.Open(comm, path, RDWR_NEW)
    fh.Set_atomicity(atomic)
    fh.Set_view(rank * block * MPI.INT.size, MPI.INT, filetype)
    mine = np.arange(12, dtype=np.intc) + 1000 * rank  # two filetypes' worth
    fh.Write_all(mine)
    assert fh.Get_position() == 12
    assert fh.Get_byte_offset(0) == rank * block * 4
    assert fh.Get_byte_offset(3) == (stride + rank * block + 1) * 4  # 2nd block, 2nd INT
    fh.Sync()
    comm.Barrier()
    fh.Seek(0, MPI.SEEK_END)
    assert fh.Get_position() == 12  # the file ends after every rank's last block
    back = np.full(14, -1, np.intc)
    status = MPI.Status()
    fh.Read_at_all(0, back, status)  # two INTs more than the file holds for this rank
    assert status.Get_count(MPI.INT) == 12
    assert back[:12].tolist() == mine.tolist() and back[12:].tolist() == [-1, -1]
    fh.Set_view(0, MPI.INT)
    flat = np.empty(12 * size, np.intc)
    fh.Read_at_all(0, flat)
    owner = (np.arange(12 * size) // block) % size  # the rank of each INT of the file
    for r in range(size):
        assert flat[owner == r].tolist() == (np.arange(12) + 1000 * r).tolist()
    disp, etype, ftype, rep = fh.Get_view()
    assert (disp, etype, ftype, rep) == (0, MPI.INT, MPI.INT, "native")
    filetype.Free()
    comm.Barrier()
    fh.Close()


def test_atomic_mode_keeps_overlapping_accesses_whole(comm, path):
    rank = comm.Get_rank()
    fh = MPI.File.Open(comm, path, RDWR_NEW)
    fh.Set_atomicity(True)
    assert fh.Get_atomicity()
    # a record at a stride past its length, so each access is many pread/pwrite calls
    record = MPI.BYTE.Create_vector(256, 512, 1024).Commit()
    fh.Set_view(0, MPI.BYTE, record)
    fh.Write_at_all(0, np.zeros(256 * 512, np.uint8))
    comm.Barrier()
    got = np.empty(256 * 512, np.uint8)
    mixed = 0
    for _ in range(30):  # every rank writes the record, then reads it, all at once
        fh.Write_at(0, np.full(256 * 512, rank + 1, np.uint8))
        fh.Read_at(0, got)
        mixed += int(got.min() != got.max())  # parts of two writes: not atomic
    assert mixed == 0
    record.Free()
    comm.Barrier()
    fh.Close()


def test_external32_is_big_endian_in_the_file(comm, path):
    rank, size = comm.Get_rank(), comm.Get_size()
    fh = MPI.File.Open(comm, path, RDWR_NEW)
    fh.Set_view(0, MPI.DOUBLE, MPI.DOUBLE, "external32")
    fh.Write_at_all(2 * rank, np.array([rank + 0.5, -rank - 0.25]))
    fh.Sync()
    comm.Barrier()
    with open(path, "rb") as raw:
        on_disk = np.frombuffer(raw.read(), ">f8")
    assert on_disk.tolist() == [v for r in range(size) for v in (r + 0.5, -r - 0.25)]
    back = np.empty(2 * size)
    fh.Read_at_all(0, back)
    assert back.tolist() == on_disk.tolist()
    with pytest.raises(MPI.Exception) as info:
        fh.Set_view(0, MPI.LONG, MPI.LONG, "external32")  # 4 bytes there, 8 here
    assert info.value.Get_error_class() == MPI.ERR_UNSUPPORTED_DATAREP
    comm.Barrier()
    fh.Close()


def test_nonblocking_and_split_collectives(comm, path):
    rank = comm.Get_rank()
    fh = MPI.File.Open(comm, path, RDWR_NEW | MPI.MODE_DELETE_ON_CLOSE)
    fh.Set_view(0, MPI.DOUBLE)
    status = MPI.Status()
    request = fh.Iwrite_at_all(4 * rank, np.full(4, rank, "d"))
    assert isinstance(request, MPI.Request)
    request.Wait(status)
    assert status.Get_count(MPI.DOUBLE) == 4 and not request
    comm.Barrier()
    got = np.empty(4)
    fh.Read_at_all_begin(4 * rank, got)
    with pytest.raises(MPI.Exception):
        fh.Write_all_begin(got)  # one split collective at a time
    fh.Read_at_all_end(got, status)
    assert got.tolist() == [rank] * 4 and status.Get_count(MPI.DOUBLE) == 4
    with pytest.raises(MPI.Exception):
        fh.Read_all_end(got)  # no begin
    comm.Barrier()
    fh.Close()


def test_errors_map_to_mpi_classes(comm, path):
    def error_of(call, *args):
        with pytest.raises(MPI.Exception) as info:
            call(*args)
        return info.value.Get_error_class()

    assert error_of(MPI.File.Open, comm, path, MPI.MODE_RDONLY) == MPI.ERR_NO_SUCH_FILE
    assert error_of(MPI.File.Open, comm, path, MPI.MODE_RDONLY | MPI.MODE_CREATE) == MPI.ERR_AMODE
    assert error_of(MPI.File.Open, comm, path, MPI.MODE_RDWR | MPI.MODE_WRONLY) == MPI.ERR_AMODE
    fh = MPI.File.Open(comm, path, RDWR_NEW)
    fh.Close()
    excl = RDWR_NEW | MPI.MODE_EXCL
    assert error_of(MPI.File.Open, comm, path, excl) == MPI.ERR_FILE_EXISTS
    fh = MPI.File.Open(comm, path, MPI.MODE_RDONLY)
    assert fh.Get_errhandler() == MPI.ERRORS_RETURN
    assert error_of(fh.Write_at, 0, b"x") == MPI.ERR_ACCESS
    seen = []
    handler = MPI.File.Create_errhandler(lambda f, code: seen.append((f, code)))
    fh.Set_errhandler(handler)
    assert error_of(fh.Seek, -1) == MPI.ERR_ARG
    assert seen == [(fh, MPI.ERR_ARG)]
    fh.Set_errhandler(MPI.ERRORS_RETURN)
    handler.Free()
    fh.Close()
    comm.Barrier()
    if comm.Get_rank() == 0:
        MPI.File.Delete(path)
        assert error_of(MPI.File.Delete, path) == MPI.ERR_NO_SUCH_FILE
    handle = MPI.FILE_NULL.toint()
    assert MPI.File.fromhandle(handle) == MPI.FILE_NULL
