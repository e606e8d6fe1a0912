"""Progress engine: MPI matching and protocols on top of the core's endpoints (and mpi4py).

One Engine per process. It knows every world rank's *route*: SELF, SHM (a peer id of the
region this process shares with it) or MPI (an mpi4py rank, for pairs that share no region).
Everything here counts in world ranks; communicators translate.

Wire format over shared memory (one core tag per message, 31 bits):
    bit 29-30 kind: 0 DATA, 1 FIRST, 2 PIECE, 3 CONTROL   bits 18-28 context   bits 0-17 tag
- A message of n <= `whole_max` bytes (at most the core's 4 MiB cache window) is one DATA
  message carrying exactly its bytes: the core reserves it contiguously in the queue at once
  (so a send of it either goes whole or not at all: timeout 0 never leaves half a message)
  and publishes it in max_span pieces that the receiver's `recv_into` copies while the
  sender writes the next.
- A larger message is a FIRST message of `chunk` bytes followed by PIECE messages of at most
  `chunk` bytes, the last one with bit 0 of the tag field set (possibly empty). Pieces of one
  message are never interleaved with other data to the same peer (per-destination FIFO), so
  the receiver appends them in order. `chunk` is at most a quarter of a queue's data area:
  two ranks that send each other huge messages never block inside the core: the engine
  keeps receiving while it waits for space.
  `whole_max` and `chunk` are derived from the region geometry (the same on both sides).
- CONTROL messages: ACK (payload: sequence number) completes a synchronous send; SYNC (same
  payload) announces that the next DATA message from that peer is synchronous; HELLO carries
  bootstrap data; ABANDON (payload: context, tag base, reason) says that the sender left one
  instance of a collective with an error (see `abandon`).
The blocking-Recv fast path is a single core `recv_into(source, ANY_TAG)` that accepts a DATA
message of its context and tag; whatever else it got is handed to the engine, in order, so
nothing overtakes.

Matching (MPI rules): a receive is first matched against the unexpected list (arrival order),
else queued in `posted` (post order); each arriving DATA message goes to the first posted
receive whose (context, source, tag) matches, else to the unexpected list (copied out of
shared memory). Messages from one peer arrive in FIFO order: non-overtaking holds per
(source, tag, communicator). Receives that can match an MPI-routed source are matched with
mpi4py's matched probe (`improbe`) on the communicator's mirror, in post order too.

Freed contexts and abandoned collectives: messages of a context freed by Free (until the
context is agreed on again: the agreement is a collective over a communicator that holds
every sender, whose earlier messages therefore arrive first) and of an abandoned collective
instance are dropped, so they never match a later receive.

Progress happens only inside library calls (Wait/Test/blocking calls/Iprobe): sends waiting
for queue space are retried, arriving messages are matched, MPI requests are tested.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable, Iterator
from typing import Any

from guest_lib.mpi import constants, exceptions, native
from ivshmem_comm import layout
from ivshmem_comm.errors import MessageTooLargeError, PeerLostError
from ivshmem_comm.errors import TimeoutError as CoreTimeout

KIND_DATA = 0
KIND_FIRST = 1
KIND_PIECE = 2
KIND_CONTROL = 3
CTRL_ACK = 0
CTRL_SYNC = 1
CTRL_HELLO = 2
CTRL_ABANDON = 3
PIECE_LAST = 1
SEQ = struct.Struct("<Q")

ROUTE_SELF = 0
ROUTE_SHM = 1
ROUTE_MPI = 2

_TAG_MASK = constants.TAG_UB
_CTX_SHIFT = constants.TAG_BITS
_KIND_SHIFT = constants.TAG_BITS + constants.CTX_BITS

BYPASS_CACHE_MIN = 8 << 20  # a receive buffer this large takes pieces with cache-bypassing stores
FAST_TIMEOUT = 0.002  # s: how long a blocking fast path waits inside the core before the engine
IDLE_TIMEOUT = 0.005  # s: the longest nap of the engine between progress passes
MAX_PULL = 64  # messages taken from shared memory per progress pass


COLL_SPAN = 16  # tags of one blocking collective instance: base .. base + COLL_SPAN - 1
COLL_INSTANCES = 4096  # blocking collective instances before a tag base comes round again
COLL_TAGS = COLL_INSTANCES * COLL_SPAN  # tags of blocking instances; nonblocking ones: above
ABANDON = struct.Struct("<IQIH")  # collective context, instance number, first tag, tags


def coll_base(seq: int) -> int:
    """The first tag of blocking collective instance `seq` (instances are numbered per
    communicator, the same on every member)."""
    return seq % COLL_INSTANCES * COLL_SPAN


def core_tag(kind: int, ctx: int, tag: int) -> int:
    return (kind << _KIND_SHIFT) | (ctx << _CTX_SHIFT) | tag


def chunk_size(data_size: int) -> int:
    """The piece size for a queue data area of `data_size` bytes: 3 * 2**k <= data_size / 4.

    A multiple of 48 (so every element size up to 48 divides it), at most 3 MiB.
    """
    target = min(data_size // 4, 3 << 20)
    size = 3 << 4
    while size * 2 <= target:
        size *= 2
    return size


def whole_max(geometry: layout.Geometry) -> int:
    """The largest message sent whole: one the core reserves contiguously in a queue, and at
    most the core's cache window (a larger one goes in pieces, which the sender's allocator
    keeps cycling through the window's few MiB, still in cache: 16 MiB ping-pong one way
    ~1250 us whole, ~860 us in pieces)."""
    limit = min(geometry.data_size, layout.CACHE_WINDOW) - layout.SPAN_HEADER_SIZE
    while limit > 0 and not layout.is_contiguous(limit, geometry):
        limit -= geometry.max_span
    return max(limit, 0)


def _bytes_of(buf: Any) -> memoryview:
    """A flat byte view of a flat byte view or a C-contiguous numpy array."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def translate_error(exc: BaseException) -> exceptions.Exception:
    """The MPI.Exception for a core error (peer lost, corrupt ring, timeout)."""
    return exceptions.Exception(exceptions.ERR_OTHER, f"{type(exc).__name__}: {exc}")


class Op:
    """An operation in flight: what a Request waits for. `done` is set once, by the engine."""

    __slots__ = ("cancelled", "count", "done", "error", "obj", "source", "tag")

    def __init__(self) -> None:
        self.done = False
        self.error = 0
        self.source = constants.ANY_SOURCE  # world rank once matched
        self.tag = constants.ANY_TAG
        self.count = 0
        self.cancelled = False
        self.obj: Any = None

    def cancel(self, engine: Engine) -> bool:
        return False

    def watch(self) -> int:
        """The shm peer whose loss should abort a wait on this op, or -1."""
        return -1


class DoneOp(Op):
    """Already complete (PROC_NULL, self sends): status fields given."""

    __slots__ = ()

    def __init__(self, source: int = constants.PROC_NULL, tag: int = constants.ANY_TAG) -> None:
        super().__init__()
        self.done = True
        self.source, self.tag = source, tag


class SendOp(Op):
    """A send through shared memory, queued per destination peer."""

    __slots__ = ("coretag", "ctx", "data", "peer", "pos", "seq", "sync", "user_tag")

    def __init__(
        self, peer: int, ctx: int, tag: int, data: memoryview, sync: bool, seq: int
    ) -> None:
        super().__init__()
        self.peer, self.ctx, self.user_tag, self.data = peer, ctx, tag, data
        self.coretag = core_tag(KIND_DATA, ctx, tag)
        self.sync, self.seq = sync, seq
        self.pos = -2 if sync else -1  # -2: SYNC notice next; -1: first message next

    def watch(self) -> int:
        return self.peer


class ControlOp(SendOp):
    """A control message (ACK) queued like data, completing when written."""

    __slots__ = ()


class StagedOp(Op):
    """A nonblocking collective: `steps` yields, stage by stage, the operations the next stage
    waits for (having started them); the op is done when it returns. Every progress pass
    advances it, so it moves on whatever call of the process is making progress."""

    __slots__ = ("on_fail", "pending", "steps")

    def __init__(
        self, steps: Iterator[list[Op]], on_fail: Callable[[str], None] | None = None
    ) -> None:
        super().__init__()
        self.steps = steps
        self.pending: list[Op] = []
        self.on_fail = on_fail  # told why, when the op fails here (see Collectives)

    def advance(self, propagate: bool = False) -> bool:
        """Start the next stages while the current one is complete. True iff it moved.

        A stage whose operation failed, or that raises, fails the op (error ERR_OTHER for an
        exception, re-raised instead when `propagate`: the first stage, run by the call)."""
        moved = False
        while not self.done and all(op.done for op in self.pending):
            moved = True
            failed = next((op.error for op in self.pending if op.error), 0)
            if failed:
                self._fail(failed, f"{exceptions.Get_error_string(failed)} in a stage")
                break
            try:
                self.pending = next(self.steps)
            except StopIteration:
                self.done = True
            except Exception as exc:
                if propagate:
                    raise
                self._fail(exceptions.ERR_OTHER, f"{type(exc).__name__}: {exc}")
        return moved

    def _fail(self, error: int, reason: str) -> None:
        self.error, self.done = error, True
        if self.on_fail is not None:
            self.on_fail(reason)


class MpiOp(Op):
    """An mpi4py request; `finish(status)` runs once it completes."""

    __slots__ = ("finish", "request")

    def __init__(self, request: Any, finish: Callable[[Any], None] | None = None) -> None:
        super().__init__()
        self.request = request
        self.finish = finish


class RecvOp(Op):
    """A receive. Data goes to `view` (copied, clipped: ERR_TRUNCATE), or `sink(offset, data)`
    when given, or, with neither, is collected and kept as bytes in `obj` (object receives).

    `src` is a world rank or ANY_SOURCE; `mpi` the mpi4py mirror to poll (None if no MPI
    source can match) with `mpi_src` the mirror's rank or its ANY_SOURCE.
    """

    __slots__ = (
        "ctx", "mpi", "mpi_src", "mpi_world", "parts", "peer", "sink", "src", "view", "want_tag",
    )  # fmt: skip

    def __init__(
        self,
        ctx: int,
        src: int,
        tag: int,
        view: memoryview | None,
        sink: Callable[[int, memoryview], None] | None = None,
        peer: int = -1,
    ) -> None:
        super().__init__()
        self.ctx, self.src, self.want_tag = ctx, src, tag
        self.view, self.sink = view, sink
        self.parts: list[bytes] | None = None
        self.mpi: Any = None
        self.mpi_src = 0
        self.mpi_world: list[int] = []
        self.peer = peer

    def matches(self, ctx: int, src: int, tag: int) -> bool:
        return (
            ctx == self.ctx
            and (self.src == constants.ANY_SOURCE or self.src == src)
            and (self.want_tag == constants.ANY_TAG or self.want_tag == tag)
        )

    def begin(self, src: int, tag: int) -> None:
        self.source, self.tag, self.count = src, tag, 0

    def write(self, offset: int, data: Any) -> None:
        n = len(data)
        if self.sink is not None:
            self.sink(offset, data)
        elif self.view is not None:
            room = len(self.view) - offset
            if n > room:
                self.error = exceptions.ERR_TRUNCATE
                if room > 0:
                    self.view[offset:] = data[:room]
            elif n:
                self.view[offset : offset + n] = data
        else:
            if self.parts is None:
                self.parts = []
            self.parts.append(bytes(data))
        self.count = offset + n

    def finish(self) -> None:
        if self.view is not None and self.count > len(self.view):
            self.count = len(self.view)
        if self.view is None and self.sink is None:
            parts = self.parts or []
            self.obj = parts[0] if len(parts) == 1 else b"".join(parts)
            self.parts = None
        self.done = True

    def cancel(self, engine: Engine) -> bool:
        if self.done:
            return False
        if self in engine.posted:
            engine.posted.remove(self)
            self.cancelled = True
            self.done = True
            return True
        return False

    def watch(self) -> int:
        return self.peer


class Unexpected:
    """A message that arrived before its receive was posted (its bytes copied out)."""

    __slots__ = ("complete", "ctx", "parts", "peer", "src", "sync_seq", "tag", "waiter")

    def __init__(self, src: int, ctx: int, tag: int, peer: int, sync_seq: int | None) -> None:
        self.src, self.ctx, self.tag, self.peer = src, ctx, tag, peer
        self.parts: list[bytes] = []
        self.complete = False
        self.sync_seq = sync_seq
        self.waiter: Op | None = None  # a synchronous send to self: done once matched

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)

    def write(self, offset: int, data: Any) -> None:
        self.parts.append(bytes(data))

    def finish(self) -> None:
        self.complete = True


class _Inflow:
    """A chunked message being received from one peer: where its next piece goes."""

    __slots__ = ("offset", "sink")

    def __init__(self, sink: RecvOp | Unexpected, offset: int) -> None:
        self.sink, self.offset = sink, offset


class Engine:
    """Routes, queues and matching of one process (see the module docstring).

    `endpoint` is the core Endpoint (None without a region); `routes[w]` is (route, peer)
    for world rank w; `world_rank`/`world_size` this process's place.
    """

    def __init__(
        self,
        world_rank: int,
        world_size: int,
        endpoint: Any = None,
        routes: list[tuple[int, int]] | None = None,
    ) -> None:
        self.world_rank = world_rank
        self.world_size = world_size
        self.ep = endpoint
        self.routes = routes or [(ROUTE_SELF, -1)]
        self.world_of_peer: dict[int, int] = {
            peer: w for w, (route, peer) in enumerate(self.routes) if route == ROUTE_SHM
        }
        geometry = endpoint.region.geometry if endpoint else None
        self.chunk = chunk_size(geometry.data_size) if geometry else 3 << 20
        self.whole_max = whole_max(geometry) if geometry else 3 << 20
        self.sendq: dict[int, collections.deque[SendOp]] = {}
        self.posted: list[RecvOp] = []
        self.unexpected: list[Unexpected] = []
        self.inflow: dict[int, _Inflow] = {}
        self.sync_next: dict[int, int] = {}  # peer -> seq of its next (synchronous) message
        self.await_ack: dict[tuple[int, int], SendOp] = {}
        self.mpi_active: list[MpiOp] = []
        self.mpi_polling = 0  # posted receives with an MPI side
        self.hello: dict[int, bytes] = {}
        self.used_ctx: set[int] = {0, 1, 2, 3}
        self.mpi_messages = 0  # messages this process handed to mpi4py (sends)
        self.placing = -1  # the shm peer a placed message waits for (nothing else goes there)
        self.staged: list[StagedOp] = []  # nonblocking collectives in flight
        self.dropped_ctx: set[int] = set()  # freed contexts not agreed on again yet
        # (collective context, tag base) of abandoned collective instances -> (number, why)
        self.abandoned: dict[tuple[int, int], tuple[int, str]] = {}
        self._seq = 0
        self.has_mpi = any(route == ROUTE_MPI for route, _ in self.routes)

    # ------------------------------------------------------------------ state
    def quiet(self) -> bool:
        """True when nothing is queued, posted, unexpected or in flight."""
        return not (
            self.sendq
            or self.posted
            or self.unexpected
            or self.inflow
            or self.mpi_active
            or self.staged
        )

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------ sending
    def isend_shm(self, peer: int, ctx: int, tag: int, data: memoryview, sync: bool) -> SendOp:
        """Queue a send to shm peer `peer` and try to push it now."""
        op = SendOp(peer, ctx, tag, data, sync, self.next_seq() if sync else 0)
        queue = self.sendq.get(peer)
        if queue is None:
            queue = self.sendq[peer] = collections.deque()
        queue.append(op)
        if len(queue) == 1 and peer != self.placing:
            self._push(peer, queue, 0.0)
        return op

    def send_self(self, ctx: int, tag: int, data: memoryview, sync: bool = False) -> Op:
        """A send to this very process: delivered, or stored (buffered semantics). The op
        returned is done, except for a synchronous send that found no posted receive: that
        one is done when a receive takes the stored message."""
        me = self.world_rank
        op = self._match_posted(me, ctx, tag)
        if op is not None:
            op.begin(me, tag)
            op.write(0, data)
            op.finish()
            return DoneOp(me, tag)
        entry = Unexpected(me, ctx, tag, -1, None)
        entry.parts.append(bytes(data))
        entry.complete = True
        self.unexpected.append(entry)
        if not sync:
            return DoneOp(me, tag)
        entry.waiter = Op()
        return entry.waiter

    def _push(self, peer: int, queue: collections.deque[SendOp], timeout: float) -> bool:
        """Send what fits of the queued sends to `peer`. True iff anything was written.

        An op leaves the queue right after its last message is written, so an op still at
        the head with `pos >= chunk` has pieces left (maybe only the empty last one).
        """
        ep, chunk = self.ep, self.chunk
        moved = False
        try:
            while queue:
                op = queue[0]
                if isinstance(op, ControlOp):
                    ep.send(peer, op.data, op.coretag, timeout)
                    queue.popleft()
                    op.done = moved = True
                    continue
                data = op.data
                total = len(data)
                if op.pos == -2:
                    ep.send(peer, SEQ.pack(op.seq), core_tag(KIND_CONTROL, 0, CTRL_SYNC), timeout)
                    op.pos = -1
                    self.await_ack[(peer, op.seq)] = op
                    moved = True
                if op.pos == -1:
                    if total <= self.whole_max:
                        ep.send(peer, data, op.coretag, timeout)
                        op.pos = total
                        queue.popleft()
                        op.done = op.done or not op.sync
                        moved = True
                        continue
                    first = core_tag(KIND_FIRST, op.ctx, op.user_tag)
                    ep.send(peer, data[:chunk], first, timeout)
                    op.pos = chunk
                    moved = True
                while True:
                    n = min(chunk, total - op.pos)
                    last = op.pos + n == total
                    piece = core_tag(KIND_PIECE, op.ctx, PIECE_LAST if last else 0)
                    ep.send(peer, data[op.pos : op.pos + n], piece, timeout)
                    op.pos += n
                    moved = True
                    if last:
                        break
                queue.popleft()
                op.done = op.done or not op.sync
        except CoreTimeout:
            pass
        except PeerLostError as exc:
            raise translate_error(exc) from exc
        if not queue:
            self.sendq.pop(peer, None)
        return moved

    def send_control(self, peer: int, kind_tag: int, payload: bytes) -> None:
        op = ControlOp(peer, 0, kind_tag, memoryview(payload), False, 0)
        op.coretag = core_tag(KIND_CONTROL, 0, kind_tag)
        queue = self.sendq.get(peer)
        if queue is None:
            queue = self.sendq[peer] = collections.deque()
        queue.append(op)
        if len(queue) == 1 and peer != self.placing:
            self._push(peer, queue, 0.0)

    def place(self, peer: int, data: memoryview, coretag: int) -> int:
        """Write a message for shm peer `peer` into its queue without sending it (core
        Endpoint.place) once what is queued for it is out, making progress meanwhile; return
        the region offset of its bytes. Until publish_placed(peer), sends to it wait."""
        self.wait_until(lambda: peer not in self.sendq)
        self.placing = peer
        while True:
            try:
                return self.ep.place(peer, data, coretag, 0.0)
            except CoreTimeout:
                if not self.progress():
                    self.idle(peer)
            except PeerLostError as exc:
                self.placing = -1
                raise translate_error(exc) from exc

    def publish_placed(self, peer: int) -> None:
        """Send the message placed for `peer`, then what waited behind it."""
        self.placing = -1
        try:
            self.ep.publish_placed(peer)
        except PeerLostError as exc:
            raise translate_error(exc) from exc
        queue = self.sendq.get(peer)
        if queue:
            self._push(peer, queue, 0.0)

    # ------------------------------------------------------------------ receiving
    def _match_posted(self, src: int, ctx: int, tag: int) -> RecvOp | None:
        for op in self.posted:
            if op.matches(ctx, src, tag):
                self.posted.remove(op)
                if op.mpi is not None:
                    self.mpi_polling -= 1
                return op
        return None

    def post(self, op: RecvOp) -> RecvOp:
        """Match `op` against the unexpected messages, else queue it (MPI: also polled)."""
        for entry in self.unexpected:
            if op.matches(entry.ctx, entry.src, entry.tag):
                self.unexpected.remove(entry)
                self._deliver_unexpected(op, entry)
                return op
        self.posted.append(op)
        if op.mpi is not None:
            self.mpi_polling += 1
            self._poll_mpi()
        return op

    def _deliver_unexpected(self, op: RecvOp, entry: Unexpected) -> None:
        op.begin(entry.src, entry.tag)
        offset = 0
        for part in entry.parts:
            op.write(offset, part)
            offset += len(part)
        op.count = offset
        self._release(entry)
        if entry.complete:
            op.finish()
        else:  # the rest of it is still arriving: send the remaining pieces straight to op
            flow = self.inflow[entry.peer]
            assert flow.sink is entry
            flow.sink = op

    def _release(self, entry: Unexpected) -> None:
        """The sender of `entry` (received or dropped) may go on: ACK a synchronous one."""
        if entry.sync_seq is not None:
            self.send_control(entry.peer, CTRL_ACK, SEQ.pack(entry.sync_seq))
        if entry.waiter is not None:
            entry.waiter.done = True

    def drop_context(self, ctxs: tuple[int, ...]) -> None:
        """A communicator with these contexts was freed: forget its unexpected messages and
        drop those still to come until `reuse_context` (see the module docstring)."""
        self.dropped_ctx.update(ctxs)
        self._purge(lambda entry: entry.ctx in ctxs)

    def reuse_context(self, ctxs: tuple[int, ...]) -> None:
        """The members agreed on these contexts for a new communicator: take them again
        (what the old communicator's collectives left on record goes)."""
        self.dropped_ctx.difference_update(ctxs)
        self.used_ctx.update(ctxs)
        for key in [key for key in self.abandoned if key[0] in ctxs]:
            del self.abandoned[key]

    def _purge(self, doomed: Callable[[Unexpected], bool]) -> None:
        keep = []
        for entry in self.unexpected:
            if doomed(entry):
                self._release(entry)
            else:
                keep.append(entry)
        self.unexpected[:] = keep

    def abandon(
        self, ctx: int, seq: int, base: int, span: int, reason: str, members: list[int]
    ) -> None:
        """This rank left collective instance number `seq` of the communicator whose
        collective context is `ctx` with an error (its messages carry tags base ..
        base+span-1): withdraw its receives, drop its messages (those here and those to
        come), and tell the other `members` (world ranks) why, so that they leave it too
        instead of waiting for this rank."""
        self.abandoned[(ctx, base)] = (seq, reason)
        self._fail_posted(ctx, base, span, 0)
        self._purge(lambda entry: entry.ctx == ctx and base <= entry.tag < base + span)
        payload = ABANDON.pack(ctx, seq, base, span) + reason.encode()[:512]
        for world in members:
            route, peer = self.routes[world]
            if route == ROUTE_SHM:
                try:
                    self.send_control(peer, CTRL_ABANDON, payload)
                except exceptions.Exception:
                    pass  # that peer is gone: it waits for nothing

    def _fail_posted(self, ctx: int, base: int, span: int, error: int) -> None:
        """Complete the posted receives of one collective instance: with `error`, or (0)
        withdrawn as if cancelled."""
        for op in [op for op in self.posted if op.ctx == ctx and base <= op.want_tag < base + span]:
            self.posted.remove(op)
            if op.mpi is not None:
                self.mpi_polling -= 1
            op.error, op.cancelled, op.done = error, not error, True

    def entering(self, ctx: int, seq: int) -> str | None:
        """Blocking collective instance `seq` of collective context `ctx` starts here: the
        reason another member gave for abandoning it already, or None. Records of instances
        half the numbering ago go (their tag base comes round again)."""
        if not self.abandoned:
            return None
        self.abandoned.pop((ctx, coll_base(seq + COLL_INSTANCES // 2)), None)
        return self.abandoned_already(ctx, coll_base(seq), seq)

    def abandoned_already(self, ctx: int, base: int, seq: int) -> str | None:
        """Why another member abandoned collective instance `seq` (tags from `base`) before
        it started here, or None (an older instance's record there goes)."""
        record = self.abandoned.get((ctx, base))
        if record is None:
            return None
        if record[0] != seq:
            del self.abandoned[(ctx, base)]
            return None
        return record[1]

    def find_unexpected(self, ctx: int, src: int, tag: int) -> Unexpected | None:
        """The first unexpected message matching (ctx, src, tag), complete or not."""
        for entry in self.unexpected:
            if (
                entry.ctx == ctx
                and (src == constants.ANY_SOURCE or entry.src == src)
                and (tag == constants.ANY_TAG or entry.tag == tag)
            ):
                return entry
        return None

    def dispatch(self, peer: int, coretag: int, nbytes: int, data: Any = None) -> None:
        """Handle one message from shm peer `peer` (`data` given: already taken from the core)."""
        kind = coretag >> _KIND_SHIFT
        ctx = (coretag >> _CTX_SHIFT) & constants.MAX_CONTEXT
        tag = coretag & _TAG_MASK
        ep = self.ep
        if kind == KIND_PIECE:
            flow = self.inflow.get(peer)
            if flow is None:
                raise exceptions.Exception(
                    exceptions.ERR_INTERN, f"peer {peer} sent a piece of no message"
                )
            self._fill(flow.sink, flow.offset, peer, coretag, nbytes, data)
            flow.offset += nbytes
            if tag & PIECE_LAST:
                del self.inflow[peer]
                flow.sink.finish()
            return
        if kind == KIND_CONTROL:
            if data is None:
                with ep.recv(peer, coretag) as message:
                    payload = bytes(message.data)
            else:
                payload = bytes(data)
            if tag in (CTRL_ACK, CTRL_SYNC) and len(payload) != SEQ.size:
                raise exceptions.Exception(
                    exceptions.ERR_INTERN,
                    f"world rank {self.world_of_peer.get(peer, '?')} (shm peer {peer}) sent a "
                    f"{'ACK' if tag == CTRL_ACK else 'SYNC'} of {len(payload)} bytes, not "
                    f"{SEQ.size}",
                )
            if tag == CTRL_ACK:
                (seq,) = SEQ.unpack(payload)
                sent = self.await_ack.pop((peer, seq), None)
                if sent is not None:
                    sent.done = True
            elif tag == CTRL_SYNC:
                (self.sync_next[peer],) = SEQ.unpack(payload)
            elif tag == CTRL_HELLO:
                self.hello[peer] = payload
            elif tag == CTRL_ABANDON and len(payload) >= ABANDON.size:
                actx, seq, base, span = ABANDON.unpack_from(payload)
                if actx in self.dropped_ctx:
                    return  # about a freed communicator
                why = payload[ABANDON.size :].decode(errors="replace")
                reason = f"world rank {self.world_of_peer[peer]} left this collective: {why}"
                self.abandoned[(actx, base)] = (seq, reason)
                self._fail_posted(actx, base, span, exceptions.ERR_OTHER)
                self._purge(lambda e: e.ctx == actx and base <= e.tag < base + span)
            return
        src = self.world_of_peer[peer]
        sync_seq = self.sync_next.pop(peer, None)
        op = self._match_posted(src, ctx, tag)
        sink: RecvOp | Unexpected
        if op is None:
            sink = Unexpected(src, ctx, tag, peer, sync_seq)
            if self._dropped(ctx, tag):
                self._release(sink)  # taken (and ACKed) but kept nowhere
            else:
                self.unexpected.append(sink)
        else:
            sink = op
            op.begin(src, tag)
            if sync_seq is not None:
                self.send_control(peer, CTRL_ACK, SEQ.pack(sync_seq))
        self._fill(sink, 0, peer, coretag, nbytes, data)
        if kind == KIND_FIRST:
            self.inflow[peer] = _Inflow(sink, nbytes)
        else:
            sink.finish()

    def _dropped(self, ctx: int, tag: int) -> bool:
        """True for a message of a freed context or of an abandoned collective instance."""
        if ctx in self.dropped_ctx:
            return True
        if not self.abandoned:
            return False
        return (ctx, tag & -COLL_SPAN if tag < COLL_TAGS else tag) in self.abandoned

    def _fill(
        self,
        sink: RecvOp | Unexpected,
        offset: int,
        peer: int,
        coretag: int,
        nbytes: int,
        data: Any,
    ) -> None:
        """Write a message of `nbytes` at `offset` of `sink`: `data` if given (already taken
        from the core), else the head message from `peer`, copied straight into a receive
        buffer where it fits (the core pipelines that copy span by span)."""
        if data is not None:
            sink.write(offset, data)
        elif (
            isinstance(sink, RecvOp)
            and sink.sink is None
            and sink.view is not None
            and offset + nbytes <= len(sink.view)
        ):
            self.ep.recv_into(sink.view[offset:] if offset else sink.view, peer, coretag)
            sink.count = offset + nbytes
        else:
            with self.ep.recv(peer, coretag) as message:
                sink.write(offset, message.data)

    # ------------------------------------------------------------------ MPI side
    def _poll_mpi(self) -> bool:
        _M = native.MPI()
        moved = False
        for op in list(self.posted):
            if op.mpi is None:
                continue
            status = _M.Status()
            tag = _M.ANY_TAG if op.want_tag == constants.ANY_TAG else op.want_tag
            src = _M.ANY_SOURCE if op.mpi_src == constants.ANY_SOURCE else op.mpi_src
            message = op.mpi.improbe(src, tag, status)
            if message is None:
                continue
            self.posted.remove(op)
            self.mpi_polling -= 1
            nbytes = status.Get_count(_M.BYTE)
            op.begin(op.mpi_world[status.Get_source()], status.Get_tag())
            if op.sink is None and op.view is not None and nbytes <= len(op.view):
                request = message.Irecv([op.view, nbytes, _M.BYTE])
                self._track_mpi(op, request, nbytes, None)
            else:
                scratch = bytearray(nbytes)
                request = message.Irecv([scratch, _M.BYTE])
                self._track_mpi(op, request, nbytes, scratch)
            moved = True
        return moved

    def _track_mpi(self, op: RecvOp, request: Any, nbytes: int, scratch: Any) -> None:
        def finish(_status: Any) -> None:
            if scratch is not None:
                op.write(0, memoryview(scratch))
            op.count = nbytes
            op.finish()

        tracker = MpiOp(request, finish)
        tracker.obj = op
        self.mpi_active.append(tracker)

    def start_staged(self, op: StagedOp) -> StagedOp:
        """Start a nonblocking collective (its first stage, whose exceptions propagate) and
        advance it in every pass."""
        op.advance(propagate=True)
        if not op.done:
            self.staged.append(op)
        return op

    def track(self, op: MpiOp) -> MpiOp:
        """Test an mpi4py request in every progress pass until it completes."""
        self.mpi_active.append(op)
        return op

    def _test_mpi(self) -> bool:
        moved = False
        for tracker in list(self.mpi_active):
            if tracker.request.Test():
                self.mpi_active.remove(tracker)
                if tracker.finish is not None:
                    tracker.finish(None)
                tracker.done = True
                moved = True
        return moved

    # ------------------------------------------------------------------ progress
    def progress(self, until: Callable[[], bool] | None = None) -> bool:
        """One pass: push sends, take arrived messages, poll MPI. True iff anything moved.

        `until`: stop taking messages as soon as it holds (what the caller waits for is
        done), so that messages sent ahead stay in the queue, to be received in place once
        their receive is posted, rather than copied out as unexpected."""
        moved = False
        if self.sendq:
            for peer, queue in list(self.sendq.items()):
                if peer != self.placing and self._push(peer, queue, 0.0):
                    moved = True
        ep = self.ep
        if ep is not None:
            try:
                for _ in range(MAX_PULL):
                    if until is not None and until():
                        break
                    head = ep.iprobe()
                    if head is None:
                        break
                    self.dispatch(*head)
                    moved = True
            except PeerLostError as exc:
                raise translate_error(exc) from exc
        if self.mpi_polling and self._poll_mpi():
            moved = True
        if self.mpi_active and self._test_mpi():
            moved = True
        if self.staged:
            for staged in list(self.staged):
                if staged.advance():
                    moved = True
                if staged.done:
                    self.staged.remove(staged)
        return moved

    def idle(self, watch: int = -1) -> None:
        """Nap until something may have moved (bounded by IDLE_TIMEOUT)."""
        ep = self.ep
        if ep is None:
            return  # only mpi4py to wait for: progress() polls it; spin
        spin_only = self.has_mpi and (self.mpi_polling or self.mpi_active)
        try:
            pushable = [item for item in self.sendq.items() if item[0] != self.placing]
            if pushable:
                peer, queue = pushable[0]
                busy = self.posted or self.inflow or spin_only
                self._push(peer, queue, 0.0 if busy else IDLE_TIMEOUT)
                return
            source = watch if watch >= 0 else -1
            ep.probe(source, -1, 0.0 if spin_only else IDLE_TIMEOUT)
        except CoreTimeout:
            pass
        except PeerLostError as exc:
            raise translate_error(exc) from exc

    def wait(self, op: Op) -> None:
        """Drive progress until `op` is done."""

        def done() -> bool:
            return op.done

        while not op.done:
            if not self.progress(done) and not op.done:
                self.idle(op.watch())

    def wait_until(self, predicate: Callable[[], bool], watch: int = -1) -> None:
        while not predicate():
            if not self.progress(predicate) and not predicate():
                self.idle(watch)

    # ------------------------------------------------------------------ fast paths
    def fast_recv(self, peer: int, ctx: int, tag: int, buf: Any) -> tuple[int, int] | RecvOp | None:
        """Blocking receive from shm peer straight into `buf` when nothing else is pending.

        `buf` is a writable flat byte view or a writable C-contiguous numpy array.
        Returns (nbytes, tag) on success; a RecvOp to wait for when the message is a large one
        whose first pieces are already in `buf` (the engine finishes it); None if
        the caller must take the engine path (what was received meanwhile has been
        dispatched in order).
        """
        if not self.quiet():
            return None
        ep = self.ep
        try:
            nbytes, _, coretag = ep.recv_into(
                buf, peer, -1, FAST_TIMEOUT, bypass_cache=buf.nbytes >= BYPASS_CACHE_MIN
            )
        except (CoreTimeout, MessageTooLargeError):
            return None
        except PeerLostError as exc:
            raise translate_error(exc) from exc
        if (tag == constants.ANY_TAG or coretag & _TAG_MASK == tag) and peer not in self.sync_next:
            head = coretag >> _CTX_SHIFT
            if head == ctx:  # kind DATA and this context
                return nbytes, coretag & _TAG_MASK
            if head == KIND_FIRST << constants.CTX_BITS | ctx:
                return self._fast_pieces(peer, ctx, tag, _bytes_of(buf), nbytes, coretag)
        self.dispatch(peer, coretag, nbytes, bytes(_bytes_of(buf)[:nbytes]))
        return None

    def _fast_pieces(
        self, peer: int, ctx: int, tag: int, view: memoryview, offset: int, coretag: int
    ) -> tuple[int, int] | RecvOp:
        """The rest of a large message whose FIRST piece (`offset` bytes) is in `view`: its
        pieces, which follow it from `peer` with nothing in between, are received straight
        into `view`. Returns (nbytes, tag) when the last one is in; a RecvOp for the engine to
        finish if a piece does not come within FAST_TIMEOUT or does not fit (truncation)."""
        user_tag = coretag & _TAG_MASK
        piece_head = KIND_PIECE << constants.CTX_BITS | ctx
        ep = self.ep
        bypass = len(view) >= BYPASS_CACHE_MIN
        while True:
            try:
                nbytes, _, coretag = ep.recv_into(
                    view[offset:], peer, -1, FAST_TIMEOUT, bypass_cache=bypass
                )
            except (CoreTimeout, MessageTooLargeError):
                op = RecvOp(ctx, self.world_of_peer[peer], tag, view, None, peer)
                op.begin(op.src, user_tag)
                op.count = offset
                self.inflow[peer] = _Inflow(op, offset)
                return op
            except PeerLostError as exc:
                raise translate_error(exc) from exc
            if coretag >> _CTX_SHIFT != piece_head:
                raise exceptions.Exception(
                    exceptions.ERR_INTERN, f"peer {peer} sent tag {coretag:#x} inside a message"
                )
            offset += nbytes
            if coretag & PIECE_LAST:
                return offset, user_tag

    def fast_send(self, peer: int, coretag: int, data: Any) -> bool:
        """Blocking send of a whole message when the queue to `peer` is idle.

        `data` is a flat byte view or a C-contiguous numpy array. Returns True once it is in
        the queue; False if the engine must take it (too large, queue busy or full).
        """
        if data.nbytes > self.whole_max or peer in self.sendq or peer == self.placing:
            return False
        try:
            self.ep.send(peer, data, coretag, FAST_TIMEOUT)
        except CoreTimeout:
            return False
        except PeerLostError as exc:
            raise translate_error(exc) from exc
        return True
