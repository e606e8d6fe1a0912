"""Matching: operations, posted receives, the unexpected queue, freed contexts, abandoned
collectives. No I/O here: the progress engine (`engine`) feeds arriving messages in and
sends what matching decides (ACKs, ABANDON notices) through the hooks `send_control` and
`poll_native`.

MPI rules: a receive is first matched against the unexpected list (arrival order), else
queued in `posted` (post order); each arriving DATA message goes to the first posted receive
whose (context, source, tag) matches, else to the unexpected list (copied out of shared
memory). Messages from one peer arrive in FIFO order: non-overtaking holds per (source, tag,
communicator). Receives that can match an mpi4py-routed source are also matched by the
mpi4py route's matched probe (`improbe`) on the communicator's mirror, in post order too.

Freed contexts and abandoned collectives: messages of a context freed by Free (until the
context is agreed on again: the agreement is a collective over a communicator that holds
every sender, whose earlier messages therefore arrive first) and of an abandoned collective
instance are dropped, so they never match a later receive. An ABANDON notice names the
generation of the communicator it is about (see `reuse_context`): one about an earlier
holder of its context (sent by a process outside the agreement that took the context again,
or after it, by a nonblocking collective failing late) is ignored, and one about a
communicator not taken here yet waits for it.
"""

from __future__ import annotations

import threading
from _thread import _count
from collections.abc import Callable, Sequence
from typing import Any

from guest_lib.mpi import constants, exceptions, wire
from guest_lib.service_threads import running as _service

# A context offer in an agreement (comm.Comm.agreed_ctx): the contexts in use in a process (a
# bit map, with the agreement's flag bits just above it) and, from CLOCK_SHIFT up, that
# process's context clock (Matching.ctx_clock). Offers merge with merge_offers.
CLOCK_SHIFT = 8 * (constants.CTX_MAP_BYTES + 1)
OFFER_BYTES = CLOCK_SHIFT // 8 + 8  # an offer as bytes (clocks stay far below 2**64)
_MAP_MASK = (1 << CLOCK_SHIFT) - 1


def merge_offers(a: int, b: int) -> int:
    """Two context offers in one: the union of their maps and flags, the higher clock."""
    return (a | b) & _MAP_MASK | max(a >> CLOCK_SHIFT, b >> CLOCK_SHIFT) << CLOCK_SHIFT


class Op:
    """An operation in flight: what a Request waits for. `done` is set once, by the engine.
    `why`, set only where a failure has a reason beyond its error class (a collective that
    another member abandoned), is read with getattr(op, "why", "")."""

    __slots__ = ("cancelled", "count", "done", "error", "obj", "source", "tag", "why")
    why: str  # (unset until a failure gives one)

    def __init__(self) -> None:
        self.done = False
        self.error = 0
        self.source = constants.ANY_SOURCE  # world rank once matched
        self.tag = constants.ANY_TAG
        self.count = 0
        self.cancelled = False
        self.obj: Any = None

    def cancel(self, engine: Matching) -> bool:
        """Withdraw the op if it has not started; True iff it was."""
        return False

    def watch(self) -> int:
        """The shm peer whose loss should abort a wait on this op, or -1."""
        return -1


class DoneOp(Op):
    """Already complete (PROC_NULL, self sends): status fields given."""

    __slots__ = ()

    def __init__(self, source: int = constants.PROC_NULL, tag: int = constants.ANY_TAG) -> None:
        # Op's fields, set here without a call to Op.__init__ (one per completed send)
        self.done, self.error, self.source, self.tag = True, 0, source, tag
        self.count, self.cancelled, self.obj = 0, False, None


class RecvOp(Op):
    """A receive. Data goes to `view` (copied, clipped: ERR_TRUNCATE), or `sink(offset, data)`
    when given, or, with neither, is collected and kept as bytes in `obj` (object receives).

    `src` is a world rank or ANY_SOURCE; `peer` the shm peer it waits for (or -1); `mpi` the
    mpi4py mirror to poll (None if no mpi4py-routed source can match), with `mpi_src` the
    mirror's rank or ANY_SOURCE and `mpi_world` the mirror's group in world ranks.
    """

    __slots__ = (
        "ctx", "mpi", "mpi_src", "mpi_world", "parts", "peer", "sink", "src", "view", "want_tag",
    )  # fmt: skip

    def __init__(
        self,
        ctx: int,
        src: int,
        tag: int,
        view: memoryview | None,
        sink: Callable[[int, memoryview], None] | None = None,
        peer: int = -1,
    ) -> None:
        # Op's fields, set here without a call to Op.__init__ (one per receive)
        self.done, self.error, self.tag = False, 0, constants.ANY_TAG
        self.source = constants.ANY_SOURCE
        self.count, self.cancelled, self.obj = 0, False, None
        self.ctx, self.src, self.want_tag = ctx, src, tag
        self.view, self.sink = view, sink
        self.parts: list[bytes] | None = None
        self.mpi: Any = None
        self.mpi_src = 0
        self.mpi_world: Sequence[int] = ()  # (immutable: one empty tuple for every receive)
        self.peer = peer

    def matches(self, ctx: int, src: int, tag: int) -> bool:
        return (
            ctx == self.ctx
            and (self.src == constants.ANY_SOURCE or self.src == src)
            and (self.want_tag == constants.ANY_TAG or self.want_tag == tag)
        )

    def begin(self, src: int, tag: int) -> None:
        self.source, self.tag, self.count = src, tag, 0

    def write(self, offset: int, data: Any) -> None:
        n = len(data)
        if self.sink is not None:
            self.sink(offset, data)
        elif self.view is not None:
            room = len(self.view) - offset
            if n > room:
                self.error = exceptions.ERR_TRUNCATE
                if room > 0:
                    self.view[offset:] = data[:room]
            elif n:
                self.view[offset : offset + n] = data
        else:
            if self.parts is None:
                self.parts = []
            self.parts.append(bytes(data))
        self.count = offset + n

    def finish(self) -> None:
        if self.view is not None and self.count > len(self.view):
            self.count = len(self.view)
        if self.view is None and self.sink is None:
            parts = self.parts or []
            self.obj = parts[0] if len(parts) == 1 else b"".join(parts)
            self.parts = None
        self.done = True

    def cancel(self, engine: Matching) -> bool:
        if self.done:
            return False
        if engine.withdraw(self):
            self.cancelled = True
            self.done = True
            return True
        return False

    def watch(self) -> int:
        return self.peer


class Unexpected:
    """A message that arrived before its receive was posted (its bytes copied out)."""

    __slots__ = ("complete", "ctx", "parts", "peer", "src", "sync_seq", "tag", "waiter")

    def __init__(self, src: int, ctx: int, tag: int, peer: int, sync_seq: int | None) -> None:
        self.src, self.ctx, self.tag, self.peer = src, ctx, tag, peer
        self.parts: list[bytes] = []
        self.complete = False
        self.sync_seq = sync_seq
        self.waiter: Op | None = None  # a synchronous send to self: done once matched

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)

    def write(self, offset: int, data: Any) -> None:
        self.parts.append(bytes(data))

    def finish(self) -> None:
        self.complete = True


class Inflow:
    """A chunked message being received from one peer: where its next piece goes."""

    __slots__ = ("offset", "sink")

    def __init__(self, sink: RecvOp | Unexpected, offset: int) -> None:
        self.sink, self.offset = sink, offset


class Matching:
    """The matching state of one process (see the module docstring). The engine derives
    from it and supplies `send_control` (queue a CONTROL message to a shm peer),
    `poll_native` (let the mpi4py route match posted receives now) and `routes`."""

    routes: list[Any]  # world rank -> its Route (see `routes`)
    send_control: Callable[[int, int, bytes], None]  # (shm peer, CTRL_*, payload): queue it
    poll_native: Callable[[], bool]  # match posted receives on the mpi4py route now

    def __init__(self) -> None:
        # Guards every field here and the engine's (queues, the endpoint): see `engine`.
        # Reentrant: a progress pass runs collective stages that post and send.
        self.lock = threading.RLock()
        self.posted: list[RecvOp] = []
        self.unexpected: list[Unexpected] = []
        self.inflow: dict[int, Inflow] = {}  # shm peer -> the message arriving in pieces
        self.mpi_polling = 0  # posted receives with an mpi4py side
        self.used_ctx: set[int] = {0, 1, 2, 3}
        # context agreements of this process under way (comm.Comm._alloc_ctx): their keys,
        # and the one offering the contexts in use now
        self.ctx_waiting: set[tuple[int, int]] = set()
        self.ctx_owner: tuple[int, int] | None = None
        self.dropped_ctx: set[int] = set()  # freed contexts not agreed on again yet
        # Context generations (see reuse_context): the highest taken here, and that of the
        # communicator holding (or that last held) each context (absent: 0, the built-in ones)
        self.ctx_clock = 0
        self.ctx_gen: dict[int, int] = {}
        # ABANDON notices about a communicator not taken here yet: (context, tag base) ->
        # (notice, who sent it, its world rank), applied by the reuse_context that takes it
        self.early: dict[tuple[int, int], tuple[wire.Abandon, str, int]] = {}
        # REVOKE notices alike: point-to-point context -> (generation, reason)
        self.early_revoke: dict[int, tuple[int, str]] = {}
        # (collective context, tag base) of abandoned collective instances -> (number, why,
        # error class the members fail with)
        self.abandoned: dict[tuple[int, int], tuple[int, str, int]] = {}
        # collective context -> how many records of `abandoned` are about it (absent: none),
        # kept by _record/_forget: the collectives' fast paths look here, one lookup per call
        self.abandoned_in: dict[int, int] = {}
        # (collective context, tag base) of abandoned blocking instances -> (number, world
        # rank -> whether that member left before taking the instance's area round: the
        # ABANDON's `untaken`), read by area.Doubt; kept and dropped with `abandoned`'s
        # record at the same key
        self.leavers: dict[tuple[int, int], tuple[int, dict[int, bool]]] = {}
        # point-to-point contexts of revoked communicators (see `ulfm`) -> who revoked them
        self.revoked: dict[int, str] = {}

    # ------------------------------------------------------------------ posted receives
    def match_posted(self, src: int, ctx: int, tag: int) -> RecvOp | None:
        """Take the first posted receive that matches a message (src, ctx, tag), or None."""
        for op in self.posted:
            if op.matches(ctx, src, tag):
                self.posted.remove(op)
                if op.mpi is not None:
                    self.mpi_polling -= 1
                return op
        return None

    def withdraw(self, op: RecvOp) -> bool:
        """Take `op` out of the posted receives; True iff it was there (not yet matched)."""
        with self.lock:
            if op not in self.posted:
                return False
            self.posted.remove(op)
            if op.mpi is not None:
                self.mpi_polling -= 1
            return True

    def post(self, op: RecvOp) -> RecvOp:
        """Match `op` against the unexpected messages, else queue it (an mpi4py side: also
        polled at once)."""
        if not (self.unexpected or op.mpi is not None or _count() - _service[0]):
            self.posted.append(op)  # (the main thread alone: nothing to lock out)
            return op
        with self.lock:
            for entry in self.unexpected:
                if op.matches(entry.ctx, entry.src, entry.tag):
                    self.unexpected.remove(entry)
                    self._deliver_unexpected(op, entry)
                    return op
            self.posted.append(op)
            if op.mpi is not None:
                self.mpi_polling += 1
                self.poll_native()
            return op

    def _deliver_unexpected(self, op: RecvOp, entry: Unexpected) -> None:
        op.begin(entry.src, entry.tag)
        offset = 0
        for part in entry.parts:
            op.write(offset, part)
            offset += len(part)
        op.count = offset
        self.release(entry)
        if entry.complete:
            op.finish()
        else:  # the rest of it is still arriving: send the remaining pieces straight to op
            flow = self.inflow[entry.peer]
            assert flow.sink is entry
            flow.sink = op

    # ------------------------------------------------------------------ unexpected messages
    def arrived(
        self, src: int, ctx: int, tag: int, peer: int, sync_seq: int | None
    ) -> RecvOp | Unexpected:
        """Where a DATA/FIRST message (src, ctx, tag) from shm `peer` goes: the posted
        receive it matches (begun; its synchronous sender ACKed), else a new unexpected entry
        (queued, or released at once when its context or collective instance is dropped)."""
        op = self.match_posted(src, ctx, tag)
        if op is None:
            entry = Unexpected(src, ctx, tag, peer, sync_seq)
            if self._dropped(ctx, tag):
                self.release(entry)  # taken (and ACKed) but kept nowhere
            else:
                self.unexpected.append(entry)
            return entry
        op.begin(src, tag)
        if sync_seq is not None:
            self.send_control(peer, wire.CTRL_ACK, wire.SEQ.pack(sync_seq))
        return op

    def find_unexpected(self, ctx: int, src: int, tag: int) -> Unexpected | None:
        """The first unexpected message matching (ctx, src, tag), complete or not."""
        with self.lock:
            for entry in self.unexpected:
                if (
                    entry.ctx == ctx
                    and (src == constants.ANY_SOURCE or entry.src == src)
                    and (tag == constants.ANY_TAG or entry.tag == tag)
                ):
                    return entry
            return None

    def release(self, entry: Unexpected) -> None:
        """The sender of `entry` (received or dropped) may go on: ACK a synchronous one."""
        if entry.sync_seq is not None:
            self.send_control(entry.peer, wire.CTRL_ACK, wire.SEQ.pack(entry.sync_seq))
        if entry.waiter is not None:
            entry.waiter.done = True

    def _purge(self, doomed: Callable[[Unexpected], bool]) -> None:
        keep = []
        for entry in self.unexpected:
            if doomed(entry):
                self.release(entry)
            else:
                keep.append(entry)
        self.unexpected[:] = keep

    # ------------------------------------------------------------------ contexts
    def drop_context(self, ctxs: tuple[int, ...]) -> None:
        """A communicator with these contexts was freed: forget its unexpected messages and
        drop those still to come until `reuse_context` (see the module docstring); they are
        no longer in use here."""
        with self.lock:
            self.used_ctx.difference_update(ctxs)
            self.dropped_ctx.update(ctxs)
            for ctx in ctxs:
                self.revoked.pop(ctx, None)
            self._purge(lambda entry: entry.ctx in ctxs)

    def reuse_context(self, ctxs: tuple[int, ...], offers: int) -> int:
        """The members agreed on these contexts for a new communicator, their offers merged
        into `offers` (merge_offers): take them again (what the old communicator's
        collectives left on record goes) and return the new communicator's generation.

        The generation is one above the highest context clock of the members, so the same on
        each, and above every generation any of them took before: an ABANDON notice about an
        earlier holder of the context carries a lower one (its sender and this process both
        held that communicator), one about a communicator not taken here yet a higher one."""
        gen = (offers >> CLOCK_SHIFT) + 1
        with self.lock:
            self.dropped_ctx.difference_update(ctxs)
            self.used_ctx.update(ctxs)
            self.ctx_clock = max(self.ctx_clock, gen)
            for ctx in ctxs:
                self.ctx_gen[ctx] = gen
            for key in [key for key in self.abandoned if key[0] in ctxs]:
                self._forget(key)
            for key in [key for key in self.early if key[0] in ctxs]:
                self.abandoned_by(*self.early.pop(key))  # (those still early go back)
            for ctx in ctxs:
                if ctx in self.early_revoke:
                    self.revoked_by(ctx, *self.early_revoke.pop(ctx))
        return gen

    def revoke(self, ctx: int, reason: str) -> bool:
        """Revoke the communicator whose point-to-point context is `ctx` (even) in this
        process: its receives posted on both its contexts complete with ERR_REVOKED (but
        those of Agree and Shrink, which run on revoked communicators: collective-context
        tags from wire.FT_TAGS_FROM), and later calls on it raise ERR_REVOKED (see `ulfm`).
        A context not in use here (a freed communicator's notice, arriving late) is
        ignored. True iff it was newly revoked."""
        with self.lock:
            if ctx in self.revoked or ctx not in self.used_ctx or ctx in self.dropped_ctx:
                return False
            self.revoked[ctx] = reason
            doomed = [
                op
                for op in self.posted
                if op.ctx == ctx or (op.ctx == ctx + 1 and op.want_tag < wire.FT_TAGS_FROM)
            ]
            for op in doomed:
                self.withdraw(op)
                op.error, op.done = exceptions.ERR_REVOKED, True
            return True

    def revoked_by(self, ctx: int, gen: int, reason: str) -> None:
        """A REVOKE notice (`reason` names its sender) about the communicator of
        point-to-point context `ctx` and generation `gen`: `revoke` it where it is the one
        holding `ctx` here; ignored for an earlier generation, kept for reuse_context for a
        later one (a communicator not taken here yet)."""
        with self.lock:
            held = self.ctx_gen.get(ctx, 0)
            if gen == held:
                self.revoke(ctx, reason)
            elif gen > held:
                self.early_revoke[ctx] = (gen, reason)

    def _dropped(self, ctx: int, tag: int) -> bool:
        """True for a message of a freed context or of an abandoned collective instance."""
        if ctx in self.dropped_ctx:
            return True
        if not self.abandoned:
            return False
        key = (ctx, tag & -wire.COLL_SPAN if tag < wire.COLL_TAGS else tag)
        return key in self.abandoned

    # ------------------------------------------------------------------ abandoned collectives
    def abandon(
        self,
        ctx: int,
        gen: int,
        seq: int,
        base: int,
        span: int,
        reason: str,
        members: list[int],
        error: int = exceptions.ERR_OTHER,
        untaken: bool = False,
    ) -> None:
        """This rank left collective instance number `seq` of the communicator whose
        collective context is `ctx` (of generation `gen`, see reuse_context) with an error
        (its messages carry tags base .. base+span-1): withdraw its receives, drop its
        messages (those here and those to come), and tell the other `members` (world ranks)
        why (naming `gen`), so that they leave it too instead of waiting for this rank,
        failing with `error` where it is one of wire.ABANDON_CLASSES (a fault-tolerance
        class), else with ERR_OTHER. `untaken`: this rank left before taking the instance's
        round in the collective area (wire.Abandon)."""
        if error not in wire.ABANDON_CLASSES:
            error = exceptions.ERR_OTHER
        with self.lock:
            self._record((ctx, base), (seq, reason, error))
            self._fail_posted(ctx, base, span, 0)
            self._purge(lambda entry: entry.ctx == ctx and base <= entry.tag < base + span)
            payload = wire.encode_abandon(ctx, gen, seq, base, span, error, reason, untaken)
            for world in members:
                peer = self.routes[world].peer
                if peer >= 0:
                    try:
                        self.send_control(peer, wire.CTRL_ABANDON, payload)
                    except exceptions.Exception:
                        pass  # that peer is gone: it waits for nothing

    def abandoned_by(self, notice: wire.Abandon, who: str, world: int) -> None:
        """Another member (`who`, for the reason; world rank `world`) left a collective
        instance (its ABANDON `notice`): fail the receives of that instance (with the error
        class the notice carries) and drop its messages; for a blocking instance, note in
        `leavers` whether it left before taking the area's round. A notice about another
        generation of the context (see reuse_context) is ignored (an earlier one, or the one
        in use here freed), or kept for reuse_context (a later one, not taken here yet)."""
        gen = self.ctx_gen.get(notice.ctx, 0)
        if notice.gen != gen or notice.ctx in self.dropped_ctx:
            if notice.gen > gen:
                self.early[(notice.ctx, notice.base)] = (notice, who, world)
            return
        reason = f"{who} left this collective: {notice.reason}"
        key = (notice.ctx, notice.base)
        self._record(key, (notice.seq, reason, notice.error))
        if notice.base < wire.COLL_TAGS:
            seen = self.leavers.get(key)
            if seen is None or seen[0] != notice.seq:
                seen = self.leavers[key] = (notice.seq, {})
            seen[1][world] = notice.untaken
        self._fail_posted(notice.ctx, notice.base, notice.span, notice.error, reason)
        end = notice.base + notice.span
        self._purge(lambda e: e.ctx == notice.ctx and notice.base <= e.tag < end)

    def _record(self, key: tuple[int, int], record: tuple[int, str, int]) -> None:
        """Put `record` (number, why, error class) in `abandoned` at `key` (collective
        context, tag base), replacing any there, and count it in `abandoned_in`. Callers hold
        the lock."""
        if key not in self.abandoned:
            self.abandoned_in[key[0]] = self.abandoned_in.get(key[0], 0) + 1
        self.abandoned[key] = record

    def _forget(self, key: tuple[int, int]) -> None:
        """Remove the record at `key` from `abandoned` (if any) and from `abandoned_in`'s
        count (its context leaves it with its last record). Callers hold the lock."""
        self.leavers.pop(key, None)
        if self.abandoned.pop(key, None) is not None:
            left = self.abandoned_in[key[0]] - 1
            if left:
                self.abandoned_in[key[0]] = left
            else:
                del self.abandoned_in[key[0]]

    def _fail_posted(self, ctx: int, base: int, span: int, error: int, why: str = "") -> None:
        """Complete the posted receives of one collective instance: with `error` (and `why`
        it failed), or (0) withdrawn as if cancelled."""
        for op in [op for op in self.posted if op.ctx == ctx and base <= op.want_tag < base + span]:
            self.withdraw(op)
            if why:
                op.why = why
            op.error, op.cancelled, op.done = error, not error, True

    def entering(self, ctx: int, seq: int) -> tuple[int, str] | None:
        """Blocking collective instance `seq` of collective context `ctx` starts here: the
        (error class, reason) another member gave for abandoning it already, or None (see
        abandoned_already). Records of instances
        half the numbering ago go (their tag base comes round again)."""
        if not self.abandoned:
            return None
        with self.lock:
            self._forget((ctx, wire.coll_base(seq + wire.COLL_INSTANCES // 2)))
            return self.abandoned_already(ctx, wire.coll_base(seq), seq)

    def abandoned_already(self, ctx: int, base: int, seq: int) -> tuple[int, str] | None:
        """(error class to fail with, reason) if another member abandoned collective
        instance `seq` (tags from `base`) before it started here, else None (an older
        instance's record there goes)."""
        with self.lock:
            record = self.abandoned.get((ctx, base))
            if record is None:
                return None
            if record[0] != seq:
                self._forget((ctx, base))
                return None
            return record[2], record[1]
