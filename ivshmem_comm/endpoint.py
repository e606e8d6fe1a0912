"""Endpoint: one peer's view of a region. All its queues, matching, waiting, peer lifecycle.

Joining (who writes what in the peer slot, see layout's peer table):
1. Claim: the broker, or the endpoint itself, stores incarnation+1, pid, host id, then
   state=JOINING last. A slot held by a live peer is refused (PeerSlotBusyError).
2. The endpoint binds to every peer that is READY (resets its own half of both queues with
   it for the session (driver incarnation, device incarnation)), then stores state=READY and
   kicks everyone, so sleeping peers rescan the table and bind to it.
3. A queue carries traffic once both halves hold the same session (virtqueue.py). A peer that
   comes back as a new incarnation resets its halves; the other side sees the session change
   (PeerLostError), resets its own, and messages of the old incarnation are never delivered
   to the new one.

Peer identity: each endpoint is bound to at most one incarnation of each peer slot (the
table in README.md, "Peer identity"). It binds when it first sees an incarnation READY, or at
first contact (that incarnation reset a half of our queues for us, then maybe left before we
looked); never to a FREE, LEFT or DEAD holder it never met, such as the previous job's.
PeerLostError means exactly: the incarnation we are bound to is gone (LEFT, DEAD, or replaced;
a replacement is reported once, then the endpoint binds to the new holder).

Waiting: spin for `spin_us` microseconds, then arm EVENT_IDX on the rings of interest and
block on the notifier in slices of at most WATCH_SLICE seconds, re-checking the peers an
operation depends on after each slice, so a lost peer is reported within that bound.

An Endpoint is not thread-safe: use one per thread, or lock around it.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from ivshmem_comm import layout, serialize
from ivshmem_comm.channel import (
    MID_SPIN_FACTOR,
    STALL_TIMEOUT,
    STREAM_SPIN_NS,
    Message,
    RxChannel,
    TxChannel,
    byte_view,
)
from ivshmem_comm.errors import (
    MessageTooLargeError,
    PeerLostError,
    PeerSlotBusyError,
    RingCorruptError,
    TimeoutError,
)
from ivshmem_comm.notify import Notifier, PollingNotifier, SemaphoreNotifier
from ivshmem_comm.region import Region, host_id
from ivshmem_comm.ring import (
    SEND_FULL,
    SEND_KICK,
    SEND_OK,
    RxRing,
    TxRing,
    compare_exchange_u64,
)

ANY_SOURCE = -1
ANY_TAG = -1
JOIN_GRACE_NS = 5_000_000_000  # a JOINING slot is someone's for this long after its heartbeat
WATCH_SLICE = 0.05  # seconds: bound on the time to notice a lost peer while blocked
DEFAULT_SPIN_US = float(os.environ.get("IVSHMEM_COMM_SPIN_US", "50"))
# The yield phase of a wait (Endpoint.yield_us): a yield that took longer than YIELD_LONG_NS
# handed the CPU to another process for long (a time slice: ms), so waits then skip the phase
# for YIELD_CALM_NS and sleep on the doorbell at once (the C lane's rx_yield_poll: same values).
YIELD_LONG_NS = 200_000
YIELD_CALM_NS = 50_000_000
_STATE_MASK = 0xFFFFFFFF


def _poll_or_spin(ring: Any, spin_ns: int) -> tuple[int, int, int, int] | None:
    """The ring's head header now, or after spinning up to `spin_ns` for it (None: none)."""
    return ring.poll_header() or ring.wait_header(spin_ns)


class Endpoint:
    """Peer `peer_id` of `region`: send to and receive from every other peer.

    `notifier`: how to sleep and kick (default: POSIX semaphores for a region opened by name on
    this host, polling with backoff otherwise). `broker_assigned`: the broker already claimed
    the slot (state JOINING); otherwise the endpoint claims it. `spin_us`: how long to spin
    before blocking (`yield_us`: how long it then yields the CPU between polls; none by
    default). `stall_timeout`: how long a receive waits for the next span inside a message
    before it declares the sender's queue broken.
    """

    def __init__(
        self,
        region: Region,
        peer_id: int,
        *,
        notifier: Notifier | None = None,
        broker_assigned: bool = False,
        spin_us: float = DEFAULT_SPIN_US,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.region = region
        self.peer_id = me = peer_id
        n = region.max_peers
        g = region.geometry
        region.peer_slot_offset(peer_id)  # range check
        if notifier is None:
            notifier = (
                SemaphoreNotifier(region.shm_name, me, n) if region.shm_name else PollingNotifier()
            )
        self.notifier = notifier
        self._spin = spin_us * 1e-6
        self._spin_ns = int(spin_us * 1000)
        self._u64 = region.u64
        self._word_i = [region.peer_slot_offset(p) // 8 for p in range(n)]
        # Binding (see "Peer identity" in the module docstring): the incarnation of each peer
        # our halves are reset for (0: none), whether its loss was reported, the incarnation
        # expect_incarnation() asked for (0: any), and its slot word while bound and READY.
        self._known = [0] * n
        self._told = [False] * n
        self._want = [0] * n
        self._expect = [-1] * n  # peer slot word (READY | known << 32) once seen READY
        self._looked = [0.0] * n  # when _holder_died last looked at each peer's process
        # Session words of each peer's halves of our two queues (first contact, see _contacted).
        self._in_line_i = [
            (g.queue_offset(p, me) + layout.DRIVER_LINE_OFFSET) // 8 if p != me else 0
            for p in range(n)
        ]
        self._out_line_i = [
            (g.queue_offset(me, p) + layout.DEVICE_LINE_OFFSET) // 8 if p != me else 0
            for p in range(n)
        ]
        self._unexpected: list[collections.deque[Message]] = [collections.deque() for _ in range(n)]
        self._unexpected_count = 0
        self._reported: set[int] = set()  # peers whose broken queue ANY_SOURCE has reported
        self._others = [p for p in range(n) if p != me]
        self._rotation = 0
        self._spin_end = 0.0  # end of the current spin phase; 0: the next wait starts one
        self._yield_ns = 0  # the yield phase after the spin (see yield_us)
        self._calm_until = 0  # time.monotonic_ns() before which waits skip the yield phase
        # One yield of the yield phase in place of os.sched_yield() (None: that): returns
        # True when it yielded, False (nothing done) to skip the phase now. A caller whose
        # lock other threads may wait for releases it around the yield, or says no.
        self.yielder: Callable[[], bool] | None = None
        # Peers whose queue holds the rest of a timed-out send (TxChannel.tail): every wait
        # pushes it on, so a sender that only receives afterwards still delivers it.
        self._tailed: set[int] = set()
        self._closed = False
        self.tx: list[TxChannel | None] = [None] * n
        self.rx: list[RxChannel | None] = [None] * n
        self.incarnation = self._claim(broker_assigned)
        buf = region.buf
        for p in self._others:
            tx_ring = TxRing(buf, region.queue_offset(me, p), g, p)
            rx_ring = RxRing(buf, region.queue_offset(p, me), g, p)
            waiter = self._waiter([tx_ring], p, sending=True)
            self.tx[p] = TxChannel(tx_ring, g, self._kicker(p), waiter, p)
            self.rx[p] = RxChannel(
                rx_ring, p, buf, g, self._kicker(p), self._waiter([rx_ring], p), stall_timeout
            )
        self.spin_us = spin_us  # (and the channels' spin for the next span of a message)
        # The same channels by peer id, for the fast paths (a dict refuses bad ids for free).
        self._tx_by_peer = {p: self.tx[p] for p in self._others}
        self._rx_by_peer = {p: self.rx[p] for p in self._others}
        for p in self._others:
            self._sync(p)
        region.write_peer(me, state=layout.PEER_READY)
        for p in self._others:
            notifier.kick(p)

    @property
    def spin_us(self) -> float:
        """How long (microseconds) a wait polls before it blocks on the doorbell."""
        return self._spin_ns / 1000

    @spin_us.setter
    def spin_us(self, value: float) -> None:
        """Set the spin of later waits (>= 0; e.g. short when ranks outnumber the CPUs, so
        that a waiting rank does not take the CPU from the one it waits for)."""
        if not value >= 0:
            raise ValueError(f"spin_us must be >= 0, got {value}")
        self._spin = value * 1e-6
        self._spin_ns = int(value * 1000)
        mid_spin_ns = min(STREAM_SPIN_NS, MID_SPIN_FACTOR * self._spin_ns)
        for channel in self.rx:
            if channel is not None:
                channel.mid_spin_ns = mid_spin_ns

    @property
    def yield_us(self) -> float:
        """How long (microseconds) a wait, its spin over, polls with a sched_yield() between
        polls before it blocks on the doorbell (0: it blocks at once)."""
        return self._yield_ns / 1000

    @yield_us.setter
    def yield_us(self, value: float) -> None:
        """Set the yield phase of later waits (>= 0): for ranks that outnumber the CPUs,
        where a yield hands the CPU to the awaited rank when it shares this CPU, and its
        answer then comes without a doorbell sleep and wake. A yield that took longer than
        YIELD_LONG_NS (another process ran a time slice) ends the phase, and waits skip it for
        YIELD_CALM_NS."""
        if not value >= 0:
            raise ValueError(f"yield_us must be >= 0, got {value}")
        self._yield_ns = int(value * 1000)

    # ------------------------------------------------------------------ lifecycle
    def _claim(self, broker_assigned: bool) -> int:
        region, me = self.region, self.peer_id
        slot = region.peer(me)
        now = time.time_ns()
        if broker_assigned:
            if slot.state != layout.PEER_JOINING:
                raise PeerSlotBusyError(
                    f"peer slot {me} is {slot.state_name}, not joining: the broker did not "
                    "assign it to this process"
                )
            # pid and host_id stay the broker's: they name the process whose socket holds the
            # slot (QEMU for a guest), which is what the broker watches across its restarts.
            region.write_peer(me, heartbeat_ns=now)
            return slot.incarnation
        # A slot whose holder is alive, or cannot be checked from here, is busy. So is a
        # JOINING slot until JOIN_GRACE has passed since its claimer's heartbeat: between the
        # claimer's compare-and-swap and its pid store the slot still shows the previous pid.
        joining_recently = (
            slot.state == layout.PEER_JOINING and now - slot.heartbeat_ns < JOIN_GRACE_NS
        )
        if joining_recently or (
            slot.state in (layout.PEER_JOINING, layout.PEER_READY)
            and slot.holder_alive() is not False
        ):
            raise PeerSlotBusyError(
                f"peer slot {me} of region {region.name!r} is {slot.state_name}, held by pid "
                f"{slot.pid} (incarnation {slot.incarnation})"
            )
        incarnation = (slot.incarnation + 1) & _STATE_MASK or 1
        # The claim itself: one compare-and-swap of the slot's first word (state, incarnation)
        # from what we judged claimable to JOINING with our incarnation. Of several claimers,
        # with or without a broker, in one kernel or several VMs, exactly one swaps it.
        offset = region.peer_slot_offset(me)
        seen = slot.state | (slot.incarnation << 32)
        mine = layout.PEER_JOINING | (incarnation << 32)
        # A fresh heartbeat first (TSO: visible before the swap below), so that any other
        # claimer that sees our JOINING also sees it fresh and leaves the slot alone. A claimer
        # that loses the swap has only refreshed the winner's advisory heartbeat.
        region.write_peer(me, heartbeat_ns=now)
        if not compare_exchange_u64(region.buf, offset, seen, mine):
            raise PeerSlotBusyError(
                f"peer slot {me} of region {region.name!r} was claimed by another process "
                "at the same time"
            )
        region.write_peer(me, pid=os.getpid(), host_id=host_id(), doorbell=me, joined_ns=now)
        if region.u64[offset // 8] != mine:  # taken over before our pid was there to see
            raise PeerSlotBusyError(f"peer slot {me} of region {region.name!r} was taken over")
        return incarnation

    def _contacted(self, p: int, incarnation: int) -> bool:
        """True iff incarnation `incarnation` of peer p reset a half of one of our queues for
        this endpoint's incarnation: it knew us, so what it sent is ours (first contact)."""
        me = self.incarnation
        return self._u64[self._in_line_i[p]] == layout.session_word(incarnation, me) or (
            self._u64[self._out_line_i[p]] == layout.session_word(me, incarnation)
        )

    def _reset_halves(self, p: int, incarnation: int) -> None:
        """Reset our halves of both queues with p for `incarnation` of p (0: no session, so
        they never carry traffic until the next reset)."""
        me_inc = self.incarnation
        tx, rx = self.tx[p], self.rx[p]
        assert tx is not None and rx is not None
        tx.ring.reset(layout.session_word(me_inc, incarnation) if incarnation else 0)
        rx.ring.reset(layout.session_word(incarnation, me_inc) if incarnation else 0)
        rx.reset()
        tx.reset()

    def _sync(self, p: int) -> bool:
        """Bind to the holder of slot p if the rules allow; True iff bound to p and p READY.

        Bind to incarnation i of p (reset our halves for it) when the slot shows i READY (its
        holder not known dead), or shows i in any other state but FREE after i reset a half
        of ours for us (first contact: i may have sent and left before we looked), and
        expect_incarnation() asked for i or for none. Never to a holder we never met: a
        FREE, LEFT or DEAD slot of a previous holder, or a JOINING one. While bound to an
        incarnation whose loss was not yet reported (_check_peer does), stay bound to it.
        """
        word = self._u64[self._word_i[p]]
        state, incarnation = word & _STATE_MASK, word >> 32
        known = self._known[p]
        if incarnation != known:
            if known and not self._told[p]:
                return False
            live = (
                state == layout.PEER_READY and self.region.peer(p).holder_alive() is not False
            ) or (state != layout.PEER_FREE and self._contacted(p, incarnation))
            if incarnation and live and self._want[p] in (0, incarnation):
                self._known[p] = incarnation
            elif known:
                self._known[p] = 0
                incarnation = 0
            else:
                return False
            self._told[p] = False
            self._expect[p] = -1
            self._reset_halves(p, incarnation)
            if not incarnation:
                return False
        if state == layout.PEER_READY:
            self._expect[p] = word
            return True
        return False

    def _check_peer(self, p: int, rings: Sequence[Any] = (), recent: bool = False) -> None:
        """Raise PeerLostError if the incarnation of p we are bound to is gone.

        Gone: the slot shows it LEFT or DEAD (every call says so again), its holder died on
        this kernel (the slot is marked DEAD), or another incarnation holds the slot (said
        once; then the endpoint binds to the new holder as _sync allows). A slot we are not
        bound to raises nothing: its holder is someone we never talked to. `rings`: the
        waiter's rings; a receive ring with something published returns instead of raising
        for a peer that left or died (what it sent before is still ours: poll it first).
        `recent`: skip the look at the holder's process (reads of /proc, ~0.1 ms of CPU)
        when p's last look is less than WATCH_SLICE old: what a wait does before each sleep,
        so a wait woken per message stays cheap and a crash is still seen within two slices.
        """
        word = self._u64[self._word_i[p]]
        state, incarnation = word & _STATE_MASK, word >> 32
        known = self._known[p]
        if known and incarnation != known:
            if not self._told[p]:
                self._told[p] = True
                self._expect[p] = -1
                self._sync(p)
                raise PeerLostError(
                    p, f"incarnation {known} is gone; incarnation {incarnation} holds the slot"
                )
            self._sync(p)
            known = self._known[p]
        if state in (layout.PEER_DEAD, layout.PEER_LEFT):
            gone = f"{layout.PEER_STATE_NAMES[state]} (incarnation {incarnation})"
        elif state == layout.PEER_READY and self._holder_died(p, recent):
            # The holder crashed on this kernel without a broker to notice: record it, but only
            # over the word we judged (a new holder may have claimed the slot since: then the
            # next check judges that one).
            dead = layout.PEER_DEAD | (incarnation << 32)
            if not compare_exchange_u64(self.region.buf, self._word_i[p] * 8, word, dead):
                return
            gone = f"process exited without leaving (incarnation {incarnation})"
        else:
            return
        if not known:
            return
        # Its last messages may have been published after our last poll, before it left.
        if any(ring.arm() for ring in rings if isinstance(ring, RxRing)):
            return
        self._told[p] = True
        self._expect[p] = -1
        raise PeerLostError(p, gone)

    def _holder_died(self, p: int, recent: bool) -> bool:
        """Whether peer p's holder process is known dead on this kernel (see _check_peer)."""
        now = time.monotonic()
        if recent and now - self._looked[p] < WATCH_SLICE:
            return False
        self._looked[p] = now
        return self.region.peer(p).holder_alive() is False

    def _refresh(self, source: int = ANY_SOURCE) -> bool:
        """Sync with every peer (only `source` unless ANY_SOURCE) whose slot changed since we
        last looked; True iff one had."""
        changed = False
        for p in self._others if source == ANY_SOURCE else (source,):
            if self._u64[self._word_i[p]] != self._expect[p]:
                self._sync(p)
                changed = True
        return changed

    def close(self) -> None:
        """Leave: mark the slot LEFT, wake every peer so it notices, release the doorbells.

        Messages not yet received are dropped with the endpoint. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self.region.write_peer(self.peer_id, state=layout.PEER_LEFT)
        for p in self._others:
            self.notifier.kick(p)
        self.notifier.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ waiting
    def _kicker(self, p: int) -> Any:
        notifier = self.notifier
        return lambda: notifier.kick(p)

    def _waiter(self, rings: list[Any], p: int, sending: bool = False) -> Any:
        return lambda deadline: self._idle(rings, p, deadline, sending)

    def _idle(
        self, rings: list[Any], watch: int, deadline: float | None, sending: bool = False
    ) -> bool:
        """Called after a poll found nothing: spin a while, then sleep until something moves.

        Returns True iff it slept. `watch` (a peer id or -1) is the peer whose loss aborts the
        wait. Raises PeerLostError if `watch` is lost, else TimeoutError past `deadline`
        (time.monotonic): the peer is judged before the deadline, so a poll (timeout 0) of a
        lost peer says it is lost, never that it timed out. `sending`: a send waiting for
        room, whose polls (a progress engine retries a full queue at every pass) look at the
        holder's process (~0.1 ms) at most once per WATCH_SLICE (see _check_peer's `recent`):
        one whose holder crashed without its slot marked says so within a slice.
        """
        if self._tailed:
            self._push_tails()
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            if watch >= 0:
                self._check_peer(watch, rings, recent=sending)
            raise TimeoutError("timed out waiting for a peer")
        if self._spin_end == 0.0:  # a new episode of waiting begins with spinning
            self._spin_end = now + self._spin
        if now < self._spin_end:
            return False
        if (
            self._yield_ns
            and now < self._spin_end + self._yield_ns * 1e-9
            and self.yield_cpu(rings)
        ):
            return False  # (the yield phase: poll again)
        for ring in rings:
            if ring.arm():  # EVENT_IDX handshake: something arrived while arming
                return False
        for p in self._tailed:  # and be woken when a receiver frees room for a tail
            tx = self.tx[p]
            if tx is not None and tx.ring not in rings and tx.ring.arm():
                return False
        if watch >= 0:
            self._check_peer(watch, rings, recent=True)
        else:
            self._refresh()
        slice_s = WATCH_SLICE if deadline is None else min(WATCH_SLICE, deadline - now)
        self.region.heartbeat(self.peer_id)
        if self.notifier.wait(slice_s):
            self._spin_end = 0.0  # kicked: work is likely there, spin again before sleeping
        return True

    def yield_cpu(self, rings: Sequence[Any] = ()) -> bool:
        """One yield of a wait's yield phase (see yield_us): False, nothing done, while waits
        are calm or `yielder` says no; else yield the CPU (os.sched_yield(), or `yielder`)
        and return True. A yield longer than YIELD_LONG_NS makes waits calm for YIELD_CALM_NS
        from then, unless what the wait waits for came meanwhile (one of `rings`, the wait's,
        armed as before a sleep, says so): that yield went to the awaited peer, which answered
        (a sender sharing this CPU that copied a large message meanwhile), as the C lane's
        rx_yield_poll judges it. (Arming early costs at most one kick the peer makes and a
        later doorbell wait that returns at once.)"""
        start = time.monotonic_ns()
        if start < self._calm_until:
            return False
        if self.yielder is None:
            os.sched_yield()
        elif not self.yielder():
            return False
        end = time.monotonic_ns()
        if end - start > YIELD_LONG_NS and not any(ring.arm() for ring in rings):
            self._calm_until = end + YIELD_CALM_NS
        return True

    def _push_tails(self) -> None:
        """Push on the rest of every timed-out send (see send) as far as room allows now. A
        queue that fails (its peer lost, or broken) is left to the next send to that peer,
        which reports it: a wait for something else is not the place."""
        for p in list(self._tailed):
            tx = self.tx[p]
            try:
                done = tx is None or tx.push_tail()
            except (PeerLostError, RingCorruptError):
                done = True
            if done:
                self._tailed.discard(p)

    # ------------------------------------------------------------------ sending
    def _peer_arg(self, p: int) -> int:
        if not (0 <= p < self.region.max_peers) or p == self.peer_id:
            raise ValueError(f"peer {p} is not another peer of this region")
        return p

    def _wait_ready(self, p: int, deadline: float | None) -> None:
        """Block until peer p is READY and our halves are synced with it."""
        while True:
            if self._u64[self._word_i[p]] == self._expect[p]:
                return
            self._check_peer(p)
            if self._sync(p):
                return
            self._idle([], -1, deadline)

    def send(self, dest: int, data: Any, tag: int = 0, timeout: float | None = None) -> None:
        """Send the bytes of `data` (any buffer-protocol object) to peer `dest` with `tag`.

        Blocks while `dest` has not joined yet or its queue is full. `timeout` bounds the whole
        call: TimeoutError if nothing of the message was sent; SendIncompleteError (a
        TimeoutError) if a message larger than the queue's data area timed out after its
        first part was published: its rest is kept (copied) and goes out as the receiver
        frees room, during any later wait of this endpoint (a send, receive or probe, to or
        from any peer) and before the next message to `dest` (see TxChannel.send). Messages to
        one peer arrive in order, whole. Raises PeerLostError if `dest` is gone or restarted,
        ValueError for a bad peer or tag, RingCorruptError if the peer broke the queue.
        """
        # Fast path: a known, ready peer, no rest of an earlier message to send first, and a
        # message that fits one span with room for it.
        tx = self._tx_by_peer.get(dest)
        if (
            tx is not None
            and self._u64[self._word_i[dest]] == self._expect[dest]
            and tx.tail is None
        ):
            try:
                status = tx.ring.send_small(tag, data)
            except (BufferError, TypeError, ValueError):
                status = SEND_FULL  # a bad tag or not a flat buffer: the general path explains
            except PeerLostError:  # (its reclaim, for a large one-span message) as _send
                self._lost(dest)
                raise
            if status == SEND_OK:
                return
            if status == SEND_KICK:
                self.notifier.kick(dest)
                return
        self._send(dest, data, tag, timeout)

    def place(self, dest: int, data: Any, tag: int = 0, timeout: float | None = None) -> int:
        """Write a message for `dest` into its queue without sending it yet; return the region
        offset of its bytes.

        Until `publish_placed(dest)` sends it, the bytes stay the sender's alone, and any peer
        of the region told that offset may copy them in place (`read_placed`): a message
        written once and read by several. Nothing else can be sent to `dest` meanwhile
        (RuntimeError). Raises ValueError if the message does not fit one contiguous
        reservation of the queue; otherwise the errors of send() (TimeoutError: nothing
        placed).
        """
        offset = self._send(dest, data, tag, timeout, place=True)
        assert offset is not None
        return offset

    def send_parts(
        self, dest: int, parts: list[Any], tag: int = 0, timeout: float | None = None
    ) -> None:
        """Send the bytes of `parts` (buffer-protocol objects, each C-contiguous) laid end to
        end as one message to peer `dest` with `tag`, each copied once straight into the
        queue (TxChannel.send_parts). Raises ValueError if the message does not fit one
        contiguous reservation of the queue (send their join instead); otherwise the errors
        of send() (TimeoutError: nothing sent)."""
        self._send(dest, parts, tag, timeout, parts=True)

    def publish_placed(self, dest: int) -> None:
        """Send the message placed for `dest` (see `place`). RuntimeError if there is none."""
        tx = self.tx[self._peer_arg(dest)]
        assert tx is not None
        try:
            tx.publish_placed()
        except PeerLostError:
            self._lost(dest)
            raise

    def read_placed(self, src: int, dst: int, offset: int, into: Any) -> None:
        """Copy the bytes that peer `src` placed for peer `dst` at region `offset` (as many as
        `into` holds) into `into`. `offset` comes from `src`: ValueError naming it if those
        bytes do not lie inside the data area of its queue to `dst`."""
        geometry = self.region.geometry
        if not (0 <= src < geometry.max_peers and 0 <= dst < geometry.max_peers):
            raise ValueError(f"no queue from peer {src} to peer {dst} in this region")
        dest = memoryview(into)
        if dest.readonly or not dest.c_contiguous:
            raise ValueError("read_placed needs a writable contiguous buffer")
        dest = dest.cast("B") if dest.format != "B" or dest.ndim != 1 else dest
        if src == dst:
            raise ValueError(f"peer {src} placed a message for itself")
        start = geometry.queue_offset(src, dst) + geometry.data_rel_offset
        if not start <= offset <= start + geometry.data_size - len(dest):
            raise ValueError(
                f"peer {src}: {len(dest)} placed bytes at region offset {offset} lie outside "
                f"its queue to peer {dst}"
            )
        dest[:] = self.region.buf[offset : offset + len(dest)]

    def _send(
        self,
        dest: int,
        data: Any,
        tag: int,
        timeout: float | None,
        place: bool = False,
        parts: bool = False,
    ) -> int | None:
        """send() past its fast path, or (`place`) place(): the offset of the placed bytes,
        or (`parts`) send_parts() of `data`, a list of parts."""
        if not layout.TAG_MIN <= tag <= layout.TAG_MAX:
            raise ValueError(f"tag {tag} outside {layout.TAG_MIN}..{layout.TAG_MAX}")
        tx = self.tx[self._peer_arg(dest)]
        assert tx is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        self._spin_end = 0.0
        if self._u64[self._word_i[dest]] != self._expect[dest]:
            self._wait_ready(dest, deadline)
        try:
            if place:
                return tx.place(byte_view(data), tag, deadline)
            if parts:
                tx.send_parts(data, tag, deadline)
            else:
                tx.send(byte_view(data), tag, deadline)
        except PeerLostError:
            self._lost(dest)
            raise
        finally:
            if tx.tail is None:
                self._tailed.discard(dest)
            else:
                self._tailed.add(dest)
        return None

    def send_obj(self, obj: Any, dest: int, tag: int = 0, timeout: float | None = None) -> None:
        """Serialise `obj` (msgpack; numpy arrays keep dtype and shape) and send it."""
        self.send(dest, serialize.dumps(obj), tag, timeout)

    # ------------------------------------------------------------------ receiving
    def _take_unexpected(self, source: int, tag: int) -> Message | None:
        queues = self._unexpected if source == ANY_SOURCE else (self._unexpected[source],)
        for queue in queues:
            for message in queue:
                if tag == ANY_TAG or message.tag == tag:
                    return message
        return None

    def _stash(self, channel: RxChannel) -> None:
        """Move the head message of `channel` out of shared memory (a tag did not match)."""
        with channel.take() as message:
            copy = Message(message.source, message.tag, memoryview(bytes(message.data)), None, None)
        self._unexpected[channel.source].append(copy)
        self._unexpected_count += 1

    def _order(self, source: int) -> list[int]:
        if source != ANY_SOURCE:
            return [self._peer_arg(source)]
        others = self._others
        self._rotation = start = (self._rotation + 1) % len(others)
        return others[start:] + others[:start]

    def _match(self, source: int, tag: int) -> Message | RxChannel | None:
        """The first message matching (source, tag), left in place; None if none is there."""
        if self._unexpected_count:
            message = self._take_unexpected(source, tag)
            if message is not None:
                return message
        for p in self._order(source):
            channel = self.rx[p]
            assert channel is not None
            try:
                head = channel.peek()
                while head is not None:
                    if tag == ANY_TAG or head[1] == tag:
                        return channel
                    self._stash(channel)
                    head = channel.peek()
            except PeerLostError:
                self._lost(p)
                if source != ANY_SOURCE:
                    raise
            except RingCorruptError:
                if self._renewed(p):
                    continue
                # A named source reports its broken queue every time; ANY_SOURCE reports it
                # once and then serves the other peers until the culprit rejoins.
                if source != ANY_SOURCE or p not in self._reported:
                    self._reported.add(p)
                    raise
        return None

    def _renewed(self, p: int) -> bool:
        """True (our halves reset or dropped) if slot p now holds an incarnation other than
        the one we are bound to: the broken queue was the gone one's."""
        incarnation = self._u64[self._word_i[p]] >> 32
        known = self._known[p]
        if incarnation in (0, known):
            return False
        self._told[p] = True
        self._reported.discard(p)
        self._sync(p)
        return self._known[p] != known

    def _fast_head(
        self, channel: RxChannel, timeout: float | None
    ) -> tuple[int, int, int, int] | None:
        """The head message's header of `channel`, spinning for it in C; None if none came.

        The spin lasts spin_us, or `timeout` if that is shorter.
        """
        spin_ns = self._spin_ns if timeout is None else min(self._spin_ns, int(timeout * 1e9))
        head = channel.head or self._guarded(channel, _poll_or_spin, channel.ring, spin_ns)
        channel.head = head
        return head

    def _guarded(self, channel: RxChannel, call: Callable[..., Any], *args: Any) -> Any:
        """call(*args) on `channel` with the peer-loss bookkeeping of `_fault` (None where
        that returns)."""
        try:
            return call(*args)
        except (PeerLostError, RingCorruptError) as exc:
            self._fault(channel, exc)
            return None

    def _fault(self, channel: RxChannel, exc: PeerLostError | RingCorruptError) -> None:
        """The bookkeeping of `exc`, raised by a call on `channel`: PeerLostError forgets the
        peer's session and is raised again; RingCorruptError from a peer that came back as a
        new incarnation (our halves now reset) returns, any other is raised again."""
        if isinstance(exc, PeerLostError):
            self._lost(channel.source)
            raise exc
        if not self._renewed(channel.source):
            raise exc
        return None

    def _lost(self, p: int) -> None:
        """Peer p's queue said its session is over (the caller reports it, or ANY_SOURCE
        skips it): bind to the slot's new holder as _sync allows."""
        self._told[p] = True
        self._expect[p] = -1
        self._sync(p)

    def _find(
        self, source: int, tag: int, timeout: float | None, spun: bool = False
    ) -> Message | RxChannel:
        """Wait for a message matching (source, tag); `spun`: the spin phase is already over."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if source != ANY_SOURCE:
            self._peer_arg(source)
        self._spin_end = time.monotonic() if spun else 0.0
        while True:
            found = self._match(source, tag)
            if found is not None:
                return found
            if source == ANY_SOURCE:
                rings = [ch.ring for ch in self.rx if ch is not None]
                self._idle(rings, -1, deadline)
            else:
                channel = self.rx[source]
                assert channel is not None
                if self._u64[self._word_i[source]] != self._expect[source]:
                    known = self._known[source]
                    self._sync(source)
                    if self._known[source] != known:
                        continue  # a new session: poll it before judging the peer lost
                if self._idle([channel.ring], source, deadline):
                    channel.ring.count_sleep()

    def _remove_unexpected(self, message: Message) -> Message:
        self._unexpected[message.source].remove(message)
        self._unexpected_count -= 1
        return message

    def recv(
        self, source: int = ANY_SOURCE, tag: int = ANY_TAG, timeout: float | None = None
    ) -> Message:
        """Receive the next message matching `source` and `tag` (ANY_SOURCE / ANY_TAG match all).

        Returns a Message whose `data` is a zero-copy view where the message is contiguous in
        shared memory: release it (or use `with`) to give the space back. Messages from one
        peer are matched in order; ANY_SOURCE serves peers round-robin. Raises TimeoutError
        (nothing consumed), PeerLostError if `source` is gone with nothing left from it,
        RingCorruptError if the peer broke the queue.
        """
        channel = self._rx_by_peer.get(source)
        spun = False
        if channel is not None and not self._unexpected_count:
            # Fast path: the next message from a named source comes and matches.
            head = self._fast_head(channel, timeout)
            if head is not None and (tag == ANY_TAG or head[3] == tag):
                return channel.take()
            spun = head is None
        found = self._find(source, tag, timeout, spun)
        if isinstance(found, Message):
            return self._remove_unexpected(found)
        return found.take()

    def recv_into(
        self,
        buffer: Any,
        source: int = ANY_SOURCE,
        tag: int = ANY_TAG,
        timeout: float | None = None,
        *,
        bypass_cache: bool = False,
    ) -> tuple[int, int, int]:
        """Receive the next matching message into `buffer`; return (nbytes, source, tag).

        Large messages are copied span by span while the sender writes the next spans;
        `bypass_cache` copies them with stores that bypass the CPU caches (x86 with the C
        ring), for a large buffer that will not be read soon. Raises MessageTooLargeError if
        the message does not fit (it stays queued), and the errors of recv().
        """
        channel = self._rx_by_peer.get(source)
        spun = False
        if channel is not None and not self._unexpected_count:
            # Fast path, as in recv(): spin for the head message as _fast_head does and, if
            # it is one span that fits `buffer` with the wanted tag, take it in the same C
            # call (inline here: this is the blocking receive of every small message).
            if channel.busy:
                self._fast_head(channel, timeout)
            else:
                spin_ns = self._spin_ns
                if timeout is not None and timeout * 1e9 < spin_ns:
                    spin_ns = int(timeout * 1e9)
                try:
                    taken = channel.take_small_into(buffer, tag, spin_ns)
                except BufferError:
                    taken = None  # not a writable buffer: said below
                except (PeerLostError, RingCorruptError) as exc:
                    self._fault(channel, exc)
                    taken = None
                if taken is not None:
                    return taken[0], source, taken[1]
            spun = channel.head is None
        dest = memoryview(buffer)
        if dest.readonly:
            raise ValueError("recv_into needs a writable buffer")
        dest = dest.cast("B") if dest.format != "B" or dest.ndim != 1 else dest
        head = channel.head if channel is not None and not self._unexpected_count else None
        if head is not None and (tag == ANY_TAG or head[3] == tag) and head[2] <= len(dest):
            taken = channel.take_into(dest, bypass_cache)  # type: ignore[union-attr]
            return taken[0], source, head[3]
        found = self._find(source, tag, timeout, spun)
        if isinstance(found, Message):
            if found.nbytes > len(dest):
                raise MessageTooLargeError(found.nbytes, len(dest), found.source, found.tag)
            self._remove_unexpected(found)
            dest[: found.nbytes] = found.data
            return found.nbytes, found.source, found.tag
        first = found.peek()
        assert first is not None
        if first[0] > len(dest):
            raise MessageTooLargeError(first[0], len(dest), found.source, first[1])
        nbytes, msg_tag = found.take_into(dest, bypass_cache)
        return nbytes, found.source, msg_tag

    def take_posted(self, source: int, posted: list[Any], world: int, tag_bits: int) -> int:
        """Take the run of whole messages at the head of peer `source`'s queue into the
        receives a layer above posted (`posted`, a list in post order): the ring's
        take_posted (virtqueue.RxRing.take_posted states the matching: core tag split at
        `tag_bits`, `world` the source the entries name and are told). Returns how many were
        taken (0 also when the queue's head is peeked or held, or messages from `source`
        wait here unexpected: the caller then receives as usual). A lost peer or a broken
        queue also gives 0, with the queue as it was or broken for good: the caller's
        receives (recv, iprobe) meet it and report it by their rules (ANY_SOURCE skips a lost
        peer)."""
        channel = self._rx_by_peer.get(source)
        if channel is None or channel.busy or self._unexpected_count:
            return 0
        try:
            return channel.take_posted(posted, world, tag_bits)
        except PeerLostError:
            self._lost(source)  # as _match does for ANY_SOURCE
            return 0
        except RingCorruptError:
            self._renewed(source)  # a new incarnation's queue: our halves reset
            return 0

    def recv_obj(
        self, source: int = ANY_SOURCE, tag: int = ANY_TAG, timeout: float | None = None
    ) -> Any:
        """Receive a message sent with send_obj and return the object (owning its memory)."""
        with self.recv(source, tag, timeout) as message:
            return serialize.loads(message.data)

    def probe(
        self, source: int = ANY_SOURCE, tag: int = ANY_TAG, timeout: float | None = None
    ) -> tuple[int, int, int]:
        """Wait for a matching message without receiving it; return (source, tag, nbytes)."""
        found = self._find(source, tag, timeout)
        if isinstance(found, Message):
            return found.source, found.tag, found.nbytes
        head = found.peek()
        assert head is not None
        return found.source, head[1], head[0]

    def iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> tuple[int, int, int] | None:
        """Like probe but never blocks: None if no matching message is there now (a peer
        that joined since we last looked is synced with first, as a blocking call would)."""
        if source != ANY_SOURCE:
            self._peer_arg(source)
        found = self._match(source, tag)
        if found is None and self._refresh(source):
            found = self._match(source, tag)
        if found is None:
            return None
        if isinstance(found, Message):
            return found.source, found.tag, found.nbytes
        head = found.peek()
        assert head is not None
        return found.source, head[1], head[0]

    def expect_incarnation(self, p: int, incarnation: int) -> None:
        """Talk to incarnation `incarnation` of peer slot p only, learnt out of band (an MPI
        job's allgather): if this endpoint is bound to another incarnation of p (say the
        previous job's holder, READY when we looked), it forgets it without a PeerLostError,
        and from now on it binds to `incarnation` alone (0: any holder again). Raises
        ValueError for a bad peer."""
        self._peer_arg(p)
        self._want[p] = incarnation
        if self._known[p] not in (0, incarnation) and incarnation:
            self._known[p] = 0
            self._told[p] = False
            self._expect[p] = -1
            self._reset_halves(p, 0)

    # ------------------------------------------------------------------ introspection
    def peers(self) -> list[int]:
        """Ids of the other peers that are READY now."""
        self._refresh()
        return [p for p in self._others if self._expect[p] >= 0]

    def __repr__(self) -> str:
        return (
            f"Endpoint(region={self.region.name!r}, peer={self.peer_id}, "
            f"incarnation={self.incarnation})"
        )
