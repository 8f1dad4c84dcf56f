"""Independent MN-side packet code for black-box tests of the HA (PROFILE §7-8).

Written from RFC 4303/3566/2404/6275 and PROFILE.md without importing
mipsec: its own XCBC, padding, Mobility Header encoder and checksum.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# token -> (integrity, encryption, block)
SUITES = {
    "{00,02}": ("sha1", None, 4),
    "{00,3B}": ("xcbc", None, 4),
    "{00,0A}": ("sha1", "3des", 8),
    "{00,2F}": ("sha1", "aes", 16),
    "{00,3C}": ("xcbc", "aes", 16),
}


def _ecb(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 -- RFC 3566 needs raw AES
    return enc.update(block) + enc.finalize()


def xcbc_mac_96(key: bytes, msg: bytes) -> bytes:
    """RFC 3566 §4 step by step."""
    k1 = _ecb(key, b"\x01" * 16)
    k2 = _ecb(key, b"\x02" * 16)
    k3 = _ecb(key, b"\x03" * 16)
    e = bytes(16)
    blocks = [msg[i : i + 16] for i in range(0, len(msg), 16)] or [b""]
    for m in blocks[:-1]:
        e = _ecb(k1, bytes(a ^ b for a, b in zip(m, e, strict=True)))
    last = blocks[-1]
    if len(last) == 16:
        x = bytes(a ^ b ^ c for a, b, c in zip(last, e, k2, strict=True))
    else:
        padded = last + b"\x80" + bytes(15 - len(last))
        x = bytes(a ^ b ^ c for a, b, c in zip(padded, e, k3, strict=True))
    return _ecb(k1, x)[:12]


def icv(integ: str, key: bytes, data: bytes) -> bytes:
    if integ == "sha1":
        return hmac.new(key, data, hashlib.sha1).digest()[:12]
    return xcbc_mac_96(key, data)


def _cipher(enc: str, key: bytes, iv: bytes) -> Cipher:  # type: ignore[type-arg]
    algo = TripleDES(key) if enc == "3des" else algorithms.AES(key)
    return Cipher(algo, modes.CBC(iv))


class RawSA:
    def __init__(
        self, suite: str, spi: int, ikey_out: bytes, ekey_out: bytes, ikey_in: bytes, ekey_in: bytes
    ) -> None:
        self.integ, self.enc, self.block = SUITES[suite]
        self.spi = spi
        self.ikey_out, self.ekey_out, self.ikey_in, self.ekey_in = (
            ikey_out,
            ekey_out,
            ikey_in,
            ekey_in,
        )
        self.seq_out = 0

    def protect(
        self, payload: bytes, next_header: int = 135, ptype: int = 8, seq: int | None = None
    ) -> bytes:
        seq = self.seq_out if seq is None else seq
        self.seq_out = seq + 1
        pad_len = -(len(payload) + 2) % self.block
        plain = payload + bytes(range(1, pad_len + 1)) + bytes((pad_len, next_header))
        head = struct.pack("!II", (ptype << 28) | self.spi, seq)
        if self.enc is not None:
            iv = os.urandom(self.block)
            e = _cipher(self.enc, self.ekey_out, iv).encryptor()
            body = iv + e.update(plain) + e.finalize()
        else:
            body = plain
        return head + body + icv(self.integ, self.ikey_out, head + body)

    def unprotect(self, pkt: bytes) -> tuple[int, int, bytes]:
        """-> (seq, next_header, payload); raises ValueError on any fault."""
        head, body, mac = pkt[:8], pkt[8:-12], pkt[-12:]
        word, seq = struct.unpack("!II", head)
        if word & 0x0FFFFFFF != self.spi:
            raise ValueError("spi")
        if not hmac.compare_digest(icv(self.integ, self.ikey_in, head + body), mac):
            raise ValueError("icv")
        if self.enc is not None:
            iv, ct = body[: self.block], body[self.block :]
            d = _cipher(self.enc, self.ekey_in, iv).decryptor()
            plain = d.update(ct) + d.finalize()
        else:
            plain = body
        pad_len, nh = plain[-2], plain[-1]
        if plain[-2 - pad_len : -2] != bytes(range(1, pad_len + 1)):
            raise ValueError("padding")
        return seq, nh, plain[: -2 - pad_len]


def checksum(src: str, dst: str, mh: bytes) -> int:
    pseudo = (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!IxxxB", len(mh), 135)
    )
    data = pseudo + mh
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def binding_update(seq: int, lifetime_units: int, hoa: str, haa: str) -> bytes:
    """BU with A and H flags and no options: 12 octets + PadN(4) = 16 (Header Len 1)."""
    mh = struct.pack("!BBBBHHBBH", 59, 1, 5, 0, 0, seq, 0xC0, 0, lifetime_units)
    mh += b"\x01\x02\x00\x00"  # PadN, 2 octets of data
    c = checksum(hoa, haa, mh)
    return mh[:4] + struct.pack("!H", c) + mh[6:]


def parse_ba(mh: bytes) -> dict[str, int]:
    proto, hlen, mh_type, _, _csum, status, flags, seq, lifetime = struct.unpack(
        "!BBBBHBBHH", mh[:12]
    )
    assert proto == 59 and mh_type == 6 and len(mh) == (hlen + 1) * 8
    return {"status": status, "k": flags >> 7, "sequence": seq, "lifetime": lifetime}
