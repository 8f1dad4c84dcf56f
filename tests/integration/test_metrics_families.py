"""What /metrics exports (core/metrics.py), found missing or wrong in review:

* model 1 (the HA in the HAC's process): the in-process HA's series come on
  the HAC's /metrics, and ``[local_ha.metrics]`` / ``[local_ha.control]``,
  which nothing served, are refused by the configuration;
* two EAP back ends naming the same RADIUS server: one series each, not the
  same series twice;
* the HA's tunnel drops (``[dataplane]``) are exported, not only shown by
  ``mipsec status``.

Every scrape is parsed with prometheus-client's own parser, and no series
may appear twice.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mipsec.core import metrics
from mipsec.core.config import HACConfig, HAConfig, validate_config
from mipsec.core.errors import ConfigError
from mipsec.core.metrics import HacMetrics, HaMetrics
from mipsec.core.pki import PkiPaths, init_pki
from mipsec.core.roles.ha import HaService
from mipsec.core.roles.hac import HacService


def samples(text: str) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append((s.name, tuple(sorted(s.labels.items())), s.value))
    dup = [k for k, n in Counter((n, lab) for n, lab, _ in out).items() if n > 1]
    assert not dup, f"series exported twice: {dup}"
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    for n, lab, v in samples(text):
        if n == name and all(dict(lab).get(k) == x for k, x in labels.items()):
            return v
    return None


def model1(tmp: Path, pki: PkiPaths, **local_ha: Any) -> dict[str, Any]:
    ha_port = free_port()
    creds = tmp / "credentials.toml"
    creds.write_text('[[mn]]\nmn_id = "a@b.example"\npsk_hex = "' + "11" * 32 + '"\n')
    creds.chmod(0o600)
    return {
        "hac": {
            "listen": ["127.0.0.1"],
            "port": free_port(),
            "cert": str(pki.hac_cert),
            "key": str(pki.hac_key),
        },
        "credentials": {"backend": "toml", "path": str(creds)},
        "sa_store": {"backend": "memory"},
        "home_addresses": {"allocator": "pool", "ip6_prefix": "2001:db8:1::/64"},
        "ha": [{"id": "ha1", "address4": "127.0.0.1", "port": ha_port, "transport": "local"}],
        "local_ha": {
            "ha": {"id": "ha1", "listen": ["127.0.0.1"], "port": ha_port},
            "sa_store": {"backend": "memory"},
            **local_ha,
        },
    }


def test_model1_hac_exports_the_in_process_has_series(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki")
    cfg = validate_config(model1(tmp_path, pki), "hac", base=tmp_path)
    assert isinstance(cfg, HACConfig) and cfg.local_ha is not None

    async def main() -> str:
        ha = HaService(cfg.local_ha)
        await ha.start()
        hac = HacService(cfg)
        await hac.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(5):
                    s.sendto(b"\x00\x01garbage", ("127.0.0.1", cfg.local_ha.ha.port))
            for _ in range(100):
                if sum(ha.stats()["drops"].values()) >= 5:
                    break
                await asyncio.sleep(0.02)
            return generate_latest(HacMetrics(hac, None, ha).registry).decode()
        finally:
            await hac.stop()
            await ha.stop()

    text = asyncio.run(main())
    drops = [v for n, _, v in samples(text) if n == "mipsec_ha_packets_dropped_total"]
    assert sum(drops) == 5.0, text
    assert value(text, "mipsec_ha_sas") == 0.0
    assert value(text, "mipsec_live_sas", ha="ha1") == 0.0  # the HAC's own, beside it
    assert value(text, "mipsec_certificate_not_after_seconds", cert="hac.cert") is not None


@pytest.mark.parametrize("key", ["metrics", "control", "log_level"])
def test_model1_refuses_settings_no_in_process_ha_uses(tmp_path: Path, key: str) -> None:
    pki = init_pki(tmp_path / "pki")
    extra: dict[str, Any] = {
        "metrics": {"port": free_port()},
        "control": {"path": str(tmp_path / "ha.ctl")},
        "log_level": "debug",
    }
    with pytest.raises(ConfigError) as info:
        validate_config(model1(tmp_path, pki, **{key: extra[key]}), "hac", base=tmp_path)
    assert f"local_ha.{key}" in str(info.value)


def test_two_back_ends_on_one_radius_server_are_two_series() -> None:
    row = {"requests": 3, "timeouts": 1, "dead": False}
    health = {
        "opa": {"127.0.0.1:1812": dict(row)},
        "opb": {"127.0.0.1:1812": dict(row, requests=0, dead=True)},
    }
    reg = CollectorRegistry()
    reg.register(metrics._ReadAtScrape(lambda: metrics._radius_families(health)))
    text = generate_latest(reg).decode()
    got = samples(text)
    assert ("mipsec_radius_total", (("backend", "opa"), ("counter", "requests"),
            ("server", "127.0.0.1:1812")), 3.0) in got  # fmt: skip
    assert ("mipsec_radius_total", (("backend", "opb"), ("counter", "requests"),
            ("server", "127.0.0.1:1812")), 0.0) in got  # fmt: skip
    assert value(text, "mipsec_radius_server_dead", backend="opb") == 1.0


class _TunnelHa:
    """The HA's counters as ``HaService.stats()`` gives them with ``[dataplane]``."""

    _provisioning = None

    def stats(self) -> dict[str, Any]:
        return {
            "drops": {"malformed": 1},
            "packets": 9,
            "bu": 1,
            "ba": {0: 1},
            "sas": 1,
            "bindings": 1,
            "data": {
                "in": 4,
                "out": 6,
                "plain_in": 0,
                "plain_out": 0,
                "drops": {"no_binding": 7, "not_hoa": 2},
                "send_full": 0,
                "io_errors": 1,
                "not_read": 0,
                "reserve_unwritten": 3,
                "tun_gone_drops": 5,
                "tun_lost": 1,
                "tun_down_drops": 4,
                "link_down": 2,
                "link_restored": 2,
            },
        }

    def certificates(self) -> dict[str, Any]:
        return {}


def test_ha_tunnel_drops_are_exported() -> None:
    text = generate_latest(HaMetrics(_TunnelHa()).registry).decode()
    name = "mipsec_ha_data_packets_dropped_total"
    assert value(text, name, reason="no_binding") == 7.0
    assert value(text, name, reason="not_hoa") == 2.0
    assert value(text, name, reason="reserve_unwritten") == 3.0
    assert value(text, name, reason="tun_gone") == 5.0
    assert value(text, name, reason="tun_down") == 4.0
    assert value(text, "mipsec_ha_data_packets_total", direction="out") == 6.0
    assert value(text, "mipsec_ha_data_events_total", event="tun_lost") == 1.0
    assert value(text, "mipsec_ha_data_events_total", event="link_restored") == 2.0
    assert value(text, "mipsec_ha_data_events_total", event="tun_down_drops") is None
    assert value(text, "mipsec_ha_data_events_total", event="reserve_unwritten") is None
    assert value(text, "mipsec_ha_packets_dropped_total", reason="malformed") == 1.0


def test_ha_pulls_are_exported() -> None:
    """Pulls of unknown SPIs, and those deferred or limited by the pull gate
    (core/pullgate.py), were in `mipsec status` only (twenty-ninth session)."""
    cfg = HAConfig.model_validate(
        {"ha": {"id": "ha1", "listen": ["127.0.0.1"], "port": 0}, "sa_store": {"backend": "memory"}}
    )
    svc = HaService(cfg)
    try:
        svc.counts.update(
            pulls=4, pulls_found=1, pulls_refused=3, pulls_deferred=7, pulls_limited=2
        )
        text = generate_latest(HaMetrics(svc).registry).decode()
    finally:
        svc.store.close()
    want = {"started": 4, "found": 1, "refused": 3, "deferred": 7, "limited": 2}
    got = {k: value(text, "mipsec_ha_pulls_total", outcome=k) for k in want}
    assert got == want
    assert value(text, "mipsec_ha_pull_sightings") == 0.0
    assert value(text, "mipsec_ha_pull_sources") == 0.0
    # The limits in force: the defaults, with no [pull] (thirtieth session).
    limits = {"rate": 20.0, "burst": 50.0, "max_in_flight": 16.0, "source_rate": 5.0,
              "source_burst": 10.0}  # fmt: skip
    assert {k: value(text, "mipsec_ha_pull_limit", limit=k) for k in limits} == limits
