"""Constants of the MPI face, with MPICH's values where mpi4py code may compare them.

`TAG_UB` is 2**18 - 1: user tags share the core's 31-bit tag with a communicator context
(11 bits) and a protocol kind (2 bits), see `engine`. MPI requires TAG_UB >= 32767.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, ClassVar, Final

from ivshmem_comm import ring

ANY_SOURCE: Final = -2
ANY_TAG: Final = -1
PROC_NULL: Final = -1
ROOT: Final = -3
UNDEFINED: Final = -32766

TAG_BITS: Final = 18
CTX_BITS: Final = 11
TAG_UB: Final = (1 << TAG_BITS) - 1
MAX_CONTEXT: Final = (1 << CTX_BITS) - 1
CTX_MAP_BYTES: Final = (MAX_CONTEXT + 8) // 8  # a bit map of every context (agreements)

THREAD_SINGLE: Final = 0
THREAD_FUNNELED: Final = 1
THREAD_SERIALIZED: Final = 2
THREAD_MULTIPLE: Final = 3

IDENT: Final = 0
CONGRUENT: Final = 1
SIMILAR: Final = 2
UNEQUAL: Final = 3

KEYVAL_INVALID: Final = 0x24000000  # MPICH's value: no attribute key (ERR_KEYVAL)
KEY_TAG_UB: Final = 0x64400001  # attribute key ids, as MPICH's MPI_TAG_UB etc.
KEY_HOST: Final = 0x64400003
KEY_IO: Final = 0x64400005
KEY_WTIME_IS_GLOBAL: Final = 0x64400007
KEY_UNIVERSE_SIZE: Final = 0x64400009
KEY_LASTUSEDCODE: Final = 0x6440000B
KEY_APPNUM: Final = 0x6440000D

MAX_PROCESSOR_NAME: Final = 128
VERSION: Final = 3
SUBVERSION: Final = 1


class _Sentinel:
    """A named singleton (UNWEIGHTED, WEIGHTS_EMPTY): identity is what matters."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name


if TYPE_CHECKING:  # one static base for the checker
    _ExporterBase = object
else:  # the C type that exports their empty buffer; none in the pure-Python mode
    _ExporterBase = object if ring.EmptyExporter is None else ring.EmptyExporter


def _integral(value: object) -> bool:
    """Return whether a buffer constant compares with `value` (mpi4py's test).

    True for an object with __index__ that is not a sized sequence (a numpy integer or a
    0-d integer array; not a 1-d array).
    """
    if not hasattr(type(value), "__index__"):
        return False
    try:
        len(value)  # type: ignore[arg-type]
    except TypeError:
        return True
    return False


class BufferConstant(_ExporterBase):
    """Base of mpi4py's buffer constants (BOTTOM, IN_PLACE, BUFFER_AUTOMATIC).

    One object per class: `type(c)()` gives `c` itself, and code here tells them by
    identity (`buf is IN_PLACE`). int() is the address MPICH gives the constant (BOTTOM
    0, IN_PLACE -1, BUFFER_AUTOMATIC -2); a constant equals that integer (and any integral
    object of that value) and hashes as it, is true iff it is not 0, and has no arithmetic
    or order (TypeError). repr() and pickling use its name. memoryview(c) is an empty
    writable buffer at that address owned by no object (.obj is None), exported by the C
    type ivshmem_comm._fastpath.EmptyExporter; in the pure-Python mode
    (IVSHMEM_COMM_PUREPYTHON=1) there is none and memoryview(c) raises TypeError.
    """

    __slots__ = ()
    _name: ClassVar[str]
    _value: ClassVar[int]
    _the: ClassVar[BufferConstant | None] = None

    def __new__(cls) -> Any:
        made = cls.__dict__.get("_the")
        if made is None:
            made = cls._the = super().__new__(cls)
        return made

    def __int__(self) -> int:
        return self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, type(self)):
            return True
        if not _integral(other):
            return NotImplemented
        return self._value == operator.index(other)  # type: ignore[arg-type]

    def __bool__(self) -> bool:
        return self._value != 0

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name


class BottomType(BufferConstant):
    """The type of BOTTOM (mpi4py's name): buffer address 0, displacements absolute."""

    __slots__ = ()
    _name, _value = "BOTTOM", 0

    def __index__(self) -> int:  # (BOTTOM's only, as mpi4py)
        return self._value


class InPlaceType(BufferConstant):
    """The type of IN_PLACE (mpi4py's name)."""

    __slots__ = ()
    _name, _value = "IN_PLACE", -1


class BufferAutomaticType(BufferConstant):
    """The type of BUFFER_AUTOMATIC (mpi4py's name): MPI-4.1's buffers as needed."""

    __slots__ = ()
    _name, _value = "BUFFER_AUTOMATIC", -2


IN_PLACE: Final = InPlaceType()
BOTTOM: Final = BottomType()
BUFFER_AUTOMATIC: Final = BufferAutomaticType()
UNWEIGHTED: Final = _Sentinel("UNWEIGHTED")  # MPI_UNWEIGHTED: a graph without weights
WEIGHTS_EMPTY: Final = _Sentinel("WEIGHTS_EMPTY")  # MPI_WEIGHTS_EMPTY: weighted, no edges

# array orders of Create_subarray (MPICH's values)
ORDER_C = 56
ORDER_FORTRAN = 57
ORDER_F = ORDER_FORTRAN

# Split_type (MPICH's value): the ranks sharing a region (one host)
COMM_TYPE_SHARED = 1
