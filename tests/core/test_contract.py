"""The C/Python contract of the queue halves (see ivshmem_comm/ring.py's docstring).

Checked here: the public names of both ring classes against ring.TX_API / RX_API, on live
instances over a real region; `_fastpath.pyi` against the pure-Python reference (names and
signatures) and against the built module; the constants `_fastpath.c` restates by hand
against `layout.py` (values, counter order, the structs of the virtqueue); and that code
outside the implementations takes `full_fence` from the chosen backend.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import ivshmem_comm as ic
from ivshmem_comm import collective, layout, ring, virtqueue

PKG = Path(ic.__file__).resolve().parent
C_SOURCE = (PKG / "_fastpath.c").read_text()
PYI = ast.parse((PKG / "_fastpath.pyi").read_text())
MODULE_NAMES = {
    "TxRing",
    "RxRing",
    "full_fence",
    "shared_copy_costs",
    "compare_exchange_u64",
    "flat_view",
    "CACHE_WINDOW",
    "typed_copy",
    "MemoryExporter",
    "EmptyExporter",
    "CollectiveRound",
    "set_front",
    "p2p_types",
    "new_request",
    "post_recv",
    "irecv_post",
    "isend_post",
    "obj_methods",
    "null_done",
    "first_pending",
    "copy_slots",
    "P2PLane",
} | {n for n in ring.__all__ if n.startswith("SEND_")}


def _fastpath() -> ModuleType:
    """The built accelerator; skipped where it is not built (an error under
    IVSHMEM_COMM_REQUIRE_FASTPATH=1, as CI runs)."""
    try:
        return importlib.import_module("ivshmem_comm._fastpath")
    except ImportError:
        if os.environ.get("IVSHMEM_COMM_REQUIRE_FASTPATH") == "1":
            raise
        pytest.skip("the C accelerator is not built here")


def _implementations() -> list[Any]:
    return [
        pytest.param(lambda: virtqueue, id="python"),
        pytest.param(_fastpath, id="c"),
    ]


def _public(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


@pytest.mark.parametrize("module", _implementations())
def test_ring_classes_have_the_declared_api(
    module: Callable[[], ModuleType], make_region: Callable[..., ic.Region]
) -> None:
    impl = module()
    region = make_region(1 << 20, 2)
    g = region.geometry
    tx = impl.TxRing(region.buf, region.queue_offset(0, 1), g, 1)
    rx = impl.RxRing(region.buf, region.queue_offset(1, 0), g, 1)
    assert _public(tx) == ring.TX_API, _public(tx) ^ ring.TX_API
    assert _public(rx) == ring.RX_API, _public(rx) ^ ring.RX_API
    assert (tx.peer, tx.num, tx.data_size, tx.max_span, tx.session) == (
        1, g.queue_num, g.data_size, g.max_span, 0,
    )  # fmt: skip
    assert rx.data_offset == region.queue_offset(1, 0) + g.data_rel_offset


def _pyi_class(name: str) -> ast.ClassDef:
    return next(n for n in PYI.body if isinstance(n, ast.ClassDef) and n.name == name)


def _pyi_members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    """Every member the stub declares for `cls`, its stub-only bases' included."""
    members: dict[str, ast.AST] = {}
    for base in cls.bases:
        assert isinstance(base, ast.Name)
        members.update(_pyi_members(_pyi_class(base.id)))
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            members[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members[node.target.id] = node
    return members


def _norm(annotation: object) -> str:
    """One spelling of an annotation (the reference's are strings: postponed evaluation)."""
    text = annotation if isinstance(annotation, str) else ast.unparse(annotation)  # type: ignore[arg-type]
    return ast.unparse(ast.parse(text, mode="eval"))


def _pyi_signature(node: ast.FunctionDef) -> list[tuple[str, str]]:
    args = [(a.arg, _norm(a.annotation) if a.annotation else "") for a in node.args.args]
    return [*args, ("->", _norm(node.returns) if node.returns else "")]


def _ref_signature(func: Any) -> list[tuple[str, str]]:
    sig = inspect.signature(func)
    args = [
        (p.name, "" if p.annotation is inspect.Parameter.empty else _norm(p.annotation))
        for p in sig.parameters.values()
    ]
    return [*args, ("->", _norm(sig.return_annotation))]


@pytest.mark.parametrize(
    ("name", "api"), [("TxRing", ring.TX_API), ("RxRing", ring.RX_API)], ids=["tx", "rx"]
)
def test_stub_declares_the_reference(name: str, api: frozenset[str]) -> None:
    members = _pyi_members(_pyi_class(name))
    init = members.pop("__init__")
    assert set(members) == api, set(members) ^ api
    reference = getattr(virtqueue, name)
    for member, node in members.items():
        attr = inspect.getattr_static(reference, member, None)
        if isinstance(node, ast.FunctionDef) and not any(
            isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list
        ):
            assert _pyi_signature(node) == _ref_signature(attr), f"{name}.{member}"
        elif isinstance(attr, property):
            assert isinstance(node, ast.FunctionDef), f"{name}.{member} is a property"
            returns = node.returns
            assert returns is not None
            assert _norm(returns) == _norm(inspect.signature(attr.fget).return_annotation)
    assert isinstance(init, ast.FunctionDef)
    assert _pyi_signature(init) == _ref_signature(reference.__init__)


def test_stub_declares_the_module() -> None:
    declared = {
        n.name if isinstance(n, ast.FunctionDef | ast.ClassDef) else n.target.id  # type: ignore[union-attr]
        for n in PYI.body
        if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AnnAssign)
    }
    assert {n for n in declared if not n.startswith("_")} == MODULE_NAMES
    for func in (virtqueue.full_fence, virtqueue.compare_exchange_u64):
        node = next(n for n in PYI.body if getattr(n, "name", "") == func.__name__)
        assert isinstance(node, ast.FunctionDef)
        assert _pyi_signature(node) == _ref_signature(func)


def test_built_module_matches_its_stub() -> None:
    fast = _fastpath()
    assert _public(fast) == MODULE_NAMES
    for code in ("SEND_OK", "SEND_KICK", "SEND_FULL", "SEND_TOO_BIG"):
        assert getattr(fast, code) == getattr(virtqueue, code) == getattr(ring, code)
    assert fast.CACHE_WINDOW == layout.CACHE_WINDOW


# ------------------------------------------------------------------------------ _fastpath.c
def _c_value(expr: str) -> int:
    """The value of a C integer constant expression of literals, shifts and signs."""
    expr = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]*\b", r"\1", expr)
    if not re.fullmatch(r"[0-9a-fA-FxX()<>+\-* ]+", expr):
        raise ValueError(f"not a constant expression: {expr!r}")
    return int(eval(expr, {"__builtins__": {}}))


def _mirrored_defines() -> dict[str, int]:
    """The `#define`s of the block that `_fastpath.c` marks as mirrors of layout.py."""
    block = C_SOURCE.split("/* Mirrors of layout.py. */\n", 1)[1].split("\n/*", 1)[0]
    found = {}
    for line in block.splitlines():
        m = re.fullmatch(r"#define (\w+) (.+?)\s*(?:/\*.*\*/)?", line)
        assert m, f"unexpected line in the mirrored block: {line!r}"
        found[m.group(1)] = _c_value(m.group(2))
    return found


def test_c_layout_constants_are_layouts() -> None:
    defines = _mirrored_defines()
    assert len(defines) >= 10
    for name, value in defines.items():
        assert hasattr(layout, name), f"_fastpath.c mirrors {name}, which layout.py lacks"
        assert value == getattr(layout, name), (
            f"{name}: C {value}, layout.py {getattr(layout, name)}"
        )


def test_c_collective_line_words_are_collectives() -> None:
    """The arrive line's words after the rounds word (the first 4, ARRIVE's) as the C round
    and the Python steps both use them: a scatterv root's lengths, a small bcast's bytes,
    which stay within the seq's cache line."""
    for name in ("SCATTER_LENGTHS", "BCAST_INLINE"):
        m = re.search(rf"^#define COLL_{name} (\d+)", C_SOURCE, re.M)
        assert m and int(m.group(1)) == getattr(collective, name), name
    assert layout.COLL_ARRIVE.size + collective.BCAST_INLINE <= layout.CACHE_LINE


def test_c_send_codes_and_counters() -> None:
    for code in ("SEND_OK", "SEND_KICK", "SEND_FULL", "SEND_TOO_BIG", "RESERVE_LATER"):
        m = re.search(rf"^#define {code} (.+)$", C_SOURCE, re.M)
        assert m and _c_value(m.group(1)) == getattr(virtqueue, code), code
    m = re.search(r"enum \{ (CNT_\w+ = \d+(?:, CNT_\w+ = \d+)*) \};", C_SOURCE)
    assert m
    counters = {k: int(v) for k, v in (x.split(" = ") for x in m.group(1).split(", "))}
    # Counter word i of the driver counters line is COUNTER_NAMES_DRIVER[i].
    assert set(counters.values()) == set(range(len(layout.COUNTER_NAMES_DRIVER)))
    for name, index in counters.items():
        word = name.removeprefix("CNT_").lower()
        assert layout.COUNTER_NAMES_DRIVER[index].endswith(word), name


_C_TYPES = {"uint64_t": "Q", "uint32_t": "I", "uint16_t": "H"}


@pytest.mark.parametrize(
    ("struct", "mirror"),
    [("vring_desc_le", layout.VRING_DESC), ("vring_used_elem_le", layout.VRING_USED_ELEM)],
)
def test_c_structs_are_layouts(struct: str, mirror: Any) -> None:
    m = re.search(rf"struct {struct} \{{(.*?)\}};", C_SOURCE, re.S)
    assert m, struct
    codes = [_C_TYPES[line.split()[0]] for line in m.group(1).strip().splitlines()]
    assert "<" + "".join(codes) == mirror.format


def test_code_outside_the_rings_uses_the_chosen_fence() -> None:
    attach_module = importlib.import_module("guest_lib.attach")  # guest_lib.attach: a function
    expected = virtqueue.full_fence if ring.IMPLEMENTATION == "python" else _fastpath().full_fence
    assert ring.full_fence is expected
    assert attach_module.full_fence is ring.full_fence
    ring.full_fence()  # callable, returns None
