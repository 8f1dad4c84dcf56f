"""TV-header content of an MHAuth container (RFC 6618 §5.2, §5.5; PROFILE §3).

Content is ``name ":" value CRLF`` lines followed by one empty line.  The
parser keeps the raw octets, because ``auth`` is an HMAC over exactly the
octets received (PROFILE §3: never over a re-encoding).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from mipsec.core.errors import HeaderError, LocalProtocolError

__all__ = [
    "AUTH_HEADER",
    "AUTH_HEX_LEN",
    "LABEL_HAC",
    "LABEL_MN",
    "ParsedContent",
    "compute_auth",
    "encode_content",
    "encode_content_with_auth",
    "parse_content",
    "verify_auth",
]

LABEL_MN = b"MN"  # PROFILE §3: label of MN -> HAC messages
LABEL_HAC = b"HAC"  # PROFILE §3: label of HAC -> MN messages
AUTH_HEADER = "auth"
AUTH_HEX_LEN = 64  # HMAC-SHA256 = 32 octets = 64 hex digits
_UTF8_HEADER = "mn-id"  # the one value that may be UTF-8 (RFC 7542, PROFILE §3)

CRLF = b"\r\n"
_OWS = b" \t"
# Character checks as regexes: a per-character generator was the largest
# single cost of parsing and encoding (both run for every message).
_TOKEN_RE = re.compile(rb"[A-Za-z0-9-]+")
_PRINTABLE_RE = re.compile(rb"[\x20-\x7e]*")  # printable ASCII, PROFILE §3
_HEX_RE = re.compile(r"[0-9a-fA-F]*")


@dataclass(frozen=True, slots=True, repr=False)
class ParsedContent:
    """A parsed content: header list plus the raw octets the MAC covers."""

    headers: tuple[tuple[str, str], ...]
    raw: bytes
    msg_octets: bytes
    auth: str | None

    def get(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()
        return any(n == name for n, _ in self.headers)

    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.headers)

    def __repr__(self) -> str:
        # Values may be SA keys (RFC 6618 §5.6.2): show only the names.
        return f"ParsedContent(names={self.names()!r}, octets={len(self.raw)})"


def _is_token(name: bytes) -> bool:
    return _TOKEN_RE.fullmatch(name) is not None


def _has_control(text: str) -> bool:
    # Category Cc = C0 controls, DEL and C1 controls.
    return any(unicodedata.category(c) == "Cc" for c in text)


def _decode_value(name: str, value: bytes) -> str:
    """Check the octets of a stripped value (PROFILE §3) and decode them."""
    if name == _UTF8_HEADER:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise HeaderError(name, "value is not valid UTF-8") from None
        if _has_control(text):
            raise HeaderError(name, "control character in value")
        return text
    if _PRINTABLE_RE.fullmatch(value) is None:
        raise HeaderError(name, "value is not printable ASCII")
    return value.decode("ascii")


def parse_content(content: bytes) -> ParsedContent:
    """Parse one container's content into headers, keeping the raw octets."""
    raw = bytes(content)
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    auth: str | None = None
    auth_offset: int | None = None
    pos = 0
    end = len(raw)
    while pos < end:  # the final empty line is optional (PROFILE §3)
        eol = raw.find(CRLF, pos)
        if eol < 0:
            raise HeaderError("content", "line not terminated by CRLF")
        line = raw[pos:eol]
        if not line:
            # End of message (§5.5.7); nothing may follow it (PROFILE §3).
            if eol + 2 != end:
                raise HeaderError("content", "octets after the final empty line")
            break
        if b"\r" in line or b"\n" in line:
            raise HeaderError("content", "bare CR or LF")
        colon = line.find(b":")
        if colon < 0:
            raise HeaderError("content", "line without ':'")
        raw_name = line[:colon]
        if not raw_name:
            raise HeaderError("content", "empty header name")
        if not _is_token(raw_name):
            raise HeaderError("content", "invalid character in header name")
        name = raw_name.decode("ascii").lower()
        if name in seen:
            raise HeaderError(name, "duplicate header")
        if auth_offset is not None:
            # §5.5.5: auth MUST be the last TV-header.
            raise HeaderError(AUTH_HEADER, "auth is not the last header")
        seen.add(name)
        value = _decode_value(name, line[colon + 1 :].strip(_OWS))
        if name == AUTH_HEADER:
            auth_offset = pos
            auth = value.lower()
        headers.append((name, value))
        pos = eol + 2
    return ParsedContent(
        headers=tuple(headers),
        raw=raw,
        msg_octets=raw if auth_offset is None else raw[:auth_offset],
        auth=auth,
    )


def _encode_lines(headers: Iterable[tuple[str, str]], *, allow_auth: bool) -> bytes:
    out = bytearray()
    seen: set[str] = set()
    auth_seen = False
    for name, value in headers:
        raw_name = name.encode("ascii", "replace")
        if not _is_token(raw_name):
            raise LocalProtocolError(f"invalid header name {name!r}")
        lname = name.lower()
        if lname in seen:
            raise LocalProtocolError(f"duplicate header {lname!r}")
        if auth_seen:
            raise LocalProtocolError("auth must be the last header")
        if lname == AUTH_HEADER:
            if not allow_auth:
                raise LocalProtocolError("auth is computed by encode_content_with_auth")
            auth_seen = True
        seen.add(lname)
        # Values are never echoed in the errors below: they may be keys.
        if value != value.strip(" \t"):
            raise LocalProtocolError(f"{lname}: value has surrounding whitespace")
        try:
            raw_value = value.encode("utf-8")
        except UnicodeEncodeError:
            raise LocalProtocolError(f"{lname}: value is not encodable as UTF-8") from None
        try:
            _decode_value(lname, raw_value)
        except HeaderError as exc:
            raise LocalProtocolError(f"{lname}: {exc.reason}") from None
        out += lname.encode("ascii") + b": " + raw_value + CRLF
    return bytes(out)


def encode_content(headers: Iterable[tuple[str, str]]) -> bytes:
    """Emit exactly ``name: value CRLF`` per header, then the empty line.

    Names are written lower case (PROFILE §3).  ``auth`` is accepted only as
    the last header; normally use :func:`encode_content_with_auth`.
    """
    return _encode_lines(headers, allow_auth=True) + CRLF


def compute_auth(key: bytes, label: bytes, msg_octets: bytes, cb_octets: bytes) -> bytes:
    """``HMAC-SHA256(key, label | msg-octets | CB-octets)`` (PROFILE §3), raw."""
    mac = hmac.new(key, label, hashlib.sha256)
    mac.update(msg_octets)
    mac.update(cb_octets)
    return mac.digest()


def verify_auth(key: bytes, label: bytes, parsed: ParsedContent, cb_octets: bytes) -> bool:
    """Check ``auth`` over the raw received ``msg_octets`` in constant time."""
    received = parsed.auth
    if received is None or len(received) != AUTH_HEX_LEN or _HEX_RE.fullmatch(received) is None:
        return False
    expected = compute_auth(key, label, parsed.msg_octets, cb_octets)
    return hmac.compare_digest(expected, bytes.fromhex(received))


def encode_content_with_auth(
    headers: Iterable[tuple[str, str]], key: bytes, label: bytes, cb_octets: bytes
) -> bytes:
    """Encode ``headers``, then append ``auth`` computed over exactly those octets."""
    msg_octets = _encode_lines(headers, allow_auth=False)
    tag = compute_auth(key, label, msg_octets, cb_octets).hex()
    return msg_octets + b"auth: " + tag.encode("ascii") + CRLF + CRLF
