"""Signature lines at the head of the MPI face's docstrings, as mpi4py's docstrings have them.

mpi4py's extension module is compiled with Cython's `embedsignature` directive: the docstring
of every function and method starts with its signature line, then a blank line, then the text
(`Send(self, buf: BufSpec, dest: int, tag: int = 0) -> None`, `Get_parent(cls) -> Intercomm`),
and a property's with `name: type` (`rank: int`). Tools written for mpi4py read that layout:
mpi4py's own test_doc drops the first line of each docstring and checks the rest.

`embed(module)` gives this package's functions, methods, class and static methods and
properties reachable from `module` (the MPI namespace, and the classes in it, as test_doc
walks them) the same first line, computed from each function's code object, defaults and
annotations, never typed by hand, so it cannot drift from the code. It also cleans every
docstring's indentation (`inspect.cleandoc`, what Python 3.13 does when it compiles a
docstring), classes' included. It runs once, at the end of the MPI module's import, on every
rank: it reads code objects and formats strings only (no `inspect.signature`, no evaluation
of annotations); about 2 ms for the ~900 objects of the namespace.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

_CO_VARARGS = inspect.CO_VARARGS
_CO_VARKEYWORDS = inspect.CO_VARKEYWORDS
_LITERALS = (type(None), bool, int, float, complex, str, bytes)
_NO_DEFAULT = object()
_OWN_PACKAGE = "guest_lib."


def embed(module: types.ModuleType) -> int:
    """Prefix the docstrings reachable from `module` with their signature line.

    Visits the functions and classes of `module`'s namespace that this package defines, and
    the methods, class methods, static methods, properties and nested classes of those classes
    (each object once). A function's or method's docstring becomes `name(params) -> ret`, a
    blank line, then its cleaned text; a property's `name: type` (the name its class gives
    it: a property made by a factory has a getter of another name), a blank line, the text;
    a class's docstring is cleaned only (classes carry no signature line, as in mpi4py). An
    object without a docstring, or whose docstring already starts with its signature line,
    is left as it is. Returns the number of docstrings rewritten; raises nothing for objects
    of other kinds (they are skipped).
    """
    names = {id(value): name for name, value in vars(module).items() if not name.startswith("_")}
    seen: set[int] = set()
    return _embed_namespace(vars(module), names, seen)


def _embed_namespace(namespace: dict[str, Any], names: dict[int, str], seen: set[int]) -> int:
    done = 0
    for key, value in list(namespace.items()):
        if id(value) in seen or not _ours(value):
            continue
        seen.add(id(value))
        if isinstance(value, type):
            if value.__doc__:
                value.__doc__ = inspect.cleandoc(value.__doc__)
            done += _embed_namespace(dict(vars(value)), names, seen)
        elif isinstance(value, property):
            if value.fget is not None and value.__doc__:  # named as the class names it
                returns = value.fget.__annotations__.get("return")
                head = key if returns is None else f"{key}: {_annotation(returns)}"
                done += _prefix(value, head)
        elif isinstance(value, (classmethod, staticmethod)):
            function = value.__func__
            if isinstance(function, types.FunctionType) and function.__doc__:
                done += _prefix(function, _signature(function, names))
                value.__doc__ = function.__doc__  # the descriptor keeps its own copy (3.10+)
        elif isinstance(value, types.FunctionType) and value.__doc__:
            done += _prefix(value, _signature(value, names))
    return done


def _ours(value: Any) -> bool:
    """True for a function, class, property or class/static method this package defines."""
    if isinstance(value, property):
        value = value.fget
    elif isinstance(value, (classmethod, staticmethod)):
        value = value.__func__
    if not isinstance(value, (type, types.FunctionType)):
        return False
    return str(getattr(value, "__module__", "")).startswith(_OWN_PACKAGE)


def _prefix(owner: Any, head: str) -> int:
    """Set `owner.__doc__` to `head`, a blank line and the cleaned text; 1 if it changed."""
    doc = owner.__doc__
    if doc.partition("\n")[0] == head:
        return 0
    owner.__doc__ = f"{head}\n\n{inspect.cleandoc(doc)}"
    return 1


def _signature(function: types.FunctionType, names: dict[int, str]) -> str:
    """`name(params) -> ret` of `function` (of the function it wraps, for a wrapper)."""
    name = function.__name__
    function = inspect.unwrap(function)  # a functools.wraps wrapper takes what it wraps
    code = function.__code__
    annotations = function.__annotations__
    positional = code.co_argcount
    keyword_only = code.co_kwonlyargcount
    variables = code.co_varnames
    defaults = function.__defaults__ or ()
    keyword_defaults = function.__kwdefaults__ or {}
    first_default = positional - len(defaults)
    params = []
    for index in range(positional):
        default = defaults[index - first_default] if index >= first_default else _NO_DEFAULT
        params.append(_parameter(variables[index], annotations, default, names))
        if index + 1 == code.co_posonlyargcount:
            params.append("/")
    extra = positional + keyword_only
    if code.co_flags & _CO_VARARGS:
        params.append("*" + _parameter(variables[extra], annotations, _NO_DEFAULT, names))
        extra += 1
    elif keyword_only:
        params.append("*")
    for variable in variables[positional : positional + keyword_only]:
        default = keyword_defaults.get(variable, _NO_DEFAULT)
        params.append(_parameter(variable, annotations, default, names))
    if code.co_flags & _CO_VARKEYWORDS:
        params.append("**" + _parameter(variables[extra], annotations, _NO_DEFAULT, names))
    head = f"{name}({', '.join(params)})"
    if "return" in annotations:
        head += f" -> {_annotation(annotations['return'])}"
    return head


def _parameter(name: str, annotations: dict[str, Any], default: Any, names: dict[int, str]) -> str:
    """One parameter as `def` spells it: `name`, `name: type`, `name=d`, `name: type = d`."""
    if default is _NO_DEFAULT:
        return name if name not in annotations else f"{name}: {_annotation(annotations[name])}"
    if type(default) in _LITERALS or (
        type(default) is tuple and all(type(item) in _LITERALS for item in default)
    ):
        text = repr(default)
    else:  # an MPI constant by its name in the namespace (`op: Op = SUM`); else elided
        text = names.get(id(default), "...")
    if name not in annotations:
        return f"{name}={text}"
    return f"{name}: {_annotation(annotations[name])} = {text}"


def _annotation(annotation: Any) -> str:
    """An annotation as written: the string itself under `from __future__ import annotations`."""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")
