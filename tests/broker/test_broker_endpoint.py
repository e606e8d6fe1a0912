"""Endpoints over broker-provided eventfds: traffic, lost peers, traffic across a restart."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess, kill, start_python, wait_for

pytest.importorskip("ivshmem_comm.endpoint")

from guest_lib.host_client import attach
from ivshmem_comm import layout
from ivshmem_comm.errors import PeerLostError

pytestmark = pytest.mark.timeout(120)

ECHO = """
    import sys
    from guest_lib.host_client import attach
    ep = attach(sys.argv[1])
    print(ep.peer_id, flush=True)
    while True:
        with ep.recv() as m:
            data, src, tag = bytes(m.data), m.source, m.tag
        if data == b"quit":
            break
        ep.send(src, data, tag=tag)
    ep.close()
"""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path, size="4M", vectors=1).start()
    yield b
    b.cleanup()


def test_ping_pong_through_broker_eventfds(broker: BrokerProcess) -> None:
    echo = start_python(ECHO, broker.socket)
    ep = attach(broker.socket)
    try:
        assert ep.peer_id in (0, 1)
        other = int(echo.stdout.readline())
        start = time.perf_counter()
        n = 500
        for i in range(n):
            ep.send(other, i.to_bytes(4, "little"), tag=3)
            with ep.recv(source=other, timeout=5) as m:
                assert bytes(m.data) == i.to_bytes(4, "little") and m.tag == 3
        rtt = (time.perf_counter() - start) / n
        print(f"round trip through endpoints with broker eventfds: {rtt * 1e6:.1f} us")
        ep.send(other, b"quit")
        assert echo.wait(timeout=10) == 0
        wait_for(lambda: ep.region.peer(other).state == layout.PEER_LEFT, timeout=2)
    finally:
        ep.close()
        kill(echo)
    wait_for(lambda: broker.log().count(") left") == 2, timeout=2)


def test_blocked_receiver_gets_peer_lost_within_100ms(broker: BrokerProcess) -> None:
    ep = attach(broker.socket)
    echo = start_python(ECHO, broker.socket)
    try:
        other = int(echo.stdout.readline())
        ep.send(other, b"x")
        with ep.recv(source=other, timeout=5):
            pass
        time.sleep(0.2)  # the receiver below is asleep on its eventfd by then
        killed = []

        import threading

        def killer() -> None:
            time.sleep(0.3)
            killed.append(time.monotonic())
            echo.kill()

        threading.Thread(target=killer).start()
        with pytest.raises(PeerLostError):
            ep.recv(source=other, timeout=5)
        lost = time.monotonic() - killed[0]
        print(f"PeerLostError {lost * 1000:.1f} ms after kill -9 of the blocked-on peer")
        assert lost < 0.1
    finally:
        ep.close()
        kill(echo)


def test_traffic_keeps_flowing_across_broker_kill_and_restart(broker: BrokerProcess) -> None:
    ep = attach(broker.socket)
    echo = start_python(ECHO, broker.socket)
    third = None
    try:
        other = int(echo.stdout.readline())
        sent = 0
        restarted_at = None
        deadline = time.monotonic() + 3.0
        killed = False
        while time.monotonic() < deadline or sent < 200:
            payload = sent.to_bytes(8, "little") * 16
            ep.send(other, payload, tag=1)
            with ep.recv(source=other, timeout=5) as m:
                assert bytes(m.data) == payload
            sent += 1
            if sent == 100:
                broker.signal(signal.SIGKILL)  # mid-traffic
                killed = True
            if killed and restarted_at is None and sent == 300:
                broker.start(wait=False)
                restarted_at = time.monotonic()
        assert killed and restarted_at is not None
        client = ep.broker_client
        wait_for(lambda: client.reconnects == 1, timeout=5)
        wait_for(lambda: broker.log().count("reclaimed its slot") == 2, timeout=5)
        print(f"{sent} round trips with the broker killed at 100 and restarted at 300")
        # a peer that joins after the restart talks to both old peers
        third = start_python(ECHO, broker.socket)
        new_id = int(third.stdout.readline())
        assert new_id not in (ep.peer_id, other)
        ep.send(new_id, b"hello new")
        with ep.recv(source=new_id, timeout=5) as m:
            assert bytes(m.data) == b"hello new"
        ep.send(other, b"still here")
        with ep.recv(source=other, timeout=5) as m:
            assert bytes(m.data) == b"still here"
        assert ep.region.broker_info()[0] == 2
    finally:
        ep.close()
        kill(echo)
        if third is not None:
            kill(third)
