"""Group algebra and the communicators made from groups (issue #11 point 3)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from guest_lib.mpi import MPI


def test_algebra_order(comm):
    """Union keeps the first group's order then adds the second's new members; Intersection
    and Difference keep the first group's order; ranks follow."""
    size, rank = comm.Get_size(), comm.Get_rank()
    group = comm.Get_group()
    evens = group.Incl(list(range(0, size, 2)))
    odds = group.Range_incl([(1, size - 1, 2)]) if size > 1 else MPI.Group(MPI.GROUP_EMPTY)
    backwards = group.Incl(list(reversed(range(size))))
    union = MPI.Group.Union(odds, evens)
    expect = list(range(1, size, 2)) + list(range(0, size, 2))
    assert MPI.Group.Translate_ranks(union, None, group) == expect
    assert union.Get_rank() == expect.index(rank)
    assert MPI.Group.Compare(union, group) == (MPI.IDENT if size == 1 else MPI.SIMILAR)
    assert MPI.Group.Compare(backwards, group) == (MPI.IDENT if size == 1 else MPI.SIMILAR)
    assert MPI.Group.Compare(evens, group) == (MPI.IDENT if size == 1 else MPI.UNEQUAL)
    inter = backwards.Intersection(evens)
    assert inter.Translate_ranks(None, group) == [r for r in reversed(range(size)) if r % 2 == 0]
    diff = backwards.Difference(evens)
    assert diff.Translate_ranks(None, group) == [r for r in reversed(range(size)) if r % 2]
    assert MPI.Group.Compare(group.Difference(group), MPI.GROUP_EMPTY) == MPI.IDENT
    assert group.Range_excl([(0, size - 1, 2)]).Compare(odds) == MPI.IDENT
    assert group.Range_incl([(size - 1, 0, -1)]).Compare(backwards) == MPI.IDENT
    assert group.Excl([0]).Get_rank() == (MPI.UNDEFINED if rank == 0 else rank - 1)
    assert group.Dup().Compare(group) == MPI.IDENT
    for g in (evens, odds, backwards, union, inter, diff, group):
        g.Free()
        assert not g and g == MPI.GROUP_NULL


def test_errors():
    group = MPI.COMM_WORLD.Get_group()
    size = group.Get_size()
    with pytest.raises(MPI.Exception) as info:
        group.Incl([size])
    assert info.value.Get_error_class() == MPI.ERR_RANK
    with pytest.raises(MPI.Exception):
        group.Incl([0, 0])
    with pytest.raises(MPI.Exception) as info:
        group.Range_incl([(0, size - 1, 0)])
    assert info.value.Get_error_class() == MPI.ERR_ARG
    with pytest.raises(MPI.Exception) as info:
        MPI.GROUP_NULL.Get_size()
    assert info.value.Get_error_class() == MPI.ERR_GROUP
    assert not MPI.Group() and MPI.Group() == MPI.GROUP_NULL and MPI.GROUP_EMPTY
    assert pickle.loads(pickle.dumps(MPI.GROUP_EMPTY)) is MPI.GROUP_EMPTY
    with pytest.raises(ValueError):
        pickle.dumps(group)


def test_create_group_members_only(comm):
    """Create_group over the odd ranks: the even ranks do not call it (they run a
    collective of their own meanwhile), the new communicator works."""
    size, rank = comm.Get_size(), comm.Get_rank()
    group = comm.Get_group()
    odds = group.Incl(list(range(1, size, 2)))
    evens = group.Incl(list(range(0, size, 2)))
    mine = odds if rank % 2 else evens
    sub = comm.Create_group(mine, tag=rank % 2)
    assert sub.Get_size() == mine.Get_size() and sub.Get_rank() == mine.Get_rank()
    assert MPI.Group.Compare(sub.Get_group(), mine) == MPI.IDENT
    total = sub.allreduce(rank)
    assert total == sum(range(rank % 2, size, 2))
    buf = np.array([rank], "i")
    sub.Bcast(buf, root=0)
    assert buf[0] == rank % 2
    assert comm.Compare(sub) == (MPI.CONGRUENT if size == 1 else MPI.UNEQUAL)
    sub.Free()


def test_create_and_compare(comm):
    """Create (every rank calls it) in the group's order; Compare of communicators."""
    size, rank = comm.Get_size(), comm.Get_rank()
    group = comm.Get_group()
    backwards = group.Incl(list(reversed(range(size))))
    new = comm.Create(backwards)
    assert new.Get_rank() == size - 1 - rank
    assert MPI.Comm.Compare(comm, new) == (MPI.CONGRUENT if size == 1 else MPI.SIMILAR)
    assert comm.Compare(comm) == MPI.IDENT
    dup = comm.Dup()
    assert comm.Compare(dup) == MPI.CONGRUENT
    first = comm.Create(group.Incl([0]))
    assert (first == MPI.COMM_NULL) == (rank != 0)
    for c in (new, dup, first):
        if c != MPI.COMM_NULL:
            c.Free()


def test_create_from_group():
    """MPI-4 Create_from_group: only the members call it, with a string tag."""
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    group = world.Get_group()
    half = (
        group.Incl(list(range(0, size, 2)))
        if rank % 2 == 0
        else group.Incl(list(range(1, size, 2)))
    )
    comm = MPI.Intracomm.Create_from_group(half, f"test.half.{rank % 2}")
    assert comm.Get_size() == half.Get_size() and comm.Get_rank() == rank // 2
    assert comm.allgather(rank) == list(range(rank % 2, size, 2))
    comm.Free()
    world.Barrier()


def test_session_world_pset_to_communicator():
    """MPI-4's session model: a session's "mpi://WORLD" group made into a communicator by
    Create_from_group works as COMM_WORLD does; a finalized session is null."""
    size, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    session = MPI.Session.Init()
    assert [session.Get_nth_pset(n) for n in range(session.Get_num_psets())] == [
        "mpi://WORLD",
        "mpi://SELF",
    ]
    assert session.Get_pset_info("mpi://WORLD").Get("mpi_size") == str(size)
    group = MPI.Group.Create_from_session_pset(session, "mpi://WORLD")
    comm = MPI.Intracomm.Create_from_group(group, "org.test.session")
    assert comm.Get_rank() == rank and comm.allreduce(rank) == size * (size - 1) // 2
    comm.Free()
    group.Free()
    with pytest.raises(MPI.Exception):
        session.Create_group("mpi://NOWHERE")
    session.Finalize()
    assert session == MPI.SESSION_NULL and not session
    with pytest.raises(MPI.Exception):
        session.Get_num_psets()
