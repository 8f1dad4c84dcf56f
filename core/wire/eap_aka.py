"""EAP-AKA / EAP-AKA' type-data (RFC 4187 §8-§11, RFC 5448 §3.1-§4), sans-I/O.

The type-data of an EAP-AKA(') packet is ``Subtype (1) | Reserved (2) |
attributes``; an attribute is ``Type (1) | Length (1, in 4-octet units, type
and length included) | value``.  Types 0-127 are non-skippable: an unknown one
is an error; 128-255 are skippable: an unknown one is kept aside and ignored
(RFC 4187 §8.1).

:func:`decode_aka` checks every attribute it knows against its exact format
-- fixed lengths, the RES length in bits (32..128), the "actual length"
fields of AT_IDENTITY / AT_KDF_INPUT / AT_NEXT_*, at most three zero pad
octets, an AT_CHECKCODE of 0, 20 or 32 octets, AT_ENCR_DATA in whole AES
blocks, an all-zero AT_PADDING -- and refuses a repeated attribute (AT_KDF
alone may repeat, RFC 5448 §3.2).  Every failure is an :class:`AkaError`
whose ``field`` names the attribute.  Which attributes a given message may
carry is the protocol machine's business, not the codec's.

Builders (``flag``, ``u16``, ``reserved_value``, ``string``, ``res``,
``auts``, ``padding``) return one encoded attribute; :func:`encode_aka`
joins them after the header.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from mipsec.core.errors import LocalProtocolError, WireError

__all__ = [
    "MAC_VALUE_LEN",
    "AkaAttributes",
    "AkaError",
    "AkaMessage",
    "Attr",
    "Subtype",
    "auts",
    "decode_aka",
    "decode_attributes",
    "encode_aka",
    "flag",
    "padding",
    "res",
    "reserved_value",
    "string",
    "u16",
    "zero_mac",
]

HEADER_LEN = 3  # Subtype + Reserved
MAC_VALUE_LEN = 16
AUTS_LEN = 14
RES_MIN_BITS, RES_MAX_BITS = 32, 128  # RFC 4187 §10.8 (TS 33.105)
CHECKCODE_LENS = (0, 20, 32)  # none, SHA-1 (RFC 4187), SHA-256 (RFC 5448 §3.4.3)
AES_BLOCK = 16


class AkaError(WireError):
    """Malformed EAP-AKA(') type-data; ``field`` names the attribute or header part."""


class Subtype(enum.IntEnum):
    """RFC 4187 §11 EAP-AKA Subtypes (shared by EAP-AKA')."""

    CHALLENGE = 1
    AUTHENTICATION_REJECT = 2
    SYNCHRONIZATION_FAILURE = 4
    IDENTITY = 5
    NOTIFICATION = 12
    REAUTHENTICATION = 13
    CLIENT_ERROR = 14


class Attr(enum.IntEnum):
    """Attribute types (RFC 4187 §11, RFC 5448 §3.1, §3.2, §4)."""

    AT_RAND = 1
    AT_AUTN = 2
    AT_RES = 3
    AT_AUTS = 4
    AT_PADDING = 6
    AT_PERMANENT_ID_REQ = 10
    AT_MAC = 11
    AT_NOTIFICATION = 12
    AT_ANY_ID_REQ = 13
    AT_IDENTITY = 14
    AT_FULLAUTH_ID_REQ = 17
    AT_COUNTER = 19
    AT_COUNTER_TOO_SMALL = 20
    AT_NONCE_S = 21
    AT_CLIENT_ERROR_CODE = 22
    AT_KDF_INPUT = 23
    AT_KDF = 24
    AT_IV = 129
    AT_ENCR_DATA = 130
    AT_NEXT_PSEUDONYM = 132
    AT_NEXT_REAUTH_ID = 133
    AT_CHECKCODE = 134
    AT_RESULT_IND = 135
    AT_BIDDING = 136


def _name(t: int) -> str:
    try:
        return Attr(t).name
    except ValueError:
        return f"attribute {t}"


# The value formats (value = everything after Type and Length).
_FLAGS = {
    Attr.AT_PERMANENT_ID_REQ,
    Attr.AT_ANY_ID_REQ,
    Attr.AT_FULLAUTH_ID_REQ,
    Attr.AT_RESULT_IND,
    Attr.AT_COUNTER_TOO_SMALL,
}  # Reserved (2), ignored on receipt
_U16 = {
    Attr.AT_NOTIFICATION,
    Attr.AT_CLIENT_ERROR_CODE,
    Attr.AT_COUNTER,
    Attr.AT_KDF,
    Attr.AT_BIDDING,
}
_RESERVED_16 = {Attr.AT_RAND, Attr.AT_AUTN, Attr.AT_MAC, Attr.AT_IV, Attr.AT_NONCE_S}
_STRINGS = {Attr.AT_IDENTITY, Attr.AT_KDF_INPUT, Attr.AT_NEXT_PSEUDONYM, Attr.AT_NEXT_REAUTH_ID}


@dataclass(frozen=True, slots=True)
class AkaAttributes:
    """The attributes of one message (or of one decrypted AT_ENCR_DATA), typed.

    ``id_req`` is the identity-request attribute (AT_PERMANENT_ID_REQ,
    AT_FULLAUTH_ID_REQ or AT_ANY_ID_REQ) or None; ``id_reqs`` counts them
    (RFC 4187 §9.1 allows exactly one).  ``mac_offset`` is where the 16-octet
    MAC value starts in the type-data, for zeroing it (RFC 4187 §10.15).
    ``present`` lists every known type seen, in order; ``unknown`` the
    skippable types that were ignored.
    """

    present: tuple[Attr, ...] = ()
    unknown: tuple[int, ...] = ()
    rand: bytes | None = None
    autn: bytes | None = None
    res: bytes | None = field(default=None, repr=False)
    res_bits: int = 0
    auts: bytes | None = None
    mac: bytes | None = None
    mac_offset: int = -1
    identity: bytes | None = None
    id_req: Attr | None = None
    id_reqs: int = 0
    notification: int | None = None
    client_error_code: int | None = None
    counter: int | None = None
    counter_too_small: bool = False
    nonce_s: bytes | None = None
    kdf_input: bytes | None = None
    kdfs: tuple[int, ...] = ()
    iv: bytes | None = None
    encr_data: bytes | None = None
    next_pseudonym: bytes | None = None
    next_reauth_id: bytes | None = None
    checkcode: bytes | None = None
    result_ind: bool = False
    bidding: int | None = None
    padding: int = 0  # length of the AT_PADDING attribute, 0 = none


@dataclass(frozen=True, slots=True)
class AkaMessage:
    subtype: int
    attrs: AkaAttributes


def _string_value(t: Attr, value: bytes) -> bytes:
    """Actual Length (2) | data | 0..3 zero octets (RFC 4187 §10.5, RFC 5448 §3.1)."""
    n = int.from_bytes(value[:2], "big")
    if n > len(value) - 2:
        raise AkaError(f"eap-aka.{t.name}", f"actual length {n} exceeds the attribute")
    pad = value[2 + n :]
    if len(pad) > 3:
        raise AkaError(f"eap-aka.{t.name}", f"{len(pad)} padding octets (at most 3)")
    if any(pad):
        raise AkaError(f"eap-aka.{t.name}", "non-zero padding")
    return value[2 : 2 + n]


def _res_value(value: bytes) -> tuple[bytes, int]:
    """RES Length (2, in bits) | RES | zero bits to a 4-octet boundary (RFC 4187 §10.8)."""
    bits = int.from_bytes(value[:2], "big")
    if not RES_MIN_BITS <= bits <= RES_MAX_BITS:
        raise AkaError("eap-aka.AT_RES", f"RES length {bits} bits outside 32..128")
    n = (bits + 7) // 8
    if n > len(value) - 2 or len(value) - 2 - n > 3:
        raise AkaError("eap-aka.AT_RES", "attribute length does not fit the RES length")
    return value[2 : 2 + n], bits


def decode_attributes(data: bytes, base: int = 0) -> AkaAttributes:
    """Parse a run of attributes (``base`` = offset of ``data`` in the type-data)."""
    out: dict[str, object] = {}
    present: list[Attr] = []
    unknown: list[int] = []
    kdfs: list[int] = []
    i = 0
    while i < len(data):
        if len(data) - i < 4:
            raise AkaError("eap-aka.attribute", f"{len(data) - i} trailing octets at {base + i}")
        t, units = data[i], data[i + 1]
        if units == 0:
            raise AkaError(f"eap-aka.{_name(t)}", "Length 0")
        end = i + units * 4
        if end > len(data):
            raise AkaError(f"eap-aka.{_name(t)}", f"Length {units * 4} runs past the message")
        value = data[i + 2 : end]
        try:
            at = Attr(t)
        except ValueError:
            if t < 128:
                raise AkaError(f"eap-aka.{_name(t)}", "unrecognized non-skippable attribute")
            unknown.append(t)
            i = end
            continue
        if at in present and at is not Attr.AT_KDF:
            raise AkaError(f"eap-aka.{at.name}", "duplicate attribute")
        present.append(at)
        _decode_one(at, value, base + i, out, kdfs)
        i = end
    ids = [
        a
        for a in present
        if a in (Attr.AT_PERMANENT_ID_REQ, Attr.AT_ANY_ID_REQ, Attr.AT_FULLAUTH_ID_REQ)
    ]
    return AkaAttributes(
        present=tuple(present),
        unknown=tuple(unknown),
        kdfs=tuple(kdfs),
        id_req=ids[0] if ids else None,
        id_reqs=len(ids),
        **out,  # type: ignore[arg-type]
    )


def _need(at: Attr, value: bytes, n: int) -> None:
    if len(value) != n:
        raise AkaError(f"eap-aka.{at.name}", f"Length {len(value) + 2} (must be {n + 2})")


def _decode_one(
    at: Attr, value: bytes, offset: int, out: dict[str, object], kdfs: list[int]
) -> None:
    key = at.name[3:].lower()  # AT_NEXT_PSEUDONYM -> next_pseudonym
    if at in _FLAGS:
        _need(at, value, 2)
        if at is Attr.AT_RESULT_IND or at is Attr.AT_COUNTER_TOO_SMALL:
            out[key] = True
    elif at in _U16:
        _need(at, value, 2)
        v = int.from_bytes(value, "big")
        if at is Attr.AT_KDF:
            kdfs.append(v)
        else:
            out[key] = v
    elif at in _RESERVED_16:
        _need(at, value, 18)
        out[key] = value[2:]
        if at is Attr.AT_MAC:
            out["mac_offset"] = offset + 4
    elif at in _STRINGS:
        out[key] = _string_value(at, value)
    elif at is Attr.AT_RES:
        out["res"], out["res_bits"] = _res_value(value)
    elif at is Attr.AT_AUTS:
        _need(at, value, AUTS_LEN)
        out["auts"] = value
    elif at is Attr.AT_CHECKCODE:
        if len(value) - 2 not in CHECKCODE_LENS:
            raise AkaError("eap-aka.AT_CHECKCODE", f"checkcode of {len(value) - 2} octets")
        out["checkcode"] = value[2:]
    elif at is Attr.AT_ENCR_DATA:
        if len(value) < 2 + AES_BLOCK or (len(value) - 2) % AES_BLOCK:
            raise AkaError("eap-aka.AT_ENCR_DATA", "not a whole number of AES blocks")
        out["encr_data"] = value[2:]
    elif at is Attr.AT_PADDING:
        # RFC 4187 §10.12: 4, 8 or 12 octets, as padding() builds it.
        if len(value) + 2 not in (4, 8, 12):
            raise AkaError("eap-aka.AT_PADDING", f"{len(value) + 2} octets, not 4, 8 or 12")
        if any(value):
            raise AkaError("eap-aka.AT_PADDING", "non-zero padding")
        out["padding"] = len(value) + 2
    else:  # pragma: no cover - every Attr member has a branch above
        raise AssertionError(at)


def decode_aka(type_data: bytes) -> AkaMessage:
    """Parse EAP-AKA(') type-data: Subtype, Reserved, attributes."""
    if len(type_data) < HEADER_LEN:
        raise AkaError("eap-aka.subtype", f"type-data of {len(type_data)} octets, need 3")
    return AkaMessage(type_data[0], decode_attributes(type_data[HEADER_LEN:], HEADER_LEN))


# ---------------------------------------------------------------- builders


def _attr(t: int, value: bytes) -> bytes:
    total = 2 + len(value)
    if total % 4 or total > 1020:
        raise LocalProtocolError(f"eap-aka: {_name(t)} value of {len(value)} octets")
    return bytes((t, total // 4)) + value


def flag(t: Attr) -> bytes:
    """An attribute whose value is two reserved octets (AT_RESULT_IND, AT_*_ID_REQ...)."""
    return _attr(t, b"\x00\x00")


def u16(t: Attr, v: int) -> bytes:
    """AT_NOTIFICATION, AT_CLIENT_ERROR_CODE, AT_KDF, AT_COUNTER, AT_BIDDING."""
    if not 0 <= v <= 0xFFFF:
        raise LocalProtocolError(f"eap-aka: {_name(t)} value out of range")
    return _attr(t, v.to_bytes(2, "big"))


def reserved_value(t: Attr, data: bytes) -> bytes:
    """Reserved (2) | data: AT_RAND, AT_AUTN, AT_MAC, AT_IV, AT_CHECKCODE, AT_ENCR_DATA..."""
    return _attr(t, b"\x00\x00" + data)


def string(t: Attr, data: bytes) -> bytes:
    """Actual Length (2) | data | zero padding: AT_IDENTITY, AT_KDF_INPUT, AT_NEXT_*."""
    return _attr(t, len(data).to_bytes(2, "big") + data + bytes(-len(data) % 4))


def res(value: bytes, bits: int | None = None) -> bytes:
    """AT_RES: RES Length in bits | RES | zero padding (RFC 4187 §10.8)."""
    bits = len(value) * 8 if bits is None else bits
    if not RES_MIN_BITS <= bits <= RES_MAX_BITS or (bits + 7) // 8 != len(value):
        raise LocalProtocolError("eap-aka: AT_RES length")
    return _attr(Attr.AT_RES, bits.to_bytes(2, "big") + value + bytes(-len(value) % 4))


def auts(value: bytes) -> bytes:
    if len(value) != AUTS_LEN:
        raise LocalProtocolError("eap-aka: AT_AUTS must carry 14 octets")
    return _attr(Attr.AT_AUTS, value)


def padding(total_len: int) -> bytes:
    """AT_PADDING of 4, 8 or 12 octets (RFC 4187 §10.12)."""
    if total_len not in (4, 8, 12):
        raise LocalProtocolError("eap-aka: AT_PADDING is 4, 8 or 12 octets")
    return _attr(Attr.AT_PADDING, bytes(total_len - 2))


def encode_aka(subtype: int, attributes: Iterable[bytes] = ()) -> bytes:
    """Type-data: Subtype | Reserved (zero) | the encoded attributes."""
    return bytes((subtype, 0, 0)) + b"".join(attributes)


def zero_mac(type_data: bytes, mac_offset: int) -> bytes:
    """``type_data`` with the 16-octet MAC value at ``mac_offset`` set to zero."""
    if mac_offset < HEADER_LEN or mac_offset + MAC_VALUE_LEN > len(type_data):
        raise LocalProtocolError("eap-aka: MAC offset outside the type-data")
    return type_data[:mac_offset] + bytes(MAC_VALUE_LEN) + type_data[mac_offset + MAC_VALUE_LEN :]
