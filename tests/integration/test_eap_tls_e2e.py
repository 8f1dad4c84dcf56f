"""EAP-TLS served by the HAC, end to end (issue 7 "Done when").

Real processes from `mipsec init`: HA, HAC, and either the project's own MN
(`mn-eap-tls.toml`) or an independent MN of PROFILE.md -- stdlib `ssl` for the
outer MHAuth TLS, hand-built containers and TV headers, and a pyOpenSSL EAP-TLS
peer of its own (no mipsec EAP or MHAuth code) -- over EAP-TLS 1.2 and 1.3,
with the outer TLS 1.2 and 1.3 alike.
"""

from __future__ import annotations

import json
import os
import random
import ssl
from pathlib import Path
from typing import Any

import pytest
from conftest import Lab, edit_toml, mipsec
from raweap import ONE, RawEapTlsPeer, eap_tls_exchange, next_request
from rawha import binding_update, parse_ba
from rawmn import RawMN, container, lines
from test_hac_rawmn import _final_or_close, _flip, _half_close
from test_interop_ha import raw_sa, udp

MN_ID = "demo@mipsec.test"


def run_mn(config: str) -> tuple[int, dict[str, Any]]:
    out = mipsec("--role", "mn", "--config", config, "--once", "--json", timeout=90)
    rows = out.stdout.strip().splitlines()
    assert rows, out.stderr
    return out.returncode, json.loads(rows[-1])


def pin(lab: Lab, *, inner: str, outer: str) -> None:
    """TLS versions: inner = EAP-TLS (both ends), outer = MHAuth TLS (strict_rfc6618)."""
    if outer == "1.2":
        edit_toml(
            Path(lab.info["hac"]["config"]), "strict_rfc6618 = false", "strict_rfc6618 = true"
        )
    hac = Path(lab.info["hac"]["config"])
    edit_toml(
        hac,
        'identity_policy = "rfc822name"',
        f'identity_policy = "rfc822name"\ntls_max = "{inner}"',
    )


@pytest.mark.parametrize("outer", ["1.2", "1.3"])
@pytest.mark.parametrize("inner", ["1.2", "1.3"])
def test_own_mn_eap_tls(lab: Lab, start_hac: Any, inner: str, outer: str) -> None:
    pin(lab, inner=inner, outer=outer)
    start_hac(lab)
    rc, res = run_mn(str(lab.dir / "mn-eap-tls.toml"))
    assert rc == 0 and res["status"] == 200 and res["ba"]["status"] == 0, res


def test_mn_certificate_for_another_identity_is_401(lab: Lab, start_hac: Any) -> None:
    mn = lab.dir / "mn-eap-tls.toml"
    edit_toml(mn, 'mn_id = "demo@mipsec.test"', 'mn_id = "other@mipsec.test"')
    with (lab.dir / "credentials.toml").open("a") as f:  # known for PSK: irrelevant to EAP
        f.write(f'\n[[mn]]\nmn_id = "other@mipsec.test"\npsk_hex = "{"ab" * 32}"\n')
    start_hac(lab)
    rc, res = run_mn(str(mn))
    assert rc == 1 and res["status"] == 401 and res["authenticated"], res


def test_mn_refuses_an_eap_server_certificate_with_another_name(lab: Lab, start_hac: Any) -> None:
    mn = lab.dir / "mn-eap-tls.toml"
    edit_toml(mn, 'server_name = "eap.mipsec.test"', 'server_name = "eap.elsewhere.test"')
    start_hac(lab)
    rc, res = run_mn(str(mn))
    # The MN's TLS alert goes to the HAC inside EAP; the HAC answers EAP-Failure (401).
    assert rc == 1 and res["status"] == 401 and res["authenticated"], res


# ------------------------------------------------------------ an independent MN


def IndependentEapTls(  # noqa: N802 -- was a class here; the tests' name for raweap's peer
    lab: Lab, tls: str, cert: str | None = None, key: str | None = None
) -> RawEapTlsPeer:
    """The independent EAP-TLS peer (raweap.py) as the lab's demo MN."""
    return RawEapTlsPeer(
        MN_ID,
        cert=cert or lab.info["mn"]["cert"],
        key=key or lab.info["mn"]["key"],
        ca=lab.info["eap"]["ca"],
        server_name=lab.info["eap"]["server_name"],
        tls=tls,
    )


def independent_bootstrap(
    lab: Lab,
    *,
    inner: str,
    outer: str,
    peer: RawEapTlsPeer | None = None,
    done_key: bytes | None = None,
) -> dict[str, str]:
    mn = RawMN(
        "127.0.0.1",
        lab.hac_port,
        lab.info["ca"],
        "hac.mipsec.test",
        max_version=ssl.TLSVersion.TLSv1_2 if outer == "1.2" else None,
    )
    try:
        assert mn.version == f"TLSv{outer}"
        peer = peer or IndependentEapTls(lab, inner)
        r, done = eap_tls_exchange(mn, peer, done_key=done_key)
        final = r.headers
        final["_auth_with_msk"] = str(done and r.auth_ok(peer.msk(), mn.cb))
        final["_auth_with_one"] = str(r.auth_ok(ONE, mn.cb))
        return final
    finally:
        mn.close()


@pytest.mark.parametrize(
    ("inner", "outer"), [("1.2", "1.2"), ("1.3", "1.3"), ("1.2", "1.3"), ("1.3", "1.2")]
)
def test_independent_mn_eap_tls(lab: Lab, start_hac: Any, inner: str, outer: str) -> None:
    pin(lab, inner=inner, outer=outer)
    start_hac(lab)
    final = independent_bootstrap(lab, inner=inner, outer=outer)
    assert final["status-code"] == "200", final
    assert final["eap-payload"][:2] == "03"  # EAP-Success
    assert final["_auth_with_msk"] == "True" and final["_auth_with_one"] == "False"
    assert "mip6-spi" in final and "mip6-mn-to-ha-ikey" in final
    # ... and registers with the HA under the SA it got (issue 7 "Done when").
    sa = raw_sa(final, final["mip6-ciphersuite"])
    hoa, haa = final["mip6-ip6-hoa"], final["mip6-haa-ip6"]
    sock = udp()
    try:
        sock.sendto(sa.protect(binding_update(7, 25, hoa, haa)), ("127.0.0.1", lab_ha_port(lab)))
        _seq, nh, mh = sa.unprotect(sock.recvfrom(2048)[0])
    finally:
        sock.close()
    assert nh == 135 and parse_ba(mh) == {"status": 0, "k": 0, "sequence": 7, "lifetime": 25}


def lab_ha_port(lab: Lab) -> int:
    return int(lab.info["ha"]["port"])


def test_demo_auth_eap_tls() -> None:
    out = mipsec("demo", "--auth", "eap-tls", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "EAP-TLS" in out.stdout and "status 0" in out.stdout


def damaged_bootstrap(lab: Lab, rng: random.Random, inner: str) -> tuple[str, int | str, bool]:
    """The independent MN's EAP-TLS bootstrap with one request damaged (one
    octet flipped, or cut short; ``_flip`` of test_hac_rawmn): the Init, one
    of the EAP rounds, or the Done -- whichever comes first of a random round
    and the Done.  Returns (the HAC's answer to it, its round -- "done" for
    the Done --, and for a 200 whether it verifies under the MN's own MSK)."""
    mn = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
    try:
        peer = IndependentEapTls(lab, inner)
        at = rng.randrange(8)
        init = lines([("mn-id", MN_ID), ("mn-rand", os.urandom(32).hex()),
                      ("auth-method", "eap")]) + b"\r\n"  # fmt: skip
        if at == 0:
            mn.send_raw(_flip(container(1, init), rng))
            _half_close(mn)
            return _final_or_close(mn), 0, False
        mn.send(init)
        r = mn.recv()
        done = False
        for i in range(1, 100):
            body, done = next_request(peer, r, mn, done)
            if i >= at or done:
                mn.send_raw(_flip(container(mn.next_id, body), rng))
                _half_close(mn)
                try:
                    r = mn.recv()
                except (EOFError, ConnectionError, ssl.SSLError, OSError):
                    return "closed", "done" if done else i, False
                status = r.headers.get("status-code", "continue")
                return (
                    status,
                    "done" if done else i,
                    status == "200" and r.auth_ok(peer.msk(), mn.cb),
                )
            mn.send(body)
            r = mn.recv()
            assert "status-code" not in r.headers, r.headers
        raise AssertionError("no Done within 100 rounds")
    finally:
        mn.close()


@pytest.mark.parametrize("inner", ["1.2", "1.3"])
def test_a_running_hac_answers_damaged_eap_requests(lab: Lab, start_hac: Any, inner: str) -> None:
    """test_hac_rawmn's damaged-request check for EAP, over real TLS against a
    real HAC process: 40 EAP-TLS conversations of the independent MN, each
    with one request damaged.  The HAC answers each with a final 4xx/501 or a
    non-final response (the damage left a valid request), or closes; a 200
    only when it verifies under the MN's own MSK (the damage changed nothing
    the HAC reads: the EAP-TLS property test's reserved bits); as many SAs
    issued as 200s seen; no traceback; a genuine MN bootstraps afterwards."""
    pin(lab, inner=inner, outer="1.3")
    hac = start_hac(lab)
    rng = random.Random(5216)
    seen: dict[str, int] = {}
    rounds: set[int | str] = set()
    for _ in range(40):
        status, at, verifies = damaged_bootstrap(lab, rng, inner)
        assert status in ("200", "400", "401", "501", "continue", "closed"), status
        if status == "200":
            assert verifies, at
        seen[status] = seen.get(status, 0) + 1
        rounds.add(at)
    assert {0, 1, 2, "done"} <= rounds, rounds  # the Init, EAP rounds and the Done were hit
    assert seen.get("400", 0) + seen.get("401", 0) >= 10, seen
    final = independent_bootstrap(lab, inner=inner, outer="1.3")
    assert final["status-code"] == "200", final
    hac.terminate()
    log = hac.communicate(timeout=10)[0]
    assert "Traceback" not in log and "Task exception" not in log
    assert log.count("event=sa_issued") == seen.get("200", 0) + 1, (seen, log[-3000:])
