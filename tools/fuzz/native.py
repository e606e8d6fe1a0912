"""The C fast path built for the fuzzer: coverage counters and AddressSanitizer.

`python -m tools.fuzz TARGET --native` compiles `ivshmem_comm/_fastpath.c` and `_typepack.c`
with clang (`-fsanitize=fuzzer-no-link,address`) into a temporary directory, then runs the
target in a new process that preloads atheris's libFuzzer + ASan runtime (`LD_PRELOAD`, as
atheris documents for native extensions) and imports that build as `ivshmem_comm._fastpath`.
libFuzzer then steers by the edges of the C code as well as the Python's, and an out-of-bounds
access in C is reported as a crash (with its input) instead of corrupting memory silently."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

_CORE = Path(__file__).resolve().parents[2] / "ivshmem_comm"
# the module's sources (setup.py's)
SOURCES = [
    _CORE / "_fastpath.c",
    _CORE / "_typepack.c",
    _CORE / "_memexport.c",
    _CORE / "_p2preq.c",
]
MODULE = "ivshmem_comm._fastpath"
BUILD_ENV = "IVSHMEM_FUZZ_NATIVE_BUILD"  # set in the child: the instrumented module's path
ASAN_OPTIONS = "detect_leaks=0:allocator_may_return_null=1:quarantine_size_mb=64"


class NativeBuildError(Exception):
    """The instrumented build cannot be made here (no clang, no atheris, compile error)."""


def build(directory: Path) -> Path:
    """Compile the instrumented fast path into `directory`; return the module's path.

    Raises NativeBuildError without clang or when the compile fails (its output included)."""
    clang = shutil.which("clang")
    if clang is None:
        raise NativeBuildError("--native needs clang (apt-get install clang)")
    out = directory / ("_fastpath" + sysconfig.get_config_var("EXT_SUFFIX"))
    command = [
        clang, "-shared", "-fPIC", "-O1", "-g", "-std=c11", "-fno-omit-frame-pointer",
        "-fsanitize=fuzzer-no-link,address", f"-I{sysconfig.get_paths()['include']}",
        *map(str, SOURCES), "-o", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise NativeBuildError(f"clang failed:\n{done.stdout}{done.stderr}")
    return out


def child_environ(module: Path) -> dict[str, str]:
    """The environment of a fuzzing process that uses the instrumented `module`. Raises
    NativeBuildError when atheris (whose runtime is preloaded) is not installed."""
    try:
        import atheris
    except ImportError:
        raise NativeBuildError("--native needs atheris (pip install atheris)") from None
    runtime = Path(atheris.path()) / "asan_with_fuzzer.so"
    if not runtime.exists():
        raise NativeBuildError(f"atheris has no {runtime.name}: cannot preload its ASan runtime")
    environ = {**os.environ, "LD_PRELOAD": str(runtime), "ASAN_OPTIONS": ASAN_OPTIONS}
    environ[BUILD_ENV] = str(module)
    environ.pop("IVSHMEM_COMM_PUREPYTHON", None)  # the point is the C path
    return environ


class _InstrumentedFinder(importlib.abc.MetaPathFinder):
    """Answers `ivshmem_comm._fastpath` with the instrumented build, whoever imports it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != MODULE:
            return None
        return importlib.util.spec_from_file_location(fullname, self.path)


def load_requested() -> Path | None:
    """In a process started with child_environ: make the instrumented build the one every
    import of `ivshmem_comm._fastpath` gets, and import `ivshmem_comm` (call it where the
    Python code is to be instrumented too). Returns the build's path, or None when this
    process was not started for --native. Raises NativeBuildError if the fast path was
    imported already (its uninstrumented copy would stay in use)."""
    path = os.environ.get(BUILD_ENV)
    if not path:
        return None
    if MODULE in sys.modules:
        raise NativeBuildError(f"{MODULE} was imported before the instrumented build")
    sys.meta_path.insert(0, _InstrumentedFinder(path))
    import ivshmem_comm.ring

    loaded = getattr(sys.modules[MODULE], "__file__", None)
    if loaded != path or ivshmem_comm.ring.TxRing.__module__ != MODULE:
        raise NativeBuildError(f"the rings use {loaded}, not the instrumented {path}")
    return Path(path)
