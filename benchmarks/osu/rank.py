"""The rank program of the suite, written once against an `MPI` module object.

    ivshmem-run -n N -m benchmarks.osu.rank ours JOBS_FILE HANG_S
    mpiexec -n N python -m benchmarks.osu.rank mpi JOBS_FILE HANG_S

"ours" imports `from guest_lib.mpi import MPI`, "mpi" `from mpi4py import MPI`; everything
else is the same code. JOBS_FILE holds a JSON list of jobs {"test", "form", "steps": [[size,
skip, iters], ...]}; each step runs the OSU loop of its test (see `benchmarks.osu.spec`) and
checks the data it moved: a wrong result raises CheckError, which ends the program as a failure.

Rank 0 reports on stdout, one line each, prefixed "OSU ": {"ev": "start", job, size} before a
step, {"ev": "row", job, size, m: metrics, wall: the step's seconds} after it, {"ev": "done",
job} after a job, and {"ev": "info", ...} at the end. A rank whose step raises prints {"ev":
"fail", job, size, rank, error} and exits 3 at once (the launcher then stops the others).
A watchdog (faulthandler) dumps every thread's stack to stderr and exits 1 when one step takes
longer than HANG_S, so a hang becomes a reported failure with its traceback.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._plan import pin, tcp_connections
from benchmarks.osu.forms import Buf, CheckError, expect, expect_bytes, pattern
from benchmarks.osu.spec import ACK_BYTES, BY_NAME, WINDOW, Test

PREFIX = "OSU "
BARRIER_DELAY_S = 0.01  # the barrier check: rank r enters r * this late in the first call


def emit(event: dict[str, Any]) -> None:
    """Print one report line."""
    print(PREFIX + json.dumps(event), flush=True)


class Ctx:
    """The MPI module and the world communicator the tests run on."""

    def __init__(self, mpi: Any) -> None:
        self.MPI = mpi
        self.comm = mpi.COMM_WORLD
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.wtime: Callable[[], float] = mpi.Wtime


@dataclasses.dataclass
class Case:
    """One collective at one size: `run` makes one call (a Request when `nonblocking`), `check`
    verifies what the last call produced (given its return value), `prepare` restores inputs
    before every call (IN_PLACE), `reset` clears outputs after the first, checked call so the
    final check sees the data of a later one. `barrier` asks for the barrier check (ranks
    enter the first call at staggered times; none may leave before the last one entered)."""

    run: Callable[[], Any]
    check: Callable[[Any], None]
    prepare: Callable[[], None] | None = None
    reset: Callable[[], None] | None = None
    nonblocking: bool = False
    barrier: bool = False


# ------------------------------------------------------------------------ point to point
def pingpong(
    ctx: Ctx, form: str, size: int, skip: int, iters: int, peer: int, sender: bool
) -> float:
    """osu_latency between this rank and `peer`: the sender's one-way latency in us, else 0."""
    comm, floats = ctx.comm, form == "double"
    want = pattern(size // (8 if floats else 1), floats, 5)
    if form == "pickle":
        obj = want.tobytes()

        def send() -> None:
            comm.send(obj, peer, 1)

        def recv() -> Any:
            return comm.recv(source=peer, tag=1)
    else:
        sbuf, rbuf = Buf(form, want.size, floats), Buf(form, want.size, floats)
        sbuf.view[:] = want
        sspec, rspec = sbuf.spec(ctx.MPI), rbuf.spec(ctx.MPI)

        def send() -> None:
            comm.Send(sspec, peer, 1)

        def recv() -> Any:
            comm.Recv(rspec, peer, 1)
            return rbuf.view

    def check(got: Any, what: str) -> None:
        (expect_bytes if form == "pickle" else expect)(got, want, what)

    if sender:  # one checked exchange, outside the timing
        send()
        check(recv(), "echo")
    else:
        check(recv(), "first message")
        send()
    if form != "pickle":
        rbuf.view.fill(0)
    comm.Barrier()
    start, got = 0.0, None
    for i in range(skip + iters):
        if i == skip:
            start = ctx.wtime()
        if sender:
            send()
            got = recv()
        else:
            got = recv()
            send()
    elapsed = ctx.wtime() - start
    check(got, "last message")
    return elapsed / iters / 2 * 1e6 if sender else 0.0


def bandwidth(ctx: Ctx, form: str, size: int, skip: int, iters: int, bidir: bool) -> float:
    """osu_bw (or osu_bibw): rank 0's MB/s (10**6 bytes per second) with rank 1."""
    comm, mpi, rank, floats = ctx.comm, ctx.MPI, ctx.rank, form == "double"
    peer = 1 - rank
    want = pattern(size // (8 if floats else 1), floats, 9)
    if form == "pickle":
        obj = want.tobytes()
        got: list[Any] = []

        def one() -> None:
            if rank == 0 or bidir:
                reqs = [comm.isend(obj, peer, 2) for _ in range(WINDOW)]
            if rank == 1 or bidir:
                got[:] = [comm.recv(source=peer, tag=2) for _ in range(WINDOW)]
            if rank == 0 or bidir:
                mpi.Request.waitall(reqs)
            if not bidir:
                if rank == 0:
                    comm.recv(source=peer, tag=3)
                else:
                    comm.send(b"ack", peer, 3)

        def check() -> None:
            for item in got:
                expect_bytes(item, want, "received message")
    else:
        sbuf, rbuf = Buf(form, want.size, floats), Buf(form, want.size, floats)
        sbuf.view[:] = want
        sspec, rspec = sbuf.spec(mpi), rbuf.spec(mpi)
        ack = np.zeros(ACK_BYTES, np.uint8)
        isend, irecv, waitall = comm.Isend, comm.Irecv, mpi.Request.Waitall

        def one() -> None:
            reqs = []
            if rank == 1 or bidir:
                reqs += [irecv(rspec, peer, 2) for _ in range(WINDOW)]
            if rank == 0 or bidir:
                reqs += [isend(sspec, peer, 2) for _ in range(WINDOW)]
            waitall(reqs)
            if not bidir:
                if rank == 0:
                    comm.Recv(ack, peer, 3)
                else:
                    comm.Send(ack, peer, 3)

        def check() -> None:
            if rank == 1 or bidir:
                expect(rbuf.view, want, "received message")

    comm.Barrier()
    start = 0.0
    for i in range(skip + iters):
        if i == skip:
            start = ctx.wtime()
        one()
    elapsed = ctx.wtime() - start
    check()
    return size * WINDOW * iters * (2 if bidir else 1) / elapsed / 1e6


# ------------------------------------------------------------------------ collectives
def _blocks(count: int, floats: bool, seeds: list[int]) -> np.ndarray:
    return np.concatenate([pattern(count, floats, s) for s in seeds])


def _bytes_list(count: int, seeds: list[int]) -> list[bytes]:
    return [pattern(count, False, s).tobytes() for s in seeds]


def _expect_list(got: Any, want: list[bytes], what: str) -> None:
    if not isinstance(got, list) or len(got) != len(want):
        raise CheckError(f"{what}: got {type(got).__name__} of {len(got) if got else 0}")
    for index, (item, ref) in enumerate(zip(got, want, strict=True)):
        expect_bytes(item, np.frombuffer(ref, np.uint8), f"{what}, block {index}")


def case_barrier(ctx: Ctx, form: str, nonblocking: bool) -> Case:
    """Barrier / barrier / Ibarrier (checked: it may not return before the last rank came)."""
    comm = ctx.comm
    run = comm.Ibarrier if nonblocking else comm.barrier if form == "pickle" else comm.Barrier
    return Case(run, lambda _: None, nonblocking=nonblocking, barrier=True)


def case_bcast(ctx: Ctx, form: str, count: int, floats: bool, nonblocking: bool) -> Case:
    """Bcast / bcast / Ibcast from root 0."""
    comm, rank = ctx.comm, ctx.rank
    want = pattern(count, floats, 1)
    if form == "pickle":
        obj = want.tobytes()
        return Case(
            lambda: comm.bcast(obj if rank == 0 else None, 0),
            lambda out: expect_bytes(out, want, "bcast"),
        )
    buf = Buf(form, count, floats)
    if rank == 0:
        buf.view[:] = want
    spec, call = buf.spec(ctx.MPI), comm.Ibcast if nonblocking else comm.Bcast
    return Case(
        lambda: call(spec, 0),
        lambda _: expect(buf.view, want, "Bcast"),
        reset=None if rank == 0 else lambda: buf.view.fill(0),
        nonblocking=nonblocking,
    )


def case_reduction(ctx: Ctx, name: str, form: str, count: int, nonblocking: bool) -> Case:
    """Reduce (root 0) / Allreduce / Iallreduce / Scan of float64 with SUM."""
    comm, mpi, rank, n = ctx.comm, ctx.MPI, ctx.rank, ctx.size
    mine = pattern(count, True, rank)
    upto = rank + 1 if name == "scan" else n
    want = np.sum([pattern(count, True, r) for r in range(upto)], axis=0)
    checks = name != "reduce" or rank == 0
    if form == "pickle":
        call = {
            "reduce": lambda o: comm.reduce(o, mpi.SUM, 0),
            "allreduce": comm.allreduce,
            "scan": comm.scan,
        }[name]
        return Case(lambda: call(mine), lambda out: expect(out, want, name) if checks else None)
    sbuf = Buf("numpy" if form == "in_place" else form, count, True)
    rbuf = Buf("numpy" if form == "in_place" else form, count, True)
    sbuf.view[:] = mine
    sspec, rspec = sbuf.spec(mpi), rbuf.spec(mpi)
    blocking = {
        "reduce": lambda s, r: comm.Reduce(s, r, mpi.SUM, 0),
        "allreduce": lambda s, r: comm.Allreduce(s, r, mpi.SUM),
        "iallreduce": lambda s, r: comm.Iallreduce(s, r, mpi.SUM),
        "scan": lambda s, r: comm.Scan(s, r, mpi.SUM),
    }[name]
    prepare = None
    if form == "in_place" and checks:  # the root's (or every rank's) input lives in rbuf
        sspec = mpi.IN_PLACE

        def prepare() -> None:
            rbuf.view[:] = mine

    return Case(
        lambda: blocking(sspec, rspec),
        lambda _: expect(rbuf.view, want, name) if checks else None,
        prepare=prepare,
        reset=lambda: rbuf.view.fill(0),
        nonblocking=nonblocking,
    )


def case_reduce_scatter(ctx: Ctx, form: str, count: int) -> Case:
    """Reduce_scatter with OSU's recvcounts (count // n each, the remainder to the first)."""
    comm, mpi, rank, n = ctx.comm, ctx.MPI, ctx.rank, ctx.size
    portion, rest = divmod(count, n)
    recvcounts = [portion + (1 if r < rest else 0) for r in range(n)]
    displ = sum(recvcounts[:rank])
    mine = pattern(count, True, rank)
    total = np.sum([pattern(count, True, r) for r in range(n)], axis=0)
    want = total[displ : displ + recvcounts[rank]]
    if form == "in_place":
        full = np.zeros(count)

        def prepare() -> None:
            full[:] = mine

        return Case(
            lambda: comm.Reduce_scatter(mpi.IN_PLACE, full, recvcounts, mpi.SUM),
            lambda _: expect(full[: recvcounts[rank]], want, "Reduce_scatter"),
            prepare=prepare,
        )
    sbuf, rbuf = Buf(form, count, True), Buf(form, recvcounts[rank], True)
    sbuf.view[:] = mine
    sspec, rspec = sbuf.spec(mpi), rbuf.spec(mpi)
    return Case(
        lambda: comm.Reduce_scatter(sspec, rspec, recvcounts, mpi.SUM),
        lambda _: expect(rbuf.view, want, "Reduce_scatter"),
        reset=lambda: rbuf.view.fill(0),
    )


def case_gather(ctx: Ctx, name: str, form: str, count: int, floats: bool) -> Case:
    """Gather(v) to root 0 and Allgather(v): block r of the result comes from rank r."""
    comm, mpi, rank, n = ctx.comm, ctx.MPI, ctx.rank, ctx.size
    everyone = name.startswith("allgather")
    checks = everyone or rank == 0
    if form == "pickle":
        want_list = _bytes_list(count, list(range(n)))
        obj = want_list[rank]
        call = comm.allgather if everyone else lambda o: comm.gather(o, 0)
        return Case(
            lambda: call(obj), lambda out: _expect_list(out, want_list, name) if checks else None
        )
    bform = "numpy" if form == "in_place" else form
    sbuf, rbuf = Buf(bform, count, floats), Buf(bform, count, floats, n)
    sbuf.view[:] = pattern(count, floats, rank)
    want = _blocks(count, floats, list(range(n)))
    sspec = sbuf.spec(mpi)
    if name.endswith("v"):
        rspec = rbuf.vspec(mpi, [count] * n, [r * count for r in range(n)])
    else:
        rspec = rbuf.spec(mpi)
    call = {
        "gather": lambda s, r: comm.Gather(s, r, 0),
        "gatherv": lambda s, r: comm.Gatherv(s, r, 0),
        "allgather": comm.Allgather,
        "allgatherv": comm.Allgatherv,
    }[name]
    prepare = None
    if form == "in_place" and checks:
        sspec = mpi.IN_PLACE
        own = slice(rank * count, (rank + 1) * count)

        def prepare() -> None:
            rbuf.view[own] = want[own]

    return Case(
        lambda: call(sspec, rspec),
        lambda _: expect(rbuf.view, want, name) if checks else None,
        prepare=prepare,
        reset=lambda: rbuf.view.fill(0),
    )


def case_scatter(ctx: Ctx, name: str, form: str, count: int, floats: bool) -> Case:
    """Scatter(v) from root 0: rank r receives block r."""
    comm, mpi, rank, n = ctx.comm, ctx.MPI, ctx.rank, ctx.size
    if form == "pickle":
        blocks = _bytes_list(count, list(range(n)))
        mine = np.frombuffer(blocks[rank], np.uint8)
        return Case(
            lambda: comm.scatter(blocks if rank == 0 else None, 0),
            lambda out: expect_bytes(out, mine, name),
        )
    bform = "numpy" if form == "in_place" else form
    sbuf, rbuf = Buf(bform, count, floats, n), Buf(bform, count, floats)
    everything = _blocks(count, floats, list(range(n)))
    if rank == 0:
        sbuf.view[:] = everything
    want = pattern(count, floats, rank)
    if name.endswith("v"):
        sspec = sbuf.vspec(mpi, [count] * n, [r * count for r in range(n)])
    else:
        sspec = sbuf.spec(mpi)
    rspec = rbuf.spec(mpi)
    call = comm.Scatterv if name.endswith("v") else comm.Scatter
    if form == "in_place" and rank == 0:  # the root's block stays where it is in sbuf
        return Case(
            lambda: call(sspec, mpi.IN_PLACE, 0),
            lambda _: expect(sbuf.view, everything, f"{name} root's send buffer"),
        )
    return Case(
        lambda: call(sspec, rspec, 0),
        lambda _: expect(rbuf.view, want, name),
        reset=lambda: rbuf.view.fill(0),
    )


def case_alltoall(
    ctx: Ctx, name: str, form: str, count: int, floats: bool, nonblocking: bool
) -> Case:
    """Alltoall(v) / Ialltoall: block j of rank i's send buffer lands in block i of rank j."""
    comm, mpi, rank, n = ctx.comm, ctx.MPI, ctx.rank, ctx.size
    send_seeds = [rank * 64 + j for j in range(n)]
    recv_seeds = [i * 64 + rank for i in range(n)]
    if form == "pickle":
        objs, want_list = _bytes_list(count, send_seeds), _bytes_list(count, recv_seeds)
        return Case(lambda: comm.alltoall(objs), lambda out: _expect_list(out, want_list, name))
    bform = "numpy" if form == "in_place" else form
    sbuf, rbuf = Buf(bform, count, floats, n), Buf(bform, count, floats, n)
    outgoing = _blocks(count, floats, send_seeds)
    sbuf.view[:] = outgoing
    want = _blocks(count, floats, recv_seeds)
    if name.endswith("v"):
        counts, displs = [count] * n, [r * count for r in range(n)]
        sspec, rspec = sbuf.vspec(mpi, counts, displs), rbuf.vspec(mpi, counts, displs)
    else:
        sspec, rspec = sbuf.spec(mpi), rbuf.spec(mpi)
    call = {"alltoall": comm.Alltoall, "alltoallv": comm.Alltoallv, "ialltoall": comm.Ialltoall}[
        name
    ]
    prepare = None
    if form == "in_place":
        sspec = mpi.IN_PLACE

        def prepare() -> None:
            rbuf.view[:] = outgoing

    return Case(
        lambda: call(sspec, rspec),
        lambda _: expect(rbuf.view, want, name),
        prepare=prepare,
        reset=lambda: rbuf.view.fill(0),
        nonblocking=nonblocking,
    )


def make_case(ctx: Ctx, test: Test, form: str, size: int) -> Case:
    """The Case of a collective test at `size` bytes (the block size for the (all)gather,
    scatter and alltoall families, the whole vector for reductions, as OSU counts)."""
    floats = test.reduction or form == "double"
    count = size // (8 if floats else 1)
    name, nb = test.name, test.kind == "nbc"
    if name in ("barrier", "ibarrier"):
        return case_barrier(ctx, form, nb)
    if name in ("bcast", "ibcast"):
        return case_bcast(ctx, form, count, floats, nb)
    if name in ("reduce", "allreduce", "iallreduce", "scan"):
        return case_reduction(ctx, name, form, count, nb)
    if name == "reduce_scatter":
        return case_reduce_scatter(ctx, form, count)
    if name in ("gather", "gatherv", "allgather", "allgatherv"):
        return case_gather(ctx, name, form, count, floats)
    if name in ("scatter", "scatterv"):
        return case_scatter(ctx, name, form, count, floats)
    if name in ("alltoall", "alltoallv", "ialltoall"):
        return case_alltoall(ctx, name, form, count, floats, nb)
    raise ValueError(f"no collective test {name!r}")


def _call(case: Case) -> Any:
    out = case.run()
    if case.nonblocking:
        out.Wait()
        return None
    return out


def time_collective(
    ctx: Ctx, case: Case, skip: int, iters: int, compute_s: float | None = None
) -> tuple[float, float]:
    """OSU's collective loop; returns this rank's (average call time, average compute time)
    in seconds. With `compute_s` (nonblocking tests) every call is started, `compute_s` of
    computation runs, and then it is waited for (OSU's overlap phase)."""
    comm, wtime = ctx.comm, ctx.wtime
    total = computed = 0.0
    out = None
    for i in range(skip + iters):
        if case.prepare is not None:
            case.prepare()
        if case.barrier and i == 0:
            time.sleep(BARRIER_DELAY_S * ctx.rank)
            entered = time.monotonic()
        start = wtime()
        if compute_s is None:
            out = _call(case)
        else:
            request = case.run()
            begin = wtime()
            _compute(compute_s)
            computed += wtime() - begin if i >= skip else 0.0
            request.Wait()
        stop = wtime()
        if i >= skip:
            total += stop - start
        if i == 0:
            if case.barrier:
                _check_barrier(ctx, entered, time.monotonic())
            case.check(out)
            if case.reset is not None:
                case.reset()
        comm.Barrier()
    case.check(out)
    return total / iters, computed / iters


def _check_barrier(ctx: Ctx, entered: float, left: float) -> None:
    """CheckError unless no rank left the barrier before the last one entered it (the ranks
    share one host, so CLOCK_MONOTONIC readings compare across them)."""
    times = ctx.comm.allgather((entered, left))
    last_in = max(t[0] for t in times)
    first_out = min(t[1] for t in times)
    if first_out < last_in:
        raise CheckError(
            f"a rank left the barrier {(last_in - first_out) * 1e3:.2f} ms before the last "
            "one entered it"
        )


def _compute(seconds: float) -> None:
    """OSU's dummy compute: keep this CPU busy for `seconds` (no MPI calls)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _stats(ctx: Ctx, value: float) -> list[float] | None:
    """Every rank's `value` on rank 0 (None elsewhere), gathered with the pickle gather."""
    values: list[float] | None = ctx.comm.gather(value, root=0)
    return values


def run_step(
    ctx: Ctx, test: Test, form: str, size: int, skip: int, iters: int
) -> dict[str, float] | None:
    """One size of one test; rank 0 gets the metrics (OSU's columns), the others None."""
    rank, n = ctx.rank, ctx.size
    if test.kind == "lat":
        half = n // 2
        peer = rank + half if rank < half else rank - half
        lat = pingpong(ctx, form, size, skip, iters, peer, rank < half)
        lats = _stats(ctx, lat)
        return None if lats is None else {"lat": sum(lats[:half]) / half}
    if test.kind == "bw":
        bw = bandwidth(ctx, form, size, skip, iters, test.name == "bibw")
        return {"bw": bw} if rank == 0 else None
    case = make_case(ctx, test, form, size)
    comm_s, _ = time_collective(ctx, case, skip, iters)
    if test.kind == "coll":
        lats = _stats(ctx, comm_s * 1e6)
        if lats is None:
            return None
        return {"avg": sum(lats) / n, "min": min(lats), "max": max(lats), "iters": iters}
    overall_s, compute_s = time_collective(ctx, case, skip, iters, compute_s=comm_s)
    rows = ctx.comm.gather((overall_s * 1e6, compute_s * 1e6, comm_s * 1e6), root=0)
    if rows is None:
        return None
    overall, compute, pure = (sum(col) / n for col in zip(*rows, strict=True))
    overlap = max(0.0, 100.0 - (overall - compute) / pure * 100.0) if pure > 0 else 0.0
    return {
        "overall": overall,
        "compute": compute,
        "comm": pure,
        "overlap": overlap,
        "iters": iters,
    }


def main(argv: list[str]) -> None:
    """Run the jobs in argv[1] with the MPI of argv[0] ("ours" or "mpi")."""
    impl, jobs_file, hang_s = argv[0], argv[1], float(argv[2])
    if impl == "ours":
        from guest_lib.mpi import MPI
    else:
        from mpi4py import MPI  # type: ignore[no-redef]
    with open(jobs_file) as f:
        jobs = json.load(f)
    ctx = Ctx(MPI)
    cpu = pin(ctx.rank)
    if ctx.rank == 0:
        emit({"ev": "begin", "library": MPI.Get_library_version().splitlines()[0].strip()})
    for index, job in enumerate(jobs):
        test = BY_NAME[job["test"]]
        for size, skip, iters in job["steps"]:
            faulthandler.dump_traceback_later(hang_s, exit=True)
            if ctx.rank == 0:
                emit({"ev": "start", "job": index, "size": size})
            try:
                began = time.perf_counter()
                ctx.comm.Barrier()
                metrics = run_step(ctx, test, job["form"], size, skip, iters)
            except BaseException as exc:  # any failure ends the job, reported by this rank
                emit(
                    {
                        "ev": "fail",
                        "job": index,
                        "size": size,
                        "rank": ctx.rank,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                    }
                )
                os._exit(3)
            if metrics is not None:
                wall = time.perf_counter() - began
                emit({"ev": "row", "job": index, "size": size, "m": metrics, "wall": wall})
        if ctx.rank == 0:
            emit({"ev": "done", "job": index})
    faulthandler.dump_traceback_later(hang_s, exit=True)
    cpus = ctx.comm.gather(cpu, root=0)
    tcp = ctx.comm.gather(tcp_connections(), root=0)
    faulthandler.cancel_dump_traceback_later()
    if ctx.rank == 0:
        emit({"ev": "info", "cpus": cpus, "tcp_connections": tcp})


if __name__ == "__main__":
    main(sys.argv[1:])
