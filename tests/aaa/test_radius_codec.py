"""RADIUS codec (mipsec.aaa.codec) and MS-MPPE key recovery (mipsec.aaa.mppe)."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyrad.packet import AuthPacket
from radfake import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    ACCESS_REJECT,
    ACCOUNTING_RESPONSE,
    attr,
    build_reply,
    eap_attrs,
    hide_mppe,
    request_attrs,
    request_eap,
    request_ma_ok,
    vsa,
)

from mipsec.aaa.codec import (
    EAP_CHUNK,
    RadiusCode,
    RadiusWireError,
    ReplyVerifyError,
    answers_authenticator,
    decode_reply,
    encode_access_request,
    encode_accounting_request,
    join_eap,
    split_eap,
    verify_reply,
)
from mipsec.aaa.dictionary import load_dictionary
from mipsec.aaa.mppe import MppeError, hide_key, recover_key
from mipsec.core.errors import LocalProtocolError

SECRET = b"s3cret"


def _req(eap: bytes = b"\x02\x01\x00\x06\x01a", **kw: object):  # type: ignore[no-untyped-def]
    return encode_access_request(
        42,
        SECRET,
        [("User-Name", "alice@example.net")],
        eap=eap,
        **kw,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------ EAP-Message


@given(st.binary(min_size=1, max_size=5000))
def test_split_join_roundtrip(eap: bytes) -> None:
    chunks = split_eap(eap)
    assert join_eap(chunks) == eap
    assert all(len(c) == EAP_CHUNK for c in chunks[:-1])
    assert 1 <= len(chunks[-1]) <= EAP_CHUNK


def test_split_refuses_empty() -> None:
    with pytest.raises(LocalProtocolError):
        split_eap(b"")


# ------------------------------------------------------------------ requests


def test_access_request_layout() -> None:
    eap = bytes([2, 7]) + (1300).to_bytes(2, "big") + bytes(range(256)) * 5 + bytes(16)
    eap = eap[:1300]
    req = encode_access_request(
        9,
        SECRET,
        [("User-Name", "alice"), ("NAS-Identifier", "hac1"), ("Framed-MTU", 1400)],
        eap=eap,
        state=b"opaque-state",
    )
    assert req.code is RadiusCode.ACCESS_REQUEST and req.identifier == 9
    assert req.raw[0] == 1 and req.raw[1] == 9 and req.raw[4:20] == req.authenticator
    attrs = request_attrs(req.raw)
    assert attrs[0][0] == 80, "Message-Authenticator first"
    assert request_ma_ok(req.raw, SECRET)
    assert not request_ma_ok(req.raw, b"other")
    types = [t for t, _ in attrs]
    eap_at = [i for i, t in enumerate(types) if t == 79]
    assert eap_at == list(range(eap_at[0], eap_at[0] + 6)), "consecutive, in order"
    assert request_eap(req.raw) == eap
    assert (24, b"opaque-state") in attrs
    assert (1, b"alice") in attrs and (32, b"hac1") in attrs
    assert (12, (1400).to_bytes(4, "big")) in attrs


def test_access_request_authenticator_is_random_and_verified_by_pyrad() -> None:
    a, b = _req(), _req()
    assert a.authenticator != b.authenticator
    pkt = AuthPacket(packet=a.raw, dict=load_dictionary(), secret=SECRET)
    assert pkt.verify_message_authenticator()
    assert pkt["User-Name"] == ["alice@example.net"]


def test_request_too_big_for_radius() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds 4096"):
        _req(eap=b"\x02\x01" + bytes(4200))


def test_identifier_range() -> None:
    with pytest.raises(LocalProtocolError):
        encode_access_request(256, SECRET, [])


def test_accounting_request_authenticator() -> None:
    req = encode_accounting_request(
        3, SECRET, [("Acct-Status-Type", 1), ("Acct-Session-Id", "0000abcd")]
    )
    raw = req.raw
    # RFC 2866 §3: MD5(Code+Identifier+Length+16 zero octets+Attributes+Secret).
    assert raw[4:20] == hashlib.md5(raw[:4] + bytes(16) + raw[20:] + SECRET).digest()
    assert (44, b"0000abcd") in request_attrs(raw)
    reply = build_reply(ACCOUNTING_RESPONSE, raw, SECRET, ma="none")
    assert decode_reply(reply, req, SECRET).code is RadiusCode.ACCOUNTING_RESPONSE
    # An Accounting-Response may carry a Message-Authenticator: zero vector.
    reply = build_reply(ACCOUNTING_RESPONSE, raw, SECRET, ma="zero-vector")
    assert decode_reply(reply, req, SECRET).code is RadiusCode.ACCOUNTING_RESPONSE


# ------------------------------------------------------------------ replies


def test_challenge_decoded() -> None:
    req = _req()
    eap = bytes([1, 5]) + (600).to_bytes(2, "big") + bytes([13]) + os.urandom(595)
    reply = build_reply(ACCESS_CHALLENGE, req.raw, SECRET, eap_attrs(eap) + attr(24, b"st-1"))
    r = decode_reply(reply + b"\x00\x00padding", req, SECRET)  # padding is ignored
    assert r.code is RadiusCode.ACCESS_CHALLENGE
    assert r.eap_message == eap and r.state == b"st-1"
    assert r.mppe_recv_key is None and r.mppe_error is None


@pytest.mark.parametrize(
    ("ma", "resp_auth", "kind"),
    [
        ("none", "good", "no-message-authenticator"),
        ("bad", "good", "message-authenticator"),
        ("zero-vector", "good", "message-authenticator"),
        ("good", "bad", "response-authenticator"),
    ],
)
@pytest.mark.parametrize("code", [ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE])
def test_unverifiable_replies(code: int, ma: str, resp_auth: str, kind: str) -> None:
    req = _req()
    raw = build_reply(
        code, req.raw, SECRET, eap_attrs(b"\x03\x01\x00\x04"), ma=ma, resp_auth=resp_auth
    )
    with pytest.raises(ReplyVerifyError) as exc:
        verify_reply(raw, req, SECRET)
    assert exc.value.kind == kind


def test_wrong_secret_reply() -> None:
    req = _req()
    raw = build_reply(ACCESS_ACCEPT, req.raw, b"not-the-secret")
    with pytest.raises(ReplyVerifyError):
        verify_reply(raw, req, SECRET)


def test_proxy_state_never_sent_is_refused() -> None:
    req = _req()
    raw = build_reply(ACCESS_ACCEPT, req.raw, SECRET, attr(33, b"blast"))
    with pytest.raises(ReplyVerifyError) as exc:
        verify_reply(raw, req, SECRET)
    assert exc.value.kind == "proxy-state"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r[:19], "radius.length"),
        (lambda r: r[:2] + (len(r) + 1).to_bytes(2, "big") + r[4:], "radius.length"),
        (lambda r: r[:2] + (19).to_bytes(2, "big") + r[4:], "radius.length"),
        (lambda r: bytes([4]) + r[1:], "radius.code"),
        (lambda r: bytes([5]) + r[1:], "radius.code"),
        (lambda r: bytes([99]) + r[1:], "radius.code"),
        (lambda r: r[:1] + bytes([r[1] ^ 1]) + r[2:], "radius.identifier"),
    ],
)
def test_malformed_replies(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    req = _req()
    raw = build_reply(ACCESS_ACCEPT, req.raw, SECRET)
    with pytest.raises(RadiusWireError) as exc:
        verify_reply(mutate(raw), req, SECRET)
    assert exc.value.field == field


def test_attribute_overrun_and_duplicates() -> None:
    req = _req()
    # An attribute whose Length runs past the packet.
    raw = build_reply(ACCESS_ACCEPT, req.raw, SECRET, bytes([18, 40]) + b"x" * 10)
    with pytest.raises(RadiusWireError, match="overruns"):
        verify_reply(raw, req, SECRET)
    raw = build_reply(ACCESS_ACCEPT, req.raw, SECRET, attr(80, bytes(16)))
    with pytest.raises(RadiusWireError, match="more than one"):
        verify_reply(raw, req, SECRET)
    split = attr(79, b"\x01\x01") + attr(18, b"hi") + attr(79, b"\x00\x05\x04")
    raw = build_reply(ACCESS_CHALLENGE, req.raw, SECRET, split)
    with pytest.raises(RadiusWireError, match="consecutive"):
        verify_reply(raw, req, SECRET)


@given(st.binary(max_size=300))
def test_random_replies_only_raise_wire_errors(junk: bytes) -> None:
    req = _req()
    for raw in (junk, bytes([2, 42]) + (20 + len(junk)).to_bytes(2, "big") + bytes(16) + junk):
        try:
            decode_reply(raw, req, SECRET)
        except RadiusWireError:
            pass


# ------------------------------------------------------------------ MPPE keys


def test_accept_with_mppe_keys_gives_both_halves() -> None:
    req = _req()
    recv, send = os.urandom(32), os.urandom(32)
    attrs = (
        eap_attrs(b"\x03\x01\x00\x04")
        + vsa(311, 17, hide_mppe(recv, SECRET, req.authenticator, b"\x81\x02"))
        + vsa(311, 16, hide_mppe(send, SECRET, req.authenticator, b"\x93\x44"))
        + attr(1, b"alice@example.net")
    )
    r = decode_reply(build_reply(ACCESS_ACCEPT, req.raw, SECRET, attrs), req, SECRET)
    assert r.mppe_recv_key == recv and r.mppe_send_key == send
    assert r.user_name() == "alice@example.net"
    assert repr(recv) not in repr(r) and recv.hex() not in repr(r)  # keys stay out of repr


def test_accept_with_broken_mppe_key_reports_why() -> None:
    req = _req()
    broken = b"\x80\x01" + os.urandom(47)  # random octets: Key-Length or padding is wrong
    attrs = vsa(311, 17, broken) + vsa(311, 16, broken)
    r = decode_reply(build_reply(ACCESS_ACCEPT, req.raw, SECRET, attrs), req, SECRET)
    assert r.mppe_recv_key is None and r.mppe_error is not None
    assert "MS-MPPE" in r.mppe_error


@given(st.binary(min_size=1, max_size=239), st.binary(min_size=16, max_size=16))
def test_mppe_roundtrip(key: bytes, req_auth: bytes) -> None:
    hidden = hide_key(key, SECRET, req_auth)
    assert hidden[0] & 0x80
    assert recover_key(hidden, SECRET, req_auth) == key


def test_mppe_matches_independent_encoder() -> None:
    req_auth = os.urandom(16)
    for n in (16, 32, 48, 64):
        key = os.urandom(n)
        assert recover_key(hide_mppe(key, SECRET, req_auth), SECRET, req_auth) == key
        assert hide_key(key, SECRET, req_auth, b"\x80\x01") == hide_mppe(key, SECRET, req_auth)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b"\x80\x01" + bytes(15), "not a 2-octet salt"),
        (b"\x80\x01" + bytes(17), "not a 2-octet salt"),
        (b"\x00\x01" + bytes(16), "most significant bit"),
    ],
)
def test_mppe_malformed(value: bytes, match: str) -> None:
    with pytest.raises(MppeError, match=match):
        recover_key(value, SECRET, bytes(16))


def test_mppe_wrong_secret_or_authenticator_detected() -> None:
    # Fixed inputs: with random ones a wrong secret can, once in 256 tries,
    # produce Key-Length 47 and no padding to check (then the key is garbage;
    # the reply's Message-Authenticator is what proves the secret).
    req_auth = bytes(range(16))
    key = bytes(range(100, 132))
    hidden = hide_key(key, SECRET, req_auth, b"\x80\x01")
    with pytest.raises(MppeError):
        recover_key(hidden, b"wrong", req_auth)
    with pytest.raises(MppeError):
        recover_key(hidden, SECRET, bytes(16))
    for _ in range(200):  # never the real key
        try:
            assert recover_key(hidden, os.urandom(8), req_auth) != key
        except MppeError:
            pass
    # Key-Length larger than what follows it.
    plain_len_too_big = hide_mppe(bytes(15), SECRET, req_auth)
    tampered = bytearray(plain_len_too_big)
    tampered[2] ^= 0x20  # flips Key-Length to 47
    with pytest.raises(MppeError, match="Key-Length"):
        recover_key(bytes(tampered), SECRET, req_auth)


def test_answers_authenticator_tells_a_late_reply_from_a_forgery() -> None:
    """What the client uses to name a reply that lands on a reused
    Identifier: one to the earlier request (its Request Authenticator) under
    our secret is a late reply; another secret, another request, or a
    packet whose Length is wrong is not."""
    earlier, now = _req(), _req()
    reply = build_reply(ACCESS_CHALLENGE, earlier.raw, SECRET, eap_attrs(b"\x01\x02\x00\x04"))
    assert answers_authenticator(reply, earlier.authenticator, SECRET)
    assert answers_authenticator(reply + b"\0" * 3, earlier.authenticator, SECRET)  # padding
    assert not answers_authenticator(reply, now.authenticator, SECRET)
    assert not answers_authenticator(reply, earlier.authenticator, b"other")
    forged = build_reply(ACCESS_CHALLENGE, earlier.raw, b"other", eap_attrs(b"\x01\x02\x00\x04"))
    assert not answers_authenticator(forged, earlier.authenticator, SECRET)
    assert not answers_authenticator(reply[:19], earlier.authenticator, SECRET)
    assert not answers_authenticator(reply[:4] + reply[4:-1], earlier.authenticator, SECRET)
