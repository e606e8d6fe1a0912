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

import functools
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from guest_lib.mpi import attributes, constants, exceptions
from guest_lib.mpi.handles import Handle, Same
from ivshmem_comm.typepack import typed_copy as _typed_copy  # (private: not an MPI name)


class Datatype(attributes.Cached, Handle):
    """One MPI datatype. `size` and `extent` in bytes; `dtype` the numpy element type."""

    __slots__ = (
        "_align", "_blocks", "_char", "_combiner", "_committed", "_extent", "_lb", "_old",
        "_params", "_pending", "_root", "_runs", "_size", "_sized", "base", "count", "dtype",
        "name",
    )  # fmt: skip

    def __init__(self, datatype: Datatype | None = None) -> None:
        """Make a second handle on a type (`Datatype(other)`) or a null handle (`Datatype()`).

        mpi4py's forms: `Datatype(other)` a second handle on `other`'s type, `Datatype()` a null
        handle; TypeError for anything else (types are made by `_create` here).
        """
        if isinstance(datatype, Datatype):
            _copy_slots(self, datatype)
        elif datatype is None:
            self._setup("MPI_DATATYPE_NULL", None, "", None)
        else:
            raise TypeError(f"Datatype: expecting a Datatype, got {type(datatype).__name__}")

    @classmethod
    def _create(
        cls, name: str, dtype: np.dtype | None, char: str, base: Datatype | None = None,
        count: int = 1,
    ) -> Datatype:  # fmt: skip
        """Make a new type called `name` with numpy layout `dtype` (None: no data).

        `char` is mpi4py's character code ("" for none); the type is `count` `base` elements
        (itself, 1).
        """
        datatype = _new_handle(cls)
        datatype._setup(name, dtype, char, base, count)
        return datatype

    def _setup(
        self, name: str, dtype: np.dtype | None, char: str, base: Datatype | None, count: int = 1
    ) -> None:
        # handles on one type share their root: equality is the root's (Datatype(): null)
        null = PREDEFINED.get("DATATYPE_NULL") if dtype is None else None
        self._root = self if null is None else null
        self._combiner = "NAMED"  # and how it was made (see Get_envelope / decode)
        self._old: Datatype | None = None
        self._params: dict[str, Any] = {}
        self.name = name
        self.dtype = dtype
        self._char = char  # mpi4py's character code of a predefined type ("" if none)
        self._sized = False  # its typecode is its type string ("i4"), as INT32_T's
        self.base = base if base is not None else self
        self.count = count
        self._committed = True
        self._blocks: np.ndarray | None = None  # the merged pieces of a packing type
        # the blocks (as `_derived` takes them) whose pieces `_map` has still to place: a
        # type's map is made on first use, not by its constructor
        self._pending: list[tuple[Any, int, Datatype]] | None = None
        self._runs: np.ndarray | None = None  # its compiled map (see `compiled`), made once
        self._lb = 0
        self._size = 0 if dtype is None else dtype.itemsize
        self._extent = self._size
        self._align = 1 if dtype is None else dtype.alignment

    # mpi4py's getters
    @property
    def size(self) -> int:
        """Size in bytes of the data of one element."""
        return self._size

    @property
    def extent(self) -> int:
        """Extent in bytes: the span one element takes in a buffer."""
        return self._extent

    @property
    def lb(self) -> int:
        """Lower bound in bytes."""
        return self._lb

    @property
    def ub(self) -> int:
        """Upper bound in bytes: lower bound plus extent."""
        return self._lb + self._extent

    @property
    def true_lb(self) -> int:
        """True lower bound in bytes: where the data bytes start (Get_true_extent)."""
        return self.Get_true_extent()[0]

    @property
    def true_ub(self) -> int:
        """True upper bound in bytes: where the data bytes end (Get_true_extent)."""
        lb, extent = self.Get_true_extent()
        return lb + extent

    @property
    def true_extent(self) -> int:
        """True extent in bytes: the span of the data bytes themselves (Get_true_extent)."""
        return self.Get_true_extent()[1]

    @property
    def packs(self) -> bool:
        """True iff messages of this type are not its buffer's bytes as they lie.

        That is, gaps, a lower bound or an extent other than the size: see the module docstring.
        """
        return self._map() is not None

    def _map(self) -> np.ndarray | None:
        """Return the merged pieces of a packing type, None for a plain one.

        Made here on first use from the pending blocks (`_blocks` is set before `_pending` is
        cleared, so a thread that sees no pending blocks sees the map).
        """
        pending = self._pending
        if pending is not None:
            pieces = _placed_small(pending)
            if pieces is None:
                placed = [_placed(disp, count, old) for disp, count, old in pending if count]
                pieces = _merged(np.concatenate(placed) if placed else _NO_PIECES)
            _set_layout(self, pieces, self._lb, self._extent)
            self._pending = None
        return self._blocks

    @property
    def is_predefined(self) -> bool:
        """True for the named types, DATATYPE_NULL and the f90 types (as mpi4py)."""
        return self._combiner in _PREDEFINED_COMBINERS

    @property
    def is_named(self) -> bool:
        """True for a named (predefined) type."""
        return self._combiner == "NAMED"

    @property
    def typechar(self) -> str:
        """Character code of mpi4py: "d", "i", ... for a predefined (or f90, or duplicated) type.

        "V" for any other type, "" for DATATYPE_NULL.
        """
        if self.dtype is None:
            return ""
        return self._named()._char or "V"

    @property
    def typestr(self) -> str:
        """Type string of mpi4py: "i4", "f8", "S1", ... for the types with a character code.

        Else "V<extent>"; "" for DATATYPE_NULL.
        """
        if self.dtype is None:
            return ""
        char = self._named()._char
        return _typestr(char) if char else f"V{self._extent}"

    @property
    def predefined_name(self) -> str | None:
        """MPI name of a predefined type without its MPI_ prefix ("DOUBLE"; what mpi4py calls it).

        Whatever Set_name did; None for any other type.
        """
        if self._combiner != "NAMED":
            return None
        return next((k for k, v in PREDEFINED.items() if v is self._root), None)

    def _named(self) -> Datatype:
        """The type whose codes this one has: itself, or for a Dup what it duplicates."""
        datatype = self
        while datatype._combiner == "DUP" and datatype._old is not None:
            datatype = datatype._old
        return datatype

    @property
    def combiner(self) -> int:
        """Combiner: the COMBINER_* constant of the constructor that made the type."""
        return COMBINERS[self._combiner]

    @property
    def envelope(self) -> tuple[int, int, int, int, int]:
        """Envelope of the type (Get_envelope)."""
        return self.Get_envelope()

    @property
    def contents(self) -> tuple[list[int], list[int], list[int], list[Datatype]]:
        """Contents of the type: its constructor's arguments (Get_contents)."""
        return self.Get_contents()

    def Get_envelope(self) -> tuple[int, int, int, int, int]:
        """Return the envelope: the sizes of Get_contents' lists and the combiner.

        (number of integers, addresses, large counts, datatypes, combiner); (0, 0, 0, 0,
        COMBINER_NAMED) for a predefined type.
        """
        ints, addresses, counts, types = self.Get_contents()
        return len(ints), len(addresses), len(counts), len(types), self.combiner

    def Get_contents(self) -> tuple[list[int], list[int], list[int], list[Datatype]]:
        """Return the arguments of the constructor that made this type, as MPI lays them out.

        (integers, addresses, large counts, datatypes); the datatypes are new handles (the caller
        may free them, as MPI's), predefined ones themselves.
        """
        ints, addresses, counts, types = self._contents()
        return ints, addresses, counts, _keep(types)

    def _contents(self) -> tuple[list[int], list[int], list[int], list[Datatype]]:
        p, old = self._params, self._old
        kind = self._combiner
        if kind == "NAMED":
            return [], [], [], []
        if kind == "STRUCT":
            displs = list(p["displacements"])
            return [len(displs), *p["blocklengths"]], displs, [], list(p["datatypes"])
        if kind.startswith("F90_"):
            return [p[k] for k in ("p", "r") if k in p], [], [], []
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
        if kind == "DARRAY":
            ints = [p["size"], p["rank"], len(p["gsizes"]), *p["gsizes"], *p["distribs"],
                    *p["dargs"], *p["psizes"], p["order"]]  # fmt: skip
            return ints, [], [], [old]
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
        """Return (old type, combiner name, the constructor's keyword arguments).

        A predefined type gives (itself, "NAMED", {}); a struct's old type is DATATYPE_NULL. Calling
        `old.Create_<combiner>(**arguments)` makes the type again. The datatypes are new handles
        (the caller may free them, as mpi4py.util.dtlib does), predefined ones themselves.
        """
        if self._combiner == "NAMED":
            return self, "NAMED", {}
        old = self._old if self._old is not None else DATATYPE_NULL  # struct, f90
        params = dict(self._params)
        if "datatypes" in params:
            params["datatypes"] = _keep(params["datatypes"])
        return _kept(old), self._combiner, params

    def _made_from(self, new: Datatype, combiner: str, own: Datatype | None = None,
                   **params: Any) -> Datatype:  # fmt: skip
        """Record `new` as made by `combiner` from this type with `params`; return `new`.

        It holds its own handle on this type (see `_keep`): `own` when given (the one its
        blocks hold), else a new one.
        """
        new._combiner, new._params = combiner, params
        new._old = own if own is not None else _kept(self)
        return new

    def Get_size(self) -> int:
        """Bytes of data in one element."""
        return self.size

    def Get_extent(self) -> tuple[int, int]:
        """Return (lower bound, extent) in bytes."""
        return self._lb, self._extent

    def Get_true_extent(self) -> tuple[int, int]:
        """Return (true lower bound, true extent): the span of the data bytes themselves."""
        pieces = self.pieces()
        if not len(pieces):
            return 0, 0
        low = int(pieces[:, 0].min())
        return low, int((pieces[:, 0] + pieces[:, 1]).max()) - low

    def pieces(self) -> np.ndarray:
        """Return the compiled type map: (byte offset, length) int64 rows of one element's data.

        In type-map order, pieces that follow on in memory merged (made once, with the type). What
        `pack_into`/`unpack_from` copy by.
        """
        blocks = self._map()
        if blocks is not None:
            return blocks
        return np.array([[0, self._size]] if self._size else _NO_PIECES, dtype=np.int64)

    def compiled(self) -> np.ndarray:
        """Return the map the packers copy by: (offset, length, repeats, stride) int64 rows.

        Each row is `repeats` equal pieces `stride` bytes apart, in type-map order (a vector type is
        one row). Made on first use and kept with the type.
        """
        if self._runs is None:
            self._runs = _runs(self.pieces())
        return self._runs

    def Get_name(self) -> str:
        """Return the type's name (the `name` attribute: MPI's name for a predefined type)."""
        return self.name

    def Set_name(self, name: str) -> None:
        """Set the type's name, as Get_name and the `name` attribute return it."""
        self.name = name

    def tocode(self) -> str:
        """Return the typecode: "i4" for INT32_T (sized types), else the character code ("d").

        The type string for the sized types and the f90 types, else the character code; ValueError
        for a type that has none.
        """
        code = _typecode(self)
        if code is None:
            raise ValueError(f"datatype {self.name}: cannot map to a typecode")
        return code

    @classmethod
    def fromcode(cls, code: str) -> Datatype:
        """Return the predefined datatype of a typecode or type string ("d", "i4", "float64").

        ValueError for a code that names none (as mpi4py).
        """
        try:
            return from_code(code)
        except KeyError:
            raise ValueError(f"cannot map code {code!r} to MPI datatype") from None

    def Dup(self) -> Datatype:
        """A new type with the same type map (a predefined type's Dup is not predefined)."""
        self._check_handle()
        new = _clone(self)
        new._root = new
        made = self._made_from(new, "DUP")
        self._keyvals.copy(self, made)  # the attributes copy_fn copies (MPI_Type_dup)
        return made

    Create_dup = Dup

    def Commit(self) -> Datatype:
        """Mark the type committed; this type. MPI.Exception(ERR_TYPE) on DATATYPE_NULL."""
        self._check_handle()
        self._committed = True
        return self

    def Free(self) -> None:
        """Free the type: its attributes are deleted and this handle becomes DATATYPE_NULL.

        delete_fn runs for each attribute. Types made from it are not affected (MPI): they hold
        handles of their own on its description (see `_keep`); other handles on it (Datatype(t))
        stay as they were. MPI.Exception(ERR_TYPE) for DATATYPE_NULL and predefined types (as MPI).
        """
        if self._combiner in _PREDEFINED_COMBINERS:
            raise exceptions.Exception(exceptions.ERR_TYPE, f"Free of predefined {self.name}")
        self._keyvals.drop(self)
        _copy_slots(self, DATATYPE_NULL)

    def _on_predefined(self) -> bool:
        return self.is_predefined

    def _nullify(self) -> None:
        _copy_slots(self, DATATYPE_NULL)

    # ------------------------------------------------------------------ attributes
    def Get_attr(self, keyval: int) -> Any:
        """Return the value set for `keyval`, None if unset.

        MPI.Exception: ERR_TYPE on DATATYPE_NULL, ERR_KEYVAL for KEYVAL_INVALID or a key not made by
        Create_keyval.
        """
        self._check_handle()
        return self._keyvals.get(self, keyval)

    def _check_handle(self) -> None:
        if self.dtype is None:
            raise exceptions.Exception(exceptions.ERR_TYPE, f"datatype {self.name}")

    _keyvals = attributes.Keyvals("Datatype")  # the attributes of datatypes
    _check_attr_target = _check_handle

    def Create_contiguous(self, count: int) -> Datatype:
        """Create a type of `count` elements of this type back to back (uncommitted, as MPI).

        A count past INT_MAX makes what an MPI-3 library (the version this one reports) gives for
        it, as mpi4py builds it there: a struct of a vector of INT_MAX-element blocks and a
        contiguous rest.
        """
        _counts(count)
        if count > _INT_MAX:
            whole = self.Create_vector(count // _INT_MAX, _INT_MAX, _INT_MAX)
            rest = self.Create_contiguous(count % _INT_MAX)
            return Datatype.Create_struct([1, 1], [0, whole._extent], [whole, rest])
        own = _kept(self)  # the new type's handle on this one (see _keep)
        new = _derived(f"CONTIGUOUS({self.name},{count})", [(0, count, own)], keep=False)
        return self._made_from(new, "CONTIGUOUS", own, count=count)

    def Create_hvector(self, count: int, blocklength: int, stride: int) -> Datatype:
        """Create `count` blocks of `blocklength` elements, block starts `stride` bytes apart."""
        _counts(count, blocklength)
        own = _kept(self)  # the new type's handle on this one (see _keep)
        blocks = [(i * int(stride), blocklength, own) for i in range(count)]
        new = _derived(f"HVECTOR({self.name})", blocks, keep=False)
        return self._made_from(
            new, "HVECTOR", own, count=count, blocklength=blocklength, stride=int(stride)
        )

    def Create_vector(self, count: int, blocklength: int, stride: int) -> Datatype:
        """As Create_hvector with `stride` in extents of this type."""
        _counts(count, blocklength)
        own = _kept(self)  # the new type's handle on this one (see _keep)
        blocks = [(i * int(stride) * self._extent, blocklength, own) for i in range(count)]
        new = _derived(f"VECTOR({self.name})", blocks, keep=False)
        return self._made_from(
            new, "VECTOR", own, count=count, blocklength=blocklength, stride=int(stride)
        )

    def Create_hindexed(self, blocklengths: Sequence[int], displacements: Sequence[int]
                        ) -> Datatype:  # fmt: skip
        """Blocks of `blocklengths[i]` elements at `displacements[i]` bytes."""
        _same_length(blocklengths, displacements)
        _counts(*blocklengths)
        own = _kept(self)  # the new type's handle on this one (see _keep)
        blocks = [(int(d), int(n), own) for n, d in zip(blocklengths, displacements, strict=True)]
        new = _derived(f"HINDEXED({self.name})", blocks, keep=False)
        return self._made_from(new, "HINDEXED", own, **_lists(blocklengths, displacements))

    def Create_indexed(self, blocklengths: Sequence[int], displacements: Sequence[int]
                       ) -> Datatype:  # fmt: skip
        """As Create_hindexed with displacements in extents of this type."""
        _same_length(blocklengths, displacements)
        _counts(*blocklengths)
        own = _kept(self)  # the new type's handle on this one (see _keep)
        blocks = [(int(d) * self._extent, int(n), own)
                  for n, d in zip(blocklengths, displacements, strict=True)]  # fmt: skip
        new = _derived(f"INDEXED({self.name})", blocks, keep=False)
        return self._made_from(new, "INDEXED", own, **_lists(blocklengths, displacements))

    def Create_hindexed_block(self, blocklength: int, displacements: Sequence[int]) -> Datatype:
        """Blocks of `blocklength` elements at `displacements` bytes."""
        _counts(blocklength)
        own = _kept(self)  # the new type's handle on this one (see _keep)
        blocks = [(int(d), blocklength, own) for d in displacements]
        new = _derived(f"HINDEXED_BLOCK({self.name})", blocks, keep=False)
        return self._made_from(new, "HINDEXED_BLOCK", own, blocklength=blocklength,
                               displacements=[int(d) for d in displacements])  # fmt: skip

    def Create_indexed_block(self, blocklength: int, displacements: Sequence[int]) -> Datatype:
        """As Create_hindexed_block with displacements in extents of this type."""
        _counts(blocklength)
        own = _kept(self)  # the new type's handle on this one (see _keep)
        blocks = [(int(d) * self._extent, blocklength, own) for d in displacements]
        new = _derived(f"INDEXED_BLOCK({self.name})", blocks, keep=False)
        return self._made_from(new, "INDEXED_BLOCK", own, blocklength=blocklength,
                               displacements=[int(d) for d in displacements])  # fmt: skip

    @classmethod
    def Create_struct(
        cls,
        blocklengths: Sequence[int],
        displacements: Sequence[int],
        datatypes: Sequence[Datatype],
    ) -> Datatype:
        """Create a struct type: `blocklengths[i]` elements of `datatypes[i]` at `displacements[i]`.

        Displacements are in bytes; the extent is rounded up to the strictest member alignment (as a
        C struct). ValueError if the three sequences differ in length.
        """
        if not len(blocklengths) == len(displacements) == len(datatypes):
            raise ValueError("Create_struct: blocklengths, displacements, datatypes differ")
        _counts(*blocklengths)
        kept = _keep(datatypes)
        blocks = [
            (int(d), int(n), t) for n, d, t in zip(blocklengths, displacements, kept, strict=True)
        ]
        new = _derived("STRUCT", blocks, struct=True, keep=False)
        new._combiner, new._old = "STRUCT", None
        new._params = dict(_lists(blocklengths, displacements), datatypes=kept)
        return new

    def Create_subarray(
        self,
        sizes: Sequence[int],
        subsizes: Sequence[int],
        starts: Sequence[int],
        order: int = constants.ORDER_C,
    ) -> Datatype:
        """Create the type of the `subsizes` block at `starts` of a `sizes` array of this type.

        In C or Fortran order; the extent is the whole array's. MPI.Exception(ERR_ARG) for a block
        that does not fit.
        """
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
        stride = 1  # elements in the whole array
        for n in sizes:
            stride *= n
        own = _kept(self)  # the new type's handle on this one (see _keep)
        if subsizes == sizes:  # the whole array, in either order: its elements in turn
            new = _derived(f"SUBARRAY({self.name})", [(0, stride, own)], keep=False)
            return self._made_from(
                _resized(new, 0, stride * self._extent), "SUBARRAY", own, **params
            )
        if order == constants.ORDER_FORTRAN:
            sizes, subsizes, starts = sizes[::-1], subsizes[::-1], starts[::-1]
        index = np.zeros(1, dtype=np.int64)  # element offsets of the block, C order
        step = 1
        for n, m, s in zip(reversed(sizes), reversed(subsizes), reversed(starts), strict=True):
            index = ((np.arange(s, s + m, dtype=np.int64) * step)[:, None] + index).ravel()
            step *= n
        new = _derived(f"SUBARRAY({self.name})", [(index * self._extent, 1, own)], keep=False)
        return self._made_from(_resized(new, 0, stride * self._extent), "SUBARRAY", own, **params)

    def Create_resized(self, lb: int, extent: int) -> Datatype:
        """This type with lower bound `lb` and extent `extent` (bytes)."""
        own = _kept(self)  # the new type's handle on this one (see _keep)
        new = _resized(
            _derived(f"RESIZED({self.name})", [(0, 1, own)], keep=False), int(lb), int(extent)
        )
        return self._made_from(new, "RESIZED", own, lb=int(lb), extent=int(extent))

    Resized = Create_resized

    def Create_darray(
        self,
        size: int,
        rank: int,
        gsizes: Sequence[int],
        distribs: Sequence[int],
        dargs: Sequence[int],
        psizes: Sequence[int],
        order: int = constants.ORDER_C,
    ) -> Datatype:
        """Create the type of the part of a distributed `gsizes` array that process `rank` owns.

        The processes form a `psizes` grid (row-major, `size` processes); each dimension is
        distributed DISTRIBUTE_BLOCK, CYCLIC (with block `dargs[i]`, DISTRIBUTE_DFLT_DARG: even
        blocks / 1) or NONE; the elements come in the array's order (C or Fortran), the extent is
        the whole array's. MPI.Exception(ERR_ARG) for a grid that does not match or a block too
        small.
        """
        gsizes, distribs, dargs, psizes = (
            [int(n) for n in gsizes], [int(n) for n in distribs], [int(n) for n in dargs],
            [int(n) for n in psizes],
        )  # fmt: skip
        params = {
            "size": int(size), "rank": int(rank), "gsizes": gsizes, "distribs": distribs,
            "dargs": dargs, "psizes": psizes, "order": order,
        }  # fmt: skip
        owned = _darray_indices(int(size), int(rank), gsizes, distribs, dargs, psizes)
        if order == constants.ORDER_FORTRAN:  # first dimension fastest: walk it reversed
            gsizes, owned = gsizes[::-1], owned[::-1]
        offsets = np.zeros(1, dtype=np.int64)
        stride = 1
        for n, mine in zip(reversed(gsizes), reversed(owned), strict=True):
            offsets = ((mine * stride)[:, None] + offsets[None, :]).ravel()
            stride *= n
        own = _kept(self)  # the new type's handle on this one (see _keep)
        new = _derived(f"DARRAY({self.name})", [(offsets * self._extent, 1, own)], keep=False)
        return self._made_from(_resized(new, 0, stride * self._extent), "DARRAY", own, **params)

    @classmethod
    def Create_f90_integer(cls, r: int) -> Datatype:
        """Return the smallest integer type with `r` decimal digits of range (SELECTED_INT_KIND).

        MPI.Exception(ERR_ARG) when none has.
        """
        for digits, datatype in ((2, INTEGER1), (4, INTEGER2), (9, INTEGER4), (18, INTEGER8)):
            if r <= digits:
                return _f90(datatype, "F90_INTEGER", r=int(r))
        raise exceptions.Exception(exceptions.ERR_ARG, f"Create_f90_integer: range {r}")

    @classmethod
    def Create_f90_real(cls, p: int, r: int) -> Datatype:
        """Return the smallest real type with precision `p` and range `r` (SELECTED_REAL_KIND).

        REAL4, REAL8 or REAL16; MPI.Exception(ERR_ARG) when none.
        """
        return _f90(_f90_float(p, r, (REAL4, REAL8, REAL16)), "F90_REAL", p=int(p), r=int(r))

    @classmethod
    def Create_f90_complex(cls, p: int, r: int) -> Datatype:
        """As Create_f90_real for complex numbers: COMPLEX8, COMPLEX16 or COMPLEX32."""
        chosen = _f90_float(p, r, (COMPLEX8, COMPLEX16, COMPLEX32))
        return _f90(chosen, "F90_COMPLEX", p=int(p), r=int(r))

    @classmethod
    def Match_size(cls, typeclass: int, size: int) -> Datatype:
        """Return the Fortran type of `typeclass` that is `size` bytes.

        `typeclass` is TYPECLASS_INTEGER, _REAL or _COMPLEX; MPI.Exception(ERR_ARG) when there is
        none.
        """
        for datatype in _MATCH.get(typeclass, ()):
            if datatype.size == size:
                return datatype
        raise exceptions.Exception(exceptions.ERR_ARG, f"Match_size: {typeclass}, {size}")

    @classmethod
    def Get_value_index(cls, value: Datatype, index: Datatype) -> Datatype:
        """Return the predefined pair type (value, index) for MINLOC/MAXLOC.

        FLOAT_INT for FLOAT, INT; DATATYPE_NULL when there is none; MPI.Exception(ERR_TYPE) for a
        null argument.
        """
        value._check_handle()
        index._check_handle()
        if index != INT:
            return DATATYPE_NULL
        return _PAIRS.get(id(value._root), DATATYPE_NULL)

    # ------------------------------------------------------------------ packing
    def Pack_size(self, count: int, comm: Any = None) -> int:
        """Bytes that Pack writes for `count` elements (no overhead: count * size)."""
        _counts(count)
        return int(count) * self._size

    def Pack(self, inbuf: Any, outbuf: Any, position: int, comm: Any = None) -> int:
        """Pack all the elements of this type in `inbuf` into `outbuf` from byte `position`.

        The elements are all those of `inbuf` (its length over the extent). Returns the position
        after them. MPI.Exception(ERR_TRUNCATE) when they do not fit.
        """
        source, count = _elements(self, inbuf)
        target = _raw(outbuf, writable=True)
        end = _fits(position, count * self._size, len(target))
        pack_into(source, 0, count, self, target[position:end])
        return end

    def Unpack(self, inbuf: Any, position: int, outbuf: Any, comm: Any = None) -> int:
        """Unpack from byte `position` of `inbuf` as many elements as `outbuf` holds.

        As many as `outbuf` holds: its length over the extent. Returns the position after them.
        MPI.Exception(ERR_TRUNCATE) when `inbuf` holds fewer.
        """
        target, count = _elements(self, outbuf, writable=True)
        source = _raw(inbuf)
        end = _fits(position, count * self._size, len(source))
        unpack_from(source[position:end], target, 0, count, self)
        return end

    def Pack_external_size(self, datarep: str, count: int) -> int:
        """Bytes that Pack_external writes for `count` elements in `datarep`."""
        _external32(datarep)
        _counts(count)
        return int(count) * sum(_external(t).itemsize * n for t, n in self._signature())

    def Pack_external(self, datarep: str, inbuf: Any, outbuf: Any, position: int) -> int:
        """Pack as Pack does, in the canonical "external32" representation.

        Big-endian, MPI's sizes: LONG 4 bytes, LONG_DOUBLE an IEEE quad. MPI.Exception(ERR_TRUNCATE)
        when the elements do not fit, ERR_ARG for another `datarep` or a value that does not fit its
        external size.
        """
        _external32(datarep)
        source, count = _elements(self, inbuf)
        native = bytearray(count * self._size)
        pack_into(source, 0, count, self, native)
        external = _convert(native, self._signature(), count, to_external=True)
        target = _raw(outbuf, writable=True)
        end = _fits(position, len(external), len(target))
        target[position:end] = external
        return end

    def Unpack_external(self, datarep: str, inbuf: Any, position: int, outbuf: Any) -> int:
        """As Unpack, from the "external32" representation (see Pack_external)."""
        _external32(datarep)
        target, count = _elements(self, outbuf, writable=True)
        source = _raw(inbuf)
        end = _fits(position, self.Pack_external_size(datarep, count), len(source))
        native = _convert(source[position:end], self._signature(), count, to_external=False)
        unpack_from(native, target, 0, count, self)
        return end

    def _signature(self) -> list[tuple[Datatype, int]]:
        """The predefined types of one element in type-map order, as (type, run length)."""
        kind, p, old = self._combiner, self._params, self._old
        if self.dtype is None:
            return []
        if kind in ("NAMED", "F90_INTEGER", "F90_REAL", "F90_COMPLEX"):
            return [(self._root, 1)]
        if kind == "STRUCT":
            parts = [(t._signature(), n) for n, t in zip(p["blocklengths"], p["datatypes"],
                                                           strict=True)]  # fmt: skip
        else:
            assert old is not None
            own = old._signature()
            parts = [(own, self._size // old._size if old._size else 0)]
        out: list[tuple[Datatype, int]] = []
        for signature, repeats in parts:
            if len(signature) == 1:
                signature = [(signature[0][0], signature[0][1] * repeats)]
            else:
                signature = signature * repeats
            for datatype, n in signature:
                if out and out[-1][0] is datatype:
                    out[-1] = (datatype, out[-1][1] + n)
                elif n:
                    out.append((datatype, n))
        return out

    def __repr__(self) -> str:
        return f"<Datatype {self.name}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Datatype):
            return NotImplemented
        return self._root is other._root

    def _key(self) -> Hashable:
        return Same(self._root)

    def __bool__(self) -> bool:
        return self.dtype is not None

    def __reduce__(self) -> Any:
        """Pickle a predefined type by name, a derived type by its constructor.

        A predefined type unpickles as itself (a second handle on one as an equal new handle of this
        class); a derived type is made again by its constructor (from `decode`).
        """
        if self._combiner == "NAMED":
            if self is self._root:
                return (_predefined, (self.predefined_name,))
            return (type(self), (self._root,))
        old, combiner, params = self.decode()
        return (_rebuild, (old, combiner, params, self._committed))


def _copy_slots(new: Datatype, old: Datatype) -> None:
    """Every slot of `old` into `new` (attribute by attribute: a loop over __slots__ with
    getattr/setattr costs several times more, and handles are made by the thousand)."""
    new._align, new._blocks, new._char = old._align, old._blocks, old._char
    new._combiner, new._committed, new._extent = old._combiner, old._committed, old._extent
    new._lb, new._old, new._params = old._lb, old._old, old._params
    new._pending, new._root, new._runs = old._pending, old._root, old._runs
    new._size, new._sized, new.base = old._size, old._sized, old.base
    new.count, new.dtype, new.name = old.count, old.dtype, old.name


_INT_MAX = (1 << 31) - 1
# the combiners of the types mpi4py calls predefined (is_predefined): MPI cannot free them
_PREDEFINED_COMBINERS = frozenset({"NAMED", "F90_INTEGER", "F90_REAL", "F90_COMPLEX"})


def _counts(*counts: int) -> None:
    for count in counts:
        if int(count) < 0:
            raise exceptions.Exception(exceptions.ERR_COUNT, f"count {count}")


def _same_length(blocklengths: Sequence[int], displacements: Sequence[int]) -> None:
    if len(blocklengths) != len(displacements):
        raise ValueError("blocklengths and displacements differ in length")


def _keep(types: Sequence[Datatype]) -> list[Datatype]:
    """Handles of a type's own on `types` (one per distinct member; the predefined ones,
    which cannot be freed, as they are): what a type made from them holds, so that freeing
    the user's handle on a member (which nulls that handle) leaves the type whole."""
    copies: dict[int, Datatype] = {}
    kept = []
    for old in types:
        if old._combiner not in _PREDEFINED_COMBINERS:
            copy = copies.get(id(old))
            if copy is None:
                copy = copies[id(old)] = _clone(old)
            old = copy
        kept.append(old)
    return kept


def _kept(old: Datatype) -> Datatype:
    """`_keep([old])[0]`: a handle of a type's own on `old` (`old` if predefined)."""
    return old if old._combiner in _PREDEFINED_COMBINERS else _clone(old)


_new_handle = object.__new__  # (Handle.__new__ and __init__ cost more: handles are many)


def _clone(old: Datatype) -> Datatype:
    """A new handle (of class Datatype) on `old`'s type, as `Datatype(old)` makes."""
    new = _new_handle(Datatype)
    _copy_slots(new, old)
    return new


def _derived(name: str, blocks: list[tuple[Any, int, Datatype]], struct: bool = False,
             keep: bool = True) -> Datatype:  # fmt: skip
    """The type of `blocks` (byte displacement, count, old type), uncommitted; a
    displacement may be an int64 array: the same block at each of them. Its lower bound
    and upper bound are the least and greatest of its blocks' (MPI's rule), with the upper
    bound rounded up to the strictest alignment for a struct. A type that is its members
    back to back from byte 0 keeps no map (however large it is). The blocks' types are
    held through `_keep` (`keep=False`: the caller's are such handles already)."""
    if keep:
        kept = _keep([old for _, _, old in blocks])
        blocks = [(disp, count, old) for (disp, count, _), old in zip(blocks, kept, strict=True)]
    bases: list[Datatype] = []  # the members' element types, each once
    low: int | None = None
    high: int | None = None
    align, size, plain = 1, 0, True
    for disp, count, old in blocks:
        if old.dtype is None:
            old._check_handle()  # (raises)
        many = isinstance(disp, np.ndarray)
        if count == 0 or (many and not len(disp)):
            continue
        first, last = (int(disp.min()), int(disp.max())) if many else (disp, disp)
        plain = plain and not many and old._pending is None and old._blocks is None
        plain = plain and old._lb == 0 and disp == size
        plain = plain and (old._extent == old._size or count == 1)
        base = old.base
        for known in bases:  # (a loop: any() over a generator costs several times more)
            if known is base:
                break
        else:
            bases.append(base)
        block_lb, block_ub = first + old._lb, last + old._lb + count * old._extent
        low = block_lb if low is None else min(low, block_lb)
        high = block_ub if high is None else max(high, block_ub)
        align = max(align, old._align)
        size += count * old._size * (len(disp) if many else 1)
    lb = 0 if low is None else low
    extent = 0 if high is None else high - lb
    if struct and extent % align:
        extent += align - extent % align
    base = bases[0] if len(bases) == 1 else BYTE
    if base.dtype is None or not base.size or size % base.size or base is BYTE:
        base = BYTE
    count = size // base.size
    new = Datatype._create(name, _array_dtype(base.dtype, count), "", base, count)
    new._committed, new._align, new._size = False, align, size
    if plain and lb == 0 and extent == size:
        new._lb, new._extent = 0, size
        return new
    new._lb, new._extent, new._pending = lb, extent, blocks  # the map: see Datatype._map
    return new


@functools.lru_cache(maxsize=1024)
def _array_dtype(dtype: np.dtype | None, count: int) -> np.dtype | None:
    """`count` elements of `dtype` as one numpy type (`dtype` alone when numpy cannot
    hold that many in a shape: the size is kept apart)."""
    try:
        return np.dtype((dtype, (count,)))
    except ValueError:
        return dtype


_SMALL = 256  # pieces: fewer are placed and merged in plain Python (numpy costs more)


def _placed_small(blocks: list[tuple[Any, int, Datatype]]) -> np.ndarray | None:
    """The merged pieces of `blocks` (as _placed then _merged give them) when there are
    few, else None."""
    total = 0
    for disp, count, old in blocks:
        if isinstance(disp, np.ndarray):
            return None
        made = old._map()
        total += count * (1 if made is None else len(made))
        if total > _SMALL:
            return None
    out: list[list[int]] = []
    for disp, count, old in blocks:
        blocks_of_old = old._blocks  # made above
        own = [(0, old._size)] if blocks_of_old is None else blocks_of_old.tolist()
        for i in range(count):
            base = disp + i * old._extent
            for offset, length in own:
                if not length:
                    continue
                if out and out[-1][0] + out[-1][1] == base + offset:
                    out[-1][1] += length
                else:
                    out.append([base + offset, length])
    return np.array(out, dtype=np.int64).reshape(-1, 2)


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
    whole = len(pieces) == 0 or (len(pieces) == 1 and int(pieces[0, 0]) == 0)
    new._blocks = None if whole and lb == 0 and extent == new._size else pieces
    return new


def _resized(old: Datatype, lb: int, extent: int) -> Datatype:
    """`old` (just made by `_derived`) with lower bound `lb` and extent `extent`."""
    if old._pending is None:
        if old._blocks is not None:
            return _set_layout(old, old._blocks, lb, extent)
        if lb == 0 and extent == old._size:
            return old
        # its bytes 0..size-1 as they were: the map is placed on first use, as _derived's
        old._pending = [(0, 1, _clone(old))]
    old._lb, old._extent = lb, extent  # its map, made later, is judged with these
    return old


# ------------------------------------------------------------------------ pack and unpack
def pack_into(view: Any, start: int, count: int, datatype: Datatype, packed: Any,
              limit: int = -1) -> int:  # fmt: skip
    """Gather `count` elements of `datatype` from byte `start` of `view` into the dense `packed`.

    Returns the bytes written (see ivshmem_comm.typepack's `typed_copy`).
    """
    return _typed_copy(True, view, start, count, datatype._extent, datatype.compiled(), packed,
                      limit)  # fmt: skip


def unpack_from(packed: Any, view: Any, start: int, count: int, datatype: Datatype,
                limit: int = -1) -> int:  # fmt: skip
    """Scatter the dense `packed` into `count` elements of `datatype` from byte `start` of `view`.

    At most `limit` bytes of `packed` are read; `view` must be writable. Returns the bytes read.
    """
    return _typed_copy(False, view, start, count, datatype._extent, datatype.compiled(), packed,
                      limit)  # fmt: skip


# ------------------------------------------------------------------ darray, f90, codes
DISTRIBUTE_NONE, DISTRIBUTE_BLOCK, DISTRIBUTE_CYCLIC = 0, 1, 2  # MPICH's values
DISTRIBUTE_DFLT_DARG = -49767
TYPECLASS_REAL, TYPECLASS_INTEGER, TYPECLASS_COMPLEX = 1, 2, 3
TYPECLASS_LOGICAL = constants.UNDEFINED  # no sized LOGICAL types here (as MPICH)


def _darray_indices(size: int, rank: int, gsizes: list[int], distribs: list[int],
                    dargs: list[int], psizes: list[int]) -> list[np.ndarray]:  # fmt: skip
    """The global indices, per dimension and ascending, that process `rank` owns."""
    fail = exceptions.ERR_ARG
    if not len(gsizes) == len(distribs) == len(dargs) == len(psizes) or not gsizes:
        raise exceptions.Exception(fail, "darray: dimensions differ")
    if int(np.prod(psizes)) != size or not 0 <= rank < size or min(psizes) < 1:
        raise exceptions.Exception(fail, f"darray: grid {psizes} for {size} processes")
    coords, rest = [], rank
    for p in reversed(psizes):  # the process grid is row-major
        coords.append(rest % p)
        rest //= p
    owned = []
    for g, kind, darg, p, c in zip(gsizes, distribs, dargs, psizes, coords[::-1], strict=True):
        index = np.arange(g, dtype=np.int64)
        if kind == DISTRIBUTE_NONE:
            if p != 1:
                raise exceptions.Exception(fail, "darray: an undistributed dimension over >1")
        elif kind == DISTRIBUTE_BLOCK:
            block = -(-g // p) if darg == DISTRIBUTE_DFLT_DARG else darg
            if block < 1 or block * p < g:
                raise exceptions.Exception(fail, f"darray: block {block} x {p} < {g}")
            index = index[c * block : (c + 1) * block]
        elif kind == DISTRIBUTE_CYCLIC:
            block = 1 if darg == DISTRIBUTE_DFLT_DARG else darg
            if block < 1:
                raise exceptions.Exception(fail, f"darray: cyclic block {block}")
            index = index[(index // block) % p == c]
        else:
            raise exceptions.Exception(fail, f"darray: distribution {kind}")
        owned.append(index)
    return owned


def _f90(datatype: Datatype, combiner: str, **params: int) -> Datatype:
    """A new handle on the predefined `datatype`, as made by Create_<combiner>(params)."""
    new = Datatype(datatype)
    new._root, new._sized = new, True
    new._combiner, new._old, new._params = combiner, None, params
    return new


def _f90_float(p: int, r: int, kinds: tuple[Datatype, Datatype, Datatype]) -> Datatype:
    for (digits, exponent), datatype in zip(((6, 37), (15, 307), (18, 4931)), kinds, strict=True):
        if p <= digits and r <= exponent:
            return datatype
    raise exceptions.Exception(exceptions.ERR_ARG, f"f90 type: precision {p}, range {r}")


def _typestr(char: str) -> str:
    """mpi4py's type string of a character code: kind and size ("i4"), "b1", "S1"."""
    special = {"?": "b1", "c": "S1", "U": "U1"}
    if char in special:
        return special[char]
    dtype = np.dtype(char)
    return f"{dtype.kind}{dtype.itemsize}"


def _typecode(datatype: Datatype) -> str | None:
    """Return what `tocode` gives, None for a type without one (mpi4py's `MPI._typecode`)."""
    named = datatype._named()
    if datatype.dtype is None or not named._char:
        return None
    return _typestr(named._char) if named._sized else named._char


def _typealign(datatype: Datatype) -> int | None:
    """Return the C alignment of a predefined type (mpi4py's `MPI._typealign`).

    Of the strictest member for a pair type; None for DATATYPE_NULL and derived types.
    """
    named = datatype._named()
    if datatype.dtype is None or not (named._char or named._combiner == "NAMED"):
        return None
    return named._align


# ------------------------------------------------------------------ Pack and external32
def _raw(buf: Any, writable: bool = False) -> memoryview:
    """A flat byte view of the buffer `buf` (any message buffer, DLPack too; BufferError
    if read-only where written)."""
    from guest_lib.mpi.buffers import as_bytes  # buffers builds on this module

    return as_bytes(buf, writable)


def _elements(datatype: Datatype, buf: Any, writable: bool = False) -> tuple[memoryview, int]:
    """(byte view of `buf`, the number of whole elements of `datatype` it spans)."""
    datatype._check_handle()
    view = _raw(buf, writable)
    return view, (len(view) // datatype._extent if datatype._extent > 0 else 0)


def _fits(position: int, nbytes: int, length: int) -> int:
    """position + nbytes; MPI.Exception(ERR_TRUNCATE) past `length`, ERR_ARG if < 0."""
    if position < 0:
        raise exceptions.Exception(exceptions.ERR_ARG, f"position {position}")
    if position + nbytes > length:
        raise exceptions.Exception(
            exceptions.ERR_TRUNCATE, f"{nbytes} bytes at {position} of a {length}-byte buffer"
        )
    return position + nbytes


def _external32(datarep: str) -> None:
    if datarep != "external32":
        raise exceptions.Exception(exceptions.ERR_ARG, f"data representation {datarep!r}")


_QUAD = np.dtype([("hi", ">u8"), ("lo", ">u8")])  # an IEEE binary128, big-endian


def _external(datatype: Datatype) -> np.dtype:
    """The external32 numpy type of a predefined type (MPI's table: big-endian; LONG and
    UNSIGNED_LONG 4 bytes; LONG_DOUBLE an IEEE quad; pair types without padding)."""
    dtype = datatype.dtype
    assert dtype is not None
    if dtype.names:
        return np.dtype([(n, _external(from_dtype(dtype[n]))) for n in dtype.names])
    if datatype._root in (LONG, UNSIGNED_LONG):
        return np.dtype(f">{dtype.kind}4")
    if dtype == np.dtype("g"):
        return _QUAD
    if dtype == np.dtype("G"):
        return np.dtype([("re", _QUAD), ("im", _QUAD)])
    return dtype.newbyteorder(">")


def _quad(values: np.ndarray, to_external: bool) -> np.ndarray:
    """x87 extended doubles (long double) <-> IEEE quads: the same sign, exponent and
    bias; the 64-bit significand with its explicit integer bit <-> a 112-bit fraction."""
    if to_external:
        raw = values.view(np.uint64).reshape(-1, 2)
        mantissa, top = raw[:, 0], raw[:, 1] & np.uint64(0xFFFF)
        quad = np.empty(len(raw), _QUAD)
        fraction = mantissa & np.uint64((1 << 63) - 1)
        quad["hi"] = (top << np.uint64(48)) | (fraction >> np.uint64(15))
        quad["lo"] = fraction << np.uint64(49)
        return quad
    hi, lo = values["hi"].astype(np.uint64), values["lo"].astype(np.uint64)
    exponent = (hi >> np.uint64(48)) & np.uint64(0x7FFF)
    fraction = ((hi & np.uint64((1 << 48) - 1)) << np.uint64(15)) | (lo >> np.uint64(49))
    integer = np.where(exponent != 0, np.uint64(1 << 63), np.uint64(0))
    raw = np.zeros((len(values), 2), np.uint64)
    raw[:, 0] = fraction | integer
    raw[:, 1] = hi >> np.uint64(48)
    return raw.view(np.dtype("g")).ravel()


def _to_field(values: np.ndarray, native: np.dtype, external: np.dtype,
              to_external: bool) -> np.ndarray:  # fmt: skip
    """Values of one field converted from `native` to `external` (see _external) or back."""
    if external == _QUAD:
        return _quad(values, to_external)
    target = external if to_external else native
    if external.names:
        assert native.names is not None
        out = np.empty(len(values), target)
        for name, native_name in zip(external.names, native.names, strict=True):
            out[name if to_external else native_name] = _to_field(
                values[native_name if to_external else name], native[native_name],
                external[name], to_external,
            )  # fmt: skip
        return out
    if to_external and native.kind in "iu" and external.itemsize < native.itemsize:
        info = np.iinfo(external)
        if len(values) and (values.min() < info.min or values.max() > info.max):
            raise exceptions.Exception(exceptions.ERR_ARG, "external32: a value does not fit")
    return values.astype(target)


def _native(datatype: Datatype) -> np.dtype:
    """The native layout of a predefined type, a long double complex as a (re, im) pair."""
    dtype = datatype.dtype
    assert dtype is not None
    if dtype.kind == "c" and dtype.itemsize == 32:
        return np.dtype([("re", "g"), ("im", "g")])
    return dtype


def _convert(data: Any, signature: list[tuple[Datatype, int]], count: int,
             to_external: bool) -> bytes:  # fmt: skip
    """`count` elements of `signature`, packed, from the native to the external32 form or
    back."""
    out, at = [], 0
    for _ in range(count):
        for datatype, n in signature:
            native, external = _native(datatype), _external(datatype)
            source = native if to_external else external
            values = np.frombuffer(data, source, n, at)
            out.append(_to_field(values, native, external, to_external).tobytes())
            at += source.itemsize * n
    return b"".join(out)


def _predefined(name: str) -> Datatype:
    return PREDEFINED[name]


def _rebuild(old: Datatype, combiner: str, params: dict[str, Any], committed: bool) -> Datatype:
    new = getattr(old, "Create_" + combiner.lower())(**params)  # classmethods: struct, f90
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


def _define(name: str, code: str | np.dtype | None, char: str = "", sized: bool = False
            ) -> Datatype:  # fmt: skip
    """A predefined type: `name` (MPI's, less its MPI_ prefix), its numpy layout, its
    character code (mpi4py's typechar; "" for none) and whether its typecode is its type
    string (the sized types: INT32_T's is "i4")."""
    dtype = None if code is None else np.dtype(code)
    datatype = Datatype._create(f"MPI_{name}", dtype, char)
    datatype._sized = sized
    PREDEFINED[name] = datatype
    return datatype


DATATYPE_NULL = _define("DATATYPE_NULL", None)
PACKED = _define("PACKED", "B", "B")
BYTE = _define("BYTE", "B", "B")
AINT = _define("AINT", "i8", "p")
OFFSET = _define("OFFSET", "i8", "p")
COUNT = _define("COUNT", "i8", "p")
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
C_BOOL = _define("C_BOOL", "?", "?", sized=True)
INT8_T = _define("INT8_T", "i1", "b", sized=True)
INT16_T = _define("INT16_T", "i2", "h", sized=True)
INT32_T = _define("INT32_T", "i4", "i", sized=True)
INT64_T = _define("INT64_T", "i8", "l", sized=True)
UINT8_T = _define("UINT8_T", "u1", "B", sized=True)
UINT16_T = _define("UINT16_T", "u2", "H", sized=True)
UINT32_T = _define("UINT32_T", "u4", "I", sized=True)
UINT64_T = _define("UINT64_T", "u8", "L", sized=True)
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
LOGICAL = _define("LOGICAL", "i4", "i")
INTEGER = _define("INTEGER", "i4", "i")
REAL = _define("REAL", "f4", "f")
DOUBLE_PRECISION = _define("DOUBLE_PRECISION", "f8", "d")
INTEGER1 = _define("INTEGER1", "i1", "b", sized=True)
INTEGER2 = _define("INTEGER2", "i2", "h", sized=True)
INTEGER4 = _define("INTEGER4", "i4", "i", sized=True)
INTEGER8 = _define("INTEGER8", "i8", "l", sized=True)
REAL4 = _define("REAL4", "f4", "f", sized=True)
REAL8 = _define("REAL8", "f8", "d", sized=True)
REAL16 = _define("REAL16", "g", "g", sized=True)
COMPLEX8 = _define("COMPLEX8", "F", "F", sized=True)
COMPLEX16 = _define("COMPLEX16", "D", "D", sized=True)
COMPLEX32 = _define("COMPLEX32", "G", "G", sized=True)
# value type -> its pair type, by id() (predefined types live as long as the process)
_PAIRS = {id(SHORT): SHORT_INT, id(INT): TWOINT, id(LONG): LONG_INT, id(FLOAT): FLOAT_INT,
          id(DOUBLE): DOUBLE_INT, id(LONG_DOUBLE): LONG_DOUBLE_INT}  # fmt: skip
_MATCH = {
    TYPECLASS_INTEGER: (INTEGER1, INTEGER2, INTEGER4, INTEGER8),
    TYPECLASS_REAL: (REAL4, REAL8, REAL16),
    TYPECLASS_COMPLEX: (COMPLEX8, COMPLEX16, COMPLEX32),
}
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
    "p": AINT, "b1": C_BOOL, "U": WCHAR, "S1": CHAR, "f2": FLOAT16_T, "e": FLOAT16_T,
    "f16": LONG_DOUBLE, "c32": C_LONG_DOUBLE_COMPLEX,
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
    if not code.isprintable() or code.strip() != code:  # numpy reads "\0" as bool
        raise KeyError(f"unknown typecode {code!r}")
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
