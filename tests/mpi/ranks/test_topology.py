"""Process topologies and neighbor collectives (issue #11 point 3), at any rank count.

Expectations are written out by hand: for the grids whose neighbors coincide (a ring of 1
or 2, a 2x2 periodic grid), tables per communicator size; elsewhere the neighbor of rank r
by its formula. Slot rule checked (MPI-4): what a rank sends to its -1 neighbor of a
dimension lands in that neighbor's +1 slot, and the reverse.
"""

from __future__ import annotations

import numpy as np
import pytest

from guest_lib.mpi import MPI

NULL = MPI.PROC_NULL

# periodic 1-D ring, Neighbor_alltoall of [100 r, 100 r + 1] (to -1, to +1): per size, the
# receive buffer of each rank (slot 0 from the -1 neighbor's "to +1", slot 1 the reverse)
RING_ALLTOALL = {
    1: [[1, 0]],
    2: [[101, 100], [1, 0]],
    3: [[201, 100], [1, 200], [101, 0]],
    4: [[301, 100], [1, 200], [101, 300], [201, 0]],
}
# 2x2 periodic grid (4 ranks), Neighbor_alltoall of [1000 r + j for slot j in 0..3]
GRID_ALLTOALL = [
    [2001, 2000, 1003, 1002],
    [3001, 3000, 3, 2],
    [1, 0, 3003, 3002],
    [1001, 1000, 2003, 2002],
]


def test_cart_ring_slots(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    ring = comm.Create_cart([size], periods=True)
    assert ring.Get_topology() == MPI.CART and ring.is_topo and not comm.is_topo
    assert ring.inedges == [(rank - 1) % size, (rank + 1) % size] == ring.outedges
    got = np.full(2, -1, "i")
    ring.Neighbor_alltoall(np.array([100 * rank, 100 * rank + 1], "i"), got)
    assert got.tolist() == RING_ALLTOALL[size][rank]
    got[:] = -1
    ring.Ineighbor_alltoall(np.array([100 * rank, 100 * rank + 1], "i"), got).Wait()
    assert got.tolist() == RING_ALLTOALL[size][rank]
    objs = ring.neighbor_alltoall([("down", rank), ("up", rank)])
    assert objs == [("up", (rank - 1) % size), ("down", (rank + 1) % size)]
    assert ring.neighbor_allgather(rank * 3) == [(rank - 1) % size * 3, (rank + 1) % size * 3]
    ring.Free()


def test_cart_line_proc_null(comm):
    """Non-periodic line: the end slots stay as they were (PROC_NULL keeps its slot)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    line = comm.Create_cart([size], periods=False)
    left = rank - 1 if rank else NULL
    right = rank + 1 if rank < size - 1 else NULL
    assert line.inedges == [left, right]
    got = np.full((2, 3), -1.0)
    line.Neighbor_allgather(np.array([rank, rank + 0.5, -rank], "d"), got)
    for slot, peer in enumerate((left, right)):
        expect = [-1.0] * 3 if peer == NULL else [peer, peer + 0.5, -peer]
        assert got[slot].tolist() == expect
    assert line.neighbor_allgather(f"r{rank}") == [
        None if peer == NULL else f"r{peer}" for peer in (left, right)
    ]
    got2 = np.full(2, -7, "q")
    line.Ineighbor_alltoall(np.array([10 * rank, 10 * rank + 1], "q"), got2).Wait()
    assert got2.tolist() == [
        -7 if left == NULL else 10 * left + 1,
        -7 if right == NULL else 10 * right,
    ]
    line.Free()


def test_cart_grid_2x2():
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 4:
        pytest.skip("a 2x2 grid needs 4 ranks")
    rank = comm.Get_rank()
    grid = comm.Create_cart([2, 2], periods=[True, True])
    assert grid.Get_coords(rank) == [rank // 2, rank % 2]
    assert grid.inedges == [rank ^ 2, rank ^ 2, rank ^ 1, rank ^ 1]
    got = np.full(4, -1, "i")
    grid.Neighbor_alltoall(np.array([1000 * rank + j for j in range(4)], "i"), got)
    assert got.tolist() == GRID_ALLTOALL[rank]
    row = grid.Sub([False, True])
    mate = 1 - rank % 2  # the other member of this row, in the row's own ranks
    assert row.dims == [2] and row.Get_rank() == rank % 2 and row.inedges == [mate, mate]
    assert row.neighbor_allgather(rank) == [rank ^ 1, rank ^ 1]
    row.Free()
    grid.Free()


def test_graph(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    # ring with repeated edges (symmetric, as neighbor collectives need): i -> [i+1, i-1] x 2
    index, edges = [0], []
    for i in range(size):
        edges += [(i + 1) % size, (i - 1) % size] * 2
        index.append(len(edges))
    graph = comm.Create_graph(index, edges)
    assert graph.Get_topology() == MPI.GRAPH
    assert graph.Get_dims() == (size, 4 * size) and graph.Get_topo() == (index[1:], edges)
    mine = [(rank + 1) % size, (rank - 1) % size] * 2
    assert graph.Get_neighbors(rank) == mine and graph.Get_neighbors_count(rank) == 4
    assert graph.inoutedges == (mine, mine) and graph.degrees == (4, 4)
    # the k-th message from a peer matches the k-th in-edge naming it
    got = graph.neighbor_alltoall([(rank, "a"), (rank, "b"), (rank, "c"), (rank, "d")])
    expect = []
    for k, peer in enumerate(mine):
        theirs = [(peer + 1) % size, (peer - 1) % size] * 2
        nth = mine[:k].count(peer)  # this is the nth in-edge from peer
        slot = [j for j, dest in enumerate(theirs) if dest == rank][nth]
        expect.append((peer, "abcd"[slot]))
    assert got == expect
    buf = np.zeros((4, 2), "i")
    graph.Ineighbor_allgather(np.array([rank, -rank], "i"), buf).Wait()
    assert buf.tolist() == [[p, -p] for p in mine]
    dup = graph.Dup()
    assert type(dup) is MPI.Graphcomm and dup.Get_topo() == graph.Get_topo()
    dup.Free()
    assert comm.Graph_map(index, edges) == rank
    graph.Free()
    # nodes 0..0: the others get COMM_NULL
    single = comm.Create_graph([1], [0])
    assert (single == MPI.COMM_NULL) == (rank > 0)
    if rank == 0:
        assert single.neighbors == [0] and single.neighbor_allgather("x") == ["x"]
        single.Free()


def test_dist_graph_adjacent_weighted(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    sources = [(rank - 2) % size, (rank - 1) % size]
    dests = [(rank + 1) % size, (rank + 2) % size]
    topo = comm.Create_dist_graph_adjacent(sources, dests, [1, 2], [3, 4])
    assert topo.Get_topology() == MPI.DIST_GRAPH
    assert topo.Get_dist_neighbors_count() == (2, 2, True)
    assert topo.Get_dist_neighbors() == (sources, dests, ([1, 2], [3, 4]))
    # Alltoallw: out-slot j sends send[j : j + 2]; in-slot k lands at got[2 - 2k : 4 - 2k].
    # In-slot 0 (from rank - 2) gets that peer's out-slot 1 (its "rank + 2"), in-slot 1 its
    # out-slot 0; on 1 rank every edge is rank 0 -> 0 and the k-th message fills slot k.
    slot_from = [0, 1] if size == 1 else [1, 0]
    send = np.array([rank + 0.25, rank + 0.5, rank + 0.75])
    d = MPI.DOUBLE
    sendmsg = [send, ([2, 2], [0, 8]), [d, d]]
    peers = sources
    expect = []
    for k in (1, 0):  # got's first half is in-slot 1's, the second in-slot 0's
        j = slot_from[k]
        expect += [peers[k] + 0.25 * (j + 1), peers[k] + 0.25 * (j + 2)]
    for start in (topo.Neighbor_alltoallw, topo.Ineighbor_alltoallw):
        got = np.full(4, -1.0)
        request = start(sendmsg, [got, ([2, 2], [16, 0]), [d, d]])
        if request is not None:
            request.Wait()
        assert got.tolist() == expect
    dup = topo.Dup()
    assert type(dup) is MPI.Distgraphcomm and dup.Get_dist_neighbors() == topo.Get_dist_neighbors()
    dup.Free()
    topo.Free()
    empty = comm.Create_dist_graph_adjacent([], [], MPI.WEIGHTS_EMPTY, MPI.WEIGHTS_EMPTY)
    assert empty.Get_dist_neighbors() == ([], [], ([], []))
    assert empty.neighbor_allgather(rank) == []
    empty.Free()
    with pytest.raises(ValueError):
        comm.Create_dist_graph_adjacent([0], [0], MPI.WEIGHTS_EMPTY, MPI.WEIGHTS_EMPTY)


def test_dist_graph_from_rank0(comm):
    """Rank 0 alone gives every edge r -> r+1 (weight 10 r): each rank learns its own."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if rank == 0:
        sources, degrees = list(range(size)), [1] * size
        dests, weights = [(r + 1) % size for r in range(size)], [10 * r for r in range(size)]
    else:
        sources, degrees, dests, weights = [], [], [], MPI.WEIGHTS_EMPTY
    topo = comm.Create_dist_graph(sources, degrees, dests, weights)
    before = (rank - 1) % size
    assert topo.Get_dist_neighbors() == (
        [before],
        [(rank + 1) % size],
        ([10 * before], [10 * rank]),
    )
    got = np.zeros(1, "i")
    topo.Neighbor_allgatherv(np.array([rank * 7], "i"), [got, [1], [0], MPI.INT])
    assert got.tolist() == [before * 7]
    topo.Free()
    unweighted = comm.Create_dist_graph([rank], [1], [rank], MPI.UNWEIGHTED)
    assert unweighted.Get_dist_neighbors() == ([rank], [rank], None)
    unweighted.Free()


def test_constructors_and_maps():
    self_comm = MPI.COMM_SELF
    cart = self_comm.Create_cart([1])
    with pytest.raises(TypeError):
        MPI.Graphcomm(cart)
    with pytest.raises(TypeError):
        MPI.Topocomm(self_comm)
    assert MPI.Cartcomm(cart) == cart and type(MPI.Cartcomm(cart)) is MPI.Cartcomm
    dup = cart.Dup()
    assert type(dup) is MPI.Cartcomm and dup.dims == [1]
    dup.Free()
    assert cart.topology == MPI.CART and self_comm.topology == MPI.UNDEFINED
    assert not MPI.Graphcomm() and MPI.Graphcomm() == MPI.COMM_NULL
    cart.Free()
    size, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    assert MPI.COMM_WORLD.Cart_map([size], True) == rank
    assert MPI.COMM_WORLD.Cart_map([1]) == (0 if rank == 0 else MPI.UNDEFINED)
    assert MPI.COMM_WORLD.Create_cart([size], periods=True, reorder=True).periods == [True]


def test_dist_graph_bad_arguments_on_one_rank(comm):
    """A bad argument on the last rank only: every rank raises, and the ranks stay in step."""
    size, rank = comm.Get_size(), comm.Get_rank()
    weights = [1, 2] if rank == size - 1 else [1]
    with pytest.raises(ValueError):
        comm.Create_dist_graph_adjacent([rank], [rank], weights, [1])
    with pytest.raises((ValueError, MPI.Exception)):
        comm.Create_dist_graph([rank], [1], [size if rank == size - 1 else rank])
    assert comm.allgather(rank) == list(range(size))


def test_persistent_and_derived_types(comm):
    """Neighbor_alltoall_init restarted with new data; a vector type received into."""
    size, rank = comm.Get_size(), comm.Get_rank()
    ring = comm.Create_cart([size], periods=True)
    send, got = np.zeros(2, "i"), np.full(2, -1, "i")
    request = ring.Neighbor_alltoall_init(send, got)
    for step in range(3):
        send[:] = [100 * rank + 1000 * step, 100 * rank + 1 + 1000 * step]
        request.Start()
        request.Wait()
        assert got.tolist() == [v + 1000 * step for v in RING_ALLTOALL[size][rank]]
    request.Free()
    # two ints from each neighbor into a vector(2, 1, 2) of ints: extent 3 ints per slot
    vector = MPI.INT.Create_vector(2, 1, 2).Commit()
    into = np.full(6, -7, "i")
    ring.Ineighbor_allgather(np.array([rank, -rank], "i"), [into, 1, vector]).Wait()
    left, right = (rank - 1) % size, (rank + 1) % size
    assert into.tolist() == [left, -7, -left, right, -7, -right]
    vector.Free()
    ring.Free()


def test_comm_properties(comm):
    """mpi4py's Python properties next to `topology`: group, info (hints kept by Set_info)."""
    assert comm.topology == comm.Get_topology() == MPI.UNDEFINED and not comm.is_topo
    group = comm.group
    assert group.Get_size() == comm.Get_size() and group.Get_rank() == comm.Get_rank()
    group.Free()
    hints = MPI.Info.Create({"mpi_assert_no_any_tag": "true"})
    comm.info = hints
    hints.Free()
    got = comm.Get_info()
    assert got.items() == [("mpi_assert_no_any_tag", "true")] == comm.info.items()
    got.Free()
    dup = comm.Dup_with_info(MPI.Info.Create({"k": "v"}))
    assert dup.Get_info().items() == [("k", "v")] and dup.Compare(comm) == MPI.CONGRUENT
    dup.Free()
    comm.Set_info(MPI.INFO_NULL)
    assert len(comm.info) == 0
