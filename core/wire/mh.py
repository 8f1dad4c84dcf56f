"""Mobility Header codec: Binding Update and Binding Acknowledgement (sans-I/O).

Wire format: RFC 6275 §6.1.1 (header), §6.1.7 (BU), §6.1.8 (BA), §6.2 (mobility
options), RFC 5555 §3.1-§3.2 (DSMIP6 IPv4 options); profile rules in PROFILE §8.

Encoding places every option at its own ``xn+y`` alignment (measured from the
first octet of the Mobility Header, RFC 6275 §6.2.1) with Pad1/PadN and pads the
whole header to a multiple of 8 octets, so a BU/BA without options carries one
4-octet PadN and Header Len 1 (RFC 6275 §6.1.7, PROFILE §8).

Decoding is strict about structure (lengths, Payload Proto, MH Type, option
bounds, the fixed length of the options we understand) and lenient where the
RFC says receivers must be:

* Reserved fields and flag bits this profile does not use (e.g. RFC 5555's F
  flag, NEMO's R/P) are ignored (RFC 6275 §6.1.1, §6.1.7, §6.1.8), so a decode
  then encode may zero them.
* PadN contents are ignored (RFC 6275 §6.2.3); padding is not surfaced.
* Options we do not understand are kept as :class:`UnknownOption` and skipped
  (RFC 6275 §6.2.1).
* Option alignment is a sender duty: a misaligned option is still decoded.
* A checksum mismatch is reported in :attr:`DecodedMH.checksum_ok`, not raised:
  receivers count it and go on, the ESP ICV already protects the octets
  (PROFILE §8).
* Semantic checks (e.g. RFC 5555's "prefix length 0 is an error") belong to
  the binding logic, which answers with a status; the codec only parses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar, TypeAlias

from mipsec.core.errors import LocalProtocolError, MobilityHeaderError

__all__ = [
    "ACCEPTED",
    "IPV4_ACK_ADMIN_PROHIBITED",
    "IPV4_ACK_DYNAMIC_NOT_AVAILABLE",
    "IPV4_ACK_INCORRECT_HOA",
    "IPV4_ACK_INVALID_ADDRESS",
    "IPV4_ACK_PREFIX_UNAUTHORIZED",
    "IPV4_ACK_REASON_UNSPECIFIED",
    "IPV4_ACK_SUCCESS",
    "MH_TYPE_BA",
    "MH_TYPE_BU",
    "NOT_HOME_AGENT",
    "REASON_UNSPECIFIED",
    "REINIT_SA_WITH_HAC",
    "SEQUENCE_OUT_OF_WINDOW",
    "AlternateCareOfAddress",
    "BindingAck",
    "BindingUpdate",
    "DecodedMH",
    "IPv4AddressAck",
    "IPv4CareOfAddress",
    "IPv4HomeAddressRequest",
    "MobilityMessage",
    "MobilityOption",
    "UnknownOption",
    "align_padding",
    "decode_mh",
    "encode_mh",
    "lifetime_units",
    "pad_octets",
    "seq_newer",
]

# --- constants ---------------------------------------------------------------

IPPROTO_NONE = 59  # Payload Proto senders SHOULD use (RFC 6275 §6.1.1)
IPPROTO_MH = 135  # Next Header in the checksum pseudo-header (RFC 6275 §6.1.1)

MH_TYPE_BU = 5  # RFC 6275 §6.1.7
MH_TYPE_BA = 6  # RFC 6275 §6.1.8

# BA Status (RFC 6275 §6.1.8; 176 from RFC 6618 §8.2).  < 128 = accepted.
ACCEPTED = 0
REASON_UNSPECIFIED = 128
NOT_HOME_AGENT = 133  # "Not home agent for this mobile node" (PROFILE §8)
SEQUENCE_OUT_OF_WINDOW = 135
REINIT_SA_WITH_HAC = 176

# IPv4 Address Acknowledgement Status (RFC 5555 §3.2.1).  < 128 = success.
IPV4_ACK_SUCCESS = 0
IPV4_ACK_REASON_UNSPECIFIED = 128
IPV4_ACK_ADMIN_PROHIBITED = 129
IPV4_ACK_INCORRECT_HOA = 130
IPV4_ACK_INVALID_ADDRESS = 131
IPV4_ACK_DYNAMIC_NOT_AVAILABLE = 132
IPV4_ACK_PREFIX_UNAUTHORIZED = 133

_OPT_PAD1 = 0  # RFC 6275 §6.2.2
_OPT_PADN = 1  # RFC 6275 §6.2.3
_OPT_ALT_COA = 3  # RFC 6275 §6.2.5
_OPT_IPV4_HOA = 29  # RFC 5555 §3.1.1
_OPT_IPV4_ACK = 30  # RFC 5555 §3.2.1
_OPT_IPV4_COA = 32  # RFC 5555 §3.1.2

_MH_FIXED = 6  # Payload Proto, Header Len, MH Type, Reserved, Checksum
_BODY_LEN = 6  # BU and BA message data before the options (§6.1.7, §6.1.8)
_OPTIONS_START = _MH_FIXED + _BODY_LEN  # = 12 for both BU and BA
_MAX_MH_LEN = (0xFF + 1) * 8  # Header Len is one octet of 8-octet units

# BU flag bits in the octet after the Sequence # (RFC 6275 §6.1.7).
_BU_A = 0x80
_BU_H = 0x40
_BU_L = 0x20
_BU_K = 0x10
_BA_K = 0x80  # RFC 6275 §6.1.8


def _check_range(name: str, value: int, bits: int) -> None:
    # Constructor checks are for *callers* (LocalProtocolError): the decoder
    # only ever produces in-range values.
    if not 0 <= value < (1 << bits):
        raise LocalProtocolError(f"{name} must fit in {bits} bits, got {value}")


# --- alignment (RFC 6275 §6.2.1, RFC 2460 §4.2 "xn+y") -----------------------


def align_padding(offset: int, x: int, y: int) -> int:
    """Octets of padding to put before an option that starts at ``offset``.

    RFC 6275 §6.2.1 alignment ``xn+y``: the Option Type octet must sit an
    integer multiple of ``x`` octets plus ``y`` from the start of the Mobility
    Header.  ``x == 1`` means no requirement.
    """
    if x < 1 or not 0 <= y < x:
        raise LocalProtocolError(f"bad alignment {x}n+{y}")
    return (y - offset) % x


def pad_octets(n: int) -> bytes:
    """``n`` octets of padding as options: Pad1 for one, else one PadN.

    RFC 6275 §6.2.2 asks for PadN (not several Pad1) whenever two or more
    octets are needed; PadN data is N-2 zero octets (§6.2.3).
    """
    if n == 0:
        return b""
    if n == 1:
        return bytes([_OPT_PAD1])
    if not 2 <= n <= 0xFF + 2:
        raise LocalProtocolError(f"cannot pad {n} octets with one PadN")
    return bytes([_OPT_PADN, n - 2]) + bytes(n - 2)


# --- mobility options --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlternateCareOfAddress:
    """RFC 6275 §6.2.5, type 3, alignment 8n+6 (so the address is 8-aligned)."""

    address: IPv6Address

    ALIGNMENT: ClassVar[tuple[int, int]] = (8, 6)
    OPTION_TYPE: ClassVar[int] = _OPT_ALT_COA

    def _data(self) -> bytes:
        return self.address.packed


@dataclass(frozen=True, slots=True)
class IPv4HomeAddressRequest:
    """RFC 5555 §3.1.1 IPv4 Home Address option, type 29, alignment 4n.

    ``home_address`` 0.0.0.0 asks the HA to assign one; ``p`` requests a
    mobile network prefix.  ``prefix_len`` is 6 bits on the wire.
    """

    prefix_len: int
    home_address: IPv4Address
    p: bool = False

    ALIGNMENT: ClassVar[tuple[int, int]] = (4, 0)
    OPTION_TYPE: ClassVar[int] = _OPT_IPV4_HOA

    def __post_init__(self) -> None:
        _check_range("prefix_len", self.prefix_len, 6)

    def _data(self) -> bytes:
        # Prefix-len (6) | P (1) | Reserved (9), then the address.
        bits = (self.prefix_len << 10) | (0x0200 if self.p else 0)
        return struct.pack("!H", bits) + self.home_address.packed


@dataclass(frozen=True, slots=True)
class IPv4AddressAck:
    """RFC 5555 §3.2.1 IPv4 Address Acknowledgement, type 30, alignment 4n."""

    status: int
    prefix_len: int
    home_address: IPv4Address

    ALIGNMENT: ClassVar[tuple[int, int]] = (4, 0)
    OPTION_TYPE: ClassVar[int] = _OPT_IPV4_ACK

    def __post_init__(self) -> None:
        _check_range("status", self.status, 8)
        _check_range("prefix_len", self.prefix_len, 6)

    @property
    def accepted(self) -> bool:
        return self.status < 128

    def _data(self) -> bytes:
        # Status (8) | Pref-len (6) | Res (2), then the address.
        return bytes([self.status, self.prefix_len << 2]) + self.home_address.packed


@dataclass(frozen=True, slots=True)
class IPv4CareOfAddress:
    """RFC 5555 §3.1.2 IPv4 Care-of Address option, type 32, alignment 4n."""

    address: IPv4Address

    ALIGNMENT: ClassVar[tuple[int, int]] = (4, 0)
    OPTION_TYPE: ClassVar[int] = _OPT_IPV4_COA

    def _data(self) -> bytes:
        return bytes(2) + self.address.packed  # Reserved (16), then the address


_KNOWN_OPTION_TYPES = frozenset(
    {_OPT_PAD1, _OPT_PADN, _OPT_ALT_COA, _OPT_IPV4_HOA, _OPT_IPV4_ACK, _OPT_IPV4_COA}
)


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """An option this codec does not interpret, kept verbatim (RFC 6275 §6.2.1).

    It is re-encoded without alignment requirement: we cannot know its own.
    """

    option_type: int
    data: bytes = b""

    ALIGNMENT: ClassVar[tuple[int, int]] = (1, 0)

    def __post_init__(self) -> None:
        _check_range("option_type", self.option_type, 8)
        if self.option_type in _KNOWN_OPTION_TYPES:
            # Encoding it would decode as padding or as a typed option: the
            # round trip would silently change the message.
            raise LocalProtocolError(
                f"option_type {self.option_type} is padding or a known option; use its own class"
            )
        if len(self.data) > 0xFF:
            raise LocalProtocolError(f"option data is {len(self.data)} octets, max 255")

    def _data(self) -> bytes:
        return bytes(self.data)


MobilityOption: TypeAlias = (
    AlternateCareOfAddress
    | IPv4HomeAddressRequest
    | IPv4AddressAck
    | IPv4CareOfAddress
    | UnknownOption
)


def _option_type(opt: MobilityOption) -> int:
    if isinstance(opt, UnknownOption):
        return opt.option_type
    return opt.OPTION_TYPE


# --- messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindingUpdate:
    """RFC 6275 §6.1.7 (MH Type 5).  ``lifetime`` is in 4-second units."""

    sequence: int
    a: bool = False  # Acknowledge requested
    h: bool = False  # Home Registration
    l: bool = False  # noqa: E741 -- RFC letter: Link-Local Address Compatibility
    k: bool = False  # Key Management Mobility Capability
    lifetime: int = 0
    options: tuple[MobilityOption, ...] = ()

    def __post_init__(self) -> None:
        _check_range("sequence", self.sequence, 16)
        _check_range("lifetime", self.lifetime, 16)

    @property
    def lifetime_seconds(self) -> int:
        return self.lifetime * 4


@dataclass(frozen=True, slots=True)
class BindingAck:
    """RFC 6275 §6.1.8 (MH Type 6).  ``lifetime`` is in 4-second units."""

    status: int
    k: bool = False  # Key Management Mobility Capability
    sequence: int = 0
    lifetime: int = 0
    options: tuple[MobilityOption, ...] = ()

    def __post_init__(self) -> None:
        _check_range("status", self.status, 8)
        _check_range("sequence", self.sequence, 16)
        _check_range("lifetime", self.lifetime, 16)

    @property
    def lifetime_seconds(self) -> int:
        return self.lifetime * 4

    @property
    def accepted(self) -> bool:
        return self.status < 128  # RFC 6275 §6.1.8


MobilityMessage: TypeAlias = BindingUpdate | BindingAck


@dataclass(frozen=True, slots=True)
class DecodedMH:
    """Result of :func:`decode_mh`; ``checksum`` is the value received."""

    message: MobilityMessage
    checksum_ok: bool
    checksum: int


def lifetime_units(seconds: int) -> int:
    """Seconds to the 4-second wire unit, rounded down, capped at 0xFFFF."""
    if seconds < 0:
        raise LocalProtocolError(f"lifetime must be >= 0 s, got {seconds}")
    return min(seconds // 4, 0xFFFF)


def seq_newer(a: int, b: int) -> bool:
    """True when BU sequence ``a`` is greater than ``b`` (RFC 6275 §9.5.1).

    Modulo 2^16: ``b`` and the 32768 values before it count as "less than or
    equal", so ``a`` is newer exactly when (a - b) mod 2^16 is in 1..32767.
    """
    return 1 <= ((a - b) & 0xFFFF) <= 0x7FFF


# --- checksum (RFC 6275 §6.1.1, RFC 2460 §8.1) -------------------------------


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    # One C-level unpack of all 16-bit words: the per-word generator was the
    # HA's hottest line (every BU and BA is summed once).
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo_header(src: IPv6Address, dst: IPv6Address, length: int) -> bytes:
    # Source, Destination, Upper-Layer Packet Length (32), zero (24), Next Header.
    return src.packed + dst.packed + struct.pack("!I3xB", length, IPPROTO_MH)


# --- encoder -----------------------------------------------------------------


def _encode_options(options: tuple[MobilityOption, ...]) -> bytes:
    out = bytearray()
    offset = _OPTIONS_START
    for opt in options:
        pad = pad_octets(align_padding(offset, *opt.ALIGNMENT))
        data = opt._data()
        out += pad + bytes([_option_type(opt), len(data)]) + data
        offset += len(pad) + 2 + len(data)
    out += pad_octets(align_padding(offset, 8, 0))  # whole MH: multiple of 8
    return bytes(out)


def encode_mh(msg: MobilityMessage, *, src: IPv6Address, dst: IPv6Address) -> bytes:
    """Encode a BU or BA as a complete Mobility Header with its checksum.

    ``src``/``dst`` are the pseudo-header addresses (PROFILE §8: BU HoA -> HA,
    BA HA -> HoA, ``::`` where unknown), not necessarily the outer packet's.
    """
    if isinstance(msg, BindingUpdate):
        mh_type = MH_TYPE_BU
        flags = (
            (_BU_A if msg.a else 0)
            | (_BU_H if msg.h else 0)
            | (_BU_L if msg.l else 0)
            | (_BU_K if msg.k else 0)
        )
        body = struct.pack("!HBxH", msg.sequence, flags, msg.lifetime)
    elif isinstance(msg, BindingAck):
        mh_type = MH_TYPE_BA
        body = struct.pack("!BBHH", msg.status, _BA_K if msg.k else 0, msg.sequence, msg.lifetime)
    else:
        raise LocalProtocolError(f"cannot encode {type(msg).__name__} as a Mobility Header")
    options = _encode_options(msg.options)
    length = _OPTIONS_START + len(options)
    if length > _MAX_MH_LEN:
        raise LocalProtocolError(f"Mobility Header would be {length} octets, max {_MAX_MH_LEN}")
    header = struct.pack("!BBBBH", IPPROTO_NONE, length // 8 - 1, mh_type, 0, 0)
    mh = bytearray(header + body + options)
    checksum = ~_ones_sum(_pseudo_header(src, dst, length) + mh) & 0xFFFF
    struct.pack_into("!H", mh, 4, checksum)
    return bytes(mh)


# --- decoder -----------------------------------------------------------------

_FIXED_OPTION_LENGTH = {
    _OPT_ALT_COA: ("alt_coa.length", 16),
    _OPT_IPV4_HOA: ("ipv4_hoa.length", 6),
    _OPT_IPV4_ACK: ("ipv4_ack.length", 6),
    _OPT_IPV4_COA: ("ipv4_coa.length", 6),
}


def _decode_option(opt_type: int, data: bytes) -> MobilityOption:
    fixed = _FIXED_OPTION_LENGTH.get(opt_type)
    if fixed is not None and len(data) != fixed[1]:
        raise MobilityHeaderError(
            fixed[0], f"option type {opt_type} has length {len(data)}, expected {fixed[1]}"
        )
    if opt_type == _OPT_ALT_COA:
        return AlternateCareOfAddress(IPv6Address(data))
    if opt_type == _OPT_IPV4_HOA:
        bits = int.from_bytes(data[0:2], "big")  # low 9 bits Reserved: ignored
        return IPv4HomeAddressRequest(bits >> 10, IPv4Address(data[2:6]), bool(bits & 0x0200))
    if opt_type == _OPT_IPV4_ACK:
        return IPv4AddressAck(data[0], data[1] >> 2, IPv4Address(data[2:6]))
    if opt_type == _OPT_IPV4_COA:
        return IPv4CareOfAddress(IPv4Address(data[2:6]))  # data[0:2] Reserved
    return UnknownOption(opt_type, data)


def _decode_options(data: bytes, start: int) -> tuple[MobilityOption, ...]:
    options: list[MobilityOption] = []
    i = start
    end = len(data)
    while i < end:
        opt_type = data[i]
        if opt_type == _OPT_PAD1:  # the one option without a length (§6.2.2)
            i += 1
            continue
        if i + 2 > end:
            raise MobilityHeaderError(
                "option_length", f"option type {opt_type} at offset {i} has no length octet"
            )
        opt_end = i + 2 + data[i + 1]
        if opt_end > end:
            raise MobilityHeaderError(
                "option_length",
                f"option type {opt_type} at offset {i} runs {opt_end - end} octets "
                "past the end of the Mobility Header",
            )
        if opt_type != _OPT_PADN:  # PadN data MUST be ignored (§6.2.3)
            options.append(_decode_option(opt_type, data[i + 2 : opt_end]))
        i = opt_end
    return tuple(options)


def decode_mh(data: bytes, *, src: IPv6Address, dst: IPv6Address) -> DecodedMH:
    """Decode a complete Mobility Header carrying a BU or BA.

    ``data`` must be exactly the Mobility Header (Payload Proto 59: nothing
    follows it).  Raises :class:`MobilityHeaderError` naming the field.
    """
    data = bytes(data)
    if len(data) < 8:
        raise MobilityHeaderError("length", f"{len(data)} octets, a Mobility Header has at least 8")
    payload_proto, header_len, mh_type, _reserved, checksum = struct.unpack_from("!BBBBH", data)
    # Reserved is ignored by the receiver (RFC 6275 §6.1.1).
    if payload_proto != IPPROTO_NONE:
        raise MobilityHeaderError(
            "payload_proto", f"{payload_proto}, expected {IPPROTO_NONE} (no next header)"
        )
    if (header_len + 1) * 8 != len(data):
        raise MobilityHeaderError(
            "header_len",
            f"{header_len} means {(header_len + 1) * 8} octets, data has {len(data)}",
        )
    if mh_type not in (MH_TYPE_BU, MH_TYPE_BA):
        raise MobilityHeaderError("mh_type", f"{mh_type} not supported (only 5 = BU and 6 = BA)")
    if len(data) < _OPTIONS_START:  # Header Len 0 cannot hold a BU/BA body
        raise MobilityHeaderError("header_len", f"{header_len} too small for MH type {mh_type}")
    options = _decode_options(data, _OPTIONS_START)
    msg: MobilityMessage
    if mh_type == MH_TYPE_BU:
        sequence, flags, lifetime = struct.unpack_from("!HBxH", data, _MH_FIXED)
        msg = BindingUpdate(
            sequence=sequence,
            a=bool(flags & _BU_A),
            h=bool(flags & _BU_H),
            l=bool(flags & _BU_L),
            k=bool(flags & _BU_K),
            lifetime=lifetime,
            options=options,
        )
    else:
        status, kbits, sequence, lifetime = struct.unpack_from("!BBHH", data, _MH_FIXED)
        msg = BindingAck(
            status=status,
            k=bool(kbits & _BA_K),
            sequence=sequence,
            lifetime=lifetime,
            options=options,
        )
    # Summing the header with its checksum in place gives 0xFFFF when intact
    # (RFC 1071); a mismatch is reported, not raised (PROFILE §8).
    checksum_ok = _ones_sum(_pseudo_header(src, dst, len(data)) + data) == 0xFFFF
    return DecodedMH(message=msg, checksum_ok=checksum_ok, checksum=checksum)
