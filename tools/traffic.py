"""One traffic peer of the soak and the storm: a real process that talks to every other peer.

    python -m tools.traffic --region NAME --slot N --log FILE --stop FILE [--max-size BYTES]
    python -m tools.traffic --socket PATH --log FILE --stop FILE      (through a broker)

Every message carries a HEADER: who sent it to whom (slots and incarnations), a sequence
number per session (sender incarnation, receiver incarnation) starting at 0, its flags, its
tag, its payload length and a BLAKE2b-128 digest of its payload. Sizes run from 0 B to
`--max-size`, tags over the whole range 0..TAG_MAX. Each round sends one message to every
READY peer (a short timeout: a full queue is back-pressure, the message waits for the next
round) and then receives from ANY_SOURCE and from each peer by name, into a buffer or as
zero-copy views. The receiver checks every field: a sequence number other than
the next one is a lost, duplicated or reordered message, a digest mismatch a corrupted one.

The peer writes JSON lines to `--log`: `talk` (first contact with an incarnation of a peer),
`lost` (PeerLostError for the incarnation it talked to, with CLOCK_REALTIME `t` and
`last_recv`, when the last message from that peer arrived), `spurious`
(PeerLostError with no session to lose), `finished` (a peer left after its FIN), `violation`,
and a final `summary`. When the `--stop` file appears it sends a FIN (sequence number =
messages sent in the session) to every READY peer, keeps receiving until it has a FIN from
each of them, closes and exits: 0 if it saw no violation, 1 otherwise.

Messages are always sent whole (the drivers pick a geometry where the largest one is
contiguous), so a timed-out send leaves nothing half sent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from typing import Any

import numpy as np

import ivshmem_comm as ic
from ivshmem_comm import layout

HEADER = struct.Struct("<IHHIIQIiQ16s")
# magic, src slot, dst slot, src incarnation, dst incarnation, seq, flags, tag, length, digest
MAGIC = 0x4B434154  # b"TACK"
F_FIN = 1
PATTERN_SPAN = 1 << 16  # payloads start at one of this many offsets of the pattern
# A round blocks at most once, in its ANY_SOURCE receive: on a loaded machine every sleep costs
# a trip through the scheduler, and the time to notice a lost peer is about one round.
SEND_TIMEOUT = 0.0  # s: a full queue is back-pressure: the message is retried next round
ANY_TIMEOUT = 0.0005  # s: the ANY_SOURCE receive that finds nothing waits this long
NAMED_TIMEOUT = 0.0001  # s: a named receive: past the spin (which checks the peer), barely
MAX_PULL = 4  # messages received per source per round
STOP_TIMEOUT = 60.0  # s: the most the FIN exchange may take once the stop file appears
_READY = layout.PEER_READY


def pattern(max_size: int) -> np.ndarray:
    """The byte pattern payloads are cut from (the same in every process)."""
    return np.random.default_rng(0x50AC).integers(0, 256, max_size + PATTERN_SPAN, np.uint8)


def pick_size(rng: np.random.Generator, max_size: int) -> int:
    """A message size: 0 B and `max_size` sometimes, mostly small, now and then large."""
    r = rng.random()
    bounds = (
        (0.02, 0, 0),
        (0.03, max_size, max_size),
        (0.50, 1, 256),
        (0.80, 257, 64 << 10),
        (0.95, 64 << 10, 1 << 20),
        (1.01, 1 << 20, max_size),
    )
    for limit, low, high in bounds:
        if r < limit:
            low, high = min(low, max_size), min(high, max_size)
            return int(rng.integers(low, high + 1))
    raise AssertionError("unreachable")


def pick_tag(rng: np.random.Generator) -> int:
    """A tag over the whole range, its two ends included often."""
    r = rng.random()
    if r < 0.05:
        return layout.TAG_MIN
    if r < 0.10:
        return layout.TAG_MAX
    return int(rng.integers(layout.TAG_MIN, layout.TAG_MAX + 1))


def digest(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class TrafficPeer:
    """The state of one traffic peer on endpoint `ep`; `run()` until the stop file appears."""

    def __init__(self, ep: ic.Endpoint, max_size: int, log: Any, seed: int) -> None:
        self.ep = ep
        self.region = ep.region
        self.me = ep.peer_id
        self.inc = ep.incarnation
        n = self.region.max_peers
        self.others = [p for p in range(n) if p != self.me]
        self._word_i = [self.region.peer_slot_offset(p) // 8 for p in range(n)]
        self.max_size = max_size
        self.pattern = pattern(max_size)
        self.scratch = np.empty(HEADER.size + max_size, np.uint8)
        self.rng = np.random.default_rng(seed)
        self.log = log
        self.send_inc = [0] * n  # receiver incarnation of our current sending session
        self.send_seq = [0] * n
        self.pending: list[tuple[bytearray, int, bool] | None] = [None] * n
        self.recv_inc = [0] * n
        self.recv_next = [0] * n
        self.talk = [0] * n  # incarnation of the peer we have a session with; 0: none
        self.last_recv = [0.0] * n  # CLOCK_REALTIME of the last message received from each
        self.stopping = False
        self.fin_to: set[int] = set()
        self.fin_sent: set[int] = set()
        self.fin_from: set[int] = set()
        self.counts = {"sent": 0, "sent_bytes": 0, "received": 0, "received_bytes": 0}
        self.lost = 0
        self.spurious = 0
        self.violations: list[str] = []
        self._taken = 0

    # ------------------------------------------------------------------ events
    def event(self, kind: str, **fields: Any) -> None:
        self.log.write(json.dumps({"event": kind, "slot": self.me, "inc": self.inc, **fields}))
        self.log.write("\n")
        self.log.flush()

    def violation(self, what: str) -> None:
        self.violations.append(what)
        self.event("violation", what=what, t=time.time())

    def _talking(self, p: int, incarnation: int) -> None:
        if self.talk[p] != incarnation:
            self.talk[p] = incarnation
            self.event("talk", peer=p, peer_inc=incarnation, t=time.time())

    def _lost(self, p: int, error: ic.PeerLostError) -> None:
        now = time.time()
        if self.stopping and p in self.fin_from:
            self.event("finished", peer=p, t=now)  # it left after its FIN: not a loss
        elif self.talk[p]:
            self.lost += 1
            self.event(
                "lost", peer=p, peer_inc=self.talk[p], t=now, last_recv=self.last_recv[p],
                detail=error.detail,
            )  # fmt: skip
            self.talk[p] = 0
        else:
            self.spurious += 1
            self.event("spurious", peer=p, t=now, detail=error.detail)
        self.send_inc[p] = 0
        self.pending[p] = None

    # ------------------------------------------------------------------ sending
    def _make(self, p: int, fin: bool) -> tuple[bytearray, int, bool]:
        size = 0 if fin else pick_size(self.rng, self.max_size)
        tag = pick_tag(self.rng)
        seq = self.send_seq[p]
        start = (seq * 7919 + self.me * 104729) % PATTERN_SPAN
        payload = self.pattern[start : start + size]
        message = bytearray(HEADER.size + size)
        message[HEADER.size :] = payload.data
        HEADER.pack_into(
            message, 0, MAGIC, self.me, p, self.inc, self.send_inc[p], seq,
            F_FIN if fin else 0, tag, size, digest(payload.data),
        )  # fmt: skip
        return message, tag, fin

    def send_round(self) -> None:
        for p in self.others:
            if p in self.fin_sent:
                continue
            word = self.region.u64[self._word_i[p]]
            incarnation = word >> 32
            if word & 0xFFFFFFFF != _READY or (self.stopping and p not in self.fin_to):
                continue
            if incarnation != self.send_inc[p]:
                self.send_inc[p], self.send_seq[p], self.pending[p] = incarnation, 0, None
            if self.pending[p] is None:
                self.pending[p] = self._make(p, fin=self.stopping)
            message, tag, fin = self.pending[p]  # type: ignore[misc]
            try:
                self.ep.send(p, message, tag=tag, timeout=SEND_TIMEOUT)
            except ic.TimeoutError:
                continue  # back-pressure: the same message goes next round
            except ic.PeerLostError as error:
                self._lost(p, error)
                continue
            except ic.RingCorruptError as error:
                self.violation(f"send to {p}: {error}")
                continue
            self._talking(p, incarnation)
            self.send_seq[p] += 1
            self.pending[p] = None
            self.counts["sent"] += 1
            self.counts["sent_bytes"] += len(message) - HEADER.size
            if fin:
                self.fin_sent.add(p)

    # ------------------------------------------------------------------ receiving
    def _recv_one(self, source: int) -> None:
        timeout = ANY_TIMEOUT if source == ic.ANY_SOURCE else NAMED_TIMEOUT
        self._taken += 1
        if self._taken % 2:
            n, src, tag = self.ep.recv_into(self.scratch, source, ic.ANY_TAG, timeout)
            self.check(src, tag, memoryview(self.scratch)[:n])
        else:
            with self.ep.recv(source, ic.ANY_TAG, timeout) as message:
                self.check(message.source, message.tag, message.data)

    def recv_round(self) -> None:
        """Receive from ANY_SOURCE, then from each peer by name that is READY or that we have
        a session with (a named receive is what reports a lost peer)."""
        named = [
            p
            for p in self.others
            if self.talk[p] or self.region.u64[self._word_i[p]] & 0xFFFFFFFF == _READY
        ]
        for source in [ic.ANY_SOURCE, *named]:
            for _ in range(MAX_PULL):
                try:
                    self._recv_one(source)
                except ic.TimeoutError:
                    break
                except ic.PeerLostError as error:
                    self._lost(error.peer, error)
                    break
                except (ic.RingCorruptError, ic.MessageTooLargeError) as error:
                    self.violation(f"receive from {source}: {error}")
                    break

    def check(self, src: int, tag: int, data: Any) -> None:
        """Check one received message against its header; record violations."""
        if len(data) < HEADER.size:
            self.violation(f"from {src}: {len(data)}-byte message has no header")
            return
        (magic, s_slot, d_slot, s_inc, d_inc, seq, flags, h_tag, length, want) = HEADER.unpack_from(
            data
        )
        payload = data[HEADER.size :]
        where = f"from {src} (incarnation {s_inc}) seq {seq}"
        if magic != MAGIC or s_slot != src or d_slot != self.me or h_tag != tag:
            self.violation(f"{where}: header {magic:#x} {s_slot}->{d_slot} tag {h_tag}/{tag}")
            return
        if d_inc != self.inc:
            self.violation(f"{where}: addressed to incarnation {d_inc}, not {self.inc}")
        if length != len(payload) or digest(payload) != want:
            self.violation(f"{where}: corrupted ({len(payload)} of {length} bytes)")
        if s_inc != self.recv_inc[src]:
            if self.recv_inc[src] and s_inc < self.recv_inc[src]:
                self.violation(f"{where}: older than incarnation {self.recv_inc[src]}")
            if seq != 0:
                self.violation(f"{where}: a new session starts at seq {seq}, not 0")
            self.recv_inc[src] = s_inc
        elif seq != self.recv_next[src]:
            kind = "lost" if seq > self.recv_next[src] else "duplicated or reordered"
            self.violation(f"{where}: expected seq {self.recv_next[src]} ({kind})")
        self.recv_next[src] = seq + 1
        self.last_recv[src] = time.time()
        self._talking(src, s_inc)
        self.counts["received"] += 1
        self.counts["received_bytes"] += len(payload)
        if flags & F_FIN:
            self.fin_from.add(src)

    # ------------------------------------------------------------------ main loop
    def _begin_stop(self) -> None:
        self.stopping = True
        self.fin_to = {
            p for p in self.others if self.region.u64[self._word_i[p]] & 0xFFFFFFFF == _READY
        }
        for p in self.fin_to:  # a message not sent yet is replaced by the FIN
            self.pending[p] = None
        self.event("stopping", fin_to=sorted(self.fin_to), t=time.time())

    def run(self, stop_path: str) -> None:
        rounds = 0
        stop_deadline = 0.0
        while True:
            if not self.stopping and rounds % 8 == 0 and os.path.exists(stop_path):
                self._begin_stop()
                stop_deadline = time.monotonic() + STOP_TIMEOUT
            self.send_round()
            self.recv_round()
            rounds += 1
            if self.stopping:
                if self.fin_sent >= self.fin_to and self.fin_from >= self.fin_to:
                    break
                if time.monotonic() > stop_deadline:
                    self.violation(
                        f"stop: FIN sent to {sorted(self.fin_sent)}, received from "
                        f"{sorted(self.fin_from)}, expected {sorted(self.fin_to)}"
                    )
                    break
        self.event(
            "summary", rounds=rounds, lost=self.lost, spurious=self.spurious,
            violations=len(self.violations), t=time.time(), **self.counts,
        )  # fmt: skip


def _join(args: argparse.Namespace) -> tuple[ic.Endpoint, ic.Region | None]:
    if args.socket:
        from guest_lib.host_client import attach

        return attach(args.socket, timeout=30), None
    region = ic.Region.open(args.region)
    deadline = time.monotonic() + 30
    while True:
        try:
            return region.endpoint(args.slot), region
        except ic.PeerSlotBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.traffic", description=__doc__)
    parser.add_argument("--region", help="region name (plain Region, with --slot)")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--socket", help="broker socket (instead of --region)")
    parser.add_argument("--log", required=True)
    parser.add_argument("--stop", required=True, help="the run ends when this file exists")
    parser.add_argument("--max-size", type=int, default=16 << 20)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not (args.region or args.socket):
        parser.error("give --region or --socket")
    with open(args.log, "a") as log:
        ep, region = _join(args)
        peer = TrafficPeer(ep, args.max_size, log, args.seed or os.getpid())
        peer.event("joined", pid=os.getpid(), t=time.time())
        try:
            peer.run(args.stop)
        finally:
            ep.close()
            if region is not None:
                region.close()
    return 1 if peer.violations else 0


if __name__ == "__main__":
    sys.exit(main())
