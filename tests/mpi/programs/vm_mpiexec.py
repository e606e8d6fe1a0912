"""Rank program of tests/test_mpiexec_vm.py: run under hydra's mpiexec inside lab guests.

Runs tests/mpi/programs/vm_job.py's checks (p2p and collectives), then prints one line
``RESULT {json}``: the rank, its hostname, the ivshmem PCI devices and DMI vendor it sees,
its bootstrap mode, attachment and routes, its region's queue counters before and after,
how many messages it handed to mpi4py, and the guest's established TCP connections.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import struct
from pathlib import Path

from guest_lib.mpi import MPI

PROGRAMS = Path(__file__).resolve().parent


def _tcp_connections() -> list[tuple[str, str]]:
    """Established TCP connections of this (guest) kernel: ("ip:port", "ip:port")."""

    def addr(field: str) -> str:
        ip, port = field.split(":")
        return f"{socket.inet_ntoa(struct.pack('<I', int(ip, 16)))}:{int(port, 16)}"

    conns = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[3] == "01":  # ESTABLISHED
                conns.append((addr(parts[1]), addr(parts[2])))
    return conns


def rank_main() -> None:
    """One rank under mpiexec in a guest: vm_job's checks, then a ``RESULT {json}`` line."""
    counters = runpy.run_path(str(PROGRAMS / "hybrid.py"))["counters"]
    vm_job = runpy.run_path(str(PROGRAMS / "vm_job.py"))["main"]
    state = MPI._internal_state()
    ep, engine = state["endpoint"], state["engine"]
    before, mpi_before = counters(ep), engine.mpi_messages
    vm_job()
    after = counters(ep)
    pci = [d for d in os.listdir("/sys/bus/pci/devices")
           if Path(f"/sys/bus/pci/devices/{d}/device").read_text().strip() == "0x1110"]  # fmt: skip
    result = {
        "rank": MPI.COMM_WORLD.Get_rank(),
        "hostname": socket.gethostname(),
        "mode": state["mode"],
        "attached": ep.attachment.kind,
        "routes": state["routes"],
        "region": state["region_uuid"],
        "shm_before": before,
        "shm_after": after,
        "mpi_messages": engine.mpi_messages - mpi_before,
        "ivshmem_pci": pci,
        "dmi_vendor": Path("/sys/class/dmi/id/sys_vendor").read_text().strip(),
        "tcp": _tcp_connections(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    rank_main()
