"""`MPI.Info`: string key/value hints, with mpi4py's dict-like methods.

An Info is a handle on a table: `Info(other)` is a second handle on the same table (equal to
it), `Dup` a new table with the same items (not equal), `Free` turns the handle into
INFO_NULL. INFO_NULL has no table: its MPI calls (Set, Get, Delete, Get_nkeys,
Get_nthkey, Dup, Free) raise MPI.Exception(ERR_INFO); its dict-like getters answer as an
empty table and its dict-like setters raise KeyError (as mpi4py's). INFO_ENV holds the
keys MPI defines for the process's start (command, argv, maxprocs, soft, host, arch,
wdir, file, thread_level).

Nothing in this library reads hints: calls that take `info` accept an Info and ignore it.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

from guest_lib.mpi import exceptions
from guest_lib.mpi.handles import Handle, Same, argument

MAX_INFO_KEY = 255
MAX_INFO_VAL = 1024


class Info(Handle):
    """A handle on a table of hints; see the module docstring."""

    __slots__ = ("_items",)

    def __init__(self, info: Info | None = None) -> None:
        """Make a new handle on `info`'s table (`Info(info)`), or a null one (`Info()`).

        TypeError for anything else.
        """
        other = argument(info, Info)
        self._items: dict[str, str] | None = None if other is None else other._items

    # ------------------------------------------------------------------ MPI's methods
    @classmethod
    def Create(cls, items: Any = None) -> Info:
        """Create a new table, with `items` (a mapping or (key, value) pairs) if given.

        TypeError for anything else.
        """
        info = cls()
        info._items = {}
        if items is not None:
            if isinstance(items, str | bytes) or not isinstance(items, Iterable):
                raise TypeError(f"Info.Create: expecting items, got {type(items).__name__}")
            info.update(items)
        return info

    @classmethod
    def Create_env(cls, args: Any = None) -> Info:
        """Create a new table with the start keys of INFO_ENV.

        `args`, a command line, is accepted and its command and arguments recorded.
        """
        info = cls.Create(_environment())
        if args is not None:
            argv = [args] if isinstance(args, str) else [str(a) for a in args]
            if argv:
                info.Set("command", argv[0])
                info.Set("argv", " ".join(argv[1:]))
        return info

    def _live(self, call: str) -> dict[str, str]:
        """The table; MPI.Exception(ERR_INFO) on INFO_NULL (what MPI's calls raise there)."""
        if self._items is None:
            raise exceptions.Exception(exceptions.ERR_INFO, f"Info.{call} on INFO_NULL")
        return self._items

    def _table(self) -> dict[str, str]:
        if self._items is None:
            raise KeyError("INFO_NULL holds no keys")
        return self._items

    def Set(self, key: str, value: str) -> None:
        """Set `key` to `value` (strings).

        MPI.Exception(ERR_INFO_KEY/VALUE) if too long, ERR_INFO on INFO_NULL.
        """
        table = self._live("Set")
        if len(key) > MAX_INFO_KEY:
            raise exceptions.Exception(exceptions.ERR_INFO_KEY, f"key of {len(key)} chars")
        if len(value) > MAX_INFO_VAL:
            raise exceptions.Exception(exceptions.ERR_INFO_VALUE, f"value of {len(value)} chars")
        table[str(key)] = str(value)

    def Get(self, key: str) -> str | None:
        """The value of `key`, None if it is not set; MPI.Exception(ERR_INFO) on INFO_NULL."""
        return self._live("Get").get(key)

    def Delete(self, key: str) -> None:
        """Remove `key`.

        MPI.Exception(ERR_INFO_NOKEY) if it is not set, ERR_INFO on INFO_NULL.
        """
        table = self._live("Delete")
        if key not in table:
            raise exceptions.Exception(exceptions.ERR_INFO_NOKEY, f"no key {key!r}")
        del table[key]

    def Get_nkeys(self) -> int:
        """The number of keys set; MPI.Exception(ERR_INFO) on INFO_NULL."""
        return len(self._live("Get_nkeys"))

    def Get_nthkey(self, n: int) -> str:
        """Return the `n`-th key (in the order keys were set).

        MPI.Exception(ERR_ARG) if none, ERR_INFO on INFO_NULL.
        """
        keys = list(self._live("Get_nthkey"))
        if not 0 <= n < len(keys):
            raise exceptions.Exception(exceptions.ERR_ARG, f"key {n} of {len(keys)}")
        return keys[n]

    def Dup(self) -> Info:
        """Duplicate the table: a new one with the same items, of this handle's class.

        A subclass's Dup is one of it, as mpi4py's; MPI.Exception(ERR_INFO) on INFO_NULL.
        """
        return type(self).Create(list(self._live("Dup").items()))

    def Free(self) -> None:
        """Free the table: this handle becomes INFO_NULL (INFO_ENV stays).

        MPI.Exception(ERR_INFO) on a null handle.
        """
        self._live("Free")
        if self is not INFO_NULL and self is not INFO_ENV:
            self._items = None

    # ------------------------------------------------------------------ dict-like
    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def __contains__(self, key: object) -> bool:
        return self._items is not None and key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, key: str) -> str:
        return self._table()[key]

    def __setitem__(self, key: str, value: str) -> None:
        self._table()
        self.Set(key, value)

    def __delitem__(self, key: str) -> None:
        del self._table()[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        """Return the value of `key`, `default` if it is not set (or the handle is null)."""
        value = None if self._items is None else self._items.get(key)
        return default if value is None else value

    def keys(self) -> list[str]:
        """Return the list of keys, in the order they were set ([] for a null handle)."""
        return [] if self._items is None else list(self._items)

    def values(self) -> list[str]:
        """Return the list of values, in key order ([] for a null handle)."""
        return [] if self._items is None else list(self._items.values())

    def items(self) -> list[tuple[str, str]]:
        """Return the list of (key, value) pairs, in key order ([] for a null handle)."""
        return [] if self._items is None else list(self._items.items())

    def update(self, other: Any = (), **kwds: str) -> None:
        """Set every item of `other` (a mapping or pairs) and `kwds`; KeyError on INFO_NULL."""
        self._table()
        pairs = other.items() if hasattr(other, "items") else other
        for key, value in [*pairs, *kwds.items()]:
            self.Set(key, value)

    def pop(self, key: str, *default: str | None) -> str | None:
        """Remove `key` and return its value.

        Without the key (or on a null handle): `default` if one is given, else KeyError.
        """
        if self._items is None or key not in self._items:
            if default:
                return default[0]
            raise KeyError(key)
        return self._items.pop(key)

    def popitem(self) -> tuple[str, str]:
        """The last item set, removed; KeyError when there is none."""
        return self._table().popitem()

    def copy(self) -> Info:
        """Dup; a null handle's copy is a new null handle (as mpi4py)."""
        return type(self)() if self._items is None else self.Dup()

    def clear(self) -> None:
        """Remove every key (nothing on a null handle)."""
        if self._items is not None:
            self._items.clear()

    # ------------------------------------------------------------------ handles
    def __bool__(self) -> bool:
        return self._items is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Info):
            return NotImplemented
        return self._items is other._items

    def _key(self) -> Hashable:
        return Same(self._items)

    def __reduce__(self) -> Any:
        """Pickle INFO_NULL and INFO_ENV by name, other tables by their items.

        INFO_NULL and INFO_ENV unpickle as themselves, handles on them as new handles of this class
        equal to them; other tables as new tables with the same items.
        """
        if self is INFO_NULL or self is INFO_ENV:
            return (_predefined, (self is INFO_ENV,))
        if self._items is None or self._items is INFO_ENV._items:
            return (type(self), (INFO_NULL if self._items is None else INFO_ENV,))
        return (type(self).Create, (self.items(),))

    def __repr__(self) -> str:
        return "<Info null>" if self._items is None else f"<Info {self._items}>"


def _predefined(env: bool) -> Info:
    return INFO_ENV if env else INFO_NULL


def _environment() -> dict[str, str]:
    return {
        "command": sys.executable,
        "argv": " ".join(sys.argv[1:]),
        "maxprocs": os.environ.get("IVSHMEM_MPI_SIZE", os.environ.get("PMI_SIZE", "1")),
        "soft": "",
        "host": socket.gethostname(),
        "arch": platform.machine(),
        "wdir": os.getcwd(),
        "file": "",
        "thread_level": "MPI_THREAD_SINGLE",
    }


INFO_NULL = Info()
INFO_ENV = Info.Create(_environment())
