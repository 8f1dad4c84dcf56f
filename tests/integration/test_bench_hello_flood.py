"""bench/hello_flood.py still runs end to end against a real HA process.

Figures are machine-dependent and never asserted; what the bench shows is:
without ``allowed_clients`` every replayed ClientHello got the HA's server
flight, with it none did, and the HA and the temp lab are gone afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import processes_mentioning

BENCH = Path(__file__).resolve().parents[2] / "bench" / "hello_flood.py"
ROW = re.compile(
    r"^\s*(\(none\)|\[\"127\.0\.0\.1\"\]) \|\s+(\d+) \|\s+(\d+) \|\s+([\d.]+) \|", re.M
)


def test_quick_run_shows_the_list_stops_the_handshakes(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--rate", "200"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = {name: (int(made), int(flights)) for name, made, flights, _ in ROW.findall(proc.stdout)}
    assert set(rows) == {"(none)", '["127.0.0.1"]'}, proc.stdout
    made, flights = rows["(none)"]
    assert made > 0 and flights == made  # each one cost the HA a handshake
    made, flights = rows['["127.0.0.1"]']
    assert made > 0 and flights == 0  # none did
    assert processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_quick_run_against_the_hac_shows_the_per_source_rate(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--rate", "200", "--role", "hac"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = re.findall(r"^\s*(\(none\)|10/s, burst 20) \|\s+(\d+) \|\s+(\d+) \|", proc.stdout, re.M)
    got = {name: (int(made), int(flights)) for name, made, flights in rows}
    assert set(got) == {"(none)", "10/s, burst 20"}, proc.stdout
    made, flights = got["(none)"]
    assert made > 0 and flights == made
    made, flights = got["10/s, burst 20"]
    # 2 s at 10/s after a burst of 20 (a token or so of slack for timing).
    assert made > 100 and 20 <= flights <= 20 + 10 * 3, (made, flights)
    assert processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []
