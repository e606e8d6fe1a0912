"""The broker as a real process: joins, leaves, deaths, safety, CLI, restart adoption."""

from __future__ import annotations

import datetime
import json
import mmap
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_lib.host_client import BrokerClient
from ivshmem_comm import layout, protocol
from ivshmem_comm.region import Region, host_id, shm_path
from tests.support.broker import (
    CLIENT_PEER,
    RAW_PEER,
    BrokerProcess,
    cli,
    drain_eventfd,
    kill,
    raw_connect,
    start_python,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path).start()
    yield b
    b.cleanup()


@pytest.fixture
def clients() -> Iterator[list[BrokerClient]]:
    made: list[BrokerClient] = []
    yield made
    for c in made:
        c.close()


def join(broker: BrokerProcess, clients: list[BrokerClient]) -> BrokerClient:
    c = BrokerClient(broker.socket)
    clients.append(c)
    return c


# ------------------------------------------------------------------------------ protocol
def test_handshake_is_ivshmem_server_protocol_byte_for_byte(broker: BrokerProcess) -> None:
    first = raw_connect(broker.socket)
    got = [protocol.recv_message(first) for _ in range(5)]
    assert got[0] == (0, None)  # version
    assert got[1] == (1, None)  # our ivshmem id (ids start at 1), no fd
    assert got[2][0] == -1 and got[2][1] is not None  # shm fd
    assert os.fstat(got[2][1]).st_size == 4 << 20
    assert [v for v, _ in got[3:]] == [1, 1]  # own id N=2 times, each an eventfd
    assert all(protocol.is_eventfd(fd) for _, fd in got[3:])

    second = raw_connect(broker.socket)
    raw = second.recv(8, socket.MSG_WAITALL)
    assert raw == (0).to_bytes(8, "little", signed=True)
    assert second.recv(8, socket.MSG_WAITALL) == (2).to_bytes(8, "little")
    value, shm = protocol.recv_message(second)
    assert value == -1 and shm is not None
    # the existing peer (1) x2 then itself (2) x2, each with one fd
    rest = [protocol.recv_message(second) for _ in range(4)]
    assert [v for v, _ in rest] == [1, 1, 2, 2]
    # peer 1 is told: peer 2's two eventfds
    told = [protocol.recv_message(first) for _ in range(2)]
    assert [v for v, _ in told] == [2, 2] and all(fd is not None for _, fd in told)
    second.close()
    # then peer 2's departure: its id with no fd
    first.settimeout(2)
    assert protocol.recv_message(first) == (2, None)
    # a third peer takes the freed slot 1 but never the freed id 2 (QEMU 7.2 double free)
    third = raw_connect(broker.socket)
    third_hs, _, _ = protocol.read_handshake(third)
    assert third_hs.peer == 3
    assert Region(mmap.mmap(third_hs.shm_fd, 0)).peer(1).doorbell == 3
    os.close(third_hs.shm_fd)
    third.close()
    first.close()


def test_join_writes_peer_table_and_modes(broker: BrokerProcess, clients: list) -> None:
    a = join(broker, clients)
    b = join(broker, clients)
    assert (a.peer_id, b.peer_id) == (0, 1)  # slots
    assert (a.ivshmem_id, b.ivshmem_id) == (1, 2)  # ids on the wire
    # (a learns of b from the broker's announcement, read by a's client thread: it may
    # not be there yet when b's join returns)
    wait_for(lambda: a.peer_ids() == {1: 2} and b.peer_ids() == {0: 1})
    wait_for(lambda: len(a.peer_eventfds().get(1, [])) == 2)
    wait_for(lambda: len(b.own_eventfds()) == 2)
    assert len(b.peer_eventfds()[0]) == 2
    slot = a.region.peer(1)
    assert slot.state == layout.PEER_JOINING
    assert slot.incarnation == 1 and b.incarnation == 1
    assert slot.pid == os.getpid() and slot.host_id == host_id() and slot.doorbell == 2
    assert slot.joined_ns > 0
    assert stat.S_IMODE(os.stat(shm_path(broker.name)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(broker.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(broker.socket).st_mode) == 0o600
    generation, pid, beat = a.region.broker_info()
    assert generation == 1 and pid == broker.proc.pid and beat > 0
    wait_for(lambda: "peer 2 (slot 1, process pid" in broker.log(), timeout=2)


def test_kick_through_broker_eventfds(broker: BrokerProcess, clients: list) -> None:
    a = join(broker, clients)
    b = join(broker, clients)
    wait_for(lambda: 1 in a.peer_eventfds())
    own = b.own_eventfds()[0]
    drain_eventfd(own)
    assert a.kick(1)
    assert select.select([own], [], [], 1)[0] == [own]


# ------------------------------------------------------------------------------ lifecycle
def test_dead_peer_marked_announced_and_kicked_within_100ms(
    broker: BrokerProcess, clients: list
) -> None:
    a = join(broker, clients)
    peer = start_python(CLIENT_PEER, broker.socket)
    try:
        peer_id = int(peer.stdout.readline().split()[0])
        assert peer_id == 1
        wait_for(lambda: 1 in a.peer_eventfds())
        own = a.own_eventfds()[0]
        drain_eventfd(own)
        start = time.monotonic()
        peer.kill()
        assert select.select([own], [], [], 1)[0] == [own], "no kick after the death"
        woke = time.monotonic() - start
        assert a.region.peer(1).state == layout.PEER_DEAD
        assert woke < 0.1, f"dead peer seen after {woke * 1000:.1f} ms"
        wait_for(lambda: 1 not in a.peer_eventfds(), timeout=1)
        print(f"dead-peer detection: kick {woke * 1000:.2f} ms after kill -9")
    finally:
        kill(peer)
    # the slot is reused with a new incarnation
    c = join(broker, clients)
    assert c.peer_id == 1 and c.incarnation == 2
    assert c.ivshmem_id == 3  # a new id for the reused slot
    assert a.peer_ids() == {1: 3} or wait_for(lambda: a.peer_ids() == {1: 3}, timeout=1)
    assert "died (socket closed)" in broker.log()


def test_client_that_sends_a_byte_is_dropped_others_carry_on(
    broker: BrokerProcess, clients: list
) -> None:
    a = join(broker, clients)
    rogue = raw_connect(broker.socket)
    protocol.read_handshake(rogue)
    wait_for(lambda: 1 in a.peer_eventfds())
    rogue.sendall(b"x")
    rogue.settimeout(2)
    while rogue.recv(64):  # the rest of the handshake, then end of stream: dropped
        pass
    wait_for(lambda: a.region.peer(1).state == layout.PEER_DEAD, timeout=1)
    assert "sent data" in broker.log()
    b = join(broker, clients)  # the broker still serves
    assert b.peer_id == 1 and a.connected.is_set()


def test_join_latency(broker: BrokerProcess, clients: list) -> None:
    times = []
    for _ in range(20):
        start = time.perf_counter()
        c = BrokerClient(broker.socket)
        times.append(time.perf_counter() - start)
        c.close()
    times.sort()
    median = times[len(times) // 2]
    print(f"join latency: median {median * 1000:.2f} ms, max {times[-1] * 1000:.2f} ms")
    assert median < 0.05


def test_full_region_refuses_politely(tmp_path: Path, clients: list) -> None:
    b = BrokerProcess(tmp_path, max_peers=2).start()
    try:
        join(b, clients)
        join(b, clients)
        sock = raw_connect(b.socket)
        assert sock.recv(8) == b""
        assert "all 2 peer slots are taken" in b.log()
    finally:
        b.cleanup()


# ------------------------------------------------------------------------------ safety
def test_uid_allow_list(tmp_path: Path) -> None:
    b = BrokerProcess(tmp_path, None, "--allow-uid", "4242").start()
    try:
        sock = raw_connect(b.socket)
        assert sock.recv(8) == b""
        assert "not in allow_uids" in b.log()
    finally:
        b.cleanup()
    ok = BrokerProcess(tmp_path, None, "--allow-uid", str(os.geteuid())).start()
    try:
        with BrokerClient(ok.socket) as c:
            assert c.peer_id == 0
    finally:
        ok.cleanup()


@pytest.mark.parametrize("owner", ["junk", "foreign"])
def test_existing_shm_not_ours_is_refused_untouched(tmp_path: Path, owner: str) -> None:
    name = unique_name()
    path = shm_path(name)
    content = b"not a region" * 1000
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, 0o600)
    if owner == "foreign":
        if os.geteuid() != 0:
            os.unlink(path)
            pytest.skip("needs root to give the object to another uid")
        os.chown(path, 65534, 65534)
    try:
        b = BrokerProcess(tmp_path, name).start(wait=False)
        assert b.proc.wait(timeout=10) == 1
        expect = "not ours" if owner == "foreign" else "not a region"
        assert expect in b.log() and "refusing" in b.log()
        with open(path, "rb") as f:
            assert f.read() == content
        assert not os.path.exists(b.socket)
    finally:
        os.unlink(path)


def test_bad_names_and_sizes_are_refused(tmp_path: Path) -> None:
    for args, field in (
        (["--name", "../etc", "--size", "4M"], "--name.name"),
        (["--name", "ok", "--size", "12Q"], "--name.size"),
        (["--name", "ok", "--size", "64K", "--max-peers", "64"], "--name.size"),
        (["--name", "ok", "--size", "4M", "--vectors", "0"], "--name.vectors"),
    ):
        r = cli("serve", *args, "--state-dir", str(tmp_path / "s"))
        assert r.returncode == 1, r
        assert f"config: {field}:" in r.stderr


def test_state_dir_must_be_private(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    r = cli("serve", "--name", unique_name(), "--size", "4M", "--state-dir", str(loose))
    assert r.returncode == 1 and "0700" in r.stderr


def test_second_broker_for_same_region_refused(broker: BrokerProcess, tmp_path: Path) -> None:
    other = BrokerProcess(tmp_path, broker.name)
    other.start(wait=False)
    assert other.proc.wait(timeout=10) == 1
    assert "another broker" in other.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_region_kept(tmp_path: Path, sig: int) -> None:
    b = BrokerProcess(tmp_path).start()
    try:
        with BrokerClient(b.socket, reconnect=False) as c:
            assert b.signal(sig) == 0
            wait_for(lambda: not c.connected.is_set(), timeout=2)
        assert not os.path.exists(b.socket)
        assert "stopped" in b.log()
        with Region.open(b.name) as region:
            assert region.broker_info()[1] == 0  # no broker serves it
    finally:
        b.cleanup()


def test_unlink_on_exit(tmp_path: Path) -> None:
    b = BrokerProcess(tmp_path, None, "--unlink-on-exit").start()
    assert os.path.exists(shm_path(b.name))
    assert b.signal(signal.SIGTERM) == 0
    assert not os.path.exists(shm_path(b.name))


# ------------------------------------------------------------------------------ CLI
def test_status_reads_the_region_without_a_broker(broker: BrokerProcess, clients: list) -> None:
    join(broker, clients)
    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    regions = {info["name"]: info for info in json.loads(r.stdout)["regions"]}
    info = regions[broker.name]
    assert info["broker"]["alive"] and info["broker"]["generation"] == 1
    assert info["peers"][0]["state_name"] == "joining"
    assert info["peers"][0]["holder_alive"] is True
    assert {"sent_messages", "full_waits", "send_kicks"} <= set(info["queues"][0]["counters"])
    broker.stop()
    r = cli("status", broker.name)
    assert r.returncode == 0, r.stderr
    assert f"region {broker.name}" in r.stdout and "none running" in r.stdout
    assert "peer   0  joining" in r.stdout


def test_qemu_args_and_libvirt_xml(broker: BrokerProcess) -> None:
    env_args = ("--state-dir", str(broker.state_dir))
    r = cli("qemu-args", broker.name, *env_args)
    assert r.returncode == 0, r.stderr
    assert f"-chardev socket,path={broker.socket},id=" in r.stdout
    assert "-device ivshmem-doorbell,chardev=" in r.stdout and "vectors=2" in r.stdout
    r = cli("qemu-args", broker.name, "--plain", *env_args)
    assert f"mem-path={shm_path(broker.name)}" in r.stdout and "ivshmem-plain" in r.stdout
    r = cli("libvirt-xml", broker.name, *env_args)
    assert r.returncode == 0, r.stderr
    assert f"<shmem name='{broker.name}'>" in r.stdout
    assert "<model type='ivshmem-doorbell'/>" in r.stdout
    assert f"<server path='{broker.socket}'/>" in r.stdout
    assert "<msi vectors='2' ioeventfd='on'/>" in r.stdout


def test_destroy_refuses_live_peers_unless_forced(broker: BrokerProcess, clients: list) -> None:
    state = ("--state-dir", str(broker.state_dir))
    join(broker, clients)
    r = cli("destroy", broker.name, *state)
    assert r.returncode == 1 and "live peers" in r.stderr and "broker pid" in r.stderr
    assert os.path.exists(shm_path(broker.name))
    broker.stop()
    clients.pop().close()  # LEFT, written by the client itself
    r = cli("destroy", broker.name, *state)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(shm_path(broker.name))


def test_destroy_force(broker: BrokerProcess, clients: list) -> None:
    join(broker, clients)
    r = cli("destroy", broker.name, "--force", "--state-dir", str(broker.state_dir))
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(shm_path(broker.name))
    assert not os.path.exists(broker.socket)


# ------------------------------------------------------------------------------ restart
def test_restart_adopts_region_clients_reclaim_ids(broker: BrokerProcess, clients: list) -> None:
    a = join(broker, clients)
    b = join(broker, clients)
    # Fully joined before the kill, so that both reclaim with all their eventfds (the broker
    # sends them after the peers'; a client cut off holding some: test_reclaim_edges.py)
    wait_for(
        lambda: (
            1 in a.peer_eventfds()
            and 0 in b.peer_eventfds()
            and len(a.own_eventfds()) == len(b.own_eventfds()) == 2
        )
    )
    uuid_before = a.region.uuid
    broker.signal(signal.SIGKILL)
    wait_for(lambda: not a.connected.is_set() and not b.connected.is_set(), timeout=2)
    # the data path does not need the broker: a can still kick b
    own_b = b.own_eventfds()[0]
    drain_eventfd(own_b)
    assert a.kick(1)
    assert select.select([own_b], [], [], 1)[0]

    start = time.monotonic()
    broker.start()
    try:
        # Liveness, not speed (the time is printed): a client whose first reclaim lands on a
        # socket nobody answers waits out its 5 s handshake timeout before it tries again.
        wait_for(lambda: a.reconnects == 1 and b.reconnects == 1, timeout=30)
    except AssertionError:
        tail = "\n".join(broker.log().splitlines()[-20:])
        raise AssertionError(
            f"reconnects a={a.reconnects} b={b.reconnects} connected "
            f"a={a.connected.is_set()} b={b.connected.is_set()}; broker log tail:\n{tail}"
        ) from None
    ready, reclaimed = (
        [line for line in broker.log().splitlines() if what in line][-1][:23]
        for what in (" ready", "reclaimed its slot")
    )
    gap = datetime.datetime.fromisoformat(reclaimed) - datetime.datetime.fromisoformat(ready)
    print(
        f"restart: both peers reclaimed {time.monotonic() - start:.3f} s after the restart "
        f"command, {gap.total_seconds() * 1000:.0f} ms after the new broker was ready"
    )
    assert (a.peer_id, b.peer_id) == (0, 1)
    assert (a.ivshmem_id, b.ivshmem_id) == (1, 2)  # ids are stable across the restart
    assert a.region.broker_info()[0] == 2  # generation bumped
    assert a.region.uuid == uuid_before
    assert [p.incarnation for p in a.region.peers()[:2]] == [1, 1]
    assert "adopted" in broker.log()
    wait_for(lambda: broker.log().count("reclaimed its slot") == 2, timeout=2)

    # a new peer after the restart gets everybody's eventfds and is announced to both
    c = join(broker, clients)
    assert c.peer_id == 2
    assert c.ivshmem_id > 2 + 32  # past the highest id in the table, with a margin
    assert c.region.peer(2).doorbell == c.ivshmem_id
    wait_for(lambda: {0, 1} <= set(c.peer_eventfds()))
    wait_for(lambda: 2 in a.peer_eventfds() and 2 in b.peer_eventfds())
    own_c = c.own_eventfds()[0]
    drain_eventfd(own_c)
    assert b.kick(2)
    assert select.select([own_c], [], [], 1)[0]
    own_a = a.own_eventfds()[0]
    drain_eventfd(own_a)
    assert c.kick(0)
    assert select.select([own_a], [], [], 1)[0]


def test_restart_marks_peers_that_died_meanwhile(broker: BrokerProcess, clients: list) -> None:
    a = join(broker, clients)
    peer = start_python(CLIENT_PEER, broker.socket)
    try:
        assert int(peer.stdout.readline().split()[0]) == 1
        broker.signal(signal.SIGKILL)
        peer.kill()
        peer.wait()
        time.sleep(0.1)
        assert a.region.peer(1).state == layout.PEER_JOINING  # nobody noticed yet
        own = a.own_eventfds()[0]
        drain_eventfd(own)
        broker.start()
        assert a.region.peer(1).state == layout.PEER_DEAD
        assert "died while no broker ran" in broker.log()
        wait_for(lambda: a.reconnects == 1)
        wait_for(lambda: 1 not in a.peer_eventfds(), timeout=1)  # told at reclaim
        assert select.select([own], [], [], 1)[0]
    finally:
        kill(peer)


def test_orphan_that_cannot_reconnect_is_watched_after_restart(
    broker: BrokerProcess, clients: list
) -> None:
    """A base-protocol peer (like QEMU) cannot reclaim; its death is still seen (pidfd)."""
    a = join(broker, clients)
    raw = start_python(RAW_PEER, broker.socket)
    try:
        assert int(raw.stdout.readline()) == 2  # ivshmem id 2, slot 1
        broker.signal(signal.SIGKILL)
        broker.start()
        wait_for(lambda: a.reconnects == 1)
        assert "waiting for it to reclaim" in broker.log()
        assert a.region.peer(1).state == layout.PEER_JOINING
        own = a.own_eventfds()[0]
        drain_eventfd(own)
        start = time.monotonic()
        raw.kill()
        assert select.select([own], [], [], 1)[0]
        woke = time.monotonic() - start
        assert a.region.peer(1).state == layout.PEER_DEAD
        assert woke < 0.1
        wait_for(lambda: "died (process exited)" in broker.log(), timeout=2)
    finally:
        kill(raw)


def test_vm_death_seen_after_a_process_in_it_reclaimed_the_slot(
    broker: BrokerProcess, clients: list
) -> None:
    """A process in a VM re-claims the VM's slot (new incarnation, same ivshmem id in
    `doorbell`); when the VM's connection closes the slot is still marked DEAD."""
    a = join(broker, clients)
    vm = raw_connect(broker.socket)
    hs, _, _ = protocol.read_handshake(vm)
    os.close(hs.shm_fd)
    wait_for(lambda: 1 in a.peer_eventfds())
    slot = a.region.peer(1)
    assert slot.doorbell == hs.peer
    # what guest_lib.attach does for a second process in the guest: same id, incarnation+1
    a.region.write_peer(1, incarnation=slot.incarnation + 1, state=layout.PEER_READY)
    own = a.own_eventfds()[0]
    drain_eventfd(own)
    vm.close()
    assert select.select([own], [], [], 1)[0]
    wait_for(lambda: a.region.peer(1).state == layout.PEER_DEAD, timeout=1)
    # "died", whatever the reason: the raw client may close before the broker finished
    # sending the handshake (broken pipe) or after (socket closed).
    wait_for(lambda: ") died (" in broker.log(), timeout=10)


def test_slot_reused_by_another_id_is_not_marked_dead(broker: BrokerProcess, clients: list) -> None:
    """The broker writes DEAD only where the slot still carries the closing peer's id."""
    a = join(broker, clients)
    other = raw_connect(broker.socket)
    hs, _, _ = protocol.read_handshake(other)
    os.close(hs.shm_fd)
    wait_for(lambda: 1 in a.peer_eventfds())
    a.region.write_peer(1, doorbell=hs.peer + 1000, state=layout.PEER_READY)
    other.close()
    wait_for(lambda: "is gone (slot now ready" in broker.log(), timeout=2)
    assert a.region.peer(1).state == layout.PEER_READY


def test_reclaim_with_wrong_incarnation_is_refused(broker: BrokerProcess) -> None:
    holder = raw_connect(broker.socket)
    hs, _, _ = protocol.read_handshake(holder)  # this process holds peer 0
    broker.signal(signal.SIGKILL)
    broker.start()
    sock = raw_connect(broker.socket)
    fd = os.eventfd(0)
    try:
        socket.send_fds(sock, [protocol.pack_reclaim(hs.peer, 99, 2)], [fd, fd])
        with pytest.raises(protocol.ReclaimRefusedError, match=f"peer {hs.peer} is incarnation 1"):
            protocol.read_handshake(sock)  # the broker says why, then hangs up
        assert sock.recv(8) == b""
        assert "reclaim refused" in broker.log() and "incarnation 1" in broker.log()
    finally:
        os.close(fd)
        holder.close()


def test_fresh_join_from_a_process_holding_an_orphan(broker: BrokerProcess) -> None:
    """A process with an orphaned slot that connects without reclaiming still joins."""
    holder = raw_connect(broker.socket)
    protocol.read_handshake(holder)
    broker.signal(signal.SIGKILL)
    broker.start()
    start = time.monotonic()
    with BrokerClient(broker.socket) as c:
        waited = time.monotonic() - start
        assert c.peer_id == 1  # slot 0 stays with its (live) holder
        assert 0.4 < waited < 2.0  # the broker waited RECLAIM_WAIT_S for a reclaim first
    holder.close()
