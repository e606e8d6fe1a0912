"""Reduction operations: `Op` objects applying to Python objects and to numpy buffers.

`op(x, y)` combines two Python objects (as mpi4py's `MPI.SUM(x, y)`); `op.reduce_into(acc,
operand)` combines numpy arrays in place, `acc = acc op operand`, reading `operand` where it
lies (a zero-copy view of shared memory). MAXLOC/MINLOC take (value, index) pairs for
objects and the aligned pair records of `datatypes` (fields "v", "i") for buffers; ties go
to the smaller index. `Op.Create(function, commute)` wraps `function(inbuf, inoutbuf,
datatype)` as in mpi4py; for objects it is called as `function(x, y)`.

Reductions here are applied in rank order, so a non-commutative user op gives MPI's result.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from guest_lib.mpi import datatypes, exceptions


def _loc(better: Callable[[Any, Any], bool]) -> Callable[[Any, Any], Any]:
    def combine(x: Any, y: Any) -> Any:
        (xv, xi), (yv, yi) = x, y
        if better(yv, xv) or (yv == xv and yi < xi):
            return y
        return x

    return combine


def _loc_arrays(better: Any) -> Callable[[np.ndarray, np.ndarray], None]:
    def apply(acc: np.ndarray, operand: np.ndarray) -> None:
        av, ai, ov, oi = acc["v"], acc["i"], operand["v"], operand["i"]
        take = better(ov, av) | ((ov == av) & (oi < ai))
        acc[take] = operand[take]

    return apply


class Op:
    """One reduction operation. Commutative unless created otherwise."""

    def __init__(
        self,
        name: str,
        pyfunc: Callable[[Any, Any], Any] | None,
        arrayfunc: Callable[[np.ndarray, np.ndarray], None] | None,
        commute: bool = True,
        user: Callable[..., Any] | None = None,
    ) -> None:
        self.name = name
        self._pyfunc = pyfunc
        self._arrayfunc = arrayfunc
        self._commute = commute
        self._user = user
        self._ufunc = getattr(arrayfunc, "ufunc", None)

    @classmethod
    def Create(cls, function: Callable[..., Any], commute: bool = False) -> Op:
        """A user op; `function(inbuf, inoutbuf, datatype)` updates inoutbuf for buffers."""
        return cls(getattr(function, "__name__", "user"), None, None, commute, function)

    def Free(self) -> None:
        pass

    def Is_commutative(self) -> bool:
        return self._commute

    @property
    def is_commutative(self) -> bool:
        return self._commute

    @property
    def is_predefined(self) -> bool:
        return self._user is None

    @property
    def ufunc(self) -> Any:
        """The numpy ufunc computing `left op right` elementwise, or None (a user op, a
        logical or location op, REPLACE, NO_OP)."""
        return self._ufunc if self._user is None else None

    def __call__(self, x: Any, y: Any) -> Any:
        """Combine two objects: `x op y` (x from the lower rank)."""
        if self._user is not None:
            return self._user(x, y)
        if self._pyfunc is None:
            raise exceptions.Exception(exceptions.ERR_OP, f"{self.name} has no object form")
        return self._pyfunc(x, y)

    def reduce_into(self, acc: np.ndarray, operand: np.ndarray, datatype: Any = None) -> None:
        """acc[:] = operand op acc, elementwise (operand from the lower rank), in place."""
        if self._user is not None:
            if datatype is None:  # the caller did not say: the array's own predefined type
                datatype = _datatype_of(acc.dtype)
            self._user(operand, acc, datatype)
            return
        if self._arrayfunc is None:
            raise exceptions.Exception(exceptions.ERR_OP, f"{self.name} takes no buffers")
        self._arrayfunc(acc, operand)

    def combine_to(self, out: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
        """out[:] = left op right in one pass where the op allows (`out` may alias neither)."""
        if self._user is None and self._arrayfunc is not None and self._ufunc is not None:
            self._ufunc(left, right, out=out)
            return
        out[...] = right
        self.reduce_into(out, left)

    def __repr__(self) -> str:
        return f"<Op {self.name}>"

    def __reduce__(self) -> Any:
        return (_predefined, (self.name,)) if self._user is None else object.__reduce__(self)


def _datatype_of(dtype: np.dtype) -> Any:
    try:
        return datatypes.from_dtype(dtype)
    except KeyError:
        return None


def _ufunc(ufunc: Any) -> Callable[[np.ndarray, np.ndarray], None]:
    def apply(acc: np.ndarray, operand: np.ndarray) -> None:
        ufunc(operand, acc, out=acc)

    apply.ufunc = ufunc  # type: ignore[attr-defined]
    return apply


def _logical(ufunc: Any) -> Callable[[np.ndarray, np.ndarray], None]:
    def apply(acc: np.ndarray, operand: np.ndarray) -> None:
        acc[...] = ufunc(operand, acc)

    return apply


def _replace(acc: np.ndarray, operand: np.ndarray) -> None:
    pass  # the higher rank's value (acc) wins


def _predefined(name: str) -> Op:
    return _OPS[name]


OP_NULL = Op("OP_NULL", None, None)
MAX = Op("MAX", max, _ufunc(np.maximum))
MIN = Op("MIN", min, _ufunc(np.minimum))
SUM = Op("SUM", operator.add, _ufunc(np.add))
PROD = Op("PROD", operator.mul, _ufunc(np.multiply))
LAND = Op("LAND", lambda x, y: bool(x and y), _logical(np.logical_and))
BAND = Op("BAND", operator.and_, _ufunc(np.bitwise_and))
LOR = Op("LOR", lambda x, y: bool(x or y), _logical(np.logical_or))
BOR = Op("BOR", operator.or_, _ufunc(np.bitwise_or))
LXOR = Op("LXOR", lambda x, y: bool(x) != bool(y), _logical(np.logical_xor))
BXOR = Op("BXOR", operator.xor, _ufunc(np.bitwise_xor))
MAXLOC = Op("MAXLOC", _loc(operator.gt), _loc_arrays(np.greater))
MINLOC = Op("MINLOC", _loc(operator.lt), _loc_arrays(np.less))
REPLACE = Op("REPLACE", lambda x, y: y, _replace)
NO_OP = Op("NO_OP", lambda x, y: x, lambda acc, operand: None)
_OPS = {op.name: op for op in (OP_NULL, MAX, MIN, SUM, PROD, LAND, BAND, LOR, BOR, LXOR, BXOR,
                               MAXLOC, MINLOC, REPLACE, NO_OP)}  # fmt: skip
