"""`MPI.Exception` and the error classes, with MPICH's numeric values.

Every error this package raises on purpose for an MPI-level failure is an `Exception` whose
`Get_error_class()` is one of the ERR_* constants (e.g. ERR_TRUNCATE when a receive buffer is
smaller than the matched message). Argument errors a Python caller makes (a bad rank, a tag
out of range) are also MPI.Exception, as in mpi4py.
"""

from __future__ import annotations

import builtins

SUCCESS = 0
ERR_BUFFER = 1
ERR_COUNT = 2
ERR_TYPE = 3
ERR_TAG = 4
ERR_COMM = 5
ERR_RANK = 6
ERR_ROOT = 7
ERR_GROUP = 8
ERR_OP = 9
ERR_TOPOLOGY = 10
ERR_DIMS = 11
ERR_ARG = 12
ERR_UNKNOWN = 13
ERR_TRUNCATE = 14
ERR_OTHER = 15
ERR_INTERN = 16
ERR_IN_STATUS = 17
ERR_PENDING = 18
ERR_REQUEST = 19
ERR_INFO = 28
ERR_INFO_KEY = 29
ERR_INFO_VALUE = 30
ERR_INFO_NOKEY = 31
ERR_NO_MEM = 34
ERR_LASTCODE = 0x3FFFFFFF

_NAMES = {
    value: name for name, value in globals().items() if name.startswith("ERR_") or name == "SUCCESS"
}


class Exception(
    builtins.RuntimeError
):  # the name mpi4py uses (shadows the builtin inside MPI only)
    """An MPI error. `error_code` (also `Get_error_code()`) and `Get_error_class()`."""

    def __init__(self, ierr: int = ERR_OTHER, detail: str = "") -> None:
        self.error_code = int(ierr)
        self.detail = detail
        text = Get_error_string(self.error_code)
        super().__init__(f"{text}: {detail}" if detail else text)

    def Get_error_code(self) -> int:
        return self.error_code

    def Get_error_class(self) -> int:
        return self.error_code

    def Get_error_string(self) -> str:
        return Get_error_string(self.error_code)

    @property
    def error_class(self) -> int:
        return self.error_code

    @property
    def error_string(self) -> str:
        return Get_error_string(self.error_code)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int):
            return self.error_code == other
        return builtins.Exception.__eq__(self, other)

    def __hash__(self) -> int:
        return hash(self.error_code)

    def __int__(self) -> int:
        return self.error_code


def Get_error_string(errorcode: int) -> str:
    """A message naming the error class, e.g. 'MPI_ERR_TRUNCATE: message truncated'."""
    name = _NAMES.get(errorcode, "MPI_ERR_UNKNOWN")
    extra = {ERR_TRUNCATE: "message truncated", ERR_RANK: "invalid rank", ERR_TAG: "invalid tag"}
    return f"MPI_{name}" + (f": {extra[errorcode]}" if errorcode in extra else "")


def Get_error_class(errorcode: int) -> int:
    """Error codes are their own classes here."""
    return errorcode
