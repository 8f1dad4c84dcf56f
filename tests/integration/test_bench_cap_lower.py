"""bench/cap_lower.py still runs end to end against real HAC and HA processes.

Figures are machine-dependent and never asserted; what the bench shows is:
the reload closed every held connection over the new cap and no other, and
the processes and the temp lab are gone afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import processes_mentioning

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cap_lower.py"


def test_quick_run_closes_exactly_the_connections_over_the_cap(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--cap", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    m = re.search(r"held connections closed by the HAC: (\d+) of 2000 \(cap 50\)", proc.stdout)
    assert m is not None, proc.stdout
    # 1,950 over the cap; the probe's connections, arriving at the cap, each
    # evict one more of the held ones (the longest waiting).
    assert int(m.group(1)) >= 1950, proc.stdout
    # 1,950 of the held ones, and a probe connection if one was open then.
    over = re.search(
        r"max_connections 2100 -> 50 from now on \((\d+) connection\(s\) over", proc.stdout
    )
    assert over is not None and 1950 <= int(over.group(1)) <= 1951, proc.stdout
    assert re.search(r"ratio [\d.]+x; 0 probe handshakes failed", proc.stdout), proc.stdout
    assert processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []
