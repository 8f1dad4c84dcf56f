"""A third-party EAP method, pip-installed, used on both ends by configuration alone.

`tests/fixtures/mipsec-eap-example` is an ordinary distribution with an entry
point in the `mipsec` group; nothing in `core/` knows it.  A real HA and HAC
(`mipsec init` lab) and a real MN process bootstrap through it and register.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Lab, edit_toml, mipsec
from rawmn import RawMN, Response, lines, with_auth

SECRET = "a1" * 16
MN_ID = "demo@mipsec.test"


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


# ------------------------------------------------------------ an independent MN


def _example_eap(ident: int, data: bytes) -> bytes:
    # RFC 3748 §5.7 expanded Type: 254, Vendor-Id 32473 (RFC 5612), Vendor-Type 1.
    head = bytes([254]) + (32473).to_bytes(3, "big") + (1).to_bytes(4, "big")
    return struct.pack("!BBH", 2, ident, 4 + len(head) + len(data)) + head + data


class IndependentExampleMn:
    """The example method's peer and the MHAuth side, from its wire description
    alone (tests/fixtures/mipsec-eap-example's docstring and PROFILE §4): no
    mipsec code.  ``suitelists``: the suite list of each Done it sends (the
    first, then resends), to test a Done changed on resend."""

    def __init__(self, lab: Lab, suitelists: tuple[str, ...] = ("{00,3C}",)) -> None:
        self.mn = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
        self.secret = bytes.fromhex(SECRET)
        self.msk: bytes | None = None
        self.suitelists = list(suitelists)
        self.requests = 1
        init = [("mn-id", MN_ID), ("mn-rand", os.urandom(32).hex()), ("auth-method", "eap")]
        self.mn.send(lines(init) + b"\r\n")

    def run(self) -> Response:
        """Answer every request until the HAC's final response."""
        while True:
            r = self.mn.recv()
            if "status-code" in r.headers:
                return r
            req = bytes.fromhex(r.headers["eap-payload"])
            ident, typ, data = req[1], req[4], req[12:]
            if typ == 1:  # Identity
                resp = struct.pack("!BBHB", 2, ident, 5 + len(MN_ID), 1) + MN_ID.encode()
            elif data[:1] == b"\x03":  # ping
                resp = _example_eap(ident, b"\x04")
            elif data[:1] == b"\x01":  # the challenge: the MN's method is done
                sn, pn = data[1:17], os.urandom(16)
                mac = hmac.new(self.secret, b"peer" + sn + pn, hashlib.sha256).digest()[:16]
                self.msk = hmac.new(self.secret, b"msk" + sn + pn, hashlib.sha512).digest()
                resp = _example_eap(ident, b"\x02" + pn + mac)
            elif data[:1] == b"\x05":  # a notice after the method: the Done again
                resp = _example_eap(ident, b"\x06")
            else:
                raise AssertionError(f"unexpected request {req.hex()}")
            headers = [("eap-payload", resp.hex())]
            key = b"1"
            if self.msk is not None:  # PROFILE §4 item 4: the Done, keyed with the MSK
                suites = self.suitelists.pop(0) if len(self.suitelists) > 1 else self.suitelists[0]
                headers += [("mip6-sas", "1"), ("mip6-suitelist", suites)]
                key = self.msk
            self.mn.send(with_auth(lines(headers), key, b"MN", self.mn.cb))
            self.requests += 1

    def close(self) -> None:
        self.mn.close()


def _hac_events(proc: Any) -> list[str]:
    proc.terminate()
    out = proc.communicate(timeout=20)[0]
    assert "Traceback" not in out
    return [ln for ln in out.splitlines() if "mipsec.events" in ln]


def _independent_run(
    lab: Lab, site: Path, start_hac: Any, server_options: str = "rounds = 2\n", **mn: Any
) -> tuple[IndependentExampleMn, Response, list[str]]:
    """The example-method lab (``server_options`` in place of its HAC table's
    ``rounds = 2``), one exchange of the independent MN, the HAC's event
    lines afterwards."""
    eap_lab(lab)
    edit_toml(Path(lab.info["hac"]["config"]), "rounds = 2\n", server_options)
    proc = start_hac(lab, env=dict(os.environ, PYTHONPATH=str(site)))
    client = IndependentExampleMn(lab, **mn)
    try:
        final = client.run()
        assert client.mn.at_eof()  # the HAC closes after its final response
    finally:
        client.close()
    return client, final, _hac_events(proc)


def failure_keyed_with_1(client: IndependentExampleMn, final: Response, status: str) -> None:
    assert final.headers["status-code"] == status, final.headers
    assert final.headers["eap-payload"][:2] == "04" and final.auth_ok(b"1", client.mn.cb)


def test_independent_mn_through_the_example_method(lab: Lab, site: Path, start_hac: Any) -> None:
    """The baseline of the two below: an MN written from the wire description
    bootstraps, the 200 keyed with the MSK it derived."""
    client, final, events = _independent_run(lab, site, start_hac)
    assert final.headers["status-code"] == "200" and client.msk is not None
    assert final.auth_ok(client.msk, client.mn.cb)
    assert sum("event=sa_issued" in e for e in events) == 1


def test_done_parameters_changed_on_resend_is_400(lab: Lab, site: Path, start_hac: Any) -> None:
    """PROFILE §4 item 4: with notify_after the HAC sends one more request
    after the MN's method finished, and the MN sends its Done again -- here
    with another suite list: 400, EAP-Failure, keyed with ``1``."""
    client, final, events = _independent_run(
        lab,
        site,
        start_hac,
        "rounds = 2\nnotify_after = true\n",
        suitelists=("{00,3C}", "{00,2F}"),
    )
    failure_keyed_with_1(client, final, "400")
    assert any("reason=done-changed" in e for e in events)


def test_the_255_exchange_cap_on_a_running_hac(lab: Lab, site: Path, start_hac: Any) -> None:
    """A conversation that would go on (300 ping rounds): the HAC ends it at
    255 MN requests with 401 and EAP-Failure (PROFILE §4 item 9)."""
    client, final, events = _independent_run(lab, site, start_hac, "rounds = 300\n")
    failure_keyed_with_1(client, final, "401")
    assert client.requests == 255
    assert any("reason=255-exchanges" in e for e in events)
