"""The short forms of the reliability tools, run as real subprocesses the way a user runs them.

`python -m tools.soak` (plain region, then through a broker) and `python -m tools.storm`
(kill -9 of peers and of the broker) exit 0 only when no message was lost, duplicated,
reordered or corrupted, fds and RSS stayed flat, PeerLostError came in time and every slot
was reclaimable; their summaries are part of the failure message. Longer runs are by hand
(README, "Reliability tools").
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.broker import ENV, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(300)]  # timing-bound


def run_tool(*args: str, timeout: float) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_soak_short_plain_and_broker():
    # Ten seconds is still warm-up for memory: a peer's footprint grows to hold a few 16 MiB
    # messages at once (pending sends, a receive buffer), so RSS is held to the most those can
    # take; the flat-RSS check proper is for runs of minutes (issue 10: 5-minute soak).
    out = run_tool(
        "tools.soak", "--seconds", "10", "--via", "both", "--rss-limit-mib", "96", timeout=240
    )
    assert "== soak via region" in out and "== soak via broker" in out
    assert "soak: OK, 0 violations" in out


def test_storm_short():
    # The 100 ms target is for the full storm on a machine with CPUs to spare: here the
    # PeerLostError comes one traffic round after the kill, and on a loaded 2-CPU machine a
    # round takes up to ~80 ms (measured, issue 10). A loss noticed late or never still fails.
    out = run_tool(
        "tools.storm", "--kills", "8", "--seed", "10", "--latency-limit-ms", "500", timeout=240
    )
    assert "storm: OK, 0 violations" in out
    assert "PeerLostError after the kill" in out  # partners were measured, not skipped
