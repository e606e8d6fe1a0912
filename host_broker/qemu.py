"""QEMU's options for an ivshmem device: the one place they are spelled.

:func:`ivshmem_args` gives the options that attach a guest to a region, either through a
broker's socket (``ivshmem-doorbell``: a peer id and interrupts) or over the region's file
(``ivshmem-plain``: the memory only). ``ivshmem-broker qemu-args`` prints them and the VM lab
(``ivshmem_lab.devices``) boots its guests with them.
"""

from __future__ import annotations

import re

from ivshmem_comm.protocol import MAX_VECTORS

__all__ = ["ivshmem_args", "qemu_option_value"]

#: What QEMU accepts as an object or device id (QEMU's id_wellformed()).
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def qemu_option_value(text: str) -> str:
    """`text` as the value of a QEMU ``key=value,...`` option: a comma doubled (QEMU's
    escape), so that a path with a comma stays one value. Raises ValueError for text that
    QEMU's option parser cannot carry (a NUL or a newline)."""
    if "\0" in text or "\n" in text:
        raise ValueError(f"{text!r} cannot be passed in a QEMU option (NUL or newline)")
    return text.replace(",", ",,")


def ivshmem_args(
    dev_id: str,
    *,
    socket: str | None = None,
    mem_path: str | None = None,
    size: int | None = None,
    vectors: int = 1,
    ioeventfd: bool | None = None,
) -> list[str]:
    """QEMU options of one ivshmem device named `dev_id` (the chardev's or memory
    backend's id; unique per guest).

    With `socket` (a broker's UNIX socket): ``-chardev socket,...`` and ``-device
    ivshmem-doorbell`` with `vectors` MSI-X vectors, and ``ioeventfd=on|off`` when
    `ioeventfd` is not None (None: QEMU's default, on). With `mem_path` instead: ``-object
    memory-backend-file`` of `size` bytes shared over that file and ``-device ivshmem-plain``.

    Raises ValueError when both or neither of `socket` and `mem_path` are given, for a
    `dev_id` QEMU would refuse, `vectors` outside 1..MAX_VECTORS (the broker's limit), a
    plain device without a size or with one that is not a power of two of at least 4096
    (a PCI BAR), or a path :func:`qemu_option_value` refuses.
    """
    if (socket is None) == (mem_path is None):
        raise ValueError("give exactly one of socket (ivshmem-doorbell) and mem_path (plain)")
    if not _QEMU_ID.match(dev_id):
        raise ValueError(f"{dev_id!r} is not a QEMU id (a letter, then letters, digits, ._-)")
    if mem_path is not None:
        if size is None:
            raise ValueError(f"{mem_path}: its size is needed for ivshmem-plain")
        if size < 4096 or size & (size - 1):
            raise ValueError(f"ivshmem size {size} of {mem_path} is not a power of two >= 4096")
        path = qemu_option_value(mem_path)
        return [
            "-object",
            f"memory-backend-file,id={dev_id},size={size},share=on,mem-path={path}",
            "-device",
            f"ivshmem-plain,memdev={dev_id}",
        ]
    assert socket is not None
    if not 1 <= vectors <= MAX_VECTORS:
        raise ValueError(f"vectors={vectors}: expected 1..{MAX_VECTORS}")
    device = f"ivshmem-doorbell,chardev={dev_id},vectors={vectors}"
    if ioeventfd is not None:
        device += f",ioeventfd={'on' if ioeventfd else 'off'}"
    return ["-chardev", f"socket,path={qemu_option_value(socket)},id={dev_id}", "-device", device]
