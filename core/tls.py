"""TLS contexts for the MN-HAC channel and the MN's check of the HAC identity.

PROFILE §1 (RFC 6618 §5.1, §9.2):

* TLS 1.2 floor; TLS 1.3 when both ends allow it (deliberate extension),
  ``strict_rfc6618`` pins TLS 1.2; ECDHE + AEAD suites only.
* The HAC refuses renegotiation (``OP_NO_RENEGOTIATION``) and serves exactly one
  certificate chain, whose leaf anchors the ``tls-server-end-point`` binding.
* The MN verifies the chain to the configured CA only, then checks the HAC's
  subjectAltName by hand: the stdlib accepts wildcards, falls back to the CN and
  does not tie an IP SAN to the connected address (DESIGN.md "Library traps").

This module only builds contexts and checks certificates; it opens no socket.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import socket
import ssl
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from mipsec.core.channel_binding import (
    check_binding_capable,
    tls_server_end_point,
    tls_server_end_point_of,
)
from mipsec.core.errors import CertificateError, LocalProtocolError
from mipsec.core.filedigest import read_regular, regular_path

__all__ = [
    "TLS12_CIPHERS",
    "check_hac_certificate",
    "check_server_name",
    "hac_peer_binding",
    "hac_server_context",
    "load_matching_key",
    "load_server_chain",
    "mn_cb_octets",
    "mn_client_context",
    "server_cb_octets",
    "set_nodelay",
]

# PROFILE §1: only ECDHE key exchange with AEAD ciphers for TLS 1.2.  TLS 1.3
# suites are all AEAD with (EC)DHE and are configured separately by OpenSSL.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

StrPath = str | os.PathLike[str]


# --- shared policy ----------------------------------------------------------


def _apply_policy(ctx: ssl.SSLContext, strict_rfc6618: bool) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # RFC 6618 predates TLS 1.3; strict mode keeps to what it specifies.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if strict_rfc6618 else ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    _check_cipher_policy(ctx)
    # OP_NO_RENEGOTIATION: PROFILE §1 (the HAC refuses; the MN never asks).
    # OP_NO_COMPRESSION: CRIME-style leaks.  OP_NO_TICKET / num_tickets = 0 (set
    # by the server): one exchange per connection, resumption buys nothing.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET


def _check_cipher_policy(ctx: ssl.SSLContext) -> None:
    # set_ciphers() takes a selection *expression*; an OpenSSL that parses it
    # differently must not silently widen the policy, so re-check the result.
    suites = ctx.get_ciphers()
    bad = [
        s["name"]
        for s in suites
        if not s.get("aead") or (s["protocol"] == "TLSv1.2" and s.get("kea") != "kx-ecdhe")
    ]
    if bad:
        raise LocalProtocolError(f"cipher policy: non ECDHE/AEAD suites enabled: {bad}")
    if not any(s["protocol"] == "TLSv1.2" for s in suites):
        raise LocalProtocolError("cipher policy: no TLS 1.2 ECDHE/AEAD suite available")


# --- HAC side ---------------------------------------------------------------


def load_server_chain(cert_file: StrPath) -> list[x509.Certificate]:
    """The PEM chain in ``cert_file``, leaf first, each certificate issued by the next.

    The order matters: OpenSSL sends the file's certificates in file order and the
    first one is what RFC 5929 hashes, so a mis-ordered file is refused.
    """
    try:
        data = read_regular(cert_file)  # a FIFO: refused, not waited on
    except OSError as exc:
        raise CertificateError(f"{os.fspath(cert_file)}: cannot read ({exc.strerror})")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{os.fspath(cert_file)}: no PEM certificate found")
    for i, (child, parent) in enumerate(itertools.pairwise(chain)):
        try:
            child.verify_directly_issued_by(parent)
        except Exception:
            raise CertificateError(
                f"{os.fspath(cert_file)}: certificate #{i + 2} did not issue certificate "
                f"#{i + 1}; the file must hold one chain, leaf first"
            )
    return chain


def server_cb_octets(cert_file: StrPath) -> bytes:
    """The ``CB-octets`` the HAC uses: ``tls-server-end-point`` of its leaf certificate."""
    leaf = load_server_chain(cert_file)[0]
    try:
        check_binding_capable(leaf)
        return tls_server_end_point(leaf.public_bytes(serialization.Encoding.DER))
    except CertificateError as exc:
        raise CertificateError(f"{os.fspath(cert_file)}: {exc}")


def load_matching_key(
    cert_file: StrPath, key_file: StrPath, leaf: x509.Certificate
) -> PrivateKeyTypes:
    """The unencrypted PEM private key in ``key_file``, checked to match ``leaf``.

    Errors (:class:`CertificateError`) name the file and never quote the key.
    """
    try:
        key_pem = read_regular(key_file)
    except OSError as exc:
        raise CertificateError(f"{os.fspath(key_file)}: cannot read ({exc.strerror})")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # Never echo the parse error: it could quote key material.
        raise CertificateError(f"{os.fspath(key_file)}: not an unencrypted PEM private key")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise CertificateError(
            f"{os.fspath(cert_file)}: leaf certificate does not match the private key "
            f"in {os.fspath(key_file)}"
        )
    return key


def hac_server_context(
    cert_file: StrPath,
    key_file: StrPath,
    *,
    strict_rfc6618: bool = False,
    client_ca_file: StrPath | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """The HAC's server context (PROFILE §1).

    Loads exactly one chain.  Refuses (:class:`CertificateError` naming the file)
    a leaf whose channel binding is undefined (Ed25519/Ed448), a mis-ordered
    chain, or a key that does not match the leaf.  Client certificates are a
    deployment choice, never required by the protocol: ``client_ca_file`` asks
    for one (verified if sent), ``require_client_cert`` also demands it.
    """
    chain = load_server_chain(cert_file)
    try:
        check_binding_capable(chain[0])
    except CertificateError as exc:
        raise CertificateError(f"{os.fspath(cert_file)}: {exc}")
    load_matching_key(cert_file, key_file, chain[0])

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx, strict_rfc6618)
    ctx.num_tickets = 0
    try:
        with regular_path(cert_file) as cert, regular_path(key_file) as key:
            ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"{os.fspath(cert_file)}: OpenSSL refused the chain ({exc})")

    if require_client_cert and client_ca_file is None:
        raise LocalProtocolError("require_client_cert needs client_ca_file")
    if client_ca_file is not None:
        try:
            ctx.load_verify_locations(cadata=_ca_text(client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise CertificateError(f"{os.fspath(client_ca_file)}: cannot load CA ({exc})")
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _ca_text(ca_file: StrPath) -> str:
    """A PEM CA bundle's text, read here (``read_regular``: a FIFO is refused,
    not waited on) and handed to OpenSSL from memory, so nothing swapped in
    after the check is opened.  ``ssl.SSLError`` for text that is not PEM."""
    data = read_regular(ca_file)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ssl.SSLError("not PEM text") from None


# --- MN side ----------------------------------------------------------------


def mn_client_context(
    ca_file: StrPath,
    *,
    strict_rfc6618: bool = False,
    client_cert: StrPath | None = None,
    client_key: StrPath | None = None,
) -> ssl.SSLContext:
    """The MN's client context (PROFILE §1).

    Trusts only ``ca_file`` (system roots are never loaded), requires a verified
    chain and keeps the stdlib hostname check on without its CN fallback.  Wrap
    with ``server_hostname`` = the configured HAC name or IP literal, then call
    :func:`hac_peer_binding` (or :func:`check_hac_certificate`), which is the
    check PROFILE §1 actually relies on.
    """
    # PROTOCOL_TLS_CLIENT: CERT_REQUIRED + check_hostname, and unlike
    # create_default_context() it loads no system CA.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_policy(ctx, strict_rfc6618)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.hostname_checks_common_name = False
    try:
        ctx.load_verify_locations(cadata=_ca_text(ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"{os.fspath(ca_file)}: cannot load CA ({exc})")
    if (client_cert is None) != (client_key is None):
        raise LocalProtocolError("client_cert and client_key go together")
    if client_cert is not None and client_key is not None:
        try:
            with regular_path(client_cert) as cert, regular_path(client_key) as key:
                ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise CertificateError(f"{os.fspath(client_cert)}: cannot load ({exc})")
    return ctx


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=64)
def _server_name_ip(server_name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # The configured name, the same on every bootstrap: ip_address() fails
    # by raising (twice) for a host name, so remember the answer.
    return _ip_or_none(server_name)


def _normalise_dns(name: str) -> str:
    if name.endswith("."):
        name = name[:-1]
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        # A U-label name is compared in its A-label form, as SANs carry it.
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise CertificateError(f"server_name {name!r}: not a valid host name")
    return name.lower()


class _Leaf:
    """What the checks need from one HAC certificate, independent of the connection.

    A function of the DER octets alone, so it is kept per DER (:func:`_leaf`):
    an MN bootstraps against the same HAC certificate again and again, and
    parsing it (and its key) was the largest share of the MN's own CPU per
    bootstrap.  Only certificates that parse and can anchor the binding are
    kept; the SAN facts are worked out on first use, a refusal kept as its
    message and raised anew each time.
    """

    __slots__ = ("_san", "cb_octets", "cert")

    def __init__(self, cert: x509.Certificate, cb_octets: bytes) -> None:
        self.cert = cert
        self.cb_octets = cb_octets
        self._san: _SanFacts | str | None = None

    def san(self) -> _SanFacts:
        facts = self._san
        if facts is None:
            facts = self._san = _san_facts(self.cert)
        if isinstance(facts, str):
            raise CertificateError(facts)
        return facts


class _SanFacts:
    __slots__ = ("dns_names", "ips", "names")

    def __init__(
        self,
        dns_names: list[str],
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address | None],
    ) -> None:
        self.dns_names = dns_names  # as in the certificate, for error messages
        # _normalise_dns() of an ASCII name cannot fail: compare against these.
        self.names = frozenset(_normalise_dns(n) for n in dns_names if n.isascii())
        self.ips = ips


def _san_facts(cert: x509.Certificate, who: str = "HAC certificate") -> _SanFacts | str:
    """The SAN facts, or the message of the CertificateError that refuses them.

    ``who`` names the certificate in that message.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"{who}: no subjectAltName extension (the CN is never used, PROFILE §1)"
    except ValueError as exc:
        return f"{who}: malformed extensions ({exc})"
    dns_names = san.get_values_for_type(x509.DNSName)
    wildcards = [n for n in dns_names if "*" in n]
    if wildcards:
        return f"{who}: wildcard dNSName {wildcards[0]!r} refused (PROFILE §1)"
    ips = [
        _ip_or_none(str(a))
        for a in san.get_values_for_type(x509.IPAddress)
        if isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address)
    ]
    return _SanFacts(dns_names, ips)


_LEAF_CACHE_MAX = 16  # distinct HAC certificates an MN sees: a handful
_leaf_cache: dict[bytes, _Leaf] = {}


def _leaf(peer_cert_der: bytes) -> _Leaf:
    """Parse ``peer_cert_der`` and check it can anchor the binding (PROFILE §1), once per DER."""
    der = bytes(peer_cert_der)
    leaf = _leaf_cache.get(der)
    if leaf is not None:
        return leaf
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise CertificateError("HAC certificate: not a parseable DER certificate")
    check_binding_capable(cert)
    leaf = _Leaf(cert, tls_server_end_point_of(cert, der))
    if len(_leaf_cache) >= _LEAF_CACHE_MAX:
        _leaf_cache.clear()
    _leaf_cache[der] = leaf
    return leaf


def check_hac_certificate(
    peer_cert_der: bytes,
    *,
    server_name: str | None,
    connected_ip: str | None,
) -> None:
    """PROFILE §1 identity rules for the HAC certificate, checked by hand.

    Run after a verified handshake.  ``server_name`` is the configured HAC name
    (or IP literal); ``connected_ip`` the address actually connected to.  By
    name: a dNSName equals ``server_name`` (case-insensitive, one trailing dot
    ignored).  By address (``server_name`` None or an IP literal): an iPAddress
    SAN equals the address.  Always: a SAN extension exists, no dNSName holds
    "*", the binding is defined (no EdDSA).  The CN is never looked at.
    """
    san = _leaf(peer_cert_der).san()

    name_ip = _server_name_ip(server_name) if server_name is not None else None
    if server_name is not None and name_ip is None:
        _check_dns_name(san, server_name, "HAC certificate")
        return

    # Connecting by IP address: every address we know of must be a SAN.
    wanted_ips = []
    if name_ip is not None:
        wanted_ips.append(name_ip)
    if connected_ip is not None:
        ip = _ip_or_none(connected_ip)
        if ip is None:
            raise LocalProtocolError(f"connected_ip {connected_ip!r}: not an IP address")
        wanted_ips.append(ip)
    if not wanted_ips:
        raise LocalProtocolError("check_hac_certificate needs server_name or connected_ip")
    for ip in wanted_ips:
        if ip not in san.ips:
            raise CertificateError(
                f"HAC certificate: no iPAddress SAN equals {ip} (has {[str(a) for a in san.ips]})"
            )


def _check_dns_name(san: _SanFacts, server_name: str, who: str) -> None:
    if _normalise_dns(server_name) not in san.names:
        raise CertificateError(f"{who}: no dNSName equals {server_name!r} (has {san.dns_names})")


def check_server_name(
    cert: x509.Certificate, server_name: str, *, who: str = "server certificate"
) -> None:
    """PROFILE §1's SAN-only name rules for any server certificate checked by name.

    A subjectAltName extension exists, no dNSName holds "*", and one dNSName
    equals ``server_name`` (case-insensitive, one trailing dot ignored); the CN
    is never looked at.  Unlike :func:`check_hac_certificate` it asks nothing
    of the signature (no channel binding rides on it): the EAP-TLS peer checks
    the EAP server certificate with it.  ``who`` names the certificate in the
    :class:`CertificateError`.
    """
    facts = _san_facts(cert, who)
    if isinstance(facts, str):
        raise CertificateError(facts)
    _check_dns_name(facts, server_name, who)


def mn_cb_octets(peer_cert_der: bytes) -> bytes:
    """The MN's ``CB-octets``: ``tls-server-end-point`` of the HAC leaf (PROFILE §1).

    Refuses an EdDSA certificate.  Call it after :func:`check_hac_certificate`
    (or use :func:`hac_peer_binding`, which does both).
    """
    return _leaf(peer_cert_der).cb_octets


def hac_peer_binding(
    tls: ssl.SSLObject | ssl.SSLSocket,
    *,
    server_name: str | None,
    connected_ip: str | None,
) -> bytes:
    """Check the HAC identity on an established connection and return ``CB-octets``.

    ``tls`` is the ``ssl.SSLSocket`` or the asyncio ``ssl_object``.  Our own SAN
    check runs whatever the stdlib already checked (PROFILE §1).
    """
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise CertificateError("HAC certificate: the server sent no certificate")
    check_hac_certificate(der, server_name=server_name, connected_ip=connected_ip)
    return mn_cb_octets(der)


# --- sockets ----------------------------------------------------------------


class _SockOpts(Protocol):
    @property
    def family(self) -> int: ...

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


def set_nodelay(sock: _SockOpts) -> None:
    """Turn Nagle off on a TCP socket (both ends of MN-HAC).

    The exchange is small lockstep messages; with Nagle plus delayed ACKs each
    one can stall about 40 ms (DESIGN.md "Library traps").  Accepts a socket,
    an ``ssl.SSLSocket`` or asyncio's ``transport.get_extra_info("socket")``;
    does nothing for non-IP sockets (AF_UNIX in tests).
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
