"""The catalogue of the suite: which tests exist, their buffer forms, sizes and iteration counts.

Shared by the driver (which plans the work and prints the tables) and the rank program (which
runs it), so both agree on names. Iteration counts are the OSU micro-benchmarks' defaults:
latency-type tests skip 100 / loop 10000 up to 8 KiB and skip 10 / loop 1000 above; osu_bw and
osu_bibw skip 10 / loop 100 and skip 2 / loop 20 with a window of 64; collectives (blocking and
nonblocking) skip 100 / loop 1000 and skip 10 / loop 100. `scale` multiplies the loop counts
(never below 2 timed iterations and 1 skipped one), so a bounded run says what it measured.
"""

from __future__ import annotations

import dataclasses

KIB = 1 << 10
MIB = 1 << 20
LARGE_MESSAGE_SIZE = 8 * KIB  # OSU: sizes above this use the "large" counts
WINDOW = 64  # osu_bw / osu_bibw window
ACK_BYTES = 4  # osu_bw's acknowledgement
MAX_SIZE = 4 * MIB
QUICK_MAX_SIZE = 4 * KIB

# Buffer forms. "numpy": a numpy array; "mmap"/"bytearray"/"array": [buf, count, MPI.BYTE] over
# an anonymous mmap, a bytearray, an array.array('B'); "double": (array.array('d'), MPI.DOUBLE);
# "in_place": MPI.IN_PLACE where the collective has it (numpy buffers); "pickle": the lowercase
# object methods (send/recv, bcast, gather, ...); "call": Barrier/Ibarrier, which move no data.
BYTE_FORMS = ("numpy", "mmap", "bytearray", "array", "double")
FORMS = (*BYTE_FORMS, "in_place", "pickle", "call")
DOUBLE_FORMS = ("double",)  # forms whose element is an 8-byte float: sizes below 8 B are skipped


@dataclasses.dataclass(frozen=True)
class Test:
    """One OSU benchmark.

    kind: "lat" (one-way latency), "bw" (bandwidth, MB/s), "coll" (avg/min/max latency across
    ranks) or "nbc" (nonblocking collective: overall, compute, pure communication, overlap).
    `reduction` tests carry float64 data (their sizes start at 8 B); `sized` is False for
    barriers; `two_ranks` tests run only with exactly 2 ranks (as OSU's do).
    """

    name: str
    kind: str
    forms: tuple[str, ...]
    reduction: bool = False
    sized: bool = True
    two_ranks: bool = False
    min_size: int = 1

    @property
    def osu_name(self) -> str:
        """The OSU program this test reproduces, e.g. osu_latency."""
        return f"osu_{self.name}"


_MOVE = (*BYTE_FORMS, "pickle")
_MOVE_IP = (*BYTE_FORMS, "in_place", "pickle")
_V_IP = (*BYTE_FORMS, "in_place")
_RED = ("numpy", "double", "in_place", "pickle")

TESTS: tuple[Test, ...] = (
    Test("latency", "lat", _MOVE, two_ranks=True, min_size=0),
    Test("bw", "bw", _MOVE, two_ranks=True),
    Test("bibw", "bw", _MOVE, two_ranks=True),
    Test("multi_lat", "lat", _MOVE, min_size=0),
    Test("barrier", "coll", ("call", "pickle"), sized=False),
    Test("bcast", "coll", _MOVE),
    Test("reduce", "coll", _RED, reduction=True, min_size=8),
    Test("allreduce", "coll", _RED, reduction=True, min_size=8),
    Test("gather", "coll", _MOVE_IP),
    Test("gatherv", "coll", _V_IP),
    Test("scatter", "coll", _MOVE_IP),
    Test("scatterv", "coll", _V_IP),
    Test("allgather", "coll", _MOVE_IP),
    Test("allgatherv", "coll", _V_IP),
    Test("alltoall", "coll", _MOVE_IP),
    Test("alltoallv", "coll", _V_IP),
    Test("reduce_scatter", "coll", ("numpy", "double", "in_place"), reduction=True, min_size=8),
    Test("scan", "coll", _RED, reduction=True, min_size=8),
    Test("ibarrier", "nbc", ("call",), sized=False),
    Test("ibcast", "nbc", BYTE_FORMS),
    Test("iallreduce", "nbc", ("numpy", "double", "in_place"), reduction=True, min_size=8),
    Test("ialltoall", "nbc", (*BYTE_FORMS, "in_place")),
)
BY_NAME = {t.name: t for t in TESTS}


@dataclasses.dataclass(frozen=True)
class Step:
    """One message size of one job: `skip` untimed then `iters` timed iterations."""

    size: int
    skip: int
    iters: int


def counts(test: Test, size: int, scale: float = 1.0, min_iters: int = 2) -> tuple[int, int]:
    """(skip, iterations) for `test` at `size` bytes: OSU's defaults times `scale`, at least
    1 skipped and `min_iters` timed (a small scale leaves large sizes with a handful of
    iterations otherwise: first-touch page faults then dominate them)."""
    large = size > LARGE_MESSAGE_SIZE
    if test.kind == "lat":
        skip, iters = (10, 1000) if large else (100, 10000)
    elif test.kind == "bw":
        skip, iters = (2, 20) if large else (10, 100)
    else:
        skip, iters = (10, 100) if large else (100, 1000)
    return max(1, round(skip * scale)), max(min_iters, round(iters * scale))


def sizes_for(test: Test, form: str, max_size: int) -> list[int]:
    """The sizes OSU walks for `test` (0 or 1 B, then powers of two) up to `max_size`."""
    if not test.sized:
        return [0]
    low = max(test.min_size, 8 if form in DOUBLE_FORMS else 0)
    out = [0] if low == 0 else []
    size = 1
    while size <= max_size:
        if size >= low:
            out.append(size)
        size *= 2
    return out


def steps_for(test: Test, form: str, max_size: int, scale: float, min_iters: int = 2) -> list[Step]:
    """The plan of one (test, form): one Step per size (see `counts`)."""
    sizes = sizes_for(test, form, max_size)
    return [Step(s, *counts(test, s, scale, min_iters)) for s in sizes]


def headline(test: Test) -> str:
    """The metric that ratios and plots use: 'lat' (us), 'bw' (MB/s), 'avg' (us), 'comm' (us)."""
    return {"lat": "lat", "bw": "bw", "coll": "avg", "nbc": "comm"}[test.kind]
