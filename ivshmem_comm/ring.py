"""Chooses the implementation of the queue halves once, at import.

The C accelerator (`ivshmem_comm._fastpath`) is used when it is built; the pure-Python
reference (`ivshmem_comm.virtqueue`) otherwise, or always when `IVSHMEM_COMM_PUREPYTHON=1`.
`IVSHMEM_COMM_REQUIRE_FASTPATH=1` makes a missing accelerator an ImportError (CI sets it).
The pure-Python path relies on x86-64 TSO and is refused on other CPUs.

The contract between the two (tests/core/test_contract.py checks it): both modules export
TxRing, RxRing, full_fence, compare_exchange_u64 and the SEND_* codes; each ring class has
exactly the public names in TX_API / RX_API, with the signatures of the reference (the C
module's are declared in `_fastpath.pyi`); the layout constants `_fastpath.c` restates are
those of `layout.py`. Code outside the two implementations takes these names from here
only, so that it runs on the chosen one: e.g. `full_fence` here is the C fence (a real
`mfence`-class barrier) on the C path, the reference's on the pure-Python path.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from ivshmem_comm import virtqueue

IMPLEMENTATION: str
#: The C accelerator's one-round collectives (collective.CollectiveGroup uses them when set),
#: None on the pure-Python path.
CollectiveRound: Any = None
#: C-only helpers of the MPI face, None on the pure-Python path: the per-call parser of
#: buffer specs (guest_lib.mpi.buffers has its Python reference), the base type through
#: which MPI windows export their memory (guest_lib.mpi.win) and the one through which
#: MPI.BOTTOM, IN_PLACE and BUFFER_AUTOMATIC export an empty buffer (guest_lib.mpi.constants),
#: and the tables of CollectiveRound.front (guest_lib.mpi.collectives sets them), and the
#: one-call blocking point-to-point fast paths (guest_lib.mpi.fastpath.make_lane).
flat_view: Any = None
P2PLane: Any = None
set_front: Any = None
#: The MPI face's per-message request objects made and read in C (guest_lib.mpi.request
#: registers its classes with p2p_types and has the Python reference of each), None on the
#: pure-Python path.
p2p_types: Any = None
new_request: Any = None
post_recv: Any = None
irecv_post: Any = None
isend_post: Any = None
#: The C fronts of the MPI face's object send and receive methods (guest_lib.mpi.comm), None
#: on the pure-Python path.
obj_methods: Any = None
first_pending: Any = None
null_done: Any = None
#: A new object with a template's slot values (guest_lib.mpi.collectives' started rounds and
#: their requests), None on the pure-Python path.
copy_slots: Any = None
MemoryExporter: Any = None
EmptyExporter: Any = None

#: The public names of each queue half, in both implementations.
TX_API = frozenset(
    {
        "arm", "broken", "check_sync", "count_full_wait", "count_message", "data_offset",
        "data_size", "in_flight", "mark_broken", "max_span", "num", "peer", "publish",
        "publish_payload", "reclaim", "reserve", "reset", "send_small", "session", "write",
        "write_header",
    }
)  # fmt: skip
RX_API = frozenset(
    {
        "arm", "broken", "check_sync", "complete", "count_message", "count_sleep",
        "data_offset", "data_size", "held", "mark_broken", "max_span", "num", "peer", "poll",
        "poll_header", "read_header", "read_into", "recv_small_into", "reset", "session",
        "stream_into", "take_posted", "wait_header",
    }
)  # fmt: skip

if os.environ.get("IVSHMEM_COMM_PUREPYTHON") == "1":
    TxRing, RxRing = virtqueue.TxRing, virtqueue.RxRing
    compare_exchange_u64 = virtqueue.compare_exchange_u64
    full_fence = virtqueue.full_fence
    IMPLEMENTATION = "python"
else:
    try:
        from ivshmem_comm._fastpath import (  # type: ignore[assignment]
            CollectiveRound,
            EmptyExporter,
            MemoryExporter,
            P2PLane,
            RxRing,
            TxRing,
            compare_exchange_u64,
            copy_slots,
            first_pending,
            flat_view,
            full_fence,
            irecv_post,
            isend_post,
            new_request,
            null_done,
            obj_methods,
            p2p_types,
            post_recv,
            set_front,
        )

        IMPLEMENTATION = "c"
    except ImportError:
        if os.environ.get("IVSHMEM_COMM_REQUIRE_FASTPATH") == "1":
            raise
        TxRing, RxRing = virtqueue.TxRing, virtqueue.RxRing
        compare_exchange_u64 = virtqueue.compare_exchange_u64
        full_fence = virtqueue.full_fence
        IMPLEMENTATION = "python"

if IMPLEMENTATION == "python" and platform.machine() not in ("x86_64", "AMD64", "i686"):
    raise ImportError(
        "the pure-Python ring relies on x86 TSO ordering; build ivshmem_comm._fastpath on "
        f"{platform.machine()}"
    )

SEND_OK = virtqueue.SEND_OK
SEND_KICK = virtqueue.SEND_KICK
SEND_FULL = virtqueue.SEND_FULL
SEND_TOO_BIG = virtqueue.SEND_TOO_BIG
RESERVE_LATER = virtqueue.RESERVE_LATER

__all__ = [
    "IMPLEMENTATION",
    "RESERVE_LATER",
    "RX_API",
    "SEND_FULL",
    "SEND_KICK",
    "SEND_OK",
    "SEND_TOO_BIG",
    "TX_API",
    "CollectiveRound",
    "EmptyExporter",
    "MemoryExporter",
    "P2PLane",
    "RxRing",
    "TxRing",
    "compare_exchange_u64",
    "copy_slots",
    "first_pending",
    "flat_view",
    "full_fence",
    "irecv_post",
    "isend_post",
    "new_request",
    "null_done",
    "obj_methods",
    "p2p_types",
    "post_recv",
    "set_front",
]
