"""Rank program of tests/mpi/test_twohosts_vm.py: one mpiexec job over two simulated hosts.

Run with one rank per guest under ``ivshmem-lab mpiexec --hosts 2 --vms 4``: ranks 0-1 share
host A's region, ranks 2-3 host B's, and MPICH joins the hosts over the lab LAN. Each phase
below is checked here for its data and measured by counters taken before and after it:

- ``queue``: the bytes sent through every queue of this rank's region (``"src>dst"`` by peer
  id: the region's own counters, which either member of the region can read);
- ``area``: the rounds this rank ran in the region's collective area (the low bits of its
  arrive words, summed over the slots);
- ``tcp``: per LAN address of another guest, the bytes that guest acknowledged and the bytes
  received from it over this guest's TCP connections (the kernel's, from ``ss -tin``),
  and ``lan``: lan0's transmitted and received bytes (frames, headers included);
- ``mpi``: the payload bytes this rank handed to MPICH through the hybrid route.

Phases, each between two barriers: ``barriers`` (nothing else: what the barriers add to the
others), ``pattern`` (every rank sends PATTERN_BYTES to every other rank, nonblocking),
``allreduce`` (SUM of COLL_COUNT float64, small enough for the area's slab) and ``bcast``
(COLL_COUNT float64 from rank 3, not a leader). Then one line ``RESULT {json}``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np

from guest_lib.mpi import MPI
from ivshmem_comm import layout

PATTERN_BYTES = 1 << 20
COLL_COUNT = 4096  # 32 KiB
LAN_PREFIX = "10.0.3."


def _queue_bytes(ep) -> dict[str, int]:
    region = ep.region
    return {
        f"{src}>{dst}": region.queue_counters(src, dst)["sent_bytes"]
        for src in range(region.max_peers)
        for dst in range(region.max_peers)
        if src != dst
    }


def _area_rounds(ep) -> int:
    """Rounds this peer published in the collective area, over every slot (the latest round
    in either cell of its block: round k is in cell k % COLL_CELLS)."""
    region, g = ep.region, ep.region.geometry
    return sum(
        max(
            region.u64[(g.coll_peer_offset(slot, ep.peer_id) + c * layout.COLL_LINE_STRIDE) // 8]
            & layout.COLL_SEQ_MASK
            for c in range(layout.COLL_CELLS)
        )
        for slot in range(g.coll_slots)
    )


def _tcp() -> dict[str, list[int]]:
    """{peer LAN address: [bytes acked, bytes received]} over this guest's connections."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    found: dict[str, list[int]] = {}
    peer = None
    for line in out.splitlines():
        if not line[:1].isspace():  # "0 0 10.0.3.10:40123 10.0.3.12:36811"
            fields = line.split()
            peer = fields[3].rsplit(":", 1)[0] if len(fields) >= 4 else None
            continue
        if peer is None or not peer.startswith(LAN_PREFIX):
            continue
        info = dict(f.split(":", 1) for f in line.split() if ":" in f)
        totals = found.setdefault(peer, [0, 0])
        totals[0] += int(info.get("bytes_acked", 0))
        totals[1] += int(info.get("bytes_received", 0))
    return found


def _lan() -> list[int]:
    stats = Path("/sys/class/net/lan0/statistics")
    return [int((stats / name).read_text()) for name in ("tx_bytes", "rx_bytes")]


def _snapshot(ep, engine) -> dict:
    return {"queue": _queue_bytes(ep), "area": _area_rounds(ep), "tcp": _tcp(), "lan": _lan(),
            "mpi": engine.mpi_bytes}  # fmt: skip


def _delta(before: dict, after: dict) -> dict:
    tcp = {
        peer: [a - b for a, b in zip(now, before["tcp"].get(peer, [0, 0]), strict=True)]
        for peer, now in after["tcp"].items()
    }
    return {
        "queue": {k: v - before["queue"][k] for k, v in after["queue"].items()},
        "area": after["area"] - before["area"],
        "tcp": {peer: v for peer, v in tcp.items() if any(v)},
        "lan": [a - b for a, b in zip(after["lan"], before["lan"], strict=True)],
        "mpi": after["mpi"] - before["mpi"],
    }


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    state = MPI._internal_state()
    ep, engine = state["endpoint"], state["engine"]
    # warm-up: the hierarchy, the area's binding and MPICH's connections are made here
    comm.Barrier()
    comm.Allreduce(np.ones(COLL_COUNT), np.empty(COLL_COUNT), MPI.SUM)
    comm.Bcast(np.zeros(COLL_COUNT), root=3)
    for other in range(size):
        if other != rank:
            comm.sendrecv(rank, other, 9, None, other, 9)
    comm.Barrier()
    phases = {}

    def measure(name: str, run) -> None:
        # The barriers keep each phase's traffic between every rank's two snapshots: a
        # guest's kernel counts bytes as they arrive, maybe before its rank reaches the call.
        before = _snapshot(ep, engine)
        comm.Barrier()
        run()
        comm.Barrier()
        phases[name] = _delta(before, _snapshot(ep, engine))

    def pattern() -> None:
        others = [o for o in range(size) if o != rank]
        bufs = {o: np.empty(PATTERN_BYTES, np.uint8) for o in others}
        reqs = [comm.Irecv(bufs[o], o, 5) for o in others]
        reqs += [comm.Isend(np.full(PATTERN_BYTES, 16 * rank + o, np.uint8), o, 5) for o in others]
        MPI.Request.Waitall(reqs)
        for o, buf in bufs.items():
            assert (buf == 16 * o + rank).all(), (rank, o)

    def allreduce() -> None:
        out = np.empty(COLL_COUNT)
        comm.Allreduce(np.arange(COLL_COUNT) * (rank + 1.0), out, MPI.SUM)
        assert (out == np.arange(COLL_COUNT) * (size * (size + 1) / 2)).all(), rank

    def bcast() -> None:
        buf = np.arange(COLL_COUNT, dtype=np.float64) if rank == 3 else np.zeros(COLL_COUNT)
        comm.Bcast(buf, root=3)
        assert (buf == np.arange(COLL_COUNT)).all(), rank

    measure("barriers", lambda: None)  # the two barriers alone: what every phase adds
    measure("pattern", pattern)
    measure("allreduce", allreduce)
    measure("bcast", bcast)
    result = {
        "rank": rank,
        "hostname": socket.gethostname(),
        "region": state["region_uuid"],
        "peer": ep.peer_id,
        "routes": state["routes"],
        "ivshmem_pci": [
            d
            for d in os.listdir("/sys/bus/pci/devices")
            if Path(f"/sys/bus/pci/devices/{d}/device").read_text().strip() == "0x1110"
        ],
        "phases": phases,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
