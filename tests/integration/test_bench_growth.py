"""bench/growth.py still runs end to end (the default lab: HAC and HA processes,
TLS provisioning, SQLite credentials, a widened IPv4 pool).

Only the shape of the output and the clean-up are checked: figures are
machine-dependent and never asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import processes_mentioning

BENCH = Path(__file__).resolve().parents[2] / "bench" / "growth.py"
ROW = re.compile(r"^(.+?)\s+\|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+|-)$", re.M)


def test_quick_run_prints_every_figure_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the lab and its processes live here
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = proc.stdout
    assert "HA in its own process, TLS provisioning" in out
    assert "2500 MNs bootstrapped" in out
    rows = {label.strip(): (float(a), float(b), r) for label, a, b, r in ROW.findall(out)}
    for kind in ("new", "returning"):
        a, b, ratio = rows[f"bootstraps/s, {kind} MNs"]
        assert a > 0 and b > 0 and abs(float(ratio) - b / a) < 0.01
        for who in ("HAC", "HA"):
            assert min(rows[f"{who} CPU ms/bootstrap, {kind} MNs"][:2]) > 0
    assert processes_mentioning(str(tmp_path)) == []  # HAC and HA stopped
    assert list(tmp_path.iterdir()) == []  # temp lab removed
