"""A minimal RADIUS EAP pass-through client for tests (RFC 2865, RFC 3579, RFC 2548).

Enough to carry one EAP conversation to a real RADIUS server on loopback:
EAP-Message split at 253 octets and joined in order, State echoed,
Message-Authenticator on every request and verified on every reply, and the
MS-MPPE-Recv/Send-Key of an Access-Accept decrypted.  Written for the tests;
it shares no code with mipsec.aaa.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass

ACCESS_REQUEST, ACCESS_ACCEPT, ACCESS_REJECT, ACCESS_CHALLENGE = 1, 2, 3, 11
USER_NAME, STATE, VENDOR_SPECIFIC, EAP_MESSAGE, MESSAGE_AUTHENTICATOR = 1, 24, 26, 79, 80
MICROSOFT, MS_MPPE_SEND_KEY, MS_MPPE_RECV_KEY = 311, 16, 17


@dataclass
class Reply:
    code: int
    eap: bytes
    state: bytes | None
    msk: bytes | None


class RadiusEap:
    def __init__(self, host: str, port: int, secret: bytes, user_name: str, timeout: float = 10.0):
        self.addr = (host, port)
        self.secret = secret
        self.user_name = user_name.encode()
        self.state: bytes | None = None
        self.ident = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    @staticmethod
    def _attr(t: int, v: bytes) -> bytes:
        return struct.pack("!BB", t, 2 + len(v)) + v

    def exchange(self, eap: bytes) -> Reply:
        self.ident = (self.ident + 1) & 0xFF
        auth = os.urandom(16)
        attrs = self._attr(USER_NAME, self.user_name)
        for i in range(0, len(eap), 253):
            attrs += self._attr(EAP_MESSAGE, eap[i : i + 253])
        if self.state is not None:
            attrs += self._attr(STATE, self.state)
        attrs += self._attr(MESSAGE_AUTHENTICATOR, bytes(16))
        pkt = struct.pack("!BBH", ACCESS_REQUEST, self.ident, 20 + len(attrs)) + auth + attrs
        ma = hmac.new(self.secret, pkt, "md5").digest()
        pkt = pkt[:-16] + ma
        self.sock.sendto(pkt, self.addr)
        while True:
            data, _ = self.sock.recvfrom(4096)
            if data[1] == self.ident:
                break
        return self._parse(data, auth)

    def _parse(self, data: bytes, req_auth: bytes) -> Reply:
        code, ident, length = struct.unpack("!BBH", data[:4])
        assert length == len(data)
        # Response Authenticator (RFC 2865 §3)
        check = hashlib.md5(data[:4] + req_auth + data[20:] + self.secret).digest()  # noqa: S324
        assert hmac.compare_digest(check, data[4:20]), "bad Response Authenticator"
        eap, state, ma_off = b"", None, -1
        recv = send = None
        i = 20
        while i < len(data):
            t, n = data[i], data[i + 1]
            v = data[i + 2 : i + n]
            if t == EAP_MESSAGE:
                eap += v
            elif t == STATE:
                state = v
            elif t == MESSAGE_AUTHENTICATOR:
                ma_off = i + 2
            elif t == VENDOR_SPECIFIC and struct.unpack("!I", v[:4])[0] == MICROSOFT:
                vt, vl = v[4], v[5]
                key = self._mppe(v[6 : 4 + vl], req_auth)
                if vt == MS_MPPE_RECV_KEY:
                    recv = key
                elif vt == MS_MPPE_SEND_KEY:
                    send = key
            i += n
        assert ma_off > 0, "reply without Message-Authenticator"
        zeroed = data[:4] + req_auth + data[20:ma_off] + bytes(16) + data[ma_off + 16 :]
        assert hmac.compare_digest(
            hmac.new(self.secret, zeroed, "md5").digest(), data[ma_off : ma_off + 16]
        )
        self.state = state
        msk = recv + send if recv is not None and send is not None else None
        return Reply(code, eap, state, msk)

    def _mppe(self, value: bytes, req_auth: bytes) -> bytes:
        """RFC 2548 §2.4.2/§2.4.3: Salt (2) | encrypted (key length | key | padding)."""
        salt, enc = value[:2], value[2:]
        out, prev = b"", req_auth + salt
        for j in range(0, len(enc), 16):
            b = hashlib.md5(self.secret + prev).digest()  # noqa: S324
            block = enc[j : j + 16]
            out += bytes(x ^ y for x, y in zip(block, b, strict=True))
            prev = block
        return out[1 : 1 + out[0]]
