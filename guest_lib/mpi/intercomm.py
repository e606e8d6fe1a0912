"""Intercommunicators (mpi4py's `Intercomm`): two disjoint groups, each rank addressing the
other group.

An `Intercomm` is a `Comm` whose `_group` is the *remote* group: every point-to-point call of
`Comm` (ranks, routes, statuses, ANY_SOURCE) then addresses the remote group as MPI says,
through the route of each world rank (shared memory, or mpi4py for a rank in another
region: then `_mirror`/`_mirror_coll` are mpi4py intercommunicators with the same groups
and rank order). `_local_group` is the local group (`Get_rank`, `Get_size`, `Get_group`),
`_local` an intra-communicator of it (a Dup of the one given to Create_intercomm) used to
agree on things within the group.

Context ids: both groups use the same pair (`ctx` point-to-point, `ctx + 1` collectives).
They are agreed on like an intra-communicator's, under the same threads protocol
(`comm.Comm.agreed_ctx`): the union of the ids every member of both groups has in use (in
Create_intercomm through the two leaders), the lowest free pair above it. Whether any
member reaches ranks through mpi4py is agreed on too, so that every member of both groups
decides alike to make (or not) the mpi4py mirrors.

Collectives follow MPI's intercommunicator rules: rooted ones take root=ROOT in the root's
process, PROC_NULL in the other processes of the root's group and the root's rank in the
remote group in the other group; data always crosses between the groups (Allreduce: each
group gets the fold of the other group's operands; Allgather: the other group's blocks).
Each runs as direct messages between the two groups on the collective context, with a tag
per instance (instances are numbered per intercommunicator, the same on every member of
both groups, as MPI requires every member to call collectives in the same order), written
once as stages: the nonblocking form hands them to the engine (`engine.start_staged`), the
blocking form waits for that request. Folds go in the remote group's rank order (x0 op x1
op ...), so every member of a group gets the same bits and non-commutative ops MPI's
result. Scan and Exscan do not exist for intercommunicators (MPI), nor Create_group.
Arguments are checked at the call, before any data moves; a failure later (a truncated
message, a lost peer) fails that request with MPI.Exception.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np

from guest_lib.mpi import buffers, constants, exceptions, locks, native, ops
from guest_lib.mpi.collectives import NONBLOCKING_TAGS, T_NONBLOCKING, whole
from guest_lib.mpi.comm import COMM_NULL, Comm, Intracomm, same_class
from guest_lib.mpi.constants import IN_PLACE, PROC_NULL, ROOT
from guest_lib.mpi.engine import Engine, StagedOp
from guest_lib.mpi.matching import Op, merge_offers
from guest_lib.mpi.pickling import dumps as _dumps
from guest_lib.mpi.request import Request, unpickle

_ASKED = 1 << (constants.MAX_CONTEXT + 2)  # in a context union: some member's flag (_agree)
_NOTHING = memoryview(bytearray(0))
_COUNT_BYTES = 8  # Reduce_scatter: a rank's block size, sent to the other group


def _array(view: memoryview, datatype: Any) -> np.ndarray:
    dtype = datatype.base.dtype
    return np.frombuffer(view, dtype=dtype) if len(view) else np.empty(0, dtype)


def _raw(array: np.ndarray) -> memoryview:
    if not array.nbytes:
        return memoryview(bytearray(0))
    return np.ascontiguousarray(array).view(np.uint8).data.cast("B")


def _fold(parts: list[np.ndarray], op: ops.Op, datatype: Any) -> np.ndarray:
    """parts[0] op parts[1] op ... (in that order), as a new array."""
    result = parts[-1].copy()
    for part in reversed(parts[:-1]):
        op.reduce_into(result, part, datatype)
    return result


class Intercomm(Comm):
    """An intercommunicator (see the module docstring)."""

    def __init__(
        self,
        engine: Any = None,
        local: list[int] | None = None,
        remote: list[int] | None = None,
        ctx: int = -1,
        local_comm: Intracomm | None = None,
        mirror: Any = None,
        mirror_coll: Any = None,
        low: bool = False,
    ) -> None:
        """Make another handle to an intercommunicator (`Intercomm(comm)`).

        `Intercomm(comm)`: another handle to the intercommunicator `comm` (or a null one for
        COMM_NULL; TypeError for an intra-communicator). The other form is internal.
        """
        if not isinstance(engine, Engine):
            if "_null" not in self.__dict__:  # (not bound by Comm.__new__ already)
                share(self, engine)
            return
        assert local is not None and remote is not None and local_comm is not None
        self._local_group = local
        self._local = local_comm
        self._low = low
        self._iseq = 0  # collective instances started (the same count on every member)
        super().__init__(engine, remote, ctx, mirror, mirror_coll)

    def _own_rank(self, group: list[int], world_rank: int) -> int:
        return self._local_group.index(world_rank)

    # ------------------------------------------------------------------ queries
    def Get_size(self) -> int:
        """The size of the local group."""
        self._check()
        return len(self._local_group)

    def Get_remote_size(self) -> int:
        """The size of the remote group."""
        self._check()
        return len(self._group)

    @property
    def remote_size(self) -> int:
        """Number of processes in the remote group (Get_remote_size)."""
        return self.Get_remote_size()

    def Get_group(self) -> Any:
        """A new Group of the local group."""
        from guest_lib.mpi.group import Group

        engine = self._check()
        return Group(list(self._local_group), engine.world_rank)

    def Get_remote_group(self) -> Any:
        """A new Group of the remote group (this process is not in it: its rank UNDEFINED)."""
        from guest_lib.mpi.group import Group

        self._check()
        return Group(list(self._group), -1)

    @property
    def remote_group(self) -> Any:
        """Remote group (Get_remote_group)."""
        return self.Get_remote_group()

    def Is_inter(self) -> bool:
        """Return True: this is an intercommunicator."""
        return True

    def Is_intra(self) -> bool:
        """Return False: this is an intercommunicator."""
        return False

    @property
    def is_inter(self) -> bool:
        """True: this is an intercommunicator."""
        return True

    @property
    def is_intra(self) -> bool:
        """False: this is an intercommunicator."""
        return False

    def Compare(self, comm: Comm) -> int:
        """Compare two intercommunicators: IDENT, CONGRUENT, SIMILAR or UNEQUAL.

        IDENT (the same intercommunicator), CONGRUENT (same groups, same orders), SIMILAR (same
        members, another order) or UNEQUAL.
        """
        theirs = getattr(comm, "_local_group", None)
        if theirs is None:
            return constants.UNEQUAL
        if self._ctx == comm._ctx and self._group == comm._group:
            return constants.IDENT
        if self._local_group == theirs and self._group == comm._group:
            return constants.CONGRUENT
        if sorted(self._local_group) == sorted(theirs) and sorted(self._group) == sorted(
            comm._group
        ):
            return constants.SIMILAR
        return constants.UNEQUAL

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Comm):
            return NotImplemented
        if self._null or other._null:
            return self._null and other._null
        return isinstance(other, Intercomm) and self._ctx == other._ctx

    def _key(self) -> Hashable:
        return None if self._null else ("inter", self._ctx)

    def __repr__(self) -> str:
        if self._null:
            return "<Intercomm NULL>"
        return (
            f"<Intercomm ctx={self._ctx} rank {self._rank}/{len(self._local_group)}, "
            f"remote size {len(self._group)}>"
        )

    # ------------------------------------------------------------------ management
    def _agree(self, flag: bool) -> tuple[int, bool]:
        """Agree on a new context pair with every member of both groups.

        Returns the pair (free in the contexts in use of both, see Comm.agreed_ctx) and whether any
        member's `flag` is set. Collective over this intercommunicator; a fence (a barrier of each
        group and one between them) follows, as in Comm._alloc_ctx.
        """
        asked = [False]

        def union_of(used: int) -> int:
            union = 0
            mine = used | (_ASKED if flag else 0)
            for value in self._local.allgather(mine) + Intercomm.allgather(self, mine):
                union = merge_offers(union, value)
            asked[0] = bool(union & _ASKED)
            return union & ~_ASKED

        ctx = self._local.agreed_ctx((self._ctx, 0), union_of)
        self._local.Barrier()
        Intercomm.Barrier(self)
        return ctx, asked[0]

    def Dup(self, info: Any = None) -> Any:
        """A new intercommunicator with the same groups and a new context (collective)."""
        engine = self._check()
        local = self._local.Dup()
        ctx, _ = self._agree(False)
        mirror = mirror_coll = None
        if self._mirror is not None:
            mirror, mirror_coll = native.dup_mirrors(self)
        dup = Intercomm(
            engine, list(self._local_group), list(self._group), ctx, local, mirror,
            mirror_coll, self._low,
        )  # fmt: skip
        return same_class(self, dup)

    Clone = Dup

    def Split(self, color: int = 0, key: int = 0) -> Any:
        """Split into intercommunicators by `color`, ordered by (`key`, rank).

        The intercommunicator between the local processes of `color` and the remote ones of the same
        color; COMM_NULL for UNDEFINED or when either side has no process of that color. Collective
        over both groups.
        """
        engine = self._check()
        local = self._local.Split(color, key)
        pairs = Intercomm.allgather(self, (color, key))
        ctx, _ = self._agree(False)
        mirrors = None
        if self._mirror is not None:
            mirrors = native.split_mirrors(self, color, key)
        remote = [self._group[r] for _, r in sorted(
            (k, r) for r, (c, k) in enumerate(pairs) if c == color
        )]  # fmt: skip
        if color == constants.UNDEFINED or not remote or local == COMM_NULL:
            with engine.lock:
                engine.used_ctx.difference_update((ctx, ctx + 1))
            for mirror in mirrors or ():
                if mirror:
                    mirror.Free()
            if local != COMM_NULL:
                local.Free()
            return COMM_NULL
        mirror, mirror_coll = mirrors if mirrors is not None else (None, None)
        return Intercomm(
            engine, list(local._group), remote, ctx, local, mirror, mirror_coll, self._low
        )

    def Create(self, group: Any) -> Any:
        """Create the intercommunicator between the local `group` and the remote side's group.

        `group` is a subgroup of the local group, taken in its order; the remote processes are those
        of the group the remote side passed. COMM_NULL outside it or when either side is empty.
        Collective over both groups.
        """
        engine = self._check()
        order = {w: i for i, w in enumerate(group._members())}
        me = engine.world_rank
        if me in order:
            return self.Split(0, order[me])
        return self.Split(constants.UNDEFINED, 0)

    def Split_type(self, split_type: int, key: int = 0, info: Any = None) -> Any:
        """Split by `split_type`: COMM_TYPE_SHARED or UNDEFINED.

        COMM_TYPE_SHARED pairs the local and remote processes that share this process's region;
        UNDEFINED gives COMM_NULL. Collective. MPI.Exception(ERR_ARG) for another type.
        """
        engine = self._check()
        if split_type == constants.UNDEFINED:
            return self.Split(constants.UNDEFINED, key)
        if split_type != constants.COMM_TYPE_SHARED:
            raise exceptions.Exception(exceptions.ERR_ARG, f"split type {split_type}")
        everyone = self._local_group + self._group
        return self.Split(min(w for w in everyone if engine.routes[w].local), key)

    def Merge(self, high: bool = False) -> Intracomm:
        """Merge both groups into one intra-communicator (collective over both groups).

        The group that passed high=False comes first (when both pass the same, the group of the
        lower-ranked leader in COMM_WORLD first), each in its own order.
        """
        engine = self._check()
        remote_high = Intercomm.allgather(self, bool(high))[0]
        first = (not high) if bool(high) != remote_high else self._low
        group = self._local_group + self._group if first else self._group + self._local_group
        mpi = any(not engine.routes[w].local for w in group)
        ctx, mpi = self._agree(mpi)
        mirror = mirror_coll = None
        if mpi:
            mirror, mirror_coll = native.world_group_mirrors(group)
        return Intracomm(engine, group, ctx, mirror, mirror_coll)

    def Create_group(self, group: Any, tag: int = 0) -> Any:
        """Raise MPI.Exception(ERR_COMM): Create_group takes an intra-communicator (MPI)."""
        raise exceptions.Exception(
            exceptions.ERR_COMM, "Create_group takes an intra-communicator (MPI)"
        )

    def Free(self) -> None:
        """Release the context and the local intra-communicator (see Comm.Free)."""
        local = getattr(self, "_local", None)
        if local is not None and not self._null:
            local.Free()
        super().Free()

    @classmethod
    def Create_from_groups(
        cls,
        local_group: Any,
        local_leader: int,
        remote_group: Any,
        remote_leader: int,
        stringtag: str = "org.mpi4py",
        info: Any = None,
        errhandler: Any = None,
    ) -> Intercomm:
        """Create the intercommunicator of two disjoint groups without a parent (MPI-4).

        Called by every member of both (a Create_from_group of the local group, then
        Create_intercomm with COMM_WORLD as the peer communicator: the leaders talk there with a tag
        made from `stringtag`).
        """
        from guest_lib.mpi import MPI

        tag = zlib.crc32(str(stringtag).encode()) % (constants.TAG_UB + 1)
        local = Intracomm.Create_from_group(local_group, stringtag)
        leader = remote_group._members()[remote_leader]
        try:
            return local.Create_intercomm(local_leader, MPI.COMM_WORLD, leader, tag)
        finally:
            local.Free()

    # ------------------------------------------------------------------ collectives: frame
    def _start(self, stages: Callable[[int], Iterator[list[Op]]]) -> Request:
        """Start a collective instance; return its Request.

        Its number and tag are taken first (so every member numbers it alike), then its first stage
        runs (argument errors raise here). If it fails on this process, it is abandoned as an
        intra-communicator's collective is (see `collectives`): the remote processes waiting for
        this one then fail too.
        """
        engine = self._live()
        seq, self._iseq = self._iseq, self._iseq + 1
        tag = T_NONBLOCKING + seq % NONBLOCKING_TAGS
        ctx = self._ctx + 1
        gone = engine.abandoned_already(ctx, tag, seq)

        def abandon(error: int, reason: str) -> None:
            engine.abandon(ctx, self._gen, seq, tag, 1, reason, self._group, error)

        op = StagedOp(stages(tag), abandon, self._ctx)
        try:
            engine.start_staged(op)  # (this process's own argument errors first)
            if gone is not None:  # a remote process left it already: do not wait for it
                raise exceptions.Exception(*gone)
        except Exception as exc:
            if not op.done:
                op._fail(exceptions.ERR_OTHER, f"{type(exc).__name__}: {exc}")
            raise
        return Request(op, engine)

    def _send(self, view: memoryview, dest: int, tag: int) -> Op:
        return self._isend_op(view, dest, tag, self._ctx + 1, False)

    def _recv(self, view: memoryview | None, source: int, tag: int) -> Op:
        return self._irecv_op(view, source, tag, self._ctx + 1)

    def _remote(self) -> range:
        return range(len(self._group))

    def _role(self, root: int) -> str:
        """Return this process's role for `root`: 'root', 'none' or 'leaf'.

        'root' (ROOT), 'none' (PROC_NULL) or 'leaf' (a rank of the remote group).
        MPI.Exception(ERR_ROOT) for anything else.
        """
        if root == ROOT:
            return "root"
        if root == PROC_NULL:
            return "none"
        if 0 <= root < len(self._group):
            return "leaf"
        raise exceptions.Exception(exceptions.ERR_ROOT, f"root {root}")

    # ------------------------------------------------------------------ barrier, broadcast
    def _barrier(self, tag: int) -> Iterator[list[Op]]:
        """Every rank hears from every remote rank: it leaves once they all entered."""
        yield [self._recv(_NOTHING, r, tag) for r in self._remote()] + [
            self._send(_NOTHING, r, tag) for r in self._remote()
        ]

    def Ibarrier(self) -> Request:
        """Start a barrier with the remote group; return the Request.

        It completes once every process of the remote group has entered the barrier.
        """
        return self._start(self._barrier)

    def Barrier(self) -> None:
        """Block until every process of the remote group has entered the barrier."""
        self.Ibarrier().Wait()

    def barrier(self) -> None:
        """Block until every process of the remote group has entered the barrier (Barrier)."""
        self.Barrier()

    def _bcast(self, buf: Any, root: int, tag: int) -> Iterator[list[Op]]:
        role = self._role(root)
        if role == "root":
            view = buffers.parse(buf).view
            yield [self._send(view, r, tag) for r in self._remote()]
        elif role == "leaf":
            yield [self._recv(buffers.parse(buf, writable=True).view, root, tag)]

    def Ibcast(self, buf: Any, root: int = 0) -> Request:
        """Start Bcast (see there) without waiting; return the Request."""
        return self._start(functools.partial(self._bcast, buf, root))

    def Bcast(self, buf: Any, root: int = 0) -> None:
        """Broadcast `buf` from one process to the remote group.

        root=ROOT: send `buf` to every remote process; root=r: receive remote rank r's data into
        `buf`; PROC_NULL: nothing (the other processes of the root's group). MPI.Exception(ERR_ROOT)
        for another root.
        """
        self.Ibcast(buf, root).Wait()

    def _objects(self, stages: Callable[[list[Any], int], Iterator[list[Op]]]) -> Any:
        """Run an object collective whose stages put its result in their first argument."""
        result: list[Any] = [None]
        self._start(functools.partial(stages, result)).Wait()
        return result[0]

    @locks.locked("bcast")
    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        """Return the object of remote rank `root`; None at ROOT and PROC_NULL."""

        def stages(result: list[Any], tag: int) -> Iterator[list[Op]]:
            role = self._role(root)
            if role == "root":
                data = _dumps(obj)
                yield [self._send(data, r, tag) for r in self._remote()]
            elif role == "leaf":
                op = self._recv(None, root, tag)
                yield [op]
                result[0] = unpickle(op)

        return self._objects(stages)

    # ------------------------------------------------------------------ gather / scatter
    def _gather(self, sendbuf: Any, recvbuf: Any, root: int, tag: int) -> Iterator[list[Op]]:
        role = self._role(root)
        if role == "root":
            spec = buffers.parse_vector(recvbuf, len(self._group), writable=True)
            yield [self._recv(spec.part(r), r, tag) for r in self._remote()]
        elif role == "leaf":
            yield [self._send(buffers.parse(sendbuf).view, root, tag)]

    def Igather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        """Start Gather (see there) without waiting; return the Request."""
        return self._start(functools.partial(self._gather, sendbuf, recvbuf, root))

    def Gather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        """Gather the remote group's buffers at one process.

        root=ROOT: recvbuf gets every remote process's sendbuf, in rank order; root=r: send sendbuf
        to remote rank r; PROC_NULL: nothing. MPI.Exception(ERR_ROOT) for another root.
        """
        self.Igather(sendbuf, recvbuf, root).Wait()

    Gatherv, Igatherv = Gather, Igather

    @locks.locked("gather")
    def gather(self, sendobj: Any, root: int = 0) -> list[Any] | None:
        """The list of every remote process's object at ROOT; None elsewhere."""

        def stages(result: list[Any], tag: int) -> Iterator[list[Op]]:
            role = self._role(root)
            if role == "root":
                recvs = [self._recv(None, r, tag) for r in self._remote()]
                yield recvs
                result[0] = [unpickle(op) for op in recvs]
            elif role == "leaf":
                yield [self._send(_dumps(sendobj), root, tag)]

        return self._objects(stages)

    def _scatter(self, sendbuf: Any, recvbuf: Any, root: int, tag: int) -> Iterator[list[Op]]:
        role = self._role(root)
        if role == "root":
            spec = buffers.parse_vector(sendbuf, len(self._group))
            yield [self._send(spec.part(r), r, tag) for r in self._remote()]
        elif role == "leaf":
            yield [self._recv(buffers.parse(recvbuf, writable=True).view, root, tag)]

    def Iscatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> Request:
        """Start Scatter (see there) without waiting; return the Request."""
        return self._start(functools.partial(self._scatter, sendbuf, recvbuf, root))

    def Scatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:
        """Scatter one process's buffer over the remote group.

        root=ROOT: part r of sendbuf to remote rank r; root=r: recvbuf gets this process's part from
        remote rank r; PROC_NULL: nothing. MPI.Exception(ERR_ROOT) for another root.
        """
        self.Iscatter(sendbuf, recvbuf, root).Wait()

    Scatterv, Iscatterv = Scatter, Iscatter

    @locks.locked("scatter")
    def scatter(self, sendobj: Any = None, root: int = 0) -> Any:
        """This process's item of remote rank `root`'s list; None at ROOT and PROC_NULL.
        ValueError at ROOT for a list that is not one item per remote process."""

        def stages(result: list[Any], tag: int) -> Iterator[list[Op]]:
            role = self._role(root)
            if role == "root":
                items = list(sendobj) if sendobj is not None else [None] * len(self._group)
                if len(items) != len(self._group):
                    raise ValueError(f"scatter: expecting {len(self._group)} items")
                yield [self._send(_dumps(items[r]), r, tag) for r in self._remote()]
            elif role == "leaf":
                op = self._recv(None, root, tag)
                yield [op]
                result[0] = unpickle(op)

        return self._objects(stages)

    # ------------------------------------------------------------------ all-to-all
    def _allgather(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        spec = buffers.parse_vector(recvbuf, len(self._group), writable=True)
        mine = buffers.parse(sendbuf).view
        yield [self._recv(spec.part(r), r, tag) for r in self._remote()] + [
            self._send(mine, r, tag) for r in self._remote()
        ]

    def Iallgather(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Start Allgather (see there) without waiting; return the Request."""
        return self._start(functools.partial(self._allgather, sendbuf, recvbuf))

    def Allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        """Gather every remote process's sendbuf into recvbuf, in rank order."""
        self.Iallgather(sendbuf, recvbuf).Wait()

    Allgatherv, Iallgatherv = Allgather, Iallgather

    @locks.locked("allgather")
    def allgather(self, sendobj: Any) -> list[Any]:
        """Return the list of every remote process's object, in rank order."""

        def stages(result: list[Any], tag: int) -> Iterator[list[Op]]:
            data = _dumps(sendobj)
            recvs = [self._recv(None, r, tag) for r in self._remote()]
            yield recvs + [self._send(data, r, tag) for r in self._remote()]
            result[0] = [unpickle(op) for op in recvs]

        return self._objects(stages)

    def _alltoall(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        size = len(self._group)
        rspec = buffers.parse_vector(recvbuf, size, writable=True)
        sspec = buffers.parse_vector(sendbuf, size)
        yield [self._recv(rspec.part(r), r, tag) for r in self._remote()] + [
            self._send(sspec.part(r), r, tag) for r in self._remote()
        ]

    def Ialltoall(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Start Alltoall (see there) without waiting; return the Request."""
        return self._start(functools.partial(self._alltoall, sendbuf, recvbuf))

    def Alltoall(self, sendbuf: Any, recvbuf: Any) -> None:
        """Exchange with the remote group: part r of sendbuf to, of recvbuf from, remote rank r."""
        self.Ialltoall(sendbuf, recvbuf).Wait()

    Alltoallv, Ialltoallv = Alltoall, Ialltoall

    def _alltoallw(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        size = len(self._group)
        into = buffers.parse_w(recvbuf, size, writable=True)
        out = buffers.parse_w(sendbuf, size)
        yield [self._recv(into[r], r, tag) for r in self._remote()] + [
            self._send(out[r], r, tag) for r in self._remote()
        ]

    def Ialltoallw(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Start Alltoallw (see there) without waiting; return the Request."""
        return self._start(functools.partial(self._alltoallw, sendbuf, recvbuf))

    def Alltoallw(self, sendbuf: Any, recvbuf: Any) -> None:
        """Alltoall with a count, a byte displacement and a datatype per remote rank."""
        self.Ialltoallw(sendbuf, recvbuf).Wait()

    @locks.locked("alltoall")
    def alltoall(self, sendobj: Any) -> list[Any]:
        """Send item r of `sendobj` to remote rank r; return what each remote rank sent here.

        The result is a list in remote rank order. ValueError for a list that is not one item per
        remote process.
        """

        def stages(result: list[Any], tag: int) -> Iterator[list[Op]]:
            items = [None] * len(self._group) if sendobj is None else list(sendobj)
            if len(items) != len(self._group):
                raise ValueError(f"alltoall: expecting {len(self._group)} items")
            recvs = [self._recv(None, r, tag) for r in self._remote()]
            yield recvs + [self._send(_dumps(items[r]), r, tag) for r in self._remote()]
            result[0] = [unpickle(op) for op in recvs]

        return self._objects(stages)

    # ------------------------------------------------------------------ reductions
    def _reduce(
        self, sendbuf: Any, recvbuf: Any, op: ops.Op, root: int, tag: int
    ) -> Iterator[list[Op]]:
        role = self._role(root)
        if role == "root":
            rspec = buffers.parse(recvbuf, writable=True)
            out = _array(rspec.view, rspec.datatype)
            parts = [np.empty_like(out) for _ in self._remote()]
            recvs = [self._recv(_raw(parts[r]), r, tag) for r in self._remote()]
            yield recvs
            whole(enumerate(recvs), out.nbytes, "Reduce: remote rank")
            out[...] = _fold(parts, op, rspec.datatype)
        elif role == "leaf":
            yield [self._send(buffers.parse(sendbuf).view, root, tag)]

    def Ireduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM, root: int = 0) -> Request:
        """Start Reduce (see there) without waiting; return the Request."""
        return self._start(functools.partial(self._reduce, sendbuf, recvbuf, op, root))

    def Reduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM, root: int = 0) -> None:
        """Reduce the remote group's buffers with `op` at one process.

        root=ROOT: recvbuf gets the fold of every remote process's sendbuf; root=r: this process's
        sendbuf goes into remote rank r's fold; PROC_NULL: nothing. MPI.Exception(ERR_ROOT) for
        another root.
        """
        self.Ireduce(sendbuf, recvbuf, op, root).Wait()

    def reduce(self, sendobj: Any, op: Any = ops.SUM, root: int = 0) -> Any:
        """The fold of the remote processes' objects at ROOT; None elsewhere."""

        def stages(result: list[Any], tag: int) -> Iterator[list[Op]]:
            role = self._role(root)
            if role == "root":
                recvs = [self._recv(None, r, tag) for r in self._remote()]
                yield recvs
                result[0] = functools.reduce(_op_func(op), [unpickle(r) for r in recvs])
            elif role == "leaf":
                yield [self._send(_dumps(sendobj), root, tag)]

        return self._objects(stages)

    def _allreduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op, tag: int) -> Iterator[list[Op]]:
        rspec = buffers.parse(recvbuf, writable=True)
        out = _array(rspec.view, rspec.datatype)
        mine = out.copy() if sendbuf is IN_PLACE else _array(buffers.parse(sendbuf).view,
                                                             rspec.datatype)  # fmt: skip
        parts = [np.empty_like(out) for _ in self._remote()]
        recvs = [self._recv(_raw(parts[r]), r, tag) for r in self._remote()]
        yield recvs + [self._send(_raw(mine), r, tag) for r in self._remote()]
        whole(enumerate(recvs), out.nbytes, "Allreduce: remote rank")
        out[...] = _fold(parts, op, rspec.datatype)

    def Iallreduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> Request:
        """Start Allreduce (see there) without waiting; return the Request."""
        return self._start(functools.partial(self._allreduce, sendbuf, recvbuf, op))

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> None:
        """Reduce the remote group's buffers with `op` into recvbuf.

        recvbuf gets the fold of every remote process's sendbuf (the same on every process of this
        group).
        """
        self.Iallreduce(sendbuf, recvbuf, op).Wait()

    def allreduce(self, sendobj: Any, op: Any = ops.SUM) -> Any:
        """The fold of every remote process's object."""
        return functools.reduce(_op_func(op), self.allgather(sendobj))

    def _reduce_scatter(
        self, sendbuf: Any, recvbuf: Any, counts: list[int] | None, op: ops.Op, tag: int
    ) -> Iterator[list[Op]]:
        """Run the stages of Reduce_scatter: this process's block of the remote processes' fold.

        Each remote process's sendbuf is cut in blocks of the sizes this group's processes asked for
        (`counts`, or each one's recvbuf count), which each tells the remote ones first.
        """
        rspec = buffers.parse(recvbuf, writable=True)
        out = _array(rspec.view, rspec.datatype)
        mine = len(out) if counts is None else counts[self._rank]
        if mine > len(out):
            raise exceptions.Exception(
                exceptions.ERR_TRUNCATE, f"Reduce_scatter: {mine} elements into {len(out)}"
            )
        wanted = [bytearray(_COUNT_BYTES) for _ in self._remote()]
        told = mine.to_bytes(_COUNT_BYTES, "little")
        recvs = [self._recv(memoryview(wanted[r]), r, tag) for r in self._remote()]
        yield recvs + [self._send(memoryview(told), r, tag) for r in self._remote()]
        whole(enumerate(recvs), _COUNT_BYTES, "Reduce_scatter: remote rank")
        full = _array(buffers.parse(sendbuf).view, rspec.datatype)
        sizes, starts, start = [], [], 0
        for r in self._remote():  # each remote rank's block, checked against what is left
            size = int.from_bytes(wanted[r], "little")
            if size > len(full) - start:
                raise exceptions.Exception(
                    exceptions.ERR_TRUNCATE, f"Reduce_scatter: remote rank {r} asked for "
                    f"{size} elements, {len(full) - start} of the {len(full)} to send are left",
                )  # fmt: skip
            sizes.append(size)
            starts.append(start)
            start += size
        parts = [np.empty(mine, out.dtype) for _ in self._remote()]
        recvs = [self._recv(_raw(parts[r]), r, tag) for r in self._remote()]
        yield recvs + [
            self._send(_raw(full[starts[r] : starts[r] + sizes[r]]), r, tag) for r in self._remote()
        ]
        whole(enumerate(recvs), parts[0].nbytes if parts else 0, "Reduce_scatter: remote rank")
        out[:mine] = _fold(parts, op, rspec.datatype)

    def Ireduce_scatter(
        self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None, op: ops.Op = ops.SUM
    ) -> Request:
        """Start Reduce_scatter (see there) without waiting; return the Request.

        ValueError at once when `recvcounts` is not one count >= 0 per process of this group.
        """
        counts = None if recvcounts is None else [int(c) for c in recvcounts]
        if counts is not None and (len(counts) != len(self._local_group) or min(counts) < 0):
            raise ValueError(f"Reduce_scatter: expecting {len(self._local_group)} counts >= 0")
        return self._start(functools.partial(self._reduce_scatter, sendbuf, recvbuf, counts, op))

    def Reduce_scatter(
        self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None, op: ops.Op = ops.SUM
    ) -> None:
        """Reduce the remote group's buffers with `op` and scatter the result over this group.

        Process i of this group gets recvcounts[i] (default: its recvbuf's count) elements of the
        fold of the remote processes' sendbufs (cut in this group's blocks, in rank order).
        ValueError when `recvcounts` is not one count >= 0 per process of this group.
        """
        self.Ireduce_scatter(sendbuf, recvbuf, recvcounts, op).Wait()

    def Ireduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> Request:
        """Start Reduce_scatter_block (see there) without waiting; return the Request."""
        return self.Ireduce_scatter(sendbuf, recvbuf, None, op)

    def Reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> None:
        """Reduce_scatter with recvbuf's count on every process."""
        self.Ireduce_scatter_block(sendbuf, recvbuf, op).Wait()


def _op_func(op: Any) -> Callable[[Any, Any], Any]:
    return op if callable(op) else ops.SUM


def share(comm: Comm, source: Any) -> None:
    """Make `comm` another handle to the communicator `source` (mpi4py's Comm(comm)): the
    two share every attribute. A null one for None or a null source. TypeError when the
    kinds differ (Intercomm(intracomm), Intracomm(intercomm); a plain Comm takes both)."""
    if source is None or (isinstance(source, Comm) and source._null):
        comm.__dict__.update(COMM_NULL.__dict__)
        return
    if not isinstance(source, Comm):
        raise TypeError(f"expecting a communicator, got {type(source).__name__}")
    kinds = (isinstance(comm, Intercomm), isinstance(comm, Intracomm))
    if kinds != (False, False) and kinds != (
        isinstance(source, Intercomm),
        not isinstance(source, Intercomm),
    ):
        raise TypeError(f"{type(source).__name__} is not {type(comm).__name__}")
    comm.__dict__ = source.__dict__


def create_intercomm(
    comm: Intracomm, local_leader: int, peer_comm: Comm, remote_leader: int, tag: int
) -> Intercomm:
    """Intracomm.Create_intercomm (see the module docstring). The leaders exchange their
    group's world ranks and context union on `peer_comm` with `tag`; the rest of each group
    learns them from its leader."""
    engine = comm._check()
    size = comm.Get_size()
    if not 0 <= local_leader < size:
        raise exceptions.Exception(exceptions.ERR_RANK, f"local leader {local_leader}")
    tag = comm._send_tag(tag)
    local = comm.Dup()
    mpi = local._allreduce_int_or(1 if engine.has_mpi else 0)
    mine = list(comm._group)
    leads = comm.Get_rank() == local_leader
    theirs: Any = None
    if leads:
        peer_comm._dest(remote_leader)
        hello = (mine, mine[local_leader], mpi)
        theirs = peer_comm.sendrecv(hello, remote_leader, tag, None, remote_leader, tag)
    remote, leader, their_mpi = local.bcast(theirs, local_leader)
    if not (
        isinstance(remote, list)
        and remote
        and all(type(w) is int and 0 <= w < engine.world_size for w in remote)
        and not set(remote) & set(mine)
        and leader in remote
        and type(their_mpi) is int
    ):
        local.Free()
        raise exceptions.Exception(
            exceptions.ERR_ARG, f"Create_intercomm: bad remote group from the leader: {remote}"
        )

    def union_of(used: int) -> int:  # (both groups' contexts in use, through the leaders)
        union = local._allreduce_int_or(used)
        if leads:
            theirs = peer_comm.sendrecv(union, remote_leader, tag, None, remote_leader, tag)
            union = merge_offers(union, theirs)
        result: int = local.bcast(union, local_leader)
        return result

    ctx = local.agreed_ctx((local._ctx, tag), union_of)
    # fence (see Comm._alloc_ctx): each group, the leaders, each group again
    local.Barrier()
    if leads:
        peer_comm.sendrecv(None, remote_leader, tag, None, remote_leader, tag)
    local.Barrier()
    mirror = mirror_coll = None
    if mpi | their_mpi:
        mirror, mirror_coll = native.inter_mirrors(local, local_leader, leader, tag)
    low = mine[local_leader] < leader
    return Intercomm(engine, mine, remote, ctx, local, mirror, mirror_coll, low)


# The calls that receive into message specs: derived datatypes are unpacked after them (as
# for Intracomm, see comm._RECEIVING).
for _name in (
    "Bcast", "Ibcast", "Gather", "Igather", "Gatherv", "Igatherv", "Scatter", "Iscatter",
    "Scatterv", "Iscatterv", "Allgather", "Iallgather", "Allgatherv", "Iallgatherv",
    "Alltoall", "Ialltoall", "Alltoallv", "Ialltoallv", "Alltoallw", "Ialltoallw", "Reduce",
    "Ireduce", "Allreduce", "Iallreduce", "Reduce_scatter", "Ireduce_scatter",
    "Reduce_scatter_block", "Ireduce_scatter_block",
):  # fmt: skip
    setattr(Intercomm, _name, buffers.unpacking(getattr(Intercomm, _name)))


def _dispatch(name: str) -> Callable[..., Any]:
    """Comm.<name>: the collective of the communicator's kind (mpi4py's Comm has them all;
    mpi4py.util.pkl5 calls MPI.Comm.Bcast(comm, ...))."""

    def call(self: Comm, *args: Any, **kwargs: Any) -> Any:
        method = getattr(type(self), name)
        if method is call:
            raise exceptions.Exception(exceptions.ERR_COMM, f"{name} on {self!r}")
        return method(self, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = (
        f"Run {name} of this communicator's kind (Intracomm or Intercomm; see there).\n\n"
        f"Returns what that {name} returns; MPI.Exception(ERR_COMM) on a communicator "
        "whose class has none (a plain Comm handle)."
    )
    return call


for _name in (
    "Barrier", "Ibarrier", "barrier", "Bcast", "Ibcast", "bcast", "Gather", "Igather",
    "Gatherv", "Igatherv", "gather", "Scatter", "Iscatter", "Scatterv", "Iscatterv", "scatter",
    "Allgather", "Iallgather", "Allgatherv", "Iallgatherv", "allgather", "Alltoall",
    "Ialltoall", "Alltoallv", "Ialltoallv", "Alltoallw", "Ialltoallw", "alltoall", "Reduce",
    "Ireduce", "reduce", "Allreduce", "Iallreduce", "allreduce", "Reduce_scatter",
    "Ireduce_scatter", "Reduce_scatter_block", "Ireduce_scatter_block",
):  # fmt: skip
    if _name not in vars(Comm):
        setattr(Comm, _name, _dispatch(_name))
