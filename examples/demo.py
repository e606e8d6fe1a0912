"""The README demo: two peers of a broker-served region, latency and bandwidth measured by them.

    python examples/demo.py            # two lab guests when QEMU and a kernel are there
    python examples/demo.py --hosts    # two host processes through the broker client
    python examples/demo.py --quick    # fewer sizes, shorter runs

What it does: starts `python -m host_broker serve` for a fresh region (private temporary
state directory, region unlinked at exit), boots two VM-lab guests with an
`ivshmem-doorbell` device on the broker's socket (or starts two host processes), and runs
this module's `--worker` in each. The workers call `guest_lib.attach()`; the lower peer id
measures, the other echoes:

- one-way latency: ping-pong round trips of one message of the size, halved (median of
  batches);
- bandwidth: a window of messages one way, then a 1-byte acknowledgement; MB/s = bytes of
  the window / its time (1 MB = 10^6 bytes).

The table is printed by this process from the measurer's JSON result line. Under TCG the
numbers are those of an emulated CPU and are marked "emulated (TCG)": they say that the
path works, not how fast it is on KVM. Everything started is stopped and removed at exit,
also on errors and Ctrl-C (guests killed, broker terminated, region unlinked, temporary
directory removed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from guest_lib.launch import BrokerProcess

REPO = Path(__file__).resolve().parent.parent
SIZES = [8, 64, 512, 4096, 32768, 262144, 1 << 20, 4 << 20]
QUICK_SIZES = [8, 4096, 262144, 4 << 20]
TAG_PING, TAG_BULK, TAG_BULK_END, TAG_DONE = 1, 2, 3, 9
RESULT = "DEMO-RESULT "


# ------------------------------------------------------------------------------ worker side
def _measure(ep: Any, other: int, sizes: list[int], budget_s: float) -> list[dict[str, Any]]:
    """Drive the responder through every size; return one row per size."""
    rows = []
    payload = memoryview(bytearray(os.urandom(65536)) * (max(sizes) // 65536 + 1))
    for size in sizes:
        msg = payload[:size]
        # Latency: batches of round trips until the time budget is spent.
        ep.send(other, msg, tag=TAG_PING)  # warm-up
        ep.recv(source=other).release()
        per_rtt: list[float] = []
        t_end = time.perf_counter() + budget_s
        batch = 1
        while time.perf_counter() < t_end or len(per_rtt) < 3:
            t0 = time.perf_counter()
            for _ in range(batch):
                ep.send(other, msg, tag=TAG_PING)
                ep.recv(source=other).release()
            per_rtt.append((time.perf_counter() - t0) / batch)
            if per_rtt[-1] * batch < budget_s / 20:
                batch *= 2
        latency_us = statistics.median(per_rtt) / 2 * 1e6
        # Bandwidth: windows of messages one way, each window acknowledged.
        window = max(1, min(64, (8 << 20) // size))
        moved, elapsed = 0, 0.0
        t_end = time.perf_counter() + budget_s
        while time.perf_counter() < t_end or moved == 0:
            t0 = time.perf_counter()
            for i in range(window):
                ep.send(other, msg, tag=TAG_BULK_END if i == window - 1 else TAG_BULK)
            ep.recv(source=other).release()
            elapsed += time.perf_counter() - t0
            moved += window * size
        rows.append({"size": size, "latency_us": latency_us, "mb_s": moved / elapsed / 1e6})
    ep.send(other, b"", tag=TAG_DONE)
    return rows


def _respond(ep: Any, other: int) -> int:
    """Echo pings, acknowledge bulk windows, until told to stop; return messages seen."""
    buf = bytearray(max(SIZES))
    view = memoryview(buf)
    count = 0
    while True:
        n, _, tag = ep.recv_into(buf, source=other)
        count += 1
        if tag == TAG_PING:
            ep.send(other, view[:n], tag=TAG_PING)
        elif tag == TAG_BULK_END:
            ep.send(other, b"k")
        elif tag == TAG_DONE:
            return count


def worker(quick: bool) -> int:
    """Run inside a guest (or host process): attach, measure or respond, print the result."""
    import guest_lib

    ep = guest_lib.attach()
    try:
        deadline = time.monotonic() + 60
        while not ep.peers():
            if time.monotonic() > deadline:
                print("no peer joined within 60 s", file=sys.stderr)
                return 1
            time.sleep(0.01)
        other = ep.peers()[0]
        info = {
            "peer": ep.peer_id,
            "kind": ep.attachment.kind,
            "notifier": ep.attachment.notifier,
        }
        if ep.peer_id < other:
            sizes = QUICK_SIZES if quick else SIZES
            rows = _measure(ep, other, sizes, 0.15 if quick else 0.5)
            print(RESULT + json.dumps({**info, "rows": rows}), flush=True)
        else:
            count = _respond(ep, other)
            print(RESULT + json.dumps({**info, "responded": count}), flush=True)
        return 0
    finally:
        ep.close()


# ------------------------------------------------------------------------------ driver side
def _broker(size: str) -> BrokerProcess:
    """The demo's broker: a fresh region for two peers with 2 vectors each, in a private
    temporary state directory (its log there too), everything removed by close()."""
    name = f"demo-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    state = tempfile.mkdtemp(prefix="ivshmem-demo-")
    return BrokerProcess(
        name,
        size,
        max_peers=2,
        vectors=2,
        state_dir=state,
        log=os.path.join(state, "broker.log"),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )


def _worker_argv(quick: bool) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        *(["--quick"] if quick else []),
    ]


def _parse(outputs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    results = [
        json.loads(line[len(RESULT) :])
        for out in outputs
        for line in out.splitlines()
        if line.startswith(RESULT)
    ]
    measurer = [r for r in results if "rows" in r]
    responder = [r for r in results if "responded" in r]
    if not measurer or not responder:
        raise RuntimeError("a worker failed:\n" + "\n".join(o[-2000:] for o in outputs))
    return measurer[0], responder[0]


def _run_guests(broker: BrokerProcess, quick: bool) -> tuple[list[str], str]:
    from ivshmem_lab import DoorbellDevice, Lab

    lab = Lab(memory="384M")
    results = lab.run(
        _worker_argv(quick),
        vms=2,
        devices=[DoorbellDevice(broker.socket, 2)],
        cwd=REPO,
        timeout=600,
    )
    accel = results[0].accel
    boots = ", ".join(f"vm{r.index} booted in {r.boot_seconds or 0:.1f} s" for r in results)
    for r in results:
        if r.returncode != 0:
            raise RuntimeError(f"vm{r.index} failed ({r.error}):\n{r.output[-2000:]}")
    label = "emulated (TCG)" if accel == "tcg" else "KVM"
    return [r.output for r in results], f"two QEMU guests, {label}; {boots}"


def _run_hosts(broker: BrokerProcess, quick: bool) -> tuple[list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "IVSHMEM_COMM_SOCKET": broker.socket}
    procs = [
        subprocess.Popen(
            _worker_argv(quick),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs, "two host processes through the broker (eventfd doorbells)"


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    """The latency / bandwidth table as text."""
    lines = [title, f"{'size':>9}  {'one-way latency':>16}  {'bandwidth':>12}"]
    for row in rows:
        size = row["size"]
        label = f"{size >> 20} MiB" if size >= 1 << 20 else (
            f"{size >> 10} KiB" if size >= 1 << 10 else f"{size} B"
        )  # fmt: skip
        lines.append(f"{label:>9}  {row['latency_us']:>13.1f} us  {row['mb_s']:>9.1f} MB/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0: the demo ran and printed its table)."""
    parser = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hosts", action="store_true", help="host processes, no guests")
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter runs")
    parser.add_argument("--size", default="32M", help="region size (a power of two)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.quick)

    use_guests = not args.hosts
    why_not = ""
    if use_guests:
        from ivshmem_lab import lab_available

        use_guests, why_not = lab_available()
    broker = _broker(args.size)
    try:
        broker.start()
        print(f"broker serving region {broker.name} at {broker.socket}", file=sys.stderr)
        if use_guests:
            print("booting two guests (VM lab)...", file=sys.stderr)
            outputs, setting = _run_guests(broker, args.quick)
        else:
            if not args.hosts:
                print(f"no guests ({why_not}); using host processes", file=sys.stderr)
            outputs, setting = _run_hosts(broker, args.quick)
        measurer, responder = _parse(outputs)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.close()
        shutil.rmtree(broker.state_dir, ignore_errors=True)
    title = (
        f"ivshmem_comm demo: {setting}\n"
        f"peer {measurer['peer']} measured ({measurer['kind']} attach, "
        f"{measurer['notifier']}), peer {responder['peer']} echoed "
        f"({responder['responded']} messages)"
    )
    print(format_table(measurer["rows"], title), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
