"""Message specs: mpi4py's ways of naming a buffer, resolved to a flat byte view.

Accepted forms (`buf` is anything with the buffer protocol: numpy array, bytes, bytearray,
memoryview, array.array, mmap; an object describing memory mapped in this process through
DLPack or the CUDA array interface (see guest_lib.mpi.foreign); or None for an empty message):
    buf                                  datatype from the buffer's format, count = all of it
    [buf, datatype]                      datatype a Datatype or a typecode string ("d", "i4")
    [buf, count]                         datatype inferred
    [buf, count, datatype]
    [buf, (count, displ), datatype]
    [buf, count, displ, datatype]        displ in elements of datatype
Vector specs (the v-collectives) take counts and displs sequences in those places.

A `Spec` carries `view` (a flat unsigned-byte memoryview of exactly count*extent bytes,
writable when asked for), `count` and `datatype`. Errors: TypeError for something that is
not a buffer or a malformed spec, BufferError for a read-only buffer where one is written,
ValueError when count/displ run past the end of the buffer. A buffer whose byte order is not
the machine's (a byte-swapped numpy array, a '>' format) has no datatype of its own: as
with mpi4py, BufferError unless the spec names a datatype.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from guest_lib.mpi import constants, datatypes, foreign
from guest_lib.mpi.datatypes import BYTE, Datatype
from ivshmem_comm import ring

_EMPTY = memoryview(bytearray(0))
_IMPLIED: dict[np.dtype, Datatype | None] = {}  # numpy dtype -> its datatype (a cache)
_SWAPPED = Datatype._create("(byte-swapped)", None, "")  # what a non-native byte order implies
_FOREIGN = ">!" if sys.byteorder == "little" else "<!"  # format prefixes of swapped data


class Spec(NamedTuple):
    """A parsed message spec: its bytes, element count and datatype (see `parse`).

    `view` is the flat byte view of the data (a packed copy to receive into, for a packing
    datatype), `count` the number of `datatype` elements; `unpack`, from parse(deferred=True),
    copies that packed copy into the user's buffer once the data is there, else None.
    """

    view: memoryview
    count: int  # type: ignore[assignment]  # MPI's name; it hides tuple.count, unused here
    datatype: Datatype
    unpack: Callable[[], None] | None = None  # see parse(deferred=True)

    def array(self) -> np.ndarray:
        """The data as a numpy array of the datatype's base element type (zero-copy)."""
        dtype = self.datatype.base.dtype
        assert dtype is not None
        return np.frombuffer(self.view, dtype=dtype) if len(self.view) else np.empty(0, dtype)


def as_bytes(buf: Any, writable: bool = False) -> memoryview:
    """A flat byte view of any message buffer `buf` (see `parse` for the errors)."""
    return _as_bytes(buf, writable)[0]


def _as_bytes(buf: Any, writable: bool) -> tuple[memoryview, Datatype | None]:
    """A flat byte view of `buf` and the datatype its format implies (None if unknown)."""
    if buf is None:
        return _EMPTY, None
    if isinstance(buf, np.ndarray):
        if writable and not buf.flags.writeable:
            raise BufferError("message buffer is read-only")
        dtype = buf.dtype
        try:
            datatype = _IMPLIED[dtype]
        except KeyError:
            datatype = _IMPLIED[dtype] = _implied_by(dtype)
        if not buf.size:  # (memoryview cannot cast a view with a 0 in its shape)
            return memoryview(bytearray(0)), datatype
        if buf.flags.c_contiguous and dtype.kind not in "mM":  # memoryview can't hold those
            view = buf.data
            return (view if view.ndim == 1 and view.format == "B" else view.cast("B")), datatype
        if not buf.flags.f_contiguous:
            raise ValueError("message buffer must be contiguous")
        flat = buf.reshape(-1, order="A") if buf.ndim != 1 else buf
        return flat.view(np.uint8).data, datatype
    try:
        view = memoryview(buf)
    except TypeError:
        found = foreign.describe(buf)  # DLPack, CUDA array interface: memory mapped here
        if found is None:
            raise TypeError(f"message: expecting a buffer, got {type(buf).__name__}") from None
        view = foreign.host_view(found, writable)
        if found.swapped:
            return view, _SWAPPED
        try:
            return view, _IMPLIED[found.dtype]
        except KeyError:
            implied = _IMPLIED[found.dtype] = _implied_by(found.dtype)
            return view, implied
    if writable and view.readonly:
        raise BufferError("message buffer is read-only")
    if not view.contiguous:
        raise ValueError("message buffer must be contiguous")
    fmt = view.format
    if fmt == "B" and view.ndim == 1:
        return view, BYTE
    if fmt[:1] in _FOREIGN:
        datatype = _SWAPPED
    else:
        fmt = fmt.lstrip("@=<>")
        try:
            datatype = BYTE if fmt in ("B", "c") else datatypes.from_code(fmt)
        except KeyError:
            datatype = None
    view = view.cast("B") if view.c_contiguous else np.asarray(view).data.cast("B")
    return view, datatype


def _implied_by(dtype: np.dtype) -> Datatype | None:
    if dtype.byteorder != "|" and not dtype.isnative:
        return _SWAPPED
    try:
        return datatypes.from_dtype(dtype)
    except KeyError:
        return None


def _implied(implied: Datatype | None) -> Datatype:
    """The datatype a buffer's format gives (BYTE when it gives none). BufferError for a
    byte order that is not the machine's."""
    if implied is _SWAPPED:
        raise BufferError("message buffer: byte order is not the machine's; name a datatype")
    return BYTE if implied is None else implied


def _datatype(value: Any) -> Datatype | None:
    """A spec's datatype item: a Datatype, a typecode, or None (the buffer's own)."""
    if value is None:
        return None
    if isinstance(value, Datatype):
        return value
    if isinstance(value, str):
        try:
            return datatypes.from_code(value)
        except KeyError:
            raise KeyError(f"unknown datatype code {value!r}") from None  # (as mpi4py)
    raise TypeError(f"expecting a datatype, got {type(value).__name__}")


def _is_datatype(value: Any) -> bool:
    return isinstance(value, Datatype | str)


def _contiguous(buf: Any, writable: bool) -> memoryview | None:
    """The bytes of a C-contiguous buffer (writable when asked), or None (also for an empty
    one of two dimensions or more, which memoryview cannot cast: the full parse takes it)."""
    try:
        view = memoryview(buf)
    except (TypeError, ValueError, BufferError):
        return None
    if writable and view.readonly:
        return None
    if not view.c_contiguous:  # (a strided 1-d byte view too)
        return None
    if view.ndim != 1 or view.format != "B":
        if not view.nbytes and view.ndim != 1:  # (a 0 in a shape of 2 or more: cast raises)
            return None
        view = view.cast("B")
    return view


def _fast(buf: Any, count: int | None, datatype: Datatype, writable: bool) -> Spec | None:
    """parse's fast path for the forms real codes write on every call, `[buf, count,
    datatype]` and `(buf, datatype)` with an int count (None: all of the buffer) and a
    datatype whose messages are its buffer's bytes, over a C-contiguous buffer. None when
    anything is out of the ordinary (an error, an odd buffer): the full parse decides."""
    view = _contiguous(buf, writable)
    if view is None:
        return None
    extent = datatype.size
    if count is None:
        if not extent:
            return None
        count, rest = divmod(len(view), extent)
        if rest:
            return None
        return Spec(view, count, datatype)
    stop = count * extent
    if count < 0 or stop > len(view):
        return None
    return Spec(view if stop == len(view) else view[:stop], count, datatype)


def plain(spec: Any, writable: bool = False, blocks: int = 1) -> Spec | None:
    """parse's fast path alone: the Spec of `[buf, count, datatype]` (an int count) or
    `(buf, datatype)` with a datatype that does not pack, over a C-contiguous buffer; None
    for anything else (other forms, errors: parse decides those). `blocks`: how many blocks
    of `count` elements the spec stands for (a block collective's per-rank count, as
    parse_vector reads an int count): the Spec covers count * blocks elements."""
    kind = type(spec)
    if kind is list or kind is tuple:
        n = len(spec)
        if n == 3:
            buf, count, datatype = spec
            if type(count) is int and isinstance(datatype, Datatype) and not datatype.packs:
                return _fast(buf, count * blocks, datatype, writable)
        elif n == 2:
            buf, datatype = spec
            if isinstance(datatype, Datatype) and not datatype.packs:
                return _fast(buf, None, datatype, writable)
    return None


_PLAIN_SIZE: dict[int, int] = {}  # id() of a predefined datatype that does not pack -> size


def _plain_sizes() -> dict[int, int]:
    """_PLAIN_SIZE, filled on first use: the predefined datatypes live as long as the
    module, so their ids name them for good (a type made at run time is never in it)."""
    if not _PLAIN_SIZE:
        for datatype in datatypes.PREDEFINED.values():
            if datatype.dtype is not None and datatype.size and not datatype.packs:
                _PLAIN_SIZE[id(datatype)] = datatype.size
    return _PLAIN_SIZE


def quick(spec: Any, writable: bool = False) -> memoryview | None:
    """The flat byte view parse() gives, for the forms a point-to-point call makes on every
    message, at the least cost: `[buf, count, datatype]` with an int count and `(buf,
    datatype)` naming a predefined datatype that does not pack, over a C-contiguous buffer,
    and a C-contiguous buffer of a native numeric format on its own (a numpy array). None
    for anything else, including every error (a read-only buffer with `writable`, a count
    past the end): the caller then runs parse(), which decides and reports."""
    return _flat_view(spec, writable, _PLAIN_SIZE or _plain_sizes())


# what _flat_view_py takes a bare buffer of: native numeric formats, as numpy and the array
# module write them (as ivshmem_comm/_fastpath.c's flat_formats)
_FLAT_FORMATS = frozenset("?bBhHiIlLqQefdg") | {"Zf", "Zd", "Zg"}


def _flat_view_py(spec: Any, writable: bool, sizes: dict[int, int]) -> memoryview | None:
    """quick's forms: the Python reference of ivshmem_comm._fastpath.flat_view (same
    arguments and results): `spec` a list or tuple (buf, count, datatype) with an int count
    >= 0 or (buf, datatype), `sizes[id(datatype)]` its element size, buf a C-contiguous
    buffer (writable with `writable`) holding count elements (without a count: whole
    elements); or `spec` itself such a buffer, not empty, of a format in _FLAT_FORMATS (all
    of it). Else None."""
    kind = type(spec)
    bare = kind is not list and kind is not tuple
    count, size = -1, 1  # all of the buffer
    if bare:
        buf = spec
    elif len(spec) == 3:
        buf, count, datatype = spec
        if type(count) is not int or count < 0:
            return None
    elif len(spec) == 2:
        buf, datatype = spec
    else:
        return None
    if not bare:
        found = sizes.get(id(datatype))
        if found is None:
            return None
        size = found
    try:
        view = memoryview(buf)
    except (TypeError, ValueError, BufferError):
        return None
    if (writable and view.readonly) or not view.c_contiguous:
        return None
    if bare and (not view.nbytes or view.format not in _FLAT_FORMATS):
        return None
    if view.ndim != 1 or view.format != "B":
        if not view.nbytes and view.ndim != 1:  # (cast fails: a 0 in a shape of 2 or more)
            return None
        view = view.cast("B")
    total = len(view)
    if count < 0:
        return None if total % size else view
    stop = count * size
    if stop == total:
        return view
    return view[:stop] if stop < total else None


# the C quick path, with the C queues (as typepack's copy)
_flat_view = _flat_view_py if ring.flat_view is None else ring.flat_view


FlatView = Callable[[Any, bool, dict[int, int]], memoryview | None]


def quick_parts() -> tuple[FlatView, dict[int, int]]:
    """quick's function and table, for the calls made on every message, which call them
    straight (a Python frame less): quick(spec, writable) is f(spec, writable, sizes)."""
    return _flat_view, _plain_sizes()


def plain_vector(
    spec: Any, size: int, writable: bool = False
) -> tuple[memoryview, list[int], list[int]] | None:
    """parse_vector's fast path alone: (the buffer's bytes, byte counts, byte displacements)
    of a vector spec with explicit per-rank counts, `[buf, (counts, displs), datatype]`,
    `[buf, counts, displs, datatype]` or `[buf, counts, datatype]` (displacements then
    contiguous), counts and displacements `size` ints each (_int_sequence: lists or tuples
    of ints, not bools, or integer arrays), a datatype that does not pack, over a
    C-contiguous buffer, every part inside it. None for anything else (other forms, errors:
    parse_vector decides and raises those)."""
    if type(spec) is not list and type(spec) is not tuple:
        return None
    n = len(spec)
    if n == 3:
        buf, counts, datatype = spec
        displs = None
        if type(counts) is tuple and len(counts) == 2:
            counts, displs = counts
    elif n == 4:
        buf, counts, displs, datatype = spec
    else:
        return None
    if not isinstance(datatype, Datatype) or datatype.packs:
        return None
    counts = _int_sequence(counts, size)
    if counts is None:
        return None
    if displs is not None:
        displs = _int_sequence(displs, size)
        if displs is None:
            return None
    view = _contiguous(buf, writable)
    if view is None:
        return None
    extent = datatype.size
    limit = len(view)
    byte_counts: list[int] = []
    byte_displs: list[int] = []
    running = 0
    for i in range(size):
        count = counts[i]
        displ = running if displs is None else displs[i]
        if type(count) is not int or type(displ) is not int or count < 0 or displ < 0:
            return None
        start, length = displ * extent, count * extent
        if start + length > limit:
            return None
        byte_counts.append(length)
        byte_displs.append(start)
        running = displ + count
    return view, byte_counts, byte_displs


_INT_FORMATS = frozenset("hHiIlLqQ")  # native integer formats of counts (not bytes: b, B)


def _int_sequence(value: Any, size: int) -> Any:
    """`value`, a vector spec's counts or displacements, as `size` ints: a list or tuple of
    that length as it is (its items checked by the caller), an integer array (a buffer of
    one dimension and a format of _INT_FORMATS: array.array('i'), a numpy int array) as the
    list of its values; None for anything else. The C front's front_ints takes the same."""
    kind = type(value)
    if kind is list or kind is tuple:
        return value if len(value) == size else None
    try:
        view = memoryview(value)
    except TypeError:
        return None
    if view.ndim != 1 or view.format not in _INT_FORMATS or len(view) != size:
        return None
    return view.tolist()


def parse(spec: Any, *, writable: bool = False, deferred: bool = False) -> Spec:
    """Resolve a message spec (see module doc) to a Spec. A packing datatype received into
    (`writable`) gives a packed copy to receive into: its unpack is the running receiving
    call's (see `unpacking`), or with `deferred` the caller's: `Spec.unpack`, to call once
    the data is there."""
    kind = type(spec)
    if kind is list or kind is tuple:
        fast = plain(spec, writable)
        if fast is not None:
            return fast
    if not isinstance(spec, list | tuple):  # a bare buffer: all of it, its own datatype
        view, implied = _as_bytes(spec, writable)
        own = _implied(implied)
        extent = own.size
        if extent == 1:
            return Spec(view, len(view), own)
        elements, rest = divmod(len(view), extent) if extent else (0, 0)
        if rest:
            raise ValueError(
                f"message: buffer length {len(view)} is not a multiple of {own.name}'s "
                f"extent {extent}"
            )
        return Spec(view, elements, own)
    count: int | None = None
    displ = 0
    datatype: Datatype | None = None
    items = list(spec)
    if not 1 <= len(items) <= 4:
        raise ValueError(f"message: expecting 1..4 items, got {len(items)}")
    buf = items[0]
    if len(items) == 2:
        if _is_datatype(items[1]):
            datatype = _datatype(items[1])
        else:
            count, displ = _count_displ(items[1])
    elif len(items) == 3:
        count, displ = _count_displ(items[1])
        datatype = _datatype(items[2])
    elif len(items) == 4:
        count = None if items[1] is None else int(items[1])
        displ = 0 if items[2] is None else int(items[2])
        datatype = _datatype(items[3])
    if buf is constants.BOTTOM:  # absolute addresses (Get_address): packed from there
        if datatype is None:
            raise TypeError("message: a BOTTOM buffer needs a datatype")
        count = 0 if count is None else count
        view, base = _absolute([(displ * datatype.extent, count, datatype)])
        packed, unpack = _packed(view, displ * datatype.extent - base, count, datatype,
                                 writable)  # fmt: skip
        if deferred:
            return Spec(packed, count, datatype, unpack)
        _owed(unpack, datatype)
        return Spec(packed, count, datatype)
    view, implied = _as_bytes(buf, writable)
    if datatype is None:
        datatype = _implied(implied)
    if datatype.dtype is None and (count is None or count or displ):  # DATATYPE_NULL
        raise ValueError("message: DATATYPE_NULL holds no data")
    if datatype.extent < 0 and (count is None or displ):
        raise ValueError(f"message: {datatype.name} has a negative extent")
    if datatype.packs:
        if count is None:
            count = (len(view) - displ * datatype.extent) // datatype.extent
        packed, unpack = _packed(view, displ * datatype.extent, count, datatype, writable)
        if deferred:
            return Spec(packed, count, datatype, unpack)
        _owed(unpack, datatype)
        return Spec(packed, count, datatype)
    extent = datatype.Get_size()
    if count is None:
        if extent == 0:
            count = 0
        else:
            count, rest = divmod(len(view) - displ * extent, extent)
            if rest:
                raise ValueError(
                    f"message: buffer length {len(view)} is not a multiple of {datatype.name}'s "
                    f"extent {extent}"
                )
    start, stop = displ * extent, (displ + count) * extent
    if count < 0 or displ < 0 or stop > len(view):
        raise ValueError(
            f"message: count {count} at displacement {displ} of {datatype.name} runs past a "
            f"{len(view)}-byte buffer"
        )
    if start or stop != len(view):
        view = view[start:stop]
    return Spec(view, count, datatype)


def _count_displ(value: Any) -> tuple[int | None, int]:
    """(count, displ) of a spec's count item: an int, None (count inferred) or a pair."""
    if value is None:
        return None, 0
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise TypeError("message: expecting (count, displ)")
        return None if value[0] is None else int(value[0]), int(value[1] or 0)
    return int(value), 0


class VSpec(NamedTuple):
    """A vector spec: the whole buffer, per-rank counts and displacements (in elements)."""

    view: memoryview
    counts: list[int]
    displs: list[int]
    datatype: Datatype

    def part(self, rank: int) -> memoryview:
        extent = self.datatype.Get_size()
        start = self.displs[rank] * extent
        return self.view[start : start + self.counts[rank] * extent]


def _vector_form(spec: Any) -> tuple[Any, Any, Any, Datatype | None]:
    """(buf, counts, displs, datatype) of a vector spec, as written (None where absent)."""
    counts: Any = None
    displs: Any = None
    datatype: Datatype | None = None
    if isinstance(spec, list | tuple):
        items = list(spec)
        if len(items) == 2:
            buf, counts = items
            if _is_datatype(counts):
                counts, datatype = None, _datatype(counts)
            elif isinstance(counts, tuple):
                counts, displs = counts
        elif len(items) == 3:
            buf, counts, datatype = items[0], items[1], _datatype(items[2])
            if isinstance(counts, tuple):
                counts, displs = counts
        elif len(items) == 4:
            buf, counts, displs, datatype = items[0], items[1], items[2], _datatype(items[3])
        else:
            raise ValueError("message: expecting 2 to 4 items")
    else:
        buf = spec
    return buf, counts, displs, datatype


def check_blocks(spec: Any, size: int) -> None:
    """mpi4py's rule for the spec of a block (not v) collective such as Alltoall: a count
    left to infer (buf, [buf, datatype], [buf, None, datatype]) must split into `size`
    equal blocks. ValueError otherwise, from the arguments alone, so that every rank given
    such a spec raises it before anything moves. IN_PLACE and None pass."""
    if spec is None or spec is constants.IN_PLACE:
        return
    buf, counts, _, datatype = _vector_form(spec)
    if counts is not None or buf is constants.BOTTOM:  # (BOTTOM: count 0 when inferred)
        return
    view, implied = _as_bytes(buf, False)
    extent = (datatype or _implied(implied)).Get_size()
    if extent > 0 and not len(view) % extent and (len(view) // extent) % size:
        raise ValueError(
            f"message: cannot infer count, number of entries {len(view) // extent} is not "
            f"a multiple of required number of blocks {size}"
        )


def parse_vector(spec: Any, size: int, *, writable: bool = False) -> VSpec:
    """Resolve a vector spec for `size` ranks, with mpi4py's rules.

    Forms: buf, [buf, datatype], [buf, counts], [buf, (counts, displs)], [buf, counts,
    datatype], [buf, (counts, displs), datatype], [buf, counts, displs, datatype] (a tuple
    in the counts place is (counts, displs); a list is counts). counts None: the buffer's
    elements split as evenly as can be (the first ranks get one more); an int: that count
    for every rank. displs None: contiguous (running sums); an int d: strided, d * rank.
    """
    buf, counts, displs, datatype = _vector_form(spec)
    bottom = buf is constants.BOTTOM  # absolute addresses: elements packed from there
    if bottom and datatype is None:
        raise TypeError("message: a BOTTOM buffer needs a datatype")
    view, implied = (_EMPTY, None) if bottom else _as_bytes(buf, writable)
    if datatype is None:
        datatype = _implied(implied)
    if bottom and counts is None:
        counts = 0
    packs = datatype.packs or bottom
    if packs and counts is not None and displs is not None:
        # a derived type's elements are packed first: element k at k * size from then on
        counts_list = [_count(counts)] * size if _is_int(counts) else _counts(counts)
        displs_list = (
            [_count(displs) * i for i in range(size)] if _is_int(displs)
            else _counts(displs)
        )  # fmt: skip
        span = max((d + c for c, d in zip(counts_list, displs_list, strict=True) if c), default=0)
        view, unpack = _packed_span(view, span, datatype, writable, bottom)
        _owed(unpack, datatype)
        counts, displs = counts_list, displs_list
    elif packs:
        if counts is None:
            raise ValueError("message: a derived datatype needs counts")
        counts = [_count(counts)] * size if _is_int(counts) else _counts(counts)
        span = sum(counts)
        view, unpack = _packed_span(view, span, datatype, writable, bottom)
        _owed(unpack, datatype)
    extent = datatype.Get_size()
    if counts is None:
        total = 0
        if len(view):
            if extent <= 0 or len(view) % extent:
                raise ValueError(
                    f"message: cannot infer count, buffer length {len(view)} is not a "
                    f"multiple of datatype extent {extent}"
                )
            total = len(view) // extent
        counts = [total // size + (total % size > i) for i in range(size)]
    elif _is_int(counts):
        counts = [_count(counts)] * size
    counts = _counts(counts)
    if displs is None:
        displs, running = [], 0
        for c in counts:
            displs.append(running)
            running += c
    elif _is_int(displs):
        displs = [_count(displs) * i for i in range(size)]
    displs = _counts(displs)
    if len(counts) != size or len(displs) != size:
        raise ValueError(f"message: expecting {size} counts and displacements")
    for c, d in zip(counts, displs, strict=True):
        if c < 0 or d < 0 or (d + c) * extent > len(view):
            raise ValueError("message: counts/displacements run past the buffer")
    return VSpec(view, counts, displs, datatype)


def parse_w(spec: Any, size: int, *, writable: bool = False) -> list[memoryview]:
    """The part of each of `size` ranks in an Alltoallw spec, [buf, (counts, displs),
    datatypes], [buf, counts, displs, datatypes] (displacements in bytes, a datatype per
    rank; both None: one element at byte 0 for each) or [buf, datatypes] (the same): a
    view of the buffer, or for a packing datatype its packed copy (unpacked after the
    receiving call, as in `parse`). ValueError for a malformed spec (as mpi4py) or a part
    outside the buffer."""
    items = list(spec) if isinstance(spec, list | tuple) else []
    if len(items) == 2:
        buf, types = items
        counts = displs = None
    elif len(items) == 3 and isinstance(items[1], list | tuple) and len(items[1]) == 2:
        buf, (counts, displs), types = items
    elif len(items) == 4:
        buf, counts, displs, types = items
    else:
        raise ValueError("message: expecting [buf, (counts, displs), datatypes]")
    if buf is constants.BOTTOM and (counts is None or displs is None):
        raise ValueError("message: BOTTOM needs counts and displacements")
    if counts is None and displs is None:  # one element of each type, at byte 0 (as mpi4py)
        counts, displs = [1] * size, [0] * size
    elif counts is None or displs is None:
        raise ValueError("message: counts and displacements go together")
    counts = _counts(counts)
    displs = _counts(displs)
    datatypes_ = [_datatype(t) for t in types]
    if not len(counts) == len(displs) == len(datatypes_) == size:
        raise ValueError(f"message: expecting {size} counts, displacements and datatypes")
    bottom = buf is constants.BOTTOM  # displacements are absolute addresses
    view = _EMPTY if bottom else _as_bytes(buf, writable)[0]
    parts = []
    for count, displ, datatype in zip(counts, displs, datatypes_, strict=True):
        assert datatype is not None
        if datatype.packs or bottom:
            if bottom:
                view, base = _absolute([(displ, count, datatype)])
                displ -= base
            part, unpack = _packed(view, displ, count, datatype, writable)
            _owed(unpack, datatype)
            parts.append(part)
            continue
        stop = displ + count * datatype.size
        if count < 0 or displ < 0 or stop > len(view):
            raise ValueError(
                f"message: {count} x {datatype.name} at byte {displ} runs past a "
                f"{len(view)}-byte buffer"
            )
        parts.append(view[displ:stop])
    return parts


def _is_int(value: Any) -> bool:
    """Whether a count or displacement is one number (a 0-d numpy array is one, as in
    mpi4py), not one per rank."""
    return isinstance(value, int | np.integer) or (
        isinstance(value, np.ndarray) and value.ndim == 0
    )


def _count(value: Any) -> int:
    """One count or displacement as an int. TypeError for anything not integral (a float,
    a float numpy scalar or 0-d array), as mpi4py: never truncated."""
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        return int(value)
    raise TypeError(f"message: a count or displacement must be an integer, not {value!r}")


def _counts(values: Any) -> list[int]:
    """Counts or displacements, one per rank, as ints (TypeError as `_count`)."""
    return [_count(value) for value in values]


def is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


# ---------------------------------------------------------------------- derived datatypes
_local = threading.local()  # .jobs: the unpacks the running receiving call owes, or None


def _packed(
    view: memoryview, start: int, count: int, datatype: Datatype, writable: bool
) -> tuple[memoryview, Callable[[], None] | None]:
    """(the dense bytes of `count` elements of a packing `datatype` at byte `start` of
    `view` (a copy, made by the C packer on the fast path), for a buffer written to
    (`writable`) the unpack that scatters the copy back into `view` once the data is
    there, else None). ValueError if an element lies outside `view`."""
    if count < 0:
        raise ValueError(f"message: count {count} of {datatype.name}")
    packed = bytearray(count * datatype.size)
    try:
        datatypes.pack_into(view, start, count, datatype, packed)
    except ValueError:
        raise ValueError(
            f"message: {count} x {datatype.name} at byte {start} runs past a "
            f"{len(view)}-byte buffer"
        ) from None
    if not writable:
        return memoryview(packed), None

    def unpack() -> None:
        datatypes.unpack_from(packed, view, start, count, datatype)

    return memoryview(packed), unpack


def _packed_span(view: memoryview, span: int, datatype: Datatype, writable: bool,
                 bottom: bool) -> tuple[memoryview, Callable[[], None] | None]:  # fmt: skip
    """_packed of elements 0..span-1 from byte 0 of `view`, or with `bottom` from absolute
    address 0 (see `_absolute`)."""
    if bottom:
        view, base = _absolute([(0, span, datatype)])
        return _packed(view, -base, span, datatype, writable)
    return _packed(view, 0, span, datatype, writable)


def _absolute(parts: list[tuple[int, int, Datatype]]) -> tuple[memoryview, int]:
    """(a byte view of this process's memory spanning the data of `parts`, each (absolute
    address of element 0, count, datatype), the address of its first byte): how a BOTTOM
    message reaches the buffers its type's displacements (from Get_address) point into.
    The addresses are the caller's word, as in C MPI. ValueError for data at address 0 or
    below (a type that is not made of absolute addresses)."""
    low = high = None
    for start, count, datatype in parts:
        if count <= 0 or not datatype.size:
            continue
        true_lb, true_extent = datatype.Get_true_extent()
        reach = (count - 1) * datatype.extent
        first = start + true_lb + min(0, reach)
        last = start + true_lb + true_extent + max(0, reach)
        low = first if low is None else min(low, first)
        high = last if high is None else max(high, last)
    if low is None or high is None:
        return _EMPTY, 0
    if low <= 0:
        raise ValueError(f"message: BOTTOM with data at address {low}: not an absolute address")
    memory = (ctypes.c_char * (high - low)).from_address(low)
    return memoryview(memory).cast("B"), low


def _owed(unpack: Callable[[], None] | None, datatype: Datatype) -> None:
    """Hand `unpack` to the receiving call running (see `unpacking`). BufferError when none
    runs (a later stage of a nonblocking collective: a derived type cannot be received
    into there)."""
    if unpack is None:
        return
    jobs = getattr(_local, "jobs", None)
    if jobs is None:
        raise BufferError(f"message: cannot receive {datatype.name} in this call")
    jobs.append(unpack)


def unpacking(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` (a call that receives into message specs) with the unpacks of its derived
    datatypes run after it: at once when it returns (blocking calls), or when the Request
    it returns completes (each time, for a persistent request)."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        for arg in args:
            if (type(arg) is list or type(arg) is tuple) and not (
                2 <= len(arg) <= 3 and isinstance(arg[-1], Datatype) and not arg[-1].packs
            ):
                break  # a spec that may name a packing datatype
        else:
            if not kwargs:
                return method(*args)  # bare buffers: nothing to unpack
        outer = getattr(_local, "jobs", None)
        jobs: list[Callable[[], None]] = []
        _local.jobs = jobs
        try:
            result = method(*args, **kwargs)
        finally:
            _local.jobs = outer
        return _after(result, jobs) if jobs else result

    return run


def _after(result: Any, jobs: list[Callable[[], None]]) -> Any:
    """Run `jobs` now, or when the Request `result` completes (see `unpacking`)."""
    starter = getattr(result, "_starter", None)
    if starter is not None:  # a persistent request: every start unpacks at its completion
        result._starter = lambda: _after(starter(), jobs)
        return result
    if not hasattr(result, "_finish"):
        for job in jobs:
            job()
        return result
    finish = result._finish

    def done(op: Any) -> Any:
        for job in jobs:
            job()
        return None if finish is None else finish(op)

    result._finish = done
    return result
