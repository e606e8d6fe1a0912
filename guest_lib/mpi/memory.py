"""Memory: `MPI.buffer` (mpi4py's byte buffer object), `Alloc_mem`/`Free_mem`,
`Get_address`/`Aint_add`/`Aint_diff`, and the Bsend buffer (`Attach_buffer`/`Detach_buffer`).

`buffer` is a one-dimensional unsigned-byte numpy array over some memory (an object's buffer,
memory of its own, or a raw address), so it has the buffer protocol on every Python version;
`obj` is the object it was made from. `release()` drops the memory: address and size read 0
from then on. Indexing follows mpi4py: an integer or a slice with step 1 (IndexError for
other steps or out-of-range indices, TypeError for other keys); assignment takes an integer
or any buffer of the right length (TypeError on a read-only buffer).

Sends here never need a Bsend buffer (a message is copied into the queue or handed to MPI as
it is sent), so `Attach_buffer` only records the buffer it is given, for `Detach_buffer`.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from guest_lib.mpi import constants, exceptions, foreign

BSEND_OVERHEAD = 96  # MPICH's value (bytes of bookkeeping per buffered message)
_NOTHING = object()


class buffer(np.ndarray):  # mpi4py's name, lower case
    """A buffer of memory, mpi4py's `MPI.buffer`; see the module docstring."""

    _obj: Any
    _released: bool
    _cpu: bool  # False for memory of a device type mpi4py's buffer does not read

    def __new__(cls, obj: Any = _NOTHING) -> buffer:
        if obj is _NOTHING:  # an empty buffer over no memory (address 0)
            made = _wrap(np.empty(0, np.uint8), None)
            made._released = True
            return made
        if obj is None or isinstance(obj, int | float | list | tuple):
            raise TypeError(f"buffer: expecting a buffer object, got {type(obj).__name__}")
        try:
            view = memoryview(obj)
        except TypeError:  # DLPack or the CUDA array interface, as message buffers take them
            found = foreign.describe(obj)
            if found is None:
                raise TypeError(f"buffer: expecting a buffer, got {type(obj).__name__}") from None
            made = _wrap(np.frombuffer(foreign.host_view(found, False), np.uint8), obj)
            made._cpu = found.device in foreign.CPU_ACCESSIBLE
            return made
        flat = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        return _wrap(np.frombuffer(flat, np.uint8), obj)

    def __array_finalize__(self, parent: Any) -> None:
        self._obj = getattr(parent, "_obj", None)
        self._released = False
        self._cpu = getattr(parent, "_cpu", True)

    def _host(self) -> None:
        """Raise BufferError (mpi4py's) unless the CPU can read this buffer's memory.

        For a buffer over memory its device type says the CPU cannot read (a DLPack device, the CUDA
        array interface); item access, cast and tobytes call it first.
        """
        if not self._cpu:
            raise BufferError("buffer is not CPU-accessible")

    @classmethod
    def allocate(cls, nbytes: int, clear: bool = False) -> buffer:
        """Return `nbytes` bytes of new memory (zeroed if `clear`).

        TypeError for a non-integer, ValueError for a negative size.
        """
        if not isinstance(nbytes, int):
            raise TypeError(f"buffer.allocate: expecting an integer, got {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"buffer.allocate: negative size {nbytes}")
        memory = bytearray(nbytes)  # always zeroed: `clear` costs nothing more
        return _wrap(np.frombuffer(memory, np.uint8) if nbytes else np.empty(1, np.uint8)[:0],
                     memory)  # fmt: skip

    @classmethod
    def frombuffer(cls, obj: Any, readonly: bool = False) -> buffer:
        """A buffer over `obj`'s memory (read-only if `readonly` or if `obj` is)."""
        made = cls(obj)
        if readonly:
            made.flags.writeable = False
        return made

    @classmethod
    def fromaddress(cls, address: int, nbytes: int, readonly: bool = False) -> buffer:
        """A buffer over `nbytes` bytes at `address` (the caller keeps the memory alive).
        ValueError for a negative size or a null address."""
        if nbytes < 0:
            raise ValueError(f"buffer.fromaddress: negative size {nbytes}")
        if address == 0 and nbytes:
            raise ValueError("buffer.fromaddress: null address")
        raw = (ctypes.c_char * nbytes).from_address(address) if nbytes else bytearray(0)
        made = _wrap(np.frombuffer(memoryview(raw).cast("B"), np.uint8), None)
        if readonly:
            made.flags.writeable = False
        return made

    # ------------------------------------------------------------------ attributes
    @property
    def address(self) -> int:
        """Address of the memory (0 once released)."""
        return 0 if self._released else int(self.ctypes.data)

    @property
    def obj(self) -> Any:
        """Object that holds the memory (None once released)."""
        return self._obj

    @property
    def nbytes(self) -> int:
        """Size of the memory in bytes (0 once released)."""
        return 0 if self._released else len(self)

    def __bool__(self) -> bool:
        """True iff it holds memory (mpi4py's buffer is a sequence: truth is its length)."""
        return self.nbytes > 0

    @property
    def readonly(self) -> bool:
        """True iff the memory is read-only (False once released)."""
        return not self._released and not self.flags.writeable

    @property
    def format(self) -> str:
        """Format of the items, "B" (unsigned bytes), as mpi4py's."""
        return "B"

    def release(self) -> None:
        """Drop the memory: address and nbytes read 0 afterwards."""
        self._released = True
        self._obj = None

    def toreadonly(self) -> buffer:
        """Return a read-only buffer over the same memory."""
        made = self.view(buffer)
        made.flags.writeable = False
        return made

    def tobytes(self, order: Any = None) -> bytes:
        """The bytes as a bytes object (`order` is ignored, as mpi4py: they are flat)."""
        self._host()
        return self.view(np.ndarray).data.tobytes()

    def cast(self, format: str, shape: Any = None) -> memoryview:
        """A memoryview of the bytes as `format` items (in `shape`)."""
        self._host()
        view: Any = self.view(np.ndarray).data
        return view.cast(format) if shape is None else view.cast(format, shape)

    # ------------------------------------------------------------------ sequence
    @staticmethod
    def _key(key: Any) -> Any:
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise IndexError("buffer: slices take step 1 only")
            return key
        if isinstance(key, int | np.integer):
            return key
        raise TypeError(f"buffer: indices are integers or slices, not {type(key).__name__}")

    def __getitem__(self, key: Any) -> Any:
        self._host()
        item = super().__getitem__(self._key(key))
        return int(item) if isinstance(item, np.integer) else item

    def __setitem__(self, key: Any, value: Any) -> None:
        key = self._key(key)
        self._host()
        if not self.flags.writeable:
            raise TypeError("buffer is read-only")
        if not isinstance(value, int | np.integer | np.ndarray):
            value = np.frombuffer(memoryview(value).cast("B"), np.uint8)
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        raise NotImplementedError("buffer: items cannot be deleted")


def _wrap(array: np.ndarray, obj: Any) -> buffer:
    made = array.view(buffer)
    made._obj = obj
    made._released = False
    made._cpu = True
    return made


def Alloc_mem(size: int, info: Any = None) -> buffer:
    """Allocate `size` bytes of memory for MPI use, as a `buffer`.

    MPI.Exception(ERR_NO_MEM) when there is not that much.
    """
    try:
        return buffer.allocate(int(size))
    except MemoryError:
        raise exceptions.Exception(exceptions.ERR_NO_MEM, f"{size} bytes") from None


def Free_mem(mem: buffer) -> None:
    """Give back memory from Alloc_mem (the buffer reads as empty afterwards)."""
    mem.release()


def Get_address(location: Any) -> int:
    """Return the address of `location`'s memory (anything with the buffer protocol).

    0 for None; BOTTOM, IN_PLACE and BUFFER_AUTOMATIC give their int() (0, -1, -2), as
    mpi4py.
    """
    if location is None:
        return 0
    if isinstance(location, constants.BufferConstant):
        return int(location)
    try:
        view = memoryview(location)
    except TypeError:  # DLPack, the CUDA array interface: the address they give (unread)
        found = foreign.describe(location)
        if found is None:
            raise TypeError(
                f"Get_address: expecting a buffer, got {type(location).__name__}"
            ) from None
        return found.address
    if view.nbytes == 0:
        return 0
    return int(np.frombuffer(view.cast("B") if view.c_contiguous else view, np.uint8).ctypes.data)


def Aint_add(base: int, disp: int) -> int:
    """Return the address `base` + `disp`."""
    return int(base) + int(disp)


def Aint_diff(addr1: int, addr2: int) -> int:
    """Return the difference `addr1` - `addr2` of two addresses."""
    return int(addr1) - int(addr2)


class BufferSlot:
    """Where a Bsend buffer is attached: the process's (MPI.Attach_buffer), a
    communicator's or a session's (MPI-4.1). The buffer is recorded only: a Bsend here has
    handed its message to the queue or to MPI by the time it returns."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[Any] = []

    def attach(self, buf: Any) -> None:
        """Record `buf` (or BUFFER_AUTOMATIC). BufferError if it is read-only;
        MPI.Exception(ERR_BUFFER) if one is attached already."""
        if buf is not constants.BUFFER_AUTOMATIC:
            from guest_lib.mpi.buffers import parse

            parse(buf, writable=True)  # any message buffer (DLPack too)
        if self._held:
            raise exceptions.Exception(exceptions.ERR_BUFFER, "a buffer is attached already")
        self._held.append(buf)

    def detach(self) -> Any:
        """The buffer recorded (None when there is none); the slot is then empty."""
        return self._held.pop() if self._held else None


_process_slot = BufferSlot()


def Attach_buffer(buf: Any) -> None:
    """Record `buf` as the process's Bsend buffer (see BufferSlot.attach)."""
    _process_slot.attach(buf)


def Detach_buffer() -> Any:
    """The buffer Attach_buffer recorded (None when there is none)."""
    return _process_slot.detach()


def Flush_buffer() -> None:
    """Wait until the messages buffered by Bsend are sent: returns at once.

    A Bsend here has handed its message to the queue or to MPI by the time it returns.
    """


def Iflush_buffer() -> Any:
    """Nonblocking Flush_buffer: a request that is complete already (see Flush_buffer)."""
    from guest_lib.mpi.matching import DoneOp
    from guest_lib.mpi.request import Request

    return Request(DoneOp())
