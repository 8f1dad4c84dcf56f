"""End to end through the real AAA lab (issue 8 "Done when").

`mipsec init --radius ... --usim ...` writes the lab; a real HA and HAC run
from it; the project's own MN (`mipsec --role mn --config mn-aka.toml --once
--json`) bootstraps through EAP-AKA / EAP-AKA' passed through FreeRADIUS to
hostapd's AKA server (a Milenage AuC independent of the MN's USIM), and
registers with its HA.  The Done `auth` verifies only if the MSK the HAC took
from the MPPE keys equals the MSK the MN derived.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aaalab import AaaLab
from conftest import Lab, edit_toml, free_port, mipsec

# The lab subscriber: 3GPP TS 35.208 test set 1 (shared/aaa-lab/README.md).
USIM = "001010000000001,465b5ce8b199b49faa5f0a2ee238a6bc,cd63cb71954a9f4e48a5994e37a02baf,b9b9,"
SQN = "ff9bb4d0b607"


def radius_lab(tmp: Path, aaa: AaaLab, sqn: str = SQN) -> Lab:
    secret = tmp / "radius.secret"
    secret.write_text(aaa.secret)
    secret.chmod(0o600)
    out = mipsec(
        "init", str(tmp / "lab"),
        "--hac-port", str(free_port()), "--ha-port", str(free_port(socket.SOCK_DGRAM)),
        "--radius", f"127.0.0.1:{aaa.auth_port}", "--radius-secret-file", str(secret),
        "--usim", USIM + sqn, "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return Lab(tmp / "lab", json.loads(out.stdout))


def run_mn(config: str) -> tuple[int, dict[str, Any]]:
    out = mipsec("--role", "mn", "--config", config, "--once", "--json", timeout=90)
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr
    return out.returncode, json.loads(lines[-1])


def test_init_writes_the_radius_and_usim_lab(tmp_path: Path, aaa_lab: AaaLab) -> None:
    lab = radius_lab(tmp_path, aaa_lab)
    info = lab.info
    assert info["mn_aka"]["mn_id"] == "0001010000000001@wlan.mnc001.mcc001.3gppnetwork.org"
    assert info["mn_aka_prime"]["mn_id"].startswith("6001010000000001@wlan.mnc001.")
    for f in ("usim.ki", "usim.opc"):
        assert (lab.dir / f).stat().st_mode & 0o077 == 0
    for cfg in (info["hac"]["config"], info["mn_aka"]["config"], info["mn_aka_prime"]["config"]):
        assert mipsec("check-config", cfg).returncode == 0


@pytest.mark.parametrize("which", ["mn_aka", "mn_aka_prime"])
def test_own_mn_bootstraps_through_aka_and_registers(
    tmp_path: Path, aaa_lab: AaaLab, start_hac: Any, which: str
) -> None:
    lab = radius_lab(tmp_path, aaa_lab)
    start_hac(lab)
    rc, res = run_mn(lab.info[which]["config"])
    assert rc == 0 and res["status"] == 200 and res["authenticated"], res
    assert res["ba"]["status"] == 0
    # The PSK MN of the lab realm still works next to it (kept local).
    rc, res = run_mn(lab.info["mn"]["config"])
    assert rc == 0 and res["status"] == 200


def test_wrong_ki_is_401(tmp_path: Path, aaa_lab: AaaLab, start_hac: Any) -> None:
    lab = radius_lab(tmp_path, aaa_lab)
    (lab.dir / "usim.ki").write_text("00112233445566778899aabbccddeeff\n")
    start_hac(lab)
    rc, res = run_mn(lab.info["mn_aka"]["config"])
    # The USIM refuses AUTN (MAC-A mismatch): Authentication-Reject -> Access-Reject.
    assert rc == 1 and res["status"] == 401 and res["authenticated"], res


def test_sqn_out_of_step_recovers_through_auts(
    tmp_path: Path, aaa_lab: AaaLab, start_hac: Any
) -> None:
    # SQN_MS far behind the AuC's: the first AUTN is out of range (more than
    # Δ ahead) -> AKA-Synchronization-Failure with AUTS -> the AuC resyncs ->
    # success within the same exchange.
    lab = radius_lab(tmp_path, aaa_lab, sqn="000000000020")
    start_hac(lab)
    rc, res = run_mn(lab.info["mn_aka"]["config"])
    assert rc == 0 and res["status"] == 200, res
    # The same USIM (one state file) through EAP-AKA' next: in step now.
    assert json.loads((lab.dir / "usim.sqn").read_text())
    rc, res = run_mn(lab.info["mn_aka_prime"]["config"])
    assert rc == 0 and res["status"] == 200, res


def test_dead_radius_server_504_and_failover(
    tmp_path: Path, aaa_lab: AaaLab, start_hac: Any
) -> None:
    lab = radius_lab(tmp_path, aaa_lab)
    hac = Path(lab.info["hac"]["config"])
    dead = free_port(socket.SOCK_DGRAM)
    real = f'{{ host = "127.0.0.1", port = {aaa_lab.auth_port}'
    text = hac.read_text()
    edit_toml(hac, real, f'{{ host = "127.0.0.1", port = {dead}')
    edit_toml(
        hac,
        'nas_identifier = "mipsec-lab-hac"',
        'nas_identifier = "mipsec-lab-hac"\ntimeout = 0.5\nretries = 1',
    )
    p = start_hac(lab)
    rc, res = run_mn(lab.info["mn_aka"]["config"])
    assert rc == 1 and res["status"] == 504 and res["authenticated"], res
    p.terminate()
    p.communicate(timeout=10)
    # A second server configured after the dead one: the MN still succeeds.
    hac.write_text(text)
    secret = str(tmp_path / "radius.secret")
    edit_toml(
        hac,
        f'servers = [{real}, secret_file = "{secret}" }}]',
        f'servers = [{{ host = "127.0.0.1", port = {dead}, secret_file = "{secret}" }}, '
        f'{real}, secret_file = "{secret}" }}]\ntimeout = 0.5\nretries = 1',
    )
    start_hac(lab)
    rc, res = run_mn(lab.info["mn_aka"]["config"])
    assert rc == 0 and res["status"] == 200, res
