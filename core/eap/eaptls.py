"""EAP-TLS peer and server machines (RFC 5216 over TLS 1.2, RFC 9190 over TLS 1.3), sans-I/O.

TLS runs in pyOpenSSL over memory BIOs (``SSL.Connection(ctx, None)``): the
machine writes the peer's reassembled TLS flight into the connection and
reads its own flight out, then frames it as EAP-TLS type-data
(``core/wire/eaptls.py``).  The stdlib ``ssl`` module cannot export keying
material, which the MSK needs.

The conversation (mutual authentication, no resumption, no renegotiation)::

    server: Start (S)                      peer: ClientHello
    server: ServerHello .. Done / Finished peer: Certificate .. Finished
    TLS 1.2: server: CCS, Finished         peer: (empty)          -> Success
    TLS 1.3: server: 0x00 commitment       peer: (empty)          -> Success

Each flight may be split into fragments, each answered by an empty frame
(RFC 5216 §2.1.5).  PROFILE §4 item 4: the peer's decision becomes
UNCOND_SUCC exactly with the final empty response -- after the server's
Finished (TLS 1.2), after the commitment message (TLS 1.3, RFC 9190 §2.5) --
and the MSK exists from that moment.  The server decides success when that
final response arrives.

MSK (the first 64 of 128 exported octets; the rest would be the EMSK):

* TLS 1.2 (RFC 5216 §2.3): ``TLS-PRF(master_secret, "client EAP encryption",
  client.random || server.random)`` = the RFC 5705 exporter with *no*
  context (``None``: an empty context would change the PRF input);
* TLS 1.3 (RFC 9190 §2.3): exporter label ``EXPORTER_EAP_TLS_Key_Material``,
  context = the Type-Code (0x0d).

Failures (RFC 5216 §2.1.3, RFC 9190 §2.1.3): a TLS error on the server side
sends the alert OpenSSL produced in one more Request and fails on whatever
answer comes (the peer sends an empty response); a peer that refuses the
server sends its alert in a Response and is then DONE with decision FAIL; a
peer that receives an alert answers with an empty response.  A peer that
fails outside TLS (malformed framing, reassembly limit, a wrong commitment
message) discards the Request instead: an empty response there would read
as an ACK, or as the final response.  The machines
never see a socket or a clock; OpenSSL checks certificate validity against
the system clock.
"""

from __future__ import annotations

import enum
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ssl_ffi
from OpenSSL._util import lib as _ssl_lib

from mipsec.core.eap.method import (
    MSK_LEN,
    Decision,
    EapPeerContext,
    EapServerContext,
    MethodState,
    PeerOutput,
    ServerOutput,
)
from mipsec.core.eap.tls_identity import EapTlsIdentityPolicy
from mipsec.core.errors import CertificateError, LocalProtocolError
from mipsec.core.tls import TLS12_CIPHERS, check_server_name
from mipsec.core.wire.eap import EAP_HEADER_LEN, EapPacket, EapType
from mipsec.core.wire.eaptls import (
    ACK,
    MIN_TYPE_DATA,
    EapTlsError,
    EapTlsFrame,
    Reassembler,
    decode_frame,
    encode_frame,
    fragment,
)

__all__ = [
    "COMMITMENT",
    "DEFAULT_FRAGMENT_SIZE",
    "DEFAULT_GROUPS",
    "DEFAULT_MAX_MESSAGE",
    "MAX_ROUNDS",
    "TLS_VERSIONS",
    "EapTlsPeer",
    "EapTlsPeerConfig",
    "EapTlsServer",
    "EapTlsServerConfig",
    "check_groups",
    "derive_msk",
    "make_context",
    "tls_error_text",
]

DEFAULT_FRAGMENT_SIZE = 1400  # whole EAP packet, PROFILE §4 item 9
DEFAULT_MAX_MESSAGE = 65536  # RFC 5216 §2.1.5: "a reasonable choice ... might be 64 KB"
# Rounds (Requests or Responses) one machine handles before it gives up: the
# MHAuth cap on exchanges (PROFILE §4) -- also the method's own bound when
# it runs elsewhere.
MAX_ROUNDS = 255
COMMITMENT = b"\x00"  # RFC 9190 §2.5: one octet of application data, 0x00
_EAP_TLS_HEAD = EAP_HEADER_LEN + 1
_BIO_CHUNK = 65536  # EAP header + Type; type-data follows

TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# Key-exchange groups, in preference order (OpenSSL group-list syntax).
# Classical groups by default, not OpenSSL 3.5+'s X25519MLKEM768 first: its
# 1,216-octet key share pushes the ClientHello, and its 1,088-octet
# ciphertext the server flight, past one 1,400-octet EAP packet (PROFILE §4
# item 9), so each needs a second fragment and an ACK round -- 5 EAP-TLS
# rounds instead of 3, measured ~20 % of an EAP-TLS bootstrap.  The inner
# handshake runs inside the MHAuth TLS channel, which already carries the
# confidentiality; its key exchange protects nothing the outer one does not
# (SA keys travel in the outer channel; the MSK only authenticates).  An
# operator who wants a post-quantum inner exchange sets ``groups``.
DEFAULT_GROUPS = "X25519:P-256:P-384:X448:P-521"

# Key types OpenSSL signs TLS handshakes with (what pyOpenSSL accepts).
_TLS_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_LABEL_TLS12 = b"client EAP encryption"  # RFC 5216 §2.3
_LABEL_TLS13 = b"EXPORTER_EAP_TLS_Key_Material"  # RFC 9190 §2.3
_KEY_MATERIAL_LEN = 128  # MSK (64) || EMSK (64)

# The X509_V_ERR_* codes a misconfigured or hostile peer most often hits,
# for one-line reasons; any other is reported by number.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate (not issued by the configured CA)",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def _verify_error_text(errnum: int) -> str:
    return _VERIFY_ERRORS.get(errnum, f"X509 verify error {errnum}")


def tls_error_text(exc: SSL.Error) -> str:
    """One line naming what OpenSSL refused (an alert received, a failed check)."""
    if isinstance(exc, SSL.ZeroReturnError):
        return "TLS: the other side closed the TLS session"
    reasons: list[str] = []
    args = exc.args[0] if exc.args else None
    if isinstance(args, list):
        for item in args:
            if isinstance(item, tuple) and len(item) == 3 and item[2]:
                reasons.append(str(item[2]))
    return "TLS: " + ("; ".join(reasons) if reasons else type(exc).__name__)


def derive_msk(conn: SSL.Connection) -> bytes:
    """The 64-octet MSK of a finished EAP-TLS handshake (RFC 5216 §2.3, RFC 9190 §2.3)."""
    version = conn.get_protocol_version_name()
    if version == "TLSv1.3":
        material = conn.export_keying_material(
            _LABEL_TLS13, _KEY_MATERIAL_LEN, bytes((EapType.TLS,))
        )
    elif version == "TLSv1.2":
        # None, not b"": RFC 5216's PRF input has no context field at all.
        material = conn.export_keying_material(_LABEL_TLS12, _KEY_MATERIAL_LEN, None)
    else:
        raise LocalProtocolError(f"EAP-TLS MSK: no derivation for {version}")
    return material[:MSK_LEN]


def _verify_dispatch(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    # One callback per context; the connection carries a weak reference to
    # its machine (see ``_Machine.__init__``).
    ref = conn.get_app_data()
    machine = ref() if isinstance(ref, weakref.ref) else None
    if not isinstance(machine, _Machine):
        return False
    return machine._on_verify(cert, errnum, depth, bool(ok))


def _verify_raw(ok: int, store_ctx: Any) -> int:
    """OpenSSL's verify callback: pyOpenSSL's own wrapper (``_VerifyHelper``,
    pyOpenSSL 26), plus one thing it cannot do.

    When our check refuses a certificate whose chain OpenSSL accepted (the
    identity policy, the SAN rules), pyOpenSSL returns 0 and leaves the
    verify error at X509_V_OK, which OpenSSL turns into an internal_error
    alert -- "an error unrelated to the peer" (RFC 8446 §6.2), which is
    wrong.  X509_V_ERR_CERT_REJECTED makes it bad_certificate, the alert
    OpenSSL itself sends for a name mismatch.  Never raises: any error
    refuses the certificate.
    """
    try:
        x509 = _ssl_lib.X509_STORE_CTX_get_current_cert(store_ctx)
        _ssl_lib.X509_up_ref(x509)
        cert = crypto.X509._from_raw_x509_ptr(x509)
        errnum = _ssl_lib.X509_STORE_CTX_get_error(store_ctx)
        depth = _ssl_lib.X509_STORE_CTX_get_error_depth(store_ctx)
        index = _ssl_lib.SSL_get_ex_data_X509_STORE_CTX_idx()
        conn = SSL.Connection._reverse_mapping[
            _ssl_lib.X509_STORE_CTX_get_ex_data(store_ctx, index)
        ]
        accepted = _verify_dispatch(conn, cert, errnum, depth, ok)
    except Exception:
        accepted = False
    if accepted:
        _ssl_lib.X509_STORE_CTX_set_error(store_ctx, _ssl_lib.X509_V_OK)
        return 1
    if ok:
        _ssl_lib.X509_STORE_CTX_set_error(store_ctx, _ssl_lib.X509_V_ERR_CERT_REJECTED)
    return 0


# Module-level: the callback must outlive every context that points at it.
_VERIFY_CALLBACK = _ssl_ffi.callback("int (*)(int, X509_STORE_CTX *)", _verify_raw)


def _set_verify(ctx: SSL.Context, mode: int) -> None:
    """``ctx.set_verify(mode, _verify_dispatch)``, with the alert fixed (``_verify_raw``)."""
    _ssl_lib.SSL_CTX_set_verify(ctx._context, mode, _VERIFY_CALLBACK)


def _check_cipher_policy(ctx: SSL.Context) -> None:
    # As core/tls.py does for the stdlib: the selection string must not
    # silently widen beyond ECDHE + AEAD on an OpenSSL that parses it otherwise.
    names = SSL.Connection(ctx, None).get_cipher_list()
    tls12 = [n for n in names if not n.startswith("TLS_")]
    bad = [n for n in tls12 if not n.startswith("ECDHE-") or not ("GCM" in n or "CHACHA20" in n)]
    if bad:
        raise LocalProtocolError(f"EAP-TLS cipher policy: non ECDHE/AEAD suites enabled: {bad}")
    if not tls12:
        raise LocalProtocolError("EAP-TLS cipher policy: no TLS 1.2 ECDHE/AEAD suite available")


def _set_groups(ctx: SSL.Context, groups: str) -> None:
    # pyOpenSSL has no public call for a group list (set_tmp_ecdh takes one
    # EC curve, no X25519); its bindings carry SSL_CTX_set1_curves_list, the
    # alias of SSL_CTX_set1_groups_list.  pyOpenSSL is pinned in
    # pyproject.toml; the groups tests in tests/unit/test_eap_tls.py check
    # that the call takes effect (the negotiated group, the packet count).
    text = groups.encode("ascii", "replace")
    if not groups.strip() or _ssl_lib.SSL_CTX_set1_curves_list(ctx._context, text) != 1:
        _ssl_lib.ERR_clear_error()
        raise LocalProtocolError(
            f"EAP-TLS groups {groups!r}: OpenSSL refused the list (an unknown group name?)"
        )


def check_groups(groups: str) -> None:
    """Raise :class:`LocalProtocolError` unless OpenSSL accepts ``groups``."""
    _set_groups(SSL.Context(SSL.TLS_CLIENT_METHOD), groups)


def make_context(
    *,
    server: bool,
    chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    ca_certs: Sequence[x509.Certificate],
    tls_min: str = "1.2",
    tls_max: str = "1.3",
    groups: str = DEFAULT_GROUPS,
) -> SSL.Context:
    """An EAP-TLS context for one role, shared by all of that role's exchanges.

    ``chain`` (leaf first) and ``key`` are this side's credentials; only
    ``ca_certs`` are trusted for the other side's certificate (no system
    roots).  They are the certificates the caller read and parsed: the CA
    file is not opened again here, so what the server names to the peer
    (its client CA list) and what it trusts come from one read of the file.
    Mutual authentication: the server demands a client certificate.  TLS 1.2
    suites are ECDHE + AEAD only (PROFILE §1), renegotiation is refused, no
    session is cached or resumed; key exchange uses ``groups`` (OpenSSL
    group-list syntax, preference order).  Raises :class:`CertificateError`
    when OpenSSL refuses the credentials, :class:`LocalProtocolError` when it
    knows none of ``groups``.
    """
    if tls_min not in TLS_VERSIONS or tls_max not in TLS_VERSIONS:
        raise LocalProtocolError("EAP-TLS versions: 1.2 or 1.3")
    if TLS_VERSIONS[tls_min] > TLS_VERSIONS[tls_max]:
        raise LocalProtocolError("EAP-TLS versions: tls_min above tls_max")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(TLS_VERSIONS[tls_min])
    ctx.set_max_proto_version(TLS_VERSIONS[tls_max])
    # RFC 9190 §2.1.2-2.1.3 allow resumption; nothing here needs it, so no
    # tickets or cache (OpenSSL still sends TLS 1.3 NewSessionTicket
    # messages, which the peer reads and forgets).
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    _set_groups(ctx, groups)
    if not isinstance(key, _TLS_KEY_TYPES):
        raise CertificateError(f"key type {type(key).__name__} cannot sign in TLS")
    try:
        ctx.use_certificate(chain[0])
        for cert in chain[1:]:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except (SSL.Error, TypeError) as exc:
        raise CertificateError(f"OpenSSL refused the certificate or key ({exc.__class__.__name__})")
    if not ca_certs:
        raise CertificateError("no CA certificate to trust")
    store = ctx.get_cert_store()
    assert store is not None  # a new context always has one
    try:
        for ca in ca_certs:
            store.add_cert(crypto.X509.from_cryptography(ca))
    except crypto.Error as exc:
        raise CertificateError(f"OpenSSL refused the CA ({exc.__class__.__name__})") from None
    if server:
        for ca in ca_certs:
            ctx.add_client_ca(ca)  # tells the peer which certificate to send
        mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE
    else:
        mode = SSL.VERIFY_PEER
    _set_verify(ctx, mode)
    # Last: pyOpenSSL freezes a context once a connection was made from it.
    _check_cipher_policy(ctx)
    return ctx


@dataclass(frozen=True)
class EapTlsServerConfig:
    """What every server machine of one HAC configuration shares."""

    context: SSL.Context = field(repr=False)
    policy: EapTlsIdentityPolicy
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    max_message: int = DEFAULT_MAX_MESSAGE


@dataclass(frozen=True)
class EapTlsPeerConfig:
    """What every peer machine of one MN configuration shares."""

    context: SSL.Context = field(repr=False)
    server_name: str
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    max_message: int = DEFAULT_MAX_MESSAGE


def _max_type_data(fragment_size: int, extra: Any) -> int:
    # The framework may pass its own EAP size limit (PROFILE §4 item 9) as
    # extra["max_packet"]: the smaller bound wins.
    limit = fragment_size
    framework = extra.get("max_packet") if hasattr(extra, "get") else None
    if isinstance(framework, int) and not isinstance(framework, bool) and framework > 0:
        limit = min(limit, framework)
    size = limit - _EAP_TLS_HEAD
    if size < MIN_TYPE_DATA:
        raise LocalProtocolError(f"EAP-TLS fragment size {limit}: too small to carry data")
    return size


class _Phase(enum.Enum):
    START = "start"  # server: Start not sent yet; peer: waiting for the Start
    HANDSHAKE = "handshake"
    COMMIT_WAIT = "commit-wait"  # peer, TLS 1.3: Finished sent, commitment due
    FINAL = "final"  # server: last flight sent, the final empty response due
    FAILING = "failing"  # server: alert sent, the peer's answer due
    DONE = "done"


class _Machine:
    """What both roles share: the TLS connection over memory BIOs and the framing."""

    _who_other = "peer"

    def __init__(self, config: EapTlsServerConfig | EapTlsPeerConfig, extra: Any) -> None:
        self._conn: SSL.Connection | None = SSL.Connection(config.context, None)
        # Weak: a strong reference made a machine <-> connection cycle that
        # only a full collection freed when an exchange was abandoned (the
        # MN gone, an MHAuth error, a Nak): ~60 KiB of OpenSSL state per
        # unauthenticated ClientHello, held (found in review).
        self._conn.set_app_data(weakref.ref(self))
        self._max_type_data = _max_type_data(config.fragment_size, extra)
        self._max_message = config.max_message
        self._rx = Reassembler(config.max_message)
        self._out: deque[bytes] = deque()  # fragments not yet sent
        self._phase = _Phase.START
        self._rounds = 0
        self._msk: bytes | None = None
        self._verify_reason: str | None = None
        self.tls_version: str | None = None  # e.g. "TLSv1.3", once negotiated
        self.group_name: str | None = None  # key-exchange group, e.g. "x25519"

    @property
    def connection(self) -> SSL.Connection | None:
        """The pyOpenSSL connection (diagnostics, tests); None once the method failed.

        After a success it stays until the machine is dropped (one exchange).
        """
        return self._conn

    @property
    def buffered(self) -> int:
        """Octets held for the other side's message under way (bounded by max_message)."""
        return self._rx.buffered

    def msk(self) -> bytes | None:
        return self._msk

    # --- TLS plumbing

    def _live(self) -> SSL.Connection:
        conn = self._conn
        if conn is None:
            raise LocalProtocolError("EAP-TLS: the TLS connection is gone")
        return conn

    def _drain(self) -> bytes:
        conn = self._live()
        out = bytearray()
        while True:
            try:
                chunk = conn.bio_read(_BIO_CHUNK)
            except SSL.WantReadError:
                break
            out += chunk
            # A memory BIO hands out all it holds up to the size asked for:
            # a short read means it is empty (saves a raised WantReadError).
            if len(chunk) < _BIO_CHUNK:
                break
        return bytes(out)

    def _handshake(self, message: bytes) -> bool:
        """Feed one reassembled flight; True once the handshake is complete."""
        conn = self._live()
        if message:
            conn.bio_write(message)
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            return False
        self.tls_version = conn.get_protocol_version_name()
        try:
            self.group_name = conn.get_group_name()
        except NotImplementedError:  # OpenSSL < 3.2 cannot tell
            self.group_name = None
        return True

    def _read_application_data(self) -> bytes:
        conn = self._live()
        data = bytearray()
        while True:
            try:
                chunk = conn.recv(16384)
            except SSL.WantReadError:
                break
            data += chunk
            if len(data) > self._max_message:
                break
        return bytes(data)

    def _queue(self, message: bytes) -> bytes:
        """Fragment ``message``; return the first frame, keep the others for the ACKs."""
        frames = fragment(message, self._max_type_data)
        self._out.extend(frames[1:])
        return frames[0]

    def _detach(self) -> None:
        # Success: no more verify callbacks; break the machine <-> connection
        # cycle so both go as soon as the exchange drops the machine.
        if self._conn is not None:
            self._conn.set_app_data(None)

    def _release(self) -> None:
        # Failure: drop the TLS state (and its secrets) and any partial input.
        if self._conn is not None:
            self._conn.set_app_data(None)
            self._conn = None
        self._rx = Reassembler(self._max_message)
        self._msk = None

    def _reason(self, exc: SSL.Error) -> str:
        return self._verify_reason or tls_error_text(exc)

    # --- certificate checks (called from inside do_handshake)

    def _on_verify(self, cert: crypto.X509, errnum: int, depth: int, ok: bool) -> bool:
        if not ok:
            if self._verify_reason is None:
                self._verify_reason = (
                    f"{self._who_other} certificate: {_verify_error_text(errnum)} "
                    f"(chain depth {depth})"
                )
            return False
        if depth != 0:
            return True
        try:
            reason = self._check_leaf(cert.to_cryptography())
        except Exception as exc:  # a third-party policy must not break the handshake
            reason = f"{self._who_other} certificate check failed ({type(exc).__name__})"
        if reason is not None:
            self._verify_reason = self._verify_reason or reason
            return False
        return True

    def _check_leaf(self, cert: x509.Certificate) -> str | None:
        raise NotImplementedError


class EapTlsServer(_Machine):
    """The HAC's side of one EAP-TLS conversation (an ``EapServerMethod``)."""

    _who_other = "MN"

    def __init__(self, config: EapTlsServerConfig, ctx: EapServerContext) -> None:
        super().__init__(config, ctx.extra)
        self._ctx = ctx
        self._policy = config.policy
        self._live().set_accept_state()
        self._pending_msk: bytes | None = None
        self._failure = ""  # why, while the alert is on its way (FAILING)

    def __repr__(self) -> str:
        return f"EapTlsServer(mn_id={self._ctx.mn_id!r}, phase={self._phase.value})"

    def _check_leaf(self, cert: x509.Certificate) -> str | None:
        # Issue 7: the certificate, not the EAP Identity, proves who the MN is.
        return self._policy.check(cert, self._ctx.mn_id)

    def initiate(self) -> bytes:
        if self._phase is not _Phase.START:
            raise LocalProtocolError("EAP-TLS server: initiate() once, first")
        self._phase = _Phase.HANDSHAKE
        return encode_frame(EapTlsFrame(start=True))  # RFC 5216 §2.1.1

    def process(self, response: EapPacket) -> ServerOutput:
        if self._phase is _Phase.START:
            raise LocalProtocolError("EAP-TLS server: initiate() first")
        if self._phase is _Phase.DONE:
            # The verdict stands (and a successful MSK stays): nothing to answer.
            return ServerOutput(
                None, done=True, success=False, reason="EAP-TLS response after the method ended"
            )
        self._rounds += 1
        if self._rounds > MAX_ROUNDS:
            return self._fail(f"EAP-TLS did not finish within {MAX_ROUNDS} rounds")
        if response.type != EapType.TLS:
            return self._fail(f"EAP-TLS server given EAP Type {response.type}")
        try:
            frame = decode_frame(response.data, request=False)
        except EapTlsError as exc:
            return self._fail(f"malformed EAP-TLS response: {exc}")

        if self._out:  # we are sending fragments: only an ACK moves on (§2.1.5)
            if not frame.is_empty:
                return self._fail("expected a fragment ACK (empty EAP-TLS response)")
            return ServerOutput(self._out.popleft())
        if self._phase is _Phase.FAILING:
            # RFC 5216 §2.1.3: the alert was delivered; any answer ends it.
            return self._fail(self._failure)
        if self._phase is _Phase.FINAL:
            if frame.is_empty:
                return self._succeed()
            return self._fail(self._late_data_reason(frame))

        if frame.is_empty and not self._rx.in_progress:
            return self._fail("the MN gave up the TLS handshake (empty EAP-TLS response)")
        try:
            message = self._rx.add(frame)
        except EapTlsError as exc:
            return self._fail(f"EAP-TLS reassembly: {exc}")
        if message is None:
            return ServerOutput(ACK)
        return self._feed(message)

    def _feed(self, message: bytes) -> ServerOutput:
        try:
            complete = self._handshake(message)
        except SSL.Error as exc:
            return self._tls_failed(exc)
        out = self._drain()
        conn = self._live()
        if not complete:
            if not out:
                return self._fail("incomplete TLS flight from the MN")
            return ServerOutput(self._queue(out))
        if conn.get_peer_certificate(as_cryptography=True) is None:
            # VERIFY_FAIL_IF_NO_PEER_CERT makes this unreachable; never rely on it alone.
            return self._fail("the MN sent no certificate")
        if self.tls_version == "TLSv1.3":
            # RFC 9190 §2.5: no more handshake messages; protected success indication.
            conn.send(COMMITMENT)
            out += self._drain()
        self._pending_msk = derive_msk(conn)
        self._phase = _Phase.FINAL
        return ServerOutput(self._queue(out))

    def _late_data_reason(self, frame: EapTlsFrame) -> str:
        # Data where the final empty response was due: most likely the peer's
        # alert refusing our last flight -- name it if TLS can read it.
        try:
            self._live().bio_write(frame.data)
            self._read_application_data()
        except SSL.Error as exc:
            return tls_error_text(exc)
        return "TLS data from the MN where the final empty response was due"

    def _tls_failed(self, exc: SSL.Error) -> ServerOutput:
        reason = self._reason(exc)
        alert = self._drain()
        self._release()
        if not alert:
            return self._fail(reason)
        self._phase = _Phase.FAILING
        self._failure = reason
        return ServerOutput(self._queue(alert))

    def _succeed(self) -> ServerOutput:
        self._phase = _Phase.DONE
        self._msk, self._pending_msk = self._pending_msk, None
        self._detach()
        return ServerOutput(None, done=True, success=True)

    def _fail(self, reason: str) -> ServerOutput:
        self._phase = _Phase.DONE
        self._pending_msk = None
        self._out.clear()
        self._release()
        return ServerOutput(None, done=True, success=False, reason=reason)


class EapTlsPeer(_Machine):
    """The MN's side of one EAP-TLS conversation (an ``EapPeerMethod``)."""

    _who_other = "EAP server"

    def __init__(self, config: EapTlsPeerConfig, ctx: EapPeerContext) -> None:
        super().__init__(config, ctx.extra)
        self._ctx = ctx
        self._server_name = config.server_name
        conn = self._live()
        conn.set_connect_state()
        conn.set_tlsext_host_name(config.server_name.encode("idna"))
        # What process() reports with the last queued fragment.
        self._state = MethodState.INIT
        self._decision = Decision.FAIL
        self._reason_text = ""

    def __repr__(self) -> str:
        return f"EapTlsPeer(mn_id={self._ctx.mn_id!r}, phase={self._phase.value})"

    def _check_leaf(self, cert: x509.Certificate) -> str | None:
        # PROFILE §1's SAN-only rules, for the EAP server certificate (issue 7).
        try:
            check_server_name(cert, self._server_name, who="EAP server certificate")
        except CertificateError as exc:
            return str(exc)
        return None

    def process(self, request: EapPacket) -> PeerOutput:
        if self._phase is _Phase.DONE and not self._out:
            return PeerOutput(
                None, MethodState.DONE, self._decision, "EAP-TLS request after the method ended"
            )
        self._rounds += 1
        if self._rounds > MAX_ROUNDS:
            return self._fail(f"EAP-TLS did not finish within {MAX_ROUNDS} rounds")
        if request.type != EapType.TLS:
            return self._fail(f"EAP-TLS peer given EAP Type {request.type}")
        try:
            frame = decode_frame(request.data, request=True)
        except EapTlsError as exc:
            return self._fail(f"malformed EAP-TLS request: {exc}")

        if frame.start:
            if self._phase is not _Phase.START:
                return self._fail("EAP-TLS Start in the middle of the conversation")
            self._phase = _Phase.HANDSHAKE
            return self._feed(b"")
        if self._phase is _Phase.START:
            return self._fail("the first EAP-TLS request is not a Start")
        if self._out:  # we are sending fragments: only an ACK moves on (§2.1.5)
            if not frame.is_empty:
                return self._fail("expected a fragment ACK (empty EAP-TLS request)")
            return self._emit(self._out.popleft())
        if frame.is_empty and not self._rx.in_progress:
            return self._fail("unexpected empty EAP-TLS request")
        try:
            message = self._rx.add(frame)
        except EapTlsError as exc:
            return self._fail(f"EAP-TLS reassembly: {exc}")
        if message is None:
            return PeerOutput(ACK, MethodState.CONT, Decision.FAIL)
        return self._feed(message)

    def _feed(self, message: bytes) -> PeerOutput:
        if self._phase is _Phase.COMMIT_WAIT:
            return self._commitment(message)
        try:
            complete = self._handshake(message)
        except SSL.Error as exc:
            return self._tls_failed(exc)
        out = self._drain()
        if not complete:
            if not out:
                return self._fail("incomplete TLS flight from the EAP server")
            return self._respond(out, MethodState.CONT, Decision.FAIL)
        if self.tls_version == "TLSv1.2":
            # RFC 5216 §2.1.3: the server's Finished verified -> empty response;
            # PROFILE §4 item 4: this response carries the Done parameters.
            return self._succeed(out)
        # TLS 1.3: our Finished goes out now; success waits for the commitment.
        self._phase = _Phase.COMMIT_WAIT
        return self._respond(out, MethodState.CONT, Decision.FAIL)

    def _commitment(self, message: bytes) -> PeerOutput:
        try:
            self._live().bio_write(message)
            data = self._read_application_data()
        except SSL.Error as exc:
            return self._tls_failed(exc)
        if data == COMMITMENT:
            return self._succeed(b"")
        if not data:
            return self._fail("no commitment message from the EAP server (RFC 9190 §2.5)")
        return self._fail("application data from the EAP server other than the commitment 0x00")

    def _succeed(self, out: bytes) -> PeerOutput:
        self._msk = derive_msk(self._live())
        self._phase = _Phase.DONE
        self._detach()
        return self._respond(out, MethodState.DONE, Decision.UNCOND_SUCC)

    def _tls_failed(self, exc: SSL.Error) -> PeerOutput:
        # RFC 5216 §2.1.3: our own alert goes to the server in a Response (it
        # then sends EAP-Failure); after the server's alert -- nothing for
        # OpenSSL to say -- we answer with an empty Response, which the
        # server, waiting after its alert, takes as the end.
        reason = self._reason(exc)
        alert = self._drain()
        return self._fail(reason, alert)

    def _fail(self, reason: str, answer: bytes | None = None) -> PeerOutput:
        """DONE with decision FAIL; answer with the TLS message ``answer`` (b"": an
        empty Response), or with None silently discard the Request.

        Without a TLS answer the Request is discarded (RFC 4137 ``ignore``,
        as hostapd does): an empty Response would read as a fragment ACK to
        a server that is fragmenting, or -- after the TLS 1.3 handshake -- as
        the final response the server accepts as success.
        """
        self._out.clear()
        self._release()
        self._phase = _Phase.DONE
        if answer is None:
            self._state, self._decision, self._reason_text = MethodState.DONE, Decision.FAIL, reason
            return PeerOutput(None, MethodState.DONE, Decision.FAIL, reason)
        return self._respond(answer, MethodState.DONE, Decision.FAIL, reason)

    def _respond(
        self, message: bytes, state: MethodState, decision: Decision, reason: str = ""
    ) -> PeerOutput:
        self._state, self._decision, self._reason_text = state, decision, reason
        return self._emit(self._queue(message))

    def _emit(self, frame: bytes) -> PeerOutput:
        if self._out:
            return PeerOutput(frame, MethodState.CONT, Decision.FAIL)
        return PeerOutput(frame, self._state, self._decision, self._reason_text)
