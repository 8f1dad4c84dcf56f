"""core/startup_heap.py: views built and the heap frozen once, after start-up loads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from mipsec.core import startup_heap
from mipsec.core.hoa_table import HoATable
from mipsec.core.hookspecs import PluginContext
from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import Suite
from mipsec.plugins.hoa_pool import PoolAllocatorFactory
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore


def test_freeze_once_per_role_in_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(startup_heap, "_frozen", set())
    monkeypatch.setattr(startup_heap.gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(startup_heap.gc, "collect", lambda gen=2: calls.append(f"collect{gen}"))
    startup_heap.freeze_heap("HAC")
    startup_heap.freeze_heap("HAC")  # a second in-process start: no second freeze
    assert calls == ["collect1", "freeze"]
    # Model 1: the HA in the HAC's process starts first; the HAC's views,
    # loaded after it, are frozen by the HAC's own call.
    calls.clear()
    monkeypatch.setattr(startup_heap, "_frozen", set())
    startup_heap.freeze_heap("HA")
    startup_heap.freeze_heap("HAC")
    startup_heap.freeze_heap("HA")
    assert calls == ["collect1", "freeze", "collect1", "freeze"]


def test_warm_builds_the_live_view_and_the_allocator_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    sa = SecurityAssociation(
        spi=300,
        mn_id="a@x",
        suite=Suite.AES_128_CBC_SHA256,
        scope=1,
        validity_end=end,
        mn_to_ha_ikey=b"\x01" * 32,
        ha_to_mn_ikey=b"\x02" * 32,
        mn_to_ha_ekey=b"\x03" * 16,
        ha_to_mn_ekey=b"\x04" * 16,
        ha_id="ha1",
    )
    bs = BootstrapData(haa_ip6=IPv6Address("2001:db8::1"), ip6_hoa=IPv6Address("2001:db8:1::1"))
    allocator = PoolAllocatorFactory().create(
        {"ip6_prefix": "2001:db8:1::/64"}, PluginContext("hac", Path("."))
    )
    with SQLiteSAStore(None) as store:
        store.add(IssuedSA(sa, bs))
        startup_heap.warm_hac_views(store, allocator)
        walks = 0
        real_iter = HoATable.__iter__

        def counting_iter(self: HoATable) -> object:
            nonlocal walks
            walks += 1
            return real_iter(self)

        monkeypatch.setattr(HoATable, "__iter__", counting_iter)
        _, in_use = store.live_summary(datetime.now(UTC))
        assert allocator.assign("b@x", in_use).ip6_hoa == IPv6Address("2001:db8:1::2")
        assert allocator.assign("a@x", in_use).ip6_hoa == IPv6Address("2001:db8:1::1")
        assert walks == 0  # indexed at start, not at the first bootstrap


def test_collection_paused_while_loading_and_restored_whatever_happens() -> None:
    """No automatic collection inside (a load of 100,000 SAs would pay for
    the collector's passes over everything loaded so far); the collector is
    back on the way out, also when the start fails -- and stays off when
    someone else had turned it off."""
    import gc

    assert gc.isenabled()
    with startup_heap.collection_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(OSError), startup_heap.collection_paused():
        assert not gc.isenabled()
        raise OSError("address in use")
    assert gc.isenabled()
    gc.disable()
    try:
        with startup_heap.collection_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
