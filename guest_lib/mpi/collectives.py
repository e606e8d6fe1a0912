"""Collective operations of an intra-communicator, on its collective context (ctx + 1).

Shared memory is used directly where the queues allow it:
- reductions read every remote operand where it lies: a receive *sink* gets each arriving
  piece as a zero-copy view of the queue and folds it into the result in place
  (`Op.reduce_into` / `Op.combine_to`), so an operand is never copied out first;
- Allreduce of two ranks is one exchange with both sides computing `a0 op a1` straight from
  the peer's view (identical results on both ranks);
- Reduce_scatter_block folds each block at its owner the same way.
- Bcast of 256 KiB or more among three ranks or more is written once and read by all: the root
  places each piece in its queue to the next rank without sending it, the other ranks copy
  it in place from there (the core's place/read_placed, the place checked to lie in that
  queue), and it is sent to the next rank once they all said they have it. Smaller buffers
  and object broadcasts (whose size only the root knows) go down a binomial tree.

Across regions (`_hier` is set when members sit in more than one region and mpi4py is up):
Barrier, Bcast, Reduce, Allreduce and their object forms run hierarchically: within each
region over shared memory to the region's leader (lowest rank), between leaders with
mpi4py's own collective on a leaders' communicator, and back within each region. The other
collectives use the point-to-point algorithms below, which are correct over any mix of
routes.

Message order: blocking collectives are numbered per communicator (the same numbers on every
member, as all members call them in the same order), and each instance's messages carry
tags of its own (`coll_base` of its number plus a fixed internal tag); each nonblocking one
has a tag of its own too. Successive collectives never mix.

Errors: a blocking collective that raises on one rank (a bad argument, a truncated buffer, a
lost peer) is *abandoned* by that rank (`engine.abandon`): its receives are withdrawn, its
messages dropped, and the other members are told; each of them then raises
MPI.Exception(ERR_OTHER) naming that rank and its error from the same collective instead of
waiting, and the communicator stays usable for the next collective on every rank. Argument
errors are found before any data moves where the arguments are at hand.
Non-commutative user ops are folded in rank order: x0 op x1 op ... op x(p-1).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from guest_lib.mpi import area, buffers, constants, datatypes, exceptions, locks, native, ops
from guest_lib.mpi.constants import IN_PLACE
from guest_lib.mpi.engine import StagedOp
from guest_lib.mpi.fastpath import other_threads
from guest_lib.mpi.matching import DoneOp, Op, merge_offers
from guest_lib.mpi.pickling import bundle as _bundle
from guest_lib.mpi.pickling import dumps as _dumps
from guest_lib.mpi.pickling import loads as _loads
from guest_lib.mpi.pickling import piece as _piece
from guest_lib.mpi.request import Request, new_request, request_of, unpickle
from guest_lib.mpi.wire import (
    ABANDON_CLASSES,
    COLL_SPAN,
    KIND_DATA,
    abandon_class,
    coll_base,
    core_tag,
)
from ivshmem_comm import ring
from ivshmem_comm.collective import (
    C_ALLGATHERV,
    C_ALLTOALLV,
    C_BARRIER,
    C_BCAST,
    C_GATHERV,
    C_SCATTERV,
    FOLD_DTYPES,
    FOLD_OPS,
    KIND_ALLREDUCE,
    KIND_EXSCAN,
    KIND_REDUCE,
    KIND_REDUCE_SCATTER,
    KIND_SCAN,
    CollectiveGroup,
    CollectiveRequest,
    RoundRequest,
    fold_codes,
)
from ivshmem_comm.layout import COLL_SEQ_MASK

if TYPE_CHECKING:
    from guest_lib.mpi.engine import Engine
    from guest_lib.mpi.routes import Route

T_BARRIER, T_BCAST, T_GATHER, T_SCATTER, T_ALLGATHER, T_ALLTOALL = 1, 2, 3, 4, 5, 6
T_REDUCE, T_ALLREDUCE, T_SCAN, T_EXSCAN, T_RSB, T_CTX = 7, 8, 9, 10, 11, 12
T_ALLREDUCE_GATHER, T_BCAST_REF, T_BCAST_ACK = 13, 14, 15
T_NONBLOCKING, NONBLOCKING_TAGS = 1 << 17, 1 << 16  # nonblocking collective n: T_NONBLOCKING + n
RSAG_MIN = 64 << 10  # bytes from which Allreduce is a reduce-scatter and an allgather
BCAST_ONCE_MIN = 256 << 10  # bytes from which a broadcast to >= 2 others is written once
_PLACED = struct.Struct("<QQ")  # where a placed broadcast piece lies: region offset, bytes
_NOTHING = memoryview(bytearray(0))


def _fits(shared: area.Area, pickles: list[memoryview]) -> bool:
    """Whether the bundle of `pickles` (`pickling.bundle`: a scatter's or an alltoall's
    slab payload) fits a slab (CollectiveRound.front bundles them alike)."""
    return 8 * len(pickles) + sum(map(len, pickles)) <= shared.group.slab_size


def _bundled(shared: area.Area, pickles: list[memoryview]) -> bytes | None:
    """The bundle of `pickles` where it fits a slab (`_fits`), else None (the caller then
    declines the round: `Area.declining`)."""
    return _bundle(pickles) if _fits(shared, pickles) else None


# What a collective runs in the collective area: (CollectiveGroup method name, its arguments),
# or None for messages (an op the area cannot fold). Made by the _p_* methods, which check the
# arguments as the message path does; every member decides alike (same op, same datatypes).
Plan = Callable[[], tuple[str, tuple[Any, ...]] | None]


_SLOW = object()  # what a fast lane returns when the collective's own body must run it


def collective(
    method: Callable[..., Any] | None = None,
    *,
    fast: Callable[..., Any] | None = None,
    empty: Callable[..., bool] | None = None,
) -> Any:
    """Decorator of a blocking collective: numbers the instance (its messages carry its tag
    base, see `_c_isend`), and abandons it when it raises here (see the module docstring).
    A collective called inside another one runs as part of that instance.

    `fast(self, area, *args)`: the collective's lane for the common case in the collective
    area (`area.Area.call`: one C call), tried first when the area is bound and ready; it
    returns the collective's result, or _SLOW having moved nothing (or after the area was
    dropped) for the body to run it as usual.

    `empty(self, *args)` (see `_e_bcast`): True where the call moves no byte, which every
    member then decides alike: the instance is numbered and nothing else runs (`_skip`)."""
    if method is None:
        return functools.partial(collective, fast=fast, empty=empty)

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        engine = self._live()
        if self._coll_active or len(self._group) < 2:
            return method(self, *args, **kwargs)
        if empty is not None and _empty(empty, self, args, kwargs):
            return _skip(self)
        if fast is not None:
            shared = self._area
            if shared and shared.ready():
                result = _laned(self, engine, shared, fast, args, kwargs)
                if result is not _SLOW:
                    return result
        seq = self._coll_seq
        self._coll_seq = seq + 1
        self._coll_base = coll_base(seq)
        self._coll_active = True
        # Abandoned by another member already: this rank still checks its own arguments
        # (and raises its own error for a bad one) but then fails instead of waiting.
        self._coll_gone = engine.entering(self._ctx + 1, seq)
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            _abandon(self, engine, seq, exc)
            raise
        finally:
            self._coll_active = False
            self._coll_gone = None

    if fast is not None:
        run.lane = fast  # type: ignore[attr-defined]  # (see front_lanes)
    run.empty = empty  # type: ignore[attr-defined]  # (see _front)
    return run


# ------------------------------------------------------------------ collectives of no bytes
# A block collective (not a vector one) whose message is no byte on this member is none on
# any (the members' type signatures match), and MPICH returns from it without a word: so do
# we, on every path alike (the C front: CollectiveRound.front's E_EMPTY; the Python lanes and
# bodies: `collective`'s `empty` rules below, which take at least every form the C front
# takes), so that no member waits for another that skipped. The instance is still numbered
# (`_skip`), as a member that raises on its arguments numbers it: the members stay in step.
# Argument errors (a bad root or op, a spec buffers.parse refuses) are not skipped: the
# collective's body raises them as before.
def _skip(self: Any) -> None:
    """A collective instance that moves no byte (see above): numbered, nothing run. It
    enters the engine's numbering as every instance run does (`Engine.entering`: the
    abandonment records of instances half the numbering ago go), so that a record left
    there never outlives its tag base and drops the messages of the instance that comes
    to it next."""
    seq = self._coll_seq
    self._coll_seq = seq + 1
    engine = self._engine
    if engine.abandoned:
        engine.entering(self._ctx + 1, seq)


def _skip_started(self: Any, engine: Engine) -> Request:
    """`_skip` of a nonblocking one: numbered as `_nonblocking` numbers it, and complete."""
    self._nb_seq += 1
    return new_request(_STARTED_DONE, engine, None, None)


def _empty(rule: Callable[..., bool], self: Any, args: Any, kwargs: Any) -> bool:
    """`rule(self, *args, **kwargs)`, False where it raises (the body reports it)."""
    try:
        return rule(self, *args, **kwargs)
    except Exception:
        return False


def _nothing(spec: Any, writable: bool) -> Any:
    """The datatype of message spec `spec` (not IN_PLACE, BOTTOM or None) where buffers.parse
    takes it (a receive's `writable`) and it holds no byte; else None."""
    kind = type(spec)
    if kind is np.ndarray:
        if spec.size:
            return None
    elif kind is list or kind is tuple:
        if len(spec) == 3 and type(spec[1]) is int and spec[1]:
            return None  # (the common case of a count: no parse)
    elif spec is None or isinstance(spec, constants.BufferConstant):
        return None
    try:
        parsed = buffers.parse(spec, writable=writable, deferred=True)
    except Exception:
        return None
    return None if parsed.view.nbytes else parsed.datatype


def _rooted(self: Any, root: Any) -> bool:
    return type(root) is int and 0 <= root < len(self._group)


def _e_bcast(self: Any, buf: Any, root: int = 0) -> bool:
    """Bcast's `empty` rule: a valid root and no byte in buf."""
    return _rooted(self, root) and _nothing(buf, self._rank != root) is not None


def _e_rooted(self: Any, root: Any, own: Any, writable: bool, blocks: Any) -> bool:
    """Gather's and Scatter's rule: a valid root; no byte in `own` (this member's block, a
    receive where `writable`; IN_PLACE or None at the root) and, at the root, none in
    `blocks` (its side of every member's block)."""
    if not _rooted(self, root):
        return False
    if self._rank != root:
        return _nothing(own, writable) is not None
    placed = own is IN_PLACE or own is None or _nothing(own, writable) is not None
    return placed and _nothing(blocks, not writable) is not None


def _e_gather(self: Any, sendbuf: Any, recvbuf: Any, root: int = 0) -> bool:
    """Gather's: `_e_rooted` of sendbuf, recvbuf at the root."""
    return _e_rooted(self, root, sendbuf, False, recvbuf)


def _e_scatter(self: Any, sendbuf: Any, recvbuf: Any, root: int = 0) -> bool:
    """Scatter's: `_e_rooted` of recvbuf, sendbuf at the root."""
    return _e_rooted(self, root, recvbuf, True, sendbuf)


def _e_pair(self: Any, sendbuf: Any, recvbuf: Any) -> bool:
    """Alltoall's: no byte in recvbuf, nor in sendbuf (but IN_PLACE)."""
    if _nothing(recvbuf, True) is None:
        return False
    return sendbuf is IN_PLACE or _nothing(sendbuf, False) is not None


def _e_allgather(self: Any, sendbuf: Any, recvbuf: Any) -> bool:
    """Allgather's: `_e_pair`, a sendbuf of None in place too (as its lanes and body)."""
    return _e_pair(self, IN_PLACE if sendbuf is None else sendbuf, recvbuf)


def _e_fold(self: Any, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM) -> bool:
    """Allreduce's, Scan's, Exscan's and Reduce_scatter_block's: an Op, and no byte in
    recvbuf nor in sendbuf (but IN_PLACE), of the same datatype (mpi4py's check, which
    raises on a mismatch: the body's `_same_message` then does)."""
    if not isinstance(op, ops.Op):
        return False
    received = _nothing(recvbuf, True)
    if received is None:
        return False
    return sendbuf is IN_PLACE or _nothing(sendbuf, False) == received


def _e_reduce(self: Any, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM, root: int = 0) -> bool:
    """Reduce's: a valid root, an Op, no byte in sendbuf (but IN_PLACE at the root) and, at
    the root, none in recvbuf, of the same datatype (as `_e_fold`)."""
    if not _rooted(self, root) or not isinstance(op, ops.Op):
        return False
    if self._rank != root:
        return _nothing(sendbuf, False) is not None
    return _e_fold(self, sendbuf, recvbuf, op)


def _laned(
    self: Any, engine: Engine, shared: area.Area, fast: Callable[..., Any], args: Any, kwargs: Any
) -> Any:
    """Collective instance `seq` (this communicator's next) through its lane `fast`: the
    lane's result, or _SLOW having moved nothing (the instance number is given back, for
    the collective's body to take it). An error abandons the instance (module docstring)."""
    seq = self._coll_seq
    self._coll_seq = seq + 1
    self._coll_base = coll_base(seq)
    try:
        result = fast(self, shared, *args, **kwargs)
    except Exception as exc:
        _abandon(self, engine, seq, exc)
        raise
    if result is _SLOW:
        self._coll_seq = seq
    return result


def front_lanes(cls: type) -> None:
    """Put in front of every method of `cls` that has a lane (`collective(fast=...)`, as
    the class has it at the end: wrapped by buffers.unpacking too) the shortest way to that
    lane, taken when nothing else needs a look: the area bound with its C accelerator, no
    started area collective pending, no collective running, the engine quiet, this
    communicator not revoked and no record of an abandoned collective of it
    (`Area.untroubled`: other communicators' records and revocations do not concern it; the
    method decides where they do). Anything else, and a lane's _SLOW, calls the
    method as it is. The nonblocking ones with a lane (`started`) alike (`_front_started`).
    With the C accelerator, the collectives of _C_FRONTS go first through the C front
    (`_c_front`; the nonblocking ones `_c_start`), in front of all that."""
    for name in dir(cls):
        method = getattr(cls, name)
        fast = getattr(method, "lane", None)
        begun = getattr(method, "begun", None)
        if fast is not None and callable(method):
            setattr(cls, name, _front(method, fast))
        elif begun is not None and callable(method):
            setattr(cls, name, _front_started(method, begun[0], begun[1]))
    if ring.set_front is not None:
        _set_front_tables()
        for name, make in _C_FRONTS.items():
            setattr(cls, name, make(getattr(cls, name)))


def _front(method: Callable[..., Any], fast: Callable[..., Any]) -> Callable[..., Any]:
    """The front of `method` (see front_lanes). A lane made of C arguments (`_one_call`,
    `_declining`) runs here without its own frame: arguments it does not take (None, or an
    error: the method's body reports it) leave everything to the method."""
    args_of = getattr(fast, "args_of", None)
    then = getattr(fast, "then", None)
    empty = getattr(method, "empty", None)

    @functools.wraps(method)
    def front(self: Any, *args: Any, **kwargs: Any) -> Any:
        shared = self._area
        if shared and not self._coll_active:
            if empty is not None and _empty(empty, self, args, kwargs):
                return method(self, *args, **kwargs)  # (which skips it: `collective`)
            engine = self._engine
            group = shared.group
            if (
                group._c is not None
                and not group._pending
                and shared._ctx not in engine.abandoned_in
                and self._ctx not in engine.revoked
                and engine.quiet()
            ):
                if args_of is None:
                    result = _laned(self, engine, shared, fast, args, kwargs)
                    if result is not _SLOW:
                        return result
                    return method(self, *args, **kwargs)
                try:
                    c_args = args_of(self, group, *args, **kwargs)
                except Exception:
                    c_args = None
                if c_args is not None:
                    seq = self._coll_seq
                    self._coll_seq = seq + 1
                    self._coll_base = coll_base(seq)
                    try:
                        if _declinable(self, shared, c_args, then, args, kwargs):
                            return None
                    except Exception as exc:
                        _abandon(self, engine, seq, exc)
                        raise
                    self._coll_seq = seq  # nothing moved: the method numbers it again
        return method(self, *args, **kwargs)

    return front


def _front_started(
    method: Callable[..., Any], args_of: Callable[..., CArgs], messages: Messages | None
) -> Callable[..., Any]:
    """`_front` of a nonblocking collective with a lane (`started`): taken with the area
    bound with its C accelerator, this communicator not revoked and no record of an
    abandoned collective of it (`Area.untroubled`)."""
    empty = getattr(method, "empty", None)

    @functools.wraps(method)
    def front(self: Any, *args: Any, **kwargs: Any) -> Any:
        shared = self._area
        if shared:
            if empty is not None and _empty(empty, self, args, kwargs):
                return method(self, *args, **kwargs)  # (which skips it: `started`)
            engine = self._engine
            if (
                shared.group._c is not None
                and shared._ctx not in engine.abandoned_in
                and self._ctx not in engine.revoked
            ):
                request = _begun(self, engine, shared, args_of, messages, args, kwargs)
                if request is not None:
                    return request
        return method(self, *args, **kwargs)

    return front


# ------------------------------------------------------------------ fast lanes (see collective)
# The buffer forms codes pass on every call (numpy arrays, `[buf, count, datatype]`,
# `(buf, datatype)`) and IN_PLACE, one round of the collective area, in one C call; anything
# else (other forms, sizes over one round, argument errors) takes the collective's body,
# which checks and reports as always.
def _lane(buf: Any, writable: bool, blocks: int = 1) -> tuple[Any, int, int] | None:
    """(what the C round takes, bytes, elements) of a buffer argument: a numpy array as it
    is (C-contiguous, plain element type, native byte order, writable for a receive), the
    byte view of a `[buf, count, datatype]` / `(buf, datatype)` spec that buffers.plain
    resolves, or of any other buffer on its own that buffers.quick takes (not empty, of a
    native numeric format: elements of its itemsize); None: the body's job. `blocks`: the
    members' count where the argument holds one block per member (a block collective's
    receive side of Gather/Allgather, send side of Scatter, both of Alltoall), whose
    explicit count is one block, as mpi4py reads it; 1 elsewhere (an explicit count is the
    whole message)."""
    kind = type(buf)
    if kind is np.ndarray:
        flags = buf.flags
        dtype = buf.dtype
        if (
            flags.c_contiguous
            and (flags.writeable or not writable)
            and dtype.kind in "biufc"
            and dtype.isnative
        ):
            return buf, buf.nbytes, buf.size
        return None
    if kind is list or kind is tuple:
        # the C parse of the point-to-point calls first (predefined datatypes), the Python
        # one (any datatype that does not pack) when it declines
        n = len(buf)
        if n == 3 and type(buf[1]) is int:
            count = buf[1] * blocks
            view = buffers.quick(buf if blocks == 1 else [buf[0], count, buf[2]], writable)
            if view is not None:
                return view, len(view), count
        elif n == 2:
            view = buffers.quick(buf, writable)
            if view is not None:
                return view, len(view), len(view) // buf[1].size
        spec = buffers.plain(buf, writable, blocks)
        if spec is not None:
            return spec.view, len(spec.view), spec.count
        return None
    # any other buffer on its own (bytearray, array.array, mmap, memoryview), as the C lane
    # takes it: not empty (IN_PLACE and BOTTOM export an empty one), its format's elements
    view = buffers.quick(buf, writable)
    if view is not None:
        return view, len(view), len(view) // memoryview(buf).itemsize
    return None


@functools.lru_cache(maxsize=64)
def _even(size: int, n: int) -> tuple[list[int], list[int]]:
    """Counts and displacements (bytes) of `size` blocks of `n` bytes (shared: read only)."""
    return [n] * size, list(range(0, n * size, n)) if n else [0] * size


def _blocks(buf: Any, writable: bool, size: int) -> tuple[Any, list[int], list[int]] | None:
    """(what the C round takes, byte counts, byte displacements) of a buffer argument that
    holds one block per member: `size` equal blocks of a block form (see _lane), or the
    explicit counts of a vector spec (buffers.plain_vector); None: the body's job."""
    lane = _lane(buf, writable, size)
    if lane is not None:
        if lane[2] % size:
            return None
        return (lane[0], *_even(size, lane[1] // size))
    return buffers.plain_vector(buf, size, writable)


# A lane's C arguments: `_a_*(comm, group, *args)` gives, for the collective's arguments, what
# Area.call (blocking, `_one_call`) and Area.begin (nonblocking, `started`) take, or None
# for the collective's body (its arguments checked there).
CArgs = tuple[Any, ...] | None
Stages = Iterator[list[Op]]
# A declinable lane's way on messages: `messages(comm, tag, *args)` gives the collective's
# stages (on `tag`) for its arguments.
Messages = Callable[..., Stages]
_BARRIER = (C_BARRIER, None, None, 0, None, None, None, None)


def _one_call(args_of: Callable[..., CArgs]) -> Callable[..., Any]:
    """The blocking lane (see `collective`) of a collective whose round members never decline
    (sizes every member knows): Area.call with `args_of`'s arguments."""

    def lane(self: Any, shared: area.Area, *args: Any, **kwargs: Any) -> Any:
        c_args = args_of(self, shared.group, *args, **kwargs)
        return None if c_args is not None and shared.call(*c_args) else _SLOW

    lane.args_of = args_of  # type: ignore[attr-defined]  # (see _front)
    lane.then = None  # type: ignore[attr-defined]
    return lane


def _a_barrier(self: Any, group: CollectiveGroup) -> CArgs:
    return _BARRIER


def _a_bcast(self: Any, group: CollectiveGroup, buf: Any, root: int = 0) -> CArgs:
    if not 0 <= root < group.size:
        return None
    lane = _lane(buf, self._rank != root)
    if lane is None or lane[1] > group.slab_size:
        return None
    view = lane[0]
    return C_BCAST, view, view, root, None, None, None, None


def _a_gather(
    self: Any, group: CollectiveGroup, sendbuf: Any, recvbuf: Any, root: int = 0
) -> CArgs:
    size = group.size
    counts = displs = recv = None
    if not 0 <= root < size:
        return None
    in_place = sendbuf is IN_PLACE or sendbuf is None
    mine = None if in_place and self._rank == root else _lane(sendbuf, False)
    if self._rank != root:
        if mine is None or mine[1] > group.slab_size:
            return None
        send = mine[0]
    else:
        if mine is None and not in_place:
            return None
        blocks = _blocks(recvbuf, True, size)
        if blocks is None:
            return None
        recv, counts, displs = blocks
        if mine is not None and mine[1] != counts[root]:
            return None
        send = None if mine is None else mine[0]
    return C_GATHERV, send, recv, root, counts, displs, None, None


def _m_gather(self: Any, tag: int, sendbuf: Any, recvbuf: Any, root: int = 0) -> Stages:
    """The way on messages of a Gather(v) whose area round this member declined (its
    block, or at the root some block, over a slab): the root takes only the blocks its
    round left (Intracomm._gatherv's `group`)."""
    shared = self._area  # (read now, while the round's area is current)
    return self._gatherv(sendbuf, recvbuf, root, tag, group=shared.group if shared else None)


def _a_scatter(
    self: Any, group: CollectiveGroup, sendbuf: Any, recvbuf: Any, root: int = 0
) -> CArgs:
    size = group.size
    counts = displs = send = None
    if not 0 <= root < size:
        return None
    in_place = recvbuf is IN_PLACE or recvbuf is None
    theirs = None if in_place and self._rank == root else _lane(recvbuf, True)
    if self._rank != root:
        if theirs is None:
            return None
        recv = theirs[0]  # (over a segment: the root declines the round, see _declining)
    else:
        blocks = _blocks(sendbuf, False, size)
        if blocks is None or (theirs is None and not in_place):
            return None
        send, counts, displs = blocks
        if theirs is not None and theirs[1] != counts[root]:
            return None
        recv = None if theirs is None else theirs[0]  # None: in place, the block stays
    return C_SCATTERV, send, recv, root, counts, displs, None, None


def _m_scatter(self: Any, tag: int, sendbuf: Any, recvbuf: Any, root: int = 0) -> Stages:
    return self._scatterv(sendbuf, recvbuf, root, tag)


def _a_allgather(self: Any, group: CollectiveGroup, sendbuf: Any, recvbuf: Any) -> CArgs:
    blocks = _blocks(recvbuf, True, group.size)
    if blocks is None:
        return None
    recv, counts, displs = blocks
    in_place = sendbuf is IN_PLACE or sendbuf is None
    mine = None if in_place else _lane(sendbuf, False)
    if max(counts) > group.slab_size or not (
        in_place or (mine is not None and mine[1] == counts[self._rank])
    ):
        return None
    send = None if mine is None else mine[0]
    return C_ALLGATHERV, send, recv, 0, counts, displs, None, None


def _a_alltoall(self: Any, group: CollectiveGroup, sendbuf: Any, recvbuf: Any) -> CArgs:
    """In place, recvbuf's blocks are the send blocks: the C round copies them all into
    the slab before it writes any, and a round it declines leaves them as they were, for
    the messages that then move them."""
    size = group.size
    theirs = _blocks(recvbuf, True, size)
    if theirs is None:
        return None
    recv, rcounts, rdispls = theirs
    if sendbuf is IN_PLACE:
        return C_ALLTOALLV, recv, recv, 0, rcounts, rdispls, rcounts, rdispls
    mine = _blocks(sendbuf, False, size)
    if mine is None:
        return None
    send, scounts, sdispls = mine
    return C_ALLTOALLV, send, recv, 0, scounts, sdispls, rcounts, rdispls


def _m_alltoall(self: Any, tag: int, sendbuf: Any, recvbuf: Any) -> Stages:
    return self._alltoallv(sendbuf, recvbuf, tag)


def _operand(buf: Any, writable: bool, units: bool = False) -> np.ndarray | None:
    """A reduction's buffer argument as a numpy array over its memory (see _lane); with
    `units`, only where one element is one unit of its datatype (counts are in those)."""
    if type(buf) is np.ndarray:
        return buf if _lane(buf, writable) is not None else None
    spec = buffers.plain(buf, writable) if type(buf) in (list, tuple) else None
    if spec is None:
        return None
    dtype = spec.datatype.base.dtype
    if dtype is None or (units and dtype.itemsize != spec.datatype.size):
        return None
    return np.frombuffer(spec.view, dtype)


def _a_fold(
    group: CollectiveGroup,
    kind: int,
    sendbuf: Any,
    recvbuf: Any,
    op: Any,
    want: bool,
    upto: int | None = None,
) -> CArgs:
    """Reduce (`want`: at the root), Allreduce, Scan and Exscan (`upto`: the ranks folded,
    default all) of predefined ops on plain numbers. Exscan's rank 0, which takes no
    result, still reads an IN_PLACE operand from recvbuf."""
    in_place = sendbuf is IN_PLACE and kind == KIND_EXSCAN
    recv = _operand(recvbuf, True) if want or in_place else None
    send = recv if sendbuf is IN_PLACE else _operand(sendbuf, False)
    if send is None or (want and recv is None):
        return None
    codes = fold_codes(send, getattr(op, "ufunc", None))
    if codes is None or send.nbytes > group.slab_size:
        return None
    if recv is not None and (
        recv.dtype != send.dtype or recv.size != send.size or not recv.flags.aligned
    ):
        return None
    return (
        area.C_FOLD,
        kind,
        send,
        recv if want else None,
        group.size if upto is None else upto,
        *codes,
    )


def _a_reduce(
    self: Any,
    group: CollectiveGroup,
    sendbuf: Any,
    recvbuf: Any,
    op: Any = ops.SUM,
    root: int = 0,
) -> CArgs:
    if not 0 <= root < group.size:
        return None
    return _a_fold(group, KIND_REDUCE, sendbuf, recvbuf, op, self._rank == root)


def _a_allreduce(
    self: Any, group: CollectiveGroup, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM
) -> CArgs:
    return _a_fold(group, KIND_ALLREDUCE, sendbuf, recvbuf, op, True)


def _declining(args_of: Callable[..., CArgs], messages: Messages, tag: int) -> Callable[..., Any]:
    """The blocking lane of a gatherv, scatterv or alltoallv, whose members may decline the
    round (data over it that not every member can size): Area.call with `args_of`'s
    arguments, then, where declined, `messages`' stages on internal tag `tag`."""

    then = (messages, tag)

    def lane(self: Any, shared: area.Area, *args: Any, **kwargs: Any) -> Any:
        c_args = args_of(self, shared.group, *args, **kwargs)
        if c_args is None or not _declinable(self, shared, c_args, then, args, kwargs):
            return _SLOW
        return None

    lane.args_of = args_of  # type: ignore[attr-defined]  # (see _front)
    lane.then = then  # type: ignore[attr-defined]
    return lane


def _declinable(
    self: Any,
    shared: area.Area,
    c_args: tuple[Any, ...],
    then: tuple[Messages, int] | None,
    args: Any,
    kwargs: Any,
) -> bool:
    """Area.call with `c_args`; where it ran and a member declined the round (its data is
    more than one round), the collective on messages: `then` = (its stages for the
    arguments, its internal tag)."""
    if not shared.call(*c_args):
        return False
    group = shared.group
    if group.truncated:
        raise _short_recvbuf(self)
    if then is not None and group.declined:
        self._run(then[0](self, then[1], *args, **kwargs))
    return True


def _a_scan(
    self: Any, group: CollectiveGroup, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM
) -> CArgs:
    return _a_fold(group, KIND_SCAN, sendbuf, recvbuf, op, True, self._rank + 1)


def _a_exscan(
    self: Any, group: CollectiveGroup, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM
) -> CArgs:
    rank = self._rank
    if rank == 0 and _operand(recvbuf, True) is None:  # (checked at every rank, as the body)
        return None
    return _a_fold(group, KIND_EXSCAN, sendbuf, recvbuf, op, rank > 0, rank)


def _a_scatter_fold(
    self: Any, group: CollectiveGroup, send: Any, out: Any, counts: list[int], op: Any
) -> CArgs:
    """A reduce-scatter of predefined ops on plain numbers (see _a_fold) whose blocks each
    fit one segment: `send` (an array, or None: the body's job) the blocks of `counts`
    elements one after the other, `out` (an array) this rank's block of the result."""
    if send is None:
        return None
    codes = fold_codes(send, getattr(op, "ufunc", None))
    if (
        codes is None
        or send.size != sum(counts)
        or out.dtype != send.dtype
        or out.size != counts[self._rank]
        or not out.flags.aligned
        or max(counts) * send.itemsize > group._segment()
    ):
        return None
    itemsize = send.itemsize
    nbytes = [c * itemsize for c in counts]
    return area.C_FOLD, KIND_REDUCE_SCATTER, send, out, group.size, *codes, nbytes


def _a_reduce_scatter_block(
    self: Any, group: CollectiveGroup, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM
) -> CArgs:
    recv = _operand(recvbuf, True, units=True)
    if recv is None:
        return None
    size = group.size
    recv = recv.reshape(-1)
    if sendbuf is IN_PLACE:  # recvbuf holds the operand; the result is its first block
        if recv.size % size:
            return None
        n = recv.size // size
        return _a_scatter_fold(self, group, recv, recv[:n], [n] * size, op)
    send = _operand(sendbuf, False, units=True)
    return _a_scatter_fold(self, group, send, recv, [recv.size] * size, op)


def _a_reduce_scatter(
    self: Any,
    group: CollectiveGroup,
    sendbuf: Any,
    recvbuf: Any,
    recvcounts: Any = None,
    op: Any = ops.SUM,
) -> CArgs:
    """Reduce_scatter with recvcounts given (None without: see _f_reduce_scatter).
    ValueError for bad recvcounts (reduce_scatter_counts), as the body."""
    operand = _operand(recvbuf, True, units=True)
    if operand is None or recvcounts is None:
        return None
    counts = reduce_scatter_counts(recvcounts, group.size, sendbuf)
    assert counts is not None
    recv = operand.reshape(-1)
    if sendbuf is IN_PLACE:  # recvbuf holds the operand; the result is its first block
        return _a_scatter_fold(self, group, recv, recv[: counts[self._rank]], counts, op)
    return _a_scatter_fold(self, group, _operand(sendbuf, False, units=True), recv, counts, op)


def _f_reduce_scatter(
    self: Any,
    shared: area.Area,
    sendbuf: Any,
    recvbuf: Any,
    recvcounts: Any = None,
    op: Any = ops.SUM,
) -> Any:
    """Reduce_scatter's lane; without recvcounts, the counts first (`_all_counts`, as the
    body), where this rank's operand fits one segment whatever they are."""
    group = shared.group
    if recvcounts is not None:
        c_args = _a_reduce_scatter(self, group, sendbuf, recvbuf, recvcounts, op)
        return None if c_args is not None and shared.call(*c_args) else _SLOW
    operand = _operand(recvbuf, True, units=True)
    if operand is None:
        return _SLOW
    recv = operand.reshape(-1)
    send = _operand(sendbuf, False, units=True) if sendbuf is not IN_PLACE else None
    if (
        send is None
        or fold_codes(send, getattr(op, "ufunc", None)) is None
        or send.dtype != recv.dtype
        or not recv.flags.aligned
        or send.nbytes > group._segment()
    ):
        return _SLOW
    counts = self._all_counts(recv.size, send.size, shared, lane=True)
    if counts is None:
        return _SLOW  # (the area was dropped: nothing moved)
    c_args = _a_scatter_fold(self, group, send, recv, counts, op)
    if c_args is None or not shared.call(*c_args):  # (the area was dropped meanwhile)
        self._reduce_scatter(sendbuf, buffers.parse(recvbuf, writable=True), counts, op)
    return None


_f_barrier = _one_call(_a_barrier)
_f_bcast = _one_call(_a_bcast)
_f_gather = _declining(_a_gather, _m_gather, T_GATHER)
_f_scatter = _declining(_a_scatter, _m_scatter, T_SCATTER)
_f_alltoall = _declining(_a_alltoall, _m_alltoall, T_ALLTOALL)
_f_allgather = _one_call(_a_allgather)
_f_reduce = _one_call(_a_reduce)
_f_allreduce = _one_call(_a_allreduce)
_f_scan = _one_call(_a_scan)
_f_exscan = _one_call(_a_exscan)
_f_reduce_scatter_block = _one_call(_a_reduce_scatter_block)


# ------------------------------------------------------------------ the C front
# CollectiveRound.front takes the user's arguments of these collectives as they come and
# runs the lane's round in the same C call, where the lanes above would take them (the same
# rules, in C); it takes nothing else, and the method (with its front) runs as before.
F_BCAST, F_GATHER, F_ALLGATHER, F_REDUCE, F_ALLREDUCE, F_SCAN, F_EXSCAN = range(7)
F_REDUCE_SCATTER_BLOCK, F_REDUCE_SCATTER, F_SCATTER, F_ALLTOALL, F_ALLTOALLV = 7, 8, 9, 10, 11
# the lowercase ones' rounds; F_SCATTER_BYTES and F_ALLTOALL_BYTES: the bcast and allgather
# rounds of bundles (pickling.bundle), each member taking its piece in C
F_BCAST_BYTES, F_GATHER_BYTES, F_ALLGATHER_BYTES, F_SCATTER_BYTES, F_ALLTOALL_BYTES = range(12, 17)
F_BARRIER = 17  # Barrier's round (no arguments: a, b, op None, root 0)
# or-ed into a block collective's code: a call of no byte returns E_EMPTY, no round taken
# (see `_skip`; never a vector collective's: a member cannot tell the others' counts)
F_EMPTY, E_EMPTY = 64, 3


def _set_front_tables() -> None:
    """Give CollectiveRound.front its tables: numpy.ndarray, IN_PLACE, and by id() the
    predefined datatypes that do not pack (size; FOLD_DTYPES code + 1 where one numpy
    element is one unit of it, as _operand reads them) and the predefined ops that fold in
    C (FOLD_OPS code + 1). Predefined objects live as long as the process: ids name them."""
    sizes = buffers._plain_sizes()
    folds = {}
    for datatype in datatypes.PREDEFINED.values():
        dtype = datatype.base.dtype
        if id(datatype) in sizes and dtype is not None and dtype.itemsize == datatype.size:
            code = FOLD_DTYPES.get(dtype)
            if code is not None:
                folds[id(datatype)] = code + 1
    codes = {}
    for op in vars(ops).values():
        if isinstance(op, ops.Op) and op.ufunc in FOLD_OPS:
            codes[id(op)] = FOLD_OPS[op.ufunc] + 1
    ring.set_front(np.ndarray, IN_PLACE, sizes, folds, codes)


def _c_front(self: Any, which: int, a: Any, b: Any, op: Any, root: Any) -> bool:
    """Collective `which` (F_*) with the user's arguments through CollectiveRound.front,
    where `_front` would take its lane (the same conditions): True when it ran (its result
    is None); False having moved nothing (the method's, with its front, to run as usual).
    The instance is numbered, and abandoned on an error, as `_laned` does."""
    shared = self._area
    if not shared or self._coll_active:
        return False
    engine = self._engine
    group = shared.group
    c = group._c
    if (
        c is None
        or group._pending
        or group._broken is not None
        or shared._ctx in engine.abandoned_in
        or self._ctx in engine.revoked
    ):
        return False
    k = group._round + 1
    try:  # (engine.quiet(), read in C: None where it is not)
        result = c.front(k, group._spin_ns, group._yield, which, a, b, op, root, engine.queues)
    except (ValueError, TypeError, BufferError):
        return False  # refused before the round (as Area.call): nothing moved
    except BaseException as exc:
        result = exc  # round k failed (settle says what that means)
    if result is None:
        return False
    # (numbered once taken: nothing the C call runs reads the instance number)
    seq = self._coll_seq
    self._coll_seq = seq + 1
    if result == E_EMPTY:  # (no byte: no round taken, see `_skip`)
        return True
    which &= ~F_EMPTY
    if result == 0:  # (the common case: done within the spin; a scatterv may take more)
        # Nothing reads the instance's tag base or the area's current instance after a
        # round done here: they are set below, where a wait (its abandonment checks), an
        # error or the messages of a declined round follow, as every other path sets them.
        group._round = c.round
        group.declined = False
        shared.completed += 1
        shared._current = None
        return True
    base = self._coll_base = coll_base(seq)
    shared._current = ((shared._ctx, base), seq)
    try:
        ran = shared.settle(k, result)
        then = _F_MESSAGES.get(which)
        if ran and then is not None and group.declined:  # (data over its round somewhere)
            self._run(then(self, a, b, root))
        if ran and which == F_SCATTER and group.truncated:
            raise _short_recvbuf(self)
    except Exception as exc:
        _abandon(self, engine, seq, exc)
        raise
    if not ran:
        self._coll_seq = seq  # (the area dropped, nothing moved: the method numbers it)
    return ran


def _o_round(self: Any, which: int, data: Any, root: int) -> list[bytes | None] | None:
    """Byte-string round `which` (F_*_BYTES) of a lowercase collective with this member's
    pickle(s) `data` (None where it publishes none) through CollectiveRound.front
    (`_c_front`), where no other thread runs (the lock of the collective's name, see
    locks.locked, then has nothing to order): per member the bytes taken from it (None where
    nothing is, or where it declined, data over a slab: `group.declined` is then set and the
    caller moves those by messages in the instance numbered here, abandoning it on an
    error); None having moved nothing (the collective's body to run it)."""
    if other_threads() or not _c_front(self, which, data, None, None, root):
        return None
    shared = self._area
    group = shared.group
    if group.declined:
        shared.completed += 1  # (its round ran, as Area.call counts it)
    return group._c.taken  # (C's: a new list each round)


def _o_finish(self: Any, rest: Callable[..., Any], *args: Any) -> Any:
    """`rest(*args)`: a lowercase collective after `_o_round` ran its round, in the instance
    numbered there; an error abandons that instance (as `collective` does)."""
    try:
        return rest(*args)
    except Exception as exc:
        _abandon(self, self._engine, self._coll_seq - 1, exc)
        raise


def _c_barrier(method: Callable[..., Any]) -> Callable[..., Any]:
    """The C front of Barrier and barrier (`_c_front`), then `method`."""

    @functools.wraps(method)
    def barrier(self: Any) -> None:
        if not _c_front(self, F_BARRIER, None, None, None, 0):
            method(self)

    return barrier


def _c_bcast(method: Callable[..., Any]) -> Callable[..., Any]:
    """The C front of Bcast (`_c_front`), then `method`."""

    @functools.wraps(method)
    def Bcast(self: Any, buf: Any, root: int = 0) -> None:
        if not _c_front(self, F_BCAST | F_EMPTY, buf, None, None, root):
            method(self, buf, root)

    return Bcast


def _c_rooted(which: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The C front (`_c_front`) of Gather(v) or Scatter(v) (`which`), then `method`."""

    def make(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def rooted(self: Any, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
            if not _c_front(self, which, sendbuf, recvbuf, None, root):
                method(self, sendbuf, recvbuf, root)

        return rooted

    return make


def _c_pair(which: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The C front (`_c_front`) of Allgather(v) or Alltoall(v) (`which`), then `method`."""

    def make(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def pair(self: Any, sendbuf: Any, recvbuf: Any) -> None:
            if not _c_front(self, which, sendbuf, recvbuf, None, 0):
                method(self, sendbuf, recvbuf)

        return pair

    return make


def _c_reduce(method: Callable[..., Any]) -> Callable[..., Any]:
    """The C front of Reduce (`_c_front`), then `method`."""

    @functools.wraps(method)
    def Reduce(self: Any, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM, root: int = 0) -> None:
        if not _c_front(self, F_REDUCE | F_EMPTY, sendbuf, recvbuf, op, root):
            method(self, sendbuf, recvbuf, op, root)

    return Reduce


def _c_reduce_scatter(method: Callable[..., Any]) -> Callable[..., Any]:
    """The C front of Reduce_scatter with recvcounts (`_c_front`), then `method`."""

    @functools.wraps(method)
    def Reduce_scatter(
        self: Any, sendbuf: Any, recvbuf: Any, recvcounts: Any = None, op: Any = ops.SUM
    ) -> None:
        if recvcounts is None or not _c_front(
            self, F_REDUCE_SCATTER, sendbuf, recvbuf, op, recvcounts
        ):
            method(self, sendbuf, recvbuf, recvcounts, op)

    return Reduce_scatter


def _c_folding(which: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The C front (`_c_front`) of Allreduce, Scan, Exscan or Reduce_scatter_block (`which`),
    then the method."""

    def make(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def fold(self: Any, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM) -> None:
            if not _c_front(self, which, sendbuf, recvbuf, op, 0):
                method(self, sendbuf, recvbuf, op)

        return fold

    return make


_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})  # (_c_start's `then`: no keywords)

# The op of every started collective whose first poll completed it: complete, and no field
# of a complete op is written again (Cancel and Free leave it), so one serves all.
_STARTED_DONE = DoneOp(constants.ANY_SOURCE)


def _c_start(
    self: Any,
    which: int,
    a: Any,
    b: Any,
    op: Any,
    root: Any,
    messages: Messages | None = None,
    margs: tuple[Any, ...] = (),
    stage: bool = True,
) -> Request | None:
    """A nonblocking collective's round started in one C call, where `_front_started` would
    start its lane (and no started collective of the area is pending): CollectiveRound.front
    with collective `which` (F_*) and the user's arguments (taken or not by the lanes' rules
    in C), polled once, as CollectiveGroup.start_round_as starts a round, inline (one
    Python frame between the method and C). Returns its Request (a plain done one where
    the first poll completed the round; else an AreaRequest on the group's pending round,
    an area.StartedRound whose Wait polls it in C, or, with `messages` and `stage`, an
    AreaRequest on an AreaOp staged with the engine: `_request_for`, `messages` the
    instance's stages for `margs` where the round is declined), or None having moved
    nothing (refused before the round, not taken: the method's, with its front, to run as
    usual). The instance is numbered, and abandoned on an error, as `_begin` does."""
    shared = self._area
    if not shared:
        return None
    engine = self._engine
    group = shared.group
    c = group._c
    if (
        c is None
        or group._pending
        or shared._ctx in engine.abandoned_in
        or self._ctx in engine.revoked
    ):
        return None
    seq = self._nb_seq
    k = group._round + 1
    usable = group._broken is None and k <= COLL_SEQ_MASK
    try:
        if not usable:
            group._next_round()  # (raises: the group's error, or its rounds exhausted)
        result = c.front(k, 0, group._yield, which, a, b, op, root)
    except (ValueError, TypeError, BufferError):
        return None  # (refused before the round: nothing moved)
    except BaseException as exc:
        if usable:
            group._c_failed(k, exc)  # (round k taken: marked failed)
        self._nb_seq = seq + 1
        error = shared._leave(exc)
        if isinstance(error, Exception):
            reason = f"{type(error).__name__}: {error}"
            _nb_abandon(self, engine, seq, abandon_class(error), reason)
        if error is exc:
            raise
        raise error from exc
    if result is None:
        return None  # (not taken)
    if result == E_EMPTY:  # (no byte: no round taken, see `_skip`)
        return _skip_started(self, engine)
    now = c.round  # (the round C ended on: k, or later for a scatterv of several)
    group._round = now if now > k else k
    if result.__class__ is not tuple:  # (done by this first poll)
        declined = group.declined = result == 1
        truncated = group.truncated = result == 2
        if not declined:  # (the common case: root, last)
            self._nb_seq = seq + 1
            shared.completed += 1
            if truncated:
                return new_request(_TruncatedDone(self), engine, None, None)
            return new_request(_STARTED_DONE, engine, None, None)
        request: CollectiveRequest = group._done_rounds[True]
    elif messages is None or not stage:  # (a pending round not staged: one object)
        started = _copy_slots(_STARTED_ROUND)  # (StartedRound(group, k, result, shared, ...))
        started._group = group
        started._k = k
        started._wait = result
        started._area = shared
        started.fail_args = (self, engine, seq)
        group._pending.append(started)
        self._nb_seq = seq + 1
        if messages is not None:  # (Ialltoall: declined only where a member misbehaves)
            started.then = _on_declined
            started.then_args = (self, engine, seq, messages, margs, _NO_KWARGS)
        handle = _copy_slots(_AREA_REQUEST)  # (request_of(started, engine, None, None))
        # (an engine operation as Op is: its fields and `done`)
        handle._op = started
        handle._engine = engine
        return handle
    else:
        request = RoundRequest(group, k, result)
        group._pending.append(request)
    return _request_for(self, engine, shared, seq, request, messages, margs, {}, stage)


def _s_barrier(method: Callable[..., Any]) -> Callable[..., Any]:
    """Ibarrier's round in one C call (`_c_start`), then `method`."""

    @functools.wraps(method)
    def Ibarrier(self: Any) -> Request:
        request = _c_start(self, F_BARRIER, None, None, None, 0)
        return method(self) if request is None else request

    return Ibarrier


def _s_bcast(method: Callable[..., Any]) -> Callable[..., Any]:
    """The C front of Ibcast (`_c_start`), then `method`."""

    @functools.wraps(method)
    def Ibcast(self: Any, buf: Any, root: int = 0) -> Request:
        request = _c_start(self, F_BCAST | F_EMPTY, buf, None, None, root)
        return method(self, buf, root) if request is None else request

    return Ibcast


def _s_allgather(which: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The C front (`_c_start`) of Iallgather or Iallgatherv (`which`), then the method."""

    def make(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def Iallgather(self: Any, sendbuf: Any, recvbuf: Any) -> Request:
            request = _c_start(self, which, sendbuf, recvbuf, None, 0)
            return method(self, sendbuf, recvbuf) if request is None else request

        return Iallgather

    return make


def _s_reduce(method: Callable[..., Any]) -> Callable[..., Any]:
    """The C front of Ireduce (`_c_start`), then `method`."""

    @functools.wraps(method)
    def Ireduce(self: Any, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM, root: int = 0) -> Any:
        request = _c_start(self, F_REDUCE | F_EMPTY, sendbuf, recvbuf, op, root)
        return method(self, sendbuf, recvbuf, op, root) if request is None else request

    return Ireduce


def _s_folding(which: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The C front (`_c_start`) of Iallreduce, Iscan, Iexscan or Ireduce_scatter_block
    (`which`), then the method."""

    def make(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def fold(self: Any, sendbuf: Any, recvbuf: Any, op: Any = ops.SUM) -> Any:
            request = _c_start(self, which, sendbuf, recvbuf, op, 0)
            return method(self, sendbuf, recvbuf, op) if request is None else request

        return fold

    return make


def _s_rooted(which: int, messages: Messages) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The C front (`_c_start`) of Igather(v) or Iscatter(v) (`which`), then the method. A
    round declined (Igather(v): a block over a slab somewhere; Iscatter(v): a block of the
    root's over COLL_CELLS segments) goes on over `messages` from the same root, its pending
    round staged with the engine (a member cannot tell beforehand)."""

    def make(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def rooted(self: Any, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
            request = _c_start(
                self, which, sendbuf, recvbuf, None, root,
                messages=messages, margs=(sendbuf, recvbuf, root),
            )  # fmt: skip
            return method(self, sendbuf, recvbuf, root) if request is None else request

        return rooted

    return make


def _s_alltoall(which: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The C front (`_c_start`) of Ialltoall or Ialltoallv (`which`), then the method. A round
    its members decline (Ialltoallv: a block over a segment somewhere) goes on over messages
    (`_m_alltoall`), its pending round staged with the engine; Ialltoall's is not staged: the
    front takes no block over a segment, and its blocks are the same size everywhere, so
    its members never decline it."""
    stage = which == F_ALLTOALLV  # (its code without F_EMPTY: a vector one)

    def make(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def pair(self: Any, sendbuf: Any, recvbuf: Any) -> Any:
            request = _c_start(
                self, which, sendbuf, recvbuf, None, 0,
                messages=_m_alltoall, margs=(sendbuf, recvbuf), stage=stage,
            )  # fmt: skip
            return method(self, sendbuf, recvbuf) if request is None else request

        return pair

    return make


# name -> the maker of its C front (see front_lanes)
_C_FRONTS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "Barrier": _c_barrier,
    "barrier": _c_barrier,
    "Bcast": _c_bcast,
    "Gather": _c_rooted(F_GATHER | F_EMPTY),
    "Gatherv": _c_rooted(F_GATHER),
    "Allgather": _c_pair(F_ALLGATHER | F_EMPTY),
    "Allgatherv": _c_pair(F_ALLGATHER),
    "Alltoall": _c_pair(F_ALLTOALL | F_EMPTY),
    "Alltoallv": _c_pair(F_ALLTOALLV),
    "Reduce": _c_reduce,
    "Allreduce": _c_folding(F_ALLREDUCE | F_EMPTY),
    "Scan": _c_folding(F_SCAN | F_EMPTY),
    "Exscan": _c_folding(F_EXSCAN | F_EMPTY),
    "Reduce_scatter_block": _c_folding(F_REDUCE_SCATTER_BLOCK | F_EMPTY),
    "Reduce_scatter": _c_reduce_scatter,
    "Scatter": _c_rooted(F_SCATTER | F_EMPTY),
    "Scatterv": _c_rooted(F_SCATTER),
    "Ibarrier": _s_barrier,
    "Ibcast": _s_bcast,
    "Iallgather": _s_allgather(F_ALLGATHER | F_EMPTY),
    "Iallgatherv": _s_allgather(F_ALLGATHER),
    "Ireduce": _s_reduce,
    "Iallreduce": _s_folding(F_ALLREDUCE | F_EMPTY),
    "Iscan": _s_folding(F_SCAN | F_EMPTY),
    "Iexscan": _s_folding(F_EXSCAN | F_EMPTY),
    "Ireduce_scatter_block": _s_folding(F_REDUCE_SCATTER_BLOCK | F_EMPTY),
    "Igather": _s_rooted(F_GATHER | F_EMPTY, _m_gather),
    "Igatherv": _s_rooted(F_GATHER, _m_gather),
    "Ialltoall": _s_alltoall(F_ALLTOALL | F_EMPTY),
    "Ialltoallv": _s_alltoall(F_ALLTOALLV),
    "Iscatter": _s_rooted(F_SCATTER | F_EMPTY, _m_scatter),
    "Iscatterv": _s_rooted(F_SCATTER, _m_scatter),
}

# F_* code of a declinable collective -> its way on messages where a member declined its
# round (its lane's `then`, see `_declining`): stages for the user's (a, b, root) as given to
# _c_front
_F_MESSAGES: dict[int, Callable[[Any, Any, Any, Any], Stages]] = {
    F_GATHER: lambda comm, a, b, root: _m_gather(comm, T_GATHER, a, b, root),
    F_SCATTER: lambda comm, a, b, root: _m_scatter(comm, T_SCATTER, a, b, root),
    F_ALLTOALL: lambda comm, a, b, root: _m_alltoall(comm, T_ALLTOALL, a, b),
    F_ALLTOALLV: lambda comm, a, b, root: _m_alltoall(comm, T_ALLTOALL, a, b),
}


def started(
    args_of: Callable[..., CArgs],
    messages: Messages | None = None,
    empty: Callable[..., bool] | None = None,
) -> Callable[[Callable[..., Any]], Any]:
    """Decorator of a nonblocking collective: its lane in the collective area, as the
    blocking lanes (`collective`): where the communicator's area is bound, no member
    abandoned anything and `args_of` takes the arguments, the round starts in one C call
    (Area.begin) and the Request polls it (completed already where that first poll
    finished it). The instance is numbered as `_nonblocking` numbers it (its abandonment
    on a failure alike); anything else (no area, other forms, collectives of the area still
    pending, a record of an abandoned collective of this communicator) runs the method's
    body. `messages` (a gatherv, scatterv or alltoallv, see `_declining`): where the
    members declined the round, the instance goes on with those stages on its own tag; its
    pending round is then staged with the engine (AreaOp.stage), so that every progress
    pass (a blocking Recv's too) polls it and starts those stages (the other members wait
    for them), as MPI's progress rule asks. `empty`: the blocking form's rule (see `_skip`):
    a call of no byte returns a complete Request (`_skip_started`)."""

    def wrap(method: Callable[..., Any]) -> Any:
        @functools.wraps(method)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            engine = self._live()
            if empty is not None and len(self._group) > 1 and _empty(empty, self, args, kwargs):
                return _skip_started(self, engine)
            shared = self._area
            if shared and shared.untroubled():
                request = _begun(self, engine, shared, args_of, messages, args, kwargs)
                if request is not None:
                    return request
            return method(self, *args, **kwargs)

        run.begun = (args_of, messages)  # type: ignore[attr-defined]  # (see front_lanes)
        run.empty = empty  # type: ignore[attr-defined]  # (see _front_started)
        return run

    return wrap


def _begun(
    self: Any,
    engine: Engine,
    shared: area.Area,
    args_of: Callable[..., CArgs],
    messages: Messages | None,
    args: Any,
    kwargs: Any,
) -> Request | None:
    """A nonblocking collective's lane (see `started`): its Request, or None having moved
    nothing (its body's job)."""
    c_args = args_of(self, shared.group, *args, **kwargs)
    if c_args is None:
        return None
    return _begin(self, engine, shared, messages, args, kwargs, c_args)


def _begin(
    self: Any,
    engine: Engine,
    shared: area.Area,
    messages: Messages | None,
    args: Any,
    kwargs: Any,
    c_args: tuple[Any, ...],
) -> Request | None:
    """`_begun` with the C arguments `c_args` (Area.begin's)."""
    seq = self._nb_seq
    try:
        request = shared.begin(*c_args)
    except Exception as exc:
        self._nb_seq = seq + 1
        _nb_abandon(self, engine, seq, abandon_class(exc), f"{type(exc).__name__}: {exc}")
        raise
    if request is None:  # (nothing moved)
        return None
    return _request_for(self, engine, shared, seq, request, messages, args, kwargs)


def _request_for(
    self: Any,
    engine: Engine,
    shared: area.Area,
    seq: int,
    request: CollectiveRequest,
    messages: Messages | None,
    args: Any,
    kwargs: Any,
    stage: bool = True,
) -> Request:
    """The Request of nonblocking collective instance `seq` (numbered here) whose round
    `request` started: a plain done one where its first poll completed it, else one on an
    AreaOp. `messages` (a collective its members may decline): stages for `args` on the
    instance's tag, started where the round is declined (`AreaOp.then`); with `stage`, the
    pending round is staged with the engine (see `started`)."""
    self._nb_seq = seq + 1
    if request.done and not request.declined:
        return _done_request(self, engine, request)
    failed = functools.partial(_nb_abandon, self, engine, seq)
    then = None
    if messages is not None:
        then = functools.partial(_on_declined, self, engine, seq, messages, args, kwargs)
    if not request.done:
        op = area.AreaOp(shared, request, failed, then)
        if then is not None and stage:  # (the engine's progress polls it, see `started`)
            op.stage()
        return request_of(op, engine, kind=area.AreaRequest)
    assert then is not None  # (declined: a declinable collective's)
    try:
        return Request(then(), engine)
    except Exception as exc:
        failed(abandon_class(exc), f"{type(exc).__name__}: {exc}")
        raise


def _on_declined(
    comm: Any,
    engine: Engine,
    seq: int,
    messages: Messages,
    args: Any,
    kwargs: Any,
) -> StagedOp:
    """Nonblocking collective instance `seq` of `comm`, whose members declined its round,
    on messages: `messages` for `args`, `kwargs` on the instance's tag, started with the
    engine (`_on_messages`; a failure there abandons the instance, `_nb_abandon`)."""
    tag = T_NONBLOCKING + seq % NONBLOCKING_TAGS
    stages = functools.partial(messages, comm, tag, *args, **kwargs)
    failed = functools.partial(_nb_abandon, comm, engine, seq)
    return _on_messages(engine, stages, failed, comm._ctx)


def _on_messages(
    engine: Engine,
    stages: Callable[[], Stages],
    on_fail: Callable[[int, str], None] | None = None,
    home_ctx: int = -1,
) -> StagedOp:
    """Start a nonblocking collective's `stages()` with the engine (the first stage's
    errors propagate; a later failure tells `on_fail`; `home_ctx`: StagedOp's)."""
    return engine.start_staged(StagedOp(stages(), on_fail, home_ctx))


def complete_started(comm: Any) -> None:
    """Free of `comm`: complete its nonblocking collectives still pending with the engine
    (StagedOp.home_ctx, AreaOp's), as MPI releases a communicator only once its pending
    operations completed: their stages use it, and its contexts must not go to the next
    communicator while their messages may still come. Their errors stay with their
    requests. (Its started rounds in the area complete in area.free's barrier.)"""
    engine = comm._engine
    if engine is None or not engine.staged:
        return
    ctx = comm._ctx

    def settled() -> bool:
        return not any(op.home_ctx == ctx and not op.done for op in engine.staged)

    if not settled():
        engine.wait_until(settled)


def _nb_abandon(comm: Any, engine: Engine, seq: int, error: int, reason: str) -> None:
    """Nonblocking collective instance `seq` of `comm` failed here with error class `error`:
    tell the other members (their requests complete with it where it is a fault-tolerance
    class, else with ERR_OTHER: Matching.abandon), leave the area."""
    members = [w for w in comm._group if w != engine.world_rank]
    tag = T_NONBLOCKING + seq % NONBLOCKING_TAGS
    engine.abandon(comm._ctx + 1, comm._gen, seq, tag, 1, reason, members, error)
    area.failed(comm)


# What every pending round _c_start starts (and its Request) holds but the per-start fields
# (group, round, wait, area, fail_args; the Request's op and engine): copied per start
# (ring.copy_slots, one C call where StartedRound's constructor and a Request's six stores
# took ~0.3 us more). Only the C front starts such rounds: no copy on the pure-Python path.
_STARTED_ROUND = area.StartedRound(None, 0, None, None, _nb_abandon, ())  # type: ignore[arg-type]
_AREA_REQUEST = area.AreaRequest()
_copy_slots: Callable[[Any], Any] = ring.copy_slots


class AgreedValueError(ValueError):
    """An argument error of a collective that every member raises alike, decided from data
    all of them hold (gathered before any payload moves): no member waits for another, so
    the instance is not abandoned and the area stays bound."""


class StandInValueError(ValueError):
    """An argument error of a collective found at one member before anything moved there,
    the instance then run by that member with a stand-in for the wrong argument (the user's
    buffer untouched), as the other members run it: every member finished the instance, so
    it is not abandoned and the area stays bound (Gather's root, see _gather_recv)."""


class RootBlockShort(ValueError):
    """A Gather(v) root's own block of recvbuf shorter than its sendbuf: its blocking forms
    raise it as MPI.Exception (StandInTruncation: ERR_TRUNCATE for Gather, ERR_IN_STATUS for
    Gatherv, as MPICH's), its nonblocking ones at the call as the ValueError it is."""


class StandInTruncation(exceptions.Exception):
    """MPI_ERR_TRUNCATE of a Scatter(v) root whose recvbuf is shorter than its part, raised
    after the instance ran with a stand-in for it (the others got their parts; see
    _scatter_own), or of a member whose part from the root is longer than its recvbuf,
    raised after the area's round completed (`_short_recvbuf`): not abandoned, as
    StandInValueError."""


def _short_recvbuf(comm: Any) -> StandInTruncation:
    """The error of a Scatter(v) member whose area round completed with `truncated` set
    (collective.CollectiveGroup._scatterv: its part, as long as the root's block table
    says, is longer than its recvbuf, which holds the part's first bytes)."""
    return StandInTruncation(exceptions.ERR_TRUNCATE, area.truncated_part(comm))


class _TruncatedDone(DoneOp):
    """The op of a started Scatter(v) member whose round its first poll completed with the
    member's part longer than its recvbuf (the request's `truncated`): complete, with
    MPI_ERR_TRUNCATE and `reason` (area.truncated_part); the instance ran in step at every
    member, so nothing is abandoned and the area stays."""

    __slots__ = ("reason",)

    def __init__(self, comm: Any) -> None:
        super().__init__(constants.ANY_SOURCE)
        self.error = exceptions.ERR_TRUNCATE
        self.reason = area.truncated_part(comm)


def _done_request(comm: Any, engine: Engine, request: CollectiveRequest) -> Request:
    """The Request of a started collective whose first poll completed its round (not
    declined): a plain done one, or one failing with MPI_ERR_TRUNCATE (_TruncatedDone)."""
    op = _TruncatedDone(comm) if request.truncated else _STARTED_DONE
    return new_request(op, engine, None, None)


def _abandon(comm: Any, engine: Engine, seq: int, exc: Exception) -> None:
    """Collective instance `seq` of `comm` raised `exc` here: tell the other members, leave
    the area (see the module docstring), or hold it in doubt where this member had not taken
    the instance's round (area.Doubt: kept if no member took it); nothing for an
    AgreedValueError or a StandInValueError or StandInTruncation (no member waits for this
    one)."""
    if isinstance(exc, AgreedValueError | StandInValueError | StandInTruncation):
        return
    members = [w for w in comm._group if w != engine.world_rank]
    reason = f"{type(exc).__name__}: {exc}"
    error = abandon_class(exc)
    base = coll_base(seq)
    shared = comm._area
    # (a fault-tolerance class: a member may be gone, and never say how it left: no doubt)
    untaken = error == exceptions.ERR_OTHER or error not in ABANDON_CLASSES
    untaken = untaken and bool(shared) and shared.untaken(seq)
    engine.abandon(comm._ctx + 1, comm._gen, seq, base, COLL_SPAN, reason, members, error, untaken)
    if untaken:
        shared.suspend(seq)
    else:
        area.failed(comm)


def _op_func(op: Any) -> Callable[[Any, Any], Any]:
    return op if callable(op) else ops.SUM


def _raw(array: np.ndarray) -> memoryview:
    """A flat byte view of a contiguous array (an empty view for no elements)."""
    if not array.nbytes:
        return memoryview(bytearray(0))  # writable: also serves as a receive buffer
    return np.ascontiguousarray(array).view(np.uint8).data.cast("B")


def _array(view: memoryview, spec_type: Any) -> np.ndarray:
    dtype = spec_type.base.dtype
    return np.frombuffer(view, dtype=dtype) if len(view) else np.empty(0, dtype)


class Collectives:
    """Mixin of Intracomm: collectives built on the communicator's p2p internals."""

    # provided by Comm
    _engine: Engine | None
    _group: list[int]
    _rank: int
    _ctx: int
    _rank_of: dict[int, int]
    _isend_op: Callable[..., Op]
    _irecv_op: Callable[..., Op]
    _check: Callable[[], Engine]
    _live: Callable[[], Engine]
    _has_mpi: bool
    _hier: Any
    _route: list[Route]
    _mirror_coll: Any
    _alloc_ctx: Callable[..., int]
    _nb_seq: int
    _coll_seq: int  # blocking collective instances started (the same on every member)
    _coll_base: int  # the tag base of the current one
    _coll_active: bool
    _area: Any  # area.Area once bound; False: messages; None: not yet
    _area_claim: Any  # area.Area dropped, its slot claimed here: released at Free
    _coll_gone: tuple[int, str] | None  # (class, why) another member abandoned it with

    # ------------------------------------------------------------------ internals
    # Internal tags below COLL_SPAN belong to the current blocking instance (its base is
    # added); nonblocking collectives pass their own tags (>= T_NONBLOCKING) as they are.
    def _c_isend(self, view: memoryview, dest: int, tag: int) -> Op:
        if tag < COLL_SPAN:
            tag += self._coll_base
        return self._isend_op(view, dest, tag, self._ctx + 1, False)

    def _c_irecv(self, view: memoryview | None, source: int, tag: int, sink: Any = None) -> Op:
        if tag < COLL_SPAN:
            tag += self._coll_base
        return self._irecv_op(view, source, tag, self._ctx + 1, sink)

    def _c_wait(self, pending: list[Op]) -> None:
        engine = self._check()
        if not all(op.done for op in pending):
            if self._coll_gone is not None:
                raise exceptions.Exception(*self._coll_gone)
            engine.wait_until(lambda: all(op.done for op in pending))
        for op in pending:
            if op.error:
                record = engine.abandoned.get((self._ctx + 1, self._coll_base))
                detail = record[1] if record is not None else "in a collective operation"
                raise exceptions.Exception(op.error, detail)

    def _c_recv_obj(self, source: int, tag: int) -> Any:
        op = self._c_irecv(None, source, tag)
        self._c_wait([op])
        return unpickle(op)

    def _sizes(self) -> tuple[int, int]:
        self._check()
        return len(self._group), self._rank

    def _allreduce_int_or(self, value: int) -> int:
        """Bitwise OR of `value` over the members (of context offers, from
        matching.CLOCK_SHIFT up, the highest: matching.merge_offers), by messages (never the
        area: a context agreement must come after every message a member sent before it;
        see _alloc_ctx)."""
        result = 0
        for item in self._allgather_messages(value):
            result = merge_offers(result, item)
        return result

    def _bcast_view(self, view: memoryview | None, root: int, tag: int) -> memoryview | bytes:
        """Binomial broadcast of bytes. `view`: the root's data, or a receive buffer of the
        right size on the others (None: receive whatever size comes). Returns the data."""
        size, rank = self._sizes()
        rel = (rank - root) % size
        data: Any = view
        mask = 1
        while mask < size:
            if rel & mask:
                parent = (rank - mask) % size
                op = self._c_irecv(view, parent, tag)
                self._c_wait([op])
                data = view if view is not None else op.obj
                break
            mask <<= 1
        mask >>= 1
        sends = []
        payload = memoryview(data) if data is not None else memoryview(b"")
        while mask > 0:
            if rel + mask < size:
                sends.append(self._c_isend(payload, (rank + mask) % size, tag))
            mask >>= 1
        self._c_wait(sends)
        return data

    def _bcast_once(self, view: memoryview, root: int) -> None:
        """Broadcast written once and read by all, piece by piece (a piece: at most what goes
        whole in a queue). The root places the piece in its queue to the next rank (the
        holder) without sending it, tells every other rank where it lies (T_BCAST_REF), and
        sends it to the holder once they all copied it in place and said so (T_BCAST_ACK).
        A reader checks that the place lies in the root's queue to the holder."""
        engine = self._check()
        size, rank = self._sizes()
        holder = (root + 1) % size
        readers = [r for r in range(size) if r not in (root, holder)]
        holder_peer = self._route[holder].peer
        step = engine.whole_max
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            if rank == root:
                coretag = core_tag(KIND_DATA, self._ctx + 1, T_BCAST + self._coll_base)
                offset = engine.place(holder_peer, piece, coretag)
                where = memoryview(_PLACED.pack(offset, len(piece)))
                acks = [self._c_irecv(_NOTHING, r, T_BCAST_ACK) for r in readers]
                self._c_wait([self._c_isend(where, r, T_BCAST_REF) for r in readers] + acks)
                engine.publish_placed(holder_peer)
            elif rank == holder:
                self._c_wait([self._c_irecv(piece, root, T_BCAST)])
            else:
                where = memoryview(bytearray(_PLACED.size))
                self._c_wait([self._c_irecv(where, root, T_BCAST_REF)])
                offset, nbytes = _PLACED.unpack(where)
                if nbytes != len(piece):
                    raise exceptions.Exception(
                        exceptions.ERR_TRUNCATE,
                        f"rank {root} broadcasts {nbytes} bytes where {len(piece)} are expected",
                    )
                try:
                    engine.ep.read_placed(self._route[root].peer, holder_peer, offset, piece)
                except ValueError as exc:
                    raise exceptions.Exception(exceptions.ERR_OTHER, str(exc)) from exc
                self._c_wait([self._c_isend(_NOTHING, root, T_BCAST_ACK)])

    # ------------------------------------------------------------------ collective area
    def _area_run(self, plan: Plan) -> bool:
        """Run a blocking collective in the area (bound first at the communicator's first
        collective; see area.py): True when it ran there, False to run it on messages."""
        shared = area.bound(self)
        if shared is None:
            return False
        job = plan()
        return job is not None and shared.run(job[0], *job[1])

    @staticmethod
    def _area_stages(
        shared: area.Area, job: tuple[str, tuple[Any, ...]], then: Callable[[], Op]
    ) -> Iterator[list[Op]]:
        """A nonblocking collective's one stage in the area: the area's request (`then`: its
        way on messages where the members decline it, see area.AreaOp)."""
        yield [shared.start(job[0], *job[1], then=then)]

    def _bytes(self, spec: buffers.VSpec) -> tuple[list[int], list[int]]:
        """A vector spec's counts and displacements in bytes."""
        extent = spec.datatype.Get_size()
        return [c * extent for c in spec.counts], [d * extent for d in spec.displs]

    def _fits(self, nbytes: int, split: bool = False) -> bool:
        """Whether a payload of `nbytes` (per destination when `split`), a size every member
        knows alike, goes through the area (area.Area.fits); larger ones take messages."""
        shared = area.current(self)
        return shared is not None and shared.fits(nbytes, split)

    def _p_bcast(self, buf: Any, root: int) -> tuple[str, tuple[Any, ...]] | None:
        self._root(root)
        view = buffers.parse(buf, writable=self._rank != root).view
        return ("bcast", (view, root)) if self._fits(len(view)) else None

    def _p_gather(
        self,
        sendbuf: Any,
        recvbuf: Any,
        root: int,
        blocks: bool = False,
        refused: list[ValueError] | None = None,
    ) -> tuple[str, tuple[Any, ...]]:
        size, rank = self._sizes()
        self._root(root)
        if rank != root:
            return "gatherv", (buffers.parse(sendbuf).view, None, [0] * size, [0] * size, root)
        checked = self._gather_recv(sendbuf, recvbuf, blocks, refused)
        if checked is None:  # (refused: the round declined, see _gather_recv)
            return self._area.refusal("gatherv", root)
        spec, send = checked
        return "gatherv", (send, spec.view, *self._bytes(spec), root)

    def _gather_recv(
        self, sendbuf: Any, recvbuf: Any, blocks: bool, refused: list[ValueError] | None
    ) -> tuple[buffers.VSpec, memoryview] | None:
        """At a Gather(v)'s root: (the vector spec of recvbuf, this rank's send: its block
        of recvbuf in place), checked: `size` blocks, equal ones with `blocks` (Gather's
        rule, as mpi4py's), this rank's as long as its send. ValueError where not; with a
        `refused` list the error is put there instead and None comes back: the root then
        runs the instance in step with the others without recvbuf (its area round declined,
        area.Area.refusal; on messages the others' blocks taken into nothing), and the
        caller raises the error (StandInValueError). Errors of sendbuf itself are raised
        as they come."""
        size, rank = self._sizes()
        in_place = sendbuf is IN_PLACE or sendbuf is None  # None: in place, as on messages
        send = None if in_place else buffers.parse(sendbuf).view
        try:
            spec = buffers.parse_vector(recvbuf, size, writable=True)
            counts = spec.counts  # (in elements: equal ones are equal bytes)
            if blocks and min(counts) != max(counts):
                raise ValueError(
                    f"message: cannot infer count, {sum(counts)} entries of recvbuf do not "
                    f"split into {size} equal blocks"
                )
            if send is None:
                return spec, spec.part(rank)
            own = counts[rank] * spec.datatype.Get_size()
            if len(send) != own:
                short = RootBlockShort if len(send) > own else ValueError
                raise short(f"root sends {len(send)} bytes, counts[{rank}] is {own}")
            return spec, send
        except ValueError as exc:
            if refused is None:
                raise
            refused.append(exc)
            return None

    def _p_scatter(
        self,
        sendbuf: Any,
        recvbuf: Any,
        root: int,
        refused: list[Exception] | None = None,
        blocks: bool = False,
    ) -> tuple[str, tuple[Any, ...]]:
        size, rank = self._sizes()
        self._root(root)
        if rank != root:
            recv = buffers.parse(recvbuf, writable=True).view
            return "scatterv", (None, [0] * size, [0] * size, recv, root)
        spec = self._scatter_send(sendbuf, blocks, refused)
        if spec is None:  # (refused: the round declined, see _scatter_send)
            return self._area.refusal("scatterv", root)
        part = spec.part(rank)
        own = self._scatter_own(recvbuf, part, refused)
        if own is None:  # in place: the root's part stays where it is
            own = memoryview(bytearray(len(part)))
        return "scatterv", (spec.view, *self._bytes(spec), own, root)

    def _scatter_send(
        self, sendbuf: Any, blocks: bool, refused: list[Exception] | None
    ) -> buffers.VSpec | None:
        """At a Scatter(v)'s root: the vector spec of sendbuf. With `blocks` (Scatter) a
        count left to infer must split into `size` equal parts (buffers.check_blocks,
        mpi4py's rule): ValueError where not; with a `refused` list that error (a
        StandInValueError) is put there instead and None comes back: the root then runs the
        instance in step with the others without sendbuf (its area round declined,
        area.Area.refusal; on messages an empty part sent to each, their recvbufs left as
        they are), and the caller raises it."""
        size = len(self._group)
        if blocks:
            try:
                buffers.check_blocks(sendbuf, size)
            except ValueError as exc:
                if refused is None:
                    raise
                refused.append(StandInValueError(str(exc)))
                return None
        return buffers.parse_vector(sendbuf, size)

    def _scatter_own(
        self, recvbuf: Any, part: memoryview, refused: list[Exception] | None
    ) -> memoryview | None:
        """At a Scatter(v)'s root: the bytes of recvbuf its own `part` goes to (None: in
        place; IN_PLACE or None, as mpi4py). MPI.Exception(ERR_TRUNCATE) where recvbuf is
        shorter; with a `refused` list that error (a StandInTruncation) is put there instead
        and a stand-in of the part's length comes back, for the root to run the instance as
        the others do (the caller raises it then)."""
        if recvbuf is IN_PLACE or recvbuf is None:
            return None
        own = buffers.parse(recvbuf, writable=True).view
        if len(part) <= len(own):
            return own[: len(part)]
        detail = f"scatter: {len(part)} bytes for the root into a {len(own)}-byte buffer"
        if refused is None:
            raise exceptions.Exception(exceptions.ERR_TRUNCATE, detail)
        refused.append(StandInTruncation(exceptions.ERR_TRUNCATE, detail))
        return memoryview(bytearray(len(part)))

    def _p_allgather(self, sendbuf: Any, recvbuf: Any) -> tuple[str, tuple[Any, ...]] | None:
        size, rank = self._sizes()
        spec = _received_parts(recvbuf, size)
        in_place = sendbuf is IN_PLACE or sendbuf is None  # None: in place, as on messages
        send = spec.part(rank) if in_place else buffers.parse(sendbuf).view
        counts, displs = self._bytes(spec)
        if not self._fits(max(counts)):
            return None
        return "allgatherv", (send, spec.view, counts, displs)

    def _p_alltoall(self, sendbuf: Any, recvbuf: Any) -> tuple[str, tuple[Any, ...]]:
        """In place, recvbuf's blocks are sent from where they are: the group's round reads
        them all before it writes any, and one it declines leaves them for the messages."""
        size, _ = self._sizes()
        rspec = buffers.parse_vector(recvbuf, size, writable=True)
        sspec = rspec if sendbuf is IN_PLACE else buffers.parse_vector(sendbuf, size)
        return "alltoallv", (sspec.view, *self._bytes(sspec), rspec.view, *self._bytes(rspec))

    def _p_reduce(
        self, sendbuf: Any, recvbuf: Any, op: ops.Op, root: int
    ) -> tuple[str, tuple[Any, ...]] | None:
        self._root(root)
        if self._rank == root:
            _, out, local = self._operands(sendbuf, recvbuf)
        else:
            sspec = buffers.parse(sendbuf)
            out, local = None, _array(sspec.view, sspec.datatype)
        ufunc = area.ufunc_of(op, local)
        if ufunc is None or not self._fits(local.nbytes):
            return None
        return "reduce", (local, out, ufunc, root)

    def _p_fold(
        self, name: str, sendbuf: Any, recvbuf: Any, op: ops.Op
    ) -> tuple[str, tuple[Any, ...]] | None:
        """Allreduce, Scan, Exscan (`name`): every rank has a receive buffer."""
        _, out, local = self._operands(sendbuf, recvbuf)
        ufunc = area.ufunc_of(op, local)
        if ufunc is None or not self._fits(local.nbytes):
            return None
        return name, (local, out, ufunc)

    # ------------------------------------------------------------------ hierarchy
    def _hierarchy(self) -> tuple[Any, Any, list[int], dict[int, int], list[int]]:
        """(local comm, leaders' mpi4py comm or None, leader of each rank, leader -> index
        in the leaders' comm, comm ranks of my region). Made on first use (collective)."""
        if self._hier is None:
            from guest_lib.mpi.comm import Intracomm

            engine = self._check()
            local = [r for r, route in enumerate(self._route) if route.local]
            leaders = self.allgather(local[0])
            ctx = self._alloc_ctx()
            local_comm = Intracomm(engine, [self._group[r] for r in local], ctx)
            is_leader = self._rank == local[0]
            _M = native.MPI()
            lead = self._mirror_coll.Split(0 if is_leader else _M.UNDEFINED, self._rank)
            index = {r: i for i, r in enumerate(sorted(set(leaders)))}
            self._hier = (local_comm, lead if is_leader else None, leaders, index, local)
        return self._hier

    def _native(self, op: ops.Op, datatype: Any) -> tuple[Any, Any] | None:
        """mpi4py's (Op, Datatype) for a predefined op on a predefined type, else None."""
        _M = native.MPI()
        if not op.is_predefined or not datatype.base.is_predefined:
            return None
        mop = getattr(_M, op.name, None)
        mtype = getattr(_M, datatype.base.predefined_name or "", None)
        return None if mop is None or mtype is None else (mop, mtype)

    def _h_barrier(self) -> None:
        local, lead, _, _, _ = self._hierarchy()
        local.Barrier()
        if lead is not None:
            lead.Barrier()
        local.Barrier()

    def _h_bcast(self, buf: Any, root: int, objects: bool) -> Any:
        """Within root's region from root, between leaders (mpi4py), within the others."""
        local, lead, leaders, index, mine = self._hierarchy()
        root_leader, my_leader = leaders[root], leaders[self._rank]
        if not objects:
            # Every level moves the same bytes: a derived type's packed copy is made once
            # here and unpacked when this Bcast returns, not re-packed (stale) by each level.
            spec = buffers.parse(buf, writable=self._rank != root)
            buf = spec.view
        if my_leader == root_leader:
            if objects:
                buf = local.bcast(buf, mine.index(root))
            else:
                local.Bcast(buf, mine.index(root))
        if lead is not None:
            if objects:
                buf = native.bcast_obj(lead, buf, index[root_leader])
            else:
                lead.Bcast([buf, len(buf), "B"], index[root_leader])
        if my_leader != root_leader:
            if objects:
                buf = local.bcast(buf, 0)
            else:
                local.Bcast(buf, 0)
        return buf

    def _h_allreduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op) -> None:
        local, lead, _, _, _ = self._hierarchy()
        # Every level reduces the same dense elements of the base type: a derived type's
        # packed copies are made once here (the receive's unpacked when this call returns).
        rspec = buffers.parse(recvbuf, writable=True)
        element = rspec.datatype.base
        recv = [rspec.view, len(rspec.view) // max(element.size, 1), element]
        if sendbuf is IN_PLACE:
            send = recv
        else:
            sspec = buffers.parse(sendbuf)
            send = [sspec.view, len(sspec.view) // max(element.size, 1), element]
        if local.Get_rank() == 0:
            local.Reduce(IN_PLACE if sendbuf is IN_PLACE else send, recv, op, 0)
        else:
            local.Reduce(send, None, op, 0)
        if lead is not None:
            out = _array(rspec.view, element)
            pair = self._native(op, element)
            if pair is not None:
                lead.Allreduce(_M_IN_PLACE(), [out, pair[1]], pair[0])
            else:
                parts = native.allgather_obj(lead, out.copy())
                result = parts[-1].copy()
                for part in reversed(parts[:-1]):
                    op.reduce_into(result, part, element)
                out[...] = result
        local.Bcast(rspec.view, 0)

    @collective
    def _h_allreduce_obj(self, sendobj: Any, op: Any) -> Any:
        """Object allreduce over the hierarchy (the members' native MPI between leads)."""
        local, lead, _, _, _ = self._hierarchy()
        pairs = local.gather((self._rank, sendobj), 0)
        result = None
        if lead is not None:
            everything = sorted(p for chunk in native.allgather_obj(lead, pairs) for p in chunk)
            result = functools.reduce(_op_func(op), [obj for _, obj in everything])
        return local.bcast(result, 0)

    # ------------------------------------------------------------------ barrier
    @collective(fast=_f_barrier)
    def Barrier(self) -> None:
        """Dissemination barrier: ceil(log2 p) rounds of empty messages."""
        if self._has_mpi:
            self._h_barrier()
            return
        shared = area.bound(self)
        if shared is None or not shared.run("barrier"):
            self._run(self._barrier(T_BARRIER))

    def _barrier(self, tag: int) -> Iterator[list[Op]]:
        """Stages of a dissemination barrier (Barrier, Ibarrier)."""
        size, rank = self._sizes()
        dist = 1
        while dist < size:
            yield [
                self._c_irecv(_NOTHING, (rank - dist) % size, tag),
                self._c_isend(_NOTHING, (rank + dist) % size, tag),
            ]
            dist <<= 1

    def barrier(self) -> None:
        """Barrier under mpi4py's lowercase name: return once every member has entered it."""
        self.Barrier()

    # ------------------------------------------------------------------ broadcast
    # The lowercase (object) collectives: a front (bcast, gather, ...) that runs the common
    # case, the area bound with its C accelerator and no other thread, as one byte-string
    # round in one C call (`_o_round`), then the rest of its body (`_*_rest`, shared with the
    # body); anything else takes the body (`_bcast`, ...: the lock of mpi4py's name, a
    # collective instance, `Area.exchange`).
    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        """Broadcast a picklable object from `root`; every rank returns it."""
        shared = self._area
        if shared:
            try:
                data = _dumps(obj) if self._rank == root else None
            except Exception:
                return self._bcast(obj, root)  # (its error raised there, in its instance)
            taken = _o_round(self, F_BCAST_BYTES, data, root)
            if taken is not None:
                if shared.group.declined:  # (a pickle over a slab: messages)
                    return _o_finish(self, self._bcast_rest, obj, data, taken, root)
                return obj if self._rank == root else _o_finish(self, _loads, taken[root])
            return self._bcast(obj, root, data)
        return self._bcast(obj, root)

    @locks.locked("bcast")
    @collective
    def _bcast(self, obj: Any, root: int, data: memoryview | None = None) -> Any:
        """bcast's body (`data`: the root's pickle of `obj` where the front made it)."""
        size, rank = self._sizes()
        self._root(root)
        if size == 1:
            return obj
        if self._has_mpi:
            return self._h_bcast(obj, root, objects=True)
        shared = area.bound(self)
        if rank == root and data is None:
            data = _dumps(obj)
        taken = shared.exchange("bcast_bytes", data, root) if shared is not None else None
        return self._bcast_rest(obj, data, taken, root)

    def _bcast_rest(
        self, obj: Any, data: memoryview | None, taken: list[bytes | None] | None, root: int
    ) -> Any:
        """bcast after its area round (`taken`; None: none): the root's pickle by messages
        where the round was declined (over a slab) or there was none."""
        rank = self._rank
        if taken is not None and not self._area.group.declined:
            return obj if rank == root else _loads(taken[root])
        if rank == root:  # no area, or a pickle over a slab
            self._bcast_view(data, root, T_BCAST)
            return obj
        return _loads(self._bcast_view(None, root, T_BCAST))

    @collective(fast=_f_bcast, empty=_e_bcast)
    def Bcast(self, buf: Any, root: int = 0) -> None:
        """Broadcast a buffer from `root` into `buf` on every rank.

        Written once into shared memory when large: see the module docstring.
        MPI.Exception(ERR_ROOT) on every rank for a root outside the communicator.
        """
        size, rank = self._sizes()
        self._root(root)
        if self._has_mpi:
            self._h_bcast(buf, root, objects=False)
            return
        shared = area.bound(self)
        spec = buffers.parse(buf, writable=rank != root)
        if (
            shared is not None
            and shared.fits(len(spec.view))
            and shared.run("bcast", spec.view, root)
        ):
            return
        if size >= 3 and len(spec.view) >= BCAST_ONCE_MIN:  # (every rank knows the size)
            self._bcast_once(spec.view, root)
        elif size > 1:
            self._bcast_view(spec.view, root, T_BCAST)

    def _root(self, root: int) -> None:
        if not 0 <= root < len(self._group):
            raise exceptions.Exception(exceptions.ERR_ROOT, f"root {root}")

    # ------------------------------------------------------------------ gather / scatter
    def gather(self, sendobj: Any, root: int = 0) -> list[Any] | None:
        """Each rank's object, pickled into its slab of the area (by messages without one,
        or for a pickle over a slab), at `root`; None elsewhere."""
        if self._area:
            try:
                data = _dumps(sendobj) if self._rank != root else None
            except Exception:
                return self._gather(sendobj, root)  # (its error raised there, in its instance)
            taken = _o_round(self, F_GATHER_BYTES, data, root)
            if taken is not None:
                return _o_finish(self, self._gather_rest, sendobj, data, taken, root)
            return self._gather(sendobj, root, data)
        return self._gather(sendobj, root)

    @locks.locked("gather")
    @collective
    def _gather(self, sendobj: Any, root: int, data: memoryview | None = None) -> list[Any] | None:
        """gather's body (`data`: a non-root's pickle of `sendobj` where the front made it)."""
        size, rank = self._sizes()
        self._root(root)
        shared = area.bound(self) if size > 1 else None  # (bound before any argument check)
        if rank != root and data is None:
            data = _dumps(sendobj)
        taken = shared.exchange("gather_bytes", data, root) if shared is not None else None
        return self._gather_rest(sendobj, data, taken, root)

    def _gather_rest(
        self, sendobj: Any, data: memoryview | None, taken: list[bytes | None] | None, root: int
    ) -> list[Any] | None:
        """gather after its area round (`taken`; None: none): a non-root's pickle by
        messages where it declined it (over a slab) or there was no round."""
        if self._rank != root:
            if taken is None or self._area.group.declined:
                self._c_wait([self._c_isend(data, root, T_GATHER)])  # type: ignore[arg-type]
            return None
        return self._gathered(sendobj, taken, T_GATHER)

    def _gathered(self, own: Any, taken: list[bytes | None] | None, tag: int) -> list[Any]:
        """Every rank's object: `own` here, the others' from `taken` (an area exchange's) or
        by messages on `tag` where it has none (no area, or a pickle over a slab)."""
        size, rank = len(self._group), self._rank  # (its callers checked the communicator)
        got = taken or [None] * size
        if taken is not None and taken.count(None) == (taken[rank] is None):  # (all here)
            return [own if r == rank else _loads(data) for r, data in enumerate(taken)]
        recvs = {
            r: self._c_irecv(None, r, tag) for r in range(size) if r != rank and got[r] is None
        }
        self._c_wait(list(recvs.values()))
        return [
            own if r == rank else unpickle(recvs[r]) if r in recvs else _loads(got[r])
            for r in range(size)
        ]

    def scatter(self, sendobj: Any = None, root: int = 0) -> Any:
        """Send item r of `root`'s sequence `sendobj` to rank r; return this rank's.

        The root's pickles go bundled into its slab of the area (`pickling.bundle`), each
        rank unpickling its own; by messages without an area, or for a bundle over a slab.
        """
        shared = self._area
        if shared:
            items = data = None
            if self._rank == root:
                try:
                    items, data = self._pickles(sendobj, "scatter")
                except Exception:
                    return self._scatter(sendobj, root)  # (its error raised there)
            taken = _o_round(self, F_SCATTER_BYTES, data, root)  # (bundled in C)
            if taken is not None:
                if shared.group.declined:  # (a bundle over a slab: messages)
                    return _o_finish(self, self._scatter_rest, items, data, taken, root, True)
                if items is not None:  # (the root: its own item)
                    return items[root]
                return _o_finish(self, _loads, taken[root])  # (this rank's piece, cut in C)
            if data is not None:
                return self._scatter(sendobj, root, (items, data))
        return self._scatter(sendobj, root)

    @locks.locked("scatter")
    @collective
    def _scatter(
        self, sendobj: Any, root: int, pickled: tuple[list[Any], list[memoryview]] | None = None
    ) -> Any:
        """scatter's body (`pickled`: the root's `_pickles` where the front made them)."""
        size, rank = self._sizes()
        self._root(root)
        shared = area.bound(self) if size > 1 else None
        if rank != root:
            taken = shared.exchange("bcast_bytes", None, root) if shared is not None else None
            return self._scatter_rest(None, None, taken, root)
        items, data = self._pickles(sendobj, "scatter") if pickled is None else pickled
        taken = None
        if shared is not None:
            bundle = _bundled(shared, data)
            taken = shared.exchange(
                "bcast_bytes", bundle if bundle is not None else shared.declining(), root
            )
        return self._scatter_rest(items, data, taken, root)

    def _scatter_rest(
        self,
        items: list[Any] | None,
        data: list[memoryview] | None,
        taken: list[bytes | None] | None,
        root: int,
        cut: bool = False,
    ) -> Any:
        """scatter after its area round (`taken`: the root's bundle, or with `cut` this
        rank's piece of it; None: no round), `items` and their pickles `data` at the root:
        each pickle by messages where the root's bundle was declined (over a slab) or there
        was no round."""
        size, rank = len(self._group), self._rank
        moved = taken is not None and not self._area.group.declined
        if rank != root:
            if not moved:
                return self._c_recv_obj(root, T_SCATTER)
            mine = taken[root]  # type: ignore[index]  # (moved: taken)
            return _loads(mine if cut else _piece(mine, rank, size, root))  # type: ignore[arg-type]
        assert items is not None and data is not None
        if not moved:
            self._c_wait([self._c_isend(data[r], r, T_SCATTER) for r in range(size) if r != rank])
        return items[rank]

    def _pickles(self, sendobj: Any, name: str) -> tuple[list[Any], list[memoryview]]:
        """(items, their pickles: _NOTHING for this rank's own) of a scatter's or an
        alltoall's `sendobj` (None: size Nones). ValueError where it has not one item per
        member."""
        size, rank = len(self._group), self._rank
        items = list(sendobj) if sendobj is not None else [None] * size
        if len(items) != size:
            raise ValueError(f"{name}: expecting {size} items, got {len(items)}")
        return items, [_dumps(items[r]) if r != rank else _NOTHING for r in range(size)]

    def allgather(self, sendobj: Any) -> list[Any]:
        """Every rank gets every rank's object, pickled into the area (see gather)."""
        if self._area:
            try:
                data = _dumps(sendobj)
            except Exception:
                return self._allgather(sendobj)  # (its error raised there, in its instance)
            taken = _o_round(self, F_ALLGATHER_BYTES, data, 0)
            if taken is not None:
                return _o_finish(self, self._allgather_rest, sendobj, data, taken)
            return self._allgather(sendobj, data)
        return self._allgather(sendobj)

    @locks.locked("allgather")
    @collective
    def _allgather(self, sendobj: Any, data: memoryview | None = None) -> list[Any]:
        """allgather's body (`data`: the pickle of `sendobj` where the front made it)."""
        if self._sizes()[0] == 1:
            return [sendobj]
        shared = area.bound(self)
        if shared is None:
            return self._allgather_messages(sendobj)
        if data is None:
            data = _dumps(sendobj)
        taken = shared.exchange("allgather_bytes", data)
        if taken is None:
            return self._allgather_messages(sendobj)
        return self._allgather_rest(sendobj, data, taken)

    def _allgather_rest(
        self, sendobj: Any, data: memoryview, taken: list[bytes | None]
    ) -> list[Any]:
        """allgather after its area round (`taken`): this rank's pickle to each by messages
        where it declined it (over a slab), the others' so declined from each."""
        size, rank = len(self._group), self._rank
        if len(data) > self._area.group.slab_size:  # declined: it goes to each by messages
            self._c_wait([self._c_isend(data, r, T_ALLGATHER) for r in range(size) if r != rank])
        return self._gathered(sendobj, taken, T_ALLGATHER)

    @collective
    def _allgather_messages(self, sendobj: Any) -> list[Any]:
        """allgather by messages only (see _allreduce_int_or)."""
        size, rank = self._sizes()
        if size == 1:
            return [sendobj]
        data = _dumps(sendobj)
        recvs = {r: self._c_irecv(None, r, T_ALLGATHER) for r in range(size) if r != rank}
        sends = [self._c_isend(data, r, T_ALLGATHER) for r in range(size) if r != rank]
        self._c_wait([*recvs.values(), *sends])  # (receives posted first: none unexpected)
        return [sendobj if r == rank else unpickle(recvs[r]) for r in range(size)]

    def alltoall(self, sendobj: Any) -> list[Any]:
        """Send item q of `sendobj` to rank q; return the list of what each rank sent here.

        Each rank's pickles go bundled into its slab of the area (`pickling.bundle`, an
        allgather of bytes), every rank unpickling its own pieces; by messages without an
        area, and from (and to) a rank whose bundle is over a slab.
        """
        shared = self._area
        if shared:
            try:
                items, data = self._pickles(sendobj, "alltoall")
            except Exception:
                return self._alltoall(sendobj)  # (its error raised there, in its instance)
            taken = _o_round(self, F_ALLTOALL_BYTES, data, 0)  # (bundled in C)
            if taken is not None:
                bundled = not shared.group.declined or _fits(shared, data)
                return _o_finish(self, self._alltoall_rest, items, data, taken, bundled, True)
            return self._alltoall(sendobj, (items, data))
        return self._alltoall(sendobj)

    @locks.locked("alltoall")
    @collective
    def _alltoall(
        self, sendobj: Any, pickled: tuple[list[Any], list[memoryview]] | None = None
    ) -> list[Any]:
        """alltoall's body (`pickled`: its `_pickles` where the front made them)."""
        size = len(self._group)
        shared = area.bound(self) if size > 1 else None  # (bound before any argument check)
        items, data = self._pickles(sendobj, "alltoall") if pickled is None else pickled
        taken = bundle = None
        if shared is not None:
            bundle = _bundled(shared, data)
            taken = shared.exchange(
                "allgather_bytes", bundle if bundle is not None else shared.declining()
            )
        return self._alltoall_rest(items, data, taken, bundle is not None)

    def _alltoall_rest(
        self,
        items: list[Any],
        data: list[memoryview],
        taken: list[bytes | None] | None,
        bundled: bool,
        cut: bool = False,
    ) -> list[Any]:
        """alltoall after its area round (`taken`: per rank its bundle, or with `cut` this
        rank's piece of it; None: no round; `bundled`: this rank's pickles went in its
        bundle): by messages from each rank whose bundle was declined (over a slab), and to
        each where this rank's was or there was no round."""
        size, rank = len(self._group), self._rank
        others = [r for r in range(size) if r != rank]
        got = taken or [None] * size
        recvs = {r: self._c_irecv(None, r, T_ALLTOALL) for r in others if got[r] is None}
        sends = others if taken is None or not bundled else []  # (no area; over a slab)
        ops = [*recvs.values(), *(self._c_isend(data[r], r, T_ALLTOALL) for r in sends)]
        self._c_wait(ops)  # (receives posted first: none unexpected)
        return [
            items[r] if r == rank
            else unpickle(recvs[r]) if r in recvs
            else _loads(got[r] if cut else _piece(got[r], rank, size, r))  # type: ignore[arg-type]
            for r in range(size)
        ]  # fmt: skip

    # The collectives below are written once as stages (each a list of the operations the
    # next one waits for): their blocking form runs the stages here (`_run`), their
    # nonblocking form (Igather, ...) hands them to the engine with a tag of their own.
    def _run(self, stages: Iterator[list[Op]]) -> None:
        """Run a collective's stages to completion here and now (its blocking form)."""
        for stage in stages:
            self._c_wait(stage)

    @collective(fast=_f_gather, empty=_e_gather)
    def Gather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        """Gather every rank's sendbuf into the root's recvbuf, in rank order.

        recvbuf is a message spec of size equal parts (Gatherv: with counts and displacements
        for the vector form); at the root sendbuf may be IN_PLACE (its own part is then left as
        it is). MPI.Exception(ERR_ROOT) for a root outside the communicator. ValueError at the
        root for a recvbuf that does not split so, that is too short, or whose own part is not
        as long as its sendbuf: raised after the others' data was taken and dropped (recvbuf
        untouched), so the other ranks return as usual and the communicator goes on working,
        its collective area kept.
        """
        self._gather_buf(sendbuf, recvbuf, root, True)

    @collective(fast=_f_gather)
    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        """Gather by the counts and displacements of the root's recvbuf.

        As Gather otherwise; the root's own count must match its sendbuf."""
        self._gather_buf(sendbuf, recvbuf, root, False)

    def _gather_buf(self, sendbuf: Any, recvbuf: Any, root: int, blocks: bool) -> None:
        """The body of Gather (`blocks`: equal blocks) and Gatherv. A root whose receive side
        is wrong (see _gather_recv) runs the instance with a stand-in, then raises."""
        refused: list[ValueError] = []
        if not self._area_run(lambda: self._p_gather(sendbuf, recvbuf, root, blocks, refused)):
            shared = self._area  # (an Area: its round declined; else none, or dropped)
            group = shared.group if shared else None
            self._run(self._gatherv(sendbuf, recvbuf, root, T_GATHER, blocks, refused, group))
        if refused:
            if isinstance(refused[0], RootBlockShort):
                # (MPICH's classes: Gather's local copy truncates, Gatherv's self-receive fails
                # its Waitall)
                error = exceptions.ERR_TRUNCATE if blocks else exceptions.ERR_IN_STATUS
                raise StandInTruncation(error, str(refused[0])) from refused[0]
            raise StandInValueError(str(refused[0])) from refused[0]

    @started(_a_gather, _m_gather, _e_gather)
    def Igather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        """Start Gather (see there) without waiting; return the Request."""
        return self._igather(sendbuf, recvbuf, root)

    @started(_a_gather, _m_gather)
    def Igatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        """Start Gatherv (see there) without waiting; return the Request."""
        return self._igather(sendbuf, recvbuf, root)

    def _igather(self, sendbuf: Any, recvbuf: Any, root: int) -> Request:
        """The body of Igather and Igatherv."""
        return self._nonblocking(
            functools.partial(self._gatherv, sendbuf, recvbuf, root),
            functools.partial(self._p_gather, sendbuf, recvbuf, root),
            lambda tag: _m_gather(self, tag, sendbuf, recvbuf, root),
        )

    def _gatherv(
        self,
        sendbuf: Any,
        recvbuf: Any,
        root: int,
        tag: int,
        blocks: bool = False,
        refused: list[ValueError] | None = None,
        group: CollectiveGroup | None = None,
    ) -> Iterator[list[Op]]:
        """Gather(v)'s stages on messages. `group`: the area's, whose gatherv round this
        instance continues (declined at this member): at the root only the blocks that
        round left come by messages, those over its slab (a refused root's round:
        `group.by_messages`); the others came through the area (and were dropped)."""
        size, rank = self._sizes()
        self._root(root)
        if rank != root:
            yield [self._c_isend(buffers.parse(sendbuf).view, root, tag)]
            return
        if refused:  # (the area's plan refused them already: refused again here)
            refused = []
        others = [r for r in range(size) if r != rank]
        checked = self._gather_recv(sendbuf, recvbuf, blocks, refused)
        if checked is None:  # the others' blocks into nothing (their sends complete)
            senders = others if group is None else group.by_messages
            yield [self._c_irecv(None, r, tag) for r in senders]
            return
        spec, own = checked
        if sendbuf is not IN_PLACE and sendbuf is not None:
            spec.part(rank)[:] = own
        if group is not None:
            others = [r for r in others if len(spec.part(r)) > group.slab_size]
        yield [self._c_irecv(spec.part(r), r, tag) for r in others]

    @collective(fast=_f_scatter, empty=_e_scatter)
    def Scatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        """Scatter part r of the root's sendbuf into rank r's recvbuf.

        sendbuf is a message spec of size equal parts (Scatterv: with counts and displacements for
        the vector form); at the root recvbuf may be IN_PLACE (or None, as mpi4py).
        MPI.Exception(ERR_ROOT) for a root outside the communicator. At the root, ValueError for
        a sendbuf whose count, left to infer, does not split into size equal parts (mpi4py's
        rule; the others return with their recvbuf as it was) and MPI.Exception(ERR_TRUNCATE)
        for a recvbuf shorter than its part (the others got theirs): both raised once the
        instance ran in step on every rank, so the communicator goes on working, its collective
        area kept.
        """
        self._scatter_buf(sendbuf, recvbuf, root, True)

    @collective(fast=_f_scatter)
    def Scatterv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        """Scatter by the counts and displacements of the root's sendbuf.

        As Scatter otherwise; a sendbuf without them is split as evenly as can be."""
        self._scatter_buf(sendbuf, recvbuf, root, False)

    def _scatter_buf(self, sendbuf: Any, recvbuf: Any, root: int, blocks: bool) -> None:
        """The body of Scatter (`blocks`: equal parts) and Scatterv. A root whose own
        arguments are wrong (see _scatter_send, _scatter_own) runs the instance with a
        stand-in, then raises."""
        refused: list[Exception] = []
        plan = functools.partial(self._p_scatter, sendbuf, recvbuf, root, refused, blocks)
        if not self._area_run(plan):
            self._run(self._scatterv(sendbuf, recvbuf, root, T_SCATTER, refused, blocks))
        elif self._area.group.truncated:
            raise _short_recvbuf(self)
        if refused:
            raise refused[0]

    @started(_a_scatter, _m_scatter, _e_scatter)
    def Iscatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        """Start Scatter (see there) without waiting; return the Request."""
        return self._iscatter(sendbuf, recvbuf, root)

    @started(_a_scatter, _m_scatter)
    def Iscatterv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        """Start Scatterv (see there) without waiting; return the Request."""
        return self._iscatter(sendbuf, recvbuf, root)

    def _iscatter(self, sendbuf: Any, recvbuf: Any, root: int) -> Request:
        """The body of Iscatter and Iscatterv."""
        return self._nonblocking(
            functools.partial(self._scatterv, sendbuf, recvbuf, root),
            functools.partial(self._p_scatter, sendbuf, recvbuf, root),
        )

    def _scatterv(
        self,
        sendbuf: Any,
        recvbuf: Any,
        root: int,
        tag: int,
        refused: list[Exception] | None = None,
        blocks: bool = False,
    ) -> Iterator[list[Op]]:
        size, rank = self._sizes()
        self._root(root)
        if rank != root:
            yield [self._c_irecv(buffers.parse(recvbuf, writable=True).view, root, tag)]
            return
        if refused:  # (the area's plan refused it already: refused again here)
            refused = []
        spec = self._scatter_send(sendbuf, blocks, refused)
        if spec is None:  # an empty part to each (their receives complete, buffers untouched)
            yield [self._c_isend(_NOTHING, r, tag) for r in range(size) if r != rank]
            return
        part = spec.part(rank)
        own = self._scatter_own(recvbuf, part, refused)
        sends = [self._c_isend(spec.part(r), r, tag) for r in range(size) if r != rank]
        if own is not None:  # (the others' blocks on their way first)
            own[:] = part
        yield sends

    @collective(fast=_f_allgather, empty=_e_allgather)
    def Allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        """Gather every rank's sendbuf into every rank's recvbuf, in rank order.

        recvbuf is a message spec of size parts (with counts and displacements for the vector form);
        sendbuf may be IN_PLACE (each rank's part of recvbuf is then its contribution).
        """
        self._allgather_buf(sendbuf, recvbuf)

    @collective(fast=_f_allgather)
    def Allgatherv(self, sendbuf: Any, recvbuf: Any) -> None:
        """Allgather by the counts and displacements of recvbuf.

        As Allgather otherwise; a vector collective: one of no byte still runs (`_skip`)."""
        self._allgather_buf(sendbuf, recvbuf)

    def _allgather_buf(self, sendbuf: Any, recvbuf: Any) -> None:
        """The body of Allgather and Allgatherv."""
        size, _ = self._sizes()
        area.bound(self)  # (every member binds before an argument error: see area.bound)
        spec = buffers.parse_vector(recvbuf, size, writable=True)  # (once: area or messages)
        if not self._area_run(lambda: self._p_allgather(sendbuf, spec)):
            self._run(self._allgatherv(sendbuf, spec, T_ALLGATHER))

    @started(_a_allgather, None, _e_allgather)
    def Iallgather(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Start Allgather (see there) without waiting; return the Request."""
        return self._iallgather(sendbuf, recvbuf)

    @started(_a_allgather)
    def Iallgatherv(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Start Allgatherv (see there) without waiting; return the Request."""
        return self._iallgather(sendbuf, recvbuf)

    def _iallgather(self, sendbuf: Any, recvbuf: Any) -> Request:
        """The body of Iallgather and Iallgatherv."""
        return self._nonblocking(
            functools.partial(self._allgatherv, sendbuf, recvbuf),
            functools.partial(self._p_allgather, sendbuf, recvbuf),
        )

    def _allgatherv(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        size, rank = self._sizes()
        spec = _received_parts(recvbuf, size)
        mine = spec.part(rank)
        if sendbuf is not IN_PLACE:
            own = buffers.parse(sendbuf).view
            mine[: len(own)] = own
        recvs = [self._c_irecv(spec.part(r), r, tag) for r in range(size) if r != rank]
        yield recvs + [self._c_isend(mine, r, tag) for r in range(size) if r != rank]

    def Alltoall(self, sendbuf: Any, recvbuf: Any) -> None:
        """Exchange equal blocks: block r of each rank's sendbuf goes to rank r's recvbuf.

        A spec without counts must split into size blocks: ValueError on every rank given one that
        does not, before anything moves (mpi4py's rule; Alltoallv splits such a spec as evenly as
        can be). Blocks over one round of the collective area (the same size at every member:
        Alltoall's rule) go on messages at once, without the area round in which every member
        would decline them.
        """
        size = len(self._group)
        if not self._coll_active and size > 1 and _e_pair(self, sendbuf, recvbuf):
            self._live()
            return _skip(self)
        try:
            _check_blocks(size, sendbuf, recvbuf)
        except ValueError as exc:
            self._refused(exc)
        shared = area.current(self)
        if shared is not None and _over_a_round(shared, recvbuf, size):
            self._alltoall_messages(sendbuf, recvbuf)
        else:
            self.Alltoallv(sendbuf, recvbuf)

    @collective
    def _refused(self, exc: Exception) -> None:
        """Raise `exc`, an argument error found before a blocking collective took its
        instance, in an instance of its own: bound to the area first (area.bound), the
        instance abandoned by `collective` (the members whose arguments are right, waiting in
        the collective's instance, are told; where every member fails alike the area stays:
        area.Doubt)."""
        area.bound(self)
        raise exc

    def _refused_started(self, exc: Exception) -> NoReturn:
        """Raise `exc`, an argument error found before a nonblocking collective took its
        instance number, in a nonblocking instance of its own, abandoned (_nb_abandon): the
        members whose arguments are right, their requests pending in that instance, complete
        with MPI.Exception(ERR_OTHER) instead of waiting (this member raises its own error,
        even where another member abandoned that instance already)."""
        engine = self._live()
        if len(self._group) > 1:
            seq, self._nb_seq = self._nb_seq, self._nb_seq + 1
            _nb_abandon(self, engine, seq, abandon_class(exc), f"{type(exc).__name__}: {exc}")
        raise exc

    @collective
    def _alltoall_messages(self, sendbuf: Any, recvbuf: Any) -> None:
        """Alltoall on messages (see there)."""
        self._run(self._alltoallv(sendbuf, recvbuf, T_ALLTOALL))

    @collective(fast=_f_alltoall)
    def Alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:
        """Exchange blocks: part r of each rank's sendbuf goes to rank r's recvbuf.

        The specs give each part's count and displacement (a spec without them is split as evenly as
        can be); sendbuf may be IN_PLACE (recvbuf's parts are sent, then replaced).
        """
        if not self._area_run(lambda: self._p_alltoall(sendbuf, recvbuf)):
            self._run(self._alltoallv(sendbuf, recvbuf, T_ALLTOALL))

    def Ialltoall(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Start Alltoall (see there) without waiting; return the Request.

        The specs are checked as Alltoall's, at the call. Blocks over one round of the area
        (the same size at every member: Alltoall's rule) go on messages at once, without the
        round in which the members would decline them."""
        size = len(self._group)
        if size > 1 and _e_pair(self, sendbuf, recvbuf):
            return _skip_started(self, self._live())
        try:
            _check_blocks(size, sendbuf, recvbuf)
        except ValueError as exc:
            self._refused_started(exc)
        shared = area.current(self)
        if shared is not None and _over_a_round(shared, recvbuf, size):
            return self._nonblocking(functools.partial(self._alltoallv, sendbuf, recvbuf))
        return self.Ialltoallv(sendbuf, recvbuf)

    @started(_a_alltoall, _m_alltoall)
    def Ialltoallv(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Start Alltoallv (see there) without waiting; return the Request."""
        return self._nonblocking(
            functools.partial(self._alltoallv, sendbuf, recvbuf),
            lambda: self._p_alltoall(sendbuf, recvbuf),
        )

    def _alltoallv(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        """In place, the data sent is a copy of recvbuf (a round of the area declined
        before leaves it as it was: see CollectiveGroup.alltoallv)."""
        size, rank = self._sizes()
        rspec = buffers.parse_vector(recvbuf, size, writable=True)
        if sendbuf is IN_PLACE:
            sspec = rspec._replace(view=memoryview(bytes(rspec.view)))
        else:
            sspec = buffers.parse_vector(sendbuf, size)
        own = sspec.part(rank)
        rspec.part(rank)[: len(own)] = own
        recvs = [self._c_irecv(rspec.part(r), r, tag) for r in range(size) if r != rank]
        yield recvs + [self._c_isend(sspec.part(r), r, tag) for r in range(size) if r != rank]

    # ------------------------------------------------------------------ reductions (objects)
    # The object reductions are a gather or an allgather (their fronts: one C call in the
    # common case, see bcast) and a fold here: not a collective of their own (`collective`),
    # which would run that gather inside its instance, by the gather's body (`_gather`: the
    # area round in Python). The fold runs after the gather's instance completed: an error
    # of `op` (raised where it folds) leaves no instance to abandon.
    def reduce(self, sendobj: Any, op: Any = ops.SUM, root: int = 0) -> Any:
        """Fold the objects in rank order at `root`; None elsewhere."""
        if self._has_mpi:
            result = self._h_allreduce_obj(sendobj, op)
            return result if self._rank == root else None
        items = self.gather(sendobj, root)
        if items is None:
            return None
        return functools.reduce(_op_func(op), items)

    def allreduce(self, sendobj: Any, op: Any = ops.SUM) -> Any:
        """Fold the objects in rank order; every rank gets the same result."""
        if self._has_mpi:
            return self._h_allreduce_obj(sendobj, op)
        return functools.reduce(_op_func(op), self.allgather(sendobj))

    def scan(self, sendobj: Any, op: Any = ops.SUM) -> Any:
        """Fold the objects of ranks 0..this one in rank order (inclusive prefix)."""
        items = self.allgather(sendobj)
        return functools.reduce(_op_func(op), items[: self._rank + 1])

    def exscan(self, sendobj: Any, op: Any = ops.SUM) -> Any:
        """Fold the objects of ranks 0..this one's predecessor in rank order (exclusive
        prefix); None at rank 0."""
        items = self.allgather(sendobj)
        if self._rank == 0:
            return None
        return functools.reduce(_op_func(op), items[: self._rank])

    # ------------------------------------------------------------------ reductions (buffers)
    def _reduce_sink(
        self, acc: np.ndarray, op: ops.Op, datatype: Any, source: int
    ) -> Callable[..., None]:
        """The sink of rank `source`'s operand: each piece folded into acc as it arrives
        (MPI.Exception naming the rank for a piece outside acc, see `_elements`)."""

        def sink(offset: int, data: Any) -> None:
            start, operand = _elements(acc, offset, data, source)
            op.reduce_into(acc[start : start + len(operand)], operand, datatype)

        return sink

    def _combine_sink(
        self, out: np.ndarray, local: np.ndarray, op: ops.Op, local_is_left: bool, source: int
    ) -> Callable[..., None]:
        def sink(offset: int, data: Any) -> None:
            start, remote = _elements(out, offset, data, source)
            stop = start + len(remote)
            if local_is_left:
                op.combine_to(out[start:stop], local[start:stop], remote)
            else:
                op.combine_to(out[start:stop], remote, local[start:stop])

        return sink

    @collective(fast=_f_reduce, empty=_e_reduce)
    def Reduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM, root: int = 0) -> None:
        """Reduce to `root`: operands are folded there as they arrive, read in place.
        ValueError at the root (before any data moves; the other ranks then raise
        MPI.Exception(ERR_OTHER), see the module docstring) when sendbuf and recvbuf differ
        in datatype or count, as mpi4py."""
        size, rank = self._sizes()
        self._root(root)
        area.bound(self)  # (every member binds before an argument error: see area.bound)
        if rank == root and sendbuf is not IN_PLACE:
            _same_message(buffers.parse(sendbuf), buffers.parse(recvbuf, writable=True))
        if self._has_mpi and op.is_commutative:
            spec = buffers.parse(sendbuf if sendbuf is not IN_PLACE else recvbuf)
            scratch = np.array(_array(spec.view, spec.datatype))
            self._h_allreduce(sendbuf if sendbuf is not IN_PLACE else scratch,
                              [scratch, spec.datatype], op)  # fmt: skip
            if rank == root:
                rspec = buffers.parse(recvbuf, writable=True)
                rspec.view[:] = _raw(scratch)
            return
        if self._area_run(lambda: self._p_reduce(sendbuf, recvbuf, op, root)):
            return
        if rank != root:
            self._c_wait([self._c_isend(buffers.parse(sendbuf).view, root, T_REDUCE)])
            return
        rspec = buffers.parse(recvbuf, writable=True)
        acc = _array(rspec.view, rspec.datatype)
        if sendbuf is not IN_PLACE:
            acc[...] = _array(buffers.parse(sendbuf).view, rspec.datatype)
        self._fold_at_me(acc, op, rspec.datatype, T_REDUCE, range(size))

    def _operands(
        self, sendbuf: Any, recvbuf: Any, copy: bool = True
    ) -> tuple[buffers.Spec, np.ndarray, np.ndarray]:
        """(recvbuf's spec, recvbuf as an array, this rank's operand: for IN_PLACE a copy of
        recvbuf, or recvbuf's array itself without `copy`; else sendbuf as an array of
        recvbuf's type)."""
        rspec = buffers.parse(recvbuf, writable=True)
        out = _array(rspec.view, rspec.datatype)
        if sendbuf is IN_PLACE:
            return rspec, out, out.copy() if copy else out
        return rspec, out, _array(buffers.parse(sendbuf).view, rspec.datatype)

    def _fold_at_me(
        self, acc: np.ndarray, op: ops.Op, datatype: Any, tag: int, sources: Any,
        block: Callable[[int], slice] | None = None,
    ) -> None:  # fmt: skip
        """acc (holding this rank's operand) := fold of every source's operand, in place."""
        rank = self._rank
        others = [r for r in sources if r != rank]
        if op.is_commutative:
            recvs = [
                self._c_irecv(None, r, tag, self._reduce_sink(acc, op, datatype, r)) for r in others
            ]
            self._c_wait(recvs)
            whole(zip(others, recvs, strict=True), acc.nbytes, "rank")
            return
        temps = {r: np.empty_like(acc) for r in others}
        recvs = [self._c_irecv(_raw(temps[r]), r, tag) for r in others]
        self._c_wait(recvs)
        whole(zip(others, recvs, strict=True), acc.nbytes, "rank")
        temps[rank] = acc.copy()
        ordered = sorted(temps)
        result = temps[ordered[-1]].copy()
        for r in reversed(ordered[:-1]):
            op.reduce_into(result, temps[r], datatype)
        acc[...] = result

    @collective(fast=_f_allreduce, empty=_e_fold)
    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> None:
        """Every rank gets the fold of all operands (the same bits on every rank)."""
        size, rank = self._sizes()
        if self._has_mpi and op.is_commutative:
            self._h_allreduce(sendbuf, recvbuf, op)
            return
        if size > 1 and self._area_run(lambda: self._p_fold("allreduce", sendbuf, recvbuf, op)):
            return
        rspec, out, local = self._operands(sendbuf, recvbuf, copy=False)
        if size == 1:
            if sendbuf is not IN_PLACE:
                out[...] = local
            return
        if _in_blocks(op, out, size):
            datatype = rspec.datatype
            self._run(
                self._allreduce_blocks(local, out, op, datatype, T_ALLREDUCE, T_ALLREDUCE_GATHER)
            )
            return
        if local is out:
            local = out.copy()
        if size == 2:
            peer = 1 - rank
            sink = self._combine_sink(out, local, op, rank == 0, peer)
            recv = self._c_irecv(None, peer, T_ALLREDUCE, sink)
            send = self._c_isend(_raw(local), peer, T_ALLREDUCE)
            self._c_wait([recv, send])
            whole([(peer, recv)], out.nbytes, "rank")
            if local.nbytes == 0:
                return
            return
        if sendbuf is not IN_PLACE:
            out[...] = local
        if rank == 0:
            self._fold_at_me(out, op, rspec.datatype, T_ALLREDUCE, range(size))
        else:
            self._c_wait([self._c_isend(_raw(local), 0, T_ALLREDUCE)])
        self._bcast_view(rspec.view, 0, T_BCAST)

    def _allreduce_blocks(
        self, local: np.ndarray, out: np.ndarray, op: ops.Op, datatype: Any, tag: int, last: int
    ) -> Stages:
        """Stages of an Allreduce of a large operand (commutative op): a reduce-scatter on
        `tag`, then an allgather on `last` (may be `tag`: each rank's fold message to a rank
        goes before its gathered block, and the receives are posted in that order).

        Rank j folds block j of every operand (1/size of the data), reading the other ranks'
        blocks in place in its queues as they arrive, and sends the folded block to every
        other rank, which receives it straight into its `out`. Each element is folded by one
        rank only, so every rank gets the same bits. `local` is `out` for IN_PLACE.
        """
        size, rank = self._sizes()
        bounds = [j * len(out) // size for j in range(size + 1)]
        blocks = [slice(bounds[j], bounds[j + 1]) for j in range(size)]
        others = [j for j in range(size) if j != rank]
        mine = out[blocks[rank]]
        if size == 2 and local is not out:  # one pass: out = lower rank's op higher rank's
            sinks = [self._combine_sink(mine, local[blocks[rank]], op, rank == 0, j)
                     for j in others]  # fmt: skip
        else:
            if local is not out:
                mine[...] = local[blocks[rank]]
            sinks = [self._reduce_sink(mine, op, datatype, j) for j in others]
        errors: list[Exception] = []
        folds = [self._c_irecv(None, j, tag, _kept(sink, errors))
                 for j, sink in zip(others, sinks, strict=True)]  # fmt: skip
        gathers = [self._c_irecv(_raw(out[blocks[j]]), j, last) for j in others]
        sends = [self._c_isend(_raw(local[blocks[j]]), j, tag) for j in others]
        yield folds
        _raise_first(errors)
        whole(zip(others, folds, strict=True), mine.nbytes, "rank")
        yield sends + gathers + [self._c_isend(_raw(mine), j, last) for j in others]

    @collective(fast=_f_reduce_scatter_block, empty=_e_fold)
    def Reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> None:
        """Reduce every rank's sendbuf with `op` and scatter equal blocks of the result.

        Block r (recvbuf's count elements; with IN_PLACE, 1/size of recvbuf) of the fold of every
        rank's sendbuf ends in rank r's recvbuf; each block is folded at its owner, reading the
        other ranks' blocks in place.
        """
        size, _ = self._sizes()
        rspec = buffers.parse(recvbuf, writable=True)
        count = rspec.count // size if sendbuf is IN_PLACE else rspec.count
        self._reduce_scatter(sendbuf, rspec, [count] * size, op)

    @collective(fast=_f_reduce_scatter)
    def Reduce_scatter(
        self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None, op: ops.Op = ops.SUM
    ) -> None:
        """Reduce every rank's sendbuf with `op`; rank r gets `recvcounts[r]` elements of it.

        Like Reduce_scatter_block with `recvcounts[r]` elements for rank r. Without recvcounts, each
        rank's is its recvbuf's count (gathered from every rank first, with its send count, see
        `_all_counts`; not with IN_PLACE). ValueError for counts that do not fit the buffers
        (gathered ones: on every rank); MPI.Exception(ERR_COUNT) naming a rank whose gathered
        count is negative.
        """
        size, _ = self._sizes()
        rspec = buffers.parse(recvbuf, writable=True)
        given = reduce_scatter_counts(recvcounts, size, sendbuf)
        if given is None:
            sent = buffers.parse(sendbuf).count
            counts = self._all_counts(rspec.count, sent, area.bound(self))
        else:
            counts = given
        assert counts is not None
        self._reduce_scatter(sendbuf, rspec, counts, op)

    def _all_counts(
        self, count: int, sent: int, shared: area.Area | None, lane: bool = False
    ) -> Any:
        """Every rank's receive `count` (Reduce_scatter without recvcounts), gathered with
        every rank's `sent` count, so that every member checks the same arguments: where the
        area is bound (`shared`), an allgather of two int64 per rank there, whichever path
        each member takes (`lane`: the fast lane's one C call; else Area.run), else the
        object allgather. MPI.Exception(ERR_COUNT) naming a rank that gave a negative or
        non-integer count (read from shared memory or another process); ValueError on every
        rank, before any data moves, naming the ranks whose send count is not the sum of
        the receive counts. None where the lane's call did not run (nothing moved: the body
        runs the collective)."""
        pairs: Any = None
        if shared is not None:
            size = shared.group.size
            mine, pairs_of = np.array([count, sent], np.int64), np.empty(2 * size, np.int64)
            lengths, displs = _even(size, 16)
            if lane:
                ran = shared.call(C_ALLGATHERV, mine, pairs_of, 0, lengths, displs, None, None)
                if not ran:
                    return None
            else:
                ran = shared.run("allgatherv", mine, pairs_of, lengths, displs)
            pairs = pairs_of.reshape(size, 2).tolist() if ran else None
        if pairs is None:
            pairs = self.allgather((count, sent))
        for r, pair in enumerate(pairs):
            if (
                type(pair) not in (list, tuple)
                or len(pair) != 2
                or any(type(c) is not int or c < 0 for c in pair)
            ):
                raise exceptions.Exception(
                    exceptions.ERR_COUNT, f"rank {r} gave counts {pair!r} to Reduce_scatter"
                )
        counts = [pair[0] for pair in pairs]
        total = sum(counts)
        wrong = {r: pair[1] for r, pair in enumerate(pairs) if pair[1] != total}
        if wrong:
            raise AgreedValueError(
                f"Reduce_scatter: the receive counts sum to {total}, "
                f"but ranks send {wrong} elements (rank: count)"
            )
        return counts

    def _reduce_scatter(
        self, sendbuf: Any, rspec: buffers.Spec, counts: list[int], op: ops.Op
    ) -> None:
        """Reduce_scatter(_block) once the counts are known: every argument is checked
        before any data moves. ValueError, as mpi4py, when sendbuf's datatype is not
        recvbuf's, its count not sum(counts), or recvbuf's count not counts[rank] (with
        IN_PLACE: recvbuf's count not sum(counts))."""
        size, rank = self._sizes()
        area.bound(self)  # (every member binds before an argument error: see area.bound)
        datatype = rspec.datatype
        total = sum(counts)
        if sendbuf is IN_PLACE:
            if rspec.count != total:
                raise ValueError(
                    f"mismatch in receive count {rspec.count} and sum(recvcounts) {total}"
                )
            full = _array(rspec.view, datatype)  # (the result lands on its first block)
        else:
            sspec = buffers.parse(sendbuf)
            _same_message(sspec, rspec._replace(count=total), "sum(recvcounts)")
            if rspec.count != counts[rank]:
                raise ValueError(
                    f"mismatch in receive count {rspec.count} and recvcounts[{rank}] {counts[rank]}"
                )
            full = _array(sspec.view, datatype)
        if len(full) < total:
            raise ValueError(f"Reduce_scatter: {len(full)} elements to send, {total} expected")
        out = _array(rspec.view, datatype)[: counts[rank]]  # (IN_PLACE: its first part)
        ufunc = area.ufunc_of(op, full)
        if self._area_run(
            lambda: (
                ("reduce_scatter", (full[:total], out, counts, ufunc))
                if ufunc is not None and self._fits(max(counts) * full.itemsize, split=True)
                else None
            )
        ):
            return
        starts = [sum(counts[:r]) for r in range(size)]
        blocks = [full[starts[r] : starts[r] + counts[r]] for r in range(size)]
        own, others = blocks[rank], [r for r in range(size) if r != rank]
        sends = [self._c_isend(_raw(blocks[r]), r, T_RSB) for r in others]
        # IN_PLACE: the result's place (recvbuf's first block) is this rank's operand at rank
        # 0, else it holds blocks sent to lower ranks, theirs until the sends complete: the
        # fold goes to a block of its own then.
        acc = np.empty_like(out) if sendbuf is IN_PLACE and rank and len(out) else out
        if np.may_share_memory(acc, own) or size == 1 or (size > 2 and not op.is_commutative):
            if not np.may_share_memory(acc, own):
                acc[...] = own
            self._fold_at_me(acc, op, datatype, T_RSB, range(size))
        else:  # one pass over own: at 2 ranks acc = the lower rank's block op the higher's
            sinks = (
                [self._combine_sink(acc, own, op, rank == 0, others[0])]
                if size == 2
                else self._first_combine_sinks(acc, own, op, datatype, others)
            )
            recvs = [self._c_irecv(None, r, T_RSB, sink)
                     for r, sink in zip(others, sinks, strict=True)]  # fmt: skip
            self._c_wait(recvs)
            whole(zip(others, recvs, strict=True), acc.nbytes, "rank")
        self._c_wait(sends)
        if acc is not out:
            out[...] = acc

    def _first_combine_sinks(
        self, acc: np.ndarray, own: np.ndarray, op: ops.Op, datatype: Any, sources: list[int]
    ) -> list[Callable[..., None]]:
        """The sinks of the `sources`' operands (a commutative op) folded into acc, which
        does not hold this rank's operand `own` yet: each source's pieces come in order
        from its first byte, so the elements that some source reached already
        ([0, reached)) hold own op what came there; a piece's elements past them are
        combined with own in one pass (acc = own op them), the rest folded in. MPI.Exception
        naming the rank for a piece outside acc (`_elements`)."""
        reached = [0]

        def sink_of(source: int) -> Callable[..., None]:
            def sink(offset: int, data: Any) -> None:
                start, operand = _elements(acc, offset, data, source)
                stop = start + len(operand)
                mid = max(start, min(reached[0], stop))
                if mid > start:
                    op.reduce_into(acc[start:mid], operand[: mid - start], datatype)
                if stop > mid:
                    op.combine_to(acc[mid:stop], own[mid:stop], operand[mid - start :])
                    reached[0] = stop

            return sink

        return [sink_of(r) for r in sources]

    @collective(fast=_f_scan, empty=_e_fold)
    def Scan(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> None:
        """Inclusive prefix fold along the ranks (a chain)."""
        self._scan(sendbuf, recvbuf, op, inclusive=True)

    @collective(fast=_f_exscan, empty=_e_fold)
    def Exscan(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> None:
        """Exclusive prefix fold; rank 0's recvbuf is left as it was."""
        self._scan(sendbuf, recvbuf, op, inclusive=False)

    def _scan(self, sendbuf: Any, recvbuf: Any, op: ops.Op, inclusive: bool) -> None:
        size, rank = self._sizes()
        name = "scan" if inclusive else "exscan"
        if size > 1 and self._area_run(lambda: self._p_fold(name, sendbuf, recvbuf, op)):
            return
        rspec = buffers.parse(recvbuf, writable=True)
        out = _array(rspec.view, rspec.datatype)
        local = out.copy() if sendbuf is IN_PLACE else _array(buffers.parse(sendbuf).view,
                                                               rspec.datatype)  # fmt: skip
        tag = T_SCAN if inclusive else T_EXSCAN
        if rank == 0:
            running = local
            if inclusive:
                out[...] = local
        else:
            prefix = np.empty_like(out)
            got = self._c_irecv(_raw(prefix), rank - 1, tag)
            self._c_wait([got])
            whole([(rank - 1, got)], out.nbytes, "rank")
            running = np.empty_like(out)
            op.combine_to(running, prefix, local)
            out[...] = running if inclusive else prefix
        if rank + 1 < size:
            self._c_wait([self._c_isend(_raw(running), rank + 1, tag)])

    # ------------------------------------------------------------------ nonblocking
    def _nonblocking(
        self,
        stages: Callable[[int], Iterator[list[Op]]],
        plan: Plan | None = None,
        declined: Callable[[int], Iterator[list[Op]]] | None = None,
    ) -> Request:
        """A Request for a nonblocking collective whose stages `stages(tag)` yields (those of
        `declined(tag)`, where given, after an area round this member declined). The
        instance takes its number (and tag: its own, so that its messages never match those
        of another collective) before anything can fail, so every member numbers it alike.
        If it fails on this rank (at the call, or later in a stage), it is abandoned as a
        blocking one is (see the module docstring): the other members' requests then
        complete with MPI.Exception(ERR_OTHER) instead of waiting."""
        engine = self._live()
        seq, self._nb_seq = self._nb_seq, self._nb_seq + 1
        tag = T_NONBLOCKING + seq % NONBLOCKING_TAGS
        if len(self._group) < 2:
            return Request(engine.start_staged(StagedOp(stages(tag), None, self._ctx)), engine)
        abandon = functools.partial(_nb_abandon, self, engine, seq)
        gone = engine.abandoned_already(self._ctx + 1, tag, seq)
        if gone is not None:
            area.failed(self)
            raise exceptions.Exception(*gone)
        shared = area.current(self) if plan is not None else None
        try:
            job = plan() if shared is not None and plan is not None else None  # (args checked)
            if shared is not None and job is not None:
                # (declined: its messages fail through this op, which abandons it)
                rest = functools.partial(stages if declined is None else declined, tag)
                then = functools.partial(_on_messages, engine, rest)
                op = StagedOp(self._area_stages(shared, job, then), abandon, self._ctx)
                engine.start_staged(op)
                return area.AreaRequest(op, engine)
            op = StagedOp(stages(tag), abandon, self._ctx)
            engine.start_staged(op)
        except Exception as exc:
            abandon(abandon_class(exc), f"{type(exc).__name__}: {exc}")
            raise
        return Request(op, engine)

    @started(_a_barrier)
    def Ibarrier(self) -> Request:
        """Start a barrier; return the Request, complete once every rank has entered it.

        In the collective area, else by dissemination: ceil(log2 size) rounds of empty messages.
        """
        return self._nonblocking(self._barrier, lambda: ("barrier", ()))

    @started(_a_bcast, None, _e_bcast)
    def Ibcast(self, buf: Any, root: int = 0) -> Request:
        """Start a broadcast of a buffer from `root`; return the Request.

        A binomial tree; `buf` is not to be touched until the request completes.
        """
        size, rank = self._sizes()

        def steps(tag: int) -> Iterator[list[Op]]:
            self._root(root)
            view = buffers.parse(buf, writable=rank != root).view
            rel = (rank - root) % size
            mask = 1
            while mask < size:
                if rel & mask:
                    yield [self._c_irecv(view, (rank - mask) % size, tag)]
                    break
                mask <<= 1
            children = []
            mask >>= 1
            while mask > 0:
                if rel + mask < size:
                    children.append(self._c_isend(view, (rank + mask) % size, tag))
                mask >>= 1
            yield children

        return self._nonblocking(steps, functools.partial(self._p_bcast, buf, root))

    @started(_a_allreduce, None, _e_fold)
    def Iallreduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> Request:
        """Start an Allreduce; return the Request.

        Large operands of a commutative op as Allreduce's (a reduce-scatter, then an
        allgather); others: rank 0 folds every operand (`_fold_at`) and sends the result to
        all. The same bits everywhere.
        """
        size, rank = self._sizes()

        def steps(tag: int) -> Iterator[list[Op]]:
            rspec, out, local = self._operands(sendbuf, recvbuf, copy=False)
            if _in_blocks(op, out, size):
                yield from self._allreduce_blocks(local, out, op, rspec.datatype, tag, tag)
                return
            if local is out:
                local = out.copy()
            result = [] if rank == 0 else [self._c_irecv(rspec.view, 0, tag)]
            yield from self._fold_at(local, out, op, rspec.datatype, 0, tag, result)
            if rank == 0:
                yield [self._c_isend(rspec.view, r, tag) for r in range(1, size)]

        plan = functools.partial(self._p_fold, "allreduce", sendbuf, recvbuf, op)
        return self._nonblocking(steps, plan)

    @started(_a_reduce, None, _e_reduce)
    def Ireduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM, root: int = 0) -> Request:
        """Nonblocking Reduce: `root` folds every operand.

        A commutative op folds them as they arrive, read in place; another in rank order.
        """
        _, rank = self._sizes()

        def steps(tag: int) -> Iterator[list[Op]]:
            self._root(root)
            if rank == root:
                rspec = buffers.parse(recvbuf, writable=True)
                datatype = rspec.datatype
                out: np.ndarray | None = _array(rspec.view, datatype)
                if sendbuf is IN_PLACE:
                    local = _array(rspec.view, datatype).copy()
                else:
                    local = _array(buffers.parse(sendbuf).view, datatype)
            else:
                sspec = buffers.parse(sendbuf)
                out, datatype = None, sspec.datatype
                local = _array(sspec.view, datatype)
            yield from self._fold_at(local, out, op, datatype, root, tag)

        return self._nonblocking(
            steps, functools.partial(self._p_reduce, sendbuf, recvbuf, op, root)
        )

    def _fold_at(
        self,
        local: np.ndarray,
        out: np.ndarray | None,
        op: ops.Op,
        datatype: Any,
        root: int,
        tag: int,
        also: list[Op] | None = None,
    ) -> Iterator[list[Op]]:
        """Stages of a fold of every rank's `local` at `root` into `out` there: a
        commutative op folds each operand as it arrives, read in place (as Reduce); another
        in rank order (x0 op x1 op ...). `also`: operations this rank waits for with its
        first stage."""
        size, rank = self._sizes()
        if rank != root:
            yield [self._c_isend(_raw(local), root, tag), *(also or [])]
            return
        assert out is not None
        if op.is_commutative:
            out[...] = local
            errors: list[Exception] = []
            others = [r for r in range(size) if r != root]
            folds = {}
            for r in others:
                sink = _kept(self._reduce_sink(out, op, datatype, r), errors)
                folds[r] = self._c_irecv(None, r, tag, sink)
            yield [*folds.values(), *(also or [])]
            _raise_first(errors)
            whole(folds.items(), out.nbytes, "rank")
            return
        operands = {r: np.empty_like(local) for r in range(size) if r != root}
        recvs = {r: self._c_irecv(_raw(operands[r]), r, tag) for r in operands}
        yield [*recvs.values(), *(also or [])]
        whole(recvs.items(), local.nbytes, "rank")
        operands[root] = local
        result = operands[size - 1].copy()
        for r in reversed(range(size - 1)):
            op.reduce_into(result, operands[r], datatype)
        out[...] = result


def _check_blocks(size: int, *specs: Any) -> None:
    """Alltoall's check of its specs (buffers.check_blocks), skipped for a numpy array of
    whole blocks (which passes it)."""
    for spec in specs:
        if type(spec) is not np.ndarray or spec.nbytes % (size * spec.itemsize or 1):
            buffers.check_blocks(spec, size)


def _block_bytes(buf: Any, size: int) -> int:
    """The bytes of the largest of the `size` blocks of an Alltoall's receive buffer
    argument (errors as buffers.parse_vector's)."""
    if type(buf) is np.ndarray:
        return buf.nbytes // size
    lane = _lane(buf, True, size)
    if lane is not None:
        return lane[1] // size
    spec = buffers.parse_vector(buf, size, writable=True)
    return max(spec.counts, default=0) * spec.datatype.Get_size()


def _kept(sink: Callable[[int, Any], None], errors: list[Exception]) -> Callable[..., None]:
    """`sink` (a receive's, see RecvOp) that notes its error in `errors` and takes no more
    pieces, where it would raise inside the engine's progress (which any call of the
    process may run): the stage that waits for the receive raises it (`_raise_first`)."""

    def kept(offset: int, data: Any) -> None:
        if not errors:
            try:
                sink(offset, data)
            except Exception as exc:
                errors.append(exc)

    return kept


def _raise_first(errors: list[Exception]) -> None:
    """Raise the first error a `_kept` sink noted, if any."""
    if errors:
        raise errors[0]


def _in_blocks(op: ops.Op, out: np.ndarray, size: int) -> bool:
    """Whether an Allreduce into `out` on messages is a reduce-scatter and an allgather
    (Collectives._allreduce_blocks): a commutative op, a large operand, a block per rank."""
    return op.is_commutative and out.nbytes >= RSAG_MIN and len(out) >= size


def _over_a_round(shared: area.Area, buf: Any, size: int) -> bool:
    """Whether the blocks of an Alltoall's receive buffer argument are over one segment of
    the area; False for an argument that does not resolve, whose error Alltoallv then raises
    as the collective's (so that the other members learn of it, see the module docstring)."""
    try:
        return _block_bytes(buf, size) > shared.group._scatter_segment()
    except Exception:
        return False


def _elements(acc: np.ndarray, offset: int, data: Any, source: int) -> tuple[int, np.ndarray]:
    """(first element, the elements) of a piece of rank `source`'s operand that lands at
    byte `offset` of `acc`. MPI.Exception(ERR_TRUNCATE) naming the rank for a piece that
    is not whole elements inside acc (a longer operand, or one cut mid-element)."""
    start, rest = divmod(offset, acc.itemsize)
    n, cut = divmod(len(data), acc.itemsize)
    if rest or cut or start + n > len(acc):
        raise exceptions.Exception(exceptions.ERR_TRUNCATE, f"rank {source} sent {len(data)} "
                                   f"operand bytes at byte {offset} of {acc.nbytes}")  # fmt: skip
    return start, np.frombuffer(data, dtype=acc.dtype)


def whole(received: Iterable[tuple[int, Op]], nbytes: int, who: str) -> None:
    """MPI.Exception(ERR_TRUNCATE) naming the rank r of the first (r, op) of `received`
    (completed receives of operands) whose message was not `nbytes` long: the rest of its
    buffer holds no operand. `who` names the ranks ("rank", "Allreduce: remote rank")."""
    for r, op in received:
        if op.count != nbytes:
            raise exceptions.Exception(
                exceptions.ERR_TRUNCATE,
                f"{who} {r} sent {op.count} bytes where {nbytes} are expected",
            )


def _same_message(sspec: buffers.Spec, rspec: buffers.Spec, what: str = "receive count") -> None:
    """mpi4py's check of a reduction's messages: ValueError unless the send and receive
    specs have the same datatype and count (`what` names the receive side's count)."""
    if sspec.datatype != rspec.datatype:
        raise ValueError("mismatch in send and receive MPI datatypes")
    if sspec.count != rspec.count:
        raise ValueError(f"mismatch in send count {sspec.count} and {what} {rspec.count}")


def _received_parts(recvbuf: Any, size: int) -> buffers.VSpec:
    """An Allgather(v)'s writable recvbuf as parsed (`buffers.parse_vector`), where the
    caller parsed it already (a VSpec, never a user's argument) or not."""
    if type(recvbuf) is buffers.VSpec:
        return recvbuf
    return buffers.parse_vector(recvbuf, size, writable=True)


def reduce_scatter_counts(recvcounts: Any, size: int, sendbuf: Any) -> list[int] | None:
    """Reduce_scatter's `recvcounts` as `size` ints >= 0, or None when not given (each rank's
    recvbuf count is used then). ValueError for bad counts, and for none with IN_PLACE."""
    if recvcounts is None:
        if sendbuf is IN_PLACE:
            raise ValueError("Reduce_scatter: IN_PLACE needs recvcounts")
        return None
    counts = [int(c) for c in recvcounts]
    if len(counts) != size or min(counts) < 0:
        raise ValueError(f"Reduce_scatter: expecting {size} counts >= 0, got {counts}")
    return counts


def _M_IN_PLACE() -> Any:
    _M = native.MPI()
    return _M.IN_PLACE
