"""Channels: messages on top of one queue half. `TxChannel` sends, `RxChannel` receives.

A message is a header (total length, tag) followed by its payload, carried in one or more
spans of the queue's data area. A message that `layout.is_contiguous` admits is reserved in
one piece and published in spans laid end to end, so the receiver can hold it as a single
zero-copy view; a larger one is streamed span by span and copied out as it arrives, so it
may be far larger than the data area. Either way the receiver may copy spans out while the
sender writes the next ones: that is how `recv_into` overlaps the two copies on two cores.

Waiting is the endpoint's business: a channel calls `wait(deadline)`, which returns when the
ring may have moved, or raises TimeoutError / PeerLostError.
"""

from __future__ import annotations

import collections
import time
import warnings
from collections.abc import Callable
from typing import Any

from ivshmem_comm import layout
from ivshmem_comm.errors import RingCorruptError, SendIncompleteError, TimeoutError
from ivshmem_comm.ring import RESERVE_LATER, SEND_FULL, SEND_KICK, SEND_TOO_BIG

Wait = Callable[[float | None], None]
STALL_TIMEOUT = 10.0  # seconds a receiver waits for the next span inside a message
# How long a receiver spins for the next span of a message before it sleeps on the doorbell
# (RxChannel.mid_spin_ns): at most this long, and MID_SPIN_FACTOR times the endpoint's spin
# (Endpoint.spin_us; short where ranks outnumber the CPUs: a receiver spinning mid-message
# there takes the CPU from the very sender it waits for).
STREAM_SPIN_NS = 200_000
MID_SPIN_FACTOR = 4
PREALLOC_MAX = 256 << 20  # largest streamed message given all its memory up front
Kick = Callable[[], None]


def byte_view(data: Any) -> memoryview:
    """A flat, C-contiguous byte view of any buffer-protocol object (copying only if needed)."""
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class TxChannel:
    """Sends messages to one peer through the driver half of one queue."""

    def __init__(
        self, ring: Any, geometry: layout.Geometry, kick: Kick, wait: Wait, dest: int = -1
    ) -> None:
        self.ring = ring
        self.dest = dest  # the receiving peer's id, for errors (-1: not known)
        self._geometry = geometry
        self._kick = kick
        self._wait = wait
        self._placed: tuple[int, int] | None = None  # (offset, total) of a placed message
        # The unsent rest of a streamed message whose send timed out, (rest, sent, total):
        # it must go out before any other message on this queue (see send).
        self.tail: tuple[memoryview, int, int] | None = None

    def reset(self) -> None:
        """Drop the unsent rest of a message (the queue was reset for a new session: the
        receiver it was for is gone)."""
        self.tail = None

    def send(self, data: memoryview, tag: int, deadline: float | None) -> None:
        """Send `data` (a flat byte view) with `tag`; block while the queue is full.

        `deadline` (time.monotonic) bounds the whole call. Raises TimeoutError when nothing
        of this message was sent; SendIncompleteError (a TimeoutError) when a streamed
        message timed out after its first span was published: nothing is lost, the rest is
        copied into memory of the channel's own (`tail`) and goes out first at the next send
        or place, whose deadline bounds it (that call raises TimeoutError, its own message
        unsent, if the rest does not fit in time), or earlier through `push_tail`. Meanwhile a
        receiver that is taking the message waits for the rest up to its stall timeout, then
        raises RingCorruptError naming this sender (the message is then never delivered, and
        both sides are told).
        Also raises PeerLostError, RingCorruptError.
        """
        if self.tail is not None:
            self._send_tail(deadline)
        ring = self.ring
        status = ring.send_small(tag, data)
        while status in (SEND_FULL, RESERVE_LATER):
            self._wait_space(deadline, status == RESERVE_LATER)
            status = ring.send_small(tag, data)
        if status == SEND_KICK:
            self._kick()
        if status != SEND_TOO_BIG:
            return
        if layout.is_contiguous(len(data), self._geometry):
            self._send_contiguous(data, tag, deadline)
        else:
            self._send_streamed(data, tag, deadline)
        ring.count_message(len(data))

    def place(self, data: memoryview, tag: int, deadline: float | None) -> int:
        """Write a message into one contiguous reservation without publishing it: return the
        region offset of its bytes. They are this sender's alone until `publish_placed`
        (nothing else can be sent to this peer meanwhile: the ring refuses a second
        reservation), so other peers told the offset may read them in place meanwhile.
        Raises ValueError if the message cannot be one reservation, TimeoutError (nothing
        placed), PeerLostError, RingCorruptError."""
        offset = self._write_whole([data], len(data), tag, deadline)
        self._placed = (offset, len(data))
        return offset + layout.SPAN_HEADER_SIZE

    def publish_placed(self) -> None:
        """Send the placed message (see `place`). RuntimeError if none is placed."""
        if self._placed is None:
            raise RuntimeError("no placed message to publish")
        (offset, total), self._placed = self._placed, None
        self._publish_written(offset, total)

    def send_parts(self, parts: list[Any], tag: int, deadline: float | None) -> None:
        """Send the bytes of `parts` (buffer-protocol objects, each C-contiguous), laid end
        to end, as one message with `tag`: each part is copied once, straight into the
        queue (no joined copy of them is made). Blocks while the queue is full; `deadline` as
        send's (TimeoutError: nothing of this message sent). Raises ValueError if the
        message cannot be one contiguous reservation (see `place`; send a joined copy
        instead), PeerLostError, RingCorruptError."""
        views = [byte_view(part) for part in parts]
        total = sum(len(view) for view in views)
        self._publish_written(self._write_whole(views, total, tag, deadline), total)

    def _write_whole(
        self, views: list[memoryview], total: int, tag: int, deadline: float | None
    ) -> int:
        """Write a message of `total` bytes, `views` laid end to end, with its header into
        one contiguous reservation (the unsent rest of an earlier message first), unpublished:
        return the reservation's region offset. ValueError if it cannot be one, TimeoutError
        (nothing written), PeerLostError, RingCorruptError."""
        if not layout.is_contiguous(total, self._geometry):
            raise ValueError(f"{total} bytes do not fit one reservation of this queue")
        if self.tail is not None:
            self._send_tail(deadline)
        ring = self.ring
        if ring.in_flight:
            ring.reclaim()  # as _send_contiguous: an emptied queue restarts at the bottom
        offset = self._reserve(layout.SPAN_HEADER_SIZE + total, deadline)
        ring.write_header(offset, total, tag)
        at = offset + layout.SPAN_HEADER_SIZE
        for view in views:
            ring.write(at, view)
            at += len(view)
        return offset

    def _publish_written(self, offset: int, total: int) -> None:
        """Publish the reservation at `offset` holding a whole message of `total` bytes (its
        header and payload written) in spans of layout.pipe_span, kicking as the ring asks."""
        ring, geometry = self.ring, self._geometry
        end = offset + layout.SPAN_HEADER_SIZE + total
        span = layout.pipe_span(end - offset, geometry.max_span, geometry.queue_num)
        while offset < end:
            length = min(span, end - offset)
            if ring.publish(offset, length, offset + length == end):
                self._kick()
            offset += length
        ring.count_message(total)

    def _reserve(self, nbytes: int, deadline: float | None) -> int:
        while True:
            offset = self.ring.reserve(nbytes)
            if offset >= 0:
                return offset
            self._wait_space(deadline, offset == RESERVE_LATER)

    def _wait_space(self, deadline: float | None, later: bool = False) -> None:
        """Wait for room after a failed reservation. `later` (RESERVE_LATER: room is there
        further up, the ring waits for room in the cache window while the receiver keeps up):
        wait at most layout.LIVE_RECEIVER_NS, after which the ring gives the room up there."""
        if self.ring.reclaim() == 0:
            self.ring.count_full_wait()
            if not later:
                self._wait(deadline)
                return
            soon = time.monotonic() + layout.LIVE_RECEIVER_NS * 1e-9
            if deadline is not None and deadline <= soon:
                self._wait(deadline)
                return
            try:
                self._wait(soon)
            except TimeoutError:
                pass  # the receiver stopped keeping up: the next reservation goes further up

    def _send_contiguous(self, data: memoryview, tag: int, deadline: float | None) -> None:
        ring = self.ring
        if ring.in_flight:
            # Take back what the receiver is done with first: an empty queue restarts at the
            # bottom of its data area, so back-and-forth traffic keeps reusing memory that is
            # still in cache instead of walking the whole area.
            ring.reclaim()
        offset = self._reserve(layout.SPAN_HEADER_SIZE + len(data), deadline)
        ring.write_header(offset, len(data), tag)
        published, total = 0, layout.SPAN_HEADER_SIZE + len(data)
        while published < total:  # the ring returns after each publication that must be kicked
            published, kick = ring.publish_payload(offset, data, published)
            if kick:
                self._kick()

    def _send_streamed(self, data: memoryview, tag: int, deadline: float | None) -> None:
        ring, max_span = self.ring, self._geometry.max_span
        total = len(data)
        first_chunk = max_span - layout.SPAN_HEADER_SIZE
        offset = self._reserve(max_span, deadline)
        ring.write_header(offset, total, tag)
        ring.write(offset + layout.SPAN_HEADER_SIZE, data[:first_chunk])
        if ring.publish(offset, max_span, True):
            self._kick()
        self._stream(data[first_chunk:], first_chunk, total, deadline, owned=False)

    def push_tail(self) -> bool:
        """Publish what of the tail (see send) fits in the queue now, without waiting; return
        True iff no tail is left. Raises PeerLostError or RingCorruptError as send does."""
        if self.tail is None:
            return True
        try:
            self._send_tail(None, wait=False)
        except TimeoutError:
            return False
        return True

    def _send_tail(self, deadline: float | None, wait: bool = True) -> None:
        """Send the rest of the message a timed-out send left (see send). Raises
        TimeoutError if it does not all go out by `deadline`, or at once without `wait`
        (what did not stays the tail)."""
        assert self.tail is not None
        rest, sent, total = self.tail
        self.tail = None
        try:
            self._stream(rest, sent, total, deadline, owned=True, wait=wait)
        except SendIncompleteError as exc:
            raise TimeoutError(
                f"timed out sending to peer {self.dest}: {exc.total - exc.sent} bytes of an "
                "earlier message still go first; nothing of this one was sent"
            ) from None
        self.ring.count_message(total)

    def _stream(
        self,
        rest: memoryview,
        sent: int,
        total: int,
        deadline: float | None,
        owned: bool,
        wait: bool = True,
    ) -> None:
        """Publish `rest`, the last bytes of a streamed message of `total` bytes whose first
        `sent` are out, span by span. At `deadline`, or when the queue is full and not
        `wait`, keep what is unsent as the tail (copied unless `owned`: already the channel's
        memory) and raise SendIncompleteError."""
        ring, max_span = self.ring, self._geometry.max_span
        done = 0
        while done < len(rest):
            chunk = min(max_span, len(rest) - done)
            offset = ring.reserve(chunk)
            if offset < 0 and wait:
                try:
                    offset = self._reserve(chunk, deadline)
                except TimeoutError:
                    offset = -1
            elif offset < 0 and ring.reclaim():
                offset = ring.reserve(chunk)
            if offset < 0:
                left = rest[done:]
                self.tail = (left if owned else memoryview(bytes(left)), sent + done, total)
                raise SendIncompleteError(self.dest, sent + done, total) from None
            ring.write(offset, rest[done : done + chunk])
            done += chunk
            if ring.publish(offset, chunk, True):
                self._kick()


class Message:
    """One received message. `data` is a read-only memoryview, zero-copy where possible.

    A zero-copy view stays valid until `release()` (or leaving a `with` block); after that
    the sender may reuse the memory. A Message collected without release is released then,
    with a ResourceWarning. `source`, `tag` identify it; `nbytes` is its length.
    """

    __slots__ = ("_channel", "_record", "data", "nbytes", "source", "tag")

    def __init__(
        self, source: int, tag: int, data: memoryview, channel: RxChannel | None, record: Any
    ) -> None:
        self.source = source
        self.tag = tag
        self.data = data
        self.nbytes = len(data)
        self._channel = channel
        self._record = record

    def release(self) -> None:
        """Give the message's spans back to the sender. Idempotent."""
        channel, self._channel = self._channel, None
        if channel is not None:
            self.data.release()
            channel.finish(self._record)

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if self._channel is not None:
            warnings.warn(
                f"message from peer {self.source} (tag {self.tag}) was never released",
                ResourceWarning,
                stacklevel=1,
            )
            self.release()

    def __repr__(self) -> str:
        return f"Message(source={self.source}, tag={self.tag}, nbytes={self.nbytes})"


class RxChannel:
    """Receives messages from one peer through the device half of one queue.

    Spans are completed strictly in order; a message held zero-copy blocks the completion
    of later spans until it is released (`_pending` keeps [span count, finished] records).
    """

    def __init__(
        self,
        ring: Any,
        source: int,
        buf: memoryview,
        geometry: layout.Geometry,
        kick: Kick,
        wait: Wait,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.ring = ring
        self.source = source
        self._view = buf.toreadonly()  # what received messages are sliced from
        self._geometry = geometry
        self._kick = kick
        self._wait = wait
        self._pending: collections.deque[list[int]] = collections.deque()
        self.head: tuple[int, int, int, int] | None = None  # offset, length, total, tag
        self.stall_timeout = stall_timeout
        self.mid_spin_ns = STREAM_SPIN_NS  # the spin for the next span (see STREAM_SPIN_NS)

    def reset(self) -> None:
        """Forget the peeked header and held records (the ring was reset for a new session)."""
        self._pending.clear()
        self.head = None

    def peek(self) -> tuple[int, int] | None:
        """(total, tag) of the next message, or None if its first span is not there yet."""
        head = self.head
        if head is None:
            head = self.head = self.ring.poll_header()
            if head is None:
                return None
        return head[2], head[3]

    @property
    def busy(self) -> bool:
        """True while a header is peeked or a message is held (take_small_into can't run)."""
        return self.head is not None or bool(self._pending)

    def take_small_into(self, dest: Any, want_tag: int, spin_ns: int) -> tuple[int, int] | None:
        """Wait up to `spin_ns` for the next message and take it into `dest` if it is one span
        that fits with tag `want_tag` (any if negative): return (nbytes, tag). Else None, with
        its header peeked (`head`) if a message came. Only while not `busy`. Raises
        BufferError (nothing taken) if `dest` is not writable, and the ring's errors.
        """
        got = self.ring.recv_small_into(dest, want_tag, spin_ns)
        if got is None:
            return None
        nbytes, tag, kick, head = got
        if head is not None:
            self.head = head
            return None
        if kick:
            self._kick()
        return nbytes, tag

    def take_posted(self, posted: list[Any], source: int, tag_bits: int) -> int:
        """The ring's take_posted (see there) on this channel: the messages taken into the
        receives of `posted` (the sender kicked if it must be); the header it stopped at
        becomes the peeked `head`. Only while not `busy`."""
        taken, kick, head = self.ring.take_posted(posted, source, tag_bits)
        if head is not None:
            self.head = head
        if kick:
            self._kick()
        return int(taken)

    def finish(self, record: list[int]) -> None:
        """Mark a held record finished and complete every finished span at the front."""
        record[1] = 1
        pending = self._pending
        count = 0
        while pending and pending[0][1]:
            count += pending.popleft()[0]
        if count and self.ring.complete(count):
            self._kick()

    def _complete_now(self, spans: int) -> None:
        record = [spans, 0]
        self._pending.append(record)
        self.finish(record)

    def _next_span(self, total: int) -> tuple[int, int]:
        """The next span of the message being taken (of `total` bytes).

        A sender is committed once a message's first span is out (a contiguous message has
        all its space reserved; a streamed one only needs ours freed), so an honest peer
        never stalls mid-message for long. One that publishes nothing more for
        `stall_timeout` seconds breaks the queue (RingCorruptError) instead of hanging us.
        """
        now = time.monotonic()
        deadline = now + self.stall_timeout
        # The next span is being written right now: spin for it rather than sleep and be
        # woken per span (the endpoint's spin phase was spent on the message's first span).
        spin_end = now + self.mid_spin_ns * 1e-9
        while True:
            span = self.ring.poll()
            if span is not None:
                return span
            if time.monotonic() < spin_end:
                continue
            try:
                self._wait(deadline)
            except TimeoutError:
                raise self.ring_corrupt(
                    "message", total, f"no span for {self.stall_timeout} s inside a message"
                ) from None

    def take(self) -> Message:
        """Take the peeked message (call `peek` first): zero-copy if contiguous, else a copy."""
        offset, length, total, tag = self.head  # type: ignore[misc]
        self.head = None
        payload = offset + layout.SPAN_HEADER_SIZE
        if payload + total == offset + length:  # one span: the common, small case
            record = [1, 0]
            self._pending.append(record)
            return Message(self.source, tag, self._view[payload : payload + total], self, record)
        if not layout.is_contiguous(total, self._geometry):
            data = self._assemble(offset, length, total)
            return Message(self.source, tag, memoryview(data).toreadonly(), None, None)
        spans, end = 1, offset + length
        while end < payload + total:
            span_offset, span_length = self._next_span(total)
            if span_offset != end:
                raise self.ring_corrupt("span.addr", span_offset, f"expected contiguous {end}")
            end += span_length
            spans += 1
        if end != payload + total:
            raise self.ring_corrupt("span.len", end - payload, f"message is {total} bytes")
        record = [spans, 0]
        self._pending.append(record)
        return Message(self.source, tag, self._view[payload : payload + total], self, record)

    def _assemble(self, offset: int, length: int, total: int) -> bytes | bytearray:
        """Copy a streamed message out into memory of our own.

        The length comes from the peer: up to PREALLOC_MAX bytes are allocated at once, a
        larger message is gathered span by span, so memory follows what actually arrived.
        """
        if total <= PREALLOC_MAX:
            data = bytearray(total)
            self._stream_into(memoryview(data), offset, length, total)
            return data
        chunks = []
        first = length - layout.SPAN_HEADER_SIZE
        chunks.append(bytes(self._view[offset + layout.SPAN_HEADER_SIZE : offset + length]))
        self._complete_now(1)
        copied = first
        while copied < total:
            span_offset, span_length = self._next_span(total)
            if span_length > total - copied:
                raise self.ring_corrupt("span.len", span_length, f"{total - copied} bytes left")
            chunks.append(bytes(self._view[span_offset : span_offset + span_length]))
            self._complete_now(1)
            copied += span_length
        return b"".join(chunks)

    def take_into(self, dest: memoryview, bypass_cache: bool = False) -> tuple[int, int]:
        """Copy the peeked message into `dest` span by span; return (nbytes, tag).

        The caller has checked that it fits. Each span is completed as soon as it is copied,
        so the sender refills it while this side copies the next; `bypass_cache`: with stores
        that bypass the caches (see Endpoint.recv_into).
        """
        offset, length, total, tag = self.head  # type: ignore[misc]
        self.head = None
        if not self._pending and length - layout.SPAN_HEADER_SIZE == total:  # one span
            self.ring.read_into(offset + layout.SPAN_HEADER_SIZE, dest, 0, total)
            if self.ring.complete(1):
                self._kick()
            return total, tag
        self._stream_into(dest, offset, length, total, bypass_cache)
        return total, tag

    def _stream_into(
        self, dest: memoryview, offset: int, length: int, total: int, bypass_cache: bool = False
    ) -> None:
        contiguous = layout.is_contiguous(total, self._geometry)
        first = length - layout.SPAN_HEADER_SIZE
        self.ring.read_into(offset + layout.SPAN_HEADER_SIZE, dest, 0, first)
        self._complete_now(1)
        copied, expected = first, offset + length
        while copied < total:
            if not self._pending:  # nothing held: the ring copies and completes what is there
                copied, expected, kick = self.ring.stream_into(
                    dest,
                    copied,
                    total,
                    expected if contiguous else -1,
                    self.mid_spin_ns,
                    bypass_cache,
                )
                if kick:
                    self._kick()
                if copied == total:
                    break
            span_offset, span_length = self._next_span(total)
            if span_length > total - copied:
                raise self.ring_corrupt("span.len", span_length, f"{total - copied} bytes left")
            if contiguous and span_offset != expected:
                raise self.ring_corrupt("span.addr", span_offset, f"expected contiguous {expected}")
            self.ring.read_into(span_offset, dest, copied, span_length)
            self._complete_now(1)
            copied += span_length
            expected = span_offset + span_length

    def ring_corrupt(self, field: str, value: object, detail: str) -> RingCorruptError:
        """Break the ring for good and return the error to raise."""
        return self.ring.mark_broken(field, value, detail)
