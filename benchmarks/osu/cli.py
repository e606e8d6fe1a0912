"""Command line of the suite: `python -m benchmarks.osu` / `ivshmem-osu`.

    python -m benchmarks.osu [--ranks 2,4] [--tests a,b] [--forms f,g] [--quick]
                             [--max-size 4M] [--scale F] [--out DIR] [--json FILE]
    python -m benchmarks.osu --update-readme RESULTS.json [MORE.json ...] [--readme README.md]
                             [--results-md benchmarks/RESULTS_OSU.md]

Runs each OSU test (latency, bw, bibw, multi_lat, barrier, bcast, reduce, allreduce,
gather(v), scatter(v), allgather(v), alltoall(v), reduce_scatter, scan, ibarrier, ibcast,
iallreduce, ialltoall) in every buffer form with ours, mpi4py over MPICH shared memory and
mpi4py over TCP, interleaved test by test (the order rotates), and writes the OSU-format tables
(stdout and OUT/tables.txt, one pure OSU file per implementation under OUT/<n>ranks/), the JSON
document, one PNG per test, and the rows that miss issue #12's targets. Exit status 0 when
every job of every implementation ran and checked its data, 1 when any failed (the outputs are
written either way), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.osu import driver, report
from benchmarks.osu.spec import BY_NAME, FORMS, KIB, MAX_SIZE, TESTS, Step, steps_for
from ivshmem_comm.units import parse_size

QUICK_SIZES = (0, 1, 8, KIB, 16 * KIB, 256 * KIB)  # both sides of OSU's 8 KiB "large" line
QUICK_SCALE = 0.005  # latency: 50 timed round trips; bw: 2 windows; collectives: 5 (2 large)
QUICK_HANG_S = 30.0
HANG_S = 120.0


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (see the module docstring)."""
    p = argparse.ArgumentParser(prog="ivshmem-osu", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=_csv, default=["2"], help="rank counts, e.g. 2,4 (default 2)")
    p.add_argument("--tests", type=_csv, help="tests to run (default: all)")
    p.add_argument("--forms", type=_csv, help=f"buffer forms (default: all of {', '.join(FORMS)})")
    p.add_argument(
        "--impls",
        type=_csv,
        default=list(driver.IMPLS),
        help="implementations (default: ours,mpich,tcp)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI: one pass over a few sizes (0 B .. 256 KiB) and few iterations",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times (the order rotates) and report per-row medians",
    )
    p.add_argument("--max-size", type=parse_size, help="largest message (default 4M)")
    p.add_argument(
        "--scale", type=float, help="multiply OSU's iteration counts (default 1; --quick 0.005)"
    )
    p.add_argument(
        "--min-iters",
        type=int,
        default=2,
        help="timed iterations per size at least, whatever --scale leaves (default 2)",
    )
    p.add_argument(
        "--hang-timeout",
        type=float,
        help="seconds one size of one test may take before it counts as a hang "
        f"(default {HANG_S:.0f}; --quick {QUICK_HANG_S:.0f})",
    )
    p.add_argument(
        "--batch",
        choices=("test", "all"),
        help="what one launch runs: one test (all its forms), interleaved "
        "implementation by implementation (default), or everything (--quick)",
    )
    p.add_argument("--region-size", help="ivshmem-run --size for ours (default: its own)")
    p.add_argument("--out", type=Path, default=Path("osu-results"), help="output directory")
    p.add_argument("--json", type=Path, help="results file (default OUT/results.json)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--update-readme",
        type=Path,
        nargs="+",
        metavar="RESULTS_JSON",
        help="only rewrite README's osu section from these results files",
    )
    p.add_argument(
        "--results-md",
        type=Path,
        help="with --update-readme: also write every table here (benchmarks/RESULTS_OSU.md)",
    )
    p.add_argument(
        "--readme",
        type=Path,
        default=driver.ROOT / "README.md",
        help="README to rewrite (default: the project's)",
    )
    return p


def plan(
    tests: list[str],
    forms: list[str] | None,
    ranks: int,
    max_size: int,
    scale: float,
    quick: bool,
    min_iters: int = 2,
) -> list[driver.Job]:
    """The jobs of one rank count: every selected test in every selected form it has."""
    jobs = []
    for name in tests:
        test = BY_NAME[name]
        if test.two_ranks and ranks != 2:
            continue  # as OSU's: osu_latency, osu_bw and osu_bibw need exactly two ranks
        for form in test.forms:
            if forms is not None and form not in forms:
                continue
            steps: list[Step] = steps_for(test, form, max_size, scale, min_iters)
            if quick and test.sized:
                steps = [s for s in steps if s.size in QUICK_SIZES or s.size == steps[0].size]
            jobs.append(driver.Job(name, form, steps))
    return jobs


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def run(args: argparse.Namespace, tests: list[str]) -> dict[str, Any]:
    """Run everything the arguments select; return the results document."""
    scale = args.scale if args.scale is not None else QUICK_SCALE if args.quick else 1.0
    max_size = args.max_size
    if max_size is None:
        max_size = max(QUICK_SIZES) if args.quick else MAX_SIZE
    hang_s = args.hang_timeout or (QUICK_HANG_S if args.quick else HANG_S)
    batch = args.batch or ("all" if args.quick else "test")
    cpus = len(os.sched_getaffinity(0))
    plans = {
        int(r): plan(tests, args.forms, int(r), max_size, scale, args.quick, args.min_iters)
        for r in args.ranks
    }
    rounds = args.rounds
    load_before = os.getloadavg()
    total = sum(len(j.steps) for jobs in plans.values() for j in jobs) * len(args.impls) * rounds
    runs: dict[str, Any] = {}
    libraries: dict[str, str] = {}
    evidence: dict[str, Any] = {}
    bar = _progress(total, not args.no_progress)
    try:
        for ranks, jobs in plans.items():
            per_round: list[dict[tuple[str, str, str], dict[str, Any]]] = []
            groups = [jobs] if batch == "all" else _by_test(jobs)
            for round_no in range(rounds):
                results: dict[tuple[str, str, str], dict[str, Any]] = {}
                for index, group in enumerate(groups):
                    k = (index + round_no) % len(args.impls)
                    for impl in args.impls[k:] + args.impls[:k]:
                        what = group[0].test if batch == "test" else "all tests"
                        bar.set_description(f"{ranks} ranks {what} {impl} round {round_no + 1}")
                        outcomes, info = driver.run_jobs(
                            impl, ranks, group, hang_s, args.region_size, bar.update
                        )
                        libraries.setdefault(impl, info.get("library", "?"))
                        if "tcp_connections" in info:
                            evidence[f"{impl} {ranks} ranks"] = {
                                "cpus": info.get("cpus"),
                                "tcp_connections": info["tcp_connections"],
                            }
                        for job, outcome in zip(group, outcomes, strict=True):
                            results[job.test, job.form, impl] = outcome.to_json()
                per_round.append(results)
            merged: dict[str, Any] = {}
            for key in per_round[0]:
                test, form, impl = key
                entry = median_entry([r[key] for r in per_round])
                merged.setdefault(test, {}).setdefault(form, {})[impl] = entry
            runs[str(ranks)] = merged
    finally:
        bar.close()
    iterations = "OSU defaults" if scale == 1 else f"OSU defaults x {scale:g}"
    iterations += (
        " (latency skip 100/loop 10000 up to 8 KiB, 10/1000 above; bw skip 10/loop 100,"
        " 2/20 above, window 64; collectives 100/1000, 10/100 above;"
        f" at least 1/{args.min_iters})"
    )
    return {
        "info": {
            "command": " ".join(["python -m benchmarks.osu", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": cpus,
            "pinned": cpus >= 2,
            "python": platform.python_version(),
            "iterations": iterations,
            "scale": scale,
            "max_size": max_size,
            "quick": args.quick,
            "batch": batch,
            "hang_timeout_s": hang_s,
            "rounds": rounds,
            "loadavg": {"before": load_before, "after": os.getloadavg()},
            "libraries": {driver.LABELS[i]: lib for i, lib in libraries.items()},
            "tcp_env": " ".join(f"{k}={v}" for k, v in driver.TCP_ENV.items()),
            "evidence": evidence,
        },
        "runs": runs,
    }


def median_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One implementation's result for one job over several rounds: per size and metric the
    median of the rounds that have it; failed if any round failed (its error kept)."""
    merged = dict(entries[0])
    sizes = sorted({s for e in entries for s in e["rows"]}, key=int)
    merged["rows"] = {}
    for size in sizes:
        rows = [e["rows"][size] for e in entries if size in e["rows"]]
        merged["rows"][size] = {
            k: rows[0][k] if k == "iters" else statistics.median(r[k] for r in rows)
            for k in rows[0]
        }
    bad = [e for e in entries if e["status"] != "ok"]
    if bad:
        for key in ("status", "failed_size", "error", "traceback"):
            merged[key] = bad[0][key]
    merged["wall_s"] = sum(e["wall_s"] for e in entries)
    merged["rounds"] = len(entries)
    return merged


def _by_test(jobs: list[driver.Job]) -> list[list[driver.Job]]:
    groups: dict[str, list[driver.Job]] = {}
    for job in jobs:
        groups.setdefault(job.test, []).append(job)
    return list(groups.values())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.update_readme:
        docs = [json.loads(p.read_text()) for p in args.update_readme]
        report.update_readme(args.readme, docs)
        print(f"rewrote the osu section of {args.readme}")
        if args.results_md is not None:
            commands = [d["info"]["command"] for d in docs]
            args.results_md.write_text(report.results_markdown(docs, commands))
            print(f"wrote {args.results_md}")
        return 0
    tests = args.tests or [t.name for t in TESTS]
    unknown = [t for t in tests if t not in BY_NAME] + [
        f for f in args.forms or [] if f not in FORMS
    ]
    unknown += [i for i in args.impls if i not in driver.IMPLS]
    if unknown:
        parser.error(f"unknown names: {', '.join(unknown)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    doc = run(args, tests)
    args.out.mkdir(parents=True, exist_ok=True)
    doc["misses"] = report.misses(doc)
    json_path = args.json or args.out / "results.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    text = report.render(doc)
    (args.out / "tables.txt").write_text(text)
    report.write_osu_files(doc, args.out)
    print(text)
    if not args.no_plots:
        report.plot(doc, args.out)
    print(f"wrote {json_path}, {args.out / 'tables.txt'}, the OSU files and plots under {args.out}")
    return 1 if any(True for _ in report.failed(doc)) else 0


def console() -> None:
    """Console script entry point (`ivshmem-osu`)."""
    sys.exit(main())
