"""Rank and tag arguments as mpi4py's C `int` parameters take them (comm.rank_arg).

mpi4py converts a rank by Cython's int conversion: a float equal to a rank is that rank (its
own demo osu_multi_lat.py pairs ranks by `partner = myid + nprocs / 2`), a numpy integer is
its index, a str raises TypeError. Before rank_arg a float rank failed ours in the Python
paths of Recv, Irecv and irecv (a list index), under load only for blocking Recv: its C
front took the float and only a message that was not there yet fell to the Python path.
Tags likewise (mpi4py 4.1.2 under MPICH: `send(1, dest, tag=1.7)` is tag 1): before, a float
tag raised TypeError from the key `ctx << shift | tag` in every fast path.
"""

from __future__ import annotations

import array

import numpy as np
import pytest

from guest_lib.mpi import MPI


def _peer(comm) -> float:
    """The other rank of a pair (the last rank pairs with itself at an odd size), a float."""
    rank, size = comm.Get_rank(), comm.Get_size()
    half = size // 2
    if size % 2 and rank == size - 1:
        return float(rank)
    return float(rank + half if rank < half else rank - half)


def test_float_ranks_in_blocking_and_posted_receives(comm):
    peer = _peer(comm)
    sbuf, rbuf = array.array("i", [comm.rank]), array.array("i", [-1])
    status = MPI.Status()
    for _ in range(3):  # the posted receive first: the Python path of Recv and Irecv
        request = comm.Irecv(rbuf, peer, 1)
        comm.Send(sbuf, peer, 1)
        request.Wait()
        assert rbuf[0] == int(peer)
        comm.Barrier()
        if comm.rank != peer:  # (the last rank at an odd size pairs with itself)
            if comm.rank < peer:
                comm.Send(sbuf, peer, 2)
            comm.Recv(rbuf, peer, 2, status)
            if comm.rank > peer:
                comm.Send(sbuf, peer, 2)
            assert status.Get_source() == int(peer) and type(status.Get_source()) is int
        request = comm.irecv(source=peer, tag=3)
        comm.send(comm.rank, peer, 3)
        assert request.wait() == int(peer)
        comm.Sendrecv(sbuf, peer, 4, rbuf, np.float64(peer), 4)
        assert rbuf[0] == int(peer)
        comm.Barrier()


def test_a_str_rank_raises_type_error(comm):
    with pytest.raises(TypeError):
        comm.Send(array.array("i", [0]), str(comm.rank), 5)
    with pytest.raises(TypeError):
        comm.Recv(array.array("i", [0]), "0", 5)


def test_float_tags_are_truncated_as_mpi4py_does(comm):
    peer = _peer(comm)
    sbuf, rbuf = array.array("i", [comm.rank]), array.array("i", [-1])
    status = MPI.Status()
    comm.send("a", peer, tag=1.7)
    assert comm.recv(source=peer, tag=1.0, status=status) == "a"
    assert status.Get_tag() == 1 and type(status.Get_tag()) is int
    request = comm.Irecv(rbuf, peer, 2.0)
    comm.Send(sbuf, peer, np.float64(2))
    request.Wait(status)
    assert rbuf[0] == int(peer) and status.Get_tag() == 2
    comm.isend("b", peer, tag=3.0).wait()
    assert comm.irecv(source=peer, tag=3.0).wait() == "b"
    request = comm.Isend(sbuf, peer, 4.5)
    comm.Recv(rbuf, peer, 4.0)
    request.Wait()
    assert comm.sendrecv("c", peer, 5.0, None, peer, 5.0) == "c"
    comm.Sendrecv(sbuf, peer, 6.0, rbuf, peer, 6.0, status)
    assert status.Get_tag() == 6
    request = comm.issend("d", peer, tag=7.0)
    assert comm.recv(source=peer, tag=7) == "d"
    request.wait()
    comm.Barrier()


def test_a_str_tag_raises_type_error(comm):
    with pytest.raises(TypeError, match="an integer is required"):
        comm.send(0, 0 if comm.rank else MPI.PROC_NULL, tag="1")
    with pytest.raises(TypeError, match="an integer is required"):
        comm.Recv(array.array("i", [0]), MPI.PROC_NULL, "5")
