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
  AES: K1/K2/K3 come from AES-ECB, the CBC-MAC chain runs in a pre-keyed
  AES-CMAC(K1) object, and CMAC's last step is turned into XCBC's with two
  more AES calls on two blocks (see ``AesXcbcMac96``).

Encryption algorithms: NULL (RFC 2410), 3DES-CBC (RFC 2451, from
``cryptography.hazmat.decrepit``) and AES-128-CBC (RFC 3602).

``CbcCipher`` (and so ``SuiteCrypto``) is NOT thread-safe: it keeps running CBC
contexts.  An SA direction belongs to one event loop / worker (sans-I/O).
(``AesXcbcMac96`` keeps a running decryptor too, but its state never reaches
the output; the random-block pools below are safe to share.)
Keys never appear in a repr or in an error message.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable
from typing import Protocol, TypeAlias

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import (
    Cipher,
    CipherAlgorithm,
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


class MacContext(Protocol):
    """One message's MAC computation: a copy of a pre-keyed HMAC or CMAC object."""

    def update(self, data: bytes, /) -> None: ...

    def finalize(self) -> bytes: ...


class IntegrityAlgorithm(Protocol):
    """A keyed MAC: ``mac`` gives the full output, ``mac96`` the ICV.

    ``new()`` returns a fresh context of the pre-keyed primitive (HMAC-SHA1, or
    for XCBC the AES-CMAC(K1) it is built on), for callers that inline the ICV
    computation on a hot path (see each class for the recipe).
    """

    new: Callable[[], MacContext]

    def mac(self, data: BytesLike) -> bytes: ...

    def mac96(self, data: BytesLike) -> bytes: ...


class HmacSha1_96:
    """HMAC-SHA1-96 (RFC 2404) over a pre-keyed HMAC object.

    Any non-empty key length is HMAC (RFC 2104), so the RFC 2202 vectors with
    4-, 25- and 80-octet keys can be checked here; the 160-bit key that RFC 2404
    §3 requires for ESP is enforced by ``SuiteCrypto`` through ``SUITES``.

    Inlined recipe (``wire/esp.py``): ``h = new(); h.update(data);
    icv = h.finalize()[:12]``.  ``cryptography``'s HMAC copy measured as fast
    as the stdlib ``hmac`` copy and as hashlib inner/outer SHA-1 copies (about
    1.7 µs for 1400 octets each), and it needs the fewest Python-level calls.
    """

    __slots__ = ("_keyed", "new")

    new: Callable[[], MacContext]

    def __init__(self, key: bytes) -> None:
        key = _bytes_key("ikey", key)
        if not key:
            raise LocalProtocolError("ikey: HMAC key must not be empty")
        # Keyed once: the ipad/opad SHA-1 states are computed here, and every
        # packet only copies them.
        self._keyed = crypto_hmac.HMAC(key, hashes.SHA1())  # noqa: S303 (RFC 2404 mandates it)
        self.new = self._keyed.copy

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
    is the same chain with the same padding; only the last step differs.  CMAC
    ends with E_K1(C ^ B ^ L1) for a *full* last block B (C: the chain before
    it, L1: CMAC's first subkey of K1), where XCBC wants E_K1(C ^ M* ^ K) for
    its (padded) last block M* and K = K2 (full) or K3 (partial).  So XCBC(M)
    is CMAC over M with its last block replaced by the full block

        B = M* ^ K ^ L1

    (the padded block for a partial or empty last block): ``xcbc_finish``
    feeds the message up to its last block, then B, to a copy of a pre-keyed
    CMAC.  Per SA direction that keeps one CMAC context and two integers --
    the earlier recipe fixed CMAC's output up with two more AES contexts
    (2.2 KB per direction, on an HA holding 100k SAs).

    Inlined recipe (``wire/esp.py``): ``xcbc_finish(new(), data, n, deltas)[:12]``
    (``deltas``: (K2 ^ L1, K3 ^ L1) as integers).
    """

    __slots__ = ("deltas", "new")

    new: Callable[[], MacContext]
    deltas: tuple[int, int]

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
        k1_ecb = Cipher(algorithms.AES(k1), modes.ECB()).encryptor()  # noqa: S305
        # SP 800-38B §6.1: L = AES-K1(0^128); L1 = dbl(L).
        l1 = _dbl(int.from_bytes(k1_ecb.update(bytes(16)), "big"))
        self.deltas = (k2 ^ l1, k3 ^ l1)
        self.new = cmac.CMAC(algorithms.AES(k1)).copy

    def mac(self, data: BytesLike) -> bytes:
        """Full 128-bit AES-XCBC-MAC (RFC 3566 §4)."""
        if type(data) is not bytes:
            data = bytes(data)  # len() below must count octets
        return xcbc_finish(self.new(), data, len(data), self.deltas)

    def mac96(self, data: BytesLike) -> bytes:
        """RFC 3566 §4.2: the left-most 96 bits."""
        return self.mac(data)[:ICV_LEN]

    def __repr__(self) -> str:
        return "AesXcbcMac96(<key hidden>)"


# Padded last block of r octets (r = 0: the empty message, RFC 3566 §4 step
# 3b): the octets shifted to the top, then 0x80 right after them.
_XCBC_SHIFT = tuple(8 * (16 - r) for r in range(16))
_XCBC_PAD = tuple(0x80 << (8 * (15 - r)) for r in range(16))


def xcbc_finish(h: MacContext, data: BytesLike, n: int, deltas: tuple[int, int]) -> bytes:
    """The 16-octet AES-XCBC-MAC of ``data[:n]`` from a fresh CMAC(K1) context ``h``."""
    r = n & 15
    if r == 0 and n:  # a full last block: B = M[n] ^ K2 ^ L1
        cut = n - 16
        last = int.from_bytes(data[cut:n], "big") ^ deltas[0]
    else:  # partial or empty: B = (M[n] || 0x80 || 0..) ^ K3 ^ L1
        cut = n - r
        last = (int.from_bytes(data[cut:n], "big") << _XCBC_SHIFT[r]) ^ _XCBC_PAD[r] ^ deltas[1]
    if cut:
        # A view, not a copy of the packet (the backend takes any buffer).
        h.update(memoryview(data)[:cut])  # type: ignore[arg-type]
    h.update(last.to_bytes(16, "big"))
    return h.finalize()


def _dbl(x: int) -> int:
    """Doubling in GF(2^128) (SP 800-38B §6.1 subkey generation)."""
    return ((x << 1) & _MASK128) ^ (0x87 if x >> 127 else 0)


# ---------------------------------------------------------------- random blocks
#
# The random block R that CbcCipher puts in front of every packet comes from
# os.urandom, drawn _POOL_OCTETS at a time: one os.urandom(16) call costs
# ~0.35 µs, a fifth of a 1400-octet AES packet, while os.urandom(4096) split
# into 256 blocks costs ~0.06 µs per block.  Why this keeps every property
# RFC 3602 §3 asks of the IV:
#
# * each R is a distinct slice of kernel CSPRNG output and is used once
#   (list.pop removes it), so R values are exactly as random, independent and
#   unpredictable as separate os.urandom(16) calls; they never leave the process
#   except inside E_K(R ^ C_prev);
# * list.pop is one atomic operation, so two threads (even with different SAs)
#   can never take the same block;
# * a forked child starts with empty pools (os.register_at_fork), so a parent
#   and its child never emit from the same buffered randomness.
#
# The pools are per block size and shared by all SAs: a per-SA buffer would cost
# ~12 KB of memory for each of thousands of mostly idle SAs.

_POOL_OCTETS = 4096
_pools: dict[int, list[bytes]] = {8: [], 16: []}
_splitters: dict[int, Callable[[bytes], tuple[bytes, ...]]] = {
    bs: struct.Struct(f"{bs}s" * (_POOL_OCTETS // bs)).unpack for bs in _pools
}


def _clear_pools() -> None:
    for pool in _pools.values():
        pool.clear()


if hasattr(os, "register_at_fork"):  # no fork, nothing to guard, elsewhere
    os.register_at_fork(after_in_child=_clear_pools)


def _refill_and_pop(block_size: int) -> bytes:
    """Refill the ``block_size`` pool from os.urandom and take one block."""
    pool = _pools[block_size]
    pool.extend(_splitters[block_size](os.urandom(_POOL_OCTETS)))
    return pool.pop()


class CbcCipher:
    """CBC encryption with a fresh, unpredictable IV per packet (RFC 3602 §3, RFC 2451).

    Why persistent contexts are safe here (DESIGN.md "Library traps"): one
    encryptor and one decryptor live as long as the SA, so their CBC chains
    run across packets.

    * ``encrypt`` feeds a fresh random block R (os.urandom, buffered: see
      "random blocks" above) in front of the plaintext.  Its output
      C0 = E_K(R XOR C_prev) is uniformly distributed and unknown to anyone who
      does not know R, whatever C_prev (the last block of the previous packet,
      public) is; C0 is sent as the IV and the rest of the output is exactly
      CBC(K, IV=C0, plaintext).  RFC 3602 §3 asks for an IV that is random and
      unpredictable: C0 is both, and never a counter or the previous ciphertext
      block (the predictable-IV flaw).
    * ``decrypt`` feeds IV || ciphertext and drops the first output block
      (D_K(IV) XOR <previous chain>, meaningless); every following block is
      D_K(C_i) XOR C_{i-1}, which only depends on this packet.

    The output is byte-for-byte what a fresh ``Cipher(alg, CBC(C0))`` produces;
    tests check that, and that IVs differ.

    Fast-path attributes for the ESP layer (which inlines them to save a Python
    call per packet): ``random_block()`` pops R and raises ``IndexError`` when
    the pool is empty (then call ``encrypt_parts``, which refills);
    ``encrypt_update`` / ``decrypt_update`` are the running contexts' update()
    and must only ever see whole blocks.
    """

    __slots__ = ("_algorithm", "block_size", "decrypt_update", "encrypt_update", "random_block")

    random_block: Callable[[], bytes]
    encrypt_update: Callable[[BytesLike], bytes]
    decrypt_update: Callable[[BytesLike], bytes]

    def __init__(self, algorithm: CipherAlgorithm, block_size: int) -> None:
        if block_size not in _pools:
            raise LocalProtocolError(f"block_size: {block_size} is not 8 or 16")
        self.block_size = block_size
        self.random_block = _pools[block_size].pop
        # The two running contexts are made at first use (__getattr__): a
        # direction of an SA only ever encrypts or only ever decrypts, and
        # each OpenSSL context costs ~2-3 KB -- per SA, on an HA with 100k SAs.
        self._algorithm = algorithm

    def __getattr__(self, name: str) -> Callable[[BytesLike], bytes]:
        # Only reached while the slot is still empty: after the first use the
        # attribute is an ordinary slot read (no cost on the packet path).
        if name == "encrypt_update":
            # The initial IVs only seed the running chains; their value never
            # reaches the wire in clear (C0 depends on fresh randomness).  A
            # block of the shared pool: no extra os.urandom call per SA.
            iv = self._next_random_block()
            update = Cipher(self._algorithm, modes.CBC(iv)).encryptor().update
            self.encrypt_update = update
            return update
        if name == "decrypt_update":
            iv = bytes(self.block_size)
            update = Cipher(self._algorithm, modes.CBC(iv)).decryptor().update
            self.decrypt_update = update
            return update
        raise AttributeError(name)

    def _next_random_block(self) -> bytes:
        try:
            return self.random_block()
        except IndexError:
            return _refill_and_pop(self.block_size)

    def encrypt(self, plaintext: BytesLike) -> bytes:
        """IV || ciphertext; ``len(plaintext)`` must be a multiple of the block size."""
        if len(plaintext) % self.block_size:
            raise LocalProtocolError(
                f"plaintext: length {len(plaintext)} is not a multiple of {self.block_size}"
            )
        return self.encrypt_update(b"".join((self._next_random_block(), plaintext)))

    def encrypt_parts(self, payload: BytesLike, trailer: BytesLike) -> bytes:
        """``encrypt(payload + trailer)`` without the intermediate copy (ESP fast path).

        The total length must be a multiple of the block size: a partial block
        would stay buffered in the running context and shift every later packet.
        """
        bs = self.block_size
        if (len(payload) + len(trailer)) % bs:
            raise LocalProtocolError(f"plaintext: length is not a multiple of {bs}")
        return self.encrypt_update(b"".join((self._next_random_block(), payload, trailer)))

    def decrypt(self, iv_and_ct: BytesLike) -> bytes:
        """Plaintext of IV || ciphertext (length checked by the caller or here)."""
        bs = self.block_size
        n = len(iv_and_ct)
        if n < 2 * bs or n % bs:
            raise LocalProtocolError(f"ciphertext: length {n} is not IV + k*{bs} octets, k >= 1")
        return self.decrypt_update(iv_and_ct)[bs:]

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
    ``integrity`` (the MAC object) and ``cipher`` (the ``CbcCipher``, None for
    NULL) are there for callers that inline their fast-path attributes.
    """

    __slots__ = (
        "block_size",
        "cipher",
        "decrypt",
        "encrypt",
        "encrypt_parts",
        "encrypts",
        "info",
        "integrity",
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
        self.integrity = _make_integrity(info, ikey)
        cipher = _make_cipher(info, ekey)
        self.cipher = cipher
        self.encrypts = cipher is not None
        # Octets of IV in front of the ciphertext (0 for NULL).
        self.iv_len = info.block_size if cipher is not None else 0
        self.mac = self.integrity.mac96
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
