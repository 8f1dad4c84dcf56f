"""Lab PKI generation (core/pki.py)."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from mipsec.core import pki


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _eku(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> pki.PkiPaths:
    return pki.init_pki(tmp_path_factory.mktemp("pki"))


def test_init_pki_files_and_modes(paths: pki.PkiPaths) -> None:
    for name in ("ca_key", "hac_key", "ha_key", "hac_client_key"):
        p = getattr(paths, name)
        assert _mode(p) == 0o600, name
        data = p.read_bytes()
        assert data.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
        serialization.load_pem_private_key(data, password=None)
    for name in ("ca_cert", "hac_cert", "ha_cert", "hac_client_cert"):
        assert _mode(getattr(paths, name)) == 0o644, name


def test_hac_certificate_profile(paths: pki.PkiPaths) -> None:
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    hac = x509.load_pem_x509_certificate(paths.hac_cert.read_bytes())
    key = serialization.load_pem_private_key(paths.hac_key.read_bytes(), password=None)
    assert isinstance(hac.public_key(), ec.EllipticCurvePublicKey)
    assert hac.public_key().curve.name == "secp256r1"
    assert isinstance(hac.signature_hash_algorithm, hashes.SHA256)
    assert _san(hac).get_values_for_type(x509.DNSName) == ["hac.mipsec.test"]
    assert _san(hac).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert _eku(hac) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert not hac.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    hac.verify_directly_issued_by(ca)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == hac.public_key().public_bytes(*spki)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_ha_and_client_certificates(paths: pki.PkiPaths) -> None:
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ha = x509.load_pem_x509_certificate(paths.ha_cert.read_bytes())
    client = x509.load_pem_x509_certificate(paths.hac_client_cert.read_bytes())
    ha.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert _san(ha).get_values_for_type(x509.DNSName) == ["ha.mipsec.test"]
    # The HA is a TLS server for provisioning and a TLS client when it pulls (PROFILE §9).
    assert _eku(ha) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _eku(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_init_pki_refuses_to_overwrite(paths: pki.PkiPaths) -> None:
    before = paths.ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="ca"):
        pki.init_pki(paths.ca_cert.parent)
    assert paths.ca_key.read_bytes() == before
    again = pki.init_pki(paths.ca_cert.parent, overwrite=True)
    assert again.ca_key.read_bytes() != before


def test_init_pki_custom_names(tmp_path) -> None:
    p = pki.init_pki(tmp_path, hac_names=("a.example", "b.example"), hac_ips=("::1",))
    hac = x509.load_pem_x509_certificate(p.hac_cert.read_bytes())
    assert _san(hac).get_values_for_type(x509.DNSName) == ["a.example", "b.example"]
    assert _san(hac).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]


@pytest.mark.parametrize(
    ("key_type", "cls"),
    [
        ("ec-p256", ec.EllipticCurvePublicKey),
        ("rsa2048", rsa.RSAPublicKey),
        ("ed25519", ed25519.Ed25519PublicKey),
        ("ed448", ed448.Ed448PublicKey),
    ],
)
def test_leaf_key_types(key_type: str, cls) -> None:
    ca_key, ca_cert = pki.make_ca()
    key, cert = pki.make_leaf(ca_key, ca_cert, common_name="x", key_type=key_type)
    assert isinstance(cert.public_key(), cls)
    cert.verify_directly_issued_by(ca_cert)


def test_leaf_without_san_and_purposes() -> None:
    ca_key, ca_cert = pki.make_ca()
    _, cert = pki.make_leaf(
        ca_key, ca_cert, common_name="hac.mipsec.test", dns_names=["x"], include_san=False
    )
    with pytest.raises(x509.ExtensionNotFound):
        _san(cert)
    _, both = pki.make_leaf(ca_key, ca_cert, common_name="x", client=True, server=True)
    assert _eku(both) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    with pytest.raises(ValueError, match="purpose"):
        pki.make_leaf(ca_key, ca_cert, common_name="x", client=False, server=False)


def test_bad_parameters() -> None:
    ca_key, ca_cert = pki.make_ca()
    with pytest.raises(ValueError, match="key_type"):
        pki.make_leaf(ca_key, ca_cert, common_name="x", key_type="dsa")
    with pytest.raises(ValueError, match="signature_hash"):
        pki.make_leaf(ca_key, ca_cert, common_name="x", signature_hash="sha3")
    # No ECDSA-with-MD5 algorithm exists.
    with pytest.raises(ValueError, match="md5"):
        pki.make_leaf(ca_key, ca_cert, common_name="x", signature_hash="md5")
    with pytest.raises(ValueError, match="days"):
        pki.make_ca(days=0)


def test_legacy_resigned_certificate_verifies() -> None:
    from cryptography.hazmat.primitives.asymmetric import padding

    for ca_type in ("ec-p256", "rsa2048"):
        ca_key, ca_cert = pki.make_ca(key_type=ca_type)
        _, cert = pki.make_leaf(ca_key, ca_cert, common_name="x", signature_hash="sha1")
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA1)
        pub = ca_cert.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(
                cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1()
            )
        else:
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA1()))


def test_write_helpers(tmp_path) -> None:
    ca_key, ca_cert = pki.make_ca()
    key_path = tmp_path / "k.pem"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)
    pki.write_key(key_path, ca_key)
    assert _mode(key_path) == 0o600  # tightened even when the file existed
    bundle = tmp_path / "bundle.pem"
    pki.write_pem(bundle, ca_cert, ca_key)
    assert _mode(bundle) == 0o600
    certs_only = tmp_path / "certs.pem"
    pki.write_pem(certs_only, ca_cert)
    assert _mode(certs_only) == 0o644
    chain = tmp_path / "chain.pem"
    pki.write_cert(chain, ca_cert, ca_cert)
    assert len(x509.load_pem_x509_certificates(chain.read_bytes())) == 2
