"""More collectives of an intra-communicator (issue #11 point 3): the nonblocking prefix and
reduce-scatter folds, Alltoallw/Ialltoallw, and the communicator constructors Split_type
and Idup.

They are written as stages, like the nonblocking collectives of `collectives` (each stage a
list of the operations the next one waits for), and run through the same `_nonblocking`
(own tag, abandoned on every member if it fails on one) or `_run` (blocking). Folds go in
rank order, x0 op x1 op ... op x(p-1), so non-commutative user ops give MPI's result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np

from guest_lib.mpi import area, buffers, collectives, constants, errhandler, exceptions, ops
from guest_lib.mpi.collectives import (
    T_ALLTOALL,
    Collectives,
    _array,
    _raw,
    collective,
    reduce_scatter_counts,
)
from guest_lib.mpi.constants import IN_PLACE
from guest_lib.mpi.matching import CLOCK_SHIFT, OFFER_BYTES, Op, merge_offers
from guest_lib.mpi.request import Request

Exchanger = Callable[[bytes, int], Generator[list[Op], None, list[bytes]]]


class ExtraCollectives(Collectives):
    """Iscan, Iexscan, Ireduce_scatter(_block), Alltoallw, Ialltoallw, Split_type, Idup."""

    # provided by Comm
    Split: Callable[..., Any]
    Dup: Callable[..., Any]
    _mirror: Any

    # ------------------------------------------------------------------ prefix folds
    @collectives.started(collectives._a_scan, None, collectives._e_fold)
    def Iscan(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> Request:
        """Nonblocking Scan: rank r gets x0 op ... op xr (a chain along the ranks)."""
        return self._nonblocking(
            functools.partial(self._prefix_steps, sendbuf, recvbuf, op, True),
            functools.partial(self._p_fold, "scan", sendbuf, recvbuf, op),
        )

    @collectives.started(collectives._a_exscan, None, collectives._e_fold)
    def Iexscan(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> Request:
        """Start an Exscan; return the Request.

        Rank r > 0 gets x0 op ... op x(r-1); rank 0's recvbuf is left as it was.
        """
        return self._nonblocking(
            functools.partial(self._prefix_steps, sendbuf, recvbuf, op, False),
            functools.partial(self._p_fold, "exscan", sendbuf, recvbuf, op),
        )

    def _prefix_steps(
        self, sendbuf: Any, recvbuf: Any, op: ops.Op, inclusive: bool, tag: int
    ) -> Iterator[list[Op]]:
        """Stages of a prefix fold: take the prefix from rank - 1, pass it on with this
        rank's operand folded in to rank + 1."""
        size, rank = self._sizes()
        _, out, local = self._operands(sendbuf, recvbuf)
        passed_on = local
        if rank > 0:
            before = np.empty_like(out)
            got = self._c_irecv(_raw(before), rank - 1, tag)
            yield [got]
            collectives.whole([(rank - 1, got)], out.nbytes, "rank")
            passed_on = np.empty_like(out)
            op.combine_to(passed_on, before, local)
            out[...] = passed_on if inclusive else before
        elif inclusive:
            out[...] = local
        if rank + 1 < size:
            yield [self._c_isend(_raw(passed_on), rank + 1, tag)]

    # ------------------------------------------------------------------ reduce-scatter
    @collectives.started(collectives._a_reduce_scatter_block, None, collectives._e_fold)
    def Ireduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: ops.Op = ops.SUM) -> Request:
        """Start a Reduce_scatter_block; return the Request.

        Block r (recvbuf's count elements; with IN_PLACE, 1/size of recvbuf) of the fold of every
        rank's sendbuf ends in rank r's recvbuf.
        """
        size, _ = self._sizes()

        def counts() -> tuple[buffers.Spec, list[int]]:
            rspec = buffers.parse(recvbuf, writable=True)
            count = rspec.count // size if sendbuf is IN_PLACE else rspec.count
            return rspec, [count] * size

        def steps(tag: int) -> Iterator[list[Op]]:
            yield from self._scatter_fold(sendbuf, *counts(), op, tag)

        return self._nonblocking(steps, lambda: self._p_scatter_fold(sendbuf, *counts(), op))

    @collectives.started(collectives._a_reduce_scatter)
    def Ireduce_scatter(
        self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None, op: ops.Op = ops.SUM
    ) -> Request:
        """Start a Reduce_scatter; return the Request.

        `recvcounts[r]` elements for rank r; without recvcounts, each rank's recvbuf count
        (exchanged first; not with IN_PLACE). ValueError for counts that do not fit the buffers.
        """
        size, _ = self._sizes()
        given = reduce_scatter_counts(recvcounts, size, sendbuf)

        def steps(tag: int) -> Iterator[list[Op]]:
            rspec = buffers.parse(recvbuf, writable=True)
            if given is None:
                every = yield from self._exchange_count(rspec.count, tag)
            else:
                every = given
            yield from self._scatter_fold(sendbuf, rspec, every, op, tag)

        def plan() -> tuple[str, tuple[Any, ...]] | None:
            if given is None:  # the counts are exchanged first, by messages
                return None
            return self._p_scatter_fold(sendbuf, buffers.parse(recvbuf, writable=True), given, op)

        return self._nonblocking(steps, plan)

    def _exchange_count(self, count: int, tag: int) -> Generator[list[Op], None, list[int]]:
        """A stage giving every rank's `count` (each sends its own to all the others)."""
        size, rank = self._sizes()
        mine = _raw(np.array([count], dtype="<i8"))
        theirs = {r: np.zeros(1, dtype="<i8") for r in range(size) if r != rank}
        recvs = [self._c_irecv(_raw(theirs[r]), r, tag) for r in theirs]
        yield recvs + [self._c_isend(mine, r, tag) for r in theirs]
        return [count if r == rank else int(theirs[r][0]) for r in range(size)]

    def _fold_operands(
        self, sendbuf: Any, rspec: buffers.Spec, counts: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(this rank's operand, recvbuf as an array) of a nonblocking reduce-scatter whose
        counts are known, checked before any data moves: ValueError when the operand has
        fewer than sum(counts) elements, MPI.Exception(ERR_TRUNCATE) when recvbuf holds
        fewer than this rank's count."""
        datatype = rspec.datatype
        out = _array(rspec.view, datatype)
        # with IN_PLACE the result overwrites the operand: a copy of it is folded
        full = out.copy() if sendbuf is IN_PLACE else _array(buffers.parse(sendbuf).view, datatype)
        if len(full) < sum(counts):
            raise ValueError(
                f"Reduce_scatter: {len(full)} elements to send, {sum(counts)} expected"
            )
        if len(out) < counts[self._rank]:
            raise exceptions.Exception(
                exceptions.ERR_TRUNCATE,
                f"Reduce_scatter: {counts[self._rank]} elements into a {len(out)}-element buffer",
            )
        return full, out

    def _p_scatter_fold(
        self, sendbuf: Any, rspec: buffers.Spec, counts: list[int], op: ops.Op
    ) -> tuple[str, tuple[Any, ...]] | None:
        """The collective area's plan of a nonblocking reduce-scatter (see collectives.Plan):
        its arguments checked as `_scatter_fold` does, then None (messages) for an op the
        area cannot fold or blocks over one segment of a slab, decided alike on every
        member (op, datatype and counts are the same there)."""
        full, out = self._fold_operands(sendbuf, rspec, counts)
        ufunc = area.ufunc_of(op, full)
        if ufunc is None or not self._fits(max(counts) * full.itemsize, split=True):
            return None
        return "reduce_scatter", (full[: sum(counts)], out[: counts[self._rank]], counts, ufunc)

    def _scatter_fold(
        self, sendbuf: Any, rspec: buffers.Spec, counts: list[int], op: ops.Op, tag: int
    ) -> Iterator[list[Op]]:
        """Stages of a reduce-scatter once the counts are known (arguments checked before
        any data moves): every rank sends block r of its operand to rank r and folds the
        blocks it gets, in rank order."""
        size, rank = self._sizes()
        datatype = rspec.datatype
        full, out = self._fold_operands(sendbuf, rspec, counts)
        starts = np.cumsum([0, *counts])
        blocks = [full[starts[r] : starts[r + 1]] for r in range(size)]
        operands = {r: np.empty_like(blocks[rank]) for r in range(size) if r != rank}
        recvs = [self._c_irecv(_raw(operands[r]), r, tag) for r in operands]
        yield recvs + [self._c_isend(_raw(blocks[r]), r, tag) for r in operands]
        collectives.whole(zip(operands, recvs, strict=True), blocks[rank].nbytes, "rank")
        operands[rank] = blocks[rank]
        result = operands[size - 1].copy()
        for r in reversed(range(size - 1)):
            op.reduce_into(result, operands[r], datatype)
        out[: counts[rank]] = result

    # ------------------------------------------------------------------ alltoallw
    @collective
    def Alltoallw(self, sendbuf: Any, recvbuf: Any) -> None:
        """Exchange with a count, a byte displacement and a datatype per rank.

        The specs are [buf, (counts, displs), datatypes] (or [buf, counts, displs, datatypes]);
        sendbuf IN_PLACE: the data to send is recvbuf's.
        """
        self._run(self._alltoallw(sendbuf, recvbuf, T_ALLTOALL))

    def Ialltoallw(self, sendbuf: Any, recvbuf: Any) -> Request:
        """Nonblocking Alltoallw."""
        return self._nonblocking(functools.partial(self._alltoallw, sendbuf, recvbuf))

    def _alltoallw(self, sendbuf: Any, recvbuf: Any, tag: int) -> Iterator[list[Op]]:
        size, rank = self._sizes()
        into = buffers.parse_w(recvbuf, size, writable=True)
        if sendbuf is IN_PLACE:
            out = [memoryview(bytes(part)) for part in into]
        else:
            out = buffers.parse_w(sendbuf, size)
        if len(out[rank]) > len(into[rank]):
            raise exceptions.Exception(
                exceptions.ERR_TRUNCATE,
                f"Alltoallw: {len(out[rank])} bytes into a {len(into[rank])}-byte part",
            )
        into[rank][: len(out[rank])] = out[rank]
        recvs = [self._c_irecv(into[r], r, tag) for r in range(size) if r != rank]
        yield recvs + [self._c_isend(out[r], r, tag) for r in range(size) if r != rank]

    # ------------------------------------------------------------------ constructors
    def Split_type(self, split_type: int, key: int = 0, info: Any = None) -> Any:
        """Split by `split_type`: COMM_TYPE_SHARED groups the ranks that share a region (one
        host: they reach each other through shared memory), ordered by (key, rank);
        UNDEFINED gives COMM_NULL. Collective. MPI.Exception(ERR_ARG) for another type."""
        engine = self._check()
        if split_type == constants.UNDEFINED:
            return self.Split(constants.UNDEFINED, key)
        if split_type != constants.COMM_TYPE_SHARED:
            raise exceptions.Exception(exceptions.ERR_ARG, f"split type {split_type}")
        local = [w for w in self._group if engine.routes[w].local]
        return self.Split(min(local), key)

    def Idup(self, info: Any = None) -> tuple[Any, Request]:
        """(duplicate, request): a nonblocking Dup. The duplicate is a null handle until
        the request completes (by progress, as any nonblocking collective: members start it
        in the same order as their other nonblocking collectives here), then a communicator
        with the same group and a new context; `info`'s hints are kept on it. The members
        agree on the context in rounds: each sends the contexts it uses, all take the
        highest pair free in the union and reserve it where it is still free (another
        communicator may have been made meanwhile), and a second exchange confirms it was
        reserved on every
        member (else the reservation is released and a new round starts), and a last
        exchange fences the new context (see _agree_context). The mpi4py mirrors
        (hybrid jobs) are duplicated by mpi4py's own Idup, started at the call."""
        from guest_lib.mpi import native
        from guest_lib.mpi.comm import Intracomm

        engine = self._check()
        new = Intracomm()
        mirrors: list[tuple[Any, Any]] = []
        if self._has_mpi:  # started here, in the members' call order (MPI's rule on mirrors)
            mirrors = [self._mirror.Idup(), self._mirror_coll.Idup()]

        def steps(tag: int) -> Iterator[list[Op]]:
            ctx = yield from self._agree_context(tag)
            if mirrors:
                yield [native.track(engine, native.MpiOp(request)) for _, request in mirrors]
            args = (mirrors[0][0], mirrors[1][0]) if mirrors else ()
            Intracomm.__init__(new, engine, list(self._group), ctx, *args)
            if info is not None:
                new.Set_info(info)
            handler = getattr(self, "_errhandler", None)
            if handler is not None:  # a new communicator inherits it (MPI)
                errhandler.set_errhandler(new, handler)

        return new, self._nonblocking(steps)

    Idup_with_info = Idup

    def _agree_context(
        self, tag: int, exchange: Exchanger | None = None
    ) -> Generator[list[Op], None, int]:
        """Stages agreeing on a context pair free on every member (see Idup); its value.
        `exchange(data, tag)`: the stages sending `data` to every other member and giving
        what they sent (default `_exchange_bytes`; ulfm's Shrink passes its own, which
        leaves failed members out)."""
        engine = self._check()
        if exchange is None:
            exchange = self._exchange_bytes
        while True:
            with engine.lock:  # an offer (see matching.CLOCK_SHIFT)
                used = sum(1 << ctx for ctx in engine.used_ctx) | engine.ctx_clock << CLOCK_SHIFT
            parts = yield from exchange(used.to_bytes(OFFER_BYTES, "little"), tag)
            for part in parts:
                if len(part) != OFFER_BYTES:
                    raise exceptions.Exception(exceptions.ERR_INTERN, "Idup: bad context map")
                used = merge_offers(used, int.from_bytes(part, "little"))
            # the highest free pair: blocking agreements (Comm._alloc_ctx) take the lowest,
            # so one running here meanwhile, from a map taken before this reservation, does
            # not take this one unless no other pair is left
            ctx = (constants.MAX_CONTEXT - 1) // 2 * 2
            while ctx >= 4 and used >> ctx & 3:
                ctx -= 2
            if ctx < 4:
                raise exceptions.Exception(exceptions.ERR_INTERN, "out of communicator contexts")
            pair = (ctx, ctx + 1)
            with engine.lock:
                free_here = not engine.used_ctx.intersection(pair)
                if free_here:
                    engine.used_ctx.update(pair)  # reserved: no other agreement takes it
            flags = yield from exchange(b"\x01" if free_here else b"\x00", tag)
            if free_here and all(flag == b"\x01" for flag in flags):
                # Messages on the freed context that had it came before these parts: they
                # were dropped. A last exchange, sent once the context is taken again here,
                # keeps every member from sending on it before all of them have taken it.
                engine.reuse_context(pair, used)
                yield from exchange(b"", tag)
                return ctx
            if free_here:
                with engine.lock:
                    engine.used_ctx.difference_update(pair)

    def _exchange_bytes(self, data: bytes, tag: int) -> Generator[list[Op], None, list[bytes]]:
        """A stage sending `data` to every other member: what each of them sent (rank
        order, this rank left out)."""
        size, rank = self._sizes()
        recvs = [self._c_irecv(None, r, tag) for r in range(size) if r != rank]
        view = memoryview(data)
        yield recvs + [self._c_isend(view, r, tag) for r in range(size) if r != rank]
        return [bytes(op.obj) for op in recvs]
