"""pickling.parts and load_view: the stream of the standard pickler, in parts, and its read."""

from __future__ import annotations

import array
import pickle

import numpy as np
import pytest

from guest_lib.mpi import pickling

OBJECTS = [
    None, 7, "text", b"", b"x" * 10, bytes(70_000), bytes(1 << 20), bytearray(b"y" * 200_000),
    "s" * 100_000, np.arange(100_000.0), np.asfortranarray(np.ones((300, 300))),
    np.arange(400_000)[::2], [np.zeros(20_000), b"x" * 100_000, {"k": 1}],
    array.array("d", range(20_000)), {"big": bytes(300_000), "small": 1},
]  # fmt: skip


@pytest.mark.parametrize("protocol", [None, 2, 4, 5])
@pytest.mark.parametrize("index", range(len(OBJECTS)))
def test_parts_lay_out_the_stream_of_dumps(index, protocol):
    """Laid end to end, the parts are what MPI.pickle's dumps makes, and their total is
    right; a large payload is a part of its own, not a copy (bytes: the object itself)."""
    obj = OBJECTS[index]
    pickling.PICKLE.__init__(protocol=protocol)
    try:
        parts, nbytes = pickling.parts(obj)
        want = pickling.PICKLE.dumps(obj)
        assert b"".join(parts) == want and nbytes == len(want)
        assert all(memoryview(part).c_contiguous for part in parts)
        if type(obj) is bytes and len(obj) >= 64 << 10 and (protocol or 5) >= 4:
            assert any(part is obj for part in parts)
    finally:
        pickling.PICKLE.__init__()


def test_load_view_reads_in_place_or_copies_for_a_custom_loads():
    """load_view: None for an empty message; the standard loads reads the view itself (the
    view can be released right after); a custom loads gets bytes of its own."""
    stream = bytearray(pickle.dumps({"k": bytes(100_000)}, 5))
    view = memoryview(stream)
    assert pickling.load_view(view[:0]) is None
    assert pickling.load_view(view) == {"k": bytes(100_000)}
    view.release()  # (nothing kept an export of it)
    seen = []
    pickling.PICKLE.__init__(loads=lambda data: seen.append(type(data)) or pickle.loads(data))
    try:
        assert pickling.load_view(memoryview(stream)) == {"k": bytes(100_000)}
        assert seen == [bytes]
    finally:
        pickling.PICKLE.__init__()
