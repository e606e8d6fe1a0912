"""`MPI.Pickle` and `MPI.pickle`: how lowercase (object) methods serialise, as in mpi4py.

Every object message of the MPI face goes through the one `PICKLE` instance (exported as
`MPI.pickle`): a program, or mpi4py.futures, that re-initialises it
(`MPI.pickle.__init__(dumps, loads, protocol)`) or sets its PROTOCOL changes what every
later send/recv/bcast/... uses. An empty message loads as None (mpi4py's rule).
The environment variables MPI4PY_PICKLE_PROTOCOL and MPI4PY_PICKLE_THRESHOLD set the
defaults, as with mpi4py.
"""

from __future__ import annotations

import os
import pickle as _pickle
from collections.abc import Callable, Iterable
from typing import Any

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
    return memoryview(PICKLE.dumps(obj)).cast("B")


def loads(data: Any) -> Any:
    """The object of a received message; None for an empty one (as mpi4py)."""
    if data is None or not len(data):
        return None
    return PICKLE.loads(data)
