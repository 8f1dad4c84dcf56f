"""EAP packets (RFC 3748 §4-§5), sans-I/O.

One whole EAP packet is what ``eap-payload`` carries (PROFILE §3) and what a
RADIUS EAP-Message attribute chain joins to (RFC 3579 §3.1).  This codec
parses and builds the header (Code, Identifier, Length), the Type of a
Request/Response -- including expanded types (Type 254, RFC 3748 §5.7) --
and the type-data of the types every peer and authenticator must know:
Identity (1), Notification (2) and Nak (3, and the expanded Nak of §5.7).

Strict: the Length field must equal the packet length; Success and Failure
are exactly 4 octets; a Request/Response needs a Type; an expanded header
needs its 7 octets.  Every error is an :class:`EapError` naming the field.
Method type-data (EAP-TLS, EAP-AKA...) is opaque here: methods parse it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mipsec.core.errors import LocalProtocolError, WireError

__all__ = [
    "EAP_HEADER_LEN",
    "EXPANDED_NAK",
    "EapCode",
    "EapError",
    "EapPacket",
    "EapType",
    "ExpandedType",
    "decode_eap",
    "encode_eap",
    "expanded_nak_data",
    "failure",
    "identity_request",
    "legacy_nak_data",
    "method_key",
    "method_response",
    "next_identifier",
    "parse_expanded_nak",
    "parse_legacy_nak",
    "success",
]

EAP_HEADER_LEN = 4
EXPANDED_HEADER_LEN = 8  # Type (254) + Vendor-Id (3) + Vendor-Type (4)
MAX_EAP_LEN = 65535


class EapError(WireError):
    """A malformed EAP packet (RFC 3748 §4); ``field`` names what was wrong."""


class EapCode(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    SUCCESS = 3
    FAILURE = 4


class EapType(enum.IntEnum):
    """IANA EAP method types this project names (RFC 3748 §5, §6.2)."""

    IDENTITY = 1
    NOTIFICATION = 2
    NAK = 3  # legacy Nak, Response only
    MD5 = 4
    GTC = 6
    TLS = 13  # RFC 5216 / RFC 9190
    SIM = 18  # RFC 4186
    TTLS = 21
    AKA = 23  # RFC 4187
    PEAP = 25
    MSCHAPV2 = 26
    PWD = 52
    AKA_PRIME = 50  # RFC 5448 / RFC 9048
    EXPANDED = 254  # RFC 3748 §5.7
    EXPERIMENTAL = 255


@dataclass(frozen=True, slots=True, order=True)
class ExpandedType:
    """An expanded method type (RFC 3748 §5.7): Vendor-Id (24 bits), Vendor-Type (32)."""

    vendor_id: int
    vendor_type: int

    def __post_init__(self) -> None:
        if not 0 <= self.vendor_id < 1 << 24 or not 0 <= self.vendor_type < 1 << 32:
            raise LocalProtocolError("expanded type: vendor id or type out of range")


# Vendor-Id 0 (IETF), Vendor-Type 3: the expanded Nak (RFC 3748 §5.7).
EXPANDED_NAK = ExpandedType(0, EapType.NAK)

MethodKey = int | ExpandedType  # a legacy type number or an expanded type


def method_key(type_: int, expanded: ExpandedType | None) -> MethodKey:
    """The key a method is registered under: the legacy Type, or the expanded pair.

    An expanded type with Vendor-Id 0 names the IETF legacy type of the same
    number (§5.7: "Vendor-Id of 0 ... same Type as the legacy Type field").
    """
    if type_ != EapType.EXPANDED or expanded is None:
        return type_
    if expanded.vendor_id == 0 and expanded.vendor_type < EapType.EXPANDED:
        return expanded.vendor_type
    return expanded


@dataclass(frozen=True, slots=True)
class EapPacket:
    """One EAP packet.  ``type`` is None for Success/Failure; ``expanded`` is
    set when ``type`` is 254; ``data`` is the type-data after the (expanded)
    type header."""

    code: EapCode
    identifier: int
    type: int | None = None
    data: bytes = b""
    expanded: ExpandedType | None = None

    @property
    def method(self) -> MethodKey | None:
        """The method key (see :func:`method_key`), None for Success/Failure."""
        if self.type is None:
            return None
        return method_key(self.type, self.expanded)

    @property
    def is_request(self) -> bool:
        return self.code is EapCode.REQUEST

    @property
    def is_response(self) -> bool:
        return self.code is EapCode.RESPONSE

    def __len__(self) -> int:
        if self.type is None:
            return EAP_HEADER_LEN
        head = EXPANDED_HEADER_LEN if self.type == EapType.EXPANDED else 1
        return EAP_HEADER_LEN + head + len(self.data)


def method_response(request: EapPacket, data: bytes) -> EapPacket:
    """The Response to a method's ``request`` carrying ``data``, in the request's
    Type form: legacy for a legacy Type, expanded (same Vendor-Id and
    Vendor-Type) for an expanded one.

    RFC 3748 §5.7 makes both forms of an IETF Type (Vendor-Id 0) mean the
    same, so the server that chose a form accepts it back; and a method whose
    integrity check covers the EAP header (RFC 4187 §10.15: AT_MAC over the
    whole packet) computes it over this very packet.  The MN's framework and
    its methods build responses here only, so the two cannot disagree (before
    the twenty-ninth session the framework answered an expanded EAP-AKA
    request in the legacy form while AT_MAC covered the expanded one; found
    in review).
    """
    return EapPacket(EapCode.RESPONSE, request.identifier, request.type, data, request.expanded)


def decode_eap(packet: bytes, *, max_len: int = MAX_EAP_LEN) -> EapPacket:
    """Parse one whole EAP packet.  Raises :class:`EapError` naming the field."""
    n = len(packet)
    if n < EAP_HEADER_LEN:
        raise EapError("eap.length", f"{n} octets, shorter than the 4-octet header")
    if n > max_len:
        raise EapError("eap.length", f"{n} octets, more than the limit of {max_len}")
    try:
        code = EapCode(packet[0])
    except ValueError:
        raise EapError("eap.code", f"unknown Code {packet[0]}") from None
    identifier = packet[1]
    length = int.from_bytes(packet[2:4], "big")
    if length != n:
        raise EapError("eap.length", f"Length field {length} does not match {n} octets")
    if code in (EapCode.SUCCESS, EapCode.FAILURE):
        # RFC 3748 §4.2: Success/Failure carry no data; Length is 4.
        if n != EAP_HEADER_LEN:
            raise EapError("eap.length", f"{code.name.title()} must be 4 octets, got {n}")
        return EapPacket(code, identifier)
    if n < EAP_HEADER_LEN + 1:
        raise EapError("eap.type", f"{code.name.title()} without a Type")
    type_ = packet[4]
    if type_ == 0:
        raise EapError("eap.type", "Type 0 is reserved")
    if type_ == EapType.EXPANDED:
        if n < EAP_HEADER_LEN + EXPANDED_HEADER_LEN:
            raise EapError("eap.expanded", "expanded Type header shorter than 8 octets")
        vendor_id = int.from_bytes(packet[5:8], "big")
        vendor_type = int.from_bytes(packet[8:12], "big")
        if code is EapCode.REQUEST and vendor_id == 0 and vendor_type == EapType.NAK:
            # RFC 3748 §5.3.2: an Expanded Nak, like a Nak, is Response-only.
            raise EapError("eap.type", "Expanded Nak (254/0/3) is a Response-only Type")
        return EapPacket(
            code, identifier, type_, bytes(packet[12:]), ExpandedType(vendor_id, vendor_type)
        )
    if type_ == EapType.NAK and code is EapCode.REQUEST:
        raise EapError("eap.type", "Nak (3) is a Response-only Type")
    return EapPacket(code, identifier, type_, bytes(packet[5:]))


def encode_eap(pkt: EapPacket) -> bytes:
    """Build the octets of ``pkt`` (raises LocalProtocolError on an unsendable packet)."""
    if not 0 <= pkt.identifier <= 255:
        raise LocalProtocolError("eap identifier: outside 0..255")
    if pkt.code in (EapCode.SUCCESS, EapCode.FAILURE):
        if pkt.type is not None or pkt.data:
            raise LocalProtocolError("eap: Success/Failure carry no Type or data")
        return bytes((pkt.code, pkt.identifier, 0, EAP_HEADER_LEN))
    if pkt.type is None or not 1 <= pkt.type <= 255:
        raise LocalProtocolError("eap type: a Request/Response needs a Type 1..255")
    if pkt.type == EapType.EXPANDED:
        if pkt.expanded is None:
            raise LocalProtocolError("eap type: Type 254 needs an ExpandedType")
        head = (
            bytes((pkt.type,))
            + pkt.expanded.vendor_id.to_bytes(3, "big")
            + pkt.expanded.vendor_type.to_bytes(4, "big")
        )
    else:
        head = bytes((pkt.type,))
    length = EAP_HEADER_LEN + len(head) + len(pkt.data)
    if length > MAX_EAP_LEN:
        raise LocalProtocolError(f"eap length: {length} octets do not fit 16 bits")
    return bytes((pkt.code, pkt.identifier)) + length.to_bytes(2, "big") + head + pkt.data


def next_identifier(identifier: int) -> int:
    """RFC 3748 §4.1: a new Request gets a different Identifier (mod 256)."""
    return (identifier + 1) & 0xFF


def identity_request(identifier: int) -> bytes:
    """EAP-Request/Identity with an empty prompt (PROFILE §4 EAP step 2)."""
    return encode_eap(EapPacket(EapCode.REQUEST, identifier, EapType.IDENTITY))


def success(identifier: int) -> bytes:
    return encode_eap(EapPacket(EapCode.SUCCESS, identifier))


def failure(identifier: int) -> bytes:
    return encode_eap(EapPacket(EapCode.FAILURE, identifier))


def parse_identity(data: bytes, *, field: str = "eap.identity") -> str:
    """The identity in an Identity Response (UTF-8, RFC 3748 §5.1; no NUL)."""
    if b"\x00" in data:
        raise EapError(field, "NUL octet in the identity")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise EapError(field, "identity is not UTF-8") from None


def legacy_nak_data(types: list[int]) -> bytes:
    """Type-data of a legacy Nak (§5.3.1): the desired types, 0 = none acceptable."""
    if not types:
        return b"\x00"
    if any(not 4 <= t <= 254 for t in types):
        raise LocalProtocolError("nak: desired types must be 4..254 (254 = expanded)")
    return bytes(types)


def parse_legacy_nak(data: bytes) -> list[int]:
    """Desired types of a legacy Nak; [] when the peer offers none (a single 0)."""
    if not data:
        raise EapError("eap.nak", "a Nak must list at least one type (0 = none)")
    if data == b"\x00":
        return []
    types = list(data)
    if any(t < 4 and t != 0 for t in types) or 0 in types:
        raise EapError("eap.nak", "a Nak may only name method types (4 and up)")
    return types


def expanded_nak_data(types: list[MethodKey]) -> bytes:
    """Type-data of an expanded Nak (§5.3.2): 8-octet expanded types, or one of zeros."""
    out = bytearray()
    for t in types or [ExpandedType(0, 0)]:
        e = t if isinstance(t, ExpandedType) else ExpandedType(0, int(t))
        out += bytes((EapType.EXPANDED,)) + e.vendor_id.to_bytes(3, "big")
        out += e.vendor_type.to_bytes(4, "big")
    return bytes(out)


def parse_expanded_nak(data: bytes) -> list[MethodKey]:
    """Desired methods of an expanded Nak; [] when it names none."""
    if not data or len(data) % EXPANDED_HEADER_LEN:
        raise EapError("eap.nak", "expanded Nak data is not a list of 8-octet types")
    out: list[MethodKey] = []
    for i in range(0, len(data), EXPANDED_HEADER_LEN):
        if data[i] != EapType.EXPANDED:
            raise EapError("eap.nak", "expanded Nak entry does not start with Type 254")
        vendor_id = int.from_bytes(data[i + 1 : i + 4], "big")
        vendor_type = int.from_bytes(data[i + 4 : i + 8], "big")
        if vendor_id == 0 and vendor_type == 0:
            continue  # "no alternative"
        out.append(method_key(EapType.EXPANDED, ExpandedType(vendor_id, vendor_type)))
    return out
