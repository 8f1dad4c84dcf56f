"""The test suite's independent MN as a bench client (``--client raw``).

tests/integration/rawmn.py implements PROFILE.md from the RFC text with the
stdlib (``ssl``, ``hmac``, ``hashlib``) and hand-built octets, sharing no code
with mipsec; issue 9 asks for figures "measured by an independent MN
client".  It is blocking, so each concurrent MN is a thread of a pool of
``concurrency`` threads, driven from the benches' asyncio workers.

* ``bootstrap``: a new ``RawMN`` connection (its own ``SSLContext`` with the
  lab CA, TLS 1.2 or later, hostname check, the RFC 5929 channel binding
  computed from the certificate), the PSK exchange of PROFILE §4, close.  It
  raises unless the final response is a 200 whose ``auth`` verifies under the
  MN's PSK and the channel binding.
* ``eap_bootstrap``: the same connection and PROFILE §4 with ``auth-method:
  eap``, EAP-TLS inside it by tests/integration/raweap.py (pyOpenSSL memory
  BIOs, hand-built EAP octets; each MN keeps its own TLS context, with its
  client certificate, across bootstraps, as a real MN would); it raises
  unless the final response is a 200 whose ``auth`` verifies under the MSK.
* ``handshake``: the same ``RawMN`` connection and close, nothing sent -- the
  bare TLS baseline made by the same client, so that the only difference
  between the two is the PSK exchange.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
import raweap
import rawmn

HOST = "127.0.0.1"
SUITES = "{00,3C}"  # AES_128_CBC_SHA256, which the default policy allows

MN = tuple[str, bytes]


@dataclass(frozen=True)
class EapTlsPeers:
    """What the MNs' EAP-TLS peers need: per MN its client certificate and
    key, the CA and name of the HAC's EAP server certificate."""

    certs: dict[str, tuple[str, str]]
    ca: str
    server_name: str


class RawClient:
    def __init__(
        self,
        ca: str,
        port: int,
        server_name: str,
        pool: ThreadPoolExecutor,
        eap: EapTlsPeers | None = None,
    ) -> None:
        self.ca, self.port, self.server_name = ca, port, server_name
        self.pool = pool
        self.tls_info = ""
        self.eap = eap
        self._eap_ctx: dict[str, Any] = {}

    def _connect(self) -> Any:
        raw = rawmn.RawMN(HOST, self.port, self.ca, self.server_name)
        if not self.tls_info:
            cipher = raw.sock.cipher()
            self.tls_info = f"{raw.version} {cipher[0] if cipher else '?'}"
        return raw

    def _handshake(self, mn: MN) -> None:
        self._connect().close()

    def _bootstrap(self, mn: MN) -> None:
        mn_id, psk = mn
        raw = self._connect()
        try:
            _, final = rawmn.psk_bootstrap(raw, mn_id, psk, suites=SUITES)
            status = final.headers.get("status-code")
            verified = final.auth_ok(psk, raw.cb)
            if status != "200" or not verified:
                raise RuntimeError(f"final status {status}; auth verified: {verified}")
        finally:
            raw.close()

    def _eap_bootstrap(self, mn: MN) -> None:
        mn_id, _ = mn
        if self.eap is None:
            raise RuntimeError("no EAP-TLS peers configured")
        ctx = self._eap_ctx.get(mn_id)
        if ctx is None:
            cert, key = self.eap.certs[mn_id]
            ctx = self._eap_ctx[mn_id] = raweap.peer_context(cert=cert, key=key, ca=self.eap.ca)
        peer = raweap.RawEapTlsPeer(mn_id, server_name=self.eap.server_name, ctx=ctx)
        raw = self._connect()
        try:
            final, done = raweap.eap_tls_exchange(raw, peer, suites=SUITES)
            status = final.headers.get("status-code")
            verified = done and final.auth_ok(peer.msk(), raw.cb)
            if status != "200" or not verified:
                raise RuntimeError(
                    f"final status {status}; auth verified under the MSK: {verified}"
                )
        finally:
            raw.close()

    async def eap_bootstrap(self, mn: MN) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self._eap_bootstrap, mn)

    async def handshake(self, mn: MN) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self._handshake, mn)

    async def bootstrap(self, mn: MN) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self._bootstrap, mn)
