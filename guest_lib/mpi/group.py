"""`Group`: an ordered set of processes (world ranks), enough for Comm.Create and ranks."""

from __future__ import annotations

from collections.abc import Sequence

from guest_lib.mpi import constants, exceptions


class Group:
    """Process group; `_ranks` are world ranks in group order."""

    def __init__(self, ranks: list[int], me: int) -> None:
        self._ranks = ranks
        self._me = me

    def Get_size(self) -> int:
        return len(self._ranks)

    def Get_rank(self) -> int:
        """This process's rank in the group, UNDEFINED if it is not a member."""
        return self._ranks.index(self._me) if self._me in self._ranks else constants.UNDEFINED

    @property
    def size(self) -> int:
        return self.Get_size()

    @property
    def rank(self) -> int:
        return self.Get_rank()

    def Incl(self, ranks: Sequence[int]) -> Group:
        return Group([self._ranks[r] for r in ranks], self._me)

    def Excl(self, ranks: Sequence[int]) -> Group:
        drop = set(ranks)
        return Group([w for r, w in enumerate(self._ranks) if r not in drop], self._me)

    def Translate_ranks(self, ranks: Sequence[int] | None = None, group: Group | None = None
                        ) -> list[int]:  # fmt: skip
        """Ranks of this group's `ranks` in `group` (UNDEFINED where absent, PROC_NULL for
        PROC_NULL). MPI.Exception(ERR_RANK) for a rank outside this group."""
        if ranks is None:
            ranks = range(len(self._ranks))
        ranks = [int(r) for r in ranks]
        for r in ranks:
            if not 0 <= r < len(self._ranks) and r != constants.PROC_NULL:
                raise exceptions.Exception(exceptions.ERR_RANK, f"rank {r} of {len(self._ranks)}")
        if group is None:
            return ranks
        where = {w: i for i, w in enumerate(group._ranks)}
        return [
            constants.PROC_NULL if r == constants.PROC_NULL
            else where.get(self._ranks[r], constants.UNDEFINED)
            for r in ranks
        ]  # fmt: skip

    def Free(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Group) and self._ranks == other._ranks

    def __hash__(self) -> int:
        return hash(tuple(self._ranks))
