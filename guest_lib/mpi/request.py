"""Requests: handles of nonblocking operations, with mpi4py's Wait/Test family.

A Request wraps one engine `Op`. `Wait`/`Test` drive the engine's progress (that is the only
place progress happens besides blocking calls), fill a Status if given, and turn the request
into a null request once complete. A receive whose message did not fit raises
`MPI.Exception` with ERR_TRUNCATE from Wait/Test (the status then says so too), after the
error handler of the request's communicator ran (ERRORS_ARE_FATAL aborts the job there). Lowercase
`wait`/`test` also return the received object of an object receive (None for sends).
`REQUEST_NULL` is a Request with no operation: waiting on it returns at once with an empty
status.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from guest_lib.mpi import constants, exceptions, pickling
from guest_lib.mpi.engine import Engine
from guest_lib.mpi.handles import Handle, Same
from guest_lib.mpi.matching import Op, RecvOp
from guest_lib.mpi.status import Status
from ivshmem_comm import ring


class Request(Handle):
    """A nonblocking operation in flight (or a null request)."""

    # _owner: the communicator (window, ...) whose error handler applies to an error this
    # request reports at completion; None applies ERRORS_RETURN (raise only). Set by
    # errhandler's guard on the requests its calls return.
    # _cell: the state shared by every handle on a persistent request (persistent._Cell),
    # None for the others.
    __slots__ = ("_cell", "_engine", "_finish", "_op", "_owner", "_rank_of")

    def __init__(
        self,
        op: Op | Request | None = None,
        engine: Engine | None = None,
        rank_of: dict[int, int] | None = None,
        finish: Callable[[Op], Any] | None = None,
    ) -> None:
        """Make a new handle on the request of `request` (`Request(request)`), or a null one.

        mpi4py's form; Request() is a null request. On a persistent request it is the same request,
        active or not, as a Prequest handle on it. The other form is internal: the engine `op`.
        """
        self._cell: Any = None
        self._owner: Any = None
        if isinstance(op, Request):
            source = op
            op, engine, rank_of = source._op, source._engine, source._rank_of
            finish = source._finish
            self._owner = source._owner
            if source._cell is not None and source:
                self._cell = source._cell
                source._cell.aliases.append(self)
        elif op is not None and not isinstance(op, Op):
            raise TypeError(f"Request: expecting a Request, got {type(op).__name__}")
        self._op: Op | None = op
        self._engine: Engine | None = engine
        self._rank_of: dict[int, int] | None = rank_of
        self._finish: Callable[[Op], Any] | None = finish

    # ------------------------------------------------------------------ internals
    def _fill(self, status: Status | None, handler: bool = True) -> Any:
        """Complete the request: fill `status`, raise its error or return its result object.

        The request becomes null. An error raises MPI.Exception, after the handler of the request's
        communicator ran (unless `handler` is False: a call completing several requests runs it
        once, see `_failed`).
        """
        op = self._op
        if op is None:
            if status is not None:
                status._set(constants.ANY_SOURCE, constants.ANY_TAG, 0)
            return None
        source = op.source
        if self._rank_of is not None and source >= 0:
            source = self._rank_of.get(source, source)
        if status is not None:
            status._set(source, op.tag, op.count, op.error)
            status.cancelled = op.cancelled
        finish = self._finish
        self._op = None
        if self._cell is not None:  # a persistent request: inactive on every handle
            self._cell.done(op)
        if op.error:
            what = getattr(op, "reason", "") or (  # a failed stage says why (StagedOp)
                f"receive of {op.count} bytes from rank {source} (tag {op.tag})"
            )
            if handler:  # its communicator's handler first: abort, or call the user's
                from guest_lib.mpi import errhandler  # it imports this module

                owner = self._owner or errhandler.owner_of(op)
                if owner is not None:
                    errhandler.call_errhandler_for(owner, op.error, what)
            raise exceptions.Exception(op.error, what)
        if op.cancelled:
            return None
        if finish is not None:
            return finish(op)
        return None

    def _progress(self) -> None:
        if self._engine is not None:
            self._engine.progress()

    def _complete_alone(self) -> None:
        """Complete the operation here if it waits best on its own, for Waitall.

        area.AreaRequest's does (a collective's round, spun on and slept on in C, where the
        engine would nap on the doorbell), nothing filled nor raised; a plain request waits
        with the others (the engine's wait_until): nothing here.
        """

    # ------------------------------------------------------------------ single
    def Wait(self, status: Status | None = None) -> bool:
        """Block until complete; always True. Raises MPI.Exception (e.g. ERR_TRUNCATE)."""
        if self._op is not None and not self._op.done:
            assert self._engine is not None
            self._engine.wait(self._op)
        self._fill(status)
        return True

    def wait(self, status: Status | None = None) -> Any:
        """Block until complete; return the received object (None for a send)."""
        if self._op is not None and not self._op.done:
            assert self._engine is not None
            self._engine.wait(self._op)
        return self._fill(status)

    def Test(self, status: Status | None = None) -> bool:
        """Make progress once; True (and the request becomes null) iff complete."""
        op = self._op
        if op is not None and not op.done:
            self._progress()
            if not op.done:
                return False
        self._fill(status)
        return True

    def test(self, status: Status | None = None) -> tuple[bool, Any]:
        """Return (flag, object): the object of a completed object receive, else None."""
        op = self._op
        if op is not None and not op.done:
            self._progress()
            if not op.done:
                return False, None
        return True, self._fill(status)

    def Get_status(self, status: Status | None = None) -> bool:
        """True iff complete, without freeing the request (a null one: an empty status)."""
        op = self._op
        if op is None:
            if status is not None:
                status._set(constants.ANY_SOURCE, constants.ANY_TAG, 0)
            return True
        if not op.done:
            self._progress()
        if op.done and status is not None:
            source = op.source
            if self._rank_of is not None and source >= 0:
                source = self._rank_of.get(source, source)
            status._set(source, op.tag, op.count, op.error)
        return op.done

    def get_status(self, status: Status | None = None) -> bool:
        """Return True iff the request is complete, `status` then filled; nothing is freed."""
        return self.Get_status(status)

    @classmethod
    def Get_status_all(cls, requests: Sequence[Request], statuses: Any = None) -> bool:
        """Return True iff every request is complete (null ones count as complete).

        The statuses are then filled; no request is freed (MPI-4.1).
        """
        engine = cls._engine_of(requests)
        if engine is not None:
            engine.progress()
        if not all(r._op is None or r._op.done for r in requests):
            return False
        for index, request in enumerate(requests):
            request.Get_status(_status_at(statuses, index))
        return True

    get_status_all = Get_status_all

    @classmethod
    def Get_status_any(
        cls, requests: Sequence[Request], status: Status | None = None
    ) -> tuple[int, bool]:
        """Return (index, True) of a complete request, its status filled and the request not freed.

        (UNDEFINED, True) if all are null; (UNDEFINED, False) if none is complete.
        """
        engine = cls._engine_of(requests)
        if engine is not None:
            engine.progress()
        active = [(i, r) for i, r in enumerate(requests) if r._op is not None]
        for index, request in active:
            if request.Get_status(status):
                return index, True
        if not active and status is not None:
            status._set(constants.ANY_SOURCE, constants.ANY_TAG, 0)
        return constants.UNDEFINED, not active

    get_status_any = Get_status_any

    @classmethod
    def Get_status_some(cls, requests: Sequence[Request], statuses: Any = None) -> list[int] | None:
        """Return the indices of the complete requests (statuses[k] filled for the k-th).

        None is freed; None if all are null (MPI-4.1).
        """
        if all(r._op is None for r in requests):
            return None
        engine = cls._engine_of(requests)
        if engine is not None:
            engine.progress()
        done = [i for i, r in enumerate(requests) if r._op is not None and r._op.done]
        for k, index in enumerate(done):
            requests[index].Get_status(_status_at(statuses, k))
        return done

    get_status_some = Get_status_some

    def Cancel(self) -> None:
        """Cancel a receive not matched yet (its status then says cancelled); else no-op.
        MPI.Exception(ERR_REQUEST) on a null request."""
        self._check_live("Cancel")
        if self._op is not None and self._engine is not None:
            self._op.cancel(self._engine)

    cancel = Cancel

    def Free(self) -> None:
        """Forget the request; the operation still completes in the background.
        MPI.Exception(ERR_REQUEST) on a null request."""
        self._check_live("Free")
        self._op = None
        if self._cell is not None:  # a handle on a persistent request frees that request
            self._cell.free()

    def _check_live(self, call: str) -> None:
        if not self:
            raise exceptions.Exception(exceptions.ERR_REQUEST, f"Request.{call} on a null request")

    def __reduce__(self) -> Any:
        """Pickle REQUEST_NULL by name, another null handle as a null handle of its class.

        Any other request: ValueError (as mpi4py).
        """
        if self is REQUEST_NULL:
            return "REQUEST_NULL"
        if not self:
            return (type(self), ())
        raise ValueError("cannot pickle a request")

    def __bool__(self) -> bool:
        """False for a null request (a persistent request is not null until freed)."""
        cell = self._cell
        return self._op is not None or (cell is not None and cell.starter is not None)

    def __eq__(self, other: object) -> bool:
        """Handles on one request are equal, and null requests are."""
        if not isinstance(other, Request):
            return NotImplemented
        if self._cell is None and other._cell is None:
            return self._op is other._op
        return self._cell is other._cell or (not self and not other)

    def _key(self) -> Hashable:
        return Same(self._op if self._cell is None else self._cell)

    # ------------------------------------------------------------------ many
    @staticmethod
    def _engine_of(requests: Sequence[Request]) -> Engine | None:
        for request in requests:
            if request._engine is not None:
                return request._engine
        return None

    @classmethod
    def Waitall(cls, requests: Sequence[Request], statuses: list[Status] | None = None) -> bool:
        """Wait for every request; fill `statuses` (extended as needed). Always True."""
        cls.waitall(requests, statuses)
        return True

    @classmethod
    def waitall(
        cls, requests: Sequence[Request], statuses: list[Status] | None = None
    ) -> list[Any]:
        """Wait for every request; return their objects (None for sends)."""
        plain = statuses is None  # (no status asked)
        if plain and _nulled(requests):  # (sends written at once, say)
            return [None] * len(requests)
        engine = cls._engine_of(requests)
        if engine is not None:
            all_done = _all_done(requests)
            if not all_done():
                _complete_alone(requests)
                engine.wait_until(all_done)
                if plain and _nulled(requests):
                    return [None] * len(requests)
        results: list[Any] = []
        failed: list[tuple[Any, exceptions.Exception]] = []
        for index, request in enumerate(requests):
            op = request._op
            if (  # a plain request complete without error and no status asked: made null
                plain
                and op is not None
                and type(request) is Request
                and request._cell is None
                and not (op.error or op.cancelled)
            ):
                finish = request._finish
                if finish is None:
                    request._op = None
                    results.append(None)
                    continue
                if finish is unpickle:  # an object receive: _fill's end, without its calls
                    request._op = None
                    results.append(pickling.loads(op.obj))
                    continue
            results.append(_fill_noting(request, _status_at(statuses, index), failed))
        if failed:
            _failed(failed, len(requests), "Waitall")
        return results

    @classmethod
    def Testall(cls, requests: Sequence[Request], statuses: list[Status] | None = None) -> bool:
        """True (and all complete, statuses filled) iff every request is done."""
        flag, _ = cls.testall(requests, statuses)
        return flag

    @classmethod
    def testall(
        cls, requests: Sequence[Request], statuses: list[Status] | None = None
    ) -> tuple[bool, list[Any] | None]:
        """Return (True, objects) if every request is complete, else (False, None).

        The objects are those of the object receives (None for the others); the completed requests
        become null, their errors raise as in waitall.
        """
        engine = cls._engine_of(requests)
        if engine is not None:
            engine.progress()
        if not all(r._op is None or r._op.done for r in requests):
            return False, None
        return True, cls.waitall(requests, statuses)

    @classmethod
    def Waitany(cls, requests: Sequence[Request], status: Status | None = None) -> int:
        """Index of a request that completed (UNDEFINED if all are null)."""
        index, _ = cls.waitany(requests, status)
        return index

    @classmethod
    def waitany(cls, requests: Sequence[Request], status: Status | None = None) -> tuple[int, Any]:
        """Wait for one request to complete; return (its index, its object).

        (UNDEFINED, None) at once if all are null. Its error raises MPI.Exception.
        """
        active = [(i, r) for i, r in enumerate(requests) if r._op is not None]
        if not active:
            if status is not None:
                status._set(constants.ANY_SOURCE, constants.ANY_TAG, 0)
            return constants.UNDEFINED, None
        engine = cls._engine_of(requests)
        found: list[int] = []

        def any_done() -> bool:
            for i, r in active:
                if r._op is not None and r._op.done:
                    found.append(i)
                    return True
            return False

        if engine is not None:
            engine.wait_until(any_done)
        else:
            any_done()
        index = found[0]
        return index, requests[index]._fill(status)

    @classmethod
    def Testany(cls, requests: Sequence[Request], status: Status | None = None) -> tuple[int, bool]:
        """Return (index, flag) of a completed request, if any.

        Flag True with the index of a completed request (UNDEFINED when all are null), False with
        UNDEFINED when none is complete yet.
        """
        index, flag, _ = cls._testany(requests, status)
        return index, flag

    @classmethod
    def testany(
        cls, requests: Sequence[Request], status: Status | None = None
    ) -> tuple[int, bool, Any]:
        """Return (index, flag, object), as Testany, with the completed request's object."""
        return cls._testany(requests, status)

    @classmethod
    def _testany(cls, requests: Sequence[Request], status: Status | None) -> tuple[int, bool, Any]:
        engine = cls._engine_of(requests)
        if engine is not None:
            engine.progress()
        active = False
        for i, r in enumerate(requests):
            if r._op is None:
                continue
            active = True
            if r._op.done:
                return i, True, r._fill(status)
        if not active:
            if status is not None:
                status._set(constants.ANY_SOURCE, constants.ANY_TAG, 0)
            return constants.UNDEFINED, True, None
        return constants.UNDEFINED, False, None

    @classmethod
    def Waitsome(
        cls, requests: Sequence[Request], statuses: list[Status] | None = None
    ) -> list[int] | None:
        """Indices of the requests that completed (at least one); None if all are null.
        `statuses[k]` is filled for the k-th index."""
        return cls._some(requests, statuses, True)[0]

    @classmethod
    def Testsome(
        cls, requests: Sequence[Request], statuses: list[Status] | None = None
    ) -> list[int] | None:
        """As Waitsome, but without waiting: [] when none is complete yet."""
        return cls._some(requests, statuses, False)[0]

    @classmethod
    def waitsome(
        cls, requests: Sequence[Request], statuses: list[Status] | None = None
    ) -> tuple[list[int] | None, list[Any] | None]:
        """Wait for at least one request; return (indices, objects) of those that completed.

        The object of each, None for sends; (None, None) if all are null.
        """
        return cls._some(requests, statuses, True)

    @classmethod
    def testsome(
        cls, requests: Sequence[Request], statuses: list[Status] | None = None
    ) -> tuple[list[int] | None, list[Any] | None]:
        """As waitsome, but without waiting: ([], []) when none is complete yet."""
        return cls._some(requests, statuses, False)

    @classmethod
    def _some(
        cls, requests: Sequence[Request], statuses: list[Status] | None, wait: bool
    ) -> tuple[list[int] | None, list[Any] | None]:
        if all(r._op is None for r in requests):
            return None, None
        engine = cls._engine_of(requests)
        if engine is not None:
            if wait:
                engine.wait_until(lambda: any(r._op is not None and r._op.done for r in requests))
            else:
                engine.progress()
        indices = [i for i, r in enumerate(requests) if r._op is not None and r._op.done]
        failed: list[tuple[Any, exceptions.Exception]] = []
        results = [
            _fill_noting(requests[i], _status_at(statuses, k), failed)
            for k, i in enumerate(indices)
        ]
        if failed:
            _failed(failed, len(indices), "Waitsome" if wait else "Testsome")
        return indices, results

    def __repr__(self) -> str:
        return "<Request null>" if self._op is None else f"<Request {type(self._op).__name__}>"


_new_handle = object.__new__  # (Handle.__new__ and __init__ skipped: see request_of)
R = TypeVar("R", bound=Request)


def request_of(
    op: Op,
    engine: Engine | None,
    rank_of: dict[int, int] | None = None,
    finish: Callable[[Op], Any] | None = None,
    kind: type[R] = Request,  # type: ignore[assignment]
) -> R:
    """kind(op, engine, rank_of, finish) (`kind` Request or a subclass with no fields of
    its own), the internal form, at a third of its cost: the per-message calls (Isend,
    Irecv) make one per message. Same object, same fields."""
    request = _new_handle(kind)
    request._cell = request._owner = None
    request._op = op
    request._engine = engine
    request._rank_of = rank_of
    request._finish = finish
    return request


def _null_done(requests: Sequence[Request]) -> bool:
    """Waitall's end when every request completed plainly, in one loop (no status asked):
    True iff `requests` is a list or tuple whose every request is null or of exactly type
    Request with no _finish and no _cell, its op done without error and not cancelled; then
    each one is made null, as the general loop leaves such a request. False: nothing
    changed. The Python reference of the C ring.null_done (`_nulled` is the one used)."""
    if type(requests) is not list and type(requests) is not tuple:
        return False
    for request in requests:
        if type(request) is not Request:
            return False
        op = request._op
        if op is not None and not (
            op.done
            and request._finish is None
            and request._cell is None
            and not (op.error or op.cancelled)
        ):
            return False
    for request in requests:
        request._op = None
    return True


def _fill_noting(
    request: Request, status: Status | None, failed: list[tuple[Any, exceptions.Exception]]
) -> Any:
    """request._fill(status) without its handler: an error is noted in `failed` with the
    communicator whose handler applies (None: none), and the result is None."""
    op = request._op
    try:
        return request._fill(status, handler=False)
    except exceptions.Exception as exc:
        from guest_lib.mpi import errhandler  # it imports this module

        failed.append((request._owner or errhandler.owner_of(op), exc))
        return None


def _failed(failed: list[tuple[Any, exceptions.Exception]], total: int, call: str) -> None:
    """The end of a call that completed several requests, some with errors (their statuses
    hold each one's error class): as MPI, the handler of the first failing request's
    communicator runs once with ERR_IN_STATUS, then MPI.Exception(ERR_IN_STATUS) is
    raised."""
    what = f"{call}: {len(failed)} of {total} requests failed; the first: {failed[0][1]}"
    owner = next((owner for owner, _ in failed if owner is not None), None)
    if owner is not None:
        from guest_lib.mpi import errhandler  # it imports this module

        errhandler.call_errhandler_for(owner, exceptions.ERR_IN_STATUS, what)
    raise exceptions.Exception(exceptions.ERR_IN_STATUS, what)


def _status_at(statuses: Sequence[Status] | None, index: int) -> Status | None:
    """statuses[index]: a list is extended with new statuses as needed; another sequence
    (a tuple) has no status past its end (None)."""
    if statuses is None:
        return None
    if isinstance(statuses, list):
        while len(statuses) <= index:
            statuses.append(Status())
    return statuses[index] if index < len(statuses) else None


def unpickle(op: Op) -> Any:
    """Finish of an object receive: the object from the received bytes."""
    return pickling.loads(op.obj)


REQUEST_NULL = Request()

# The C path's request objects (ivshmem_comm/_p2preq.c): made and read at the slots of the
# classes registered here; their Python references on the pure-Python path.
if ring.p2p_types is not None:
    ring.p2p_types(Request, RecvOp, RecvOp(0, constants.ANY_SOURCE, constants.ANY_TAG, None))
new_request: Callable[[Op, Engine | None, dict[int, int] | None, Callable[[Op], Any] | None], Any]
new_request = ring.new_request or request_of
"""request_of(op, engine, rank_of, finish) for a Request, in C on the C path."""
_nulled: Callable[[Sequence[Request]], bool] = ring.null_done or _null_done


def _first_pending_py(requests: Sequence[Request], start: int) -> int:
    """The index of the first request of `requests` from `start` on whose op is not None
    and not done; len(requests) if none. The Python reference of the C ring.first_pending
    (which takes a list or tuple)."""
    for index in range(max(start, 0), len(requests)):
        op = requests[index]._op
        if op is not None and not op.done:
            return index
    return len(requests)


def _pending_of(requests: Sequence[Request]) -> Callable[[Sequence[Request], int], int]:
    """The first_pending function for `requests`: the C one for a list or tuple."""
    if ring.first_pending is not None and type(requests) in (list, tuple):
        return ring.first_pending
    return _first_pending_py


def _complete_alone(requests: Sequence[Request]) -> None:
    """Waitall's waits, in order, for the first pending requests while each is one that
    waits best on its own (Request._complete_alone: a nonblocking collective of the area);
    the others wait together with the engine after (a plain list costs one look)."""
    pending = _pending_of(requests)
    index = pending(requests, 0)
    while index < len(requests) and requests[index].__class__ is not Request:
        requests[index]._complete_alone()
        index = pending(requests, index + 1)


def _all_done(requests: Sequence[Request]) -> Callable[[], bool]:
    """A predicate: every request of `requests` is complete (its op done, or null). It
    remembers how far the requests are known complete, so the engine's progress pass, which
    asks before taking each message, costs O(1) per ask on a window completing in order (not
    O(len(requests)) per message taken)."""
    first = 0
    size = len(requests)
    pending = _pending_of(requests)

    def all_done() -> bool:
        nonlocal first
        first = pending(requests, first)
        return first >= size

    return all_done
