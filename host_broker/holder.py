"""`ivshmem-broker supervise -- serve ...`: systemd's fd store without systemd.

The supervisor runs the broker as its child with ``$NOTIFY_SOCKET`` pointing at its own
datagram socket (abstract namespace), keeps the fds the broker stores there (``FDSTORE=1`` /
``FDSTOREREMOVE=1`` with ``FDNAME=``, see host_broker/sd_notify.py), drops a stored socket
once its other end hangs up (as systemd does), and when the broker dies of anything but an
orderly stop (exit status 0), starts it again after `restart_delay` with every stored fd as
``$LISTEN_FDS`` (fds 3, 4, ... named by ``$LISTEN_FDNAMES``, for ``$LISTEN_PID``). SIGTERM
and SIGINT are passed on to the broker; the supervisor then exits with its status.

It holds nothing else: no region state (that lives in the regions), no sockets of its own
besides the notify socket. If the supervisor itself dies, the stored fds go with it and a
new broker falls back to adopting the regions (peers reclaim or are watched as orphans).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import sys
import time
import uuid

from host_broker.sd_notify import SD_LISTEN_FDS_START

log = logging.getLogger("ivshmem-broker.supervise")

_MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD


class Supervisor:
    """One broker child and the fd store it uses. `run()` returns the exit status."""

    def __init__(self, serve_args: list[str], restart_delay: float) -> None:
        self.serve_args = serve_args
        self.restart_delay = restart_delay
        self.address = f"ivshmem-broker-supervise-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + self.address)
        self.store: dict[str, list[int]] = {}  # name -> fds, in the order they came
        self.child: int | None = None
        self.stopping = False

    # ---------------------------------------------------------------- the store
    def _receive(self) -> None:
        """One datagram from the broker: keep or close fds as it asks (others are ignored)."""
        try:
            data, fds, _, _ = socket.recv_fds(
                self.sock, 4096, _MAX_FDS_PER_MESSAGE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1" and fds:
            self.store.setdefault(name, []).extend(fds)
            return
        for fd in fds:  # fds on any other message are not ours to keep
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            for fd in self.store.pop(name, []):
                os.close(fd)

    def _drop_hung_up(self, fd: int) -> None:
        """A stored socket whose other end went away: nobody will need it again."""
        for name, fds in list(self.store.items()):
            if fd in fds:
                fds.remove(fd)
                os.close(fd)
                if not fds:
                    del self.store[name]
                return

    # ---------------------------------------------------------------- the child
    def _spawn(self) -> None:
        stored = [(name, fd) for name, fds in self.store.items() for fd in fds]
        env = dict(os.environ, NOTIFY_SOCKET="@" + self.address)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC"):
            env.pop(key, None)
        if stored:
            env["LISTEN_FDS"] = str(len(stored))
            env["LISTEN_FDNAMES"] = ":".join(name for name, _ in stored)
        argv = [sys.executable, "-m", "host_broker", *self.serve_args]
        pid = os.fork()
        if pid == 0:  # the child: move the fds to 3, 4, ... and exec the broker
            try:
                floor = SD_LISTEN_FDS_START + len(stored)  # copies above every target first
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for _, fd in stored]
                for i, fd in enumerate(high):
                    os.dup2(fd, SD_LISTEN_FDS_START + i)  # inheritable
                    os.close(fd)
                if stored:
                    env["LISTEN_PID"] = str(os.getpid())
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.child = pid
        log.info("broker pid %d started with %d stored fds", pid, len(stored))

    def _forward(self, signum: int, _frame: object) -> None:
        self.stopping = True
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, self._forward)
        self._spawn()
        while True:
            assert self.child is not None
            pidfd = os.pidfd_open(self.child)
            try:
                self._serve_until_exit(pidfd)
            finally:
                os.close(pidfd)
            while select.select([self.sock], [], [], 0)[0]:  # sent just before it ended
                self._receive()
            _, status = os.waitpid(self.child, 0)
            code = os.waitstatus_to_exitcode(status)
            if code == 0 or self.stopping:
                log.info("broker exited with status %d: done", code)
                return 0 if code == 0 else 1
            log.warning(
                "broker pid %d ended (status %d); restarting in %.1f s with %d stored fds",
                self.child, code, self.restart_delay, sum(map(len, self.store.values())),
            )  # fmt: skip
            time.sleep(self.restart_delay)
            if self.stopping:
                return 1
            self._spawn()

    def _serve_until_exit(self, pidfd: int) -> None:
        """Take store requests and drop hung-up sockets until the child exits (`pidfd`)."""
        while True:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            poller.register(pidfd, select.POLLIN)
            for fds in self.store.values():
                for fd in fds:
                    poller.register(fd, 0)  # hang-ups and errors only
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, event in events:
                if fd == pidfd:
                    return
                if fd == self.sock.fileno():
                    self._receive()
                elif event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    self._drop_hung_up(fd)

    def close(self) -> None:
        for fds in self.store.values():
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.store.clear()
        self.sock.close()


def supervise(serve_args: list[str], restart_delay: float) -> int:
    """Run `ivshmem-broker SERVE_ARGS` under a Supervisor until it stops in order."""
    if not serve_args or serve_args[0] != "serve":
        raise ValueError("supervise runs `serve ...`: ivshmem-broker supervise -- serve ARGS")
    supervisor = Supervisor(serve_args, restart_delay)
    try:
        return supervisor.run()
    finally:
        supervisor.close()
