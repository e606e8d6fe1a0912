"""The two halves of a queue, TxRing and RxRing, in both implementations and mixed pairs.

Every test runs against the pure-Python reference (`virtqueue`) and the C accelerator
(`_fastpath`), and the pair tests also against a Python driver with a C device and the
reverse: the two implementations must agree byte for byte on one queue. Property tests drive
random sequences of operations, differentially across all four pairings at once, and scribble
over the memory each side does not own: the other side must raise RingCorruptError or
PeerLostError or return sane values, never crash, never hand out an offset outside the data
area, never hang.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmem_comm import layout, virtqueue
from ivshmem_comm.errors import PeerLostError, RingCorruptError
from ivshmem_comm.region import format_buffer

try:
    from ivshmem_comm import _fastpath
except ImportError:
    if os.environ.get("IVSHMEM_COMM_REQUIRE_FASTPATH") == "1":
        raise
    _fastpath = None

needs_c = pytest.mark.skipif(_fastpath is None, reason="ivshmem_comm._fastpath is not built")
IMPLS = ["py", pytest.param("c", marks=needs_c)]
PAIRS = [
    ("py", "py"),
    pytest.param("c", "c", marks=needs_c),
    pytest.param("py", "c", marks=needs_c),
    pytest.param("c", "py", marks=needs_c),
]
WORLD_PAIRS = [("py", "py")] + ([("c", "c"), ("py", "c"), ("c", "py")] if _fastpath else [])

SESSION = layout.session_word(3, 5)
PATTERN = bytes((i * 131 + 7) & 0xFF for i in range(1 << 17))
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tx_class(impl: str) -> Any:
    return virtqueue.TxRing if impl == "py" else _fastpath.TxRing


def rx_class(impl: str) -> Any:
    return virtqueue.RxRing if impl == "py" else _fastpath.RxRing


def small_geometry(queue_num: int = 8, data_size: int = 8192, max_span: int = 1024) -> Any:
    """Three peers with small queues, so that indices and the byte ring wrap quickly."""
    probe = layout.Geometry(0, 3, queue_num, 64, data_size, max_span)
    geometry = dataclasses.replace(probe, region_size=probe.required_size)
    geometry.validate()
    return geometry


def payload(seq: int, size: int) -> bytes:
    start = seq % 251
    return PATTERN[start : start + size]


@dataclasses.dataclass
class Queue:
    """Where the fields of one queue are, for tests that look at or scribble over them."""

    base: int
    geometry: Any

    @property
    def ring(self) -> int:
        return self.base + self.geometry.ring_rel_offset

    @property
    def avail(self) -> int:
        return self.ring + layout.vring_offsets(self.geometry.queue_num, 64)[1]

    @property
    def used(self) -> int:
        return self.ring + layout.vring_offsets(self.geometry.queue_num, 64)[2]

    @property
    def num(self) -> int:
        return self.geometry.queue_num

    def avail_idx(self, buf: Any) -> int:
        return struct.unpack_from("<H", buf, self.avail + 2)[0]

    def avail_event(self, buf: Any) -> int:
        return struct.unpack_from("<H", buf, self.used + 4 + 8 * self.num)[0]

    def used_event(self, buf: Any) -> int:
        return struct.unpack_from("<H", buf, self.avail + 4 + 2 * self.num)[0]

    def desc(self, buf: Any, slot: int) -> tuple[int, int, int, int]:
        return layout.VRING_DESC.unpack_from(buf, self.ring + 16 * slot)

    def driver_fields(self) -> list[tuple[int, str]]:
        """(offset, struct format) of every field the driver owns, data area aside."""
        counters = self.base + layout.DRIVER_COUNTERS_OFFSET
        fields = [(self.base, "<Q")] + [(counters + 8 * i, "<Q") for i in range(4)]
        for slot in range(self.num):
            d = self.ring + 16 * slot
            fields += [(d, "<Q"), (d + 8, "<I"), (d + 12, "<H"), (d + 14, "<H")]
        fields += [(self.avail + 2 * i, "<H") for i in range(3 + self.num)]
        return fields

    def device_fields(self) -> list[tuple[int, str]]:
        """(offset, struct format) of every field the device owns."""
        counters = self.base + layout.DEVICE_COUNTERS_OFFSET
        fields = [(self.base + layout.DEVICE_LINE_OFFSET, "<Q")]
        fields += [(counters + 8 * i, "<Q") for i in range(4)]
        fields += [(self.used, "<H"), (self.used + 2, "<H")]
        for slot in range(self.num):
            fields += [(self.used + 4 + 8 * slot, "<I"), (self.used + 8 + 8 * slot, "<I")]
        fields.append((self.used + 4 + 8 * self.num, "<H"))
        return fields


def make_pair(buf: Any, geometry: Any, tx_impl: str, rx_impl: str, src: int = 0, dst: int = 1):
    offset = geometry.queue_offset(src, dst)
    tx = tx_class(tx_impl)(buf, offset, geometry, dst)
    rx = rx_class(rx_impl)(buf, offset, geometry, src)
    tx.reset(SESSION)
    rx.reset(SESSION)
    assert tx.check_sync() and rx.check_sync()
    return tx, rx


def new_region(geometry: Any) -> bytearray:
    buf = bytearray(geometry.region_size)
    format_buffer(buf, geometry, "test-ring")
    return buf


def roundtrip(tx: Any, rx: Any, buf: Any, count: int = 3) -> None:
    """Send, receive, check and complete `count` small messages on a sound pair."""
    for seq in range(count):
        data = payload(seq, 40 + seq)
        assert tx.send_small(seq, data) != virtqueue.SEND_FULL
        offset, length, total, tag = rx.poll_header()
        assert (total, tag, length) == (len(data), seq, 16 + len(data))
        assert bytes(buf[offset + 16 : offset + length]) == data
        rx.complete(1)
        assert tx.reclaim() == 1


def outcome(call: Any, *args: Any) -> Any:
    """The result of call(*args), or (exception type, message) if it raised."""
    try:
        return call(*args)
    except Exception as exc:
        return (type(exc).__name__, str(exc))


# ------------------------------------------------------------------------------------------
# Basics
# ------------------------------------------------------------------------------------------


@needs_c
def test_module_constants_match_the_reference() -> None:
    assert (_fastpath.SEND_OK, _fastpath.SEND_KICK, _fastpath.SEND_FULL) == (
        virtqueue.SEND_OK,
        virtqueue.SEND_KICK,
        virtqueue.SEND_FULL,
    )
    assert _fastpath.full_fence() is None
    assert _fastpath.CACHE_WINDOW == layout.CACHE_WINDOW


@pytest.mark.parametrize("impl", IMPLS)
def test_attributes(impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    offset = g.queue_offset(2, 1)
    tx = tx_class(impl)(buf, offset, g, 1)
    rx = rx_class(impl)(buf, offset, g, 2)
    for ring, peer in ((tx, 1), (rx, 2)):
        assert ring.peer == peer
        assert ring.num == g.queue_num
        assert ring.data_offset == offset + g.data_rel_offset
        assert ring.data_size == g.data_size
        assert ring.max_span == g.max_span
        assert ring.session == 0
        assert ring.broken is None
    tx.reset(SESSION)
    assert tx.session == SESSION
    assert not tx.check_sync()
    rx.reset(SESSION)
    assert tx.check_sync() and rx.check_sync()
    assert (tx.in_flight, rx.held) == (0, 0)


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_small_messages_round_trip(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    assert rx.poll() is None and rx.poll_header() is None
    roundtrip(tx, rx, buf, count=20)
    q = g.queue_offset(0, 1)
    session = struct.unpack_from("<Q", buf, q + layout.DRIVER_LINE_OFFSET)
    counters = layout.COUNTERS.unpack_from(buf, q + layout.DRIVER_COUNTERS_OFFSET)
    assert (*session, *counters[:2]) == (SESSION, 20, sum(40 + i for i in range(20)))


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_message_in_pieces_and_read_into(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    data = payload(9, 3000)
    offset = tx.reserve(16 + len(data))
    assert offset == tx.data_offset
    tx.write_header(offset, len(data), 77)
    tx.write(offset + 16, data)
    assert tx.publish(offset, 1024, False) is True  # first publication always kicks
    assert tx.publish(offset + 1024, 1024, False) is False
    assert tx.publish(offset + 2048, 16 + len(data) - 2048, True) is False
    assert tx.in_flight == 3
    first = rx.poll_header()
    assert first == (offset, 1024, len(data), 77)
    assert rx.poll() == (offset + 1024, 1024)
    assert rx.poll() == (offset + 2048, 16 + len(data) - 2048)
    dest = bytearray(len(data) + 8)
    rx.read_into(offset + 16, dest, 8, len(data))
    assert bytes(dest[8:]) == data
    assert rx.held == 3
    rx.complete(2)
    assert tx.reclaim() == 2
    rx.complete(1)
    assert tx.reclaim() == 1 and tx.in_flight == 0


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
@pytest.mark.parametrize("misalign", [0, 3, 13])
def test_stream_into_bypassing_the_cache_copies_every_byte(
    tx_impl: str, rx_impl: str, misalign: int
) -> None:
    g = small_geometry(max_span=2048)
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    data = payload(7, 6000 - misalign)
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), 1)
    sent = 0
    while sent < 16 + len(data):  # (kicks do not matter here)
        sent, _ = tx.publish_payload(offset, data, sent)
    head = rx.poll_header()
    room = memoryview(bytearray(len(data) + misalign))[misalign:]  # an unaligned destination
    rx.read_into(offset + 16, room, 0, head[1] - 16)
    rx.complete(1)
    copied, _, _ = rx.stream_into(room, head[1] - 16, len(data), offset + head[1], 0, True)
    assert copied == len(data) and bytes(room) == data


MIB = 1 << 20
# Past this, a receiver counts as not keeping up (layout.LIVE_RECEIVER_NS, with a margin).
IDLE_S = 2 * layout.LIVE_RECEIVER_NS * 1e-9


def window_pair(tx_impl: str, rx_impl: str) -> tuple[Any, Any, Any]:
    """A pair whose data area is three cache windows, and `send(n)`: reserve and publish n
    bytes, returning their data-relative offset (asserting there was room)."""
    g = small_geometry(queue_num=64, data_size=3 * layout.CACHE_WINDOW, max_span=MIB)
    tx, rx = make_pair(new_region(g), g, tx_impl, rx_impl)

    def send(nbytes: int = MIB) -> int:
        offset = tx.reserve(nbytes)
        assert offset >= 0, offset
        tx.publish(offset, nbytes, True)
        return offset - tx.data_offset

    return tx, rx, send


def take(rx: Any, count: int = 1) -> None:
    for _ in range(count):
        assert rx.poll() is not None
    rx.complete(count)


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_allocation_wraps_early_past_the_cache_window(tx_impl: str, rx_impl: str) -> None:
    """A receiver not keeping up (nothing completed for LIVE_RECEIVER_NS): the head goes on
    past the window while only part of it is free, and wraps early once all of it is."""
    tx, rx, send = window_pair(tx_impl, rx_impl)
    window = layout.CACHE_WINDOW // MIB
    assert [send() for _ in range(window + 1)] == [i * MIB for i in range(window + 1)]
    take(rx)  # only the bottom MiB is free: on past the window
    tx.reclaim()
    time.sleep(IDLE_S)
    assert send() == (window + 1) * MIB
    take(rx, window - 1)  # the whole window is free, the head is past it: wrap early
    tx.reclaim()
    time.sleep(IDLE_S)
    assert send() == 0
    assert send() == MIB


def live_attempts() -> Iterator[None]:
    """Retry a sequence that must run within LIVE_RECEIVER_NS of a completion (a loaded
    machine may stall it): the caller breaks out when it did."""
    for _ in range(50):
        yield
    raise AssertionError("50 tries each took longer than LIVE_RECEIVER_NS")


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_a_live_receiver_keeps_the_stream_in_the_cache_window(tx_impl: str, rx_impl: str) -> None:
    """While completions come back, a reservation that would end past the cache window gets
    RESERVE_LATER though there is room above; the first completion that frees the bottom
    wraps it there. Once the receiver stops keeping up, the room above is given."""
    window = layout.CACHE_WINDOW // MIB
    for _ in live_attempts():
        tx, rx, send = window_pair(tx_impl, rx_impl)
        send()
        take(rx)
        began = time.monotonic_ns()
        tx.reclaim()  # the receiver keeps up; the queue is empty: back at the bottom
        offsets = [send() for _ in range(window)]
        later = tx.reserve(MIB)  # past the window: room above, none at the bottom yet
        take(rx)
        tx.reclaim()
        wrapped = send()  # the bottom MiB is free: there
        if time.monotonic_ns() - began < layout.LIVE_RECEIVER_NS:
            break
    assert offsets == [i * MIB for i in range(window)]
    assert later == virtqueue.RESERVE_LATER and wrapped == 0
    tx, rx, send = window_pair(tx_impl, rx_impl)
    send()
    take(rx)
    tx.reclaim()
    offsets = [send() for _ in range(window)]
    time.sleep(IDLE_S)  # no completion for that long: the room above
    assert send() == window * MIB


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_send_small_says_reserve_later_as_reserve_does(tx_impl: str, rx_impl: str) -> None:
    """A one-span message past the cache window while the receiver keeps up: RESERVE_LATER,
    nothing written; once the receiver has not kept up for LIVE_RECEIVER_NS, the room above."""
    one = payload(0, 1 << 17) * 8  # one span: MIB with its header
    one = one[: MIB - layout.SPAN_HEADER_SIZE]
    window = layout.CACHE_WINDOW // MIB
    sent = (virtqueue.SEND_OK, virtqueue.SEND_KICK)
    for _ in live_attempts():
        tx, rx, _ = window_pair(tx_impl, rx_impl)
        assert tx.send_small(1, one) in sent
        take(rx)
        began = time.monotonic_ns()
        statuses = [tx.send_small(2, one) for _ in range(window + 1)]  # (the first reclaims)
        if time.monotonic_ns() - began < layout.LIVE_RECEIVER_NS:
            break
    assert all(status in sent for status in statuses[:-1])
    assert statuses[-1] == virtqueue.RESERVE_LATER and tx.in_flight == window
    time.sleep(IDLE_S)
    assert tx.send_small(3, one) in sent
    spans = [rx.poll() for _ in range(window + 1)]
    assert [span[0] - tx.data_offset for span in spans if span] == [
        i * MIB for i in range(window + 1)
    ]


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_a_queue_waited_on_too_long_stops_waiting_until_back_at_the_bottom(
    tx_impl: str, rx_impl: str
) -> None:
    """A receiver that takes in bursts: reservations that got RESERVE_LATER for
    LIVE_RECEIVER_NS go above though completions keep coming, and so do the next ones until
    the head is back at the bottom (one such wait per pass through the data area)."""
    small = 64 << 10
    window = layout.CACHE_WINDOW // MIB
    for _ in live_attempts():
        tx, rx, send = window_pair(tx_impl, rx_impl)
        send()
        take(rx)
        tx.reclaim()  # the receiver keeps up
        first = [send(small)] + [send() for _ in range(window - 1)]
        began = time.monotonic_ns()
        later = tx.reserve(MIB)
        time.sleep(IDLE_S)
        take(rx)  # the small message: a completion, but no MiB free at the bottom
        began = time.monotonic_ns()
        tx.reclaim()
        above = send()
        take(rx)  # the bottom MiB and more are free now: no wrap, the queue is cooled
        tx.reclaim()
        further = send()
        if time.monotonic_ns() - began < layout.LIVE_RECEIVER_NS:
            break
    assert first[0] == 0 and later == virtqueue.RESERVE_LATER
    head = small + (window - 1) * MIB
    assert (above, further) == (head, head + MIB)


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_a_large_one_span_message_takes_completions_back_first(tx_impl: str, rx_impl: str) -> None:
    """send_small of at least RECLAIM_FIRST bytes reclaims first: in a ping-pong the queue is
    empty again and the message goes to the bottom, in cache; a smaller one does not read
    the used ring and goes after what it has not taken back."""
    big = layout.RECLAIM_FIRST
    g = small_geometry(queue_num=8, data_size=8 * big, max_span=2 * big)
    tx, rx = make_pair(new_region(g), g, tx_impl, rx_impl)

    def exchange(data: bytes) -> int:
        assert tx.send_small(7, data) in (virtqueue.SEND_OK, virtqueue.SEND_KICK)
        span = rx.poll()
        assert span is not None
        rx.complete(1)
        return span[0] - tx.data_offset

    assert [exchange(payload(i, big)) for i in range(3)] == [0, 0, 0]
    small = payload(3, 64)
    room = layout.align_up(layout.SPAN_HEADER_SIZE + len(small), layout.SPAN_ALIGN)
    after = layout.align_up(layout.SPAN_HEADER_SIZE + big, layout.SPAN_ALIGN)  # the last big
    assert [exchange(small) for _ in range(3)] == [after, after + room, after + 2 * room]


@needs_c
@pytest.mark.parametrize("rx_impl", ["py", "c"])
def test_large_copies_into_the_queue_choose_their_stores_and_keep_every_byte(rx_impl: str) -> None:
    """The C sender copies a message of at least 16 KiB (send_small's one span, write's
    bytes, each piece of publish_payload) with plain or cache-bypassing stores, whichever cost
    less lately for its size class (below / from 512 KiB), and tries the other every 256
    copies of the class at most (_fastpath.c, copy_to_reader): over 600 messages of odd
    lengths from unaligned sources both ways run in both classes, every byte arrives, and all
    costs are measured."""
    g = small_geometry(queue_num=64, data_size=4 << 20, max_span=64 << 10)
    tx, rx = make_pair(new_region(g), g, "c", rx_impl)
    for i in range(600):
        size = (16 << 10) + 1 + 997 * (i % 40)  # 16 KiB + 1 .. ~55 KiB: one span
        raw = bytearray(payload(i, size + 7))
        data = memoryview(raw)[i % 7 : i % 7 + size]  # an unaligned source
        if i % 3 == 1:
            assert tx.send_small(5, data) in (virtqueue.SEND_OK, virtqueue.SEND_KICK)
            spans = 1
        elif i % 3 == 2:  # written into a reservation, then published as one span
            offset = tx.reserve(16 + len(data))
            assert offset >= 0
            tx.write_header(offset, len(data), 5)
            tx.write(offset + 16, data)
            tx.publish(offset, 16 + len(data), True)
            spans = 1
        else:  # pieces of at least 16 KiB (layout.pipe_span), every other message >= 512 KiB
            times = 3 if i % 2 else 10 + i % 20
            data = memoryview(raw * times)[i % 7 : i % 7 + times * size]
            offset = tx.reserve(16 + len(data))
            assert offset >= 0
            tx.write_header(offset, len(data), 5)
            published = 0
            while published < 16 + len(data):
                published, _ = tx.publish_payload(offset, data, published)
            spans = tx.in_flight
        head = rx.poll_header()
        for _ in range(spans - 1):
            assert rx.poll() is not None
        got = bytearray(len(data))
        rx.read_into(head[0] + 16, got, 0, len(data))
        assert got == data, i
        rx.complete(spans)
        assert tx.reclaim() == spans
    for (plain, plain_before), (streaming, streaming_before) in _fastpath.shared_copy_costs():
        assert min(plain, plain_before, streaming, streaming_before) > 0


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_recv_small_into_takes_only_what_fits(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    dest = bytearray(64)
    assert rx.recv_small_into(dest, -1, 1000) is None
    with pytest.raises(BufferError):
        rx.recv_small_into(b"read-only", -1, 0)
    tx.send_small(5, payload(1, 40))
    nbytes, tag, _kick, head = rx.recv_small_into(dest, -1, 0)  # one shape, taken or not
    assert (nbytes, tag, head) == (40, 5, None)
    assert bytes(dest[:40]) == payload(1, 40) and rx.held == 0
    tx.send_small(6, payload(2, 40))
    got = rx.recv_small_into(dest, 7, 0)  # another tag: peeked, not taken
    assert got[:3] == (40, 6, False) and got[3][2:] == (40, 6) and rx.held == 1
    assert rx.read_header(got[3][0], got[3][1]) == (40, 6)
    rx.complete(1)
    tx.send_small(8, payload(3, 100))
    got = rx.recv_small_into(dest, -1, 0)  # does not fit: peeked, not taken
    assert got[:3] == (100, 8, False) and got[3][2:] == (100, 8) and rx.held == 1


@dataclasses.dataclass
class Posted:
    """A receive as take_posted reads and completes it (the MPI face's RecvOp has these)."""

    ctx: int
    src: int
    want_tag: int
    view: Any
    sink: Any = None
    mpi: Any = None
    source: int = -9
    tag: int = -9
    count: int = -9
    obj: Any = None
    done: bool = False


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_take_posted_matches_in_post_order_and_stops_where_it_must(
    tx_impl: str, rx_impl: str
) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    bufs = [bytearray(64) for _ in range(6)]
    other_ctx, other_src, tag7, tag5, anything, short = (
        Posted(4, -2, -1, memoryview(bufs[0])),
        Posted(3, 9, -1, memoryview(bufs[1])),
        Posted(3, -2, 7, memoryview(bufs[2])),
        Posted(3, 2, 5, memoryview(bufs[3])),
        Posted(3, -2, -1, memoryview(bufs[4])),
        Posted(3, 2, -1, memoryview(bufs[5])[:8]),
    )
    posted = [other_ctx, other_src, tag7, tag5, anything]
    assert rx.take_posted(posted, 2, 8) == (0, False, None)  # nothing there
    for seq, tag in enumerate((5, 7, 9)):  # context 3 (core tag >> 8), tags 5, 7, 9
        assert tx.send_small(3 << 8 | tag, payload(seq, 20 + seq)) != virtqueue.SEND_FULL
    taken, _kick, head = rx.take_posted(posted, 2, 8)
    assert (taken, head, rx.held) == (3, None, 0)
    assert posted == [other_ctx, other_src]  # the others matched in post order
    for seq, (entry, tag) in enumerate(((tag5, 5), (tag7, 7), (anything, 9))):
        assert (entry.source, entry.tag, entry.count, entry.done) == (2, tag, 20 + seq, True)
        assert bytes(entry.view[: 20 + seq]) == payload(seq, 20 + seq)
    assert not other_ctx.done and not other_src.done and other_ctx.count == -9
    # stops, holding the head as poll_header() gives it: no match (tag 1 of context 5), ...
    assert tx.send_small(5 << 8 | 1, payload(4, 10)) != virtqueue.SEND_FULL
    taken, _kick, head = rx.take_posted(posted, 2, 8)
    assert taken == 0 and head[2:] == (10, 5 << 8 | 1) and rx.held == 1
    assert rx.read_header(head[0], head[1]) == (10, 5 << 8 | 1)
    rx.complete(1)
    # ... a first match that is too small, or neither plain nor an object entry (a sink, an
    # mpi side, with or without a view)
    for entry in (short, Posted(3, 2, -1, memoryview(bytearray(64)), sink=print),
                  Posted(3, 2, -1, memoryview(bytearray(64)), mpi=object()),
                  Posted(3, 2, -1, None, sink=print),
                  Posted(3, 2, -1, None, mpi=object())):  # fmt: skip
        tx.reclaim()
        assert tx.send_small(3 << 8 | 1, payload(5, 30)) != virtqueue.SEND_FULL
        posted = [entry, anything]
        taken, _kick, head = rx.take_posted(posted, 2, 8)
        assert taken == 0 and head[2:] == (30, 3 << 8 | 1) and posted == [entry, anything]
        assert not entry.done and rx.held == 1
        rx.complete(1)
    # an entry lacking a field stops the run there (the caller's own matching meets it)
    tx.reclaim()
    assert tx.send_small(3 << 8 | 1, payload(6, 12)) != virtqueue.SEND_FULL
    posted = [tag7, "not a receive"]  # tag7's tag does not match: the next is read
    assert rx.take_posted(posted, 2, 8)[:2] == (0, False) and rx.held == 1
    rx.complete(1)
    with pytest.raises(TypeError):
        rx.take_posted((anything,), 2, 8)
    with pytest.raises(ValueError):
        rx.take_posted([anything], 2, 40)


def queue_of_one_message(
    g: Any, tx_impl: str, rx_impl: str, data: bytes, coretag: int
) -> tuple[Any, Any]:
    """A fresh queue pair holding one message, `data` with `coretag`, every span published
    (publish_payload)."""
    tx, rx = make_pair(new_region(g), g, tx_impl, rx_impl)
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), coretag)
    published = 0
    while published < 16 + len(data):
        published, _ = tx.publish_payload(offset, data, published)
    return tx, rx


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_take_posted_gives_an_object_entry_the_bytes(tx_impl: str, rx_impl: str) -> None:
    """An object entry (no view, sink or mpi side) gets each message it matches as a new
    bytes object in its obj, of any length (empty, one span, several once all are out), in
    post order among plain entries; a message of several spans not all out stops the run."""
    g = small_geometry(queue_num=16, data_size=16384)
    tx, rx = make_pair(new_region(g), g, tx_impl, rx_impl)
    empty, plain, one = (
        Posted(3, 2, 1, None),
        Posted(3, -2, -1, memoryview(bytearray(8))),
        (Posted(3, -2, 1, None)),
    )
    big = Posted(3, 2, -1, None)
    data = payload(3, 3000)
    for tag, body in ((1, b""), (2, payload(1, 8)), (1, payload(2, 40))):
        assert tx.send_small(3 << 8 | tag, body) != virtqueue.SEND_FULL
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), 3 << 8 | 4)
    tx.write(offset + 16, data)
    tx.publish(offset, 1024, False)
    posted = [empty, plain, one, big]
    taken, _kick, head = rx.take_posted(posted, 2, 8)
    assert taken == 3 and head == (offset, 1024, 3000, 3 << 8 | 4) and posted == [big]
    assert (empty.obj, empty.source, empty.tag, empty.count, empty.done) == (b"", 2, 1, 0, True)
    assert type(one.obj) is bytes and one.obj == payload(2, 40) and one.count == 40
    assert bytes(plain.view) == payload(1, 8) and plain.obj is None and plain.tag == 2
    assert big.obj is None and not big.done and rx.held == 1
    # All out (a fresh queue: the stopped one's head is its caller's): taken whole at once.
    tx2, rx2 = queue_of_one_message(g, tx_impl, rx_impl, data, 3 << 8 | 4)
    big = Posted(3, 2, -1, None)
    posted = [big]
    taken, _kick, head = rx2.take_posted(posted, 2, 8)
    assert (taken, head, posted, rx2.held) == (1, None, [], 0)
    assert (big.obj, big.tag, big.count, big.done) == (data, 4, 3000, True)
    assert tx2.reclaim() == 3


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_take_posted_takes_a_message_of_several_spans_once_all_are_out(
    tx_impl: str, rx_impl: str
) -> None:
    """A message of several spans goes into a posted receive in the same call once every
    span is published (each completed); before that it stops there, holding only the head;
    a span that runs past the message breaks the ring."""
    g = small_geometry(queue_num=16, data_size=16384)
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    data = payload(3, 3000)
    small = Posted(3, -2, -1, memoryview(bytearray(16)))
    big = Posted(3, 2, 4, memoryview(bytearray(4000)))
    assert tx.send_small(3 << 8 | 1, payload(9, 16)) != virtqueue.SEND_FULL
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), 3 << 8 | 4)
    tx.write(offset + 16, data)
    tx.publish(offset, 1024, False)
    tx.publish(offset + 1024, 1024, False)
    posted = [small, big]
    taken, _kick, head = rx.take_posted(posted, 2, 8)  # the small one; the big one not all out
    assert taken == 1 and small.done and head == (offset, 1024, 3000, 3 << 8 | 4)
    assert posted == [big] and not big.done and rx.held == 1
    # The rest published: a fresh queue gets the whole message (publish_payload) at once.
    tx2, rx2 = queue_of_one_message(g, tx_impl, rx_impl, data, 3 << 8 | 4)
    big = Posted(3, 2, 4, memoryview(bytearray(4000)))
    posted = [big]
    taken, _kick, head = rx2.take_posted(posted, 2, 8)
    assert (taken, head, posted, rx2.held) == (1, None, [], 0)
    assert (big.source, big.tag, big.count, big.done) == (2, 4, 3000, True)
    assert bytes(big.view[:3000]) == data and tx2.reclaim() == 3
    # A hostile sender: a second span longer than what is left of the message.
    tx3, rx3 = make_pair(new_region(g), g, tx_impl, rx_impl)
    offset = tx3.reserve(16 + 2000)
    tx3.write_header(offset, 1500, 3 << 8 | 4)
    tx3.publish(offset, 1024, False)
    tx3.publish(offset + 1024, 16 + 2000 - 1024, True)
    with pytest.raises(RingCorruptError, match=r"span\.len"):
        rx3.take_posted([Posted(3, 2, 4, memoryview(bytearray(4000)))], 2, 8)
    assert rx3.broken is not None


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_publish_payload_pipelines_a_message_of_several_spans(tx_impl: str, rx_impl: str) -> None:
    """A message over max_span goes in pieces of layout.pipe_span (about a quarter of it,
    at least PIPE_SPAN_MIN), the reservation counting their descriptors."""
    g = small_geometry(queue_num=64, data_size=1 << 20, max_span=128 << 10)
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    data = payload(1, 128 << 10)
    span = layout.pipe_span(16 + len(data), g.max_span, g.queue_num)
    assert span == (32 << 10) + 16
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), 1)
    published = 0
    while published < 16 + len(data):
        published, _ = tx.publish_payload(offset, data, published)
    spans = [rx.poll_header()[:2]] + [rx.poll() for _ in range(3)]
    assert spans == [(offset + i * span, span) for i in range(3)] + [
        (offset + 3 * span, 16 + len(data) - 3 * span)
    ]
    assert rx.poll() is None and tx.in_flight == 4
    assert layout.pipe_span(1000, g.max_span, g.queue_num) == g.max_span  # one span
    assert layout.pipe_span(1 << 20, g.max_span, 8) == 128 << 10  # capped at max_span
    assert layout.pipe_span(3 << 20, 2 << 20, 4) == 3 << 19  # queue_num // 2 pieces at most


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_a_sender_waiting_for_room_is_kicked_once_there_is_enough(
    tx_impl: str, rx_impl: str
) -> None:
    """After a reservation found no room, arm() asks to be kicked at the completion that
    frees enough for it (bytes and descriptors), not at every span the receiver gives back."""
    g = small_geometry()  # 8 descriptors, 8 KiB, spans of 1 KiB
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    for seq in range(7):  # 7 spans of 1 KiB: one descriptor and 1 KiB of the 8 left
        assert tx.send_small(1, payload(seq, 1000)) != virtqueue.SEND_FULL
    assert tx.reserve(16 + 1500) == -1  # two descriptors and 1.5 KiB: after two completions
    assert tx.arm() is False
    rx.poll_header()
    assert rx.complete(1) is False  # one freed: not enough yet, no kick
    rx.poll_header()
    assert rx.complete(1) is True  # the second: room, kicked
    assert tx.reclaim() == 2 and tx.reserve(16 + 1500) >= 0
    tx.publish(tx.data_offset, 1024, False)  # (closes the reservation)
    tx.publish(tx.data_offset + 1024, 16 + 1500 - 1024, True)
    assert tx.reserve(16 + 3000) == -1  # a successful reservation forgot the old wait...
    rx.poll_header()
    assert tx.arm() is False and rx.complete(1) is False  # ... and this one needs more
    assert tx.arm() is False  # (re-armed: the completion that came was not enough)


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_publish_payload_spans_and_resumes_after_a_kick(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    data = payload(6, 3000)
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), 9)
    assert tx.publish_payload(offset, data, 0) == (1024, True)  # the first always kicks
    spans = [rx.poll_header()[:2]]
    rx.arm()  # the device goes to sleep: the next publication kicks again
    assert tx.publish_payload(offset, data, 1024) == (2048, True)
    assert tx.publish_payload(offset, data, 2048) == (16 + len(data), False)
    spans += [rx.poll(), rx.poll()]
    assert spans == [(offset, 1024), (offset + 1024, 1024), (offset + 2048, 16 + 3000 - 2048)]
    dest = bytearray(len(data))
    rx.read_into(offset + 16, dest, 0, len(data))
    assert bytes(dest) == data and tx.in_flight == 3


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_publish_payload_with_a_header_only_first_span(tx_impl: str, rx_impl: str) -> None:
    """max_span = 16: the first span is the header alone; resuming still goes on from there."""
    g = small_geometry(max_span=16)
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    data = payload(8, 20)
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), 2)
    published, calls = 0, 0
    while published < 16 + len(data):
        published, _ = tx.publish_payload(offset, data, published)
        calls += 1
    assert published == 36 and calls >= 1
    assert rx.poll_header() == (offset, 16, len(data), 2)
    assert [rx.poll(), rx.poll()] == [(offset + 16, 16), (offset + 32, 4)]
    dest = bytearray(len(data))
    rx.read_into(offset + 16, dest, 0, len(data))
    assert bytes(dest) == data


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_stream_into_copies_completes_and_checks_spans(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    data = payload(4, 3000)
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), 3)
    tx.write(offset + 16, data)
    tx.publish(offset, 1024, False)
    tx.publish(offset + 1024, 1024, False)
    first = rx.poll_header()
    dest = bytearray(len(data))
    rx.read_into(offset + 16, dest, 0, 1024 - 16)
    rx.complete(1)
    got = rx.stream_into(dest, 1008, len(data), offset + 1024, 100_000, False)
    assert got[:2] == (2032, offset + 2048) and rx.held == 0  # one span there, then none came
    tx.publish(offset + 2048, 16 + len(data) - 2048, True)
    end = offset + 16 + len(data)
    assert rx.stream_into(dest, 2032, len(data), offset + 2048, 0, True)[:2] == (len(data), end)
    assert bytes(dest) == data and first[2:] == (len(data), 3)
    assert tx.reclaim() == 3
    # A span somewhere else than the contiguous message's next one breaks the ring.
    offset = tx.reserve(16 + 2000)
    tx.write_header(offset, 2000, 4)
    tx.publish(offset, 1024, False)
    tx.publish(offset + 1024, 16 + 2000 - 1024, True)
    rx.poll_header()
    rx.complete(1)
    with pytest.raises(RingCorruptError, match=r"span\.addr"):
        rx.stream_into(bytearray(2000), 1008, 2000, offset + 4096, 0, False)
    assert rx.broken is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_large_write_and_read_into(impl: str) -> None:
    """Copies of 64 KiB and more release the GIL in C; the bytes must not care."""
    g = small_geometry(data_size=1 << 20, max_span=256 << 10)
    buf = new_region(g)
    tx, rx = make_pair(buf, g, impl, impl)
    data = (PATTERN * 2)[:200_000]
    offset = tx.reserve(16 + len(data))
    tx.write_header(offset, len(data), 1)
    tx.write(offset + 16, memoryview(data))
    for start in range(0, 16 + len(data), 256 << 10):
        length = min(256 << 10, 16 + len(data) - start)
        tx.publish(offset + start, length, start + length == 16 + len(data))
    head = rx.poll_header()
    assert head[2:] == (len(data), 1)
    dest = bytearray(len(data))
    rx.read_into(offset + 16, dest, 0, len(data))
    assert dest == data


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_send_small_full_and_accepts_any_buffer(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry(queue_num=4)
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    sources = [b"abc", bytearray(b"defg"), memoryview(b"hijkl"), memoryview(b"x" * 16)[::1]]
    for i, source in enumerate(sources):
        assert tx.send_small(i, source) != virtqueue.SEND_FULL
    assert tx.send_small(9, b"no room") == virtqueue.SEND_FULL
    for i, source in enumerate(sources):
        offset, length, _, tag = rx.poll_header()
        assert (tag, bytes(buf[offset + 16 : offset + length])) == (i, bytes(source))
    rx.complete(4)
    assert tx.reclaim() == 4


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_indices_wrap_past_65535(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry(queue_num=4, data_size=4096, max_span=256)
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    q = Queue(g.queue_offset(0, 1), g)
    rounds = 70_000
    for seq in range(rounds):
        assert tx.send_small(seq, payload(seq, seq % 200)) != virtqueue.SEND_FULL
        _, _, total, tag = rx.poll_header()
        assert (total, tag) == (seq % 200, seq)
        rx.complete(1)
        if seq % 3 == 2:
            assert tx.reclaim() == 3
    assert q.avail_idx(buf) == rounds & 0xFFFF
    assert struct.unpack_from("<H", buf, q.used + 2)[0] == rounds & 0xFFFF
    assert tx.reclaim() == rounds % 3
    roundtrip(tx, rx, buf)


# ------------------------------------------------------------------------------------------
# Errors: the same type and message from both implementations
# ------------------------------------------------------------------------------------------


def misuse(tx: Any, rx: Any) -> list[Any]:
    results = [outcome(tx.reserve, n) for n in (0, -5, 8193, 2**70)]
    results.append(outcome(rx.complete, 1))
    results.append(outcome(tx.publish, tx.data_offset, 16, True))
    offset = tx.reserve(64)
    results += [offset, outcome(tx.reserve, 16), outcome(tx.publish, offset + 16, 16, True)]
    results += [tx.publish(offset, 32, False), tx.publish(offset + 32, 32, True)]
    rx.poll()
    results.append(outcome(rx.complete, 2))
    results.append(outcome(rx.complete, 0))
    results.append(outcome(rx.read_header, rx.data_offset, 8))
    with pytest.raises(ValueError):
        tx.reset(-1)
    return results


@needs_c
def test_misuse_errors_match() -> None:
    g = small_geometry()
    reference = misuse(*make_pair(new_region(g), g, "py", "py"))
    assert misuse(*make_pair(new_region(g), g, "c", "c")) == reference
    assert reference[0] == ("ValueError", "0 bytes never fit a 8192-byte data area")
    assert reference[4] == ("ValueError", "cannot complete 1 of 0 held spans")
    assert reference[5] == ("RuntimeError", "publish outside the open reservation")


@needs_c
def test_c_constructor_refuses_a_queue_outside_its_buffer() -> None:
    g = small_geometry()
    buf = new_region(g)
    for offset in (-8, g.region_size - g.queue_stride + 8, g.queue_offset(0, 1) + 4):
        with pytest.raises(ValueError, match="does not lie 8-byte aligned"):
            _fastpath.TxRing(buf, offset, g, 1)
    bad = dataclasses.replace(g, queue_num=6)
    with pytest.raises(ValueError, match="queue_num"):
        _fastpath.RxRing(buf, g.queue_offset(0, 1), bad, 0)
    with pytest.raises(BufferError):
        _fastpath.RxRing(bytes(g.region_size), g.queue_offset(0, 1), g, 0)


@needs_c
def test_c_checks_its_callers_offsets() -> None:
    """The C path bounds-checks every caller-supplied offset (Python trusts its caller)."""
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, "c", "c")
    with pytest.raises(RuntimeError, match="write outside the open reservation"):
        tx.write(tx.data_offset, b"x")
    offset = tx.reserve(64)
    with pytest.raises(RuntimeError, match="write outside"):
        tx.write(offset + 60, b"12345")
    with pytest.raises(RuntimeError, match="write outside"):
        tx.write_header(offset - 16, 1, 1)
    tx.write(offset, b"12345")
    with pytest.raises(ValueError, match="outside the data area"):
        rx.read_into(rx.data_offset - 1, bytearray(4), 0, 4)
    with pytest.raises(ValueError, match="outside the data area"):
        rx.read_into(rx.data_offset + g.data_size - 2, bytearray(4), 0, 4)
    with pytest.raises(ValueError, match="do not fit a 4-byte buffer"):
        rx.read_into(rx.data_offset, bytearray(4), 1, 4)
    with pytest.raises(TypeError, match="read-only"):
        rx.read_into(rx.data_offset, b"abcd", 0, 4)
    with pytest.raises(ValueError, match="no span of the data area"):
        rx.read_header(rx.data_offset + 8, 32)


@pytest.mark.parametrize("impl", ["py", pytest.param("c", marks=needs_c)])
def test_publish_refuses_a_descriptor_beyond_queue_size(impl: str) -> None:
    """One reservation published in more pieces than free descriptors must not overrun."""
    g = small_geometry(queue_num=4)
    buf = new_region(g)
    tx, _ = make_pair(buf, g, impl, "py")
    for seq in range(3):
        tx.send_small(seq, b"abc")
    offset = tx.reserve(64)
    tx.publish(offset, 32, False)
    with pytest.raises(RuntimeError, match="in flight"):
        tx.publish(offset + 32, 32, True)


@pytest.mark.parametrize("impl", ["py", pytest.param("c", marks=needs_c)])
def test_send_small_refuses_a_tag_the_receiver_rejects(impl: str) -> None:
    g = small_geometry()
    tx, _ = make_pair(new_region(g), g, impl, "py")
    with pytest.raises(ValueError, match="tag"):
        tx.send_small(-1, b"abc")
    assert tx.in_flight == 0


# ------------------------------------------------------------------------------------------
# Differential property test: random operation sequences on all four pairings at once
# ------------------------------------------------------------------------------------------


class World:
    """One pairing on its own region; every world sees the same operations."""

    def __init__(self, geometry: Any, tx_impl: str, rx_impl: str) -> None:
        self.buf = new_region(geometry)
        self.tx, self.rx = make_pair(self.buf, geometry, tx_impl, rx_impl)
        self.queue = Queue(geometry.queue_offset(0, 1), geometry)

    def queue_bytes(self) -> bytes:
        q = self.queue
        return bytes(self.buf[q.base : q.base + q.geometry.queue_stride])


@dataclasses.dataclass
class Model:
    """What the test knows: messages in flight and the spans they occupy."""

    sent: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # seq, off, len
    unpolled: int = 0  # index into sent of the next span the device will see
    seq: int = 0


def check_sane_span(ring: Any, offset: int, length: int) -> None:
    assert ring.data_offset <= offset and offset + length <= ring.data_offset + ring.data_size
    assert 0 < length <= ring.max_span and offset % layout.SPAN_ALIGN == 0


def check_no_overlap(spans: list[tuple[int, int, int]]) -> None:
    extents = sorted((off, off + layout.align_up(n, 16)) for _, off, n in spans)
    for (_, end), (start, _) in itertools.pairwise(extents):
        assert end <= start, f"live spans overlap: {extents}"


def step(worlds: list[World], model: Model, data: Any) -> None:
    w0 = worlds[0]
    g = w0.queue.geometry
    op = data.draw(
        st.sampled_from(["send", "send", "multi", "recv", "recv", "complete", "reclaim", "arm"])
    )
    if op == "send":
        size = data.draw(st.one_of(st.integers(0, 64), st.integers(0, g.max_span - 16)))
        before = [(w.queue.avail_idx(w.buf), w.queue.avail_event(w.buf)) for w in worlds]
        results = [w.tx.send_small(model.seq, payload(model.seq, size)) for w in worlds]
        assert len(set(results)) == 1, results
        if results[0] == virtqueue.SEND_FULL:
            return
        for old, event in before:
            kick = layout.need_event(event, (old + 1) & 0xFFFF, old)
            assert results[0] == (virtqueue.SEND_KICK if kick else virtqueue.SEND_OK)
        addr, length, _, _ = w0.queue.desc(w0.buf, (w0.queue.avail_idx(w0.buf) - 1) % g.queue_num)
        check_sane_span(w0.tx, addr, length)
        model.sent.append((model.seq, addr, length))
        model.seq += 1
    elif op == "multi":
        size = data.draw(st.integers(0, min(3 * g.max_span, g.data_size) - 16))
        piece = data.draw(st.sampled_from([16, 256, g.max_span]))
        total = 16 + size
        pieces = -(-total // piece)
        if pieces + w0.tx.in_flight > g.queue_num or pieces > 6:
            return
        offsets = [w.tx.reserve(total) for w in worlds]
        assert len(set(offsets)) == 1, offsets
        if offsets[0] < 0:
            return
        data_bytes = payload(model.seq, size)
        for w in worlds:
            w.tx.write_header(offsets[0], size, model.seq)
            w.tx.write(offsets[0] + 16, data_bytes)
        for start in range(0, total, piece):
            n = min(piece, total - start)
            kicks = {w.tx.publish(offsets[0] + start, n, start + n == total) for w in worlds}
            assert len(kicks) == 1
            model.sent.append((model.seq if start == 0 else -1, offsets[0] + start, n))
        model.seq += 1
    elif op == "recv":
        if model.unpolled == len(model.sent):
            assert all(w.rx.poll() is None for w in worlds)
            return
        seq, offset, length = model.sent[model.unpolled]
        model.unpolled += 1
        if seq < 0:
            assert all(w.rx.poll() == (offset, length) for w in worlds)
            return
        heads = [w.rx.poll_header() for w in worlds]
        assert len(set(heads)) == 1, heads
        assert heads[0][:2] == (offset, length) and heads[0][3] == seq
        total = heads[0][2]
        first = min(total, length - 16)
        dest = bytearray(first)
        for w in worlds:
            w.rx.read_into(offset + 16, dest, 0, first)
            assert dest == payload(seq, total)[:first]
    elif op == "complete":
        held = w0.rx.held
        count = data.draw(st.integers(0, held + 1))
        before = [w.queue.used_event(w.buf) for w in worlds]
        results = [outcome(w.rx.complete, count) for w in worlds]
        assert len(set(map(repr, results))) == 1, results
        if 0 < count <= held:
            for w, event in zip(worlds, before, strict=True):
                new = struct.unpack_from("<H", w.buf, w.queue.used + 2)[0]
                assert results[0] == layout.need_event(event, new, (new - count) & 0xFFFF)
    elif op == "reclaim":
        results = [w.tx.reclaim() for w in worlds]
        assert len(set(results)) == 1, results
        del model.sent[: results[0]]
        model.unpolled -= results[0]
    else:
        results = [(w.tx.arm(), w.rx.arm()) for w in worlds]
        assert len(set(results)) == 1, results
    check_no_overlap(model.sent)
    assert all(w.tx.in_flight == len(model.sent) for w in worlds)
    reference = w0.queue_bytes()
    for w in worlds[1:]:
        assert w.queue_bytes() == reference


@FAST
@given(st.data(), st.sampled_from([(4, 4096, 512), (8, 8192, 1024), (16, 4096, 4096)]))
def test_random_operations_agree_across_implementations(data: Any, shape: Any) -> None:
    geometry = small_geometry(*shape)
    worlds = [World(geometry, t, r) for t, r in WORLD_PAIRS]
    model = Model()
    for _ in range(data.draw(st.integers(1, 120))):
        step(worlds, model, data)


# ------------------------------------------------------------------------------------------
# Sessions
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_peer_lost_when_the_other_half_resets(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    tx.send_small(1, b"abc")
    tx.send_small(2, b"abc")
    rx.poll()
    rx.complete(1)
    assert tx.reclaim() == 1
    rx.reset(SESSION + 1)  # the receiver restarted: used.idx goes back to 0
    with pytest.raises(PeerLostError, match="receiver restarted") as info:
        tx.reclaim()
    assert info.value.peer == 1
    assert tx.reclaim() == 0 and tx.broken is None
    tx.send_small(2, b"def")
    tx.reset(SESSION + 2)  # the sender restarted too, into another session
    rx2 = rx_class(rx_impl)(buf, g.queue_offset(0, 1), g, 0)
    rx2.reset(SESSION + 1)
    assert rx2.poll() is None
    tx.send_small(3, b"ghi")
    assert rx2.poll() is None and not rx2.check_sync()


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_a_half_never_reset_is_never_in_sync(tx_impl: str, rx_impl: str) -> None:
    """On a fresh region both session words are 0: that must not count as a session."""
    g = small_geometry()
    buf = new_region(g)
    offset = g.queue_offset(0, 1)
    rx = rx_class(rx_impl)(buf, offset, g, 0)
    assert not rx.check_sync() and rx.poll() is None and rx.arm() is False
    tx = tx_class(tx_impl)(buf, offset, g, 1)
    assert not tx.check_sync() and tx.reclaim() == 0
    tx.reset(SESSION)
    assert tx.send_small(1, b"abc") == virtqueue.SEND_KICK  # not in sync: always kick
    assert rx.poll() is None and not tx.check_sync()
    rx.reset(SESSION)
    assert rx.poll_header()[2:] == (3, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_reserve_needs_a_descriptor_per_piece(impl: str) -> None:
    g = small_geometry(queue_num=4, data_size=8192, max_span=1024)
    tx, _ = make_pair(new_region(g), g, impl, "py")
    tx.send_small(0, b"a")
    tx.send_small(1, b"b")
    assert tx.reserve(2 * 1024 + 1) == -1  # three pieces, two descriptors free
    offset = tx.reserve(2 * 1024)
    assert offset >= 0
    tx.publish(offset, 1024, False)
    tx.publish(offset + 1024, 1024, True)
    assert tx.in_flight == 4


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_receiver_sees_peer_lost_after_sender_reset(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    tx.reset(SESSION + 1)
    tx.send_small(1, b"abc")
    with pytest.raises(PeerLostError, match="sender restarted") as info:
        rx.poll()
    assert info.value.peer == 0
    assert rx.poll() is None


# ------------------------------------------------------------------------------------------
# Adversarial: scribbles over what the other side owns
# ------------------------------------------------------------------------------------------

EXTREMES = [0, 1, 2, 15, 16, 0x7FFF, 0x8000, 0xFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1]


def scribbles(fields: list[tuple[int, str]]) -> Any:
    def value_for(fmt: str) -> Any:
        bits = struct.calcsize(fmt) * 8
        extremes = [v for v in EXTREMES if v < 1 << bits]
        return st.one_of(st.sampled_from(extremes), st.integers(0, (1 << bits) - 1))

    field = st.sampled_from(fields)
    one = field.flatmap(lambda f: st.tuples(st.just(f), value_for(f[1])))
    return st.lists(one, min_size=1, max_size=6)


def apply(buf: Any, writes: list[tuple[tuple[int, str], int]]) -> None:
    for (offset, fmt), value in writes:
        struct.pack_into(fmt, buf, offset, value)


def assert_other_queues_work(buf: Any, geometry: Any, tx_impl: str, rx_impl: str) -> None:
    for src, dst in ((1, 0), (0, 2)):
        tx, rx = make_pair(buf, geometry, tx_impl, rx_impl, src, dst)
        roundtrip(tx, rx, buf)


def exercise_rx(rx: Any, geometry: Any) -> RingCorruptError | None:
    """Drive a receiver over scribbled memory; return the error that broke it, if any."""
    error = None
    for i in range(3 * geometry.queue_num + 4):
        try:
            if i % 3 == 0:
                head = rx.poll_header()
                if head is not None:
                    offset, length, total, tag = head
                    check_sane_span(rx, offset, length)
                    assert length - 16 <= total <= layout.MAX_MESSAGE
                    assert 0 <= tag <= layout.TAG_MAX
            else:
                span = rx.poll()
                if span is not None:
                    check_sane_span(rx, *span)
            assert 0 <= rx.held <= geometry.queue_num
            if rx.held and i % 2:
                rx.complete(rx.held)
            rx.arm()
        except RingCorruptError as exc:
            error = exc
            break
        except PeerLostError:
            continue
    return error


@FAST
@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
@given(data=st.data())
def test_scribbled_driver_area_never_fools_the_receiver(
    tx_impl: str, rx_impl: str, data: Any
) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    q = Queue(g.queue_offset(0, 1), g)
    for seq in range(data.draw(st.integers(0, g.queue_num))):
        tx.send_small(seq, payload(seq, data.draw(st.integers(0, 100))))
    for _ in range(data.draw(st.integers(0, 3))):
        rx.poll()
    fields = q.driver_fields()
    fields += [(tx.data_offset + 16 * i, "<Q") for i in range(0, 64, 4)]  # span headers
    apply(buf, data.draw(scribbles(fields)))
    error = exercise_rx(rx, g)
    if error is not None:
        assert rx.broken is error and error.peer == 0
        for call in (rx.poll, rx.poll_header):
            with pytest.raises(RingCorruptError) as again:
                call()
            assert again.value is error
    assert_other_queues_work(buf, g, tx_impl, rx_impl)


@FAST
@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
@given(data=st.data())
def test_scribbled_device_area_never_fools_the_sender(
    tx_impl: str, rx_impl: str, data: Any
) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    q = Queue(g.queue_offset(0, 1), g)
    for seq in range(data.draw(st.integers(0, g.queue_num))):
        tx.send_small(seq, payload(seq, 30))
    for _ in range(data.draw(st.integers(0, tx.in_flight))):
        rx.poll()
    if rx.held:
        rx.complete(data.draw(st.integers(1, rx.held)))
    apply(buf, data.draw(scribbles(q.device_fields())))
    error = None
    for seq in range(3 * g.queue_num):
        try:
            before = tx.in_flight
            freed = tx.reclaim()
            assert 0 <= freed <= before
            status = tx.send_small(seq, payload(seq, 30))
            assert status in (virtqueue.SEND_OK, virtqueue.SEND_KICK, virtqueue.SEND_FULL)
            assert 0 <= tx.in_flight <= g.queue_num
            slot = (q.avail_idx(buf) - 1) % g.queue_num
            check_sane_span(tx, *q.desc(buf, slot)[:2])
            tx.arm()
        except RingCorruptError as exc:
            error = exc
            break
        except PeerLostError:
            continue
    if error is not None:
        assert tx.broken is error and error.peer == 1
        with pytest.raises(RingCorruptError) as again:
            tx.reclaim()
        assert again.value is error
    assert_other_queues_work(buf, g, tx_impl, rx_impl)


CORRUPTIONS = {
    # name: (memory write after one published message, the error's field)
    "avail.idx ahead": (lambda q: (q.avail + 2, "<H", 9), "avail.idx"),
    "avail.ring head": (lambda q: (q.avail + 4, "<H", 3), "avail.ring"),
    "desc flags": (lambda q: (q.ring + 12, "<H", layout.VRING_DESC_F_NEXT), "desc[0].flags"),
    "desc addr": (lambda q: (q.ring, "<Q", q.base + 16), "desc[0].addr"),
    "desc addr unaligned": (
        lambda q: (q.ring, "<Q", q.base + q.geometry.data_rel_offset + 8),
        "desc[0].addr",
    ),
    "desc addr huge": (lambda q: (q.ring, "<Q", 2**64 - 16), "desc[0].len"),
    "desc len": (lambda q: (q.ring + 8, "<I", 0xFFFFFFFF), "desc[0].len"),
    "header flags": (lambda q: (q.base + q.geometry.data_rel_offset + 12, "<I", 0), "header.flags"),
    "header total": (lambda q: (q.base + q.geometry.data_rel_offset, "<Q", 1), "header.total"),
    "header tag": (lambda q: (q.base + q.geometry.data_rel_offset + 8, "<i", -3), "header.tag"),
}


def corrupt_receive(impl: str, name: str) -> tuple[str, Any, str, str]:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, "py", impl)
    tx.send_small(5, b"0123456789")
    offset, fmt, value = CORRUPTIONS[name][0](Queue(g.queue_offset(0, 1), g))
    struct.pack_into(fmt, buf, offset, value)
    with pytest.raises(RingCorruptError) as info:
        rx.poll_header()
    err = info.value
    return err.field, err.value, err.detail, str(err)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_receiver_corruption_errors(name: str) -> None:
    field, _, _, _ = reference = corrupt_receive("py", name)
    assert field == CORRUPTIONS[name][1]
    if _fastpath is not None:
        assert corrupt_receive("c", name) == reference


DEVICE_CORRUPTIONS = {
    "used.idx": (lambda q: (q.used + 2, "<H", 5), "used.idx"),
    "used.ring.id": (lambda q: (q.used + 4, "<I", 7), "used.ring.id"),
    "used.ring.len": (lambda q: (q.used + 8, "<I", 4096), "used.ring.len"),
}


def corrupt_reclaim(impl: str, name: str) -> tuple[str, Any, str, str]:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, impl, "py")
    tx.send_small(5, b"0123456789")
    rx.poll()
    rx.complete(1)
    offset, fmt, value = DEVICE_CORRUPTIONS[name][0](Queue(g.queue_offset(0, 1), g))
    struct.pack_into(fmt, buf, offset, value)
    with pytest.raises(RingCorruptError) as info:
        tx.reclaim()
    err = info.value
    return err.field, err.value, err.detail, str(err)


@pytest.mark.parametrize("name", sorted(DEVICE_CORRUPTIONS))
def test_sender_corruption_errors(name: str) -> None:
    field, _, _, _ = reference = corrupt_reclaim("py", name)
    assert field == DEVICE_CORRUPTIONS[name][1]
    if _fastpath is not None:
        assert corrupt_reclaim("c", name) == reference


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_mark_broken_and_reset(tx_impl: str, rx_impl: str) -> None:
    g = small_geometry()
    buf = new_region(g)
    tx, rx = make_pair(buf, g, tx_impl, rx_impl)
    err = rx.mark_broken("span.addr", 123, "expected contiguous 0")
    assert isinstance(err, RingCorruptError) and rx.broken is err
    assert str(err) == "peer 0 corrupted span.addr (read 123): expected contiguous 0"
    with pytest.raises(RingCorruptError) as info:
        rx.poll()
    assert info.value is err
    rx.reset(SESSION)
    assert rx.broken is None
    roundtrip(tx, rx, buf)


# ------------------------------------------------------------------------------------------
# On a real POSIX shm mapping
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tx_impl", "rx_impl"), PAIRS)
def test_on_a_shm_region(make_region: Any, tx_impl: str, rx_impl: str) -> None:
    region = make_region(1 << 20, 3, queue_num=16)
    g = region.geometry
    for src, dst in ((0, 1), (2, 0)):
        tx, rx = make_pair(region.buf, g, tx_impl, rx_impl, src, dst)
        roundtrip(tx, rx, region.buf, count=40)
        assert region.queue_counters(src, dst)["sent_messages"] == 40
        del tx, rx
