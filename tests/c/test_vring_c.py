"""Our queues against Linux's own <linux/virtio_ring.h>, with a C peer in a separate process.

tests/c/vring_device.c and tests/c/vring_driver.c are compiled here (gcc, into a temporary
directory), map the region's POSIX shm object, `vring_init()` at the queue's ring offset and
check that `vring_size()` and the avail/used offsets equal the layout's. Then, concurrently
with Python:
(a) the C program is the device of a queue whose driver is a Python TxRing;
(b) the C program is the driver of a queue whose device is a Python RxRing.
Both sides use EVENT_IDX (`vring_need_event`, `vring_avail_event`, `vring_used_event`) and
kick each other through pipes; every sleep must be ended by a kick within 10 s (no lost
wake-up) and the kick counts of the two sides must agree. Both Python implementations.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ivshmem_comm import layout, virtqueue

try:
    from ivshmem_comm import _fastpath
except ImportError:
    if os.environ.get("IVSHMEM_COMM_REQUIRE_FASTPATH") == "1":
        raise
    _fastpath = None

HEADER = Path("/usr/include/linux/virtio_ring.h")
SOURCES = Path(__file__).parent
SESSION = layout.session_word(11, 13)
COUNT = 70_000  # past 65535: the 16-bit indices wrap
PATTERN = bytes((i * 131 + 7) & 0xFF for i in range(1 << 17))
WAKE_TIMEOUT = 10.0

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not HEADER.exists(),
    reason="needs gcc and /usr/include/linux/virtio_ring.h",
)
IMPLS = [
    "py",
    pytest.param("c", marks=pytest.mark.skipif(_fastpath is None, reason="no _fastpath")),
]
# (queue_num, vring_align). Linux's vring_init() aligns the used ring on the *absolute*
# address, so the layout starts each ring on a multiple of vring_align.
SHAPES = [
    (64, 64),
    (256, 128),
    (256, 4096),
]


def payload(seq: int, size: int) -> bytes:
    """The pattern both C programs check and write: byte i is ((seq % 251 + i) * 131 + 7)."""
    start = seq % 251
    return PATTERN[start : start + size]


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("vring_c")
    built = {}
    for name in ("vring_device", "vring_driver"):
        exe = out / name
        subprocess.run(
            ["gcc", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-o", exe,
             SOURCES / f"{name}.c"],
            check=True,
        )  # fmt: skip
        built[name] = exe
    return built


def queue_args(region: Any, src: int, dst: int) -> list[str]:
    queue = next(q for q in region.describe()["queues"] if (q["src"], q["dst"]) == (src, dst))
    assert queue["ring_size"] == layout.vring_size(queue["num"], queue["align"])
    fields = ("offset", "ring_offset", "avail_offset", "used_offset", "num", "align", "ring_size")
    return [str(queue[f]) for f in fields] + [str(queue["data_offset"]), str(queue["data_size"])]


class Peer:
    """The C program: kicks go to its stdin and come from its stdout; it reports on stderr."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        self.kicks_in = 0  # kicks we received

    def kick(self) -> None:
        os.write(self.proc.stdin.fileno(), b"k")

    def wait_kick(self) -> None:
        """Sleep until the peer kicks us; a sleep no kick ends is a lost wake-up."""
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], WAKE_TIMEOUT)
        assert ready, f"lost wake-up: no kick within {WAKE_TIMEOUT} s; {self.stderr_now()}"
        got = os.read(fd, 4096)
        assert got, f"the C peer exited while we wait: {self.stderr_now()}"
        self.kicks_in += len(got)

    def stderr_now(self) -> str:
        if self.proc.poll() is None:
            return "(the C peer is still running)"
        return self.proc.stderr.read().decode()

    def finish(self) -> dict[str, int]:
        """Close our kick pipe, collect its last kicks and its report."""
        self.proc.stdin.close()
        while got := os.read(self.proc.stdout.fileno(), 4096):
            self.kicks_in += len(got)
        self.proc.wait(timeout=30)
        report = self.proc.stderr.read().decode().strip()
        assert self.proc.returncode == 0 and report.startswith("OK "), report
        return {k: int(v) for k, v in (item.split("=") for item in report.split()[1:])}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def tx_class(impl: str) -> Any:
    return virtqueue.TxRing if impl == "py" else _fastpath.TxRing


def rx_class(impl: str) -> Any:
    return virtqueue.RxRing if impl == "py" else _fastpath.RxRing


def message_size(seq: int, max_payload: int) -> int:
    """Mostly small messages, every tenth up to a whole span."""
    return (seq * 7919) % (max_payload + 1 if seq % 10 == 0 else min(200, max_payload) + 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_c_device_with_python_driver(
    programs: dict[str, Path], make_region: Any, impl: str, shape: tuple[int, int]
) -> None:
    num, align = shape
    region = make_region(512 << 10, 2, queue_num=num, vring_align=align)
    g = region.geometry
    tx = tx_class(impl)(region.buf, g.queue_offset(0, 1), g, 1)
    tx.reset(SESSION)
    argv = [str(programs["vring_device"]), region.name, *queue_args(region, 0, 1)]
    peer = Peer([*argv, str(SESSION), str(COUNT)])
    try:
        kicks_out = arms = sleeps = 0

        def wait_space() -> None:
            nonlocal arms, sleeps
            if tx.reclaim():
                return
            arms += 1
            if tx.arm():
                return
            sleeps += 1
            peer.wait_kick()

        while not tx.check_sync():
            assert peer.proc.poll() is None, peer.stderr_now()
        max_payload = g.max_span - layout.SPAN_HEADER_SIZE
        for seq in range(COUNT):
            data = payload(seq, message_size(seq, max_payload))
            while (status := tx.send_small(seq, data)) == virtqueue.SEND_FULL:
                wait_space()
            if status == virtqueue.SEND_KICK:
                kicks_out += 1
                peer.kick()
        while tx.in_flight:
            wait_space()
        report = peer.finish()
    finally:
        peer.kill()
    assert tx.broken is None
    assert report["messages"] == COUNT
    # Every kick we sent was asked for: at most one per avail_event the device published
    # (plus the 0 its reset left); every sleep of the device was ended by one of them.
    assert report["kicks_in"] == kicks_out == region.queue_counters(0, 1)["send_kicks"]
    assert report["sleeps"] <= kicks_out <= report["arms"] + 1
    # And the other way round.
    assert peer.kicks_in == report["kicks_out"]
    assert sleeps <= report["kicks_out"] <= arms + 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_c_driver_with_python_device(
    programs: dict[str, Path], make_region: Any, impl: str, shape: tuple[int, int]
) -> None:
    num, align = shape
    region = make_region(512 << 10, 2, queue_num=num, vring_align=align)
    g = region.geometry
    rx = rx_class(impl)(region.buf, g.queue_offset(1, 0), g, 1)
    rx.reset(SESSION)
    argv = [str(programs["vring_driver"]), region.name, *queue_args(region, 1, 0)]
    peer = Peer([*argv, str(g.max_span), str(SESSION), str(COUNT)])
    slot_bytes = min(g.max_span, g.data_size // num) // 16 * 16
    dest = bytearray(slot_bytes)
    kicks_out = arms = sleeps = received = 0

    def complete_held() -> None:
        nonlocal kicks_out
        if rx.held and rx.complete(rx.held):
            kicks_out += 1
            peer.kick()

    try:
        while received < COUNT:
            head = rx.poll_header()
            if head is None:
                complete_held()  # never sleep on spans the driver waits for
                arms += 1
                if rx.arm():
                    continue
                sleeps += 1
                peer.wait_kick()
                continue
            offset, length, total, tag = head
            assert (tag, total, length) == (received, received * 37 % (slot_bytes - 15), 16 + total)
            rx.read_into(offset + 16, dest, 0, total)
            assert dest[:total] == payload(received, total)
            received += 1
            if rx.held == 3:
                complete_held()
        complete_held()
        report = peer.finish()
    finally:
        peer.kill()
    assert rx.broken is None
    assert report["messages"] == COUNT
    assert report["kicks_in"] == kicks_out == region.queue_counters(1, 0)["recv_kicks"]
    assert report["sleeps"] <= kicks_out <= report["arms"] + 1
    assert peer.kicks_in == report["kicks_out"]
    assert sleeps <= report["kicks_out"] <= arms + 1
