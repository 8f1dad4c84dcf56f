"""bench/rounds.py still runs end to end (the third-party EAP method installed
into its temp dir, two HAC runs, the echo server).

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

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rounds.py"
ROW = re.compile(r"^\s+(\d+) \|\s+(\d+) / (\d+) \|\s+(-?\d+) \|\s+(-?\d+) \|\s+(\S+)$", re.M)


def test_quick_run_prints_a_row_per_level_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--concurrency", "1,2"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 vs 4 extra ping rounds" in proc.stdout
    rows = ROW.findall(proc.stdout)
    assert [r[0] for r in rows] == ["1", "2"]
    for _, h0, hr, per_hac, _per_echo, _ratio in rows:
        assert int(h0) > 0 and int(hr) > 0
        # The per-round figure is the difference of the two runs over 4 rounds.
        assert abs(int(per_hac) - (int(hr) - int(h0)) / 4) <= 1
    assert processes_mentioning(str(tmp_path)) == []  # HACs and echo server stopped
    assert list(tmp_path.iterdir()) == []  # temp lab and plugin site removed
