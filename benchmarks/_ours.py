"""Our side of the benchmark: `python -m benchmarks._ours ping|pong REGION PLAN_JSON [--profile]`.

The parent creates the region; "ping" is peer 0, "pong" peer 1, each pinned to its own CPU.
For every size of the plan, in this order (both peers walk the same sequence):
- latency, view: ping sends a numpy buffer, pong receives the zero-copy view and replies from
  it (`send(0, msg.data)`) before releasing it, ping receives the view and releases it;
- latency, into: both sides `recv_into` a preallocated numpy buffer and pong replies from it;
- bandwidth, view / into (osu_bw): ping sends `window` messages back to back, pong receives
  each (view: receive and release, never reading the payload; into: copy out with
  `recv_into`) and sends one ACK_BYTES ack per window.
Each timed run follows a warmup; the first exchange of each latency run is content-checked.
Both peers first read every page of the region, so first-touch page faults do not land on
whichever run happens to come first.
Ping prints one JSON line (`_plan.emit`). With --profile, ping runs only the 8-byte latency
steps (both modes) under cProfile and reports the statistics instead.
"""

from __future__ import annotations

import cProfile
import io
import mmap
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import ivshmem_comm as ic
from benchmarks._plan import ACK_BYTES, Step, emit, pin, plan_from_json

MODES = ("view", "into")
Loop = Callable[[int], None]


def _check(got: Any, want: np.ndarray, what: str) -> None:
    if not np.array_equal(np.frombuffer(got, np.uint8), want):
        raise SystemExit(f"content check failed: {what}")


class Peer:
    """One side of the benchmark over endpoint `ep` (peer 0 pings, peer 1 pongs)."""

    def __init__(self, ep: ic.Endpoint) -> None:
        self.ep = ep
        self.other = 1 - ep.peer_id
        self.ack = np.zeros(ACK_BYTES, np.uint8)

    # --------------------------------------------------------------- latency loops
    def ping_loop(self, mode: str, sbuf: np.ndarray, rbuf: np.ndarray) -> Loop:
        """A function running n round trips from the pinging side."""
        send, recv, recv_into, other = self.ep.send, self.ep.recv, self.ep.recv_into, self.other

        def view(n: int) -> None:
            for _ in range(n):
                send(other, sbuf)
                recv(other).release()

        def into(n: int) -> None:
            for _ in range(n):
                send(other, sbuf)
                recv_into(rbuf, other)

        return view if mode == "view" else into

    def pong_loop(self, mode: str, rbuf: np.ndarray) -> Loop:
        """A function answering n round trips."""
        send, recv, recv_into, other = self.ep.send, self.ep.recv, self.ep.recv_into, self.other

        def view(n: int) -> None:
            for _ in range(n):
                message = recv(other)
                send(other, message.data)
                message.release()

        def into(n: int) -> None:
            for _ in range(n):
                nbytes = recv_into(rbuf, other)[0]
                send(other, rbuf[:nbytes])

        return view if mode == "view" else into

    def latency(self, mode: str, step: Step, profile: cProfile.Profile | None = None) -> float:
        """Run one latency step; on ping return the one-way latency in microseconds."""
        size = step.size
        rbuf = np.zeros(size, np.uint8)
        if self.ep.peer_id == 1:
            self.pong_loop(mode, rbuf)(1 + step.lat_warmup + step.lat_iters)
            return 0.0
        sbuf = np.arange(size, dtype=np.uint64).astype(np.uint8) ^ 0xA5
        self.ep.send(self.other, sbuf)  # content check of the first exchange
        if mode == "view":
            with self.ep.recv(self.other) as message:
                _check(message.data, sbuf, f"{size} B echoed from a view")
        else:
            n = self.ep.recv_into(rbuf, self.other)[0]
            _check(rbuf[:n], sbuf, f"{size} B echoed through recv_into")
        loop = self.ping_loop(mode, sbuf, rbuf)
        loop(step.lat_warmup)
        if profile is not None:
            profile.enable()
        start = time.perf_counter_ns()
        loop(step.lat_iters)
        elapsed = time.perf_counter_ns() - start
        if profile is not None:
            profile.disable()
        return elapsed / step.lat_iters / 2 / 1e3

    # --------------------------------------------------------------- bandwidth
    def bandwidth(self, mode: str, step: Step) -> float:
        """Run one osu_bw step; on ping return MB/s (10**6 bytes per second)."""
        ep, other, window, ack = self.ep, self.other, step.window, self.ack
        if ep.peer_id == 1:
            rbuf = np.zeros(step.size, np.uint8)
            recv, recv_into = ep.recv, ep.recv_into
            for _ in range(step.bw_warmup + step.bw_loops):
                if mode == "view":
                    for _ in range(window):
                        recv(other).release()
                else:
                    for _ in range(window):
                        recv_into(rbuf, other)
                ep.send(other, ack)
            return 0.0
        sbuf = np.full(step.size, 0x3C, np.uint8)
        send, recv = ep.send, ep.recv
        elapsed = 0
        for count, timed in ((step.bw_warmup, False), (step.bw_loops, True)):
            start = time.perf_counter_ns()
            for _ in range(count):
                for _ in range(window):
                    send(other, sbuf)
                recv(other).release()
            if timed:
                elapsed = time.perf_counter_ns() - start
        return step.size * window * step.bw_loops / (elapsed / 1e9) / 1e6


def _prefault(region: ic.Region) -> None:
    """Read one byte of every page of the region, so first-touch page faults of a fresh shm
    object (allocation and mapping) happen here rather than in whichever run comes first.
    A long-running job reuses its region; MPI reuses its buffers and its shm segment too.
    """
    pages = np.frombuffer(region.buf, np.uint8)[:: mmap.PAGESIZE]
    int(pages.sum())  # the reads are the point; the sum only keeps them from being elided
    del pages


def _wait_for_peer(ep: ic.Endpoint, other: int, timeout: float = 30.0) -> None:
    """Wait until `other` has joined, so the first receive does not race its join."""
    deadline = time.monotonic() + timeout
    while other not in ep.peers():
        if time.monotonic() > deadline:
            raise SystemExit(f"peer {other} did not join within {timeout:.0f} s")
        time.sleep(0.001)


def run(role: str, region_name: str, plan: list[Step], profile: bool) -> None:
    """Join region `region_name` as ping (peer 0) or pong (peer 1) and run `plan`."""
    peer_id = 0 if role == "ping" else 1
    cpu = pin(peer_id)
    region = ic.Region.open(region_name)
    _prefault(region)
    ep = region.endpoint(peer_id)
    try:
        _wait_for_peer(ep, 1 - peer_id)
        me = Peer(ep)
        if profile:
            prof = cProfile.Profile()
            steps = [s for s in plan if s.size == 8] or plan[:1]
            figures = {m: me.latency(m, s, prof) for s in steps for m in MODES}
            if peer_id == 0:
                out = io.StringIO()
                stats = pstats.Stats(prof, stream=out)
                stats.sort_stats("tottime").print_stats(30)
                emit(
                    {
                        "implementation": ic.IMPLEMENTATION,
                        "cpu": cpu,
                        "latency_us": figures,
                        "profile": out.getvalue(),
                    }
                )
            return
        result: dict[str, Any] = {"implementation": ic.IMPLEMENTATION, "cpu": cpu}
        for mode in MODES:
            result[f"lat_{mode}_us"] = {}
            result[f"bw_{mode}_MBps"] = {}
        for step in plan:
            for mode in MODES:
                result[f"lat_{mode}_us"][str(step.size)] = me.latency(mode, step)
            for mode in MODES:
                result[f"bw_{mode}_MBps"][str(step.size)] = me.bandwidth(mode, step)
        # The pong reports its CPU through a last message, so ping can tell whether both pinned.
        if peer_id == 1:
            ep.send(0, np.array([-1 if cpu is None else cpu], np.int64))
        else:
            with ep.recv(1) as message:
                result["pong_cpu"] = int(np.frombuffer(message.data, np.int64)[0])
            emit(result)
    finally:
        ep.close()
        region.close()


def main(argv: list[str]) -> None:
    """Command line: ping|pong REGION PLAN_JSON [--profile]."""
    if len(argv) < 3 or argv[0] not in ("ping", "pong"):
        raise SystemExit(__doc__)
    run(argv[0], argv[1], plan_from_json(argv[2]), "--profile" in argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
