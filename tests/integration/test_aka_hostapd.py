"""Interop: the MN's EAP-AKA / EAP-AKA' peer against hostapd's EAP-AKA server.

The AAA lab's hostapd (integrated RADIUS server, ``eap_sim_aka_result_ind=1``,
pseudonyms and fast re-authentication identities on) with its own Milenage
AuC (``hlr_auc_gw.py``) is started on a free loopback port; the test talks
RADIUS to it (tests/integration/radius_eap.py) and runs the peer built by the
``aka`` / ``aka-prime`` plugins.  Success means hostapd's Access-Accept and
the MSK the peer derived agree: MS-MPPE-Recv-Key | MS-MPPE-Send-Key == MSK.
Two independent Milenage implementations (the lab's AuC, the MN's USIM) and
two independent EAP-AKA implementations must agree for that.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from radius_eap import ACCESS_ACCEPT, ACCESS_REJECT, RadiusEap

from mipsec.core.eap.aka_peer import AkaPeer
from mipsec.core.eap.method import Decision, EapPeerContext
from mipsec.core.hookspecs import PluginContext
from mipsec.core.wire.eap import EapCode, EapPacket, EapType, decode_eap, encode_eap
from mipsec.plugins.eap_aka import AKA, AKA_PRIME

LAB = Path(os.environ.get("AAA_LAB", Path(__file__).resolve().parents[3] / "shared" / "aaa-lab"))
SECRET = b"testing123"
KI, OPC, AMF = "465b5ce8b199b49faa5f0a2ee238a6bc", "cd63cb71954a9f4e48a5994e37a02baf", "b9b9"
IMSI, REALM = "001010000000001", "wlan.mnc001.mcc001.3gppnetwork.org"


@pytest.fixture(scope="module")
def hostapd_aka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    script = LAB / "start-hostapd-aka.sh"
    if not script.is_file():
        pytest.fail(f"the AAA lab is missing: {script} (set AAA_LAB to its directory)")
    d = tmp_path_factory.mktemp("hostapd-aka")
    env = dict(os.environ, AAA_LAB_AKA_PORT="0")
    run = subprocess.run(
        ["bash", str(script), "start", str(d)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lab = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)
    try:
        yield lab
    finally:
        subprocess.run(["bash", str(script), "stop", str(d)], capture_output=True, timeout=60)


def make_peer(tmp_path: Path, prime: bool, **over: Any) -> tuple[AkaPeer, str]:
    identity = f"{'6' if prime else '0'}{IMSI}@{REALM}"
    opts: dict[str, Any] = {
        "ki": KI,
        "opc": OPC,
        "amf": AMF,
        "sqn": "ff9bb4d0b607",  # the lab README's SQN_MS; AUTS sorts out any drift
        "sqn_file": "usim.sqn",
    }
    if prime:
        opts["network_name"] = "WLAN"
    opts.update(over)
    method = AKA_PRIME if prime else AKA
    factory = method.peer(opts, PluginContext("mn", tmp_path))
    return factory.new(EapPeerContext(identity)), identity


def converse(
    lab: dict[str, str], peer: AkaPeer, identity: str
) -> tuple[int, bytes | None, list[str]]:
    """One EAP conversation over RADIUS; (final RADIUS code, MSK from MPPE keys, trace)."""
    radius = RadiusEap("127.0.0.1", int(lab["AKA_AUTH_PORT"]), SECRET, identity)
    trace: list[str] = []
    try:
        eap_identity = EapPacket(EapCode.RESPONSE, 0, EapType.IDENTITY, identity.encode())
        reply = radius.exchange(encode_eap(eap_identity))
        for _ in range(10):
            req = decode_eap(reply.eap)
            if req.code in (EapCode.SUCCESS, EapCode.FAILURE):
                trace.append(req.code.name)
                return reply.code, reply.msk, trace
            out = peer.process(req)
            trace.append(f"{req.data[0]}->{out.data[0] if out.data else None}:{out.reason}")
            assert out.data is not None, out.reason
            resp = EapPacket(EapCode.RESPONSE, req.identifier, req.type, out.data)
            reply = radius.exchange(encode_eap(resp))
        raise AssertionError(f"no end: {trace}")
    finally:
        radius.close()


@pytest.mark.parametrize("prime", [False, True], ids=["aka", "aka-prime"])
@pytest.mark.parametrize("result_ind", [False, True], ids=["plain", "result-ind"])
def test_success_and_msk(
    hostapd_aka: dict[str, str], tmp_path: Path, prime: bool, result_ind: bool
) -> None:
    peer, identity = make_peer(tmp_path, prime, result_ind=result_ind)
    code, msk, trace = converse(hostapd_aka, peer, identity)
    assert code == ACCESS_ACCEPT, trace
    assert msk is not None and msk == peer.msk(), trace
    assert trace[-1] == "SUCCESS"
    # hostapd always offers AT_RESULT_IND: with it the success notification follows
    assert any(t.startswith("12->12") for t in trace) == result_ind, trace


@pytest.mark.parametrize("prime", [False, True], ids=["aka", "aka-prime"])
def test_usim_ahead_of_the_auc_resynchronises(
    hostapd_aka: dict[str, str], tmp_path: Path, prime: bool
) -> None:
    # Both runs share the lab's one subscriber: the second starts further ahead.
    peer, identity = make_peer(tmp_path, prime, sqn="fffffff80000" if prime else "fffffff00000")
    code, msk, trace = converse(hostapd_aka, peer, identity)
    assert code == ACCESS_ACCEPT and msk == peer.msk(), trace
    assert any("AUTS" in t for t in trace), trace


def test_wrong_ki_is_rejected(hostapd_aka: dict[str, str], tmp_path: Path) -> None:
    peer, identity = make_peer(tmp_path, False, ki="00" * 16)
    code, msk, trace = converse(hostapd_aka, peer, identity)
    assert code == ACCESS_REJECT and msk is None, trace
    assert "1->2" in trace[-2], trace  # AKA-Challenge answered with Authentication-Reject
    assert peer.msk() is None


def test_network_name_mismatch_is_rejected(hostapd_aka: dict[str, str], tmp_path: Path) -> None:
    peer, identity = make_peer(tmp_path, True, network_name="HRPD")  # hostapd says "WLAN"
    code, _, trace = converse(hostapd_aka, peer, identity)
    assert code == ACCESS_REJECT, trace
    assert "'WLAN'" in trace[-2] and "1->2" in trace[-2], trace


def test_decision_after_the_challenge(hostapd_aka: dict[str, str], tmp_path: Path) -> None:
    # Without result indications, the challenge response is where the MN's
    # decision becomes COND_SUCC (PROFILE §4 item 4 attaches Done to it).
    peer, identity = make_peer(tmp_path, False)
    radius = RadiusEap("127.0.0.1", int(hostapd_aka["AKA_AUTH_PORT"]), SECRET, identity)
    try:
        reply = radius.exchange(
            encode_eap(EapPacket(EapCode.RESPONSE, 0, EapType.IDENTITY, identity.encode()))
        )
        decisions = []
        while (req := decode_eap(reply.eap)).code is EapCode.REQUEST:
            out = peer.process(req)
            decisions.append(out.decision)
            assert out.data is not None, out.reason
            reply = radius.exchange(
                encode_eap(EapPacket(EapCode.RESPONSE, req.identifier, req.type, out.data))
            )
        # AKA-Identity (and AKA-Synchronization-Failure, if the shared AuC had
        # drifted) then the AKA-Challenge response
        assert decisions[-1] is Decision.COND_SUCC
        assert set(decisions[:-1]) == {Decision.FAIL} and len(decisions) in (2, 3)
        assert reply.code == ACCESS_ACCEPT
    finally:
        radius.close()
