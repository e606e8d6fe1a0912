"""Fixtures of the rank-side suite: one test body per communicator, as mpi4py's suite.

These files run inside every rank of a job (`ivshmem-run -n K python -m pytest ...` or
`mpiexec -n K python -m pytest ...`, see tests/mpi/test_suite_runs.py), and also directly in
a plain pytest run, where the process is a singleton world of one rank. Collection order is
deterministic, so every rank runs the same collectives in the same order; `-x` makes a
failing rank leave at once, which fails its peers instead of hanging them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from guest_lib.mpi import MPI, area


@pytest.fixture
def area_runs(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """Call it to start recording: returns the list that gets the name of every collective
    run through Area.run (the area's Python steps) from then on, this test only."""

    def watch() -> list[str]:
        entered: list[str] = []
        general = area.Area.run

        def run(self: area.Area, name: str, *args: Any) -> bool:
            entered.append(name)
            return general(self, name, *args)

        monkeypatch.setattr(area.Area, "run", run)
        return entered

    return watch


@pytest.fixture(params=["COMM_SELF", "COMM_WORLD", "Dup"])
def comm(request: pytest.FixtureRequest) -> Iterator[MPI.Intracomm]:
    """COMM_SELF, COMM_WORLD and a Dup of COMM_WORLD (freed afterwards)."""
    if request.param == "COMM_SELF":
        yield MPI.COMM_SELF
    elif request.param == "COMM_WORLD":
        yield MPI.COMM_WORLD
    else:
        dup = MPI.COMM_WORLD.Dup()
        yield dup
        dup.Free()
    MPI.COMM_WORLD.Barrier()  # nothing of one test leaks into the next


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing rank leaves the job at once: its peers then fail instead of hanging."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and MPI.COMM_WORLD.Get_size() > 1:
        import sys

        from _pytest.terminal import TerminalReporter

        terminal = item.config.pluginmanager.get_plugin("terminalreporter")
        if isinstance(terminal, TerminalReporter):
            terminal.write_line(f"rank {MPI.COMM_WORLD.Get_rank()} FAILED {item.nodeid}")
            terminal.write_line(str(report.longrepr))
        sys.stdout.flush()
        MPI.Abort_local()
