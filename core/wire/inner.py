"""The tunnelled (inner) IP packet's header, as the data path reads it, sans-I/O.

RFC 6618 §6.4: "The reverse-tunneled IPv4 or IPv6 user data packets are
encapsulated as is inside the 'Payload Data'", with Next Header 41 for IPv6
and 4 for IPv4 (PROFILE §7; RFC 5555 carries an IPv4 home address the same
way).  The data path needs three things from such a packet: which IP version
it is, its source (the HA's ingress filter: only the home address bound to
the SA may send, RFC 6618 §6.4 "the plaintext inner IP header uses the home
address of the MN") and its destination (which binding, hence which SA and
care-of address, carries it back to the MN).

``parse_inner`` checks exactly what a forwarder must trust before it writes
the packet into the host's IP stack: the version nibble agrees with the Next
Header, the fixed header is complete, and the header's own length field
(IPv6 Payload Length + 40, IPv4 Total Length) equals the octets received.
Everything else (options, extension headers, checksums) is the receiving IP
stack's business.  A bad packet raises ``PacketError`` whose ``drop_reason``
is the counter: ``inner_truncated`` (shorter than its fixed header, or than
its IPv4 IHL says) or ``inner_malformed`` (any other inconsistency).
"""

from __future__ import annotations

from typing import NamedTuple

from mipsec.core.crypto import BytesLike
from mipsec.core.errors import PacketError
from mipsec.core.wire.esp import NEXT_HEADER_IPV4, NEXT_HEADER_IPV6

__all__ = [
    "IPV4_MIN_HEADER",
    "IPV6_HEADER",
    "InnerHeader",
    "next_header_of",
    "parse_inner",
]

IPV6_HEADER = 40  # RFC 8200 §3: fixed header octets
IPV4_MIN_HEADER = 20  # RFC 791 §3.1: IHL >= 5 words
TRUNCATED = "inner_truncated"
MALFORMED = "inner_malformed"


class InnerHeader(NamedTuple):
    """The inner packet's version, Next Header value and packed addresses."""

    version: int  # 4 or 6
    next_header: int  # 4 or 41: the ESP trailer's Next Header for this packet
    src: bytes  # 4 or 16 octets
    dst: bytes


def next_header_of(packet: BytesLike) -> int:
    """The ESP Next Header for ``packet`` (41 for IPv6, 4 for IPv4), from its version nibble."""
    if not packet:
        raise PacketError("inner", "empty packet", TRUNCATED)
    version = packet[0] >> 4
    if version == 6:
        return NEXT_HEADER_IPV6
    if version == 4:
        return NEXT_HEADER_IPV4
    raise PacketError("inner_version", f"IP version {version} is not 4 or 6", MALFORMED)


def parse_inner(packet: bytes, next_header: int | None = None) -> InnerHeader:
    """Check and read the inner header (see the module docstring).

    ``next_header`` is the ESP trailer's value when the packet came out of the
    tunnel: it must name the same IP version as the packet itself.  ``None``
    (a packet from the local TUN device) takes it from the version nibble.
    """
    n = len(packet)
    if n == 0:
        raise PacketError("inner", "empty packet", TRUNCATED)
    version = packet[0] >> 4
    if version == 6:
        nh = NEXT_HEADER_IPV6
        if n < IPV6_HEADER:
            raise PacketError("inner", f"{n} octets, an IPv6 header needs {IPV6_HEADER}", TRUNCATED)
        # RFC 8200 §3: Payload Length counts what follows the fixed header;
        # 0 would be a jumbogram (RFC 2675), which no TUN MTU allows.
        length = IPV6_HEADER + int.from_bytes(packet[4:6], "big")
        if length != n:
            raise PacketError(
                "inner_length", f"IPv6 Payload Length says {length} octets, got {n}", MALFORMED
            )
        src, dst = packet[8:24], packet[24:40]
    elif version == 4:
        nh = NEXT_HEADER_IPV4
        if n < IPV4_MIN_HEADER:
            raise PacketError(
                "inner", f"{n} octets, an IPv4 header needs {IPV4_MIN_HEADER}", TRUNCATED
            )
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER:
            raise PacketError("inner_ihl", f"IHL {ihl // 4} is below 5", MALFORMED)
        if ihl > n:
            raise PacketError("inner", f"{n} octets, IHL says the header has {ihl}", TRUNCATED)
        length = int.from_bytes(packet[2:4], "big")
        if length != n:
            raise PacketError(
                "inner_length", f"IPv4 Total Length says {length} octets, got {n}", MALFORMED
            )
        src, dst = packet[12:16], packet[16:20]
    else:
        raise PacketError("inner_version", f"IP version {version} is not 4 or 6", MALFORMED)
    if next_header is not None and next_header != nh:
        raise PacketError(
            "next_header", f"Next Header {next_header} with an IPv{version} packet", MALFORMED
        )
    return InnerHeader(version, nh, src, dst)
