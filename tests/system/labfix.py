"""Helpers of the data-plane system tests: a running namespace lab, an MN in it.

Each module-scoped lab runs one HA (data plane on) and one HAC in its ``ha``
namespace; tests start MNs with their own configuration in the ``mn``
namespace.  Labs are built and torn down by the fixtures, also when a test
fails.  Without CAP_NET_ADMIN the tests skip, saying so; with it, a missing
tool (ip, nft) is a failure that names the tool.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mipsec.core.netlab import NetLab, lab_configs, mn_variant, no_net_admin

REASON = no_net_admin()
needs_net_admin = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@dataclass
class Mn:
    name: str
    result: dict[str, Any]  # the MN's --json report

    @property
    def hoa6(self) -> str:
        return str(self.result["bootstrap"]["ip6_hoa"])

    @property
    def hoa4(self) -> str:
        return str(self.result["ba"]["ip4_hoa"])

    @property
    def scope(self) -> int:
        return int(self.result["sa"]["scope"])


@dataclass
class RunningLab:
    lab: NetLab
    info: dict[str, Any]

    def config(self, name: str, **changes: Any) -> str:
        return mn_variant(self.info, name, **changes)

    def start_mn(self, name: str, config: str) -> Mn:
        self.lab.mipsec("mn", "mn", config, "--json", name=name)
        line = self.lab.wait_log(name, '"status"', 60)
        result = json.loads(line)
        assert result["ok"], result
        # "data plane on TUN: home addresses ..." (not "... not attached").
        self.lab.wait_log(name, ": home addresses", 30)
        log = self.lab.log(name)
        assert "not attached" not in log, log
        return Mn(name, result)

    def stop_mn(self, mn: Mn) -> str:
        return self.lab.stop(mn.name)

    def ha_status(self) -> subprocess.CompletedProcess[str]:
        """``mipsec status --json`` of the HA (its control socket)."""
        return subprocess.run(
            [sys.executable, "-m", "mipsec.core.cli", "status", "--json"]
            + ["--config", str(self.info["ha"]["config"])],
            capture_output=True,
            text=True,
            timeout=20,
        )

    def why(self, mn: Mn) -> str:
        """For a failed assertion: the HA's live counters (its control
        socket: drops by reason, data plane) and the last lines the HA and
        the MN logged -- what a lost packet leaves behind."""
        ha = self.ha_status()
        tails = {name: self.lab.log(name).splitlines()[-15:] for name in ("ha", mn.name)}
        return json.dumps({"ha_status": ha.stdout or ha.stderr, "logs": tails}, indent=1)


def until(check: Callable[[], bool], timeout: float = 15.0, every: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def running(base: Path, *, nat: bool) -> Iterator[RunningLab]:
    info = lab_configs(base / "lab", outer="ip4" if nat else "ip6", movement_check=0.3)
    with NetLab(base, nat=nat) as lab:
        lab.mipsec("ha", "ha", info["ha"]["config"])
        lab.wait_log("ha", "listening on", 60)
        lab.mipsec("ha", "hac", info["hac"]["config"])
        lab.wait_log("hac", "HAC listening", 60)
        yield RunningLab(lab, info)
