"""The library's own service threads: threads it starts that never call into MPI (the broker
client's socket reader, `guest_lib.host_client`).

`guest_lib.mpi.fastpath.other_threads` subtracts them from the process's running threads, so
a process joined through a broker still takes the single-threaded (lock-free) fast paths
while its main thread is the only one calling MPI. The count may run one above the truth
around a thread's start and end (the thread is running, not yet or no longer counted here),
which only sends a call down the locking path; never below it.
"""

from __future__ import annotations

import threading
from _thread import _count
from collections.abc import Callable

# service threads inside their target now; a one-element list, so that importers read it by
# reference (written under _lock, read without: one word, and a stale read is the safe side)
running = [0]
_lock = threading.Lock()


def service(target: Callable[[], None]) -> Callable[[], None]:
    """`target` counted in `running` while it runs: the body of a service thread."""

    def run() -> None:
        with _lock:
            running[0] += 1
        try:
            target()
        finally:
            with _lock:
                running[0] -= 1

    return run


def other_threads() -> int:
    """The number of Python threads that may call MPI besides the main one: the threads
    running besides it, less the service threads among them."""
    return _count() - running[0]
