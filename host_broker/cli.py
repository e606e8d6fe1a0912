"""`ivshmem-broker`: serve | status [--json] | qemu-args NAME | libvirt-xml NAME | destroy NAME.

Exit status: 0 on success, 1 when the broker or a command refuses (the reason on stderr),
2 for a usage error.
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
from typing import Any
from xml.sax.saxutils import escape

from host_broker.broker import LIVE_STATES, Broker, BrokerError, holder_alive, process_cmdline
from host_broker.config import (
    BrokerConfig,
    ConfigError,
    check_unique,
    load_config,
    region_from_dict,
)
from ivshmem_comm import layout
from ivshmem_comm.errors import RegionFormatError
from ivshmem_comm.hostos import process_start_ns
from ivshmem_comm.records import default_state_dir, read_record
from ivshmem_comm.region import SHM_DIR, Region, shm_path, validate_name


def _fail(message: str) -> int:
    print(f"ivshmem-broker: {message}", file=sys.stderr)
    return 1


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


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ConfigError as exc:
        return _fail(str(exc))
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper()),
        format="%(asctime)s ivshmem-broker[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    broker = Broker(config) if config.regions else None
    if broker is None:
        return _fail("no region to serve: give --name and --size, or --config FILE")
    broker.install_signal_handlers()
    try:
        broker.start()
    except (BrokerError, ConfigError) as exc:
        return _fail(str(exc))
    except ValueError as exc:  # a name or geometry the core refused
        return _fail(f"config: {exc}")
    logging.getLogger("ivshmem-broker").info("ready")
    broker.run()
    logging.getLogger("ivshmem-broker").info("stopped")
    return 0


# ------------------------------------------------------------------------------ status
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


def region_status(name: str) -> dict[str, Any]:
    """The status of region `name`, read from the region itself (no broker needed).

    Raises FileNotFoundError or RegionFormatError.
    """
    with Region.open(name) as region:
        info = region.describe()
    now = time.time_ns()
    generation, pid, beat = info["broker"]["generation"], info["broker"]["pid"], 0
    beat = info["broker"]["heartbeat_ns"]
    info["broker"]["alive"] = bool(pid) and process_start_ns(pid) is not None
    info["broker"]["heartbeat_age_s"] = (now - beat) / 1e9 if beat else None
    info["broker"]["generation"] = generation
    for peer in info["peers"]:
        if peer["state"] in LIVE_STATES:
            from ivshmem_comm.region import PeerInfo

            fields = {k: peer[k] for k in ("peer", "state", "incarnation", "pid", "host_id",
                                             "doorbell", "heartbeat_ns", "joined_ns")}  # fmt: skip
            peer["holder_alive"] = holder_alive(PeerInfo(**fields))
        else:
            peer["holder_alive"] = None
        hb = peer["heartbeat_ns"]
        peer["heartbeat_age_s"] = (now - hb) / 1e9 if hb else None
    return info


def cmd_status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_regions()
    results = []
    for name in names:
        try:
            results.append(region_status(name))
        except (FileNotFoundError, RegionFormatError, ValueError) as exc:
            if args.name:
                return _fail(str(exc))
    if args.json:
        json.dump({"regions": results}, sys.stdout, indent=1)
        print()
        return 0
    if not results:
        print("no regions")
    for info in results:
        broker = info["broker"]
        who = f"pid {broker['pid']}" if broker["alive"] else "none running"
        print(
            f"region {info['name']}  uuid {info['uuid']}  {info['size']} bytes  "
            f"{info['max_peers']} peers  broker: {who}, generation {broker['generation']}"
        )
        for peer in info["peers"]:
            if peer["state"] == layout.PEER_FREE and not peer["incarnation"]:
                continue
            age = peer["heartbeat_age_s"]
            beat = f"{age:.1f}s ago" if age is not None else "never"
            alive = {True: "alive", False: "gone", None: "-"}[peer["holder_alive"]]
            print(
                f"  peer {peer['peer']:3d}  {peer['state_name']:8s} incarnation "
                f"{peer['incarnation']:<4d} pid {peer['pid']:<8d} ({alive})  heartbeat {beat}"
            )
        for queue in info["queues"]:
            c = queue["counters"]
            if any(c.values()):
                print(
                    f"  queue {queue['src']}->{queue['dst']}: sent {c['sent_messages']} msgs "
                    f"{c['sent_bytes']} B, received {c['recv_messages']} msgs "
                    f"{c['recv_bytes']} B, full waits {c['full_waits']}, kicks "
                    f"{c['send_kicks']}+{c['recv_kicks']}, sleeps {c['sleeps']}"
                )
    return 0


# ------------------------------------------------------------------------------ guest config
def _guest_params(args: argparse.Namespace) -> tuple[str, int, int | None]:
    """(socket path, vectors, size or None) for region `args.name`."""
    validate_name(args.name)
    state_dir = os.path.abspath(args.state_dir) if args.state_dir else default_state_dir()
    record = read_record(state_dir, args.name) or {}
    socket_path = (
        args.socket or record.get("socket") or os.path.join(state_dir, f"{args.name}.sock")
    )
    vectors = args.vectors or record.get("vectors") or 1
    size = record.get("size")
    if size is None:
        with contextlib.suppress(OSError):
            size = os.stat(shm_path(args.name)).st_size
    return os.path.abspath(socket_path), int(vectors), size


def qemu_args(
    name: str, socket_path: str, vectors: int, size: int | None, plain: bool
) -> list[str]:
    """QEMU flags attaching region `name`: ivshmem-doorbell through the broker socket, or
    (plain) ivshmem-plain over the shm file directly (no peer id, no interrupts)."""
    dev = f"ivshmem_{name}".replace(".", "_").replace("-", "_")
    if plain:
        if size is None:
            raise FileNotFoundError(f"no region {name!r}: its size is needed for ivshmem-plain")
        return [
            "-object",
            f"memory-backend-file,id={dev}_mem,size={size},share=on,mem-path={shm_path(name)}",
            "-device",
            f"ivshmem-plain,memdev={dev}_mem",
        ]
    return [
        "-chardev",
        f"socket,path={socket_path},id={dev}",
        "-device",
        f"ivshmem-doorbell,chardev={dev},vectors={vectors}",
    ]


def _attr(value: str) -> str:
    return "'" + escape(value, {"'": "&apos;", '"': "&quot;"}) + "'"


def libvirt_xml(name: str, socket_path: str, vectors: int, size: int | None) -> str:
    """A libvirt <shmem> element for region `name` (doorbell model, through the broker)."""
    size_xml = f"\n  <size unit='B'>{size}</size>" if size else ""
    return (
        f"<shmem name={_attr(name)}>\n"
        f"  <model type='ivshmem-doorbell'/>{size_xml}\n"
        f"  <server path={_attr(socket_path)}/>\n"
        f"  <msi vectors='{vectors}' ioeventfd='on'/>\n"
        f"</shmem>"
    )


def cmd_qemu_args(args: argparse.Namespace) -> int:
    try:
        socket_path, vectors, size = _guest_params(args)
        print(shlex.join(qemu_args(args.name, socket_path, vectors, size, args.plain)))
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    return 0


def cmd_libvirt_xml(args: argparse.Namespace) -> int:
    try:
        socket_path, vectors, size = _guest_params(args)
    except ValueError as exc:
        return _fail(str(exc))
    print(libvirt_xml(args.name, socket_path, vectors, size))
    return 0


# ------------------------------------------------------------------------------ destroy
def cmd_destroy(args: argparse.Namespace) -> int:
    try:
        validate_name(args.name)
        region = Region.open(args.name)
    except (ValueError, FileNotFoundError, RegionFormatError) as exc:
        return _fail(str(exc))
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
        return _fail(f"region {args.name!r} not destroyed: {'; '.join(reasons)} (use --force)")
    Region.unlink(args.name)
    state_dir = os.path.abspath(args.state_dir) if args.state_dir else default_state_dir()
    record = read_record(state_dir, args.name) or {}
    socket_path = record.get("socket") or os.path.join(state_dir, f"{args.name}.sock")
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)
    for suffix in (".json", ".lock"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(state_dir, args.name + suffix))
    print(f"destroyed region {args.name}")
    return 0


# ------------------------------------------------------------------------------ main
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivshmem-broker", description="Shared memory between KVM guests and host processes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve regions in the foreground")
    serve.add_argument("--config", help="TOML file with [[region]] tables")
    serve.add_argument("--name", help="region name (POSIX shm /dev/shm/NAME)")
    serve.add_argument("--size", help="region size, e.g. 64M, 1G")
    serve.add_argument("--max-peers", type=int)
    serve.add_argument("--vectors", type=int, help="eventfds per peer (default 1)")
    serve.add_argument("--socket", help="socket path (default STATE_DIR/NAME.sock)")
    serve.add_argument("--queue-num", type=int)
    serve.add_argument("--vring-align", type=int)
    serve.add_argument("--max-span")
    serve.add_argument("--allow-uid", type=int, action="append", help="uid allowed to connect")
    serve.add_argument("--state-dir", help="sockets/locks/records directory (made 0700)")
    serve.add_argument("--unlink-on-exit", action="store_true", help="remove the region at exit")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="regions and peers, read from the regions")
    status.add_argument("name", nargs="?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    for cmd, func, text in (
        ("qemu-args", cmd_qemu_args, "QEMU flags for a guest of region NAME"),
        ("libvirt-xml", cmd_libvirt_xml, "libvirt <shmem> element for region NAME"),
    ):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("name")
        p.add_argument("--state-dir")
        p.add_argument("--socket")
        p.add_argument("--vectors", type=int)
        if cmd == "qemu-args":
            p.add_argument("--plain", action="store_true", help="ivshmem-plain, no broker")
        p.set_defaults(func=func)

    destroy = sub.add_parser("destroy", help="remove region NAME and its socket")
    destroy.add_argument("name")
    destroy.add_argument("--force", action="store_true", help="even with live peers/broker")
    destroy.add_argument("--state-dir")
    destroy.set_defaults(func=cmd_destroy)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ivshmem-broker` console script; returns the exit status."""
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
