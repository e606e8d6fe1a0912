"""What `ivshmem-lab` says when asked for something its guests cannot do: run a program they
cannot see (their /tmp, /run and /dev/shm are their own), or attach to a region they were not
given. The first is refused before any guest boots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ivshmem_lab.cli import invisible_path
from tests.support import vm_test

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _lab(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmem_lab.cli", *args],
        cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def hidden_program(tmp_path: Path) -> Path:
    """An executable under the host's /tmp (pytest's tmp_path), outside the project."""
    assert str(tmp_path).startswith("/tmp/")
    program = tmp_path / "bin" / "hello"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\necho hello\n")
    program.chmod(0o755)
    return program


@pytest.mark.parametrize("form", ["run", "mpiexec"])
def test_a_program_under_tmp_is_refused_naming_it(hidden_program: Path, form: str) -> None:
    done = _lab(form, "--vms", "1", "--", str(hidden_program))
    assert done.returncode == 2, done.stderr
    assert f"{hidden_program} is not visible in the lab guests" in done.stderr
    assert "/tmp is a fresh tmpfs" in done.stderr and "boot" not in done.stderr


def test_a_program_found_on_path_under_tmp_is_refused(hidden_program: Path) -> None:
    env = {**ENV, "PATH": f"{hidden_program.parent}{os.pathsep}{ENV['PATH']}"}
    done = _lab("run", "--vms", "1", "--", "hello", env=env)
    assert done.returncode == 2 and f"{hidden_program} is not visible" in done.stderr


def test_a_host_file_under_tmp_named_as_an_argument_is_refused(hidden_program: Path) -> None:
    done = _lab("run", "--vms", "1", "--", "sh", str(hidden_program))
    assert done.returncode == 2 and f"{hidden_program} is not visible" in done.stderr


def test_the_working_directorys_folder_in_tmp_is_shared(hidden_program: Path) -> None:
    top = "/" + "/".join(hidden_program.parts[1:3])  # /tmp/<first folder>
    assert invisible_path([str(hidden_program)], top) is None
    assert invisible_path([str(hidden_program)], str(ROOT)) is not None
    assert invisible_path(["sh", "-c", "echo > /tmp/new"], str(ROOT)) is None


ATTACH = "import guest_lib; ep = guest_lib.attach(); print('attached', ep.region.max_peers)"


@vm_test(300)
@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm_pair  # one guest; looks only at its own output and its own region
def test_run_serves_the_guests_a_region_by_default() -> None:
    """Without --socket/--shm the guests get a region a broker serves for the run: attach()
    works in them; the broker and the region are gone after."""
    done = _lab("run", "--vms", "1", "--", sys.executable, "-c", ATTACH)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[vm0] attached 2" in done.stdout
    name = done.stderr.split("serving region ", 1)[1].split()[0]
    assert name.startswith("labrun-") and not os.path.exists(f"/dev/shm/{name}")


@vm_test(300)
@pytest.mark.full  # CI (test-all) only; make test boots guests in test_mpi_vm and test_lab
@pytest.mark.vm_pair  # one guest; looks only at its own output
def test_attach_in_a_guest_without_a_region_names_the_flags() -> None:
    done = _lab("run", "--vms", "1", "--no-region", "--", sys.executable, "-c", ATTACH)
    assert done.returncode == 1
    assert "this lab guest has none: give ivshmem-lab run --socket PATH or --shm" in done.stdout


@pytest.mark.parametrize("other", [["--socket", "/nonexistent.sock"], ["--shm", "x"], ["-n"]])
def test_no_region_with_a_region_flag_is_refused_before_boot(other: list[str]) -> None:
    done = _lab("run", "--vms", "1", "--no-region", *other, "--", "true")
    assert done.returncode == 2, done.stderr
    assert "--no-region goes with neither --shm, --socket nor -n" in done.stderr
    assert "guest(s)" not in done.stderr  # refused before the lab started


@pytest.mark.parametrize("form", ["up", "mpiexec"])
@pytest.mark.parametrize("hosts", ["0", "3"])
def test_more_hosts_than_guests_is_refused_before_boot(form: str, hosts: str) -> None:
    command = ["--", "true"] if form == "mpiexec" else []
    done = _lab(form, "--vms", "2", "--hosts", hosts, *command)
    assert done.returncode == 2, done.stderr
    assert "--hosts" in done.stderr and "guest(s)" not in done.stderr
