"""Datatypes: the predefined MPI types as numpy dtypes, typecode strings, contiguous types.

A `Datatype` is a numpy dtype with MPI's names on it. The typecode strings mpi4py accepts in
buffer specs ("b", "i", "d", "f8", "int32", ...) resolve with `from_code`. Pair types for
MAXLOC/MINLOC (DOUBLE_INT, ...) are aligned numpy records ("v", "i"), laid out as C structs,
so their extent matches MPICH's.

Derived types (`Create_contiguous/vector/hvector/indexed/hindexed/indexed_block/
hindexed_block/struct/subarray/resized`) carry a byte map: the offsets, relative to the
start of one element, of its data bytes in type-map order, plus the lower bound and extent
MPI's rules give (a struct's extent rounded up to its strictest member alignment, as C).
A type whose map is not the bytes 0..size-1 with lb 0 and extent size "packs": messages of
it are gathered (`pack`) into a dense byte string on the way out and scattered (`unpack`)
back after a receive, with numpy fancy indexing (see `buffers`). The element type of a
derived type (`base`) is its members' predefined type when they all share one (reductions
then work element by element on the packed data), else BYTE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from guest_lib.mpi import constants, exceptions


class Datatype:
    """One MPI datatype. `size` and `extent` in bytes; `dtype` the numpy element type."""

    __slots__ = (
        "_align", "_committed", "_extent", "_lb", "_map", "_size", "base", "count", "dtype",
        "name", "typechar",
    )  # fmt: skip

    def __init__(
        self,
        name: str = "DATATYPE_NULL",
        dtype: np.dtype | None = None,
        typechar: str = "",
        *,
        base: Datatype | None = None,
        count: int = 1,
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.typechar = typechar
        self.base = base if base is not None else self
        self.count = count
        self._committed = True
        self._map: np.ndarray | None = None  # byte offsets of a packing type, else None
        self._lb = 0
        self._size = 0 if dtype is None else dtype.itemsize
        self._extent = self._size
        self._align = 1 if dtype is None else dtype.alignment

    # mpi4py's getters
    @property
    def size(self) -> int:
        return self._size

    @property
    def extent(self) -> int:
        return self._extent

    @property
    def lb(self) -> int:
        return self._lb

    @property
    def ub(self) -> int:
        return self._lb + self._extent

    @property
    def true_lb(self) -> int:
        return self.Get_true_extent()[0]

    @property
    def true_ub(self) -> int:
        lb, extent = self.Get_true_extent()
        return lb + extent

    @property
    def true_extent(self) -> int:
        return self.Get_true_extent()[1]

    @property
    def packs(self) -> bool:
        """True iff messages of this type are not its buffer's bytes as they lie (gaps, a
        lower bound or an extent other than the size): see the module docstring."""
        return self._map is not None

    @property
    def is_predefined(self) -> bool:
        return self.base is self

    def Get_size(self) -> int:
        """Bytes of data in one element."""
        return self.size

    def Get_extent(self) -> tuple[int, int]:
        """(lower bound, extent) in bytes."""
        return self._lb, self._extent

    def Get_true_extent(self) -> tuple[int, int]:
        """(true lower bound, true extent): the span of the data bytes themselves."""
        if self._map is None:
            return 0, self.size
        if not len(self._map):
            return 0, 0
        low = int(self._map.min())
        return low, int(self._map.max()) + 1 - low

    def byte_map(self) -> np.ndarray:
        """Offsets of one element's data bytes, in type-map order (int64)."""
        return np.arange(self.size, dtype=np.int64) if self._map is None else self._map

    def Get_name(self) -> str:
        return self.name

    def Set_name(self, name: str) -> None:
        self.name = name

    def tocode(self) -> str:
        """The typecode string (e.g. "d"); ValueError for a type that has none."""
        if not self.typechar:
            raise ValueError(f"datatype {self.name} has no typecode")
        return self.typechar

    @classmethod
    def fromcode(cls, code: str) -> Datatype:
        """The predefined datatype of a typecode or type string ("d", "i4", "float64");
        ValueError for a code that names none (as mpi4py)."""
        try:
            return from_code(code)
        except KeyError:
            raise ValueError(f"cannot map code {code!r} to MPI datatype") from None

    def Dup(self) -> Datatype:
        """A new handle with the same type map (a predefined type's Dup is not predefined)."""
        new = Datatype(self.name, self.dtype, self.typechar, base=self.base, count=self.count)
        new._map, new._lb, new._extent, new._align = self._map, self._lb, self._extent, self._align
        new._size = self._size
        new._committed = self._committed
        return new

    def Commit(self) -> Datatype:
        self._committed = True
        return self

    def Free(self) -> None:
        pass

    def _check_handle(self) -> None:
        if self.dtype is None:
            raise exceptions.Exception(exceptions.ERR_TYPE, f"datatype {self.name}")

    def Create_contiguous(self, count: int) -> Datatype:
        """`count` elements of this type back to back (uncommitted, as MPI)."""
        _counts(count)
        return _derived(f"CONTIGUOUS({self.name},{count})", [(0, count, self)])

    def Create_hvector(self, count: int, blocklength: int, stride: int) -> Datatype:
        """`count` blocks of `blocklength` elements, block starts `stride` bytes apart."""
        _counts(count, blocklength)
        blocks = [(i * int(stride), blocklength, self) for i in range(count)]
        return _derived(f"HVECTOR({self.name})", blocks)

    def Create_vector(self, count: int, blocklength: int, stride: int) -> Datatype:
        """As Create_hvector with `stride` in extents of this type."""
        _counts(count, blocklength)
        blocks = [(i * int(stride) * self._extent, blocklength, self) for i in range(count)]
        return _derived(f"VECTOR({self.name})", blocks)

    def Create_hindexed(self, blocklengths: Sequence[int], displacements: Sequence[int]
                        ) -> Datatype:  # fmt: skip
        """Blocks of `blocklengths[i]` elements at `displacements[i]` bytes."""
        _same_length(blocklengths, displacements)
        _counts(*blocklengths)
        blocks = [(int(d), int(n), self) for n, d in zip(blocklengths, displacements, strict=True)]
        return _derived(f"HINDEXED({self.name})", blocks)

    def Create_indexed(self, blocklengths: Sequence[int], displacements: Sequence[int]
                       ) -> Datatype:  # fmt: skip
        """As Create_hindexed with displacements in extents of this type."""
        _same_length(blocklengths, displacements)
        _counts(*blocklengths)
        blocks = [(int(d) * self._extent, int(n), self)
                  for n, d in zip(blocklengths, displacements, strict=True)]  # fmt: skip
        return _derived(f"INDEXED({self.name})", blocks)

    def Create_hindexed_block(self, blocklength: int, displacements: Sequence[int]) -> Datatype:
        """Blocks of `blocklength` elements at `displacements` bytes."""
        _counts(blocklength)
        blocks = [(int(d), blocklength, self) for d in displacements]
        return _derived(f"HINDEXED_BLOCK({self.name})", blocks)

    def Create_indexed_block(self, blocklength: int, displacements: Sequence[int]) -> Datatype:
        """As Create_hindexed_block with displacements in extents of this type."""
        _counts(blocklength)
        blocks = [(int(d) * self._extent, blocklength, self) for d in displacements]
        return _derived(f"INDEXED_BLOCK({self.name})", blocks)

    @classmethod
    def Create_struct(
        cls,
        blocklengths: Sequence[int],
        displacements: Sequence[int],
        datatypes: Sequence[Datatype],
    ) -> Datatype:
        """Blocks of `blocklengths[i]` elements of `datatypes[i]` at `displacements[i]`
        bytes; the extent is rounded up to the strictest member alignment (as a C struct).
        ValueError if the three sequences differ in length."""
        if not len(blocklengths) == len(displacements) == len(datatypes):
            raise ValueError("Create_struct: blocklengths, displacements, datatypes differ")
        _counts(*blocklengths)
        blocks = [
            (int(d), int(n), t)
            for n, d, t in zip(blocklengths, displacements, datatypes, strict=True)
        ]
        return _derived("STRUCT", blocks, struct=True)

    def Create_subarray(
        self,
        sizes: Sequence[int],
        subsizes: Sequence[int],
        starts: Sequence[int],
        order: int = constants.ORDER_C,
    ) -> Datatype:
        """The `subsizes` block at `starts` of a `sizes` array of this type (C or Fortran
        order); the extent is the whole array's. MPI.Exception(ERR_ARG) for a block that
        does not fit."""
        sizes, subsizes, starts = list(sizes), list(subsizes), list(starts)
        if not len(sizes) == len(subsizes) == len(starts) or not sizes:
            raise exceptions.Exception(exceptions.ERR_ARG, "subarray: dimensions differ")
        for n, m, s in zip(sizes, subsizes, starts, strict=True):
            if n < 1 or m < 1 or s < 0 or s + m > n:
                raise exceptions.Exception(exceptions.ERR_ARG, f"subarray {m}@{s} of {n}")
        if order == constants.ORDER_FORTRAN:
            sizes, subsizes, starts = sizes[::-1], subsizes[::-1], starts[::-1]
        index = np.zeros(1, dtype=np.int64)  # element offsets of the block, C order
        stride = 1
        for n, m, s in zip(reversed(sizes), reversed(subsizes), reversed(starts), strict=True):
            index = ((np.arange(s, s + m, dtype=np.int64) * stride)[:, None] + index).ravel()
            stride *= n
        blocks = [(int(i) * self._extent, 1, self) for i in index]
        new = _derived(f"SUBARRAY({self.name})", blocks)
        return _resized(new, 0, stride * self._extent)

    def Create_resized(self, lb: int, extent: int) -> Datatype:
        """This type with lower bound `lb` and extent `extent` (bytes)."""
        return _resized(_derived(f"RESIZED({self.name})", [(0, 1, self)]), int(lb), int(extent))

    def __repr__(self) -> str:
        return f"<Datatype {self.name}>"

    def __reduce__(self) -> Any:
        if self.is_predefined and self.name in PREDEFINED:
            return (_predefined, (self.name,))
        return (Datatype, (self.name, self.dtype, self.typechar), {"base": None})


def _counts(*counts: int) -> None:
    for count in counts:
        if int(count) < 0:
            raise exceptions.Exception(exceptions.ERR_COUNT, f"count {count}")


def _same_length(blocklengths: Sequence[int], displacements: Sequence[int]) -> None:
    if len(blocklengths) != len(displacements):
        raise ValueError("blocklengths and displacements differ in length")


def _derived(name: str, blocks: list[tuple[int, int, Datatype]], struct: bool = False
             ) -> Datatype:  # fmt: skip
    """The type of `blocks` (byte displacement, count, old type), uncommitted. Its lower
    bound and upper bound are the least and greatest of its blocks' (MPI's rule), with
    the upper bound rounded up to the strictest alignment for a struct. A type that is
    its members back to back from byte 0 keeps no byte map (however large it is)."""
    bases: set[Datatype] = set()
    low: int | None = None
    high: int | None = None
    align, size, plain = 1, 0, True
    for disp, count, old in blocks:
        old._check_handle()
        if count == 0:
            continue
        plain = plain and old._map is None and old._lb == 0 and disp == size
        plain = plain and (old._extent == old._size or count == 1)
        bases.add(old.base)
        block_lb, block_ub = disp + old._lb, disp + (count - 1) * old._extent + old.ub
        low = block_lb if low is None else min(low, block_lb)
        high = block_ub if high is None else max(high, block_ub)
        align = max(align, old._align)
        size += count * old._size
    lb = 0 if low is None else low
    extent = 0 if high is None else high - lb
    if struct and extent % align:
        extent += align - extent % align
    base = bases.pop() if len(bases) == 1 else BYTE
    if base.dtype is None or not base.size or size % base.size or base is BYTE:
        base = BYTE
    count = size // base.size
    dtype: np.dtype | None
    try:
        dtype = np.dtype((base.dtype, (count,)))
    except ValueError:  # more elements than a numpy shape holds: the size is kept apart
        dtype = base.dtype
    new = Datatype(name, dtype, "", base=base, count=count)
    new._committed, new._align, new._size = False, align, size
    if plain and lb == 0 and extent == size:
        new._lb, new._extent = 0, size
        return new
    pieces = [
        ((disp + np.arange(count, dtype=np.int64) * old._extent)[:, None]
         + old.byte_map()[None, :]).ravel()
        for disp, count, old in blocks
        if count
    ]  # fmt: skip
    byte_map = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return _set_layout(new, byte_map, lb, extent)


def _set_layout(new: Datatype, byte_map: np.ndarray, lb: int, extent: int) -> Datatype:
    """Give `new` its map, lb and extent; a plain layout (bytes 0..size-1, lb 0, extent
    size) keeps no map, so messages of it move as they lie."""
    new._lb, new._extent = lb, extent
    plain = (
        lb == 0
        and extent == len(byte_map)
        and bool(np.array_equal(byte_map, np.arange(len(byte_map))))
    )
    new._map = None if plain else byte_map
    return new


def _resized(old: Datatype, lb: int, extent: int) -> Datatype:
    return _set_layout(old, old.byte_map(), lb, extent)


def byte_positions(view: memoryview, start: int, count: int, datatype: Datatype) -> np.ndarray:
    """The byte positions in `view` of `count` elements of `datatype` whose first element
    starts at byte `start`, in message order (int64). ValueError if any lies outside."""
    offsets = (
        start + np.arange(count, dtype=np.int64)[:, None] * datatype._extent
        + datatype.byte_map()[None, :]
    ).ravel()  # fmt: skip
    if len(offsets) and (int(offsets.min()) < 0 or int(offsets.max()) >= len(view)):
        raise ValueError(
            f"message: {count} x {datatype.name} at byte {start} runs past a "
            f"{len(view)}-byte buffer"
        )
    return offsets


def _predefined(name: str) -> Datatype:
    return PREDEFINED[name]


def _pair(value: str) -> np.dtype:
    return np.dtype([("v", value), ("i", "i4")], align=True)


PREDEFINED: dict[str, Datatype] = {}


def _define(name: str, code: str | np.dtype | None, typechar: str = "") -> Datatype:
    dtype = None if code is None else np.dtype(code)
    datatype = Datatype(name, dtype, typechar)
    PREDEFINED[name] = datatype
    return datatype


DATATYPE_NULL = _define("DATATYPE_NULL", None)
PACKED = _define("PACKED", "B", "B")
BYTE = _define("BYTE", "B", "B")
AINT = _define("AINT", "i8", "q")
OFFSET = _define("OFFSET", "i8", "q")
COUNT = _define("COUNT", "i8", "q")
CHAR = _define("CHAR", "S1", "c")
WCHAR = _define("WCHAR", "U1", "U")
SIGNED_CHAR = _define("SIGNED_CHAR", "i1", "b")
SHORT = _define("SHORT", "h", "h")
INT = _define("INT", "i", "i")
LONG = _define("LONG", "l", "l")
LONG_LONG = _define("LONG_LONG", "q", "q")
UNSIGNED_CHAR = _define("UNSIGNED_CHAR", "B", "B")
UNSIGNED_SHORT = _define("UNSIGNED_SHORT", "H", "H")
UNSIGNED = _define("UNSIGNED", "I", "I")
UNSIGNED_LONG = _define("UNSIGNED_LONG", "L", "L")
UNSIGNED_LONG_LONG = _define("UNSIGNED_LONG_LONG", "Q", "Q")
FLOAT = _define("FLOAT", "f", "f")
DOUBLE = _define("DOUBLE", "d", "d")
LONG_DOUBLE = _define("LONG_DOUBLE", "g", "g")
C_BOOL = _define("C_BOOL", "?", "?")
INT8_T = _define("INT8_T", "i1", "i1")
INT16_T = _define("INT16_T", "i2", "i2")
INT32_T = _define("INT32_T", "i4", "i4")
INT64_T = _define("INT64_T", "i8", "i8")
UINT8_T = _define("UINT8_T", "u1", "u1")
UINT16_T = _define("UINT16_T", "u2", "u2")
UINT32_T = _define("UINT32_T", "u4", "u4")
UINT64_T = _define("UINT64_T", "u8", "u8")
C_COMPLEX = _define("C_COMPLEX", "F", "F")
C_FLOAT_COMPLEX = _define("C_FLOAT_COMPLEX", "F", "F")
C_DOUBLE_COMPLEX = _define("C_DOUBLE_COMPLEX", "D", "D")
C_LONG_DOUBLE_COMPLEX = _define("C_LONG_DOUBLE_COMPLEX", "G", "G")
CXX_BOOL = _define("CXX_BOOL", "?", "?")
BOOL = _define("BOOL", "?", "?")
COMPLEX = _define("COMPLEX", "F", "F")
DOUBLE_COMPLEX = _define("DOUBLE_COMPLEX", "D", "D")
SHORT_INT = _define("SHORT_INT", _pair("h"))
TWOINT = _define("TWOINT", _pair("i"))
INT_INT = TWOINT
LONG_INT = _define("LONG_INT", _pair("l"))
FLOAT_INT = _define("FLOAT_INT", _pair("f"))
DOUBLE_INT = _define("DOUBLE_INT", _pair("d"))
LONG_DOUBLE_INT = _define("LONG_DOUBLE_INT", _pair("g"))
PREDEFINED["INT_INT"] = TWOINT
FLOAT16_T = _define("FLOAT16_T", "e", "e")
CXX_FLOAT_COMPLEX = _define("CXX_FLOAT_COMPLEX", "F", "F")
CXX_DOUBLE_COMPLEX = _define("CXX_DOUBLE_COMPLEX", "D", "D")
CXX_LONG_DOUBLE_COMPLEX = _define("CXX_LONG_DOUBLE_COMPLEX", "G", "G")
# Fortran types, with gfortran's sizes (as MPICH reports them)
CHARACTER = _define("CHARACTER", "S1", "c")
LOGICAL = _define("LOGICAL", "i4")
INTEGER = _define("INTEGER", "i4", "i4")
REAL = _define("REAL", "f4", "f4")
DOUBLE_PRECISION = _define("DOUBLE_PRECISION", "f8", "f8")
INTEGER1 = _define("INTEGER1", "i1", "i1")
INTEGER2 = _define("INTEGER2", "i2", "i2")
INTEGER4 = _define("INTEGER4", "i4", "i4")
INTEGER8 = _define("INTEGER8", "i8", "i8")
REAL4 = _define("REAL4", "f4", "f4")
REAL8 = _define("REAL8", "f8", "f8")
REAL16 = _define("REAL16", "g", "g")
COMPLEX8 = _define("COMPLEX8", "F", "F")
COMPLEX16 = _define("COMPLEX16", "D", "D")
COMPLEX32 = _define("COMPLEX32", "G", "G")
# Other names of the types above (mpi4py's aliases)
UNSIGNED_INT = UNSIGNED
SIGNED_SHORT, SIGNED_INT, SIGNED_LONG, SIGNED_LONG_LONG = SHORT, INT, LONG, LONG_LONG
SINT8_T, SINT16_T, SINT32_T, SINT64_T = INT8_T, INT16_T, INT32_T, INT64_T
FLOAT32_T, FLOAT64_T = FLOAT, DOUBLE
F_BOOL, F_INT, F_FLOAT, F_DOUBLE = LOGICAL, INTEGER, REAL, DOUBLE_PRECISION
F_COMPLEX, F_FLOAT_COMPLEX, F_DOUBLE_COMPLEX = COMPLEX, COMPLEX, DOUBLE_COMPLEX
# Types the MPI library has no support for (MPICH reports them as DATATYPE_NULL too)
LOGICAL1 = LOGICAL2 = LOGICAL4 = LOGICAL8 = LOGICAL16 = DATATYPE_NULL
INTEGER16 = REAL2 = COMPLEX4 = BFLOAT16_T = DATATYPE_NULL

# Typecode -> datatype, first definition wins for each numpy dtype.
_BY_CODE: dict[str, Datatype] = {
    "c": CHAR, "b": SIGNED_CHAR, "h": SHORT, "i": INT, "l": LONG, "q": LONG_LONG,
    "B": UNSIGNED_CHAR, "H": UNSIGNED_SHORT, "I": UNSIGNED, "L": UNSIGNED_LONG,
    "Q": UNSIGNED_LONG_LONG, "f": FLOAT, "d": DOUBLE, "g": LONG_DOUBLE, "?": C_BOOL,
    "F": C_FLOAT_COMPLEX, "D": C_DOUBLE_COMPLEX, "G": C_LONG_DOUBLE_COMPLEX,
    "i1": INT8_T, "i2": INT16_T, "i4": INT32_T, "i8": INT64_T,
    "u1": UINT8_T, "u2": UINT16_T, "u4": UINT32_T, "u8": UINT64_T,
    "f4": FLOAT, "f8": DOUBLE, "c8": C_FLOAT_COMPLEX, "c16": C_DOUBLE_COMPLEX,
}  # fmt: skip
_BY_DTYPE: dict[np.dtype, Datatype] = {}
for _datatype in [*_BY_CODE.values(), *PREDEFINED.values()]:  # C names first (int64: LONG)
    if _datatype.dtype is not None and _datatype.dtype.kind not in "SU":
        _BY_DTYPE.setdefault(_datatype.dtype, _datatype)
_BY_DTYPE[np.dtype("B")] = BYTE


def from_code(code: str) -> Datatype:
    """The datatype of a typecode string ("d", "i4", "float64", "<f8", ...).

    Raises KeyError if the code names no predefined type.
    """
    datatype = _BY_CODE.get(code)
    if datatype is not None:
        return datatype
    try:
        dtype = np.dtype(code)
    except TypeError:
        raise KeyError(f"unknown typecode {code!r}") from None
    return from_dtype(dtype)


def from_dtype(dtype: np.dtype) -> Datatype:
    """The predefined datatype of a numpy dtype; KeyError if there is none."""
    dtype = np.dtype(dtype)
    datatype = _BY_DTYPE.get(dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype)
    if datatype is None:
        if dtype.kind == "S" and dtype.itemsize == 1:
            return CHAR
        raise KeyError(f"no MPI datatype for numpy dtype {dtype}")
    return datatype


TypeDict = dict(_BY_CODE)
