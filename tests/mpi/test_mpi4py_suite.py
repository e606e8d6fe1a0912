"""mpi4py's own test suite against guest_lib.mpi, at 1, 2 and 4 ranks (issue #11 point 1).

The suite is the `test/` directory of the sdist of the installed (pinned) mpi4py, fetched
once with `pip download` and kept under .venv/mpi4py-suite (IVSHMEM_MPI4PY_SUITE_CACHE
elsewhere). Each file runs in an `ivshmem-run -n N` job of tests/mpi/programs/
mpi4py_suite_rank.py, i.e. through the zero-change mode: the suite's `from mpi4py import
MPI` gets this project's MPI; up to BATCH files in turn share one job (in an xdist
worker, two: a file and the next; each still its own test here, with its own outcome). A
test running longer than PER_TEST_S ends its rank with every thread's Python stack
(faulthandler), reported here as a hang. tests/mpi/mpi4py_xfail.py is the expected-failure
list: a test fails this check if it fails unlisted, or passes listed.

`make test` runs every file of the suite, FILES, at 2 ranks; `make test-all` (and so CI) at
1 and 4 ranks too (marked `full`); one or a few by hand:

    .venv/bin/python -m pytest tests/mpi/test_mpi4py_suite.py -k 'test_win.py or test_rma.py'

and IVSHMEM_MPI4PY_SUITE_REPORT=FILE appends one JSON line per (file, ranks) with the
counts of each outcome (how /work/notes-style summaries are made), its time and the files
that ran before it in its job. It runs on the C path only: the pure-Python path repeats
the rank-side suite of this project instead.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from tests.mpi.conftest import PYTHON, ROOT, job_env

VERSION = importlib.metadata.version("mpi4py")
CACHE = Path(os.environ.get("IVSHMEM_MPI4PY_SUITE_CACHE", ROOT / ".venv" / "mpi4py-suite"))
RANK_PROGRAM = str(Path(__file__).with_name("programs") / "mpi4py_suite_rank.py")
XFAIL = str(Path(__file__).with_name("mpi4py_xfail.py"))
PER_TEST_S = 60
JOB_S = 600
FILES = [  # every test file of the pinned sdist (test_suite_files_are_the_sdists checks)
    "test_address.py", "test_attributes.py", "test_buffer.py", "test_cco_buf.py",
    "test_cco_buf_inter.py", "test_cco_nb_buf.py", "test_cco_nb_vec.py", "test_cco_ngh_buf.py",
    "test_cco_ngh_obj.py", "test_cco_obj.py", "test_cco_obj_inter.py", "test_cco_pr_buf.py",
    "test_cco_pr_ngh_buf.py", "test_cco_pr_vec.py", "test_cco_vec.py", "test_cco_vec_inter.py",
    "test_cffi.py", "test_comm.py", "test_comm_inter.py", "test_comm_topo.py", "test_ctypes.py",
    "test_datatype.py", "test_doc.py", "test_dynproc.py", "test_environ.py", "test_errhandler.py",
    "test_errorcode.py", "test_exceptions.py", "test_file.py", "test_grequest.py", "test_group.py",
    "test_handle.py", "test_info.py", "test_io.py", "test_mpiabi.py", "test_mpiapi.py",
    "test_mpimem.py", "test_msgspec.py", "test_msgzero.py", "test_objmodel.py", "test_op.py",
    "test_p2p_buf.py", "test_p2p_buf_matched.py", "test_p2p_buf_part.py", "test_p2p_obj.py",
    "test_p2p_obj_matched.py", "test_pack.py", "test_package.py", "test_pickle.py",
    "test_request.py", "test_rma.py", "test_rma_nb.py", "test_session.py", "test_spawn.py",
    "test_status.py", "test_subclass.py", "test_threads.py", "test_toplevel.py", "test_ulfm.py",
    "test_util_dtlib.py", "test_util_pkl5.py", "test_util_pool.py", "test_util_sync.py",
    "test_win.py",
]  # fmt: skip
FOUR = pytest.param(4, marks=[pytest.mark.full, pytest.mark.serial])  # alone: 4 ranks, 2 cores
pytestmark = [
    pytest.mark.slow,  # whole jobs of 5-70 s each: out of `make check`, in `make test`
    pytest.mark.skipif(
        os.environ.get("IVSHMEM_COMM_PUREPYTHON") == "1",
        reason="mpi4py's suite runs on the C path; the pure path repeats the rank-side suite",
    ),
]


def sdist_part(part: str, marker: str) -> Path:
    """The directory `part` (e.g. "test", "demo/futures") of the sdist of the installed
    mpi4py version, extracted on first use (`marker`: a file it holds) from the sdist, which
    is downloaded once and kept beside the parts (see _sdist). Each part has its own
    directory, named after it with "/" -> "_": "demo" and "demo/futures" never nest (moving
    "demo" into place would fail on a "demo/futures" extracted before it)."""
    target = CACHE / f"mpi4py-{VERSION}" / part.replace("/", "_")
    if (target / marker).exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    # one process at a time (xdist workers): a second one's os.replace onto the first's
    # directory failed with ENOTEMPTY in a dry run; the one that waited finds it there
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / marker).exists():
            _extract_part(_sdist(), part, target)
    return target


def _sdist() -> Path:
    """The sdist (CACHE/mpi4py-VERSION.tar.gz), downloaded by pip if it is not there yet: a
    download prepares the sdist's metadata in a fresh build environment (seconds of CPU), so
    every part comes from one download. The caller holds the cache's lock."""
    sdist = CACHE / f"mpi4py-{VERSION}.tar.gz"
    if not sdist.exists():
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"mpi4py=={VERSION}", "-d", tmp],
                check=True, capture_output=True, timeout=900,
            )  # fmt: skip
            (downloaded,) = Path(tmp).glob("mpi4py-*.tar.gz")
            os.replace(downloaded, sdist)
    return sdist


def _extract_part(sdist: Path, part: str, target: Path) -> None:
    """Extract the sdist's directory `part` to `target` (see sdist_part)."""
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        prefix = f"mpi4py-{VERSION}/{part}/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            archive.extractall(tmp, members=members, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / f"mpi4py-{VERSION}" / part, target)


def suite_dir() -> Path:
    """The suite's directory for the installed mpi4py version, downloaded on first use."""
    return sdist_part("test", "runtests.py")


def test_suite_files_are_the_sdists() -> None:
    """FILES names exactly the test files of the pinned sdist (a version bump must update
    it, so that no file of the suite silently goes unrun)."""
    assert sorted(p.name for p in suite_dir().glob("test_*.py")) == FILES


@dataclasses.dataclass
class FileRun:
    """One file's part of a job of the suite (run_files)."""

    per_rank: list[list[dict] | None]  # each rank's lines (None: it wrote no file)
    job: subprocess.CompletedProcess[str] | None  # the job, if it ended in (or after) this file
    before: list[str]  # the files run in the same job before this one
    seconds: float  # the job's time, or (in a job of several files that ended it) rank 0's


def run_files(names: list[str], ranks: int, out: Path) -> dict[str, FileRun]:
    """Run files of the suite in turn in one job at `ranks` ranks, each rank's lines under
    `out`. Returns each file's run up to the first one some rank did not end (a hang or a
    crash ends the job there: the job's status and stderr go with that file); the files
    after it are left out (the caller runs them again)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [PYTHON, "-m", "guest_lib.mpi.launcher", "-n", str(ranks), "--timeout",
               str(JOB_S * len(names)), RANK_PROGRAM, str(suite_dir()), ",".join(names),
               str(out), str(PER_TEST_S), XFAIL]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=job_env(), capture_output=True, text=True,
                          timeout=JOB_S * len(names) + 60)  # fmt: skip
    job_seconds = round(time.monotonic() - start, 1)
    runs = {}
    for index, name in enumerate(names):
        per_rank = []
        for rank in range(ranks):
            path = out / f"{name}.{rank}"
            per_rank.append([json.loads(line) for line in path.read_text().splitlines()]
                            if path.exists() else None)  # fmt: skip
        ended = all(lines and lines[-1]["outcome"] == "end" for lines in per_rank)
        last = not ended or index == len(names) - 1
        seconds = job_seconds  # the job's time; in a job of several files, rank 0's own time
        if ended and len(names) > 1:
            seconds = float(per_rank[0][-1]["detail"])  # type: ignore[index]
        runs[name] = FileRun(per_rank, done if last else None, names[:index], seconds)
        if not ended:
            break
    return runs


def problems_of(run: FileRun) -> tuple[list[str], collections.Counter[str]]:
    """What is wrong in a file's run (empty: it passed) and the count of each outcome."""
    problems = []
    counts: collections.Counter[str] = collections.Counter()
    for rank, lines in enumerate(run.per_rank):
        if lines is None:
            problems.append(f"rank {rank}: no result file")
            continue
        ended = {line["id"] for line in lines if line["outcome"] != "started"}
        for line in lines:
            outcome, test_id = line["outcome"], line["id"]
            if outcome == "started":
                if test_id not in ended:
                    problems.append(f"rank {rank}: {test_id} did not end (hang or crash)")
                    counts["hang"] += 1
                continue
            if outcome == "end":
                continue
            counts[outcome] += 1
            if outcome in ("fail", "error"):
                problems.append(f"rank {rank}: {test_id} {outcome}:\n{line['detail']}")
            elif outcome == "xpass":
                problems.append(f"rank {rank}: {test_id} passes but is listed: {line['detail']}")
    if run.job is not None and run.job.returncode != 0 and not problems:
        problems.append(f"the job exited {run.job.returncode}")
    return problems, counts


# Files per job: a launch costs ~0.4 s of CPU at 1 rank, ~0.7 s at 2 and seconds at 4 on 2
# CPUs, and mpi4py's own runtests.py runs the whole suite in one process too. In a run without
# xdist workers (CI's serial pass: 4 ranks) up to BATCH files in turn share one job; in an
# xdist worker (make test: 2 ranks, test-full: 1) a file and the test this worker runs next,
# if that is a file at the same rank count (_next_here). A file that fails after others in
# its job runs again alone to say whether it needs them to fail; a job ended by a hang or
# crash is run again from the file after that one. IVSHMEM_MPI4PY_SUITE_BATCH=1 runs every
# file in a job of its own.
BATCH = int(os.environ.get("IVSHMEM_MPI4PY_SUITE_BATCH", "8"))
_done: dict[tuple[str, int], FileRun] = {}  # runs of files of a job, not yet reported


def _next_here(config: pytest.Config) -> int | None:
    """In a pytest-xdist worker, the index (into session.items) of the test it runs after
    this one, or None (none, outside a worker, or where xdist keeps it otherwise). The only
    queued test no other worker can take: --dist worksteal's idle worker takes the tail of
    another's pending tests but always leaves it two, the running test and that next one,
    so a file run ahead in a job here is never run again elsewhere."""
    if not hasattr(config, "workerinput"):
        return None
    for plugin in config.pluginmanager.get_plugins():
        following = getattr(plugin, "nextitem_index", None)
        if isinstance(following, int) and hasattr(plugin, "torun"):
            return following
    return None


def run_file(name: str, ranks: int, out: Path, request: pytest.FixtureRequest) -> FileRun:
    """This file's run: from a job run earlier for several files, or a new job for it and
    up to BATCH - 1 of the selected files at the same rank count that follow it (in an xdist
    worker: the one it runs next, _next_here)."""
    if (name, ranks) in _done:
        return _done.pop((name, ranks))
    selected = [(index, item.callspec.params["name"])
                for index, item in enumerate(request.session.items)
                if isinstance(item, pytest.Function)
                and item.originalname == "test_mpi4py_suite_file"
                and item.callspec.params["ranks"] == ranks]  # fmt: skip
    first = [other for _, other in selected].index(name)
    following = [(index, other) for index, other in selected[first + 1 :]
                 if (other, ranks) not in _done]  # fmt: skip
    if "PYTEST_XDIST_WORKER" in os.environ:
        here = _next_here(request.config)
        following = [(index, other) for index, other in following if index == here]
    names = [name, *(other for _, other in following[: BATCH - 1])]
    runs = run_files(names, ranks, out)
    _done.update(((other, ranks), run) for other, run in runs.items() if other != name)
    return runs[name]


@pytest.mark.timeout(JOB_S * (BATCH + 1) + 120)  # its job's files, and itself again alone
@pytest.mark.parametrize("ranks", [pytest.param(1, marks=pytest.mark.full), 2, FOUR])
@pytest.mark.parametrize("name", FILES)
def test_mpi4py_suite_file(name, ranks, tmp_path, request):
    run = run_file(name, ranks, tmp_path / "out", request)
    problems, counts = problems_of(run)
    report = os.environ.get("IVSHMEM_MPI4PY_SUITE_REPORT")
    if report:
        with open(report, "a") as sink:
            status = None if run.job is None else run.job.returncode
            entry = {"file": name, "ranks": ranks, "counts": dict(counts), "status": status,
                     "seconds": run.seconds, "after": run.before}  # fmt: skip
            sink.write(json.dumps(entry) + "\n")
    if problems and run.before:
        alone = problems_of(run_files([name], ranks, tmp_path / "alone")[name])[0]
        problems.insert(0, f"(in one job after {', '.join(run.before)}; alone, in a job of its "
                           f"own, it {'fails too' if alone else 'passes'})")  # fmt: skip
    if problems:
        stderr = "" if run.job is None else run.job.stderr[-8000:]
        pytest.fail("\n".join(problems)[:20000] + "\n--- job stderr ---\n" + stderr)
