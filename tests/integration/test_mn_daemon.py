"""The long-running MN: registers, re-bootstraps before the SA ends, and
de-registers (lifetime 0) when stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import LAUNCHER, Lab, edit_toml


def test_rebootstrap_and_deregistration(lab: Lab, start_hac: Any) -> None:
    edit_toml(Path(lab.info["hac"]["config"]), "sa_lifetime = 3600", "sa_lifetime = 10")
    edit_toml(Path(lab.info["mn"]["config"]), "lifetime = 600", "lifetime = 8")
    start_hac(lab)
    mn = subprocess.Popen(
        [*LAUNCHER, "--role", "mn", "--config", lab.info["mn"]["config"], "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        time.sleep(12)  # one re-bootstrap at 80 % of the 10 s SA
    finally:
        mn.send_signal(signal.SIGTERM)
        out, err = mn.communicate(timeout=20)
    assert mn.returncode == 0, err
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) >= 2, (out, err)
    assert all(r["status"] == 200 and r["ba"]["status"] == 0 for r in results), results
    assert len({r["sa"]["spi"] for r in results}) == len(results)  # a fresh SA each time
    assert "deregistered" in err
