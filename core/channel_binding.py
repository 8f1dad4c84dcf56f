"""RFC 5929 §4 ``tls-server-end-point`` channel binding (PROFILE §1, RFC 6618 §5.5.6).

``CB-octets`` is the hash of the HAC's end-entity certificate, DER octet for
octet as sent in the TLS Certificate message.  The hash is chosen from the
certificate's *signatureAlgorithm* (RFC 5929 §4.1):

* MD5 or SHA-1 -> SHA-256;
* any other single hash (SHA-224/256/384/512, ...) -> that hash;
* no single hash (Ed25519, Ed448) -> the binding is undefined: refuse.

PROFILE §1: raw hash bytes, without the ``tls-server-end-point:`` prefix.

Sans-I/O: bytes and certificate objects in, bytes out.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.x509.oid import SignatureAlgorithmOID

from mipsec.core.errors import CertificateError

__all__ = ["check_binding_capable", "tls_server_end_point", "tls_server_end_point_of"]

# RFC 5929 §4.1: these two are upgraded to SHA-256.
_WEAK_HASHES = frozenset({"md5", "sha1"})

_EDDSA_NAMES = {SignatureAlgorithmOID.ED25519: "Ed25519", SignatureAlgorithmOID.ED448: "Ed448"}


def _parse(cert_der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise CertificateError(f"certificate: not a parseable DER certificate ({exc})")


def _sig_name(cert: x509.Certificate) -> str:
    oid = cert.signature_algorithm_oid
    return _EDDSA_NAMES.get(oid, oid.dotted_string)


def _binding_hash(cert: x509.Certificate) -> hashes.HashAlgorithm:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise CertificateError(
            f"certificate signatureAlgorithm {_sig_name(cert)}: "
            "unknown hash, tls-server-end-point binding undefined (RFC 5929 §4.1)"
        )
    if algorithm is None:
        # Ed25519/Ed448 (PureEdDSA) sign without a single hash function.
        raise CertificateError(
            f"certificate signatureAlgorithm {_sig_name(cert)}: "
            "no single hash, tls-server-end-point binding undefined (RFC 5929 §4.1)"
        )
    if algorithm.name in _WEAK_HASHES:
        return hashes.SHA256()
    return algorithm


def tls_server_end_point(cert_der: bytes) -> bytes:
    """The RFC 5929 ``tls-server-end-point`` value for the DER certificate ``cert_der``.

    Raises :class:`CertificateError` when the binding is undefined for this
    certificate (signature without a single hash) or the DER does not parse.
    """
    return tls_server_end_point_of(_parse(cert_der), cert_der)


def tls_server_end_point_of(cert: x509.Certificate, cert_der: bytes) -> bytes:
    """:func:`tls_server_end_point` for an already parsed ``cert`` whose DER is ``cert_der``."""
    algorithm = _binding_hash(cert)
    digest = hashes.Hash(algorithm)
    # Hash the octets exactly as received, never a re-encoding (RFC 5929 §4.1).
    digest.update(cert_der)
    return digest.finalize()


def check_binding_capable(cert: x509.Certificate) -> None:
    """Refuse a certificate that cannot anchor the channel binding (PROFILE §1).

    Stricter than RFC 5929 alone: an Ed25519/Ed448 *subject key* is refused as
    well as an Ed25519/Ed448 *signature*, so one rule ("no EdDSA on the HAC")
    holds whatever CA issued the certificate and a re-issue by an EdDSA CA
    cannot silently break the binding.
    """
    public_key = cert.public_key()
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        kind = "Ed25519" if isinstance(public_key, ed25519.Ed25519PublicKey) else "Ed448"
        raise CertificateError(
            f"certificate subject key: {kind}, tls-server-end-point binding undefined "
            "for EdDSA (PROFILE §1)"
        )
    _binding_hash(cert)
