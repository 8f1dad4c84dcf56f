"""The MN daemon's bootstrap loop (core/cli.py ``_run_mn``) with its
bootstrap and waits replaced: what a bad SA or registration does to the
backoff, without a HAC, an HA process or a real wait."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest

from mipsec.core import cli
from mipsec.core.config import MNConfig, validate_config
from mipsec.core.issuer import new_sa, utcnow
from mipsec.core.mn_exchange import BootstrapResult
from mipsec.core.mn_registration import COUNTER_NEAR_END, NEAR_END
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.suites import Suite


class Done(Exception):
    """Ends the loop from a fake bootstrap."""


def config(tmp_path: Path, **sa: Any) -> MNConfig:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    data = {
        "mn": {"mn_id": "alice@mipsec.test", "psk_hex": "00" * 32},
        "hac": {"host": "127.0.0.1", "port": 1, "server_name": "hac.mipsec.test",
                "ca": str(ca), "keep_backoff": False, "retry_min": 1, "retry_max": 8},
        "registration": {"transport": "ip6", "lifetime": 600},
        "sa": sa,
    }  # fmt: skip
    cfg = validate_config(data, "mn")
    assert isinstance(cfg, MNConfig)
    return cfg


def run_loop(
    monkeypatch: pytest.MonkeyPatch,
    cfg: MNConfig,
    results: Callable[[int], BootstrapResult],
    bootstraps: int,
) -> list[float]:
    """``_run_mn`` until its ``bootstraps``-th bootstrap; the waits it asked for."""
    from mipsec.core import mn_wait
    from mipsec.core.roles import mn

    calls = [0]
    waits: list[float] = []

    async def fake_bootstrap(*_a: Any, **_k: Any) -> BootstrapResult:
        calls[0] += 1
        if calls[0] > bootstraps:
            raise Done
        return results(calls[0])

    async def fake_pause(self: Any, wait: float, *_a: Any, **_k: Any) -> None:
        waits.append(wait)

    monkeypatch.setattr(mn, "bootstrap", fake_bootstrap)
    monkeypatch.setattr(mn, "peer_factory", lambda *a: None)
    monkeypatch.setattr(cli, "_renewed", lambda factory, *a: factory)
    monkeypatch.setattr(cli, "MIN_REBOOTSTRAP_INTERVAL", 0.0)
    monkeypatch.setattr(mn_wait.BootstrapWait, "pause", fake_pause)
    with pytest.raises(Done):
        asyncio.run(cli._run_mn(cfg, "/nonexistent/mn.toml", False, True, False))
    return waits


def test_an_sa_whose_cipher_refuses_its_keys_is_a_failed_bootstrap_backed_off(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 3DES key with k1 == k2 (RFC 2451 §2.3) reaching the Registrar: a
    failed bootstrap, backed off (doubling), never a traceback.  Found in
    review: the MN ended with a LocalProtocolError and, with no backoff
    written, a supervisor's restarts hammered the HAC."""
    caplog.set_level(logging.INFO, "mipsec.mn")
    good = new_sa(spi=9, mn_id="alice@mipsec.test", suite=Suite(0x000A), scope=1,
                  lifetime=3600, now=utcnow())  # fmt: skip
    weak = bytes(range(8)) * 2 + bytes(range(8, 16))
    sa = dataclasses.replace(good, mn_to_ha_ekey=weak)
    issued = IssuedSA(
        sa, BootstrapData(haa_ip6=IPv6Address("::1"), ip6_hoa=IPv6Address("2001:db8::5"))
    )
    waits = run_loop(monkeypatch, config(tmp_path), lambda n: BootstrapResult(200, True, issued), 3)
    assert len(waits) == 3
    lines = [r.getMessage() for r in caplog.records if "next bootstrap in" in r.getMessage()]
    assert len(lines) == 3 and "failure 3 in a row" in lines[-1]
    assert "unusable SA spi=9" in lines[0] and "RFC 2451" in lines[0]


class FakeRegistrar:
    """Registers at the first BA; ``then`` is what the rest of the SA brings."""

    then: Any = None
    clock: list[float] = [0.0]

    def __init__(self, issued: IssuedSA, cfg: MNConfig, **_k: Any) -> None:
        self.issued = issued

    async def open(self) -> None:
        pass

    async def run(self, **_k: Any) -> Any:
        from mipsec.core.roles.mn import RegistrationOutcome

        return RegistrationOutcome(0, 600, 1)

    async def run_more(self, **_k: Any) -> Any:
        from mipsec.core.roles.mn import RegistrationOutcome

        lived, reason = FakeRegistrar.then
        FakeRegistrar.clock[0] += lived
        return RegistrationOutcome(0, 600, 2, rebootstrap=reason)

    async def deregister(self) -> None:
        pass

    def close(self) -> None:
        pass


def good_issued() -> IssuedSA:
    sa = new_sa(spi=9, mn_id="alice@mipsec.test", suite=Suite.AES_128_CBC_SHA256, scope=1,
                lifetime=3600, now=utcnow())  # fmt: skip
    return IssuedSA(
        sa, BootstrapData(haa_ip6=IPv6Address("::1"), ip6_hoa=IPv6Address("2001:db8::5"))
    )


@pytest.mark.parametrize(
    ("lived", "reason", "failures"),
    [
        (2.0, "HA answered REINIT_SA_WITH_HAC (176)", 3),  # a 176 on an early refresh
        (0.0, COUNTER_NEAR_END, 3),  # the HA's counter near its end at once
        (61.0, "HA answered REINIT_SA_WITH_HAC (176)", 0),  # lived [sa] min_lifetime
        (5.0, NEAR_END, 0),  # the SA's normal end is never a failure
    ],
)
def test_an_sa_sent_back_before_it_lived_min_lifetime_is_a_failure(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    lived: float,
    reason: str,
    failures: int,
) -> None:
    """An HA sending every SA back soon after its first BA (176 on a
    refresh of a short-granted binding, a counter near 2**32 - 2**20) drove
    a re-bootstrap every 1-3 s for ever: the backoff was reset at the first
    BA.  Since the twenty-eighth session a re-bootstrap asked before the SA
    lived [sa] min_lifetime counts as a failure, and the count starts again
    only once an SA lived that long (found in review)."""
    from mipsec.core import mn_keep
    from mipsec.core.roles import mn

    caplog.set_level(logging.INFO, "mipsec.mn")
    FakeRegistrar.then = (lived, reason)
    FakeRegistrar.clock = [0.0]
    monkeypatch.setattr(mn, "Registrar", FakeRegistrar)
    monkeypatch.setattr(mn, "mn_clock", lambda: FakeRegistrar.clock[0])

    class Kept:
        def __init__(self, registrar: Any, detach: Any) -> None:
            self.registrar, self.live = registrar, True

        async def end(self, *, deregister: bool) -> None:
            pass

    monkeypatch.setattr(mn_keep, "KeptBinding", Kept)
    waits = run_loop(
        monkeypatch, config(tmp_path), lambda n: BootstrapResult(200, True, good_issued()), 3
    )
    lines = [r.getMessage() for r in caplog.records if "next bootstrap in" in r.getMessage()]
    assert len(waits) == len(lines) == failures
    if failures:
        assert "failure 3 in a row" in lines[-1] and "under [sa] min_lifetime (60 s)" in lines[-1]
