"""Bootstrap: who am I, who are the others, and which route reaches each of them.

Three ways a process starts (chosen once, at `import guest_lib.mpi.MPI`):
- Standalone (`ivshmem-run`): IVSHMEM_MPI_RANK and IVSHMEM_MPI_SIZE give rank and size. The
  region comes from the region variables below. Ranks learn each other's peer ids from HELLO
  control messages in the region (the broker hands out peer ids in join order), so every
  pair of ranks talks through the region.
- Under mpiexec (PMI_RANK/PMI_SIZE, OMPI_COMM_WORLD_RANK or PMIX_RANK set, or
  IVSHMEM_MPI_USE_MPI4PY=1): mpi4py gives rank and size. Each rank maps the region it can
  reach (if any), ranks allgather (region UUID, peer id) through mpi4py — locality
  detection — and pairs with the same UUID talk through the region, all others through
  mpi4py. When a region is opened by name (no broker), the peer id is the rank's index among
  the world ranks that share its UUID.
- Singleton (none of the above): a world of one, no region.

Region variables, first one set wins:
    IVSHMEM_COMM_SOCKET=PATH   join through the broker at PATH (guest_lib.host_client)
    IVSHMEM_COMM_REGION=NAME   open POSIX region NAME on this host (Region.open)
    IVSHMEM_COMM_GUEST=1       in a guest: guest_lib.attach() (PCI discovery of ivshmem)
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import sys
import time
from typing import Any

from guest_lib.mpi import native, wire
from guest_lib.mpi.engine import Engine
from guest_lib.mpi.routes import Route, SelfRoute, ShmRoute

HELLO = struct.Struct("<II")  # world rank, world size
JOIN_TIMEOUT = float(os.environ.get("IVSHMEM_MPI_JOIN_TIMEOUT", "60"))
_MPIEXEC_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


@dataclasses.dataclass
class World:
    """What bootstrap found: the engine (with the route to every world rank) and the region."""

    engine: Engine
    mode: str  # "standalone", "mpiexec" or "singleton"
    endpoint: Any = None
    region_uuid: str | None = None
    closer: Any = None  # what to close at Finalize (endpoint or broker client)
    # this job's name, the same in every rank and unique among the jobs running: the
    # region's UUID (ivshmem-run makes a region per job), rank 0's host and pid (mpiexec),
    # this process's (singleton); ports name it (see `dynproc`)
    job: str = ""


def _mode() -> str:
    env = os.environ
    if "IVSHMEM_MPI_RANK" in env:
        return "standalone"
    if env.get("IVSHMEM_MPI_USE_MPI4PY") == "1" or any(v in env for v in _MPIEXEC_VARS):
        return "mpiexec"
    return "singleton"


def _open_region() -> tuple[str, Any]:
    """("socket", endpoint) / ("name", Region) / ("guest", endpoint) / ("none", None)."""
    env = os.environ
    if env.get("IVSHMEM_COMM_SOCKET"):
        from guest_lib import host_client

        return "socket", host_client.attach(env["IVSHMEM_COMM_SOCKET"])
    if env.get("IVSHMEM_COMM_REGION"):
        from ivshmem_comm.region import Region

        return "name", Region.open(env["IVSHMEM_COMM_REGION"])
    if env.get("IVSHMEM_COMM_GUEST") == "1":
        try:
            from guest_lib.attach import attach  # the guest's PCI discovery (issue 4)
        except ImportError as exc:
            raise RuntimeError("IVSHMEM_COMM_GUEST=1 but guest_lib.attach is missing") from exc
        device = None
        local = env.get("MPI_LOCALRANKID")  # hydra: this rank's index among its node's ranks
        if local is not None and not env.get("IVSHMEM_COMM_DEVICE"):
            from guest_lib import pci

            devices = pci.doorbell_devices()
            if len(devices) > 1:  # one device (peer slot) per rank of this guest
                if int(local) >= len(devices):
                    raise RuntimeError(
                        f"local rank {local} in a guest with {len(devices)} ivshmem devices"
                    )
                device = devices[int(local)]
        found = attach(device=device)  # an Endpoint, or a Region to join like a named one
        return ("guest", found) if hasattr(found, "peer_id") else ("name", found)
    return "none", None


def _exchange_hello(ep: Any, rank: int, size: int) -> dict[int, int]:
    """Learn the world rank of every other peer of the region: {world rank: peer id}."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    while len(ep.peers()) < size - 1:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {rank}: only {len(ep.peers())} of {size - 1} peers joined the region "
                f"within {JOIN_TIMEOUT} s"
            )
        time.sleep(0.001)
    tag = wire.core_tag(wire.KIND_CONTROL, 0, wire.CTRL_HELLO)
    peers = ep.peers()
    for peer in peers:
        ep.send(peer, HELLO.pack(rank, size), tag)
    found: dict[int, int] = {rank: ep.peer_id}
    while len(found) < size:
        with ep.recv(-1, tag, timeout=max(deadline - time.monotonic(), 0.001)) as message:
            other, other_size = HELLO.unpack(message.data)
            if other_size != size or other in found:
                raise RuntimeError(f"rank {rank}: bad HELLO {other}/{other_size} from a peer")
            found[other] = message.source
    return found


def _standalone() -> World:
    rank = int(os.environ["IVSHMEM_MPI_RANK"])
    size = int(os.environ["IVSHMEM_MPI_SIZE"])
    kind, thing = _open_region()
    if kind == "none":
        if size != 1:
            raise RuntimeError("IVSHMEM_MPI_SIZE > 1 needs IVSHMEM_COMM_REGION or _SOCKET")
        return _singleton()
    ep = thing.endpoint(rank) if kind == "name" else thing
    peer_of = _exchange_hello(ep, rank, size) if size > 1 else {rank: ep.peer_id}
    routes: list[Route] = [SelfRoute() if w == rank else ShmRoute(peer_of[w]) for w in range(size)]
    engine = Engine(rank, size, ep, routes)
    return World(engine, "standalone", ep, str(ep.region.uuid), ep, str(ep.region.uuid))


def _mpiexec() -> World:
    rank, size = native.world_rank_size()  # imports mpi4py, kept for the mpi4py route
    kind, thing = _open_region()
    ep = None
    region_uuid: str | None = None
    peer: int | None = None
    if kind == "name":
        region_uuid = str(thing.uuid)
    elif kind != "none":
        ep = thing
        region_uuid, peer = str(ep.region.uuid), ep.peer_id
    incarnation = ep.incarnation if ep is not None else 0
    info = native.allgather((region_uuid, peer, incarnation, socket.gethostname(), os.getpid()))
    if kind == "name":
        mates = [w for w in range(size) if info[w][0] == region_uuid]
        peer = mates.index(rank)
        if peer >= thing.max_peers:
            raise RuntimeError(
                f"rank {rank}: {len(mates)} ranks share region {thing.name!r} of "
                f"{thing.max_peers} peers"
            )
        ep = thing.endpoint(peer)
        info = native.allgather((region_uuid, peer, ep.incarnation, *info[rank][3:]))
    mpi_route = native.MpiRoute()
    routes: list[Route] = []
    for w, (other_uuid, other_peer, other_incarnation, *_where) in enumerate(info):
        if w == rank:
            routes.append(SelfRoute())
        elif ep is not None and other_uuid == region_uuid:  # (ep: iff region_uuid)
            routes.append(ShmRoute(other_peer))
            # The slot may still show a previous job's holder: talk to this job's one.
            ep.expect_incarnation(other_peer, other_incarnation)
        else:
            routes.append(mpi_route)
    engine = Engine(rank, size, ep, routes)
    native.barrier()  # every endpoint exists before anyone talks
    return World(engine, "mpiexec", ep, region_uuid, ep, f"{info[0][3]}/{info[0][4]}")


def _singleton() -> World:
    job = f"{socket.gethostname()}/{os.getpid()}"
    return World(Engine(0, 1, None, [SelfRoute()]), "singleton", job=job)


def init() -> World:
    """Run the bootstrap that fits the environment (see the module docstring)."""
    mode = _mode()
    if mode == "standalone":
        return _standalone()
    if mode == "mpiexec":
        return _mpiexec()
    return _singleton()


def region_groups(world: World) -> list[int]:
    """For each world rank, an id of the region it sits in (its own id when none)."""
    engine = world.engine
    return [-1 if route.local else w + 1 for w, route in enumerate(engine.routes)]


def excepthook_installer(on_failure: Any) -> None:
    """Call `on_failure()` before the default hook when an exception ends the program."""
    previous = sys.excepthook

    def hook(*args: Any) -> None:
        try:
            on_failure()
        finally:
            previous(*args)

    sys.excepthook = hook
