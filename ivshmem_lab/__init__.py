"""The VM lab: boots real QEMU guests (Debian's kernel, the host root over read-only 9p, a tiny
initramfs) attached to a broker, runs commands and MPI jobs in them. A tool built on the three
packages (`ivshmem_comm`, `host_broker`, `guest_lib`); none of them imports it.

Modules, one idea each, lowest first:

- ``errors``: LabError, LabUnavailable;
- ``host``: can guests boot here (QEMU, kernel, busybox), the cache, KVM verdicts;
- ``kernel_image``: the kernel QEMU boots (its uncompressed ELF, through PVH, when it can);
- ``devices``: the ivshmem devices a guest gets and their QEMU options;
- ``initramfs``: the guest's initramfs (busybox, modules, ``init.sh``, the UIO driver);
- ``net``: guest networks (slirp to the host, a LAN between guests);
- ``guest``: one QEMU guest running one command;
- ``lab``: :class:`Lab`, which makes guests and runs commands in them;
- ``exec_agent``, ``cluster``, ``mpi``: a lab that stays up (exec agents, ``mpiexec``) and
  MPI jobs across guests; ``cli``: the ``ivshmem-lab`` command.

This package exports what a user of the lab needs; the modules hold the rest.
"""

from ivshmem_lab.devices import DoorbellDevice, ShmDevice, parse_device
from ivshmem_lab.errors import LabError, LabUnavailable
from ivshmem_lab.guest import Guest, GuestResult
from ivshmem_lab.host import lab_available
from ivshmem_lab.lab import Lab

__all__ = [
    "DoorbellDevice",
    "Guest",
    "GuestResult",
    "Lab",
    "LabError",
    "LabUnavailable",
    "ShmDevice",
    "lab_available",
    "parse_device",
]
