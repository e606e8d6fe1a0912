"""The broker as a systemd service: the shipped unit verifies clean, its ExecStart line runs,
and the broker speaks the notify protocol (READY/STATUS/WATCHDOG/STOPPING) to a datagram
socket of the test standing in for systemd's $NOTIFY_SOCKET."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest_lib.host_client import BrokerClient
from ivshmem_comm import protocol
from ivshmem_comm.region import Region, shm_path
from tests.support.broker import ENV, ROOT, kill, unique_name

pytestmark = pytest.mark.timeout(120)

UNIT = ROOT / "host_broker" / "systemd" / "ivshmem-broker@.service"
INSTALLED = "/usr/local/bin/ivshmem-broker"


def require_systemd_analyze() -> str:
    """systemd-analyze, or a skip; a failure under IVSHMEM_REQUIRE_SYSTEMD=1 (CI)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is missing (apt-get install systemd, or `make system-deps`)"
        if os.environ.get("IVSHMEM_REQUIRE_SYSTEMD") == "1":
            pytest.fail(f"IVSHMEM_REQUIRE_SYSTEMD=1 but {reason}")
        pytest.skip(reason)
    return path


def console_script() -> str:
    """The ivshmem-broker console script of this checkout's environment."""
    path = Path(sys.executable).parent / "ivshmem-broker"
    assert path.exists(), f"{path} is missing: install the project (make test does)"
    return str(path)


def test_unit_verifies_clean(tmp_path: Path) -> None:
    analyze = require_systemd_analyze()
    text = UNIT.read_text()
    for setting in (
        "Type=notify", "WatchdogSec=", "RuntimeDirectory=ivshmem-broker/%i",
        "RuntimeDirectoryMode=0700", "FileDescriptorStoreMax=", "NoNewPrivileges=yes",
        "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_CHOWN",
    ):  # fmt: skip
        assert re.search(rf"^{re.escape(setting)}", text, re.MULTILINE), setting
    # The one line that depends on where the project is installed points at this checkout's
    # script (verify checks that ExecStart is executable); everything else is as shipped.
    assert text.count(INSTALLED) == 1
    shipped = text.replace(INSTALLED, console_script())
    (tmp_path / UNIT.name).write_text(shipped)
    r = subprocess.run(
        [analyze, "verify", str(tmp_path / "ivshmem-broker@job1.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # and verify does complain about a unit that is wrong
    (tmp_path / UNIT.name).write_text(shipped.replace("Type=notify", "Type=notfy"))
    r = subprocess.run(
        [analyze, "verify", str(tmp_path / "ivshmem-broker@job1.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Failed to parse service type" in r.stdout + r.stderr


class NotifySocket:
    """A datagram socket standing in for systemd's: records what arrives and who sent it."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.env = address
        self.fd_messages: list[tuple[dict[str, str], list[str]]] = []  # FDSTORE*, fd kinds

    def receive(self, timeout: float) -> tuple[dict[str, str], int, float] | None:
        """(KEY=VALUE lines as a dict, sender pid, arrival time) or None on timeout."""
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(
                4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(16 * 4)
            )
        except TimeoutError:
            return None
        pid, fds = 0, []
        for level, kind, d in ancdata:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = struct.unpack("3i", d[:12])[0]
            elif (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds += list(struct.unpack(f"{len(d) // 4}i", d))
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        if "FDSTORE" in fields or "FDSTOREREMOVE" in fields:
            self.fd_messages.append((fields, [_fd_kind(fd) for fd in fds]))
        for fd in fds:
            os.close(fd)
        return fields, pid, time.monotonic()

    def wait_for(self, key: str, timeout: float = 15) -> tuple[dict[str, str], int, float]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is not None and key in got[0]:
                return got
        raise AssertionError(f"no {key} within {timeout} s")

    def close(self) -> None:
        self.sock.close()


def _fd_kind(fd: int) -> str:
    """ "eventfd", "listening socket", "socket" or "other"."""
    if protocol.is_eventfd(fd):
        return "eventfd"
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "other"
    with sock:
        return (
            "listening socket"
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            else "socket"
        )


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """This module's own short private directory: the broker's socket path under it must stay
    within AF_UNIX's 107 bytes, which pytest's tmp_path exceeds under pytest-xdist."""
    path = Path(tempfile.mkdtemp(prefix="sd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(str(tmp_path / "notify"))
    yield s
    s.close()


class Service:
    """The broker started the way the unit starts it, with a systemd-like environment."""

    def __init__(self, tmp_path: Path, notify: NotifySocket, **env: str) -> None:
        self.name = unique_name()
        self.config = tmp_path / f"{self.name}.toml"
        self.config.write_text(
            f'[[region]]\nname = "{self.name}"\nsize = "4M"\nmax_peers = 4\nvectors = 2\n'
        )
        self.state_dir = tmp_path / "run" / self.name
        self.socket = str(self.state_dir / f"{self.name}.sock")
        self.log = tmp_path / "broker.log"
        self.notify = notify
        self.env = {**ENV, "NOTIFY_SOCKET": notify.env, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        """The unit's ExecStart with this test's paths for /etc and /run."""
        line = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
        argv = shlex.split(line.removeprefix("ExecStart=").replace("%i", self.name))
        assert argv[0] == INSTALLED
        argv = [a.replace("/etc/ivshmem-broker", str(self.config.parent)) for a in argv[1:]]
        argv = [a.replace("/run/ivshmem-broker", str(self.state_dir.parent)) for a in argv]
        return [console_script(), *argv]

    def start(self) -> Service:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=log, env=self.env, cwd=ROOT
            )
        return self

    def cleanup(self) -> None:
        if self.proc is not None:
            kill(self.proc)
        if os.path.exists(shm_path(self.name)):
            Region.unlink(self.name)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    made: list[Service] = []
    yield made
    for s in made:
        s.cleanup()


def start(tmp_path: Path, notify: NotifySocket, made: list[Service], **env: str) -> Service:
    service = Service(tmp_path, notify, **env).start()
    made.append(service)
    return service


def test_ready_status_watchdog_stopping(
    tmp_path: Path, notify_socket: NotifySocket, services: list[Service]
) -> None:
    svc = start(tmp_path, notify_socket, services, WATCHDOG_USEC="400000")
    assert svc.proc is not None
    fields, pid, _ = notify_socket.wait_for("READY")
    assert pid == svc.proc.pid and fields == {"READY": "1"}
    # READY only once the region exists and its socket accepts peers
    assert os.path.exists(shm_path(svc.name))
    with BrokerClient(svc.socket) as client:
        assert client.peer_id == 0
        deadline = time.monotonic() + 10
        pings = []
        while True:
            fields, pid, at = notify_socket.wait_for("WATCHDOG")
            assert pid == svc.proc.pid
            pings.append(at)
            if "(1 peers)" in fields.get("STATUS", "") or time.monotonic() > deadline:
                break
        assert fields["STATUS"] == f"serving 1 region: {svc.name} (1 peers)"
        for _ in range(4):
            pings.append(notify_socket.wait_for("WATCHDOG")[2])
    recent = pings[-5:]
    gaps = [b - a for a, b in itertools.pairwise(recent)]
    assert all(0.1 < g < 0.5 for g in gaps), gaps  # every WATCHDOG_USEC / 2 = 0.2 s
    svc.proc.send_signal(signal.SIGTERM)
    fields, _, _ = notify_socket.wait_for("STOPPING")
    assert fields == {"STOPPING": "1"}
    assert svc.proc.wait(10) == 0


def test_watchdog_stops_when_the_broker_loop_does(
    tmp_path: Path, notify_socket: NotifySocket, services: list[Service]
) -> None:
    svc = start(tmp_path, notify_socket, services, WATCHDOG_USEC="400000")
    assert svc.proc is not None
    notify_socket.wait_for("READY")
    notify_socket.wait_for("WATCHDOG")
    svc.proc.send_signal(signal.SIGSTOP)
    time.sleep(0.1)
    while notify_socket.receive(0.05) is not None:  # what was already on its way
        pass
    assert notify_socket.receive(1.0) is None  # a stuck broker does not ping
    svc.proc.send_signal(signal.SIGCONT)
    notify_socket.wait_for("WATCHDOG", timeout=2)


@pytest.mark.parametrize(
    "env", [{}, {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}], ids=["unset", "other-pid"]
)
def test_no_watchdog_unless_asked_of_this_process(
    tmp_path: Path, notify_socket: NotifySocket, services: list[Service], env: dict[str, str]
) -> None:
    start(tmp_path, notify_socket, services, **env)
    notify_socket.wait_for("READY")
    fields, _, _ = notify_socket.wait_for("STATUS")
    assert "WATCHDOG" not in fields
    deadline = time.monotonic() + 1.5
    while (left := deadline - time.monotonic()) > 0:
        got = notify_socket.receive(left)
        assert got is None or "WATCHDOG" not in got[0]


def test_abstract_notify_socket(tmp_path: Path, services: list[Service]) -> None:
    notify = NotifySocket(f"@ivshmem-broker-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        svc = start(tmp_path, notify, services)
        assert svc.proc is not None
        _, pid, _ = notify.wait_for("READY")
        assert pid == svc.proc.pid
    finally:
        notify.close()


def test_a_refused_start_says_why_and_is_never_ready(
    tmp_path: Path, notify_socket: NotifySocket, services: list[Service]
) -> None:
    svc = Service(tmp_path, notify_socket)
    svc.state_dir.parent.mkdir(parents=True)
    svc.state_dir.mkdir(mode=0o755)
    os.chmod(svc.state_dir, 0o755)
    services.append(svc.start())
    assert svc.proc is not None and svc.proc.wait(30) == 1
    fields, pid, _ = notify_socket.wait_for("STATUS")
    assert pid == svc.proc.pid and "READY" not in fields
    assert fields["STATUS"].startswith("refused to start: ") and "0755" in fields["STATUS"]
    assert notify_socket.receive(0.2) is None


def test_fd_store_follows_sockets_and_peers(
    tmp_path: Path, notify_socket: NotifySocket, services: list[Service]
) -> None:
    """With --fd-store (the unit's ExecStart has it), the broker stores its listening socket
    before READY=1, each peer's connection and eventfds when it joins, removes them when it
    goes, and empties the store on an orderly stop."""
    svc = start(tmp_path, notify_socket, services)
    assert svc.proc is not None and "--fd-store" in svc.argv()
    notify_socket.wait_for("READY")
    listen = f"l/{svc.name}"
    assert notify_socket.fd_messages == [({"FDSTORE": "1", "FDNAME": listen}, ["listening socket"])]
    with BrokerClient(svc.socket) as client:
        peer = client.ivshmem_id
        receive_until(lambda: len(notify_socket.fd_messages) == 4, notify_socket)
    names = [f"c/{svc.name}/{peer}", f"e/{svc.name}/{peer}/0", f"e/{svc.name}/{peer}/1"]
    assert notify_socket.fd_messages[1:] == [
        ({"FDSTORE": "1", "FDNAME": names[0]}, ["socket"]),
        ({"FDSTORE": "1", "FDNAME": names[1]}, ["eventfd"]),
        ({"FDSTORE": "1", "FDNAME": names[2]}, ["eventfd"]),
    ]
    receive_until(lambda: len(notify_socket.fd_messages) == 7, notify_socket)
    assert notify_socket.fd_messages[4:] == [
        ({"FDSTOREREMOVE": "1", "FDNAME": name}, []) for name in names
    ]
    svc.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING")
    assert notify_socket.fd_messages[-1] == ({"FDSTOREREMOVE": "1", "FDNAME": listen}, [])
    assert svc.proc.wait(10) == 0


def receive_until(done: Callable[[], bool], notify: NotifySocket, timeout: float = 10) -> None:
    """Receive notifications until `done()` (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, "timed out"
        notify.receive(min(left, 0.2))
