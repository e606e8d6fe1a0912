"""QEMU's ivshmem-server wire protocol, server and client sides, plus one reclaim extension.

Its one home: the broker (host_broker, server side) and the host client
(guest_lib.host_client, client side) both speak it from here.

The protocol (QEMU ``docs/specs/ivshmem-spec.rst``, ``contrib/ivshmem-server``), on a UNIX
stream socket, server -> client only:

* every message is one signed 64-bit little-endian integer, optionally carrying exactly one
  file descriptor as SCM_RIGHTS ancillary data;
* on connect, in order: the protocol version (0); the client's own peer id; ``-1`` carrying
  the shared-memory fd; for every existing peer its id N times, each carrying one of its N
  eventfds (vector 0..N-1); then the client's own id N times, each carrying its own eventfds;
* later: a peer id carrying an fd announces one eventfd of a new peer (N of them, in vector
  order, back to back); a peer id without an fd says that peer left.

Peer ids here are ivshmem ids (QEMU's IVPosition, the target of a doorbell write), not
peer-table slots: the broker hands out ids that only increase and stores each peer's id in
its slot's `doorbell` field (see host_broker/broker.py), as QEMU 7.2 crashes when a departed
peer's id is announced again soon.

Clients never send. The one exception is this project's *reclaim* request (see
`pack_reclaim`): after a broker restart, a client of this project that already holds a peer
id reconnects and, before the broker says anything, sends one 32-byte request carrying its
own eventfds (all it holds: N, or fewer if a broker died in the middle of its first
handshake), so that it keeps its id. The broker only waits for such a request from a
process that, according to the peer table, holds a slot nobody is connected for; QEMU never
sends it and never sees a difference. The broker answers with the usual handshake, or, if it
refuses the request, with `RECLAIM_REFUSED` (-2) followed by its reason in UTF-8 (at most
`REFUSAL_MAX` bytes) and end of stream (`send_reclaim_refusal`); `read_handshake` raises
that as `ReclaimRefusedError`.

Functions here raise `ProtocolError` for a malformed message and `ConnectionClosedError`
(a subclass) at end of stream; sockets may be blocking or have a timeout (socket.timeout
propagates).
"""

from __future__ import annotations

import array
import dataclasses
import os
import socket
import struct

from ivshmem_comm.layout import MAX_PEERS

PROTOCOL_VERSION = 0
SHM_MESSAGE = -1  # the value that carries the shared-memory fd
MESSAGE = struct.Struct("<q")
MESSAGE_SIZE = MESSAGE.size  # 8

# Reclaim request (project extension, client -> broker): magic, ivshmem id, incarnation,
# number of eventfds attached (SCM_RIGHTS, in vector order).
RECLAIM_MAGIC = 0x4D49414C43455256  # b"VRECLAIM" read little-endian
RECLAIM = struct.Struct("<QqQQ")
RECLAIM_SIZE = RECLAIM.size  # 32
FD_SIZE = array.array("i").itemsize
MAX_VECTORS = 64  # the most eventfds per peer the broker hands out or accepts
RECLAIM_REFUSED = -2  # the broker's first message to a reclaim request it refuses
REFUSAL_MAX = 1024  # the most bytes of reason after RECLAIM_REFUSED
# The most messages a handshake holds before the client's first own eventfd: every other
# peer a region can have, each with all its vectors, and as many departures.
HANDSHAKE_MAX = (MAX_PEERS - 1) * (MAX_VECTORS + 1)


class ProtocolError(Exception):
    """The other side broke the protocol; the message says how."""


class ConnectionClosedError(ProtocolError):
    """End of stream: the other side closed its socket."""


class HandshakeCutError(ConnectionClosedError):
    """End of stream in a handshake after the server gave a peer id and the memory, before
    the first own eventfd: `peer` is that id, `shm_fd` the memory (the catcher owns it and
    must close it), so that the client can tell which slot was being handed out."""

    def __init__(self, peer: int, shm_fd: int) -> None:
        super().__init__(f"end of stream in the handshake, after peer id {peer}")
        self.peer = peer
        self.shm_fd = shm_fd


class ReclaimRefusedError(ProtocolError):
    """The broker refused a reclaim request; the message is the broker's reason. Retrying
    the same request gets the same answer."""


# ------------------------------------------------------------------------------ primitives
def send_message(sock: socket.socket, value: int, fd: int | None = None) -> None:
    """Send one message: `value` as int64 LE, with `fd` in SCM_RIGHTS when given.

    Raises OSError from the socket (BlockingIOError on a full non-blocking socket: the
    caller decides whether that client is dropped). Partial sends of 8 bytes cannot happen
    on a UNIX stream socket with room; a short count is reported as ProtocolError.
    """
    data = MESSAGE.pack(value)
    sent = socket.send_fds(sock, [data], [fd]) if fd is not None else sock.send(data)
    if sent != MESSAGE_SIZE:
        raise ProtocolError(f"short send: {sent} of {MESSAGE_SIZE} bytes")


def send_passing(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send all of `data`, with `fds` (if any) in SCM_RIGHTS on its first byte, then close
    these fds here (passed: the receiver holds its own copies; closed on an error too).

    Raises OSError from the socket (BlockingIOError on a full non-blocking socket, part of
    `data` possibly sent)."""
    try:
        sent = socket.send_fds(sock, [data], fds) if fds else 0
        sock.sendall(data[sent:])
    finally:
        _close_fds(fds)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _recv_fds(sock: socket.socket, size: int, maxfds: int) -> tuple[bytes, list[int], int]:
    """recvmsg with room for `maxfds` fds, received close-on-exec (socket.recv_fds of
    Python 3.11 drops its flags argument). Returns (data, fds, msg_flags)."""
    data, ancdata, flags, _ = sock.recvmsg(
        size, socket.CMSG_SPACE(maxfds * FD_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % FD_SIZE])
    if len(fds) > maxfds:  # CMSG_SPACE padding can hold one more than asked for
        flags |= socket.MSG_CTRUNC
    return data, list(fds), flags


def recv_message(sock: socket.socket) -> tuple[int, int | None]:
    """Receive one message; return (value, fd or None). The caller owns the returned fd.

    Received fds are close-on-exec. Raises ConnectionClosedError at end of stream (also in
    the middle of a message), ProtocolError if a message carries more than one fd or the
    fd arrives after the first byte.
    """
    data = b""
    fds: list[int] = []
    while len(data) < MESSAGE_SIZE:
        chunk, got, flags = _recv_fds(sock, MESSAGE_SIZE - len(data), 1)
        if got and (data or fds):
            _close_fds(fds + list(got))
            raise ProtocolError("file descriptor in the middle of a message")
        fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            _close_fds(fds)
            raise ProtocolError("more than one file descriptor with one message")
        if not chunk:
            _close_fds(fds)
            raise ConnectionClosedError("end of stream")
        data += chunk
    (value,) = MESSAGE.unpack(data)
    return value, (fds[0] if fds else None)


# ------------------------------------------------------------------------------ server side
def send_initial_info(sock: socket.socket, peer: int, shm_fd: int) -> None:
    """Send version 0, the peer id, then -1 carrying `shm_fd` (ivshmem-server's first three)."""
    send_message(sock, PROTOCOL_VERSION)
    send_message(sock, peer)
    send_message(sock, SHM_MESSAGE, shm_fd)


def send_peer_vectors(sock: socket.socket, peer: int, eventfds: list[int]) -> None:
    """Announce `peer` with its eventfds, one message per vector, in vector order."""
    for fd in eventfds:
        send_message(sock, peer, fd)


def send_peer_gone(sock: socket.socket, peer: int) -> None:
    """Announce that `peer` left: its id with no fd."""
    send_message(sock, peer)


def pack_reclaim(peer: int, incarnation: int, vectors: int) -> bytes:
    """The reclaim request a client of this project sends (with its eventfds) to keep `peer`."""
    return RECLAIM.pack(RECLAIM_MAGIC, peer, incarnation, vectors)


def send_reclaim_refusal(sock: socket.socket, reason: str) -> None:
    """Answer a refused reclaim request: RECLAIM_REFUSED, then `reason` (UTF-8, cut to
    REFUSAL_MAX bytes). The caller closes the socket after. Raises OSError from the socket."""
    send_message(sock, RECLAIM_REFUSED)
    sock.sendall(reason.encode()[:REFUSAL_MAX])


def _recv_refusal(sock: socket.socket) -> str:
    """The reason after RECLAIM_REFUSED: bytes up to end of stream or REFUSAL_MAX (a stream
    that stops early, e.g. the socket's timeout, gives what came)."""
    reason = b""
    try:
        while len(reason) < REFUSAL_MAX:
            chunk = sock.recv(REFUSAL_MAX - len(reason))
            if not chunk:
                break
            reason += chunk
    except OSError:
        pass
    return reason.decode(errors="replace") or "no reason given"


@dataclasses.dataclass
class ReclaimRequest:
    """A decoded reclaim request; `eventfds` are owned by whoever received them."""

    peer: int
    incarnation: int
    eventfds: list[int]


class ReclaimReader:
    """One reclaim request (32 bytes, fds attached to the first byte), read as its bytes
    come: `feed` does one recvmsg, so a broker serving many sockets from one thread calls
    it at each readable event and never waits for a slow or hostile sender.

    Ownership: fds received before the request is whole are the reader's (closed by
    `close` or by a failing `feed`); those of the returned request are the caller's.
    """

    def __init__(self) -> None:
        self._data = b""
        self._fds: list[int] = []

    @property
    def started(self) -> bool:
        """True once part of a request came (and not all of it)."""
        return bool(self._data)

    def feed(self, sock: socket.socket) -> ReclaimRequest | None:
        """Receive once; return the request when whole, None while more is to come (also
        when a non-blocking `sock` had nothing). Raises ConnectionClosedError at end of stream,
        ProtocolError for fds after the first byte, more than MAX_VECTORS fds, a wrong
        magic, a count that does not match the fds, or fds that are not eventfds; OSError
        from the socket (socket.timeout included). Every raise closes the fds held first."""
        try:
            chunk, got, flags = _recv_fds(sock, RECLAIM_SIZE - len(self._data), MAX_VECTORS)
        except (BlockingIOError, InterruptedError):
            return None
        except BaseException:
            self.close()
            raise
        try:
            had_data = bool(self._data)
            self._fds.extend(got)
            if got and had_data:
                raise ProtocolError("file descriptors in the middle of a reclaim request")
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_VECTORS} file descriptors")
            if not chunk:
                raise ConnectionClosedError("end of stream")
            self._data += chunk
            if len(self._data) < RECLAIM_SIZE:
                return None
            magic, peer, incarnation, count = RECLAIM.unpack(self._data)
            if magic != RECLAIM_MAGIC:
                raise ProtocolError(f"bad reclaim magic {magic:#x}")
            if count != len(self._fds):
                raise ProtocolError(f"reclaim says {count} eventfds, {len(self._fds)} attached")
            for fd in self._fds:
                if not is_eventfd(fd):
                    raise ProtocolError(f"reclaim fd {fd} is not an eventfd")
        except BaseException:
            self.close()
            raise
        fds, self._fds, self._data = self._fds, [], b""
        return ReclaimRequest(peer, incarnation, fds)

    def close(self) -> None:
        """Close the fds of the unfinished request, if any; the reader starts over."""
        fds, self._fds, self._data = self._fds, [], b""
        _close_fds(fds)


def recv_reclaim(sock: socket.socket) -> ReclaimRequest:
    """Read one reclaim request from a blocking socket (or one with a timeout): ReclaimReader's
    feed until it is whole, with the same errors."""
    reader = ReclaimReader()
    while True:
        request = reader.feed(sock)
        if request is not None:
            return request


def is_eventfd(fd: int) -> bool:
    """True iff `fd` (in this process) is an eventfd."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


# ------------------------------------------------------------------------------ client side
@dataclasses.dataclass
class Handshake:
    """The first three messages a client receives. The caller owns `shm_fd`."""

    version: int
    peer: int
    shm_fd: int


@dataclasses.dataclass
class Announcement:
    """One decoded message after the handshake's first three.

    kind: "vector" (one eventfd of another peer), "own" (one of the client's own eventfds)
    or "gone" (`peer` left; `fd` is None). `new_run` is True when this fd starts a new run
    of consecutive fd messages for `peer`: the receiver then replaces (not extends) what it
    holds for that peer, since the broker always sends all N vectors of a peer back to back.
    The receiver owns `fd`.
    """

    kind: str
    peer: int
    fd: int | None
    new_run: bool


class ClientDecoder:
    """Per-connection decoder of announcements; tracks runs of fd messages (see Announcement).

    The protocol never states N (vectors per peer): a client learns its own eventfds as the
    run of messages carrying its own id, and every other peer's as a run of its id. What a
    server may send is bounded all the same, so that a hostile or broken one cannot make
    the client hold fds without end: a run holds at most MAX_VECTORS fds (the most a
    broker hands out), and at most MAX_PEERS - 1 other peers (the most a region has) hold
    fds at once (from their first fd to their departure).
    """

    def __init__(self, own_peer: int) -> None:
        self.own_peer = own_peer
        self._run: int | None = None  # peer id of the current run of fd messages
        self._run_length = 0  # fds in the current run
        self._holding: set[int] = set()  # other peers announced with fds, not gone since

    def feed(self, value: int, fd: int | None) -> Announcement:
        """Decode one message. Raises ProtocolError (closing `fd`) for an id out of range,
        the announcement of our own departure, a run of more than MAX_VECTORS fds, or a
        MAX_PEERS-th other peer holding fds."""
        if not 0 <= value <= 0xFFFF:
            if fd is not None:
                _close_fds([fd])
            raise ProtocolError(f"peer id {value} out of range")
        if fd is None:
            self._run = None
            if value == self.own_peer:
                raise ProtocolError("broker announced our own departure")
            self._holding.discard(value)
            return Announcement("gone", value, None, False)
        new_run = self._run != value
        self._run_length = 1 if new_run else self._run_length + 1
        if self._run_length > MAX_VECTORS:
            _close_fds([fd])
            raise ProtocolError(
                f"peer {value}: more than {MAX_VECTORS} eventfds in a row (the most a peer has)"
            )
        if value != self.own_peer and value not in self._holding:
            if len(self._holding) >= MAX_PEERS - 1:
                _close_fds([fd])
                raise ProtocolError(
                    f"peer {value}: eventfds of more than {MAX_PEERS - 1} other peers at once "
                    f"(a region has at most {MAX_PEERS} peers)"
                )
            self._holding.add(value)
        self._run = value
        kind = "own" if value == self.own_peer else "vector"
        return Announcement(kind, value, fd, new_run)


def read_handshake(
    sock: socket.socket,
) -> tuple[Handshake, ClientDecoder, list[Announcement]]:
    """Read version, id, shm fd, then announcements up to and including the first own eventfd.

    Returns the handshake, the decoder to keep feeding with later messages, and the
    announcements read so far (the caller owns their fds; more own vectors may follow, as
    the protocol never says how many). Raises ProtocolError (closing all it received) if
    the version is not 0, the id is out of range, the third message is not -1 with an fd,
    the decoder refuses a message (see ClientDecoder), more than HANDSHAKE_MAX messages
    come before the first own eventfd, or the stream ends first (HandshakeCutError,
    carrying the id and the memory, when it ends after both); ReclaimRefusedError (a
    ProtocolError) with the broker's reason if the first message is RECLAIM_REFUSED (the
    answer to a refused reclaim request).
    """
    received: list[int] = []
    announcements: list[Announcement] = []
    try:
        version, fd = recv_message(sock)
        if fd is not None:
            received.append(fd)
            raise ProtocolError("fd attached to the version message")
        if version == RECLAIM_REFUSED:
            raise ReclaimRefusedError(_recv_refusal(sock))
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"server speaks version {version}, expected {PROTOCOL_VERSION}")
        peer, fd = recv_message(sock)
        if fd is not None:
            received.append(fd)
            raise ProtocolError("fd attached to the peer-id message")
        if not 0 <= peer <= 0xFFFF:
            raise ProtocolError(f"server assigned invalid peer id {peer}")
        value, shm_fd = recv_message(sock)
        if shm_fd is not None:
            received.append(shm_fd)
        if value != SHM_MESSAGE or shm_fd is None:
            raise ProtocolError(f"expected -1 with the shm fd, got {value} (fd {shm_fd})")
        decoder = ClientDecoder(peer)
        try:
            while True:
                value, fd = recv_message(sock)
                item = decoder.feed(value, fd)  # (on a ProtocolError it closed fd itself)
                if fd is not None:
                    received.append(fd)
                announcements.append(item)
                if item.kind == "own":
                    break
                if len(announcements) >= HANDSHAKE_MAX:
                    raise ProtocolError(
                        f"{len(announcements)} messages in the handshake and still no eventfd "
                        f"of our own (peer id {peer}); a region has at most {MAX_PEERS} peers"
                    )
        except ConnectionClosedError:
            received.remove(shm_fd)  # the catcher's now
            raise HandshakeCutError(peer, shm_fd) from None
        return Handshake(version, peer, shm_fd), decoder, announcements
    except BaseException:
        _close_fds(received)
        raise
