"""Rank program of the shared-window VM test: Win.Allocate_shared between lab guests.

Run by `ivshmem-lab run --vms 2 -n 2 -- python tests/mpi/programs/win_shared_vm.py`. Rank 0
stores numpy data into its segment of a shared window; after a Fence, rank 1 reads it through
Shared_query and checks it. The queues' byte counters (every message between the two peers
goes through them) show that no message carried the data: the bytes that moved between the
two Fences are a few hundred, the data 1 MiB. Prints `rank R: shared window ok ...`.
"""

from __future__ import annotations

import numpy as np

from guest_lib.mpi import MPI

NBYTES = 1 << 20


def queue_traffic(ep: object) -> np.ndarray:
    """(messages, bytes) this rank's endpoint sent and received through its queues so far."""
    region, me = ep.region, ep.peer_id  # type: ignore[attr-defined]
    total = np.zeros(2, np.int64)
    for other in range(region.max_peers):
        if other != me:
            for src, dst in ((me, other), (other, me)):
                counters = region.queue_counters(src, dst)
                total += (counters["sent_messages"], counters["sent_bytes"])
    return total


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    ep = MPI._internal_state()["endpoint"]
    win = MPI.Win.Allocate_shared(NBYTES if rank == 0 else 0, 8, comm=comm)
    segment, unit = win.Shared_query(0)
    data = np.frombuffer(segment, np.float64)
    assert unit == 8 and data.size == NBYTES // 8, (unit, data.size)
    print(f"rank {rank}: window up, segment 0 at {MPI.Get_address(segment):#x}", flush=True)
    win.Fence()
    before = queue_traffic(ep)
    if rank == 0:
        data[:] = np.sin(np.arange(data.size, dtype=np.float64))  # plain stores
    win.Fence()
    messages, moved = queue_traffic(ep) - before
    if rank != 0:
        assert np.array_equal(data, np.sin(np.arange(data.size, dtype=np.float64)))
    assert messages > 0 and moved < 4096, f"{messages} messages, {moved} bytes in the queues"
    address = MPI.Get_address(segment)
    print(f"rank {rank}: shared window ok: {NBYTES} bytes seen through the region, "
          f"{moved} bytes through the queues ({messages} messages: the Fence), "
          f"segment at {address:#x}", flush=True)  # fmt: skip
    win.Free()


if __name__ == "__main__":
    main()
