"""A test-only EAP-TLS peer (RFC 5216, TLS 1.2) on pyOpenSSL memory BIOs.

Only here to make a real AAA server derive a real MSK, so that the MSK the
HAC recovers from MS-MPPE-Recv-Key || MS-MPPE-Send-Key can be compared with
the one the peer exports (RFC 5216 §2.3: the first 64 octets of
TLS-PRF(master, "client EAP encryption", randoms)).  The project's own EAP-TLS
peer method is written elsewhere.
"""

from __future__ import annotations

from OpenSSL import SSL

from mipsec.core.wire.eap import EapCode, EapPacket, decode_eap, encode_eap

EAP_TLS = 13
L_BIT, M_BIT, S_BIT = 0x80, 0x40, 0x20


class EapTlsPeer:
    def __init__(self, ca: str, cert: str, key: str, fragment: int = 1000) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_file(cert)
        ctx.use_privatekey_file(key)
        ctx.load_verify_locations(ca)
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.fragment = fragment
        self.out = b""  # TLS records still to send
        self.out_total = 0
        self.inbuf = b""
        self.done = False
        self.requests_seen: list[int] = []  # sizes of the EAP-Requests received

    def _resp(self, identifier: int, data: bytes) -> bytes:
        return encode_eap(EapPacket(EapCode.RESPONSE, identifier, EAP_TLS, data))

    def _drive(self) -> None:
        try:
            self.conn.do_handshake()
            self.done = True
        except SSL.WantReadError:
            pass
        chunks = b""
        while True:
            try:
                chunks += self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
        if chunks:
            self.out += chunks
            self.out_total = len(self.out)

    def _next_fragment(self, identifier: int) -> bytes:
        first = len(self.out) == self.out_total
        piece, self.out = self.out[: self.fragment], self.out[self.fragment :]
        flags = M_BIT if self.out else 0
        head = b""
        if first and self.out:  # a fragmented message: L bit and its total length
            flags |= L_BIT
            head = self.out_total.to_bytes(4, "big")
        return self._resp(identifier, bytes((flags,)) + head + piece)

    def answer(self, request: bytes) -> bytes:
        self.requests_seen.append(len(request))
        p = decode_eap(request)
        if p.type != EAP_TLS:
            return encode_eap(EapPacket(EapCode.RESPONSE, p.identifier, 3, bytes((EAP_TLS,))))
        flags, body = p.data[0], p.data[1:]
        if flags & L_BIT:
            body = body[4:]
        if flags & S_BIT:
            self._drive()
        elif not body and self.out:
            pass  # the server acknowledged our fragment: send the next one
        else:
            self.inbuf += body
            if flags & M_BIT:
                return self._resp(p.identifier, b"\x00")  # acknowledge a server fragment
            self.conn.bio_write(self.inbuf)
            self.inbuf = b""
            self._drive()
        if self.out:
            return self._next_fragment(p.identifier)
        return self._resp(p.identifier, b"\x00")  # empty: after the server's Finished

    def msk(self) -> bytes:
        assert self.done
        return bytes(self.conn.export_keying_material(b"client EAP encryption", 64, None))
