"""Fuzz targets: everything a peer or a client controls, fed from fuzzer bytes.

Each target is `one_input(data: bytes) -> None`. It may raise only the errors listed with it
in TARGETS (the documented ones for hostile input); any other exception is a crash, and so
is a failed check inside (an assertion: a view outside its queue, the C ring and the Python
ring disagreeing, a leaked file descriptor).

* protocol   the broker's socket protocol over a real socketpair with real fds: the client
             side (read_handshake + ClientDecoder, as guest_lib.host_client and QEMU's peers
             read the broker) and the broker side (recv_reclaim).
* superblock a fuzzed superblock and peer table (Region over a buffer, as a guest attaches
             BAR2), then an Endpoint joining over that peer table and trying to talk.
* ring       a hostile peer's queue halves: honest traffic, then stores of fuzzed values over
             everything the other side owns (descriptor table, available ring, driver line,
             data area; or used ring and device line), then receives (or sends). Run on the
             pure-Python rings and, when built, on the C fast path, on identical memory: both
             must fail the same way or deliver the same bytes.
* mpi_wire   the MPI face's wire format: fuzzed core tags and payloads sent by a hostile rank
             into a real Engine's progress loop.
* config     `ivshmem-broker --config` files (host_broker.config.load_config).
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

import ivshmem_comm as ic
from host_broker import config as broker_config
from ivshmem_comm import channel, layout, protocol, virtqueue
from ivshmem_comm.region import Region, format_buffer

try:
    from ivshmem_comm import _fastpath
except ImportError:  # the C fast path is not built: the Python rings only
    _fastpath = None  # type: ignore[assignment]


class Reader:
    """Consumes fuzzer bytes; past the end every read gives zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __bool__(self) -> bool:
        return self.pos < len(self.data)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def rest(self) -> bytes:
        chunk, self.pos = self.data[self.pos :], len(self.data)
        return chunk


_WIDTHS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def _store(buf: bytearray, start: int, end: int, r: Reader) -> None:
    """Store a fuzzed value of a fuzzed width (1, 2, 4 or 8 bytes, aligned) at a fuzzed place
    of buf[start:end], as a hostile peer's single store would."""
    width = 1 << (r.uint(1) % 4)
    where = start + (r.uint(2) % max(end - start - width, 1)) // width * width
    struct.pack_into(_WIDTHS[width], buf, where, r.uint(8) & ((1 << (8 * width)) - 1))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _no_fd_leak(before: set[str]) -> None:
    leaked = _open_fds() - before
    assert not leaked, f"file descriptors leaked: {sorted(leaked)}"


# ------------------------------------------------------------------------------ protocol
def _make_fd(kind: int) -> int:
    if kind == 0:
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == 1:
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end
    return os.memfd_create("fuzz", os.MFD_CLOEXEC)


def _write_stream(sock: socket.socket, r: Reader) -> None:
    """Write what the hostile side sends: whole 8-byte messages, with or without one or more
    fds of any kind, and raw fragments; up to what the socket holds before anyone reads."""
    sock.setblocking(False)
    try:
        _write_items(sock, r)
    except BlockingIOError:
        pass  # the socket buffer is full: the stream ends here


def _write_items(sock: socket.socket, r: Reader) -> None:
    while r and r.pos < 2048:
        op = r.uint(1)
        if op & 3 == 0:
            sock.send(r.take((op >> 2) % 16 or 1))
            continue
        fds = [_make_fd((op >> 4) % 3) for _ in range(((op >> 2) & 3) if op & 3 == 2 else 0)]
        protocol.send_passing(sock, r.take(8 if op & 3 != 3 else 32), fds)


def protocol_target(data: bytes) -> None:
    r = Reader(data)
    side = r.uint(1) & 1
    before = _open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received: list[int] = []
    try:
        ours.settimeout(1.0)
        _write_stream(theirs, r)
        theirs.shutdown(socket.SHUT_WR)
        if side == 0:  # a client reading the broker
            try:
                handshake, decoder, items = protocol.read_handshake(ours)
            except protocol.HandshakeCutError as cut:
                received.append(cut.shm_fd)  # the memory is the catcher's to close
                raise
            received.append(handshake.shm_fd)
            received += [item.fd for item in items if item.fd is not None]
            while True:
                value, fd = protocol.recv_message(ours)
                item = decoder.feed(value, fd)  # on ProtocolError it has closed fd itself
                if fd is not None:
                    received.append(fd)
                assert item.kind in ("gone", "own", "vector"), item
        else:  # the broker reading a reclaim request
            request = protocol.recv_reclaim(ours)
            received += request.eventfds
            assert all(protocol.is_eventfd(fd) for fd in request.eventfds)
            assert len(request.eventfds) <= protocol.MAX_VECTORS
    finally:
        for fd in received:
            os.close(fd)
        ours.close()
        theirs.close()
        _no_fd_leak(before)


# ------------------------------------------------------------------------------ superblock
def _sized(max_peers: int, queue_num: int, data_size: int, max_span: int) -> layout.Geometry:
    """The geometry with exactly the region size it needs."""
    needed = layout.Geometry(0, max_peers, queue_num, 64, data_size, max_span).required_size
    return layout.Geometry(needed, max_peers, queue_num, 64, data_size, max_span)


_SB_GEOMETRIES = [
    _sized(peers, qnum, 4096 * pages, 1024)
    for peers in (2, 3)
    for qnum in (2, 8)
    for pages in (1, 2)
]


def superblock_target(data: bytes) -> None:
    r = Reader(data)
    geometry = _SB_GEOMETRIES[r.uint(1) % len(_SB_GEOMETRIES)]
    buf = bytearray(geometry.region_size)
    format_buffer(buf, geometry, "fuzz")
    table_end = geometry.peer_table_offset + geometry.max_peers * layout.PEER_SLOT_SIZE
    fix_crc = r.uint(1)
    for _ in range(r.uint(1) % 24):
        _store(buf, 0, table_end, r)
    if fix_crc & 1:  # the fields behind the checksum get reached too
        body = bytes(buf[: layout.SB_CHECKSUM_OFFSET])
        layout.SB_CHECKSUM.pack_into(buf, layout.SB_CHECKSUM_OFFSET, zlib.crc32(body))
    mapped = len(buf) - (4096 if fix_crc & 2 else 0)
    region = Region.attach(memoryview(buf)[:mapped])
    region.describe()
    for info in region.peers():
        info.state_name  # noqa: B018 - the decoding is what is exercised
        info.holder_alive()
    try:
        ep = region.endpoint(r.uint(1) % region.max_peers, spin_us=0)
    except ic.PeerSlotBusyError:
        return
    try:
        for p in range(region.max_peers):
            if p != ep.peer_id:
                ep.send(p, b"x", timeout=0.001)
        ep.recv(timeout=0.001)
    finally:
        ep.close()


# ------------------------------------------------------------------------------ ring
_RING_G = _sized(2, 8, 8192, 2048)
_RING_TEMPLATE = bytearray(_RING_G.region_size)
format_buffer(_RING_TEMPLATE, _RING_G, "fuzz-ring")
_SESSION = layout.session_word(1, 1)
RING_IMPLEMENTATIONS: list[Any] = [virtqueue] + ([_fastpath] if _fastpath is not None else [])


def _owned(src: int, dst: int, driver: bool) -> list[tuple[int, int]]:
    """[start, end) of what the driver (or the device) of queue src -> dst writes."""
    g = _RING_G
    q = g.queue_offset(src, dst)
    ring = q + g.ring_rel_offset
    _, _, used = layout.vring_offsets(g.queue_num, g.vring_align)
    if driver:
        return [
            (q, q + layout.CACHE_LINE),
            (q + layout.DRIVER_COUNTERS_OFFSET, q + layout.DEVICE_COUNTERS_OFFSET),
            (ring, ring + used),
            (q + g.data_rel_offset, q + g.data_rel_offset + g.data_size),
        ]
    return [
        (q + layout.DEVICE_LINE_OFFSET, q + layout.DRIVER_COUNTERS_OFFSET),
        (q + layout.DEVICE_COUNTERS_OFFSET, q + layout.CONTROL_SIZE),
        (ring + used, ring + layout.vring_size(g.queue_num, g.vring_align)),
    ]


def _no_wait(deadline: float | None) -> bool:
    if deadline is None or time.monotonic() >= deadline:
        raise ic.TimeoutError("the fuzzed peer published nothing more")
    return False


def _nothing() -> None:
    pass


def _ring_run(impl: Any, plan: bytes) -> list[Any]:
    """One fuzzed exchange on fresh memory with `impl`'s rings; the outcomes in order."""
    r = Reader(plan)
    buf = bytearray(_RING_TEMPLATE)
    g = _RING_G
    view = memoryview(buf)
    hostile_sender = r.uint(1) & 1
    src, dst = (1, 0) if hostile_sender else (0, 1)
    q = g.queue_offset(src, dst)
    tx_ring = impl.TxRing(view, q, g, dst)
    rx_ring = impl.RxRing(view, q, g, src)
    tx_ring.reset(_SESSION)
    rx_ring.reset(_SESSION)
    tx = channel.TxChannel(tx_ring, g, _nothing, _no_wait)
    rx = channel.RxChannel(rx_ring, src, view, g, _nothing, _no_wait, 0.0)
    outcomes: list[Any] = []
    for i in range(r.uint(1) % 4):  # honest traffic first
        try:
            tx.send(memoryview(bytes([i]) * (r.uint(2) % 5000)), i, time.monotonic())
        except ic.TimeoutError:
            break
    areas = _owned(src, dst, driver=bool(hostile_sender))
    for _ in range(r.uint(1) % 16):
        start, end = areas[r.uint(1) % len(areas)]
        _store(buf, start, end, r)
    lo, hi = q + g.data_rel_offset, q + g.data_rel_offset + g.data_size
    base = np.frombuffer(buf, np.uint8).ctypes.data
    for _ in range(1 + r.uint(1) % 4):
        op = r.uint(1) % 4
        try:
            if hostile_sender and op == 0:
                head = rx.peek()
                if head is None:
                    outcomes.append(None)
                    continue
                with rx.take() as message:
                    if message.nbytes and message._channel is not None:
                        at = np.frombuffer(message.data, np.uint8).ctypes.data - base
                        assert lo <= at and at + message.nbytes <= hi, (at, message.nbytes)
                    outcomes.append(bytes(message.data))
            elif hostile_sender and op in (1, 2):
                head = rx.peek()
                if head is None or head[0] > 3 * g.data_size:
                    outcomes.append(head)
                    continue
                dest = bytearray(head[0])
                outcomes.append((rx.take_into(memoryview(dest)), bytes(dest)))
            elif hostile_sender:
                outcomes.append(rx.take_small_into(bytearray(64), -1, 0))
            elif op == 0:
                outcomes.append(tx_ring.reclaim())
            else:
                tx.send(memoryview(bytes(r.uint(2) % 20000)), op, time.monotonic())
                outcomes.append("sent")
        except (ic.RingCorruptError, ic.PeerLostError, ic.TimeoutError) as error:
            outcomes.append(type(error).__name__)
            break
    return outcomes


def ring_target(data: bytes) -> None:
    results = [_ring_run(impl, data) for impl in RING_IMPLEMENTATIONS]
    assert all(result == results[0] for result in results), f"rings disagree: {results}"


# ------------------------------------------------------------------------------ mpi wire
class _MpiWorld:
    """A region in this process: rank 0's Endpoint and Engine, and a hostile rank 1."""

    def __init__(self) -> None:
        g = layout.Geometry.fit(1 << 20, 2, queue_num=64)
        self.buf = bytearray(g.region_size)
        format_buffer(self.buf, g, "fuzz-mpi")
        self.region = Region(self.buf)
        self.ep0 = self.region.endpoint(0, spin_us=0)
        self.ep1 = self.region.endpoint(1, spin_us=0)
        assert self.ep0.peers() == [1]  # rank 0 syncs its halves with the later rank 1

    def drain(self) -> None:
        while self.ep0.iprobe() is not None:
            self.ep0.recv(timeout=0).release()


_mpi: _MpiWorld | None = None


def mpi_wire_target(data: bytes) -> None:
    global _mpi
    from guest_lib.mpi import exceptions as mpi_exceptions
    from guest_lib.mpi.engine import Engine
    from guest_lib.mpi.routes import SelfRoute, ShmRoute

    if _mpi is None:
        _mpi = _MpiWorld()
    world = _mpi
    world.drain()
    engine = Engine(0, 2, world.ep0, [SelfRoute(), ShmRoute(1)])
    r = Reader(data)
    for _ in range(r.uint(1) % 8):
        coretag = r.uint(4) & layout.TAG_MAX
        payload = r.take(r.uint(1) % 40)
        try:
            world.ep1.send(0, payload, tag=coretag, timeout=0)
        except ic.TimeoutError:
            break
    try:
        for _ in range(4):
            engine.progress()
    except mpi_exceptions.Exception:
        pass


# ------------------------------------------------------------------------------ config
_CONFIG_PATH = os.path.join(tempfile.gettempdir(), f"fuzz-config-{os.getpid()}.toml")


def config_target(data: bytes) -> None:
    with open(_CONFIG_PATH, "wb") as f:
        f.write(data)
    try:
        config = broker_config.load_config(_CONFIG_PATH)
        broker_config.check_unique(config)
        for region in config.regions:
            region.geometry()
            region.socket_path(config.state_dir or "/run/ivshmem-broker")
            config.region_allow(region)
    finally:
        os.unlink(_CONFIG_PATH)


# ------------------------------------------------------------------------------ registry
# Crashes found and reported, not fixed yet (in code this package may not change): the
# exception type and the innermost frame (file, function) that raises it. `--skip-known`
# lets a run go on past them; tests/core/test_fuzz.py replays each as a strict xfail.
KNOWN: dict[str, list[tuple[type[BaseException], str, str]]] = {}


def is_known(target: str, error: BaseException) -> bool:
    """True iff `error` raised in `target` is one of its KNOWN crashes."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    code = tb.tb_frame.f_code
    return any(
        isinstance(error, kind) and code.co_filename.endswith(path) and code.co_name == function
        for kind, path, function in KNOWN.get(target, [])
    )


Target = tuple[Callable[[bytes], None], tuple[type[BaseException], ...], list[bytes]]

TARGETS: dict[str, Target] = {
    "protocol": (
        protocol_target,
        (protocol.ProtocolError,),
        [
            b"\x00\x01"
            + bytes(8)
            + b"\x01"
            + (5).to_bytes(8, "little", signed=True)
            + b"\x06"
            + (-1).to_bytes(8, "little", signed=True)
            + b"\x02\x05"
            + bytes(8)
        ],
    ),
    "superblock": (
        superblock_target,
        (
            ic.RegionFormatError,
            ic.PeerSlotBusyError,
            ic.PeerLostError,
            ic.RingCorruptError,
            ic.TimeoutError,
        ),
        [bytes(4), b"\x00\x01\x02\x10\x00\x01" + bytes(8)],
    ),
    "ring": (
        ring_target,
        (),
        [bytes(8), b"\x01\x03\x10\x00\x20\x00\x30\x00\x02\x00\x00\x08\x00\x00\x00\x00\x00\x00"],
    ),
    "mpi_wire": (
        mpi_wire_target,
        (),
        [  # a DATA message (context 0, tag 5), then an ACK with its 8-byte sequence number
            b"\x02"
            + (5).to_bytes(4, "little")
            + b"\x03abc"
            + (3 << 29).to_bytes(4, "little")
            + b"\x08"
            + bytes(8)
        ],
    ),
    "config": (
        config_target,
        (broker_config.ConfigError,),
        [
            b'state_dir = "/tmp/x"\n[[region]]\nname = "a"\nsize = "64M"\nmax_peers = 4\n',
            b'[[region]]\nname = "b"\nsize = 4096\nsocket = "/tmp/b.sock"\nallow_uids = [0]\n',
        ],
    ),
}
