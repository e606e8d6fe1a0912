"""mpi4py's own demo programs (its sdist's demo/, besides osu_*.py) under ivshmem-run (issue #12).

Issue #12's checks run other people's programs unchanged through ivshmem-run's zero-change
shim; mpi4py's demo directory is the first such set. Each program here runs as its demo
makefile runs it under mpiexec (same arguments and stdin), from a copy of its directory, at
2 ranks, and must exit 0 with no traceback and print what it prints under MPICH's mpiexec
(the checks made: its lines, or a line pattern where the output holds timings). The OSU
demos have their own test (test_osu_demos.py).

Left out, with the reason (each checked against MPICH's mpiexec, 2 and 4 ranks):
- Spawn users (compute-pi/cpi-dpm.py, nxtval/nxtval-dynproc.py, spawning/, mandelbrot's
  master and mpi4py.futures pools started by `python prog.py`): MPI_Comm_spawn is not
  offered; test_spawn_error_is_clear checks that the failure says so.
- nxtval-onesided.py and nxtval-scalable.py: one-sided targets with non-contiguous
  datatypes (INDEXED) are not supported (MPI.Exception(ERR_TYPE) says so).
- init-fini test_1/2/3/6 and test_0 errors=default/abort/fatal: mpi4py.rc.initialize=False
  and rc.errors are not honoured (MPI is initialised when the shim starts, every handler
  is ERRORS_RETURN).
- Programs that need a compiler toolchain or another library (cython, embedding,
  libmpi-cffi, wrap-*, cuda-aware-mpi), test-run (it tests mpiexec itself), and
  mandelbrot.py / futures run_julia/run_mandelbrot/run_primes (seconds of pure computing).
Whole jobs, about 40 s of CPU together: `full` (test-rest).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.mpi.conftest import PYTHON, job_env
from tests.mpi.test_mpi4py_suite import sdist_part

pytestmark = [pytest.mark.full, pytest.mark.timeout(400)]

JOB_S = 300
HELLO = r"Hello, World! I am process {r} of {n} on \S+\."

# name -> (demo subdirectory, program arguments, stdin, expected stdout lines as regular
# expressions, {r} standing for each rank in turn (one line per rank, any order), else once)
DEMOS: dict[str, tuple[str, list[str], str, list[str]]] = {
    "helloworld": (".", ["helloworld.py"], "", [HELLO]),
    "cpi-cco": ("compute-pi", ["cpi-cco.py"], "100\n",
                [r".*pi is approximately 3\.14160098692312\d*, error is 0\.00000833333333\d*",
                 r".*"]),
    "cpi-rma": ("compute-pi", ["cpi-rma.py"], "100\n",
                [r".*pi is approximately 3\.14160098692312\d*, error is 0\.00000833333333\d*",
                 r".*"]),
    "nxtval-threads": ("nxtval", ["nxtval-threads.py"], "", []),
    "nxtval-mpi3": ("nxtval", ["nxtval-mpi3.py"], "", []),
    "reductions": ("reductions", ["test_reductions.py", "-q"], "", []),
    "sequential": ("sequential", ["test_seq.py"], "", [HELLO]),
    "profiling-cpi": ("profiling", ["cpi.py"], "", []),
    "profiling-ring": ("profiling", ["ring.py"], "", []),
    "profiling-threads": ("profiling", ["threads.py"], "", []),
    "threads-sendrecv": ("threads", ["sendrecv.py"], "", []),
    "init-fini-threads": ("init-fini", ["test_0.py", "threads=false"], "", []),
    "init-fini-single": ("init-fini", ["test_0.py", "thread_level=single"], "", []),
    "init-fini-fast-reduce": ("init-fini", ["test_0.py", "fast_reduce=false"], "", []),
    "init-fini-mprobe": ("init-fini", ["test_0.py", "recv_mprobe=false"], "", []),
    "init-fini-exception": ("init-fini", ["test_0.py", "errors=exception"], "", []),
    "init-fini-4": ("init-fini", ["test_4.py"], "", []),
    "init-fini-5": ("init-fini", ["test_5.py"], "", []),
    "init-fini-mpi40": ("init-fini", ["test_mpi40.py"], "", []),
    "futures-hello": ("futures", ["-m", "mpi4py.futures", "run_hello.py"], "",
                      [r"Hello, World! I am worker 0 of 1 on \S+\.\x00*"]),
    "futures-cpi": ("futures", ["-m", "mpi4py.futures", "run_cpi.py"], "",
                    [r"pi: 3\.14159\d*, error: \S+ \(256 intervals, 1 workers\)"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    """The sdist's demo directory (cached with mpi4py's test suite)."""
    return sdist_part("demo", "helloworld.py")


def run_demo(
    source: Path, work: Path, args: list[str], stdin: str, ranks: int = 2
) -> subprocess.CompletedProcess:
    """Run `args` (a program of `source`, or -m module and one) under `ivshmem-run -n ranks`
    from a copy of `source` in `work`, as the demo makefile runs it; return the result."""
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("__pycache__"))
    command = ["-m", *args[1:]] if args[0] == "-m" else [PYTHON, *args]
    launcher = [PYTHON, "-m", "guest_lib.mpi.launcher", "-n", str(ranks), "--timeout", str(JOB_S)]
    return subprocess.run([*launcher, *command], cwd=work, env=job_env(), input=stdin,
                          capture_output=True, text=True, timeout=JOB_S + 60)  # fmt: skip


def expected_lines(patterns: list[str], ranks: int) -> list[str]:
    """The patterns with a {r} one per rank, the others once."""
    return [p.format(r=r, n=ranks) for p in patterns for r in (range(ranks) if "{r}" in p else [0])]


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_runs_as_under_mpiexec(demo_dir: Path, tmp_path: Path, name: str) -> None:
    """The demo exits 0, with no traceback, printing what it prints under mpiexec."""
    subdir, args, stdin, patterns = DEMOS[name]
    done = run_demo(demo_dir / subdir, tmp_path / "demo", args, stdin)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    wanted = expected_lines(patterns, 2)
    assert len(lines) == len(wanted), done.stdout
    for pattern in wanted:
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, done.stdout)


def test_spawn_error_is_clear(demo_dir: Path, tmp_path: Path) -> None:
    """compute-pi/cpi-dpm.py (MPI_Comm_spawn; one rank, as its makefile runs it) fails saying
    that Spawn is not supported."""
    done = run_demo(demo_dir / "compute-pi", tmp_path / "demo", ["cpi-dpm.py", "2"], "100\n", 1)
    assert done.returncode != 0
    assert "MPI_ERR_SPAWN: Spawn is not supported by guest_lib.mpi" in done.stderr, done.stderr
