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
* ``handshake``: the same ``RawMN`` connection and close, nothing sent -- the
  bare TLS baseline made by the same client, so that the only difference
  between the two is the PSK exchange.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
import rawmn

HOST = "127.0.0.1"
SUITES = "{00,3C}"  # AES_128_CBC_SHA256, which the default policy allows

MN = tuple[str, bytes]


class RawClient:
    def __init__(self, ca: str, port: int, server_name: str, pool: ThreadPoolExecutor) -> None:
        self.ca, self.port, self.server_name = ca, port, server_name
        self.pool = pool
        self.tls_info = ""

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

    async def handshake(self, mn: MN) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self._handshake, mn)

    async def bootstrap(self, mn: MN) -> None:
        await asyncio.get_running_loop().run_in_executor(self.pool, self._bootstrap, mn)
