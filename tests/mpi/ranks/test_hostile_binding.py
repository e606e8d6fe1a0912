"""A hostile rank 0 at the collective area's binding (guest_lib/mpi/area.py): the (slot,
generation) it broadcasts are read by every member from a message, so they are checked
like any word a peer writes: out of range, every member raises MPI.Exception naming rank 0
(before: a ValueError naming nobody from CollectiveGroup), and the communicator goes on
with its collectives on messages."""

from __future__ import annotations

import pytest

from guest_lib.mpi import MPI, area
from ivshmem_comm import layout


@pytest.mark.parametrize(
    "forged", [(1 << 20, 1), (0, 0), (0, layout.COLL_GEN_MASK + 1)],
    ids=["slot", "generation-0", "generation-high"],
)  # fmt: skip
def test_forged_area_binding_is_refused_naming_rank_0(comm, monkeypatch, forged):
    dup = comm.Dup()
    if not area.eligible(dup):
        dup.Free()
        pytest.skip("this communicator does not use the collective area")
    if dup.Get_rank() == 0:
        monkeypatch.setattr(area, "claim_slot", lambda *_: forged)
    with pytest.raises(MPI.Exception, match="rank 0 bound") as err:
        dup.Barrier()
    assert err.value.Get_error_class() == MPI.ERR_OTHER
    monkeypatch.undo()
    dup.Barrier()
    assert dup.allreduce(1) == dup.Get_size() and area.current(dup) is None
    dup.Free()
