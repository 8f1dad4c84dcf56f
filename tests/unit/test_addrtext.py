"""core/addrtext.py gives exactly what :mod:`ipaddress` gives, results and errors alike."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.addrtext import ip4_from_text, ip6_from_text, ip_text, packed_from_text

# Runs of zero groups are where RFC 5952 compression has choices to make: draw
# addresses whose groups are mostly 0, as well as uniformly random ones.
_groups = st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xDB8, 0x2001]), min_size=8, max_size=8)
ip6_ints = st.one_of(
    st.integers(0, 2**128 - 1),
    _groups.map(lambda gs: int.from_bytes(b"".join(g.to_bytes(2, "big") for g in gs), "big")),
    st.integers(0, 2**32 - 1).map(lambda n: (0xFFFF << 32) | n),  # IPv4-mapped
    st.integers(0, 2**32 - 1),  # IPv4-compatible (deprecated) and ::, ::1
)

ODD_TEXTS = [
    "::",
    "::1",
    "1::",
    "::ffff:1.2.3.4",
    "::1.2.3.4",
    "1:2:3:4:5:6:1.2.3.4",
    "1:0:0:1:0:0:0:1",
    "1:0:0:0:1:0:0:1",  # two runs of three: the first is compressed
    "0:1:0:1:0:1:0:1",  # no run of two: nothing compressed
    "2001:DB8::A",  # upper case
    "2001:db8:0000:0000:0000:0000:0000:0001",
    "fe80::1%eth0",  # zone id: ipaddress keeps it
    "1::2::3",
    "1:2:3:4:5:6:7:8:9",
    "12345::",
    "::ffff:01.2.3.4",
    " ::1",
    "::1\x00",
    "::g",
    "",
    ":",
    "1.2.3.4",
    "1.2.3.04",
    "1.2.3",
    "256.1.1.1",
    "1.2.3.4 ",
    "\u0661.2.3.4",  # an Arabic-Indic digit
    "0.0.0.0",
    "255.255.255.255",
]


def _outcome(make: object, text: str) -> object:
    try:
        return ("ok", make(text))  # type: ignore[operator]
    except ValueError as exc:
        return ("error", type(exc))


@given(ip6_ints)
def test_ip6_text_is_str(n: int) -> None:
    addr = IPv6Address(n)
    text = ip_text(addr)
    assert text == str(addr)
    assert ip6_from_text(text) == addr
    assert packed_from_text(text) == addr.packed


@given(st.integers(0, 2**32 - 1))
def test_ip4_text_is_str(n: int) -> None:
    addr = IPv4Address(n)
    text = ip_text(addr)
    assert text == str(addr)
    assert ip4_from_text(text) == addr
    assert packed_from_text(text) == addr.packed


def test_a_zone_id_is_kept_as_ipaddress_keeps_it() -> None:
    addr = IPv6Address("fe80::1%eth0")
    assert ip_text(addr) == "fe80::1%eth0"
    assert ip6_from_text("fe80::1%eth0") == addr
    assert ip6_from_text("fe80::1%eth0").scope_id == "eth0"


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_odd_texts_as_ipaddress(text: str) -> None:
    assert _outcome(ip6_from_text, text) == _outcome(IPv6Address, text)
    assert _outcome(ip4_from_text, text) == _outcome(IPv4Address, text)
    assert _outcome(packed_from_text, text) == _outcome(
        lambda t: ipaddress.ip_address(t).packed, text
    )


@given(st.text(alphabet="0123456789abcdefABCDEF:.%", max_size=45))
def test_any_text_as_ipaddress(text: str) -> None:
    assert _outcome(ip6_from_text, text) == _outcome(IPv6Address, text)
    assert _outcome(ip4_from_text, text) == _outcome(IPv4Address, text)
    assert _outcome(packed_from_text, text) == _outcome(
        lambda t: ipaddress.ip_address(t).packed, text
    )
