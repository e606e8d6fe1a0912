"""mpi4py-based packages from PyPI, unmodified, under ivshmem-run (issue #12).

schwimmbad (pure Python; astronomy codes use its MPIPool, e.g. with emcee) drives its
workers with send/ssend, recv(ANY_SOURCE, ANY_TAG, status) and Iprobe, pickling with dill
when present: tests/mpi/programs/schwimmbad_pool.py maps 200 tasks over the workers and
checks the results. Skipped where schwimmbad is not installed (it is in the `test` extras).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mpi.conftest import PYTHON, run_job

pytest.importorskip("schwimmbad")

pytestmark = [pytest.mark.full, pytest.mark.timeout(300)]

PROGRAM = str(Path(__file__).with_name("programs") / "schwimmbad_pool.py")


@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.serial)])
def test_schwimmbad_mpipool_map(ranks: int) -> None:
    """MPIPool.map gives every result, in order, at 2 and 4 ranks."""
    done = run_job([PYTHON, "-m", "guest_lib.mpi.launcher", "-n", str(ranks), "--timeout",
                    "240", PROGRAM], 270)  # fmt: skip
    assert f"schwimmbad ok {ranks} {sum(x * x for x in range(200))}" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
