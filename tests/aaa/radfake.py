"""Test helpers: a fake neighbour RADIUS server, replies built by hand, an EAP-MD5 peer.

The reply builder is written from RFC 2865 §3 / RFC 3579 §3.2 / RFC 2548
§2.4 directly (not with mipsec.aaa), so the client is checked against an
independent implementation; crafted replies (no Message-Authenticator, a
wrong one, oversized EAP) can only come from a fake server.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mipsec.core.wire.eap import EapCode, EapPacket, decode_eap, encode_eap

ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE, ACCOUNTING_RESPONSE = 2, 3, 11, 5


def attr(type_: int, value: bytes) -> bytes:
    assert len(value) <= 253
    return bytes((type_, len(value) + 2)) + value


def vsa(vendor: int, type_: int, value: bytes) -> bytes:
    return attr(26, vendor.to_bytes(4, "big") + attr(type_, value))


def eap_attrs(eap: bytes) -> bytes:
    return b"".join(attr(79, eap[i : i + 253]) for i in range(0, len(eap), 253))


def hide_mppe(key: bytes, secret: bytes, req_auth: bytes, salt: bytes = b"\x80\x01") -> bytes:
    """RFC 2548 §2.4.2, written out independently of mipsec.aaa.mppe."""
    plain = bytes((len(key),)) + key
    plain += bytes(-len(plain) % 16)
    out, chain = b"", req_auth + salt
    for i in range(0, len(plain), 16):
        b = hashlib.md5(secret + chain).digest()
        c = bytes(x ^ y for x, y in zip(plain[i : i + 16], b, strict=True))
        out += c
        chain = c
    return salt + out


def build_reply(
    code: int,
    request: bytes,
    secret: bytes,
    attrs: bytes = b"",
    *,
    ma: str = "good",  # good | none | bad | zero-vector
    resp_auth: str = "good",  # good | bad
) -> bytes:
    """A reply to ``request`` (raw octets) as a server would build it."""
    ident, req_auth = request[1], request[4:20]
    if ma != "none":
        attrs = attr(80, bytes(16)) + attrs
    hdr = bytes((code, ident)) + (20 + len(attrs)).to_bytes(2, "big")
    if ma != "none":
        vector = bytes(16) if ma == "zero-vector" else req_auth
        mac = hmac.new(secret, hdr + vector + attrs, "md5").digest()
        if ma == "bad":
            mac = bytes((mac[0] ^ 1,)) + mac[1:]
        attrs = attr(80, mac) + attrs[18:]
    auth = hashlib.md5(hdr + req_auth + attrs + secret).digest()
    if resp_auth == "bad":
        auth = bytes((auth[0] ^ 1,)) + auth[1:]
    return hdr + auth + attrs


def request_attrs(raw: bytes) -> list[tuple[int, bytes]]:
    """(type, value) of each attribute of a received packet, in order."""
    out, i = [], 20
    while i < len(raw):
        t, n = raw[i], raw[i + 1]
        out.append((t, raw[i + 2 : i + n]))
        i += n
    return out


def request_eap(raw: bytes) -> bytes:
    return b"".join(v for t, v in request_attrs(raw) if t == 79)


def request_ma_ok(raw: bytes, secret: bytes) -> bool:
    """RFC 3579 §3.2 check of an Access-Request's Message-Authenticator."""
    attrs = raw[20:]
    i, pos = 0, None
    while i < len(attrs):
        if attrs[i] == 80:
            pos = i
        i += attrs[i + 1]
    if pos is None:
        return False
    zeroed = attrs[: pos + 2] + bytes(16) + attrs[pos + 18 :]
    mac = hmac.new(secret, raw[:20] + zeroed, "md5").digest()
    return hmac.compare_digest(mac, attrs[pos + 2 : pos + 18])


Handler = Callable[["FakeServer", bytes, Any], "bytes | list[bytes] | None"]


@dataclass
class FakeServer(asyncio.DatagramProtocol):
    """A neighbour RADIUS server on 127.0.0.1: ``handler`` answers (or not)."""

    handler: Handler
    secret: bytes = b"fake-secret"
    received: list[tuple[Any, bytes]] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None
    port: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((addr, data))
        out = self.handler(self, data, addr)
        for d in [out] if isinstance(out, bytes) else out or []:
            self.send(d, addr)

    def send(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def fake_server(handler: Handler, secret: bytes = b"fake-secret") -> FakeServer:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: FakeServer(handler, secret), local_addr=("127.0.0.1", 0)
    )
    proto.port = proto.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
    # Hundreds of requests may arrive in one burst: do not drop them.
    sock = proto.transport.get_extra_info("socket")  # type: ignore[union-attr]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return proto


def eap_request(identifier: int, type_: int, data: bytes = b"") -> bytes:
    return encode_eap(EapPacket(EapCode.REQUEST, identifier, type_, data))


def identity_response(identity: str, identifier: int = 0) -> bytes:
    return encode_eap(EapPacket(EapCode.RESPONSE, identifier, 1, identity.encode()))


def md5_peer(password: bytes) -> Callable[[bytes], bytes]:
    """A test-only EAP-MD5 peer (RFC 3748 §5.4): Naks every other method to MD5."""

    def answer(request: bytes) -> bytes:
        p = decode_eap(request)
        assert p.code is EapCode.REQUEST, p
        if p.type == 4:
            n = p.data[0]
            value = hashlib.md5(bytes((p.identifier,)) + password + p.data[1 : 1 + n]).digest()
            return encode_eap(EapPacket(EapCode.RESPONSE, p.identifier, 4, b"\x10" + value))
        return encode_eap(EapPacket(EapCode.RESPONSE, p.identifier, 3, b"\x04"))  # Nak -> MD5

    return answer
