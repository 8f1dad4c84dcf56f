"""``SQLiteSAStore.add_bulk``: filling a store in one transaction (bench/scale.py)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import Suite
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _sa(spi: int, i: int) -> IssuedSA:
    sa = SecurityAssociation(
        spi=spi,
        mn_id=f"mn{i}@x",
        suite=Suite.AES_128_CBC_SHA256,
        scope=1,
        validity_end=T0 + timedelta(hours=1),
        mn_to_ha_ikey=bytes([i]) * 32,
        ha_to_mn_ikey=b"\x02" * 32,
        mn_to_ha_ekey=b"\x03" * 16,
        ha_to_mn_ekey=b"\x04" * 16,
        ha_id="ha1",
    )
    bs = BootstrapData(
        haa_ip6=IPv6Address("2001:db8::1"),
        ip6_hoa=IPv6Address(f"2001:db8:1::{i + 1:x}"),
        ip4_hoa=IPv4Address(f"10.0.0.{i + 1}"),
    )
    return IssuedSA(sa=sa, bootstrap=bs)


def test_bulk_rows_read_back_and_show_in_the_live_view(tmp_path: Path) -> None:
    path = tmp_path / "sa.sqlite"
    with SQLiteSAStore(path) as store:
        store.add(_sa(100, 0), T0)
        assert store.hoas_in_use(T0) == {"2001:db8:1::1": "mn0@x", "10.0.0.1": "mn0@x"}
        assert store.add_bulk(_sa(200 + i, i) for i in range(1, 4)) == 3
        assert store.get(202, T0) == _sa(202, 2)  # keys wrapped and unwrapped
        assert len(store.hoas_in_use(T0)) == 8  # the view saw the bulk rows
        assert store.count_by_ha(T0) == {"ha1": 4}
    with SQLiteSAStore(path) as again:
        assert [x.sa.spi for x in again.live(T0)] == [100, 201, 202, 203]


def test_bulk_is_all_or_nothing(tmp_path: Path) -> None:
    with SQLiteSAStore(tmp_path / "sa.sqlite") as store:
        store.add(_sa(100, 0), T0)
        with pytest.raises(sqlite3.IntegrityError):
            store.add_bulk([_sa(300, 1), _sa(100, 2)])  # 100 is live
        store.retire(100, "test")
        with pytest.raises(sqlite3.IntegrityError):
            store.add_bulk([_sa(301, 1), _sa(100, 2)])  # 100 is retired
        assert store.live(T0) == []
