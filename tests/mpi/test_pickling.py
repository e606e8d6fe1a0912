"""The bundles of pickles that lowercase scatter and alltoall put in a collective slab
(`pickling.bundle` / `pickling.piece`): every piece reads back as it went in, and a bundle
whose header a hostile or broken member wrote wrong is refused with an error naming that
member, never read out of its bounds."""

from __future__ import annotations

import struct

import pytest

from guest_lib.mpi import MPI
from guest_lib.mpi.pickling import bundle, dumps, loads, piece


def test_pieces_read_back():
    items = [None, b"", b"x" * 1000, {"k": [1, 2]}, "t" * 3]
    data = bundle([dumps(item) for item in items] + [memoryview(b"")])
    assert [loads(piece(data, i, 6, 0)) for i in range(6)] == [*items, None]


@pytest.mark.parametrize(
    "data",
    [
        b"",  # shorter than its header
        struct.pack("<3Q", 4, 2, 6) + b"abcdef",  # piece 1 ends before it starts
        struct.pack("<3Q", 4, 8, 9) + b"abcdef",  # past the end
        struct.pack("<3Q", 2**63, 2**64 - 1, 6) + b"abcdef",  # huge offsets
    ],
)
def test_a_malformed_bundle_names_its_sender(data):
    with pytest.raises(MPI.Exception, match="rank 5 sent a malformed bundle"):
        for index in range(3):
            piece(data, index, 3, 5)
