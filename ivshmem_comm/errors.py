"""The exception types of ivshmem_comm. Every error that names shared memory names its peer."""

from __future__ import annotations

import builtins


class IvshmemError(Exception):
    """Base class of every error this package raises on purpose."""


class RegionFormatError(IvshmemError):
    """A mapping does not hold a region this library can read.

    `field` says what is wrong: "magic", "version", "checksum", "size", "geometry", "name" or
    a derived offset such as "queues_offset".
    """

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"region format: bad {field}: {detail}")
        self.field = field
        self.detail = detail


class RingCorruptError(IvshmemError):
    """A peer wrote a value into shared memory that breaks the queue protocol.

    The queue is marked broken for good: every later operation on it raises this again
    instead of acting on garbage. Other queues are unaffected. `peer` is the id of the peer
    that owns the offending field, `field` its name, `value` what was read.
    """

    def __init__(self, peer: int, field: str, value: object, detail: str) -> None:
        super().__init__(f"peer {peer} corrupted {field} (read {value!r}): {detail}")
        self.peer = peer
        self.field = field
        self.value = value
        self.detail = detail


class CollectiveTruncatedError(RingCorruptError):
    """A member's collective round announces more bytes than this member's call takes (a
    Bcast root's buffer longer than this member's: MPI's truncation, an argument error of
    the job or a lying peer). The group is marked broken as for any RingCorruptError; the
    MPI layer reports it as MPI_ERR_TRUNCATE."""


class PeerLostError(IvshmemError):
    """The peer an operation depends on died, left, or came back as a new incarnation."""

    def __init__(self, peer: int, detail: str) -> None:
        super().__init__(f"peer {peer} lost: {detail}")
        self.peer = peer
        self.detail = detail


class PeerSlotBusyError(IvshmemError):
    """A peer slot was asked for that a live peer holds."""


class MessageTooLargeError(IvshmemError):
    """recv_into got a buffer smaller than the matched message; the message stays queued.

    `size` is the message's length in bytes, `source` and `tag` identify it.
    """

    def __init__(self, size: int, capacity: int, source: int, tag: int) -> None:
        super().__init__(
            f"message of {size} bytes from peer {source} (tag {tag}) does not fit a "
            f"{capacity}-byte buffer"
        )
        self.size = size
        self.capacity = capacity
        self.source = source
        self.tag = tag


class TimeoutError(IvshmemError, builtins.TimeoutError):
    """An operation with a timeout did not complete in time; nothing was consumed or sent."""


class SendIncompleteError(TimeoutError):
    """A streamed send timed out after part of its message was published.

    The message is not dropped: `sent` of its `total` bytes are in the queue and the rest is
    kept by the sender (in memory of its own) and goes out, before anything else to `peer`,
    at the sender's next send or place to that peer (bounded by that call's timeout).
    """

    def __init__(self, peer: int, sent: int, total: int) -> None:
        super().__init__(
            f"timed out sending to peer {peer} after {sent} of {total} bytes; the rest is "
            "kept and goes out before the next message to that peer"
        )
        self.peer = peer
        self.sent = sent
        self.total = total
