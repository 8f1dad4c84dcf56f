"""The MN's deadlines against a HAC that stalls it (core/roles/mn.py).

A HAC that trickles its response -- one octet at a time, each well within
the MN's per-wait ``[hac] timeout`` -- would hold the MN for as many waits
as the container has octets.  ``[hac] exchange_timeout`` ends the whole
bootstrap.  The HAC here is a stand-in (real TLS, the lab certificate) that
reads the MN's Init and then drips a container that never completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_hac_lifecycle import mn_config, pki, run  # noqa: F401  (pki: a fixture)

from mipsec.core.pki import PkiPaths
from mipsec.core.roles.mn import bootstrap
from mipsec.core.tls import hac_server_context


async def _dripping_hac(paths: PkiPaths, sent: list[int]) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(4096)  # the MN's Init
            writer.write(b"\x00\x01\x00\xff")  # a 255-octet response ...
            while True:
                writer.write(b"a")  # ... one octet every 0.2 s
                await writer.drain()
                sent[0] += 1
                await asyncio.sleep(0.2)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(
        serve, "127.0.0.1", 0, ssl=hac_server_context(paths.hac_cert, paths.hac_key)
    )


def test_a_hac_that_drips_its_response_is_left_at_exchange_timeout(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
) -> None:
    async def main() -> tuple[str, int]:
        sent = [0]
        server = await _dripping_hac(pki, sent)
        port = server.sockets[0].getsockname()[1]
        cfg = mn_config(pki, port)
        cfg = cfg.model_copy(
            update={"hac": cfg.hac.model_copy(update={"timeout": 1.0, "exchange_timeout": 1.5})}
        )
        try:
            result = await bootstrap(cfg)
        finally:
            server.close()
        assert not result.ok and result.status is None
        return result.reason, sent[0]

    reason, dripped = run(main())
    assert reason == "the HAC did not finish within exchange_timeout (1.5 s)"
    # Every octet came within the per-wait timeout: only the whole-exchange
    # deadline could end it (255 octets would take 51 s).
    assert 3 <= dripped < 255


def test_exchange_timeout_defaults_to_120_seconds(pki: PkiPaths) -> None:  # noqa: F811
    assert mn_config(pki, 7872).hac.exchange_timeout == 120.0
