"""Cost of THREAD_MULTIPLE on the single-threaded fast path, measured in one job.

    python -m benchmarks.threads_cost [--rounds 15] [--quick] [--json FILE]

One `ivshmem-run -n 2` job (ranks pinned to different CPUs) runs the same measurements in
two states, interleaved round after round in alternating order, so that the load of a
shared machine falls on both alike:
- "single":      the program as it is, no Python thread but the main one: the blocking fast
                 paths (and Isend's) take no lock, other calls take the engine lock once
                 (uncontended);
- "idle_thread": a second Python thread alive (asleep on an Event) in each rank: every
                 call takes the engine lock, as in any threaded program.
There is no switch that compiles the engine lock out: in the single state the fast paths
only pay the `_thread._count()` test that chooses the lock-free path.
Measures (8-byte numpy messages): one-way latency of a blocking Send/Recv ping-pong (wall
µs); CPU ns per blocking Send and per blocking Recv of a message already there
(`time.thread_time`, blind to preemption: 32 Sends by rank 0, then 32 Recvs by rank 1, per
batch); an Isend/Irecv window (64 messages then a 4-byte acknowledgement, wall µs per
message) and the CPU ns of posting each Isend / Irecv of it. Each is the best of several
chunks within a round (a loaded machine only ever adds time); the table gives medians over
rounds, and the median over rounds of the ratios state against state within each round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._plan import pin

ROOT = Path(__file__).resolve().parent.parent
STATES = ("single", "idle_thread")
BATCH = 32  # blocking Sends queued before the Recvs take them (they fit in the queue)
WINDOW = 64
METRICS = ("pingpong_us", "send_cpu_ns", "recv_cpu_ns", "window_us", "isend_cpu_ns",
           "irecv_cpu_ns")  # fmt: skip
RATIOS = (("idle_thread", "single"),)


class _State:
    """Enter and leave one of STATES in this rank (`enter`, `leave`)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def enter(self, state: str) -> None:
        if state == "idle_thread":
            self.thread = threading.Thread(target=self.stop.wait, daemon=True)
            self.thread.start()

    def leave(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.stop.clear()
            self.thread = None


def _measure(MPI: Any, comm: Any, quick: bool) -> dict[str, float]:
    """One pass of every measure in the current state; rank 0's dict holds both ranks'.
    Each figure is the best of several chunks: on a shared machine, preemption and other
    processes' cache traffic only ever add time."""
    import numpy as np

    rank = comm.Get_rank()
    peer = 1 - rank
    sbuf = np.full(8, 0x5A, np.uint8)
    rbuf = np.zeros(8, np.uint8)
    out: dict[str, float] = {}
    chunks = 4 if quick else 10
    iters = 50 if quick else 200  # round trips per chunk
    best = float("inf")
    for chunk in range(chunks + 1):  # (chunk 0 warms up)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(iters):
            if rank == 0:
                comm.Send(sbuf, peer, 1)
                comm.Recv(rbuf, peer, 1)
            else:
                comm.Recv(rbuf, peer, 1)
                comm.Send(rbuf, peer, 1)
        if chunk:
            best = min(best, (time.perf_counter() - start) / iters / 2 * 1e6)
    out["pingpong_us"] = best
    best = float("inf")
    for _ in range(chunks * 3):
        comm.Barrier()
        if rank == 0:
            start = time.thread_time()
            for _ in range(BATCH):
                comm.Send(sbuf, peer, 2)
            best = min(best, time.thread_time() - start)
        comm.Barrier()  # every message is in rank 1's queue before it receives
        if rank == 1:
            start = time.thread_time()
            for _ in range(BATCH):
                comm.Recv(rbuf, peer, 2)
            best = min(best, time.thread_time() - start)
    out["send_cpu_ns" if rank == 0 else "recv_cpu_ns"] = best / BATCH * 1e9
    ack = np.zeros(4, np.uint8)
    rbufs = [np.zeros(8, np.uint8) for _ in range(WINDOW)]
    loops = 5 if quick else 20  # windows per chunk
    best = best_post = float("inf")
    for chunk in range(chunks + 1):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(loops):
            begin = time.thread_time()
            if rank == 0:
                requests = [comm.Isend(sbuf, peer, 3) for _ in range(WINDOW)]
            else:
                requests = [comm.Irecv(buf, peer, 3) for buf in rbufs]
            post = time.thread_time() - begin
            MPI.Request.Waitall(requests)
            if rank == 0:
                comm.Recv(ack, peer, 4)
            else:
                comm.Send(ack, peer, 4)
            if chunk:
                best_post = min(best_post, post)
        if chunk:
            best = min(best, (time.perf_counter() - start) / loops / WINDOW * 1e6)
    out["window_us"] = best
    out["isend_cpu_ns" if rank == 0 else "irecv_cpu_ns"] = best_post / WINDOW * 1e9
    if rbuf[-1] != 0x5A or rbufs[-1][-1] != (0x5A if rank == 1 else 0):
        raise SystemExit("threads_cost: content check failed")
    theirs = comm.sendrecv(out, peer, 5, None, peer, 5)
    if rank == 0:
        out.update({k: v for k, v in theirs.items() if k.endswith("recv_cpu_ns")})
    return out


def worker(rounds: int, quick: bool) -> None:
    """One rank of the job; rank 0 prints a RESULT line of JSON."""
    from guest_lib.mpi import MPI

    comm = MPI.COMM_WORLD
    assert comm.Get_size() == 2, "run with two ranks"
    pin(comm.Get_rank())
    state = _State()
    per: dict[str, list[dict[str, float]]] = {name: [] for name in STATES}
    for index in range(rounds):
        order = STATES if index % 2 == 0 else STATES[::-1]
        for name in order:
            state.enter(name)
            try:
                per[name].append(_measure(MPI, comm, quick))
            finally:
                state.leave()
    if comm.Get_rank() == 0:
        print("RESULT " + json.dumps(summarise(per)), flush=True)


def _median_ratio(per: dict[str, list[dict[str, float]]], a: str, b: str, m: str) -> float:
    return statistics.median(x[m] / y[m] for x, y in zip(per[a], per[b], strict=True))


def summarise(per: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per state and metric, and the median per-round ratios of RATIOS."""

    def median(state: str, metric: str) -> float:
        return statistics.median(r[metric] for r in per[state])

    return {
        "rounds": len(per[STATES[0]]),
        "median": {s: {m: median(s, m) for m in METRICS} for s in STATES},
        "ratio": {f"{a}/{b}": {m: _median_ratio(per, a, b, m) for m in METRICS} for a, b in RATIOS},
        "per_round": per,
    }


def run(rounds: int, quick: bool, timeout: float = 900) -> dict[str, Any]:
    """Run the job; rank 0's summary."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for var in ("IVSHMEM_COMM_REGION", "IVSHMEM_COMM_SOCKET", "IVSHMEM_MPI_RANK"):
        env.pop(var, None)
    me = [sys.executable, "-m", "benchmarks.threads_cost", "--worker", "--rounds", str(rounds)]
    if quick:
        me.append("--quick")
    cmd = [sys.executable, "-m", "guest_lib.mpi.launcher", "-n", "2", *me]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError(f"threads_cost failed (exit {done.returncode})\n{done.stdout}\n"
                       f"{done.stderr}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="threads_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI)")
    parser.add_argument("--json", help="write the summary (and every round) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.rounds, args.quick)
        return 0
    load = os.getloadavg()[0]
    result = run(args.rounds, args.quick)
    result["load_before"] = load
    result["load_after"] = os.getloadavg()[0]
    print(f"{result['rounds']} rounds, load average {load:.1f} -> {result['load_after']:.1f}")
    print(f"{'metric (median)':16}" + "".join(f"{s:>13}" for s in STATES)
          + "".join(f"{a + '/' + b:>23}" for a, b in RATIOS))  # fmt: skip
    for m in METRICS:
        cells = "".join(f"{result['median'][s][m]:13.2f}" for s in STATES)
        ratios = "".join(f"{result['ratio'][f'{a}/{b}'][m]:23.3f}" for a, b in RATIOS)
        print(f"{m:16}{cells}{ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
