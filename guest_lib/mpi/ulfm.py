"""Fault tolerance: ULFM (the MPI-4 proposal, MPI-5's chapter) as mpi4py exposes it.

Failure detection: a member is *failed* when its peer slot in the region says so: DEAD
(the broker saw it vanish, or a peer marked it), LEFT or FREE (it closed its endpoint: an
uncaught exception, Abort_local) or READY with a holder process that no longer runs on
this kernel (os._exit, a signal: `PeerInfo.holder_alive`). Each look reads the slot and, for
a READY one, the holder's /proc entry. Members reached through mpi4py (another region)
are never seen failed: their slots are not in this region.

- `Get_failed` gives the Group of the members seen failed so far (both groups of an
  intercommunicator), in the order this process noticed them; `Ack_failed(n)`
  acknowledges the first n of them (all by default) and returns how many are.
- `Revoke` marks the communicator revoked here and sends a REVOKE notice (a CONTROL message
  naming its point-to-point context) to every other member on shared memory; a member
  that takes one marks it revoked too. Revoked: receives posted on it complete with
  ERR_REVOKED, and every later call on it (point-to-point, probes, collectives) raises
  ERR_REVOKED, except these fault-tolerance calls, Free and queries. The notice names the
  communicator's generation too (matching.Matching.reuse_context): one about a freed
  communicator is ignored, also where a later communicator holds its context now (its
  sender may be outside the agreement that took the context again), and one about a
  communicator not taken here yet waits for it.
- `Agree(flag)` / `Iagree(buf)`: the bitwise AND of the flags (C ints) of the members
  that are alive, on a revoked communicator too. Every member sends its flag to every
  other one it does not know failed (tags from T_FT on the collective context, a block
  of them per call, numbered alike on every member) and waits for each one's flag or its
  failure (a look at the slots every CHECK_S); then a second round the same way with the
  AND each got, whose AND is the result. MPI.Exception(ERR_PROC_FAILED) afterwards if a
  member is failed and not acknowledged (the flag, in the Iagree buffer, is still the
  AND). A member that dies in the first round having sent its flag to some survivors
  only is absorbed by the second (every survivor ANDs every survivor's first result);
  this is not ULFM's consensus: a death in the middle of the second round can still
  leave survivors disagreeing.
- `Shrink` / `Ishrink`: a new communicator of the members alive, in the same order, with
  a new context (an intercommunicator: two, its own and its local group's), made in
  stages driven by progress (Shrink waits for them; Ishrink's communicator is a null
  handle until its request completes). The members exchange the failed sets they know
  (twice: a failure seen during the first exchange joins the second), then agree on a
  context as Idup does (collectives_extra._agree_context: reserve the highest pair free
  in the union of the maps, confirm, fence) with these exchanges in place of messages to
  every member. In a job over several regions the mpi4py mirrors are duplicated by
  mpi4py's Idup; with a failed member there, ERR_PROC_FAILED (they cannot be shrunk).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from guest_lib.mpi import exceptions, wire
from guest_lib.mpi.engine import StagedOp
from guest_lib.mpi.matching import Op, RecvOp
from ivshmem_comm import layout

if TYPE_CHECKING:
    from guest_lib.mpi.comm import Comm
    from guest_lib.mpi.engine import Engine

T_FT = wire.FT_TAGS_FROM  # tags from T_FT on a collective context: Agree / Shrink
FT_SPAN = 8  # tags of one Agree / Shrink (its exchanges take them in turn)
FT_BLOCKS = (1 << 15) // FT_SPAN  # Agree / Shrink calls before a block comes round again
CHECK_S = 0.05  # s: how often a wait for a member's message looks whether it failed
_GONE = (layout.PEER_FREE, layout.PEER_LEFT, layout.PEER_DEAD)
_INT = 4  # bytes of an Agree flag (a C int)


def dead_worlds(engine: Engine, worlds: list[int]) -> list[int]:
    """The world ranks among `worlds` whose process failed (see the module docstring)."""
    ep = engine.ep
    if ep is None:
        return []
    dead = []
    for w in worlds:
        peer = engine.routes[w].peer
        if peer < 0:
            continue
        info = ep.region.peer(peer)
        if info.state in _GONE or (
            info.state == layout.PEER_READY and info.holder_alive() is False
        ):
            dead.append(w)
    return dead


def _everyone(comm: Comm) -> list[int]:
    """The world ranks of every member (an intercommunicator: local group, then remote)."""
    local = getattr(comm, "_local_group", None)
    return list(comm._group) if local is None else list(local) + list(comm._group)


def _links(comm: Comm) -> list[tuple[Comm, int, int]]:
    """(communicator, rank in it, world rank) of every other member: an intercommunicator
    reaches its local group through its local intra-communicator."""
    me = comm._check().world_rank
    local = getattr(comm, "_local", None)
    links = [(comm, r, w) for r, w in enumerate(comm._group) if w != me]
    if local is not None:
        links += [(local, r, w) for r, w in enumerate(local._group) if w != me]
    return links


def _noticed(comm: Comm) -> list[int]:
    """The failed members of `comm` in the order noticed here, updated now."""
    engine = comm._check()
    failed: list[int] = comm.__dict__.setdefault("_ft_failed", [])
    for w in dead_worlds(engine, _everyone(comm)):
        if w not in failed:
            failed.append(w)
    return failed


class Exchange(Op):
    """Every other member's message of one fault-tolerant exchange, or its failure: done
    once each receive is complete or its sender is seen failed (looked at every CHECK_S,
    when `done` is read). `got` maps world ranks to the bytes they sent; `lost` lists the
    members that failed instead."""

    __slots__ = ("engine", "got", "lost", "next_look", "pending", "sends")

    def __init__(self, comm: Comm, data: bytes, skip: list[int], tag: int) -> None:
        super().__init__()
        engine = comm._check()
        self.engine = engine
        self.got: dict[int, bytes] = {}
        self.lost: list[int] = list(skip)
        self.pending: dict[int, RecvOp] = {}
        self.sends: list[Op] = []
        self.next_look = 0.0
        view = memoryview(data)
        for link, rank, world in _links(comm):
            if world in skip:
                continue
            route = link._route[rank]
            op = RecvOp(link._ctx + 1, world, tag, None, None, route.peer)
            self.pending[world] = route.post(link, op, rank)
            try:
                self.sends.append(route.isend(link, view, rank, tag, link._ctx + 1, False))
            except exceptions.Exception:
                self._lose(world)

    def _lose(self, world: int) -> None:
        op = self.pending.pop(world, None)
        if op is not None and not op.done:
            op.cancel(self.engine)
        if world not in self.lost:
            self.lost.append(world)

    def _settle(self) -> bool:
        for world, op in list(self.pending.items()):
            if op.done:
                del self.pending[world]
                if op.error or op.cancelled:
                    self._lose(world)
                else:
                    self.got[world] = bytes(op.obj)
        if self.pending and time.monotonic() >= self.next_look:
            self.next_look = time.monotonic() + CHECK_S
            for world in dead_worlds(self.engine, list(self.pending)):
                self._lose(world)
        return not self.pending

    @property
    def done(self) -> bool:
        return self._settle()

    @done.setter
    def done(self, value: bool) -> None:
        pass  # (Op.__init__ sets it: completion is computed)


def _ft_tags(comm: Comm) -> Iterator[int]:
    """The tags of the exchanges of a new Agree or Shrink on `comm`, taken at its call:
    the calls are numbered alike on every member (MPI orders collective calls), while
    their exchanges may start in another order relative to other calls' (they advance
    with progress). A call's exchanges run one after another on every member, so its
    FT_SPAN tags can come round within it (messages of one sender and tag match in
    order)."""
    seq = comm.__dict__.get("_ft_seq", 0)
    comm.__dict__["_ft_seq"] = seq + 1
    base = T_FT + seq % FT_BLOCKS * FT_SPAN
    return itertools.cycle(range(base, base + FT_SPAN))


def revoke(comm: Comm) -> None:
    """Comm.Revoke: see the module docstring. MPI.Exception(ERR_COMM) on COMM_NULL."""
    engine = comm._check()
    me = engine.world_rank
    if not engine.revoke(comm._ctx, f"revoked by world rank {me}"):
        return
    payload = wire.REVOKE.pack(comm._ctx, comm._gen)
    for w in _everyone(comm):
        peer = engine.routes[w].peer
        if w != me and peer >= 0:
            try:
                engine.send_control(peer, wire.CTRL_REVOKE, payload)
            except exceptions.Exception:
                pass  # (a failed member: it waits for nothing)


def is_revoked(comm: Comm) -> bool:
    """Return whether this process knows the communicator revoked (Comm.Is_revoked).

    Revoked by a call here or a notice from another member; a progress pass runs first.
    """
    engine = comm._check()
    engine.progress()
    return comm._ctx in engine.revoked


def get_failed(comm: Comm) -> Any:
    """Comm.Get_failed: a new Group of the members seen failed (module docstring)."""
    from guest_lib.mpi.group import Group

    return Group(list(_noticed(comm)), comm._check().world_rank)


def ack_failed(comm: Comm, num_to_ack: int | None = None) -> int:
    """Acknowledge the first `num_to_ack` failed members (Comm.Ack_failed; None: all of them).

    Returns how many are acknowledged. MPI.Exception(ERR_ARG) for a negative count.
    """
    failed = _noticed(comm)
    wanted = len(failed) if num_to_ack is None else int(num_to_ack)
    if wanted < 0:
        raise exceptions.Exception(exceptions.ERR_ARG, f"Ack_failed({wanted})")
    acked = max(comm.__dict__.get("_ft_acked", 0), min(wanted, len(failed)))
    comm.__dict__["_ft_acked"] = acked
    return acked


def _unacked_error(comm: Comm) -> int:
    failed = _noticed(comm)
    return exceptions.ERR_PROC_FAILED if len(failed) > comm.__dict__.get("_ft_acked", 0) else 0


def iagree(comm: Comm, flag: Any) -> Any:
    """Start an agreement on `flag`; return the request (Comm.Iagree).

    The request writes into `flag` (a buffer of one C int) the AND of the members' flags (module
    docstring). TypeError for a non-buffer, ValueError for a buffer that is not one C int.
    """
    from guest_lib.mpi.request import Request

    engine = comm._check()
    view = memoryview(flag)
    if view.nbytes != _INT or view.readonly:
        raise ValueError(f"Iagree: expecting a writable buffer of one C int, got {view.nbytes}")
    view = view.cast("B")
    mine = int.from_bytes(view, "little", signed=True)
    skip = list(_noticed(comm))
    tags = _ft_tags(comm)

    def stages() -> Iterator[list[Op]]:
        first = Exchange(comm, bytes(view), skip, next(tags))
        yield [first]
        value = _and_of(first, mine)
        flag = value.to_bytes(_INT, "little", signed=True)
        second = Exchange(comm, flag, first.lost, next(tags))
        yield [second]
        value = _and_of(second, value)
        view[:] = value.to_bytes(_INT, "little", signed=True)
        noticed = _noticed(comm)
        noticed.extend(w for w in second.lost if w not in noticed)
        op.error = _unacked_error(comm)  # (the request raises it, the flag written)
        if op.error:
            op.reason = f"Agree: world ranks {noticed} failed, not all acknowledged"

    op = StagedOp(stages())
    engine.start_staged(op)
    return Request(op, engine)


def _and_of(exchange: Exchange, value: int) -> int:
    """`value` AND every flag `exchange` got. MPI.Exception(ERR_INTERN) naming the sender
    of one that is not a C int."""
    for world, data in exchange.got.items():
        if len(data) != _INT:
            raise exceptions.Exception(
                exceptions.ERR_INTERN, f"Agree: world rank {world} sent {len(data)} bytes"
            )
        value &= int.from_bytes(data, "little", signed=True)
    return value


def agree(comm: Comm, flag: int) -> int:
    """Comm.Agree: the AND of the members' `flag`s (C ints; module docstring)."""
    buf = bytearray(int(flag).to_bytes(_INT, "little", signed=True))
    iagree(comm, buf).Wait()
    return int.from_bytes(buf, "little", signed=True)


def _bits(worlds: list[int]) -> bytes:
    value = 0
    for w in worlds:
        value |= 1 << w
    return value.to_bytes((max(worlds, default=0) + 8) // 8, "little")


def shrink(comm: Comm) -> Any:
    """Return a new communicator of the members alive (Comm.Shrink; module docstring).

    An Intercomm for an intercommunicator (COMM_NULL when a whole group failed).
    MPI.Exception(ERR_PROC_FAILED) when members failed and the communicator reaches others through
    mpi4py (its mirrors cannot be shrunk).
    """
    made, request = ishrink(comm)
    request.Wait()
    return made


def ishrink(comm: Comm) -> tuple[Any, Any]:
    """Start a Shrink; return (the new communicator, a request) (Comm.Ishrink).

    The communicator is a null handle until the request completes, then Shrink's (module docstring),
    driven by progress.
    """
    from guest_lib.mpi import native
    from guest_lib.mpi.collectives_extra import ExtraCollectives
    from guest_lib.mpi.comm import Intracomm
    from guest_lib.mpi.intercomm import Intercomm
    from guest_lib.mpi.request import Request

    engine = comm._check()
    local = getattr(comm, "_local", None)
    new: Any = Intracomm() if local is None else Intercomm()
    # the mpi4py mirrors (hybrid jobs) are duplicated by mpi4py's Idup, started at the call
    starts = [comm] if local is None else [comm, local]
    mirrors = [(c._mirror.Idup(), c._mirror_coll.Idup()) if c._mirror else None for c in starts]
    failed = set(_noticed(comm))
    tags = _ft_tags(comm)

    def exchange(data: bytes, tag: int) -> Generator[list[Op], None, list[bytes]]:
        done = Exchange(comm, data, sorted(failed), next(tags))
        yield [done]
        return list(done.got.values())

    def stages() -> Iterator[list[Op]]:
        for _ in range(2):  # the failed sets: a failure seen in the first joins the second
            done = Exchange(comm, _bits(sorted(failed)), sorted(failed), next(tags))
            yield [done]
            failed.update(done.lost)
            for data in done.got.values():
                bits = int.from_bytes(data, "little")
                failed.update(w for w in range(bits.bit_length()) if bits >> w & 1)
        noticed = _noticed(comm)
        noticed.extend(w for w in sorted(failed) if w not in noticed)
        if failed and any(mirrors):
            op.error = exceptions.ERR_PROC_FAILED
            op.reason = (
                f"Shrink: world ranks {sorted(failed)} failed, and {comm!r} reaches members "
                "through mpi4py, whose communicators cannot be shrunk here"
            )
            return
        inner: Any = comm  # (an Intercomm too: _agree_context needs only what Comm has)
        agree = functools.partial(ExtraCollectives._agree_context, inner, 0, exchange)
        ctx = yield from agree()
        started = [request for pair in mirrors if pair for _, request in pair]
        if started:
            yield [native.track(engine, native.MpiOp(request)) for request in started]
        made = [(pair[0][0], pair[1][0]) if pair else (None, None) for pair in mirrors]
        if local is None:
            group = [w for w in comm._group if w not in failed]
            Intracomm.__init__(new, engine, group, ctx, *made[0])
            return
        local_ctx = yield from agree()
        mine = [w for w in comm._local_group if w not in failed]  # type: ignore[attr-defined]
        theirs = [w for w in comm._group if w not in failed]
        if not theirs:  # the whole remote group failed: COMM_NULL
            with engine.lock:
                engine.drop_context((ctx, ctx + 1, local_ctx, local_ctx + 1))
            return
        own = Intracomm(engine, mine, local_ctx, *made[1])
        mirror, mirror_coll = made[0]
        low = getattr(comm, "_low", False)
        Intercomm.__init__(new, engine, mine, theirs, ctx, own, mirror, mirror_coll, low)

    op = StagedOp(stages())
    engine.start_staged(op)
    return new, Request(op, engine)
