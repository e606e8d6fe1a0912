"""Hostile peers at the MPI face: values every rank takes from messages other ranks send
are checked like any word a peer writes into shared memory, and a bad one raises
MPI.Exception naming the rank that sent it, without hanging or leaving the ranks out of
step.

- The collective area's binding (guest_lib/mpi/area.py): the (slot, generation) rank 0
  broadcasts; out of range, every member raises naming rank 0 (before: a ValueError naming
  nobody from CollectiveGroup) and the communicator goes on with its collectives on
  messages.
- A message on a communicator's context from a rank outside it (its header forged): a probe
  that matches it drops it and raises naming its world rank (before: KeyError from a probe
  with a status, and without one the message was handed on as the communicator's).
- An operand of a reduction on messages that is not the root's length: the root raises
  naming the rank (before: a short one was folded with uninitialised memory (non-commutative
  ops, Ireduce) or left part of the fold without it; a long one or one cut mid-element
  raised a numpy ValueError naming nobody).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from guest_lib.mpi import MPI, area
from ivshmem_comm import layout

WORLD = MPI.COMM_WORLD


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


def test_forged_binding_seen_abandoned_before_its_arrival_still_forwards_it(comm, monkeypatch):
    """The forged binding, with the member in the middle of the binding broadcast's tree
    (rank 2 of 4: it forwards rank 0's binding to rank 3) made to take in rank 1's
    abandonment of the instance before rank 0's binding reaches it, as load made it now and
    then (0ba00cc): rank 0 sends rank 1's binding first and rank 2's only once rank 2 says
    it holds the abandonment. Rank 2 must still receive and forward the binding, so that
    rank 3 raises too (before 0ba00cc: rank 2 raised at once and rank 3 waited for ever)."""
    if comm.Get_size() != 4:
        pytest.skip("the binding broadcast's tree has a forwarding member at 4 ranks")
    dup = comm.Dup()
    if not area.eligible(dup):
        dup.Free()
        pytest.skip("this communicator does not use the collective area")
    rank = dup.Get_rank()
    world_0, world_2 = dup.Get_group().Translate_ranks([0, 2], WORLD.Get_group())
    signal = 0x5A5A  # (a WORLD tag no other test uses)
    if rank == 0:
        monkeypatch.setattr(area, "claim_slot", lambda *_: (1 << 20, 1))

        def late_to_rank_2(view: memoryview, root: int, tag: int) -> memoryview:
            dup._c_wait([dup._c_isend(view, 1, tag)])
            WORLD.Recv(bytearray(1), world_2, signal)
            dup._c_wait([dup._c_isend(view, 2, tag)])
            return view

        monkeypatch.setattr(dup, "_bcast_view", late_to_rank_2)
    if rank == 2:
        engine = MPI._internal_state()["engine"]
        deadline = time.monotonic() + 60
        while dup._ctx + 1 not in engine.abandoned_in and time.monotonic() < deadline:
            WORLD.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)  # (progress: takes the record in)
            time.sleep(0.001)
        assert dup._ctx + 1 in engine.abandoned_in
        WORLD.Send(b"x", world_0, signal)
    with pytest.raises(MPI.Exception, match="rank 0 bound"):
        dup.Barrier()
    monkeypatch.undo()
    dup.Barrier()
    assert dup.allreduce(1) == 4 and area.current(dup) is None
    dup.Free()


def _forged_into(solo: MPI.Intracomm) -> None:
    """World rank 1 sends world rank 0 a message on the context of rank 0's `solo` (a
    communicator of rank 0 alone)."""
    ctx = WORLD.bcast(solo._ctx, 0)
    if WORLD.Get_rank() == 1:
        WORLD._isend_op(memoryview(b"forged"), 0, 5, ctx, False)


@pytest.mark.parametrize("probe", ["mprobe", "Improbe", "Probe", "Iprobe"])
def test_message_from_outside_the_communicator_is_refused_naming_its_sender(probe):
    if WORLD.Get_size() < 2:
        pytest.skip("needs a second rank")
    rank = WORLD.Get_rank()
    solo = WORLD.Split(rank, 0)
    _forged_into(solo)
    if rank == 0:
        call = getattr(solo, probe)
        with pytest.raises(MPI.Exception, match="world rank 1 sent a message on context"):
            deadline = time.monotonic() + 30
            while not call(MPI.ANY_SOURCE, MPI.ANY_TAG) and time.monotonic() < deadline:
                pass  # (the nonblocking probes: until it has arrived)
        assert not solo.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)  # dropped
    WORLD.Barrier()
    solo.Free()


NONCOMMUTATIVE = MPI.Op.Create(lambda inbuf, inoutbuf, datatype: None, commute=False)


@pytest.mark.parametrize(
    ("call", "nbytes", "what"),
    [("Reduce", 3, "sent 3 operand bytes at byte 0 of 32"),
     ("Reduce", 64, "sent 64 operand bytes at byte 0 of 32"),
     ("Reduce", 8, "sent 8 bytes where 32 are expected"),
     ("noncommutative", 8, "sent 8 bytes where 32 are expected"),
     ("Ireduce", 8, "sent 8 bytes where 32 are expected"),
     ("Ireduce", 3, "sent 3 operand bytes at byte 0 of 32")],
    ids=["odd", "long", "short", "noncommutative-short", "Ireduce-short", "Ireduce-odd"],
)  # fmt: skip
def test_operand_of_another_length_is_refused_naming_its_rank(comm, call, nbytes, what):
    """Reductions on messages (the collective area kept out): the last rank sends an
    operand of `nbytes` where the root folds 4 int64."""
    size = comm.Get_size()
    if size < 2 or any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip("needs two ranks on shared memory")
    dup = comm.Dup()
    dup._area = False  # (what the window's communicators do)
    rank, hostile = dup.Get_rank(), size - 1
    op = NONCOMMUTATIVE if call == "noncommutative" else MPI.MAX
    send = bytearray(nbytes) if rank == hostile else np.ones(4, "i8")
    if rank == 0:
        with pytest.raises(MPI.Exception, match=f"rank {hostile} {what}"):
            if call == "Ireduce":
                dup.Ireduce(send, np.zeros(4, "i8"), op, 0).Wait()
            else:
                dup.Reduce(send, np.zeros(4, "i8"), op, 0)
    else:
        (dup.Ireduce(send, None, op, 0).Wait() if call == "Ireduce"
         else dup.Reduce(send, None, op, 0))  # fmt: skip
    dup.Barrier()
    assert dup.allreduce(1) == size  # the next collectives work
    dup.Free()


def test_operand_error_of_a_started_reduction_comes_at_its_wait(comm):
    """Ireduce on messages (a commutative op: the root folds each operand as it arrives),
    the last rank's operand cut mid-element: the root's blocking Recv, whose progress takes
    that operand in before the message it waits for, completes; the error comes at the
    Ireduce's Wait, naming the rank (before: the fold raised it out of the Recv)."""
    size = comm.Get_size()
    if size < 2 or any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip("needs two ranks on shared memory")
    dup = comm.Dup()
    dup._area = False
    rank, hostile = dup.Get_rank(), size - 1
    send = bytearray(3) if rank == hostile else np.ones(4, "i8")
    if rank == 0:
        request = dup.Ireduce(send, np.zeros(4, "i8"), MPI.MAX, 0)
        word = np.zeros(1, "i4")
        dup.Recv(word, hostile, tag=5)
        assert word[0] == 7
        with pytest.raises(MPI.Exception, match=f"rank {hostile} sent 3 operand bytes"):
            request.Wait()
    else:
        request = dup.Ireduce(send, None, MPI.MAX, 0)
        if rank == hostile:
            dup.Send(np.full(1, 7, "i4"), 0, tag=5)
        request.Wait()
    dup.Barrier()
    assert dup.allreduce(1) == size  # the next collectives work
    dup.Free()


@pytest.mark.parametrize("call", ["Scan", "Iscan", "Ireduce_scatter_block"])
def test_prefix_or_block_of_another_length_is_refused_naming_rank_0(comm, monkeypatch, call):
    """Scan, Iscan (rank 0's prefix to rank 1) and Ireduce_scatter_block (rank 0's block for the
    last rank) on messages, rank 0 sending 1 int64 where the receiver folds 2 (before: the
    receiver folded uninitialised memory). The ranks after the failing one in a scan fail
    too (its prefix never comes: it abandoned the collective); the others complete, or fail
    if its abandonment reaches them before their last receive."""
    size = comm.Get_size()
    if size < 2 or any(route == 2 for route, _ in MPI._internal_state()["routes"]):
        pytest.skip("needs two ranks on shared memory")
    dup = comm.Dup()
    dup._area = False
    rank = dup.Get_rank()
    victim = size - 1 if call == "Ireduce_scatter_block" else 1
    out = np.zeros(2, "i8")
    if call == "Ireduce_scatter_block" and rank == 0:
        fake = np.ones(2 * size - 1, "i8")  # one element short of its blocks: the last one
        monkeypatch.setattr(type(dup), "_fold_operands", lambda *_: (fake, out))

    def request() -> MPI.Request:
        if call == "Scan":  # (a blocking one: a completed request stands for it)
            dup.Scan(np.ones(1 if rank == 0 else 2, "i8"), out, MPI.SUM)
            return MPI.REQUEST_NULL
        if call == "Iscan":
            return dup.Iscan(np.ones(1 if rank == 0 else 2, "i8"), out, MPI.SUM)
        return dup.Ireduce_scatter_block(np.ones(2 * size, "i8"), out, MPI.SUM)

    if rank == victim:
        with pytest.raises(MPI.Exception, match="rank 0 sent 8 bytes where 16 are expected"):
            request().Wait()
    elif call != "Ireduce_scatter_block" and rank > victim:
        with pytest.raises(MPI.Exception):
            request().Wait()
    else:  # it completes, or fails once the victim's abandonment reaches it first
        try:
            request().Wait()
        except MPI.Exception as exc:
            assert exc.Get_error_class() == MPI.ERR_OTHER
    monkeypatch.undo()
    dup.Barrier()
    assert dup.allreduce(1) == size  # the next collectives work
    dup.Free()
