"""core/tun.py ``ip_batch``: a restore's commands in one ``ip -force -batch -``,
every one tried, the failed ones told apart; the roles' use of it."""

from __future__ import annotations

import subprocess
from ipaddress import ip_interface, ip_network
from types import SimpleNamespace
from typing import Any, cast

import pytest

from mipsec.core import tun as tunmod
from mipsec.core.errors import ConfigError
from mipsec.core.roles import ha_data
from mipsec.core.tun import IpCommandError, TunDevice, ip_batch


def _run(calls: list[Any], rc: int = 0, stderr: str = "") -> Any:
    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append((cmd, kw.get("input"), kw.get("timeout")))
        return subprocess.CompletedProcess(cmd, rc, "", stderr)

    return run


def test_every_command_in_one_ip_and_the_failed_ones_by_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []
    stderr = (
        "RTNETLINK answers: No buffer space available\nCommand failed -:1\n"
        "Error: Invalid prefsrc address.\nCommand failed -:3\n"
    )
    monkeypatch.setattr(subprocess, "run", _run(calls, 1, stderr))
    commands = [["route", "replace", f"2001:db8:{i:x}::/64", "dev", "mip0"] for i in range(200)]
    failed = ip_batch(commands)
    [(cmd, script, timeout)] = calls  # one process for 200 routes, not 200
    assert cmd == ["ip", "-force", "-batch", "-"] and timeout == tunmod._IP_TIMEOUT
    assert script.splitlines()[199] == "route replace 2001:db8:c7::/64 dev mip0"
    assert [(i, str(e)) for i, e in failed] == [
        (
            0,
            "ip route replace 2001:db8:0::/64 dev mip0: "
            "RTNETLINK answers: No buffer space available",
        ),
        (2, "ip route replace 2001:db8:2::/64 dev mip0: Error: Invalid prefsrc address."),
    ]


def test_no_commands_no_process_and_success_no_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(subprocess, "run", _run(calls))
    assert ip_batch([]) == [] and calls == []
    assert ip_batch([["route", "replace", "::/0", "dev", "mip0"]]) == [] and len(calls) == 1


def test_ip_failing_as_a_whole_or_not_answering_is_one_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(subprocess, "run", _run([], 1, "Cannot read -: oops\n"))
    with pytest.raises(IpCommandError, match=r"^ip -force -batch -: Cannot read -: oops$"):
        ip_batch([["route", "replace", "::/0", "dev", "mip0"]])

    def slow(cmd: list[str], **kw: Any) -> Any:
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(subprocess, "run", slow)
    with pytest.raises(IpCommandError, match=r"\(1 commands\): no answer in 10 s$"):
        ip_batch([["route", "replace", "::/0", "dev", "mip0"]])


def test_a_word_batch_mode_would_misread_is_one_ip_per_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran: list[tuple[str, ...]] = []

    def ip(*args: str, check: bool = True) -> str:
        ran.append(args)
        if args[2] == "2001:db8::/64":
            raise IpCommandError("ip route replace 2001:db8::/64 dev mip#0: no")
        return ""

    monkeypatch.setattr(tunmod, "ip", ip)
    commands = [["route", "replace", p, "dev", "mip#0"] for p in ("2001:db8::/64", "::/0")]
    assert [i for i, _ in ip_batch(commands)] == [0] and len(ran) == 2


def _tun(have: set[str]) -> Any:
    fake = cast(Any, TunDevice.__new__(TunDevice))
    fake.name = "mip0"
    fake.addresses = lambda: have
    return fake


def test_the_ha_tries_every_address_and_route_and_names_the_first_that_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the HA's ``_configure`` stopped at the first failing command:
    one transient failure of an address left every route off (found in
    review).  Now all are tried; the first failure is named, with a count."""
    batches: list[list[list[str]]] = []

    def batch(commands: list[list[str]]) -> list[tuple[int, IpCommandError]]:
        batches.append(commands)
        return [(0, IpCommandError("ip addr replace ...: No buffer space available"))] + [
            (2, IpCommandError("ip route replace ...: No buffer space available"))
        ]

    monkeypatch.setattr(ha_data, "ip_batch", batch)
    plane = cast(Any, ha_data.HaDataPlane.__new__(ha_data.HaDataPlane))
    plane.service = SimpleNamespace(config_file="ha.toml")
    plane.cfg = SimpleNamespace(
        addresses=[ip_interface("2001:db8:77::1/128"), ip_interface("192.0.2.1/32")],
        routes=[ip_network("2001:db8:77::/64"), ip_network("198.51.100.0/24")],
    )
    with pytest.raises(ConfigError) as info:
        plane._restore(_tun({"192.0.2.1/32"}))  # the IPv4 address survived the down
    assert info.value.key == "dataplane.addresses"
    assert "No buffer space available (and 1 more of 3)" in info.value.reason
    [commands] = batches  # the kept IPv4 address is not touched; both routes tried
    assert [c[2] for c in commands] == ["2001:db8:77::1/128", "2001:db8:77::/64", "198.51.100.0/24"]
