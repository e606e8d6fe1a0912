"""Who may reach a broker socket: directory and socket modes, and the SO_PEERCRED allow-lists.

Two gates, both needed on a shared host:

* **The filesystem.** A socket directory is owned by the broker's user and never open to
  others (no ``o`` bits). Without a socket group it is private (0700, socket 0600): only the
  broker's user (and root) can connect. With a socket group (``--socket-group GROUP``) the
  directory is 0750 and the socket 0660, both of that group: members of the group, e.g.
  ``libvirt-qemu`` for QEMU started by libvirt under a stock ``qemu.conf``, can connect. The
  group never gets write permission on the directory (it could replace sockets).
* **The allow-lists**, checked on every accepted connection from the kernel's view of the
  peer (SO_PEERCRED for uid and primary gid, SO_PEERGROUPS for the supplementary groups, as
  they were when the peer called connect): a peer is let in iff no list is configured, or
  its uid is in ``allow_uids``, or its primary or any supplementary gid is in ``allow_gids``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import os
import socket
import stat
import struct

# Linux's SO_PEERGROUPS (asm-generic/socket.h; Python's socket module does not name it).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_NGROUPS_MAX = 65536


def group_name(gid: int) -> str:
    """The name of group `gid`, or the gid as a string when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def peer_groups(sock: socket.socket) -> list[int]:
    """The supplementary gids of the process at the other end of UNIX socket `sock`, as they
    were when it connected (SO_PEERGROUPS). OSError if the kernel cannot tell (before 4.13)."""
    size = 256
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < _NGROUPS_MAX:
                size = _NGROUPS_MAX
                continue
            raise
        return list(struct.unpack(f"{len(raw) // 4}I", raw))


@dataclasses.dataclass(frozen=True)
class AllowList:
    """The allow-lists of one region; None means "not configured"."""

    uids: list[int] | None = None
    gids: list[int] | None = None

    def refusal(self, uid: int, gid: int, groups: list[int]) -> str | None:
        """None if a peer with these credentials may join, else why not (for the log)."""
        if self.uids is None and self.gids is None:
            return None
        if uid in (self.uids or ()):
            return None
        allowed_gids = set(self.gids or ())
        if gid in allowed_gids or allowed_gids.intersection(groups):
            return None
        return (
            f"uid {uid} is not in allow_uids {self.uids or []} and neither gid {gid} nor "
            f"groups {sorted(groups)} are in allow_gids {self.gids or []}"
        )


class SocketDirError(PermissionError):
    """A directory that must not hold broker sockets: `problem` says why, `fix` what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


def check_socket_dir(path: str, group: int | None) -> None:
    """Check that directory `path` may hold broker sockets; never changes anything.

    Without `group`: a directory owned by this effective user with no permission for group
    or others (0700). With `group` (a gid): owned by this user and by `group`, the group
    may enter and list (r-x) but not write, others get nothing (0750).

    Raises SocketDirError (a PermissionError) naming the path, what is wrong and the fix;
    FileNotFoundError (or another OSError of lstat) if it cannot be examined.
    """
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    want = "0750" if group is not None else "0700"
    if not stat.S_ISDIR(st.st_mode):
        raise SocketDirError(f"{path} exists and is not a directory", "use another path")
    if st.st_uid != os.geteuid():
        raise SocketDirError(
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})",
            "use a directory of your own",
        )
    if mode & 0o007:
        raise SocketDirError(
            f"{path} has mode {mode:04o}: every user could reach the sockets",
            f"chmod {want} {path}",
        )
    if mode & 0o020:
        raise SocketDirError(
            f"{path} has mode {mode:04o}: its group could replace the sockets",
            f"chmod {want} {path}",
        )
    name = group_name(st.st_gid)
    if group is None:
        if mode & 0o070:
            raise SocketDirError(
                f"{path} has mode {mode:04o}: group {name} can reach the sockets",
                f"chmod 0700 {path}, or serve with --socket-group {name}",
            )
        return
    if st.st_gid != group:
        raise SocketDirError(
            f"{path} belongs to group {name}, not {group_name(group)}",
            f"chgrp {group_name(group)} {path}",
        )
    if mode & 0o050 != 0o050:
        raise SocketDirError(
            f"{path} has mode {mode:04o}: group {name} cannot enter it", f"chmod 0750 {path}"
        )


def blocked_parent(path: str, group: int) -> str | None:
    """The first directory above `path` that members of `group` cannot enter (no x bit
    for others, nor for the group when it is `group`), or None if they can reach `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(parent)
        except OSError:
            return parent
        if not (st.st_mode & 0o001 or (st.st_gid == group and st.st_mode & 0o010)):
            return parent
        if parent == "/":
            return None
        parent = os.path.dirname(parent)


def ensure_socket_dir(path: str, group: int | None) -> None:
    """Create `path` (0700, parents as needed) if missing, open a private directory of ours
    to `group` (chgrp, 0750) when one is given, then check it (check_socket_dir).

    A directory that already gives access to anyone is never widened or narrowed here: the
    check refuses it. Raises PermissionError (see check_socket_dir) or another OSError.
    """
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    if group is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and not st.st_mode & 0o077:
                os.fchown(fd, -1, group)
                os.fchmod(fd, 0o750)
        finally:
            os.close(fd)
    check_socket_dir(path, group)


def bind_socket(path: str, group: int | None) -> socket.socket:
    """A listening UNIX stream socket bound at `path`: mode 0600, or 0660 and of `group`.

    The socket file is created 0600 and only then given to the group, so nobody outside it
    can connect in between. OSError propagates (the socket is closed then).
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        if group is not None:
            os.chown(path, -1, group, follow_symlinks=False)
            os.chmod(path, 0o660)
        listener.listen(64)
    except BaseException:
        listener.close()
        raise
    return listener
