"""Endpoints between real processes: matching, sizes, zero copy, probe, errors, peer lifecycle."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import ivshmem_comm as ic
from ivshmem_comm import layout
from tests.support import run_peer


def _echo(ep, count):
    for _ in range(count):
        with ep.recv() as msg:
            ep.send(msg.source, msg.data, tag=msg.tag)


def _echo_late(ep, count):
    """_echo, each answer 1 ms late: the sender's receive has gone to sleep by then."""
    for _ in range(count):
        with ep.recv() as msg:
            time.sleep(0.001)
            ep.send(msg.source, msg.data, tag=msg.tag)


@pytest.mark.parametrize("size", [0, 1, 8, 4079, 4096, 1 << 20, 3 << 20, 9 << 20])
def test_echo_sizes(make_region, spawn, size):
    region = make_region(size=8 << 20)
    proc = spawn(run_peer, _echo, region.name, 1, 1)
    payload = os.urandom(size)
    with region.endpoint(0) as ep:
        ep.send(1, payload, tag=5)
        with ep.recv(source=1, tag=5, timeout=30) as msg:
            assert (msg.source, msg.tag, msg.nbytes) == (1, 5, size)
            assert msg.data.readonly
            assert bytes(msg.data) == payload
    proc.join(30)
    assert proc.exitcode == 0


def test_zero_copy_view_points_into_region(make_region):
    region = make_region(size=8 << 20)
    with region.endpoint(0) as a, ic.Region.open(region.name) as r2, r2.endpoint(1) as b:
        a.send(1, b"abc" * 1000)
        msg = b.recv(0)
        base = np.frombuffer(r2.buf, dtype=np.uint8).ctypes.data
        view = np.frombuffer(msg.data, dtype=np.uint8).ctypes.data
        assert base <= view < base + region.size
        msg.release()
        msg.release()  # idempotent


def test_tags_any_source_and_unexpected(make_region):
    region = make_region(size=4 << 20, max_peers=3)
    r1, r2 = ic.Region.open(region.name), ic.Region.open(region.name)
    with region.endpoint(0) as ep0, r1.endpoint(1) as ep1, r2.endpoint(2) as ep2:
        for tag in (1, 2, 3):
            ep1.send(0, b"from1-%d" % tag, tag=tag)
        ep2.send(0, b"from2", tag=9)
        # A later tag first: earlier messages go to the unexpected queue, order kept per tag.
        assert bytes(ep0.recv(source=1, tag=3).data) == b"from1-3"
        assert ep0.probe(source=ic.ANY_SOURCE, tag=9) == (2, 9, 5)
        assert ep0.iprobe(source=1, tag=7) is None
        got = [ep0.recv(source=1) for _ in range(2)]
        assert [bytes(m.data) for m in got] == [b"from1-1", b"from1-2"]
        assert bytes(ep0.recv(tag=9).data) == b"from2"
        with pytest.raises(ic.TimeoutError):
            ep0.recv(timeout=0.05)
    r1.close()
    r2.close()


def test_polls_of_a_full_queue_look_at_the_holder_process_once_per_slice(make_region):
    """A send polled again and again at a full queue (what a progress engine does at every
    pass) reads the receiver's /proc entry at most once per WATCH_SLICE, not per poll."""
    region = make_region(size=4 << 20)
    with region.endpoint(0) as a, ic.Region.open(region.name) as r2, r2.endpoint(1) as b:
        a.send(1, b"hello")
        b.recv(0).release()
        big = bytes(256 << 10)
        with pytest.raises(ic.TimeoutError):
            while True:  # fill the queue
                a.send(1, big, timeout=0)
        peer = region.peer(1)
        looks = []
        holder_alive = type(peer).holder_alive

        def counted(self):
            looks.append(time.monotonic())
            return holder_alive(self)

        type(peer).holder_alive = counted
        try:
            start = time.monotonic()
            polls = 0
            while time.monotonic() - start < 0.03:
                with pytest.raises(ic.TimeoutError):
                    a.send(1, big, timeout=0)
                polls += 1
        finally:
            type(peer).holder_alive = holder_alive
        assert polls >= 10 and len(looks) <= 1, (polls, len(looks))
        del b


def test_a_short_spin_shortens_the_spin_for_the_next_span_of_a_message(make_region):
    """Endpoint.spin_us (short where ranks outnumber the CPUs) bounds how long a receive
    spins for the next span of a message too (4x it, at most 200 us), and a message in
    pieces still arrives whole with it."""
    region = make_region(size=4 << 20)
    with region.endpoint(0) as a, ic.Region.open(region.name) as r2, r2.endpoint(1) as b:
        assert {ch.mid_spin_ns for ch in b.rx if ch is not None} == {200_000}
        b.spin_us = 2
        assert {ch.mid_spin_ns for ch in b.rx if ch is not None} == {8000}
        payload = os.urandom(3 << 20)  # more than the queue holds: streamed as it is taken
        sender = threading.Thread(target=a.send, args=(1, payload))
        sender.start()
        dest = bytearray(len(payload))
        assert b.recv_into(dest, 0, timeout=30)[0] == len(payload) and bytes(dest) == payload
        sender.join(30)


def test_the_yield_phase_yields_unless_refused_or_calm(make_region, monkeypatch):
    """Endpoint.yield_us: a wait past its spin polls with a sched_yield() between polls (for
    that long) before it sleeps; none where `yielder` says no, and none after a yield that
    took longer than YIELD_LONG_NS (another process ran: waits are calm for a while)."""
    from ivshmem_comm import endpoint

    calls = []
    pause = [0.0]

    def counted():
        calls.append(1)
        if pause[0]:
            time.sleep(pause[0])

    monkeypatch.setattr(endpoint.os, "sched_yield", counted)
    region = make_region()
    with region.endpoint(0) as a, ic.Region.open(region.name) as r2, r2.endpoint(1) as b:
        b.spin_us = 0
        b.yield_us = 2000
        assert b.yield_us == 2000 and a.yield_us == 0
        with pytest.raises(ic.TimeoutError):
            b.recv(0, timeout=0.02)
        assert len(calls) > 10
        calls.clear()
        b.yielder = lambda: False
        with pytest.raises(ic.TimeoutError):
            b.recv(0, timeout=0.02)
        assert calls == []
        b.yielder = None
        pause[0] = endpoint.YIELD_LONG_NS * 2e-9
        with pytest.raises(ic.TimeoutError):
            b.recv(0, timeout=0.02)
        assert len(calls) == 1  # (then calm: the doorbell at once)
        a.send(1, b"x")
        with b.recv(0, timeout=5) as message:
            assert bytes(message.data) == b"x"


def test_a_long_yield_the_awaited_peer_answered_in_keeps_waits_yielding(make_region):
    """A yield of the yield phase that took longer than YIELD_LONG_NS but during which the
    awaited message came went to the awaited peer (a sender sharing this CPU copying a large
    message): the wait takes the message and waits stay out of calm (as the C lane's
    rx_yield_poll), so the next wait yields again instead of sleeping on the doorbell. A long
    yield after which nothing came still makes them calm."""
    from ivshmem_comm import endpoint

    region = make_region()
    with region.endpoint(0) as a, ic.Region.open(region.name) as r2, r2.endpoint(1) as b:
        b.spin_us = 0
        b.yield_us = 100_000
        yields: list[bool] = []

        def answered_meanwhile() -> bool:
            time.sleep(endpoint.YIELD_LONG_NS * 2e-9)
            if not yields:
                a.send(1, b"x" * 70_000)  # (several spans: the multi-span receive's waits too)
            yields.append(True)
            return True

        b.yielder = answered_meanwhile
        with b.recv(0, timeout=5) as message:
            assert bytes(message.data) == b"x" * 70_000
        assert yields and b._calm_until == 0
        with pytest.raises(ic.TimeoutError):
            b.recv(0, timeout=0.02)
        assert b._calm_until > 0


def _send_hello_and_wait(ep: ic.Endpoint) -> None:
    ep.send(0, b"hello", tag=5, timeout=10)
    with ep.recv(0, timeout=20) as msg:
        assert bytes(msg.data) == b"bye"


@pytest.mark.parametrize("source", [1, ic.ANY_SOURCE], ids=["named", "any_source"])
def test_iprobe_sees_a_peer_that_joined_after_us(make_region, spawn, source):
    """A program that only polls (iprobe) finds the messages of a peer that joined after it:
    iprobe syncs with a changed slot as a blocking call would."""
    region = make_region(size=1 << 20)
    with region.endpoint(0) as ep0:
        later = spawn(run_peer, _send_hello_and_wait, region.name, 1)
        deadline = time.monotonic() + 20
        while (head := ep0.iprobe(source)) is None:
            assert time.monotonic() < deadline, "iprobe never saw the later peer's message"
        assert head == (1, 5, 5)
        with ep0.recv(1, timeout=5) as msg:
            assert bytes(msg.data) == b"hello"
        ep0.send(1, b"bye", timeout=10)
        later.join(30)
        assert later.exitcode == 0


def test_any_source_is_fair(make_region):
    region = make_region(size=8 << 20, max_peers=3)
    r1, r2 = ic.Region.open(region.name), ic.Region.open(region.name)
    with region.endpoint(0) as ep0, r1.endpoint(1) as ep1, r2.endpoint(2) as ep2:
        for i in range(100):
            ep1.send(0, b"1", tag=i)
            ep2.send(0, b"2", tag=i)
        sources = [ep0.recv().source for _ in range(100)]
        assert 40 <= sources.count(1) <= 60  # neither peer starves while both have messages
    r1.close()
    r2.close()


def test_recv_into_too_small_keeps_message(make_region):
    region = make_region()
    with region.endpoint(0) as a, ic.Region.open(region.name) as r2, r2.endpoint(1) as b:
        a.send(1, b"x" * 100, tag=4)
        with pytest.raises(ic.MessageTooLargeError) as err:
            b.recv_into(bytearray(10))
        assert (err.value.size, err.value.source, err.value.tag) == (100, 0, 4)
        buf = np.zeros(200, dtype=np.uint8)
        assert b.recv_into(buf) == (100, 0, 4)
        assert bytes(buf[:100]) == b"x" * 100


def test_numpy_and_objects(make_region):
    region = make_region()
    with region.endpoint(0) as a, ic.Region.open(region.name) as r2, r2.endpoint(1) as b:
        arr = np.arange(12, dtype=np.float32).reshape(3, 4)
        obj = {"a": arr, "t": (1, "two", None), "n": np.int64(7), "b": b"\x00raw"}
        a.send_obj(obj, 1, tag=3)
        got = b.recv_obj(source=0, tag=3)
        assert got["a"].dtype == np.float32 and got["a"].shape == (3, 4)
        assert np.array_equal(got["a"], arr) and got["a"].flags.writeable
        assert got["t"] == (1, "two", None) and got["n"] == 7 and got["b"] == b"\x00raw"
        a.send(1, arr[:, ::2])  # non-contiguous buffers are sent by value
        with b.recv() as msg:
            assert np.array_equal(np.frombuffer(msg.data, np.float32), arr[:, ::2].ravel())


def test_slot_busy_and_bad_args(make_region):
    region = make_region()
    with region.endpoint(0) as ep:
        with pytest.raises(ic.PeerSlotBusyError):
            region.endpoint(0)
        with pytest.raises(ValueError):
            ep.send(0, b"self")
        with pytest.raises(ValueError):
            ep.send(5, b"nobody")
        with pytest.raises(ValueError):
            ep.send(1, b"x", tag=-3)


def _sleep_forever(ep):
    time.sleep(3600)


def test_dead_peer_detected_while_blocked(make_region, spawn):
    region = make_region()
    proc = spawn(run_peer, _sleep_forever, region.name, 1)
    with region.endpoint(0) as ep:
        deadline = time.monotonic() + 10
        while region.peer(1).state != layout.PEER_READY:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ep.send(1, b"hello")  # joins the session with incarnation 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        t0 = time.monotonic()
        with pytest.raises(ic.PeerLostError) as err:
            ep.recv(source=1, timeout=5)
        assert time.monotonic() - t0 < 0.5
        assert err.value.peer == 1
        assert region.peer(1).state == layout.PEER_DEAD


def test_rejoined_peer_never_sees_stale_messages(make_region):
    region = make_region()
    r2 = ic.Region.open(region.name)
    with region.endpoint(0) as a:
        b = r2.endpoint(1)
        a.send(1, b"for the old one")
        b.close()
        b2 = r2.endpoint(1)
        assert b2.incarnation == b.incarnation + 1
        with pytest.raises(ic.PeerLostError):
            a.send(1, b"too late for the old one")
        a.send(1, b"for the new one")
        with b2.recv(0, timeout=5) as msg:
            assert bytes(msg.data) == b"for the new one"
        b2.send(0, b"back")
        assert bytes(a.recv(1, timeout=5).data) == b"back"
        b2.close()
    r2.close()


def test_left_peer_messages_still_delivered(make_region):
    region = make_region()
    r2 = ic.Region.open(region.name)
    with region.endpoint(0) as a:
        with r2.endpoint(1) as b:
            b.send(0, b"last words")
        with a.recv(1, timeout=5) as msg:
            assert bytes(msg.data) == b"last words"
        with pytest.raises(ic.PeerLostError):
            a.recv(1, timeout=5)
    r2.close()


def _late_joiner(ep):
    ep.send(0, b"late")


def test_send_waits_for_peer_to_join(make_region, spawn):
    region = make_region()
    with region.endpoint(0) as ep:
        with pytest.raises(ic.TimeoutError):
            ep.send(1, b"nobody yet", timeout=0.1)
        proc = spawn(run_peer, _late_joiner, region.name, 1)
        with ep.recv(timeout=30) as msg:
            assert bytes(msg.data) == b"late"
        proc.join(30)
        assert proc.exitcode == 0


def test_sleeping_receiver_is_woken(make_region, spawn):
    region = make_region()
    proc = spawn(run_peer, _echo, region.name, 1, 1)
    with region.endpoint(0) as ep:
        time.sleep(0.3)  # the peer is now blocked on its doorbell, not spinning
        ep.send(1, b"wake up")
        t0 = time.monotonic()
        with ep.recv(1, timeout=10) as msg:
            assert bytes(msg.data) == b"wake up"
        assert time.monotonic() - t0 < 0.04  # woken by a kick, not by a watch slice
    proc.join(30)
    assert region.queue_counters(0, 1)["sleeps"] >= 0
    assert region.queue_counters(1, 0)["recv_kicks"] + region.queue_counters(0, 1)["send_kicks"] > 0


def test_a_wait_woken_per_message_looks_at_the_peer_process_once_a_slice(
    make_region, spawn, monkeypatch
):
    # Every blocked wait judges its peer before sleeping; the look at the peer's process
    # (/proc reads, ~0.1 ms of CPU) is made at most once per WATCH_SLICE, not per sleep: with
    # ranks woken per message (oversubscribed CPUs) it was most of a message's CPU time.
    from ivshmem_comm import endpoint
    from ivshmem_comm import region as region_mod

    looks = []
    real = region_mod.pid_alive

    def counted(pid, **kw):
        looks.append(pid)
        return real(pid, **kw)

    monkeypatch.setattr(region_mod, "pid_alive", counted)
    region = make_region()
    rounds = 200
    # The answers come late: an echo that answers at once can beat this process from its send
    # to its receive (the peer spinning, or run first by the scheduler on a busy machine), and
    # the receive then never blocks (CI: 3 sleeps in 199 rounds)
    proc = spawn(run_peer, _echo_late, region.name, 1, rounds)
    with region.endpoint(0, spin_us=0) as ep:
        ep.send(1, b"x")
        with ep.recv(1, timeout=30):
            pass
        looks.clear()
        t0 = time.monotonic()
        for _ in range(rounds - 1):
            ep.send(1, b"x")
            with ep.recv(1, timeout=30):
                pass
        elapsed = time.monotonic() - t0
    proc.join(30)
    assert proc.exitcode == 0
    sleeps = region.queue_counters(1, 0)["sleeps"]
    assert sleeps >= 20, "the receives were meant to block"
    assert len(looks) <= 2 + elapsed / endpoint.WATCH_SLICE
    assert len(looks) < sleeps / 2


def _race_for_slot(name, start, done, results):
    region = ic.Region.open(name)
    start.wait()
    try:
        ep = region.endpoint(1)
    except ic.PeerSlotBusyError:
        results.put("busy")
        os._exit(0)
    except BaseException as exc:
        results.put(repr(exc))
        os._exit(1)
    results.put("won")
    done.wait(30)  # hold the slot until every claimer has had its try
    ep.close()
    os._exit(0)


@pytest.mark.skipif(ic.IMPLEMENTATION != "c", reason="an atomic claim needs the C accelerator")
def test_concurrent_claims_of_one_slot_have_one_winner(make_region):
    import multiprocessing

    region = make_region()
    ctx = multiprocessing.get_context("fork")
    for _ in range(10):
        start, done = ctx.Event(), ctx.Event()
        results = ctx.SimpleQueue()  # put() is written before _exit
        procs = [
            ctx.Process(target=_race_for_slot, args=(region.name, start, done, results))
            for _ in range(6)
        ]
        for proc in procs:
            proc.start()
        start.set()
        outcomes = sorted(results.get() for _ in procs)
        done.set()
        for proc in procs:
            proc.join(30)
        assert outcomes == ["busy"] * 5 + ["won"]
    assert region.peer(1).incarnation == 10


def test_expect_incarnation_skips_a_previous_holder_that_left(make_region):
    """A holder that LEFT before we looked is never ours: the next one is talked to without a
    PeerLostError. One we were bound to is forgotten silently once the job names another
    incarnation (expect_incarnation), and reported as lost without that."""
    region = make_region(size=4 << 20)
    with ic.Region.open(region.name) as r1:
        with r1.endpoint(1) as old:
            first = old.incarnation
        with region.endpoint(0) as ep0, ic.Region.open(region.name) as r2:
            assert ep0.iprobe(1) is None  # sees slot 1 LEFT by incarnation `first`
            with r2.endpoint(1) as new:
                assert new.incarnation != first
                ep0.send(1, b"x", timeout=5)  # bound to `new` now
                with new.recv(0, timeout=5) as msg:
                    assert bytes(msg.data) == b"x"
            with ic.Region.open(region.name) as r3, r3.endpoint(1) as newer:
                ep0.expect_incarnation(1, newer.incarnation)
                ep0.send(1, b"hello", tag=3, timeout=5)
                with newer.recv(0, 3, timeout=5) as msg:
                    assert bytes(msg.data) == b"hello"
            with ic.Region.open(region.name) as r4, r4.endpoint(1) as newest:
                ep0.expect_incarnation(1, 0)  # any holder again: `newer` was ours, and is gone
                with pytest.raises(ic.PeerLostError, match="is gone"):
                    ep0.send(1, b"x", timeout=5)
                ep0.send(1, b"then the new one", timeout=5)
                with newest.recv(0, timeout=5) as msg:
                    assert bytes(msg.data) == b"then the new one"


def test_a_placed_message_is_read_in_place_by_others_then_sent(make_region):
    """place(): written once into the queue to peer 1, read there by peer 2, then sent to 1."""
    region = make_region(size=8 << 20, max_peers=3)
    r1, r2 = ic.Region.open(region.name), ic.Region.open(region.name)
    with region.endpoint(0) as root, r1.endpoint(1) as holder, r2.endpoint(2) as reader:
        payload = os.urandom(300_000)
        holder.send(0, b"ready")
        with root.recv(1, timeout=5):
            pass
        offset = root.place(1, payload, tag=4)
        with pytest.raises(RuntimeError):
            root.send(1, b"not while a message is placed", timeout=1)
        assert holder.iprobe(0, 4) is None  # not sent yet
        into = bytearray(len(payload))
        reader.read_placed(0, 1, offset, into)
        assert into == payload
        with pytest.raises(ValueError, match="peer 0"):
            reader.read_placed(0, 2, offset, into)  # not in its queue to peer 2
        with pytest.raises(ValueError, match="peer 0"):
            reader.read_placed(0, 1, offset - (8 << 20), into)
        root.publish_placed(1)
        got = bytearray(len(payload))
        assert holder.recv_into(got, 0, 4, timeout=5) == (len(payload), 0, 4)
        assert got == payload
        with pytest.raises(RuntimeError):
            root.publish_placed(1)
        with pytest.raises(ValueError):
            root.place(1, bytes(region.geometry.data_size), tag=4)
    r1.close()
    r2.close()


def test_send_parts_sends_one_message_of_its_parts_in_order(make_region):
    """send_parts(): the parts (bytes, bytearray, memoryview, numpy) laid end to end arrive
    as one message, one span or several (read whole in place), in order with plain sends;
    a message too large for one reservation is refused (ValueError), nothing sent."""
    region = make_region(size=8 << 20)
    with region.endpoint(0) as a, ic.Region.open(region.name) as r2, r2.endpoint(1) as b:
        span = region.geometry.max_span
        for total in (0, 100, span - layout.SPAN_HEADER_SIZE, span, 1 << 20):
            body = os.urandom(total)
            third = total // 3
            parts = [
                body[:third],
                bytearray(body[third : 2 * third]),
                np.frombuffer(body[2 * third : total - 1], np.uint8),
                memoryview(body)[total - 1 :] if total else b"",
            ]
            a.send_parts(1, parts, tag=6)
            a.send(1, b"after", tag=7)
            with b.recv(0, timeout=5) as msg:
                assert (msg.tag, msg.nbytes, bytes(msg.data)) == (6, total, body)
            with b.recv(0, timeout=5) as msg:
                assert (msg.tag, bytes(msg.data)) == (7, b"after")
        with pytest.raises(ValueError):
            a.send_parts(1, [b"x", bytes(region.geometry.data_size)], tag=6)
        assert b.iprobe(0) is None
