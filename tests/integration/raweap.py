"""An independent EAP-TLS peer for the independent MN (rawmn.py).

Written from RFC 5216 (EAP-TLS over TLS 1.2), RFC 9190 (over TLS 1.3: the
commitment message, the exporter label) and PROFILE §4 "EAP" (keyed with
``1`` until the MSK exists, the Done with the suites keyed with the MSK),
on pyOpenSSL memory BIOs and hand-built EAP octets -- no mipsec EAP or
MHAuth code.  Used by the EAP-TLS interop tests and by ``bench/bootstrap.py
--client raw`` for its EAP-TLS figure.
"""

from __future__ import annotations

import os
import struct

from OpenSSL import SSL
from rawmn import RawMN, Response, lines, with_auth

ONE = b"1"
FRAGMENT = 1000  # octets of TLS data per EAP-TLS Response


def peer_context(*, cert: str, key: str, ca: str, tls: str = "1.3") -> SSL.Context:
    """The peer's TLS context: its certificate and key, the EAP server's CA
    (RFC 5216 §5.3: the peer checks the server's certificate), TLS 1.2 up to
    ``tls``."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION if tls == "1.3" else SSL.TLS1_2_VERSION)
    ctx.use_certificate_file(cert)
    ctx.use_privatekey_file(key)
    ctx.load_verify_locations(ca)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    return ctx


class RawEapTlsPeer:
    """EAP-TLS peer on pyOpenSSL (RFC 5216 / RFC 9190), written from the RFCs."""

    def __init__(
        self,
        mn_id: str,
        *,
        cert: str = "",
        key: str = "",
        ca: str = "",
        server_name: str,
        tls: str = "1.3",
        ctx: SSL.Context | None = None,
    ) -> None:
        """``ctx``: one made by :func:`peer_context` (an MN keeps its
        context across bootstraps); else one is made from the files."""
        if ctx is None:
            ctx = peer_context(cert=cert, key=key, ca=ca, tls=tls)
        self.mn_id = mn_id
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_tlsext_host_name(server_name.encode())
        self.conn.set_connect_state()
        self.tls13 = tls == "1.3"
        self.out = b""
        self.inbuf = b""
        self.handshake_done = False
        self.committed = False  # RFC 9190: the server's 0x00 application data
        self.alert: str | None = None  # the server's TLS alert, as pyOpenSSL reports it
        self._sending_first = False  # the first fragment of a flight carries its length

    def _pump(self) -> None:
        try:
            self.conn.do_handshake()
            self.handshake_done = True
        except SSL.WantReadError:
            pass
        if self.handshake_done and self.tls13:
            try:
                data = self.conn.recv(16)
                assert data == b"\x00", data
                self.committed = True
            except (SSL.WantReadError, SSL.ZeroReturnError):
                pass
        while True:
            try:
                self.out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break

    def answer(self, req: bytes) -> tuple[bytes, bool]:
        """(EAP-Response, Done-time) for one EAP-Request."""
        code, ident, length, typ = req[0], req[1], struct.unpack("!H", req[2:4])[0], req[4]
        assert code == 1 and length == len(req)

        def resp(data: bytes) -> bytes:
            return struct.pack("!BBHB", 2, ident, 5 + len(data), 13) + data

        if typ == 1:  # Identity
            ident_octets = self.mn_id.encode()
            return struct.pack("!BBHB", 2, ident, 5 + len(ident_octets), 1) + ident_octets, False
        assert typ == 13
        flags, body = req[5], req[6:]
        if flags & 0x80:
            body = body[4:]
        try:
            if flags & 0x20:  # Start
                self._pump()
            elif body or not self.out:
                self.inbuf += body
                if flags & 0x40:
                    return resp(b"\x00"), False  # ACK a server fragment
                self.conn.bio_write(self.inbuf)
                self.inbuf = b""
                self._pump()
        except SSL.Error as exc:
            # The server's TLS alert (RFC 5216 §2.1.3): answer with an empty
            # EAP-TLS Response; the server then ends with EAP-Failure.
            self.alert = str(exc)
            return resp(b"\x00"), False
        if self.out:  # send (the next fragment of) our flight
            first, piece = len(self.out), self.out[:FRAGMENT]
            self.out = self.out[FRAGMENT:]
            head = b""
            flags = 0x40 if self.out else 0
            if self.out and first > FRAGMENT and not self._sending_first:
                flags |= 0x80
                head = first.to_bytes(4, "big")
                self._sending_first = True
            if not self.out:
                self._sending_first = False
            return resp(bytes((flags,)) + head + piece), False
        # An empty response: the final one once the method succeeded (PROFILE §4 item 4).
        done = self.handshake_done and (self.committed or not self.tls13)
        return resp(b"\x00"), done

    def msk(self) -> bytes:
        # RFC 9190 §2.3: 128 octets, the MSK is the first 64 (the TLS 1.3
        # exporter's output depends on the length asked for, unlike TLS 1.2's PRF).
        if self.tls13:
            label, context = b"EXPORTER_EAP_TLS_Key_Material", b"\x0d"
            return bytes(self.conn.export_keying_material(label, 128, context))[:64]
        return bytes(self.conn.export_keying_material(b"client EAP encryption", 128, None))[:64]


def next_request(
    peer: RawEapTlsPeer,
    r: Response,
    mn: RawMN,
    done: bool,
    *,
    done_key: bytes | None = None,
    suites: str = "{00,3C}",
) -> tuple[bytes, bool]:
    """The MN's next request for the HAC's response ``r``: its EAP answer,
    keyed with ``1`` -- or, once the method is done, the Done (suites, keyed
    with the MSK -- or ``done_key``, to test a wrong one; PROFILE §4 items
    4-5).  Returns it and whether it is the Done."""
    answer, now_done = peer.answer(bytes.fromhex(r.headers["eap-payload"]))
    done = done or now_done
    headers = [("eap-payload", answer.hex())]
    key = ONE
    if done:
        headers += [("mip6-sas", "1"), ("mip6-suitelist", suites)]
        key = peer.msk() if done_key is None else done_key
    return with_auth(lines(headers), key, b"MN", mn.cb), done


def eap_tls_exchange(
    mn: RawMN,
    peer: RawEapTlsPeer,
    *,
    done_key: bytes | None = None,
    suites: str = "{00,3C}",
) -> tuple[Response, bool]:
    """PROFILE §4 with ``auth-method: eap`` on a connected ``mn``: the final
    response and whether the Done was sent."""
    mn.send(lines([("mn-id", peer.mn_id), ("mn-rand", os.urandom(32).hex()),
                   ("auth-method", "eap")]) + b"\r\n")  # fmt: skip
    r = mn.recv()
    assert r.auth_ok(ONE, mn.cb) and r.headers["auth-method"] == "eap"
    done = False
    for _ in range(100):
        body, done = next_request(peer, r, mn, done, done_key=done_key, suites=suites)
        mn.send(body)
        r = mn.recv()
        if "status-code" in r.headers:
            return r, done
        assert r.auth_ok(ONE, mn.cb)
    raise AssertionError("no final response after 100 rounds")
