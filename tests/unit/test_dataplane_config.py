"""[dataplane] configuration (HA and MN): defaults, validation errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mipsec.core.config import HAConfig, MNConfig, validate_config
from mipsec.core.errors import ConfigError
from mipsec.core.tun import IpCommandError, TunDevice, TunError, ip

MN_BASE: dict[str, Any] = {
    "mn": {"mn_id": "a@b.example", "psk_hex": "00" * 16},
    "hac": {"host": "192.0.2.1", "ca": "ca.pem"},
}


def mn(dataplane: dict[str, Any]) -> MNConfig:
    cfg = validate_config({**MN_BASE, "dataplane": dataplane}, "mn", base=Path("/"))
    assert isinstance(cfg, MNConfig)
    return cfg


def ha(dataplane: dict[str, Any]) -> HAConfig:
    cfg = validate_config({"dataplane": dataplane}, "ha", base=Path("/"))
    assert isinstance(cfg, HAConfig)
    return cfg


def test_defaults_leave_the_data_plane_off() -> None:
    assert not mn({}).dataplane.enabled and not ha({}).dataplane.enabled
    d = mn({}).dataplane
    assert (d.tun, d.mtu, d.routes, d.keepalive_interval, d.gro) == ("mip0", 1400, (), 110.0, True)
    assert (ha({}).dataplane.tun, ha({}).dataplane.mtu) == ("mipha0", 1400)


def test_valid_tables() -> None:
    d = ha(
        {
            "enabled": True,
            "tun": "home0",
            "mtu": 1280,
            "routes": ["2001:db8:1::/64", "192.0.2.0/24"],
            "addresses": ["2001:db8:1::1/128"],
        }
    ).dataplane
    assert [str(r) for r in d.routes] == ["2001:db8:1::/64", "192.0.2.0/24"]
    m = mn({"enabled": True, "routes": ["0.0.0.0/0"], "keepalive_interval": 0}).dataplane
    assert m.keepalive_interval == 0 and str(m.routes[0]) == "0.0.0.0/0"


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({"tun": "a" * 16}, "dataplane.tun", "1 to 15"),
        ({"tun": "bad/name"}, "dataplane.tun", "not a valid interface name"),
        ({"tun": "mip%d"}, "dataplane.tun", "not a valid interface name"),
        ({"tun": ""}, "dataplane.tun", "1 to 15"),
        ({"mtu": 1279}, "dataplane.mtu", "1280"),
        ({"mtu": 70000}, "dataplane.mtu", "65535"),
        ({"routes": ["192.0.2.1/24"]}, "dataplane.routes[0]", "network"),
        ({"routes": ["nonsense"]}, "dataplane.routes[0]", "network"),
        ({"keepalive_interval": -1}, "dataplane.keepalive_interval", "0"),
        ({"movement_check": -0.5}, "dataplane.movement_check", "0"),
        ({"enabled": True, "colour": "blue"}, "dataplane.colour", "Extra"),
    ],
)
def test_mn_errors_name_the_key(table: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        mn(table)
    assert info.value.key == key and words in info.value.reason


def test_ha_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        ha({"addresses": ["2001:db8::zz/64"]})
    assert info.value.key == "dataplane.addresses[0]"


def test_tun_and_ip_errors_are_one_line_and_typed() -> None:
    with pytest.raises(TunError, match="1 to 15 octets"):
        TunDevice("x" * 16)
    with pytest.raises(IpCommandError) as info:
        ip("link", "show", "dev", "no-such-device-mipsec")
    text = str(info.value)
    assert text.startswith("ip link show dev no-such-device-mipsec: ") and "\n" not in text
