"""`MPI.Pickle` and `MPI.pickle`: how lowercase (object) methods serialise, as in mpi4py.

Every object message of the MPI face goes through the one `PICKLE` instance (exported as
`MPI.pickle`): a program, or mpi4py.futures, that re-initialises it
(`MPI.pickle.__init__(dumps, loads, protocol)`) or sets its PROTOCOL changes what every
later send/recv/bcast/... uses. An empty message loads as None (mpi4py's rule).
The environment variables MPI4PY_PICKLE_PROTOCOL and MPI4PY_PICKLE_THRESHOLD set the
defaults, as with mpi4py.
"""

from __future__ import annotations

import functools
import os
import pickle as _pickle
import struct
from collections.abc import Callable, Iterable
from typing import Any

from guest_lib.mpi import exceptions

DEFAULT_PROTOCOL: int = int(os.environ.get("MPI4PY_PICKLE_PROTOCOL", str(_pickle.HIGHEST_PROTOCOL)))
DEFAULT_THRESHOLD: int = int(os.environ.get("MPI4PY_PICKLE_THRESHOLD", str(256 << 10)))


class Pickle:
    """Pickle/unpickle Python objects with `dumps(obj[, protocol])` and `loads(buffer)`.

    `protocol` None with the standard `pickle.dumps`: the default protocol; None with a
    custom `dumps`: it is called with the object alone. `threshold`: the size from which
    `dumps_oob` hands buffers out of band.
    """

    def __init__(
        self,
        dumps: Callable[..., bytes] | None = None,
        loads: Callable[..., Any] | None = None,
        protocol: int | None = None,
        threshold: int | None = None,
    ) -> None:
        self._dumps = _pickle.dumps if dumps is None else dumps
        self._loads = _pickle.loads if loads is None else loads
        if protocol is None and self._dumps is _pickle.dumps:
            protocol = DEFAULT_PROTOCOL
        self._protocol = protocol
        self._threshold = DEFAULT_THRESHOLD if threshold is None else threshold

    @property
    def PROTOCOL(self) -> int | None:
        """The protocol passed to `dumps` (None: `dumps` is called without one)."""
        return self._protocol

    @PROTOCOL.setter
    def PROTOCOL(self, protocol: int | None) -> None:
        if protocol is None and self._dumps is _pickle.dumps:
            protocol = DEFAULT_PROTOCOL
        self._protocol = protocol

    @property
    def THRESHOLD(self) -> int:
        """Buffers of at least this many bytes go out of band in `dumps_oob`."""
        return self._threshold

    @THRESHOLD.setter
    def THRESHOLD(self, threshold: int | None) -> None:
        self._threshold = DEFAULT_THRESHOLD if threshold is None else threshold

    def dumps(self, obj: Any) -> bytes:
        """The pickle data stream of `obj`."""
        if self._protocol is None:
            return self._dumps(obj)
        return self._dumps(obj, self._protocol)

    def loads(self, data: Any) -> Any:
        """The object of a pickle data stream."""
        return self._loads(data)

    def dumps_oob(self, obj: Any) -> tuple[bytes, list[Any]]:
        """Return (data stream, out-of-band buffers as MPI.buffer views), as mpi4py's.

        Protocol 5 or more; buffers of at least THRESHOLD bytes are not copied into the stream.
        """
        from guest_lib.mpi.memory import buffer

        protocol = max(self._protocol if self._protocol is not None else DEFAULT_PROTOCOL, 5)
        buffers: list[Any] = []

        def out_of_band(pickled: _pickle.PickleBuffer) -> bool:
            view = pickled.raw()
            if view.nbytes >= self._threshold:
                buffers.append(buffer(view))
                return False
            return True

        return self._dumps(obj, protocol, buffer_callback=out_of_band), buffers

    def loads_oob(self, data: Any, buffers: Iterable[Any]) -> Any:
        """The object of a stream made by `dumps_oob` and its buffers."""
        return self._loads(data, buffers=buffers)

    def __repr__(self) -> str:
        return f"<Pickle protocol={self._protocol} threshold={self._threshold}>"


PICKLE = Pickle()


def dumps(obj: Any) -> memoryview:
    """`obj` as `MPI.pickle` serialises it, as a flat byte view (what the engine sends)."""
    pickle = PICKLE  # (its attributes read here: the call is Pickle.dumps without its frame)
    protocol = pickle._protocol
    data = pickle._dumps(obj) if protocol is None else pickle._dumps(obj, protocol)
    return memoryview(data) if type(data) is bytes else memoryview(data).cast("B")


def flat(data: Any) -> memoryview:
    """A flat byte view of what `MPI.pickle`'s dumps returned (bytes, or another buffer)."""
    return memoryview(data) if type(data) is bytes else memoryview(data).cast("B")


def loads(data: Any) -> Any:
    """The object of a received message; None for an empty one (as mpi4py)."""
    if data is None or not len(data):
        return None
    return PICKLE._loads(data)


def load_view(data: memoryview) -> Any:
    """`loads` of a message read where it lies (`data`: a view of memory that is reused once
    this returns): the standard pickle.loads reads it in place (what it returns holds no
    reference to it); a custom loads gets a copy of its own. (A peer that rewrites its spans
    while they are read gains nothing it lacks: an object receive runs whatever pickle the
    peer sent, as mpi4py's does; the queue's offsets and lengths were validated before.)"""
    if not len(data):
        return None
    load = PICKLE._loads
    return load(data) if load is _pickle.loads else load(bytes(data))


class _Sink:
    """The file a parts() pickler writes to: `write` is its list's append."""

    __slots__ = ("write",)

    def __init__(self, write: Callable[[Any], None]) -> None:
        self.write = write


def parts(obj: Any) -> tuple[list[Any], int]:
    """`obj` pickled as MPI.pickle's dumps does (the standard pickle.dumps only: `bulky` said
    so): (the stream's parts in order, their bytes in all). The parts are the pickler's own
    bytes and, not copied, the large payloads it writes straight out to a file (bytes,
    bytearrays, pickle.PickleBuffers of the object's own memory: sent before the object may
    change). Laid end to end they are the stream dumps returns, without its copy of the
    payloads and the reallocations of a growing buffer (on large objects, most of dumps'
    time)."""
    out: list[Any] = []
    _pickle.Pickler(_Sink(out.append), PICKLE._protocol).dump(obj)
    flat = [item.raw() if type(item) is _pickle.PickleBuffer else item for item in out]
    return flat, sum(memoryview(item).nbytes for item in flat)


_END = struct.Struct("<Q")
_ENDS = struct.Struct("<QQ")  # a piece's start and end (the end of the one before it)


@functools.lru_cache(maxsize=64)
def _header(count: int) -> struct.Struct:
    """The header of a bundle of `count` pieces: their end offsets."""
    return struct.Struct(f"<{count}Q")


def bundle(pieces: list[memoryview]) -> bytes:
    """One byte string of `pieces` (pickles, one per member of a scatter or an alltoall):
    their end offsets (uint64 little-endian each, counted from the end of that header),
    then the pieces back to back. `piece` reads one of them back."""
    ends = []
    end = 0
    for item in pieces:
        end += len(item)
        ends.append(end)
    return b"".join([_header(len(ends)).pack(*ends), *pieces])


def piece(data: bytes, index: int, count: int, sender: int) -> memoryview:
    """Piece `index` of a `bundle` of `count` pieces that member `sender` made (a view into
    `data`; `data` is this member's own copy, so that no one changes it while it is read).
    MPI.Exception(ERR_OTHER) naming the sender when the bundle is not one: too short for
    its header, or the piece's offsets out of order or past its end."""
    head = 8 * count
    size = len(data) - head
    if size < 0:
        start, end = 0, -1
    elif index:
        start, end = _ENDS.unpack_from(data, 8 * (index - 1))
    else:
        start, end = 0, _END.unpack_from(data)[0]
    if not 0 <= start <= end <= size:
        raise exceptions.Exception(
            exceptions.ERR_OTHER,
            f"rank {sender} sent a malformed bundle of {count} pickles ({len(data)} bytes: "
            f"piece {index} at {start}..{end} of {max(size, 0)})",
        )
    return memoryview(data)[head + start : head + end]
