"""The MPI names of mpi4py over ivshmem regions (and mpi4py): `from guest_lib.mpi import MPI`.

Importing this module bootstraps the process (see `bootstrap`): COMM_WORLD, COMM_SELF and
the engine exist from then on, as with mpi4py (which initialises MPI at import). Finalize
runs at exit (a world barrier, then the region endpoint is closed), unless an uncaught
exception ends the program: then the endpoint is closed at once, so peers waiting on this
rank get an error instead of hanging.
"""

from __future__ import annotations

# (Module objects are taken off this namespace at the end of the module: a function here
# uses what it needs from a module through a name bound to that thing, not `module.thing`.)
import atexit
import sys as _sys
import time as _time
from socket import gethostname as _gethostname
from threading import Lock as _Lock
from threading import get_ident as _get_ident
from time import perf_counter as _perf_counter
from typing import Any

from guest_lib.mpi import bootstrap as _bootstrap
from guest_lib.mpi import comm as _comm
from guest_lib.mpi import constants as _constants
from guest_lib.mpi import dynproc as _dynproc
from guest_lib.mpi import native as _native
from guest_lib.mpi.buffers import Spec as _Spec  # noqa: F401 - re-exported for tools
from guest_lib.mpi.comm import COMM_NULL, Comm, Intracomm
from guest_lib.mpi.constants import (
    ANY_SOURCE,
    ANY_TAG,
    BOTTOM,
    BUFFER_AUTOMATIC,
    COMM_TYPE_SHARED,
    CONGRUENT,
    IDENT,
    IN_PLACE,
    KEY_HOST,
    KEY_IO,
    KEY_WTIME_IS_GLOBAL,
    MAX_PROCESSOR_NAME,
    ORDER_C,
    ORDER_F,
    ORDER_FORTRAN,
    PROC_NULL,
    ROOT,
    SIMILAR,
    SUBVERSION,
    THREAD_FUNNELED,
    THREAD_MULTIPLE,
    THREAD_SERIALIZED,
    THREAD_SINGLE,
    UNDEFINED,
    UNEQUAL,
    VERSION,
    BottomType,
    BufferAutomaticType,
    InPlaceType,
)
from guest_lib.mpi.constants import KEY_TAG_UB as _KEY_TAG_UB
from guest_lib.mpi.constants import TAG_UB as TAG_UB_VALUE
from guest_lib.mpi.datatypes import *  # noqa: F403 - every predefined datatype name
from guest_lib.mpi.datatypes import Datatype, TypeDict, _typealign, _typecode
from guest_lib.mpi.docsig import embed as _embed_signatures
from guest_lib.mpi.errhandler import (
    ERRHANDLER_NULL,
    ERRORS_ABORT,
    ERRORS_ARE_FATAL,
    ERRORS_RETURN,
    Errhandler,
)
from guest_lib.mpi.exceptions import *  # noqa: F403 - SUCCESS and the ERR_* classes
from guest_lib.mpi.exceptions import (
    Add_error_class,
    Add_error_code,
    Add_error_string,
    Exception,
    Get_error_class,
    Get_error_string,
    Remove_error_class,
    Remove_error_code,
    Remove_error_string,
)
from guest_lib.mpi.file import (
    DISPLACEMENT_CURRENT,
    FILE_NULL,
    MODE_APPEND,
    MODE_CREATE,
    MODE_DELETE_ON_CLOSE,
    MODE_EXCL,
    MODE_RDONLY,
    MODE_RDWR,
    MODE_SEQUENTIAL,
    MODE_UNIQUE_OPEN,
    MODE_WRONLY,
    SEEK_CUR,
    SEEK_END,
    SEEK_SET,
    File,
    Register_datarep,
)
from guest_lib.mpi.grequest import Grequest
from guest_lib.mpi.group import GROUP_EMPTY, GROUP_NULL, Group
from guest_lib.mpi.handles import _addressof, _handleof, _sizeof
from guest_lib.mpi.info import INFO_ENV, INFO_NULL, Info
from guest_lib.mpi.intercomm import Intercomm
from guest_lib.mpi.locks import comm_lock as _lock_of
from guest_lib.mpi.locks import lock_table as _lock_table_of
from guest_lib.mpi.memory import (
    BSEND_OVERHEAD,
    Aint_add,
    Aint_diff,
    Alloc_mem,
    Attach_buffer,
    Detach_buffer,
    Flush_buffer,
    Free_mem,
    Get_address,
    Iflush_buffer,
    buffer,
)
from guest_lib.mpi.message import MESSAGE_NO_PROC, MESSAGE_NULL, Message
from guest_lib.mpi.ops import (
    BAND,
    BOR,
    BXOR,
    LAND,
    LOR,
    LXOR,
    MAX,
    MAXLOC,
    MIN,
    MINLOC,
    NO_OP,
    OP_NULL,
    PROD,
    REPLACE,
    SUM,
    Op,
)
from guest_lib.mpi.persistent import Prequest
from guest_lib.mpi.pickling import PICKLE as pickle
from guest_lib.mpi.pickling import Pickle
from guest_lib.mpi.request import REQUEST_NULL, Request
from guest_lib.mpi.session import SESSION_NULL, Session
from guest_lib.mpi.status import F_ERROR, F_SOURCE, F_STATUS_SIZE, F_TAG, Status
from guest_lib.mpi.topology import (
    CART,
    DIST_GRAPH,
    GRAPH,
    UNWEIGHTED,
    WEIGHTS_EMPTY,
    Cartcomm,
    Compute_dims,
    Distgraphcomm,
    Graphcomm,
    Topocomm,
)
from guest_lib.mpi.ulfm import dead_worlds as _dead_worlds
from guest_lib.mpi.win import (
    LOCK_EXCLUSIVE,
    LOCK_SHARED,
    MODE_NOCHECK,
    MODE_NOPRECEDE,
    MODE_NOPUT,
    MODE_NOSTORE,
    MODE_NOSUCCEED,
    WIN_BASE,
    WIN_CREATE_FLAVOR,
    WIN_DISP_UNIT,
    WIN_FLAVOR_ALLOCATE,
    WIN_FLAVOR_CREATE,
    WIN_FLAVOR_DYNAMIC,
    WIN_FLAVOR_SHARED,
    WIN_MODEL,
    WIN_NULL,
    WIN_SEPARATE,
    WIN_SIZE,
    WIN_UNIFIED,
    Win,
)

__TypeDict__ = TypeDict
memory = buffer  # mpi4py's older name
_typedict = TypeDict
# mpi4py's MPI.TAG_UB is the attribute key (`comm.Get_attr(MPI.TAG_UB)` gives the largest
# tag, as mpi4py's demos and suite ask it), not the largest tag: TAG_UB_VALUE is that.
TAG_UB = _KEY_TAG_UB

_world = _bootstrap.init()
_engine = _world.engine
_state = {"initialized": True, "finalized": False, "failed": False}

COMM_WORLD: Intracomm = _comm.Intracomm(
    _engine, list(range(_engine.world_size)), 0, name="MPI_COMM_WORLD"
)
COMM_SELF: Intracomm = _comm.Intracomm(_engine, [_engine.world_rank], 2, name="MPI_COMM_SELF")
if _engine.has_mpi:
    COMM_WORLD._mirror, COMM_WORLD._mirror_coll = _native.world_mirrors()
# the job's hidden service communicator on a reserved context pair (see dynproc)
_engine.used_ctx.update((_dynproc.SERVICE_CTX, _dynproc.SERVICE_CTX + 1))
_service = _comm.Intracomm(_engine, list(range(_engine.world_size)), _dynproc.SERVICE_CTX)
if _engine.has_mpi:
    _service._mirror, _service._mirror_coll = _native.world_mirrors()
_dynproc.setup(_engine, _service, COMM_SELF, _world.job)
Open_port = _dynproc.open_port
Close_port = _dynproc.close_port
Publish_name = _dynproc.publish_name
Unpublish_name = _dynproc.unpublish_name
Lookup_name = _dynproc.lookup_name


def Init() -> None:
    """Nothing to do: importing the module initialised it (as mpi4py does by default)."""


# Threads: every call is safe from any thread (THREAD_MULTIPLE; see guest_lib.mpi.engine).
_MAIN_THREAD = _get_ident()  # the thread that initialised MPI (imported this module)
_THREAD_LEVELS = {
    "single": THREAD_SINGLE,
    "funneled": THREAD_FUNNELED,
    "serialized": THREAD_SERIALIZED,
    "multiple": THREAD_MULTIPLE,
}
_thread_level: list[int] = []  # the level Init_thread granted, once called


def _rc_thread_level() -> int:
    """Return the thread level mpi4py's `rc.thread_level` asks for.

    "multiple", mpi4py's default, when mpi4py is not imported or says nothing else.
    """
    rc = getattr(_MODULES.get("mpi4py"), "rc", None)
    return _THREAD_LEVELS.get(str(getattr(rc, "thread_level", "multiple")).lower(), THREAD_MULTIPLE)


def Init_thread(required: int = THREAD_MULTIPLE) -> int:
    """Return the thread level granted: `required` itself, as every level is supported.

    MPI was initialised at import; this only sets what Query_thread reports. MPI.Exception(ERR_ARG)
    for a value that is no thread level.
    """
    if required not in _THREAD_LEVELS.values():
        raise Exception(ERR_ARG, f"no thread level {required}")  # noqa: F405
    _thread_level[:] = [required]
    return required


def Query_thread() -> int:
    """Return the thread level: what Init_thread granted, else what mpi4py's rc asks for.

    That is `rc.thread_level` (THREAD_MULTIPLE by default, as with mpi4py).
    """
    return _thread_level[0] if _thread_level else _rc_thread_level()


def Is_thread_main() -> bool:
    """True in the thread that initialised MPI (the one that imported this module)."""
    return _get_ident() == _MAIN_THREAD


def Is_initialized() -> bool:
    """Return True once MPI is initialised (at the import of this module)."""
    return _state["initialized"]


def Is_finalized() -> bool:
    """Return True once Finalize has run."""
    return _state["finalized"]


def Finalize() -> None:
    """Barrier over COMM_WORLD, then leave the region; idempotent.

    The barrier is skipped after a failure here, when COMM_WORLD is revoked or a world rank is known
    failed (see ulfm).
    """
    if _state["finalized"]:
        return
    _state["finalized"] = True
    try:
        if (
            not _state["failed"]
            and _engine.world_size > 1
            and COMM_WORLD._ctx not in _engine.revoked
            and not _dead_worlds(_engine, COMM_WORLD._group)
        ):
            COMM_WORLD.Barrier()
    finally:
        closer = _world.closer
        if closer is not None:
            closer.close()


def _on_failure() -> None:
    _state["failed"] = True
    if _world.closer is not None and not _state["finalized"]:
        _state["finalized"] = True
        _world.closer.close()


def _set_abort_status(status: int) -> None:
    """Leave the job as an uncaught exception does when `status` is non-zero (mpi4py.run's hook).

    `python -m mpi4py.futures` calls it when the program fails: the region endpoint is closed now,
    so peers waiting on this rank fail instead of hanging.
    """
    if status:
        _on_failure()


def Abort_local(errorcode: int = 1) -> None:
    """Leave the job now: close the region endpoint, then exit with `errorcode`.

    Not part of mpi4py. Closing the endpoint first makes peers waiting on this rank fail fast. Does
    not return.
    """
    import os
    import sys

    _on_failure()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(errorcode)


_bootstrap.excepthook_installer(_on_failure)
atexit.register(Finalize)


# Wtime is time.perf_counter itself (seconds since an arbitrary point, monotonic, high
# resolution), not a function calling it: a timed loop calls it twice per measurement, and
# mpi4py's is a C call too; a Python wrapper added ~35 ns to every timed call.
Wtime = _perf_counter


def Wtick() -> float:
    """Return the resolution of Wtime in seconds (perf_counter's)."""
    return _TICK


def Get_processor_name() -> str:
    """Return the name of this host (socket.gethostname)."""
    return _gethostname()


def Get_version() -> tuple[int, int]:
    """Return the version of the MPI standard this library follows: (VERSION, SUBVERSION)."""
    return VERSION, SUBVERSION


def Get_library_version() -> str:
    """Return a line naming this library, its fast path and its mode."""
    from ivshmem_comm import IMPLEMENTATION

    return f"guest_lib.mpi over ivshmem_comm ({IMPLEMENTATION} fast path), mode {_world.mode}"


def Wait(request: Request, status: Status | None = None) -> bool:
    """Wait for `request` (request.Wait); return True, `status` filled.

    Raises the MPI.Exception of a failed request (e.g. ERR_TRUNCATE).
    """
    return request.Wait(status)


def get_vendor() -> tuple[str, tuple[int, int, int]]:
    """Return the name and version of this MPI implementation: ("ivshmem_comm", (0, 1, 0))."""
    return "ivshmem_comm", (0, 1, 0)


def Pcontrol(level: int) -> None:
    """Accept a profiling control level and do nothing (no profiler is attached)."""
    pass


def _comm_lock_table(comm: Comm) -> dict[Any, _Lock]:
    """Return mpi4py's per-communicator lock table (see guest_lib.mpi.locks)."""
    return _lock_table_of(comm)


def _comm_lock(comm: Comm, key: Any = None) -> _Lock:
    """Return the lock of `comm` for `key`, made on first use.

    As mpi4py's `_comm_lock`; the object collectives hold the one named after them.
    """
    return _lock_of(comm, key)


_lock_guard = _Lock()  # (see _commctx)


def _commctx_intra(comm: Intracomm) -> tuple[Intracomm, int]:
    """Return (a duplicate of `comm` kept for library traffic, the next tag on it).

    As mpi4py's `_commctx_intra`, which mpi4py.util.pkl5 builds its collectives on. Collective on
    the first call for a communicator (its Dup).
    """
    return _commctx(comm)


def _commctx(comm: Any) -> tuple[Any, int]:
    """Return (the library duplicate of `comm`, the next tag on it).

    The duplicate is made by the collective Dup on the first call; tags count modulo
    TAG_UB_VALUE + 1.
    """
    with _lock_guard:
        ctx = getattr(comm, "_commctx", None)
    if ctx is None:
        ctx = [comm.Dup(), 0]
        comm._commctx = ctx
    dup, tag = ctx
    ctx[1] = (tag + 1) % (TAG_UB_VALUE + 1)
    return dup, tag


def _commctx_inter(comm: Intercomm) -> tuple[Intercomm, int, Intracomm, bool]:
    """Return (library duplicate of `comm`, next tag, its local intracomm, low group or not).

    As mpi4py's `_commctx_inter`: the duplicate kept for library traffic, the next tag on it, that
    duplicate's local intra-communicator, whether the local group is the low one. Collective over
    both groups on the first call for a communicator.
    """
    dup, tag = _commctx(comm)
    return dup, tag, dup._local, dup._low


def _internal_state() -> dict[str, Any]:
    """For tests and tools: the bootstrap mode, region UUID and routes."""
    return {
        "mode": _world.mode,
        "region_uuid": _world.region_uuid,
        "routes": [(route.code, route.peer) for route in _engine.routes],
        "endpoint": _world.endpoint,
        "engine": _engine,
    }


KEYVAL_TAG_UB = _KEY_TAG_UB
KEYVAL_INVALID = _constants.KEYVAL_INVALID
APPNUM = _constants.KEY_APPNUM
UNIVERSE_SIZE = _constants.KEY_UNIVERSE_SIZE
LASTUSEDCODE = _constants.KEY_LASTUSEDCODE
HOST = KEY_HOST  # mpi4py's names of the attribute keys
IO = KEY_IO
WTIME_IS_GLOBAL = KEY_WTIME_IS_GLOBAL


def Get_hw_resource_info() -> Info:
    """Return MPI-4.1's hardware resource information: a new, empty Info.

    No hardware hint is known to this MPI.
    """
    return Info.Create()


def Get_abi_version() -> tuple[int, int]:
    """MPI-5's ABI version: (-1, -1), this MPI is not built on the standard ABI."""
    return -1, -1


def Get_abi_info() -> Info:
    """Return MPI-5's ABI information: a new Info with the sizes of AINT, COUNT and OFFSET.

    Its keys `mpi_aint_size`, `mpi_count_size` and `mpi_offset_size` give them in bytes.
    """
    info = Info.Create()
    for name in ("aint", "count", "offset"):
        info.Set(f"mpi_{name}_size", str(globals()[name.upper()].Get_size()))
    return info


def Get_abi_fortran_info() -> Info:
    """MPI-5's Fortran ABI information: INFO_NULL, this MPI has no Fortran binding."""
    return INFO_NULL


# No module objects in the namespace, as in mpi4py's (mpi4py's test_doc walks vars(MPI) and
# would descend into them, and `from ... import *` would export them): what the functions
# above use from modules is bound to names of its own.
_MODULES = _sys.modules
_TICK = _time.get_clock_info("perf_counter").resolution
for _name in [name for name, value in globals().items() if isinstance(value, type(_sys))]:
    del globals()[_name]
del _name

__all__ = [name for name in dir() if not name.startswith("_") and name != "annotations"]
# Docstrings laid out as mpi4py's: a signature line, a blank line, the text (see docsig).
_embed_signatures(_MODULES[__name__])
_unused = (  # names re-exported on purpose (mpi4py's MPI namespace), not used here
    ANY_SOURCE, ANY_TAG, BOTTOM, CONGRUENT, IDENT, IN_PLACE, KEY_HOST, KEY_IO,
    KEY_WTIME_IS_GLOBAL, MAX_PROCESSOR_NAME, PROC_NULL, ROOT, SIMILAR, THREAD_FUNNELED,
    THREAD_SERIALIZED, UNDEFINED, UNEQUAL, COMM_NULL, Comm, Datatype, Exception,
    Get_error_class, Get_error_string, Add_error_class, Add_error_code, Add_error_string,
    Remove_error_class, Remove_error_code, Remove_error_string, BAND, BOR, BXOR, LAND, LOR,
    LXOR, MAX, MAXLOC, MIN,
    MINLOC, NO_OP, OP_NULL, PROD, REPLACE, SUM, Op, REQUEST_NULL, TAG_UB_VALUE, Pickle, pickle,
    CART, DIST_GRAPH, GRAPH, Cartcomm, Compute_dims, Distgraphcomm, Graphcomm, Topocomm,
    UNWEIGHTED, WEIGHTS_EMPTY, GROUP_EMPTY, GROUP_NULL, Group, Intercomm,
    MESSAGE_NO_PROC, MESSAGE_NULL, Message,
    Prequest, Grequest, Session, SESSION_NULL, BUFFER_AUTOMATIC,
    COMM_TYPE_SHARED, INFO_ENV, INFO_NULL, Info, BSEND_OVERHEAD, Aint_add,
    Aint_diff,
    Alloc_mem, Attach_buffer, Detach_buffer, Free_mem, Get_address, buffer, Flush_buffer,
    Iflush_buffer, ORDER_C, ORDER_F, _typealign, _typecode, _sizeof, _addressof, _handleof,
    BottomType, InPlaceType,
    BufferAutomaticType,
    ORDER_FORTRAN, ERRHANDLER_NULL, ERRORS_ABORT, ERRORS_ARE_FATAL, ERRORS_RETURN, Errhandler,
    LOCK_EXCLUSIVE, LOCK_SHARED, MODE_NOCHECK, MODE_NOPRECEDE, MODE_NOPUT, MODE_NOSTORE,
    MODE_NOSUCCEED, WIN_BASE, WIN_CREATE_FLAVOR, WIN_DISP_UNIT, WIN_FLAVOR_ALLOCATE,
    WIN_FLAVOR_CREATE, WIN_FLAVOR_DYNAMIC, WIN_FLAVOR_SHARED, WIN_MODEL, WIN_NULL, WIN_SEPARATE,
    WIN_SIZE, WIN_UNIFIED, Win, DISPLACEMENT_CURRENT, FILE_NULL, MODE_APPEND, MODE_CREATE,
    MODE_DELETE_ON_CLOSE, MODE_EXCL, MODE_RDONLY, MODE_RDWR, MODE_SEQUENTIAL, MODE_UNIQUE_OPEN,
    MODE_WRONLY, SEEK_CUR, SEEK_END, SEEK_SET, File, Register_datarep, F_ERROR, F_SOURCE,
    F_STATUS_SIZE, F_TAG,
)  # fmt: skip
