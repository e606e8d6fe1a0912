"""An unmodified mpi4py.futures program: `python -m mpi4py.futures futures_prog.py OUT`.

Rank 0 runs it; the other ranks are the pool's workers. It maps a function over a range,
submits single calls, and checks that an exception raised in a worker comes back through
the future. Writes a JSON summary to OUT. Run without `-m mpi4py.futures`, the executor
cannot start (it would need Spawn): the summary then holds the error it failed with.
"""

from __future__ import annotations

import json
import os
import sys
import time

from mpi4py import MPI
from mpi4py.futures import MPIPoolExecutor


def square(x: int) -> tuple[int, int, int]:
    """(x * x, the worker's world rank, its process id)."""
    return x * x, MPI.COMM_WORLD.Get_rank(), os.getpid()


def boom(x: int) -> None:
    raise ValueError(f"bad {x}")


def main() -> None:
    out = sys.argv[1]
    summary: dict = {"module": MPI.__name__, "size": MPI.COMM_WORLD.Get_size()}
    start = time.monotonic()
    with MPIPoolExecutor() as executor:
        try:
            summary["workers"] = executor.num_workers
            results = list(executor.map(square, range(40), chunksize=3))
            summary["map"] = [r[0] for r in results]
            summary["worker_ranks"] = sorted({r[1] for r in results})
            summary["worker_pids"] = len({r[2] for r in results})
            summary["submit"] = executor.submit(square, 12).result()[0]
            try:
                executor.submit(boom, 3).result()
            except ValueError as exc:
                summary["raised"] = repr(exc)
        except Exception as exc:  # (without -m mpi4py.futures: the pool cannot start)
            summary["error"] = f"{type(exc).__name__}: {exc}"
    summary["seconds"] = time.monotonic() - start
    with open(out, "w") as sink:
        json.dump(summary, sink)


if __name__ == "__main__":
    main()
