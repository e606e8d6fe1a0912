"""ULFM with a rank that really dies (guest_lib/mpi/ulfm.py): the survivors see it failed,
revoke, agree and shrink, then go on; the rank side is tests/mpi/programs/ulfm_death.py.

Run with ivshmem-run's own region (the dead process's slot stays READY: its holder pid is
gone) and with --broker (the broker marks the slot DEAD), at 3 and 4 ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.mpi.conftest import run_job

pytestmark = pytest.mark.timeout(300)

PROGRAM = str(Path(__file__).with_name("programs") / "ulfm_death.py")
LAUNCHER = [sys.executable, "-m", "guest_lib.mpi.launcher"]
ERR_PROC_FAILED, ERR_REVOKED = 101, 103  # MPICH's values (guest_lib.mpi.exceptions)


@pytest.mark.parametrize(("ranks", "broker"), [(3, False), (4, False), (3, True)])
def test_survivors_detect_revoke_agree_shrink_and_go_on(ranks, broker, tmp_path):
    out = tmp_path / "result"
    extra = ["--broker"] if broker else []
    run_job([*LAUNCHER, "-n", str(ranks), *extra, "--timeout", "120", PROGRAM, str(out)], 150)
    survivors = list(range(ranks - 1))
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in survivors]
    assert not Path(f"{out}.{ranks - 1}").exists()  # the victim wrote nothing
    flags = [0b111 if rank == 0 else 0b110 | rank % 2 for rank in survivors]
    want_flag = flags[0]
    for flag in flags:
        want_flag &= flag
    for result in results:
        rank = result["rank"]
        # the failed collective, and the failure seen within seconds (victim sleeps 0.2 s)
        assert result["allreduce"] == ERR_PROC_FAILED, result
        assert result["failed"] == [ranks - 1] and result["detect_s"] < 5, result
        # revoked by survivor 0: the pending receive, Is_revoked, later calls
        assert result["pending"] == ERR_REVOKED and result["is_revoked"], result
        assert result["barrier"] == result["send"] == ERR_REVOKED, result
        # agreement: an unacknowledged failure first, then the AND of the survivors' flags
        assert result["agree_unacked"] == ERR_PROC_FAILED and result["acked"] == 1, result
        assert result["agree"] == want_flag, result
        # the shrunk communicator: the survivors in order, working
        assert result["shrunk"] == [rank, ranks - 1], result
        assert result["shrunk_sum"] == sum(survivors), result
        assert result["shrunk_total"] == float(sum(r + 1 for r in survivors)), result
        assert result["ring"] == (rank - 1) % (ranks - 1), result
