"""Soak: traffic peers in real processes on one region for a bounded time, every message checked.

    python -m tools.soak --minutes 30            # by hand
    python -m tools.soak --seconds 20 --via region

`--peers` (4) processes of `tools.traffic` share one region, opened as a plain Region (slot
per peer) or joined through an `ivshmem-broker` (`--via broker`); `--via both` runs the two
one after the other, each for the whole duration. Sizes run from 0 B to `--max-size` (16 MiB),
tags over the whole range, receives from ANY_SOURCE and by name. Checked: 0 messages lost,
duplicated, reordered, corrupted or misaddressed (each peer checks sequence numbers per
session and BLAKE2b digests, and the FIN exchange at the end checks that every pair's last
message arrived), no PeerLostError (nobody dies here), every peer exits 0; and, sampled each
second, every process's file descriptors (equal from a quarter of the run to its end) and
anonymous RSS (growth from then to the end at most `--rss-limit-mib`). Prints a summary and
exits 1 on any violation, 2 if the run itself could not be set up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ivshmem_comm as ic
from tools import harness
from tools.harness import MiB

SETUP_TIMEOUT = 60.0  # s: peers joining
STOP_WAIT = 120.0  # s: peers finishing their FIN exchange after the stop file


def run_phase(via: str, seconds: float, args: argparse.Namespace, workdir: Path) -> list[str]:
    """One soak run through `via` ("region" or "broker"); print its summary, return the
    violations."""
    name = f"soak-{os.getpid()}-{via}"
    stop = workdir / "stop"
    broker: harness.Broker | None = None
    region: ic.Region | None = None
    watched: list[harness.Managed] = []
    peers: list[harness.Managed] = []
    violations: list[str] = []
    try:
        if via == "broker":
            broker = harness.Broker(workdir, name, args.region_mib * MiB, args.peers)
            watched.append(broker.start())
            region = ic.Region.open(name)
        else:
            region = ic.Region.create(name, args.region_mib * MiB, args.peers)
        harness.check_region_geometry(region, args.max_size)
        for i in range(args.peers):
            place = {"socket": broker.socket} if broker else {"region": name, "slot": i}
            peers.append(harness.spawn_peer(workdir, i, stop, args.max_size, **place))
        watched += peers
        harness.wait_until(
            lambda: (
                all(harness.slot_of(region, p.pid) for p in peers)
                or any(p.proc.poll() is not None for p in peers)
            ),
            SETUP_TIMEOUT,
            "the peers to join",
        )
        begin = time.monotonic()
        while (elapsed := time.monotonic() - begin) < seconds:
            for m in watched:
                s = harness.sample(m.pid, elapsed)
                if s is not None:
                    m.samples.append(s)
            dead = [m.label for m in watched if m.proc.poll() is not None]
            if dead:
                violations.append(f"{', '.join(dead)} exited during the run")
                break
            time.sleep(min(1.0, max(0.0, seconds - elapsed)))
        for m in watched:
            s = harness.sample(m.pid, time.monotonic() - begin)
            if s is not None:
                m.samples.append(s)
        stop.touch()
        deadline = time.monotonic() + STOP_WAIT
        for p in peers:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except Exception:
                p.kill()
                violations.append(f"{p.label} did not finish within {STOP_WAIT} s of the stop")
        violations += report(via, seconds, peers, broker, args.rss_limit_mib)
    finally:
        for p in peers:
            if p.proc.poll() is None:
                p.kill()
        if broker is not None:
            broker.stop()
        if region is not None:
            region.close()
        harness.destroy_region(name, args.peers)
        stop.unlink(missing_ok=True)
    return violations


def report(
    via: str,
    seconds: float,
    peers: list[harness.Managed],
    broker: harness.Broker | None,
    rss_limit_mib: int,
) -> list[str]:
    """Print the summary of a finished phase; return its violations."""
    violations: list[str] = []
    totals = {"sent": 0, "sent_bytes": 0, "received": 0, "received_bytes": 0}
    print(f"== soak via {via}: {len(peers)} peers, {seconds:.0f} s")
    for p in peers:
        events = p.events()
        summary = next((e for e in events if e["event"] == "summary"), None)
        for e in events:
            if e["event"] == "violation":
                violations.append(f"{p.label}: {e['what']}")
            elif e["event"] in ("lost", "spurious"):
                violations.append(f"{p.label}: PeerLostError from peer {e['peer']}: {e['detail']}")
        if p.proc.returncode != 0:
            violations.append(f"{p.label} exited {p.proc.returncode}")
        if summary is None:
            violations.append(f"{p.label} wrote no summary")
            continue
        for key in totals:
            totals[key] += summary[key]
        line, problems = harness.flatness(p.samples, rss_limit_mib * 1024)
        violations += [f"{p.label}: {what}" for what in problems]
        print(
            f"  {p.label} slot {summary['slot']}: sent {summary['sent']} "
            f"({summary['sent_bytes'] / MiB:.0f} MiB), received {summary['received']} "
            f"({summary['received_bytes'] / MiB:.0f} MiB), {summary['rounds']} rounds; {line}"
        )
    if broker is not None and broker.process is not None:
        line, problems = harness.flatness(broker.process.samples, rss_limit_mib * 1024)
        violations += [f"broker: {what}" for what in problems]
        print(f"  broker: {line}")
    if totals["sent"] != totals["received"]:
        violations.append(f"{totals['sent']} messages sent, {totals['received']} received")
    rate = totals["received"] / max(seconds, 1e-9)
    print(
        f"  total: {totals['sent']} messages sent, {totals['received']} received "
        f"({rate:.0f}/s), {totals['received_bytes'] / MiB:.0f} MiB; violations: {len(violations)}"
    )
    for what in violations[:50]:
        print(f"  VIOLATION {what}")
    return violations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--via", choices=["region", "broker", "both"], default="both")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--max-size", type=int, default=16 * MiB, help="largest payload, bytes")
    parser.add_argument("--region-mib", type=int, default=256, help="region size, MiB")
    parser.add_argument("--rss-limit-mib", type=int, default=32, help="allowed RssAnon growth")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (args.minutes or 1.0) * 60
    violations: list[str] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        try:
            for via in ("region", "broker") if args.via == "both" else (args.via,):
                phase_dir = Path(tmp) / via
                phase_dir.mkdir()
                violations += run_phase(via, seconds, args, phase_dir)
        except (RuntimeError, ValueError, OSError) as error:
            print(f"soak: cannot run: {error}", file=sys.stderr)
            return 2
    print(f"soak: {'FAILED' if violations else 'OK'}, {len(violations)} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
