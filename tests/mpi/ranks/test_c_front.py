"""The C front of the small blocking collectives (collectives._c_front, CollectiveRound.front):
every buffer form codes pass on each call runs in the one C call, with the right data, and
whatever it does not take (other forms, bad arguments, more than a slab) gets the result and
the error the Python path gives."""

from __future__ import annotations

import array
import mmap
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI, area, collectives
from ivshmem_comm import collective

N = 5  # elements per rank


def _form(form: str, values: list[float]) -> tuple[Any, Callable[[], list[float]]]:
    """`values` as doubles in `form` (numpy, mmap: [buf, count, DOUBLE], double: (array('d'),
    DOUBLE)), and a reader of the values it holds."""
    if form == "mmap":
        raw = mmap.mmap(-1, 8 * len(values))
        raw[:] = np.array(values, np.float64).tobytes()
        return [raw, len(values), MPI.DOUBLE], lambda: np.frombuffer(raw[:], np.float64).tolist()
    if form == "double":
        dbl = array.array("d", values)
        return (dbl, MPI.DOUBLE), lambda: list(dbl)
    arr = np.array(values, np.float64)
    return arr, lambda: arr.tolist()


def _blocks(form: str, values: list[float], size: int) -> Any:
    """A receive buffer of `size` blocks (a block form's count is one rank's block)."""
    buf, read = _form(form, values)
    if isinstance(buf, list):
        buf[1] = len(values) // size
    return buf, read


def _vector(form: str, values: list[float], counts: list[int], displs: list[int]) -> Any:
    """A vector receive spec over `values` (doubles) in `form`: numpy [buf, counts, displs,
    DOUBLE], mmap [buf, (counts, displs), DOUBLE], double [array('d'), counts, DOUBLE] (its
    displacements then contiguous: `displs` must be), and a reader of the values it holds."""
    buf, read = _form(form, values)
    raw = buf[0] if isinstance(buf, list | tuple) else buf
    if form == "mmap":
        return [raw, (counts, displs), MPI.DOUBLE], read
    if form == "double":
        return [raw, counts, MPI.DOUBLE], read
    return [raw, counts, displs, MPI.DOUBLE], read


def _gather(comm: MPI.Intracomm, call: str, send: Any, recv: Any, root: int) -> None:
    """Allgather(v) (send, recv), or Gather(v) (send, recv at the root, else None, root)."""
    if call.startswith("Allgather"):
        getattr(comm, call)(send, recv)
    else:
        getattr(comm, call)(send, recv if comm.Get_rank() == root else None, root)


def _run_v(call: str, form: str, comm: MPI.Intracomm) -> None:
    """Gatherv / Allgatherv in `form` (see _vector; in_place: numpy with IN_PLACE where the
    call takes it), rank q's block q + 1 doubles (q + 1.0 each), at every root; the blocks
    one element apart (contiguous for the double form), the elements between them kept."""
    size, rank = comm.Get_size(), comm.Get_rank()
    base = "numpy" if form == "in_place" else form
    place = form == "in_place"
    gap = 0 if base == "double" else 1
    counts = [q + 1 for q in range(size)]
    displs = [sum(counts[:q]) + gap * q for q in range(size)]
    want = [-1.0] * (displs[-1] + counts[-1] + gap)
    for q in range(size):
        want[displs[q] : displs[q] + counts[q]] = [q + 1.0] * counts[q]
    for root in range(size):
        gathers = call == "Allgatherv" or rank == root
        start = [
            v if place and displs[rank] <= i < displs[rank] + counts[rank] else -1.0
            for i, v in enumerate(want)
        ]
        recv, read = _vector(base, start, counts, displs)
        send = MPI.IN_PLACE if place and gathers else _form(base, [rank + 1.0] * (rank + 1))[0]
        _gather(comm, call, send, recv, root)
        if gathers:
            assert read() == want
        if call == "Allgatherv":
            break  # (no root)


def _alltoall(call: str, form: str, comm: MPI.Intracomm) -> None:
    """Alltoall (block forms) or Alltoallv (vector specs, see _vector: rank r sends rank q
    1 + (r + q) % 3 elements, the same both ways so that IN_PLACE's counts are its own; the
    blocks in reverse order one element apart, contiguous for the double form) in `form`
    (in_place: IN_PLACE over a numpy buffer), data checked."""
    size, rank = comm.Get_size(), comm.Get_rank()
    base = "numpy" if form == "in_place" else form
    place = form == "in_place"

    def block(sender: int, receiver: int, n: int) -> list[float]:
        return [sender * 100.0 + receiver * 10.0 + i for i in range(n)]

    if call == "Alltoall":
        mine = [v for q in range(size) for v in block(rank, q, N)]
        want = [v for q in range(size) for v in block(q, rank, N)]
        recv, read = _blocks(base, mine if place else [-1.0] * N * size, size)
        comm.Alltoall(MPI.IN_PLACE if place else _blocks(base, mine, size)[0], recv)
        assert read() == want
        return
    gap = 0 if base == "double" else 1
    counts = [1 + (rank + q) % 3 for q in range(size)]
    displs = [sum(counts[q + 1 :]) + gap * (size - q) for q in range(size)]
    if gap == 0:
        displs = [sum(counts[:q]) for q in range(size)]

    def spread(sender: Callable[[int], int], receiver: Callable[[int], int]) -> list[float]:
        values = [-1.0] * (max(d + c for d, c in zip(displs, counts, strict=True)) + gap)
        for q in range(size):
            values[displs[q] : displs[q] + counts[q]] = block(sender(q), receiver(q), counts[q])
        return values

    mine = spread(lambda q: rank, lambda q: q)
    want = spread(lambda q: q, lambda q: rank)
    recv, read = _vector(base, mine if place else [-1.0] * len(want), counts, displs)
    comm.Alltoallv(MPI.IN_PLACE if place else _vector(base, mine, counts, displs)[0], recv)
    assert read() == want


def _run(call: str, form: str, comm: MPI.Intracomm) -> None:
    """`call` in `form` (in_place: numpy with IN_PLACE where the call takes it) with checked
    data, at every root."""
    size, rank = comm.Get_size(), comm.Get_rank()
    base = "numpy" if form == "in_place" else form
    place = form == "in_place"
    mine = [float(rank + 1 + i) for i in range(N)]

    def fold(upto: int, f: Callable[[list[float]], float] = sum) -> list[float]:
        return [f([q + 1.0 + i for q in range(upto)]) for i in range(N)]

    everyone = [float(q + 1) for q in range(size) for _ in range(N)]
    for root in range(size):
        if call == "Bcast":
            buf, read = _form(base, [root + 0.5] * N if rank == root else [-1.0] * N)
            comm.Bcast(buf, root)
            assert read() == [root + 0.5] * N
        elif call in ("Gather", "Allgather"):
            gathers = call == "Allgather" or rank == root
            own = [q == rank and place for q in range(size) for _ in range(N)]
            start = [v if keep else -1.0 for v, keep in zip(everyone, own, strict=True)]
            recv, read = _blocks(base, start, size)
            send = MPI.IN_PLACE if place and gathers else _form(base, [rank + 1.0] * N)[0]
            _gather(comm, call, send, recv, root)
            if gathers:
                assert read() == everyone
        elif call in ("Scatter", "Scatterv"):
            # Scatterv: the blocks in reverse order, counts and displacements in each vector
            # form ([buf, counts, displs, dt] / [buf, (counts, displs), dt]), in place
            # [buf, counts, dt] (contiguous)
            order = list(range(size)) if call == "Scatter" else list(range(size))[::-1]
            every = [q + 0.5 + i for q in order for i in range(N)]
            send, spec = None, None
            if rank == root:
                send, _ = _blocks(base, every, size)
            if rank == root and call == "Scatterv":
                counts, displs = [N] * size, [(size - 1 - q) * N for q in range(size)]
                obj = send[0] if isinstance(send, (list, tuple)) else send
                spec = {
                    "numpy": [obj, counts, displs, MPI.DOUBLE],
                    "mmap": [obj, tuple(counts), displs, MPI.DOUBLE],
                    "double": (obj, (counts, displs), MPI.DOUBLE),
                }.get(form, [obj, counts, MPI.DOUBLE])
                if place:  # (contiguous: block q at q * N)
                    obj[:] = np.array([q + 0.5 + i for q in range(size) for i in range(N)])
                send = spec
            if rank == root and place:
                getattr(comm, call)(send, MPI.IN_PLACE, root)
                continue
            recv, read = _form(base, [-1.0] * N)
            getattr(comm, call)(send, recv, root)
            assert read() == [rank + 0.5 + i for i in range(N)]
        elif call == "Reduce":
            recv, read = _form(base, mine if place else [0.0] * N)
            send = MPI.IN_PLACE if place and rank == root else _form(base, mine)[0]
            comm.Reduce(send, recv, MPI.MAX, root=root)
            if rank == root:
                assert read() == fold(size, max)
        elif call.startswith("Reduce_scatter"):
            counts = [N] * size if call == "Reduce_scatter_block" else list(range(1, size + 1))
            operand = [rank + 1.0 + j for j in range(sum(counts))]
            first = sum(counts[:rank])
            want = [sum(q + 1.0 + first + i for q in range(size)) for i in range(counts[rank])]
            recv, read = _form(base, operand if place else [0.0] * counts[rank])
            send = MPI.IN_PLACE if place else _form(base, operand)[0]
            if call == "Reduce_scatter":
                comm.Reduce_scatter(send, recv, counts, MPI.SUM)
            else:
                comm.Reduce_scatter_block(send, recv, op=MPI.SUM)
            assert read()[: counts[rank]] == want
            break  # (no root)
        else:
            recv, read = _form(base, mine if place else [-7.0] * N)
            send = MPI.IN_PLACE if place else _form(base, mine)[0]
            getattr(comm, call)(send, recv, MPI.SUM)
            want = {"Allreduce": size, "Scan": rank + 1, "Exscan": rank}[call]
            if want:
                assert read() == fold(want)
            break  # (no root)


CALLS = ["Bcast", "Gather", "Allgather", "Scatter", "Reduce", "Allreduce", "Scan", "Exscan"]


EXCHANGES = ["Alltoall", "Alltoallv"]


def _entries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Python lanes' entries (Area.call, Area.run) entered from now on."""
    entered: list[str] = []

    def entry(name: str) -> Callable[..., bool]:
        general = getattr(area.Area, name)
        return lambda self, *args: entered.append(name) or general(self, *args)

    for name in ("call", "run"):
        monkeypatch.setattr(area.Area, name, entry(name))
    return entered


def _c_front_on(comm: MPI.Intracomm) -> None:
    """Bind `comm`'s collective area (a Barrier); skip the test where no C front runs there
    (no area: one rank; or the Python steps only: IVSHMEM_COMM_PUREPYTHON)."""
    comm.Barrier()
    shared = area.current(comm)
    if shared is None or not shared.ready():
        pytest.skip("no area here (one rank) or the Python steps only (IVSHMEM_COMM_PUREPYTHON)")


@pytest.mark.parametrize("form", ["numpy", "mmap", "double", "in_place"])
@pytest.mark.parametrize(
    "call",
    [
        *CALLS,
        *("Scatterv", "Reduce_scatter_block", "Reduce_scatter", "Gatherv", "Allgatherv"),
        *EXCHANGES,
    ],
)
def test_every_form_is_one_c_call(comm, monkeypatch, call, form):
    """Each call completes one area collective without Area.call or Area.run (the Python
    lanes' entries): the C front took it, and the data are right."""
    if form == "in_place" and call == "Bcast":
        pytest.skip("Bcast has no IN_PLACE")
    _c_front_on(comm)
    entered = _entries(monkeypatch)
    before = area.completed(comm)
    if call in EXCHANGES:
        _alltoall(call, form, comm)
    else:
        (_run_v if call in ("Gatherv", "Allgatherv") else _run)(call, form, comm)
    rooted = ("Bcast", "Gather", "Gatherv", "Allgather", "Reduce", "Scatter", "Scatterv")
    rounds = comm.Get_size() if call in rooted else 1
    assert (entered, area.completed(comm) - before) == ([], rounds)


def _mmap_of(data: bytes) -> mmap.mmap:
    raw = mmap.mmap(-1, len(data))
    raw[:] = data
    return raw


# buffers on their own that are not numpy arrays, over given bytes (their datatype their
# format's: BYTE, DOUBLE)
BARE: dict[str, Callable[[bytes], Any]] = {
    "bytearray": bytearray,
    "array": lambda data: array.array("d", data),
    "mmap": _mmap_of,
    "memoryview": lambda data: memoryview(bytearray(data)),
}


@pytest.mark.parametrize("form", sorted(BARE))
@pytest.mark.parametrize("call", ["Bcast", "Gather", "Allgather", "Scatter", "Alltoall"])
def test_a_bare_buffer_moves_in_one_c_call(comm, monkeypatch, call, form):
    """A buffer on its own that is not a numpy array (bytearray, array.array, mmap,
    memoryview) takes the moving collectives' C front as a numpy array does: one area round
    a root, without Area.call or Area.run (where the C front runs), and the data are right
    (on every path)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    make = BARE[form]

    def block(sender: int, receiver: int = 0) -> bytes:  # 8 bytes: one double
        return bytes(sender * 10 + receiver + i for i in range(8))

    comm.Barrier()
    shared = area.current(comm)
    c_front = shared is not None and shared.ready()
    entered = _entries(monkeypatch)
    before = area.completed(comm)
    for root in range(size) if call in ("Bcast", "Gather", "Scatter") else [0]:
        if call == "Bcast":
            buf = make(block(root) if rank == root else bytes(8))
            comm.Bcast(buf, root)
            assert bytes(buf) == block(root)
        elif call in ("Gather", "Allgather"):
            gathers = call == "Allgather" or rank == root
            recv = make(bytes(8 * size)) if gathers else None
            if call == "Gather":
                comm.Gather(make(block(rank)), recv, root)
            else:
                comm.Allgather(make(block(rank)), recv)
            if gathers:
                assert bytes(recv) == b"".join(block(q) for q in range(size))
        elif call == "Scatter":
            every = make(b"".join(block(q) for q in range(size))) if rank == root else None
            recv = make(bytes(8))
            comm.Scatter(every, recv, root)
            assert bytes(recv) == block(rank)
        else:
            recv = make(bytes(8 * size))
            comm.Alltoall(make(b"".join(block(rank, q) for q in range(size))), recv)
            assert bytes(recv) == b"".join(block(q, rank) for q in range(size))
    if c_front:
        rounds = size if call in ("Bcast", "Gather", "Scatter") else 1
        assert (entered, area.completed(comm) - before) == ([], rounds)


# counts and displacements as codes pass them (mpi4py's demo osu_alltoallv.py: array('i'))
INTS: dict[str, Callable[[list[int]], Any]] = {
    "list": list,
    "array": lambda values: array.array("i", values),
    "numpy": lambda values: np.array(values, np.int64),
}


@pytest.mark.parametrize("ints", sorted(INTS))
@pytest.mark.parametrize("call", ["Alltoallv", "Allgatherv", "Gatherv", "Scatterv"])
def test_vector_counts_of_every_kind_are_one_c_call(comm, monkeypatch, call, ints):
    """A vector collective whose counts and displacements are a list, an array.array('i') or
    a numpy integer array (as `[buf, (counts, displs), MPI.BYTE]`) runs in one C call and one
    area round a root where the C front runs, with the right data (on every path)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    n = 3  # bytes of each block

    def block(sender: int, receiver: int) -> bytes:
        return bytes((sender * 16 + receiver * 4 + i) % 256 for i in range(n))

    def spec(data: bytes) -> list[Any]:
        displs = INTS[ints]([q * n for q in range(size)])
        return [bytearray(data), (INTS[ints]([n] * size), displs), MPI.BYTE]

    comm.Barrier()
    shared = area.current(comm)
    c_front = shared is not None and shared.ready()
    entered = _entries(monkeypatch)
    before = area.completed(comm)
    roots = range(size) if call in ("Gatherv", "Scatterv") else [0]
    for root in roots:
        if call == "Alltoallv":
            recv = spec(bytes(n * size))
            comm.Alltoallv(spec(b"".join(block(rank, q) for q in range(size))), recv)
            want = b"".join(block(q, rank) for q in range(size))
        elif call == "Allgatherv":
            recv = spec(bytes(n * size))
            comm.Allgatherv([bytearray(block(rank, 0)), MPI.BYTE], recv)
            want = b"".join(block(q, 0) for q in range(size))
        elif call == "Gatherv":
            recv = spec(bytes(n * size)) if rank == root else None
            comm.Gatherv([bytearray(block(rank, root)), MPI.BYTE], recv, root)
            want = b"".join(block(q, root) for q in range(size))
        else:
            every = spec(b"".join(block(root, q) for q in range(size))) if rank == root else None
            recv = [bytearray(n), MPI.BYTE]
            comm.Scatterv(every, recv, root)
            want = block(root, rank)
        if recv is not None:
            assert bytes(recv[0]) == want
    if c_front:
        assert (entered, area.completed(comm) - before) == ([], len(roots))


@pytest.mark.parametrize("call", ["Barrier", "barrier"])
def test_a_barrier_is_one_c_call_and_waits_for_the_last(comm, monkeypatch, call):
    """Barrier and barrier complete one area round each without Area.call or Area.run (the C
    front took them), and no rank leaves one before the last rank came: rank 0 comes 0.2 s
    late, and every other rank's barrier lasts at least half of that."""
    _c_front_on(comm)
    entered = _entries(monkeypatch)
    before = area.completed(comm)
    getattr(comm, call)()
    start = time.monotonic()
    if comm.Get_rank() == 0:
        time.sleep(0.2)
    getattr(comm, call)()
    waited = time.monotonic() - start
    assert (entered, area.completed(comm) - before) == ([], 2)
    assert comm.Get_rank() == 0 or waited >= 0.1


def test_a_receive_posted_leaves_the_c_front_for_the_python_path(comm, monkeypatch):
    """With a receive posted (the engine not quiet: the C front reads Engine.queues), Bcast,
    Barrier and bcast step aside to the Python path (Area.call or Area.run, which move the
    engine's messages while they wait), right; then the receive completes. The sends wait
    for a second Barrier, entered once every rank checked its entries: a message sent as
    soon as its sender's bcast returned (a root does not wait) could complete the receive
    inside a slow member's first Barrier, and its bcast then rightly took the C front (a CI
    dry run under load failed so)."""
    _c_front_on(comm)
    size, rank = comm.Get_size(), comm.Get_rank()
    got = np.zeros(1)
    request = comm.Irecv(got, source=(rank - 1) % size, tag=77)
    assert not comm._engine.quiet(), "the posted receive left the engine quiet: nothing tested"
    entered = _entries(monkeypatch)
    buf = np.full(N, 3.0 if rank == 0 else -1.0)
    comm.Bcast(buf, 0)
    comm.Barrier()
    obj = comm.bcast({"rank": rank} if rank == 0 else None, 0)
    assert (buf.tolist(), obj) == ([3.0] * N, {"rank": 0})
    assert len(entered) == 3, entered
    comm.Barrier()
    comm.Send(np.full(1, rank + 0.5), dest=(rank + 1) % size, tag=77)
    request.Wait()
    assert got[0] == (rank - 1) % size + 0.5


def test_another_communicators_abandoned_collective_leaves_the_c_front_on(comm, monkeypatch):
    """A collective abandoned on another communicator (a bad root on every rank) leaves a
    record in the engine (COMM_WORLD's stay for good); this communicator's Bcast and Ibcast
    still run in the C front, right, at every root (the fronts stepped aside while the engine
    held any record, of any communicator: one argument error slowed every later collective)."""
    other = MPI.COMM_WORLD.Dup()
    try:
        with pytest.raises(MPI.Exception):
            other.Bcast(np.zeros(N), root=other.Get_size() + 5)
        comm.Barrier()  # (binds the area)
        shared = area.current(comm)
        if shared is None or not shared.ready():
            pytest.skip("no area here (one rank) or the Python steps only (PUREPYTHON)")
        assert comm._engine.abandoned, "the failed Bcast left no record: nothing tested"
        entered = _entries(monkeypatch)
        general = collectives._begun
        monkeypatch.setattr(
            collectives, "_begun", lambda *args: entered.append("_begun") or general(*args)
        )
        size, rank = comm.Get_size(), comm.Get_rank()
        before = area.completed(comm)
        for root in range(size):
            buf = np.full(N, float(root) if rank == root else -1.0)
            comm.Bcast(buf, root)
            assert buf.tolist() == [float(root)] * N
            buf = np.full(N, root + 0.5 if rank == root else -1.0)
            comm.Ibcast(buf, root).Wait()
            assert buf.tolist() == [root + 0.5] * N
        assert (entered, area.completed(comm) - before) == ([], 2 * size)
    finally:
        other.Free()


def test_small_broadcasts_between_the_c_round_and_the_python_steps(comm, monkeypatch):
    """A broadcast of at most collective.BCAST_INLINE bytes rides in the root's arrive line
    too, where the C round's members read it: it arrives right whichever side runs the
    group's Python steps (here one rank at a time, its C round set aside) and which the C
    round, at every root, for every size up to a little past that bound, Bcast and Ibcast."""
    _c_front_on(comm)
    size, rank = comm.Get_size(), comm.Get_rank()
    group = area.current(comm).group
    lengths = [*range(collective.BCAST_INLINE + 2), 64, 100]
    for steps in range(size):
        if rank == steps:
            monkeypatch.setattr(group, "_c", None)
        for root in range(size):
            for n in lengths:
                want = (np.arange(n) * (root + 3) + n + steps).astype(np.uint8)
                buf = want.copy() if rank == root else np.zeros(n, np.uint8)
                comm.Bcast(buf, root)
                raw = bytearray(want.tobytes() if rank == root else n)
                comm.Ibcast([raw, n, MPI.BYTE], root).Wait()
                assert (buf.tobytes(), bytes(raw)) == (want.tobytes(),) * 2, (steps, root, n)
        monkeypatch.undo()
        comm.Barrier()


@pytest.mark.parametrize("call", ["Gather", "Gatherv"])
def test_a_gather_over_a_slab_is_declined_in_c(comm, monkeypatch, call):
    """A Gather(v) with a block over one slab: the root and that block's member decline
    their round in the C front (no Area.call or Area.run, no round of theirs completed) and
    the messages move it, right, at every root. Gather: every block over the slab (its
    member declines without the root's word); Gatherv: one rank's block over it, the others
    small (theirs go through the area: their rounds complete, the root takes them there)."""
    comm.Barrier()
    shared = area.current(comm)
    if shared is None or not shared.ready():
        pytest.skip("no area here (one rank) or the Python steps only (IVSHMEM_COMM_PUREPYTHON)")
    size, rank = comm.Get_size(), comm.Get_rank()
    big = shared.group.slab_size // 8 + 1  # doubles
    entered = _entries(monkeypatch)
    before = area.completed(comm)
    small = 0  # rounds of this member's own within a slab (completed in the area)
    for root in range(size):
        if call == "Gather":
            counts = [big] * size
        else:
            counts = [big if q == (root + 1) % size else q + 1 for q in range(size)]
        displs = [sum(counts[:q]) for q in range(size)]
        recv = np.full(sum(counts), -1.0)
        spec = recv if call == "Gather" else [recv, counts, displs, MPI.DOUBLE]
        getattr(comm, call)(np.full(counts[rank], rank + 1.0), spec if rank == root else None, root)
        declines = rank == root or counts[rank] == big
        assert shared.group.declined == declines
        small += not declines
        if rank == root:
            assert recv.tolist() == [q + 1.0 for q in range(size) for _ in range(counts[q])]
    assert (entered, area.completed(comm) - before) == ([], small)


@pytest.mark.parametrize("call", ["Gather", "Gatherv"])
def test_a_block_over_a_slab_leaves_without_the_root(comm, call):
    """A member whose Gather(v) block is over a slab knows the root declines the round: its
    call returns (the block on its way by messages) without waiting for the root to enter,
    on the C round and on the steps alike (it waited for the root's word before); the root
    then gets every block."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()
    shared = area.current(comm)
    if shared is None or any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip("no area here (one rank, or members in several regions)")
    late = 1.0  # seconds the root enters after the others
    n = shared.group.slab_size // 8 + 1  # doubles
    recv = np.zeros(n * size)
    spec = recv if call == "Gather" else [recv, [n] * size, MPI.DOUBLE]
    comm.Barrier()
    if rank == 0:
        time.sleep(late)
    began = time.monotonic()
    getattr(comm, call)(np.full(n, rank + 1.0), spec, 0)
    took = time.monotonic() - began
    if rank == 0:
        assert recv.tolist() == [q + 1.0 for q in range(size) for _ in range(n)]
    else:
        assert took < late / 2, f"rank {rank} waited {took:.3f} s for the root"


@pytest.mark.parametrize("call", CALLS)
def test_over_a_slab_and_other_forms_take_the_python_path(comm, call):
    """What the C front leaves (a payload over one slab but a gather's, a derived
    datatype) still runs, with the right data."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()
    shared = area.current(comm)
    n = shared.group.slab_size // 8 + 4 if shared else 8  # doubles: over one slab
    pair = MPI.DOUBLE.Create_contiguous(2).Commit()
    try:
        for buf in (np.full(n, rank, np.float64), [np.full(2 * N, rank, np.float64), N, pair]):
            send = buf if isinstance(buf, np.ndarray) else buf[0]
            if call == "Bcast":
                comm.Bcast(buf, size - 1)
                assert (send == size - 1).all()
            elif call in ("Gather", "Allgather"):
                recv = np.zeros(send.size * size)
                spec = recv if isinstance(buf, np.ndarray) else [recv, N, pair]
                if call == "Gather":
                    comm.Gather(buf, spec, 0)
                else:
                    comm.Allgather(buf, spec)
                if call == "Allgather" or rank == 0:
                    assert recv.tolist() == [float(q) for q in range(size) for _ in send]
            elif call == "Scatter":  # (over a slab: more than the segment of each member)
                every = np.repeat(np.arange(size, dtype=np.float64), send.size)
                spec = every if isinstance(buf, np.ndarray) else [every, N, pair]
                send[:] = -1.0
                comm.Scatter(spec if rank == 0 else None, buf, 0)
                assert (send == rank).all()
            else:
                recv = np.zeros(send.size)
                spec = recv if isinstance(buf, np.ndarray) else [recv, N, pair]
                args = (buf, spec, MPI.SUM, 0) if call == "Reduce" else (buf, spec, MPI.SUM)
                getattr(comm, call)(*args)
                upto = {"Scan": rank + 1, "Exscan": rank}.get(call, size)
                if (call != "Reduce" or rank == 0) and upto:
                    assert (recv == sum(range(upto))).all()
    finally:
        pair.Free()


def _outcome(f: Callable[[], None]) -> Any:
    """What `f()` ended with: None, or the error (its class and message, an MPI error
    class)."""
    try:
        f()
    except MPI.Exception as exc:
        return "MPI", exc.Get_error_class()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def test_refused_arguments_give_the_python_paths_errors(monkeypatch):
    """Bad arguments (a count past the end, a non-contiguous or read-only buffer, a bad root,
    mismatched operands, an op C does not fold) end as they do without the C front, on every
    rank; the communicator goes on working."""
    if any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip("an abandoned collective is told over shared memory only (issue #11)")
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    readonly = np.zeros(N)
    readonly.flags.writeable = False
    strided = np.zeros(2 * N)[::2]
    whole = np.zeros(N * size)  # (N doubles per rank)
    readonly_blocks = np.zeros(N * size)
    readonly_blocks.flags.writeable = False
    cases: list[Callable[[], None]] = [
        lambda: comm.Bcast([bytearray(4), 8, MPI.BYTE], 0),
        lambda: comm.Bcast(strided, 0),
        lambda: comm.Bcast(readonly, 0),
        lambda: comm.Bcast(np.zeros(N), size),
        lambda: comm.Allreduce(np.zeros(N), readonly),
        lambda: comm.Allreduce(np.zeros(N), np.zeros(N + 1)),
        lambda: comm.Allreduce(np.zeros(N), np.zeros(N, np.float32)),
        lambda: comm.Reduce(np.zeros(N), np.zeros(N), MPI.SUM, -1),
        lambda: comm.Reduce(np.zeros(N), readonly, MPI.SUM, 0),
        lambda: comm.Gather(np.zeros(N), np.zeros(N * size - 1), 0),
        lambda: comm.Allgather(np.zeros(N), np.zeros(N * size)[::-1]),
        lambda: comm.Allgather([bytearray(8), 8, MPI.BYTE], [bytearray(8 * size), 16, MPI.BYTE]),
        lambda: comm.Gatherv(np.zeros(1), [np.zeros(size), [1] * (size + 1), MPI.DOUBLE], 0),
        lambda: comm.Gatherv(np.zeros(1), [np.zeros(size), [1] * size, [-1] * size, MPI.DOUBLE]),
        lambda: comm.Gatherv(np.zeros(1), [readonly, ([1] * size, [0] * size), MPI.DOUBLE], 0),
        lambda: comm.Allgatherv(np.zeros(1), [np.zeros(size), [True] * size, MPI.DOUBLE]),
        lambda: comm.Allgatherv(np.zeros(2), [np.zeros(size), [1] * size, MPI.DOUBLE]),
        lambda: comm.Allgatherv(
            np.zeros(1), [np.zeros(size), [1] * size, [0] * (size - 1) + [size], MPI.DOUBLE]
        ),
        lambda: comm.Allgatherv(MPI.IN_PLACE, [strided, [1] * size, MPI.DOUBLE]),
        lambda: comm.Scatter(np.zeros(N * size - 1), np.zeros(N), 0),
        lambda: comm.Scatter(np.zeros(N * size), np.zeros(N + 1), 0),
        lambda: comm.Scatter(np.zeros(N * size), readonly, 0),
        lambda: comm.Scatter(np.zeros(N * size), np.zeros(N), size),
        lambda: comm.Scatter([bytearray(8 * size), 9, MPI.BYTE], bytearray(8), 0),
        lambda: comm.Scatterv([np.zeros(N * size), [N + 1] * size, MPI.DOUBLE], np.zeros(N), 0),
        lambda: comm.Scatterv(
            [np.zeros(N * size), [N] * (size - 1) + [-1], MPI.DOUBLE], np.zeros(N), 0
        ),
        lambda: comm.Scatterv(
            [np.zeros(N * size), [N] * size, [0] * size, MPI.DOUBLE], np.zeros(N + rank), 0
        ),
        lambda: comm.Scatterv([np.zeros(N * size), [N] * (size + 1), MPI.DOUBLE], np.zeros(N), 0),
        lambda: comm.Scatterv([np.zeros(N * size), (N,) * size, MPI.DOUBLE], np.zeros(N), 0),
        lambda: comm.Scatterv(
            [np.zeros(N * size), [N] * size, [2**70] * size, MPI.DOUBLE], np.zeros(N), 0
        ),
        lambda: comm.Scan(np.zeros(N), np.zeros(N), MPI.BXOR),
        lambda: comm.Exscan([bytearray(8), 9, MPI.BYTE], np.zeros(1), MPI.SUM),
        lambda: comm.Reduce_scatter(np.zeros(N * size), np.zeros(N), [N] * (size + 1)),
        lambda: comm.Reduce_scatter(np.zeros(N * size), np.zeros(N), [N] * (size - 1) + [-1]),
        lambda: comm.Reduce_scatter(MPI.IN_PLACE, np.zeros(N * size)),
        lambda: comm.Reduce_scatter_block(MPI.IN_PLACE, np.zeros(N * size + 1)),
        lambda: comm.Reduce_scatter_block(np.zeros(N * size), np.zeros(N + 1)),
        lambda: comm.Reduce_scatter_block(np.zeros(N * size), readonly),
        lambda: comm.Alltoall((array.array("d", bytes(8 * N * size + 8)), MPI.DOUBLE), whole),
        lambda: comm.Alltoall(whole, np.zeros(N * size + 1)),
        lambda: comm.Alltoall(whole, readonly_blocks),
        lambda: comm.Alltoall(np.zeros(2 * N * size)[::2], whole),
        lambda: comm.Alltoall(
            [bytearray(8 * size), 9, MPI.BYTE], [bytearray(8 * size), 8, MPI.BYTE]
        ),
        lambda: comm.Alltoallv(whole, readonly_blocks),
        lambda: comm.Alltoallv(MPI.IN_PLACE, [readonly_blocks, [N] * size, MPI.DOUBLE]),
        lambda: comm.Alltoallv(
            [whole, [N] * size, MPI.DOUBLE], [whole, [N] * (size + 1), MPI.DOUBLE]
        ),
        lambda: comm.Alltoallv(whole, [whole, [N] * (size - 1) + [-1], MPI.DOUBLE]),
        lambda: comm.Alltoallv(
            whole, [whole, [N] * size, [0] * (size - 1) + [N * size], MPI.DOUBLE]
        ),
        lambda: comm.Alltoallv(whole, [whole, ([N] * size, [0] * size), MPI.INT]),
        lambda: comm.Alltoallv([whole, [N] * size, [True] * size, MPI.DOUBLE], whole),
        lambda: comm.Alltoallv(
            [whole, [N] * size, MPI.DOUBLE], [np.zeros((N + 1) * size), N + 1, MPI.DOUBLE]
        ),
    ]
    seen = []
    for case in cases:
        seen.append(_outcome(case))
        comm.Barrier()
    monkeypatch.setattr(collectives, "_c_front", lambda *args: False)
    for case, got in zip(cases, seen, strict=True):
        assert _outcome(case) == got
        comm.Barrier()
    monkeypatch.undo()
    buf = np.full(N, comm.Get_rank(), np.float64)
    comm.Bcast(buf, size - 1)
    assert (buf == size - 1).all()
