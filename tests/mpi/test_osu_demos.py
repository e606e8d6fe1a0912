"""mpi4py's own OSU demo programs (its sdist's demo/osu_*.py) under ivshmem-run (issue #12).

Issue #12's checks run these programs unmodified but for their import line (`from mpi4py
import MPI` -> `from guest_lib.mpi import MPI`) under `ivshmem-run -n 2`; benchmarks.osu
(our own suite) never runs them. Here benchmarks.osu_demos rewrites them from the sdist that
mpi4py's test suite is fetched from (test_mpi4py_suite.sdist_part, same cache), and its
worker imports each one and calls its function with every skip/loop count scaled down and a
smaller MAX_MSG_SIZE: every program in turn in one launch (a launch costs seconds of CPU
here), at 2 ranks (`make test`) and, for the eight that take any count, 4 ranks (`full`,
alone: 4 ranks on 2 cores). osu_latency also runs as the checks run it, as a script at its
default arguments (C path only: minutes on the pure path). Each run must exit 0 with no
traceback and print a parseable line for every size of every program.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import osu_demos
from tests.mpi.conftest import PYTHON, run_job
from tests.mpi.test_mpi4py_suite import sdist_part

SCALE = 0.01  # 10000 loops -> 100: every code path, each size a few times
MAX_SIZE = 64 << 10  # past the programs' large_message_size (8 KiB): both loop shapes
JOB_S = 600

pytestmark = pytest.mark.slow  # whole jobs: out of `make check`, in `make test`


@pytest.fixture(scope="module")
def ours_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The programs with the import line rewritten, in a temporary directory."""
    source = sdist_part("demo", "osu_latency.py")
    return osu_demos.prepare(source, tmp_path_factory.mktemp("osu_demos"), "ours")


def check_output(stdout: str, stderr: str, names: list[str]) -> None:
    """Every program of `names` ran (its MARK line) and printed exactly its sizes' lines."""
    assert "Traceback" not in stderr, stderr
    printed = osu_demos.parse(stdout)
    assert list(printed) == names, stdout
    for line in stdout.splitlines():
        if line.startswith(osu_demos.MARK):
            name, kwargs = line[len(osu_demos.MARK) :].split(" ", 1)
            expected = osu_demos.expected_sizes(name, json.loads(kwargs)["MAX_MSG_SIZE"])
            assert sorted(printed[name]) == expected, (name, stdout)


@pytest.mark.parametrize(
    "ranks", [2, pytest.param(4, marks=[pytest.mark.full, pytest.mark.serial])]
)
def test_every_demo_runs(ours_dir: Path, ranks: int) -> None:
    """Every demo that takes this rank count runs to its end in one launch."""
    names = [n for n in osu_demos.PROGRAMS if ranks == 2 or n not in osu_demos.TWO_RANKS_ONLY]
    argv, _ = osu_demos.command("ours", ranks, ours_dir, names, SCALE, MAX_SIZE, JOB_S)
    done = run_job(argv, JOB_S + 60)
    check_output(done.stdout, done.stderr, names)


@pytest.mark.skipif(
    os.environ.get("IVSHMEM_COMM_PUREPYTHON") == "1",
    reason="C path only: 4 min at load 40 on the pure path (test_every_demo_runs runs it there)",
)
def test_latency_at_its_defaults(ours_dir: Path) -> None:
    """osu_latency.py as the checks run it: the script itself, its defaults (10000 loops at
    0-8 KiB, up to 4 MiB)."""
    done = run_job([PYTHON, "-m", "guest_lib.mpi.launcher", "-n", "2", "--timeout",
                    str(JOB_S), str(ours_dir / "osu_latency.py")], JOB_S + 60)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    rows = osu_demos.parse(osu_demos.MARK + "osu_latency\n" + done.stdout)["osu_latency"]
    assert sorted(rows) == osu_demos.expected_sizes("osu_latency", 1 << 22), done.stdout
