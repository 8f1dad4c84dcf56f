"""An HA with many SAs serves before it has loaded them all (core/roles/ha.py).

The HA reads LOAD_FIRST SAs from its store, opens its sockets, then loads
the rest in paced pages while it serves; an SA it has not reached yet is
loaded by its MN's first packet.  Before, 100,000 SAs kept it deaf for 8.8 s.
Real ``HaService`` on real UDP sockets, SQLite stores on files, MNs from the
codecs (``test_ha_udp.MN``); small LOAD_FIRST / LOAD_PAGE so that a few
dozen SAs make several pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
from test_ha_udp import HAA, HOA, MN, ha_config, make_issued, run

from mipsec.core.model import IssuedSA
from mipsec.core.roles import ha as ha_module
from mipsec.core.roles.ha import HaService
from mipsec.core.wire.esp import NEXT_HEADER_MH, PTYPE_MH
from mipsec.core.wire.mh import BindingAck, BindingUpdate, decode_mh, encode_mh

N = 30


class MNAt(MN):
    """An MN with a home address of its own."""

    def __init__(self, issued: IssuedSA) -> None:
        super().__init__(issued)
        hoa = issued.bootstrap.ip6_hoa
        assert hoa is not None
        self.hoa = hoa

    def bu(self, seq: int, lifetime: int = 100) -> bytes:
        mh = encode_mh(
            BindingUpdate(sequence=seq, a=True, h=True, lifetime=lifetime), src=self.hoa, dst=HAA
        )
        return self.out.protect(PTYPE_MH, NEXT_HEADER_MH, mh)

    async def ba(self, seq: int, ha: tuple[str, int]) -> BindingAck:
        self.sent = self.bu(seq)
        await self.send(self.sent, ha)
        u = self.inb.unprotect(await self.recv())
        msg = decode_mh(u.payload, src=HAA, dst=self.hoa)
        assert msg.checksum_ok and isinstance(msg.message, BindingAck)
        return msg.message


def many(n: int) -> list[IssuedSA]:
    out = []
    for i in range(n):
        base = make_issued(spi=0x2000 + i)
        bs = dataclasses.replace(base.bootstrap, ip6_hoa=IPv6Address(int(HOA) + i))
        out.append(IssuedSA(base.sa, bs))
    return out


class Gate:
    """Holds the background load until a test lets it go (``wait_loaded``):
    without it the loader could reach an SA before the packet meant to find
    it not loaded yet."""

    opened = False


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ha_module, "LOAD_FIRST", 10)
    monkeypatch.setattr(ha_module, "LOAD_PAGE", 5)
    Gate.opened = False
    real = HaService._load_rest

    async def held(self: HaService, page: Any) -> None:
        while not Gate.opened:
            await asyncio.sleep(0.005)
        await real(self, page)

    monkeypatch.setattr(HaService, "_load_rest", held)


async def registered(tmp_path: Path, sas: list[IssuedSA]) -> list[MNAt]:
    """A first run of the HA: every SA installed, every MN registered (BU 1)."""
    svc = HaService(ha_config(tmp_path))
    addrs = await svc.start()
    mns = []
    for issued in sas:
        await svc.install_sa(issued)
        mn = MNAt(issued)
        assert (await mn.ba(1, addrs[0])).status == 0
        mns.append(mn)
    await svc.stop()
    return mns


async def wait_loaded(svc: HaService) -> None:
    Gate.opened = True
    for _ in range(200):
        if svc._loader is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the load never ended")


def test_an_mn_is_served_before_its_sa_was_reached_by_the_load(
    tmp_path: Path, small_pages: None, caplog: pytest.LogCaptureFixture
) -> None:
    sas = many(N)

    async def main() -> None:
        mns = await registered(tmp_path, sas)
        last = mns[-1]  # the highest SPI: the last page
        replayed = last.sent  # its BU of the last run, as it was sent
        svc = HaService(ha_config(tmp_path))
        with caplog.at_level(logging.INFO, logger="mipsec.ha"):
            addrs = await svc.start()
            assert svc._loader is not None  # serving, the load goes on
            assert not svc.core.has_spi(sas[-1].sa.spi)
            # Its BU is served at once, with its replay state of the last run:
            # the next sequence number is accepted, the replayed BU dropped.
            assert (await last.ba(2, addrs[0])).status == 0
            assert svc.counts["loaded_on_demand"] == 1
            await last.send(replayed, addrs[0])
            assert await last.nothing()
            await wait_loaded(svc)
        assert all(svc.core.has_spi(x.sa.spi) for x in sas)
        assert svc.stats()["drops"] == {"replay": 1}
        # Every MN after the load, each with its own replay state.
        for mn in mns[:-1]:
            assert (await mn.ba(2, addrs[0])).status == 0
        assert svc.counts["loaded_on_demand"] == 1
        await svc.stop()
        for mn in mns:
            mn.close()

    run(main())
    text = caplog.text
    assert "serving after" in text and "loading the rest of its SAs" in text
    assert f"HA ha1: {N} SAs from the store, {N} bindings from the cache" in text


def test_an_sa_withdrawn_before_the_load_reached_it_stays_dead(
    tmp_path: Path, small_pages: None
) -> None:
    sas = many(N)

    async def main() -> None:
        mns = await registered(tmp_path, sas)
        svc = HaService(ha_config(tmp_path))
        addrs = await svc.start()
        gone = sas[-2].sa.spi
        assert not svc.core.has_spi(gone)
        await svc.withdraw_sa(gone)  # the HAC revoked it: not loaded yet
        await wait_loaded(svc)
        assert not svc.core.has_spi(gone)  # the load did not bring it back
        assert sum(svc.core.has_spi(x.sa.spi) for x in sas) == N - 1
        await mns[-2].send(mns[-2].bu(2), addrs[0])
        assert await mns[-2].nothing()
        assert svc.stats()["drops"] == {"withdrawn_spi": 1}
        await svc.stop()
        for mn in mns:
            mn.close()

    run(main())


def test_other_keys_under_an_spi_the_load_has_not_reached_are_refused(
    tmp_path: Path, small_pages: None
) -> None:
    """While the HA loads its store, a HAC (gone wrong, or rogue) installs
    other keys under the SPI of a live SA the load has not reached.  It is
    refused as for an SA the core holds; the victim keeps its binding and
    is served, and the rogue MN's BU is not.  Before, the install passed
    the check of the core alone, replaced the stored row, and the rogue
    took over the victim's binding (found in review).  The same SA again
    is accepted (idempotent)."""
    from mipsec.core.roles.ha import ProvisioningRefused

    sas = many(N)

    async def main() -> None:
        mns = await registered(tmp_path, sas)
        svc = HaService(ha_config(tmp_path))
        addrs = await svc.start()
        victim = sas[-1]
        spi = victim.sa.spi
        assert svc._loader is not None and not svc.core.has_spi(spi)
        rogue = IssuedSA(make_issued(spi=spi).sa, victim.bootstrap)  # fresh keys
        with pytest.raises(ProvisioningRefused, match="live here with another SA"):
            await svc.install_sa(rogue)
        await svc.install_sa(victim)  # the same SA: accepted
        rogue_mn = MNAt(rogue)
        await rogue_mn.send(rogue_mn.bu(7), addrs[0])
        assert await rogue_mn.nothing()
        await wait_loaded(svc)
        held = svc.core.installed_sa(spi)
        assert held is not None and held.sa.mn_to_ha_ikey == victim.sa.mn_to_ha_ikey
        assert (await mns[-1].ba(2, addrs[0])).status == 0
        binding = svc.core.binding(str(victim.bootstrap.ip6_hoa))
        assert binding is not None and binding.spi == spi
        await svc.stop()
        for mn in [*mns, rogue_mn]:
            mn.close()

    run(main())


def test_a_small_store_is_loaded_whole_before_the_sockets_open(tmp_path: Path) -> None:
    sas = many(5)

    async def main() -> None:
        mns = await registered(tmp_path, sas)
        svc = HaService(ha_config(tmp_path))
        await svc.start()
        assert svc._loader is None and svc.core.load_missing is None
        assert all(svc.core.has_spi(x.sa.spi) for x in sas)
        await svc.stop()
        for mn in mns:
            mn.close()

    run(main())


def test_a_flood_of_made_up_spis_during_the_load_costs_a_bounded_number_of_reads(
    tmp_path: Path, small_pages: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading an SA on demand costs a store read (~14 µs, against ~3 µs to
    drop an unknown SPI): past LOAD_ON_DEMAND_BURST (and its rate) the
    packets of SPIs not loaded yet are dropped as unknown -- made-up ones and
    real ones alike -- and the real MNs are served once the loader reaches
    their SAs."""
    monkeypatch.setattr(ha_module, "LOAD_ON_DEMAND_BURST", 3)
    monkeypatch.setattr(ha_module, "LOAD_ON_DEMAND_RATE", 1e-9)
    sas = many(N)

    async def main() -> None:
        mns = await registered(tmp_path, sas)
        svc = HaService(ha_config(tmp_path))
        reads = 0
        real_get = svc.store.get

        def get(spi: int, now: Any) -> Any:
            nonlocal reads
            reads += 1
            return real_get(spi, now)

        svc.store.get = get  # type: ignore[method-assign]
        addrs = await svc.start()
        fakes = [MNAt(make_issued(spi=0x9000 + i)) for i in range(10)]
        for fake in fakes:
            await fake.send(fake.bu(1), addrs[0])
        last = mns[-1]
        await last.send(last.bu(2), addrs[0])
        assert await last.nothing()  # its SA not loaded yet, the budget spent
        assert reads == 3
        assert svc.counts["load_on_demand_limited"] == 8
        await wait_loaded(svc)
        assert (await last.ba(3, addrs[0])).status == 0
        await svc.stop()
        for mn in [*mns, *fakes]:
            mn.close()

    run(main())
