"""The window heap: memory of one-sided windows shared by the peers of one region.

Format (layout.py, "Window heap"): a header page holding the lock word and HEAP_ENTRIES
block entries, then the data pages. A block is a run of whole data pages given to one
group of peers (an MPI communicator's members in this region) by one of them, the
*allocator*: it takes the heap lock, picks the first gap of the data pages that fits among
the live entries, writes a free entry, releases the lock and tells the others (index,
offset, length, tag) by message; each member then `check`s the entry against what it was
told before it maps the block. Allocations by disjoint groups serialise on the lock, so
they never collide.

Ownership and memory ordering of each shared field:
- lock word: taken by compare-and-exchange (a locked instruction: a full barrier on x86),
  released by compare-and-exchange back to 0 by its holder only. A lock whose holder no
  longer holds that incarnation READY (died, left, came back as a new incarnation) is stale:
  the next allocator takes it over by compare-and-exchange, so a dead allocator never wedges
  the heap (the peer-crash rule of the queues: the peer table says who is alive).
- block entry: written only by the lock's holder: offset, length and tag first, key last
  (program order of aligned 8-byte stores: TSO keeps it; the key store publishes the entry);
  its key is cleared by its owner (compare-and-exchange) when the group frees the block, or
  by a later allocator when the owner is stale (its memory is then reused: the group that
  had it lost its allocator, which MPI treats as the job's failure). Readers load the entry
  once (one unpack: a copy), then check it.
- data: the group's window memory; MPI's synchronisation calls order it (see guest_lib/mpi
  /win.py), the heap never reads it.

Validation: every entry is copied once out of shared memory and checked before use. A live
entry (key naming a READY peer of that incarnation) whose offset or length is not whole
pages inside the data area, or that overlaps another live entry, raises RingCorruptError
naming the peer its key names; an entry a member was told about that does not hold what it
was told, or that overlaps another live entry, raises RingCorruptError naming the
allocator. Keys that name no peer are stale.
Nothing read from the heap is ever used as an offset without these checks.
"""

from __future__ import annotations

import dataclasses
import time

from ivshmem_comm import layout
from ivshmem_comm.collective import _claim_is_stale
from ivshmem_comm.errors import RingCorruptError, TimeoutError
from ivshmem_comm.region import Region
from ivshmem_comm.ring import compare_exchange_u64

LOCK_POLL_S = 0.0005  # s between attempts at a lock held by a live peer
LOCK_TIMEOUT_S = 10.0  # default bound of a wait for the lock


def claim_word(peer: int, incarnation: int) -> int:
    """The claim word of `peer` in `incarnation` (lock word and entry keys)."""
    return (incarnation << 32) | (peer + 1)


def _peer_of(word: int) -> int:
    return (word & 0xFFFFFFFF) - 1


@dataclasses.dataclass(frozen=True)
class Block:
    """A live block: entry `index`, `length` bytes at region offset `offset`, `tag` (the
    allocator's random name for it, which members compare)."""

    index: int
    offset: int
    length: int
    tag: int


class WindowHeap:
    """The window heap of `region` as peer `peer` (`incarnation`) sees it.

    Raises ValueError if the region has no heap (geometry.heap_size == 0).
    """

    def __init__(self, region: Region, peer: int, incarnation: int) -> None:
        g = region.geometry
        if not g.heap_size:
            raise ValueError("the region has no window heap (heap_size 0)")
        self.region = region
        self.base = g.heap_offset
        self.data = g.heap_offset + layout.HEAP_HEADER_SIZE
        self.data_size = g.heap_size - layout.HEAP_HEADER_SIZE
        self.mine = claim_word(peer, incarnation)

    # ------------------------------------------------------------------ entries
    def _entry_offset(self, index: int) -> int:
        return self.base + layout.HEAP_ENTRY_SIZE * (1 + index)

    def _read(self, index: int) -> tuple[int, int, int, int]:
        """Entry `index`, copied once: (key, offset, length, tag)."""
        fields: tuple[int, int, int, int] = layout.HEAP_ENTRY.unpack_from(
            self.region.buf, self._entry_offset(index)
        )
        return fields

    def _live(self, key: int) -> bool:
        return key != 0 and not _claim_is_stale(self.region, key)

    def _checked(self, index: int, key: int, offset: int, length: int) -> None:
        """RingCorruptError naming the key's peer unless (offset, length) is whole pages
        inside the data area."""
        page = layout.PAGE_SIZE
        if offset % page or length <= 0 or length % page or offset + length > self.data_size:
            raise RingCorruptError(
                _peer_of(key),
                f"window heap entry {index}",
                (offset, length),
                f"not whole pages inside the {self.data_size}-byte heap",
            )

    def live_blocks(self) -> list[Block]:
        """Every live block, checked (see the module docstring), by offset.

        Raises RingCorruptError naming the owner of a malformed or overlapping entry."""
        blocks = []
        for index in range(layout.HEAP_ENTRIES):
            key, offset, length, tag = self._read(index)
            if not self._live(key):
                continue
            self._checked(index, key, offset, length)
            blocks.append((offset, length, index, tag, key))
        blocks.sort()
        end = 0
        for offset, length, index, _, key in blocks:
            if offset < end:
                raise RingCorruptError(
                    _peer_of(key), f"window heap entry {index}", (offset, length),
                    "overlaps another live block",
                )  # fmt: skip
            end = offset + length
        return [Block(i, self.data + o, n, t) for o, n, i, t, _ in blocks]

    # ------------------------------------------------------------------ lock
    def lock(self, timeout: float = LOCK_TIMEOUT_S) -> None:
        """Take the heap lock (taking over a stale one). TimeoutError after `timeout` s of a
        live holder."""
        deadline = time.monotonic() + timeout
        while True:
            word = self.region.u64[self.base // 8]  # one load; the CAS re-checks it
            if (not word or _claim_is_stale(self.region, word)) and compare_exchange_u64(
                self.region.buf, self.base, word, self.mine
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"window heap lock held by peer {_peer_of(word)} for over {timeout} s"
                )
            time.sleep(LOCK_POLL_S)

    def unlock(self) -> None:
        """Release the lock (a no-op if it was taken over meanwhile)."""
        compare_exchange_u64(self.region.buf, self.base, self.mine, 0)

    # ------------------------------------------------------------------ blocks
    def allocate(self, length: int, tag: int, timeout: float = LOCK_TIMEOUT_S) -> Block | None:
        """A new block of `length` bytes (rounded up to whole pages, at least one) owned by
        this peer, named `tag`; None when no gap or no entry is free. Raises
        RingCorruptError (a malformed live entry, see live_blocks), TimeoutError (lock)."""
        size = max(layout.PAGE_SIZE, layout.align_up(length, layout.PAGE_SIZE))
        self.lock(timeout)
        try:
            used = self.live_blocks()
            taken = {block.index for block in used}
            free = next((i for i in range(layout.HEAP_ENTRIES) if i not in taken), None)
            if free is None:
                return None
            start = 0
            for block in used:
                if block.offset - self.data - start >= size:
                    break
                start = block.offset - self.data + block.length
            if start + size > self.data_size:
                return None
            at = self._entry_offset(free)
            u64 = self.region.u64
            u64[at // 8 + 1] = start
            u64[at // 8 + 2] = size
            u64[at // 8 + 3] = tag
            u64[at // 8] = self.mine  # last: publishes the entry (TSO store order)
            return Block(free, self.data + start, size, tag)
        finally:
            self.unlock()

    def check(self, index: int, owner: int, offset: int, length: int, tag: int) -> Block:
        """The block a member was told of: entry `index` must be live, keyed `owner` (the
        allocator's claim word), hold (offset - data start, length, tag) and overlap no
        other live entry. Raises RingCorruptError naming the allocator otherwise (or when
        it is out of bounds)."""
        who = _peer_of(owner)
        if not 0 <= index < layout.HEAP_ENTRIES:
            raise RingCorruptError(who, "window heap entry index", index, "out of range")
        key, rel, size, found_tag = self._read(index)
        if key != owner or (rel, size, found_tag) != (offset - self.data, length, tag):
            raise RingCorruptError(
                who, f"window heap entry {index}", (key, rel, size, found_tag),
                f"does not hold the block announced ({owner}, {offset - self.data}, {length}, "
                f"{tag})",
            )  # fmt: skip
        self._checked(index, key, rel, size)
        for other in range(layout.HEAP_ENTRIES):  # (an allocator holds the lock: no overlap)
            their_key, their_rel, their_size, _ = self._read(other)
            if (other != index and their_rel < rel + size and rel < their_rel + their_size
                    and self._live(their_key)):  # fmt: skip
                raise RingCorruptError(
                    who, f"window heap entry {index}", (rel, size),
                    f"overlaps live entry {other} ({their_rel}, {their_size})",
                )  # fmt: skip
        return Block(index, offset, length, tag)

    def free(self, block: Block) -> bool:
        """Give `block` back (its key cleared if this peer still owns it). True iff it did."""
        return compare_exchange_u64(self.region.buf, self._entry_offset(block.index), self.mine, 0)

    def view(self, block: Block) -> memoryview:
        """The block's bytes in the region (writable)."""
        return self.region.buf[block.offset : block.offset + block.length]
