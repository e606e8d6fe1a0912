"""Buffers described through the CUDA array interface or DLPack with a device type of CUDA,
over host memory (numpy arrays here): messages, collectives and RMA copy through their
pointers as mpi4py over a non-CUDA-aware MPI does; a malformed description raises what
mpi4py raises; a pointer to memory this process cannot read or write raises BufferError
instead of crashing it."""

from __future__ import annotations

import ctypes
import mmap
import warnings

import numpy as np
import pytest

from guest_lib.mpi import MPI, buffers

KDLCUDA = 2


class CAI:
    """`array`'s memory through the CUDA array interface (version 3)."""

    def __init__(self, array: np.ndarray, readonly: bool = False) -> None:
        self.array = array
        self.__cuda_array_interface__ = {
            "version": 3,
            "data": (array.ctypes.data, readonly),
            "typestr": array.dtype.str,
            "shape": array.shape,
            "strides": array.strides,
            "descr": [("", array.dtype.str)],
        }


class CudaDLPack:
    """`array`'s memory through DLPack, saying it is on a CUDA device (as mpi4py's suite
    does without cupy): asked with stream=-1, as a consumer must for a device."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack_device__(self) -> tuple[int, int]:
        return (KDLCUDA, 0)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        assert stream == -1
        return self.array.__dlpack__(max_version=max_version, copy=copy)


def ring(comm: MPI.Intracomm) -> tuple[int, int, int, int]:
    size, rank = comm.Get_size(), comm.Get_rank()
    return size, rank, (rank + 1) % size, (rank - 1) % size


@pytest.mark.parametrize("wrap", [CAI, CudaDLPack])
def test_p2p(comm, wrap):
    _, rank, dest, source = ring(comm)
    for typecode in "bhilqfd":
        for count in (0, 1, 1000, 100_000):
            sbuf = np.arange(count, dtype=typecode) + rank
            rbuf = np.zeros(count, dtype=typecode)
            status = MPI.Status()
            comm.Sendrecv(wrap(sbuf), dest, 3, wrap(rbuf), source, 3, status)
            assert np.array_equal(rbuf, np.arange(count, dtype=typecode) + source)
            assert status.Get_count(MPI.TypeDict[typecode]) == count
    rbuf = np.zeros(5, "d")
    rreq = comm.Irecv([wrap(rbuf), 3, MPI.DOUBLE], source, 4)
    comm.Isend([wrap(np.full(5, rank, "d")), (3, 2), MPI.DOUBLE], dest, 4).Wait()
    rreq.Wait()
    assert rbuf.tolist() == [source] * 3 + [0, 0]


def test_collectives(comm):
    size, rank, _, _ = ring(comm)
    data = np.zeros(4, "i")
    if rank == 0:
        data[:] = [5, 6, 7, 8]
    comm.Bcast(CAI(data), root=0)
    assert data.tolist() == [5, 6, 7, 8]
    total = np.zeros(3, "d")
    comm.Allreduce(CAI(np.full(3, rank + 1.0), readonly=True), CAI(total), MPI.SUM)
    assert total.tolist() == [size * (size + 1) / 2] * 3
    gathered = np.zeros(2 * size, "l")
    comm.Allgather(CudaDLPack(np.array([rank, -rank], "l")), CAI(gathered))
    assert gathered.tolist() == [v for r in range(size) for v in (r, -r)]
    counts = [r + 1 for r in range(size)]
    send = np.full(sum(counts), rank, "i")
    recv = np.zeros((rank + 1) * size, "i")
    comm.Alltoallv([CAI(send), counts], [CAI(recv), [rank + 1] * size])
    assert recv.tolist() == [r for r in range(size) for _ in range(rank + 1)]
    wrecv = np.zeros(size, "i")
    types = [MPI.INT] * size
    comm.Alltoallw([CAI(np.full(size, rank, "i"), readonly=True), [1] * size,
                    [4 * r for r in range(size)], types],
                   [CAI(wrecv), ([1] * size, [4 * r for r in range(size)]), types])  # fmt: skip
    assert wrecv.tolist() == list(range(size))


def test_rma(comm):
    size, rank, dest, source = ring(comm)
    win = MPI.Win.Allocate(8 * size, 8, comm=comm)
    try:
        win.Fence()
        win.Put(CAI(np.array([rank + 0.5]), readonly=True), dest, target=rank)
        win.Fence()
        got = np.zeros(size, "d")
        win.Get(CAI(got), rank, target=[0, size, MPI.DOUBLE])
        win.Fence()
        assert got[source] == source + 0.5
    finally:
        win.Free()


def test_buffer_and_address():
    data = np.arange(4, dtype="i")
    for wrap in (CAI, CudaDLPack):
        wrapped = wrap(data)
        assert MPI.Get_address(wrapped) == data.ctypes.data
        mem = MPI.buffer(wrapped)
        assert mem.address == data.ctypes.data and mem.nbytes == 16
        with pytest.raises(BufferError, match="not CPU-accessible"):
            mem.cast("i")
        with pytest.raises(BufferError, match="not CPU-accessible"):
            mem.tobytes()
        with pytest.raises(BufferError, match="not CPU-accessible"):
            mem[0] = 1


def mutated(change) -> CAI:
    wrapped = CAI(np.zeros(3, "B"))
    change(wrapped.__cuda_array_interface__)
    return wrapped


def set_(key, value):
    return lambda interface: interface.__setitem__(key, value)


def del_(key):
    return lambda interface: interface.__delitem__(key)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (del_("data"), KeyError),
        (set_("data", None), TypeError),
        (set_("data", 0), TypeError),
        (set_("data", (1,)), ValueError),
        (set_("data", ("0x1000", False)), TypeError),
        (del_("typestr"), KeyError),
        (set_("typestr", 42), TypeError),
        (set_("typestr", "|uX"), ValueError),
        (del_("shape"), KeyError),
        (set_("shape", 3), TypeError),
        (set_("shape", (3, -1)), BufferError),
        (set_("strides", 42), TypeError),
        (set_("strides", (2,)), BufferError),
        (set_("descr", 42), TypeError),
        (set_("mask", True), BufferError),
        (lambda cai: cai.update(typestr="#u1", descr=None), BufferError),
    ],
)
def test_bad_interface(change, error):
    with pytest.raises(error):
        buffers.parse(mutated(change), writable=True)


def test_bad_interface_object():
    wrapped = CAI(np.zeros(3, "B"))
    wrapped.__cuda_array_interface__ = None
    with pytest.raises(TypeError):
        buffers.parse(wrapped)
    wrapped.__cuda_array_interface__ = {}
    with pytest.raises(KeyError):
        buffers.parse(wrapped)
    with pytest.raises(BufferError, match="read-only"):
        buffers.parse(CAI(np.zeros(3), readonly=True), writable=True)
    swapped = CAI(np.zeros(3, ">i4"))
    with pytest.raises(BufferError, match="byte order"):
        buffers.parse(swapped)
    assert buffers.parse([swapped, MPI.INT]).count == 3  # a named datatype takes it


def test_descr_warning_moves_nothing():
    """The ignored-descr warning, made an error, leaves no message behind (both specs are
    read before anything is sent)."""
    send = np.arange(6, dtype="d")
    recv = CAI(np.zeros(6, "d"))
    recv.__cuda_array_interface__["descr"] = [("", "<f8")] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            MPI.COMM_SELF.Sendrecv(send, 0, 5, recv, 0, 5)
    assert not MPI.COMM_SELF.Iprobe(0, 5)
    with pytest.warns(RuntimeWarning):
        MPI.COMM_SELF.Sendrecv(send, 0, 5, recv, 0, 5)
    assert recv.array.tolist() == send.tolist()


def pointing_at(address: int, nbytes: int, readonly: bool = False) -> CAI:
    wrapped = CAI(np.zeros(nbytes, "B"), readonly)
    wrapped.__cuda_array_interface__["data"] = (address, readonly)
    return wrapped


LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]  # fmt: skip
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.munmap.restype = ctypes.c_int
PAGE = mmap.PAGESIZE


def mapped(pages: int, prot: int) -> int:
    """The address of `pages` new anonymous pages with protection `prot`."""
    address = LIBC.mmap(None, pages * PAGE, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert address not in (None, ctypes.c_void_p(-1).value)
    return address


def test_unmapped_memory_raises():
    """Memory not mapped here raises BufferError naming it; the process lives on."""
    address = mapped(3, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        assert LIBC.munmap(address + PAGE, PAGE) == 0  # a hole in the middle
        for spec, writable in [
            (pointing_at(address + PAGE, 8), False),
            (pointing_at(address, 3 * PAGE), True),
            (pointing_at(address + PAGE - 4, 8), False),
            (pointing_at(16, 8), False),
            (pointing_at(2**64 - 8, 8), False),
        ]:
            with pytest.raises(BufferError, match=r"not (readable|writable) host memory"):
                buffers.parse(spec, writable=writable)
        with pytest.raises(BufferError, match="not readable host memory"):
            MPI.COMM_SELF.Send(pointing_at(address + PAGE, 8), 0, 6)
        assert not MPI.COMM_SELF.Iprobe(0, 6)
        assert len(buffers.parse(pointing_at(address, PAGE), writable=True).view) == PAGE
    finally:
        LIBC.munmap(address, 3 * PAGE)


def test_protected_memory_raises():
    """A PROT_NONE reservation (what CUDA's device allocations look like to the CPU) is
    neither readable nor writable; PROT_READ memory is read but not received into."""
    for prot, readable in [(0, False), (mmap.PROT_READ, True)]:  # 0: PROT_NONE
        address = mapped(2, prot)
        try:
            if readable:
                assert bytes(buffers.parse(pointing_at(address, 2 * PAGE)).view) == bytes(2 * PAGE)
            else:
                with pytest.raises(BufferError, match="not readable"):
                    buffers.parse(pointing_at(address, 2 * PAGE))
            with pytest.raises(BufferError, match="not writable"):
                buffers.parse(pointing_at(address, 2 * PAGE), writable=True)
        finally:
            LIBC.munmap(address, 2 * PAGE)


def test_pfnmap_memory_reads():
    """A VM_PFNMAP mapping (here the kernel's [vvar] page; a PCI BAR such as ivshmem's in
    a guest is another), which process_vm_readv refuses, is read through: smaps shows it
    readable."""
    found = None
    with open("/proc/self/smaps") as smaps:
        head = None
        for line in smaps:
            if line.rstrip().endswith("[vvar]"):
                head = line
            elif head and line.startswith("VmFlags:"):
                if "pf" in line.split():
                    found = int(head.split("-")[0], 16)
                break
    if found is None:
        pytest.skip("no [vvar] VM_PFNMAP mapping in this kernel")
    assert len(buffers.parse(pointing_at(found, 64, readonly=True)).view) == 64
    with pytest.raises(BufferError, match="not writable"):
        buffers.parse(pointing_at(found, 64), writable=True)
