"""Byte sizes as people write them: ``4096``, ``64K``, ``16M``, ``1G``, ``512KiB``, ``1MB``.

One dialect for every command line and file of the project (the broker's ``--size`` and TOML
config, ``ivshmem-run --size/--max-span``, the lab's ``shm:NAME:SIZE`` devices, the
benchmarks' ``--sizes``): a whole number of bytes, optionally followed by a binary suffix
``K``, ``M``, ``G`` or ``T`` (1024-based, any case) and an optional ``B`` or ``iB``. White
space around it is allowed; fractions, signs and other units are not.
"""

from __future__ import annotations

import re

__all__ = ["parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Return the byte count `value` names: an int as is, a string read as described above.

    The result is >= 0 (callers that need a positive size check it themselves). Raises
    ValueError for a negative int, a bool, another type, or a string outside the dialect
    (the message quotes it and shows examples).
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    match = _SIZE_RE.fullmatch(value)
    if not match:
        raise ValueError(f"cannot read size {value!r}: use e.g. 4096, 64K, 16M, 1G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]
