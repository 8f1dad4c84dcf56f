"""MS-MPPE-Send-Key / MS-MPPE-Recv-Key hiding (RFC 2548 §2.4.2-§2.4.3), sans-I/O.

An AAA server hands the NAS the EAP MSK in these two vendor attributes
(Microsoft, vendor 311, types 16 and 17): RFC 3579 §2.4 and RFC 5216 §2.3
put MSK[0..31] in MS-MPPE-Recv-Key and MSK[32..63] in MS-MPPE-Send-Key, so
``MSK = Recv-Key || Send-Key`` (strongSwan's eap-radius, hostapd).

Each value is ``Salt (2) || C`` where C hides ``P = Key-Length (1) || Key ||
zero padding`` to a multiple of 16 octets (§2.4.2)::

    b(1) = MD5(S + R + A)    c(1) = p(1) xor b(1)
    b(i) = MD5(S + c(i-1))   c(i) = p(i) xor b(i)

with S the shared secret, R the Request Authenticator of the Access-Request
the Accept answers, A the Salt.  Every block chains on the *ciphertext* of
the previous one -- pyrad before 2.6 chained on its own output when
decrypting, so only the first 15 octets of a 32-octet key came out right.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from mipsec.core.errors import LocalProtocolError, WireError

__all__ = ["MppeError", "hide_key", "recover_key"]

_BLOCK = 16


class MppeError(WireError):
    """An MS-MPPE key attribute that cannot be recovered (RFC 2548 §2.4.2)."""


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(_BLOCK, "big")


def _keystream_xor(
    data: bytes, secret: bytes, request_authenticator: bytes, salt: bytes, *, decrypt: bool
) -> bytes:
    out = bytearray()
    chain = request_authenticator + salt
    for i in range(0, len(data), _BLOCK):
        block = data[i : i + _BLOCK]
        res = _xor(block, hashlib.md5(secret + chain).digest())  # noqa: S324 (the RFC's MD5)
        out += res
        # The next block chains on the ciphertext: the input when decrypting.
        chain = block if decrypt else res
    return bytes(out)


def recover_key(
    value: bytes, secret: bytes, request_authenticator: bytes, *, field: str = "MS-MPPE-Key"
) -> bytes:
    """The key hidden in one MS-MPPE-*-Key value.  Raises :class:`MppeError`.

    A wrong shared secret or Request Authenticator shows up here as a bad
    Key-Length or non-zero padding (the Message-Authenticator check comes
    first and normally catches it).
    """
    if len(request_authenticator) != _BLOCK:
        raise LocalProtocolError("mppe: the Request Authenticator is 16 octets")
    n = len(value)
    if n < 2 + _BLOCK or (n - 2) % _BLOCK:
        raise MppeError(field, f"{n} octets: not a 2-octet salt and 16-octet blocks")
    salt = value[:2]
    if not salt[0] & 0x80:
        raise MppeError(field, "salt without its most significant bit set (RFC 2548 §2.4.2)")
    plain = _keystream_xor(value[2:], secret, request_authenticator, salt, decrypt=True)
    key_len = plain[0]
    if key_len == 0 or key_len > len(plain) - 1:
        raise MppeError(field, f"Key-Length {key_len} does not fit {len(plain) - 1} octets")
    padding = plain[1 + key_len :]
    if not hmac.compare_digest(padding, bytes(len(padding))):
        raise MppeError(field, "padding is not zero (wrong shared secret?)")
    return plain[1 : 1 + key_len]


def hide_key(
    key: bytes, secret: bytes, request_authenticator: bytes, salt: bytes | None = None
) -> bytes:
    """Hide ``key`` as an AAA server does (tests and fake servers)."""
    if not 1 <= len(key) <= 239:  # 1 + key + padding must fit a 253-octet VSA value
        raise LocalProtocolError("mppe: a key of 1..239 octets")
    if salt is None:
        salt = bytes((0x80 | secrets.randbelow(128), secrets.randbelow(256)))
    if len(salt) != 2:
        raise LocalProtocolError("mppe: the salt is 2 octets")
    plain = bytes((len(key),)) + key
    plain += bytes(-len(plain) % _BLOCK)
    return salt + _keystream_xor(plain, secret, request_authenticator, salt, decrypt=False)
