"""Rank program of the hybrid test: p2p between every pair and every collective, checked.

Writes one JSON line per rank to argv[1] + f".{rank}": its region UUID, routes, the queue
counters of its region before and after, and how many messages it gave to mpi4py.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from guest_lib.mpi import MPI


def counters(ep) -> dict[str, int]:
    """Messages and bytes this peer sent into / received from its region's queues."""
    region, me = ep.region, ep.peer_id
    total = {"sent_messages": 0, "sent_bytes": 0, "recv_messages": 0}
    for other in range(region.max_peers):
        if other != me:
            out, into = region.queue_counters(me, other), region.queue_counters(other, me)
            total["sent_messages"] += out["sent_messages"]
            total["sent_bytes"] += out["sent_bytes"]
            total["recv_messages"] += into["recv_messages"]
    return total


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    state = MPI._internal_state()
    ep = state["endpoint"]
    before = counters(ep)
    mpi_before = state["engine"].mpi_messages
    # p2p between every ordered pair, objects and buffers, small and large
    for other in range(size):
        if other == rank:
            continue
        got = comm.sendrecv({"from": rank}, other, 1, None, other, 1)
        assert got == {"from": other}, got
        big = np.full(1_500_000, rank, np.float64)
        rbuf = np.empty_like(big)
        comm.Sendrecv(big, other, 2, rbuf, other, 2)
        assert rbuf[0] == other and rbuf[-1] == other
    status = MPI.Status()
    comm.send(rank, (rank + 1) % size, 3)
    assert comm.recv(source=MPI.ANY_SOURCE, tag=3, status=status) == (rank - 1) % size
    # every collective, objects and buffers
    comm.Barrier()
    assert comm.bcast(rank * 7 if rank == 2 else None, root=2) == 14
    b = np.arange(10.0) if rank == 1 else np.zeros(10)
    comm.Bcast(b, root=1)
    assert b[9] == 9.0
    assert comm.gather(rank, root=3) == (list(range(size)) if rank == 3 else None)
    assert comm.scatter(list(range(size)) if rank == 0 else None, root=0) == rank
    assert comm.allgather(rank) == list(range(size))
    assert comm.alltoall([rank * 10 + d for d in range(size)]) == [
        s * 10 + rank for s in range(size)]  # fmt: skip
    assert comm.reduce(rank, op=MPI.SUM, root=1) == (sum(range(size)) if rank == 1 else None)
    assert comm.allreduce(rank, op=MPI.MAX) == size - 1
    assert comm.scan(1) == rank + 1
    assert comm.exscan(1) == (None if rank == 0 else rank)
    g = np.zeros(size, "i") if rank == 0 else None
    comm.Gather(np.array([rank], "i"), g, root=0)
    assert rank != 0 or list(g) == list(range(size))
    s = np.zeros(1, "i")
    comm.Scatter(np.arange(size, dtype="i") if rank == 2 else None, s, root=2)
    assert s[0] == rank
    ag = np.zeros(size, "i")
    comm.Allgather(np.array([rank], "i"), ag)
    assert list(ag) == list(range(size))
    at = np.zeros(size, "i")
    comm.Alltoall(np.arange(size, dtype="i") + 100 * rank, at)
    assert list(at) == [100 * s_ + rank for s_ in range(size)]
    r = np.zeros(1_000_000)
    comm.Allreduce(np.full(1_000_000, rank + 1.0), r, MPI.SUM)
    assert r[0] == size * (size + 1) / 2 and r[-1] == r[0]
    rr = np.zeros(3)
    comm.Reduce(np.full(3, float(rank)), rr, MPI.SUM, root=3)
    assert rank != 3 or rr[0] == sum(range(size))
    rsb = np.zeros(2)
    comm.Reduce_scatter_block(np.arange(2.0 * size), rsb, MPI.SUM)
    assert rsb[0] == 2 * rank * size
    sc = np.zeros(1, "i")
    comm.Scan(np.ones(1, "i"), sc, MPI.SUM)
    assert sc[0] == rank + 1
    ex = np.zeros(1, "i")
    comm.Exscan(np.ones(1, "i"), ex, MPI.SUM)
    assert rank == 0 or ex[0] == rank
    dup = comm.Dup()
    assert dup.allreduce(1) == size
    sub = comm.Split(rank % 2, rank)
    assert sub.allgather(rank) == [r_ for r_ in range(size) if r_ % 2 == rank % 2]
    comm.Barrier()
    after = counters(ep)
    result = {
        "rank": rank,
        "region": state["region_uuid"],
        "routes": state["routes"],
        "shm_before": before,
        "shm_after": after,
        "mpi_messages": state["engine"].mpi_messages - mpi_before,
    }
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        f.write(json.dumps(result))


if __name__ == "__main__":
    main()
