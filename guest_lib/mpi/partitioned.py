"""Partitioned point-to-point communication (MPI-4): `Comm.Psend_init`, `Comm.Precv_init`,
and the `Prequest` methods `Pready`, `Pready_range`, `Pready_list`, `Parrived`.

`Psend_init(buf, partitions, dest, tag)` splits `buf` into `partitions` equal parts;
`Precv_init(buf, partitions, source, tag)` likewise (the two sides may use different
partition counts; the buffers must have the same size). Both give an inactive persistent
request. Each `Start` begins one transfer: the sender marks its partitions ready, in any
order and from any thread (`Pready`...), and each partition goes as its own message the
moment it is marked; the receiver may ask whether a partition of its own has arrived
(`Parrived`) before the whole transfer completes. Wait/Test (and Waitall, ...) complete a
round as for any persistent request: the send once every partition was marked and sent, the
receive once every byte arrived (its status: the source, the tag, the size in bytes).

Matching, as MPI-4 says: the k-th `Psend_init` to (dest, tag) of a communicator pairs
with the k-th `Precv_init` from (source, tag) on the destination, once, for every round
of the two requests; wildcards (ANY_SOURCE, ANY_TAG) are not allowed on the receive side.

Wire: every partition message from one rank to another on a communicator goes on its
collective context with the tag T_PART (a tag no collective uses), and begins with a
header (the user tag, the pair's index k, the sender's partition count, the partition's
index). The receiver takes them in arrival order by one posted receive per source at a
time (a staged operation of the engine, so that whatever call makes progress takes them)
and hands each to its request; one for a request that is not started yet (or in an
earlier round) is kept until its Start. A header that does not fit the receive (partition
count or index out of range, a size that does not divide the buffer, a partition twice
in one round) fails that round with MPI.Exception naming the sender.
"""

from __future__ import annotations

import collections
import struct
import threading
from typing import TYPE_CHECKING, Any

from guest_lib.mpi import buffers, constants, exceptions
from guest_lib.mpi.engine import StagedOp
from guest_lib.mpi.matching import DoneOp, Op
from guest_lib.mpi.request import Request

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from guest_lib.mpi.comm import Comm
    from guest_lib.mpi.persistent import Prequest

T_PART = 3 << 16  # collective-context tag of partition messages (collectives use less)
HEADER = struct.Struct("<iQII")  # user tag, pair index k, sender's partitions, partition


def _check_partitions(partitions: int, nbytes: int) -> int:
    """The bytes of one partition; MPI.Exception(ERR_ARG) for partitions < 1, ValueError
    for a buffer that does not split into `partitions` equal parts."""
    if partitions < 1:
        raise exceptions.Exception(exceptions.ERR_ARG, f"partitions {partitions} < 1")
    size, rest = divmod(nbytes, partitions)
    if rest:
        raise ValueError(f"a buffer of {nbytes} bytes does not split into {partitions} parts")
    return size


class _Board:
    """The partitioned state of a communicator (shared by its handles): the pair counters,
    the receives by (source, tag, k), messages kept for receives not started, and the
    sources whose messages a staged receive is taking now."""

    __slots__ = ("kept", "receives", "recv_k", "running", "send_k")

    def __init__(self) -> None:
        self.send_k: dict[tuple[int, int], int] = {}
        self.recv_k: dict[tuple[int, int], int] = {}
        self.receives: dict[tuple[int, int, int], PartRecv] = {}
        self.kept: dict[tuple[int, int, int], collections.deque[tuple[int, int, bytes]]] = {}
        self.running: set[int] = set()


def _board(comm: Comm) -> _Board:
    board: _Board | None = comm.__dict__.get("_partitioned")
    if board is None:
        board = comm.__dict__["_partitioned"] = _Board()
    return board


class PartSend:
    """The sending side of a partitioned pair (a Prequest's `_cell.part`)."""

    def __init__(self, comm: Comm, buf: Any, partitions: int, dest: int, tag: int) -> None:
        dest = comm._dest(dest)
        tag = comm._send_tag(tag)
        self.engine = comm._check()
        self.comm, self.buf, self.dest, self.tag = comm, buf, dest, tag
        view = buffers.parse(buf).view
        self.view = None if isinstance(buf, list | tuple) else view  # a spec packs anew
        self.partitions = partitions
        self.size = _check_partitions(partitions, len(view))
        board = _board(comm)
        self.k = board.send_k.get((dest, tag), 0)
        board.send_k[(dest, tag)] = self.k + 1
        self.lock = threading.Lock()
        self.readied = bytearray(partitions)
        self.nready = 0
        self.sends: list[Op] = []
        self.gate: Op | None = None  # done once every partition of the round is marked

    def start(self) -> Request:
        """A new round: no partition is marked yet."""
        self.readied = bytearray(self.partitions)
        self.nready = 0
        self.sends = []
        self.gate = Op()
        return Request(self.engine.start_staged(StagedOp(self._steps(self.gate))), self.engine)

    def _steps(self, gate: Op) -> Iterator[list[Op]]:
        yield [gate]
        yield self.sends

    def ready(self, partitions: Sequence[int]) -> None:
        """Mark `partitions` ready and send each now. MPI.Exception: ERR_REQUEST on an
        inactive request, ERR_ARG for a partition out of range or marked twice in a round."""
        with self.lock:
            gate = self.gate
            if gate is None:
                raise exceptions.Exception(exceptions.ERR_REQUEST, "Pready before any Start")
            for index in partitions:
                if not 0 <= index < self.partitions:
                    raise exceptions.Exception(
                        exceptions.ERR_ARG, f"partition {index} outside 0..{self.partitions - 1}"
                    )
                if self.readied[index]:
                    raise exceptions.Exception(
                        exceptions.ERR_ARG, f"partition {index} is ready already"
                    )
            view = self.view if self.view is not None else buffers.parse(self.buf).view
            for index in partitions:
                self.readied[index] = 1
                self.nready += 1
                part = view[index * self.size : (index + 1) * self.size]
                header = HEADER.pack(self.tag, self.k, self.partitions, index)
                message = memoryview(header + bytes(part))
                self.sends.append(
                    self.comm._isend_op(message, self.dest, T_PART, self.comm._ctx + 1, False)
                )
            if self.nready == self.partitions:
                gate.done = True  # (the round's staged op now waits for the sends)

    def arrived(self, partition: int) -> bool:
        raise exceptions.Exception(exceptions.ERR_REQUEST, "Parrived on a partitioned send")

    def free(self) -> None:
        """Nothing to release (the sends of a round complete on their own)."""


def _not_a_send(partitions: Sequence[int]) -> None:
    raise exceptions.Exception(exceptions.ERR_REQUEST, "Pready on a partitioned receive")


class PartRecv:
    """The receiving side of a partitioned pair (a Prequest's `_cell.part`)."""

    def __init__(self, comm: Comm, buf: Any, partitions: int, source: int, tag: int) -> None:
        if source == constants.ANY_SOURCE:
            raise exceptions.Exception(
                exceptions.ERR_RANK, "a partitioned receive takes no ANY_SOURCE (MPI-4)"
            )
        if tag == constants.ANY_TAG:
            raise exceptions.Exception(
                exceptions.ERR_TAG, "a partitioned receive takes no ANY_TAG (MPI-4)"
            )
        source = comm._source(source)
        tag = comm._recv_tag(tag)
        self.engine = comm._check()
        self.comm, self.source, self.tag = comm, source, tag
        self.spec = buffers.parse(buf, writable=True, deferred=True)
        self.partitions = partitions
        self.nbytes = len(self.spec.view)
        _check_partitions(partitions, self.nbytes)
        self.board = _board(comm)
        self.k = self.board.recv_k.get((source, tag), 0)
        self.board.recv_k[(source, tag)] = self.k + 1
        self.key = (source, tag, self.k)
        if source != constants.PROC_NULL:
            self.board.receives[self.key] = self
        self.op: Op | None = None  # the round's operation (None: not started)
        self.sent_in = 0  # the sender's partitions in this round (0: none arrived yet)
        self.got = bytearray()
        self.ngot = 0

    def start(self) -> Request:
        """A new round: messages kept for this pair are taken first; then the source's
        messages are taken as they arrive (see the module docstring)."""
        if self.source == constants.PROC_NULL:
            self.op = DoneOp(constants.PROC_NULL, constants.ANY_TAG)
            return Request(self.op, self.engine)
        op = self.op = Op()
        op.tag = self.tag
        self.sent_in, self.got, self.ngot = 0, bytearray(), 0
        with self.engine.lock:  # (the staged receives run under it too)
            kept = self.board.kept.get(self.key)
            while kept and not op.done:
                self.deliver(*kept.popleft())
            if not op.done and self.source not in self.board.running:
                self.board.running.add(self.source)
                self.engine.start_staged(StagedOp(self._take(), self._failed))
        return Request(op, self.engine, self.comm._rank_of)

    def _take(self) -> Iterator[list[Op]]:
        """The source's messages, one posted receive at a time, while a started receive
        from it misses data; each goes to its receive or is kept."""
        board, comm, source = self.board, self.comm, self.source
        while any(
            recv.source == source and recv.op is not None and not recv.op.done
            for recv in board.receives.values()
        ):
            got = comm._irecv_op(None, source, T_PART, comm._ctx + 1)
            yield [got]
            _route(board, source, got.obj, comm)
        board.running.discard(source)

    def _failed(self, error: int, reason: str) -> None:
        """The source's staged receive failed (the peer is gone; StagedOp's `on_fail` gives
        its error class and reason): every started receive from it fails, with ERR_OTHER."""
        self.board.running.discard(self.source)
        for recv in list(self.board.receives.values()):
            if recv.source == self.source and recv.op is not None and not recv.op.done:
                recv.op.error, recv.op.done = exceptions.ERR_OTHER, True

    def deliver(self, parts: int, index: int, data: bytes) -> None:
        """Partition `index` of the sender's `parts` into its place; a message that does
        not fit fails the round (see the module docstring)."""
        op = self.op
        assert op is not None
        world = self.comm._group[self.source] if self.source >= 0 else self.source
        op.source = world
        size, rest = divmod(self.nbytes, parts) if parts else (0, 1)
        if rest or not 0 <= index < parts or (self.sent_in and parts != self.sent_in):
            op.error, op.done = exceptions.ERR_OTHER, True
            return
        if not self.sent_in:
            self.sent_in, self.got = parts, bytearray(parts)
        if self.got[index] or len(data) != size:  # twice in a round, or a wrong size
            op.error = exceptions.ERR_OTHER if self.got[index] else exceptions.ERR_TRUNCATE
            op.done = True
            return
        self.spec.view[index * size : (index + 1) * size] = data
        self.got[index] = 1
        self.ngot += 1
        if self.spec.unpack is not None:  # a datatype that packs: the user's memory now
            self.spec.unpack()
        if self.ngot == parts:
            op.count = self.nbytes
            op.done = True

    def arrived(self, partition: int) -> bool:
        """Whether receive partition `partition` is all there (True when inactive: the last
        round put it there). MPI.Exception(ERR_ARG) for one out of range."""
        if not 0 <= partition < self.partitions:
            raise exceptions.Exception(
                exceptions.ERR_ARG, f"partition {partition} outside 0..{self.partitions - 1}"
            )
        op = self.op
        if op is None or op.done:
            return True
        self.engine.progress()
        if op.done:
            return True
        parts = self.sent_in
        if not parts:
            return False
        # In units of 1/(parts * partitions) of the buffer, receive partition i covers
        # [i * parts, (i + 1) * parts) and send partition j [j * partitions, (j + 1) * ...).
        first = partition * parts // self.partitions
        last = ((partition + 1) * parts - 1) // self.partitions
        return all(self.got[first : last + 1])

    ready = staticmethod(_not_a_send)

    def free(self) -> None:
        """Forget the pair: messages for it are no longer kept."""
        self.board.receives.pop(self.key, None)
        self.board.kept.pop(self.key, None)


def _route(board: _Board, source: int, message: Any, comm: Comm) -> None:
    """Hand a partition message from `source` to its receive, or keep it for a later
    round; a message shorter than its header fails every started receive from the peer."""
    data = bytes(message or b"")
    if len(data) < HEADER.size:
        for other in board.receives.values():
            if other.source == source and other.op is not None and not other.op.done:
                other.op.source = comm._group[source]
                other.op.error, other.op.done = exceptions.ERR_OTHER, True
        return
    tag, k, parts, index = HEADER.unpack_from(data)
    key = (source, tag, k)
    payload = data[HEADER.size :]
    recv: PartRecv | None = board.receives.get(key)
    if recv is not None and recv.op is not None and not recv.op.done and not board.kept.get(key):
        recv.deliver(parts, index, payload)
    else:
        board.kept.setdefault(key, collections.deque()).append((parts, index, payload))


def psend_init(
    comm: Comm, buf: Any, partitions: int, dest: int, tag: int = 0, info: Any = None
) -> Prequest:
    """Create a partitioned send of `buf` in `partitions` parts to `dest`.

    See the module docstring. MPI.Exception: ERR_RANK, ERR_TAG, ERR_COMM, ERR_ARG (partitions < 1);
    ValueError if the buffer does not split evenly. `info` is accepted and not used.
    """
    from guest_lib.mpi.persistent import Prequest

    return Prequest.partitioned(PartSend(comm, buf, partitions, dest, tag))


def precv_init(
    comm: Comm,
    buf: Any,
    partitions: int,
    source: int = constants.ANY_SOURCE,
    tag: int = constants.ANY_TAG,
    info: Any = None,
) -> Prequest:
    """Create a partitioned receive into `buf` in `partitions` parts from `source`.

    See the module docstring. MPI.Exception: ERR_RANK (also for ANY_SOURCE), ERR_TAG (also for
    ANY_TAG), ERR_COMM, ERR_ARG; ValueError if the buffer does not split evenly. `info` is not used.
    """
    from guest_lib.mpi.persistent import Prequest

    return Prequest.partitioned(PartRecv(comm, buf, partitions, source, tag))
