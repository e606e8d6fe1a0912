"""Per-communicator locks, as mpi4py keeps them (`MPI._comm_lock`, `MPI._comm_lock_table`).

mpi4py gives each communicator a table of `threading.Lock`s by key, made on first use, and
holds the lock of a collective's name ("bcast", "gather", ...) around the messages of each
object collective, so that two threads calling the same object collective on one
communicator run one after the other instead of mixing their messages; `mpi4py.util.pkl5`
takes the same locks ("send", "recv", "bcast"). The table lives in the communicator's
attributes, so every handle on a communicator (`Comm(comm)`) shares it, and it goes with
the communicator (one made later starts with an empty table).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_guard = threading.Lock()  # makes tables and locks once, whichever thread asks first


def lock_table(comm: Any) -> dict[Hashable, threading.Lock]:
    """The lock table of `comm` (a dict key -> Lock, empty until a lock is made)."""
    with _guard:
        table: dict[Hashable, threading.Lock] | None = comm.__dict__.get("_lock_table")
        if table is None:
            table = comm.__dict__["_lock_table"] = {}
        return table


def comm_lock(comm: Any, key: Hashable = None) -> threading.Lock:
    """The lock of `comm` for `key`, made on first use."""
    table = lock_table(comm)
    with _guard:
        lock = table.get(key)
        if lock is None:
            lock = table[key] = threading.Lock()
        return lock


def locked(key: str) -> Callable[[F], F]:
    """Decorator of an object collective: the call holds `comm_lock(self, key)`."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            # A lock, once in the table, stays there: read without the guard (a dict's get
            # is atomic); comm_lock makes the table or the lock on first use.
            table = self.__dict__.get("_lock_table")
            lock = None if table is None else table.get(key)
            if lock is None:
                lock = comm_lock(self, key)
            with lock:
                return method(self, *args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate
