"""The C request objects of Isend/Irecv/Waitall (ivshmem_comm/_p2preq.c) against their Python
references in guest_lib.mpi.request: new_request == request_of, post_recv == a RecvOp queued
with a Request on it, irecv_post == post_recv of a plain spec's view or None, isend_post's
checks, null_done == _null_done on every case of its rule (which requests it nulls, which
make it refuse, which errors it raises), Op subclasses whose `done` is a property read as
Python reads them."""

from __future__ import annotations

from typing import Any

import pytest

from guest_lib.mpi import constants, exceptions
from guest_lib.mpi.matching import DoneOp, Op, RecvOp
from guest_lib.mpi.request import Request, _all_done, _first_pending_py, _null_done, request_of
from ivshmem_comm import ring

try:
    from ivshmem_comm import _fastpath
except ImportError:
    _fastpath = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_fastpath is None, reason="ivshmem_comm._fastpath is not built")
if _fastpath is not None and ring.p2p_types is None:  # the pure-Python pass: registered here
    _fastpath.p2p_types(Request, RecvOp, RecvOp(0, constants.ANY_SOURCE, constants.ANY_TAG, None))

REQUEST_SLOTS = ("_cell", "_engine", "_finish", "_op", "_owner", "_rank_of")
OP_SLOTS = [n for kind in (Op, RecvOp) for n in kind.__slots__ if n != "why"]


def _slots(obj: Any, names: Any) -> dict[str, Any]:
    return {name: getattr(obj, name, "<unset>") for name in names}


@needs_c
def test_new_request_is_request_of() -> None:
    op, engine, rank_of = DoneOp(3, 4), object(), {1: 0}
    got = _fastpath.new_request(op, engine, rank_of, len)
    want = request_of(op, engine, rank_of, len)  # type: ignore[arg-type]
    assert type(got) is Request
    assert _slots(got, REQUEST_SLOTS) == _slots(want, REQUEST_SLOTS)
    assert got == want and got._op is op and vars(got) == {}


@needs_c
def test_post_recv_queues_the_receive_python_makes() -> None:
    view = memoryview(bytearray(8))
    posted: list[Any] = [RecvOp(0, 1, 2, None)]
    engine, rank_of = object(), {4: 1}
    request = _fastpath.post_recv(posted, view, 6, 4, 9, 2, engine, rank_of, None)
    assert len(posted) == 2 and request._op is posted[1]
    op, want = posted[1], RecvOp(6, 4, 9, view, None, 2)
    assert type(op) is RecvOp
    assert _slots(op, OP_SLOTS) == _slots(want, OP_SLOTS)
    assert not hasattr(op, "why") and op.mpi_world == ()  # (immutable: shared)
    assert _slots(request, REQUEST_SLOTS) == _slots(
        request_of(op, engine, rank_of),
        REQUEST_SLOTS,  # type: ignore[arg-type]
    )
    assert op.matches(6, 4, 9) and not op.matches(6, 5, 9)
    with pytest.raises(TypeError):
        _fastpath.post_recv((), view, 6, 4, 9, 2, engine, rank_of, None)
    with pytest.raises(TypeError):
        _fastpath.post_recv(posted, view, 6, 4, 9, 2, engine, rank_of)


def _irecv_at(posted: list[Any], unexpected: list[Any], count: Any, running: list[int]) -> Any:
    """An irecv_post `at` tuple (Comm._irecv_at's shape) with these lists and thread count."""
    from guest_lib.mpi.buffers import quick_parts

    engine, rank_of = object(), {4: 1}
    return (posted, 6, 4, 2, engine, rank_of, unexpected, count, running, quick_parts()[1],
            constants.TAG_UB, constants.ANY_TAG)  # fmt: skip


@needs_c
def test_irecv_post_posts_as_post_recv_or_declines() -> None:
    """irecv_post(buf, source, tag, at) queues what post_recv queues for the spec's flat
    view, and declines (None, nothing queued) a source not an int, a bad tag, a spec quick
    does not take, a non-empty unexpected list and other threads; a malformed `at` is a
    TypeError."""
    posted: list[Any] = []
    unexpected: list[Any] = []
    running = [0]
    at = _irecv_at(posted, unexpected, lambda: running[0], running)
    buf = bytearray(8)
    for tag in (9, constants.ANY_TAG, constants.TAG_UB):
        request = _fastpath.irecv_post(buf, 4, tag, at)
        op = posted[-1]
        assert request._op is op and type(op) is RecvOp and op.want_tag == tag
        want = RecvOp(6, 4, tag, op.view, None, 2)
        assert _slots(op, OP_SLOTS) == _slots(want, OP_SLOTS)
        assert bytes(op.view) == bytes(8) and op.view.nbytes == 8 and not op.view.readonly
        assert request._engine is at[4] and request._rank_of is at[5] and request._finish is None
    assert len(posted) == 3
    declined = [
        (buf, -5), (buf, constants.TAG_UB + 1), (buf, True), (buf, 2**70), (buf, "1"),
        (bytes(8), 1), (bytearray(), 1), ([buf, 9, None], 1), (object(), 1),
    ]  # fmt: skip
    for spec, tag in declined:
        assert _fastpath.irecv_post(spec, 4, tag, at) is None, (spec, tag)
    for source in (4.0, True, "4"):
        assert _fastpath.irecv_post(buf, source, 1, at) is None
    unexpected.append(object())
    assert _fastpath.irecv_post(buf, 4, 1, at) is None
    unexpected.clear()
    at_threads = _irecv_at(posted, unexpected, lambda: 1, running)  # a thread not a service's
    assert _fastpath.irecv_post(buf, 4, 1, at_threads) is None
    assert len(posted) == 3
    with pytest.raises(TypeError):
        _fastpath.irecv_post(buf, 4, 1, at[:-1])
    with pytest.raises(TypeError):
        _fastpath.irecv_post(buf, 4, 1, list(at))
    with pytest.raises(TypeError):
        _fastpath.irecv_post(buf, 4, 1)


@needs_c
def test_isend_post_checks_its_tuple_and_dest() -> None:
    """isend_post(buf, dest, tag, at) refuses an `at` not (P2PLane, peer, ctx, sent)
    (TypeError) and declines (None) a dest not an int before it sends anything (the lane's
    own rule, a send written whole, is test_p2p_lane's; the rank tests send through it)."""
    with pytest.raises(TypeError):
        _fastpath.isend_post(bytearray(8), 1, 0, (object(), 1, 0, None))
    with pytest.raises(TypeError):
        _fastpath.isend_post(bytearray(8), 1, 0, ())
    with pytest.raises(TypeError):
        _fastpath.isend_post(bytearray(8), 1, 0)
    lane = _fastpath.P2PLane.__new__(_fastpath.P2PLane)  # (never initialised: never reached)
    for dest in (1.0, True, "1", None):
        assert _fastpath.isend_post(bytearray(8), dest, 0, (lane, 1, 0, None)) is None


class _LazyOp(Op):
    """An op whose done is a property (as area.AreaOp's and ulfm.Exchange's)."""

    __slots__ = ("asked", "ready")

    def __init__(self, ready: bool) -> None:
        super().__init__()
        self.ready = ready
        self.asked = 0

    @property  # type: ignore[override]
    def done(self) -> bool:
        self.asked += 1
        return self.ready

    @done.setter
    def done(self, value: bool) -> None:
        self.ready = value


class _BadOp(Op):
    __slots__ = ()

    @property  # type: ignore[override]
    def done(self) -> bool:
        raise RuntimeError("no done here")

    @done.setter
    def done(self, value: bool) -> None:
        pass


def _sent() -> DoneOp:
    return DoneOp(constants.ANY_SOURCE, constants.ANY_TAG)


def _cases() -> list[tuple[str, Any]]:
    """(name, a function making a fresh `requests` argument)."""

    def failed() -> Op:
        op = RecvOp(0, 0, 0, None)
        op.done, op.error = True, exceptions.ERR_TRUNCATE
        return op

    def cancelled() -> Op:
        op = RecvOp(0, 0, 0, None)
        op.done = op.cancelled = True
        return op

    def pending() -> Op:
        return RecvOp(0, 0, 0, None)

    def with_finish() -> Request:
        return request_of(_sent(), None, None, len)  # type: ignore[arg-type]

    def with_cell() -> Request:
        request = request_of(_sent(), None)
        request._cell = object()
        return request

    class Sub(Request):
        __slots__ = ()

    def unset() -> Request:
        request = request_of(_sent(), None)
        del request._finish
        return request

    def unset_done() -> Request:
        op = _sent()
        del op.done
        return request_of(op, None)

    def plain(op: Op) -> Request:
        return request_of(op, None)

    return [
        ("empty list", lambda: []),
        ("empty tuple", lambda: ()),
        ("done list", lambda: [plain(_sent()) for _ in range(5)]),
        ("done tuple", lambda: tuple(plain(_sent()) for _ in range(3))),
        ("null ones", lambda: [Request(), plain(_sent()), request_of(None, None)]),  # type: ignore[arg-type]
        ("not a list", lambda: iter([plain(_sent())])),
        ("a list subclass", lambda: type("L", (list,), {})([plain(_sent())])),
        ("a subclass", lambda: [plain(_sent()), Sub(_sent())]),
        ("not a request", lambda: [plain(_sent()), None]),
        ("pending", lambda: [plain(_sent()), plain(pending())]),
        ("failed", lambda: [plain(failed()), plain(_sent())]),
        ("cancelled", lambda: [plain(cancelled())]),
        ("finish", lambda: [with_finish()]),
        ("cell", lambda: [plain(_sent()), with_cell()]),
        ("lazy done", lambda: [plain(_sent()), plain(_LazyOp(True))]),
        ("lazy pending", lambda: [plain(_LazyOp(False)), plain(_sent())]),
        ("lazy raises", lambda: [plain(_BadOp())]),
        ("unset _finish", lambda: [unset()]),
        ("unset done", lambda: [unset_done()]),
    ]


def _run(func: Any, requests: Any) -> tuple[Any, list[Any]]:
    try:
        result: Any = func(requests)
    except Exception as exc:  # the same error class either way
        result = type(exc)
    items = list(requests) if isinstance(requests, (list, tuple)) else []
    return result, [
        (r._op is None, getattr(r._op, "asked", None)) if isinstance(r, Request) else r
        for r in items
    ]


@needs_c
@pytest.mark.parametrize(("name", "make"), _cases(), ids=[c[0] for c in _cases()])
def test_null_done_is_the_python_rule(name: str, make: Any) -> None:
    assert _run(_fastpath.null_done, make()) == _run(_null_done, make()), name


@needs_c
@pytest.mark.parametrize(("name", "make"), _cases(), ids=[c[0] for c in _cases()])
def test_first_pending_is_the_python_rule(name: str, make: Any) -> None:
    for start in (-1, 0, 1, 2, 9):
        first = make()
        if type(first) not in (list, tuple) or not all(isinstance(r, Request) for r in first):
            continue  # (Waitall's items are requests; not a list or tuple: Python's)
        assert _run(lambda r, s=start: _fastpath.first_pending(r, s), first) == _run(
            lambda r, s=start: _first_pending_py(r, s), make()
        ), (name, start)


def test_all_done_follows_the_requests_as_they_complete() -> None:
    """Waitall's predicate (C or Python): complete once every op is done or null, asking
    each op past the first pending one only once it is reached."""
    ops = [RecvOp(0, 0, 0, None) for _ in range(3)]
    lazy = _LazyOp(False)
    requests = [request_of(ops[0], None), Request(), request_of(lazy, None)] + [
        request_of(op, None) for op in ops[1:]
    ]
    for kind in (list, tuple):
        lazy.asked, lazy.ready = 0, False
        for op in ops:
            op.done = False
        all_done = _all_done(kind(requests))
        assert not all_done() and lazy.asked == 0
        ops[0].done = True
        assert not all_done() and lazy.asked == 1
        lazy.ready = True
        ops[2].done = True
        assert not all_done() and lazy.asked == 2
        ops[1].done = True
        assert all_done() and lazy.asked == 2


def test_null_done_nulls_only_when_all_completed_plainly() -> None:
    """The reference's rule itself (both paths): True nulls every one, False none."""
    requests = [request_of(_sent(), None) for _ in range(3)]
    assert _null_done(requests) and all(r._op is None for r in requests)
    pending = RecvOp(0, 0, 0, None)
    requests = [request_of(_sent(), None), request_of(pending, None)]
    assert not _null_done(requests) and requests[0]._op is not None
    if ring.null_done is not None:
        assert not ring.null_done(requests) and requests[1]._op is pending


@needs_c
def test_p2p_types_refuses_classes_without_the_slots() -> None:
    class NoSlots:
        pass

    class Prop(Request):
        __slots__ = ()

        @property
        def _op(self) -> Any:  # type: ignore[override]
            return None

    template = RecvOp(0, constants.ANY_SOURCE, constants.ANY_TAG, None)
    for args in [
        (NoSlots, RecvOp, template),
        (Prop, RecvOp, template),
        (Request, Op, template),
        (Request, RecvOp, None),
        (Request, RecvOp),
    ]:
        with pytest.raises(TypeError):
            _fastpath.p2p_types(*args)
    # nothing was registered by the refused calls: still Request and RecvOp
    assert type(_fastpath.new_request(None, None, None, None)) is Request


@needs_c
def test_take_posted_fills_and_stops_at_recv_ops_as_at_any_entry() -> None:
    """The C ring's take_posted reads and completes the MPI face's RecvOps at their slots: a
    plain one is filled as test_ring's entries are, an object one (no view) gets the bytes as
    its obj; one with a sink, an mpi side or an unset field stops the run with the message
    held; a RecvOp subclass is read by name."""
    from tests.core.test_ring import make_pair, new_region, payload, small_geometry

    g = small_geometry()
    tx, rx = make_pair(new_region(g), g, "c", "c")

    def recv(view: Any = None, **fields: Any) -> RecvOp:
        op = RecvOp(3, constants.ANY_SOURCE, constants.ANY_TAG, view)
        for name, value in fields.items():
            setattr(op, name, value)
        return op

    class Sub(RecvOp):
        __slots__ = ()

    first, sub = recv(memoryview(bytearray(64))), Sub(3, 2, 6, memoryview(bytearray(64)))
    obj, sub_obj = recv(None), Sub(3, 2, 8, None)
    for tag, size in ((5, 20), (6, 9), (7, 0), (8, 11)):
        assert tx.send_small(3 << 8 | tag, payload(tag, size)) != _fastpath.SEND_FULL
    posted: list[Any] = [first, sub, obj, sub_obj]
    assert rx.take_posted(posted, 2, 8)[0] == 4 and posted == []
    assert (first.source, first.tag, first.count, first.done, first.error) == (2, 5, 20, True, 0)
    assert bytes(first.view[:20]) == payload(5, 20) and not hasattr(first, "why")
    assert first.obj is None and (sub.source, sub.tag, sub.count, sub.done) == (2, 6, 9, True)
    assert (obj.source, obj.tag, obj.count, obj.done, obj.obj) == (2, 7, 0, True, b"")
    assert (sub_obj.tag, sub_obj.count, sub_obj.obj) == (8, 11, payload(8, 11))
    unset = recv(memoryview(bytearray(64)))
    del unset.want_tag
    for entry in (
        recv(memoryview(bytearray(64)), sink=print),
        recv(memoryview(bytearray(64)), mpi=object()),
        recv(None, sink=print),
        recv(memoryview(bytearray(4))),  # too small
        recv(memoryview(bytes(64))),  # read-only
        unset,
    ):
        tx.reclaim()
        assert tx.send_small(3 << 8 | 1, payload(3, 30)) != _fastpath.SEND_FULL
        posted = [entry]
        taken, _kick, head = rx.take_posted(posted, 2, 8)
        assert taken == 0 and head[2:] == (30, 3 << 8 | 1) and posted == [entry]
        assert not entry.done and rx.held == 1
        rx.complete(1)


class _Base:
    __slots__ = ("a", "b")


class _Slotted(_Base):
    __slots__ = ("c", "d")


class _WithDict(_Slotted):
    pass


@needs_c
def test_copy_slots_copies_every_slot_of_the_mro_and_nothing_else() -> None:
    template = _WithDict()
    template.a, template.c = [1], "x"  # (b and d unset)
    template.extra = 5  # type: ignore[attr-defined]
    copy = _fastpath.copy_slots(template)
    assert type(copy) is _WithDict and copy is not template
    assert copy.a is template.a and copy.c == "x"
    assert not hasattr(copy, "b") and not hasattr(copy, "d") and vars(copy) == {}
    copy.b = 2  # (its own slots: the template's stay as they were)
    assert not hasattr(template, "b")
    with pytest.raises(TypeError, match="not a class defined in Python"):
        _fastpath.copy_slots(DoneOp)
    with pytest.raises(TypeError):
        _fastpath.copy_slots(3)


@needs_c
def test_a_started_rounds_copy_is_what_its_constructor_makes() -> None:
    from guest_lib.mpi import area, collectives

    group, wait, shared, args = object(), (0, 1, 2, 3), object(), (1, 2, 3)
    want = area.StartedRound(group, 7, wait, shared, collectives._nb_abandon, args)  # type: ignore[arg-type]
    got = _fastpath.copy_slots(collectives._STARTED_ROUND)
    got._group, got._k, got._wait, got._area, got.fail_args = group, 7, wait, shared, args
    names = [n for kind in type(want).__mro__ for n in getattr(kind, "__slots__", ())]
    assert _slots(got, names) == _slots(want, names)
    request = _fastpath.copy_slots(collectives._AREA_REQUEST)
    assert type(request) is area.AreaRequest
    assert _slots(request, REQUEST_SLOTS) == _slots(area.AreaRequest(), REQUEST_SLOTS)
