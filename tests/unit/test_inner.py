"""The inner-header codec (mipsec.core.wire.inner) against packets scapy builds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import UDP, IPv6, IPv6ExtHdrDestOpt

from mipsec.core.errors import PacketError
from mipsec.core.wire.esp import NEXT_HEADER_IPV4, NEXT_HEADER_IPV6
from mipsec.core.wire.inner import InnerHeader, next_header_of, parse_inner

V6 = bytes(IPv6(src="2001:db8:1::10", dst="2001:db8:c0::2") / UDP(sport=1, dport=2) / (b"x" * 30))
V4 = bytes(IP(src="192.0.2.10", dst="203.0.113.2") / ICMP() / (b"y" * 12))


def reason(packet: bytes, next_header: int | None = None) -> str:
    with pytest.raises(PacketError) as info:
        parse_inner(packet, next_header)
    return info.value.drop_reason


def test_ipv6_packet() -> None:
    hdr = parse_inner(V6, NEXT_HEADER_IPV6)
    assert hdr == InnerHeader(
        6,
        41,
        bytes.fromhex("20010db8000100000000000000000010"),
        bytes.fromhex("20010db800c000000000000000000002"),
    )
    assert next_header_of(V6) == NEXT_HEADER_IPV6


def test_ipv4_packet_with_options() -> None:
    pkt = bytes(IP(src="192.0.2.10", dst="203.0.113.2", options=b"\x01\x01\x01\x00") / TCP())
    hdr = parse_inner(pkt, NEXT_HEADER_IPV4)
    assert (hdr.version, hdr.next_header) == (4, 4)
    assert hdr.src == bytes([192, 0, 2, 10]) and hdr.dst == bytes([203, 0, 113, 2])
    assert next_header_of(pkt) == NEXT_HEADER_IPV4


def test_ipv6_extension_headers_are_the_stacks_business() -> None:
    pkt = bytes(IPv6(src="2001:db8:1::10", dst="::1") / IPv6ExtHdrDestOpt() / UDP())
    assert parse_inner(pkt).dst == bytes(15) + b"\x01"


@pytest.mark.parametrize("n", [0, 1, 20, 39])
def test_truncated_ipv6_header(n: int) -> None:
    assert reason(V6[:n]) == "inner_truncated"


@pytest.mark.parametrize("n", [0, 1, 19])
def test_truncated_ipv4_header(n: int) -> None:
    assert reason(V4[:n]) == "inner_truncated"


def test_ipv4_ihl_beyond_the_packet_is_truncated() -> None:
    pkt = bytearray(V4[:20])
    pkt[0] = 0x4F  # IHL 15 = 60 octets of header
    pkt[2:4] = (20).to_bytes(2, "big")
    assert reason(bytes(pkt)) == "inner_truncated"


def test_ipv4_ihl_below_five() -> None:
    pkt = bytearray(V4)
    pkt[0] = 0x44
    assert reason(bytes(pkt)) == "inner_malformed"


def test_length_fields_must_match_the_octets() -> None:
    assert reason(V6[:-1]) == "inner_malformed"  # payload cut short
    assert reason(V6 + b"\0") == "inner_malformed"  # trailing octets
    assert reason(V4[:-1]) == "inner_malformed"
    assert reason(V4 + b"\0") == "inner_malformed"


def test_version_must_match_next_header() -> None:
    assert reason(V6, NEXT_HEADER_IPV4) == "inner_malformed"
    assert reason(V4, NEXT_HEADER_IPV6) == "inner_malformed"
    assert reason(b"\x50" + V4[1:]) == "inner_malformed"  # version 5
    with pytest.raises(PacketError) as info:
        next_header_of(b"\x70")
    assert info.value.field == "inner_version"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([None, 4, 41, 59]))
def test_any_octets_parse_or_raise_packet_error(data: bytes, nh: int | None) -> None:
    try:
        hdr = parse_inner(data, nh)
    except PacketError as exc:
        assert exc.drop_reason in ("inner_truncated", "inner_malformed")
        return
    assert len(hdr.src) == len(hdr.dst) == (16 if hdr.version == 6 else 4)
    assert nh is None or nh == hdr.next_header
