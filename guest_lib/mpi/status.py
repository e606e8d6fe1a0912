"""`Status`: source, tag, error and byte count of a completed receive, with mpi4py's getters."""

from __future__ import annotations

import array
from typing import Any

from guest_lib.mpi import constants
from guest_lib.mpi.datatypes import BYTE, Datatype

_COUNT, _CANCELLED, _SOURCE, _TAG, _ERROR = range(5)
# a status as a Fortran integer array (py2f/f2py): the fields in this order, as MPICH's
F_SOURCE, F_TAG, F_ERROR, F_STATUS_SIZE = _SOURCE, _TAG, _ERROR, 5


def _field(index: int, doc: str) -> property:
    def get(self: Status) -> int:
        return self._fields[index]

    def put(self: Status, value: int) -> None:
        self._fields[index] = int(value)

    return property(get, put, doc=doc)


class Status:
    """What a receive (or probe) matched. A fresh Status has ANY_SOURCE / ANY_TAG / 0 bytes.

    The fields live in one array of five 64-bit integers (count in bytes, cancelled, source,
    tag, error), which `tomemory()` exposes as a writable memoryview, as mpi4py's does."""

    __slots__ = ("__weakref__", "_fields")
    count = _field(_COUNT, "Bytes received.")
    source = _field(_SOURCE, "The sender's rank.")
    tag = _field(_TAG, "The message's tag.")
    error = _field(_ERROR, "The error class of the operation.")

    def __init__(self, status: Status | None = None) -> None:
        if status is None:
            self._fields = array.array("q", [0, 0, constants.ANY_SOURCE, constants.ANY_TAG, 0])
        elif isinstance(status, Status):
            self._fields = array.array("q", status._fields)
        else:
            raise TypeError(f"Status: expecting a Status, got {type(status).__name__}")

    def __reduce__(self) -> tuple[Any, tuple[()], tuple[int, ...]]:
        """Copies and pickles as a new status of this class with the same fields."""
        return (type(self), (), tuple(self._fields))

    def __setstate__(self, fields: tuple[int, ...]) -> None:
        self._fields = array.array("q", fields)

    @property
    def cancelled(self) -> bool:
        """True iff the operation was cancelled (Is_cancelled)."""
        return bool(self._fields[_CANCELLED])

    @cancelled.setter
    def cancelled(self, flag: bool) -> None:
        self._fields[_CANCELLED] = bool(flag)

    def _set(self, source: int, tag: int, count: int, error: int = 0) -> None:
        fields = self._fields
        fields[_COUNT], fields[_CANCELLED], fields[_SOURCE] = count, 0, source
        fields[_TAG], fields[_ERROR] = tag, error

    def tomemory(self) -> memoryview:
        """Return the status's memory: a writable view of its five 64-bit fields.

        The fields: count in bytes, cancelled, source, tag, error; writing it changes the status.
        """
        return memoryview(self._fields)

    def Get_source(self) -> int:
        """Return the source of the message (the `source` attribute)."""
        return self.source

    def Set_source(self, source: int) -> None:
        """Set the source of the message (the `source` attribute)."""
        self.source = source

    def Get_tag(self) -> int:
        """Return the tag of the message (the `tag` attribute)."""
        return self.tag

    def Set_tag(self, tag: int) -> None:
        """Set the tag of the message (the `tag` attribute)."""
        self.tag = tag

    def Get_error(self) -> int:
        """Return the error code of the operation (the `error` attribute)."""
        return self.error

    def Set_error(self, error: int) -> None:
        """Set the error code of the operation (the `error` attribute)."""
        self.error = error

    def Get_count(self, datatype: Datatype = BYTE) -> int:
        """Whole elements of `datatype` received; UNDEFINED if the bytes are not a multiple.
        MPI.Exception(ERR_TYPE) for DATATYPE_NULL (so for Get_elements, Set_elements)."""
        datatype._check_handle()
        size = datatype.Get_size()
        if size == 0:
            return 0
        whole, rest = divmod(self.count, size)
        return constants.UNDEFINED if rest else whole

    def Get_elements(self, datatype: Datatype) -> int:
        """Basic elements received (the base type's count for derived types)."""
        datatype._check_handle()
        base = datatype.base.Get_size() if datatype.base is not None else datatype.Get_size()
        if base == 0:
            return 0
        whole, rest = divmod(self.count, base)
        return constants.UNDEFINED if rest else whole

    def Set_elements(self, datatype: Datatype, count: int) -> None:
        """The status now says `count` elements of `datatype` were received."""
        datatype._check_handle()
        self.count = count * datatype.Get_size()

    def Is_cancelled(self) -> bool:
        """Return True iff the operation was cancelled."""
        return self.cancelled

    def Set_cancelled(self, flag: bool) -> None:
        """Mark the operation cancelled or not (`flag`)."""
        self.cancelled = bool(flag)

    def py2f(self) -> list[int]:
        """Return the status as a Fortran integer array of F_STATUS_SIZE integers.

        The source is at F_SOURCE, the tag at F_TAG, the error at F_ERROR.
        """
        return list(self._fields)

    @classmethod
    def f2py(cls, arg: Any) -> Status:
        """Return a new Status from a py2f array.

        ValueError unless it holds F_STATUS_SIZE integers.
        """
        fields = [int(value) for value in arg]
        if len(fields) != F_STATUS_SIZE:
            raise ValueError(f"Status.f2py: expecting {F_STATUS_SIZE} integers, got {len(fields)}")
        status = cls()
        status._fields = array.array("q", fields)
        return status

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Status) and self.py2f() == other.py2f()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Status(source={self.source}, tag={self.tag}, count={self.count}, error={self.error})"
        )
