"""Dynamic process management between the processes of one job: ports, the name service,
Accept/Connect, Join.

A job's processes are the ones its launcher started (Spawn stays out, see comm._NO_SPAWN):
the transport's peers are the job's world ranks, so every connection made here is between
two groups of this job. A port or a Join peer of another job (processes outside this
job's world) cannot be reached: MPI.Exception(ERR_PORT) says so.

- Ports: `Open_port` gives "ivshmem-port:JOB:W:N", JOB this job's name (bootstrap.World.job),
  W the world rank that opened it, N its serial number there; `Close_port` closes it.
- The service communicator: a hidden intra-communicator of the whole world on a reserved
  context pair (SERVICE_CTX, SERVICE_CTX + 1: no agreement ever takes it), carrying the
  connection traffic, so that no user receive on COMM_WORLD can take it.
- Accept/Connect (collective over the calling communicator; `port_name` read at `root`
  only): the connecting root sends the port name to its owner on the service
  communicator (tag T_CONNECT + N); the accepting root, inside Accept on that port, takes
  such a request from any source; each root then tells its group the other root's world
  rank (or its error: every member raises it), and both groups run
  Intracomm.Create_intercomm with the service communicator as the peer communicator (tag
  T_MEET + N). Connect blocks until the port's owner accepts: a Connect to a port that
  its owner has closed, or never accepts on, waits (MPICH's times out instead); only the
  connecting root's own checks (a port of another job, of itself, no port) raise at once.
- Join(fd): the two processes write "ivshmem-join JOB W" on the socket and read the other's
  line, then build the intercommunicator of their COMM_SELFs the same way (tag T_JOIN).
- The name service (Publish_name, Unpublish_name, Lookup_name) is a table held by world
  rank 0. Other processes send it NAME control messages over shared memory and wait for
  the NAMED answer; rank 0 serves them in whatever MPI call it makes progress in (a
  process outside every MPI call serves nothing, as with any MPI progress). A process
  that reaches world rank 0 only through mpi4py (another region of a hybrid job) gets
  MPI.Exception(ERR_SERVICE) saying so.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
from typing import TYPE_CHECKING, Any

from guest_lib.mpi import constants, exceptions, wire
from guest_lib.mpi.matching import Op
from guest_lib.mpi.status import Status

if TYPE_CHECKING:
    from guest_lib.mpi.comm import Intracomm
    from guest_lib.mpi.engine import Engine

SERVICE_CTX = constants.MAX_CONTEXT - 1  # the service communicator's context pair
PORT_TAGS = 1 << 16
T_CONNECT = 0  # tags on the service communicator: connection requests to port N ...
T_MEET = PORT_TAGS  # ... the roots' Create_intercomm for port N ...
T_JOIN = 2 * PORT_TAGS  # ... and Join's
MAX_NAME = 256  # bytes of a service or port name at most (MPICH's MPI_MAX_PORT_NAME)
_PREFIX = "ivshmem-port"
_JOIN = "ivshmem-join"
NAME = struct.Struct("<QBHH")  # NAME: request id, what, service bytes, port bytes
NAMED = struct.Struct("<QBH")  # NAMED: request id, error class (0: done), port bytes
PUBLISH, UNPUBLISH, LOOKUP = 1, 2, 3


class _State:
    """This process's side: the service communicator, open ports, rank 0's table."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.service: Intracomm | None = None
        self.self_comm: Intracomm | None = None
        self.job = ""
        self.serial = itertools.count()
        self.ports: set[str] = set()
        self.names: dict[str, str] = {}  # world rank 0: service name -> port name
        self.answers: dict[int, _Answer] = {}  # requests waiting for a NAMED, by id
        self.ids = itertools.count(1)


_state = _State()


class _Answer(Op):
    """A name request to world rank 0 (shm peer `peer`): done when its NAMED arrives."""

    __slots__ = ("peer",)

    def __init__(self, peer: int) -> None:
        super().__init__()
        self.peer = peer

    def watch(self) -> int:
        return self.peer


def setup(engine: Engine, service: Intracomm, self_comm: Intracomm, job: str) -> None:
    """Called once at MPI's import: the service communicator (context SERVICE_CTX, every
    world rank), COMM_SELF, this job's name; registers the NAME/NAMED handlers."""
    _state.engine, _state.service, _state.self_comm, _state.job = engine, service, self_comm, job
    engine.services[wire.CTRL_NAME] = _serve
    engine.services[wire.CTRL_NAMED] = _answered


# ------------------------------------------------------------------ ports
def open_port(info: Any = None) -> str:
    """MPI.Open_port: a new port name of this process (module docstring)."""
    engine = _ready()
    with _state.lock:
        port = f"{_PREFIX}:{_state.job}:{engine.world_rank}:{next(_state.serial)}"
        _state.ports.add(port)
    return port


def close_port(port_name: str) -> None:
    """MPI.Close_port. MPI.Exception(ERR_PORT) for a port not open in this process."""
    with _state.lock:
        if port_name not in _state.ports:
            raise exceptions.Exception(exceptions.ERR_PORT, f"{port_name!r} is not open here")
        _state.ports.discard(port_name)


def _parse(port_name: Any) -> tuple[int, int]:
    """(owner's world rank, serial) of a port of this job. MPI.Exception(ERR_PORT) for a
    name that is no port, or a port of another job."""
    engine = _ready()
    parts = str(port_name).rsplit(":", 2)
    head = parts[0].split(":", 1) if len(parts) == 3 else []
    if len(head) != 2 or head[0] != _PREFIX or not (parts[1].isdigit() and parts[2].isdigit()):
        raise exceptions.Exception(exceptions.ERR_PORT, f"{port_name!r} is no port name")
    if head[1] != _state.job:
        raise exceptions.Exception(exceptions.ERR_PORT, _foreign(f"port {port_name!r}"))
    owner, serial = int(parts[1]), int(parts[2])
    if owner >= engine.world_size:
        raise exceptions.Exception(exceptions.ERR_PORT, f"{port_name!r}: no world rank {owner}")
    return owner, serial


def _foreign(what: str) -> str:
    return (
        f"{what} belongs to another job: this transport's peers are the ranks of this job "
        f"({_state.job}), so no connection to processes outside its world can be made "
        "(guest_lib.mpi connects groups of one job only)"
    )


def _ready() -> Engine:
    if _state.engine is None:
        raise exceptions.Exception(exceptions.ERR_INTERN, "MPI is not initialised")
    return _state.engine


# ------------------------------------------------------------------ Accept / Connect
def accept(comm: Intracomm, port_name: str, info: Any = None, root: int = 0) -> Any:
    """Intracomm.Accept: the intercommunicator with the group that connects to
    `port_name` (read at `root`, which must have opened it). Collective over `comm`;
    blocks until a group connects. MPI.Exception on every member: ERR_ROOT for a bad
    root, ERR_PORT for a port not open at the root."""

    def meet() -> tuple[int, int]:
        owner, serial = _parse(port_name)
        if owner != _ready().world_rank or port_name not in _state.ports:
            raise exceptions.Exception(exceptions.ERR_PORT, f"{port_name!r} is not open here")
        status = Status()
        service = _state.service
        assert service is not None
        while True:
            asked = service.recv(None, constants.ANY_SOURCE, T_CONNECT + serial % PORT_TAGS,
                                 status)  # fmt: skip
            if asked == port_name:  # (else a request for a closed namesake port: dropped)
                return status.Get_source(), serial

    return _connect(comm, root, meet)


def connect(comm: Intracomm, port_name: str, info: Any = None, root: int = 0) -> Any:
    """Intracomm.Connect: the intercommunicator with the group that accepts on
    `port_name` (read at `root`). Collective over `comm`; blocks until the port's owner
    accepts. MPI.Exception(ERR_PORT) on every member for a port of another job (module
    docstring), a bad name or a port of the root itself; ERR_ROOT for a bad root."""

    def meet() -> tuple[int, int]:
        owner, serial = _parse(port_name)
        if owner == _ready().world_rank:
            raise exceptions.Exception(
                exceptions.ERR_PORT, f"{port_name!r} is the connecting process's own port"
            )
        service = _state.service
        assert service is not None
        service.send(str(port_name), owner, T_CONNECT + serial % PORT_TAGS)
        return owner, serial

    return _connect(comm, root, meet)


def _connect(comm: Intracomm, root: int, meet: Any) -> Any:
    """Accept/Connect once the root has met the other root (`meet()`: its world rank and
    the port's serial): the root's outcome to every member, then Create_intercomm."""
    from guest_lib.mpi import intercomm

    comm._live()
    if not 0 <= root < comm.Get_size():
        raise exceptions.Exception(exceptions.ERR_ROOT, f"root {root} of {comm.Get_size()}")
    outcome: Any = None
    if comm.Get_rank() == root:
        try:
            outcome = meet()
        except exceptions.Exception as exc:
            outcome = exc
    outcome = comm.bcast(outcome, root)
    if isinstance(outcome, exceptions.Exception):
        raise outcome
    other, serial = outcome
    service = _state.service
    assert service is not None
    return intercomm.create_intercomm(comm, root, service, other, T_MEET + serial % PORT_TAGS)


def join(fd: int) -> Any:
    """Comm.Join: the intercommunicator of this process's COMM_SELF and the one of the
    process at the other end of the connected socket `fd` (which calls Join too).
    MPI.Exception: ERR_PORT if that process is of another job, ERR_ARG if it says
    nothing Join understands or is this very process, or `fd` is no connected socket."""
    from guest_lib.mpi import intercomm

    engine = _ready()
    line = b""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.sendall(f"{_JOIN} {_state.job} {engine.world_rank}\n".encode())
            while not line.endswith(b"\n") and len(line) <= 2 * MAX_NAME:
                got = sock.recv(1)
                if not got:
                    break
                line += got
    except OSError as exc:
        raise exceptions.Exception(exceptions.ERR_ARG, f"Join: fd {fd}: {exc}") from exc
    words = line.decode(errors="replace").split()
    if len(words) != 3 or words[0] != _JOIN or not words[2].isdigit():
        raise exceptions.Exception(exceptions.ERR_ARG, f"Join: the peer said {line[:80]!r}")
    if words[1] != _state.job:
        raise exceptions.Exception(exceptions.ERR_PORT, _foreign(f"Join's peer (job {words[1]})"))
    other = int(words[2])
    if other == engine.world_rank or other >= engine.world_size:
        raise exceptions.Exception(exceptions.ERR_ARG, f"Join: the peer is world rank {other}")
    service, self_comm = _state.service, _state.self_comm
    assert service is not None and self_comm is not None
    return intercomm.create_intercomm(self_comm, 0, service, other, T_JOIN)


# ------------------------------------------------------------------ the name service
def _encoded(text: str, what: str) -> bytes:
    data = str(text).encode()
    if len(data) > MAX_NAME:
        raise exceptions.Exception(exceptions.ERR_ARG, f"{what} longer than {MAX_NAME} bytes")
    return data


def _apply(what: int, service: str, port: str) -> tuple[int, str]:
    """Run one request on rank 0's table: (error class or 0, the port found)."""
    with _state.lock:
        names = _state.names
        if what == PUBLISH:
            if service in names:
                return exceptions.ERR_SERVICE, ""
            names[service] = port
        elif what == UNPUBLISH:
            if names.get(service) != port:
                return exceptions.ERR_SERVICE, ""
            del names[service]
        elif service not in names:
            return exceptions.ERR_NAME, ""
        return 0, names.get(service, "") if what == LOOKUP else ""


def _request(what: int, service: str, port: str = "") -> str:
    """Run a request at world rank 0 (here if this is it); the port it gives."""
    engine = _ready()
    name, where = _encoded(service, "service name"), _encoded(port, "port name")
    if engine.world_rank == 0:
        error, found = _apply(what, name.decode(), where.decode())
    else:
        peer = engine.routes[0].peer
        if peer < 0:
            raise exceptions.Exception(
                exceptions.ERR_SERVICE,
                "the name service is held by world rank 0, which this process reaches "
                "through mpi4py only (another region): names are served over shared memory",
            )
        answer = _Answer(peer)
        with engine.lock:
            rid = next(_state.ids)
            _state.answers[rid] = answer
        try:
            head = NAME.pack(rid, what, len(name), len(where))
            engine.send_control(peer, wire.CTRL_NAME, head + name + where)
            engine.wait(answer)
        finally:
            with engine.lock:
                _state.answers.pop(rid, None)
        error, found = answer.obj
    if error:
        text = {exceptions.ERR_NAME: "is not published", exceptions.ERR_SERVICE: "refused"}
        raise exceptions.Exception(error, f"service {service!r}: {text.get(error, '')}")
    return found


def _serve(world: int, payload: bytes) -> None:
    """World rank 0: a NAME request from world rank `world` (engine lock held)."""
    engine = _ready()
    bad = exceptions.Exception(exceptions.ERR_INTERN, f"world rank {world} sent a bad NAME")
    if engine.world_rank != 0 or len(payload) < NAME.size:
        raise bad
    rid, what, nname, nport = NAME.unpack_from(payload)
    if what not in (PUBLISH, UNPUBLISH, LOOKUP) or nname > MAX_NAME or nport > MAX_NAME:
        raise bad
    if len(payload) != NAME.size + nname + nport:
        raise bad
    name = payload[NAME.size : NAME.size + nname].decode(errors="replace")
    port = payload[NAME.size + nname :].decode(errors="replace")
    error, found = _apply(what, name, port)
    data = found.encode()
    engine.send_control(engine.routes[world].peer, wire.CTRL_NAMED,
                        NAMED.pack(rid, error, len(data)) + data)  # fmt: skip


def _answered(world: int, payload: bytes) -> None:
    """A NAMED answer from world rank 0 (engine lock held); MPI.Exception(ERR_INTERN)
    naming the sender for a bad one."""
    who = f"world rank {world}"
    if world != 0 or len(payload) < NAMED.size:
        raise exceptions.Exception(exceptions.ERR_INTERN, f"{who} sent a bad NAMED")
    rid, error, nport = NAMED.unpack_from(payload)
    if len(payload) != NAMED.size + nport or nport > MAX_NAME:
        raise exceptions.Exception(exceptions.ERR_INTERN, f"{who} sent a NAMED of bad size")
    answer = _state.answers.get(rid)
    if answer is not None:  # (else its caller left: an error, a signal)
        answer.obj = (error, payload[NAMED.size :].decode(errors="replace"))
        answer.done = True


def publish_name(service_name: str, port_name: str, info: Any = None) -> None:
    """Publish `port_name` under `service_name` for the whole job (MPI.Publish_name).

    Until Unpublish_name. MPI.Exception(ERR_SERVICE) if the name is published already.
    """
    _request(PUBLISH, service_name, port_name)


def unpublish_name(service_name: str, port_name: str, info: Any = None) -> None:
    """Withdraw `service_name` (MPI.Unpublish_name).

    MPI.Exception(ERR_SERVICE) unless `service_name` names `port_name`.
    """
    _request(UNPUBLISH, service_name, port_name)


def lookup_name(service_name: str, info: Any = None) -> str:
    """Return the port `service_name` names (MPI.Lookup_name).

    MPI.Exception(ERR_NAME) for a name not published.
    """
    return _request(LOOKUP, service_name)
