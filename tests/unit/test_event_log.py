"""Event logging plugin (plugins/event_log.py)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta, timezone

import pluggy
import pytest

from mipsec.core.hookspecs import MipsecSpec
from mipsec.core.model import SecurityAssociation
from mipsec.core.suites import Suite
from mipsec.plugins import event_log

END = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
KEYS = [bytes(range(i, i + 16)) for i in (0x10, 0x30, 0x50, 0x70)]


@pytest.fixture
def pm() -> pluggy.PluginManager:
    m = pluggy.PluginManager("mipsec")
    m.add_hookspecs(MipsecSpec)
    m.register(event_log)
    return m


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mipsec.events"]


def test_all_events_one_line_each(
    pm: pluggy.PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    sa = SecurityAssociation(
        spi=4660,
        mn_id="alice@home.example",
        suite=Suite.AES_128_CBC_SHA256,
        scope=1,
        validity_end=END,
        mn_to_ha_ikey=KEYS[0],
        ha_to_mn_ikey=KEYS[1],
        mn_to_ha_ekey=KEYS[2],
        ha_to_mn_ekey=KEYS[3],
        ha_id="ha1",
    )
    with caplog.at_level(logging.INFO, logger="mipsec.events"):
        pm.hook.mipsec_mn_authenticated(mn_id=sa.mn_id, method="psk", peer="[2001:db8::5]:4433")
        pm.hook.mipsec_sa_issued(
            spi=sa.spi,
            mn_id=sa.mn_id,
            suite=sa.suite.name,
            scope=sa.scope,
            validity_end=sa.validity_end,
            ha_id=sa.ha_id,
            peer="[2001:db8::5]:4433",
        )
        pm.hook.mipsec_auth_failed(
            mn_id="eve@x", method="psk", status=401, peer="192.0.2.9:1", reason="bad-auth"
        )
        pm.hook.mipsec_auth_failed(
            mn_id="eve@x", method="psk", status=None, peer="192.0.2.9:1", reason="timeout"
        )
        pm.hook.mipsec_provisioning_failed(
            mn_id=sa.mn_id, ha_id="ha1", spi=7, status=504, reason="ha-no-confirmation", peer="p"
        )
        pm.hook.mipsec_sa_withdrawn(spi=sa.spi, mn_id=sa.mn_id, ha_id="ha1", reason="superseded")
        pm.hook.mipsec_sa_withdrawn(spi=sa.spi, mn_id=sa.mn_id, ha_id="ha1", reason="revoked")
        pm.hook.mipsec_sa_expired(spi=sa.spi, mn_id=sa.mn_id, validity_end=sa.validity_end)
    # mn_authenticated and a superseded SA's withdrawal are DEBUG: a successful
    # (re-)bootstrap is one INFO line (sa_issued).
    assert lines(caplog) == [
        "event=sa_issued spi=4660 mn_id=alice@home.example suite=AES_128_CBC_SHA256 scope=1 "
        "ha=ha1 validity_end=2030-01-02T03:04:05Z peer=[2001:db8::5]:4433",
        "event=auth_failed mn_id=eve@x peer=192.0.2.9:1 method=psk status=401 reason=bad-auth",
        "event=auth_failed mn_id=eve@x peer=192.0.2.9:1 method=psk status=- reason=timeout",
        "event=provisioning_failed mn_id=alice@home.example peer=p ha=ha1 spi=7 status=504 "
        "reason=ha-no-confirmation",
        "event=sa_withdrawn spi=4660 mn_id=alice@home.example ha=ha1 reason=revoked",
        "event=sa_expired spi=4660 mn_id=alice@home.example validity_end=2030-01-02T03:04:05Z",
    ]
    assert [r.levelno for r in caplog.records] == [
        logging.INFO,
        logging.WARNING,
        logging.WARNING,
        logging.WARNING,
        logging.INFO,
        logging.INFO,
    ]
    text = caplog.text + repr(sa)
    for k in KEYS:  # no key material anywhere (the hooks never receive it)
        assert k.hex() not in text and k.hex().upper() not in text and repr(k) not in text


def test_untrusted_values_are_quoted(
    pm: pluggy.PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mipsec.events"):
        pm.hook.mipsec_auth_failed(
            mn_id="x\nevent=sa_issued spi=1", method="psk", status=401, peer="p", reason="r"
        )
        pm.hook.mipsec_auth_failed(
            mn_id='a "b"=c', method="psk", status=400, peer="", reason="bad-request"
        )
    got = lines(caplog)
    assert got == [
        'event=auth_failed mn_id="x\\nevent=sa_issued spi=1" peer=p method=psk status=401 reason=r',
        'event=auth_failed mn_id="a \\"b\\"=c" peer="" method=psk status=400 reason=bad-request',
    ]
    assert all("\n" not in line for line in got)


def test_validity_end_converted_to_utc(
    pm: pluggy.PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    plus2 = END.astimezone(timezone(timedelta(hours=2)))
    with caplog.at_level(logging.INFO, logger="mipsec.events"):
        pm.hook.mipsec_sa_expired(spi=1, mn_id="a@x", validity_end=plus2)
    assert lines(caplog) == ["event=sa_expired spi=1 mn_id=a@x validity_end=2030-01-02T03:04:05Z"]


def test_nothing_logged_below_level(
    pm: pluggy.PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mipsec.events"):
        pm.hook.mipsec_sa_expired(spi=1, mn_id="a@x", validity_end=END)
    assert lines(caplog) == []
