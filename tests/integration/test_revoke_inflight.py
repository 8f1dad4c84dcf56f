"""``revoke`` while the MN's SA is being issued: the exchange ends without a
response and nothing of it stays live (in one process, as test_hac_lifecycle)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from test_hac_lifecycle import (  # noqa: F401  (pki: a fixture)
    MN_ID,
    SlowLocal,
    Stack,
    done_request,
    eventually,
    hac_config,
    hac_data,
    pki,
    run,
)

from mipsec.core.pki import PkiPaths
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
