"""Who may connect to a broker on a shared host: real processes under other uids and gids.

Two gates (host_broker/access.py): the socket directory and socket modes (0700/0600, or
0750/0660 of --socket-group), then the SO_PEERCRED/SO_PEERGROUPS allow-lists. Needs root
to run clients as other users and to give directories away.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_broker.config import ConfigError, config_from_dict
from tests.support.broker import BrokerProcess, cli, unique_name

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other users"),
]

NOGROUP = 65534  # Debian's "nogroup"
OTHER_UID, OTHER_GID, EXTRA_GID, ALLOWED_UID = 4242, 4243, 4244, 4245


def connect_as(path: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> str:
    """Connect to `path` from a forked child running as uid:gid with exactly `groups` as
    supplementary groups, and read the broker's handshake. The outcome: "joined" (its first
    message received), "closed" (the broker hung up) or "EACCES" (the filesystem said no).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(path)
                outcome = "joined" if len(s.recv(8, socket.MSG_WAITALL)) == 8 else "closed"
                # Stay until the broker has sent the whole handshake (a client that hangs up
                # after the first message makes the broker log "handshake failed").
                s.settimeout(0.5)
                try:
                    while s.recv(4096):
                        pass
                except TimeoutError:
                    pass
            except PermissionError:
                outcome = "EACCES"
            who = (os.getuid(), os.getgid(), sorted(os.getgroups()))
            os.write(w, f"{who}|{outcome}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    who, outcome = report.split("|")
    assert who == str((uid, gid, sorted(groups)))
    return outcome


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700 all the way up)."""
    path = Path(tempfile.mkdtemp(prefix="ivb-perm-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def brokers() -> Iterator[list[BrokerProcess]]:
    made: list[BrokerProcess] = []
    yield made
    for b in made:
        b.cleanup()


def serve(base: Path, brokers: list[BrokerProcess], *flags: str) -> BrokerProcess:
    b = BrokerProcess(base, None, *flags).start()
    brokers.append(b)
    return b


def mode_and_group(path: str | Path) -> tuple[int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_private_by_default(base: Path, brokers: list[BrokerProcess]) -> None:
    b = serve(base, brokers)
    assert mode_and_group(b.state_dir)[0] == 0o700
    assert mode_and_group(b.socket)[0] == 0o600
    assert connect_as(b.socket, OTHER_UID, NOGROUP) == "EACCES"
    assert connect_as(b.socket, os.geteuid(), os.getegid()) == "joined"


def test_socket_group_lets_its_members_in(base: Path, brokers: list[BrokerProcess]) -> None:
    b = serve(base, brokers, "--socket-group", "nogroup")
    assert mode_and_group(b.state_dir) == (0o750, NOGROUP)
    assert mode_and_group(b.socket) == (0o660, NOGROUP)
    assert connect_as(b.socket, OTHER_UID, NOGROUP) == "joined"  # primary group
    assert connect_as(b.socket, OTHER_UID, OTHER_GID, (NOGROUP,)) == "joined"  # supplementary
    assert connect_as(b.socket, OTHER_UID, OTHER_GID) == "EACCES"  # not a member
    assert b.log().count("joined") == 2


def test_allow_lists_by_uid_and_by_gid(base: Path, brokers: list[BrokerProcess]) -> None:
    b = serve(
        base, brokers, "--socket-group", str(NOGROUP), "--allow-gid", str(EXTRA_GID),
        "--allow-uid", str(ALLOWED_UID),
    )  # fmt: skip
    # in the socket group, so past the filesystem, but in neither list: hung up on
    assert connect_as(b.socket, OTHER_UID, NOGROUP) == "closed"
    assert f"uid {OTHER_UID} is not in allow_uids [{ALLOWED_UID}]" in b.log()
    assert connect_as(b.socket, OTHER_UID, NOGROUP, (EXTRA_GID,)) == "joined"  # SO_PEERGROUPS
    assert connect_as(b.socket, ALLOWED_UID, NOGROUP) == "joined"
    assert connect_as(b.socket, OTHER_UID, EXTRA_GID) == "EACCES"  # allowed, but not let in


def test_an_existing_private_dir_is_opened_to_the_group(
    base: Path, brokers: list[BrokerProcess]
) -> None:
    state = base / "state"
    state.mkdir(mode=0o700)
    b = serve(base, brokers, "--socket-group", "nogroup")
    assert Path(b.state_dir) == state and mode_and_group(state) == (0o750, NOGROUP)
    assert connect_as(b.socket, OTHER_UID, NOGROUP) == "joined"


@pytest.mark.parametrize(
    ("mode", "gid", "owner", "flags", "expect"),
    [
        (0o755, 0, 0, (), "every user could reach the sockets; chmod 0700"),
        (0o750, 0, 0, (), "group root can reach the sockets"),
        (0o770, NOGROUP, 0, ("--socket-group", "nogroup"), "its group could replace"),
        (0o750, 0, 0, ("--socket-group", "nogroup"), "belongs to group root, not nogroup"),
        (0o700, 0, OTHER_UID, (), f"owned by uid {OTHER_UID}, not by this user"),
        (0o751, NOGROUP, 0, ("--socket-group", "nogroup"), "every user could reach"),
    ],
)
def test_unsafe_socket_dirs_are_refused(
    base: Path, mode: int, gid: int, owner: int, flags: tuple[str, ...], expect: str
) -> None:
    state = base / "state"
    state.mkdir()
    os.chown(state, owner, gid)
    os.chmod(state, mode)
    name = unique_name()
    r = cli("serve", "--name", name, "--size", "4M", "--state-dir", str(state), *flags)
    assert r.returncode == 1 and expect in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert mode_and_group(state) == (mode, gid)  # left as it was
    assert os.listdir(state) == []
    assert not os.path.exists(f"/dev/shm/{name}")


def test_group_that_cannot_reach_the_dir_is_warned_about(
    base: Path, brokers: list[BrokerProcess]
) -> None:
    os.chmod(base, 0o700)
    b = serve(base, brokers, "--socket-group", "nogroup")
    assert f"group nogroup cannot enter {base}" in b.log()
    assert connect_as(b.socket, OTHER_UID, NOGROUP) == "EACCES"
    r = cli("doctor", "--state-dir", str(b.state_dir), "--socket-group", "nogroup")
    assert f"group nogroup cannot enter {base}" in r.stdout and "fix: chmod o+x" in r.stdout


def test_toml_socket_group_and_allow_gids() -> None:
    config = config_from_dict(
        {"socket_group": "nogroup", "allow_gids": [7], "region": [
            {"name": "a", "size": "4M", "allow_gids": []}, {"name": "b", "size": "4M"}]}
    )  # fmt: skip
    assert config.socket_group == NOGROUP
    a, b = config.regions
    assert config.region_allow_gids(a) == [] and config.region_allow_gids(b) == [7]
    assert config_from_dict({"socket_group": 4300}).socket_group == 4300
    with pytest.raises(ConfigError, match="socket_group: no group named 'no-such-group-x'"):
        config_from_dict({"socket_group": "no-such-group-x"})
    with pytest.raises(ConfigError, match=r"allow_gids\[0\]"):
        config_from_dict({"allow_gids": ["x"]})
