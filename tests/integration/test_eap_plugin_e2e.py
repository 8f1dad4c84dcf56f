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
