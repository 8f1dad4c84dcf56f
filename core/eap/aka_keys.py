"""Key derivation and message authentication of EAP-AKA and EAP-AKA'.

EAP-AKA (RFC 4187 §7, §10.13, §10.15):

    MK = SHA1(Identity | IK | CK)
    K_encr (16) | K_aut (16) | MSK (64) | EMSK (64) = PRF(MK)
    AT_MAC      = HMAC-SHA1-128(K_aut, EAP packet with the MAC zeroed | extra)
    checkcode   = SHA1(every AKA-Identity request/response, in order)

  PRF is the FIPS 186-2 pseudo-random generator of change notice 1
  (Algorithm 1 for general purposes, so no "mod q"), with b = 160, XSEED = 0
  and G built from the SHA-1 compression function (RFC 4187 Appendix A).

EAP-AKA' (RFC 5448 §3.3-§3.4, RFC 9048 §3.3-§3.4):

    CK' | IK'   = HMAC-SHA-256(CK | IK, S), S = 0x20 | network name | len (2)
                  | SQN xor AK | 0x0006                 (3GPP TS 33.402 Annex A.2)
    MK          = PRF'(IK' | CK', "EAP-AKA'" | Identity)
    K_encr (16) | K_aut (32) | K_re (32) | MSK (64) | EMSK (64) = MK
    PRF'(K, S)  = T1 | T2 | ..., Ti = HMAC-SHA-256(K, T(i-1) | S | i)
    AT_MAC      = HMAC-SHA-256-128(K_aut, ...); checkcode = SHA-256(...)

Identity is the peer identity of RFC 4187 §7: the last AT_IDENTITY the peer
sent, else its EAP-Response/Identity, as-is without a terminating NUL.
Keys never appear in a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from mipsec.core.errors import LocalProtocolError

__all__ = [
    "AKA_PRIME_KDF",
    "MAC_LEN",
    "AkaKeys",
    "at_mac",
    "checkcode",
    "ck_ik_prime",
    "derive_aka",
    "derive_aka_prime",
    "fips186_2_prf",
    "prf_prime",
]

MAC_LEN = 16  # HMAC-SHA1-128 and HMAC-SHA-256-128
AKA_PRIME_KDF = 1  # RFC 5448 §3.2: the one key derivation function defined
_FC_CK_IK_PRIME = 0x20  # 3GPP TS 33.402 Annex A.2

# ---------------------------------------------------------------- FIPS 186-2 PRF

_SHA1_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0)
_M32 = 0xFFFFFFFF
_B = 1 << 160


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _M32


def _g(xval: int) -> bytes:
    """FIPS 186-2 Appendix 3.3: G(t, c) is the SHA-1 compression function on
    the 512-bit block c || 0...0 from the SHA-1 initial value t -- with no
    SHA-1 message padding, which is why hashlib cannot compute it."""
    w = list(struct.unpack(">16I", xval.to_bytes(20, "big") + bytes(44)))
    for i in range(16, 80):
        w.append(_rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1))
    a, b, c, d, e = _SHA1_IV
    for i in range(80):
        if i < 20:
            f, k = (b & c) | (~b & d), 0x5A827999
        elif i < 40:
            f, k = b ^ c ^ d, 0x6ED9EBA1
        elif i < 60:
            f, k = (b & c) | (b & d) | (c & d), 0x8F1BBCDC
        else:
            f, k = b ^ c ^ d, 0xCA62C1D6
        a, b, c, d, e = (_rotl(a, 5) + (f & _M32) + e + k + w[i]) & _M32, a, _rotl(b, 30), c, d
    return struct.pack(
        ">5I", *((x + y) & _M32 for x, y in zip(_SHA1_IV, (a, b, c, d, e), strict=True))
    )


def fips186_2_prf(xkey: bytes, length: int) -> bytes:
    """``length`` octets of the RFC 4187 Appendix A generator seeded with XKEY."""
    if len(xkey) != 20:
        raise LocalProtocolError("fips186_2_prf: XKEY must be 20 octets")
    key = int.from_bytes(xkey, "big")
    out = bytearray()
    while len(out) < length:
        for _ in range(2):  # x_j = w_0 | w_1
            w = _g(key)  # XVAL = XKEY + XSEED_j, XSEED_j = 0
            key = (1 + key + int.from_bytes(w, "big")) % _B
            out += w
    return bytes(out[:length])


# ---------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class AkaKeys:
    """Transient EAP keys and the exported keys of one full authentication."""

    k_encr: bytes = field(repr=False)
    k_aut: bytes = field(repr=False)
    msk: bytes = field(repr=False)
    emsk: bytes = field(repr=False)
    k_re: bytes | None = field(default=None, repr=False)  # EAP-AKA' only


def derive_aka(identity: bytes, ik: bytes, ck: bytes) -> AkaKeys:
    """RFC 4187 §7, full authentication."""
    mk = hashlib.sha1(identity + ik + ck).digest()  # noqa: S324 -- RFC 4187 §7 fixes SHA-1
    x = fips186_2_prf(mk, 160)
    return AkaKeys(k_encr=x[:16], k_aut=x[16:32], msk=x[32:96], emsk=x[96:160])


def ck_ik_prime(
    ck: bytes, ik: bytes, network_name: bytes, sqn_xor_ak: bytes
) -> tuple[bytes, bytes]:
    """(CK', IK') from CK, IK, the AT_KDF_INPUT network name and SQN xor AK
    (the first six octets of AUTN): 3GPP TS 33.402 Annex A.2, RFC 5448 §3.3."""
    if len(sqn_xor_ak) != 6:
        raise LocalProtocolError("ck_ik_prime: SQN xor AK must be 6 octets")
    if not 0 < len(network_name) <= 0xFFFF:
        raise LocalProtocolError("ck_ik_prime: the network name must be 1..65535 octets")
    s = (
        bytes((_FC_CK_IK_PRIME,))
        + network_name
        + len(network_name).to_bytes(2, "big")
        + sqn_xor_ak
        + (6).to_bytes(2, "big")
    )
    out = hmac.digest(ck + ik, s, "sha256")
    return out[:16], out[16:]


def prf_prime(key: bytes, s: bytes, length: int) -> bytes:
    """PRF' of RFC 5448 §3.4.1 (the IKEv2 prf+ with HMAC-SHA-256)."""
    if length > 255 * 32:
        raise LocalProtocolError("prf_prime: at most 255 blocks")
    out, t, i = bytearray(), b"", 1
    while len(out) < length:
        t = hmac.digest(key, t + s + bytes((i,)), "sha256")
        out += t
        i += 1
    return bytes(out[:length])


def derive_aka_prime(identity: bytes, ik_prime: bytes, ck_prime: bytes) -> AkaKeys:
    """RFC 5448 §3.3 with AT_KDF 1: keys from IK' | CK' (note the order)."""
    mk = prf_prime(ik_prime + ck_prime, b"EAP-AKA'" + identity, 208)
    return AkaKeys(
        k_encr=mk[:16], k_aut=mk[16:48], k_re=mk[48:80], msk=mk[80:144], emsk=mk[144:208]
    )


# ---------------------------------------------------------------- integrity


def at_mac(prime: bool, k_aut: bytes, packet: bytes, extra: bytes = b"") -> bytes:
    """The AT_MAC value over ``packet`` (whole EAP packet, MAC value zeroed)
    followed by the message-specific ``extra`` (RFC 4187 §10.15, RFC 5448 §3.4.2)."""
    return hmac.digest(k_aut, packet + extra, "sha256" if prime else "sha1")[:MAC_LEN]


def checkcode(prime: bool, identity_messages: bytes) -> bytes:
    """AT_CHECKCODE over the AKA-Identity packets (RFC 4187 §10.13; SHA-256 for
    EAP-AKA', RFC 9048 §3.4.3); the empty checkcode when there were none."""
    if not identity_messages:
        return b""
    if prime:
        return hashlib.sha256(identity_messages).digest()
    return hashlib.sha1(identity_messages).digest()  # noqa: S324 -- RFC 4187 §10.13
