"""Cartesian topologies: `Intracomm.Create_cart` and `Cartcomm` (mpi4py's names), and
`Compute_dims`.

A Cartcomm is an Intracomm (same engine, group and context, made by a Split of the parent)
that also knows its grid: ranks are laid out in row-major order (the last coordinate varies
fastest), as MPI specifies; `reorder` is accepted and ignored (ranks keep their order).
Graph and distributed-graph topologies and neighbor collectives are not here (issue #11
point 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from guest_lib.mpi import constants, exceptions
from guest_lib.mpi.comm import COMM_NULL, Intracomm

GRAPH, CART, DIST_GRAPH = 1, 2, 3  # MPICH's values of MPI_GRAPH, MPI_CART, MPI_DIST_GRAPH


def Compute_dims(nnodes: int, dims: int | Sequence[int]) -> list[int]:
    """A balanced grid of `nnodes` in len(dims) dimensions (an int: that many), keeping the
    non-zero entries of `dims` and filling the zeros in non-increasing order.
    MPI.Exception(ERR_DIMS) when the fixed entries do not divide `nnodes`."""
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


class Cartcomm(Intracomm):
    """An intracommunicator with a Cartesian grid (`dims`, `periods`) over its ranks."""

    _dims: list[int]
    _periods: list[bool]

    def Get_topology(self) -> int:
        return CART

    @property
    def topology(self) -> int:
        return CART

    @property
    def is_topo(self) -> bool:
        return True

    def Get_dim(self) -> int:
        return len(self._dims)

    @property
    def dim(self) -> int:
        return len(self._dims)

    ndim = dim

    def Get_topo(self) -> tuple[list[int], list[bool], list[int]]:
        """(dims, periods, this rank's coordinates)."""
        return list(self._dims), list(self._periods), self.Get_coords(self.Get_rank())

    @property
    def topo(self) -> tuple[list[int], list[bool], list[int]]:
        return self.Get_topo()

    @property
    def dims(self) -> list[int]:
        return list(self._dims)

    @property
    def periods(self) -> list[bool]:
        return list(self._periods)

    @property
    def coords(self) -> list[int]:
        return self.Get_coords(self.Get_rank())

    def Get_cart_rank(self, coords: Sequence[int]) -> int:
        """The rank at `coords` (periodic dimensions wrap; MPI.Exception(ERR_ARG) for a
        coordinate outside a non-periodic one)."""
        if len(coords) != len(self._dims):
            raise exceptions.Exception(exceptions.ERR_ARG, f"{len(coords)} coordinates")
        rank = 0
        for c, d, periodic in zip(coords, self._dims, self._periods, strict=True):
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
        for d in reversed(self._dims):
            rank, c = divmod(rank, d)
            coords.append(c)
        return coords[::-1]

    def Shift(self, direction: int, disp: int) -> tuple[int, int]:
        """(source, dest): the ranks `disp` steps back and forth along `direction` from this
        one; PROC_NULL off the edge of a non-periodic dimension."""
        if not 0 <= direction < len(self._dims):
            raise exceptions.Exception(exceptions.ERR_DIMS, f"direction {direction}")
        here = self.Get_coords(self.Get_rank())

        def moved(step: int) -> int:
            coords = list(here)
            coords[direction] += step
            d = self._dims[direction]
            if not self._periods[direction] and not 0 <= coords[direction] < d:
                return constants.PROC_NULL
            return self.Get_cart_rank(coords)

        return moved(-disp), moved(disp)

    def _neighbors(self) -> list[int]:
        found = []
        for direction in range(len(self._dims)):
            source, dest = self.Shift(direction, 1)
            found += [source, dest]
        return found

    @property
    def indegree(self) -> int:
        return 2 * len(self._dims)

    outdegree = indegree

    @property
    def inedges(self) -> list[int]:
        return self._neighbors()

    outedges = inedges

    @property
    def inoutedges(self) -> tuple[list[int], list[int]]:
        return self._neighbors(), self._neighbors()

    def Sub(self, remain_dims: Sequence[bool]) -> Cartcomm:
        """The sub-grids keeping the dimensions where `remain_dims` is true (collective):
        this rank's one, with those dimensions."""
        if len(remain_dims) != len(self._dims):
            raise exceptions.Exception(exceptions.ERR_ARG, f"{len(remain_dims)} flags")
        here = self.Get_coords(self.Get_rank())
        color = key = 0
        for c, d, keep in zip(here, self._dims, remain_dims, strict=True):
            if keep:
                key = key * d + c
            else:
                color = color * d + c
        sub = self.Split(color, key)
        kept = [i for i, keep in enumerate(remain_dims) if keep]
        return _as_cart(sub, [self._dims[i] for i in kept], [self._periods[i] for i in kept])


def _as_cart(comm: Intracomm, dims: list[int], periods: list[bool]) -> Cartcomm:
    """`comm` (made for it, not used elsewhere) as a Cartcomm with that grid."""
    cart = Cartcomm.__new__(Cartcomm)
    cart.__dict__.update(comm.__dict__)
    cart._dims, cart._periods = dims, periods
    return cart


def create_cart(
    comm: Intracomm, dims: Sequence[int], periods: Sequence[bool] | None, reorder: bool
) -> Any:
    """Intracomm.Create_cart: ranks 0 .. prod(dims)-1 of `comm` form the grid, the others
    get COMM_NULL (collective). ValueError for periods of another length; MPI.Exception
    (ERR_DIMS) for a grid larger than the communicator."""
    dims = [int(d) for d in dims]
    periods = [False] * len(dims) if periods is None else [bool(p) for p in periods]
    if len(periods) != len(dims):
        raise ValueError(f"Create_cart: {len(periods)} periods for {len(dims)} dimensions")
    cells = 1
    for d in dims:
        if d <= 0:
            raise exceptions.Exception(exceptions.ERR_DIMS, f"dims {dims}")
        cells *= d
    size, rank = comm.Get_size(), comm.Get_rank()
    if cells > size:
        raise exceptions.Exception(exceptions.ERR_DIMS, f"{cells} cells for {size} ranks")
    sub = comm.Split(0 if rank < cells else constants.UNDEFINED, rank)
    if sub == COMM_NULL:
        return COMM_NULL
    return _as_cart(sub, dims, periods)
