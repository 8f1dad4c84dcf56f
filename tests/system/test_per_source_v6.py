"""``[hac] per_source_rate`` with real IPv6 sources (the last note's "not
tried"): a source is an IPv6 /64, so two addresses of one /64 share one
bucket, another /64 has its own, and an MN from a third /64 bootstraps.

Runs a real HAC in a network namespace of its own, with the sources as
addresses on its ``lo`` (v6_source_probe.py); skipped without CAP_NET_ADMIN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from labfix import needs_net_admin

pytestmark = [pytest.mark.system, needs_net_admin]

ADDRESSES = ("2001:db8:a::1", "2001:db8:a::2", "2001:db8:a::3", "2001:db8:b::2", "2001:db8:c::1")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def test_ipv6_sources_are_limited_per_64(tmp_path: Path) -> None:
    ns = f"mipsec-v6rate-{os.getpid()}"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        for addr in ADDRESSES:
            _ip("-n", ns, "addr", "add", f"{addr}/64", "dev", "lo", "nodad")
        probe = Path(__file__).with_name("v6_source_probe.py")
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(probe), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        got = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    # The first /64's burst of 3 is spent by its first address ...
    assert got["2001:db8:a::2"] == [True, True, True, False]
    # ... so a second address of the same /64 gets nothing ...
    assert got["2001:db8:a::3"] == [False, False]
    # ... while another /64 has a bucket of its own.
    assert got["2001:db8:b::2"] == [True, True, True, False]
    assert got["mn_status"] == 200  # an MN from a third /64, over IPv6
    assert got["rate_limited"] == 4
