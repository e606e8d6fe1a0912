"""Integer handles: mpi4py's `handle`, `fromhandle`, `toint`, `fromint`, `py2f`, `f2py`.

There are no C or Fortran handles under this library, so the integer of a handle is a
number this process gives the object the first time it is asked for one (0 for a null
handle): equal handles (handles on one object) get the same number, and
`type(h).fromhandle(h.handle)` (or `fromint`, `f2py`) is a new handle equal to `h`. The
numbers mean nothing in another process. Objects that were given a number stay known to
this process (as a C handle stays valid until freed); a freed object's number gives a
null handle (the freed handle itself), until a live handle equal to the one numbered (the
same group, a communicator with the same context) asks again: the number is its then.

C handle cells (mpi4py's `MPI._sizeof`, `_addressof`, `_handleof`, for C code reached through
ctypes or cffi): `_addressof(h)` gives the address of a 64-bit memory cell of the handle
object `h` that holds its number (`_sizeof` is 8 for every handle object and class);
`_handleof(h)` is that number. A cell is made the first time `_addressof` is asked for it
(a ctypes c_uint64 kept as long as the object lives); handles never asked cost nothing.
This module writes a handle's number in its cell at each `_addressof`/`_handleof` (a later
Free or completion does not rewrite it: ask again); a value that differs from the one it
wrote last was written by C, and is read:
- on a null handle (watched from the `_addressof`/`_handleof` that found it null, through
  a subclass of its class whose __getattribute__ reads the cell: only such handles pay for
  it), at its next use (any attribute read: a method call, `bool`, `==`): the number of a
  live handle of its kind (any communicator for a Comm, any request for a Request, ...)
  makes it a handle on that object, keeping its own class, as
  `handle_t.from_address(MPI._addressof(MPI.Comm())).value = h` does in mpi4py. 0 or a
  number naming no live handle of its kind leaves it null (the next `_addressof` or
  `_handleof` writes 0 back);
- on a live handle, at its next `_addressof` or `_handleof` only (other calls never read
  the cell: zero cost on the hot path): a live handle's number makes it a handle on that
  object, 0 a null handle (its object is not freed), another number raises ValueError
  there (the cell gets the handle's number back);
- on a predefined handle (MPI.COMM_WORLD, MPI.COMM_NULL, ...) never: ValueError at its
  next `_addressof`/`_handleof`, the cell restored.
Equality of handles compares what they are, as before. A Status's cell is its five 64-bit
fields themselves (count in bytes, cancelled, source, tag, error: `_sizeof` 40), read and
written live both ways; `_handleof(status)` is its address, as in mpi4py.
"""

from __future__ import annotations

import ctypes
import itertools
import weakref
from collections.abc import Hashable
from typing import Any, TypeVar

T = TypeVar("T", bound="Handle")

_LIBRARY = "guest_lib.mpi."  # the modules whose classes `fromhandle` gives (not subclasses)
_numbers = itertools.count(1)
_by_number: dict[int, Any] = {}  # number -> the handle it was given through (or a later one)
_by_object: dict[Hashable, int] = {}  # keyed by Handle._key(): equal handles share a number
_constants: dict[type, list[Any]] = {}  # library class -> the MPI namespace's handles of it
_constant_ids: set[int] = set()  # (they live as long as the process: ids stay theirs)
_cells: dict[int, _Cell] = {}  # id(handle) -> its C cell, while the handle lives
_celled: dict[type, type] = {}  # handle class -> its subclass that reads the cell (see _watch)


class _Cell:
    """A handle's C cell: `c` the 64-bit memory C reads and writes, `written` the value this
    module wrote there last (another value there was written by C)."""

    __slots__ = ("c", "written")

    def __init__(self, number: int) -> None:
        self.c = ctypes.c_uint64(number)
        self.written = number


def argument(value: Any, kind: type[T]) -> T | None:
    """`value` checked as the argument of mpi4py's `kind(value)`: None or a handle of
    `kind`, returned as is; TypeError for anything else (another class's handle, an int)."""
    if value is None or isinstance(value, kind):
        return value
    raise TypeError(f"{kind.__name__}: expecting a {kind.__name__}, got {type(value).__name__}")


def _library_class(handle: Any) -> type:
    """The class of this library that `handle`'s class is or derives from."""
    return next(
        k
        for k in type(handle).__mro__
        if k.__module__.startswith(_LIBRARY) and "_watched" not in vars(k)
    )


def _kind(handle: Any) -> type:
    """The handle class at the root of `handle`'s (Comm for every communicator, ...)."""
    return next(
        k for k in reversed(type(handle).__mro__) if k is not Handle and issubclass(k, Handle)
    )


def _index_constants() -> None:
    """Fill _constants and _constant_ids from the MPI namespace (once, at the first use:
    every predefined handle is made by then)."""
    from guest_lib.mpi import MPI

    for value in vars(MPI).values():
        if isinstance(value, Handle):
            _constants.setdefault(_library_class(value), []).append(value)
            _constant_ids.add(id(value))


class Same:
    """A dictionary key standing for one object by identity.

    It equals another Same of the same object only and hashes as that object's id(); it
    holds the object, so the id stays that object's for as long as the key is in use.
    """

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


class Handle:
    """Mixin giving a handle class the integer-handle methods (see the module docstring).

    The class must define `_key()`, and `cls(h)` must make a new handle on `h`'s object
    and `cls()` a null one. Handles are unhashable, as mpi4py's (hash() raises TypeError):
    what this library keys by a handle (the numbers here, attributes) it keys by `_key()`.
    """

    __hash__ = None  # type: ignore[assignment]

    # No __slots__ here, on purpose: with empty slots this mixin became the layout base of
    # Comm while Intracomm's base is its (dict-carrying) collective mixins, and Python then
    # refuses `__class__` assignment between them, which Dup needs to give a subclass such
    # as mpi4py.util.pkl5.Intracomm its own type (comm.same_class).

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Create a new, uninitialised handle: the arguments are __init__'s.

        mpi4py's subclasses call `Base.__new__(cls, other)`, as test_subclass's MyInfo and MyRequest
        do.
        """
        return super().__new__(cls)

    def free(self) -> None:
        """Free the handle, safe on any handle (mpi4py's `free`).

        Nothing for a null handle or a predefined handle itself (MPI.SUM, MPI.COMM_WORLD, ...); a
        new handle on a predefined object (Op(MPI.SUM)) becomes a null handle, the object staying as
        it is; any other handle is released by `_release` (Free) and is a null handle after it.
        Errors as `_release`'s.
        """
        if not _constant_ids:
            _index_constants()
        if not self or id(self) in _constant_ids:
            return
        if self._on_predefined():
            self._nullify()
        else:
            self._release()

    def _key(self) -> Hashable:
        """Return the value this library keys the handle's object by.

        A hashable value, equal for equal handles (handles on one object) and only for
        them, that keeps what it stands for alive (see Same).
        """
        raise NotImplementedError(f"{type(self).__name__} has no _key")

    def _on_predefined(self) -> bool:
        """Return whether this handle is on a predefined object.

        That is, equal to one of the MPI namespace's handles of its class.
        """
        return any(self == constant for constant in _constants.get(_library_class(self), ()))

    def _nullify(self) -> None:
        """Make this handle a null one of its class (other handles on its object stay)."""
        self._become(_library_class(self)())

    def _become(self, other: Handle) -> None:
        """Make this handle `other`, a new handle made for it.

        It takes `other`'s slots and its __dict__ (handles on one communicator share one
        __dict__, a null one gets its own).
        """
        for kind in type(other).__mro__:
            for name in vars(kind).get("__slots__", ()):
                if name != "__weakref__" and hasattr(other, name):
                    setattr(self, name, getattr(other, name))
        self.__dict__ = vars(other)

    def _release(self) -> None:
        """Release the object (MPI's Free); this handle is a null one after it."""
        self.Free()  # type: ignore[attr-defined]

    @property
    def handle(self) -> int:
        """This handle's number (0 for a null handle)."""
        return self.toint()

    def toint(self) -> int:
        """This handle's number (0 for a null handle)."""
        if not self:
            return 0
        key = self._key()
        number = _by_object.get(key)
        if number is None:
            number = next(_numbers)
            _by_object[key] = number
            _by_number[number] = self
        elif not _by_number[number]:  # the handle numbered first was freed: this one
            _by_number[number] = self  # stands for the object now
        return number

    def py2f(self) -> int:
        """As toint (there is no Fortran handle to give)."""
        return self.toint()

    @classmethod
    def fromhandle(cls: type[T], handle: int) -> T:
        """Return a new handle on the object numbered `handle` (0: a null one).

        Of the object's own kind within this library (as mpi4py: `Comm.fromhandle` of an
        intercommunicator gives an Intercomm, of a Cartesian one a Cartcomm). ValueError for a
        number this process did not give to an object of this class.
        """
        if "_watched" in vars(cls):  # type(h) of a null handle with a cell: its own class
            cls = cls.__bases__[0]
        if handle == 0:
            return cls()
        found = _by_number.get(int(handle))
        if not isinstance(found, cls):
            raise ValueError(f"{cls.__name__}: no handle {handle} in this process")
        return _library_class(found)(found)

    @classmethod
    def fromint(cls: type[T], value: int) -> T:
        """As fromhandle."""
        return cls.fromhandle(value)

    @classmethod
    def f2py(cls: type[T], value: int) -> T:
        """As fromhandle."""
        return cls.fromhandle(value)


def _target(handle: Handle, number: int) -> Handle | None:
    """The live handle numbered `number` if it is of `handle`'s kind, else None."""
    found: Handle | None = _by_number.get(number)
    return found if isinstance(found, _kind(handle)) and found else None


def _adopt(handle: Any, found: Handle) -> None:
    """Make `handle` a handle on `found`'s object (watched no more, see _watch)."""
    if "_watched" in vars(type(handle)):
        object.__setattr__(handle, "__class__", type(handle).__bases__[0])
    handle._become(_library_class(found)(found))


def _read_cell(handle: Any) -> None:
    """A watched null handle's first step at any attribute read: become the handle its
    cell names, if C wrote there the value of a live one of its kind (then it is watched no
    more)."""
    cell = _cells.get(id(handle))
    if cell is not None and cell.c.value != cell.written:
        found = _target(handle, cell.c.value)
        if found is not None:
            _adopt(handle, found)
            cell.written = cell.c.value


def _watch(handle: Handle) -> None:
    """Make the null `handle` read its cell at every attribute read, until it names a live
    handle (a subclass of its class, of the same layout, whose __getattribute__ does it:
    only handles so watched pay for it)."""
    base = type(handle)
    watched = _celled.get(base)
    if watched is None:

        def __getattribute__(self: Any, name: str) -> Any:
            _read_cell(self)
            return base.__getattribute__(self, name)

        def __reduce_ex__(self: Any, protocol: Any) -> Any:  # pickled as `base`
            reduced = base.__reduce_ex__(self, protocol)
            if isinstance(reduced, tuple):
                if reduced[0] is type(self):
                    reduced = (base, *reduced[1:])
                elif reduced[1] and reduced[1][0] is type(self):  # copyreg.__newobj__ (cls, ...)
                    reduced = (reduced[0], (base, *reduced[1][1:]), *reduced[2:])
            return reduced

        watched = type(
            base.__name__,
            (base,),
            {
                "__slots__": (),
                "__getattribute__": __getattribute__,
                "__reduce_ex__": __reduce_ex__,
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "_watched": True,
            },
        )
        _celled[base] = watched
    object.__setattr__(handle, "__class__", watched)


def _refresh(handle: Handle, cell: _Cell) -> int:
    """Read what C wrote in `handle`'s cell, if anything (see the module docstring), then
    write its number there; return that number. A null handle is watched from then on."""
    if not _constant_ids:
        _index_constants()
    value = cell.c.value
    if id(handle) in _constant_ids:  # MPI.COMM_WORLD, MPI.COMM_NULL, ... stay themselves
        if value != cell.written:
            cell.c.value = cell.written
            raise ValueError(
                f"{type(handle).__name__} cell: {value} written on a predefined handle"
            )
        return cell.written
    if value != cell.written:  # (a watched null handle has adopted a live value by now)
        found = _target(handle, value) if value else None
        if found is not None:
            _adopt(handle, found)
        elif value == 0:
            if handle:
                handle._nullify()
        elif handle:
            cell.c.value = cell.written
            raise ValueError(f"{type(handle).__name__} cell: {value} is no handle to adopt here")
    number = handle.toint()
    cell.c.value = cell.written = number
    if not number and "_watched" not in vars(type(handle)):
        _watch(handle)
    return number


def _status_address(arg: Any) -> int | None:
    """The address of `arg`'s fields if it is a Status, None if it is a handle object;
    TypeError for anything else (None and classes included)."""
    from guest_lib.mpi.status import Status

    if isinstance(arg, Status):
        return int(arg._fields.buffer_info()[0])
    if not isinstance(arg, Handle):
        raise TypeError("expecting an MPI instance")
    return None


def _sizeof(arg: Any) -> int:
    """Size in bytes of the C cell of a handle or Status, or of one of their classes.

    8 for every handle (its number, see the module docstring), 40 for a Status (five 64-bit
    fields). TypeError for anything else (None included).
    """
    from guest_lib.mpi.status import Status

    kind = arg if isinstance(arg, type) else type(arg)
    if issubclass(kind, Handle):
        return ctypes.sizeof(ctypes.c_uint64)
    if issubclass(kind, Status):
        return 5 * 8
    raise TypeError("expecting an MPI type or instance")


def _addressof(arg: Any) -> int:
    """Address of the C cell of a handle object or of a Status (see the module docstring).

    The first call on a handle makes its cell (a null one is watched from then on); each call
    reads a cell C may have written and writes the handle's number there. TypeError for
    anything else (None, classes included); ValueError for a cell holding a number that is no
    live handle of its kind on a live handle.
    """
    address = _status_address(arg)
    if address is not None:
        return address
    cell = _cells.get(id(arg))
    if cell is None:
        cell = _cells[id(arg)] = _Cell(arg.toint())
        weakref.finalize(arg, _cells.pop, id(arg), None)
    _refresh(arg, cell)
    return ctypes.addressof(cell.c)


def _handleof(arg: Any) -> int:
    """Return the C handle value of a handle object or of a Status.

    A handle's number (>= 0, 0 for a null one), written in its cell if it has one (after what
    C wrote there is read, see the module docstring); a Status's address (as mpi4py).
    TypeError for anything else; ValueError as `_addressof`.
    """
    address = _status_address(arg)
    if address is not None:
        return address
    cell = _cells.get(id(arg))
    return arg.toint() if cell is None else _refresh(arg, cell)
