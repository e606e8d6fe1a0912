"""ivshmem_comm: message passing over shared memory between VMs and processes.

    import ivshmem_comm as ic
    region = ic.Region.create("job1", size=64 << 20, max_peers=4)
    ep = region.endpoint(0)
    ep.send(1, b"hello", tag=7)
    with ep.recv(source=ic.ANY_SOURCE) as msg: ...

`IMPLEMENTATION` says which queue implementation is in use: "c" or "python".
"""

from ivshmem_comm import errors
from ivshmem_comm.channel import Message
from ivshmem_comm.endpoint import ANY_SOURCE, ANY_TAG, Endpoint
from ivshmem_comm.errors import (
    IvshmemError,
    MessageTooLargeError,
    PeerLostError,
    PeerSlotBusyError,
    RegionFormatError,
    RingCorruptError,
    SendIncompleteError,
    TimeoutError,
)
from ivshmem_comm.region import PeerInfo, Region
from ivshmem_comm.ring import IMPLEMENTATION

__all__ = [
    "ANY_SOURCE",
    "ANY_TAG",
    "IMPLEMENTATION",
    "Endpoint",
    "IvshmemError",
    "Message",
    "MessageTooLargeError",
    "PeerInfo",
    "PeerLostError",
    "PeerSlotBusyError",
    "Region",
    "RegionFormatError",
    "RingCorruptError",
    "SendIncompleteError",
    "TimeoutError",
    "errors",
]
