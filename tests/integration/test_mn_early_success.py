"""Issue 7 bad input on the MN's side: "EAP-Success before the method
finished (the MN refuses it)", against the real MN bootstrap over real TLS.

The HAC is a stand-in (the lab's HAC certificate, stdlib TLS, hand-built
containers and TV headers: no mipsec protocol code) that knows the key
``1`` -- as anyone does before an MSK exists -- and ends the exchange right
after the EAP Identity round with a 200 carrying EAP-Success and an SA.  The
MN's EAP-TLS method never ran: the MN must refuse the 200 and hold no SA.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct
from pathlib import Path

from rawmn import cb_octets, container, lines
from test_hac_lifecycle import mn_config, pki, run  # noqa: F401  (pki: a fixture)

from mipsec.core.pki import PkiPaths
from mipsec.core.roles.mn import bootstrap
from mipsec.core.tls import hac_server_context


def _keyed_with_one(body: bytes, cb: bytes) -> bytes:
    mac = hmac.new(b"1", b"HAC" + body + cb, hashlib.sha256).hexdigest()
    return body + f"auth: {mac}\r\n\r\n".encode()


async def _read_container(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    return await reader.readexactly(struct.unpack("!H", head[2:])[0])


async def _early_success_hac(paths: PkiPaths, got: list[bytes]) -> asyncio.Server:
    cb = cb_octets(_der(paths.hac_cert))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got.append(await _read_container(reader))  # the Init
            identity = struct.pack("!BBHB", 1, 7, 5, 1)  # EAP-Request/Identity
            body = lines([("auth-method", "eap"), ("eap-payload", identity.hex())])
            writer.write(container(1, _keyed_with_one(body, cb)))
            got.append(await _read_container(reader))  # the Identity response
            success = struct.pack("!BBH", 3, 7, 4)  # EAP-Success, no method run
            final = lines(
                [
                    ("status-code", "200"),
                    ("eap-payload", success.hex()),
                    ("mip6-spi", "4660"),
                    ("mip6-ciphersuite", "{00,3C}"),
                    ("mip6-mn-to-ha-ikey", "11" * 16),
                    ("mip6-ha-to-mn-ikey", "22" * 16),
                    ("mip6-mn-to-ha-ekey", "33" * 16),
                    ("mip6-ha-to-mn-ekey", "44" * 16),
                ]
            )
            writer.write(container(2, _keyed_with_one(final, cb)))
            await writer.drain()
            await reader.read()  # until the MN closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(
        serve, "127.0.0.1", 0, ssl=hac_server_context(paths.hac_cert, paths.hac_key)
    )


def _der(pem_path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(Encoding.DER)


def test_the_mn_refuses_eap_success_before_its_method_finished(pki: PkiPaths) -> None:  # noqa: F811
    async def main() -> tuple[bool, int | None, str, object, list[bytes]]:
        got: list[bytes] = []
        server = await _early_success_hac(pki, got)
        port = server.sockets[0].getsockname()[1]
        cfg = mn_config(pki, port, method="eap")
        eap = {
            "methods": ["tls"],
            "tls": {
                "cert": str(pki.mn_cert),
                "key": str(pki.mn_key),
                "ca": str(pki.ca_cert),
                "server_name": "eap.mipsec.test",
            },
        }
        cfg = type(cfg).model_validate({**cfg.model_dump(mode="json"), "eap": eap})
        try:
            result = await asyncio.wait_for(bootstrap(cfg), 30)
        finally:
            server.close()
        return result.ok, result.status, result.reason, result.issued, got

    ok, status, reason, sa, got = run(main())
    assert len(got) == 2 and b"eap-payload" in got[1]  # the MN answered the Identity round
    assert not ok and sa is None, (status, reason)  # no SA, whatever the 200 carried
    assert "before the EAP method finished" in reason, reason
