"""Collectives with Python objects."""

from __future__ import annotations

import pytest

from guest_lib.mpi import MPI

OBJECTS = [None, 7, "text", [1, (2, 3)], {"k": 1.5}]


def test_barrier(comm):
    for _ in range(5):
        comm.barrier()


def test_bcast(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    for root in range(size):
        for obj in OBJECTS:
            assert comm.bcast(obj if rank == root else None, root=root) == obj
    big = list(range(300_000)) if rank == 0 else None
    assert comm.bcast(big, root=0) == list(range(300_000))


def test_gather_scatter(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    for root in range(size):
        got = comm.gather((rank, "x"), root=root)
        assert got == ([(r, "x") for r in range(size)] if rank == root else None)
        items = [r * 10 for r in range(size)] if rank == root else None
        assert comm.scatter(items, root=root) == rank * 10


def test_allgather_alltoall(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    assert comm.allgather({"r": rank}) == [{"r": r} for r in range(size)]
    got = comm.alltoall([(rank, dest) for dest in range(size)])
    assert got == [(src, rank) for src in range(size)]


@pytest.mark.parametrize("op", [MPI.SUM, MPI.PROD, MPI.MAX, MPI.MIN])
def test_reduce_allreduce(comm, op):
    size, rank = comm.Get_size(), comm.Get_rank()
    values = [r + 1 for r in range(size)]
    expect = values[0]
    for v in values[1:]:
        expect = op(expect, v)
    for root in range(size):
        got = comm.reduce(rank + 1, op=op, root=root)
        assert got == (expect if rank == root else None)
    assert comm.allreduce(rank + 1, op=op) == expect


def test_loc_ops(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    value = (rank % 2, rank)
    assert comm.allreduce(value, op=MPI.MAXLOC) == ((1, 1) if size > 1 else (0, 0))
    assert comm.allreduce(value, op=MPI.MINLOC) == (0, 0)


def test_scan_exscan(comm):
    rank = comm.Get_rank()
    assert comm.scan(rank + 1) == sum(range(1, rank + 2))
    got = comm.exscan(rank + 1)
    assert got == (None if rank == 0 else sum(range(1, rank + 1)))


def test_user_op_noncommutative(comm):
    size = comm.Get_size()
    concat = MPI.Op.Create(lambda a, b, _datatype: a + b, commute=False)
    assert comm.allreduce([comm.Get_rank()], op=concat) == list(range(size))
