"""Binding an EAP-TLS client certificate to the MHAuth ``mn-id`` (issue 7, PROFILE §4 item 8).

RFC 5216 §2.2 warns that the EAP Identity is unauthenticated; the identity
that counts is the one the TLS client certificate proves.  The HAC binds the
SA to ``mn-id``, so the certificate must name that identity.  How is a policy
question, answered by a named *identity policy* (hook
``mipsec_eap_tls_identity_policies``); ``[methods.eap.tls] identity_policy``
selects one.

The built-in ``rfc822name`` policy wants an rfc822Name subjectAltName equal
to the NAI (RFC 7542): the user part exactly, the realm case-insensitively
(DNS names are case-insensitive; user names are not).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography import x509

__all__ = ["DEFAULT_POLICY", "EapTlsIdentityPolicy", "Rfc822NamePolicy", "builtin_policies"]

DEFAULT_POLICY = "rfc822name"


@runtime_checkable
class EapTlsIdentityPolicy(Protocol):
    """What ``mipsec_eap_tls_identity_policies`` returns.

    ``check`` runs on the HAC for the verified MN leaf certificate, during
    the TLS handshake (so a refusal becomes a TLS alert and EAP-Failure);
    it returns None when ``cert`` proves ``mn_id``, else a short reason for
    the log (no secrets).  It must not raise and must not block.
    """

    name: str

    def check(self, cert: x509.Certificate, mn_id: str) -> str | None: ...


def _split_nai(nai: str) -> tuple[str, str | None]:
    # RFC 7542 §2.2: the realm follows the last "@"; a NAI may lack a realm.
    user, at, realm = nai.rpartition("@")
    return (user, realm) if at else (nai, None)


def nai_equal(a: str, b: str) -> bool:
    """Same NAI: user part exact, realm case-insensitive (RFC 7542 §2.4)."""
    user_a, realm_a = _split_nai(a)
    user_b, realm_b = _split_nai(b)
    if user_a != user_b or (realm_a is None) != (realm_b is None):
        return False
    return realm_a is None or realm_a.lower() == (realm_b or "").lower()


class Rfc822NamePolicy:
    """An rfc822Name SAN of the MN certificate equals ``mn_id`` (realm case-insensitive)."""

    name = DEFAULT_POLICY

    def check(self, cert: x509.Certificate, mn_id: str) -> str | None:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return "MN certificate has no subjectAltName (an rfc822Name must name the mn-id)"
        except ValueError:
            return "MN certificate: malformed extensions"
        emails = san.get_values_for_type(x509.RFC822Name)
        if not emails:
            return "MN certificate has no rfc822Name subjectAltName"
        if any(nai_equal(e, mn_id) for e in emails):
            return None
        return f"no rfc822Name of the MN certificate equals mn-id {mn_id!r} (has {emails})"


def builtin_policies() -> dict[str, EapTlsIdentityPolicy]:
    """The policies that exist without a plugin manager (tests, embedded use)."""
    policy = Rfc822NamePolicy()
    return {policy.name: policy}
