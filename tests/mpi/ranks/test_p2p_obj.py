"""Point-to-point with Python objects (pickled)."""

from __future__ import annotations

import numpy as np
import pytest

from guest_lib.mpi import MPI

MESSAGES = [
    None, True, False, 7, -(2**70), 3.25, 1 + 2j, "", "text", b"bytes",
    [], [1, 2, 3], (1, "a"), {"k": [1, 2]}, {1, 2}, list(range(1000)),
]  # fmt: skip


def ring(comm: MPI.Intracomm) -> tuple[int, int, int, int]:
    size, rank = comm.Get_size(), comm.Get_rank()
    return size, rank, (rank + 1) % size, (rank - 1) % size


def test_send_recv_ring(comm):
    _, _, dest, source = ring(comm)
    for message in MESSAGES:
        comm.send(message, dest, tag=1)
        assert comm.recv(source=source, tag=1) == message


def test_sendrecv(comm):
    _, _, dest, source = ring(comm)
    for message in MESSAGES:
        status = MPI.Status()
        got = comm.sendrecv(message, dest, 3, None, source, 3, status)
        assert got == message
        assert status.Get_source() == source and status.Get_tag() == 3


def test_isend_irecv(comm):
    _, _, dest, source = ring(comm)
    for message in MESSAGES:
        rreq = comm.irecv(source=source, tag=2)
        sreq = comm.isend(message, dest, tag=2)
        assert rreq.wait() == message
        assert sreq.wait() is None


def test_ssend(comm):
    _, _, dest, source = ring(comm)
    rreq = comm.irecv(source=source, tag=4)
    comm.ssend({"sync": True}, dest, tag=4)
    assert rreq.wait() == {"sync": True}
    sreq = comm.issend("x", dest, tag=5)
    assert comm.recv(source=source, tag=5) == "x"
    sreq.wait()


def test_proc_null(comm):
    comm.send("lost", MPI.PROC_NULL)
    status = MPI.Status()
    assert comm.recv(source=MPI.PROC_NULL, status=status) is None
    assert status.Get_source() == MPI.PROC_NULL
    assert comm.sendrecv("x", MPI.PROC_NULL, source=MPI.PROC_NULL) is None
    assert comm.isend(1, MPI.PROC_NULL).wait() is None
    assert comm.irecv(source=MPI.PROC_NULL).wait() is None


def test_any_source_any_tag(comm):
    _, rank, dest, _ = ring(comm)
    comm.send(rank, dest, tag=rank + 10)
    status = MPI.Status()
    got = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
    assert got == status.Get_source() and status.Get_tag() == got + 10


def test_non_overtaking(comm):
    _, _, dest, source = ring(comm)
    for i in range(50):
        comm.send(i, dest, tag=7)
    assert [comm.recv(source=source, tag=7) for _ in range(50)] == list(range(50))


def test_unexpected_tags_out_of_order(comm):
    _, _, dest, source = ring(comm)
    for tag in (3, 2, 1):
        comm.send(tag * 100, dest, tag=tag)
    assert [comm.recv(source=source, tag=t) for t in (1, 2, 3)] == [100, 200, 300]


def test_probe(comm):
    _, _, dest, source = ring(comm)
    comm.send("probe me", dest, tag=9)
    status = MPI.Status()
    assert comm.probe(source, 9, status)
    assert status.Get_source() == source and status.Get_tag() == 9 and status.Get_count() > 0
    assert comm.iprobe(source, 9)
    assert comm.recv(source=source, tag=9) == "probe me"
    comm.Barrier()
    assert not comm.iprobe(source, 9)


def test_large_object(comm):
    _, rank, dest, source = ring(comm)
    blob = np.full(3_000_000, rank, np.float64)  # 24 MB: many pieces
    got = comm.sendrecv(blob, dest, 11, None, source, 11)
    assert got.shape == blob.shape and got[0] == source and got[-1] == source


def test_bad_rank_and_tag(comm):
    with pytest.raises(MPI.Exception) as info:
        comm.send(1, comm.Get_size())
    assert info.value.Get_error_class() == MPI.ERR_RANK
    with pytest.raises(MPI.Exception) as info:
        comm.send(1, 0, tag=MPI.TAG_UB_VALUE + 1)
    assert info.value.Get_error_class() == MPI.ERR_TAG


@pytest.mark.parametrize("nbytes", [0, 40, 16_300, 16_500, 200_000, 5_000_000])
def test_blocking_recv_of_every_size(comm, nbytes):
    """Blocking object receives of whole messages below and above the engine's scratch size
    and of a large one in pieces, after unexpected messages of another tag: data, order,
    status (the count is the pickle's bytes)."""
    import pickle

    _, rank, dest, source = ring(comm)
    blob = bytes([rank % 256]) * nbytes
    first = comm.isend(("other tag", rank), dest, tag=21)
    reqs = [comm.isend(blob, dest, tag=20), comm.isend(rank, dest, tag=20)]
    status = MPI.Status()
    got = comm.recv(source=source, tag=20, status=status)
    assert got == bytes([source % 256]) * nbytes
    assert status.Get_source() == source and status.Get_tag() == 20
    assert status.Get_count() == len(pickle.dumps(got, MPI.pickle.PROTOCOL))
    assert comm.recv(source=source, tag=20) == source
    assert comm.recv(source=source, tag=21) == ("other tag", source)
    MPI.Request.waitall([first, *reqs])


def test_isends_past_a_full_queue_keep_order(comm):
    """Object isends on Isend's fast path: written at once while the queue has room, queued
    behind the others after that (a large one among them), all in order."""
    _, rank, dest, source = ring(comm)
    sent = [(rank, i, b"x" * (300_000 if i == 150 else i % 50)) for i in range(400)]
    reqs = [comm.isend(item, dest, tag=22) for item in sent]
    got = [comm.recv(source=source, tag=22) for _ in sent]
    assert MPI.Request.waitall(reqs) == [None] * len(sent)
    assert got == [(source, i, b"x" * (300_000 if i == 150 else i % 50)) for i in range(400)]


def test_sendrecv_of_an_unpicklable_object_posts_nothing(comm):
    """A sendrecv whose object does not pickle raises before it posts its receive: the next
    message from the source goes to the next receive (an orphaned receive took it once)."""
    import time

    _, rank, dest, source = ring(comm)
    with pytest.raises(Exception, match="pickle"):
        comm.sendrecv(lambda: rank, dest, 30, None, source, 30)
    comm.send(("after", rank), dest, tag=30)
    request = comm.irecv(source=source, tag=30)
    deadline = time.monotonic() + 10
    done, got = False, None
    while not done and time.monotonic() < deadline:
        done, got = request.test()
    assert got == ("after", source)


@pytest.mark.parametrize("made", ["bytearray", "empty"])
def test_custom_dumps_of_other_than_bytes(comm, made):
    """A custom `MPI.pickle` whose dumps returns a bytearray (or an empty stream, which loads
    as None) goes through send, isend and recv whole: the fast paths that take pickled bytes
    as they are hand anything else to the buffer paths."""
    import pickle

    _, rank, dest, source = ring(comm)

    def dumps(obj, protocol=None):
        return bytearray(pickle.dumps(obj, protocol)) if made == "bytearray" else b""

    try:
        MPI.pickle.__init__(dumps, pickle.loads)
        want = None if made == "empty" else ("from", source)
        comm.send(("from", rank), dest, tag=40)
        status = MPI.Status()
        assert comm.recv(source=source, tag=40, status=status) == want
        assert status.Get_source() == source and status.Get_tag() == 40
        requests = [comm.isend(("from", rank, i), dest, tag=41) for i in range(3)]
        got = [comm.recv(source=source, tag=41) for _ in range(3)]
        assert MPI.Request.waitall(requests) == [None] * 3
        assert got == [None if made == "empty" else ("from", source, i) for i in range(3)]
    finally:
        MPI.pickle.__init__()


def test_irecv_window_of_mixed_sizes(comm):
    """A window of object irecvs posted before the messages come: sizes around the engine's
    scratch size and of a large message in pieces, a status for each (source, tag, the
    pickle's bytes), one receive of ANY_SOURCE / ANY_TAG among them, and buffer receives of
    the same source and tag interleaved, each getting its own message in order."""
    import pickle

    _, rank, dest, source = ring(comm)
    sizes = [0, 8, 1000, 16_300, 16_500, 70_000, 3, 2_000_000, 5, 40]
    comm.Barrier()
    posted = []
    for index in range(len(sizes)):
        if index == 3:
            posted.append(comm.irecv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG))
        else:
            posted.append(comm.irecv(source=source, tag=50))
        if index == 5:
            posted.append(comm.Irecv(array := np.zeros(4, np.int64), source, 50))
    comm.Barrier()
    objs = [bytes([(rank + i) % 256]) * nbytes for i, nbytes in enumerate(sizes)]
    sends = []
    for index, obj in enumerate(objs):
        sends.append(comm.isend(obj, dest, tag=50))
        if index == 5:
            sends.append(comm.Isend(np.arange(4, dtype=np.int64) + rank, dest, 50))
    statuses = [MPI.Status() for _ in posted]
    got = MPI.Request.waitall(posted, statuses)
    MPI.Request.waitall(sends)
    want = [bytes([(source + i) % 256]) * n for i, n in enumerate(sizes)]
    assert got[:6] + got[7:] == want
    assert got[6] is None and list(array) == [source, source + 1, source + 2, source + 3]
    for status, obj in zip(statuses[:6] + statuses[7:], want, strict=True):
        assert status.Get_source() == source and status.Get_tag() == 50
        assert status.Get_count() == len(pickle.dumps(obj, MPI.pickle.PROTOCOL))


def test_irecv_cancelled_in_a_window(comm):
    """An object irecv cancelled before its message comes is cancelled (its status says so)
    and the message goes to the next matching receive, after those posted before."""
    _, rank, dest, source = ring(comm)
    comm.Barrier()
    first = comm.irecv(source=source, tag=60)
    dropped = comm.irecv(source=source, tag=60)
    dropped.Cancel()
    last = comm.irecv(source=source, tag=60)
    comm.Barrier()
    comm.send(("a", rank), dest, tag=60)
    comm.send(("b", rank), dest, tag=60)
    status = MPI.Status()
    dropped.Wait(status)
    assert status.Is_cancelled()
    assert MPI.Request.waitall([first, last]) == [("a", source), ("b", source)]


def test_send_and_isend_of_an_unpicklable_object_send_nothing(comm):
    """send and isend of an object that does not pickle raise the pickler's error and send
    nothing: the next message is the first the receiver gets."""
    _, rank, dest, source = ring(comm)
    for call in (comm.send, comm.isend):
        with pytest.raises(Exception, match="pickle"):
            call(lambda: rank, dest, 42)
    request = comm.isend(("after", rank), dest, tag=42)
    assert comm.recv(source=source, tag=42) == ("after", source)
    request.wait()


def _bulky(rank: int) -> list:
    """Objects whose data the lane leaves to pickling.parts (bulky, past one span of the
    queue), and some just below that: bytes, bytearray, str, numpy arrays (C, Fortran and
    strided), a container of arrays, one of whole_max's size and one in pieces."""
    big = 200_000 + rank
    return [
        bytes([rank % 256]) * big,
        bytearray(b"b" * big),
        "s" * big + str(rank),
        np.arange(big // 8, dtype=np.float64) + rank,
        np.asfortranarray(np.arange(200 * 300, dtype=np.int64).reshape(200, 300) + rank),
        (np.arange(2 * big // 8) + rank)[::2],
        [np.zeros(20_000) + rank, b"x" * 100_000, {"k": rank}],
        bytes(70_000),
        bytes((1 << 20) + rank),
        bytes((4 << 20) + rank),
    ]


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return (
            type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
        )
    if isinstance(a, list):
        return type(b) is list and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_bulky_objects_send_isend_recv(comm):
    """Bulky objects (sent in pickled parts, each copied once into the queue; received and
    read in place where the message lies whole in the queue) through send, isend, sendrecv
    and recv of a source and tag, of ANY_SOURCE / ANY_TAG and with a status (the pickle's
    bytes), and the same under a custom MPI.pickle (dumps and loads of its own: no parts,
    a copy)."""
    import pickle

    _, rank, dest, source = ring(comm)
    calls = []

    def loads(data):
        calls.append(type(data))
        return pickle.loads(data)

    for custom in (False, True):
        if custom:
            MPI.pickle.__init__(lambda obj, protocol=None: pickle.dumps(obj, protocol), loads)
        try:
            for i, obj in enumerate(_bulky(rank)):
                want = _bulky(source)[i]
                comm.send(obj, dest, tag=50)
                request = comm.isend(obj, dest, tag=51)
                status = MPI.Status()
                got = comm.recv(source=source, tag=50, status=status)
                assert _same(want, got), (i, custom)
                assert status.Get_source() == source and status.Get_tag() == 50
                assert status.Get_count() == len(pickle.dumps(want, MPI.pickle.PROTOCOL))
                got = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
                assert _same(want, got), (i, custom)
                assert status.Get_tag() == 51
                assert request.wait() is None
                got = comm.sendrecv(obj, dest, 52, None, source, 52, status)
                assert _same(want, got) and status.Get_source() == source, (i, custom)
                comm.Barrier()
        finally:
            MPI.pickle.__init__()
    assert calls and all(kind is bytes for kind in calls)  # (a custom loads: its own copy)
