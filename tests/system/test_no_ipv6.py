"""A host without IPv6: the demo and its ``mipsec init`` lab.

Each test runs in a network namespace of its own with IPv6 off on every
interface (no ``::1``); skipped without CAP_NET_ADMIN.  Before, every lab
provisioned ``::1`` and the MN (registration transport "auto") took it:
``no Binding Acknowledgement: cannot reach the HA: [Errno 99]``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from labfix import needs_net_admin

pytestmark = [pytest.mark.system, needs_net_admin]

LAUNCHER = [sys.executable, "-m", "mipsec.core.cli"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def no_ipv6() -> Iterator[list[str]]:
    """``ip netns exec NS``, NS a namespace with IPv6 off and lo up."""
    ns = f"rvfx-nov6-{os.getpid()}-{secrets.token_hex(3)}"
    _ip("netns", "add", ns)
    try:
        prefix = ["ip", "netns", "exec", ns]
        subprocess.run(
            [*prefix, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1"],
            check=True, capture_output=True, timeout=10,
        )  # fmt: skip
        _ip("-n", ns, "link", "set", "lo", "up")
        yield prefix
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_the_demo_runs_on_a_host_without_ipv6(no_ipv6: list[str]) -> None:
    out = subprocess.run([*no_ipv6, *LAUNCHER, "demo"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "haa_ip6" not in out.stdout  # the lab provisions no IPv6 HA address
    assert "HA answered a protected Binding Acknowledgement: status 0" in out.stdout
