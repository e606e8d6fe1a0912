"""The one-call blocking point-to-point fast paths (ring.P2PLane, guest_lib.mpi.fastpath):
they take exactly the buffer forms the Python fast paths take, put the same bytes on the
wire, fill the status alike, and leave everything else (another thread, a queued send, a
message that is not the call's) to the Python paths untouched, so that order, matching and
errors stay theirs. Two engines of one process on a real region (ranks 0 and 1), in a
process of its own: the lane is for a process whose only Python thread is the main one, and
the test session runs a thread of its own (conftest's residue sampler)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ivshmem_comm as ic
from guest_lib.mpi import MPI, buffers, exceptions
from guest_lib.mpi.comm import Intracomm, _plain_array
from guest_lib.mpi.engine import Engine
from guest_lib.mpi.routes import SelfRoute, ShmRoute
from ivshmem_comm import ring
from tests.mpi.test_quick_specs import specs
from tests.support import destroy, unique_name

needs_c = pytest.mark.skipif(ring.P2PLane is None, reason="ivshmem_comm._fastpath is not built")
TAG = 5
ROOT = Path(__file__).resolve().parents[2]
Pair = tuple[Intracomm, Intracomm]


def _in_own_process(name: str) -> None:
    """Run check `name` (a function of this module taking a Pair) in a new process."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.mpi.test_p2p_lane", name],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _on_pair(check: Callable[[Pair], None]) -> None:
    """Call `check` with the communicators of ranks 0 and 1 over two engines on one region
    (COMM_WORLD's ctx 0), each bound to the other, the region destroyed after."""
    assert threading.active_count() == 1
    name = unique_name("lane")
    region = ic.Region.create(name, 16 << 20, 2)
    try:

        def comm(me: int) -> Intracomm:
            routes = [SelfRoute() if w == me else ShmRoute(1 - me) for w in range(2)]
            return Intracomm(Engine(me, 2, region.endpoint(me), routes), [0, 1], 0)

        a, b = comm(0), comm(1)
        for x, y in ((a, b), (b, a)):  # the first message binds each sender to its peer
            x.send(None, 1 - x.Get_rank(), 0)  # (a lane send waits for that: the Python path)
            assert y.recv(None, x.Get_rank(), 0) is None
        check((a, b))
    finally:
        region.close()
        destroy(name, 2)


def _takes(spec: Any, writable: bool) -> bool:
    """Whether the Python fast paths take `spec` as it is (Send/Recv: a plain numpy array,
    else buffers.quick)."""
    if type(spec) is np.ndarray:
        return _plain_array(spec, writable)
    return buffers.quick(spec, writable) is not None


def _wire(spec: Any) -> bytes | None:
    """The bytes a Send of `spec` puts on the wire (None: parse refuses it)."""
    try:
        return bytes(buffers.parse(spec).view)
    except Exception:
        return None


def check_lane_sends_what_the_python_paths_take(pair: Pair) -> None:
    a, b = pair
    lane = a._engine.lane
    for spec in specs():
        took = lane.send(1, 0, TAG, spec)
        assert took == _takes(spec, False), spec
        if took:
            got = bytearray(len(_wire(spec)) + 8)
            status = MPI.Status()
            b.Recv([got, len(got), MPI.BYTE], 0, TAG, status)
            assert status.Get_count() == len(_wire(spec)), spec
            assert bytes(got[: status.Get_count()]) == _wire(spec), spec
    assert not a._engine.ep.rx[1].busy and b._engine.quiet()
    got = bytearray(8)
    for i in range(4 * a._engine.ep.tx[1].ring.num):  # completions taken back as it goes
        assert lane.send(1, 0, TAG, [bytearray([i % 256]), 1, MPI.BYTE]) is True
        assert b._engine.lane.recv(0, 0, TAG, got, True) == (1, TAG) and got[0] == i % 256


def check_lane_receives_into_what_the_python_paths_take(pair: Pair) -> None:
    a, b = pair
    lane = b._engine.lane
    for spec in specs():
        wire = _wire(spec)
        writable = wire is not None and not buffers.parse(spec).view.readonly
        if not writable:
            continue
        payload = bytes(range(7, 7 + len(wire))) if wire else b""
        a.Send(payload, 1, TAG) if payload else a.Send([bytearray(0), 0, MPI.BYTE], 1, TAG)
        got = lane.recv(0, 0, TAG, spec, True)
        if _takes(spec, True):
            assert got == (len(payload), TAG), spec
            assert bytes(buffers.parse(spec).view) == payload, spec
        else:
            assert got is None, spec  # nothing taken: the Python receive takes it
            rest = bytearray(len(payload))
            b.Recv([rest, len(rest), MPI.BYTE], 0, TAG)
            assert rest == payload, spec
    assert b._engine.quiet() and not b._engine.ep.rx[0].busy


def check_lane_objects_and_status(pair: Pair) -> None:
    a, b = pair
    a.send({"x": 1}, 1, 7)
    status = MPI.Status()
    assert b.recv(None, 0, MPI.ANY_TAG, status) == {"x": 1}
    assert (status.Get_source(), status.Get_tag()) == (0, 7) and status.Get_count() > 0
    a.send(b"abc", 1, 3)
    assert b.recv(None, MPI.ANY_SOURCE, 3) == b"abc"
    a.Send(np.arange(3.0), 1, 9)
    got = np.zeros(4)
    b.Recv(got, 0, MPI.ANY_TAG, status)
    assert got.tolist() == [0.0, 1.0, 2.0, 0.0]
    assert (status.Get_source(), status.Get_tag(), status.Get_count(MPI.DOUBLE)) == (0, 9, 3)


def check_lane_send_obj_pickles_and_sends_or_hands_back(pair: Pair) -> None:
    """send_obj pickles with the dumps and protocol given (None: dumps(obj) alone) and sends
    the bytes in the same call (True); a pickle that is not bytes, or a send the lane
    declines, comes back unsent; what dumps raises propagates, nothing sent."""
    import pickle

    a, b = pair
    lane = a._engine.lane
    assert lane.send_obj(1, 0, TAG, {"k": 1}, pickle.dumps, 2) is True
    status = MPI.Status()
    assert b.recv(None, 0, TAG, status) == {"k": 1}
    assert status.Get_count() == len(pickle.dumps({"k": 1}, 2))
    called = []

    def dumps(*args: Any) -> Any:
        called.append(args)
        return bytearray(b"not bytes") if args[0] == "array" else pickle.dumps(args[0])

    assert lane.send_obj(1, 0, TAG, "plain", dumps, None) is True and called == [("plain",)]
    assert b.recv(None, 0, TAG) == "plain"
    assert lane.send_obj(1, 0, TAG, "array", dumps, None) == bytearray(b"not bytes")
    assert lane.send_obj(1, 0, MPI.TAG_UB_VALUE + 1, 7, pickle.dumps, 5) == pickle.dumps(7, 5)
    with pytest.raises(AttributeError, match="pickle local object"):
        lane.send_obj(1, 0, TAG, lambda: 0, pickle.dumps, 5)
    assert b._engine.lane.recv_obj(0, 0, MPI.ANY_TAG, False) is None  # nothing was sent
    assert b._engine.quiet() and not b._engine.ep.rx[0].busy


def check_lane_send_obj_leaves_bulky_objects_to_parts(pair: Pair) -> None:
    """With the standard pickle.dumps, an object of more data than one span of the queue
    holds (bytes, bytearray, str, a numpy array) comes back None, pickled nothing and sent
    nothing (pickling.parts' turn); one that fits a span, and any object under a custom
    dumps, is pickled and sent as ever."""
    import pickle

    import numpy as np

    a, b = pair
    lane = a._engine.lane
    span = a._engine.ep.tx[1].ring.max_span
    for obj in (b"x" * span, bytearray(span), "s" * span, np.zeros(span // 8 + 1)):
        assert lane.send_obj(1, 0, TAG, obj, pickle.dumps, 5) is None
    assert b._engine.lane.recv_obj(0, 0, MPI.ANY_TAG, False) is None  # nothing was sent
    small = b"x" * (span // 2)
    assert lane.send_obj(1, 0, TAG, small, pickle.dumps, 5) is True
    assert b.recv(None, 0, TAG) == small
    sent = lane.send_obj(1, 0, TAG, b"x" * span, lambda obj, protocol: pickle.dumps(obj), 5)
    assert sent == pickle.dumps(b"x" * span)  # (a custom dumps: its pickle, too big to send)


def check_lane_leaves_other_messages_in_order(pair: Pair) -> None:
    """A message of another tag or context that comes first is left peeked for the Python
    paths (unexpected, matched later); a longer one truncates as ever."""
    a, b = pair
    dup_a, dup_b = (Intracomm(x._engine, [0, 1], 4) for x in (a, b))  # (a collective: not here)
    a.Send(b"first", 1, 1)
    dup_a.Send(b"other-ctx", 1, 2)
    a.Send(b"second", 1, 2)
    buf = bytearray(16)
    status = MPI.Status()
    b.Recv([buf, 16, MPI.BYTE], 0, 2, status)  # the lane sees "first": not this call's
    assert bytes(buf[: status.Get_count()]) == b"second"
    b.Recv([buf, 16, MPI.BYTE], 0, 1, status)
    assert bytes(buf[: status.Get_count()]) == b"first"
    dup_b.Recv([buf, 16, MPI.BYTE], 0, 2, status)
    assert bytes(buf[: status.Get_count()]) == b"other-ctx"
    a.Send(b"too long for it", 1, 4)
    short = bytearray(4)
    with pytest.raises(exceptions.Exception) as info:
        b.Recv([short, 4, MPI.BYTE], 0, 4)
    assert info.value.Get_error_class() == MPI.ERR_TRUNCATE and short == b"too "
    assert b._engine.quiet()


def check_lane_declines_what_is_not_its_own(pair: Pair) -> None:
    """Another thread, a send queued for the peer, a bad tag: the lane moves nothing, and
    the calls still complete (and keep order) through the Python paths."""
    a, b = pair
    ea, eb = a._engine, b._engine
    data_size = ea.ep.region.geometry.data_size
    big = np.arange(3 * data_size // 8, dtype=np.float64)  # in pieces, more than the queue
    got = np.zeros_like(big)
    reqs = [a.Isend(big, 1, 1)]
    assert ea.sendq  # (the rest of its pieces wait for room)
    assert ea.lane.send(1, 0, 1, b"behind") is False
    reqs += [a.Isend(b"behind", 1, 1), b.Irecv(got, 0, 1)]  # (one thread: both progress)
    while not all([req.Test() for req in reqs]):
        pass
    assert np.array_equal(got, big)
    small = bytearray(8)
    status = MPI.Status()
    b.Recv([small, 8, MPI.BYTE], 0, 1, status)
    assert bytes(small[: status.Get_count()]) == b"behind"
    assert ea.lane.send(1, 0, MPI.TAG_UB_VALUE + 1, b"x") is False
    assert eb.lane.recv(0, 0, -3, small, False) is None
    with pytest.raises(exceptions.Exception) as info:
        a.Send(b"x", 1, -3)
    assert info.value.Get_error_class() == MPI.ERR_TAG
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert ea.lane.send(1, 0, 2, b"threads") is False
        a.Send(b"threads", 1, 2)  # the locked Python path
        assert eb.lane.recv(0, 0, 2, small, False) is None
        b.Recv([small, 8, MPI.BYTE], 0, 2, status)
        assert bytes(small[: status.Get_count()]) == b"threads"
    finally:
        stop.set()
        other.join()
    assert ea.lane.send(1, 0, 2, b"again") is True
    assert eb.lane.recv(0, 0, 2, small, True) == (5, 2) and small[:5] == b"again"


@needs_c
def test_lane_sends_what_the_python_paths_take() -> None:
    _in_own_process("check_lane_sends_what_the_python_paths_take")


@needs_c
def test_lane_receives_into_what_the_python_paths_take() -> None:
    _in_own_process("check_lane_receives_into_what_the_python_paths_take")


@needs_c
def test_lane_objects_and_status() -> None:
    _in_own_process("check_lane_objects_and_status")


@needs_c
def test_lane_send_obj_pickles_and_sends_or_hands_back() -> None:
    _in_own_process("check_lane_send_obj_pickles_and_sends_or_hands_back")


@needs_c
def test_lane_send_obj_leaves_bulky_objects_to_parts() -> None:
    _in_own_process("check_lane_send_obj_leaves_bulky_objects_to_parts")


@needs_c
def test_lane_leaves_other_messages_in_order() -> None:
    _in_own_process("check_lane_leaves_other_messages_in_order")


@needs_c
def test_lane_declines_what_is_not_its_own() -> None:
    _in_own_process("check_lane_declines_what_is_not_its_own")


if __name__ == "__main__":
    _on_pair(globals()[sys.argv[1]])
