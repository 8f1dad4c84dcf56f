"""TV-header content of an MHAuth container (RFC 6618 §5.2, §5.5; PROFILE §3).

Content is ``name ":" value CRLF`` lines followed by one empty line.  The
parser keeps the raw octets, because ``auth`` is an HMAC over exactly the
octets received (PROFILE §3: never over a re-encoding).
"""

from __future__ import annotations

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
# Fast paths for the common case, checked with one regex over a whole
# content: every line ``token ":" value CRLF`` with printable-ASCII octets and
# no tab.  Such a content passes every per-line check of PROFILE §3 except
# the duplicate/auth-last rules (checked separately); anything else (tabs,
# UTF-8 mn-id, errors) takes the general line-by-line path, so the accepted
# set and the errors raised are exactly the general path's.
_FAST_CONTENT_RE = re.compile(rb"((?:[A-Za-z0-9-]+:[\x20-\x7e]*\r\n)*)(?:\r\n)?")
# Sender side: lower-case names, one space, a value without surrounding blanks.
_FAST_LINES_RE = re.compile(r"(?:[a-z0-9-]+: (?:[!-~](?:[ -~]*[!-~])?)?\r\n)*")
_FAST_NAMES_RE = re.compile(r"[A-Za-z0-9-]+(?:\n[A-Za-z0-9-]+)*")


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


def _parse_fast(raw: bytes) -> ParsedContent | None:
    """The common printable-ASCII form in a few C calls; None: use the general parser."""
    m = _FAST_CONTENT_RE.fullmatch(raw)
    if m is None:
        return None
    block = m.group(1)
    if not block:
        return ParsedContent(headers=(), raw=raw, msg_octets=raw, auth=None)
    lines = block.decode("ascii").split("\r\n")
    del lines[-1]  # the block ends with CRLF
    headers = [(n.lower(), v.strip(" ")) for n, _, v in [line.partition(":") for line in lines]]
    names = {n for n, _ in headers}
    if len(names) != len(headers):
        return None  # duplicate: the general parser names it
    last_name, last_value = headers[-1]
    if last_name == AUTH_HEADER:
        # §5.5.5: msg-octets end where the (last) auth line starts.
        msg_octets = raw[: len(block) - len(lines[-1]) - 2]
        return ParsedContent(tuple(headers), raw, msg_octets, last_value.lower())
    if AUTH_HEADER in names:
        return None  # auth is not the last header
    return ParsedContent(tuple(headers), raw, raw, None)


def parse_content(content: bytes) -> ParsedContent:
    """Parse one container's content into headers, keeping the raw octets."""
    raw = bytes(content)
    fast = _parse_fast(raw)
    if fast is not None:
        return fast
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


def _encode_fast(headers: Iterable[tuple[str, str]], allow_auth: bool) -> bytes | None:
    """Canonical printable-ASCII headers checked with two regexes; None: general path."""
    items = headers if isinstance(headers, list | tuple) else list(headers)
    if not items:
        return b""
    names = [n for n, _ in items]
    lnames = "\n".join(names).lower()
    if _FAST_NAMES_RE.fullmatch(lnames) is None or not "".join(names).isascii():
        return None
    lower = lnames.split("\n")
    if len(lower) != len(items) or len(set(lower)) != len(lower):
        return None
    if AUTH_HEADER in lower and (not allow_auth or lower.index(AUTH_HEADER) != len(lower) - 1):
        return None
    parts: list[str] = []
    for n, (_, v) in zip(lower, items, strict=True):
        parts += (n, ": ", v, "\r\n")
    text = "".join(parts)
    # The count rules out a value that smuggles in a CRLF (and a line of its own).
    if text.count("\n") != len(items) or _FAST_LINES_RE.fullmatch(text) is None:
        return None
    return text.encode("ascii")


def _encode_lines(headers: Iterable[tuple[str, str]], *, allow_auth: bool) -> bytes:
    if not isinstance(headers, list | tuple):
        headers = list(headers)
    fast = _encode_fast(headers, allow_auth)
    if fast is not None:
        return fast
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
    # One-shot C HMAC: a fraction of the cost of an hmac.HMAC object.
    return hmac.digest(key, b"".join((label, msg_octets, cb_octets)), "sha256")


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
