"""bench/bootstrap.py still runs end to end (lab, HAC process, bare TLS server).

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

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bootstrap.py"
ROW = re.compile(r"^\s+(\d+) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+) \|", re.M)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # TMPDIR: the bench's lab (and every process it starts) lives under tmp_path.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_quick_run_prints_both_levels_and_cleans_up(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--concurrency", "1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"bench: TLSv1\.3 ", out)
    assert "compete" in out  # the shared-CPU caveat is stated
    rows = ROW.findall(out)
    assert [r[0] for r in rows] == ["1", "2"]
    for _, tls, boot, ratio in rows:
        assert float(tls) > 0 and float(boot) > 0
        assert abs(float(ratio) - float(boot) / float(tls)) < 0.01
    assert processes_mentioning(str(tmp_path)) == []  # HAC and TLS server stopped
    assert list(tmp_path.iterdir()) == []  # temp lab removed


def test_tls12_mode_pins_tls12(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--tls12", "--concurrency", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench: TLSv1.2 " in proc.stdout
    assert len(ROW.findall(proc.stdout)) == 1


EAP_ROW = re.compile(
    r"^\s+(\d+) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+) \|", re.M
)


def test_the_independent_client_measures_psk_and_eap_tls(tmp_path: Path) -> None:
    """``--client raw``: the test suite's independent MN (rawmn.py, its
    EAP-TLS peer raweap.py) makes the bare handshakes, the PSK and the
    EAP-TLS bootstraps against a HAC provisioning a separate HA; each
    bootstrap the bench counts had a 200 verified under the PSK or the MSK
    (the bench exits 1 on any error)."""
    proc = _run(tmp_path, "--client", "raw", "--provisioning", "tls", "--concurrency", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tests/integration/rawmn.py, the independent MN" in proc.stdout
    ((n, tls, psk, psk_ratio, eap, eap_ratio),) = EAP_ROW.findall(proc.stdout)
    assert n == "2" and float(tls) > 0 and float(psk) > 0 and float(eap) > 0
    assert abs(float(eap_ratio) - float(eap) / float(tls)) < 0.01
    assert "EAP-TLS" in proc.stdout.split("split HAC + HA")[1]
    assert processes_mentioning(str(tmp_path)) == []
