"""`python -m benchmarks.pingpong --quick` runs end to end: a table and a JSON report holding
our figures and the mpi4py baselines. Nothing here asserts speed: timings belong in reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import pingpong
from benchmarks._plan import QUICK_SIZES, format_size, make_step
from ivshmem_comm.units import parse_size

ROOT = Path(__file__).resolve().parents[2]


def _have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return (Path(sys.executable).parent / "mpiexec").exists() or shutil.which("mpiexec") is not None


def test_sizes_parse_and_format() -> None:
    assert [parse_size(s) for s in ("8", "64", "1K", "64KiB", "1M", "16MiB")] == [
        8,
        64,
        1024,
        65536,
        1 << 20,
        16 << 20,
    ]
    assert format_size(8) == "8 B"
    assert format_size(64 << 10) == "64 KiB"
    assert format_size(16 << 20) == "16 MiB"


def test_schedule_shrinks_with_size() -> None:
    small, big = make_step(8), make_step(16 << 20)
    assert small.lat_iters > big.lat_iters and small.window >= big.window
    quick = make_step(8, quick=True)
    assert 2 <= quick.lat_iters < small.lat_iters


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(not _have_mpi(), reason="mpi4py and the mpich wheel are not installed")
def test_quick_run_prints_table_and_json(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.pingpong", "--quick", "--json", str(out_json)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "One-way latency" in text and "Bandwidth" in text
    for header in ("ours view", "ours into", "mpi shm", "mpi tcp"):
        assert header in text
    for size in QUICK_SIZES:
        assert any(line.strip().startswith(format_size(size)) for line in text.splitlines())

    report = json.loads(out_json.read_text())
    assert report["implementation"] in ("c", "python")
    assert report["sizes"] == list(QUICK_SIZES)
    for series in pingpong.SERIES:
        for size in QUICK_SIZES:
            value = report["median"][series][str(size)]
            assert isinstance(value, float) and value > 0, (series, size, value)
    for ratios in report["ratios"].values():
        assert all(isinstance(v, float) and v > 0 for v in ratios.values())
    # The TCP baseline really went over TCP: each rank held established TCP connections.
    assert all(n > 0 for n in report["info"]["tcp_connections"]["mpi_tcp"])
