"""`Group`: an ordered set of processes (world ranks) and MPI's group algebra.

A group is local to the process (no communication): `Incl`/`Excl`/`Range_incl`/
`Range_excl` pick ranks, `Union`/`Intersection`/`Difference` combine two groups in MPI's
order (first group's order, then the second's new members), `Translate_ranks` and `Compare`
relate two groups. Errors are `MPI.Exception`: ERR_RANK for a rank outside the group or a
repeated rank, ERR_ARG for a bad range, ERR_GROUP for an operation on GROUP_NULL.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from guest_lib.mpi import constants, exceptions
from guest_lib.mpi.handles import Handle


class Group(Handle):
    """Process group; `_ranks` are world ranks in group order (None: the null group)."""

    __slots__ = ("_me", "_ranks")

    def __init__(self, ranks: list[int] | Group | None = None, me: int = -1) -> None:
        if isinstance(ranks, Group):  # mpi4py's Group(group): a new handle, same group
            me = int(ranks._me)
            ranks = None if ranks._ranks is None else list(ranks._ranks)
        elif ranks is not None and not isinstance(ranks, list):
            raise TypeError(f"Group: expecting a Group, got {type(ranks).__name__}")
        self._ranks: list[int] | None = ranks
        self._me: int = me

    def _members(self) -> list[int]:
        if self._ranks is None:
            raise exceptions.Exception(exceptions.ERR_GROUP, "null group")
        return self._ranks

    def _new(self, ranks: list[int], other: Group | None = None) -> Group:
        """A group of `ranks` knowing this process (the predefined groups do not)."""
        return Group(ranks, self._me if other is None else max(self._me, other._me))

    def Get_size(self) -> int:
        """Return the number of processes in the group."""
        return len(self._members())

    def Get_rank(self) -> int:
        """This process's rank in the group, UNDEFINED if it is not a member."""
        ranks = self._members()
        return ranks.index(self._me) if self._me in ranks else constants.UNDEFINED

    @property
    def size(self) -> int:
        """Number of processes in the group (Get_size)."""
        return self.Get_size()

    @property
    def rank(self) -> int:
        """Rank of this process in the group (Get_rank)."""
        return self.Get_rank()

    def _checked(self, ranks: Sequence[int]) -> list[int]:
        """Return `ranks` as ints, each a rank of this group, none twice (ERR_RANK otherwise)."""
        size = len(self._members())
        out = [int(r) for r in ranks]
        for r in out:
            if not 0 <= r < size:
                raise exceptions.Exception(exceptions.ERR_RANK, f"rank {r} of {size}")
        if len(set(out)) != len(out):
            raise exceptions.Exception(exceptions.ERR_RANK, f"repeated rank in {out}")
        return out

    def Incl(self, ranks: Sequence[int]) -> Group:
        """The group of this group's `ranks`, in that order."""
        members = self._members()
        return self._new([members[r] for r in self._checked(ranks)])

    def Excl(self, ranks: Sequence[int]) -> Group:
        """This group without `ranks` (order kept)."""
        drop = set(self._checked(ranks))
        return self._new([w for r, w in enumerate(self._members()) if r not in drop])

    def _ranges(self, ranges: Sequence[Sequence[int]]) -> list[int]:
        """Return the ranks the (first, last, stride) triplets name, in order.

        MPI.Exception(ERR_ARG) for a zero stride or a range that steps away from `last`.
        """
        out: list[int] = []
        for triplet in ranges:
            first, last, stride = (int(v) for v in triplet)
            if stride == 0 or (last - first) * stride < 0:
                raise exceptions.Exception(exceptions.ERR_ARG, f"range ({first}, {last}, {stride})")
            out.extend(range(first, last + (1 if stride > 0 else -1), stride))
        return out

    def Range_incl(self, ranks: Sequence[Sequence[int]]) -> Group:
        """Incl of the ranks named by (first, last, stride) triplets."""
        return self.Incl(self._ranges(ranks))

    def Range_excl(self, ranks: Sequence[Sequence[int]]) -> Group:
        """Excl of the ranks named by (first, last, stride) triplets."""
        return self.Excl(self._ranges(ranks))

    def Union(self, other: Group) -> Group:
        """This group's members, then `other`'s that are not in it (in `other`'s order).
        Callable as `MPI.Group.Union(group1, group2)` too."""
        first = self._members()
        seen = set(first)
        return self._new(first + [w for w in other._members() if w not in seen], other)

    def Intersection(self, other: Group) -> Group:
        """This group's members that are in `other` too (this group's order)."""
        keep = set(other._members())
        return self._new([w for w in self._members() if w in keep], other)

    def Difference(self, other: Group) -> Group:
        """This group's members that are not in `other` (this group's order)."""
        drop = set(other._members())
        return self._new([w for w in self._members() if w not in drop], other)

    def Compare(self, other: Group) -> int:
        """IDENT (same members, same order), SIMILAR (same members) or UNEQUAL."""
        mine, theirs = self._members(), other._members()
        if mine == theirs:
            return constants.IDENT
        if set(mine) == set(theirs) and len(mine) == len(theirs):
            return constants.SIMILAR
        return constants.UNEQUAL

    @classmethod
    def Create_from_session_pset(cls, session: Any, pset_name: str) -> Group:
        """The group of a session's process set (see `session`)."""
        group: Group = session.Create_group(pset_name)
        return group

    def Dup(self) -> Group:
        """A new handle to the same group."""
        return self._new(list(self._members()))

    def Translate_ranks(self, ranks: Sequence[int] | None = None, group: Group | None = None
                        ) -> list[int]:  # fmt: skip
        """Return the ranks in `group` of this group's `ranks` (all of them if None).

        UNDEFINED where absent, PROC_NULL for PROC_NULL; `group` None: the ranks themselves.
        MPI.Exception(ERR_RANK) for a rank outside this group.
        """
        members = self._members()
        if ranks is None:
            ranks = range(len(members))
        ranks = [int(r) for r in ranks]
        for r in ranks:
            if not 0 <= r < len(members) and r != constants.PROC_NULL:
                raise exceptions.Exception(exceptions.ERR_RANK, f"rank {r} of {len(members)}")
        if group is None:
            return ranks
        where = {w: i for i, w in enumerate(group._members())}
        return [
            constants.PROC_NULL if r == constants.PROC_NULL
            else where.get(members[r], constants.UNDEFINED)
            for r in ranks
        ]  # fmt: skip

    def Free(self) -> None:
        """Release the handle: it becomes the null group (the predefined ones stay)."""
        if self is not _EMPTY and self is not _NULL:
            self._ranks = None

    def __bool__(self) -> bool:
        return self._ranks is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Group) and self._ranks == other._ranks

    def _key(self) -> Hashable:
        return None if self._ranks is None else tuple(self._ranks)

    def __reduce__(self) -> Any:
        """Pickle GROUP_NULL and GROUP_EMPTY (and handles to them); refuse other groups.

        Other groups raise ValueError, as in mpi4py (a group means nothing in another process).
        """
        if self is _NULL or self is _EMPTY:
            return (_predefined, ("GROUP_NULL" if self is _NULL else "GROUP_EMPTY",))
        if not self._ranks:  # a new handle on one of them
            return (type(self), (_NULL if self._ranks is None else _EMPTY,))
        raise ValueError("cannot serialize a Group")

    def __repr__(self) -> str:
        return "<Group null>" if self._ranks is None else f"<Group {self._ranks}>"


def _predefined(name: str) -> Group:
    return _EMPTY if name == "GROUP_EMPTY" else _NULL


_EMPTY = Group([], -1)
_NULL = Group(None, -1)
GROUP_EMPTY = _EMPTY
GROUP_NULL = _NULL
