"""One-sided communication: mpi4py's `Win` (MPI windows) over regions and any route.

Flavors:
- `Win.Allocate_shared`: the window memory is one block of the region's window heap
  (ivshmem_comm.winheap), cut in the members' segments in rank order (contiguous, no
  padding): every member maps every segment (`Shared_query`), across VMs when the members
  run in different guests that share the region. Every member must reach the others
  through this region (use `Comm.Split_type(COMM_TYPE_SHARED)`); else MPI.Exception
  (ERR_RMA_SHARED) on every member. A one-member window (or a process without a region)
  gets private memory.
- `Win.Create` (the user's memory), `Win.Allocate` (new private memory), `Win.Create_dynamic`
  (memory `Attach`ed later; target displacements are addresses, as in MPI).

RMA model (stated in README, "MPI"): each window has a private communicator (a Dup of the
one given). Operations on another rank's private memory are *active messages*: the origin
sends a request on that communicator; the target's window service (a receive the engine
keeps posted, see `_serve`) applies it when the target's engine makes progress, i.e. while
the target is inside any MPI call (a blocking wait, Test, Iprobe, a collective, an RMA
call). A target computing outside MPI delays its origins until its next call: as in MPI
implementations without a progress thread. Requests from one origin are applied in the
order they were issued (non-overtaking messages); accumulates are applied by the target
one at a time, so they are atomic per element against each other, as MPI requires.
`Put`/`Get` to this rank's own memory, or to any member's segment of an Allocate_shared
window, are direct copies (load/store, no message). Because active messages use the
ordinary routes, windows work between ranks of different regions too (the MPICH route of
hybrid jobs), except Allocate_shared.

Completion: `Put`/`Accumulate` copy the origin data into the request at the call (local
completion at once); `Get`, `Get_accumulate`, `Fetch_and_op` and `Compare_and_swap` wait
for the target's reply; `Rget`/`Rget_accumulate` return a request completed by it. Remote
completion (`Flush`, `Unlock`, `Complete`) is a FLUSH/UNLOCK round trip to each target
with Put/Accumulate not known to be applied (none when there is none): the reply comes after
every earlier request of this origin was applied, and carries the error of any of them
(ERR_RMA_RANGE for a range outside the target window, ...). `Fence` = remote completion
of every target touched, then the window's own barrier by messages. `Lock`/`Unlock`:
lazy, as MPICH: `Lock` sends nothing; the first request to the target goes right behind a
LOCK request, and the target keeps an origin's requests behind its LOCK until it grants it
(in request order: shared locks together, an exclusive one alone); load/store access (own
memory, shared segments) waits for the grant; `Unlock` sends nothing after an epoch
without requests, a RELEASE without reply when every request is known applied, else the
UNLOCK round trip.
`Post`/`Start`/`Complete`/`Wait`/`Test`: notices through the service. Assertions (MODE_*)
are accepted and not needed. Target datatypes must be contiguous (a predefined type or one
made of it without gaps): MPI.Exception(ERR_TYPE) otherwise.

Memory model: WIN_UNIFIED (the target applies operations to the window memory itself).
Threads (THREAD_MULTIPLE): the service runs inside the engine's progress, under its lock;
any thread may call any window function, with MPI's rules: one epoch per (process,
target) at a time (threads of a process take turns on a target), collective calls (Fence,
Free) from one thread at a time. Threads making their first requests to a target at once
send one LOCK (`_Window.guard`).
"""

from __future__ import annotations

import collections
import itertools
import os
import struct
import threading
import traceback
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from guest_lib.mpi import buffers, constants, errhandler, exceptions, ops
from guest_lib.mpi.engine import StagedOp
from guest_lib.mpi.group import Group
from guest_lib.mpi.handles import Handle, Same
from guest_lib.mpi.info import Info
from guest_lib.mpi.matching import DoneOp, Op, RecvOp
from guest_lib.mpi.memory import Get_address
from guest_lib.mpi.memory import buffer as _buffer
from guest_lib.mpi.request import Request
from ivshmem_comm import layout, ring
from ivshmem_comm.errors import IvshmemError
from ivshmem_comm.winheap import Block, WindowHeap


class _PureMemoryBase:
    """Win's base in the pure-Python mode (IVSHMEM_COMM_PUREPYTHON=1, or no C accelerator):
    a Python 3.11 class cannot export memory (PEP 688's __buffer__ is 3.12), so there
    memoryview(win) / numpy.asarray(win) raise TypeError, and mpi4py.util.sync, which uses
    them, does not work. Win.tomemory() gives the same memory in both modes."""

    _exported: Any = None


if TYPE_CHECKING:  # one static base for the checker; the exported names are the same
    _MemoryBase = _PureMemoryBase
else:
    _MemoryBase = _PureMemoryBase if ring.MemoryExporter is None else ring.MemoryExporter

WIN_FLAVOR_CREATE, WIN_FLAVOR_ALLOCATE, WIN_FLAVOR_DYNAMIC, WIN_FLAVOR_SHARED = 1, 2, 3, 4
WIN_SEPARATE, WIN_UNIFIED = 1, 2
WIN_BASE, WIN_SIZE, WIN_DISP_UNIT = 0x66000001, 0x66000003, 0x66000005
WIN_CREATE_FLAVOR, WIN_MODEL = 0x66000007, 0x66000009
LOCK_EXCLUSIVE, LOCK_SHARED = 234, 235
LAZY, ASKED, GRANTED = range(3)  # the states of an origin's passive epoch (_Window.locks)
MODE_NOCHECK, MODE_NOSTORE, MODE_NOPUT, MODE_NOPRECEDE, MODE_NOSUCCEED = (
    1024, 2048, 4096, 8192, 16384,
)  # fmt: skip
KEYVAL_INVALID = constants.KEYVAL_INVALID

# ------------------------------------------------------------------ wire
# A request: header, then its data (Put/Accumulate: the origin bytes; Compare_and_swap: the
# new value then the compare value). `disp` is in the target's displacement units (an
# address for a dynamic window); `nbytes` the target bytes; `code` the numpy type string of
# the target elements (accumulates).
REQ = struct.Struct("<BBBxIqq8s")  # kind, op index / lock type, flags, reply tag, disp,
# nbytes, element code
REPLY = struct.Struct("<B7x")  # error class (0: success), then the data or the error text
(K_PUT, K_GET, K_ACC, K_GACC, K_CAS, K_FLUSH, K_LOCK, K_UNLOCK, K_POST, K_COMPLETE,
 K_RELEASE) = range(1, 12)  # fmt: skip
_REPLIES = frozenset({K_GET, K_GACC, K_CAS, K_FLUSH, K_LOCK, K_UNLOCK})
T_SERVICE = 0  # the tag of requests on the window's communicator
T_BARRIER = constants.TAG_UB  # the window's barrier; replies use 1..TAG_UB - 1
ACC_OPS = (ops.SUM, ops.PROD, ops.MAX, ops.MIN, ops.LAND, ops.BAND, ops.LOR, ops.BOR, ops.LXOR,
           ops.BXOR, ops.REPLACE, ops.NO_OP)  # fmt: skip
_NUMERIC = "biufc"


def _err(code: int, detail: str) -> exceptions.Exception:
    return exceptions.Exception(code, detail)


# ------------------------------------------------------------------ keyvals
_keyvals: dict[int, tuple[Any, Any]] = {}
_next_keyval = itertools.count(0x66000100)


class _Reply:
    """The sink of one reply: status head, then data into `view` (or the error text)."""

    __slots__ = ("error", "head", "text", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.head = b""
        self.text = b""
        self.error = 0

    def __call__(self, offset: int, data: Any) -> None:
        data = memoryview(data).cast("B")
        if offset < REPLY.size:
            take = REPLY.size - offset
            self.head += bytes(data[:take])
            data, offset = data[take:], REPLY.size
            if len(self.head) == REPLY.size:
                self.error = self.head[0]
        if not len(data):
            return
        if self.error:
            self.text += bytes(data)
            return
        start = offset - REPLY.size
        if start + len(data) > len(self.view):
            self.error = exceptions.ERR_INTERN
            self.text = b"a reply longer than the data asked for"
            return
        self.view[start : start + len(data)] = data

    def check(self, op: Op, who: str) -> None:
        """MPI.Exception for an error reply, or one that is not the size asked for."""
        if self.error:
            raise _err(self.error, f"{who}: {self.text.decode(errors='replace')}")
        if op.count != REPLY.size + len(self.view):
            raise _err(exceptions.ERR_INTERN, f"{who} sent a reply of {op.count} bytes, "
                       f"not {REPLY.size + len(self.view)}")  # fmt: skip


class _Window:
    """The state of one window, shared by every handle on it."""

    def __init__(self, comm: Any, memory: memoryview, disp_unit: int, flavor: int) -> None:
        self.comm = comm  # the private communicator (a Dup)
        self.engine = comm._engine
        self.memory = memory
        self.base = Get_address(memory) if len(memory) else 0
        self.disp_unit = disp_unit
        self.flavor = flavor
        self.owner: Any = None  # what keeps `memory` alive (a buffer), if anything
        self.segments: list[tuple[memoryview, int]] = []  # Allocate_shared: every member's
        self.block: Block | None = None  # Allocate_shared: the heap block (None: private)
        self.heap: WindowHeap | None = None
        self.attached: list[tuple[int, memoryview]] = []  # dynamic: (address, memory)
        self.name = ""
        self.hints: dict[str, str] = {}
        self.attrs: dict[int, Any] = {}
        # origin side
        self.tags = itertools.cycle(range(1, T_BARRIER))
        self.dirty: set[int] = set()  # targets with requests not known to be applied
        self.pending: dict[int, list[Op]] = collections.defaultdict(list)  # Rget & co
        self.start_group: list[int] = []
        # Passive epochs: target -> [lock type, state, the grant's receive or None]; state
        # LAZY: nothing sent yet (an Unlock then sends nothing either), ASKED: the LOCK
        # request went ahead of the first request (its grant is also in `pending`),
        # GRANTED: the grant is in (load/store access waits for it).
        self.locks: dict[int, list[Any]] = {}
        self.guard = threading.Lock()  # makes LAZY -> ASKED one LOCK request (threads)
        # target side
        self.lock_excl = -1  # comm rank holding the exclusive lock, or -1
        self.lock_shared: collections.Counter[int] = collections.Counter()
        self.lock_queue: collections.deque[tuple[int, int, int]] = collections.deque()
        # origin -> its requests that arrived behind its LOCK request not granted yet:
        # applied in order once it is (an origin sends its first request right behind the
        # LOCK, without waiting for the grant)
        self.backlog: dict[int, collections.deque[bytes]] = {}
        self.errors: dict[int, tuple[int, str]] = {}  # origin -> first error of a Put/Acc
        self.posts: collections.Counter[int] = collections.Counter()  # POST notices seen
        self.completes: collections.Counter[int] = collections.Counter()
        self.post_group: list[int] = []
        self.closing = False
        self.service_op: Op | None = None
        self.view: memoryview | None = None  # see exported()
        self.staged = self.engine.start_staged(StagedOp(self._serve()))

    def exported(self) -> memoryview:
        """The view of `memory` (final by then) that every handle's buffers are taken from
        (memoryview(win): Win's C base type acquires a buffer of it per export)."""
        if self.view is None:
            self.view = memoryview(self.memory)
        return self.view

    def unexport(self) -> None:
        """Withdraw the memory from the buffer protocol (Free's first step): BufferError,
        and nothing changed, while a buffer of it is out (a memoryview or numpy array made
        from a handle of this window)."""
        if self.view is not None:
            self.view.release()  # BufferError when exported: checked by memoryview itself

    # ------------------------------------------------------------------ service (target)
    def _serve(self) -> Iterator[list[Op]]:
        """The window service: one posted receive of requests at a time (see the module
        docstring); each request is applied, answered, and the next receive posted."""
        comm = self.comm
        while True:
            op = comm._irecv_op(None, constants.ANY_SOURCE, T_SERVICE, comm._ctx)
            self.service_op = op
            yield [op]
            if self.closing or op.cancelled:
                return
            self._take(comm._rank_of.get(op.source, -1), op.obj)

    def _take(self, source: int, payload: Any) -> None:
        """Apply one request from comm rank `source`, or keep it in the source's backlog
        while a LOCK of that source waits; an error is recorded for the source's next
        Flush/Unlock/Fence, never the service's end."""
        backlog = self.backlog.get(source)
        if backlog is not None:
            backlog.append(bytes(payload))  # copied: the message's buffer is not ours
            return
        try:
            self._apply(source, payload)
        except exceptions.Exception as exc:  # a malformed request: answered or recorded
            self.errors.setdefault(source, (exc.Get_error_class(), str(exc)))
        except Exception as exc:
            error = (exceptions.ERR_INTERN, f"{type(exc).__name__}: {exc}")
            self.errors.setdefault(source, error)

    def _reply(self, origin: int, tag: int, data: Any = b"", error: int = 0) -> None:
        payload = REPLY.pack(error) + bytes(data)
        self.comm._isend_op(memoryview(payload), origin, tag, self.comm._ctx, False)

    def _target(self, origin: int, disp: int, nbytes: int) -> memoryview:
        """The bytes of this window a request names. MPI.Exception(ERR_RMA_RANGE) naming
        the origin when they are not all inside it."""
        if nbytes < 0:
            raise _err(exceptions.ERR_RMA_RANGE, f"rank {origin} asked for {nbytes} bytes")
        if self.flavor == WIN_FLAVOR_DYNAMIC:
            for address, memory in self.attached:
                if address <= disp and disp + nbytes <= address + len(memory):
                    return memory[disp - address : disp - address + nbytes]
        else:
            start = disp * self.disp_unit
            if disp >= 0 and start + nbytes <= len(self.memory):
                return self.memory[start : start + nbytes]
        raise _err(exceptions.ERR_RMA_RANGE,
                   f"rank {origin}: {nbytes} bytes at displacement {disp} are outside the "
                   f"target window")  # fmt: skip

    def _apply(self, origin: int, payload: Any) -> None:
        """Apply one request from comm rank `origin` (copied once out of the message: every
        field is checked before use; errors name the origin)."""
        if origin < 0 or len(payload) < REQ.size:
            raise _err(exceptions.ERR_INTERN, f"rank {origin} sent a malformed RMA request")
        kind, arg, _, tag, disp, nbytes, code = REQ.unpack_from(payload)
        data = memoryview(payload)[REQ.size :]
        if kind in _REPLIES and not 1 <= tag <= constants.TAG_UB:
            raise _err(exceptions.ERR_INTERN, f"rank {origin} asked for a reply on tag {tag}")
        try:
            if kind == K_PUT:
                target = self._target(origin, disp, nbytes)
                if len(data) != nbytes:
                    raise _err(exceptions.ERR_INTERN, f"rank {origin}: Put of {len(data)} "
                               f"bytes announced as {nbytes}")  # fmt: skip
                target[:] = data
            elif kind == K_GET:
                self._reply(origin, tag, self._target(origin, disp, nbytes))
            elif kind in (K_ACC, K_GACC, K_CAS):
                self._accumulate(origin, kind, arg, tag, self._target(origin, disp, nbytes),
                                 code, data)  # fmt: skip
            elif kind in (K_FLUSH, K_UNLOCK):
                if kind == K_UNLOCK:
                    self._release(origin)
                error, text = self.errors.pop(origin, (0, ""))
                self._reply(origin, tag, text.encode(), error)
            elif kind == K_RELEASE:  # UNLOCK without a reply (nothing left to complete)
                self._release(origin)
            elif kind == K_LOCK:
                if arg not in (LOCK_EXCLUSIVE, LOCK_SHARED):
                    raise _err(exceptions.ERR_ARG, f"rank {origin}: lock type {arg}")
                self.lock_queue.append((origin, arg, tag))
                self.backlog[origin] = collections.deque()
                self._grant()
            elif kind == K_POST:
                self.posts[origin] += 1
            elif kind == K_COMPLETE:
                self.completes[origin] += 1
            else:
                raise _err(exceptions.ERR_INTERN, f"rank {origin} sent RMA request {kind}")
        except exceptions.Exception as exc:
            if kind in _REPLIES:
                self._reply(origin, tag, str(exc).encode(), exc.Get_error_class())
            else:
                raise

    def _accumulate(
        self, origin: int, kind: int, arg: int, tag: int, target: memoryview, code: bytes,
        data: memoryview,
    ) -> None:  # fmt: skip
        """Accumulate, Get_accumulate/Fetch_and_op (reply: the old data) or
        Compare_and_swap (reply: the old value) on `target`."""
        try:
            dtype = np.dtype(code.rstrip(b"\0").decode())
        except (TypeError, ValueError, UnicodeDecodeError):
            dtype = None
        if dtype is None or dtype.kind not in _NUMERIC or len(target) % dtype.itemsize:
            raise _err(exceptions.ERR_TYPE, f"rank {origin}: element type {code!r} for "
                       f"{len(target)} bytes")  # fmt: skip
        if not 0 <= arg < len(ACC_OPS):
            raise _err(exceptions.ERR_OP, f"rank {origin}: operation {arg}")
        want = 2 * len(target) if kind == K_CAS else len(target)
        op = ACC_OPS[arg]
        if len(data) != want and not (op is ops.NO_OP and kind == K_GACC):
            raise _err(exceptions.ERR_INTERN, f"rank {origin}: {len(data)} bytes of operand "
                       f"for {len(target)} target bytes")  # fmt: skip
        if kind != K_ACC:
            self._reply(origin, tag, target)  # the old contents, before the update
        acc = np.frombuffer(target, dtype)
        if kind == K_CAS:
            new = np.frombuffer(data[: len(target)], dtype)
            if np.array_equal(acc, np.frombuffer(data[len(target) :], dtype)):
                acc[:] = new
            return
        if op is ops.REPLACE:  # (reduce_into's REPLACE keeps the later rank's: acc)
            acc[:] = np.frombuffer(data, dtype)
        elif op is not ops.NO_OP:  # the predefined ops commute: acc op x == x op acc
            op.reduce_into(acc, np.frombuffer(data, dtype))

    def _grant(self) -> None:
        """Grant queued locks in order while they are compatible with those held."""
        while self.lock_queue:
            origin, kind, tag = self.lock_queue[0]
            if self.lock_excl >= 0 or (kind == LOCK_EXCLUSIVE and self.lock_shared):
                return
            self.lock_queue.popleft()
            if kind == LOCK_EXCLUSIVE:
                self.lock_excl = origin
            else:
                self.lock_shared[origin] += 1
            self._reply(origin, tag)
            # Its requests that came behind the LOCK, in order; one of them may be another
            # LOCK that waits (a new backlog then takes the rest: _take checks each time).
            for payload in self.backlog.pop(origin, ()):
                self._take(origin, payload)

    def _release(self, origin: int) -> None:
        if self.lock_excl == origin:
            self.lock_excl = -1
        elif self.lock_shared[origin] > 0:
            self.lock_shared[origin] -= 1
            if not self.lock_shared[origin]:
                del self.lock_shared[origin]
        else:
            raise _err(exceptions.ERR_RMA_SYNC, f"rank {origin} unlocked a lock it does not hold")
        self._grant()

    # ------------------------------------------------------------------ origin side
    def send(self, target: int, kind: int, arg: int = 0, disp: int = 0, nbytes: int = 0,
             code: bytes = b"", data: bytes = b"", reply: memoryview | None = None,
             ) -> tuple[RecvOp, _Reply] | None:  # fmt: skip
        """Send a request to comm rank `target`; with `reply`, the receive of its reply
        (posted first) and its sink. The first request of a lazy passive epoch to the
        target sends the epoch's LOCK ahead of it (see `locks`)."""
        comm = self.comm
        lock = self.locks.get(target)
        if lock is not None and lock[1] == LAZY and kind not in (K_LOCK, K_UNLOCK, K_RELEASE):
            self.ask(target, lock)
        posted = None
        tag = 0
        if kind in _REPLIES:
            tag = next(self.tags)
            sink = _Reply(reply if reply is not None else memoryview(bytearray(0)))
            op = comm._irecv_op(None, target, tag, comm._ctx, sink)
            posted = (op, sink)
        head = REQ.pack(kind, arg, 0, tag, disp, nbytes, code)
        comm._isend_op(memoryview(head + data), target, T_SERVICE, comm._ctx, False)
        if kind in (K_PUT, K_ACC):
            self.dirty.add(target)
        return posted

    def wait(self, op: Op, target: int) -> None:
        """Make progress until `op` (a reply from comm rank `target`) is done (see
        `until`)."""
        self.until(lambda: op.done, [target])

    def until(self, done: Callable[[], bool], targets: Any) -> None:
        """Make progress until `done()` holds, napping on messages from any rank (this
        rank's service must answer the others meanwhile: a nap on one rank alone would
        delay them by the engine's nap). MPI.Exception if the process of one of `targets`
        (comm ranks) is lost meanwhile (shared memory ranks)."""
        engine = self.engine
        while not done():
            if engine.progress(done) or done():
                continue
            engine.idle(-1)
            for target in targets:
                peer = self.comm._shm_peer.get(target, -1)
                if peer >= 0 and engine.ep.region.peer_state(peer)[0] != layout.PEER_READY:
                    raise _err(exceptions.ERR_OTHER, f"window rank {target} (shm peer "
                               f"{peer}) was lost")  # fmt: skip

    def roundtrip(self, target: int, kind: int, arg: int = 0, disp: int = 0,
                  nbytes: int = 0, code: bytes = b"", data: bytes = b"",
                  reply: memoryview | None = None) -> None:  # fmt: skip
        """send() and wait for the reply; MPI.Exception for an error reply."""
        posted = self.send(target, kind, arg, disp, nbytes, code, data, reply)
        assert posted is not None
        op, sink = posted
        self.wait(op, target)
        sink.check(op, f"window rank {target}")

    def begin(self, target: int, lock_type: int) -> None:
        """A lazy passive epoch on comm rank `target` (see Win.Lock)."""
        if target in self.locks:
            raise _err(exceptions.ERR_RMA_SYNC, f"a passive epoch on rank {target} is open")
        self.locks[target] = [lock_type, LAZY, None]

    def end(self, targets: Any) -> None:
        """End the passive epochs on `targets`: nothing to those whose LOCK was not sent;
        to the others, once their pending replies are in, a RELEASE message without reply
        when every request there is known applied (only fetching ones since the last
        flush: their replies said so), else an UNLOCK round trip (see flush).
        MPI.Exception(ERR_RMA_SYNC) for a target without an epoch."""
        targets = list(targets)
        missing = [t for t in targets if t not in self.locks]
        if missing:
            raise _err(exceptions.ERR_RMA_SYNC, f"no passive epoch on ranks {missing}")
        unlock = []
        for target in targets:
            if self.locks.pop(target)[1] == LAZY:
                continue
            self.flush_local(target)
            if target in self.dirty:
                unlock.append(target)
            else:
                self.send(target, K_RELEASE)
        self.flush(unlock, K_UNLOCK)

    def flush(self, targets: Any, kind: int = K_FLUSH) -> None:
        """Remote completion of every request to `targets` (comm ranks): their pending
        replies, then a round trip (all sent first, then waited for): K_FLUSH to each that
        has requests not known to be applied, K_UNLOCK to every one (its lock released
        there after them). MPI.Exception for an error a target reports.

        Always one pass of progress first, even with nothing to complete: this rank's own
        service answers the others only inside MPI calls, and a rank polling its window
        memory with Flush/Sync (mpi4py.util.sync's spin loops: Flush(own rank)) must let
        their requests in, or the origins waiting on it never finish (it hung)."""
        self.engine.progress()
        waits = []
        for target in targets:
            self.flush_local(target)
            if kind == K_UNLOCK or target in self.dirty:
                self.dirty.discard(target)
                posted = self.send(target, kind)
                assert posted is not None
                waits.append((target, *posted))
        for target, op, sink in waits:
            self.wait(op, target)
            sink.check(op, f"window rank {target}")

    def direct(self, target: int, disp: int, nbytes: int) -> memoryview | None:
        """The target bytes as memory this process maps (its own window, or a member's
        segment of a shared window), for a direct copy; None when the request must go to
        the target. MPI.Exception(ERR_RMA_RANGE) when they leave the window."""
        if self.flavor == WIN_FLAVOR_DYNAMIC or (target != self.comm._rank and not self.segments):
            return None
        lock = self.locks.get(target)
        if lock is not None and lock[1] != GRANTED:  # a load/store needs the lock itself
            self.wait(self.ask(target, lock), target)
            lock[1] = GRANTED
        if target == self.comm._rank:
            return self._target(target, disp, nbytes)
        memory, unit = self.segments[target]
        start = disp * unit
        if disp < 0 or start + nbytes > len(memory):
            raise _err(exceptions.ERR_RMA_RANGE, f"{nbytes} bytes at displacement {disp} "
                       f"are outside rank {target}'s window")  # fmt: skip
        return memory[start : start + nbytes]

    def ask(self, target: int, lock: list[Any]) -> Op:
        """The receive of the grant of the passive epoch `lock` on comm rank `target`,
        sending its LOCK request first if not sent yet. Under `guard`: of several threads
        starting requests to the target at once, one sends the LOCK and the others wait
        until it is sent, so that no request goes ahead of it."""
        with self.guard:
            if lock[1] == LAZY:
                asked = self.send(target, K_LOCK, lock[0])
                assert asked is not None
                lock[1:] = [ASKED, asked[0]]
                self.pending[target].append(asked[0])  # waited for by Flush/Unlock too
        return lock[2]

    def flush_local(self, target: int) -> None:
        """Wait for the replies pending from comm rank `target` (local completion)."""
        for op in self.pending.pop(target, []):
            self.wait(op, target)

    def fence(self) -> None:
        """Fence (and Free's collective part): remote completion of every request of this
        rank (`flush` of the targets with requests not known to be applied: FLUSH round
        trips, all sent first), then a dissemination barrier by messages waited for as
        `until` does: when any rank leaves, every request of the epoch is applied
        everywhere (a Get of the next epoch sees a third rank's Put of this one). An error
        a target reports is raised after the barrier, so the ranks stay in step. Unlike the
        communicator's collectives (the collective area, MPICH's between regions), this
        rank's service keeps answering while it waits. (Two all-to-all rounds of markers
        instead cost twice the CPU per Fence at 4 ranks: more messages.)"""
        try:
            self.flush(list(self.dirty | set(self.pending)))
        finally:
            comm = self.comm
            size, rank = len(comm._group), comm._rank
            step = 1
            while step < size:
                source = (rank - step) % size
                op = comm._irecv_op(memoryview(bytearray(0)), source, T_BARRIER, comm._ctx)
                comm._isend_op(memoryview(b""), (rank + step) % size, T_BARRIER, comm._ctx,
                               False)  # fmt: skip
                self.wait(op, source)
                step *= 2

    def close(self) -> None:
        """Stop the service (after the collective part of Free)."""
        self.closing = True
        op = self.service_op
        if op is not None and not op.done:
            op.cancel(self.engine)
        with self.engine.lock:
            if self.staged in self.engine.staged:
                self.engine.staged.remove(self.staged)


# ------------------------------------------------------------------ argument helpers
def _target_spec(target: Any, count: int, datatype: Any) -> tuple[int, int, Any]:
    """(disp, count, datatype) of a target spec: None, disp, or (disp[, count[, datatype]])
    defaulting to the origin's count and datatype."""
    if target is None:
        return 0, count, datatype
    if isinstance(target, int):
        return target, count, datatype
    items = list(target) if isinstance(target, list | tuple) else []
    if not 1 <= len(items) <= 3:
        raise ValueError(f"target: expecting (disp, count, datatype), got {target!r}")
    disp = int(items[0])
    if len(items) > 1 and items[1] is not None:
        count = int(items[1])
    if len(items) > 2 and items[2] is not None:
        datatype = buffers._datatype(items[2])
    return disp, count, datatype


def _target_bytes(count: int, datatype: Any) -> tuple[int, bytes]:
    """(target bytes, element code) of `count` elements of a contiguous `datatype`.
    MPI.Exception(ERR_TYPE) for one with gaps (a packing datatype)."""
    if datatype.packs:
        raise _err(exceptions.ERR_TYPE, f"target datatype {datatype.name} is not contiguous "
                   "(one-sided targets must be contiguous here)")  # fmt: skip
    dtype = datatype.base.dtype
    code = dtype.str.encode() if dtype is not None and dtype.kind in _NUMERIC else b""
    return count * datatype.Get_size(), code[:8]


def _code_for(code: bytes, name: str) -> bytes:
    if not code:
        raise _err(exceptions.ERR_TYPE, f"{name}: accumulates need a numeric element type")
    return code


def _op_index(op: Any) -> int:
    for index, known in enumerate(ACC_OPS):
        if op is known or getattr(op, "name", None) == known.name:
            return index
    raise _err(exceptions.ERR_OP, f"{getattr(op, 'name', op)!r} is not an operation one-sided "
               "accumulates take (the predefined ones but MAXLOC/MINLOC)")  # fmt: skip


def _single(spec: Any, writable: bool, what: str) -> buffers.Spec:
    """The one-element spec of Fetch_and_op / Compare_and_swap. ValueError unless it holds
    exactly one element."""
    parsed = buffers.parse(spec, writable=writable)
    if parsed.count != 1:
        raise ValueError(f"{what}: expecting one element, got {parsed.count}")
    return parsed


# ------------------------------------------------------------------ the handle
class Win(_MemoryBase, Handle):
    """A window handle (mpi4py's `Win`); `Win()` is a new null handle.

    See the module docstring for the model.

    Buffer protocol (as mpi4py's Win): memoryview(win), numpy.asarray(win) give this rank's
    window memory, one-dimensional unsigned bytes ("B") over (base, size) of `attrs`,
    writable (a dynamic window: empty); a null window raises BufferError. A C base type
    (ivshmem_comm._fastpath.MemoryExporter) exports it: in the pure-Python mode memoryview(win)
    raises TypeError (see _PureMemoryBase). `Free` on a rank where such a buffer is still
    out raises BufferError before any collective step and frees nothing there (the other
    members wait in their Free until this rank releases the buffers and calls Free again):
    the memory is never given back while Python code can still reach it."""

    def __init__(self, win: Win | None = None) -> None:
        if win is not None and not isinstance(win, Win):
            raise TypeError(f"Win: expecting a Win, got {type(win).__name__}")
        self._w: _Window | None = None
        self._bind(win._w if win is not None else None)

    def _bind(self, w: _Window | None) -> None:
        """Make this handle name `w` (None: null); its buffers then give w's memory."""
        self._exported = w.exported() if w is not None and not w.closing else None
        self._w = w

    # ------------------------------------------------------------------ basics
    def _check(self) -> _Window:
        w = self._w
        if w is None:
            raise _err(exceptions.ERR_WIN, "null window")
        return w

    def __bool__(self) -> bool:
        return self._w is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Win):
            return NotImplemented
        return self._w is other._w

    def _key(self) -> Hashable:
        return Same(self._w)

    def __reduce__(self) -> Any:
        if self._w is not None:
            raise ValueError("cannot serialize a window")
        return (_win_null, ()) if self is WIN_NULL else (type(self), ())

    def __repr__(self) -> str:
        return f"<Win {self.Get_name()!r}>"

    def _rank(self, w: _Window, rank: int) -> bool:
        """False for PROC_NULL; MPI.Exception(ERR_RANK) outside the group."""
        if rank == constants.PROC_NULL:
            return False
        if not 0 <= rank < len(w.comm._group):
            raise _err(exceptions.ERR_RANK, f"rank {rank} of a window of {len(w.comm._group)}")
        return True

    # ------------------------------------------------------------------ construction
    @classmethod
    def _made(cls, comm: Any, memory: memoryview, disp_unit: int, flavor: int) -> Win:
        if comm is None or not comm or comm.Is_inter():
            raise _err(exceptions.ERR_COMM, "windows need an intracommunicator")
        if int(disp_unit) <= 0:
            raise _err(exceptions.ERR_ARG, f"displacement unit {disp_unit}")
        dup = comm.Dup()
        # Its collectives (Allocate_shared's agreement) keep to messages: the area's
        # binding would take a slot for little use (Fence and Free use `barrier`).
        dup._area = False
        win = cls()
        win._bind(_Window(dup, memory, int(disp_unit), flavor))
        return win

    @classmethod
    def Create(cls, memory: Any, disp_unit: int = 1, info: Any = None, comm: Any = None) -> Win:
        """A window over `memory` (a writable buffer; None/BOTTOM: none). Collective."""
        if memory is None or memory is constants.BOTTOM:
            view = memoryview(bytearray(0))
        else:
            view, _ = buffers._as_bytes(memory, True)
        win = cls._made(comm, view, disp_unit, WIN_FLAVOR_CREATE)
        win._check().owner = memory
        return win

    @classmethod
    def Allocate(cls, size: int, disp_unit: int = 1, info: Any = None, comm: Any = None) -> Win:
        """A window over `size` new bytes of private memory (zeroed). Collective."""
        if int(size) < 0:
            raise _err(exceptions.ERR_ARG, f"window size {size}")
        memory = _buffer.allocate(int(size), clear=True)
        win = cls._made(comm, memory.data.cast("B") if size else memoryview(bytearray(0)),
                        disp_unit, WIN_FLAVOR_ALLOCATE)  # fmt: skip
        win._check().owner = memory
        return win

    @classmethod
    def Allocate_shared(
        cls, size: int, disp_unit: int = 1, info: Any = None, comm: Any = None
    ) -> Win:
        """Allocate a window whose memory every member maps (collective).

        Each member's `size` bytes, zeroed, in the region's window heap (see the module docstring).

        MPI.Exception on every member: ERR_RMA_SHARED when a member is not reached through
        this region (or the region has no heap), ERR_NO_MEM when the heap has no room."""
        if int(size) < 0:
            raise _err(exceptions.ERR_ARG, f"window size {size}")
        win = cls._made(comm, memoryview(bytearray(0)), disp_unit, WIN_FLAVOR_SHARED)
        w = win._check()
        try:
            _share(w, int(size))
        except BaseException:
            w.close()
            w.comm.Free()
            raise
        w.view = None  # made of the memory _made had: none yet, never exported
        win._bind(w)
        return win

    @classmethod
    def Create_dynamic(cls, info: Any = None, comm: Any = None) -> Win:
        """Create a window without memory; `Attach` adds some (collective).

        Target displacements are addresses (MPI.Get_address).
        """
        return cls._made(comm, memoryview(bytearray(0)), 1, WIN_FLAVOR_DYNAMIC)

    def Attach(self, memory: Any) -> None:
        """Expose `memory` (a writable buffer) through this dynamic window."""
        w = self._check()
        if w.flavor != WIN_FLAVOR_DYNAMIC:
            raise _err(exceptions.ERR_RMA_FLAVOR, "Attach needs a dynamic window")
        view, _ = buffers._as_bytes(memory, True)
        w.attached.append((Get_address(view), view))

    def Detach(self, memory: Any) -> None:
        """Withdraw memory given to Attach. MPI.Exception(ERR_RMA_ATTACH) if it was not."""
        w = self._check()
        address = Get_address(memory)
        for index, (known, _) in enumerate(w.attached):
            if known == address:
                del w.attached[index]
                return
        raise _err(exceptions.ERR_RMA_ATTACH, f"no memory attached at {address:#x}")

    def Free(self) -> None:
        """Free the window (collective); the handle becomes null.

        Every member's requests complete, then the service stops, a shared window's heap block is
        given back. BufferError (nothing freed here) while the memory is exported: see the class
        docstring.
        """
        w = self._check()
        w.unexport()
        try:
            w.fence()
        finally:  # the window goes even if a last request failed (raised after)
            self._free(w)

    def _free(self, w: _Window) -> None:
        w.close()
        for keyval, value in list(w.attrs.items()):
            self._delete(w, keyval, value)
        if w.heap is not None and w.block is not None and w.comm._rank == 0:
            w.heap.free(w.block)
        w.comm.Free()
        self._bind(None)

    # ------------------------------------------------------------------ queries
    def tomemory(self) -> _buffer:
        """This rank's window memory as an MPI.buffer."""
        w = self._check()
        return _buffer.frombuffer(w.memory) if len(w.memory) else _buffer()

    def Shared_query(self, rank: int) -> tuple[_buffer, int]:
        """Return (memory, displacement unit) of `rank`'s segment.

        PROC_NULL: the lowest rank with a segment of nonzero size. Windows of other flavors: this
        rank's own memory, an empty buffer for the others. MPI.Exception(ERR_RANK) outside the
        group.
        """
        w = self._check()
        size = len(w.comm._group)
        if rank == constants.PROC_NULL:
            sizes = [len(m) for m, _ in w.segments] if w.segments else [len(w.memory)]
            rank = next((r for r, n in enumerate(sizes) if n), 0)
        elif not 0 <= rank < size:
            raise _err(exceptions.ERR_RANK, f"rank {rank} of a window of {size}")
        if w.segments:
            memory, unit = w.segments[rank]
        elif rank == w.comm._rank:
            memory, unit = w.memory, w.disp_unit
        else:
            return _buffer(), w.disp_unit
        return (_buffer.frombuffer(memory) if len(memory) else _buffer()), unit

    def Get_group(self) -> Group:
        """Return a new Group of the window's members."""
        w = self._check()
        return Group(list(w.comm._group), w.engine.world_rank)

    @property
    def group(self) -> Group:
        """Group of the window's members (Get_group)."""
        return self.Get_group()

    @property
    def group_size(self) -> int:
        """Number of the window's members."""
        return len(self._check().comm._group)

    @property
    def group_rank(self) -> int:
        """Rank of this process among the window's members."""
        return int(self._check().comm._rank)

    @property
    def attrs(self) -> tuple[int, int, int]:
        """Attributes of this rank's window: (base address, size, displacement unit)."""
        w = self._check()
        return w.base, len(w.memory), w.disp_unit

    @property
    def flavor(self) -> int:
        """Create flavor of the window (WIN_FLAVOR_*)."""
        return self._check().flavor

    @property
    def model(self) -> int:
        """Memory model of the window: WIN_UNIFIED."""
        self._check()
        return WIN_UNIFIED

    def Get_name(self) -> str:
        """Return the window's name ("MPI_WIN_NULL" for a null handle)."""
        return "MPI_WIN_NULL" if self._w is None else self._w.name

    def Set_name(self, name: str) -> None:
        """Set the window's name, as Get_name returns it."""
        self._check().name = str(name)

    @property
    def name(self) -> str:
        """Window name (Get_name, Set_name)."""
        return self.Get_name()

    @name.setter
    def name(self, name: str) -> None:
        self.Set_name(name)

    def Get_info(self) -> Info:
        """A new Info with the hints last given (none is acted on)."""
        return Info.Create(self._check().hints)

    def Set_info(self, info: Any) -> None:
        """Replace the window's hints by the items of the Info `info`."""
        self._check().hints = dict(info.items())

    @property
    def info(self) -> Info:
        """Window info (Get_info)."""
        return self.Get_info()

    @info.setter
    def info(self, info: Any) -> None:
        self.Set_info(info)

    # ------------------------------------------------------------------ attributes
    @classmethod
    def Create_keyval(cls, copy_fn: Any = None, delete_fn: Any = None,
                      nopython: bool = False) -> int:  # fmt: skip
        """A new attribute key; `delete_fn(win, keyval, value)` runs when a value goes."""
        keyval = next(_next_keyval)
        _keyvals[keyval] = (copy_fn, delete_fn)
        return keyval

    @classmethod
    def Free_keyval(cls, keyval: int) -> int:
        """Forget `keyval`; returns KEYVAL_INVALID."""
        _keyvals.pop(keyval, None)
        return KEYVAL_INVALID

    def Get_attr(self, keyval: int) -> Any:
        """Return the value of the attribute `keyval`.

        A predefined attribute (WIN_BASE, WIN_SIZE, WIN_DISP_UNIT, WIN_CREATE_FLAVOR, WIN_MODEL) or
        the value set for `keyval` (None if unset); MPI.Exception(ERR_KEYVAL) for KEYVAL_INVALID.
        """
        w = self._check()
        if keyval == KEYVAL_INVALID:
            raise _err(exceptions.ERR_KEYVAL, "Win.Get_attr(KEYVAL_INVALID)")
        predefined = {WIN_BASE: w.base, WIN_SIZE: len(w.memory), WIN_DISP_UNIT: w.disp_unit,
                      WIN_CREATE_FLAVOR: w.flavor, WIN_MODEL: WIN_UNIFIED}  # fmt: skip
        if keyval in predefined:
            return predefined[keyval]
        return w.attrs.get(keyval)

    def Set_attr(self, keyval: int, attrval: Any) -> None:
        """Set the value of attribute `keyval`, deleting the old one first (delete_fn).

        MPI.Exception(ERR_ARG) for a key not made by Create_keyval.
        """
        w = self._check()
        if keyval not in _keyvals:
            raise _err(exceptions.ERR_ARG, f"keyval {keyval:#x}")
        if keyval in w.attrs:
            self._delete(w, keyval, w.attrs[keyval])
        w.attrs[keyval] = attrval

    def Delete_attr(self, keyval: int) -> None:
        """Delete the value of attribute `keyval` (delete_fn runs); nothing if unset."""
        w = self._check()
        if keyval in w.attrs:
            self._delete(w, keyval, w.attrs[keyval])

    def _delete(self, w: _Window, keyval: int, value: Any) -> None:
        """Drop the value, then call the keyval's delete_fn.

        An exception there is printed to stderr and raised as MPI.Exception(ERR_OTHER) (as mpi4py
        does).
        """
        del w.attrs[keyval]
        delete_fn = _keyvals.get(keyval, (None, None))[1]
        if delete_fn is None:
            return
        try:
            delete_fn(self, keyval, value)
        except Exception as exc:
            traceback.print_exc()
            raise _err(exceptions.ERR_OTHER, f"attribute delete_fn raised {exc!r}") from exc

    # ------------------------------------------------------------------ error handlers
    @classmethod
    def Create_errhandler(cls, errhandler_fn: Callable[[Win, int], None]) -> Any:
        """Create an error handler for windows from `errhandler_fn(win, errorcode)`."""
        return errhandler.create_errhandler(errhandler_fn, "Win")

    def Get_errhandler(self) -> Any:
        """Return the window's error handler (see `errhandler`)."""
        return errhandler.get_errhandler(self)

    def Set_errhandler(self, errhandler_: Any) -> None:
        """Set the window's error handler (see `errhandler`)."""
        errhandler.set_errhandler(self, errhandler_)

    def Call_errhandler(self, errorcode: int) -> None:
        """Invoke the window's error handler with `errorcode` (see `errhandler`)."""
        errhandler.call_errhandler(self, errorcode)

    def Abort(self, errorcode: int = 0) -> None:
        """Abort the job (what ERRORS_ARE_FATAL on a window does; mpi4py has no Win.Abort)."""
        self._check().comm.Abort(errorcode)

    # ------------------------------------------------------------------ data movement
    def _request(self, w: _Window, origin: buffers.Spec, target_rank: int, target: Any,
                 ) -> tuple[int, int, bytes]:  # fmt: skip
        """Return (disp, target bytes, element code) of a target spec that must match `origin`.

        ValueError when the byte counts differ.
        """
        disp, count, datatype = _target_spec(target, origin.count, origin.datatype)
        nbytes, code = _target_bytes(count, datatype)
        if nbytes != len(origin.view):
            raise ValueError(f"origin of {len(origin.view)} bytes, target of {nbytes}")
        return disp, nbytes, code

    def Put(self, origin: Any, target_rank: int, target: Any = None) -> None:
        """Put origin data into `target_rank`'s window at `target`.

        See the module docstring: complete locally at return, remotely at the next synchronisation.
        """
        self._put(origin, target_rank, target)

    def Rput(self, origin: Any, target_rank: int, target: Any = None) -> Request:
        """Put, returning a request (complete at once: the data is copied at the call)."""
        self._put(origin, target_rank, target)
        return Request(DoneOp(), self._check().engine)

    def _put(self, origin: Any, target_rank: int, target: Any) -> None:
        w = self._check()
        if not self._rank(w, target_rank):
            return
        spec = buffers.parse(origin)
        disp, nbytes, _ = self._request(w, spec, target_rank, target)
        memory = w.direct(target_rank, disp, nbytes)
        if memory is not None:
            memory[:] = spec.view
            return
        w.send(target_rank, K_PUT, 0, disp, nbytes, b"", bytes(spec.view))

    def Get(self, origin: Any, target_rank: int, target: Any = None) -> None:
        """Get `target_rank`'s window data at `target` into the origin buffer.

        Complete at return.
        """
        w = self._check()
        request = self.Rget(origin, target_rank, target)
        op = request._op
        if op is not None and self._rank(w, target_rank):
            w.wait(op, target_rank)
        request.Wait()

    def Rget(self, origin: Any, target_rank: int, target: Any = None) -> Request:
        """Get, returning a request completed when the data is in the origin buffer."""
        w = self._check()
        if not self._rank(w, target_rank):
            return Request(DoneOp(), w.engine)
        spec = buffers.parse(origin, writable=True, deferred=True)
        disp, nbytes, _ = self._request(w, spec, target_rank, target)
        memory = w.direct(target_rank, disp, nbytes)
        if memory is not None:
            spec.view[:] = memory
            if spec.unpack is not None:
                spec.unpack()
            return Request(DoneOp(), w.engine)
        return self._await(w, target_rank, spec, w.send(target_rank, K_GET, 0, disp, nbytes,
                                                          reply=spec.view))  # fmt: skip

    def _await(self, w: _Window, target_rank: int, spec: buffers.Spec,
               posted: tuple[RecvOp, _Reply] | None) -> Request:  # fmt: skip
        """The request of a reply that fills `spec`; remembered for Flush."""
        assert posted is not None
        op, sink = posted
        w.pending[target_rank].append(op)
        # Request.Wait naps on the op's peer: any rank instead, so that this rank's service
        # answers the others while it waits (see _Window.wait)
        op.peer = -1

        def finish(done: Op) -> None:
            sink.check(done, f"window rank {target_rank}")
            if spec.unpack is not None:
                spec.unpack()

        return Request(op, w.engine, None, finish)

    def Accumulate(self, origin: Any, target_rank: int, target: Any = None,
                   op: Any = ops.SUM) -> None:  # fmt: skip
        """Accumulate origin data into `target_rank`'s window with `op`.

        target = target op origin, elementwise, atomically per element against other accumulates
        (applied by the target).
        """
        self._accumulate(origin, target_rank, target, op)

    def Raccumulate(self, origin: Any, target_rank: int, target: Any = None,
                    op: Any = ops.SUM) -> Request:  # fmt: skip
        """Accumulate, returning a request (complete at once, as Rput)."""
        self._accumulate(origin, target_rank, target, op)
        return Request(DoneOp(), self._check().engine)

    def _accumulate(self, origin: Any, target_rank: int, target: Any, op: Any) -> None:
        w = self._check()
        index = _op_index(op)
        if not self._rank(w, target_rank):
            return
        spec = buffers.parse(origin)
        disp, nbytes, code = self._request(w, spec, target_rank, target)
        w.send(target_rank, K_ACC, index, disp, nbytes, _code_for(code, "Accumulate"),
               bytes(spec.view))  # fmt: skip

    def Get_accumulate(self, origin: Any, result: Any, target_rank: int, target: Any = None,
                       op: Any = ops.SUM) -> None:  # fmt: skip
        """Fetch the target data into `result` and accumulate origin into it (complete at return).

        result = old target data; target = target op origin (one atomic step at the target).
        """
        w = self._check()
        request = self.Rget_accumulate(origin, result, target_rank, target, op)
        if request._op is not None and self._rank(w, target_rank):
            w.wait(request._op, target_rank)
        request.Wait()

    def Rget_accumulate(self, origin: Any, result: Any, target_rank: int, target: Any = None,
                        op: Any = ops.SUM) -> Request:  # fmt: skip
        """Get_accumulate, returning a request completed when `result` holds the data."""
        w = self._check()
        index = _op_index(op)
        if not self._rank(w, target_rank):
            return Request(DoneOp(), w.engine)
        out = buffers.parse(result, writable=True, deferred=True)
        disp, nbytes, code = self._request(w, out, target_rank, target)
        data = b""
        if ACC_OPS[index] is not ops.NO_OP:
            spec = buffers.parse(origin)
            if len(spec.view) != nbytes:
                raise ValueError(f"origin of {len(spec.view)} bytes, result of {nbytes}")
            data = bytes(spec.view)
        posted = w.send(target_rank, K_GACC, index, disp, nbytes,
                        _code_for(code, "Get_accumulate"), data, out.view)  # fmt: skip
        return self._await(w, target_rank, out, posted)

    def Fetch_and_op(self, origin: Any, result: Any, target_rank: int, target_disp: int = 0,
                     op: Any = ops.SUM) -> None:  # fmt: skip
        """Get_accumulate of one element at `target_disp`.

        ValueError unless origin and result are one element each of the same size.
        """
        w = self._check()
        index = _op_index(op)
        spec = _single(origin, False, "Fetch_and_op origin")
        out = _single(result, True, "Fetch_and_op result")
        if len(spec.view) != len(out.view):
            raise ValueError("Fetch_and_op: origin and result element sizes differ")
        if not self._rank(w, target_rank):
            return
        nbytes, code = _target_bytes(1, out.datatype)
        w.roundtrip(target_rank, K_GACC, index, int(target_disp), nbytes,
                    _code_for(code, "Fetch_and_op"), bytes(spec.view), out.view)  # fmt: skip

    def Compare_and_swap(self, origin: Any, compare: Any, result: Any, target_rank: int,
                         target_disp: int = 0) -> None:  # fmt: skip
        """Swap in `origin` where the target element equals `compare`; old element into `result`.

        result = old target element; the target element becomes `origin` if it equalled `compare`
        (one atomic step at the target). ValueError unless the three are one element each of the
        same size.
        """
        w = self._check()
        spec = _single(origin, False, "Compare_and_swap origin")
        cmp = _single(compare, False, "Compare_and_swap compare")
        out = _single(result, True, "Compare_and_swap result")
        if not len(spec.view) == len(cmp.view) == len(out.view):
            raise ValueError("Compare_and_swap: element sizes differ")
        if not self._rank(w, target_rank):
            return
        nbytes, code = _target_bytes(1, out.datatype)
        w.roundtrip(target_rank, K_CAS, 0, int(target_disp), nbytes,
                    _code_for(code, "Compare_and_swap"), bytes(spec.view) + bytes(cmp.view),
                    out.view)  # fmt: skip

    # ------------------------------------------------------------------ synchronisation
    def Fence(self, assertion: int = 0) -> None:
        """Complete every request of this rank at its targets, then a barrier (collective).

        Requests before the fence are applied everywhere when it returns.
        """
        self._check().fence()

    def Lock(self, rank: int, lock_type: int = LOCK_EXCLUSIVE, assertion: int = 0) -> None:
        """Begin a passive epoch on `rank`'s window (LOCK_EXCLUSIVE or LOCK_SHARED).

        Lazy, as MPICH: nothing is sent until the first operation on `rank`, whose request goes
        right behind the LOCK request (the target applies it once the lock is granted); a load/store
        access (this rank's own memory, a shared segment) waits for the grant first.
        MPI.Exception(ERR_RMA_SYNC) if this rank already has an epoch on `rank`, ERR_ARG for another
        lock type.
        """
        w = self._check()
        if lock_type not in (LOCK_EXCLUSIVE, LOCK_SHARED):
            raise _err(exceptions.ERR_ARG, f"lock type {lock_type}")
        if self._rank(w, rank):
            w.begin(rank, lock_type)

    def Unlock(self, rank: int) -> None:
        """Complete every request to `rank` there, then release the lock.

        No message is sent when the epoch had no operation. MPI.Exception(ERR_RMA_SYNC) without an
        epoch on `rank`.
        """
        w = self._check()
        if self._rank(w, rank):
            w.end([rank])

    def Lock_all(self, assertion: int = 0) -> None:
        """A shared lock on every rank of the window (lazy, as Lock)."""
        w = self._check()
        for rank in range(len(w.comm._group)):
            w.begin(rank, LOCK_SHARED)

    def Unlock_all(self) -> None:
        """End the passive epochs on every member, as Unlock does for one.

        MPI.Exception(ERR_RMA_SYNC) when a member has no epoch open (Lock_all opens them all).
        """
        w = self._check()
        w.end(range(len(w.comm._group)))

    def Flush(self, rank: int) -> None:
        """Complete every request of this rank to `rank`, there."""
        w = self._check()
        if self._rank(w, rank):
            w.flush([rank])

    def Flush_all(self) -> None:
        """Complete every request of this rank, at every target (Flush of each)."""
        w = self._check()
        w.flush(list(w.dirty | set(w.pending)))

    def Flush_local(self, rank: int) -> None:
        """Local completion of the requests to `rank` (their replies are in)."""
        w = self._check()
        if self._rank(w, rank):
            w.flush_local(rank)

    def Flush_local_all(self) -> None:
        """Complete locally every request of this rank (Flush_local of each target)."""
        w = self._check()
        for rank in list(w.pending):
            self.Flush_local(rank)

    def Sync(self) -> None:
        """Synchronise the public and private copies of this rank's window.

        One copy here (WIN_UNIFIED), which the others' requests reach when this rank's service runs:
        one pass of progress applies those that arrived (a rank polling its memory sees them).
        """
        self._check().engine.progress()

    def Post(self, group: Group, assertion: int = 0) -> None:
        """Expose this window to `group`'s ranks (an access epoch of theirs may start)."""
        w = self._check()
        w.post_group = self._ranks_of(w, group)
        for rank in w.post_group:
            w.send(rank, K_POST)

    def Start(self, group: Group, assertion: int = 0) -> None:
        """Begin an access epoch to `group`'s ranks: returns once each has posted."""
        w = self._check()
        ranks = self._ranks_of(w, group)
        w.engine.wait_until(lambda: all(w.posts[r] > 0 for r in ranks))
        for rank in ranks:
            w.posts[rank] -= 1
        w.start_group = ranks

    def Complete(self) -> None:
        """End the access epoch: every request is applied at its target.

        Before the target's Wait returns (the COMPLETE notice follows them).
        """
        w = self._check()
        for rank in w.start_group:
            w.dirty.discard(rank)
            w.send(rank, K_COMPLETE)
        w.flush(list(w.pending))
        w.start_group = []

    def Wait(self) -> None:
        """End the exposure epoch: returns once every rank of the Post group completed."""
        w = self._check()
        w.engine.wait_until(lambda: self._completed(w))
        self._end_exposure(w)

    def Test(self) -> bool:
        """Whether the exposure epoch is over (Wait's work when it is)."""
        w = self._check()
        w.engine.progress()
        if not self._completed(w):
            return False
        self._end_exposure(w)
        return True

    @staticmethod
    def _completed(w: _Window) -> bool:
        return all(w.completes[r] > 0 for r in w.post_group)

    @staticmethod
    def _end_exposure(w: _Window) -> None:
        for rank in w.post_group:
            w.completes[rank] -= 1
        w.post_group = []

    @staticmethod
    def _ranks_of(w: _Window, group: Group) -> list[int]:
        """The window ranks of `group`'s members. MPI.Exception(ERR_GROUP) for others."""
        rank_of = w.comm._rank_of
        members = group._members()
        missing = [m for m in members if m not in rank_of]
        if missing:
            raise _err(exceptions.ERR_GROUP, f"world ranks {missing} are not in the window")
        return [rank_of[m] for m in members]


def _win_null() -> Win:
    return WIN_NULL


WIN_NULL = Win()


# ------------------------------------------------------------------ shared windows
_heaps: dict[int, WindowHeap] = {}


def _heap_of(engine: Any) -> WindowHeap | None:
    """This process's view of its region's window heap (None: no region or no heap)."""
    ep = engine.ep
    if ep is None or not ep.region.geometry.heap_size:
        return None
    heap = _heaps.get(id(ep))
    if heap is None:
        heap = _heaps[id(ep)] = WindowHeap(ep.region, ep.peer_id, ep.incarnation)
    return heap


def _share(w: _Window, size: int) -> None:
    """Allocate_shared's collective part: agree on one heap block (allocated by rank 0 of
    the window) and map every member's segment of it. Errors: see Win.Allocate_shared."""
    comm, engine = w.comm, w.engine
    sizes = comm.allgather((size, w.disp_unit))
    for r, told in enumerate(sizes):  # every member checks the same list: all raise alike
        if not (type(told) is tuple and len(told) == 2 and type(told[0]) is int
                and type(told[1]) is int and told[0] >= 0 and told[1] > 0):  # fmt: skip
            raise _err(exceptions.ERR_OTHER, f"Win.Allocate_shared: rank {r} announced "
                       f"(size, displacement unit) {told!r}")  # fmt: skip
    total = sum(n for n, _ in sizes)
    members = comm._group
    if len(members) == 1:
        memory = _buffer.allocate(total, clear=True)
        w.owner = memory
        w.memory = memory.data.cast("B") if total else memoryview(bytearray(0))
        w.base = Get_address(w.memory) if total else 0
        w.segments = [(w.memory, w.disp_unit)]
        return
    far = [comm._rank_of[m] for m in members if not engine.routes[m].local]
    heap = _heap_of(engine)
    if far or heap is None:
        why = (f"ranks {far} are not in this rank's region" if far
               else "this region has no window heap")  # fmt: skip
        raise _err(exceptions.ERR_RMA_SHARED, f"Win.Allocate_shared: {why}; shared windows "
                   "need every rank in one region (Split_type(COMM_TYPE_SHARED))")  # fmt: skip
    announced: tuple[int, int, int, int, int] | str
    if comm._rank == 0:
        tag = int.from_bytes(os.urandom(8), "little") >> 1
        try:
            made = heap.allocate(total, tag)
            if made is None:
                announced = f"no room for {total} bytes in the {heap.data_size}-byte heap"
            else:
                heap.view(made)[:] = bytes(made.length)
                announced = (made.index, made.offset, made.length, tag, heap.mine)
        except IvshmemError as exc:
            announced = f"{type(exc).__name__}: {exc}"
    else:
        announced = ""
    announced = comm.bcast(announced, 0)
    if isinstance(announced, str):
        raise _err(exceptions.ERR_NO_MEM, f"Win.Allocate_shared: {announced}")
    index, offset, length, tag, owner = announced
    try:  # the leader's own entry too: one path, and it proves the block was published
        block = heap.check(index, owner, offset, length, tag)
    except IvshmemError as exc:
        raise _err(exceptions.ERR_OTHER, f"Win.Allocate_shared: {exc}") from exc
    if total > block.length:
        raise _err(exceptions.ERR_OTHER, f"Win.Allocate_shared: block of {block.length} bytes "
                   f"for {total}")  # fmt: skip
    whole = heap.view(block)
    start = 0
    for n, unit in sizes:
        w.segments.append((whole[start : start + n], unit))
        start += n
    w.memory = w.segments[comm._rank][0]
    w.base = Get_address(w.memory) if len(w.memory) else 0
    w.heap, w.block = heap, block
