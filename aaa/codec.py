"""RADIUS packets for the HAC, sans-I/O: requests out, verified replies in.

pyrad (>= 2.6) encodes and decodes the attributes with the packaged
dictionary; this module adds what a NAS carrying EAP must do itself:

* EAP-Message split into 253-octet attributes, consecutive and in order,
  and joined again on the way back (RFC 3579 §3.1).  Binary attributes
  (EAP-Message, State, Class) are handed to pyrad by *code*, as raw octets:
  pyrad's ``octets`` encoder turns a value that starts with ``0x`` and
  continues with hex digits into the bytes it spells, which would corrupt an
  EAP fragment that happens to begin that way.
* Message-Authenticator on every Access-Request (RFC 3579 §3.2), and on
  every Access-Accept/-Reject/-Challenge it is *required* and verified --
  HMAC-MD5 over the reply with the Request Authenticator of our request in
  the Authenticator field -- so a forged reply without one is dropped
  (CVE-2024-3596, "Blast-RADIUS").  The Response Authenticator is verified
  on every reply (RFC 2865 §3, RFC 2866 §3).
* MS-MPPE-Recv-Key / -Send-Key recovered with our own RFC 2548 code
  (``mppe.py``).

Nothing here touches a socket or a clock; ``radius.py`` moves the octets.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyrad.dictionary import Dictionary
from pyrad.packet import AcctPacket, AuthPacket, Packet
from pyrad.packet import PacketError as PyradPacketError

from mipsec.aaa.dictionary import check_dictionary, load_dictionary
from mipsec.aaa.mppe import MppeError, recover_key
from mipsec.core.errors import LocalProtocolError, WireError

__all__ = [
    "EAP_CHUNK",
    "MAX_PACKET",
    "RadiusCode",
    "RadiusWireError",
    "Reply",
    "ReplyVerifyError",
    "Request",
    "answers_authenticator",
    "decode_reply",
    "encode_access_request",
    "encode_accounting_request",
    "join_eap",
    "split_eap",
    "verify_reply",
]

HEADER_LEN = 20
MAX_PACKET = 4096  # RFC 2865 §3: Length is 20..4096
EAP_CHUNK = 253  # RFC 3579 §3.1: one attribute carries at most 253 octets

A_USER_NAME = 1
A_STATE = 24
A_CLASS = 25
A_PROXY_STATE = 33
A_VENDOR_SPECIFIC = 26
A_EAP_MESSAGE = 79
A_MESSAGE_AUTHENTICATOR = 80
VENDOR_MICROSOFT = 311
MS_MPPE_SEND_KEY = (VENDOR_MICROSOFT, 16)
MS_MPPE_RECV_KEY = (VENDOR_MICROSOFT, 17)


class RadiusCode(enum.IntEnum):
    ACCESS_REQUEST = 1
    ACCESS_ACCEPT = 2
    ACCESS_REJECT = 3
    ACCOUNTING_REQUEST = 4
    ACCOUNTING_RESPONSE = 5
    ACCESS_CHALLENGE = 11
    STATUS_SERVER = 12  # RFC 5997


# Which reply codes answer which request code (RFC 2865 §4, RFC 2866 §4).
_REPLIES = {
    RadiusCode.ACCESS_REQUEST: frozenset(
        {RadiusCode.ACCESS_ACCEPT, RadiusCode.ACCESS_REJECT, RadiusCode.ACCESS_CHALLENGE}
    ),
    RadiusCode.ACCOUNTING_REQUEST: frozenset({RadiusCode.ACCOUNTING_RESPONSE}),
    # RFC 5997 §3: an authentication server answers Status-Server with Access-Accept.
    RadiusCode.STATUS_SERVER: frozenset({RadiusCode.ACCESS_ACCEPT}),
}
# Requests whose replies must carry a Message-Authenticator (one that is
# present is verified whatever the request).  Not Status-Server: FreeRADIUS
# answers it with an Access-Accept without one (measured against the AAA
# lab); its Response Authenticator still proves the shared secret, and a
# forged one could only keep a server in service for another dead_time.
_MA_REQUIRED = frozenset({RadiusCode.ACCESS_REQUEST})
_NO_PROXY_STATE = frozenset({RadiusCode.ACCESS_REQUEST, RadiusCode.STATUS_SERVER})


class RadiusWireError(WireError):
    """A malformed RADIUS packet; ``field`` names what was wrong."""


class ReplyVerifyError(RadiusWireError):
    """A reply that does not prove it comes from the server we share a secret with.

    ``kind``: ``response-authenticator``, ``message-authenticator`` (wrong),
    ``no-message-authenticator`` (missing where required) or
    ``proxy-state`` (a Proxy-State we never sent, the Blast-RADIUS carrier).
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(kind, reason)
        self.kind = kind


# ------------------------------------------------------------------ EAP-Message


def split_eap(eap: bytes) -> list[bytes]:
    """One EAP packet as EAP-Message values of at most 253 octets, in order."""
    if not eap:
        raise LocalProtocolError("eap-message: an empty EAP packet")
    return [eap[i : i + EAP_CHUNK] for i in range(0, len(eap), EAP_CHUNK)]


def join_eap(chunks: Iterable[bytes]) -> bytes:
    """RFC 3579 §3.1: the EAP packet is the concatenation of the values, in order."""
    return b"".join(chunks)


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Request:
    """A request as sent: kept to retransmit it unchanged (RFC 5080 §2.2.1)
    and to verify the reply against its Request Authenticator."""

    code: RadiusCode
    identifier: int
    authenticator: bytes
    raw: bytes = field(repr=False)


def _dictionary(d: Dictionary | None) -> Dictionary:
    return load_dictionary() if d is None else check_dictionary(d)


def _fill(pkt: Packet, attributes: Sequence[tuple[str, Any]]) -> None:
    for name, value in attributes:
        if value is not None:
            pkt.AddAttribute(name, value)


def _finish(pkt: Packet, raw: bytes, code: RadiusCode) -> Request:
    if len(raw) > MAX_PACKET:
        raise LocalProtocolError(f"radius: a {len(raw)}-octet request exceeds {MAX_PACKET}")
    return Request(code, pkt.id, bytes(pkt.authenticator), raw)


def _signed(
    code: RadiusCode,
    identifier: int,
    secret: bytes,
    dictionary: Dictionary | None,
    authenticator: bytes | None,
) -> AuthPacket:
    """An authentication-port packet whose first attribute is a
    Message-Authenticator (computed over the final packet by RequestPacket)."""
    if not 0 <= identifier <= 255:
        raise LocalProtocolError("radius identifier: outside 0..255")
    auth = secrets.token_bytes(16) if authenticator is None else authenticator
    pkt = AuthPacket(
        code=code, id=identifier, secret=secret, authenticator=auth, dict=_dictionary(dictionary)
    )
    pkt.add_message_authenticator()
    return pkt


def encode_access_request(
    identifier: int,
    secret: bytes,
    attributes: Sequence[tuple[str, Any]],
    *,
    eap: bytes | None = None,
    state: bytes | None = None,
    dictionary: Dictionary | None = None,
    authenticator: bytes | None = None,
) -> Request:
    """An Access-Request with a Message-Authenticator (first attribute).

    ``attributes`` are (dictionary name, value) pairs, ``None`` values
    skipped; ``eap`` is split into EAP-Message attributes; ``state`` is
    echoed as State (RFC 2865 §5.24).  The Request Authenticator is 16
    random octets (RFC 2865 §3) unless given (known-answer tests).
    """
    pkt = _signed(RadiusCode.ACCESS_REQUEST, identifier, secret, dictionary, authenticator)
    _fill(pkt, attributes)
    if state is not None:
        pkt[A_STATE] = [state]  # by code: raw octets, never re-encoded
    if eap is not None:
        pkt[A_EAP_MESSAGE] = split_eap(eap)
    return _finish(pkt, pkt.RequestPacket(), RadiusCode.ACCESS_REQUEST)


def encode_status_server(
    identifier: int,
    secret: bytes,
    *,
    dictionary: Dictionary | None = None,
    authenticator: bytes | None = None,
) -> Request:
    """A Status-Server (RFC 5997 §3): Message-Authenticator its only attribute."""
    pkt = _signed(RadiusCode.STATUS_SERVER, identifier, secret, dictionary, authenticator)
    return _finish(pkt, pkt.RequestPacket(), RadiusCode.STATUS_SERVER)


def encode_accounting_request(
    identifier: int,
    secret: bytes,
    attributes: Sequence[tuple[str, Any]],
    *,
    dictionary: Dictionary | None = None,
) -> Request:
    """An Accounting-Request; its Request Authenticator is the MD5 of the
    packet and the secret (RFC 2866 §3)."""
    if not 0 <= identifier <= 255:
        raise LocalProtocolError("radius identifier: outside 0..255")
    pkt = AcctPacket(
        code=RadiusCode.ACCOUNTING_REQUEST,
        id=identifier,
        secret=secret,
        dict=_dictionary(dictionary),
    )
    _fill(pkt, attributes)
    return _finish(pkt, pkt.RequestPacket(), RadiusCode.ACCOUNTING_REQUEST)


# ------------------------------------------------------------------ replies


def _walk(attrs: bytes) -> list[tuple[int, int, int]]:
    """(type, start of value, end of value) of each attribute; strict lengths."""
    out: list[tuple[int, int, int]] = []
    i, n = 0, len(attrs)
    while i < n:
        if n - i < 2:
            raise RadiusWireError("radius.attribute", f"a lone octet at offset {HEADER_LEN + i}")
        type_, length = attrs[i], attrs[i + 1]
        if length < 2 or i + length > n:
            raise RadiusWireError(
                "radius.attribute", f"type {type_}: Length {length} overruns the packet"
            )
        out.append((type_, i + 2, i + length))
        i += length
    return out


def _response_authenticator_ok(raw: bytes, request_authenticator: bytes, secret: bytes) -> bool:
    """RFC 2865 §3: Response Authenticator =
    MD5(Code+Identifier+Length+RequestAuth+Attributes+Secret); ``raw`` cut to Length."""
    expected = hashlib.md5(  # noqa: S324
        raw[:4] + request_authenticator + raw[HEADER_LEN:] + secret
    ).digest()
    return hmac.compare_digest(expected, raw[4:HEADER_LEN])


def answers_authenticator(raw: bytes, request_authenticator: bytes, secret: bytes) -> bool:
    """Whether ``raw`` is a reply, under ``secret``, to the request whose
    Request Authenticator was ``request_authenticator`` -- a reply to an
    earlier request on the same Identifier (a late duplicate) is one, a
    forgery or a wrong secret is not.  Only the Response Authenticator is
    checked: this never makes a reply acceptable, only says what it was."""
    if len(raw) < HEADER_LEN:
        return False
    length = int.from_bytes(raw[2:4], "big")
    if not HEADER_LEN <= length <= min(len(raw), MAX_PACKET):
        return False
    return _response_authenticator_ok(raw[:length], request_authenticator, secret)


def verify_reply(raw: bytes, request: Request, secret: bytes) -> bytes:
    """Check ``raw`` answers ``request``; return it without padding.

    Raises :class:`RadiusWireError` for a malformed packet and
    :class:`ReplyVerifyError` when it is not authentic.
    """
    if len(raw) < HEADER_LEN:
        raise RadiusWireError("radius.length", f"{len(raw)} octets, shorter than the header")
    length = int.from_bytes(raw[2:4], "big")
    if not HEADER_LEN <= length <= min(len(raw), MAX_PACKET):
        raise RadiusWireError("radius.length", f"Length {length} with {len(raw)} octets received")
    raw = raw[:length]  # RFC 2865 §3: octets past Length are padding
    try:
        code = RadiusCode(raw[0])
    except ValueError:
        raise RadiusWireError("radius.code", f"unexpected Code {raw[0]}") from None
    if code not in _REPLIES.get(request.code, ()):
        raise RadiusWireError("radius.code", f"{code.name} does not answer {request.code.name}")
    if raw[1] != request.identifier:
        raise RadiusWireError("radius.identifier", "does not match the request")
    attrs = raw[HEADER_LEN:]
    walked = _walk(attrs)
    if not _response_authenticator_ok(raw, request.authenticator, secret):
        raise ReplyVerifyError("response-authenticator", "Response Authenticator does not verify")
    ma = [(s, e) for t, s, e in walked if t == A_MESSAGE_AUTHENTICATOR]
    if len(ma) > 1:
        raise RadiusWireError("radius.message-authenticator", "more than one")
    if ma:
        start, end = ma[0]
        if end - start != 16:
            raise RadiusWireError("radius.message-authenticator", "value is not 16 octets")
        # RFC 3579 §3.2: HMAC-MD5 over the reply with the Request
        # Authenticator of *our* request in the Authenticator field and the
        # attribute zeroed.  An Accounting-Response uses 16 zero octets
        # there (RFC 5997 §3 family; FreeRADIUS and pyrad agree).
        vector = bytes(16) if code is RadiusCode.ACCOUNTING_RESPONSE else request.authenticator
        zeroed = attrs[:start] + bytes(16) + attrs[end:]
        mac = hmac.new(secret, raw[:4] + vector + zeroed, "md5").digest()
        if not hmac.compare_digest(mac, attrs[start:end]):
            raise ReplyVerifyError("message-authenticator", "Message-Authenticator does not verify")
    elif request.code in _MA_REQUIRED:
        raise ReplyVerifyError(
            "no-message-authenticator",
            f"{code.name} without Message-Authenticator (RFC 3579 §3.2, CVE-2024-3596)",
        )
    if request.code in _NO_PROXY_STATE and any(t == A_PROXY_STATE for t, _, _ in walked):
        raise ReplyVerifyError("proxy-state", "Proxy-State that the HAC never sent")
    eap_at = [i for i, (t, _, _) in enumerate(walked) if t == A_EAP_MESSAGE]
    if eap_at and eap_at[-1] - eap_at[0] + 1 != len(eap_at):
        raise RadiusWireError("radius.eap-message", "EAP-Message attributes are not consecutive")
    return raw


@dataclass(frozen=True)
class Reply:
    """A verified reply.  ``packet`` is pyrad's decoding of it (by name for
    dictionary attributes, by code for binary ones); the EAP packet is
    joined, the MPPE keys recovered (or ``mppe_error`` says why not)."""

    code: RadiusCode
    identifier: int
    packet: Packet = field(repr=False)
    eap_message: bytes | None = None
    state: bytes | None = None
    mppe_recv_key: bytes | None = field(default=None, repr=False)
    mppe_send_key: bytes | None = field(default=None, repr=False)
    mppe_error: str | None = None

    def user_name(self) -> str | None:
        """User-Name (UTF-8, RFC 2865 §5.1), None when absent."""
        values = self.packet.get(A_USER_NAME)
        if not values:
            return None
        try:
            return bytes(values[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise RadiusWireError("radius.user-name", "not UTF-8") from None

    def values(self, code: int | tuple[int, int]) -> list[bytes]:
        """Raw values of an attribute by code (or (vendor, type)), in order."""
        return [bytes(v) for v in self.packet.get(code) or ()]


def decode_reply(
    raw: bytes, request: Request, secret: bytes, *, dictionary: Dictionary | None = None
) -> Reply:
    """Verify and decode a reply to ``request`` (see :func:`verify_reply`)."""
    raw = verify_reply(raw, request, secret)
    try:
        pkt = Packet(packet=raw, dict=_dictionary(dictionary), secret=secret)
    except PyradPacketError as exc:
        raise RadiusWireError("radius.attribute", str(exc)) from None
    chunks = [bytes(v) for v in pkt.get(A_EAP_MESSAGE) or ()]
    states = pkt.get(A_STATE) or ()
    recv, send, error = None, None, None
    recv_v, send_v = pkt.get(MS_MPPE_RECV_KEY), pkt.get(MS_MPPE_SEND_KEY)
    try:
        if recv_v:
            recv = recover_key(
                bytes(recv_v[0]), secret, request.authenticator, field="MS-MPPE-Recv-Key"
            )
        if send_v:
            send = recover_key(
                bytes(send_v[0]), secret, request.authenticator, field="MS-MPPE-Send-Key"
            )
    except MppeError as exc:
        recv, send, error = None, None, str(exc)
    return Reply(
        code=RadiusCode(raw[0]),
        identifier=raw[1],
        packet=pkt,
        eap_message=join_eap(chunks) if chunks else None,
        state=bytes(states[0]) if states else None,
        mppe_recv_key=recv,
        mppe_send_key=send,
        mppe_error=error,
    )
