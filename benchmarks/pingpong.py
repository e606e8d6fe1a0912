"""Ping-pong latency and osu_bw bandwidth: ivshmem_comm beside mpi4py, in one invocation.

    python -m benchmarks.pingpong [--sizes 8,64,1K,64K,1M,16M] [--rounds 3] [--quick]
                                  [--json FILE] [--profile]

Each round runs, one after the other (the order rotates every round): our two peers over one
fresh region (two subprocesses, peer 0 and peer 1, pinned to different CPUs), mpi4py over
MPICH's shared memory (`mpiexec -n 2`, ranks pinned the same way), and mpi4py forced onto TCP
loopback, the transport MPI has between VMs. Every figure is the median over rounds, because
the machine is shared and noisy. Latency is one way (half a round trip); bandwidth is
osu_bw-style (a window of messages back to back, one ack) in 10**6 bytes per second.

Our receive modes: "view" keeps the zero-copy view (the ponger replies straight from it; in
the bandwidth run the receiver releases each view without reading it), "into" copies out
with `recv_into` into a preallocated numpy buffer. mpi4py always receives into a buffer.

--profile instead runs our 8-byte latency under cProfile on the pinging side and prints
where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._plan import (
    DEFAULT_SIZES,
    QUICK_SIZES,
    Step,
    find_result,
    format_size,
    make_step,
    plan_to_json,
)
from ivshmem_comm.units import parse_size

ROOT = Path(__file__).resolve().parent.parent
REGION_HEADROOM = 64 << 20
MIN_REGION = 256 << 20
# MPIR_CVAR_NOLOCAL=1 alone is not enough with the mpich wheel (ch4:ucx): UCX still picks its
# own shared-memory transports (measured ~1.3 us, like the shm baseline). Restricting UCX to
# TCP makes the traffic go over loopback sockets; the result carries the count of established
# TCP connections per rank as evidence.
TCP_ENV = {"MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp"}
# Keys in the merged results, one series of per-round figures each.
SERIES = (
    "ours_view_us",
    "ours_into_us",
    "mpi_shm_us",
    "mpi_tcp_us",
    "ours_view_MBps",
    "ours_into_MBps",
    "mpi_shm_MBps",
    "mpi_tcp_MBps",
)


class BenchError(RuntimeError):
    """A benchmark process failed; the message carries its output."""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def _mpiexec() -> str:
    """The mpiexec of the mpich wheel next to this Python, else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if found is None:
        raise BenchError("no mpiexec: install the 'mpich' wheel (pip install mpich mpi4py)")
    return found


def _finish(proc: subprocess.Popen[str], what: str, timeout: float) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise BenchError(f"{what} timed out after {timeout:.0f} s\n{out}\n{err}") from None
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode})\n{out}\n{err}")
    return out


def _drain(proc: subprocess.Popen[str], grace: float = 5.0) -> tuple[str, str]:
    """Collect what a process printed, killing it if it does not exit within `grace` s."""
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def run_ours(plan: list[Step], timeout: float, profile: bool = False) -> dict[str, Any]:
    """Run our two peers over a fresh region; return ping's result."""
    import ivshmem_comm as ic
    from ivshmem_comm.notify import SemaphoreNotifier

    name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    biggest = max(s.size for s in plan)
    size = max(MIN_REGION, 2 * (biggest + REGION_HEADROOM))
    region = ic.Region.create(name, size=size, max_peers=2)
    plan_json = plan_to_json(plan)
    extra = ["--profile"] if profile else []
    cmd = [sys.executable, "-m", "benchmarks._ours"]
    procs: list[subprocess.Popen[str]] = []
    try:
        for role in ("pong", "ping"):
            procs.append(
                subprocess.Popen(
                    [*cmd, role, name, plan_json, *extra],
                    cwd=ROOT,
                    env=_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        try:
            out = _finish(procs[1], "our ping", timeout)
        except BenchError as exc:
            pong_out, pong_err = _drain(procs[0])
            raise BenchError(f"{exc}\npong said:\n{pong_out}\n{pong_err}") from None
        _finish(procs[0], "our pong", max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        region.close()
        try:
            ic.Region.unlink(name)
        except FileNotFoundError:
            pass
        SemaphoreNotifier.unlink_all(name, 2)
    result = find_result(out)
    if result is None:
        raise BenchError(f"our ping printed no result:\n{out}")
    return result


def run_mpi(plan: list[Step], label: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run the mpi4py baseline under `mpiexec -n 2` with `env` added; return rank 0's result."""
    cmd = [
        _mpiexec(),
        "-n",
        "2",
        sys.executable,
        "-m",
        "benchmarks._mpi_baseline",
        plan_to_json(plan),
        label,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out = _finish(proc, f"mpi4py baseline ({label})", timeout)
    result = find_result(out)
    if result is None:
        raise BenchError(f"mpi4py baseline ({label}) printed no result:\n{out}")
    return result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def summarise(sizes: Sequence[int], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round figures -> {series: {size: [values]}}, medians, and the ratios."""
    sources = {
        "ours_view_us": ("ours", "lat_view_us"),
        "ours_into_us": ("ours", "lat_into_us"),
        "ours_view_MBps": ("ours", "bw_view_MBps"),
        "ours_into_MBps": ("ours", "bw_into_MBps"),
        "mpi_shm_us": ("mpi_shm", "latency_us"),
        "mpi_shm_MBps": ("mpi_shm", "bandwidth_MBps"),
        "mpi_tcp_us": ("mpi_tcp", "latency_us"),
        "mpi_tcp_MBps": ("mpi_tcp", "bandwidth_MBps"),
    }
    series: dict[str, dict[str, list[float]]] = {}
    median: dict[str, dict[str, float | None]] = {}
    for key, (run, field) in sources.items():
        series[key] = {}
        median[key] = {}
        for size in sizes:
            values = [r[run][field][str(size)] for r in rounds if run in r]
            series[key][str(size)] = values
            median[key][str(size)] = _median(values)
    ratios: dict[str, dict[str, float | None]] = {}
    pairs = {
        # latency: theirs / ours (> 1 means we are faster)
        "mpi_shm/ours_view_lat": ("mpi_shm_us", "ours_view_us"),
        "mpi_shm/ours_into_lat": ("mpi_shm_us", "ours_into_us"),
        "mpi_tcp/ours_view_lat": ("mpi_tcp_us", "ours_view_us"),
        "mpi_tcp/ours_into_lat": ("mpi_tcp_us", "ours_into_us"),
        # bandwidth: ours / theirs (> 1 means we are faster)
        "ours_view/mpi_shm_bw": ("ours_view_MBps", "mpi_shm_MBps"),
        "ours_into/mpi_shm_bw": ("ours_into_MBps", "mpi_shm_MBps"),
        "ours_view/mpi_tcp_bw": ("ours_view_MBps", "mpi_tcp_MBps"),
        "ours_into/mpi_tcp_bw": ("ours_into_MBps", "mpi_tcp_MBps"),
    }
    for key, (num, den) in pairs.items():
        ratios[key] = {str(s): _ratio(median[num][str(s)], median[den][str(s)]) for s in sizes}
    return {"series": series, "median": median, "ratios": ratios}


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _fmt_bw(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.2f} GB/s" if v >= 1e3 else f"{v:.1f} MB/s"


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The human-readable tables of a report."""
    sizes, med, rat = report["sizes"], report["median"], report["ratios"]
    windows = {str(s["size"]): s["window"] for s in report["plan"]}
    lat_rows, bw_rows = [], []
    for size in map(str, sizes):
        lat_rows.append(
            [
                format_size(int(size)),
                *(_fmt_us(med[k][size]) for k in SERIES[:4]),
                *(_fmt_x(rat[k][size]) for k in list(rat)[:4]),
            ]
        )
        bw_rows.append(
            [
                format_size(int(size)),
                str(windows[size]),
                *(_fmt_bw(med[k][size]) for k in SERIES[4:]),
                *(_fmt_x(rat[k][size]) for k in list(rat)[4:]),
            ]
        )
    lat_header = [
        "size",
        "ours view us",
        "ours into us",
        "mpi shm us",
        "mpi tcp us",
        "shm/view",
        "shm/into",
        "tcp/view",
        "tcp/into",
    ]
    bw_header = [
        "size",
        "window",
        "ours view",
        "ours into",
        "mpi shm",
        "mpi tcp",
        "view/shm",
        "into/shm",
        "view/tcp",
        "into/tcp",
    ]
    info = report["info"]
    head = (
        f"ivshmem_comm implementation: {report['implementation']}   rounds: {report['rounds']} "
        f"(median)   CPUs: {info['cpus']}   pinned: {info['pinning']}\n"
        f"mpi4py: {info['mpi_library']}; tcp run: {info['tcp_env']} "
        f"(established TCP connections per rank: shm {info['tcp_connections']['mpi_shm']}, "
        f"tcp {info['tcp_connections']['mpi_tcp']})"
    )
    return (
        f"{head}\n\nOne-way latency (half round trip), microseconds; ratio = mpi4py / ours "
        f"(> 1: ours is faster)\n{_table(lat_header, lat_rows)}\n\n"
        f"Bandwidth (osu_bw, 1 GB = 10^9 B); ratio = ours / mpi4py (> 1: ours is faster)\n"
        f"{_table(bw_header, bw_rows)}"
    )


def benchmark(
    sizes: Sequence[int],
    rounds: int,
    quick: bool,
    timeout: float = 600.0,
    log: Any = None,
) -> dict[str, Any]:
    """Run `rounds` interleaved rounds of ours, mpi4py shm and mpi4py tcp; return the report."""
    plan = [make_step(s, quick) for s in sizes]
    runners = {
        "ours": lambda: run_ours(plan, timeout),
        "mpi_shm": lambda: run_mpi(plan, "mpi_shm", {}, timeout),
        "mpi_tcp": lambda: run_mpi(plan, "mpi_tcp", TCP_ENV, timeout),
    }
    order = list(runners)
    per_round: list[dict[str, Any]] = []
    for index in range(rounds):
        results: dict[str, Any] = {}
        rotated = order[index % len(order) :] + order[: index % len(order)]
        for name in rotated:
            start = time.monotonic()
            results[name] = runners[name]()
            if log is not None:
                print(
                    f"round {index + 1}/{rounds}: {name} done in {time.monotonic() - start:.1f} s",
                    file=log,
                    flush=True,
                )
        per_round.append(results)
    last = per_round[-1]
    ours = last["ours"]
    pinned = ours.get("cpu") is not None and ours.get("pong_cpu", -1) >= 0
    report: dict[str, Any] = {
        "implementation": ours["implementation"],
        "sizes": list(sizes),
        "rounds": rounds,
        "quick": quick,
        "plan": [vars(s) for s in plan],
        "info": {
            "command": " ".join(["python -m benchmarks.pingpong", *sys.argv[1:]]),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "pinning": (
                f"ours on CPUs {ours.get('cpu')}/{ours.get('pong_cpu')}, "
                f"mpi ranks on {last['mpi_shm'].get('cpus')}"
                if pinned
                else "no (fewer than 2 CPUs available)"
            ),
            "mpi_library": last["mpi_shm"]["library"],
            "tcp_env": " ".join(f"{k}={v}" for k, v in TCP_ENV.items()),
            "tcp_connections": {
                "mpi_shm": last["mpi_shm"]["tcp_connections"],
                "mpi_tcp": last["mpi_tcp"]["tcp_connections"],
            },
        },
        "raw": per_round,
    }
    report.update(summarise(sizes, per_round))
    return report


def _parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pingpong",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--sizes", type=_parse_sizes, help="comma-separated sizes, e.g. 8,64,1K,64K,1M,16M"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1/10 of the work")
    parser.add_argument("--json", type=Path, help="write the full report to this file")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile our 8-byte latency loop (ping side)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    args = parser.parse_args(argv)
    sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    rounds = args.rounds or (1 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.profile:
        steps = [make_step(8, args.quick)]
        result = run_ours(steps, args.timeout, profile=True)
        print(
            f"implementation: {result['implementation']}; one-way latency of the profiled "
            f"runs (inflated by cProfile): {result['latency_us']}\n"
        )
        print(result["profile"])
        return 0
    try:
        report = benchmark(sizes, rounds, args.quick, args.timeout, log=sys.stderr)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
