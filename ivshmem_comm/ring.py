"""Chooses the implementation of the queue halves once, at import.

The C accelerator (`ivshmem_comm._fastpath`) is used when it is built; the pure-Python
reference (`ivshmem_comm.virtqueue`) otherwise, or always when `IVSHMEM_COMM_PUREPYTHON=1`.
`IVSHMEM_COMM_REQUIRE_FASTPATH=1` makes a missing accelerator an ImportError (CI sets it).
The pure-Python path relies on x86-64 TSO and is refused on other CPUs.
"""

from __future__ import annotations

import os
import platform

from ivshmem_comm import virtqueue

IMPLEMENTATION: str

if os.environ.get("IVSHMEM_COMM_PUREPYTHON") == "1":
    TxRing, RxRing = virtqueue.TxRing, virtqueue.RxRing
    compare_exchange_u64 = virtqueue.compare_exchange_u64
    IMPLEMENTATION = "python"
else:
    try:
        from ivshmem_comm._fastpath import (  # type: ignore[no-redef]
            RxRing,
            TxRing,
            compare_exchange_u64,
        )

        IMPLEMENTATION = "c"
    except ImportError:
        if os.environ.get("IVSHMEM_COMM_REQUIRE_FASTPATH") == "1":
            raise
        TxRing, RxRing = virtqueue.TxRing, virtqueue.RxRing
        compare_exchange_u64 = virtqueue.compare_exchange_u64
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

__all__ = [
    "IMPLEMENTATION",
    "SEND_FULL",
    "SEND_KICK",
    "SEND_OK",
    "SEND_TOO_BIG",
    "RxRing",
    "TxRing",
    "compare_exchange_u64",
]
