"""Alltoall, Alltoallv, Alltoallw and their started forms with IN_PLACE: recvbuf holds this
rank's send blocks, which the received ones replace.

Data checked at a few bytes, at one segment of the collective area (the most its one round
moves per destination), above it (the members decline the round: messages move it), with
zero counts, and with uneven counts at gapped displacements (the gaps stay as they were);
Alltoallw with derived datatypes. In place, the area's C round reads its send blocks from
recvbuf: a round that another member declines (its own block over a segment) must leave
them unwritten, since the messages send them next. Small in-place calls take one C round of
the area (`Area.call` / `Area.begin`), not its general entry (`Area.run`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI, area

GAP = 0xEE  # bytes between the blocks of a vector spec, which no call may write
SEG = 4096  # bytes of "one segment" where there is no area (one rank)


def _segment(comm: MPI.Intracomm) -> int:
    """Bytes of one destination's part of an alltoall's area slab (SEG without one)."""
    comm.Barrier()  # (binds the area)
    shared = area.current(comm)
    return shared.group._scatter_segment() if shared is not None else SEG


def _lane_ready(comm: MPI.Intracomm) -> bool:
    """Whether this communicator's blocking lanes run one C round (area bound, C built)."""
    comm.Barrier()
    shared = area.current(comm)
    return shared is not None and shared.ready()


def _block(frm: int, to: int, n: int) -> np.ndarray:
    """The n bytes rank `frm` sends rank `to`."""
    return ((np.arange(n) + 31 * frm + 7 * to) % 251).astype("u1")


def _size_of(comm: MPI.Intracomm, which: str) -> int:
    return {"few": 3, "kib": 1024, "segment": _segment(comm), "over": _segment(comm) + 1}[which]


@pytest.mark.parametrize("which", ["few", "kib", "segment", "over", "zero"])
@pytest.mark.parametrize("call", ["Alltoall", "Ialltoall", "Alltoallv", "Ialltoallv"])
def test_even_blocks(comm, call, which):
    """size blocks of n bytes each, in a numpy array (Alltoall(v)) or a [buf, count, BYTE]
    spec (its count one block)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    n = 0 if which == "zero" else _size_of(comm, which)
    buf = np.concatenate([_block(rank, q, n) for q in range(size)])
    want = np.concatenate([_block(r, rank, n) for r in range(size)])
    spec: Any = buf if call.endswith("v") else [buf, n, MPI.BYTE]
    request = getattr(comm, call)(MPI.IN_PLACE, spec)
    if call.startswith("I"):
        request.Wait()
    assert np.array_equal(buf, want)


def _uneven(comm: MPI.Intracomm, unit: int) -> tuple[list[int], list[int], int]:
    """This rank's counts (bytes with each peer, the same both ways: in place the send and
    receive counts are one list, so rank r's count with q is rank q's with r), gapped
    displacements and the buffer's length. Counts are a multiple of `unit` (or 0)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    counts = [((rank + q) % 3) * unit + (rank * q) % 2 for q in range(size)]
    displs, at = [], 5
    for q in range(size):
        displs.append(at)
        at += counts[q] + 3 + q
    return counts, displs, at + 2


@pytest.mark.parametrize("which", ["few", "segment"])
@pytest.mark.parametrize("call", ["Alltoallv", "Ialltoallv"])
def test_uneven_counts_and_gaps(comm, call, which):
    """Counts that differ per peer (zeros among them), blocks in an order of their own
    with gaps: the gaps stay, every block lands where its displacement says. "segment":
    the largest count is two segments (the members decline the round)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    unit = 5 if which == "few" else _segment(comm)
    counts, displs, total = _uneven(comm, unit)
    buf = np.full(total, GAP, "u1")
    want = buf.copy()
    for q in range(size):
        buf[displs[q] : displs[q] + counts[q]] = _block(rank, q, counts[q])
        want[displs[q] : displs[q] + counts[q]] = _block(q, rank, counts[q])
    request = getattr(comm, call)(MPI.IN_PLACE, [buf, (counts, displs), MPI.BYTE])
    if call.startswith("I"):
        request.Wait()
    assert np.array_equal(buf, want)


@pytest.mark.parametrize("call", ["Alltoallv", "Ialltoallv"])
def test_round_another_member_declines(comm, call):
    """Rank 0's own block is over a segment (the C round refuses it: its steps decline the
    round), every other count is 3 bytes: the other members run the C round with recvbuf
    as their send blocks and learn there that it is declined. Their blocks must then still
    be in recvbuf for the messages that move them (the round wrote rank 0's slab bytes over
    them before CollectiveRound read every member's rounds word first)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if size < 2:
        pytest.skip("one member: nothing is declined")
    big = _segment(comm) + 1
    for salt in range(2):  # (twice: the area stays on, and the next call takes it again)
        counts = [big if rank == q == 0 else 3 for q in range(size)]
        displs = [sum(counts[:q]) for q in range(size)]
        buf = np.concatenate([_block(rank + salt, q, counts[q]) for q in range(size)])
        want = np.concatenate([_block(r + salt, rank, counts[r]) for r in range(size)])
        request = getattr(comm, call)(MPI.IN_PLACE, [buf, (counts, displs), MPI.BYTE])
        if call.startswith("I"):
            request.Wait()
        assert np.array_equal(buf, want)


@pytest.mark.parametrize("call", ["Alltoallw", "Ialltoallw"])
def test_alltoallw_derived_datatypes(comm, call):
    """Per peer its own datatype and byte displacement: a vector (ints 0 and 2 of 3) with
    odd peers, two plain ints with even ones, the same both ways (in place one spec is both
    sides); the int between a vector's two stays as it was."""
    size, rank = comm.Get_size(), comm.Get_rank()
    vector = MPI.INT.Create_vector(2, 1, 2).Commit()
    try:
        types = [vector if (rank + q) % 2 else MPI.INT for q in range(size)]
        counts = [1 if (rank + q) % 2 else 2 for q in range(size)]
        displs = [16 * q for q in range(size)]  # bytes: peer q's part at int 4q
        buf = np.full(4 * size, -1, "i")
        want = buf.copy()
        for q in range(size):
            at = [4 * q, 4 * q + 2] if (rank + q) % 2 else [4 * q, 4 * q + 1]
            buf[at] = [1000 * rank + 10 * q, 1000 * rank + 10 * q + 1]
            want[at] = [1000 * q + 10 * rank, 1000 * q + 10 * rank + 1]
        request = getattr(comm, call)(MPI.IN_PLACE, [buf, (counts, displs), types])
        if call.startswith("I"):
            request.Wait()
        assert buf.tolist() == want.tolist()
    finally:
        vector.Free()


@pytest.mark.parametrize("call", ["Alltoall", "Alltoallv", "Ialltoall", "Ialltoallv"])
def test_small_in_place_takes_one_area_call(comm, monkeypatch, call):
    """IN_PLACE at 16 bytes a block runs as one C round of the area (blocking: Area.call;
    started: Area.begin), without the area's general entry (Area.run / Area.start: a few us
    more per call, and a copy of recvbuf), data checked."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if not _lane_ready(comm):
        pytest.skip("no area here (one rank) or the Python steps only (IVSHMEM_COMM_PUREPYTHON)")
    entered: list[str] = []

    def spy(name: str, general: Callable[..., Any]) -> Callable[..., Any]:
        def entry(self: area.Area, *args: Any, **kwargs: Any) -> Any:
            entered.append(name)
            return general(self, *args, **kwargs)

        return entry

    monkeypatch.setattr(area.Area, "run", spy("run", area.Area.run))
    monkeypatch.setattr(area.Area, "start", spy("start", area.Area.start))
    n = 16
    buf = np.concatenate([_block(rank, q, n) for q in range(size)])
    want = np.concatenate([_block(r, rank, n) for r in range(size)])
    before = area.completed(comm)
    request = getattr(comm, call)(MPI.IN_PLACE, buf)
    if call.startswith("I"):
        request.Wait()
    assert np.array_equal(buf, want)
    assert not entered, f"{call} (in place) took Area.{entered}"
    assert area.completed(comm) == before + 1


@pytest.mark.parametrize("form", ["numpy", "spec", "in_place"])
def test_alltoall_over_a_segment_takes_no_area_round(comm, form):
    """Alltoall's blocks are one size at every member: over a segment every member knows
    the area would be declined, and the call goes on messages at once (before, each took a
    round that every member declined first), data checked."""
    size, rank = comm.Get_size(), comm.Get_rank()
    comm.Barrier()
    shared = area.current(comm)
    if shared is None:
        pytest.skip("no area here (one rank)")
    n = shared.group._scatter_segment() + 1
    send = np.concatenate([_block(rank, q, n) for q in range(size)])
    recv = send.copy() if form == "in_place" else np.zeros_like(send)
    want = np.concatenate([_block(r, rank, n) for r in range(size)])
    before = shared.group._round
    if form == "spec":
        comm.Alltoall([send, n, MPI.BYTE], [recv, n, MPI.BYTE])
    else:
        comm.Alltoall(MPI.IN_PLACE if form == "in_place" else send, recv)
    assert np.array_equal(recv, want)
    assert shared.group._round == before


@pytest.mark.parametrize("form", ["numpy", "in_place"])
def test_alltoallv_over_a_segment_declines_in_its_one_c_round(comm, area_runs, form):
    """An Alltoallv whose block from rank 0 to the last rank is over a segment: the members
    decline it in the C round of the lane (one round), without a refused C call and a
    round of the area's Python steps (Area.run), then move it by messages; data checked."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if size < 2 or not _lane_ready(comm):
        pytest.skip("one member, or the Python steps only (IVSHMEM_COMM_PUREPYTHON)")
    entered = area_runs()
    big, last = _segment(comm) + 1, size - 1
    scounts = [big if (rank, q) == (0, last) else 3 for q in range(size)]
    rcounts = [big if (r, rank) == (0, last) else 3 for r in range(size)]
    if form == "in_place":  # one list both ways: the big block goes both ways
        scounts = rcounts = [max(s, r) for s, r in zip(scounts, rcounts, strict=True)]
    sd = [sum(scounts[:q]) for q in range(size)]
    rd = [sum(rcounts[:r]) for r in range(size)]
    send = np.concatenate([_block(rank, q, scounts[q]) for q in range(size)])
    want = np.concatenate([_block(r, rank, rcounts[r]) for r in range(size)])
    recv = send if form == "in_place" else np.zeros(sum(rcounts), "u1")
    shared = area.current(comm)
    assert shared is not None
    before = shared.group._round
    sendspec = MPI.IN_PLACE if form == "in_place" else [send, (scounts, sd), MPI.BYTE]
    comm.Alltoallv(sendspec, [recv, (rcounts, rd), MPI.BYTE])
    assert np.array_equal(recv, want)
    assert not entered, f"Alltoallv over a segment took Area.run: {entered}"
    assert shared.group._round == before + 1


@pytest.mark.parametrize("own", ["few", "over"])
def test_members_on_the_lane_and_on_the_body(comm, area_runs, own):
    """Rank 0 runs an in-place Alltoallv on its lane while the others, an Ibarrier still
    pending, run it through the collective's body (Area.run after the pending round, a copy
    of recvbuf sent): both ways meet in one round, declined where rank 0's own block is over
    a segment ("over"); every block lands."""
    size, rank = comm.Get_size(), comm.Get_rank()
    big = _segment(comm) + 1 if own == "over" else 3  # (binds the area)
    lane = _lane_ready(comm)
    entered = area_runs()
    if rank == 0:
        time.sleep(0.05)  # (the others' Ibarrier stays pending meanwhile)
    request = comm.Ibarrier()
    if rank == 0:
        request.Wait()
    shared = area.current(comm)
    pending = shared is not None and bool(shared.group._pending)
    counts = [big if rank == q == 0 else 3 for q in range(size)]
    displs = [sum(counts[:q]) for q in range(size)]
    buf = np.concatenate([_block(rank, q, counts[q]) for q in range(size)])
    want = np.concatenate([_block(r, rank, counts[r]) for r in range(size)])
    comm.Alltoallv(MPI.IN_PLACE, [buf, (counts, displs), MPI.BYTE])
    request.Wait()
    assert np.array_equal(buf, want)
    if lane:
        assert entered == (["alltoallv"] if pending else [])
