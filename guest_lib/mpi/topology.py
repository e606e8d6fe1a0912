"""Process topologies (mpi4py's names): `Intracomm.Create_cart` / `Cartcomm`,
`Create_graph` / `Graphcomm`, `Create_dist_graph(_adjacent)` / `Distgraphcomm`, the
`Topocomm` base they share (neighbor lists, degrees, the neighbor collectives of
`neighbor.py`), `Compute_dims`, `Cart_map` / `Graph_map`.

A topology communicator is an Intracomm (same engine, made by a Split or Dup of the parent,
so it has a context of its own) that also knows its graph. Cartesian ranks are laid out in
row-major order (the last coordinate varies fastest), as MPI specifies. `reorder` is
accepted and ignored: ranks keep their order (MPI allows it), so `Cart_map`/`Graph_map`
return the rank a process keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from guest_lib.mpi import constants, exceptions
from guest_lib.mpi.comm import COMM_NULL, Comm, Intracomm
from guest_lib.mpi.neighbor import NeighborCollectives

GRAPH, CART, DIST_GRAPH = 1, 2, 3  # MPICH's values of MPI_GRAPH, MPI_CART, MPI_DIST_GRAPH
UNWEIGHTED, WEIGHTS_EMPTY = constants.UNWEIGHTED, constants.WEIGHTS_EMPTY


def Compute_dims(nnodes: int, dims: int | Sequence[int]) -> list[int]:
    """Return a balanced grid of `nnodes` in len(dims) dimensions (an int `dims`: that many).

    The non-zero entries of `dims` are kept, the zeros filled in non-increasing order.
    MPI.Exception(ERR_DIMS) when the fixed entries do not divide `nnodes` (or a value is negative).
    """
    dims = [0] * dims if isinstance(dims, int) else [int(d) for d in dims]
    if nnodes < 0 or any(d < 0 for d in dims):
        raise exceptions.Exception(exceptions.ERR_DIMS, f"nnodes {nnodes}, dims {dims}")
    fixed = 1
    for d in dims:
        fixed *= d or 1
    free = [i for i, d in enumerate(dims) if d == 0]
    if (nnodes if nnodes else 1) % fixed or (not free and fixed != nnodes):
        raise exceptions.Exception(exceptions.ERR_DIMS, f"{nnodes} nodes over dims {dims}")
    left = nnodes // fixed
    factors: list[int] = []
    n, p = left, 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    sizes = [1] * len(free)
    for factor in sorted(factors, reverse=True):  # biggest first onto the smallest dim
        sizes[sizes.index(min(sizes))] *= factor
    for i, size in zip(free, sorted(sizes, reverse=True), strict=True):
        dims[i] = size
    return dims


class Topocomm(NeighborCollectives, Intracomm):
    """A communicator with a topology (mpi4py's abstract `Topocomm`).

    Its in- and out-neighbors (`_sources`, `_destinations`, in MPI's neighbor order; PROC_NULL keeps
    a slot) and the neighbor collectives over them.

    `Topocomm(other)` copies the handle of `other`, which must be of this class: TypeError
    otherwise (as mpi4py, e.g. `Graphcomm(cartcomm)`); no argument: a null handle."""

    def _bind(self, comm: Comm) -> None:
        """Copy the handle of `comm`, a null one or one of this library class.

        A subclass's class is its library base's: MyCartcomm(cart) takes a Cartcomm; TypeError for
        another.
        """
        kind = next(k for k in type(self).__mro__ if k.__module__ == __name__)
        if comm._null:
            self.__dict__.update(comm.__dict__)
            return
        if kind is Topocomm or not isinstance(comm, kind):
            raise TypeError(f"expecting a {kind.__name__}, got {type(comm).__name__}")
        self.__dict__.update(comm.__dict__)

    def _sources(self) -> list[int]:
        raise NotImplementedError

    def _destinations(self) -> list[int]:
        raise NotImplementedError

    @property
    def is_topo(self) -> bool:
        """True: this communicator has a topology."""
        return True

    @property
    def indegree(self) -> int:
        """How many in-neighbors (slots, PROC_NULL ones included)."""
        return len(self._sources())

    @property
    def outdegree(self) -> int:
        """How many out-neighbors (slots, PROC_NULL ones included)."""
        return len(self._destinations())

    @property
    def degrees(self) -> tuple[int, int]:
        """Number of (in, out) neighbors of this rank."""
        return self.indegree, self.outdegree

    @property
    def inedges(self) -> list[int]:
        """In-neighbors of this rank, in MPI's neighbor order (PROC_NULL keeps a slot)."""
        return self._sources()

    @property
    def outedges(self) -> list[int]:
        """Out-neighbors of this rank, in MPI's neighbor order (PROC_NULL keeps a slot)."""
        return self._destinations()

    @property
    def inoutedges(self) -> tuple[list[int], list[int]]:
        """In- and out-neighbors of this rank: (inedges, outedges)."""
        return self._sources(), self._destinations()

    def Dup(self, info: Any = None) -> Any:
        """A new communicator with the same group, topology and a new context (collective)."""
        return _wrap(type(self), Intracomm.Dup(self), **self._topology_fields())

    Clone = Dup

    def _topology_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k.startswith("_t_")}


class Cartcomm(Topocomm):
    """An intracommunicator with a Cartesian grid (`dims`, `periods`) over its ranks."""

    _t_dims: list[int]
    _t_periods: list[bool]

    def Get_topology(self) -> int:
        """Return CART."""
        return CART

    def Get_dim(self) -> int:
        """Return the number of dimensions of the grid."""
        return len(self._t_dims)

    @property
    def dim(self) -> int:
        """Number of dimensions of the grid (Get_dim)."""
        return len(self._t_dims)

    ndim = dim

    def Get_topo(self) -> tuple[list[int], list[bool], list[int]]:
        """Return (dims, periods, this rank's coordinates)."""
        return list(self._t_dims), list(self._t_periods), self.Get_coords(self.Get_rank())

    @property
    def topo(self) -> tuple[list[int], list[bool], list[int]]:
        """Topology: (dims, periods, this rank's coordinates) (Get_topo)."""
        return self.Get_topo()

    @property
    def dims(self) -> list[int]:
        """Size of the grid in each dimension."""
        return list(self._t_dims)

    @property
    def periods(self) -> list[bool]:
        """Periodicity of each dimension."""
        return list(self._t_periods)

    @property
    def coords(self) -> list[int]:
        """Coordinates of this rank in the grid."""
        return self.Get_coords(self.Get_rank())

    def Get_cart_rank(self, coords: Sequence[int]) -> int:
        """Return the rank at `coords`; periodic dimensions wrap.

        MPI.Exception(ERR_ARG) for a coordinate outside a non-periodic dimension, or a wrong number
        of coordinates.
        """
        if len(coords) != len(self._t_dims):
            raise exceptions.Exception(exceptions.ERR_ARG, f"{len(coords)} coordinates")
        rank = 0
        for c, d, periodic in zip(coords, self._t_dims, self._t_periods, strict=True):
            if periodic:
                c %= d
            elif not 0 <= c < d:
                raise exceptions.Exception(exceptions.ERR_ARG, f"coordinate {c} of {d}")
            rank = rank * d + c
        return rank

    def Get_coords(self, rank: int) -> list[int]:
        """The coordinates of `rank` (row-major)."""
        if not 0 <= rank < self.Get_size():
            raise exceptions.Exception(exceptions.ERR_RANK, f"rank {rank}")
        coords = []
        for d in reversed(self._t_dims):
            rank, c = divmod(rank, d)
            coords.append(c)
        return coords[::-1]

    def Shift(self, direction: int, disp: int) -> tuple[int, int]:
        """Return (source, dest): the ranks `disp` steps back and forth along `direction`.

        PROC_NULL off the edge of a non-periodic dimension; MPI.Exception(ERR_DIMS) for a direction
        outside the grid.
        """
        if not 0 <= direction < len(self._t_dims):
            raise exceptions.Exception(exceptions.ERR_DIMS, f"direction {direction}")
        here = self.Get_coords(self.Get_rank())

        def moved(step: int) -> int:
            coords = list(here)
            coords[direction] += step
            d = self._t_dims[direction]
            if not self._t_periods[direction] and not 0 <= coords[direction] < d:
                return constants.PROC_NULL
            return self.Get_cart_rank(coords)

        return moved(-disp), moved(disp)

    def _sources(self) -> list[int]:
        """MPI's neighbor order: for each dimension, the -1 then the +1 neighbor."""
        found = []
        for direction in range(len(self._t_dims)):
            source, dest = self.Shift(direction, 1)
            found += [source, dest]
        return found

    _destinations = _sources

    def _receive_order(self) -> list[int]:
        """Return the slot a peer's k-th message to this rank is for (see NeighborCollectives).

        The data a rank sends to its -1 neighbor lands in that neighbor's +1 slot, and the reverse,
        so a peer that is both (2 ranks, periodic) is told apart by order.
        """
        return [slot ^ 1 for slot in range(2 * len(self._t_dims))]

    def Sub(self, remain_dims: Sequence[bool]) -> Cartcomm:
        """Split the grid into sub-grids keeping the dimensions where `remain_dims` is true.

        Collective; returns this rank's sub-grid, with those dimensions. MPI.Exception(ERR_ARG) for
        a wrong number of flags.
        """
        if len(remain_dims) != len(self._t_dims):
            raise exceptions.Exception(exceptions.ERR_ARG, f"{len(remain_dims)} flags")
        here = self.Get_coords(self.Get_rank())
        color = key = 0
        for c, d, keep in zip(here, self._t_dims, remain_dims, strict=True):
            if keep:
                key = key * d + c
            else:
                color = color * d + c
        sub = self.Split(color, key)
        kept = [i for i, keep in enumerate(remain_dims) if keep]
        return _as_cart(sub, [self._t_dims[i] for i in kept], [self._t_periods[i] for i in kept])


def _wrap(cls: type[Topocomm], comm: Intracomm, **fields: Any) -> Any:
    """`comm` (made for it, not used elsewhere) as a `cls` with those topology fields."""
    topo = cls.__new__(cls)
    topo.__dict__.update(comm.__dict__)
    topo.__dict__.update(fields)
    return topo


def _as_cart(comm: Intracomm, dims: list[int], periods: list[bool]) -> Cartcomm:
    cart: Cartcomm = _wrap(Cartcomm, comm, _t_dims=dims, _t_periods=periods)
    return cart


def _periods(periods: Any, ndims: int) -> list[bool]:
    """mpi4py's periods argument: None (none periodic), one bool for all, or a sequence
    (ValueError for another length than `ndims`)."""
    if periods is None or isinstance(periods, bool | int):
        return [bool(periods)] * ndims
    flags = [bool(p) for p in periods]
    if len(flags) != ndims:
        raise ValueError(f"Create_cart: {len(flags)} periods for {ndims} dimensions")
    return flags


def _grid_cells(dims: Sequence[int], size: int) -> int:
    """The cells of a grid; MPI.Exception(ERR_DIMS) for a bad size or more than `size`."""
    cells = 1
    for d in dims:
        if d <= 0:
            raise exceptions.Exception(exceptions.ERR_DIMS, f"dims {list(dims)}")
        cells *= d
    if cells > size:
        raise exceptions.Exception(exceptions.ERR_DIMS, f"{cells} cells for {size} ranks")
    return cells


def create_cart(comm: Intracomm, dims: Sequence[int], periods: Any, reorder: bool) -> Any:
    """Intracomm.Create_cart: ranks 0 .. prod(dims)-1 of `comm` form the grid, the others
    get COMM_NULL (collective). ValueError for periods of another length; MPI.Exception
    (ERR_DIMS) for a grid larger than the communicator."""
    dims = [int(d) for d in dims]
    flags = _periods(periods, len(dims))
    cells = _grid_cells(dims, comm.Get_size())
    sub = comm.Split(0 if comm.Get_rank() < cells else constants.UNDEFINED, comm.Get_rank())
    if sub == COMM_NULL:
        return COMM_NULL
    return _as_cart(sub, dims, flags)


def cart_map(comm: Intracomm, dims: Sequence[int], periods: Any) -> int:
    """Intracomm.Cart_map: the rank this process would have in Create_cart (its own, as
    ranks are not reordered), UNDEFINED outside the grid. Local."""
    cells = _grid_cells([int(d) for d in dims], comm.Get_size())
    _periods(periods, len(dims))
    return comm.Get_rank() if comm.Get_rank() < cells else constants.UNDEFINED


class Graphcomm(Topocomm):
    """An intracommunicator with a general graph topology.

    Node i's neighbors are edges[index[i-1]:index[i]] (index[-1] = 0), the same list in and out.
    """

    _t_index: list[int]
    _t_edges: list[int]

    def Get_topology(self) -> int:
        """Return GRAPH."""
        return GRAPH

    def Get_dims(self) -> tuple[int, int]:
        """Return (nnodes, nedges)."""
        return len(self._t_index), len(self._t_edges)

    dims = property(Get_dims)

    @property
    def nnodes(self) -> int:
        """Number of nodes of the graph."""
        return len(self._t_index)

    @property
    def nedges(self) -> int:
        """Number of edges of the graph."""
        return len(self._t_edges)

    def Get_topo(self) -> tuple[list[int], list[int]]:
        """Return (index, edges), index without the leading 0."""
        return list(self._t_index), list(self._t_edges)

    topo = property(Get_topo)

    @property
    def index(self) -> list[int]:
        """Index of the graph: node i's edges end at index[i] (no leading 0)."""
        return list(self._t_index)

    @property
    def edges(self) -> list[int]:
        """Edges of the graph, node after node."""
        return list(self._t_edges)

    def Get_neighbors_count(self, rank: int) -> int:
        """How many neighbors `rank` has; MPI.Exception(ERR_RANK) for a rank not a node."""
        return len(self.Get_neighbors(rank))

    def Get_neighbors(self, rank: int) -> list[int]:
        """Return the neighbors of `rank`, in edge order.

        MPI.Exception(ERR_RANK) for a rank not a node.
        """
        if not 0 <= rank < len(self._t_index):
            raise exceptions.Exception(exceptions.ERR_RANK, f"rank {rank}")
        start = self._t_index[rank - 1] if rank else 0
        return list(self._t_edges[start : self._t_index[rank]])

    @property
    def nneighbors(self) -> int:
        """Number of neighbors of this rank."""
        return self.Get_neighbors_count(self.Get_rank())

    @property
    def neighbors(self) -> list[int]:
        """Neighbors of this rank, in edge order."""
        return self.Get_neighbors(self.Get_rank())

    def _sources(self) -> list[int]:
        return self.Get_neighbors(self.Get_rank())

    _destinations = _sources


def _graph(index: Sequence[int], edges: Sequence[int], size: int) -> tuple[list[int], list[int]]:
    """(index without a leading 0, edges), checked: mpi4py also takes the index of CSR
    arrays (a leading 0 and a last entry of len(edges)). MPI.Exception(ERR_ARG) for a
    decreasing index, an edge to no node, or more nodes than `size`."""
    index, edges = [int(i) for i in index], [int(e) for e in edges]
    if len(index) > 1 and index[0] == 0 and index[-1] == len(edges):
        index = index[1:]
    if len(index) > size or any(b < a for a, b in zip([0, *index], index, strict=False)):
        raise exceptions.Exception(exceptions.ERR_ARG, f"graph index {index} over {size} ranks")
    if (index[-1] if index else 0) != len(edges) or any(not 0 <= e < len(index) for e in edges):
        raise exceptions.Exception(exceptions.ERR_ARG, f"graph edges {edges}, index {index}")
    return index, edges


def create_graph(comm: Intracomm, index: Sequence[int], edges: Sequence[int]) -> Any:
    """Intracomm.Create_graph: ranks 0 .. nnodes-1 form the graph, the others get COMM_NULL
    (collective). Errors as `_graph`, raised before any message moves."""
    index, edges = _graph(index, edges, comm.Get_size())
    rank = comm.Get_rank()
    sub = comm.Split(0 if rank < len(index) else constants.UNDEFINED, rank)
    if sub == COMM_NULL:
        return COMM_NULL
    return _wrap(Graphcomm, sub, _t_index=index, _t_edges=edges)


def graph_map(comm: Intracomm, index: Sequence[int], edges: Sequence[int]) -> int:
    """Intracomm.Graph_map: this process's rank in Create_graph (its own), UNDEFINED if it
    is not a node. Local."""
    index, edges = _graph(index, edges, comm.Get_size())
    return comm.Get_rank() if comm.Get_rank() < len(index) else constants.UNDEFINED


class Distgraphcomm(Topocomm):
    """An intracommunicator with a distributed graph topology.

    Each rank knows its own in- and out-neighbors (and their weights, if the graph is weighted).
    """

    _t_sources: list[int]
    _t_destinations: list[int]
    _t_weights: tuple[list[int], list[int]] | None

    def Get_topology(self) -> int:
        """Return DIST_GRAPH."""
        return DIST_GRAPH

    def Get_dist_neighbors_count(self) -> tuple[int, int, bool]:
        """Return (indegree, outdegree, weighted)."""
        return len(self._t_sources), len(self._t_destinations), self._t_weights is not None

    def Get_dist_neighbors(
        self,
    ) -> tuple[list[int], list[int], tuple[list[int], list[int]] | None]:
        """Return (sources, destinations, (sourceweights, destweights) or None if unweighted)."""
        weights = self._t_weights
        return (
            list(self._t_sources),
            list(self._t_destinations),
            None if weights is None else (list(weights[0]), list(weights[1])),
        )

    def _sources(self) -> list[int]:
        return list(self._t_sources)

    def _destinations(self) -> list[int]:
        return list(self._t_destinations)


def _weights(weights: Any, count: int, what: str) -> list[int] | None:
    """None for UNWEIGHTED (or None); [] for WEIGHTS_EMPTY; else `count` ints (ValueError
    for another number, WEIGHTS_EMPTY with edges included)."""
    if weights is None or weights is UNWEIGHTED:
        return None
    found = [] if weights is WEIGHTS_EMPTY else [int(w) for w in weights]
    if len(found) != count:
        raise ValueError(f"{what}: {len(found)} weights for {count} edges")
    return found


def _ranks(ranks: Any, size: int, what: str) -> list[int]:
    found = [] if ranks is None else [int(r) for r in ranks]
    bad = [r for r in found if not 0 <= r < size]
    if bad:
        raise exceptions.Exception(exceptions.ERR_RANK, f"{what}: ranks {bad}")
    return found


def _agreed(comm: Intracomm, check: Callable[[], Any]) -> list[Any]:
    """Every rank's result of `check()` (its own arguments checked, collective). If it
    raised on any rank, every rank raises: its own error, else the lowest failing rank's
    (so a bad argument on one rank never leaves the others waiting in the next step)."""
    try:
        mine: Any = (True, check())
    except (ValueError, TypeError, exceptions.Exception) as exc:
        mine = (False, exc)
    every = comm.allgather(mine)
    if not mine[0]:
        raise mine[1]
    for ok, value in every:
        if not ok:
            raise value
    return [value for _, value in every]


def create_dist_graph_adjacent(
    comm: Intracomm, sources: Any, destinations: Any, sourceweights: Any, destweights: Any
) -> Any:
    """Intracomm.Create_dist_graph_adjacent (collective): each rank gives its own in- and
    out-neighbors. Weighted unless both weights are UNWEIGHTED (or None); ValueError for a
    weight list of another length than its ranks, or one side weighted and not the other;
    MPI.Exception(ERR_RANK) for a rank outside `comm`. An error on any rank raises on
    every rank before the new communicator is made."""
    size = comm.Get_size()

    def check() -> tuple[list[int], list[int], tuple[list[int], list[int]] | None]:
        ins = _ranks(sources, size, "sources")
        outs = _ranks(destinations, size, "destinations")
        inw = _weights(sourceweights, len(ins), "sourceweights")
        outw = _weights(destweights, len(outs), "destweights")
        if (inw is None) != (outw is None):
            raise ValueError("Create_dist_graph_adjacent: weights on one side only")
        return ins, outs, None if inw is None or outw is None else (inw, outw)

    ins, outs, weights = _agreed(comm, check)[comm.Get_rank()]
    return _wrap(
        Distgraphcomm, comm.Dup(), _t_sources=ins, _t_destinations=outs, _t_weights=weights
    )


def create_dist_graph(
    comm: Intracomm, sources: Any, degrees: Any, destinations: Any, weights: Any
) -> Any:
    """Intracomm.Create_dist_graph (collective): each rank gives any edges, sources[i] ->
    the next degrees[i] destinations. A rank's in-neighbors are then ordered by (giving
    rank, position), as are its out-neighbors; the graph is weighted if any rank gave
    weights. ValueError for degrees or weights that do not add up; MPI.Exception(ERR_RANK)
    for a rank outside `comm`. An error on any rank raises on every rank."""
    size = comm.Get_size()

    def check() -> tuple[list[tuple[int, int, int]], bool]:
        srcs = _ranks(sources, size, "sources")
        counts = [int(d) for d in degrees]
        dests = _ranks(destinations, size, "destinations")
        if len(counts) != len(srcs) or any(d < 0 for d in counts) or sum(counts) != len(dests):
            raise ValueError(f"Create_dist_graph: degrees {counts} for {len(dests)} destinations")
        given = _weights(weights, len(dests), "weights")
        edges, at = [], 0
        for src, degree in zip(srcs, counts, strict=True):
            edges += [
                (src, dests[k], 1 if given is None else given[k]) for k in range(at, at + degree)
            ]
            at += degree
        return edges, given is not None

    every = _agreed(comm, check)  # every rank's edges, in rank order
    rank = comm.Get_rank()
    found = [edge for part, _ in every for edge in part]
    ins = [(s, w) for s, d, w in found if d == rank]
    outs = [(d, w) for s, d, w in found if s == rank]
    weighted = any(flag for _, flag in every)
    return _wrap(
        Distgraphcomm,
        comm.Dup(),
        _t_sources=[s for s, _ in ins],
        _t_destinations=[d for d, _ in outs],
        _t_weights=([w for _, w in ins], [w for _, w in outs]) if weighted else None,
    )
