"""MPI-IO: mpi4py's `File`, over the operating system's files.

Data moves with `os.pread`/`os.pwrite` on a descriptor each rank opens itself, so every
rank of a file's communicator must see the same file: ranks in different VMs need a
shared filesystem (virtiofs, NFS, ...) that is coherent between them (MPI's own rule for
non-atomic mode applies: sync-barrier-sync makes one rank's writes visible to another).

Open (collective): rank 0 of the communicator opens first (it alone creates the file:
MODE_CREATE, MODE_EXCL), every rank learns its error, then the others open; an error on
any rank closes the file everywhere and every rank raises the same MPI.Exception. OS
errors map to MPI's classes (ENOENT: ERR_NO_SUCH_FILE, EEXIST: ERR_FILE_EXISTS, EACCES:
ERR_ACCESS, EROFS: ERR_READ_ONLY, ENOSPC: ERR_NO_SPACE, EDQUOT: ERR_QUOTA, a directory:
ERR_BAD_FILE, anything else ERR_IO); a bad access mode is ERR_AMODE, reading a file
opened MODE_WRONLY or writing one opened MODE_RDONLY ERR_ACCESS.

Views: `Set_view(disp, etype, filetype)` tiles the file with `filetype` from byte `disp`;
the data a rank sees are the filetype's data bytes (its compiled type map,
`Datatype.pieces()`, holes skipped), in type-map order. Offsets and file pointers count
etypes of that stream. A transfer packs the memory buffer (its datatype through
`buffers.parse`, the C packer for derived types) into a dense stream, cuts the stream
into the file segments the view maps it to (adjacent segments merged) and does one
pread/pwrite per segment, or sieves many small ones (`_sieve`: one pread of their span; a
write in atomic mode also writes the span back). Data representations: "native" and
"internal" (the same here), and "external32" (big-endian, MPI's canonical formats) for
types whose size is the same there (LONG/UNSIGNED_LONG, 4 bytes in external32, are
ERR_UNSUPPORTED_DATAREP in a view and ERR_CONVERSION in memory); `Register_datarep`'s user
representations are recorded but views cannot use them (ERR_UNSUPPORTED_DATAREP).

Pointers: the individual file pointer lives in the rank. The shared file pointer is a
counter in a hidden file next to the data file (`.NAME.shfp.TOKEN`, 8 bytes, made by the
first rank that moves the pointer, removed at Close): a rank moves it by a read-modify-write
under an exclusive POSIX lock (`fcntl.lockf`) on that file, so concurrent callers in any
process or VM get disjoint places, and no rank has to make progress for another (as ROMIO
does; it needs a shared filesystem with coherent POSIX locks: NFS with lockd, virtiofs with
its locks on). Ordered calls compute each rank's place from an allgather of the counts and
one fetch-and-add by rank 0. A one-rank file keeps the shared pointer in the process.

Collective data calls (`*_all`, split collectives `*_begin`/`*_end`) do each rank's
access independently (MPI lets them: no aggregation is done); nonblocking ones (`Iread`,
`Iwrite_at_all`, ...) do the access at the call and return a completed Request whose
status holds the byte count. With atomic mode on (`Set_atomicity(True)`) each access holds
a POSIX byte-range lock (`fcntl.lockf`) over its span, shared for reads and exclusive for
writes, so accesses from different processes do not interleave.

Errors: a file's error handler is ERRORS_RETURN by default (MPI's default for files);
FILE_NULL's handler is the one new files get and the one errors of Open/Delete go to.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from guest_lib.mpi import buffers, constants, errhandler, exceptions
from guest_lib.mpi.datatypes import BYTE, Datatype, _convert
from guest_lib.mpi.handles import Handle, Same
from guest_lib.mpi.info import Info
from guest_lib.mpi.matching import DoneOp
from guest_lib.mpi.request import Request
from guest_lib.mpi.status import Status

# MPICH's values
MODE_CREATE, MODE_RDONLY, MODE_WRONLY, MODE_RDWR = 1, 2, 4, 8
MODE_DELETE_ON_CLOSE, MODE_UNIQUE_OPEN, MODE_EXCL = 16, 32, 64
MODE_APPEND, MODE_SEQUENTIAL = 128, 256
SEEK_SET, SEEK_CUR, SEEK_END = 600, 602, 604
DISPLACEMENT_CURRENT = -54278278
_MODES = (MODE_CREATE | MODE_RDONLY | MODE_WRONLY | MODE_RDWR | MODE_DELETE_ON_CLOSE
          | MODE_UNIQUE_OPEN | MODE_EXCL | MODE_APPEND | MODE_SEQUENTIAL)  # fmt: skip
_DATAREPS = ("native", "internal", "external32")
_KNOWN_DATAREPS = {"native", "internal", "external32"}  # and the registered ones
_ERRNO = {
    errno.ENOENT: exceptions.ERR_NO_SUCH_FILE,
    errno.ENOTDIR: exceptions.ERR_NO_SUCH_FILE,
    errno.EEXIST: exceptions.ERR_FILE_EXISTS,
    errno.EACCES: exceptions.ERR_ACCESS,
    errno.EPERM: exceptions.ERR_ACCESS,
    errno.EROFS: exceptions.ERR_READ_ONLY,
    errno.ENOSPC: exceptions.ERR_NO_SPACE,
    errno.EDQUOT: exceptions.ERR_QUOTA,
    errno.EISDIR: exceptions.ERR_BAD_FILE,
    errno.ENAMETOOLONG: exceptions.ERR_BAD_FILE,
    errno.EBUSY: exceptions.ERR_FILE_IN_USE,
    errno.ETXTBSY: exceptions.ERR_FILE_IN_USE,
}


def _err(error_class: int, what: str) -> exceptions.Exception:
    return exceptions.Exception(error_class, what)


def _os_error(exc: OSError, what: str) -> exceptions.Exception:
    """The MPI.Exception of an OS error (see the module docstring)."""
    code = _ERRNO.get(exc.errno or 0, exceptions.ERR_IO)
    return _err(code, f"{what}: {exc.strerror or exc}")


# ------------------------------------------------------------------------------ views
class _View:
    """A file view: where the etypes of the data stream lie in the file (see the module
    docstring). `pieces`: the filetype's (offset, length) data rows of one tile, `starts`
    their offsets in the tile's share of the stream; `plain` when a tile is its data."""

    __slots__ = ("datarep", "disp", "esize", "etype", "extent", "filetype", "pieces",
                 "plain", "starts", "tsize")  # fmt: skip

    def __init__(self, disp: int, etype: Datatype, filetype: Datatype, datarep: str) -> None:
        if not isinstance(etype, Datatype) or not isinstance(filetype, Datatype):
            raise _err(exceptions.ERR_TYPE, "Set_view: etype and filetype must be Datatypes")
        if not etype or not filetype or etype.size <= 0:
            raise _err(exceptions.ERR_TYPE, "Set_view: an etype with data is needed")
        if filetype.size % etype.size or filetype.size <= 0 or filetype.extent <= 0:
            raise _err(exceptions.ERR_TYPE, f"Set_view: filetype {filetype.name} is not made "
                       f"of whole etypes {etype.name} with a positive extent")  # fmt: skip
        pieces = filetype.pieces()
        if (pieces[:, 0] < 0).any() or (pieces[1:, 0] < pieces[:-1, 0]).any():
            raise _err(exceptions.ERR_TYPE, f"Set_view: filetype {filetype.name}'s data must "
                       "lie at nonnegative, nondecreasing offsets")  # fmt: skip
        self.disp, self.etype, self.filetype, self.datarep = disp, etype, filetype, datarep
        self.esize, self.tsize, self.extent = etype.size, filetype.size, filetype.extent
        self.pieces = pieces
        self.starts = np.concatenate(([0], np.cumsum(pieces[:, 1])[:-1])).astype(np.int64)
        self.plain = len(pieces) == 1 and int(pieces[0, 0]) == 0 and self.extent == self.tsize

    def segments(self, first: int, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(file offsets, lengths) of stream bytes first..first+nbytes-1, in stream order,
        adjacent segments merged."""
        if nbytes <= 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if self.plain:
            return np.array([self.disp + first]), np.array([nbytes])
        tiles = np.arange(first // self.tsize, (first + nbytes - 1) // self.tsize + 1)
        offsets = (self.disp + tiles[:, None] * self.extent + self.pieces[:, 0]).ravel()
        begin = (tiles[:, None] * self.tsize + self.starts).ravel()
        end = begin + np.tile(self.pieces[:, 1], len(tiles))
        low, high = np.maximum(begin, first), np.minimum(end, first + nbytes)
        keep = high > low
        offsets, lengths = (offsets + low - begin)[keep], (high - low)[keep]
        fresh = np.ones(len(offsets), dtype=bool)
        fresh[1:] = offsets[1:] != offsets[:-1] + lengths[:-1]
        heads = np.flatnonzero(fresh)
        return offsets[heads], np.add.reduceat(lengths, heads)

    def byte_offset(self, position: int) -> int:
        """The file offset of etype `position` of the stream."""
        tile, inner = divmod(position * self.esize, self.tsize)
        row = int(np.searchsorted(self.starts, inner, side="right")) - 1
        within = int(self.pieces[row, 0]) + inner - int(self.starts[row])
        return self.disp + tile * self.extent + within

    def end_position(self, size: int) -> int:
        """The first etype of the stream at or past byte `size` of the file."""
        if size <= self.disp:
            return 0
        tiles, rest = divmod(size - self.disp, self.extent)
        inside = np.clip(rest - self.pieces[:, 0], 0, self.pieces[:, 1]).sum()
        return -(-(tiles * self.tsize + int(inside)) // self.esize)


# ------------------------------------------------------------------- shared pointer
class _SharedPointer:
    """The shared file pointer, in etypes (see the module docstring). `path`: the hidden
    counter file next to the data file, made on first use (None: a one-rank file, whose
    pointer is `value` in this process); `start`: the pointer while that file is empty."""

    __slots__ = ("fd", "lock", "path", "start", "value")

    def __init__(self, path: str | None, start: int) -> None:
        self.path, self.start, self.value = path, start, start
        self.fd = -1
        self.lock = threading.Lock()  # POSIX locks are per process: threads take turns here

    def _update(self, change: Callable[[int], int]) -> int:
        """The pointer before `change` applied to it, atomically across every rank.
        MPI.Exception: the OS error's class, or ERR_IO for a counter file that holds no
        valid pointer (a negative value, a torn size)."""
        with self.lock:
            if self.path is None:
                old = self.value
                self.value = change(old)
                return old
            try:
                if self.fd < 0:
                    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                fcntl.lockf(self.fd, fcntl.LOCK_EX)  # the whole counter file
                try:
                    raw = os.pread(self.fd, 8, 0)  # read once, then validated
                    if len(raw) not in (0, 8):
                        raise _err(exceptions.ERR_IO, f"shared file pointer {self.path!r}: "
                                   f"{len(raw)} bytes")  # fmt: skip
                    old = int.from_bytes(raw, "little", signed=True) if raw else self.start
                    if old < 0:
                        raise _err(exceptions.ERR_IO, f"shared file pointer {self.path!r} "
                                   f"holds {old}")  # fmt: skip
                    new = change(old)
                    if new != old or not raw:
                        os.pwrite(self.fd, new.to_bytes(8, "little", signed=True), 0)
                finally:
                    fcntl.lockf(self.fd, fcntl.LOCK_UN)
            except OSError as exc:
                raise _os_error(exc, "shared file pointer") from None
        return old

    def fetch_add(self, count: int) -> int:
        """The pointer before adding `count` to it."""
        return self._update(lambda value: value + count)

    def get(self) -> int:
        return self._update(lambda value: value)

    def set(self, value: int) -> None:
        self._update(lambda _: value)

    def close(self) -> None:
        """Close the counter file (it stays: `remove` deletes it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Delete the counter file if a rank made one."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _os_error(exc, "shared file pointer") from None


# ------------------------------------------------------------------------ open files
class _Open:
    """What every handle on one open file shares."""

    __slots__ = ("amode", "atomic", "comm", "fd", "hints", "lock", "path", "position",
                 "shared", "split", "view")  # fmt: skip

    def __init__(self, comm: Any, fd: int, path: Any, amode: int, hints: dict[str, str],
                 shared: _SharedPointer) -> None:  # fmt: skip
        self.comm, self.fd, self.path, self.amode, self.hints = comm, fd, path, amode, hints
        self.atomic = False
        self.lock = threading.Lock()  # guards `position`
        self.view = _View(0, BYTE, BYTE, "native")
        self.position = shared.start
        self.shared = shared
        self.split: tuple[str, Status] | None = None  # the split collective begun, its status

    # ------------------------------------------------------------------ collectives
    def agree(self, action: Callable[[], None]) -> None:
        """Run `action` at rank 0, then every rank raises its error (or returns)."""
        failure = None
        if self.comm.Get_rank() == 0:
            try:
                action()
            except exceptions.Exception as exc:
                failure = (exc.Get_error_class(), exc.detail)
        if self.comm.Get_size() > 1:
            failure = self.comm.bcast(failure, 0)
        if failure is not None:
            raise _err(*failure)

    # ------------------------------------------------------------------ data
    def spec(self, write: bool, buf: Any) -> buffers.Spec:
        """The parsed buffer of a data call (dense: a derived memory type is packed, and
        for a read unpacked by `transfer`). MPI.Exception: ERR_ACCESS for a write to a file
        opened MODE_RDONLY or a read from one opened MODE_WRONLY, ERR_TYPE for data that
        are not whole etypes of the view."""
        if write and self.amode & MODE_RDONLY:
            raise _err(exceptions.ERR_ACCESS, "write to a file opened MODE_RDONLY")
        if not write and self.amode & MODE_WRONLY:
            raise _err(exceptions.ERR_ACCESS, "read from a file opened MODE_WRONLY")
        spec = buffers.parse(buf, writable=not write, deferred=True)
        if len(spec.view) % self.view.esize:
            raise _err(exceptions.ERR_TYPE, f"{len(spec.view)} bytes of {spec.datatype.name} "
                       f"are not whole etypes {self.view.etype.name}")  # fmt: skip
        return spec

    def etypes(self, spec: buffers.Spec) -> int:
        """The etypes of the view a parsed buffer holds."""
        return len(spec.view) // self.view.esize

    def transfer(self, write: bool, position: int, spec: buffers.Spec,
                 status: Status | None) -> None:  # fmt: skip
        """Read or write `spec` at etype `position` of the view (a read stops at the end of
        the file); fills `status` with the bytes moved."""
        view, stream = self.view, spec.view
        nbytes = len(stream)
        if position < 0:
            raise _err(exceptions.ERR_ARG, f"negative file offset {position}")
        external = view.datarep == "external32"
        if external:
            _same_external_size(spec.datatype, "the memory datatype", exceptions.ERR_CONVERSION)
            if write:
                stream = memoryview(_external_form(stream, spec.datatype, True))
            else:
                stream = memoryview(bytearray(nbytes))  # read here, converted into spec.view
        offsets, lengths = view.segments(position * view.esize, nbytes)
        locked = self.atomic and len(offsets) > 0
        if locked:
            span = int(offsets[-1] + lengths[-1] - offsets[0])
            fcntl.lockf(self.fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH, span, int(offsets[0]))
        try:
            if len(offsets) > 1 and _sieves(offsets, lengths, nbytes) and (locked or not write):
                done = self._sieve(write, stream, offsets, lengths)
            else:
                done = self._move(write, stream, offsets.tolist(), lengths.tolist())
        except OSError as exc:
            raise _os_error(exc, "write" if write else "read") from None
        finally:
            if locked:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, span, int(offsets[0]))
        if external and not write:
            whole = done - done % spec.datatype.size if spec.datatype.size else 0
            spec.view[:whole] = _external_form(stream[:whole], spec.datatype, False)
        if spec.unpack is not None:
            spec.unpack()
        if status is not None:
            status._set(constants.ANY_SOURCE, constants.ANY_TAG, done)

    def _move(self, write: bool, stream: memoryview, offsets: list[int],
              lengths: list[int]) -> int:  # fmt: skip
        """pwrite/pread each segment; the stream bytes moved."""
        fd, moved = self.fd, 0
        for offset, length in zip(offsets, lengths, strict=True):
            while length:
                part = stream[moved : moved + length]
                if write:
                    count = os.pwrite(fd, part, offset)
                else:
                    count = os.preadv(fd, [part], offset)
                    if count == 0:  # end of file
                        return moved
                moved, offset, length = moved + count, offset + count, length - count
        return moved

    def _sieve(self, write: bool, stream: memoryview, offsets: np.ndarray,
               lengths: np.ndarray) -> int:  # fmt: skip
        """Data sieving: one pread of the whole span of the segments, the stream bytes
        gathered from it (a read) or scattered into it and the span written back (a
        write: only under atomic mode's exclusive lock, as it rewrites the holes too).
        Returns the stream bytes moved (a read stops at the end of the file)."""
        base = int(offsets[0])
        span = bytearray(int(offsets[-1] + lengths[-1]) - base)
        got = os.preadv(self.fd, [span], base)
        if not write:  # the segments, or their parts, that lie before the end of the file
            inside = np.clip(base + got - offsets, 0, lengths)
            short = np.flatnonzero(inside < lengths)
            if len(short):
                keep = int(short[0]) + 1
                offsets, lengths = offsets[:keep], inside[:keep]
        total = int(lengths.sum())
        starts = np.cumsum(lengths) - lengths  # each segment's place in the stream
        where = np.arange(total) + np.repeat(offsets - base - starts, lengths)
        packed = np.frombuffer(span, np.uint8)
        data = np.frombuffer(stream, np.uint8, total)
        if not write:
            data[:] = packed[where]
            return total
        packed[where] = data
        view = memoryview(span)
        written = 0
        while written < len(span):
            written += os.pwrite(self.fd, view[written:], base + written)
        return total

    def individual(self, write: bool, buf: Any, status: Status | None) -> None:
        """A data call at the individual file pointer, which moves by the etypes asked."""
        self.sequential_forbidden()
        spec = self.spec(write, buf)
        with self.lock:
            position = self.position
            self.position = position + self.etypes(spec)
        self.transfer(write, position, spec, status)

    def sequential_forbidden(self) -> None:
        if self.amode & MODE_SEQUENTIAL:
            raise _err(exceptions.ERR_UNSUPPORTED_OPERATION,
                       "individual file pointers and explicit offsets need a file not "
                       "opened MODE_SEQUENTIAL")  # fmt: skip

    def ordered(self, write: bool, buf: Any, status: Status | None) -> None:
        """A collective data call at the shared pointer, in rank order."""
        spec = self.spec(write, buf)
        asked = self.etypes(spec)
        counts = self.comm.allgather(asked) if self.comm.Get_size() > 1 else [asked]
        base = self.shared.fetch_add(sum(counts)) if self.comm.Get_rank() == 0 else 0
        if self.comm.Get_size() > 1:
            base = self.comm.bcast(base, 0)
        self.transfer(write, base + sum(counts[: self.comm.Get_rank()]), spec, status)

    def seek_position(self, current: int, offset: int, whence: int) -> int:
        if whence == SEEK_SET:
            target = offset
        elif whence == SEEK_CUR:
            target = current + offset
        elif whence == SEEK_END:
            target = self.view.end_position(os.fstat(self.fd).st_size) + offset
        else:
            raise _err(exceptions.ERR_ARG, f"Seek: whence {whence}")
        if target < 0:
            raise _err(exceptions.ERR_ARG, f"Seek to etype {target}, before the view's start")
        return target

    def close(self) -> None:
        """Collective: every rank closes its descriptors, then rank 0 removes the shared
        pointer's counter file and, with MODE_DELETE_ON_CLOSE, the file."""
        try:
            self.shared.close()
        finally:
            os.close(self.fd)
        if self.comm.Get_size() > 1:
            self.comm.Barrier()

        def remove() -> None:
            self.shared.remove()
            if self.amode & MODE_DELETE_ON_CLOSE:
                _unlink(self.path)

        try:
            self.agree(remove)
        finally:
            self.comm.Free()


def _unlink(path: Any) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        raise _os_error(exc, f"delete {os.fsdecode(path)!r}") from None


def _sieves(offsets: np.ndarray, lengths: np.ndarray, nbytes: int) -> bool:
    """Whether one access of the whole span beats a call per segment: small segments
    (under 4 KiB on average) whose span is at most 4 times the data plus 64 KiB, and 64 MiB
    at the most."""
    span = int(offsets[-1] + lengths[-1] - offsets[0])
    return nbytes < 4096 * len(offsets) and span <= min(4 * nbytes + 65536, 64 << 20)


def _same_external_size(datatype: Datatype, what: str, error: int) -> None:
    """MPI.Exception(`error`) unless every element of `datatype` has the same size in
    external32 as here (LONG, 8 bytes here and 4 there, has not): then a view's layout is
    the same in both, and only byte order and float formats change."""
    if datatype.Pack_external_size("external32", 1) != datatype.size:
        raise _err(error, f"external32: {what} {datatype.name} changes size there")


def _external_form(data: Any, datatype: Datatype, to_external: bool) -> bytes:
    """Dense elements of `datatype` converted to the external32 form or back."""
    count = len(data) // datatype.size if datatype.size else 0
    return _convert(data, datatype._signature(), count, to_external)


def _check_amode(amode: int) -> None:
    """MPI.Exception(ERR_AMODE) unless exactly one of RDONLY/WRONLY/RDWR is given, RDONLY
    without CREATE/EXCL, RDWR without SEQUENTIAL, and no unknown bit."""
    access = [m for m in (MODE_RDONLY, MODE_WRONLY, MODE_RDWR) if amode & m]
    bad = len(access) != 1 or amode & ~_MODES
    bad = bad or (amode & MODE_RDONLY and amode & (MODE_CREATE | MODE_EXCL))
    bad = bad or (amode & MODE_RDWR and amode & MODE_SEQUENTIAL)
    if bad:
        raise _err(exceptions.ERR_AMODE, f"File.Open: access mode {amode:#x}")


def _open_fd(path: Any, amode: int, create: bool) -> int:
    flags = {MODE_RDONLY: os.O_RDONLY, MODE_WRONLY: os.O_WRONLY, MODE_RDWR: os.O_RDWR}[
        amode & (MODE_RDONLY | MODE_WRONLY | MODE_RDWR)
    ]
    if create and amode & MODE_CREATE:
        flags |= os.O_CREAT
    if create and amode & MODE_EXCL:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise _os_error(exc, f"open {os.fsdecode(path)!r}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise _err(exceptions.ERR_BAD_FILE, f"open {os.fsdecode(path)!r}: a directory")
    return fd


def _null_handler_error(exc: exceptions.Exception) -> None:
    """Errors of calls on no file (Open, Delete) go through FILE_NULL's handler."""
    errhandler.call_errhandler_for(FILE_NULL, exc.Get_error_class(), str(exc))


# ---------------------------------------------------------------------------- handle
class File(Handle):
    """A handle on an open file (mpi4py's `File`); `File()` is a null handle.

    See the module docstring for the model.
    """

    _f: _Open | None
    _errhandler: Any  # set by Set_errhandler (see guest_lib/mpi/errhandler.py)

    def __new__(cls, file: File | None = None) -> File:
        if file is not None and not isinstance(file, File):
            raise TypeError(f"File: expecting a File, got {type(file).__name__}")
        self = super().__new__(cls)
        self._f = None if file is None else file._f
        return self

    def _check(self) -> _Open:
        state = self._f
        if state is None:
            raise _err(exceptions.ERR_FILE, "null file handle")
        return state

    def __bool__(self) -> bool:
        return self._f is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, File):
            return NotImplemented
        return self._f is other._f

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, File):
            return NotImplemented
        return self._f is not other._f

    def _key(self) -> Hashable:
        return Same(self._f)

    def __reduce__(self) -> Any:
        """FILE_NULL pickles as itself; an open file raises ValueError (as mpi4py)."""
        if self._f is not None:
            raise ValueError("cannot serialize an open file")
        return (_file_null, ()) if self is FILE_NULL else (type(self), ())

    def __repr__(self) -> str:
        return "<File null>" if self._f is None else f"<File {os.fsdecode(self._f.path)!r}>"

    # ------------------------------------------------------------------ open, close
    @classmethod
    def Open(cls, comm: Any, filename: Any, amode: int = MODE_RDONLY, info: Any = None) -> File:
        """Open `filename` (str, bytes or path) on every rank of the intracommunicator `comm`.

        Collective; see the module docstring for the order and the errors.
        """
        try:
            return cls._open(comm, filename, int(amode), info)
        except exceptions.Exception as exc:
            _null_handler_error(exc)
            raise

    @classmethod
    def _open(cls, comm: Any, filename: Any, amode: int, info: Any) -> File:
        if comm is None or not comm or comm.Is_inter():
            raise _err(exceptions.ERR_COMM, "File.Open needs an intracommunicator")
        path = os.fspath(filename)
        _check_amode(amode)
        fcomm = comm.Dup()
        fcomm._area = False  # a handful of small collectives: no area slot for them
        rank, size = fcomm.Get_rank(), fcomm.Get_size()
        fd, failure, start, token = -1, None, 0, secrets.token_hex(8)
        try:
            if rank == 0:
                fd = _open_fd(path, amode, True)
                start = os.fstat(fd).st_size if amode & MODE_APPEND else 0
        except exceptions.Exception as exc:
            failure = (exc.Get_error_class(), exc.detail)
        if size > 1:
            failure, start, token = fcomm.bcast((failure, start, token), 0)
            if failure is None and rank:
                try:
                    fd = _open_fd(path, amode, False)
                except exceptions.Exception as exc:
                    failure = (exc.Get_error_class(), f"rank {rank}: {exc.detail}")
            failures = [f for f in fcomm.allgather(failure) if f is not None]
            failure = failures[0] if failures else None
        if failure is not None:
            if fd >= 0:
                os.close(fd)
            fcomm.Free()
            raise _err(*failure)
        hints = dict(info.items()) if isinstance(info, Info) else {}
        counter = None
        if size > 1:  # the shared pointer's counter file, in the file's directory
            head, tail = os.path.split(os.fsdecode(path))
            counter = os.path.join(head, f".{tail}.shfp.{token}")
        file = cls()
        file._f = _Open(fcomm, fd, path, amode, hints, _SharedPointer(counter, start))
        default = getattr(FILE_NULL, "_errhandler", errhandler.ERRORS_RETURN)
        if default != errhandler.ERRORS_RETURN:
            errhandler.set_errhandler(file, default)
        return file

    def Close(self) -> None:
        """Close the file (collective); this handle becomes null."""
        state = self._check()
        self._f = None
        state.close()

    def _release(self) -> None:
        """Free the handle: close the file (Close)."""
        self.Close()

    @classmethod
    def Delete(cls, filename: Any, info: Any = None) -> None:
        """Remove a file. MPI.Exception(ERR_NO_SUCH_FILE) if there is none, ERR_ACCESS..."""
        try:
            _unlink(os.fspath(filename))
        except exceptions.Exception as exc:
            _null_handler_error(exc)
            raise

    # ------------------------------------------------------------------ properties
    def Set_size(self, size: int) -> None:
        """Truncate or extend the file to `size` bytes (collective).

        Rank 0 does it, the others return after it. MPI.Exception(ERR_ARG) for a negative size,
        ERR_IO (or the matching class) if the system call fails.
        """
        state = self._check()
        if int(size) < 0:
            raise _err(exceptions.ERR_ARG, f"Set_size: size {size}")

        def truncate() -> None:
            try:
                os.ftruncate(state.fd, int(size))
            except OSError as exc:
                raise _os_error(exc, "Set_size") from None

        state.agree(truncate)

    def Preallocate(self, size: int) -> None:
        """Reserve storage for the first `size` bytes (collective, as Set_size).

        The file grows to `size` bytes if it was smaller. MPI.Exception(ERR_ARG) for a negative
        size.
        """
        state = self._check()
        if int(size) < 0:
            raise _err(exceptions.ERR_ARG, f"Preallocate: size {size}")

        def allocate() -> None:
            try:
                if size:
                    os.posix_fallocate(state.fd, 0, int(size))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise _os_error(exc, "Preallocate") from None
                if os.fstat(state.fd).st_size < size:  # no fallocate here: size it alone
                    os.ftruncate(state.fd, int(size))

        state.agree(allocate)

    def Get_size(self) -> int:
        """The file's size in bytes."""
        return os.fstat(self._check().fd).st_size

    @property
    def size(self) -> int:
        """Size of the file in bytes (Get_size)."""
        return self.Get_size()

    def Get_amode(self) -> int:
        """Return the access mode the file was opened with (MODE_* bits)."""
        return self._check().amode

    @property
    def amode(self) -> int:
        """Access mode the file was opened with (Get_amode)."""
        return self.Get_amode()

    def Get_group(self) -> Any:
        """A new Group of the ranks that opened the file."""
        return self._check().comm.Get_group()

    @property
    def group(self) -> Any:
        """Group of the processes that opened the file (Get_group)."""
        return self.Get_group()

    @property
    def group_size(self) -> int:
        """Number of processes that opened the file."""
        return self._check().comm.Get_size()

    @property
    def group_rank(self) -> int:
        """Rank of this process among those that opened the file."""
        return self._check().comm.Get_rank()

    def Set_info(self, info: Any) -> None:
        """Add `info`'s hints to the file's (none changes what this library does)."""
        state = self._check()
        if isinstance(info, Info):
            state.hints.update(info.items())

    def Get_info(self) -> Info:
        """A new Info with the file's hints."""
        return Info.Create(self._check().hints)

    @property
    def info(self) -> Info:
        """File info (Get_info)."""
        return self.Get_info()

    @info.setter
    def info(self, info: Info) -> None:
        self.Set_info(info)

    def Set_atomicity(self, flag: bool) -> None:
        """Atomic mode on or off (collective; see the module docstring)."""
        self._check().atomic = bool(flag)

    def Get_atomicity(self) -> bool:
        """Return True iff atomic mode is on (Set_atomicity)."""
        return self._check().atomic

    @property
    def atomicity(self) -> bool:
        """Atomic mode on or off (Get_atomicity)."""
        return self.Get_atomicity()

    @atomicity.setter
    def atomicity(self, flag: bool) -> None:
        self.Set_atomicity(flag)

    def Sync(self) -> None:
        """Flush this rank's writes to the storage device (os.fsync).

        MPI.Exception(ERR_IO) if that fails (a device that cannot be synced is not an error).
        """
        state = self._check()
        try:
            os.fsync(state.fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a device that cannot be synced (/dev/null)
                raise _os_error(exc, "Sync") from None

    def Get_type_extent(self, datatype: Datatype) -> int:
        """The extent of `datatype` in the file (its memory extent: native data)."""
        self._check()
        return datatype.extent

    # ------------------------------------------------------------------ views
    def Set_view(self, disp: int = 0, etype: Datatype = BYTE, filetype: Datatype | None = None,
                 datarep: str = "native", info: Any = None) -> None:  # fmt: skip
        """Set the view (collective): both file pointers go back to 0.

        MPI.Exception: ERR_TYPE for a filetype that is not whole etypes at increasing nonnegative
        offsets, ERR_UNSUPPORTED_DATAREP for a user data representation, or an external32 view of a
        type whose size differs there (see the module docstring), ERR_ARG for DISPLACEMENT_CURRENT
        without MODE_SEQUENTIAL.
        """
        state = self._check()
        if datarep not in _DATAREPS:
            code = (exceptions.ERR_UNSUPPORTED_DATAREP if datarep in _KNOWN_DATAREPS
                    else exceptions.ERR_ARG)  # fmt: skip
            raise _err(code, f"Set_view: data representation {datarep!r}")
        disp = int(disp)
        if disp == DISPLACEMENT_CURRENT:
            if not state.amode & MODE_SEQUENTIAL:
                raise _err(exceptions.ERR_ARG, "DISPLACEMENT_CURRENT needs MODE_SEQUENTIAL")
            disp = state.view.byte_offset(state.shared.get())
        if disp < 0:
            raise _err(exceptions.ERR_ARG, f"Set_view: displacement {disp}")
        view = _View(disp, etype, etype if filetype is None else filetype, datarep)
        if datarep == "external32":
            for datatype, what in ((view.etype, "etype"), (view.filetype, "filetype")):
                _same_external_size(datatype, what, exceptions.ERR_UNSUPPORTED_DATAREP)
        if state.comm.Get_size() > 1:
            state.comm.Barrier()  # every shared-pointer call before the view is done
        state.view = view
        with state.lock:
            state.position = 0
        state.agree(lambda: state.shared.set(0))
        if isinstance(info, Info):
            state.hints.update(info.items())

    def Get_view(self) -> tuple[int, Datatype, Datatype, str]:
        """Return the view: (displacement, etype, filetype, data representation).

        Derived types come as new handles (free them).
        """
        view = self._check().view

        def handle(datatype: Datatype) -> Datatype:
            return datatype if datatype.is_predefined else datatype.Dup()

        return view.disp, handle(view.etype), handle(view.filetype), view.datarep

    # ------------------------------------------------------------------ explicit offsets
    def Read_at(self, offset: int, buf: Any, status: Status | None = None) -> None:
        """Read `buf` from etype `offset` of the view.

        Stops at the end of the file: the status counts the bytes read.
        """
        state = self._check()
        state.sequential_forbidden()
        state.transfer(False, int(offset), state.spec(False, buf), status)

    def Write_at(self, offset: int, buf: Any, status: Status | None = None) -> None:
        """Write `buf` at etype `offset` of the view."""
        state = self._check()
        state.sequential_forbidden()
        state.transfer(True, int(offset), state.spec(True, buf), status)

    def Read_at_all(self, offset: int, buf: Any, status: Status | None = None) -> None:
        """Collective Read_at."""
        self.Read_at(offset, buf, status)

    def Write_at_all(self, offset: int, buf: Any, status: Status | None = None) -> None:
        """Collective Write_at."""
        self.Write_at(offset, buf, status)

    def Iread_at(self, offset: int, buf: Any) -> Request:
        """Read_at, as a completed request."""
        return self._done(lambda status: self.Read_at(offset, buf, status))

    def Iwrite_at(self, offset: int, buf: Any) -> Request:
        """Write_at, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self.Write_at(offset, buf, status))

    def Iread_at_all(self, offset: int, buf: Any) -> Request:
        """Read_at_all, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self.Read_at_all(offset, buf, status))

    def Iwrite_at_all(self, offset: int, buf: Any) -> Request:
        """Write_at_all, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self.Write_at_all(offset, buf, status))

    def _done(self, call: Callable[[Status], None]) -> Request:
        """A completed Request for `call`, done now (its status holds the byte count)."""
        from guest_lib.mpi import MPI

        status = Status()
        call(status)
        op = DoneOp(constants.ANY_SOURCE, constants.ANY_TAG)
        op.count = status.Get_count(BYTE)
        return Request(op, MPI._engine)

    # ------------------------------------------------------------------ individual pointer
    def Read(self, buf: Any, status: Status | None = None) -> None:
        """Read at the individual file pointer, which moves past the etypes asked for."""
        self._check().individual(False, buf, status)

    def Write(self, buf: Any, status: Status | None = None) -> None:
        """Write at the individual file pointer, which moves past them."""
        self._check().individual(True, buf, status)

    def Read_all(self, buf: Any, status: Status | None = None) -> None:
        """Collective Read: read at the individual file pointer (see Read)."""
        self.Read(buf, status)

    def Write_all(self, buf: Any, status: Status | None = None) -> None:
        """Collective Write: write at the individual file pointer (see Write)."""
        self.Write(buf, status)

    def Iread(self, buf: Any) -> Request:
        """Read, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self.Read(buf, status))

    def Iwrite(self, buf: Any) -> Request:
        """Write, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self.Write(buf, status))

    def Iread_all(self, buf: Any) -> Request:
        """Read_all, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self.Read_all(buf, status))

    def Iwrite_all(self, buf: Any) -> Request:
        """Write_all, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self.Write_all(buf, status))

    def Seek(self, offset: int, whence: int = SEEK_SET) -> None:
        """Move the individual file pointer (in etypes).

        MPI.Exception(ERR_ARG) for a place before the view's start or an unknown `whence`.
        """
        state = self._check()
        state.sequential_forbidden()
        with state.lock:
            state.position = state.seek_position(state.position, int(offset), whence)

    def Get_position(self) -> int:
        """The individual file pointer, in etypes."""
        return self._check().position

    def Get_byte_offset(self, offset: int) -> int:
        """The file byte where etype `offset` of the view lies."""
        return self._check().view.byte_offset(int(offset))

    # ------------------------------------------------------------------ shared pointer
    def _shared(self, write: bool, buf: Any, status: Status | None) -> None:
        state = self._check()
        spec = state.spec(write, buf)
        state.transfer(write, state.shared.fetch_add(state.etypes(spec)), spec, status)

    def Read_shared(self, buf: Any, status: Status | None = None) -> None:
        """Read at the shared file pointer, which moves past the etypes asked for.

        One atomic fetch-and-add moves it: concurrent callers get disjoint places.
        """
        self._shared(False, buf, status)

    def Write_shared(self, buf: Any, status: Status | None = None) -> None:
        """Write at the shared file pointer (as Read_shared)."""
        self._shared(True, buf, status)

    def Iread_shared(self, buf: Any) -> Request:
        """Read_shared, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self._shared(False, buf, status))

    def Iwrite_shared(self, buf: Any) -> Request:
        """Write_shared, done now; return a completed Request (its status holds the byte count)."""
        return self._done(lambda status: self._shared(True, buf, status))

    def Read_ordered(self, buf: Any, status: Status | None = None) -> None:
        """Collective read at the shared pointer: rank r's data follow ranks 0..r-1's."""
        self._check().ordered(False, buf, status)

    def Write_ordered(self, buf: Any, status: Status | None = None) -> None:
        """Collective write at the shared pointer, in rank order."""
        self._check().ordered(True, buf, status)

    def Seek_shared(self, offset: int, whence: int = SEEK_SET) -> None:
        """Move the shared file pointer (collective).

        Every rank gives the same arguments; every shared access before it is done first.
        """
        state = self._check()
        if state.comm.Get_size() > 1:
            state.comm.Barrier()
        state.agree(lambda: state.shared.set(
            state.seek_position(state.shared.get(), int(offset), whence)))  # fmt: skip

    def Get_position_shared(self) -> int:
        """The shared file pointer, in etypes."""
        return self._check().shared.get()

    # ------------------------------------------------------------------ split collectives
    def _begin(self, name: str, call: Callable[[Status], None]) -> None:
        state = self._check()
        if state.split is not None:
            raise _err(exceptions.ERR_OTHER, f"{name}_begin: {state.split[0]}_begin is active")
        status = Status()
        call(status)
        state.split = (name, status)

    def _end(self, name: str, status: Status | None) -> None:
        state = self._check()
        if state.split is None or state.split[0] != name:
            raise _err(exceptions.ERR_OTHER, f"{name}_end without {name}_begin")
        done = state.split[1]
        state.split = None
        if status is not None:
            status._set(done.source, done.tag, done.Get_count(BYTE))

    def Read_at_all_begin(self, offset: int, buf: Any) -> None:
        """Start a split collective Read_at_all (the data are there at its end)."""
        self._begin("Read_at_all", lambda status: self.Read_at_all(offset, buf, status))

    def Read_at_all_end(self, buf: Any, status: Status | None = None) -> None:
        """End the split Read_at_all: fill `status` with its byte count.

        MPI.Exception(ERR_OTHER) without a Read_at_all_begin before it.
        """
        self._end("Read_at_all", status)

    def Write_at_all_begin(self, offset: int, buf: Any) -> None:
        """Start a split collective Write_at_all (the data are written by its end).

        MPI.Exception(ERR_OTHER) while another split collective of this file is active.
        """
        self._begin("Write_at_all", lambda status: self.Write_at_all(offset, buf, status))

    def Write_at_all_end(self, buf: Any, status: Status | None = None) -> None:
        """End the split Write_at_all: fill `status` with its byte count.

        MPI.Exception(ERR_OTHER) without a Write_at_all_begin before it.
        """
        self._end("Write_at_all", status)

    def Read_all_begin(self, buf: Any) -> None:
        """Start a split collective Read_all (the data are there at its end).

        MPI.Exception(ERR_OTHER) while another split collective of this file is active.
        """
        self._begin("Read_all", lambda status: self.Read_all(buf, status))

    def Read_all_end(self, buf: Any, status: Status | None = None) -> None:
        """End the split Read_all: fill `status` with its byte count.

        MPI.Exception(ERR_OTHER) without a Read_all_begin before it.
        """
        self._end("Read_all", status)

    def Write_all_begin(self, buf: Any) -> None:
        """Start a split collective Write_all (the data are written by its end).

        MPI.Exception(ERR_OTHER) while another split collective of this file is active.
        """
        self._begin("Write_all", lambda status: self.Write_all(buf, status))

    def Write_all_end(self, buf: Any, status: Status | None = None) -> None:
        """End the split Write_all: fill `status` with its byte count.

        MPI.Exception(ERR_OTHER) without a Write_all_begin before it.
        """
        self._end("Write_all", status)

    def Read_ordered_begin(self, buf: Any) -> None:
        """Start a split collective Read_ordered (the data are there at its end).

        MPI.Exception(ERR_OTHER) while another split collective of this file is active.
        """
        self._begin("Read_ordered", lambda status: self.Read_ordered(buf, status))

    def Read_ordered_end(self, buf: Any, status: Status | None = None) -> None:
        """End the split Read_ordered: fill `status` with its byte count.

        MPI.Exception(ERR_OTHER) without a Read_ordered_begin before it.
        """
        self._end("Read_ordered", status)

    def Write_ordered_begin(self, buf: Any) -> None:
        """Start a split collective Write_ordered (the data are written by its end).

        MPI.Exception(ERR_OTHER) while another split collective of this file is active.
        """
        self._begin("Write_ordered", lambda status: self.Write_ordered(buf, status))

    def Write_ordered_end(self, buf: Any, status: Status | None = None) -> None:
        """End the split Write_ordered: fill `status` with its byte count.

        MPI.Exception(ERR_OTHER) without a Write_ordered_begin before it.
        """
        self._end("Write_ordered", status)

    # ------------------------------------------------------------------ error handlers
    @classmethod
    def Create_errhandler(cls, errhandler_fn: Callable[[File, int], None]) -> Any:
        """Create an error handler for files from `errhandler_fn(file, errorcode)`."""
        return errhandler.create_errhandler(errhandler_fn, "File")

    def Get_errhandler(self) -> Any:
        """A new handle on the file's handler (FILE_NULL's: the one new files get)."""
        if self._f is None:
            return errhandler.Errhandler(getattr(FILE_NULL, "_errhandler",
                                                 errhandler.ERRORS_RETURN))  # fmt: skip
        return errhandler.get_errhandler(self)

    def Set_errhandler(self, errhandler_: Any) -> None:
        """Set the file's handler; on a null handle, the handler new files get."""
        if self._f is not None:
            errhandler.set_errhandler(self, errhandler_)
            return
        if not isinstance(errhandler_, errhandler.Errhandler) or not errhandler_:
            raise _err(exceptions.ERR_ARG, "not an error handler")
        FILE_NULL._errhandler = errhandler.Errhandler(errhandler_)

    def Call_errhandler(self, errorcode: int) -> None:
        """Invoke this file's error handler (FILE_NULL's for a null handle) with `errorcode`."""
        if self._f is None:
            errhandler.call_errhandler_for(FILE_NULL, int(errorcode), "")
        else:
            errhandler.call_errhandler(self, errorcode)


def _file_null() -> File:
    return FILE_NULL


FILE_NULL = File()
FILE_NULL._errhandler = errhandler.ERRORS_RETURN
_datareps: dict[str, tuple[Any, Any, Any]] = {}


def Register_datarep(datarep: str, read_fn: Any, write_fn: Any, extent_fn: Any) -> None:
    """Record a user data representation.

    MPI.Exception(ERR_DUP_DATAREP) for a name already known. Views cannot use one yet: Set_view says
    ERR_UNSUPPORTED_DATAREP.
    """
    if datarep in _KNOWN_DATAREPS:
        raise _err(exceptions.ERR_DUP_DATAREP, f"data representation {datarep!r} exists")
    _KNOWN_DATAREPS.add(datarep)
    _datareps[datarep] = (read_fn, write_fn, extent_fn)
