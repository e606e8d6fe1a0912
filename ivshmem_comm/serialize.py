"""Objects to bytes and back: msgpack, with numpy arrays kept raw (dtype and shape preserved).

Extension types (the wire contract between peers):
- 1: numpy array: msgpack of (dtype.str, shape) then the raw C-order bytes.
- 2: pickle: only produced with `allow_pickle=True`, only accepted with `allow_pickle=True`.
- 3: tuple: msgpack of its items as a list (so tuples come back as tuples).
Anything else msgpack cannot pack raises TypeError naming the type, unless pickling is allowed.
"""

from __future__ import annotations

import pickle
from typing import Any

import msgpack
import numpy as np

_EXT_NDARRAY = 1
_EXT_PICKLE = 2
_EXT_TUPLE = 3


def _packer(allow_pickle: bool) -> Any:
    def default(obj: Any) -> msgpack.ExtType:
        if isinstance(obj, tuple):
            return msgpack.ExtType(_EXT_TUPLE, _pack(list(obj), allow_pickle))
        if isinstance(obj, np.ndarray) and obj.dtype.hasobject is False:
            array = np.ascontiguousarray(obj)
            meta = msgpack.packb((array.dtype.str, list(array.shape)))
            return msgpack.ExtType(_EXT_NDARRAY, meta + array.tobytes())
        if isinstance(obj, np.generic):
            return msgpack.ExtType(_EXT_NDARRAY, _ndarray_payload(np.asarray(obj)))
        if allow_pickle:
            return msgpack.ExtType(_EXT_PICKLE, pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))
        raise TypeError(f"cannot serialise {type(obj).__name__} without allow_pickle=True")

    return default


def _ndarray_payload(array: np.ndarray) -> bytes:
    return msgpack.packb((array.dtype.str, list(array.shape))) + array.tobytes()


def _pack(obj: Any, allow_pickle: bool) -> bytes:
    return msgpack.packb(obj, default=_packer(allow_pickle), strict_types=True, use_bin_type=True)


def dumps(obj: Any, *, allow_pickle: bool = False) -> bytes:
    """Serialise `obj`. Raises TypeError for a type that needs pickle when it is not allowed."""
    return _pack(obj, allow_pickle)


def loads(data: Any, *, allow_pickle: bool = False) -> Any:
    """Deserialise bytes made by `dumps`; the result owns its memory (arrays are writable).

    Raises ValueError for malformed input or a pickle payload when pickle is not allowed.
    """

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == _EXT_TUPLE:
            return tuple(loads(payload, allow_pickle=allow_pickle))
        if code == _EXT_NDARRAY:
            unpacker = msgpack.Unpacker()
            unpacker.feed(payload)
            dtype, shape = unpacker.unpack()
            raw = payload[unpacker.tell() :]
            array = np.frombuffer(bytearray(raw), dtype=np.dtype(dtype))
            return array.reshape(shape) if shape else array.reshape(())[()]
        if code == _EXT_PICKLE:
            if not allow_pickle:
                raise ValueError("refusing a pickled object (pass allow_pickle=True to accept)")
            return pickle.loads(payload)
        raise ValueError(f"unknown extension type {code}")

    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"malformed serialised object: {exc}") from None
