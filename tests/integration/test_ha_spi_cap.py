"""[ha] max_spi_records through a real HA process (twenty-ninth session).

Found in review: an admitted HAC's install + withdraw pairs of made-up SAs
each left a withdrawal record until the SA's validity end (70,104 pairs in
95 s: 70,104 records, kept across a restart, RSS 59 -> 91 MB).  Live SAs
plus withdrawal records are now capped: an install beyond is refused (400
prov-reason refused, one line per burst, counted in ``mipsec status`` and
/metrics), a withdrawal never is; a reload raises the cap live.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from conftest import Lab, edit_toml, mipsec
from test_crash_points import _AsHac, _sa
from test_ha_restart_replay import HaProcess

from mipsec.core.provisioning import encode_install, encode_withdraw


def _status(lab: Lab) -> dict[str, Any]:
    out = mipsec("status", "--config", lab.info["ha"]["config"], "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    counters: dict[str, Any] = json.loads(out.stdout)["counters"]
    return counters


def _send(lab: Lab, port: int, *contents: bytes) -> list[int] | None:
    hac = _AsHac(lab, port)
    try:
        hac.send(*contents)
        return hac.answers(len(contents))
    finally:
        hac.close()


def test_spi_records_cap_refuses_installs_never_withdrawals(lab: Lab) -> None:
    ha_toml = Path(lab.info["ha"]["config"])
    edit_toml(
        ha_toml, "max_binding_lifetime = 3600", "max_binding_lifetime = 3600\nmax_spi_records = 4"
    )
    ha = HaProcess(lab)
    ha.start()
    try:
        port = ha.port
        sas = [_sa(0x6100 + i, f"2001:db8:1::{0x100 + i:x}")[0] for i in range(6)]
        # Three made-up SAs installed and withdrawn at once, one live: 4 records.
        pairs = [c for iss in sas[:3] for c in (encode_install(iss), encode_withdraw(iss.sa.spi))]
        assert _send(lab, port, *pairs, encode_install(sas[3])) == [200] * 7
        # Beyond the cap: two installs of one burst refused, nothing changed.
        assert _send(lab, port, encode_install(sas[4]), encode_install(sas[5])) == [400, 400]
        st = _status(lab)
        assert (st["spi_records"], st["withdrawn_spis"], st["sas"]) == (4, 3, 1)
        assert (st["installs_refused_full"], st["max_spi_records"]) == (2, 4)
        # A withdrawal is never refused: the live SA's, and an SPI never held.
        assert _send(lab, port, encode_withdraw(sas[3].sa.spi), encode_withdraw(0x6999)) == [
            200,
            200,
        ]
        metrics = urllib.request.urlopen(lab.info["ha"]["metrics"], timeout=10).read().decode()
        assert "mipsec_ha_installs_refused_full_total 2.0" in metrics
        assert "mipsec_ha_spi_records 5.0" in metrics and "mipsec_ha_spi_records_max 4.0" in metrics
        log = ha.stop()
        # One line for the burst of refusals (the rest at DEBUG, then counted).
        refused = [ln for ln in log.splitlines() if "refused: this HA holds" in ln]
        assert len(refused) == 1 and "[ha] max_spi_records = 4" in refused[0], log
        # The records survive a restart, and so does the refusal.
        ha.start()
        assert _send(lab, port, encode_install(sas[4])) == [400]
        # A reload raises the cap live.
        edit_toml(ha_toml, "max_spi_records = 4", "max_spi_records = 8")
        out = mipsec("reload", "--config", str(ha_toml), timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _send(lab, port, encode_install(sas[4]), encode_install(sas[5])) == [200, 200]
        assert _status(lab)["spi_records"] == 7
    finally:
        ha.close()
