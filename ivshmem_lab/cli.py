"""``ivshmem-lab``: run a command in N throw-away QEMU guests (see :mod:`ivshmem_lab.lab`).

    ivshmem-lab run --vms 2 [--accel auto|kvm|tcg] [--memory 512M] [--timeout 300]
                    [--shm NAME[:SIZE] ... | --socket PATH[:VECTORS] ... | --no-region]
                    -- CMD ARGS...
    ivshmem-lab run --vms V -n N [...] -- python prog.py ARGS...   # an MPI job (lab_mpi)
    ivshmem-lab up --vms 2 [--slots S] [--hosts H] [--name NAME] [--accel ..] [--memory ..]
    ivshmem-lab exec [--lab NAME] vmI -- CMD ARGS...                   # run CMD in guest vmI
    ivshmem-lab down [--lab NAME]
    ivshmem-lab mpiexec --vms 2 [-n N] [--slots S] [--hosts H] [--timeout T] -- python prog.py
    ivshmem-lab probe [--force]        # does KVM work here?
    ivshmem-lab initramfs [--rebuild]  # build the guest initramfs (and the UIO driver)

``run`` prints each guest's output lines prefixed ``[vmI] `` as they come, a summary on
stderr (accelerator, boot time, exit status per guest), and exits 0 if every guest's
command exited 0, 1 if any failed, 124 if any timed out (and none failed otherwise),
2 on bad usage, 3 if the lab cannot run here (no QEMU / kernel). Without ``--shm`` or
``--socket`` the guests are served a fresh region, as ``-n`` does: a broker started for the
run (region ``labrun-PID-...``, one peer slot per guest, at least 2) gives every guest one
ivshmem-doorbell device, so ``guest_lib.attach()`` works in them; the broker, its state and
the region are removed when the run ends. ``--no-region`` boots the guests with no device.

With ``-n N`` the command is an MPI program (guest_lib.mpi): N ranks are dealt round robin
over the V guests (a bare ``-n``: N = V), over a region the lab's own broker serves for the job
(see :mod:`ivshmem_lab.mpi`); the ranks' output comes in whole lines, ``[vmI] LINE``
(``[vmI] [rank R] LINE`` with ``--prepend-rank``), the summary gives each rank's exit
status, and the exit status is 0 only if every rank exited 0.

``up`` boots networked guests that run an exec agent, with a broker serving ``--slots``
doorbell devices per guest (default 1; :mod:`ivshmem_lab.cluster`); it prints where the
lab's state lives, the ``exec`` and ``mpiexec`` command lines to use, then ``ready``, and
stays in the
foreground until SIGTERM/SIGINT or ``down`` (then it tears everything down and exits 0; 1 if
a guest died first). ``exec`` runs CMD in a guest with stdin/stdout/stderr relayed and exits
with CMD's status (255 if the lab or the guest cannot be reached). ``down`` stops a lab
(status 1 if there is none). ``mpiexec`` = ``up`` + MPICH's real ``mpiexec`` (hydra, ssh
launcher = the lab's exec) running CMD as N ranks, S per guest filled guest by guest
(default S = ceil(N / V), N = V x S) + ``down``;
it exits with mpiexec's status (124 past ``--timeout``). ``--hosts H`` (``up`` and
``mpiexec``, default 1) simulates H hosts: the guests are split into H blocks of consecutive
guests, each with a broker and a region of its own (a guest holds devices of its host's
region only), the LAN joining them all; a job's ranks on one host talk through their
region, ranks on different hosts through MPICH over the LAN (the lines printed at the start
name each host's guests and region). ``--lab`` is a name or a directory
(default ``$IVSHMEM_LAB``, then ``default``); hydra's ``-launcher-exec`` can also be the
``ivshmem-lab-ssh`` command, which takes ssh's argv (see :mod:`ivshmem_lab.exec_agent`).
``mpiexec`` runs each rank behind ``python -m guest_lib.launch --`` so that its output
reaches hydra in whole lines (hydra alone mixes two ranks' partial lines);
``mpiexec --prepend-rank`` is hydra's ``-prepend-rank``.

Signals: SIGTERM, SIGINT, SIGHUP and SIGQUIT make ``run``, ``up`` and ``mpiexec`` tear
everything down (guests killed, broker stopped, region, semaphores and state removed) and
exit 128 + the signal. First they are forwarded, as hydra does: ``run`` sends the signal to
the command in every guest (with ``-n`` the guest side passes it on to its ranks) and kills
the guests still running 2 s later; ``mpiexec`` sends it to hydra's mpiexec (which passes it
on to the ranks) and kills it 2 s later if it still runs. Killed outright
(SIGKILL), they leave nothing either: a guardian process (:class:`guest_lib.launch.Guardian`,
as ``ivshmem-run`` has) kills the guests and mpiexec, stops the broker and removes the
region, its semaphores, the lab's state and the temporary directories.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TextIO

from guest_lib.launch import FORWARDED_SIGNALS, Guardian, forward_signals, guard
from ivshmem_lab.devices import DoorbellDevice, ShmDevice, parse_device
from ivshmem_lab.errors import LabError, LabUnavailable
from ivshmem_lab.guest import GuestResult
from ivshmem_lab.host import find_kernel
from ivshmem_lab.initramfs import build_initramfs
from ivshmem_lab.lab import Lab

if TYPE_CHECKING:
    from ivshmem_lab.cluster import LabCluster


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ivshmem-lab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a command in N guests")
    r.add_argument("--vms", type=int, default=1, help="number of guests (default 1)")
    r.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    r.add_argument("--memory", default="512M", help="guest RAM (default 512M)")
    r.add_argument("--timeout", type=float, default=300.0, help="seconds per guest, boot included")
    r.add_argument(
        "--shm",
        action="append",
        default=[],
        metavar="NAME[:SIZE]",
        help="ivshmem-plain device over /dev/shm/NAME in every guest (repeatable)",
    )
    r.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="PATH[:VECTORS]",
        help="ivshmem-doorbell device on a broker socket in every guest (repeatable)",
    )
    r.add_argument(
        "--no-region",
        action="store_true",
        help="no device in the guests (default without --shm/--socket: a region the lab "
        "serves for the run)",
    )
    r.add_argument(
        "-n",
        "--np",
        dest="np",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="N",
        help="run CMD as an MPI job of N ranks (bare -n: one per guest), round robin "
        "over the guests (ivshmem_lab.mpi)",
    )
    r.add_argument(
        "--prepend-rank",
        "-prepend-rank",
        action="store_true",
        help="with -n: put '[rank R] ' before every line rank R prints",
    )
    r.add_argument("--cwd", default=None, help="working directory in the guests (default: .)")
    r.add_argument("--console", action="store_true", help="print the whole console at the end")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    up = sub.add_parser("up", help="boot networked guests that accept exec (until down)")
    mp = sub.add_parser("mpiexec", help="run CMD under MPICH's mpiexec across new guests")
    for q in (up, mp):
        q.add_argument("--vms", type=int, default=2, help="number of guests (default 2)")
        q.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
        q.add_argument("--memory", default="512M", help="guest RAM (default 512M)")
        q.add_argument(
            "--slots", type=int, default=None, help="ranks per guest (default 1, or -n / V)"
        )
        q.add_argument(
            "--hosts", type=int, default=1, help="simulated hosts, a region each (default 1)"
        )
    up.add_argument("--name", default=None, help="lab name (default $IVSHMEM_LAB or default)")
    mp.add_argument("-n", "--np", dest="np", type=int, default=None, help="ranks (default V)")
    mp.add_argument("--timeout", type=float, default=600.0, help="seconds for mpiexec")
    mp.add_argument(
        "--prepend-rank",
        "-prepend-rank",
        action="store_true",
        help="put '[R] ' before every line rank R prints (hydra's -prepend-rank)",
    )
    mp.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    ex = sub.add_parser("exec", help="run a command in a guest of a lab that is up")
    dn = sub.add_parser("down", help="stop a lab that is up")
    for q in (ex, dn):
        q.add_argument("--lab", default=None, help="name or directory (default $IVSHMEM_LAB)")
    ex.add_argument("guest", help="vm0, vm1, ...")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    pr = sub.add_parser("probe", help="probe whether KVM guests boot here")
    pr.add_argument("--force", action="store_true", help="ignore the cached verdict")
    ib = sub.add_parser("initramfs", help="build the guest initramfs and the UIO driver")
    ib.add_argument("--rebuild", action="store_true")
    return p


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ivshmem-lab``; returns the exit status (see the module docstring)."""
    args = _parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(args)
    # SIGTERM, SIGINT, SIGHUP and SIGQUIT unwind (status 128 + the signal), so every guest is
    # killed, the broker stopped and the region and temp dirs removed (mpiexec forwards
    # them to hydra first). A Guardian does the same if we are killed outright (SIGKILL).
    old = {sig: signal.signal(sig, _on_signal) for sig in FORWARDED_SIGNALS}
    try:
        if args.cmd not in ("run", "mpiexec", "up"):
            return _main(args)
        with Guardian():
            return _main(args)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.cmd == "probe":
            probe = Lab(accel="auto").probe_kvm(force=args.force)
            cached = " (cached)" if probe.cached else ""
            print(f"kvm: {'yes' if probe.ok else 'no'}{cached}: {probe.reason}")
            return 0 if probe.ok else 1
        if args.cmd == "initramfs":
            ird = build_initramfs(find_kernel(), rebuild=args.rebuild)
            print(ird.path)
            if not ird.uio_module:
                print(f"uio_ivshmem not built:\n{ird.uio_build_log}", file=sys.stderr)
            return 0
        if args.cmd == "up":
            return _up(args)
        if args.cmd == "exec":
            return _exec(args)
        if args.cmd == "down":
            return _down(args)
        if args.cmd == "mpiexec":
            return _mpiexec(args)
        return _run(args)
    except LabUnavailable as e:
        print(f"ivshmem-lab: unavailable: {e}", file=sys.stderr)
        return 3
    except LabError as e:
        print(f"ivshmem-lab: {e}", file=sys.stderr)
        return 1


GUEST_OWN_DIRS = ("/tmp", "/run", "/dev/shm")  # fresh tmpfs in every guest (ivshmem_lab.lab)


def invisible_path(command: Sequence[str], cwd: str | None) -> str | None:
    """Why lab guests could not see `command`'s program (as PATH finds it here) or a host
    file it names by absolute path; None if they can. Their /tmp, /run and /dev/shm are their
    own; of the host's /tmp only the top folder of the working directory is shared."""
    where = os.path.abspath(cwd or os.getcwd())
    shared = "/tmp/" + where.split("/")[2] if where.startswith("/tmp/") else None
    program = command[0] if "/" in command[0] else shutil.which(command[0]) or command[0]
    for path in [program, *command[1:]]:
        if path is not program and not (os.path.isabs(path) and os.path.exists(path)):
            continue
        path = os.path.abspath(path)
        for own in GUEST_OWN_DIRS:
            inside = path.startswith(own + "/")
            if inside and not (shared and (path + "/").startswith(shared + "/")):
                return (
                    f"{path} is not visible in the lab guests: their {own} is a fresh tmpfs "
                    f"(of the host's /tmp only the working directory's top folder is shared); "
                    "put it under the project or $HOME, or run from its folder (--cwd)"
                )
    return None


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    return command[1:] if command and command[0] == "--" else command


def _up(args: argparse.Namespace) -> int:
    from ivshmem_lab.cluster import LabCluster, mpiexec_argv

    name = args.name or os.environ.get("IVSHMEM_LAB") or "default"
    if args.vms < 1 or not 1 <= args.hosts <= args.vms:
        print("ivshmem-lab up: need --vms >= 1 and 1 <= --hosts <= --vms", file=sys.stderr)
        return 2
    died = threading.Event()
    slots = args.slots or 1
    with LabCluster(
        args.vms, slots=slots, hosts=args.hosts, name=name, accel=args.accel, memory=args.memory
    ) as cluster:
        print(f"ivshmem-lab: lab {name} up: {args.vms} guest(s), accel "
              f"{cluster.lab.accel_in_use()}, state in {cluster.directory}")  # fmt: skip
        _print_hosts(cluster, sys.stdout)
        print(f"ivshmem-lab: exec: ivshmem-lab exec --lab {name} vm0 -- CMD")
        print(f"ivshmem-lab: mpiexec: {shlex.join(mpiexec_argv(cluster, ['CMD']))}")
        print("ready", flush=True)

        def watch() -> None:
            for g in cluster.guests:
                g.wait(None)
            died.set()

        threading.Thread(target=watch, daemon=True).start()
        try:
            while not died.wait(1.0):
                pass
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (what `down` sends)
            return 0
        print("ivshmem-lab: a guest stopped; tearing the lab down", file=sys.stderr)
    return 1


def _print_hosts(cluster: LabCluster, stream: TextIO) -> None:
    """One line per simulated host: ``ivshmem-lab: host H: vm0 vm1, region NAME``."""
    for h, region in enumerate(cluster.regions):
        guests = " ".join(g for i, g in enumerate(cluster.hosts) if cluster.host_of(i) == h)
        print(f"ivshmem-lab: host {h}: {guests}, region {region}", file=stream, flush=True)


def _down(args: argparse.Namespace) -> int:
    from ivshmem_lab.exec_agent import LabState, resolve_lab

    directory = resolve_lab(args.lab)
    try:
        state = LabState.load(directory)
    except (OSError, ValueError, KeyError):
        print(f"ivshmem-lab down: no lab at {directory}", file=sys.stderr)
        return 1
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:  # died without cleaning up: remove what it left
        shutil.rmtree(directory, ignore_errors=True)
        return 0
    deadline = time.monotonic() + 60
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if directory.exists():
        print(f"ivshmem-lab down: lab {state.name} (pid {state.pid}) did not stop",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _exec(args: argparse.Namespace) -> int:
    from ivshmem_lab.exec_agent import run_in_guest

    command = _command(args)
    if not command:
        print("ivshmem-lab exec: no command given (… vmI -- CMD ARGS)", file=sys.stderr)
        return 2
    return run_in_guest(args.lab, args.guest, command, stdin=sys.stdin.fileno())


def _mpiexec(args: argparse.Namespace) -> int:
    from ivshmem_lab.cluster import run_mpiexec

    command = _command(args)
    if not command:
        print("ivshmem-lab mpiexec: no command given (… -- CMD ARGS)", file=sys.stderr)
        return 2
    unseen = invisible_path(command, None)
    if unseen:
        print(f"ivshmem-lab mpiexec: {unseen}", file=sys.stderr)
        return 2
    slots = args.slots or (-(-args.np // args.vms) if args.np else 1)
    if args.np is not None and not 1 <= args.np <= args.vms * slots:
        print(f"ivshmem-lab mpiexec: -n must be 1..{args.vms * slots} (--vms x --slots)",
              file=sys.stderr)  # fmt: skip
        return 2
    if not 1 <= args.hosts <= args.vms:
        print(f"ivshmem-lab mpiexec: --hosts must be 1..{args.vms} (--vms)", file=sys.stderr)
        return 2

    def ready(cluster, argv: list[str]) -> None:
        _print_hosts(cluster, sys.stderr)
        print(f"ivshmem-lab: {args.vms} guest(s) up (accel {cluster.lab.accel_in_use()}); "
              f"running {shlex.join(argv)}", file=sys.stderr, flush=True)  # fmt: skip

    return run_mpiexec(
        command,
        vms=args.vms,
        n=args.np,
        slots=slots,
        hosts=args.hosts,
        timeout=args.timeout,
        memory=args.memory,
        accel=args.accel,
        extra=["-prepend-rank"] if args.prepend_rank else [],
        on_ready=ready,
    )


def _run(args: argparse.Namespace) -> int:
    command = _command(args)
    if not command:
        print("ivshmem-lab run: no command given (… -- CMD ARGS)", file=sys.stderr)
        return 2
    if args.vms < 1:
        print("ivshmem-lab run: --vms must be >= 1", file=sys.stderr)
        return 2
    unseen = invisible_path(command, args.cwd)
    if unseen:
        print(f"ivshmem-lab run: {unseen}", file=sys.stderr)
        return 2
    try:
        devices = [parse_device("shm:" + s) for s in args.shm]
        devices += [parse_device("sock:" + s) for s in args.socket]
    except ValueError as e:
        print(f"ivshmem-lab run: {e}", file=sys.stderr)
        return 2
    mpi_n = args.np or (args.vms if args.np == 0 else None)
    if mpi_n is not None and mpi_n < args.vms:
        print("ivshmem-lab run: -n must be >= --vms", file=sys.stderr)
        return 2
    if args.prepend_rank and mpi_n is None:
        print("ivshmem-lab run: --prepend-rank goes with -n", file=sys.stderr)
        return 2
    if args.no_region and (devices or mpi_n is not None):
        print("ivshmem-lab run: --no-region goes with neither --shm, --socket nor -n",
              file=sys.stderr)  # fmt: skip
        return 2
    lab = Lab(accel=args.accel, memory=args.memory)
    ird = lab.initramfs()
    if not ird.uio_module:
        last = ird.uio_build_log.strip().splitlines()[-1:] or ["?"]
        print(f"ivshmem-lab: uio_ivshmem driver not built ({last[0]})", file=sys.stderr)
    accel = lab.accel_in_use()
    if args.accel == "auto" and accel == "tcg" and lab.kvm_probe is not None:
        print(f"ivshmem-lab: KVM not usable ({lab.kvm_probe.reason}); using TCG", file=sys.stderr)
    print(f"ivshmem-lab: {args.vms} guest(s), accel {accel}", file=sys.stderr)
    out_lock = threading.Lock()

    def on_output(index: int, line: str) -> None:
        with out_lock:
            print(f"[vm{index}] {line}", flush=True)

    # From here on a signal goes to the guests' commands (killed 2 s later if still running)
    # and the run ends with status 128 + that signal.
    with forward_signals(lab.signal_guests) as received:
        if mpi_n is not None:
            status = _run_mpi(lab, args, command, mpi_n, on_output)
        else:
            status = _run_plain(lab, args, command, devices, on_output)
    return 128 + received[0] if received else status


def _run_plain(
    lab: Lab,
    args: argparse.Namespace,
    command: list[str],
    devices: list[ShmDevice | DoorbellDevice],
    on_output: Callable[[int, str], None],
) -> int:
    """``run`` without ``-n``: the command in every guest; the run's exit status."""
    with contextlib.ExitStack() as stack:
        if not devices and not args.no_region:
            devices = [stack.enter_context(_served_region(args.vms))]
        results = lab.run(
            command,
            vms=args.vms,
            devices=devices,
            timeout=args.timeout,
            cwd=args.cwd,
            on_output=on_output,
        )
    failed = timed_out = False
    for r in results:
        _report_guest(r, args.console)
        if r.timed_out:
            timed_out = True
        elif r.returncode != 0:
            failed = True
    return 1 if failed else 124 if timed_out else 0


@contextlib.contextmanager
def _served_region(vms: int) -> Iterator[DoorbellDevice]:
    """A fresh region for `vms` guests, served by a broker of the lab's (as ``-n`` does) for
    the duration of the block: yields the doorbell device to give every guest. The broker,
    its state directory and the region are removed after. Raises LabError if the broker does
    not start."""
    from ivshmem_lab.mpi import job_broker, region_size

    name = f"labrun-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    size = region_size(vms)
    with tempfile.TemporaryDirectory(prefix="ivshmem-lab-run-") as tmpdir:
        guard(path=tmpdir)
        with job_broker(name, size, vms, tmpdir) as broker:
            print(
                f"ivshmem-lab: serving region {name} ({size >> 20} MiB, {max(vms, 2)} peer slots) "
                "to the guests (--socket/--shm: your own, --no-region: none)",
                file=sys.stderr,
            )
            yield DoorbellDevice(broker.socket, 2)


def _report_guest(r: GuestResult, console: bool) -> None:
    """One summary line per guest on stderr (and its serial console with ``--console``)."""
    boot = f"{r.boot_seconds:.1f} s" if r.boot_seconds is not None else "-"
    if r.returncode is not None:
        what = f"exit {r.returncode}"
    elif r.timed_out:
        what = "timed out"
    else:
        what = f"failed: {r.error}"
    print(
        f"ivshmem-lab: vm{r.index}: {what} (accel {r.accel}, boot {boot}, "
        f"total {r.wall_seconds:.1f} s)",
        file=sys.stderr,
    )
    if console:
        for line in r.console.splitlines():
            print(f"[vm{r.index} console] {line}", file=sys.stderr)


def _run_mpi(
    lab: Lab,
    args: argparse.Namespace,
    command: list[str],
    n: int,
    on_output: Callable[[int, str], None],
) -> int:
    from ivshmem_lab.mpi import run_job

    print(f"ivshmem-lab: MPI job of {n} rank(s) over {args.vms} guest(s)", file=sys.stderr)
    job = run_job(
        lab, command, vms=args.vms, n=n, timeout=args.timeout, cwd=args.cwd,
        on_output=on_output, prepend_rank=args.prepend_rank,
    )  # fmt: skip
    for r in job.guests:
        _report_guest(r, args.console)
    for rank, code in sorted(job.rank_exit.items()):
        what = "no exit status reported" if code is None else f"exit {code}"
        print(f"ivshmem-lab: rank {rank} (vm{rank % args.vms}): {what}", file=sys.stderr)
    return job.status


if __name__ == "__main__":
    sys.exit(main())
