"""Persistent requests (`Send_init`, `Recv_init`, `Prequest.Start`) and `Isendrecv`.

A `Prequest` keeps what a nonblocking call needs (the parsed buffer view, peer, tag,
context) from its `*_init` call, and `Start` begins one such operation: the request is then
active until a Wait/Test completes it, when it becomes inactive again (not null: it can be
started any number of times) until `Free`, which makes it the null request. An inactive
persistent request counts as null in Waitany/Waitsome/Testall... (MPI's rule): waiting
on it returns at once with an empty status.

`Isendrecv`/`Isendrecv_replace` start the receive and the send at once and give one
request that completes when both have (its status is the receive's).

The functions here are methods of `Comm` (bound there), written against its internals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from guest_lib.mpi import buffers, constants, exceptions, ops
from guest_lib.mpi.engine import Op, StagedOp
from guest_lib.mpi.request import Request

if TYPE_CHECKING:
    from collections.abc import Iterator

    from guest_lib.mpi.comm import Comm


class _Cell:
    """What every handle on one persistent request shares (MPI keeps it behind the handle):
    how to start it, its operation while active (None when inactive), and for a
    partitioned request its partitioned side. `aliases`: the plain `Request(preq)` handles
    on it, whose fields are kept equal to these."""

    __slots__ = ("aliases", "engine", "finish", "op", "owner", "part", "rank_of", "starter")

    def __init__(self, starter: Callable[[], Request] | None, part: Any = None) -> None:
        self.starter = starter
        self.part = part
        self.op: Op | None = None
        self.engine: Any = None
        self.rank_of: dict[int, int] | None = None
        self.finish: Callable[[Op], Any] | None = None
        self.owner: Any = None
        self.aliases: list[Request] = []

    def put(self, name: str, value: Any) -> None:
        """Set field `name` (op, engine, rank_of, finish, owner) here and on the aliases."""
        setattr(self, name, value)
        for alias in self.aliases:
            setattr(alias, "_" + name, value)

    def done(self, op: Op) -> None:
        """The active operation `op` completed through some handle: inactive again."""
        if self.op is op:
            self.put("op", None)

    def free(self) -> None:
        """Freed: every handle on it is the null request."""
        if self.part is not None:
            self.part.free()
        self.starter = self.part = None
        self.put("op", None)
        self.aliases = []


def _shared(name: str) -> property:
    """A Request field of a Prequest, kept in its cell (so shared by its handles)."""

    def get(self: Prequest) -> Any:
        return getattr(self._cell, name)

    def put(self: Prequest, value: Any) -> None:
        self._cell.put(name, value)

    return property(get, put)


class Prequest(Request):
    """A persistent request; see the module docstring.

    Its fields live in a cell shared by every handle on the request (`Prequest(preq)`,
    `Request(preq)`, `fromhandle`).
    """

    __slots__ = ()

    _op = _shared("op")
    _engine = _shared("engine")
    _rank_of = _shared("rank_of")
    _finish = _shared("finish")
    _owner = _shared("owner")

    def __init__(self, starter: Callable[[], Request] | Request | None = None) -> None:
        """Make another handle on a persistent request (`Prequest(preq)`).

        Prequest(request) of another kind: a null request if it is null, else TypeError (as mpi4py).
        """
        if isinstance(starter, Request) and starter._cell is not None:
            self._cell = starter._cell  # mpi4py's Prequest(preq): the same request
        elif isinstance(starter, Request):
            if starter:
                raise TypeError("expecting a persistent request")
            self._cell = _Cell(None)
        else:
            self._cell = _Cell(starter)

    @classmethod
    def partitioned(cls, part: Any) -> Prequest:
        """A partitioned request over `part` (a partitioned.PartSend or PartRecv)."""
        request = cls(part.start)
        request._cell.part = part
        return request

    @property
    def _starter(self) -> Callable[[], Request] | None:
        return self._cell.starter

    @_starter.setter
    def _starter(self, starter: Callable[[], Request] | None) -> None:
        self._cell.starter = starter

    def Start(self) -> None:
        """Begin the operation.

        MPI.Exception(ERR_REQUEST) if the request is freed (null) or still active.
        """
        cell = self._cell
        if cell.starter is None:
            raise exceptions.Exception(exceptions.ERR_REQUEST, "start of a null request")
        if cell.op is not None:
            raise exceptions.Exception(exceptions.ERR_REQUEST, "start of an active request")
        started = cell.starter()
        cell.put("engine", started._engine)
        cell.put("rank_of", started._rank_of)
        cell.put("finish", started._finish)
        cell.put("op", started._op)

    start = Start

    @classmethod
    def Startall(cls, requests: Sequence[Prequest]) -> None:
        """Start every request of the list (errors as Start, at the first bad one)."""
        for request in requests:
            request.Start()

    startall = Startall

    def Free(self) -> None:
        """Make this the null request (with every handle on it).

        An operation still active completes in the background. MPI.Exception(ERR_REQUEST) on a null
        request.
        """
        self._check_live("Free")
        self._cell.free()

    # ------------------------------------------------------------------ partitioned
    def _part(self, call: str) -> Any:
        """Return the partitioned side of an active partitioned request.

        MPI.Exception(ERR_REQUEST) for any other request.
        """
        part = self._cell.part
        if part is None or self._cell.op is None:
            raise exceptions.Exception(
                exceptions.ERR_REQUEST, f"{call} needs an active partitioned request"
            )
        return part

    def Pready(self, partition: int) -> None:
        """Mark partition `partition` of a partitioned send ready: it is sent now.
        MPI.Exception: ERR_REQUEST unless this is an active partitioned send, ERR_ARG for a
        partition out of range or ready already in this round."""
        self._part("Pready").ready([partition])

    def Pready_range(self, partition_low: int, partition_high: int) -> None:
        """Pready of partitions `partition_low` .. `partition_high` (both included)."""
        self._part("Pready_range").ready(range(partition_low, partition_high + 1))

    def Pready_list(self, partitions: Sequence[int]) -> None:
        """Pready of every partition of the list."""
        self._part("Pready_list").ready(list(partitions))

    def Parrived(self, partition: int) -> bool:
        """Return whether partition `partition` of a partitioned receive has arrived.

        Makes progress first; True on an inactive one (its last round is all there). MPI.Exception:
        ERR_REQUEST on a null request or a partitioned send, ERR_ARG for a partition out of range.
        """
        part = self._cell.part
        if part is None:
            raise exceptions.Exception(exceptions.ERR_REQUEST, "Parrived: not partitioned")
        return bool(part.arrived(partition))

    def __repr__(self) -> str:
        state = "null" if not self else "active" if self._cell.op else "inactive"
        return f"<Prequest {state}>"


def _send_init(comm: Comm, buf: Any, dest: int, tag: int, sync: bool) -> Prequest:
    dest = comm._dest(dest)
    tag = comm._send_tag(tag)
    engine = comm._check()
    view = buffers.parse(buf).view
    if not isinstance(buf, list | tuple):  # a plain buffer: the view is its memory
        return Prequest(lambda: Request(comm._isend_op(view, dest, tag, comm._ctx, sync), engine))

    def start() -> Request:  # a spec is resolved at each start (a derived type packs anew)
        data = buffers.parse(buf).view
        return Request(comm._isend_op(data, dest, tag, comm._ctx, sync), engine)

    return Prequest(start)


def send_init(comm: Comm, buf: Any, dest: int, tag: int = 0) -> Prequest:
    """A persistent standard send of `buf` (message spec, read at each Start) to `dest`."""
    return _send_init(comm, buf, dest, tag, False)


def ssend_init(comm: Comm, buf: Any, dest: int, tag: int = 0) -> Prequest:
    """A persistent synchronous send: each one completes once its receive has started."""
    return _send_init(comm, buf, dest, tag, True)


def recv_init(
    comm: Comm, buf: Any, source: int = constants.ANY_SOURCE, tag: int = constants.ANY_TAG
) -> Prequest:
    """Create a persistent receive into `buf` (Comm.Recv_init).

    Each completion raises MPI.Exception(ERR_TRUNCATE) from Wait/Test if its message was longer than
    the buffer (as Irecv).
    """
    source = comm._source(source)
    tag = comm._recv_tag(tag)
    engine = comm._check()
    spec = buffers.parse(buf, writable=True, deferred=True)
    finish = unpacker(spec.unpack)
    return Prequest(
        lambda: Request(
            comm._irecv_op(spec.view, source, tag, comm._ctx), engine, comm._rank_of, finish
        )
    )


def unpacker(unpack: Callable[[], None] | None) -> Callable[[Op], None] | None:
    """A Request finish running a derived datatype's `unpack` (None: nothing to run)."""
    if unpack is None:
        return None

    def finish(op: Op) -> None:
        unpack()

    return finish


def isendrecv(
    comm: Comm,
    sendbuf: Any,
    dest: int,
    sendtag: int = 0,
    recvbuf: Any = None,
    source: int = constants.ANY_SOURCE,
    recvtag: int = constants.ANY_TAG,
) -> Request:
    """Start a Sendrecv without waiting; return one request for both (Comm.Isendrecv).

    It completes when both the send and the receive are; its status is the receive's (ERR_TRUNCATE
    from Wait/Test as Irecv).
    """
    _, dest, source, sendtag, recvtag = comm._sendrecv_args(dest, source, sendtag, recvtag)
    rview = buffers.parse(recvbuf, writable=True).view
    sview = buffers.parse(sendbuf).view
    return _pair(comm, rview, sview, dest, sendtag, source, recvtag)


def isendrecv_replace(
    comm: Comm,
    buf: Any,
    dest: int,
    sendtag: int = 0,
    source: int = constants.ANY_SOURCE,
    recvtag: int = constants.ANY_TAG,
) -> Request:
    """Start a Sendrecv_replace without waiting; return the request (Comm.Isendrecv_replace).

    `buf` is sent, then receives the message (the data to send is copied at the call).
    """
    _, dest, source, sendtag, recvtag = comm._sendrecv_args(dest, source, sendtag, recvtag)
    view = buffers.parse(buf, writable=True).view
    return _pair(comm, view, memoryview(bytes(view)), dest, sendtag, source, recvtag)


def _pair(
    comm: Comm,
    rview: memoryview,
    sview: memoryview,
    dest: int,
    sendtag: int,
    source: int,
    recvtag: int,
) -> Request:
    engine = comm._check()
    recv = comm._irecv_op(rview, source, recvtag, comm._ctx)
    send = comm._isend_op(sview, dest, sendtag, comm._ctx, False)
    both = StagedOp(_both(recv, send, lambda: both))
    return Request(engine.start_staged(both), engine, comm._rank_of)


def _both(recv: Op, send: Op, this: Callable[[], StagedOp]) -> Iterator[list[Op]]:
    """Stages of an Isendrecv: wait for both operations, then take the receive's status."""
    yield [recv, send]
    op = this()
    op.source, op.tag, op.count = recv.source, recv.tag, recv.count
    op.cancelled = recv.cancelled


class PersistentCollectives:
    """MPI-4 persistent collectives of an intra-communicator (`Barrier_init`, `Bcast_init`,
    ... `Exscan_init`). Each returns an inactive `Prequest`; every `Start` runs the
    matching nonblocking collective (`Ibarrier`, `Ibcast`, ...) over the same arguments,
    the buffers being read (and written) anew at each Start. Members start them in the same
    order as their other nonblocking collectives on the communicator (MPI's rule for both),
    which is what matches the operations of one Start across the members. An argument error
    is raised by the Start that meets it, as the nonblocking call raises it. `info` is
    accepted and not used (no hint changes what these do)."""

    # provided by Comm and the collectives
    _check: Callable[[], Any]
    Ibarrier: Callable[..., Request]
    Ibcast: Callable[..., Request]
    Igather: Callable[..., Request]
    Igatherv: Callable[..., Request]
    Iscatter: Callable[..., Request]
    Iscatterv: Callable[..., Request]
    Iallgather: Callable[..., Request]
    Iallgatherv: Callable[..., Request]
    Ialltoall: Callable[..., Request]
    Ialltoallv: Callable[..., Request]
    Ialltoallw: Callable[..., Request]
    Ireduce: Callable[..., Request]
    Iallreduce: Callable[..., Request]
    Ireduce_scatter: Callable[..., Request]
    Ireduce_scatter_block: Callable[..., Request]
    Iscan: Callable[..., Request]
    Iexscan: Callable[..., Request]

    def _init(self, start: Callable[..., Request], *args: Any) -> Prequest:
        """A Prequest whose Start calls `start(*args)`; MPI.Exception(ERR_COMM) at once
        on a null (or freed) communicator."""
        self._check()
        return Prequest(functools.partial(start, *args))

    def Barrier_init(self, info: Any = None) -> Prequest:
        """A persistent Barrier."""
        return self._init(self.Ibarrier)

    def Bcast_init(self, buf: Any, root: int = 0, info: Any = None) -> Prequest:
        """A persistent Bcast of `buf` from `root`."""
        return self._init(self.Ibcast, buf, root)

    def Gather_init(self, sendbuf: Any, recvbuf: Any, root: int = 0, info: Any = None) -> Prequest:
        """A persistent Gather."""
        return self._init(self.Igather, sendbuf, recvbuf, root)

    def Gatherv_init(self, sendbuf: Any, recvbuf: Any, root: int = 0, info: Any = None) -> Prequest:
        """A persistent Gatherv (a vector collective: one of no byte still runs, as
        Igatherv's)."""
        return self._init(self.Igatherv, sendbuf, recvbuf, root)

    def Scatter_init(self, sendbuf: Any, recvbuf: Any, root: int = 0, info: Any = None) -> Prequest:
        """A persistent Scatter."""
        return self._init(self.Iscatter, sendbuf, recvbuf, root)

    def Scatterv_init(
        self, sendbuf: Any, recvbuf: Any, root: int = 0, info: Any = None
    ) -> Prequest:
        """A persistent Scatterv (a vector collective: one of no byte still runs, as
        Iscatterv's)."""
        return self._init(self.Iscatterv, sendbuf, recvbuf, root)

    def Allgather_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        """A persistent Allgather."""
        return self._init(self.Iallgather, sendbuf, recvbuf)

    def Allgatherv_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        """A persistent Allgatherv (a vector collective: one of no byte still runs, as
        Iallgatherv's)."""
        return self._init(self.Iallgatherv, sendbuf, recvbuf)

    def Alltoall_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        """A persistent Alltoall."""
        return self._init(self.Ialltoall, sendbuf, recvbuf)

    def Alltoallv_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        """A persistent Alltoallv (a vector collective: one of no byte still runs, as
        Ialltoallv's)."""
        return self._init(self.Ialltoallv, sendbuf, recvbuf)

    def Alltoallw_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Prequest:
        """A persistent Alltoallw."""
        return self._init(self.Ialltoallw, sendbuf, recvbuf)

    def Reduce_init(
        self,
        sendbuf: Any,
        recvbuf: Any,
        op: ops.Op = ops.SUM,
        root: int = 0,
        info: Any = None,
    ) -> Prequest:
        """A persistent Reduce with `op` to `root`."""
        return self._init(self.Ireduce, sendbuf, recvbuf, op, root)

    def Allreduce_init(
        self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM, info: Any = None
    ) -> Prequest:
        """A persistent Allreduce with `op`."""
        return self._init(self.Iallreduce, sendbuf, recvbuf, op)

    def Reduce_scatter_block_init(
        self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM, info: Any = None
    ) -> Prequest:
        """A persistent Reduce_scatter_block with `op`."""
        return self._init(self.Ireduce_scatter_block, sendbuf, recvbuf, op)

    def Reduce_scatter_init(
        self,
        sendbuf: Any,
        recvbuf: Any,
        recvcounts: Any = None,
        op: ops.Op = ops.SUM,
        info: Any = None,
    ) -> Prequest:
        """A persistent Reduce_scatter with `recvcounts` (None: each rank's recvbuf count)
        and `op`."""
        return self._init(self.Ireduce_scatter, sendbuf, recvbuf, recvcounts, op)

    def Scan_init(
        self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM, info: Any = None
    ) -> Prequest:
        """A persistent Scan with `op`."""
        return self._init(self.Iscan, sendbuf, recvbuf, op)

    def Exscan_init(
        self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM, info: Any = None
    ) -> Prequest:
        """A persistent Exscan with `op`."""
        return self._init(self.Iexscan, sendbuf, recvbuf, op)
