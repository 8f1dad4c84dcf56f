"""core/echo.py's codec: the Internet checksum and echo reply parsing."""

from __future__ import annotations

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.echo import checksum, echo_request, parse_reply


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 §3: the one's complement sum of 0001 f203 f4f5 f6f7 is ddf2.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2


def test_an_icmpv4_echo_request_checks_out() -> None:
    packet = echo_request(socket.AF_INET, 0x1234, 7, b"abc")  # odd length: padded
    assert packet[0] == 8 and struct.unpack_from("!HH", packet, 4) == (0x1234, 7)
    assert checksum(packet) == 0  # a correct checksum sums to all ones


def test_replies_are_recognised_per_family() -> None:
    icmp4 = struct.pack("!BBHHH", 0, 0, 0, 9, 2)
    ip4 = bytes([0x45]) + bytes(19)
    assert parse_reply(socket.AF_INET, ip4 + icmp4) == (9, 2)
    assert parse_reply(socket.AF_INET6, struct.pack("!BBHHH", 129, 0, 0, 9, 2)) == (9, 2)
    # A request, another type, or a v4 reply read as v6: not a reply.
    assert parse_reply(socket.AF_INET, ip4 + struct.pack("!BBHHH", 8, 0, 0, 9, 2)) is None
    assert parse_reply(socket.AF_INET6, icmp4) is None


@given(st.binary(max_size=80), st.sampled_from([socket.AF_INET, socket.AF_INET6]))
def test_any_octets_parse_or_are_ignored(data: bytes, family: int) -> None:
    got = parse_reply(family, data)
    assert got is None or all(0 <= v <= 0xFFFF for v in got)
