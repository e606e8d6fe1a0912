"""Broker configuration parsing and the wire protocol over socketpairs (no processes)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from host_broker import broker as broker_mod
from host_broker.cli import libvirt_xml, qemu_args
from host_broker.config import ConfigError, config_from_dict, config_size, load_config
from ivshmem_comm import layout, protocol
from ivshmem_comm.region import Region
from ivshmem_comm.units import parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64M", 64 << 20), ("1G", 1 << 30), ("512KiB", 512 << 10), ("2k", 2048),
     (8192, 8192), ("1MB", 1 << 20)],
)  # fmt: skip
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size == config_size(text)


@pytest.mark.parametrize("bad", ["", "12Q", "-1", "0", "1.5G", True, 0, None])
def test_config_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="config: size:"):
        config_size(bad)  # type: ignore[arg-type]


def test_toml_config(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        """
state_dir = "/tmp/somewhere"
allow_uids = [1000]
[[region]]
name = "job1"
size = "64M"
max_peers = 4
vectors = 2
[[region]]
name = "job2"
size = 8388608
allow_uids = []
socket = "/tmp/x/job2.sock"
max_span = "64K"
"""
    )
    config = load_config(str(path))
    assert config.state_dir == "/tmp/somewhere" and config.allow_uids == [1000]
    one, two = config.regions
    assert (one.name, one.size, one.max_peers, one.vectors) == ("job1", 64 << 20, 4, 2)
    assert one.socket_path(config.state_dir) == "/tmp/somewhere/job1.sock"
    assert config.region_allow(one) == [1000] and config.region_allow(two) == []
    assert two.socket_path(config.state_dir) == "/tmp/x/job2.sock" and two.max_span == 65536


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"region": [{"name": "a", "size": "4M", "colour": 1}]}, "region[0].colour"),
        ({"region": [{"size": "4M"}]}, "region[0].name"),
        ({"region": [{"name": "a/b", "size": "4M"}]}, "region[0].name"),
        ({"region": [{"name": "..", "size": "4M"}]}, "region[0].name"),
        ({"region": [{"name": "x" * 64, "size": "4M"}]}, "region[0].name"),
        ({"region": [{"name": "a", "size": "4M", "max_peers": 1}]}, "region[0].max_peers"),
        ({"region": [{"name": "a", "size": "4M", "vectors": 65}]}, "region[0].vectors"),
        ({"region": [{"name": "a", "size": "16K"}]}, "region[0].size"),
        ({"region": [{"name": "a", "size": "3M"}]}, "region[0].size"),
        ({"region": [{"name": "a", "size": "4M", "queue_num": 3}]}, "region[0].size"),
        ({"region": [{"name": "a", "size": "4M", "allow_uids": "me"}]}, "region[0].allow_uids"),
        ({"region": [{"name": "a", "size": "4M"}, {"name": "a", "size": "4M"}]}, "region[1].name"),
        ({"regions": []}, "regions"),
        ({"log_level": "loud"}, "log_level"),
    ],
)
def test_config_errors_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert info.value.field == field
    assert str(info.value).startswith(f"config: {field}: ")


def test_invalid_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[region]\nname=")
    with pytest.raises(ConfigError, match=r"config: file: .* is not valid TOML"):
        load_config(str(path))


def test_message_roundtrip_with_and_without_fd() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.eventfd(0)
    try:
        protocol.send_message(a, 0)
        protocol.send_message(a, -1, fd)
        protocol.send_message(a, 2**62)
        assert protocol.recv_message(b) == (0, None)
        value, got = protocol.recv_message(b)
        assert value == -1 and got is not None and protocol.is_eventfd(got)
        assert os.get_inheritable(got) is False
        os.close(got)
        assert protocol.recv_message(b) == (2**62, None)
        a.sendall(b"\x01\x00")
        a.close()
        with pytest.raises(protocol.ConnectionClosedError):
            protocol.recv_message(b)
    finally:
        os.close(fd)
        b.close()


def test_two_fds_on_one_message_is_an_error() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.eventfd(0)
    try:
        socket.send_fds(a, [b"\0" * 8], [fd, fd])
        with pytest.raises(protocol.ProtocolError, match="more than one"):
            protocol.recv_message(b)
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_client_handshake_and_runs() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.eventfd(0) for _ in range(6)]
    shm = os.memfd_create("x")
    try:
        protocol.send_initial_info(a, 2, shm)
        protocol.send_peer_vectors(a, 0, fds[0:2])
        protocol.send_peer_vectors(a, 2, fds[2:4])
        protocol.send_peer_vectors(a, 0, fds[4:6])  # a re-announcement: a new run
        protocol.send_peer_gone(a, 0)
        handshake, decoder, items = protocol.read_handshake(b)
        assert (handshake.version, handshake.peer) == (0, 2)
        assert [(i.kind, i.peer, i.new_run) for i in items] == [
            ("vector", 0, True), ("vector", 0, False), ("own", 2, True)
        ]  # fmt: skip
        rest = [decoder.feed(*protocol.recv_message(b)) for _ in range(4)]
        assert [(i.kind, i.peer, i.new_run) for i in rest] == [
            ("own", 2, False), ("vector", 0, True), ("vector", 0, False), ("gone", 0, False)
        ]  # fmt: skip
        for item in items + rest:
            if item.fd is not None:
                os.close(item.fd)
        os.close(handshake.shm_fd)
    finally:
        for fd in [*fds, shm]:
            os.close(fd)
        a.close()
        b.close()


def test_bad_version_is_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    protocol.send_message(a, 1)
    with pytest.raises(protocol.ProtocolError, match="version 1"):
        protocol.read_handshake(b)
    a.close()
    b.close()


def test_reclaim_request() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.eventfd(0), os.eventfd(0)]
    try:
        socket.send_fds(a, [protocol.pack_reclaim(3, 7, 2)], fds)
        request = protocol.recv_reclaim(b)
        assert (request.peer, request.incarnation, len(request.eventfds)) == (3, 7, 2)
        for fd in request.eventfds:
            os.close(fd)
        socket.send_fds(a, [protocol.pack_reclaim(3, 7, 2)], [fds[0], b.fileno()])
        with pytest.raises(protocol.ProtocolError, match="not an eventfd"):
            protocol.recv_reclaim(b)
        a.sendall(b"\0" * 32)
        with pytest.raises(protocol.ProtocolError, match="magic"):
            protocol.recv_reclaim(b)
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_guest_config_text() -> None:
    assert qemu_args("job1", "/run/x/job1.sock", 2, None, plain=False) == [
        "-chardev", "socket,path=/run/x/job1.sock,id=ivshmem_job1",
        "-device", "ivshmem-doorbell,chardev=ivshmem_job1,vectors=2",
    ]  # fmt: skip
    # libvirt refuses <size> next to <server> (it takes the size from the broker's shm fd)
    xml = libvirt_xml("job1", "/run/x/job1.sock", 2, 1 << 20)
    assert "<server path='/run/x/job1.sock'/>" in xml and "<size" not in xml
    assert "<msi vectors='2' ioeventfd='on'/>" in xml
    plain = libvirt_xml("job1", "/run/x/job1.sock", 2, 1 << 20, plain=True)
    assert "<model type='ivshmem-plain'/>" in plain and "<size unit='B'>1048576</size>" in plain
    assert "<server" not in plain


def _id_server(tmp_name: str) -> broker_mod.RegionServer:
    """A RegionServer with only what _next_id/_release_id need (no socket, no broker)."""
    server = broker_mod.RegionServer.__new__(broker_mod.RegionServer)
    server.region = Region.create(tmp_name, 1 << 20, 4)
    server.peers = {}
    server.last_id = broker_mod.FIRST_IVSHMEM_ID - 1
    server.recent_ids = {}
    return server


def _fake_peer(ivshmem_id: int, slot: int) -> broker_mod.Peer:
    return broker_mod.Peer(ivshmem_id, slot, 1, 1, 0, False, [])


def test_ivshmem_ids_increase_and_wrap_avoiding_used_ones() -> None:
    name = f"tbu-{os.getpid()}-ids"
    server = _id_server(name)
    try:
        assert [server._next_id() for _ in range(3)] == [1, 2, 3]
        server._release_id(2)
        assert server._next_id() == 4  # never a freed id soon after
        # near the top of the 16-bit space: wrap to 1, skipping ids in use, ids still in
        # a slot's doorbell and recently released ones
        server.last_id = broker_mod.MAX_IVSHMEM_ID - 1
        server.peers = {1: _fake_peer(1, 0)}
        server.region.write_peer(1, doorbell=3, state=layout.PEER_LEFT)
        assert server._next_id() == broker_mod.MAX_IVSHMEM_ID == 0xFFFE
        assert server._next_id() == 4  # 1 in use, 2 recently released, 3 in the table
        assert server._next_id() == 5
    finally:
        server.region.close()
        Region.unlink(name)
