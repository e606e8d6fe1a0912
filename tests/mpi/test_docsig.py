"""docsig: the signature line at the head of every MPI docstring is the function's own.

Each line written by `docsig.embed` (from code objects) is parsed back as a `def` and compared
with what `inspect.signature` says of the function: same parameters in the same order, same
kinds, same annotations, defaults where the function has them. The text below the line is held
to mpi4py's layout here too (mpi4py's test_doc, run by test_mpi4py_suite, checks it at 1, 2
and 4 ranks; this one in-process, in seconds, with the properties).
"""

from __future__ import annotations

import ast
import inspect
import types
from typing import Any

from guest_lib.mpi import MPI

_KINDS = {
    "posonlyargs": inspect.Parameter.POSITIONAL_ONLY,
    "args": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "kwonlyargs": inspect.Parameter.KEYWORD_ONLY,
}


def _visited() -> list[tuple[str, Any]]:
    """(qualified name, object) of what mpi4py's test_doc visits in the MPI namespace.

    Classes and Python functions of the namespace, and in this package's classes their
    functions, properties and class/static methods (each object once); the functions of a
    class/static method, not the descriptor.
    """
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(namespace: dict[str, Any], prefix: str) -> None:
        for name, value in namespace.items():
            inner = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            if id(value) in seen or not (
                type(inner) is type or isinstance(inner, (property, types.FunctionType))
            ):
                continue
            seen.add(id(value))
            found.append((prefix + name, inner))
            if type(inner) is type and _ours(inner):
                visit(dict(vars(inner)), f"{prefix}{name}.")

    visit(vars(MPI), "MPI.")
    return found


def _ours(obj: Any) -> bool:
    target = obj.fget if isinstance(obj, property) else obj
    return str(getattr(target, "__module__", "")).startswith("guest_lib.")


def _documented() -> list[tuple[str, Any]]:
    """(qualified name, object) of every documented function, method and property of ours."""
    return [
        (name, obj)
        for name, obj in _visited()
        if not isinstance(obj, type) and _ours(obj) and obj.__doc__
    ]


def _layout_problem(qualname: str, obj: Any) -> str | None:
    """What breaks mpi4py's docstring layout in `obj`'s docstring, None if nothing.

    The layout: (functions, methods, properties) a signature line and a blank line, then
    text whose summary line is one line ending in '.', starting with a capital letter,
    the whole ending in '.'; no docstring is allowed on private names only.
    """
    private = qualname.rpartition(".")[2].startswith("_")
    if not _ours(obj):  # (a private member made for one of our classes: NamedTuple's _make)
        in_class = qualname.count(".") > 1
        return None if in_class and private else "not of this package: keep it out of MPI"
    doc = obj.__doc__
    if doc is None:
        return None if private else "no docstring"
    text = doc
    if not isinstance(obj, type):
        _head, blank, text = doc.partition("\n\n")
        if not blank:
            return "no signature line"
    if not text.strip():
        return "empty text"
    if text[0] == text[0].lower():
        return "does not start with a capital letter"
    if not text.partition("\n")[0].endswith("."):
        return "summary is not one line ending in '.'"
    if not text.rstrip().endswith(".") or text != text.strip():
        return "does not end with '.' (or has surrounding blank space)"
    return None


def _parameters_of_line(line: str) -> tuple[list[tuple[str, Any, str | None, bool]], str | None]:
    """Parse `name(params) -> ret` as a def: [(name, kind, annotation, has default)], ret."""
    tree = ast.parse(f"def {line}: pass").body[0]
    assert isinstance(tree, ast.FunctionDef)
    args = tree.args
    out: list[tuple[str, Any, str | None, bool]] = []
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    for index, arg in enumerate(positional):
        kind = _KINDS["posonlyargs"] if arg in args.posonlyargs else _KINDS["args"]
        out.append((arg.arg, kind, _source(arg.annotation), index >= first_default))
    if args.vararg is not None:
        out.append((args.vararg.arg, inspect.Parameter.VAR_POSITIONAL, None, False))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append((arg.arg, _KINDS["kwonlyargs"], _source(arg.annotation), default is not None))
    if args.kwarg is not None:
        out.append((args.kwarg.arg, inspect.Parameter.VAR_KEYWORD, None, False))
    return out, _source(tree.returns)


def _source(node: ast.expr | None) -> str | None:
    return None if node is None else ast.unparse(node)


def _annotation(value: Any) -> str | None:
    if value is inspect.Parameter.empty:
        return None
    return ast.unparse(ast.parse(value if isinstance(value, str) else value.__qualname__))


def test_every_signature_line_matches_inspect_signature() -> None:
    documented = _documented()
    assert len(documented) > 400  # the whole namespace was walked
    for qualname, obj in documented:
        head, blank, text = obj.__doc__.partition("\n\n")
        assert blank and text.strip(), qualname
        assert text == inspect.cleandoc(text), f"{qualname}: text not cleaned"
        if isinstance(obj, property):
            assert obj.fget is not None, qualname
            name, _, returns = head.partition(": ")
            assert name == qualname.rpartition(".")[2], qualname  # the class's name for it
            annotation = obj.fget.__annotations__.get("return", inspect.Parameter.empty)
            assert (_annotation(annotation) or "") == returns, qualname
            continue
        assert head.startswith(obj.__name__ + "("), qualname
        parsed, returns = _parameters_of_line(head)
        signature = inspect.signature(obj)
        expected = [
            (p.name, p.kind, _annotation(p.annotation), p.default is not inspect.Parameter.empty)
            for p in signature.parameters.values()
        ]
        # *args/**kwargs annotations are not compared (the line keeps them, ast puts them apart)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        expected = [(*e[:2], None, False) if e[1] in variadic else e for e in expected]
        assert expected == parsed, qualname
        assert _annotation(signature.return_annotation) == returns, qualname


def test_literal_defaults_and_constants_by_name() -> None:
    send = str(MPI.Comm.Send.__doc__).partition("\n")[0]
    assert send.startswith("Send(self, buf") and "tag: int = 0" in send
    reduce_line = str(MPI.Intracomm.Reduce.__doc__).partition("\n")[0]
    assert "op: " in reduce_line and "= SUM" in reduce_line and "root: int = 0" in reduce_line


def test_every_docstring_in_mpi4py_layout() -> None:
    """The rule of mpi4py's test_doc, properties included (test_doc sees them from Python
    3.13 on, where a property has a __name__), with the offending names listed."""
    visited = _visited()
    assert len(visited) > 700
    problems = [f"{name}: {why}" for name, obj in visited if (why := _layout_problem(name, obj))]
    assert not problems, "\n".join(problems)
