"""The MPI face's collectives through the region's collective area (guest_lib/mpi/area.py),
in real jobs (`ivshmem-run`) of 1 to 4 ranks; the rank side is tests/mpi/programs/area_rank.py.

Every check there fails when a collective takes the message path instead of the area (the
area's `completed` counter, the slot's claim word), so these tests also prove that the area
path is taken.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi.conftest import ROOT, job_env, run_job

pytestmark = pytest.mark.timeout(300)

PROGRAM = str(Path(__file__).with_name("programs") / "area_rank.py")
LAUNCHER = [sys.executable, "-m", "guest_lib.mpi.launcher"]


def _job(ranks: int, mode: str) -> str:
    done = run_job([*LAUNCHER, "-n", str(ranks), "--timeout", "250", PROGRAM, mode], 280)
    return done.stdout


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_every_collective_in_the_area(ranks):
    """Every collective, blocking and nonblocking, of every size and buffer form, right
    against numpy, each run in the area (counted), on COMM_WORLD and on a Dup; one rank has
    no area (nothing to share) and the same checks hold there."""
    out = _job(ranks, "all")
    counts = [line.split()[2] for line in out.splitlines() if line.startswith("AREA OK")]
    assert len(counts) == ranks and len(set(counts)) == 1, out[-3000:]


def test_slot_reused_by_200_communicators():
    """200 Dup / collectives / Free: one slot, released after each Free (claim word 0),
    its generation growing."""
    out = _job(2, "loop")
    assert out.count("LOOP OK") == 2, out[-3000:]


def test_full_area_falls_back_to_messages():
    """Communicators beyond the area's slots run on messages, correctly; freed slots are
    taken again."""
    out = _job(3, "exhaust")
    assert out.count("EXHAUST OK") == 3, out[-3000:]


def _killed(mode: str, error: str) -> str:
    """Run area_rank.py `mode` on 3 ranks (the last one SIGKILLs itself): both others print
    a LOST line within 1.5 s naming `error`; the job's stderr."""
    done = subprocess.run(
        [*LAUNCHER, "-n", "3", "--timeout", "60", PROGRAM, mode],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lost = [line for line in done.stdout.splitlines() if line.startswith("LOST")]
    assert len(lost) == 2, done.stdout[-3000:] + done.stderr[-3000:]
    for line in lost:
        assert float(line.split()[1]) < 1.5 and error in line, line
    return done.stderr


def test_killed_member_gives_an_error_not_a_hang():
    """A member SIGKILLed while the others wait for it in the area: they raise the
    MPI.Exception of a lost peer (ERR_PROC_FAILED naming PeerLostError) within seconds."""
    _killed("kill", "PeerLostError")


@pytest.mark.parametrize("mode", ["ikill", "igkill"])
def test_killed_member_fails_a_started_collective(mode):
    """The same while the others Wait for an Iallreduce (ikill), or for an Igather then an
    Ialltoall (igkill: the lanes of block collectives): a lane's request, polled: its Wait
    raises MPI.Exception(ERR_OTHER) within seconds on both, nothing else is reported."""
    stderr = _killed(mode, "MPI_ERR_OTHER")
    assert "Traceback" not in stderr, stderr[-3000:]


def test_binding_tag_outside_every_other_internal_tag():
    """The area's binding broadcast uses a tag no collective instance, nonblocking
    collective, Create_group or Agree/Shrink uses: an instance a member abandons (an
    argument error, checked after the binding) must never fail or drop another member's
    binding (seen: a 4-rank job's late member raised ERR_OTHER for its own ValueError)."""
    from guest_lib.mpi import area, collectives, comm, constants, ulfm, wire

    taken = [
        range(0, wire.COLL_TAGS),
        range(comm.T_GROUP, comm.T_GROUP * 2),
        range(collectives.T_NONBLOCKING, collectives.T_NONBLOCKING + collectives.NONBLOCKING_TAGS),
        range(ulfm.T_FT, ulfm.T_FT + ulfm.FT_BLOCKS * ulfm.FT_SPAN),
    ]
    assert area.T_AREA <= constants.TAG_UB
    assert not any(area.T_AREA in used for used in taken)
