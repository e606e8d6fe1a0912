"""The window heap (ivshmem_comm.winheap) on real regions, with real peer processes.

A property test runs random allocations and frees by two peers and checks the format's
invariants after each step (live blocks whole pages inside the data area, disjoint; memory
of one block never touched by another's writes; no refusal while a gap fits; everything
back once all is freed). Hostile entries must give errors naming their peer; a dead
allocator holding the lock must not wedge the heap; a format-2 region is refused.
"""

from __future__ import annotations

import os
import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ivshmem_comm as ic
from ivshmem_comm import layout
from ivshmem_comm.winheap import WindowHeap, claim_word
from tests.support import run_peer

PAGE = layout.PAGE_SIZE


def _heap(ep: ic.Endpoint) -> WindowHeap:
    return WindowHeap(ep.region, ep.peer_id, ep.incarnation)


def _check_invariants(heap: WindowHeap) -> list:
    blocks = heap.live_blocks()
    end = heap.data
    for block in blocks:
        assert block.offset % PAGE == 0 and block.length % PAGE == 0 and block.length > 0
        assert block.offset >= end  # sorted and disjoint
        end = block.offset + block.length
    assert end <= heap.data + heap.data_size
    return blocks


def _largest_gap(heap: WindowHeap) -> int:
    start, best = heap.data, 0
    for block in heap.live_blocks():
        best = max(best, block.offset - start)
        start = block.offset + block.length
    return max(best, heap.data + heap.data_size - start)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 1), st.integers(0, 12 * PAGE), st.integers()),
        min_size=1,
        max_size=40,
    )
)
def test_random_allocations_keep_the_format(make_region, steps):
    region = make_region(1 << 20, 3, heap_size=24 * PAGE)
    with region.endpoint(0) as ep0, region.endpoint(1) as ep1:
        heaps = [_heap(ep0), _heap(ep1)]
        live = []  # (heap index, block, fill byte)
        for index, (allocate, who, size, pick) in enumerate(steps):
            heap = heaps[who]
            if allocate or not live:
                gap = _largest_gap(heap)
                entries_left = layout.HEAP_ENTRIES - len(heap.live_blocks())
                block = heap.allocate(size, tag=index)
                want = max(PAGE, -(-size // PAGE) * PAGE)
                if block is None:
                    assert gap < want or not entries_left
                    continue
                assert block.length == want and block.tag == index
                fill = index % 251 + 1
                heap.view(block)[:] = bytes([fill]) * block.length
                live.append((who, block, fill))
            else:
                who_freed, block, _ = live.pop(pick % len(live))
                assert heaps[who_freed].free(block)
                assert not heaps[who_freed].free(block)  # once only
            blocks = _check_invariants(heap)
            assert sorted(b.index for b in blocks) == sorted(b.index for _, b, _ in live)
            for _, block, fill in live:  # nobody wrote over anybody
                assert bytes(heap.view(block)) == bytes([fill]) * block.length
        for who, block, _ in live:
            assert heaps[who].free(block)
        whole = heaps[0].allocate(heaps[0].data_size, tag=1)
        assert whole is not None and whole.length == heaps[0].data_size
        heaps[0].free(whole)


def _entry_offset(heap: WindowHeap, index: int) -> int:
    return heap.base + layout.HEAP_ENTRY_SIZE * (1 + index)


@pytest.mark.parametrize(
    ("offset", "length", "what"),
    [(PAGE + 5, PAGE, "not whole pages"), (0, 1 << 40, "not whole pages"),
     (0, 2 * PAGE, "overlaps")],
)  # fmt: skip
def test_hostile_entry_is_rejected_naming_its_peer(make_region, offset, length, what):
    region = make_region(1 << 20, 3, heap_size=16 * PAGE)
    with region.endpoint(0) as ep0, region.endpoint(1) as hostile:
        honest = _heap(ep0)
        mine = honest.allocate(PAGE, tag=7)
        assert mine is not None and mine.offset == honest.data
        # Peer 1 (live) writes an entry of its own that breaks the format.
        at = _entry_offset(honest, 5)
        layout.HEAP_ENTRY.pack_into(
            region.buf, at, claim_word(1, hostile.incarnation), offset, length, 9
        )
        with pytest.raises(ic.RingCorruptError, match=what) as err:
            honest.allocate(PAGE, tag=8)
        assert err.value.peer == 1
        assert region.u64[honest.base // 8] == 0  # the lock was released on the error
        # A member told of a block that the entry does not hold names the allocator.
        with pytest.raises(ic.RingCorruptError, match="does not hold") as err:
            honest.check(mine.index, claim_word(1, hostile.incarnation), mine.offset, PAGE, 7)
        assert err.value.peer == 1
        with pytest.raises(ic.RingCorruptError, match="out of range"):
            honest.check(layout.HEAP_ENTRIES, honest.mine, mine.offset, PAGE, 7)


def _lock_and_die(ep: ic.Endpoint, ready: str) -> None:
    heap = _heap(ep)
    heap.lock()
    assert heap.allocate  # the lock is held: now vanish without releasing it
    with open(ready, "w"):
        pass
    os._exit(0)


def test_dead_allocator_does_not_wedge_the_heap(make_region, spawn, tmp_path):
    region = make_region(1 << 20, 3, heap_size=16 * PAGE)
    ready = str(tmp_path / "locked")
    proc = spawn(run_peer, _lock_and_die, region.name, 1, ready)
    proc.join(timeout=30)
    assert os.path.exists(ready)
    assert region.u64[region.geometry.heap_offset // 8] != 0  # still "held" by the dead peer
    with region.endpoint(0) as ep:
        heap = _heap(ep)
        t0 = time.monotonic()
        block = heap.allocate(3 * PAGE, tag=1)
        assert block is not None and time.monotonic() - t0 < 2
        assert heap.free(block)


def test_live_holder_times_out_with_its_name(make_region):
    region = make_region(1 << 20, 3, heap_size=16 * PAGE)
    with region.endpoint(0) as ep0, region.endpoint(1) as ep1:
        _heap(ep1).lock()
        with pytest.raises(ic.TimeoutError, match="held by peer 1"):
            _heap(ep0).lock(timeout=0.05)
        _heap(ep1).unlock()
        _heap(ep0).lock(timeout=0.05)


def test_format_2_region_is_refused_with_a_clear_error():
    size = 1 << 20
    buf = bytearray(size)
    from ivshmem_comm.region import format_buffer

    format_buffer(buf, layout.Geometry.fit(size, 2), "old")
    struct.pack_into("<I", buf, 8, 2)  # version 2, CRC made right: a genuine old superblock
    crc = zlib.crc32(bytes(buf[: layout.SB_CHECKSUM_OFFSET]))
    struct.pack_into("<I", buf, layout.SB_CHECKSUM_OFFSET, crc)
    with pytest.raises(ic.RegionFormatError, match=r"format 2 .*recreate the region") as err:
        ic.Region.attach(buf)
    assert err.value.field == "version"


def test_fit_gives_the_heap_its_share_and_validates():
    g = layout.Geometry.fit(64 << 20, 4)
    assert g.heap_size == (64 << 20) // layout.HEAP_AREA_SHARE
    assert g.heap_offset == g.coll_offset + g.coll_slots * g.coll_slot_stride
    assert g.required_size <= 64 << 20
    assert layout.Geometry.fit(64 << 20, 4, heap_size=0).heap_size == 0
    bad = layout.Geometry(64 << 20, 2, 256, 64, g.data_size, g.max_span, 0, 0, PAGE)
    with pytest.raises(ValueError, match="heap_size"):
        bad.validate()


def test_announced_block_over_another_live_block_is_rejected_naming_the_allocator(make_region):
    """An allocator (peer 1, live) that keys an entry of its own over a block another group
    holds and announces it: a member checking the announcement refuses it, naming peer 1,
    instead of mapping the other group's memory as its window."""
    region = make_region(1 << 20, 3, heap_size=16 * PAGE)
    with region.endpoint(0) as ep0, region.endpoint(1) as hostile:
        honest = _heap(ep0)
        held = honest.allocate(2 * PAGE, tag=7)
        assert held is not None
        owner = claim_word(1, hostile.incarnation)
        rel = held.offset - honest.data + PAGE  # whole pages, in bounds, half over `held`
        layout.HEAP_ENTRY.pack_into(region.buf, _entry_offset(honest, 9), owner, rel, PAGE, 3)
        with pytest.raises(ic.RingCorruptError, match="overlaps live entry") as err:
            honest.check(9, owner, honest.data + rel, PAGE, 3)
        assert err.value.peer == 1
        assert honest.free(held)  # the other block gone, the same entry is a block
        assert honest.check(9, owner, honest.data + rel, PAGE, 3).length == PAGE
