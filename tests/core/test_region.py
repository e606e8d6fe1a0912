"""The region format: creation, checks a reader makes, describe(), names, geometry."""

from __future__ import annotations

import itertools
import json
import mmap
import os
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ivshmem_comm as ic
from ivshmem_comm import layout
from ivshmem_comm.region import format_buffer, shm_path


def test_create_open_describe(make_region):
    region = make_region(size=16 << 20, max_peers=4)
    assert stat.S_IMODE(os.stat(shm_path(region.name)).st_mode) == 0o600
    other = ic.Region.open(region.name)
    assert other.uuid == region.uuid and other.max_peers == 4 and other.size == 16 << 20
    info = json.loads(json.dumps(region.describe()))
    assert len(info["queues"]) == 12
    pairs = {(q["src"], q["dst"]) for q in info["queues"]}
    assert pairs == {(s, d) for s in range(4) for d in range(4) if s != d}
    spans = sorted((q["offset"], q["data_offset"] + q["data_size"]) for q in info["queues"])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start  # queues never overlap
    assert spans[-1][1] <= region.size
    for q in info["queues"]:
        assert q["used_offset"] - q["ring_offset"] + 6 + 8 * q["num"] == q["ring_size"]
        assert q["ring_size"] == layout.vring_size(q["num"], q["align"])
    other.close()


def test_create_refuses_existing(make_region):
    region = make_region()
    with pytest.raises(FileExistsError):
        ic.Region.create(region.name, 8 << 20, 2)


@pytest.mark.parametrize("name", ["", "a/b", "..", "../x", ".hidden", "-x", "x" * 64, "a b"])
def test_bad_names(name):
    with pytest.raises(ValueError, match="bad region name"):
        ic.Region.create(name, 8 << 20, 2)


def test_open_missing():
    with pytest.raises(FileNotFoundError):
        ic.Region.open("no-such-region-here")


def _formatted(size=1 << 20, peers=2):
    buf = bytearray(size)
    format_buffer(buf, layout.Geometry.fit(size, peers), "fmt")
    return buf


@pytest.mark.parametrize(
    ("offset", "value", "field"),
    [(0, b"XXXXXXXX", "magic"), (8, struct.pack("<I", 99), "version"), (100, b"\x01", "checksum")],
)
def test_reader_names_what_is_wrong(offset, value, field):
    buf = _formatted()
    buf[offset : offset + len(value)] = value
    with pytest.raises(ic.RegionFormatError) as err:
        ic.Region.attach(buf)
    assert err.value.field == field


def test_reader_checks_size_against_mapping():
    buf = _formatted(1 << 20)
    with pytest.raises(ic.RegionFormatError) as err:
        ic.Region.attach(buf[: 1 << 19])
    assert err.value.field == "size"


def test_attach_mmap_of_file(tmp_path):
    path = tmp_path / "region"
    path.write_bytes(bytes(1 << 20))
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 1 << 20)
    format_buffer(mapping, layout.Geometry.fit(1 << 20, 3), "file")
    region = ic.Region.attach(mapping)
    assert region.name == "file" and region.max_peers == 3
    region.close()


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, layout.SB_CHECKSUM_OFFSET + 3), byte=st.integers(0, 255))
def test_any_superblock_damage_is_refused_or_harmless(offset, byte):
    buf = _formatted()
    if buf[offset] == byte:
        return
    buf[offset] = byte
    with pytest.raises(ic.RegionFormatError):
        ic.Region.attach(buf)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(64 << 10, 64 << 20),
    peers=st.integers(2, 16),
    num=st.sampled_from([2, 16, 256, 1024]),
    align=st.sampled_from([4, 64, 4096]),
)
def test_geometry_fit_is_consistent(size, peers, num, align):
    try:
        g = layout.Geometry.fit(size, peers, num, align)
    except ValueError:
        return
    g.validate()
    assert g.required_size <= size
    assert g.data_rel_offset >= layout.CONTROL_SIZE + layout.vring_size(num, align)
    last = g.queue_offset(peers - 1, peers - 2)
    assert last + g.queue_stride <= size


def _residue(name: str) -> list[str]:
    return sorted(f for f in os.listdir("/dev/shm") if f == name or f.startswith(f"sem.{name}."))


def test_unlink_removes_the_region_and_every_doorbell():
    """The README's sequence (endpoints closed, region closed, unlink) leaves nothing in
    /dev/shm: neither the shm object nor any peer slot's doorbell semaphore; so does unlink
    of an object that holds no region, and of doorbells whose region is already gone."""
    name = f"t-unlink-{os.getpid()}"
    region = ic.Region.create(name, 4 << 20, 3)
    with ic.Region.open(name) as other, region.endpoint(0) as a, other.endpoint(2) as b:
        a.send(2, b"x")
        with b.recv(0, timeout=5):
            pass
    region.close()
    assert _residue(name) == sorted([name] + [f"sem.{name}.doorbell.{p}" for p in range(3)])
    ic.Region.unlink(name)
    assert _residue(name) == []
    with pytest.raises(FileNotFoundError):
        ic.Region.unlink(name)
    with open(shm_path(name), "wb") as f:  # not a region: its doorbells are found by name
        f.write(b"junk")
    from ivshmem_comm.notify import SemaphoreNotifier

    SemaphoreNotifier(name, 5, 6).close()
    ic.Region.unlink(name)
    assert _residue(name) == []
    SemaphoreNotifier(name, 1, 2).close()
    with pytest.raises(FileNotFoundError):
        ic.Region.unlink(name)
    assert _residue(name) == []
