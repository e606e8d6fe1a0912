"""Rank program of the VM MPI test: p2p and collectives across lab guests, checked.

Run by `ivshmem-lab run --vms V -n N -- python tests/mpi/programs/vm_job.py`; works for any
N >= 2. Prints one line per check and, at the end, `rank R/N ok attached=KIND peer=P`.
"""

from __future__ import annotations

import time

import numpy as np

from guest_lib.mpi import MPI


def main() -> None:
    t0 = time.monotonic()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    assert size >= 2, size
    ep = MPI._internal_state()["endpoint"]
    kind = getattr(getattr(ep, "attachment", None), "kind", "?")
    print(f"rank {rank}/{size} up: peer {ep.peer_id} attached {kind}", flush=True)
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    # p2p: objects around the ring, then a buffer in each direction with every other rank
    if rank == 0:
        comm.send({"hop": 1, "path": [0]}, dest=nxt, tag=7)
        token = comm.recv(source=prv, tag=7)
        assert token == {"hop": size, "path": list(range(size))}, token
    else:
        token = comm.recv(source=prv, tag=7)
        assert token["hop"] == rank and token["path"] == list(range(rank)), token
        token["hop"] += 1
        token["path"].append(rank)
        comm.send(token, dest=nxt, tag=7)
    print(f"rank {rank}: ring of objects ok", flush=True)
    for other in range(size):
        if other == rank:
            continue
        out = np.arange(300_000, dtype=np.int64) * (rank + 1)  # 2.4 MB
        back = np.empty_like(out)
        if rank < other:
            comm.Send(out, dest=other, tag=8)
            comm.Recv(back, source=other, tag=8)
        else:
            comm.Recv(back, source=other, tag=8)
            comm.Send(out, dest=other, tag=8)
        assert np.array_equal(back, np.arange(300_000, dtype=np.int64) * (other + 1))
        small = comm.sendrecv(("hi", rank), dest=other, sendtag=9, source=other, recvtag=9)
        assert small == ("hi", other), small
    print(f"rank {rank}: buffers and sendrecv with every rank ok", flush=True)
    # collectives
    comm.Barrier()
    cfg = comm.bcast({"seed": 42, "n": size} if rank == 0 else None, root=0)
    assert cfg == {"seed": 42, "n": size}, cfg
    arr = np.linspace(0, 1, 100_000) if rank == size - 1 else np.zeros(100_000)
    comm.Bcast(arr, root=size - 1)
    assert arr[-1] == 1.0 and arr[1] > 0
    total = comm.allreduce(rank + 1, op=MPI.SUM)
    assert total == size * (size + 1) // 2, total
    vec = np.zeros(50_000)
    comm.Allreduce(np.full(50_000, float(rank)), vec, MPI.SUM)
    assert vec[0] == vec[-1] == sum(range(size)), vec[:2]
    assert comm.allreduce(rank, op=MPI.MAX) == size - 1
    names = comm.gather(f"r{rank}", root=0)
    assert names == ([f"r{r}" for r in range(size)] if rank == 0 else None), names
    g = np.zeros(size, "i") if rank == 0 else None
    comm.Gather(np.array([rank * 3], "i"), g, root=0)
    assert rank != 0 or list(g) == [3 * r for r in range(size)], g
    assert comm.allgather(rank) == list(range(size))
    comm.Barrier()
    print(
        f"rank {rank}: collectives ok (bcast {cfg}, allreduce {total}, gather {names})",
        flush=True,
    )
    dt = time.monotonic() - t0
    print(f"rank {rank}/{size} ok attached={kind} peer={ep.peer_id} in {dt:.1f} s", flush=True)


if __name__ == "__main__":
    main()
