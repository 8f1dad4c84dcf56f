"""HA selectors (plugins/ha_select.py)."""

from __future__ import annotations

from ipaddress import IPv6Address
from pathlib import Path

import pluggy
import pytest

from mipsec.core.hookspecs import HASelector, MipsecSpec, PluginContext
from mipsec.core.model import HomeAgentInfo
from mipsec.plugins import ha_select
from mipsec.plugins.ha_select import FewestSAsFactory, FirstFactory

CTX = PluginContext(role="hac", base_dir=Path("."))
HA1 = HomeAgentInfo("ha1", haa_ip6=IPv6Address("2001:db8::1"))
HA2 = HomeAgentInfo("ha2", haa_ip6=IPv6Address("2001:db8::2"))
HA3 = HomeAgentInfo("ha3", haa_ip6=IPv6Address("2001:db8::3"))


@pytest.mark.parametrize(
    ("live", "expected"),
    [
        ({}, HA1),  # all zero: config order
        ({"ha1": 3, "ha2": 1, "ha3": 2}, HA2),
        ({"ha1": 2, "ha2": 1, "ha3": 1}, HA2),  # tie: earlier in configuration
        ({"ha1": 5, "ha2": 5}, HA3),  # ha3 absent from the counts = 0 SAs
        ({"other": 0, "ha1": 1, "ha2": 1, "ha3": 1}, HA1),
    ],
)
def test_fewest_sas(live: dict[str, int], expected: HomeAgentInfo) -> None:
    s = FewestSAsFactory().create({}, CTX)
    assert isinstance(s, HASelector)
    assert s.select("a@x", [HA1, HA2, HA3], live) is expected


def test_first() -> None:
    s = FirstFactory().create({}, CTX)
    assert isinstance(s, HASelector)
    assert s.select("a@x", [HA2, HA1], {"ha2": 100}) is HA2


@pytest.mark.parametrize("factory", [FewestSAsFactory(), FirstFactory()])
def test_no_candidates(factory: FewestSAsFactory | FirstFactory) -> None:
    assert factory.create({}, CTX).select("a@x", [], {}) is None


@pytest.mark.parametrize("factory", [FewestSAsFactory(), FirstFactory()])
def test_options_rejected(factory: FewestSAsFactory | FirstFactory) -> None:
    with pytest.raises(ValueError, match="^weight: extra inputs are not permitted$"):
        factory.create({"weight": 2}, CTX)


def test_through_pluggy() -> None:
    pm = pluggy.PluginManager("mipsec")
    pm.add_hookspecs(MipsecSpec)
    pm.register(ha_select)
    factories = {f.name: f for group in pm.hook.mipsec_ha_selectors() for f in group}
    assert set(factories) == {"fewest-sas", "first"}
    s = factories["fewest-sas"].create({}, CTX)
    assert s.select("a@x", [HA1, HA2], {"ha1": 1}) is HA2
