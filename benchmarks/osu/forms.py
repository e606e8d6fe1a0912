"""The buffer forms users write, built over one element view the tests fill and check.

A `Buf` holds the user's buffer object (`obj`), a numpy view of its elements (`view`: uint8, or
float64 for the "double" form and for reductions) and knows the message spec of its form:
    numpy, in_place   the numpy array itself
    mmap, bytearray, array   [buf, count, MPI.BYTE]
    double            (array.array('d'), MPI.DOUBLE)
and the vector spec of the v-collectives: [buf, counts, displs, datatype].
"""

from __future__ import annotations

import array
import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np


class CheckError(AssertionError):
    """A test received wrong data (a failure, never a number)."""


class Buf:
    """A message buffer of `blocks` blocks of `count` elements in form `form` (see the module
    docstring). The count in a [buf, count, MPI.BYTE] spec is the count of one block, as in
    mpi4py's collectives (a Gather receive buffer names what one rank sends)."""

    def __init__(self, form: str, count: int, floats: bool, blocks: int = 1) -> None:
        self.form = form
        self.count = count
        count *= blocks
        self.floats = floats or form == "double"
        dtype = np.float64 if self.floats else np.uint8
        if form in ("numpy", "in_place", "pickle"):
            self.obj: Any = np.zeros(count, dtype)
            self.view = self.obj
            return
        if form == "double":
            self.obj = array.array("d", bytes(8 * count))
        elif form == "mmap":
            self.obj = mmap.mmap(-1, max(count, 1))
        elif form == "bytearray":
            self.obj = bytearray(max(count, 1))
        elif form == "array":
            self.obj = array.array("B", bytes(max(count, 1)))
        else:
            raise ValueError(f"no buffer form {form!r}")
        self.view = np.frombuffer(self.obj, dtype, count=count)

    def spec(self, mpi: Any) -> Any:
        """The message spec of this form."""
        if self.form == "double":
            return (self.obj, mpi.DOUBLE)
        if self.form in ("mmap", "bytearray", "array"):
            return [self.obj, self.count, mpi.BYTE]
        return self.obj

    def vspec(self, mpi: Any, counts: Sequence[int], displs: Sequence[int]) -> Any:
        """The vector spec [buf, counts, displs, datatype] (counts/displs in elements)."""
        datatype = mpi.DOUBLE if self.floats else mpi.BYTE
        return [self.obj, list(counts), list(displs), datatype]


def pattern(count: int, floats: bool, seed: int) -> np.ndarray:
    """Deterministic data for `seed` (a rank, or a rank and a block): uint8 or small-integer
    float64 values, so sums of a few of them are exact."""
    index = np.arange(count, dtype=np.int64)
    if floats:
        return (index % 101 + seed % 977 + 1).astype(np.float64)
    return ((index * 131 + seed * 17 + 7) % 251).astype(np.uint8)


def expect(got: Any, want: np.ndarray, what: str) -> None:
    """Raise CheckError unless `got` (array-like) equals `want` element by element."""
    got_arr = np.asarray(got)
    if got_arr.shape != want.shape:
        raise CheckError(
            f"{what}: got {got_arr.shape[0] if got_arr.ndim else '?'} elements, "
            f"want {want.shape[0]}"
        )
    if not np.array_equal(got_arr, want):
        bad = int(np.flatnonzero(got_arr != want)[0])
        raise CheckError(f"{what}: element {bad} is {got_arr[bad]!r}, want {want[bad]!r}")


def expect_bytes(got: Any, want: np.ndarray, what: str) -> None:
    """CheckError unless `got` (bytes from a pickled message) holds `want`'s bytes."""
    if not isinstance(got, bytes):
        raise CheckError(f"{what}: got a {type(got).__name__}, want bytes")
    expect(np.frombuffer(got, np.uint8), want, what)
