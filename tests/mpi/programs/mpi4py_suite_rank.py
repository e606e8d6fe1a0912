"""One rank of a run of mpi4py's own test suite (some files of it) on guest_lib.mpi.

    ivshmem-run -n N mpi4py_suite_rank.py SUITE_DIR test_x.py[,test_y.py...] OUT TIMEOUT [LIST]

Started through the zero-change mode (ivshmem-run runs Python programs that way), so the
suite's `from mpi4py import MPI` gets this project's MPI. Runs the unittest cases of each
named file of SUITE_DIR in turn, in one process (as mpi4py's runtests.py runs the whole
suite), each in mpi4py's order, and writes one JSON line per test to OUT/test_x.py.<rank>:
{"id", "outcome", "detail"} with outcome pass, fail, error, skip, xfail (a listed test that
failed), xpass (a listed test that passed) or "listed-skip" (listed as not to run: it hangs
or breaks the ranks); the file's last line, once all its tests ran, is {"id": "<end>",
"outcome": "end", "detail": seconds}. LIST is the expected-failure list
(tests/mpi/mpi4py_xfail.py). A file that cannot be imported gives one line with id
"test_x.<import>". A test that runs longer than
TIMEOUT seconds (SLOW_FACTOR times that for one listed "slow": it must pass, in more time)
makes faulthandler print every thread's Python stack and end the rank (its last line is
then "started", and the files after it have no "end" line or no file). The suite's array
backends all run, as in mpi4py's own runs
without cupy/numba: its fake-GPU ones (host memory behind the CUDA array interface) too.
"""

from __future__ import annotations

import faulthandler
import fnmatch
import importlib.util
import json
import os
import sys
import time
import traceback
import unittest
from typing import Any

SLOW_FACTOR = 4  # a test listed "slow" may run this many times the per-test limit


def _load_list(path: str) -> list[tuple[str, str, str]]:
    spec = importlib.util.spec_from_file_location("mpi4py_xfail", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.ENTRIES)


def _listed(entries: list[tuple[str, str, str]], test_id: str, size: int) -> tuple[str, str]:
    """("xfail" | "skip" | "slow", reason) of the first entry matching `test_id`, or
    ("", "")."""
    for pattern, action, reason in entries:
        kind, _, ranks = action.partition("@")
        if ranks and str(size) not in ranks.split(","):
            continue
        if fnmatch.fnmatchcase(test_id, pattern):
            return kind, reason
    return "", ""


class Recorder(unittest.TestResult):
    """Writes each test's outcome as it ends; arms the hang timer around each test."""

    def __init__(self, out: Any, timeout: float, entries: list, size: int) -> None:
        super().__init__()
        self.out, self.timeout, self.entries, self.size = out, timeout, entries, size
        self._bad: tuple[str, str] | None = None

    def _write(self, test_id: str, outcome: str, detail: str = "") -> None:
        self.out.write(json.dumps({"id": test_id, "outcome": outcome, "detail": detail[-3000:]}))
        self.out.write("\n")
        self.out.flush()

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self._bad = None
        self.out.write(json.dumps({"id": test.id(), "outcome": "started"}) + "\n")
        self.out.flush()
        slow = _listed(self.entries, test.id(), self.size)[0] == "slow"
        faulthandler.dump_traceback_later(self.timeout * (SLOW_FACTOR if slow else 1), exit=True)

    def stopTest(self, test: unittest.TestCase) -> None:
        faulthandler.cancel_dump_traceback_later()
        kind, reason = _listed(self.entries, test.id(), self.size)
        if self._bad is None:
            if not any(test is t for t, _ in self.skipped):
                self._write(test.id(), "xpass" if kind == "xfail" else "pass", reason)
        elif kind == "xfail":
            self._write(test.id(), "xfail", reason)
        else:
            self._write(test.id(), *self._bad)
        super().stopTest(test)

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._bad = ("error", "".join(traceback.format_exception(*err)))

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._bad = ("fail", "".join(traceback.format_exception(*err)))

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._write(test.id(), "skip", reason)

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        # (not unittest's: it formats every failing subtest's traceback, thousands in some
        # tests of the suite; the first one is what is reported)
        if err is not None and self._bad is None:
            kind = "fail" if issubclass(err[0], test.failureException) else "error"
            self._bad = (kind, f"{subtest}: " + "".join(traceback.format_exception(*err)))

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._bad = ("fail", "unexpected success (mpi4py's own expectedFailure)")


def _filter(suite: unittest.TestSuite, keep: Any) -> unittest.TestSuite:
    out = unittest.TestSuite()
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.addTest(_filter(item, keep))
        elif keep(item):
            out.addTest(item)
    return out


def run_module(name: str, out_path: str, timeout: float, entries: list) -> None:
    """Run the suite's file `name` on this rank, writing its lines to out_path (see above)."""
    from mpi4py import MPI

    size = MPI.COMM_WORLD.Get_size()
    module_name = name.removesuffix(".py")
    start = time.monotonic()
    with open(out_path, "w") as out:
        recorder = Recorder(out, timeout, entries, size)
        faulthandler.dump_traceback_later(timeout, exit=True)
        try:
            module = importlib.import_module(module_name)
            tests = unittest.defaultTestLoader.loadTestsFromModule(module)
        except BaseException:  # (SystemExit, a missing name, a crash of the module)
            faulthandler.cancel_dump_traceback_later()
            kind, reason = _listed(entries, f"{module_name}.<import>", size)
            outcome = "xfail" if kind == "xfail" else "error"
            recorder._write(f"{module_name}.<import>", outcome, reason or traceback.format_exc())
        else:
            faulthandler.cancel_dump_traceback_later()

            def keep(test: unittest.TestCase) -> bool:
                kind, reason = _listed(entries, test.id(), size)
                if kind == "skip":
                    recorder._write(test.id(), "listed-skip", reason)
                    return False
                return True

            _filter(tests, keep).run(recorder)
        recorder._write("<end>", "end", str(round(time.monotonic() - start, 1)))


def main() -> None:
    faulthandler.enable()  # a crash prints every thread's stack too
    suite_dir, names, out_dir, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    entries = _load_list(sys.argv[5]) if len(sys.argv) > 5 else []
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    for absent in ("cupy", "numba"):  # as mpi4py's runner does without --cupy/--numba
        sys.modules[absent] = None  # type: ignore[assignment]
    sys.path.insert(0, suite_dir)
    for name in names.split(","):
        run_module(name, os.path.join(out_dir, f"{name}.{rank}"), timeout, entries)
    sys.stdout.flush()
    os.sys.stderr.flush()


if __name__ == "__main__":
    main()
