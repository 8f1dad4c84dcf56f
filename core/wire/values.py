"""Typed codecs for TV-header values (RFC 6618 §5.5-5.7; PROFILE §3 value table).

Each value form has a ``parse_*`` (received ``str`` -> typed value, raising
:class:`HeaderError` naming the header given as ``field``) and a ``format_*``
(typed value -> the canonical form a sender writes, raising
:class:`LocalProtocolError` when the caller hands in something unsendable).

Receivers are liberal where PROFILE §3 says so (hex case, any RFC 4291 IPv6
text form); senders are canonical.  Numeric parsing never trusts ``int()``
alone: it accepts Unicode digits and ``_`` separators, so every digit string
is checked to be ASCII first.  Error messages never contain the value (it
may be key material).
"""

from __future__ import annotations

import re
import struct
import unicodedata
from collections.abc import Iterable
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from mipsec.core.errors import HeaderError, LocalProtocolError

__all__ = [
    "NAI_MAX_OCTETS",
    "RAND_LEN",
    "SPI_MAX",
    "SPI_MIN",
    "STATUS_CODES",
    "format_auth_methods",
    "format_date",
    "format_eap_payload",
    "format_hex",
    "format_ip4",
    "format_ip4_subnet",
    "format_ip6",
    "format_ip6_prefix",
    "format_nai",
    "format_port",
    "format_rand",
    "format_sas",
    "format_spi",
    "format_status",
    "format_suite",
    "format_suitelist",
    "parse_auth_methods",
    "parse_date",
    "parse_eap_payload",
    "parse_hex",
    "parse_ip4",
    "parse_ip4_subnet",
    "parse_ip6",
    "parse_ip6_prefix",
    "parse_nai",
    "parse_port",
    "parse_rand",
    "parse_sas",
    "parse_spi",
    "parse_status",
    "parse_suite",
    "parse_suitelist",
]

NAI_MAX_OCTETS = 253  # RFC 7542 §2.3; PROFILE §3
RAND_LEN = 32  # RFC 6618 §5.5.8
SPI_MIN = 1  # RFC 6618 §5.6.1: 0 is reserved
SPI_MAX = 268_435_455  # 2^28 - 1
PORT_MIN, PORT_MAX = 1, 65535
STATUS_CODES = frozenset({100, 200, 400, 401, 500, 501, 503, 504})  # §5.5.4
SAS_VALUES = (0, 1)  # §5.6.4 / PROFILE §3: digit 0 or 1 only
EAP_HEADER_LEN = 4  # RFC 3748 §4: Code, Identifier, Length(2)

# A regex: one C call per value, not one Python step per character.
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_TOKEN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_WS = " \t"
# Fast paths for the forms senders write (PROFILE §3); every other text takes
# the general check, so what is accepted does not change.
_NAI_ASCII_RE = re.compile(rf"[!-~]{{1,{NAI_MAX_OCTETS}}}")  # printable, no space
_IP6_FULL_RE = re.compile(r"(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}")  # §5.7 full 8-group form
_UNPACK_8H = struct.Struct(">8H").unpack
_IP6_FORMAT = "{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}".format
_IP4_RE = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")  # §5.7 BNF


def _ascii_digits(s: str) -> bool:
    # str.isdigit() alone accepts e.g. "²" or Arabic-Indic digits.
    return s.isascii() and s.isdigit()


def _parse_uint(value: str, field: str, lo: int, hi: int, max_digits: int | None = None) -> int:
    if not _ascii_digits(value):
        raise HeaderError(field, "not a decimal number")
    if max_digits is not None and len(value) > max_digits:
        raise HeaderError(field, f"more than {max_digits} digits")
    # Strip leading zeros before int(): bounds the work and avoids the
    # interpreter's int-string conversion limit on absurd inputs.
    significant = value.lstrip("0") or "0"
    if len(significant) > len(str(hi)):
        raise HeaderError(field, f"value outside {lo}..{hi}")
    number = int(significant)
    if not lo <= number <= hi:
        raise HeaderError(field, f"value outside {lo}..{hi}")
    return number


def _check_int(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LocalProtocolError(f"{what} must be an int")
    if not lo <= value <= hi:
        raise LocalProtocolError(f"{what} {value} outside {lo}..{hi}")
    return value


# ---------------------------------------------------------------- NAI (mn-id)


def _nai_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable NAI (RFC 7542), or None."""
    if not value:
        return "empty NAI"
    if _NAI_ASCII_RE.fullmatch(value) is not None:
        pass  # printable ASCII without space, <= 253 octets: the checks below hold
    else:
        problem = _nai_chars_problem(value)
        if problem is not None:
            return problem
    if value.count("@") > 1:
        return "more than one '@' in NAI"
    username, at, realm = value.partition("@")
    if at:
        if not realm:
            return "empty realm in NAI"
        if any(not label for label in realm.split(".")):
            return "empty label in NAI realm"
        if _NAI_REALM_RE.fullmatch(realm) is None:
            return "NAI realm label not letters, digits and inner hyphens"
    if username and _NAI_USERNAME_RE.fullmatch(username) is None:
        return "NAI username not a dot-string of atext characters"
    return None


# RFC 7542 §2.2 ABNF (UTF8-xtra-char: any non-ASCII character; the category
# checks above keep out the ones that could disguise a log line).  Found in
# review: without it `a<b>;c@ex!ample` or `a..b@x` reached the credential
# lookup, the SA and every log line instead of a 400 (PROFILE §3, §6).
# utf8-atext, written out from §2.2:
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"
_RTEXT = r"[A-Za-z0-9\u0080-\U0010ffff]"
# dot-string = string *("." string); string = 1*utf8-atext
_NAI_USERNAME_RE = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# label = utf8-rtext *(ldh-str): a hyphen neither first nor last.  One label
# alone is accepted (the ABNF asks for two): realms such as `@lab` are common
# in test and enterprise set-ups and route the same; every label is checked.
_NAI_REALM_RE = re.compile(rf"{_RTEXT}(?:-*{_RTEXT})*(?:\.{_RTEXT}(?:-*{_RTEXT})*)*")


# Unicode categories never allowed in an NAI: controls (Cc), format (Cf),
# line/paragraph separators (Zl, Zp), surrogates (Cs), private use (Co),
# unassigned (Cn).
_NAI_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def _nai_chars_problem(value: str) -> str | None:
    try:
        octets = value.encode("utf-8")
    except UnicodeEncodeError:
        return "NAI is not valid UTF-8"
    if len(octets) > NAI_MAX_OCTETS:
        return f"NAI longer than {NAI_MAX_OCTETS} octets"
    for c in value:
        category = unicodedata.category(c)
        if category in _NAI_BAD_CATEGORIES or c.isspace():
            # RFC 7542 §2.2 has no controls or white space in any NAI part;
            # format characters (bidi overrides such as U+202E, zero-width
            # U+200B...), separators, surrogates, private-use and unassigned
            # code points are refused too: an identity is written into every
            # log line and must not be able to disguise itself there.
            return "control, format or white-space character in NAI"
    return None


def parse_nai(value: str, *, field: str = "mn-id") -> str:
    """An RFC 7542 NAI such as ``alice@home.example``; returned unchanged."""
    problem = _nai_problem(value)
    if problem is not None:
        raise HeaderError(field, problem)
    return value


def format_nai(nai: str) -> str:
    if not isinstance(nai, str):
        raise LocalProtocolError("NAI must be a str")
    problem = _nai_problem(nai)
    if problem is not None:
        raise LocalProtocolError(problem)
    return nai


# -------------------------------------------------------------- auth-method


def parse_auth_methods(value: str, *, field: str = "auth-method") -> tuple[str, ...]:
    """§5.5.2 comma list; tokens lower-cased.  Unknown tokens are kept (policy decides)."""
    methods: list[str] = []
    for part in value.split(","):
        if not part.isascii():
            raise HeaderError(field, "invalid authentication method token")
        token = part.strip(_WS).lower()
        if not token:
            raise HeaderError(field, "empty authentication method")
        if not all(c in _TOKEN for c in token):
            raise HeaderError(field, "invalid authentication method token")
        methods.append(token)
    return tuple(methods)


def format_auth_methods(methods: Iterable[str]) -> str:
    items = list(methods)
    if not items:
        raise LocalProtocolError("at least one authentication method is required (§5.5.2)")
    out: list[str] = []
    for m in items:
        if not isinstance(m, str) or not m or not m.isascii() or not set(m.lower()) <= _TOKEN:
            raise LocalProtocolError(f"invalid authentication method {m!r}")
        out.append(m.lower())
    return ",".join(out)


# --------------------------------------------------------------------- hex


def parse_hex(value: str, *, field: str, length: int | None = None) -> bytes:
    """``1*(HEX HEX)``, case-insensitive; ``length`` = required octet count."""
    if not value:
        raise HeaderError(field, "empty hex value")
    # bytes.fromhex() would also skip white space: check every character.
    if _HEX_RE.fullmatch(value) is None:
        raise HeaderError(field, "non-hex character")
    if len(value) % 2:
        raise HeaderError(field, "odd number of hex digits")
    data = bytes.fromhex(value)
    if length is not None and len(data) != length:
        raise HeaderError(field, f"expected {length} octets, got {len(data)}")
    return data


def format_hex(data: bytes) -> str:
    """Lower-case hex (PROFILE §3)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LocalProtocolError("hex value must be bytes")
    if not data:
        raise LocalProtocolError("hex value must not be empty")
    return bytes(data).hex()


def parse_rand(value: str, *, field: str) -> bytes:
    """``mn-rand`` / ``hac-rand``: exactly 64 hex digits (§5.5.8)."""
    return parse_hex(value, field=field, length=RAND_LEN)


def format_rand(data: bytes) -> str:
    if len(data) != RAND_LEN:
        raise LocalProtocolError(f"rand must be {RAND_LEN} octets")
    return format_hex(data)


def parse_eap_payload(value: str, *, field: str = "eap-payload") -> bytes:
    """Hex of one whole EAP packet whose Length field matches (RFC 3748 §4)."""
    packet = parse_hex(value, field=field)
    if len(packet) < EAP_HEADER_LEN:
        raise HeaderError(field, "EAP packet shorter than 4 octets")
    declared = int.from_bytes(packet[2:4], "big")
    if declared != len(packet):
        raise HeaderError(field, f"EAP Length field {declared} does not match {len(packet)} octets")
    return packet


def format_eap_payload(packet: bytes) -> str:
    if len(packet) < EAP_HEADER_LEN or int.from_bytes(packet[2:4], "big") != len(packet):
        raise LocalProtocolError("eap-payload must be one whole EAP packet")
    return format_hex(packet)


# ------------------------------------------------------------ status-code


def parse_status(value: str, *, field: str = "status-code") -> int:
    """Three digits from the §5.5.4 list."""
    if len(value) != 3 or not _ascii_digits(value):
        raise HeaderError(field, "status code is not 3 digits")
    code = int(value)
    if code not in STATUS_CODES:
        raise HeaderError(field, f"unknown status code {code}")
    return code


def format_status(code: int) -> str:
    _check_int(code, "status code", 100, 999)
    if code not in STATUS_CODES:
        raise LocalProtocolError(f"unknown status code {code}")
    return str(code)


# ------------------------------------------------------------------- dates

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # datetime.weekday() order
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_RFC1123 = re.compile(
    r"(?P<wkday>[A-Za-z]{3}), (?P<day>[0-9]{2}) (?P<month>[A-Za-z]{3}) (?P<year>[0-9]{4}) "
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2}) GMT"
)


def parse_date(value: str, *, field: str) -> datetime:
    """RFC 1123 date (RFC 2616 §3.3.1), e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``.

    Returns a timezone-aware UTC datetime.  Names are case-sensitive as in
    RFC 2616, and the weekday must be the date's weekday.
    """
    m = _RFC1123.fullmatch(value)
    if m is None:
        raise HeaderError(field, "not an RFC 1123 date")
    if m["month"] not in _MONTHS:
        raise HeaderError(field, "unknown month name")
    if m["wkday"] not in _WEEKDAYS:
        raise HeaderError(field, "unknown weekday name")
    try:
        dt = datetime(
            int(m["year"]),
            _MONTHS.index(m["month"]) + 1,
            int(m["day"]),
            int(m["hour"]),
            int(m["minute"]),
            int(m["second"]),
            tzinfo=UTC,
        )
    except ValueError:
        raise HeaderError(field, "date out of range") from None
    if _WEEKDAYS[dt.weekday()] != m["wkday"]:
        raise HeaderError(field, "weekday does not match the date")
    return dt


def format_date(dt: datetime) -> str:
    """RFC 1123 form in GMT; sub-second parts are dropped.  Locale-independent."""
    if not isinstance(dt, datetime):
        raise LocalProtocolError("date must be a datetime")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise LocalProtocolError("date must be timezone-aware")
    u = dt.astimezone(UTC)
    # No strftime %a/%b: they follow the process locale.
    return (
        f"{_WEEKDAYS[u.weekday()]}, {u.day:02d} {_MONTHS[u.month - 1]} {u.year:04d} "
        f"{u.hour:02d}:{u.minute:02d}:{u.second:02d} GMT"
    )


# ------------------------------------------------------- SPI, SAS, port


def parse_spi(value: str, *, field: str = "mip6-spi") -> int:
    """Decimal 1..268435455 (§5.6.1)."""
    return _parse_uint(value, field, SPI_MIN, SPI_MAX)


def format_spi(spi: int) -> str:
    return str(_check_int(spi, "SPI", SPI_MIN, SPI_MAX))


def parse_sas(value: str, *, field: str = "mip6-sas") -> int:
    """The digit ``0`` or ``1`` (PROFILE §3: the RFC's letter "O" is malformed)."""
    if value == "0":
        return 0
    if value == "1":
        return 1
    raise HeaderError(field, "security association scope must be 0 or 1")


def format_sas(sas: int) -> str:
    return str(_check_int(sas, "mip6-sas", 0, 1))


def parse_port(value: str, *, field: str = "mip6-port") -> int:
    """Decimal 1..65535 (§5.7.2: ``1*5DIGIT``)."""
    return _parse_uint(value, field, PORT_MIN, PORT_MAX, max_digits=5)


def format_port(port: int) -> str:
    return str(_check_int(port, "port", PORT_MIN, PORT_MAX))


# ------------------------------------------------------------ ciphersuites

_CSUITE = r"\{[0-9A-Fa-f]{2},[0-9A-Fa-f]{2}\}"
_SUITE_RE = re.compile(r"\{([0-9A-Fa-f]{2}),([0-9A-Fa-f]{2})\}")
_SUITELIST_RE = re.compile(rf"[ \t]*{_CSUITE}(?:[ \t]*,[ \t]*{_CSUITE})*[ \t]*")


def parse_suite(value: str, *, field: str = "mip6-ciphersuite") -> int:
    """Exactly ``{HH,HH}`` -> 16-bit suite number.  Reserved values parse; policy rejects."""
    m = _SUITE_RE.fullmatch(value)
    if m is None:
        raise HeaderError(field, "ciphersuite is not of the form {HH,HH}")
    return (int(m[1], 16) << 8) | int(m[2], 16)


def format_suite(suite: int) -> str:
    """Upper-case hex as the RFC writes it (PROFILE §3): ``{00,2F}``."""
    v = _check_int(suite, "ciphersuite", 0, 0xFFFF)
    return f"{{{v >> 8:02X},{v & 0xFF:02X}}}"


def parse_suitelist(value: str, *, field: str = "mip6-suitelist") -> tuple[int, ...]:
    """``csuite *("," csuite)`` in MN preference order; spaces/tabs between tokens tolerated."""
    if _SUITELIST_RE.fullmatch(value) is None:
        raise HeaderError(field, "not a list of {HH,HH} ciphersuites")
    return tuple((int(m[1], 16) << 8) | int(m[2], 16) for m in _SUITE_RE.finditer(value))


def format_suitelist(suites: Iterable[int]) -> str:
    items = [format_suite(s) for s in suites]
    if not items:
        raise LocalProtocolError("suite list must not be empty")
    return ",".join(items)


# -------------------------------------------------------------- IP addresses


def parse_ip6(value: str, *, field: str) -> IPv6Address:
    """Any RFC 4291 §2.2 text form; zone identifiers (``%eth0``) are refused."""
    if _IP6_FULL_RE.fullmatch(value) is not None:
        # The canonical sender form: eight groups, the integer directly.
        return IPv6Address(int("".join([g.rjust(4, "0") for g in value.split(":")]), 16))
    if not value.isascii() or "%" in value:
        raise HeaderError(field, "not an IPv6 address")
    try:
        return IPv6Address(value)
    except ValueError:
        raise HeaderError(field, "not an IPv6 address") from None


def format_ip6(addr: IPv6Address) -> str:
    """Full 8-group form the §5.7 BNF requires: ``2001:db8:0:0:0:0:0:1``."""
    if not isinstance(addr, IPv6Address):
        raise LocalProtocolError("expected an IPv6Address")
    if addr.scope_id is not None:
        raise LocalProtocolError("IPv6 address with a zone id cannot be sent")
    return _IP6_FORMAT(*_UNPACK_8H(addr.packed))


def _split_prefix(value: str, field: str, max_len: int, max_digits: int) -> tuple[str, int]:
    addr, sep, length = value.partition("/")
    if not sep:
        raise HeaderError(field, "missing '/' prefix length")
    return addr, _parse_uint(length, field, 0, max_len, max_digits=max_digits)


def parse_ip6_prefix(value: str, *, field: str = "mip6-ip6-hnp") -> IPv6Network:
    """``addr/len``, len 0..128 (PROFILE §3 fixes the BNF's two-digit slip).

    Host bits set after the prefix are tolerated and cleared (the value is a
    network prefix; only its first ``len`` bits carry meaning).
    """
    addr, length = _split_prefix(value, field, 128, 3)
    n = int(parse_ip6(addr, field=field))
    # Clear the host bits here: the (int, len) form builds without re-checking.
    host = (1 << (128 - length)) - 1
    return IPv6Network((n & ~host, length))


def format_ip6_prefix(net: IPv6Network) -> str:
    if not isinstance(net, IPv6Network):
        raise LocalProtocolError("expected an IPv6Network")
    return f"{format_ip6(net.network_address)}/{net.prefixlen}"


def parse_ip4(value: str, *, field: str) -> IPv4Address:
    """``1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT`` (§5.7), each 0..255.

    Leading zeros are allowed by the BNF and read as decimal (never octal).
    """
    m = _IP4_RE.fullmatch(value)
    if m is not None:
        a, b, c, d = map(int, m.groups())
        if a <= 255 and b <= 255 and c <= 255 and d <= 255:
            return IPv4Address((a << 24) | (b << 16) | (c << 8) | d)
    # Not the plain form: part by part, so the error names the first problem.
    parts = value.split(".")
    if len(parts) != 4:
        raise HeaderError(field, "not a dotted-quad IPv4 address")
    n = 0
    for part in parts:
        if not 1 <= len(part) <= 3 or not _ascii_digits(part):
            raise HeaderError(field, "not a dotted-quad IPv4 address")
        octet = int(part)
        if octet > 255:
            raise HeaderError(field, "IPv4 address octet above 255")
        n = (n << 8) | octet
    return IPv4Address(n)


def format_ip4(addr: IPv4Address) -> str:
    if not isinstance(addr, IPv4Address):
        raise LocalProtocolError("expected an IPv4Address")
    return str(addr)


def parse_ip4_subnet(value: str, *, field: str = "mip6-ip4-hnp") -> IPv4Network:
    """``ip4-addr "/" 1*2DIGIT``, len 0..32; host bits are cleared as for IPv6."""
    addr, length = _split_prefix(value, field, 32, 2)
    n = int(parse_ip4(addr, field=field))
    host = (1 << (32 - length)) - 1  # cleared here, as for IPv6
    return IPv4Network((n & ~host, length))


def format_ip4_subnet(net: IPv4Network) -> str:
    if not isinstance(net, IPv4Network):
        raise LocalProtocolError("expected an IPv4Network")
    return f"{net.network_address}/{net.prefixlen}"
