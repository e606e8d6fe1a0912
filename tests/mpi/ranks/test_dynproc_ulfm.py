"""Dynamic process management within the job (guest_lib/mpi/dynproc.py) and ULFM without
deaths (guest_lib/mpi/ulfm.py; tests/mpi/test_ulfm_death.py kills a rank): what mpi4py's
test_dynproc.py and test_ulfm.py do not check.

In the hybrid job (ranks on two regions) the name service and REVOKE notices travel over
shared memory only: there the tests check the clear error, or skip what cannot reach.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from guest_lib.mpi import MPI

WORLD = MPI.COMM_WORLD


def _routes() -> list[int]:
    """The route kind of every world rank from this process (0 self, 1 shm, 2 mpi4py)."""
    return [route for route, _ in MPI._internal_state()["routes"]]


def _error(call, *args, **kwargs) -> MPI.Exception:
    with pytest.raises(MPI.Exception) as raised:
        call(*args, **kwargs)
    return raised.value


def test_ports_and_the_name_service():
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    port = MPI.Open_port()
    assert port.startswith("ivshmem-port:") and port != MPI.Open_port()
    ports = WORLD.allgather(port)
    if _routes()[0] == 2:  # world rank 0, which holds the names, is on another region
        error = _error(MPI.Publish_name, f"svc-{rank}", port)
        assert error.Get_error_class() == MPI.ERR_SERVICE and "world rank 0" in str(error)
    else:
        MPI.Publish_name(f"svc-{rank}", port)
        assert _error(MPI.Publish_name, f"svc-{rank}", port).Get_error_class() == MPI.ERR_SERVICE
        assert _error(MPI.Lookup_name, f"none-{rank}").Get_error_class() == MPI.ERR_NAME
    WORLD.Barrier()  # every name is published
    if _routes()[0] != 2:
        other = (rank + 1) % size
        if _routes()[other] != 2 or size == 1:  # (a rank of the other region published none)
            assert MPI.Lookup_name(f"svc-{other}") == ports[other]
    WORLD.Barrier()  # every lookup is done
    if _routes()[0] != 2:
        MPI.Unpublish_name(f"svc-{rank}", port)
        assert _error(MPI.Unpublish_name, f"svc-{rank}", port).Get_error_class() == MPI.ERR_SERVICE
    WORLD.Barrier()
    if _routes()[0] != 2:
        assert _error(MPI.Lookup_name, f"svc-{rank}").Get_error_class() == MPI.ERR_NAME
    MPI.Close_port(port)
    assert _error(MPI.Close_port, port).Get_error_class() == MPI.ERR_PORT


def test_ports_of_another_job_or_no_port_raise_err_port_everywhere():
    """The root reads the port; every member raises the root's error (no hang)."""
    for port, says in (("ivshmem-port:another-job:0:0", "another job"),
                       ("tcp://host:1234", "no port name")):  # fmt: skip
        for call in (WORLD.Connect, WORLD.Accept):
            error = _error(call, port if WORLD.Get_rank() == 0 else None, root=0)
            assert error.Get_error_class() == MPI.ERR_PORT
            assert says in str(error) or call == WORLD.Accept, str(error)
    mine = MPI.Open_port()
    closed = WORLD.bcast(mine, 0)
    WORLD.Barrier()
    if WORLD.Get_rank() == 0:
        MPI.Close_port(mine)
    error = _error(WORLD.Accept, closed, root=0)  # not open (any more) at the root
    assert error.Get_error_class() == MPI.ERR_PORT and "not open" in str(error)
    if WORLD.Get_rank() != 0:
        MPI.Close_port(mine)


def test_accept_connect_between_the_halves():
    """The high half accepts at its last rank, the low half connects at its rank 0; the
    intercommunicator joins them as Create_intercomm would."""
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    if size < 2:
        pytest.skip("two groups need 2 ranks or more")
    high = rank >= size // 2
    half = WORLD.Split(int(high), rank)
    accept_root = half.Get_size() - 1
    port = MPI.Open_port() if high and half.Get_rank() == accept_root else None
    port = WORLD.bcast(port, size - 1)  # (the high half's last rank is world rank size-1)
    if high:
        inter = half.Accept(port if half.Get_rank() == accept_root else None, root=accept_root)
    else:
        inter = half.Connect(port if half.Get_rank() == 0 else None, root=0)
    assert inter.Is_inter() and inter.Get_size() == half.Get_size()
    theirs = [r for r in range(size) if (r >= size // 2) != high]
    remote = inter.Get_remote_group()
    assert remote.Translate_ranks(list(range(remote.Get_size())), WORLD.Get_group()) == theirs
    assert inter.allreduce(rank) == sum(theirs)
    assert inter.bcast(rank if inter.Get_rank() == 0 else None,
                       0 if not high else MPI.ROOT if inter.Get_rank() == 0 else MPI.PROC_NULL
                       ) == (theirs[0] if not high else None)  # fmt: skip
    inter.Disconnect()
    assert inter == MPI.COMM_NULL
    if high and half.Get_rank() == accept_root:
        MPI.Close_port(port)
    half.Free()


@pytest.mark.parametrize(("line", "error_class"), [
    (b"ivshmem-join another-job 0\n", MPI.ERR_PORT),
    (b"HELLO from a web server\n", MPI.ERR_ARG),
])  # fmt: skip
def test_join_refuses_a_peer_of_another_job(line, error_class):
    """Join reads the other end's identity first: a process of another job, or one that
    does not speak Join, is refused with a clear error (and nothing hangs)."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        theirs.sendall(line)
        error = _error(MPI.Comm.Join, mine.fileno())
        assert error.Get_error_class() == error_class, str(error)
        assert theirs.recv(100).startswith(b"ivshmem-join ")  # what this process told it


def test_join_on_no_socket_raises_err_arg():
    reader, writer = os.pipe()
    try:
        assert _error(MPI.Comm.Join, reader).Get_error_class() == MPI.ERR_ARG
    finally:
        os.close(reader)
        os.close(writer)


def test_revoke_reaches_a_waiting_member_then_shrink():
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    if 2 in _routes():
        pytest.skip("REVOKE notices travel over shared memory only (guest_lib/mpi/ulfm.py)")
    comm = WORLD.Dup()
    request = comm.irecv(source=0, tag=9) if rank else None
    WORLD.Barrier()  # every receive is posted
    if rank == 0:
        comm.Revoke()
    else:
        assert _error(request.wait).Get_error_class() == MPI.ERR_REVOKED
    assert comm.Is_revoked()
    assert _error(comm.allreduce, 1).Get_error_class() == MPI.ERR_REVOKED
    assert _error(comm.Isend, bytearray(1), 0).Get_error_class() == MPI.ERR_REVOKED
    assert comm.Agree(1 | rank << 1) == (1 if size > 1 else 1 | rank << 1)
    shrunk = comm.Shrink()
    assert (shrunk.Get_rank(), shrunk.Get_size()) == (rank, size)
    assert not shrunk.Is_revoked() and shrunk.allreduce(rank) == sum(range(size))
    shrunk.Free()
    comm.Free()


def test_late_revoke_not_on_the_next_communicator():
    """Rank 2 revokes a freed communicator after ranks 0 and 1 made a new one that reuses
    its context (Create_group: rank 2 is not in that agreement): the notice names the
    freed communicator's generation, so the new one is not revoked. Rank 2's message after
    its Revoke makes sure the notice has arrived before the new one is used."""
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    if size < 3:
        pytest.skip("needs a third rank outside the new communicator")
    if 2 in _routes():
        pytest.skip("REVOKE notices travel over shared memory only (guest_lib/mpi/ulfm.py)")
    comm = WORLD.Dup()
    ctx = comm._ctx
    if rank == 2:
        for r in (0, 1):
            WORLD.recv(source=r, tag=31)  # they made theirs
        comm.Revoke()
        for r in (0, 1):
            WORLD.send("revoked", r, 32)  # (after the notice, from the same sender)
    comm.Free()
    if rank < 2:
        pair = WORLD.Create_group(WORLD.Get_group().Incl([0, 1]))
        assert pair._ctx == ctx  # (the context is reused: what this test is about)
        WORLD.send("made", 2, 31)
        assert WORLD.recv(source=2, tag=32) == "revoked"
        assert not pair.Is_revoked()
        pair.Barrier()
        assert pair.allreduce(rank + 1) == 3
        pair.Free()
    WORLD.Barrier()


def test_a_revoke_arriving_during_agree_spares_it():
    """Rank 0 revokes, then agrees, while the others wait in Agree already: the notice
    must not fail their Agree's receives (Agree runs on revoked communicators), so every
    member gets rank 0's flag in the AND, and no failure is reported."""
    if 2 in _routes():
        pytest.skip("REVOKE notices travel over shared memory only (guest_lib/mpi/ulfm.py)")
    comm = WORLD.Dup()
    rank = WORLD.Get_rank()
    if rank == 0:
        time.sleep(0.3)  # the others are inside Agree by now
        comm.Revoke()
    assert comm.Agree(0b01 if rank == 0 else 0b11) == 0b01
    assert comm.Is_revoked() and comm.Get_failed().Get_size() == 0
    comm.Free()


def test_ishrink_is_nonblocking():
    """Rank 0 starts its Ishrink only after a message that every other rank sends once
    its own Ishrink has started: an Ishrink that waited for the others at the call would
    hang here."""
    comm = WORLD.Dup()
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    if rank == 0:
        assert sorted(WORLD.recv(source=MPI.ANY_SOURCE, tag=4) for _ in range(size - 1)) == list(
            range(1, size)
        )
        shrunk, request = comm.Ishrink()
    else:
        shrunk, request = comm.Ishrink()
        assert shrunk == MPI.COMM_NULL or size == 1  # (a null handle until it completes)
        WORLD.send(rank, 0, tag=4)
    request.Wait()
    assert (shrunk.Get_rank(), shrunk.Get_size()) == (rank, size)
    assert shrunk.Agree(0xFF & ~(1 << rank)) == 0xFF & ~((1 << size) - 1)
    assert shrunk.allreduce(1) == size
    shrunk.Free()
    comm.Free()


def test_a_freed_revoked_communicators_notice_spares_the_next_one():
    """Rank 0 revokes and frees at once; the others free without looking: the notice
    arrives late, about a freed context, which the next Dup may take again."""
    comm = WORLD.Dup()
    if WORLD.Get_rank() == 0:
        comm.Revoke()
    comm.Free()
    again = WORLD.Dup()
    assert not again.Is_revoked()
    again.Barrier()
    assert again.allreduce(1) == WORLD.Get_size()
    again.Free()


def test_agree_and_shrink_an_intercommunicator():
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    if size < 2:
        pytest.skip("two groups need 2 ranks or more")
    high = rank >= size // 2
    half = WORLD.Split(int(high), rank)
    inter = half.Create_intercomm(0, WORLD, 0 if high else size // 2, 31)
    half.Free()
    every = 0xFF & ~((1 << size) - 1)
    assert inter.Agree(0xFF & ~(1 << rank)) == every  # the AND over both groups
    shrunk = inter.Shrink()
    assert shrunk.Is_inter()
    assert (shrunk.Get_size(), shrunk.Get_remote_size()) == (inter.Get_size(),
                                                             inter.Get_remote_size())  # fmt: skip
    theirs = [r for r in range(size) if (r >= size // 2) != high]
    assert shrunk.allreduce(rank) == sum(theirs)
    assert shrunk.Get_failed().Get_size() == 0 and shrunk.Ack_failed() == 0
    shrunk.Free()
    inter.Free()
