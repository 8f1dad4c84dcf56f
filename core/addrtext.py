"""IP address <-> text, the same as :mod:`ipaddress` gives, at C speed.

``str(IPv6Address)`` (RFC 5952 compression) and ``IPv6Address(text)`` are
Python code, ~2-4 µs each.  One SA restored from the store needs several of
them, so an HA loading 100,000 SAs and bindings spent about half its start
there (issue 9, ``bench/ha_start.py``).  Here the C library's
``inet_pton``/``inet_ntop`` do the work; every result is the one
:mod:`ipaddress` gives -- ``tests/unit/test_addrtext.py`` checks that over
random addresses and the odd forms -- and wherever the two could differ the
function falls back to :mod:`ipaddress` itself:

* text out: ``inet_ntop`` writes an embedded IPv4 part (``::ffff:1.2.3.4``)
  where ``ipaddress`` writes hex, and cannot write a zone id; both go to
  ``str()``.  Otherwise glibc follows RFC 5952 §4 as ``ipaddress`` does
  (lower case, no leading zeros, the first longest run of two or more zero
  groups as ``::``);
* text in: what ``inet_pton`` refuses (a zone id, a bad text) goes to the
  ``ipaddress`` constructor, which accepts the same or raises its own
  ``ValueError``.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

__all__ = ["ip4_from_text", "ip6_from_text", "ip_text", "packed_from_text"]


def ip_text(addr: IPv4Address | IPv6Address) -> str:
    """``str(addr)``."""
    if isinstance(addr, IPv6Address) and addr.scope_id is None:
        text = inet_ntop(AF_INET6, addr.packed)
        if "." not in text:
            return text
    return str(addr)


def ip6_from_text(text: str) -> IPv6Address:
    """``IPv6Address(text)``."""
    try:
        return IPv6Address(int.from_bytes(inet_pton(AF_INET6, text), "big"))
    except (OSError, ValueError, TypeError):
        return IPv6Address(text)


def ip4_from_text(text: str) -> IPv4Address:
    """``IPv4Address(text)``."""
    try:
        return IPv4Address(inet_pton(AF_INET, text))
    except (OSError, ValueError, TypeError):
        return IPv4Address(text)


def packed_from_text(text: str) -> bytes:
    """``ipaddress.ip_address(text).packed``: 4 octets for IPv4, 16 for IPv6."""
    try:
        return inet_pton(AF_INET6 if ":" in text else AF_INET, text)
    except (OSError, ValueError, TypeError):
        from ipaddress import ip_address

        return ip_address(text).packed
