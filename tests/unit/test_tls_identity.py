"""PROFILE §1 server identity rules, checked by hand (core/tls.py)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mipsec.core import pki
from mipsec.core.errors import CertificateError, LocalProtocolError
from mipsec.core.tls import check_hac_certificate, check_server_name, mn_cb_octets


@pytest.fixture(scope="module")
def ca():
    return pki.make_ca()


def leaf_der(ca, **kw) -> bytes:
    kw.setdefault("common_name", "hac.mipsec.test")
    _, cert = pki.make_leaf(ca[0], ca[1], **kw)
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "server_name",
    ["hac.mipsec.test", "HAC.Mipsec.TEST", "hac.mipsec.test."],
)
def test_dns_name_exact_case_insensitive(ca, server_name: str) -> None:
    der = leaf_der(ca, dns_names=["hac.mipsec.test"])
    check_hac_certificate(der, server_name=server_name, connected_ip="192.0.2.1")


def test_dns_name_in_certificate_upper_case(ca) -> None:
    der = leaf_der(ca, dns_names=["other.test", "HAC.MIPSEC.TEST."])
    check_hac_certificate(der, server_name="hac.mipsec.test", connected_ip=None)


@pytest.mark.parametrize(
    "server_name",
    ["ac.mipsec.test", "xhac.mipsec.test", "hac.mipsec", "www.hac.mipsec.test", "mipsec.test"],
)
def test_dns_name_no_partial_match(ca, server_name: str) -> None:
    der = leaf_der(ca, dns_names=["hac.mipsec.test"])
    with pytest.raises(CertificateError, match="no dNSName equals"):
        check_hac_certificate(der, server_name=server_name, connected_ip=None)


@pytest.mark.parametrize(
    "names",
    [
        ["*.mipsec.test"],
        ["*.mipsec.test", "hac.mipsec.test"],  # even when another name matches
        ["hac.mipsec.test", "h*c.mipsec.test"],
        ["hac.mipsec.test", "*"],
    ],
)
def test_wildcard_anywhere_refused(ca, names: list[str]) -> None:
    der = leaf_der(ca, dns_names=names, ip_addresses=["127.0.0.1"])
    with pytest.raises(CertificateError, match="wildcard"):
        check_hac_certificate(der, server_name="hac.mipsec.test", connected_ip="127.0.0.1")
    with pytest.raises(CertificateError, match="wildcard"):
        check_hac_certificate(der, server_name="127.0.0.1", connected_ip="127.0.0.1")


def test_cn_never_used(ca) -> None:
    der = leaf_der(ca, common_name="hac.mipsec.test", include_san=False)
    with pytest.raises(CertificateError, match="no subjectAltName"):
        check_hac_certificate(der, server_name="hac.mipsec.test", connected_ip=None)
    # A SAN with other names: the CN still does not count.
    der = leaf_der(ca, common_name="hac.mipsec.test", dns_names=["other.mipsec.test"])
    with pytest.raises(CertificateError, match="no dNSName equals"):
        check_hac_certificate(der, server_name="hac.mipsec.test", connected_ip=None)


def test_by_ip_address(ca) -> None:
    der = leaf_der(ca, dns_names=["hac.mipsec.test"], ip_addresses=["127.0.0.1", "2001:db8::7"])
    check_hac_certificate(der, server_name=None, connected_ip="127.0.0.1")
    check_hac_certificate(der, server_name="127.0.0.1", connected_ip="127.0.0.1")
    check_hac_certificate(der, server_name="127.0.0.1", connected_ip=None)
    check_hac_certificate(der, server_name=None, connected_ip="2001:db8:0::7")
    # A dual-stack socket reports the IPv4 peer as an IPv4-mapped address.
    check_hac_certificate(der, server_name=None, connected_ip="::ffff:127.0.0.1")
    for bad in ("127.0.0.2", "2001:db8::8", "::1"):
        with pytest.raises(CertificateError, match="iPAddress"):
            check_hac_certificate(der, server_name=None, connected_ip=bad)
    # The configured literal and the connected address must both be SANs.
    with pytest.raises(CertificateError, match="127.0.0.2"):
        check_hac_certificate(der, server_name="127.0.0.1", connected_ip="127.0.0.2")


def test_by_ip_needs_ip_san_not_dns(ca) -> None:
    der = leaf_der(ca, dns_names=["127.0.0.1", "hac.mipsec.test"])
    with pytest.raises(CertificateError, match="iPAddress"):
        check_hac_certificate(der, server_name="127.0.0.1", connected_ip="127.0.0.1")


def test_by_name_ignores_ip_san(ca) -> None:
    der = leaf_der(ca, dns_names=["other.test"], ip_addresses=["127.0.0.1"])
    with pytest.raises(CertificateError, match="dNSName"):
        check_hac_certificate(der, server_name="hac.mipsec.test", connected_ip="127.0.0.1")


def test_caller_must_say_where_it_connected(ca) -> None:
    der = leaf_der(ca, dns_names=["hac.mipsec.test"])
    with pytest.raises(LocalProtocolError):
        check_hac_certificate(der, server_name=None, connected_ip=None)
    with pytest.raises(LocalProtocolError):
        check_hac_certificate(der, server_name=None, connected_ip="hac.mipsec.test")


@pytest.mark.parametrize("key_type", ["ed25519", "ed448"])
def test_eddsa_refused(ca, key_type: str) -> None:
    der = leaf_der(ca, dns_names=["hac.mipsec.test"], key_type=key_type)
    with pytest.raises(CertificateError, match="Ed"):
        check_hac_certificate(der, server_name="hac.mipsec.test", connected_ip=None)
    with pytest.raises(CertificateError, match="Ed"):
        mn_cb_octets(der)


def test_garbage_refused() -> None:
    with pytest.raises(CertificateError, match="DER"):
        check_hac_certificate(b"\x30\x00", server_name="hac.mipsec.test", connected_ip=None)


def test_mn_cb_octets(ca) -> None:
    der = leaf_der(ca, dns_names=["hac.mipsec.test"], signature_hash="sha384")
    assert mn_cb_octets(der) == hashlib.sha384(der).digest()
    cert = x509.load_der_x509_certificate(der)
    assert cert.signature_hash_algorithm.name == "sha384"


# --- check_server_name: the same SAN-only rules for any server certificate (EAP-TLS) ---


def leaf_cert(ca, **kw) -> x509.Certificate:
    kw.setdefault("common_name", "eap.mipsec.test")
    return pki.make_leaf(ca[0], ca[1], **kw)[1]


@pytest.mark.parametrize("server_name", ["eap.mipsec.test", "EAP.mipsec.test", "eap.mipsec.test."])
def test_check_server_name_accepts_dnsname(ca, server_name):
    check_server_name(leaf_cert(ca, dns_names=["eap.mipsec.test"]), server_name)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"dns_names": ["other.mipsec.test"]}, "no dNSName equals"),
        ({"include_san": False, "dns_names": ["eap.mipsec.test"]}, "no subjectAltName"),
        ({"dns_names": ["*.mipsec.test", "eap.mipsec.test"]}, "wildcard"),
        # An EAP server checked by name: an iPAddress SAN does not stand in.
        ({"ip_addresses": ["192.0.2.1"]}, "no dNSName equals"),
    ],
)
def test_check_server_name_refuses(ca, kw, reason):
    with pytest.raises(CertificateError, match=reason) as err:
        check_server_name(leaf_cert(ca, **kw), "eap.mipsec.test", who="EAP server certificate")
    assert str(err.value).startswith("EAP server certificate: ")


def test_check_server_name_needs_no_binding_capable_signature():
    # Unlike the HAC certificate, nothing is bound to this one (RFC 5929 not used).
    ed_ca = pki.make_ca(key_type="ed25519")
    check_server_name(leaf_cert(ed_ca, dns_names=["eap.mipsec.test"]), "eap.mipsec.test")
