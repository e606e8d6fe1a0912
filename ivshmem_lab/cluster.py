"""A lab that stays up: networked guests with an exec agent, brokers, and ``mpiexec`` (issue 5).

:class:`LabCluster` boots V guests on a private network (:mod:`ivshmem_lab.net`), each
running the exec agent of :mod:`ivshmem_lab.exec_agent` and holding ``slots`` ``ivshmem-doorbell``
device (2 vectors) of a region a broker of the lab serves (as :mod:`ivshmem_lab.mpi` does).

Simulated hosts (``hosts`` = H, default 1): the guests are split into H blocks of
consecutive guests (:meth:`LabCluster.host_of`: guest i is on host ``i * H // V``), and
each host has a broker and a region of its own that only its guests hold devices of, as
separate physical hosts would; the LAN joins every guest of every host. A job over them
finds which ranks share a region (guest_lib.mpi's bootstrap) and uses MPICH over the LAN
between the hosts.
Its state lives in a private (0700) directory, ``<labs root>/<name>/``
(:func:`ivshmem_lab.exec_agent.labs_root`):

    lab.json   name, owner pid, regions (one per host, host order), host port of each
               guest's agent (the ports once every agent is ready; a lab whose owner pid
               is alive holds its name)
    token      the secret every exec connection presents (0600)
    ssh        an ssh-compatible launcher for this lab (hydra's ``-launcher-exec``)
    lan.sock   the LAN hub           brokerH/   host H's broker: socket, record and log

``start()`` returns once every agent is ready; it raises :class:`LabError` if the name is
taken by a live lab, a guest fails to boot or an agent does not come up within the timeout
(everything started is torn down first). ``close()`` kills the guests and the brokers,
removes the regions and the directory; it is idempotent.

:func:`mpiexec_argv` is the real hydra command line that runs ranks in the guests:
``mpiexec -launcher ssh -launcher-exec <lab>/ssh -localhost lab-host -hosts vm0:S,vm1:S -n N
-genv IVSHMEM_COMM_GUEST 1 -genv UCX_NET_DEVICES lan0 ... CMD``. The proxies reach mpiexec's
control port at ``lab-host`` (10.0.2.2 = the host's loopback through slirp); MPICH (UCX or
libfabric over TCP) talks between guests over ``lan0``; the ranks' data moves through the
ivshmem region of their host (``guest_lib.mpi`` routes ranks that share a region through
it, the others through MPICH; collectives are hierarchical across regions). Up to S
(``slots``) ranks per guest: a rank takes the doorbell device (the region slot) of its index
among its guest's ranks (hydra's ``MPI_LOCALRANKID``, see guest_lib.mpi.bootstrap).
:func:`run_mpiexec` boots a cluster, runs that command with this process's stdout/stderr,
tears the cluster down and returns mpiexec's exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from guest_lib.launch import BrokerProcess, forward_signals, guard, job_environ, supervise
from ivshmem_comm.hostos import ensure_private_dir, pid_alive
from ivshmem_lab.devices import DoorbellDevice
from ivshmem_lab.errors import LabError, LabUnavailable
from ivshmem_lab.exec_agent import AGENT_PORT, TOKEN_ENV, LabState, labs_root
from ivshmem_lab.guest import Guest
from ivshmem_lab.lab import Accel, Lab
from ivshmem_lab.mpi import job_broker, region_size
from ivshmem_lab.net import HOST_ALIAS, LAN_IFACE, LanHub, guest_network

__all__ = ["LabCluster", "find_mpiexec", "mpi_guest_env", "mpiexec_argv", "run_mpiexec"]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_READY = r"^ivshmem-lab-agent: ready"


def mpi_guest_env() -> dict[str, str]:
    """What ranks in the guests need: attach the guest's device, MPICH over ``lan0``."""
    return {
        "IVSHMEM_COMM_GUEST": "1",
        "UCX_NET_DEVICES": LAN_IFACE,
        "UCX_TLS": "tcp,self,sm",
        "FI_PROVIDER": "tcp",
        "FI_TCP_IFACE": LAN_IFACE,
    }


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LabCluster:
    """V networked guests with exec agents and brokers (see the module docstring).

    ``hosts``: how many simulated hosts share the ``vms`` guests (1..vms; each its own
    broker and region). ``name`` defaults to a fresh unique one; ``lab`` to
    ``Lab(accel, memory)``; ``cwd`` (the guests' working directory, default the caller's)
    must be visible in the guests (a folder under the host's /tmp is, through /init's bind).
    ``on_output(index, line)`` gets the guests' console output lines (the agents' own
    messages, not the commands'). Raises ValueError for a count or name out of range.
    """

    def __init__(
        self,
        vms: int = 2,
        *,
        slots: int = 1,
        hosts: int = 1,
        name: str | None = None,
        lab: Lab | None = None,
        accel: Accel = "auto",
        memory: str = "512M",
        cwd: str | None = None,
        on_output: Callable[[int, str], None] | None = None,
    ) -> None:
        if not 1 <= vms <= 64:
            raise ValueError(f"vms={vms}: expected 1..64")
        if not 1 <= slots <= 16:
            raise ValueError(f"slots={slots}: expected 1..16")
        if not 1 <= hosts <= vms:
            raise ValueError(f"hosts={hosts}: expected 1..{vms} (at least one guest each)")
        name = name or f"lab-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ValueError(f"bad lab name {name!r} (letters, digits, - _ .)")
        self.vms = vms
        self.slots = slots  # ranks per guest: one ivshmem-doorbell device (peer slot) each
        self.host_count = hosts
        self.name = name
        self.lab = lab or Lab(accel=accel, memory=memory)
        self.cwd = cwd or os.getcwd()
        self.on_output = on_output
        self.directory = labs_root() / name
        self.guests: list[Guest] = []
        tag = uuid.uuid4().hex[:6]
        # one region per simulated host (a single host keeps the plain name)
        self.regions = [f"lab-{name}-{tag}" + (f"-h{h}" if hosts > 1 else "") for h in range(hosts)]
        self._hub: LanHub | None = None
        self._brokers: list[BrokerProcess] = []
        self._made_dir = False
        self._closed = False

    @property
    def hosts(self) -> list[str]:
        """The guests' host names, ``vm0`` ...."""
        return [f"vm{i}" for i in range(self.vms)]

    def host_of(self, guest: int) -> int:
        """The simulated host (0..hosts-1) that guest ``guest`` (0..vms-1) runs on."""
        return guest * self.host_count // self.vms

    @property
    def ssh(self) -> str:
        """Path of this lab's ssh-compatible launcher (for hydra's ``-launcher-exec``)."""
        return str(self.directory / "ssh")

    def start(self, timeout: float = 180.0) -> LabCluster:
        """Boot everything; return when every agent is ready (see the module docstring)."""
        try:
            self._start(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _claim_directory(self) -> None:
        try:
            ensure_private_dir(self.directory.parent)
        except PermissionError as exc:
            raise LabError(str(exc)) from None
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            old = LabState.load(self.directory)
            if pid_alive(old.pid):
                raise LabError(f"lab {self.name} is already up (pid {old.pid}, {self.directory})")
        if self.directory.exists():
            shutil.rmtree(self.directory)  # a lab that died without cleaning up
        try:
            self.directory.mkdir(mode=0o700)
        except FileExistsError:
            raise LabError(f"lab {self.name} is being started by another process") from None
        self._made_dir = True
        guard(path=str(self.directory))
        self._write_state({})  # claims the name while booting (pid alive)

    def _write_state(self, ports: dict[str, int]) -> None:
        state = {"name": self.name, "pid": os.getpid(), "ports": ports, "regions": self.regions}
        tmp = self.directory / "lab.json.tmp"
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.directory / "lab.json")

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.lab.initramfs()
        self.lab.accel_in_use()
        self._claim_directory()
        d = self.directory
        token = secrets.token_hex(32)
        fd = os.open(d / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        self._hub = LanHub(str(d / "lan.sock")).start()
        sockets = []
        for h, region in enumerate(self.regions):
            peers = sum(self.host_of(i) == h for i in range(self.vms)) * self.slots
            broker = job_broker(region, region_size(peers), peers, str(d / f"broker{h}"))
            self._brokers.append(broker)
            sockets.append(broker.start().socket)
        ports = _free_ports(self.vms)
        env = {**job_environ(), TOKEN_ENV: token, "IVSHMEM_COMM_GUEST": "1"}
        agent = [sys.executable, "-m", "ivshmem_lab.exec_agent", "agent", "--port", str(AGENT_PORT)]
        for i in range(self.vms):
            net = guest_network(i, self.vms, self._hub.path, [(ports[i], AGENT_PORT)])
            device = DoorbellDevice(sockets[self.host_of(i)], 2)
            g = self.lab.guest(
                i, agent, devices=[device] * self.slots, cwd=self.cwd, env=env,
                inherit_env=False, vms=self.vms, on_output=self.on_output, network=net,
            )  # fmt: skip
            self.guests.append(g)
            g.start()
        for g in self.guests:
            left = max(1.0, deadline - time.monotonic())
            try:
                g.wait_for_line(_READY, timeout=left)
            except TimeoutError as e:
                raise LabError(f"vm{g.index}: exec agent not ready within {timeout} s") from e
        ssh = d / "ssh"
        ssh.write_text(
            f"#!{sys.executable}\n"
            f"# ssh-compatible launcher of VM lab {self.name} (ivshmem_lab.cluster)\n"
            "import sys\n"
            f"sys.path.insert(0, {str(_REPO_ROOT)!r})\n"
            "from ivshmem_lab.exec_agent import ssh_main\n"
            f"sys.exit(ssh_main(lab={str(d)!r}))\n"
        )
        ssh.chmod(0o700)
        self._write_state({f"vm{i}": p for i, p in enumerate(ports)})

    def close(self) -> None:
        """Kill the guests and the brokers, remove the regions and the lab's directory."""
        if self._closed:
            return
        self._closed = True
        for g in self.guests:
            g.close()
        for broker in self._brokers:
            broker.close()
        if self._hub is not None:
            self._hub.close()
        if self._made_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.directory.parent.rmdir()  # only if no other lab is up

    def __enter__(self) -> LabCluster:
        if not self.guests:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_mpiexec() -> str:
    """MPICH's hydra ``mpiexec`` next to this Python (the ``mpich`` wheel's), else on PATH.

    Raises :class:`LabUnavailable` if there is none.
    """
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if not found:
        raise LabUnavailable("no mpiexec found (pip install mpich)")
    return found


def mpiexec_argv(
    cluster: LabCluster,
    command: Sequence[str],
    *,
    n: int | None = None,
    mpiexec: str | None = None,
    extra: Sequence[str] = (),
    whole_lines: bool = False,
) -> list[str]:
    """The hydra command line that runs ``command`` as ``n`` ranks (default: every slot) in
    ``cluster``'s guests, ``cluster.slots`` per guest, filled guest by guest (hydra's order);
    ``extra`` goes before the command (more mpiexec options). With ``whole_lines`` each rank
    runs under ``python -m guest_lib.launch --`` so that hydra, which passes on each rank's
    output as it reads it, never mixes two ranks within a line."""
    places = cluster.vms * cluster.slots
    n = places if n is None else n
    if not 1 <= n <= places:
        raise ValueError(f"-n {n}: {cluster.slots} rank(s) per guest, so 1..{places}")
    hosts = ",".join(f"{h}:{cluster.slots}" for h in cluster.hosts)
    argv = [mpiexec or find_mpiexec(), "-launcher", "ssh", "-launcher-exec", cluster.ssh,
            "-localhost", HOST_ALIAS, "-hosts", hosts, "-n", str(n)]  # fmt: skip
    for key, value in mpi_guest_env().items():
        argv += ["-genv", key, value]
    wrap = [sys.executable, "-m", "guest_lib.launch", "--"] if whole_lines else []
    return [*argv, *extra, *wrap, *command]


def run_mpiexec(
    command: Sequence[str],
    *,
    vms: int = 2,
    n: int | None = None,
    slots: int = 1,
    hosts: int = 1,
    timeout: float | None = 600.0,
    lab: Lab | None = None,
    memory: str = "512M",
    accel: Accel = "auto",
    extra: Sequence[str] = (),
    on_ready: Callable[[LabCluster, list[str]], None] | None = None,
) -> int:
    """Boot a :class:`LabCluster` of ``vms`` guests on ``hosts`` simulated hosts, run
    :func:`mpiexec_argv` (ranks' output in whole lines) with this process's stdout/stderr,
    tear everything down; return
    mpiexec's exit status (124 if it ran past ``timeout`` seconds and was killed). SIGTERM,
    SIGINT, SIGHUP and SIGQUIT received while mpiexec runs go to it (hydra passes them on to
    the ranks); 2 s after the first it is killed, and the status is 128 + that signal.
    ``on_ready(cluster, argv)`` is called just before mpiexec starts. Raises
    LabError/LabUnavailable if the cluster cannot start."""
    mpiexec = find_mpiexec()
    env = job_environ()
    with LabCluster(vms, slots=slots, hosts=hosts, lab=lab, memory=memory, accel=accel) as cluster:
        argv = mpiexec_argv(cluster, command, n=n, mpiexec=mpiexec, extra=extra, whole_lines=True)
        if on_ready is not None:
            on_ready(cluster, argv)
        procs: list[subprocess.Popen[bytes]] = []
        with forward_signals(procs) as received:
            proc = subprocess.Popen(argv, env=env, start_new_session=True)
            procs.append(proc)
            guard(group=proc.pid)
            try:
                status = supervise(procs, timeout, signalled=received, who="ivshmem-lab mpiexec")
                return 128 + received[0] if received else status
            finally:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
