"""RFC 6618 §6 UDP encapsulation of MN-HA packets (PROFILE §7), sans-I/O.

Wire layout of a protected packet (PType 8 or 1)::

    +-------+-----------------------+
    | PType |  SPI (28 bits)        |   PType: 4 high bits of the first word
    +-------+-----------------------+
    |        Sequence Number        |   starts at 0, +1 per packet
    +-------------------------------+
    |  IV (one cipher block; none for NULL)
    |  ciphertext of: Payload || Padding 01 02 .. || Pad Length || Next Header
    +-------------------------------+
    |  ICV (12 octets) over PType|SPI .. Next Header (encrypt-then-MAC)
    +-------------------------------+

A plaintext packet (PType 0) is ``00000000 00000000`` followed by the payload,
with no trailer (PROFILE §7).

Receivers drop bad packets silently (PROFILE §7); here a drop is a
``PacketError`` whose ``drop_reason`` names the counter: "malformed",
"unknown_spi", "bad_icv", "replay", "bad_padding" (and "scope", which only the
HA can decide).  Sender misuse is a ``LocalProtocolError``.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from typing import NamedTuple

from mipsec.core.crypto import (
    ICV_LEN,
    AesXcbcMac96,
    BytesLike,
    MacContext,
    SuiteCrypto,
    xcbc_finish,
)
from mipsec.core.errors import LocalProtocolError, PacketError
from mipsec.core.replay import ReplayWindow
from mipsec.core.suites import SuiteInfo

__all__ = [
    "DROP_REASONS",
    "HEADER_LEN",
    "NEXT_HEADER_DSTOPTS",
    "NEXT_HEADER_IPV4",
    "NEXT_HEADER_IPV6",
    "NEXT_HEADER_MH",
    "PTYPE_DATA",
    "PTYPE_MH",
    "PTYPE_PLAIN",
    "SEQ_MAX",
    "SEQ_REINIT_THRESHOLD",
    "SPI_MAX",
    "InboundSA",
    "OutboundSA",
    "SequenceExhausted",
    "Unprotected",
    "decode_plain",
    "encode_plain",
    "peek_header",
]

# PROFILE §7: PType values (RFC 6618 §6.1).
PTYPE_PLAIN = 0
PTYPE_DATA = 1
PTYPE_MH = 8
_PROTECTED_PTYPES = frozenset((PTYPE_DATA, PTYPE_MH))

# PROFILE §7: Next Header values of the ESP trailer.
NEXT_HEADER_MH = 135
NEXT_HEADER_DSTOPTS = 60
NEXT_HEADER_IPV6 = 41
NEXT_HEADER_IPV4 = 4

# PROFILE §7 (deliberate tightening): the HA asks for a new SA (BA status 176)
# once a direction passes 2**32 - 2**20, and nobody sends past 2**32 - 1.
SEQ_REINIT_THRESHOLD = 2**32 - 2**20
SEQ_MAX = 2**32 - 1

SPI_MAX = (1 << 28) - 1  # PROFILE §5: SPI 1..268435455 (28 bits)
HEADER_LEN = 8  # PType|SPI + Sequence Number (_HEADER_LEN below is the same)

DROP_REASONS = ("malformed", "unknown_spi", "bad_icv", "replay", "bad_padding", "scope")

_HEADER = struct.Struct(">II")
_pack = _HEADER.pack
_unpack_from = _HEADER.unpack_from
_compare_digest = hmac.compare_digest
# RFC 4303 §2.4: padding octets are 1, 2, 3, ...; a receiver accepts up to 255.
_PAD = bytes(range(1, 256))
_PADS = tuple(_PAD[:i] for i in range(256))  # _PADS[n] = the n padding octets
_ICV_LEN = ICV_LEN  # module-level copies: cheaper lookups on the hot path
_HEADER_LEN = 8
_PLAIN_HEADER = bytes(HEADER_LEN)


class SequenceExhausted(LocalProtocolError):
    """The outbound counter reached 2**32 - 1 (PROFILE §7): bootstrap a new SA."""


class Unprotected(NamedTuple):
    """A verified, decrypted packet."""

    ptype: int
    seq: int
    next_header: int
    payload: bytes


# The NamedTuple's generated __new__ is a Python function (~0.3 µs); building
# the tuple directly gives the same object for half the cost on the hot path.
_new_unprotected = tuple.__new__


def peek_header(datagram: BytesLike) -> tuple[int, int]:
    """(ptype, spi) from the first 32 bits, so the HA can find the SA (PROFILE §7).

    PType 8/1 need an SPI in 1..2**28-1; PType 0 needs SPI 0 and sequence 0.
    """
    if len(datagram) < 4:
        raise PacketError("header", f"{len(datagram)} octets, PType|SPI needs 4")
    word = int.from_bytes(datagram[:4], "big")
    ptype = word >> 28
    spi = word & SPI_MAX
    if ptype in _PROTECTED_PTYPES:
        if spi == 0:
            raise PacketError("spi", f"SPI 0 with PType {ptype}")
        return ptype, spi
    if ptype == PTYPE_PLAIN:
        if spi != 0:
            raise PacketError("spi", "PType 0 must carry SPI 0")
        if len(datagram) < HEADER_LEN:
            raise PacketError("sequence", "PType 0 packet shorter than its 8-octet header")
        if int.from_bytes(datagram[4:8], "big") != 0:
            raise PacketError("sequence", "PType 0 must carry sequence 0")
        return ptype, spi
    raise PacketError("ptype", f"unknown PType {ptype}")


def encode_plain(payload: BytesLike) -> bytes:
    """PType 0 packet: SPI 0, sequence 0, the payload, no trailer (PROFILE §7)."""
    return _PLAIN_HEADER + payload


def decode_plain(datagram: BytesLike) -> bytes:
    """The payload of a PType 0 packet (``PacketError`` if it is not one)."""
    ptype, _ = peek_header(datagram)
    if ptype != PTYPE_PLAIN:
        raise PacketError("ptype", f"PType {ptype} is not a plaintext packet")
    return bytes(datagram[HEADER_LEN:])


def _icv_parts(
    crypto: SuiteCrypto,
) -> tuple[Callable[[], MacContext], tuple[int, int] | None]:
    """What the inlined ICV computation needs (the recipes in crypto.py).

    (new, deltas): ``new()`` is a context of the pre-keyed HMAC-SHA1 or, for
    AES-XCBC-MAC-96, AES-CMAC(K1); ``deltas`` is None for HMAC, else what
    ``xcbc_finish`` needs.
    """
    integrity = crypto.integrity
    if isinstance(integrity, AesXcbcMac96):
        return integrity.new, integrity.deltas
    return integrity.new, None


def _check_spi(spi: int) -> int:
    if isinstance(spi, bool) or not isinstance(spi, int) or not 1 <= spi <= SPI_MAX:
        raise LocalProtocolError(f"spi: {spi!r} outside 1..{SPI_MAX}")
    return spi


class OutboundSA:
    """Sending side of one SA direction: numbers, pads, encrypts and MACs packets."""

    __slots__ = (
        "_align",
        "_deltas",
        "_encrypt",
        "_encrypt_parts",
        "_encrypts",
        "_mac_new",
        "_random_block",
        "_seq",
        "_trailers",
        "spi",
        "suite_info",
    )

    _mac_new: Callable[[], MacContext]
    _deltas: tuple[int, int] | None
    _random_block: Callable[[], bytes]
    _encrypt: Callable[[BytesLike], bytes]

    def __init__(
        self,
        suite_info: SuiteInfo,
        ikey: bytes,
        ekey: bytes,
        spi: int,
        *,
        initial_seq: int = 0,
    ) -> None:
        """``initial_seq`` lets a restarted HA resume a persisted counter (default 0)."""
        self.spi = _check_spi(spi)
        if isinstance(initial_seq, bool) or not 0 <= initial_seq <= SEQ_MAX + 1:
            raise LocalProtocolError(f"initial_seq: {initial_seq!r} outside 0..2**32")
        self.suite_info = suite_info
        crypto = SuiteCrypto(suite_info, ikey, ekey)
        self._mac_new, self._deltas = _icv_parts(crypto)
        self._encrypt_parts = crypto.encrypt_parts
        self._encrypts = crypto.encrypts
        cipher = crypto.cipher
        if cipher is not None:
            # CbcCipher.encrypt_parts inlined on the hot path (one Python call
            # less); encrypt_parts stays the slow path that refills the pool.
            self._random_block = cipher.random_block
            self._encrypt = cipher.encrypt_update
        self._align = suite_info.block_size
        self._seq = initial_seq
        # (pad_len << 8 | next_header) -> Padding || Pad Length || Next Header;
        # at most block_size * 256 small entries, in practice a handful.
        self._trailers: dict[int, bytes] = {}

    @property
    def seq(self) -> int:
        """Sequence number of the next packet."""
        return self._seq

    @property
    def needs_reinit(self) -> bool:
        """A packet numbered >= SEQ_REINIT_THRESHOLD was sent (PROFILE §7: status 176)."""
        return self._seq > SEQ_REINIT_THRESHOLD

    def protect(self, ptype: int, next_header: int, payload: BytesLike) -> bytes:
        """One protected datagram; each call consumes one sequence number."""
        seq = self._seq
        if seq > SEQ_MAX:
            raise SequenceExhausted(f"sequence: SPI {self.spi} used all 2**32 numbers")
        if ptype not in _PROTECTED_PTYPES:
            raise LocalProtocolError(f"ptype: {ptype!r} is not {PTYPE_MH} or {PTYPE_DATA}")
        word = (ptype << 28) | self.spi
        # RFC 4303 §2.4: minimal padding so that Payload || Padding || Pad
        # Length || Next Header fills whole cipher blocks (4 octets for NULL).
        if not 0 <= next_header <= 255:
            raise LocalProtocolError(f"next_header: {next_header!r} outside 0..255")
        pad_len = -(len(payload) + 2) % self._align
        key = pad_len << 8 | next_header
        trailer = self._trailers.get(key)
        if trailer is None:
            trailer = self._trailers[key] = _PADS[pad_len] + bytes((pad_len, next_header))
        if self._encrypts:
            # = self._encrypt_parts(payload, trailer): R || Payload || Padding ||
            # Pad Length || Next Header through the running CBC context, whole
            # blocks only (pad_len above), so nothing stays buffered in it.
            try:
                ct = self._encrypt(b"".join((self._random_block(), payload, trailer)))
            except IndexError:  # the pool of random blocks is empty: refill it
                ct = self._encrypt_parts(payload, trailer)
            authed = _pack(word, seq) + ct
        else:
            # NULL (RFC 2410): the "ciphertext" is the plaintext, one copy.
            authed = b"".join((_pack(word, seq), payload, trailer))
        self._seq = seq + 1
        # The ICV (crypto.py's recipes, inlined: one Python call less per packet).
        deltas = self._deltas
        if deltas is None:  # HMAC-SHA1-96 (RFC 2404)
            h = self._mac_new()
            h.update(authed)
            return authed + h.finalize()[:_ICV_LEN]
        # AES-XCBC-MAC-96 (RFC 3566) from AES-CMAC: AesXcbcMac96.
        return authed + xcbc_finish(self._mac_new(), authed, len(authed), deltas)[:_ICV_LEN]

    def __repr__(self) -> str:
        return f"OutboundSA({self.suite_info.suite.name}, spi={self.spi}, seq={self._seq})"


class InboundSA:
    """Receiving side of one SA direction: replay check, ICV, decryption, padding."""

    __slots__ = (
        "_align",
        "_decrypt",
        "_deltas",
        "_encrypts",
        "_iv_len",
        "_mac_new",
        "_min_len",
        "_window",
        "spi",
        "suite_info",
    )

    _mac_new: Callable[[], MacContext]
    _deltas: tuple[int, int] | None
    _decrypt: Callable[[bytes], bytes]

    def __init__(
        self, suite_info: SuiteInfo, ikey: bytes, ekey: bytes, spi: int, window: int = 64
    ) -> None:
        self.spi = _check_spi(spi)
        self.suite_info = suite_info
        crypto = SuiteCrypto(suite_info, ikey, ekey)
        self._mac_new, self._deltas = _icv_parts(crypto)
        # The running decryptor's update() itself: unprotect's length checks
        # (whole blocks, at least IV + one block) are the ones decrypt() makes,
        # and unprotect skips the IV block by offset instead of by a copy.
        self._decrypt = crypto.cipher.decrypt_update if crypto.cipher else crypto.decrypt
        self._iv_len = crypto.iv_len
        self._encrypts = crypto.encrypts
        self._align = suite_info.block_size
        self._window = ReplayWindow(window)
        # Header, IV, at least one block (or 4-octet unit) of trailer, ICV.
        self._min_len = HEADER_LEN + crypto.iv_len + self._align + ICV_LEN

    @property
    def highest_seq(self) -> int:
        """Highest verified sequence number, -1 before the first packet."""
        return self._window.highest

    @property
    def needs_reinit(self) -> bool:
        """A packet numbered >= SEQ_REINIT_THRESHOLD arrived (PROFILE §7: status 176)."""
        return self._window.highest >= SEQ_REINIT_THRESHOLD

    @property
    def window_size(self) -> int:
        return self._window.size

    def unprotect(self, datagram: BytesLike) -> Unprotected:
        """Verify and open one datagram, or raise ``PacketError`` (drop and count).

        Order (RFC 4303 §3.4.3-3.4.4, PROFILE §7): parse -> replay check before
        any crypto -> ICV -> decrypt -> padding -> only then slide the window.
        """
        if type(datagram) is not bytes:
            datagram = bytes(datagram)  # one copy buys the fast bytes methods below
        n = len(datagram)
        if n < self._min_len:
            raise PacketError("length", f"{n} octets, shorter than the minimum {self._min_len}")
        word, seq = _unpack_from(datagram)
        if word & SPI_MAX != self.spi:
            raise PacketError("spi", f"SPI {word & SPI_MAX} is not this SA's", "unknown_spi")
        ptype = word >> 28
        if ptype not in _PROTECTED_PTYPES:
            raise PacketError("ptype", f"PType {ptype} on a protected SA")
        end = n - _ICV_LEN
        if (end - _HEADER_LEN) % self._align:
            raise PacketError("length", f"encrypted part is not a multiple of {self._align} octets")
        # The replay window's check() and update() (RFC 4303 §3.4.3), inlined
        # on its own state: two method calls cost ~0.15 µs of a ~3 µs packet
        # (bench/ha.py).  ``seq`` came from ">I", so it is a 32-bit number.
        # diff >= 0: at or left of the right edge, so it must be inside the
        # window and not yet seen; diff < 0: new, right of the window.
        window = self._window
        diff = window._highest - seq
        if diff >= 0 and (diff >= window.size or (window._bitmap >> diff) & 1):
            raise PacketError("sequence", f"{seq} replayed or left of the window", "replay")
        # The ICV, inlined as in protect(), then compared in constant time
        # (RFC 4303 §3.4.4).
        deltas = self._deltas
        if deltas is None:
            h = self._mac_new()
            h.update(datagram[:end])
            icv = h.finalize()[:_ICV_LEN]
        else:
            icv = xcbc_finish(self._mac_new(), datagram, end, deltas)[:_ICV_LEN]
        if not _compare_digest(icv, datagram[end:]):
            raise PacketError("icv", "integrity check failed", "bad_icv")
        if self._encrypts:
            # First output block: D_K(IV) ^ <running chain>, meaningless
            # (CbcCipher.decrypt); the plaintext starts after it.
            plain = self._decrypt(datagram[_HEADER_LEN:end])
            start = self._iv_len
            end -= _HEADER_LEN  # = len(plain)
        else:
            # NULL: the plaintext is in place; slice the payload out once.
            plain = datagram
            start = _HEADER_LEN
        pad_len = plain[end - 2]
        payload_end = end - 2 - pad_len
        # Not constant-time on purpose: the ICV already verified, so the
        # padding is the authenticated sender's, not an oracle for an attacker.
        if payload_end < start or not plain.startswith(_PADS[pad_len], payload_end):
            if payload_end < start:
                raise PacketError("pad_length", f"{pad_len} exceeds the packet", "bad_padding")
            raise PacketError("padding", "padding octets are not 01 02 03 ...", "bad_padding")
        # Only now slide the window (RFC 4303 §3.4.3: after the ICV verified);
        # nothing ran in between that could have changed it (sans-I/O).
        if diff < 0:
            window._bitmap = (
                ((window._bitmap << -diff) | 1) & window._mask if -diff < window.size else 1
            )
            window._highest = seq
        else:
            window._bitmap |= 1 << diff
        return _new_unprotected(Unprotected, (ptype, seq, plain[end - 1], plain[start:payload_end]))

    def __repr__(self) -> str:
        return (
            f"InboundSA({self.suite_info.suite.name}, spi={self.spi}, "
            f"highest_seq={self._window.highest})"
        )
