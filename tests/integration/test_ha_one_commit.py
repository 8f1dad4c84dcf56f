"""Issue 9 item 3: "the HA's SA row + out-mark in one transaction".

With ``[bindings] in_sa_store = true`` (what ``mipsec init`` writes) the
binding cache keeps its tables in the SA store's own SQLite file, and a burst
of installs -- the SA rows, their sequence-number marks, the withdrawal an
install carries (``prov-withdraw``) and the superseded row's delete -- is one
transaction: one COMMIT, counted here on the store's real connection.  A
failure anywhere in it leaves none of it: no row, no record, every new SA
dead in memory, and the records the failed flush had written queued again.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_ha_udp import (
    HAA,
    MN,
    counting,
    fail_first_write,
    held_after_restart,
    make_issued,
    run,
)

from mipsec.core.bindings import Binding, BindingCache
from mipsec.core.config import HAConfig
from mipsec.core.errors import ConfigError, LocalProtocolError
from mipsec.core.roles.ha import HaService
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore


def in_store_config(tmp_path: Path, ha_id: str = "ha1", **sa_store: Any) -> HAConfig:
    return HAConfig.model_validate(
        {
            "ha": {"id": ha_id, "listen": ["127.0.0.1"], "port": 0, "address6": str(HAA)},
            "sa_store": sa_store or {"backend": "sqlite", "path": str(tmp_path / "sa.sqlite")},
            "bindings": {"in_sa_store": True},
        }
    )


def commits(conn: sqlite3.Connection) -> list[str]:
    """Every COMMIT executed on ``conn`` from now on."""
    seen: list[str] = []
    conn.set_trace_callback(lambda sql: seen.append(sql) if sql.strip() == "COMMIT" else None)
    return seen


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_burst_with_a_withdrawal_is_one_commit(tmp_path: Path) -> None:
    older = make_issued(spi=0x6001)
    burst = [make_issued(spi=0x6002 + i) for i in range(3)]
    path = tmp_path / "sa.sqlite"

    async def main() -> tuple[bool, ...]:
        svc = HaService(in_store_config(tmp_path))
        addrs = await svc.start()
        try:
            await svc.install_sa(older)
            seen = commits(svc.store._conn)  # type: ignore[attr-defined]
            flushes = counting(svc.bindings, "flush")
            items = [
                (burst[0], "ha1", (older.sa.spi,)),
                (burst[1], "ha1", ()),
                (burst[2], None, ()),
            ]
            assert svc.install_many_now(items) == [None, None, None]
            # Rows, marks, the withdrawal record and the superseded row's
            # delete: one COMMIT (three before: rows, flush, delete).
            assert (len(seen), len(flushes)) == (1, 1)
            assert sorted(r[0] for r in rows(path, "SELECT spi FROM issued_sa")) == [
                x.sa.spi for x in burst
            ]
            assert rows(path, f"SELECT dead FROM spi_state WHERE spi = {older.sa.spi}") == [(1,)]
            marks = rows(path, "SELECT spi, out_mark FROM spi_state WHERE dead = 0")
            assert sorted(spi for spi, _ in marks) == [x.sa.spi for x in burst]
            assert not (tmp_path / "bindings.sqlite").exists()
            mn = MN(burst[1])
            try:
                assert (await mn.register(1, addrs[0])).status == 0
            finally:
                mn.close()
        finally:
            await svc.stop()
        return await held_after_restart(in_store_config(tmp_path), (older, *burst))

    assert run(main()) == (False, True, True, True)


def test_failure_inside_the_transaction_leaves_none_of_it(tmp_path: Path) -> None:
    """The binding cache's write fails inside the burst's transaction: every
    install fails (500 to the HAC), no row of the burst reached the file, the
    new SAs are dead in memory, and the older SA's withdrawal -- which the HAC
    will retry, not knowing -- is queued and made durable by the next flush."""
    older = make_issued(spi=0x7001)
    news = [make_issued(spi=0x7002 + i) for i in range(2)]
    path = tmp_path / "sa.sqlite"

    async def main() -> tuple[bool, ...]:
        svc = HaService(in_store_config(tmp_path))
        await svc.start()
        try:
            await svc.install_sa(older)
            fail_first_write(svc.bindings)
            results = svc.install_many_now(
                [(news[0], "ha1", (older.sa.spi,)), (news[1], "ha1", ())]
            )
            assert all(isinstance(r, sqlite3.OperationalError) for r in results)
            assert not any(svc.core.has_spi(x.sa.spi) for x in news)
            # Rolled back: only the older SA's row, still alive on disk.
            assert rows(path, "SELECT spi FROM issued_sa") == [(older.sa.spi,)]
            assert rows(path, f"SELECT dead FROM spi_state WHERE spi = {older.sa.spi}") == [(0,)]
            assert svc.bindings.dirty  # the records wait for the next flush
        finally:
            await svc.stop()  # flushes them
        assert rows(path, f"SELECT dead FROM spi_state WHERE spi = {older.sa.spi}") == [(1,)]
        return await held_after_restart(in_store_config(tmp_path), (older, *news))

    assert run(main()) == (False, False, False)


def test_held_requeues_what_a_rolled_back_transaction_lost(tmp_path: Path) -> None:
    """BindingCache.held(): a flush joined to a transaction its owner then
    rolls back (say the COMMIT failed) gives its changes back to the queue."""
    store = SQLiteSAStore(tmp_path / "sa.sqlite")
    try:
        cache = BindingCache(write_behind=True, shared=store.shared_connection(), owner="ha1")
        cache.put(Binding("2001:db8:1::10", "192.0.2.1", 4500, 0x8001, 3, 60, 1e12, None, 0))
        with pytest.raises(RuntimeError), cache.held(), store.transaction():
            cache.flush()  # joined: no COMMIT of its own
            assert not cache.dirty
            raise RuntimeError("the COMMIT failed")
        assert cache.dirty and cache.pending == 1
        cache.flush()
        assert rows(tmp_path / "sa.sqlite", "SELECT hoa, sequence FROM binding") == [
            ("2001:db8:1::10", 3)
        ]
        cache.close()
        store.shared_connection().execute("SELECT 1")  # close() left the store's connection open
    finally:
        store.close()


def test_store_transaction_joins_its_own_writes_and_refuses_nesting(tmp_path: Path) -> None:
    store = SQLiteSAStore(tmp_path / "sa.sqlite")
    try:
        seen = commits(store.shared_connection())
        with store.transaction():
            assert store.add_many([make_issued(spi=0x9001), make_issued(spi=0x9002)]) == [
                True,
                True,
            ]
            assert store.discard_many([0x9001]) == 1
        assert len(seen) == 1
        assert rows(tmp_path / "sa.sqlite", "SELECT spi FROM issued_sa") == [(0x9002,)]
        with pytest.raises(LocalProtocolError, match="already inside"), store.transaction():
            with store.transaction():
                pass
        assert not store.shared_connection().in_transaction  # the outer one rolled back
    finally:
        store.close()


def test_a_second_ha_on_the_same_file_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        svc = HaService(in_store_config(tmp_path))
        await svc.start()
        await svc.stop()

    run(main())
    with pytest.raises(ConfigError) as err:
        HaService(in_store_config(tmp_path, ha_id="ha2"), "ha2.toml")
    assert str(err.value) == (
        "ha2.toml: bindings.in_sa_store: cannot open: the binding cache in this file "
        "belongs to HA 'ha1', not 'ha2'"
    )


def test_in_sa_store_needs_a_store_with_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        HaService(in_store_config(tmp_path, backend="memory"), "ha.toml")
    assert str(err.value).startswith(
        "ha.toml: bindings.in_sa_store: sa_store backend 'memory': "
        "a memory store cannot hold another component's tables"
    )
    with pytest.raises(ValueError, match="memory store cannot hold"):
        SQLiteSAStore(None).shared_connection()
    with pytest.raises(ValueError, match="either path .* or in_sa_store"):
        HAConfig.model_validate(
            {
                "ha": {"id": "ha1"},
                "bindings": {"in_sa_store": True, "path": str(tmp_path / "b.sqlite")},
            }
        )


def own_file_config(tmp_path: Path, ha_id: str = "ha1") -> HAConfig:
    cfg = in_store_config(tmp_path, ha_id)
    bindings = {"path": str(tmp_path / "bindings.sqlite")}
    return HAConfig.model_validate({**cfg.model_dump(mode="json"), "bindings": bindings})


def _install_one(cfg: HAConfig, issued: Any) -> None:
    async def main() -> None:
        svc = HaService(cfg)
        await svc.start()
        try:
            await svc.install_sa(issued)
        finally:
            await svc.stop()

    run(main())


REFUSED = (
    "the SA store holds live SAs of this HA, but their binding cache (replay state) is not "
    "there: restore the binding cache they were stored with, or start with an empty SA store"
)


def test_switching_to_in_sa_store_with_live_sas_is_refused(tmp_path: Path) -> None:
    """The SAs' replay state is in the old file: starting with new, empty
    tables would take them back as new SAs and accept replays."""
    _install_one(own_file_config(tmp_path), make_issued(spi=0xA001))
    with pytest.raises(ConfigError) as err:
        HaService(in_store_config(tmp_path), "ha.toml")
    assert str(err.value) == f"ha.toml: bindings.in_sa_store: {REFUSED}"


def test_switching_back_to_a_file_or_losing_it_is_refused(tmp_path: Path) -> None:
    _install_one(in_store_config(tmp_path), make_issued(spi=0xA002))
    with pytest.raises(ConfigError) as err:
        HaService(own_file_config(tmp_path), "ha.toml")
    assert str(err.value) == f"ha.toml: bindings.path: {REFUSED}"
    # A binding cache file of its own, lost: the same.
    other = tmp_path / "other"
    other.mkdir()
    _install_one(own_file_config(other), make_issued(spi=0xA003))
    (other / "bindings.sqlite").unlink()
    with pytest.raises(ConfigError, match="bindings.path: the SA store holds live SAs"):
        HaService(own_file_config(other), "ha.toml")


def test_a_new_binding_cache_next_to_another_has_sas_is_fine(tmp_path: Path) -> None:
    """Only this HA's SAs count: a store shared with the HAC (model 1) may
    hold other HAs' SAs, whose replay state is theirs."""
    _install_one(own_file_config(tmp_path, "ha2"), make_issued(spi=0xA004, ha_id="ha2"))
    (tmp_path / "bindings.sqlite").unlink()
    svc = HaService(in_store_config(tmp_path, "ha1"))  # not refused
    try:
        assert svc.bindings.shared and len(svc.bindings) == 0
        store: Any = svc.store
        now = datetime.now(UTC)
        assert store.has_live(now, ("ha2",)) and not store.has_live(now, ("ha1", ""))
    finally:
        svc.store.close()


def test_binding_cache_in_store_is_checkpointed_by_the_store_thread(tmp_path: Path) -> None:
    # With in_sa_store the store's thread (core/walcheckpoint.py) copies the
    # shared file's log, bindings included, once a second by default.
    async def main() -> None:
        svc = HaService(in_store_config(tmp_path))
        await svc.start()
        try:
            cp = svc.store.checkpointer  # type: ignore[attr-defined]
            assert cp is not None and cp.running and cp.interval == 1.0
            # The cache leaves it to that thread: no checkpoint on the loop.
            assert svc.bindings.checkpointed_elsewhere
            seen: list[str] = []
            svc.store._conn.set_trace_callback(seen.append)  # type: ignore[attr-defined]
            svc.bindings.checkpoint()
            assert seen == []
        finally:
            await svc.stop()
        assert not cp.running

    run(main())


def test_binding_cache_in_store_without_thread_checkpoints_itself(tmp_path: Path) -> None:
    cfg = in_store_config(
        tmp_path, backend="sqlite", path=str(tmp_path / "sa.sqlite"), checkpoint_interval=0
    )

    async def main() -> None:
        svc = HaService(cfg)
        await svc.start()
        try:
            assert svc.store.checkpointer is None  # type: ignore[attr-defined]
            assert not svc.bindings.checkpointed_elsewhere
            seen: list[str] = []
            svc.store._conn.set_trace_callback(seen.append)  # type: ignore[attr-defined]
            svc.bindings.checkpoint()
            assert seen == ["PRAGMA wal_checkpoint(PASSIVE)"]
        finally:
            await svc.stop()

    run(main())


def test_binding_cache_in_its_own_file_is_checkpointed_by_its_own_thread(tmp_path: Path) -> None:
    # [bindings] path: the cache's own thread (core/walcheckpoint.py), once a
    # second; the HA's once-a-second call issues nothing on the event loop.
    from test_ha_udp import ha_config

    async def main() -> None:
        svc = HaService(ha_config(tmp_path))
        await svc.start()
        try:
            cp = svc.bindings._checkpointer
            assert cp is not None and cp.running and cp.interval == 1.0
            assert svc.bindings.checkpointed_elsewhere
            seen: list[str] = []
            assert svc.bindings._conn is not None
            svc.bindings._conn.set_trace_callback(seen.append)
            svc.expire_now(store=False)  # the HA's every-second round, checkpoint included
            assert not any("checkpoint" in sql for sql in seen)
        finally:
            await svc.stop()
        assert not cp.running

    run(main())
