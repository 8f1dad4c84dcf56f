"""A third-party EAP method, pip-installed, used on both ends by configuration alone.

`tests/fixtures/mipsec-eap-example` is an ordinary distribution with an entry
point in the `mipsec` group; nothing in `core/` knows it.  A real HA and HAC
(`mipsec init` lab) and a real MN process bootstrap through it and register.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Lab, edit_toml, mipsec

SECRET = "a1" * 16


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    src = Path(__file__).parent.parent / "fixtures" / "mipsec-eap-example"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    return target


def eap_lab(
    lab: Lab, *, hac_types: str = '["example", "tls"]', mn_methods: str = '["example"]'
) -> None:
    hac = Path(lab.info["hac"]["config"])
    # The lab already runs EAP (EAP-TLS for its realm): the third-party method
    # is offered first, next to it.
    edit_toml(hac, 'types = ["tls"]', f"types = {hac_types}")
    with hac.open("a") as f:
        f.write(f'\n[methods.eap.example]\nsecret_hex = "{SECRET}"\nrounds = 2\n')
    mn = Path(lab.info["mn"]["config"])
    edit_toml(mn, 'method = "psk"', 'method = "eap"')
    with mn.open("a") as f:
        f.write(f'\n[eap]\nmethods = {mn_methods}\n[eap.example]\nsecret_hex = "{SECRET}"\n')


def run_mn(lab: Lab, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    out = mipsec("--role", "mn", "--config", lab.info["mn"]["config"], "--once", "--json", env=env)
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr
    return out.returncode, json.loads(lines[-1])


def test_third_party_eap_method_on_both_ends(lab: Lab, site: Path, start_hac: Any) -> None:
    env = dict(os.environ, PYTHONPATH=str(site))
    rows = {r["name"]: r for r in json.loads(mipsec("plugins", "--json", env=env).stdout)}
    assert rows["eap_example"]["provides"]["mipsec_eap_methods"] == ["example", "example-nomsk"]
    eap_lab(lab)
    start_hac(lab, env=env)
    rc, res = run_mn(lab, env)
    assert rc == 0 and res["status"] == 200 and res["ba"]["status"] == 0, res


def test_without_the_plugin_the_hac_refuses_to_start(lab: Lab) -> None:
    eap_lab(lab)
    out = mipsec("--role", "hac", "--config", lab.info["hac"]["config"], timeout=30)
    assert out.returncode == 2, out.stderr
    assert "methods.eap" in out.stderr and "'example'" in out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_secret_is_401(lab: Lab, site: Path, start_hac: Any) -> None:
    env = dict(os.environ, PYTHONPATH=str(site))
    eap_lab(lab)
    mn = Path(lab.info["mn"]["config"])
    edit_toml(
        mn, f'[eap.example]\nsecret_hex = "{SECRET}"', f'[eap.example]\nsecret_hex = "{"00" * 16}"'
    )
    start_hac(lab, env=env)
    rc, res = run_mn(lab, env)
    assert rc == 1 and res["status"] == 401 and res["authenticated"], res


def test_a_slow_eap_peer_is_ended_at_the_hacs_exchange_timeout(
    lab: Lab, site: Path, start_hac: Any
) -> None:
    """[hac] exchange_timeout against a real HAC process and a real MN: each
    EAP round answered well within request_timeout (0.3 s of 2 s), but 30
    rounds would take 9 s; the HAC ends the exchange at its 2-s deadline,
    issues nothing, says why in one line naming the MN, and serves the next
    MN (the same method, no delay) at once."""
    env = dict(os.environ, PYTHONPATH=str(site))
    eap_lab(lab)
    hac = Path(lab.info["hac"]["config"])
    edit_toml(hac, "rounds = 2\n", "rounds = 30\n")
    edit_toml(hac, "request_timeout = 10 ", "request_timeout = 2 ")
    edit_toml(hac, "exchange_timeout = 120 ", "exchange_timeout = 2 ")
    mn = Path(lab.info["mn"]["config"])
    fast = mn.read_text()
    edit_toml(
        mn,
        f'[eap.example]\nsecret_hex = "{SECRET}"',
        f'[eap.example]\nsecret_hex = "{SECRET}"\nping_delay = 0.3',
    )
    proc = start_hac(lab, env=env)
    started = time.monotonic()
    rc, res = run_mn(lab, env)
    took = time.monotonic() - started
    assert rc != 0 and res.get("status") != 200, res
    assert took < 9.0, took  # ended by the HAC's deadline, not by finishing
    mn.write_text(fast)
    rc, res = run_mn(lab, env)
    assert rc == 0 and res["status"] == 200, res
    proc.terminate()
    out, _ = proc.communicate(timeout=20)
    ended = [ln for ln in out.splitlines() if "event=auth_failed" in ln]
    assert len(ended) == 1, out
    assert f"event=auth_failed mn_id={lab.info['mn']['mn_id']} peer=127.0.0.1:" in ended[0]
    assert ended[0].endswith(" method=eap status=- reason=exchange-timeout"), ended[0]
    assert "Traceback" not in out
    assert out.count("event=sa_issued") == 1
