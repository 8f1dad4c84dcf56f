"""An independent MN of PROFILE.md for black-box tests of the HAC.

It shares no code with mipsec: stdlib ssl/hmac/hashlib and hand-built
octets only, so a bug in mipsec's codecs cannot hide behind a matching bug
on the client side.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import struct
from dataclasses import dataclass, field

from cryptography import x509


def cb_octets(der: bytes) -> bytes:
    """RFC 5929 tls-server-end-point, written from the RFC text."""
    cert = x509.load_der_x509_certificate(der)
    algo = cert.signature_hash_algorithm
    name = algo.name if algo is not None else ""
    if name in ("md5", "sha1"):
        name = "sha256"
    return hashlib.new(name, der).digest()


def container(identifier: int, content: bytes) -> bytes:
    return struct.pack("!BBH", 0, identifier, len(content)) + content


def lines(headers: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{n}: {v}\r\n".encode() for n, v in headers)


def with_auth(body: bytes, key: bytes, label: bytes, cb: bytes) -> bytes:
    mac = hmac.new(key, label + body + cb, hashlib.sha256).hexdigest()
    return body + f"auth: {mac}\r\n\r\n".encode()


@dataclass
class Response:
    identifier: int
    raw: bytes
    headers: dict[str, str] = field(default_factory=dict)
    msg_octets: bytes = b""

    def auth_ok(self, key: bytes, cb: bytes) -> bool:
        want = hmac.new(key, b"HAC" + self.msg_octets + cb, hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, self.headers.get("auth", ""))


def parse(identifier: int, raw: bytes) -> Response:
    r = Response(identifier, raw)
    pos = 0
    for line in raw.split(b"\r\n"):
        if not line:
            break
        name, _, value = line.decode("utf-8").partition(":")
        if name.strip().lower() == "auth":
            r.msg_octets = raw[:pos]
        r.headers[name.strip().lower()] = value.strip()
        pos += len(line) + 2
    return r


class RawMN:
    def __init__(
        self,
        host: str,
        port: int,
        ca: str,
        server_name: str | None,
        *,
        max_version: ssl.TLSVersion | None = None,
        timeout: float = 10.0,
    ) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if max_version is not None:
            ctx.maximum_version = max_version
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name or host)
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        self.cb = cb_octets(der)
        self.version = self.sock.version()
        self.next_id = 1

    def close(self) -> None:
        try:
            self.sock.unwrap()
        except (OSError, ValueError):
            pass
        self.sock.close()

    def send(self, content: bytes, identifier: int | None = None) -> int:
        ident = self.next_id if identifier is None else identifier
        self.next_id = ident + 1
        self.sock.sendall(container(ident, content))
        return ident

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} octets")
            buf += chunk
        return buf

    def recv(self) -> Response:
        hdr = self._read(4)
        _, ident, length = struct.unpack("!BBH", hdr)
        return parse(ident, self._read(length))

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True


def psk_init(mn: RawMN, mn_id: str) -> tuple[str, Response]:
    """PSK step 1 of PROFILE §4: send Init; return (mn-rand, the response)."""
    mn_rand = os.urandom(32).hex()
    mn.send(lines([("mn-id", mn_id), ("mn-rand", mn_rand), ("auth-method", "psk")]) + b"\r\n")
    return mn_rand, mn.recv()


def psk_done(
    mn: RawMN,
    mn_rand: str,
    r1: Response,
    psk: bytes,
    suites: str = "{00,3C}",
    sas: str = "1",
) -> Response:
    """PSK step 3 after ``psk_init``: send Done keyed with ``psk`` and the
    channel binding; return the final response."""
    body = lines(
        [
            ("mn-rand", mn_rand),
            ("hac-rand", r1.headers.get("hac-rand", "")),
            ("mip6-sas", sas),
            ("mip6-suitelist", suites),
        ]
    )
    mn.send(with_auth(body, psk, b"MN", mn.cb))
    return mn.recv()


def psk_bootstrap(
    mn: RawMN,
    mn_id: str,
    psk: bytes,
    suites: str = "{00,3C}",
    sas: str = "1",
) -> tuple[Response, Response]:
    """Run the PSK exchange of PROFILE §4; return (step-2, final) responses."""
    mn_rand, r1 = psk_init(mn, mn_id)
    return r1, psk_done(mn, mn_rand, r1, psk, suites, sas)
