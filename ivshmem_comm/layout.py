"""The region format: every constant, offset and struct format of the on-memory contract.

All integers are little-endian. A region is laid out as::

    0                     superblock (SUPERBLOCK_SIZE bytes)
    peer_table_offset     max_peers slots of PEER_SLOT_SIZE bytes
    queues_offset         max_peers * (max_peers - 1) queues of queue_stride bytes
    coll_offset           coll_slots collective slots of coll_slot_stride bytes (format 2)
    heap_offset           the window heap: heap_size bytes (format 3; see "Window heap")

A queue carries the messages of one ordered pair (src -> dst) and is laid out as::

    +0                    control block: driver line, device line (session words), driver
                          counters, device counters (src writes the driver's, dst the device's)
    +CONTROL_SIZE         virtio 1.x split virtqueue, legacy layout of vring_init(num, align):
                            descriptor table, available ring (+used_event), padding to
                            `align`, used ring (+avail_event); exactly vring_size(num, align)
    +data_rel_offset      data area: an in-order byte ring of data_size bytes

Descriptor addresses are offsets from the start of the region, never pointers: every guest
maps the region at a different guest-physical address.

Ownership (who may store to what) is the basis of validation: the driver (sender, peer src)
writes the descriptor table, the available ring, the driver line, the driver counters and the
data area; the device (receiver, peer dst) writes the used ring, the device line and the
device counters. Each side trusts nothing the other side wrote.

This module is pure data: no I/O, no policy. It is the single place where the format lives.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

MAGIC = b"IVSHMCOM"
# 2: the collective area (coll_offset, coll_slots, coll_slab in the superblock). A format-1
# region is refused with an error saying so (its superblock has no room for those fields).
# 3: the window heap (heap_offset, heap_size); a format-2 region is refused the same way.
# 4: two cells (arrive line + slab) per member of a collective slot, no done line; a format-3
# region is refused the same way (its members' blocks are laid out otherwise).
# 5: a queue's counters in their own lines, apart from the session words (CONTROL_SIZE 256);
# a format-4 region is refused the same way (its queues start otherwise).
FORMAT_VERSION = 5
CACHE_LINE = 64
PAGE_SIZE = 4096

# ---------------------------------------------------------------------------------------------
# Superblock: the first page. The immutable part (offsets 0..SB_CHECKSUM_OFFSET) is written
# once by the creator before any peer can see the region and is covered by a CRC-32.
# ---------------------------------------------------------------------------------------------
SUPERBLOCK_SIZE = PAGE_SIZE
NAME_MAX = 63  # bytes of UTF-8; the field is NUL-padded to 64
SB_IMMUTABLE = struct.Struct("<8sIIQ16sIIIIQQIIQQ64sQIIQQ")
# fields, in order:
#   magic, version, superblock_size, region_size, uuid, max_peers, queue_num, vring_align,
#   max_span, data_size, peer_table_offset, peer_slot_size, flags, queues_offset,
#   queue_stride, name, coll_offset, coll_slots, coll_slab, heap_offset, heap_size
SB_CHECKSUM = struct.Struct("<I")
SB_CHECKSUM_OFFSET = SB_IMMUTABLE.size
# Mutable part, on its own cache line; owned by the broker (generation bumps at each broker
# start that adopts the region; pid/heartbeat say which broker serves it).
SB_BROKER_OFFSET = 256
SB_BROKER = struct.Struct("<QQQ")  # generation, broker pid, broker heartbeat (CLOCK_REALTIME ns)

# ---------------------------------------------------------------------------------------------
# Peer table: one cache-line slot per peer.
# ---------------------------------------------------------------------------------------------
PEER_SLOT_SIZE = CACHE_LINE
PEER_SLOT = struct.Struct("<IIIIQQQ")
# fields: state, incarnation, pid, host_id, doorbell, heartbeat_ns, joined_ns
PEER_STATE_OFFSET = 0  # u32
PEER_INCARNATION_OFFSET = 4  # u32
PEER_HEARTBEAT_OFFSET = 24  # u64

PEER_FREE = 0  # never used, or released cleanly
PEER_JOINING = 1  # claimed; the peer is resetting its queue halves
PEER_READY = 2  # the peer sends and receives
PEER_LEFT = 3  # closed its endpoint cleanly
PEER_DEAD = 4  # vanished without closing (seen by the broker or by a later claimer)
PEER_STATE_NAMES = {
    PEER_FREE: "free",
    PEER_JOINING: "joining",
    PEER_READY: "ready",
    PEER_LEFT: "left",
    PEER_DEAD: "dead",
}
NO_DOORBELL = 0xFFFFFFFFFFFFFFFF

# ---------------------------------------------------------------------------------------------
# Queue control block: four cache lines, each written by one owner only, so the two sides
# never write the same line. The driver line and the device line hold a session word each
# (see QueueSession), which the other side loads whenever it finds new entries; the counters
# that `ivshmem-broker status` reads, which their owner bumps on every message, sit in lines
# of their own (format 5: in the session lines, each message's counter store pulled the line
# back from the peer that had just loaded the session word there, and the peer's next load
# pulled it over again: two extra transfers between the CPUs per message, ~0.2 us of an 8 B
# one-way latency of 0.9-1.1 us when the host runs the two vCPUs far apart).
# ---------------------------------------------------------------------------------------------
CONTROL_SIZE = 4 * CACHE_LINE
DRIVER_LINE_OFFSET = 0
DEVICE_LINE_OFFSET = CACHE_LINE
DRIVER_COUNTERS_OFFSET = 2 * CACHE_LINE
DEVICE_COUNTERS_OFFSET = 3 * CACHE_LINE
# Driver counters: messages sent, bytes sent, waits for space (queue full), kicks sent.
# Device counters: messages received, bytes received, sleeps (blocked waits), kicks sent.
COUNTERS = struct.Struct("<QQQQ")
COUNTER_NAMES_DRIVER = ("sent_messages", "sent_bytes", "full_waits", "send_kicks")
COUNTER_NAMES_DEVICE = ("recv_messages", "recv_bytes", "sleeps", "recv_kicks")

# ---------------------------------------------------------------------------------------------
# virtio split virtqueue (struct layout of <linux/virtio_ring.h>)
# ---------------------------------------------------------------------------------------------
VRING_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
VRING_DESC_SIZE = VRING_DESC.size  # 16
VRING_USED_ELEM = struct.Struct("<II")  # id, len
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_IN_ORDER = 35
QUEUE_FEATURES = (
    (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_IN_ORDER)
)
QUEUE_NUM_MAX = 32768

# ---------------------------------------------------------------------------------------------
# Message framing in the data area. A message is one or more spans, each one descriptor. The
# first span starts with a SPAN_HEADER; continuation spans carry payload only. Spans start at
# SPAN_ALIGN-aligned offsets of the data area.
# ---------------------------------------------------------------------------------------------
SPAN_HEADER = struct.Struct("<QiI")  # total message length, tag, header flags
SPAN_HEADER_SIZE = SPAN_HEADER.size  # 16
SPAN_ALIGN = 16
HDR_F_FIRST = 1  # the only defined header flag; a header always carries it
MAX_MESSAGE = 1 << 48  # larger total lengths are rejected as corrupt
MAX_PEERS = 256  # the most peer slots a region has (Geometry.validate)
# Sender-side placement, not part of the format: once a queue's allocation head is past this
# many bytes of its data area and that many bytes at the bottom are free, the next reservation
# wraps to the bottom early (so at least this much stays usable after the wrap): a stream of
# messages cycles through a few MiB that stay in cache instead of walking the whole data area
# (16 MiB MPI ping-pong in pieces: 1190 -> 860 us one way).
CACHE_WINDOW = 4 << 20
# Sender-side placement, not part of the format: while the receiver keeps up (a completion
# came back within the last LIVE_RECEIVER_NS), a reservation of at most half the cache
# window that would end past the window waits for the bottom of the data area to free
# instead (TxRing.reserve: RESERVE_LATER), so a sender far ahead of its receiver (osu_bw's
# window of 64 x 1 MiB) cycles through CACHE_WINDOW bytes that stay in cache instead of
# walking the whole data area (one process, 1 MiB messages, send + receive CPU: 59 us with
# the queue emptied each time, 140 us 16 messages ahead over 24 MiB). A receiver that stopped
# taking leaves the sender the whole area after that long: the capacity a blocking send can
# buffer is unchanged.
LIVE_RECEIVER_NS = 500_000
# Sender-side placement, not part of the format: a one-span message of at least this many
# bytes takes completed spans back before it reserves (TxRing.send_small), so that in a
# ping-pong the queue is empty and the message goes to the bottom of the data area, in cache
# (64 KiB send, one process: 4.8-5.9 -> ~2.5 us CPU; without it the head walked the data area
# until 256 descriptors were in flight). Smaller messages skip the shared read.
RECLAIM_FIRST = 16 << 10
# Sender-side pipelining, not part of the format: a contiguous message of several spans is
# published in pieces of `pipe_span` bytes, about a PIPE_PIECES-th of it and at least
# PIPE_SPAN_MIN (never over max_span), so that the receiver copies the first pieces out while
# the sender writes the next (a 128 KiB message: two whole copies one after the other ->
# one and a quarter).
PIPE_SPAN_MIN = 16 << 10
PIPE_PIECES = 4
TAG_MIN = 0
TAG_MAX = (1 << 31) - 1


# ---------------------------------------------------------------------------------------------
# Collective area (format 2; its member blocks as below since format 4): coll_slots slots,
# each serving one group of peers (a communicator) at a time. A slot is::
#
#     +0                      header line (the claimer writes): claim word, generation
#     +CACHE_LINE + p * coll_peer_stride   peer p's block (peer p alone writes all of it):
#         +c * COLL_LINE_STRIDE   arrive line of cell c (c < COLL_CELLS): seq, nbytes, kind,
#                                 rounds (seq stored last); a scatterv root's first round
#                                 adds the others' block lengths after them, into the spare
#                                 line (collective.SCATTER_LENGTHS u64); a bcast root its
#                                 bytes, up to collective.BCAST_INLINE (also in its slab)
#         +COLL_SLEEP_OFFSET      sleep line: nonzero while the peer blocks on its doorbell
#         +COLL_SLAB_OFFSET + c * coll_slab   slab of cell c: coll_slab bytes of payload
#
# Every line sits alone in its 128-byte pair (the spare line after it keeps the adjacent-
# line prefetcher of one member's polls off another's stores). Round k of a member uses its
# cell k % COLL_CELLS: with two cells a member writes round k while the others still read
# its round k-1 (a root runs one collective ahead of its readers).
#
# Claim word: 0 free, else (incarnation << 32) | (peer + 1) of the claimer; a claim whose
# peer no longer holds that incarnation READY is stale and may be taken over (compare-and-
# exchange). Generation: the claimer's count of claims of this slot, 1..COLL_GEN_MASK.
# Sequence words: (generation << COLL_SEQ_BITS) | round; a member's rounds count up from 0
# at binding, so no flag is ever reset between calls. See ivshmem_comm/collective.py.
# ---------------------------------------------------------------------------------------------
COLL_HEADER = struct.Struct("<QQ")  # claim word, generation
COLL_ARRIVE = struct.Struct("<QQQQ")  # seq, nbytes, kind, rounds (of a v-variant)
COLL_CELLS = 2
COLL_LINE_STRIDE = 2 * CACHE_LINE  # a control line and its spare pair line
COLL_SLEEP_OFFSET = COLL_CELLS * COLL_LINE_STRIDE
COLL_SLAB_OFFSET = COLL_SLEEP_OFFSET + COLL_LINE_STRIDE
COLL_SEQ_BITS = 40
COLL_SEQ_MASK = (1 << COLL_SEQ_BITS) - 1
COLL_GEN_MASK = (1 << (64 - COLL_SEQ_BITS)) - 1
COLL_SLOTS_MAX = 64
COLL_SLOTS_DEFAULT = 8
# Each slab-sized piece of a large payload costs one round (a synchronisation of the
# group): 1 MiB collectives at 2 ranks took 2.5-5x less time with 256 KiB slabs than with
# 64 KiB ones; larger slabs gained little more.
COLL_SLAB_MAX = 256 << 10
COLL_AREA_SHARE = 8  # fit() gives the area's slabs at most 1/8 of the region

# ---------------------------------------------------------------------------------------------
# Window heap (format 3): memory of one-sided windows shared by the peers of a region
# (MPI Win.Allocate_shared). heap_size bytes at heap_offset: a header page, then the data
# pages that blocks are cut from (page-aligned, whole pages)::
#
#     +0                      lock word (u64): 0 free, else the holder's claim word
#     +HEAP_ENTRY_SIZE * (1 + i)   block entry i, one cache line: key, offset, length, tag
#     +HEAP_HEADER_SIZE       data: heap_size - HEAP_HEADER_SIZE bytes
#
# Claim words are the collective area's: (incarnation << 32) | (peer + 1). The lock is taken
# by compare-and-exchange; a lock whose holder no longer holds that incarnation READY is
# stale and may be taken over (a dead allocator never wedges the heap). Entry i is free when
# its key is 0 or stale the same way; its offset is relative to the data start. Only the
# lock's holder writes entries (key last). See ivshmem_comm/winheap.py.
# ---------------------------------------------------------------------------------------------
HEAP_HEADER_SIZE = PAGE_SIZE
HEAP_ENTRY = struct.Struct("<QQQQ")  # key (claim word of the owner), offset, length, tag
HEAP_ENTRY_SIZE = CACHE_LINE
HEAP_ENTRIES = HEAP_HEADER_SIZE // HEAP_ENTRY_SIZE - 1  # 63: line 0 holds the lock word
HEAP_MIN = 2 * PAGE_SIZE  # a header page and one page of data
HEAP_AREA_SHARE = 8  # fit() gives the window heap 1/8 of the region by default


def align_up(value: int, align: int) -> int:
    """Return `value` rounded up to a multiple of `align` (a power of two)."""
    return (value + align - 1) & ~(align - 1)


def vring_size(num: int, align: int) -> int:
    """Bytes of a legacy split virtqueue of `num` entries; equals Linux's vring_size()."""
    avail_end = VRING_DESC_SIZE * num + 2 * (3 + num)
    return align_up(avail_end, align) + 2 * 3 + VRING_USED_ELEM.size * num


def vring_offsets(num: int, align: int) -> tuple[int, int, int]:
    """Return (desc, avail, used) offsets relative to the ring start, as vring_init() sets."""
    avail = VRING_DESC_SIZE * num
    used = align_up(avail + 2 * (3 + num), align)
    return 0, avail, used


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio's vring_need_event(): True iff moving an index old -> new passed event_idx."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def queue_index(src: int, dst: int, max_peers: int) -> int:
    """Index of the one-way queue src -> dst among the max_peers*(max_peers-1) queues."""
    return src * (max_peers - 1) + (dst if dst < src else dst - 1)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Everything that fixes where things are in a region. Derived values are properties.

    Raises ValueError from `validate()` naming the first field that is out of range.
    """

    region_size: int
    max_peers: int
    queue_num: int
    vring_align: int
    data_size: int
    max_span: int
    coll_slots: int = 0  # 0: no collective area (collectives go through messages)
    coll_slab: int = 0
    heap_size: int = 0  # 0: no window heap (shared windows only within one process)

    @property
    def queue_count(self) -> int:
        return self.max_peers * (self.max_peers - 1)

    @property
    def peer_table_offset(self) -> int:
        return SUPERBLOCK_SIZE

    @property
    def queues_offset(self) -> int:
        return align_up(self.peer_table_offset + self.max_peers * PEER_SLOT_SIZE, PAGE_SIZE)

    @property
    def ring_rel_offset(self) -> int:
        # vring_init() aligns the used ring on the absolute address: the ring must start on a
        # multiple of vring_align (queues themselves start on page boundaries).
        return align_up(CONTROL_SIZE, self.vring_align)

    @property
    def data_rel_offset(self) -> int:
        return align_up(
            self.ring_rel_offset + vring_size(self.queue_num, self.vring_align), PAGE_SIZE
        )

    @property
    def queue_stride(self) -> int:
        return align_up(self.data_rel_offset + self.data_size, PAGE_SIZE)

    @property
    def coll_offset(self) -> int:
        return self.queues_offset + self.queue_count * self.queue_stride  # page-aligned

    @property
    def coll_peer_stride(self) -> int:
        return COLL_SLAB_OFFSET + COLL_CELLS * self.coll_slab

    @property
    def coll_slot_stride(self) -> int:
        return align_up(CACHE_LINE + self.max_peers * self.coll_peer_stride, PAGE_SIZE)

    @property
    def heap_offset(self) -> int:
        return self.coll_offset + self.coll_slots * self.coll_slot_stride  # page-aligned

    @property
    def required_size(self) -> int:
        return self.heap_offset + self.heap_size

    def queue_offset(self, src: int, dst: int) -> int:
        return self.queues_offset + queue_index(src, dst, self.max_peers) * self.queue_stride

    def coll_slot_offset(self, slot: int) -> int:
        """Offset of collective slot `slot`'s header line (no range check)."""
        return self.coll_offset + slot * self.coll_slot_stride

    def coll_peer_offset(self, slot: int, peer: int) -> int:
        """Offset of peer `peer`'s block (cell 0's arrive line first) in collective slot
        `slot`."""
        return self.coll_slot_offset(slot) + CACHE_LINE + peer * self.coll_peer_stride

    def validate(self) -> None:
        if not 2 <= self.max_peers <= MAX_PEERS:
            raise ValueError(f"max_peers must be 2..{MAX_PEERS}, got {self.max_peers}")
        q = self.queue_num
        if q < 2 or q > QUEUE_NUM_MAX or q & (q - 1):
            raise ValueError(f"queue_num must be a power of two in 2..{QUEUE_NUM_MAX}, got {q}")
        a = self.vring_align
        if a < 4 or a > PAGE_SIZE or a & (a - 1):
            raise ValueError(f"vring_align must be a power of two in 4..{PAGE_SIZE}, got {a}")
        if self.data_size < PAGE_SIZE or self.data_size % PAGE_SIZE:
            raise ValueError(f"data_size must be a multiple of {PAGE_SIZE}, got {self.data_size}")
        if self.data_size >= 1 << 32:
            raise ValueError(f"data_size must be below 4 GiB, got {self.data_size}")
        if not SPAN_ALIGN <= self.max_span <= self.data_size or self.max_span % SPAN_ALIGN:
            raise ValueError(
                f"max_span must be a multiple of {SPAN_ALIGN} in {SPAN_ALIGN}..data_size, "
                f"got {self.max_span}"
            )
        if not 0 <= self.coll_slots <= COLL_SLOTS_MAX:
            raise ValueError(f"coll_slots must be 0..{COLL_SLOTS_MAX}, got {self.coll_slots}")
        slab_ok = PAGE_SIZE <= self.coll_slab <= COLL_SLAB_MAX and not self.coll_slab % PAGE_SIZE
        if self.coll_slab if not self.coll_slots else not slab_ok:
            raise ValueError(
                f"coll_slab must be a multiple of {PAGE_SIZE} in {PAGE_SIZE}..{COLL_SLAB_MAX} "
                f"(0 without collective slots), got {self.coll_slab}"
            )
        if self.heap_size and (self.heap_size < HEAP_MIN or self.heap_size % PAGE_SIZE):
            raise ValueError(
                f"heap_size must be 0 or a multiple of {PAGE_SIZE} of at least {HEAP_MIN}, "
                f"got {self.heap_size}"
            )
        if self.required_size > self.region_size:
            raise ValueError(
                f"region_size {self.region_size} is smaller than the {self.required_size} "
                f"bytes this geometry needs"
            )

    @classmethod
    def fit(
        cls,
        region_size: int,
        max_peers: int,
        queue_num: int = 256,
        vring_align: int = CACHE_LINE,
        max_span: int | None = None,
        coll_slots: int = COLL_SLOTS_DEFAULT,
        heap_size: int | None = None,
    ) -> Geometry:
        """Return the geometry that gives each queue the largest data area `region_size` allows.

        `max_span` defaults to a quarter of the data area, capped at 1 MiB, so that a large
        message moves in spans that the receiver copies while the sender writes the next.
        The collective area gets `coll_slots` slots (fewer, down to none, if they do not fit)
        within 1/COLL_AREA_SHARE of the region, with the largest slab up to COLL_SLAB_MAX.
        The window heap gets `heap_size` bytes (default: 1/HEAP_AREA_SHARE of the region in
        whole pages, none if that is under HEAP_MIN).
        Raises ValueError if the region is too small for one page of data per queue.
        """
        if heap_size is None:
            heap_size = region_size // HEAP_AREA_SHARE // PAGE_SIZE * PAGE_SIZE
            heap_size = heap_size if heap_size >= HEAP_MIN else 0
        probe = cls(region_size, max_peers, queue_num, vring_align, PAGE_SIZE, SPAN_ALIGN)
        slots, slab = _fit_collective(region_size // COLL_AREA_SHARE, max_peers, coll_slots)
        coll_size = (
            slots * dataclasses.replace(probe, coll_slots=slots, coll_slab=slab).coll_slot_stride
        )
        overhead = (
            probe.queues_offset + probe.queue_count * probe.data_rel_offset + coll_size + heap_size
        )
        per_queue = (region_size - overhead) // max(probe.queue_count, 1)
        data_size = per_queue // PAGE_SIZE * PAGE_SIZE
        if data_size < PAGE_SIZE:
            need = overhead + max(probe.queue_count, 1) * PAGE_SIZE
            raise ValueError(
                f"a region of {region_size} bytes is too small for {max_peers} peers: "
                f"their {probe.queue_count} queues need at least {need} bytes"
            )
        if data_size >= 1 << 32:
            data_size = (1 << 32) - PAGE_SIZE
        if max_span is None:
            max_span = min(1 << 20, max(SPAN_ALIGN, data_size // 4 // SPAN_ALIGN * SPAN_ALIGN))
        geometry = cls(
            region_size, max_peers, queue_num, vring_align, data_size, max_span, slots, slab,
            heap_size,
        )  # fmt: skip
        geometry.validate()
        return geometry


def _fit_collective(budget: int, max_peers: int, slots: int) -> tuple[int, int]:
    """(coll_slots, coll_slab) of the largest slab (pages, <= COLL_SLAB_MAX) whose cells, for
    `max_peers` members in each of up to `slots` slots, take at most `budget` bytes, halving
    the slots while not even a page fits. Each slot's header line, its members' control lines
    and its page rounding come on top (under a page plus COLL_SLAB_OFFSET bytes per member):
    so a budget of a power of two gives slabs of a power of two, which payloads of a power of
    two fit (a 64 MiB region of 2 peers got 252 KiB slabs when the lines came out of the
    budget, and 256 KiB Bcasts and 128 KiB Alltoall blocks took messages, 1.6-4x slower)."""
    while slots > 0:
        slab = budget // slots // max_peers // COLL_CELLS // PAGE_SIZE * PAGE_SIZE
        if slab >= PAGE_SIZE:
            return slots, min(slab, COLL_SLAB_MAX)
        slots //= 2
    return 0, 0


def pack_superblock(geometry: Geometry, uuid: bytes, name: str) -> bytes:
    """Return the immutable superblock bytes followed by their CRC-32."""
    raw_name = name.encode()
    if len(raw_name) > NAME_MAX:
        raise ValueError(f"region name is {len(raw_name)} bytes; at most {NAME_MAX}")
    body = SB_IMMUTABLE.pack(
        MAGIC,
        FORMAT_VERSION,
        SUPERBLOCK_SIZE,
        geometry.region_size,
        uuid,
        geometry.max_peers,
        geometry.queue_num,
        geometry.vring_align,
        geometry.max_span,
        geometry.data_size,
        geometry.peer_table_offset,
        PEER_SLOT_SIZE,
        QUEUE_FEATURES & 0xFFFFFFFF,
        geometry.queues_offset,
        geometry.queue_stride,
        raw_name,
        geometry.coll_offset,
        geometry.coll_slots,
        geometry.coll_slab,
        geometry.heap_offset,
        geometry.heap_size,
    )
    return body + SB_CHECKSUM.pack(zlib.crc32(body))


@dataclasses.dataclass(frozen=True)
class Superblock:
    """The decoded immutable superblock."""

    geometry: Geometry
    uuid: bytes
    name: str


def unpack_superblock(raw: bytes, mapped_size: int) -> Superblock:
    """Decode and check a superblock copied out of a mapping of `mapped_size` bytes.

    Raises RegionFormatError naming the first thing that is wrong: magic, version, checksum,
    size (the recorded region size against the mapping) or a derived offset.
    """
    from ivshmem_comm.errors import RegionFormatError

    if len(raw) < SB_CHECKSUM_OFFSET + SB_CHECKSUM.size:
        raise RegionFormatError("size", f"mapping of {len(raw)} bytes holds no superblock")
    fields = SB_IMMUTABLE.unpack_from(raw)
    (magic, version, sb_size, region_size, uuid, max_peers, queue_num, vring_align,
     max_span, data_size, peer_table_offset, slot_size, _flags, queues_offset,
     queue_stride, raw_name, coll_offset, coll_slots, coll_slab, heap_offset,
     heap_size) = fields  # fmt: skip
    if magic != MAGIC:
        raise RegionFormatError("magic", f"expected {MAGIC!r}, found {magic!r}")
    if version == 1:
        raise RegionFormatError(
            "version",
            f"format 1 (no collective area) was written by an older ivshmem_comm; this "
            f"library reads format {FORMAT_VERSION}: recreate the region with this version",
        )
    if version == 2:
        raise RegionFormatError(
            "version",
            f"format 2 (no window heap) was written by an older ivshmem_comm; this library "
            f"reads format {FORMAT_VERSION}: recreate the region with this version",
        )
    if version == 3:
        raise RegionFormatError(
            "version",
            f"format 3 (one slab per collective member) was written by an older ivshmem_comm; "
            f"this library reads format {FORMAT_VERSION}: recreate the region with this version",
        )
    if version == 4:
        raise RegionFormatError(
            "version",
            f"format 4 (queue counters in the session lines) was written by an older "
            f"ivshmem_comm; this library reads format {FORMAT_VERSION}: recreate the region "
            f"with this version",
        )
    if version != FORMAT_VERSION:
        raise RegionFormatError("version", f"format {version}, this library reads {FORMAT_VERSION}")
    (checksum,) = SB_CHECKSUM.unpack_from(raw, SB_CHECKSUM_OFFSET)
    if checksum != zlib.crc32(raw[:SB_CHECKSUM_OFFSET]):
        raise RegionFormatError("checksum", "superblock CRC-32 does not match its contents")
    if region_size > mapped_size:
        raise RegionFormatError(
            "size", f"superblock says {region_size} bytes but only {mapped_size} are mapped"
        )
    geometry = Geometry(
        region_size, max_peers, queue_num, vring_align, data_size, max_span, coll_slots,
        coll_slab, heap_size,
    )  # fmt: skip
    try:
        geometry.validate()
    except ValueError as exc:
        raise RegionFormatError("geometry", str(exc)) from None
    derived = (
        ("superblock_size", sb_size, SUPERBLOCK_SIZE),
        ("peer_table_offset", peer_table_offset, geometry.peer_table_offset),
        ("peer_slot_size", slot_size, PEER_SLOT_SIZE),
        ("queues_offset", queues_offset, geometry.queues_offset),
        ("queue_stride", queue_stride, geometry.queue_stride),
        ("coll_offset", coll_offset, geometry.coll_offset),
        ("heap_offset", heap_offset, geometry.heap_offset),
    )
    for field, found, expected in derived:
        if found != expected:
            raise RegionFormatError(field, f"found {found}, geometry implies {expected}")
    try:
        name = raw_name.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        raise RegionFormatError("name", "region name is not UTF-8") from None
    return Superblock(geometry, uuid, name)


def session_word(driver_incarnation: int, device_incarnation: int) -> int:
    """The 64-bit session a queue half publishes: (driver incarnation, device incarnation).

    A queue carries traffic only while the driver line and the device line hold the same
    session: both ends have reset their halves for the same pair of incarnations.
    """
    return (driver_incarnation << 32) | device_incarnation


def span_count(total: int, max_span: int) -> int:
    """Spans a contiguous message of `total` payload bytes takes: header + payload in pieces."""
    return -(-(SPAN_HEADER_SIZE + total) // max_span)


def pipe_span(nbytes: int, max_span: int, queue_num: int) -> int:
    """The piece size a reservation of `nbytes` bytes (header included) is published in.

    max_span if it fits one span; else about nbytes / PIPE_PIECES, at least PIPE_SPAN_MIN, a
    multiple of SPAN_ALIGN, at most max_span, and large enough that the pieces take at most
    queue_num // 2 descriptors (a message `is_contiguous` admits takes no more than in
    pieces of max_span). Both rings publish and count descriptors by it.
    """
    if nbytes <= max_span:
        return max_span
    piece = max(align_up(-(-nbytes // PIPE_PIECES), SPAN_ALIGN), PIPE_SPAN_MIN)
    piece = max(piece, align_up(-(-nbytes // max(queue_num // 2, 1)), SPAN_ALIGN))
    return min(piece, max_span)


def is_contiguous(total: int, geometry: Geometry) -> bool:
    """Whether a message of `total` bytes is sent as one contiguous reservation.

    Both sides compute this the same way: a contiguous message is reserved whole, published in
    pieces of at most max_span bytes laid end to end (`pipe_span`), and may be held by the
    receiver as one zero-copy view. Any other message is streamed span by span and copied out
    as it arrives.
    """
    return (
        SPAN_HEADER_SIZE + total <= geometry.data_size
        and span_count(total, geometry.max_span) <= geometry.queue_num // 2
    )
