"""PROFILE §9 provisioning over real mutual TLS on 127.0.0.1: ProvisioningServer,
the ``tls`` transport, pull_sa, and HacService using them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tlsflood import RawTls
from tlsflood import client_context as flood_context

from mipsec.core.config import (
    HACConfig,
    HAConfig,
    ProvisioningListener,
    PullConfig,
    load_config,
    validate_config,
)
from mipsec.core.errors import ConfigError
from mipsec.core.hookspecs import PluginContext
from mipsec.core.issuer import new_sa
from mipsec.core.model import BootstrapData, HomeAgentInfo, IssuedSA
from mipsec.core.pki import PkiPaths, init_pki
from mipsec.core.provisioning import (
    ProvisioningFailed,
    ProvisioningRefused,
    decode_request,
    decode_response,
    encode_install,
    encode_response,
    encode_withdraw,
)
from mipsec.core.roles.hac import HacService, IssueFailure
from mipsec.core.roles.provserver import (
    MAX_CONNECTIONS,
    ProvisioningClient,
    ProvisioningServer,
    client_context,
    pull_sa,
)
from mipsec.core.suites import Suite
from mipsec.core.tls import mn_client_context
from mipsec.core.wire.container import ContainerDecoder, encode_container
from mipsec.plugins.transport_tls import TlsTransport, TlsTransportFactory

T = TypeVar("T")
HA = HomeAgentInfo("ha1", IPv6Address("2001:db8::1"), transport="tls")
MN_ID = "alice@home.example"


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("other"))


def ha_listener(pki: PkiPaths, **kw: Any) -> ProvisioningListener:
    """The HA's listener; port 0 (ephemeral) set after validation."""
    cfg = ProvisioningListener(
        port=1,
        cert=pki.ha_cert,
        key=pki.ha_key,
        client_ca=pki.ca_cert,
        client_names=("hac.mipsec.test",),
        **kw,
    )
    return cfg.model_copy(update={"port": 0})


def hac_listener(pki: PkiPaths) -> ProvisioningListener:
    cfg = ProvisioningListener(
        port=1,
        cert=pki.hac_cert,
        key=pki.hac_key,
        client_ca=pki.ca_cert,
        client_names=("ha.mipsec.test",),
    )
    return cfg.model_copy(update={"port": 0})


def transport(pki: PkiPaths, port: int, **kw: Any) -> TlsTransport:
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "server_name": "ha.mipsec.test",
        "ca": str(pki.ca_cert),
        "cert": str(pki.hac_client_cert),
        "key": str(pki.hac_client_key),
    }
    options.update(kw)
    options = {k: v for k, v in options.items() if v is not None}
    return TlsTransportFactory().create(options, PluginContext("hac", pki.ca_cert.parent))


def make_issued(spi: int = 4660, suite: Suite = Suite.AES_128_CBC_SHA) -> IssuedSA:
    now = datetime.now(UTC)
    sa = new_sa(spi=spi, mn_id=MN_ID, suite=suite, scope=1, lifetime=600, now=now, ha_id="ha1")
    return IssuedSA(sa, BootstrapData(haa_ip6=IPv6Address("2001:db8::1")))


class Recorder:
    def __init__(self) -> None:
        self.installed: list[tuple[IssuedSA, str]] = []
        self.withdrawn: list[int] = []
        self.sas: dict[int, IssuedSA] = {}

    async def install(self, issued: IssuedSA, ha_id: str) -> None:
        self.installed.append((issued, ha_id))

    async def withdraw(self, spi: int) -> None:
        self.withdrawn.append(spi)

    async def pull(self, spi: int, ha_id: str) -> IssuedSA | None:
        return self.sas.get(spi)


async def serving(
    cfg: ProvisioningListener, rec: Recorder, body: Callable[[int], Awaitable[T]], **kw: Any
) -> T:
    kw.setdefault("on_install", rec.install)
    kw.setdefault("on_withdraw", rec.withdraw)
    server = ProvisioningServer(cfg, **kw)
    (_, port), *_ = await server.start()
    try:
        return await body(port)
    finally:
        await server.stop()


async def raw_exchange(pki: PkiPaths, port: int, data: bytes) -> tuple[list[Any], bytes]:
    """Send raw octets with the HAC client certificate; read until the server closes."""
    ctx = client_context(pki.ca_cert, pki.hac_client_cert, pki.hac_client_key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="ha.mipsec.test"
    )
    writer.write(data)
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return ContainerDecoder().feed(received), received


# ----------------------------------------------------------- install/withdraw


def test_install_withdraw_round_trip_reuses_one_connection(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    issued = make_issued()

    async def body(port: int) -> TlsTransport:
        t = transport(pki, port)
        await t.provision(HA, issued, 5)
        await t.withdraw(HA, issued.sa.spi, 5)
        await t.provision(HA, make_issued(spi=99, suite=Suite.NULL_SHA), 5)
        # An SA that does not name its HA yet (a plugin's) is sent naming
        # the HA the transport serves.
        anonymous = make_issued(spi=100)
        anonymous = IssuedSA(dataclasses.replace(anonymous.sa, ha_id=""), anonymous.bootstrap)
        await t.provision(HA, anonymous, 5)
        await t.aclose()
        return t

    caplog.set_level(logging.DEBUG, logger="mipsec.provisioning")
    t = run(serving(ha_listener(pki), rec, body))
    assert rec.installed[0] == (issued, "ha1")
    got = rec.installed[0][0].sa
    assert got.mn_to_ha_ekey == issued.sa.mn_to_ha_ekey and got.ha_id == "ha1"
    assert rec.installed[1][0].sa.mn_to_ha_ekey == b""  # NULL suite: no ekeys
    assert rec.installed[2][1] == "ha1" and rec.installed[2][0].sa.ha_id == "ha1"
    assert rec.withdrawn == [4660]
    assert t.client.stats["connects"] == 1 and t.client.stats["requests"] == 4
    # One log line per operation, never a key.
    assert "op=install spi=4660 mn_id=alice@home.example ha_id=ha1 result=200" in caplog.text
    assert "op=withdraw spi=4660" in caplog.text
    for key in (issued.sa.mn_to_ha_ikey, issued.sa.ha_to_mn_ekey):
        assert key.hex() not in caplog.text


def test_a_caller_giving_up_leaves_the_other_requests_on_the_connection_alone(
    pki: PkiPaths,
) -> None:
    """Three installs pipelined on one connection to an HA that takes 0.3 s
    each; the caller of the second gives up after 0.15 s (its MN went away:
    the HAC cancels that bootstrap's work).  The first and the third are
    answered on the same connection, no retry; the HA installed all three
    (the second is the HAC's to take back).  Before, the cancellation failed
    the connection: the first -- which had opened it, so no retry -- failed
    although its SA was installed, and its MN's older SA was withdrawn; any
    MN could cause that by leaving at the right moment (found in review)."""
    rec = Recorder()

    async def install(issued: IssuedSA, ha_id: str | None) -> None:
        await asyncio.sleep(0.3)  # an HA that takes a moment
        await rec.install(issued, ha_id)

    async def body(port: int) -> tuple[list[Any], dict[str, int]]:
        t = transport(pki, port)
        a = asyncio.create_task(t.provision(HA, make_issued(spi=1), 5))  # opens the connection
        await asyncio.sleep(0)
        b = asyncio.create_task(t.provision(HA, make_issued(spi=2), 5))
        c = asyncio.create_task(t.provision(HA, make_issued(spi=3), 5))
        await asyncio.sleep(0.15)
        b.cancel()
        got = await asyncio.gather(a, b, c, return_exceptions=True)
        stats = dict(t.client.stats)
        await t.aclose()
        return got, stats

    got, stats = run(serving(ha_listener(pki, timeout=3), rec, body, on_install=install))
    assert got[0] is None and got[2] is None, got
    assert isinstance(got[1], asyncio.CancelledError)
    assert stats["connects"] == 1 and stats["retries"] == 0, stats
    assert sorted(i.sa.spi for i, _ in rec.installed) == [1, 2, 3]


def test_server_context_policy(pki: PkiPaths) -> None:
    ctx = ProvisioningServer(ha_listener(pki)).ssl_context
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert all(c["aead"] for c in ctx.get_ciphers())


def test_concurrent_installs(pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> TlsTransport:
        t = transport(pki, port)
        await asyncio.gather(*(t.provision(HA, make_issued(spi=i), 5) for i in range(1, 41)))
        await t.aclose()
        return t

    t = run(serving(ha_listener(pki), rec, body))
    assert sorted(i.sa.spi for i, _ in rec.installed) == list(range(1, 41))
    assert t.client.stats["connects"] <= MAX_CONNECTIONS  # the pool bounds them


def test_concurrent_installs_are_pipelined_on_one_connection(pki: PkiPaths) -> None:
    """Issue 9: a burst of installs goes on one kept connection, written
    without waiting for earlier answers; the HA answers them in order."""
    rec = Recorder()
    order: list[int] = []

    async def install(issued: IssuedSA, ha_id: str) -> None:
        order.append(issued.sa.spi)
        await rec.install(issued, ha_id)

    async def body(port: int) -> TlsTransport:
        t = transport(pki, port)
        await t.provision(HA, make_issued(spi=100), 5)  # the connection exists
        await asyncio.gather(*(t.provision(HA, make_issued(spi=i), 5) for i in range(1, 17)))
        await t.aclose()
        return t

    t = run(serving(ha_listener(pki), rec, body, on_install=install))
    assert order == [100, *range(1, 17)]  # sent and answered in order
    assert t.client.stats["connects"] == 1 and t.client.stats["requests"] == 17


def test_pipeline_of_one_is_lockstep_on_several_connections(pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> TlsTransport:
        t = transport(pki, port, pipeline=1)
        await asyncio.gather(*(t.provision(HA, make_issued(spi=i), 5) for i in range(1, 5)))
        await t.aclose()
        return t

    t = run(serving(ha_listener(pki), rec, body))
    assert sorted(i.sa.spi for i, _ in rec.installed) == [1, 2, 3, 4]
    # One exchange per connection at a time: concurrent requests need more
    # connections (pipelined, one carries them all: the test above).
    assert 2 <= t.client.stats["connects"] <= 4


def test_a_request_timing_out_in_the_pipeline_spares_the_ones_behind_it(pki: PkiPaths) -> None:
    """A request that times out ends its connection (the order of answers on it
    can no longer be trusted); requests pipelined behind it are sent again on
    a fresh connection and succeed."""
    rec = Recorder()
    release = asyncio.Event()

    async def install(issued: IssuedSA, ha_id: str) -> None:
        if issued.sa.spi == 1:
            await release.wait()  # a stuck install, cut short by the server's timeout
        await rec.install(issued, ha_id)

    async def body(port: int) -> tuple[TlsTransport, list[Any]]:
        t = transport(pki, port)
        await t.withdraw(HA, 99, 5)  # the connection exists
        results = await asyncio.gather(
            t.provision(HA, make_issued(spi=1), 0.5),
            *(t.provision(HA, make_issued(spi=i), 5) for i in (2, 3)),
            return_exceptions=True,
        )
        release.set()
        await t.aclose()
        return t, results

    t, results = run(serving(ha_listener(pki, timeout=3), rec, body, on_install=install))
    assert isinstance(results[0], TimeoutError)
    assert results[1:] == [None, None]
    assert {i.sa.spi for i, _ in rec.installed} >= {2, 3}
    assert t.client.stats["connects"] == 2 and t.client.stats["retries"] == 2


def test_factory_refuses_a_pipeline_of_zero(pki: PkiPaths) -> None:
    with pytest.raises(ValueError, match="pipeline"):
        transport(pki, 7873, pipeline=0)


def test_new_connection_after_255_exchanges(pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> TlsTransport:
        t = transport(pki, port)
        for spi in range(1, 301):
            await t.withdraw(HA, spi, 5)
        await t.aclose()
        return t

    t = run(serving(ha_listener(pki), rec, body))
    assert rec.withdrawn == list(range(1, 301))
    # The Identifier is one octet (PROFILE §2): a 256th exchange needs a new session.
    assert t.client.stats["connects"] == 2


def test_reconnects_after_the_server_closed_an_idle_connection(pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> TlsTransport:
        t = transport(pki, port)
        await t.provision(HA, make_issued(spi=1), 5)
        await asyncio.sleep(0.6)  # > the server's read timeout: it closes the connection
        await t.provision(HA, make_issued(spi=2), 5)
        await t.aclose()
        return t

    t = run(serving(ha_listener(pki, timeout=0.2), rec, body))
    assert [i.sa.spi for i, _ in rec.installed] == [1, 2]
    assert t.client.stats["connects"] == 2


def test_idle_connections_at_the_cap_cannot_lock_the_hac_out(pki: PkiPaths) -> None:
    """Issue 6 item 2: idle TCP connections fill the cap; the HAC's install
    still gets in, the connection that waited longest making room for it."""
    rec = Recorder()

    async def body(port: int) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        t = transport(pki, port)
        await t.provision(HA, make_issued(), 5)
        await t.aclose()
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""  # evicted
        for _, writer in idle:
            writer.close()

    run(serving(ha_listener(pki, max_connections=4), rec, body))
    assert len(rec.installed) == 1


def test_connect_flood_cannot_evict_the_hacs_kept_connection(pki: PkiPaths) -> None:
    """A flood of bare TCP connects (anyone who reaches the port) and of
    connections that sent some octets evicts only itself: the HAC's kept,
    authenticated connection survives it, so its next installs need neither
    a reconnect nor a retry (before: evicted, one 504 per install in flight)."""
    rec = Recorder()

    async def body(port: int) -> dict[str, int]:
        t = transport(pki, port)
        await t.provision(HA, make_issued(spi=71), 5)
        flood = []
        for i in range(40):
            flood.append(await asyncio.open_connection("127.0.0.1", port))
            if i % 2:
                flood[-1][1].write(b"\x16\x03\x01")  # the start of a ClientHello
                await asyncio.sleep(0.01)  # read by the server before the next one
        await asyncio.gather(*(t.provision(HA, make_issued(spi=72 + i), 5) for i in range(3)))
        stats = t.client.snapshot()
        await t.aclose()
        for _, writer in flood:
            writer.close()
        return stats

    stats = run(serving(ha_listener(pki, max_connections=4), rec, body))
    assert sorted(i.sa.spi for i, _ in rec.installed) == [71, 72, 73, 74]
    assert (stats["connects"], stats["retries"]) == (1, 0)


def test_connect_failing_before_the_handshake_completes_is_retried_once(
    pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh connection that fails before any request left (the server
    evicted its handshake for a newcomer) is tried once more within the
    deadline; a certificate refusal is not (it would fail again)."""
    from mipsec.core.tlsclient import TlsClient

    real = TlsClient.connect
    failures: list[BaseException] = []

    async def connect(*args: Any, **kw: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(*args, **kw)

    monkeypatch.setattr(TlsClient, "connect", connect)
    rec = Recorder()

    async def body(port: int) -> tuple[dict[str, int], str]:
        t = transport(pki, port)
        failures.append(ConnectionResetError("evicted"))
        await t.provision(HA, make_issued(spi=81), 5)
        once = t.client.snapshot()
        await t.aclose()
        t = transport(pki, port)
        failures.append(ssl.SSLCertVerificationError("certificate verify failed"))
        with pytest.raises(ProvisioningFailed) as info:
            await t.provision(HA, make_issued(spi=82), 5)
        again = t.client.snapshot()
        await t.aclose()
        assert again["retries"] == 0 and not failures
        return once, str(info.value)

    once, why = run(serving(ha_listener(pki), rec, body))
    assert (once["connects"], once["retries"]) == (2, 1)
    assert [i.sa.spi for i, _ in rec.installed] == [81]
    assert "certificate verify failed" in why


def test_trickled_request_closed_at_its_deadline(pki: PkiPaths) -> None:
    """The timeout bounds a whole request, not the gap between its octets."""
    rec = Recorder()

    async def body(port: int) -> bool:
        c = await RawTls.open(port)
        ctx = flood_context(str(pki.ca_cert), str(pki.hac_client_cert), str(pki.hac_client_key))
        await c.handshake(ctx, "ha.mipsec.test")
        request = c.record(encode_container(1, encode_withdraw(5)))
        trickler = asyncio.create_task(c.trickle(request, 0.1))
        closed = await c.wait_closed_by_server(10)
        trickler.cancel()
        c.close()
        return closed and c.sent < len(request)

    assert run(serving(ha_listener(pki, timeout=0.6), rec, body))
    assert rec.withdrawn == []


def test_ha_failure_is_500_and_a_connection_error(pki: PkiPaths) -> None:
    rec = Recorder()

    async def broken(issued: IssuedSA, ha_id: str) -> None:
        raise RuntimeError("disk full")

    async def body(port: int) -> None:
        t = transport(pki, port)
        with pytest.raises(ProvisioningFailed) as info:
            await t.provision(HA, make_issued(), 5)
        assert info.value.status == 500
        await t.withdraw(HA, 4660, 5)  # the same connection still serves
        await t.aclose()

    run(serving(ha_listener(pki), rec, body, on_install=broken))
    assert rec.withdrawn == [4660]


# ------------------------------------------------------------ refusals


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_refused(pki: PkiPaths, tls: ssl.TLSVersion) -> None:
    rec = Recorder()

    async def body(port: int) -> None:
        ctx = mn_client_context(pki.ca_cert)
        ctx.maximum_version = tls
        client = ProvisioningClient(
            "127.0.0.1", port, server_name="ha.mipsec.test", ssl_context=ctx
        )
        with pytest.raises(ConnectionError):
            await client.request(encode_install(make_issued()), 5)
        await client.aclose()

    run(serving(ha_listener(pki), rec, body))
    assert rec.installed == []


def test_client_certificate_from_another_ca_refused(pki: PkiPaths, other_pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> None:
        t = transport(
            pki, port, cert=str(other_pki.hac_client_cert), key=str(other_pki.hac_client_key)
        )
        with pytest.raises(ConnectionError):
            await t.provision(HA, make_issued(), 5)
        await t.aclose()

    run(serving(ha_listener(pki), rec, body))
    assert rec.installed == []


def test_client_with_wrong_san_refused(pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> None:
        # The HA's own certificate is a valid client certificate of the same CA,
        # but its dNSName is ha.mipsec.test, not one of client_names.
        t = transport(pki, port, cert=str(pki.ha_cert), key=str(pki.ha_key))
        with pytest.raises(ConnectionError):
            await t.provision(HA, make_issued(), 5)
        await t.aclose()

    run(serving(ha_listener(pki), rec, body))
    assert rec.installed == []


def test_ha_certificate_checked_by_name_or_ip_san(pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> None:
        wrong = transport(pki, port, server_name="other.mipsec.test")
        with pytest.raises(ConnectionError, match="certificate"):
            await wrong.provision(HA, make_issued(spi=1), 5)
        by_ip = transport(pki, port, server_name=None)  # iPAddress SAN 127.0.0.1
        await by_ip.provision(HA, make_issued(spi=2), 5)
        for t in (wrong, by_ip):
            await t.aclose()

    run(serving(ha_listener(pki), rec, body))
    assert [i.sa.spi for i, _ in rec.installed] == [2]


def test_ha_not_listening_is_connection_error(pki: PkiPaths) -> None:
    async def body() -> None:
        t = transport(pki, free_port())
        with pytest.raises(ConnectionError):
            await t.provision(HA, make_issued(), 30)
        with pytest.raises(ConnectionError):
            await t.withdraw(HA, 4660, 30)

    run(body())


@pytest.mark.parametrize("handshake", [True, False])
def test_ha_that_never_answers_is_timeout(pki: PkiPaths, handshake: bool) -> None:
    async def body() -> None:
        done = asyncio.Event()
        handlers: list[asyncio.Task[Any]] = []

        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(asyncio.current_task())  # type: ignore[arg-type]
            await done.wait()  # accept, read nothing, answer nothing
            writer.close()

        ctx = ProvisioningServer(ha_listener(pki)).ssl_context if handshake else None
        server = await asyncio.start_server(hang, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        t = transport(pki, port, timeout=0.5)
        with pytest.raises(TimeoutError):
            await t.provision(HA, make_issued(), 30)  # the option's 0.5 s bounds it
        with pytest.raises(TimeoutError):
            await t.withdraw(HA, 1, 0.3)
        await t.aclose()
        server.close()
        done.set()
        await asyncio.gather(*handlers)

    run(body())


# ----------------------------------------------- bursts (issue 9: one write)


class SyncRecorder(Recorder):
    """Callbacks that complete at once, as the HA's do (install_sa_now)."""

    def __init__(self, fail_spi: int | None = None, refuse_spi: int | None = None) -> None:
        super().__init__()
        self.fail_spi = fail_spi
        self.refuse_spi = refuse_spi

    def install(self, issued: IssuedSA, ha_id: str) -> None:  # type: ignore[override]
        if issued.sa.spi == self.fail_spi:
            raise RuntimeError("secret-looking failure text")
        if issued.sa.spi == self.refuse_spi:
            raise ProvisioningRefused(f"validity_end: SA spi={issued.sa.spi} already expired")
        self.installed.append((issued, ha_id))

    def withdraw(self, spi: int) -> None:  # type: ignore[override]
        self.withdrawn.append(spi)


def count_writes(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[int]:
    """Record the size of every ``cls.write`` call (server or client TLS side)."""
    sizes: list[int] = []
    real = cls.write

    def write(self: Any, data: bytes) -> None:
        sizes.append(len(data))
        real(self, data)

    monkeypatch.setattr(cls, "write", write)
    return sizes


async def burst(pki: PkiPaths, port: int, data: bytes, answers: int) -> list[Any]:
    """Send ``data`` in one write; read until ``answers`` containers came."""
    ctx = client_context(pki.ca_cert, pki.hac_client_cert, pki.hac_client_key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="ha.mipsec.test"
    )
    writer.write(data)
    decoder, got = ContainerDecoder(), []
    while len(got) < answers:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, "the server closed before answering"
        got.extend(decoder.feed(chunk))
    writer.close()
    return got


def test_burst_of_requests_answered_with_one_write(
    pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mipsec.core.roles.tlsserver import TlsConnection

    rec = SyncRecorder()
    writes = count_writes(monkeypatch, TlsConnection)
    data = (
        encode_container(1, encode_install(make_issued(spi=11)))
        + encode_container(2, encode_withdraw(11))
        + encode_container(3, encode_install(make_issued(spi=12)))
    )
    got = run(serving(ha_listener(pki), rec, lambda port: burst(pki, port, data, 3)))
    assert [c.identifier for c in got] == [1, 2, 3]
    assert [decode_response(c.content).status for c in got] == [200, 200, 200]
    assert [i.sa.spi for i, _ in rec.installed] == [11, 12] and rec.withdrawn == [11]
    assert len(writes) == 1  # three answers, one write (one TLS record, one send)


def test_failing_callback_in_a_burst_is_500_and_the_rest_is_served(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mipsec.provisioning")
    rec = SyncRecorder(fail_spi=22)
    data = b"".join(encode_container(i, encode_install(make_issued(spi=20 + i))) for i in (1, 2, 3))
    got = run(serving(ha_listener(pki), rec, lambda port: burst(pki, port, data, 3)))
    answers = [decode_response(c.content) for c in got]
    assert [(r.status, r.reason) for r in answers] == [(200, None), (500, "internal"), (200, None)]
    assert [i.sa.spi for i, _ in rec.installed] == [21, 23]
    assert "RuntimeError" in caplog.text and "secret-looking" not in caplog.text


def test_refusal_is_400_refused_and_failure_500_internal(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    """``ProvisioningRefused`` (nothing changed) and any other failure
    (outcome unknown) get different answers: the HAC keeps an older SA live
    only after the first (test_refused_superseding_install_keeps_the_older_sa)."""
    caplog.set_level(logging.INFO, logger="mipsec.provisioning")
    rec = SyncRecorder(fail_spi=42, refuse_spi=41)
    data = b"".join(encode_container(i, encode_install(make_issued(spi=40 + i))) for i in (1, 2))
    got = run(serving(ha_listener(pki), rec, lambda port: burst(pki, port, data, 2)))
    answers = [decode_response(c.content) for c in got]
    assert [(r.status, r.reason) for r in answers] == [(400, "refused"), (500, "internal")]
    assert rec.installed == []
    assert "result=400 reason=refused (validity_end: SA spi=41 already expired)" in caplog.text


def test_installs_of_a_burst_go_to_on_install_many_together(pki: PkiPaths) -> None:
    """Consecutive installs that arrived together reach ``on_install_many`` in
    one call (the HA commits them once); another operation ends the run; a
    failure or refusal answers its own install only; a malformed request
    after a run still gets the run answered before its 400."""
    calls: list[list[int]] = []
    rec = SyncRecorder()

    def install_many(items: list[Any]) -> list[Exception | None]:
        calls.append([i.sa.spi for i, _h, _w in items])
        out: list[Exception | None] = []
        for issued, _ha_id, withdraw in items:
            assert withdraw == ()  # install_withdraws is off here
            spi = issued.sa.spi
            out.append(
                ProvisioningRefused("validity_end: expired")
                if spi == 52
                else RuntimeError("k3y")
                if spi == 53
                else None
            )
        return out

    data = (
        encode_container(1, encode_install(make_issued(spi=51)))
        + encode_container(2, encode_install(make_issued(spi=52)))
        + encode_container(3, encode_install(make_issued(spi=53)))
        + encode_container(4, encode_withdraw(51))
        + encode_container(5, encode_install(make_issued(spi=55)))
        + encode_container(6, b"not a tv header\r\n")
    )
    got = run(
        serving(
            ha_listener(pki),
            rec,
            lambda port: raw_exchange(pki, port, data),
            on_install_many=install_many,
        )
    )[0]
    answers = [(c.identifier, decode_response(c.content).status) for c in got]
    assert answers == [(1, 200), (2, 400), (3, 500), (4, 200), (5, 200), (6, 400)]
    assert calls == [[51, 52, 53], [55]] and rec.withdrawn == [51]
    assert rec.installed == []  # on_install is not used for a burst


def test_install_many_answering_the_wrong_count_is_500_for_the_burst(pki: PkiPaths) -> None:
    """A third-party ``on_install_many`` that returns too few results: every
    install of the burst is answered 500 (outcome unknown), and the
    connection goes on serving."""
    rec = SyncRecorder()
    data = b"".join(encode_container(i, encode_install(make_issued(spi=60 + i))) for i in (1, 2))
    data += encode_container(3, encode_withdraw(61))
    got = run(
        serving(
            ha_listener(pki),
            rec,
            lambda port: burst(pki, port, data, 3),
            on_install_many=lambda items: [None],
        )
    )
    answers = [(c.identifier, decode_response(c.content).status) for c in got]
    assert answers == [(1, 500), (2, 500), (3, 200)] and rec.withdrawn == [61]


def test_withdrawals_of_a_burst_go_to_on_withdraw_many_together(pki: PkiPaths) -> None:
    """Consecutive withdrawals that arrived together reach ``on_withdraw_many``
    in one call (the HA commits them once) and are answered only once it has
    returned; an install ends the run (and another begins after it); a
    failure answers its own withdrawal only; a callback answering the wrong
    count is 500 for its whole run, the connection serving on."""
    calls: list[list[int]] = []
    rec = SyncRecorder()

    def withdraw_many(spis: list[int]) -> list[Exception | None]:
        calls.append(list(spis))
        if 79 in spis:
            return [None]  # a third party's bug: too few results
        return [RuntimeError("k3y") if spi == 72 else None for spi in spis]

    data = b"".join(encode_container(i, encode_withdraw(70 + i)) for i in (1, 2, 3))
    data += encode_container(4, encode_install(make_issued(spi=74)))
    data += encode_container(5, encode_withdraw(75)) + encode_container(6, encode_withdraw(76))
    data += encode_container(7, encode_install(make_issued(spi=77)))
    data += encode_container(8, encode_withdraw(78)) + encode_container(9, encode_withdraw(79))
    got = run(
        serving(
            ha_listener(pki),
            rec,
            lambda port: burst(pki, port, data, 9),
            on_install_many=lambda items: [None] * len(items),
            on_withdraw_many=withdraw_many,
        )
    )
    answers = [(c.identifier, decode_response(c.content).status) for c in got]
    assert answers == [
        (1, 200),
        (2, 500),
        (3, 200),
        (4, 200),
        (5, 200),
        (6, 200),
        (7, 200),
        (8, 500),
        (9, 500),
    ]
    assert calls == [[71, 72, 73], [75, 76], [78, 79]]
    assert rec.withdrawn == []  # on_withdraw is not used for a burst


def test_the_ha_commits_a_burst_of_withdrawals_once_before_any_answer(
    tmp_path: Path, pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HA (``[bindings] in_sa_store``, as ``mipsec init`` writes it):
    withdrawals that arrive in one read share one transaction -- their
    records and their rows' deletes, one BEGIN and one COMMIT (one each per
    withdrawal before) -- and the answers are written only after that
    COMMIT: a HAC never holds a confirmation of a withdrawal that is not
    durable.  Nothing is left for a later commit."""
    from test_ha_one_commit import in_store_config, rows
    from test_ha_udp import make_issued as ha_issued

    from mipsec.core.roles.ha import HaService
    from mipsec.core.roles.tlsserver import TlsConnection

    events: list[str] = []
    real_write = TlsConnection.write

    def write(self: Any, data: bytes) -> None:
        events.append("answers written")
        real_write(self, data)

    monkeypatch.setattr(TlsConnection, "write", write)
    sas = [ha_issued(spi=0x8001 + i) for i in range(4)]

    async def main() -> list[int]:
        svc = HaService(in_store_config(tmp_path))
        await svc.start()
        try:
            assert svc.install_many_now([(x, "ha1", ()) for x in sas]) == [None] * 4
            svc.store._conn.set_trace_callback(  # type: ignore[attr-defined]
                lambda sql: (
                    events.append(sql.split()[0]) if sql.startswith(("BEGIN", "COMMIT")) else None
                )
            )
            server = ProvisioningServer(
                ha_listener(pki),
                on_install=svc.install_sa_now,
                on_install_many=svc.install_many_now,
                on_withdraw=svc.withdraw_sa_now,
                on_withdraw_many=svc.withdraw_many_now,
                install_withdraws=True,
            )
            (_, port), *_ = await server.start()
            try:
                data = b"".join(
                    encode_container(i, encode_withdraw(x.sa.spi)) for i, x in enumerate(sas, 1)
                )
                got = await burst(pki, port, data, len(sas))
                await asyncio.sleep(0.05)  # a delete queued for later would run here
            finally:
                await server.stop()
            return [decode_response(c.content).status for c in got]
        finally:
            await svc.stop()

    assert run(main()) == [200] * 4
    assert events == ["BEGIN", "COMMIT", "answers written"]
    path = tmp_path / "sa.sqlite"
    assert rows(path, "SELECT spi FROM issued_sa") == []
    assert sorted(rows(path, "SELECT spi, dead FROM spi_state")) == [(x.sa.spi, 1) for x in sas]


def test_waiting_callback_in_a_burst_keeps_the_order(pki: PkiPaths) -> None:
    # Install 31 completes at once, the withdraw waits, install 33 completes
    # at once: the answer to 31 leaves before the withdraw is done, and 33 is
    # worked on only after it (answers in request order, PROFILE §9).
    rec = SyncRecorder()
    release = asyncio.Event()
    order: list[str] = []

    async def slow_withdraw(spi: int) -> None:
        order.append(f"withdraw {spi} started")
        await release.wait()
        rec.withdrawn.append(spi)

    def install(issued: IssuedSA, ha_id: str) -> None:
        order.append(f"install {issued.sa.spi}")
        rec.installed.append((issued, ha_id))

    async def body(port: int) -> list[Any]:
        ctx = client_context(pki.ca_cert, pki.hac_client_cert, pki.hac_client_key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="ha.mipsec.test"
        )
        writer.write(
            encode_container(1, encode_install(make_issued(spi=31)))
            + encode_container(2, encode_withdraw(31))
            + encode_container(3, encode_install(make_issued(spi=33)))
        )
        decoder, got = ContainerDecoder(), []
        while not got:
            got.extend(decoder.feed(await asyncio.wait_for(reader.read(65536), 10)))
        assert [c.identifier for c in got] == [1]  # the withdraw still waits
        assert order == ["install 31", "withdraw 31 started"]
        release.set()
        while len(got) < 3:
            got.extend(decoder.feed(await asyncio.wait_for(reader.read(65536), 10)))
        writer.close()
        return got

    got = run(serving(ha_listener(pki), rec, body, on_install=install, on_withdraw=slow_withdraw))
    assert [c.identifier for c in got] == [1, 2, 3]
    assert [decode_response(c.content).status for c in got] == [200, 200, 200]
    assert order == ["install 31", "withdraw 31 started", "install 33"]


def test_client_sends_the_requests_of_one_turn_in_one_write(
    pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mipsec.core.roles.tlsserver import TlsConnection
    from mipsec.core.tlsclient import TlsClient

    rec = SyncRecorder()
    client_writes = count_writes(monkeypatch, TlsClient)
    server_writes = count_writes(monkeypatch, TlsConnection)

    async def body(port: int) -> None:
        t = transport(pki, port)
        await t.provision(HA, make_issued(spi=40), 5)  # opens the connection
        del client_writes[:], server_writes[:]
        await asyncio.gather(*(t.provision(HA, make_issued(spi=i), 5) for i in range(41, 46)))
        await t.aclose()

    run(serving(ha_listener(pki), rec, body))
    assert sorted(i.sa.spi for i, _ in rec.installed) == list(range(40, 46))
    assert len(client_writes) == 1  # five requests, one TLS record
    assert len(server_writes) == 1  # and their five answers in one


# ------------------------------------------------------------ malformed input


def test_malformed_request_gets_400_and_the_server_keeps_serving(pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> list[list[Any]]:
        dup = b"prov-op: withdraw\r\nmip6-spi: 1\r\nmip6-spi: 2\r\n\r\n"
        out = []
        for data in (
            encode_container(1, dup),  # duplicate header (PROFILE §3)
            encode_container(2, encode_withdraw(5)),  # Identifier must start at 1
            b"\x01\x03\x00\x05hello",  # Rsrvd bits set: answered with Identifier 3
            encode_container(1, encode_withdraw(5)) + encode_container(1, encode_withdraw(6)),
        ):
            containers, _ = await raw_exchange(pki, port, data)
            out.append(containers)
        # A request without an answerable Identifier is closed without a response.
        assert (await raw_exchange(pki, port, b"\x00\x00\x00\x05hello"))[1] == b""
        t = transport(pki, port)
        await t.provision(HA, make_issued(), 5)
        await t.aclose()
        return out

    out = run(serving(ha_listener(pki), rec, body))
    for containers, identifier in zip(out[:3], (1, 2, 3), strict=True):
        (c,) = containers
        assert c.identifier == identifier
        r = decode_response(c.content)
        assert (r.status, r.reason) == (400, "malformed")
    first, second = out[3]
    assert decode_response(first.content).status == 200
    assert (second.identifier, decode_response(second.content).status) == (1, 400)
    assert rec.withdrawn == [5] and len(rec.installed) == 1


def test_unserved_operation_is_400(pki: PkiPaths) -> None:
    rec = Recorder()

    async def body(port: int) -> None:
        # An install sent to a pull-only server (the HAC's).
        client = ProvisioningClient(
            "127.0.0.1",
            port,
            server_name="hac.mipsec.test",
            ssl_context=client_context(pki.ca_cert, pki.ha_cert, pki.ha_key),
        )
        r = await client.request(encode_install(make_issued()), 5)
        assert (r.status, r.reason) == (400, "unsupported-op")
        await client.aclose()

    run(serving(hac_listener(pki), rec, body, on_install=None, on_withdraw=None, on_pull=rec.pull))


# -------------------------------------------------------------------- pull


def pull_cfg(pki: PkiPaths, port: int, **kw: Any) -> PullConfig:
    args: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "server_name": "hac.mipsec.test",
        "ca": pki.ca_cert,
        "cert": pki.ha_cert,
        "key": pki.ha_key,
    }
    args.update(kw)
    return PullConfig(**args)


def test_pull_known_and_unknown_spi(pki: PkiPaths) -> None:
    rec = Recorder()
    issued = make_issued(spi=77)
    rec.sas[77] = issued

    async def body(port: int) -> tuple[IssuedSA | None, IssuedSA | None]:
        cfg = pull_cfg(pki, port)
        return await pull_sa(cfg, 77, "ha1"), await pull_sa(cfg, 78, "ha1")

    known, unknown = run(
        serving(hac_listener(pki), rec, body, on_install=None, on_withdraw=None, on_pull=rec.pull)
    )
    assert known == issued and unknown is None


def test_pull_from_nothing_listening_is_connection_error(pki: PkiPaths) -> None:
    with pytest.raises(ConnectionError):
        run(pull_sa(pull_cfg(pki, free_port()), 1, "ha1"))


# ------------------------------------------------------- HacService in-process


def hac_config(
    tmp: Path,
    pki: PkiPaths,
    ha_port: int,
    *,
    pull_port: int | None = None,
    allowed_clients: list[str] | None = None,
    ha2_port: int | None = None,
) -> HACConfig:
    creds = tmp / "credentials.toml"
    creds.write_text(f'[[mn]]\nmn_id = "{MN_ID}"\npsk_hex = "{"00" * 32}"\n')
    creds.chmod(0o600)  # a credential file must be private (core/secretfiles.py)
    data: dict[str, Any] = {
        "hac": {
            "listen": ["127.0.0.1"],
            "port": free_port(),
            "cert": str(pki.hac_cert),
            "key": str(pki.hac_key),
            "provisioning_timeout": 3,
        },
        "credentials": {"backend": "toml", "path": str(creds)},
        "sa_store": {"backend": "memory"},
        "home_addresses": {"allocator": "pool", "ip6_prefix": "2001:db8:1::/64"},
        "ha": [
            {
                "id": "ha1",
                "address6": "2001:db8::1",
                "transport": "tls",
                "options": {
                    "host": "127.0.0.1",
                    "port": ha_port,
                    "server_name": "ha.mipsec.test",
                    "ca": str(pki.ca_cert),
                    "cert": "hac-client.pem",  # relative: resolved by the config loader
                    "key": "hac-client.key",
                },
            }
        ],
    }
    if ha2_port is not None:  # a second HA, ha2, on its own listener
        second = {**data["ha"][0], "id": "ha2", "address6": "2001:db8::2"}
        second["options"] = {**second["options"], "port": ha2_port}
        data["ha"].append(second)
    if pull_port is not None:
        data["provisioning"] = {
            "port": pull_port,
            "cert": str(pki.hac_cert),
            "key": str(pki.hac_key),
            "client_ca": str(pki.ca_cert),
            "client_names": ["ha.mipsec.test"],
        }
        if allowed_clients is not None:
            data["provisioning"]["allowed_clients"] = allowed_clients
    cfg = validate_config(data, "hac", base=pki.ca_cert.parent)
    assert isinstance(cfg, HACConfig)
    return cfg


def test_hac_provisions_over_tls_and_serves_pull(tmp_path: Path, pki: PkiPaths) -> None:
    rec = Recorder()
    pull_port = free_port()

    async def body(port: int) -> tuple[IssuedSA, list[Any]]:
        hac = HacService(hac_config(tmp_path, pki, port, pull_port=pull_port))
        await hac.start()
        try:
            issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            spi = issued.sa.spi
            cfg = pull_cfg(pki, pull_port)
            pulled = [
                await pull_sa(cfg, spi, "ha1"),
                await pull_sa(cfg, spi, "ha2"),  # another HA's SPI: refused like unknown
                await pull_sa(cfg, spi % 268435455 + 1, "ha1"),
            ]
        finally:
            await hac.stop()
        return issued, pulled

    issued, pulled = run(serving(ha_listener(pki), rec, body))
    assert rec.installed == [(issued, "ha1")]
    assert issued.sa.ha_id == "ha1" and issued.bootstrap.ip6_hoa is not None
    assert pulled == [issued, None, None]


def test_a_pull_reuses_its_tls_context_until_its_files_change(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """The HA builds a pull's TLS client context once (~1.3 ms of its loop
    per pull before, which bounded how fast an HA that lost its store pulls
    its MNs back), and still reads ``[pull]``'s files at each pull: the same
    files, the same context; a certificate and key written anew under the
    same paths -- here another HA's, which the HAC's pull listener does not
    admit -- are what the next pull presents."""
    import shutil

    from mipsec.core.roles import provserver

    rec = Recorder()
    pull_port = free_port()
    files = tmp_path / "pull-files"
    files.mkdir()
    cert, key = files / "ha.pem", files / "ha.key"
    shutil.copy(pki.ha_cert, cert)
    shutil.copy(pki.ha_key, key)

    async def body(port: int) -> tuple[IssuedSA, list[Any], bool, BaseException | None]:
        hac = HacService(hac_config(tmp_path, pki, port, pull_port=pull_port))
        await hac.start()
        try:
            issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            cfg = pull_cfg(pki, pull_port, cert=cert, key=key)
            pulled = [await pull_sa(cfg, issued.sa.spi, "ha1")]
            held = provserver._pull_contexts[(str(pki.ca_cert), str(cert), str(key))][1]
            pulled.append(await pull_sa(cfg, issued.sa.spi, "ha1"))
            same = provserver._pull_contexts[(str(pki.ca_cert), str(cert), str(key))][1] is held
            shutil.copy(pki.ha2_cert, cert)  # renewed in place: another identity
            shutil.copy(pki.ha2_key, key)
            refused: BaseException | None = None
            try:
                await pull_sa(cfg, issued.sa.spi, "ha1")
            except (ConnectionError, OSError, TimeoutError) as exc:
                refused = exc
            return issued, pulled, same, refused
        finally:
            await hac.stop()

    issued, pulled, same, refused = run(serving(ha_listener(pki), rec, body))
    assert pulled == [issued, issued] and same
    assert refused is not None  # the new files were read: the HAC refused ha2's identity


def test_hac_pull_listener_closes_a_client_outside_allowed_clients_before_tls(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """``[provisioning] allowed_clients`` on the HAC's pull listener (the same
    ProvisioningListener as the HA's): a ClientHello from 127.0.0.2, with an
    HA's own certificate, gets nothing back and is counted; the HA at
    127.0.0.1 pulls its SA as before."""
    from mipsec.core.roles.tlsserver import ADDRESS_REFUSED

    rec = Recorder()
    pull_port = free_port()

    async def body(port: int) -> tuple[IssuedSA, bytes, IssuedSA | None, int, int]:
        cfg = hac_config(tmp_path, pki, port, pull_port=pull_port, allowed_clients=["127.0.0.1"])
        hac = HacService(cfg)
        await hac.start()
        try:
            issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            ctx = flood_context(str(pki.ca_cert), str(pki.ha_cert), str(pki.ha_key))
            answer = await hello_from("127.0.0.2", pull_port, ctx)
            pulled = await pull_sa(pull_cfg(pki, pull_port), issued.sa.spi, "ha1")
            assert hac._prov_server is not None
            listener = hac._prov_server.listener
            return issued, answer, pulled, listener.stats[ADDRESS_REFUSED], listener.connections
        finally:
            await hac.stop()

    issued, answer, pulled, refused, held = run(serving(ha_listener(pki), rec, body))
    assert answer == b"" and refused == 1
    assert held <= 1  # at most the pull's own connection, on its way out
    assert pulled == issued


async def _hac_with_pull_listener(
    tmp_path: Path, pki: PkiPaths, port: int, pull_port: int
) -> tuple[Any, HacService, Any]:
    """A started HAC provisioning to ``port`` with its pull listener on
    ``pull_port``, and the operations object a reload runs through."""
    from mipsec.core.roles.hac_ops import HacOps

    cfg = hac_config(tmp_path, pki, port, pull_port=pull_port)
    hac = HacService(cfg)
    await hac.start()
    return cfg, hac, HacOps(hac, str(tmp_path / "hac.toml"))


def test_hac_reload_changes_who_may_pull(
    tmp_path: Path, pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HAC's pull listener takes a reload's ``client_names`` (as the
    HA's provisioning listener does): the HA's name taken off, its pull is
    refused and its open connection closed; put back, it pulls again.  Only
    that key changes: nothing needs a restart."""
    from mipsec.core.roles import hac_ops

    rec = Recorder()
    pull_port = free_port()

    async def body(port: int) -> tuple[IssuedSA, list[Any], list[list[str]]]:
        cfg, hac, ops = await _hac_with_pull_listener(tmp_path, pki, port, pull_port)
        assert cfg.provisioning is not None
        shut = cfg.model_copy(
            update={
                "provisioning": cfg.provisioning.model_copy(
                    update={"client_names": ("other-ha.mipsec.test",)}
                )
            }
        )
        applied: list[list[str]] = []
        outcomes: list[Any] = []
        try:
            issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            spi, pcfg = issued.sa.spi, pull_cfg(pki, pull_port)
            outcomes.append(await pull_sa(pcfg, spi, "ha1"))
            for new in (shut, cfg):
                monkeypatch.setattr(hac_ops, "load_config", lambda *_: new)
                applied.append(ops._apply())
                try:
                    outcomes.append(await pull_sa(pcfg, spi, "ha1"))
                except ProvisioningFailed as exc:
                    outcomes.append(str(exc))
        finally:
            await hac.stop()
        return issued, outcomes, applied

    issued, outcomes, applied = run(serving(ha_listener(pki), rec, body))
    assert applied == [["provisioning.client_names"]] * 2
    assert outcomes[0] == issued and outcomes[2] == issued
    # Refused while the name was off: the HAC closes the connection at once.
    assert isinstance(outcomes[1], str) and "closed by the peer" in outcomes[1], outcomes


def test_hac_reload_applies_its_pull_listener_timeout(
    tmp_path: Path, pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HAC's pull listener takes a reload's ``timeout`` (as the HA's
    provisioning listener does): a connection that never starts its
    handshake is closed at the new deadline; the HA still pulls."""
    from mipsec.core.roles import hac_ops

    rec = Recorder()
    pull_port = free_port()

    async def body(port: int) -> tuple[list[str], bytes, float, float]:
        cfg, hac, ops = await _hac_with_pull_listener(tmp_path, pki, port, pull_port)
        assert cfg.provisioning is not None
        quick = cfg.model_copy(
            update={"provisioning": cfg.provisioning.model_copy(update={"timeout": 0.5})}
        )
        try:
            issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            monkeypatch.setattr(hac_ops, "load_config", lambda *_: quick)
            applied = ops._apply()
            reader, writer = await asyncio.open_connection("127.0.0.1", pull_port)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            got = await asyncio.wait_for(reader.read(1), 10)  # closed by the HAC
            waited = loop.time() - t0
            writer.close()
            pulled = await pull_sa(pull_cfg(pki, pull_port), issued.sa.spi, "ha1")
            assert pulled == issued
        finally:
            await hac.stop()
        return applied, got, waited, cfg.provisioning.timeout

    applied, got, waited, before = run(serving(ha_listener(pki), rec, body))
    assert applied == ["provisioning.timeout"]
    # Closed by the new deadline, well before the old one would have come.
    assert got == b"" and waited < before, (waited, before)


@pytest.mark.parametrize("ha", ["down", "refuses"])
def test_hac_gets_504_and_keeps_nothing_when_the_ha_does_not_confirm(
    tmp_path: Path, pki: PkiPaths, ha: str
) -> None:
    rec = Recorder()

    async def refuse(issued: IssuedSA, ha_id: str) -> None:
        raise RuntimeError("refused")

    async def attempt(port: int) -> tuple[int, list[IssuedSA]]:
        hac = HacService(hac_config(tmp_path, pki, port))
        try:
            with pytest.raises(IssueFailure) as info:
                await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA, 1)
            live = hac.store.live(datetime.now(UTC) - timedelta(seconds=1))
        finally:
            await hac.stop()
        return info.value.status, live

    if ha == "down":
        status, live = run(attempt(free_port()))
    else:
        status, live = run(serving(ha_listener(pki), rec, attempt, on_install=refuse))
        assert len(rec.withdrawn) == 1  # the HAC told the HA to forget it
    assert status == 504
    assert live == []  # nothing half-provisioned


def test_factory_validates_options(pki: PkiPaths, tmp_path: Path) -> None:
    ctx = PluginContext("hac", tmp_path)
    good = {
        "host": "127.0.0.1",
        "port": 7873,
        "ca": str(pki.ca_cert),
        "cert": str(pki.hac_client_cert),
        "key": str(pki.hac_client_key),
    }
    assert TlsTransportFactory().create(good, ctx).timeout == 5.0
    for bad, key in (
        ({**good, "colour": "red"}, "colour"),
        ({k: v for k, v in good.items() if k != "host"}, "host"),
        ({**good, "port": 0}, "port"),
        ({**good, "timeout": -1}, "timeout"),
        ({**good, "ca": str(tmp_path / "missing.pem")}, "ca"),
        ({**good, "key": str(pki.ha_key)}, "cert"),  # key does not match the certificate
    ):
        with pytest.raises(ValueError, match=rf"^{key}: "):
            TlsTransportFactory().create(bad, ctx)


def test_pull_ha_id_bound_to_certificate(pki: PkiPaths) -> None:
    """A puller gets only the SAs of the HA its certificate names (PROFILE §9)."""
    rec = Recorder()
    rec.sas[77] = make_issued(spi=77)
    names = {"ha1": ["ha.mipsec.test"], "ha2": ["ha2.mipsec.test"]}

    async def body(port: int) -> tuple[IssuedSA | None, IssuedSA | None, IssuedSA | None]:
        cfg = pull_cfg(pki, port)  # authenticates with the ha.mipsec.test certificate
        return (
            await pull_sa(cfg, 77, "ha1"),
            await pull_sa(cfg, 77, "ha2"),  # claims another HA's id
            await pull_sa(cfg, 77, "ha9"),  # an HA nobody configured
        )

    own, other, unknown = run(
        serving(
            hac_listener(pki),
            rec,
            body,
            on_install=None,
            on_withdraw=None,
            on_pull=rec.pull,
            pull_names=names.get,
        )
    )
    assert own is not None and other is None and unknown is None


# ------------------------------------------- supersede after the 200 (and prov-withdraw)


class SupersedeRecorder(Recorder):
    """An HA callback that takes ``prov-withdraw`` (as HaService.install_sa does)."""

    def __init__(self) -> None:
        super().__init__()
        self.superseded: list[tuple[int, tuple[int, ...]]] = []
        self.refuse_next: Exception | None = None

    async def install(self, issued: IssuedSA, ha_id: str, withdraw: tuple[int, ...] = ()) -> None:
        if self.refuse_next is not None:
            exc, self.refuse_next = self.refuse_next, None
            raise exc
        await super().install(issued, ha_id)
        self.superseded.append((issued.sa.spi, withdraw))


@pytest.mark.parametrize("ha_takes_it", [True, False])
def test_second_sa_withdraws_the_first_after_its_200(
    tmp_path: Path, pki: PkiPaths, ha_takes_it: bool
) -> None:
    """Issue 6 item 3: once the MN's new SA has had its 200 (``deliver``),
    the older one is withdrawn from the HA by a withdraw request, confirmed
    and recorded.  Until the twenty-ninth session the new SA's install
    carried the older SPI (``prov-withdraw``, one round trip fewer) when the
    HA took it: a re-bootstrap that then failed (504, 5xx, the MN gone
    before its 200) had withdrawn the MN's valid SA (found in review).  The
    install no longer carries it, whatever the HA takes."""
    rec = SupersedeRecorder()

    async def body(port: int) -> tuple[IssuedSA, IssuedSA, list[Any], int]:
        hac = HacService(hac_config(tmp_path, pki, port))
        await hac.start()
        try:
            first = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(first, "test")
            second = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(second, "test")
            now = datetime.now(UTC)
            assert [i.sa.spi for i in hac.store.live_for_mn(MN_ID, now)] == [second.sa.spi]
            for _ in range(100):  # the fallback withdraw runs in the background
                if not hac.store.retired_unconfirmed(now):
                    break
                await asyncio.sleep(0.02)
            pending = hac.store.retired_unconfirmed(now)
            transport = hac.transports["ha1"]
            assert isinstance(transport, TlsTransport)
            requests = transport.client.stats["requests"]
        finally:
            await hac.stop()
        return first, second, pending, requests

    first, second, pending, requests = run(
        serving(ha_listener(pki), rec, body, install_withdraws=ha_takes_it)
    )
    assert pending == []
    assert rec.superseded == [(first.sa.spi, ()), (second.sa.spi, ())]
    assert rec.withdrawn == [first.sa.spi] and requests == 3


def test_refused_superseding_install_keeps_the_older_sa(tmp_path: Path, pki: PkiPaths) -> None:
    """An HA that refuses the install (400 ``refused``: nothing changed):
    the MN's older SA stays live (the MN got 504 for the new one, nothing of
    it survives)."""
    first, status, live, pending = _superseding_install_failing(
        tmp_path, pki, ProvisioningRefused("validity_end: already expired")
    )
    assert status == 504 and live == [first.sa.spi] and first.sa.spi not in pending


def test_superseding_install_failing_with_500_keeps_the_older_sa(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """A 500 from the HA (e.g. its binding cache could not commit): the
    outcome of the install is unknown, so the new SA is withdrawn until the
    HA confirms -- and the MN's older SA stays live, on the HAC and the HA,
    never withdrawn.  Until the twenty-ninth session the install carried the
    older SA's withdrawal, which the HA may have carried out, so the HAC
    retired it too: the MN, told 504, lost the SA it still held (found in
    review)."""
    first, status, live, pending = _superseding_install_failing(
        tmp_path, pki, RuntimeError("disk I/O error")
    )
    assert status == 504 and live == [first.sa.spi]
    assert first.sa.spi not in pending


def _superseding_install_failing(
    tmp_path: Path, pki: PkiPaths, exc: Exception
) -> tuple[IssuedSA, int, list[int], list[int]]:
    rec = SupersedeRecorder()

    async def body(port: int) -> tuple[IssuedSA, int, list[int], list[int]]:
        hac = HacService(hac_config(tmp_path, pki, port))
        await hac.start()
        try:
            first = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(first, "test")
            rec.refuse_next = exc
            with pytest.raises(IssueFailure) as info:
                await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            now = datetime.now(UTC)
            live = [i.sa.spi for i in hac.store.live_for_mn(MN_ID, now)]
            pending = [p[0] for p in hac.store.retired_unconfirmed(now)]
        finally:
            await hac.stop()
        # The failed SA is withdrawn (in case it was installed), the older never.
        assert [s for s in rec.withdrawn if s != first.sa.spi]
        assert first.sa.spi not in rec.withdrawn
        return first, info.value.status, live, pending

    return run(serving(ha_listener(pki), rec, body, install_withdraws=True))


def test_unanswered_superseding_install_keeps_the_older_sa(tmp_path: Path, pki: PkiPaths) -> None:
    """No answer to the install of an MN's new SA: the new one is withdrawn
    until the HA confirms, the older one stays live and is never withdrawn
    (before the twenty-ninth session the install carried its withdrawal, and
    the HAC retired it too: see above)."""
    rec = SupersedeRecorder()
    hang = asyncio.Event()
    installs = 0

    async def install(issued: IssuedSA, ha_id: str, withdraw: tuple[int, ...] = ()) -> None:
        nonlocal installs
        installs += 1
        if installs == 2:
            await hang.wait()  # never answers (the HAC's provisioning_timeout is 3 s)
        await rec.install(issued, ha_id, withdraw)

    async def body(port: int) -> tuple[IssuedSA, int, list[int], list[int]]:
        hac = HacService(hac_config(tmp_path, pki, port))
        await hac.start()
        try:
            first = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(first, "test")
            with pytest.raises(IssueFailure) as info:
                await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            now = datetime.now(UTC)
            live = [i.sa.spi for i in hac.store.live_for_mn(MN_ID, now)]
            pending = [p[0] for p in hac.store.retired_unconfirmed(now)]
            hang.set()
        finally:
            await hac.stop()
        return first, info.value.status, live, pending

    first, status, live, pending = run(
        serving(ha_listener(pki), rec, body, install_withdraws=True, on_install=install)
    )
    assert status == 504 and live == [first.sa.spi]
    assert first.sa.spi not in pending and first.sa.spi not in rec.withdrawn
    assert len(pending) == 1  # the new SA: withdrawn until the HA confirms


def test_kept_connection_serves_many_installs(tmp_path: Path, pki: PkiPaths) -> None:
    """One bootstrap after another: the HAC keeps one provisioning connection
    (a TLS handshake per install would cost the HAC and the HA more than the
    install itself) for the installs and the withdrawals of the SAs each
    supersedes."""
    rec = SupersedeRecorder()

    async def body(port: int) -> dict[str, int]:
        hac = HacService(hac_config(tmp_path, pki, port))
        await hac.start()
        try:
            for _ in range(20):
                issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
                hac.deliver(issued, "test")
            for _ in range(100):  # the last withdrawal runs in the background
                if len(rec.withdrawn) == 19:
                    break
                await asyncio.sleep(0.02)
            transport = hac.transports["ha1"]
            assert isinstance(transport, TlsTransport)
            return dict(transport.client.stats)
        finally:
            await hac.stop()

    stats = run(serving(ha_listener(pki), rec, body, install_withdraws=True))
    assert stats["requests"] == 20 + 19 and stats["connects"] == 1 and stats["retries"] == 0


class ProtocolOnlyStore:
    """A third party's store: the SAStore protocol, none of the SQLite store's
    optional fast paths (the HAC must fall back, not fail)."""

    OPTIONAL = frozenset(
        {
            "confirm_retired_many",
            "live_spis_for_mn",
            "live_listing",
            "live_counts",
            "live_summary",
            "discard",
        }
    )

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in self.OPTIONAL:
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_superseding_install_with_a_protocol_only_store(tmp_path: Path, pki: PkiPaths) -> None:
    rec = SupersedeRecorder()

    async def body(port: int) -> tuple[IssuedSA, IssuedSA, list[int], list[Any]]:
        hac = HacService(hac_config(tmp_path, pki, port))
        await hac.start()
        hac.store = ProtocolOnlyStore(hac.store)  # type: ignore[assignment]
        try:
            first = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(first, "test")
            second = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(second, "test")
            now = datetime.now(UTC)
            live = [i.sa.spi for i in hac.store.live_for_mn(MN_ID, now)]
            for _ in range(100):  # the withdrawal, then its confirmation (a batch)
                if not hac.store.retired_unconfirmed(now):
                    break
                await asyncio.sleep(0.02)
            return first, second, live, hac.store.retired_unconfirmed(now)
        finally:
            await hac.stop()

    first, second, live, pending = run(serving(ha_listener(pki), rec, body, install_withdraws=True))
    assert rec.superseded == [(first.sa.spi, ()), (second.sa.spi, ())]
    assert rec.withdrawn == [first.sa.spi] and live == [second.sa.spi] and pending == []


def test_garbage_from_the_ha_mid_burst_fails_that_burst(tmp_path: Path, pki: PkiPaths) -> None:
    """An HA (or whoever holds its key) answers a pipelined burst of installs
    with garbage: every install waiting on that connection fails (504 to its
    MN), none of those SAs is live in the HAC's store, each is withdrawn on a
    fresh connection until confirmed, and the next bootstrap is served."""
    mn_ids = [f"mn{i}@home.example" for i in range(3)]
    seen: list[list[tuple[str, int | None]]] = []

    async def fake_ha(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ops: list[tuple[str, int | None]] = []
        seen.append(ops)
        first = len(seen) == 1
        decoder = ContainerDecoder()
        try:
            while chunk := await reader.read(65536):
                for c in decoder.feed(chunk):
                    req = decode_request(c.content)
                    ops.append((req.op.value, req.spi))
                    if not first:
                        writer.write(encode_container(c.identifier, encode_response(200)))
                if first and len(ops) == len(mn_ids):
                    writer.write(b"\x17" * 64)  # not a container
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()

    async def body() -> tuple[list[Any], list[int], list[int], Any]:
        ctx = ProvisioningServer(ha_listener(pki)).ssl_context
        server = await asyncio.start_server(fake_ha, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        hac = HacService(hac_config(tmp_path, pki, port))
        await hac.start()
        try:
            results = await asyncio.gather(
                *(hac.issue_sa(m, Suite.AES_128_CBC_SHA256, 1) for m in mn_ids),
                return_exceptions=True,
            )
            now = datetime.now(UTC)
            live = [i.sa.spi for m in mn_ids for i in hac.store.live_for_mn(m, now)]
            for _ in range(100):  # the first withdrawal retry comes after 0.5 s
                if not hac.store.retired_unconfirmed(datetime.now(UTC)):
                    break
                await asyncio.sleep(0.05)
            pending = [p[0] for p in hac.store.retired_unconfirmed(datetime.now(UTC))]
            after = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
        finally:
            await hac.stop()
            server.close()
        return results, live, pending, after

    results, live, pending, after = run(body())
    assert [getattr(r, "status", None) for r in results] == [504, 504, 504]
    assert live == [] and pending == []
    installs = [spi for op, spi in seen[0] if op == "install"]
    assert len(installs) == 3  # one connection carried the whole burst
    withdrawn = sorted(spi for ops in seen[1:] for op, spi in ops if op == "withdraw")
    assert withdrawn == sorted(installs)  # each withdrawn, on fresh connections
    assert ("install", after.sa.spi) in [x for ops in seen[1:] for x in ops]


# ----------------------------------------------------------- allowed_clients


async def hello_from(source: str, port: int, ctx: ssl.SSLContext) -> bytes:
    """A complete ClientHello from ``source``; what comes back (b"": nothing,
    the connection reset before or after the hello left)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except ConnectionError:
        return b""
    raw = RawTls(reader, writer)
    try:
        writer.write(raw.start_tls(ctx, "ha.mipsec.test"))
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def test_a_client_from_outside_allowed_clients_is_closed_before_tls(pki: PkiPaths) -> None:
    """``allowed_clients``: a connection from another address is closed at
    accept -- no ServerHello, no key exchange or signature spent on it, no
    slot in the connection table -- even with a valid client certificate;
    the HAC's address is served as before."""
    from mipsec.core.roles.tlsserver import ADDRESS_REFUSED

    rec = Recorder()
    cfg = ha_listener(pki, allowed_clients=("127.0.0.1", "2001:db8::/32"))
    assert [str(n) for n in cfg.allowed_clients or ()] == ["127.0.0.1/32", "2001:db8::/32"]

    async def main() -> tuple[bytes, int, int]:
        server = ProvisioningServer(cfg, on_install=rec.install, on_withdraw=rec.withdraw)
        (_, port), *_ = await server.start()
        try:
            # From 127.0.0.2 (loopback too, but not allowed), with the HAC's
            # own certificate: a complete ClientHello gets nothing back.
            ctx = flood_context(str(pki.ca_cert), str(pki.hac_client_cert), str(pki.hac_client_key))
            answer = await hello_from("127.0.0.2", port, ctx)
            held = server.listener.connections
            t = transport(pki, port)
            await t.provision(HA, make_issued(), 5)
            await t.aclose()
            return answer, held, server.listener.stats[ADDRESS_REFUSED]
        finally:
            await server.stop()

    answer, held, refused = run(main())
    assert answer == b"" and held == 0 and refused == 1
    assert [i.sa.spi for i, _ in rec.installed] == [4660]


def test_allowed_clients_matches_ipv4_mapped_peers_and_nothing_else() -> None:
    from ipaddress import ip_network

    from mipsec.core.roles.tlsserver import peer_allowed

    nets = (ip_network("10.0.0.0/8"), ip_network("2001:db8::/32"))
    assert peer_allowed(("10.1.2.3", 7873), nets)
    assert peer_allowed(("::ffff:10.1.2.3", 7873, 0, 0), nets)  # dual-stack socket
    assert peer_allowed(("2001:db8::5", 7873, 0, 0), nets)
    assert peer_allowed(("fe80::1%eth0", 7873, 0, 2), (ip_network("fe80::/10"),))
    assert not peer_allowed(("11.0.0.1", 7873), nets)
    assert not peer_allowed(("::ffff:11.0.0.1", 7873, 0, 0), nets)
    assert not peer_allowed(("2001:db9::5", 7873, 0, 0), nets)
    assert not peer_allowed(None, nets)  # the socket is gone already
    assert not peer_allowed(("not an address", 1), nets)


@pytest.mark.parametrize("value", ["[]", '["10.0.0.1/8"]', '["anywhere"]', '"10.0.0.0/8"'])
def test_bad_allowed_clients_is_a_config_error(tmp_path: Path, value: str) -> None:
    toml = tmp_path / "ha.toml"
    toml.write_text(
        '[provisioning]\nport = 7873\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n'
        f'client_names = ["hac.mipsec.test"]\nallowed_clients = {value}\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(toml, "ha")
    assert str(toml) in str(err.value) and "provisioning.allowed_clients" in str(err.value)


def test_withdrawals_owed_to_an_ha_that_is_down_cost_one_batch_per_interval(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    """300 withdrawals owed to an HA that is down: the HAC sends at most
    ``WITHDRAW_BATCH`` at once and, while all of them fail, one batch per
    backoff interval for the whole HA -- not a task, an attempt and a log
    line per SPI per interval (before: 300 attempts and 300 lines every
    interval).  One WARNING line when it starts failing; the HA up again,
    every one is withdrawn and one line says so."""
    from mipsec.core.roles import hac as hac_module

    rec = Recorder()
    ha_port = free_port()
    spis = list(range(5000, 5300))
    calls = 0
    in_flight = peak = 0

    async def main() -> tuple[int, int, int]:
        nonlocal calls, in_flight, peak
        hac = HacService(hac_config(tmp_path, pki, ha_port))
        await hac.start()
        transport = hac.transports["ha1"]
        real = transport.withdraw

        async def counted(ha: HomeAgentInfo, spi: int, timeout: float) -> None:
            nonlocal calls, in_flight, peak
            calls += 1
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await real(ha, spi, timeout)
            finally:
                in_flight -= 1

        transport.withdraw = counted  # type: ignore[method-assign]  # a spy on the neighbour
        try:
            end = datetime.now(UTC) + timedelta(hours=1)
            for spi in spis:
                hac.withdraw_unrecorded("ha1", spi, end)
            await asyncio.sleep(1.2)  # HA down: rounds at 0 s and 0.5 s, then 1 s apart
            while_down = calls
            server = ProvisioningServer(
                ha_listener(pki).model_copy(update={"port": ha_port}),
                on_install=rec.install,
                on_withdraw=rec.withdraw,
            )
            await server.start()
            try:
                for _ in range(3000):  # an event, not a time: at most 30 s
                    if not hac._withdrawing:
                        break
                    await asyncio.sleep(0.01)
            finally:
                await server.stop()
            return while_down, len(hac._withdrawing), hac.stats["withdrawn"]
        finally:
            await hac.stop()

    with caplog.at_level(logging.INFO):
        while_down, left, counted_withdrawn = run(main())
    batch = hac_module.WITHDRAW_BATCH
    assert peak <= batch
    assert while_down <= 3 * batch  # not 300 per interval
    assert left == 0 and sorted(rec.withdrawn) == spis and counted_withdrawn == len(spis)
    failing = [r for r in caplog.records if "withdrawal from HA ha1 failed" in r.getMessage()]
    assert len(failing) == 1 and failing[0].levelno == logging.WARNING
    assert "(300 owed)" in failing[0].getMessage()
    assert "withdrawal from HA ha1 works again" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_withdrawal_the_ha_refuses_does_not_hold_the_others_back(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    """The HA refuses the withdrawal of one SPI (500) and confirms the
    others: those are all withdrawn without waiting for it (it goes to the
    back of the queue), it is retried alone, and only then, every round
    failing, does one line report the HA's withdrawals as failing."""
    ha_port = free_port()
    spis = list(range(7000, 7200))
    bad = spis[0]
    done: list[int] = []

    async def withdraw(spi: int) -> None:
        if spi == bad:
            raise RuntimeError("refused")
        done.append(spi)

    async def main() -> tuple[list[int], bool]:
        server = ProvisioningServer(
            ha_listener(pki).model_copy(update={"port": ha_port}),
            on_install=Recorder().install,
            on_withdraw=withdraw,
        )
        await server.start()
        hac = HacService(hac_config(tmp_path, pki, ha_port))
        await hac.start()
        try:
            end = datetime.now(UTC) + timedelta(hours=1)
            for spi in spis:
                hac.withdraw_unrecorded("ha1", spi, end)
            for _ in range(3000):  # an event, not a time
                if len(done) == len(spis) - 1 and "ha1 failed" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            return sorted(hac._withdrawing), bad in hac._owed["ha1"].spis
        finally:
            await hac.stop()
            await server.stop()

    with caplog.at_level(logging.INFO):
        still, queued = run(main())
    assert sorted(done) == spis[1:]
    assert still == [bad] and queued
    failing = [r for r in caplog.records if "withdrawal from HA ha1 failed" in r.getMessage()]
    assert len(failing) == 1 and f"spi={bad}" in failing[0].getMessage()
    assert "(1 owed)" in failing[0].getMessage()


# ------------------------------------------- supersede across two HAs


@pytest.mark.parametrize("outcome", ["confirmed", "refused", "500"])
def test_a_new_sa_on_another_ha_supersedes_the_older_after_its_200(
    tmp_path: Path, pki: PkiPaths, outcome: str
) -> None:
    """The MN's first SA is on ha1; its second lands on ha2 (the emptier).
    Both are live while ha2 has the install in hand (until the twenty-ninth
    session the second's store write retired the first at once, to put it
    back on a failure).  Confirmed by ha2 and delivered: the first is
    withdrawn from ha1 then, never before.  Refused by ha2, or a 500: the
    first was never touched, live and never withdrawn -- the MN keeps the SA
    it has."""
    ha1, ha2 = SupersedeRecorder(), SupersedeRecorder()
    hacs: list[HacService] = []
    live_during_install: list[list[int]] = []

    async def install_on_ha2(issued: IssuedSA, ha_id: str, withdraw: tuple[int, ...] = ()) -> None:
        # What the HAC's store calls live while ha2 has the install in hand.
        now = datetime.now(UTC)
        live_during_install.append([i.sa.spi for i in hacs[0].store.live_for_mn(MN_ID, now)])
        await ha2.install(issued, ha_id, withdraw)

    Result = tuple[IssuedSA, IssuedSA | None, list[int], list[int]]

    async def body(port1: int, port2: int) -> Result:
        hac = HacService(hac_config(tmp_path, pki, port1, ha2_port=port2))
        hacs.append(hac)
        await hac.start()
        second: IssuedSA | None = None
        try:
            first = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(first, "test")
            assert first.sa.ha_id == "ha1"
            if outcome == "refused":
                ha2.refuse_next = ProvisioningRefused("validity_end: already expired")
            elif outcome == "500":
                ha2.refuse_next = RuntimeError("disk I/O error")
            if outcome == "confirmed":
                second = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
                assert second.sa.ha_id == "ha2"
                hac.deliver(second, "test")
            else:
                with pytest.raises(IssueFailure):
                    await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            now = datetime.now(UTC)
            for _ in range(100):  # the withdrawal from ha1 runs in the background
                if not hac.store.retired_unconfirmed(now) and (
                    outcome != "confirmed" or ha1.withdrawn
                ):
                    break
                await asyncio.sleep(0.02)
            live = [i.sa.spi for i in hac.store.live_for_mn(MN_ID, now)]
            pending = [p[0] for p in hac.store.retired_unconfirmed(now)]
        finally:
            await hac.stop()
        return first, second, live, pending

    async def two_has() -> Result:
        server2 = ProvisioningServer(
            ha_listener(pki),
            on_install=install_on_ha2,
            on_withdraw=ha2.withdraw,
            install_withdraws=True,
        )
        (_, port2), *_ = await server2.start()
        try:
            return await serving(
                ha_listener(pki), ha1, lambda port1: body(port1, port2), install_withdraws=True
            )
        finally:
            await server2.stop()

    first, second, live, pending = run(two_has())
    assert pending == []
    # Not touched by the second's store write: both live while ha2 had the
    # install in hand.
    (during,) = live_during_install
    assert len(during) == 2 and first.sa.spi in during
    if outcome == "confirmed":
        assert second is not None and live == [second.sa.spi]
        assert ha1.withdrawn == [first.sa.spi]  # withdrawn from its own HA
        assert ha2.superseded == [(second.sa.spi, ())]  # nothing of ha1's rode on ha2's install
    else:
        assert live == [first.sa.spi]  # never retired
        assert first.sa.spi not in ha1.withdrawn


# ------------------------------------------------------------ renewal (reload)


def test_listener_and_transport_go_stale_on_renewal_and_a_bad_pair_is_named(
    tmp_path: Path,
) -> None:
    """What a reload asks (core/reload.py): the HA's listener and the HAC's
    transport are stale once a file they were built from holds something
    else; the listener's renewal is built first and swapped only by its
    commit; a renewed pair that does not load is a ConfigError naming the
    key, and nothing is swapped."""
    import shutil

    mine = init_pki(tmp_path / "pki")
    other = init_pki(tmp_path / "other")
    server = ProvisioningServer(ha_listener(mine))
    transport = TlsTransportFactory().create(
        {
            "host": "127.0.0.1",
            "port": 1,
            "ca": str(mine.ca_cert),
            "cert": str(mine.hac_client_cert),
            "key": str(mine.hac_client_key),
        },
        PluginContext("hac", tmp_path),
    )
    assert not server.files.changed() and not transport.stale()
    assert server.renewal("ha.toml", "provisioning.") is None
    first = server.ssl_context
    # Renewed (here: the other lab's pair, a matching one).
    shutil.copy(other.ha_cert, mine.ha_cert)
    shutil.copy(other.ha_key, mine.ha_key)
    assert server.files.changed()
    commit = server.renewal("ha.toml", "provisioning.")
    assert commit is not None and server.ssl_context is first  # built, not swapped
    commit()
    assert server.ssl_context is not first and server.listener.ssl_context is server.ssl_context
    assert not server.files.changed()
    # A certificate whose key was not renewed with it: named, nothing swapped.
    shutil.copy(mine.hac_cert, mine.ha_cert)
    with pytest.raises(ConfigError) as err:
        server.renewal("ha.toml", "provisioning.")
    assert err.value.key == "provisioning.cert" and "does not match" in str(err.value)
    # The client CA gone: named as such.
    mine.ca_cert.unlink()
    with pytest.raises(ConfigError) as err:
        server.renewal("ha.toml", "provisioning.")
    assert err.value.key == "provisioning.client_ca" and "cannot read" in str(err.value)
    assert transport.stale()  # its ca is gone too


def test_access_taken_away_by_a_reload_closes_open_connections(
    pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    """``apply_access`` (the HA's reload of ``client_names`` and
    ``allowed_clients``): an idle connection of a client no longer admitted
    is closed at once; one whose operation is under way gets that answer,
    then is closed, and what it queued behind it is never worked on; a new
    connection is refused.  Other clients stay served."""
    rec = SyncRecorder()
    release, started = asyncio.Event(), asyncio.Event()

    async def slow_withdraw(spi: int) -> None:
        started.set()
        await release.wait()
        rec.withdrawn.append(spi)

    async def scenario() -> list[Any]:
        server = ProvisioningServer(
            ha_listener(pki), on_install=rec.install, on_withdraw=slow_withdraw
        )
        (_, port), *_ = await server.start()
        ctx = client_context(pki.ca_cert, pki.hac_client_cert, pki.hac_client_key)
        try:
            idle_r, idle_w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="ha.mipsec.test"
            )
            idle_w.write(encode_container(1, encode_install(make_issued(spi=41))))
            got = ContainerDecoder().feed(await asyncio.wait_for(idle_r.read(65536), 10))
            assert [decode_response(c.content).status for c in got] == [200]
            busy_r, busy_w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="ha.mipsec.test"
            )
            busy_w.write(
                encode_container(1, encode_withdraw(41))
                + encode_container(2, encode_install(make_issued(spi=43)))
            )
            await asyncio.wait_for(started.wait(), 10)
            cfg = ha_listener(pki).model_copy(update={"client_names": ("other.mipsec.test",)})
            assert server.apply_access(cfg) == 2
            assert await asyncio.wait_for(idle_r.read(), 10) == b""  # closed at once
            release.set()
            answered = await asyncio.wait_for(busy_r.read(), 10)  # the answer, then EOF
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                r, _ = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="ha.mipsec.test"
                )
                await asyncio.wait_for(r.readexactly(1), 10)
            for w in (idle_w, busy_w):
                w.close()
            return ContainerDecoder().feed(answered)
        finally:
            await server.stop()

    with caplog.at_level(logging.INFO, logger="mipsec.provisioning"):
        answered = run(scenario())
    assert [(c.identifier, decode_response(c.content).status) for c in answered] == [(1, 200)]
    assert rec.withdrawn == [41]
    assert [i.sa.spi for i, _ in rec.installed] == [41]  # 43, queued behind: never worked on
    assert caplog.text.count("closed by the reload: client certificate: no dNSName") == 2
    assert "refused: client certificate: no dNSName" in caplog.text


def test_ha_reload_applies_its_pull_options(
    tmp_path: Path, pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HA's ``[pull]`` options apply at a reload (each pull reads them,
    and its files, as they are then): pointed at a port where no HAC
    listens, its pull of an SA the HAC holds fails; the reload that puts the
    HAC's pull port in brings it back -- ``changed pull.port``, one INFO
    line, no restart.  Adding or removing the whole ``[pull]`` table still
    needs a restart (it decides what the binding cache must keep).  Before,
    any change under ``[pull]`` was refused."""
    from mipsec.core.roles import ha_ops
    from mipsec.core.roles.ha import HaService

    rec = Recorder()
    pull_port, nobody = free_port(), free_port()
    base = {
        "ha": {"id": "ha1", "listen": ["127.0.0.1"], "port": 0},
        "sa_store": {"backend": "sqlite", "path": str(tmp_path / "ha-sa.sqlite")},
        "bindings": {"path": str(tmp_path / "ha-bindings.sqlite")},
    }

    def ha_cfg(port: int | None) -> HAConfig:
        data = dict(base)
        if port is not None:
            data["pull"] = pull_cfg(pki, port).model_dump()
        return HAConfig.model_validate(data)

    async def body(port: int) -> tuple[IssuedSA, list[Any], list[Any], str]:
        _cfg, hac, _ops = await _hac_with_pull_listener(tmp_path, pki, port, pull_port)
        ha = HaService(ha_cfg(nobody), str(tmp_path / "ha.toml"))
        ops = ha_ops.HaOps(ha, str(tmp_path / "ha.toml"))
        outcomes: list[Any] = []
        applied: list[Any] = []
        try:
            issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            for new in (None, ha_cfg(pull_port)):
                if new is not None:
                    monkeypatch.setattr(ha_ops, "load_config", lambda *_a, n=new: n)
                    applied.append(ops._apply())
                try:
                    outcomes.append(await ha._pull_from_hac(issued.sa.spi))
                except Exception as exc:  # noqa: BLE001 -- the failure is the outcome
                    outcomes.append(type(exc).__name__)
            monkeypatch.setattr(ha_ops, "load_config", lambda *_a: ha_cfg(None))
            try:
                ops._apply()
                refused = ""
            except ConfigError as exc:
                refused = str(exc)
        finally:
            await hac.stop()
            ha.store.close()
        return issued, outcomes, applied, refused

    issued, outcomes, applied, refused = run(serving(ha_listener(pki), rec, body))
    assert outcomes[0] != issued and outcomes[1] == issued, outcomes
    assert applied == [["pull.port"]]
    assert "pull: changes only with a restart" in refused, refused
