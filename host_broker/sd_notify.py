"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

A service started with ``Type=notify`` finds ``$NOTIFY_SOCKET``: a datagram socket path, or an
abstract socket name written with a leading ``@``. Each notification is one datagram of
``KEY=VALUE`` lines: ``READY=1`` (started), ``STATUS=...`` (one line for ``systemctl
status``), ``WATCHDOG=1`` (alive; due every ``$WATCHDOG_USEC`` microseconds when the unit has
``WatchdogSec=``, meant for this process only if ``$WATCHDOG_PID`` is unset or is our pid),
``STOPPING=1``. systemd reads the sender's pid from the socket's credentials, so the datagram
must come from the main process (the broker sends from its one thread).

The *fd store* (``FileDescriptorStoreMax=``): ``FDSTORE=1`` + ``FDNAME=NAME`` with file
descriptors attached (SCM_RIGHTS) asks systemd to keep them; ``FDSTOREREMOVE=1`` +
``FDNAME=NAME`` to close them. systemd drops a stored socket by itself once its other end hangs
up. When the service is started again (after a crash, a kill, a watchdog timeout), the stored
fds come back as ``$LISTEN_FDS`` fds from 3 on, named in ``$LISTEN_FDNAMES`` (colon-separated),
meant for ``$LISTEN_PID`` (sd_listen_fds(3)). `FdStore` is both ends of that for the broker;
``ivshmem-broker supervise`` (host_broker/holder.py) plays systemd's part without systemd.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket

log = logging.getLogger("ivshmem-broker")


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``; does nothing when it is unset.

    Sending never raises: a failure is logged once (systemd gone, socket full) and later
    notifications are still tried.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]  # Linux abstract namespace
        elif path.startswith("/"):
            self.address = path
        elif path:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract: ignored", path)
        self.watchdog_s = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True iff notifications go somewhere."""
        return self.address is not None

    def notify(self, *lines: str, fds: list[int] | None = None) -> bool:
        """Send `lines` (each ``KEY=VALUE``) as one datagram, with `fds` attached; True iff
        it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            payload = ["\n".join(lines).encode()]
            if fds:  # (socket.send_fds ignores its address before Python 3.12)
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
                self._sock.sendmsg(payload, [rights], 0, self.address)
            else:
                self._sock.sendto(payload[0], self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)
                self._warned = True
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises), or None when no watchdog is asked of this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


SD_LISTEN_FDS_START = 3


def listen_fds(environ: dict[str, str] | None = None) -> dict[str, list[int]]:
    """The fds passed to this process by its service manager (sd_listen_fds(3)), by name.

    Empty unless ``$LISTEN_PID`` is our pid and ``$LISTEN_FDS`` a count; fds 3, 4, ... are
    named by ``$LISTEN_FDNAMES`` ("unknown" when missing). They are made close-on-exec, and the
    three variables are removed from os.environ so that no child takes them for its own.
    """
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", "")) != os.getpid():
            return {}
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    fds: dict[str, list[int]] = {}
    for i in range(max(0, count)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.setdefault(names[i] if i < len(names) else "unknown", []).append(fd)
    return fds


class FdStore:
    """The broker's side of the fd store: what it got back at start, and what it hands over.

    `take(name)` returns (and forgets) the fds that came back under `name`; `store(name, fd)`
    hands a dup of `fd` to the manager; `remove(name)` asks it to close those of `name`;
    `discard_unclaimed()` closes and removes whatever came back and nobody took.
    """

    def __init__(self, notifier: Notifier, inherited: dict[str, list[int]]) -> None:
        self.notifier = notifier
        self.inherited = inherited

    def take(self, name: str) -> list[int]:
        return self.inherited.pop(name, [])

    def store(self, name: str, fd: int) -> bool:
        return self.notifier.notify("FDSTORE=1", f"FDNAME={name}", fds=[fd])

    def remove(self, name: str) -> bool:
        return self.notifier.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def discard_unclaimed(self) -> list[str]:
        """Close what came back unclaimed, remove it from the store; return its names."""
        names = sorted(self.inherited)
        for name, fds in self.inherited.items():
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.remove(name)
        self.inherited = {}
        return names
