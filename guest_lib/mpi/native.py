"""The mpi4py route: ranks that share no region talk through the real mpi4py (MPICH).

The only module of the MPI face that uses mpi4py. It holds:
- `MPI()`: mpi4py's own extension module, whatever `mpi4py.MPI` answers with in this
  process. In the zero-change mode (`guest_lib.mpi.mpi4py_shim`) `import mpi4py.MPI` gives
  this project's module; the code that hands traffic between regions to MPICH must still
  reach mpi4py's. `MPI()` returns the module bootstrap imported (recorded by `remember`),
  else mpi4py's, imported past the shim.
- the world under mpiexec (`world_rank_size`, `allgather`, `barrier`, `abort`);
- `MpiRoute`, the route (see `routes`) of an mpi4py-routed rank, and `MpiOp`, an mpi4py
  request the engine tests in every progress pass (`progress`);
- the communicators' mirrors: mpi4py communicators with the same group and rank order as
  a communicator of this face, one for its point-to-point context and one for its
  collective context (`world_mirrors`, `dup_mirrors`, `split_mirrors`, `group_mirrors`,
  `free_mirrors`).
"""

from __future__ import annotations

import importlib
import sys
from array import array
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from guest_lib.mpi import constants, exceptions
from guest_lib.mpi.matching import Op, RecvOp
from guest_lib.mpi.pickling import dumps, loads
from guest_lib.mpi.routes import MPI4PY, Route

if TYPE_CHECKING:
    from guest_lib.mpi.comm import Comm
    from guest_lib.mpi.engine import Engine
    from guest_lib.mpi.status import Status

_real: list[ModuleType] = []


def remember(module: ModuleType) -> None:
    """Record mpi4py's own MPI module."""
    if not _real:
        _real.append(module)


def MPI() -> ModuleType:
    """mpi4py's own MPI extension module (ImportError when mpi4py is not installed)."""
    if _real:
        return _real[0]
    shown = sys.modules.get("mpi4py.MPI")
    if shown is not None and not shown.__name__.startswith("guest_lib."):
        remember(shown)
        return shown
    package = sys.modules.get("mpi4py")
    sys.modules.pop("mpi4py.MPI", None)
    try:
        module = importlib.import_module("mpi4py.MPI")
    finally:
        if shown is not None:  # the shim stays what `import mpi4py.MPI` answers
            sys.modules["mpi4py.MPI"] = shown
            if package is not None:
                package.MPI = shown  # type: ignore[attr-defined]
    remember(module)
    return module


# ---------------------------------------------------------------------- the world
def world_rank_size() -> tuple[int, int]:
    """(rank, size) in mpi4py's COMM_WORLD."""
    world = MPI().COMM_WORLD
    return world.Get_rank(), world.Get_size()


def allgather(item: Any) -> list[Any]:
    """mpi4py's COMM_WORLD.allgather(item)."""
    result: list[Any] = MPI().COMM_WORLD.allgather(item)
    return result


def barrier() -> None:
    MPI().COMM_WORLD.Barrier()


def abort(errorcode: int) -> None:
    """MPI_Abort of the whole job through mpi4py (does not return)."""
    MPI().COMM_WORLD.Abort(errorcode)


# ---------------------------------------------------------------------- mirrors
def world_mirrors() -> tuple[Any, Any]:
    """COMM_WORLD's mirrors (point-to-point, collective)."""
    world = MPI().COMM_WORLD
    return world.Dup(), world.Dup()


def dup_mirrors(comm: Comm) -> tuple[Any, Any]:
    """The mirrors of a Dup of `comm` (collective over it)."""
    return comm._mirror.Dup(), comm._mirror_coll.Dup()


def split_mirrors(comm: Comm, color: int, key: int) -> tuple[Any, Any]:
    """The mirrors of a Split of `comm` (collective over it; COMM_NULLs for UNDEFINED)."""
    return comm._mirror.Split(color, key), comm._mirror_coll.Split(color, key)


def group_mirrors(comm: Comm, ranks: list[int], tag: int) -> tuple[Any, Any]:
    """The mirrors of a Create_group of `comm`'s `ranks` (collective over them)."""
    group = comm._mirror.Get_group().Incl(ranks)
    try:
        return comm._mirror.Create_group(group, tag), comm._mirror_coll.Create_group(group, tag)
    finally:
        group.Free()


def _world_comm(group: list[int]) -> Any:
    """mpi4py's communicator of the world ranks `group`, in that order (collective over
    them: COMM_WORLD.Create_group)."""
    world = MPI().COMM_WORLD
    handle = world.Get_group().Incl(group)
    try:
        return world.Create_group(handle, 0)
    finally:
        handle.Free()


def world_group_mirrors(group: list[int]) -> tuple[Any, Any]:
    """The mirrors of a communicator of the world ranks `group`, in that order (collective
    over them)."""
    return _world_comm(group), _world_comm(group)


def inter_mirrors(local: Comm, local_leader: int, remote_leader: int, tag: int) -> tuple[Any, Any]:
    """The mirrors of an intercommunicator between `local`'s group and the group whose
    leader is world rank `remote_leader` (collective over both groups)."""
    made = local._mirror is None
    lmirror = _world_comm(local._group) if made else local._mirror
    try:
        inter = lmirror.Create_intercomm(local_leader, MPI().COMM_WORLD, remote_leader, tag)
        return inter, inter.Dup()
    finally:
        if made:
            lmirror.Free()


# ------------------------------------------------------------- object collectives
# mpi4py's own object collectives (`bcast`, `allgather`, ...) make, on a communicator's
# first one, a hidden duplicate (MPI_Comm_dup) while holding the GIL. With threads, that
# Comm_dup waits for its peer processes while no other thread of this process can run:
# when two threads of two processes make the first object collective of two different
# communicators at once, each process's GIL holder waits for a thread that the other
# process's holder keeps from running (a deadlock across processes). These do the same
# through the buffer collectives, which release the GIL while MPICH waits.
def bcast_obj(mpicomm: Any, obj: Any, root: int) -> Any:
    """mpi4py communicator `mpicomm`'s broadcast of `obj` from `root` (collective);
    returns root's object on every member."""
    _M = MPI()
    data = dumps(obj) if mpicomm.Get_rank() == root else None
    length = array("q", [0 if data is None else len(data)])
    mpicomm.Bcast([length, 1, _M.INT64_T], root)
    if data is None:
        data = memoryview(bytearray(length[0]))
    mpicomm.Bcast([data, length[0], _M.BYTE], root)
    return loads(data)


def allgather_obj(mpicomm: Any, obj: Any) -> list[Any]:
    """mpi4py communicator `mpicomm`'s allgather of `obj` (collective); returns every
    member's object, in rank order."""
    _M = MPI()
    data = dumps(obj)
    lengths = array("q", bytes(8 * mpicomm.Get_size()))
    mpicomm.Allgather([array("q", [len(data)]), 1, _M.INT64_T], [lengths, 1, _M.INT64_T])
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    gathered = memoryview(bytearray(sum(lengths)))
    mpicomm.Allgatherv([data, len(data), _M.BYTE], [gathered, (list(lengths), offsets), _M.BYTE])
    return [loads(gathered[o : o + n]) for o, n in zip(offsets, lengths, strict=True)]


def free_mirrors(mirrors: tuple[Any, Any]) -> None:
    """Free a communicator's mpi4py mirrors, dropping first the messages that came on them
    and were never received (as Comm.Free drops those on shared memory). Left in MPICH's
    queues, such a message (e.g. one of a collective abandoned by another member) would
    match a receive of a later communicator to which MPICH gives the freed context."""
    _M = MPI()
    status = _M.Status()
    for mirror in mirrors:
        while (message := mirror.improbe(_M.ANY_SOURCE, _M.ANY_TAG, status)) is not None:
            message.Recv([bytearray(status.Get_count(_M.BYTE)), _M.BYTE])
        mirror.Free()


# ---------------------------------------------------------------------- requests
class MpiOp(Op):
    """An mpi4py request; `finish(status)` runs once it completes."""

    __slots__ = ("finish", "request")

    def __init__(self, request: Any, finish: Callable[[Any], None] | None = None) -> None:
        super().__init__()
        self.request = request
        self.finish = finish


def track(engine: Engine, op: MpiOp) -> MpiOp:
    """Test an mpi4py request in every progress pass until it completes."""
    with engine.lock:
        engine.mpi_active.append(op)
    return op


def _count_sent(engine: Engine, nbytes: int) -> None:
    """Count a message of `nbytes` handed to mpi4py (`mpi_messages`, `mpi_bytes`)."""
    with engine.lock:
        engine.mpi_messages += 1
        engine.mpi_bytes += nbytes


def progress(engine: Engine) -> bool:
    """Match posted receives with mpi4py sources, test mpi4py requests. True iff any moved."""
    moved = bool(engine.mpi_polling) and poll(engine)
    for tracker in list(engine.mpi_active):
        if tracker.request.Test():
            engine.mpi_active.remove(tracker)
            if tracker.finish is not None:
                tracker.finish(None)
            tracker.done = moved = True
    return moved


def poll(engine: Engine) -> bool:
    """Match the posted receives that have an mpi4py side (`op.mpi`), in post order, by
    mpi4py's matched probe; start the receive of each that matched. True iff any did."""
    _M = MPI()
    moved = False
    unmatched: list[tuple[Any, int, int]] = []  # (mirror, src, tag) not matched this pass
    for op in list(engine.posted):
        if op.mpi is None:
            continue
        status = _M.Status()
        tag = _M.ANY_TAG if op.want_tag == constants.ANY_TAG else op.want_tag
        src = _M.ANY_SOURCE if op.mpi_src == constants.ANY_SOURCE else op.mpi_src
        # A message belongs to the first posted receive it matches (MPI's non-overtaking
        # rule). The first message this receive could take is probed without taking it: if
        # an earlier receive that found nothing this pass matches it too (it arrived since),
        # it is left for that receive's turn next pass, and this receive waits behind it.
        if not op.mpi.iprobe(src, tag, status):
            unmatched.append((op.mpi, src, tag))
            continue
        found_src, found_tag = status.Get_source(), status.Get_tag()
        if any(
            mirror is op.mpi and s in (found_src, _M.ANY_SOURCE) and t in (found_tag, _M.ANY_TAG)
            for mirror, s, t in unmatched
        ):
            unmatched.append((op.mpi, src, tag))
            continue
        # the first message of (found_src, found_tag) is the one probed: none before it
        # has that envelope, or the probe above would have found that one
        message = op.mpi.improbe(found_src, found_tag, status)
        if message is None:  # (taken by mpi4py code outside the engine meanwhile)
            unmatched.append((op.mpi, src, tag))
            continue
        engine.withdraw(op)
        nbytes = status.Get_count(_M.BYTE)
        op.begin(op.mpi_world[status.Get_source()], status.Get_tag())
        if op.sink is None and op.view is not None and nbytes <= len(op.view):
            request = message.Irecv([op.view, nbytes, _M.BYTE])
            _track_recv(engine, op, request, nbytes, None)
        else:
            scratch = bytearray(nbytes)
            request = message.Irecv([scratch, _M.BYTE])
            _track_recv(engine, op, request, nbytes, scratch)
        moved = True
    return moved


def _track_recv(engine: Engine, op: RecvOp, request: Any, nbytes: int, scratch: Any) -> None:
    def finish(_status: Any) -> None:
        if scratch is not None:
            op.write(0, memoryview(scratch))
        op.count = nbytes
        op.finish()

    tracker = MpiOp(request, finish)
    tracker.obj = op
    engine.mpi_active.append(tracker)


# ---------------------------------------------------------------------- the route
class MpiRoute(Route):
    """A rank reached through mpi4py, on the communicator's mirror (same rank numbers).

    `direct`: blocking calls may go straight to mpi4py when the engine is quiet (every
    rank the route stands for is on mpi4py). ANY_SOURCE on a communicator with ranks on
    both kinds of route uses `direct=False`: receives are posted, matched on both sides."""

    __slots__ = ("direct",)
    code = MPI4PY
    local = False

    def __init__(self, direct: bool = True) -> None:
        self.direct = direct

    @staticmethod
    def _mirror(comm: Comm, ctx: int) -> Any:
        return comm._mirror if ctx == comm._ctx else comm._mirror_coll

    def isend(self, comm: Comm, data: memoryview, rank: int, tag: int, ctx: int, sync: bool) -> Op:
        engine = comm._engine
        assert engine is not None
        mirror = self._mirror(comm, ctx)
        spec = [data, len(data), MPI().BYTE]
        _count_sent(engine, len(data))
        request = mirror.Issend(spec, rank, tag) if sync else mirror.Isend(spec, rank, tag)
        return track(engine, MpiOp(request))

    def send(self, comm: Comm, data: memoryview, rank: int, tag: int, ctx: int, sync: bool) -> None:
        engine = comm._engine
        assert engine is not None
        if not engine.quiet():
            super().send(comm, data, rank, tag, ctx, sync)
            return
        mirror = self._mirror(comm, ctx)
        spec = [data, len(data), MPI().BYTE]
        _count_sent(engine, len(data))
        if sync:  # (mpi4py's blocking calls: without the engine lock, see `engine`)
            mirror.Ssend(spec, rank, tag)
        else:
            mirror.Send(spec, rank, tag)

    def post(self, comm: Comm, op: RecvOp, rank: int) -> RecvOp:
        op.mpi = self._mirror(comm, op.ctx)
        op.mpi_src = rank
        op.mpi_world = comm._group
        return comm._engine.post(op)  # type: ignore[union-attr]

    def recv_into(
        self, comm: Comm, view: Any, rank: int, tag: int, ctx: int, status: Status | None
    ) -> bool:
        if not self.direct or not comm._engine.quiet():  # type: ignore[union-attr]
            return False
        _recv(comm, view, rank, tag, ctx, status)
        return True

    def recv_bytes(
        self, comm: Comm, rank: int, tag: int, ctx: int, status: Status | None
    ) -> bytes | None:
        if not self.direct or not comm._engine.quiet():  # type: ignore[union-attr]
            return None
        return _recv(comm, None, rank, tag, ctx, status)

    def iprobe(self, comm: Comm, rank: int, tag: int, status: Status | None) -> bool:
        _M = MPI()
        mstatus = _M.Status()
        msrc = _M.ANY_SOURCE if rank == constants.ANY_SOURCE else rank
        mtag = _M.ANY_TAG if tag == constants.ANY_TAG else tag
        if not comm._mirror.Iprobe(msrc, mtag, mstatus):
            return False
        if status is not None:
            status._set(mstatus.Get_source(), mstatus.Get_tag(), mstatus.Get_count())
        return True


def _recv(
    comm: Comm, view: memoryview | None, rank: int, tag: int, ctx: int, status: Status | None
) -> bytes:
    """Blocking receive through mpi4py itself into `view`; `view` None: whatever size comes
    (object receives). Returns the bytes received (empty when they went to `view`).
    MPI.Exception(ERR_TRUNCATE) (status filled, `view` holding the prefix) if the message is
    longer than `view`."""
    _M = MPI()
    mirror = MpiRoute._mirror(comm, ctx)
    mstatus = _M.Status()
    msrc = _M.ANY_SOURCE if rank == constants.ANY_SOURCE else rank
    mtag = _M.ANY_TAG if tag == constants.ANY_TAG else tag
    message = mirror.Mprobe(msrc, mtag, mstatus)
    nbytes = mstatus.Get_count(_M.BYTE)
    data = b""
    error = 0
    if view is None:
        scratch = bytearray(nbytes)
        message.Recv([scratch, _M.BYTE])
        data = bytes(scratch)
    elif nbytes > len(view):
        scratch = bytearray(nbytes)
        message.Recv([scratch, _M.BYTE])
        view[:] = scratch[: len(view)]
        error, nbytes = exceptions.ERR_TRUNCATE, len(view)
    else:
        message.Recv([view, nbytes, _M.BYTE])
    if status is not None:
        status._set(mstatus.Get_source(), mstatus.Get_tag(), nbytes, error)
    if error:
        raise exceptions.Exception(error, f"receive from rank {mstatus.Get_source()}")
    return data
