"""mpi4py's own OSU demo programs under ours, MPICH shared memory and MPICH over TCP.

    python -m benchmarks.osu_demos [--ranks 2] [--programs osu_bw,...] [--scale 1.0]
                                   [--max-size 1M] [--rounds 1] [--quick] [--json FILE]

The programs are the `demo/osu_*.py` of the sdist of the installed (pinned) mpi4py, fetched
once as mpi4py's own test suite is (tests/mpi/test_mpi4py_suite.py's sdist_part), and run
unmodified but for their import line: ours runs a copy whose `from mpi4py import MPI` reads
`from guest_lib.mpi import MPI` under `ivshmem-run -n N`; MPICH runs the original under
`mpiexec -n N`, over shared memory or, with benchmarks.osu's TCP_ENV, over TCP loopback.
This is how issue #12's checks run them. Each launch is one program (the order of the three
rotates per program and round); a driver (`worker`) imports the program and calls its
function with the programs' default arguments, or with every skip/loop count times --scale
(at least 1) and MAX_MSG_SIZE set by --max-size.

The table: per program, the time ours/MPICH (osu_bw and osu_bibw print a bandwidth: there
MPICH/ours), so below 1.0 means ours is faster, at 0 B, 8 B, 1 KiB, 64 KiB and 1 MiB (the
median over rounds), and ours/TCP at 8 B. osu_latency, osu_bw and osu_bibw need exactly two
ranks and are left out at other counts; osu_barrier prints its 0 B line only.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.mpi_bench import _env  # the environment a rank program gets
from benchmarks.osu.driver import TCP_ENV, mpiexec
from ivshmem_comm.units import parse_size

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = (
    "osu_latency", "osu_bw", "osu_bibw", "osu_multi_lat", "osu_barrier", "osu_bcast",
    "osu_gather", "osu_scatter", "osu_allgather", "osu_alltoall", "osu_alltoallv",
)  # fmt: skip
TWO_RANKS_ONLY = frozenset({"osu_latency", "osu_bw", "osu_bibw"})
BANDWIDTH = frozenset({"osu_bw", "osu_bibw"})  # they print MB/s, the others microseconds
IMPORT = "from mpi4py import MPI\n"
OURS_IMPORT = "from guest_lib.mpi import MPI\n"
IMPLS = ("ours", "mpich", "tcp")
TABLE_SIZES = (0, 8, 1 << 10, 64 << 10, 1 << 20)
MARK = "## program "  # the worker's line before each program's output
LAUNCH_S = 900.0


def demo_dir() -> Path:
    """The sdist's demo directory for the installed mpi4py, downloaded on first use."""
    from tests.mpi.test_mpi4py_suite import sdist_part  # the suite's cached sdist

    return sdist_part("demo", "osu_latency.py")


def prepare(source: Path, dest: Path, impl: str) -> Path:
    """Copy the PROGRAMS from `source` into `dest`/`impl`: unmodified for MPICH, with the
    import line rewritten for ours. Returns that directory; ValueError if a program does not
    hold the import line exactly once (a new sdist: the rewrite would not be the issue's)."""
    target = dest / impl
    target.mkdir(parents=True, exist_ok=True)
    for name in PROGRAMS:
        text = (source / f"{name}.py").read_text()
        if text.count(IMPORT) != 1:
            raise ValueError(f"{name}.py: {IMPORT.strip()!r} is not there exactly once")
        if impl == "ours":
            text = text.replace(IMPORT, OURS_IMPORT)
        (target / f"{name}.py").write_text(text)
    return target


def program_kwargs(function: Any, scale: float | None, max_size: int | None) -> dict[str, Any]:
    """The keyword arguments that scale every skip*/loop* parameter of the program's
    `function` by `scale` (None: the defaults; never below 1) and set MAX_MSG_SIZE."""
    kwargs: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if scale is not None and name.startswith(("skip", "loop")):
            kwargs[name] = max(1, round(parameter.default * scale))
    if max_size is not None:
        kwargs["MAX_MSG_SIZE"] = max_size
    return kwargs


def worker(directory: str, names: str, scale: str, max_size: str) -> None:
    """Rank side: import each program of `names` (comma-separated) from `directory` and call
    its function, after a MARK line (rank 0); "-" for scale/max_size keeps the default."""
    for name in names.split(","):
        spec = importlib.util.spec_from_file_location(name, Path(directory) / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        function = getattr(module, name)
        kwargs = program_kwargs(
            function,
            None if scale == "-" else float(scale),
            None if max_size == "-" else int(max_size),
        )
        if module.MPI.COMM_WORLD.Get_rank() == 0:
            print(f"{MARK}{name} {json.dumps(kwargs)}", flush=True)
        function(**kwargs)
        sys.stdout.flush()


def command(
    impl: str,
    ranks: int,
    directory: Path,
    names: Sequence[str],
    scale: float | None,
    max_size: int | None,
    timeout: float = LAUNCH_S,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run the programs `names` in turn in one
    launch of `impl` ("ours", "mpich" or "tcp") at `ranks` ranks."""
    prog = [
        "-m",
        "benchmarks.osu_demos",
        "worker",
        str(directory),
        ",".join(names),
        "-" if scale is None else str(scale),
        "-" if max_size is None else str(max_size),
    ]
    if impl == "ours":
        launcher = [sys.executable, "-m", "guest_lib.mpi.launcher", "-n", str(ranks)]
        return [*launcher, "--timeout", str(timeout), *prog], _env()
    return [mpiexec(), "-n", str(ranks), sys.executable, *prog], _env(
        TCP_ENV if impl == "tcp" else None
    )


def parse(stdout: str) -> dict[str, dict[int, float]]:
    """Each program's size lines in a worker's output: {program: {size: figure}}. Lines
    starting with '#' are headers; ValueError on any other line that is not "size figure"
    or on a size line before the first MARK."""
    out: dict[str, dict[int, float]] = {}
    rows: dict[int, float] | None = None
    for line in stdout.splitlines():
        if line.startswith(MARK):
            rows = out.setdefault(line[len(MARK) :].split()[0], {})
        elif line.startswith("#") or not line.strip():
            continue
        else:
            size, figure = line.split()
            if rows is None:
                raise ValueError(f"a size line before any program: {line!r}")
            rows[int(size)] = float(figure)
    return out


def expected_sizes(name: str, max_msg_size: int) -> list[int]:
    """The sizes the program prints lines for, up to its MAX_MSG_SIZE."""
    if name == "osu_barrier":
        return [0]
    powers = [1 << i for i in range(30) if (1 << i) <= max_msg_size]
    return powers if name in BANDWIDTH else [0, *powers]


def run_launch(
    impl: str, ranks: int, directory: Path, name: str, args: argparse.Namespace
) -> dict[int, float]:
    """One launch of program `name` (see command; args.scale and args.max_size); returns its
    size lines. RuntimeError if it fails (with its stderr) or its output does not parse."""
    names = [name]
    argv, env = command(impl, ranks, directory, names, args.scale, args.max_size)
    done = subprocess.run(
        argv,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=LAUNCH_S + 60,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{impl} {','.join(names)} exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    try:
        return parse(done.stdout).get(name, {})
    except ValueError as error:
        raise RuntimeError(f"{impl} {','.join(names)}: {error}\n{done.stdout}") from error


def ratio(
    figures: dict[str, dict[int, list[float]]], name: str, base: str, size: int
) -> float | None:
    """Ours against `base` at `size` (median over rounds): time ours/base, or for the
    bandwidth programs bandwidth base/ours. None when either has no figure there."""
    ours, theirs = figures["ours"].get(size), figures[base].get(size)
    if not ours or not theirs:
        return None
    a, b = statistics.median(ours), statistics.median(theirs)
    if name in BANDWIDTH:
        return b / a if a else None
    return a / b if b else None


def measure(args: argparse.Namespace, log: Any = sys.stderr) -> dict[str, Any]:
    """Run every selected program under every implementation, args.rounds times, one launch
    per (program, implementation), the implementations' order rotating. Returns the JSON
    result: the figures per program, implementation and size (one per round) and the ratios."""
    names = [n for n in args.programs if args.ranks == 2 or n not in TWO_RANKS_ONLY]
    figures = {n: {impl: {} for impl in IMPLS} for n in names}  # type: dict[str, Any]
    turn = 0
    with tempfile.TemporaryDirectory(prefix="osu_demos-") as tmp:
        source = demo_dir()
        dirs = {
            impl: prepare(source, Path(tmp), "ours" if impl == "ours" else "mpi") for impl in IMPLS
        }
        for rnd in range(args.rounds):
            for name in names:
                order = IMPLS[turn % 3 :] + IMPLS[: turn % 3]
                turn += 1
                for impl in order:
                    start = time.monotonic()
                    out = run_launch(impl, args.ranks, dirs[impl], name, args)
                    for size, figure in out.items():
                        figures[name][impl].setdefault(size, []).append(figure)
                    print(
                        f"round {rnd + 1} {name} {impl}: {time.monotonic() - start:.1f} s",
                        file=log,
                        flush=True,
                    )
    table = {
        name: {
            **{str(size): ratio(figures[name], name, "mpich", size) for size in TABLE_SIZES},
            "tcp_8": ratio(figures[name], name, "tcp", 8),
        }
        for name in names
    }
    return {
        "ranks": args.ranks,
        "scale": args.scale,
        "max_size": args.max_size,
        "rounds": args.rounds,
        "tcp_env": " ".join(f"{k}={v}" for k, v in TCP_ENV.items()),
        "figures": {
            n: {i: {str(s): v for s, v in f.items()} for i, f in by.items()}
            for n, by in figures.items()
        },
        "ratios": table,
    }


def format_table(result: dict[str, Any]) -> str:
    """The issue's table: one row per program, the ratios of `result` (see measure)."""
    heads = ["0 B", "8 B", "1 KiB", "64 KiB", "1 MiB", "TCP 8 B"]
    lines = [
        f"mpi4py's OSU demos at {result['ranks']} ranks: ours/MPICH shm (time; bw, bibw: "
        f"bandwidth MPICH/ours), and ours/TCP at 8 B; < 1.0: ours faster",
        f"{'program':<16}" + "".join(f"{h:>9}" for h in heads),
    ]
    for name, row in result["ratios"].items():
        cells = [row[str(s)] for s in TABLE_SIZES] + [row["tcp_8"]]
        lines.append(
            f"{name:<16}" + "".join("        -" if c is None else f"{c:9.2f}" for c in cells)
        )
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.osu_demos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--programs", type=lambda s: s.split(","), default=list(PROGRAMS))
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="skip/loop counts times this (default: the programs' own)",
    )
    parser.add_argument(
        "--max-size",
        type=parse_size,
        default=None,
        help="MAX_MSG_SIZE (default: the programs' own, 1M or 4M)",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="--scale 0.01 --max-size 64K: a smoke run of seconds"
    )
    parser.add_argument("--json", type=Path, help="write the result here too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the worker (`worker DIR NAMES SCALE MAX_SIZE`) or the runner."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker(*argv[1:])
        return 0
    args = make_parser().parse_args(argv)
    unknown = set(args.programs) - set(PROGRAMS)
    if unknown:
        raise SystemExit(f"unknown programs: {sorted(unknown)}")
    if args.quick:
        args.scale, args.max_size = args.scale or 0.01, args.max_size or (64 << 10)
    result = measure(args)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
