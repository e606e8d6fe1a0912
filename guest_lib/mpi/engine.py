"""Progress engine: queues and protocols of one process on top of the core's endpoint.

One Engine per process. It knows every world rank's route (see `routes`: self, shared
memory with a core peer id, or mpi4py), chosen once by bootstrap; everything here counts
in world ranks, communicators translate. The parts:
- `wire`: the message format over shared memory (core tags, pieces, control messages);
- `matching` (a base class of Engine): posted receives, unexpected messages, dropped
  contexts and abandoned collectives;
- `fastpath` (a base class of Engine): blocking calls straight into the core;
- this module: the send queues per shm peer (a message larger than `whole_max` goes in
  pieces), `dispatch` of each arriving message, and progress.

Progress happens only inside library calls (Wait/Test/blocking calls/Iprobe): sends waiting
for queue space are retried, arriving messages are matched, mpi4py requests are tested (by
the mpi4py route, `native`), nonblocking collectives advance.

Threads (THREAD_MULTIPLE): one reentrant lock, `lock` (made by Matching), guards all of this
process's engine state (queues, posted and unexpected lists, contexts, staged collectives,
the list of mpi4py requests) and every use of the core endpoint, which is not thread-safe.
Each engine call takes it once; the uncontended cost is one acquire. Whichever thread waits
makes progress for all: a progress pass dispatches every arriving message, to whichever
thread's receive it matches. The lock is never held while a thread sleeps:
- the progress owner: at most one waiting thread at a time (`sleeping`) naps on the doorbell;
  the endpoint's notifier is wrapped (`_Doorbell`) so that the owner's doorbell wait
  releases the lock (the endpoint is then at a safe point: it re-reads its queues on waking;
  a send waiting for room is that peer's only writer, as `pushing` keeps others off it);
- the other waiters nap on the condition `wakeup` (releasing the lock); a pass that moved
  anything, or an owner that leaves its nap, wakes them, so a waiter sees its request
  completed by another thread's progress and one of them takes the doorbell over.
- mpi4py's blocking calls (the direct route, `native`) and the collective area's waits
  run without the lock.
In a process whose only Python thread is the main one (`other_threads()` is 0), the blocking
fast paths take no lock and wait inside the core as before (see `fastpath`): the cost of
all this to a single-threaded program is one lock per engine call off those paths.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from guest_lib.mpi import constants, exceptions, native, wire
from guest_lib.mpi.fastpath import FastPaths, core_error, other_threads
from guest_lib.mpi.matching import DoneOp, Inflow, Matching, Op, RecvOp, Unexpected
from guest_lib.mpi.routes import Route, SelfRoute
from guest_lib.mpi.wire import (
    CTRL_ABANDON,
    CTRL_ACK,
    CTRL_HELLO,
    CTRL_REVOKE,
    CTRL_SYNC,
    KIND_CONTROL,
    KIND_DATA,
    KIND_FIRST,
    KIND_PIECE,
    PIECE_LAST,
    SEQ,
    core_tag,
)
from ivshmem_comm.errors import PeerLostError
from ivshmem_comm.errors import TimeoutError as CoreTimeout
from ivshmem_comm.notify import crowded

_CTX_SHIFT = wire.CTX_SHIFT  # a DATA message's core tag >> this is its context
IDLE_TIMEOUT = 0.005  # s: the longest nap of the engine between progress passes
CROWDED_SPIN_US = 2.0  # the endpoint's spin when ranks outnumber CPUs (see Engine.crowded)
CROWDED_YIELD_US = 1000.0  # and its yield phase after the spin (Endpoint.yield_us)
MAX_PULL = 64  # messages taken from shared memory per progress pass
PAUSE_S = 50e-6  # s: a busy-waiting thread's nap with other threads about (Engine._pause)
# A wait yields the lock (Engine._yield) after this many progress passes that moved
# something: a yield costs a trip through the scheduler (ms on a loaded machine) that an
# idle thread gains nothing from, so a short wait never yields; a long busy one lets the
# threads blocked on the lock in at this interval.
YIELD_PASSES = 16


class _Doorbell:
    """The endpoint's notifier as the engine installs it: `wait` by the thread named in
    `releaser` (the progress owner: napping in Engine.idle, or in a blocking receive's fast
    path) releases the engine lock, all its levels, while it sleeps, and takes it back before
    the endpoint goes on, as `yield_cpu` does around one yield of the yield phase; any other
    wait (a stalled piece, the collective area) is the notifier's own."""

    def __init__(self, inner: Any, lock: Any) -> None:
        self.inner = inner
        self.lock = lock
        self.blocking = inner.blocking
        self.releaser = 0  # threading.get_ident() of the owner, 0: none
        self.receiving = False  # the owner waits in a blocking receive (see Engine._yield_cpu)
        self.slept = 0  # waits that released the lock (the engine's state may have changed)

    def kick(self, peer: int) -> None:
        self.inner.kick(peer)

    def wait(self, timeout: float) -> bool:
        if self.releaser != threading.get_ident():
            return bool(self.inner.wait(timeout))
        self.slept += 1
        saved = self.lock._release_save()
        try:
            return bool(self.inner.wait(timeout))
        finally:
            self.lock._acquire_restore(saved)

    def yield_cpu(self) -> None:
        """One sched_yield() by the owner, the lock released around it (counted in `slept`:
        another thread may have taken from the queues meanwhile)."""
        self.slept += 1
        saved = self.lock._release_save()
        try:
            os.sched_yield()
        finally:
            self.lock._acquire_restore(saved)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


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
    advances it, so it moves on whatever call of the process is making progress.
    `home_ctx`: the context of the communicator whose collective it is (-1: none given), whose
    Free completes it first."""

    __slots__ = ("home_ctx", "on_fail", "pending", "reason", "steps")

    def __init__(
        self,
        steps: Iterator[list[Op]],
        on_fail: Callable[[int, str], None] | None = None,
        home_ctx: int = -1,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.home_ctx = home_ctx
        self.pending: list[Op] = []
        self.on_fail = on_fail  # told (error class, why) when the op fails here (Collectives)
        self.reason = ""  # why it failed ("" until then): the text of the request's error

    def advance(self, propagate: bool = False) -> bool:
        """Start the next stages while the current one is complete. True iff it moved.

        A stage whose operation failed, or that raises, fails the op (error ERR_OTHER for an
        exception, re-raised instead when `propagate`: the first stage, run by the call);
        `on_fail` is told, except for an operation that failed with `in_step` set (a
        collective area's round that every member ran, failing at this one only: see
        area._Polled), which no other member waits for."""
        moved = False
        while not self.done and all(op.done for op in self.pending):
            moved = True
            failed = next((op for op in self.pending if op.error), None)
            if failed is not None:
                why = getattr(failed, "why", "")  # (an abandoned collective's reason)
                error = failed.error
                why = why or f"{exceptions.Get_error_string(error)} in a stage"
                if getattr(failed, "in_step", False):
                    self.error, self.done, self.reason = error, True, why
                else:
                    self._fail(error, why)
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
        self.error, self.done, self.reason = error, True, reason
        if self.on_fail is not None:
            self.on_fail(error, reason)


class Engine(Matching, FastPaths):
    """Routes, queues, matching and progress of one process (see the module docstring).

    `endpoint` is the core Endpoint (None without a region); `routes[w]` the Route of world
    rank w; `world_rank`/`world_size` this process's place.
    """

    def __init__(
        self,
        world_rank: int,
        world_size: int,
        endpoint: Any = None,
        routes: list[Route] | None = None,
    ) -> None:
        Matching.__init__(self)
        self.world_rank = world_rank
        self.world_size = world_size
        self.ep = endpoint
        self.routes = routes or [SelfRoute()]
        self.world_of_peer: dict[int, int] = {
            route.peer: w for w, route in enumerate(self.routes) if route.peer >= 0
        }
        geometry = endpoint.region.geometry if endpoint else None
        self.chunk = wire.chunk_size(geometry.data_size) if geometry else 3 << 20
        self.whole_max = wire.whole_max(geometry) if geometry else 3 << 20
        # (sendq, sync_next, mpi_active, staged and Matching's posted, unexpected, inflow are
        # never rebound: the C lane holds them, see FastPaths.make_lane)
        self.sendq: dict[int, collections.deque[SendOp]] = {}
        self.sync_next: dict[int, int] = {}  # peer -> seq of its next (synchronous) message
        self.await_ack: dict[tuple[int, int], SendOp] = {}
        self.mpi_active: list[native.MpiOp] = []  # mpi4py requests the route tests
        self.hello: dict[int, bytes] = {}
        # messages this process handed to mpi4py through the route (sends) and their payload
        # bytes (the leaders' exchanges of hierarchical collectives call mpi4py directly)
        self.mpi_messages = 0
        self.mpi_bytes = 0
        self.placing = -1  # the shm peer a placed message waits for (nothing else goes there)
        # nonblocking collectives in flight: StagedOps, and area.AreaOps a lane staged
        # (anything with advance() and done)
        self.staged: list[Any] = []
        # the containers `quiet` reads (never rebound): the C lane and the C front of the
        # blocking collectives hold them and read their truth as `quiet` does
        self.queues = (
            self.sendq, self.posted, self.unexpected, self.inflow, self.mpi_active, self.staged
        )  # fmt: skip
        # CONTROL messages of the services over the engine (see `dynproc`): CTRL_* tag ->
        # handler(sender's world rank, payload), run by the progress pass that takes one
        self.services: dict[int, Callable[[int, bytes], None]] = {}
        self._seq = 0
        # Threads (see the module docstring): whether a thread owns the doorbell nap, how
        # many nap on `wakeup`, the peer the owner pushes with the lock released.
        self.wakeup = threading.Condition(self.lock)
        self.sleeping = False
        self.napping = 0
        self.pushing = -1
        self.backoff = PAUSE_S  # the next busy-wait pause (see _pause)
        self.bell: _Doorbell | None = None
        if endpoint is not None:
            self.bell = endpoint.notifier = _Doorbell(endpoint.notifier, self.lock)
        self.has_mpi = any(not route.local for route in self.routes)
        # Oversubscribed: more ranks of this region on this kernel than CPUs they may run on
        # (notify.crowded). A rank that spins then takes the CPU from the rank it waits for,
        # so waits (the endpoint's, and the collective area's, which spin as long) spin only
        # briefly and busy loops yield (unless IVSHMEM_COMM_SPIN_US is set).
        self.crowded = endpoint is not None and crowded(
            endpoint.region, {endpoint.peer_id, *self.world_of_peer}, endpoint.peer_id
        )
        if self.crowded and endpoint is not None and "IVSHMEM_COMM_SPIN_US" not in os.environ:
            endpoint.spin_us = min(endpoint.spin_us, CROWDED_SPIN_US)
            # then poll yielding the CPU (to the awaited rank where it shares ours: its answer
            # comes without a doorbell sleep and wake, as MPICH's waits poll) before they
            # sleep, unless yields hand the CPU away for long (see Endpoint.yield_us)
            endpoint.yield_us = CROWDED_YIELD_US
            endpoint.yielder = self._yield_cpu
        self.lane = self.make_lane()  # (last: it reads the endpoint's settings as they end up)

    # ------------------------------------------------------------------ state
    def _yield_cpu(self) -> bool:
        """One yield of an endpoint wait's yield phase (Endpoint.yielder), or False (none):
        in a blocking receive, a lone thread's or the progress owner's in the fast path (with
        other threads: the lock released around the yield, see _Doorbell.yield_cpu; without
        the phase such a receive slept on the doorbell whenever the answer took longer than
        the crowded spin, 2 us: 7-18x the lone thread's latency in CI), not in the progress
        owner's nap (`sleeping`: nonblocking operations waited for; measured with the phase
        there, ibarrier at 4 ranks on 2 CPUs took 2-5x as long under others' load)."""
        bell = self.bell
        if bell is not None and bell.receiving and bell.releaser == threading.get_ident():
            bell.yield_cpu()
            return True
        if self.sleeping or other_threads():
            return False
        os.sched_yield()
        return True

    def quiet(self) -> bool:
        """True when nothing is queued, posted, unexpected or in flight (none of `queues`
        holds anything)."""
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

    def _wake(self) -> None:
        """Tell the napping waiters that something moved (lock held)."""
        if self.napping:
            self.wakeup.notify_all()

    def _yield(self) -> None:
        """Free the lock for a moment (lock held, any depth): a thread blocked on it may take
        it while this one yields the CPU."""
        saved = self.lock._release_save()  # type: ignore[attr-defined]
        try:
            time.sleep(0)
        finally:
            self.lock._acquire_restore(saved)  # type: ignore[attr-defined]

    def _pause(self) -> None:
        """Let other threads in between two polls of a busy wait (lock held, any depth): nap
        on `wakeup`, as a waiter for news, PAUSE_S and twice as long at each pause until a
        pass moves something (up to IDLE_TIMEOUT). The lock is not fair: a thread blocked
        on it must be scheduled while it is free, which on a loaded machine takes longer
        than a short nap; a busy wait that moves nothing leaves it ever longer windows."""
        nap = self.backoff
        self.backoff = min(2 * nap, IDLE_TIMEOUT)
        self.napping += 1
        try:
            self.wakeup.wait(nap)
        finally:
            self.napping -= 1

    # ------------------------------------------------------------------ sending
    def isend_shm(self, peer: int, ctx: int, tag: int, data: memoryview, sync: bool) -> SendOp:
        """Queue a send to shm peer `peer` and try to push it now."""
        with self.lock:
            op = SendOp(peer, ctx, tag, data, sync, self.next_seq() if sync else 0)
            self._enqueue(peer, op)
            return op

    def _enqueue(self, peer: int, op: SendOp) -> None:
        """Queue `op` behind what waits for `peer`; push it now if it is first."""
        queue = self.sendq.get(peer)
        if queue is None:
            queue = self.sendq[peer] = collections.deque()
        queue.append(op)
        if len(queue) == 1 and peer != self.placing:
            self._push(peer, queue, 0.0)

    def send_self(self, ctx: int, tag: int, data: memoryview, sync: bool = False) -> Op:
        """A send to this very process: delivered, or stored (buffered semantics). The op
        returned is done, except for a synchronous send that found no posted receive: that
        one is done when a receive takes the stored message."""
        me = self.world_rank
        with self.lock:
            op = self.match_posted(me, ctx, tag)
            if op is not None:
                op.begin(me, tag)
                op.write(0, data)
                op.finish()
                self._wake()  # (another thread's receive)
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
        except PeerLostError:
            # The peer failed: the sends queued for it fail (ERR_PROC_FAILED at their wait,
            # see routes.Route.send), not this progress pass, which may be another call's.
            for failed in queue:
                failed.error, failed.done = exceptions.ERR_PROC_FAILED, True
            queue.clear()
            moved = True
        if not queue:
            self.sendq.pop(peer, None)
        return moved

    def send_control(self, peer: int, kind_tag: int, payload: bytes) -> None:
        op = ControlOp(peer, 0, kind_tag, memoryview(payload), False, 0)
        op.coretag = core_tag(KIND_CONTROL, 0, kind_tag)
        with self.lock:
            self._enqueue(peer, op)

    def place(self, peer: int, data: memoryview, coretag: int) -> int:
        """Write a message for shm peer `peer` into its queue without sending it (core
        Endpoint.place) once what is queued for it is out, making progress meanwhile; return
        the region offset of its bytes. Until publish_placed(peer), sends to it wait, and so
        does another thread's placement."""
        with self.lock:
            self.wait_until(lambda: peer not in self.sendq and self.placing < 0)
            self.placing = peer
            while True:
                try:
                    return self.ep.place(peer, data, coretag, 0.0)
                except CoreTimeout:
                    if not self.progress():
                        self.idle(peer)
                except PeerLostError as exc:
                    self.placing = -1
                    raise core_error(exc) from exc

    def publish_placed(self, peer: int) -> None:
        """Send the message placed for `peer`, then what waited behind it."""
        with self.lock:
            self.placing = -1
            try:
                self.ep.publish_placed(peer)
            except PeerLostError as exc:
                raise core_error(exc) from exc
            queue = self.sendq.get(peer)
            if queue:
                self._push(peer, queue, 0.0)
            self._wake()

    # ------------------------------------------------------------------ receiving
    def who(self, peer: int) -> str:
        """How errors name shm peer `peer`: its world rank and peer id."""
        return f"world rank {self.world_of_peer.get(peer, '?')} (shm peer {peer})"

    def dispatch(self, peer: int, coretag: int, nbytes: int, data: Any = None) -> None:
        """Handle one message from shm peer `peer` (`data` given: already taken from the core).
        MPI.Exception(ERR_INTERN) naming the peer for a message the wire format rejects."""
        kind = coretag >> wire.KIND_SHIFT
        tag = coretag & wire.TAG_MASK
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
                with self.ep.recv(peer, coretag) as message:
                    payload = bytes(message.data)
            else:
                payload = bytes(data)
            if tag == CTRL_ACK:
                sent = self.await_ack.pop(
                    (peer, wire.decode_seq(payload, tag, self.who(peer))), None
                )
                if sent is not None:
                    sent.done = True
            elif tag == CTRL_SYNC:
                self.sync_next[peer] = wire.decode_seq(payload, tag, self.who(peer))
            elif tag == CTRL_HELLO:
                self.hello[peer] = payload
            elif tag == CTRL_ABANDON:
                notice = wire.decode_abandon(payload, self.who(peer))
                world = self.world_of_peer[peer]
                self.abandoned_by(notice, f"world rank {world}", world)
            elif tag == CTRL_REVOKE:
                ctx, gen = wire.decode_revoke(payload, self.who(peer))
                self.revoked_by(ctx, gen, f"revoked by world rank {self.world_of_peer[peer]}")
            else:
                handler = self.services.get(tag)
                if handler is None:
                    raise exceptions.Exception(
                        exceptions.ERR_INTERN, f"{self.who(peer)} sent control message {tag}"
                    )
                handler(self.world_of_peer[peer], payload)
            return
        ctx = (coretag >> wire.CTX_SHIFT) & constants.MAX_CONTEXT
        sink = self.arrived(
            self.world_of_peer[peer], ctx, tag, peer, self.sync_next.pop(peer, None)
        )
        self._fill(sink, 0, peer, coretag, nbytes, data)
        if kind == KIND_FIRST:
            self.inflow[peer] = Inflow(sink, nbytes)
        else:
            sink.finish()

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

    def start_staged(self, op: StagedOp) -> StagedOp:
        """Start a nonblocking collective (its first stage, whose exceptions propagate) and
        advance it in every pass."""
        with self.lock:
            op.advance(propagate=True)
            if not op.done:
                self.staged.append(op)
            return op

    # ------------------------------------------------------------------ progress
    def poll_native(self) -> bool:
        return native.poll(self)

    def progress(self, until: Callable[[], bool] | None = None) -> bool:
        """One pass: push sends, take arrived messages, poll MPI. True iff anything moved.

        `until`: stop taking messages as soon as it holds (what the caller waits for is
        done), so that messages sent ahead stay in the queue, to be received in place once
        their receive is posted, rather than copied out as unexpected."""
        with self.lock:
            moved = False
            if self.sendq:
                for peer, queue in list(self.sendq.items()):
                    if peer not in (self.placing, self.pushing) and self._push(peer, queue, 0.0):
                        moved = True
            ep = self.ep
            if ep is not None:
                try:
                    for _ in range(MAX_PULL):
                        if until is not None and until():
                            break
                        if self.posted and self._take_posted():
                            moved = True
                            if until is not None and until():
                                break
                        head = ep.iprobe()
                        if head is None:
                            break
                        self.dispatch(*head)
                        moved = True
                except PeerLostError as exc:
                    raise core_error(exc) from exc
            if (self.mpi_polling or self.mpi_active) and native.progress(self):
                moved = True
            if self.staged:
                for staged in list(self.staged):
                    if staged.advance():
                        moved = True
                    if staged.done and staged in self.staged:  # (a stage may finish another)
                        self.staged.remove(staged)
            if moved and self.napping:
                self.wakeup.notify_all()
            return moved

    def _take_posted(self) -> bool:
        """Take the runs of messages waiting from each shm peer straight into the posted
        receives they match, in C (the core's take_posted: what `arrived` and `_fill` do,
        for DATA messages, every span out, matching a plain posted receive or an object
        receive, which gets the bytes as its obj). A peer with a
        synchronous send announced or a message arriving in pieces is left to `dispatch`.
        True iff anything was taken (lock held)."""
        ep, posted = self.ep, self.posted
        taken = 0
        for peer, world in self.world_of_peer.items():
            if peer not in self.sync_next and peer not in self.inflow:
                taken += ep.take_posted(peer, posted, world, _CTX_SHIFT)
        return taken > 0

    def idle(self, watch: int = -1) -> None:
        """Wait a while for something to move (bounded by IDLE_TIMEOUT): as the
        progress owner, on the doorbell with the lock released; while another thread owns
        it, on `wakeup` (see the module docstring). `watch`: the shm peer whose loss ends
        the wait with MPI.Exception, or -1. (Takes the lock itself when not held.)"""
        with self.lock:
            if self.sleeping:  # another thread naps on the doorbell for everyone
                self.napping += 1
                try:
                    self.wakeup.wait(IDLE_TIMEOUT)
                finally:
                    self.napping -= 1
                if watch >= 0:
                    self._check_watch(watch)
                return
            bell = self.bell
            self.sleeping = True
            if bell is not None:
                bell.releaser = threading.get_ident()
            try:
                self._nap(watch)
            finally:
                self.sleeping = False
                if bell is not None:
                    bell.releaser = 0
                self._wake()  # one of the napping waiters takes the doorbell over

    def _nap(self, watch: int) -> None:
        """The progress owner's nap (see idle): push a send waiting for room, else probe."""
        ep = self.ep
        solo = not other_threads()
        if ep is None:  # only mpi4py to wait for: progress() polls it; spin
            if not solo:
                self._pause()
            return
        spin_only = self.has_mpi and (self.mpi_polling or self.mpi_active)
        found = False  # the probe saw a message
        try:
            pushable = [item for item in self.sendq.items() if item[0] != self.placing]
            if pushable:
                peer, queue = pushable[0]
                busy = self.posted or self.inflow or spin_only or self.napping
                self.pushing = peer  # its only writer while the lock is released
                try:
                    moved = self._push(peer, queue, 0.0 if busy else IDLE_TIMEOUT)
                finally:
                    self.pushing = -1
                if not moved and self.crowded:
                    os.sched_yield()  # a polling loop: let the rank it waits for run
                if busy and not solo:
                    self._pause()
                return
            # Alone, wait for the watched peer only; else for any (a message for another
            # waiter must wake this owner), judging the watched peer apart.
            source = watch if watch >= 0 and solo else -1
            if spin_only and self.crowded:
                os.sched_yield()
            try:
                ep.probe(source, -1, 0.0 if spin_only else IDLE_TIMEOUT)
                found = True
            except CoreTimeout:
                pass
            # (also after a probe that found nothing: a spin that never frees the lock
            # starves the threads whose sends the waited-for ranks need)
            if spin_only and not solo:
                self._pause()
        except CoreTimeout:
            pass
        except PeerLostError as exc:
            raise core_error(exc) from exc
        if watch >= 0 and not solo and not found:  # (a check reads /proc: not when news came)
            self._check_watch(watch)

    def _check_watch(self, watch: int) -> None:
        """MPI.Exception if shm peer `watch` is lost with nothing left from it (lock held)."""
        try:
            self.ep.probe(watch, -1, 0.0)
        except CoreTimeout:
            pass
        except PeerLostError as exc:
            raise core_error(exc) from exc

    def wait(self, op: Op) -> None:
        """Drive progress until `op` is done (made by this thread or any other)."""

        def done() -> bool:
            return op.done

        if not op.done:
            self.wait_until(done, op.watch())

    def wait_until(self, predicate: Callable[[], bool], watch: int = -1) -> None:
        """Drive progress until `predicate()` holds (evaluated with the lock held)."""
        moving = 0  # passes of this wait that moved something
        with self.lock:
            while not predicate():
                if self.progress(predicate):
                    self.backoff = PAUSE_S
                    if self.napping:
                        self._pause()  # what moved may be another waiter's: let it in
                    else:
                        moving += 1
                        if moving % YIELD_PASSES == 0 and other_threads():
                            self._yield()  # threads blocked on the lock get a chance
                elif not predicate():
                    self.idle(watch)
