"""Collectives through the region's collective area: sequence numbers and slabs, no messages.

A group of peers of one region (a communicator's members there) binds to one collective slot
(layout.py, "Collective area"). Every collective is a run of *rounds*; round k of a member
uses its cell k % 2 (an arrive line and a slab; layout.COLL_CELLS = 2):

1. wait until every other member's arrive seq of round k-1 (in its cell (k-1) % 2) says
   >= k-1: each has finished round k-2, so none reads this member's cell of round k-2,
   which round k overwrites;
2. write its contribution (if any) into its cell's slab, then the cell's arrive line:
   nbytes, kind and rounds (how many rounds this collective takes, for a v-variant), then
   seq = k last [R5];
3. load the arrive seq [A5] of round k (cell k % 2) of each member whose contribution it
   needs, wait for k, check kind and nbytes, and read the slab in place (reductions read
   it with numpy, no copy). The round ends when the reads end: nothing is stored.

So a member runs at most one round ahead of the slowest other: a root that only writes
(bcast, scatter) or a member that only sends (gather, reduce) returns from round k as soon
as its arrival is published and starts round k+1 once the others have *entered* round k,
while they still read its round k. Step 1 waits for arrivals, not for the end of reads, so a
member that raises before publishing round k (an argument error, see the MPI layer's
abandonment) holds every other member before round k+1: no member completes a collective
in the area after one that another member left by messages.

Sequence words carry the slot's generation in their high bits and the round in the low
COLL_SEQ_BITS: they only ever count up, so nothing is reset between calls, and a stale word
from the slot's previous group is told apart from this group's. Ownership is validation:
each member writes only its own arrive and sleep lines and its own slabs; everything read
from another member is loaded once and checked: its generation must be ours and the round
of a cell awaited for round t within [t-2, t] (step 1 bounds how far any member can run
ahead or lag: a cell holds t-2, or round 0 from the binding, until its member publishes
round t there, and nothing later before this member publishes round t+1), its kind and
nbytes equal what this call expects, its rounds no fewer than this member's data needs.
Offsets into slabs come from the reader's own arguments, never from shared memory. A
violation raises RingCorruptError naming the member's peer id and marks the group broken
for good; a member that died or left raises PeerLostError. Payloads larger than a slab
move in slab-sized rounds, each written once and read in place by every reader (the two
cells pipeline them: the writer fills the next piece while the readers copy this one).

Memory ordering (labels as in virtqueue.py / _fastpath.c): [R5]/[A5] the arrive seq store
after the slab and the nbytes/kind/rounds stores, paired with the readers' seq load before
they read those and the slab; the same seq store of round k+1 comes after this member's
reads of round k (program order), paired with the step-1 load of the member that then
overwrites the cell those reads were in. On x86-64 (TSO) the aligned 8-byte stores and
loads through region.u64 are single MOVs, seen in program order. [F3]/[F4]: the one
store->load pair that TSO may reorder, closed by full_fence: a waiter stores its sleep flag
then re-loads the word it waits for [F3]; a publisher stores its seq then loads the sleep
flags [F4] and kicks the sleepers: one of the two always sees the other (no lost wake-up).

Waiting spins for `spin_us` (by default the endpoint's: short where ranks outnumber CPUs),
yielding the CPU between polls when the group is crowded (`notify.crowded`: more members on
this kernel than CPUs in their affinity masks; spinning would steal the CPU from the peer it
waits for; no yield while waits are calm after a long yield: Endpoint.yield_cpu), then
blocks on the endpoint's doorbell in slices of WATCH_SLICE seconds, checking the awaited peer
after each. Every collective is written once as steps that yield what they wait for: the
blocking form waits for each here, the nonblocking form (CollectiveRequest) tests them when
polled.

The C accelerator (ring.CollectiveRound, when built and not IVSHMEM_COMM_PUREPYTHON=1) runs
a blocking collective that fits one round (a reduce-scatter: every block within a segment)
as one call: the steps of that round, the same
stores and loads in the same order with the same checks, its spin in C; when the spin ends
first it returns what it waits for, `_block` sleeps on the doorbell, and `resume` goes on.
Members on the C calls and on the steps interoperate in one group (the `_c_*` methods).

Byte strings (bcast_bytes, gather_bytes, allgather_bytes): payloads only their sender can
size, at most a slab each, in one round; a larger one is declined (rounds word 0) for the
caller to send otherwise.

Slots are allocated by agreement: one member (the leader) takes a free slot with
`claim_slot` and tells the others (slot, generation) by message; each builds its
CollectiveGroup and calls `wait_bound`. When no slot is free, callers keep to messages.
"""

from __future__ import annotations

import collections
import functools
import platform
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import numpy as np

from ivshmem_comm import layout, ring
from ivshmem_comm.endpoint import WATCH_SLICE, Endpoint
from ivshmem_comm.errors import (
    CollectiveTruncatedError,
    PeerLostError,
    RingCorruptError,
    TimeoutError,
)
from ivshmem_comm.notify import crowded
from ivshmem_comm.region import Region
from ivshmem_comm.ring import compare_exchange_u64, full_fence

# The kind stored with each arrival: members that run different collectives at once get an
# error naming the peer instead of reading each other's slabs as the wrong thing.
KIND_BARRIER = 1
KIND_BCAST = 2
KIND_GATHER = 3
KIND_SCATTER = 4
KIND_ALLGATHER = 5
KIND_ALLTOALL = 6
KIND_REDUCE = 7
KIND_ALLREDUCE = 8
KIND_REDUCE_SCATTER = 9
KIND_SCAN = 10
KIND_EXSCAN = 11
KIND_BCAST_BYTES = 12
KIND_GATHER_BYTES = 13
KIND_ALLGATHER_BYTES = 14

# The seq words, slabs and flags are loaded and stored through plain memoryview accesses,
# whose ordering is x86 TSO's (see the module docstring): elsewhere no slot is ever claimed,
# so collectives keep to messages there.
ORDERED_CPU = platform.machine() in ("x86_64", "AMD64", "i686")
ReduceOp = Callable[..., Any]  # op(acc, x, out=acc): numpy ufunc semantics, acc op x
# What a collective's steps yield when they must wait: (member rank, u64 index of its seq
# word, round to reach, field name for errors). The blocking driver spins then sleeps on it,
# a nonblocking request tests it once per progress call.
Wait = tuple[int, int, int, str]
# Block lengths a scatterv root's first arrival holds (one u64 per other member: the arrive
# line's words after the rounds word, then its spare line; _fastpath.c COLL_SCATTER_LENGTHS)
SCATTER_LENGTHS = (layout.COLL_LINE_STRIDE - layout.COLL_ARRIVE.size) // 8
# A broadcast round of at most this many bytes: the root puts them in its arrive line too,
# after the rounds word, where the C accelerator's members read them (one transfer of a
# line between CPUs fewer than the slab's); these steps read the slab (_fastpath.c
# COLL_BCAST_INLINE).
BCAST_INLINE = 32
ARRIVE_SEQ = "arrive seq"  # the field a wait names (the C accelerator names it alike)
Steps = Generator[Wait, None, None]
_WORD_MASK = 0xFFFFFFFF
# What ring.CollectiveRound runs in one call (its `which`), and the element types and ops of
# its reductions (`fold`): numpy ufunc semantics, native byte order only.
C_BARRIER, C_BCAST, C_GATHERV, C_SCATTERV, C_ALLGATHERV, C_ALLTOALLV = range(6)
C_BCAST_BYTES, C_GATHER_BYTES, C_ALLGATHER_BYTES = range(6, 9)
FOLD_DTYPES: dict[Any, int] = {
    np.dtype(t): code
    for code, t in enumerate(("=i1", "=i2", "=i4", "=i8", "=u1", "=u2", "=u4", "=u8", "=f4", "=f8"))
}
FOLD_OPS: dict[Any, int] = {
    ufunc: code
    for code, ufunc in enumerate(
        (np.add, np.multiply, np.maximum, np.minimum, np.bitwise_and, np.bitwise_or,
         np.bitwise_xor)
    )
}  # fmt: skip
FLOAT_BITWISE = 4  # FOLD_OPS codes from here on take integers only


def fold_codes(operand: Any, op: Any) -> tuple[int, int] | None:
    """(FOLD_DTYPES code, FOLD_OPS code) of a reduction of numpy array `operand` by ufunc
    `op` in C, or None where the C round does not fold that (the steps do)."""
    code = FOLD_DTYPES.get(getattr(operand, "dtype", None))
    opcode = FOLD_OPS.get(op)
    if code is None or opcode is None or (opcode >= FLOAT_BITWISE and operand.dtype.kind == "f"):
        return None
    return code, opcode


# ------------------------------------------------------------------ slot allocation
def _claim_is_stale(region: Region, word: int) -> bool:
    """Whether claim word `word` no longer names a READY holder of the claimed incarnation."""
    peer, incarnation = (word & _WORD_MASK) - 1, word >> 32
    if not 0 <= peer < region.max_peers:
        return True  # garbage: nobody can own it
    state, current = region.peer_state(peer)
    if state != layout.PEER_READY or current != incarnation:
        return True
    return region.peer(peer).holder_alive() is False


def claim_slot(region: Region, peer: int, incarnation: int) -> tuple[int, int] | None:
    """Take a free (or stale) collective slot for a group led by `peer` (`incarnation`).

    Returns (slot, generation) to tell the other members, or None if every slot is held by a
    live claimer or this CPU is not x86 (ORDERED_CPU; callers then use messages). The
    generation is the slot's previous one + 1.
    """
    g = region.geometry
    if not ORDERED_CPU:
        return None
    mine = (incarnation << 32) | (peer + 1)
    for slot in range(g.coll_slots):
        offset = g.coll_slot_offset(slot)
        word = region.u64[offset // 8]  # one load; the CAS below re-checks it
        if word and not _claim_is_stale(region, word):
            continue
        if not compare_exchange_u64(region.buf, offset, word, mine):
            continue
        # The header's generation word is ours while we hold the claim.
        generation = region.u64[offset // 8 + 1] % layout.COLL_GEN_MASK + 1
        region.u64[offset // 8 + 1] = generation
        return slot, generation
    return None


def release_slot(region: Region, slot: int, peer: int, incarnation: int) -> bool:
    """Free `slot` if `peer` (`incarnation`) holds it; True iff it did."""
    g = region.geometry
    if not 0 <= slot < g.coll_slots:
        raise ValueError(f"no collective slot {slot} (the region has {g.coll_slots})")
    mine = (incarnation << 32) | (peer + 1)
    return compare_exchange_u64(region.buf, g.coll_slot_offset(slot), mine, 0)


# ------------------------------------------------------------------ buffers
def _flat(buf: Any, writable: bool) -> memoryview:
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("collective buffers must be contiguous")
    if writable and view.readonly:
        raise ValueError("a receive buffer must be writable")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _pieces(total: int, chunk: int, index: int) -> tuple[int, int]:
    """(start, length) of piece `index` of `total` bytes cut in `chunk`-byte pieces (length 0
    past the end)."""
    start = min(index * chunk, total)
    return start, min(chunk, total - start)


def _rounds(total: int, chunk: int) -> int:
    return max(1, -(-total // chunk))


def _blocking(
    steps: Callable[..., Steps], one_round: Callable[..., bool] | None = None
) -> Callable[..., None]:
    """The blocking form of a collective written as steps: complete the started ones, then
    run these here (the docstring is the steps'). `one_round`, given the same arguments, runs
    the whole collective in one call of the C accelerator and returns True where it can
    (one round, C built), else returns False before anything moved."""

    @functools.wraps(steps)
    def run(self: CollectiveGroup, *args: Any, **kwargs: Any) -> None:
        if self._pending:
            self._complete_pending()
        if one_round is None or self._c is None or not one_round(self, *args, **kwargs):
            self._drive(steps(self, *args, **kwargs))

    if one_round is not None:
        _ONE_ROUND[steps.__name__.lstrip("_")] = one_round
    return run


# name of a collective -> its `one_round` (see _blocking), which `CollectiveGroup.start` also
# tries: the started collective is then the C round, polled (see `CollectiveGroup._in_c`).
_ONE_ROUND: dict[str, Callable[..., bool]] = {}


COLLECTIVES = (
    "barrier", "bcast", "gather", "gatherv", "gatherv_refused", "scatter", "scatterv",
    "allgather", "allgatherv", "alltoall", "alltoallv", "reduce", "allreduce", "scan", "exscan",
    "reduce_scatter_block", "reduce_scatter", "bcast_bytes", "gather_bytes", "allgather_bytes",
)  # fmt: skip


class CollectiveRequest:
    """A started collective (CollectiveGroup.start). `test()` advances it without waiting and
    says whether it completed; `wait()` completes it (and those started before it). Both
    raise the collective's error, again on every later call. `declined` and `truncated`,
    once it completed: the group's flags as this collective left them (a gatherv, scatterv
    or alltoallv its members declined; a scatterv whose block for this member was longer
    than its recvbuf; the group's flags belong to the collective that ended last)."""

    __slots__ = ("_error", "_group", "_steps", "_wait", "declined", "truncated")

    def __init__(
        self,
        group: CollectiveGroup,
        steps: Steps | None,
        declined: bool = False,
        truncated: bool = False,
    ) -> None:
        self._group = group
        self._steps: Steps | None = steps  # (None: done)
        self._wait: Wait | None = None
        self._error: BaseException | None = None
        self.declined = declined
        self.truncated = truncated

    @property
    def done(self) -> bool:
        return self._steps is None

    def _fail(self, exc: BaseException) -> None:
        # The group is broken: the collectives started after this one fail with it.
        for request in (self, *self._group._pending):
            request._error = exc
            request._steps = None
        self._group._pending.clear()

    def _advance(self) -> bool:
        """Run until a wait that is not satisfied yet; True iff the collective completed."""
        if self._error is not None:
            raise self._error
        if self._steps is None:
            return True
        return self._poll()

    def _poll(self) -> bool:
        """`_advance` of the pending collective (its steps)."""
        group = self._group
        steps = self._steps
        assert steps is not None
        try:
            while True:
                wait = self._wait
                if wait is not None and group._seq(*wait) < wait[2]:
                    group._watch(wait[0])
                    return False
                self._wait = next(steps)
        except StopIteration:
            self._steps = None
            self.declined = group.declined
            self.truncated = group.truncated
            return True
        except BaseException as exc:
            self._fail(exc)
            raise

    def _finish(self) -> None:
        if self._error is not None:
            raise self._error
        try:
            while not self._advance():
                assert self._wait is not None
                self._group._await(*self._wait)
        except BaseException as exc:
            if self._error is None:
                self._fail(exc)
            raise

    def test(self) -> bool:
        """Advance the group's started collectives; True iff this one completed."""
        self._group.progress()
        if self._error is not None:
            raise self._error
        return self.done

    def wait(self) -> None:
        """Complete this collective (and the ones started before it) here."""
        if not self.done:
            self._group._complete_pending(self)
        if self._error is not None:
            raise self._error


class RoundRequest(CollectiveRequest):
    """A started round of the C accelerator (CollectiveGroup.start_round) pending in its
    group: each poll is one call of CollectiveRound.resume (spin 0), which loads and checks
    the word the round waits for itself (no generator, no Python load first); `_wait` is
    what the last call ended on (for `_finish`'s blocking waits). An error of a poll marks
    round `_k` failed (`_c_failed`) and fails this request and those started after it."""

    __slots__ = ("_k",)

    def __init__(self, group: CollectiveGroup, k: int, wait: Wait) -> None:
        # CollectiveRequest's fields, set here without a call to its __init__ (one per
        # started round)
        self._group = group
        self._steps = _IN_C
        self._wait = wait
        self._error = None
        self.declined = self.truncated = False
        self._k = k

    def _poll(self, spin: int = 0) -> bool:
        """One poll (spinning up to `spin` ns in C, yielding the CPU between loads where the
        group is crowded); True iff the round completed (`declined` and `truncated` then
        set, as the group's)."""
        group = self._group
        try:
            c = group._c
            if c is None:
                raise group._broken or RuntimeError("collective group closed")
            result = c.resume(spin, group._yield)
            if result.__class__ is tuple:
                self._wait = result
                group._watch(result[0])
                return False
        except BaseException as exc:
            group._c_failed(self._k, exc)
            self._fail(exc)
            raise
        self._steps = None
        group._round = c.round  # (the round the call ended on: k, or later; see _c_round)
        self.declined = group.declined = result == 1
        self.truncated = group.truncated = result == 2
        return True

    def test(self) -> bool:
        """Advance the group's started collectives; True iff this round completed (as
        CollectiveRequest.test, read from `_steps`: a subclass may give `done` another
        meaning)."""
        self._group.progress()
        if self._error is not None:
            raise self._error
        return self._steps is None

    def wait(self) -> None:
        """Complete this round (and the collectives started before it) here (as
        CollectiveRequest.wait, read from `_steps`)."""
        if self._steps is not None:  # (pending: the group's first, see start_round)
            self._group._complete_pending(self)
        if self._error is not None:
            raise self._error

    def _finish(self, spun: bool = False) -> None:
        """Complete the round here as a blocking collective's C round waits (`_c_wait`):
        spin in C for the group's spin time (`spun`: a poll of that spin just found the
        round pending, `_wait` set: block first), then block on the word it waits for,
        resume; a failure of a wait marks the round failed too (the C call holds its
        buffers until then)."""
        if self._error is not None:
            raise self._error
        group = self._group
        spin = group._spin_ns
        try:
            while spun or not self._poll(spin):
                spun = False
                wait = self._wait
                assert wait is not None  # (set by the poll that found it pending)
                group._block(*wait)
        except BaseException as exc:
            if self._error is None:  # (a poll's error failed it already)
                group._c_failed(self._k, exc)
                self._fail(exc)
            raise


_IN_C: Any = object()  # a RoundRequest's `_steps` while its round is pending (C holds it)


class CollectiveGroup:
    """Member `members.index(endpoint.peer_id)` of the group `members` (peer ids, rank order)
    bound to collective slot `slot` of the endpoint's region at `generation`.

    Construction publishes this member's lines; call `wait_bound` before the first
    collective. Buffers are anything with the buffer protocol, counts and displacements in
    bytes; reductions take numpy arrays and an `op(acc, x, out=acc)` (a numpy ufunc). Every
    collective raises RingCorruptError naming a member that wrote something invalid or ran
    another collective (the group is then broken for good), PeerLostError if a member it
    waits for died or left, TimeoutError if `timeout` (seconds, None: none) passes in one
    wait, ValueError for buffers of the wrong size. `interrupt`, if given, is called while
    a wait is blocked, after each slice of WATCH_SLICE seconds no kick ended: whatever it
    raises ends the wait and breaks the group (the MPI layer checks there whether another
    member abandoned the collective). `spin_us`: how long a wait polls before it sleeps
    (None: as long as the endpoint's waits, `endpoint.spin_us`). Not thread-safe.

    Each collective has a blocking form (`bcast(...)`) and a nonblocking one
    (`start("bcast", ...)` -> CollectiveRequest). Members must start collectives in the same
    order; a blocking collective first completes the nonblocking ones started before it.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        slot: int,
        generation: int,
        members: Sequence[int],
        *,
        spin_us: float | None = None,
        timeout: float | None = None,
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        region = endpoint.region
        g = region.geometry
        if not 0 <= slot < g.coll_slots:
            raise ValueError(f"no collective slot {slot} (the region has {g.coll_slots})")
        if not 1 <= generation <= layout.COLL_GEN_MASK:
            raise ValueError(f"generation {generation} out of range 1..{layout.COLL_GEN_MASK}")
        members = list(members)
        if len(set(members)) != len(members) or endpoint.peer_id not in members:
            raise ValueError(f"members {members} must be distinct and include this peer")
        for p in members:
            region.peer_slot_offset(p)  # range check
        self.endpoint = endpoint
        self.region = region
        self.slot = slot
        self.members = members
        self.rank = members.index(endpoint.peer_id)
        self.size = len(members)
        self.timeout = timeout
        self.interrupt = interrupt
        self._pending: collections.deque[CollectiveRequest] = collections.deque()
        # While `start` tries a collective's one_round: the collective's steps, for a C round
        # that refuses its arguments (see _in_c); the C round's own steps land in _deferred.
        self._deferring: Callable[[], Steps] | None = None
        self._deferred: Steps | None = None
        self._watched = time.monotonic()  # when a polled request last checked its member
        self.slab_size = g.coll_slab
        self._u64 = region.u64
        blocks = [g.coll_peer_offset(slot, p) for p in members]
        cells = range(layout.COLL_CELLS)
        # per member, per cell: the u64 index of the arrive line, the slab
        self._arrive_i = [[(b + c * layout.COLL_LINE_STRIDE) // 8 for c in cells] for b in blocks]
        self._sleep_i = [(b + layout.COLL_SLEEP_OFFSET) // 8 for b in blocks]
        self._slabs = [
            [region.buf[at : at + g.coll_slab] for at in
             (b + layout.COLL_SLAB_OFFSET + c * g.coll_slab for c in cells)]
            for b in blocks
        ]  # fmt: skip
        self._gen = generation
        self._base = generation << layout.COLL_SEQ_BITS
        self._round = 0
        self._others = [r for r in range(self.size) if r != self.rank]
        self._incarnations = [0] * self.size  # of each member, recorded once it has bound
        self._broken: BaseException | None = None
        if spin_us is None:
            spin_us = endpoint.spin_us
        self._yield = crowded(region, members, endpoint.peer_id)
        self._spin = spin_us * 1e-6
        self._listening = False  # see listen()
        # True after a gatherv, scatterv or alltoallv that its members declined (see there).
        self.declined = False
        # After a refused gatherv at its root (see there): the members whose blocks go
        # otherwise (longer than a slab), the others' having been dropped from their slabs.
        self.by_messages: list[int] = []
        # True after a scatterv whose block for this member was longer than its recvbuf
        # (the round completed; see _scatterv).
        self.truncated = False
        # What start_round returns for a round its first poll completed: (neither, declined,
        # truncated), by the C round's result; done requests shared by every such call
        # (nothing changes a done one).
        self._done_rounds = (
            CollectiveRequest(self, None),
            CollectiveRequest(self, None, declined=True),
            CollectiveRequest(self, None, truncated=True),
        )
        me = self.rank
        u64 = self._u64
        u64[self._sleep_i[me]] = 0
        for index in reversed(self._arrive_i[me]):  # cell 0 last: the others wait for it
            u64[index + 1] = u64[index + 2] = u64[index + 3] = 0
            u64[index] = self._base  # [R5] round 0 of this generation
        self._incarnations[me] = endpoint.incarnation
        # The C accelerator of one-round collectives (None: the steps below do them all).
        self._spin_ns = int(spin_us * 1000)
        self._c = None
        if ring.CollectiveRound is not None:
            self._c = ring.CollectiveRound(
                region.buf, blocks, members, me, slot, generation, g.coll_slab,
                self._segment(), endpoint.notifier.kick,
            )  # fmt: skip

    # ------------------------------------------------------------------ binding, waiting
    def wait_bound(self, timeout: float | None = None) -> None:
        """Wait until every member has bound to this slot and generation.

        Raises TimeoutError naming the members not bound after `timeout` seconds (None: no
        limit), PeerLostError if one of them left or died meanwhile.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self._others:
            bound_i = self._arrive_i[r][0]
            while (self._u64[bound_i] >> layout.COLL_SEQ_BITS) != self._gen:
                try:
                    self._check_alive(r, bound=False)
                except PeerLostError:
                    # It may have bound, and left or died, since the load above.
                    if (self._u64[bound_i] >> layout.COLL_SEQ_BITS) != self._gen:
                        raise
                    self._broken = None
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"peer {self.members[r]} did not bind to collective slot {self.slot}"
                    )
                self.endpoint.notifier.wait(min(WATCH_SLICE, 1e-3))
            # Bound: a member may even have finished collectives and left since; what it
            # published stays valid, and a wait on it checks it only when nothing comes.
            self._incarnations[r] = self.region.peer_state(self.members[r])[1]

    def listen(self, on: bool) -> None:
        """Keep this member's sleep flag raised (True) while it waits somewhere else than in
        this group (on the endpoint's doorbell, e.g. an engine polling nonblocking
        collectives), so that every publication of the group kicks it; False lowers it."""
        self._listening = on
        self._u64[self._sleep_i[self.rank]] = int(on)
        full_fence()  # [F3] the flag before the caller's next load of a word it waits for

    def _corrupt(
        self, r: int, field: str, value: object, detail: str, truncated: bool = False
    ) -> RingCorruptError:
        kind = CollectiveTruncatedError if truncated else RingCorruptError
        error = kind(self.members[r], f"collective slot {self.slot} {field}", value, detail)
        self._broken = error
        return error

    def _seq(self, r: int, index: int, target: int, field: str) -> int:
        """The round in member r's seq word u64[index] (the cell it publishes round `target`
        in), loaded once [A5] and checked (window target-2..target: see the module
        docstring)."""
        word = self._u64[index]
        if word >> layout.COLL_SEQ_BITS != self._gen:
            raise self._corrupt(r, field, word, f"generation is not {self._gen}")
        value = word & layout.COLL_SEQ_MASK
        if not target - 2 <= value <= target:
            raise self._corrupt(r, field, value, f"round out of the window {target - 2}..{target}")
        return value

    def _check_alive(self, r: int, bound: bool = True) -> None:
        peer = self.members[r]
        state, incarnation = self.region.peer_state(peer)
        known = self._incarnations[r]
        gone = None
        if state in (layout.PEER_DEAD, layout.PEER_LEFT):
            gone = layout.PEER_STATE_NAMES[state]
        elif bound and known and incarnation != known:
            gone = f"incarnation {known} replaced by {incarnation}"
        elif state == layout.PEER_READY and self.region.peer(peer).holder_alive() is False:
            gone = "process exited without leaving"
        if gone is not None:
            self._broken = PeerLostError(peer, gone)
            raise self._broken

    def _until(self, r: int, index: int, target: int, field: str) -> Generator[Wait, None, None]:
        """Steps that end once member r's seq word u64[index] reaches round `target`."""
        if self._seq(r, index, target, field) < target:
            yield r, index, target, field

    def _await(self, r: int, index: int, target: int, field: str) -> None:
        """Return once member r's seq word u64[index] reaches round `target`: spin, then
        block on the doorbell in slices, checking r (and calling `interrupt`) after each
        slice that no kick ended."""
        if self._seq(r, index, target, field) >= target:
            return
        spin_end = time.monotonic() + self._spin
        while time.monotonic() < spin_end:
            if self._seq(r, index, target, field) >= target:
                return
            if self._yield and not self.endpoint.yield_cpu():
                break  # (waits are calm: yields handed the CPU away for long)
        self._block(r, index, target, field)

    def _block(self, r: int, index: int, target: int, field: str) -> None:
        """The blocking part of `_await` (no spin first)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        u64, sleep_i = self._u64, self._sleep_i[self.rank]
        notifier = self.endpoint.notifier
        try:
            while True:
                u64[sleep_i] = 1
                full_fence()  # [F3] our sleep flag before the re-load below
                if self._seq(r, index, target, field) >= target:
                    return
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise TimeoutError(
                        f"peer {self.members[r]} did not reach round {target} of collective "
                        f"slot {self.slot} in {self.timeout} s"
                    )
                self.region.heartbeat(self.endpoint.peer_id)
                slice_s = WATCH_SLICE if deadline is None else min(WATCH_SLICE, deadline - now)
                if not notifier.wait(slice_s):
                    self._check_alive(r)
                    if self.interrupt is not None:
                        self._interrupted()
        finally:
            u64[sleep_i] = int(self._listening)

    def _watch(self, r: int) -> None:
        """While a nonblocking collective is polled: check member r (once per WATCH_SLICE)."""
        now = time.monotonic()
        if now - self._watched >= WATCH_SLICE:
            self._watched = now
            self._check_alive(r)

    def _interrupted(self) -> None:
        assert self.interrupt is not None
        try:
            self.interrupt()
        except BaseException as exc:
            self._broken = exc
            raise

    def _drive(self, steps: Steps) -> None:
        """Run `steps` to the end here, waiting as they ask."""
        for wait in steps:
            self._await(*wait)

    def _wake(self) -> None:
        full_fence()  # [F4] our seq store before the sleep-flag loads below
        u64 = self._u64
        for r in self._others:
            if u64[self._sleep_i[r]]:
                self.endpoint.notifier.kick(self.members[r])

    # ------------------------------------------------------------------ one round
    def _enter(self) -> Generator[Wait, None, memoryview]:
        """Step 1 of the next round; returns this member's slab of it, now free to
        overwrite."""
        if self._broken is not None:
            raise self._broken
        k = self._round + 1
        if k > layout.COLL_SEQ_MASK:
            raise OverflowError("collective slot rounds exhausted; rebind the group")
        self._round = k
        before = (k - 1) % layout.COLL_CELLS
        for r in self._others:
            yield from self._until(r, self._arrive_i[r][before], k - 1, ARRIVE_SEQ)
        return self._slabs[self.rank][k % layout.COLL_CELLS]

    def _publish(self, kind: int, nbytes: int, rounds: int = 0) -> None:
        """Step 2 once the slab holds what this round publishes (`nbytes`: its length;
        `rounds`: the rounds of this collective, for members that cannot count them)."""
        u64, index = self._u64, self._arrive_i[self.rank][self._round % layout.COLL_CELLS]
        u64[index + 1] = nbytes
        u64[index + 2] = kind
        u64[index + 3] = rounds
        u64[index] = self._base | self._round  # [R5] after the slab, nbytes, kind, rounds
        self._wake()

    def _begin(self, kind: int, payload: Any = b"", rounds: int = 0) -> Steps:
        """Steps 1-2 with `payload` (bytes-like, at most a slab) as this round's contribution."""
        slab = yield from self._enter()
        nbytes = len(payload)
        slab[:nbytes] = payload
        self._publish(kind, nbytes, rounds)

    def _take(self, r: int, kind: int, nbytes: int | None) -> Generator[Wait, None, memoryview]:
        """Step 3 for member r: wait for its arrival, check it, return its first `nbytes`
        slab bytes (None: as many as it announced, at most a slab) as a view into the
        region, valid until this member publishes its next round."""
        cell = self._round % layout.COLL_CELLS
        index = self._arrive_i[r][cell]
        yield from self._until(r, index, self._round, ARRIVE_SEQ)
        found, found_kind = self._u64[index + 1], self._u64[index + 2]  # after [A5]
        if found_kind != kind:
            raise self._corrupt(r, "kind", found_kind, f"this member runs kind {kind}")
        if nbytes is None:
            if found > self.slab_size:
                raise self._corrupt(
                    r, "nbytes", found, f"more than a slab ({self.slab_size} bytes)"
                )
            nbytes = found
        elif found != nbytes:
            raise self._corrupt(
                r, "nbytes", found, f"this call expects {nbytes} bytes", found > nbytes
            )
        return self._slabs[r][cell][:nbytes]

    def _rounds_of(self, r: int, least: int, most: int | None = None) -> int:
        """The rounds word of member r's arrival, taken this round (after its [A5] load):
        at least `least` (the rounds this member's own data needs) and at most `most` (the
        collective's max_rounds), or 0 where r may decline the collective (`most` given:
        see `declined`)."""
        value = self._u64[self._arrive_i[r][self._round % layout.COLL_CELLS] + 3]
        if most is not None and value == 0:
            return 0
        top = _rounds(layout.MAX_MESSAGE, self._segment()) if most is None else most
        if not least <= value <= top:
            raise self._corrupt(r, "rounds", value, f"this member needs {least}..{top}")
        return value

    # ------------------------------------------------------------------ collectives
    def _barrier(self) -> Steps:
        """Return once every member has entered the barrier."""
        yield from self._begin(KIND_BARRIER)
        for r in self._others:
            yield from self._take(r, KIND_BARRIER, 0)

    def _bcast(self, buf: Any, root: int) -> Steps:
        """Copy the bytes of `buf` at rank `root` into `buf` at every other member."""
        view = _flat(buf, self.rank != root)
        chunk = self.slab_size
        for i in range(_rounds(len(view), chunk)):
            start, length = _pieces(len(view), chunk, i)
            if self.rank == root:
                slab = yield from self._enter()
                slab[:length] = view[start : start + length]
                if length <= BCAST_INLINE:  # (see there; before the seq store [R5])
                    at = (self._arrive_i[root][self._round % layout.COLL_CELLS] + 4) * 8
                    self.region.buf[at : at + length] = view[start : start + length]
                self._publish(KIND_BCAST, length)
            else:
                yield from self._begin(KIND_BCAST)
                view[start : start + length] = yield from self._take(root, KIND_BCAST, length)

    def _gather(self, sendbuf: Any, recvbuf: Any, root: int) -> Steps:
        """Rank r's `sendbuf` lands at byte r*len(sendbuf) of `recvbuf` at `root` (ignored
        elsewhere)."""
        n = len(_flat(sendbuf, False))
        yield from self._gatherv(
            sendbuf, recvbuf, [n] * self.size, [r * n for r in range(self.size)], root, n
        )

    def _gatherv(
        self,
        sendbuf: Any,
        recvbuf: Any,
        counts: Sequence[int],
        displs: Sequence[int],
        root: int,
        largest: int | None = None,
        max_rounds: int | None = None,
    ) -> Steps:
        """Rank r's `sendbuf` (counts[r] bytes) lands at byte displs[r] of `recvbuf` at
        `root`; counts/displs/recvbuf matter at the root only. `largest`: max(counts) if
        every rank knows it (else the root's first arrival says how many rounds).
        `max_rounds` (the same at every member): the root declines a gatherv that needs more
        rounds (its first arrival says 0 rounds); after one round every member returns with
        `declined` set and nothing moved, for the caller to move it otherwise. A member whose
        own block needs more knows the root declines: its arrival announces its size
        (nbytes, no data, rounds 0) and it does not wait for the root's word.

        `max_rounds` 1 (the area's, and the C round's): each block on its own. One within a
        slab goes in its member's slab, and that member returns once it published it: it
        never waits for the root (a gather's sender is done when its block is out, as an
        eager send; step 1 of its next round waits until the root published this one, so the
        root has read the slab before it is overwritten two rounds on). A longer one is
        announced (its length, no data) and its member returns with `declined` set, to send
        it otherwise; the root takes every arrival, checks each length against its counts,
        copies the blocks within a slab and, where any is longer, returns with `declined`
        set (those blocks, and its own, to move otherwise)."""
        self.declined = False
        send = _flat(sendbuf, False)
        chunk = self.slab_size
        is_root = self.rank == root
        if is_root:
            recv = _flat(recvbuf, True)
            self._check_layout(counts, displs, len(recv), "recv")
            if counts[root] != len(send):
                raise ValueError(f"root sends {len(send)} bytes, counts[{root}] is {counts[root]}")
        if max_rounds == 1:
            yield from self._gather_slabs(send, recv if is_root else None, counts, displs, root)
            return
        if is_root:
            rounds: int | None = _rounds(max(counts) if largest is None else largest, chunk)
        else:
            rounds = None if largest is None else _rounds(largest, chunk)
            if max_rounds is not None and _rounds(len(send), chunk) > max_rounds:
                yield from self._enter()
                self._publish(KIND_GATHER, len(send))
                self.declined = True
                return
        if is_root and max_rounds is not None and rounds is not None and rounds > max_rounds:
            yield from self._begin(KIND_GATHER, b"", 0)  # rounds word 0: declined
            self.declined = True
            return
        if is_root:
            recv[displs[root] : displs[root] + len(send)] = send
        i = 0
        while rounds is None or i < rounds:
            start, length = _pieces(len(send), chunk, i)
            payload = b"" if is_root else send[start : start + length]
            yield from self._begin(KIND_GATHER, payload, rounds or 0)
            if is_root:
                for r in self._others:
                    start, length = _pieces(counts[r], chunk, i)
                    at = displs[r] + start
                    recv[at : at + length] = yield from self._take(r, KIND_GATHER, length)
            elif rounds is None:  # the root says how many rounds
                yield from self._take(root, KIND_GATHER, 0)
                rounds = self._rounds_of(root, _rounds(len(send), chunk), max_rounds)
                if not rounds:
                    self.declined = True
                    return
            i += 1

    def _gather_slabs(
        self,
        send: memoryview,
        recv: memoryview | None,
        counts: Sequence[int],
        displs: Sequence[int],
        root: int,
    ) -> Steps:
        """A gatherv of one round, each block on its own (see `_gatherv`, max_rounds 1);
        `recv` None at a member that sends."""
        if recv is None:
            slab = yield from self._enter()
            fits = len(send) <= self.slab_size
            if fits:
                slab[: len(send)] = send
            self._publish(KIND_GATHER, len(send), 1 if fits else 0)
            self.declined = not fits  # (its block, announced, goes otherwise)
            return
        declined = any(counts[r] > self.slab_size for r in self._others)
        yield from self._begin(KIND_GATHER, b"", 0 if declined else 1)
        if not declined:
            recv[displs[root] : displs[root] + len(send)] = send
        for r in self._others:  # (nbytes checked to be counts[r]: no data where longer)
            theirs = yield from self._take(r, KIND_GATHER, counts[r])
            if counts[r] <= self.slab_size:
                recv[displs[r] : displs[r] + counts[r]] = theirs
        self.declined = declined

    def _gatherv_refused(self, root: int, max_rounds: int | None = None) -> Steps:
        """A gatherv's round at a `root` whose own arguments are wrong (it takes no block):
        every other member's arrival taken, its block (where in its slab) dropped, and the
        members whose blocks go otherwise (longer than a slab: announced without data) in
        `by_messages`; `declined` set, for the caller to take those into nothing.
        `max_rounds`: 1, as `_gatherv`'s (accepted for the callers' uniform call)."""
        if max_rounds != 1:
            raise ValueError("a refused gatherv is one round (max_rounds=1)")
        yield from self._begin(KIND_GATHER, b"", 0)
        senders = []
        for r in self._others:
            index = self._arrive_i[r][self._round % layout.COLL_CELLS]
            yield from self._until(r, index, self._round, ARRIVE_SEQ)
            found, found_kind = self._u64[index + 1], self._u64[index + 2]  # after [A5]
            if found_kind != KIND_GATHER:
                raise self._corrupt(r, "kind", found_kind, f"this member runs kind {KIND_GATHER}")
            if found > layout.MAX_MESSAGE:
                raise self._corrupt(r, "nbytes", found, f"more than {layout.MAX_MESSAGE}")
            if found > self.slab_size:
                senders.append(r)
        self.by_messages = senders
        self.declined = True

    def _scatter(self, sendbuf: Any, recvbuf: Any, root: int) -> Steps:
        """Rank r's `recvbuf` gets bytes r*n .. (r+1)*n of `sendbuf` at `root`, n =
        len(recvbuf); sendbuf matters at the root only."""
        n = len(_flat(recvbuf, True))
        displs = [r * n for r in range(self.size)]
        yield from self._scatterv(sendbuf, [n] * self.size, displs, recvbuf, root, n)

    def _scatterv(
        self,
        sendbuf: Any,
        counts: Sequence[int],
        displs: Sequence[int],
        recvbuf: Any,
        root: int,
        largest: int | None = None,
        max_rounds: int | None = None,
    ) -> Steps:
        """Rank r's `recvbuf` gets counts[r] bytes at displs[r] of `sendbuf` at `root`;
        `largest` (here: of the blocks but the root's) and `max_rounds` as for gatherv, but
        the root alone applies max_rounds, and not where its largest block takes no more
        rounds than there are cells: it takes them then (it never waits for a reader's copy,
        a reader copies one cell while the root fills the next; where the group is crowded
        messages would also wake each reader once per piece on CPUs the members share); the
        others take its first rounds word for the
        count (0: declined). The root's slab holds no block of its own: the others'
        take it all, piece i of block q at (q - (q > root)) * `_scatter_segment()`. Its
        first arrival also holds the others' block lengths (`_scatter_lengths`, in groups of
        up to SCATTER_LENGTHS + 1), from which a member learns its own: only that much of
        its recvbuf is written, and where the block is longer the round still completes,
        recvbuf holding its first bytes, with `truncated` set for the caller to report."""
        self.declined = self.truncated = False
        recv = _flat(recvbuf, True)
        is_root = self.rank == root
        if is_root:
            send = _flat(sendbuf, False)
            self._check_layout(counts, displs, len(send), "send")
            if counts[root] != len(recv):
                raise ValueError(
                    f"root receives {len(recv)} bytes, counts[{root}] is {counts[root]}"
                )
            recv[:] = send[displs[root] : displs[root] + len(recv)]
        seg = self._scatter_segment()
        used = seg * (self.size - 1)
        if is_root:
            most = max((c for q, c in enumerate(counts) if q != root), default=0)
            rounds: int | None = _rounds(most if largest is None else largest, seg)
        else:
            rounds = None if largest is None else _rounds(largest, seg)
        if (
            is_root
            and max_rounds is not None
            and rounds is not None
            and rounds > max(max_rounds, layout.COLL_CELLS)
        ):
            yield from self._enter()
            self._publish(KIND_SCATTER, used, 0)  # rounds word 0: declined
            self.declined = True
            return
        i = 0
        while rounds is None or i < rounds:
            slab = yield from self._enter()
            if is_root:
                lengths = self._scatter_lengths(self.rank) if i == 0 else None
                if lengths is not None:
                    for r in self._others:
                        self._u64[lengths + r - (r > root)] = counts[r]
                for r in self._others:
                    start, length = _pieces(counts[r], seg, i)
                    at = (r - (r > root)) * seg
                    slab[at : at + length] = send[displs[r] + start :][:length]
            self._publish(KIND_SCATTER, used if is_root else 0, rounds or 0)
            if not is_root:
                theirs = yield from self._take(root, KIND_SCATTER, used)
                if rounds is None:  # the root says how many rounds (0: declined)
                    top = None if max_rounds is None else _rounds(layout.MAX_MESSAGE, seg)
                    rounds = self._rounds_of(root, 1, top)
                    if not rounds:
                        self.declined = True
                        return
                if i == 0:  # this member's block: loaded once, within the root's rounds
                    lengths = self._scatter_lengths(root)
                    me = self.rank
                    block = len(recv) if lengths is None else self._u64[lengths + me - (me > root)]
                    if block > rounds * seg:
                        raise self._corrupt(
                            root, "block", block, f"more than its {rounds} rounds of {seg} bytes"
                        )
                    self.truncated = block > len(recv)
                start, length = _pieces(min(block, len(recv)), seg, i)
                at = (self.rank - (self.rank > root)) * seg
                recv[start : start + length] = theirs[at:][:length]
            i += 1

    def _allgather(self, sendbuf: Any, recvbuf: Any) -> Steps:
        """Every rank's `recvbuf` gets rank r's `sendbuf` at byte r*len(sendbuf)."""
        n = len(_flat(sendbuf, False))
        yield from self._allgatherv(
            sendbuf, recvbuf, [n] * self.size, [r * n for r in range(self.size)]
        )

    def _allgatherv(
        self, sendbuf: Any, recvbuf: Any, counts: Sequence[int], displs: Sequence[int]
    ) -> Steps:
        """Every rank's `recvbuf` gets rank r's `sendbuf` (counts[r] bytes) at displs[r]."""
        send, recv = _flat(sendbuf, False), _flat(recvbuf, True)
        self._check_layout(counts, displs, len(recv), "recv")
        me = self.rank
        if counts[me] != len(send):
            raise ValueError(f"rank {me} sends {len(send)} bytes, counts[{me}] is {counts[me]}")
        recv[displs[me] : displs[me] + len(send)] = send
        chunk = self.slab_size
        for i in range(_rounds(max(counts), chunk)):
            start, length = _pieces(len(send), chunk, i)
            yield from self._begin(KIND_ALLGATHER, send[start : start + length])
            for r in self._others:
                start, length = _pieces(counts[r], chunk, i)
                at = displs[r] + start
                recv[at : at + length] = yield from self._take(r, KIND_ALLGATHER, length)

    def _alltoall(self, sendbuf: Any, recvbuf: Any) -> Steps:
        """Block q (len(sendbuf)/size bytes) of rank r's `sendbuf` lands as block r of rank
        q's `recvbuf`."""
        send = _flat(sendbuf, False)
        n, rest = divmod(len(send), self.size)
        if rest:
            raise ValueError(f"alltoall: {len(send)} bytes do not split into {self.size} blocks")
        every = [r * n for r in range(self.size)]
        yield from self._alltoallv(sendbuf, [n] * self.size, every, recvbuf, [n] * self.size, every)

    def _alltoallv(
        self,
        sendbuf: Any,
        sendcounts: Sequence[int],
        senddispls: Sequence[int],
        recvbuf: Any,
        recvcounts: Sequence[int],
        recvdispls: Sequence[int],
        max_rounds: int | None = None,
    ) -> Steps:
        """sendcounts[q] bytes at senddispls[q] of rank r's `sendbuf` land at recvdispls[r]
        of rank q's `recvbuf` (recvcounts[r] bytes). `max_rounds` (the same at every
        member): a member whose data needs more rounds declines (its first arrival says 0
        rounds); after one round every member returns with `declined` set, having written
        no other member's block into recvbuf (a round reads every arrival before it writes
        any, so that in place, sendbuf over recvbuf, the caller still holds what it sends
        its other way)."""
        self.declined = False
        send, recv = _flat(sendbuf, False), _flat(recvbuf, True)
        self._check_layout(sendcounts, senddispls, len(send), "send")
        self._check_layout(recvcounts, recvdispls, len(recv), "recv")
        me = self.rank
        if sendcounts[me] != recvcounts[me]:
            raise ValueError(
                f"rank {me} sends itself {sendcounts[me]} bytes, expects {recvcounts[me]}"
            )
        recv[recvdispls[me] :][: recvcounts[me]] = send[senddispls[me] :][: sendcounts[me]]
        seg = self._scatter_segment()  # (the slab holds no block of this member's own)
        used = seg * (self.size - 1)
        mine = _rounds(max(*sendcounts, *recvcounts), seg)
        rounds = mine  # the most any member needs: known after the first round
        declined = max_rounds is not None and mine > max_rounds
        i = 0
        while i < rounds:
            slab = yield from self._enter()
            for q in self._others:
                start, length = _pieces(sendcounts[q], seg, i)
                at = (q - (q > me)) * seg
                slab[at : at + length] = send[senddispls[q] + start :][:length]
            self._publish(KIND_ALLTOALL, used, 0 if declined else mine)
            taken = []
            for r in self._others:
                theirs = yield from self._take(r, KIND_ALLTOALL, used)
                if i == 0:
                    word = self._rounds_of(r, 1, max_rounds)
                    declined = declined or not word
                    rounds = max(rounds, word)
                taken.append((r, theirs))
            if declined:
                self.declined = True
                return
            for r, theirs in taken:  # (their cells stay until this member publishes again)
                start, length = _pieces(recvcounts[r], seg, i)
                recv[recvdispls[r] + start :][:length] = theirs[(me - (me > r)) * seg :][:length]
            i += 1

    # ------------------------------------------------------------------ byte strings
    # Payloads whose size only their sender knows (the MPI face's pickled objects), at most a
    # slab each, in one round: a sender publishes its bytes with rounds word 1, or nothing
    # with rounds word 0 when they are larger than a slab (it declines: the caller moves
    # those otherwise; `declined` is then set on the sender and on every member that takes
    # from it). `taken` (one entry per member, None on entry) gets the bytes of each member
    # this one takes from, None where it declined.
    def _bcast_bytes(self, data: Any, root: int, taken: list[bytes | None]) -> Steps:
        """`root`'s `data` into taken[root] of every other member (data ignored there)."""
        is_root = self.rank == root
        yield from self._bytes_round(
            KIND_BCAST_BYTES, data, is_root, [] if is_root else [root], taken
        )

    def _gather_bytes(self, data: Any, root: int, taken: list[bytes | None]) -> Steps:
        """Member r's `data` into taken[r] at `root` (whose own data is ignored)."""
        is_root = self.rank == root
        yield from self._bytes_round(
            KIND_GATHER_BYTES, data, not is_root, self._others if is_root else [], taken
        )

    def _allgather_bytes(self, data: Any, taken: list[bytes | None]) -> Steps:
        """Member r's `data` into taken[r] of every other member."""
        yield from self._bytes_round(KIND_ALLGATHER_BYTES, data, True, self._others, taken)

    def _bytes_round(
        self, kind: int, data: Any, sends: bool, takes: list[int], taken: list[bytes | None]
    ) -> Steps:
        self.declined = False
        fits = sends and len(data) <= self.slab_size
        yield from self._begin(kind, data if fits else b"", int(fits))
        for r in takes:
            theirs = yield from self._take(r, kind, None)
            if self._rounds_of(r, 1, 1):
                taken[r] = bytes(theirs)
            else:
                self.declined = True
        self.declined = self.declined or (sends and not fits)

    # ------------------------------------------------------------------ reductions
    def _reduce(
        self, sendbuf: np.ndarray, recvbuf: np.ndarray | None, op: ReduceOp, root: int
    ) -> Steps:
        """recvbuf at `root` = sendbuf of rank 0 op rank 1 op ... (elementwise, rank order)."""
        yield from self._fold(KIND_REDUCE, sendbuf, recvbuf, op, lambda r: r == root, self.size)

    def _allreduce(self, sendbuf: np.ndarray, recvbuf: np.ndarray, op: ReduceOp) -> Steps:
        """recvbuf at every rank = sendbuf of rank 0 op rank 1 op ... (rank order)."""
        yield from self._fold(KIND_ALLREDUCE, sendbuf, recvbuf, op, lambda r: True, self.size)

    def _scan(self, sendbuf: np.ndarray, recvbuf: np.ndarray, op: ReduceOp) -> Steps:
        """recvbuf at rank r = sendbuf of ranks 0..r reduced in rank order."""
        yield from self._fold(KIND_SCAN, sendbuf, recvbuf, op, lambda r: True, self.rank + 1)

    def _exscan(self, sendbuf: np.ndarray, recvbuf: np.ndarray, op: ReduceOp) -> Steps:
        """recvbuf at rank r > 0 = sendbuf of ranks 0..r-1 reduced; rank 0's is untouched."""
        yield from self._fold(KIND_EXSCAN, sendbuf, recvbuf, op, lambda r: r > 0, self.rank)

    def _fold(
        self,
        kind: int,
        sendbuf: np.ndarray,
        recvbuf: np.ndarray | None,
        op: ReduceOp,
        wants: Callable[[int], bool],
        upto: int,
    ) -> Steps:
        send = np.ascontiguousarray(sendbuf).reshape(-1)
        want = wants(self.rank)
        recv = None
        if want:
            assert recvbuf is not None, "this rank receives the result"
            recv = recvbuf.reshape(-1)
            if recv.size != send.size or recv.dtype != send.dtype:
                raise ValueError(
                    f"reduction buffers differ: {send.size} {send.dtype} "
                    f"vs {recv.size} {recv.dtype}"
                )
        itemsize = send.dtype.itemsize
        per = max(1, self.slab_size // itemsize)
        for i in range(_rounds(send.size, per)):
            start, count = _pieces(send.size, per, i)
            mine = send[start : start + count]
            yield from self._begin(kind, mine.data.cast("B"))
            if want and upto:
                assert recv is not None
                nbytes = count * itemsize
                recv[start : start + count] = yield from self._folded(
                    kind, nbytes, upto, mine, lambda raw: raw, op
                )

    def _folded(
        self,
        kind: int,
        nbytes: int,
        upto: int,
        own: np.ndarray,
        part: Callable[[memoryview], memoryview],
        op: ReduceOp,
    ) -> Generator[Wait, None, np.ndarray]:
        """The fold in rank order of the operands of ranks 0 .. upto-1 (upto >= 1): this
        rank's is `own`, member r's is part(the `nbytes` it announced in its slab)."""
        acc = None
        for r in range(upto):
            if r == self.rank:
                x = own
            else:
                raw = yield from self._take(r, kind, nbytes)
                x = np.frombuffer(part(raw), own.dtype)
            if acc is None:
                acc = x.copy()
            else:
                op(acc, x, out=acc)
        assert acc is not None
        return acc

    def _reduce_scatter_block(
        self, sendbuf: np.ndarray, recvbuf: np.ndarray, op: ReduceOp
    ) -> Steps:
        """recvbuf at rank r = block r (recvbuf.size elements) of every rank's sendbuf,
        reduced in rank order."""
        yield from self._reduce_scatter(
            sendbuf, recvbuf, [np.asarray(recvbuf).size] * self.size, op
        )

    def _reduce_scatter(
        self, sendbuf: np.ndarray, recvbuf: np.ndarray, counts: Sequence[int], op: ReduceOp
    ) -> Steps:
        """recvbuf at rank r = elements sum(counts[:r]) .. + counts[r] of every rank's
        sendbuf, reduced in rank order (counts in elements, the same at every rank)."""
        send = np.ascontiguousarray(sendbuf).reshape(-1)
        recv = recvbuf.reshape(-1)
        me = self.rank
        if len(counts) != self.size or min(counts) < 0 or sum(counts) != send.size:
            raise ValueError(f"reduce_scatter: counts {list(counts)} do not cover {send.size}")
        if recv.size != counts[me] or recv.dtype != send.dtype:
            raise ValueError(f"reduce_scatter: rank {me} receives {counts[me]} {send.dtype}")
        firsts = np.cumsum([0, *counts[:-1]]).tolist()
        itemsize = send.dtype.itemsize
        seg = self._segment()
        per = max(1, seg // itemsize)
        used = seg * self.size
        for i in range(_rounds(max(counts), per)):
            slab = yield from self._enter()
            for q in range(self.size):
                start, count = _pieces(counts[q], per, i)
                piece = send[firsts[q] + start :][:count]
                slab[q * seg : q * seg + count * itemsize] = piece.data.cast("B")
            self._publish(KIND_REDUCE_SCATTER, used)
            start, count = _pieces(counts[me], per, i)

            def part(raw: memoryview, count: int = count) -> memoryview:
                return raw[me * seg :][: count * itemsize]

            own = np.frombuffer(part(slab), send.dtype)
            recv[start : start + count] = yield from self._folded(
                KIND_REDUCE_SCATTER, used, self.size, own, part, op
            )

    # ------------------------------------------------------------------ in one C call
    # Each `_c_*` takes the arguments of its collective's steps. Where the collective is one
    # round and its arguments are the ones the steps accept (each check below is the steps'
    # own, so a bad argument still gets their error, from them), it runs the round in one
    # call of ring.CollectiveRound and returns True; else it returns False having done
    # nothing. The C round stores and loads the same words in the same order as the steps.
    def _in_c(self, run: Callable[..., Any], *args: Any) -> bool:
        """Round k = this member's next of `run` (CollectiveRound.run or .fold) with `args`:
        spin in C, block here (`_block`) when the spin ends first, resume (a round that
        completes within its spin costs one C call and no generator). While `start` tries
        it (`_deferring`), the round is not run but kept as steps (`_c_steps`, each call of
        C a poll) in `_deferred`, for the started collective."""
        if self._deferring is not None:
            self._deferred = self._c_steps(run, args, 0, self._deferring)
            return True
        k, result = self._c_first(run, args, self._spin_ns)
        if result.__class__ is not tuple:
            self.declined = result == 1
            self.truncated = result == 2
            return True
        self._c_wait(k, result)
        return True

    def _c_wait(self, k: int, wait: tuple[int, int, int, str]) -> None:
        """The rest of C round k (this member's current) after a call that returned `wait`:
        block here (`_block`), resume in C, until it completes (`declined` set); errors as
        `_c_rest`."""
        steps = self._c_rest(k, wait, self._spin_ns)
        for step in steps:
            try:
                self._block(*step)
            except BaseException as exc:
                steps.throw(exc)  # (re-raised there, once the round is marked failed)

    def _c_steps(
        self,
        run: Callable[..., Any],
        args: tuple[Any, ...],
        spin: int,
        refused: Callable[[], Steps] | None = None,
    ) -> Steps:
        """Round k of `run` with `args` as steps (`_c_first`, then `_c_rest`); with
        `refused` given, arguments the C call refuses run those steps instead."""
        try:
            k, result = self._c_first(run, args, spin)
        except (ValueError, TypeError, BufferError):
            if refused is None:
                raise
            yield from refused()
            return
        yield from self._c_rest(k, result, spin)

    def _c_first(
        self, run: Callable[..., Any], args: tuple[Any, ...], spin: int
    ) -> tuple[int, Any]:
        """The first C call of round k (this member's next) of `run` with `args`, spinning
        up to `spin` ns on each wait: (k, its result: 0 / 1 the round done, see
        `declined`; else the wait it ended on, for `_c_rest`; None where `run` is
        CollectiveRound.front and does not take the arguments: the round is not taken). The
        C call's checks of its arguments raise before it touches the slot (ValueError,
        TypeError, BufferError: the round is not taken); any other error marks round k
        failed (`_c_failed`)."""
        k = self._round + 1
        if self._broken is not None or k > layout.COLL_SEQ_MASK:
            k = self._next_round()  # (raises)
        try:
            result = run(k, spin, self._yield, *args)
        except (ValueError, TypeError, BufferError):
            raise
        except BaseException as exc:
            self._c_failed(k, exc)
            raise
        if result is not None:
            self._round = self._c_round(k)
        return k, result

    def _c_round(self, k: int) -> int:
        """The round C's call of round k is at (or ended on): k, or later for a scatterv of
        several rounds (CollectiveRound.round)."""
        c = self._c
        return k if c is None else max(k, c.round)

    def _next_round(self) -> int:
        """The number of this member's next round (the group broken: its error)."""
        if self._broken is not None:
            raise self._broken
        k = self._round + 1
        if k > layout.COLL_SEQ_MASK:
            raise OverflowError("collective slot rounds exhausted; rebind the group")
        return k

    def _c_rest(self, k: int, result: Any, spin: int) -> Steps:
        """The rest of C round k after a call that returned `result`: each wait it ends on
        is yielded, then C resumes (up to `spin` ns); `declined` is set at its end. An
        error, here or thrown in at a wait, marks round k failed (`_c_failed`)."""
        c = self._c
        assert c is not None
        crowded = self._yield
        try:
            while result.__class__ is tuple:
                yield result
                result = c.resume(spin, crowded)
        except BaseException as exc:  # (GeneratorExit too: a failed group drops its requests)
            self._c_failed(k, exc)
            raise
        self._round = self._c_round(k)
        self.declined = result == 1
        self.truncated = result == 2

    def _c_bytes(self, which: int, data: Any, root: int, taken: list[bytes | None]) -> bool:
        c = self._c
        assert c is not None
        if self._deferring is not None:
            return False  # (started: its steps, which fill `taken` as they go)
        self._in_c(c.run, which, data, None, root, None, None, None, None)
        taken[:] = c.taken
        return True

    def _c_bcast_bytes(self, data: Any, root: int, taken: list[bytes | None]) -> bool:
        return self._c_bytes(C_BCAST_BYTES, data, root, taken)

    def _c_gather_bytes(self, data: Any, root: int, taken: list[bytes | None]) -> bool:
        return self._c_bytes(C_GATHER_BYTES, data, root, taken)

    def _c_allgather_bytes(self, data: Any, taken: list[bytes | None]) -> bool:
        return self._c_bytes(C_ALLGATHER_BYTES, data, 0, taken)

    def _c_failed(self, k: int, exc: BaseException) -> None:
        """Round k failed in C (or while blocked): it was taken (and the later ones of a
        scatterv of several rounds that C reached); a corrupt member breaks the group as in
        `_corrupt`."""
        self._round = self._c_round(k)
        if self._c is not None:  # (None: closed, e.g. a dropped request's steps closed late)
            self._c.abort()
        if isinstance(exc, RingCorruptError):
            self._broken = exc

    def _c_barrier(self) -> bool:
        return self._c_run(C_BARRIER, None, None, 0)

    def _c_run(
        self,
        which: int,
        send: memoryview | None,
        recv: memoryview | None,
        root: int,
        counts: Sequence[int] | None = None,
        displs: Sequence[int] | None = None,
        rcounts: Sequence[int] | None = None,
        rdispls: Sequence[int] | None = None,
    ) -> bool:
        assert self._c is not None
        return self._in_c(self._c.run, which, send, recv, root, counts, displs, rcounts, rdispls)

    def _c_bcast(self, buf: Any, root: int) -> bool:
        view = _flat(buf, self.rank != root)
        return len(view) <= self.slab_size and self._c_run(C_BCAST, view, view, root)

    def _c_gatherv(
        self,
        sendbuf: Any,
        recvbuf: Any,
        counts: Sequence[int],
        displs: Sequence[int],
        root: int,
        largest: int | None = None,
        max_rounds: int | None = None,
    ) -> bool:
        if max_rounds != 1:  # (the C round expects the root's rounds word to be 0 or 1)
            return False
        send = _flat(sendbuf, False)
        recv = None
        if self.rank == root:
            recv = _flat(recvbuf, True)
            self._check_layout(counts, displs, len(recv), "recv")
            if counts[root] != len(send):
                return False
        # (a block over a slab: the C round declines it, as the steps do)
        return self._c_run(C_GATHERV, send, recv, root, counts, displs)

    def _c_scatterv(
        self,
        sendbuf: Any,
        counts: Sequence[int],
        displs: Sequence[int],
        recvbuf: Any,
        root: int,
        largest: int | None = None,
        max_rounds: int | None = None,
    ) -> bool:
        if max_rounds != 1:
            return False
        recv = _flat(recvbuf, True)
        send = None
        if self.rank == root:
            send = _flat(sendbuf, False)
            self._check_layout(counts, displs, len(send), "send")
            if counts[root] != len(recv):
                return False
        # (a block over a segment: the C round declines it, as the steps do)
        return self._c_run(C_SCATTERV, send, recv, root, counts, displs)

    def _c_allgather(self, sendbuf: Any, recvbuf: Any) -> bool:
        n = len(_flat(sendbuf, False))
        return self._c_allgatherv(
            sendbuf, recvbuf, [n] * self.size, [r * n for r in range(self.size)]
        )

    def _c_allgatherv(
        self, sendbuf: Any, recvbuf: Any, counts: Sequence[int], displs: Sequence[int]
    ) -> bool:
        send, recv = _flat(sendbuf, False), _flat(recvbuf, True)
        self._check_layout(counts, displs, len(recv), "recv")
        if counts[self.rank] != len(send) or max(counts) > self.slab_size:
            return False
        return self._c_run(C_ALLGATHERV, send, recv, 0, counts, displs)

    def _c_alltoallv(
        self,
        sendbuf: Any,
        sendcounts: Sequence[int],
        senddispls: Sequence[int],
        recvbuf: Any,
        recvcounts: Sequence[int],
        recvdispls: Sequence[int],
        max_rounds: int | None = None,
    ) -> bool:
        if max_rounds != 1:
            return False
        send, recv = _flat(sendbuf, False), _flat(recvbuf, True)
        self._check_layout(sendcounts, senddispls, len(send), "send")
        self._check_layout(recvcounts, recvdispls, len(recv), "recv")
        me = self.rank
        if sendcounts[me] != recvcounts[me]:
            return False
        # (a block over a segment: the C round declines it, as the steps do)
        return self._c_run(
            C_ALLTOALLV, send, recv, 0, sendcounts, senddispls, recvcounts, recvdispls
        )

    def _c_fold(
        self, kind: int, sendbuf: Any, recvbuf: Any, op: ReduceOp, want: bool, upto: int
    ) -> bool:
        """A reduction (see `_fold`) in C: native numeric types, numpy's own ufuncs."""
        codes = fold_codes(sendbuf, op)
        if codes is None or sendbuf.nbytes > self.slab_size or not sendbuf.flags.c_contiguous:
            return False
        dtype = sendbuf.dtype
        if want:
            if (
                getattr(recvbuf, "dtype", None) != dtype
                or recvbuf.size != sendbuf.size
                or not recvbuf.flags.c_contiguous
                or not recvbuf.flags.aligned
            ):
                return False
        else:
            recvbuf = None
        assert self._c is not None
        return self._in_c(self._c.fold, kind, sendbuf, recvbuf, upto, *codes)

    def _c_reduce(self, sendbuf: Any, recvbuf: Any, op: ReduceOp, root: int) -> bool:
        return self._c_fold(KIND_REDUCE, sendbuf, recvbuf, op, self.rank == root, self.size)

    def _c_allreduce(self, sendbuf: Any, recvbuf: Any, op: ReduceOp) -> bool:
        return self._c_fold(KIND_ALLREDUCE, sendbuf, recvbuf, op, True, self.size)

    def _c_scan(self, sendbuf: Any, recvbuf: Any, op: ReduceOp) -> bool:
        return self._c_fold(KIND_SCAN, sendbuf, recvbuf, op, True, self.rank + 1)

    def _c_exscan(self, sendbuf: Any, recvbuf: Any, op: ReduceOp) -> bool:
        return self._c_fold(KIND_EXSCAN, sendbuf, recvbuf, op, self.rank > 0, self.rank)

    def _c_reduce_scatter(
        self, sendbuf: Any, recvbuf: Any, counts: Sequence[int], op: ReduceOp
    ) -> bool:
        """A reduce-scatter (see `_reduce_scatter`) in C where every block fits a segment."""
        codes = fold_codes(sendbuf, op)
        if (
            codes is None
            or len(counts) != self.size
            or min(counts) < 0
            or sum(counts) != sendbuf.size
            or sendbuf.nbytes > self.slab_size
            or not sendbuf.flags.c_contiguous
            or getattr(recvbuf, "dtype", None) != sendbuf.dtype
            or recvbuf.size != counts[self.rank]
            or not recvbuf.flags.c_contiguous
            or not recvbuf.flags.aligned
        ):
            return False
        itemsize = sendbuf.itemsize
        nbytes = [count * itemsize for count in counts]
        if max(nbytes) > self._segment():
            return False
        assert self._c is not None
        return self._in_c(
            self._c.fold, KIND_REDUCE_SCATTER, sendbuf, recvbuf, self.size, *codes, nbytes
        )

    def _c_reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: ReduceOp) -> bool:
        return self._c_reduce_scatter(sendbuf, recvbuf, [recvbuf.size] * self.size, op)

    # ------------------------------------------------------------------ the two forms
    barrier = _blocking(_barrier, _c_barrier)
    bcast = _blocking(_bcast, _c_bcast)
    gather = _blocking(_gather)
    gatherv = _blocking(_gatherv, _c_gatherv)
    gatherv_refused = _blocking(_gatherv_refused)
    scatter = _blocking(_scatter)
    scatterv = _blocking(_scatterv, _c_scatterv)
    allgather = _blocking(_allgather, _c_allgather)
    allgatherv = _blocking(_allgatherv, _c_allgatherv)
    alltoall = _blocking(_alltoall)
    alltoallv = _blocking(_alltoallv, _c_alltoallv)
    reduce = _blocking(_reduce, _c_reduce)
    allreduce = _blocking(_allreduce, _c_allreduce)
    scan = _blocking(_scan, _c_scan)
    exscan = _blocking(_exscan, _c_exscan)
    bcast_bytes = _blocking(_bcast_bytes, _c_bcast_bytes)
    gather_bytes = _blocking(_gather_bytes, _c_gather_bytes)
    allgather_bytes = _blocking(_allgather_bytes, _c_allgather_bytes)
    reduce_scatter_block = _blocking(_reduce_scatter_block, _c_reduce_scatter_block)
    reduce_scatter = _blocking(_reduce_scatter, _c_reduce_scatter)

    def start(self, name: str, *args: Any, **kwargs: Any) -> CollectiveRequest:
        """Start collective `name` (one of the blocking methods' names) with that method's
        arguments; the buffers must stay untouched until the request completes. Raises
        ValueError for an unknown name; the collective's own errors come from the request
        (or from here, if it fails before its first wait)."""
        if name not in COLLECTIVES:
            raise ValueError(f"no collective {name!r}; one of {', '.join(COLLECTIVES)}")
        steps = functools.partial(getattr(self, "_" + name), *args, **kwargs)
        one_round = _ONE_ROUND.get(name)
        taken: Steps | None = None
        if one_round is not None and self._c is not None:
            self._deferring = steps
            try:
                if one_round(self, *args, **kwargs):
                    taken = self._deferred
            finally:
                self._deferring = self._deferred = None
        request = CollectiveRequest(self, steps() if taken is None else taken)
        self._pending.append(request)
        self.progress()
        return request

    def start_round(self, run: Callable[..., Any], *args: Any) -> CollectiveRequest | None:
        """`start_round_as` with a RoundRequest for the pending round."""
        return self.start_round_as(RoundRequest, run, *args)

    def start_round_as(
        self, pending: type[RoundRequest], run: Callable[..., Any], *args: Any
    ) -> CollectiveRequest | None:
        """`start` for a collective of one round whose C arguments the caller made: round
        k of `run` (CollectiveRound.run or .fold; or .front with the user's arguments) with
        `args`, polled once now. Returns the request (done already where that poll completed
        the round: one of three shared done requests, by `declined` and `truncated`; pending
        in the group otherwise, as a started one: `pending(group, k, wait)`, a RoundRequest or
        a subclass made the same way; it is the group's first pending request until its
        round ends, since no other was pending), or None having moved nothing where other started
        collectives are pending, the C accelerator is not built, or the C call refused the
        arguments before its round (.front: did not take them; the caller starts the
        collective otherwise). An error of the first poll propagates (round k is marked
        failed, see `_c_steps`)."""
        if self._pending or self._c is None:
            return None
        try:
            k, result = self._c_first(run, args, 0)
        except (ValueError, TypeError, BufferError):
            return None  # (refused before the round)
        if result is None:
            return None  # (not taken)
        if result.__class__ is not tuple:
            self.declined = result == 1
            self.truncated = truncated = result == 2
            return self._done_rounds[2 if truncated else self.declined]
        request = pending(self, k, result)
        self._pending.append(request)
        return request

    def progress(self) -> None:
        """Advance the started collectives as far as they go without waiting."""
        pending = self._pending
        while pending and pending[0]._advance():
            pending.popleft()

    def _complete_pending(self, upto: CollectiveRequest | None = None) -> None:
        """Run the started collectives (all, or up to and including `upto`) to the end."""
        pending = self._pending
        while pending:
            head = pending[0]
            head._finish()
            pending.popleft()
            if head is upto:
                return

    # ------------------------------------------------------------------ helpers
    def _segment(self) -> int:
        """Bytes of each destination's part of a slab split among all members."""
        return self.slab_size // self.size // layout.CACHE_LINE * layout.CACHE_LINE or 1

    def _scatter_segment(self) -> int:
        """Bytes of each destination's part of a scatterv root's or an alltoallv member's
        slab, split among the members but its writer (which sends itself nothing through it:
        at 2 members a 256 KiB slab takes 256 KiB Alltoall blocks, not 128 KiB)."""
        parts = max(1, self.size - 1)
        return self.slab_size // parts // layout.CACHE_LINE * layout.CACHE_LINE or 1

    def _scatter_lengths(self, r: int) -> int | None:
        """The u64 index of the block lengths in scatterv root r's arrival of this round
        (its first: the others' blocks, q's at q - (q > r)), the words after its rounds word
        in its arrive line and that line's spare; None in a group of more than
        SCATTER_LENGTHS + 1 members (a member's block is then taken as long as its
        recvbuf: no truncation is seen)."""
        if self.size - 1 > SCATTER_LENGTHS:
            return None
        return self._arrive_i[r][self._round % layout.COLL_CELLS] + 4

    def _check_layout(
        self, counts: Sequence[int], displs: Sequence[int], nbytes: int, what: str
    ) -> None:
        if len(counts) != self.size or len(displs) != self.size:
            raise ValueError(f"{what} counts and displacements need {self.size} entries each")
        for r, (count, displ) in enumerate(zip(counts, displs, strict=True)):
            if count < 0 or displ < 0 or displ + count > nbytes:
                raise ValueError(
                    f"{what} block {r} ({count} bytes at {displ}) lies outside {nbytes} bytes"
                )

    def close(self) -> None:
        """Drop the views into the region (the slot stays claimed: see release_slot)."""
        for cells in self._slabs:
            for view in cells:
                view.release()
        self._slabs = []
        self._c = None  # (its hold on the region goes with it)
        self._broken = self._broken or RuntimeError("collective group closed")
