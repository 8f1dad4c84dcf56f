"""``revoke`` while the MN's SA is being issued: the exchange ends without a
response and nothing of it stays live (in one process, as test_hac_lifecycle)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

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


def test_revoke_during_issue_leaves_nothing_live(tmp_path: Path, pki: PkiPaths) -> None:  # noqa: F811
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
