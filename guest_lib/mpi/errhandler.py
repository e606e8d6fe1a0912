"""Error handlers of communicators, with mpi4py's semantics.

Every communicator starts with ERRORS_RETURN, as in mpi4py (which sets it on COMM_WORLD and
COMM_SELF at start, and MPI copies it to the communicators made from them): an error in a
call raises `MPI.Exception`. `Set_errhandler` changes what happens when a call of that
communicator raises MPI.Exception:
- ERRORS_ARE_FATAL / ERRORS_ABORT: the error is printed to stderr and the job is aborted
  (`Comm.Abort` with the error class as exit code);
- a handler from `Comm.Create_errhandler(fn)`: `fn(comm, error_class)` is called, then the
  exception is raised (the call "returns the error", which mpi4py turns into a raise);
- ERRORS_RETURN: the exception is raised.
The handler applies to the calls made on the communicator itself, to the errors its
requests report later at Wait/Test/Waitall/... (the handler in effect when the error is
raised, as MPI says: a request returned by a guarded call carries the communicator, and one
made before any handler was set finds it by its context, see `owner_of`; a call that
completes several requests, Waitall/Testall/Waitsome/Testsome, runs the handler once with
ERR_IN_STATUS and raises that class, each status holding its request's error), and
communicators made from it (Dup, Split, Create, ...) get it too, as MPI says. The
communicator's methods are wrapped per instance only while a handler other than
ERRORS_RETURN is set, so the default costs nothing.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from guest_lib.mpi import exceptions
from guest_lib.mpi.handles import Handle, Same, argument
from guest_lib.mpi.request import Request

_RETURN, _FATAL, _ABORT = "ERRORS_RETURN", "ERRORS_ARE_FATAL", "ERRORS_ABORT"
# the methods that manage the handler itself, and Abort, stay as they are
_UNGUARDED = frozenset({"Set_errhandler", "Get_errhandler", "Call_errhandler", "Abort",
                        "Create_errhandler", "Free"})  # fmt: skip


class Errhandler(Handle):
    """An error handler handle: a predefined kind (a name), a user function, or null."""

    __slots__ = ("_kind",)

    def __init__(self, errhandler: Errhandler | None = None) -> None:
        """Make a new handle on `other`'s handler (`Errhandler(other)`), or a null one.

        TypeError for anything else.
        """
        other = argument(errhandler, Errhandler)
        self._kind: str | Callable[..., Any] | None = None if other is None else other._kind

    def Free(self) -> None:
        """Free the handler: this handle becomes ERRHANDLER_NULL (the predefined ones stay).

        Freeing a user handler frees its place among the MAX_USER_ERRHANDLERS of its kind of object.
        MPI.Exception(ERR_ARG) on a null handle.
        """
        if self._kind is None:
            raise exceptions.Exception(exceptions.ERR_ARG, "Errhandler.Free on ERRHANDLER_NULL")
        if not any(self is h for h in _PREDEFINED.values()):
            for live in _user_handlers.values():
                live.discard(self._kind)
            self._kind = None

    def __bool__(self) -> bool:
        return self._kind is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Errhandler):
            return NotImplemented
        return self._kind is other._kind

    def _key(self) -> Hashable:
        return Same(self._kind)

    def __reduce__(self) -> Any:
        """Pickle a predefined handler by name; user handlers raise ValueError, as in mpi4py.

        Predefined handlers unpickle as themselves (handles on them as equal new handles of this
        class).
        """
        name = self._kind if isinstance(self._kind, str) or self._kind is None else ""
        if name == "":
            raise ValueError("cannot serialize a user error handler")
        key = name or "ERRHANDLER_NULL"
        if self is _PREDEFINED[key]:
            return (_predefined, (key,))
        return (type(self), (_PREDEFINED[key],))

    def __repr__(self) -> str:
        return f"<Errhandler {self._kind!r}>"


def _predefined(name: str) -> Errhandler:
    return _PREDEFINED[name]


def _make(kind: str | None) -> Errhandler:
    handle = Errhandler()
    handle._kind = kind
    return handle


ERRHANDLER_NULL = _make(None)
ERRORS_RETURN = _make(_RETURN)
ERRORS_ARE_FATAL = _make(_FATAL)
ERRORS_ABORT = _make(_ABORT)
_PREDEFINED = {
    "ERRHANDLER_NULL": ERRHANDLER_NULL,
    _RETURN: ERRORS_RETURN,
    _FATAL: ERRORS_ARE_FATAL,
    _ABORT: ERRORS_ABORT,
}


MAX_USER_ERRHANDLERS = 32  # live user handlers per kind of object (mpi4py's limit)
_user_handlers: dict[str, set[Any]] = {}  # kind of object -> its live user handler functions


def create_errhandler(function: Callable[[Any, int], None], kind: str = "Comm") -> Errhandler:
    """Create a handler calling `function(obj, error_class)` (mpi4py's Comm.Create_errhandler).

    `kind` names the kind of object (Win.Create_errhandler... have theirs). TypeError for a
    non-callable; RuntimeError if MAX_USER_ERRHANDLERS of the kind are live (as mpi4py).
    """
    if not callable(function):
        raise TypeError("Create_errhandler: expecting a callable")
    live = _user_handlers.setdefault(kind, set())
    if len(live) >= MAX_USER_ERRHANDLERS:
        raise RuntimeError(f"cannot create more than {MAX_USER_ERRHANDLERS} {kind} handlers")
    handle = Errhandler()
    handle._kind = _Handler(function)  # each creation is a distinct handler
    live.add(handle._kind)
    return handle


class _Handler:
    """A user handler function (a distinct object per Create_errhandler)."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[[Any, int], None]) -> None:
        self.function = function

    def __call__(self, obj: Any, error: int) -> None:
        self.function(obj, error)


def get_errhandler(comm: Any) -> Errhandler:
    """A new handle on the communicator's handler."""
    comm._check()
    return Errhandler(getattr(comm, "_errhandler", ERRORS_RETURN))


def set_errhandler(comm: Any, errhandler: Errhandler) -> None:
    """Make `errhandler` the communicator's (see the module docstring).

    MPI.Exception(ERR_ARG) for ERRHANDLER_NULL, ERR_COMM for COMM_NULL.
    """
    comm._check()
    if not isinstance(errhandler, Errhandler) or not errhandler:
        raise exceptions.Exception(exceptions.ERR_ARG, "not an error handler")
    for name, value in list(vars(comm).items()):  # the wrappers of the previous handler
        if getattr(value, "_errhandler_guard", False):
            delattr(comm, name)
    comm._errhandler = Errhandler(errhandler)
    ctx = getattr(comm, "_ctx", None)
    if isinstance(ctx, int) and ctx >= 0:  # its requests made before now find it
        _by_context[ctx & ~1] = weakref.ref(comm)
    if errhandler._kind is _RETURN:
        return
    cls = type(comm)
    for name in dir(cls):
        if name.startswith("_") or name in _UNGUARDED or not callable(getattr(cls, name)):
            continue
        if isinstance(getattr(cls, name), type):
            continue
        setattr(comm, name, _guard(comm, getattr(comm, name), errhandler._kind))


def call_errhandler(comm: Any, errorcode: int) -> None:
    """Invoke the communicator's handler for `errorcode` (nothing for ERRORS_RETURN)."""
    comm._check()
    _handle(comm, getattr(comm, "_errhandler", ERRORS_RETURN)._kind, int(errorcode), "")


_by_context: dict[int, weakref.ref[Any]] = {}  # p2p context -> its communicator (see below)


def owner_of(op: Any) -> Any:
    """The communicator of an operation's context (sends and receives know theirs) once a
    handler was set on it, else None: the owner of an error of a request made before any
    handler was set (the handler in effect when the error is raised applies, as MPI)."""
    ctx = getattr(op, "ctx", None)
    if ctx is None:
        return None
    ref = _by_context.get(ctx & ~1)
    comm = ref() if ref is not None else None
    if comm is None or comm._engine is None or comm._ctx != ctx & ~1:
        return None  # (a freed communicator's context, reused or not)
    return comm


def call_errhandler_for(owner: Any, errorcode: int, what: str) -> None:
    """Run the current handler of `owner` (a communicator, window, ...) for an error a
    request of it reports at completion; returns normally only for ERRORS_RETURN and user
    handlers (the caller then raises)."""
    _handle(owner, getattr(owner, "_errhandler", ERRORS_RETURN)._kind, errorcode, what)


def _guard(comm: Any, method: Callable[..., Any], kind: Any) -> Callable[..., Any]:
    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            result = method(*args, **kwargs)
        except exceptions.Exception as exc:
            _handle(comm, kind, exc.Get_error_class(), f"{method.__name__}: {exc}")
            raise
        made = result[0] if type(result) is tuple and result else result  # Idup's pair
        if isinstance(made, Request):
            made._owner = comm  # its errors at Wait/Test go through comm's handler
        if made is not comm and made and hasattr(made, "Set_errhandler"):
            set_errhandler(made, comm._errhandler)  # a new communicator inherits it (MPI)
        return result

    run._errhandler_guard = True  # type: ignore[attr-defined]
    return run


def _handle(comm: Any, kind: Any, error: int, what: str) -> None:
    if kind in (_FATAL, _ABORT):
        print(f"MPI error ({kind}) on {comm!r}: {what or exceptions.Get_error_string(error)}",
              file=sys.stderr, flush=True)  # fmt: skip
        abort = getattr(comm, "Abort", None)
        if abort is None:  # a session: the job
            from guest_lib.mpi import MPI

            abort = MPI.COMM_WORLD.Abort
        abort(error or 1)
    elif callable(kind):
        kind(comm, error)
