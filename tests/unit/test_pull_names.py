"""Which certificate may pull an HA's SAs (PROFILE §9 pull): the name the HAC
checks when it provisions to that HA -- its ``server_name``, else the address
it is reached at, proven by an iPAddress SAN."""

from __future__ import annotations

import datetime
import ipaddress
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from mipsec.core.errors import CertificateError
from mipsec.core.roles.hac import HacService
from mipsec.core.roles.provserver import check_client_names


def _cert(*sans: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ha")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


def _names(ha_id: str) -> list[str] | None:
    cfg = SimpleNamespace(
        ha=[
            SimpleNamespace(id="ha1", options={"host": "192.0.2.10"}),  # by address
            SimpleNamespace(id="ha2", options={"host": "192.0.2.20"}),
            SimpleNamespace(id="ha3", options={"host": "ha3.lan", "server_name": "ha3.example"}),
        ],
        provisioning=SimpleNamespace(client_names=("ha1.example", "ha2.example")),
    )
    return HacService._ha_cert_names(SimpleNamespace(cfg=cfg), ha_id)  # type: ignore[arg-type]


def test_an_ha_without_server_name_is_proven_by_its_address_only() -> None:
    """HA1, configured by address: only a certificate with HA1's address as
    an iPAddress SAN may pull for ``ha-id: ha1``.  Before, an HA without
    ``server_name`` fell back to the pull listener's whole ``client_names``,
    so HA2's certificate could pull HA1's SAs, keys included (found in
    review)."""
    assert _names("ha1") == ["192.0.2.10"]
    assert _names("ha3") == ["ha3.example"]
    assert _names("ha9") is None
    ha2_by_name = _cert(x509.DNSName("ha2.example"))
    with pytest.raises(CertificateError, match="iPAddress"):
        check_client_names(ha2_by_name, _names("ha1") or [])
    ha2_by_address = _cert(x509.IPAddress(ipaddress.ip_address("192.0.2.20")))
    with pytest.raises(CertificateError):
        check_client_names(ha2_by_address, _names("ha1") or [])
    check_client_names(_cert(x509.IPAddress(ipaddress.ip_address("192.0.2.10"))), ["192.0.2.10"])
    check_client_names(_cert(x509.DNSName("ha3.example")), _names("ha3") or [])
