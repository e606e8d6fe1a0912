"""Split virtqueue halves in shared memory: the pure-Python reference implementation.

`TxRing` is the *driver* half of one one-way queue (the sender): it owns the descriptor table,
the available ring (with `used_event`), the driver line of the control block and the data area,
which it manages as an in-order byte ring. `RxRing` is the *device* half (the receiver): it owns
the used ring (with `avail_event`) and the device line.

Every value the other side wrote is loaded once into a local, validated, and on a violation the
ring is marked broken for good (`RingCorruptError` naming the peer; later calls raise it again).
Private shadows (`_avail_idx`, `_last_used`, ...) are never read back from shared memory.

Memory ordering. This module relies on x86-64 TSO: an aligned 2/4/8-byte store through a
`memoryview.cast` is a single MOV, stores become visible in program order (so a plain store is
a release store) and loads are not reordered with older loads (so a plain load is an acquire
load). The one reordering TSO allows, a later load passing an earlier store, matters for the
EVENT_IDX handshake; `full_fence()` closes it. `ivshmem_comm/__init__.py` refuses this module
on other architectures unless the C fast path (which uses `__atomic` builtins) is built.
Labels: [R1] driver publishes avail.idx <-> [A1] device loads it; [R2] device publishes used.idx
<-> [A2] driver loads it; [F1]/[F2] full fences of the two EVENT_IDX handshakes; [S1]/[S2] the
session words of the two halves.

The C accelerator `ivshmem_comm._fastpath` implements these two classes with the same names,
constructor and methods; `ivshmem_comm.ring` picks one at import.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from ivshmem_comm import layout
from ivshmem_comm.errors import PeerLostError, RingCorruptError

_FENCE_LOCK = threading.Lock()

# Result codes of TxRing.send_small / RxRing.poll, shared with the C implementation.
SEND_OK = 0  # published; no kick needed
SEND_KICK = 1  # published; the device asked to be notified
SEND_FULL = -1  # no descriptor or no contiguous data space: reclaim/wait and retry
SEND_TOO_BIG = -2  # the message needs more than one span: nothing was written
# TxRing.reserve: no room within the cache window while the receiver keeps up, though there
# is room further up (layout.LIVE_RECEIVER_NS): wait for a completion (at most that long).
RESERVE_LATER = -3


def full_fence() -> None:
    """A full memory barrier from pure Python.

    Acquiring a CPython lock runs a LOCK-prefixed compare-and-swap (glibc semaphore or mutex),
    which on x86-64 orders every earlier store before every later load.
    """
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def _check_tag(tag: int) -> None:
    if not layout.TAG_MIN <= tag <= layout.TAG_MAX:
        raise ValueError(f"tag {tag} out of range {layout.TAG_MIN}..{layout.TAG_MAX}")


def compare_exchange_u64(buffer: Any, offset: int, expected: int, desired: int) -> bool:
    """Store `desired` at aligned word `offset` if it holds `expected`; True if it did.

    The reference cannot be atomic between processes (Python has no compare-and-swap): this
    is a load, a compare and a store, serialised only within this process. The C accelerator's
    version is one LOCK CMPXCHG.
    """
    if offset < 0 or offset % 8:
        raise ValueError(f"offset {offset} is not an aligned word")
    words = memoryview(buffer).cast("B")[offset : offset + 8].cast("Q")
    with _FENCE_LOCK:
        if words[0] != expected:
            return False
        words[0] = desired
        return True


class _RingBase:
    """Offsets shared by both halves, as u16/u32/u64 element indices into the region."""

    def __init__(
        self, region_buf: Any, queue_offset: int, geometry: layout.Geometry, peer: int
    ) -> None:
        buf = memoryview(region_buf).cast("B")
        self._buf = buf
        size = buf.nbytes
        self._u16 = buf[: size // 2 * 2].cast("H")
        self._u32 = buf[: size // 4 * 4].cast("I")
        self._u64 = buf[: size // 8 * 8].cast("Q")
        self.peer = peer  # the other side, named in every error
        self.num = q = geometry.queue_num
        self._mask = q - 1
        ring = queue_offset + geometry.ring_rel_offset
        _, avail_rel, used_rel = layout.vring_offsets(q, geometry.vring_align)
        self._desc = ring
        avail = ring + avail_rel
        used = ring + used_rel
        self._avail_flags_i = avail // 2
        self._avail_idx_i = avail // 2 + 1
        self._avail_ring_i = avail // 2 + 2
        self._used_event_i = avail // 2 + 2 + q
        self._used_flags_i = used // 2
        self._used_idx_i = used // 2 + 1
        self._used_ring = used + 4
        self._avail_event_i = (used + 4 + layout.VRING_USED_ELEM.size * q) // 2
        self._driver_line_i = (queue_offset + layout.DRIVER_LINE_OFFSET) // 8
        self._device_line_i = (queue_offset + layout.DEVICE_LINE_OFFSET) // 8
        self._driver_counters_i = (queue_offset + layout.DRIVER_COUNTERS_OFFSET) // 8
        self._device_counters_i = (queue_offset + layout.DEVICE_COUNTERS_OFFSET) // 8
        self.data_offset = queue_offset + geometry.data_rel_offset
        self.data_size = geometry.data_size
        self.max_span = geometry.max_span
        self.session = 0  # the session this half was last reset for; 0: never reset
        self._broken: RingCorruptError | None = None

    def _corrupt(self, field: str, value: object, detail: str) -> RingCorruptError:
        self._broken = RingCorruptError(self.peer, field, value, detail)
        return self._broken

    def mark_broken(self, field: str, value: object, detail: str) -> RingCorruptError:
        """Break the ring for good (a caller found `field` of the peer's data wrong)."""
        return self._corrupt(field, value, detail)

    @property
    def broken(self) -> RingCorruptError | None:
        """The error that broke this ring for good, or None while it is sound."""
        return self._broken

    def _count(self, counters_i: int, index: int, amount: int) -> None:
        # Statistics only: single writer (the line's owner), read by `status` without ordering.
        word = counters_i + index
        self._u64[word] = (self._u64[word] + amount) & 0xFFFFFFFFFFFFFFFF


class TxRing(_RingBase):
    """Driver half of one queue plus the byte-ring allocator of its data area.

    Not thread-safe: one sending thread per queue. Construct, then `reset(session)` before use.
    """

    def __init__(
        self, region_buf: Any, queue_offset: int, geometry: layout.Geometry, peer: int
    ) -> None:
        super().__init__(region_buf, queue_offset, geometry, peer)
        self._avail_idx = 0  # shadow of avail.idx: next index to publish
        self._last_used = 0  # next used-ring index to consume
        self._synced = False  # the device acknowledged our session
        # Byte ring: data-relative [start, end) of every published descriptor, oldest first.
        self._inflight: collections.deque[tuple[int, int]] = collections.deque()
        self._head = 0  # where the next allocation starts
        self._reserve_cursor = 0  # next unpublished byte of the open reservation
        self._reserve_end = -1  # end of the open reservation; -1: none open
        # After a reservation found no room: the used index at which enough will be free
        # (arm asks to be kicked only then, not at every completion); None: none waits.
        self._wake_at: int | None = None
        # time.monotonic_ns() of the last reclaim that took completions back: the receiver
        # is live (keeping up) for layout.LIVE_RECEIVER_NS after it (see reserve). Since
        # `_later_ns` reservations get RESERVE_LATER (0: none); once that lasted that long,
        # the queue is `_cooled`: no more waiting for the window until the head is back at
        # the bottom (a receiver that takes in bursts costs one such wait per pass).
        self._live_ns = self._later_ns = 0
        self._cooled = False

    # ---------------------------------------------------------------- session
    def reset(self, session: int) -> None:
        """Forget everything in flight and start session `session` (owner: this driver).

        Order: [S1] the session word goes to 0 first, so a device that sees the reset
        indices also sees that the session it knew is over; then the indices; then the new
        session, published last.
        """
        self._u64[self._driver_line_i] = 0
        self._u16[self._avail_idx_i] = 0
        self._u16[self._avail_flags_i] = 0
        self._u16[self._used_event_i] = 0
        self._avail_idx = self._last_used = 0
        self._inflight.clear()
        self._head = self._reserve_cursor = 0
        self._reserve_end = -1
        self._wake_at = None
        self._live_ns = self._later_ns = 0
        self._cooled = False
        self._broken = None
        self._synced = False
        self.session = session
        self._u64[self._driver_line_i] = session  # [S1] release: after the reset above

    def check_sync(self) -> bool:
        """True once the device half holds our session ([S2] load; pairs with its reset)."""
        if not self._synced and self.session and self._u64[self._device_line_i] == self.session:
            self._synced = True
        return self._synced

    # ---------------------------------------------------------------- completions
    def reclaim(self) -> int:
        """Consume the used ring: free every completed descriptor's span. Returns how many.

        Raises RingCorruptError (ring broken) on a used index or element that breaks the
        protocol, PeerLostError if the device half left our session.
        """
        if self._broken is not None:
            raise self._broken
        if not self._synced and not self.check_sync():
            return 0
        used_idx = self._u16[self._used_idx_i]  # [A2] acquire; pairs with the device's [R2]
        pending = (used_idx - self._last_used) & 0xFFFF
        if pending == 0:
            return 0
        if self._u64[self._device_line_i] != self.session:  # [S2]
            self._synced = False
            raise PeerLostError(self.peer, "receiver restarted or left this queue's session")
        in_flight = (self._avail_idx - self._last_used) & 0xFFFF
        if pending > in_flight:
            raise self._corrupt(
                "used.idx", used_idx, f"{pending} completions but {in_flight} in flight"
            )
        elem = layout.VRING_USED_ELEM
        for _ in range(pending):
            slot = self._last_used & self._mask
            used_id, used_len = elem.unpack_from(self._buf, self._used_ring + 8 * slot)
            if used_id != slot:  # IN_ORDER: completions come back in publication order
                raise self._corrupt("used.ring.id", used_id, f"expected in-order id {slot}")
            start, end = self._inflight.popleft()
            if used_len > end - start:
                raise self._corrupt("used.ring.len", used_len, f"span is {end - start} bytes")
            self._last_used = (self._last_used + 1) & 0xFFFF
        self._live_ns = time.monotonic_ns()
        if not self._inflight and self._reserve_end < 0:
            self._head = 0  # empty: restart at the bottom, so big messages stay contiguous
        return pending

    @property
    def in_flight(self) -> int:
        """Descriptors published and not yet completed."""
        return (self._avail_idx - self._last_used) & 0xFFFF

    # ---------------------------------------------------------------- allocation
    def _tail(self) -> int:
        if self._inflight:
            return self._inflight[0][0]
        if self._reserve_end >= 0:
            return self._reserve_cursor
        return -1  # empty

    def reserve(self, nbytes: int) -> int:
        """Reserve `nbytes` contiguous bytes of the data area; return their region offset.

        Returns -1 if no such space, or not enough free descriptors for its pieces of
        layout.pipe_span bytes, is free now (reclaim, wait, retry); RESERVE_LATER if there is
        room only past the cache window while the receiver keeps up (layout.LIVE_RECEIVER_NS:
        reclaim, wait at most that long, retry: past it the room further up is given). The
        reservation is then published piece by piece with `publish`. Raises ValueError if
        `nbytes` can never fit, RuntimeError if a reservation is already open.
        """
        if self._broken is not None:  # a broken queue fails fast: nothing more is published
            raise self._broken
        if self._reserve_end >= 0:
            raise RuntimeError("a reservation is already open")
        size = layout.align_up(nbytes, layout.SPAN_ALIGN)
        if not 0 < size <= self.data_size:
            raise ValueError(f"{nbytes} bytes never fit a {self.data_size}-byte data area")
        span = layout.pipe_span(nbytes, self.max_span, self.num)
        pieces = -(-nbytes // span)  # descriptors the reservation will publish
        tail = self._tail()
        start = 0
        if tail >= 0:
            soft = False
            if 2 * size <= layout.CACHE_WINDOW < self.data_size and not self._cooled:
                now = time.monotonic_ns()
                soft = now - self._live_ns < layout.LIVE_RECEIVER_NS
                if soft and self._later_ns and now - self._later_ns >= layout.LIVE_RECEIVER_NS:
                    soft, self._cooled = False, True
            descriptors = self.in_flight + pieces <= self.num
            start = self._space_at(tail, size, soft) if descriptors else -1
            if start < 0:
                self._note_wait(size, pieces, soft)
                if soft and descriptors and self._space_at(tail, size) >= 0:
                    self._later_ns = self._later_ns or now
                    return RESERVE_LATER
                return -1
        self._later_ns = 0
        if start == 0:
            self._cooled = False
        self._wake_at = None
        self._head = start + size
        self._reserve_cursor = start
        self._reserve_end = start + size
        return self.data_offset + start

    def _note_wait(self, size: int, pieces: int, soft: bool) -> None:
        """A reservation of `size` bytes in `pieces` descriptors found no room (`soft`: within
        the cache window): remember the used index at which it will (the fewest completions
        of what is in flight that free both), for arm()."""
        in_flight = self.in_flight
        need = 1
        for need in range(1, in_flight + 1):
            if need == in_flight:
                break
            if (
                in_flight - need + pieces <= self.num
                and self._space_at(self._inflight[need][0], size, soft) >= 0
            ):
                break
        self._wake_at = (self._last_used + need) & 0xFFFF

    def _space_at(self, tail: int, size: int, soft: bool = False) -> int:
        """Where `size` bytes fit were the oldest span in flight to start at `tail`, or -1.
        `soft` (the receiver keeps up): only within the cache window, once the head is in it."""
        head = self._head
        if soft and head + size > layout.CACHE_WINDOW:
            return 0 if head > tail >= size else -1
        if head > tail:
            window = layout.CACHE_WINDOW
            if head >= window and tail >= window and tail >= size:  # wrap early: in cache
                return 0
            if self.data_size - head >= size:
                return head
            return 0 if tail >= size else -1
        if head < tail and tail - head >= size:
            return head
        return -1

    def publish(self, offset: int, length: int, last: bool) -> bool:
        """Publish `length` bytes at region `offset` of the open reservation as a descriptor.

        `offset` must be where the previous piece ended; `last` closes the reservation (its
        aligned remainder goes with this descriptor). Returns True iff the device must be
        kicked (EVENT_IDX says so, or it has not yet joined our session).
        """
        rel = offset - self.data_offset
        if rel != self._reserve_cursor or rel + length > self._reserve_end:
            raise RuntimeError("publish outside the open reservation")
        if self.in_flight >= self.num:
            raise RuntimeError(f"publish with all {self.num} descriptors in flight")
        end = self._reserve_end if last else rel + layout.align_up(length, layout.SPAN_ALIGN)
        slot = self._avail_idx & self._mask
        layout.VRING_DESC.pack_into(self._buf, self._desc + 16 * slot, offset, length, 0, 0)
        self._u16[self._avail_ring_i + slot] = slot
        self._inflight.append((rel, end))
        if last:
            self._reserve_end = -1
        else:
            self._reserve_cursor = end
        return self._publish_idx(1)

    def _publish_idx(self, count: int) -> bool:
        old = self._avail_idx
        new = self._avail_idx = (old + count) & 0xFFFF
        self._u16[self._avail_idx_i] = new  # [R1] release: after the descriptor and ring slot
        full_fence()  # [F1] our avail.idx store before the avail_event load below
        avail_event = self._u16[self._avail_event_i]
        kick = layout.need_event(avail_event, new, old) or not self._synced
        if kick:
            self._count(self._driver_counters_i, 3, 1)
        return kick

    def send_small(self, tag: int, data: Any) -> int:
        """Send one message that fits one span: header + `data` (any C-contiguous buffer).

        Returns SEND_OK or SEND_KICK when published, SEND_FULL when there is no room now
        (nothing was written; reclaim, wait and retry), RESERVE_LATER when reserve says so
        (nothing was written; as SEND_FULL, but wait at most layout.LIVE_RECEIVER_NS),
        SEND_TOO_BIG when the header and `data` exceed max_span (nothing was written; send it
        in pieces). A message of at least
        layout.RECLAIM_FIRST bytes reclaims first (and raises what reclaim raises).
        """
        _check_tag(tag)
        data = memoryview(data).cast("B")  # any C-contiguous buffer, as the C path takes
        length = layout.SPAN_HEADER_SIZE + len(data)
        if length > self.max_span:
            return SEND_TOO_BIG
        if len(data) >= layout.RECLAIM_FIRST and self.in_flight:
            self.reclaim()  # an emptied queue restarts at the bottom: in cache
        offset = self.reserve(length)
        if offset < 0:
            return RESERVE_LATER if offset == RESERVE_LATER else SEND_FULL
        layout.SPAN_HEADER.pack_into(self._buf, offset, len(data), tag, layout.HDR_F_FIRST)
        start = offset + layout.SPAN_HEADER_SIZE
        self._buf[start : start + len(data)] = data
        self.count_message(len(data))
        return SEND_KICK if self.publish(offset, length, True) else SEND_OK

    def publish_payload(self, start: int, data: Any, published: int) -> tuple[int, bool]:
        """Write and publish the rest of a contiguous message reserved at region `start`.

        The header is written at `start` and `published` bytes of the reservation (header
        included) are out; the payload `data` goes in spans of layout.pipe_span bytes laid
        end to end, the first span carrying the header. Stops when all is published or after a
        publication that must be kicked: returns (published, kick) for the caller to kick and
        call again. ValueError for a bad `published`; otherwise errors as write()/publish().
        """
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        header = layout.SPAN_HEADER_SIZE
        total = header + len(view)  # bytes of the reservation
        if not 0 <= published <= total:
            raise ValueError(f"{published} of {total} bytes published")
        kick = False
        span = layout.pipe_span(total, self.max_span, self.num)
        while published < total and not kick:
            piece = min(span, total - published)
            skip = max(header - published, 0)  # the header is written already
            if piece > skip:
                at = published + skip - header  # where in the payload this piece starts
                self.write(start + published + skip, view[at : at + piece - skip])
            kick = self.publish(start + published, piece, published + piece == total)
            published += piece
        return published, kick

    def write(self, offset: int, data: Any) -> None:
        """Copy `data` (a byte memoryview) to region `offset` inside the open reservation."""
        self._buf[offset : offset + len(data)] = data

    def write_header(self, offset: int, total: int, tag: int) -> None:
        """Write a first-span header at region `offset` inside the open reservation."""
        _check_tag(tag)
        layout.SPAN_HEADER.pack_into(self._buf, offset, total, tag, layout.HDR_F_FIRST)

    def count_message(self, nbytes: int) -> None:
        """Add one message of `nbytes` to the driver line's counters (owner: this driver)."""
        self._count(self._driver_counters_i, 0, 1)
        self._count(self._driver_counters_i, 1, nbytes)

    def count_full_wait(self) -> None:
        self._count(self._driver_counters_i, 2, 1)

    # ---------------------------------------------------------------- waiting
    def arm(self) -> bool:
        """Ask to be kicked at the completion that makes room for the reservation that last
        found none, else at the next one; True if it already arrived (don't sleep).

        [F2] pairs with the device's fence between its used.idx store and used_event load.
        """
        ahead = 1
        if self._wake_at is not None:
            ahead = (self._wake_at - self._last_used) & 0xFFFF
            if not 0 < ahead <= self.in_flight:
                ahead = 1
        self._u16[self._used_event_i] = (self._last_used + ahead - 1) & 0xFFFF
        full_fence()
        arrived = (self._u16[self._used_idx_i] - self._last_used) & 0xFFFF
        return arrived >= ahead or not self.check_sync()


class RxRing(_RingBase):
    """Device half of one queue: peeks published spans, validates them, completes them in order.

    Not thread-safe: one receiving thread per queue. Construct, then `reset(session)`.
    """

    def __init__(
        self, region_buf: Any, queue_offset: int, geometry: layout.Geometry, peer: int
    ) -> None:
        super().__init__(region_buf, queue_offset, geometry, peer)
        self._next_avail = 0  # next available-ring index to peek
        self._avail_seen = 0  # last avail.idx loaded (validated)
        self._last_used = 0  # shadow of used.idx
        self._synced = False
        self._data_end = self.data_offset + self.data_size

    def reset(self, session: int) -> None:
        """Drop everything unread and start session `session` (owner: this device).

        [S2] order as in TxRing.reset: session to 0, indices, then the new session.
        """
        self._u64[self._device_line_i] = 0
        self._u16[self._used_idx_i] = 0
        self._u16[self._used_flags_i] = 0
        self._u16[self._avail_event_i] = 0
        self._next_avail = self._avail_seen = self._last_used = 0
        self._broken = None
        self._synced = False
        self.session = session
        self._u64[self._device_line_i] = session  # [S2] release: after the reset above

    def check_sync(self) -> bool:
        """True once the driver half holds our session ([S1] load; pairs with its reset)."""
        if not self._synced and self.session and self._u64[self._driver_line_i] == self.session:
            self._synced = True
        return self._synced

    @property
    def held(self) -> int:
        """Spans peeked and not yet completed."""
        return (self._next_avail - self._last_used) & 0xFFFF

    def poll(self) -> tuple[int, int] | None:
        """Peek the next published span: return (region offset, length), or None if none.

        The span stays owned by this device until `complete`. Raises RingCorruptError on an
        index, ring entry or descriptor that breaks the protocol (the ring is then broken for
        good), PeerLostError if the driver left our session.
        """
        if self._broken is not None:
            raise self._broken
        if self._next_avail == self._avail_seen:
            if not self._synced and not self.check_sync():
                return None
            avail_idx = self._u16[self._avail_idx_i]  # [A1] acquire; pairs with [R1]
            if avail_idx == self._avail_seen:
                return None
            if self._u64[self._driver_line_i] != self.session:  # [S1], after [A1]
                self._synced = False
                raise PeerLostError(self.peer, "sender restarted or left this queue's session")
            if (avail_idx - self._last_used) & 0xFFFF > self.num:
                raise self._corrupt(
                    "avail.idx", avail_idx, f"more than {self.num} entries ahead of used.idx"
                )
            if (avail_idx - self._next_avail) & 0xFFFF > self.num:
                raise self._corrupt("avail.idx", avail_idx, "moved backwards")
            self._avail_seen = avail_idx
        slot = self._next_avail & self._mask
        head = self._u16[self._avail_ring_i + slot]
        if head != slot:  # IN_ORDER: descriptors are made available in table order
            raise self._corrupt("avail.ring", head, f"expected in-order head {slot}")
        addr, length, flags, _next = layout.VRING_DESC.unpack_from(
            self._buf, self._desc + 16 * slot
        )
        if flags != 0:
            raise self._corrupt(f"desc[{slot}].flags", flags, "NEXT/WRITE/INDIRECT not used")
        if addr < self.data_offset or addr % layout.SPAN_ALIGN:
            raise self._corrupt(f"desc[{slot}].addr", addr, "outside this queue's data area")
        if length == 0 or length > self.max_span or addr + length > self._data_end:
            raise self._corrupt(
                f"desc[{slot}].len", length, f"span at {addr} must lie in the data area"
            )
        self._next_avail = (self._next_avail + 1) & 0xFFFF
        return addr, length

    def read_header(self, offset: int, length: int) -> tuple[int, int]:
        """Decode the first-span header at `offset` of a peeked span: return (total, tag).

        Raises RingCorruptError if the header breaks the framing (ring broken for good).
        """
        if length < layout.SPAN_HEADER_SIZE:
            raise self._corrupt("span.len", length, "first span shorter than its header")
        total, tag, flags = layout.SPAN_HEADER.unpack_from(self._buf, offset)
        if flags != layout.HDR_F_FIRST:
            raise self._corrupt("header.flags", flags, "expected the first-span flag")
        if total > layout.MAX_MESSAGE or length - layout.SPAN_HEADER_SIZE > total:
            raise self._corrupt("header.total", total, f"first span carries {length} bytes")
        if tag < 0:
            raise self._corrupt("header.tag", tag, "tags are non-negative")
        return total, tag

    def poll_header(self) -> tuple[int, int, int, int] | None:
        """poll() and read_header() fused: (offset, length, total, tag) of the next first span.

        Returns None if no span is published. Same errors as poll() and read_header().
        """
        span = self.poll()
        if span is None:
            return None
        total, tag = self.read_header(*span)
        self.count_message(total)  # a message is counted when its header is read
        return span[0], span[1], total, tag

    def wait_header(self, spin_ns: int) -> tuple[int, int, int, int] | None:
        """poll_header() repeated for up to `spin_ns` nanoseconds; None if nothing came."""
        end = time.monotonic_ns() + spin_ns
        while True:
            head = self.poll_header()
            if head is not None or time.monotonic_ns() >= end:
                return head

    def recv_small_into(
        self, dest: Any, want_tag: int, spin_ns: int
    ) -> tuple[int, int, bool, tuple[int, int, int, int] | None] | None:
        """wait_header(spin_ns) and, if the message that came is one span that fits `dest` and
        carries `want_tag` (any if negative), its copy into `dest` and its completion.

        Returns None when no message came, else one shape, (nbytes, tag, kick, head): `head`
        None when the message was taken (the caller then holds no span); when not taken,
        `head` is the header as poll_header() gives it (the caller keeps it as the peeked
        head, holding its span) and `kick` is False. BufferError (nothing taken) if `dest`
        is not a writable buffer.
        """
        view = memoryview(dest)
        if view.readonly:
            raise BufferError("recv_small_into needs a writable buffer")
        head = self.wait_header(spin_ns)
        if head is None:
            return None
        offset, length, total, tag = head
        if length - layout.SPAN_HEADER_SIZE != total or total > view.nbytes:
            return total, tag, False, head
        if want_tag >= 0 and tag != want_tag:
            return total, tag, False, head
        self.read_into(offset + layout.SPAN_HEADER_SIZE, view.cast("B"), 0, total)
        return total, tag, self.complete(1), None

    def take_posted(
        self, posted: list[Any], source: int, tag_bits: int
    ) -> tuple[int, bool, tuple[int, int, int, int] | None]:
        """Take, in queue order, the messages at the head of this queue that are all published
        (every span) into the receives of `posted` (a list, in post order) they match; stop
        at the first message that cannot be taken so (none there yet; no entry matches; the
        first match is neither plain nor an object entry, or its view is too small; a message
        of several spans not all out yet).

        A message of core tag t matches the first entry e with e.ctx == t >> tag_bits, e.src
        < 0 (any) or == `source`, and e.want_tag < 0 (any) or == t & (2**tag_bits - 1) (its
        tag). A plain entry (sink and mpi None, view a writable buffer) gets the bytes in its
        view, an object entry (sink, mpi and view None) a new bytes object of them as its
        obj; either then gets source = `source`, tag = the message's tag, count = its length,
        done = True, and leaves `posted`. Returns (taken, kick, head): the number taken,
        whether the sender must be kicked, and the header of the message it stopped at as
        poll_header() gives it (the caller keeps it as the peeked head, holding its span), or
        None.
        Entries are read as the matching reaches them; one lacking a field stops the run
        there (the caller's own matching then meets it). TypeError or ValueError for bad
        arguments (nothing taken); the ring's errors.
        """
        if type(posted) is not list:
            raise TypeError("take_posted: posted must be a list")
        if not 0 <= tag_bits <= 31:
            raise ValueError("take_posted: arguments out of range")
        mask = (1 << tag_bits) - 1
        taken, kick = 0, False
        while posted:
            head = self.poll_header()
            if head is None:
                break
            offset, length, total, coretag = head
            index = self._posted_match(posted, coretag >> tag_bits, source, coretag & mask)
            if index < 0:
                return taken, kick, head
            entry = posted[index]
            obj = entry.view is None  # (an object entry: _posted_match took no other)
            if not obj:
                try:
                    view = memoryview(entry.view)
                except TypeError:
                    return taken, kick, head
                if view.readonly or not view.contiguous or total > view.nbytes:
                    return taken, kick, head
            spans = self._spans_ready(offset, length, total)
            if spans is None:
                return taken, kick, head
            dest = memoryview(bytearray(total)) if obj else view.cast("B")
            copied = length - layout.SPAN_HEADER_SIZE
            self.read_into(offset + layout.SPAN_HEADER_SIZE, dest, 0, copied)
            for span_offset, span_length in spans:
                self.read_into(span_offset, dest, copied, span_length)
                copied += span_length
            self._next_avail = (self._next_avail + len(spans)) & 0xFFFF
            kick = self.complete(1 + len(spans)) or kick
            taken += 1
            del posted[index]  # (by place: entries need not be told apart by ==)
            entry.source, entry.tag, entry.count = source, coretag & mask, total
            if obj:
                entry.obj = bytes(dest)
            entry.done = True
        return taken, kick, None

    def _spans_ready(self, offset: int, length: int, total: int) -> list[tuple[int, int]] | None:
        """The spans after the first (polled: at region `offset`, `length` bytes) of a message
        of `total` bytes, as (offset, length), if every one is published; else None. Polls
        them to look, then puts them back: nothing is consumed. Raises RingCorruptError
        (ring broken) for a span that runs past the message ("span.len") or, in a contiguous
        one, lies elsewhere than right after the previous ("span.addr"); the ring's errors."""
        saved = self._next_avail
        left = total - (length - layout.SPAN_HEADER_SIZE)
        contiguous = (  # layout.is_contiguous
            layout.SPAN_HEADER_SIZE + total <= self.data_size
            and layout.span_count(total, self.max_span) <= self.num // 2
        )
        expected = offset + length
        spans: list[tuple[int, int]] = []
        try:
            while left > 0:
                span = self.poll()
                if span is None:
                    return None
                if span[1] > left:
                    raise self._corrupt("span.len", span[1], f"{left} bytes left")
                if contiguous and span[0] != expected:
                    raise self._corrupt("span.addr", span[0], f"expected contiguous {expected}")
                spans.append(span)
                left -= span[1]
                expected = span[0] + span[1]
        finally:
            self._next_avail = saved
        return spans

    @staticmethod
    def _posted_match(posted: list[Any], key: int, source: int, tag: int) -> int:
        """take_posted's match: the index of the first entry of `posted` matching (key,
        source, tag) if it is plain or an object entry, else -1 (none matches, it is
        neither, or an entry lacks a field)."""
        try:
            for index, entry in enumerate(posted):
                if (
                    entry.ctx == key
                    and (entry.src < 0 or entry.src == source)
                    and (entry.want_tag < 0 or entry.want_tag == tag)
                ):
                    sink, mpi, _view = entry.sink, entry.mpi, entry.view  # (all read, as in C)
                    return index if sink is None and mpi is None else -1
        except AttributeError:
            pass
        return -1

    def read_into(self, src_offset: int, dest: Any, dest_offset: int, length: int) -> None:
        """Copy `length` bytes at region `src_offset` of a held span into `dest[dest_offset:]`."""
        view = memoryview(dest).cast("B") if not isinstance(dest, memoryview) else dest
        view[dest_offset : dest_offset + length] = self._buf[src_offset : src_offset + length]

    def stream_into(
        self, dest: Any, copied: int, total: int, expected: int, spin_ns: int, bypass_cache: bool
    ) -> tuple[int, int, bool]:
        """Copy the rest of a message being taken into `dest[copied:]`, span by span.

        `bypass_cache` asks for stores that bypass the caches (the C ring; this reference
        copies plainly: the same bytes).
        Each span is completed as soon as it is copied (the caller holds no span). Stops when
        `total` bytes are in, when a completion must be kicked, or when no span came for
        `spin_ns` nanoseconds; returns (copied, expected, kick) for the caller to kick and/or
        wait and call again. `expected` is the region offset the next span must start at (a
        contiguous message), or -1 for any. Raises RingCorruptError (ring broken) for a span
        that runs past the message ("span.len") or lies elsewhere than expected ("span.addr"),
        ValueError if `total` bytes do not fit `dest`.
        """
        view = memoryview(dest).cast("B") if not isinstance(dest, memoryview) else dest
        if not 0 <= copied <= total <= len(view):
            raise ValueError(f"{copied} of {total} bytes do not fit a {len(view)}-byte buffer")
        kick = False
        idle_since = None
        while copied < total and not kick:
            span = self.poll()
            if span is None:
                now = time.monotonic_ns()
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= spin_ns:
                    break
                continue
            idle_since = None
            offset, length = span
            if length > total - copied:
                raise self._corrupt("span.len", length, f"{total - copied} bytes left")
            if expected >= 0 and offset != expected:
                raise self._corrupt("span.addr", offset, f"expected contiguous {expected}")
            self.read_into(offset, view, copied, length)
            copied += length
            if expected >= 0:
                expected = offset + length
            kick = self.complete(1)
        return copied, expected, kick

    def complete(self, count: int) -> bool:
        """Give the oldest `count` held spans back to the driver. True iff it must be kicked.

        Raises ValueError if fewer than `count` spans are held.
        """
        if not 0 < count <= self.held:
            raise ValueError(f"cannot complete {count} of {self.held} held spans")
        old = self._last_used
        elem = layout.VRING_USED_ELEM
        for i in range(count):
            slot = (old + i) & self._mask
            elem.pack_into(self._buf, self._used_ring + 8 * slot, slot, 0)
        new = self._last_used = (old + count) & 0xFFFF
        self._u16[self._used_idx_i] = new  # [R2] release: after the used elements
        full_fence()  # [F2] our used.idx store before the used_event load below
        kick = layout.need_event(self._u16[self._used_event_i], new, old)
        if kick:
            self._count(self._device_counters_i, 3, 1)
        return kick

    def count_message(self, nbytes: int) -> None:
        """Add one message of `nbytes` to the device line's counters (owner: this device)."""
        self._count(self._device_counters_i, 0, 1)
        self._count(self._device_counters_i, 1, nbytes)

    def count_sleep(self) -> None:
        self._count(self._device_counters_i, 2, 1)

    def arm(self) -> bool:
        """Ask to be kicked at the next publication; True if one already arrived (don't sleep).

        [F1] pairs with the driver's fence between its avail.idx store and avail_event load.
        """
        self._u16[self._avail_event_i] = self._next_avail
        full_fence()
        if not self._synced:
            return self.check_sync()
        return self._u16[self._avail_idx_i] != self._avail_seen or (
            self._next_avail != self._avail_seen
        )
