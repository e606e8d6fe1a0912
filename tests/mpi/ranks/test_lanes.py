"""The collectives' fast lanes (guest_lib/mpi/collectives.py: one C call of the collective
area) with `[buf, count, datatype]` specs whose count is below the buffer's length.

mpi4py reads that count as the whole message in Bcast/Reduce/Allreduce and as one rank's
block where the argument holds a block per rank (Gather's and Allgather's receive, Scatter's
send, both of Alltoall). Each case runs through the public call and then through its lane
alone (where the area is bound and the C accelerator built), and checks the data and that
the elements after the count stay as they were.
"""

from __future__ import annotations

import array
import mmap
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI, area, collectives
from guest_lib.mpi.fastpath import other_threads

COUNT = 3  # elements of a message (of one rank's block in a block collective)
SPARE = 5  # elements after them in every buffer, which no collective may touch
UNTOUCHED = -9

Case = tuple[tuple[Any, ...], Callable[[], None]]


def _buf(values: list[int], total: int) -> array.array:
    return array.array("i", values + [UNTOUCHED] * (total - len(values)))


def _tail_kept(buf: array.array, used: int) -> None:
    assert list(buf[used:]) == [UNTOUCHED] * (len(buf) - used)


def _case(call: str, comm: MPI.Intracomm) -> Case:
    """The arguments of `call` on this rank and the check of its results."""
    size, rank = comm.Get_size(), comm.Get_rank()
    root, n = size - 1, COUNT
    values = [10 * rank + k for k in range(n)]
    if call == "Bcast":
        buf = _buf([7 + k for k in range(n)] if rank == root else [], n + SPARE)

        def bcast() -> None:
            assert list(buf[:n]) == [7 + k for k in range(n)]
            _tail_kept(buf, n)

        return ([buf, n, MPI.INT], root), bcast
    if call in ("Reduce", "Allreduce"):
        send = _buf(values, n + SPARE)
        want = call == "Allreduce" or rank == root
        recv = _buf([], n + SPARE)

        def reduce() -> None:
            if want:
                assert list(recv[:n]) == [sum(10 * r + k for r in range(size)) for k in range(n)]
            _tail_kept(recv, n if want else 0)

        recvspec = [recv, n, MPI.INT] if want else None
        extra = (MPI.SUM,) if call == "Allreduce" else (MPI.SUM, root)
        return ([send, n, MPI.INT], recvspec, *extra), reduce
    if call in ("Gather", "Allgather"):
        send = _buf(values, n + SPARE)
        want = call == "Allgather" or rank == root
        recv = _buf([], size * n + SPARE)

        def gather() -> None:
            if want:
                assert list(recv[: size * n]) == [10 * r + k for r in range(size) for k in range(n)]
            _tail_kept(recv, size * n if want else 0)

        recvspec = [recv, n, MPI.INT] if want else None
        at: tuple[int, ...] = () if call == "Allgather" else (root,)
        return ([send, n, MPI.INT], recvspec, *at), gather
    if call == "Scatter":
        every = [100 * q + k for q in range(size) for k in range(n)]
        send = _buf(every, size * n + SPARE)
        recv = _buf([], n + SPARE)

        def scatter() -> None:
            assert list(recv[:n]) == [100 * rank + k for k in range(n)]
            _tail_kept(recv, n)

        sendspec = [send, n, MPI.INT] if rank == root else None
        return (sendspec, [recv, n, MPI.INT], root), scatter
    assert call == "Alltoall"
    send = _buf([100 * rank + 10 * q + k for q in range(size) for k in range(n)], size * n + SPARE)
    recv = _buf([], size * n + SPARE)

    def alltoall() -> None:
        assert list(recv[: size * n]) == [
            100 * q + 10 * rank + k for q in range(size) for k in range(n)
        ]
        _tail_kept(recv, size * n)

    return ([send, n, MPI.INT], [recv, n, MPI.INT]), alltoall


@pytest.mark.parametrize(
    "call", ["Bcast", "Reduce", "Allreduce", "Gather", "Scatter", "Allgather", "Alltoall"]
)
def test_explicit_count_below_the_buffer(comm, call):
    """Only `count` elements move (per rank in a block collective), the rest of every buffer
    stays; the lane itself takes the spec (it declined every explicit count for a while, so
    Bcast lost the area's one-call path for that form)."""
    args, check = _case(call, comm)
    getattr(comm, call)(*args)
    check()
    shared = area.current(comm)
    if shared is None or not shared.ready():
        return  # one rank (no area), or the Python steps only (IVSHMEM_COMM_PUREPYTHON)
    args, check = _case(call, comm)
    lane = getattr(collectives, "_f_" + call.lower())
    assert lane(comm, shared, *args) is not collectives._SLOW
    check()


def _vector_case(call: str, comm: MPI.Intracomm, four: bool) -> Case:
    """`call` with explicit per-rank counts (rank q's block: q + 1 elements) at displacements
    with gaps between the blocks (block q at q * STRIDE), in the `[buf, (counts, displs),
    datatype]` form or (`four`) `[buf, counts, displs, datatype]`."""
    size, rank = comm.Get_size(), comm.Get_rank()
    root, stride = size - 1, size + 2
    counts = [q + 1 for q in range(size)]
    displs = [q * stride for q in range(size)]
    total = size * stride + SPARE

    def vspec(buf: array.array) -> list[Any]:
        return [buf, counts, displs, MPI.INT] if four else [buf, (counts, displs), MPI.INT]

    def blocks(value: Callable[[int, int], int]) -> array.array:
        """A vector buffer whose block q holds value(q, k), gaps UNTOUCHED."""
        buf = _buf([], total)
        for q in range(size):
            for k in range(counts[q]):
                buf[displs[q] + k] = value(q, k)
        return buf

    def same(got: array.array, want: array.array) -> None:
        assert list(got) == list(want)

    mine = [10 * rank + k for k in range(counts[rank])]
    if call in ("Gatherv", "Allgatherv"):
        want = call == "Allgatherv" or rank == root
        recv = _buf([], total)
        full = blocks(lambda q, k: 10 * q + k)
        send = _buf(mine, counts[rank] + SPARE)
        extra = () if call == "Allgatherv" else (root,)
        args = ([send, counts[rank], MPI.INT], vspec(recv) if want else None, *extra)
        return args, lambda: same(recv, full if want else _buf([], total))
    if call == "Scatterv":
        send = blocks(lambda q, k: 100 * q + k)
        recv = _buf([], counts[rank] + SPARE)
        want = _buf([100 * rank + k for k in range(counts[rank])], counts[rank] + SPARE)
        sendspec = vspec(send) if rank == root else None
        return (sendspec, [recv, counts[rank], MPI.INT], root), lambda: same(recv, want)
    assert call == "Alltoallv"
    # rank q sends counts[p] elements to rank p and receives counts[rank] from each: the
    # receive side's counts are all counts[rank] (at the same gapped displacements).
    send = blocks(lambda p, k: 100 * rank + 10 * p + k)
    rcounts = [counts[rank]] * size
    recv = _buf([], total)
    want = _buf([], total)
    for q in range(size):
        for k in range(counts[rank]):
            want[displs[q] + k] = 100 * q + 10 * rank + k
    rspec = [recv, rcounts, displs, MPI.INT] if four else [recv, (rcounts, displs), MPI.INT]
    return (vspec(send), rspec), lambda: same(recv, want)


@pytest.mark.parametrize("four", [False, True], ids=["counts-displs-tuple", "four-items"])
@pytest.mark.parametrize("call", ["Gatherv", "Scatterv", "Allgatherv", "Alltoallv"])
def test_vector_specs_take_the_lane(comm, call, four):
    """Explicit counts and displacements (uneven blocks, gaps left as they were) move the
    right bytes through the public call and through the lane itself, which takes these
    forms (buffers.plain_vector) rather than handing them to the collective's body."""
    args, check = _vector_case(call, comm, four)
    getattr(comm, call)(*args)
    check()
    shared = area.current(comm)
    if shared is None or not shared.ready():
        return  # one rank (no area), or the Python steps only (IVSHMEM_COMM_PUREPYTHON)
    args, check = _vector_case(call, comm, four)
    lane = getattr(collectives, "_f_" + call.lower()[:-1])
    assert lane(comm, shared, *args) is not collectives._SLOW
    check()


def test_another_communicators_abandoned_collective_leaves_the_lanes_on(comm):
    """A collective abandoned on another communicator (an argument error on every rank)
    leaves a record in the engine; the lanes of this communicator stay on (the blocking
    lanes looked at every record in the process and stayed off for good after one)."""
    other = comm.Dup()
    with pytest.raises(MPI.Exception):
        other.Bcast(array.array("i", [0]), root=comm.Get_size() + 5)
    other.Barrier()
    other.Free()
    comm.Barrier()  # (binds the area where it is not bound yet)
    shared = area.current(comm)
    if shared is None or shared.group._c is None:
        return  # one rank (no area), or the Python steps only (IVSHMEM_COMM_PUREPYTHON)
    assert comm._engine.abandoned, "the failed Bcast left no record: nothing tested"
    assert shared.ready()


def _form(form: str, count: int, fill: int) -> tuple[Any, Callable[[], list[int]]]:
    """A buffer of `count` bytes (`double`: count // 8 doubles) holding `fill` in the form
    `form`, and a reader of its values."""
    if form == "numpy":
        arr = np.full(count, fill, np.uint8)
        return arr, lambda: arr.tolist()
    if form == "mmap":
        raw = mmap.mmap(-1, count)
        raw.write(bytes([fill]) * count)
        return [raw, count, MPI.BYTE], lambda: list(raw[:])
    if form == "double":
        dbl = array.array("d", [float(fill)] * (count // 8))
        return (dbl, MPI.DOUBLE), lambda: [int(v) for v in dbl]
    ba = array.array("B", [fill] * count)
    return [ba, count, MPI.BYTE], lambda: list(ba)


@pytest.mark.parametrize("form", ["numpy", "mmap", "array", "double", "in_place", "pickle"])
@pytest.mark.parametrize("call", ["Bcast", "Gather", "Scatter", "Allgather"])
def test_common_forms_take_one_area_call(comm, area_runs, call, form):
    """Every buffer form a code passes on each call (and the pickle forms, scatter's too,
    and IN_PLACE, and a keyword root) runs as one C round of the area (`Area.call`) without
    the area's general entry (`Area.run`: its context manager and dispatch cost a few us per
    call; the pickle rounds took it until the exchange went straight to Area.call)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    if shared is None or not shared.ready():
        pytest.skip("no area here (one rank) or the Python steps only (IVSHMEM_COMM_PUREPYTHON)")
    if form == "in_place" and call == "Bcast":
        pytest.skip("Bcast has no IN_PLACE")
    entered = area_runs()
    root, n = size - 1, 16
    before = area.completed(comm)
    if form == "pickle":
        method = {"Bcast": comm.bcast, "Gather": comm.gather, "Allgather": comm.allgather}
        if other_threads():
            pytest.skip("another thread runs (e.g. --broker's client): Area.exchange locks")
        if call == "Allgather":
            assert comm.allgather(rank) == list(range(size))
        elif call == "Scatter":
            items = [(q, "s" * q) for q in range(size)] if rank == root else None
            assert comm.scatter(items, root=root) == (rank, "s" * rank)
        else:
            got = method[call](rank * 10, root=root)
            want = (
                (list(range(0, 10 * size, 10)) if rank == root else None)
                if call == "Gather"
                else root * 10
            )
            assert got == want
    else:
        base = "numpy" if form == "in_place" else form
        if call == "Bcast":
            buf, read = _form(base, n, 7 if rank == root else 0)
            comm.Bcast(buf, root=root)
            assert read() == [7] * len(read())
        elif call in ("Gather", "Allgather"):
            everyone = call == "Allgather" or rank == root
            mine, _ = _form(base, n, rank + 1)
            recv, read = _form(base, n * size, 0)
            if form == "in_place" and everyone:
                recv[rank * n : (rank + 1) * n] = rank + 1
                mine = MPI.IN_PLACE
            if form not in ("numpy", "in_place") and isinstance(recv, list):
                recv[1] = n  # (a block form's count is one rank's block)
            if call == "Allgather":
                comm.Allgather(mine, recv)
            else:
                comm.Gather(mine, recv if everyone else None, root=root)
            if everyone:
                per = len(read()) // size
                assert read() == [q + 1 for q in range(size) for _ in range(per)]
        else:
            every, _ = _form(base, n * size, 0)
            if rank == root:
                every = _filled(base, n, size)
            if isinstance(every, list):
                every[1] = n
            mine, read = _form(base, n, 0)
            if form == "in_place" and rank == root:
                comm.Scatter(every, MPI.IN_PLACE, root=root)
            else:
                comm.Scatter(every if rank == root else None, mine, root=root)
                per = len(read())
                assert read() == [rank + 1] * per
    assert not entered, f"{call} ({form}) took Area.run: {entered}"
    assert area.completed(comm) == before + 1


@pytest.mark.parametrize("call", ["bcast", "gather", "scatter", "allgather", "alltoall"])
def test_object_collectives_take_the_c_front(comm, monkeypatch, call):
    """A lowercase collective on the common path (area bound with its C accelerator, no
    other thread) runs its round through CollectiveRound.front in its front, without its
    body (the lock, the collective instance and Area.exchange cost a few us per call)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    if shared is None or not shared.ready():
        pytest.skip("no area here (one rank) or the Python steps only (IVSHMEM_COMM_PUREPYTHON)")
    if other_threads():
        pytest.skip("another thread runs (e.g. --broker's client): the body takes the lock")
    entered: list[str] = []
    general = area.Area.exchange
    monkeypatch.setattr(
        area.Area, "exchange", lambda self, *a: entered.append(a[0]) or general(self, *a)
    )
    root = size - 1
    before = area.completed(comm)
    if call == "bcast":
        assert comm.bcast({"k": [root]} if rank == root else None, root) == {"k": [root]}
    elif call == "gather":
        got = comm.gather(("g", rank), root)
        assert got == ([("g", q) for q in range(size)] if rank == root else None)
    elif call == "scatter":
        items = [("s", q) for q in range(size)] if rank == root else None
        assert comm.scatter(items, root) == ("s", rank)
    elif call == "allgather":
        assert comm.allgather(rank * 3) == [q * 3 for q in range(size)]
    else:
        assert comm.alltoall([(rank, q) for q in range(size)]) == [(q, rank) for q in range(size)]
    assert not entered, f"{call} took Area.exchange: {entered}"
    assert area.completed(comm) == before + 1


def test_a_malformed_bundle_in_the_area_names_its_sender(comm):
    """A scatter's bundle whose offsets run past its end (a hostile root: here its bytes
    published as they are) raises, on the members taking their piece of it in C, an
    MPI.Exception naming the collective slot's bundle; the communicator goes on (messages)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    dup = comm.Dup()
    dup.Barrier()  # (binds its area)
    shared = area.current(dup)
    if shared is None or not shared.ready() or other_threads():
        dup.Free()
        pytest.skip("no area, the Python steps only, or another thread (the body's way)")
    if rank == 0:
        forged = memoryview(struct.pack(f"<{size}Q", *[1 << 40] * size) + b"x")
        assert collectives._o_round(dup, collectives.F_BCAST_BYTES, forged, 0) is not None
    else:
        with pytest.raises(MPI.Exception, match="bundle"):
            dup.scatter(None, 0)
    comm.Barrier()
    assert dup.allgather(rank) == list(range(size))
    dup.Free()


def _filled(form: str, n: int, size: int) -> Any:
    """A scatter's send buffer: block q (n bytes) holds q + 1, in the form `form`."""
    values = [q + 1 for q in range(size) for _ in range(n if form != "double" else n // 8)]
    if form == "numpy":
        return np.array(values, np.uint8)
    if form == "double":
        return (array.array("d", [float(v) for v in values]), MPI.DOUBLE)
    if form == "mmap":
        raw = mmap.mmap(-1, n * size)
        raw.write(bytes(values))
        return [raw, n, MPI.BYTE]
    return [array.array("B", values), n, MPI.BYTE]


def _bytes_form(form: str, data: np.ndarray, count: int | None = None) -> Any:
    """`data` (uint8) in the form `form` (numpy, mmap, double: whole doubles), with `count`
    elements in the spec where given (a block form's count: one block)."""
    if form == "numpy":
        return data
    if form == "double":
        dbl = array.array("d", data.tobytes())
        return (dbl, MPI.DOUBLE) if count is None else [dbl, count // 8, MPI.DOUBLE]
    raw = mmap.mmap(-1, max(1, len(data)))
    raw.write(data.tobytes())
    return [raw, len(data) if count is None else count, MPI.BYTE]


def _read_form(buf: Any) -> bytes:
    """The bytes of a buffer made by _bytes_form."""
    if isinstance(buf, np.ndarray):
        return buf.tobytes()
    obj = buf[0]
    nbytes = buf[1] * (8 if buf[-1] == MPI.DOUBLE else 1) if len(buf) == 3 else None
    return (obj.tobytes() if isinstance(obj, array.array) else bytes(obj))[:nbytes]


@pytest.mark.parametrize("form", ["numpy", "mmap", "double", "in_place"])
@pytest.mark.parametrize("call", ["Scatter", "Scatterv"])
def test_scatter_over_a_segment_declines_in_one_area_call(comm, monkeypatch, call, form):
    """Scatter(v) whose blocks do not all fit two of one member's segments of a slab (one
    per cell; up to two they take two rounds of the C call, see
    test_scatter_takes_the_cells_rounds): the C round declines it (the root says so, every
    member learns it in that one round: the C front's, collectives._c_front, or `Area.call`
    where an abandoned collective of another communicator is on record; never the area's
    Python steps through `Area.run`) and the blocks go by messages, in every buffer form and
    IN_PLACE at the root; Scatterv with uneven counts, the root's own block empty and one
    block over two segments."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    lane = shared is not None and shared.ready()
    seg = shared.group._scatter_segment() if shared is not None else 1 << 15
    if call == "Scatter":
        counts = [2 * seg + 8] * size
    else:  # rank 0 (the root) none (a double: one; an empty `(buf, DOUBLE)` takes the
        # collective's body), then 8, 16, ... bytes more, the last rank over two segments
        first = 8 if form == "double" else 0
        counts = [first + 8 * q for q in range(size - 1)] + [2 * seg + 8]
    gap = 0 if call == "Scatter" else 8
    displs = [sum(counts[:q]) + gap * q for q in range(size)]
    every = np.zeros(displs[-1] + counts[-1], np.uint8)
    for q in range(size):
        every[displs[q] : displs[q] + counts[q]] = (np.arange(counts[q]) + 7 * q) % 251
    want = every[displs[rank] : displs[rank] + counts[rank]].tobytes()
    base = "numpy" if form == "in_place" else form
    calls: list[str] = []
    for name in ("run", "call"):
        general = getattr(area.Area, name)
        monkeypatch.setattr(
            area.Area, name, lambda self, *a, _f=general, _n=name: calls.append(_n) or _f(self, *a)
        )
    before = shared.group._round if lane else 0
    if rank == 0:
        send = _bytes_form(base, every, counts[0] if call == "Scatter" else None)
        if call == "Scatterv":
            unit = 8 if form == "double" else 1
            obj = send[0] if isinstance(send, (list, tuple)) else send
            kind = MPI.DOUBLE if form == "double" else MPI.BYTE
            send = [obj, [c // unit for c in counts], [d // unit for d in displs], kind]
        if form == "in_place":
            getattr(comm, call)(send, MPI.IN_PLACE, root=0)
            assert _read_form(send) == every.tobytes()  # (the root's block stays)
        else:
            recv = _bytes_form(base, np.zeros(counts[0], np.uint8))
            getattr(comm, call)(send, recv, root=0)
            assert _read_form(recv) == want
    else:
        recv = _bytes_form(base, np.zeros(counts[rank], np.uint8))
        getattr(comm, call)(None, recv, root=0)
        assert _read_form(recv) == want
    if lane:
        assert calls in ([], ["call"]), f"{call} ({form}) over two segments: {calls}"
        assert (shared.group._round - before, shared.group.declined) == (1, True)
    comm.Barrier()
    if lane:
        assert area.current(comm) is shared  # (declining is no failure)


@pytest.mark.parametrize("in_place", [False, True], ids=["recvbuf", "in_place"])
def test_scatter_segment_leaves_out_the_root(comm, monkeypatch, in_place):
    """Scatter's blocks fill the root's slab split among the others only (the root sends
    itself nothing through it): blocks of a whole such segment (at 2 ranks: the whole slab,
    twice what a split among all members gives) move in the area's one C round, not
    declined (`Area.completed` counts it), the root's own block where it belongs."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    if shared is None or not shared.ready():
        pytest.skip("no area here (one rank) or the Python steps only (IVSHMEM_COMM_PUREPYTHON)")
    n = shared.group._scatter_segment()
    assert n >= shared.group.slab_size * 9 // 10 // (size - 1)
    root = size - 1
    every = (np.arange(n * size) % 253).astype(np.uint8)
    got = np.zeros(n, np.uint8)
    general = area.Area.run
    entered: list[str] = []
    monkeypatch.setattr(
        area.Area, "run", lambda self, *a: entered.append(a[0]) or general(self, *a)
    )
    before = area.completed(comm)
    if rank == root and in_place:
        comm.Scatter(every.copy(), MPI.IN_PLACE, root=root)
    else:
        comm.Scatter(every if rank == root else None, got, root=root)
        assert np.array_equal(got, every[rank * n : (rank + 1) * n])
    assert not entered and area.completed(comm) == before + 1


def _odd_scatterv(
    comm: Any, counts: list[int], root: int, in_place: bool, rng: np.random.Generator
) -> None:
    """Scatterv of random bytes from `root`, block q counts[q] bytes at an odd offset (3
    bytes more before each); every member checks that its block arrived whole and that the
    9 bytes after it stayed, the root IN_PLACE that its send buffer stayed."""
    rank = comm.Get_rank()
    displs = [sum(counts[:q]) + 3 * (q + 1) for q in range(len(counts))]
    every = rng.integers(0, 256, displs[-1] + counts[-1] + 5, dtype=np.uint8)
    got = np.full(counts[rank] + 9, 77, np.uint8)
    if rank == root:
        send = [every, counts, displs, MPI.BYTE]
        if in_place:
            kept = every.copy()
            comm.Scatterv(send, MPI.IN_PLACE, root=root)
            assert np.array_equal(every, kept)
            return
        comm.Scatterv(send, [got, counts[rank], MPI.BYTE], root=root)
    else:
        comm.Scatterv(None, [got, counts[rank], MPI.BYTE], root=root)
    mine = every[displs[rank] : displs[rank] + counts[rank]]
    assert np.array_equal(got[: counts[rank]], mine), (root, counts)
    assert (got[counts[rank] :] == 77).all()


@pytest.mark.parametrize("crowded", [False, True], ids=["spare_cpus", "crowded"])
@pytest.mark.parametrize("in_place", [False, True], ids=["recvbuf", "in_place"])
def test_scatter_takes_the_cells_rounds(comm, monkeypatch, in_place, crowded):
    """Whether or not the group is crowded (CollectiveGroup._yield: ranks outnumber CPUs,
    set here on every member), a Scatterv whose largest block (but the root's) takes two
    segments moves in two rounds of the area, a segment of every block each (the root never
    waits for a reader's copy, a reader copies one cell while the root fills the next;
    crowded, messages would also wake each reader once per piece), not declined:
    blocks of odd lengths from one byte over a segment to two whole segments, at odd
    offsets, arrive whole (the bytes after each stay), the root's own block (over two
    segments: it never goes through the slab) where it belongs, at every root, on the C
    round and on the Python steps, blocking and started (Iscatterv); a block of more than
    two segments still declines the round and goes by messages."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    if shared is not None:
        monkeypatch.setattr(shared.group, "_yield", crowded)
    seg = shared.group._scatter_segment() if shared is not None else 1 << 15
    rng = np.random.default_rng(11)
    for root in range(size):
        for extra in (1, seg, seg + 1):  # the largest: two segments and a byte = 3 rounds
            counts = [seg + (extra if q == (root + 1) % size else 1 + 37 * q) for q in range(size)]
            counts[root] = 2 * seg + 5
            before = shared.group._round if shared is not None else 0
            _odd_scatterv(comm, counts, root, in_place, rng)
            if shared is not None:  # (declined: one round, then the messages)
                rounds = (shared.group._round - before, shared.group.declined)
                assert rounds == ((1, True) if extra > seg else (2, False)), (root, extra)
    counts = [2 * seg - q for q in range(size)]  # Iscatterv: the same two rounds, started
    displs = [sum(counts[:q]) for q in range(size)]
    every = rng.integers(0, 256, sum(counts), dtype=np.uint8)
    got = np.zeros(counts[rank], np.uint8)
    comm.Iscatterv([every, counts, displs, MPI.BYTE] if rank == 0 else None, got, root=0).Wait()
    assert np.array_equal(got, every[displs[rank] : displs[rank] + counts[rank]])
    comm.Barrier()
    assert area.current(comm) is shared  # (neither way is a failure)


@pytest.mark.parametrize("in_place", [False, True], ids=["recvbuf", "in_place"])
def test_scatter_streamed_blocks_arrive_whole(comm, in_place):
    """Scatterv blocks of 16 KiB and more go into the root's slab with stores that bypass the
    caches (_fastpath.c COLL_STREAM_MIN), the root's own block copied after the others'
    are out: blocks of odd lengths just under, at and over that size, at odd offsets of the
    send buffer, arrive whole at every member (the bytes after each stay), the root's where
    it belongs, at every root (the Python steps move the same blocks)."""
    size = comm.Get_size()
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    seg = shared.group._scatter_segment() if shared is not None else 1 << 16
    rng = np.random.default_rng(7)
    for root in range(size):
        counts = [min(seg, (1 << 14) - 1 + 29 * ((q + root) % size)) for q in range(size)]
        _odd_scatterv(comm, counts, root, in_place, rng)


@pytest.mark.parametrize("in_place", [False, True], ids=["recvbuf", "in_place"])
def test_alltoallv_streamed_blocks_arrive_whole(comm, in_place):
    """Alltoallv blocks of 16 KiB and more go into the sender's slab with stores that bypass
    the caches (_fastpath.c COLL_STREAM_MIN), each member's own block copied after the others'
    are out: blocks of odd lengths just under, at and over that size (rank r to rank q: the
    same both ways, for IN_PLACE), at odd offsets, arrive whole (the bytes between them stay),
    the own block where it belongs (the Python steps move the same blocks)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    seg = shared.group._scatter_segment() if shared is not None else 1 << 16

    def count(r: int, q: int) -> int:
        return min(seg, (1 << 14) - 1 + 29 * ((r + q) % 3))

    counts = [count(rank, q) for q in range(size)]
    displs = [sum(counts[:q]) + 3 * (q + 1) for q in range(size)]
    total = displs[-1] + counts[-1] + 5

    def block(r: int, q: int) -> np.ndarray:  # what rank r sends rank q
        return np.random.default_rng(1000 * r + q).integers(0, 256, count(r, q), dtype=np.uint8)

    send = np.full(total, 77, np.uint8)
    for q in range(size):
        send[displs[q] : displs[q] + counts[q]] = block(rank, q)
    want = np.full(total, 77, np.uint8)
    for q in range(size):
        want[displs[q] : displs[q] + counts[q]] = block(q, rank)
    if in_place:
        comm.Alltoallv(MPI.IN_PLACE, [send, counts, displs, MPI.BYTE])
        assert np.array_equal(send, want)
    else:
        recv = np.full(total, 77, np.uint8)
        comm.Alltoallv([send, counts, displs, MPI.BYTE], [recv, counts, displs, MPI.BYTE])
        assert np.array_equal(recv, want)
