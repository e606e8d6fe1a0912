"""Host-only tests of the lab's LAN hub (ivshmem_lab.net) and exec transport
(ivshmem_lab.exec_agent): real sockets and a real agent process on 127.0.0.1, no QEMU."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ivshmem_lab.exec_agent import (
    HELLO,
    STDOUT,
    TOKEN_ENV,
    parse_ssh_argv,
    read_frame,
    run_in_guest,
    write_frame,
)
from ivshmem_lab.net import FrameReader, LanHub, encode_frame, hosts_file, lan_address

MAC = [bytes([0x52, 0x54, 0, 0, 0, i]) for i in range(3)]
BROADCAST = b"\xff" * 6


def _frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x08\x00" + payload


def test_frame_reader_splits_and_rejects() -> None:
    reader = FrameReader(max_frame=100)
    stream = encode_frame(b"a" * 20) + encode_frame(b"b" * 3)
    assert list(reader.feed(stream[:5])) == []
    assert list(reader.feed(stream[5:26])) == [b"a" * 20]
    assert list(reader.feed(stream[26:])) == [b"b" * 3]
    with pytest.raises(ValueError):
        list(FrameReader(max_frame=100).feed(encode_frame(b"x" * 101)))
    with pytest.raises(ValueError):
        list(FrameReader().feed(b"\0\0\0\0"))


def test_addresses_and_hosts_file() -> None:
    assert lan_address(0) == "10.0.3.10" and lan_address(5) == "10.0.3.15"
    text = hosts_file(2)
    assert "10.0.2.2\tlab-host" in text and "10.0.3.11\tvm1" in text
    with pytest.raises(ValueError):
        lan_address(200)


def _recv_frames(sock: socket.socket, timeout: float = 0.5) -> list[bytes]:
    sock.settimeout(timeout)
    reader, frames = FrameReader(), []
    try:
        while data := sock.recv(65536):
            frames += reader.feed(data)
    except TimeoutError:
        pass
    return frames


def test_hub_floods_then_learns(tmp_path: Path) -> None:
    with LanHub(str(tmp_path / "lan.sock")).start() as hub:
        assert os.stat(hub.path).st_mode & 0o077 == 0
        ports = [socket.socket(socket.AF_UNIX) for _ in range(3)]
        for s in ports:
            s.connect(hub.path)
        time.sleep(0.2)  # the hub accepts asynchronously
        hello = _frame(BROADCAST, MAC[0], b"who has")
        ports[0].sendall(encode_frame(hello))
        assert _recv_frames(ports[1]) == [hello] and _recv_frames(ports[2]) == [hello]
        reply = _frame(MAC[0], MAC[1], b"me")  # unicast to a learned MAC: port 0 only
        ports[1].sendall(encode_frame(reply))
        assert _recv_frames(ports[0]) == [reply] and _recv_frames(ports[2]) == []
        unknown = _frame(bytes([0x52, 0x54, 0, 0, 0, 9]), MAC[1], b"?")  # unknown: flooded
        ports[1].sendall(encode_frame(unknown))
        assert _recv_frames(ports[0]) == [unknown] and _recv_frames(ports[2]) == [unknown]
        ports[2].sendall(b"\0\0\0\0")  # a zero length frame: the hub drops that port
        ports[2].settimeout(2)
        assert ports[2].recv(10) == b""
        assert hub.stats["frames"] == 5
        for s in ports:
            s.close()
    assert not os.path.exists(hub.path)


def test_parse_ssh_argv() -> None:
    hydra = ["-x", "vm1", '"/venv/bin/hydra_pmi_proxy"', "--control-port", "lab-host:4000"]
    assert parse_ssh_argv(hydra) == ("vm1", hydra[2:], False)
    ssh = ["-o", "BatchMode=yes", "-p22", "-nT", "me@vm0", "true"]
    assert parse_ssh_argv(ssh) == ("vm0", ["true"], True)
    ssh = ["-oX=1", "-l", "root", "--", "vm2", "a", "b"]
    assert parse_ssh_argv(ssh) == ("vm2", ["a", "b"], False)
    with pytest.raises(ValueError):
        parse_ssh_argv(["-x", "-o", "A=b"])


@pytest.fixture
def agent(tmp_path: Path):
    """A real agent on 127.0.0.1 and a lab directory naming it as guest vm0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = os.urandom(32).hex()
    env = dict(os.environ, **{TOKEN_ENV: token})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ivshmem_lab.exec_agent", "agent", "--listen", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("ivshmem-lab-agent: ready"), proc.poll()
        lab = tmp_path / "lab"
        lab.mkdir(mode=0o700)
        (lab / "token").write_text(token + "\n")
        (lab / "lab.json").write_text(
            json.dumps({"name": "t", "pid": os.getpid(), "ports": {"vm0": port}})
        )
        yield lab, port
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_exec_streams_and_exit_status(agent) -> None:
    lab, _ = agent
    r, w = os.pipe()
    os.write(w, b"some input\n")
    os.close(w)
    out, err = io.BytesIO(), io.BytesIO()
    try:
        code = run_in_guest(lab, "vm0", ["sh", "-c", "cat; echo oops >&2; exit 5"],
                            stdin=r, stdout=out, stderr=err)  # fmt: skip
    finally:
        os.close(r)
    assert (code, out.getvalue(), err.getvalue()) == (5, b"some input\n", b"oops\n")
    err = io.BytesIO()
    assert run_in_guest(lab, "vm0", ["/nonexistent"], stderr=err) == 127
    assert b"cannot run /nonexistent" in err.getvalue()
    err = io.BytesIO()
    assert run_in_guest(lab, "vm9", ["true"], stderr=err) == 255
    assert b"no guest 'vm9'" in err.getvalue()


def test_exec_refuses_a_wrong_token(agent) -> None:
    lab, _ = agent
    (lab / "token").write_text("0" * 64 + "\n")
    err = io.BytesIO()
    assert run_in_guest(lab, "vm0", ["touch", str(lab / "ran")], stderr=err) == 255
    assert err.getvalue() == b"ivshmem-lab agent: permission denied\n"
    assert not (lab / "ran").exists()


def test_dropped_connection_kills_the_command(agent) -> None:
    lab, port = agent
    token = (lab / "token").read_text().strip()
    with socket.create_connection(("127.0.0.1", port)) as s:
        hello = {"token": token, "argv": ["sh", "-c", "echo $$; exec sleep 60"], "cwd": "/"}
        write_frame(s, HELLO, json.dumps(hello).encode())
        kind, payload = read_frame(s)
        assert kind == STDOUT
        pid = int(payload)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")  # killed, and reaped by the agent
