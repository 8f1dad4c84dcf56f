"""bench/scale.py still runs end to end (two labs, two HAC processes, a filled store).

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

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
NUM = r"([\d.]+|nan)"
ROW = re.compile(rf"^(.+?)\s+\|\s+{NUM} \|\s+{NUM} \|\s+([\d.]+|-)$", re.M)


def quick_run(tmp_path: Path, *args: str) -> str:
    """``bench/scale.py --quick ARGS``: its output; it must exit 0."""
    # TMPDIR: the bench's labs (and every process it starts) live under tmp_path.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc.stdout


def figures(out: str) -> dict[str, tuple[str, str, str]]:
    """The table's rows: label -> (empty, N live, ratio)."""
    return {label.strip(): (a, b, r) for label, a, b, r in ROW.findall(out)}


KINDS_LEVELS = [(kind, level) for kind in ("returning", "spread", "new") for level in (1, 32)]


def test_quick_run_prints_every_figure_and_cleans_up(tmp_path: Path) -> None:
    out = quick_run(tmp_path)
    assert "HAC with 10000 live SAs" in out
    assert "compete" in out or "shared by the clients" in out  # the shared-CPU caveat
    rows = figures(out)
    for kind, level in KINDS_LEVELS:
        rate = rows[f"bootstraps/s, {kind} MN, {level} concurrent"]
        assert float(rate[0]) > 0 and float(rate[1]) > 0
        assert abs(float(rate[2]) - float(rate[1]) / float(rate[0])) < 0.01
        cpu = rows[f"HAC CPU ms/bootstrap, {kind} MN, {level} concurrent"]
        assert float(cpu[0]) > 0 and float(cpu[1]) > 0
    first = rows["first bootstrap after HAC start, s"]
    assert float(first[0]) > 0 and float(first[1]) > 0
    assert re.search(r"HAC RSS per live SA .*: -?\d+ bytes", out)
    assert re.search(r"HA RSS per SA: \d+ bytes .*; per binding: \d+ bytes", out)
    bu = re.search(
        r"HA BU -> BA/s .*: (\d+) with 1000 bindings, (\d+) with 10000 bindings, ratio ([\d.]+)",
        out,
    )
    assert bu is not None and int(bu[1]) > 0 and int(bu[2]) > 0
    assert "INVALID" not in out  # every BA checked the way an MN checks it
    assert processes_mentioning(str(tmp_path)) == []  # both HACs stopped
    assert list(tmp_path.iterdir()) == []  # temp labs removed


def test_two_hacs_per_lab_share_the_store_and_both_serve(tmp_path: Path) -> None:
    """``--hacs 2``: each lab runs two HAC processes on its one store, and
    every worker's bootstraps alternate between them -- each HAC then follows
    the other's commits.  Both serve in both labs, and all four stop."""
    out = quick_run(tmp_path, "--hacs", "2")
    assert "2 HAC processes per lab on its one SA store" in out
    rows = figures(out)
    for kind, level in KINDS_LEVELS:
        assert float(rows[f"bootstraps/s, {kind} MN, {level} concurrent"][1]) > 0
    served = dict(re.findall(r"^bootstraps per HAC process, (\w+) lab: (\d+ / \d+)$", out, re.M))
    assert set(served) == {"empty", "full"}, out[-2000:]
    for counts in served.values():
        a, b = (int(x) for x in counts.split(" / "))
        assert a > 0 and b > 0
        assert abs(a - b) <= max(a, b) // 4  # taken in turn: about half each
    assert processes_mentioning(str(tmp_path)) == []  # all four HACs stopped
    assert list(tmp_path.iterdir()) == []


def test_tls_provisioning_runs_the_default_deployment_with_a_filled_ha(tmp_path: Path) -> None:
    """``--provisioning tls``: each lab's HA is a ``mipsec --role ha`` process
    reached over TLS, and the N-live HA's store holds the same SAs as the
    HAC's -- proved by no withdrawal of an SPI unknown to that HA, though
    every spread bootstrap withdraws one of the N.  The HA's CPU is counted
    and shown as a share; every process stops."""
    out = quick_run(tmp_path, "--provisioning", "tls")
    assert "each lab's HA in a process of its own" in out
    rows = figures(out)
    for kind, level in KINDS_LEVELS:
        assert float(rows[f"bootstraps/s, {kind} MN, {level} concurrent"][1]) > 0
        both = rows[f"HAC+HA CPU ms/bootstrap, {kind} MN, {level} concurrent"]
        ha = rows[f"of which HA, {kind} MN, {level} concurrent"]
        for i in (0, 1):
            assert 0 < float(ha[i]) < float(both[i])
    spread = float(rows["bootstraps/s, spread MN, 32 concurrent"][1])
    assert spread > 0  # spread MNs bootstrapped, each withdrawing an SA of the N
    assert "HA of the N-live lab: 0 withdrawals of SPIs unknown there logged" in out
    assert processes_mentioning(str(tmp_path)) == []  # both HACs and both HAs stopped
    assert list(tmp_path.iterdir()) == []
