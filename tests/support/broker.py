"""Helpers of the broker tests (no tests here): broker and peer processes, raw clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ivshmem_comm.region import Region

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def unique_name() -> str:
    return f"tb-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, step: float = 0.005) -> float:
    """Poll until predicate() is true; return the seconds it took. AssertionError on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


class BrokerProcess:
    """`python -m host_broker serve` for one region, in a private state dir."""

    def __init__(
        self,
        tmp_path: Path,
        name: str | None = None,
        *extra: str,
        size: str = "4M",
        max_peers: int = 4,
        vectors: int = 2,
    ) -> None:
        self.name = name or unique_name()
        self.state_dir = tmp_path / "state"
        self.socket = str(self.state_dir / f"{self.name}.sock")
        self.args = [
            "--name", self.name, "--size", size, "--max-peers", str(max_peers),
            "--vectors", str(vectors), "--state-dir", str(self.state_dir), *extra,
        ]  # fmt: skip
        self.log_path = tmp_path / f"broker-{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> BrokerProcess:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "host_broker", "serve", *self.args],
            stdout=log,
            stderr=log,
            env=ENV,
            cwd=ROOT,
        )
        log.close()
        if wait:
            wait_for(
                lambda: self.log().count(" ready") >= self.starts or self.proc.poll() is not None
            )
            assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            Region.unlink(self.name)


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host_broker", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=timeout,
    )


def start_python(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python child running `code` (dedented) with argv[1:] = args; stdout is a pipe."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )


# A peer that joins through the broker client and reports its id, then waits to be killed.
CLIENT_PEER = """
    import sys, time
    from guest_lib.host_client import BrokerClient
    c = BrokerClient(sys.argv[1])
    print(c.peer_id, c.incarnation, flush=True)
    while True:
        time.sleep(1)
"""

# A peer that speaks only the base protocol and never reconnects (like QEMU).
RAW_PEER = """
    import socket, sys, time
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    from ivshmem_comm import protocol
    hs, _, _ = protocol.read_handshake(s)
    print(hs.peer, flush=True)
    while s.recv(4096):
        pass
    while True:
        time.sleep(1)
"""


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def drain_eventfd(fd: int) -> None:
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


def kill(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
