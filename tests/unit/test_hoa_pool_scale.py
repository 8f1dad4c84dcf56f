"""HoA assignment whose cost does not grow with the number of live SAs.

The SQLite store hands the allocator its live ``HoATable`` (core/hoa_table.py);
the allocator follows the table's journal instead of copying, comparing or
re-parsing the whole table on every bootstrap (issue 9).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core import hoa_table
from mipsec.core.hoa_table import HoATable
from mipsec.core.hookspecs import PluginContext
from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import Suite
from mipsec.plugins import hoa_pool
from mipsec.plugins.hoa_pool import PoolAllocator, PoolAllocatorFactory
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

CTX = PluginContext(role="hac", base_dir=Path("."))
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def pool(**options: Any) -> PoolAllocator:
    return PoolAllocatorFactory().create(options, CTX)


class CountingTable(HoATable):
    """A HoATable that counts whole-table walks."""

    __slots__ = ("walks",)

    def __init__(self) -> None:
        super().__init__()
        self.walks = 0

    def __iter__(self) -> Any:
        self.walks += 1
        return super().__iter__()

    def copy(self) -> dict[str, str]:
        self.walks += 1
        return super().copy()


def hold(table: HoATable, mn_id: str, a: Any) -> None:
    for hoa in (a.ip6_hoa, a.ip4_hoa):
        if hoa is not None:
            table.set(str(hoa), mn_id)


def fill(table: HoATable, n: int) -> None:
    base6 = int(IPv6Address("2001:db8:1::"))
    base4 = int(IPv4Address("10.0.0.0"))
    for i in range(n):
        table.set(str(IPv6Address(base6 + 1 + i)), f"mn{i}@x")
        table.set(str(IPv4Address(base4 + 1 + i)), f"mn{i}@x")


@pytest.mark.parametrize("n", [100, 5000])
def test_assignment_reads_only_changes(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    p = pool(ip6_prefix="2001:db8:1::/64", ip4_pool="10.0.0.0/8")
    table = CountingTable()
    fill(table, n)
    p.assign("first@x", table)  # the first look indexes the whole table, once
    table.walks = 0
    parses = 0
    real_parse = hoa_pool._parse

    def counting_parse(text: str) -> Any:
        nonlocal parses
        parses += 1
        return real_parse(text)

    monkeypatch.setattr(hoa_pool, "_parse", counting_parse)
    for i in range(50):
        a = p.assign(f"new{i}@x", table)  # new MNs: the next free addresses
        assert a.ip6_hoa == IPv6Address(int(IPv6Address("2001:db8:1::")) + n + 1 + i)
        assert a.ip4_hoa == IPv4Address(int(IPv4Address("10.0.0.0")) + n + 1 + i)
        hold(table, f"new{i}@x", a)
        # A returning MN gets its own address back.
        assert p.assign("mn7@x", table).ip6_hoa == IPv6Address("2001:db8:1::8")
    assert table.walks == 0
    # Each new MN's two addresses are parsed once when they come into use: the
    # count does not depend on n.
    assert parses == 100


def test_freed_address_below_the_cursor_is_handed_out_first() -> None:
    p = pool(ip6_prefix="2001:db8:1::/64")
    table = HoATable()
    fill(table, 10)  # ::1 .. ::a
    assert p.assign("x@x", table).ip6_hoa == IPv6Address("2001:db8:1::b")
    table.delete("2001:db8:1::4")
    table.delete("2001:db8:1::2")
    assert p.assign("x@x", table).ip6_hoa == IPv6Address("2001:db8:1::2")
    table.set("2001:db8:1::2", "x@x")
    assert p.assign("y@x", table).ip6_hoa == IPv6Address("2001:db8:1::4")


def test_journal_trimmed_past_a_reader_rebuilds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hoa_table, "_MARGIN", 2)
    p = pool(ip4_pool="10.0.0.0/24")
    table = HoATable()
    assert p.assign("a@x", table).ip4_hoa == IPv4Address("10.0.0.1")
    for i in range(1, 40):
        table.set(f"10.0.0.{i}", f"m{i}@x")
    for i in range(1, 30):
        table.delete(f"10.0.0.{i}")
    assert table.changes_since(0) is None  # the reader fell behind the journal
    assert p.assign("a@x", table).ip4_hoa == IPv4Address("10.0.0.1")
    assert p.assign("m35@x", table).ip4_hoa == IPv4Address("10.0.0.35")


def _sa(spi: int, mn_id: str, ip6: IPv6Address | None, ip4: IPv4Address | None) -> IssuedSA:
    sa = SecurityAssociation(
        spi=spi,
        mn_id=mn_id,
        suite=Suite(2),
        scope=0,
        validity_end=T0 + timedelta(hours=1),
        mn_to_ha_ikey=b"\x01" * 32,
        ha_to_mn_ikey=b"\x02" * 32,
        mn_to_ha_ekey=b"\x03" * 16,
        ha_to_mn_ekey=b"\x04" * 16,
        ha_id="ha1",
    )
    bs = BootstrapData(haa_ip6=IPv6Address("2001:db8::1"), port=4500, ip6_hoa=ip6, ip4_hoa=ip4)
    return IssuedSA(sa=sa, bootstrap=bs)


def test_store_summary_is_not_copied_per_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the SQLite store, as the HAC does it: no whole-table walk per bootstrap."""
    walks = 0
    real_iter = HoATable.__iter__
    real_copy = HoATable.copy

    def counting_iter(self: HoATable) -> Any:
        nonlocal walks
        walks += 1
        return real_iter(self)

    def counting_copy(self: HoATable) -> dict[str, str]:
        nonlocal walks
        walks += 1
        return real_copy(self)

    monkeypatch.setattr(HoATable, "__iter__", counting_iter)
    monkeypatch.setattr(HoATable, "copy", counting_copy)
    p = pool(ip6_prefix="2001:db8:1::/64", ip4_pool="10.0.0.0/16")
    with SQLiteSAStore(None, clock=lambda: T0) as store:
        spi = 1000
        for i in range(300):
            spi += 1
            _, in_use = store.live_summary(T0)
            a = p.assign(f"mn{i}@x", in_use)
            assert store.add(_sa(spi, f"mn{i}@x", a.ip6_hoa, a.ip4_hoa), T0)
        assert walks <= 1  # at most the first look, before the allocator had an index
        held = store.hoas_in_use(T0)
        assert len(held) == 600
        assert len({mn for mn in held.values()}) == 300
        # Retiring frees the address for the next new MN, still without a walk.
        old = store.live_for_mn("mn5@x", T0)[0]
        store.retire(old.sa.spi, "test")
        walks = 0
        _, in_use = store.live_summary(T0)
        a = p.assign("late@x", in_use)
        assert (a.ip6_hoa, a.ip4_hoa) == (old.bootstrap.ip6_hoa, old.bootstrap.ip4_hoa)
        assert walks == 0


# One step: ("assign", mn) -- the MN bootstraps and holds what it got;
# ("drop", i) -- the i-th held address (mod count) leaves use;
# ("steal", i, mn) -- an address changes holder (a newer SA of another MN).
_step = st.one_of(
    st.tuples(st.just("assign"), st.integers(0, 30)),
    st.tuples(st.just("drop"), st.integers(0, 1000)),
    st.tuples(st.just("steal"), st.integers(0, 1000), st.integers(0, 30)),
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(_step, max_size=80), dual=st.booleans(), hnp=st.booleans())
def test_never_an_address_in_use_and_same_as_a_fresh_look(
    steps: list[tuple[Any, ...]], dual: bool, hnp: bool
) -> None:
    opts: dict[str, Any] = {"exclude": ["2001:db8:1::3", "10.0.0.5"]}
    if hnp:
        opts.update(ip6_hnp_pool="2001:db8:100::/56", ip6_hnp_len=60)  # 16 prefixes
    else:
        opts.update(ip6_prefix="2001:db8:1::/64", ip6_last="2001:db8:1::14")
    if dual:
        opts["ip4_pool"] = "10.0.0.0/28"
    p = pool(**opts)
    table = HoATable()
    for step in steps:
        texts = list(table)
        if step[0] == "drop":
            if texts:
                table.delete(texts[step[1] % len(texts)])
            continue
        if step[0] == "steal":
            if texts:
                table.set(texts[step[1] % len(texts)], f"m{step[2]}@x")
            continue
        mn = f"m{step[1]}@x"
        try:
            got = p.assign(mn, table)
        except LookupError:
            with pytest.raises(LookupError):
                pool(**opts).assign(mn, dict(table))
            continue
        # Identical to an allocator that sees the table for the first time.
        assert got == pool(**opts).assign(mn, dict(table))
        for hoa in (got.ip6_hoa, got.ip4_hoa):
            if hoa is not None:
                assert table.get(str(hoa), mn) == mn  # free, or already this MN's
        hold(table, mn, got)


# Texts of one address in several spellings, and texts that are no address.
_spellings = st.sampled_from(
    [
        "2001:db8:1::5",
        "2001:db8:1:0::5",
        "2001:DB8:1::5",
        "2001:db8:1::6",
        "2001:db8:1::1",
        "2001:db8:100:30::1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.9",
        "not-an-address",
        "fe80::1%eth0",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    table=st.dictionaries(_spellings, st.sampled_from(["a@x", "b@x", "c@x"]), max_size=11),
    hnp=st.booleans(),
)
def test_bulk_index_is_the_per_item_index(table: dict[str, str], hnp: bool) -> None:
    """The start-up's bulk rebuild indexes a table exactly as the per-item
    path does -- falling back to it for other spellings and non-addresses --
    so the next assignment is the same either way."""
    opts: dict[str, Any] = {"ip4_pool": "10.0.0.0/28"}
    if hnp:
        opts.update(ip6_hnp_pool="2001:db8:100::/56", ip6_hnp_len=60)
    else:
        opts.update(ip6_prefix="2001:db8:1::/64", ip6_last="2001:db8:1::14")
    bulk, reference = pool(**opts), pool(**opts)
    bulk.prime(table)
    reference._reset()
    for text, mn_id in table.items():
        reference._apply(text, None, mn_id)
    for fam in ("_v6", "_v4"):
        b, r = getattr(bulk, fam), getattr(reference, fam)
        assert b.used == r.used and b.extra == r.extra
        assert {k: sorted(v) for k, v in b.own.items()} == {k: sorted(v) for k, v in r.own.items()}
    for mn in ("a@x", "d@x"):
        try:
            got = bulk.assign(mn, table)
        except LookupError:
            with pytest.raises(LookupError):
                reference.assign(mn, table)
            continue
        assert got == reference.assign(mn, table)


def test_bulk_index_of_the_stores_table_takes_no_per_item_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the SQLite store holds (canonical texts, each address once) is
    indexed by the bulk loop alone: no ``_apply`` per address at start."""
    table = HoATable()
    table.load(
        {f"2001:db8:1::{i:x}": f"m{i}@x" for i in range(10, 2000)}
        | {f"10.0.{i >> 8}.{i & 255}": f"m{i}@x" for i in range(10, 2000)}
    )
    p = pool(ip6_prefix="2001:db8:1::/64", ip4_pool="10.0.0.0/16")
    calls: list[str] = []
    real = p._apply
    monkeypatch.setattr(p, "_apply", lambda *a: calls.append(a[0]) or real(*a))
    p.prime(table)
    assert calls == []
    assert len(p._v6.used) == len(p._v4.used) == 1990
    got = p.assign("new@x", table)
    assert (
        str(got.ip6_hoa) == "2001:db8:1::1"
        or int(got.ip6_hoa) >= 0x20010DB8000100000000000000000001
    )
    assert str(got.ip4_hoa) == "10.0.0.1"


def test_table_views_read_the_dict_not_one_lookup_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """``items()``, ``keys()``, ``values()`` and ``get()`` come from the table's
    dict: the Mapping mixins would call ``__getitem__`` once per key (the
    allocator's rebuild at a 100k start walks 200,000 items)."""
    t = HoATable()
    t.load({"2001:db8:1::10": "a@x", "10.0.0.1": "a@x", "2001:db8:1::11": "b@x"})
    t.set("10.0.0.2", "b@x")
    t.delete("2001:db8:1::10")

    def no(self: HoATable, key: str) -> str:
        raise AssertionError("one lookup per key")

    monkeypatch.setattr(HoATable, "__getitem__", no)
    want = {"10.0.0.1": "a@x", "2001:db8:1::11": "b@x", "10.0.0.2": "b@x"}
    assert dict(t.items()) == want
    assert sorted(t.keys()) == sorted(want) and sorted(t.values()) == sorted(want.values())
    assert t.get("10.0.0.2") == "b@x" and t.get("2001:db8:1::10") is None
    assert t.get("x", "-") == "-"
