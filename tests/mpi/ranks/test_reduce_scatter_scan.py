"""Reduce_scatter, Reduce_scatter_block, Scan and Exscan through the collective area's one
C round (guest_lib/mpi/collectives.py: their fast lanes, as Allreduce's; the nonblocking
forms' started lanes).

Data at odd counts (uneven blocks, empty ones), every buffer form the lanes take (numpy
arrays, `[buf, count, datatype]`, `(buf, datatype)`), IN_PLACE, recvcounts given or not
(mpi4py: each rank's recvbuf count), on COMM_SELF, COMM_WORLD, a Dup and a reordered
subcommunicator. Where the area is bound with its C accelerator, each call must be one
area round (two for Reduce_scatter without recvcounts: the counts, then the fold), and the
lanes themselves must take the call rather than hand it to the collective's body.
"""

from __future__ import annotations

import array
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI, area, collectives

DTYPES = [np.float64, np.int32, np.uint8, np.float32, np.int64, np.int16]
FORMS = ["numpy", "list", "tuple"]
MPI_TYPES = {"f8": "DOUBLE", "i4": "INT", "u1": "UNSIGNED_CHAR", "f4": "FLOAT", "i8": "INT64_T",
             "i2": "SHORT"}  # fmt: skip


@pytest.fixture(params=["COMM_SELF", "COMM_WORLD", "Dup", "reversed"])
def any_comm(request: pytest.FixtureRequest) -> Iterator[MPI.Intracomm]:
    """COMM_SELF, COMM_WORLD, a Dup, and a Split of COMM_WORLD in reverse rank order."""
    world = MPI.COMM_WORLD
    if request.param in ("COMM_SELF", "COMM_WORLD"):
        yield getattr(MPI, request.param)
    else:
        comm = world.Dup() if request.param == "Dup" else world.Split(0, -world.Get_rank())
        yield comm
        comm.Free()
    world.Barrier()


def _spec(values: np.ndarray, form: str) -> Any:
    """`values` as a buffer argument of `form` (over the array's own memory)."""
    if form == "numpy":
        return values
    mtype = getattr(MPI, MPI_TYPES[values.dtype.str[1:]])
    return [values, len(values), mtype] if form == "list" else (values, mtype)


def _operand(rank: int, n: int, dtype: Any) -> np.ndarray:
    return ((np.arange(n) * 7 + 3 * rank) % 41).astype(dtype)


def _counts(size: int, odd: int) -> list[int]:
    """Uneven blocks: rank q gets (q * odd + 1) % 5 elements (some get none)."""
    return [(q * odd + 1) % 5 + (odd if q == size - 1 else 0) for q in range(size)]


# (dtype, nonblocking): every type blocking, a few through the nonblocking form (I...+Wait)
KINDS = [(d, False) for d in DTYPES] + [(np.float64, True), (np.uint8, True)]
KIND_IDS = [f"{np.dtype(d).str[1:]}-{'I' if nb else 'B'}" for d, nb in KINDS]


def _rounds(comm: MPI.Intracomm, name: str, nonblocking: bool, *args: Any) -> int | None:
    """Area rounds collective `name(*args)` (nonblocking: `Iname(*args)` then Wait) took on
    this rank, or None where the lanes cannot be seen (one rank, no C accelerator, mpi4py
    between regions)."""
    before = area.completed(comm)
    if nonblocking:
        getattr(comm, "I" + name[0].lower() + name[1:])(*args).Wait()
    else:
        getattr(comm, name)(*args)
    shared = area.current(comm)
    if shared is None or shared.group._c is None:
        return None
    return area.completed(comm) - before


@pytest.mark.parametrize("given", [True, False], ids=["recvcounts", "no-recvcounts"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("dtype", "nb"), KINDS, ids=KIND_IDS)
def test_reduce_scatter(any_comm, dtype, nb, form, given):
    comm = any_comm
    size, rank = comm.Get_size(), comm.Get_rank()
    for odd in (1, 3, 11):
        counts = _counts(size, odd)
        total, first = sum(counts), sum(counts[:rank])
        want = np.sum([_operand(r, total, dtype) for r in range(size)], axis=0).astype(dtype)
        out = np.full(counts[rank], 99, dtype)
        send = _spec(_operand(rank, total, dtype), form)
        recvcounts = counts if given else None
        rounds = _rounds(comm, "Reduce_scatter", nb, send, _spec(out, form), recvcounts)
        assert out.tobytes() == want[first : first + counts[rank]].tobytes(), (odd, out)
        assert rounds in (None, 1 if given else 0 if nb else 2)  # (I...: counts by messages)
        full = _operand(rank, total, dtype)
        rounds = _rounds(
            comm, "Reduce_scatter", nb, MPI.IN_PLACE, _spec(full, form), counts, MPI.MAX
        )
        most = np.max([_operand(r, total, dtype) for r in range(size)], axis=0)
        assert full[: counts[rank]].tobytes() == most[first : first + counts[rank]].tobytes()
        assert rounds in (None, 1)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("dtype", "nb"), KINDS, ids=KIND_IDS)
def test_reduce_scatter_block(any_comm, dtype, nb, form):
    comm = any_comm
    size, rank = comm.Get_size(), comm.Get_rank()
    for count in (0, 1, 5, 130):
        send = _operand(rank, size * count, dtype)
        want = np.sum([_operand(r, size * count, dtype) for r in range(size)], axis=0).astype(dtype)
        out = np.full(count, 99, dtype)
        rounds = _rounds(comm, "Reduce_scatter_block", nb, _spec(send, form), _spec(out, form))
        assert out.tobytes() == want[rank * count : (rank + 1) * count].tobytes()
        assert rounds in (None, 1 if count else 0)  # (no byte: no round)
        full = send.copy()
        rounds = _rounds(comm, "Reduce_scatter_block", nb, MPI.IN_PLACE, _spec(full, form), MPI.MIN)
        least = np.min([_operand(r, size * count, dtype) for r in range(size)], axis=0)
        assert full[:count].tobytes() == least[rank * count : (rank + 1) * count].tobytes()
        assert full[count:].tobytes() == send[count:].tobytes()  # (the rest stays)
        assert rounds in (None, 1 if count else 0)  # (no byte: no round)


def _first(inbuf: Any, inoutbuf: Any, _datatype: Any) -> None:
    """x op y = x (x from the lower rank): associative, not commutative, so the fold of
    every rank's block is rank 0's, and any other order shows."""
    np.frombuffer(inoutbuf, dtype="f8")[...] = np.frombuffer(inbuf, dtype="f8")


FIRST = MPI.Op.Create(_first, commute=False)


@pytest.mark.parametrize("large", [40_000, 600_000], ids=["320KB", "4.8MB"])
@pytest.mark.parametrize("in_place", [False, True], ids=["buffers", "IN_PLACE"])
@pytest.mark.parametrize("op", ["SUM", "FIRST"])
def test_reduce_scatter_of_large_blocks(any_comm, op, in_place, large):
    """Blocks over a slab go on messages (each block folded at its owner as it arrives; of
    `large` float64: whole messages, or over one so in pieces): the same results, in rank
    order for a non-commutative op, uneven blocks (one empty), IN_PLACE at every rank (the
    result lands on recvbuf's first block, which at ranks > 0 holds blocks sent to lower
    ranks: they must leave unchanged; the rest of recvbuf stays)."""
    comm = any_comm
    size, rank = comm.Get_size(), comm.Get_rank()
    mpi_op = FIRST if op == "FIRST" else MPI.SUM
    for call in ("Reduce_scatter", "Reduce_scatter_block"):
        if call == "Reduce_scatter":
            counts = [large + 3 * q if q != 1 else 0 for q in range(size)]
            recvcounts: tuple[Any, ...] = (counts,)
        else:
            counts, recvcounts = [large + 5] * size, ()
        at, length = sum(counts[:rank]), counts[rank]
        every = [_operand(r, sum(counts), np.float64) + r for r in range(size)]
        want = every[0] if op == "FIRST" else np.sum(every, axis=0)
        mine = every[rank]
        full = mine.copy()
        if in_place:
            getattr(comm, call)(MPI.IN_PLACE, full, *recvcounts, mpi_op)
            got = full[:length]
            assert full[length:].tobytes() == mine[length:].tobytes()  # (the rest stays)
        else:
            got = np.full(length, -1.0)
            getattr(comm, call)(full, got, *recvcounts, mpi_op)
            assert full.tobytes() == mine.tobytes()  # (sendbuf stays)
        assert got.tobytes() == want[at : at + length].tobytes(), (call, rank)


@pytest.mark.parametrize("in_place", [False, True], ids=["buffers", "IN_PLACE"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("dtype", "nb"), KINDS, ids=KIND_IDS)
def test_scan_exscan(any_comm, dtype, nb, form, in_place):
    comm = any_comm
    rank = comm.Get_rank()
    for count in (0, 1, 7, 129):
        mine = _operand(rank, count, dtype)
        for call, upto in (("Scan", rank + 1), ("Exscan", rank)):
            for op, fold in ((MPI.SUM, np.add), (MPI.MAX, np.maximum), (MPI.PROD, np.multiply)):
                out = mine.copy() if in_place else np.full(count, 99, dtype)
                send = MPI.IN_PLACE if in_place else _spec(mine, form)
                rounds = _rounds(comm, call, nb, send, _spec(out, form), op)
                if upto:
                    want = _operand(0, count, dtype)
                    for r in range(1, upto):
                        want = fold(want, _operand(r, count, dtype)).astype(dtype)
                    assert out.tobytes() == want.tobytes(), (call, op, count, out, want)
                else:  # Exscan's rank 0: its recvbuf stays as it was
                    assert (
                        out.tobytes() == (mine if in_place else np.full(count, 99, dtype)).tobytes()
                    )
                assert rounds in (None, 1 if count else 0)  # (no byte: no round)


@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "started"])
@pytest.mark.parametrize("call", ["Scan", "Exscan", "Reduce_scatter", "Reduce_scatter_block"])
def test_the_lanes_take_the_common_forms(comm, call, nonblocking):
    """The lane itself runs the call (it is not handed to the collective's body): numpy
    arrays and `[array.array, count, MPI.DOUBLE]`; the nonblocking form's lane (I`call`)
    starts the same C round (its Request then completes it)."""
    comm.Barrier()  # (binds the area where it is not bound yet)
    shared = area.current(comm)
    if shared is None or not shared.ready():
        return  # one rank (no area), or the Python steps only (IVSHMEM_COMM_PUREPYTHON)
    size, rank = comm.Get_size(), comm.Get_rank()
    send = array.array("d", [1.0 + rank] * 2 * size)
    out = array.array("d", [0.0] * 2 * size)
    if call.startswith("Reduce_scatter"):
        args: tuple[Any, ...] = ([send, 2 * size, MPI.DOUBLE], [out, 2, MPI.DOUBLE])
        if call == "Reduce_scatter":
            args += ([2] * size,)
        want = [sum(1.0 + r for r in range(size))] * 2
    else:
        args = (np.frombuffer(send), np.frombuffer(out))
        upto = rank + 1 if call == "Scan" else rank
        want = [sum(1.0 + r for r in range(upto))] * 2 * size if upto else [0.0] * 2 * size
    if nonblocking:
        args_of = getattr(collectives, "_a_" + call.lower())
        engine = comm._engine
        request = collectives._begun(comm, engine, shared, args_of, None, args, {})
        assert request is not None
        request.Wait()
    else:
        lane = getattr(collectives, "_f_" + call.lower())
        assert lane(comm, shared, *args) is not collectives._SLOW
    assert list(out[: len(want)]) == want


def test_ranks_with_empty_blocks_take_the_lane(comm):
    """Reduce_scatter where some ranks receive no element (OSU's 8 B at 2 ranks: recvcounts
    [1, 0]) and Reduce_scatter_block of empty blocks, in the `(buf, MPI.DOUBLE)` form: the
    C front runs Reduce_scatter and the lanes take both at every rank (an empty array.array
    went to the collective's body before: buffers.plain declined it, and the front took its
    1-aligned address for a misaligned block), and the results are right."""
    size, rank = comm.Get_size(), comm.Get_rank()
    counts = [1] + [0] * (size - 1)
    send = (array.array("d", [1.0 + rank]), MPI.DOUBLE)
    out = array.array("d", [0.0] * counts[rank])
    recv = (out, MPI.DOUBLE)
    empty = (array.array("d"), MPI.DOUBLE)
    comm.Barrier()  # (binds the area where it is not bound yet)
    shared = area.current(comm)
    fronted = None  # (no C area: the method runs it)
    if shared is not None and shared.ready():
        group = shared.group
        assert collectives._a_reduce_scatter(comm, group, send, recv, counts) is not None
        assert collectives._a_reduce_scatter_block(comm, group, empty, empty) is not None
        fronted = collectives._c_front(
            comm, collectives.F_REDUCE_SCATTER, send, recv, MPI.SUM, counts
        )
    if not fronted:  # (where the front declined, the method takes the others' round)
        comm.Reduce_scatter(send, recv, counts, MPI.SUM)
    assert list(out) == ([sum(1.0 + r for r in range(size))] if rank == 0 else [])
    assert fronted in (None, True)
    comm.Reduce_scatter_block(empty, empty, MPI.SUM)


def test_gathered_counts_are_checked(comm):
    """Reduce_scatter without recvcounts: counts that do not sum to a rank's send count give
    ValueError naming that rank on every rank (the send counts are gathered with the
    receive counts: no member waits for another's error, across regions too), and the
    communicator stays usable."""
    size, rank = comm.Get_size(), comm.Get_rank()
    send = np.ones(size + (rank == 0))
    out = np.zeros(1)
    with pytest.raises(ValueError, match=rf"ranks send \{{0: {size + 1}\}}"):
        comm.Reduce_scatter(send, out, None, MPI.SUM)
    comm.Reduce_scatter(np.ones(size), out, None, MPI.SUM)
    assert out[0] == size


def test_a_negative_gathered_count_is_named():
    """Reduce_scatter without recvcounts reads every rank's count back from the area: a
    member that announces a negative one (a hostile or broken process, here the last rank
    calling the counts round itself) is named in MPI.Exception(ERR_COUNT) on the others,
    which go on with the next communicator."""
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    comm = world.Dup()
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    if shared is None or not shared.ready():
        comm.Free()
        return  # one rank (no area), or the Python steps only (IVSHMEM_COMM_PUREPYTHON)
    if rank == size - 1:
        comm._coll_seq += 1  # (the instance its peers number)
        with pytest.raises(MPI.Exception) as err:
            comm._all_counts(-3, size, shared, lane=True)
        area.failed(comm)
    else:
        with pytest.raises(MPI.Exception) as err:
            comm.Reduce_scatter(np.ones(size), np.zeros(1), None, MPI.SUM)
    assert err.value.Get_error_class() == MPI.ERR_COUNT
    assert f"rank {size - 1} gave counts [-3, {size}]" in str(err.value)
    comm.Free()
    world.Barrier()
    out = np.zeros(1)
    world.Reduce_scatter(np.ones(size), out, None, MPI.SUM)
    assert out[0] == size
