"""SA stores (plugins/sa_store_sqlite.py): PROFILE §5 SPI uniqueness, RFC 6618 §5.7 data."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.control import ControlError
from mipsec.core.errors import LocalProtocolError
from mipsec.core.hookspecs import MipsecSpec, PluginContext, SAStore
from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import Suite
from mipsec.plugins import sa_store_sqlite
from mipsec.plugins.sa_store_sqlite import MemoryStoreFactory, SQLiteSAStore, SQLiteStoreFactory

T0 = datetime(2030, 1, 1, tzinfo=UTC)
IK1 = bytes(range(0x10, 0x24))  # 20 octets: HMAC-SHA1-96 ikey
IK2 = bytes(range(0x40, 0x54))
EK1 = bytes(range(0x80, 0x90))  # 16 octets: AES-128 ekey
EK2 = bytes(range(0xA0, 0xB0))


def issued(
    spi: int,
    mn_id: str = "alice@home.example",
    end: datetime = T0 + timedelta(hours=1),
    hoa6: str | None = "2001:db8:1::10",
    hoa4: str | None = None,
    ha_id: str = "ha1",
) -> IssuedSA:
    sa = SecurityAssociation(
        spi=spi,
        mn_id=mn_id,
        suite=Suite.AES_128_CBC_SHA,
        scope=1,
        validity_end=end,
        mn_to_ha_ikey=IK1,
        ha_to_mn_ikey=IK2,
        mn_to_ha_ekey=EK1,
        ha_to_mn_ekey=EK2,
        ha_id=ha_id,
    )
    bs = BootstrapData(
        haa_ip6=IPv6Address("2001:db8:1::1"),
        ip6_hoa=IPv6Address(hoa6) if hoa6 else None,
        ip4_hoa=IPv4Address(hoa4) if hoa4 else None,
        ip6_hnp=IPv6Network("2001:db8:1::/64"),
    )
    return IssuedSA(sa=sa, bootstrap=bs)


def full_issued() -> IssuedSA:
    """Every field set, none at its default."""
    sa = SecurityAssociation(
        spi=268_435_455,
        mn_id="Bob@Realm.Example",
        suite=Suite.AES_128_CBC_SHA256,
        scope=0,
        validity_end=T0 + timedelta(days=1),
        mn_to_ha_ikey=IK1[:16],
        ha_to_mn_ikey=IK2[:16],
        mn_to_ha_ekey=EK1,
        ha_to_mn_ekey=EK2,
        ha_id="ha-east",
    )
    bs = BootstrapData(
        haa_ip6=IPv6Address("2001:db8:1::1"),
        haa_ip4=IPv4Address("192.0.2.1"),
        port=4500,
        ip6_hoa=IPv6Address("2001:db8:1::abcd"),
        ip4_hoa=IPv4Address("192.0.2.77"),
        ip6_hnp=IPv6Network("2001:db8:1::/64"),
        ip4_hnp=IPv4Network("192.0.2.0/24"),
        dns_ip6=IPv6Address("2001:db8::53"),
        dns_ip4=IPv4Address("198.51.100.53"),
    )
    return IssuedSA(sa=sa, bootstrap=bs)


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLiteSAStore]:
    s = SQLiteSAStore(tmp_path / "sa.db" if request.param == "sqlite" else None)
    yield s
    s.close()


def test_is_an_sastore(store: SQLiteSAStore) -> None:
    assert isinstance(store, SAStore)


def test_roundtrip_every_field(store: SQLiteSAStore) -> None:
    x = full_issued()
    assert store.add(x, now=T0)
    assert store.get(x.sa.spi, T0) == x  # dataclass equality includes the keys


def test_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    x = full_issued()
    with SQLiteSAStore(path) as s:
        assert s.add(x, now=T0)
    with SQLiteSAStore(path) as s:
        got = s.get(x.sa.spi, T0)
        assert got == x
        assert got is not None and got.sa.mn_to_ha_ekey == EK1
        # Uniqueness survives the restart too.
        assert not s.add(issued(x.sa.spi), now=T0)


def test_stored_format(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as s:
        s.add(full_issued(), now=T0)
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT validity_end, ip6_hoa, suite, sa_keys FROM issued_sa").fetchone()
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        meta = dict(conn.execute("SELECT name, value FROM store_meta").fetchall())
    finally:
        conn.close()
    assert row[:3] == (int((T0 + timedelta(days=1)).timestamp()), "2001:db8:1::abcd", 0x3C)
    # Wrapped by default: format octet 1, 12-octet nonce, 4 lengths + 64 key octets, 16-octet tag.
    assert row[3][0] == 1 and len(row[3]) == 1 + 12 + 4 + 64 + 16
    assert meta["key_mode"] == "aes-256-gcm" and len(meta["key_check"]) == 12 + 16
    assert stat.S_IMODE((tmp_path / "sa.db.key").stat().st_mode) == 0o600


def test_same_spi_refused_while_live_and_accepted_after_expiry(store: SQLiteSAStore) -> None:
    a = issued(7, mn_id="a@x", end=T0 + timedelta(seconds=60))
    b = issued(7, mn_id="b@x", end=T0 + timedelta(seconds=600))
    assert store.add(a, now=T0)
    assert not store.add(b, now=T0)
    assert not store.add(b, now=T0 + timedelta(seconds=59))
    got = store.get(7, T0)
    assert got is not None and got.sa.mn_id == "a@x"  # the refused add stored nothing
    # At validity end the SA is expired (expire(): validity end <= now): SPI free again.
    assert store.add(b, now=T0 + timedelta(seconds=60))
    got = store.get(7, T0 + timedelta(seconds=60))
    assert got is not None and got.sa.mn_id == "b@x"


def test_add_uses_clock_when_no_now(tmp_path: Path) -> None:
    now = [T0]
    s = SQLiteSAStore(None, clock=lambda: now[0])
    assert s.add(issued(9, end=T0 + timedelta(seconds=10)))
    assert not s.add(issued(9))
    now[0] = T0 + timedelta(seconds=10)
    assert s.add(issued(9, mn_id="new@x"))
    s.close()


def test_two_handles_on_one_file_share_the_spi_space(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with SQLiteSAStore(path) as hac1, SQLiteSAStore(path) as hac2:
        assert hac1.add(issued(42), now=T0)
        assert not hac2.add(issued(42, mn_id="other@x"), now=T0)
        assert hac2.get(42, T0) is not None


def test_get_never_returns_expired(store: SQLiteSAStore) -> None:
    end = T0 + timedelta(seconds=30)
    store.add(issued(3, end=end), now=T0)
    assert store.get(3, end - timedelta(microseconds=1)) is not None
    assert store.get(3, end) is None
    assert store.get(3, end + timedelta(days=1)) is None
    assert store.get(4, T0) is None


def test_expire_some_deletes_at_most_limit_oldest_first_without_unwrapping(
    store: SQLiteSAStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The roles' expiry timers: bounded batches (a call costs O(limit), not
    O(expired SAs)), the oldest first, the live view following, and no key
    unwrapped (the keys of an SA that is going are never needed)."""
    for spi in range(1, 8):
        end = T0 + timedelta(seconds=10 * (8 - spi))  # SPI 7 ends first
        store.add(issued(spi, f"m{spi}@x", end, f"2001:db8:1::{spi:x}"), T0)
    store.add(issued(9, "live@x", T0 + timedelta(hours=1), "2001:db8:1::9"), T0)
    store.retire(1, "superseded")  # its SPI stays reserved until its old end
    assert store.live_summary(T0) is not None  # the HAC's in-memory view, built
    now = T0 + timedelta(seconds=70)

    def no_unwrap(*args: object) -> None:
        raise AssertionError("a key was unwrapped")

    monkeypatch.setattr(store._codec, "open", no_unwrap)
    first = store.expire_some(now, 4)
    assert first == [
        (7, "m7@x", T0 + timedelta(seconds=10)),
        (6, "m6@x", T0 + timedelta(seconds=20)),
        (5, "m5@x", T0 + timedelta(seconds=30)),
        (4, "m4@x", T0 + timedelta(seconds=40)),
    ]
    assert [spi for spi, _, _ in store.expire_some(now, 4)] == [3, 2]  # 1 is retired
    assert store.expire_some(now, 4) == []
    assert store.count_by_ha(now) == {"ha1": 1}
    assert store.hoas_in_use(now) == {"2001:db8:1::9": "live@x"}
    # The retired SPI was freed with them (its old validity end passed).
    assert store.add(issued(1, "again@x", T0 + timedelta(hours=2), "2001:db8:1::a"), now)


def test_expire_returns_expired_and_frees_hoa(store: SQLiteSAStore) -> None:
    store.add(issued(1, "a@x", T0 + timedelta(seconds=20), "2001:db8:1::a", "192.0.2.10"), T0)
    store.add(issued(2, "b@x", T0 + timedelta(seconds=10), "2001:db8:1::b"), T0)
    store.add(issued(3, "c@x", T0 + timedelta(seconds=99), "2001:db8:1::c", ha_id="ha2"), T0)
    assert store.hoas_in_use(T0) == {
        "2001:db8:1::a": "a@x",
        "192.0.2.10": "a@x",
        "2001:db8:1::b": "b@x",
        "2001:db8:1::c": "c@x",
    }
    assert store.count_by_ha(T0) == {"ha1": 2, "ha2": 1}
    now = T0 + timedelta(seconds=20)
    gone = store.expire(now)
    assert [x.sa.spi for x in gone] == [2, 1]  # ordered by validity end
    assert gone[1].bootstrap.ip4_hoa == IPv4Address("192.0.2.10")
    assert store.expire(now) == []
    assert store.hoas_in_use(now) == {"2001:db8:1::c": "c@x"}
    assert store.count_by_ha(now) == {"ha2": 1}
    assert [x.sa.spi for x in store.live(now)] == [3]
    # hoas_in_use/count_by_ha/live ignore an expired SA even before expire() runs
    later = T0 + timedelta(seconds=100)
    assert store.hoas_in_use(later) == {}
    assert store.count_by_ha(later) == {}
    assert store.live(later) == []


def test_remove(store: SQLiteSAStore) -> None:
    x = issued(11)
    store.add(x, T0)
    assert store.remove(11) == x
    assert store.remove(11) is None
    assert store.get(11, T0) is None
    assert store.add(issued(11), T0)


def test_live_sorted(store: SQLiteSAStore) -> None:
    for spi, sec in [(5, 30), (4, 10), (6, 10)]:
        store.add(issued(spi, end=T0 + timedelta(seconds=sec)), T0)
    assert [x.sa.spi for x in store.live(T0)] == [4, 6, 5]


def test_fractional_validity_end_rounds_down(store: SQLiteSAStore) -> None:
    store.add(issued(8, end=T0 + timedelta(seconds=5, microseconds=900_000)), T0)
    got = store.get(8, T0)
    assert got is not None and got.sa.validity_end == T0 + timedelta(seconds=5)


def test_rejects_naive_datetimes_and_bad_spi(store: SQLiteSAStore) -> None:
    naive = datetime(2030, 1, 1)  # noqa: DTZ001 - on purpose
    with pytest.raises(LocalProtocolError, match="validity_end"):
        store.add(issued(1, end=naive), T0)
    with pytest.raises(LocalProtocolError, match="now"):
        store.get(1, naive)
    for spi in (0, 268_435_456):
        with pytest.raises(LocalProtocolError, match="spi"):
            store.add(issued(spi), T0)
    assert store.live(T0) == []


def test_repr_of_loaded_sa_has_no_key(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as s:
        s.add(full_issued(), T0)
    with SQLiteSAStore(path) as s:
        got = s.get(268_435_455, T0)
        text = repr(got) + str(got) + repr(s)
    assert got is not None
    for key in (IK1[:16], IK2[:16], EK1, EK2):
        assert key.hex() not in text
        assert repr(key) not in text
    assert "mn_id='Bob@Realm.Example'" in text


def test_file_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        with SQLiteSAStore(path) as s:
            s.add(issued(1), T0)
            wal = Path(str(path) + "-wal")
            assert wal.exists()
            assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_schema_version_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    SQLiteSAStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    ctx = PluginContext(role="hac", base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"^path: .*schema version 99"):
        SQLiteStoreFactory().create({"path": "sa.db"}, ctx)


def test_factories(tmp_path: Path) -> None:
    ctx = PluginContext(role="hac", base_dir=tmp_path)
    s = SQLiteStoreFactory().create({"path": "sub.db"}, ctx)
    assert s.path == tmp_path / "sub.db"  # relative to the config file's directory
    s.close()
    assert (tmp_path / "sub.db").exists()
    with pytest.raises(ValueError, match=r"^path: field required$"):
        SQLiteStoreFactory().create({}, ctx)
    with pytest.raises(ValueError, match=r"^bogus: extra inputs are not permitted$"):
        SQLiteStoreFactory().create({"path": "x.db", "bogus": 1}, ctx)
    with pytest.raises(ValueError, match=r"^path: cannot open"):
        SQLiteStoreFactory().create({"path": "no/such/dir/x.db"}, ctx)
    (tmp_path / "junk.db").write_bytes(b"this is not a database file at all" * 100)
    (tmp_path / "junk.db").chmod(0o600)
    with pytest.raises(ValueError, match=r"^path: cannot open"):
        SQLiteStoreFactory().create({"path": "junk.db"}, ctx)
    m = MemoryStoreFactory().create({}, ctx)
    assert m.add(issued(1), T0) and m.path is None
    m.close()
    with pytest.raises(ValueError, match=r"^path: extra inputs"):
        MemoryStoreFactory().create({"path": "x"}, ctx)


def test_through_pluggy(tmp_path: Path) -> None:
    pm = pluggy.PluginManager("mipsec")
    pm.add_hookspecs(MipsecSpec)
    pm.register(sa_store_sqlite)
    factories = [f for group in pm.hook.mipsec_sa_stores() for f in group]
    by_name = {f.name: f for f in factories}
    assert set(by_name) == {"sqlite", "memory"}
    ctx = PluginContext(role="hac", base_dir=tmp_path)
    s = by_name["sqlite"].create({"path": "p.db"}, ctx)
    assert isinstance(s, SAStore) and s.add(issued(1))  # clock: real time, before T0
    s.close()
    eps = {e.name: e.value for e in entry_points(group="mipsec")}
    assert eps["sa_store_sqlite"] == "mipsec.plugins.sa_store_sqlite"


# Model-based property: the store agrees with a dict of spi -> validity end.
_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "expire", "remove"]),
        st.integers(1, 4),  # spi: few values so collisions are common
        st.integers(-5, 5),  # validity end offset from now
        st.integers(0, 3),  # clock advance
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_model(ops: list[tuple[str, int, int, int]]) -> None:
    s = SQLiteSAStore(None)
    model: dict[int, int] = {}
    t = 0

    def at(sec: int) -> datetime:
        return T0 + timedelta(seconds=sec)

    for op, spi, off, adv in ops:
        t += adv
        now = at(t)
        if op == "add":
            expect = spi not in model or model[spi] <= t
            assert s.add(issued(spi, end=at(t + off)), now=now) is expect
            if expect:
                model[spi] = t + off
        elif op == "expire":
            gone = {x.sa.spi for x in s.expire(now)}
            assert gone == {k for k, v in model.items() if v <= t}
            model = {k: v for k, v in model.items() if v > t}
        else:
            r = s.remove(spi)
            assert (r is not None) == (spi in model)
            model.pop(spi, None)
        live = {x.sa.spi: x.sa.validity_end for x in s.live(now)}
        assert live == {k: at(v) for k, v in model.items() if v > t}
    s.close()


# ---------------------------------------------------------------- retired SAs


def test_retire_reserves_the_spi_until_its_old_validity_end(store: SQLiteSAStore) -> None:
    end = T0 + timedelta(seconds=60)
    x = issued(21, mn_id="a@x", end=end)
    assert store.add(x, T0)
    assert store.retire(21, "superseded") == x
    assert store.retire(21, "superseded") is None
    assert store.get(21, T0) is None and store.live_for_mn("a@x", T0) == []
    assert not store.add(issued(21, mn_id="b@x"), T0)  # reserved, not free
    assert store.retired_unconfirmed(T0) == [(21, "a@x", "ha1", end)]
    store.confirm_retired(21)
    assert store.retired_unconfirmed(T0) == []
    assert not store.add(issued(21, mn_id="b@x"), T0)  # still reserved after confirmation
    store.expire(end)
    assert store.add(issued(21, mn_id="b@x", end=end + timedelta(seconds=60)), end)


def test_retire_record_is_retire_without_the_keys(store: SQLiteSAStore) -> None:
    """The HAC's fast path on every re-bootstrap: the same retirement as
    ``retire`` (row gone, SPI reserved, withdrawal owed, the live view
    following), answering who held it instead of the unwrapped SA."""
    end = T0 + timedelta(seconds=60)
    assert store.add(issued(31, mn_id="a@x", end=end, ha_id="ha2"), T0)
    assert store.add(issued(32, mn_id="a@x", end=end + timedelta(seconds=1)), T0)
    assert [s for s, *_ in store.live_spis_for_mn("a@x", T0)] == [31, 32]  # the view, built
    assert store.retire_record(31, "superseded") == ("a@x", "ha2", end)
    assert store.retire_record(31, "superseded") is None
    assert [s for s, *_ in store.live_spis_for_mn("a@x", T0)] == [32]
    assert store.get(31, T0) is None and not store.add(issued(31, mn_id="b@x"), T0)
    assert store.retired_unconfirmed(T0) == [(31, "a@x", "ha2", end)]


def test_retire_record_answers_for_a_row_whose_keys_fail(tmp_path: Path) -> None:
    """A row altered on disk: ``retire`` takes it out but answers None (its
    SA is never handed out); ``retire_record`` names its MN and HA, so the
    HAC withdraws the SPI from that HA instead of leaving it there."""
    with SQLiteSAStore(tmp_path / "sa.db") as s:
        assert s.add(issued(41, mn_id="a@x"), T0) and s.add(issued(42, mn_id="a@x"), T0)
        s._conn.execute("UPDATE issued_sa SET mn_id = 'b@x'")  # keys bound to the old row
        assert s.retire(41, "superseded") is None
        assert s.retire_record(42, "superseded") == ("b@x", "ha1", T0 + timedelta(hours=1))
        assert [r[0] for r in s.retired_unconfirmed(T0)] == [41, 42]


def test_live_for_mn_oldest_first(store: SQLiteSAStore) -> None:
    store.add(issued(31, mn_id="a@x", end=T0 + timedelta(seconds=90)), T0)
    store.add(issued(32, mn_id="a@x", end=T0 + timedelta(seconds=30)), T0)
    store.add(issued(33, mn_id="b@x", end=T0 + timedelta(seconds=10)), T0)
    assert [x.sa.spi for x in store.live_for_mn("a@x", T0)] == [32, 31]
    assert [x.sa.spi for x in store.live_for_mn("a@x", T0 + timedelta(seconds=30))] == [31]


# ------------------------------------------------- fast paths of the hot path


def test_live_spis_for_mn_matches_live_for_mn(store: SQLiteSAStore) -> None:
    store.add(issued(31, mn_id="a@x", end=T0 + timedelta(seconds=90)), T0)
    store.add(issued(32, mn_id="a@x", end=T0 + timedelta(seconds=30), ha_id="ha2"), T0)
    store.add(issued(33, mn_id="b@x", end=T0 + timedelta(seconds=10)), T0)
    t30 = (T0 + timedelta(seconds=30)).timestamp()
    t90 = (T0 + timedelta(seconds=90)).timestamp()
    assert store.live_spis_for_mn("a@x", T0) == [(32, t30, "ha2"), (31, t90, "ha1")]
    assert store.live_spis_for_mn("a@x", T0 + timedelta(seconds=30)) == [(31, t90, "ha1")]
    assert [(s, h) for s, _e, h in store.live_spis_for_mn("a@x", T0)] == [
        (x.sa.spi, x.sa.ha_id) for x in store.live_for_mn("a@x", T0)
    ]


# The per-MN index of the live view (no SQL on the hot path) against the SQL
# answer, through every kind of write, including a second HAC process's
# commits to a shared file (the view follows them through the change log).
_mn_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "add-other", "supersede", "retire", "discard", "expire"]),
        st.integers(1, 6),  # spi
        st.sampled_from(["a@x", "b@x", "c@x"]),  # mn_id
        st.integers(-3, 6),  # validity end offset from now
        st.integers(0, 2),  # clock advance
    ),
    max_size=40,
)


def _spis_sql(s: SQLiteSAStore, mn_id: str, now: datetime) -> list[tuple[int, float, str]]:
    return s._conn.execute(
        "SELECT spi, validity_end, ha_id FROM issued_sa WHERE mn_id = ? AND validity_end > ? "
        "ORDER BY validity_end, spi",
        (mn_id, now.timestamp()),
    ).fetchall()


@settings(max_examples=60, deadline=None)
@given(_mn_ops)
def test_live_spis_for_mn_view_agrees_with_sql(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, str, int, int]]
) -> None:
    path = tmp_path_factory.mktemp("view") / "sa.db"
    s, other = SQLiteSAStore(path), SQLiteSAStore(path)
    t = 0
    try:
        for op, spi, mn_id, off, adv in ops:
            t += adv
            now = T0 + timedelta(seconds=t)
            x = issued(spi, mn_id=mn_id, end=now + timedelta(seconds=off), ha_id=f"ha{spi % 2}")
            if op == "add":
                s.add(x, now)
            elif op == "add-other":
                other.add(x, now)
            elif op == "supersede":  # the HAC's re-bootstrap: add, then retire the older SAs
                old = tuple(v[0] for v in s.live_spis_for_mn(mn_id, now))
                if s.add(x, now):
                    for o in old:
                        s.retire(o, "superseded")
            elif op == "retire":
                s.retire(spi, "superseded")
            elif op == "discard":
                s.discard(spi)
            else:
                s.expire(now)
            for m in ("a@x", "b@x", "c@x"):
                assert s.live_spis_for_mn(m, now) == _spis_sql(s, m, now)
            assert s._view is not None  # the answers above came from the view
    finally:
        s.close()
        other.close()


def test_discard_is_remove_without_reading_back(store: SQLiteSAStore) -> None:
    store.add(issued(41, mn_id="a@x"), T0)
    assert store.hoas_in_use(T0) == {"2001:db8:1::10": "a@x"}  # the live view is built
    assert store.discard(41) is True
    assert store.discard(41) is False
    assert store.get(41, T0) is None and store.hoas_in_use(T0) == {}
    assert store.add(issued(41), T0)  # not retired: the SPI is free again


def test_discard_many_is_one_delete_for_many_spis(store: SQLiteSAStore) -> None:
    for spi in (41, 42, 43):
        store.add(issued(spi, mn_id=f"m{spi}@x", hoa6=f"2001:db8:1::{spi}"), T0)
    assert len(store.hoas_in_use(T0)) == 3  # the live view is built
    # 44 was never stored; a long list crosses the 500-parameter statement limit.
    assert store.discard_many([41, 43, 44, *range(1000, 1700)]) == 2
    assert store.get(41, T0) is None and store.get(43, T0) is None
    assert store.get(42, T0) is not None
    assert store.hoas_in_use(T0) == {"2001:db8:1::42": "m42@x"}
    assert store.discard_many([]) == 0


def test_operator_listing_reads_columns_not_keys(store: SQLiteSAStore) -> None:
    """``mipsec sas``/``status`` at 100k SAs must not unwrap 100k keys: the
    listing and the counts come from the columns, and give what ``live`` gives."""
    from mipsec.core.roles.hac_ops import _listing_row, sa_row

    full = full_issued()
    store.add(full, T0)
    store.add(issued(61, mn_id="a@x"), T0)
    store.add(issued(62, mn_id="b@x", end=T0 + timedelta(seconds=5), hoa6=None), T0)
    listing = store.live_listing(T0)
    assert sorted(r[0] for r in listing) == sorted(x.sa.spi for x in store.live(T0))
    (row,) = store.live_listing(T0, "Bob@Realm.Example")
    assert _listing_row(row, "psk") == sa_row(full, "psk")
    by_spi = {x.sa.spi: x for x in store.live(T0)}
    for r in listing:
        assert _listing_row(r, "-") == sa_row(by_spi[r[0]], "-")
    assert sorted(store.live_counts(T0)) == [
        ("ha-east", int(Suite.AES_128_CBC_SHA256), 1),
        ("ha1", int(Suite.AES_128_CBC_SHA), 2),
    ]
    later = T0 + timedelta(seconds=5)  # spi 62 is past its validity end
    assert [r[0] for r in store.live_listing(later, "b@x")] == []
    assert sorted(store.live_counts(later))[1] == ("ha1", int(Suite.AES_128_CBC_SHA), 1)


def test_address_text_memo_by_identity_and_value() -> None:
    # The memo answers by identity first (the configuration's objects recur),
    # then by value; the same integer as IPv4 and IPv6 are different texts.
    a6, a4 = IPv6Address(1), IPv4Address(1)
    for _ in range(2):
        assert sa_store_sqlite._text(a6) == "::1"
        assert sa_store_sqlite._text(a4) == "0.0.0.1"
        assert sa_store_sqlite._text(IPv6Address("::1")) == "::1"  # equal, not identical
        assert sa_store_sqlite._text(IPv6Network("2001:db8::/64")) == "2001:db8::/64"
    assert sa_store_sqlite._text(None) is None
    held = sa_store_sqlite._text_by_id[id(a6)]
    assert held[0] is a6  # the entry keeps its object: its id is not reused while cached


# ------------------------------------------------ delivery (issue 6, HAC crash)


def test_sas_stored_by_a_tracking_hac_are_pending_until_delivered(store: SQLiteSAStore) -> None:
    later = T0 + timedelta(seconds=1)
    store.add(issued(101, mn_id="a@x"), T0)  # not tracking: never pending
    assert store.undelivered(later) == []
    store.track_delivery = True
    store.add(issued(102, mn_id="b@x"), T0)
    assert store.add(issued(103, mn_id="a@x"), T0)
    # Stored at T0: pending from T0 on, listed once the cutoff is past it.
    assert store.undelivered(T0) == []
    assert store.undelivered(later) == [102, 103]
    store.delivered_many([103, 999])  # an SPI no longer held is ignored
    assert store.undelivered(later) == [102]
    store.retire(101, "superseded")  # never pending: retiring it changes nothing here
    assert store.undelivered(later) == [102]
    store.retire(102, "undelivered")
    assert store.undelivered(later) == []
    with pytest.raises(LocalProtocolError, match="stored_before"):
        store.undelivered(datetime(2030, 1, 1))  # noqa: DTZ001 (naive on purpose)


def test_undelivered_sweep_reads_the_pending_index_not_the_table(store: SQLiteSAStore) -> None:
    """The sweep runs at start and on every expiry run: with 100k live SAs it
    must cost what the few pending rows cost (the partial index), never a scan."""
    from mipsec.plugins.sa_store_sqlite import _UNDELIVERED

    plan = " ".join(
        str(r[-1]) for r in store._conn.execute(f"EXPLAIN QUERY PLAN {_UNDELIVERED}", (0.0,))
    )
    assert "SEARCH issued_sa USING COVERING INDEX issued_sa_pending" in plan, plan
    assert "SCAN" not in plan, plan


def test_delivery_marks_are_not_changes_a_sharing_hac_reads(tmp_path: Path) -> None:
    """Clearing ``pending`` is invisible to the change log (other HACs'
    views follow it), and another HAC's view stays right."""
    a, b = SQLiteSAStore(tmp_path / "sa.db"), SQLiteSAStore(tmp_path / "sa.db")
    try:
        a.track_delivery = True
        a.add(issued(111, mn_id="a@x"), T0)
        assert b.count_by_ha(T0) == {"ha1": 1}
        log_rows = a._conn.execute("SELECT count(*) FROM issued_sa_log").fetchone()[0]
        a.delivered_many([111])
        assert a._conn.execute("SELECT count(*) FROM issued_sa_log").fetchone()[0] == log_rows
        assert b.undelivered(T0 + timedelta(seconds=1)) == []
        assert b.count_by_ha(T0) == {"ha1": 1}
    finally:
        a.close()
        b.close()


def test_store_made_before_pending_gets_the_column_and_the_narrower_trigger(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sa.db"
    SQLiteSAStore(path).close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP INDEX issued_sa_pending; ALTER TABLE issued_sa DROP COLUMN pending;"
        "DROP TRIGGER issued_sa_log_upd;"
        "CREATE TRIGGER issued_sa_log_upd AFTER UPDATE ON issued_sa "
        "BEGIN INSERT INTO issued_sa_log (spi) VALUES (OLD.spi); END;"
    )
    conn.execute(
        "INSERT INTO issued_sa (spi, mn_id, suite, scope, validity_end, ha_id, port, sa_keys) "
        "VALUES (5, 'old@x', 1, 1, 0, 'ha1', 1, x'00')"
    )
    conn.commit()
    conn.close()
    s = SQLiteSAStore(path)
    try:
        cols = {r[1] for r in s._conn.execute("PRAGMA table_info(issued_sa)")}
        assert "pending" in cols
        assert s._conn.execute("SELECT pending FROM issued_sa WHERE spi = 5").fetchone() == (None,)
        trig = s._conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'issued_sa_log_upd'"
        ).fetchone()[0]
        assert "UPDATE OF spi," in trig
        s.track_delivery = True
        s.add(issued(6), T0)
        assert s.undelivered(T0 + timedelta(seconds=1)) == [6]
    finally:
        s.close()


def test_add_many_is_add_of_each_in_one_transaction(store: SQLiteSAStore) -> None:
    """The HA's group commit (issue 9): free SPIs stored and in the live view,
    a held or retired SPI refused (False) with nothing stored for it, and an
    invalid SPI refuses the whole group before anything is written."""
    store.add(issued(101, mn_id="held@x"), T0)
    store.add(issued(102, mn_id="old@x"), T0)
    store.retire(102, "superseded")
    assert store.count_by_ha(T0) == {"ha1": 1}  # the live view is built
    got = store.add_many(
        [issued(103, mn_id="a@x"), issued(101), issued(102), issued(104, mn_id="b@x")], T0
    )
    assert got == [True, False, False, True]
    assert [x.sa.spi for x in store.live(T0)] == [101, 103, 104]
    assert store.get(101, T0).sa.mn_id == "held@x"  # type: ignore[union-attr]
    assert store.count_by_ha(T0) == {"ha1": 3}
    with pytest.raises(LocalProtocolError, match="spi"):
        store.add_many([issued(105), issued(0)], T0)
    assert store.get(105, T0) is None


class _FailingCommit:
    """The store's connection, whose next COMMIT fails the way a full disk
    makes it fail (SQLite may leave the transaction open)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.fail_next_commit = True

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.fail_next_commit:
            self.fail_next_commit = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


def test_a_failed_commit_leaves_no_transaction_open(store: SQLiteSAStore) -> None:
    """A COMMIT that fails (disk full) is rolled back: nothing of it is
    stored or in the live view, and the next write works once space is back
    -- not "cannot start a transaction within a transaction" for good."""
    store.add(issued(101, mn_id="a@x"), T0)
    assert store.count_by_ha(T0) == {"ha1": 1}  # the live view is built
    real = store._conn
    store._conn = _FailingCommit(real)  # type: ignore[assignment]
    try:
        with pytest.raises(sqlite3.OperationalError, match="full"):
            store.retire(101, "superseded")
        assert not real.in_transaction
        assert [x.sa.spi for x in store.live(T0)] == [101]
        assert store.count_by_ha(T0) == {"ha1": 1}
        assert store.retired_unconfirmed(T0) == []
        # Space is back: the same write goes through.
        assert store.retire(101, "superseded") is not None
        assert [x.sa.spi for x in store.live(T0)] == []
        assert [r[0] for r in store.retired_unconfirmed(T0)] == [101]
    finally:
        store._conn = real


def test_lookups_of_one_mn_seek_an_index_not_scan_the_table(tmp_path: Path) -> None:
    """Cost per request must not grow with the number of MNs: ``revoke`` and
    ``sas --mn-id`` (any spelling of the realm) and the exact-case lookups
    each read one MN's rows through ``issued_sa_mn_nocase``.  Before
    2026-12-05 the any-spelling lookup scanned every live SA (26 ms at
    100,000 on the bench machine; 0.1 ms with the index)."""
    s = SQLiteSAStore(tmp_path / "sa.db")
    try:
        for i in range(20):
            hoa6 = f"2001:db8:1::{i + 16:x}"
            s.add(issued(0x100 + i, mn_id=f"mn{i}@home.example", hoa6=hoa6), T0)
        seen: list[str] = []
        s._conn.set_trace_callback(seen.append)
        s.live_for_nai("mn3@HOME.example", T0)
        s.live_listing(T0, "mn3@Home.Example")
        s.live_for_mn("mn3@home.example", T0)
        s._live_view = lambda now: None  # type: ignore[method-assign]  # the SQL fallback
        s.live_spis_for_mn("mn3@home.example", T0)
        s._conn.set_trace_callback(None)
        selects = [q for q in seen if q.lstrip().startswith("SELECT") and "WHERE mn_id" in q]
        assert len(selects) == 4, seen
        for q in selects:
            plan = " ".join(r[3] for r in s._conn.execute("EXPLAIN QUERY PLAN " + q))
            assert "USING INDEX issued_sa_mn_nocase" in plan, (q, plan)
    finally:
        s.close()


def test_an_older_mipsec_sharing_the_file_during_the_index_change(tmp_path: Path) -> None:
    """Two HACs on one store file, one from before 2026-12-05: opening the
    file, this store drops the older binary ``issued_sa_mn_id`` index; the
    older HAC recreates it at its next start (``CREATE INDEX IF NOT
    EXISTS``).  Both indexes then exist side by side: rows written here are
    found by the older one's lookup, every per-MN lookup here still seeks an
    index (no table scan), and this store's next open drops the older index
    again."""
    path = tmp_path / "sa.db"
    s = SQLiteSAStore(path)
    try:
        s.add(issued(0x300, mn_id="mn0@home.example", hoa6="2001:db8:1::30"), T0)
        older = sqlite3.connect(path, isolation_level=None)  # the older HAC's start
        older.execute("CREATE INDEX IF NOT EXISTS issued_sa_mn_id ON issued_sa (mn_id)")
        s2 = SQLiteSAStore(path)  # a third HAC, or this one restarted, meanwhile
        s2.add(issued(0x301, mn_id="mn1@home.example", hoa6="2001:db8:1::31"), T0)
        s2.close()
        older.execute("CREATE INDEX IF NOT EXISTS issued_sa_mn_id ON issued_sa (mn_id)")
        s.add(issued(0x302, mn_id="mn1@home.example", hoa6="2001:db8:1::31"), T0)
        # The older HAC's own lookup, through its index, sees the rows.
        q = "SELECT spi FROM issued_sa WHERE mn_id = ? ORDER BY spi"
        assert older.execute(q, ("mn1@home.example",)).fetchall() == [(0x301,), (0x302,)]
        plan = " ".join(r[3] for r in older.execute("EXPLAIN QUERY PLAN " + q, ("x",)))
        assert "USING" in plan and "INDEX issued_sa_mn_" in plan, plan
        older.close()
        names = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master")}
        assert {"issued_sa_mn_id", "issued_sa_mn_nocase"} <= names
        assert sorted(x.sa.spi for x in s.live_for_nai("mn1@HOME.example", T0)) == [0x301, 0x302]
        seen: list[str] = []
        s._conn.set_trace_callback(seen.append)
        s.live_for_nai("mn1@HOME.example", T0)
        s.live_listing(T0, "mn1@Home.Example")
        s.live_for_mn("mn1@home.example", T0)
        s._conn.set_trace_callback(None)
        selects = [q for q in seen if q.lstrip().startswith("SELECT") and "WHERE mn_id" in q]
        assert len(selects) == 3, seen
        for q in selects:
            plan = " ".join(r[3] for r in s._conn.execute("EXPLAIN QUERY PLAN " + q))
            assert "USING INDEX issued_sa_mn_" in plan and "SCAN issued_sa" not in plan, plan
    finally:
        s.close()
    s3 = SQLiteSAStore(path)
    try:
        names = {r[0] for r in s3._conn.execute("SELECT name FROM sqlite_master")}
        assert "issued_sa_mn_id" not in names and "issued_sa_mn_nocase" in names
        assert sorted(x.sa.spi for x in s3.live(T0)) == [0x300, 0x301, 0x302]
    finally:
        s3.close()


def test_live_counts_apart_counts_on_its_own_connection(tmp_path: Path) -> None:
    """What ``mipsec status`` counts in a worker thread: the committed live
    SAs, the same figures as ``live_counts``, read on a connection of its own
    -- so it neither needs the store's connection (owned by the event loop's
    thread) nor waits while that one holds a write open."""
    s = SQLiteSAStore(tmp_path / "sa.db")
    try:
        for i, mn in enumerate(("a@x", "b@x", "c@x")):
            s.add(issued(0x200 + i, mn_id=mn, hoa6=f"2001:db8:1::{i + 16:x}"), T0)
        want = sorted(s.live_counts(T0))
        got: list[object] = []
        with s.transaction():
            s.add(issued(0x2FF, mn_id="d@x", hoa6="2001:db8:1::ff"), T0)  # not committed
            t = threading.Thread(target=lambda: got.append(s.live_counts_apart(T0)))
            t.start()
            t.join(timeout=30)
        assert not t.is_alive() and len(got) == 1
        assert sorted(got[0]) == want and sum(n for *_, n in want) == 3
        assert sorted(s.live_counts_apart(T0) or []) == sorted(s.live_counts(T0))  # 4 now
        assert sorted(s.live_listing_apart(T0) or []) == sorted(s.live_listing(T0))
        assert len(s.live_listing(T0)) == 4
    finally:
        s.close()
    memory = SQLiteSAStore(None)  # a memory store: read on the loop
    assert memory.live_counts_apart(T0) is None and memory.live_listing_apart(T0) is None


def test_status_counts_the_live_sas_off_the_event_loop(tmp_path: Path) -> None:
    """92 ms at 100,000 SAs: not on the HAC's event loop (``HacOps._live_counts``)."""
    from types import SimpleNamespace

    from mipsec.core.roles.hac_ops import HacOps, _MethodTracker

    s = SQLiteSAStore(tmp_path / "sa.db")
    try:
        s.add(issued(0x301, mn_id="a@x", hoa6="2001:db8:1::31"), T0)
        threads: list[threading.Thread] = []
        real = s.live_counts_apart

        def spy(now: datetime) -> object:
            threads.append(threading.current_thread())
            return real(now)

        s.live_counts_apart = spy  # type: ignore[method-assign, assignment]
        ops = object.__new__(HacOps)
        ops.svc = SimpleNamespace(store=s)  # type: ignore[assignment]
        ops.tracker = _MethodTracker()
        total, by_ha, _, by_method = asyncio.run(ops._live_counts())
        assert total == 1 and by_ha == {"ha1": 1} and by_method == {"-": 1}
        assert len(threads) == 1 and threads[0] is not threading.main_thread()
        # ``sas``: every live SA read apart too; one MN's on the loop (a seek).
        real_listing = s.live_listing_apart

        def spy_listing(now: datetime) -> object:
            threads.append(threading.current_thread())
            return real_listing(now)

        s.live_listing_apart = spy_listing  # type: ignore[method-assign, assignment]
        listed = asyncio.run(ops.sas({}))["sas"]
        assert [r["spi"] for r in listed] == [0x301] and listed[0]["method"] == "-"
        assert len(threads) == 2 and threads[1] is not threading.main_thread()
        assert [r["spi"] for r in asyncio.run(ops.sas({"mn_id": "a@X"}))["sas"]] == [0x301]
        assert len(threads) == 2
        # An identity no MN can send: the field named, not "internal error:
        # UnicodeEncodeError" (a lone surrogate; found in review).
        for bad in ("a\ud800@x", "a b@x"):
            with pytest.raises(ControlError, match="^mn_id: "):
                asyncio.run(ops.sas({"mn_id": bad}))
    finally:
        s.close()


def test_a_store_with_the_older_binary_mn_index_gets_the_nocase_one(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    SQLiteSAStore(path).close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP INDEX issued_sa_mn_nocase; CREATE INDEX issued_sa_mn_id ON issued_sa (mn_id);"
    )
    conn.close()
    s = SQLiteSAStore(path)
    try:
        names = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "issued_sa_mn_nocase" in names and "issued_sa_mn_id" not in names
    finally:
        s.close()


def test_owed_withdrawals_read_the_unconfirmed_index_not_the_table(tmp_path: Path) -> None:
    """Every HAC's sweep reads the withdrawals still owed, while retired_sa
    holds every SA superseded in the last lifetime (nearly all confirmed):
    a partial index keeps that read to the owed rows, on a new store and on
    one made before the index (it is added at open).  The read for a worker
    thread gives the same rows, as epoch seconds."""
    path = tmp_path / "sa.db"
    SQLiteSAStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX retired_sa_unconfirmed")
    conn.commit()
    conn.close()
    s = SQLiteSAStore(path)
    try:
        sql = (
            "SELECT spi, mn_id, ha_id, validity_end FROM retired_sa "
            "WHERE confirmed = 0 AND validity_end > ? ORDER BY validity_end, spi"
        )
        plan = " ".join(str(r[-1]) for r in s._conn.execute(f"EXPLAIN QUERY PLAN {sql}", (0,)))
        assert "USING INDEX retired_sa_unconfirmed" in plan and "SCAN" not in plan, plan
        for spi in (0x201, 0x202, 0x203):
            s.add(issued(spi, mn_id=f"m{spi}@x", hoa6=f"2001:db8:1::{spi:x}"), now=T0)
            s.retire(spi, "revoked")
        s.confirm_retired(0x202)
        later = T0 + timedelta(seconds=1)
        owed = s.retired_unconfirmed(later)
        assert [r[0] for r in owed] == [0x201, 0x203]
        apart = s.retired_unconfirmed_apart(later)
        assert apart is not None
        assert sorted(apart) == [(spi, ha_id, int(end.timestamp())) for spi, _, ha_id, end in owed]
        assert SQLiteSAStore(None).retired_unconfirmed_apart(later) is None  # memory store
    finally:
        s.close()


@pytest.fixture
def hacs(tmp_path: Path) -> Iterator[tuple[SQLiteSAStore, SQLiteSAStore, SQLiteSAStore]]:
    """Three users of one store file: HACs A and B (each with its owner
    name) and a tool without one."""
    path = tmp_path / "sa.db"
    a, b, tool = SQLiteSAStore(path), SQLiteSAStore(path), SQLiteSAStore(path)
    a.owner, b.owner = "host:/etc/mipsec/hac-a.toml", "host:/etc/mipsec/hac-b.toml"
    try:
        yield a, b, tool
    finally:
        for s in (a, b, tool):
            s.close()


def test_owed_withdrawals_of_a_live_hac_are_left_to_it(
    hacs: tuple[SQLiteSAStore, SQLiteSAStore, SQLiteSAStore],
) -> None:
    """HACs sharing a store say who they are (``owner``) and until when they
    count as alive (``heartbeat``).  A withdrawal another HAC owes is not
    offered for taking over (``orphaned_unconfirmed`` and its worker-thread
    read) while that HAC is alive; it is once its heartbeat lapses, and
    ``claim`` makes it the taker's.  A HAC's own, and those recorded
    without an owner, are always offered.  ``retired_unconfirmed`` still
    lists them all (a start of the owner resumes its own)."""
    a, b, tool = hacs
    path = a.path
    assert path is not None
    t0 = T0.timestamp()
    a.heartbeat(t0 + 10, ["ha1"], now=T0)
    b.heartbeat(t0 + 10, ["ha1"], now=T0)
    assert [o for o, _ in a.alive_owners(T0)] == [b.owner, a.owner][::-1]
    for spi, who in ((0x301, a), (0x302, b), (0x303, tool)):
        who.add(issued(spi, mn_id=f"m{spi}@x", hoa6=f"2001:db8:1::{spi:x}"), now=T0)
        who.retire(spi, "revoked")

    def offered(s: SQLiteSAStore, at: datetime) -> list[int]:
        rows = [r[0] for r in s.orphaned_unconfirmed(at)]
        apart = s.retired_unconfirmed_apart(at)
        assert apart is not None and sorted(r[0] for r in apart) == sorted(rows)
        return rows

    at = T0 + timedelta(seconds=5)
    assert offered(b, at) == [0x302, 0x303]  # not A's: A is alive
    assert offered(a, at) == [0x301, 0x303]
    assert [r[0] for r in b.retired_unconfirmed(at)] == [0x301, 0x302, 0x303]
    # A withdrawal A owes to an HA it does not have is never A's to send:
    # offered to B although A is alive.
    a.add(issued(0x304, mn_id="m304@x", hoa6="2001:db8:1::304", ha_id="ha9"), now=T0)
    a.retire(0x304, "revoked")
    assert offered(b, at) == [0x302, 0x303, 0x304]
    a.confirm_retired(0x304)
    later = T0 + timedelta(seconds=11)  # A's heartbeat lapsed, B renewed its own
    b.heartbeat(t0 + 30, ["ha1"], now=later)
    assert offered(b, later) == [0x301, 0x302, 0x303]
    b.claim([0x301])  # B takes it over: B's now, and B is alive
    assert offered(a, later) == [0x303]
    assert query_owner(path, 0x301) == b.owner
    # Heartbeats dead for a day are dropped.
    days = T0 + timedelta(days=2)
    b.heartbeat(days.timestamp() + 10, ["ha1"], now=days)
    assert [o for o, _ in b.alive_owners(days)] == [b.owner]
    assert b._conn.execute("SELECT owner FROM hac_alive").fetchall() == [(b.owner,)]


def query_owner(path: Path, spi: int) -> str | None:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT owner FROM retired_sa WHERE spi = ?", (spi,)).fetchone()
        return None if row is None else row[0]
    finally:
        conn.close()


def test_a_heartbeat_from_ahead_of_the_readers_clock_is_not_believed(
    hacs: tuple[SQLiteSAStore, SQLiteSAStore, SQLiteSAStore],
) -> None:
    """A heartbeat whose write time (``beat``) lies more than ``BEAT_SKEW``
    ahead of the reader's clock -- the writer's clock runs ahead, or this
    host's clock was stepped back since -- is not believed: its ``until``
    would otherwise keep a dead HAC's withdrawals unsent for as long as the
    step.  Within the skew it is; the owner's next heartbeat, written on
    the corrected clock, is believed again."""
    a, b, _tool = hacs
    a.add(issued(0x321, mn_id="m321@x", hoa6="2001:db8:1::321"), now=T0)
    a.retire(0x321, "revoked")

    def offered(at: datetime) -> list[int]:
        rows = [r[0] for r in b.orphaned_unconfirmed(at)]
        apart = b.retired_unconfirmed_apart(at)
        assert apart is not None and sorted(r[0] for r in apart) == sorted(rows)
        return rows

    hour = T0 + timedelta(hours=1)  # A wrote its heartbeat an hour ahead of B's clock
    a.heartbeat(hour.timestamp() + 10, ["ha1"], now=hour)
    assert offered(T0) == [0x321]
    assert a.owner not in [o for o, _ in b.alive_owners(T0)]
    skew = T0 + timedelta(seconds=sa_store_sqlite.BEAT_SKEW - 1)  # within the skew
    a.heartbeat(skew.timestamp() + 10, ["ha1"], now=skew)
    assert offered(T0) == []
    assert a.owner in [o for o, _ in b.alive_owners(T0)]
    a.heartbeat(T0.timestamp() + 10, ["ha1"], now=T0)  # the corrected clock
    assert offered(T0 + timedelta(seconds=5)) == []
    assert offered(T0 + timedelta(seconds=11)) == [0x321]  # and it lapses as before


def test_a_hac_that_leaves_is_no_longer_alive_and_its_withdrawals_are_offered(
    hacs: tuple[SQLiteSAStore, SQLiteSAStore, SQLiteSAStore],
) -> None:
    """``leave`` (a HAC's stop): its heartbeat is gone at once, so what it
    owes is offered to the others before the heartbeat would have lapsed;
    the others' heartbeats stay; a store user without an owner leaves
    nothing."""
    a, b, tool = hacs
    t0 = T0.timestamp()
    a.heartbeat(t0 + 100, ["ha1"], now=T0)
    b.heartbeat(t0 + 100, ["ha1"], now=T0)
    a.add(issued(0x341, mn_id="m341@x", hoa6="2001:db8:1::341"), now=T0)
    a.retire(0x341, "revoked")
    assert b.orphaned_unconfirmed(T0) == []  # A alive for 100 s more
    tool.leave()  # no owner: nothing to leave
    assert len(b.alive_owners(T0)) == 2
    a.leave()
    assert [o for o, _ in b.alive_owners(T0)] == [b.owner]
    assert [r[0] for r in b.orphaned_unconfirmed(T0)] == [0x341]


def test_a_heartbeat_table_made_before_beats_gets_the_column_at_open(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    old = SQLiteSAStore(path)
    old.add(issued(0x331), now=T0)
    old.owner = "host:/etc/mipsec/hac-a.toml"
    old.retire(0x331, "revoked")
    old.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE hac_alive")
    conn.execute("CREATE TABLE hac_alive (owner TEXT PRIMARY KEY, until REAL NOT NULL, "
                 "has TEXT NOT NULL DEFAULT '')")  # fmt: skip
    conn.execute(
        "INSERT INTO hac_alive VALUES (?, ?, ?)",
        ("host:/etc/mipsec/hac-a.toml", T0.timestamp() + 10, "\nha1\n"),
    )
    conn.commit()
    conn.close()
    s = SQLiteSAStore(path)
    try:
        s.owner = "host:/etc/mipsec/hac-b.toml"
        # The heartbeat written before beats is believed (beat 0): A is alive.
        assert [o for o, _ in s.alive_owners(T0)] == ["host:/etc/mipsec/hac-a.toml"]
        assert s.orphaned_unconfirmed(T0) == []
        s.heartbeat(T0.timestamp() + 10, ["ha1"], now=T0)
        assert len(s.alive_owners(T0)) == 2
        # Nor did it say an issuing bound (added later still, by the same
        # open): 0, so the sweeps wait their own.
        assert s.issuing_bound(T0) == 0.0
        s.heartbeat(T0.timestamp() + 10, ["ha1"], now=T0, issuing=9.0)
        assert s.issuing_bound(T0) == 9.0
    finally:
        s.close()


def test_the_longest_issuing_bound_of_a_hac_that_may_still_issue(
    hacs: tuple[SQLiteSAStore, SQLiteSAStore, SQLiteSAStore],
) -> None:
    """Each HAC's heartbeat says how long after its store write it may still
    be issuing an SA (``issuing``: its provisioning_timeout and slack), and
    ``issuing_bound`` is the longest of the HACs that may still be issuing:
    alive, or killed less than their bound after their heartbeat lapsed (an
    SA stored just before the kill).  So the sweep of undelivered SAs of a
    HAC with a short timeout leaves alone an SA another HAC is still waiting
    for its HA to confirm.  A HAC that left (stopped: it waited for its
    issuing first) counts no more; a bound that is not one is refused."""
    a, b, tool = hacs
    t0 = T0.timestamp()
    assert tool.issuing_bound(T0) == 0.0  # nobody said one
    a.heartbeat(t0 + 10, ["ha1"], now=T0, issuing=9.0)
    b.heartbeat(t0 + 10, ["ha1"], now=T0, issuing=64.0)
    assert a.issuing_bound(T0) == 64.0 == tool.issuing_bound(T0)

    def at(seconds: float) -> datetime:
        return T0 + timedelta(seconds=seconds)

    # Both killed at once: B's heartbeat lapses at +10, and it may have
    # stored an SA just before, still provisioning until +74; A's until +19.
    assert a.issuing_bound(at(18)) == 64.0
    assert a.issuing_bound(at(73)) == 64.0
    assert a.issuing_bound(at(74)) == 0.0
    a.heartbeat(t0 + 90, ["ha1"], now=at(80), issuing=9.0)  # A started again
    assert tool.issuing_bound(at(80)) == 9.0
    b.heartbeat(t0 + 90, ["ha1"], now=at(80), issuing=64.0)
    b.leave()
    assert tool.issuing_bound(at(80)) == 9.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(LocalProtocolError, match="issuing"):
            a.heartbeat(t0 + 90, ["ha1"], now=at(80), issuing=bad)
    assert tool.issuing_bound(at(80)) == 9.0  # the refused heartbeat wrote nothing


def test_a_store_made_before_owners_gets_them_at_open(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    old = SQLiteSAStore(path)
    old.add(issued(0x311), now=T0)
    old.retire(0x311, "revoked")
    old.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE retired_sa DROP COLUMN owner")
    conn.execute("DROP TABLE hac_alive")
    conn.commit()
    conn.close()
    s = SQLiteSAStore(path)
    try:
        s.owner = "host:/etc/mipsec/hac.toml"
        s.heartbeat(T0.timestamp() + 10, ["ha1"], now=T0)
        # The row written before owners has none: anyone's to take over.
        assert [r[0] for r in s.orphaned_unconfirmed(T0)] == [0x311]
        other = SQLiteSAStore(path)
        other.owner = "host:/etc/mipsec/hac-b.toml"
        try:
            assert [r[0] for r in other.orphaned_unconfirmed(T0)] == [0x311]
        finally:
            other.close()
    finally:
        s.close()


def test_live_for_nai_finds_every_spelling_of_the_realm_only(store: SQLiteSAStore) -> None:
    """SAs issued before the HAC bound them to the canonical NAI may be stored
    under another case of the realm: ``live_for_nai`` (``mipsec revoke``,
    ``sas --mn-id``) finds them, and never another user part's case."""
    store.add(issued(0x101, mn_id="alice@HOME.example", hoa6="2001:db8:1::11"), now=T0)
    store.add(issued(0x102, mn_id="alice@home.example", hoa6="2001:db8:1::12"), now=T0)
    store.add(issued(0x103, mn_id="Alice@home.example", hoa6="2001:db8:1::13"), now=T0)
    store.add(issued(0x104, mn_id="alice@home.example.net", hoa6="2001:db8:1::14"), now=T0)
    store.add(
        issued(0x105, mn_id="alice@Home.Example", hoa6="2001:db8:1::15", end=T0 + timedelta(1)),
        now=T0,
    )
    for spelling in ("alice@home.example", "alice@HOME.EXAMPLE"):
        found = store.live_for_nai(spelling, T0)
        assert [i.sa.spi for i in found] == [0x101, 0x102, 0x105], spelling  # oldest first
        assert found[0].sa.mn_id == "alice@HOME.example"  # as stored, keys and all
        assert found[0].sa.mn_to_ha_ikey == IK1
        listed = store.live_listing(T0, spelling)
        assert sorted(r[0] for r in listed) == [0x101, 0x102, 0x105], spelling
    assert [i.sa.spi for i in store.live_for_nai("Alice@home.example", T0)] == [0x103]
    assert store.live_for_nai("alice@home.example", T0 + timedelta(hours=2)) == [
        store.get(0x105, T0 + timedelta(hours=2))
    ]


def test_synchronous_option(tmp_path: Path) -> None:
    """``[sa_store] synchronous``: "normal" (default: each commit survives a
    crash of the role) or "full" (also a power loss: an fsync per commit).
    A power loss under "normal" can take the last commits -- SAs an HA may
    already hold, whose SPIs and home addresses the HAC could hand out
    again -- so an operator who fears one asks for "full"."""
    ctx = PluginContext(role="hac", base_dir=tmp_path)
    for value, level in ((None, 1), ("normal", 1), ("full", 2)):
        opts = {"path": f"s-{value}.db"} | ({} if value is None else {"synchronous": value})
        s = SQLiteStoreFactory().create(opts, ctx)
        try:
            assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == level
            assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            s.close()
    with pytest.raises(ValueError, match=r"^synchronous: input should be 'normal' or 'full'"):
        SQLiteStoreFactory().create({"path": "x.db", "synchronous": "off"}, ctx)
    with pytest.raises(sa_store_sqlite.StoreOptionError) as err:  # never into the PRAGMA
        SQLiteSAStore(tmp_path / "y.db", synchronous="off; DROP TABLE issued_sa")  # type: ignore[arg-type]
    assert err.value.option == "synchronous" and not (tmp_path / "y.db").exists()
