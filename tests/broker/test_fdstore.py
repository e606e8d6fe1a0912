"""A broker killed with SIGKILL comes back with every connection, QEMU's included, when it
keeps its sockets and eventfds in a service manager's fd store (`serve --fd-store`, here under
`ivshmem-broker supervise`, which plays systemd's part).

QEMU runs stopped (-S: no firmware or guest code runs) with a qtest socket, through which the
test drives the ivshmem-doorbell device as a guest driver would (PCI BARs, MSI-X table,
doorbell register), so doorbells go
both ways through the eventfds the broker handed out: QEMU -> host rings a host peer's eventfd,
host -> QEMU makes QEMU deliver an MSI-X message, which the test points at guest RAM.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_lib.host_client import BrokerClient
from ivshmem_comm import layout
from ivshmem_comm.region import Region
from tests.support import queue_free
from tests.support.broker import (
    ENV,
    RAW_PEER,
    ROOT,
    drain_eventfd,
    kill,
    start_python,
    unique_name,
    wait_for,
)

pytestmark = [
    queue_free,
    pytest.mark.qemu,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no qemu-system-x86"),
]

SLOT = 5  # the device's PCI slot on bus 0
BAR0, BAR1 = 0xFEBF0000, 0xFEBF1000  # registers, MSI-X table
DOORBELL, IVPOSITION = 12, 8  # BAR0 register offsets (QEMU's ivshmem)
MSI_TARGET, MSI_DATA = 0x1000, 0x1234ABCD  # where the MSI-X message of vector 0 lands


class QtestQemu:
    """A stopped qemu-system-x86_64 with an ivshmem-doorbell device and a qtest socket to
    poke it (stopped, or SeaBIOS would re-program the BARs under the test's feet)."""

    def __init__(self, broker_socket: str, tmp: Path) -> None:
        path = tmp / "qtest.sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen(1)
        server.settimeout(30)
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-machine", "pc",
             "-qtest", f"unix:{path}", "-chardev", f"socket,path={broker_socket},id=c",
             "-device", f"ivshmem-doorbell,chardev=c,vectors=1,addr={SLOT:#x}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            conn, _ = server.accept()
        finally:
            server.close()
        conn.settimeout(30)
        self.io = conn.makefile("rw")

    def cmd(self, line: str) -> str:
        """One qtest command; its reply after "OK" (AssertionError on anything else)."""
        self.io.write(line + "\n")
        self.io.flush()
        while True:
            reply = self.io.readline()
            assert reply, "qtest connection closed"
            if reply.startswith(("OK", "FAIL", "ERR")):
                assert reply.startswith("OK"), f"{line}: {reply}"
                return reply[2:].strip()

    def _config(self, reg: int) -> None:
        self.cmd(f"outl 0xcf8 {0x80000000 | SLOT << 11 | reg & 0xFC:#x}")

    def config_read(self, reg: int) -> int:
        self._config(reg)
        return int(self.cmd("inl 0xcfc"), 16) >> 8 * (reg & 3)

    def config_write(self, reg: int, value: int) -> None:
        self._config(reg)
        self.cmd(f"outl 0xcfc {value:#x}")

    def setup_like_a_driver(self) -> None:
        """Place BAR0/BAR1, enable memory and bus mastering, enable MSI-X with vector 0
        unmasked and pointed at guest RAM (MSI_TARGET)."""
        assert self.config_read(0) & 0xFFFF == 0x1AF4  # Red Hat's vendor id: ivshmem
        self.config_write(0x10, BAR0)
        self.config_write(0x14, BAR1)
        self.config_write(0x04, 0x6)  # memory space + bus master
        cap = self.config_read(0x34) & 0xFF
        while self.config_read(cap) & 0xFF != 0x11:  # the MSI-X capability
            cap = self.config_read(cap) >> 8 & 0xFF
            assert cap, "no MSI-X capability"
        self.config_write(cap, self.config_read(cap) & 0xFFFF | 0x8000 << 16)  # enable
        for offset, value in ((0, MSI_TARGET), (4, 0), (8, MSI_DATA), (12, 0)):
            self.cmd(f"writel {BAR1 + offset:#x} {value:#x}")
        self.cmd(f"writel {MSI_TARGET:#x} 0x0")

    def ring(self, ivshmem_id: int, vector: int = 0) -> None:
        """Write the doorbell register, as the guest would, to interrupt peer `ivshmem_id`."""
        self.cmd(f"writel {BAR0 + DOORBELL:#x} {ivshmem_id << 16 | vector:#x}")

    def rings(self, ivshmem_id: int, eventfd: int, timeout: float = 2.0) -> bool:
        """Ring `ivshmem_id` until its `eventfd` fires (True) or `timeout` passes. QEMU reads
        announcements from its chardev in the same loop as qtest commands, so a ring right
        after a peer joined may come before QEMU knows that peer: it is then dropped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ring(ivshmem_id)
            if select.select([eventfd], [], [], 0.05)[0]:
                drain_eventfd(eventfd)
                return True
        return False

    def interrupted(self, timeout: float = 2.0) -> bool:
        """True once an MSI-X message of vector 0 reached guest RAM (then re-arms it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if int(self.cmd(f"readl {MSI_TARGET:#x}"), 16) == MSI_DATA:
                self.cmd(f"writel {MSI_TARGET:#x} 0x0")
                return True
            time.sleep(0.02)
        return False

    def ivposition(self) -> int:
        return int(self.cmd(f"readl {BAR0 + IVPOSITION:#x}"), 16)

    def close(self) -> None:
        self.io.close()
        kill(self.proc)


class Supervised:
    """`ivshmem-broker supervise -- serve ...` for one region (vectors=1) in `tmp`."""

    def __init__(self, tmp: Path, fd_store: bool, restart_delay: float = 0.2) -> None:
        self.name = unique_name()
        self.state_dir = tmp / "state"
        self.socket = str(self.state_dir / f"{self.name}.sock")
        self.log_path = tmp / "supervise.log"
        argv = [
            sys.executable, "-m", "host_broker", "supervise", "--restart-delay",
            str(restart_delay), "--",
            "serve", "--name", self.name, "--size", "4M", "--vectors", "1",
            "--state-dir", str(self.state_dir), *(["--fd-store"] if fd_store else []),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=ENV, cwd=ROOT)
        self.wait_ready(1)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, starts: int) -> None:
        wait_for(lambda: self.log().count(" ready") >= starts or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.log()

    def broker_pid(self) -> int:
        with Region.open(self.name) as region:
            return region.broker_info()[1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                kill(self.proc)
        if os.path.exists(f"/dev/shm/{self.name}"):
            Region.unlink(self.name)


@pytest.fixture
def made() -> Iterator[list[Supervised | QtestQemu]]:
    things: list[Supervised | QtestQemu] = []
    yield things
    for thing in reversed(things):
        thing.close()


def test_qemu_keeps_its_connection_across_a_kill_9(
    tmp_path: Path, made: list[Supervised | QtestQemu]
) -> None:
    sup = Supervised(tmp_path, fd_store=True)
    made.append(sup)
    qemu = QtestQemu(sup.socket, tmp_path)
    made.append(qemu)
    qemu.setup_like_a_driver()
    wait_for(lambda: re.search(rf"peer 1 \(slot 0, qemu pid {qemu.proc.pid}\b", sup.log()))
    assert qemu.ivposition() == 1

    first = sup.broker_pid()
    os.kill(first, signal.SIGKILL)
    t0 = time.monotonic()
    sup.wait_ready(2)
    print(f"broker back {time.monotonic() - t0:.2f} s after kill -9 (restart delay 0.2 s)")
    assert sup.broker_pid() != first
    log = sup.log()
    assert f"qemu pid {qemu.proc.pid}, incarnation 1) restored from the fd store" in log
    assert "socket from the fd store" in log and "waiting for it to reclaim" not in log
    assert qemu.proc.poll() is None

    with BrokerClient(sup.socket) as host:  # joins after the restart
        assert host.region.broker_info()[0] == 2  # generation: a restarted broker
        wait_for(lambda: len(host.peer_eventfds().get(0, [])) == 1, timeout=5)
        assert host.region.peer(0).state == layout.PEER_JOINING
        own = host.own_eventfds()[0]
        drain_eventfd(own)
        # QEMU -> host: QEMU learned the new peer through its connection of before the kill
        assert qemu.rings(host.ivshmem_id, own), "QEMU did not ring the new host peer"
        # host -> QEMU: the restarted broker gave the new peer QEMU's eventfd
        assert not qemu.interrupted(0.1)
        assert host.kick(0, 0)
        assert qemu.interrupted(), "no MSI-X from QEMU after the host kicked it"

    # and QEMU's death is still seen through the restored connection
    pid = qemu.proc.pid
    qemu.close()
    made.remove(qemu)
    wait_for(lambda: f"qemu pid {pid}, incarnation 1) died (socket closed)" in sup.log())


def test_without_the_fd_store_qemu_is_deaf_after_a_restart(
    tmp_path: Path, made: list[Supervised | QtestQemu]
) -> None:
    """The control: the same restart, no fd store. QEMU is adopted as an orphan and never
    hears of peers that join later (what the fd store fixes)."""
    sup = Supervised(tmp_path, fd_store=False)
    made.append(sup)
    qemu = QtestQemu(sup.socket, tmp_path)
    made.append(qemu)
    qemu.setup_like_a_driver()
    wait_for(lambda: f"qemu pid {qemu.proc.pid}" in sup.log())
    os.kill(sup.broker_pid(), signal.SIGKILL)
    sup.wait_ready(2)
    assert "waiting for it to reclaim" in sup.log()
    with BrokerClient(sup.socket) as host:
        own = host.own_eventfds()[0]
        drain_eventfd(own)
        assert 0 not in host.peer_eventfds()
        assert not qemu.rings(host.ivshmem_id, own, timeout=0.5)


def test_an_orderly_stop_empties_the_store(
    tmp_path: Path, made: list[Supervised | QtestQemu]
) -> None:
    """SIGTERM to the supervisor stops the broker in order: connections close (host clients
    see it and reconnect to the next broker) and the supervisor exits 0."""
    sup = Supervised(tmp_path, fd_store=True)
    made.append(sup)
    with BrokerClient(sup.socket, reconnect=False) as host:
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(15) == 0
        wait_for(lambda: not host.connected.is_set(), timeout=5)
    assert "broker exited with status 0: done" in sup.log()


def test_host_peers_stay_connected_and_deaths_meanwhile_are_seen(
    tmp_path: Path, made: list[Supervised | QtestQemu]
) -> None:
    """A host client keeps its connection across the kill (it never has to reclaim); a peer
    that dies while no broker runs has its connection dropped by the holder, its eventfds
    closed by the next broker, its slot marked DEAD and its death told to the survivors."""
    sup = Supervised(tmp_path, fd_store=True, restart_delay=1.5)
    made.append(sup)
    with BrokerClient(sup.socket) as stays:
        doomed = start_python(RAW_PEER, sup.socket)
        try:
            assert doomed.stdout is not None
            doomed_id = int(doomed.stdout.readline())
            wait_for(lambda: 1 in stays.peer_eventfds())  # slot 1
            os.kill(sup.broker_pid(), signal.SIGKILL)
            wait_for(lambda: "restarting in 1.5 s with" in sup.log())
        finally:
            kill(doomed)
        sup.wait_ready(2)
        log = sup.log()
        assert f"peer {doomed_id} (slot 1" in log and "died while no broker ran" in log
        assert f"e/{sup.name}/{doomed_id}/0" in log  # closed unclaimed
        wait_for(lambda: 1 not in stays.peer_eventfds(), timeout=5)  # told it died
        assert stays.region.peer(1).state == layout.PEER_DEAD
        assert stays.reconnects == 0 and stays.connected.is_set()
        with BrokerClient(sup.socket) as late:
            wait_for(lambda: late.peer_id in stays.peer_eventfds(), timeout=5)
            own = late.own_eventfds()[0]
            drain_eventfd(own)
            assert stays.kick(late.peer_id, 0)
            assert select.select([own], [], [], 2)[0]
