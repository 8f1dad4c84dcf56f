"""RFC 5929 §4.1 tls-server-end-point (PROFILE §1): hash selection and refusals."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from mipsec.core import pki
from mipsec.core.channel_binding import check_binding_capable, tls_server_end_point
from mipsec.core.errors import CertificateError

# Independent statement of RFC 5929 §4.1: signature hash -> binding hash.
EXPECTED_BINDING_HASH = {
    "md5": "sha256",
    "sha1": "sha256",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
}
SIGNATURE_OIDS = {
    ("ec-p256", "sha1"): "1.2.840.10045.4.1",
    ("ec-p256", "sha224"): "1.2.840.10045.4.3.1",
    ("ec-p256", "sha256"): "1.2.840.10045.4.3.2",
    ("ec-p256", "sha384"): "1.2.840.10045.4.3.3",
    ("ec-p256", "sha512"): "1.2.840.10045.4.3.4",
    ("rsa2048", "md5"): "1.2.840.113549.1.1.4",
    ("rsa2048", "sha1"): "1.2.840.113549.1.1.5",
    ("rsa2048", "sha224"): "1.2.840.113549.1.1.14",
    ("rsa2048", "sha256"): "1.2.840.113549.1.1.11",
    ("rsa2048", "sha384"): "1.2.840.113549.1.1.12",
    ("rsa2048", "sha512"): "1.2.840.113549.1.1.13",
}


@pytest.fixture(scope="module")
def cas() -> dict[str, tuple[pki.PrivateKey, x509.Certificate]]:
    return {kt: pki.make_ca(f"CA {kt}", key_type=kt) for kt in ("ec-p256", "rsa2048")}


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(("ca_type", "sig_hash"), sorted(SIGNATURE_OIDS))
def test_hash_follows_signature_algorithm(cas, ca_type: str, sig_hash: str) -> None:
    ca_key, ca_cert = cas[ca_type]
    _, leaf = pki.make_leaf(
        ca_key, ca_cert, common_name="hac", dns_names=["hac.mipsec.test"], signature_hash=sig_hash
    )
    # The certificate really carries the signature algorithm under test.
    assert leaf.signature_algorithm_oid.dotted_string == SIGNATURE_OIDS[(ca_type, sig_hash)]
    der = _der(leaf)
    expected = hashlib.new(EXPECTED_BINDING_HASH[sig_hash], der).digest()
    got = tls_server_end_point(der)
    assert got == expected
    # Raw hash bytes, no "tls-server-end-point:" prefix (PROFILE §1).
    assert len(got) == hashlib.new(EXPECTED_BINDING_HASH[sig_hash]).digest_size
    check_binding_capable(leaf)


@pytest.mark.parametrize("sig_hash", ["md5", "sha1"])
def test_weak_hashes_are_not_used_directly(cas, sig_hash: str) -> None:
    ca_key, ca_cert = cas["rsa2048"]
    _, leaf = pki.make_leaf(ca_key, ca_cert, common_name="hac", signature_hash=sig_hash)
    der = _der(leaf)
    assert tls_server_end_point(der) != hashlib.new(sig_hash, der).digest()


@pytest.mark.parametrize("pss_hash", [hashes.SHA256, hashes.SHA384])
def test_rsa_pss_signature_uses_its_hash(cas, pss_hash) -> None:
    ca_key, ca_cert = cas["rsa2048"]
    _, template = pki.make_leaf(ca_key, ca_cert, common_name="hac")
    builder = (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(template.issuer)
        .public_key(template.public_key())
        .serial_number(template.serial_number)
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
    )
    cert = builder.sign(
        ca_key,
        pss_hash(),
        rsa_padding=padding.PSS(mgf=padding.MGF1(pss_hash()), salt_length=pss_hash.digest_size),
    )
    der = _der(cert)
    assert tls_server_end_point(der) == hashlib.new(pss_hash.name, der).digest()


@pytest.mark.parametrize("ca_type", ["ed25519", "ed448"])
def test_eddsa_signature_refused(ca_type: str) -> None:
    ca_key, ca_cert = pki.make_ca("EdDSA CA", key_type=ca_type)
    _, leaf = pki.make_leaf(ca_key, ca_cert, common_name="hac", dns_names=["hac.mipsec.test"])
    assert leaf.signature_hash_algorithm is None
    with pytest.raises(CertificateError, match="binding undefined"):
        tls_server_end_point(_der(leaf))
    with pytest.raises(CertificateError, match="binding undefined"):
        check_binding_capable(leaf)
    # The self-signed EdDSA CA certificate itself is refused as well.
    with pytest.raises(CertificateError):
        tls_server_end_point(_der(ca_cert))


@pytest.mark.parametrize("key_type", ["ed25519", "ed448"])
def test_eddsa_subject_key_refused_by_policy(cas, key_type: str) -> None:
    ca_key, ca_cert = cas["ec-p256"]
    _, leaf = pki.make_leaf(ca_key, ca_cert, common_name="hac", key_type=key_type)
    der = _der(leaf)
    # RFC 5929 alone defines the value (the ECDSA signature has one hash) ...
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()
    # ... but PROFILE §1 refuses EdDSA on the HAC whatever signed it.
    with pytest.raises(CertificateError, match="Ed"):
        check_binding_capable(leaf)


def test_hash_is_over_exact_octets(cas) -> None:
    ca_key, ca_cert = cas["ec-p256"]
    _, leaf = pki.make_leaf(ca_key, ca_cert, common_name="hac")
    der = _der(leaf)
    other_ca_key, other_ca_cert = cas["rsa2048"]
    _, other = pki.make_leaf(other_ca_key, other_ca_cert, common_name="hac")
    assert tls_server_end_point(der) != tls_server_end_point(_der(other))


@pytest.mark.parametrize("blob", [b"", b"\x30\x03\x02\x01\x01", b"not a certificate"])
def test_garbage_refused(blob: bytes) -> None:
    with pytest.raises(CertificateError, match="certificate"):
        tls_server_end_point(blob)
