"""buffers.quick, the per-call spec path of Send/Recv/Isend/Irecv: the C flat_view and its
Python reference agree on every spec, and wherever they give a view it is the one parse()
gives (same bytes, same memory); everything else is left to parse()."""

from __future__ import annotations

import array
import mmap

import numpy as np
import pytest

from guest_lib.mpi import MPI, buffers

try:
    from ivshmem_comm._fastpath import flat_view
except ImportError:
    flat_view = None

needs_c = pytest.mark.skipif(flat_view is None, reason="ivshmem_comm._fastpath is not built")


def specs() -> list:
    """Plain specs of every buffer form and the near misses around them."""
    mm = mmap.mmap(-1, 64)
    mm[:] = bytes(range(64))
    ba = bytearray(range(24))
    ar = array.array("d", [1.5, 2.5, 3.5])
    two = np.arange(12, dtype=np.int32).reshape(3, 4)
    return [
        [mm, 8, MPI.BYTE], [mm, 0, MPI.BYTE], [mm, 64, MPI.BYTE], [mm, 65, MPI.BYTE],
        [mm, -1, MPI.BYTE], [mm, 2, MPI.DOUBLE], (mm, MPI.BYTE), (mm, MPI.DOUBLE),
        [ba, 3, MPI.DOUBLE], (ba, MPI.DOUBLE), (ba, MPI.INT), [ba, 5, MPI.INT],
        (bytearray(12), MPI.DOUBLE),  # not whole elements
        [ar, 2, MPI.DOUBLE], (ar, MPI.DOUBLE), (ar, MPI.FLOAT), [ar, 3, MPI.BYTE],
        [bytes(16), 16, MPI.BYTE],  # read-only
        [two, 6, MPI.INT], (two, MPI.INT), [two[:, 1:], 3, MPI.INT],  # the last: strided
        [memoryview(ba)[::2], 4, MPI.BYTE],  # not contiguous
        [mm, True, MPI.BYTE], [mm, np.int64(8), MPI.BYTE], [mm, 8.0, MPI.BYTE],  # odd counts
        [mm, 2**70, MPI.BYTE], [mm, 8, "B"], [mm, 8, MPI.Datatype(MPI.BYTE)],  # parse's
        [mm, 8, MPI.DATATYPE_NULL], [None, 0, MPI.BYTE], [object(), 1, MPI.BYTE],
        [mm, (1, 2), MPI.BYTE], [mm, 8, 0, MPI.BYTE], [mm], [mm, 1, MPI.BYTE, 0, 0],
        mm, ba, ar, bytes(4), np.arange(4.0), np.zeros(0), np.zeros((0, 3)),
        [np.zeros((0, 3)), 0, MPI.DOUBLE], np.arange(6, dtype=np.int16).reshape(2, 3),
        (array.array("d"), MPI.DOUBLE), [array.array("d"), 0, MPI.DOUBLE],  # empty, typed
        (np.zeros(0), MPI.DOUBLE), [np.zeros(0, np.int32), 0, MPI.INT],
        (np.zeros((2, 0)), MPI.DOUBLE),
        np.zeros(3, ">f8"),  # byte-swapped: parse's BufferError
        np.array([1 + 2j, 3j]), np.zeros(2, "M8[s]"), np.zeros(2, "U2"), np.zeros(4)[::2],
        5, None,
    ]  # fmt: skip


def _same(got, want) -> None:
    if want is None:
        assert got is None
    else:
        assert type(got) is memoryview and got.format == "B" and got.ndim == 1
        assert bytes(got) == bytes(want) and got.readonly == want.readonly
        assert _layout(got) == _layout(want)


def _layout(view: memoryview) -> tuple:
    """Every field of a memoryview's buffer info that Python shows."""
    shape = (view.format, view.itemsize, view.ndim, view.shape, view.strides, view.suboffsets)
    return (*shape, view.nbytes, len(view), view.c_contiguous, view.f_contiguous, view.contiguous)


@needs_c
def test_a_typed_buffer_is_flattened_as_cast_flattens_it():
    """flat_view turns the memoryview of a typed buffer of one dimension or more into its byte
    view in place (no second memoryview): what memoryview.cast("B") gives, field for field; the
    view writes through to the buffer, slices and casts as any byte view, and its export ends
    with it (the buffer can be resized again)."""
    sizes = buffers._PLAIN_SIZE or buffers._plain_sizes()
    two = np.arange(12, dtype=np.float64).reshape(3, 4)
    grow = array.array("d", [1.0, 2.0, 3.0])
    for spec in (two, (two, MPI.DOUBLE), [two, 5, MPI.DOUBLE], (grow, MPI.DOUBLE),
                 [grow, 2, MPI.DOUBLE], np.arange(3, dtype=np.int32)):  # fmt: skip
        view = flat_view(spec, True, sizes)
        buf = spec if isinstance(spec, np.ndarray) else spec[0]
        cast = memoryview(buf).cast("B")[: len(view)]
        assert _layout(view) == _layout(cast) and bytes(view) == bytes(cast), spec
        assert view[8:16].tobytes() == cast[8:16].tobytes()
        typed = memoryview(buf).format
        assert view[:8].cast(typed).tolist() == cast[:8].cast(typed).tolist()
        view[0] = 0xFF
        assert memoryview(buf).cast("B")[0] == 0xFF
        view.release()
    view = flat_view((grow, MPI.DOUBLE), True, sizes)
    with pytest.raises(BufferError):
        grow.append(4.0)  # exported while the view lives
    del view
    grow.append(4.0)


@needs_c
def test_a_count_short_of_the_buffer_is_cut_as_a_slice_cuts_it():
    """flat_view cuts the byte view of [buf, count, datatype] over a longer buffer (mpi4py's
    demo/osu_bw.py: [mmap(MAX_MSG_SIZE), size, MPI.BYTE]) to count elements in place (no
    second memoryview): what view[:bytes] gives, field for field; it writes through to the
    buffer's start, slices and casts as any byte view, and its export ends with it."""
    sizes = buffers._PLAIN_SIZE or buffers._plain_sizes()
    grow = bytearray(range(32))
    two = np.arange(12, dtype=np.float64).reshape(3, 4)
    for spec, cut in (([mmap.mmap(-1, 4096), 8, MPI.BYTE], 8), ([grow, 5, MPI.BYTE], 5),
                      ([grow, 3, MPI.INT], 12), ([two, 5, MPI.DOUBLE], 40),
                      ([array.array("d", [1.0, 2.0, 3.0]), 1, MPI.DOUBLE], 8),
                      ([np.zeros(64, np.uint8), 0, MPI.BYTE], 0)):  # fmt: skip
        view = flat_view(spec, True, sizes)
        whole = memoryview(spec[0]).cast("B")
        assert _layout(view) == _layout(whole[:cut]) and bytes(view) == bytes(whole[:cut])
        assert view[1:4].tobytes() == whole[1:4].tobytes()[: max(0, min(cut, 4) - 1)]
        if cut >= 8:
            assert view[:8].cast("d").tolist() == whole[:8].cast("d").tolist()
        if cut:
            view[cut - 1] = 0xEE
            assert whole[cut - 1] == 0xEE and bytes(whole[cut:]) == bytes(whole)[cut:]
        with pytest.raises(IndexError):
            view[cut]
        whole.release()
        view.release()
    view = flat_view([grow, 5, MPI.BYTE], True, sizes)
    with pytest.raises(BufferError):
        grow.append(0)  # exported while the view lives
    del view
    grow.append(0)


@needs_c
@pytest.mark.parametrize("writable", [False, True])
def test_c_and_python_flat_views_agree(writable):
    """The C flat_view gives what its Python reference gives for every spec, through the
    sizes table the C front memoizes (buffers._PLAIN_SIZE, set_front's) and through any other
    dict of the same entries."""
    sizes = buffers._PLAIN_SIZE or buffers._plain_sizes()
    for index, spec in enumerate(specs()):
        want = buffers._flat_view_py(spec, writable, sizes)
        _same(flat_view(spec, writable, sizes), want)
        _same(flat_view(spec, writable, dict(sizes)), want)
        if want is not None:  # the same memory, not a copy
            assert (
                np.shares_memory(
                    np.frombuffer(want, np.uint8),
                    np.frombuffer(flat_view(spec, writable, sizes), np.uint8),
                )
                or len(want) == 0
            ), index


@pytest.mark.parametrize("writable", [False, True])
def test_quick_is_parse_where_it_answers(writable):
    answered = 0
    for index, spec in enumerate(specs()):
        got = buffers.quick(spec, writable)
        if got is None:
            continue
        answered += 1
        parsed = buffers.parse(spec, writable=writable)
        assert bytes(got) == bytes(parsed.view), index
        if len(got):
            assert np.shares_memory(np.frombuffer(got, np.uint8),
                                    np.frombuffer(parsed.view, np.uint8)), index  # fmt: skip
    assert answered >= 15


def test_flat_view_refuses_bad_arguments():
    if flat_view is None:
        pytest.skip("ivshmem_comm._fastpath is not built")
    with pytest.raises(TypeError):
        flat_view([bytearray(8), 8, MPI.BYTE], False, [])
    with pytest.raises(TypeError):
        flat_view([bytearray(8), 8, MPI.BYTE], False)
    with pytest.raises(ValueError):
        flat_view([bytearray(8), 8, MPI.BYTE], False, {id(MPI.BYTE): 0})


def test_empty_buffer_of_another_shape_in_a_spec_is_zero_bytes():
    """An empty 2-d array in a `[buf, 0, datatype]` / vector spec is 0 bytes, as a bare one
    is: the fast paths (buffers.plain, plain_vector) decline it rather than raise memoryview's
    "cannot cast view with zeros in shape" TypeError (they raised it before), and the full
    parse takes it."""
    empty = np.zeros((0, 3))
    assert buffers.plain([empty, 0, MPI.DOUBLE]) is None
    assert buffers.plain_vector([empty, ([0], [0]), MPI.DOUBLE], 1) is None
    spec = buffers.parse([empty, 0, MPI.DOUBLE])
    assert (len(spec.view), spec.count) == (0, 0)
    assert len(buffers.parse_vector([empty, ([0], [0]), MPI.DOUBLE], 1).view) == 0


@pytest.mark.parametrize("writable", [False, True])
def test_an_empty_typed_buffer_takes_the_fast_paths(writable):
    """An empty 1-d buffer of a typed format (array.array("d"), a numpy array) in a spec is 0
    bytes on the fast paths (quick: the C flat_view and its Python reference; plain), as an
    empty byte buffer is: a reduce-scatter block of no elements (`(buf, MPI.DOUBLE)` at a
    rank that receives none) takes the lanes, not the full parse (they declined it before)."""
    sizes = buffers._PLAIN_SIZE or buffers._plain_sizes()
    for spec in ((array.array("d"), MPI.DOUBLE), [array.array("d"), 0, MPI.DOUBLE],
                 (np.zeros(0), MPI.DOUBLE), [np.zeros(0, np.int32), 0, MPI.INT]):  # fmt: skip
        for view in (buffers.quick(spec, writable), buffers._flat_view_py(spec, writable, sizes),
                     buffers.plain(spec, writable).view):  # fmt: skip
            assert type(view) is memoryview and len(view) == 0 and view.format == "B", spec
    assert buffers.plain((np.zeros((2, 0)), MPI.DOUBLE)) is None  # (2-d: the full parse)
