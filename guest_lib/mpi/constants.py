"""Constants of the MPI face, with MPICH's values where mpi4py code may compare them.

`TAG_UB` is 2**18 - 1: user tags share the core's 31-bit tag with a communicator context
(11 bits) and a protocol kind (2 bits), see `engine`. MPI requires TAG_UB >= 32767.
"""

from __future__ import annotations

from typing import Final

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
    """A named singleton (IN_PLACE, BOTTOM): identity is what matters."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name


class BottomType(_Sentinel):
    """The type of BOTTOM (mpi4py's name): buffer address 0, displacements absolute."""


class InPlaceType(_Sentinel):
    """The type of IN_PLACE (mpi4py's name)."""


IN_PLACE: Final = InPlaceType("IN_PLACE")
BOTTOM: Final = BottomType("BOTTOM")
BUFFER_AUTOMATIC: Final = _Sentinel("BUFFER_AUTOMATIC")  # MPI-4.1: buffers as needed
UNWEIGHTED: Final = _Sentinel("UNWEIGHTED")  # MPI_UNWEIGHTED: a graph without weights
WEIGHTS_EMPTY: Final = _Sentinel("WEIGHTS_EMPTY")  # MPI_WEIGHTS_EMPTY: weighted, no edges

# array orders of Create_subarray (MPICH's values)
ORDER_C = 56
ORDER_FORTRAN = 57
ORDER_F = ORDER_FORTRAN

# Split_type (MPICH's value): the ranks sharing a region (one host)
COMM_TYPE_SHARED = 1
