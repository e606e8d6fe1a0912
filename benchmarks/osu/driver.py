"""Launching the rank program three ways, with a timeout that turns a hang into a failure.

Implementations (the same rank program, `benchmarks.osu.rank`, each time):
    ours    `ivshmem-run -n N -m benchmarks.osu.rank ours ...` (guest_lib.mpi over one region)
    mpich   `mpiexec -n N python -m benchmarks.osu.rank mpi ...` (mpi4py, MPICH shared memory)
    tcp     the same with MPIR_CVAR_NOLOCAL=1 UCX_TLS=tcp (MPICH over TCP loopback)

A batch (a list of jobs) runs in one launch. When a job fails (wrong data, an exception, a
step that outlives the hang timeout: the rank's watchdog dumps its stack and exits), the job is
recorded as failed with the error and traceback, and the jobs after it run in a fresh launch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.mpi_bench import _env  # the environment a rank program gets
from benchmarks.osu.rank import PREFIX
from benchmarks.osu.spec import Step

ROOT = Path(__file__).resolve().parents[2]
IMPLS = ("ours", "mpich", "tcp")
LABELS = {
    "ours": "ours (ivshmem-run, guest_lib.mpi)",
    "mpich": "mpi4py over MPICH shared memory (mpiexec)",
    "tcp": "mpi4py over MPICH TCP loopback (mpiexec)",
}
# As benchmarks.pingpong: NOLOCAL alone leaves UCX on its shared-memory transports.
TCP_ENV = {"MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp"}
KILL_GRACE_S = 5.0
STDERR_KEEP = 60  # lines of a failed launch's stderr kept in the report


@dataclasses.dataclass
class Job:
    """One (test, form) and the steps (sizes) it runs."""

    test: str
    form: str
    steps: list[Step]


@dataclasses.dataclass
class Outcome:
    """What one implementation produced for one job."""

    rows: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    status: str = "ok"  # "ok" or "failed"
    wall_s: float = 0.0  # the time its steps took (rank 0's clock), for planning runs
    failed_size: int | None = None
    error: str = ""
    traceback: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON form (sizes as strings)."""
        out = dataclasses.asdict(self)
        out["rows"] = {str(k): v for k, v in self.rows.items()}
        return out


def mpiexec() -> str:
    """The mpiexec of the mpich wheel beside this Python (what `pip install mpich` gives)."""
    path = Path(sys.executable).with_name("mpiexec")
    if not path.exists():
        raise SystemExit("no mpiexec beside this Python: pip install mpich mpi4py")
    return str(path)


def command(
    impl: str, ranks: int, jobs_file: str, hang_s: float, region_size: str | None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run `jobs_file` with `impl` on `ranks` ranks."""
    prog = [
        "-m",
        "benchmarks.osu.rank",
        "ours" if impl == "ours" else "mpi",
        jobs_file,
        str(hang_s),
    ]
    if impl == "ours":
        size = ["--size", region_size] if region_size else []
        return [
            sys.executable,
            "-m",
            "guest_lib.mpi.launcher",
            "-n",
            str(ranks),
            *size,
            *prog,
        ], _env()
    return [mpiexec(), "-n", str(ranks), sys.executable, *prog], _env(
        TCP_ENV if impl == "tcp" else None
    )


def _mpich_segments() -> set[str]:
    """The MPICH shared-memory segments in /dev/shm now."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")}
    except OSError:
        return set()


def _remove_orphans(before: set[str]) -> None:
    """Remove the MPICH segments that appeared since `before` and that no process maps: what
    ranks killed in the middle of a run leave behind (MPICH unlinks them itself otherwise)."""
    new = _mpich_segments() - before
    if not new:
        return
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        new = {n for n in new if n not in text}
    for name in new:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass


def _pump(stream: Any, sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def _stop(proc: subprocess.Popen[str], impl: str) -> None:
    """Stop a launch: ivshmem-run gets SIGINT first (it then removes its region), then the
    process group (this launch's own session) is killed."""
    if proc.poll() is None:
        try:
            if impl == "ours":
                proc.send_signal(signal.SIGINT)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=KILL_GRACE_S)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


class Launch:
    """One run of the rank program over `jobs`; `events` gets every report line."""

    def __init__(
        self, impl: str, ranks: int, jobs: list[Job], hang_s: float, region_size: str | None
    ) -> None:
        self.impl, self.ranks, self.jobs, self.hang_s = impl, ranks, jobs, hang_s
        self.region_size = region_size
        self.stderr: list[str] = []
        self.returncode: int | None = None
        self.stalled = False

    def run(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Run to the end (or until no line came for hang_s + 20 s: then it is stopped)."""
        with tempfile.NamedTemporaryFile(
            "w", suffix=".json", prefix="osu-jobs-", delete=False
        ) as f:
            json.dump(
                [
                    {
                        "test": j.test,
                        "form": j.form,
                        "steps": [[s.size, s.skip, s.iters] for s in j.steps],
                    }
                    for j in self.jobs
                ],
                f,
            )
        try:
            cmd, env = command(self.impl, self.ranks, f.name, self.hang_s, self.region_size)
            segments = _mpich_segments()
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            lines: queue.Queue[str | None] = queue.Queue()
            errs: queue.Queue[str | None] = queue.Queue()
            threads = [
                threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True),
                threading.Thread(target=_pump, args=(proc.stderr, errs), daemon=True),
            ]
            for thread in threads:
                thread.start()
            try:
                while True:
                    try:
                        line = lines.get(timeout=self.hang_s + 20)
                    except queue.Empty:
                        self.stalled = True
                        break
                    if line is None:
                        break
                    if line.startswith(PREFIX):
                        on_event(json.loads(line[len(PREFIX) :]))
            finally:
                _stop(proc, self.impl)
                for thread in threads:
                    thread.join(timeout=KILL_GRACE_S)
            self.returncode = proc.returncode
            if self.returncode != 0 and self.impl != "ours":
                _remove_orphans(segments)
            while not errs.empty():
                item = errs.get_nowait()
                if item is not None:
                    self.stderr.append(item)
        finally:
            os.unlink(f.name)


def run_jobs(
    impl: str,
    ranks: int,
    jobs: list[Job],
    hang_s: float,
    region_size: str | None,
    progress: Callable[[int], None],
) -> tuple[list[Outcome], dict[str, Any]]:
    """Run `jobs` with `impl`, relaunching after a failed job; return one Outcome per job and
    what the ranks said about themselves ("library", "cpus", "tcp_connections").
    `progress(n)` is called as steps finish (or are given up)."""
    outcomes = [Outcome() for _ in jobs]
    info: dict[str, Any] = {}
    first = 0
    while first < len(jobs):
        state: dict[str, Any] = {"current": None, "size": None, "done": set(), "fail": None}

        def on_event(event: dict[str, Any], base: int = first, st: dict[str, Any] = state) -> None:
            kind = event.pop("ev")
            if kind in ("begin", "info"):
                info.update(event)
            elif kind == "start":
                st["current"], st["size"] = base + event["job"], event["size"]
            elif kind == "row":
                outcome = outcomes[base + event["job"]]
                outcome.rows[event["size"]] = event["m"]
                outcome.wall_s += event["wall"]
                progress(1)
            elif kind == "done":
                st["done"].add(base + event["job"])
            elif kind == "fail" and st["fail"] is None:
                st["fail"] = event

        launch = Launch(impl, ranks, jobs[first:], hang_s, region_size)
        launch.run(on_event)
        done: set[int] = state["done"]
        if len(done) == len(jobs) - first:
            break
        failed = state["current"] if state["current"] is not None else first
        if failed in done:  # it ended between two jobs
            failed += 1
        size = state["size"] if state["current"] == failed else None
        _record_failure(outcomes[failed], size, state["fail"], launch, hang_s)
        progress(len(jobs[failed].steps) - len(outcomes[failed].rows))
        first = failed + 1
    return outcomes, info


def _record_failure(
    outcome: Outcome, size: int | None, fail: dict[str, Any] | None, launch: Launch, hang_s: float
) -> None:
    """Fill `outcome` with why its launch ended at step `size`: a rank's reported exception
    (`fail`), a hang (the watchdog's stack dump, or a launch silent for too long), or else the
    launch's exit status."""
    outcome.status = "failed"
    outcome.failed_size = size
    tail = "".join(launch.stderr[-STDERR_KEEP:])
    if fail is not None:
        outcome.failed_size = fail["size"]
        outcome.error = f"rank {fail['rank']}: {fail['error']}"
        outcome.traceback = fail["traceback"]
    elif launch.stalled or "Timeout (" in tail:
        outcome.error = (
            f"hang: the step at {outcome.failed_size} B did not finish in {hang_s:.0f} s"
        )
        outcome.traceback = tail
    else:
        outcome.error = f"the launch exited with status {launch.returncode}"
        outcome.traceback = tail
