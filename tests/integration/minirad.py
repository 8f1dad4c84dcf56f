"""Just enough RADIUS (RFC 2865, RFC 3579, RFC 2548) to put real EAP peers and servers
from elsewhere -- FreeRADIUS, hostapd's eapol_test -- in front of the EAP-TLS machines.

Test-only and deliberately small: EAP-Message split at 253 octets and joined
in order, Message-Authenticator on every packet (checked on receipt), State,
the Response Authenticator, and the MS-MPPE-*-Key salt encryption that
carries the MSK.  (This branch has no ``mipsec.aaa``; once merged, the
client half could be the ``radius`` back end.)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

ACCESS_REQUEST, ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE = 1, 2, 3, 11
USER_NAME, STATE, VENDOR_SPECIFIC, EAP_MESSAGE, MESSAGE_AUTHENTICATOR = 1, 24, 26, 79, 80
MICROSOFT, MS_MPPE_SEND_KEY, MS_MPPE_RECV_KEY = 311, 16, 17

Attrs = list[tuple[int, bytes]]


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()  # noqa: S324 - RADIUS defines these with MD5


def attr(kind: int, value: bytes) -> bytes:
    return bytes((kind, len(value) + 2)) + value


def eap_attrs(eap: bytes) -> bytes:
    """EAP-Message attributes carrying ``eap`` (RFC 3579 §3.1)."""
    return b"".join(attr(EAP_MESSAGE, eap[i : i + 253]) for i in range(0, len(eap), 253))


def joined_eap(attrs: Attrs) -> bytes:
    return b"".join(v for k, v in attrs if k == EAP_MESSAGE)


def first(attrs: Attrs, kind: int) -> bytes | None:
    return next((v for k, v in attrs if k == kind), None)


def vendor_attr(vendor: int, kind: int, value: bytes) -> bytes:
    return attr(VENDOR_SPECIFIC, vendor.to_bytes(4, "big") + bytes((kind, len(value) + 2)) + value)


def find_vendor_attr(attrs: Attrs, vendor: int, kind: int) -> bytes:
    for k, v in attrs:
        if k == VENDOR_SPECIFIC and int.from_bytes(v[:4], "big") == vendor and v[4] == kind:
            return v[6 : 6 + v[5] - 2]
    raise AssertionError(f"no vendor attribute {vendor}/{kind}")


def parse_attrs(packet: bytes) -> Attrs:
    length = int.from_bytes(packet[2:4], "big")
    assert length == len(packet), "RADIUS Length does not match"
    attrs, pos = [], 20
    while pos < length:
        kind, alen = packet[pos], packet[pos + 1]
        assert alen >= 2 and pos + alen <= length, "bad attribute length"
        attrs.append((kind, packet[pos + 2 : pos + alen]))
        pos += alen
    return attrs


def _message_authenticator(secret: bytes, packet: bytes, authenticator: bytes) -> bytes:
    # HMAC-MD5 over the packet with ``authenticator`` in the Authenticator
    # field and the Message-Authenticator value zeroed (RFC 3579 §3.2).
    attrs = parse_attrs(packet)
    ma = first(attrs, MESSAGE_AUTHENTICATOR)
    assert ma is not None and len(ma) == 16, "Message-Authenticator missing"
    zeroed = packet[:4] + authenticator + packet[20:].replace(ma, bytes(16), 1)
    return hmac.new(secret, zeroed, "md5").digest()


def _build(code: int, identifier: int, authenticator: bytes, attrs: bytes) -> bytes:
    attrs += attr(MESSAGE_AUTHENTICATOR, bytes(16))
    length = 20 + len(attrs)
    return bytes((code, identifier)) + length.to_bytes(2, "big") + authenticator + attrs


# --- client side ------------------------------------------------------------------


def access_request(
    secret: bytes, identifier: int, user_name: str, eap: bytes, state: bytes | None
) -> tuple[bytes, bytes]:
    """An Access-Request carrying ``eap``; returns (packet, Request Authenticator)."""
    authenticator = secrets.token_bytes(16)
    attrs = attr(USER_NAME, user_name.encode()) + eap_attrs(eap)
    if state is not None:
        attrs += attr(STATE, state)
    packet = _build(ACCESS_REQUEST, identifier, authenticator, attrs)
    mac = hmac.new(secret, packet, "md5").digest()
    return packet[:-16] + mac, authenticator


def parse_reply(
    secret: bytes, identifier: int, request_authenticator: bytes, reply: bytes
) -> tuple[int, Attrs]:
    """Check a reply's authenticators (RFC 2865 §3, RFC 3579 §3.2); (code, attributes)."""
    assert reply[1] == identifier
    expected = _md5(reply[:4] + request_authenticator + reply[20:] + secret)
    assert hmac.compare_digest(reply[4:20], expected), "bad Response Authenticator"
    mac = _message_authenticator(secret, reply, request_authenticator)
    assert hmac.compare_digest(first(parse_attrs(reply), MESSAGE_AUTHENTICATOR) or b"", mac)
    return reply[0], parse_attrs(reply)


def mppe_decrypt(secret: bytes, request_authenticator: bytes, value: bytes) -> bytes:
    """An MS-MPPE-*-Key value: Salt, then encrypted (Key-Length || Key || pad) (RFC 2548 §2.4.2)."""
    salt, cipher = value[:2], value[2:]
    assert salt[0] & 0x80 and len(cipher) % 16 == 0
    plain, prev = b"", request_authenticator + salt
    for i in range(0, len(cipher), 16):
        block = cipher[i : i + 16]
        plain += bytes(x ^ y for x, y in zip(block, _md5(secret + prev), strict=True))
        prev = block
    return plain[1 : 1 + plain[0]]


# --- server side ------------------------------------------------------------------


def parse_request(secret: bytes, packet: bytes) -> tuple[int, bytes, Attrs]:
    """Check an Access-Request's Message-Authenticator; (identifier, authenticator, attrs)."""
    assert packet[0] == ACCESS_REQUEST
    authenticator = packet[4:20]
    mac = _message_authenticator(secret, packet, authenticator)
    assert hmac.compare_digest(first(parse_attrs(packet), MESSAGE_AUTHENTICATOR) or b"", mac)
    return packet[1], authenticator, parse_attrs(packet)


def mppe_encrypt(secret: bytes, request_authenticator: bytes, key: bytes) -> bytes:
    salt = bytes((0x80 | secrets.randbelow(128), secrets.randbelow(256)))
    plain = bytes((len(key),)) + key
    plain += bytes(-len(plain) % 16)
    out, prev = salt, request_authenticator + salt
    for i in range(0, len(plain), 16):
        block = bytes(x ^ y for x, y in zip(plain[i : i + 16], _md5(secret + prev), strict=True))
        out += block
        prev = block
    return out


def reply(
    secret: bytes, code: int, identifier: int, request_authenticator: bytes, attrs: bytes
) -> bytes:
    """A reply with Message-Authenticator and Response Authenticator."""
    packet = _build(code, identifier, request_authenticator, attrs)
    mac = _message_authenticator(secret, packet, request_authenticator)
    packet = packet[:-16] + mac
    response_auth = _md5(packet + secret)  # Authenticator field holds the request's here
    return packet[:4] + response_auth + packet[20:]
