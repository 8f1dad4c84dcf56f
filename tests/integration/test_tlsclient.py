"""core/tlsclient.py against real TLS servers on loopback.

The MN's bootstrap and the HAC's provisioning client run on it (their own
tests cover the protocol); here: what the client itself promises -- errors as
asyncio's streams give them, EOF, and bounded memory against a server that
floods it with data nobody reads.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mipsec.core.pki import PkiPaths, init_pki
from mipsec.core.tls import hac_server_context, mn_client_context
from mipsec.core.tlsclient import READ_MAX, TlsClient

NAME = "hac.mipsec.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("other"))


def serve(
    pki: PkiPaths,
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    body: Callable[[int], Awaitable[Any]],
) -> Any:
    async def main() -> Any:
        ctx = hac_server_context(pki.hac_cert, pki.hac_key)
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(body(port), 30)
        finally:
            server.close()

    return asyncio.run(main())


def client_ctx(pki: PkiPaths) -> ssl.SSLContext:
    return mn_client_context(str(pki.ca_cert))


def test_exchange_then_close_notify_reads_eof(pki: PkiPaths) -> None:
    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()  # close_notify, then TCP close

    async def body(port: int) -> tuple[bytes, bytes, bool]:
        tls = await TlsClient.connect("127.0.0.1", port, client_ctx(pki), NAME)
        assert tls.version() in ("TLSv1.2", "TLSv1.3") and tls.peercert_der()
        tls.write(b"hello")
        got = b""
        while len(got) < 5:
            got += await tls.read()
        end = await tls.read()
        return got, end, tls.open

    got, end, still_open = serve(pki, echo_once, body)
    assert (got, end, still_open) == (b"hello", b"", False)


def test_unknown_ca_is_a_certificate_error_from_connect(pki: PkiPaths, other: PkiPaths) -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def body(port: int) -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            await TlsClient.connect("127.0.0.1", port, client_ctx(other), NAME)

    serve(pki, idle, body)


def test_wrong_name_is_refused_by_the_stdlib_name_check(pki: PkiPaths) -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def body(port: int) -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            await TlsClient.connect("127.0.0.1", port, client_ctx(pki), "other.mipsec.test")

    serve(pki, idle, body)


def test_a_flooding_server_cannot_grow_the_client(pki: PkiPaths) -> None:
    """4 MiB sent at a client that reads nothing: it stops reading the socket
    once it holds a bounded amount, and loses nothing it then reads."""
    total = 4 * 1024 * 1024

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = bytes(range(256)) * 64  # 16 KiB
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()  # blocks once the client stops reading
        writer.close()

    async def body(port: int) -> tuple[int, int, int]:
        tls = await TlsClient.connect("127.0.0.1", port, client_ctx(pki), NAME)
        await asyncio.sleep(1.0)  # the server writes as much as it can meanwhile
        held = len(tls._plain) + tls._in.pending
        got = 0
        while True:
            data = await tls.read()
            if not data:
                break
            got += len(data)
        return held, got, total

    held, got, sent = serve(pki, flood, body)
    # What is held without a reader: the plaintext cap plus what arrived
    # before reading paused (one socket read of asyncio's, at most 256 KiB).
    assert held <= READ_MAX + 256 * 1024 + 64 * 1024
    assert got == sent
