"""The broker daemon: regions, listening sockets, peers, lifecycle, restart adoption.

One `Broker` serves one or more regions; each region has one `RegionServer` with its own
UNIX socket that speaks QEMU's ivshmem-server protocol (see protocol.py). Everything runs in
one thread around one selector: accepts, client sockets (a byte or end of stream from a
client ends its membership), pidfds of orphaned peers, the signal wake-up pipe and a 1 s
heartbeat.

Peer ids. The ivshmem id a peer gets on the wire (QEMU's IVPosition, the target of a
doorbell) is not its peer-table slot: ids only increase (1, 2, 3, ... up to MAX_IVSHMEM_ID,
then wrap to 1 skipping ids in use, ids still in any slot's `doorbell` field and recently
released ones), like QEMU's ivshmem-server (cur_id++). QEMU 7.2 frees a departed peer's
eventfd array but keeps the pointer, so announcing a new peer under a reused id makes the
next "peer gone" free it again and crashes every surviving QEMU. A peer's slot is any free
one (FREE/LEFT/DEAD); its `doorbell` field holds its ivshmem id, which is how guests and
host clients map ids to slots. A restarted broker reads the ids from the peer table and
continues after the highest one seen (plus ID_RESTART_MARGIN).

State. The broker keeps no state that only lives in its memory: the region's peer table
says who holds which slot (state, incarnation, pid, join time) and the superblock's broker
line says which broker generation serves it. A restarted broker re-adopts a region:

* slots in JOINING/READY whose process is gone (pid dead, or reused: the process started
  after the slot's join time) are marked DEAD;
* live ones become *orphans*: the broker watches their pid through a pidfd (so a death is
  still seen, and announced, without a socket), and waits for them to *reclaim*;
* a host client of this project (guest_lib.host_client) reconnects on its own, sends a
  reclaim request (peer id + incarnation + its own eventfds, see protocol.py) and keeps its
  id; the broker checks the request against the peer table and SO_PEERCRED (same pid,
  same incarnation, slot still live, 1 to `vectors` eventfds) before it believes it, then
  sends the usual handshake and re-announces the peer to everyone connected. A client cut
  off in its first handshake holds only its first eventfds: the broker makes the missing
  ones, and the handshake and the announcements carry them. A refused request is answered
  with the reason (protocol.send_reclaim_refusal), so the client stops asking;
* QEMU cannot reconnect. Its guest keeps the memory and the eventfds of the peers it knew,
  so traffic with those peers goes on; the broker still sees its death (pidfd). What is
  lost: peers that join after the restart cannot interrupt it, and it cannot interrupt
  them (QEMU only learns peers through its one chardev connection).

Unless there is an fd store (`Broker.fd_store`, ``serve --fd-store`` under systemd or
``ivshmem-broker supervise``): then the broker hands its listening sockets and every peer's
connection and eventfds to the service manager as it makes them (names ``l/REGION``,
``c/REGION/ID``, ``e/REGION/ID/VECTOR``), takes them off when a peer goes, and a broker
restarted after a crash gets them back: each live slot whose connection comes back (from the
slot's pid, checked with SO_PEERCRED) is a connected peer again, QEMU included, and hears who
died meanwhile; connections that arrived in between wait in the listening socket's backlog.

Ownership of shared fields written here (all in the region, see ivshmem_comm.layout):

* superblock broker line (generation, pid, heartbeat): the broker only;
* a peer slot's incarnation, pid, host_id, doorbell, heartbeat_ns, joined_ns and the state
  JOINING: the broker, while handing the slot out (the slot is FREE/LEFT/DEAD and no live
  process holds it, so nobody else writes it then);
* the state DEAD: the broker, when the holder's socket closes or its process exits, and only
  if the slot is live (not LEFT) and still carries the holder's ivshmem id in `doorbell`,
  whatever its incarnation: a second process in a VM may re-claim the VM's slot (new
  incarnation, same id), and it dies with the VM, i.e. with the QEMU connection;
* READY and LEFT: the peer itself (its Endpoint), never the broker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import logging
import mmap
import os
import selectors
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from host_broker.access import (
    AllowList,
    bind_socket,
    blocked_parent,
    ensure_socket_dir,
    group_name,
    peer_groups,
)
from host_broker.config import BrokerConfig, RegionConfig
from host_broker.sd_notify import FdStore
from ivshmem_comm import layout, protocol
from ivshmem_comm.errors import RegionFormatError
from ivshmem_comm.hostos import pid_alive
from ivshmem_comm.records import BrokerRecord, write_record
from ivshmem_comm.region import Region, host_id, shm_path

log = logging.getLogger("ivshmem-broker")

RECLAIM_WAIT_S = 0.5  # how long a connection from an orphan's pid may take to reclaim
HEARTBEAT_S = 1.0
LIVE_STATES = (layout.PEER_JOINING, layout.PEER_READY)
FREE_STATES = (layout.PEER_FREE, layout.PEER_LEFT, layout.PEER_DEAD)
FIRST_IVSHMEM_ID = 1  # 0 is IVPosition without a server, and the doorbell of a FREE slot
MAX_IVSHMEM_ID = 0xFFFE  # QEMU keeps peer_id + 1 <= IVSHMEM_MAX_PEERS (0xFFFF) peers
ID_RESTART_MARGIN = 64  # a restarted broker skips this many ids past the highest seen
ID_RECENT = 4096  # how many released ids are kept out of reuse after a wrap


class BrokerError(Exception):
    """The broker refuses to start or to serve a region; the message says why and what to do."""


# ------------------------------------------------------------------------------ processes
def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def is_qemu(pid: int) -> bool:
    """True iff process `pid` is a QEMU (its /proc/<pid>/comm starts with "qemu")."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("qemu")
    except OSError:
        return False


def holder_alive(info: Any) -> bool:
    """True iff the process recorded in peer slot `info` (a PeerInfo) still runs here.

    A slot written on another boot (host_id neither ours nor 0), with no pid, or whose pid
    now belongs to a process started after the slot's join time, has no live holder.
    QEMU slots carry host_id 0 but their pid is a host pid, so they are checked too.
    """
    if info.host_id not in (0, host_id()):
        return False
    return pid_alive(info.pid, started_by_ns=info.joined_ns)


def process_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _kick(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # counter saturated: the peer has a wake-up pending anyway
    except OSError as exc:
        log.debug("kick on fd %d failed: %s", fd, exc)


# ------------------------------------------------------------------------------ peers
@dataclasses.dataclass
class Peer:
    """The broker's view of one slot it handed out (or adopted). Memory only, rebuildable.

    `id` is the ivshmem id (on the wire, and in the slot's `doorbell`), `slot` the index
    of its peer-table slot. `eventfds` are the broker's own copies (closed when the peer
    goes); empty for an orphan that has not reclaimed. `sock` is None for an orphan;
    `pidfd` is set only for orphans.
    """

    id: int
    slot: int
    incarnation: int
    pid: int
    uid: int
    qemu: bool
    eventfds: list[int]
    sock: socket.socket | None = None
    pidfd: int | None = None

    def describe(self) -> str:
        kind = "qemu" if self.qemu else "process"
        return (
            f"peer {self.id} (slot {self.slot}, {kind} pid {self.pid}, "
            f"incarnation {self.incarnation})"
        )


@dataclasses.dataclass
class Pending:
    """A connection from an orphan's pid, waiting up to RECLAIM_WAIT_S for a reclaim: if it
    says nothing by then it joins afresh; a request begun and not finished is dropped. The
    request is read as it comes (`reader`, which owns the fds received so far)."""

    sock: socket.socket
    pid: int
    uid: int
    deadline: float
    reader: protocol.ReclaimReader = dataclasses.field(default_factory=protocol.ReclaimReader)


class RegionServer:
    """One region: its shm object, its socket, its peers. Created by Broker.start()."""

    def __init__(self, broker: Broker, cfg: RegionConfig, config: BrokerConfig) -> None:
        self.broker = broker
        self.cfg = cfg
        self.name = cfg.name
        self.state_dir = config.state_dir
        self.allow = AllowList(config.region_allow(cfg), config.region_allow_gids(cfg))
        self.socket_group = config.socket_group
        self.socket_path = cfg.socket_path(config.state_dir)
        self.region: Region | None = None
        self.shm_fd: int | None = None
        self.lock_fd: int | None = None
        self.listener: socket.socket | None = None
        self.socket_ino: int | None = None
        self.generation = 0
        self.peers: dict[int, Peer] = {}  # keyed by ivshmem id
        self.last_id = FIRST_IVSHMEM_ID - 1  # the last ivshmem id handed out
        self.recent_ids: dict[int, None] = {}  # released ids, oldest first (ID_RECENT)
        self.pending: dict[int, Pending] = {}  # keyed by socket fileno
        self.died_while_down: list[int] = []
        self.adopted = False

    # ---------------------------------------------------------------- startup
    def open(self) -> None:
        """Lock, create or adopt the region, bind the socket. Raises BrokerError."""
        for path in (self.state_dir, os.path.dirname(self.socket_path)):
            try:
                ensure_socket_dir(path, self.socket_group)
            except OSError as exc:  # our own checks carry a message, system calls a filename
                detail = str(exc) if exc.filename is None else f"{path}: {exc.strerror}"
                raise BrokerError(detail) from None
        group = self.socket_group
        blocked = group is not None and blocked_parent(os.path.dirname(self.socket_path), group)
        if group is not None and blocked:
            log.warning(
                "region %s: group %s cannot enter %s, so it cannot reach %s either",
                self.name, group_name(group), blocked, self.socket_path,
            )  # fmt: skip
        self._lock()
        self._open_region()
        self._bind()
        write_record(
            self.state_dir,
            BrokerRecord(
                name=self.name,
                socket=self.socket_path,
                vectors=self.cfg.vectors,
                size=self.region.size if self.region else self.cfg.size,
                max_peers=self.cfg.max_peers,
            ),
        )

    def _lock(self) -> None:
        path = os.path.join(self.state_dir, f"{self.name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BrokerError(
                f"region {self.name!r}: another broker holds {path}; stop it first"
            ) from None
        self.lock_fd = fd

    def _open_region(self) -> None:
        cfg = self.cfg
        path = shm_path(cfg.name)
        try:
            region = Region.create(
                cfg.name,
                cfg.size,
                cfg.max_peers,
                queue_num=cfg.queue_num,
                vring_align=cfg.vring_align,
                max_span=cfg.max_span,
            )
        except FileExistsError:
            region = self._adopt(path)
        else:
            self.generation = 1
        self.region = region
        if self.shm_fd is None:
            self.shm_fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        region.write_broker_info(self.generation, os.getpid())
        if self.adopted:
            self._adopt_peers()
        log.info(
            "region %s: %s %s (%d bytes, %d peers, %d vectors, generation %d)",
            self.name,
            "adopted" if self.adopted else "created",
            path,
            region.size,
            region.max_peers,
            cfg.vectors,
            self.generation,
        )

    def _adopt(self, path: str) -> Region:
        """Map an existing shm object after checking it is ours and a region like ours."""
        cfg = self.cfg
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise BrokerError(f"{path} exists but cannot be opened: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BrokerError(f"{path} exists and is not a regular file: refusing it")
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise BrokerError(
                    f"{path} exists and is not ours (owner uid {st.st_uid}, mode "
                    f"{stat.S_IMODE(st.st_mode):04o}): refusing to touch it"
                )
            if st.st_size < layout.SUPERBLOCK_SIZE:
                raise BrokerError(
                    f"{path} exists and is not a region ({st.st_size} bytes): refusing to "
                    "overwrite it; remove it yourself if it is garbage"
                )
            try:
                layout.unpack_superblock(os.pread(fd, layout.SUPERBLOCK_SIZE, 0), st.st_size)
            except RegionFormatError as exc:
                raise BrokerError(
                    f"{path} exists and is not a region ({exc}): refusing to overwrite it"
                ) from None
            mapping = mmap.mmap(fd, st.st_size)
            region = Region(mapping, owner=mapping, shm_name=cfg.name)
        except BaseException:
            os.close(fd)
            raise
        self.shm_fd = fd
        g = region.geometry
        wanted = cfg.geometry()
        for field in ("region_size", "max_peers", "queue_num", "vring_align"):
            if getattr(g, field) != getattr(wanted, field):
                region.close()
                raise BrokerError(
                    f"region {cfg.name!r} exists with {field}={getattr(g, field)}, the "
                    f"configuration says {getattr(wanted, field)}; run `ivshmem-broker "
                    f"destroy {cfg.name}` first or fix the configuration"
                )
        generation, pid, _ = region.broker_info()
        if pid and pid != os.getpid() and pid_alive(pid):
            cmd = process_cmdline(pid)
            if "broker" in cmd:
                region.close()
                raise BrokerError(
                    f"region {cfg.name!r} is served by a live broker (pid {pid}: {cmd.strip()})"
                )
        self.generation = generation + 1
        self.adopted = True
        return region

    def _adopt_peers(self) -> None:
        """Sort the slots of an adopted region into dead ones and orphans (see module doc)."""
        region = self.region
        assert region is not None
        infos = region.peers()
        seen = [i.doorbell for i in infos if 0 < i.doorbell <= MAX_IVSHMEM_ID]
        if seen:
            # Ids stay stable across restarts: continue past the highest one in the table.
            self.last_id = (max(seen) + ID_RESTART_MARGIN - 1) % MAX_IVSHMEM_ID + 1
        for info in infos:
            if info.state not in LIVE_STATES:
                continue
            ivshmem_id = info.doorbell
            bad_id = not 0 <= ivshmem_id <= MAX_IVSHMEM_ID or ivshmem_id in self.peers
            if bad_id or not holder_alive(info):
                # Ownership: DEAD written by the broker for a slot whose holder is gone (or
                # whose doorbell field holds no usable ivshmem id: nobody can reach it).
                region.write_peer(info.peer, state=layout.PEER_DEAD)
                if not bad_id:
                    self.died_while_down.append(ivshmem_id)
                log.info(
                    "region %s: peer %d (slot %d, pid %d, incarnation %d) died while no "
                    "broker ran%s",
                    self.name, ivshmem_id, info.peer, info.pid, info.incarnation,
                    " (bad ivshmem id)" if bad_id else "",
                )  # fmt: skip
                continue
            restored = self._restore_peer(info)
            if restored is not None:
                self.peers[restored.id] = restored
                continue
            try:
                pidfd = os.pidfd_open(info.pid)
            except OSError:
                region.write_peer(info.peer, state=layout.PEER_DEAD)
                self.died_while_down.append(ivshmem_id)
                continue
            peer = Peer(
                ivshmem_id,
                info.peer,
                info.incarnation,
                info.pid,
                -1,
                is_qemu(info.pid),
                [],
                None,
                pidfd,
            )
            self.peers[peer.id] = peer
            self.broker.watch(pidfd, functools.partial(self._orphan_exited, peer))
            log.info(
                "region %s: %s is alive; waiting for it to reclaim", self.name, peer.describe()
            )
        for peer in list(self.peers.values()):
            if peer.sock is not None:  # restored: tell it who died meanwhile, as a reclaim does
                self.broker.watch(peer.sock, functools.partial(self._readable, peer))
                try:
                    for gone in self.died_while_down:
                        protocol.send_peer_gone(peer.sock, gone)
                except OSError as exc:
                    self._drop(peer, f"cannot announce to it: {exc}")
                    continue
                if self.died_while_down:
                    _kick(peer.eventfds[0])

    # ---------------------------------------------------------------- fd store
    def _fd_names(self, peer: Peer, vectors: int | None = None) -> list[str]:
        """The fd store names of `peer`: its connection, then one per eventfd."""
        count = len(peer.eventfds) if vectors is None else vectors
        return [f"c/{self.name}/{peer.id}"] + [f"e/{self.name}/{peer.id}/{v}" for v in range(count)]

    def _store_peer(self, peer: Peer) -> None:
        """Hand `peer`'s connection and eventfds to the fd store (if there is one)."""
        store = self.broker.fd_store
        if store is None or peer.sock is None:
            return
        for name, fd in zip(
            self._fd_names(peer), [peer.sock.fileno(), *peer.eventfds], strict=True
        ):
            store.store(name, fd)

    def _unstore_peer(self, peer: Peer) -> None:
        store = self.broker.fd_store
        if store is not None:
            for name in self._fd_names(peer, self.cfg.vectors):
                store.remove(name)

    def _restore_peer(self, info: Any) -> Peer | None:
        """The connected Peer of live slot `info` rebuilt from the fd store: its connection
        (whose SO_PEERCRED pid must be the slot's) and its eventfds, or None (the fds that
        came back for it, if any, are closed and removed from the store)."""
        store = self.broker.fd_store
        if store is None:
            return None
        probe = Peer(info.doorbell, info.peer, info.incarnation, info.pid, -1, False, [])
        names = self._fd_names(probe, self.cfg.vectors)
        got = [store.take(name) for name in names]
        if not any(got):
            return None
        conn: socket.socket | None = None
        reason = None
        if any(len(fds) != 1 for fds in got):
            reason = "fds missing or doubled"
        else:
            conn = socket.socket(fileno=got[0][0])
            eventfds = [fds[0] for fds in got[1:]]
            if conn.family != socket.AF_UNIX or conn.type != socket.SOCK_STREAM:
                reason = "not a UNIX stream socket"
            elif peer_credentials(conn)[0] != info.pid:
                reason = f"its connection belongs to pid {peer_credentials(conn)[0]}"
            elif not all(protocol.is_eventfd(fd) for fd in eventfds):
                reason = "an fd that is not an eventfd"
        if reason is not None or conn is None:
            log.warning(
                "region %s: fd store entry of peer %d (slot %d) refused: %s",
                self.name, info.doorbell, info.peer, reason,
            )  # fmt: skip
            if conn is not None:
                conn.close()
            for fds in got[0 if conn is None else 1 :]:
                for fd in fds:
                    _close(fd)
            for name in names:
                store.remove(name)
            return None
        conn.setblocking(False)
        _, uid, _ = peer_credentials(conn)
        peer = Peer(
            info.doorbell, info.peer, info.incarnation, info.pid, uid, is_qemu(info.pid),
            eventfds, conn,
        )  # fmt: skip
        log.info("region %s: %s restored from the fd store", self.name, peer.describe())
        return peer

    def _take_listener(self) -> socket.socket | None:
        """The listening socket of a previous broker from the fd store, if it still listens
        on our socket path; anything else that came back under its name is closed."""
        store = self.broker.fd_store
        name = f"l/{self.name}"
        fds = store.take(name) if store is not None else []
        listener = None
        for fd in fds:
            sock = socket.socket(fileno=fd)
            if listener is None and sock.family == socket.AF_UNIX and sock.getsockname() == (
                self.socket_path
            ) and os.path.exists(self.socket_path):  # fmt: skip
                listener = sock
            else:
                sock.close()
        if fds and listener is None and store is not None:
            store.remove(name)
        return listener

    def _bind(self) -> None:
        path = self.socket_path
        inherited = self._take_listener()
        if inherited is not None:
            inherited.setblocking(False)
            self.listener = inherited
            self.socket_ino = os.lstat(path).st_ino
            self.broker.watch(inherited, self._accept)
            log.info("region %s: listening on %s (socket from the fd store)", self.name, path)
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise BrokerError(f"{path} exists and is not a socket: refusing to remove it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale, from a broker that died
            else:
                raise BrokerError(f"something already listens on {path}")
            finally:
                probe.close()
        listener = bind_socket(path, self.socket_group)
        listener.setblocking(False)
        self.listener = listener
        if self.broker.fd_store is not None:
            self.broker.fd_store.store(f"l/{self.name}", listener.fileno())
        self.socket_ino = os.lstat(path).st_ino
        self.broker.watch(listener, self._accept)
        log.info("region %s: listening on %s", self.name, path)

    # ---------------------------------------------------------------- connections
    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid, uid, gid = peer_credentials(conn)
        refusal = self.allow.refusal(uid, gid, peer_groups(conn) if self.allow.gids else [])
        if refusal is not None:
            log.warning("region %s: refused pid %d: %s", self.name, pid, refusal)
            conn.close()
            return
        conn.setblocking(False)
        if any(p.sock is None and p.pid == pid for p in self.peers.values()):
            pending = Pending(conn, pid, uid, time.monotonic() + RECLAIM_WAIT_S)
            self.pending[conn.fileno()] = pending
            self.broker.watch(conn, lambda: self._reclaim(pending))
            return
        self._join(conn, pid, uid)

    def _free_slot(self) -> int | None:
        """A FREE/LEFT/DEAD slot that no peer of ours holds (an orphan's or a connected
        QEMU's slot may be LEFT/DEAD while a process inside that VM re-claims it)."""
        assert self.region is not None
        held = {p.slot for p in self.peers.values()}
        for slot in range(self.region.max_peers):
            if slot in held:
                continue
            state, _ = self.region.peer_state(slot)
            if state in FREE_STATES:
                return slot
        return None

    def _next_id(self) -> int:
        """The next ivshmem id: increasing, wrapping to FIRST_IVSHMEM_ID after MAX_IVSHMEM_ID,
        never one in use, preferably none still in a slot's doorbell or recently released."""
        assert self.region is not None
        in_use = set(self.peers)
        in_table = {info.doorbell for info in self.region.peers()}
        span = MAX_IVSHMEM_ID - FIRST_IVSHMEM_ID + 1
        for avoid in (in_use | in_table | set(self.recent_ids), in_use):
            candidate = self.last_id
            for _ in range(span):
                candidate = candidate + 1 if candidate < MAX_IVSHMEM_ID else FIRST_IVSHMEM_ID
                if candidate not in avoid:
                    self.last_id = candidate
                    return candidate
        raise BrokerError("no free ivshmem id")  # unreachable: max_peers is far below span

    def _release_id(self, ivshmem_id: int) -> None:
        self.recent_ids.pop(ivshmem_id, None)
        self.recent_ids[ivshmem_id] = None
        while len(self.recent_ids) > ID_RECENT:
            del self.recent_ids[next(iter(self.recent_ids))]

    def _join(self, conn: socket.socket, pid: int, uid: int) -> None:
        region = self.region
        assert region is not None and self.shm_fd is not None
        slot = self._free_slot()
        if slot is None:
            log.warning(
                "region %s: refused pid %d: all %d peer slots are taken",
                self.name, pid, region.max_peers,
            )  # fmt: skip
            conn.close()
            return
        ivshmem_id = self._next_id()
        _, old_incarnation = region.peer_state(slot)
        incarnation = (old_incarnation + 1) & 0xFFFFFFFF or 1
        qemu = is_qemu(pid)
        eventfds = [
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.cfg.vectors)
        ]
        peer = Peer(ivshmem_id, slot, incarnation, pid, uid, qemu, eventfds, conn)
        # Ownership: the broker hands the slot out; every field first (the ivshmem id in
        # `doorbell` included, before anyone hears of the id), JOINING last (write_peer
        # stores state after the rest). The peer itself writes READY later.
        region.write_peer(
            slot,
            incarnation=incarnation,
            pid=pid,
            host_id=0 if qemu else host_id(),
            doorbell=ivshmem_id,
            heartbeat_ns=0,
            joined_ns=time.time_ns(),
            state=layout.PEER_JOINING,
        )
        try:
            protocol.send_initial_info(conn, ivshmem_id, self.shm_fd)
        except OSError as exc:
            log.warning("region %s: pid %d gone during handshake: %s", self.name, pid, exc)
            self.peers[ivshmem_id] = peer
            self._drop(peer, "handshake failed")
            return
        self.peers[ivshmem_id] = peer
        broken = self._announce(peer)
        try:
            for other in self.peers.values():
                if other is not peer and other.eventfds:
                    protocol.send_peer_vectors(conn, other.id, other.eventfds)
            protocol.send_peer_vectors(conn, ivshmem_id, eventfds)
        except OSError as exc:
            broken.append((peer, f"handshake failed: {exc}"))
        self.broker.watch(conn, lambda: self._readable(peer))
        self._store_peer(peer)
        log.info("region %s: %s joined", self.name, peer.describe())
        for other, reason in broken:
            self._drop(other, reason)

    def _announce(self, peer: Peer) -> list[tuple[Peer, str]]:
        """Send `peer`'s eventfds to every other connected peer; return those that failed."""
        broken = []
        for other in list(self.peers.values()):
            if other is peer or other.sock is None:
                continue
            try:
                protocol.send_peer_vectors(other.sock, peer.id, peer.eventfds)
            except OSError as exc:
                broken.append((other, f"cannot announce to it: {exc}"))
        return broken

    def _reclaim(self, pending: Pending) -> None:
        """A connection from an orphan's pid spoke: it must be a valid reclaim request. Reads
        what came (never waits: the socket is non-blocking); acts once the request is whole."""
        conn = pending.sock
        try:
            request = pending.reader.feed(conn)
        except (protocol.ProtocolError, OSError) as exc:
            self._end_pending(pending)
            log.warning("region %s: pid %d: bad reclaim request (%s); dropped", self.name,
                        pending.pid, exc)  # fmt: skip
            conn.close()
            return
        if request is None:
            return  # more to come, until the deadline (expire_pending)
        self._end_pending(pending)
        peer = self.peers.get(request.peer)
        reason = None
        if peer is None or peer.sock is not None:
            reason = f"peer {request.peer} is not waiting to be reclaimed"
        elif peer.pid != pending.pid:
            reason = f"peer {request.peer} belongs to pid {peer.pid}"
        elif peer.incarnation != request.incarnation:
            reason = f"peer {request.peer} is incarnation {peer.incarnation}"
        elif not 1 <= len(request.eventfds) <= self.cfg.vectors:
            reason = f"{len(request.eventfds)} eventfds, the region has {self.cfg.vectors}"
        elif self.region is not None and (
            self.region.peer_state(peer.slot) not in ((s, peer.incarnation) for s in LIVE_STATES)
            or self.region.peer(peer.slot).doorbell != peer.id
        ):
            reason = f"slot {peer.slot} of peer {request.peer} is no longer live"
        if reason is not None or peer is None:
            log.warning("region %s: pid %d: reclaim refused: %s", self.name, pending.pid, reason)
            for fd in request.eventfds:
                _close(fd)
            with contextlib.suppress(OSError):  # it may be gone: nobody left to tell
                protocol.send_reclaim_refusal(conn, f"region {self.name}: {reason}")
            conn.close()
            return
        if peer.pidfd is not None:
            self.broker.unwatch(peer.pidfd)
            _close(peer.pidfd)
            peer.pidfd = None
        peer.uid = pending.uid
        peer.sock = conn
        held = len(request.eventfds)
        # A client cut off in its handshake holds the first of its eventfds only (they come
        # last, in vector order): the rest are made again here, and the handshake below and
        # the announcement to everyone connected carry them (a peer replaces a whole run).
        missing = [
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.cfg.vectors - held)
        ]
        peer.eventfds = request.eventfds + missing  # the broker's copies from now on
        if missing:
            log.info(
                "region %s: %s reclaims with %d of its %d eventfds; completed with new ones",
                self.name, peer.describe(), held, self.cfg.vectors,
            )  # fmt: skip
        broken: list[tuple[Peer, str]] = []
        try:
            assert self.shm_fd is not None
            protocol.send_initial_info(conn, peer.id, self.shm_fd)
            for other in self.peers.values():
                if other is not peer and other.eventfds:
                    protocol.send_peer_vectors(conn, other.id, other.eventfds)
            protocol.send_peer_vectors(conn, peer.id, peer.eventfds)
            for gone in self.died_while_down:
                protocol.send_peer_gone(conn, gone)
        except OSError as exc:
            broken.append((peer, f"handshake failed: {exc}"))
        if self.died_while_down:
            _kick(peer.eventfds[0])
        broken += self._announce(peer)
        self.broker.watch(conn, lambda: self._readable(peer))
        self._store_peer(peer)
        log.info("region %s: %s reclaimed its slot", self.name, peer.describe())
        for other, why in broken:
            self._drop(other, why)

    def _end_pending(self, pending: Pending) -> None:
        """Stop waiting for `pending`'s request (its socket stays open)."""
        self.broker.unwatch(pending.sock)
        self.pending.pop(pending.sock.fileno(), None)

    def expire_pending(self, now: float) -> float | None:
        """Turn reclaim waits past their deadline into fresh joins (a connection that said
        nothing) or drops (one that began a request and did not finish it); return the next
        deadline."""
        next_deadline = None
        for pending in list(self.pending.values()):
            if pending.deadline <= now:
                self._end_pending(pending)
                if pending.reader.started:
                    log.warning(
                        "region %s: pid %d: reclaim request unfinished after %.1f s; dropped",
                        self.name, pending.pid, RECLAIM_WAIT_S,
                    )  # fmt: skip
                    pending.reader.close()
                    pending.sock.close()
                else:
                    self._join(pending.sock, pending.pid, pending.uid)
            elif next_deadline is None or pending.deadline < next_deadline:
                next_deadline = pending.deadline
        return next_deadline

    def _readable(self, peer: Peer) -> None:
        """A client socket is readable: end of stream (left/died) or a protocol violation."""
        assert peer.sock is not None
        try:
            data = peer.sock.recv(1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            log.warning(
                "region %s: %s sent data, which clients never do: dropped",
                self.name, peer.describe(),
            )  # fmt: skip
            self._drop(peer, "protocol violation")
        else:
            self._drop(peer, "socket closed")

    def _orphan_exited(self, peer: Peer) -> None:
        self._drop(peer, "process exited")

    def _drop(self, peer: Peer, reason: str) -> None:
        """End `peer`'s membership: DEAD (unless it left), announce, kick everyone's vector 0."""
        if self.peers.get(peer.id) is not peer:
            return
        del self.peers[peer.id]
        self._unstore_peer(peer)
        if peer.sock is not None:
            self.broker.unwatch(peer.sock)
            peer.sock.close()
        if peer.pidfd is not None:
            self.broker.unwatch(peer.pidfd)
            _close(peer.pidfd)
        region = self.region
        assert region is not None
        self._release_id(peer.id)
        info = region.peer(peer.slot)
        if info.doorbell == peer.id and info.state in LIVE_STATES:
            # Ownership: DEAD, written by the broker for the slot carrying the id it handed
            # out, whatever the incarnation: a process in a VM that re-claimed the VM's slot
            # dies with the VM (its QEMU connection is the one that closed).
            region.write_peer(peer.slot, state=layout.PEER_DEAD)
            outcome = "died"
        elif info.doorbell == peer.id and info.state == layout.PEER_LEFT:
            outcome = "left"
        else:
            outcome = f"is gone (slot now {info.state_name}, id {info.doorbell})"
        broken = []
        for other in list(self.peers.values()):
            if other.sock is not None:
                try:
                    protocol.send_peer_gone(other.sock, peer.id)
                except OSError as exc:
                    broken.append((other, f"cannot announce to it: {exc}"))
            if other.eventfds:
                _kick(other.eventfds[0])
        for fd in peer.eventfds:
            _close(fd)
        log.info("region %s: %s %s (%s)", self.name, peer.describe(), outcome, reason)
        for other, why in broken:
            self._drop(other, why)

    # ---------------------------------------------------------------- runtime
    def heartbeat(self) -> None:
        if self.region is not None:
            # Ownership: the superblock's broker line is the broker's.
            self.region.write_broker_info(self.generation, os.getpid())

    def close(self) -> None:
        """Stop serving: close sockets and fds, keep the region (and its peers) unless
        unlink_on_exit. Peers keep talking; host clients reconnect to the next broker.
        An orderly stop empties the fd store of this region: its connections close."""
        if self.broker.fd_store is not None:
            if self.listener is not None:
                self.broker.fd_store.remove(f"l/{self.name}")
            for peer in self.peers.values():
                self._unstore_peer(peer)
        if self.listener is not None:
            self.broker.unwatch(self.listener)
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                if os.lstat(self.socket_path).st_ino == self.socket_ino:
                    os.unlink(self.socket_path)
        for pending in list(self.pending.values()):
            self.broker.unwatch(pending.sock)
            pending.reader.close()
            pending.sock.close()
        self.pending.clear()
        for peer in list(self.peers.values()):
            if peer.sock is not None:
                self.broker.unwatch(peer.sock)
                peer.sock.close()
            if peer.pidfd is not None:
                self.broker.unwatch(peer.pidfd)
                _close(peer.pidfd)
            for fd in peer.eventfds:
                _close(fd)
        self.peers.clear()
        if self.region is not None:
            generation, _, _ = self.region.broker_info()
            if generation == self.generation:
                self.region.write_broker_info(self.generation, 0)  # no broker serves it now
            self.region.close()
            self.region = None
        _close(self.shm_fd)
        self.shm_fd = None
        if self.cfg.unlink_on_exit:
            with contextlib.suppress(FileNotFoundError):
                Region.unlink(self.name)
            for suffix in (".json", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.state_dir, self.name + suffix))
            log.info("region %s: removed", self.name)
        _close(self.lock_fd)
        self.lock_fd = None


class Broker:
    """The daemon. `start()` opens every region (BrokerError on refusal, nothing left
    behind), `run()` serves until `stop()` or SIGTERM/SIGINT, then closes everything."""

    def __init__(self, config: BrokerConfig) -> None:
        if not config.regions:
            raise BrokerError("no region to serve: give --name/--size or a --config file")
        self.config = config
        self.selector = selectors.DefaultSelector()
        self.regions: list[RegionServer] = []
        self._stopping = False
        self._closed = False
        self.heartbeat_s = HEARTBEAT_S
        self.heartbeat_hooks: list[Callable[[], None]] = []  # called at every heartbeat
        self.fd_store: FdStore | None = None  # set before start() to keep fds across crashes
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def watch(self, obj: Any, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `obj` (socket or fd) is readable."""
        self.selector.register(obj, selectors.EVENT_READ, callback)

    def unwatch(self, obj: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(obj)

    def start(self) -> None:
        self.watch(self._wake_r, self._drain_wake)
        try:
            for cfg in self.config.regions:
                server = RegionServer(self, cfg, self.config)
                self.regions.append(server)
                server.open()
        except BaseException:
            self.close()
            raise

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def stop(self) -> None:
        """Ask run() to return; safe from a signal handler or another thread."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the broker cleanly."""

        def handler(signum: int, _frame: object) -> None:
            log.info("received %s: stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def run(self) -> None:
        """Serve until stopped; always closes every region before returning."""
        next_heartbeat = time.monotonic()
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= next_heartbeat:
                    for server in self.regions:
                        server.heartbeat()
                    for hook in self.heartbeat_hooks:
                        hook()
                    next_heartbeat = now + self.heartbeat_s
                deadline = next_heartbeat
                for server in self.regions:
                    pending = server.expire_pending(now)
                    if pending is not None:
                        deadline = min(deadline, pending)
                try:
                    events = self.selector.select(max(0.0, deadline - time.monotonic()))
                except InterruptedError:
                    continue
                for key, _ in events:
                    if self._stopping:
                        break
                    try:
                        key.data()
                    except OSError as exc:
                        if exc.errno in (errno.EBADF,):
                            continue
                        log.exception("error while serving: %s", exc)
        finally:
            self.close()

    def close(self) -> None:
        """Close every region (see RegionServer.close) and the selector; idempotent."""
        if self._closed:
            return
        self._closed = True
        for server in self.regions:
            try:
                server.close()
            except Exception:
                log.exception("region %s: error while closing", server.name)
        self.regions.clear()
        self.unwatch(self._wake_r)
        self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            _close(fd)
        self._wake_r = self._wake_w = -1
