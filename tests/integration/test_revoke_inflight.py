"""``revoke`` while the MN's SA is being issued: the exchange ends without a
response and nothing of it stays live (in one process, as test_hac_lifecycle)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_hac_lifecycle import (  # noqa: F401  (pki: a fixture)
    MN_ID,
    FullDiskStore,
    SlowLocal,
    Stack,
    bootstrap,
    done_request,
    eventually,
    full_disk_stack,
    hac_config,
    hac_data,
    mn_config,
    pki,
    run,
)

from mipsec.core.mn_exchange import Finished
from mipsec.core.pki import PkiPaths
from mipsec.core.revocation import RevocationList
from mipsec.core.roles.hac_ops import HacOps
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore


def test_revoke_during_issue_leaves_nothing_live(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """... and the exchange's audit lines say "revoked" (they said
    "service-stopped", as at a stop: found in review)."""
    caplog.set_level(logging.INFO)
    data = hac_data(tmp_path, pki)
    ha_cfg = hac_config(data, tmp_path).local_ha
    del data["local_ha"]
    data["ha"][0]["transport"] = "slow-local"
    data["revocations"] = {"path": str(tmp_path / "revoked.json")}
    slow = SlowLocal(0.5)

    async def main() -> None:
        async with Stack(hac_config(data, tmp_path), [slow], ha_cfg=ha_cfg) as st:
            assert st.hac is not None and st.ha is not None
            ops = HacOps(st.hac, "<memory>")
            reader, writer, exch = await done_request(st, pki)
            await asyncio.sleep(0.1)  # the HAC is now issuing (provisioning takes 0.5 s)
            result = await ops.revoke({"mn_id": MN_ID})
            assert result["exchanges_ended"] == 1
            # Ended, not answered: no 200 -- and no 500 from an issue that
            # ran into its own withdrawal either.
            got = await asyncio.wait_for(reader.read(65540), 5)
            assert got == b""
            writer.close()
            # Provisioning completes on the HA, then is taken back.
            await asyncio.sleep(slow.delay + 0.2)
            now = datetime.now(UTC)
            assert st.hac.store.live(now) == []
            assert await eventually(lambda: st.ha is not None and st.ha.core.spis() == [])
            assert MN_ID in st.hac.revocations
            await ops.aclose()

    run(main())
    text = caplog.text
    assert "reason=revoked" in text and "service-stopped" not in text, text[-3000:]


def test_revoke_while_the_store_cannot_write_still_withdraws_from_the_ha(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A revocation during a store outage (full disk): the revocation itself
    is persisted (its own file), the store cannot record the SA's retirement
    -- and the HA is told to withdraw it all the same, so the revoked MN's
    SA stops working at once; one line says so, and the answer lists it."""
    revoked = tmp_path / "revoked.json"

    async def main() -> None:
        async with full_disk_stack(tmp_path, pki, revocations=revoked) as st:
            hac = st.hac
            assert hac is not None and st.ha is not None
            got = await bootstrap(mn_config(pki, st.port))
            assert got.ok and got.issued is not None
            spi = got.issued.sa.spi
            ops = HacOps(hac, "<memory>")
            FullDiskStore.full = True
            result = await ops.revoke({"mn_id": MN_ID})
            assert result["withdrawn"] == [spi] and result["not_recorded"] == [spi]
            assert await eventually(lambda: st.ha is not None and not st.ha.core.has_spi(spi))
            assert MN_ID in hac.revocations
            await ops.aclose()

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [
        r.getMessage() for r in caplog.records if "cannot record the revocation" in r.getMessage()
    ]
    assert len(lines) == 1 and "database or disk is full" in lines[0], lines
    assert all(r.exc_info is None for r in caplog.records)


def test_revoked_by_another_hac_while_issuing_gets_401_and_nothing_stays(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two HACs share one revocation list.  The other HAC revokes the MN
    while this one is issuing its SA (after this one's check at
    authentication): this HAC cannot end the exchange the way its own
    ``revoke`` does, so it looks at the list again once the SA is stored --
    the MN gets 401 ``revoked``, not a 200, and the SA is taken back from the
    store and withdrawn from the HA."""
    data = hac_data(tmp_path, pki)
    ha_cfg = hac_config(data, tmp_path).local_ha
    del data["local_ha"]
    data["ha"][0]["transport"] = "slow-local"
    shared = tmp_path / "revoked.json"
    data["revocations"] = {"path": str(shared)}
    slow = SlowLocal(0.5)

    async def main() -> int | None:
        async with Stack(hac_config(data, tmp_path), [slow], ha_cfg=ha_cfg) as st:
            assert st.hac is not None and st.ha is not None
            other_hac = RevocationList(shared)  # the other HAC's view of the same files
            reader, writer, exch = await done_request(st, pki)
            await asyncio.sleep(0.1)  # this HAC is now issuing (provisioning takes 0.5 s)
            assert other_hac.add(MN_ID)
            got = await asyncio.wait_for(reader.read(65540), 5)
            writer.close()
            finished = [e for e in exch.receive_data(got) if isinstance(e, Finished)]
            now = datetime.now(UTC)
            assert st.hac.store.live(now) == []
            assert await eventually(lambda: st.ha is not None and st.ha.core.spis() == [])
            return finished[0].result.status if finished else None

    with caplog.at_level(logging.INFO):
        status = run(main())
    assert status == 401
    assert "reason=revoked" in caplog.text
    assert "Traceback" not in caplog.text


def _shared_store_and_list(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
) -> tuple[dict[str, Any], Any, Path, SlowLocal]:
    """A HAC whose SA store file and revocation list another HAC (the test's
    own connections) shares, its HA in process behind a slow transport."""
    data = hac_data(tmp_path, pki)
    ha_cfg = hac_config(data, tmp_path).local_ha
    del data["local_ha"]
    data["ha"][0]["transport"] = "slow-local"
    data["sa_store"] = {"backend": "sqlite", "path": str(tmp_path / "sa.db")}
    shared = tmp_path / "revoked.json"
    data["revocations"] = {"path": str(shared)}
    return data, ha_cfg, shared, SlowLocal(0.0)


async def _holding_w(st: Stack, pki: PkiPaths) -> tuple[Any, int]:  # noqa: F811
    """The stack's HAC, once the MN holds its first SA W (its SPI)."""
    assert st.hac is not None and st.ha is not None
    first = await bootstrap(mn_config(pki, st.port))
    assert first.ok and first.issued is not None
    return st.hac, first.issued.sa.spi


async def _refused(
    st: Stack, slow: SlowLocal, x: int, w: int, conn: tuple[Any, Any, Any]
) -> tuple[int | None, int]:
    """X withdrawn from the HA, so its install is refused: the MN's final
    status and how many SAs are live once W is off the HA."""
    hac, ha = st.hac, st.ha
    assert hac is not None and ha is not None
    reader, writer, exch = conn
    await slow.inner.withdraw(hac.has[0], x, 1.0)
    got = await asyncio.wait_for(reader.read(65540), 5)
    writer.close()
    finished = [e for e in exch.receive_data(got) if isinstance(e, Finished)]
    assert await eventually(lambda: not ha.core.has_spi(w))
    live = hac.store.live(datetime.now(UTC))
    return (finished[0].result.status if finished else None), len(live)


def test_a_revoke_on_another_hac_during_a_rebootstrap_finds_both_sas(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
) -> None:
    """Two HACs share one store and one revocation list.  The MN holds SA W.
    Its re-bootstrap on this HAC stores X; while X's install is on its way,
    the other HAC revokes the MN: it writes the list, finds W and X live,
    retires both and has the HA withdraw them.  The HA then refuses X's
    install (an SPI it withdrew): the MN gets 504, and nothing of it stays
    live.

    Until the twenty-ninth session X's store write retired W at once, and
    the put-back after the refusal had to notice the revoke: the other HAC
    found only X (two tests here covered the put-back racing the revoke).
    Now W is untouched until X's 200, so the revoke sees it like any live
    SA, and there is no put-back to race."""
    data, ha_cfg, shared, slow = _shared_store_and_list(tmp_path, pki)

    async def main() -> tuple[int | None, int, list[int], int, int]:
        async with Stack(hac_config(data, tmp_path), [slow], ha_cfg=ha_cfg) as st:
            hac, w = await _holding_w(st, pki)
            slow.delay = 0.5
            reader, writer, exch = await done_request(st, pki)
            await asyncio.sleep(0.2)  # X is stored; its install waits
            other_store = SQLiteSAStore(tmp_path / "sa.db")  # the other HAC's connection
            try:
                now = datetime.now(UTC)
                # The other HAC's revoke: the list first, then the MN's live SAs.
                assert RevocationList(shared).add(MN_ID)
                found = sorted(s.sa.spi for s in other_store.live_for_mn(MN_ID, now))
                for spi in found:
                    assert other_store.retire(spi, "revoked") is not None
            finally:
                other_store.close()
            (x,) = [s for s in found if s != w]
            await slow.inner.withdraw(hac.has[0], w, 1.0)  # what X's refusal waits for
            return *await _refused(st, slow, x, w, (reader, writer, exch)), found, w, x

    status, live, found, w, x = run(main())
    assert found == sorted([w, x])
    assert status == 504  # the HA refused X
    assert live == 0


def test_a_pull_never_hands_out_an_sa_of_a_revoked_mn(tmp_path: Path, pki: PkiPaths) -> None:  # noqa: F811
    """A revoke lists the MN before it retires its SAs: a pull (PROFILE §9)
    in between -- or one after a retire that failed -- gets nothing for that
    MN's SA, answered like an unknown SPI; before the revoke it was served
    (found in review: defence in depth)."""
    from mipsec.core.suites import Suite

    data = hac_data(tmp_path, pki)
    data["revocations"] = {"path": str(tmp_path / "revoked.json")}

    async def main() -> tuple[bool, bool]:
        async with Stack(hac_config(data, tmp_path)) as st:
            hac = st.hac
            assert hac is not None
            issued = await hac.issue_sa(MN_ID, Suite.AES_128_CBC_SHA256, 1)
            hac.deliver(issued, "127.0.0.1:1")
            before = await hac._on_pull(issued.sa.spi, "ha1")
            hac.revocations.add(MN_ID)  # listed; its SA not retired yet
            after = await hac._on_pull(issued.sa.spi, "ha1")
            return before == issued, after is None

    assert run(main()) == (True, True)


@pytest.mark.parametrize("bad", ["alice@home.example\r", "alice smith@home.example", "\ud800@x"])
def test_a_revoke_of_an_identity_no_mn_can_send_is_refused(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
    bad: str,
) -> None:
    """``mipsec revoke`` of an identity no MN can send (a CR from a pasted
    line, a space, a lone surrogate): refused naming ``mn_id``, nothing
    persisted.  Before, it was acknowledged as revoked and never matched the
    MN, or ended in "internal error" (found in review)."""
    from mipsec.core.control import ControlError

    data = hac_data(tmp_path, pki)
    data["revocations"] = {"path": str(tmp_path / "revoked.json")}

    async def main() -> tuple[str, int]:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None
            ops = HacOps(st.hac, "<memory>")
            try:
                with pytest.raises(ControlError) as err:
                    await ops.revoke({"mn_id": bad})
                return str(err.value), len(st.hac.revocations)
            finally:
                await ops.aclose()

    message, listed = run(main())
    assert message.startswith("mn_id: ") and listed == 0


def test_a_revoke_on_a_list_that_cannot_be_read_back_says_why(
    tmp_path: Path,
    pki: PkiPaths,  # noqa: F811
) -> None:
    """Another writer left a bad line in the shared list's journal: a revoke
    is refused naming ``revocations.path`` and the reason, not "internal
    error: ConfigError" (found in review)."""
    from mipsec.core.control import ControlError

    listed = tmp_path / "revoked.json"
    data = hac_data(tmp_path, pki)
    data["revocations"] = {"path": str(listed)}

    async def main() -> str:
        async with Stack(hac_config(data, tmp_path)) as st:
            assert st.hac is not None
            ops = HacOps(st.hac, "<memory>")
            try:
                await ops.revoke({"mn_id": "a@home.example"})
                with open(f"{listed}.journal", "ab") as f:
                    f.write(b"garbage\n")
                with pytest.raises(ControlError) as err:
                    await ops.revoke({"mn_id": "b@home.example"})
                return str(err.value)
            finally:
                await ops.aclose()

    message = run(main())
    assert message.startswith("revocations.path: ") and "line 2" in message, message
