"""Real QEMU (no guest OS) against the broker: join, death, broker restart."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_lib.host_client import BrokerClient
from ivshmem_comm import layout
from tests.support import queue_free
from tests.support.broker import BrokerProcess, cli, drain_eventfd, kill, wait_for

pytestmark = [
    queue_free,
    pytest.mark.qemu,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no qemu-system-x86"),
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path, size="4M", vectors=2).start()
    yield b
    b.cleanup()


def start_qemu(socket_path: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-S",
            "-display",
            "none",
            "-nodefaults",
            "-machine",
            "pc",
            "-chardev",
            f"socket,path={socket_path},id=c",
            "-device",
            "ivshmem-doorbell,chardev=c,vectors=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_qemu_joins_and_its_death_is_seen(broker: BrokerProcess) -> None:
    with BrokerClient(broker.socket) as host:
        start = time.monotonic()
        qemu = start_qemu(broker.socket)
        try:
            wait_for(lambda: len(host.peer_eventfds().get(1, [])) == 2 or qemu.poll() is not None)
            assert qemu.poll() is None, qemu.stdout.read()
            joined = time.monotonic() - start
            slot = host.region.peer(1)
            assert slot.state == layout.PEER_JOINING  # QEMU never writes READY itself
            assert slot.pid == qemu.pid and slot.host_id == 0 and slot.doorbell == 2
            assert slot.incarnation == 1
            wait_for(lambda: "peer 2 (slot 1, qemu pid" in broker.log(), timeout=2)
            print(f"QEMU joined {joined * 1000:.0f} ms after its start (process start included)")
            # status sees it too, from the region
            r = cli("status", broker.name)
            assert "peer   1  joining" in r.stdout and f"pid {qemu.pid}" in r.stdout
            # kicking QEMU's eventfd is harmless (it injects an MSI-X the halted guest ignores)
            assert host.kick(1, 0) and host.kick(1, 1)
            time.sleep(0.2)
            own = host.own_eventfds()[0]
            drain_eventfd(own)
            t0 = time.monotonic()
            qemu.kill()
            assert select.select([own], [], [], 1)[0]
            seen = time.monotonic() - t0
            assert host.region.peer(1).state == layout.PEER_DEAD
            wait_for(lambda: 1 not in host.peer_eventfds(), timeout=1)
            assert seen < 0.1
            print(f"QEMU kill -9 seen (slot DEAD + kick) after {seen * 1000:.1f} ms")
        finally:
            kill(qemu)
        # the slot can be taken again
        with BrokerClient(broker.socket) as again:
            assert again.peer_id == 1 and again.incarnation == 2
            assert again.ivshmem_id == 3  # never QEMU's id again (QEMU 7.2 double free)


def test_qemu_survives_broker_restart_and_its_death_is_still_seen(
    broker: BrokerProcess,
) -> None:
    with BrokerClient(broker.socket) as host:
        qemu = start_qemu(broker.socket)
        try:
            wait_for(lambda: len(host.peer_eventfds().get(1, [])) == 2)
            broker.signal(signal.SIGKILL)
            time.sleep(0.3)
            assert qemu.poll() is None  # QEMU carries on without its server
            broker.start()
            wait_for(lambda: host.reconnects == 1)
            assert "qemu pid" in broker.log() and "waiting for it to reclaim" in broker.log()
            assert host.region.peer(1).state == layout.PEER_JOINING
            assert host.region.broker_info()[0] == 2
            # the host client still has QEMU's eventfds from before the restart
            assert len(host.peer_eventfds()[1]) == 2
            own = host.own_eventfds()[0]
            drain_eventfd(own)
            t0 = time.monotonic()
            qemu.kill()
            assert select.select([own], [], [], 1)[0]
            seen = time.monotonic() - t0
            assert host.region.peer(1).state == layout.PEER_DEAD
            assert seen < 0.1
            print(f"after restart: QEMU kill -9 seen via pidfd in {seen * 1000:.1f} ms")
        finally:
            kill(qemu)


def test_qemu_args_output_starts_qemu(broker: BrokerProcess) -> None:
    r = cli("qemu-args", broker.name, "--state-dir", str(broker.state_dir))
    assert r.returncode == 0, r.stderr
    args = r.stdout.split()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-machine", "pc", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: "qemu pid" in broker.log() or qemu.poll() is not None)
        assert qemu.poll() is None, qemu.stdout.read()
        assert os.path.exists(broker.socket)
    finally:
        kill(qemu)
