"""The lab's two errors."""

from __future__ import annotations

__all__ = ["LabError", "LabUnavailable"]


class LabError(RuntimeError):
    """The lab could not do what was asked (bad argument, QEMU failed to start, ...)."""


class LabUnavailable(LabError):
    """QEMU, a kernel image or busybox-static is missing on this host."""
