"""Peer identity: which incarnation of a peer slot an endpoint talks to, and when it is lost.

Every transition of the table in README.md ("Peer identity"), with real processes on a plain
Region: an endpoint binds to an incarnation when it first sees it READY or at first contact,
never to a FREE, LEFT or DEAD holder it never met; PeerLostError means the incarnation it is
bound to is gone, and a replaced one is reported once, then the new holder is talked to.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

import ivshmem_comm as ic
from ivshmem_comm import layout
from tests.support import run_peer

pytestmark = pytest.mark.timeout(120)


def _wait_slot(region: ic.Region, peer: int, state: int, incarnation: int) -> None:
    deadline = time.monotonic() + 20
    while region.peer_state(peer) != (state, incarnation):
        assert time.monotonic() < deadline, (region.peer(peer), state, incarnation)
        time.sleep(0.005)


def _talk(ep: ic.Endpoint, other: int, pair: int) -> None:
    ep.send(other, b"%d from %d" % (pair, ep.peer_id), timeout=10)
    with ep.recv(other, timeout=10) as msg:
        assert bytes(msg.data) == b"%d from %d" % (pair, other)


@pytest.mark.slow
def test_a_hundred_pairs_in_a_row_reuse_one_region(make_region, spawn):
    """Pair after pair of processes joins the same two slots, talks both ways and leaves: no
    pair mistakes the previous pair's holder (LEFT) for a partner it lost."""
    region = make_region(size=2 << 20)
    for pair in range(100):
        procs = [spawn(run_peer, _talk, region.name, peer, 1 - peer, pair) for peer in (0, 1)]
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0, 0], f"pair {pair}"
    assert [region.peer_state(p) for p in (0, 1)] == [(layout.PEER_LEFT, 100)] * 2


def _leave_after_a_while(ep: ic.Endpoint) -> None:
    time.sleep(0.2)  # READY long enough for a sleeping peer's watch slices to see it


def _send_then_wait_reply(ep: ic.Endpoint, dest: int, text: bytes) -> None:
    ep.send(dest, text, timeout=10)
    with ep.recv(dest, timeout=20) as msg:
        assert bytes(msg.data) == b"reply to " + text


@pytest.mark.parametrize("source", [0, ic.ANY_SOURCE], ids=["named", "any_source"])
def test_slot_freed_and_retaken_while_a_third_peer_sleeps(make_region, spawn, source):
    """Peer 2 sleeps in recv while slot 1 is taken, left and taken again by another process:
    peer 2 then talks to the new holder of slot 1 without any PeerLostError."""
    region = make_region(size=4 << 20, max_peers=3)
    with region.endpoint(2) as ep:
        got: list[Any] = []

        def sleeper() -> None:
            try:
                with ep.recv(source, timeout=30) as msg:
                    got.append((msg.source, bytes(msg.data)))
            except BaseException as exc:
                got.append(exc)

        thread = threading.Thread(target=sleeper)
        thread.start()
        time.sleep(0.3)  # past its spin: blocked on its doorbell
        old = spawn(run_peer, _leave_after_a_while, region.name, 1)
        old.join(30)
        assert old.exitcode == 0 and region.peer_state(1) == (layout.PEER_LEFT, 1)
        new = spawn(run_peer, _send_then_wait_reply, region.name, 1, 2, b"from the new 1")
        _wait_slot(region, 1, layout.PEER_READY, 2)
        if source == 0:
            steady = spawn(run_peer, _send_then_wait_reply, region.name, 0, 2, b"from 0")
        thread.join(30)
        assert not thread.is_alive()
        if source == 0:
            assert got == [(0, b"from 0")]
            ep.send(0, b"reply to from 0", timeout=10)
            with ep.recv(1, timeout=10) as msg:
                assert bytes(msg.data) == b"from the new 1"
            steady.join(30)
            assert steady.exitcode == 0
        else:
            assert got == [(1, b"from the new 1")]
        ep.send(1, b"reply to from the new 1", timeout=10)
        new.join(30)
        assert new.exitcode == 0


def _hold_until_told(ep: ic.Endpoint) -> None:
    ep.send(0, b"I am the first", timeout=10)
    with ep.recv(0, timeout=30) as msg:
        assert bytes(msg.data) == b"bye"


def _hold_forever(ep: ic.Endpoint) -> None:
    ep.send(0, b"I am the first", timeout=10)
    time.sleep(3600)


@pytest.mark.parametrize("how", ["close", "kill"])
def test_restarted_peer_reclaims_its_slot(make_region, spawn, how):
    """Peer 1 restarts (leaves cleanly, or is killed with SIGKILL) and its successor takes the
    slot: peer 0 gets PeerLostError exactly once, then talks to the successor."""
    region = make_region(size=4 << 20)
    with region.endpoint(0) as ep:
        first = spawn(run_peer, _hold_until_told if how == "close" else _hold_forever,
                      region.name, 1)  # fmt: skip
        with ep.recv(1, timeout=10) as msg:
            assert bytes(msg.data) == b"I am the first"
        if how == "close":
            ep.send(1, b"bye")
        else:
            os.kill(first.pid, signal.SIGKILL)
        first.join(30)
        second = spawn(run_peer, _send_then_wait_reply, region.name, 1, 0, b"I am the second")
        _wait_slot(region, 1, layout.PEER_READY, 2)
        lost = []
        while True:
            try:
                with ep.recv(1, timeout=10) as msg:
                    assert bytes(msg.data) == b"I am the second"
                    break
            except ic.PeerLostError as exc:
                lost.append(str(exc))
        # Which look sees the restart first is a race: the slot word ("incarnation 1 is gone")
        # or, when the successor has published already, the receive ring's session check.
        reasons = ("incarnation 1 is gone", "sender restarted or left this queue's session")
        assert len(lost) == 1 and any(r in lost[0] for r in reasons), lost
        ep.send(1, b"reply to I am the second", timeout=10)
        second.join(30)
        assert second.exitcode == 0


def test_peer_killed_while_partner_sleeps_then_replaced(make_region, spawn):
    """Peer 0 sleeps in recv(1) when peer 1 is killed: PeerLostError (the holder exited, the
    slot is marked DEAD; said again while the slot shows it), then the slot's next holder is
    talked to without another."""
    region = make_region(size=4 << 20)
    with region.endpoint(0) as ep:
        first = spawn(run_peer, _hold_forever, region.name, 1)
        with ep.recv(1, timeout=10):
            pass
        threading.Timer(0.3, os.kill, (first.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(ic.PeerLostError, match="exited without leaving"):
            ep.recv(1, timeout=10)
        assert time.monotonic() - t0 < 1.0
        assert region.peer_state(1) == (layout.PEER_DEAD, 1)
        first.join(30)
        with pytest.raises(ic.PeerLostError, match="dead"):  # still gone: said again
            ep.send(1, b"x", timeout=10)
        second = spawn(run_peer, _send_then_wait_reply, region.name, 1, 0, b"I am the second")
        _wait_slot(region, 1, layout.PEER_READY, 2)
        with ep.recv(1, timeout=10) as msg:  # its loss was told: no error for the successor
            assert bytes(msg.data) == b"I am the second"
        ep.send(1, b"reply to I am the second", timeout=10)
        second.join(30)
        assert second.exitcode == 0


@pytest.mark.parametrize("timeout", [0, 0.0001], ids=["poll", "short"])
def test_a_poll_of_a_killed_peer_says_it_is_lost(make_region, spawn, timeout):
    """recv(p, timeout=0) on a peer killed after talking: PeerLostError, not TimeoutError (the
    peer is judged before the deadline is)."""
    region = make_region(size=4 << 20)
    with region.endpoint(0) as ep:
        first = spawn(run_peer, _hold_forever, region.name, 1)
        with ep.recv(1, timeout=10):
            pass
        os.kill(first.pid, signal.SIGKILL)
        first.join(30)
        for _ in range(3):  # said by every poll while the slot shows it dead
            with pytest.raises(ic.PeerLostError, match=r"exited without leaving|dead"):
                ep.recv(1, timeout=timeout)
        assert region.peer_state(1) == (layout.PEER_DEAD, 1)


def _die_holding_the_slot(ep: ic.Endpoint) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_crashed_holder_never_met_is_not_a_partner(make_region, spawn):
    """Slot 1's holder died (READY, its pid gone) before peer 0 joined: peer 0 never binds to
    it (a send waits for a live holder and times out, no PeerLostError), marks it DEAD, and
    talks to the next holder."""
    region = make_region(size=4 << 20)
    crashed = spawn(run_peer, _die_holding_the_slot, region.name, 1)
    crashed.join(30)
    assert region.peer_state(1) == (layout.PEER_READY, 1)
    with region.endpoint(0) as ep:
        assert ep.peers() == []
        with pytest.raises(ic.TimeoutError):
            ep.send(1, b"to nobody", timeout=0.3)
        assert region.peer_state(1) == (layout.PEER_DEAD, 1)
        second = spawn(run_peer, _send_then_wait_reply, region.name, 1, 0, b"I am the second")
        with ep.recv(1, timeout=10) as msg:
            assert bytes(msg.data) == b"I am the second"
        ep.send(1, b"reply to I am the second", timeout=10)
        second.join(30)
        assert second.exitcode == 0


def _last_words(ep: ic.Endpoint) -> None:
    ep.send(0, b"last words", timeout=10)


def test_first_contact_binds_a_peer_that_left_before_we_looked(make_region, spawn):
    """Peer 1 joins, sends to peer 0 and leaves while peer 0 is not looking: peer 0 never saw
    it READY, but it met us (its queue half names our incarnation), so its message is
    delivered, and only then is it reported lost."""
    region = make_region(size=4 << 20)
    with region.endpoint(0) as ep:
        proc = spawn(run_peer, _last_words, region.name, 1)
        proc.join(30)
        assert proc.exitcode == 0 and region.peer_state(1) == (layout.PEER_LEFT, 1)
        with ep.recv(1, timeout=5) as msg:
            assert bytes(msg.data) == b"last words"
        with pytest.raises(ic.PeerLostError, match="left"):
            ep.recv(1, timeout=5)
        with pytest.raises(ic.PeerLostError, match="left"):  # still gone: said again
            ep.send(1, b"x", timeout=5)


def test_a_left_holder_never_met_is_waited_past(make_region):
    """A slot LEFT by a holder that never met us is no partner: operations on it wait for the
    next holder (TimeoutError), never PeerLostError."""
    region = make_region(size=4 << 20)
    with ic.Region.open(region.name) as other:
        other.endpoint(1).close()
        with region.endpoint(0) as ep:
            with pytest.raises(ic.TimeoutError):
                ep.recv(1, timeout=0.2)
            with pytest.raises(ic.TimeoutError):
                ep.send(1, b"x", timeout=0.2)
            with other.endpoint(1) as new:
                ep.send(1, b"to the new one", timeout=5)
                with new.recv(0, timeout=5) as msg:
                    assert bytes(msg.data) == b"to the new one"
