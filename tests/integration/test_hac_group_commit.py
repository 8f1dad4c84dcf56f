"""The HAC's group commit (issue 9 item 3): the SAs issued in one event-loop
turn are stored in one transaction, one commit.

A real ``HacService`` with its HA in the same process (``[local_ha]``), the
SQLite store on a file; the store is observed, and failures injected, by a
store plugin registered through ``mipsec_sa_stores`` -- the hook a third
party uses -- that subclasses the shipped SQLite store.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_hac_lifecycle import MN_ID, Stack, hac_config, hac_data, mn_config, run

from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.model import HomeAgentInfo
from mipsec.core.pki import PkiPaths, init_pki
from mipsec.core.roles.hac import IssueFailure
from mipsec.core.roles.mn import bootstrap
from mipsec.core.suites import Suite
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

SUITE = Suite.AES_128_CBC_SHA256


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki"))


class WatchedStore(SQLiteSAStore):
    """The SQLite store, counting its commits and failing a COMMIT on demand."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits = 0
        self.fail_commit = False
        self.selects: list[str] = []  # SELECTs that read issued_sa
        self._conn.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        # A write outside BEGIN ... COMMIT is a transaction (and a commit) of
        # its own in autocommit mode.
        head = sql.lstrip().split(None, 1)[0].upper()
        if head == "SELECT" and "FROM issued_sa" in sql:
            self.selects.append(sql)
        if head == "COMMIT" or (
            head in ("INSERT", "UPDATE", "DELETE") and not self._conn.in_transaction
        ):
            self.commits += 1

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with super().transaction():
            yield
            if self.fail_commit:  # as a full disk fails the COMMIT
                raise sqlite3.OperationalError("database or disk is full")


class WatchedPlugin:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.store: WatchedStore | None = None

    @hookimpl
    def mipsec_sa_stores(self) -> list[Any]:
        plugin = self

        class Factory:
            name = "watched"

            def create(self, options: Mapping[str, Any], ctx: PluginContext) -> WatchedStore:
                plugin.store = WatchedStore(plugin.path)
                return plugin.store

        return [Factory()]


class PickySelector:
    """Chooses the first HA, and fails (a plugin bug) for one MN."""

    @hookimpl
    def mipsec_ha_selectors(self) -> list[Any]:
        class Selector:
            def select(
                self, mn_id: str, candidates: Any, live_sas: Mapping[str, int]
            ) -> HomeAgentInfo | None:
                if mn_id.startswith("boom"):
                    raise RuntimeError("selector bug")
                return candidates[0] if candidates else None

        class Factory:
            name = "picky"

            def create(self, options: Mapping[str, Any], ctx: PluginContext) -> Selector:
                return Selector()

        return [Factory()]


def stack(tmp_path: Path, pki: PkiPaths, *plugins: object, **hoa: Any) -> tuple[Stack, Path]:
    data = hac_data(tmp_path, pki)
    data["sa_store"] = {"backend": "watched"}
    data["home_addresses"].update(hoa)
    if any(isinstance(p, PickySelector) for p in plugins):
        data["ha_selection"] = {"selector": "picky"}
    return Stack(hac_config(data, tmp_path), plugins), tmp_path / "sa.db"


def committed_rows(path: Path) -> list[tuple[str, str]]:
    """(mn_id, ip6_hoa) of every SA row another connection sees: committed."""
    with sqlite3.connect(path) as c:
        return sorted(c.execute("SELECT mn_id, ip6_hoa FROM issued_sa").fetchall())


def mn(i: int) -> str:
    return f"mn{i}@mipsec.test"


def test_sas_issued_in_one_turn_share_one_commit(tmp_path: Path, pki: PkiPaths) -> None:
    """Eight MNs' SAs issued in one turn: one commit, eight rows that another
    connection sees, eight distinct SPIs and home addresses, all on the HA."""
    plugin = WatchedPlugin(tmp_path / "sa.db")
    st, db = stack(tmp_path, pki, plugin)

    async def main() -> tuple[list[Any], int, list[Any]]:
        async with st:
            assert st.hac is not None and st.ha is not None and plugin.store is not None
            before = plugin.store.commits
            issued = await asyncio.gather(*(st.hac.issue_sa(mn(i), SUITE, 1) for i in range(8)))
            commits = plugin.store.commits - before
            now = datetime.now(UTC)
            on_ha = [st.ha.store.get(x.sa.spi, now) for x in issued]
            return issued, commits, on_ha

    issued, commits, on_ha = run(main())
    assert commits == 1
    assert len({x.sa.spi for x in issued}) == 8
    assert len({x.bootstrap.ip6_hoa for x in issued}) == 8
    assert committed_rows(db) == sorted((x.sa.mn_id, str(x.bootstrap.ip6_hoa)) for x in issued)
    assert [x.sa.spi if x else None for x in on_ha] == [x.sa.spi for x in issued]


def test_a_group_is_served_from_the_live_view(tmp_path: Path, pki: PkiPaths) -> None:
    """Every SA of a group -- new MNs, then the same MNs again (each
    superseding its first SA) -- is prepared from the store's live view, not
    by SQL over every live SA: the cost per bootstrap must not grow with the
    number of MNs (issue 9).  A member prepared at an instant the view had
    already passed (the previous member's supersede step read it later) once
    sent every later member of the group to SQL."""
    plugin = WatchedPlugin(tmp_path / "sa.db")
    st, _db = stack(tmp_path, pki, plugin)

    async def main() -> tuple[list[str], int, list[Any]]:
        async with st:
            hac = st.hac
            assert hac is not None and plugin.store is not None
            first = await asyncio.gather(*(hac.issue_sa(mn(i), SUITE, 1) for i in range(8)))
            for x in first:
                hac.deliver(x, "127.0.0.1:1")
            plugin.store.selects.clear()
            commits = plugin.store.commits
            again = await asyncio.gather(*(hac.issue_sa(mn(i), SUITE, 1) for i in range(8)))
            commits = plugin.store.commits - commits
            selects = list(plugin.store.selects)
            for x in again:  # each first SA superseded once the second's 200 has left
                hac.deliver(x, "127.0.0.1:1")
            live = sorted(x.sa.spi for x in hac.store.live(datetime.now(UTC)))
            assert live == sorted(x.sa.spi for x in again)
            return selects, commits, again

    selects, commits, again = run(main())
    assert selects == []
    assert commits == 1
    assert len({x.sa.spi for x in again}) == 8


def test_a_group_sees_its_own_home_addresses(tmp_path: Path, pki: PkiPaths) -> None:
    """Four new MNs in one turn, three addresses in the pool: each member's
    home address is chosen with the earlier members' rows in view, so three
    get distinct addresses and the fourth 503 (pool exhausted), not a
    duplicate."""
    plugin = WatchedPlugin(tmp_path / "sa.db")
    st, db = stack(tmp_path, pki, plugin, ip6_first="2001:db8:1::1", ip6_last="2001:db8:1::3")

    async def main() -> list[Any]:
        async with st:
            assert st.hac is not None
            return await asyncio.gather(
                *(st.hac.issue_sa(mn(i), SUITE, 1) for i in range(4)), return_exceptions=True
            )

    got = run(main())
    ok = [x for x in got if not isinstance(x, BaseException)]
    failed = [x for x in got if isinstance(x, BaseException)]
    assert sorted(str(x.bootstrap.ip6_hoa) for x in ok) == [f"2001:db8:1::{i}" for i in (1, 2, 3)]
    assert len(failed) == 1 and isinstance(failed[0], IssueFailure)
    assert failed[0].status == 503 and str(failed[0]) == "home-address-pool-exhausted"
    assert len(committed_rows(db)) == 3


def test_a_failed_group_commit_keeps_nothing_and_frees_its_addresses(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """The COMMIT fails (a full disk): every MN of the group gets the store's
    error, the store holds none of their SAs, no HA was asked to install one,
    and the addresses they were given are free again for the next group."""
    plugin = WatchedPlugin(tmp_path / "sa.db")
    st, db = stack(tmp_path, pki, plugin)

    async def main() -> tuple[list[Any], list[Any], int]:
        async with st:
            assert st.hac is not None and st.ha is not None and plugin.store is not None
            plugin.store.fail_commit = True
            failed = await asyncio.gather(
                *(st.hac.issue_sa(mn(i), SUITE, 1) for i in range(4)), return_exceptions=True
            )
            plugin.store.fail_commit = False
            again = await asyncio.gather(*(st.hac.issue_sa(mn(i), SUITE, 1) for i in range(4)))
            return failed, again, len(st.ha.store.live(datetime.now(UTC)))

    failed, again, on_ha = run(main())
    assert [type(x).__name__ for x in failed] == ["OperationalError"] * 4
    # Nothing of the failed group anywhere: the HA holds only the second group.
    assert on_ha == 4
    assert committed_rows(db) == sorted((x.sa.mn_id, str(x.bootstrap.ip6_hoa)) for x in again)
    assert sorted(str(x.bootstrap.ip6_hoa) for x in again) == [
        f"2001:db8:1::{i}" for i in (1, 2, 3, 4)
    ]


def test_a_failed_group_answers_500_to_each_mn(tmp_path: Path, pki: PkiPaths) -> None:
    """What MNs see of a failed group commit: three real MN bootstraps at
    once, each gets a 500 final response (PROFILE §6) and no SA; the next
    bootstrap, with the store writable again, gets its 200."""
    plugin = WatchedPlugin(tmp_path / "sa.db")
    st, db = stack(tmp_path, pki, plugin)

    async def main() -> tuple[list[int | None], int | None]:
        async with st:
            assert plugin.store is not None
            plugin.store.fail_commit = True
            cfg = mn_config(pki, st.port)
            got = await asyncio.gather(*(bootstrap(cfg) for _ in range(3)))
            plugin.store.fail_commit = False
            return [g.status for g in got], (await bootstrap(cfg)).status

    statuses, after = run(main())
    assert statuses == [500, 500, 500]
    assert after == 200
    assert len(committed_rows(db)) == 1


def test_a_preparation_failure_fails_only_that_member(tmp_path: Path, pki: PkiPaths) -> None:
    """A plugin raising for one MN (here the HA selector) fails that MN alone;
    the rest of its group is stored and committed."""
    plugin = WatchedPlugin(tmp_path / "sa.db")
    st, db = stack(tmp_path, pki, plugin, PickySelector())
    ids = [mn(0), "boom@mipsec.test", mn(2)]

    async def main() -> list[Any]:
        async with st:
            assert st.hac is not None
            return await asyncio.gather(
                *(st.hac.issue_sa(i, SUITE, 1) for i in ids), return_exceptions=True
            )

    got = run(main())
    assert isinstance(got[1], RuntimeError)
    assert [x.sa.mn_id for x in (got[0], got[2])] == [mn(0), mn(2)]
    assert [r[0] for r in committed_rows(db)] == [mn(0), mn(2)]


@pytest.mark.parametrize("when", ["before-the-commit", "after-the-commit"])
def test_a_caller_cancelled_around_the_commit_leaves_nothing_live(
    tmp_path: Path, pki: PkiPaths, when: str
) -> None:
    """The MN goes away while its SA waits for the group's commit.

    Before the commit: nothing of it is written.  After the commit but
    before its task resumed: it is taken back from the store, no HA was
    asked to install it, and the SA it superseded (same MN, same HA) is
    live again -- its HA was never told to withdraw it.
    """
    plugin = WatchedPlugin(tmp_path / "sa.db")
    st, _db = stack(tmp_path, pki, plugin)

    async def main() -> tuple[bool, list[int], int, int, bool]:
        async with st:
            hac = st.hac
            assert hac is not None and st.ha is not None
            old = await hac.issue_sa(mn(1), SUITE, 1)
            hac.deliver(old, "127.0.0.1:1")
            tasks = [asyncio.create_task(hac.issue_sa(mn(i), SUITE, 1)) for i in range(3)]
            await asyncio.sleep(0)  # each task queued its SA; the commit is next
            assert len(hac._group) == 3 and hac._group_handle is not None
            if when == "after-the-commit":
                await asyncio.sleep(0)  # the commit ran; the tasks not resumed yet
                assert not hac._group and not any(t.done() for t in tasks)
            tasks[1].cancel()
            got = await asyncio.gather(*tasks, return_exceptions=True)
            now = datetime.now(UTC)
            live = [x.sa.spi for x in hac.store.live(now) if x.sa.mn_id == mn(1)]
            on_ha = len(st.ha.store.live(now))
            cancelled = isinstance(got[1], asyncio.CancelledError)
            # Only the two others wait for their 200 (``deliver``).
            others = {got[0].sa.spi, got[2].sa.spi}
            return cancelled, live, old.sa.spi, on_ha, hac._issuing_spis == others

    cancelled, live, old_spi, on_ha, issuing = run(main())
    assert cancelled
    # mn1 holds exactly its old SA again; the HA holds it and the other two.
    assert live == [old_spi]
    assert on_ha == 3
    assert issuing


def test_two_hacs_sharing_one_store_never_hand_out_one_address_twice(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """Two HACs on one SQLite file (each its own connection, as two
    processes have), issuing groups of new MNs in the same turns: each
    group's transaction holds the write lock, and its first look at the
    store follows the other HAC's commits (the change log), so the 24 SAs
    get 24 distinct SPIs and 24 distinct home addresses, and both HACs'
    views end with the same 24 live SAs."""
    import copy

    from mipsec.core.labsetup import free_port
    from mipsec.core.roles.hac import HacService

    data = hac_data(tmp_path, pki)
    data["sa_store"] = {"backend": "sqlite", "path": str(tmp_path / "sa.db")}
    other = copy.deepcopy(data)
    other["hac"]["port"] = free_port()
    st = Stack(hac_config(data, tmp_path))

    async def main() -> tuple[list[Any], list[int], list[int]]:
        async with st:
            a = st.hac
            assert a is not None
            b = HacService(hac_config(other, tmp_path))
            await b.start()
            try:
                issued: list[Any] = []
                for turn in range(3):
                    ids = [(turn, i) for i in range(8)]
                    issued += await asyncio.gather(
                        *(
                            (a if i % 2 else b).issue_sa(f"mn{t}-{i}@mipsec.test", SUITE, 1)
                            for t, i in ids
                        )
                    )
                now = datetime.now(UTC)
                seen = [sorted(x.sa.spi for x in h.store.live(now)) for h in (a, b)]
                in_use = [len(h.store.live_summary(now)[1]) for h in (a, b)]  # type: ignore[attr-defined]
                assert seen[0] == seen[1]
                return issued, seen[0], in_use
            finally:
                await b.stop()

    issued, live, in_use = run(main())
    assert len({x.sa.spi for x in issued}) == 24
    assert len({x.bootstrap.ip6_hoa for x in issued}) == 24
    assert live == sorted(x.sa.spi for x in issued)
    assert in_use == [24, 24]


class RefusingTransport:
    """The ``local`` transport, but the HA refuses every install while
    ``refuse`` is set (a 4xx: it installed nothing, withdrew nothing)."""

    name = "refusing"
    in_process = True

    def __init__(self) -> None:
        from mipsec.plugins.transport_local import LocalTransport

        self.inner = LocalTransport()
        self.refuse = False

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> RefusingTransport:
        return self

    async def provision(self, ha: HomeAgentInfo, issued: Any, timeout: float) -> None:
        from mipsec.core.provisioning import ProvisioningRefused

        if self.refuse:
            raise ProvisioningRefused("refused")
        await self.inner.provision(ha, issued, timeout)

    async def withdraw(self, ha: HomeAgentInfo, spi: int, timeout: float) -> None:
        await self.inner.withdraw(ha, spi, timeout)

    @hookimpl
    def mipsec_provisioning_transports(self) -> list[Any]:
        return [self]


def refusing_stack(tmp_path: Path, pki: PkiPaths) -> tuple[tuple[Any, ...], RefusingTransport]:
    """A HAC on a SQLite store whose one HA is reached through a
    ``RefusingTransport``: (Stack arguments, the transport)."""
    data = hac_data(tmp_path, pki)
    data["sa_store"] = {"backend": "sqlite", "path": str(tmp_path / "sa.db")}
    ha_cfg = hac_config(data, tmp_path).local_ha
    del data["local_ha"]
    data["ha"][0]["transport"] = "refusing"
    transport = RefusingTransport()
    return (hac_config(data, tmp_path), [transport], ha_cfg), transport


def test_one_mn_twice_in_a_group_both_refused_leaves_no_undelivered_sa_live(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """One MN bootstraps twice in one event-loop turn (one group commit) and
    its HA refuses both installs: both MNs' exchanges get 504, and no SA
    that the MN was never told about stays live -- in the store or on the
    HA.  Before, the second SA of the group took the first for an older live
    SA and retired it; the first's failure then found nothing to take back,
    and the second's failure put the first back, marked delivered: live for
    good, never swept (found in review)."""
    stack_args, transport = refusing_stack(tmp_path, pki)

    async def main() -> tuple[list[Any], list[int], list[int], list[int], int]:
        async with Stack(*stack_args[:2], ha_cfg=stack_args[2]) as st:
            hac = st.hac
            assert hac is not None and st.ha is not None
            old = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(old, "127.0.0.1:1")
            transport.refuse = True
            got = await asyncio.gather(
                hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1),
                hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1),
                return_exceptions=True,
            )
            await asyncio.sleep(0.2)  # withdrawals in the background
            now = datetime.now(UTC)
            live = [i.sa.spi for i in hac.store.live(now)]
            pending = hac.store.undelivered(datetime(2100, 1, 1, tzinfo=UTC))
            return got, live, pending, st.ha.core.spis(), old.sa.spi

    got, live, pending, on_ha, old = run(main())
    assert [getattr(g, "status", g) for g in got] == [504, 504]
    # Nothing the MN was never told about; the SA it holds stays (twenty-
    # ninth session: its successors' failures no longer take it).
    assert live == [old] and on_ha == [old]
    assert set(pending) <= {old}  # its delivery mark waits for the batch


def test_an_sa_whose_successor_is_refused_keeps_its_delivery_mark(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """The MN's SA A has its 200 -- its delivery mark not yet written (a
    batch a second later) -- when the MN's next SA B is refused by its HA.
    A was never touched (since the twenty-ninth session B's store write no
    longer retires it, to put it back after the refusal), and its mark is
    written by the batch: the sweep of undelivered SAs never takes it from
    the MN that holds it (what the put-back once got wrong, found in
    review)."""
    stack_args, transport = refusing_stack(tmp_path, pki)

    async def main() -> tuple[Any, list[int], list[int], int]:
        async with Stack(*stack_args[:2], ha_cfg=stack_args[2]) as st:
            hac = st.hac
            assert hac is not None
            old = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(old, "127.0.0.1:1")  # its mark waits for the batch
            transport.refuse = True
            try:
                await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            except IssueFailure as exc:
                refused: Any = exc.status
            live = [i.sa.spi for i in hac.store.live(datetime.now(UTC))]
            hac._confirm_now()  # the batch
            pending = hac.store.undelivered(datetime(2100, 1, 1, tzinfo=UTC))
            return refused, live, pending, old.sa.spi

    refused, live, pending, old = run(main())
    assert refused == 504
    assert live == [old]
    assert old not in pending
