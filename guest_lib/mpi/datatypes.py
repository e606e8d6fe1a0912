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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from guest_lib.mpi import constants, exceptions
from ivshmem_comm import ring


class Datatype:
    """One MPI datatype. `size` and `extent` in bytes; `dtype` the numpy element type."""

    __slots__ = (
        "_align", "_blocks", "_combiner", "_committed", "_extent", "_lb", "_old", "_params",
        "_root", "_runs", "_size", "base", "count", "dtype", "name", "typechar",
    )  # fmt: skip

    def __init__(
        self,
        name: str | Datatype = "DATATYPE_NULL",
        dtype: np.dtype | None = None,
        typechar: str = "",
        *,
        base: Datatype | None = None,
        count: int = 1,
    ) -> None:
        if isinstance(name, Datatype):  # mpi4py's Datatype(other): a second handle on it
            for slot in Datatype.__slots__:
                setattr(self, slot, getattr(name, slot))
            return
        if not isinstance(name, str):
            raise TypeError(f"Datatype: expecting a Datatype, got {type(name).__name__}")
        # handles on one type share their root: equality is the root's (Datatype(): null)
        null = PREDEFINED.get("DATATYPE_NULL") if dtype is None else None
        self._root = self if null is None else null
        self._combiner = "NAMED"  # and how it was made (see Get_envelope / decode)
        self._old: Datatype | None = None
        self._params: dict[str, Any] = {}
        self.name = name
        self.dtype = dtype
        self.typechar = typechar
        self.base = base if base is not None else self
        self.count = count
        self._committed = True
        self._blocks: np.ndarray | None = None  # the merged pieces of a packing type
        self._runs: np.ndarray | None = None  # its compiled map (see `compiled`), made once
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
        return self._blocks is not None

    @property
    def is_predefined(self) -> bool:
        return self._combiner == "NAMED"

    @property
    def is_named(self) -> bool:
        return self._combiner == "NAMED"

    @property
    def typestr(self) -> str:
        """The numpy type string of the type's layout ("" for DATATYPE_NULL)."""
        return "" if self.dtype is None else self.dtype.str

    @property
    def combiner(self) -> int:
        return COMBINERS[self._combiner]

    @property
    def envelope(self) -> tuple[int, int, int, int, int]:
        return self.Get_envelope()

    @property
    def contents(self) -> tuple[list[int], list[int], list[int], list[Datatype]]:
        return self.Get_contents()

    def Get_envelope(self) -> tuple[int, int, int, int, int]:
        """(number of integers, addresses, large counts, datatypes, combiner) of
        Get_contents; (0, 0, 0, 0, COMBINER_NAMED) for a predefined type."""
        ints, addresses, counts, types = self.Get_contents()
        return len(ints), len(addresses), len(counts), len(types), self.combiner

    def Get_contents(self) -> tuple[list[int], list[int], list[int], list[Datatype]]:
        """The arguments of the constructor that made this type, as MPI lays them out:
        (integers, addresses, large counts, datatypes)."""
        p, old = self._params, self._old
        kind = self._combiner
        if kind == "NAMED":
            return [], [], [], []
        if kind == "STRUCT":
            displs = list(p["displacements"])
            return [len(displs), *p["blocklengths"]], displs, [], list(p["datatypes"])
        assert old is not None
        if kind == "DUP":
            return [], [], [], [old]
        if kind == "CONTIGUOUS":
            return [p["count"]], [], [], [old]
        if kind == "VECTOR":
            return [p["count"], p["blocklength"], p["stride"]], [], [], [old]
        if kind == "HVECTOR":
            return [p["count"], p["blocklength"]], [p["stride"]], [], [old]
        if kind == "RESIZED":
            return [], [p["lb"], p["extent"]], [], [old]
        if kind == "SUBARRAY":
            dims = [len(p["sizes"]), *p["sizes"], *p["subsizes"], *p["starts"], p["order"]]
            return dims, [], [], [old]
        displs = list(p["displacements"])
        n = len(displs)
        if kind == "INDEXED":
            return [n, *p["blocklengths"], *displs], [], [], [old]
        if kind == "HINDEXED":
            return [n, *p["blocklengths"]], displs, [], [old]
        if kind == "INDEXED_BLOCK":
            return [n, p["blocklength"], *displs], [], [], [old]
        return [n, p["blocklength"]], displs, [], [old]  # HINDEXED_BLOCK

    def decode(self) -> tuple[Datatype, str, dict[str, Any]]:
        """(old type, combiner name, the constructor's keyword arguments): a predefined type
        gives (itself, "NAMED", {}); a struct's old type is DATATYPE_NULL. Calling
        `old.Create_<combiner>(**arguments)` makes the type again."""
        if self._combiner == "NAMED":
            return self, "NAMED", {}
        old = self._old if self._old is not None else DATATYPE_NULL
        return old, self._combiner, dict(self._params)

    def _made_from(self, new: Datatype, combiner: str, **params: Any) -> Datatype:
        """`new`, recorded as made by `combiner` from this type with `params`."""
        new._combiner, new._old, new._params = combiner, self, params
        return new

    def Get_size(self) -> int:
        """Bytes of data in one element."""
        return self.size

    def Get_extent(self) -> tuple[int, int]:
        """(lower bound, extent) in bytes."""
        return self._lb, self._extent

    def Get_true_extent(self) -> tuple[int, int]:
        """(true lower bound, true extent): the span of the data bytes themselves."""
        pieces = self.pieces()
        if not len(pieces):
            return 0, 0
        low = int(pieces[:, 0].min())
        return low, int((pieces[:, 0] + pieces[:, 1]).max()) - low

    def pieces(self) -> np.ndarray:
        """The compiled type map: (byte offset, length) int64 rows of one element's data,
        in type-map order, pieces that follow on in memory merged (made once, with the
        type). What `pack_into`/`unpack_from` copy by."""
        if self._blocks is not None:
            return self._blocks
        return np.array([[0, self._size]] if self._size else _NO_PIECES, dtype=np.int64)

    def compiled(self) -> np.ndarray:
        """The map the packers copy by: (offset, length, repeats, stride) int64 rows, each
        `repeats` equal pieces `stride` bytes apart, in type-map order (a vector type is
        one row). Made on first use and kept with the type."""
        if self._runs is None:
            self._runs = _runs(self.pieces())
        return self._runs

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
        """A new type with the same type map (a predefined type's Dup is not predefined)."""
        self._check_handle()
        new = Datatype(self)
        new._root = new
        return self._made_from(new, "DUP")

    Create_dup = Dup

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
        new = _derived(f"CONTIGUOUS({self.name},{count})", [(0, count, self)])
        return self._made_from(new, "CONTIGUOUS", count=count)

    def Create_hvector(self, count: int, blocklength: int, stride: int) -> Datatype:
        """`count` blocks of `blocklength` elements, block starts `stride` bytes apart."""
        _counts(count, blocklength)
        blocks = [(i * int(stride), blocklength, self) for i in range(count)]
        new = _derived(f"HVECTOR({self.name})", blocks)
        return self._made_from(
            new, "HVECTOR", count=count, blocklength=blocklength, stride=int(stride)
        )

    def Create_vector(self, count: int, blocklength: int, stride: int) -> Datatype:
        """As Create_hvector with `stride` in extents of this type."""
        _counts(count, blocklength)
        blocks = [(i * int(stride) * self._extent, blocklength, self) for i in range(count)]
        new = _derived(f"VECTOR({self.name})", blocks)
        return self._made_from(
            new, "VECTOR", count=count, blocklength=blocklength, stride=int(stride)
        )

    def Create_hindexed(self, blocklengths: Sequence[int], displacements: Sequence[int]
                        ) -> Datatype:  # fmt: skip
        """Blocks of `blocklengths[i]` elements at `displacements[i]` bytes."""
        _same_length(blocklengths, displacements)
        _counts(*blocklengths)
        blocks = [(int(d), int(n), self) for n, d in zip(blocklengths, displacements, strict=True)]
        new = _derived(f"HINDEXED({self.name})", blocks)
        return self._made_from(new, "HINDEXED", **_lists(blocklengths, displacements))

    def Create_indexed(self, blocklengths: Sequence[int], displacements: Sequence[int]
                       ) -> Datatype:  # fmt: skip
        """As Create_hindexed with displacements in extents of this type."""
        _same_length(blocklengths, displacements)
        _counts(*blocklengths)
        blocks = [(int(d) * self._extent, int(n), self)
                  for n, d in zip(blocklengths, displacements, strict=True)]  # fmt: skip
        new = _derived(f"INDEXED({self.name})", blocks)
        return self._made_from(new, "INDEXED", **_lists(blocklengths, displacements))

    def Create_hindexed_block(self, blocklength: int, displacements: Sequence[int]) -> Datatype:
        """Blocks of `blocklength` elements at `displacements` bytes."""
        _counts(blocklength)
        blocks = [(int(d), blocklength, self) for d in displacements]
        new = _derived(f"HINDEXED_BLOCK({self.name})", blocks)
        return self._made_from(new, "HINDEXED_BLOCK", blocklength=blocklength,
                               displacements=[int(d) for d in displacements])  # fmt: skip

    def Create_indexed_block(self, blocklength: int, displacements: Sequence[int]) -> Datatype:
        """As Create_hindexed_block with displacements in extents of this type."""
        _counts(blocklength)
        blocks = [(int(d) * self._extent, blocklength, self) for d in displacements]
        new = _derived(f"INDEXED_BLOCK({self.name})", blocks)
        return self._made_from(new, "INDEXED_BLOCK", blocklength=blocklength,
                               displacements=[int(d) for d in displacements])  # fmt: skip

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
        new = _derived("STRUCT", blocks, struct=True)
        new._combiner, new._old = "STRUCT", None
        new._params = dict(_lists(blocklengths, displacements), datatypes=list(datatypes))
        return new

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
        sizes, subsizes, starts = (
            [int(n) for n in sizes],
            [int(n) for n in subsizes],
            [int(n) for n in starts],
        )
        params = {"sizes": sizes, "subsizes": subsizes, "starts": starts, "order": order}
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
        new = _derived(f"SUBARRAY({self.name})", [(index * self._extent, 1, self)])
        return self._made_from(_resized(new, 0, stride * self._extent), "SUBARRAY", **params)

    def Create_resized(self, lb: int, extent: int) -> Datatype:
        """This type with lower bound `lb` and extent `extent` (bytes)."""
        new = _resized(_derived(f"RESIZED({self.name})", [(0, 1, self)]), int(lb), int(extent))
        return self._made_from(new, "RESIZED", lb=int(lb), extent=int(extent))

    Resized = Create_resized

    def __repr__(self) -> str:
        return f"<Datatype {self.name}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Datatype):
            return NotImplemented
        return self._root is other._root

    def __hash__(self) -> int:
        return id(self._root)

    def __bool__(self) -> bool:
        return self.dtype is not None

    def __reduce__(self) -> Any:
        """A predefined type unpickles as itself (a second handle on one as an equal new
        handle); a derived type is made again by its constructor (from `decode`)."""
        if self._combiner == "NAMED":
            name = next(k for k, v in PREDEFINED.items() if v is self._root)
            return (_predefined, (name, self is self._root))
        old, combiner, params = self.decode()
        return (_rebuild, (old, combiner, params, self._committed))


def _counts(*counts: int) -> None:
    for count in counts:
        if int(count) < 0:
            raise exceptions.Exception(exceptions.ERR_COUNT, f"count {count}")


def _same_length(blocklengths: Sequence[int], displacements: Sequence[int]) -> None:
    if len(blocklengths) != len(displacements):
        raise ValueError("blocklengths and displacements differ in length")


def _derived(name: str, blocks: list[tuple[Any, int, Datatype]], struct: bool = False
             ) -> Datatype:  # fmt: skip
    """The type of `blocks` (byte displacement, count, old type), uncommitted; a
    displacement may be an int64 array: the same block at each of them. Its lower bound
    and upper bound are the least and greatest of its blocks' (MPI's rule), with the upper
    bound rounded up to the strictest alignment for a struct. A type that is its members
    back to back from byte 0 keeps no map (however large it is)."""
    bases: set[Datatype] = set()
    low: int | None = None
    high: int | None = None
    align, size, plain = 1, 0, True
    for disp, count, old in blocks:
        old._check_handle()
        many = isinstance(disp, np.ndarray)
        if count == 0 or (many and not len(disp)):
            continue
        first, last = (int(disp.min()), int(disp.max())) if many else (disp, disp)
        plain = plain and not many and old._blocks is None and old._lb == 0 and disp == size
        plain = plain and (old._extent == old._size or count == 1)
        bases.add(old.base)
        block_lb, block_ub = first + old._lb, last + (count - 1) * old._extent + old.ub
        low = block_lb if low is None else min(low, block_lb)
        high = block_ub if high is None else max(high, block_ub)
        align = max(align, old._align)
        size += count * old._size * (len(disp) if many else 1)
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
    pieces = [_placed(disp, count, old) for disp, count, old in blocks if count]
    return _set_layout(new, _merged(np.concatenate(pieces) if pieces else _NO_PIECES), lb, extent)


_NO_PIECES = np.zeros((0, 2), dtype=np.int64)


def _placed(disp: Any, count: int, old: Datatype) -> np.ndarray:
    """The map pieces of `count` elements of `old` from byte `disp` (an int or an int64
    array of starts, each one such block), in type-map order."""
    starts = np.asarray(disp, dtype=np.int64).reshape(-1)
    starts = (starts[:, None] + np.arange(count, dtype=np.int64) * old._extent).ravel()
    own = old.pieces()
    placed = np.empty((len(starts), len(own), 2), dtype=np.int64)
    placed[:, :, 0] = starts[:, None] + own[None, :, 0]
    placed[:, :, 1] = own[None, :, 1]
    return placed.reshape(-1, 2)


def _merged(pieces: np.ndarray) -> np.ndarray:
    """`pieces` without empty ones, each run of pieces that follow on in memory as one."""
    pieces = pieces[pieces[:, 1] > 0]
    if len(pieces) < 2:
        return np.ascontiguousarray(pieces)
    ends = pieces[:, 0] + pieces[:, 1]
    fresh = np.ones(len(pieces), dtype=bool)
    fresh[1:] = pieces[1:, 0] != ends[:-1]
    heads = np.flatnonzero(fresh)
    merged = np.empty((len(heads), 2), dtype=np.int64)
    merged[:, 0] = pieces[heads, 0]
    merged[:, 1] = np.add.reduceat(pieces[:, 1], heads)
    return merged


def _runs(pieces: np.ndarray) -> np.ndarray:
    """`pieces` folded into runs (offset, length, repeats, stride): each maximal sequence
    of equal-length pieces at a constant stride, taken greedily in order, is one row."""
    n = len(pieces)
    runs = np.empty((n, 4), dtype=np.int64)
    if n < 2:
        runs[:, :2], runs[:, 2], runs[:, 3] = pieces, 1, 0
        return runs
    step = np.diff(pieces[:, 0])
    # gap k (between pieces k and k+1) can be inside a run: equal lengths; gaps with the
    # same step that follow on form a group, a run's possible interior
    inner = pieces[1:, 1] == pieces[:-1, 1]
    fresh = np.ones(n - 1, dtype=bool)
    fresh[1:] = ~inner[1:] | ~inner[:-1] | (step[1:] != step[:-1])
    heads = np.flatnonzero(fresh)
    ends = np.append(heads[1:], n - 1)  # group g: gaps heads[g] .. ends[g] - 1
    rows, piece = 0, 0
    for head, end in zip(heads.tolist(), ends.tolist(), strict=True):
        if not inner[head]:
            continue
        while piece < head:  # pieces before the group: one run each
            runs[rows] = (pieces[piece, 0], pieces[piece, 1], 1, 0)
            rows, piece = rows + 1, piece + 1
        if piece >= end:  # its pieces were taken by the run before
            continue
        runs[rows] = (pieces[piece, 0], pieces[piece, 1], end + 1 - piece, step[head])
        rows, piece = rows + 1, end + 1
    while piece < n:
        runs[rows] = (pieces[piece, 0], pieces[piece, 1], 1, 0)
        rows, piece = rows + 1, piece + 1
    return runs[:rows].copy()


def _set_layout(new: Datatype, pieces: np.ndarray, lb: int, extent: int) -> Datatype:
    """Give `new` its map (merged pieces), lb and extent; a plain layout (the bytes
    0..size-1, lb 0, extent size) keeps no map, so messages of it move as they lie."""
    new._lb, new._extent = lb, extent
    size = int(pieces[:, 1].sum())
    whole = len(pieces) == 0 or (len(pieces) == 1 and int(pieces[0, 0]) == 0)
    new._blocks = None if whole and lb == 0 and extent == size else pieces
    return new


def _resized(old: Datatype, lb: int, extent: int) -> Datatype:
    return _set_layout(old, old.pieces(), lb, extent)


# ------------------------------------------------------------------------ pack and unpack
def _typed_copy_py(gather: bool, user: Any, start: int, count: int, extent: int,
                   runs: Any, packed: Any, limit: int) -> int:  # fmt: skip
    """The pure-Python reference of the C `typed_copy` (ivshmem_comm/_typepack.c), same
    arguments, result and errors: move at most min(limit, len(packed), count * size)
    packed bytes between the `count` elements of the compiled map `runs` (see
    `Datatype.compiled`) at byte `start` of `user` and the dense `packed` (gather: user ->
    packed). ValueError, nothing moved, for a bad map, a negative count or an element
    outside `user`."""
    try:
        runs = np.frombuffer(runs, np.int64).reshape(-1, 4)
    except ValueError:
        raise ValueError("typed_copy: the map is not int64 runs") from None
    if count < 0 or (runs[:, 1] < 0).any() or (runs[:, 2] < 1).any():
        raise ValueError(f"typed_copy: bad count {count} or map")
    out = np.frombuffer(packed, np.uint8) if len(memoryview(packed)) else np.empty(0, np.uint8)
    full = runs[runs[:, 1] > 0]
    sizes = full[:, 1] * full[:, 2]
    size = int(sizes.sum())
    budget = min(len(out), count * size)
    if limit >= 0:
        budget = min(budget, limit)
    if budget <= 0:
        return 0
    touched = -(-budget // size)
    span = (full[:, 2] - 1) * full[:, 3]
    first = start + int((full[:, 0] + np.minimum(span, 0)).min()) + min(0, (touched - 1) * extent)
    last = start + int((full[:, 0] + full[:, 1] + np.maximum(span, 0)).max())
    last += max(0, (touched - 1) * extent)
    view = np.frombuffer(user, np.uint8) if len(memoryview(user)) else np.empty(0, np.uint8)
    if first < 0 or last > len(view):
        raise ValueError(
            f"typed_copy: {touched} elements (extent {extent}) at byte {start} run past a "
            f"{len(view)}-byte buffer"
        )
    # the byte offsets of one element, in order: each piece's start repeated over its bytes
    piece_starts = np.repeat(full[:, 0], full[:, 2]) + np.concatenate(
        [np.arange(r, dtype=np.int64) * d for r, d in zip(full[:, 2], full[:, 3], strict=True)]
    )
    piece_lengths = np.repeat(full[:, 1], full[:, 2])
    within = np.arange(size, dtype=np.int64) - np.repeat(
        np.cumsum(piece_lengths) - piece_lengths, piece_lengths
    )
    element = np.repeat(piece_starts, piece_lengths) + within
    positions = (
        start + np.arange(touched, dtype=np.int64)[:, None] * extent + element[None, :]
    ).ravel()[:budget]  # fmt: skip
    if gather:
        out[:budget] = view[positions]
    else:
        view[positions] = out[:budget]
    return budget


typed_copy: Callable[[bool, Any, int, int, int, Any, Any, int], int] = _typed_copy_py
if ring.IMPLEMENTATION == "c":  # the C fast path when the queues run on it
    from ivshmem_comm import _fastpath

    typed_copy = _fastpath.typed_copy


def pack_into(view: Any, start: int, count: int, datatype: Datatype, packed: Any,
              limit: int = -1) -> int:  # fmt: skip
    """Gather `count` elements of `datatype` from byte `start` of `view` into the dense
    `packed`; returns the bytes written (see `typed_copy`)."""
    return typed_copy(True, view, start, count, datatype._extent, datatype.compiled(), packed,
                      limit)  # fmt: skip


def unpack_from(packed: Any, view: Any, start: int, count: int, datatype: Datatype,
                limit: int = -1) -> int:  # fmt: skip
    """Scatter the dense `packed` (at most `limit` bytes of it) into `count` elements of
    `datatype` from byte `start` of the writable `view`; returns the bytes read."""
    return typed_copy(False, view, start, count, datatype._extent, datatype.compiled(), packed,
                      limit)  # fmt: skip


def _predefined(name: str, same: bool = True) -> Datatype:
    return PREDEFINED[name] if same else Datatype(PREDEFINED[name])


def _rebuild(old: Datatype, combiner: str, params: dict[str, Any], committed: bool) -> Datatype:
    if combiner == "STRUCT":
        new = Datatype.Create_struct(**params)
    else:
        new = getattr(old, "Create_" + combiner.lower())(**params)
    new._committed = committed
    return new


def _lists(blocklengths: Sequence[int], displacements: Sequence[int]) -> dict[str, list[int]]:
    return {
        "blocklengths": [int(n) for n in blocklengths],
        "displacements": [int(d) for d in displacements],
    }


# MPICH's combiner numbers
COMBINERS = {
    "NAMED": 1, "DUP": 2, "CONTIGUOUS": 3, "VECTOR": 4, "HVECTOR": 6, "INDEXED": 7,
    "HINDEXED": 9, "INDEXED_BLOCK": 10, "STRUCT": 12, "SUBARRAY": 13, "DARRAY": 14,
    "F90_REAL": 15, "F90_COMPLEX": 16, "F90_INTEGER": 17, "RESIZED": 18, "HINDEXED_BLOCK": 19,
    "VALUE_INDEX": 20,
}  # fmt: skip
COMBINER_NAMED, COMBINER_DUP, COMBINER_CONTIGUOUS = 1, 2, 3
COMBINER_VECTOR, COMBINER_HVECTOR, COMBINER_INDEXED, COMBINER_HINDEXED = 4, 6, 7, 9
COMBINER_INDEXED_BLOCK, COMBINER_STRUCT, COMBINER_SUBARRAY, COMBINER_DARRAY = 10, 12, 13, 14
COMBINER_F90_REAL, COMBINER_F90_COMPLEX, COMBINER_F90_INTEGER = 15, 16, 17
COMBINER_RESIZED, COMBINER_HINDEXED_BLOCK, COMBINER_VALUE_INDEX = 18, 19, 20


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
