"""Datatypes: the predefined MPI types as numpy dtypes, typecode strings, contiguous types.

A `Datatype` is a numpy dtype with MPI's names on it. The typecode strings mpi4py accepts in
buffer specs ("b", "i", "d", "f8", "int32", ...) resolve with `from_code`. Pair types for
MAXLOC/MINLOC (DOUBLE_INT, ...) are aligned numpy records ("v", "i"), laid out as C structs,
so their extent matches MPICH's. Derived types: only `Create_contiguous` (and Dup/Commit/Free);
the element type of a derived type is its base type (reductions work element by element).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from guest_lib.mpi import exceptions


class Datatype:
    """One MPI datatype. `size` and `extent` in bytes; `dtype` the numpy element type."""

    __slots__ = ("_committed", "base", "count", "dtype", "name", "typechar")

    def __init__(
        self,
        name: str,
        dtype: np.dtype | None,
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

    # mpi4py's getters
    @property
    def size(self) -> int:
        return 0 if self.dtype is None else self.dtype.itemsize

    @property
    def extent(self) -> int:
        return self.size

    @property
    def lb(self) -> int:
        return 0

    @property
    def ub(self) -> int:
        return self.extent

    @property
    def true_extent(self) -> int:
        return self.extent

    @property
    def is_predefined(self) -> bool:
        return self.base is self

    def Get_size(self) -> int:
        """Bytes of data in one element."""
        return self.size

    def Get_extent(self) -> tuple[int, int]:
        """(lower bound, extent): (0, size) for every type here."""
        return 0, self.extent

    def Get_true_extent(self) -> tuple[int, int]:
        return 0, self.extent

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
        return Datatype(self.name, self.dtype, self.typechar, base=self.base, count=self.count)

    def Commit(self) -> Datatype:
        self._committed = True
        return self

    def Free(self) -> None:
        pass

    def Create_contiguous(self, count: int) -> Datatype:
        """`count` elements of this type back to back (uncommitted, as MPI)."""
        if count < 0:
            raise exceptions.Exception(exceptions.ERR_COUNT, f"count {count}")
        assert self.dtype is not None
        dtype = np.dtype((self.base.dtype, (self.count * count,)))
        new = Datatype(f"CONTIGUOUS({self.name},{count})", dtype, "",
                       base=self.base, count=self.count * count)  # fmt: skip
        new._committed = False
        return new

    def __repr__(self) -> str:
        return f"<Datatype {self.name}>"

    def __reduce__(self) -> Any:
        if self.is_predefined and self.name in PREDEFINED:
            return (_predefined, (self.name,))
        return (Datatype, (self.name, self.dtype, self.typechar), {"base": None})


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
for _datatype in PREDEFINED.values():
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
