"""Interop: the project's EAP-TLS *peer* against FreeRADIUS 3.2's EAP-TLS *server*.

The lab of ../shared/aaa-lab runs FreeRADIUS on loopback (RSA-2048 PKI,
fragment_size 1024, EAP-TLS 1.2 by default, 1.3 with AAA_LAB_TLS_MAX=1.3).
This test plays a minimal RADIUS client (minirad.py) so that FreeRADIUS and EapTlsPeer
talk EAP-TLS end to end: FreeRADIUS's fragmentation, its TLS 1.3 commitment
message (RFC 9190), and its MSK, which comes back as MS-MPPE-Recv-Key ||
MS-MPPE-Send-Key (RFC 2548 §2.4.2-2.4.3, decrypted here) and must equal the
MSK the peer derived.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import in_ci
from minirad import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    ACCESS_REJECT,
    MICROSOFT,
    MS_MPPE_RECV_KEY,
    MS_MPPE_SEND_KEY,
    STATE,
    access_request,
    find_vendor_attr,
    first,
    joined_eap,
    mppe_decrypt,
    parse_reply,
)

from mipsec.core.eap.eaptls import EapTlsPeer
from mipsec.core.eap.method import Decision, EapPeerContext, MethodState
from mipsec.core.hookspecs import PluginContext
from mipsec.core.wire.eap import EapCode, EapPacket, EapType, decode_eap, encode_eap
from mipsec.plugins.eap_tls import EapTlsMethod

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

LAB_SCRIPT = Path(__file__).resolve().parents[3] / "shared" / "aaa-lab" / "start-freeradius.sh"
IDENTITY = "mn1@lab.test"
SERVER_NAME = "radius.lab.test"  # the lab's server certificate dNSName


def _start_lab(directory: Path, tls_max: str) -> dict[str, str]:
    if not LAB_SCRIPT.exists() or shutil.which("apt-get") is None or os.geteuid() != 0:
        reason = "the AAA lab needs ../shared/aaa-lab, apt-get and root"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    env = dict(
        os.environ,
        AAA_LAB_AUTH_PORT="0",
        AAA_LAB_ACCT_PORT="0",
        AAA_LAB_AKA="0",
        AAA_LAB_TLS_MAX=tls_max,
    )
    out = subprocess.run(
        ["bash", str(LAB_SCRIPT), "start", str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        pytest.fail(f"AAA lab did not start: {out.stderr[-2000:]}")
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


@pytest.fixture(scope="module", params=["1.2", "1.3"])
def lab(request, tmp_path_factory) -> Iterator[dict[str, str]]:
    """A FreeRADIUS lab whose EAP-TLS allows TLS up to ``param``."""
    directory = tmp_path_factory.mktemp(f"aaa-tls{request.param}")
    env = _start_lab(directory, request.param)
    try:
        yield env
    finally:
        subprocess.run(
            ["bash", str(LAB_SCRIPT), "stop", str(directory)],
            capture_output=True,
            timeout=60,
        )


def run_against_freeradius(lab: dict[str, str], peer: EapTlsPeer):
    secret = lab["SECRET"].encode()
    addr = ("127.0.0.1", int(lab["AUTH_PORT"]))
    eap = encode_eap(EapPacket(EapCode.RESPONSE, 0, EapType.IDENTITY, IDENTITY.encode()))
    state, outputs, request_sizes = None, [], []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for rid in range(100):
            packet, authenticator = access_request(secret, rid, IDENTITY, eap, state)
            sock.sendto(packet, addr)
            code, attrs = parse_reply(secret, rid, authenticator, sock.recv(4096))
            joined = joined_eap(attrs)
            if code != ACCESS_CHALLENGE:
                return code, attrs, authenticator, decode_eap(joined), outputs, request_sizes
            state = first(attrs, STATE)
            request = decode_eap(joined)
            request_sizes.append(len(joined))
            assert request.code is EapCode.REQUEST and request.type == EapType.TLS, request
            out = peer.process(request)
            outputs.append(out)
            if out.data is None:
                return None, attrs, authenticator, request, outputs, request_sizes
            eap = encode_eap(EapPacket(EapCode.RESPONSE, request.identifier, EapType.TLS, out.data))
    raise AssertionError("FreeRADIUS did not finish")


def make_peer(lab: dict[str, str], **over) -> EapTlsPeer:
    options = {
        "cert": lab["CLIENT_CERT"],
        "key": lab["CLIENT_KEY"],
        "ca": lab["CA_CERT"],
        "server_name": SERVER_NAME,
        **over,
    }
    factory = EapTlsMethod().peer(options, PluginContext("mn", Path(lab["DIR"])))
    return factory.new(EapPeerContext(mn_id=IDENTITY))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("peer_max", ["1.2", "1.3"])
def test_peer_against_freeradius_msk_matches_mppe_keys(lab, peer_max):
    peer = make_peer(lab, tls_max=peer_max)
    code, attrs, authenticator, final_eap, outputs, sizes = run_against_freeradius(lab, peer)
    assert code == ACCESS_ACCEPT, [o.reason for o in outputs]
    assert final_eap.code is EapCode.SUCCESS
    expected = f"TLSv{min(peer_max, lab['TLS_MAX'])}"
    assert peer.tls_version == expected
    # PROFILE §4 item 4: success decided with the final empty response only.
    assert outputs[-1].state is MethodState.DONE
    assert outputs[-1].decision is Decision.UNCOND_SUCC and outputs[-1].data == b"\x00"
    assert all(o.decision is Decision.FAIL for o in outputs[:-1])
    # FreeRADIUS fragments its certificate flight (fragment_size 1024); the
    # peer acknowledged each fragment with an empty response.
    assert max(sizes) > 253 and sum(1 for o in outputs if o.data == b"\x00") >= 2
    # RFC 2548 / RFC 5216 §2.3, RFC 9190 §2.3: MS-MPPE-Recv-Key || Send-Key = MSK.
    secret = lab["SECRET"].encode()
    recv = mppe_decrypt(secret, authenticator, find_vendor_attr(attrs, MICROSOFT, MS_MPPE_RECV_KEY))
    send = mppe_decrypt(secret, authenticator, find_vendor_attr(attrs, MICROSOFT, MS_MPPE_SEND_KEY))
    assert len(recv) == len(send) == 32
    assert recv + send == peer.msk()


def test_peer_refuses_freeradius_under_another_name(lab):
    peer = make_peer(lab, server_name="other.lab.test")
    code, _, _, final_eap, outputs, _ = run_against_freeradius(lab, peer)
    refusal = outputs[-1]
    assert refusal.decision is Decision.FAIL and refusal.state is MethodState.DONE
    assert "EAP server certificate: no dNSName equals 'other.lab.test'" in refusal.reason
    # Our alert went to FreeRADIUS in the Response; it rejected.
    assert code == ACCESS_REJECT and final_eap.code is EapCode.FAILURE
    assert peer.msk() is None
