"""bench/tunnel.py --quick --json: the figures' contract (issue 11 item 7).

The values themselves depend on the machine and its load: no threshold here
(bench/ prints figures; tests never assert wall-clock speed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from labfix import needs_net_admin

pytestmark = [pytest.mark.system, pytest.mark.slow, needs_net_admin]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "tunnel.py"


def test_quick_json_run_prints_the_five_figures() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(figures) == {
        "mipsec_mbit",
        "openvpn_cbc_mbit",
        "openvpn_gcm_mbit",
        "ratio_cbc",
        "ratio_gcm",
    }
    assert all(figures[k] > 0 for k in ("mipsec_mbit", "openvpn_cbc_mbit", "openvpn_gcm_mbit"))
    assert figures["ratio_cbc"] == pytest.approx(
        figures["mipsec_mbit"] / figures["openvpn_cbc_mbit"], rel=0.01
    )
