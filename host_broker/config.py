"""Broker configuration: a TOML file and/or command-line flags, checked field by field.

TOML format (every key optional except each region's ``name`` and ``size``)::

    state_dir = "/run/ivshmem-broker"     # sockets, locks and region records (made 0700)
    socket_group = "libvirt-qemu"         # socket dirs 0750 and sockets 0660 of this group
    allow_uids = [1000, 1001]             # who may connect (SO_PEERCRED); default: anyone
    allow_gids = [64055]                  # ... or whose primary/supplementary group is listed
    log_level = "info"

    [[region]]
    name = "job1"                         # POSIX shm /dev/shm/job1
    size = "64M"                          # bytes, K/M/G/T (binary) suffix; a power of two
    max_peers = 8
    vectors = 2                           # eventfds per peer (QEMU's vectors=N must be >= this)
    socket = "/run/ivshmem-broker/job1.sock"   # default: <state_dir>/<name>.sock
    queue_num = 256
    vring_align = 64
    max_span = "256K"                     # default: chosen by the geometry
    allow_uids = [1000]                   # replaces the global list for this region
    allow_gids = []                       # likewise
    unlink_on_exit = false                # remove the shm object when the broker stops

Every error is a `ConfigError` naming the field (``region[0].size``) and saying what is wrong.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import tomllib
from typing import Any

from ivshmem_comm import layout
from ivshmem_comm.protocol import MAX_VECTORS
from ivshmem_comm.records import default_state_dir
from ivshmem_comm.region import validate_name
from ivshmem_comm.units import parse_size


class ConfigError(ValueError):
    """A configuration value is wrong. `field` names it (e.g. "region[0].size")."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"config: {field}: {detail}")
        self.field = field
        self.detail = detail


def config_size(value: int | str, field: str = "size") -> int:
    """A positive byte count from `value` in the project's size dialect
    (:func:`ivshmem_comm.units.parse_size`: "4096", "64M", "1G", "512KiB" or an int).

    Raises ConfigError naming `field` for anything else, including zero.
    """
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ConfigError(field, str(exc)) from None
    if size <= 0:
        raise ConfigError(field, f"size must be positive, got {size}")
    return size


@dataclasses.dataclass
class RegionConfig:
    """One region the broker serves."""

    name: str
    size: int
    max_peers: int = 8
    vectors: int = 1
    socket: str | None = None  # None: <state_dir>/<name>.sock
    queue_num: int = 256
    vring_align: int = layout.CACHE_LINE
    max_span: int | None = None
    allow_uids: list[int] | None = None  # None: inherit the global list
    allow_gids: list[int] | None = None  # None: inherit the global list
    unlink_on_exit: bool = False

    def socket_path(self, state_dir: str) -> str:
        return self.socket or os.path.join(state_dir, f"{self.name}.sock")

    def geometry(self) -> layout.Geometry:
        """The geometry these settings give; raises ValueError naming the bad field."""
        return layout.Geometry.fit(
            self.size, self.max_peers, self.queue_num, self.vring_align, self.max_span
        )


@dataclasses.dataclass
class BrokerConfig:
    """Everything `serve` needs."""

    regions: list[RegionConfig]
    state_dir: str = dataclasses.field(default_factory=default_state_dir)
    allow_uids: list[int] | None = None
    allow_gids: list[int] | None = None
    socket_group: int | None = None  # a gid: socket directories 0750 and sockets 0660
    log_level: str = "info"

    def region_allow(self, region: RegionConfig) -> list[int] | None:
        return region.allow_uids if region.allow_uids is not None else self.allow_uids

    def region_allow_gids(self, region: RegionConfig) -> list[int] | None:
        return region.allow_gids if region.allow_gids is not None else self.allow_gids


_REGION_KEYS = {f.name for f in dataclasses.fields(RegionConfig)}
_TOP_KEYS = {"state_dir", "allow_uids", "allow_gids", "socket_group", "log_level", "region"}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(field, f"must be in {low}..{high}, got {value}")
    return value


def _ids(value: Any, field: str, kind: str = "uids") -> list[int]:
    if not isinstance(value, list):
        raise ConfigError(field, f"expected a list of {kind}, got {value!r}")
    return [_int(v, f"{field}[{i}]", 0, 2**32 - 2) for i, v in enumerate(value)]


def parse_group(value: Any, field: str = "socket_group") -> int:
    """The gid of group `value`: a group name, a gid as digits, or an int.

    Raises ConfigError naming `field` for an unknown name or a gid out of range.
    """
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _int(value, field, 0, 2**32 - 2)
    if not isinstance(value, str) or not value:
        raise ConfigError(field, f"expected a group name or gid, got {value!r}")
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(field, f"no group named {value!r} on this host") from None


def region_from_dict(raw: dict[str, Any], where: str) -> RegionConfig:
    """Build and check one RegionConfig from a TOML table; `where` prefixes field names."""
    unknown = set(raw) - _REGION_KEYS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key")
    for key in ("name", "size"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}", "missing")
    name = raw["name"]
    try:
        validate_name(name)
    except ValueError as exc:
        raise ConfigError(f"{where}.name", str(exc)) from None
    if len(name.encode()) > layout.NAME_MAX:
        raise ConfigError(f"{where}.name", f"at most {layout.NAME_MAX} bytes")
    region = RegionConfig(name=name, size=config_size(raw["size"], f"{where}.size"))
    if region.size & (region.size - 1):
        # QEMU maps the region as PCI BAR2 and aborts (pci_register_bar assertion) otherwise.
        raise ConfigError(
            f"{where}.size", f"{region.size} is not a power of two, which QEMU's ivshmem needs"
        )
    if "max_peers" in raw:
        region.max_peers = _int(raw["max_peers"], f"{where}.max_peers", 2, 256)
    if "vectors" in raw:
        region.vectors = _int(raw["vectors"], f"{where}.vectors", 1, MAX_VECTORS)
    if "queue_num" in raw:
        region.queue_num = _int(raw["queue_num"], f"{where}.queue_num", 2, layout.QUEUE_NUM_MAX)
    if "vring_align" in raw:
        region.vring_align = _int(raw["vring_align"], f"{where}.vring_align", 4, layout.PAGE_SIZE)
    if raw.get("max_span") is not None:
        region.max_span = config_size(raw["max_span"], f"{where}.max_span")
    if raw.get("socket") is not None:
        if not isinstance(raw["socket"], str) or not raw["socket"]:
            raise ConfigError(f"{where}.socket", f"expected a path, got {raw['socket']!r}")
        region.socket = os.path.abspath(raw["socket"])
    if raw.get("allow_uids") is not None:
        region.allow_uids = _ids(raw["allow_uids"], f"{where}.allow_uids")
    if raw.get("allow_gids") is not None:
        region.allow_gids = _ids(raw["allow_gids"], f"{where}.allow_gids", "gids")
    if "unlink_on_exit" in raw:
        if not isinstance(raw["unlink_on_exit"], bool):
            raise ConfigError(f"{where}.unlink_on_exit", "expected true or false")
        region.unlink_on_exit = raw["unlink_on_exit"]
    try:
        region.geometry()
    except ValueError as exc:
        raise ConfigError(f"{where}.size", f"geometry does not fit: {exc}") from None
    return region


def config_from_dict(raw: dict[str, Any]) -> BrokerConfig:
    """Build and check a BrokerConfig from a parsed TOML document."""
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown key")
    tables = raw.get("region", [])
    if not isinstance(tables, list):
        raise ConfigError("region", "use [[region]] tables")
    regions = [region_from_dict(t, f"region[{i}]") for i, t in enumerate(tables)]
    config = BrokerConfig(regions=regions)
    if raw.get("state_dir") is not None:
        if not isinstance(raw["state_dir"], str) or not raw["state_dir"]:
            raise ConfigError("state_dir", f"expected a path, got {raw['state_dir']!r}")
        config.state_dir = os.path.abspath(raw["state_dir"])
    if raw.get("allow_uids") is not None:
        config.allow_uids = _ids(raw["allow_uids"], "allow_uids")
    if raw.get("allow_gids") is not None:
        config.allow_gids = _ids(raw["allow_gids"], "allow_gids", "gids")
    if raw.get("socket_group") is not None:
        config.socket_group = parse_group(raw["socket_group"], "socket_group")
    if "log_level" in raw:
        if raw["log_level"] not in _LOG_LEVELS:
            raise ConfigError("log_level", f"one of {', '.join(_LOG_LEVELS)}")
        config.log_level = raw["log_level"]
    check_unique(config)
    return config


def check_unique(config: BrokerConfig) -> None:
    """Raise ConfigError if two regions share a name or a socket path."""
    names: set[str] = set()
    sockets: set[str] = set()
    for i, region in enumerate(config.regions):
        if region.name in names:
            raise ConfigError(f"region[{i}].name", f"{region.name!r} appears twice")
        names.add(region.name)
        path = region.socket_path(config.state_dir)
        if path in sockets:
            raise ConfigError(f"region[{i}].socket", f"{path} appears twice")
        sockets.add(path)


def load_config(path: str) -> BrokerConfig:
    """Read a TOML file. Raises ConfigError (field "file" for unreadable or invalid TOML)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("file", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes before it parses (found by fuzzing)
        detail = f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        raise ConfigError("file", detail) from None
    return config_from_dict(raw)
