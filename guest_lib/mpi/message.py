"""Matched probes (mpi4py's `Message`, `Comm.Mprobe/Improbe/mprobe/improbe`).

A matched probe takes the first message that matches (source, tag) on the communicator out
of matching altogether: no later receive or probe can get it, only the `Message` handle,
whose `Recv`/`Irecv`/`recv`/`irecv` hand it over once (the handle then becomes
MESSAGE_NULL). A message from a rank on shared memory is taken from the engine's unexpected
messages once it has arrived whole (its synchronous sender is released then, as a receive
would); one from an mpi4py-routed rank is taken by mpi4py's own matched probe on the
communicator's mirror and received at once. The bytes are kept by the handle until
received. Probing PROC_NULL gives MESSAGE_NO_PROC, whose receives complete at once with a
PROC_NULL status.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from guest_lib.mpi import buffers, constants, exceptions, native
from guest_lib.mpi.handles import Handle, Same, argument
from guest_lib.mpi.matching import RecvOp
from guest_lib.mpi.pickling import loads as _loads
from guest_lib.mpi.request import Request
from guest_lib.mpi.status import Status

_NULL, _NO_PROC, _MATCHED = 0, 1, 2


class Message(Handle):
    """A matched message (see the module docstring).

    Message() is MESSAGE_NULL, Message(m) another handle to m.
    """

    __slots__ = ("_comm", "_data", "_kind", "_source", "_tag")

    def __init__(self, message: Message | None = None) -> None:
        self._kind, self._comm, self._data, self._source, self._tag = _NULL, None, b"", -1, -1
        message = argument(message, Message)
        if message is not None:
            self._kind, self._comm, self._data = message._kind, message._comm, message._data
            self._source, self._tag = message._source, message._tag

    def __bool__(self) -> bool:
        return self._kind != _NULL

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        if self._kind != _MATCHED or other._kind != _MATCHED:
            return self._kind == other._kind
        return self._data is other._data

    def _key(self) -> Hashable:
        return Same(self._data) if self._kind == _MATCHED else self._kind

    def __reduce__(self) -> Any:
        if self is MESSAGE_NULL:
            return "MESSAGE_NULL"
        if self is MESSAGE_NO_PROC:
            return "MESSAGE_NO_PROC"
        if self._kind == _MATCHED:
            raise ValueError("cannot pickle a matched message")
        return type(self), (MESSAGE_NULL if self._kind == _NULL else MESSAGE_NO_PROC,)

    def __repr__(self) -> str:
        names = {_NULL: "MESSAGE_NULL", _NO_PROC: "MESSAGE_NO_PROC"}
        return f"<Message {names.get(self._kind, f'from {self._source} tag {self._tag}')}>"

    def _release(self) -> None:
        """Free the handle: a matched message not received is dropped; the handle becomes null."""
        self._nullify()

    # ------------------------------------------------------------------ receives
    def _take(self) -> RecvOp:
        """Return the message as a completed receive op; this handle becomes MESSAGE_NULL.

        Unless it is the predefined MESSAGE_NO_PROC. MPI.Exception(ERR_REQUEST) on MESSAGE_NULL.
        """
        if self._kind == _NULL:
            raise exceptions.Exception(exceptions.ERR_REQUEST, "receive of MESSAGE_NULL")
        op = RecvOp(0, constants.PROC_NULL, constants.ANY_TAG, None)
        op.begin(constants.PROC_NULL, constants.ANY_TAG)
        if self._kind == _MATCHED:
            op.begin(self._source, self._tag)
            op.write(0, self._data)
        op.finish()
        if self is not MESSAGE_NO_PROC:
            self._kind, self._comm, self._data = _NULL, None, b""
        return op

    def _into(self, op: RecvOp, buf: Any) -> None:
        """Copy the message's bytes (op.obj) into `buf`.

        ERR_TRUNCATE (op.error) when they do not fit, the prefix then in `buf`.
        """
        spec = buffers.parse(buf, writable=True, deferred=True)
        data = op.obj or b""
        n = min(len(data), len(spec.view))
        spec.view[:n] = data[:n]
        if len(data) > len(spec.view):
            op.error = exceptions.ERR_TRUNCATE
        op.count = n
        if spec.unpack is not None:
            spec.unpack()

    def Recv(self, buf: Any, status: Status | None = None) -> None:
        """Receive the message into `buf` (a message spec); fill `status`.

        MPI.Exception(ERR_TRUNCATE) if it does not fit.
        """
        self.Irecv(buf).Wait(status)

    def Irecv(self, buf: Any) -> Request:
        """Start the receive of the message into `buf`; return the Request.

        It completes at once (the bytes are here); the Request reports the status.
        """
        engine = self._comm._engine if self._comm is not None else None
        rank_of = self._comm._rank_of if self._comm is not None else None
        op = self._take()
        if op.source != constants.PROC_NULL:
            self._into(op, buf)
        return Request(op, engine, rank_of)

    def recv(self, status: Status | None = None) -> Any:
        """Receive the message and return the object it holds (None for MESSAGE_NO_PROC)."""
        return self.irecv().wait(status)

    def irecv(self) -> Request:
        """A Request whose wait() returns the object the message holds."""
        rank_of = self._comm._rank_of if self._comm is not None else None
        engine = self._comm._engine if self._comm is not None else None
        op = self._take()
        return Request(op, engine, rank_of, lambda done: _loads(done.obj) if done.obj else None)

    # ------------------------------------------------------------------ probes (class forms)
    @classmethod
    def Probe(
        cls,
        comm: Any,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> Message:
        """Block until a message matching (source, tag) on `comm` can be taken; take it.

        As Comm.Mprobe.
        """
        return mprobe(comm, source, tag, status)

    @classmethod
    def Iprobe(
        cls,
        comm: Any,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> Message | None:
        """Take a message matching (source, tag) on `comm` if one matches now, else None.

        As Comm.Improbe.
        """
        return improbe(comm, source, tag, status)

    probe = Probe
    iprobe = Iprobe


MESSAGE_NULL = Message()
MESSAGE_NO_PROC = Message()
MESSAGE_NO_PROC._kind = _NO_PROC


def _matched(comm: Any, source: int, tag: int, data: bytes) -> Message:
    message = Message()
    message._kind, message._comm, message._data = _MATCHED, comm, data
    message._source, message._tag = source, tag
    return message


def _take(comm: Any, source: int, tag: int, status: Status | None) -> Message | None:
    """The matched message (source, tag) if one can be taken now, else None."""
    engine = comm._check()
    if source == constants.PROC_NULL:
        if status is not None:
            status._set(constants.PROC_NULL, constants.ANY_TAG, 0)
        return Message(MESSAGE_NO_PROC)
    src = constants.ANY_SOURCE if source == constants.ANY_SOURCE else comm._group[source]
    entry = engine.find_unexpected(comm._ctx, src, tag)
    if entry is not None:
        if not entry.complete:
            return None
        rank = comm._sender_rank(entry)
        with engine.lock:  # (another thread's progress may purge it meanwhile)
            if entry not in engine.unexpected:
                return None
            engine.unexpected.remove(entry)
            engine.release(entry)
        data = b"".join(entry.parts)
        if status is not None:
            status._set(rank, entry.tag, len(data))
        return _matched(comm, entry.src, entry.tag, data)
    route = comm._src_route[source]
    if route.local:
        return None
    return _take_mpi(comm, source, tag, status)


def _take_mpi(comm: Any, source: int, tag: int, status: Status | None) -> Message | None:
    """mpi4py's matched probe on the communicator's mirror, the message received at once."""
    _M = native.MPI()
    mstatus = _M.Status()
    msrc = _M.ANY_SOURCE if source == constants.ANY_SOURCE else source
    mtag = _M.ANY_TAG if tag == constants.ANY_TAG else tag
    message = comm._mirror.improbe(msrc, mtag, mstatus)
    if message is None:
        return None
    scratch = bytearray(mstatus.Get_count(_M.BYTE))
    message.Recv([scratch, _M.BYTE])
    rank = mstatus.Get_source()
    if status is not None:
        status._set(rank, mstatus.Get_tag(), len(scratch))
    return _matched(comm, comm._group[rank], mstatus.Get_tag(), bytes(scratch))


def mprobe(
    comm: Any,
    source: int = constants.ANY_SOURCE,
    tag: int = constants.ANY_TAG,
    status: Status | None = None,
) -> Message:
    """Comm.Mprobe: block until a message matching (source, tag) can be taken; take it."""
    source = comm._source(source)
    tag = comm._recv_tag(tag)
    engine = comm._check()
    found: list[Message] = []

    def taken() -> bool:  # (called again after it held: it must keep holding)
        if not found:
            message = _take(comm, source, tag, status)
            if message is not None:
                found.append(message)
        return bool(found)

    if not taken():
        watch = comm._route[source].peer if source >= 0 else -1
        engine.wait_until(taken, watch)
    return found[0]


def improbe(
    comm: Any,
    source: int = constants.ANY_SOURCE,
    tag: int = constants.ANY_TAG,
    status: Status | None = None,
) -> Message | None:
    """Take the matched message if one matches now, else return None (Comm.Improbe).

    A progress pass runs first.
    """
    source = comm._source(source)
    tag = comm._recv_tag(tag)
    engine = comm._check()
    message = _take(comm, source, tag, status)
    if message is None:
        engine.progress()
        message = _take(comm, source, tag, status)
    return message
