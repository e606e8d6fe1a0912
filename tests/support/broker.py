"""Helpers of the broker tests (no tests here): broker and peer processes, raw clients."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from guest_lib import launch

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


class BrokerProcess(launch.BrokerProcess):
    """guest_lib.launch.BrokerProcess as the broker tests use it: one region in
    ``tmp_path/state``, its log in ``tmp_path``, the region kept when the broker stops (tests
    restart brokers over it) and removed by :meth:`cleanup`."""

    def __init__(
        self,
        tmp_path: Path,
        name: str | None = None,
        *extra: str,
        size: str = "4M",
        max_peers: int = 4,
        vectors: int = 2,
    ) -> None:
        name = name or unique_name()
        tmp_path.mkdir(parents=True, exist_ok=True)
        super().__init__(
            name,
            size,
            max_peers=max_peers,
            vectors=vectors,
            args=extra,
            state_dir=tmp_path / "state",
            log=tmp_path / f"broker-{name}.log",
            unlink_on_exit=False,
            env=ENV,
            cwd=ROOT,
        )

    def cleanup(self) -> None:
        """Kill the broker at once (no orderly stop: nothing to wait for) and remove the
        region."""
        self.kill()
        self.close()


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
    """Consume `fd`'s pending count, if it has one, without ever blocking. Polled, not made
    non-blocking: O_NONBLOCK belongs to the open file description, which the eventfd's other
    holders (it came through SCM_RIGHTS: the broker, QEMU) share and may change (a read
    right after set_blocking(False) once waited 180 s, after a broker restart)."""
    if select.select([fd], [], [], 0)[0]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)


def kill(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
