"""A hostile peer scribbles over the memory it owns while honest traffic runs.

Peer 1 is an honest echo server in its own process, ping-ponged by peer 0 throughout.
Peer 2 joins properly, sends a few real messages, and then (each hypothesis example) writes
arbitrary values over what it owns: its driver half of queue 2 -> 0 (descriptor table,
available ring, driver line, data area) and its device half of queue 0 -> 2 (used ring,
device line). Peer 0 must then get valid messages, RingCorruptError naming peer 2,
PeerLostError or a timeout from peer 2: never a crash, a hang or data from outside the
queue; and its traffic with peer 1 must carry on untouched.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ivshmem_comm as ic
from ivshmem_comm import layout
from tests.support import run_peer


def _echo_forever(ep):
    while True:
        with ep.recv(source=0) as msg:
            if msg.tag == 99:
                return
            ep.send(0, msg.data, tag=msg.tag)


def _owned_areas(region: ic.Region) -> list[tuple[int, int]]:
    """[start, end) of everything peer 2 may write: its queue halves with peer 0."""
    g = region.geometry
    q_out = region.queue_offset(2, 0)  # peer 2 is the driver
    q_in = region.queue_offset(0, 2)  # peer 2 is the device
    _, _, used = layout.vring_offsets(g.queue_num, g.vring_align)
    ring_out, ring_in = q_out + g.ring_rel_offset, q_in + g.ring_rel_offset
    return [
        (q_out, q_out + layout.CACHE_LINE),  # driver line
        (q_out + layout.DRIVER_COUNTERS_OFFSET, q_out + layout.DEVICE_COUNTERS_OFFSET),
        (ring_out, ring_out + used),  # descriptors + available ring + used_event
        (q_out + g.data_rel_offset, q_out + g.data_rel_offset + 4096),  # data area start
        (q_in + layout.DEVICE_LINE_OFFSET, q_in + layout.DRIVER_COUNTERS_OFFSET),  # device line
        (q_in + layout.DEVICE_COUNTERS_OFFSET, q_in + layout.CONTROL_SIZE),
        (ring_in + used, ring_in + layout.vring_size(g.queue_num, g.vring_align)),  # used ring
    ]


SPECIAL = [0, 1, 0x7FFF, 0x8000, 0xFFFF, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1]
scribble = st.lists(
    st.tuples(
        st.integers(0, 6),  # which owned area
        st.integers(0, 1 << 20),  # offset inside it (wrapped)
        st.sampled_from([1, 2, 4, 8]),  # width of the store
        st.one_of(st.sampled_from(SPECIAL), st.integers(0, (1 << 64) - 1)),
    ),
    min_size=1,
    max_size=12,
)


@pytest.fixture(scope="module")
def world():
    from tests.support import destroy, unique_name

    name = unique_name("hostile")
    region = ic.Region.create(name, 4 << 20, 3, queue_num=16)
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(
        target=run_peer, args=(_echo_forever, name, 1), daemon=True
    )
    proc.start()
    ep0 = region.endpoint(0, stall_timeout=0.2)
    hostile_region = ic.Region.open(name)
    yield region, ep0, hostile_region
    ep0.send(1, b"", tag=99)
    proc.join(30)
    ep0.close()
    hostile_region.close()
    region.close()
    destroy(name, 3)
    assert proc.exitcode == 0


@settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(writes=scribble, before=st.integers(0, 3))
def test_hostile_peer_cannot_hurt_others(world, writes, before):
    region, ep0, hostile_region = world
    hostile = hostile_region.endpoint(2)  # a new incarnation each example
    try:
        _attack(region, ep0, hostile, hostile_region, writes, before)
    finally:
        hostile.close()


def _attack(region, ep0, hostile, hostile_region, writes, before):
    for i in range(before):
        hostile.send(0, b"honest %d" % i, tag=i)
    areas = _owned_areas(region)
    for area, offset, width, value in writes:
        start, end = areas[area]
        position = start + (offset % max(end - start - width, 1)) // width * width
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width]
        struct.pack_into(fmt, hostile_region.buf, position, value & ((1 << (8 * width)) - 1))

    data_lo = region.queue_offset(2, 0) + region.geometry.data_rel_offset
    data_hi = data_lo + region.geometry.data_size
    base = memoryview(region.buf).cast("B")
    for _ in range(before + 2):
        try:
            msg = ep0.recv(source=2, timeout=0.02)
        except (ic.RingCorruptError, ic.PeerLostError, ic.TimeoutError) as err:
            if isinstance(err, ic.RingCorruptError):
                assert err.peer == 2
            break
        with msg:
            assert msg.source == 2 and msg.nbytes <= region.geometry.data_size
            if msg.nbytes:
                # A zero-copy view must lie inside peer 2's own data area.
                import numpy as np

                addr = np.frombuffer(msg.data, np.uint8).ctypes.data
                lo = np.frombuffer(base, np.uint8).ctypes.data
                assert lo + data_lo <= addr and addr + msg.nbytes <= lo + data_hi
    try:
        ep0.send(2, b"to the hostile peer", timeout=0.02)
    except (ic.RingCorruptError, ic.PeerLostError, ic.TimeoutError) as err:
        if isinstance(err, ic.RingCorruptError):
            assert err.peer == 2

    # The honest pair is untouched, whatever happened above.
    for i in range(5):
        payload = os.urandom(1 + i * 100)
        ep0.send(1, payload, tag=i)
        with ep0.recv(source=1, tag=i, timeout=10) as msg:
            assert bytes(msg.data) == payload
