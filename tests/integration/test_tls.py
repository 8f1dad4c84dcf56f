"""MN-HAC TLS over real 127.0.0.1 sockets (PROFILE §1).

The HAC side runs in a thread with blocking stdlib ``ssl``; the MN side is either
the stdlib client built by ``mn_client_context`` or, for what the stdlib cannot
do (TLS 1.1 hello, renegotiation), a hand-configured client.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from mipsec.core import pki
from mipsec.core.errors import CertificateError
from mipsec.core.tls import (
    TLS12_CIPHERS,
    check_hac_certificate,
    hac_peer_binding,
    hac_server_context,
    load_server_chain,
    mn_cb_octets,
    mn_client_context,
    server_cb_octets,
    set_nodelay,
)

HAC_NAME = "hac.mipsec.test"
IO_TIMEOUT = 10.0

# OpenSSL >= 3.0 refuses client-initiated renegotiation unless this is set
# (SSL_OP_ALLOW_CLIENT_RENEGOTIATION); the control test sets it on purpose so
# that only OP_NO_RENEGOTIATION stands between the client and a renegotiation.
SSL_OP_ALLOW_CLIENT_RENEGOTIATION = 0x100


# --- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> pki.PkiPaths:
    return pki.init_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ca(lab: pki.PkiPaths):
    key = serialization.load_pem_private_key(lab.ca_key.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(lab.ca_cert.read_bytes())
    return key, cert


@pytest.fixture(scope="module")
def issue(ca, tmp_path_factory):
    """Issue a HAC leaf from the lab CA and write it; returns (cert_file, key_file)."""
    directory = tmp_path_factory.mktemp("leaves")
    counter = iter(range(1000))

    def _issue(ca_pair=None, **kw) -> tuple[Path, Path]:
        ca_key, ca_cert = ca_pair or ca
        kw.setdefault("common_name", HAC_NAME)
        key, cert = pki.make_leaf(ca_key, ca_cert, **kw)
        n = next(counter)
        cert_file, key_file = directory / f"leaf{n}.pem", directory / f"leaf{n}.key"
        pki.write_cert(cert_file, cert)
        pki.write_key(key_file, key)
        return cert_file, key_file

    return _issue


# --- a one-connection HAC ---------------------------------------------------


@dataclass
class ServerSide:
    version: str | None = None
    cipher: str | None = None
    peer_cert: bytes | None = None
    received: list[bytes] = field(default_factory=list)
    error: BaseException | None = None


@contextmanager
def hac(ctx: ssl.SSLContext) -> Iterator[tuple[int, ServerSide]]:
    """Accept one TLS connection on 127.0.0.1, echo until EOF, record what happened."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(IO_TIMEOUT)
    result = ServerSide()

    def run() -> None:
        try:
            raw, _ = listener.accept()
        except OSError as exc:
            result.error = exc
            return
        with raw:
            raw.settimeout(IO_TIMEOUT)
            set_nodelay(raw)
            try:
                with ctx.wrap_socket(raw, server_side=True) as tls_sock:
                    result.version = tls_sock.version()
                    result.cipher = tls_sock.cipher()[0]
                    result.peer_cert = tls_sock.getpeercert(binary_form=True)
                    while data := tls_sock.recv(4096):
                        result.received.append(data)
                        tls_sock.sendall(data)
            except (ssl.SSLError, OSError) as exc:
                result.error = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], result
    finally:
        thread.join(IO_TIMEOUT * 2)
        listener.close()
    assert not thread.is_alive()


@contextmanager
def mn_connect(ctx: ssl.SSLContext, port: int, server_hostname: str) -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    set_nodelay(raw)
    try:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls_sock:
            yield tls_sock
    finally:
        raw.close()


def exchange(tls_sock: ssl.SSLSocket, data: bytes = b"MHAuth") -> None:
    tls_sock.sendall(data)
    assert tls_sock.recv(4096) == data


def leaf_der(cert_file: Path) -> bytes:
    return load_server_chain(cert_file)[0].public_bytes(serialization.Encoding.DER)


# --- good HAC certificate ---------------------------------------------------


@pytest.mark.parametrize("server_hostname", [HAC_NAME, "127.0.0.1"])
def test_good_hac_by_name_and_by_ip(lab: pki.PkiPaths, server_hostname: str) -> None:
    server_ctx = hac_server_context(lab.hac_cert, lab.hac_key)
    client_ctx = mn_client_context(lab.ca_cert)
    with hac(server_ctx) as (port, server), mn_connect(client_ctx, port, server_hostname) as s:
        exchange(s)
        by_ip = server_hostname == "127.0.0.1"
        cb = hac_peer_binding(
            s,
            server_name=None if by_ip else server_hostname,
            connected_ip=s.getpeername()[0],
        )
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert server.error is None
    # Both ends compute the same CB-octets, and it is SHA-256 of the DER the
    # HAC sent (ECDSA-SHA256 signature, RFC 5929 §4.1).
    assert cb == server_cb_octets(lab.hac_cert)
    assert cb == hashlib.sha256(leaf_der(lab.hac_cert)).digest()
    assert cb == mn_cb_octets(leaf_der(lab.hac_cert))


def test_sha384_signed_hac_binding_matches(issue, lab: pki.PkiPaths) -> None:
    cert_file, key_file = issue(dns_names=[HAC_NAME], signature_hash="sha384")
    with (
        hac(hac_server_context(cert_file, key_file)) as (port, server),
        mn_connect(mn_client_context(lab.ca_cert), port, HAC_NAME) as s,
    ):
        exchange(s)
        der = s.getpeercert(binary_form=True)
        cb = hac_peer_binding(s, server_name=HAC_NAME, connected_ip=s.getpeername()[0])
    assert server.error is None
    assert der == leaf_der(cert_file)  # the octets on the wire are the file's leaf
    assert cb == server_cb_octets(cert_file) == hashlib.sha384(der).digest()


def test_chain_file_with_ca_serves_leaf_binding(issue, lab: pki.PkiPaths, tmp_path) -> None:
    cert_file, key_file = issue(dns_names=[HAC_NAME])
    chain_file = tmp_path / "chain.pem"
    chain_file.write_bytes(cert_file.read_bytes() + lab.ca_cert.read_bytes())
    with (
        hac(hac_server_context(chain_file, key_file)) as (port, _),
        mn_connect(mn_client_context(lab.ca_cert), port, HAC_NAME) as s,
    ):
        cb = hac_peer_binding(s, server_name=HAC_NAME, connected_ip=None)
    assert cb == server_cb_octets(chain_file) == server_cb_octets(cert_file)


# --- certificates the MN refuses --------------------------------------------


@pytest.mark.parametrize(
    "dns_names", [["*.mipsec.test"], ["*.mipsec.test", HAC_NAME], [HAC_NAME, "*.mipsec.test"]]
)
def test_wildcard_refused_even_if_stdlib_accepts(issue, lab: pki.PkiPaths, dns_names) -> None:
    cert_file, key_file = issue(dns_names=dns_names)
    with (
        hac(hac_server_context(cert_file, key_file)) as (port, _),
        mn_connect(mn_client_context(lab.ca_cert), port, HAC_NAME) as s,
    ):
        # The stdlib's own check let this through (DESIGN.md trap) ...
        assert s.version() is not None
        # ... ours does not.
        with pytest.raises(CertificateError, match="wildcard"):
            hac_peer_binding(s, server_name=HAC_NAME, connected_ip=s.getpeername()[0])


def test_cn_only_certificate_refused(issue, lab: pki.PkiPaths) -> None:
    cert_file, key_file = issue(common_name=HAC_NAME, include_san=False)
    with hac(hac_server_context(cert_file, key_file)) as (port, server):
        # The stdlib check, CN fallback off, already fails the handshake.
        with pytest.raises(ssl.SSLCertVerificationError):
            with mn_connect(mn_client_context(lab.ca_cert), port, HAC_NAME):
                pass
    assert server.error is not None
    # Our own check refuses it independently of the stdlib.
    with pytest.raises(CertificateError, match="no subjectAltName"):
        check_hac_certificate(leaf_der(cert_file), server_name=HAC_NAME, connected_ip=None)


def test_cn_only_refused_by_our_check_when_stdlib_check_is_off(issue, lab) -> None:
    cert_file, key_file = issue(common_name=HAC_NAME, include_san=False)
    client_ctx = mn_client_context(lab.ca_cert)
    client_ctx.hostname_checks_common_name = True  # simulate the stdlib default
    with (
        hac(hac_server_context(cert_file, key_file)) as (port, _),
        mn_connect(client_ctx, port, HAC_NAME) as s,
    ):
        with pytest.raises(CertificateError, match="no subjectAltName"):
            hac_peer_binding(s, server_name=HAC_NAME, connected_ip=None)


def test_unknown_ca_refused(issue, lab: pki.PkiPaths) -> None:
    cert_file, key_file = issue(pki.make_ca("rogue CA"), dns_names=[HAC_NAME])
    with hac(hac_server_context(cert_file, key_file)) as (port, server):
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            with mn_connect(mn_client_context(lab.ca_cert), port, HAC_NAME):
                pass
    assert server.error is not None


def test_other_name_refused(issue, lab: pki.PkiPaths) -> None:
    cert_file, key_file = issue(dns_names=["other.mipsec.test"], ip_addresses=["127.0.0.1"])
    with hac(hac_server_context(cert_file, key_file)) as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            with mn_connect(mn_client_context(lab.ca_cert), port, HAC_NAME):
                pass
    with pytest.raises(CertificateError, match="no dNSName equals"):
        check_hac_certificate(leaf_der(cert_file), server_name=HAC_NAME, connected_ip="127.0.0.1")


def test_ip_san_mismatch_refused(issue, lab: pki.PkiPaths) -> None:
    cert_file, key_file = issue(dns_names=[HAC_NAME], ip_addresses=["127.0.0.2"])
    with hac(hac_server_context(cert_file, key_file)) as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            with mn_connect(mn_client_context(lab.ca_cert), port, "127.0.0.1"):
                pass
    with pytest.raises(CertificateError, match="iPAddress"):
        check_hac_certificate(leaf_der(cert_file), server_name=None, connected_ip="127.0.0.1")
    # The same certificate is fine by name: the IP SAN only matters by address.
    check_hac_certificate(leaf_der(cert_file), server_name=HAC_NAME, connected_ip="127.0.0.1")


def test_client_context_trusts_only_configured_ca(lab: pki.PkiPaths) -> None:
    ctx = mn_client_context(lab.ca_cert)
    ca_der = x509.load_pem_x509_certificate(lab.ca_cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert ctx.get_ca_certs(binary_form=True) == [ca_der]  # no system roots
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.hostname_checks_common_name is False
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# --- HAC refuses to start ---------------------------------------------------


@pytest.mark.parametrize("key_type", ["ed25519", "ed448"])
def test_hac_refuses_eddsa_certificate(issue, key_type: str) -> None:
    cert_file, key_file = issue(dns_names=[HAC_NAME], key_type=key_type)
    with pytest.raises(CertificateError, match=str(cert_file)):
        hac_server_context(cert_file, key_file)
    with pytest.raises(CertificateError, match="Ed"):
        server_cb_octets(cert_file)


@pytest.mark.parametrize("ca_type", ["ed25519", "ed448"])
def test_hac_refuses_eddsa_signed_certificate(issue, ca_type: str) -> None:
    cert_file, key_file = issue(pki.make_ca("Ed CA", key_type=ca_type), dns_names=[HAC_NAME])
    with pytest.raises(CertificateError, match="binding undefined"):
        hac_server_context(cert_file, key_file)


def test_hac_refuses_mismatched_key(issue) -> None:
    cert_file, _ = issue(dns_names=[HAC_NAME])
    _, other_key = issue(dns_names=[HAC_NAME])
    with pytest.raises(CertificateError, match=f"{cert_file}.*does not match"):
        hac_server_context(cert_file, other_key)


def test_hac_refuses_bad_files(issue, lab: pki.PkiPaths, tmp_path) -> None:
    cert_file, key_file = issue(dns_names=[HAC_NAME])
    misordered = tmp_path / "misordered.pem"
    misordered.write_bytes(lab.ca_cert.read_bytes() + cert_file.read_bytes())
    with pytest.raises(CertificateError, match="leaf first"):
        hac_server_context(misordered, key_file)
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(CertificateError, match=str(empty)):
        hac_server_context(empty, key_file)
    with pytest.raises(CertificateError, match="cannot read"):
        hac_server_context(tmp_path / "missing.pem", key_file)
    with pytest.raises(CertificateError, match="not an unencrypted PEM private key"):
        hac_server_context(cert_file, cert_file)


# --- versions and suites ----------------------------------------------------


@pytest.mark.parametrize(
    ("server_strict", "client_strict", "expected"),
    [
        (False, False, "TLSv1.3"),
        (True, False, "TLSv1.2"),
        (False, True, "TLSv1.2"),
        (True, True, "TLSv1.2"),
    ],
)
def test_negotiated_version(lab, server_strict: bool, client_strict: bool, expected: str) -> None:
    server_ctx = hac_server_context(lab.hac_cert, lab.hac_key, strict_rfc6618=server_strict)
    client_ctx = mn_client_context(lab.ca_cert, strict_rfc6618=client_strict)
    with hac(server_ctx) as (port, server), mn_connect(client_ctx, port, HAC_NAME) as s:
        exchange(s)
        assert s.version() == expected
        cipher = s.cipher()[0]
    assert server.version == expected
    if expected == "TLSv1.2":
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


def test_tls11_client_refused(lab: pki.PkiPaths) -> None:
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(lab.ca_cert)
    # Let this client really send a TLS 1.1 hello (OpenSSL forbids it by default).
    client_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with hac(hac_server_context(lab.hac_cert, lab.hac_key)) as (port, server):
        # The HAC answers with a protocol_version alert.
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            with mn_connect(client_ctx, port, HAC_NAME):
                pass
    assert isinstance(server.error, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(server.error)
    assert server.version is None


@pytest.mark.parametrize("strict", [False, True])
def test_only_ecdhe_aead_suites(lab: pki.PkiPaths, strict: bool) -> None:
    for ctx in (
        hac_server_context(lab.hac_cert, lab.hac_key, strict_rfc6618=strict),
        mn_client_context(lab.ca_cert, strict_rfc6618=strict),
    ):
        suites = ctx.get_ciphers()
        tls12 = [s for s in suites if s["protocol"] == "TLSv1.2"]
        assert tls12, "no TLS 1.2 suite left"
        for s in tls12:
            assert s["kea"] == "kx-ecdhe", s["name"]
            assert s["aead"], s["name"]
            assert s["name"].startswith("ECDHE-")
        assert all(s["aead"] for s in suites)
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION


@pytest.mark.parametrize(
    ("cert_kind", "client_ciphers"),
    [
        ("ec-p256", "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA"),  # CBC, no AEAD
        ("rsa2048", "AES128-GCM-SHA256:AES256-GCM-SHA384"),  # AEAD, RSA key transport
        ("rsa2048", "DHE-RSA-AES128-GCM-SHA256"),  # AEAD, finite-field DHE
    ],
)
def test_hac_refuses_non_ecdhe_aead_client(issue, lab, cert_kind: str, client_ciphers) -> None:
    cert_file, key_file = issue(dns_names=[HAC_NAME], key_type=cert_kind)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(lab.ca_cert)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers(client_ciphers)
    with hac(hac_server_context(cert_file, key_file)) as (port, server):
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            with mn_connect(client_ctx, port, HAC_NAME):
                pass
    assert isinstance(server.error, ssl.SSLError)
    assert "NO_SHARED_CIPHER" in str(server.error)
    # Control: the same certificate with an ECDHE/AEAD client works.
    client_ctx.set_ciphers(TLS12_CIPHERS)
    with (
        hac(hac_server_context(cert_file, key_file)) as (port, server),
        mn_connect(client_ctx, port, HAC_NAME) as s,
    ):
        exchange(s)
    assert server.error is None


# --- renegotiation ----------------------------------------------------------


def _renegotiate(lab: pki.PkiPaths, server_ctx: ssl.SSLContext) -> tuple[str, ServerSide]:
    """A pyOpenSSL TLS 1.2 client asks for a renegotiation; returns its outcome."""
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    client_ctx.load_verify_locations(str(lab.ca_cert))
    client_ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
    with hac(server_ctx) as (port, server):
        # Blocking socket: pyOpenSSL turns a socket timeout into WantReadError.
        raw = socket.create_connection(("127.0.0.1", port))
        try:
            conn = SSL.Connection(client_ctx, raw)
            conn.set_tlsext_host_name(HAC_NAME.encode())
            conn.set_connect_state()
            conn.do_handshake()
            assert conn.get_protocol_version_name() == "TLSv1.2"
            conn.sendall(b"before")
            assert conn.recv(100) == b"before"
            assert conn.renegotiate()  # queues a new ClientHello
            try:
                conn.do_handshake()
                conn.sendall(b"after")
                assert conn.recv(100) == b"after"
                outcome = "renegotiated"
            except SSL.Error as exc:
                outcome = f"refused: {exc}"
            with_shutdown = outcome == "renegotiated"
            if with_shutdown:
                conn.shutdown()
        finally:
            raw.close()
    return outcome, server


def test_renegotiation_refused(lab: pki.PkiPaths) -> None:
    server_ctx = hac_server_context(lab.hac_cert, lab.hac_key, strict_rfc6618=True)
    outcome, server = _renegotiate(lab, server_ctx)
    assert outcome.startswith("refused"), outcome
    assert "no renegotiation" in outcome
    assert server.received == [b"before"]  # nothing got through a second handshake
    assert isinstance(server.error, ssl.SSLError)


@pytest.mark.skipif(ssl.OPENSSL_VERSION_INFO < (3, 0), reason="needs OpenSSL 3 option bits")
def test_renegotiation_refused_even_if_client_renegotiation_allowed(lab) -> None:
    # OpenSSL 3 already refuses client renegotiation by default; switch that
    # default off so the test fails if OP_NO_RENEGOTIATION is ever dropped.
    server_ctx = hac_server_context(lab.hac_cert, lab.hac_key, strict_rfc6618=True)
    server_ctx.options |= SSL_OP_ALLOW_CLIENT_RENEGOTIATION
    outcome, server = _renegotiate(lab, server_ctx)
    assert outcome.startswith("refused"), outcome
    assert server.received == [b"before"]

    # Control: the same server without OP_NO_RENEGOTIATION does renegotiate,
    # so the refusal above is that option's doing.
    server_ctx = hac_server_context(lab.hac_cert, lab.hac_key, strict_rfc6618=True)
    server_ctx.options |= SSL_OP_ALLOW_CLIENT_RENEGOTIATION
    server_ctx.options &= ~ssl.OP_NO_RENEGOTIATION
    outcome, server = _renegotiate(lab, server_ctx)
    assert outcome == "renegotiated"
    assert server.received == [b"before", b"after"]


# --- client certificates (deployment choice) --------------------------------


def test_optional_and_required_client_certificate(lab: pki.PkiPaths) -> None:
    with_cert = mn_client_context(
        lab.ca_cert, client_cert=lab.hac_client_cert, client_key=lab.hac_client_key
    )
    optional = hac_server_context(lab.hac_cert, lab.hac_key, client_ca_file=lab.ca_cert)
    with hac(optional) as (port, server), mn_connect(with_cert, port, HAC_NAME) as s:
        exchange(s)
    assert server.peer_cert == leaf_der(lab.hac_client_cert)
    with (
        hac(optional) as (port, server),
        mn_connect(mn_client_context(lab.ca_cert), port, HAC_NAME) as s,
    ):
        exchange(s)
    assert server.error is None and server.peer_cert is None

    required = hac_server_context(
        lab.hac_cert,
        lab.hac_key,
        strict_rfc6618=True,
        client_ca_file=lab.ca_cert,
        require_client_cert=True,
    )
    with hac(required) as (port, server):
        with pytest.raises(ssl.SSLError):
            with mn_connect(mn_client_context(lab.ca_cert), port, HAC_NAME):
                pass
    assert isinstance(server.error, ssl.SSLError)


# --- sockets ----------------------------------------------------------------


def test_set_nodelay() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            set_nodelay(sock)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        set_nodelay(a)  # not TCP: silently nothing to do


# --- asyncio (how the roles use it) -----------------------------------------


def test_asyncio_streams_binding(lab: pki.PkiPaths) -> None:
    async def main() -> tuple[bytes, str]:
        server_ctx = hac_server_context(lab.hac_cert, lab.hac_key)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            set_nodelay(writer.get_extra_info("socket"))
            writer.write(await reader.readexactly(6))
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=mn_client_context(lab.ca_cert), server_hostname=HAC_NAME
                ),
                IO_TIMEOUT,
            )
            set_nodelay(writer.get_extra_info("socket"))
            ssl_object = writer.get_extra_info("ssl_object")
            cb = hac_peer_binding(
                ssl_object, server_name=HAC_NAME, connected_ip=writer.get_extra_info("peername")[0]
            )
            writer.write(b"MHAuth")
            echoed = await asyncio.wait_for(reader.readexactly(6), IO_TIMEOUT)
            writer.close()
            await writer.wait_closed()
        assert echoed == b"MHAuth"
        return cb, ssl_object.version()

    cb, version = asyncio.run(main())
    assert version == "TLSv1.3"
    assert cb == server_cb_octets(lab.hac_cert)
