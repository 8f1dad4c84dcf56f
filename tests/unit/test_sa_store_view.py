"""The SA store's in-memory live view answers exactly as its SQL queries do.

``count_by_ha`` and ``hoas_in_use`` run on every bootstrap; the store answers
them from a view kept in step with its own writes and rebuilt when another
connection commits (PRAGMA data_version).  These tests drive random
operations -- including a second handle on the same file and queries for
earlier instants -- and compare every answer with the plain SQL one.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import Suite
from mipsec.plugins import sa_store_sqlite
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(sec: int) -> datetime:
    return T0 + timedelta(seconds=sec)


def issued(spi: int, mn: int, end: int, hoa6: int | None, hoa4: int | None, ha: int) -> IssuedSA:
    sa = SecurityAssociation(
        spi=spi,
        mn_id=f"mn{mn}@x",
        suite=Suite.AES_128_CBC_SHA,
        scope=1,
        validity_end=at(end),
        mn_to_ha_ikey=bytes(20),
        ha_to_mn_ikey=bytes(20),
        mn_to_ha_ekey=bytes(16),
        ha_to_mn_ekey=bytes(16),
        ha_id=f"ha{ha}",
    )
    bs = BootstrapData(
        ip6_hoa=IPv6Address(f"2001:db8:1::{hoa6}") if hoa6 is not None else None,
        ip4_hoa=IPv4Address(f"192.0.2.{hoa4}") if hoa4 is not None else None,
    )
    return IssuedSA(sa, bs)


def check(store: SQLiteSAStore, now: datetime) -> None:
    # The SQL answer first: the view must not be consulted (or built) by it.
    want_hoas = store._hoas_in_use_sql(now)
    want_counts = store._count_by_ha_sql(now)
    assert store.hoas_in_use(now) == want_hoas
    assert store.count_by_ha(now) == want_counts
    # The HAC's one-look read of both views gives the same answers.
    assert store.live_summary(now) == (want_counts, want_hoas)
    # Each MN's live SAs (the supersede step), oldest first, as SQL has them.
    for mn in range(4):
        mn_id = f"mn{mn}@x"
        want = [(r.sa.spi, r.sa.validity_end.timestamp()) for r in store.live_for_mn(mn_id, now)]
        got = [(spi, end) for spi, end, _ in store.live_spis_for_mn(mn_id, now)]
        assert got == want, mn_id


_maybe = st.one_of(st.none(), st.integers(1, 3))
_op = st.tuples(
    st.sampled_from(
        ["add", "add", "add", "other-add", "other-replace", "remove", "other-remove", "expire"]
        + ["query"]
    ),
    st.integers(1, 6),  # spi: few values, so collisions are common
    st.integers(0, 3),  # mn
    st.integers(-3, 6),  # validity end offset
    _maybe,  # ip6 HoA
    _maybe,  # ip4 HoA
    st.integers(1, 2),  # ha
    st.sampled_from([0, 0, 1, 1, 2, 3, -1]),  # clock step (negative: an earlier instant)
)


@settings(max_examples=80, deadline=None)
@given(st.lists(_op, max_size=40))
def test_view_matches_sql(
    ops: list[tuple[str, int, int, int, int | None, int | None, int, int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sa.db"
        with SQLiteSAStore(path) as store, SQLiteSAStore(path) as other:
            t = 0
            for op, spi, mn, off, h6, h4, ha, step in ops:
                t += step
                now = at(t)
                if op == "add":
                    store.add(issued(spi, mn, t + off, h6, h4, ha), now=now)
                elif op == "other-add":
                    other.add(issued(spi, mn, t + off, h6, h4, ha), now=now)
                elif op == "other-replace":
                    # Two commits of another HAC before this one looks: the
                    # SPI's row gone and back with other columns (the change
                    # log names it twice; the view takes its row as it is now).
                    other.remove(spi)
                    other.add(issued(spi, (mn + 1) % 4, t + off + 1, h4, h6, 3 - ha), now=now)
                elif op == "remove":
                    store.remove(spi)
                elif op == "other-remove":
                    other.remove(spi)
                elif op == "expire":
                    store.expire(now)
                elif op == "query":
                    check(store, at(t + off))  # a later or earlier instant
                check(store, now)


def test_newest_holder_wins_and_survives_removal() -> None:
    with SQLiteSAStore(None) as s:
        s.add(issued(1, 1, 10, 5, None, 1), now=T0)
        s.add(issued(2, 2, 20, 5, None, 1), now=T0)
        s.add(issued(3, 3, 20, 5, 7, 2), now=T0)
        assert s.hoas_in_use(T0) == {"2001:db8:1::5": "mn3@x", "192.0.2.7": "mn3@x"}
        assert s.count_by_ha(T0) == {"ha1": 2, "ha2": 1}
        s.remove(3)
        assert s.hoas_in_use(T0) == {"2001:db8:1::5": "mn2@x"}
        assert s.hoas_in_use(at(15)) == {"2001:db8:1::5": "mn2@x"}
        s.remove(2)
        # at(15) dropped SA 1 from the view; an earlier instant is answered by SQL.
        assert s.hoas_in_use(at(15)) == {}
        assert s.hoas_in_use(T0) == {"2001:db8:1::5": "mn1@x"}
        assert s.count_by_ha(T0) == {"ha1": 1}


def test_other_handle_commits_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as hac1, SQLiteSAStore(path) as hac2:
        assert hac1.count_by_ha(T0) == {}
        hac2.add(issued(9, 1, 60, 1, None, 1), now=T0)
        assert hac1.count_by_ha(T0) == {"ha1": 1}
        assert hac1.hoas_in_use(T0) == {"2001:db8:1::1": "mn1@x"}
        hac2.remove(9)
        assert hac1.hoas_in_use(T0) == {}


def test_other_handle_commits_are_followed_not_rebuilt(tmp_path: Path) -> None:
    """Another HAC's commits reach the view through the change log (issue 9)."""
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as hac1, SQLiteSAStore(path) as hac2:
        hac1.add(issued(1, 1, 60, 1, None, 1), now=T0)
        _, table = hac1.live_summary(T0)
        view = hac1._view
        hac2.add(issued(2, 2, 60, 2, 3, 2), now=T0)
        hac2.retire(1, "test")
        hac1.add(issued(4, 4, 60, 4, None, 1), now=T0)  # an own write in between
        assert hac1.live_summary(T0) == (
            {"ha1": 1, "ha2": 1},
            {"2001:db8:1::2": "mn2@x", "192.0.2.3": "mn2@x", "2001:db8:1::4": "mn4@x"},
        )
        assert hac1._view is view  # followed, not rebuilt
        # The HoA table is the same object: the allocator follows its journal.
        assert hac1.live_summary(T0)[1] is table


def test_log_trimmed_past_a_reader_rebuilds(tmp_path: Path, monkeypatch: Any) -> None:
    from mipsec.plugins import sa_store_sqlite

    monkeypatch.setattr(sa_store_sqlite, "_LOG_KEEP", 1)
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as hac1, SQLiteSAStore(path) as hac2:
        assert hac1.count_by_ha(T0) == {}
        view = hac1._view
        for spi in range(10, 15):
            hac2.add(issued(spi, spi, 60, spi, None, 1), now=T0)
        hac2.expire(T0)  # trims the log to its last entry
        assert hac1.count_by_ha(T0) == {"ha1": 5}
        assert hac1._view is not view  # rebuilt: the entries it missed are gone
        assert len(hac1.hoas_in_use(T0)) == 5


_row = st.tuples(
    st.integers(1, 40),  # spi (deduplicated below)
    st.integers(0, 5),  # validity end
    st.integers(0, 3),  # mn
    st.integers(1, 2),  # ha
    _maybe,  # ip6 HoA
    _maybe,  # ip4 HoA
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_row, max_size=30, unique_by=lambda r: r[0]))
def test_bulk_load_equals_one_insert_per_row(
    rows: list[tuple[int, int, int, int, int | None, int | None]],
) -> None:
    """The view a start builds in one pass (``_load``: MNs with several live
    SAs, addresses with several holders) is the view that inserting the same
    rows one by one gives."""
    from mipsec.plugins.sa_store_sqlite import _LiveView

    view_rows = sorted(
        (
            spi,
            end,
            f"mn{mn}@x",
            f"ha{ha}",
            f"2001:db8:1::{h6}" if h6 is not None else None,
            f"192.0.2.{h4}" if h4 is not None else None,
        )
        for spi, end, mn, ha, h6, h4 in rows
    )
    view_rows.sort(key=lambda r: (r[1], r[0]))  # as the SELECT orders them
    bulk = _LiveView(view_rows, 0)
    one = _LiveView([], 0)
    for r in view_rows:
        one.insert(*r)
    assert bulk._rows == one._rows
    assert bulk._by_mn == one._by_mn
    assert bulk._best == one._best
    assert bulk._holders == one._holders
    assert bulk._by_ha == one._by_ha
    assert dict(bulk._hoa_mn.items()) == dict(one._hoa_mn.items())
    assert sorted(bulk._heap) == sorted(one._heap)


def test_a_view_built_after_sas_ended_loads_only_the_live_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HAC started after most of its SAs ended (down past their lifetime)
    builds its view from the live rows alone -- loading 100,000 ended ones to
    drop them at once cost 1.2 s of the start -- and still answers for an
    earlier instant, through SQL (the view's floor is the build instant)."""
    store = SQLiteSAStore(tmp_path / "sa.db")
    for spi in range(1, 6):
        assert store.add(issued(spi, spi % 4, 10, spi, None, 1), at(0))
    assert store.add(issued(9, 0, 100, 9, None, 2), at(0))
    loaded: list[int] = []

    class Counting(sa_store_sqlite._LiveView):
        def _load(self, rows: Any) -> None:
            rows = list(rows)
            loaded.extend(r[0] for r in rows)
            super()._load(rows)

    monkeypatch.setattr(sa_store_sqlite, "_LiveView", Counting)
    reopened = SQLiteSAStore(tmp_path / "sa.db")  # a restart: no view yet
    check(reopened, at(50))
    view = reopened._view
    assert view is not None and view.floor == at(50).timestamp()
    assert loaded == [9]  # the ended SAs were never loaded
    check(reopened, at(5))  # before the floor: SQL answers, all six live then
    assert reopened.count_by_ha(at(5)) == {"ha1": 5, "ha2": 1}
    assert reopened._view is view  # and the view was not rebuilt for it


def test_when_every_sa_has_ended_the_view_drops_them_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock stepped past every SA's end (NTP after a boot with a
    wrong clock, a suspended host): the view drops them all in one sweep, not
    one by one -- which held a HAC with 100,000 SAs ~300 ms, serving no one
    -- and answers as SQL does; the HoA table's readers rebuild, from
    nothing; SAs stored afterwards show as before."""
    store = SQLiteSAStore(tmp_path / "sa.db")
    for spi in range(1, 9):
        assert store.add(issued(spi, spi % 4, 10 + spi, spi, spi % 3 or None, spi % 2), at(0))
    check(store, at(1))
    table = store._view.hoa_table() if store._view is not None else None
    assert table is not None and len(table) > 0
    seen = table.seq
    discarded: list[int] = []
    real_discard = sa_store_sqlite._LiveView.discard

    def counting(self: Any, spi: int) -> None:
        discarded.append(spi)
        real_discard(self, spi)

    monkeypatch.setattr(sa_store_sqlite._LiveView, "discard", counting)
    check(store, at(3600))  # past every end
    assert discarded == []  # one sweep, no SA by SA
    assert store.count_by_ha(at(3600)) == {} and store.hoas_in_use(at(3600)) == {}
    assert len(table) == 0 and table.changes_since(seen) is None  # readers rebuild
    assert store.add(issued(20, 1, 7200, 1, 1, 1), at(3600))
    check(store, at(3601))
    assert store.count_by_ha(at(3601)) == {"ha1": 1}
    assert table.changes_since(table.seq - 2) is not None  # journalled again


def test_a_view_with_one_sa_left_still_drops_the_others_one_by_one(tmp_path: Path) -> None:
    """The sweep is for "every SA ended" alone: one live SA left, the
    others go as always, and the survivor stays."""
    store = SQLiteSAStore(tmp_path / "sa.db")
    for spi in range(1, 5):
        assert store.add(issued(spi, spi % 4, 10, spi, None, 1), at(0))
    assert store.add(issued(9, 0, 5000, 9, None, 2), at(0))
    check(store, at(1))
    check(store, at(3600))
    assert store.count_by_ha(at(3600)) == {"ha2": 1}
