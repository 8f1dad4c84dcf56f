"""conf/: every example validates, and each deployment model runs end to end."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import LAUNCHER, free_port, make_lab, mipsec, wait_port
from rawha import RawSA, binding_update, parse_ba

CONF = Path(__file__).resolve().parents[2] / "conf"


# Deployment models only: conf/systemd holds unit files (tests/unit/test_systemd_units.py).
MODELS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name.startswith("model"))


@pytest.mark.parametrize("model", MODELS)
def test_example_validates(tmp_path: Path, model: str) -> None:
    # check-config validates what a start does (certificates, keys, file
    # modes, plugins): run it on the example with a lab's PKI next to it.
    work = model_dir(tmp_path, model, {})
    files = [work / p.name for p in sorted((CONF / model).glob("*.toml"))]
    assert files
    before = sorted(p.name for p in work.iterdir())
    for path in files:
        out = mipsec("check-config", str(path))
        assert out.returncode == 0, out.stderr
    # ... and creates nothing: no store, no key file (a start would).
    assert sorted(p.name for p in work.iterdir()) == before


def model_dir(tmp: Path, model: str, ports: dict[str, int]) -> Path:
    lab = make_lab(tmp / "lab")
    work = tmp / model
    shutil.copytree(CONF / model, work)
    for name in ("pki", "credentials.toml", "mn.psk"):
        src = lab.dir / name
        dst = work / name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    secret = work / "radius.secret"  # model 2's RADIUS shared secret (an operator's file)
    secret.write_text("testing123\n")
    secret.chmod(0o600)
    for f in work.glob("*.toml"):
        text = f.read_text()
        for old, new in ports.items():
            text = text.replace(f"= {old}", f"= {new}")
        f.write_text(text)
    return work


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, role: str, config: Path, port: int) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [*LAUNCHER, "--role", role, "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(p)
        wait_port(port, p)
        return p

    def stop(self) -> list[str]:
        outs = []
        for p in self.procs:
            p.terminate()
            try:
                outs.append(p.communicate(timeout=10)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0])
        self.procs.clear()
        return outs


@pytest.fixture
def procs() -> Any:
    p = Procs()
    yield p
    p.stop()


def mn_once(work: Path, *extra: str, mn_id: str | None = None) -> dict[str, Any]:
    cfg = work / "mn.toml"
    if mn_id is not None:
        cfg = work / f"mn-{mn_id}.toml"
        cfg.write_text((work / "mn.toml").read_text().replace("demo@mipsec.test", mn_id))
    out = mipsec("--role", "mn", "--config", str(cfg), "--once", "--json", *extra)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, (res, out.stderr)
    return res


def test_model1_colocated(tmp_path: Path, procs: Procs) -> None:
    port = free_port()
    work = model_dir(tmp_path, "model1-colocated", {"7872": port})
    procs.start("hac", work / "hac.toml", port)
    res = mn_once(work)
    assert res["status"] == 200 and res["ba"]["status"] == 0
    log = "".join(procs.stop())
    assert "binding added" in log


def test_model2_separate_ha_and_pull(tmp_path: Path, procs: Procs) -> None:
    hac_port, ha_port, pull_port = free_port(), free_port(), free_port()
    work = model_dir(
        tmp_path, "model2-hac-with-aaa", {"7872": hac_port, "7873": ha_port, "7874": pull_port}
    )
    ha = procs.start("ha", work / "ha.toml", ha_port)
    procs.start("hac", work / "hac.toml", hac_port)
    res = mn_once(work, "--show-keys")
    assert res["status"] == 200 and res["ba"]["status"] == 0
    # The HA loses its stores; the next BU makes it pull the SA from the HAC.
    ha.terminate()
    ha.communicate(timeout=10)
    procs.procs.remove(ha)
    for f in work.glob("ha-*.sqlite*"):
        f.unlink()
    procs.start("ha", work / "ha.toml", ha_port)
    k = res["sa"]["keys"]
    suite = res["sa"]["suite_id"]
    sa = RawSA(
        suite,
        res["sa"]["spi"],
        bytes.fromhex(k["mn_to_ha_ikey"]),
        bytes.fromhex(k["mn_to_ha_ekey"]),
        bytes.fromhex(k["ha_to_mn_ikey"]),
        bytes.fromhex(k["ha_to_mn_ekey"]),
    )
    hoa = res["bootstrap"]["ip6_hoa"]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    bu = sa.protect(binding_update(res["ba"]["sequence"] + 1, 25, hoa, "::1"), seq=1)
    s.sendto(bu, ("127.0.0.1", ha_port))
    pkt = s.recvfrom(2048)[0]
    ba = parse_ba(sa.unprotect(pkt)[2])
    assert ba["status"] == 0
    s.close()


def test_model3_two_has(tmp_path: Path, procs: Procs) -> None:
    try:
        socket.socket().bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 not usable here")
    hac_port, ha1, pull_port, ha2 = free_port(), free_port(), free_port(), free_port()
    work = model_dir(
        tmp_path,
        "model3-standalone",
        {"7872": hac_port, "7873": ha1, "7874": pull_port, "7875": ha2},
    )
    procs.start("ha", work / "ha1.toml", ha1)
    p2 = subprocess.Popen(
        [*LAUNCHER, "--role", "ha", "--config", str(work / "ha2.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs.procs.append(p2)
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.2", ha2), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    procs.start("hac", work / "hac.toml", hac_port)
    creds = work / "credentials.toml"
    psk = (work / "mn.psk").read_text().strip()
    creds.write_text(
        creds.read_text() + f'\n[[mn]]\nmn_id = "bob@mipsec.test"\npsk_hex = "{psk}"\n'
    )
    a = mn_once(work)
    b = mn_once(work, mn_id="bob@mipsec.test")
    assert a["ba"]["status"] == 0 and b["ba"]["status"] == 0
    # fewest-sas spreads the two MNs over the two HAs.
    assert {a["bootstrap"]["port"], b["bootstrap"]["port"]} == {ha1, ha2}
