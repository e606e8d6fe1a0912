"""Region: a formatted mapping of the shared memory (POSIX shm on a host, BAR2 in a guest).

A Region decodes and checks the superblock once, then offers the peer table and the queue
geometry. It never trusts the peer table for anything but advice: states and incarnations
there are written by peers and the broker and are re-validated by whoever acts on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import mmap
import os
import re
import struct
import time
import uuid as uuid_mod
import zlib
from typing import TYPE_CHECKING, Any

import posix_ipc

from ivshmem_comm import layout
from ivshmem_comm.errors import RegionFormatError
from ivshmem_comm.hostos import pid_alive

if TYPE_CHECKING:
    from ivshmem_comm.endpoint import Endpoint

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,62}")
SHM_DIR = "/dev/shm"


def validate_name(name: str) -> str:
    """Return `name` if it is a safe region name, else raise ValueError saying why.

    Safe: 1..63 characters of letters, digits, '_', '.', '-', not starting with '.' or '-'
    (so no '/', no '..' path, nothing hidden).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"bad region name {name!r}: use 1..63 of [A-Za-z0-9_.-], starting with a letter, "
            "digit or '_', without '..'"
        )
    return name


def shm_path(name: str) -> str:
    """Return the file path of region `name`'s POSIX shared-memory object (for QEMU)."""
    return os.path.join(SHM_DIR, validate_name(name))


@functools.cache
def host_id() -> int:
    """A 32-bit id of this running kernel (boot id), so a pid is only checked where it means."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return zlib.crc32(f.read().strip()) or 1
    except OSError:
        return 1


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """A copy of one peer-table slot, decoded. Advice only: the slot may change meanwhile."""

    peer: int
    state: int
    incarnation: int
    pid: int
    host_id: int
    doorbell: int
    heartbeat_ns: int
    joined_ns: int

    @property
    def state_name(self) -> str:
        return layout.PEER_STATE_NAMES.get(self.state, f"invalid({self.state})")

    def holder_alive(self) -> bool | None:
        """None if the holder's pid cannot be checked from this kernel (another host id, or
        no pid); else whether it runs, as :func:`ivshmem_comm.hostos.pid_alive` says (a
        zombie, or a pid reused since `joined_ns`, is not the holder)."""
        if self.host_id != host_id() or self.pid <= 0:
            return None
        return pid_alive(self.pid, started_by_ns=self.joined_ns)


def _map(fd: int, size: int) -> mmap.mmap:
    """Map a shm object shared, its page tables filled at once (MAP_POPULATE): the first pass
    of messages through a queue's data area would otherwise fault on every page, in both
    processes (measured: 1 MiB messages took 13x longer until the data area had wrapped)."""
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


def _max_peers_of(name: str) -> int | None:
    """The peer slots recorded in shm object `name`'s superblock; None if it has none that
    reads (no such object, too small, not a region)."""
    try:
        shm = posix_ipc.SharedMemory("/" + name)
    except posix_ipc.ExistentialError:
        return None
    try:
        size = os.fstat(shm.fd).st_size
        if size < layout.SUPERBLOCK_SIZE:
            return None
        with mmap.mmap(shm.fd, layout.SUPERBLOCK_SIZE, prot=mmap.PROT_READ) as head:
            return layout.unpack_superblock(bytes(head), size).geometry.max_peers
    except (OSError, RegionFormatError):
        return None
    finally:
        shm.close_fd()


class Region:
    """A mapped, checked region. Create with `create`, `open` or `attach`.

    Attributes: `name`, `uuid` (uuid.UUID), `size`, `max_peers`, `geometry`, `buf` (the
    writable memoryview of the whole region).
    """

    def __init__(self, buf: Any, *, owner: Any = None, shm_name: str | None = None) -> None:
        view = memoryview(buf)
        if view.readonly:
            raise ValueError("a region needs a writable mapping")
        self.buf = view.cast("B")
        sb = layout.unpack_superblock(bytes(self.buf[: layout.SUPERBLOCK_SIZE]), self.buf.nbytes)
        self.geometry = sb.geometry
        self.name = sb.name
        self.uuid = uuid_mod.UUID(bytes=sb.uuid)
        self.size = sb.geometry.region_size
        self.max_peers = sb.geometry.max_peers
        self.shm_name = shm_name
        self._owner = owner  # keeps the mmap alive; closed by close()
        # Aligned 8-byte and 4-byte views for single-instruction loads/stores (see atomics).
        self.u64 = self.buf[: self.size // 8 * 8].cast("Q")
        self.u32 = self.buf[: self.size // 4 * 4].cast("I")

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        max_peers: int,
        *,
        queue_num: int = 256,
        vring_align: int = layout.CACHE_LINE,
        max_span: int | None = None,
        heap_size: int | None = None,
    ) -> Region:
        """Create POSIX shm object `name` (mode 0600, exclusive), format it and map it
        (`heap_size`: the window heap's bytes, None: Geometry.fit's default share).

        Raises FileExistsError if an object of that name exists (nothing is overwritten),
        ValueError for a bad name or a geometry that does not fit `size`.
        """
        validate_name(name)
        geometry = layout.Geometry.fit(
            size, max_peers, queue_num, vring_align, max_span, heap_size=heap_size
        )
        try:
            shm = posix_ipc.SharedMemory(
                "/" + name, posix_ipc.O_CREX, mode=0o600, size=geometry.region_size
            )
        except posix_ipc.ExistentialError:
            raise FileExistsError(f"{shm_path(name)} exists; refusing to overwrite it") from None
        try:
            # Allocate every page now: a full /dev/shm fails here (ENOSPC), not later with a
            # SIGBUS in the middle of a message.
            os.posix_fallocate(shm.fd, 0, geometry.region_size)
            mapping = _map(shm.fd, geometry.region_size)
        except BaseException:
            shm.close_fd()
            shm.unlink()
            raise
        shm.close_fd()
        format_buffer(mapping, geometry, name)
        return cls(mapping, owner=mapping, shm_name=name)

    @classmethod
    def open(cls, name: str) -> Region:
        """Map the existing region `name` on this host.

        Raises FileNotFoundError if there is none, RegionFormatError if it is not a region.
        """
        validate_name(name)
        try:
            shm = posix_ipc.SharedMemory("/" + name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(f"no region {name!r} in {SHM_DIR}") from None
        try:
            size = os.fstat(shm.fd).st_size
            if size < layout.SUPERBLOCK_SIZE:
                raise RegionFormatError("size", f"{shm_path(name)} is only {size} bytes")
            mapping = _map(shm.fd, size)
        finally:
            shm.close_fd()
        try:
            return cls(mapping, owner=mapping, shm_name=name)
        except BaseException:
            # Views made before the error may still be referenced (by the traceback): the
            # mapping then goes with them; the error (e.g. the format's) must not be masked.
            with contextlib.suppress(BufferError):
                mapping.close()
            raise

    @classmethod
    def attach(cls, buffer: Any) -> Region:
        """Use any writable mapping (BAR2 in a guest, an mmap of a file) holding a region.

        The caller keeps ownership of `buffer`. Raises RegionFormatError if it holds none.
        """
        return cls(buffer)

    @staticmethod
    def unlink(name: str) -> None:
        """Remove region `name` from this host: its POSIX shm object and the doorbell
        semaphore of every peer slot (SemaphoreNotifier), counted from its superblock, or
        found by name where the object holds none. Mappings open elsewhere stay valid until
        closed. Raises FileNotFoundError if there is no shm object `name` (doorbells left
        under that name are removed all the same)."""
        from ivshmem_comm.notify import SemaphoreNotifier

        validate_name(name)
        max_peers = _max_peers_of(name)
        try:
            posix_ipc.unlink_shared_memory("/" + name)
        except posix_ipc.ExistentialError:
            SemaphoreNotifier.unlink_all(name)
            raise FileNotFoundError(f"no region {name!r} in {SHM_DIR}") from None
        SemaphoreNotifier.unlink_all(name, max_peers)

    def close(self) -> None:
        """Drop this process's mapping. Views still held elsewhere keep it alive until freed."""
        for view in (self.u64, self.u32, self.buf):
            try:
                view.release()
            except BufferError:
                pass  # a message view still points into it; the GC unmaps later
        if isinstance(self._owner, mmap.mmap):
            try:
                self._owner.close()
            except BufferError:
                pass
        self._owner = None

    # ------------------------------------------------------------------ peers
    def peer_slot_offset(self, peer: int) -> int:
        if not 0 <= peer < self.max_peers:
            raise ValueError(f"peer id {peer} out of range 0..{self.max_peers - 1}")
        return self.geometry.peer_table_offset + peer * layout.PEER_SLOT_SIZE

    def peer(self, peer: int) -> PeerInfo:
        """Return a decoded copy of peer `peer`'s slot (advice: it may change meanwhile)."""
        return PeerInfo(peer, *layout.PEER_SLOT.unpack_from(self.buf, self.peer_slot_offset(peer)))

    def peers(self) -> list[PeerInfo]:
        """Copies of every slot of the peer table."""
        return [self.peer(p) for p in range(self.max_peers)]

    def peer_state(self, peer: int) -> tuple[int, int]:
        """(state, incarnation) of `peer`, each one aligned 4-byte load."""
        base = self.peer_slot_offset(peer) // 4
        return self.u32[base], self.u32[base + 1]

    def write_peer(self, peer: int, **fields: int) -> None:
        """Store some fields of `peer`'s slot; `state` is stored last (release order, TSO).

        Ownership: the broker or the claiming peer itself; see endpoint.py for the protocol.
        """
        offset = self.peer_slot_offset(peer)
        names = ("state", "incarnation", "pid", "host_id", "doorbell", "heartbeat_ns", "joined_ns")
        formats = "IIIIQQQ"
        position = offset
        state = fields.pop("state", None)
        for field_name, fmt in zip(names, formats, strict=True):
            if field_name in fields:
                struct.pack_into("<" + fmt, self.buf, position, fields.pop(field_name))
            position += struct.calcsize(fmt)
        if fields:
            raise TypeError(f"unknown peer fields {sorted(fields)}")
        if state is not None:
            # Pairs with the acquire load in peer_state() of whoever checks this slot: the
            # other fields above are visible before the state that announces them.
            self.u32[offset // 4] = state

    def heartbeat(self, peer: int) -> None:
        """Store the current time into `peer`'s heartbeat (owner: that peer)."""
        offset = self.peer_slot_offset(peer) + layout.PEER_HEARTBEAT_OFFSET
        self.u64[offset // 8] = time.time_ns()

    # ------------------------------------------------------------------ broker fields
    def broker_info(self) -> tuple[int, int, int]:
        """(generation, broker pid, broker heartbeat ns) from the superblock's mutable line."""
        return layout.SB_BROKER.unpack_from(self.buf, layout.SB_BROKER_OFFSET)

    def write_broker_info(self, generation: int, pid: int) -> None:
        """Owner: the broker serving the region."""
        layout.SB_BROKER.pack_into(
            self.buf, layout.SB_BROKER_OFFSET, generation, pid, time.time_ns()
        )

    # ------------------------------------------------------------------ queues
    def queue_offset(self, src: int, dst: int) -> int:
        """Offset of queue src -> dst. Raises ValueError for a bad pair."""
        if src == dst or not (0 <= src < self.max_peers and 0 <= dst < self.max_peers):
            raise ValueError(f"no queue {src} -> {dst} among {self.max_peers} peers")
        return self.geometry.queue_offset(src, dst)

    def queue_counters(self, src: int, dst: int) -> dict[str, int]:
        """The counters of queue src -> dst (sent/received messages and bytes, waits, kicks)."""
        base = self.queue_offset(src, dst)
        drv = layout.COUNTERS.unpack_from(self.buf, base + layout.DRIVER_COUNTERS_OFFSET)
        dev = layout.COUNTERS.unpack_from(self.buf, base + layout.DEVICE_COUNTERS_OFFSET)
        counters = dict(zip(layout.COUNTER_NAMES_DRIVER, drv, strict=True))
        counters.update(zip(layout.COUNTER_NAMES_DEVICE, dev, strict=True))
        return counters

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description: superblock fields, peers, and every queue."""
        g = self.geometry
        _, avail_rel, used_rel = layout.vring_offsets(g.queue_num, g.vring_align)
        queues = []
        for src in range(self.max_peers):
            for dst in range(self.max_peers):
                if src == dst:
                    continue
                base = g.queue_offset(src, dst)
                queues.append(
                    {
                        "src": src,
                        "dst": dst,
                        "offset": base,
                        "ring_offset": base + g.ring_rel_offset,
                        "avail_offset": base + g.ring_rel_offset + avail_rel,
                        "used_offset": base + g.ring_rel_offset + used_rel,
                        "num": g.queue_num,
                        "align": g.vring_align,
                        "ring_size": layout.vring_size(g.queue_num, g.vring_align),
                        "data_offset": base + g.data_rel_offset,
                        "data_size": g.data_size,
                        "counters": self.queue_counters(src, dst),
                    }
                )
        generation, broker_pid, broker_heartbeat = self.broker_info()
        return {
            "name": self.name,
            "uuid": str(self.uuid),
            "version": layout.FORMAT_VERSION,
            "size": self.size,
            "max_peers": self.max_peers,
            "queue_num": g.queue_num,
            "vring_align": g.vring_align,
            "data_size": g.data_size,
            "max_span": g.max_span,
            "peer_table_offset": g.peer_table_offset,
            "queues_offset": g.queues_offset,
            "queue_stride": g.queue_stride,
            "coll_offset": g.coll_offset,
            "coll_slots": g.coll_slots,
            "coll_slab": g.coll_slab,
            "heap_offset": g.heap_offset,
            "heap_size": g.heap_size,
            "features": layout.QUEUE_FEATURES,
            "broker": {
                "generation": generation,
                "pid": broker_pid,
                "heartbeat_ns": broker_heartbeat,
            },
            "peers": [{**dataclasses.asdict(p), "state_name": p.state_name} for p in self.peers()],
            "queues": queues,
        }

    def endpoint(self, peer_id: int, **options: Any) -> Endpoint:
        """Claim peer slot `peer_id` and return its Endpoint; see Endpoint for `options`.

        Raises PeerSlotBusyError if a live peer holds the slot.
        """
        from ivshmem_comm.endpoint import Endpoint

        return Endpoint(self, peer_id, **options)

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Region(name={self.name!r}, size={self.size}, max_peers={self.max_peers})"


def format_buffer(buf: Any, geometry: layout.Geometry, name: str) -> uuid_mod.UUID:
    """Write a fresh region into `buf`: zero the tables, then the superblock. Returns its UUID.

    The caller must be the only user of `buf` (before any peer can map it).
    """
    view = memoryview(buf).cast("B")
    if view.nbytes < geometry.region_size:
        raise ValueError(f"buffer of {view.nbytes} bytes, geometry needs {geometry.region_size}")
    geometry.validate()
    # Fresh POSIX shm is zero-filled; an attached buffer may not be. Zero everything but the
    # data areas (their contents are only ever read inside published spans).
    view[: geometry.queues_offset] = bytes(geometry.queues_offset)
    for index in range(geometry.queue_count):
        base = geometry.queues_offset + index * geometry.queue_stride
        view[base : base + geometry.data_rel_offset] = bytes(geometry.data_rel_offset)
    # The collective area: every slot free, every sequence word 0 (see collective.py); the
    # window heap after it: lock free, every entry free, data zeroed (see winheap.py).
    coll_end = geometry.required_size
    view[geometry.coll_offset : coll_end] = bytes(coll_end - geometry.coll_offset)
    region_uuid = uuid_mod.uuid4()
    sb = layout.pack_superblock(geometry, region_uuid.bytes, name)
    view[: len(sb)] = sb
    view.release()
    return region_uuid
