"""The derived-datatype packers (issue #11 point 3): the C `typed_copy` of the fast path
(ivshmem_comm/_typepack.c) and its pure-Python reference (`typepack.typed_copy_py`) give the
same bytes as a plain byte-by-byte reading of the type map, for random type trees; and no
argument (a byte count from a peer, a damaged map, a buffer too short) makes the C packer
touch memory outside its buffers: it raises ValueError or copies within bounds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_lib.mpi import MPI
from ivshmem_comm import typepack

fastpath = pytest.importorskip("ivshmem_comm._fastpath")
PACKERS = {"c": fastpath.typed_copy, "python": typepack.typed_copy_py}
LEAVES = [MPI.BYTE, MPI.SHORT, MPI.INT, MPI.DOUBLE, MPI.FLOAT_INT, MPI.C_DOUBLE_COMPLEX]


def _tree(depth: int) -> st.SearchStrategy[MPI.Datatype]:
    """Random derived datatypes, `depth` constructors deep at most."""
    leaf = st.sampled_from(LEAVES)
    if depth == 0:
        return leaf
    inner = _tree(depth - 1)
    small = st.integers(0, 4)
    offsets = st.lists(st.integers(-16, 64), min_size=1, max_size=4)
    return st.one_of(
        leaf,
        st.builds(lambda t, n: t.Create_contiguous(n), inner, small),
        st.builds(lambda t, c, b, s: t.Create_vector(c, b, s), inner, small, small,
                  st.integers(-3, 5)),
        st.builds(lambda t, c, b, s: t.Create_hvector(c, b, s), inner, small, small,
                  st.integers(-40, 80)),
        st.builds(lambda t, d: t.Create_indexed([2] * len(d), d), inner, offsets),
        st.builds(lambda t, d: t.Create_hindexed([1] * len(d), d), inner, offsets),
        st.builds(lambda a, b, d: MPI.Datatype.Create_struct([1, 2], [0, d], [a, b]),
                  inner, inner, st.integers(0, 48)),
        st.builds(lambda t, lb, ext: t.Create_resized(lb, ext), inner, st.integers(-8, 8),
                  st.integers(0, 64)),
        st.builds(lambda t, s: t.Create_subarray([3, 4], [2, 2], [s, 1]), inner,
                  st.integers(0, 1)),
    )  # fmt: skip


def _reference_positions(datatype: MPI.Datatype, start: int, count: int) -> np.ndarray:
    """The user-buffer byte of each packed byte, read from the uncompiled pieces."""
    element = [o + i for o, n in datatype.pieces().tolist() for i in range(n)]
    return np.array(
        [start + e * datatype.extent + b for e in range(count) for b in element], dtype=np.int64
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datatype=_tree(3), count=st.integers(0, 3), data=st.data())
def test_packers_agree_with_the_type_map(datatype, count, data):
    positions = _reference_positions(datatype, 0, count)
    shift = -int(positions.min()) if len(positions) else 0
    positions += shift
    length = (int(positions.max()) + 1 if len(positions) else 0) + data.draw(st.integers(0, 8))
    user = np.frombuffer(np.random.default_rng(count).bytes(length), np.uint8).copy()
    limit = data.draw(st.sampled_from([-1, 0, 1, 7, len(positions), 10**12]))
    moved = min(len(positions), limit) if limit >= 0 else len(positions)
    runs = datatype.compiled()
    for name, packer in PACKERS.items():
        packed = bytearray(len(positions))
        assert packer(True, user, shift, count, datatype.extent, runs, packed, limit) == moved
        assert bytes(packed[:moved]) == user[positions[:moved]].tobytes(), name
        assert not any(packed[moved:]), name
        back = np.zeros_like(user)
        assert packer(False, back, shift, count, datatype.extent, runs, user[positions].tobytes(),
                      limit) == moved  # fmt: skip
        expect = np.zeros_like(user)
        expect[positions[:moved]] = user[positions[:moved]]
        assert np.array_equal(back, expect), name


def test_vector_is_one_run_and_pieces_merge():
    vector = MPI.DOUBLE.Create_vector(1000, 1, 2)
    assert vector.compiled().tolist() == [[0, 8, 1000, 16]]
    halves = MPI.INT.Create_indexed([1, 1, 1], [0, 1, 3])  # bytes 0..8 are one piece
    assert halves.pieces().tolist() == [[0, 8], [12, 4]]


@pytest.mark.parametrize("name", PACKERS)
def test_packers_refuse_what_lies_outside(name):
    packer = PACKERS[name]
    vector = MPI.INT.Create_vector(4, 1, 3)  # pieces up to byte 40
    runs = vector.compiled()
    user, packed = bytearray(40), bytearray(16)
    assert packer(True, user, 0, 1, vector.extent, runs, packed, -1) == 16
    for start, count in ((1, 1), (-1, 1), (40, 1)):
        with pytest.raises(ValueError):
            packer(True, user, start, count, vector.extent, runs, packed, -1)
    with pytest.raises(ValueError):  # a second element past the end, room for it packed
        packer(True, user, 0, 2, vector.extent, runs, bytearray(32), -1)
    with pytest.raises(ValueError):
        packer(False, user, 0, -1, vector.extent, runs, packed, -1)
    assert packer(True, user, 0, 2, vector.extent, runs, packed, -1) == 16  # packed is full


HOSTILE = st.integers(-(2**63), 2**63 - 1) | st.integers(-64, 64)


@settings(max_examples=400, deadline=None)
@given(
    rows=st.lists(st.tuples(HOSTILE, HOSTILE, HOSTILE, HOSTILE), max_size=4),
    start=HOSTILE, count=HOSTILE, extent=HOSTILE, limit=HOSTILE,
    user_len=st.integers(0, 64), packed_len=st.integers(0, 64), gather=st.booleans(),
)  # fmt: skip
def test_hostile_arguments_never_leave_the_buffers(rows, start, count, extent, limit,
                                                    user_len, packed_len, gather):  # fmt: skip
    """Every int64 the C packer reads (as a byte count from a peer or a damaged map can
    make them) ends in ValueError/OverflowError or a copy inside both buffers; the guard
    bytes around them stay as they were."""
    arena = bytearray(b"\xa5" * (user_len + packed_len + 32))
    view = memoryview(arena)
    user, packed = view[8 : 8 + user_len], view[16 + user_len : 16 + user_len + packed_len]
    runs = np.array(rows, dtype=np.int64).reshape(-1, 4)
    try:
        moved = fastpath.typed_copy(gather, user, start, count, extent, runs, packed, limit)
    except (ValueError, OverflowError):
        moved = None
    assert arena[:8] == b"\xa5" * 8 and arena[-16:] == b"\xa5" * 16
    assert arena[8 + user_len : 16 + user_len] == b"\xa5" * 8
    assert moved is None or 0 <= moved <= packed_len


# Runs whose reach (offset + length + span) leaves int64: the C packer once computed the
# piece end without an overflow check, so the end wrapped negative, passed the bounds check
# and the copy read at user + 2**63 - 1 (SIGSEGV); the Python one wrapped in numpy (the C
# one refused the last two already).
END, SPAN, LOW = (2**63 - 1, 1, 1, 0), (2**63 - 8, 1, 2, 2**62), (-(2**62), 8, 2, 8 - 2**63)


def _refused_in_child(packer, row) -> None:
    """Exit 0 iff the packer refuses `row` with ValueError (a crash is a signal exit)."""
    runs = np.array([row], np.int64)
    try:
        packer(True, bytearray(16), 0, 1, 1, runs, bytearray(8), -1)
    except ValueError:
        raise SystemExit(0) from None
    raise SystemExit(3)


@pytest.mark.parametrize(
    ("impl", "row"),
    [("c", END), ("python", END), ("python", SPAN), ("python", LOW)],
    ids=["c-end", "python-end", "python-span", "python-low"],
)
def test_map_whose_reach_leaves_int64_is_refused(spawn, impl, row):
    child = spawn(_refused_in_child, PACKERS[impl], row)
    child.join(timeout=60)
    assert child.exitcode == 0, f"{impl} packer on {row}: exit {child.exitcode}"


def _pack_far_hindexed() -> None:
    far = MPI.BYTE.Create_hindexed([1], [2**63 - 1]).Commit()
    try:
        far.Pack(bytearray(16), bytearray(16), 0)
    except ValueError:
        raise SystemExit(0) from None
    raise SystemExit(3)


def test_pack_of_a_type_reaching_past_int64_raises_not_crashes(spawn):
    """What a user sees of the same: Pack of a datatype with a displacement of 2**63 - 1."""
    child = spawn(_pack_far_hindexed)
    child.join(timeout=60)
    assert child.exitcode == 0, f"exit {child.exitcode} (-11: SIGSEGV)"
