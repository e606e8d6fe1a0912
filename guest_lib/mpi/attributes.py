"""Attribute caching (MPI's keyvals) for one kind of object, with mpi4py's semantics.

`Keyvals(kind)` holds the keys made by `Create_keyval` for that kind and the values set on
its objects. The values are kept by the objects' `_key()` (handles are unhashable, as
mpi4py's: see handles.Handle), so handles on one object share its attributes. mpi4py's
callbacks: `copy_fn(old, keyval, value)` runs when the object is duplicated and returns the
new object's value (NotImplemented: not copied; `copy_fn=True` copies the value as it is;
None: not copied); `delete_fn(obj, keyval, value)` runs when a value is replaced, deleted
or its object freed. An exception in a callback is printed to
stderr and raised as MPI.Exception(ERR_OTHER), as mpi4py does.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from guest_lib.mpi import constants, exceptions

_next_keyval = itertools.count(0x7A000001)  # distinct from the predefined keys


class Keyvals:
    """The keyvals of one kind of object and the attribute values set on its objects."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[int, tuple[Any, Callable[..., Any] | None]] = {}
        self._values: dict[Hashable, dict[int, Any]] = {}  # obj._key() -> keyval -> value

    def create(self, copy_fn: Any = None, delete_fn: Callable[..., Any] | None = None) -> int:
        """A new key; see the module docstring for the callbacks."""
        keyval = next(_next_keyval)
        self._fns[keyval] = (copy_fn, delete_fn)
        return keyval

    def free(self, keyval: int) -> int:
        """Forget the key (values set with it stay until deleted); KEYVAL_INVALID.
        MPI.Exception(ERR_KEYVAL) for a key that is not one of this kind."""
        self._known(keyval)
        del self._fns[keyval]
        return constants.KEYVAL_INVALID

    def known(self, keyval: int) -> bool:
        """True iff `keyval` is a live key of this kind."""
        return keyval in self._fns

    def _known(self, keyval: int) -> None:
        if keyval not in self._fns:
            raise exceptions.Exception(exceptions.ERR_KEYVAL, f"{self.kind} keyval {keyval:#x}")

    def get(self, obj: Any, keyval: int) -> Any:
        """The value set on `obj` for `keyval`, None if none. MPI.Exception(ERR_KEYVAL) for
        KEYVAL_INVALID or a key that is not one of this kind."""
        self._known(keyval)
        return self._values.get(obj._key(), {}).get(keyval)

    def set(self, obj: Any, keyval: int, value: Any) -> None:
        """Set the value (the one it replaces goes to delete_fn first); ERR_KEYVAL as get."""
        self._known(keyval)
        self.delete(obj, keyval)
        self._values.setdefault(obj._key(), {})[keyval] = value

    def delete(self, obj: Any, keyval: int) -> None:
        """Remove the value if set, then call delete_fn on it; ERR_KEYVAL as get."""
        key = obj._key()
        values = self._values.get(key)
        if values is None or keyval not in values:
            self._known(keyval)
            return
        value = values.pop(keyval)
        if not values:
            del self._values[key]
        delete_fn = self._fns.get(keyval, (None, None))[1]
        if delete_fn is not None:
            _callback(delete_fn, obj, keyval, value)

    def copy(self, old: Any, new: Any) -> None:
        """Give `new` (a duplicate of `old`) the values copy_fn gives for `old`'s."""
        if not self._values:  # no object of this kind has attributes (the common case)
            return
        for keyval, value in list(self._values.get(old._key(), {}).items()):
            copy_fn = self._fns.get(keyval, (None, None))[0]
            if copy_fn is None or copy_fn is False:
                continue
            copied = value if copy_fn is True else _callback(copy_fn, old, keyval, value)
            if copied is not NotImplemented:
                self._values.setdefault(new._key(), {})[keyval] = copied

    def drop(self, obj: Any) -> None:
        """Delete every value set on `obj` (it is being freed)."""
        if not self._values:
            return
        for keyval in list(self._values.get(obj._key(), {})):
            self.delete(obj, keyval)


class Cached:
    """Mixin: mpi4py's Create_keyval, Free_keyval, Set_attr and Delete_attr over the class's
    `_keyvals`; `_check_attr_target()` raises the class's error for a null handle."""

    # No __slots__ here, on purpose: with empty slots this mixin became the layout base of
    # Comm while Intracomm's base is its (dict-carrying) collective mixins, and Python then
    # refuses `__class__` assignment between them, which Dup needs to give a subclass such
    # as mpi4py.util.pkl5.Intracomm its own type (comm.same_class).
    _keyvals: ClassVar[Keyvals]

    def _check_attr_target(self) -> Any:
        raise NotImplementedError

    @classmethod
    def Create_keyval(cls, copy_fn: Any = None, delete_fn: Any = None,
                      nopython: bool = False) -> int:  # fmt: skip
        """A new attribute key of this kind (callbacks: see Keyvals; Dup copies, Free
        deletes)."""
        return cls._keyvals.create(copy_fn, delete_fn)

    @classmethod
    def Free_keyval(cls, keyval: int) -> int:
        """Forget `keyval`; KEYVAL_INVALID. MPI.Exception(ERR_KEYVAL) if it is none."""
        return cls._keyvals.free(keyval)

    def Set_attr(self, keyval: int, attrval: Any) -> None:
        """Set the value for a key of Create_keyval. MPI.Exception: the class's null-handle
        error, ERR_KEYVAL for another key."""
        self._check_attr_target()
        self._keyvals.set(self, keyval, attrval)

    def Delete_attr(self, keyval: int) -> None:
        """Remove the value for `keyval` if set (errors as Set_attr)."""
        self._check_attr_target()
        self._keyvals.delete(self, keyval)


def _callback(function: Callable[..., Any], obj: Any, keyval: int, value: Any) -> Any:
    try:
        return function(obj, keyval, value)
    except Exception as exc:
        traceback.print_exc()
        raise exceptions.Exception(
            exceptions.ERR_OTHER, f"attribute callback raised {exc!r}"
        ) from exc
