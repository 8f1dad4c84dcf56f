"""Interop: hostapd's EAP-TLS *peer* (eapol_test 2.10, wpa_supplicant's EAP code)
against the project's EAP-TLS *server*.

eapol_test speaks RADIUS only, so the HAC-side EapTlsServer sits behind a
tiny RADIUS server on loopback (minirad.py), which owns the EAP Identifiers
as the MHAuth framework does and returns the MSK as MS-MPPE-Recv-Key ||
MS-MPPE-Send-Key.  eapol_test derives its own MSK (RFC 5216 §2.3 / RFC 9190
§2.3), insists on the commitment message under TLS 1.3 and compares the keys:
"MPPE keys OK: 1  mismatch: 0".
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import debian_tool
from minirad import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    ACCESS_REJECT,
    MICROSOFT,
    MS_MPPE_RECV_KEY,
    MS_MPPE_SEND_KEY,
    STATE,
    attr,
    eap_attrs,
    first,
    joined_eap,
    mppe_encrypt,
    parse_request,
    reply,
    vendor_attr,
)

from mipsec.core.eap.eaptls import EapTlsServer
from mipsec.core.eap.method import EapServerContext
from mipsec.core.hookspecs import PluginContext
from mipsec.core.pki import make_ca, make_leaf, write_cert, write_key
from mipsec.core.wire.eap import (
    EapCode,
    EapPacket,
    EapType,
    decode_eap,
    encode_eap,
    failure,
    success,
)
from mipsec.plugins.eap_tls import EapTlsMethod

pytestmark = pytest.mark.timeout(600)  # may install the eapoltest package first

MN_ID = "mn1@example.net"
SERVER_NAME = "eap.example.net"
SECRET = b"minirad-secret"


@pytest.fixture(scope="module", autouse=True)
def eapol_test_installed() -> None:
    """eapol_test (Debian ``eapoltest``, as the AAA lab installs it)."""
    debian_tool("eapol_test", "eapoltest")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eapol-pki")
    ca_key, ca = make_ca("eapol interop CA")
    skey, scert = make_leaf(ca_key, ca, common_name="eap", dns_names=[SERVER_NAME])
    ckey, ccert = make_leaf(
        ca_key, ca, common_name="mn1", email_addresses=[MN_ID], client=True, server=False
    )
    write_cert(d / "ca.pem", ca)
    write_cert(d / "eap.pem", scert)
    write_key(d / "eap.key", skey)
    write_cert(d / "mn.pem", ccert)
    write_key(d / "mn.key", ckey)
    return d


@dataclass
class Session:
    machine: EapTlsServer
    eap_id: int
    verdict: str = "running"
    reason: str = ""


@dataclass
class MiniRadiusEapServer:
    """A loopback RADIUS server running one EapTlsServer per conversation."""

    factory: object
    sock: socket.socket = field(init=False)
    sessions: dict[bytes, Session] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                packet, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                self.sock.sendto(self._handle(packet), addr)
            except Exception as exc:  # recorded for the test to see
                self.errors.append(repr(exc))

    def _handle(self, packet: bytes) -> bytes:
        rid, auth, attrs = parse_request(SECRET, packet)
        eap = decode_eap(joined_eap(attrs))
        state = first(attrs, STATE)
        if state is None:
            # The Identity Response opens a conversation (as the HAC's EAP layer does).
            assert eap.type == EapType.IDENTITY
            identity = eap.data.decode()
            machine = self.factory.new(EapServerContext(mn_id=identity, identity=identity))
            state = secrets.token_bytes(16)
            session = self.sessions[state] = Session(machine, eap.identifier)
            return self._challenge(session, state, rid, auth, machine.initiate())
        session = self.sessions[state]
        assert eap.code is EapCode.RESPONSE and eap.identifier == session.eap_id
        out = session.machine.process(eap)
        if not out.done:
            assert out.data is not None
            return self._challenge(session, state, rid, auth, out.data)
        if not out.success:
            session.verdict, session.reason = "failure", out.reason
            return reply(SECRET, ACCESS_REJECT, rid, auth, eap_attrs(failure(eap.identifier)))
        session.verdict = "success"
        msk = session.machine.msk()
        assert msk is not None and len(msk) == 64
        attrs_out = eap_attrs(success(eap.identifier))
        attrs_out += vendor_attr(MICROSOFT, MS_MPPE_RECV_KEY, mppe_encrypt(SECRET, auth, msk[:32]))
        attrs_out += vendor_attr(MICROSOFT, MS_MPPE_SEND_KEY, mppe_encrypt(SECRET, auth, msk[32:]))
        return reply(SECRET, ACCESS_ACCEPT, rid, auth, attrs_out)

    def _challenge(
        self, session: Session, state: bytes, rid: int, auth: bytes, type_data: bytes
    ) -> bytes:
        session.eap_id = (session.eap_id + 1) & 0xFF
        eap = encode_eap(EapPacket(EapCode.REQUEST, session.eap_id, EapType.TLS, type_data))
        return reply(SECRET, ACCESS_CHALLENGE, rid, auth, eap_attrs(eap) + attr(STATE, state))


def eapol_test(pki: Path, port: int, tmp: Path, *, identity: str, tls13: bool) -> str:
    phase1 = (
        'phase1="tls_disable_tlsv1_0=1 tls_disable_tlsv1_1=1 tls_disable_tlsv1_2=1 '
        'tls_disable_tlsv1_3=0"'
        if tls13
        else ""
    )
    conf = tmp / "eapol.conf"
    conf.write_text(
        "network={\n"
        "  key_mgmt=IEEE8021X\n  eap=TLS\n"
        f'  identity="{identity}"\n'
        f'  ca_cert="{pki / "ca.pem"}"\n'
        f'  client_cert="{pki / "mn.pem"}"\n'
        f'  private_key="{pki / "mn.key"}"\n'
        f'  domain_suffix_match="{SERVER_NAME}"\n'
        f"  {phase1}\n  eapol_flags=0\n}}\n"
    )
    out = subprocess.run(
        ["eapol_test", "-c", str(conf), "-a", "127.0.0.1", "-p", str(port)]
        + ["-s", SECRET.decode(), "-t", "20", "-r", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return f"rc={out.returncode}\n{out.stdout}\n{out.stderr}"


@pytest.fixture
def radius(pki):
    factory = EapTlsMethod().server(
        {"cert": "eap.pem", "key": "eap.key", "ca": "ca.pem"}, PluginContext("hac", pki)
    )
    server = MiniRadiusEapServer(factory)
    yield server
    server.close()


@pytest.mark.parametrize("tls13", [False, True], ids=["tls1.2", "tls1.3"])
def test_eapol_test_peer_against_our_server(pki, radius, tmp_path, tls13):
    log = eapol_test(pki, radius.port, tmp_path, identity=MN_ID, tls13=tls13)
    assert not radius.errors, radius.errors
    (session,) = radius.sessions.values()
    assert session.verdict == "success", (session.reason, log[-3000:])
    assert session.machine.tls_version == ("TLSv1.3" if tls13 else "TLSv1.2")
    # eapol_test derived its own MSK and found it in our MPPE keys.
    assert "MPPE keys OK: 1  mismatch: 0" in log, log[-3000:]
    assert log.startswith("rc=0") and "SUCCESS" in log


def test_eapol_test_peer_whose_certificate_does_not_name_the_identity(pki, radius, tmp_path):
    # eapol_test claims mn2@example.net, but its certificate names mn1@example.net.
    log = eapol_test(pki, radius.port, tmp_path, identity="mn2@example.net", tls13=True)
    assert not radius.errors, radius.errors
    (session,) = radius.sessions.values()
    assert session.verdict == "failure"
    assert "equals mn-id 'mn2@example.net'" in session.reason
    assert session.machine.msk() is None
    assert not log.startswith("rc=0") and "MPPE keys OK: 0" in log and "FAILURE" in log
