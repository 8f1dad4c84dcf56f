"""``sa_from_message``: what the MN (and the HA, for an install) refuses in
a 200's SA and bootstrap data."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address

import pytest

from mipsec.core.errors import RemoteProtocolError
from mipsec.core.issuer import new_sa, sa_from_message, sa_headers
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.suites import Suite
from mipsec.core.wire.message import Message

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
HAA = IPv6Address("2001:db8:1::1")
HOA = IPv6Address("2001:db8:1::7")


def message(suite: Suite = Suite.AES_128_CBC_SHA256, **bs: object) -> Message:
    sa = new_sa(spi=77, mn_id="a@b", suite=suite, scope=1, lifetime=3600, now=NOW)
    data = {"haa_ip6": HAA, "ip6_hoa": HOA, **bs}
    return sa_headers(IssuedSA(sa, BootstrapData(**data)))  # type: ignore[arg-type]


def test_a_good_200_is_taken() -> None:
    issued = sa_from_message(message(), "a@b")
    assert issued.bootstrap.haa_ip6 == HAA and issued.bootstrap.ip6_hoa == HOA


@pytest.mark.parametrize("field", ["mn_to_ha_ekey", "ha_to_mn_ekey"])
@pytest.mark.parametrize("which", ["k1 == k2", "k2 == k3", "k1 == k2 by parity"])
def test_a_degenerate_3des_key_is_refused(field: str, which: str) -> None:
    """RFC 2451 §2.3: a 3DES key with k1 == k2 or k2 == k3 (parity bits
    ignored) is single DES and MUST be rejected -- the HAC's fault, so the
    bootstrap fails (found in review: the MN crashed building its cipher)."""
    a, b = bytes(range(8)), bytes(range(8, 16))
    key = {
        "k1 == k2": a + a + b,
        "k2 == k3": a + b + b,
        "k1 == k2 by parity": a + bytes(x ^ 1 for x in a) + b,
    }[which]
    msg = dataclasses.replace(message(Suite(0x000A)), **{field: key})
    with pytest.raises(RemoteProtocolError, match="RFC 2451"):
        sa_from_message(msg, "a@b")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("haa_ip6", "::"),  # BUs went to this host (found in review)
        ("haa_ip6", "ff02::1"),
        ("haa_ip6", "fe80::1"),
        ("haa_ip4", "0.0.0.0"),
        ("haa_ip4", "224.0.0.1"),
        ("haa_ip4", "255.255.255.255"),
        ("haa_ip4", "169.254.0.1"),
        ("ip6_hoa", "::"),
        ("ip6_hoa", "ff02::1"),  # registered as a home address (found in review)
        ("ip6_hoa", "::1"),
        ("ip6_hoa", "fe80::7"),
        ("ip6_hoa", str(HAA)),  # the HA's own address
        ("ip4_hoa", "127.0.0.1"),
        ("ip4_hoa", "224.0.0.1"),
        ("ip4_hoa", "0.0.0.0"),
        ("ip4_hoa", "192.0.2.1"),  # the HA's own IPv4 address (haa_ip4 below)
    ],
)
def test_a_bad_ha_or_home_address_is_refused(field: str, value: str) -> None:
    """Bootstrap addresses must be unicast, not link-local; a home address
    not loopback and not the HA's own (since the twenty-eighth session)."""
    address = IPv4Address(value) if "ip4" in field else IPv6Address(value)
    bs: dict[str, object] = {"haa_ip4": IPv4Address("192.0.2.1"), field: address}
    with pytest.raises(RemoteProtocolError) as info:
        sa_from_message(message(**bs), "a@b")
    assert info.value.reason.startswith("mip6-" + field.replace("_", "-") + ": ")


@pytest.mark.parametrize(
    "bs",
    [
        {"haa_ip6": IPv6Address("::1"), "haa_ip4": IPv4Address("127.0.0.1")},  # the labs' HA
        {"haa_ip4": IPv4Address("192.0.2.1"), "ip4_hoa": IPv4Address("10.1.0.10")},
        {"ip6_hoa": None},
    ],
)
def test_loopback_ha_and_ordinary_addresses_are_taken(bs: dict[str, object]) -> None:
    """Loopback stays accepted for the HA (``mipsec init --lab`` runs it on
    ::1 / 127.0.0.1)."""
    sa_from_message(message(**bs), "a@b")
