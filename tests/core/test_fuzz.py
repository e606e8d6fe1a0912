"""Fuzzing in CI: each target of tools.fuzz for a few seconds, plus the inputs it found.

`python -m tools.fuzz TARGET` (atheris where installed, else random mutations) runs as a real
subprocess and must end without a crash or a hang; longer runs are by hand (README,
"Reliability tools"). Inputs that crashed a target once are replayed here: fixed ones must
now give documented errors only; reported ones that are not fixed yet (targets.KNOWN) are
strict xfails, so the fix turns them into failures that ask for the entry to be removed.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import zlib

import pytest

from tests.support.broker import ENV, ROOT
from tools.fuzz import targets

SECONDS = 4  # per target: five targets, under a minute of CI with the start-ups
SEED = 1  # fixed, so that CI explores the same inputs each run; long runs by hand are random


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_target_runs_clean(name, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tools.fuzz", name, "--seconds", str(SECONDS), "--input-timeout",
         "5", "--seed", str(SEED), "--skip-known", "--artifacts", str(tmp_path)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=100,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    runs = re.search(r"Done (\d+) runs", output)
    assert runs and int(runs.group(1)) >= 20, output[-3000:]
    assert not list(tmp_path.iterdir()), "crash or timeout inputs were written"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_native_build_fuzzes_the_c_fast_path(tmp_path):
    """--native: the ring target runs on a clang build of _fastpath.c with coverage and ASan
    (tools.fuzz.native checks that the rings use that build, else the run exits 2)."""
    if shutil.which("clang") is None:
        if os.environ.get("IVSHMEM_REQUIRE_CLANG") == "1":
            pytest.fail("IVSHMEM_REQUIRE_CLANG=1 but clang is not installed")
        pytest.skip("clang is not installed (make system-deps installs it)")
    done = subprocess.run(
        [sys.executable, "-m", "tools.fuzz", "ring", "--native", "--seconds", str(SECONDS),
         "--seed", str(SEED), "--artifacts", str(tmp_path)],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=200,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "native: C fast path with coverage and ASan" in output, output[-3000:]
    counters = re.search(r"Loaded 1 modules\s+\((\d+) inline 8-bit counters\)", output)
    assert counters and int(counters.group(1)) > 100, output[-3000:]  # the C module's edges
    runs = re.search(r"Done (\d+) runs", output)
    assert runs and int(runs.group(1)) >= 20, output[-3000:]
    assert not list(tmp_path.iterdir()), "crash or timeout inputs were written"


def replay(name: str, data: bytes) -> None:
    function, allowed, _ = targets.TARGETS[name]
    try:
        function(data)
    except allowed:
        pass


# Inputs that crashed a target, fixed since: each must now end in a documented error only.
FIXED = [
    # host_broker.config.load_config: a file that is not UTF-8 raised UnicodeDecodeError
    ("config", b'[[region]]\nname = "b"\n[[region]]\nnaegion]]\n\nsi\xffsiz/ = 2047z'),
    # engine.dispatch: a CONTROL/ACK message whose payload is not 8 bytes -> struct.error
    ("mpi_wire", b"\x01" + (3 << 29).to_bytes(4, "little") + b"\x03abc"),
    # the protocol target's hostile writer blocked on a full socket buffer (a hang, 5 s)
    (
        "protocol",
        zlib.decompress(
            base64.b64decode(
                "eNpjYGRgYLACYgZGVgYwCAECBvqBNWvWsDIYMjwbDKYQArzA0EHi0ty+4RBgOAAA3XEPlw=="
            )
        ),
    ),
    # the target itself closed an fd twice: ClientDecoder.feed closes it on a bad peer id
    (
        "protocol",
        base64.b64decode("AAEAAAAAAAAAAAEFAAAAAAAAAAb//////////8QFJgAAAAAAAAAAJgABAAADAAAANQ=="),
    ),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("name", "data"), FIXED)
def test_fixed_crash_inputs(name, data):
    replay(name, data)


def test_config_that_is_not_utf8_is_a_config_error(tmp_path):
    from host_broker.config import ConfigError, load_config

    path = tmp_path / "broker.toml"
    path.write_bytes(b'[[region]]\nname = "caf\xe9"\nsize = "64M"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path))


@pytest.mark.parametrize("name", ["ACK", "SYNC"])
@pytest.mark.parametrize("size", [0, 3, 9])
def test_control_message_of_a_wrong_size_names_its_rank(make_region, name, size):
    """An ACK or SYNC whose payload is not a sequence number is an MPI error naming the rank
    that sent it, not a struct.error out of the receiver's progress loop."""
    from guest_lib.mpi import exceptions as mpi_exceptions
    from guest_lib.mpi import wire
    from guest_lib.mpi.engine import Engine
    from guest_lib.mpi.routes import SelfRoute, ShmRoute

    region = make_region(1 << 20, 2)
    with region.endpoint(0) as ep0, region.endpoint(1) as ep1:
        engine = Engine(0, 2, ep0, [SelfRoute(), ShmRoute(1)])
        kind_tag = getattr(wire, f"CTRL_{name}")
        ep1.send(0, bytes(size), tag=wire.core_tag(wire.KIND_CONTROL, 0, kind_tag))
        with pytest.raises(mpi_exceptions.Exception, match=rf"world rank 1 .*sent a {name} of"):
            for _ in range(100):
                engine.progress()


def test_abandon_carries_its_error_class_and_a_foreign_class_names_its_rank(make_region):
    """An ABANDON passes the fault-tolerance class its sender met on to the others' waiting
    receives (ULFM: a survivor learning of a failure from another survivor still sees
    ERR_PROC_FAILED, not ERR_OTHER); a class outside wire.ABANDON_CLASSES is an MPI error
    naming the rank that sent it."""
    from guest_lib.mpi import exceptions as mpi_exceptions
    from guest_lib.mpi import wire
    from guest_lib.mpi.engine import Engine
    from guest_lib.mpi.matching import RecvOp
    from guest_lib.mpi.routes import SelfRoute, ShmRoute

    base = wire.coll_base(0)
    good = wire.encode_abandon(3, 0, 0, base, wire.COLL_SPAN, mpi_exceptions.ERR_PROC_FAILED, "x")
    assert wire.decode_abandon(good, "rank 1").error == mpi_exceptions.ERR_PROC_FAILED
    region = make_region(1 << 20, 2)
    with region.endpoint(0) as ep0, region.endpoint(1) as ep1:
        engine = Engine(0, 2, ep0, [SelfRoute(), ShmRoute(1)])
        waiting = engine.post(RecvOp(3, 1, base, memoryview(bytearray(8)), None, 1))
        tag = wire.core_tag(wire.KIND_CONTROL, 0, wire.CTRL_ABANDON)
        ep1.send(0, good, tag=tag)
        for _ in range(100):
            engine.progress()
        assert waiting.done and waiting.error == mpi_exceptions.ERR_PROC_FAILED
        bad = wire.encode_abandon(3, 0, 1, base, wire.COLL_SPAN, mpi_exceptions.ERR_TRUNCATE, "x")
        ep1.send(0, bad, tag=tag)
        with pytest.raises(mpi_exceptions.Exception, match=r"world rank 1 .*error class 14"):
            for _ in range(100):
                engine.progress()
