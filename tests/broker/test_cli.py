"""`ivshmem-broker` as a user runs it: real subprocesses of the CLI against real brokers."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_lib.host_client import BrokerClient
from tests.support.broker import ENV, ROOT, BrokerProcess, cli, unique_name

pytestmark = pytest.mark.timeout(120)

COMMANDS = ("serve", "status", "qemu-args", "libvirt-xml", "destroy", "supervise", "doctor")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path).start()
    yield b
    b.cleanup()


def assert_one_line_error(r: subprocess.CompletedProcess[str], *expect: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ivshmem-broker: "), r.stderr
    assert r.stdout == ""
    for text in expect:
        assert text in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        ([], "required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["status", "no-such-region-x"], "no region 'no-such-region-x'"),
        (["status", "../etc"], "bad region name"),
        (["status", "--watch", "--interval", "0"], "--interval: must be > 0"),
        (["status", "--watch", "--count", "x"], "--count: not a number"),
        (["qemu-args", "no-such-region-x"], "no region 'no-such-region-x'"),
        (["qemu-args"], "required: name"),
        (["libvirt-xml", "no-such-region-x"], "no region 'no-such-region-x'"),
        (["libvirt-xml", "x", "--vectors", "0"], "--vectors: must be > 0"),
        (["destroy", "no-such-region-x"], "no region 'no-such-region-x'"),
        (["serve"], "no region to serve"),
        (["serve", "--size", "4M"], "--size needs --name"),
        (["serve", "--name", "x", "--max-peers", "many"], "invalid int value: 'many'"),
        (["serve", "--name", "x", "--size", "12Q"], "config: --name.size"),
        (["serve", "--name", "x", "--size", "4M", "--socket-group", "no-such-group-x"],
         "no group named 'no-such-group-x'"),
        (["serve", "--name", "x", "--size", "4M", "--allow-gid", "no-such-group-x"],
         "config: --allow-gid"),
        (["serve", "--config", "/nonexistent/broker.toml"], "cannot read /nonexistent"),
        (["serve", "--name", "x", "--size", "4M", "--state-dir", "/proc/1/nope"], "/proc/1/nope"),
        (["serve", "--name", "x", "--size", "4M", "--fd-store"], "--fd-store needs a service"),
        (["supervise"], "supervise runs a broker"),
        (["supervise", "--", "status"], "supervise runs a broker"),
        (["doctor", "--socket-group", "no-such-group-x"], "no group named"),
        (["doctor", "--bogus"], "unrecognized arguments"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_1(argv: list[str], expect: str) -> None:
    assert_one_line_error(cli(*argv), expect)


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[region]\nname=")
    assert_one_line_error(cli("serve", "--config", str(bad)), "is not valid TOML")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    r = cli("serve", "--name", unique_name(), "--size", "4M", "--state-dir", str(not_a_dir))
    assert_one_line_error(r, str(not_a_dir))


def test_unknown_region_names_those_that_exist(broker: BrokerProcess) -> None:
    for command in ("status", "qemu-args", "libvirt-xml", "destroy"):
        r = cli(command, "no-such-region-x", "--state-dir", str(broker.state_dir))
        assert_one_line_error(r, "regions here:", broker.name)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_state_dir_and_examples(command: str) -> None:
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "--state-dir" in r.stdout
    examples = r.stdout.split("\nexamples:\n", 1)[1]
    assert f"ivshmem-broker {command}" in examples


def test_state_dir_flag_and_environment(broker: BrokerProcess, tmp_path: Path) -> None:
    """Every command finds the broker's record through --state-dir or $IVSHMEM_BROKER_DIR;
    without either it looks elsewhere (the default) and does not see this broker's socket."""
    state = str(broker.state_dir)
    by_flag = cli("qemu-args", broker.name, "--state-dir", state)
    assert by_flag.returncode == 0, by_flag.stderr
    assert f"path={broker.socket}" in by_flag.stdout
    env = {**ENV, "IVSHMEM_BROKER_DIR": state}
    by_env = subprocess.run(
        [sys.executable, "-m", "host_broker", "qemu-args", broker.name],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert by_env.stdout == by_flag.stdout
    elsewhere = cli("qemu-args", broker.name, "--state-dir", str(tmp_path / "other"))
    assert f"path={broker.socket}" not in elsewhere.stdout
    for command in ("status", "libvirt-xml"):
        r = cli(command, broker.name, "--state-dir", state)
        assert r.returncode == 0, r.stderr
    r = cli("doctor", "--state-dir", state, "--json")
    checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
    assert state in checks["state-dir"]["detail"]


def test_json_on_every_read_command(broker: BrokerProcess) -> None:
    state = ("--state-dir", str(broker.state_dir))
    with BrokerClient(broker.socket):
        status = json.loads(cli("status", broker.name, "--json", *state).stdout)
    (info,) = status["regions"]
    assert info["name"] == broker.name and info["peers"][0]["state_name"] == "joining"
    args = json.loads(cli("qemu-args", broker.name, "--json", *state).stdout)
    assert args["socket"] == broker.socket and args["vectors"] == 2
    assert args["args"][:2] == ["-chardev", f"socket,path={broker.socket},id=ivshmem_" + (
        broker.name.replace("-", "_"))]  # fmt: skip
    xml = json.loads(cli("libvirt-xml", broker.name, "--json", *state).stdout)
    assert xml["xml"].startswith(f"<shmem name='{broker.name}'>") and "<size" not in xml["xml"]
    plain = json.loads(cli("libvirt-xml", broker.name, "--plain", "--json", *state).stdout)
    assert f"<size unit='B'>{4 << 20}</size>" in plain["xml"] and plain["plain"] is True
    doctor = json.loads(cli("doctor", "--json", *state).stdout)
    assert {c["check"] for c in doctor["checks"]} == {
        "qemu", "kvm", "shm", "state-dir", "libvirt", "hugepages"
    }  # fmt: skip
    assert all(c["status"] in ("ok", "info", "warn", "fail") for c in doctor["checks"])


def _traffic(broker: BrokerProcess, stop: threading.Event) -> Iterator[None]:
    """Two host peers of `broker` exchanging small messages until `stop` is set."""
    with BrokerClient(broker.socket) as c1, BrokerClient(broker.socket) as c2:
        a, b = c1.endpoint(), c2.endpoint()

        def pump() -> None:
            while not stop.is_set():
                a.send(c2.peer_id, b"x" * 100)
                with b.recv(source=c1.peer_id):
                    pass

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join(10)
        a.close()
        b.close()


def test_status_watch_redraws_in_place_with_rates(broker: BrokerProcess) -> None:
    """On a terminal, --watch clears and redraws: peers, counters and per-queue rates."""
    stop = threading.Event()
    traffic = _traffic(broker, stop)
    next(traffic)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "host_broker", "status", broker.name, "--watch",
             "--interval", "0.3", "--count", "3"],
            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
        )  # fmt: skip
        os.close(slave)
        out = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(master)
        stop.set()
        next(traffic, None)
    text = out.decode()
    frames = text.split("\x1b[H\x1b[2J")
    assert frames[0] == "" and len(frames) == 4, text  # 3 frames, each after a clear
    assert all(f"region {broker.name}" in f and "peer   1" in f for f in frames[1:])
    assert "msg/s" not in frames[1]  # no rate before a second sample
    last = frames[3]
    assert "queue 0->1: sent" in last and "msg/s" in last and "B/s" in last


def test_status_watch_json_lines_off_a_terminal(broker: BrokerProcess) -> None:
    stop = threading.Event()
    traffic = _traffic(broker, stop)
    next(traffic)
    try:
        r = cli("status", broker.name, "--watch", "--json", "--interval", "0.3", "--count", "2")
    finally:
        stop.set()
        next(traffic, None)
    assert r.returncode == 0, r.stderr
    first, second = (json.loads(line) for line in r.stdout.splitlines())
    assert "\x1b" not in r.stdout
    queue = next(q for q in second["regions"][0]["queues"] if (q["src"], q["dst"]) == (0, 1))
    assert first["regions"][0]["queues"][0]["rates"] is None
    assert queue["rates"]["sent_messages_per_s"] > 0 and queue["rates"]["sent_bytes_per_s"] > 0


def test_doctor_says_what_to_fix(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    env = {**ENV, "PATH": str(empty_path)}
    r = subprocess.run(
        [sys.executable, "-m", "host_broker", "doctor", "--state-dir", str(loose)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "fail  qemu       qemu-system-x86_64 not found in PATH" in r.stdout
    assert "fix: apt-get install qemu-system-x86" in r.stdout
    assert f"fail  state-dir  {loose} has mode 0755" in r.stdout
    assert f"fix: chmod 0700 {loose}" in r.stdout
    assert "check(s) failed: qemu, state-dir" in r.stdout


@pytest.mark.skipif(not os.path.exists("/usr/bin/qemu-system-x86_64"), reason="no QEMU")
def test_doctor_passes_on_a_good_host(tmp_path: Path) -> None:
    r = cli("doctor", "--json", "--state-dir", str(tmp_path / "state"))
    report = json.loads(r.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["qemu"]["status"] == "ok" and "ivshmem-doorbell" in checks["qemu"]["detail"]
    assert checks["state-dir"]["status"] == "ok"
    assert report["ok"] == (r.returncode == 0)
