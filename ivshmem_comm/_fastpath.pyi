# The C accelerator's interface (ivshmem_comm/_fastpath.c): the same names, signatures and
# behaviour as the pure-Python reference, ivshmem_comm/virtqueue.py, whose docstrings say
# what each does. ivshmem_comm.ring picks one of the two; ring.TX_API / ring.RX_API list the
# public names both must have, and tests/core/test_contract.py checks this file, the
# reference and the built module against them.
from typing import Any

from ivshmem_comm import layout
from ivshmem_comm.errors import RingCorruptError

SEND_OK: int
SEND_KICK: int
SEND_FULL: int
SEND_TOO_BIG: int
CACHE_WINDOW: int

def full_fence() -> None: ...
def shared_copy_costs() -> tuple[
    tuple[tuple[int, int], tuple[int, int]], tuple[tuple[int, int], tuple[int, int]]
]: ...
def compare_exchange_u64(buffer: Any, offset: int, expected: int, desired: int) -> bool: ...
def flat_view(spec: Any, writable: bool, sizes: dict[int, int]) -> memoryview | None: ...
def set_front(
    ndarray: type, in_place: Any, sizes: dict[int, int], folds: dict[int, int], ops: dict[int, int]
) -> None: ...
def p2p_types(request: type, recv_op: type, template: Any) -> None: ...
def new_request(op: Any, engine: Any, rank_of: Any, finish: Any) -> Any: ...
def post_recv(
    posted: list[Any],
    view: Any,
    ctx: int,
    src: int,
    tag: int,
    peer: int,
    engine: Any,
    rank_of: Any,
    finish: Any,
) -> Any: ...
def isend_post(buf: Any, dest: int, tag: int, at: tuple[Any, ...]) -> Any: ...
def irecv_post(buf: Any, source: int, tag: int, at: tuple[Any, ...]) -> Any: ...
def obj_methods(
    cls: type,
    send: Any,
    send_unsent: Any,
    isend: Any,
    isend_unsent: Any,
    recv: Any,
    recv_left: Any,
    pickle: Any,
    done: Any,
) -> tuple[Any, Any, Any]: ...
def first_pending(requests: Any, start: int) -> int: ...
def null_done(requests: Any) -> bool: ...
def copy_slots(obj: Any) -> Any: ...

class P2PLane:
    # The blocking point-to-point fast paths of the MPI face (guest_lib.mpi.fastpath), C only.
    def __init__(
        self,
        endpoint: Any,
        engine: Any,
        quiet: tuple[Any, ...],
        sendq: dict[int, Any],
        sync_next: dict[int, int],
        count: Any,
        service: list[int],
        fault: Any,
        tag_bits: int,
        any_tag: int,
        whole_max: int,
        max_spin_ns: int,
    ) -> None: ...
    def send(self, peer: int, ctx: int, tag: int, spec: Any) -> bool: ...
    def recv(self, peer: int, ctx: int, tag: int, buf: Any, want: bool) -> Any: ...
    def recv_obj(self, peer: int, ctx: int, tag: int, want: bool) -> Any: ...

def typed_copy(
    gather: bool, user: Any, start: int, count: int, extent: int, runs: Any, packed: Any, limit: int
) -> int: ...

class _RingBase:
    # Stub only: what both halves share (the reference's virtqueue._RingBase; the C types
    # have no common base at run time).
    peer: int
    num: int
    data_offset: int
    data_size: int
    max_span: int
    session: int
    def __init__(
        self, region_buf: Any, queue_offset: int, geometry: layout.Geometry, peer: int
    ) -> None: ...
    @property
    def broken(self) -> RingCorruptError | None: ...
    def mark_broken(self, field: str, value: object, detail: str) -> RingCorruptError: ...
    def reset(self, session: int) -> None: ...
    def check_sync(self) -> bool: ...
    def count_message(self, nbytes: int) -> None: ...
    def arm(self) -> bool: ...

class TxRing(_RingBase):
    @property
    def in_flight(self) -> int: ...
    def reclaim(self) -> int: ...
    def reserve(self, nbytes: int) -> int: ...
    def publish(self, offset: int, length: int, last: bool) -> bool: ...
    def send_small(self, tag: int, data: Any) -> int: ...
    def publish_payload(self, start: int, data: Any, published: int) -> tuple[int, bool]: ...
    def write(self, offset: int, data: Any) -> None: ...
    def write_header(self, offset: int, total: int, tag: int) -> None: ...
    def count_full_wait(self) -> None: ...

class RxRing(_RingBase):
    @property
    def held(self) -> int: ...
    def poll(self) -> tuple[int, int] | None: ...
    def read_header(self, offset: int, length: int) -> tuple[int, int]: ...
    def poll_header(self) -> tuple[int, int, int, int] | None: ...
    def wait_header(self, spin_ns: int) -> tuple[int, int, int, int] | None: ...
    def recv_small_into(
        self, dest: Any, want_tag: int, spin_ns: int
    ) -> tuple[int, int, bool, tuple[int, int, int, int] | None] | None: ...
    def take_posted(
        self, posted: list[Any], source: int, tag_bits: int
    ) -> tuple[int, bool, tuple[int, int, int, int] | None]: ...
    def read_into(self, src_offset: int, dest: Any, dest_offset: int, length: int) -> None: ...
    def stream_into(
        self,
        dest: Any,
        copied: int,
        total: int,
        expected: int,
        spin_ns: int,
        bypass_cache: bool,
    ) -> tuple[int, int, bool]: ...
    def complete(self, count: int) -> bool: ...
    def count_sleep(self) -> None: ...

# One member's one-round collectives of a collective slot (ivshmem_comm/collective.py, which
# uses it through ring.CollectiveRound; the protocol is CollectiveGroup's). run / fold /
# resume return 0 (done), 1 (a member declined) or (rank, u64 index, round, field) to block
# on before resume().
class CollectiveRound:
    broken: RingCorruptError | None
    taken: list[bytes | None] | None  # after a *_BYTES run: per member, what it took
    def __init__(
        self,
        region_buf: Any,
        blocks: Any,
        peers: Any,
        rank: int,
        slot: int,
        generation: int,
        slab_size: int,
        segment: int,
        kick: Any,
    ) -> None: ...
    def run(
        self,
        k: int,
        spin_ns: int,
        yield_: bool,
        which: int,
        send: Any,
        recv: Any,
        root: int,
        counts: Any,
        displs: Any,
        rcounts: Any,
        rdispls: Any,
    ) -> int | tuple[int, int, int, str]: ...
    def fold(
        self,
        k: int,
        spin_ns: int,
        yield_: bool,
        kind: int,
        send: Any,
        recv: Any,
        upto: int,
        dtype: int,
        op: int,
    ) -> int | tuple[int, int, int, str]: ...
    def front(
        self,
        k: int,
        spin_ns: int,
        yield_: bool,
        which: int,
        a: Any,
        b: Any,
        op: Any,
        root: Any,
        quiet: tuple[Any, ...] = ...,
    ) -> int | tuple[int, int, int, str] | None: ...
    def resume(self, spin_ns: int, yield_: bool) -> int | tuple[int, int, int, str]: ...
    def abort(self) -> None: ...

class MemoryExporter:
    # Base type (_memexport.c): buffers of an instance are the memory of `_exported`
    # (one-dimensional unsigned bytes); guest_lib.mpi.win.Win derives from it.
    _exported: Any
    @property
    def _exports(self) -> int: ...

class EmptyExporter:
    # Base type (_memexport.c): an instance exports an empty writable buffer at the address
    # int(instance), owned by no object; guest_lib.mpi.constants' BOTTOM etc. derive from it.
    ...
