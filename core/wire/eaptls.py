"""EAP-TLS type-data: Flags, TLS Message Length, fragmentation (RFC 5216 §3, §2.1.5).

The type-data of an EAP-TLS Request/Response (what follows the Type octet)::

    Flags (L M S R R R R R) | [TLS Message Length, 4 octets, if L] | TLS data

* L: the TLS Message Length field is present -- the total of the TLS
  message (one flight of records) being fragmented; it MUST be set on the
  first fragment of a fragmented message;
* M: more fragments follow; the receiver answers with an empty frame (the
  fragment ACK) and waits for the next one;
* S: EAP-TLS Start, in a Request only (a reserved bit in a Response);
* R: reserved, sent as zero and ignored on reception (§3.1).

RFC 9190 §2.1.5 keeps this framing for TLS 1.3.  Sans-I/O and strict: every
malformed frame raises :class:`EapTlsError` naming the field, a message
announced or grown beyond the configured maximum is refused before it is
buffered (§2.1.5: reassembly lockup and denial of service).
"""

from __future__ import annotations

from dataclasses import dataclass

from mipsec.core.errors import LocalProtocolError, WireError

__all__ = [
    "ACK",
    "FLAG_L",
    "FLAG_M",
    "FLAG_S",
    "MIN_TYPE_DATA",
    "EapTlsError",
    "EapTlsFrame",
    "Reassembler",
    "decode_frame",
    "encode_frame",
    "fragment",
]

FLAG_L = 0x80  # Length included
FLAG_M = 0x40  # More fragments
FLAG_S = 0x20  # EAP-TLS Start (Requests only)

_FLAGS_LEN = 1
_LENGTH_LEN = 4
# The smallest type-data budget that still moves TLS data: Flags, the
# 4-octet length and one octet in the first fragment.
MIN_TYPE_DATA = _FLAGS_LEN + _LENGTH_LEN + 1

# An empty frame: the fragment ACK, and the peer's final EAP-TLS response
# (RFC 5216 §2.1.5, §2.1.3).
ACK = bytes((0,))


class EapTlsError(WireError):
    """Malformed EAP-TLS type-data (RFC 5216 §3); ``field`` names what was wrong."""


@dataclass(frozen=True, slots=True)
class EapTlsFrame:
    """One decoded EAP-TLS frame (type-data of one EAP packet)."""

    more: bool = False
    start: bool = False
    tls_length: int | None = None  # TLS Message Length when the L flag is set
    data: bytes = b""

    @property
    def is_empty(self) -> bool:
        """No flag and no data: a fragment ACK or a final response (RFC 5216 §2.1.5)."""
        return not (self.more or self.start or self.data) and self.tls_length is None


def decode_frame(type_data: bytes, *, request: bool) -> EapTlsFrame:
    """Parse EAP-TLS type-data; ``request`` says whether it came in a Request.

    Raises :class:`EapTlsError` naming the field.  Reserved bits are ignored
    (§3.1, §3.2); S is reserved in a Response, so it is ignored there too.
    """
    if not type_data:
        raise EapTlsError("eap-tls.flags", "no Flags octet")
    flags = type_data[0]
    more = bool(flags & FLAG_M)
    start = request and bool(flags & FLAG_S)
    tls_length: int | None = None
    if flags & FLAG_L:
        if len(type_data) < _FLAGS_LEN + _LENGTH_LEN:
            raise EapTlsError("eap-tls.length", "L flag set but the 4-octet length is truncated")
        tls_length = int.from_bytes(type_data[1:5], "big")
        data = bytes(type_data[5:])
        if tls_length < len(data):
            raise EapTlsError(
                "eap-tls.length",
                f"TLS Message Length {tls_length} is less than the {len(data)} octets "
                "of this fragment",
            )
    else:
        data = bytes(type_data[1:])
    if start and (more or tls_length is not None or data):
        # §2.1.1: the Start is a Request with the S bit set "and no data".
        raise EapTlsError("eap-tls.flags", "a Start carries no L or M flag and no data")
    if more and not data:
        raise EapTlsError("eap-tls.flags", "M flag set on a fragment without data")
    return EapTlsFrame(more, start, tls_length, data)


def encode_frame(frame: EapTlsFrame) -> bytes:
    """The type-data of ``frame`` (the inverse of :func:`decode_frame`)."""
    flags = (FLAG_M if frame.more else 0) | (FLAG_S if frame.start else 0)
    if frame.tls_length is None:
        return bytes((flags,)) + frame.data
    if not 0 <= frame.tls_length < 1 << 32:
        raise LocalProtocolError("eap-tls length: outside 32 bits")
    return bytes((flags | FLAG_L,)) + frame.tls_length.to_bytes(4, "big") + frame.data


def fragment(message: bytes, max_type_data: int) -> list[bytes]:
    """Type-data of the frames that carry ``message``, each at most ``max_type_data`` octets.

    A message that fits goes unfragmented and without the L flag; otherwise
    the first frame has L and M, the middle ones M, the last neither (RFC 5216
    §2.1.5).  An empty message gives one empty frame (an ACK/final response).
    """
    if max_type_data < MIN_TYPE_DATA:
        raise LocalProtocolError(f"eap-tls fragment: max_type_data below {MIN_TYPE_DATA}")
    if _FLAGS_LEN + len(message) <= max_type_data:
        return [ACK + message]
    total = len(message)
    first = max_type_data - _FLAGS_LEN - _LENGTH_LEN
    rest = max_type_data - _FLAGS_LEN
    out = [bytes((FLAG_L | FLAG_M,)) + total.to_bytes(4, "big") + message[:first]]
    pos = first
    while pos < total:
        chunk = message[pos : pos + rest]
        pos += len(chunk)
        out.append(bytes((FLAG_M if pos < total else 0,)) + chunk)
    return out


class Reassembler:
    """Joins the fragments of one TLS message, never holding more than ``max_message`` octets.

    :meth:`add` returns the whole message with its last fragment and None
    before; it raises :class:`EapTlsError` for a first fragment without L
    (§2.1.5 "MUST be set for the first fragment"), a TLS Message Length above
    the limit or changed between fragments, and fragments that overrun or fall
    short of the announced length.  After an error the instance is spent.
    """

    __slots__ = ("_buf", "_expected", "_max")

    def __init__(self, max_message: int) -> None:
        if max_message < 1:
            raise LocalProtocolError("eap-tls reassembly: max_message must be positive")
        self._max = max_message
        self._buf: bytearray | None = None  # None: no fragmented message under way
        self._expected: int | None = None

    @property
    def in_progress(self) -> bool:
        """A fragmented message has begun and its last fragment has not come."""
        return self._buf is not None

    @property
    def buffered(self) -> int:
        """Octets held for the message under way."""
        return len(self._buf) if self._buf is not None else 0

    def add(self, frame: EapTlsFrame) -> bytes | None:
        announced = frame.tls_length
        if announced is not None and announced > self._max:
            raise EapTlsError(
                "eap-tls.length",
                f"TLS Message Length {announced} exceeds the reassembly limit of {self._max}",
            )
        buf = self._buf
        if buf is None:
            if frame.more and announced is None:
                raise EapTlsError(
                    "eap-tls.flags", "first fragment of a fragmented message without the L flag"
                )
            if not frame.more:
                # Unfragmented: the L field, if sent, must say exactly this much.
                if announced is not None and announced != len(frame.data):
                    raise EapTlsError(
                        "eap-tls.length",
                        f"TLS Message Length {announced} does not match the "
                        f"{len(frame.data)} octets sent",
                    )
                if len(frame.data) > self._max:
                    raise EapTlsError(
                        "eap-tls.length",
                        f"message of {len(frame.data)} octets exceeds the reassembly "
                        f"limit of {self._max}",
                    )
                return frame.data
            buf = self._buf = bytearray()
            self._expected = announced
        elif announced is not None and announced != self._expected:
            # Some peers repeat L on every fragment: tolerated when unchanged.
            raise EapTlsError("eap-tls.length", "TLS Message Length changed between fragments")
        expected = self._expected
        assert expected is not None  # set with the first fragment
        if len(buf) + len(frame.data) > expected:
            raise EapTlsError(
                "eap-tls.length",
                f"fragments carry more than the announced {expected} octets",
            )
        buf += frame.data
        if frame.more:
            if len(buf) == expected:
                raise EapTlsError(
                    "eap-tls.flags", "M flag set although the announced length is complete"
                )
            return None
        self._buf = None
        self._expected = None
        if len(buf) != expected:
            raise EapTlsError(
                "eap-tls.length",
                f"fragments carried {len(buf)} octets, TLS Message Length said {expected}",
            )
        return bytes(buf)
