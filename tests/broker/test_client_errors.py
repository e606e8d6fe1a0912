"""What a host client is told when it gets the broker wrong: a socket path that is not there
or cannot be one, and a broker whose peer table is full (it hangs up, as QEMU's protocol has
no way to say why; the client looks at the region to tell), and a server that is no broker
handing out memory that cannot be a region."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess

pytest.importorskip("ivshmem_comm.endpoint")

from guest_lib.host_client import BrokerClient, attach
from ivshmem_comm import layout, protocol

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path, size="2M", max_peers=2, vectors=1).start()
    yield b
    b.cleanup()


def test_a_socket_that_is_not_there_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(FileNotFoundError, match="is a broker serving it") as err:
        attach(path)
    assert err.value.filename == path


def test_a_socket_path_too_long_says_the_limit(tmp_path: Path) -> None:
    path = str(tmp_path / ("x" * 120 + ".sock"))
    with pytest.raises(OSError, match="AF_UNIX takes at most 107") as err:
        attach(path)
    assert path in str(err.value)


def test_a_full_peer_table_is_named_with_its_size(broker: BrokerProcess) -> None:
    first, second = attach(broker.socket), attach(broker.socket)
    try:
        with pytest.raises(protocol.ConnectionClosedError) as err:
            attach(broker.socket)
        assert f"peer table is full (all 2 slots of region {broker.name!r}" in str(err.value)
        assert broker.socket in str(err.value)
    finally:
        first.close()
        second.close()


def serve_one_connection(path: str, answer: Callable[[socket.socket], None]) -> threading.Thread:
    """A server on `path` that is no broker: a thread that accepts one connection and runs
    `answer` on it (which closes nothing: the connection is closed after it)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                answer(conn)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def serve_one_handshake(path: str, shm_fd: int) -> threading.Thread:
    """A server on `path` that is no broker: it answers one connection with a handshake
    (`shm_fd` as the memory, one own eventfd) and hangs up when the client does."""

    def answer(conn: socket.socket) -> None:
        doorbell = os.eventfd(0)
        try:
            protocol.send_initial_info(conn, 1, shm_fd)
            protocol.send_peer_vectors(conn, 1, [doorbell])
            conn.recv(1)
        finally:
            os.close(doorbell)

    return serve_one_connection(path, answer)


@pytest.mark.parametrize("memory", ["pipe", "empty memfd"])
def test_memory_that_cannot_be_mapped_is_named_with_the_socket(tmp_path: Path, memory: str) -> None:
    """A server that hands out a pipe, or an empty shared-memory object, as the region."""
    if memory == "pipe":
        shm, other = os.pipe()
    else:
        shm, other = os.memfd_create("empty"), None
    path = str(tmp_path / "not-a-broker.sock")
    thread = serve_one_handshake(path, shm)
    try:
        with pytest.raises(protocol.ProtocolError, match="cannot be mapped") as err:
            BrokerClient(path)
        assert path in str(err.value)
    finally:
        thread.join(timeout=10)
        for fd in (shm, other):
            if fd is not None:
                os.close(fd)


def serve_messages(path: str, messages: list[tuple[int, bool]]) -> threading.Thread:
    """A server on `path` that is no broker: to one connection it sends the handshake's first
    three messages (peer id 1, a memfd as the memory), then `messages` ((value, with a fresh
    eventfd)), then waits until the client hangs up (or stops reading: a full socket)."""

    def answer(conn: socket.socket) -> None:
        memory = os.memfd_create("not-a-region")
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            protocol.send_initial_info(conn, 1, memory)
            for value, with_fd in messages:
                fd = os.eventfd(0) if with_fd else None
                try:
                    protocol.send_message(conn, value, fd)
                finally:
                    if fd is not None:
                        os.close(fd)
            conn.recv(1)
        os.close(memory)

    return serve_one_connection(path, answer)


def _server_sent_fds() -> set[tuple[int, str]]:
    """This process's open eventfds and not-a-region memfds: (fd, what it is). (Only these:
    a count of all fds moved with the previous tests' leftovers being collected.)"""
    held = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            what = os.readlink(f"/proc/self/fd/{name}")
            if what == "anon_inode:[eventfd]" or "not-a-region" in what:
                held.add((int(name), what))
    return held


@pytest.mark.parametrize(
    ("case", "messages", "says"),
    [
        # one peer's run of eventfds longer than any broker hands out (MAX_VECTORS)
        ("vectors", [(2, True)] * (protocol.MAX_VECTORS + 1) + [(1, True)],
         f"peer 2: more than {protocol.MAX_VECTORS} eventfds in a row"),
        # eventfds of more other peers than a region can hold (layout.MAX_PEERS)
        ("peers", [(2 + p, True) for p in range(layout.MAX_PEERS)] + [(1, True)],
         f"eventfds of more than {layout.MAX_PEERS - 1} other peers"),
        # departures without end, never our own eventfd
        ("endless", [(2, False)] * protocol.HANDSHAKE_MAX + [(1, True)],
         "messages in the handshake and still no eventfd of our own"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)  # fmt: skip
def test_counts_a_server_sends_are_bounded_and_it_is_named(
    tmp_path: Path, case: str, messages: list[tuple[int, bool]], says: str
) -> None:
    """A server (hostile or broken) cannot make the client hold eventfds, or read a handshake,
    without end: what it sends past the protocol's bounds fails the construction with a
    ProtocolError naming the server's socket and the bound, and every fd received is closed
    (the client used to take all of it: a peer with 65 eventfds, a 256th other peer, or a
    handshake of departures as long as the server went on)."""
    path = str(tmp_path / "hostile.sock")
    before = _server_sent_fds()
    thread = serve_messages(path, messages)
    try:
        with pytest.raises(protocol.ProtocolError) as err:
            BrokerClient(path, timeout=10)
        assert says in str(err.value), case
        assert f"the server at {path} broke the broker protocol" in str(err.value)
    finally:
        thread.join(timeout=20)
    assert not thread.is_alive()
    assert _server_sent_fds() <= before  # (nothing received is kept)


def test_the_decoder_bounds_runs_after_the_handshake_too() -> None:
    """The client's connection thread feeds the same decoder after the handshake: our own run
    of eventfds and another peer's are bounded alike (the refused fd closed; the thread then
    drops the connection, see guest_lib.host_client), and a departure frees its peer's
    place among the MAX_PEERS - 1."""
    decoder = protocol.ClientDecoder(1)
    for peer in (1, 2):
        fds = [os.eventfd(0) for _ in range(protocol.MAX_VECTORS + 1)]
        try:
            for fd in fds[:-1]:
                decoder.feed(peer, fd)
            with pytest.raises(protocol.ProtocolError, match=f"peer {peer}: more than"):
                decoder.feed(peer, fds[-1])
            with pytest.raises(OSError):  # (the refused one is closed)
                os.fstat(fds[-1])
        finally:
            for fd in fds[:-1]:
                os.close(fd)
    decoder = protocol.ClientDecoder(1)
    fd = os.eventfd(0)
    try:
        for peer in range(2, layout.MAX_PEERS + 1):
            decoder.feed(peer, fd)
        decoder.feed(2, None)  # peer 2 left: room for one more
        decoder.feed(layout.MAX_PEERS + 1, fd)
        with pytest.raises(protocol.ProtocolError, match="more than 255 other peers"):
            decoder.feed(layout.MAX_PEERS + 2, os.dup(fd))
    finally:
        os.close(fd)
