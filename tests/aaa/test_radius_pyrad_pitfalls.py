"""Regression tests for the pyrad traps DESIGN.md lists, checked against the
installed pyrad's actual behaviour and against the path mipsec.aaa takes.

1. A reply's Message-Authenticator is computed with the Request
   Authenticator of the request (RFC 3579 §3.2), not the reply's own
   Authenticator field.
2. A 32-octet MS-MPPE key is recovered whole (pyrad < 2.6 chained the
   decryption on its own output: only the first 15 octets came out right).
3. An EAP-Message chunk whose octets begin with ``0x`` followed by hex
   digits is sent as it is (pyrad's ``octets`` encoder unhexes it).
4. A dictionary that declares EAP-Message as ``string`` is refused.
"""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from pyrad import tools
from pyrad.dictionary import Dictionary
from pyrad.packet import AuthPacket, Packet
from radfake import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    build_reply,
    eap_attrs,
    hide_mppe,
    request_eap,
    vsa,
)

from mipsec.aaa.codec import ReplyVerifyError, decode_reply, encode_access_request
from mipsec.aaa.dictionary import check_dictionary, load_dictionary
from mipsec.aaa.mppe import recover_key
from mipsec.aaa.radius import RadiusClient, RadiusServer

SECRET = b"testing123"


def _request(eap: bytes = b"\x02\x01\x00\x06\x01a") -> object:
    return encode_access_request(1, SECRET, [("User-Name", "a")], eap=eap)


# 1 ----------------------------------------------------------------------------


def test_reply_message_authenticator_uses_the_request_authenticator() -> None:
    req = encode_access_request(1, SECRET, [("User-Name", "a")], eap=b"\x02\x01\x00\x06\x01a")
    good = build_reply(ACCESS_ACCEPT, req.raw, SECRET, eap_attrs(b"\x03\x01\x00\x04"))
    assert decode_reply(good, req, SECRET).code == ACCESS_ACCEPT
    # The same reply bytes checked for another request (same Identifier,
    # another Request Authenticator) do not verify.
    other = encode_access_request(1, SECRET, [("User-Name", "a")], eap=b"\x02\x01\x00\x06\x01a")
    with pytest.raises(ReplyVerifyError):
        decode_reply(good, other, SECRET)
    # A Message-Authenticator over any other vector is refused even when the
    # Response Authenticator is right.
    wrong = build_reply(ACCESS_ACCEPT, req.raw, SECRET, ma="zero-vector")
    with pytest.raises(ReplyVerifyError) as exc:
        decode_reply(wrong, req, SECRET)
    assert exc.value.kind == "message-authenticator"


def test_installed_pyrad_needs_the_request_authenticator() -> None:
    """What pyrad itself does: verifying with the reply's own Authenticator
    (the pre-2.6 mistake) fails on a correct reply; with the request's it
    passes.  mipsec.aaa verifies itself and never relies on the default."""
    req = encode_access_request(1, SECRET, [("User-Name", "a")], eap=b"\x02\x01\x00\x06\x01a")
    good = build_reply(ACCESS_ACCEPT, req.raw, SECRET)
    pkt = AuthPacket(packet=good, secret=SECRET, dict=load_dictionary())
    assert pkt.verify_message_authenticator(
        original_authenticator=req.authenticator, original_code=1
    )
    assert not pkt.verify_message_authenticator()  # the reply's own Authenticator field


# 2 ----------------------------------------------------------------------------


def _buggy_pre_26_decrypt(value: bytes, secret: bytes, req_auth: bytes) -> bytes:
    """pyrad < 2.6: every block chained on the *plaintext* it just produced."""
    salt, data, out = value[:2], value[2:], b""
    last = req_auth + salt
    while data:
        h = hashlib.md5(secret + last).digest()
        out += bytes(a ^ b for a, b in zip(h, data[:16], strict=True))
        last, data = out[-16:], data[16:]
    return out[1 : 1 + out[0]]


def test_32_octet_mppe_keys_recovered_whole() -> None:
    req = encode_access_request(1, SECRET, [("User-Name", "a")], eap=b"\x02\x01\x00\x06\x01a")
    recv, send = os.urandom(32), os.urandom(32)
    hidden_recv = hide_mppe(recv, SECRET, req.authenticator, b"\x85\x11")
    hidden_send = hide_mppe(send, SECRET, req.authenticator, b"\xf0\x22")
    attrs = eap_attrs(b"\x03\x01\x00\x04") + vsa(311, 17, hidden_recv) + vsa(311, 16, hidden_send)
    reply = decode_reply(build_reply(ACCESS_ACCEPT, req.raw, SECRET, attrs), req, SECRET)
    assert reply.mppe_recv_key == recv and reply.mppe_send_key == send
    assert len(reply.mppe_recv_key + reply.mppe_send_key) == 64
    # The old bug got the first 15 octets right and the rest wrong.
    buggy = _buggy_pre_26_decrypt(hidden_recv, SECRET, req.authenticator)
    assert buggy[:15] == recv[:15] and buggy[15:] != recv[15:]
    assert recover_key(hidden_recv, SECRET, req.authenticator) == recv


def test_installed_pyrad_salt_decrypt_is_whole() -> None:
    """The installed pyrad (>= 2.6) also decrypts all 32 octets."""
    req_auth = os.urandom(16)
    key = os.urandom(32)
    p = Packet(secret=SECRET, dict=load_dictionary())
    p.request_authenticator = req_auth
    assert p.SaltDecrypt(hide_mppe(key, SECRET, req_auth)) == key


# 3 ----------------------------------------------------------------------------


def test_installed_pyrad_unhexes_octets_that_start_with_0x() -> None:
    """The trap exists in the installed pyrad: by *name*, such a value is rewritten."""
    assert tools.EncodeOctets(b"0x4142") == b"AB"
    p = Packet(secret=SECRET, dict=load_dictionary())
    p["EAP-Message"] = b"0x4142"
    assert p._PktEncodeAttributes() == bytes([79, 4]) + b"AB"


def test_eap_chunk_starting_with_0x_is_sent_as_is() -> None:
    # The second 253-octet chunk starts with "0x" followed by hex digits only.
    tail = b"0x" + b"41" * 100
    eap = bytes([2, 9]) + (253 + len(tail)).to_bytes(2, "big") + bytes([13]) + bytes(248) + tail
    assert eap[253:255] == b"0x"
    req = encode_access_request(5, SECRET, [("User-Name", "a")], eap=eap)
    assert request_eap(req.raw) == eap
    # ... and the first chunk too (an EAP packet that begins with "0x" octets).
    first = b"0x41424344"
    req = encode_access_request(5, SECRET, [("User-Name", "a")], eap=first, state=b"0x4142")
    assert request_eap(req.raw) == first
    assert bytes([24, 8]) + b"0x4142" in req.raw  # State too
    # On the way back, a chunk starting with 0x is joined unchanged.
    reply = build_reply(ACCESS_CHALLENGE, req.raw, SECRET, eap_attrs(eap))
    assert decode_reply(reply, req, SECRET).eap_message == eap


# 4 ----------------------------------------------------------------------------

_STRING_EAP = """
ATTRIBUTE User-Name 1 string
ATTRIBUTE EAP-Message 79 string
ATTRIBUTE Message-Authenticator 80 octets
"""


def test_dictionary_with_string_eap_message_is_refused() -> None:
    bad = Dictionary(io.StringIO(_STRING_EAP))
    with pytest.raises(ValueError, match="EAP-Message must be octets, not string"):
        check_dictionary(bad)
    with pytest.raises(ValueError, match="EAP-Message must be octets"):
        encode_access_request(
            1, SECRET, [("User-Name", "a")], eap=b"\x02\x01\x00\x04", dictionary=bad
        )
    with pytest.raises(ValueError, match="EAP-Message must be octets"):
        RadiusClient([RadiusServer("127.0.0.1", 1812, SECRET)], dictionary=bad)
    # Why: pyrad decodes such an attribute as text whenever it is valid UTF-8.
    p = Packet(secret=SECRET, dict=bad)
    p.DecodePacket(bytes([11, 1, 0, 26]) + bytes(16) + bytes([79, 6]) + b"\x01\x01\x00\x04")
    assert p["EAP-Message"] == ["\x01\x01\x00\x04"]


def test_packaged_dictionary_types() -> None:
    d = load_dictionary()
    assert d["EAP-Message"].type == "octets"
    assert d["MS-MPPE-Recv-Key"].vendor == "Microsoft" and d["MS-MPPE-Recv-Key"].encrypt == 2
