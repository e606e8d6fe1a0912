"""Facts about this host's processes and directories, checked the same way by every package.

* Process liveness: :func:`pid_alive` is the one answer to "does process `pid` still run
  here?"; :func:`process_start_ns` says when a process started (to tell a reused pid).
* Private directories: :func:`ensure_private_dir` makes or checks a 0700 directory of this
  user (the broker's state directory, the lab's state directory).

Linux only: both read ``/proc`` (present in every guest and host this project runs on).
"""

from __future__ import annotations

import contextlib
import os
import stat

__all__ = ["START_SLACK_NS", "ensure_private_dir", "pid_alive", "process_start_ns"]

#: How much later than a recorded time a process may have started and still be the one
#: recorded: /proc/stat's boot time has 1 s resolution, so start times are that coarse.
START_SLACK_NS = 2_000_000_000


def _boot_time_ns() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1]) * 1_000_000_000
    raise OSError("no btime in /proc/stat")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None if there is no such process."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain ") ".
    return raw[raw.rindex(")") + 2 :].split()


def process_start_ns(pid: int) -> int | None:
    """CLOCK_REALTIME time (ns, about 1 s precision) at which process `pid` started, or None
    if no process has that id here (a zombie still has one: it has not been reaped)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    ticks = int(fields[19])  # field 22 of proc(5), counted from field 3
    return _boot_time_ns() + ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int, *, started_by_ns: int | None = None) -> bool:
    """True iff process `pid` runs in this PID namespace: it exists and is not a zombie
    (a process that has exited but is not reaped yet counts as gone). With `started_by_ns`
    (a CLOCK_REALTIME time, e.g. when the process joined a region; 0 or None: unknown, not
    checked), a process that started more than START_SLACK_NS after it is another one that
    reused the pid: False.

    A pid <= 0 is never alive. Works for processes of any user (no signal is sent).
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    if started_by_ns:
        started = process_start_ns(pid)
        return started is not None and started <= started_by_ns + START_SLACK_NS
    return True


def ensure_private_dir(path: str | os.PathLike[str]) -> None:
    """Create directory `path` (mode 0700, parents as needed) if it is missing; then check it.

    Raises PermissionError (an OSError) unless `path` is a directory, not a symbolic link,
    owned by this effective user, with no permission for group or others; the message
    names the path and what is wrong. Other OSErrors of mkdir/lstat propagate.
    """
    with contextlib.suppress(FileExistsError):
        os.makedirs(path, mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{os.fspath(path)} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{os.fspath(path)} is owned by uid {st.st_uid}, not by this user")
    if st.st_mode & 0o077:
        raise PermissionError(
            f"{os.fspath(path)} has mode {stat.S_IMODE(st.st_mode):04o}; it must be a private"
            " (0700) directory"
        )
