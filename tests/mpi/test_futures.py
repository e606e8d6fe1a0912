"""mpi4py.futures on this project's MPI (issue #11 point 5): an unmodified futures program
under `ivshmem-run -n N -m mpi4py.futures` (the shared pool over COMM_WORLD, built on an
intercommunicator between rank 0 and the workers), mpi4py's own futures tests (demo/futures/
test_futures.py of the pinned sdist) in that mode, and the clear failure of an
MPIPoolExecutor used without it (it would need Spawn, which this MPI does not offer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mpi.conftest import PYTHON, ROOT, run_job
from tests.mpi.test_mpi4py_suite import sdist_part, suite_dir

PROGRAM = str(Path(__file__).with_name("programs") / "futures_prog.py")
LAUNCHER = [PYTHON, "-m", "guest_lib.mpi.launcher"]
pytestmark = pytest.mark.slow  # whole jobs of real ranks


@pytest.mark.serial  # 3 and 4 ranks on 2 cores: nothing beside them
@pytest.mark.parametrize("ranks", [3, 4])
def test_futures_program_under_ivshmem_run(ranks, tmp_path):
    out = tmp_path / "summary.json"
    run_job([*LAUNCHER, "-n", str(ranks), "--timeout", "100", "-m", "mpi4py.futures", PROGRAM,
             str(out)], 120)  # fmt: skip
    summary = json.loads(out.read_text())
    assert summary["module"] == "guest_lib.mpi.MPI" and summary["size"] == ranks
    assert summary["workers"] == ranks - 1
    assert summary["map"] == [x * x for x in range(40)]
    assert summary["worker_ranks"] == list(range(1, ranks))  # every worker took tasks
    assert summary["worker_pids"] == ranks - 1
    assert summary["submit"] == 144
    assert summary["raised"] == "ValueError('bad 3')"


def test_pool_executor_without_futures_main_fails_clearly(tmp_path):
    """No `-m mpi4py.futures`: the executor is broken at once with a message that says what
    to do, instead of waiting for ever for workers that Spawn cannot start."""
    out = tmp_path / "summary.json"
    done = run_job([*LAUNCHER, "-n", "1", "--timeout", "60", PROGRAM, str(out)], 90)
    assert "mpi4py.futures: MPIPoolExecutor needs Spawn" in done.stderr, done.stderr
    summary = json.loads(out.read_text())
    assert summary["error"].startswith("BrokenExecutor: MPIPoolExecutor needs Spawn")
    assert "python -m mpi4py.futures" in summary["error"] and "ERR_SPAWN" in summary["error"]
    assert summary["seconds"] < 30


@pytest.mark.parametrize("ranks", [1, pytest.param(3, marks=pytest.mark.serial)])
def test_mpi4py_own_futures_tests(ranks):
    """mpi4py's demo/futures/test_futures.py (its unittest suite of the executor, the shared
    pool, MPICommExecutor, ...) under `-m mpi4py.futures`: every test passes or skips."""
    demo = sdist_part("demo/futures", "test_futures.py")
    done = run_job([*LAUNCHER, "-n", str(ranks), "--timeout", "280", "-m", "mpi4py.futures",
                    str(demo / "test_futures.py")], 300,
                   PYTHONPATH=f"{ROOT}:{suite_dir()}")  # fmt: skip
    summary = done.stderr.strip().splitlines()
    assert summary[-1] == "OK" or summary[-1].startswith("OK ("), done.stderr[-3000:]
    assert any(line.startswith("Ran ") and int(line.split()[1]) > 100 for line in summary)
