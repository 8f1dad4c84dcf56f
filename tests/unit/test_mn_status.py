"""The MN daemon's status (core/mn_status.py) as the loop tells it: states,
bootstrap counts, the SA by SPI and addresses (never a key), the binding's
counters, the kept binding, the data plane's counters."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from ipaddress import IPv6Address
from types import SimpleNamespace
from typing import Any

from mipsec.core.issuer import new_sa
from mipsec.core.mn_status import MnStatus
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.suites import Suite


def _registrar(spi: int) -> Any:
    sa = new_sa(
        spi=spi, mn_id="alice@example.org", suite=Suite.AES_128_CBC_SHA256, scope=1,
        lifetime=600, now=datetime(2026, 12, 7, tzinfo=UTC),
    )  # fmt: skip
    machine = SimpleNamespace(
        registered=True, granted_lifetime=600, last_status=0, sequence=7, retransmissions=1,
        drops=Counter({"bad_icv": 2}), ignored=Counter({"unrequested_ip4_ack": 1}),
    )  # fmt: skip
    return SimpleNamespace(
        issued=IssuedSA(sa, BootstrapData(ip6_hoa=IPv6Address("2001:db8:1::7"))),
        ha=("2001:db8::1", 7872),
        machine=machine,
        moves=0,
        send_errors=0,
    )


def test_the_status_follows_the_loop_and_holds_no_key() -> None:
    clock = [1_800_000_000.0]
    st = MnStatus("alice@example.org", "mn.toml", wall=lambda: clock[0], mono=lambda: clock[0])
    assert st.snapshot()["state"] == "starting"
    st.bootstrapping()
    st.bootstrapped(None, False, "cannot connect to the HAC: refused", None)
    st.waiting(12.5, "cannot connect to the HAC: refused", 1)
    clock[0] += 2
    snap = st.snapshot()
    assert snap["state"] == "waiting" and snap["bootstraps"]["next_in_s"] == 10.5
    assert snap["bootstraps"]["failed"] == 1 and snap["bootstraps"]["failures_in_a_row"] == 1
    assert snap["bootstraps"]["last_failure"]["reason"].startswith("cannot connect")
    old, new = _registrar(1001), _registrar(1002)
    st.bootstrapping()
    st.bootstrapped(200, True, "", 1002)
    st.registering(new)
    st.registered()
    st.kept_of = lambda: SimpleNamespace(live=True, registrar=old)
    st.dataplane = SimpleNamespace(counts={"tun_writes": 5})
    snap = st.snapshot()
    assert snap["state"] == "registered" and snap["bootstraps"]["next_in_s"] is None
    assert snap["bootstraps"]["ok"] == 1 and snap["bootstraps"]["last"]["spi"] == 1002
    assert snap["sa"]["spi"] == 1002 and snap["sa"]["ha"] == "[2001:db8::1]:7872"
    assert snap["sa"]["hoa"] == "2001:db8:1::7" and snap["sa"]["suite"] == "AES_128_CBC_SHA256"
    assert snap["binding"]["ignored"] == {"unrequested_ip4_ack": 1}
    assert snap["binding"]["drops"] == {"bad_icv": 2}
    assert snap["kept"]["spi"] == 1001 and snap["data"] == {"tun_writes": 5}
    text = json.dumps(snap)
    for sa in (old.issued.sa, new.issued.sa):
        for key in (sa.mn_to_ha_ikey, sa.ha_to_mn_ikey, sa.mn_to_ha_ekey, sa.ha_to_mn_ekey):
            assert key.hex() not in text
    st.unregistered(old)  # not the current one: nothing changes
    assert st.snapshot()["sa"]["spi"] == 1002
    st.unregistered(new)
    st.stopping()
    snap = asyncio.run(st.status({}))
    assert snap["sa"] is None and snap["state"] == "stopping"
    assert snap["state_since"] == datetime.fromtimestamp(clock[0], UTC).isoformat()
    assert timedelta(seconds=snap["uptime_s"]) == timedelta(seconds=2)
