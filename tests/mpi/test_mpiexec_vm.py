"""MPICH's real ``mpiexec`` (hydra) launching ranks inside VM-lab guests (issue 5).

- ``ivshmem-lab mpiexec --vms 2 -- python tests/mpi/programs/vm_mpiexec.py``: hydra's ssh
  launcher is the lab's exec (its ``-launcher-exec``), its proxies run in guests vm0 and vm1
  and reach mpiexec through slirp (``lab-host`` = 10.0.2.2 = the host's loopback). Each rank
  runs tests/mpi/programs/vm_job.py (p2p and collectives, checked there) and prints one
  ``RESULT`` line that shows where it ran
  (hostname, the ivshmem PCI device, QEMU's DMI vendor), that the rank-to-rank data moved
  through the region's queues (counters; nothing handed to mpi4py), and which TCP
  connections the guest had: MPICH's own between the guests' LAN addresses, hydra's
  control connection to 10.0.2.2.
- ``ivshmem-lab mpiexec --hosts 2 --vms 4``: one job over two simulated hosts (a broker and
  a region each, the LAN between them), one rank per guest
  (tests/mpi/programs/vm_twohosts.py): the counters show which bytes went where, phase by
  phase: same-host bytes in the region's queues (exactly) and never over TCP, cross-host bytes
  over TCP between those two guests only (the guests' kernels count them), and Allreduce and
  Bcast hierarchical: the region's collective area within each host, MPICH between the two
  leaders (ranks 0 and 2) only.
- ``ivshmem-lab up --hosts 2`` / ``exec`` / ``down``: a lab that stays up (here a host and a
  region per guest), commands run in named guests (stdin, exit status, hydra's ssh argv
  form, a wrong token refused), the printed mpiexec command line used as is, and nothing
  left behind.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ivshmem_lab.exec_agent import HELLO, labs_root, read_frame, write_frame
from tests.support import vm_marks

REPO = Path(__file__).resolve().parents[2]
PROGRAM = "tests/mpi/programs/vm_mpiexec.py"
ROUTE_SELF, ROUTE_SHM, ROUTE_MPI4PY = 0, 1, 2  # guest_lib.mpi.routes.SELF, SHM, MPI4PY


LAB_CLI = [sys.executable, "-m", "ivshmem_lab.cli"]
pytestmark = vm_marks(240)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(pid))
    return found


def _shm_regions() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("lab-")}


def _lab_mpiexec(options: list[str], program: str, timeout: float) -> tuple[str, str, list[str]]:
    """Run ``ivshmem-lab mpiexec OPTIONS --timeout TIMEOUT -- python PROGRAM`` from the
    repository: (stdout, stderr, the mpiexec command line it ran). Fails unless it exits 0."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [*LAB_CLI, "mpiexec", *options, "--timeout", str(timeout), "--", sys.executable, program],
        cwd=REPO, capture_output=True, text=True, timeout=timeout + 70,
    )  # fmt: skip
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"status {proc.returncode}\n{out}\n{err}"
    m = re.search(r"running (.*mpiexec .*)$", err, re.M)
    assert m, err
    print(f"\nivshmem-lab mpiexec {' '.join(options)}: {time.monotonic() - t0:.1f} s wall, boot "
          "included")  # fmt: skip
    return out, err, shlex.split(m.group(1))


def _results(out: str, ranks: int) -> list[dict]:
    """The RESULT objects of ranks 0..ranks-1, in rank order."""
    # hydra relays each rank's writes as they come: a line may run into another rank's
    decoder = json.JSONDecoder()
    results = sorted(
        (decoder.raw_decode(out, m.end())[0] for m in re.finditer("RESULT ", out)),
        key=lambda r: r["rank"],
    )
    assert [r["rank"] for r in results] == list(range(ranks)), out
    return results


def _check_torn_down(argv: list[str], shm_before: set[str]) -> None:
    """No QEMU, broker or agent of the lab mpiexec `argv` ran in is left, nor its lab
    directory, nor a region."""
    lab_dir = os.path.dirname(argv[argv.index("-launcher-exec") + 1])
    assert not _processes_mentioning(lab_dir)
    assert not os.path.exists(lab_dir)
    assert _shm_regions() <= shm_before


def _check_results(out: str, ranks: int = 2, slots: int = 1) -> list[dict]:
    """The RESULT lines of `ranks` ranks, `slots` per guest of two (hydra fills guest by guest)."""
    results = _results(out, ranks)
    for r in results:
        guest = r["rank"] // slots
        # ran inside guest vm<guest>, a QEMU machine with one ivshmem device per slot
        assert r["hostname"] == f"vm{guest}", r
        assert r["dmi_vendor"] == "QEMU" and len(r["ivshmem_pci"]) == slots, r
        assert r["mode"] == "mpiexec" and r["attached"] == "doorbell", r
        # every other rank is reached through the shared region, and the data went there
        assert all(route == ROUTE_SHM for w, (route, _) in enumerate(r["routes"]) if w != r["rank"])
        sent = r["shm_after"]["sent_bytes"] - r["shm_before"]["sent_bytes"]
        assert sent >= 2_400_000, r  # vm_job's 2.4 MB buffer at least
        assert r["shm_after"]["recv_messages"] > r["shm_before"]["recv_messages"], r
        assert r["mpi_messages"] == 0, r
        # MPICH's own connections are between the guests' LAN addresses; hydra's proxy
        # talks to mpiexec through slirp (10.0.2.2 = the host's loopback)
        me, peer = f"10.0.3.{10 + guest}", f"10.0.3.{11 - guest}"
        lan = [c for c in r["tcp"] if c[0].startswith(me + ":") and c[1].startswith(peer + ":")]
        assert lan, r["tcp"]
        assert any(c[1].startswith("10.0.2.2:") for c in r["tcp"]), r["tcp"]
    assert len({r["region"] for r in results}) == 1
    return results


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_mpiexec_runs_ranks_in_two_guests() -> None:
    shm_before = _shm_regions()
    out, _, argv = _lab_mpiexec(["--vms", "2"], PROGRAM, 150)
    assert argv[0].endswith("mpiexec") and argv[1:3] == ["-launcher", "ssh"], argv
    for rank in (0, 1):
        assert f"rank {rank}/2 ok attached=doorbell" in out, out
    results = _check_results(out)
    _check_torn_down(argv, shm_before)
    sent = [r["shm_after"]["sent_bytes"] - r["shm_before"]["sent_bytes"] for r in results]
    print(f"shm bytes sent {sent}")


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_mpiexec_two_ranks_in_each_of_two_guests() -> None:
    """-n 4 over two guests: hydra puts ranks 0-1 in vm0 and 2-3 in vm1; each takes its own
    doorbell device (slot) by its local rank, and all four share one region."""
    out, _, _ = _lab_mpiexec(["--vms", "2", "-n", "4"], PROGRAM, 200)
    results = _check_results(out, ranks=4, slots=2)
    peers = {r["rank"]: r["routes"][(r["rank"] + 1) % 4][1] for r in results}
    assert len(set(peers.values())) == 4, peers  # four distinct slots of the region


def _lan_address(rank: int) -> str:
    """The LAN address of the guest of `rank` (one rank per guest: vm<rank>)."""
    return f"10.0.3.{10 + rank}"


def _check_two_hosts_phases(results: list[dict], n: int, m: int, slack: int) -> None:
    """vm_twohosts' counters, phase by phase (see the module docstring): `n` bytes sent to
    each other rank, `m` bytes reduced and broadcast, `slack` bytes of MPICH's headers and
    the barriers' own traffic at most."""
    peer = {r["rank"]: r["peer"] for r in results}
    barrier_rounds = {r["rank"]: r["phases"]["barriers"]["area"] for r in results}
    for r in results:
        rank, mate = r["rank"], r["rank"] ^ 1
        leader, other_leader = rank in (0, 2), _lan_address(2 - rank)
        remote = {_lan_address(o) for o in range(4) if o // 2 != rank // 2}
        phases = r["phases"]
        # every rank sent n bytes to each other rank: the same-host ones through the region's
        # two queues, exactly, and nothing else moved in the region ...
        p = phases["pattern"]
        assert p["queue"] == {f"{peer[rank]}>{peer[mate]}": n, f"{peer[mate]}>{peer[rank]}": n}, r
        # ... the cross-host ones handed to MPICH and carried by TCP between those two guests
        assert p["mpi"] == 2 * n, r
        assert set(p["tcp"]) == remote, r  # no TCP byte to or from the same-host guest
        for _, got in p["tcp"].values():  # received: all in before the closing barrier
            assert n <= got <= n + slack, r
        tx, rx = p["lan"]  # lan0's frames: 2n and their headers, far from the 3n of all three
        assert 2 * n <= tx <= 2.5 * n and 2 * n <= rx <= 2.5 * n, r
        # the barriers: the area within the host, MPICH between the leaders only
        b = phases["barriers"]
        assert b["area"] > 0 and not any(b["queue"].values()) and b["mpi"] == 0, r
        assert set(b["tcp"]) <= ({other_leader} if leader else set()), r
        assert all(v <= slack for pair in b["tcp"].values() for v in pair), r
        for name in ("allreduce", "bcast"):
            c = phases[name]
            # within the host: the collective area (more rounds than the barriers alone),
            # not one byte through the queues, nothing through the p2p route to MPICH
            assert c["area"] > barrier_rounds[rank] and not any(c["queue"].values()), (name, r)
            assert c["mpi"] == 0, (name, r)
            if not leader:  # not one TCP byte, and lan0 at most the noise of ARP
                assert c["tcp"] == {} and max(c["lan"]) < 1024, (name, r)
                continue
            assert set(c["tcp"]) == {other_leader}, (name, r)
            got = c["tcp"][other_leader][1]
            # Allreduce: each leader needs the other host's m bytes; Bcast from rank 3: rank 2
            # (its host's leader) sends m to rank 0, and gets nothing back
            least = m if name == "allreduce" or rank == 0 else 0
            assert least <= got <= least + slack, (name, r)


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.timeout(600)  # four TCG guests on 2 cores: 52 s idle, 185 s at load 11, 431 at 16
def test_mpiexec_one_job_over_two_hosts() -> None:
    shm_before = _shm_regions()
    program = "tests/mpi/programs/vm_twohosts.py"
    out, err, argv = _lab_mpiexec(["--hosts", "2", "--vms", "4"], program, 520)
    layout = re.findall(r"^ivshmem-lab: host (\d+): (.*), region (\S+)$", err, re.M)
    assert [(h, g) for h, g, _ in layout] == [("0", "vm0 vm1"), ("1", "vm2 vm3")], err
    assert layout[0][2] != layout[1][2]
    results = _results(out, 4)
    for r in results:
        rank = r["rank"]
        # one rank per guest, each guest with one ivshmem device: its own host's region
        assert r["hostname"] == f"vm{rank}" and len(r["ivshmem_pci"]) == 1, r
        expected = [ROUTE_SELF if o == rank else ROUTE_SHM if o // 2 == rank // 2
                    else ROUTE_MPI4PY for o in range(4)]  # fmt: skip
        assert [code for code, _ in r["routes"]] == expected, r
    assert results[0]["region"] == results[1]["region"] != results[2]["region"]
    assert results[2]["region"] == results[3]["region"]
    # vm_twohosts' PATTERN_BYTES and COLL_COUNT float64
    _check_two_hosts_phases(results, n=1 << 20, m=4096 * 8, slack=16 << 10)
    _check_torn_down(argv, shm_before)


def _lab(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAB_CLI, *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def _read_until(stream, pattern: str, timeout: float) -> list[str]:
    lines: list[str] = []
    done = threading.Event()

    def reader() -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if re.search(pattern, line):
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    return lines


ATTACH = (  # in a guest: how many ivshmem-doorbell devices it has, the region it attaches
    "import guest_lib; from guest_lib import pci; ep = guest_lib.attach(); "
    "print(len(pci.doorbell_devices()), ep.region.uuid)"
)


@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
def test_up_exec_down() -> None:
    """(Two simulated hosts of one guest each: what a single host does too, plus a region
    per host.)"""
    name = f"t{os.getpid()}"
    t0 = time.monotonic()
    up = subprocess.Popen(
        [*LAB_CLI, "up", "--hosts", "2", "--vms", "2", "--name", name],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lab_dir = labs_root() / name
    try:
        lines = _read_until(up.stdout, r"^ready$", 150)
        assert lines and lines[-1] == "ready", (lines, up.poll())
        t_up = time.monotonic() - t0

        done = _lab("exec", "--lab", name, "vm1", "--", "sh", "-c", "hostname; cat; exit 7",
                   stdin="hello\n")  # fmt: skip
        assert (done.returncode, done.stdout) == (7, "vm1\nhello\n"), done
        # each guest holds a device of its own host's region, and of no other
        regions = json.loads((lab_dir / "lab.json").read_text())["regions"]
        hosts = [f"ivshmem-lab: host {h}: vm{h}, region {regions[h]}" for h in (0, 1)]
        assert [x for x in lines if ": host " in x] == hosts, lines
        uuids = []
        for guest in ("vm0", "vm1"):
            done = _lab("exec", "--lab", name, guest, "--", sys.executable, "-c", ATTACH)
            assert done.returncode == 0 and done.stdout.startswith("1 "), done
            uuids.append(done.stdout.split()[1])
        assert uuids[0] != uuids[1], uuids
        ssh = str(lab_dir / "ssh")  # hydra's form: options, host, quoted words for sh -c
        done = subprocess.run([ssh, "-x", "vm0", '"/bin/echo"', "a", "b"], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "a b\n"), done
        # a connection without the lab's token runs nothing
        port = json.loads((lab_dir / "lab.json").read_text())["ports"]["vm0"]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            write_frame(s, HELLO, json.dumps({"token": "0" * 64, "argv": ["true"]}).encode())
            frames = [read_frame(s), read_frame(s)]
        assert frames == [(b"E", b"ivshmem-lab agent: permission denied\n"), (b"X", b"255")]
        # the printed mpiexec line works as is (CMD replaced by a command)
        line = next(x for x in lines if x.startswith("ivshmem-lab: mpiexec: "))
        argv = shlex.split(line.split(": ", 2)[2])
        done = subprocess.run([*argv[:-1], "hostname"], cwd=REPO, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0 and sorted(done.stdout.split()) == ["vm0", "vm1"], done
        assert _lab("down", "--lab", name).returncode == 0
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert not lab_dir.exists()
    assert not _processes_mentioning(str(lab_dir))
    assert _lab("down", "--lab", name).returncode == 1  # no such lab any more
    print(f"\nup (2 guests) in {t_up:.1f} s; up/exec/down {time.monotonic() - t0:.1f} s")
