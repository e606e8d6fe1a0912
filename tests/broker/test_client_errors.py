"""What a host client is told when it gets the broker wrong: a socket path that is not there
or cannot be one, and a broker whose peer table is full (it hangs up, as QEMU's protocol has
no way to say why; the client looks at the region to tell), and a server that is no broker
handing out memory that cannot be a region."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess

pytest.importorskip("ivshmem_comm.endpoint")

from guest_lib.host_client import BrokerClient, attach
from ivshmem_comm import protocol

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path, size="2M", max_peers=2, vectors=1).start()
    yield b
    b.cleanup()


def test_a_socket_that_is_not_there_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(FileNotFoundError, match="is a broker serving it") as err:
        attach(path)
    assert err.value.filename == path


def test_a_socket_path_too_long_says_the_limit(tmp_path: Path) -> None:
    path = str(tmp_path / ("x" * 120 + ".sock"))
    with pytest.raises(OSError, match="AF_UNIX takes at most 107") as err:
        attach(path)
    assert path in str(err.value)


def test_a_full_peer_table_is_named_with_its_size(broker: BrokerProcess) -> None:
    first, second = attach(broker.socket), attach(broker.socket)
    try:
        with pytest.raises(protocol.ConnectionClosedError) as err:
            attach(broker.socket)
        assert f"peer table is full (all 2 slots of region {broker.name!r}" in str(err.value)
        assert broker.socket in str(err.value)
    finally:
        first.close()
        second.close()


def serve_one_handshake(path: str, shm_fd: int) -> threading.Thread:
    """A server on `path` that is no broker: it answers one connection with a handshake
    (`shm_fd` as the memory, one own eventfd) and hangs up when the client does."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            doorbell = os.eventfd(0)
            with conn:
                protocol.send_initial_info(conn, 1, shm_fd)
                protocol.send_peer_vectors(conn, 1, [doorbell])
                conn.recv(1)
            os.close(doorbell)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


@pytest.mark.parametrize("memory", ["pipe", "empty memfd"])
def test_memory_that_cannot_be_mapped_is_named_with_the_socket(tmp_path: Path, memory: str) -> None:
    """A server that hands out a pipe, or an empty shared-memory object, as the region."""
    if memory == "pipe":
        shm, other = os.pipe()
    else:
        shm, other = os.memfd_create("empty"), None
    path = str(tmp_path / "not-a-broker.sock")
    thread = serve_one_handshake(path, shm)
    try:
        with pytest.raises(protocol.ProtocolError, match="cannot be mapped") as err:
            BrokerClient(path)
        assert path in str(err.value)
    finally:
        thread.join(timeout=10)
        for fd in (shm, other):
            if fd is not None:
                os.close(fd)
