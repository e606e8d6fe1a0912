"""`python -m benchmarks.osu --quick` end to end, as CI runs it: every OSU test in every buffer
form with ours, MPICH shared memory and MPICH over TCP; every one ran and checked its data; the
JSON, the tables, the per-implementation OSU files and the plots exist; a hang becomes a
reported failure; the README section is regenerated from the JSON. Nothing here asserts speed.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.osu import cli, driver, report
from benchmarks.osu.forms import CheckError, expect
from benchmarks.osu.spec import BY_NAME, TESTS, headline

ROOT = Path(__file__).resolve().parents[2]
SUBSET_4 = [
    "multi_lat",
    "barrier",
    "allreduce",
    "scatter",
    "alltoallv",
    "reduce_scatter",
    "ialltoall",
]

pytestmark = pytest.mark.skipif(
    not Path(sys.executable).with_name("mpiexec").exists(),
    reason="mpi4py and the mpich wheel are not installed",
)


def _osu(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.osu", "--no-progress", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_complete(doc: dict[str, Any], ranks: int, tests: list[str]) -> None:
    """Every planned (test, form, size) has a finite, positive row from every implementation."""
    jobs = cli.plan(tests, None, ranks, max(cli.QUICK_SIZES), cli.QUICK_SCALE, quick=True)
    run = doc["runs"][str(ranks)]
    assert sorted(run) == sorted({j.test for j in jobs})
    for job in jobs:
        test = BY_NAME[job.test]
        for impl in driver.IMPLS:
            entry = run[job.test][job.form][impl]
            assert entry["status"] == "ok", (ranks, job.test, job.form, impl, entry)
            assert sorted(map(int, entry["rows"])) == [s.size for s in job.steps]
            for size, metrics in entry["rows"].items():
                for key, _ in report.OSU_COLUMNS[test.kind]:
                    value = metrics[key]
                    assert math.isfinite(value) and value >= 0, (job, impl, size, key, value)
                assert metrics[headline(test)] > 0


@pytest.fixture(scope="module")
def quick2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of one `--quick --ranks 2` run, made once per pytest run: under pytest-xdist
    the workers' temporary dirs share a parent of this run's own, where the first worker to
    take the lock makes it and the others reuse it (a failed run is made again)."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent
    out = base / "osu-quick2"
    with open(base / "osu-quick2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "made").exists():
            proc = _osu("--quick", "--ranks", "2", "--out", str(out), timeout=240)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            (out / "made").touch()
    return out


@pytest.mark.slow
@pytest.mark.timeout(260)
def test_quick_two_ranks_runs_every_test_and_form(quick2: Path) -> None:
    doc = json.loads((quick2 / "results.json").read_text())
    _check_complete(doc, 2, [t.name for t in TESTS])
    assert doc["info"]["quick"] and isinstance(doc["misses"], list)
    evidence = doc["info"]["evidence"]
    assert all(n > 0 for n in evidence["tcp 2 ranks"]["tcp_connections"])  # really over TCP
    assert all(n == 0 for n in evidence["mpich 2 ranks"]["tcp_connections"])
    tables = (quick2 / "tables.txt").read_text()
    assert "# failures: 0" in tables
    for test in TESTS:
        assert f"# {test.osu_name}, 2 ranks, buffer form: {test.forms[0]}" in tables
        for impl in driver.IMPLS:
            osu = (quick2 / "2ranks" / impl / f"{test.osu_name}_{test.forms[-1]}.txt").read_text()
            header = "".join(f"{name:>{report.W}}" for _, name in report.OSU_COLUMNS[test.kind])
            assert header.strip() in osu
        png = quick2 / f"{test.osu_name}_2ranks.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Latency (us)" in tables and "Avg Latency(us)" in tables and "Overlap(%)" in tables


@pytest.mark.slow
@pytest.mark.serial  # 4 ranks on 2 cores: nothing beside them
@pytest.mark.full  # make test-all (CI); make test runs the two-rank quick run
@pytest.mark.timeout(250)
def test_quick_four_ranks_oversubscribed_subset(tmp_path: Path) -> None:
    proc = _osu(
        "--quick",
        "--ranks",
        "4",
        "--tests",
        ",".join(SUBSET_4),
        "--no-plots",
        "--out",
        str(tmp_path),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    _check_complete(doc, 4, SUBSET_4)
    if (os.cpu_count() or 1) < 4:
        assert "4 ranks (oversubscribed" in proc.stdout


@pytest.mark.timeout(120)
def test_a_hang_is_a_reported_failure_and_the_run_goes_on(tmp_path: Path) -> None:
    # Every barrier step takes >= 10 ms (the barrier check delays the last rank), so a 1 ms
    # hang timeout fires the rank's watchdog in each: both forms fail, each in its own launch.
    proc = _osu(
        "--quick",
        "--tests",
        "barrier",
        "--impls",
        "mpich",
        "--hang-timeout",
        "0.001",
        "--no-plots",
        "--out",
        str(tmp_path),
        timeout=100,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    forms = doc["runs"]["2"]["barrier"]
    assert sorted(forms) == ["call", "pickle"]
    for entry in forms.values():
        assert entry["mpich"]["status"] == "failed"
        assert entry["mpich"]["error"].startswith("hang")
        assert "rank.py" in entry["mpich"]["traceback"]  # the watchdog's stack dump
    assert "# failures: 2" in proc.stdout


def test_wrong_data_raises() -> None:
    want = np.arange(5, dtype=np.uint8)
    expect(want.copy(), want, "same")
    bad = want.copy()
    bad[3] = 0
    with pytest.raises(CheckError, match="element 3"):
        expect(bad, want, "one byte off")
    with pytest.raises(CheckError, match="4 elements"):
        expect(want[:4], want, "short")


@pytest.mark.slow  # it reuses the quick two-rank run (quick2)
@pytest.mark.timeout(260)
def test_update_readme_rewrites_only_its_section(quick2: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Title\n\nbefore\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\nafter\n"
    )
    proc = _osu(
        "--update-readme", str(quick2 / "results.json"), "--readme", str(readme), timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\nafter\n")
    assert "old" not in text
    for test in TESTS:
        assert f"| {test.name} ({test.forms[0]}) |" in text
    assert text.count(report.README_BEGIN) == 1 and text.count(report.README_END) == 1


def test_rounds_merge_to_per_row_medians_and_keep_failures() -> None:
    def entry(avg: float, status: str = "ok") -> dict[str, Any]:
        return {
            "rows": {"8": {"avg": avg, "iters": 5}},
            "status": status,
            "failed_size": None,
            "error": "boom" if status != "ok" else "",
            "traceback": "",
            "wall_s": 1.0,
        }

    merged = cli.median_entry([entry(3.0), entry(1.0), entry(2.0)])
    assert merged["rows"] == {"8": {"avg": 2.0, "iters": 5}} and merged["status"] == "ok"
    assert merged["rounds"] == 3 and merged["wall_s"] == 3.0
    failed = cli.median_entry([entry(1.0), entry(2.0, "failed")])
    assert failed["status"] == "failed" and failed["error"] == "boom"


def test_min_iters_floors_the_scaled_iteration_counts():
    """A small --scale leaves OSU's large sizes 1-2 iterations; --min-iters raises every
    size's timed count to at least that, and leaves counts already above it alone."""
    from benchmarks.osu.spec import counts

    bcast, latency = BY_NAME["bcast"], BY_NAME["latency"]
    assert cli.plan(["bcast"], ["numpy"], 2, 4 << 20, 0.007, False)[0].steps[-1].iters == 2
    steps = cli.plan(["bcast"], ["numpy"], 2, 4 << 20, 0.007, False, min_iters=20)[0].steps
    assert {s.iters for s in steps if s.size > 8192} == {20}
    assert {s.iters for s in steps if s.size <= 8192} == {20}  # round(1000 * 0.007) = 7
    assert counts(latency, 8, 0.007, 20) == (1, 70)
    assert counts(bcast, 8, 1.0, 20) == (100, 1000)
