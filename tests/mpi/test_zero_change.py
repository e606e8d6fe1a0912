"""Zero-change mode (issue #11 point 5): unmodified `from mpi4py import MPI` programs run on
this project's MPI under `ivshmem-run` and `python -m guest_lib.mpi`, real processes over a
real region; the hybrid route under mpiexec still reaches the real mpi4py; the switch
IVSHMEM_MPI_ZERO_CHANGE=0 gives mpi4py back.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.mpi.conftest import MPIEXEC, PYTHON, ROOT, job_env, run_job

PROGRAMS = Path(__file__).with_name("programs")
UNMODIFIED = str(PROGRAMS / "unmodified.py")
LAUNCHER = [PYTHON, "-m", "guest_lib.mpi.launcher"]


def results(out: Path, ranks: int) -> list[dict]:
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(ranks)]


def check(found: list[dict], module: str) -> None:
    size = len(found)
    for rank, result in enumerate(found):
        assert result["module"] == module, result
        assert result["rank"] == rank and result["size"] == size
        assert result["ring"] == (rank - 1) % size
        assert result["allreduce"] == [size * (size - 1) / 2] * 4
        assert result["allgather"] == list(range(size))


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_ivshmem_run_unmodified_program(ranks, tmp_path):
    out = tmp_path / "r"
    run_job([*LAUNCHER, "-n", str(ranks), "--timeout", "100", UNMODIFIED, str(out)], 120)
    found = results(out, ranks)
    check(found, "guest_lib.mpi.MPI")
    assert {r["mode"] for r in found} == {"standalone" if ranks > 1 else "singleton"} or ranks == 1


def test_ivshmem_run_python_command(tmp_path):
    """`ivshmem-run -n 2 -- python prog.py` takes the zero-change route too."""
    out = tmp_path / "r"
    run_job([*LAUNCHER, "-n", "2", "--timeout", "100", "--", PYTHON, UNMODIFIED, str(out)], 120)
    check(results(out, 2), "guest_lib.mpi.MPI")


def test_ivshmem_run_console_script(tmp_path):
    """A Python script named by its `#!` line, as a package's console script (`ivshmem-run -n 4
    dask-mpi ...`), takes the zero-change route: it ran on the real mpi4py before, every rank
    a world of one."""
    script = tmp_path / "console-prog"
    script.write_text(f"#!{PYTHON}\n{Path(UNMODIFIED).read_text()}")
    script.chmod(0o755)
    out = tmp_path / "r"
    run_job([*LAUNCHER, "-n", "2", "--timeout", "100", str(script), str(out)], 120)
    check(results(out, 2), "guest_lib.mpi.MPI")


@pytest.mark.parametrize(
    ("first_line", "interpreter"),
    [("#!/venv/bin/python3.11", "/venv/bin/python3.11"), ("#!/usr/bin/env python3 -u", "python3"),
     ("#!/bin/sh", None), ("#!/usr/bin/env bash", None), ("no shebang", None)],
)  # fmt: skip
def test_script_python_reads_the_shebang(tmp_path, first_line, interpreter):
    from guest_lib.mpi.launcher import _script_python

    script = tmp_path / "tool"
    script.write_text(f"{first_line}\nprint()\n")
    script.chmod(0o755)
    assert _script_python(str(script)) == interpreter
    assert _script_python(str(tmp_path / "absent")) is None


def test_switch_off_gives_mpi4py_back(tmp_path):
    out = tmp_path / "r"
    run_job([PYTHON, "-m", "guest_lib.mpi", UNMODIFIED, str(out)], 120,
            IVSHMEM_MPI_ZERO_CHANGE="0")  # fmt: skip
    check(results(out, 1), "mpi4py.MPI")
    run_job([PYTHON, "-m", "guest_lib.mpi", "--native-mpi4py", UNMODIFIED, str(out)], 120)
    check(results(out, 1), "mpi4py.MPI")


def test_python_m_guest_lib_mpi(tmp_path):
    out = tmp_path / "r"
    run_job([PYTHON, "-m", "guest_lib.mpi", UNMODIFIED, str(out)], 120)
    check(results(out, 1), "guest_lib.mpi.MPI")
    done = run_job([PYTHON, "-m", "guest_lib.mpi", "-c",
                    "import sys; from mpi4py import MPI; print(MPI.__name__, sys.argv)", "x"],
                   60)  # fmt: skip
    assert done.stdout.split() == ["guest_lib.mpi.MPI", "['-c',", "'x']"]


def test_hybrid_route_keeps_real_mpi4py(regions, tmp_path):
    """Under mpiexec with two regions, `mpi4py.MPI` is ours in the program while the
    traffic between regions still goes through the real mpi4py."""
    out = tmp_path / "r"
    a, b = regions(64 << 20, 2), regions(64 << 20, 2)
    command = [PYTHON, "-m", "guest_lib.mpi", UNMODIFIED, str(out)]
    run_job([MPIEXEC, "-n", "2", "-env", "IVSHMEM_COMM_REGION", a, *command, ":",
             "-n", "2", "-env", "IVSHMEM_COMM_REGION", b, *command], 120)  # fmt: skip
    found = results(out, 4)
    check(found, "guest_lib.mpi.MPI")
    assert all(r["mode"] == "mpiexec" and r["mpi_messages"] > 0 for r in found), found


@pytest.mark.parametrize("code", [3, 0])
def test_abort_ends_the_job_without_recursion(code):
    """Comm.Abort in a program whose mpi4py.MPI is ours ends the job with its status, 0
    included (as MPICH's mpiexec: schwimmbad's MPIPool calls Abort() when a worker fails)."""
    start = time.monotonic()
    done = subprocess.run([*LAUNCHER, "-n", "2", "--timeout", "60", str(PROGRAMS / "abort.py"),
                           str(code)], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                          timeout=90)  # fmt: skip
    assert done.returncode == code, done.stderr[-3000:]
    assert "RecursionError" not in done.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("level", ["single", "serialized", "multiple"])
def test_rc_thread_level(level, tmp_path):
    """`mpi4py.rc.thread_level` set by an unmodified program before `from mpi4py import MPI`
    is the level Query_thread reports (THREAD_MULTIPLE by default, as with mpi4py)."""
    program = tmp_path / "level.py"
    program.write_text(
        "import sys\nimport mpi4py\nmpi4py.rc.thread_level = sys.argv[1]\n"
        "from mpi4py import MPI\nprint('LEVEL', MPI.__name__, MPI.Query_thread())\n"
    )
    done = run_job([PYTHON, "-m", "guest_lib.mpi", str(program), level], 120)
    expected = {"single": 0, "serialized": 2, "multiple": 3}[level]
    assert f"LEVEL guest_lib.mpi.MPI {expected}" in done.stdout, done.stdout
