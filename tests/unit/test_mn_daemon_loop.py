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
