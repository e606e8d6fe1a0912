"""Integer handles: mpi4py's `handle`, `fromhandle`, `toint`, `fromint`, `py2f`, `f2py`.

There are no C or Fortran handles under this library, so the integer of a handle is a
number this process gives the object the first time it is asked for one (0 for a null
handle): equal handles (handles on one object) get the same number, and
`type(h).fromhandle(h.handle)` (or `fromint`, `f2py`) is a new handle equal to `h`. The
numbers mean nothing in another process. Objects that were given a number stay known to
this process (as a C handle stays valid until freed); a freed object's number gives a
null handle (the freed handle itself), until a live handle equal to the one numbered (the
same group, a communicator with the same context) asks again: the number is its then.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Any, TypeVar

T = TypeVar("T", bound="Handle")

_LIBRARY = "guest_lib.mpi."  # the modules whose classes `fromhandle` gives (not subclasses)
_numbers = itertools.count(1)
_by_number: dict[int, Any] = {}  # number -> the handle it was given through (or a later one)
_by_object: dict[Hashable, int] = {}  # keyed by Handle._key(): equal handles share a number
_constants: dict[type, list[Any]] = {}  # library class -> the MPI namespace's handles of it
_constant_ids: set[int] = set()  # (they live as long as the process: ids stay theirs)


def argument(value: Any, kind: type[T]) -> T | None:
    """`value` checked as the argument of mpi4py's `kind(value)`: None or a handle of
    `kind`, returned as is; TypeError for anything else (another class's handle, an int)."""
    if value is None or isinstance(value, kind):
        return value
    raise TypeError(f"{kind.__name__}: expecting a {kind.__name__}, got {type(value).__name__}")


def _library_class(handle: Any) -> type:
    """The class of this library that `handle`'s class is or derives from."""
    return next(k for k in type(handle).__mro__ if k.__module__.startswith(_LIBRARY))


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
        """Make this handle a null one of its class (other handles on its object stay).

        The slots and the __dict__ of a new null handle (handles on one communicator share one
        __dict__: this one gets its own).
        """
        null = _library_class(self)()
        for kind in type(null).__mro__:
            for name in vars(kind).get("__slots__", ()):
                if name != "__weakref__" and hasattr(null, name):
                    setattr(self, name, getattr(null, name))
        self.__dict__ = vars(null)

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
        if handle == 0:
            return cls()
        found = _by_number.get(int(handle))
        if not isinstance(found, cls):
            raise ValueError(f"{cls.__name__}: no handle {handle} in this process")
        kind = next(k for k in type(found).__mro__ if k.__module__.startswith(_LIBRARY))
        return kind(found)

    @classmethod
    def fromint(cls: type[T], value: int) -> T:
        """As fromhandle."""
        return cls.fromhandle(value)

    @classmethod
    def f2py(cls: type[T], value: int) -> T:
        """As fromhandle."""
        return cls.fromhandle(value)
