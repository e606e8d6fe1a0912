"""`ivshmem-lab run -n` and `ivshmem-lab mpiexec` stopped by a signal or killed outright leave
nothing behind: no QEMU, no broker, no mpiexec, no region or semaphore in /dev/shm, no state
or temporary directory (issue 10, item 6).

Each test starts the real CLI, waits until every rank printed in its guest (QEMU guests
booted, the job's broker serving its region), notes the processes and directories the job
made (from /proc: the QEMUs', the broker's and mpiexec's command lines), signals the CLI and
checks that all of them are gone within a few seconds. After SIGKILL the CLI cannot clean
up: its guardian process (guest_lib.launch.Guardian) does, also for ``mpiexec --hosts 2``
(two brokers and two regions). SIGTERM and SIGINT reach the
ranks in the guests first.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import cmdline, descendants, gone, vm_marks

REPO = Path(__file__).resolve().parents[2]
# vm_pair: each test looks only at what its own CLI made (its pids, its /dev/shm names), and its
# waits are generous limits, not measurements: CI runs two of them at once
pytestmark = [*vm_marks(240), pytest.mark.vm_pair]

# One token per rank, found even where hydra mixes two ranks' writes within a line.
RANK = (
    "import os, time; "
    "r = os.environ.get('PMI_RANK', os.environ.get('IVSHMEM_MPI_RANK')); "
    "print(f'rank-{r}-ready', flush=True); time.sleep(600)"
)

COMMANDS = {
    "run": ["run", "--vms", "1", "-n", "2", "--memory", "384M"],
    "mpiexec": ["mpiexec", "--vms", "1", "-n", "2", "--memory", "384M"],
}
# Two simulated hosts of one guest each: two brokers, two regions, all left to the guardian.
KILLED = {**COMMANDS, "mpiexec-2-hosts": ["mpiexec", "--hosts", "2", "--vms", "2", "--memory",
                                          "384M"]}  # fmt: skip


def _shm(lab_pid: int) -> list[str]:
    """/dev/shm entries of the job (regions and semaphores are named after the CLI's pid)."""
    return [f for f in os.listdir("/dev/shm") if f"-{lab_pid}-" in f]


class LabJob:
    """The CLI running `command` until every one of its `ranks` is ready; then what it made."""

    def __init__(self, command: str, ranks: int = 2) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ivshmem_lab.cli", *KILLED[command], "--",
             sys.executable, "-c", RANK],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.out = b""
        selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 180
        while len(set(re.findall(rb"rank-(\d+)-ready", self.out))) < ranks:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.out.decode()
            if selector.select(0.2):
                self.out += os.read(self.proc.stdout.fileno(), 1 << 16)
        selector.close()
        self.pids: dict[str, list[int]] = {"qemu": [], "broker": [], "mpiexec": []}
        self.paths: set[str] = set()
        for pid in descendants(self.proc.pid):
            argv = cmdline(pid)
            text = " ".join(argv)
            if "qemu-system" in text:
                self.pids["qemu"].append(pid)
                self.paths |= set(re.findall(r"path=(/tmp/ivshmem-lab-vm[^,]+)", text))
            elif "host_broker" in argv and "serve" in argv:
                self.pids["broker"].append(pid)
                self.paths.add(argv[argv.index("--state-dir") + 1])
            elif os.path.basename(argv[0] if argv else "") == "mpiexec":
                self.pids["mpiexec"].append(pid)
                self.paths.add(str(Path(argv[argv.index("-launcher-exec") + 1]).parent))
        assert self.pids["qemu"] and self.pids["broker"], (self.pids, self.out.decode())
        assert command.startswith("mpiexec") == bool(self.pids["mpiexec"]), self.pids
        assert self.paths and all(os.path.exists(p) for p in self.paths), self.paths
        assert _shm(self.proc.pid), "the job's region is not in /dev/shm"

    def left(self) -> list[str]:
        """What of the job is still there."""
        alive = [f"{what} {pid}" for what, pids in self.pids.items() for pid in pids]
        alive = [a for a in alive if not gone(int(a.split()[1]))]
        return alive + _shm(self.proc.pid) + [p for p in self.paths if os.path.exists(p)]

    def finish(self, timeout: float) -> int:
        """Wait for the CLI, then (within 15 s) for everything it made to be gone."""
        code = self.proc.wait(timeout)
        deadline = time.monotonic() + 15
        while self.left():
            assert time.monotonic() < deadline, (self.left(), self.out.decode())
            time.sleep(0.1)
        assert self.proc.stdout is not None
        self.out += self.proc.stdout.read()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.parametrize("command", sorted(KILLED))
def test_a_killed_lab_leaves_nothing(command: str) -> None:
    job = LabJob(command)
    try:
        hosts = 2 if command == "mpiexec-2-hosts" else 1
        assert len(job.pids["broker"]) == hosts, job.pids
        job.proc.send_signal(signal.SIGKILL)
        assert job.finish(10) == -signal.SIGKILL
    finally:
        job.close()


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.parametrize(
    ("command", "sig"),
    [
        (command, sig)
        for command in sorted(COMMANDS)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    ],
    ids=lambda value: value if isinstance(value, str) else signal.Signals(value).name,
)
def test_a_signal_reaches_the_ranks_then_nothing_is_left(command: str, sig: int) -> None:
    """The signal is forwarded (run: through each guest's control directory to the guest
    side, which passes it on to its ranks; mpiexec: to hydra, which does), then everything
    is torn down and the CLI exits 128 + the signal."""
    job = LabJob(command)
    try:
        job.proc.send_signal(sig)
        assert job.finish(60) == 128 + sig, job.out.decode()
        if command == "run":  # each rank died of the signal itself, in its guest
            for rank in (0, 1):
                assert f"ivshmem-lab-mpi: rank {rank} exit {128 + sig}".encode() in job.out, (
                    job.out.decode()
                )
    finally:
        job.close()
