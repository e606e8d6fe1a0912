"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

A service started with ``Type=notify`` finds ``$NOTIFY_SOCKET``: a datagram socket path, or an
abstract socket name written with a leading ``@``. Each notification is one datagram of
``KEY=VALUE`` lines: ``READY=1`` (started), ``STATUS=...`` (one line for ``systemctl
status``), ``WATCHDOG=1`` (alive; due every ``$WATCHDOG_USEC`` microseconds when the unit has
``WatchdogSec=``, meant for this process only if ``$WATCHDOG_PID`` is unset or is our pid),
``STOPPING=1``. systemd reads the sender's pid from the socket's credentials, so the datagram
must come from the main process (the broker sends from its one thread).
"""

from __future__ import annotations

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

    def notify(self, *lines: str) -> bool:
        """Send `lines` (each ``KEY=VALUE``) as one datagram; True iff it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
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
