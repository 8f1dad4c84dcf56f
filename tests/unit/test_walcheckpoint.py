"""WAL checkpoints off the committing thread (core/walcheckpoint.py; issue 9)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from test_sa_store import T0, issued

from mipsec.core.hookspecs import PluginContext
from mipsec.core.walcheckpoint import BACKSTOP_PAGES, WalCheckpointer
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore, SQLiteStoreFactory

log = logging.getLogger("test.walcheckpoint")


def _wait(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def _rows_in_file_alone(path: Path, table: str) -> int:
    """Rows of ``table`` in the database file itself: a copy without its WAL."""
    alone = path.with_name("alone-" + path.name)
    alone.write_bytes(path.read_bytes())
    ro = sqlite3.connect(alone)
    try:
        return int(ro.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608
    finally:
        ro.close()


def _wal_frames(path: Path) -> int:
    """Frames in the WAL file, from its size (32-octet header, 24 per frame header)."""
    wal = path.with_name(path.name + "-wal")
    size = wal.stat().st_size if wal.exists() else 0
    return 0 if size <= 32 else (size - 32) // (24 + 4096)


def test_store_checkpoints_in_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    store = SQLiteSAStore(path, checkpoint_interval=0.02)
    try:
        cp = store.checkpointer
        assert cp is not None and cp.running
        # The committing connection checkpoints only past the backstop.
        assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (BACKSTOP_PAGES,)
        for i in range(1, 201):
            assert store.add(issued(i, mn_id=f"mn{i}@home.example", hoa6=None), T0)
        # Far under the backstop and under SQLite's default of 1,000 pages:
        # only the thread can have copied the log into the database file.
        after = cp.rounds + 1  # a checkpoint begun after the last commit
        _wait(lambda: cp.rounds > after)
        assert cp.last is not None and cp.last[0] > 0 and cp.last[1] == cp.last[0]
        st = cp.status()
        assert st["interval_s"] == 0.02 and st["running"] and not st["failing"]
        assert st["log_frames"] == st["checkpointed"] == cp.last[0] and st["rounds"] >= after
        # The database file itself now holds the SAs.
        assert _rows_in_file_alone(path, "issued_sa") == 200
    finally:
        store.close()
    assert not cp.running
    # The last connection closed: its checkpoint removed the log.
    assert not path.with_name("sa.db-wal").exists()
    with SQLiteSAStore(path) as again:
        assert len(again.live(T0)) == 200


def test_without_checkpointer_the_commit_does_it(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as store:  # direct users (tools, tests): no thread
        assert store.checkpointer is None
        assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)
        for i in range(1, 201):
            store.add(issued(i, mn_id=f"mn{i}@home.example", hoa6=None), T0)
        time.sleep(0.1)
        assert _wal_frames(path) > 0  # nobody copied it yet: under 1,000 pages


def test_memory_and_check_only_stores_have_none(tmp_path: Path) -> None:
    assert SQLiteSAStore(None, checkpoint_interval=0.5).checkpointer is None
    SQLiteSAStore(tmp_path / "sa.db").close()
    checked = SQLiteSAStore(tmp_path / "sa.db", check_only=True, checkpoint_interval=0.5)
    assert checked.checkpointer is None
    checked.close()


def test_factory_option(tmp_path: Path) -> None:
    ctx = PluginContext(role="hac", base_dir=tmp_path)
    s = SQLiteStoreFactory().create({"path": "a.db"}, ctx)
    assert s.checkpointer is not None and s.checkpointer.interval == 1.0  # the default
    s.close()
    s = SQLiteStoreFactory().create({"path": "a.db", "checkpoint_interval": 0}, ctx)
    assert s.checkpointer is None  # 0: SQLite's own, on the commit
    s.close()
    s = SQLiteStoreFactory().create({"path": "a.db", "checkpoint_interval": 0.25}, ctx)
    assert s.checkpointer is not None and s.checkpointer.interval == 0.25
    s.close()
    for bad in (-1, 61, "soon", float("nan")):
        with pytest.raises(ValueError, match=r"^checkpoint_interval: "):
            SQLiteStoreFactory().create({"path": "a.db", "checkpoint_interval": bad}, ctx)
    # check-config: nothing started.
    checked = SQLiteStoreFactory().create(
        {"path": "a.db"}, PluginContext(role="hac", base_dir=tmp_path, extra={"check_only": True})
    )
    assert checked.checkpointer is None
    checked.close()


def test_failure_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A real failure: the path is a directory, so the thread's connection
    # cannot open it.  One line naming what and why; the thread ends.
    cp = WalCheckpointer(tmp_path, 0.01, log, "SA store checkpoint of 'x'")
    with caplog.at_level(logging.WARNING, logger="test.walcheckpoint"):
        cp.start()
        _wait(lambda: not cp.running)
    lines = [r.getMessage() for r in caplog.records]
    assert cp.status()["failing"] and not cp.status()["running"]
    assert lines == [
        "SA store checkpoint of 'x' failed: OperationalError: unable to open database file; "
        "the log grows meanwhile (its writer checkpoints it past 8,192 pages)"
    ]


def test_checkpoint_errors_logged_once_then_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "x.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    cp = WalCheckpointer(path, 1.0, log, "checkpoint of x")
    broken = sqlite3.connect(path, isolation_level=None)
    broken.close()  # a closed connection: every call fails (ProgrammingError)
    with caplog.at_level(logging.WARNING, logger="test.walcheckpoint"):
        cp.checkpoint(broken)
        cp.checkpoint(broken)  # still failing: no second line
        cp.checkpoint(conn)
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint of x failed: ProgrammingError: Cannot operate on a closed database.; "
        "the log grows meanwhile (its writer checkpoints it past 8,192 pages)",
        "checkpoint of x works again",
    ]
    assert cp.last is not None
    conn.close()


def test_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval"):
        WalCheckpointer(tmp_path / "x.db", 0, log, "x")


def test_store_close_waits_for_the_thread(tmp_path: Path) -> None:
    store = SQLiteSAStore(tmp_path / "sa.db", checkpoint_interval=0.01)
    cp = store.checkpointer
    assert cp is not None
    store.add(issued(7, end=T0 + timedelta(hours=2)), T0)
    store.close()
    assert not cp.running


def test_binding_cache_file_checkpointed_by_its_own_thread(tmp_path: Path) -> None:
    from mipsec.core.bindings import Binding, BindingCache

    path = tmp_path / "bindings.sqlite"
    cache = BindingCache(path, checkpoint_interval=0.02)
    try:
        cp = cache.checkpointer
        assert cp is not None and cp.running and cache.checkpointed_elsewhere
        for i in range(50):
            cache.put(Binding(f"2001:db8::{i + 1:x}", "192.0.2.1", 4000 + i, 100 + i, 1, 60, 2e9))
        seen: list[str] = []
        assert cache._conn is not None
        cache._conn.set_trace_callback(seen.append)
        cache.checkpoint()  # the thread's job now: nothing on the caller's connection
        assert seen == []
        after = cp.rounds + 1
        _wait(lambda: cp.rounds > after)
        assert _rows_in_file_alone(path, "binding") == 50
    finally:
        cache.close()
    assert not cp.running


def test_an_unexpected_error_is_said_once_and_the_thread_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.db"
    sqlite3.connect(path).close()
    calls: list[int] = []

    def broken(self: WalCheckpointer, conn: sqlite3.Connection) -> None:
        calls.append(1)
        raise RuntimeError("a bug")

    monkeypatch.setattr(WalCheckpointer, "checkpoint", broken)
    cp = WalCheckpointer(path, 0.01, log, "checkpoint of x")
    with caplog.at_level(logging.WARNING, logger="test.walcheckpoint"):
        cp.start()
        _wait(lambda: len(calls) >= 5)
        assert cp.running and cp.status()["failing"]
        cp.close()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "ERROR",
            "checkpoint of x failed: RuntimeError; the log grows meanwhile "
            "(its writer checkpoints it past 8,192 pages)",
        )
    ]


def test_a_checkpoint_stuck_at_close_is_said_and_not_waited_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint stuck in I/O (a failing disk) when the owner closes: the
    close waits its bound, says so in one WARNING naming the file, and
    closes the owner's connection; the thread ends once the I/O returns,
    and every committed SA is in the file."""
    from mipsec.core import walcheckpoint

    monkeypatch.setattr(walcheckpoint, "_JOIN_S", 0.2)
    entered, release = threading.Event(), threading.Event()
    real = WalCheckpointer.checkpoint

    def stuck(self: WalCheckpointer, conn: sqlite3.Connection) -> None:
        entered.set()
        assert release.wait(30)
        real(self, conn)

    monkeypatch.setattr(WalCheckpointer, "checkpoint", stuck)
    path = tmp_path / "sa.db"
    store = SQLiteSAStore(path, checkpoint_interval=0.01)
    cp = store.checkpointer
    assert cp is not None
    store.add(issued(7, end=T0 + timedelta(hours=2)), T0)
    assert entered.wait(10)
    with caplog.at_level(logging.WARNING):
        store.close()
    assert cp.running  # not waited for
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "still under way" in warnings[0], warnings
    assert str(path) in warnings[0]
    release.set()
    _wait(lambda: not cp.running)
    again = SQLiteSAStore(path)
    try:
        assert again.get(7, T0) is not None
    finally:
        again.close()


@pytest.mark.parametrize("kind", ["sa_store", "bindings"])
def test_wal_file_shrinks_after_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A burst grows the WAL far past its usual size; once a checkpoint has
    copied it, the next commit cuts the file back to the limit (SQLite alone
    keeps it at its high-water size for good)."""
    from mipsec.core import walcheckpoint
    from mipsec.core.bindings import Binding, BindingCache

    limit = 64 * 1024
    monkeypatch.setattr(walcheckpoint, "WAL_SIZE_LIMIT", limit)
    wal = tmp_path / f"{kind}.db-wal"
    if kind == "sa_store":
        store = SQLiteSAStore(tmp_path / f"{kind}.db", checkpoint_interval=0.02)
        cp, close = store.checkpointer, store.close

        def burst() -> None:
            with store.transaction():
                for i in range(1, 1501):
                    store.add(issued(i, mn_id=f"mn{i}@home.example", hoa6=None), T0)

        def one_more() -> None:
            store.add(issued(5000, mn_id="late@home.example", hoa6=None), T0)

    else:
        cache = BindingCache(tmp_path / f"{kind}.db", checkpoint_interval=0.02)
        cp, close = cache.checkpointer, cache.close

        def burst() -> None:
            for i in range(3000):
                cache.put(Binding(f"2001:db8::{i + 1:x}", "192.0.2.1", 4000, 100 + i, 1, 60, 2e9))
            cache.flush()  # one transaction

        def one_more() -> None:
            cache.put(Binding("2001:db8:1::1", "192.0.2.1", 4000, 7, 1, 60, 2e9))
            cache.flush()

    try:
        assert cp is not None
        burst()
        high = wal.stat().st_size
        assert high > 4 * limit
        after = cp.rounds + 1
        _wait(lambda: cp.rounds > after and cp.last is not None and cp.last[0] == cp.last[1])
        assert wal.stat().st_size == high  # copied, not shrunk: SQLite reuses it
        one_more()
        assert wal.stat().st_size <= limit
    finally:
        close()
