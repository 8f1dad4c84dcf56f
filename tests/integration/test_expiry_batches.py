"""SAs that ended together leave in bounded batches, the event loop served
between them (the HAC's expiry timer and the HA's store expiry).

Before, one call deleted every expired SA and unwrapped each one's keys to
return it: 6.4 s on the event loop, holding the store's write lock, for
100,000 SAs that ended together (a HAC down past their lifetime; MNs that
all bootstrapped in the same minute).  Now the timers call the store's
``expire_some`` with EXPIRE_BATCH and give the loop a turn after each full
batch.  A real ``HacService`` (HA in its process) and a real ``HaService``,
SQLite stores on files filled with SAs that ended before they started.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
from test_ha_udp import ha_config
from test_hac_lifecycle import Stack, hac_config, hac_data, run

from mipsec.core.hookspecs import hookimpl
from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.pki import PkiPaths, init_pki
from mipsec.core.roles import ha as ha_module
from mipsec.core.roles import hac as hac_module
from mipsec.core.roles.ha import HaService
from mipsec.core.suites import SUITES, Suite
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

N = 250
BATCH = 100


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"))


def ended(n: int, base: int = 0x5000) -> list[IssuedSA]:
    """``n`` SAs of ha1 whose validity ended a minute ago."""
    end = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)
    info = SUITES[Suite.AES_128_CBC_SHA256]
    out = []
    for i in range(n):
        sa = SecurityAssociation(
            spi=base + i,
            mn_id=f"gone{i}@mipsec.test",
            suite=Suite.AES_128_CBC_SHA256,
            scope=1,
            validity_end=end + timedelta(seconds=i % 7),
            mn_to_ha_ikey=secrets.token_bytes(info.ikey_len),
            ha_to_mn_ikey=secrets.token_bytes(info.ikey_len),
            mn_to_ha_ekey=secrets.token_bytes(info.ekey_len),
            ha_to_mn_ekey=secrets.token_bytes(info.ekey_len),
            ha_id="ha1",
        )
        bs = BootstrapData(ip6_hoa=IPv6Address(0x2001_0DB8_0001 << 80 | 0x1000 + i))
        out.append(IssuedSA(sa, bs))
    return out


class Turns:
    """A task that counts its turns of the event loop and what the store held at each."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seen: list[int] = []

    async def run(self) -> None:
        import sqlite3

        while True:
            with sqlite3.connect(self.db) as c:
                self.seen.append(c.execute("SELECT COUNT(*) FROM issued_sa").fetchone()[0])
            await asyncio.sleep(0)


class Expired:
    def __init__(self) -> None:
        self.spis: list[int] = []

    @hookimpl
    def mipsec_sa_expired(self, spi: int, mn_id: str, validity_end: datetime) -> None:
        assert mn_id.startswith("gone") and validity_end < datetime.now(UTC)
        self.spis.append(spi)


def test_the_hac_expires_sas_that_ended_together_in_batches(
    tmp_path: Path, pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hac_module, "EXPIRE_BATCH", BATCH)
    db = tmp_path / "sa.db"
    with SQLiteSAStore(db) as store:
        assert store.add_bulk(ended(N)) == N
    data: dict[str, Any] = hac_data(tmp_path, pki, expiry_interval=0.2)
    data["sa_store"] = {"backend": "sqlite", "path": str(db)}
    hooks = Expired()
    turns = Turns(db)

    async def main() -> None:
        async with Stack(hac_config(data, tmp_path), [hooks]):
            task = asyncio.create_task(turns.run())
            for _ in range(100):
                await asyncio.sleep(0.05)
                if len(hooks.spis) == N:
                    break
            task.cancel()

    run(main())
    assert sorted(hooks.spis) == [0x5000 + i for i in range(N)]  # each one's event, once
    # The loop turned between the batches: other tasks saw the store part-way.
    partway = {n for n in turns.seen if 0 < n < N}
    assert partway, turns.seen
    assert partway <= {N - BATCH, N - 2 * BATCH}
    with SQLiteSAStore(db) as store:
        assert store.live(datetime.now(UTC) - timedelta(days=1)) == []  # gone from the file


def test_the_ha_expires_sas_that_ended_together_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ha_module, "EXPIRE_BATCH", BATCH)
    monkeypatch.setattr(ha_module, "STORE_EXPIRY_EVERY", 1)
    cfg = ha_config(tmp_path)
    db = Path(cfg.sa_store.options["path"])
    with SQLiteSAStore(db) as store:
        assert store.add_bulk(ended(N)) == N
    turns = Turns(db)

    async def main() -> int:
        svc = HaService(cfg)
        svc.expiry_interval = 0.05
        await svc.start()
        task = asyncio.create_task(turns.run())
        for _ in range(100):
            await asyncio.sleep(0.05)
            if turns.seen and turns.seen[-1] == 0:
                break
        task.cancel()
        held = len(svc.store.live(datetime.now(UTC) - timedelta(days=1)))
        await svc.stop()
        return held

    assert run(main()) == 0
    partway = {n for n in turns.seen if 0 < n < N}
    assert partway and partway <= {N - BATCH, N - 2 * BATCH}, turns.seen


def test_the_ha_expires_bindings_and_sas_that_ended_together_in_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In memory too: the HA's expiry timer ends bindings, SAs and their
    records in rounds of EXPIRE_BATCH, each committed, the loop served
    between them (100,000 at once were 4.2 s of HaCore.expire and a 3.2 s
    commit in one call), and logs one line for the mass."""
    from test_ha_start_loading import many, registered

    n = 20
    sas = many(n)

    class Later:
        """The HA's clock two hours on: every SA and binding has ended."""

        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def time() -> float:
            return time.time() + 7200

    async def main() -> tuple[list[int], list[str]]:
        mns = await registered(tmp_path, sas)
        svc = HaService(ha_config(tmp_path))
        await svc.start()
        assert len(svc.bindings) == n and all(svc.core.has_spi(x.sa.spi) for x in sas)
        seen: list[int] = []
        events: list[str] = []
        real_emit = svc.emit

        def emit(hook: str, **kwargs: Any) -> None:
            if hook == "mipsec_ha_binding_changed":
                events.append(kwargs["event"])
            real_emit(hook, **kwargs)

        svc.emit = emit  # type: ignore[method-assign]

        async def turns() -> None:
            while True:
                seen.append(len(svc.bindings))
                await asyncio.sleep(0)

        task = asyncio.create_task(turns())
        monkeypatch.setattr(ha_module, "time", Later)
        await svc._expire_paced()
        monkeypatch.undo()
        task.cancel()
        assert len(svc.bindings) == 0 and not any(svc.core.has_spi(x.sa.spi) for x in sas)
        await svc.stop()
        for mn in mns:
            mn.close()
        return seen, events

    monkeypatch.setattr(ha_module, "EXPIRE_BATCH", 6)
    with caplog.at_level(logging.DEBUG, logger="mipsec.ha"):
        seen, events = run(main())
    assert events == ["expired"] * n
    assert {n - 6, n - 12, n - 18} <= set(seen)  # served between the rounds
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert [m for m in info if "expired" in m] == [
        f"HA ha1: {n} bindings expired at once (the first: hoa=2001:db8:1::10 "
        f"spi={0x2000}; one line each at DEBUG)"
    ]
    per = [r for r in caplog.records if r.getMessage().startswith("binding expired")]
    assert len(per) == n and {r.levelno for r in per} == {logging.DEBUG}
