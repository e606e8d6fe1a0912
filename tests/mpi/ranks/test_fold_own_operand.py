"""Folds of the collective area (Reduce, Allreduce, Scan, Exscan, Reduce_scatter_block) read
each member's own operand from its send buffer where that is apart from the result, and from
its slab otherwise (in place; send overlapping recv, undefined in MPI, alike): the C round
publishes operands with copy_to_reader's stores, which may leave the slab's copy in memory
only, so the own operand comes from the cache-warm send buffer; the fold then overwrites recv
from the first operand on, so an operand sharing bytes with recv must come from the slab's
copy (rank 0's operand in place is recv itself and is not copied at all).

Operands over copy_to_reader's threshold (16 KiB) up to 192 KiB, repeated so that both of its
store methods run (it tries the one not chosen every few copies), checked bit for bit against
numpy's fold in rank order, apart and in place.
"""

from __future__ import annotations

import numpy as np
import pytest

from guest_lib.mpi import MPI

ROUNDS = 10  # calls per case: copy_to_reader tries the other store method every 4 or more


def _operand(rank: int, count: int) -> np.ndarray:
    """Rank `rank`'s operand: distinct float64 values whose sums in any order are exact."""
    return np.arange(count, dtype=np.float64) * 0.5 + (rank + 1) * 1.25


def _fold(ranks: range, count: int) -> np.ndarray:
    """The SUM of the operands of `ranks` in rank order (numpy's additions)."""
    acc = _operand(ranks[0], count)
    for r in ranks[1:]:
        acc = acc + _operand(r, count)
    return acc


def _counts(size: int) -> list[int]:
    """Element counts (multiples of `size`) from over copy_to_reader's threshold to 192 KiB,
    within the slab of the launcher's default region at 2 and 4 ranks (256 / 192 KiB)."""
    return [2049 * size, 24576 // size * size]


def _expected(call: str, size: int, rank: int, count: int) -> np.ndarray | None:
    """What `call` (SUM, root size - 1) leaves in this rank's result; None: nothing defined."""
    if call in ("Allreduce", "Reduce_scatter_block") or (call == "Reduce" and rank == size - 1):
        whole = _fold(range(size), count)
        part = count // size
        return whole[rank * part : (rank + 1) * part] if call == "Reduce_scatter_block" else whole
    if call == "Scan":
        return _fold(range(rank + 1), count)
    return _fold(range(rank), count) if call == "Exscan" and rank else None


@pytest.mark.parametrize("form", ["apart", "in_place"])
@pytest.mark.parametrize("call", ["Allreduce", "Reduce", "Scan", "Exscan", "Reduce_scatter_block"])
def test_folds_read_their_own_operand_where_it_is(form: str, call: str) -> None:
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    for count in _counts(size):
        part = count // size if call == "Reduce_scatter_block" else count
        expect = _expected(call, size, rank, count)
        for _ in range(ROUNDS):
            store = np.zeros(count + part + 1)
            if form == "in_place":  # recv holds the operand, the result is its first part
                store[:count] = _operand(rank, count)
                send, recv = MPI.IN_PLACE, store[:count]
                if call == "Reduce" and rank != size - 1:  # (IN_PLACE at the root only)
                    send, recv = store[:count], None
            else:
                store[part + 1 :] = _operand(rank, count)
                send, recv = store[part + 1 :], store[:part]
            if call == "Reduce":
                comm.Reduce(send, recv, MPI.SUM, size - 1)
            else:
                getattr(comm, call)(send, recv, MPI.SUM)
            if expect is not None:
                assert np.array_equal(recv[:part], expect), (call, form, count)
