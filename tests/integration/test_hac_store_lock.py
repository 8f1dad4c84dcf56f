"""The SA store's write lock held by another process (a second HAC sharing
the file, an operator's ``sqlite3`` shell): the HAC keeps serving.

Before, every store write waited inside SQLite (``busy_timeout``, 5 s) on
the event loop's thread: while the lock was held, no MN, no handshake, no
timer was served, and the waiting bootstrap then failed with "internal
error: OperationalError".  Now the group commit tries without waiting and
again from the event loop, the MN gets its 200 once the lock is free -- or
503 with ``retry-after`` when it stays held for ``STORE_BUSY_LIMIT`` -- and
background writes (expiry, sweep, the delivery batch) skip a turn instead.

A real ``HacService`` with its HA in the same process, the SQLite store on a
file, a real MN (``roles.mn.bootstrap``); the lock is held by a second
connection to the file, as another process holds it (SQLite locks between
connections alike).  Last, the HA's per-burst commit of its binding cache,
with an MN from the codecs on a real UDP socket (``test_ha_udp.MN``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_ha_udp import HOA, MN, ha_config, make_issued
from test_hac_lifecycle import MN_ID, Stack, hac_config, hac_data, mn_config, run

from mipsec.core.bindings import BindingCache
from mipsec.core.errors import StoreBusyError
from mipsec.core.issuer import new_sa
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.pki import PkiPaths, init_pki
from mipsec.core.roles import hac as hac_module
from mipsec.core.roles.ha import HaService
from mipsec.core.roles.hac_ops import HacOps
from mipsec.core.roles.mn import bootstrap
from mipsec.core.sqlitetx import transaction
from mipsec.core.suites import Suite
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"))


def stack(tmp_path: Path, pki: PkiPaths, revocations: Path | None = None) -> tuple[Stack, Path]:
    data = hac_data(tmp_path, pki)
    db = tmp_path / "sa.db"
    data["sa_store"] = {"backend": "sqlite", "path": str(db)}
    if revocations is not None:
        data["revocations"] = {"path": str(revocations)}
    return Stack(hac_config(data, tmp_path)), db


@contextmanager
def write_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold the file's write lock, as another process's open write transaction does."""
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield holder
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


def rows(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT mn_id FROM issued_sa")]


async def until(check: Any) -> None:
    for _ in range(2000):  # an event, not a time: at most 20 s on a loaded machine
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


async def handshake(pki: PkiPaths, port: int) -> str | None:
    """A TLS handshake with the HAC: its negotiated version."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="hac.mipsec.test"
    )
    version = writer.get_extra_info("ssl_object").version()
    writer.close()
    return str(version)


def test_a_bootstrap_waits_for_the_lock_while_the_hac_serves_others(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """The lock is held when the MN's SA is to be stored: the bootstrap
    waits -- meanwhile another client's TLS handshake completes, so the
    event loop is not held -- and gets its 200 once the lock is released."""
    st, db = stack(tmp_path, pki)

    async def main() -> tuple[bool, str | None, int | None, list[str]]:
        async with st:
            hac = st.hac
            assert hac is not None
            with write_lock(db):
                task = asyncio.create_task(bootstrap(mn_config(pki, st.port)))
                await until(lambda: hac._busy_since is not None)  # found the lock held
                other = await handshake(pki, st.port)  # served meanwhile
                pending = not task.done()
            result = await task
            return pending, other, result.status, rows(db)

    pending, other, status, stored = run(main())
    assert pending and other is not None and other.startswith("TLS")
    assert status == 200
    assert stored == [MN_ID]


def test_another_hacs_brief_commit_is_waited_out_without_a_word(
    tmp_path: Path, pki: PkiPaths, caplog: Any
) -> None:
    """Two HACs sharing a store hold its lock for a commit's length now and
    then: a group that meets it tries again a few ms later and is stored
    (200), with no log line -- only a lock held for ``STORE_BUSY_QUIET``
    (1 s) is an outage worth one."""
    st, db = stack(tmp_path, pki)

    async def main() -> tuple[int | None, bool]:
        async with st:
            hac = st.hac
            assert hac is not None
            holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            holder.execute("BEGIN IMMEDIATE")
            task = asyncio.create_task(bootstrap(mn_config(pki, st.port)))
            await until(lambda: hac._busy_since is not None)
            # Released from another thread a few ms later, as a commit ends.
            await asyncio.to_thread(lambda: (time.sleep(0.02), holder.execute("COMMIT")))
            holder.close()
            result = await task
            return result.status, hac._busy_since is None

    with caplog.at_level(logging.INFO):
        status, cleared = run(main())
    assert status == 200 and cleared
    assert "SA store write" not in caplog.text
    assert rows(db) == [MN_ID]


def test_a_lock_held_too_long_answers_503_and_keeps_nothing(
    tmp_path: Path, pki: PkiPaths, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Held for the whole ``STORE_BUSY_LIMIT``: the MN gets 503 (PROFILE §6:
    with ``retry-after``), nothing is stored, its HA holds no SA, the HAC
    says so in one line -- and the next bootstrap, the lock released, gets
    its 200."""
    monkeypatch.setattr(hac_module, "STORE_BUSY_LIMIT", 0.3)
    st, db = stack(tmp_path, pki)

    async def main() -> tuple[Any, int, int, int | None]:
        async with st:
            assert st.hac is not None and st.ha is not None
            with write_lock(db):
                first = await bootstrap(mn_config(pki, st.port))
            on_ha = len(st.ha.store.live(datetime.now(UTC)))
            busy = st.hac.stats["store_busy"]
            second = await bootstrap(mn_config(pki, st.port))
            return first, on_ha, busy, second.status

    with caplog.at_level(logging.INFO):
        first, on_ha, busy, second = run(main())
    assert first.status == 503 and first.authenticated and first.issued is None
    assert first.retry_after is not None
    assert on_ha == 0 and busy == 1
    assert second == 200 and rows(db) == [MN_ID]
    text = caplog.text
    assert "SA store write failed: the write lock is held by another process" in text
    assert "status=503 reason=sa-store-busy" in text
    assert "SA store write works again" in text
    assert "Traceback" not in text


def test_background_writes_skip_a_turn_instead_of_waiting(tmp_path: Path, pki: PkiPaths) -> None:
    """Expiry and the delivery batch find the lock held: ``StoreBusyError``
    at once (not SQLite's "database is locked" after its 5 s wait), the
    batch is kept for the next turn, and the store's live view survives (a
    rebuild costs O(live SAs))."""
    st, db = stack(tmp_path, pki)

    async def main() -> tuple[BaseException | None, bool, bool, list[str]]:
        async with st:
            hac = st.hac
            assert hac is not None
            issued = await hac.issue_sa("view@mipsec.test", Suite.AES_128_CBC_SHA256, 1)
            store = hac.store
            assert isinstance(store, SQLiteSAStore)
            store.live_summary(datetime.now(UTC))
            view = store._view
            assert view is not None
            raised: BaseException | None = None
            with write_lock(db):
                try:
                    hac.expire_now()
                except Exception as exc:  # noqa: BLE001 - the type is the assertion
                    raised = exc
                hac._to_mark_delivered.add(issued.sa.spi)
                hac._confirm_now()
                kept = issued.sa.spi in hac._to_mark_delivered
            same_view = store._view is view
            hac._confirm_now()  # the lock released: written now
            with sqlite3.connect(db) as c:
                pending = [
                    r[0] for r in c.execute("SELECT mn_id FROM issued_sa WHERE pending IS NOT NULL")
                ]
            return raised, kept, same_view, pending

    raised, kept, same_view, pending = run(main())
    assert isinstance(raised, StoreBusyError)
    assert kept and same_view
    assert pending == []


def test_a_revoke_waits_out_the_lock_from_the_event_loop(tmp_path: Path, pki: PkiPaths) -> None:
    """``mipsec revoke`` while another process holds the store's write
    lock: the command waits (from the event loop, not inside SQLite for up
    to 5 s) -- meanwhile another client's TLS handshake completes -- and,
    the lock released, records the withdrawal: the answer lists the SPI, with
    nothing "not recorded", the store holds no live SA, its HA none."""
    st, db = stack(tmp_path, pki, revocations=tmp_path / "revoked.json")

    async def main() -> tuple[bool, str | None, dict[str, Any], int, int, int]:
        async with st:
            hac, ha = st.hac, st.ha
            assert hac is not None and ha is not None
            got = await bootstrap(mn_config(pki, st.port))
            assert got.issued is not None
            ops = HacOps(hac, "<memory>")
            with write_lock(db):
                task = asyncio.create_task(ops.revoke({"mn_id": MN_ID}))
                await asyncio.sleep(0.1)  # a few tries found the lock held
                other = await handshake(pki, st.port)  # served meanwhile
                pending = not task.done()
            out = await task
            await until(lambda: not ha.core.spis())
            live = len(hac.store.live(datetime.now(UTC)))
            await ops.aclose()
            return pending, other, out, got.issued.sa.spi, live, len(ha.core.spis())

    pending, other, out, spi, live, on_ha = run(main())
    assert pending and other is not None and other.startswith("TLS")
    assert out["withdrawn"] == [spi] and "not_recorded" not in out
    assert (live, on_ha) == (0, 0)


def test_a_take_back_on_a_held_lock_leaves_it_to_the_sweep(
    tmp_path: Path, pki: PkiPaths, caplog: Any
) -> None:
    """A failure path takes back an SA while another process holds the
    write lock: one line at once (not SQLite's 5 s wait on the loop), the
    row stays marked undelivered -- and the sweep, the lock released,
    retires it and withdraws it from its HA."""
    st, db = stack(tmp_path, pki)

    async def main() -> tuple[bool, int, int]:
        async with st:
            hac, ha = st.hac, st.ha
            assert hac is not None and ha is not None
            issued = await hac.issue_sa("back@mipsec.test", Suite.AES_128_CBC_SHA256, 1)
            spi = issued.sa.spi
            with write_lock(db):
                hac.rollback(issued, "127.0.0.1", "test")
            still = hac.store.get(spi, datetime.now(UTC)) is not None
            hac._issuing_bound = lambda: -1.0  # type: ignore[method-assign]  # any age is due
            hac._sweep_safely()
            await until(lambda: spi not in ha.core.spis())
            return still, len(hac.store.live(datetime.now(UTC))), len(ha.core.spis())

    with caplog.at_level(logging.INFO):
        still, live, on_ha = run(main())
    assert still and (live, on_ha) == (0, 0)
    assert "cannot retire it now (StoreBusyError: the write lock is held" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_withdrawal_past_max_sas_per_mn_is_retried_from_the_loop(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """The 200 has left and an older SA of the MN (beyond ``max_sas_per_mn``)
    is to be retired while another process holds the write lock: ``deliver``
    returns at once (no wait inside SQLite), the retirement is retried from
    the event loop, and once the lock is released the older SA leaves the
    store and its HA."""
    st, db = stack(tmp_path, pki)

    async def main() -> tuple[bool, list[int], list[int]]:
        async with st:
            hac, ha = st.hac, st.ha
            assert hac is not None and ha is not None
            issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            # An older SA of the same MN, stored beside it (as another HAC
            # sharing the store, or one from before a policy change, leaves).
            older = IssuedSA(
                new_sa(
                    spi=0x5A5A5,
                    mn_id=MN_ID,
                    suite=Suite.AES_128_CBC_SHA256,
                    scope=1,
                    lifetime=60,
                    now=datetime.now(UTC),
                    ha_id="ha1",
                ),
                issued.bootstrap,
            )
            assert hac.store.add(older)
            with write_lock(db):
                hac.deliver(issued, "127.0.0.1")
                await asyncio.sleep(0.05)  # tries meet the lock
                held = hac.store.get(older.sa.spi, datetime.now(UTC)) is not None
            await until(lambda: hac.store.get(older.sa.spi, datetime.now(UTC)) is None)
            live = sorted(i.sa.spi for i in hac.store.live(datetime.now(UTC)))
            return held, live, [issued.sa.spi]

    held, live, expected = run(main())
    assert held
    assert live == expected


def test_transaction_wait_zero_on_a_held_lock(tmp_path: Path) -> None:
    """core/sqlitetx.transaction(wait=0): StoreBusyError, nothing begun, and
    the connection's own busy_timeout restored."""
    db = tmp_path / "t.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.execute("PRAGMA busy_timeout = 5000")
    with write_lock(db):
        with pytest.raises(StoreBusyError, match="held by another process"):
            with transaction(conn, wait=0.0):
                conn.execute("INSERT INTO t VALUES (1)")
        assert not conn.in_transaction
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    with transaction(conn, wait=0.0):
        conn.execute("INSERT INTO t VALUES (2)")
    assert conn.execute("SELECT x FROM t").fetchall() == [(2,)]
    conn.close()


# ------------------------------------------------------------ the HA's burst commit


def test_the_ha_withholds_a_burst_instead_of_waiting_for_the_lock(
    tmp_path: Path, caplog: Any
) -> None:
    """The binding cache's write lock held by another process: the BU's BA
    is withheld at once (not after SQLite's 5 s wait, which held every
    MN's BUs and data on the HA's loop), one line says why, and the MN's
    next BU, the lock released, gets its BA -- on disk."""

    async def main() -> tuple[int, int, bool, int]:
        svc = HaService(ha_config(tmp_path))
        addrs = await svc.start()
        try:
            issued = make_issued()
            await svc.install_sa(issued)
            mn = MN(issued)
            with write_lock(tmp_path / "bindings.sqlite"):
                await mn.send(mn.bu(1), addrs[0])
                await until(lambda: svc.stats()["store_errors"] == 1)
                withheld = svc.stats()["withheld"]
                silent = await mn.nothing(0.3)
            ba = await mn.register(2, addrs[0])
            mn.close()
            return withheld, svc.stats()["store_errors"], silent, ba.status
        finally:
            await svc.stop()

    with caplog.at_level(logging.INFO):
        withheld, errors, silent, status = run(main())
    assert (withheld, errors, silent, status) == (1, 1, True, 0)
    assert "failed: the write lock is held by another process" in caplog.text
    on_disk = BindingCache(tmp_path / "bindings.sqlite")
    try:
        b = on_disk.get(str(HOA))
        assert b is not None and b.sequence == 2
    finally:
        on_disk.close()


@pytest.mark.parametrize("in_sa_store", [False, True])
def test_an_install_fails_at_once_on_a_held_lock_and_leaves_nothing(
    tmp_path: Path, in_sa_store: bool
) -> None:
    """An install burst from the HAC while the HA's SA store is locked by
    another process: ``StoreBusyError`` within ``LOOP_LOCK_WAIT`` (not
    SQLite's "database is locked" after 5 s on the HA's loop), the SA is
    not live in the HA's core or store; once the lock is free, the same
    install succeeds.  With its binding cache in its own file and in the
    SA store's (``[bindings] in_sa_store``)."""
    extra: dict[str, Any] = {"bindings": {"in_sa_store": True}} if in_sa_store else {}
    issued = make_issued()

    async def main() -> tuple[list[Any], bool, int, bool]:
        svc = HaService(ha_config(tmp_path, **extra))
        await svc.start()
        try:
            with write_lock(tmp_path / "sa.sqlite"):
                failed = svc.install_many_now([(issued, "ha1", ())])
            live = svc.core.has_spi(issued.sa.spi)
            stored = len(svc.store.live(datetime.now(UTC)))
            svc.install_sa_now(issued, "ha1", ())
            return failed, live, stored, svc.core.has_spi(issued.sa.spi)
        finally:
            await svc.stop()

    failed, live, stored, after = run(main())
    assert [type(x) for x in failed] == [StoreBusyError]
    assert (live, stored, after) == (False, 0, True)


def test_a_withdrawal_fails_at_once_on_a_held_lock_and_is_retried(tmp_path: Path) -> None:
    """The HAC's withdrawal reaches an HA whose binding cache is locked by
    another process: ``StoreBusyError`` within ``LOOP_LOCK_WAIT`` (the HAC
    gets no confirmation and retries, as it does); the retry, the lock
    free, withdraws the SA for good and the store forgets it."""
    issued = make_issued()

    async def main() -> tuple[list[str], bool, int]:
        svc = HaService(ha_config(tmp_path))
        await svc.start()
        try:
            svc.install_sa_now(issued, "ha1", ())
            raised: list[str] = []
            with write_lock(tmp_path / "bindings.sqlite"):
                try:
                    svc.withdraw_sa_now(issued.sa.spi)
                except Exception as exc:  # noqa: BLE001 - the type is the assertion
                    raised.append(type(exc).__name__)
            svc.withdraw_sa_now(issued.sa.spi)
            await until(lambda: not svc._to_discard)
            return raised, svc.core.has_spi(issued.sa.spi), len(svc.store.live(datetime.now(UTC)))
        finally:
            await svc.stop()

    assert run(main()) == (["StoreBusyError"], False, 0)


def test_a_stop_waits_for_the_lock_to_write_its_delivery_marks(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """A clean stop writes the marks of the SAs whose 200 left; the batch
    skips a turn on a held lock, but the stop's last write waits for it
    (as SQLite would, up to 5 s): a mark lost there would make the next
    run's sweep take back an SA its MN holds."""
    st, db = stack(tmp_path, pki)
    released = threading.Event()

    def hold_briefly() -> None:
        with write_lock(db):
            started.set()
            time.sleep(0.3)
        released.set()

    started = threading.Event()

    async def main() -> int | None:
        async with st:
            hac = st.hac
            assert hac is not None
            result = await bootstrap(mn_config(pki, st.port))
            assert hac._to_mark_delivered  # the batch is not due yet (1 s)
            threading.Thread(target=hold_briefly, daemon=True).start()
            await asyncio.to_thread(started.wait, 10)
        return result.status  # stopped: the lock was held when the stop began

    assert run(main()) == 200
    assert released.is_set()
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM issued_sa WHERE pending IS NOT NULL").fetchone() == (
            0,
        )
    assert rows(db) == [MN_ID]


def test_the_sweep_reads_the_owed_withdrawals_in_a_worker_thread(
    tmp_path: Path, pki: PkiPaths, caplog: Any
) -> None:
    """Adoption (a withdrawal another HAC owes, unconfirmed at two sweeps in a
    row) reads every owed row -- 100,000 after a mass revocation while an HA
    was down, about 1 s -- on a connection of its own in a worker thread,
    never on the event loop; what it sifts is adopted on the loop."""
    st, _db = stack(tmp_path, pki)
    threads: list[str] = []

    async def main() -> tuple[bool, bool]:
        async with st:
            hac, ha = st.hac, st.ha
            assert hac is not None and ha is not None
            store = hac.store
            assert isinstance(store, SQLiteSAStore)
            real = store.retired_unconfirmed_apart

            def spy(now: datetime) -> Any:
                threads.append(threading.current_thread().name)
                return real(now)

            store.retired_unconfirmed_apart = spy  # type: ignore[method-assign]
            # Another HAC's SA, installed on the HA, retired by that HAC, which died.
            issued = await hac.issue_sa("owed@mipsec.test", Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(issued, "127.0.0.1")
            spi = issued.sa.spi
            store.retire(spi, "revoked")  # by "the other HAC": nothing scheduled here
            first_owed = spi in hac._withdrawing
            for _ in range(2):  # seen at two sweeps in a row
                hac._sweep_safely()
                await until(lambda: hac._adopting is None)
            await until(lambda: not ha.core.has_spi(spi))
            return first_owed, spi in hac._withdrawing or not ha.core.has_spi(spi)

    with caplog.at_level(logging.INFO):
        first_owed, adopted = run(main())
    assert not first_owed and adopted
    assert threads and all(name != threading.main_thread().name for name in threads)
    assert "withdrawing them from here too" in caplog.text


def test_a_start_names_withdrawals_owed_to_another_hacs_ha_in_one_line(
    tmp_path: Path, pki: PkiPaths, caplog: Any
) -> None:
    """The store holds withdrawals owed to an HA only another HAC sharing it
    has configured: a start leaves them to that HAC with one line for them
    all (before: a WARNING per SPI at every start)."""
    st, db = stack(tmp_path, pki)
    store = SQLiteSAStore(db)
    try:
        for spi in (0x301, 0x302, 0x303):
            sa = new_sa(
                spi=spi,
                mn_id=f"m{spi}@mipsec.test",
                suite=Suite.AES_128_CBC_SHA256,
                scope=1,
                lifetime=600,
                now=datetime.now(UTC),
                ha_id="ha9",
            )
            assert store.add(IssuedSA(sa, BootstrapData()))
            store.retire(spi, "revoked")
    finally:
        store.close()

    async def main() -> int:
        async with st:
            assert st.hac is not None
            return len(st.hac._withdrawing)

    with caplog.at_level(logging.INFO):
        withdrawing = run(main())
    assert withdrawing == 0
    assert "3 withdrawal(s) owed to HA ha9, not configured here" in caplog.text
    assert "cannot withdraw, HA ha9" not in caplog.text
