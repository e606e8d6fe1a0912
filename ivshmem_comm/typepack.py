"""Copies between a typed (strided) buffer and a dense one, by a compiled run map: the
packer behind derived MPI datatypes.

`typed_copy` is the C implementation (ivshmem_comm/_typepack.c, part of the `_fastpath`
module) when the queues run on C (`ring.IMPLEMENTATION == "c"`), else `typed_copy_py`, the
pure-Python reference with the same arguments, results and errors (tests hold the two to the
same bytes). Nothing here touches shared memory: both sides of a copy are the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ivshmem_comm import ring


def typed_copy_py(gather: bool, user: Any, start: int, count: int, extent: int,
                  runs: Any, packed: Any, limit: int) -> int:  # fmt: skip
    """The pure-Python reference of the C `typed_copy` (ivshmem_comm/_typepack.c), same
    arguments, result and errors: move at most min(limit, len(packed), count * size)
    packed bytes between the `count` elements of the compiled map `runs` (rows of int64
    runs, as guest_lib.mpi's `Datatype.compiled` makes them) at byte `start` of `user` and
    the dense `packed` (gather: user -> packed). ValueError, nothing moved, for a bad map,
    a negative count or an element outside `user`."""
    try:
        runs = np.frombuffer(runs, np.int64).reshape(-1, 4)
    except ValueError:
        raise ValueError("typed_copy: the map is not int64 runs") from None
    if count < 0 or (runs[:, 1] < 0).any() or (runs[:, 2] < 1).any() or not _fits(runs):
        raise ValueError(f"typed_copy: bad count {count} or map")
    out = np.frombuffer(packed, np.uint8) if len(memoryview(packed)) else np.empty(0, np.uint8)
    full = runs[runs[:, 1] > 0]
    sizes = full[:, 1] * full[:, 2]
    size = int(sizes.sum())
    budget = min(len(out), count * size)
    if limit >= 0:
        budget = min(budget, limit)
    if budget <= 0:
        return 0
    touched = -(-budget // size)
    span = (full[:, 2] - 1) * full[:, 3]
    first = start + int((full[:, 0] + np.minimum(span, 0)).min()) + min(0, (touched - 1) * extent)
    last = start + int((full[:, 0] + full[:, 1] + np.maximum(span, 0)).max())
    last += max(0, (touched - 1) * extent)
    view = np.frombuffer(user, np.uint8) if len(memoryview(user)) else np.empty(0, np.uint8)
    if first < 0 or last > len(view):
        raise ValueError(
            f"typed_copy: {touched} elements (extent {extent}) at byte {start} run past a "
            f"{len(view)}-byte buffer"
        )
    # the byte offsets of one element, in order: each piece's start repeated over its bytes
    piece_starts = np.repeat(full[:, 0], full[:, 2]) + np.concatenate(
        [np.arange(r, dtype=np.int64) * d for r, d in zip(full[:, 2], full[:, 3], strict=True)]
    )
    piece_lengths = np.repeat(full[:, 1], full[:, 2])
    within = np.arange(size, dtype=np.int64) - np.repeat(
        np.cumsum(piece_lengths) - piece_lengths, piece_lengths
    )
    element = np.repeat(piece_starts, piece_lengths) + within
    positions = (
        start + np.arange(touched, dtype=np.int64)[:, None] * extent + element[None, :]
    ).ravel()[:budget]  # fmt: skip
    if gather:
        out[:budget] = view[positions]
    else:
        view[positions] = out[:budget]
    return budget


def _fits(runs: np.ndarray) -> bool:
    """Whether every run's reach (first and last byte, data bytes) and the element's data
    bytes fit int64, as the C packer requires: the numpy arithmetic below would wrap."""
    size, low, high = 0, -(2**63), 2**63
    for offset, length, reps, stride in runs.tolist():
        span = (reps - 1) * stride
        size += reps * length
        if not (low <= span < high and low <= offset + min(span, 0)
                and offset + length + max(span, 0) < high):  # fmt: skip
            return False
    return size < high


typed_copy: Callable[[bool, Any, int, int, int, Any, Any, int], int] = typed_copy_py
if ring.IMPLEMENTATION == "c":
    from ivshmem_comm import _fastpath

    if not hasattr(_fastpath, "typed_copy"):
        raise ImportError(
            "ivshmem_comm._fastpath was built from older sources (no typed_copy): rebuild it "
            "(python setup.py build_ext --inplace)"
        )
    typed_copy = _fastpath.typed_copy
