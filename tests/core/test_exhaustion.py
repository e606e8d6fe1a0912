"""Exhaustion: every limit a program can run into gives back-pressure or a clear error, never a
hang past the timeout it asked for.

Queue full (descriptors), data area full (bytes), peer table full (plain region and through a
broker), tags out of range; and the MPI face's communicator contexts (Dup until they run out)
and tags above TAG_UB, in a real `ivshmem-run` job.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

import ivshmem_comm as ic
from ivshmem_comm import layout
from ivshmem_comm.protocol import ProtocolError
from tests.support.broker import ENV, ROOT, BrokerProcess, wait_for

SLACK = 2.0  # s: what a loaded machine may add to a timeout


def _fill(ep: ic.Endpoint, dest: int, payload: bytes, timeout: float) -> tuple[int, float]:
    """Send `payload` to `dest` until a send times out; return (messages sent, seconds the
    timed-out send took)."""
    sent = 0
    while True:
        start = time.monotonic()
        try:
            ep.send(dest, payload, tag=sent, timeout=timeout)
        except ic.TimeoutError:
            return sent, time.monotonic() - start
        sent += 1
        assert sent < 10_000, "the queue never filled"


@pytest.fixture
def pair(make_region):
    region = make_region(1 << 20, 2, queue_num=8)
    with region.endpoint(0) as ep0, region.endpoint(1) as ep1:
        yield region, ep0, ep1


def test_queue_full_of_descriptors_times_out_then_resumes(pair):
    region, ep0, ep1 = pair
    sent, took = _fill(ep0, 1, b"small", timeout=0.05)
    assert sent == region.geometry.queue_num  # one descriptor per small message
    assert 0.05 <= took < 0.05 + SLACK
    with ep1.recv(0, timeout=5) as msg:  # one slot freed: the sender goes on
        assert msg.tag == 0
    ep0.send(1, b"small", tag=sent, timeout=5)
    for tag in range(1, sent + 1):  # nothing lost, nothing reordered by the full queue
        with ep1.recv(0, timeout=5) as msg:
            assert (msg.tag, bytes(msg.data)) == (tag, b"small")


def test_data_area_full_times_out_then_resumes(pair):
    region, ep0, ep1 = pair
    big = bytes(range(256)) * (region.geometry.data_size // 3 // 256)
    sent, took = _fill(ep0, 1, big, timeout=0.05)
    assert 1 <= sent < region.geometry.queue_num  # bytes ran out before descriptors
    assert 0.05 <= took < 0.05 + SLACK
    buf = bytearray(len(big))
    for tag in range(sent):
        assert ep1.recv_into(buf, 0, timeout=5) == (len(big), 0, tag)
        assert buf == big
    ep0.send(1, big, tag=sent, timeout=5)
    assert ep1.recv_into(buf, 0, timeout=5) == (len(big), 0, sent)


def test_a_receiver_that_stops_taking_leaves_the_whole_data_area(make_region):
    """A sender keeps a receiver that keeps up within the cache window (layout.CACHE_WINDOW),
    but one that stops taking leaves it the whole data area: each send of the fill takes
    far less than its timeout, none waits for room that is not coming."""
    region = make_region(64 << 20, 2)
    data_size = region.geometry.data_size
    assert data_size >= 3 * layout.CACHE_WINDOW
    mib = bytes(range(256)) * 4096
    with region.endpoint(0) as ep0, region.endpoint(1) as ep1:
        buf = bytearray(len(mib))
        for tag in range(8):  # the receiver keeps up
            ep0.send(1, mib, tag=tag, timeout=5)
            assert ep1.recv_into(buf, 0, timeout=5) == (len(mib), 0, tag)
        sent, _ = _fill(ep0, 1, mib, timeout=0.5)  # then stops taking
        assert sent == data_size // (len(mib) + layout.SPAN_HEADER_SIZE)
        for tag in range(sent):
            assert ep1.recv_into(buf, 0, timeout=5) == (len(mib), 0, tag)
            assert buf == mib


def test_receive_timeout_on_an_idle_peer(pair):
    _, _, ep1 = pair
    start = time.monotonic()
    with pytest.raises(ic.TimeoutError):
        ep1.recv(0, timeout=0.1)
    with pytest.raises(ic.TimeoutError):
        ep1.recv(ic.ANY_SOURCE, tag=layout.TAG_MAX, timeout=0.1)
    assert time.monotonic() - start < 0.2 + SLACK


# A message larger than the data area is streamed. Its send times out like any other, even
# after its first span is out (SendIncompleteError): the rest is kept and goes out first at the
# next send to that peer; a send that cannot get it out in time sends nothing of its own.
STREAMED_SEND = """
import sys, time
import ivshmem_comm as ic
region = ic.Region.open(sys.argv[1])
ep = region.endpoint(0)
size = 3 * region.geometry.data_size
big = bytes(range(256)) * (size // 256)
start = time.monotonic()
try:
    ep.send(1, big, tag=1, timeout=0.5)
    print("sent", flush=True)
except ic.SendIncompleteError as exc:
    print("incomplete", exc.sent, exc.total, time.monotonic() - start, flush=True)
try:
    ep.send(1, b"not sent", tag=2, timeout=0.2)
    print("sent", flush=True)
except ic.SendIncompleteError:
    print("incomplete again", flush=True)
except ic.TimeoutError:
    print("timeout", flush=True)
sys.stdin.readline()
ep.send(1, b"after", tag=3, timeout=30)
sys.stdin.readline()
ep.close()
"""


@pytest.mark.timeout(60)  # a hang is bounded here, not by the session default
def test_streamed_send_honours_its_timeout_and_loses_nothing(make_region):
    region = make_region(1 << 20, 2, queue_num=8)
    size = 3 * region.geometry.data_size
    with region.endpoint(1) as ep1:  # alive, not receiving yet
        child = subprocess.Popen(
            [sys.executable, "-c", STREAMED_SEND, region.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            first = child.stdout.readline().split()  # bounded by the test's timeout
            assert first[0] == "incomplete", first
            sent, total, took = int(first[1]), int(first[2]), float(first[3])
            assert 0 < sent < total == size
            assert 0.5 <= took < 0.5 + SLACK
            assert child.stdout.readline().split() == ["timeout"]  # the rest went first
            child.stdin.write("go\n")
            child.stdin.flush()
            buf = bytearray(size)
            assert ep1.recv_into(buf, 0, timeout=30) == (size, 0, 1)
            assert buf == bytes(range(256)) * (size // 256)
            with ep1.recv(0, timeout=30) as msg:  # whole, in order; "not sent" was not
                assert (msg.tag, bytes(msg.data)) == (3, b"after")
            child.stdin.write("bye\n")
            child.stdin.flush()
            assert child.wait(30) == 0
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate()


# A sender whose streamed send timed out and that then only receives (it waits for a reply to
# the message it could not finish) still delivers the rest: every wait of the endpoint pushes it
# on as the receiver frees room. (It used to wait for a next send that never came: the receiver
# stalled on the half message, the sender on the reply.)
STREAMED_THEN_RECEIVE = """
import sys
import ivshmem_comm as ic
region = ic.Region.open(sys.argv[1])
ep = region.endpoint(0)
big = bytes(range(256)) * (3 * region.geometry.data_size // 256)
try:
    ep.send(1, big, tag=1, timeout=0.3)
    print("sent", flush=True)
except ic.SendIncompleteError:
    print("incomplete", flush=True)
with ep.recv(1, timeout=30) as reply:
    print("reply", bytes(reply.data).decode(), flush=True)
ep.close()
"""


@pytest.mark.timeout(60)
def test_rest_of_a_timed_out_send_goes_out_while_the_sender_only_receives(make_region):
    region = make_region(1 << 20, 2, queue_num=8)
    size = 3 * region.geometry.data_size
    with region.endpoint(1) as ep1:  # alive, not receiving yet
        child = subprocess.Popen(
            [sys.executable, "-c", STREAMED_THEN_RECEIVE, region.name],
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().split() == ["incomplete"]
            buf = bytearray(size)
            assert ep1.recv_into(buf, 0, timeout=20) == (size, 0, 1)
            assert buf == bytes(range(256)) * (size // 256)
            ep1.send(0, b"thanks", tag=2, timeout=20)
            assert child.stdout.readline().split() == ["reply", "thanks"]
            assert child.wait(30) == 0
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate()


def test_peer_table_full_plain(make_region):
    region = make_region(1 << 20, 2)
    with region.endpoint(0), region.endpoint(1):
        for slot in (0, 1):
            with pytest.raises(ic.PeerSlotBusyError, match=f"peer slot {slot} .* is ready"):
                region.endpoint(slot)
        with pytest.raises(ValueError, match="out of range"):
            region.endpoint(2)


def test_peer_table_full_through_a_broker(tmp_path):
    from guest_lib.host_client import attach

    broker = BrokerProcess(tmp_path, max_peers=2).start()
    try:
        first, second = attach(broker.socket), attach(broker.socket)
        start = time.monotonic()
        with pytest.raises(ProtocolError, match="peer table is full"):  # refused at once
            attach(broker.socket, timeout=5)
        took = time.monotonic() - start
        assert took < 5 + SLACK, f"the refusal took {took:.1f} s"
        assert "all 2 peer slots are taken" in broker.log()
        second.close()  # a freed slot is handed out again, once the broker saw it go
        wait_for(lambda: ") left" in broker.log())
        third = attach(broker.socket)
        assert third.peer_id == second.peer_id
        first.close()
        third.close()
    finally:
        broker.stop()
        broker.cleanup()


def test_tags_out_of_range_are_refused(pair):
    _, ep0, ep1 = pair
    for tag in (-1, layout.TAG_MAX + 1, 1 << 40):
        with pytest.raises(ValueError, match="tag"):
            ep0.send(1, b"x", tag=tag)
    ep0.send(1, b"x", tag=layout.TAG_MAX)
    with ep1.recv(0, tag=layout.TAG_MAX, timeout=5) as msg:
        assert msg.tag == layout.TAG_MAX


MPI_LIMITS = """
import sys
from guest_lib.mpi import MPI
comm = MPI.COMM_WORLD
out = open(f"{sys.argv[1]}/rank{comm.rank}.txt", "w")
print = lambda *words: out.write(" ".join(map(str, words)) + "\\n")
dups = []
try:
    while len(dups) < 5000:
        dups.append(comm.Dup())
    print("no limit")
except MPI.Exception as exc:
    print("dups", len(dups), exc.Get_error_class() == MPI.ERR_INTERN, exc)
for d in dups:
    d.Free()
again = comm.Dup()  # freed contexts are reusable
again.Barrier()
tag_ub = comm.Get_attr(MPI.TAG_UB)
for tag in (tag_ub + 1, -5):
    try:
        comm.send(b"x", dest=1 - comm.rank, tag=tag)
        print("tag accepted", tag)
    except MPI.Exception as exc:
        print("tag refused", tag, exc.Get_error_class() == MPI.ERR_TAG)
comm.send(b"ub", dest=1 - comm.rank, tag=tag_ub)
assert comm.recv(source=1 - comm.rank, tag=tag_ub) == b"ub"
print("done")
out.close()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mpi_communicators_and_tags_run_out_clearly(tmp_path):
    program = tmp_path / "limits.py"
    program.write_text(textwrap.dedent(MPI_LIMITS))
    done = subprocess.run(
        [sys.executable, "-m", "guest_lib.mpi.launcher", "-n", "2", "--timeout", "240",
         str(program), str(tmp_path)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=280,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    lines = [
        line for rank in (0, 1) for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines()
    ]
    dups = [line for line in lines if line.startswith("dups ")]
    assert len(dups) == 2, out
    for line in dups:
        count = int(line.split()[1])
        # contexts 4.. in pairs, 11 bits: about a thousand communicators, then ERR_INTERN
        assert 900 < count < 1024 and line.split()[2] == "True", line
        assert "out of communicator contexts" in line
    assert lines.count(f"tag refused {(1 << 18)} True") == 2, out
    assert lines.count("tag refused -5 True") == 2, out
    assert lines.count("done") == 2, out
