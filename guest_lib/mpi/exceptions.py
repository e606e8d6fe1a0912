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
ERR_ACCESS = 20
ERR_AMODE = 21
ERR_BAD_FILE = 22
ERR_CONVERSION = 23
ERR_DUP_DATAREP = 24
ERR_FILE_EXISTS = 25
ERR_FILE_IN_USE = 26
ERR_FILE = 27
ERR_INFO = 28
ERR_INFO_KEY = 29
ERR_INFO_VALUE = 30
ERR_INFO_NOKEY = 31
ERR_IO = 32
ERR_NAME = 33
ERR_NO_MEM = 34
ERR_NOT_SAME = 35
ERR_NO_SPACE = 36
ERR_NO_SUCH_FILE = 37
ERR_PORT = 38
ERR_QUOTA = 39
ERR_READ_ONLY = 40
ERR_SERVICE = 41
ERR_SPAWN = 42
ERR_UNSUPPORTED_DATAREP = 43
ERR_UNSUPPORTED_OPERATION = 44
ERR_WIN = 45
ERR_BASE = 46
ERR_LOCKTYPE = 47
ERR_KEYVAL = 48
ERR_RMA_CONFLICT = 49
ERR_RMA_SYNC = 50
ERR_SIZE = 51
ERR_DISP = 52
ERR_ASSERT = 53
ERR_RMA_RANGE = 55
ERR_RMA_ATTACH = 56
ERR_RMA_SHARED = 57
ERR_RMA_FLAVOR = 58
ERR_SESSION = 75
ERR_PROC_ABORTED = 76
ERR_VALUE_TOO_LARGE = 77
ERR_ERRHANDLER = 80
ERR_LASTCODE = 0x3FFFFFFF
ERR_ABI = ERR_LASTCODE  # MPICH's values (no ABI errors there)
ERR_PROC_FAILED = 101  # fault tolerance (ULFM, see ulfm.py): MPICH's MPIX_ERR_* values
ERR_PROC_FAILED_PENDING = 102
ERR_REVOKED = 103

_NAMES: dict[int, str] = {}
for _name, _value in list(globals().items()):
    if _name.startswith("ERR_") or _name == "SUCCESS":
        _NAMES.setdefault(_value, _name)  # the first name of a value (ERR_UNKNOWN, not ...)

# Error classes and codes added by Add_error_class / Add_error_code (MPI-2, removable in
# MPI-4.1): code -> its class (a class is its own class), and the strings given to them.
# Local to the process, as MPI allows: no rank learns another's additions.
_added: dict[int, int] = {}
_strings: dict[int, str] = {}
_last_used = [ERR_LASTCODE]  # LASTUSEDCODE: the largest code or class added so far


class Exception(
    builtins.RuntimeError
):  # the name mpi4py uses (shadows the builtin inside MPI only)
    """An MPI error. `error_code` (also `Get_error_code()`) and `Get_error_class()`."""

    def __init__(self, ierr: int = ERR_OTHER, detail: str = "") -> None:
        code = int(ierr)
        self.error_code = ERR_UNKNOWN if code < SUCCESS else code  # as mpi4py
        self.detail = detail
        text = _string(self.error_code)
        super().__init__(f"{text}: {detail}" if detail else text)

    def __repr__(self) -> str:
        return f"MPI.Exception({self.error_code})"

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        """Pickle as (code, detail): it unpickles as the same error.

        So an error sent to other ranks (in an object collective) is the same error there.
        """
        return (type(self), (self.error_code, self.detail))

    def __bool__(self) -> bool:
        return self.error_code != SUCCESS

    def __lt__(self, other: object) -> bool:
        return self.error_code < int(other)  # type: ignore[call-overload]

    def __le__(self, other: object) -> bool:
        return self.error_code <= int(other)  # type: ignore[call-overload]

    def __gt__(self, other: object) -> bool:
        return self.error_code > int(other)  # type: ignore[call-overload]

    def __ge__(self, other: object) -> bool:
        return self.error_code >= int(other)  # type: ignore[call-overload]

    def Get_error_code(self) -> int:
        """Return the error code."""
        return self.error_code

    def Get_error_class(self) -> int:
        """Return the class of the error code (see the module's Get_error_class)."""
        return Get_error_class(self.error_code)

    def Get_error_string(self) -> str:
        """Return the message of the error code (see the module's Get_error_string)."""
        return Get_error_string(self.error_code)

    @property
    def error_class(self) -> int:
        """Error class of the error code (Get_error_class)."""
        return Get_error_class(self.error_code)

    @property
    def error_string(self) -> str:
        """Message of the error code (Get_error_string)."""
        return Get_error_string(self.error_code)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int | Exception):
            return self.error_code == int(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self.error_code)

    def __int__(self) -> int:
        return self.error_code


def _string(errorcode: int) -> str:
    if errorcode > ERR_LASTCODE:
        return _strings.get(errorcode, "")
    name = _NAMES.get(errorcode, "ERR_UNKNOWN")
    extra = {ERR_TRUNCATE: "message truncated", ERR_RANK: "invalid rank", ERR_TAG: "invalid tag"}
    return f"MPI_{name}" + (f": {extra[errorcode]}" if errorcode in extra else "")


def _known(errorcode: int) -> int:
    """`errorcode` as an int; MPI.Exception(ERR_ARG) if it is neither predefined nor added."""
    code = int(errorcode)
    if not (SUCCESS <= code <= ERR_LASTCODE or code in _added):
        raise Exception(ERR_ARG, f"error code {code} is not known")
    return code


def Get_error_string(errorcode: int) -> str:
    """Return the message of an error class or code, e.g. 'MPI_ERR_TRUNCATE: message truncated'.

    For an added class or code, the string Add_error_string gave it ("" if none).
    MPI.Exception(ERR_ARG) for a code that is neither.
    """
    return _string(_known(errorcode))


def Get_error_class(errorcode: int) -> int:
    """Return the class of an error code.

    Predefined codes are their own classes; an added code has the class it was added to.
    MPI.Exception(ERR_ARG) for an unknown code.
    """
    code = _known(errorcode)
    return _added.get(code, code)


def _new_code(errorclass: int) -> int:
    code = _last_used[0] = _last_used[0] + 1
    _added[code] = code if errorclass < 0 else errorclass
    return code


def Add_error_class() -> int:
    """A new error class (> ERR_LASTCODE, as LASTUSEDCODE then says), with no string."""
    return _new_code(-1)


def Add_error_code(errorclass: int) -> int:
    """Return a new error code of `errorclass` (predefined or added).

    MPI.Exception(ERR_ARG) if the class is not known or is an added code rather than a class.
    """
    errorclass = _known(errorclass)
    if _added.get(errorclass, errorclass) != errorclass:
        raise Exception(ERR_ARG, f"{errorclass} is an error code, not a class")
    return _new_code(errorclass)


def Add_error_string(errorcode: int, string: str) -> None:
    """Give an added class or code its string (replacing any).

    MPI.Exception(ERR_ARG) for a predefined or unknown code.
    """
    _removable(errorcode)
    _strings[int(errorcode)] = str(string)


def _removable(errorcode: int) -> int:
    code = int(errorcode)
    if code not in _added:
        raise Exception(ERR_ARG, f"error code {code} was not added (Add_error_class/code)")
    return code


def Remove_error_string(errorcode: int) -> None:
    """Remove the string of an added class or code (MPI-4.1).

    MPI.Exception(ERR_ARG) for a predefined or unknown code.
    """
    _strings.pop(_removable(errorcode), None)


def Remove_error_code(errorcode: int) -> None:
    """Remove an added error code (MPI-4.1).

    MPI.Exception(ERR_ARG) for a class, a code not added, or one that still has a string.
    """
    code = _removable(errorcode)
    if _added[code] == code or code in _strings:
        raise Exception(ERR_ARG, f"error code {code}: a class, or its string is still set")
    del _added[code]


def Remove_error_class(errorclass: int) -> None:
    """Remove an added error class (MPI-4.1).

    MPI.Exception(ERR_ARG) for a code, a class not added, or one that still has codes or a string.
    """
    code = _removable(errorclass)
    users = [c for c, cls in _added.items() if cls == code and c != code]
    if _added[code] != code or users or code in _strings:
        raise Exception(ERR_ARG, f"error class {code}: a code, or it still has codes or a string")
    del _added[code]


def last_used_code() -> int:
    """Return the value of the LASTUSEDCODE attribute: the largest class or code added so far.

    ERR_LASTCODE before any.
    """
    return _last_used[0]
