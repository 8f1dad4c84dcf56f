"""SA lifecycle and fail-closed paths of a real HAC (issue 6 items 3, 4, 7).

In one process: a ``HacService`` with its HA co-located (``[local_ha]``,
deployment model 1) on loopback, real TLS, real UDP, and the project's MN
(``roles/mn.py``) or hand-driven ``MnExchange`` clients.  Fault injection uses
ordinary plugins registered on the service's plugin manager -- the hooks a
third party would use -- never a patched internal.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from mipsec.core import pluginmanager
from mipsec.core.config import HACConfig, MNConfig, validate_config
from mipsec.core.errors import ConfigError
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.mn_exchange import Finished, MnExchange, SendRequest
from mipsec.core.model import HomeAgentInfo, IssuedSA
from mipsec.core.pki import PkiPaths, init_pki, make_leaf, write_cert, write_key
from mipsec.core.provisioning import ProvisioningRefused
from mipsec.core.roles.ha import HaService
from mipsec.core.roles.hac import HacService
from mipsec.core.roles.mn import Registrar, bootstrap, peer_factory
from mipsec.core.tls import check_hac_certificate, mn_cb_octets, mn_client_context
from mipsec.core.wire.container import encode_container
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore
from mipsec.plugins.transport_local import LocalTransport

MN_ID = "alice@mipsec.test"
PSK = bytes(range(32))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"))


def hac_data(tmp: Path, pki: PkiPaths, *, local_ha: bool = True, **hac: Any) -> dict[str, Any]:
    ha_port = free_port()
    creds = tmp / "credentials.toml"
    creds.write_text(f'[[mn]]\nmn_id = "{MN_ID}"\npsk_hex = "{PSK.hex()}"\n')
    creds.chmod(0o600)
    data: dict[str, Any] = {
        "hac": {
            "listen": ["127.0.0.1"],
            "port": free_port(),
            "cert": str(pki.hac_cert),
            "key": str(pki.hac_key),
            "provisioning_timeout": 2,
            "request_timeout": 2,
            **hac,
        },
        "credentials": {"backend": "toml", "path": str(creds)},
        # The tests bootstrap one MN back to back.
        "policy": {"min_rebootstrap_interval": 0},
        "sa_store": {"backend": "memory"},
        "home_addresses": {"allocator": "pool", "ip6_prefix": "2001:db8:1::/64"},
        "ha": [
            {
                "id": "ha1",
                "address6": "::1",
                "address4": "127.0.0.1",
                "port": ha_port,
                "transport": "local",
            }
        ],
    }
    if local_ha:
        data["local_ha"] = {
            "ha": {"id": "ha1", "listen": ["127.0.0.1"], "port": ha_port},
            "sa_store": {"backend": "memory"},
        }
    return data


def hac_config(data: dict[str, Any], base: Path) -> HACConfig:
    cfg = validate_config(data, "hac", base=base)
    assert isinstance(cfg, HACConfig)
    return cfg


def mn_config(pki: PkiPaths, port: int, **mn: Any) -> MNConfig:
    data = {
        "mn": {"mn_id": MN_ID, "psk_hex": PSK.hex(), **mn},
        "hac": {"host": "127.0.0.1", "port": port, "server_name": "hac.mipsec.test",
                "ca": str(pki.ca_cert), "timeout": 5},
        "sa": {"suites": ["AES_128_CBC_SHA256"]},
        "registration": {"transport": "ip4"},
    }  # fmt: skip
    cfg = validate_config(data, "mn")
    assert isinstance(cfg, MNConfig)
    return cfg


class Stack:
    """A running HAC (+ co-located HA) on loopback."""

    def __init__(
        self, cfg: HACConfig, plugins: Sequence[object] = (), *, ha_cfg: Any = None
    ) -> None:
        pm = pluginmanager.make_plugin_manager()
        for p in plugins:
            pm.register(p)
        self.pm = pm
        self.cfg = cfg
        self.ha: HaService | None = None
        self.hac: HacService | None = None
        self.ha_cfg = ha_cfg if ha_cfg is not None else cfg.local_ha
        self.port = cfg.hac.port

    async def __aenter__(self) -> Stack:
        if self.ha_cfg is not None:
            # An HA in this process (model 1): the local transport reaches it.
            self.ha = HaService(self.ha_cfg)
            await self.ha.start()
        self.hac = HacService(self.cfg, pm=self.pm)
        await self.hac.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.hac is not None:
            await self.hac.stop()
        if self.ha is not None:
            await self.ha.stop()


def memory_ha_config() -> Any:
    """An HA "ha1" on loopback with a memory SA store (no provisioning listener)."""
    return validate_config(
        {
            "ha": {"id": "ha1", "listen": ["127.0.0.1"], "port": 0},
            "sa_store": {"backend": "memory"},
        },
        "ha",
    )


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


# ------------------------------------------------------------ SA lifecycle


def test_exchange_timeout_reaches_the_hac_listener(tmp_path: Path, pki: PkiPaths) -> None:
    """[hac] exchange_timeout (default 120 s) is the listener's whole-exchange
    deadline (core/roles/tlsserver.py, tested there); a bootstrap well within
    it is unaffected."""
    assert hac_config(hac_data(tmp_path, pki), tmp_path).hac.exchange_timeout == 120.0
    data = hac_data(tmp_path, pki, exchange_timeout=7.5)

    async def main() -> tuple[float | None, int | None]:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None and st.hac._listener is not None
            got = await bootstrap(mn_config(pki, st.port))
            return st.hac._listener.limits.exchange_timeout, got.status

    assert run(main()) == (7.5, 200)


def test_the_ha_and_dns_addresses_the_hac_provisions_are_never_home_addresses(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """The HA on its home link at 2001:db8:1::1 and the DNS server at
    2001:db8:1::2, neither in ``exclude``: the first MN gets ::3 (it got the
    HA's own address before -- found in review)."""
    data = hac_data(tmp_path, pki)
    data["ha"][0]["address6"] = "2001:db8:1::1"
    data["bootstrap"] = {"dns_ip6": "2001:db8:1::2"}

    async def main() -> Any:
        async with Stack(hac_config(data, tmp_path)) as st:
            got = await bootstrap(mn_config(pki, st.port))
            assert got.ok and got.issued is not None, got
            return got.issued.bootstrap.ip6_hoa

    assert str(run(main())) == "2001:db8:1::3"


def test_min_rebootstrap_interval_answers_503_and_keeps_the_sa(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """[policy] min_rebootstrap_interval = 30: an MN back for another SA a
    moment after its last gets 503 with retry-after (about 30 s), and keeps
    the SA it holds -- nothing retired, no withdrawal left behind.  Without
    it one credential in a loop left a retired SPI on the HAC and a
    withdrawal record on the HA per bootstrap (found in review)."""
    data = hac_data(tmp_path, pki)
    del data["policy"]
    assert hac_config(data, tmp_path).policy.min_rebootstrap_interval == 10.0  # on by default
    data["policy"] = {"min_rebootstrap_interval": 30}

    async def main() -> tuple[Any, Any, list[int]]:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None
            first = await bootstrap(mn_config(pki, st.port))
            assert first.ok and first.issued is not None
            again = await bootstrap(mn_config(pki, st.port))
            now = datetime.now(UTC)
            live = [i.sa.spi for i in st.hac.store.live_for_mn(MN_ID, now)]
            assert st.hac.stats["too_soon"] == 1
            return first, again, live

    first, again, live = run(main())
    assert again.status == 503 and again.retry_after is not None
    left = (again.retry_after - datetime.now(UTC)).total_seconds()
    assert 25 <= left <= 31, left
    assert live == [first.issued.sa.spi]


def test_min_rebootstrap_interval_never_asks_more_than_the_interval(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """The issue time is estimated from the validity end and the current
    sa_lifetime: lowered by a reload from 3600 to 600 s, an MN that got its
    SA a moment ago was told to wait ~3,000 s (found in review); the wait is
    capped at the interval."""
    data = hac_data(tmp_path, pki)
    data["policy"] = {"min_rebootstrap_interval": 30}

    async def main() -> Any:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None
            assert (await bootstrap(mn_config(pki, st.port))).ok
            policy = st.hac.cfg.policy.model_copy(update={"sa_lifetime": 600.0})
            st.hac.cfg = st.hac.cfg.model_copy(update={"policy": policy})
            return await bootstrap(mn_config(pki, st.port))

    again = run(main())
    assert again.status == 503 and again.retry_after is not None
    assert (again.retry_after - datetime.now(UTC)).total_seconds() <= 31


def test_min_rebootstrap_interval_spares_an_sa_that_supersedes_nothing(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """With max_sas_per_mn = 2 an MN's second SA retires nothing: it is
    issued at once; the third, which would supersede, waits (found in
    review: a second device of one identity was turned away)."""
    data = hac_data(tmp_path, pki)
    data["policy"] = {"min_rebootstrap_interval": 30, "max_sas_per_mn": 2}

    async def main() -> list[int | None]:
        async with Stack(hac_config(data, tmp_path)) as st:
            return [(await bootstrap(mn_config(pki, st.port))).status for _ in range(3)]

    assert run(main()) == [200, 200, 503]


def test_second_bootstrap_withdraws_the_first_sa(tmp_path: Path, pki: PkiPaths) -> None:
    """max_sas_per_mn = 1 (default): the older SA leaves the store and the HA,
    and a BU under it gets no answer, while the new one registers."""

    async def main() -> None:
        async with Stack(hac_config(hac_data(tmp_path, pki), tmp_path)) as st:
            assert st.hac is not None and st.ha is not None
            mn = mn_config(pki, st.port)
            first = await bootstrap(mn)
            assert first.ok and first.issued is not None
            old = first.issued
            reg = Registrar(old, mn)
            await reg.open()
            assert (await reg.run(until_registered=True, timeout=5)).status == 0
            second = await bootstrap(mn)
            assert second.ok and second.issued is not None
            new = second.issued
            assert new.sa.spi != old.sa.spi
            # The HoA is kept; the old SPI is retired in the HAC store at once
            # and withdrawn from the HA in the background.
            assert new.bootstrap.ip6_hoa == old.bootstrap.ip6_hoa
            now = datetime.now(UTC)
            assert st.hac.store.get(old.sa.spi, now) is None
            assert [i.sa.spi for i in st.hac.store.live_for_mn(MN_ID, now)] == [new.sa.spi]
            assert await eventually(lambda: not st.ha.core.has_spi(old.sa.spi))
            # A BU under the old SA: silence (a later BU sequence number, new ESP seq).
            out = await reg.run(until_registered=True, timeout=2)
            assert out.status is None
            reg.close()
            # Dropped as an SPI withdrawn for good (not merely unknown: it can
            # never come back, not even by a pull).
            assert st.ha.stats()["drops"].get("withdrawn_spi", 0) >= 1
            # The new SA registers.
            reg2 = Registrar(new, mn)
            await reg2.open()
            assert (await reg2.run(until_registered=True, timeout=5)).status == 0
            reg2.close()
            # Withdrawal confirmed: nothing left to retry.
            assert await eventually(lambda: st.hac.store.retired_unconfirmed(now) == [])

    run(main())


def test_ha_install_carrying_prov_withdraw_kills_the_older_sa_for_good() -> None:
    """The HA's half of an install with ``prov-withdraw``: the older SA is dead
    (core, store, withdrawal record) once the call returns; a refused install
    withdraws nothing."""
    from ipaddress import IPv6Address

    from mipsec.core.issuer import new_sa
    from mipsec.core.model import BootstrapData
    from mipsec.core.suites import Suite

    def sa(spi: int) -> IssuedSA:
        now = datetime.now(UTC)
        s = new_sa(
            spi=spi, mn_id=MN_ID, suite=Suite.AES_128_CBC_SHA256, scope=1, lifetime=600,
            now=now, ha_id="ha1",
        )  # fmt: skip
        return IssuedSA(s, BootstrapData(ip6_hoa=IPv6Address("2001:db8:1::7")))

    async def main() -> None:
        ha_cfg = memory_ha_config()
        ha = HaService(ha_cfg)  # type: ignore[arg-type]
        await ha.start()
        try:
            old, new = sa(1001), sa(1002)
            await ha.install_sa(old)
            await ha.install_sa(new, "ha1", (old.sa.spi,))
            now = datetime.now(UTC)
            assert ha.core.spis() == [new.sa.spi]
            assert ha.core.is_withdrawn(old)
            # The store's delete follows the answer, in the same turn of the loop.
            await asyncio.sleep(0)
            assert ha.store.get(old.sa.spi, now) is None
            assert ha.store.get(new.sa.spi, now) is not None
            # The withdrawn SA cannot come back, and its refused install
            # withdraws nothing it names.
            with pytest.raises(ValueError, match="withdrawn"):
                await ha.install_sa(old, "ha1", (new.sa.spi,))
            assert ha.core.spis() == [new.sa.spi]
        finally:
            await ha.stop()

    run(main())


def test_another_sa_under_an_spi_whose_delete_is_pending_is_refused() -> None:
    """The HA deletes a withdrawn SA's store row after its answer (issue 9).
    A new SA under the same SPI before that delete ran was allowed until the
    twenty-ninth session (another SA, other keys), and had to keep its row;
    now a withdrawn SPI takes no SA until the withdrawn one's end (its
    record would no longer name the SA it buried: found in review), so the
    install is refused and the delete leaves nothing under the SPI."""
    from ipaddress import IPv6Address

    from mipsec.core.issuer import new_sa
    from mipsec.core.model import BootstrapData
    from mipsec.core.suites import Suite

    def sa(spi: int) -> IssuedSA:
        s = new_sa(
            spi=spi, mn_id=MN_ID, suite=Suite.AES_128_CBC_SHA256, scope=1, lifetime=600,
            now=datetime.now(UTC), ha_id="ha1",
        )  # fmt: skip
        return IssuedSA(s, BootstrapData(ip6_hoa=IPv6Address("2001:db8:1::7")))

    async def main() -> None:
        ha = HaService(memory_ha_config())  # type: ignore[arg-type]
        await ha.start()
        try:
            first, second = sa(1001), sa(1001)
            await ha.install_sa(first)
            await ha.withdraw_sa(1001)
            with pytest.raises(ProvisioningRefused, match="1001 was withdrawn"):
                await ha.install_sa(second)  # same turn of the loop: the delete is pending
            await asyncio.sleep(0)  # any delete still queued runs now
            assert ha.store.get(1001, datetime.now(UTC)) is None
            assert ha.core.spis() == []
        finally:
            await ha.stop()

    run(main())


def test_max_sas_per_mn_keeps_the_newest(tmp_path: Path, pki: PkiPaths) -> None:
    data = hac_data(tmp_path, pki)
    data["policy"]["max_sas_per_mn"] = 2

    async def main() -> None:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None
            mn = mn_config(pki, st.port)
            spis = []
            for _ in range(3):
                r = await bootstrap(mn)
                assert r.ok and r.issued is not None
                spis.append(r.issued.sa.spi)
            live = [i.sa.spi for i in st.hac.store.live_for_mn(MN_ID, datetime.now(UTC))]
            assert sorted(live) == sorted(spis[1:])

    run(main())


def test_withdrawals_survive_a_hac_restart(tmp_path: Path, pki: PkiPaths) -> None:
    """A withdrawal the HA has not confirmed is retried by the next HAC run."""
    data = hac_data(tmp_path, pki, local_ha=False)
    data["sa_store"] = {"backend": "sqlite", "path": str(tmp_path / "hac.sqlite")}

    async def main() -> None:
        ha_cfg = memory_ha_config()
        ha = HaService(ha_cfg)  # type: ignore[arg-type]
        await ha.start()
        try:
            hac = HacService(hac_config(data, tmp_path))
            await hac.start()
            mn = mn_config(pki, hac.cfg.hac.port)
            r1 = await bootstrap(mn)
            assert r1.ok and r1.issued is not None
            await hac.stop()
            # The HA goes away: the next withdrawal cannot be confirmed.
            await ha.stop()
            hac = HacService(hac_config(data, tmp_path))
            await hac.start()
            hac.retire(r1.issued.sa.spi, "revoked")
            await asyncio.sleep(0.2)
            pending = hac.store.retired_unconfirmed(datetime.now(UTC))
            assert [p[0] for p in pending] == [r1.issued.sa.spi]
            await hac.stop()
            # HA back (its memory store lost the SA; re-install it to see it go).
            ha = HaService(ha_cfg)  # type: ignore[arg-type]
            await ha.start()
            await ha.install_sa(r1.issued)
            hac = HacService(hac_config(data, tmp_path))
            await hac.start()
            assert await eventually(lambda: not ha.core.has_spi(r1.issued.sa.spi))
            assert await eventually(lambda: hac.store.retired_unconfirmed(datetime.now(UTC)) == [])
            await hac.stop()
        finally:
            await ha.stop()

    run(main())


# ------------------------------------------------------------ fail closed


def test_local_transport_without_an_ha_answers_504(tmp_path: Path, pki: PkiPaths) -> None:
    async def main() -> None:
        async with Stack(hac_config(hac_data(tmp_path, pki, local_ha=False), tmp_path)) as st:
            assert st.hac is not None
            r = await bootstrap(mn_config(pki, st.port))
            assert r.status == 504 and r.authenticated and r.issued is None
            now = datetime.now(UTC)
            assert st.hac.store.live(now) == []

    run(main())


class RaisingHooks:
    @hookimpl
    def mipsec_sa_issued(self, spi: int, mn_id: str) -> None:
        raise RuntimeError("accounting database down: secret=hunter2")

    @hookimpl
    def mipsec_mn_authenticated(self, mn_id: str) -> None:
        raise ValueError("boom")


def test_a_raising_event_hook_never_breaks_an_exchange(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with Stack(hac_config(hac_data(tmp_path, pki), tmp_path), [RaisingHooks()]) as st:
            assert st.hac is not None and st.ha is not None
            r = await bootstrap(mn_config(pki, st.port))
            assert r.ok and r.issued is not None
            assert st.ha.core.has_spi(r.issued.sa.spi)
            assert st.hac.stats["hook_errors"] == 2

    with caplog.at_level(logging.INFO):
        run(main())
    errors = [r for r in caplog.records if "event hook" in r.getMessage()]
    assert len(errors) == 2 and all(r.exc_info is None for r in errors)
    assert "hunter2" not in caplog.text and "Traceback" not in caplog.text


class BrokenBackend:
    def get_psk(self, mn_id: str) -> bytes | None:
        raise OSError("connection to credential database lost: password=s3cret")

    def close(self) -> None:
        pass


class BrokenBackendPlugin:
    class Factory:
        name = "broken"

        def create(self, options: Mapping[str, Any], ctx: PluginContext) -> BrokenBackend:
            return BrokenBackend()

    @hookimpl
    def mipsec_credential_backends(self) -> list[Any]:
        return [self.Factory()]


def test_a_raising_credential_backend_gives_503_and_one_line(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    data = hac_data(tmp_path, pki)
    data["credentials"] = {"backend": "broken"}

    async def main() -> None:
        async with Stack(hac_config(data, tmp_path), [BrokenBackendPlugin()]) as st:
            r = await bootstrap(mn_config(pki, st.port))
            # 503 keyed with the stand-in key: the MN cannot authenticate it,
            # but it is the status PROFILE §6 prescribes, and nothing is issued.
            assert r.status == 503 and not r.ok
            assert st.hac is not None and st.hac.store.live(datetime.now(UTC)) == []

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("credential backend failed: OSError" in m and MN_ID in m for m in lines)
    assert any("reason=credential-backend-failure" in m for m in lines)
    assert "s3cret" not in caplog.text and "Traceback" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)


# ------------------------------------------------------------ issuing interrupted


class SlowLocal:
    """A provisioning transport that takes ``delay`` before the local HA's install."""

    name = "slow-local"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.inner = LocalTransport()

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> SlowLocal:
        return self

    async def provision(self, ha: HomeAgentInfo, issued: IssuedSA, timeout: float) -> None:
        await asyncio.sleep(self.delay)
        await self.inner.provision(ha, issued, timeout)

    async def withdraw(self, ha: HomeAgentInfo, spi: int, timeout: float) -> None:
        await self.inner.withdraw(ha, spi, timeout)

    @hookimpl
    def mipsec_provisioning_transports(self) -> list[Any]:
        return [self]


async def done_request(st: Stack, pki: PkiPaths) -> tuple[Any, Any, MnExchange]:
    """Open TLS, run the PSK exchange up to and including the Done request."""
    ctx = mn_client_context(str(pki.ca_cert))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", st.port, ssl=ctx, server_hostname="hac.mipsec.test"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    check_hac_certificate(der, server_name="hac.mipsec.test", connected_ip=None)
    cb = mn_cb_octets(der)
    from mipsec.core.authmethod import PeerMethodContext

    mn = mn_config(pki, st.port)
    factory = peer_factory(mn, st.pm)
    exch = MnExchange(
        mn_id=MN_ID,
        method_name="psk",
        method=factory.new(PeerMethodContext(MN_ID, cb, PSK)),
        cb_octets=cb,
        scope=1,
        suitelist=[0x003C],
    )
    writer.write(exch.start())
    events = exch.receive_data(await reader.read(65540))
    assert isinstance(events[0], SendRequest)
    writer.write(events[0].data)  # the Done request
    await writer.drain()
    return reader, writer, exch


def test_an_unanswerable_request_is_counted(tmp_path: Path, pki: PkiPaths) -> None:
    """40 zero octets after the handshake: no Identifier to answer 400 to
    (PROFILE §2), so the HAC closes -- and counts it (review: nothing did)."""
    cfg = hac_config(hac_data(tmp_path, pki), tmp_path)

    async def main() -> None:
        async with Stack(cfg) as st:
            assert st.hac is not None
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", st.port, ssl=mn_client_context(str(pki.ca_cert)),
                server_hostname="hac.mipsec.test",
            )  # fmt: skip
            writer.write(bytes(40))
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
            writer.close()
            hac = st.hac
            assert await eventually(lambda: hac.stats["unanswerable"] == 1)
            assert hac.stats["status_200"] == 0

    asyncio.run(main())


@pytest.mark.parametrize("how", ["close", "more-data"])
def test_mn_gone_or_breaking_lockstep_mid_issue_leaves_nothing_live(
    tmp_path: Path, pki: PkiPaths, how: str
) -> None:
    data = hac_data(tmp_path, pki)
    ha_cfg = hac_config(data, tmp_path).local_ha
    del data["local_ha"]
    data["ha"][0]["transport"] = "slow-local"
    slow = SlowLocal(0.5)

    async def main() -> None:
        async with Stack(hac_config(data, tmp_path), [slow], ha_cfg=ha_cfg) as st:
            assert st.hac is not None and st.ha is not None
            reader, writer, exch = await done_request(st, pki)
            await asyncio.sleep(0.1)  # the HAC is now issuing (provisioning takes 0.5 s)
            if how == "close":
                writer.close()
            else:
                # A second request before the answer breaks the lockstep: 400.
                writer.write(b"\x00\x03\x00\x02\r\n")
                await writer.drain()
                events = exch.receive_data(await asyncio.wait_for(reader.read(65540), 5))
                assert isinstance(events[0], Finished)
                assert events[0].result.status == 400 and events[0].result.authenticated
                assert events[0].result.issued is None
                writer.close()
            # Provisioning completes on the HA, then is taken back.
            await asyncio.sleep(slow.delay + 0.2)
            now = datetime.now(UTC)
            assert st.hac.store.live(now) == []
            assert await eventually(lambda: st.ha is not None and st.ha.core.spis() == [])
            assert await eventually(lambda: st.hac.store.retired_unconfirmed(now) == [])

    run(main())


# ------------------------------------------------------------ configuration


def test_policy_naming_a_method_nobody_provides_fails_at_start(
    tmp_path: Path, pki: PkiPaths
) -> None:
    data = hac_data(tmp_path, pki)
    data["policy"]["methods"] = ["psk", "otp"]
    with pytest.raises(ConfigError) as info:
        HacService(hac_config(data, tmp_path))
    assert info.value.key == "policy.methods" and "'otp'" in info.value.reason
    data["policy"] |= {"methods": ["psk"], "realms": {"example.com": ["otp"]}}
    with pytest.raises(ConfigError) as info:
        HacService(hac_config(data, tmp_path))
    assert info.value.key == "policy.realms.example.com"
    data["policy"] = {"methods": ["psk"], "min_rebootstrap_interval": 0}
    data["methods"] = {"psk": {"colour": "red"}}
    with pytest.raises(ConfigError) as info:
        HacService(hac_config(data, tmp_path))
    assert info.value.key == "methods.psk" and "colour" in info.value.reason


def test_no_silent_transport_default(tmp_path: Path, pki: PkiPaths) -> None:
    data = hac_data(tmp_path, pki)
    del data["ha"][0]["transport"]
    with pytest.raises(ConfigError) as info:
        hac_config(data, tmp_path)
    assert info.value.key == "ha[0].transport"


def test_provisioning_listener_needs_client_names(tmp_path: Path, pki: PkiPaths) -> None:
    data = {
        "ha": {"id": "ha1"},
        "provisioning": {
            "port": 7873,
            "cert": str(pki.ha_cert),
            "key": str(pki.ha_key),
            "client_ca": str(pki.ca_cert),
        },
    }
    with pytest.raises(ConfigError) as info:
        validate_config(data, "ha")
    assert info.value.key == "provisioning.client_names"
    data["provisioning"]["client_names"] = []  # type: ignore[index]
    with pytest.raises(ConfigError):
        validate_config(data, "ha")


# ------------------------------------------------------------ MN identity check


def test_mn_with_a_dns_host_checks_that_dns_name(tmp_path: Path, pki: PkiPaths) -> None:
    """PROFILE §1: no server_name and a DNS host -> a dNSName equal to host (not an IP SAN)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key: Any = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    key, cert = make_leaf(ca_key, ca_cert, common_name="localhost", dns_names=["localhost"])
    write_cert(tmp_path / "dns-only.pem", cert)
    write_key(tmp_path / "dns-only.key", key)
    data = hac_data(tmp_path, pki)
    data["hac"]["cert"] = str(tmp_path / "dns-only.pem")
    data["hac"]["key"] = str(tmp_path / "dns-only.key")

    async def main() -> None:
        async with Stack(hac_config(data, tmp_path)) as st:
            base = mn_config(pki, st.port)
            by_host = base.model_copy(
                update={
                    "hac": base.hac.model_copy(update={"host": "localhost", "server_name": None})
                }
            )
            r = await bootstrap(by_host)
            assert r.ok, r.reason  # dNSName "localhost" == host; no IP SAN needed
            by_ip = base.model_copy(
                update={
                    "hac": base.hac.model_copy(update={"host": "127.0.0.1", "server_name": None})
                }
            )
            r = await bootstrap(by_ip)
            # Refused by the stdlib's check or ours, whichever comes first.
            assert not r.ok and r.status is None and "127.0.0.1" in r.reason

    run(main())


# ------------------------------------------------------------ audit


def test_failures_are_one_audit_line_each_with_reason(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with Stack(hac_config(hac_data(tmp_path, pki), tmp_path)) as st:
            wrong = mn_config(pki, st.port, psk_hex="11" * 32)
            r = await bootstrap(wrong)
            assert r.status is None and not r.ok  # the HAC's step-2 auth does not verify
            unknown = mn_config(pki, st.port, mn_id="mallory@mipsec.test")
            assert not (await bootstrap(unknown)).ok
            # An MN that stops after Init: the request deadline closes it.
            ctx = mn_client_context(str(pki.ca_cert))
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", st.port, ssl=ctx, server_hostname="hac.mipsec.test"
            )
            init = b"mn-id: idle@mipsec.test\r\nmn-rand: " + b"00" * 32
            init += b"\r\nauth-method: psk\r\n\r\n"
            writer.write(encode_container(1, init))
            await reader.read(65540)
            assert await asyncio.wait_for(reader.read(10), 10) == b""  # closed at the deadline
            writer.close()
            await asyncio.sleep(0.1)

    with caplog.at_level(logging.INFO, logger="mipsec.events"):
        run(main())
    failed = [r.getMessage() for r in caplog.records if "event=auth_failed" in r.getMessage()]
    assert any(f"mn_id={MN_ID}" in m and "reason=peer-closed" in m for m in failed), failed
    assert any("mn_id=mallory@mipsec.test" in m and "reason=peer-closed" in m for m in failed)
    assert any("mn_id=idle@mipsec.test" in m and "reason=timeout" in m for m in failed), failed
    assert all(len(m.splitlines()) == 1 for m in failed)


def test_wrong_psk_and_unknown_identity_differ_in_the_log_only(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    """Drive both to Done (a client that ignores the HAC's auth): the wire says
    401 both times, the log says bad-auth or unknown-identity."""
    from rawmn import RawMN, psk_bootstrap

    def raw(port: int, mn_id: str, psk: bytes) -> str:
        mn = RawMN("127.0.0.1", port, str(pki.ca_cert), "hac.mipsec.test")
        try:
            return psk_bootstrap(mn, mn_id, psk)[1].headers["status-code"]
        finally:
            mn.close()

    async def main() -> list[str]:
        async with Stack(hac_config(hac_data(tmp_path, pki), tmp_path)) as st:
            loop = asyncio.get_running_loop()
            return [
                await loop.run_in_executor(None, raw, st.port, mn_id, psk)
                for mn_id, psk in ((MN_ID, b"\x11" * 32), ("mallory@mipsec.test", PSK))
            ]

    with caplog.at_level(logging.INFO, logger="mipsec.events"):
        assert run(main()) == ["401", "401"]
    failed = [r.getMessage() for r in caplog.records if "event=auth_failed" in r.getMessage()]
    assert any(f"mn_id={MN_ID}" in m and "reason=bad-auth" in m for m in failed), failed
    assert any("mallory@mipsec.test" in m and "reason=unknown-identity" in m for m in failed)


_ = timedelta


# ------------------------------------------------------------ HA event hooks


class _HaEvents:
    """A plugin as a third party writes it: the HA's event hooks, recorded."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    @hookimpl
    def mipsec_ha_sa_installed(self, ha_id: str, spi: int, mn_id: str, suite: str) -> None:
        self.seen.append(("installed", (ha_id, spi, mn_id, suite)))

    @hookimpl
    def mipsec_ha_binding_changed(self, ha_id: str, event: str, hoa: str, spi: int) -> None:
        self.seen.append((f"binding_{event}", (ha_id, hoa, spi)))

    @hookimpl
    def mipsec_ha_sa_withdrawn(self, ha_id: str, spi: int) -> None:
        self.seen.append(("withdrawn", (ha_id, spi)))


class _Broken:
    @hookimpl
    def mipsec_ha_binding_changed(self) -> None:
        raise RuntimeError("plugin bug")


def test_ha_event_hooks_see_sa_and_binding_events(tmp_path: Path, pki: PkiPaths) -> None:
    """SA installed, binding added, SA withdrawn (superseded) with its binding
    deleted; a raising plugin is counted and the HA keeps answering."""

    async def main() -> None:
        async with Stack(hac_config(hac_data(tmp_path, pki), tmp_path)) as st:
            assert st.ha is not None
            rec = _HaEvents()
            st.ha.pm.register(_Broken())
            st.ha.pm.register(rec)
            mn = mn_config(pki, st.port)
            first = await bootstrap(mn)
            assert first.ok and first.issued is not None
            spi = first.issued.sa.spi
            reg = Registrar(first.issued, mn)
            await reg.open()
            assert (await reg.run(until_registered=True, timeout=5)).status == 0
            reg.close()
            second = await bootstrap(mn)  # supersedes the first SA
            assert second.ok
            assert await eventually(lambda: ("withdrawn", (st.ha.cfg.ha.id, spi)) in rec.seen)
            ha_id = st.ha.cfg.ha.id
            hoa = str(first.issued.bootstrap.ip6_hoa)
            assert rec.seen[0] == ("installed", (ha_id, spi, MN_ID, first.issued.sa.suite.name))
            assert ("binding_added", (ha_id, hoa, spi)) in rec.seen
            assert ("binding_deleted", (ha_id, hoa, spi)) in rec.seen
            assert st.ha.stats()["hook_errors"] >= 1

    run(main())


# ------------------------------------------------------------ store outages


class FullDiskStore(SQLiteSAStore):
    """The memory store, whose batched writes fail while ``full`` is set: a
    disk that filled up after the SA's own commit got through."""

    full = False
    failed = 0

    def _check(self) -> None:
        if FullDiskStore.full:
            FullDiskStore.failed += 1
            raise sqlite3.OperationalError("database or disk is full")

    def delivered_many(self, spis: Any) -> None:
        self._check()
        super().delivered_many(spis)

    def confirm_retired_many(self, spis: Any) -> None:
        self._check()
        super().confirm_retired_many(spis)

    def confirm_retired(self, spi: int) -> None:
        self._check()
        super().confirm_retired(spi)

    def retire(self, spi: int, reason: str) -> Any:
        self._check()
        return super().retire(spi, reason)

    def retire_record(self, spi: int, reason: str) -> Any:
        self._check()
        return super().retire_record(spi, reason)


class FullDiskStorePlugin:
    class Factory:
        name = "full-disk"

        def create(self, options: Mapping[str, Any], ctx: PluginContext) -> FullDiskStore:
            return FullDiskStore(None)

    @hookimpl
    def mipsec_sa_stores(self) -> list[Any]:
        return [self.Factory()]


def full_disk_stack(
    tmp_path: Path, pki: PkiPaths, slow: SlowLocal | None = None, revocations: Path | None = None
) -> Stack:
    """A HAC (+ its HA) whose SA store is a ``FullDiskStore``, not full yet;
    with ``slow``, the HA is reached through that slow transport."""
    data = hac_data(tmp_path, pki)
    data["sa_store"] = {"backend": "full-disk"}
    if revocations is not None:
        data["revocations"] = {"path": str(revocations)}
    FullDiskStore.full, FullDiskStore.failed = False, 0
    if slow is None:
        return Stack(hac_config(data, tmp_path), [FullDiskStorePlugin()])
    ha_cfg = hac_config(data, tmp_path).local_ha
    del data["local_ha"]
    data["ha"][0]["transport"] = "slow-local"
    return Stack(hac_config(data, tmp_path), [FullDiskStorePlugin(), slow], ha_cfg=ha_cfg)


def test_delivered_marks_the_store_cannot_write_are_kept_not_swept(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    """The 200 left, then the store cannot record it (disk full): the mark is
    kept and written once the store works again.  Dropping it would let the
    sweep of undelivered SAs take back an SA the MN was told it holds."""

    async def main() -> None:
        async with full_disk_stack(tmp_path, pki) as st:
            hac = st.hac
            assert hac is not None and st.ha is not None
            mn = mn_config(pki, st.port)
            FullDiskStore.full = True
            got = await bootstrap(mn)
            assert got.ok and got.issued is not None
            spi = got.issued.sa.spi
            hac._confirm_now()  # the batch: it fails, twice
            hac._confirm_now()
            assert FullDiskStore.failed == 2
            # The sweep of SAs stored and never answered with, as if the
            # provisioning deadline had long passed: not this one.
            hac._issuing_bound = lambda: -60.0  # type: ignore[method-assign]
            assert hac.sweep_undelivered() == 0
            assert hac.store.get(spi, datetime.now(UTC)) is not None
            FullDiskStore.full = False
            hac._confirm_now()
            assert hac.store.undelivered(datetime.now(UTC) + timedelta(minutes=1)) == []  # type: ignore[attr-defined]
            assert hac.sweep_undelivered() == 0
            assert st.ha.core.has_spi(spi)
            reg = Registrar(got.issued, mn)
            await reg.open()
            assert (await reg.run(until_registered=True, timeout=5)).status == 0
            reg.close()

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [r.getMessage() for r in caplog.records if "delivered SAs" in r.getMessage()]
    # One line when the outage begins, one when it ends; never a traceback.
    assert len(lines) == 2, lines
    assert "database or disk is full" in lines[0] and "1 delivered SAs" in lines[0]
    assert "works again" in lines[1]
    assert "Traceback" not in caplog.text


def test_a_withdrawal_confirmed_while_the_store_cannot_write_is_recorded_later(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    """The HA confirms a withdrawal (here: a revocation's) while the HAC's
    store cannot record it: the confirmation waits in the batch and is
    written once the store works -- not lost with a traceback from the
    withdrawal task, which would make the next run withdraw it again."""

    async def main() -> None:
        async with full_disk_stack(tmp_path, pki) as st:
            hac = st.hac
            assert hac is not None and st.ha is not None
            got = await bootstrap(mn_config(pki, st.port))
            assert got.ok and got.issued is not None
            spi = got.issued.sa.spi
            assert hac.retire(spi, "revoked")  # its own write gets through, then:
            FullDiskStore.full = True  # before the withdrawal task has run
            assert await eventually(lambda: not st.ha.core.has_spi(spi))  # the HA confirmed
            assert await eventually(lambda: FullDiskStore.failed >= 1)  # the batch failed
            now = datetime.now(UTC)
            assert [s for s, *_ in hac.store.retired_unconfirmed(now)] == [spi]
            FullDiskStore.full = False
            assert await eventually(lambda: hac.store.retired_unconfirmed(now) == [])
            assert not hac._tasks  # the withdrawal task ended cleanly

    with caplog.at_level(logging.INFO):
        run(main())
    assert "Traceback" not in caplog.text and "never retrieved" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)


def test_an_mn_gone_mid_issue_while_the_store_cannot_write_is_swept_later(
    tmp_path: Path, pki: PkiPaths, caplog: pytest.LogCaptureFixture
) -> None:
    """The MN leaves while its SA is being provisioned, and the store cannot
    write the SA's retirement (disk full): one line, no traceback from the
    cancelled issue; the SA stays stored as never delivered, and the sweep
    takes it back -- off its HA too -- once the store works."""
    slow = SlowLocal(0.5)

    async def main() -> None:
        async with full_disk_stack(tmp_path, pki, slow) as st:
            hac = st.hac
            assert hac is not None and st.ha is not None
            _reader, writer, _exch = await done_request(st, pki)
            await asyncio.sleep(0.1)  # the HAC is issuing (provisioning takes 0.5 s)
            FullDiskStore.full = True
            writer.close()
            await asyncio.sleep(slow.delay + 0.2)
            now = datetime.now(UTC)
            # Still stored (pending: never delivered); the cancelled install
            # may or may not have reached the HA.
            assert len(hac.store.live(now)) == 1
            FullDiskStore.full = False
            hac._issuing_bound = lambda: -60.0  # type: ignore[method-assign]
            assert hac.sweep_undelivered() == 1
            assert hac.store.live(now) == []
            assert await eventually(lambda: st.ha is not None and st.ha.core.spis() == [])
            assert await eventually(lambda: hac.store.retired_unconfirmed(now) == [])

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [r.getMessage() for r in caplog.records if "cannot retire it now" in r.getMessage()]
    assert len(lines) == 1 and "database or disk is full" in lines[0], lines
    assert "Traceback" not in caplog.text and "never retrieved" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)


def _mn_sa(spi: int, end_in: int, now: datetime) -> IssuedSA:
    """An SA of ``MN_ID`` on ha1 issued at ``now``, ending ``end_in`` seconds
    after an hour from then."""
    from mipsec.core.issuer import new_sa
    from mipsec.core.model import BootstrapData
    from mipsec.core.suites import Suite

    x = new_sa(
        spi=spi,
        mn_id=MN_ID,
        suite=Suite.AES_128_CBC_SHA256,
        scope=1,
        lifetime=3600 + end_in,
        now=now,
        ha_id="ha1",
    )
    return IssuedSA(x, BootstrapData())


def test_a_delivered_sa_withdraws_only_older_sas_of_its_mn(tmp_path: Path, pki: PkiPaths) -> None:
    """After a 200, the HAC withdraws the MN's SAs beyond max_sas_per_mn --
    only those older than the one delivered.  With several HACs on one
    store, the MN's newer SA may be another HAC's: withdrawing it (as the
    other HAC withdraws this one) left the MN nothing of two 200s.  So:
    an SA with a later validity end is left alone; of the same second, one
    this HAC delivered after it, or one it did not deliver with a larger
    SPI (the rule every HAC applies alike, so of two HACs' SAs in one
    second exactly one is the newer for both); and if the delivered SA was
    itself superseded meanwhile, nothing is withdrawn from here."""
    from datetime import timedelta

    now = datetime.now(UTC)

    def sa(spi: int, end_in: int) -> IssuedSA:
        return _mn_sa(spi, end_in, now)

    async def main() -> tuple[list[int], ...]:
        async with Stack(hac_config(hac_data(tmp_path, pki), tmp_path)) as st:
            hac = st.hac
            assert hac is not None
            for spi, end_in in ((101, -60), (102, 0), (103, 0), (104, 60)):
                assert hac.store.add(sa(spi, end_in))
            # 102 delivered: 101 is older (earlier end); 103 has the same
            # second, was not delivered by this HAC and has a larger SPI;
            # 104 is newer.
            first = [s for s, _ in hac._excess(MN_ID, 102)]
            # Another HAC delivering 103 judges the same pair the same way:
            # 102 (same second, smaller SPI) is older, and goes with 101.
            other = [s for s, _ in hac._excess(MN_ID, 103)]
            # This HAC delivered both, 103 first: delivery order decides
            # (the MN holds the later 200), not the SPIs.
            ends = {spi: int(end) for spi, end, _ in hac._held(MN_ID, now)}
            hac._delivered.update({103: (1, ends[103]), 102: (2, ends[102])})
            delivered_both = [s for s, _ in hac._excess(MN_ID, 102)]
            # 105 was superseded by another HAC before its 200 left here:
            # nothing goes, not even the older 101.
            gone = [s for s, _ in hac._excess(MN_ID, 105, now + timedelta(seconds=1))]
            return first, other, delivered_both, gone

    first, other, delivered_both, gone = run(main())
    assert first == [101]
    assert other == [101, 102]
    assert delivered_both == [101, 103]
    assert gone == []


def test_an_older_sa_delivered_after_a_newer_one_of_its_mn_is_withdrawn(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """Two bootstraps of one MN on one HAC: the newer SA's 200 leaves while
    the older is still being issued (its install under way).  The older is
    spared then -- not withdrawn under its feet -- and withdrawn once its
    own 200 has left, so the MN ends with the newer SA alone.  (Before, the
    older stayed live beside it: found by the three-HAC stress test, one
    MN holding one SA on each HA.)  An issue that fails instead forgets it."""
    at = datetime.now(UTC)

    async def main() -> tuple[list[int], ...]:
        async with Stack(hac_config(hac_data(tmp_path, pki), tmp_path)) as st:
            hac = st.hac
            assert hac is not None

            def live() -> list[int]:
                return sorted(i.sa.spi for i in hac.store.live_for_mn(MN_ID, datetime.now(UTC)))

            for spi, end_in in ((201, 0), (202, 1)):
                assert hac.store.add(_mn_sa(spi, end_in, at))
            hac._issuing_spis.add(201)  # 201 still being issued ...
            hac._supersede(
                MN_ID, 202, _mn_sa(202, 1, at).sa.validity_end
            )  # ... when 202's 200 leaves
            spared = live()
            hac._issuing_spis.discard(201)  # 201's 200 leaves (deliver)
            hac._supersede(MN_ID, 201, _mn_sa(201, 0, at).sa.validity_end)
            after = live()
            # The same, but 203's issue fails after 204's 200: nothing owed.
            for spi, end_in in ((203, 2), (204, 3)):
                assert hac.store.add(_mn_sa(spi, end_in, at))
            hac._issuing_spis.add(203)
            hac._supersede(MN_ID, 204, _mn_sa(204, 3, at).sa.validity_end)
            flagged = sorted(hac._withdraw_when_delivered)
            hac.rollback(_mn_sa(203, 2, at), "127.0.0.1:1", "test")
            return spared, after, flagged, sorted(hac._withdraw_when_delivered), live()

    spared, after, flagged, left, final = run(main())
    assert spared == [201, 202]
    assert after == [202]
    assert flagged == [203]
    assert left == [] and final == [204]


def test_the_sweep_waits_for_the_slowest_hac_sharing_the_store(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """HACs sharing a store may have different provisioning timeouts.  An
    SA another HAC stored 20 s ago and is still waiting for its HA to
    confirm (its heartbeat says it may issue for 64 s after a store write)
    is not this HAC's to take back as undelivered, though this one gives
    up on its own after ~6 s; once that HAC says 9 s -- or its heartbeat
    and bound have lapsed -- the sweep takes the SA back (found in review:
    each HAC judged the others' SAs by its own timeout)."""
    db = tmp_path / "sa.sqlite"
    data = hac_data(tmp_path, pki)
    data["sa_store"] = {"backend": "sqlite", "path": str(db)}

    async def main() -> None:
        async with Stack(hac_config(data, tmp_path)) as st:
            hac = st.hac
            assert hac is not None
            assert hac._issuing_bound() < 20  # this HAC alone would sweep it
            other = SQLiteSAStore(db)  # the slow HAC's view of the same file
            try:
                other.owner = "host:/etc/mipsec/hac-slow.toml"
                other.track_delivery = True
                now = datetime.now(UTC)
                stored = now - timedelta(seconds=20)
                assert other.add(_mn_sa(0x4242, 0, stored), now=stored)
                other.heartbeat(now.timestamp() + 60, ["ha1"], now=now, issuing=64.0)
                assert hac.sweep_undelivered() == 0
                assert hac.store.get(0x4242, now) is not None
                other.heartbeat(now.timestamp() + 60, ["ha1"], now=now, issuing=9.0)
                assert hac.sweep_undelivered() == 1
                assert hac.store.get(0x4242, datetime.now(UTC)) is None
            finally:
                other.close()

    run(main())


def test_delivery_order_is_forgotten_at_each_sas_end_whoever_ended_it(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """The HAC keeps the order in which it delivered SAs (a same-second tie
    between one MN's SAs); with HACs sharing a store, another HAC
    supersedes most of them, and the entries stayed for good -- about 2
    million a day per HAC at 100,000 MNs (found in review).  Now each goes
    at its SA's validity end, whoever ended the SA, and the expiry run
    drops them."""
    from mipsec.core.suites import Suite

    db = tmp_path / "sa.sqlite"
    data = hac_data(tmp_path, pki)
    data["sa_store"] = {"backend": "sqlite", "path": str(db)}

    async def main() -> tuple[int, int, int]:
        async with Stack(hac_config(data, tmp_path)) as st:
            hac = st.hac
            assert hac is not None
            other = SQLiteSAStore(db)  # another HAC on the same file
            try:
                ends = set()
                for i in range(50):
                    issued = await hac.issue_sa(f"mn{i}@mipsec.test", Suite.AES_128_CBC_SHA256, 1)
                    hac.deliver(issued, "127.0.0.1:1")
                    ends.add(issued.sa.validity_end.timestamp())
                    assert other.retire(issued.sa.spi, "superseded") is not None
                held = len(hac._delivered)
                hac._forget_delivered(min(ends) - 1)  # before any end: all kept
                kept = len(hac._delivered)
                hac._forget_delivered(max(ends))
                return held, kept, len(hac._delivered) + len(hac._delivered_ends)
            finally:
                other.close()

    assert run(main()) == (50, 50, 0)


def test_a_store_failing_the_retire_after_the_200_keeps_both_sas_until_the_next(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """A store whose ``retire`` fails (a full disk) when the MN's new SA
    supersedes its older one.

    Until the twenty-ninth session that retire ran after the HA confirmed
    the install and before the 200: the MN got 500, and the new SA was taken
    back (it once stayed live in both, found in review).  Since then the
    older SA is retired only after the new one's 200 has left (found in
    review: a failed re-bootstrap withdrew the MN's valid SA), so the
    failure is the clean-up's: the MN holds its new SA, delivered; the older
    one stays live (logged), and the MN's next bootstrap withdraws both."""
    from mipsec.core.hookspecs import hookimpl

    class FailingRetireStore(SQLiteSAStore):
        retire_record = None  # type: ignore[assignment]  # a third party's: retire() only
        fail = False

        def retire(self, spi: int, reason: str) -> Any:
            if self.fail and reason == "superseded":
                raise sqlite3.OperationalError("database or disk is full")
            return super().retire(spi, reason)

    class Plugin:
        store: FailingRetireStore | None = None

        @hookimpl
        def mipsec_sa_stores(self) -> list[Any]:
            plugin = self

            class Factory:
                name = "failingretire"

                def create(self, options: Any, ctx: Any) -> FailingRetireStore:
                    plugin.store = FailingRetireStore(None)
                    return plugin.store

            return [Factory()]

    data = hac_data(tmp_path, pki)
    data["sa_store"] = {"backend": "failingretire"}
    plugin = Plugin()

    def live(hac: Any) -> list[int]:
        return sorted(i.sa.spi for i in hac.store.live_for_mn(MN_ID, datetime.now(UTC)))

    async def main() -> tuple[Any, ...]:
        async with Stack(hac_config(data, tmp_path), [plugin]) as st:
            hac, ha = st.hac, st.ha
            assert hac is not None and ha is not None and plugin.store is not None
            mn = mn_config(pki, st.port)
            first = await bootstrap(mn)
            assert first.ok and first.issued is not None
            plugin.store.fail = True
            second = await bootstrap(mn)
            assert second.issued is not None
            await asyncio.sleep(0.3)
            both = (live(hac), sorted(ha.core.spis()), set(hac._issuing_spis))
            plugin.store.fail = False
            third = await bootstrap(mn)
            assert third.ok and third.issued is not None
            await asyncio.sleep(0.3)  # the withdrawals after the 200
            spis = (first.issued.sa.spi, second.issued.sa.spi, third.issued.sa.spi)
            return second.status, spis, both, (live(hac), sorted(ha.core.spis()))

    status, (first, second, third), both, after = run(main())
    assert status == 200
    held, on_ha, issuing = both
    assert held == sorted([first, second]) and on_ha == held and issuing == set()
    assert after == ([third], [third])


def test_an_in_process_ha_elsewhere_than_its_ha_entry_is_a_config_error(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """Model 1: MNs are given the ``[[ha]]`` entry's port and addresses, so
    the in-process HA (``[local_ha.ha]``) must be there.  A different port
    or address is refused at load, naming the key; before, it passed
    ``check-config`` and every BU went where nobody listens (found in
    review).  An ephemeral port (0) or an address left unset is not
    compared."""
    data = hac_data(tmp_path, pki)
    ha_port = data["ha"][0]["port"]
    for key, value in (("port", ha_port + 1), ("address6", "2001:db8::99")):
        bad = hac_data(tmp_path, pki)
        bad["ha"][0]["port"] = ha_port
        bad["local_ha"]["ha"]["port"] = ha_port
        bad["local_ha"]["ha"][key] = value
        with pytest.raises(ConfigError) as info:
            hac_config(bad, tmp_path)
        assert f"local_ha.ha.{key}" in str(info.value), str(info.value)
    ok = hac_data(tmp_path, pki)
    ok["local_ha"]["ha"]["port"] = 0
    ok["local_ha"]["ha"]["address6"] = ok["ha"][0]["address6"]
    assert hac_config(ok, tmp_path).local_ha is not None


def test_disabling_a_plugin_that_is_not_installed_is_a_config_error(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """``[plugins] disable = ["event-log"]`` (the plugin is ``event_log``):
    refused at load, naming the key and the installed names; before, it
    disabled nothing and passed ``check-config`` (found in review)."""
    data = hac_data(tmp_path, pki)
    data["plugins"] = {"disable": ["event-log"]}
    with pytest.raises(ConfigError) as info:
        hac_config(data, tmp_path)
    assert "plugins.disable" in str(info.value) and "'event-log'" in str(info.value)
    assert "event_log" in str(info.value)
    data["plugins"] = {"disable": ["event_log"]}
    assert hac_config(data, tmp_path).plugins.disable == ("event_log",)
