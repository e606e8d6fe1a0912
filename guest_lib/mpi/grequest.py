"""Generalized requests (`MPI.Grequest`): operations the program itself completes.

`Grequest.Start(query_fn, free_fn, cancel_fn, args, kwargs)` gives an active request that
completes when the program calls `Complete()` (or `complete(obj)`, whose object `wait`/
`test` then return), from any thread. At its Wait/Test completion `query_fn(status, *args,
**kwargs)` fills the status (ANY_SOURCE / ANY_TAG / no error before it runs) and then
`free_fn(*args, **kwargs)` runs; `Cancel()` calls `cancel_fn(completed, *args, **kwargs)`.
A callback that raises has its traceback printed to stderr and makes the call raise
MPI.Exception with the callback's error class (ERR_OTHER for a non-MPI exception), as mpi4py
does. None for a callback: nothing to do.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

from guest_lib.mpi import constants, exceptions
from guest_lib.mpi.matching import Op
from guest_lib.mpi.request import Request
from guest_lib.mpi.status import Status


class _Generalized(Op):
    """The operation of a Grequest: its callbacks, and the object `complete` gave."""

    __slots__ = ("args", "cancel_fn", "free_fn", "kwargs", "query_fn", "result")

    def __init__(
        self,
        query_fn: Callable[..., Any] | None,
        free_fn: Callable[..., Any] | None,
        cancel_fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        self.query_fn, self.free_fn, self.cancel_fn = query_fn, free_fn, cancel_fn
        self.args, self.kwargs = args, kwargs
        self.result: Any = None


def _call(function: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> int:
    """Run a callback: 0, or the error class of what it raised (its traceback printed)."""
    if function is None:
        return 0
    try:
        function(*args, **kwargs)
    except Exception as exc:  # a callback's error becomes an MPI error
        traceback.print_exc(file=sys.stderr)
        if isinstance(exc, exceptions.Exception):
            return exc.Get_error_class() or exceptions.ERR_OTHER
        return exceptions.ERR_OTHER
    return 0


class Grequest(Request):
    """A generalized request (see the module docstring)."""

    __slots__ = ()

    def __init__(
        self,
        op: Op | Request | None = None,
        engine: Any = None,
        rank_of: dict[int, int] | None = None,
        finish: Callable[[Op], Any] | None = None,
    ) -> None:
        """Make a new handle on a generalized request (`Grequest(grequest)`).

        Grequest(request) of another kind: a null request if that is null, else TypeError (as
        mpi4py).
        """
        if isinstance(op, Request) and op and not isinstance(op, Grequest):
            raise TypeError("expecting a generalized request")
        super().__init__(op, engine, rank_of, finish)

    @classmethod
    def Start(
        cls,
        query_fn: Callable[..., Any] | None = None,
        free_fn: Callable[..., Any] | None = None,
        cancel_fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> Grequest:
        """An active generalized request with these callbacks."""
        from guest_lib.mpi import MPI

        op = _Generalized(query_fn, free_fn, cancel_fn, tuple(args or ()), dict(kwargs or {}))
        return cls(op, MPI._engine)

    def Complete(self) -> None:
        """Mark the operation complete: a Wait returns, a Test says True.

        MPI.Exception(ERR_REQUEST) on a null request.
        """
        self._generalized().done = True

    def complete(self, obj: Any = None) -> None:
        """Complete, with the object `wait`/`test` return."""
        op = self._generalized()
        op.result = obj
        op.done = True

    def Cancel(self) -> None:
        """Call cancel_fn(completed).

        MPI.Exception if it raised (see the module docstring), ERR_REQUEST on a null request.
        """
        self._check_live("Cancel")
        op = self._op
        if isinstance(op, _Generalized):
            error = _call(op.cancel_fn, op.done, *op.args, **op.kwargs)
            if error:
                raise exceptions.Exception(error, "Grequest cancel_fn")

    cancel = Cancel

    def _generalized(self) -> _Generalized:
        op = self._op
        if not isinstance(op, _Generalized):
            raise exceptions.Exception(exceptions.ERR_REQUEST, "not an active Grequest")
        return op

    def _fill(self, status: Status | None, handler: bool = True) -> Any:
        """Complete the request: query_fn fills the status, free_fn runs; the request becomes null.

        Returns the object `complete` gave (their errors raise, with no handler run).
        """
        op = self._op
        if not isinstance(op, _Generalized):
            return super()._fill(status, handler)
        self._op = None
        target = Status() if status is None else status
        target._set(constants.ANY_SOURCE, constants.ANY_TAG, 0)
        error = _call(op.query_fn, target, *op.args, **op.kwargs)
        error = _call(op.free_fn, *op.args, **op.kwargs) or error
        if error:
            raise exceptions.Exception(error, "Grequest query_fn/free_fn")
        return op.result

    def __repr__(self) -> str:
        return "<Grequest null>" if self._op is None else "<Grequest>"
