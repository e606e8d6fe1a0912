"""Neighbor collectives of the topology communicators (mixin of `topology.Topocomm`):
Neighbor_allgather(v), Neighbor_alltoall(v), Neighbor_alltoallw, their nonblocking
Ineighbor_* and persistent Neighbor_*_init forms, and the object forms neighbor_allgather /
neighbor_alltoall.

Each is one stage of point-to-point messages on the communicator's collective context:
a receive from every in-neighbor (slot k of the receive buffer) and a send to every
out-neighbor (slot j of the send buffer, or the one send buffer for allgather). A PROC_NULL
neighbor keeps its slot but moves no data (its receive slot is left as it was; objects: None).

Matching. All messages of one instance carry one tag (a blocking instance's tag base, or the
nonblocking instance's own tag), so between two ranks they match in the order sent (MPI's
non-overtaking rule). A rank that is several neighbors of another (a ring of 2, a periodic
dimension of size 1 or 2, repeated graph edges) therefore gets them in the order the peer
sends: the peer's out-slot order. For graphs that is MPI's rule (the k-th edge from a
peer matches the k-th in-edge naming it); for Cartesian grids MPI-4 says the data sent to
the -1 neighbor of a dimension arrives in that rank's +1 slot and the reverse, so a
Cartcomm posts its receives in the order of the slots the peer sends to (`_receive_order`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from guest_lib.mpi import buffers, constants, locks
from guest_lib.mpi.collectives import T_ALLGATHER, T_ALLTOALL, collective
from guest_lib.mpi.matching import Op
from guest_lib.mpi.pickling import dumps as _dumps
from guest_lib.mpi.request import Request, unpickle

if TYPE_CHECKING:

    class _Base:
        def _sources(self) -> list[int]: ...
        def _destinations(self) -> list[int]: ...
        def _run(self, stages: Iterator[list[Op]]) -> None: ...
        def _nonblocking(
            self,
            stages: Callable[[int], Iterator[list[Op]]],
            plan: Any = None,
            declined: Any = None,
        ) -> Request: ...
        def _c_isend(self, view: memoryview, dest: int, tag: int) -> Op: ...
        def _c_irecv(
            self, view: memoryview | None, source: int, tag: int, sink: Any = None
        ) -> Op: ...
        def _c_wait(self, pending: list[Op]) -> None: ...
else:
    _Base = object


class NeighborCollectives(_Base):
    """The neighbor collectives, over `_sources()` / `_destinations()` (the topology's
    in- and out-neighbors in MPI's order, PROC_NULL included)."""

    def _receive_order(self) -> list[int]:
        """The receive slots in the order a peer's messages to this rank are meant for
        them (see the module docstring): slot order, except on Cartesian grids."""
        return list(range(len(self._sources())))

    def _exchange(
        self, sends: Sequence[memoryview], into: Sequence[memoryview | None], tag: int
    ) -> tuple[list[Op], list[Op | None]]:
        """Post the receives (slot k into `into[k]`; None: an object of any size) and the
        sends (`sends[j]` to out-neighbor j). Returns (every op, receive op of each slot:
        None for a PROC_NULL in-neighbor)."""
        sources, dests = self._sources(), self._destinations()
        slots: list[Op | None] = [None] * len(sources)
        for k in self._receive_order():
            if sources[k] != constants.PROC_NULL:
                slots[k] = self._c_irecv(into[k], sources[k], tag)
        ops = [op for op in slots if op is not None]
        for dest, data in zip(dests, sends, strict=True):
            if dest != constants.PROC_NULL:
                ops.append(self._c_isend(data, dest, tag))
        return ops, slots

    # ------------------------------------------------------------------ buffers
    def _allgather_stages(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        into = buffers.parse_vector(recvbuf, len(self._sources()), writable=True)
        data = buffers.parse(sendbuf).view
        parts = [into.part(k) for k in range(len(into.counts))]
        yield self._exchange([data] * len(self._destinations()), parts, tag)[0]

    def _alltoall_stages(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        into = buffers.parse_vector(recvbuf, len(self._sources()), writable=True)
        out = buffers.parse_vector(sendbuf, len(self._destinations()))
        sends = [out.part(j) for j in range(len(out.counts))]
        parts = [into.part(k) for k in range(len(into.counts))]
        yield self._exchange(sends, parts, tag)[0]

    def _alltoallw_stages(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        into = buffers.parse_w(recvbuf, len(self._sources()), writable=True)
        sends = buffers.parse_w(sendbuf, len(self._destinations()))
        yield self._exchange(sends, into, tag)[0]

    @collective
    def Neighbor_allgather(self, sendbuf: Any, recvbuf: Any) -> None:
        """Every in-neighbor's sendbuf into its slot of recvbuf (a vector spec of indegree
        parts: counts/displacements for the v-form). ValueError for a malformed spec,
        MPI.Exception(ERR_TRUNCATE) for a message larger than its slot."""
        self._run(self._allgather_stages(sendbuf, recvbuf, T_ALLGATHER))

    Neighbor_allgatherv = Neighbor_allgather

    @collective
    def Neighbor_alltoall(self, sendbuf: Any, recvbuf: Any) -> None:
        """Part j of sendbuf (outdegree parts) to out-neighbor j, in-neighbor k's part into
        part k of recvbuf (indegree parts); the v-form takes counts/displacements."""
        self._run(self._alltoall_stages(sendbuf, recvbuf, T_ALLTOALL))

    Neighbor_alltoallv = Neighbor_alltoall

    @collective
    def Neighbor_alltoallw(self, sendbuf: Any, recvbuf: Any) -> None:
        """Neighbor_alltoall with a count, a byte displacement and a datatype per slot:
        [buf, (counts, displs), datatypes] on each side (as Alltoallw)."""
        self._run(self._alltoallw_stages(sendbuf, recvbuf, T_ALLTOALL))

    def _started(self, stages: Callable[..., Iterator[list[Op]]], *args: Any) -> Request:
        return self._nonblocking(functools.partial(stages, *args))

    def Ineighbor_allgather(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Nonblocking Neighbor_allgather(v): the data is in recvbuf once the request
        completes."""
        return self._started(self._allgather_stages, sendbuf, recvbuf)

    Ineighbor_allgatherv = Ineighbor_allgather

    def Ineighbor_alltoall(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Nonblocking Neighbor_alltoall(v)."""
        return self._started(self._alltoall_stages, sendbuf, recvbuf)

    Ineighbor_alltoallv = Ineighbor_alltoall

    def Ineighbor_alltoallw(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Nonblocking Neighbor_alltoallw."""
        return self._started(self._alltoallw_stages, sendbuf, recvbuf)

    # ------------------------------------------------------------------ persistent
    def _persistent(self, start: Callable[[Any, Any], Request], sendbuf: Any, recvbuf: Any) -> Any:
        from guest_lib.mpi.persistent import Prequest

        return Prequest(functools.partial(start, sendbuf, recvbuf))

    def Neighbor_allgather_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Any:
        """A persistent Neighbor_allgather(v) (MPI-4): each Start runs Ineighbor_allgather
        over the same buffers (re-read at each Start). Members start it in the same order
        as their other nonblocking collectives on this communicator."""
        return self._persistent(self.Ineighbor_allgather, sendbuf, recvbuf)

    Neighbor_allgatherv_init = Neighbor_allgather_init

    def Neighbor_alltoall_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Any:
        """A persistent Neighbor_alltoall(v): each Start runs Ineighbor_alltoall."""
        return self._persistent(self.Ineighbor_alltoall, sendbuf, recvbuf)

    Neighbor_alltoallv_init = Neighbor_alltoall_init

    def Neighbor_alltoallw_init(self, sendbuf: Any, recvbuf: Any, info: Any = None) -> Any:
        """A persistent Neighbor_alltoallw: each Start runs Ineighbor_alltoallw."""
        return self._persistent(self.Ineighbor_alltoallw, sendbuf, recvbuf)

    # ------------------------------------------------------------------ objects
    def _objects(self, items: Sequence[Any], tag: int) -> list[Any]:
        sends = [memoryview(_dumps(item)) for item in items]
        ops, slots = self._exchange(sends, [None] * len(self._sources()), tag)
        self._c_wait(ops)
        return [None if op is None else unpickle(op) for op in slots]

    @locks.locked("neighbor_allgather")
    @collective
    def neighbor_allgather(self, sendobj: Any) -> list[Any]:
        """The objects of the in-neighbors, in slot order (None for a PROC_NULL one)."""
        return self._objects([sendobj] * len(self._destinations()), T_ALLGATHER)

    @locks.locked("neighbor_alltoall")
    @collective
    def neighbor_alltoall(self, sendobj: Sequence[Any]) -> list[Any]:
        """sendobj[j] to out-neighbor j; returns the in-neighbors' objects in slot order
        (None for a PROC_NULL one). ValueError unless len(sendobj) is the outdegree."""
        items = list(sendobj)
        if len(items) != len(self._destinations()):
            raise ValueError(
                f"neighbor_alltoall: expecting {len(self._destinations())} items, got {len(items)}"
            )
        return self._objects(items, T_ALLTOALL)


# derived datatypes received into are unpacked after the call (see buffers.unpacking)
for _name in (
    "Neighbor_allgather", "Neighbor_allgatherv", "Neighbor_alltoall", "Neighbor_alltoallv",
    "Neighbor_alltoallw", "Ineighbor_allgather", "Ineighbor_allgatherv", "Ineighbor_alltoall",
    "Ineighbor_alltoallv", "Ineighbor_alltoallw",
):  # fmt: skip
    setattr(NeighborCollectives, _name, buffers.unpacking(getattr(NeighborCollectives, _name)))
