"""`ivshmem-broker`: the broker daemon and the commands around it.

    serve        serve regions in the foreground (a systemd Type=notify service)
    status       regions, peers and queue counters, read from the regions (--watch, --json)
    qemu-args    QEMU flags attaching a guest to region NAME (--json)
    libvirt-xml  the libvirt <shmem> element of region NAME (--json)
    destroy      remove region NAME, its socket and its records
    doctor       check this host for what brokers and guests need, and say what to fix (--json)

Every subcommand takes ``--state-dir DIR`` (default ``$IVSHMEM_BROKER_DIR``, else
``$XDG_RUNTIME_DIR/ivshmem-broker``, else ``/run/ivshmem-broker`` for root).

Exit status: 0 on success; 1 for any error (a bad argument, an unknown region, a refusal by
the broker or a command) with one line on stderr and never a traceback; `doctor` exits 1
when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn
from xml.sax.saxutils import escape

from host_broker.broker import LIVE_STATES, Broker, BrokerError, holder_alive, process_cmdline
from host_broker.config import (
    BrokerConfig,
    ConfigError,
    check_unique,
    load_config,
    parse_group,
    region_from_dict,
)
from host_broker.qemu import ivshmem_args
from host_broker.sd_notify import FdStore, Notifier, listen_fds
from ivshmem_comm import layout
from ivshmem_comm.errors import RegionFormatError
from ivshmem_comm.hostos import pid_alive, process_start_ns
from ivshmem_comm.records import default_state_dir, read_record
from ivshmem_comm.region import SHM_DIR, PeerInfo, Region, shm_path, validate_name

PROG = "ivshmem-broker"


class CliError(Exception):
    """A command refuses: the message is the one line printed after ``ivshmem-broker: ``."""


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def _state_dir(args: argparse.Namespace) -> str:
    return os.path.abspath(args.state_dir) if args.state_dir else default_state_dir()


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1)
    print()


# ------------------------------------------------------------------------------ regions
def list_regions() -> list[str]:
    """Names of the POSIX shm objects of this user that hold a region (others skipped)."""
    names = []
    try:
        entries = sorted(os.listdir(SHM_DIR))
    except OSError:
        return []
    for entry in entries:
        try:
            validate_name(entry)
            st = os.lstat(os.path.join(SHM_DIR, entry))
        except (ValueError, OSError):
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        if st.st_size < layout.SUPERBLOCK_SIZE:
            continue
        try:
            with open(os.path.join(SHM_DIR, entry), "rb") as f:
                if f.read(len(layout.MAGIC)) != layout.MAGIC:
                    continue
        except OSError:
            continue
        names.append(entry)
    return names


def require_region(name: str) -> None:
    """Raise CliError unless `name` is a valid region name with a shm object here; the
    message of an unknown region lists the regions that exist."""
    try:
        validate_name(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if os.path.lexists(shm_path(name)):
        return
    names = list_regions()
    where = (
        f"regions here: {', '.join(names)}"
        if names
        else f"there is no region (start one with `{PROG} serve`)"
    )
    raise CliError(f"no region {name!r}; {where}")


# ------------------------------------------------------------------------------ serve
def build_config(args: argparse.Namespace) -> BrokerConfig:
    """The configuration from --config and flags; flags add one region and override globals.

    Raises ConfigError naming the field.
    """
    config = load_config(args.config) if args.config else BrokerConfig(regions=[])
    if args.state_dir:
        config.state_dir = os.path.abspath(args.state_dir)
    if args.allow_uid:
        config.allow_uids = list(args.allow_uid)
    if args.allow_gid:
        config.allow_gids = [parse_group(g, "--allow-gid") for g in args.allow_gid]
    if args.socket_group is not None:
        config.socket_group = parse_group(args.socket_group, "--socket-group")
    if args.log_level:
        config.log_level = args.log_level
    if args.name is not None:
        raw: dict[str, Any] = {"name": args.name}
        for key in ("size", "max_peers", "vectors", "socket", "queue_num", "vring_align",
                    "max_span"):  # fmt: skip
            value = getattr(args, key)
            if value is not None:
                raw[key] = value
        if args.unlink_on_exit:
            raw["unlink_on_exit"] = True
        if "size" not in raw:
            raise ConfigError("--size", "missing (e.g. --size 64M)")
        config.regions.append(region_from_dict(raw, "--name"))
    elif args.size is not None:
        raise ConfigError("--name", "missing: --size needs --name")
    check_unique(config)
    return config


def _service_status(broker: Broker) -> str:
    """One line for systemd's STATUS=: the regions and how many peers each has."""
    parts = [f"{s.name} ({len(s.peers)} peers)" for s in broker.regions]
    return f"serving {len(parts)} region{'s' if len(parts) != 1 else ''}: {', '.join(parts)}"


def cmd_serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    if not config.regions:
        raise CliError("no region to serve: give --name and --size, or --config FILE")
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper()),
        format="%(asctime)s ivshmem-broker[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    notifier = Notifier()
    broker = Broker(config)
    if args.fd_store:
        if not notifier.enabled:
            raise CliError(
                "--fd-store needs a service manager ($NOTIFY_SOCKET): run under systemd or "
                f"`{PROG} supervise -- serve ...`"
            )
        broker.fd_store = FdStore(notifier, listen_fds())
    broker.install_signal_handlers()
    try:
        broker.start()
    except (BrokerError, ConfigError, OSError, ValueError) as exc:  # ValueError: a geometry
        notifier.notify(f"STATUS=refused to start: {exc}")
        raise CliError(str(exc)) from None
    if broker.fd_store is not None:
        unclaimed = broker.fd_store.discard_unclaimed()
        if unclaimed:
            logging.getLogger("ivshmem-broker").info(
                "fd store: closed what no live peer claimed: %s", ", ".join(unclaimed)
            )
    last_status = [""]

    def heartbeat() -> None:
        # Runs in the broker's loop: a hung loop stops the pings and systemd restarts it.
        lines = ["WATCHDOG=1"] if notifier.watchdog_s is not None else []
        status = _service_status(broker)
        if status != last_status[0]:
            last_status[0] = status
            lines.append(f"STATUS={status}")
        if lines:
            notifier.notify(*lines)

    if notifier.enabled:
        if notifier.watchdog_s is not None:
            broker.heartbeat_s = min(broker.heartbeat_s, notifier.watchdog_s)
        broker.heartbeat_hooks.append(heartbeat)
    logging.getLogger("ivshmem-broker").info("ready")
    notifier.notify("READY=1")  # every region exists and every socket listens
    broker.run()
    notifier.notify("STOPPING=1")
    notifier.close()
    logging.getLogger("ivshmem-broker").info("stopped")
    return 0


# ------------------------------------------------------------------------------ status
def region_status(name: str) -> dict[str, Any]:
    """The status of region `name`, read from the region itself (no broker needed).

    Raises FileNotFoundError, PermissionError or RegionFormatError.
    """
    with Region.open(name) as region:
        info = region.describe()
    now = time.time_ns()
    broker = info["broker"]
    broker["alive"] = pid_alive(broker["pid"])
    beat = broker["heartbeat_ns"]
    broker["heartbeat_age_s"] = (now - beat) / 1e9 if beat else None
    for peer in info["peers"]:
        if peer["state"] in LIVE_STATES:
            fields = {k: peer[k] for k in ("peer", "state", "incarnation", "pid", "host_id",
                                             "doorbell", "heartbeat_ns", "joined_ns")}  # fmt: skip
            peer["holder_alive"] = holder_alive(PeerInfo(**fields))
        else:
            peer["holder_alive"] = None
        hb = peer["heartbeat_ns"]
        peer["heartbeat_age_s"] = (now - hb) / 1e9 if hb else None
    return info


def collect_status(name: str | None) -> list[dict[str, Any]]:
    """region_status of `name`, or of every region of this user (those that cannot be read
    skipped). Raises CliError for a named region that is unknown or unreadable."""
    if name is not None:
        require_region(name)
        try:
            return [region_status(name)]
        except (OSError, RegionFormatError) as exc:
            raise CliError(f"region {name!r}: {exc}") from None
    results = []
    for each in list_regions():
        with contextlib.suppress(OSError, RegionFormatError):
            results.append(region_status(each))
    return results


_RATE_KEYS = ("sent_messages", "sent_bytes")


def add_rates(
    results: list[dict[str, Any]], previous: dict[tuple[str, int, int], dict[str, int]], dt: float
) -> dict[tuple[str, int, int], dict[str, int]]:
    """Set ``queue["rates"]`` (messages/s and bytes/s sent since the previous sample, None
    for a queue not in it) on every queue of `results`; return this sample for the next."""
    sample = {}
    for info in results:
        for queue in info["queues"]:
            key = (info["name"], queue["src"], queue["dst"])
            counters = {k: queue["counters"][k] for k in _RATE_KEYS}
            sample[key] = counters
            before = previous.get(key)
            queue["rates"] = (
                {f"{k}_per_s": max(0, counters[k] - before[k]) / dt for k in _RATE_KEYS}
                if before is not None and dt > 0
                else None
            )
    return sample


def _si(value: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G"):
        if abs(value) < 1000 or prefix == "G":
            return f"{value:.3g} {prefix}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_status(results: list[dict[str, Any]]) -> list[str]:
    """The text form of collect_status's results (with rates when add_rates set them)."""
    if not results:
        return ["no regions"]
    lines = []
    for info in results:
        broker = info["broker"]
        who = f"pid {broker['pid']}" if broker["alive"] else "none running"
        lines.append(
            f"region {info['name']}  uuid {info['uuid']}  {info['size']} bytes  "
            f"{info['max_peers']} peers  broker: {who}, generation {broker['generation']}"
        )
        for peer in info["peers"]:
            if peer["state"] == layout.PEER_FREE and not peer["incarnation"]:
                continue
            age = peer["heartbeat_age_s"]
            beat = f"{age:.1f}s ago" if age is not None else "never"
            alive = {True: "alive", False: "gone", None: "-"}[peer["holder_alive"]]
            lines.append(
                f"  peer {peer['peer']:3d}  {peer['state_name']:8s} incarnation "
                f"{peer['incarnation']:<4d} pid {peer['pid']:<8d} ({alive})  heartbeat {beat}"
            )
        for queue in info["queues"]:
            c = queue["counters"]
            if not any(c.values()):
                continue
            rates = queue.get("rates")
            rate = (
                f", {_si(rates['sent_messages_per_s'], 'msg/s')} "
                f"{_si(rates['sent_bytes_per_s'], 'B/s')}"
                if rates
                else ""
            )
            lines.append(
                f"  queue {queue['src']}->{queue['dst']}: sent {c['sent_messages']} msgs "
                f"{c['sent_bytes']} B, received {c['recv_messages']} msgs "
                f"{c['recv_bytes']} B, full waits {c['full_waits']}, kicks "
                f"{c['send_kicks']}+{c['recv_kicks']}, sleeps {c['sleeps']}{rate}"
            )
    return lines


CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase screen


def watch_status(args: argparse.Namespace) -> int:
    """Redraw the status every `args.interval` seconds (in place on a terminal, one frame
    after the other otherwise; one JSON object per line with --json) until Ctrl-C or
    `args.count` frames."""
    previous: dict[tuple[str, int, int], dict[str, int]] = {}
    last = time.monotonic()
    frame = 0
    tty = sys.stdout.isatty()
    while True:
        results = collect_status(args.name)
        now = time.monotonic()
        previous = add_rates(results, previous, now - last)
        last = now
        if args.json:
            print(json.dumps({"time": time.time(), "regions": results}), flush=True)
        else:
            header = (
                f"{PROG} status, every {args.interval:g} s, {time.strftime('%H:%M:%S')} "
                "(Ctrl-C to stop)"
            )
            text = "\n".join([header, *format_status(results)])
            sys.stdout.write(f"{CLEAR}{text}\n" if tty else f"{text}\n\n")
            sys.stdout.flush()
        frame += 1
        if args.count and frame >= args.count:
            return 0
        time.sleep(args.interval)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        try:
            return watch_status(args)
        except KeyboardInterrupt:
            return 0
    results = collect_status(args.name)
    if args.json:
        _print_json({"regions": results})
    else:
        print("\n".join(format_status(results)))
    return 0


# ------------------------------------------------------------------------------ guest config
def guest_params(args: argparse.Namespace) -> dict[str, Any]:
    """Name, socket path, vectors and size of region `args.name`, from the broker's record
    (flags override). Raises CliError for an unknown region."""
    require_region(args.name)
    state_dir = _state_dir(args)
    record = read_record(state_dir, args.name)
    socket_path = args.socket or (record["socket"] if record else None)
    size = record["size"] if record else None
    if size is None:
        with contextlib.suppress(OSError):
            size = os.stat(shm_path(args.name)).st_size
    return {
        "name": args.name,
        "socket": os.path.abspath(socket_path or os.path.join(state_dir, f"{args.name}.sock")),
        "vectors": args.vectors or (record["vectors"] if record else 1),
        "size": size,
        "plain": args.plain,
        "shm": shm_path(args.name),
    }


def qemu_args(
    name: str, socket_path: str, vectors: int, size: int | None, plain: bool
) -> list[str]:
    """QEMU flags attaching region `name` (:func:`host_broker.qemu.ivshmem_args` with the id
    ``ivshmem_<name>``): ivshmem-doorbell through the broker socket, or (plain) ivshmem-plain
    over the shm file directly (no peer id, no interrupts).

    Raises CliError for what ivshmem_args refuses (plain without a size, ...)."""
    dev = f"ivshmem_{name}".replace(".", "_").replace("-", "_")
    try:
        if plain:
            return ivshmem_args(dev + "_mem", mem_path=shm_path(name), size=size)
        return ivshmem_args(dev, socket=socket_path, vectors=vectors)
    except ValueError as exc:
        raise CliError(f"region {name!r}: {exc}") from None


def _attr(value: str) -> str:
    return "'" + escape(value, {"'": "&apos;", '"': "&quot;"}) + "'"


def libvirt_xml(
    name: str, socket_path: str, vectors: int, size: int | None, plain: bool = False
) -> str:
    """A libvirt <shmem> element for region `name`.

    The doorbell model goes through the broker: libvirt takes the size from the shm fd the
    broker sends and refuses a <size> next to <server>, so there is none; libvirt turns MSI
    on itself, `vectors` is honoured. The plain model maps /dev/shm/NAME (same name) and
    needs <size>; CliError without one.
    """
    if plain:
        if size is None:
            raise CliError(f"region {name!r}: its size is needed for ivshmem-plain")
        return (
            f"<shmem name={_attr(name)}>\n"
            f"  <model type='ivshmem-plain'/>\n"
            f"  <size unit='B'>{size}</size>\n"
            f"</shmem>"
        )
    return (
        f"<shmem name={_attr(name)}>\n"
        f"  <model type='ivshmem-doorbell'/>\n"
        f"  <server path={_attr(socket_path)}/>\n"
        f"  <msi vectors='{vectors}' ioeventfd='on'/>\n"
        f"</shmem>"
    )


def cmd_qemu_args(args: argparse.Namespace) -> int:
    p = guest_params(args)
    flags = qemu_args(p["name"], p["socket"], p["vectors"], p["size"], p["plain"])
    if args.json:
        _print_json({**p, "args": flags})
    else:
        print(shlex.join(flags))
    return 0


def cmd_libvirt_xml(args: argparse.Namespace) -> int:
    p = guest_params(args)
    xml = libvirt_xml(p["name"], p["socket"], p["vectors"], p["size"], p["plain"])
    if args.json:
        _print_json({**p, "xml": xml})
    else:
        print(xml)
    return 0


# ------------------------------------------------------------------------------ destroy
def cmd_destroy(args: argparse.Namespace) -> int:
    require_region(args.name)
    try:
        region = Region.open(args.name)
    except (OSError, RegionFormatError) as exc:
        raise CliError(f"region {args.name!r}: {exc}") from None
    with region:
        live = [p for p in region.peers() if p.state in LIVE_STATES and holder_alive(p)]
        _, broker_pid, _ = region.broker_info()
    broker_alive = (
        broker_pid
        and process_start_ns(broker_pid) is not None
        and "broker" in process_cmdline(broker_pid)
    )
    if (live or broker_alive) and not args.force:
        holders = ", ".join(f"peer {p.peer} (pid {p.pid})" for p in live)
        reasons = []
        if holders:
            reasons.append(f"live peers hold it: {holders}")
        if broker_alive:
            reasons.append(f"broker pid {broker_pid} serves it")
        raise CliError(f"region {args.name!r} not destroyed: {'; '.join(reasons)} (use --force)")
    Region.unlink(args.name)
    state_dir = _state_dir(args)
    record = read_record(state_dir, args.name)
    socket_path = record["socket"] if record else os.path.join(state_dir, f"{args.name}.sock")
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)
    for suffix in (".json", ".lock"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(state_dir, args.name + suffix))
    print(f"destroyed region {args.name}")
    return 0


# ------------------------------------------------------------------------------ doctor
def cmd_doctor(args: argparse.Namespace) -> int:
    from host_broker import doctor

    group = parse_group(args.socket_group, "--socket-group") if args.socket_group else None
    findings = doctor.run_checks(args.qemu, _state_dir(args), group)
    if args.json:
        _print_json(doctor.to_json(findings))
    else:
        print("\n".join(doctor.format_findings(findings)))
    return 1 if any(f.status == "fail" for f in findings) else 0


# ------------------------------------------------------------------------------ supervise
def cmd_supervise(args: argparse.Namespace) -> int:
    from host_broker.holder import supervise

    serve_args = args.serve[1:] if args.serve[:1] == ["--"] else args.serve
    if serve_args[:1] != ["serve"]:
        raise CliError(f"supervise runs a broker: {PROG} supervise -- serve ARGS")
    if args.state_dir and "--state-dir" not in serve_args:
        serve_args = [*serve_args, "--state-dir", args.state_dir]
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s ivshmem-broker-supervise[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return supervise(serve_args, args.restart_delay)


# ------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 1 (through CliError)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog.removeprefix(PROG).strip() or 'usage'}: {message} "
                       f"(see `{self.prog} --help`)")  # fmt: skip


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


_EXAMPLES = {
    "serve": """examples:
  ivshmem-broker serve --name job1 --size 64M --max-peers 4 --vectors 2
  ivshmem-broker serve --name job1 --size 64M --socket-group libvirt-qemu   # QEMU under libvirt
  ivshmem-broker serve --config /etc/ivshmem-broker/job1.toml                # several regions
  under systemd: host_broker/systemd/ivshmem-broker@.service (Type=notify, watchdog)""",
    "status": """examples:
  ivshmem-broker status                 every region of this user, its broker and peers
  ivshmem-broker status job1 --json     one region, machine-readable
  ivshmem-broker status job1 --watch    redraw every second: peers, counters, rates""",
    "qemu-args": """examples:
  qemu-system-x86_64 ... $(ivshmem-broker qemu-args job1)
  ivshmem-broker qemu-args job1 --plain     # ivshmem-plain: the memory only, no broker""",
    "libvirt-xml": """examples:
  ivshmem-broker libvirt-xml job1 > shmem.xml
  virsh attach-device DOMAIN shmem.xml --config   # or paste it into <devices>""",
    "destroy": """examples:
  ivshmem-broker destroy job1            refused while a broker or a live peer holds it
  ivshmem-broker destroy job1 --force""",
    "supervise": """examples:
  ivshmem-broker supervise -- serve --name job1 --size 64M --fd-store
  (systemd does the same for ivshmem-broker@.service: FileDescriptorStoreMax=, Restart=)""",
    "doctor": """examples:
  ivshmem-broker doctor
  ivshmem-broker doctor --socket-group libvirt-qemu --json""",
}


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Shared memory between KVM guests and host processes.",
        epilog="Run `ivshmem-broker COMMAND --help` for a command's options and examples.",
    )
    common = _Parser(add_help=False)
    common.add_argument(
        "--state-dir",
        metavar="DIR",
        help="sockets, locks and records (default: $IVSHMEM_BROKER_DIR, else "
        "$XDG_RUNTIME_DIR/ivshmem-broker, else /run/ivshmem-broker for root)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str) -> Any:
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            parents=[common],
            epilog=_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    serve = add("serve", cmd_serve, "serve regions in the foreground")
    serve.add_argument("--config", metavar="FILE", help="TOML file with [[region]] tables")
    serve.add_argument("--name", help="region name (POSIX shm /dev/shm/NAME)")
    serve.add_argument("--size", help="region size, e.g. 64M, 1G (a power of two)")
    serve.add_argument("--max-peers", type=int, metavar="N")
    serve.add_argument("--vectors", type=int, metavar="N", help="eventfds per peer (default 1)")
    serve.add_argument("--socket", metavar="PATH", help="socket path (default DIR/NAME.sock)")
    serve.add_argument("--queue-num", type=int, metavar="N")
    serve.add_argument("--vring-align", type=int, metavar="N")
    serve.add_argument("--max-span", metavar="SIZE")
    serve.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="socket directory 0750 and sockets 0660 of GROUP (a name or gid): its members "
        "may connect (libvirt's QEMU: --socket-group libvirt-qemu)",
    )
    serve.add_argument(
        "--allow-uid", type=int, action="append", metavar="UID", help="uid allowed to connect"
    )
    serve.add_argument(
        "--allow-gid",
        action="append",
        metavar="GROUP",
        help="group (name or gid) whose members may connect (primary or supplementary)",
    )
    serve.add_argument("--unlink-on-exit", action="store_true", help="remove the region at exit")
    serve.add_argument(
        "--fd-store",
        action="store_true",
        help="keep sockets and eventfds in the service manager's fd store (systemd, or "
        "`ivshmem-broker supervise`), so that a broker restarted after a crash keeps every "
        "connection, QEMU's included",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    status = add("status", cmd_status, "regions and peers, read from the regions themselves")
    status.add_argument("name", nargs="?", help="one region (default: all of this user's)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument(
        "--interval", type=_positive(float), default=1.0, metavar="S", help="--watch period"
    )
    status.add_argument(
        "--count", type=_positive(int), metavar="N", help="--watch: stop after N refreshes"
    )

    for name, func, text in (
        ("qemu-args", cmd_qemu_args, "QEMU flags for a guest of region NAME"),
        ("libvirt-xml", cmd_libvirt_xml, "the libvirt <shmem> element for region NAME"),
    ):
        p = add(name, func, text)
        p.add_argument("name")
        p.add_argument("--socket", metavar="PATH", help="override the socket of the record")
        p.add_argument("--vectors", type=_positive(int), metavar="N", help="override vectors")
        p.add_argument(
            "--plain", action="store_true", help="ivshmem-plain: the memory only, no broker"
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")

    destroy = add("destroy", cmd_destroy, "remove region NAME, its socket and records")
    destroy.add_argument("name")
    destroy.add_argument("--force", action="store_true", help="even with live peers/broker")

    supervise = add(
        "supervise",
        cmd_supervise,
        "run `serve` and restart it when it dies, keeping its fd store (no systemd needed)",
    )
    supervise.add_argument(
        "--restart-delay", type=_positive(float), default=0.5, metavar="S", help="default 0.5"
    )
    supervise.add_argument("serve", nargs=argparse.REMAINDER, help="-- serve ARGS...")

    doctor = add("doctor", cmd_doctor, "check this host and say what to fix")
    doctor.add_argument(
        "--qemu", default="qemu-system-x86_64", metavar="BINARY", help="QEMU to check"
    )
    doctor.add_argument("--socket-group", metavar="GROUP", help="the --socket-group you serve with")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ivshmem-broker` console script; returns the exit status."""
    try:
        args = make_parser().parse_args(argv)
        return args.func(args)
    except (CliError, ConfigError, BrokerError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        return _fail(str(exc))
    except Exception as exc:  # a bug: still one line, with what it was
        return _fail(f"internal error (please report): {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
