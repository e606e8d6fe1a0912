"""`Status`: source, tag, error and byte count of a completed receive, with mpi4py's getters."""

from __future__ import annotations

from typing import Any

from guest_lib.mpi import constants
from guest_lib.mpi.datatypes import BYTE, Datatype


class Status:
    """What a receive (or probe) matched. A fresh Status has ANY_SOURCE / ANY_TAG / 0 bytes."""

    __slots__ = ("cancelled", "count", "error", "source", "tag")
    source: int
    tag: int
    error: int
    count: int  # bytes
    cancelled: bool

    def __init__(self, status: Status | None = None) -> None:
        if status is not None:
            self.source, self.tag, self.error = status.source, status.tag, status.error
            self.count, self.cancelled = status.count, status.cancelled
        else:
            self.source = constants.ANY_SOURCE
            self.tag = constants.ANY_TAG
            self.error = 0
            self.count = 0  # bytes
            self.cancelled = False

    def _set(self, source: int, tag: int, count: int, error: int = 0) -> None:
        self.source, self.tag, self.count, self.error = source, tag, count, error
        self.cancelled = False

    def Get_source(self) -> int:
        return self.source

    def Set_source(self, source: int) -> None:
        self.source = source

    def Get_tag(self) -> int:
        return self.tag

    def Set_tag(self, tag: int) -> None:
        self.tag = tag

    def Get_error(self) -> int:
        return self.error

    def Set_error(self, error: int) -> None:
        self.error = error

    def Get_count(self, datatype: Datatype = BYTE) -> int:
        """Whole elements of `datatype` received; UNDEFINED if the bytes are not a multiple."""
        size = datatype.Get_size()
        if size == 0:
            return 0
        whole, rest = divmod(self.count, size)
        return constants.UNDEFINED if rest else whole

    def Get_elements(self, datatype: Datatype) -> int:
        """Basic elements received (the base type's count for derived types)."""
        base = datatype.base.Get_size() if datatype.base is not None else datatype.Get_size()
        if base == 0:
            return 0
        whole, rest = divmod(self.count, base)
        return constants.UNDEFINED if rest else whole

    def Set_elements(self, datatype: Datatype, count: int) -> None:
        self.count = count * datatype.Get_size()

    def Is_cancelled(self) -> bool:
        return self.cancelled

    def Set_cancelled(self, flag: bool) -> None:
        self.cancelled = bool(flag)

    def py2f(self) -> list[int]:
        return [self.count, int(self.cancelled), self.source, self.tag, self.error]

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Status) and self.py2f() == other.py2f()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Status(source={self.source}, tag={self.tag}, count={self.count}, error={self.error})"
        )
