"""`ivshmem-run` as schedulers and users stop it: signals forwarded to every rank, ranks that
die with a killed launcher, nothing left behind; ranks' output in whole lines.

Each test starts a real launcher with real ranks (tests/mpi/programs/launcher_rank.py) on a
region it creates (or, with --broker, a broker serves), signals the launcher, and checks its
exit status, that every rank is gone and that no object named after the job is left in
/dev/shm.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.mpi.conftest import PYTHON, ROOT, job_env
from tests.support import cmdline, descendants, gone, vm_test

pytestmark = pytest.mark.timeout(120)

PROGRAM = str(Path(__file__).with_name("programs") / "launcher_rank.py")
LAUNCHER = [PYTHON, "-m", "guest_lib.mpi.launcher"]
GRACE_S = 2.0


def _job_objects(launcher: int) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f"mpi-{launcher}-" in f]


class Job:
    """A launcher running `ranks` ranks of the program in `mode`; its ranks' pids once known."""

    def __init__(self, mode: str, ranks: int = 2, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*LAUNCHER, "-n", str(ranks), "--timeout", "100", *extra, PROGRAM, mode],
            cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.ranks = ranks
        self.pids: dict[int, int] = {}
        self.out = b""
        deadline = time.monotonic() + 60
        selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        while len(self.pids) < ranks:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.out
            if selector.select(0.1):
                self.out += os.read(self.proc.stdout.fileno(), 1 << 16)
            self.pids = {int(r): int(p) for r, p in re.findall(rb"rank (\d+) pid (\d+)", self.out)}
        selector.close()

    def finish(self, timeout: float) -> int:
        """Wait for the launcher; return its status. Then every rank must be gone and the
        job's objects removed (within a few seconds: the guardian works after a SIGKILL)."""
        code = self.proc.wait(timeout)
        deadline = time.monotonic() + 10
        while not all(gone(pid) for pid in self.pids.values()) or _job_objects(self.proc.pid):
            assert time.monotonic() < deadline, (
                [pid for pid in self.pids.values() if not gone(pid)],
                _job_objects(self.proc.pid),
            )
            time.sleep(0.05)
        self.proc.communicate(timeout=10)
        return code


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name
)
def test_signal_is_forwarded_to_every_rank(sig):
    job = Job("wait", 3)
    assert _job_objects(job.proc.pid)  # the region and its doorbells exist
    t0 = time.monotonic()
    job.proc.send_signal(sig)
    assert job.finish(GRACE_S + 10) == 128 + sig
    assert time.monotonic() - t0 < GRACE_S  # the ranks died of the signal, not of SIGKILL


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_ranks_that_ignore_the_signal_are_killed_after_the_grace_period(sig):
    job = Job("stubborn", 2)
    t0 = time.monotonic()
    job.proc.send_signal(sig)
    assert job.finish(GRACE_S + 10) == 128 + sig
    assert time.monotonic() - t0 >= GRACE_S


@pytest.mark.parametrize("broker", [False, True], ids=["region", "broker"])
def test_ranks_die_with_a_killed_launcher_and_nothing_is_left(broker):
    job = Job("stubborn", 2, *(["--broker"] if broker else []))
    job.proc.send_signal(signal.SIGKILL)
    assert job.finish(10) == -signal.SIGKILL


def test_sigterm_with_a_broker_stops_it_and_removes_the_region():
    job = Job("wait", 2, "--broker")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish(GRACE_S + 10) == 128 + signal.SIGTERM


@pytest.mark.parametrize("prepend", [False, True], ids=["plain", "prepend_rank"])
def test_output_arrives_in_whole_lines(prepend):
    """Two ranks write 300 lines of 20000 characters each, on stdout and stderr, each line
    in 1000-byte writes: every line comes out whole (with "[rank] " first if asked)."""
    count, length = 300, 20000
    done = subprocess.run(
        [*LAUNCHER, "-n", "2", *(["--prepend-rank"] if prepend else []),
         PROGRAM, "chatter", str(count), str(length)],
        cwd=ROOT, env=job_env(), capture_output=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    pattern = re.compile(rb"(\[(\d)\] )?(\d):(\d+):(x*)")
    for stream in (done.stdout, done.stderr):
        seen = {0: [], 1: []}
        for line in stream.splitlines():
            match = pattern.fullmatch(line)
            if match is None:
                assert line.startswith(b"[" if prepend else b"rank ") and b"pid" in line, line[:80]
                continue
            assert (match[1] is not None) == prepend
            rank = int(match[3])
            if prepend:
                assert int(match[2]) == rank
            assert len(match[5]) == length
            seen[rank].append(int(match[4]))
        assert seen == {0: list(range(count)), 1: list(range(count))}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--size", "12Q"], "argument --size: cannot read size '12Q'"),
        (["--region", "a/b"], "bad region name 'a/b'"),
        (["--size", "1K"], "a region of 1024 bytes is too small for 2 peers"),
        (["--queue-num", "7"], "queue_num must be a power of two"),
    ],
    ids=["size", "name", "small", "queue_num"],
)
def test_mistakes_are_one_line_errors(args, says):
    """A malformed size or region name, or a size too small for the ranks: one line naming
    what is wrong, a failure status, nothing started and nothing left."""
    done = subprocess.run(
        [*LAUNCHER, "-n", "2", *args, PROGRAM, "wait"],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert says in done.stderr.strip().splitlines()[-1], done.stderr  # after argparse's usage
    assert "rank" not in done.stdout


@vm_test(300)
@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm_pair  # one guest; looks only at its own CLI's QEMU and directories
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name)
def test_lab_run_unwinds_on_hangup_and_quit(sig):
    """`ivshmem-lab run` stopped by SIGHUP or SIGQUIT (SIGTERM and Ctrl-C already were) kills
    its guests and removes its temporary dirs, as for SIGTERM."""
    lab = subprocess.Popen(
        [PYTHON, "-m", "ivshmem_lab.cli", "run", "--vms", "1", "--", "sh", "-c",
         "echo up; sleep 600"],
        cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert lab.stdout is not None
        for line in lab.stdout:
            if line.strip() == b"[vm0] up":
                break
        else:
            pytest.fail(f"the guest never said up (status {lab.wait()})")
        qemus = [pid for pid in descendants(lab.pid) if "qemu" in " ".join(cmdline(pid))]
        tmp = re.escape(tempfile.gettempdir())
        dirs = {
            d
            for pid in qemus
            for d in re.findall(tmp + r"/ivshmem-lab-[^\0, ]+", " ".join(cmdline(pid)))
        }
        assert qemus and dirs
        lab.send_signal(sig)
        assert lab.wait(60) == 128 + sig
        deadline = time.monotonic() + 10
        while not all(gone(pid) for pid in qemus):
            assert time.monotonic() < deadline, qemus
            time.sleep(0.05)
        assert not [d for d in dirs if os.path.exists(d)]
    finally:
        if lab.poll() is None:
            lab.kill()
            lab.wait()


def test_an_existing_region_is_refused_and_left_alone(regions):
    """--region naming a region that exists: refused in one line, and the region (someone
    else's) is neither overwritten nor removed."""
    name = regions(4 << 20, 2)
    done = subprocess.run(
        [*LAUNCHER, "-n", "2", "--region", name, PROGRAM, "wait"],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{name} exists" in done.stderr and "choose another --region" in done.stderr
    assert os.path.exists(f"/dev/shm/{name}")
