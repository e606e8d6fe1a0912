"""MPI-4 sessions (`MPI.Session`), over the job this process already belongs to.

`Session.Init()` gives a live session; its process sets are "mpi://WORLD" (every rank of
the job, as COMM_WORLD) and "mpi://SELF" (this process). `Create_group(pset)` gives the
group of a set, from which `Intracomm.Create_from_group` makes a communicator, as MPI-4
programs do. `Get_pset_info(pset)` says its "mpi_size"; `Get_info()` is empty (no hint is
acted on). A session has its own Bsend buffer slot (Attach_buffer / Detach_buffer, as a
communicator's) and error handler (Set_errhandler..., ERRORS_RETURN at start).
`Finalize()` makes the handle null; it does not end the job (COMM_WORLD's Finalize does).
MPI.Exception(ERR_SESSION) for a call on a null session, ERR_ARG for an unknown set.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from guest_lib.mpi import errhandler, exceptions, memory
from guest_lib.mpi.group import Group
from guest_lib.mpi.handles import Handle, Same
from guest_lib.mpi.info import Info

PSETS = ("mpi://WORLD", "mpi://SELF")


class Session(Handle):
    """A session handle (see the module docstring); Session() is SESSION_NULL."""

    def __init__(self, session: Session | None = None) -> None:
        if session is not None and not isinstance(session, Session):
            raise TypeError(f"expecting a Session, got {type(session).__name__}")
        self._state: dict[str, Any] | None = None if session is None else session._state

    @classmethod
    def Init(cls, info: Any = None, errhandler: Any = None) -> Session:
        """A live session (`info` kept as no hint is acted on; `errhandler` set on it)."""
        session = cls()
        session._state = {"buffer": memory.BufferSlot()}
        if errhandler is not None:
            session.Set_errhandler(errhandler)
        return session

    def _check(self) -> dict[str, Any]:
        if self._state is None:
            raise exceptions.Exception(exceptions.ERR_SESSION, "null session")
        return self._state

    def Finalize(self) -> None:
        """End the session: this handle becomes SESSION_NULL."""
        self._check()
        self._state = None

    def _release(self) -> None:
        """Free the handle: end the session (Finalize)."""
        self.Finalize()

    def Get_num_psets(self, info: Any = None) -> int:
        """Return the number of process sets: "mpi://WORLD" and "mpi://SELF"."""
        self._check()
        return len(PSETS)

    def Get_nth_pset(self, n: int, info: Any = None) -> str:
        """The name of process set `n`; MPI.Exception(ERR_ARG) out of range."""
        self._check()
        if not 0 <= n < len(PSETS):
            raise exceptions.Exception(exceptions.ERR_ARG, f"no process set {n}")
        return PSETS[n]

    def _members(self, pset: str) -> Group:
        from guest_lib.mpi import MPI

        self._check()
        if pset.lower() == PSETS[0].lower():  # (set names are case-insensitive)
            return MPI.COMM_WORLD.Get_group()
        if pset.lower() == PSETS[1].lower():
            return MPI.COMM_SELF.Get_group()
        raise exceptions.Exception(exceptions.ERR_ARG, f"no process set {pset!r}")

    def Get_pset_info(self, pset_name: str) -> Info:
        """A new Info with the set's "mpi_size"."""
        group = self._members(pset_name)
        return Info.Create({"mpi_size": str(group.Get_size())})

    def Create_group(self, pset_name: str) -> Group:
        """The group of a process set (this process's rank in it as in COMM_WORLD)."""
        return self._members(pset_name)

    def Get_info(self) -> Info:
        """Return a new, empty Info: this session has no hints."""
        self._check()
        return Info.Create()

    # Bsend buffer of the session (MPI-4.1)
    def Attach_buffer(self, buf: Any) -> None:
        """Record `buf` (or BUFFER_AUTOMATIC) as the session's buffer (memory.BufferSlot)."""
        self._check()["buffer"].attach(buf)

    def Detach_buffer(self) -> Any:
        """The buffer Attach_buffer recorded (None when there is none)."""
        return self._check()["buffer"].detach()

    def Flush_buffer(self) -> None:
        """As MPI.Flush_buffer: nothing is ever left buffered here."""
        self._check()

    def Iflush_buffer(self) -> Any:
        """Return a request that is complete already (see MPI.Flush_buffer)."""
        self._check()
        return memory.Iflush_buffer()

    Set_errhandler = errhandler.set_errhandler
    Get_errhandler = errhandler.get_errhandler
    Call_errhandler = errhandler.call_errhandler

    @staticmethod
    def Create_errhandler(function: Any) -> errhandler.Errhandler:
        """Create an error handler for sessions from `function(session, errorcode)`."""
        return errhandler.create_errhandler(function, "Session")

    def __bool__(self) -> bool:
        return self._state is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Session):
            return NotImplemented
        return self._state is other._state

    def _key(self) -> Hashable:
        return Same(self._state)

    def __reduce__(self) -> Any:
        """SESSION_NULL unpickles as itself; a live session raises ValueError (as mpi4py)."""
        if self._state is None:
            return (_null, ()) if self is SESSION_NULL else (type(self), ())
        raise ValueError("cannot serialize a session")

    def __repr__(self) -> str:
        return "<Session null>" if self._state is None else "<Session>"


def _null() -> Session:
    return SESSION_NULL


SESSION_NULL = Session()
