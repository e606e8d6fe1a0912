"""Fast paths of blocking point-to-point calls on shared memory: straight into the core when
the engine has nothing else in flight.

The blocking-Recv fast path is a single core `recv_into(peer, ANY_TAG)` that accepts a DATA
message of its context and tag (or the FIRST piece of a large one, whose pieces follow with
nothing in between); whatever else it got is handed to the engine's `dispatch`, in order,
so nothing overtakes. The blocking-Send fast path is a single core `send` of a whole
message when nothing is queued for that peer.

Threads (see `engine`): in a process with no Python thread but the main one, not counting
the library's service threads (`other_threads()` is 0), a fast path takes no lock: no other
thread exists to meet, and none can start while this one runs the call. Otherwise it takes
the engine lock once. The Send then only polls the core (timeout 0). The Recv waits in the
core as a lone thread does when no other thread is the progress owner (`sleeping`, see
`engine.Engine.idle`): it becomes the owner for the call, so its sleeps on the doorbell and
the yields of a crowded wait release the lock (its spin holds it, as the owner's does); else
it only polls. Either way
the caller then waits in the engine if it took nothing, which releases the lock while it
sleeps. A message taken after another thread ran the engine meanwhile (the engine no longer
`quiet`) goes to `dispatch`, behind what that thread took from the queues. (The core call of
a small message is one C call that keeps the GIL, but the Python around it and another
thread's operation of several calls on the same queue, e.g. a large message or a send
waiting for room, are not atomic: hence the lock whenever threads exist.)

With the C accelerator, the lone thread's common case of both runs first in one C call
(`lane`, a ring.P2PLane: see make_lane): a plain buffer spec or pickled bytes (an object send
pickles in the same call: send_obj), sent whole
into an idle queue or received whole from one span of this call's context and tag. It reads
the state these paths read and takes nothing they would not; anything else comes back to them
untouched.
"""

from __future__ import annotations

import collections
from _thread import _count, get_ident
from collections.abc import Callable
from typing import Any

from guest_lib.mpi import constants, exceptions, wire
from guest_lib.mpi.matching import Inflow, RecvOp
from guest_lib.service_threads import other_threads as other_threads  # (engine's, area's)
from guest_lib.service_threads import running as _service
from ivshmem_comm import ring
from ivshmem_comm.errors import CollectiveTruncatedError, MessageTooLargeError, PeerLostError
from ivshmem_comm.errors import TimeoutError as CoreTimeout

BYPASS_CACHE_MIN = 8 << 20  # a receive buffer this large takes pieces with cache-bypassing stores
FAST_TIMEOUT = 0.002  # s: how long a blocking fast path waits inside the core before the engine

# where a lone thread's object receive takes a message of up to this many bytes (a larger
# one comes as a core Message): one C copy in, one out, and no Message to release
SCRATCH_BYTES = 16 << 10
_SCRATCH = memoryview(bytearray(SCRATCH_BYTES))
_TAG_MASK = wire.TAG_MASK  # module globals: read on every fast call
_CTX_SHIFT = wire.CTX_SHIFT

FastRecv = tuple[int, int, Any]
"""What `FastPaths.fast_recv` returns when it took a message: (nbytes, tag, rest). Into a
buffer, `rest` is None when the whole message is in the buffer, else the RecvOp the engine
finishes (wait for it, then its fields are the message's; nbytes and tag are what was in so
far). Without a buffer, `rest` is the message's bytes."""


def core_error(exc: BaseException) -> exceptions.Exception:
    """The MPI.Exception for a core error: ERR_PROC_FAILED for a lost peer (the process
    failed, as ULFM says: see `ulfm`), ERR_TRUNCATE for a collective round longer than this
    member's buffer (as MPICH's Bcast or Gather says), ERR_OTHER for a corrupt ring or a
    timeout."""
    if isinstance(exc, PeerLostError):
        error = exceptions.ERR_PROC_FAILED
    elif isinstance(exc, CollectiveTruncatedError):
        error = exceptions.ERR_TRUNCATE
    else:
        error = exceptions.ERR_OTHER
    return exceptions.Exception(error, f"{type(exc).__name__}: {exc}")


def _bytes_of(buf: Any) -> memoryview:
    """A flat byte view of a flat byte view or a C-contiguous numpy array."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class FastPaths:
    """The fast paths, mixed into the Engine (which supplies the attributes below)."""

    lane: Any  # the ring.P2PLane of make_lane, or None (then the Python paths alone)
    crowded: bool  # ranks outnumber CPUs (see engine.Engine.crowded)
    posted: list[Any]
    unexpected: list[Any]
    mpi_active: list[Any]
    staged: list[Any]
    queues: tuple[Any, ...]  # the containers engine.Engine.quiet reads

    def make_lane(self) -> Any:
        """Return the P2PLane over this engine and its endpoint, or None without the C
        accelerator or an endpoint. The lane holds the engine's containers below (never
        rebound: the engine only changes what they hold) and reads the rest where it lives
        (see ring.P2PLane in _fastpath.c)."""
        if ring.P2PLane is None or self.ep is None:
            return None
        return ring.P2PLane(
            endpoint=self.ep,
            engine=self,
            quiet=self.queues,
            sendq=self.sendq,
            sync_next=self.sync_next,
            count=_count,
            service=_service,
            fault=self.lane_fault,
            tag_bits=_CTX_SHIFT,
            any_tag=constants.ANY_TAG,
            whole_max=self.whole_max,
            # crowded (ranks outnumber CPUs): no spin of its own, only a look; else the Python
            # path, which spins again before it sleeps, would spin twice as long with the CPU
            # the awaited rank needs
            max_spin_ns=0 if self.crowded else int(FAST_TIMEOUT * 1e9),
        )  # fmt: skip

    def lane_fault(self, peer: int, exc: BaseException) -> None:
        """The bookkeeping of `exc` (PeerLostError or RingCorruptError), raised by a queue
        to or from `peer` inside a lane call, as the endpoint's fast path does it
        (Endpoint._fault): a lost peer raises MPI.Exception(ERR_PROC_FAILED) as fast_recv
        and fast_send would; a broken queue raises RingCorruptError, unless the peer came
        back as a new incarnation: then it returns (None) and the lane call declines (the
        Python paths go on)."""
        try:
            self.ep._fault(self.ep.rx[peer], exc)
        except PeerLostError as lost:
            raise core_error(lost) from lost

    ep: Any
    lock: Any  # the engine lock (see `engine`)
    sleeping: bool  # a thread is the progress owner (see `engine.Engine.idle`)
    bell: Any  # the endpoint's notifier wrapper (`engine._Doorbell`) or None
    napping: int  # threads napping on `wakeup` (see `engine.Engine.idle`)
    wakeup: Any  # the condition they nap on
    whole_max: int
    placing: int
    sendq: dict[int, collections.deque[Any]]
    sync_next: dict[int, int]
    inflow: dict[int, Inflow]
    world_of_peer: dict[int, int]
    quiet: Callable[[], bool]  # nothing queued, posted, unexpected or in flight
    dispatch: Callable[[int, int, int, Any], None]  # (peer, coretag, nbytes, data taken)

    def fast_recv(
        self, peer: int, ctx: int, tag: int, buf: Any, load: Callable[[Any], Any] | None = None
    ) -> FastRecv | None:
        """Blocking receive from shm peer `peer` straight into `buf` when nothing else is
        pending. `buf` is a writable flat byte view or a writable C-contiguous numpy array,
        or None: a whole message (one DATA message, not a large one in pieces) is taken as
        bytes (object receives), or with `load` (pickling.load_view) as load(its bytes)
        (then the FastRecv's rest is that object): a lone thread's message held in the queue
        (larger than the scratch buffer) is read there, in place, before its spans are given
        back (one copy fewer).

        Returns a FastRecv (see there) when it took the message; None if the caller must
        take the engine path (what was received meanwhile has been dispatched in order).
        """
        threads = _count() - _service[0]  # other_threads(), inline (every message)
        owner = False
        if threads:
            self.lock.acquire()
            bell = self.bell
            owner = not self.sleeping and bell is not None
            if owner:
                self.sleeping = True
                bell.releaser = get_ident()
                bell.receiving = True
                slept = bell.slept
        try:
            if not self.quiet():
                return None
            timeout = FAST_TIMEOUT if owner or not threads else 0.0
            try:
                if buf is None:
                    data = None
                    if not threads:  # (the scratch buffer is this lone thread's)
                        try:
                            nbytes, _, coretag = self.ep.recv_into(_SCRATCH, peer, -1, timeout)
                            data = bytes(_SCRATCH[:nbytes])
                        except MessageTooLargeError:
                            pass  # (its header is peeked: the recv below takes it)
                    if data is None:
                        with self.ep.recv(peer, -1, timeout) as message:
                            nbytes, coretag = message.nbytes, message.tag
                            if (  # (a lone thread's: `mine` below, without the bell)
                                load is not None
                                and not threads
                                and coretag >> _CTX_SHIFT == ctx
                                and (tag == constants.ANY_TAG or coretag & _TAG_MASK == tag)
                                and peer not in self.sync_next
                            ):
                                return nbytes, coretag & _TAG_MASK, load(message.data)
                            data = bytes(message.data)
                else:
                    nbytes, _, coretag = self.ep.recv_into(
                        buf, peer, -1, timeout, bypass_cache=buf.nbytes >= BYPASS_CACHE_MIN
                    )
                    data = None
            except (CoreTimeout, MessageTooLargeError):
                return None
            except PeerLostError as exc:
                raise core_error(exc) from exc
            mine = (  # (the lock was free while it slept: another thread took from the queues)
                not (owner and bell.slept != slept and not self.quiet())
                and (tag == constants.ANY_TAG or coretag & _TAG_MASK == tag)
                and peer not in self.sync_next
            )
            head = coretag >> _CTX_SHIFT
            if mine and head == ctx:  # kind DATA (a whole message) and this context
                return nbytes, coretag & _TAG_MASK, data if load is None else load(data)
            if data is None:
                if mine and head == wire.head_of(wire.KIND_FIRST, ctx):
                    return self._fast_pieces(
                        peer, ctx, tag, _bytes_of(buf), nbytes, coretag, not threads
                    )
                data = bytes(_bytes_of(buf)[:nbytes])
            # not this call's message (or not its turn): the engine takes it, in order
            self.dispatch(peer, coretag, nbytes, data)
            return None
        finally:
            if owner:
                self.sleeping = False
                self.bell.releaser = 0
                self.bell.receiving = False
            if threads:
                if self.napping:  # (another thread's message, or a waiter takes over)
                    self.wakeup.notify_all()
                self.lock.release()

    def _fast_pieces(
        self, peer: int, ctx: int, tag: int, view: memoryview, offset: int, coretag: int, wait: bool
    ) -> FastRecv:
        """The rest of a large message whose FIRST piece (`offset` bytes) is in `view`: its
        pieces, which follow it from `peer` with nothing in between, are received straight
        into `view`. The whole message when the last one is in; with a RecvOp for the engine
        to finish if a piece does not come within FAST_TIMEOUT (not `wait`: at once) or does
        not fit (truncation)."""
        user_tag = coretag & _TAG_MASK
        piece_head = wire.head_of(wire.KIND_PIECE, ctx)
        ep = self.ep
        bypass = len(view) >= BYPASS_CACHE_MIN
        while True:
            try:
                nbytes, _, coretag = ep.recv_into(
                    view[offset:], peer, -1, FAST_TIMEOUT if wait else 0.0, bypass_cache=bypass
                )
            except (CoreTimeout, MessageTooLargeError):
                op = RecvOp(ctx, self.world_of_peer[peer], tag, view, None, peer)
                op.begin(op.src, user_tag)
                op.count = offset
                self.inflow[peer] = Inflow(op, offset)
                return offset, user_tag, op
            except PeerLostError as exc:
                raise core_error(exc) from exc
            if coretag >> _CTX_SHIFT != piece_head:
                raise wire.piece_outside(coretag, f"peer {peer}")
            offset += nbytes
            if coretag & wire.PIECE_LAST:
                return offset, user_tag, None

    def fast_send(self, peer: int, coretag: int, data: Any, timeout: float = FAST_TIMEOUT) -> bool:
        """Send of a whole message when the queue to `peer` is idle, waiting at most `timeout`
        seconds for room (0: only if it fits now, as a nonblocking send does).

        `data` is a flat byte view or a C-contiguous numpy array. Returns True once it is in
        the queue; False if the engine must take it (too large, queue busy or full).
        """
        if data.nbytes > self.whole_max:
            return False
        return self._fast_write(self.ep.send, peer, coretag, data, timeout)

    def fast_send_parts(
        self, peer: int, coretag: int, parts: list[Any], nbytes: int, timeout: float = FAST_TIMEOUT
    ) -> bool:
        """fast_send of the message made of `parts` laid end to end (`nbytes` in all;
        buffer-protocol objects, each C-contiguous), each copied once into the queue
        (Endpoint.send_parts): True once it is there, False if the engine must take it (then
        join them)."""
        if nbytes > self.whole_max:
            return False
        return self._fast_write(self.ep.send_parts, peer, coretag, parts, timeout)

    def _fast_write(
        self, send: Callable[..., None], peer: int, coretag: int, data: Any, timeout: float
    ) -> bool:
        """The rest of fast_send: `send(peer, data, coretag, timeout)` of the endpoint."""
        threads = _count() - _service[0]  # other_threads(), inline (every message)
        if threads:
            self.lock.acquire()
        try:
            if peer in self.sendq or peer == self.placing:
                return False
            send(peer, data, coretag, 0.0 if threads else timeout)
        except CoreTimeout:
            return False
        except PeerLostError as exc:
            raise core_error(exc) from exc
        finally:
            if threads:
                self.lock.release()
        return True
