"""Routes: how this process reaches one other rank, chosen once per world rank by bootstrap.

- `SelfRoute`: this very process (messages are delivered or stored, never sent).
- `ShmRoute`: a rank in the same region, core peer `peer`, through the engine's queues and
  its fast paths.
- `native.MpiRoute`: a rank that shares no region with this one, through mpi4py (the only
  module that uses mpi4py is `native`).
- `AnyRoute`: ANY_SOURCE on a communicator none of whose ranks is on mpi4py.

A communicator asks its route, never the kind of route: `isend`/`send` for sends,
`post` to queue a receive, `recv_into`/`recv_bytes` for the blocking receive's fast path,
`iprobe` for a probe beyond the engine's unexpected queue. Every method takes the
communicator (`comm`, an Intracomm) and the rank in it (`rank`, or ANY_SOURCE for a receive
from any source), as a route is shared by every communicator that holds its world rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guest_lib.mpi import exceptions, wire
from guest_lib.mpi.constants import ANY_SOURCE, ANY_TAG
from guest_lib.mpi.matching import DoneOp

if TYPE_CHECKING:
    from guest_lib.mpi.comm import Comm
    from guest_lib.mpi.engine import Engine
    from guest_lib.mpi.fastpath import FastRecv
    from guest_lib.mpi.matching import Op, RecvOp
    from guest_lib.mpi.status import Status

_CTX_SHIFT = wire.CTX_SHIFT
SELF = 0  # Route.code values: what MPI._internal_state() shows per world rank
SHM = 1
MPI4PY = 2


class Route:
    """The way to one rank (see the module docstring). The base class is the behaviour of a
    route with no fast path: sends go through `isend`, receives are posted to the engine."""

    __slots__ = ()
    code = -1  # SELF, SHM or MPI4PY
    peer = -1  # the core peer id on shared memory, else -1
    local = True  # the rank shares this process's region (or is this process)

    def isend(self, comm: Comm, data: memoryview, rank: int, tag: int, ctx: int, sync: bool) -> Op:
        """Start a send of `data` to `rank` of `comm` on context `ctx`; the op to wait for."""
        raise NotImplementedError

    def send(self, comm: Comm, data: memoryview, rank: int, tag: int, ctx: int, sync: bool) -> None:
        """Blocking send: returns once `data` may be reused (and, `sync`, once matched)."""
        op = self.isend(comm, data, rank, tag, ctx, sync)
        if not op.done:
            comm._engine.wait(op)  # type: ignore[union-attr]
        failed(op, rank)

    def post(self, comm: Comm, op: RecvOp, rank: int) -> RecvOp:
        """Queue the receive `op` from `rank` (or ANY_SOURCE) of `comm` with the engine."""
        return comm._engine.post(op)  # type: ignore[union-attr]

    def recv_into(
        self, comm: Comm, view: Any, rank: int, tag: int, ctx: int, status: Status | None
    ) -> bool:
        """The blocking receive's fast path: True when the message is in `view` (status
        filled; MPI.Exception on truncation); False when the caller must post a receive."""
        return False

    def recv_bytes(
        self, comm: Comm, rank: int, tag: int, ctx: int, status: Status | None
    ) -> bytes | None:
        """The blocking object receive's fast path: the message's bytes, or None when the
        caller must post a receive."""
        return None

    def iprobe(self, comm: Comm, rank: int, tag: int, status: Status | None) -> bool:
        """Whether a message beyond the engine's unexpected queue matches (status filled)."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} peer {self.peer}>"


class SelfRoute(Route):
    """This process: a send is matched against its posted receives or stored."""

    __slots__ = ()
    code = SELF

    def isend(self, comm: Comm, data: memoryview, rank: int, tag: int, ctx: int, sync: bool) -> Op:
        return comm._engine.send_self(ctx, tag, data, sync)  # type: ignore[union-attr]


class ShmRoute(Route):
    """A rank in this process's region: core peer `peer`."""

    __slots__ = ("peer",)
    code = SHM

    def __init__(self, peer: int) -> None:
        self.peer = peer

    def isend(self, comm: Comm, data: memoryview, rank: int, tag: int, ctx: int, sync: bool) -> Op:
        engine = comm._engine
        assert engine is not None
        # A whole message that fits the idle queue now is written at once: no queued op.
        if not sync and engine.fast_send(self.peer, ctx << _CTX_SHIFT | tag, data, 0.0):
            return DoneOp(ANY_SOURCE, ANY_TAG)
        return engine.isend_shm(self.peer, ctx, tag, data, sync)

    def send(self, comm: Comm, data: memoryview, rank: int, tag: int, ctx: int, sync: bool) -> None:
        engine = comm._engine
        assert engine is not None
        if not sync and engine.fast_send(self.peer, ctx << _CTX_SHIFT | tag, data):
            return
        op = engine.isend_shm(self.peer, ctx, tag, data, sync)
        if not op.done:
            engine.wait(op)
        failed(op, rank)

    def recv_into(
        self, comm: Comm, view: Any, rank: int, tag: int, ctx: int, status: Status | None
    ) -> bool:
        """The engine's fast path (`view`: also a writable C-contiguous numpy array)."""
        engine: Engine = comm._engine  # type: ignore[assignment]
        got = engine.fast_recv(self.peer, ctx, tag, view)
        if got is None:
            return False
        fast_done(comm, got, rank, status)
        return True

    def recv_bytes(
        self, comm: Comm, rank: int, tag: int, ctx: int, status: Status | None
    ) -> bytes | None:
        """The engine's fast path for a whole message (a large one takes the caller's)."""
        got = comm._engine.fast_recv(self.peer, ctx, tag, None)  # type: ignore[union-attr]
        if got is None:
            return None
        nbytes, got_tag, data = got
        if status is not None:
            status._set(rank, got_tag, nbytes)
        return data


def fast_done(comm: Comm, got: FastRecv, rank: int, status: Status | None) -> None:
    """The end of a buffer receive from `rank` of `comm` that the engine's fast path took
    (`got`, engine.fast_recv's): the rest of a large message waited for, `status` filled."""
    nbytes, got_tag, rest = got
    if rest is not None:  # a large message whose rest the engine finishes
        from guest_lib.mpi.request import Request  # (request -> engine -> native -> routes)

        engine: Engine = comm._engine  # type: ignore[assignment]
        engine.wait(rest)
        Request(rest, engine, comm._rank_of)._fill(status)
    elif status is not None:
        status._set(rank, got_tag, nbytes)


def failed(op: Op, rank: int) -> None:
    """MPI.Exception for a blocking send whose op failed (its destination process failed:
    ERR_PROC_FAILED, see engine._push)."""
    if op.error:
        raise exceptions.Exception(op.error, f"send to rank {rank}: its process failed")


class AnyRoute(Route):
    """ANY_SOURCE on a communicator without mpi4py-routed ranks: posted to the engine."""

    __slots__ = ()


ANY = AnyRoute()
