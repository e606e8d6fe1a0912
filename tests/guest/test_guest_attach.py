"""guest_lib.attach on a host: a fake sysfs PCI tree (plain files for the BARs), a broker
socket, a region opened by name, and the error messages. The real-guest tests are in
test_guest_vm.py."""

from __future__ import annotations

import mmap
import os
import re
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import guest_lib
from guest_lib import pci
from guest_lib.attach import AttachError, attach_device
from guest_lib.doorbell import DoorbellNotifier
from ivshmem_comm import layout
from ivshmem_comm.errors import PeerSlotBusyError
from ivshmem_comm.notify import PollingNotifier, SemaphoreNotifier
from ivshmem_comm.region import Region, format_buffer
from tests.support.broker import BrokerProcess

pytestmark = pytest.mark.timeout(60)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def destroy(name: str, max_peers: int) -> None:
    try:
        Region.unlink(name)
    except FileNotFoundError:
        pass
    SemaphoreNotifier.unlink_all(name, max_peers)


SHM = 1 << 20


def _fake_device(
    root: Path,
    bdf: str,
    shm: Path,
    *,
    doorbell: bool = False,
    ivposition: int = 0,
    enabled: str = "0",
) -> Path:
    """A sysfs-like PCI function: ids, `resource` lines, `enable`, resource0/2 as files."""
    d = root / bdf
    d.mkdir(parents=True)
    (d / "vendor").write_text("0x1af4\n")
    (d / "device").write_text("0x1110\n")
    (d / "enable").write_text(enabled + "\n")
    size = shm.stat().st_size
    base = 0xFE000000
    lines = [f"0x{base:016x} 0x{base + 255:016x} 0x40200"]
    lines.append(
        f"0x{base + 4096:016x} 0x{base + 8191:016x} 0x40200" if doorbell else "0x0 0x0 0x0"
    )
    lines.append(f"0x{1 << 33:016x} 0x{(1 << 33) + size - 1:016x} 0x14220c")
    (d / "resource").write_text("\n".join(lines) + "\n")
    regs = bytearray(256)
    struct.pack_into("<I", regs, 8, ivposition)
    (d / "resource0").write_bytes(bytes(regs))
    os.symlink(shm, d / "resource2")
    return d


def _region_file(path: Path, name: str, max_peers: int = 4) -> Path:
    with open(path, "wb") as f:
        f.truncate(SHM)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), SHM) as m:
        format_buffer(m, layout.Geometry.fit(SHM, max_peers, 64, 64, None), name)
    return path


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "pci"
    root.mkdir()
    (root / "0000:00:01.0").mkdir()  # some other PCI device
    (root / "0000:00:01.0" / "vendor").write_text("0x8086\n")
    (root / "0000:00:01.0" / "device").write_text("0x29c0\n")
    return root


def test_scan_describes_devices(sysfs: Path, tmp_path: Path) -> None:
    shm = _region_file(tmp_path / "r1", "job1")
    _fake_device(sysfs, "0000:00:04.0", shm, doorbell=True)
    _fake_device(sysfs, "0000:00:05.0", shm)
    devs = pci.scan(str(sysfs))
    assert [d.bdf for d in devs] == ["0000:00:04.0", "0000:00:05.0"]
    assert devs[0].doorbell_model and not devs[1].doorbell_model
    assert devs[0].bar_sizes == (256, 4096, SHM)
    info = pci.region_info(devs[1])
    assert info.name == "job1" and info.size == SHM and info.max_peers == 4
    assert (sysfs / "0000:00:05.0" / "enable").read_text() == "1"  # enabled on the way
    assert pci.scan(str(tmp_path / "nonexistent")) == []


def test_plain_model_two_peers_exchange(sysfs: Path, tmp_path: Path) -> None:
    shm = _region_file(tmp_path / "r1", "job1")
    _fake_device(sysfs, "0000:00:04.0", shm)
    a = guest_lib.attach(pci_root=str(sysfs))
    b = guest_lib.attach(region="job1", pci_root=str(sysfs))
    try:
        assert (a.peer_id, b.peer_id) == (0, 1)  # first free slots, claimed by the process
        assert a.attachment.kind == "plain" and a.attachment.notifier == "PollingNotifier"
        assert not a.attachment.blocking
        assert isinstance(a.notifier, PollingNotifier)
        a.send(1, b"over the fake BAR2", tag=5)
        with b.recv(source=0, timeout=5) as m:
            assert bytes(m.data) == b"over the fake BAR2" and m.tag == 5
        with pytest.raises(PeerSlotBusyError, match="slot 1 is ready"):
            guest_lib.attach(peer=1, pci_root=str(sysfs))
        c = guest_lib.attach(peer=3, pci_root=str(sysfs))
        assert c.peer_id == 3
        c.close()
        c.region.close()
    finally:
        for ep in (a, b):
            ep.close()
            ep.region.close()


def test_selection_by_name_and_uuid_and_errors(sysfs: Path, tmp_path: Path) -> None:
    _fake_device(sysfs, "0000:00:04.0", _region_file(tmp_path / "r1", "job1"))
    _fake_device(sysfs, "0000:00:05.0", _region_file(tmp_path / "r2", "job2"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xff" * SHM)
    _fake_device(sysfs, "0000:00:06.0", junk)
    root = str(sysfs)
    with pytest.raises(AttachError, match="pass region= or uuid=") as err:
        guest_lib.attach(pci_root=root)
    assert "0000:00:06.0" in str(err.value) and "no region of this project" in str(err.value)
    ep = guest_lib.attach(region="job2", pci_root=root)
    try:
        assert ep.region.name == "job2"
        assert ep.attachment.where.endswith("0000:00:05.0")
        uuid1 = pci.region_info(pci.device_at(f"{root}/0000:00:04.0")).uuid
        ep1 = guest_lib.attach(uuid=str(uuid1).upper(), pci_root=root)
        assert ep1.region.name == "job1"
        ep1.close()
        ep1.region.close()
    finally:
        ep.close()
        ep.region.close()
    with pytest.raises(AttachError) as err:
        guest_lib.attach(region="job3", pci_root=root)
    text = str(err.value)
    assert "region='job3'" in text
    for bdf, why in [
        ("0000:00:04.0", "holds region 'job1', not 'job3'"),
        ("0000:00:05.0", "holds region 'job2', not 'job3'"),
        ("0000:00:06.0", "bad magic"),
    ]:
        assert any(bdf in what and why in reason for what, reason in err.value.looked_at), text
    with pytest.raises(AttachError, match="no ivshmem PCI device"):
        guest_lib.attach(pci_root=str(tmp_path / "empty"))


def test_doorbell_model_uses_ivposition_and_rings_bar0(sysfs: Path, tmp_path: Path) -> None:
    shm = _region_file(tmp_path / "r1", "job1")
    # IVPosition is the ivshmem id (5), not the slot (2): the broker wrote it in `doorbell`.
    dev_path = _fake_device(sysfs, "0000:00:04.0", shm, doorbell=True, ivposition=5)
    with open(shm, "r+b") as f, mmap.mmap(f.fileno(), SHM) as m:
        region = Region(m)
        # The broker's part: slot 2 handed to the VM with id 5 (JOINING, incarnation 7);
        # slot 0 still carries id 5 from before a wrap of the 16-bit id space (DEAD).
        dead, joining = layout.PEER_DEAD, layout.PEER_JOINING
        region.write_peer(0, incarnation=1, pid=1, doorbell=5, joined_ns=9, state=dead)
        region.write_peer(2, incarnation=7, pid=1, doorbell=5, joined_ns=1, state=joining)
        region.write_peer(3, incarnation=1, pid=1, doorbell=9, state=layout.PEER_READY)
        region.write_peer(1, incarnation=1, pid=1, doorbell=0x12345, state=layout.PEER_READY)
        region.close()
    dev = pci.device_at(str(dev_path))
    with pytest.raises(AttachError, match=r"IVPosition is 5 \(slot 2\), peer=1"):
        attach_device(dev, peer=1)
    ep = attach_device(dev)
    try:
        assert ep.peer_id == 2 and ep.incarnation == 7
        assert ep.attachment.kind == "doorbell"
        notifier = ep.notifier
        assert isinstance(notifier, DoorbellNotifier)
        assert not notifier.blocking  # no UIO device here: waits poll
        assert ep.region.peer(2).state == layout.PEER_READY
        notifier.kick(3)  # slot 3 -> its ivshmem id 9
        regs = (dev_path / "resource0").read_bytes()
        assert struct.unpack_from("<I", regs, 12)[0] == (9 << 16) | 0
        before = notifier.bad_kicks
        notifier.kick(1)  # garbage in slot 1's doorbell field: no kick, no crash
        notifier.kick(99)  # no such slot
        assert notifier.bad_kicks == before + 2
        assert struct.unpack_from("<I", (dev_path / "resource0").read_bytes(), 12)[0] == 9 << 16
    finally:
        ep.close()
        ep.region.close()
    # A second process in the same guest re-claims the LEFT slot under the same id; the
    # broker's fields (id, pid, host id) stay, so the broker still knows it as the VM's.
    ep2 = attach_device(dev)
    try:
        assert ep2.peer_id == 2 and ep2.incarnation == 8
        slot = ep2.region.peer(2)
        assert (slot.doorbell, slot.pid, slot.host_id) == (5, 1, 0)
        with pytest.raises(PeerSlotBusyError, match="another process"):
            attach_device(dev)  # the slot is live: a third process is refused
    finally:
        ep2.close()
        ep2.region.close()


def test_env_device_forces_choice(
    sysfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_device(sysfs, "0000:00:04.0", _region_file(tmp_path / "r1", "job1"))
    dev = _fake_device(sysfs, "0000:00:05.0", _region_file(tmp_path / "r2", "job2"))
    monkeypatch.setenv("IVSHMEM_COMM_DEVICE", str(dev))
    ep = guest_lib.attach(pci_root="/nonexistent")
    try:
        assert ep.region.name == "job2"
    finally:
        ep.close()
        ep.region.close()
    monkeypatch.setenv("IVSHMEM_COMM_DEVICE", str(sysfs / "0000:00:01.0"))
    with pytest.raises(AttachError, match=r"\$IVSHMEM_COMM_DEVICE names no usable device"):
        guest_lib.attach()


def test_uio_matching(tmp_path: Path, sysfs: Path) -> None:
    dev_path = _fake_device(
        sysfs, "0000:00:04.0", _region_file(tmp_path / "r1", "j"), doorbell=True
    )
    other = _fake_device(sysfs, "0000:00:05.0", _region_file(tmp_path / "r2", "k"), doorbell=True)
    uio = tmp_path / "uio"
    for n, (dev, version) in enumerate(
        [
            (other, "vector=0 nvectors=2 mode=msix"),
            (dev_path, "vector=1 nvectors=2 mode=msix"),
            (dev_path, "vector=0 nvectors=2 mode=msix"),
        ]
    ):
        d = uio / f"uio{n}"
        d.mkdir(parents=True)
        (d / "name").write_text("uio_ivshmem\n")
        (d / "version").write_text(version + "\n")
        os.symlink(dev, d / "device")
    found = pci.uio_devices(pci.device_at(str(dev_path)), str(uio))
    assert found == {0: "/dev/uio2", 1: "/dev/uio1"}


def test_host_attach_by_region_name(tmp_path: Path) -> None:
    name = unique_name("ga")
    region = Region.create(name, 4 << 20, 3)
    try:
        empty = str(tmp_path / "nopci")
        a = guest_lib.attach(region=name, pci_root=empty)
        b = guest_lib.attach(region=name, peer=2, pci_root=empty)
        try:
            assert a.attachment.kind == "posix" and a.attachment.notifier == "SemaphoreNotifier"
            assert (a.peer_id, b.peer_id) == (0, 2)
            got: list[bytes] = []

            def receive() -> None:
                with b.recv(source=0, timeout=10) as m:
                    got.append(bytes(m.data))

            t = threading.Thread(target=receive)
            t.start()
            a.send(2, b"by name")
            t.join(10)
            assert got == [b"by name"]
        finally:
            for ep in (a, b):
                ep.close()
                ep.region.close()
        with pytest.raises(AttachError, match="uuid is"):
            guest_lib.attach(region=name, uuid="00000000-0000-0000-0000-000000000000",
                             pci_root=empty)  # fmt: skip
        with pytest.raises(AttachError, match="no region 'nope-"):
            guest_lib.attach(region=f"nope-{name}", pci_root=empty)
    finally:
        region.close()
        destroy(name, 3)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path, size="4M", vectors=1).start()
    yield b
    b.cleanup()


def test_host_attach_through_broker(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    a = guest_lib.attach(socket=broker.socket)
    monkeypatch.setenv("IVSHMEM_COMM_SOCKET", broker.socket)
    b = guest_lib.attach()
    monkeypatch.delenv("IVSHMEM_COMM_SOCKET")
    monkeypatch.setenv("IVSHMEM_BROKER_DIR", str(broker.state_dir))
    c = guest_lib.attach(region=broker.name, pci_root=str(tmp_path / "nopci"))
    try:
        assert {a.peer_id, b.peer_id, c.peer_id} == {0, 1, 2}
        for ep in (a, b, c):
            assert ep.attachment.kind == "broker" and ep.attachment.blocking
        a.send(b.peer_id, b"via broker")
        with b.recv(source=a.peer_id, timeout=5) as m:
            assert bytes(m.data) == b"via broker"
    finally:
        for ep in (a, b, c):
            ep.close()
    with pytest.raises(AttachError, match="cannot join through the broker"):
        guest_lib.attach(socket=str(tmp_path / "no.sock"))


def test_demo_with_host_processes_cleans_up() -> None:
    import subprocess
    import sys

    from tests.support.broker import ENV, ROOT

    before = {p for p in os.listdir("/dev/shm") if p.startswith("demo-")}
    r = subprocess.run(
        [sys.executable, "examples/demo.py", "--hosts", "--quick"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    assert "two host processes through the broker" in r.stdout
    for size in ("8 B", "4 KiB", "256 KiB", "4 MiB"):
        assert re.search(rf"^\s+{size}\s+[\d.]+ us\s+[\d.]+ MB/s$", r.stdout, re.M), r.stdout
    assert {p for p in os.listdir("/dev/shm") if p.startswith("demo-")} == before


def test_broker_handing_out_a_bad_region_is_a_format_error(tmp_path: Path) -> None:
    """A 'broker' whose shared memory holds no region of ours: the client reports the region
    format, and does not mask it with an error about closing its mapping."""
    from guest_lib.host_client import BrokerClient
    from ivshmem_comm import protocol
    from ivshmem_comm.errors import RegionFormatError

    path = str(tmp_path / "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    shm = os.memfd_create("not-a-region")
    os.ftruncate(shm, 1 << 20)
    os.pwrite(shm, b"IVSHMCOM" + b"\xff" * 56, 0)  # our magic, then garbage

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            protocol.send_initial_info(conn, 1, shm)
            own = os.eventfd(0)
            protocol.send_peer_vectors(conn, 1, [own])  # the client's own doorbell
            os.close(own)
            conn.recv(1)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(RegionFormatError):
            BrokerClient(path, timeout=5)
    finally:
        thread.join(5)
        server.close()
        os.close(shm)
