"""One broker's region serving peer after peer: sequential pairs, and peers after socket churn.

The peers are host clients (`guest_lib.host_client.attach`) of a real broker process; slots
are handed out by the broker, so every pair lands on slots that earlier pairs held (LEFT or
DEAD). No pair may take an earlier holder for a partner it lost (README, "Peer identity").
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess, cli, kill, start_python

pytest.importorskip("ivshmem_comm.endpoint")

from guest_lib.host_client import attach
from ivshmem_comm.region import SHM_DIR, Region

pytestmark = pytest.mark.timeout(180)

ECHO_ONCE = """
    import sys
    from guest_lib.host_client import attach
    ep = attach(sys.argv[1])
    print(ep.peer_id, flush=True)
    with ep.recv(timeout=30) as m:
        data, src = bytes(m.data), m.source
    ep.send(src, b"echo " + data, timeout=30)
    ep.close()
"""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path, size="2M", max_peers=4, vectors=1).start()
    yield b
    b.cleanup()


def _pair(path: str, pair: int) -> tuple[int, int]:
    """Two clients join, talk both ways, leave; returns their slots."""
    a = attach(path)
    b = attach(path)
    try:
        a.send(b.peer_id, b"%d from a" % pair, timeout=10)
        with b.recv(a.peer_id, timeout=10) as msg:
            assert bytes(msg.data) == b"%d from a" % pair
        b.send(a.peer_id, b"%d from b" % pair, timeout=10)
        with a.recv(b.peer_id, timeout=10) as msg:
            assert bytes(msg.data) == b"%d from b" % pair
        return a.peer_id, b.peer_id
    finally:
        a.close()
        b.close()


def test_a_hundred_pairs_in_a_row_through_a_broker(broker: BrokerProcess) -> None:
    slots = {_pair(broker.socket, pair) for pair in range(100)}
    assert all(len(set(pair)) == 2 for pair in slots)
    assert broker.proc is not None and broker.proc.poll() is None


def test_peers_after_300_garbage_connections_talk(broker: BrokerProcess) -> None:
    """300 clients connect, send garbage and hang up (the broker claims and drops slots for
    them); then a pair of processes and a pair of in-process clients talk with no error."""
    for i in range(300):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(broker.socket)  # blocking: waits while the listen backlog is full
            sock.settimeout(5)
            sock.sendall(os.urandom(1 + i % 64))
    echo = start_python(ECHO_ONCE, broker.socket)
    try:
        other = int(echo.stdout.readline())
        ep = attach(broker.socket)
        try:
            ep.send(other, b"after the churn", timeout=10)
            with ep.recv(other, timeout=10) as msg:
                assert bytes(msg.data) == b"echo after the churn"
        finally:
            ep.close()
        assert echo.wait(timeout=10) == 0
    finally:
        kill(echo)
    for pair in range(10):
        _pair(broker.socket, pair)
    assert broker.proc is not None and broker.proc.poll() is None


def test_destroy_leaves_nothing(broker: BrokerProcess) -> None:
    """A region served by a broker and also used by plain-Region peers (doorbell semaphores),
    its broker stopped (the region stays): `ivshmem-broker destroy` removes the shm object,
    every doorbell, the socket, the record and the lock."""
    _pair(broker.socket, 0)
    with Region.open(broker.name) as region:
        region.endpoint(3).close()  # joining rings every slot's doorbell: all of them exist
    broker.stop()

    def left() -> list[str]:
        shm = [f for f in os.listdir(SHM_DIR) if f == broker.name or f".{broker.name}." in f]
        state = [f for f in os.listdir(broker.state_dir) if f.startswith(broker.name)]
        return sorted(shm + state)

    assert f"sem.{broker.name}.doorbell.3" in left() and broker.name in left()
    done = cli("destroy", broker.name, "--state-dir", broker.state_dir)
    assert done.returncode == 0, done.stderr
    assert left() == []
