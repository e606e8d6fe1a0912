"""Communicators: point-to-point operations and communicator management.

A communicator is a group of world ranks (index = rank in the communicator) and a context
id: `ctx` (even) carries point-to-point traffic and `ctx + 1` the collectives, so the two
never match each other. Context ids are agreed on by the members (a bitwise OR of the ids
each member has in use, reduced over the parent) and recycled by Free. 0/1 belong to
COMM_WORLD, 2/3 to COMM_SELF. When some member pairs talk through mpi4py (no shared
region), the communicator keeps mpi4py mirrors (`_mirror` for p2p, `_mirror_coll` for
collectives) with the same group and rank order, made by the same Dup/Split.

Lowercase methods move Python objects (pickled, protocol 5, like mpi4py); uppercase ones move
buffers given as message specs (see `buffers`). Blocking calls take a fast path straight
into the core when the engine has nothing else in flight (see `engine`).
"""

from __future__ import annotations

import operator
import os
import sys
import time
import warnings
import zlib
from _thread import _count
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import numpy as np

from guest_lib.mpi import (
    area,
    attributes,
    buffers,
    constants,
    errhandler,
    exceptions,
    memory,
    message,
    native,
    partitioned,
    persistent,
    ulfm,
)
from guest_lib.mpi.collectives import T_BARRIER, Collectives, complete_started, front_lanes
from guest_lib.mpi.collectives_extra import ExtraCollectives
from guest_lib.mpi.engine import Engine
from guest_lib.mpi.fastpath import FAST_TIMEOUT
from guest_lib.mpi.handles import Handle
from guest_lib.mpi.matching import CLOCK_SHIFT, OFFER_BYTES, DoneOp, Op, RecvOp, merge_offers
from guest_lib.mpi.pickling import PICKLE as _PICKLE
from guest_lib.mpi.pickling import dumps as _dumps
from guest_lib.mpi.pickling import flat as _flat_bytes
from guest_lib.mpi.pickling import load_view as _load_view
from guest_lib.mpi.pickling import loads as _loads
from guest_lib.mpi.pickling import parts as _pickle_parts
from guest_lib.mpi.request import Request, new_request, request_of, unpickle
from guest_lib.mpi.routes import ANY, Route, fast_done
from guest_lib.mpi.status import Status
from guest_lib.service_threads import running as _service
from ivshmem_comm import ring

# numpy's own dtype objects of the arrays the fast paths hand to the core as they are (plain
# numbers in the machine's byte order), by id (the dict holds them: the ids stay theirs). An
# equal dtype that is another object (made with metadata, say) is not here: such an array
# takes buffers.quick, which decides the same from its buffer format.
_PLAIN_DTYPES = {id(dtype): dtype for dtype in map(np.dtype, "?bBhHiIlLqQefdgFDG")}
_CTX_SHIFT = constants.TAG_BITS
_quick, _SIZES = buffers.quick_parts()  # buffers.quick(b, w) is _quick(b, w, _SIZES)
_NDARRAY = np.ndarray  # (tested before _plain_array's call: the specs skip it)
_DECLINE_BIT = constants.MAX_CONTEXT + 1  # in a context map: "not my turn, agree again"
T_GROUP = 1 << 16  # tags T_GROUP + n on a collective context: Create_group (tag n)
_EMPTY = memoryview(b"")
_post_recv = ring.post_recv  # Irecv's post in C (None on the pure-Python path)
_irecv_post = ring.irecv_post  # Irecv's checks and post in one C call (see Comm._irecv_at)
_isend_post = ring.isend_post  # Isend's lane send and request in one C call (Comm._isend_at)
_WAIT = FAST_TIMEOUT  # s: how long a blocking send's fast path waits for room in the queue
_ROUTE_POST = Route.post  # the routes whose post is the engine's (not mpi4py's)
# The op of every nonblocking send written whole at once (Isend's fast path): complete, and
# no field of a complete op is written again (Cancel and Free leave it), so one serves all.
_SENT = DoneOp(constants.ANY_SOURCE, constants.ANY_TAG)
_NO_SPAWN = (
    "Spawn is not supported by guest_lib.mpi: start every process with ivshmem-run or "
    "mpiexec (mpi4py.futures: python -m mpi4py.futures prog.py)"
)


class Comm(attributes.Cached, Handle):
    """Base communicator (mpi4py's `Comm`); see the module docstring."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Create a handle, bound at once to `comm` when one is given.

        `Comm.__new__(cls, comm)` binds it to `comm` here, as mpi4py's does: __init__ then leaves it
        bound, whatever it is given (a subclass whose __new__ passes `comm.Clone()` on, as
        mpi4py.util.pkl5's and test_subclass's do, keeps the clone, not the argument given to the
        class). Other arguments are __init__'s.
        """
        self = super().__new__(cls)
        if len(args) == 1 and not kwargs and isinstance(args[0], Comm):
            self._bind(args[0])
        return self

    def __init__(
        self,
        engine: Engine | Comm | None = None,
        group: list[int] | None = None,
        ctx: int = -1,
        mirror: Any = None,
        mirror_coll: Any = None,
        name: str = "",
    ) -> None:
        """Make a null handle, a handle on another communicator, or a new communicator.

        mpi4py's forms: `Comm()` a null handle (equal to COMM_NULL), `Comm(comm)` a new handle on
        the communicator of `comm` (equal to it); TypeError for anything else. Internally: the
        communicator of world ranks `group` over `engine`, context `ctx`.
        """
        if isinstance(engine, Comm):
            if "_null" not in self.__dict__:  # (not bound by __new__ already)
                self._bind(engine)
            return
        if engine is not None and not isinstance(engine, Engine):
            raise TypeError(f"expecting a communicator, got {type(engine).__name__}")
        group = [] if group is None else group
        self._engine = engine
        self._group = group
        self._ctx = ctx
        self._mirror = mirror
        self._mirror_coll = mirror_coll
        self._name = name
        self._null = engine is None
        if engine is not None:
            self._rank = self._own_rank(group, engine.world_rank)
            self._rank_of = {w: i for i, w in enumerate(group)}
            self._route: list[Route] = [engine.routes[w] for w in group]
            self._has_mpi = any(not route.local for route in self._route)
            # the route of each rank and of ANY_SOURCE (receives)
            self._src_route = dict(enumerate(self._route))
            self._src_route[constants.ANY_SOURCE] = self._any_route()
            self._shm_peer = {  # comm rank -> core peer id, for ranks on shared memory
                r: route.peer for r, route in enumerate(self._route) if route.peer >= 0
            }
        else:
            self._shm_peer = {}
            self._rank, self._rank_of, self._route, self._has_mpi = -1, {}, [], False
            self._src_route = {}
        self._hier: Any = None  # (local comm, leaders' mpi4py comm, leader of each rank)
        self._nb_seq = 0  # nonblocking collectives started (the same count on every member)
        self._coll_seq = 0  # blocking collectives started (the same count on every member)
        self._coll_base = 0  # the tag base of the blocking collective running
        self._coll_active = False
        self._coll_gone: tuple[int, str] | None = None
        # the generation of its contexts (matching.Matching.reuse_context): its ABANDONs name it
        self._gen = engine.ctx_gen.get(ctx, 0) if engine is not None else 0
        self._area: Any = None  # its collective area: see area.py (None: not bound yet)
        self._area_claim: Any = None  # a dropped area whose slot this rank holds until Free
        # Irecv's one-call post (ring.irecv_post) by source: the tuple of what its Python path
        # looked up for a source whose route posts with the engine (Route.post), made there on
        # the first such Irecv; emptied where that path changes (Free, a revoke)
        self._irecv_at: dict[int, tuple[Any, ...]] = {}
        # Isend's one-call send (ring.isend_post) by destination: (lane, peer, ctx, _SENT) of
        # a rank on shared memory, made on the first Isend to it (or the first send, isend or
        # recv of an object, whose C fronts read it too: ring.obj_methods); emptied with
        # _shm_peer
        self._isend_at: dict[int, tuple[Any, ...]] = {}

    def _bind(self, comm: Comm) -> None:
        """Make this new handle another handle on `comm`'s communicator.

        The two share every attribute (TypeError where the kinds differ, see intercomm.share).
        """
        from guest_lib.mpi import intercomm

        intercomm.share(self, comm)

    if TYPE_CHECKING:  # from Collectives, which every communicator but COMM_NULL mixes in

        def _allreduce_int_or(self, value: int) -> int: ...
        def allgather(self, sendobj: Any) -> list[Any]: ...
        def _run(self, stages: Any) -> None: ...
        def _barrier(self, tag: int) -> Any: ...

    def _own_rank(self, group: list[int], world_rank: int) -> int:
        """This process's rank (an Intercomm's is in its local group, not in `group`)."""
        return group.index(world_rank)

    def _any_route(self) -> Route:
        """Return the route that ANY_SOURCE receives take.

        `ANY` without mpi4py-routed ranks; the mpi4py route when no rank is on shared memory
        (blocking calls may go straight to mpi4py), else one that posts receives matched on both
        sides.
        """
        if not self._has_mpi:
            return ANY
        return native.MpiRoute(direct=all(route.peer < 0 for route in self._route))

    # ------------------------------------------------------------------ basics
    def _check(self) -> Engine:
        if self._engine is None:
            raise exceptions.Exception(exceptions.ERR_COMM, "null communicator")
        return self._engine

    def _live(self) -> Engine:
        """Return the engine, as _check, but refuse a revoked communicator.

        MPI.Exception(ERR_REVOKED) once this communicator is revoked (see `ulfm`: every operation
        but the fault-tolerance ones raises it); MPI.Exception(ERR_COMM) on COMM_NULL.
        """
        engine = self._check()
        if engine.revoked and self._ctx in engine.revoked:
            self._shm_peer = {}  # (the fast paths of Send and Recv: off, so they raise too)
            self._src_route = {}  # (Irecv's direct post: off)
            self._irecv_at, self._isend_at = {}, {}
            reason = engine.revoked[self._ctx]
            raise exceptions.Exception(exceptions.ERR_REVOKED, f"{self!r} is {reason}")
        return engine

    _keyvals = attributes.Keyvals("Comm")  # the attributes of communicators
    _check_attr_target = _check

    def Get_rank(self) -> int:
        """Return the rank of this process in the communicator.

        Raises MPI.Exception(ERR_COMM) on COMM_NULL.
        """
        self._check()
        return self._rank

    def Get_size(self) -> int:
        """Return the number of processes in the communicator.

        Raises MPI.Exception(ERR_COMM) on COMM_NULL.
        """
        self._check()
        return len(self._group)

    @property
    def rank(self) -> int:
        """Rank of this process in the communicator (Get_rank)."""
        return self.Get_rank()

    @property
    def size(self) -> int:
        """Number of processes in the communicator (Get_size)."""
        return self.Get_size()

    def Get_name(self) -> str:
        """Return the communicator's name.

        The name last given by Set_name (or the predefined one); "" when none was given, and
        "MPI_COMM_NULL" for a null handle without a name.
        """
        return self._name or ("MPI_COMM_NULL" if self._null else "")

    def Set_name(self, name: str) -> None:
        """Set the communicator's name, as Get_name and the `name` property return it.

        Local to this handle's communicator in this process; never raises.
        """
        self._name = name

    @property
    def name(self) -> str:
        """Communicator name (Get_name, Set_name)."""
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        self._name = name

    def Is_inter(self) -> bool:
        """False; MPI.Exception(ERR_COMM) on COMM_NULL (so for Is_intra, Get_topology)."""
        self._check()
        return False

    def Is_intra(self) -> bool:
        """Return True: this is an intracommunicator.

        Raises MPI.Exception(ERR_COMM) on COMM_NULL.
        """
        self._check()
        return True

    @property
    def is_inter(self) -> bool:
        """False: this is an intracommunicator."""
        return False

    @property
    def is_intra(self) -> bool:
        """True: this is an intracommunicator."""
        return True

    def Get_topology(self) -> int:
        """Return the kind of topology attached: UNDEFINED for a plain communicator.

        Cartcomm, Graphcomm and Distgraphcomm return CART, GRAPH, DIST_GRAPH (see `topology`).
        Raises MPI.Exception(ERR_COMM) on COMM_NULL.
        """
        self._check()
        return constants.UNDEFINED

    @property
    def group(self) -> Any:
        """Get_group(): a new Group of this communicator's members."""
        return self.Get_group()

    def Get_info(self) -> Any:
        """A new Info holding the hints last given by Set_info (none are acted on)."""
        from guest_lib.mpi.info import Info

        return Info.Create(getattr(self, "_hints", None))

    def Set_info(self, info: Any) -> None:
        """Record `info`'s hints (a copy) for Get_info; none changes how this works."""
        self._hints = dict(info.items())

    def Dup_with_info(self, info: Any) -> Any:
        """Dup (collective) whose hints are `info`'s instead of this communicator's."""
        comm = self.Dup()
        comm.Set_info(info)
        return comm

    @property
    def info(self) -> Any:
        """Communicator info (Get_info)."""
        return self.Get_info()

    @info.setter
    def info(self, info: Any) -> None:
        self.Set_info(info)

    @property
    def topology(self) -> int:
        """Get_topology(): UNDEFINED, or CART, GRAPH, DIST_GRAPH (see topology.py)."""
        return self.Get_topology()

    @property
    def is_topo(self) -> bool:
        """False: no process topology (see topology.Topocomm)."""
        return False

    def Get_attr(self, keyval: int) -> Any:
        """Return the value of the attribute `keyval`.

        A predefined attribute (TAG_UB, HOST, IO, WTIME_IS_GLOBAL, UNIVERSE_SIZE, LASTUSEDCODE; None
        for others) or the value set for a key of Create_keyval (None if unset). MPI.Exception:
        ERR_COMM on COMM_NULL, ERR_KEYVAL for KEYVAL_INVALID.
        """
        self._check()
        if keyval == constants.KEYVAL_INVALID:
            raise exceptions.Exception(exceptions.ERR_KEYVAL, "Comm.Get_attr(KEYVAL_INVALID)")
        if keyval == constants.KEY_TAG_UB:
            return constants.TAG_UB
        if keyval in (constants.KEY_HOST, constants.KEY_IO):
            return constants.PROC_NULL if keyval == constants.KEY_HOST else constants.ANY_SOURCE
        if keyval == constants.KEY_WTIME_IS_GLOBAL:
            return False
        if keyval == constants.KEY_UNIVERSE_SIZE:  # no Spawn: the universe is the world
            return self._check().world_size
        if keyval == constants.KEY_LASTUSEDCODE:
            return exceptions.last_used_code()
        if self._keyvals.known(keyval):
            return self._keyvals.get(self, keyval)
        return None  # APPNUM among them: one program, no MPMD application number to give

    def __bool__(self) -> bool:
        return not self._null

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Comm):
            return NotImplemented
        if self._null or other._null:
            return self._null and other._null
        return self._ctx == other._ctx and self._group == other._group

    def _key(self) -> Hashable:
        return None if self._null else (self._ctx, tuple(self._group))

    def __reduce__(self) -> Any:
        """Pickle the predefined communicators by name; refuse any other.

        COMM_WORLD, COMM_SELF and COMM_NULL unpickle as themselves (a new handle on one as an equal
        new handle of this class); any other communicator raises ValueError, as in mpi4py.
        """
        from guest_lib.mpi import MPI

        for name in ("COMM_NULL", "COMM_WORLD", "COMM_SELF"):
            predefined = getattr(MPI, name)
            if self is predefined:
                return (_predefined, (name,))
            if self == predefined:
                return (type(self), (predefined,))
        raise ValueError(f"cannot serialize {self!r}: not a predefined communicator")

    def __repr__(self) -> str:
        if self._null:
            return "<Comm NULL>"
        return f"<Intracomm {self._name or 'ctx=' + str(self._ctx)} rank {self._rank}/{self.size}>"

    # ------------------------------------------------------------------ argument checks
    def _dest(self, rank: Any) -> int:
        """Return destination `rank` as an int (rank_arg).

        MPI.Exception(ERR_RANK) unless it is a rank of this communicator or PROC_NULL.
        """
        rank = rank_arg(rank)
        if not 0 <= rank < len(self._group) and rank != constants.PROC_NULL:
            raise exceptions.Exception(exceptions.ERR_RANK, f"rank {rank} of {len(self._group)}")
        return rank

    def _source(self, rank: Any) -> int:
        """Return source `rank` as an int (rank_arg).

        MPI.Exception(ERR_RANK) unless it is a rank of this communicator, ANY_SOURCE or PROC_NULL.
        """
        rank = rank_arg(rank)
        if (
            not 0 <= rank < len(self._group)
            and rank != constants.ANY_SOURCE
            and rank != constants.PROC_NULL
        ):
            raise exceptions.Exception(exceptions.ERR_RANK, f"rank {rank} of {len(self._group)}")
        return rank

    @staticmethod
    def _send_tag(tag: Any) -> int:
        """Return send `tag` as an int (rank_arg: mpi4py takes a float tag, truncated).

        MPI.Exception(ERR_TAG) unless it is in 0..TAG_UB; TypeError for a non-number.
        """
        tag = rank_arg(tag)
        if not 0 <= tag <= constants.TAG_UB:
            raise exceptions.Exception(
                exceptions.ERR_TAG, f"tag {tag} outside 0..{constants.TAG_UB}"
            )
        return tag

    @staticmethod
    def _recv_tag(tag: Any) -> int:
        """Return receive `tag` as an int (rank_arg).

        MPI.Exception(ERR_TAG) unless it is in 0..TAG_UB or ANY_TAG; TypeError for a non-number.
        """
        tag = rank_arg(tag)
        if not 0 <= tag <= constants.TAG_UB and tag != constants.ANY_TAG:
            raise exceptions.Exception(
                exceptions.ERR_TAG, f"tag {tag} outside 0..{constants.TAG_UB}"
            )
        return tag

    # ------------------------------------------------------------------ p2p internals
    def _isend_op(self, data: memoryview, dest: int, tag: int, ctx: int, sync: bool) -> Op:
        self._live()
        if dest == constants.PROC_NULL:
            return DoneOp()
        return self._route[dest].isend(self, data, dest, tag, ctx, sync)

    def _send_bytes(self, data: memoryview, dest: int, tag: int, ctx: int, sync: bool) -> None:
        self._live()
        if dest != constants.PROC_NULL:
            self._route[dest].send(self, data, dest, tag, ctx, sync)

    def _irecv_op(
        self,
        view: memoryview | None,
        source: int,
        tag: int,
        ctx: int,
        sink: Any = None,
    ) -> Op:
        self._live()
        if source == constants.PROC_NULL:
            return DoneOp(constants.PROC_NULL, constants.ANY_TAG)
        route = self._src_route[source]
        src = source if source == constants.ANY_SOURCE else self._group[source]
        return route.post(self, RecvOp(ctx, src, tag, view, sink, route.peer), source)

    def _recv_bytes(
        self, view: memoryview, source: int, tag: int, ctx: int, status: Status | None
    ) -> None:
        engine = self._live()
        route = self._src_route.get(source)  # None: PROC_NULL
        if route is not None and route.recv_into(self, view, source, tag, ctx, status):
            return
        op = self._irecv_op(view, source, tag, ctx)
        if not op.done:
            engine.wait(op)
        request_of(op, engine, self._rank_of)._fill(status)

    def _sole_source(self) -> int:
        """Return the rank the blocking receives' fast paths may take ANY_SOURCE as.

        That is the other rank of a two-member communicator (this process one of them) whose
        other member is on shared memory; else ANY_SOURCE. A message from this process itself
        waits in the engine's unexpected queue, and the fast paths run only while that queue
        is empty.
        """
        peers, group = self._shm_peer, self._group
        if len(peers) == 1 and len(group) == 2:  # (an engine: a peer; an Intercomm: not here)
            for rank in peers:
                if group[1 - rank] == self._engine.world_rank:  # type: ignore[union-attr]
                    return rank
        return constants.ANY_SOURCE

    def _recv_obj(self, source: int, tag: int, ctx: int, status: Status | None) -> Any:
        engine = self._live()
        rank = source if source != constants.ANY_SOURCE else self._sole_source()
        route = self._src_route.get(rank)  # None: PROC_NULL
        if route is not None:
            data = route.recv_bytes(self, rank, tag, ctx, status)
            if data is not None:
                return _loads(data)
        op = self._irecv_op(None, source, tag, ctx)
        if not op.done:
            engine.wait(op)
        return Request(op, engine, self._rank_of, unpickle)._fill(status)

    # ------------------------------------------------------------------ p2p objects
    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        """Send a picklable object (blocking; returns once the bytes are in the queue)."""
        peer = self._shm_peer.get(dest)
        if (
            peer is not None and type(tag) is int and 0 <= tag <= constants.TAG_UB
        ):  # fast path, as Send's
            engine: Engine = self._engine  # type: ignore[assignment]  # a peer: an engine
            lane, pickle = engine.lane, _PICKLE
            if lane is not None:  # pickled and sent in one C call, else its pickle back
                sent = lane.send_obj(peer, self._ctx, tag, obj, pickle._dumps, pickle._protocol)
                if sent is not True:
                    self._send_unsent(obj, dest, tag, peer, sent)
                return
            data = _dumps(obj)
            if engine.fast_send(peer, self._ctx << _CTX_SHIFT | tag, data):
                return
        else:
            dest = self._dest(dest)
            tag = self._send_tag(tag)
            data = _dumps(obj)
        self._send_bytes(data, dest, tag, self._ctx, False)

    def _send_unsent(self, obj: Any, dest: int, tag: int, peer: int, sent: Any) -> None:
        """Finish a send that the lane's send_obj left unsent.

        send(obj, dest, tag) to shm peer `peer` (of rank `dest`, `tag` a good one), where
        send_obj returned `sent` (not True: see _unsent), as send does: in the queue at once
        if it can be, else by the engine's paths. What those raise.
        """
        engine: Engine = self._engine  # type: ignore[assignment]  # a peer: an engine
        if (sent := self._unsent(engine, peer, tag, obj, sent, _WAIT)) is True:
            return
        data = _flat_bytes(sent)
        if not engine.fast_send(peer, self._ctx << _CTX_SHIFT | tag, data):
            self._send_bytes(data, dest, tag, self._ctx, False)

    def _unsent(
        self, engine: Engine, peer: int, tag: int, obj: Any, sent: Any, timeout: float
    ) -> Any:
        """Finish what the lane's send_obj left unsent.

        `sent` is send_obj's result for `obj` to shm peer `peer` (not True). Returns True
        once a bulky object (`sent` None: not pickled) went into the queue in its parts
        (pickling.parts, each copied once; waiting at most `timeout` s for room); else the
        pickle for the Python paths (bytes, or what a custom dumps made; a bulky object's
        parts joined, a copy of its own)."""
        if sent is not None:
            return sent
        parts, nbytes = _pickle_parts(obj)
        if engine.fast_send_parts(peer, self._ctx << _CTX_SHIFT | tag, parts, nbytes, timeout):
            return True
        return b"".join(parts)

    def ssend(self, obj: Any, dest: int, tag: int = 0) -> None:
        """Synchronous send: returns once the matching receive has started."""
        dest = self._dest(dest)
        tag = self._send_tag(tag)
        self._send_bytes(_dumps(obj), dest, tag, self._ctx, True)

    bsend = send
    rsend = send

    def recv(
        self,
        buf: Any = None,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> Any:
        """Receive and return an object.

        `buf` is ignored, as in mpi4py: an int (a size hint) silently, anything else with a
        UserWarning saying so. `status`, when given, is filled. MPI.Exception(ERR_RANK/ERR_TAG) for
        a bad source or tag.
        """
        if buf is not None and not isinstance(buf, int):
            warnings.warn("recv() ignores its buffer argument", UserWarning, stacklevel=2)
        rank = source if source != constants.ANY_SOURCE else self._sole_source()
        peer = self._shm_peer.get(rank)
        if (
            peer is not None
            and type(tag) is int
            and (0 <= tag <= constants.TAG_UB or tag == constants.ANY_TAG)
        ):
            # fast path, as Recv's: a whole message from a peer on shared memory
            lane = self._engine.lane  # type: ignore[union-attr]  # a peer: an engine
            if lane is not None:
                got = lane.recv_obj(peer, self._ctx, tag, status is not None)
                if got is not None:
                    if status is None:  # (pickling.loads inline: bytes, None when empty)
                        return _PICKLE._loads(got) if got else None
                    status._set(rank_arg(rank), got[1], got[0])
                    return _loads(got[2])
            return self._recv_left(rank, tag, status, peer, source)
        source = self._source(source)
        tag = self._recv_tag(tag)
        return self._recv_obj(source, tag, self._ctx, status)

    def _recv_left(
        self, rank: int, tag: int, status: Status | None, peer: int, source: int | None = None
    ) -> Any:
        """Finish a receive that the lane did not take; return the object.

        recv(source=`source`, tag=`tag`, status=`status`) from shm peer `peer` (of rank
        `rank`, what `source` stands for; `source` None: `rank` itself; `tag` a good one),
        as recv does: the endpoint's fast path, else the engine's. What those raise.
        """
        engine: Engine = self._engine  # type: ignore[assignment]  # a peer: an engine
        got = engine.fast_recv(peer, self._ctx, tag, None, _load_view)
        if got is not None:
            if status is not None:
                status._set(rank_arg(rank), got[1], got[0])
            return got[2]
        source = rank if source is None else source
        source = self._source(source)
        tag = self._recv_tag(tag)
        return self._recv_obj(source, tag, self._ctx, status)

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        """Send an object without waiting; return the Request.

        The object is pickled at once (later changes to it are not sent); the request completes once
        the pickled data may be reused (it is in the queue, in MPI, or copied).
        MPI.Exception(ERR_RANK/ERR_TAG) for a bad destination or tag, ERR_COMM on COMM_NULL; to
        PROC_NULL the request is already complete.
        """
        peer = self._shm_peer.get(dest)
        if (
            peer is not None and type(tag) is int and 0 <= tag <= constants.TAG_UB
        ):  # Isend's fast path
            engine: Engine = self._engine  # type: ignore[assignment]  # a peer: an engine
            lane, pickle = engine.lane, _PICKLE
            if lane is None:
                return Comm.Isend(self, _dumps(obj), dest, tag)
            sent = lane.send_obj(peer, self._ctx, tag, obj, pickle._dumps, pickle._protocol)
            if sent is True:  # in the queue: complete
                return new_request(_SENT, engine, None, None)
            return self._isend_unsent(obj, dest, tag, peer, sent)
        dest = self._dest(dest)
        tag = self._send_tag(tag)
        return request_of(self._isend_op(_dumps(obj), dest, tag, self._ctx, False), self._engine)

    def _isend_unsent(self, obj: Any, dest: int, tag: int, peer: int, sent: Any) -> Request:
        """Finish an isend that the lane's send_obj left unsent; return its Request.

        isend(obj, dest, tag) to shm peer `peer` (of rank `dest`, `tag` a good one), where
        send_obj returned `sent` (not True: see _unsent), as isend does: the Request is
        complete where the object went into the queue at once. What Isend raises.
        """
        engine: Engine = self._engine  # type: ignore[assignment]  # a peer: an engine
        if (sent := self._unsent(engine, peer, tag, obj, sent, 0.0)) is True:
            return new_request(_SENT, engine, None, None)
        return Comm.Isend(self, _flat_bytes(sent), dest, tag)

    def issend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        """Send an object in synchronous mode without waiting; return the Request.

        As isend, but the request completes only once the receiver has matched the message.
        """
        dest = self._dest(dest)
        tag = self._send_tag(tag)
        return Request(self._isend_op(_dumps(obj), dest, tag, self._ctx, True), self._engine)

    ibsend = isend
    irsend = isend

    def irecv(
        self,
        buf: Any = None,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
    ) -> Request:
        """Post an object receive; `wait()` returns the object."""
        route = self._src_route.get(source)  # None: PROC_NULL or not a rank (checked below)
        engine = self._engine
        if (  # a rank (or ANY_SOURCE) of shared memory, a good tag, one thread: Irecv's post
            route is not None
            and engine is not None
            and type(tag) is int  # (a float tag: converted by the general path)
            and (0 <= tag <= constants.TAG_UB or tag == constants.ANY_TAG)
            and _post_recv is not None
            and type(route).post is _ROUTE_POST
            and not (engine.unexpected or _count() - _service[0])
            and type(source) is int  # (a float rank equal to one finds its route too)
        ):
            src = source if source == constants.ANY_SOURCE else self._group[source]
            return _post_recv(  # (no view: the bytes are kept in its obj, unpickled at wait)
                engine.posted, None, self._ctx, src, tag, route.peer, engine, self._rank_of,
                unpickle,
            )  # fmt: skip
        source = self._source(source)
        tag = self._recv_tag(tag)
        op = self._irecv_op(None, source, tag, self._ctx)
        return request_of(op, engine, self._rank_of, unpickle)

    def _sendrecv_args(
        self, dest: Any, source: Any, sendtag: int, recvtag: int
    ) -> tuple[Engine, int, int, int, int]:
        """Check a send-receive's ranks and tags; return (engine, dest, source, sendtag, recvtag).

        Ranks and tags are ints, as rank_arg gives them. MPI.Exception naming the bad rank or tag,
        ERR_COMM on COMM_NULL.
        """
        dest = self._dest(dest)
        source = self._source(source)
        sendtag = self._send_tag(sendtag)
        recvtag = self._recv_tag(recvtag)
        return self._check(), dest, source, sendtag, recvtag

    def sendrecv(
        self,
        sendobj: Any,
        dest: int,
        sendtag: int = 0,
        recvbuf: Any = None,
        source: int = constants.ANY_SOURCE,
        recvtag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> Any:
        """Send `sendobj` to `dest` and receive an object from `source`, deadlock-free."""
        engine, dest, source, sendtag, recvtag = self._sendrecv_args(dest, source, sendtag, recvtag)
        peer = self._shm_peer.get(dest)
        lane, pickle = engine.lane, _PICKLE
        if peer is None or lane is None:
            data = _dumps(sendobj)
        else:  # pickled and written whole at once (as isend's), else its pickle back
            sent = lane.send_obj(peer, self._ctx, sendtag, sendobj, pickle._dumps, pickle._protocol)
            if (
                sent is True
                or (sent := self._unsent(engine, peer, sendtag, sendobj, sent, 0.0)) is True
            ):
                return self._recv_obj(source, recvtag, self._ctx, status)
            data = _flat_bytes(sent)
        if peer is not None and engine.fast_send(  # written whole at once: recv's turn
            peer, self._ctx << _CTX_SHIFT | sendtag, data, 0.0
        ):
            return self._recv_obj(source, recvtag, self._ctx, status)
        rop = self._irecv_op(None, source, recvtag, self._ctx)
        sop = self._isend_op(data, dest, sendtag, self._ctx, False)
        engine.wait_until(lambda: rop.done and sop.done)
        return Request(rop, engine, self._rank_of, unpickle)._fill(status)

    def probe(
        self,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> bool:
        """Block until a matching message is there (not received); True."""
        return self.Probe(source, tag, status)

    def iprobe(
        self,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> bool:
        """Return True iff a matching message can be received now (Iprobe; `status` filled then)."""
        return self.Iprobe(source, tag, status)

    # ------------------------------------------------------------------ p2p buffers
    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:
        """Send a buffer (message spec). Returns once the data is in the queue or MPI."""
        peer = self._shm_peer.get(dest)
        if peer is not None:
            lane = self._engine.lane  # type: ignore[union-attr]  # a peer: an engine
            if lane is not None and lane.send(peer, self._ctx, tag, buf):  # all in one C call
                return
        if (
            peer is not None and type(tag) is int and 0 <= tag <= constants.TAG_UB
        ):  # fast path: into the queue
            data = (
                buf
                if type(buf) is _NDARRAY and _plain_array(buf, False)
                else _quick(buf, False, _SIZES)
            )
            if data is not None and self._engine.fast_send(  # type: ignore[union-attr]
                peer, self._ctx << _CTX_SHIFT | tag, data
            ):
                return
        self._send_spec(buf, dest, tag, False)

    def _send_spec(self, buf: Any, dest: int, tag: int, sync: bool) -> None:
        """Send message spec `buf` (blocking, synchronous with `sync`) the general way.

        MPI.Exception(ERR_RANK/ERR_TAG) for a bad destination or tag; the spec's errors as
        buffers.parse gives them (a plain spec takes buffers.quick: no full parse).
        """
        dest = self._dest(dest)
        tag = self._send_tag(tag)
        view = _quick(buf, False, _SIZES)
        if view is None:
            view = buffers.parse(buf).view
        self._send_bytes(view, dest, tag, self._ctx, sync)

    def Ssend(self, buf: Any, dest: int, tag: int = 0) -> None:
        """Send a buffer (message spec) in synchronous mode.

        Returns once the receiver has matched the message. MPI.Exception(ERR_RANK/ERR_TAG) for a bad
        destination or tag; to PROC_NULL it returns at once.
        """
        self._send_spec(buf, dest, tag, True)

    Bsend = Send
    Rsend = Send

    def Recv(
        self,
        buf: Any,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> None:
        """Receive into a buffer (message spec).

        Raises MPI.Exception(ERR_TRUNCATE) if the message is longer than the buffer (the message is
        consumed; the buffer holds its prefix).
        """
        rank = source if source != constants.ANY_SOURCE else self._sole_source()
        peer = self._shm_peer.get(rank)
        if peer is not None:
            engine: Engine = self._engine  # type: ignore[assignment]  # a peer: an engine
            lane = engine.lane
            if lane is not None:  # a whole message in one C call
                got = lane.recv(peer, self._ctx, tag, buf, status is not None)
                if got is not None:
                    if status is not None:
                        status._set(rank_arg(rank), got[1], got[0])
                    return
        if (
            peer is not None
            and type(tag) is int
            and (0 <= tag <= constants.TAG_UB or tag == constants.ANY_TAG)
        ):
            # fast path: from a peer on shared memory straight into the buffer
            data = (
                buf
                if type(buf) is _NDARRAY and _plain_array(buf, True)
                else _quick(buf, True, _SIZES)
            )
            if data is not None:  # (the route's recv_into, its common case inline)
                got = self._engine.fast_recv(peer, self._ctx, tag, data)  # type: ignore[union-attr]
                if got is not None:
                    if got[2] is not None:
                        fast_done(self, got, rank_arg(rank), status)
                    elif status is not None:
                        status._set(rank_arg(rank), got[1], got[0])
                    return
        source = self._source(source)
        tag = self._recv_tag(tag)
        view = buffers.quick(buf, True)
        if view is not None:  # a plain spec: no unpack to run
            self._recv_bytes(view, source, tag, self._ctx, status)
            return
        spec = buffers.parse(buf, writable=True, deferred=True)
        self._recv_bytes(spec.view, source, tag, self._ctx, status)
        if spec.unpack is not None:  # a derived datatype: its layout from the packed data
            spec.unpack()

    def Isend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        """Send a buffer (message spec) without waiting; return the Request.

        The buffer must not be changed until the request completes, once it may be reused (the data
        is in the queue, in MPI, or copied). MPI.Exception(ERR_RANK/ERR_TAG) for a bad destination
        or tag; to PROC_NULL the request is already complete.
        """
        at = self._isend_at.get(dest)
        if at is not None:  # the lane's send below and its request, in one C call
            request = _isend_post(buf, dest, tag, at)
            if request is not None:
                return request
        peer = self._shm_peer.get(dest)  # None: not a rank on shared memory, or a freed comm
        if peer is not None and type(tag) is int and 0 <= tag <= constants.TAG_UB:
            engine: Engine = self._engine  # type: ignore[assignment]  # a peer: an engine
            lane = engine.lane
            if lane is not None:
                if _isend_post is not None:
                    self._isend_at[dest] = (lane, peer, self._ctx, _SENT)
                if lane.send(peer, self._ctx, tag, buf):  # (one C call)
                    return new_request(_SENT, engine, None, None)
            view = _quick(buf, False, _SIZES)
            if view is not None:  # a plain spec to a peer on shared memory: no more checks
                if engine.fast_send(peer, self._ctx << _CTX_SHIFT | tag, view, 0.0):
                    return new_request(_SENT, engine, None, None)
                return new_request(
                    engine.isend_shm(peer, self._ctx, tag, view, False), engine, None, None
                )
        dest = self._dest(dest)
        tag = self._send_tag(tag)
        view = _quick(buf, False, _SIZES)
        if view is None:
            view = buffers.parse(buf).view
        return request_of(self._isend_op(view, dest, tag, self._ctx, False), self._engine)

    def Issend(self, buf: Any, dest: int, tag: int = 0) -> Request:
        """Send a buffer (message spec) in synchronous mode without waiting; return the Request.

        As Isend, but the request completes only once the receiver has matched the message.
        """
        dest = self._dest(dest)
        tag = self._send_tag(tag)
        view = buffers.parse(buf).view
        return request_of(self._isend_op(view, dest, tag, self._ctx, True), self._engine)

    Ibsend = Isend
    Irsend = Isend

    def Irecv(
        self,
        buf: Any,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
    ) -> Request:
        """Post a receive into a buffer (message spec); return the Request.

        The data is in `buf` once the request completes (a derived datatype is unpacked then); a
        message longer than the buffer fails the request with ERR_TRUNCATE. MPI.Exception(ERR_RANK/
        ERR_TAG) for a bad source or tag; from PROC_NULL the request is already complete.
        """
        at = self._irecv_at.get(source)
        if at is not None:  # what the post below does, checks and all, in one C call
            request = _irecv_post(buf, source, tag, at)
            if request is not None:
                return request
        route = self._src_route.get(source)  # None: PROC_NULL or not a rank (checked below)
        if (  # not a rank (or ANY_SOURCE), a bad tag or a freed comm: the checks and errors
            route is None
            or self._engine is None
            or type(tag) is not int  # (a float tag: converted by the general path)
            or not (0 <= tag <= constants.TAG_UB or tag == constants.ANY_TAG)
            or type(source) is not int  # (a float rank equal to one finds its route too)
        ):
            route = None
            source = self._source(source)
            tag = self._recv_tag(tag)
        view = _quick(buf, True, _SIZES)
        finish = None  # a plain spec (quick's): no unpack to run at completion
        if view is None:
            spec = buffers.parse(buf, writable=True, deferred=True)
            view, finish = spec.view, persistent.unpacker(spec.unpack)
        if route is None:
            op = self._irecv_op(view, source, tag, self._ctx)
        else:  # post at once: the route lookup was the rank check
            src = source if source == constants.ANY_SOURCE else self._group[source]
            engine: Engine = self._engine  # type: ignore[assignment]  # (checked above)
            if _post_recv is not None and type(route).post is _ROUTE_POST:
                if _irecv_post is not None:
                    self._irecv_at[source] = (
                        engine.posted, self._ctx, src, route.peer, engine, self._rank_of,
                        engine.unexpected, _count, _service, _SIZES, constants.TAG_UB,
                        constants.ANY_TAG,
                    )  # fmt: skip
                if not (engine.unexpected or _count() - _service[0]):
                    # Route.post's engine.post, its lone-thread case (queued as it is) in C
                    return _post_recv(
                        engine.posted, view, self._ctx, src, tag, route.peer, engine,
                        self._rank_of, finish,
                    )  # fmt: skip
            op = route.post(self, RecvOp(self._ctx, src, tag, view, None, route.peer), source)
        return request_of(op, self._engine, self._rank_of, finish)

    def Sendrecv(
        self,
        sendbuf: Any,
        dest: int,
        sendtag: int = 0,
        recvbuf: Any = None,
        source: int = constants.ANY_SOURCE,
        recvtag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> None:
        """Send and receive at once (deadlock-free however large the messages)."""
        engine, dest, source, sendtag, recvtag = self._sendrecv_args(dest, source, sendtag, recvtag)
        peer = self._shm_peer.get(dest)
        if peer is not None and (  # fast path: a send written whole at once, then Recv's
            _plain_array(recvbuf, True) or _quick(recvbuf, True, _SIZES) is not None
        ):
            lane = engine.lane
            if lane is not None and lane.send(peer, self._ctx, sendtag, sendbuf):  # one C call
                self.Recv(recvbuf, source, recvtag, status)
                return
            sview = sendbuf if _plain_array(sendbuf, False) else _quick(sendbuf, False, _SIZES)
            if sview is not None and engine.fast_send(
                peer, self._ctx << _CTX_SHIFT | sendtag, sview, 0.0
            ):
                self.Recv(recvbuf, source, recvtag, status)
                return
        rview = buffers.parse(recvbuf, writable=True).view
        sview = buffers.parse(sendbuf).view
        rop = self._irecv_op(rview, source, recvtag, self._ctx)
        sop = self._isend_op(sview, dest, sendtag, self._ctx, False)
        engine.wait_until(lambda: rop.done and sop.done)
        request_of(rop, engine, self._rank_of)._fill(status)

    def Sendrecv_replace(
        self,
        buf: Any,
        dest: int,
        sendtag: int = 0,
        source: int = constants.ANY_SOURCE,
        recvtag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> None:
        """Send `buf` and receive into the same buffer (Sendrecv with a copy of the data sent).

        Errors as Sendrecv's; the message received must fit in `buf` (else ERR_TRUNCATE).
        """
        view = buffers.parse(buf, writable=True).view
        self.Sendrecv(bytes(view), dest, sendtag, [view, len(view), "B"], source, recvtag, status)

    # error handlers (see `errhandler`)
    Set_errhandler = errhandler.set_errhandler
    Get_errhandler = errhandler.get_errhandler
    Call_errhandler = errhandler.call_errhandler
    Create_errhandler = staticmethod(errhandler.create_errhandler)

    # matched probes (see `message`)
    Mprobe = mprobe = message.mprobe
    Improbe = improbe = message.improbe

    # persistent requests and Isendrecv (see `persistent`)
    Send_init = persistent.send_init
    Bsend_init = Rsend_init = Send_init
    Ssend_init = persistent.ssend_init
    Recv_init = persistent.recv_init
    Psend_init = partitioned.psend_init
    Precv_init = partitioned.precv_init
    Isendrecv = persistent.isendrecv
    Isendrecv_replace = persistent.isendrecv_replace

    def Probe(
        self,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> bool:
        """Block until a matching message can be received; fill `status`. True."""
        source = self._source(source)
        tag = self._recv_tag(tag)
        engine = self._live()
        watch = self._route[source].peer if source >= 0 else -1
        engine.wait_until(lambda: self._iprobe(source, tag, status), watch)
        return True

    def Iprobe(
        self,
        source: int = constants.ANY_SOURCE,
        tag: int = constants.ANY_TAG,
        status: Status | None = None,
    ) -> bool:
        """True (status filled) iff a matching message can be received now."""
        source = self._source(source)
        tag = self._recv_tag(tag)
        engine = self._live()
        if self._iprobe(source, tag, status):
            return True
        engine.progress()
        return self._iprobe(source, tag, status)

    def _iprobe(self, source: int, tag: int, status: Status | None) -> bool:
        if source == constants.PROC_NULL:
            if status is not None:
                status._set(constants.PROC_NULL, constants.ANY_TAG, 0)
            return True
        engine = self._check()
        src = constants.ANY_SOURCE if source == constants.ANY_SOURCE else self._group[source]
        entry = engine.find_unexpected(self._ctx, src, tag)
        if entry is not None:
            if not entry.complete:
                return False
            rank = self._sender_rank(entry)
            if status is not None:
                status._set(rank, entry.tag, entry.nbytes)
            return True
        return self._src_route[source].iprobe(self, source, tag, status)

    def _sender_rank(self, entry: Any) -> int:
        """Return the rank here of the sender of the complete unexpected message `entry`.

        A probe matched it. A sender outside this communicator (a peer that wrote this context into
        a message header: only a hostile one can) has the message dropped, and raises
        MPI.Exception(ERR_INTERN) naming its world rank.
        """
        rank: int | None = self._rank_of.get(entry.src)
        if rank is not None:
            return rank
        engine = self._check()
        with engine.lock:
            if entry in engine.unexpected:
                engine.unexpected.remove(entry)
                engine.release(entry)
        raise exceptions.Exception(exceptions.ERR_INTERN, f"world rank {entry.src} sent a "
                                   f"message on context {entry.ctx}, of a communicator it "
                                   "is not in (dropped)")  # fmt: skip

    # ------------------------------------------------------------------ management
    def _alloc_ctx(self, members: list[int] | None = None, tag: int = 0) -> int:
        """Agree on a free context pair with the members and return it.

        With every member (collective over self), or with the world ranks `members` only (those of a
        Create_group, under its `tag`).

        A fence follows the agreement (a barrier, or a second exchange): whatever a member sent on a
        freed communicator with that context came before its part of the agreement, so it has
        arrived here (and been dropped) before this rank takes the context again; the new
        communicator's messages come after the fence.

        Threads: agreements on other communicators may run at once in this process. One at a time
        offers the contexts in use (`engine.ctx_owner`), the one with the lowest (parent context,
        tag) among those waiting here; the others decline (all contexts and the decline bit). An
        agreement that any member declined takes nothing and runs again, so every member takes the
        same context, and the lowest waiting agreement of the job always gets through.
        """
        if members is None:
            ctx = self.agreed_ctx((self._ctx, tag), self._allreduce_int_or)
        else:
            ctx = self.agreed_ctx(
                (self._ctx, tag), lambda used: self._members_or(members, used, tag)
            )
        if members is None:
            self._run(self._barrier(T_BARRIER))
        else:
            self._members_or(members, 0, tag)
        return ctx

    def agreed_ctx(self, key: tuple[int, int], union_of: Callable[[int], int]) -> int:
        """Return the context pair agreed on by the processes `union_of` reaches.

        `union_of` merges context offers (matching.merge_offers: the context maps ORed, the
        highest context clock) over them, collectively, under the threads protocol of
        _alloc_ctx; `key` orders the agreements waiting in this process. Also the
        intercommunicators' (see `intercomm`), whose maps span two groups.
        """
        engine = self._check()
        with engine.lock:
            engine.ctx_waiting.add(key)
        try:
            while True:
                ctx = self._agree_ctx(engine, key, union_of)
                if ctx:
                    return ctx
                time.sleep(0)  # declined somewhere: let the agreement that goes first run
        finally:
            with engine.lock:
                engine.ctx_waiting.discard(key)

    def _agree_ctx(
        self, engine: Engine, key: tuple[int, int], union_of: Callable[[int], int]
    ) -> int:
        """One round of agreed_ctx: the context taken, or 0 when a member declined."""
        with engine.lock:
            mine = engine.ctx_owner is None and key == min(engine.ctx_waiting)
            if mine:
                engine.ctx_owner = key
                used = engine.ctx_clock << CLOCK_SHIFT  # (an offer: see matching.CLOCK_SHIFT)
                for ctx in engine.used_ctx:
                    used |= 1 << ctx
            else:
                used = (1 << (_DECLINE_BIT + 1)) - 1
        try:
            union = union_of(used)
            if union >> _DECLINE_BIT & 1:
                return 0
            ctx = 4
            while union >> ctx & 3:
                ctx += 2
            if ctx + 1 > constants.MAX_CONTEXT:
                raise exceptions.Exception(exceptions.ERR_INTERN, "out of communicator contexts")
            engine.reuse_context((ctx, ctx + 1), union)
            return ctx
        finally:
            if mine:
                with engine.lock:
                    engine.ctx_owner = None

    def Dup(self, info: Any = None) -> Intracomm:
        """Duplicate the communicator: same group, new context (collective).

        The new communicator is of this one's class (as mpi4py: a subclass's Dup is of that
        subclass).
        """
        if not isinstance(self, Intracomm):  # a plain Comm handle (Comm(comm), MyComm(comm))
            from guest_lib.mpi.intercomm import Intercomm

            kind = Intercomm if "_local_group" in self.__dict__ else Intracomm
            made = kind(self).Dup(info)
            return type(self).__new__(type(self), made)  # (shares what `made` holds)
        ctx = self._alloc_ctx()
        mirror = mirror_coll = None
        if self._has_mpi:
            mirror, mirror_coll = native.dup_mirrors(self)
        made = same_class(self, Intracomm(self._engine, list(self._group), ctx, mirror,
                                          mirror_coll))  # fmt: skip
        self._keyvals.copy(self, made)  # the attributes copy_fn copies (MPI_Comm_dup)
        return made

    Clone = Dup

    def Split(self, color: int = 0, key: int = 0) -> Intracomm:
        """Partition by `color` (UNDEFINED: COMM_NULL), order by (key, rank). Collective."""
        pairs = Collectives._allgather(self, (color, key))  # (not a subclass's allgather)
        ctx = self._alloc_ctx()
        mirror = mirror_coll = None
        if self._has_mpi:
            mirror, mirror_coll = native.split_mirrors(self, color, key)
        if color == constants.UNDEFINED:
            engine = self._check()
            with engine.lock:
                engine.used_ctx.difference_update((ctx, ctx + 1))
            return COMM_NULL
        members = sorted((k, r) for r, (c, k) in enumerate(pairs) if c == color)
        group = [self._group[r] for _, r in members]
        engine = self._check()
        if mirror is not None and all(engine.routes[w].local for w in group):
            native.free_mirrors((mirror, mirror_coll))
            mirror = mirror_coll = None
        return Intracomm(engine, group, ctx, mirror, mirror_coll)

    def Free(self) -> None:
        """Free the communicator and release its context.

        Collective in MPI; local bookkeeping here, but for its nonblocking collectives still
        pending, which complete first (MPI releases it once they did; their errors stay with
        their requests). Messages sent on this communicator and not
        received are dropped, here and when they arrive later: they never show up on a communicator
        that gets the context next. MPI.Exception(ERR_COMM) for COMM_WORLD and COMM_SELF (and
        handles on them), which stay as they are, and for COMM_NULL. Its attributes are deleted
        first (delete_fn).
        """
        self._check()
        if 0 <= self._ctx < 4:
            raise exceptions.Exception(exceptions.ERR_COMM, f"cannot free {self.Get_name()}")
        self._keyvals.drop(self)
        complete_started(self)  # (MPI: released once its pending operations completed)
        area.free(self)
        if self._engine is not None and self._ctx >= 4:
            self._engine.drop_context((self._ctx, self._ctx + 1))  # (no longer in use)
            if self._mirror is not None:
                native.free_mirrors((self._mirror, self._mirror_coll))
        self._engine = None
        self._shm_peer = {}
        self._irecv_at, self._isend_at = {}, {}
        self._null = True

    def Disconnect(self) -> None:
        """Free, with its errors (there are no separately started jobs to wait for here)."""
        self.Free()

    @classmethod
    def Join(cls, fd: int) -> Any:
        """Return the intercommunicator with the process at the other end of socket `fd`.

        `fd` is a connected socket to a process of this job (see `dynproc.join`).
        """
        from guest_lib.mpi import dynproc

        return dynproc.join(fd)

    # fault tolerance (see `ulfm`)
    Revoke = ulfm.revoke
    Is_revoked = ulfm.is_revoked
    Get_failed = ulfm.get_failed
    Ack_failed = ulfm.ack_failed
    Agree = ulfm.agree
    Iagree = ulfm.iagree
    Shrink = ulfm.shrink
    Ishrink = ulfm.ishrink

    def Abort(self, errorcode: int = 0) -> None:
        """Terminate every process of the job; does not return.

        MPI_Abort through mpi4py's own module under mpiexec, else this process after reporting
        `errorcode` to ivshmem-run (guest_lib.launch.report_abort), which then ends the other
        ranks and exits with `errorcode`, 0 included, as mpiexec does. This process exits with
        `errorcode or 1`: a launcher without the report still sees a failure.
        """
        from guest_lib.launch import report_abort

        engine = self._engine
        if engine is not None and engine.has_mpi:
            native.abort(errorcode)
        sys.stderr.flush()
        report_abort(errorcode)
        os._exit(errorcode or 1)

    # Bsend buffer of the communicator (MPI-4.1)
    def _bsend_slot(self) -> Any:
        self._check()
        slot = self.__dict__.get("_bsend")
        if slot is None:
            slot = self._bsend = memory.BufferSlot()
        return slot

    def Attach_buffer(self, buf: Any) -> None:
        """Attach `buf` (or BUFFER_AUTOMATIC) as this communicator's Bsend buffer.

        See memory.BufferSlot.
        """
        self._bsend_slot().attach(buf)

    def Detach_buffer(self) -> Any:
        """The buffer Attach_buffer recorded (None when there is none)."""
        return self._bsend_slot().detach()

    def Flush_buffer(self) -> None:
        """As MPI.Flush_buffer: nothing is ever left buffered here."""
        self._check()

    def Iflush_buffer(self) -> Request:
        """A request that is complete already (see Flush_buffer)."""
        self._check()
        request: Request = memory.Iflush_buffer()
        return request

    def Get_group(self) -> Any:
        """A new Group of the members; MPI.Exception(ERR_COMM) on COMM_NULL."""
        from guest_lib.mpi.group import Group

        return Group(list(self._group), self._check().world_rank)

    def Create(self, group: Any) -> Intracomm:
        """Create the communicator of `group` (a subgroup of this one), in the group's order.

        COMM_NULL outside it. Collective. As MPI-2.2 allows, the processes may pass disjoint groups:
        each group gets its own communicator.
        """
        me = self._engine.world_rank if self._engine else -1
        order = {w: i for i, w in enumerate(group._members())}
        if me not in order:
            return self.Split(constants.UNDEFINED, 0)
        return self.Split(min(order), order[me])  # (disjoint groups: distinct colors)

    def Create_group(self, group: Any, tag: int = 0) -> Intracomm:
        """Create the communicator of `group` (a subgroup of this one), called by its members only.

        The other ranks do not call it. `tag` tells apart concurrent calls by the same processes.
        COMM_NULL in a process outside the group; MPI.Exception(ERR_GROUP) if the group has a
        process outside this communicator.
        """
        engine = self._check()
        members = list(group._members())
        outside = [w for w in members if w not in self._rank_of]
        if outside:
            raise exceptions.Exception(exceptions.ERR_GROUP, f"world ranks {outside} not here")
        if engine.world_rank not in members:
            return COMM_NULL
        tag = self._send_tag(tag)
        ctx = self._alloc_ctx(members, tag)
        mirror = mirror_coll = None
        if self._has_mpi and not all(engine.routes[w].local for w in members):
            ranks = [self._rank_of[w] for w in members]
            mirror, mirror_coll = native.group_mirrors(self, ranks, tag)
        return Intracomm(engine, members, ctx, mirror, mirror_coll)

    def _members_or(self, members: list[int], value: int, tag: int) -> int:
        """Return the context offers `value` merged over the world ranks `members`.

        The merge is matching.merge_offers: the bitwise OR of the maps, the highest clock.

        `members` is a part of this communicator that this process belongs to; by messages on its
        collective context with tags no collective of the whole communicator uses (T_GROUP + tag).
        """
        engine = self._check()
        ranks = [self._rank_of[w] for w in members if w != engine.world_rank]
        tag = T_GROUP + tag % T_GROUP
        data = memoryview(value.to_bytes(OFFER_BYTES, "little"))
        recvs = [self._irecv_op(None, r, tag, self._ctx + 1) for r in ranks]
        sends = [self._isend_op(data, r, tag, self._ctx + 1, False) for r in ranks]
        pending = recvs + sends
        engine.wait_until(lambda: all(op.done for op in pending))
        for op in recvs:
            if op.error or len(op.obj) != OFFER_BYTES:
                raise exceptions.Exception(exceptions.ERR_INTERN, "Create_group: bad context map")
            value = merge_offers(value, int.from_bytes(op.obj, "little"))
        return value

    @classmethod
    def Get_parent(cls) -> Any:
        """A null Intercomm: no process here was spawned (see Spawn)."""
        from guest_lib.mpi import intercomm

        return intercomm.Intercomm(COMM_NULL)

    def Compare(self, comm: Comm) -> int:
        """Compare two communicators: IDENT, CONGRUENT, SIMILAR or UNEQUAL.

        IDENT (the same communicator), CONGRUENT (same group and order), SIMILAR (same members in
        another order) or UNEQUAL, as mpi4py's `comm.Compare(other)`. MPI.Exception(ERR_COMM) if
        either is COMM_NULL.
        """
        self._check()
        comm._check()
        if self._ctx == comm._ctx and self._group == comm._group:
            return constants.IDENT
        if self._group == comm._group:
            return constants.CONGRUENT
        if sorted(self._group) == sorted(comm._group):
            return constants.SIMILAR
        return constants.UNEQUAL


class Intracomm(persistent.PersistentCollectives, ExtraCollectives, Comm):
    """An intra-communicator: p2p, collectives and management."""

    # Process topologies: see topology.py (imported late: it subclasses Intracomm).
    def Create_cart(self, dims: Any, periods: Any = None, reorder: bool = False) -> Intracomm:
        """A Cartesian topology over the first prod(dims) ranks (see `topology`)."""
        from guest_lib.mpi import topology

        return topology.create_cart(self, dims, periods, reorder)

    def Cart_map(self, dims: Any, periods: Any = None) -> int:
        """This process's rank in Create_cart(dims, periods), or UNDEFINED."""
        from guest_lib.mpi import topology

        return topology.cart_map(self, dims, periods)

    def Create_graph(self, index: Any, edges: Any, reorder: bool = False) -> Intracomm:
        """A graph topology over the first nnodes ranks (see `topology.create_graph`)."""
        from guest_lib.mpi import topology

        return topology.create_graph(self, index, edges)

    def Graph_map(self, index: Any, edges: Any) -> int:
        """This process's rank in Create_graph(index, edges), or UNDEFINED."""
        from guest_lib.mpi import topology

        return topology.graph_map(self, index, edges)

    def Create_dist_graph_adjacent(
        self,
        sources: Any,
        destinations: Any,
        sourceweights: Any = constants.UNWEIGHTED,
        destweights: Any = constants.UNWEIGHTED,
        info: Any = None,
        reorder: bool = False,
    ) -> Intracomm:
        """Create a distributed graph communicator from each rank's neighbors.

        See `topology`; weights None mean UNWEIGHTED.
        """
        from guest_lib.mpi import topology

        return topology.create_dist_graph_adjacent(
            self, sources, destinations, sourceweights, destweights
        )

    def Create_dist_graph(
        self,
        sources: Any,
        degrees: Any,
        destinations: Any,
        weights: Any = constants.UNWEIGHTED,
        info: Any = None,
        reorder: bool = False,
    ) -> Intracomm:
        """Create a distributed graph communicator from any rank's edges.

        See `topology`; weights None mean UNWEIGHTED.
        """
        from guest_lib.mpi import topology

        return topology.create_dist_graph(self, sources, degrees, destinations, weights)

    def Create_intercomm(
        self, local_leader: int, peer_comm: Comm, remote_leader: int, tag: int = 0
    ) -> Any:
        """Create the intercommunicator with the group led by `remote_leader` of `peer_comm`.

        Between this group and the group whose leader is rank `remote_leader` of `peer_comm` (see
        `intercomm`). Collective over both groups.
        """
        from guest_lib.mpi import intercomm

        return intercomm.create_intercomm(self, local_leader, peer_comm, remote_leader, tag)

    def Spawn(self, *args: Any, **kwargs: Any) -> Any:
        """Spawn is not supported: raise MPI.Exception(ERR_SPAWN) saying so.

        A job's processes are the ones ivshmem-run or mpiexec started; mpi4py.futures runs over them
        with `python -m mpi4py.futures`.
        """
        raise exceptions.Exception(exceptions.ERR_SPAWN, _NO_SPAWN)

    Spawn_multiple = Spawn

    def Accept(self, port_name: str, info: Any = None, root: int = 0) -> Any:
        """Accept a connection on `port_name`; return the intercommunicator (collective).

        The intercommunicator with the group of this job that connects to `port_name` (opened by
        `root`; see `dynproc`).
        """
        from guest_lib.mpi import dynproc

        return dynproc.accept(self, port_name, info, root)

    def Connect(self, port_name: str, info: Any = None, root: int = 0) -> Any:
        """Connect to `port_name`; return the intercommunicator (collective).

        The intercommunicator with the group of this job that accepts on `port_name` (given at
        `root`; a port of another job: MPI.Exception(ERR_PORT), see `dynproc`).
        """
        from guest_lib.mpi import dynproc

        return dynproc.connect(self, port_name, info, root)

    @classmethod
    def Create_from_group(
        cls, group: Any, stringtag: str = "org.mpi4py", info: Any = None, errhandler: Any = None
    ) -> Intracomm:
        """Create the communicator of `group` without a parent communicator (MPI-4).

        Called by the group's members only (a Create_group over COMM_WORLD; `stringtag` tells apart
        concurrent calls by the same processes). COMM_NULL outside the group.
        """
        from guest_lib.mpi import MPI

        tag = zlib.crc32(str(stringtag).encode()) % (constants.TAG_UB + 1)
        return MPI.COMM_WORLD.Create_group(group, tag)


# The calls that receive into message specs: derived datatypes are unpacked after them
# (see buffers.unpacking; Recv, Irecv and Recv_init unpack themselves, costing nothing on
# their fast paths).
_RECEIVING = (
    "Sendrecv", "Sendrecv_replace", "Isendrecv",
    "Isendrecv_replace", "Bcast", "Ibcast", "Gather", "Igather", "Gatherv", "Igatherv",
    "Scatter", "Iscatter", "Scatterv", "Iscatterv", "Allgather", "Iallgather", "Allgatherv",
    "Iallgatherv", "Alltoall", "Ialltoall", "Alltoallv", "Ialltoallv", "Reduce", "Ireduce",
    "Allreduce", "Iallreduce", "Reduce_scatter", "Reduce_scatter_block", "Scan", "Exscan",
    "Iscan", "Iexscan", "Ireduce_scatter", "Ireduce_scatter_block", "Alltoallw", "Ialltoallw",
)  # fmt: skip
for _name in _RECEIVING:
    if hasattr(Intracomm, _name):
        setattr(Intracomm, _name, buffers.unpacking(getattr(Intracomm, _name)))
front_lanes(Intracomm)  # (outermost: the common case skips the wrappers)
if ring.obj_methods is not None:  # send, isend and recv's common case in C, without a frame
    for _name, _front in zip(
        ("send", "isend", "recv"),
        ring.obj_methods(
            Comm, Comm.send, Comm._send_unsent, Comm.isend, Comm._isend_unsent, Comm.recv,
            Comm._recv_left, _PICKLE, _SENT,
        ),
        strict=True,
    ):  # fmt: skip
        setattr(Comm, _name, _front)


def rank_arg(value: Any) -> int:
    """Return a rank argument as mpi4py's C `int` parameters take it: an int as is, an object
    with __index__ (a numpy integer) as its index, another number with __int__ (a float, e.g.
    osu_multi_lat's `nprocs / 2`) truncated, as Cython's conversion does. TypeError("an
    integer is required") for anything else (a str, None), as mpi4py raises."""
    if type(value) is int:
        return value
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, (str, bytes, bytearray)) or not hasattr(type(value), "__int__"):
        raise TypeError("an integer is required")
    return int(value)


def _plain_array(buf: Any, writable: bool) -> bool:
    """True iff `buf` is a numpy array the core sends from or receives into as it is:
    C-contiguous, of a native numeric type (and writable, with `writable`)."""
    if type(buf) is not np.ndarray:
        return False
    flags = buf.flags
    return (
        flags.c_contiguous
        and (flags.writeable or not writable)
        and id(buf.dtype) in _PLAIN_DTYPES  # (a native numeric type)
    )


def same_class(comm: Comm, new: Any) -> Any:
    """`new` (a communicator made from `comm`) as an instance of `comm`'s class when that
    is a subclass of `new`'s (mpi4py's Dup gives a subclass's own type, e.g.
    mpi4py.util.pkl5.Intracomm's)."""
    if type(comm) is not type(new) and isinstance(comm, type(new)):
        new.__class__ = type(comm)
    return new


def _predefined(name: str) -> Comm:
    """A predefined communicator by name."""
    from guest_lib.mpi import MPI

    comm: Comm = getattr(MPI, name)
    return comm


COMM_NULL = Intracomm(None, [], -1)
