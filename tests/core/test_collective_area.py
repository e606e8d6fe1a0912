"""The collective area (ivshmem_comm.collective): real processes on a real region.

A property test runs random sequences of every collective, random sizes (payloads several
slabs long included), random roots and random groups (subsets of the region's peers in any
rank order) and checks each result against numpy, with members on the C accelerator's
one-round calls and on the Python steps mixed in one group (the two speak one protocol);
the C reductions must match numpy bit for bit; hostile and dying peers must give errors
naming them, never a hang, on both implementations; format-1 and format-3 regions are
refused with a clear error.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ivshmem_comm as ic
from ivshmem_comm import layout, ring
from ivshmem_comm.collective import (
    FOLD_DTYPES,
    FOLD_OPS,
    KIND_REDUCE_SCATTER,
    KIND_SCATTER,
    CollectiveGroup,
    claim_slot,
    release_slot,
)
from ivshmem_comm.collective import KIND_BCAST_BYTES as BCAST_BYTES
from tests.support import run_peer

OPS = (
    "barrier", "bcast", "gather", "gatherv", "scatter", "scatterv", "allgather", "allgatherv",
    "alltoall", "alltoallv", "reduce", "allreduce", "reduce_scatter_block", "reduce_scatter",
    "scan", "exscan", "bcast_bytes", "gather_bytes", "allgather_bytes",
)  # fmt: skip
UFUNCS = (np.add, np.maximum, np.subtract)  # subtract: rank order matters (Python steps only)
DECLINABLE = ("gatherv", "scatterv", "alltoallv")
IMPLS = ["python", pytest.param("c", marks=pytest.mark.skipif(
    ring.CollectiveRound is None, reason="the C accelerator is not in use"))]  # fmt: skip


def _group(ep, slot, generation, members, impl="c", **kwargs):
    """A bound CollectiveGroup; `impl` "python": without its C accelerator (the steps run
    every collective, as under IVSHMEM_COMM_PUREPYTHON=1)."""
    group = CollectiveGroup(ep, slot, generation, members, **kwargs)
    if impl == "python":
        group._c = None
    group.wait_bound(timeout=30)
    return group


def _bytes(seed: int, index: int, rank: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, index, rank]).integers(0, 256, n, dtype=np.uint8)


def _ints(seed: int, index: int, rank: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, index, rank, 1]).integers(-1000, 1000, n)


def _counts(seed: int, index: int, size: int, shape: tuple[int, ...]) -> np.ndarray:
    """Counts every rank derives alike: 0..size each."""
    return np.random.default_rng([seed, index, 7]).integers(0, size + 1, shape)


def _displs(counts: list[int]) -> list[int]:
    return np.cumsum([0, *counts[:-1]]).tolist()


def _check(group: CollectiveGroup, call, seed: int, index: int, op) -> tuple[object, object]:
    """Start collective `op` = (name, size, root, ufunc index) through `call(name, *args)`;
    return (result buffer, what numpy says it must hold once complete), (None, None) for
    nothing to check here."""
    name, size, root, which = op
    n, me = group.size, group.rank
    root %= n
    ufunc = UFUNCS[which]
    mine = _bytes(seed, index, me, size)
    every = [_bytes(seed, index, r, size) for r in range(n)]
    if name == "barrier":
        call("barrier")
        return None, None
    if name.endswith("_bytes"):  # sizes differ per sender; over a slab: declined (None)
        data = [_bytes(seed, index, r, size + 3 * r).tobytes() for r in range(n)]
        taken = [None] * n
        call(name, data[me], taken) if name == "allgather_bytes" else call(
            name, data[me], root, taken)  # fmt: skip
        takes = {"bcast_bytes": [root] if me != root else [],
                 "gather_bytes": [r for r in range(n) if r != me] if me == root else [],
                 "allgather_bytes": [r for r in range(n) if r != me]}[name]  # fmt: skip
        fits = [len(d) <= group.slab_size for d in data]
        expect = [data[r] if r in takes and fits[r] else None for r in range(n)]
        return taken, expect
    if name == "bcast":
        buf = every[root].copy() if me == root else np.zeros(size, np.uint8)
        call("bcast", buf, root)
        return buf, every[root]
    if name in ("gather", "allgather"):
        out = np.zeros(n * size, np.uint8)
        call(name, mine, out, root) if name == "gather" else call(name, mine, out)
        return (out, np.concatenate(every)) if name == "allgather" or me == root else (None, None)
    if name in ("gatherv", "allgatherv"):
        counts = _counts(seed, index, size, (n,)).tolist()
        parts = [_bytes(seed, index, r, counts[r]) for r in range(n)]
        out = np.zeros(sum(counts), np.uint8)
        args = (parts[me], out, counts, _displs(counts))
        call(name, *args, root) if name == "gatherv" else call(name, *args)
        return (out, np.concatenate(parts)) if name == "allgatherv" or me == root else (None, None)
    if name in ("scatter", "scatterv"):
        counts = [size] * n if name == "scatter" else _counts(seed, index, size, (n,)).tolist()
        whole = _bytes(seed, index, root, sum(counts))
        out = np.zeros(counts[me], np.uint8)
        if name == "scatter":
            call(name, whole if me == root else None, out, root)
        else:
            call(name, whole if me == root else None, counts, _displs(counts), out, root)
        return out, whole[_displs(counts)[me] :][: counts[me]]
    if name in ("alltoall", "alltoallv"):
        matrix = _counts(seed, index, size, (n, n))  # matrix[r][q]: bytes r sends q
        if name == "alltoall":
            matrix[:] = size
        sends = [_bytes(seed, index, r, int(matrix[r].sum())) for r in range(n)]
        recvcounts, sendcounts = matrix[:, me].tolist(), matrix[me].tolist()
        out = np.zeros(sum(recvcounts), np.uint8)
        if name == "alltoall":
            call(name, sends[me], out)
        else:
            call(name, sends[me], sendcounts, _displs(sendcounts), out, recvcounts,
                 _displs(recvcounts))  # fmt: skip
        expect = [sends[r][_displs(matrix[r].tolist())[me] :][: matrix[r][me]] for r in range(n)]
        return out, np.concatenate(expect)
    return _check_reduction(group, call, seed, index, name, size, root, ufunc)


def _check_reduction(group, call, seed, index, name, size, root, ufunc):
    n, me = group.size, group.rank
    count = size // 8
    values = [_ints(seed, index, r, count * (n if name.startswith("reduce_scatter") else 1))
              for r in range(n)]  # fmt: skip

    def folded(ranks):
        return functools.reduce(lambda a, b: ufunc(a, b), [values[r] for r in ranks])

    if name == "reduce_scatter_block":
        out = np.zeros(count, np.int64)
        call(name, values[me], out, ufunc)
        return out, folded(range(n))[me * count : (me + 1) * count]
    if name == "reduce_scatter":
        counts = _counts(seed, index, 2 * count, (n,))
        counts[-1] += n * count - counts.sum()  # may go negative: then use equal blocks
        counts = counts.tolist() if counts[-1] >= 0 else [count] * n
        out = np.zeros(counts[me], np.int64)
        call(name, values[me], out, counts, ufunc)
        return out, folded(range(n))[_displs(counts)[me] :][: counts[me]]
    sentinel = np.full(count, 12345, np.int64)
    out = sentinel.copy()
    if name == "reduce":
        call(name, values[me], out, ufunc, root)
        return out, folded(range(n)) if me == root else sentinel
    call(name, values[me], out, ufunc)
    if name == "allreduce":
        return out, folded(range(n))
    if name == "scan":
        return out, folded(range(me + 1))
    return out, folded(range(me)) if me else sentinel


def _member(ep, slot, generation, members, ops, seed, python_ranks=()):
    """Run `ops`; each (name, size, root, ufunc, mode): mode 0 blocking, 1 started and
    polled with test() until complete, 2 started and left pending until a blocking op (which
    completes it first) or the end (wait() of the last completes the earlier ones), 3
    blocking with max_rounds=1 for gatherv/scatterv/alltoallv (declined when larger: then
    nothing is checked). Members at `python_ranks` run without the C accelerator."""
    if ep.peer_id not in members:
        return
    impl = "python" if members.index(ep.peer_id) in python_ranks else "c"
    group = _group(ep, slot, generation, members, impl, timeout=60)
    started = []  # (request, result, expect, op) not checked yet
    requests = []
    limited = False

    def blocking(name, *args):
        if limited and name in DECLINABLE:
            getattr(group, name)(*args, max_rounds=1)
        else:
            getattr(group, name)(*args)

    def nonblocking(name, *args):
        requests.append(group.start(name, *args))

    def verify(result, expect, op):
        if isinstance(expect, list):  # byte strings (or None): exactly
            assert result == expect, (op, group.rank)
        elif expect is not None:
            assert np.array_equal(result, expect), (op, group.rank)

    for index, (*op, mode) in enumerate(ops):
        if mode in (0, 3):
            limited = mode == 3
            result, expect = _check(group, blocking, seed, index, op)
            if limited and op[0] in DECLINABLE and group.declined:
                assert op[1] > 64  # (smaller payloads are one round at any group size here)
                result = expect = None
            for request, *check in started:
                assert request.done  # the blocking call completed the ones before it
                verify(*check)
            started = []
            verify(result, expect, op)
            continue
        result, expect = _check(group, nonblocking, seed, index, op)
        request = requests[-1]
        if mode == 1:
            while not request.test():
                time.sleep(0.0001)
        started.append((request, result, expect, op))
    if started:
        started[-1][0].wait()
    for request, *check in started:
        assert request.done
        verify(*check)
    group.close()


def _run_group(region, spawn, leader, members, ops, seed, python_ranks=(), body=_member):
    """Peers 0..max_peers-2 run `ops` as `members` in forked processes (`body`); `leader`
    (the last peer, in this process) claims the slot and releases it after."""
    slot, generation = claim_slot(region, leader.peer_id, leader.incarnation)
    peers = [spawn(run_peer, body, region.name, p, slot, generation, members, ops, seed,
                   python_ranks) for p in range(region.max_peers - 1)]  # fmt: skip
    for proc in peers:
        proc.join(timeout=120)
    codes = [proc.exitcode for proc in peers]
    for proc in peers:
        if proc.is_alive():
            proc.kill()
    assert release_slot(region, slot, leader.peer_id, leader.incarnation)
    assert codes == [0] * len(peers), f"members' exit codes {codes} (tracebacks above)"


op_strategy = st.tuples(
    st.sampled_from(OPS),
    st.one_of(st.integers(0, 64), st.integers(0, 100_000)),  # slabs here are 28 KiB
    st.integers(0, 7),
    st.integers(0, len(UFUNCS) - 1),
    # blocking, nonblocking completed by test() or wait(), blocking with max_rounds=1
    st.sampled_from([0, 0, 1, 2, 3, 3]),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(op_strategy, min_size=1, max_size=10),
    members=st.permutations(range(4)).flatmap(
        lambda order: st.integers(1, 4).map(lambda k: list(order[:k]))
    ),
    seed=st.integers(0, 2**32 - 1),
    python_ranks=st.sets(st.integers(0, 3)),
)
def test_random_collectives_match_numpy(make_region, spawn, ops, members, seed, python_ranks):
    region = make_region(8 << 20, 5)
    assert region.geometry.coll_slots and region.geometry.coll_slab < 100_000
    with region.endpoint(4) as leader:
        _run_group(region, spawn, leader, members, ops, seed, python_ranks)


def _fold_values(dtype: np.dtype, rank: int) -> np.ndarray:
    """Operands with every edge case of `dtype`: extremes and wrap-around for integers; NaN,
    infinities, signed zeros and rounding for floats."""
    rng = np.random.default_rng([rank, dtype.num])
    if dtype.kind == "f":
        special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 3.0, -7.5], dtype)
        return np.concatenate([np.roll(special, rank), rng.standard_normal(56).astype(dtype)])
    info = np.iinfo(dtype)
    special = np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1], dtype)
    return np.concatenate([np.roll(special, rank), rng.integers(info.min, info.max, 58, dtype)])


def _fold_member(ep, slot, generation, members, ops, seed, python_ranks):
    """Allreduce, Reduce, Scan, Exscan, Reduce_scatter (uneven blocks, one empty) and
    Reduce_scatter_block of every element type and op on the C path (or the Python steps at
    `python_ranks`), each result compared bit for bit with numpy's fold in rank order."""
    if ep.peer_id not in members:
        return
    me = members.index(ep.peer_id)
    group = _group(ep, slot, generation, members, "python" if me in python_ranks else "c")
    n = len(members)
    for dtype in FOLD_DTYPES:
        operands = [_fold_values(dtype, r) for r in range(n)]
        for ufunc in FOLD_OPS:
            if dtype.kind == "f" and ufunc in (np.bitwise_and, np.bitwise_or, np.bitwise_xor):
                continue
            with np.errstate(all="ignore"):
                folds = list(itertools.accumulate(operands, ufunc))
            for name, want, upto in (("allreduce", True, n), ("reduce", me == 1, n),
                                     ("scan", True, me + 1), ("exscan", me > 0, me)):  # fmt: skip
                out = np.full_like(operands[0], 99)
                args = (operands[me], out, ufunc, 1) if name == "reduce" else (
                    operands[me], out, ufunc)  # fmt: skip
                with np.errstate(all="ignore"):
                    getattr(group, name)(*args)
                if want and upto:
                    expect = folds[upto - 1]
                    assert out.tobytes() == expect.tobytes(), (name, dtype, ufunc, me, out, expect)
            total = len(operands[0])
            counts = [0] + [2 * q + 3 for q in range(1, n - 1)]
            counts.append(total - sum(counts))
            block = total // n
            for name, args, start, count in (
                ("reduce_scatter", (counts,), sum(counts[:me]), counts[me]),
                ("reduce_scatter_block", (), me * block, block),
            ):  # fmt: skip
                out = np.full(count, 99, dtype)
                send = operands[me] if args else operands[me][: n * block]
                with np.errstate(all="ignore"):
                    getattr(group, name)(send, out, *args, ufunc)
                expect = folds[-1][start : start + count]
                assert out.tobytes() == expect.tobytes(), (name, dtype, ufunc, me, out, expect)
    group.close()


@pytest.mark.parametrize("python_ranks", [(), (0, 2)], ids=["c", "mixed"])
def test_c_reductions_match_numpy_bit_for_bit(make_region, spawn, python_ranks):
    region = make_region(8 << 20, 4)
    with region.endpoint(3) as leader:
        _run_group(region, spawn, leader, [2, 0, 1], [], 0, python_ranks, _fold_member)


def test_every_collective_in_one_sequence_at_four_ranks(make_region, spawn):
    """Each collective once, at payloads of several slabs, every reduction op."""
    region = make_region(8 << 20, 5)
    big = 3 * region.geometry.coll_slab + 40
    ops = [(name, size, 1, i % 3, i % 3) for i, name in enumerate(OPS) for size in (0, 8, big)]
    with region.endpoint(4) as leader:
        _run_group(region, spawn, leader, [2, 0, 3, 1], ops, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_root_runs_one_round_ahead_of_its_reader(make_region, impl):
    """A bcast root publishes and returns; once its reader has entered the first bcast
    (published its arrival, waiting for the root's), the root's second bcast completes
    before the reader took the first (the two cells of the root's block), its third waits
    until the reader entered the second (round k reuses the cell of round k-2), and the
    reader gets all three."""
    region = make_region(8 << 20, 2)
    with region.endpoint(0) as ep0, region.endpoint(1) as ep1:
        slot, generation = claim_slot(region, 0, ep0.incarnation)
        groups = [CollectiveGroup(ep, slot, generation, [0, 1], timeout=10) for ep in (ep0, ep1)]
        root, reader = groups
        for group in groups:
            if impl == "python":
                group._c = None
            group.wait_bound(timeout=10)
        sent = [bytes([i]) * 100 for i in (1, 2, 3)]
        got = [bytearray(100) for _ in sent]
        first = reader.start("bcast", got[0], 0)
        assert not first.test()  # entered: waits for the root
        root.bcast(bytearray(sent[0]), 0)
        second = root.start("bcast", bytearray(sent[1]), 0)
        assert second.test()  # the reader has not read the first yet
        third = root.start("bcast", bytearray(sent[2]), 0)
        assert not third.test()
        assert first.test() and got[0] == sent[0]
        reader.bcast(got[1], 0)
        assert third.test()
        reader.bcast(got[2], 0)
        assert got == sent
        for group in groups:
            group.close()


def test_slots_are_claimed_once_and_reclaimed_from_the_dead(make_region):
    region = make_region(8 << 20, 3)
    g = region.geometry
    with region.endpoint(0) as ep:
        taken = [claim_slot(region, 0, ep.incarnation) for _ in range(g.coll_slots)]
        assert sorted(slot for slot, _ in taken) == list(range(g.coll_slots))
        assert claim_slot(region, 0, ep.incarnation) is None  # exhausted: use messages
        assert release_slot(region, 2, 0, ep.incarnation)
        assert not release_slot(region, 2, 0, ep.incarnation)
        slot, generation = claim_slot(region, 0, ep.incarnation)
        assert slot == 2 and generation == 2  # the generation counts claims of the slot
    # ep left: its claims are stale, anyone may take them over
    with region.endpoint(1) as other:
        assert claim_slot(region, 1, other.incarnation) is not None


# ------------------------------------------------------------------ hostile and lost peers
def _bind_then(ep, slot, generation, members, action):
    """Bind, then write `action` into this member's lines as a hostile peer would: the
    victim's first round (1) first checks this member's cell 0 (round 0 published), then
    takes its arrival of round 1 from cell 1."""
    _group(ep, slot, generation, members, timeout=60)
    u64 = ep.region.u64
    block = ep.region.geometry.coll_peer_offset(slot, ep.peer_id)
    entered = block // 8  # cell 0's arrive line
    arrive = (block + layout.COLL_LINE_STRIDE) // 8  # cell 1's
    base = generation << layout.COLL_SEQ_BITS
    if action == "round":
        u64[entered] = base | 1000
    elif action == "generation":  # (in cell 1: cell 0's generation says it bound)
        u64[arrive] = ((generation + 1) << layout.COLL_SEQ_BITS) | 1
    elif action == "nbytes":  # a well-formed arrival claiming a slab longer than bcast's
        u64[arrive + 1] = 1 << 40
        u64[arrive + 2] = 2
        u64[arrive] = base | 1
    elif action == "kind":
        u64[arrive + 2] = 99
        u64[arrive] = base | 1
    elif action == "rounds":  # a gatherv root's arrival: too few
        u64[arrive + 1] = 0
        u64[arrive + 2] = 3
        u64[arrive + 3] = 0
        u64[arrive] = base | 1
    elif action in (
        "gather_nbytes",
        "gather_refused",
    ):  # a gatherv member's arrival (max_rounds=1): a block
        # longer than any message (the root's counts, or a refused root's any length)
        u64[arrive + 1] = 1 << 50
        u64[arrive + 2] = 3
        u64[arrive + 3] = 1
        u64[arrive] = base | 1
    elif action in ("bytes_nbytes", "bytes_rounds"):  # a bcast_bytes root's arrival: a
        # pickle longer than its slab / a rounds word neither 0 (declined) nor 1
        slab = ep.region.geometry.coll_slab
        u64[arrive + 1] = slab + 1 if action == "bytes_nbytes" else 4
        u64[arrive + 2] = BCAST_BYTES
        u64[arrive + 3] = 1 if action == "bytes_nbytes" else 2
        u64[arrive] = base | 1
    elif action in ("scatter_rounds", "scatter_block"):  # a scatterv root's arrival: more
        # rounds than any data / one round whose block length for the victim is more than it
        u64[arrive + 1] = ep.region.geometry.coll_slab // 64 * 64  # (its one segment: 2 ranks)
        u64[arrive + 2] = KIND_SCATTER
        u64[arrive + 3] = 1 << 60 if action == "scatter_rounds" else 1
        u64[arrive + 4] = 1 << 40  # (the victim's block length: see CollectiveGroup.scatterv)
        u64[arrive] = base | 1
    elif action == "scatter_nbytes":  # a reduce-scatter arrival of one segment, not all
        u64[arrive + 1] = 64
        u64[arrive + 2] = KIND_REDUCE_SCATTER
        u64[arrive] = base | 1
    elif action == "ahead":  # round 3 in the cell of round 1: past what it may publish
        u64[arrive] = base | 3
    elif action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)


@pytest.mark.parametrize(
    ("action", "error", "field"),
    [
        ("round", ic.RingCorruptError, "arrive seq"),
        ("generation", ic.RingCorruptError, "arrive seq"),
        ("nbytes", ic.RingCorruptError, "nbytes"),
        ("kind", ic.RingCorruptError, "kind"),
        ("ahead", ic.RingCorruptError, "arrive seq"),
        ("rounds", ic.RingCorruptError, "rounds"),
        ("gather_nbytes", ic.RingCorruptError, "nbytes"),
        ("gather_refused", ic.RingCorruptError, "nbytes"),
        ("bytes_nbytes", ic.RingCorruptError, "nbytes"),
        ("bytes_rounds", ic.RingCorruptError, "rounds"),
        ("scatter_nbytes", ic.RingCorruptError, "nbytes"),
        ("scatter_rounds", ic.RingCorruptError, "rounds"),
        ("scatter_block", ic.RingCorruptError, "block"),
        ("die", ic.PeerLostError, None),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_hostile_or_dead_member_is_named_not_waited_for(
    make_region, spawn, action, error, field, impl
):
    """The victim's bcast (reduce_scatter for an arrival of its kind; gatherv for the rounds
    word; with max_rounds=1, the C path's case, as the root, for a block longer than any
    message, and so as a refused root (gatherv_refused); scatterv with max_rounds=1,
    whose root alone may take more rounds, for more than any message, and for a block length
    over the rounds it announced) on the C accelerator and on the Python steps."""
    region = make_region(8 << 20, 2)
    with region.endpoint(0) as ep:
        slot, generation = claim_slot(region, 0, ep.incarnation)
        proc = spawn(run_peer, _bind_then, region.name, 1, slot, generation, [0, 1], action)
        group = _group(ep, slot, generation, [0, 1], impl, timeout=20)
        time.sleep(0.3)  # the member scribbles (or dies) meanwhile
        t0 = time.monotonic()
        buf = bytearray(16)
        with pytest.raises(error) as err:
            if action == "rounds":
                group.gatherv(buf, None, [], [], root=1)
            elif action == "gather_nbytes":
                group.gatherv(buf, bytearray(32), [16, 16], [0, 16], root=0, max_rounds=1)
            elif action == "gather_refused":
                group.gatherv_refused(0, max_rounds=1)
            elif action.startswith("bytes"):
                group.bcast_bytes(b"", 1, [None, None])
            elif action in ("scatter_rounds", "scatter_block"):
                group.scatterv(None, [], [], buf, root=1, max_rounds=1)
            elif action == "scatter_nbytes":
                group.reduce_scatter(np.arange(3.0), np.zeros(1), [1, 2], np.add)
            else:
                group.bcast(buf, root=1)
        assert time.monotonic() - t0 < 5
        assert err.value.peer == 1
        # (more bytes than this call takes: MPI's truncation, see CollectiveTruncatedError;
        # a gather sender's block longer than the root's count is one too)
        truncated = action in ("nbytes", "gather_nbytes")
        assert isinstance(err.value, ic.errors.CollectiveTruncatedError) == truncated
        if field:
            assert field in err.value.field
            with pytest.raises(error):  # broken for good: fails fast, same error
                group.barrier()
        proc.kill()


# none; one slab per member; counters in the session lines (2: test_winheap)
@pytest.mark.parametrize("version", [1, 3, 4])
def test_older_collective_formats_are_refused_with_a_clear_error(version):
    size = 1 << 20
    buf = bytearray(size)
    from ivshmem_comm.region import format_buffer

    format_buffer(buf, layout.Geometry.fit(size, 2), "old")
    struct.pack_into("<I", buf, 8, version)  # CRC made right: a genuine old superblock
    crc = zlib.crc32(bytes(buf[: layout.SB_CHECKSUM_OFFSET]))
    struct.pack_into("<I", buf, layout.SB_CHECKSUM_OFFSET, crc)
    match = rf"format {version} .*recreate the region"
    with pytest.raises(ic.RegionFormatError, match=match) as err:
        ic.Region.attach(buf)
    assert err.value.field == "version"


def test_small_region_has_no_collective_area_and_validates():
    g = layout.Geometry.fit(64 << 10, 2, 16)
    assert g.coll_slots == 0 and g.coll_slab == 0
    budget = (64 << 20) // layout.COLL_AREA_SHARE
    for peers, slab in ((2, layout.COLL_SLAB_MAX), (4, layout.COLL_SLAB_MAX // 2)):
        g = layout.Geometry.fit(64 << 20, peers)
        # the slabs take the budget whole (a power of two: so do they), the slot's header
        # line, control lines and page rounding come on top
        assert g.coll_slots == layout.COLL_SLOTS_DEFAULT and g.coll_slab == slab
        assert g.coll_slots * peers * layout.COLL_CELLS * g.coll_slab <= budget
        lines = layout.PAGE_SIZE + peers * layout.COLL_SLAB_OFFSET
        assert g.coll_slot_stride * g.coll_slots <= budget + g.coll_slots * lines
        assert g.required_size <= 64 << 20
    bad = layout.Geometry(64 << 20, 2, 256, 64, g.data_size, g.max_span, 2, 1000)
    with pytest.raises(ValueError, match="coll_slab"):
        bad.validate()


# ------------------------------------------------------------------ several groups, few CPUs
def _two_groups(ep, slots, members_a, members_b, seed, cpus, spin_us=50.0):
    """Member of group A and/or B (two communicators on two slots), interleaving them."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    groups = [
        CollectiveGroup(ep, slot, generation, members, timeout=60, spin_us=spin_us)
        for (slot, generation), members in zip(slots, (members_a, members_b), strict=True)
        if ep.peer_id in members
    ]
    for group in groups:
        group.wait_bound(timeout=30)
    for index in range(40):
        for group in groups:
            expect = sum(range(1, group.size + 1)) * (index + seed)
            out = np.zeros(3, np.int64)
            group.allreduce(np.full(3, (group.rank + 1) * (index + seed)), out, np.add)
            assert (out == expect).all(), (index, out, expect)
            group.barrier()
    for group in groups:
        group.close()


def test_two_communicators_on_two_slots_interleave(make_region, spawn):
    """Groups {0,1,2,3} and {3,1} (another rank order) run alternately on their own slots."""
    region = make_region(8 << 20, 5)
    with region.endpoint(4) as leader:
        slots = [claim_slot(region, 4, leader.incarnation) for _ in range(2)]
        procs = [spawn(run_peer, _two_groups, region.name, p, slots, [0, 1, 2, 3], [3, 1], 3, None)
                 for p in range(4)]  # fmt: skip
        for proc in procs:
            proc.join(timeout=120)
        assert [proc.exitcode for proc in procs] == [0] * 4


def test_four_members_on_one_cpu_do_not_collapse(make_region, spawn):
    """4 members pinned to one CPU, spinning up to 1 s before they sleep: each yields the
    CPU between polls (more members than CPUs), so the one it waits for runs. (Without
    the yield, this took 10 s: every wait spun through its time slices.)"""
    region = make_region(8 << 20, 5)
    cpu = min(os.sched_getaffinity(0))
    with region.endpoint(4) as leader:
        slots = [claim_slot(region, 4, leader.incarnation) for _ in range(2)]
        t0 = time.monotonic()
        procs = [spawn(run_peer, _two_groups, region.name, p, slots, [0, 1, 2, 3], [0], 1, {cpu},
                       1e6) for p in range(4)]  # fmt: skip
        for proc in procs:
            proc.join(timeout=120)
        assert [proc.exitcode for proc in procs] == [0] * 4
        assert time.monotonic() - t0 < 3


class _Stop(Exception):
    pass


def test_interrupt_ends_a_blocked_wait_and_breaks_the_group(make_region, spawn):
    """The interrupt hook runs while a wait is blocked (each WATCH_SLICE no kick ends);
    what it raises ends the wait, and the group fails fast with it afterwards."""
    region = make_region(8 << 20, 2)
    calls = []

    def interrupt():
        calls.append(time.monotonic())
        if len(calls) == 3:
            raise _Stop("the MPI layer saw an abandonment")

    with region.endpoint(0) as ep:
        slot, generation = claim_slot(region, 0, ep.incarnation)
        proc = spawn(run_peer, _bind_then, region.name, 1, slot, generation, [0, 1], "sleep")
        group = CollectiveGroup(ep, slot, generation, [0, 1], interrupt=interrupt)
        group.wait_bound(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(_Stop):
            group.barrier()  # member 1 never enters it
        assert len(calls) == 3 and time.monotonic() - t0 < 2
        with pytest.raises(_Stop):
            group.bcast(bytearray(1), 0)
        proc.kill()


def test_polled_request_reports_a_dead_member(make_region, spawn):
    """A nonblocking collective polled with test() raises PeerLostError naming a member that
    died, instead of returning False forever."""
    region = make_region(8 << 20, 2)
    with region.endpoint(0) as ep:
        slot, generation = claim_slot(region, 0, ep.incarnation)
        proc = spawn(run_peer, _bind_then, region.name, 1, slot, generation, [0, 1], "die")
        group = CollectiveGroup(ep, slot, generation, [0, 1])
        group.wait_bound(timeout=30)
        proc.join(timeout=30)
        deadline = time.monotonic() + 5
        request = None
        with pytest.raises(ic.PeerLostError) as err:
            # (start's own first poll may see it already, when WATCH_SLICE has passed since
            # the group was made: the join above can take that long on a busy machine)
            request = group.start("barrier")
            while not request.test():
                assert time.monotonic() < deadline, "test() never reported the dead member"
                time.sleep(0.001)
        assert err.value.peer == 1
        if request is not None:
            with pytest.raises(ic.PeerLostError):
                request.wait()
