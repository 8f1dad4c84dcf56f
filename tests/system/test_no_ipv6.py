"""A host without IPv6: the demo, an ``mipsec init`` lab, and an MN sent to an
IPv6 HA address it cannot reach.

Each test runs in a network namespace of its own with IPv6 off on every
interface (no ``::1``); skipped without CAP_NET_ADMIN.  Before, every lab
provisioned ``::1`` and the MN (registration transport "auto") took it:
``no Binding Acknowledgement: cannot reach the HA: [Errno 99]``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labfix import needs_net_admin

from mipsec.core.labsetup import free_port, init_lab

pytestmark = [pytest.mark.system, needs_net_admin]

LAUNCHER = [sys.executable, "-m", "mipsec.core.cli"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def no_ipv6() -> Iterator[list[str]]:
    """``ip netns exec NS``, NS a namespace with IPv6 off and lo up."""
    ns = f"mipsec-nov6-{os.getpid()}-{secrets.token_hex(3)}"
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


def test_an_mn_sent_to_an_unreachable_ipv6_ha_registers_over_ipv4(
    no_ipv6: list[str], tmp_path: Path
) -> None:
    """A lab made where ::1 exists provisions it; run where it does not, the
    MN ("auto") falls back to the HA's IPv4 address."""
    hac_port, ha_port = free_port(), free_port()
    info = init_lab(tmp_path / "lab", hac_port=hac_port, ha_port=ha_port)
    assert 'address6 = "::1"' in Path(info["hac"]["config"]).read_text()
    procs: list[subprocess.Popen[str]] = []
    try:
        for role, port in (("ha", ha_port), ("hac", hac_port)):
            cmd = [*no_ipv6, *LAUNCHER, "--role", role, "--config", info[role]["config"]]
            procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            )
            deadline = time.monotonic() + 30
            probe = [*no_ipv6, sys.executable, "-c",
                     f"import sys; from mipsec.core.labsetup import port_open; "
                     f"sys.exit(0 if port_open('127.0.0.1', {port}) else 1)"]  # fmt: skip
            while subprocess.run(probe, timeout=10).returncode != 0:
                assert procs[-1].poll() is None and time.monotonic() < deadline, role
                time.sleep(0.2)
        mn = subprocess.run(
            [*no_ipv6, *LAUNCHER, "--role", "mn", "--config", info["mn"]["config"], "--once",
             "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert mn.returncode == 0, mn.stdout + mn.stderr
    result = json.loads(mn.stdout.strip().splitlines()[-1])
    assert result["bootstrap"]["haa_ip6"] == "::1" and result["ba"]["status"] == 0
    assert "no IPv6 path to the HA at ::1" in mn.stderr
