"""A real UNIX-socket proxy between broker clients and a broker, that can cut a connection
after an exact protocol message (no tests here).

The broker tests use it to put a client's connection in a state no timing could hit on
purpose: the broker gone after it sent some, not all, of a handshake. Nothing is simulated:
the client speaks to a real socket, the broker serves a real one, and every message and file
descriptor goes across as the broker sent it.

The proxy connects upstream from this process for each connection it accepts, so the broker's
SO_PEERCRED pid is this process's: a client in this process looks to the broker like itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable

from ivshmem_comm import protocol

# cut(connection number (0 = the first accepted), messages forwarded on it so far as
# (value, carried an fd)): True closes that connection on both sides now.
CutRule = Callable[[int, list[tuple[int, bool]]], bool]


class ProtocolProxy:
    """Listens on `path`; forwards each accepted connection to the broker socket `upstream`.

    Broker -> client: one protocol message (8 bytes, at most one fd) at a time, so fds stay on
    the message they came with; after each one `cut` is asked whether to stop there (it may
    act first, e.g. kill the broker). Client -> broker: bytes and their fds as they come (the
    reclaim request is one sendmsg with its fds on its first byte). When either side ends,
    both are closed. A connection whose upstream cannot be reached is closed at once.
    """

    def __init__(self, path: str, upstream: str, cut: CutRule | None = None) -> None:
        self.path = path
        self.upstream = upstream
        self.cut = cut
        self.accepted = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._spawn(self._accept_loop)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                number = self.accepted
                self.accepted += 1
                self._socks.append(client)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self.upstream)
            except OSError:
                server.close()
                client.close()
                continue
            with self._lock:
                self._socks.append(server)
            self._spawn(self._down, number, server, client)
            self._spawn(self._up, client, server)

    def _down(self, number: int, server: socket.socket, client: socket.socket) -> None:
        """Broker -> client, message by message, asking `cut` after each."""
        seen: list[tuple[int, bool]] = []
        try:
            while True:
                value, fd = protocol.recv_message(server)
                try:
                    protocol.send_message(client, value, fd)
                finally:
                    if fd is not None:
                        os.close(fd)
                seen.append((value, fd is not None))
                if self.cut is not None and self.cut(number, seen):
                    return
        except (OSError, protocol.ProtocolError):
            return
        finally:
            _end(server, client)

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        """Client -> broker: each chunk with the fds that came on it."""
        try:
            while True:
                data, fds, _ = protocol._recv_fds(client, 4096, protocol.MAX_VECTORS)
                if not data:
                    protocol._close_fds(fds)
                    return
                protocol.send_passing(server, data, fds)
        except OSError:
            return
        finally:
            _end(server, client)

    def close(self) -> None:
        """Stop listening, close every connection, join the threads, remove the socket."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        _end(*socks)
        for thread in self._threads:
            thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> ProtocolProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end(*socks: socket.socket) -> None:
    """Shut both directions down (wakes the other thread blocked on the socket), then close."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
