"""Issue 7's bad inputs, sent by the independent MN to a running HAC.

tests/unit/test_eap_mhauth.py checks each one on the sans-I/O exchange; here a
real ``mipsec --role hac`` process from ``mipsec init`` (EAP-TLS for the lab
realm) answers them over real TLS, and the answer is what PROFILE §4 says: a
final response with its status, EAP-Failure inside, keyed with ``1`` (item
6), or -- for a peer that goes silent -- the close at the deadline.  The MN
is tests/integration/rawmn.py plus the pyOpenSSL EAP-TLS peer of
test_eap_tls_e2e.py: hand-built containers, TV headers and EAP packets, no
mipsec protocol code.  (The certificates are made with core/pki.py: test
set-up, not the thing under test.)
"""

from __future__ import annotations

import datetime
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Lab, edit_toml
from cryptography.hazmat.primitives import serialization
from rawmn import RawMN, Response, lines, with_auth
from test_eap_tls_e2e import MN_ID, ONE, IndependentEapTls, independent_bootstrap

from mipsec.core.pki import make_ca, make_leaf, write_cert, write_key

EAP_REQUEST, EAP_RESPONSE, EAP_SUCCESS, EAP_FAILURE = 1, 2, 3, 4
IDENTITY, NOTIFICATION, NAK, MD5, TLS = 1, 2, 3, 4, 13


def eap(code: int, ident: int, typ: int | None = None, data: bytes = b"") -> bytes:
    if typ is None:
        return struct.pack("!BBH", code, ident, 4)
    return struct.pack("!BBHB", code, ident, 5 + len(data), typ) + data


class LiveEap:
    """The MHAuth side of an EAP exchange: the Init, then one EAP-Response
    per HAC response, keyed with ``1`` (PROFILE §4 items 1-3)."""

    def __init__(self, lab: Lab, mn_id: str = MN_ID) -> None:
        self.mn = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
        init = [("mn-id", mn_id), ("mn-rand", os.urandom(32).hex()), ("auth-method", "eap")]
        self.mn.send(lines(init) + b"\r\n")
        self.r = self.mn.recv()
        assert self.r.auth_ok(ONE, self.mn.cb) and "status-code" not in self.r.headers

    @property
    def request(self) -> bytes:
        """The EAP-Request in the HAC's last response."""
        return bytes.fromhex(self.r.headers["eap-payload"])

    @property
    def ident(self) -> int:
        return self.request[1]

    def send(self, payload: bytes, *, key: bytes = ONE, done: bool = False) -> Response:
        headers = [("eap-payload", payload.hex())]
        if done:
            headers += [("mip6-sas", "1"), ("mip6-suitelist", "{00,3C}")]
        self.mn.send(with_auth(lines(headers), key, b"MN", self.mn.cb))
        self.r = self.mn.recv()
        return self.r

    def identity(self, name: str = MN_ID) -> Response:
        return self.send(eap(EAP_RESPONSE, self.ident, IDENTITY, name.encode()))

    def close(self) -> None:
        self.mn.close()


def failed(lab_mn: LiveEap, status: str) -> None:
    """A final ``status`` carrying EAP-Failure, keyed with ``1`` (PROFILE §4 item 6),
    and the HAC closes (PROFILE §1)."""
    h = lab_mn.r.headers
    assert h.get("status-code") == status, h
    assert bytes.fromhex(h["eap-payload"])[0] == EAP_FAILURE
    assert lab_mn.r.auth_ok(ONE, lab_mn.mn.cb)
    assert "mip6-spi" not in h
    assert lab_mn.mn.at_eof()


@pytest.fixture
def hac(lab: Lab, start_hac: Any) -> Any:
    return start_hac(lab)


def events(hac: Any) -> list[str]:
    """The HAC's ``mipsec.events`` lines, after stopping it."""
    hac.terminate()
    out = hac.communicate(timeout=20)[0]
    assert "Traceback" not in out
    return [ln.split("mipsec.events: ", 1)[1] for ln in out.splitlines() if "mipsec.events: " in ln]


# ------------------------------------------------------------ EAP framing


def test_eap_length_not_the_packet_length_is_400(lab: Lab, hac: Any) -> None:
    m = LiveEap(lab)
    try:
        ok = eap(EAP_RESPONSE, m.ident, IDENTITY, MN_ID.encode())
        m.send(ok[:2] + struct.pack("!H", len(ok) + 1) + ok[4:])
        failed(m, "400")
    finally:
        m.close()


@pytest.mark.parametrize(
    "packet",
    [
        lambda i: eap(EAP_REQUEST, i, IDENTITY, MN_ID.encode()),  # a Request from the MN
        lambda i: eap(EAP_RESPONSE, i, NOTIFICATION),  # a Type nobody asked for
        lambda i: eap(EAP_SUCCESS, i),  # an MN never sends Success
    ],
    ids=["request-code", "notification-type", "success-code"],
)
def test_unexpected_code_or_type_is_400(lab: Lab, hac: Any, packet: Any) -> None:
    m = LiveEap(lab)
    try:
        m.send(packet(m.ident))
        failed(m, "400")
    finally:
        m.close()


def test_identity_naming_another_identity_is_401(lab: Lab, hac: Any) -> None:
    m = LiveEap(lab)
    try:
        m.identity("bob@mipsec.test")
        failed(m, "401")
    finally:
        m.close()
    assert any("reason=identity-mismatch" in e and f"mn_id={MN_ID}" in e for e in events(hac))


def test_nak_naming_nothing_the_hac_offers_is_401(lab: Lab, hac: Any) -> None:
    m = LiveEap(lab)
    try:
        m.identity()
        assert m.request[4] == TLS  # the lab offers EAP-TLS
        m.send(eap(EAP_RESPONSE, m.ident, NAK, bytes([MD5])))
        failed(m, "401")
    finally:
        m.close()
    assert any("reason=nak-names-nothing-offered" in e for e in events(hac))


# ------------------------------------------------------------ inside EAP-TLS


def test_a_tls_alert_inside_eap_tls_is_401(lab: Lab, hac: Any) -> None:
    m = LiveEap(lab)
    try:
        m.identity()
        assert m.request[4] == TLS and m.request[5] & 0x20  # EAP-TLS Start
        alert = bytes.fromhex("15030300020228")  # fatal handshake_failure (RFC 8446 §6)
        m.send(eap(EAP_RESPONSE, m.ident, TLS, b"\x00" + alert))
        # RFC 5216 §2.1.3: the server answers with a TLS alert of its own in
        # an EAP-TLS Request, the peer with an empty Response, then the
        # server ends with EAP-Failure.
        req = m.request
        assert "status-code" not in m.r.headers and req[4] == TLS and req[6] == 0x15, req.hex()
        m.send(eap(EAP_RESPONSE, m.ident, TLS, b"\x00"))
        failed(m, "401")
    finally:
        m.close()


def test_fragments_beyond_the_reassembly_limit_are_401(lab: Lab, hac: Any) -> None:
    m = LiveEap(lab)
    try:
        m.identity()
        # L and M set, a TLS Message Length of 16 MiB: beyond any limit the
        # HAC reassembles (RFC 5216 §2.1.5: the receiver bounds it).
        first = b"\xc0" + (16 << 20).to_bytes(4, "big") + b"\x16" * 1000
        m.send(eap(EAP_RESPONSE, m.ident, TLS, first))
        failed(m, "401")
    finally:
        m.close()


def _mn_cert(tmp_path: Path, lab: Lab, name: str, **kw: Any) -> tuple[str, str]:
    """An MN certificate: by the lab CA unless ``ca`` is given."""
    ca = kw.pop("ca", None)
    if ca is None:
        pki = lab.dir / "pki"
        ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
        from cryptography import x509

        ca = (ca_key, x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()))
    key, cert = make_leaf(
        ca[0], ca[1], common_name=name, email_addresses=[name], client=True, server=False, **kw
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    write_cert(cert_path, cert)
    write_key(key_path, key)
    return str(cert_path), str(key_path)


def _with_cert(lab: Lab, cert: tuple[str, str], alert: str) -> dict[str, str]:
    """The independent MN's EAP-TLS bootstrap with this certificate: the HAC's
    TLS stack refuses it with ``alert``, and the HAC ends with a final response."""
    peer = IndependentEapTls(lab, "1.3", cert=cert[0], key=cert[1])
    final = independent_bootstrap(lab, inner="1.3", outer="1.3", peer=peer)
    assert peer.alert is not None and alert in peer.alert, peer.alert
    return final


def test_mn_certificate_from_an_unknown_ca_is_401(lab: Lab, hac: Any, tmp_path: Path) -> None:
    final = _with_cert(
        lab, _mn_cert(tmp_path, lab, MN_ID, ca=make_ca("not the lab CA")), "unknown ca"
    )
    assert final["status-code"] == "401" and final["_auth_with_one"] == "True"
    assert final["eap-payload"][:2] == "04"


def test_expired_mn_certificate_is_401(lab: Lab, hac: Any, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    past = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
    final = _with_cert(lab, _mn_cert(tmp_path, lab, MN_ID, validity=past), "certificate expired")
    assert final["status-code"] == "401" and final["eap-payload"][:2] == "04"


def test_mn_certificate_of_another_identity_is_401(lab: Lab, hac: Any, tmp_path: Path) -> None:
    # bad_certificate: the identity policy refused a chain OpenSSL accepted
    # (core/eap/eaptls.py _verify_raw; it was internal_error before).
    final = _with_cert(lab, _mn_cert(tmp_path, lab, "other@mipsec.test"), "bad certificate")
    assert final["status-code"] == "401" and final["eap-payload"][:2] == "04"
    assert any("reason=" in e and f"mn_id={MN_ID}" in e and "401" in e for e in events(hac))


# ------------------------------------------------------------ the Done


@pytest.mark.parametrize("inner", ["1.2", "1.3"])
def test_done_keyed_with_1_where_the_msk_was_due_is_401(lab: Lab, hac: Any, inner: str) -> None:
    final = independent_bootstrap(lab, inner=inner, outer="1.3", done_key=ONE)
    assert final["status-code"] == "401" and final["_auth_with_one"] == "True"
    assert final["eap-payload"][:2] == "04" and "mip6-spi" not in final
    assert any("reason=bad-auth" in e for e in events(hac))


# ------------------------------------------------------------ a silent peer


def test_a_peer_that_goes_silent_is_closed_at_the_idle_deadline(lab: Lab, start_hac: Any) -> None:
    """After the HAC's EAP-TLS Start the MN says nothing: the HAC closes the
    connection at its idle deadline (``idle_timeout``, by default
    ``request_timeout``; no final response: PROFILE §1), logs
    the MN by name, and frees the slot."""
    edit_toml(Path(lab.info["hac"]["config"]), "request_timeout = 10 ", "request_timeout = 1 ")
    hac = start_hac(lab)
    m = LiveEap(lab)
    try:
        m.identity()
        started = time.monotonic()
        m.mn.sock.settimeout(10)
        assert m.mn.at_eof()  # closed by the HAC, without a final response
        assert time.monotonic() - started < 5
    finally:
        m.close()
    lines_ = events(hac)
    assert any(f"mn_id={MN_ID}" in e and e.endswith("reason=timeout") for e in lines_), lines_
