"""`python -m benchmarks.threads_cost --quick` runs end to end in a real 2-rank job: every
figure of both states and their ratios come back. Nothing here asserts speed: timings belong
in reports (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import threads_cost


def test_threads_cost_quick(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cost.json"
    assert threads_cost.main(["--rounds", "2", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rounds"] == 2
    for state in threads_cost.STATES:
        assert len(result["per_round"][state]) == 2
        assert all(result["median"][state][m] > 0 for m in threads_cost.METRICS)
    assert set(result["ratio"]) == {"idle_thread/single"}
    table = capsys.readouterr().out
    assert all(metric in table for metric in threads_cost.METRICS)
