"""conf/systemd/: one Type=notify unit per role, hardened, verified by systemd."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "conf" / "systemd"


def _keys(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.mark.parametrize("role", ["hac", "ha", "mn"])
def test_unit_is_notify_reloadable_and_hardened(role: str) -> None:
    keys = _keys((UNITS / f"mipsec-{role}.service").read_text())
    assert keys["Type"] == ["notify"]
    assert keys["ExecStart"][0].endswith(f"--role {role} --config /etc/mipsec/{role}.toml")
    if role == "mn":  # no reload: `systemctl reload` must say so, not send a SIGHUP
        assert "ExecReload" not in keys
    else:
        # Through the control socket, so a refused file fails `systemctl
        # reload` (a SIGHUP reported success either way: review).
        assert keys["ExecReload"] == [
            f"/usr/local/bin/mipsec reload --config /etc/mipsec/{role}.toml"
        ]
    for k, v in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "mipsec",
        "UMask": "0077",
    }.items():
        assert keys[k] == [v], k
    caps = keys["CapabilityBoundingSet"]
    assert caps == ([""] if role == "hac" else ["CAP_NET_ADMIN"])  # TUN only where data flows


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("role", ["hac", "ha", "mn"])
def test_systemd_analyze_verify_accepts_the_unit(role: str, tmp_path: Path) -> None:
    launcher = Path(sys.executable).with_name("mipsec")
    unit = tmp_path / f"mipsec-{role}.service"
    unit.write_text((UNITS / unit.name).read_text().replace("/usr/local/bin/mipsec", str(launcher)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    ours = [x for x in (out.stdout + out.stderr).splitlines() if unit.name in x]
    assert ours == [], ours
