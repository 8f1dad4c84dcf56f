"""bench/pull_recovery.py still runs end to end: a lab whose HA lost its
store, its MNs pulled back under the default and under configured [pull]
limits (real HAC and HA processes, real UDP, 200 raw MNs).

Figures are machine-dependent and never asserted; what is: every MN
registered again in both runs, each through one pull that found its SA.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "pull_recovery.py"
ROW = re.compile(
    r"^(defaults|configured): .*?\|\s+(\d+) \|.*?\|\s+(\d+) / (\d+) / (\d+) / (\d+) \|", re.M
)

pytestmark = pytest.mark.timeout(600)  # two labs; the default limits' run takes ~12 s alone


def test_quick_run_pulls_every_mn_back_under_both_limits(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=580,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = {m[0]: m[1:] for m in ROW.findall(proc.stdout)}
    assert set(rows) == {"defaults", "configured"}, proc.stdout
    for registered, pulls, found, _deferred, _limited in rows.values():
        assert registered == "200" and found == "200" and int(pulls) >= 200
    assert "rate=500, burst=1000, max_in_flight=64" in proc.stdout
    assert "time to 100 %: configured / defaults = " in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the labs were removed
