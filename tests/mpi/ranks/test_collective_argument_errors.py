"""Argument errors of collectives: what each rank raises, and the collective area after them.

An argument error that every member raises before taking the collective's round leaves the
communicator's collective area in step (area.Doubt): the next collectives still run there.
Where only some members fail, the others raise MPI.Exception (or complete, as a root that
waits for nobody) and the collectives after it are right.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from guest_lib.mpi import MPI, area


def _across_regions() -> bool:
    """True when some ranks of the world are reached through mpi4py (hybrid jobs)."""
    return any(route == 2 for route, _ in MPI._internal_state()["routes"])


def _one_region_dup() -> MPI.Intracomm:
    """A Dup of COMM_WORLD with its collective area bound (skipped below 2 ranks and across
    regions, where mpi4py carries the collectives and no area is bound)."""
    world = MPI.COMM_WORLD
    if world.Get_size() < 2 or _across_regions():
        pytest.skip("needs 2 ranks or more in one region")
    comm = world.Dup()
    comm.Barrier()  # (binds the area)
    return comm


# name -> call(comm, wrong): the collective with right arguments (wrong False) or with an
# argument error this rank detects alone (wrong True)
CALLS: dict[str, Callable[[MPI.Intracomm, bool], Any]] = {
    "Allreduce short recvbuf": lambda comm, wrong: comm.Allreduce(
        np.ones(4), np.zeros(2 if wrong else 4)
    ),
    "Bcast count past the buffer": lambda comm, wrong: comm.Bcast(
        [np.zeros(4), 8 if wrong else 4, MPI.DOUBLE], 0
    ),
    "Allgather short recvbuf": lambda comm, wrong: comm.Allgather(
        np.ones(4), np.zeros(2 if wrong else 4 * comm.Get_size())
    ),
    "Reduce op None": lambda comm, wrong: comm.Reduce(
        np.ones(4), np.zeros(4), None if wrong else MPI.SUM, 0
    ),
    "Alltoall short recvbuf": lambda comm, wrong: comm.Alltoall(
        np.ones(4 * comm.Get_size()), np.zeros(1 if wrong else 4 * comm.Get_size())
    ),
    "Reduce_scatter_block short recvbuf": lambda comm, wrong: comm.Reduce_scatter_block(
        np.ones(4 * comm.Get_size()), np.zeros(2 if wrong else 4)
    ),
    "Scatter root out of range": lambda comm, wrong: comm.Scatter(
        np.zeros(2 * comm.Get_size()), np.zeros(2), comm.Get_size() + 3 if wrong else 0
    ),
}


def _bcast_in_the_area(comm: MPI.Intracomm, before: int) -> None:
    """A Bcast and an allgather after the error: right data, the Bcast in the area (its count
    of completed collectives went on from `before`)."""
    data = np.full(4, comm.Get_rank(), np.float64)  # (within a slab)
    comm.Bcast(data, 0)
    assert (data == 0).all()
    assert area.completed(comm) > before, "the collective area was dropped"
    assert comm.allgather(comm.Get_rank()) == list(range(comm.Get_size()))


def _next_collectives_right(comm: MPI.Intracomm) -> None:
    """A Bcast, an allgather and an Allreduce after the error: right data on every rank."""
    size, rank = comm.Get_size(), comm.Get_rank()
    data = np.full(4, rank, np.float64)
    comm.Bcast(data, 0)
    assert (data == 0).all()
    assert comm.allgather(rank) == list(range(size))
    out = np.zeros(4)
    comm.Allreduce(np.full(4, 1.0), out)
    assert (out == size).all()


@pytest.mark.parametrize("name", list(CALLS))
def test_an_argument_error_on_every_rank_keeps_the_area(name):
    """Every rank raises its own argument error (ValueError, TypeError, AttributeError or
    MPI.Exception, as the message path does) and the area stays bound: the next collective
    runs there with the right data (it used to be dropped for the rest of the job, every
    member having abandoned the instance)."""
    comm = _one_region_dup()
    try:
        for _ in range(2):  # (twice: a kept area's later errors are alike)
            before = area.completed(comm)
            with pytest.raises((ValueError, TypeError, AttributeError, MPI.Exception)):
                CALLS[name](comm, True)
            _bcast_in_the_area(comm, before)
    finally:
        comm.Free()


@pytest.mark.parametrize("name", [n for n in CALLS if "root" not in n])
def test_an_argument_error_on_one_rank_fails_the_others_and_the_next_collectives_run(name):
    """Only the last rank's arguments are wrong: it raises its error, every other rank either
    raises MPI.Exception(ERR_OTHER) naming it or completes (a member that waits for nobody),
    none hangs; the collectives after it are right on every rank (area or messages)."""
    comm = _one_region_dup()
    size, rank = comm.Get_size(), comm.Get_rank()
    try:
        wrong = rank == size - 1
        try:
            CALLS[name](comm, wrong)
            assert not wrong, "the wrong arguments were taken"
        except MPI.Exception as exc:
            if not wrong:
                assert exc.Get_error_class() == MPI.ERR_OTHER, exc
        except (ValueError, TypeError, AttributeError):
            assert wrong
        data = np.full(4, rank, np.float64)
        comm.Bcast(data, 0)
        assert (data == 0).all()
        assert comm.allgather(rank) == list(range(size))
        CALLS[name](comm, False)  # (the same collective, right everywhere)
    finally:
        comm.Free()


def test_ranks_that_took_the_round_and_ranks_that_did_not_all_drop_the_area():
    """Rank 0 is the root of a Bcast whose members (all but the last) fail before the round:
    the root publishes and returns, the last rank reads it; the failing members are in doubt
    and learn that others took it, so every rank leaves the area and the next collectives
    run on messages, right on every rank."""
    comm = _one_region_dup()
    size, rank = comm.Get_size(), comm.Get_rank()
    try:
        wrong = 0 < rank < size - 1 or (size == 2 and rank == 1)
        data = np.full(4, 7.0 if rank == 0 else 0.0)
        try:
            comm.Bcast([data, 8 if wrong else 4, MPI.DOUBLE], 0)
            assert not wrong
        except MPI.Exception as exc:
            assert not wrong and exc.Get_error_class() == MPI.ERR_OTHER
        except ValueError:
            assert wrong
        for _ in range(3):
            _next_collectives_right(comm)
    finally:
        comm.Free()


@pytest.mark.parametrize("name", ["Gather", "Gatherv"])
def test_gather_root_block_shorter_than_its_send_raises_mpich_class(name):
    """The root's recvbuf holds half a block per rank: the root raises MPI.Exception with
    MPICH's class (Gather ERR_TRUNCATE, Gatherv ERR_IN_STATUS; it was ValueError), the others
    complete, and the area stays bound (the instance ran in step everywhere)."""
    comm = _one_region_dup()
    size, rank = comm.Get_size(), comm.Get_rank()
    try:
        for _ in range(2):
            before = area.completed(comm)
            recvbuf = np.zeros(2 * size) if rank == 0 else None
            if name == "Gatherv" and rank == 0:
                recvbuf = [recvbuf, [2] * size, MPI.DOUBLE]
            try:
                getattr(comm, name)(np.ones(4), recvbuf, 0)
                assert rank != 0
            except MPI.Exception as exc:
                assert rank == 0
                want = MPI.ERR_TRUNCATE if name == "Gather" else MPI.ERR_IN_STATUS
                assert exc.Get_error_class() == want, exc
            _bcast_in_the_area(comm, before)
        _next_collectives_right(comm)
    finally:
        comm.Free()


def test_ialltoall_uneven_blocks_on_one_rank_fail_the_others():
    """Only the last rank's Ialltoall sendbuf does not split into size blocks: it raises
    ValueError at the call (mpi4py's rule), the others' requests complete with
    MPI.Exception(ERR_OTHER) naming it instead of waiting (they waited for good), and the
    next collectives are right."""
    comm = _one_region_dup()
    size, rank = comm.Get_size(), comm.Get_rank()
    try:
        wrong = rank == size - 1
        try:
            comm.Ialltoall(np.ones(4 * size + wrong), np.zeros(4 * size)).Wait()
            raise AssertionError("Ialltoall completed")
        except ValueError:
            assert wrong
        except MPI.Exception as exc:
            assert not wrong and exc.Get_error_class() == MPI.ERR_OTHER, exc
        _next_collectives_right(comm)
        out = np.zeros(4 * size)
        comm.Ialltoall(np.full(4 * size, float(rank)), out).Wait()
        assert (out == np.repeat(np.arange(size, dtype=np.float64), 4)).all()
    finally:
        comm.Free()
