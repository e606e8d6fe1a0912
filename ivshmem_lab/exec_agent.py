"""Run commands in the guests of a running lab (``ivshmem-lab up``): agent, client, ssh face.

Transport. Each guest of a lab that is up runs :func:`agent_main` (``python -m
ivshmem_lab.exec_agent agent``) listening on 10.0.2.15:``AGENT_PORT`` of its slirp NIC; QEMU
forwards a port of the host's 127.0.0.1 to it (the port is in the lab's ``lab.json``). Any
local user can reach that port, so every connection must first present the lab's secret
token (32 random bytes, hex; kept in the lab's 0700 directory and given to the agent through
its private control directory); a connection that does not is answered exit status 255 and
closed before anything runs.

Framing, both directions: ``type`` (1 byte) + ``length`` (4 bytes, big-endian) + payload.

    client -> agent  H  JSON {"token": str, "argv": [str, ...], "cwd": str}  (first frame)
                     I  stdin bytes; an empty I frame closes the command's stdin
    agent -> client  O  stdout bytes      E  stderr bytes
                     X  exit status, ASCII decimal (last frame; 128+N for signal N)

The command runs in a new session with the agent's environment (the lab's, fixed at ``up``).
When the client's connection drops, the command's whole session is killed (SIGKILL); after
the command exits, whatever it left in its session is killed too. A command that cannot be
started ends with exit status 127 and the reason on stderr.

Client side: :func:`run_in_guest` returns the command's exit status, or 255 if the lab is
not reachable or the connection is lost before the exit frame (as ssh does). :func:`ssh_main`
accepts the argv that hydra's ``-launcher ssh -launcher-exec PROG`` gives PROG — ssh options
(``-x``, ``-o OPT``, ...), ``[user@]vmI``, then the command words, which are joined with
spaces and run by ``/bin/sh -c`` in the guest, as sshd would.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "AGENT_PORT",
    "LabState",
    "agent_main",
    "labs_root",
    "parse_ssh_argv",
    "read_frame",
    "resolve_lab",
    "run_in_guest",
    "ssh_main",
    "write_frame",
]

AGENT_PORT = 7022
TOKEN_ENV = "IVSHMEM_LAB_TOKEN"
LAB_ENV = "IVSHMEM_LAB"
MAX_PAYLOAD = 1 << 20
_HDR = struct.Struct(">BI")
HELLO, STDIN, STDOUT, STDERR, EXIT = b"H", b"I", b"O", b"E", b"X"
#: ssh options that take an argument (the others are flags).
SSH_OPTS_WITH_ARG = frozenset("BbcDEeFIiJLlmOopQRSWw")


class ProtocolError(ConnectionError):
    """The peer broke the framing (bad type, oversized frame, stream cut in a frame)."""


def write_frame(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    """Send one frame (``kind`` is one of the type bytes above)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    sock.sendall(_HDR.pack(kind[0], len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ProtocolError("connection closed inside a frame")
            return None
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """Receive one frame as ``(kind, payload)``; None at a clean end of stream.

    Raises :class:`ProtocolError` on an unknown type, a payload over ``MAX_PAYLOAD`` or a
    stream cut inside a frame.
    """
    hdr = _recv_exact(sock, _HDR.size)
    if hdr is None:
        return None
    code, n = _HDR.unpack(hdr)
    kind = bytes([code])
    if kind not in (HELLO, STDIN, STDOUT, STDERR, EXIT) or n > MAX_PAYLOAD:
        raise ProtocolError(f"bad frame header (type {code}, length {n})")
    payload = _recv_exact(sock, n) if n else b""
    if payload is None:
        raise ProtocolError("connection closed inside a frame")
    return kind, payload


# --------------------------------------------------------------------------------------------
# Where labs live


def labs_root() -> Path:
    """Directory of running labs: ``$XDG_RUNTIME_DIR/ivshmem-lab`` or
    ``/tmp/ivshmem-labs-<uid>`` (not created here)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "ivshmem-lab"
    return Path("/tmp") / f"ivshmem-labs-{os.getuid()}"


def resolve_lab(lab: str | None) -> Path:
    """The directory of lab ``lab``: a path (contains "/") or a name under :func:`labs_root`;
    None means ``$IVSHMEM_LAB`` or ``default``."""
    lab = lab or os.environ.get(LAB_ENV) or "default"
    return Path(lab) if "/" in lab else labs_root() / lab


@dataclass(frozen=True)
class LabState:
    """What ``lab.json`` of a running lab says: its name, owner pid, and per guest
    ``vmI`` the host port (on 127.0.0.1) forwarded to the guest's agent."""

    directory: Path
    name: str
    pid: int
    ports: dict[str, int]

    @classmethod
    def load(cls, directory: Path) -> LabState:
        """Read ``directory/lab.json``; raises FileNotFoundError/ValueError if not a lab."""
        data = json.loads((directory / "lab.json").read_text())
        return cls(directory, str(data["name"]), int(data["pid"]), dict(data["ports"]))

    def token(self) -> str:
        return (self.directory / "token").read_text().strip()


# --------------------------------------------------------------------------------------------
# Client


def _pump_stdin(sock: socket.socket, fd: int) -> None:
    # os.read, not a buffered file: a daemon thread blocked in a buffered read would hold
    # its lock at interpreter shutdown (a fatal error).
    with contextlib.suppress(OSError, ValueError):
        while True:
            data = os.read(fd, 65536)
            write_frame(sock, STDIN, data)
            if not data:
                return


def run_in_guest(
    lab: str | os.PathLike[str] | None,
    guest: str,
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    stdin: int | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run ``argv`` in guest ``guest`` ("vmI") of lab ``lab`` (see :func:`resolve_lab`).

    Streams the command's output to ``stdout``/``stderr`` (default: this process's) and
    what can be read from file descriptor ``stdin`` to it (None: no input). ``cwd``
    defaults to this process's working directory (the agent falls back to ``/`` if the
    guest does not see it). Returns the exit status;
    255 with a message on ``stderr`` if the lab or guest is not there or the connection
    breaks.
    """
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    directory = resolve_lab(os.fspath(lab) if lab is not None else None)
    try:
        state = LabState.load(directory)
        port = state.ports[guest]
        token = state.token()
    except (OSError, ValueError, KeyError) as e:
        what = f"no guest {guest!r} in lab {directory}" if isinstance(e, KeyError) else str(e)
        err.write(f"ivshmem-lab exec: {what}\n".encode())
        err.flush()
        return 255
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    except OSError as e:
        err.write(f"ivshmem-lab exec: cannot reach {guest} of {state.name}: {e}\n".encode())
        err.flush()
        return 255
    with sock:
        sock.settimeout(None)
        hello = {"token": token, "argv": list(argv), "cwd": cwd or os.getcwd()}
        write_frame(sock, HELLO, json.dumps(hello).encode())
        if stdin is None:
            write_frame(sock, STDIN)
        else:
            threading.Thread(target=_pump_stdin, args=(sock, stdin), daemon=True).start()
        try:
            while (frame := read_frame(sock)) is not None:
                kind, payload = frame
                if kind == EXIT:
                    return int(payload)
                stream = out if kind == STDOUT else err
                stream.write(payload)
                stream.flush()
        except (OSError, ValueError) as e:
            err.write(f"ivshmem-lab exec: connection to {guest} broken: {e}\n".encode())
            err.flush()
            return 255
    err.write(f"ivshmem-lab exec: {guest} closed the connection without an exit status\n".encode())
    err.flush()
    return 255


def parse_ssh_argv(argv: Sequence[str]) -> tuple[str, list[str], bool]:
    """Split an ssh command line into ``(host, command words, stdin_null)``.

    Options before the host are skipped (``-o X``/``-oX`` and the other options that take an
    argument, flags like ``-x -T -q``); ``-n`` sets ``stdin_null``; ``user@`` is dropped from
    the host. Raises ValueError if no host is given.
    """
    i, stdin_null = 0, False
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        for j, flag in enumerate(arg[1:], start=1):
            if flag == "n":
                stdin_null = True
            if flag in SSH_OPTS_WITH_ARG:
                if j == len(arg) - 1:
                    i += 1  # the argument is the next word
                break
        i += 1
    if i >= len(argv):
        raise ValueError("no host given")
    host = argv[i].rpartition("@")[2]
    return host, list(argv[i + 1 :]), stdin_null


def ssh_main(argv: Sequence[str] | None = None, lab: str | None = None) -> int:
    """``ssh``-compatible entry point (hydra's ``-launcher-exec``); returns the exit status.

    ``lab`` (default ``$IVSHMEM_LAB``, then ``default``) is the lab to use.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        host, words, stdin_null = parse_ssh_argv(argv)
    except ValueError as e:
        print(f"ivshmem-lab-ssh: {e} (usage: ivshmem-lab-ssh [ssh options] vmI CMD...)",
              file=sys.stderr)  # fmt: skip
        return 255
    if not words:
        print("ivshmem-lab-ssh: no command given (interactive logins are not supported)",
              file=sys.stderr)  # fmt: skip
        return 255
    stdin = None if stdin_null else sys.stdin.fileno()
    return run_in_guest(lab, host, ["/bin/sh", "-c", " ".join(words)], stdin=stdin)


# --------------------------------------------------------------------------------------------
# Agent (in the guest)


class _Session:
    """One connection: check the token, run the command, relay its streams."""

    def __init__(self, sock: socket.socket, token: str) -> None:
        self.sock = sock
        self.token = token
        self.lock = threading.Lock()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self.lock:
            write_frame(self.sock, kind, payload)

    def run(self) -> None:
        with self.sock:
            try:
                self._run()
            except OSError:
                pass

    def _run(self) -> None:
        self.sock.settimeout(30)
        frame = read_frame(self.sock)
        self.sock.settimeout(None)
        try:
            hello = json.loads(frame[1]) if frame and frame[0] == HELLO else {}
            token = str(hello.get("token", ""))
            argv = [str(a) for a in hello["argv"]]
            cwd = str(hello.get("cwd") or "/")
        except (ValueError, KeyError, TypeError, AttributeError):
            token, argv, cwd = "", [], "/"
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            self.send(STDERR, b"ivshmem-lab agent: permission denied\n")
            self.send(EXIT, b"255")
            return
        if not argv:
            self.send(STDERR, b"ivshmem-lab agent: malformed request\n")
            self.send(EXIT, b"255")
            return
        if not os.path.isdir(cwd):
            cwd = "/"
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            self.send(STDERR, f"ivshmem-lab agent: cannot run {argv[0]}: {e}\n".encode())
            self.send(EXIT, b"127")
            return
        pumps = [
            threading.Thread(target=self._pump_out, args=(proc.stdout, STDOUT), daemon=True),
            threading.Thread(target=self._pump_out, args=(proc.stderr, STDERR), daemon=True),
        ]
        for t in pumps:
            t.start()
        threading.Thread(target=self._pump_in, args=(proc,), daemon=True).start()
        code = proc.wait()
        for t in pumps:
            t.join(2)
        _kill_session(proc.pid)
        self.send(EXIT, str(128 - code if code < 0 else code).encode())

    def _pump_out(self, stream: BinaryIO, kind: bytes) -> None:
        with contextlib.suppress(OSError):
            while data := os.read(stream.fileno(), 65536):
                self.send(kind, data)
        stream.close()

    def _pump_in(self, proc: subprocess.Popen[bytes]) -> None:
        stdin = proc.stdin
        assert stdin is not None
        try:
            while (frame := read_frame(self.sock)) is not None:
                kind, payload = frame
                if kind != STDIN:
                    raise ProtocolError(f"unexpected frame {kind!r} from the client")
                if not payload:
                    stdin.close()
                elif not stdin.closed:
                    with contextlib.suppress(BrokenPipeError):
                        stdin.write(payload)
                        stdin.flush()
        except OSError:
            pass
        # The client is gone: so is everything it started.
        if proc.poll() is None:
            _kill_session(proc.pid)
        with contextlib.suppress(OSError):
            stdin.close()


def _kill_session(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def agent_main(listen: str, port: int) -> int:
    """Serve exec requests on ``listen:port`` forever (token from ``$IVSHMEM_LAB_TOKEN``,
    removed from the environment the commands get). Prints a ready line, then never returns
    unless the socket cannot be opened (status 1)."""
    token = os.environ.pop(TOKEN_ENV, "")
    if len(token) < 32:
        print("ivshmem-lab agent: no token in the environment", file=sys.stderr)
        return 1
    try:
        server = socket.create_server((listen, port), backlog=64)
    except OSError as e:
        print(f"ivshmem-lab agent: cannot listen on {listen}:{port}: {e}", file=sys.stderr)
        return 1
    print(f"ivshmem-lab-agent: ready on {listen}:{port}", flush=True)
    with server:
        while True:
            sock, _ = server.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_Session(sock, token).run, daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ivshmem_lab.exec_agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("agent", help="serve exec requests (inside a lab guest)")
    a.add_argument("--listen", default="10.0.2.15")
    a.add_argument("--port", type=int, default=AGENT_PORT)
    args = p.parse_args(argv)
    return agent_main(args.listen, args.port)


if __name__ == "__main__":
    sys.exit(main())
