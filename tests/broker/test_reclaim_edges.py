"""Clients coming back to a restarted broker from the states a crash leaves them in, over
real sockets and real broker processes.

Handshakes cut short: a proxy socket between a client and the broker forwards the broker's
messages one by one and, at an exact one, kills the broker and hangs up (see
tests/support/proxy.py), so a client holds what it would hold had the broker crashed at that
instant. Refused reclaims: the broker restarted with another configuration. Hostile reclaim
requests: a connection that dribbles its request must not stall the broker."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_lib.host_client import BrokerClient
from ivshmem_comm import protocol
from tests.support.broker import (
    RAW_PEER,
    BrokerProcess,
    drain_eventfd,
    kill,
    raw_connect,
    start_python,
    wait_for,
)
from tests.support.proxy import ProtocolProxy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path, vectors=2).start()
    yield b
    b.cleanup()


def after_first_own_eventfd(seen: list[tuple[int, bool]]) -> bool:
    """True once the message just forwarded is the client's first own eventfd: its id (the
    handshake's second message) carrying an fd, after the shm fd (the third)."""
    return len(seen) > 3 and seen[-1] == (seen[1][0], True)


def test_client_cut_off_holding_one_of_its_eventfds_reclaims_and_gets_the_rest(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    a = BrokerClient(broker.socket)

    def cut(number: int, seen: list[tuple[int, bool]]) -> bool:
        if number == 0 and after_first_own_eventfd(seen):
            broker.signal(signal.SIGKILL)  # the second own eventfd was sent, never forwarded
            return True
        return False

    with ProtocolProxy(str(tmp_path / "proxy.sock"), broker.socket, cut) as proxy:
        b = BrokerClient(proxy.path)
        try:
            wait_for(lambda: not b.connected.is_set() and not a.connected.is_set(), timeout=5)
            assert len(b.own_eventfds()) == 1  # cut off holding 1 of its 2
            assert (b.peer_id, b.ivshmem_id) == (1, 2)
            broker.start()
            try:
                wait_for(lambda: a.reconnects == 1 and b.reconnects == 1, timeout=30)
            except AssertionError:
                tail = "\n".join(broker.log().splitlines()[-10:])
                raise AssertionError(
                    f"reconnects a={a.reconnects} b={b.reconnects}; broker log tail:\n{tail}"
                ) from None
            assert (b.peer_id, b.ivshmem_id) == (1, 2)  # its identity kept
            wait_for(lambda: len(b.own_eventfds()) == 2, timeout=5)
            wait_for(lambda: len(a.peer_eventfds().get(1, [])) == 2, timeout=5)
            # both of b's doorbells as a now holds them reach b, the one it never had included
            for vector in (0, 1):
                own = b.own_eventfds()[vector]
                drain_eventfd(own)
                assert a.kick(1, vector)
                assert select.select([own], [], [], 1)[0] == [own], f"vector {vector}"
            assert "completed" in broker.log()
        finally:
            b.close()
            a.close()


def test_client_cut_off_before_its_eventfds_says_so_and_frees_its_slot(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    """Cut right after the memory: the client has an id but no doorbell, so it cannot be a
    member. It says where the handshake stopped and marks its slot LEFT, so that a restarted
    broker does not keep the slot for it (an orphan, until this process exits)."""

    def cut(number: int, seen: list[tuple[int, bool]]) -> bool:
        if number == 0 and seen[-1] == (protocol.SHM_MESSAGE, True):
            broker.signal(signal.SIGKILL)
            return True
        return False

    with (
        ProtocolProxy(str(tmp_path / "proxy.sock"), broker.socket, cut) as proxy,
        pytest.raises(protocol.ConnectionClosedError) as err,
    ):
        BrokerClient(proxy.path)
    assert f"the broker at {proxy.path} hung up in the middle of our handshake" in str(err.value)
    assert "ivshmem id 1" in str(err.value) and "slot 0 is marked LEFT" in str(err.value)
    broker.start()
    with BrokerClient(broker.socket) as again:
        assert again.peer_id == 0  # the slot it was being given, free again
    assert "waiting for it to reclaim" not in broker.log()


def test_a_refused_reclaim_is_answered_with_why_and_the_client_stops_asking(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    """The broker comes back with 1 vector a peer, the client holds 2 of its own: the reclaim
    can never be taken. The client hears why once and gives up; its data path goes on."""
    c = BrokerClient(broker.socket)
    again = BrokerProcess(tmp_path, broker.name, vectors=1)
    try:
        wait_for(lambda: len(c.own_eventfds()) == 2)
        broker.signal(signal.SIGKILL)
        again.start()
        wait_for(lambda: c.failure is not None, timeout=30)
        assert isinstance(c.failure, protocol.ReclaimRefusedError)
        assert str(c.failure) == f"region {broker.name}: 2 eventfds, the region has 1"
        time.sleep(1.0)  # 4 of its retries at the longest backoff (0.25 s)
        assert again.log().count("reclaim refused") == 1
        assert c.reconnects == 0 and not c.connected.is_set()
    finally:
        c.close()
        again.cleanup()


def test_a_dribbled_reclaim_request_does_not_stall_the_broker(broker: BrokerProcess) -> None:
    """A connection from an orphan's pid sends its reclaim request a byte at a time, never the
    last: meanwhile another peer dies, and the broker must still see it at once."""
    holder = raw_connect(broker.socket)  # this process holds ivshmem id 1, slot 0
    hs, _, _ = protocol.read_handshake(holder)
    broker.signal(signal.SIGKILL)
    broker.start()  # slot 0 is an orphan now, its pid ours: our connections may reclaim
    peer = start_python(RAW_PEER, broker.socket)
    stop = threading.Event()

    def dribble() -> None:
        request = protocol.pack_reclaim(hs.peer, 1, 0)
        for byte in request[:-1]:
            try:
                dribbler.send(bytes([byte]))
            except OSError:  # dropped by the broker
                return
            if stop.wait(0.1):
                return

    thread = threading.Thread(target=dribble)
    dribbler = None
    try:
        assert int(peer.stdout.readline()) > 1  # joined after the restart, slot 1
        dribbler = raw_connect(broker.socket)  # speaks at once: within the reclaim wait
        thread.start()
        time.sleep(0.5)  # the dribble is under way
        kill(peer)
        start = time.monotonic()
        wait_for(lambda: "died (socket closed)" in broker.log(), timeout=10)
        seen = time.monotonic() - start
        print(f"peer death seen {seen * 1000:.0f} ms after the kill, mid-dribble")
        assert seen < 1.0
        assert dribbler.recv(64) == b""  # its unfinished request dropped
        assert "reclaim request" in broker.log()
    finally:
        stop.set()
        thread.join()
        kill(peer)
        if dribbler is not None:
            dribbler.close()
        holder.close()
        os.close(hs.shm_fd)
