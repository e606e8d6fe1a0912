"""Run the fuzz targets of tools.fuzz.targets.

    python -m tools.fuzz ring --seconds 3600            # one target, by hand, for long
    python -m tools.fuzz all --seconds 60                # each target in turn, a summary
    python -m tools.fuzz TARGET --corpus DIR --artifacts DIR
    python -m tools.fuzz ring --native --seconds 600     # the C fast path instrumented too

Engine: atheris (libFuzzer, coverage-guided over the Python code of ivshmem_comm,
host_broker, guest_lib and the targets) when it is installed, else `--engine random` (mutations
of the seeds and of inputs seen so far, no coverage). Each input has `--input-timeout`
seconds (libFuzzer's -timeout): a slower one is a hang. An exception that the target does
not list as documented for hostile input is a crash: the input is written under
`--artifacts` (crash-*/timeout-*) and the run exits non-zero. `--skip-known` goes on past the
crashes already reported (targets.KNOWN). `--native` (atheris and clang) also builds the C
fast path with coverage and AddressSanitizer and fuzzes on that build (tools.fuzz.native).

Output: one target prints the engine's log, ending with `Done N runs in S second(s)`; `all`
runs each target in its own process and prints `fuzz TARGET: N executions in S s (R/s),
C crashes` for each.
Exit status: 0 when no target crashed or hung, 1 otherwise, 2 for a usage error or an
instrumented build that cannot be made.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSTRUMENTED = ["ivshmem_comm", "host_broker", "guest_lib", "tools.fuzz.targets"]
TARGET_NAMES = ["protocol", "superblock", "ring", "mpi_wire", "config"]
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


class InputTimeout(BaseException):
    """One input ran past --input-timeout (random engine)."""


def _load_targets(engine: str) -> dict:
    if engine == "atheris":
        import atheris

        from tools.fuzz import native

        with atheris.instrument_imports(include=INSTRUMENTED):
            # The C build (--native) first: its init imports ivshmem_comm, to be instrumented.
            instrumented = native.load_requested()
            from tools.fuzz import targets
        if instrumented is not None:
            print(f"native: C fast path with coverage and ASan: {instrumented}", file=sys.stderr)
    else:
        from tools.fuzz import targets
    return targets.TARGETS


def _seed_corpus(corpus: Path, seeds: list[bytes]) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (corpus / hashlib.sha1(seed).hexdigest()).write_bytes(seed)


def run_atheris(name: str, args: argparse.Namespace, corpus: Path, artifacts: Path) -> int:
    import atheris

    function, allowed, seeds = _load_targets("atheris")[name]
    _seed_corpus(corpus, seeds)
    from tools.fuzz.targets import is_known

    def one_input(data: bytes) -> None:
        try:
            function(data)
        except allowed:
            pass
        except Exception as error:
            if not (args.skip_known and is_known(name, error)):
                raise

    flags = [
        f"-max_total_time={max(1, int(args.seconds))}",
        f"-timeout={max(1, int(args.input_timeout))}",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        *([f"-seed={args.seed}"] if args.seed is not None else []),
    ]
    atheris.Setup([sys.argv[0], *flags, str(corpus)], one_input)
    atheris.Fuzz()  # exits the process: libFuzzer prints "Done N runs in S second(s)"
    return 0


def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice = rng.randrange(5)
        at = rng.randrange(len(out) + 1)
        if choice == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif choice == 1:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif choice == 2 and out:
            del out[at : at + rng.randint(1, 16)]
        elif choice == 3:
            other = rng.choice(pool)
            out[at:] = other[rng.randrange(len(other) + 1) :]
        else:
            out[at:at] = rng.choice([b"\x00" * 8, b"\xff" * 8, b"\x7f\xff\xff\xff", b"\x80"])
    return bytes(out[:4096])


def run_random(name: str, args: argparse.Namespace, corpus: Path, artifacts: Path) -> int:
    function, allowed, seeds = _load_targets("random")[name]
    _seed_corpus(corpus, seeds)
    from tools.fuzz.targets import is_known

    pool = [p.read_bytes() for p in corpus.iterdir()] or [b""]
    rng = random.Random(args.seed)

    def alarm(_signum: int, _frame: object) -> None:
        raise InputTimeout

    signal.signal(signal.SIGALRM, alarm)
    start = time.monotonic()
    runs = 0
    while time.monotonic() - start < args.seconds:
        data = _mutate(rng, rng.choice(pool), pool)
        signal.setitimer(signal.ITIMER_REAL, args.input_timeout)
        try:
            function(data)
        except allowed:
            pass
        except InputTimeout:
            return _crash(name, "timeout", data, artifacts, runs, start)
        except Exception as error:
            if args.skip_known and is_known(name, error):
                continue
            import traceback

            traceback.print_exc()
            return _crash(name, "crash", data, artifacts, runs, start)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        runs += 1
        if len(pool) < 512 and rng.random() < 0.05:
            pool.append(data)
    print(f"Done {runs} runs in {int(time.monotonic() - start)} second(s)", file=sys.stderr)
    return 0


def _crash(name: str, kind: str, data: bytes, artifacts: Path, runs: int, start: float) -> int:
    path = artifacts / f"{kind}-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    took = int(time.monotonic() - start)
    print(f"{kind} in {name} after {runs} runs ({took} s): input saved to {path}", file=sys.stderr)
    return 1


def run_native(args: argparse.Namespace, argv: list[str]) -> int:
    """--native: build the instrumented fast path and run this same command on it in a new
    process (see tools.fuzz.native); its exit status."""
    from tools.fuzz import native

    with tempfile.TemporaryDirectory(prefix="fuzz-native-") as tmp:
        try:
            module = native.build(Path(tmp))
            environ = native.child_environ(module)
        except native.NativeBuildError as error:
            print(f"fuzz: {error}", file=sys.stderr)
            return 2
        command = [sys.executable, "-m", "tools.fuzz", *[a for a in argv if a != "--native"]]
        return subprocess.run(command, env=environ).returncode


def run_all(args: argparse.Namespace) -> int:
    failed = 0
    for name in TARGET_NAMES:
        command = [sys.executable, "-m", "tools.fuzz", name, "--seconds", str(args.seconds),
                   "--input-timeout", str(args.input_timeout), "--engine", args.engine,
                   "--artifacts", str(args.artifacts),
                   *(["--skip-known"] if args.skip_known else []),
                   *(["--native"] if args.native else [])]  # fmt: skip
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        took = time.monotonic() - start
        found = _DONE.search(done.stderr)
        runs = int(found.group(1)) if found else 0
        ok = done.returncode == 0 and found is not None
        failed += not ok
        print(
            f"fuzz {name}: {runs} executions in {took:.0f} s ({runs / max(took, 1e-9):.0f}/s), "
            f"{0 if ok else 1} crashes"
        )
        if not ok:
            print(done.stderr[-4000:])
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", choices=[*TARGET_NAMES, "all"])
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--input-timeout", type=float, default=5.0, help="seconds per input")
    try:
        import atheris  # noqa: F401

        default_engine = "atheris"
    except ImportError:
        default_engine = "random"
    parser.add_argument("--engine", choices=["atheris", "random"], default=default_engine)
    parser.add_argument("--corpus", type=Path, help="corpus directory (default: a temporary one)")
    parser.add_argument("--artifacts", type=Path, default=Path("."), help="where crashes go")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the engine's seed (both engines); default: a new one each run",
    )
    parser.add_argument(
        "--skip-known", action="store_true", help="go on past the crashes listed in targets.KNOWN"
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="also instrument the C fast path (coverage + AddressSanitizer; needs clang, atheris)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.artifacts = args.artifacts.resolve()
    args.artifacts.mkdir(parents=True, exist_ok=True)
    if args.target == "all":
        return run_all(args)
    if args.native:
        if args.engine != "atheris":
            parser.error("--native needs the atheris engine")
        return run_native(args, argv)
    run = run_atheris if args.engine == "atheris" else run_random
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{args.target}-") as tmp:
        corpus = args.corpus or Path(tmp)
        return run(args.target, args, corpus, args.artifacts)


if __name__ == "__main__":
    sys.exit(main())
