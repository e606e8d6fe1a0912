"""guest_lib.attach() inside real QEMU guests (the VM lab), against real brokers.

Every test boots guests under the lab's accelerator (TCG here: ~5 s per boot, Python ~10x
slower than on the host). The guests reach the broker's region through `ivshmem-doorbell`
and wait on the project's UIO driver. What is shown (issue 4):

- two guests exchange 10,000 content-checked messages each way, mixed sizes up to 4 MiB;
  a guest and a host process do the same;
- a guest blocked in recv uses no CPU for polling (its own CPU time and the notifier's
  counters over 2 s of blocking, and QEMU's host CPU time meanwhile), and wakes on a
  doorbell from the other guest and from a host process;
- a guest powered off mid-stream: the other guest gets PeerLostError; a new guest then
  joins the freed slot and talks to it;
- two jobs (two brokers, two regions) with two guests each: every guest sees only its own
  job's device.

Numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ivshmem_lab as L
from guest_lib.host_client import attach as host_attach
from tests.support import vm_marks
from tests.support.broker import ENV, BrokerProcess

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable  # the venv's python: visible in the guest (host root over 9p)
EXCHANGE_COUNT = int(os.environ.get("IVSHMEM_VM_EXCHANGE_COUNT", "10000"))  # each way

pytestmark = vm_marks(400)


@pytest.fixture(scope="module")
def lab() -> L.Lab:
    lab = L.Lab(accel="auto", memory="384M")
    ird = lab.initramfs()
    if not ird.uio_module:
        pytest.skip(f"uio_ivshmem did not build: {ird.uio_build_log.strip()[-300:]}")
    print(f"\nlab: accel {lab.accel_in_use()}")
    return lab


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path, size="32M", max_peers=4, vectors=2).start()
    yield b
    b.cleanup()


def _py(src: str, *args: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(src), *args]


def _check(result: L.GuestResult) -> str:
    assert result.returncode == 0, f"vm{result.index}: {result.error}\n{result.console[-4000:]}"
    return result.output


# Both sides of the exchange: attach() with no arguments (a guest finds its PCI device; a host
# process gets $IVSHMEM_COMM_SOCKET), wait for the other peer, then alternate: the lower id
# sends message i and receives the other's message i. Contents are slices of a seeded random
# pattern, different per direction, checked byte for byte.
EXCHANGE = """
    import random, sys, time
    import guest_lib
    n = int(sys.argv[1])
    ep = guest_lib.attach()
    print("attached", ep.peer_id, ep.attachment.kind, ep.attachment.notifier, flush=True)
    while not ep.peers():
        time.sleep(0.01)
    other = ep.peers()[0]
    rng = random.Random(1234)
    pattern = rng.randbytes((4 << 20) + 65536)
    sizes = rng.choices([8, 64, 512, 4096, 32768, 262144, 1 << 20, 4 << 20],
                        [30, 20, 15, 12, 10, 8, 4, 1], k=n)
    def expect(i, direction):
        off = (i * 4099 + direction * 7919) % 65536
        return pattern[off : off + sizes[i]]
    first = ep.peer_id < other
    mine, theirs = (0, 1) if first else (1, 0)
    t0 = time.monotonic()
    for i in range(n):
        if first:
            ep.send(other, expect(i, mine), tag=i & 0xFFFF)
        with ep.recv(source=other, timeout=60) as m:
            assert m.tag == i & 0xFFFF, (i, m.tag)
            assert bytes(m.data) == expect(i, theirs), f"message {i} differs"
        if not first:
            ep.send(other, expect(i, mine), tag=i & 0xFFFF)
    dt = time.monotonic() - t0
    total = 2 * sum(sizes)
    print(f"exchanged {2 * n} messages ({n} each way, {total / 1e6:.0f} MB, max"
          f" {max(sizes)} B) in {dt:.2f} s: {2 * n / dt:.0f} msg/s, {total / dt / 1e6:.1f} MB/s",
          flush=True)
    counters = getattr(ep.notifier, "counters", None)
    if counters:
        print("notifier", counters(), flush=True)
    ep.close()
"""


def _exchange_line(output: str) -> str:
    m = re.search(r"^exchanged (\d+) messages.*$", output, re.M)
    assert m, output
    assert int(m.group(1)) == 2 * EXCHANGE_COUNT
    return m.group(0)


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_two_guests_exchange_mixed_sizes(lab: L.Lab, broker: BrokerProcess) -> None:
    results = lab.run(
        _py(EXCHANGE, str(EXCHANGE_COUNT)),
        vms=2,
        devices=[L.DoorbellDevice(broker.socket, 2)],
        cwd=REPO,
        timeout=300,
    )
    for r in results:
        out = _check(r)
        assert re.search(r"^attached \d doorbell DoorbellNotifier$", out, re.M), out
        print(f"vm{r.index} ({r.accel}, boot {r.boot_seconds:.1f} s): {_exchange_line(out)}")
    assert sorted(re.search(r"attached (\d)", r.output)[1] for r in results) == ["0", "1"]


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_guest_and_host_process_exchange(lab: L.Lab, broker: BrokerProcess) -> None:
    host = subprocess.Popen(
        _py(EXCHANGE, str(EXCHANGE_COUNT)),
        env={**ENV, "IVSHMEM_COMM_SOCKET": broker.socket},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        (r,) = lab.run(
            _py(EXCHANGE, str(EXCHANGE_COUNT)),
            devices=[L.DoorbellDevice(broker.socket, 2)],
            cwd=REPO,
            timeout=300,
        )
        host_out, _ = host.communicate(timeout=60)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    out = _check(r)
    assert host.returncode == 0, host_out
    assert "attached" in out and "doorbell DoorbellNotifier" in out
    assert re.search(r"^attached \d broker ", host_out, re.M), host_out
    print(f"guest ({r.accel}): {_exchange_line(out)}")
    print(f"host process: {_exchange_line(host_out)}")


# Guest A: measure 2 s of blocking with nothing to receive, then block twice more and report
# what woke it. /proc/self/stat fields 14 and 15 are utime and stime in clock ticks.
IDLE_GUEST = """
    import os, time
    import guest_lib
    from ivshmem_comm.errors import TimeoutError as RecvTimeout
    ep = guest_lib.attach()
    n = ep.notifier
    print("id", ep.peer_id, type(n).__name__, "blocking" if n.blocking else "polling", flush=True)
    while len(ep.peers()) < 2:
        time.sleep(0.01)
    def cpu_ticks():
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    hz = os.sysconf("SC_CLK_TCK")
    try:  # consume the kicks of the peers' joins (they announce READY with a kick)
        ep.recv(timeout=0.5)
    except RecvTimeout:
        pass
    c0, k0, t0 = n.counters(), cpu_ticks(), time.monotonic()
    print("idle-begin", flush=True)
    try:
        ep.recv(timeout=2.0)
        print("unexpected message")
    except RecvTimeout:
        pass
    dt, k1, c1 = time.monotonic() - t0, cpu_ticks(), n.counters()
    print("idle-end", flush=True)
    d = {k: c1[k] - c0[k] for k in c1}
    print(f"idle {dt:.2f} s cpu {(k1 - k0) / hz:.3f} s waits {d['waits']} wakeups"
          f" {d['wakeups']} timeouts {d['timeouts']}", flush=True)
    for round_ in (1, 2):
        w0 = n.wakeups
        print(f"blocking {round_}", flush=True)
        t0 = time.monotonic()
        with ep.recv() as m:
            text, src = bytes(m.data).decode(), m.source
        print(f"woke {round_} by {text} from {src} interrupts {n.wakeups - w0}"
              f" after {time.monotonic() - t0:.2f} s", flush=True)
    ep.close()
"""

# Guest B: told by the host which peer to ring, sends it one message, waits for "bye".
KICKER_GUEST = """
    import guest_lib
    ep = guest_lib.attach()
    print("id", ep.peer_id, flush=True)
    with ep.recv() as m:
        target, src = int(bytes(m.data)), m.source
    ep.send(target, b"guest")
    with ep.recv(source=src) as m:
        assert bytes(m.data) == b"bye"
    ep.close()
"""


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_blocked_guest_uses_no_cpu_and_wakes_on_doorbells(
    lab: L.Lab, broker: BrokerProcess
) -> None:
    host = host_attach(broker.socket)
    marks: dict[str, tuple[float, float]] = {}
    guests: dict[int, L.Guest] = {}

    def on_output(index: int, line: str) -> None:
        if index == 0 and line in ("idle-begin", "idle-end"):
            marks[line] = (time.monotonic(), _proc_cpu_seconds(guests[0].pid or 0))

    dev = [L.DoorbellDevice(broker.socket, 2)]
    a = guests[0] = lab.guest(0, _py(IDLE_GUEST), devices=dev, cwd=REPO, on_output=on_output)
    b = guests[1] = lab.guest(1, _py(KICKER_GUEST), devices=dev, cwd=REPO)
    try:
        with a, b:
            a_id = int(a.wait_for_line(r"^id \d", timeout=180).split()[1])
            b_id = int(b.wait_for_line(r"^id \d", timeout=180).split()[1])
            assert "DoorbellNotifier blocking" in a.output
            a.wait_for_line("^blocking 1$", timeout=60)
            time.sleep(0.5)  # A is asleep in the UIO read by now
            host.send(b_id, str(a_id).encode())
            a.wait_for_line("^woke 1 ", timeout=60)
            a.wait_for_line("^blocking 2$", timeout=60)
            time.sleep(0.5)
            host.send(a_id, b"host")
            host.send(b_id, b"bye")
            ra, rb = a.wait(60), b.wait(60)
    finally:
        host.close()
    out = _check(ra)
    _check(rb)
    m = re.search(r"^idle (\S+) s cpu (\S+) s waits (\d+) wakeups (\d+) timeouts (\d+)$", out, re.M)
    assert m, out
    idle_s, cpu_s, waits, wakeups, timeouts = (float(x) for x in m.groups())
    assert 1.9 < idle_s < 3.0
    # Blocked: the only wake-ups are the endpoint's peer checks every WATCH_SLICE (50 ms).
    assert wakeups == 0 and waits <= idle_s / 0.05 + 5 and timeouts == waits
    assert cpu_s <= 0.2 * idle_s, out  # a polling loop would burn the whole 2 s
    (t0, q0), (t1, q1) = marks["idle-begin"], marks["idle-end"]
    qemu_share = (q1 - q0) / (t1 - t0)
    print(
        f"guest blocked {idle_s:.2f} s: guest CPU {cpu_s:.3f} s, {int(waits)} notifier waits"
        f" (peer checks every 50 ms), {int(wakeups)} interrupts; QEMU's host CPU meanwhile"
        f" {q1 - q0:.2f} s over {t1 - t0:.2f} s ({qemu_share:.0%} of one core, {ra.accel})"
    )
    assert re.search(rf"^woke 1 by guest from {b_id} interrupts [1-9]", out, re.M), out
    assert re.search(r"^woke 2 by host from \d interrupts [1-9]", out, re.M), out
    assert f"woke 2 by host from {host.peer_id} " in out
    for line in re.findall(r"^woke .*$", out, re.M):
        print(line)


# Sender (guest 0) streams to the receiver until powered off. Receiver (guest 1) checks each
# message, reports PeerLostError, then waits for a new incarnation in that slot and talks to it.
STREAM_SENDER = """
    import time
    import guest_lib
    ep = guest_lib.attach()
    print("id", ep.peer_id, flush=True)
    while not ep.peers():
        time.sleep(0.01)
    other = ep.peers()[0]
    sizes = [64, 4096, 65536, 1 << 20]
    i = 0
    while True:
        n = sizes[i % len(sizes)]
        ep.send(other, i.to_bytes(8, "little") * (n // 8))
        i += 1
"""

STREAM_RECEIVER = """
    import time
    import guest_lib
    from ivshmem_comm import layout
    from ivshmem_comm.errors import PeerLostError
    ep = guest_lib.attach()
    print("id", ep.peer_id, flush=True)
    while not ep.peers():
        time.sleep(0.01)
    sender = ep.peers()[0]
    sizes = [64, 4096, 65536, 1 << 20]
    i = 0
    try:
        while True:
            with ep.recv(source=sender) as m:
                n = sizes[i % len(sizes)]
                assert bytes(m.data) == i.to_bytes(8, "little") * (n // 8), i
            i += 1
            if i == 200:
                print("streaming", flush=True)
    except PeerLostError as exc:
        print(f"lost {type(exc).__name__} after {i} messages: {exc}", flush=True)
    old = ep.region.peer(sender)
    print("slot", layout.PEER_STATE_NAMES[old.state], old.incarnation, flush=True)
    while True:  # wait for somebody new in that slot
        state, inc = ep.region.peer_state(sender)
        if inc != old.incarnation and state in (layout.PEER_JOINING, layout.PEER_READY):
            break
        time.sleep(0.01)
    with ep.recv(source=sender, timeout=120) as m:
        text = bytes(m.data).decode()
    print(f"rejoined {sender} incarnation {ep.region.peer(sender).incarnation}: {text}",
          flush=True)
    ep.send(sender, b"welcome")
    ep.close()
"""

NEWCOMER = """
    import time
    import guest_lib
    ep = guest_lib.attach()
    print("id", ep.peer_id, "incarnation", ep.incarnation, flush=True)
    while not ep.peers():
        time.sleep(0.01)
    other = ep.peers()[0]
    ep.send(other, b"hello from the new guest")
    with ep.recv(source=other, timeout=60) as m:
        print("reply", bytes(m.data).decode(), flush=True)
    ep.close()
"""


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_guest_power_off_mid_stream(lab: L.Lab, broker: BrokerProcess) -> None:
    dev = [L.DoorbellDevice(broker.socket, 2)]
    seen: dict[str, float] = {}

    def on_output(index: int, line: str) -> None:
        if index == 1 and line.startswith("lost "):
            seen["lost"] = time.monotonic()

    sender = lab.guest(0, _py(STREAM_SENDER), devices=dev, cwd=REPO)
    receiver = lab.guest(1, _py(STREAM_RECEIVER), devices=dev, cwd=REPO, on_output=on_output)
    with sender, receiver:
        s_id = int(sender.wait_for_line(r"^id \d", timeout=180).split()[1])
        receiver.wait_for_line("^streaming$", timeout=120)
        t_kill = time.monotonic()
        sender.kill()  # hard power-off: SIGKILL to QEMU
        lost = receiver.wait_for_line("^lost ", timeout=30)
        detect = seen.get("lost", time.monotonic()) - t_kill
        slot = receiver.wait_for_line("^slot ", timeout=30)
        with lab.guest(2, _py(NEWCOMER), devices=dev, cwd=REPO) as newcomer:
            rn = newcomer.wait(180)
        rr = receiver.wait(60)
        rs = sender.wait(10)
    assert rs.killed
    assert "PeerLostError" in lost and "dead" in lost, lost
    assert slot.startswith("slot dead 1"), slot
    out_n = _check(rn)
    assert f"id {s_id} incarnation 2" in out_n, out_n  # the freed slot, a new incarnation
    assert "reply welcome" in out_n
    assert f"rejoined {s_id} incarnation 2: hello from the new guest" in rr.output, rr.console
    print(f"power-off seen by the other guest {detect * 1000:.0f} ms after the kill: {lost}")
    print(f"newcomer booted in {rn.boot_seconds:.1f} s and took slot {s_id}, incarnation 2")
    # The survivor's QEMU must live through the newcomer's departure: QEMU 7.2's
    # close_peer_eventfds() leaves a freed pointer behind, so a reused ivshmem id would be
    # freed twice. The broker hands out ids that only increase (slots are reused, ids not).
    _check(rr)


# Two jobs: each guest lists the ivshmem devices it can see, attaches with no arguments,
# is refused the other job's region, and exchanges content-checked messages with its partner.
ISOLATION = """
    import sys, time
    import guest_lib
    from guest_lib import pci
    from guest_lib.attach import AttachError
    mine, theirs = sys.argv[1], sys.argv[2]
    print("devices", ",".join(f"{d.bdf}={pci.region_info(d).name}" for d in pci.scan()),
          flush=True)
    ep = guest_lib.attach()
    print("region", ep.region.name, flush=True)
    try:
        guest_lib.attach(region=theirs)
        print("other job reachable!")
    except AttachError as exc:
        print("refused", str(exc).splitlines()[0], flush=True)
    while not ep.peers():
        time.sleep(0.01)
    other = ep.peers()[0]
    first = ep.peer_id < other
    for i in range(200):
        payload = f"{mine}:{i}:".encode() * (1 + i * 37 % 500)
        if first:
            ep.send(other, payload)
        with ep.recv(source=other, timeout=60) as m:
            assert bytes(m.data) == payload, i
        if not first:
            ep.send(other, payload)
    print("exchanged 400 with peer", other, "in", ep.region.name, flush=True)
    ep.close()
"""


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_two_jobs_see_only_their_own_region(lab: L.Lab, tmp_path: Path) -> None:
    jobs = [
        BrokerProcess(tmp_path / "job1", size="4M", max_peers=2, vectors=1),
        BrokerProcess(tmp_path / "job2", size="4M", max_peers=2, vectors=1),
    ]
    try:
        for job in jobs:
            job.start()
        names = [job.name for job in jobs]
        commands = [
            _py(ISOLATION, names[g // 2], names[1 - g // 2]) for g in range(4)
        ]  # guests 0, 1: job1; guests 2, 3: job2
        results = lab.run_many(
            commands,
            guest_devices=[[L.DoorbellDevice(jobs[g // 2].socket, 1)] for g in range(4)],
            cwd=REPO,
            timeout=300,
        )
    finally:
        for job in jobs:
            job.cleanup()
    for g, r in enumerate(results):
        out = _check(r)
        mine, theirs = names[g // 2], names[1 - g // 2]
        devices = re.search(r"^devices (.*)$", out, re.M)
        assert devices and devices[1].count("=") == 1 and devices[1].endswith(f"={mine}"), out
        assert theirs not in devices[1]
        assert f"region {mine}\n" in out
        assert f"refused no ivshmem region found for region='{theirs}'" in out
        assert re.search(rf"^exchanged 400 with peer [01] in {mine}$", out, re.M), out
        print(f"vm{g} (boot {r.boot_seconds:.1f} s): {devices[0]}")
