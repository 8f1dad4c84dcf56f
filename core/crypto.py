"""Per-SA packet crypto for the MN-HA data path (PROFILE §5, §7).

Everything here is prepared once per SA direction and then reused for every
packet: DESIGN.md ("Library traps") measured 9-16 µs to create a
``Cipher(...).encryptor()`` against about 1 µs to push a packet through one that
exists, so the only per-packet objects from ``cryptography`` are one copy of a
pre-keyed HMAC or CMAC.

Integrity algorithms:

* HMAC-SHA1-96 (RFC 2404): HMAC-SHA1 (RFC 2104) truncated to the left-most 96
  bits.  ``cryptography``'s pre-keyed ``HMAC`` object, ``copy()``-ed per packet,
  measured faster here than the stdlib ``hmac.new(...).copy()`` (about 1.05 vs
  1.56 µs for 64 octets, 1.85 vs 2.34 µs for 1400 octets).
* AES-XCBC-MAC-96 (RFC 3566): ``cryptography`` has no XCBC, so it is built on
  AES: K1/K2/K3 come from AES-ECB, and the CBC-MAC chain runs in a pre-keyed
  AES-CMAC(K1) object whose final-block subkey is cancelled out (see
  ``AesXcbcMac96``).

Encryption algorithms: NULL (RFC 2410), 3DES-CBC (RFC 2451, from
``cryptography.hazmat.decrepit``) and AES-128-CBC (RFC 3602).

``CbcCipher`` (and so ``SuiteCrypto``) is NOT thread-safe: it keeps running CBC
contexts.  An SA direction belongs to one event loop / worker (sans-I/O).
Keys never appear in a repr or in an error message.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Protocol, TypeAlias

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import (
    Cipher,
    CipherAlgorithm,
    CipherContext,
    algorithms,
    modes,
)

from mipsec.core.errors import LocalProtocolError
from mipsec.core.suites import SuiteInfo

__all__ = [
    "ICV_LEN",
    "AesXcbcMac96",
    "BytesLike",
    "CbcCipher",
    "HmacSha1_96",
    "IntegrityAlgorithm",
    "SuiteCrypto",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview

# RFC 2404 §2 / RFC 3566 §2.2: both integrity algorithms send 96 bits.
ICV_LEN = 12

_AES_BLOCK = 16
_MASK128 = (1 << 128) - 1


def _bytes_key(name: str, key: object) -> bytes:
    if not isinstance(key, bytes | bytearray):
        raise LocalProtocolError(f"{name}: must be bytes, not {type(key).__name__}")
    return bytes(key)


class IntegrityAlgorithm(Protocol):
    """A keyed MAC: ``mac`` gives the full output, ``mac96`` the ICV."""

    def mac(self, data: BytesLike) -> bytes: ...

    def mac96(self, data: BytesLike) -> bytes: ...


class HmacSha1_96:
    """HMAC-SHA1-96 (RFC 2404) over a pre-keyed HMAC object.

    Any non-empty key length is HMAC (RFC 2104), so the RFC 2202 vectors with
    4-, 25- and 80-octet keys can be checked here; the 160-bit key that RFC 2404
    §3 requires for ESP is enforced by ``SuiteCrypto`` through ``SUITES``.
    """

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        key = _bytes_key("ikey", key)
        if not key:
            raise LocalProtocolError("ikey: HMAC key must not be empty")
        # Keyed once: the ipad/opad SHA-1 states are computed here, and every
        # packet only copies them.
        self._keyed = crypto_hmac.HMAC(key, hashes.SHA1())  # noqa: S303 (RFC 2404 mandates it)

    def mac(self, data: BytesLike) -> bytes:
        """Full 160-bit HMAC-SHA1."""
        h = self._keyed.copy()
        h.update(data)
        return h.finalize()

    def mac96(self, data: BytesLike) -> bytes:
        """RFC 2404 §2: the left-most 96 bits."""
        h = self._keyed.copy()
        h.update(data)
        return h.finalize()[:ICV_LEN]

    def __repr__(self) -> str:
        return "HmacSha1_96(<key hidden>)"


class AesXcbcMac96:
    """AES-XCBC-MAC-96 (RFC 3566), 128-bit keys only.

    RFC 3566 §4: K1 = AES-K(0x01..01), K2 = AES-K(0x02..02), K3 = AES-K(0x03..03)
    (derived here with AES-ECB); the MAC is the CBC-MAC under K1 (zero IV) of
    M[1..n-1] followed by M[n] XOR K2 when M[n] is a full block, or
    (M[n] || 0x80 || 0x00..) XOR K3 otherwise (the empty message included).

    Why it runs on ``cryptography``'s AES-CMAC: CMAC (NIST SP 800-38B) under K1
    is the same CBC-MAC with a zero IV, except that it XORs its own subkey L1
    into a complete final block.  Feeding CMAC(K1) the message with its final
    block already padded (if needed) and XORed with K2 ^ L1 (or K3 ^ L1) makes
    the two L1s cancel, leaving exactly RFC 3566's last step.  So one
    pre-keyed CMAC object, ``copy()``-ed per packet, computes XCBC in C:
    no fresh Cipher context (~10 µs), no Python loop over blocks, and no
    mutable chaining state in this object.
    """

    __slots__ = ("_cmac", "_tails")

    def __init__(self, key: bytes) -> None:
        key = _bytes_key("ikey", key)
        if len(key) != 16:
            # RFC 3566 §2.1: AES-XCBC-MAC-96 uses a 128-bit key, no other size.
            raise LocalProtocolError(f"ikey: AES-XCBC-MAC-96 needs 16 octets, got {len(key)}")
        # ECB only for fixed derivation blocks (RFC 3566 §4 step 1, SP 800-38B §6.1).
        ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
        derived = ecb.update(b"\x01" * 16 + b"\x02" * 16 + b"\x03" * 16)
        k1 = derived[:16]
        k2 = int.from_bytes(derived[16:32], "big")
        k3 = int.from_bytes(derived[32:48], "big")
        # SP 800-38B §6.1: L = AES-K1(0^128); L1 = L << 1, XOR 0x87 if MSB(L) = 1.
        k1_ecb = Cipher(algorithms.AES(k1), modes.ECB()).encryptor()  # noqa: S305
        ell = int.from_bytes(k1_ecb.update(bytes(16)), "big")
        l1 = ((ell << 1) & _MASK128) ^ (0x87 if ell >> 127 else 0)
        # _tails[r] = (shift, mask) for a final block of r octets M[n] (read as
        # a big-endian int): the block CMAC must see is (M[n] << shift) ^ mask.
        # r = 1..15, and r = 0 for the empty message: step 3b's padding
        # M[n] || 0x80 || 0x00.., XOR K3; the 0x80 bit is folded into the mask.
        # r = 16 (a complete final block): step 3a, XOR K2.  Every mask also
        # holds L1, which cancels the L1 that CMAC adds.  One table lookup and
        # one shift/XOR per packet instead of branches and a separate OR.
        tails = [(128 - 8 * r, (1 << (127 - 8 * r)) ^ k3 ^ l1) for r in range(16)]
        tails.append((0, k2 ^ l1))
        self._tails = tuple(tails)
        self._cmac = cmac.CMAC(algorithms.AES(k1))

    # mac and mac96 repeat the same few lines on purpose: mac96 is on every
    # packet's path and a shared helper would cost one more Python call there.

    def mac(self, data: BytesLike) -> bytes:
        """Full 128-bit AES-XCBC-MAC (RFC 3566 §4)."""
        if type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        r = (n & 15) or (16 if n else 0)
        split = n - r
        shift, mask = self._tails[r]
        c = self._cmac.copy()
        c.update(
            data[:split]
            + ((int.from_bytes(data[split:], "big") << shift) ^ mask).to_bytes(16, "big")
        )
        return c.finalize()

    def mac96(self, data: BytesLike) -> bytes:
        """RFC 3566 §4.2: the left-most 96 bits."""
        if type(data) is not bytes:
            data = bytes(data)  # a memoryview has no "+" below
        n = len(data)
        # Octets in the final block: 1..16, or 0 for the empty message.
        r = (n & 15) or (16 if n else 0)
        split = n - r
        shift, mask = self._tails[r]
        c = self._cmac.copy()
        # One update() over one new bytes object: an update() call costs more
        # (~0.25 µs) than copying the octets, and "+" less than b"".join.
        c.update(
            data[:split]
            + ((int.from_bytes(data[split:], "big") << shift) ^ mask).to_bytes(16, "big")
        )
        return c.finalize()[:ICV_LEN]

    def __repr__(self) -> str:
        return "AesXcbcMac96(<key hidden>)"


class CbcCipher:
    """CBC encryption with a fresh, unpredictable IV per packet (RFC 3602 §3, RFC 2451).

    Why persistent contexts are safe here (DESIGN.md "Library traps"): one
    encryptor and one decryptor live as long as the SA, so their CBC chains
    run across packets.

    * ``encrypt`` feeds a fresh random block R (``os.urandom``) in front of the
      plaintext.  Its output C0 = E_K(R XOR C_prev) is uniformly distributed and
      unknown to anyone who does not know R, whatever C_prev (the last block of
      the previous packet, public) is; C0 is sent as the IV and the rest of the
      output is exactly CBC(K, IV=C0, plaintext).  RFC 3602 §3 asks for an IV
      that is random and unpredictable: C0 is both, and never a counter or the
      previous ciphertext block (the predictable-IV flaw).
    * ``decrypt`` feeds IV || ciphertext and drops the first output block
      (D_K(IV) XOR <previous chain>, meaningless); every following block is
      D_K(C_i) XOR C_{i-1}, which only depends on this packet.

    The output is byte-for-byte what a fresh ``Cipher(alg, CBC(C0))`` produces;
    tests check that, and that IVs differ.
    """

    __slots__ = ("_dec", "_enc", "block_size")

    def __init__(self, algorithm: CipherAlgorithm, block_size: int) -> None:
        self.block_size = block_size
        # The initial IVs only seed the running chains; their value never
        # reaches the wire in clear (C0 depends on fresh randomness).
        self._enc: CipherContext = Cipher(algorithm, modes.CBC(os.urandom(block_size))).encryptor()
        self._dec: CipherContext = Cipher(algorithm, modes.CBC(bytes(block_size))).decryptor()

    def encrypt(self, plaintext: BytesLike) -> bytes:
        """IV || ciphertext; ``len(plaintext)`` must be a multiple of the block size."""
        if len(plaintext) % self.block_size:
            raise LocalProtocolError(
                f"plaintext: length {len(plaintext)} is not a multiple of {self.block_size}"
            )
        return self._enc.update(b"".join((os.urandom(self.block_size), plaintext)))

    def encrypt_parts(self, payload: BytesLike, trailer: BytesLike) -> bytes:
        """``encrypt(payload + trailer)`` without the intermediate copy (ESP fast path).

        The total length must be a multiple of the block size: a partial block
        would stay buffered in the running context and shift every later packet.
        """
        bs = self.block_size
        if (len(payload) + len(trailer)) % bs:
            raise LocalProtocolError(f"plaintext: length is not a multiple of {bs}")
        return self._enc.update(b"".join((os.urandom(bs), payload, trailer)))

    def decrypt(self, iv_and_ct: BytesLike) -> bytes:
        """Plaintext of IV || ciphertext (length checked by the caller or here)."""
        bs = self.block_size
        n = len(iv_and_ct)
        if n < 2 * bs or n % bs:
            raise LocalProtocolError(f"ciphertext: length {n} is not IV + k*{bs} octets, k >= 1")
        return self._dec.update(iv_and_ct)[bs:]

    def __repr__(self) -> str:
        return f"CbcCipher(block_size={self.block_size}, <key hidden>)"


def _des_key_part(part: bytes) -> bytes:
    # DES ignores the low (parity) bit of each key octet.
    return bytes(b & 0xFE for b in part)


def _make_cipher(info: SuiteInfo, ekey: bytes) -> CbcCipher | None:
    if info.encryption == "null":
        return None
    if info.encryption == "aes-128-cbc":
        return CbcCipher(algorithms.AES(ekey), 16)
    if info.encryption == "3des-cbc":
        k1, k2, k3 = (_des_key_part(ekey[i : i + 8]) for i in (0, 8, 16))
        if k1 == k2 or k2 == k3:
            # RFC 2451 §2.3: with k1 == k2 or k2 == k3, 3DES is single DES;
            # implementers MUST reject such keys.
            raise LocalProtocolError("ekey: 3DES key with k1 == k2 or k2 == k3 (RFC 2451 §2.3)")
        return CbcCipher(TripleDES(ekey), 8)
    raise LocalProtocolError(f"suite: unknown encryption algorithm {info.encryption!r}")


def _make_integrity(info: SuiteInfo, ikey: bytes) -> IntegrityAlgorithm:
    if info.integrity == "hmac-sha1-96":
        return HmacSha1_96(ikey)
    if info.integrity == "aes-xcbc-mac-96":
        return AesXcbcMac96(ikey)
    raise LocalProtocolError(f"suite: unknown integrity algorithm {info.integrity!r}")


class SuiteCrypto:
    """The crypto of ONE direction of an SA (PROFILE §5): ICV and encryption.

    Built once from the suite and the direction's two keys; key lengths are
    checked against ``SUITES`` (LocalProtocolError: a caller bug, the HAC makes
    the keys).  NULL suites have ``ekey == b""`` and pass data through.

    ``mac``, ``encrypt``, ``encrypt_parts`` and ``decrypt`` are the prepared
    algorithm objects' bound methods, bound once here: they sit on every
    packet's path and an extra Python-level dispatch would cost ~0.1 µs each.
    """

    __slots__ = (
        "_cipher",
        "_integrity",
        "block_size",
        "decrypt",
        "encrypt",
        "encrypt_parts",
        "encrypts",
        "info",
        "iv_len",
        "mac",
    )

    mac: Callable[[BytesLike], bytes]
    """``mac(data)``: the 12-octet ICV (RFC 2404 / RFC 3566 truncation)."""
    encrypt: Callable[[BytesLike], bytes]
    """``encrypt(plaintext_padded)``: IV || ciphertext, a fresh IV each call; NULL: as is."""
    encrypt_parts: Callable[[BytesLike, BytesLike], bytes]
    """``encrypt_parts(payload, trailer)`` = ``encrypt(payload + trailer)``, one copy less."""
    decrypt: Callable[[BytesLike], bytes]
    """``decrypt(iv_and_ct)``: the plaintext; NULL: the input as bytes."""

    def __init__(self, info: SuiteInfo, ikey: bytes, ekey: bytes) -> None:
        ikey = _bytes_key("ikey", ikey)
        ekey = _bytes_key("ekey", ekey)
        if len(ikey) != info.ikey_len:
            raise LocalProtocolError(
                f"ikey: {info.suite.name} needs {info.ikey_len} octets, got {len(ikey)}"
            )
        if len(ekey) != info.ekey_len:
            raise LocalProtocolError(
                f"ekey: {info.suite.name} needs {info.ekey_len} octets, got {len(ekey)}"
            )
        self.info = info
        self.block_size = info.block_size
        self._integrity = _make_integrity(info, ikey)
        cipher = _make_cipher(info, ekey)
        self._cipher = cipher
        self.encrypts = cipher is not None
        # Octets of IV in front of the ciphertext (0 for NULL).
        self.iv_len = info.block_size if cipher is not None else 0
        self.mac = self._integrity.mac96
        if cipher is None:
            self.encrypt = self.decrypt = bytes
            self.encrypt_parts = _join2
        else:
            self.encrypt = cipher.encrypt
            self.encrypt_parts = cipher.encrypt_parts
            self.decrypt = cipher.decrypt

    def verify(self, data: BytesLike, icv: BytesLike) -> bool:
        """Constant-time ICV check (RFC 4303 §3.4.4)."""
        return hmac.compare_digest(self.mac(data), icv)

    def __repr__(self) -> str:
        return f"SuiteCrypto({self.info.suite.name}, <keys hidden>)"


def _join2(payload: BytesLike, trailer: BytesLike) -> bytes:
    return b"".join((payload, trailer))
