"""MPI face benchmark: `guest_lib.mpi` beside mpi4py (shared memory and TCP), one invocation.

    python -m benchmarks.mpi_bench [--rounds 5] [--quick] [--json FILE]

Each round runs, in rotating order, the same worker program (`--worker`) three ways with two
ranks pinned to different CPUs:
- "ours":     `ivshmem-run -n 2` (ranks on one fresh region), `from guest_lib.mpi import MPI`;
- "mpi_shm":  `mpiexec -n 2`, `from mpi4py import MPI` (MPICH over shared memory);
- "mpi_tcp":  the same with MPIR_CVAR_NOLOCAL=1 UCX_TLS=tcp (MPI's transport between VMs).
The worker measures blocking Send/Recv ping-pong one-way latency (half a round trip) of 8 B,
1 MiB and 16 MiB numpy buffers, and Allreduce(SUM) of 1M float64. Figures are medians over
rounds (the machine is shared and noisy); the closing table gives ratios against mpi4py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._plan import pin, tcp_connections

ROOT = Path(__file__).resolve().parent.parent
TCP_ENV = {"MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp"}
CASES = [("send_8B", 8, 5000), ("send_1MiB", 1 << 20, 300), ("send_16MiB", 16 << 20, 30)]
QUICK = [("send_8B", 8, 1000), ("send_1MiB", 1 << 20, 50), ("send_16MiB", 16 << 20, 8)]
ALLREDUCE_N = 1 << 20


def worker(label: str, quick: bool) -> None:
    """One rank of a run; rank 0 prints a JSON line of results (microseconds)."""
    if label == "ours":
        from guest_lib.mpi import MPI
    else:
        from mpi4py import MPI  # type: ignore[no-redef]
    import numpy as np

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    assert comm.Get_size() == 2, "run with two ranks"
    pin(rank)
    peer = 1 - rank
    result: dict[str, Any] = {"label": label}
    for name, size, iters in QUICK if quick else CASES:
        sbuf = np.full(size, 0x5A, np.uint8)
        rbuf = np.zeros(size, np.uint8)
        warm = max(iters // 10, 2)
        elapsed = 0.0
        for count, timed in ((warm, False), (iters, True)):
            comm.Barrier()
            start = time.perf_counter()
            if rank == 0:
                for _ in range(count):
                    comm.Send(sbuf, peer, 1)
                    comm.Recv(rbuf, peer, 1)
            else:
                for _ in range(count):
                    comm.Recv(rbuf, peer, 1)
                    comm.Send(rbuf, peer, 1)
            if timed:
                elapsed = time.perf_counter() - start
        if rbuf[-1] != 0x5A:
            raise SystemExit(f"{label}: content check failed at {size} B")
        result[name] = elapsed / iters / 2 * 1e6
    sbuf = np.arange(ALLREDUCE_N, dtype=np.float64) * (rank + 1)
    rbuf = np.empty_like(sbuf)
    iters = 5 if quick else 20
    for count, timed in ((3, False), (iters, True)):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(count):
            comm.Allreduce(sbuf, rbuf, MPI.SUM)
        if timed:
            elapsed = time.perf_counter() - start
    if rbuf[-1] != (ALLREDUCE_N - 1) * 3:
        raise SystemExit(f"{label}: Allreduce result wrong")
    result["allreduce_1M_f64"] = elapsed / iters * 1e6
    connections = comm.gather(tcp_connections(), root=0)
    if rank == 0:
        result["tcp_connections"] = connections
        print("RESULT " + json.dumps(result), flush=True)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for var in ("IVSHMEM_COMM_REGION", "IVSHMEM_COMM_SOCKET", "IVSHMEM_MPI_RANK"):
        env.pop(var, None)
    env.update(extra or {})
    return env


def run_one(label: str, quick: bool, timeout: float = 300) -> dict[str, Any]:
    """Run one configuration; return rank 0's result."""
    me = [sys.executable, "-m", "benchmarks.mpi_bench", "--worker", label]
    if quick:
        me.append("--quick")
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    if label == "ours":
        cmd = [sys.executable, "-m", "guest_lib.mpi.launcher", "-n", "2", "--size", "128M", *me]
        env = _env()
    else:
        cmd = [mpiexec, "-n", "2", *me]
        env = _env(TCP_ENV if label == "mpi_tcp" else None)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{label} failed (exit {done.returncode})\n{done.stdout}\n{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpi_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI)")
    parser.add_argument("--json", help="write the merged results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.quick)
        return 0
    labels = ["ours", "mpi_shm", "mpi_tcp"]
    rounds: list[dict[str, dict[str, Any]]] = []
    for index in range(args.rounds):
        order = labels[index % 3 :] + labels[: index % 3]
        rounds.append({label: run_one(label, args.quick) for label in order})
    metrics = [name for name, _, _ in CASES] + ["allreduce_1M_f64"]
    table = {
        label: {m: statistics.median(r[label][m] for r in rounds) for m in metrics}
        for label in labels
    }
    print(f"{'metric (us, median of ' + str(args.rounds) + ')':34}" + "".join(
        f"{label:>12}" for label in labels) + f"{'shm/ours':>10}{'tcp/ours':>10}")  # fmt: skip
    for m in metrics:
        ours = table["ours"][m]
        cells = "".join(f"{table[label][m]:12.1f}" for label in labels)
        ratios = f"{table['mpi_shm'][m] / ours:10.2f}{table['mpi_tcp'][m] / ours:10.2f}"
        print(f"{m:34}{cells}{ratios}")
    tcp = rounds[-1]["mpi_tcp"].get("tcp_connections")
    print(f"mpi_tcp ranks' established TCP connections (evidence of TCP): {tcp}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
