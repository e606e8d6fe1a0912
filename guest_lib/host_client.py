"""Host-process client of the broker: join a region through its socket, get an Endpoint.

    from guest_lib.host_client import attach, BrokerClient
    ep = attach("/run/ivshmem-broker/job1.sock")          # an Endpoint; ep.broker_client
    with BrokerClient("/run/.../job1.sock") as client:     # or keep the client explicitly
        ep = client.endpoint()

The client speaks QEMU's ivshmem-server protocol (ivshmem_comm.protocol) like QEMU does: it
receives its peer id, the region's shm fd (mapped here) and the eventfds of every peer, then
a background thread keeps applying join/leave announcements to the endpoint's
EventfdNotifier (`set_peer` / `drop_peer`).

Ids and slots: the protocol speaks ivshmem ids (QEMU's IVPosition), which are not peer-table
slots (host_broker/broker.py hands out ids that only increase). The broker writes a peer's
id into its slot's `doorbell` field before it announces the id, so the client maps an
announced id to the slot whose `doorbell` holds it (its own slot: the JOINING one with its
id). The Endpoint, the notifier and this client's public methods speak slots; `peer_id` is
the slot, `ivshmem_id` the id on the wire.

Broker restarts: when the socket closes while the client is open, the thread reconnects
(backoff 10 ms doubling to 0.25 s, forever, until close()) and sends a reclaim request with
its peer id, incarnation and own eventfds, so it keeps its id and its doorbells (see
host_broker/broker.py); cut off in its first handshake, it sends the eventfds it got and
takes the rest from the reclaim's handshake. The data path never waits for this: the
endpoint keeps working on the shared memory and the eventfds it already holds. If its slot
is no longer its own (the restarted broker found it dead, or another incarnation holds it),
or the broker refuses the reclaim (it says why), the client stops trying and sets `failure`.

A handshake cut before the client's first eventfd (the broker stopped or crashed) fails the
construction with ConnectionClosedError saying so; the slot being handed out is marked LEFT
first, so that no broker keeps it for this process. A server that breaks the protocol (see
protocol.ClientDecoder and read_handshake for the bounds on what it may send: eventfds per
peer, peers, handshake length) fails the construction with ProtocolError naming its socket;
later, it costs the connection (a warning naming the socket; the client reconnects as after
a broker restart).

Closing: `close()` (or closing the endpoint) marks the slot LEFT (the Endpoint does it, or the
client itself when no endpoint was made), then closes the socket; the broker announces it.

Ownership of fds: until `endpoint()` is called the client owns every fd it received; from
then on the EventfdNotifier does (it closes replaced ones in set_peer/drop_peer, and all of
them in close()). The client never writes to the region; the Endpoint writes its own slot.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import threading
from typing import Any

from guest_lib.service_threads import service
from ivshmem_comm import layout, protocol
from ivshmem_comm.endpoint import Endpoint
from ivshmem_comm.errors import RegionFormatError
from ivshmem_comm.notify import EventfdNotifier
from ivshmem_comm.region import Region

log = logging.getLogger("guest_lib.host_client")

RECONNECT_MIN_S = 0.01
RECONNECT_MAX_S = 0.25


class _ClientNotifier(EventfdNotifier):
    """EventfdNotifier whose close() (called by Endpoint.close) also ends the membership."""

    def __init__(self, client: BrokerClient, own: list[int], peers: dict[int, list[int]]):
        super().__init__(own, peers)
        self._client: BrokerClient | None = client

    def close(self) -> None:
        super().close()
        client, self._client = self._client, None
        if client is not None:
            client._notifier_closed()


class BrokerClient:
    """One membership of a region served by a broker. Thread-safe for its public methods.

    Attributes: `peer_id` (the peer-table slot), `ivshmem_id` (the id on the wire),
    `incarnation`, `region` (a Region over the received shm fd),
    `socket_path`, `connected` (threading.Event, set while a broker connection is up),
    `reconnects` (how many times it reclaimed its slot), `failure` (None, or why the client
    stopped reconnecting: ReclaimRefusedError carrying the broker's reason, ProtocolError
    when its slot is no longer its own or the broker answered with another slot or region;
    the endpoint goes on with the peers it knows).

    Construction raises OSError if the socket cannot be reached, socket.timeout (an OSError)
    if the broker does not complete the handshake in `timeout` seconds, ProtocolError if it
    speaks something else or sends memory that cannot be mapped, RegionFormatError if the
    memory holds no region.
    """

    def __init__(self, socket_path: str, *, timeout: float = 5.0, reconnect: bool = True) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._reconnect_enabled = reconnect
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._closed = False
        self.connected = threading.Event()
        self.reconnects = 0
        self.failure: Exception | None = None  # why the client gave up reconnecting, if it did
        self._own: list[int] = []  # own eventfds, vector order (owned: see module doc)
        self._peers: dict[int, list[int]] = {}  # other peers' eventfds by ivshmem id
        self._slot_of: dict[int, int] = {}  # ivshmem id -> slot, for peers in _peers
        self._id_at: dict[int, int] = {}  # slot -> ivshmem id (the inverse of _slot_of)
        self._notifier: _ClientNotifier | None = None
        self._endpoint: Endpoint | None = None
        self._own_run = 0  # the vector of the last own eventfd received (its place in the run)

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            _connect(sock, socket_path)
            handshake, decoder, announcements = protocol.read_handshake(sock)
        except protocol.HandshakeCutError as cut:
            sock.close()
            slot = _leave_cut_slot(cut.shm_fd, cut.peer)
            raise protocol.ConnectionClosedError(
                f"the broker at {socket_path} hung up in the middle of our handshake, after "
                f"giving us ivshmem id {cut.peer} (did it stop or crash? its log says); "
                + (
                    "nothing was written to the region"
                    if slot is None
                    else f"our slot {slot} is marked LEFT, free for the next join"
                )
            ) from None
        except protocol.ConnectionClosedError:
            sock.close()
            raise protocol.ConnectionClosedError(
                f"the broker at {socket_path} hung up before giving us a peer slot: "
                + _refusal(socket_path)
            ) from None
        except protocol.ProtocolError as exc:  # (all it sent is closed: read_handshake)
            sock.close()
            raise protocol.ProtocolError(
                f"the server at {socket_path} broke the broker protocol in our handshake: {exc}"
            ) from None
        except BaseException:
            sock.close()
            raise
        try:
            st = os.fstat(handshake.shm_fd)
            self._shm_id = (st.st_dev, st.st_ino)
            try:
                mapping = mmap.mmap(handshake.shm_fd, st.st_size)
            except (OSError, ValueError) as exc:  # a pipe, an empty file, ...: no region
                raise protocol.ProtocolError(
                    f"the memory the broker at {socket_path} sent cannot be mapped "
                    f"(mode {st.st_mode:o}, {st.st_size} bytes): {exc}"
                ) from None
        except BaseException:
            sock.close()
            self._close_fds([handshake.shm_fd] + [a.fd for a in announcements if a.fd])
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(handshake.shm_fd)
        try:
            self.region = Region(mapping, owner=mapping)
        except BaseException:
            sock.close()
            self._close_fds([a.fd for a in announcements if a.fd is not None])
            # The failed Region's views of the mapping live on in the traceback: then the
            # mapping is unmapped when they go, and the error that matters is the one raised.
            with contextlib.suppress(BufferError):
                mapping.close()
            raise
        self.ivshmem_id = handshake.peer
        slot = self._slot_for(self.ivshmem_id, own=True)
        if slot is None:
            sock.close()
            self.region.close()
            self._close_fds([a.fd for a in announcements if a.fd is not None])
            raise protocol.ProtocolError(
                f"no JOINING peer slot carries our ivshmem id {self.ivshmem_id}"
            )
        self.peer_id = slot
        _, self.incarnation = self.region.peer_state(self.peer_id)
        for item in announcements:
            self._apply(item)
        sock.settimeout(None)
        self._sock = sock
        self._decoder = decoder
        self.connected.set()
        self._thread = threading.Thread(
            target=service(self._run), name=f"broker-client-{self.peer_id}", daemon=True
        )
        self._thread.start()

    # ---------------------------------------------------------------- public
    def endpoint(self, **options: Any) -> Endpoint:
        """Return this membership's Endpoint (once; RuntimeError the second time).

        `options` go to Endpoint (e.g. spin_us). Closing the endpoint closes the client.
        Raises PeerSlotBusyError if the slot is no longer JOINING (the broker gave it up).
        """
        with self._lock:
            if self._endpoint is not None or self._notifier is not None:
                raise RuntimeError("this client already made its endpoint")
            if self._closed:
                raise RuntimeError("client is closed")
            by_slot = {s: self._peers[i] for i, s in self._slot_of.items()}
            self._notifier = _ClientNotifier(self, self._own, by_slot)
        endpoint = self.region.endpoint(
            self.peer_id, notifier=self._notifier, broker_assigned=True, **options
        )
        self._endpoint = endpoint
        return endpoint

    def own_eventfds(self) -> list[int]:
        """This peer's eventfds (a copy of the list; the fds stay owned by the client)."""
        with self._lock:
            return list(self._own)

    def peer_eventfds(self) -> dict[int, list[int]]:
        """Other peers' eventfds known now, by slot (copies of the lists; fds stay owned)."""
        with self._lock:
            return {s: list(self._peers[i]) for i, s in self._slot_of.items()}

    def peer_ids(self) -> dict[int, int]:
        """{slot: ivshmem id} of the other peers known now."""
        with self._lock:
            return dict(self._id_at)

    def kick(self, peer: int, vector: int = 0) -> bool:
        """Write 1 to the eventfd `vector` of the peer in slot `peer`. False iff that
        peer/vector is unknown."""
        with self._lock:
            ivshmem_id = self._id_at.get(peer)
            fds = self._peers.get(ivshmem_id, []) if ivshmem_id is not None else []
            if vector >= len(fds):
                return False
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fds[vector], 1)
            return True

    def close(self) -> None:
        """Leave: close the endpoint (LEFT), then the socket, then the mapping. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        endpoint = self._endpoint
        if endpoint is not None:
            endpoint.close()  # writes LEFT, closes the notifier and with it every eventfd
        elif self._still_member():
            # Ownership: the slot is this peer's own while it holds it; with no Endpoint
            # to do it, the client records the clean leave itself (before the socket goes).
            self.region.write_peer(self.peer_id, state=layout.PEER_LEFT)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2.0)
        with self._lock:
            if self._notifier is None:
                self._close_fds(self._own)
                for fds in self._peers.values():
                    self._close_fds(fds)
            self._own = []
            self._peers = {}
            self._slot_of = {}
            self._id_at = {}
        self.connected.clear()
        if endpoint is None:
            self.region.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals
    def _notifier_closed(self) -> None:
        """The endpoint closed its notifier: the membership is over."""
        if not self._closed:
            self.close()

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _slot_for(self, ivshmem_id: int, own: bool = False) -> int | None:
        """The slot whose `doorbell` holds `ivshmem_id` (the broker wrote it before it sent
        the id), live (JOINING for our own id), or None. Several (an id seen again after a
        wrap of the 16-bit space): the live one joined last."""
        states = (layout.PEER_JOINING,) if own else (layout.PEER_JOINING, layout.PEER_READY)
        found = [i for i in self.region.peers() if i.doorbell == ivshmem_id and i.state in states]
        return max(found, key=lambda i: i.joined_ns).peer if found else None

    def _forget(self, ivshmem_id: int) -> None:
        """Drop peer `ivshmem_id`'s fds and slot mapping (lock held)."""
        notifier = self._notifier
        old = self._peers.pop(ivshmem_id, None)
        slot = self._slot_of.pop(ivshmem_id, None)
        if slot is not None and self._id_at.get(slot) == ivshmem_id:
            del self._id_at[slot]
            if notifier is not None:
                notifier.drop_peer(slot)  # retires (later closes) `old`
                old = None
        if old:
            self._close_fds(old)

    def _apply(self, item: protocol.Announcement) -> None:
        """Apply one announcement to the fd tables (and the notifier, once there is one)."""
        with self._lock:
            notifier = self._notifier
            if item.kind == "own":
                assert item.fd is not None
                self._own_run = 0 if item.new_run else self._own_run + 1
                if self._own_run == len(self._own) and not self._closed:
                    self._own.append(item.fd)  # the notifier, if made, holds this same list
                else:  # after a reclaim: a duplicate of a vector we already hold
                    self._close_fds([item.fd])
            elif item.kind == "vector":
                assert item.fd is not None
                if item.new_run or item.peer not in self._peers:
                    self._forget(item.peer)
                    fds = [item.fd]
                    self._peers[item.peer] = fds
                    slot = self._slot_for(item.peer)
                    if slot == self.peer_id:
                        slot = None  # a stale id in our own slot: nothing to kick there
                    if slot is not None:
                        previous = self._id_at.get(slot)
                        if previous is not None:  # its departure was missed: it is gone
                            self._forget(previous)
                        self._slot_of[item.peer] = slot
                        self._id_at[slot] = item.peer
                        if notifier is not None:
                            notifier.set_peer(slot, fds)
                    else:
                        # The slot already moved on (the peer left before we read this):
                        # keep the fds until its departure is announced.
                        log.debug("peer %d: no live slot carries its id", item.peer)
                else:
                    self._peers[item.peer].append(item.fd)  # same list the notifier holds
                log.debug(
                    "peer %d (slot %s): %d eventfds",
                    item.peer, self._slot_of.get(item.peer), len(self._peers[item.peer]),
                )  # fmt: skip
            else:
                slot = self._slot_of.get(item.peer)
                self._forget(item.peer)
                log.debug("peer %d (slot %s) left", item.peer, slot)

    def _still_member(self) -> bool:
        state, incarnation = self.region.peer_state(self.peer_id)
        return incarnation == self.incarnation and state in (
            layout.PEER_JOINING,
            layout.PEER_READY,
        )

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                value, fd = protocol.recv_message(self._sock)
                item = self._decoder.feed(value, fd)
            except (protocol.ProtocolError, OSError) as exc:
                if self._closing.is_set():
                    return
                self.connected.clear()
                if isinstance(exc, protocol.ProtocolError) and not isinstance(
                    exc, protocol.ConnectionClosedError
                ):  # (the decoder closed what it refused; the connection is dropped)
                    log.warning("peer %d: the server at %s broke the broker protocol (%s)",
                                self.peer_id, self.socket_path, exc)  # fmt: skip
                else:
                    log.info("peer %d: broker connection lost (%s)", self.peer_id, exc)
                if not self._reconnect_enabled or not self._reconnect():
                    return
                continue
            self._apply(item)

    def _reconnect(self) -> bool:
        """Reclaim our slot from a (restarted) broker. False: gave up or closing."""
        delay = RECONNECT_MIN_S
        while not self._closing.is_set():
            if not self._still_member():
                info = self.region.peer(self.peer_id)
                self.failure = protocol.ProtocolError(
                    f"peer {self.peer_id}: slot no longer ours (now {info.state_name}, "
                    f"incarnation {info.incarnation}; ours was {self.incarnation})"
                )
                log.warning("%s; not reconnecting", self.failure)
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
                with self._lock:
                    own = list(self._own)
                request = protocol.pack_reclaim(self.ivshmem_id, self.incarnation, len(own))
                socket.send_fds(sock, [request], own)
                handshake, decoder, announcements = protocol.read_handshake(sock)
            except protocol.ReclaimRefusedError as exc:
                sock.close()
                self.failure = exc
                log.error("peer %d: the broker refused our reclaim (%s); not reconnecting",
                          self.peer_id, exc)  # fmt: skip
                return False
            except (OSError, protocol.ProtocolError) as exc:
                sock.close()
                if isinstance(exc, protocol.HandshakeCutError):  # the broker went again
                    os.close(exc.shm_fd)
                log.debug("peer %d: reconnect failed: %s", self.peer_id, exc)
                self._closing.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            st = os.fstat(handshake.shm_fd)
            os.close(handshake.shm_fd)
            if handshake.peer != self.ivshmem_id or (st.st_dev, st.st_ino) != self._shm_id:
                self.failure = protocol.ProtocolError(
                    f"peer {self.peer_id}: the broker answered the reclaim with another slot "
                    "or region"
                )
                log.error("%s", self.failure)
                sock.close()
                self._close_fds([a.fd for a in announcements if a.fd is not None])
                return False
            sock.settimeout(None)
            old, self._sock = self._sock, sock
            old.close()
            self._decoder = decoder
            for item in announcements:
                self._apply(item)
            self.reconnects += 1
            self.connected.set()
            log.info("peer %d: reclaimed slot from the broker", self.peer_id)
            if self._closing.is_set():  # close() raced with us: make sure the socket goes
                sock.close()
            return True
        return False


def _connect(sock: socket.socket, path: str) -> None:
    """sock.connect(path); its OSError names the path (or AF_UNIX's limit on its length)."""
    try:
        sock.connect(path)
    except OSError as exc:
        if exc.errno is None:  # the path does not fit a sockaddr_un
            raise OSError(
                f"broker socket path {path!r} is {len(os.fsencode(path))} bytes; "
                "AF_UNIX takes at most 107"
            ) from None
        raise type(exc)(exc.errno, f"{exc.strerror} (is a broker serving it?)", path) from None


def _leave_cut_slot(shm_fd: int, ivshmem_id: int) -> int | None:
    """After a handshake cut before our first eventfd: mark LEFT the slot the broker was
    handing us (JOINING, our pid, `ivshmem_id` in its doorbell), so that neither this broker
    nor a restarted one keeps it for a process that will never use it. Returns the slot, or
    None (no such slot, or the memory is no region). Closes `shm_fd`.

    Ownership: as in close() without an endpoint, the slot is this process's own once the
    broker handed it out; the client records the leave itself."""
    try:
        mapping = mmap.mmap(shm_fd, os.fstat(shm_fd).st_size)
        with Region(mapping, owner=mapping) as region:
            for info in region.peers():
                if (info.state, info.doorbell, info.pid) == (
                    layout.PEER_JOINING, ivshmem_id, os.getpid()
                ):  # fmt: skip
                    region.write_peer(info.peer, state=layout.PEER_LEFT)
                    return info.peer
    except (OSError, ValueError, RegionFormatError):
        pass
    finally:
        os.close(shm_fd)
    return None


def _refusal(socket_path: str) -> str:
    """Why a broker may have hung up on a new client, as far as this host can tell."""
    name = os.path.basename(socket_path).removesuffix(".sock")  # the default socket name
    live = (layout.PEER_JOINING, layout.PEER_READY)
    with contextlib.suppress(OSError, ValueError, RegionFormatError), Region.open(name) as region:
        if all(p.state in live for p in region.peers()):
            return (
                f"its peer table is full (all {region.max_peers} slots of region {name!r} are held)"
            )
    return "its peer table may be full, or this user may not join (its log says which)"


def connect(socket_path: str, *, timeout: float = 5.0, reconnect: bool = True) -> BrokerClient:
    """Join the region served at `socket_path`; see BrokerClient for errors."""
    return BrokerClient(socket_path, timeout=timeout, reconnect=reconnect)


def attach(socket_path: str, *, timeout: float = 5.0, **options: Any) -> Endpoint:
    """Join the region served at `socket_path` and return its Endpoint.

    The client is `endpoint.broker_client`; closing the endpoint ends the membership.
    """
    client = BrokerClient(socket_path, timeout=timeout)
    try:
        endpoint = client.endpoint(**options)
    except BaseException:
        client.close()
        raise
    endpoint.broker_client = client  # type: ignore[attr-defined]
    return endpoint
