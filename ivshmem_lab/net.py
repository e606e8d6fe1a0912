"""The VM lab's private network: a LAN between the lab's guests and a slirp link to the host.

Every networked guest gets two virtio-net NICs (see :func:`qemu_net_args`):

- ``host0``: QEMU ``-netdev user`` (slirp), address 10.0.2.15/24 and *no default route*, so
  the only thing the guest reaches through it is 10.0.2.2 = the host's 127.0.0.1 (and the
  hostfwd ports the lab sets up, bound to the host's 127.0.0.1). Every guest has the same
  10.0.2.15 there: it is not an address other guests can use.
- ``lan0``: QEMU ``-netdev stream`` over a UNIX socket to :class:`LanHub`, a learning L2
  switch that runs in the lab's process and exists only between the lab's QEMU processes
  (never bridged to a host interface). Guest i is ``vm<i>`` at ``10.0.3.(10+i)/24``.

The socket lives in the lab's private (0700) directory, so no other local user can join
the LAN. Frames use QEMU's stream framing: a 4-byte big-endian length, then the frame.

:class:`LanHub` semantics: a frame from one port goes to the port that last sent from its
destination MAC, or to every other port when that is unknown, broadcast or multicast. A
port whose output backlog exceeds :data:`MAX_BACKLOG` bytes drops frames (as a switch
does). A frame longer than :data:`MAX_FRAME` or of length 0 closes the port that sent it.
``close()`` stops the thread and closes every socket; it is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "HOST_ALIAS",
    "LAN_IFACE",
    "FrameReader",
    "GuestNetwork",
    "LanHub",
    "encode_frame",
    "guest_network",
    "hosts_file",
    "lan_address",
    "qemu_net_args",
]

#: Largest frame the hub forwards (virtio-net without GSO: 1514 + headroom).
MAX_FRAME = 65536
#: Bytes a port may have queued before the hub drops frames for it.
MAX_BACKLOG = 4 << 20
#: Name of the launching host in the guests' /etc/hosts (slirp's 10.0.2.2).
HOST_ALIAS = "lab-host"
HOST_ADDRESS = "10.0.2.2"
SLIRP_ADDRESS = "10.0.2.15"
LAN_IFACE = "lan0"
SLIRP_IFACE = "host0"
_LEN = struct.Struct(">I")


def lan_address(index: int) -> str:
    """LAN address of guest ``index`` (10.0.3.10, 10.0.3.11, ...)."""
    if not 0 <= index < 200:
        raise ValueError(f"guest index {index} out of range 0..199")
    return f"10.0.3.{10 + index}"


def _mac(kind: int, index: int) -> str:
    return f"52:54:00:{kind:02x}:{index >> 8:02x}:{index & 0xFF:02x}"


def hosts_file(vms: int) -> str:
    """The guests' /etc/hosts: localhost, ``vmI`` on the LAN, the host as ``lab-host``."""
    lines = ["127.0.0.1\tlocalhost", f"{HOST_ADDRESS}\t{HOST_ALIAS}"]
    lines += [f"{lan_address(i)}\tvm{i}" for i in range(vms)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class GuestNetwork:
    """One guest's network: its index among ``vms`` guests, the hub socket, and the
    host ports forwarded to it (``(host port on 127.0.0.1, guest port on 10.0.2.15)``)."""

    index: int
    vms: int
    lan_socket: str
    forwards: tuple[tuple[int, int], ...] = ()

    def config_lines(self) -> str:
        """Lines ``MAC NAME ADDRESS/PREFIX`` for the guest's /init (one per NIC)."""
        return (
            f"{_mac(0, self.index)} {SLIRP_IFACE} {SLIRP_ADDRESS}/24\n"
            f"{_mac(1, self.index)} {LAN_IFACE} {lan_address(self.index)}/24\n"
        )


def guest_network(
    index: int, vms: int, lan_socket: str, forwards: Sequence[tuple[int, int]] = ()
) -> GuestNetwork:
    """A :class:`GuestNetwork` (checks the index and the socket path)."""
    lan_address(index)
    if not 0 <= index < vms:
        raise ValueError(f"guest index {index} not in 0..{vms - 1}")
    if "," in lan_socket:
        raise ValueError(f"socket path {lan_socket!r} contains a comma")
    return GuestNetwork(index, vms, lan_socket, tuple(forwards))


def qemu_net_args(net: GuestNetwork) -> list[str]:
    """QEMU arguments of the two NICs of :class:`GuestNetwork` ``net``."""
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-{SLIRP_ADDRESS}:{g}" for h, g in net.forwards)
    return [
        "-netdev", f"user,id=hostnet,net=10.0.2.0/24,ipv6=off{fwd}",
        "-device", f"virtio-net-pci,netdev=hostnet,mac={_mac(0, net.index)}",
        "-netdev", f"stream,id=lannet,server=off,addr.type=unix,addr.path={net.lan_socket}",
        "-device", f"virtio-net-pci,netdev=lannet,mac={_mac(1, net.index)}",
    ]  # fmt: skip


def encode_frame(frame: bytes) -> bytes:
    """One frame in QEMU's stream framing."""
    return _LEN.pack(len(frame)) + frame


class FrameReader:
    """Splits a byte stream in QEMU's stream framing into frames.

    ``feed(data)`` yields every frame completed by ``data``; raises ValueError on a length
    of 0 or above ``max_frame`` (the stream cannot be resynchronised after that).
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buf += data
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if not 0 < n <= self.max_frame:
                raise ValueError(f"bad frame length {n}")
            if len(self._buf) < 4 + n:
                return
            frame = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            yield frame


class _Port:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.out = bytearray()


class LanHub:
    """A learning L2 switch for QEMU ``-netdev stream`` clients on UNIX socket ``path``.

    Listens at once (the socket is created 0600 inside a directory the caller keeps
    private); ``start()`` runs the switch in a daemon thread. ``stats`` counts forwarded
    and dropped frames. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.stats = {"frames": 0, "dropped": 0}
        self._sel = selectors.DefaultSelector()
        self._ports: dict[int, _Port] = {}
        self._where: dict[bytes, _Port] = {}
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._listener.bind(path)
        finally:
            os.umask(old)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> LanHub:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lab-lan-hub")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop:
            for key, events in self._sel.select():
                sock = key.fileobj
                if sock is self._wake_r:
                    continue
                if sock is self._listener:
                    self._accept()
                    continue
                port = self._ports.get(key.fd)
                if port is None:
                    continue
                if events & selectors.EVENT_WRITE:
                    self._flush(port)
                if events & selectors.EVENT_READ and port.sock.fileno() in self._ports:
                    self._read(port)

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            sock, _ = self._listener.accept()
            sock.setblocking(False)
            self._ports[sock.fileno()] = _Port(sock)
            self._sel.register(sock, selectors.EVENT_READ)

    def _drop_port(self, port: _Port) -> None:
        self._ports.pop(port.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(port.sock)
        for mac in [m for m, p in self._where.items() if p is port]:
            del self._where[mac]
        port.sock.close()

    def _read(self, port: _Port) -> None:
        try:
            data = port.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_port(port)
            return
        try:
            frames = list(port.reader.feed(data))
        except ValueError:
            self._drop_port(port)
            return
        for frame in frames:
            self._switch(port, frame)

    def _switch(self, src: _Port, frame: bytes) -> None:
        if len(frame) < 14:
            self.stats["dropped"] += 1
            return
        dst_mac, src_mac = frame[:6], frame[6:12]
        if not src_mac[0] & 1:
            self._where[src_mac] = src
        dst = None if dst_mac[0] & 1 else self._where.get(dst_mac)
        targets = [dst] if dst is not None else [p for p in self._ports.values() if p is not src]
        data = encode_frame(frame)
        for port in targets:
            if port is src:
                continue
            if len(port.out) + len(data) > MAX_BACKLOG:
                self.stats["dropped"] += 1
                continue
            port.out += data
            self.stats["frames"] += 1
            self._flush(port)

    def _flush(self, port: _Port) -> None:
        try:
            sent = port.sock.send(port.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop_port(port)
            return
        del port.out[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if port.out else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(port.sock, events)

    def close(self) -> None:
        """Stop the switch, close every port and the listener, remove the socket file."""
        if self._stop:
            return
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)
        for port in list(self._ports.values()):
            self._drop_port(port)
        self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def __enter__(self) -> LanHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
