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
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from guest_lib.mpi import datatypes, exceptions
from guest_lib.mpi.handles import Handle, Same, argument


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


MAX_USER_OPS = 32  # live user ops at once (mpi4py's limit: its table of C callbacks)
_user_ops: set[object] = set()  # the tokens of the live user ops


class Op(Handle):
    """One reduction operation; commutative unless created otherwise.

    A handle: `Op(op)` is a new handle on the same operation, equal to it; `Op()` is OP_NULL.
    """

    name: str
    _pyfunc: Callable[[Any, Any], Any] | None
    _arrayfunc: Callable[[np.ndarray, np.ndarray], None] | None
    _commute: bool
    _user: Callable[..., Any] | None
    _ufunc: Any
    _token: object  # the operation's identity, shared by every handle on it

    def __init__(self, op: Op | None = None) -> None:
        """Op(op): a new handle on `op`; Op(): a null one; TypeError for anything else."""
        self.__dict__.update(vars(argument(op, Op) or OP_NULL))

    @classmethod
    def _make(
        cls,
        name: str,
        pyfunc: Callable[[Any, Any], Any] | None,
        arrayfunc: Callable[[np.ndarray, np.ndarray], None] | None,
        commute: bool = True,
        user: Callable[..., Any] | None = None,
    ) -> Op:
        op = cls.__new__(cls)
        op.name, op._pyfunc, op._arrayfunc = name, pyfunc, arrayfunc
        op._commute, op._user, op._token = commute, user, object()
        op._ufunc = getattr(arrayfunc, "ufunc", None)
        return op

    @classmethod
    def Create(cls, function: Callable[..., Any], commute: bool = False) -> Op:
        """Create a user op from `function(inbuf, inoutbuf, datatype)`.

        For buffers the function updates inoutbuf (numpy arrays of the datatype's elements); for
        objects `function(x, y, None)` returns the result. RuntimeError if MAX_USER_OPS user ops are
        live already (as mpi4py).
        """
        if len(_user_ops) >= MAX_USER_OPS:
            raise RuntimeError(f"cannot create more than {MAX_USER_OPS} user-defined ops")
        op = cls._make(getattr(function, "__name__", "user"), None, None, bool(commute), function)
        _user_ops.add(op._token)
        return op

    def Free(self) -> None:
        """Release a user op; this handle becomes OP_NULL.

        MPI.Exception(ERR_OP) for a predefined op or OP_NULL (which stay as they are).
        """
        if self._user is None:
            raise exceptions.Exception(exceptions.ERR_OP, f"Op.Free on predefined {self!r}")
        _user_ops.discard(self._token)
        self.__dict__.update(vars(OP_NULL))

    def Is_commutative(self) -> bool:
        """Return True iff the op is commutative (user ops: as Create was told)."""
        return self._commute

    @property
    def is_commutative(self) -> bool:
        """True iff the op is commutative (Is_commutative)."""
        return self._commute

    @property
    def is_predefined(self) -> bool:
        """True for a predefined op, False for a user op."""
        return self._user is None

    @property
    def ufunc(self) -> Any:
        """Numpy ufunc computing `left op right` elementwise, or None.

        None for a user op, a logical or location op, REPLACE, NO_OP.
        """
        return self._ufunc if self._user is None else None

    def __call__(self, x: Any, y: Any) -> Any:
        """Combine two objects: `x op y` (x from the lower rank). ValueError for OP_NULL."""
        if self._user is not None:
            return self._user(x, y, None)
        if self._pyfunc is None:
            raise ValueError(f"cannot call {self.name}")
        return self._pyfunc(x, y)

    def Reduce_local(self, inbuf: Any, inoutbuf: Any) -> None:
        """Reduce locally: inoutbuf = inbuf op inoutbuf, elementwise (message specs).

        ValueError if their counts or datatypes differ; MPI.Exception(ERR_OP) for OP_NULL or an op
        that takes no buffers.
        """
        from guest_lib.mpi import buffers

        source = buffers.parse(inbuf)
        target = buffers.parse(inoutbuf, writable=True, deferred=True)
        if source.count != target.count or source.datatype.base != target.datatype.base:
            raise ValueError(
                f"Reduce_local: {source.count} x {source.datatype.name} into "
                f"{target.count} x {target.datatype.name}"
            )
        self.reduce_into(target.array(), source.array(), target.datatype)
        if target.unpack is not None:
            target.unpack()

    def reduce_into(self, acc: np.ndarray, operand: np.ndarray, datatype: Any = None) -> None:
        """Fold in place: acc[:] = operand op acc, elementwise (operand from the lower rank)."""
        if self._user is not None:
            if datatype is None:  # the caller did not say: the array's own predefined type
                datatype = _datatype_of(acc.dtype)
            self._user(operand, acc, datatype)
            return
        if self._arrayfunc is None:
            raise exceptions.Exception(exceptions.ERR_OP, f"{self.name} takes no buffers")
        self._arrayfunc(acc, operand)

    def combine_to(self, out: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
        """Fold into `out`: out[:] = left op right, in one pass where the op allows.

        `out` may alias neither operand.
        """
        if self._user is None and self._arrayfunc is not None and self._ufunc is not None:
            self._ufunc(left, right, out=out)
            return
        out[...] = right
        self.reduce_into(out, left)

    def __bool__(self) -> bool:
        return self._token is not OP_NULL._token

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Op):
            return NotImplemented
        return self._token is other._token

    def _key(self) -> Hashable:
        return Same(self._token)

    def __repr__(self) -> str:
        return f"<Op {self.name}>"

    @classmethod
    def fromhandle(cls, handle: int) -> Op:
        """Return a new handle on the op numbered `handle` (see handles.Handle).

        A user op's reduces as the op but does not pickle (as mpi4py's).
        """
        op = super().fromhandle(handle)
        vars(op)["_from_number"] = op._user is not None
        return op

    def __reduce__(self) -> Any:
        """Pickle a predefined op by name, a user op by its function.

        A predefined op unpickles as itself (a copy of one as an equal new handle of this class); a
        user op as a new user op of the same function (which must be picklable); ValueError for a
        user op made by fromhandle/fromint/f2py (as mpi4py's).
        """
        if vars(self).get("_from_number"):
            raise ValueError("cannot pickle a user op made from its integer handle")
        if self._user is not None:
            return (Op.Create, (self._user, self._commute))
        if self is _OPS[self.name]:
            return (_predefined, (self.name,))
        return (type(self), (_OPS[self.name],))


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


OP_NULL = Op._make("OP_NULL", None, None)
MAX = Op._make("MAX", max, _ufunc(np.maximum))
MIN = Op._make("MIN", min, _ufunc(np.minimum))
SUM = Op._make("SUM", operator.add, _ufunc(np.add))
PROD = Op._make("PROD", operator.mul, _ufunc(np.multiply))
LAND = Op._make("LAND", lambda x, y: bool(x and y), _logical(np.logical_and))
BAND = Op._make("BAND", operator.and_, _ufunc(np.bitwise_and))
LOR = Op._make("LOR", lambda x, y: bool(x or y), _logical(np.logical_or))
BOR = Op._make("BOR", operator.or_, _ufunc(np.bitwise_or))
LXOR = Op._make("LXOR", lambda x, y: bool(x) != bool(y), _logical(np.logical_xor))
BXOR = Op._make("BXOR", operator.xor, _ufunc(np.bitwise_xor))
MAXLOC = Op._make("MAXLOC", _loc(operator.gt), _loc_arrays(np.greater))
MINLOC = Op._make("MINLOC", _loc(operator.lt), _loc_arrays(np.less))
REPLACE = Op._make("REPLACE", lambda x, y: y, _replace)
NO_OP = Op._make("NO_OP", lambda x, y: x, lambda acc, operand: None)
_OPS = {op.name: op for op in (OP_NULL, MAX, MIN, SUM, PROD, LAND, BAND, LOR, BOR, LXOR, BXOR,
                               MAXLOC, MINLOC, REPLACE, NO_OP)}  # fmt: skip
