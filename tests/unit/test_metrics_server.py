"""The /metrics HTTP server's limits (core/metrics.py): held connections
cannot pile up, a trickled request head runs into a deadline, bad requests
get their status, and the role's registry is what is served."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter

from mipsec.core import metrics
from mipsec.core.metrics import MetricsServer


async def _request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        out = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # closed with our request unread: no answer either
        out = b""
    writer.close()
    return out


def _server() -> tuple[MetricsServer, CollectorRegistry]:
    reg = CollectorRegistry()
    Counter("mipsec_test", "a test counter", registry=reg).inc(3)
    return MetricsServer(reg, lambda: True), reg


def test_answers_metrics_healthz_and_errors() -> None:
    async def main() -> None:
        server, _ = _server()
        (_, port), *_ = await server.listen("127.0.0.1", 0)
        try:
            out = await _request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.0 200 OK\r\n")
            assert b"mipsec_test_total 3.0" in out
            assert (await _request(port, b"GET /healthz HTTP/1.0\r\n\r\n")).endswith(
                b"\r\n\r\nok\n"
            )
            assert (await _request(port, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.0 405"
            )
            assert (await _request(port, b"GET /x HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
            assert (await _request(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.0 400")
            # A head over the limit: closed without an answer.
            assert await _request(port, b"GET /" + b"a" * 5000 + b" HTTP/1.0\r\n\r\n") == b""
        finally:
            await server.stop()

    asyncio.run(main())


async def _read_or_reset(reader: asyncio.StreamReader, timeout: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:  # aborted: as closed, for the client
        return b""


def test_held_connections_are_capped_and_trickled_heads_time_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker holding every slot with unfinished heads cannot keep the
    scraper out: at the cap the longest wait is closed and the scrape is
    served; the deadline ends the rest."""
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 1.0)

    async def main() -> None:
        server, _ = _server()
        (_, port), *_ = await server.listen("127.0.0.1", 0)
        held = []
        try:
            for _ in range(metrics.MAX_CLIENTS):
                held.append(await asyncio.open_connection("127.0.0.1", port))
                held[-1][1].write(b"GET /met")  # never finished
                await asyncio.sleep(0.01)  # accepted in this order
            await asyncio.sleep(0.1)
            # Beyond the cap: the oldest held connection makes room.
            out = await _request(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert out.startswith(b"HTTP/1.0 200") and b"mipsec_test_total 3.0" in out
            assert server.evicted == 1
            assert await _read_or_reset(held[0][0], 0.5) == b""
            # The others were not touched by it; the deadline ends them.
            for reader, _ in held[1:]:
                assert not reader.at_eof()
            for reader, _ in held[1:]:
                assert await _read_or_reset(reader, 5) == b""
            assert server.evicted == 1
            out = await _request(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert out.startswith(b"HTTP/1.0 200")
        finally:
            for _, writer in held:
                writer.close()
            await server.stop()

    asyncio.run(main())


@pytest.mark.parametrize("many", [False, True])
def test_a_flood_from_one_network_evicts_its_own_not_the_scraper(many: bool) -> None:
    """The scraper's connection is the oldest waiting one when a flood from
    another network fills every slot -- from one address or from many of
    one /24: the flood's oldest goes, the scraper's GET is answered (the
    longest wait overall went before: review)."""

    async def main() -> None:
        server, _ = _server()
        (_, port), *_ = await server.listen("127.0.0.1", 0)
        flood = []
        try:
            scraper = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.05)  # held first: the oldest wait
            for i in range(metrics.MAX_CLIENTS + 3):
                src = f"127.0.1.{i + 2}" if many else "127.0.1.2"  # another /24
                flood.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)))
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert server.evicted == 4
            scraper[1].write(b"GET /metrics HTTP/1.0\r\n\r\n")
            out = await _read_or_reset(scraper[0], 5)
            assert out.startswith(b"HTTP/1.0 200") and b"mipsec_test_total 3.0" in out
            for reader, _ in flood[:4]:  # the flood's four oldest made room
                assert await _read_or_reset(reader, 1) == b""
        finally:
            for _, writer in flood:
                writer.close()
            await server.stop()

    asyncio.run(main())


def test_allowed_clients_keep_a_flood_from_anywhere_else_away_from_the_scraper() -> None:
    """A flood spread over 16 networks tied with the scraper's own network
    and could still evict its connection (known limit of the twenty-eighth
    session).  With ``[metrics] allowed_clients`` a connection from
    elsewhere is closed at accept: it holds no slot and evicts no one."""
    import ipaddress

    async def main() -> None:
        reg = CollectorRegistry()
        Counter("mipsec_test", "a test counter", registry=reg).inc(3)
        server = MetricsServer(reg, lambda: True, [ipaddress.ip_network("127.0.0.1/32")])
        (_, port), *_ = await server.listen("127.0.0.1", 0)
        flood = []
        try:
            scraper = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.05)  # held first: the oldest wait
            for i in range(2 * metrics.MAX_CLIENTS):  # 32 networks, one connection each
                src = f"127.{i + 1}.0.2"
                flood.append(await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)))
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            assert (server.evicted, server.refused) == (0, 2 * metrics.MAX_CLIENTS)
            for reader, _ in flood:
                assert await _read_or_reset(reader, 1) == b""
            scraper[1].write(b"GET /metrics HTTP/1.0\r\n\r\n")
            out = await _read_or_reset(scraper[0], 5)
            assert out.startswith(b"HTTP/1.0 200") and b"mipsec_test_total 3.0" in out
        finally:
            for _, writer in flood:
                writer.close()
            await server.stop()

    asyncio.run(main())


def test_metrics_allowed_clients_is_validated() -> None:
    from pydantic import ValidationError

    from mipsec.core.config import MetricsConfig

    cfg = MetricsConfig.model_validate({"port": 9100, "allowed_clients": ["10.0.0.0/8", "::1"]})
    assert [str(n) for n in cfg.allowed_clients or ()] == ["10.0.0.0/8", "::1/128"]
    for bad in ([], ["10.0.0.0/33"], ["nowhere"]):
        with pytest.raises(ValidationError, match="allowed_clients"):
            MetricsConfig.model_validate({"port": 9100, "allowed_clients": bad})
