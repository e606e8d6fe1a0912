"""What the soak and the storm share: broker and traffic-peer processes, their logs, samples of
their memory and file descriptors, the region's peer table, and teardown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ivshmem_comm as ic
from ivshmem_comm import layout
from ivshmem_comm.notify import SemaphoreNotifier

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MiB = 1 << 20


def wait_until(predicate: Any, timeout: float, what: str, step: float = 0.005) -> float:
    """Poll predicate() until true; return the seconds it took. RuntimeError naming `what`
    after `timeout` seconds."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - start


@dataclass
class Sample:
    """One look at a process: seconds since the run began, anonymous and total resident
    memory (KiB, /proc/PID/status RssAnon and VmRSS) and open file descriptors (but the
    short-lived ones to /proc files that a liveness check of a peer opens)."""

    t: float
    rss_anon_kib: int
    rss_kib: int
    fds: int


def sample(pid: int, t: float) -> Sample | None:
    """A Sample of live process `pid`, None if it is gone."""
    try:
        fields = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.split()
        fds = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                fds += not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/proc/")
        return Sample(t, int(fields["RssAnon"][0]), int(fields["VmRSS"][0]), fds)
    except (FileNotFoundError, ProcessLookupError, KeyError):
        return None


@dataclass
class Managed:
    """A child process of a run, its log file and the samples taken of it."""

    label: str
    proc: subprocess.Popen[bytes]
    log: Path
    samples: list[Sample] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> float:
        """SIGKILL it and reap it at once (a zombie still passes kill(pid, 0)); return the
        CLOCK_REALTIME time of the kill."""
        t = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return t

    def events(self) -> list[dict[str, Any]]:
        """The JSON lines of its log (a traffic peer's events)."""
        out = []
        with contextlib.suppress(FileNotFoundError), open(self.log) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out


class Broker:
    """`python -m host_broker serve` for one region in `state_dir`; restartable."""

    def __init__(self, workdir: Path, name: str, size: int, max_peers: int) -> None:
        self.name = name
        self.state_dir = workdir / "state"
        self.socket = str(self.state_dir / f"{name}.sock")
        self.log = workdir / "broker.log"
        self.args = [
            sys.executable, "-m", "host_broker", "serve", "--name", name, "--size", str(size),
            "--max-peers", str(max_peers), "--state-dir", str(self.state_dir),
        ]  # fmt: skip
        self.starts = 0
        self.process: Managed | None = None

    def start(self) -> Managed:
        """Start it and wait until it serves (RuntimeError if it exits or takes over 30 s)."""
        self.starts += 1
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=ENV, cwd=ROOT)
        self.process = Managed("broker", proc, self.log)
        wait_until(
            lambda: self.log.read_text().count(" ready") >= self.starts or proc.poll() is not None,
            30,
            "the broker to serve",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited {proc.returncode}: {self.log.read_text()[-2000:]}")
        return self.process

    def stop(self) -> None:
        if self.process is not None and self.process.proc.poll() is None:
            self.process.proc.send_signal(signal.SIGTERM)
            try:
                self.process.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def spawn_peer(
    workdir: Path, index: int, stop: Path, max_size: int, *, region: str = "", slot: int = 0,
    socket: str = "",
) -> Managed:  # fmt: skip
    """Start traffic peer number `index` (`python -m tools.traffic`) on a plain region slot or
    through a broker socket."""
    log = workdir / f"peer-{index}.jsonl"
    how = ["--socket", socket] if socket else ["--region", region, "--slot", str(slot)]
    args = [
        sys.executable, "-m", "tools.traffic", *how, "--log", str(log), "--stop", str(stop),
        "--max-size", str(max_size), "--seed", str(index + 1),
    ]  # fmt: skip
    with open(workdir / f"peer-{index}.err", "ab") as err:
        proc = subprocess.Popen(args, stdout=err, stderr=err, env=ENV, cwd=ROOT)
    return Managed(f"peer-{index}", proc, log)


def slot_of(region: ic.Region, pid: int) -> tuple[int, int] | None:
    """(slot, incarnation) that process `pid` holds READY in `region`, None if none."""
    for info in region.peers():
        if info.pid == pid and info.state == layout.PEER_READY:
            return info.peer, info.incarnation
    return None


def check_region_geometry(region: ic.Region, max_size: int) -> None:
    """ValueError unless a traffic message of `max_size` payload bytes is sent whole."""
    from tools.traffic import HEADER

    if not layout.is_contiguous(HEADER.size + max_size, region.geometry):
        raise ValueError(
            f"messages of {max_size} bytes are not contiguous in queues of "
            f"{region.geometry.data_size} bytes: give a larger region"
        )


def flatness(samples: list[Sample], rss_limit_kib: int) -> tuple[str, list[str]]:
    """A one-line account of `samples` and the violations: a file-descriptor count at the end
    other than at a quarter of the run ("warm"), or anonymous RSS whose floor grew by more
    than `rss_limit_kib` from the second quarter of the run to the last (floors, not single
    samples: a peer holds a few messages of up to 16 MiB at any moment, which come and go)."""
    if len(samples) < 4:
        return "too few samples", []
    t0, span = samples[0].t, samples[-1].t - samples[0].t
    warm = next(s for s in samples if s.t - t0 >= span / 4)
    end = samples[-1]
    early = min(s.rss_anon_kib for s in samples if span / 4 <= s.t - t0 <= span / 2)
    late = min(s.rss_anon_kib for s in samples if s.t - t0 >= span * 3 / 4)
    line = (
        f"fds {samples[0].fds} start, {warm.fds} warm, {end.fds} end; RssAnon "
        f"{samples[0].rss_anon_kib} start, floor {early} in the 2nd quarter, {late} in the "
        f"4th, {end.rss_anon_kib} end KiB (VmRSS {samples[0].rss_kib} -> {end.rss_kib} KiB)"
    )
    problems = []
    if end.fds != warm.fds:
        problems.append(f"fd count moved {warm.fds} -> {end.fds}")
    if late - early > rss_limit_kib:
        problems.append(f"RssAnon floor grew {early} -> {late} KiB")
    return line, problems


def destroy_region(name: str, max_peers: int) -> None:
    """Remove region `name` and its doorbell semaphores (what is missing is skipped)."""
    with contextlib.suppress(FileNotFoundError):
        ic.Region.unlink(name)
    SemaphoreNotifier.unlink_all(name, max_peers)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
