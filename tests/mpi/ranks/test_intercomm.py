"""Intercommunicators (issue #11 point 3): Create_intercomm, point-to-point between the
groups, every collective with MPI's intercommunicator semantics, Merge, Dup/Split/Create,
matched probes on them, and Spawn's clear refusal.

Two ways of cutting COMM_WORLD in two groups: "halves" (low ranks / high ranks) and "parity"
(even / odd ranks). In the hybrid job of test_suite_runs (ranks 0-1 on one region, 2-3 on
another) the first puts every pair across the groups on the MPICH route and each group on
shared memory; the second mixes both routes inside each group and across.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from guest_lib.mpi import MPI

WORLD = MPI.COMM_WORLD


def _color(kind: str, rank: int) -> int:
    """The group of world rank `rank`: 0 or 1."""
    if kind == "halves":
        return 0 if rank < WORLD.Get_size() // 2 else 1
    return rank % 2


def _split(kind: str) -> tuple[int, int, int]:
    """(color, local leader's rank in the color's group, remote leader's world rank)."""
    color = _color(kind, WORLD.Get_rank())
    other = [r for r in range(WORLD.Get_size()) if _color(kind, r) != color]
    return color, 0, other[0]


@pytest.fixture(params=["halves", "parity"])
def inter(request: pytest.FixtureRequest) -> Iterator[tuple[MPI.Intercomm, int, str]]:
    """(an intercommunicator between the two groups, this process's group: 0 or 1, the
    way of cutting)."""
    if WORLD.Get_size() < 2:
        pytest.skip("two groups need 2 ranks or more")
    color, local_leader, remote_leader = _split(request.param)
    local = WORLD.Split(color, WORLD.Get_rank())
    comm = local.Create_intercomm(local_leader, WORLD, remote_leader, 77)
    local.Free()
    yield comm, color, request.param
    comm.Free()
    WORLD.Barrier()


def _remote_world(comm: MPI.Intercomm) -> list[int]:
    group = comm.Get_remote_group()
    return group.Translate_ranks(list(range(group.Get_size())), WORLD.Get_group())


def test_groups_and_queries(inter):
    comm, color, kind = inter
    size = WORLD.Get_size()
    mine = [r for r in range(size) if _color(kind, r) == color]
    assert comm.Is_inter() and not comm.Is_intra() and comm.is_inter
    assert comm.Get_size() == len(mine) and comm.Get_remote_size() == size - len(mine)
    assert comm.Get_rank() == mine.index(WORLD.Get_rank())
    assert _remote_world(comm) == [r for r in range(size) if r not in mine]
    assert MPI.Comm.Compare(comm, comm) == MPI.IDENT
    dup = comm.Dup()
    assert type(dup) is MPI.Intercomm and MPI.Comm.Compare(comm, dup) == MPI.CONGRUENT
    dup.Free()
    with pytest.raises(TypeError):
        MPI.Intracomm(comm)
    with pytest.raises(TypeError):
        MPI.Intercomm(WORLD)


def test_point_to_point_addresses_the_remote_group(inter):
    comm, color, _ = inter
    rank, rsize = comm.Get_rank(), comm.Get_remote_size()
    remote = _remote_world(comm)
    # every process sends its world rank to every remote process, tag = its local rank
    reqs = [comm.isend((WORLD.Get_rank(), rank), r, tag=rank) for r in range(rsize)]
    got = {}
    for _ in range(rsize):
        status = MPI.Status()
        world, sender = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
        assert status.Get_source() == sender and status.Get_tag() == sender
        got[sender] = world
    MPI.Request.Waitall(reqs)
    assert [got[r] for r in range(rsize)] == remote
    comm.Barrier()  # (else an ANY_TAG receive above may take a message sent below)
    # buffers, both directions, and a large message (pieces) to remote rank 0
    out = np.arange(300_000, dtype="f8") + color
    back = np.empty_like(out)
    if rank == 0:
        comm.Sendrecv(out, 0, 5, back, 0, 5)
        assert np.array_equal(back, np.arange(300_000, dtype="f8") + 1 - color)
    # a matched probe takes the message from the remote group
    if rank == 0:
        comm.Send(np.array([color, 42], "i"), 0, 9)
        message = comm.Mprobe(0, 9)
        data = np.zeros(2, "i")
        message.Recv(data)
        assert list(data) == [1 - color, 42] and not message


def test_rooted_collectives(inter):
    comm, color, _ = inter
    rank, size, rsize = comm.Get_rank(), comm.Get_size(), comm.Get_remote_size()
    for root_group in (0, 1):
        for root in range(size if color == root_group else rsize):
            if color == root_group:  # the root's group: ROOT at the root, PROC_NULL around it
                where = MPI.ROOT if rank == root else MPI.PROC_NULL
                assert comm.bcast(("obj", root) if where == MPI.ROOT else None, where) is None
                buf = np.full(4, root + 10, "i")
                comm.Bcast(buf if where == MPI.ROOT else None, where)
                parts = np.full((rsize, 3), -1, "i")
                comm.Gather(None, parts if where == MPI.ROOT else None, where)
                if where == MPI.ROOT:
                    assert parts.tolist() == [[r, r, root] for r in range(rsize)]
                    assert comm.gather(None, where) == [("g", r) for r in range(rsize)]
                else:
                    assert comm.gather(None, where) is None
                sendparts = np.array([[root, r] for r in range(rsize)], "i")
                comm.Scatter(sendparts if where == MPI.ROOT else None, None, where)
                scattered = comm.scatter([r * 2 for r in range(rsize)], where)
                assert scattered is None
                total = np.zeros(2, "i8")
                comm.Reduce(None, total if where == MPI.ROOT else None, MPI.SUM, where)
                if where == MPI.ROOT:
                    assert list(total) == [rsize * (rsize - 1) // 2, rsize]
                    assert comm.reduce(None, MPI.SUM, where) == rsize * (rsize - 1) // 2
                else:
                    assert comm.reduce(None, MPI.SUM, where) is None
            else:  # the other group: the root's rank in the remote group
                assert comm.bcast(None, root) == ("obj", root)
                buf = np.zeros(4, "i")
                comm.Bcast(buf, root)
                assert list(buf) == [root + 10] * 4
                comm.Gather(np.array([rank, rank, root], "i"), None, root)
                comm.gather(("g", rank), root)
                mine = np.zeros(2, "i")
                comm.Scatter(None, mine, root)
                assert list(mine) == [root, rank]
                assert comm.scatter(None, root) == rank * 2
                comm.Reduce(np.array([rank, 1], "i8"), None, MPI.SUM, root)
                comm.reduce(rank, MPI.SUM, root)
    with pytest.raises(MPI.Exception) as bad:
        comm.bcast(None, rsize)
    assert bad.value.Get_error_class() == MPI.ERR_ROOT


def _matmul(inbuf, inoutbuf, datatype):
    """A non-commutative op: 2x2 int64 matrix products, x op y = x @ y (x: lower rank)."""
    x = np.frombuffer(inbuf, dtype="i8").reshape(-1, 2, 2)
    y = np.frombuffer(inoutbuf, dtype="i8").reshape(-1, 2, 2)
    y[...] = x @ y


MATMUL = MPI.Op.Create(_matmul, commute=False)


def _mat(world_rank: int) -> np.ndarray:
    return np.array([[1, world_rank + 1], [1, 0]], dtype="i8")


def test_all_collectives(inter):
    comm, color, _ = inter
    rank, rsize = comm.Get_rank(), comm.Get_remote_size()
    me = WORLD.Get_rank()
    remote = _remote_world(comm)
    comm.Barrier()
    comm.barrier()
    assert comm.allgather(me) == remote
    assert comm.alltoall([(me, r) for r in range(rsize)]) == [(w, rank) for w in remote]
    assert comm.allreduce(me, MPI.SUM) == sum(remote)
    both = np.full((rsize, 2), -1, "i")
    comm.Allgather(np.array([me, color], "i"), both)
    assert both.tolist() == [[w, 1 - color] for w in remote]
    sent = np.array([[me, r] for r in range(rsize)], "i")
    got = np.zeros((rsize, 2), "i")
    comm.Alltoall(sent, got)
    assert got.tolist() == [[w, rank] for w in remote]
    # v and w forms: remote rank r gets r + 1 elements from every process
    counts = [r + 1 for r in range(rsize)]
    vsend = np.concatenate([np.full(c, me, "i") for c in counts])
    vrecv = np.zeros(rsize * (rank + 1), "i")
    comm.Alltoallv([vsend, counts], [vrecv, [rank + 1] * rsize])
    assert vrecv.tolist() == [w for w in remote for _ in range(rank + 1)]
    wrecv = np.zeros(rsize * (rank + 1), "i")
    displs = [sum(counts[:r]) * 4 for r in range(rsize)]
    rdispls = [r * (rank + 1) * 4 for r in range(rsize)]
    comm.Alltoallw(
        [vsend, (counts, displs), [MPI.INT] * rsize],
        [wrecv, ([rank + 1] * rsize, rdispls), [MPI.INT] * rsize],
    )
    assert np.array_equal(wrecv, vrecv)
    # folds in the remote group's rank order (a non-commutative op shows it)
    product = np.zeros(4, "i8")
    comm.Allreduce(_mat(me).ravel(), product, MATMUL)
    expected = np.linalg.multi_dot([_mat(w) for w in remote] + [np.eye(2, dtype="i8")])
    assert product.tolist() == expected.ravel().tolist()
    block = np.zeros(2, "i8")
    comm.Reduce_scatter_block(np.arange(2 * rsize, dtype="i8") + me, block, MPI.SUM)
    assert block.tolist() == [sum(remote) + len(remote) * (2 * rank + k) for k in (0, 1)]
    mine = np.zeros(rank + 1, "i8")
    comm.Reduce_scatter(np.arange(rsize * (rsize + 1), dtype="i8"), mine, None, MPI.MAX)
    start = rank * (rank + 1) // 2
    assert mine.tolist() == list(range(start, start + rank + 1))
    # nonblocking forms, several in flight at once
    ibuf = np.zeros(3, "i8")
    gathered = np.zeros((rsize, 1), "i")
    reqs = [
        comm.Ibarrier(),
        comm.Iallreduce(np.array([me, 1, rank], "i8"), ibuf, MPI.SUM),
        comm.Iallgather(np.array([me], "i"), gathered),
    ]
    MPI.Request.Waitall(reqs)
    assert ibuf.tolist()[:2] == [sum(remote), rsize]
    assert gathered.ravel().tolist() == remote


def test_merge_split_create(inter):
    comm, color, _ = inter
    me = WORLD.Get_rank()
    remote = _remote_world(comm)
    local = comm.Get_group().Translate_ranks(list(range(comm.Get_size())), WORLD.Get_group())
    for high in (False, True):
        merged = comm.Merge(high if color == 0 else not high)
        order = remote + local if (color == 0) == high else local + remote
        assert merged.Get_size() == WORLD.Get_size() and merged.allgather(me) == order
        assert merged.allreduce(1) == WORLD.Get_size()
        merged.Free()
    same = comm.Merge(False)  # both groups low: the group of the lower leader first
    assert sorted(same.allgather(me)) == list(range(WORLD.Get_size()))
    same.Free()
    pair = comm.Split(comm.Get_rank(), 0)  # local rank i with remote rank i
    if comm.Get_rank() < min(comm.Get_size(), comm.Get_remote_size()):
        assert pair.Get_size() == 1 and pair.Get_remote_size() == 1
        assert pair.sendrecv(me, 0, 3, None, 0, 3) == remote[comm.Get_rank()]
        pair.Free()
    else:
        assert pair == MPI.COMM_NULL
    first = comm.Get_group().Incl([0])
    sub = comm.Create(first)
    if comm.Get_rank() == 0:
        assert sub.Get_size() == 1 and sub.Get_remote_size() == 1
        assert sub.allgather(me) == [remote[0]]
        sub.Free()
    else:
        assert sub == MPI.COMM_NULL
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    if shared != MPI.COMM_NULL:
        assert shared.Is_inter()
        shared.Free()
    assert comm.Split_type(MPI.UNDEFINED) == MPI.COMM_NULL


def test_collective_error_does_not_hang_the_other_group(inter):
    comm, color, _ = inter
    routes = MPI._internal_state()["routes"]
    if any(routes[w][0] == 2 for w in _remote_world(comm)):
        pytest.skip("an abandoned collective is announced over shared memory only")
    # group 0 passes a bad count: it raises ValueError, group 1 fails instead of waiting
    if color == 0:
        with pytest.raises(ValueError):
            comm.alltoall([None] * (comm.Get_remote_size() + 1))
    else:
        with pytest.raises(MPI.Exception):
            comm.alltoall([None] * comm.Get_remote_size())
    comm_ok = comm.allgather(color)  # the next collective works on every process
    assert comm_ok == [1 - color] * comm.Get_remote_size()


def _skip_unless_shared_memory(comm: MPI.Intercomm) -> None:
    routes = MPI._internal_state()["routes"]
    if any(routes[w][0] == 2 for w in _remote_world(comm)):
        pytest.skip("an abandoned collective is announced over shared memory only")


@pytest.mark.parametrize("call", ["Allreduce", "Reduce"])
def test_short_operand_is_refused_naming_the_remote_rank(inter, call):
    """A remote process whose operand is shorter than this one's (an erroneous or hostile
    peer) fails the fold with an error naming it: the rest of the receive buffer holds no
    operand (it held uninitialised memory, folded into the result)."""
    comm, color, _ = inter
    _skip_unless_shared_memory(comm)
    rsize = comm.Get_remote_size()
    out = np.zeros(4, "i8")
    if color == 0 and call == "Reduce" and comm.Get_rank() != 0:
        comm.Reduce(None, None, MPI.PROD, MPI.PROC_NULL)  # (the root is this group's rank 0)
    elif color == 0:  # the honest side
        with pytest.raises(MPI.Exception, match=r"remote rank 0 sent 8 bytes where 32"):
            if call == "Allreduce":
                comm.Allreduce(np.ones(4, "i8"), out, MPI.PROD)
            else:
                comm.Reduce(None, out, MPI.PROD, MPI.ROOT)
    else:  # the short side: it completes, or fails once the honest side abandons it
        try:
            if call == "Allreduce":
                comm.Allreduce(np.ones(1, "i8"), out, MPI.PROD)
            else:
                comm.Reduce(np.ones(1, "i8"), None, MPI.PROD, 0)
        except MPI.Exception as exc:
            assert exc.Get_error_class() == MPI.ERR_OTHER
    assert comm.allgather(color) == [1 - color] * rsize  # the next collective works


def _forged_block_size(comm: MPI.Intercomm, told: bytes) -> None:
    """The first stage of an intercommunicator Reduce_scatter as a hostile process runs it:
    `told` (a block size: 8 little-endian bytes) to every remote process."""

    def stages(tag: int):
        heard = [memoryview(bytearray(8)) for _ in range(comm.Get_remote_size())]
        yield [comm._recv(view, r, tag) for r, view in enumerate(heard)] + [
            comm._send(memoryview(told), r, tag) for r in range(len(heard))
        ]

    try:
        comm._start(stages).Wait()
    except MPI.Exception as exc:  # the honest side abandoned it before this one completed
        assert exc.Get_error_class() == MPI.ERR_OTHER


@pytest.mark.parametrize(
    ("told", "what"),
    [((1 << 62).to_bytes(8, "little"), r"remote rank 0 asked for 4611686018427387904"),
     (b"\x01\x00\x00", r"remote rank 0 sent 3 bytes where 8")],
    ids=["huge", "short"],
)  # fmt: skip
def test_forged_block_size_is_refused_naming_the_remote_rank(inter, told, what):
    """Reduce_scatter's block sizes come from the remote processes: one that is out of the
    operand's bounds, or not 8 bytes, fails the collective on every member of the honest
    group with an error naming its sender (a ValueError naming nobody before); a member that
    sees the collective abandoned by another before reading its own gets that member's
    reason (it said "MPI_ERR_OTHER in a stage")."""
    comm, color, _ = inter
    _skip_unless_shared_memory(comm)
    rsize = comm.Get_remote_size()
    if color == 0:
        with pytest.raises(MPI.Exception, match=what):
            comm.Reduce_scatter_block(np.zeros(2 * rsize, "i8"), np.zeros(2, "i8"), MPI.SUM)
    else:
        _forged_block_size(comm, told)
    assert comm.allgather(color) == [1 - color] * rsize  # the next collective works


def test_spawn_is_refused_clearly():
    with pytest.raises(MPI.Exception) as refused:
        MPI.COMM_SELF.Spawn("python", ["-c", "pass"], 1)
    assert refused.value.Get_error_class() == MPI.ERR_SPAWN
    assert "not supported" in str(refused.value)
    parent = MPI.Comm.Get_parent()
    assert isinstance(parent, MPI.Intercomm) and parent == MPI.COMM_NULL
