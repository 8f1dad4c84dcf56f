"""Value types of configuration files (core/confvalues.py); the sweep over
every key of the lab's files is tests/integration/test_config_sweep.py."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import BaseModel, ValidationError

from mipsec.core.confvalues import (
    DnsName,
    HaId,
    Host,
    IPv4Text,
    ListenAddresses,
    NetworkText,
    ha_id_problem,
)


class _M(BaseModel):
    host: Host | None = None
    name: DnsName | None = None
    ha_id: HaId | None = None
    addr: IPv4Text | None = None
    net: NetworkText | None = None
    listen: ListenAddresses | None = None


@pytest.mark.parametrize(
    "value",
    ["hac.example.net", "hac", "ha_1.example.net", "192.0.2.1", "2001:db8::1", "fe80::1%eth0"],
)
def test_hosts_accepted(value: str) -> None:
    assert _M(host=value).host == value


@pytest.mark.parametrize("value", ["", " hac", "hac\x01", "*.example.net", "a..b", "-a.example"])
def test_hosts_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        _M(host=value)


@pytest.mark.parametrize("value", ["eap.example.net", "EAP.example.net.", "bücher.example"])
def test_dns_names_accepted(value: str) -> None:
    assert _M(name=value).name == value


@pytest.mark.parametrize(
    "value", ["", "192.0.2.1", "::1", "a_b.example", "*.example.net", "x" * 64]
)
def test_dns_names_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        _M(name=value)


def test_numbers_are_not_addresses() -> None:
    with pytest.raises(ValidationError, match="as a string"):
        _M(addr=7)  # type: ignore[arg-type]  # pydantic alone: 0.0.0.7
    with pytest.raises(ValidationError, match="as a string"):
        _M(net=7)  # type: ignore[arg-type]
    assert _M(addr="192.0.2.7").addr == ipaddress.IPv4Address("192.0.2.7")  # type: ignore[arg-type]


def test_ha_ids_and_listen_lists() -> None:
    assert ha_id_problem("ha1") is None
    assert ha_id_problem("") == "length 0 outside 1..253"
    assert ha_id_problem(" ha1") is not None and ha_id_problem("h\x01") is not None
    with pytest.raises(ValidationError):
        _M(ha_id="h\u00e9")
    assert _M(listen=("::1", "127.0.0.1")).listen == ("::1", "127.0.0.1")  # type: ignore[arg-type]
    for bad in ((), ("localhost",)):
        with pytest.raises(ValidationError):
            _M(listen=bad)  # type: ignore[arg-type]
