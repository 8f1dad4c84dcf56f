"""TV-header content and the auth MAC (RFC 6618 §5.2, §5.5; PROFILE §3)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.errors import HeaderError, LocalProtocolError
from mipsec.core.wire.tvheader import (
    LABEL_HAC,
    LABEL_MN,
    compute_auth,
    encode_content,
    encode_content_with_auth,
    parse_content,
    verify_auth,
)

RAND = "00112233445566778899aabbccddeeff" * 2
KEY = b"correct horse battery staple"
CB = bytes(range(32))  # stand-in tls-server-end-point hash


# ------------------------------------------------------------------ parsing


def test_parse_hand_vector() -> None:
    raw = b"mn-id: alice@home.example\r\nauth-method: psk\r\n\r\n"
    p = parse_content(raw)
    assert p.headers == (("mn-id", "alice@home.example"), ("auth-method", "psk"))
    assert p.raw == raw
    assert p.msg_octets == raw  # no auth: everything
    assert p.auth is None
    assert p.get("MN-ID") == "alice@home.example"
    assert "Auth-Method" in p and "auth" not in p
    assert p.names() == ("mn-id", "auth-method")


def test_names_lowercased_values_stripped() -> None:
    p = parse_content(b"MN-Rand:\t " + RAND.upper().encode() + b" \t\r\nX-Foo:bar\r\n\r\n")
    assert p.headers == (("mn-rand", RAND.upper()), ("x-foo", "bar"))


def test_final_empty_line_optional() -> None:
    assert parse_content(b"a: 1\r\n").headers == (("a", "1"),)


def test_empty_value_allowed_at_tv_level() -> None:
    assert parse_content(b"a:\r\n\r\n").headers == (("a", ""),)


def test_msg_octets_stop_at_auth_line() -> None:
    body = b"mn-rand: " + RAND.encode() + b"\r\n"
    raw = body + b"AUTH: " + b"AB" * 32 + b"\r\n\r\n"
    p = parse_content(raw)
    assert p.msg_octets == body
    assert p.auth == "ab" * 32


def test_duplicate_header() -> None:
    with pytest.raises(HeaderError) as ei:
        parse_content(b"mn-id: a\r\nMN-ID: b\r\n\r\n")
    assert ei.value.field == "mn-id"
    assert "duplicate" in ei.value.reason


def test_auth_not_last() -> None:
    with pytest.raises(HeaderError) as ei:
        parse_content(b"auth: " + b"00" * 32 + b"\r\nmn-id: a\r\n\r\n")
    assert ei.value.field == "auth"


def test_bytes_after_final_empty_line() -> None:
    with pytest.raises(HeaderError) as ei:
        parse_content(b"a: 1\r\n\r\nx")
    assert ei.value.field == "content"
    with pytest.raises(HeaderError):
        parse_content(b"a: 1\r\n\r\n\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"a: 1\nb: 2\r\n\r\n",  # bare LF
        b"a: 1\rb: 2\r\n\r\n",  # bare CR
        b"a: 1",  # unterminated line
        b"a: 1\r\n\r",  # unterminated end
        b"a: 1\r\n\n",
    ],
)
def test_bare_cr_lf_and_unterminated(raw: bytes) -> None:
    with pytest.raises(HeaderError) as ei:
        parse_content(raw)
    assert ei.value.field == "content"


@pytest.mark.parametrize(
    "raw",
    [
        b"no colon here\r\n\r\n",
        b": value\r\n\r\n",  # empty name
        b"mn id: a\r\n\r\n",  # space in name
        b"mn-id : a\r\n\r\n",  # space before colon
        b" mn-id: a\r\n\r\n",  # folded / leading space
        b"mn_id: a\r\n\r\n",  # '_' not a token char here
        b"m\xc3\xa9: a\r\n\r\n",  # non-ASCII name
    ],
)
def test_bad_lines_and_names(raw: bytes) -> None:
    with pytest.raises(HeaderError) as ei:
        parse_content(raw)
    assert ei.value.field == "content"


@pytest.mark.parametrize(
    "value",
    [b"caf\xc3\xa9", b"a\x00b", b"a\x7fb", b"a\tb", b"\xff"],
)
def test_non_ascii_or_control_value_rejected(value: bytes) -> None:
    with pytest.raises(HeaderError) as ei:
        parse_content(b"mip6-spi: " + value + b"\r\n\r\n")
    assert ei.value.field == "mip6-spi"


def test_mn_id_utf8_accepted() -> None:
    p = parse_content("mn-id: jürgen@bücher.example\r\n\r\n".encode())
    assert p.get("mn-id") == "jürgen@bücher.example"


@pytest.mark.parametrize("value", [b"\xc3(", b"a\xc2\x85b", b"a\x01b", b"\xed\xa0\x80"])
def test_mn_id_bad_utf8_or_control(value: bytes) -> None:
    with pytest.raises(HeaderError) as ei:
        parse_content(b"mn-id: " + value + b"\r\n\r\n")
    assert ei.value.field == "mn-id"


def test_repr_hides_values() -> None:
    p = parse_content(b"mip6-mn-to-ha-ikey: deadbeefcafe\r\n\r\n")
    assert "deadbeef" not in repr(p)
    assert "mip6-mn-to-ha-ikey" in repr(p)


# ----------------------------------------------------------------- encoding


def test_encode_exact_bytes() -> None:
    out = encode_content([("mn-id", "alice@home.example"), ("Auth-Method", "psk,eap")])
    assert out == b"mn-id: alice@home.example\r\nauth-method: psk,eap\r\n\r\n"


def test_encode_utf8_mn_id() -> None:
    assert encode_content([("mn-id", "é@x")]) == "mn-id: é@x\r\n\r\n".encode()


@pytest.mark.parametrize(
    "headers",
    [
        [("bad name", "x")],
        [("", "x")],
        [("a", "x"), ("A", "y")],
        [("a", " padded")],
        [("a", "tab\tinside")],
        [("a", "caf\u00e9")],
        [("a", "line\r\nbreak")],
        [("mn-id", "a\x00b")],
        [("mn-id", "\udcff")],
        [("auth", "00"), ("a", "b")],
    ],
)
def test_encode_rejects_what_parser_rejects(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_content(headers)


def test_encode_with_auth_rejects_explicit_auth() -> None:
    with pytest.raises(LocalProtocolError):
        encode_content_with_auth([("auth", "00")], KEY, LABEL_MN, CB)


# ---------------------------------------------------------------------- auth


def test_compute_auth_known_vector() -> None:
    msg = b"mn-rand: " + RAND.encode() + b"\r\nhac-rand: " + RAND.encode() + b"\r\n"
    expected = hmac.new(KEY, b"HAC" + msg + CB, hashlib.sha256).digest()
    assert compute_auth(KEY, LABEL_HAC, msg, CB) == expected
    assert len(expected) == 32


def test_encode_with_auth_known_bytes() -> None:
    headers = [("mn-rand", RAND), ("auth-method", "psk")]
    body = b"mn-rand: " + RAND.encode() + b"\r\nauth-method: psk\r\n"
    tag = hmac.new(KEY, b"MN" + body + CB, hashlib.sha256).hexdigest()
    out = encode_content_with_auth(headers, KEY, LABEL_MN, CB)
    assert out == body + b"auth: " + tag.encode() + b"\r\n\r\n"
    p = parse_content(out)
    assert p.msg_octets == body
    assert verify_auth(KEY, LABEL_MN, p, CB)


def test_verify_uses_raw_received_octets() -> None:
    # Odd spacing, tabs, upper-case names and hex: a re-encoding would differ,
    # the MAC must still verify because it covers the octets as received.
    body = b"MN-Rand:\t" + RAND.upper().encode() + b"  \r\nX-Unknown:zz\r\n"
    tag = hmac.new(KEY, b"HAC" + body + CB, hashlib.sha256).hexdigest().upper()
    raw = body + b"Auth:   " + tag.encode() + b"\r\n"
    p = parse_content(raw)
    assert verify_auth(KEY, LABEL_HAC, p, CB)
    # The canonical re-encoding differs from the received octets.
    assert encode_content(p.headers[:-1])[:-2] != body


def test_verify_fails_on_wrong_key_label_cb_or_tamper() -> None:
    out = encode_content_with_auth([("mn-id", "a@b")], KEY, LABEL_MN, CB)
    p = parse_content(out)
    assert verify_auth(KEY, LABEL_MN, p, CB)
    assert not verify_auth(KEY + b"x", LABEL_MN, p, CB)
    assert not verify_auth(KEY, LABEL_HAC, p, CB)
    assert not verify_auth(KEY, LABEL_MN, p, CB[:-1] + b"\x00")
    tampered = parse_content(out.replace(b"a@b", b"a@c"))
    assert not verify_auth(KEY, LABEL_MN, tampered, CB)


@pytest.mark.parametrize("value", [None, "ab" * 31, "ab" * 33, "zz" * 32, "00" * 32 + "0"])
def test_verify_false_on_missing_or_malformed_auth(value: str | None) -> None:
    raw = b"mn-id: a\r\n" + (b"" if value is None else b"auth: " + value.encode() + b"\r\n")
    assert not verify_auth(KEY, LABEL_MN, parse_content(raw), CB)


# ------------------------------------------------------------ property tests

_name = st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True).filter(lambda n: n != "auth")
_ascii_value = st.from_regex(r"[\x20-\x7e]{0,40}", fullmatch=True).map(lambda s: s.strip(" \t"))
_utf8_value = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")),
    max_size=30,
).map(lambda s: s.strip(" \t"))


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    names = draw(st.lists(_name, unique=True, max_size=8))
    if "mn-id" not in names and draw(st.booleans()):
        names.append("mn-id")
    out = []
    for n in names:
        out.append((n, draw(_utf8_value if n == "mn-id" else _ascii_value)))
    return out


@settings(max_examples=200, deadline=None)
@given(headers=header_lists())
def test_encode_parse_roundtrip(headers: list[tuple[str, str]]) -> None:
    raw = encode_content(headers)
    p = parse_content(raw)
    assert list(p.headers) == headers
    assert p.auth is None
    assert encode_content(p.headers) == raw


@settings(max_examples=200, deadline=None)
@given(headers=header_lists(), key=st.binary(max_size=64), cb=st.binary(max_size=64))
def test_auth_roundtrip(headers: list[tuple[str, str]], key: bytes, cb: bytes) -> None:
    p = parse_content(encode_content_with_auth(headers, key, LABEL_HAC, cb))
    assert list(p.headers[:-1]) == headers
    assert verify_auth(key, LABEL_HAC, p, cb)
    assert not verify_auth(key, LABEL_MN, p, cb)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_parse_arbitrary_bytes_only_raises_header_error(raw: bytes) -> None:
    try:
        p = parse_content(raw)
    except HeaderError:
        return
    assert p.raw == raw
    assert raw.startswith(p.msg_octets)
