"""``sa_from_message``: what the MN (and the HA, for an install) refuses in
a 200's SA and bootstrap data."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from ipaddress import IPv6Address

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
