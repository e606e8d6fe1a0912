"""Fault storm: `kill -9` peers and the broker at random while traffic runs; check what survives.

    python -m tools.storm --kills 50
    python -m tools.storm --kills 8 --via region          # no broker: peers only

A broker serves one region; `--peers` (4) `tools.traffic` processes join it through its socket
and talk to each other (sizes 0 B .. `--max-size`, every message checked as in tools.soak).
Then, `--kills` times, after a random pause, the storm SIGKILLs either the broker (a share
`--broker-share` of the kills; it is restarted at once with the same state dir and re-adopts
the region, its clients reclaim their slots) or a random peer, reaped at once and replaced
by a new peer process that joins the region. At the end every peer exchanges a FIN with every
other, exits, and the storm checks that every slot can be claimed again.

Checked, exit 1 on any violation: no message lost, duplicated, reordered, corrupted or
misaddressed between live peers (sequence numbers and digests, FIN counts at the end); every
partner of a killed peer (a peer that had talked to that incarnation and lived on for a
second) got PeerLostError for it within `--latency-limit-ms` (100 ms), measured with
CLOCK_REALTIME from the kill or, where messages the victim sent before it died were still
being delivered (they come first, by design), from the last of them; both distributions
are printed; all survivors exit 0; every slot is
reclaimable afterwards. PeerLostError without a session to lose ("spurious") is counted and
reported, and is a violation with `--strict`. Exit 2 if the storm itself could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import ivshmem_comm as ic
from tools import harness
from tools.harness import MiB

JOIN_TIMEOUT = 30.0  # s: a replacement peer joining
STOP_WAIT = 120.0  # s: peers finishing their FIN exchange
SURVIVAL_S = 1.0  # a partner must live this long after a kill to be held to the latency bound


class Storm:
    """One storm run in `workdir`; `run()` returns the violations."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = np.random.default_rng(args.seed)
        self.name = f"storm-{os.getpid()}"
        self.stop = workdir / "stop"
        self.broker: harness.Broker | None = None
        self.region: ic.Region | None = None
        self.peers: list[harness.Managed] = []  # every peer process ever started
        self.born: dict[str, float] = {}
        self.slots: dict[str, int] = {}  # without a broker: the slot each peer was given
        self.died: dict[str, float] = {}
        self.kills: list[dict[str, Any]] = []
        self.broker_restart_s: list[float] = []
        self.violations: list[str] = []

    # ------------------------------------------------------------------ processes
    def live(self) -> list[harness.Managed]:
        return [p for p in self.peers if p.label not in self.died]

    def spawn(self) -> harness.Managed:
        index = len(self.peers)
        if self.broker is not None:
            place: dict[str, Any] = {"socket": self.broker.socket}
        else:  # the lowest slot no live peer was given (a victim's, once it is killed)
            given = {self.slots[p.label] for p in self.live()}
            place = {"region": self.name, "slot": min(set(range(self.args.peers)) - given)}
            self.slots[f"peer-{index}"] = place["slot"]
        peer = harness.spawn_peer(self.workdir, index, self.stop, self.args.max_size, **place)
        self.peers.append(peer)
        self.born[peer.label] = time.time()
        return peer

    def wait_joined(self, peers: list[harness.Managed]) -> None:
        assert self.region is not None
        region = self.region

        def joined() -> bool:
            for p in peers:
                if p.proc.poll() is not None:
                    err = (self.workdir / f"{p.label}.err").read_text()[-1500:]
                    raise RuntimeError(f"{p.label} exited {p.proc.returncode} joining: {err}")
            return all(harness.slot_of(region, p.pid) for p in peers)

        harness.wait_until(joined, JOIN_TIMEOUT, "peers to join")

    def kill_peer(self) -> None:
        assert self.region is not None
        live = self.live()
        victim = live[int(self.rng.integers(len(live)))]
        held = harness.slot_of(self.region, victim.pid)
        t = victim.kill()
        self.died[victim.label] = t
        if held is None:
            self.violations.append(f"{victim.label} held no READY slot when killed")
            return
        self.kills.append(
            {"kind": "peer", "label": victim.label, "slot": held[0], "inc": held[1], "t": t}
        )
        self.wait_joined([self.spawn()])

    def kill_broker(self) -> None:
        assert self.broker is not None and self.broker.process is not None
        t = self.broker.process.kill()
        self.kills.append({"kind": "broker", "t": t})
        start = time.monotonic()
        self.broker.start()
        self.broker_restart_s.append(time.monotonic() - start)

    # ------------------------------------------------------------------ the run
    def run(self) -> list[str]:
        args = self.args
        try:
            size = args.region_mib * MiB
            if args.via == "broker":
                self.broker = harness.Broker(self.workdir, self.name, size, args.peers)
                self.broker.start()
                self.region = ic.Region.open(self.name)
            else:
                self.region = ic.Region.create(self.name, size, args.peers)
            harness.check_region_geometry(self.region, args.max_size)
            for _ in range(args.peers):
                self.spawn()
            self.wait_joined(self.live())
            for _ in range(args.kills):
                time.sleep(self.rng.uniform(args.pause_min, args.pause_max))
                gone = [p.label for p in self.live() if p.proc.poll() is not None]
                if gone:
                    raise RuntimeError(f"{', '.join(gone)} exited during the storm")
                if self.broker is not None and self.rng.random() < args.broker_share:
                    self.kill_broker()
                else:
                    self.kill_peer()
            time.sleep(args.pause_max)  # the last victim's partners notice it
            self.wait_joined(self.live())
            self.finish()
            self.check_reclaim()
        finally:
            for p in self.live():
                if p.proc.poll() is None:
                    p.kill()
            if self.broker is not None:
                self.broker.stop()
            if self.region is not None:
                self.region.close()
            harness.destroy_region(self.name, args.peers)
            self.stop.unlink(missing_ok=True)
        return self.violations

    def finish(self) -> None:
        """Stop the traffic (FIN exchange) and wait for every live peer."""
        self.stop.touch()
        deadline = time.monotonic() + STOP_WAIT
        for p in self.live():
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except Exception:
                p.kill()
                self.violations.append(f"{p.label} did not finish within {STOP_WAIT} s")
            if p.proc.returncode != 0:
                self.violations.append(f"{p.label} exited {p.proc.returncode}")

    def check_reclaim(self) -> None:
        """Every slot can be claimed again, all at once (through the broker if there is one)."""
        endpoints: list[ic.Endpoint] = []
        try:
            for slot in range(self.args.peers):
                if self.broker is not None:
                    from guest_lib.host_client import attach

                    endpoints.append(attach(self.broker.socket, timeout=10))
                else:
                    assert self.region is not None
                    endpoints.append(self.region.endpoint(slot))
        except (ic.IvshmemError, OSError) as error:
            self.violations.append(f"slot reclaim: {len(endpoints)} claimed, then {error!r}")
        slots = sorted(ep.peer_id for ep in endpoints)
        if slots != list(range(self.args.peers)):
            self.violations.append(f"slot reclaim: claimed slots {slots}")
        for ep in endpoints:
            ep.close()

    # ------------------------------------------------------------------ analysis
    def report(self) -> list[float]:
        """Print the summary; add the log findings to the violations; return the latencies.
        The kills (kind, victim, slot, incarnation, CLOCK_REALTIME) go to kills.json beside
        the peers' logs (kept with --keep)."""
        (self.workdir / "kills.json").write_text(json.dumps(self.kills, indent=1))
        events = {p.label: p.events() for p in self.peers}
        spurious = 0
        for label, evs in events.items():
            for e in evs:
                if e["event"] == "violation":
                    self.violations.append(f"{label}: {e['what']}")
                spurious += e["event"] == "spurious"
        latencies: list[float] = []
        after_drain: list[float] = []
        for kill in self.kills:
            if kill["kind"] != "peer":
                continue
            for label, evs in events.items():
                if label == kill["label"] or self.born[label] > kill["t"]:
                    continue
                if self.died.get(label, float("inf")) < kill["t"] + SURVIVAL_S:
                    continue
                own = (kill["slot"], kill["inc"])
                talked = any(
                    e["event"] == "talk"
                    and (e["peer"], e["peer_inc"]) == own
                    and e["t"] < kill["t"]
                    for e in evs
                )
                seen = [
                    (e["t"] - kill["t"], e["t"] - max(kill["t"], e["last_recv"]))
                    for e in evs
                    if e["event"] == "lost" and (e["peer"], e["peer_inc"]) == own
                ]
                if seen:
                    latencies.append(seen[0][0])
                    after_drain.append(seen[0][1])
                    if seen[0][1] * 1000 > self.args.latency_limit_ms:
                        self.violations.append(
                            f"{label} got PeerLostError for {kill['label']} (slot {own[0]}, "
                            f"incarnation {own[1]}) {seen[0][0] * 1000:.1f} ms after the kill, "
                            f"{seen[0][1] * 1000:.1f} ms after its last message"
                        )
                elif talked:
                    self.violations.append(
                        f"{label} never got PeerLostError for {kill['label']} (slot {own[0]}, "
                        f"incarnation {own[1]})"
                    )
        if spurious and self.args.strict:
            self.violations.append(f"{spurious} PeerLostErrors with no session to lose")
        sent = sum(e["sent"] for evs in events.values() for e in evs if e["event"] == "summary")
        peer_kills = sum(k["kind"] == "peer" for k in self.kills)
        print(
            f"== storm via {self.args.via}: {len(self.kills)} kills ({peer_kills} peers, "
            f"{len(self.kills) - peer_kills} broker), {len(self.peers)} peer processes, "
            f"{sent} messages sent by the survivors"
        )
        for what, values in (("the kill", latencies), ("the later of the kill and the "
                             "victim's last message", after_drain)):  # fmt: skip
            if values:
                ms = [x * 1000 for x in values]
                print(
                    f"  PeerLostError after {what}: {len(ms)} partners, min {min(ms):.1f} ms, "
                    f"median {harness.percentile(ms, 0.5):.1f}, p90 "
                    f"{harness.percentile(ms, 0.9):.1f}, p99 {harness.percentile(ms, 0.99):.1f}, "
                    f"max {max(ms):.1f} ms"
                )
        if self.broker_restart_s:
            print(
                f"  broker restarts: {len(self.broker_restart_s)}, serving again after "
                f"{max(self.broker_restart_s):.2f} s at most"
            )
        print(f"  spurious PeerLostErrors (no session to lose): {spurious}")
        print(f"  load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        late = sum(x * 1000 > self.args.latency_limit_ms for x in after_drain)
        print(
            f"  violations: {len(self.violations)} ({late} PeerLostErrors later than "
            f"{self.args.latency_limit_ms:.0f} ms, {len(self.violations) - late} others)"
        )
        for what in self.violations[:50]:
            print(f"  VIOLATION {what}")
        return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.storm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--via", choices=["broker", "region"], default="broker")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--broker-share", type=float, default=0.2, help="share of broker kills")
    parser.add_argument("--max-size", type=int, default=256 << 10, help="largest payload, bytes")
    parser.add_argument("--region-mib", type=int, default=64, help="region size, MiB")
    parser.add_argument("--pause-min", type=float, default=0.2, help="s between kills, at least")
    parser.add_argument("--pause-max", type=float, default=0.6, help="s between kills, at most")
    parser.add_argument("--latency-limit-ms", type=float, default=100.0)
    parser.add_argument("--strict", action="store_true", help="spurious PeerLostError fails")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", metavar="DIR", help="keep the logs in DIR (made if missing)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        storm = Storm(args, workdir)
        try:
            storm.run()
        except (RuntimeError, ValueError, OSError) as error:
            storm.report()
            print(f"storm: cannot run: {error}", file=sys.stderr)
            return 2
        storm.report()
    print(f"storm: {'FAILED' if storm.violations else 'OK'}, {len(storm.violations)} violations")
    return 1 if storm.violations else 0


if __name__ == "__main__":
    sys.exit(main())
