"""Long-running MNs (real ``mipsec --role mn`` daemons) while their HA and
HAC are SIGKILLed and started again: every MN ends registered, with exactly
one SA that the HAC calls live and the HA holds, and nothing owed.

What it exercises together: the MN's backoff after failed bootstraps and
registrations (core/mn_retry.py), the HAC's 504 and take-back when its HA
is down, both roles' restart on the files a kill left, and the superseding
of each MN's older SA once a new one is delivered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from conftest import LAUNCHER, Lab, edit_toml
from test_crash_points import HacProcess, held_by_ha, live_on_hac, unconfirmed, wait_for
from test_ha_restart_replay import HaProcess

MNS = 6


def _mn_config(lab: Lab, i: int) -> Path:
    """The lab's MN configuration for MN ``i`` (its own identity and key)."""
    psk = bytes([i + 1]) * 32
    with (lab.dir / "credentials.toml").open("a") as f:
        f.write(f'\n[[mn]]\nmn_id = "chaos{i}@mipsec.test"\npsk_hex = "{psk.hex()}"\n')
    text = Path(lab.info["mn"]["config"]).read_text()
    text = text.replace('mn_id = "demo@mipsec.test"', f'mn_id = "chaos{i}@mipsec.test"', 1)
    text = text.replace('psk_file = "mn.psk"', f'psk_hex = "{psk.hex()}"', 1)
    assert f"chaos{i}@" in text and psk.hex() in text, text
    text = text.replace(
        "exchange_timeout = 120", "exchange_timeout = 120\nretry_min = 1\nretry_max = 3", 1
    )
    text = text.replace("lifetime = 600", "lifetime = 8", 1)  # the binding's, refreshed at 80 %
    text = text.replace("[sa]\n", "[sa]\nmin_lifetime = 5\n", 1)  # its 10-s SAs are meant
    assert "min_lifetime = 5" in text
    path = lab.dir / f"mn-chaos{i}.toml"
    path.write_text(text)
    return path


def test_mn_daemons_converge_after_their_ha_and_hac_are_killed(lab: Lab) -> None:
    """The MNs start before their HAC (their first bootstraps fail, then
    back off); SAs live 10 s, so each MN bootstraps again every 8 s while
    the HA is SIGKILLed, then the HAC, then both, each started again on its
    files after 2-3 s.  Then, within 90 s: one live SA per MN, the very SAs
    the HA holds, no withdrawal owed; each MN's last bootstrap registered
    (BA 0); no traceback anywhere."""
    hac_toml = Path(lab.info["hac"]["config"])
    edit_toml(hac_toml, "[hac]\n", "[hac]\nprovisioning_timeout = 1.0\n")
    edit_toml(hac_toml, "sa_lifetime = 3600", "sa_lifetime = 10")
    configs = [_mn_config(lab, i) for i in range(MNS)]
    ha, hac = HaProcess(lab), HacProcess(lab)
    mns: list[subprocess.Popen[str]] = []
    logs = [lab.dir / f"mn-chaos{i}.log" for i in range(MNS)]
    results: list[list[dict[str, Any]]] = [[] for _ in range(MNS)]  # each MN's JSON lines
    readers: list[threading.Thread] = []

    def read(i: int, stream: IO[str]) -> None:
        for line in stream:
            if line.startswith("{"):
                results[i].append(json.loads(line))

    try:
        ha.start()
        for cfg, log in zip(configs, logs, strict=True):
            with log.open("w") as err:
                mn = subprocess.Popen(
                    [*LAUNCHER, "--role", "mn", "--config", str(cfg), "--json"],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            mns.append(mn)
            assert mn.stdout is not None
            readers.append(threading.Thread(target=read, args=(len(mns) - 1, mn.stdout)))
            readers[-1].start()
        wait_for(
            "every MN failed to reach the HAC",
            lambda: all("failure 1 in a row" in log.read_text() for log in logs),
            30,
        )
        hac.start()
        wait_for("every MN registered", lambda: len(held_by_ha(lab)) == MNS, 60)
        # The HA dies with every binding; the MNs' refreshes and re-bootstraps
        # fail (504: the HAC cannot install) until it is back.
        ha.kill9()
        time.sleep(3)
        ha.start()
        # The HAC dies; then both at once.
        hac_proc = hac.proc
        assert hac_proc is not None
        os.kill(hac_proc.pid, signal.SIGKILL)
        hac_proc.wait(timeout=10)
        hac.proc = None
        time.sleep(2)
        hac.start()
        ha.kill9()
        assert hac.proc is not None
        os.kill(hac.proc.pid, signal.SIGKILL)
        hac.proc.wait(timeout=10)
        hac.proc = None
        time.sleep(2)
        ha.start()
        hac.start()
        marks = [len(r) for r in results]

        def settled() -> bool:
            # Each MN bootstrapped and registered since the last restart,
            # and the stores agree: one live SA per MN, held by the HA.
            fresh = [r[m:] for r, m in zip(results, marks, strict=True)]
            if not all(f and f[-1]["status"] == 200 and f[-1]["ba"]["status"] == 0 for f in fresh):
                return False
            live = live_on_hac(lab)
            return len(live) == MNS and held_by_ha(lab) == live and unconfirmed(lab) == []

        wait_for("every MN registered again, the stores agreeing", settled, 90)
    finally:
        for mn in mns:
            mn.send_signal(signal.SIGTERM)
        for mn in mns:
            mn.wait(timeout=30)
        for t in readers:
            t.join(timeout=10)
        hac.close()
        ha.close()
    for i, mn in enumerate(mns):
        assert mn.returncode == 0, logs[i].read_text()
        err = logs[i].read_text()
        assert "Traceback" not in err
        assert "next bootstrap in" in err and "failure 1 in a row" in err  # it backed off
    assert "Traceback" not in hac.log_text() and "Traceback" not in "".join(
        p.read_text() for p in lab.dir.glob("ha-run*.log")
    )
