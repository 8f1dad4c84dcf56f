"""Test/lab PKI for mipsec: a CA, the HAC's TLS certificate, the HA's certificates.

Used by ``mipsec init`` and by the tests.  This is a *lab* PKI: keys are written
unencrypted (PKCS#8 PEM, mode 0o600) so the daemons can start unattended; a
production deployment brings certificates from its own CA.

The HAC certificate follows PROFILE §1: ECDSA P-256, signed with SHA-256 (so the
RFC 5929 ``tls-server-end-point`` binding is SHA-256 and well defined), with a
dNSName and an iPAddress subjectAltName and no wildcard.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mipsec.core.fsutil import PRIVATE_DIR, PRIVATE_FILE, PUBLIC_FILE, make_dir, write_file

__all__ = [
    "KEY_TYPES",
    "SIGNATURE_HASHES",
    "PkiPaths",
    "init_pki",
    "make_ca",
    "make_leaf",
    "make_private_key",
    "pki_paths",
    "write_cert",
    "write_key",
    "write_pem",
]

PrivateKey = CertificateIssuerPrivateKeyTypes

KEY_TYPES = ("ec-p256", "ec-p384", "rsa2048", "ed25519", "ed448")

# Hashes cryptography's CertificateBuilder signs with.  sha224 exists only so
# tests can exercise every branch of the RFC 5929 §4.1 hash selection.
_ModernHash = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512
_MODERN_HASHES: dict[str, type[_ModernHash]] = {
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

# Legacy hashes cryptography no longer signs certificates with.  They exist
# only so tests can check that RFC 5929 §4.1 upgrades MD5/SHA-1 to SHA-256;
# the certificate is re-signed by hand (see _resign_legacy).  md5 needs an RSA CA
# (there is no ECDSA-with-MD5 algorithm identifier).
_LEGACY_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "md5": hashes.MD5,
    "sha1": hashes.SHA1,
}

SIGNATURE_HASHES = (*_MODERN_HASHES, *_LEGACY_HASHES)

# Tolerate small clock differences between the machine that issues and the
# machines that verify.
_BACKDATE = datetime.timedelta(minutes=5)


def make_private_key(key_type: str) -> PrivateKey:
    """A fresh private key of ``key_type`` (one of :data:`KEY_TYPES`)."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "ed448":
        return ed448.Ed448PrivateKey.generate()
    raise ValueError(f"key_type: unknown {key_type!r}, expected one of {', '.join(KEY_TYPES)}")


def _is_eddsa(key: PrivateKey) -> bool:
    return isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)


def _signing_hash(key: PrivateKey, signature_hash: str) -> _ModernHash | None:
    # Ed25519/Ed448 sign the message itself (no separate hash): cryptography
    # requires algorithm=None for them.
    if _is_eddsa(key):
        return None
    if signature_hash in _LEGACY_HASHES:
        # Placeholder; _sign replaces the signature afterwards.
        return hashes.SHA256()
    try:
        return _MODERN_HASHES[signature_hash]()
    except KeyError:
        raise ValueError(
            f"signature_hash: unknown {signature_hash!r}, "
            f"expected one of {', '.join(SIGNATURE_HASHES)}"
        )


# --- legacy re-signing (tests only) ------------------------------------------

# DER AlgorithmIdentifier values (RFC 3279 §2.2.1, §2.2.3): RSA ones carry NULL
# parameters, ECDSA ones carry none.
_LEGACY_ALG_IDS: dict[tuple[str, str], bytes] = {
    # md5WithRSAEncryption 1.2.840.113549.1.1.4
    ("rsa", "md5"): bytes.fromhex("300d06092a864886f70d0101040500"),
    # sha1WithRSAEncryption 1.2.840.113549.1.1.5
    ("rsa", "sha1"): bytes.fromhex("300d06092a864886f70d0101050500"),
    # ecdsa-with-SHA1 1.2.840.10045.4.1
    ("ec", "sha1"): bytes.fromhex("300906072a8648ce3d0401"),
}


def _der_tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_split(data: bytes) -> list[bytes]:
    """Split concatenated DER TLVs (definite lengths only, as DER requires)."""
    items = []
    pos = 0
    while pos < len(data):
        start = pos
        first = data[pos + 1]
        pos += 2
        if first & 0x80:
            count = first & 0x7F
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        else:
            length = first
        pos += length
        items.append(data[start:pos])
    return items


def _der_content(tlv: bytes) -> bytes:
    first = tlv[1]
    header = 2 + (first & 0x7F if first & 0x80 else 0)
    return tlv[header:]


def _resign_legacy(cert: x509.Certificate, ca_key: PrivateKey, name: str) -> x509.Certificate:
    algorithm = _LEGACY_HASHES[name]()
    if isinstance(ca_key, rsa.RSAPrivateKey):
        family = "rsa"
    elif isinstance(ca_key, ec.EllipticCurvePrivateKey):
        family = "ec"
    else:
        raise ValueError(f"signature_hash: {name} needs an RSA or ECDSA CA key")
    try:
        alg_id = _LEGACY_ALG_IDS[(family, name)]
    except KeyError:
        raise ValueError(f"signature_hash: {name} is not defined for an {family} CA key")
    # TBSCertificate ::= SEQUENCE { [0] version, serialNumber, signature, ... }
    # (RFC 5280 §4.1): swap its inner signature AlgorithmIdentifier.
    fields = _der_split(_der_content(cert.tbs_certificate_bytes))
    fields[2 if fields[0][0] == 0xA0 else 1] = alg_id
    tbs = _der_tlv(0x30, b"".join(fields))
    if isinstance(ca_key, rsa.RSAPrivateKey):
        signature = ca_key.sign(tbs, padding.PKCS1v15(), algorithm)
    else:
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        signature = ca_key.sign(tbs, ec.ECDSA(algorithm))
    der = _der_tlv(0x30, tbs + alg_id + _der_tlv(0x03, b"\x00" + signature))
    return x509.load_der_x509_certificate(der)


def _sign(
    builder: x509.CertificateBuilder, ca_key: PrivateKey, signature_hash: str
) -> x509.Certificate:
    cert = builder.sign(ca_key, _signing_hash(ca_key, signature_hash))
    if signature_hash in _LEGACY_HASHES and not _is_eddsa(ca_key):
        cert = _resign_legacy(cert, ca_key, signature_hash)
    return cert


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days <= 0:
        raise ValueError("days: must be positive")
    now = datetime.datetime.now(datetime.UTC)
    return now - _BACKDATE, now + datetime.timedelta(days=days)


def make_ca(
    common_name: str = "mipsec test CA",
    days: int = 3650,
    *,
    key_type: str = "ec-p256",
    signature_hash: str = "sha256",
) -> tuple[PrivateKey, x509.Certificate]:
    """A self-signed CA key and certificate.

    ``key_type="ed25519"``/``"ed448"`` gives a CA whose signatures carry no single
    hash: certificates it issues have an undefined ``tls-server-end-point``
    binding (RFC 5929 §4.1), which the tests use to check the refusal.
    """
    key = make_private_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, _sign(builder, key, signature_hash)


def make_leaf(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    *,
    common_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    email_addresses: Sequence[str] = (),
    key_type: str = "ec-p256",
    days: int = 825,
    client: bool = False,
    server: bool = True,
    include_san: bool = True,
    signature_hash: str = "sha256",
    validity: tuple[datetime.datetime, datetime.datetime] | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """An end-entity key and certificate issued by ``ca_key``/``ca_cert``.

    ``include_san=False`` (or no names at all) gives a CN-only certificate, which
    the MN must refuse (PROFILE §1); ``dns_names`` may hold a wildcard on purpose
    for the same reason.  ``email_addresses`` become rfc822Name SANs: an MN's
    EAP-TLS client certificate carries its NAI there (``mn_id``, the default
    ``rfc822name`` identity policy).  ``validity`` (not before, not after; aware
    datetimes) replaces ``days``, so tests can issue expired certificates.
    ``signature_hash`` is ignored when the CA key is Ed25519/Ed448, whose
    signatures have no separate hash.
    """
    if not (client or server):
        raise ValueError("client/server: a leaf certificate needs at least one purpose")
    key = make_private_key(key_type)
    public_key = key.public_key()
    if validity is None:
        not_before, not_after = _validity(days)
    else:
        not_before, not_after = validity
        if not_after <= not_before:
            raise ValueError("validity: not after must be later than not before")
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    purposes = []
    if server:
        purposes.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        purposes.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key transport is not offered (ECDHE only), but the bit is
                # conventional on RSA TLS certificates and harmless.
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    general_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    general_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    general_names += [x509.RFC822Name(e) for e in email_addresses]
    if include_san and general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    return key, _sign(builder, ca_key, signature_hash)


# --- files -----------------------------------------------------------------


def write_cert(path: str | os.PathLike[str], *certs: x509.Certificate) -> None:
    """Write ``certs`` as one PEM file, in the order given (leaf first for a chain)."""
    if not certs:
        raise ValueError("certs: at least one certificate is needed")
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    write_file(Path(path), data, PUBLIC_FILE)


def write_key(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, file mode 0o600."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(Path(path), data, PRIVATE_FILE)


def write_pem(path: str | os.PathLike[str], *items: x509.Certificate | PrivateKey) -> None:
    """Write certificates and/or private keys to one PEM file.

    A file holding any private key gets mode 0o600.
    """
    if not items:
        raise ValueError("items: nothing to write")
    parts: list[bytes] = []
    secret = False
    for item in items:
        if isinstance(item, x509.Certificate):
            parts.append(item.public_bytes(serialization.Encoding.PEM))
        else:
            secret = True
            parts.append(
                item.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    write_file(Path(path), b"".join(parts), PRIVATE_FILE if secret else PUBLIC_FILE)


@dataclass(frozen=True)
class PkiPaths:
    """Where :func:`init_pki` wrote each file."""

    ca_cert: Path
    ca_key: Path
    hac_cert: Path
    hac_key: Path
    ha_cert: Path
    ha_key: Path
    # The HAC's client certificate for mutual TLS towards the HA (PROFILE §9).
    hac_client_cert: Path
    hac_client_key: Path
    # A second HA with its own identity (deployment model 3: two HAs must
    # never share a certificate, or each could pull the other's SAs).
    ha2_cert: Path
    ha2_key: Path
    # EAP-TLS (issue 7): the demo MN's client certificate (rfc822Name SAN =
    # its mn_id) and the HAC's EAP server certificate (dNSName eap.mipsec.test),
    # separate from the MHAuth TLS certificate.
    mn_cert: Path
    mn_key: Path
    eap_cert: Path
    eap_key: Path


def pki_paths(directory: Path) -> PkiPaths:
    """The files :func:`init_pki` writes in ``directory``."""
    return PkiPaths(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        hac_cert=directory / "hac.pem",
        hac_key=directory / "hac.key",
        ha_cert=directory / "ha.pem",
        ha_key=directory / "ha.key",
        hac_client_cert=directory / "hac-client.pem",
        hac_client_key=directory / "hac-client.key",
        ha2_cert=directory / "ha2.pem",
        ha2_key=directory / "ha2.key",
        mn_cert=directory / "mn.pem",
        mn_key=directory / "mn.key",
        eap_cert=directory / "eap.pem",
        eap_key=directory / "eap.key",
    )


def init_pki(
    directory: Path,
    *,
    hac_names: Sequence[str] = ("hac.mipsec.test",),
    hac_ips: Sequence[str] = ("127.0.0.1",),
    ha_names: Sequence[str] = ("ha.mipsec.test",),
    ha_ips: Sequence[str] = ("127.0.0.1",),
    mn_id: str = "demo@mipsec.test",
    eap_names: Sequence[str] = ("eap.mipsec.test",),
    overwrite: bool = False,
) -> PkiPaths:
    """Create a lab CA and the HAC/HA certificates in ``directory``.

    Refuses (``FileExistsError``) to replace existing files unless ``overwrite``:
    silently re-keying a CA would invalidate every certificate already handed out.
    """
    directory = Path(directory)
    paths = pki_paths(directory)
    if not overwrite:
        for p in vars(paths).values():
            if p.exists():
                raise FileExistsError(f"{p}: already exists (pass overwrite=True to replace)")
    make_dir(directory, PRIVATE_DIR)  # it holds the private keys

    # A per-installation suffix keeps two lab CAs apart in a trust store.
    ca_key, ca_cert = make_ca(f"mipsec test CA {secrets.token_hex(4)}")
    hac_key, hac_cert = make_leaf(
        ca_key,
        ca_cert,
        common_name=hac_names[0] if hac_names else "mipsec HAC",
        dns_names=hac_names,
        ip_addresses=hac_ips,
        key_type="ec-p256",
    )
    ha_key, ha_cert = make_leaf(
        ca_key,
        ca_cert,
        common_name=ha_names[0] if ha_names else "mipsec HA",
        dns_names=ha_names,
        ip_addresses=ha_ips,
        key_type="ec-p256",
        # The HA also authenticates as a TLS client when it pulls an unknown SPI
        # from the HAC (PROFILE §9).
        client=True,
    )
    client_key, client_cert = make_leaf(
        ca_key,
        ca_cert,
        common_name=hac_names[0] if hac_names else "mipsec HAC",
        dns_names=hac_names,
        key_type="ec-p256",
        client=True,
        server=False,
    )
    write_cert(paths.ca_cert, ca_cert)
    write_key(paths.ca_key, ca_key)
    write_cert(paths.hac_cert, hac_cert)
    write_key(paths.hac_key, hac_key)
    write_cert(paths.ha_cert, ha_cert)
    write_key(paths.ha_key, ha_key)
    ha2_key, ha2_cert = make_leaf(
        ca_key,
        ca_cert,
        common_name="ha2.mipsec.test",
        dns_names=("ha2.mipsec.test",),
        ip_addresses=("127.0.0.2",),
        key_type="ec-p256",
        client=True,
    )
    write_cert(paths.hac_client_cert, client_cert)
    write_key(paths.hac_client_key, client_key)
    write_cert(paths.ha2_cert, ha2_cert)
    write_key(paths.ha2_key, ha2_key)
    mn_key, mn_cert = make_leaf(
        ca_key,
        ca_cert,
        common_name=mn_id,
        email_addresses=(mn_id,),
        key_type="ec-p256",
        client=True,
        server=False,
    )
    eap_key, eap_cert = make_leaf(
        ca_key,
        ca_cert,
        common_name=eap_names[0] if eap_names else "mipsec EAP server",
        dns_names=eap_names,
        key_type="ec-p256",
    )
    write_cert(paths.mn_cert, mn_cert)
    write_key(paths.mn_key, mn_key)
    write_cert(paths.eap_cert, eap_cert)
    write_key(paths.eap_key, eap_key)
    return paths
