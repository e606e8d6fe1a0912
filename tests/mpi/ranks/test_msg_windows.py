"""Windows of small Isend/Irecv, as osu_bw/osu_bibw post them: every buffer form, every way
of completing them, and MPI's matching rules on the path that takes a run of arrived
messages straight into the posted receives."""

from __future__ import annotations

import array
import mmap
import threading

import numpy as np
import pytest

from guest_lib.mpi import MPI

WINDOW = 64
FORMS = ["numpy", "mmap", "bytearray", "array", "double"]


def ring(comm: MPI.Intracomm) -> tuple[int, int, int]:
    size, rank = comm.Get_size(), comm.Get_rank()
    return rank, (rank + 1) % size, (rank - 1) % size


def pattern(seed: int, nbytes: int) -> bytes:
    return bytes((seed * 37 + i * 11 + 1) & 0xFF for i in range(nbytes))


class Buffers:
    """`count` message buffers of `nbytes` each in one buffer form, with the spec of each."""

    def __init__(self, form: str, count: int, nbytes: int) -> None:
        self.form, self.nbytes = form, nbytes
        if form == "numpy":
            self.bufs: list = [np.zeros(nbytes, np.uint8) for _ in range(count)]
        elif form == "mmap":
            self.bufs = [mmap.mmap(-1, max(nbytes, 1) + 16) for _ in range(count)]
        elif form == "bytearray":
            self.bufs = [bytearray(nbytes + 16) for _ in range(count)]
        else:  # array / double: float64 elements
            self.bufs = [array.array("d", bytes(nbytes)) for _ in range(count)]

    def spec(self, index: int):
        buf = self.bufs[index]
        if self.form == "numpy":
            return buf
        if self.form in ("mmap", "bytearray"):
            return [buf, self.nbytes, MPI.BYTE]
        if self.form == "array":
            return [buf, self.nbytes // 8, MPI.DOUBLE]
        return (buf, MPI.DOUBLE)

    def fill(self, index: int, data: bytes) -> None:
        memoryview(self.bufs[index]).cast("B")[: len(data)] = data

    def data(self, index: int) -> bytes:
        return bytes(memoryview(self.bufs[index]).cast("B")[: self.nbytes])


@pytest.mark.parametrize("nbytes", [0, 8, 1024])
@pytest.mark.parametrize("form", FORMS)
def test_window_every_form_in_order(comm, form, nbytes):
    """64 receives then 64 sends of distinct messages, Waitall over both (osu_bibw), twice:
    message i lands in receive i, with its status."""
    rank, dest, source = ring(comm)
    sends, recvs = Buffers(form, WINDOW, nbytes), Buffers(form, WINDOW, nbytes)
    for turn in range(2):
        for i in range(WINDOW):
            sends.fill(i, pattern(rank * 1000 + turn * 100 + i, nbytes))
        reqs = [comm.Irecv(recvs.spec(i), source, 5) for i in range(WINDOW)]
        reqs += [comm.Isend(sends.spec(i), dest, 5) for i in range(WINDOW)]
        statuses = [MPI.Status() for _ in reqs] if turn else None
        MPI.Request.Waitall(reqs, statuses)
        assert all(not req for req in reqs)
        for i in range(WINDOW):
            assert recvs.data(i) == pattern(source * 1000 + turn * 100 + i, nbytes), (turn, i)
        if statuses:
            for status in statuses[:WINDOW]:
                assert (status.Get_source(), status.Get_tag()) == (source, 5)
                assert status.Get_count(MPI.BYTE) == nbytes and not status.Is_cancelled()


def big_pattern(seed: int, nbytes: int) -> bytes:
    """pattern(), computed by numpy (these messages are large)."""
    return (
        ((np.arange(nbytes, dtype=np.uint32) * 11 + seed * 37 + 1) & 0xFF)
        .astype(np.uint8)
        .tobytes()
    )


# above one span (128 KiB): pieces pipelined and taken whole into posted receives; odd sizes
# end mid-piece
LARGE = [(128 << 10) + 8, 300_000, (1 << 20) + 40]


@pytest.mark.parametrize("nbytes", LARGE)
@pytest.mark.parametrize("form", FORMS)
def test_window_of_large_messages_every_form(comm, form, nbytes):
    """A window of large messages each way (osu_bw / osu_bibw sizes), Waitall over both,
    twice: every message lands whole in its receive, with its status. 40 of 1 MiB are more
    than a queue holds: the sender waits for room (kicked when there is enough)."""
    rank, dest, source = ring(comm)
    window = 40 if nbytes > 1 << 20 else 16
    sends, recvs = Buffers(form, window, nbytes), Buffers(form, window, nbytes)
    for turn in range(2):
        for i in range(window):
            sends.fill(i, big_pattern(rank * 1000 + turn * 100 + i, nbytes))
        reqs = [comm.Irecv(recvs.spec(i), source, 7) for i in range(window)]
        reqs += [comm.Isend(sends.spec(i), dest, 7) for i in range(window)]
        statuses = [MPI.Status() for _ in reqs]
        MPI.Request.Waitall(reqs, statuses)
        for i in range(window):
            want = big_pattern(source * 1000 + turn * 100 + i, nbytes)
            assert recvs.data(i) == want, (turn, i)
            status = statuses[i]
            assert (status.Get_source(), status.Get_tag()) == (source, 7)
            assert status.Get_count(MPI.BYTE) == nbytes


@pytest.mark.parametrize("nbytes", LARGE)
@pytest.mark.parametrize("form", FORMS)
def test_large_send_recv_and_sendrecv_every_form(comm, form, nbytes):
    """Blocking Send/Recv round the ring (even ranks first), then Sendrecv, of large messages:
    the bytes and counts arrive whole, the receive posted before or after the message."""
    rank, dest, source = ring(comm)
    sends, recvs = Buffers(form, 1, nbytes), Buffers(form, 1, nbytes)
    status = MPI.Status()
    for turn in range(3):
        sends.fill(0, big_pattern(rank * 7 + turn, nbytes))
        if turn < 2 and comm.Get_size() > 1:
            if (rank + turn) % 2 == 0:
                comm.Send(sends.spec(0), dest, 8)
                comm.Recv(recvs.spec(0), source, 8, status)
            else:
                comm.Recv(recvs.spec(0), source, 8, status)
                comm.Send(sends.spec(0), dest, 8)
        else:
            comm.Sendrecv(sends.spec(0), dest, 8, recvs.spec(0), source, 8, status)
        assert recvs.data(0) == big_pattern(source * 7 + turn, nbytes), turn
        assert status.Get_count(MPI.BYTE) == nbytes and status.Get_source() == source


def test_numpy_isends_past_a_full_queue_keep_order_and_data(comm):
    """Isend of plain numpy arrays far past what the queue holds, empty arrays among them:
    the ones the queue cannot take are queued (their requests pending), and every array
    arrives whole, in order."""
    rank, dest, source = ring(comm)
    count = 600
    arrays = [
        np.zeros(0) if i % 7 == 0 else np.arange(128, dtype=np.float64) + rank * 1e4 + i
        for i in range(count)
    ]
    reqs = [comm.Isend(a, dest, 9) for a in arrays]
    assert any(req for req in reqs), "the queue took every message at once: not a test"
    out, status = np.empty(128), MPI.Status()
    for i in range(count):
        comm.Recv(out, source, 9, status)
        n = status.Get_count(MPI.DOUBLE)
        want = np.zeros(0) if i % 7 == 0 else np.arange(128, dtype=np.float64) + source * 1e4 + i
        assert n == len(want) and np.array_equal(out[:n], want), i
    MPI.Request.Waitall(reqs)


@pytest.mark.parametrize("how", ["waitany", "testall", "waitsome", "testany", "wait"])
def test_window_completed_every_way(comm, how):
    rank, dest, source = ring(comm)
    recvs = [bytearray(8) for _ in range(WINDOW)]
    rreqs = [comm.Irecv([buf, 8, MPI.BYTE], source, 6) for buf in recvs]
    comm.Barrier()  # every receive is posted before any message comes
    sreqs = [comm.Isend(pattern(rank * 100 + i, 8), dest, 6) for i in range(WINDOW)]
    reqs = rreqs + sreqs
    done: set[int] = set()
    if how == "waitany":
        while len(done) < len(reqs):
            status = MPI.Status()
            index = MPI.Request.Waitany(reqs, status)
            assert index not in done and not reqs[index]
            if index < WINDOW:
                assert (status.Get_source(), status.Get_count(MPI.BYTE)) == (source, 8)
            done.add(index)
        assert MPI.Request.Waitany(reqs) == MPI.UNDEFINED
    elif how == "testall":
        while not MPI.Request.Testall(reqs):
            pass
    elif how == "waitsome":
        while len(done) < len(reqs):
            indices = MPI.Request.Waitsome(reqs)
            assert indices and not done & set(indices)
            done.update(indices)
        assert MPI.Request.Waitsome(reqs) is None
    elif how == "testany":
        while len(done) < len(reqs):
            index, flag = MPI.Request.Testany(reqs)
            if index != MPI.UNDEFINED:
                assert flag and index not in done
                done.add(index)
    else:
        for req in reversed(reqs):
            req.Wait()
    assert all(not req for req in reqs)
    for i, buf in enumerate(recvs):
        assert bytes(buf) == pattern(source * 100 + i, 8), i


@pytest.mark.parametrize("unexpected", [False, True])
def test_window_matching_order(comm, unexpected):
    """Messages tagged 1, 2, 1, 2 against receives posted as (source, tag 2), (ANY_SOURCE,
    ANY_TAG), (source, tag 1), (ANY_SOURCE, tag 2): each message goes to the first posted
    receive it matches, whether it arrived before the receives were posted or after."""
    rank, dest, source = ring(comm)
    got = [np.zeros(4, np.int32) for _ in range(4)]
    wants = [(source, 2), (MPI.ANY_SOURCE, MPI.ANY_TAG), (source, 1), (MPI.ANY_SOURCE, 2)]

    def post():
        return [comm.Irecv(buf, src, tag) for buf, (src, tag) in zip(got, wants, strict=True)]

    def send():
        return [comm.Isend(np.full(4, rank * 10 + i, np.int32), dest, 1 + i % 2) for i in range(4)]

    if unexpected:
        sreqs = send()
        comm.Barrier()
        rreqs = post()
    else:
        rreqs = post()
        comm.Barrier()
        sreqs = send()
    statuses = [MPI.Status() for _ in range(4)]
    MPI.Request.Waitall(rreqs, statuses)
    MPI.Request.Waitall(sreqs)
    # message i (tag 1 + i % 2) -> receive [1, 0, 2, 3][i]
    for message, receive in enumerate([1, 0, 2, 3]):
        assert got[receive][0] == source * 10 + message, (message, receive, got)
        assert statuses[receive].Get_tag() == 1 + message % 2
        assert statuses[receive].Get_source() == source


def test_window_with_a_truncated_receive_a_cancel_and_synchronous_sends(comm):
    """A receive too small mid-window makes Waitall raise ERR_IN_STATUS with ERR_TRUNCATE
    in that receive's status (MPI's rule for a multiple completion), the others are filled
    with no error; a cancelled receive takes no message; Issend mixed with Isend keeps the
    order."""
    rank, dest, source = ring(comm)
    bufs = [bytearray(8) for _ in range(8)]
    bufs[3] = bytearray(4)
    extra = bytearray(8)
    cancelled = comm.Irecv([extra, 8, MPI.BYTE], source, 8)
    rreqs = [comm.Irecv([buf, len(buf), MPI.BYTE], source, 7) for buf in bufs]
    cancelled.Cancel()
    comm.Barrier()
    sends = [pattern(rank * 50 + i, 8) for i in range(8)]
    sreqs = [(comm.Issend if i % 3 == 0 else comm.Isend)(sends[i], dest, 7) for i in range(8)]
    statuses = [MPI.Status() for _ in rreqs]
    with pytest.raises(MPI.Exception) as info:
        MPI.Request.Waitall(rreqs, statuses)
    assert info.value.Get_error_class() == MPI.ERR_IN_STATUS
    errors = [MPI.Get_error_class(status.Get_error()) for status in statuses]
    assert errors == [MPI.SUCCESS] * 3 + [MPI.ERR_TRUNCATE] + [MPI.SUCCESS] * 4
    MPI.Request.Waitall(sreqs)
    status = MPI.Status()
    cancelled.Wait(status)
    assert status.Is_cancelled() and extra == bytearray(8)
    for i, buf in enumerate(bufs):
        want = pattern(source * 50 + i, 8)
        assert bytes(buf) == want[: len(buf)], i
    comm.Barrier()


def test_wildcard_receive_behind_an_unmatched_one_completes(comm):
    """A (source, tag 2) receive that nothing matches yet does not hold back a later
    (ANY_SOURCE, ANY_TAG) receive from a tag-1 message: it completes with only that message
    sent (the mpi4py route of a hybrid job held it until the first one matched: a hang)."""
    rank, dest, source = ring(comm)
    first, second = np.zeros(1, np.int32), np.zeros(1, np.int32)
    held = comm.Irecv(first, source, 2)
    wild = comm.Irecv(second, MPI.ANY_SOURCE, MPI.ANY_TAG)
    comm.Barrier()
    send = comm.Isend(np.array([rank], np.int32), dest, 1)
    status = MPI.Status()
    wild.Wait(status)
    assert (second[0], status.Get_source(), status.Get_tag()) == (source, source, 1)
    send.Wait()
    assert not held.Test()
    comm.Barrier()  # (every rank tested `held` before any sends its tag-2 message)
    comm.Send(np.array([rank + 100], np.int32), dest, 2)
    held.Wait()
    assert first[0] == source + 100
    comm.Barrier()


def test_any_source_window_keeps_each_senders_order(comm):
    """Every rank sends a window to rank 0, which posts ANY_SOURCE receives: each sender's
    messages arrive in its order (non-overtaking), every message once."""
    rank, size = comm.Get_rank(), comm.Get_size()
    per = 16
    sreqs = []
    if rank == 0:
        bufs = [np.zeros(2, np.int64) for _ in range(per * size)]
        statuses = [MPI.Status() for _ in bufs]
        rreqs = [comm.Irecv(buf, MPI.ANY_SOURCE, 9) for buf in bufs]
    comm.Barrier()
    sreqs = [comm.Isend(np.array([rank, i], np.int64), 0, 9) for i in range(per)]
    if rank == 0:
        MPI.Request.Waitall(rreqs, statuses)
        seen: dict[int, list[int]] = {r: [] for r in range(size)}
        for buf, status in zip(bufs, statuses, strict=True):
            assert status.Get_source() == buf[0]
            seen[int(buf[0])].append(int(buf[1]))
        assert seen == {r: list(range(per)) for r in range(size)}
    MPI.Request.Waitall(sreqs)
    comm.Barrier()


def test_windows_from_threads_interleave_in_one_posted_list():
    """THREAD_MULTIPLE: 4 threads of every rank post windows on COMM_WORLD at once, thread t
    by tag t, so their receives interleave in the one posted list the arrivals are matched
    against: each message reaches its thread's receive, in order."""
    comm = MPI.COMM_WORLD
    rank, dest, source = ring(comm)
    errors: list[BaseException] = []

    def body(t: int) -> None:
        try:
            bufs = [bytearray(8) for _ in range(16)]
            for turn in range(20):
                reqs = [comm.Irecv([buf, 8, MPI.BYTE], source, t) for buf in bufs]
                seeds = [rank * 10000 + t * 1000 + turn * 16 + i for i in range(16)]
                reqs += [comm.Isend(pattern(seed, 8), dest, t) for seed in seeds]
                MPI.Request.Waitall(reqs)
                for i, buf in enumerate(bufs):
                    assert bytes(buf) == pattern(source * 10000 + t * 1000 + turn * 16 + i, 8)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(t,), daemon=True) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors, errors[0]
    assert not any(thread.is_alive() for thread in threads)
    comm.Barrier()


@pytest.mark.parametrize("ahead", [False, True])
def test_waitall_without_statuses_nulls_every_request(comm, ahead):
    """Waitall with no statuses asked, over a tuple of Isend/Irecv requests (PROC_NULL ones,
    a null one and sends written at once among them), complete before the call (`ahead`) or
    not: every request ends null and the data is in place; a truncated receive among them
    still raises ERR_IN_STATUS, and leaves every request null too."""
    rank, dest, source = ring(comm)
    got = [bytearray(8) for _ in range(WINDOW)]
    rreqs = [comm.Irecv([buf, 8, MPI.BYTE], source, 11) for buf in got]
    sreqs = [comm.Isend(pattern(rank + i, 8), dest, 11) for i in range(WINDOW)]
    extra = [comm.Isend(b"", MPI.PROC_NULL, 11), comm.Irecv(bytearray(1), MPI.PROC_NULL, 11)]
    reqs = (*rreqs, *sreqs, *extra, MPI.REQUEST_NULL)
    if ahead:
        while not all(r.Test() for r in rreqs):  # (Test nulls them: Waitall meets null ones)
            pass
    assert MPI.Request.Waitall(reqs) is True
    assert all(r == MPI.REQUEST_NULL for r in reqs)
    assert [bytes(buf) for buf in got] == [pattern(source + i, 8) for i in range(WINDOW)]
    small = [bytearray(8), bytearray(4)]
    rreqs = [comm.Irecv([buf, len(buf), MPI.BYTE], source, 12) for buf in small]
    sreqs = [comm.Isend(pattern(rank + 7, 8), dest, 12) for _ in small]
    with pytest.raises(MPI.Exception) as info:
        MPI.Request.Waitall(rreqs + sreqs)
    assert info.value.Get_error_class() == MPI.ERR_IN_STATUS
    assert all(r == MPI.REQUEST_NULL for r in rreqs + sreqs)
    assert small[0] == pattern(source + 7, 8) and small[1] == pattern(source + 7, 8)[:4]
