"""Two real processes exchange 100,000 content-checked messages of mixed sizes both ways.

Each process runs a sending thread and a receiving thread, each on its own endpoint (an
Endpoint serves one thread), so both directions are busy at once: A's sender (peer 0) talks
to B's receiver (peer 3), B's sender (peer 2) to A's receiver (peer 1). Sizes are mostly
small, some medium, a few megabytes and a few 64 MiB, far beyond the 12 MiB data areas.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import ivshmem_comm as ic
from tests.support import destroy, unique_name

TOTAL = int(os.environ.get("STRESS_MESSAGES", "100000"))  # both directions together
BIG = 64 << 20
_PATTERN = np.random.default_rng(1234).integers(0, 256, (BIG + 4096,), dtype=np.uint8)


def plan(seed: int, count: int) -> list[int]:
    """Message sizes: 95% <= 256 B, 4.9% <= 256 KiB, the rest 1..8 MiB, plus two of 64 MiB."""
    rng = np.random.default_rng(seed)
    kind = rng.random(count)
    sizes = np.where(kind < 0.95, rng.integers(0, 257, count), rng.integers(257, 256 << 10, count))
    big = kind > 0.999
    sizes[big] = rng.integers(1 << 20, 8 << 20, int(big.sum()))
    sizes[count // 3] = sizes[2 * count // 3] = BIG
    return [int(s) for s in sizes]


def expected(index: int, size: int) -> np.ndarray:
    start = (index * 7919) % 4096
    return _PATTERN[start : start + size]


def sender(name: str, peer: int, dest: int, sizes: list[int]) -> None:
    with ic.Region.open(name) as region, region.endpoint(peer) as ep:
        for index, size in enumerate(sizes):
            ep.send(dest, expected(index, size), tag=index % 1000)


def receiver(name: str, peer: int, source: int, sizes: list[int], errors: list[str]) -> None:
    scratch = np.empty(BIG, dtype=np.uint8)
    with ic.Region.open(name) as region, region.endpoint(peer) as ep:
        for index, size in enumerate(sizes):
            if index % 2:  # alternate zero-copy views and copies into a buffer
                n, src, tag = ep.recv_into(scratch, source=source, timeout=120)
                data = scratch[:n]
            else:
                msg = ep.recv(source=source, timeout=120)
                n, src, tag, data = (
                    msg.nbytes,
                    msg.source,
                    msg.tag,
                    np.frombuffer(msg.data, np.uint8),
                )
            ok = (n, src, tag) == (size, source, index % 1000) and np.array_equal(
                data, expected(index, size)
            )
            if index % 2 == 0:
                del data
                msg.release()
            if not ok:
                errors.append(f"message {index} from {source}: got {n} B tag {tag}")
                return


def side(name: str, send_peer: int, recv_peer: int, dest: int, source: int, seeds: tuple) -> int:
    errors: list[str] = []
    out = plan(seeds[0], TOTAL // 2)
    inc = plan(seeds[1], TOTAL // 2)
    rx = threading.Thread(target=receiver, args=(name, recv_peer, source, inc, errors))
    rx.start()
    sender(name, send_peer, dest, out)
    rx.join()
    if errors:
        raise AssertionError(errors[0])
    return 0


def _process_b(name: str) -> None:
    import os

    try:
        side(name, 2, 3, 1, 0, (2, 1))
        os._exit(0)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_100k_mixed_messages_both_ways(spawn):
    name = unique_name("stress")
    region = ic.Region.create(name, 48 << 20, 4)
    try:
        proc = spawn(_process_b, name)
        side(name, 0, 1, 3, 2, (1, 2))
        proc.join(600)
        assert proc.exitcode == 0
        counters = region.queue_counters(0, 3)
        assert counters["sent_messages"] == counters["recv_messages"] == TOTAL // 2
    finally:
        region.close()
        destroy(name, 4)
