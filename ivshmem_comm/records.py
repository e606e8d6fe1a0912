"""Broker records: where a broker keeps its state, and what it leaves there for others.

A broker serving region NAME keeps, in its *state directory* (private, mode 0700, see
:func:`ivshmem_comm.hostos.ensure_private_dir`):

* ``NAME.sock``: its UNIX socket (unless configured elsewhere), speaking
  :mod:`ivshmem_comm.protocol`;
* ``NAME.lock``: the lock one broker per region holds (flock);
* ``NAME.json``: the *record*, a JSON object written atomically (mode 0600) once the socket
  listens, and updated by nothing else::

      {"name": "job1", "socket": "/run/ivshmem-broker/job1.sock", "vectors": 2,
       "size": 67108864, "max_peers": 8}

The broker writes records (:func:`write_record`); ``guest_lib.attach`` (to find the broker of
a region by name), ``ivshmem-broker status/qemu-args/destroy`` and the lab read them
(:func:`read_record`). A record is advice: the socket it names may be gone.
"""

from __future__ import annotations

import json
import os
from typing import Any, TypedDict

__all__ = ["BrokerRecord", "default_state_dir", "read_record", "record_path", "write_record"]


class BrokerRecord(TypedDict):
    """The fields of a record (all present in what :func:`read_record` returns)."""

    name: str
    socket: str
    vectors: int
    size: int
    max_peers: int


_FIELD_TYPES = {"name": str, "socket": str, "vectors": int, "size": int, "max_peers": int}


def default_state_dir() -> str:
    """Where sockets, locks and records live unless configured.

    ``$IVSHMEM_BROKER_DIR``, else ``$XDG_RUNTIME_DIR/ivshmem-broker``, else
    ``/run/ivshmem-broker`` for root, else ``/tmp/ivshmem-broker-<uid>``.
    """
    explicit = os.environ.get("IVSHMEM_BROKER_DIR")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "ivshmem-broker")
    if os.geteuid() == 0:
        return "/run/ivshmem-broker"
    return f"/tmp/ivshmem-broker-{os.geteuid()}"


def record_path(state_dir: str, name: str) -> str:
    """The path of region `name`'s record in `state_dir`."""
    return os.path.join(state_dir, f"{name}.json")


def write_record(state_dir: str, record: BrokerRecord) -> None:
    """Atomically write `record` (mode 0600) as the record of region ``record["name"]``.

    A reader sees the old record or the new one, never a mix. OSError propagates.
    """
    path = record_path(state_dir, record["name"])
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def read_record(state_dir: str, name: str) -> BrokerRecord | None:
    """The record a broker left for region `name` in `state_dir`, or None if there is none,
    it cannot be read, or it is not a JSON object with every field of the right type."""
    try:
        with open(record_path(state_dir, name)) as f:
            raw: Any = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    for key, kind in _FIELD_TYPES.items():
        value = raw.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return None
    return BrokerRecord(
        name=raw["name"],
        socket=raw["socket"],
        vectors=raw["vectors"],
        size=raw["size"],
        max_peers=raw["max_peers"],
    )
