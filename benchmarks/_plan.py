"""What the benchmark processes share: the per-size schedule, CPU pinning, socket evidence.

The parent (`benchmarks.pingpong`) builds one plan and hands the same JSON to our peers and to
the mpi4py ranks, so both sides run exactly the same iteration counts and windows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

KIB = 1 << 10
MIB = 1 << 20
DEFAULT_SIZES = (8, 64, KIB, 64 * KIB, MIB, 16 * MIB)
QUICK_SIZES = (8, KIB, 64 * KIB)
ACK_BYTES = 4  # osu_bw's acknowledgement
RESULT_PREFIX = "BENCHJSON "  # marks the one stdout line a benchmark process reports with


@dataclasses.dataclass(frozen=True)
class Step:
    """The work for one message size (OSU style: fewer iterations as messages grow).

    Latency: `lat_warmup` then `lat_iters` timed round trips. Bandwidth: `bw_warmup` then
    `bw_loops` timed loops, each `window` messages back to back and one ACK_BYTES reply.
    """

    size: int
    lat_warmup: int
    lat_iters: int
    window: int
    bw_warmup: int
    bw_loops: int


def make_step(size: int, quick: bool = False) -> Step:
    """The schedule for `size` bytes; `quick` divides the work by 10 (at least 2 of each)."""
    if size <= 8 * KIB:
        warm, iters, window, bw_warm, loops = 1000, 10000, 64, 10, 100
    elif size <= 64 * KIB:
        warm, iters, window, bw_warm, loops = 100, 2000, 64, 5, 50
    elif size <= MIB:
        warm, iters, window, bw_warm, loops = 20, 300, 64, 2, 10
    elif size <= 4 * MIB:
        warm, iters, window, bw_warm, loops = 5, 60, 32, 1, 5
    else:
        warm, iters, window, bw_warm, loops = 3, 30, 16, 1, 4
    if quick:
        warm, iters, loops = (max(2, n // 10) for n in (warm, iters, loops))
        bw_warm = 1
    return Step(size, warm, iters, window, bw_warm, loops)


def plan_to_json(steps: list[Step]) -> str:
    """Serialise a plan for a child process's command line."""
    return json.dumps([dataclasses.asdict(s) for s in steps])


def plan_from_json(text: str) -> list[Step]:
    """Inverse of plan_to_json."""
    return [Step(**item) for item in json.loads(text)]


def format_size(n: int) -> str:
    """8 -> '8 B', 65536 -> '64 KiB', 1048576 -> '1 MiB'."""
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def pin(index: int) -> int | None:
    """Pin this process to the `index`-th CPU it may run on; return the CPU, or None.

    With fewer than two CPUs available pinning would put both peers on one core, so nothing
    is pinned then.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(cpus) < 2:
        return None
    cpu = cpus[index % len(cpus)]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return None
    return cpu


def tcp_connections() -> int:
    """How many ESTABLISHED TCP connections this process holds (evidence of the transport)."""
    inodes: set[str] = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return -1
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def emit(result: dict[str, Any]) -> None:
    """Print the one result line the parent looks for."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def find_result(stdout: str) -> dict[str, Any] | None:
    """The result a child printed with `emit`, or None."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    return None
