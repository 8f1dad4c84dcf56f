"""``mipsec demo --data`` end to end (issue 11 item 6): the narrated demo in namespaces."""

from __future__ import annotations

import subprocess
import sys

import pytest
from labfix import needs_net_admin

pytestmark = [pytest.mark.system, needs_net_admin]


def test_demo_data_pings_and_transfers_through_the_ha() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mipsec.core.cli", "demo", "--data"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    text = out.stdout
    assert out.returncode == 0, text + out.stderr
    assert "HAC answered status 200" in text
    assert "Binding Acknowledgement status 0" in text
    assert text.count(": 3 echoes, 3 answered") == 2  # IPv6 and IPv4 home address
    assert "SHA-256 of what it received matches" in text
    assert "namespaces, TUN devices and processes removed" in text
    # Nothing of the lab is left behind.
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    tag = next(w for w in text.split() if w.startswith("mipsec-") and w.endswith("-mn"))
    assert tag.rsplit("-", 1)[0] not in names
