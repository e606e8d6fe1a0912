"""A communicator's collectives through the region's collective area (ivshmem_comm.collective).

Eligibility: a communicator of two members or more, every one of them reached through this
rank's region (routes SELF or SHM: no mpi4py between any two), in a region that has
collective slots, on a CPU the area's ordering holds on (claim_slot gives no slot
elsewhere). Anything else keeps to the message-based algorithms of collectives.py.

Binding and ownership: at the communicator's first blocking collective, before its
arguments are looked at, rank 0 claims a slot (`claim_slot`) and broadcasts (slot,
generation) by messages with that collective's own tags; every member builds its
CollectiveGroup and waits until all have bound. No slot free: the communicator keeps to
messages for good (so creating many communicators never exhausts anything, it only leaves
the late ones on messages). Free releases the slot (rank 0, the claimer) after a last area
barrier, so that no member still reads a slab the next holder overwrites. Every member
takes each decision (bind, use, drop) at the same collective, so all agree on the path.

State per communicator (`comm._area`): None (not bound yet), an `Area`, or False (messages
for good: no slot, not eligible, or dropped).

Errors: a collective that raises on a rank drops that rank's area (the decorator in
collectives.py calls `failed`); the others learn of it by the abandonment message the
message path sends anyway (engine.abandon). A member blocked in the area checks for such a
record after each blocked slice (the group's interrupt hook, every WATCH_SLICE): for the
collective it runs, it raises MPI.Exception(ERR_OTHER) with the other rank's reason, as the
message path does; for an earlier one (this member completed that one, e.g. as a root that
waits for nobody) it drops the area and runs the current collective again on messages
(`Fallback`), where the failed member runs it too. A member that died or left gives the
MPI.Exception the message path gives for a lost peer (fastpath.core_error of the core's
PeerLostError); a member writing garbage into the area, the same for RingCorruptError.

Progress: a blocking area collective waits inside the core (spin, then the doorbell) when
the engine has nothing in flight; otherwise (sends queued, receives posted) it is started
as a nonblocking one and driven together with the engine, so that a message the peer waits
for still moves. In a process with threads besides the main one it is always driven so:
the doorbell is shared with the engine's progress owner, which may take a kick meant for
the area, and the driven wait naps NAP_S at most where the core's sleeps a whole watch
slice. The area of a communicator is its own (one slot each): collectives of separate
communicators in separate threads do not meet here; the engine lock is not held while an
area collective waits.
A nonblocking area collective is an `AreaOp` whose completion is polled each time it is
read (by the engine's progress where a staged operation holds it; by its Request's
Test/Wait where a lane started it, `begin`); while any is pending, this member's sleep flag
stays raised so that every publication of the group rings its doorbell (the engine naps on
it). A started gatherv, scatterv or alltoallv takes one round at most, as the blocking one:
where its members decline it, the instance goes on over messages (`AreaOp.then`).

Object collectives (lowercase bcast, gather, allgather and those built on them: reduce,
allreduce, scan, exscan) put each pickle in its sender's slab when it fits one (`exchange`);
a larger pickle goes by messages to the members that take it, in the same instance.
Lowercase scatter and alltoall put a bundle of the sender's pickles (one per member,
pickling.bundle) in its slab alike (a bcast and an allgather of bytes); every member reads
its own piece of it.

Reductions go through the area for the predefined ops that are numpy ufuncs (SUM, PROD, MAX,
MIN, BAND, BOR, BXOR) on numpy element types; other ops fall back to messages.
"""

from __future__ import annotations

import contextlib
import struct
import time
from _thread import _count
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from guest_lib.mpi import constants, exceptions
from guest_lib.mpi.fastpath import core_error, other_threads
from guest_lib.mpi.matching import Op
from guest_lib.mpi.request import Request
from guest_lib.mpi.status import Status
from guest_lib.mpi.wire import COLL_SPAN, COLL_TAGS, FT_TAGS_FROM, coll_base
from guest_lib.service_threads import running
from ivshmem_comm import layout
from ivshmem_comm.collective import (
    C_ALLGATHER_BYTES,
    C_BCAST_BYTES,
    C_GATHER_BYTES,
    CollectiveGroup,
    CollectiveRequest,
    RoundRequest,
    claim_slot,
    release_slot,
)
from ivshmem_comm.errors import PeerLostError, RingCorruptError, TimeoutError

if TYPE_CHECKING:
    from guest_lib.mpi import ops

C_FOLD = -1  # Area.call's code of a reduction (CollectiveRound.fold)
# The binding broadcast's tag on the collective context: outside every blocking instance's
# tags (wire.coll_base) and every other internal range (nonblocking from 1 << 17, Agree /
# Shrink from wire.FT_TAGS_FROM for 1 << 15 tags), so that a member abandoning the instance
# that binds (an argument error, checked after the binding) never fails or drops another
# member's binding; one binding per communicator, so one tag serves.
T_AREA = FT_TAGS_FROM + (1 << 15)
_BIND = struct.Struct("<iI")  # slot (-1: none), generation
_CORE_ERRORS = (PeerLostError, RingCorruptError, TimeoutError)
_DECLINABLE = ("gatherv", "gatherv_refused", "scatterv", "alltoallv")
# `exchange`'s collectives as Area.call runs them
_BYTES = {
    "bcast_bytes": C_BCAST_BYTES,
    "gather_bytes": C_GATHER_BYTES,
    "allgather_bytes": C_ALLGATHER_BYTES,
}
_BYTES_CODES = frozenset(_BYTES.values())
BIND_SLICE_S = 0.001  # s: a binding's wait between progress passes while the engine is busy
NAP_S = 0.001  # longest nap of a Wait on an area request (messages it also waits for do not
# ring the doorbell)


class Fallback(Exception):
    """Another member abandoned an earlier collective: the area is dropped, run this one on
    messages."""


class Area:
    """The collective group of one communicator on this member. `completed` counts the
    collectives it ran to the end (tests read it to see that the area path is taken)."""

    def __init__(self, comm: Any, group: CollectiveGroup, claimed: bool) -> None:
        self.comm = comm
        self.group = group
        self.claimed = claimed
        self.completed = 0
        self.listeners = 0  # nonblocking collectives pending (sleep flag raised)
        self._over: np.ndarray | None = None  # (see `declining`)
        self._ctx = comm._ctx + 1
        # Abandonment records of collectives started before the binding are not about the
        # area: the first blocking and nonblocking instance numbers that are.
        self._since = (comm._coll_seq - 1, comm._nb_seq)
        group.interrupt = self._interrupt
        self._current: tuple[tuple[int, int], int] | None = None
        # (blocking instance, this member's round count) at that instance's `bound`: an
        # instance that fails with the count unchanged failed before its round (`untaken`)
        self._entry = (-1, 0)

    # ------------------------------------------------------------------ errors
    def check_abandoned(self) -> None:
        """Raise if another member abandoned a collective of this communicator since the
        binding: MPI.Exception for the one running (`_current`; of the class the member
        that abandoned it sent: ERR_OTHER, or the fault-tolerance class it met), else
        Fallback for an earlier one (a blocking one: the others are told that this member
        took it, `took`). A record of a blocking instance this member has not started yet
        (a member ahead left it) waits for that instance (`_coll_gone` fails it there)."""
        comm = self.comm
        engine = comm._engine
        if self._ctx not in engine.abandoned_in:  # (no record of this communicator)
            return
        with engine.lock:  # (other threads' progress adds records)
            records = list(engine.abandoned.items())
        earlier = []
        for key, (seq, reason, error) in records:
            blocking = key[1] < COLL_TAGS
            if key[0] != self._ctx or seq < self._since[not blocking]:
                continue
            if (key, seq) == self._current:
                raise exceptions.Exception(error, reason)
            if blocking and seq >= comm._coll_seq:
                continue
            earlier.append((key[1], seq, reason))
        if earlier:
            if comm._area is self:  # (in doubt or dropped: it took none of them)
                for base, seq, reason in earlier:
                    self.took(base, seq, reason)
            raise Fallback(earlier[0][2])

    def took(self, base: int, seq: int, reason: str) -> None:
        """Tell the other members that this member took a round of instance `seq` (tag
        base `base`), which another member abandoned (`reason`): an ABANDON of it, not
        untaken, which settles a member in doubt about it (Doubt.resolve) or a blocking
        one (a nonblocking instance's are ignored)."""
        comm = self.comm
        engine = comm._engine
        if base >= COLL_TAGS:
            return
        members = [w for w in comm._group if w != engine.world_rank]
        engine.abandon(self._ctx, comm._gen, seq, base, COLL_SPAN, reason, members)

    def earlier(self, seq: int) -> list[tuple[int, int, str]]:
        """(tag base, instance, reason) of each record of a blocking instance of this
        communicator from the binding (or the last doubt kept) up to before `seq`."""
        engine = self.comm._engine
        if self._ctx not in engine.abandoned_in:
            return []
        with engine.lock:
            records = list(engine.abandoned.items())
        return [(key[1], record[0], record[1]) for key, record in records
                if key[0] == self._ctx and key[1] < COLL_TAGS
                and self._since[0] <= record[0] < seq]  # fmt: skip

    def untaken(self, seq: int) -> bool:
        """Whether blocking instance `seq` fails here before this member took its round:
        the area still bound, `bound` called in that instance (every collective's body
        calls it before it checks its arguments) and no round taken since."""
        return self.comm._area is self and self._entry == (seq, self.group._round)

    def suspend(self, seq: int) -> None:
        """Blocking instance `seq` failed here before this member took its round
        (`untaken`; the others told so by its ABANDON): hold the area in doubt (Doubt)."""
        self.comm._area = Doubt(self, seq)

    def untroubled(self) -> bool:
        """Whether the engine holds no record of an abandoned collective of this
        communicator (other communicators' records do not concern its area): one lookup in
        Matching.abandoned_in."""
        return self._ctx not in self.comm._engine.abandoned_in

    def _interrupt(self) -> None:
        """The group's hook while a wait is blocked: move messages, look for abandonment."""
        self.comm._engine.progress()
        self.check_abandoned()

    def drop(self) -> None:
        """Leave the area for good (the slot stays claimed until Free: `free` releases it,
        once every member left it; a dropped area used to keep its slot for the process's
        life, and a region has few: COLL_SLOTS_DEFAULT)."""
        self.comm._area = False
        if self.claimed:
            self.comm._area_claim = self
        self.group.close()

    # ------------------------------------------------------------------ running
    def run(self, name: str, *args: Any) -> bool:
        """Run collective `name` of the group (blocking form) with `args`. True when it ran
        through the area; False when it must run on messages (Fallback: the area is
        dropped; or the group declined a gatherv/scatterv/alltoallv larger than a slab,
        having moved nothing: the area stays). Errors: MPI.Exception for a core error or
        an abandoned collective, else the group's own (ValueError for buffers that do not
        fit); the area is dropped."""
        comm = self.comm
        engine = comm._engine
        self._current = ((self._ctx, comm._coll_base), comm._coll_seq - 1)
        # Gather, scatter and alltoall, whose members cannot all size the payload, let the
        # group decline one that needs more than one slab round (messages are faster
        # there, see `fits`): every member learns it in the first round.
        kwargs = {"max_rounds": 1} if name in _DECLINABLE else {}
        gone = comm._coll_gone
        if gone is not None:
            if gone[0] != exceptions.ERR_OTHER:  # (a process failed: no doubt to resolve)
                self.drop()
                return False  # (run it as the message path does)
            # another member left it already: fail as its messages would, before taking its
            # round (the area stays, in doubt: see Doubt)
            raise exceptions.Exception(*gone)
        try:
            with self._leaving(self.group._round):
                if engine.quiet() and not other_threads():  # (see the module docstring)
                    getattr(self.group, name)(*args, **kwargs)
                else:
                    self._drive(self.group.start(name, *args, **kwargs))
        except Fallback:
            return False
        if name in _DECLINABLE and self.group.declined:  # (the flag outlives its call)
            return False
        self.completed += 1
        return True

    def ready(self) -> bool:
        """Whether a blocking collective may run in one C call now (`call`): the C
        accelerator is built, no nonblocking area collective is pending, the engine has
        nothing in flight (else `run` drives both), and no member abandoned a collective of
        this communicator (`untroubled`)."""
        group = self.group
        return (
            group._c is not None
            and not group._pending
            and self.comm._engine.quiet()
            and self.untroubled()
        )

    def call(self, which: int, *args: Any) -> bool:
        """`run` for a collective of one round in one call of the C accelerator, the
        arguments (CollectiveRound.run's from `send` on; `which` a collective.C_* code, or
        C_FOLD for .fold's from `kind` on) checked by the caller so that the C call accepts
        them (`ready()` first). True when it ran (`group.declined` says whether a member
        declined it: then the caller moves it by messages); False: run it otherwise (the
        area dropped: Fallback; or kept: the C call refused the arguments before the round,
        for the steps to check them). Errors as for `run`."""
        comm = self.comm
        group = self.group
        c = group._c
        assert c is not None
        self._current = ((self._ctx, comm._coll_base), comm._coll_seq - 1)
        before = group._round
        try:
            if which == C_FOLD:
                group._in_c(c.fold, *args)
            else:
                group._in_c(c.run, which, *args)
        except BaseException as exc:
            return self._failed_call(exc, group._round == before)
        if not group.declined or which in _BYTES_CODES:  # (a declined pickle: its round ran)
            self.completed += 1
        return True

    def settle(self, k: int, first: Any) -> bool:
        """The rest of round k, whose first C call (CollectiveRound.front, see
        collectives._c_front) returned `first`: a wait (blocked on and resumed as in
        `call`), 1 (a member declined it), or the exception it raised (round k failed).
        True when it ran (`group.declined` as for `call`); False when the area was dropped
        (Fallback: run it on messages). Errors as for `call`."""
        group = self.group
        try:
            if isinstance(first, BaseException):
                group._c_failed(k, first)
                raise first
            group._round = group._c_round(k)  # (k, or later: a scatterv of several rounds)
            if first.__class__ is tuple:
                group._c_wait(k, first)
            else:
                group.declined = first == 1
                group.truncated = first == 2
        except BaseException as exc:
            return self._failed_call(exc, False)
        if not group.declined:
            self.completed += 1
        return True

    def _failed_call(self, exc: BaseException, untaken: bool) -> bool:
        """`call`'s answer to `exc`, raised by its C round (`untaken`: before the round was
        taken): False where the area stays (arguments refused before the round) or was
        dropped for messages (Fallback); else the area is dropped and the error raised (a
        core error as the MPI.Exception the message path gives)."""
        if isinstance(exc, (ValueError, TypeError, BufferError)):
            if untaken:
                return False  # refused before the round (see _in_c): the area stays
            self.drop()
            raise exc
        if isinstance(exc, Fallback):
            self.drop()
            return False
        error = self._leave(exc)
        if error is exc:
            raise exc
        raise error from exc

    def exchange(self, name: str, data: Any, root: int = 0) -> list[bytes | None] | None:
        """Byte-string collective `name` of the group ("bcast_bytes", "gather_bytes" or
        "allgather_bytes": see CollectiveGroup) with this member's `data`: per member, the
        bytes taken from it (None where nothing is taken, or where it declined, data over a
        slab: `group.declined` is then set and the caller moves those by messages); None
        when the collective must run on messages (Fallback: the area is dropped). Errors
        as for `run`."""
        group = self.group
        comm = self.comm
        if comm._coll_gone is None and self.ready() and not other_threads():
            # one C call (see `call`); C's `taken` is a new list each round
            if self.call(_BYTES[name], data, None, root, None, None, None, None):
                return group._c.taken if group._c is not None else None
            if comm._area is not self:
                return None  # (dropped: Fallback)
        taken: list[bytes | None] = [None] * group.size
        args = (data, taken) if name == "allgather_bytes" else (data, root, taken)
        return taken if self.run(name, *args) else None

    @contextlib.contextmanager
    def _leaving(self, untaken: int = -1) -> Iterator[None]:
        """Drop the area if the block raises (Fallback included), but for an argument error
        (ValueError, TypeError, BufferError) of the group's while its round count is still
        `untaken` (no round taken: the caller abandons the instance as one this member left
        before its round, collectives._abandon); a core error becomes the MPI.Exception the
        message path gives for it."""
        try:
            yield
        except (ValueError, TypeError, BufferError):
            if self.group._round != untaken:
                self.drop()
            raise
        except BaseException as exc:
            error = self._leave(exc)
            if error is exc:
                raise
            raise error from exc

    def _leave(self, exc: BaseException) -> BaseException:
        """Drop the area after `exc`; what to raise for it (a core error: the MPI.Exception
        the message path gives for it)."""
        self.drop()
        return core_error(exc) if isinstance(exc, _CORE_ERRORS) else exc

    def _drive(self, request: CollectiveRequest) -> None:
        """Complete `request` while the engine progresses its own operations."""
        engine = self.comm._engine
        notifier = engine.ep.notifier
        self.listen(1)
        try:
            while not request.test():
                if not engine.progress():
                    self.check_abandoned()
                    if other_threads():  # one doorbell nap at a time (a broker's poll()
                        engine.idle()  # object refuses concurrent waits): the engine's rule
                    else:
                        notifier.wait(NAP_S)  # the group rings it (listening); messages may not
        finally:
            self.listen(-1)

    def declining(self) -> np.ndarray:
        """A payload over what one round moves anywhere (a slab; a scatterv root's COLL_CELLS
        segments), for a sender whose data is larger (a scatter's or an alltoall's
        bundle of pickles, not made then): a byte-string round declines it unread, as it
        would the data; so does a scatterv round of blocks this long (`refusal`).
        Made once per area, its pages never touched."""
        over = self._over
        if over is None:
            over = self._over = np.empty(layout.COLL_CELLS * self.group.slab_size + 1, np.uint8)
        return over

    def refusal(self, name: str, root: int) -> tuple[str, tuple[Any, ...]]:
        """The round (`name`: "gatherv" or "scatterv", as collectives' plans give it) that
        a root whose own arguments are wrong runs in its instance instead, with the area's
        rounds in step; the root then moves what lets the others finish and raises its
        error without abandoning the instance. A gatherv: "gatherv_refused" (its members do
        not wait for the root: each block within a slab is taken there and dropped, the
        longer ones, `group.by_messages`, are taken into nothing by messages). A scatterv:
        the others' blocks as long as `declining`, none of its own, all over one buffer
        that is never read or written, so that the root declines the round (rounds word 0)
        and every member goes on to the instance's messages (empty parts sent)."""
        if name == "gatherv":
            return "gatherv_refused", (root,)
        over = self.declining()
        size = self.group.size
        counts = [len(over)] * size
        counts[root] = 0
        displs = [0] * size
        return name, (over, counts, displs, memoryview(bytearray(0)), root)

    def fits(self, nbytes: int, split: bool = False) -> bool:
        """Whether `nbytes` move in one round (one slab; `split`: one member's segment of
        it). Larger payloads are faster on messages (read in place and pipelined, where the
        area synchronises the group once per slab), so callers whose members all know the
        size send those there; gather, scatter and alltoall (whose members do not all know
        every size) let the group decline them in their first round (`run`)."""
        group = self.group
        return nbytes <= (group.slab_size // group.size if split else group.slab_size)

    def listen(self, delta: int) -> None:
        """Count a waiter that naps on the engine's doorbell; the sleep flag stays raised
        while there is one."""
        self.listeners += delta
        self.group.listen(self.listeners > 0)

    def begin(self, which: int, *args: Any) -> CollectiveRequest | None:
        """`call`'s nonblocking form (`start` of a collective of one round whose arguments
        the caller checked, see `call`): the started round, polled once (`done` already
        where that completed it; else the group's pending request); None having moved
        nothing where the group has started collectives pending or the C call refused the
        arguments (start it otherwise). Errors of the first poll as for `run` (the area is
        dropped)."""
        group = self.group
        c = group._c
        if c is None:
            return None
        try:
            if which == C_FOLD:
                request = group.start_round(c.fold, *args)
            else:
                request = group.start_round(c.run, which, *args)
        except BaseException as exc:
            error = self._leave(exc)
            if error is exc:
                raise
            raise error from exc
        if request is not None and request.done and not request.declined:
            self.completed += 1
        return request

    def start(self, name: str, *args: Any, then: Callable[[], Op] | None = None) -> AreaOp:
        """Start collective `name` nonblocking; the AreaOp completes with it. A gatherv,
        scatterv or alltoallv takes one round at most, as in `run`: where its members decline
        it, `then()` starts the operation that moves it otherwise (see AreaOp). Errors at the
        start as for `run`."""
        declinable = name in _DECLINABLE
        kwargs = {"max_rounds": 1} if declinable else {}
        with self._leaving():
            request = self.group.start(name, *args, **kwargs)
        return AreaOp(self, request, then=then if declinable else None)


def truncated_part(comm: Any) -> str:
    """The reason of the MPI_ERR_TRUNCATE of a Scatter(v) member (not the root) of `comm`
    whose round completed with its part longer than its recvbuf (which holds the part's
    first bytes; CollectiveRequest.truncated, CollectiveGroup.truncated)."""
    return f"scatter: rank {comm._rank}'s part from the root is longer than its recvbuf"


class _Polled:
    """The engine-operation side of a nonblocking collective of the area (AreaOp,
    StartedRound): `done` polls the collective (and the abandonment records) each time it
    is read, under the engine's lock (a Wait or Test of another thread, or the engine's
    progress, may read it too); a failure completes it with ERR_OTHER, `reason` saying
    why, drops the area and tells `on_fail(*fail_args, error class, reason)` (if given).
    The first read that finds it pending raises the sleep flag (`Area.listen`) and polls
    once more, so that no waiter naps before the flag is up (a collective completed by its
    first polls never raises it, nor makes the others ring this doorbell).

    `then`: for a collective its members may decline (a gatherv, scatterv or alltoall(v)
    over one round, see `Area.run`), what starts the operation that moves it otherwise once
    the area says it was declined (`then(*then_args)`: messages, started with the engine:
    `next`); this op is
    then done with that one, its error and reason taken from it (a failure there was told
    to the others by that operation's own `on_fail`). An exception of `then` fails this op
    as a failure of the area does. A failure's reason is its `why` too (Op's: a StagedOp
    holding this op reports it). A scatterv round that completed with this member's block
    longer than its recvbuf (the request's `truncated`) completes the op with
    ERR_TRUNCATE (`reason`: `truncated_part`) and `in_step` set: every member ran the
    round, so nobody is told and the area stays (a StagedOp holding the op fails alike,
    see engine.StagedOp). A class using this sets the fields annotated here and gives
    `_round_test` and `_round`."""

    if not TYPE_CHECKING:  # (the fields below: each class using this has them as slots)
        __slots__ = ()
    _area: Area
    _finished: bool
    _listening: bool
    in_step: bool
    _staged: bool
    next: Op | None
    then: Callable[..., Op] | None
    then_args: tuple[Any, ...]
    on_fail: Callable[..., None] | None
    fail_args: tuple[Any, ...]
    error: int
    reason: str
    why: str

    def _round_test(self) -> bool:
        """Advance the collective without waiting: True iff it completed (its error
        raised)."""
        raise NotImplementedError

    def _round(self) -> CollectiveRequest:
        """The group's request of the collective."""
        raise NotImplementedError

    def spin(self) -> None:
        """Poll the round for up to the group's spin time (the endpoint's, as the blocking
        waits spin before they sleep) without raising the sleep flag, until it completes or
        fails (completing this op then, as `done` would): a round that completes within the
        spin makes no member ring this doorbell. The engine's messages wait for `done`'s
        polls. A round of the C accelerator (RoundRequest) whose engine is quiet, in a
        process with no other thread, is completed here as a blocking collective's round
        (RoundRequest.wait: the spin in C, yielding the CPU between loads where the group
        is crowded, then a sleep on the word it waits for, the engine's messages and
        abandonment looked at every watch slice by the group's interrupt hook)."""
        if self._finished or self.next is not None or self._look(False):
            return
        area = self._area
        request = self._round()
        if isinstance(request, RoundRequest) and area.comm._engine.quiet() and not other_threads():
            with contextlib.suppress(Exception):  # (`_look` raises it again: the op fails)
                request.wait()
            self._look(False)
            return
        end = 0.0
        while not self._look(False):
            now = time.monotonic()
            if not end:
                end = now + area.group._spin
            elif now >= end:
                return

    def _end(self) -> None:
        """Completed (under the engine's lock): out of the engine's staged operations, so
        that the engine is quiet again at once (the blocking lanes look)."""
        self._finished = True
        if self._staged:
            self._staged = False
            staged = self._area.comm._engine.staged
            if self in staged:
                staged.remove(self)

    @property
    def done(self) -> bool:
        return self._finished or self._look(True)

    @done.setter
    def done(self, value: bool) -> None:
        pass  # (a write of `done` changes nothing: completion is the collective's)

    def _look(self, listen: bool) -> bool:
        """`done`'s poll (`listen`: raise the sleep flag once the round is found pending, and
        look for abandonment; `spin`'s polls do neither): True iff this op completed."""
        area = self._area
        with area.comm._engine.lock:
            if self._finished:  # (another thread's read completed it)
                return True
            if self.next is not None:
                return self._followed(self.next)
            try:
                pending = not self._round_test()
                if pending and listen and not self._listening:
                    self._listening = True
                    area.listen(1)  # (its fence orders the flag before the next poll's loads)
                    pending = not self._round_test()
                if pending:
                    if listen:
                        area.check_abandoned()
                    return False
                if self._listening:
                    self._listening = False
                    area.listen(-1)
                request = self._round()
                if request.declined and self.then is not None:
                    self.next = self.then(*self.then_args)
                    return self._followed(self.next)
                area.completed += 1
                if request.truncated:  # (ran in step at every member: the area stays)
                    self.error = exceptions.ERR_TRUNCATE
                    self.reason = self.why = truncated_part(area.comm)
                    self.in_step = True
            except BaseException as exc:
                self.error = exceptions.ERR_OTHER
                self.reason = self.why = f"{type(exc).__name__}: {exc}"
                if area.comm._area is area:
                    area.drop()
            self._end()
            if self._listening:
                area.listen(-1)
        if self.error and not self.in_step and self.on_fail is not None:
            self.on_fail(*self.fail_args, self.error, self.reason)
        return True

    def _followed(self, op: Op) -> bool:
        """`done` once `next` carries the collective: whether it completed (its outcome
        copied here)."""
        if not op.done:
            return False
        self.error, self.reason = op.error, getattr(op, "reason", "")
        if self.error:
            self.why = self.reason  # (read by a staged operation that holds this one)
        self._end()
        return True


class AreaOp(_Polled, Op):
    """A nonblocking collective of the area as an engine operation (see _Polled) on the
    group's request `request` (started by Area.start or Area.begin); its `then` takes no
    arguments."""

    __slots__ = (
        "_area",
        "_finished",
        "_listening",
        "_request",
        "_staged",
        "fail_args",
        "in_step",
        "next",
        "on_fail",
        "reason",
        "then",
    )
    then_args: tuple[Any, ...] = ()

    def __init__(
        self,
        area: Area,
        request: CollectiveRequest,
        on_fail: Callable[..., None] | None = None,
        then: Callable[[], Op] | None = None,
    ) -> None:
        # Op's fields, set here without a call to Op.__init__ (one per started collective;
        # `done` is _Polled's property)
        self.error, self.source, self.tag = 0, constants.ANY_SOURCE, constants.ANY_TAG
        self.count, self.cancelled, self.obj = 0, False, None
        self._finished = self.in_step = False
        self._area = area
        self._request = request
        self.on_fail = on_fail
        self.fail_args = ()
        self.then = then
        self.next = None
        self.reason = ""
        self._listening = False
        self._staged = False

    def _round_test(self) -> bool:
        return self._request.test()

    def _round(self) -> CollectiveRequest:
        return self._request

    def stage(self) -> None:
        """Have every progress pass of the engine poll this op (`advance`) until it
        completes: where its members decline the round, the others wait for what `then`
        starts while this member may block anywhere (a Recv), not in its Wait."""
        engine = self._area.comm._engine
        with engine.lock:
            if not self._finished:
                engine.staged.append(self)
                self._staged = True

    def advance(self, propagate: bool = False) -> bool:
        """A progress pass over the staged op: poll it; True iff it completed."""
        return self.done

    @property
    def home_ctx(self) -> int:
        """The context of the communicator whose collective this is (StagedOp's field)."""
        return self._area.comm._ctx


class StartedRound(_Polled, RoundRequest):
    """A nonblocking collective's round pending in the C accelerator as ONE object: the
    group's pending request (a RoundRequest: CollectiveGroup.start_round_as(StartedRound,
    ...)) and the engine operation its Request waits on (see _Polled),
    where AreaOp would be a second object around the round. Its reads of `done` poll the
    round in C directly (CollectiveRound.resume, not through the group's progress: it is
    the group's first pending request while pending). The status fields of an operation
    are those of a collective (empty) and never written; `_area`, `on_fail`, `fail_args`
    and `then` are set by the caller right after the start, `then_args` with a `then` only
    (a function and its arguments: no object per start where the round is never declined;
    never staged: an instance the engine's progress must poll, see AreaOp.stage, takes an
    AreaOp)."""

    __slots__ = (
        "_area",
        "_finished",
        "_listening",
        "error",
        "fail_args",
        "in_step",
        "next",
        "on_fail",
        "reason",
        "then",
        "then_args",
        "why",
    )
    source = constants.ANY_SOURCE
    tag = constants.ANY_TAG
    count = 0
    cancelled = False
    obj = None
    _staged = False

    def __init__(
        self,
        group: CollectiveGroup,
        k: int,
        wait: Any,
        area: Area,
        on_fail: Callable[..., None],
        fail_args: tuple[Any, ...],
    ) -> None:
        RoundRequest.__init__(self, group, k, wait)
        # this op's fields (Op.__init__'s are the class's: never written)
        self._area = area
        self.on_fail = on_fail
        self.fail_args = fail_args
        self._finished = self._listening = self.in_step = False
        self.error, self.reason = 0, ""
        self.next = self.then = None

    def _round_test(self) -> bool:
        if self._steps is None:  # (ended by the group's progress, or failed)
            if self._error is not None:
                raise self._error
            return True
        if not self._poll():
            return False
        pending = self._group._pending
        if pending and pending[0] is self:
            pending.popleft()
        return True

    def _round(self) -> CollectiveRequest:
        return self

    def complete_here(self, wait: bool) -> bool:
        """The common case of a Wait (`wait`) or a Test of this op's Request in a process
        with no other thread: the pending round polled by one C call, which spins up to the
        group's spin time for a Wait (yielding the CPU between loads where the group is
        crowded; the engine's messages wait for `done`'s polls meanwhile, as in `spin`),
        not at all for a Test; a Wait whose spin ended first, the engine quiet, then
        completes it as a blocking collective's round (RoundRequest._finish: a sleep on the
        word it waits for, the engine's messages and abandonment looked at every watch
        slice by the group's interrupt hook). True iff this op is now complete without
        error (its Request has nothing but its end to do). False, nothing decided: the op
        was not pending here (complete already, a Test raised the sleep flag, messages
        carry a declined round), another thread exists (polls go through `done`, under
        the engine's lock), the round is still pending, it was declined (`done` starts
        what `then` gives), or it failed (the round keeps its error: `done`'s next read
        fails this op with it); the Request's general path then goes on from there."""
        if (
            self._finished
            or self._listening
            or self.next is not None
            or self._steps is None
            or _count() != running[0]  # (other_threads(), inline)
        ):
            return False
        group = self._group
        try:
            if not self._poll(group._spin_ns if wait else 0):
                if not wait or not self._area.comm._engine.quiet():
                    return False
                self._finish(spun=True)
        except Exception:
            return False
        group._pending.popleft()  # (the group's first pending request while pending)
        if self.declined or self.truncated:
            return False
        self._area.completed += 1
        self._finished = True  # (_end's whole work: a StartedRound is never staged)
        return True

    def cancel(self, engine: Any) -> bool:
        """A collective is not withdrawn (Op.cancel's answer): False."""
        return False

    def watch(self) -> int:
        """No single peer (Op.watch's answer): -1."""
        return -1


class AreaRequest(Request):
    """The Request of a nonblocking collective in the area. Wait and Test of a pending
    StartedRound in a process with no other thread first poll its round in one C call
    (StartedRound.complete_here: a round found complete ends there). Otherwise Wait polls
    a pending round for the endpoint's spin time first (_Polled.spin: no sleep flag, so
    no member rings), then naps on the doorbell, which every publication of the group
    rings while the collective is pending (the engine's own nap waits for a message and
    would sleep its whole slice)."""

    __slots__ = ()

    def _complete_alone(self) -> None:
        """Complete the operation here for Waitall (`_waited`; Waitall fills its errors)."""
        self._waited()

    def _waited(self) -> None:
        """Complete the (not null) operation here: a pending StartedRound through its
        common case first (complete_here), else or then `_complete`."""
        op: Any = self._op  # (an Op, or a StartedRound standing for one)
        if op.__class__ is not StartedRound or not op.complete_here(True):
            self._complete()

    def _complete(self) -> None:
        op, engine = self._op, self._engine
        assert op is not None and engine is not None
        notifier = engine.ep.notifier
        if isinstance(op, _Polled):
            op.spin()
        while not op.done:
            follow = getattr(op, "next", None)
            if follow is not None:  # (declined: messages, which the engine's wait serves)
                engine.wait(follow)
            elif not engine.progress() and not op.done:
                notifier.wait(NAP_S)

    def Wait(self, status: Status | None = None) -> bool:
        op: Any = self._op  # (an Op, or a StartedRound standing for one)
        if op is not None:
            if op.__class__ is not StartedRound or not op.complete_here(True):
                self._complete()
            elif status is None and self._cell is None:
                self._op = None  # (_fill's whole work: complete without error, no status)
                return True
        self._fill(status)
        return True

    def wait(self, status: Status | None = None) -> Any:
        if self._op is not None:
            self._waited()
        return self._fill(status)

    def Test(self, status: Status | None = None) -> bool:
        if not self._tested():
            return False
        self._fill(status)
        return True

    def test(self, status: Status | None = None) -> tuple[bool, Any]:
        if not self._tested():
            return False, None
        return True, self._fill(status)

    def _tested(self) -> bool:
        """Test's poll: whether the operation is complete (null: True), a pending
        StartedRound polled first through its common case (complete_here), then as
        Request.Test polls (`done`, the engine's progress)."""
        op: Any = self._op  # (an Op, or a StartedRound standing for one)
        if op is None or (op.__class__ is StartedRound and op.complete_here(False)):
            return True
        if not op.done:
            self._progress()
        return op.done


# ------------------------------------------------------------------ binding
def eligible(comm: Any) -> bool:
    """Whether `comm` may use the area (see the module docstring)."""
    engine = comm._engine
    return (
        engine is not None
        and engine.ep is not None
        and len(comm._group) >= 2
        and not comm._has_mpi  # every member shares this region
        and engine.ep.region.geometry.coll_slots > 0
    )


def bound(comm: Any) -> Area | None:
    """The communicator's Area, bound now if this is its first blocking collective (called
    by every member inside one, before its arguments are checked), or its doubt resolved
    (Doubt.resolve); None: messages."""
    area = comm._area
    if not area:
        if area is None:
            area = comm._area = _bind(comm) if eligible(comm) else False
        elif area.__class__ is Doubt:
            area = comm._area = area.resolve()
        if not area:
            return None
    area._entry = (comm._coll_seq - 1, area.group._round)
    return area


class Doubt:
    """`comm._area` while it is in doubt: blocking instance `seq` failed on this member
    before it took the instance's round (Area.suspend), and another member may have taken
    it, putting the group's rounds out of step. False as a test (every path reads it as no
    area: nonblocking collectives keep to messages meanwhile, as members that dropped the
    area do) until the next blocking collective's `bound` resolves it, every member there
    alike: the area stays only where every member left `seq` before its round."""

    __slots__ = ("area", "seq")

    def __init__(self, area: Area, seq: int) -> None:
        self.area = area
        self.seq = seq

    def __bool__(self) -> bool:
        return False

    def resolve(self) -> Area | bool:
        """Wait until each other member said how it left instance `seq` (its ABANDON's
        `untaken`, in Matching.leavers: one sent at its failure there, or when it finds the
        record of `seq` after taking its round, Area.took); the area where every one left
        before its round (its rounds in step: records of `seq` and before no longer concern
        it), else dropped (False: messages for good), as also when a record of an earlier
        blocking instance turns up (one this member took: the others are told, Area.took)."""
        area, seq = self.area, self.seq
        comm = area.comm
        engine = comm._engine
        others = [w for w in comm._group if w != engine.world_rank]
        key = (area._ctx, coll_base(seq))

        def told() -> bool:
            seen = engine.leavers.get(key)
            if seen is not None and seen[0] == seq and all(w in seen[1] for w in others):
                return True
            return bool(area.earlier(seq))

        engine.wait_until(told)  # (a failure here drops it: `failed`)
        earlier = area.earlier(seq)
        seen = engine.leavers.get(key)
        if earlier or seen is None or not all(seen[1].get(w) for w in others):
            for base, number, reason in earlier:
                area.took(base, number, reason)
            area.drop()
            return False
        area._since = (seq + 1, area._since[1])
        return area


def current(comm: Any) -> Area | None:
    """The communicator's Area if bound (nonblocking collectives never bind)."""
    return comm._area or None


def _bind(comm: Any) -> Area | bool:
    engine = comm._engine
    ep = engine.ep
    claimed = None
    comm._area = False  # a failure while binding leaves messages for good (on every rank)
    # Every member runs the binding broadcast to its end, even where another member has
    # abandoned the instance already (`_coll_gone`: which makes a wait raise at once): a
    # member in the middle of the tree forwards to others, who wait for it on T_AREA, outside
    # the instance's tags, so no abandonment fails their receive (before: a member that saw
    # the abandonment first left without forwarding and its subtree waited for ever).
    gone, comm._coll_gone = comm._coll_gone, None
    try:
        if comm._rank == 0:
            claimed = claim_slot(ep.region, ep.peer_id, ep.incarnation)
            slot, generation = claimed or (-1, 0)
            comm._bcast_view(memoryview(_BIND.pack(slot, generation)), 0, T_AREA)
        else:
            raw = bytearray(_BIND.size)
            comm._bcast_view(memoryview(raw), 0, T_AREA)
            slot, generation = _BIND.unpack(raw)
    finally:
        comm._coll_gone = gone
    if slot < 0:
        return False
    if slot >= ep.region.geometry.coll_slots or not 1 <= generation <= layout.COLL_GEN_MASK:
        raise exceptions.Exception(exceptions.ERR_OTHER, f"rank 0 bound the collective area "
                                   f"to slot {slot}, generation {generation}")  # fmt: skip
    peers = [ep.peer_id if r == comm._rank else comm._shm_peer[r] for r in range(len(comm._group))]
    try:
        group = CollectiveGroup(ep, slot, generation, peers)
        # With operations in flight (a window's service: an origin may wait on this rank,
        # which waits for that origin to bind), the engine moves between short waits.
        while not engine.quiet() and not _bound_within(group, BIND_SLICE_S):
            engine.progress()
        group.wait_bound()
    except _CORE_ERRORS as exc:
        raise core_error(exc) from exc
    return Area(comm, group, claimed is not None)


def _bound_within(group: CollectiveGroup, seconds: float) -> bool:
    """Whether every member bound within `seconds` (PeerLostError propagates)."""
    try:
        group.wait_bound(seconds)
    except TimeoutError:
        return False
    return True


def failed(comm: Any) -> None:
    """A collective of `comm` raised on this rank: leave the area for good (one in doubt
    too). (Not bound yet: nothing changes; a failure inside the binding left messages for
    good already.)"""
    area = comm._area
    if area.__class__ is Doubt:
        area = area.area
    if area:
        area.drop()


def free(comm: Any) -> None:
    """Free of `comm` (collective): a last area barrier, then the claimer releases the slot
    (an area in doubt resolved first: Doubt.resolve)."""
    if comm._area.__class__ is Doubt:
        comm._area = comm._area.resolve()
    area, dropped = comm._area, comm._area_claim
    comm._area = False
    comm._area_claim = None
    if area:
        try:
            area.run("barrier")  # (with the engine progressing, if it has work)
        except Exception:  # a broken group or a lost member: release anyway
            pass
        area.group.close()
    # A dropped area's members left it when it was dropped (each on its own error or on the
    # abandonment notice); Free being collective, none of them uses the slot after it.
    held = area if area and area.claimed else dropped
    if held is not None:
        ep = held.group.endpoint
        release_slot(ep.region, held.group.slot, ep.peer_id, ep.incarnation)


def completed(comm: Any) -> int:
    """How many collectives of `comm` ran through the area on this rank (0 if none)."""
    area = comm._area
    return area.completed if area else 0


def ufunc_of(op: ops.Op, *arrays: np.ndarray) -> Any:
    """The numpy ufunc that folds `op` on these arrays in the area, or None (messages)."""
    ufunc = op.ufunc
    if ufunc is None or any(a.dtype.fields is not None for a in arrays):
        return None
    return ufunc
