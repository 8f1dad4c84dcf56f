"""A typed view of one MHAuth message (RFC 6618 §5.5-5.7; PROFILE §3).

``decode_message`` turns a :class:`ParsedContent` into a :class:`Message`
with every known header parsed by its value codec; ``encode_message`` does
the reverse in canonical sender order.  ``auth`` is not a field: it is
computed and verified over raw octets by :mod:`mipsec.core.wire.tvheader`.
The message kind (Init/Mid/Done) is not on the wire (PROFILE §4): the state
machines decide it, not this codec.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, NamedTuple

from mipsec.core.wire import values as v
from mipsec.core.wire.tvheader import ParsedContent, parse_content

__all__ = [
    "HEADER_NAMES",
    "MESSAGE_FIELDS",
    "HeaderCodec",
    "Message",
    "decode_message",
    "encode_message",
    "message_from_bytes",
    "message_values",
]


@dataclass(slots=True)
class Message:
    """Every RFC 6618 TV-header as an optional typed field (None = absent)."""

    mn_id: str | None = None
    auth_method: tuple[str, ...] | None = None
    mn_rand: bytes | None = None
    hac_rand: bytes | None = None
    eap_payload: bytes | None = None
    status_code: int | None = None
    retry_after: datetime | None = None
    mip6_spi: int | None = None
    # SA keys (§5.6.2) never appear in repr.
    mn_to_ha_ikey: bytes | None = field(default=None, repr=False)
    ha_to_mn_ikey: bytes | None = field(default=None, repr=False)
    mn_to_ha_ekey: bytes | None = field(default=None, repr=False)
    ha_to_mn_ekey: bytes | None = field(default=None, repr=False)
    sa_validity_end: datetime | None = None
    mip6_sas: int | None = None
    ciphersuite: int | None = None
    suitelist: tuple[int, ...] | None = None
    haa_ip6: IPv6Address | None = None
    haa_ip4: IPv4Address | None = None
    port: int | None = None
    ip6_hoa: IPv6Address | None = None
    ip4_hoa: IPv4Address | None = None
    ip6_hnp: IPv6Network | None = None
    ip4_hnp: IPv4Network | None = None
    dns_ip6: IPv6Address | None = None
    dns_ip4: IPv4Address | None = None


# Every Message attribute, in declaration (= constructor) order.
MESSAGE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Message))
# message_values(msg): every attribute value at once, in MESSAGE_FIELDS order
# (one C call instead of a getattr() per field).
message_values: Callable[[Message], tuple[Any, ...]] = operator.attrgetter(*MESSAGE_FIELDS)


class HeaderCodec(NamedTuple):
    """(attribute, parse, format) for one wire header name."""

    attribute: str
    # parse(value, *, field=<header name>) -> typed value; raises HeaderError
    parse: Callable[..., Any]
    # format(typed value) -> canonical sender str; raises LocalProtocolError
    format: Callable[[Any], str]


# Wire name -> codec.  The order is the canonical sender order used by
# encode_message.
HEADER_NAMES: dict[str, HeaderCodec] = {
    "mn-id": HeaderCodec("mn_id", v.parse_nai, v.format_nai),
    "auth-method": HeaderCodec("auth_method", v.parse_auth_methods, v.format_auth_methods),
    "mn-rand": HeaderCodec("mn_rand", v.parse_rand, v.format_rand),
    "hac-rand": HeaderCodec("hac_rand", v.parse_rand, v.format_rand),
    "eap-payload": HeaderCodec("eap_payload", v.parse_eap_payload, v.format_eap_payload),
    "status-code": HeaderCodec("status_code", v.parse_status, v.format_status),
    "retry-after": HeaderCodec("retry_after", v.parse_date, v.format_date),
    "mip6-spi": HeaderCodec("mip6_spi", v.parse_spi, v.format_spi),
    "mip6-mn-to-ha-ikey": HeaderCodec("mn_to_ha_ikey", v.parse_hex, v.format_hex),
    "mip6-ha-to-mn-ikey": HeaderCodec("ha_to_mn_ikey", v.parse_hex, v.format_hex),
    "mip6-mn-to-ha-ekey": HeaderCodec("mn_to_ha_ekey", v.parse_hex, v.format_hex),
    "mip6-ha-to-mn-ekey": HeaderCodec("ha_to_mn_ekey", v.parse_hex, v.format_hex),
    "mip6-sa-validity-end": HeaderCodec("sa_validity_end", v.parse_date, v.format_date),
    "mip6-sas": HeaderCodec("mip6_sas", v.parse_sas, v.format_sas),
    "mip6-ciphersuite": HeaderCodec("ciphersuite", v.parse_suite, v.format_suite),
    "mip6-suitelist": HeaderCodec("suitelist", v.parse_suitelist, v.format_suitelist),
    "mip6-haa-ip6": HeaderCodec("haa_ip6", v.parse_ip6, v.format_ip6),
    "mip6-haa-ip4": HeaderCodec("haa_ip4", v.parse_ip4, v.format_ip4),
    "mip6-port": HeaderCodec("port", v.parse_port, v.format_port),
    "mip6-ip6-hoa": HeaderCodec("ip6_hoa", v.parse_ip6, v.format_ip6),
    "mip6-ip4-hoa": HeaderCodec("ip4_hoa", v.parse_ip4, v.format_ip4),
    "mip6-ip6-hnp": HeaderCodec("ip6_hnp", v.parse_ip6_prefix, v.format_ip6_prefix),
    "mip6-ip4-hnp": HeaderCodec("ip4_hnp", v.parse_ip4_subnet, v.format_ip4_subnet),
    "dns-ip6": HeaderCodec("dns_ip6", v.parse_ip6, v.format_ip6),
    "dns-ip4": HeaderCodec("dns_ip4", v.parse_ip4, v.format_ip4),
}


# Flat tables for the per-message loops (they run for every message sent and
# received): no NamedTuple attribute access per header.
_PARSERS: dict[str, tuple[str, Callable[..., Any]]] = {
    name: (c.attribute, c.parse) for name, c in HEADER_NAMES.items()
}
_FORMATTERS: tuple[tuple[str, Callable[[Any], str]], ...] = tuple(
    (name, c.format) for name, c in HEADER_NAMES.items()
)
# The attributes of HEADER_NAMES in canonical sender order (all of Message's).
_SENDER_VALUES: Callable[[Message], tuple[Any, ...]] = operator.attrgetter(
    *(c.attribute for c in HEADER_NAMES.values())
)


# Headers whose value is one object for every SA of an HA: its addresses,
# the DNS servers, a pool-wide prefix.  Their text is made once per object
# (issue 9 item 3: the constant parts of the 200 and of an install,
# precomputed per HA) -- about 9 µs per message otherwise -- and, received,
# parsed once per text.
_PER_HA = frozenset(
    {"mip6-haa-ip6", "mip6-haa-ip4", "mip6-ip6-hnp", "mip6-ip4-hnp", "dns-ip6", "dns-ip4"}
)
# (name, text) -> value, for the _PER_HA headers received: an HA decodes the
# same five or six texts in every install (25-30 µs of its ~64 µs per
# install decode).  Only values that parsed are kept (a bad one raises every
# time, naming its field); the values are immutable, so sharing one object
# between messages is safe.  Bounded: cleared when full.
_VALUE_MEMO: dict[tuple[str, str], Any] = {}
_VALUE_MEMO_MAX = 256


def _per_ha_value(name: str, parse: Callable[..., Any], text: str) -> Any:
    key = (name, text)
    value = _VALUE_MEMO.get(key)
    if value is None:
        value = parse(text, field=name)
        if len(_VALUE_MEMO) >= _VALUE_MEMO_MAX:
            _VALUE_MEMO.clear()
        _VALUE_MEMO[key] = value
    return value


def decode_message(parsed: ParsedContent) -> Message:
    """Parse every known header with its codec; unknown names are ignored (PROFILE §3)."""
    msg = Message()
    get = _PARSERS.get
    for name, value in parsed.headers:
        entry = get(name)
        if entry is not None:
            if name in _PER_HA:
                setattr(msg, entry[0], _per_ha_value(name, entry[1], value))
            else:
                setattr(msg, entry[0], entry[1](value, field=name))
    return msg


_PER_HA_POSITIONS = frozenset(i for i, (name, _f) in enumerate(_FORMATTERS) if name in _PER_HA)
# id(value) -> (value, text).  Holding the value keeps its id from being
# reused while the entry lives; the values are immutable.  Bounded: cleared
# when full (per-MN prefixes of an HNP pool pass through it too).
_TEXT_MEMO: dict[int, tuple[object, str]] = {}
_TEXT_MEMO_MAX = 256


def _per_ha_text(fmt: Callable[[Any], str], value: object) -> str:
    hit = _TEXT_MEMO.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    text = fmt(value)  # raises for a bad value, as without the memo
    if len(_TEXT_MEMO) >= _TEXT_MEMO_MAX:
        _TEXT_MEMO.clear()
    _TEXT_MEMO[id(value)] = (value, text)
    return text


def encode_message(msg: Message) -> list[tuple[str, str]]:
    """The non-None fields as (name, value) pairs in canonical sender order."""
    return [
        (name, _per_ha_text(fmt, value) if i in _PER_HA_POSITIONS else fmt(value))
        for i, ((name, fmt), value) in enumerate(zip(_FORMATTERS, _SENDER_VALUES(msg), strict=True))
        if value is not None
    ]


def message_from_bytes(content: bytes) -> tuple[ParsedContent, Message]:
    """Parse one container's content and decode it (raises HeaderError)."""
    parsed = parse_content(content)
    return parsed, decode_message(parsed)
