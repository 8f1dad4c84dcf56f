"""PROFILE §9 provisioning over mutually authenticated TLS: server and client.

The server side is used by the HA (it serves ``install`` and ``withdraw``
from the HAC) and by the HAC (it serves ``pull`` of an SPI an HA does not
know).  The client side, :class:`ProvisioningClient`, is used by the ``tls``
provisioning transport (plugins/transport_tls.py) and by :func:`pull_sa`.
Messages are those of :mod:`mipsec.core.provisioning`, framed as MHAuth
containers (PROFILE §2): a connection carries lockstep exchanges with
Identifiers 1, 2, 3, ...; the client reconnects after the 255th.

TLS contexts reuse core/tls.py: the PROFILE §1 policy (TLS 1.2 floor,
ECDHE+AEAD only, no renegotiation), the peer's CA as the only trust anchor,
and the hand-made SAN check (no CN, no wildcard, IP SAN tied to the connected
address) for the server certificate.  The server requires a client
certificate (RFC 6618 §4.2: the HAC-HA channel is mutually authenticated).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

from cryptography import x509

from mipsec.core.config import ProvisioningListener, PullConfig
from mipsec.core.errors import (
    CertificateError,
    ContainerError,
    ListenError,
    TruncatedError,
    WireError,
)
from mipsec.core.filedigest import FileDigests, UnreadableFileError
from mipsec.core.model import IssuedSA
from mipsec.core.provisioning import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    OK,
    REASON_INTERNAL,
    REASON_MALFORMED,
    REASON_REFUSED,
    REASON_UNKNOWN_SPI,
    REASON_UNSUPPORTED_OP,
    ProvisioningFailed,
    ProvisioningRefused,
    ProvOp,
    ProvRequest,
    ProvResponse,
    decode_request,
    decode_response,
    encode_pull,
    encode_response,
)
from mipsec.core.roles.tlsserver import (
    CLOSED,
    IDLE_TIMEOUT,
    PEER_CLOSED,
    Limits,
    TlsConnection,
    TlsListener,
    peer_allowed,
)
from mipsec.core.tls import (
    check_hac_certificate,
    hac_server_context,
    load_server_chain,
    mn_client_context,
)
from mipsec.core.tlsclient import TlsClient
from mipsec.core.wire.container import (
    HEADER_LEN,
    IDENTIFIER_MAX,
    MAX_CONTENT,
    Container,
    ContainerDecoder,
    IdentifierSequence,
    encode_container,
)

log = logging.getLogger("mipsec.provisioning")

READ_CHUNK = HEADER_LEN + MAX_CONTENT  # one maximal container
# Connections a client opens to one peer at most; requests beyond wait for a
# free one.  Measured on loopback: lockstep on a kept connection ~0.4 ms per
# install, a fresh TLS connection per install ~3.4 ms.
MAX_CONNECTIONS = 8
# Requests in flight on one connection at most (pipelined, answered in order).
PIPELINE = 16

# (issued, ha_id), and with ``install_withdraws`` a third argument: the SPIs
# of the request's prov-withdraw (core/provisioning.py), if it has any.
# Install and withdraw callbacks may complete at once (return None) or
# return an awaitable: work done at once is answered without a Task or a
# timer around it, and a burst of such requests with one write (issue 9).
OnInstall = Callable[..., Awaitable[None] | None]
# A pipelined burst of installs at once: ``(issued, ha_id, withdraw)`` each
# (withdraw empty without ``install_withdraws``), in order; per item None
# (installed) or the exception it failed with.  Lets the HA commit a burst
# once (issue 9: group commit) where ``on_install`` commits per SA.
OnInstallMany = Callable[
    [list[tuple[IssuedSA, str | None, tuple[int, ...]]]], list[Exception | None]
]
OnWithdraw = Callable[[int], Awaitable[None] | None]
# A pipelined burst of withdrawals at once: per SPI, in order, None
# (withdrawn, durable) or the exception it failed with; one commit for the
# burst where ``on_withdraw`` commits per SPI.
OnWithdrawMany = Callable[[list[int]], list[Exception | None]]
OnPull = Callable[[int, str], Awaitable[IssuedSA | None]]

StrPath = str | os.PathLike[str]

__all__ = [
    "ACCESS_LEAVES",
    "CAP_LEAF",
    "MAX_CONNECTIONS",
    "PIPELINE",
    "TIMEOUT_LEAF",
    "ProvisioningClient",
    "ProvisioningServer",
    "check_client_names",
    "client_context",
    "pull_sa",
    "server_context",
]


# ----------------------------------------------------------------- contexts


def server_context(cfg: ProvisioningListener) -> ssl.SSLContext:
    """TLS 1.2 floor, ECDHE+AEAD, no renegotiation (PROFILE §1 policy via core.tls),
    CERT_REQUIRED with ``cfg.client_ca`` as the only trust anchor."""
    return hac_server_context(
        cfg.cert, cfg.key, client_ca_file=cfg.client_ca, require_client_cert=True
    )


def _load_listener(cfg: ProvisioningListener) -> tuple[FileDigests, ssl.SSLContext, datetime]:
    """What ``cfg``'s certificate, key and client CA hold (taken first:
    core/filedigest.py), the context built from them, the leaf's notAfter."""
    files = FileDigests([("cert", cfg.cert), ("key", cfg.key), ("client_ca", cfg.client_ca)])
    context = server_context(cfg)
    return files, context, load_server_chain(cfg.cert)[0].not_valid_after_utc


def client_context(ca: StrPath, cert: StrPath, key: StrPath) -> ssl.SSLContext:
    """Trust only ``ca``; present ``cert``/``key``; no CN fallback (PROFILE §1 policy)."""
    return mn_client_context(ca, client_cert=cert, client_key=key)


def check_client_names(peer_cert_der: bytes, names: Sequence[str]) -> None:
    """The client certificate must carry one of ``names`` as a dNSName SAN.

    Exact, case-insensitive match; a wildcard dNSName is refused, the CN is
    never used (same rules as PROFILE §1 applies to the HAC certificate).
    """
    try:
        cert = x509.load_der_x509_certificate(peer_cert_der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError("client certificate: no subjectAltName extension")
    except ValueError:
        raise CertificateError("client certificate: not parseable")
    dns = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    if any("*" in n for n in dns):
        raise CertificateError("client certificate: wildcard dNSName refused")
    wanted = {n.lower().rstrip(".") for n in names}
    if wanted.intersection(dns):
        return
    # An IP literal among ``names`` (an HA configured by address, no
    # server_name) is proven by an iPAddress SAN, as the HAC checks it when
    # it provisions to that HA.
    ips = {_ip(n) for n in names} - {None}
    if ips and ips.intersection(san.get_values_for_type(x509.IPAddress)):
        return
    what = "dNSName or iPAddress" if ips else "dNSName"
    raise CertificateError(f"client certificate: no {what} in {sorted(wanted)} (has {dns})")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# ------------------------------------------------------------------- server

# The listener's keys a role's reload applies (``apply_access``), to new
# connections and to the open ones: who may connect.
ACCESS_LEAVES = frozenset({"provisioning.client_names", "provisioning.allowed_clients"})
# The listener's one timeout, which a reload also applies (apply_timeout).
TIMEOUT_LEAF = "provisioning.timeout"
# ... and its cap on connections (``apply_max_connections``).
CAP_LEAF = "provisioning.max_connections"


class ProvisioningServer:
    """Mutual-TLS listener serving the operations it has a callback for.

    An operation without a callback (e.g. install on the HAC's pull server)
    gets 400 ``unsupported-op``; a malformed request gets 400 ``malformed``
    and the connection is closed; other connections are unaffected.
    Callbacks are bounded by ``cfg.timeout``; one that raises
    ``ProvisioningRefused`` gives 400 (``refused``: nothing changed), any
    other failure 500 (``internal``: outcome unknown).

    Connections are those of core/roles/tlsserver.py: ``cfg.timeout`` bounds
    the handshake, the wait for a request and each request (first octet to
    last), and ``cfg.max_connections`` caps them all, the longest-waiting one
    evicted for a newcomer, so idle or trickling peers cannot lock the HAC out;
    an authenticated connection (its client certificate accepted) is evicted
    only when no unauthenticated one is left, so a connect flood from anyone
    who reaches the port evicts only itself.
    """

    def __init__(
        self,
        cfg: ProvisioningListener,
        *,
        on_install: OnInstall | None = None,
        on_install_many: OnInstallMany | None = None,
        on_withdraw: OnWithdraw | None = None,
        on_withdraw_many: OnWithdrawMany | None = None,
        on_pull: OnPull | None = None,
        pull_names: Callable[[str], Sequence[str] | None] | None = None,
        install_withdraws: bool = False,
    ) -> None:
        """``pull_names(ha_id)`` gives the dNSName SANs the client certificate
        must carry to pull for that HA (None: no such HA): it binds the
        ``ha-id`` a puller claims to the certificate it authenticated with.
        ``install_withdraws``: ``on_install`` takes the SPIs of an install's
        ``prov-withdraw``; without it the header is ignored (and not echoed),
        so the HAC withdraws them one by one.  ``on_install_many``: installs
        that arrived together (consecutive on one connection) go to it in
        one call instead of to ``on_install`` one by one, and so do
        withdrawals to ``on_withdraw_many``."""
        self.cfg = cfg
        self.install_withdraws = install_withdraws
        self.pull_names = pull_names
        self.on_install = on_install
        self.on_install_many = on_install_many
        self.on_withdraw = on_withdraw
        self.on_withdraw_many = on_withdraw_many
        self.on_pull = on_pull
        self.files, self.ssl_context, self.not_after = _load_listener(cfg)
        self.listener = TlsListener(
            self.ssl_context,
            self._session,
            Limits(
                handshake_timeout=cfg.timeout,
                request_timeout=cfg.timeout,
                idle_timeout=cfg.timeout,
                max_connections=cfg.max_connections,
                # Client certificates are required and checked by _session:
                # a flood of connects must not evict a proven HAC.
                protect_authenticated=True,
                allowed_peers=cfg.allowed_clients,
            ),
            name="provisioning",
        )
        self.addresses: list[tuple[str, int]] = []
        self._sessions: set[_ProvSession] = set()

    def certificates(self) -> dict[str, datetime]:
        """The listener certificate's notAfter (core/certexpiry.py)."""
        return {"cert": self.not_after}

    def renewal(self, file: str, prefix: str) -> Callable[[], None] | None:
        """For a reload: None when ``cert``, ``key`` and ``client_ca`` hold
        what the listener was built from; else what makes new connections
        use them as they are now, built already (a reload swaps only once
        everything it builds has built; connections already made keep their
        context).  ``ConfigError`` naming the key (``PREFIXcert``...) when
        they do not load, and nothing changes."""
        from mipsec.core.roles.preflight import file_error

        if not self.files.changed():
            return None
        cfg = self.cfg
        try:
            files, context, not_after = _load_listener(cfg)
        except (UnreadableFileError, CertificateError) as exc:
            entries = [(f"{prefix}{k}", getattr(cfg, k)) for k in ("cert", "key", "client_ca")]
            raise file_error(file, exc, entries) from None

        def commit() -> None:
            self.files, self.ssl_context, self.not_after = files, context, not_after
            self.listener.ssl_context = context

        return commit

    @property
    def sessions(self) -> int:
        """Connections whose client certificate was accepted, open now."""
        return len(self._sessions)

    def apply_access(self, cfg: ProvisioningListener) -> int:
        """A reload's new ``client_names`` and ``allowed_clients`` (the rest
        of ``cfg`` as before): new connections meet them from now on, and
        every open one they no longer admit is closed -- removing a HAC's
        name or address cuts it off, not only its next connection.  One
        whose operation is under way gets its answer first (an install the
        HA has done is confirmed to the HAC that asked), then is closed.
        The number of connections closed."""
        self.cfg = cfg
        self.listener.limits = dataclasses.replace(
            self.listener.limits, allowed_peers=cfg.allowed_clients
        )
        cut = 0
        for session in list(self._sessions):
            why = self._refusal(session.peername, session.peer_der)
            if why is not None:
                session.revoke(why)
                cut += 1
        allowed = cfg.allowed_clients
        log.info(
            "provisioning listener: client_names %s, allowed_clients %s from now on "
            "(%d open connection(s) no longer admitted, closed)",
            list(cfg.client_names),
            "any" if allowed is None else [str(n) for n in allowed],
            cut,
        )
        return cut

    def apply_timeout(self, cfg: ProvisioningListener) -> None:
        """A reload's new ``timeout``: it bounds new connections' handshakes,
        every connection's next wait for a request and next request, and the
        next operations -- open connections from their next step on (a step
        under way keeps the deadline it was given)."""
        self.cfg = cfg
        self.listener.apply_limits(
            dataclasses.replace(
                self.listener.limits,
                handshake_timeout=cfg.timeout,
                request_timeout=cfg.timeout,
                idle_timeout=cfg.timeout,
            )
        )
        log.info(
            "provisioning listener: timeout %g s from now on (open connections from their "
            "next step)",
            cfg.timeout,
        )

    def apply_max_connections(self, cfg: ProvisioningListener) -> None:
        """A reload's new ``max_connections`` (see ``TlsListener.apply_limits``)."""
        old = self.cfg.max_connections
        self.cfg = cfg
        limits = self.listener.limits
        closed = self.listener.apply_limits(
            dataclasses.replace(limits, max_connections=cfg.max_connections)
        )
        log.info(
            "provisioning listener: max_connections %d -> %d%s",
            old,
            cfg.max_connections,
            f" ({closed} connection(s) over it closed, the longest waiting)" if closed else "",
        )

    def _refusal(self, peername: Any, der: bytes) -> str | None:
        """Why ``cfg`` no longer admits a client (None: it does)."""
        cfg = self.cfg
        if cfg.allowed_clients is not None and not peer_allowed(peername, cfg.allowed_clients):
            return "its address is not in allowed_clients"
        if cfg.client_names:  # required by the model: at least one
            try:
                check_client_names(der, cfg.client_names)
            except CertificateError as exc:
                return str(exc)
        return None

    async def start(self) -> list[tuple[str, int]]:
        for host in self.cfg.listen:
            try:
                self.addresses.extend(await self.listener.listen(host, self.cfg.port))
            except OSError as exc:
                await self.stop()  # the addresses already bound, if any
                raise ListenError.from_oserror(
                    "provisioning.port", host, self.cfg.port, exc
                ) from None
        for host, port in self.addresses:
            log.info("provisioning listening on %s port %d (mutual TLS)", host, port)
        return self.addresses

    async def stop(self) -> None:
        self.listener.close()
        tasks = [t for t in (s.cancel() for s in list(self._sessions)) if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await self.listener.aclose()

    def _session(self, conn: TlsConnection) -> _ProvSession | None:
        peer = conn.peer
        der = conn.peercert_der()
        if not der:  # CERT_REQUIRED makes this unreachable; never rely on it
            log.warning("provisioning peer=%s refused: no client certificate", peer)
            return None
        # Both checked here too: a reload may have changed them while this
        # connection was in its handshake (accepted under the old list).
        why = self._refusal(conn.peername, der)
        if why is not None:
            log.warning("provisioning peer=%s refused: %s", peer, why)
            return None
        return _ProvSession(self, conn, der)

    @staticmethod
    def _log_result(
        req: ProvRequest,
        peer: str,
        status: int,
        reason: str | None = None,
        note: str = "",
        mn_id: str | None = None,
    ) -> None:
        # A confirmed operation at DEBUG: the HA already writes one INFO
        # line per installed SA (issue 9: one line per bootstrap); every
        # refusal and failure at INFO.
        if mn_id is None:
            mn_id = req.issued.sa.mn_id if req.issued is not None else "-"
        log.log(
            logging.DEBUG if status == OK else logging.INFO,
            "provisioning peer=%s op=%s spi=%s mn_id=%s ha_id=%s result=%d%s%s",
            peer,
            req.op.value,
            req.spi,
            mn_id,
            req.ha_id or "-",
            status,
            f" reason={reason}" if reason else "",
            f" ({note})" if note else "",
        )

    def _dispatch_now(
        self, req: ProvRequest, peer: str, peer_der: bytes = b""
    ) -> bytes | Coroutine[Any, Any, bytes]:
        """The response content when the operation completes at once, else a
        coroutine that gives it (bounded by ``cfg.timeout``; run in a Task)."""
        op = req.op
        withdraw: tuple[int, ...] = ()
        try:
            if op is ProvOp.INSTALL and self.on_install is not None:
                assert req.issued is not None
                withdraw = req.withdraw if self.install_withdraws else ()
                if withdraw:
                    pending = self.on_install(req.issued, req.ha_id, withdraw)
                else:
                    pending = self.on_install(req.issued, req.ha_id)
            elif op is ProvOp.WITHDRAW and self.on_withdraw is not None:
                assert req.spi is not None
                pending = self.on_withdraw(req.spi)
            else:
                return self._dispatch_other(req, peer, peer_der)
        except Exception as exc:
            return self._failed(req, peer, exc)
        if pending is not None:
            return self._finish(req, peer, pending, withdraw)
        return self._confirmed(req, peer, withdraw)

    def groups(self, req: ProvRequest) -> bool:
        """Whether ``req`` joins a burst answered by :meth:`answer_burst`."""
        if req.op is ProvOp.INSTALL:
            return self.on_install_many is not None
        return req.op is ProvOp.WITHDRAW and self.on_withdraw_many is not None

    def answer_burst(self, burst: list[tuple[int, ProvRequest]], peer: str) -> list[bytes]:
        """The answers (containers) to consecutive requests ``(identifier,
        request)`` of one operation that :meth:`groups`, made in one call."""
        withdraws: list[tuple[int, ...]] = []
        results: list[Exception | None]
        try:
            if burst[0][1].op is ProvOp.INSTALL:
                assert self.on_install_many is not None
                items: list[tuple[IssuedSA, str | None, tuple[int, ...]]] = []
                for _ident, req in burst:
                    assert req.issued is not None
                    withdraw = req.withdraw if self.install_withdraws else ()
                    items.append((req.issued, req.ha_id, withdraw))
                    withdraws.append(withdraw)
                results = self.on_install_many(items)
            else:
                assert self.on_withdraw_many is not None
                spis: list[int] = []
                for _ident, req in burst:
                    assert req.spi is not None
                    spis.append(req.spi)
                    withdraws.append(())
                results = self.on_withdraw_many(spis)
            if len(results) != len(burst):  # a callback's bug: outcome unknown
                raise RuntimeError(f"{len(results)} results for {len(burst)} requests")
        except Exception as exc:
            results = [exc] * len(burst)
            withdraws = [()] * len(burst)
        out: list[bytes] = []
        for (ident, req), withdraw, failure in zip(burst, withdraws, results, strict=True):
            content = (
                self._confirmed(req, peer, withdraw)
                if failure is None
                else self._failed(req, peer, failure)
            )
            out.append(encode_container(ident, content))
        return out

    def _confirmed(self, req: ProvRequest, peer: str, withdraw: tuple[int, ...]) -> bytes:
        self._log_result(req, peer, OK, note=f"withdrew {len(withdraw)}" if withdraw else "")
        return encode_response(OK, withdrawn=withdraw)

    def _failed(self, req: ProvRequest, peer: str, exc: BaseException) -> bytes:
        if isinstance(exc, ProvisioningRefused):
            # Refused before anything changed: 400, so the HAC knows the
            # older SAs of a superseding install are still live here.  The
            # HA's own refusal messages name fields and SPIs, never keys.
            self._log_result(req, peer, BAD_REQUEST, REASON_REFUSED, str(exc))
            return encode_response(BAD_REQUEST, reason=REASON_REFUSED)
        # Outcome unknown.  Only the class name: a careless callback's message
        # could hold a key.
        self._log_result(req, peer, INTERNAL_ERROR, REASON_INTERNAL, type(exc).__name__)
        return encode_response(INTERNAL_ERROR, reason=REASON_INTERNAL)

    async def _finish(
        self, req: ProvRequest, peer: str, pending: Awaitable[None], withdraw: tuple[int, ...]
    ) -> bytes:
        try:
            async with asyncio.timeout(self.cfg.timeout):
                await pending
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(req, peer, exc)
        return self._confirmed(req, peer, withdraw)

    async def _dispatch_other(self, req: ProvRequest, peer: str, peer_der: bytes = b"") -> bytes:
        """Pull, and any operation this server has no callback for (400)."""
        spi = req.spi
        mn_id = req.issued.sa.mn_id if req.issued is not None else "-"

        def done(status: int, reason: str | None = None, note: str = "") -> None:
            self._log_result(req, peer, status, reason, note, mn_id)

        try:
            if req.op is ProvOp.PULL and self.on_pull is not None:
                assert spi is not None
                if self.pull_names is not None:
                    names = self.pull_names(req.ha_id)
                    try:
                        if names is None:
                            raise CertificateError(f"no HA {req.ha_id!r} is configured")
                        if not names:
                            raise CertificateError(f"HA {req.ha_id!r} has no name to prove")
                        check_client_names(peer_der, names)
                    except CertificateError as exc:
                        # Same answer as an unknown SPI: no oracle for other HAs.
                        done(BAD_REQUEST, REASON_UNKNOWN_SPI, f"ha-id not proven: {exc}")
                        return encode_response(BAD_REQUEST, reason=REASON_UNKNOWN_SPI)
                async with asyncio.timeout(self.cfg.timeout):
                    issued = await self.on_pull(spi, req.ha_id)
                if issued is None:
                    done(BAD_REQUEST, REASON_UNKNOWN_SPI)
                    return encode_response(BAD_REQUEST, reason=REASON_UNKNOWN_SPI)
                mn_id = issued.sa.mn_id
                done(OK)
                return encode_response(OK, issued)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(req, peer, exc)
        done(BAD_REQUEST, REASON_UNSUPPORTED_OP)
        return encode_response(BAD_REQUEST, reason=REASON_UNSUPPORTED_OP)


class _ProvSession:
    """One client's requests on one connection (a ``TlsHandler``), answered in order.

    Requests that arrived together (a pipelining client) are worked through
    in one go: each one whose operation completes at once is answered
    without a Task, and their answers leave in one write (issue 9: one
    send, one TLS record, one wake-up of the client for a burst).  An
    operation that must wait runs in a Task while the connection is working
    (reading paused, no deadline, not evictable); the answers before it are
    written first, and the requests after it wait here.
    """

    def __init__(self, server: ProvisioningServer, conn: TlsConnection, peer_der: bytes) -> None:
        self._server = server
        self._conn = conn
        self._peer = conn.peer
        self._der = peer_der
        self._decoder = ContainerDecoder()
        self._ids = IdentifierSequence()
        self._queue: deque[Container] = deque()
        self._task: asyncio.Task[None] | None = None
        self._revoked = False  # a reload no longer admits this client: closing
        server._sessions.add(self)

    @property
    def peername(self) -> Any:
        return self._conn.peername

    @property
    def peer_der(self) -> bytes:
        return self._der

    def revoke(self, why: str) -> None:
        """Closed for a reload's new access lists: now, or once the
        operation under way has been answered (the requests queued behind
        it are not worked on: the client sees the connection close under
        them, as after any failure, and its MNs get their 504)."""
        log.warning("provisioning peer=%s closed by the reload: %s", self._peer, why)
        self._revoked = True
        self._queue.clear()
        if self._task is None:
            self._conn.close()

    def data_received(self, data: bytes) -> None:
        try:
            containers = self._decoder.feed(data)
        except ContainerError as exc:
            log.info("provisioning peer=%s op=? result=400 (%s)", self._peer, exc)
            self._queue.clear()
            self._conn.close(
                encode_container(exc.identifier, _malformed()) if exc.identifier else b""
            )
            return
        if self._revoked:
            return  # closing: the answer under way is the last
        self._queue.extend(containers)
        if self._task is None:
            self._next()

    def eof_received(self) -> None:
        try:
            self._decoder.eof()
        except TruncatedError as exc:
            log.info("provisioning peer=%s: %s", self._peer, exc)
        if self._task is None:
            self._conn.close()

    def connection_lost(self, reason: str) -> None:
        if reason not in (CLOSED, PEER_CLOSED, IDLE_TIMEOUT):
            log.info("provisioning peer=%s connection ended: %s", self._peer, reason)
        self._server._sessions.discard(self)

    def cancel(self) -> asyncio.Task[None] | None:
        task = self._task
        if task is not None:
            task.cancel()
        return task

    def _next(self) -> None:
        """Answer the queued requests, then wait for more."""
        out: list[bytes] = []
        server = self._server
        # Consecutive requests of one operation (installs, or withdrawals),
        # committed together.
        burst: list[tuple[int, ProvRequest]] = []
        while self._queue:
            c = self._queue.popleft()
            try:
                self._ids.check_request(c.identifier)
                req = decode_request(c.content)
            except WireError as exc:
                log.info("provisioning peer=%s op=? result=400 (%s)", self._peer, exc)
                self._queue.clear()
                if burst:
                    out.extend(server.answer_burst(burst, self._peer))
                out.append(encode_container(c.identifier, _malformed()))
                self._conn.close(b"".join(out))
                return
            if burst and req.op is not burst[0][1].op:
                out.extend(server.answer_burst(burst, self._peer))
                burst = []
            if server.groups(req):
                burst.append((c.identifier, req))
                continue
            result = server._dispatch_now(req, self._peer, self._der)
            if isinstance(result, bytes):
                out.append(encode_container(c.identifier, result))
                if self._conn.closing:
                    return
                continue
            if out:
                self._conn.write(b"".join(out))
            self._conn.begin_work()  # no in-progress cap here: always True
            self._task = asyncio.create_task(self._answer(c.identifier, result))
            return
        if burst:
            out.extend(server.answer_burst(burst, self._peer))
        if out:
            self._conn.write(b"".join(out))
        self._conn.await_request()

    async def _answer(self, identifier: int, work: Coroutine[Any, Any, bytes]) -> None:
        try:
            content = await work
        finally:
            self._task = None
        if self._conn.closing:
            return
        if self._revoked:
            self._conn.close(encode_container(identifier, content))
            return
        self._conn.write(encode_container(identifier, content))
        self._next()


def _malformed() -> bytes:
    return encode_response(BAD_REQUEST, reason=REASON_MALFORMED)


# ------------------------------------------------------------------- client


class _Connection:
    """One client TLS connection: pipelined exchanges, Identifier 1, 2, 3, ...

    Requests are written as they come, without waiting for the answers to
    earlier ones (up to the client's ``pipeline`` depth); the server answers
    them in order (``_ProvSession``), each response carrying its request's
    Identifier, so the n-th response received belongs to the n-th request
    sent.  Responses are taken as they arrive (``TlsClient.on_event``), each
    completing its request's future: no reader task, one wake-up per answer.
    """

    def __init__(self, tls: TlsClient, on_change: Callable[[], None]) -> None:
        self.tls = tls
        self.ids = IdentifierSequence()
        self.decoder = ContainerDecoder()
        self.loop = asyncio.get_running_loop()
        self.waiting: deque[tuple[int, asyncio.Future[bytes]]] = deque()
        self.failed = False
        self.on_change = on_change  # a request finished, or this connection failed
        self._busy = False
        self._again = False
        self._unsent: list[bytes] = []  # requests of this turn of the loop (``submit``)
        tls.on_event = self._on_event

    def accepting(self) -> bool:
        """Can carry one more request (room in the pipeline aside)."""
        return (
            not self.failed
            and self.loop is asyncio.get_running_loop()  # a transport is bound to its loop
            and self.ids.last < IDENTIFIER_MAX
            and self.tls.open
        )

    def submit(self, content: bytes) -> asyncio.Future[bytes]:
        """Send one request; the future gets its response's content.

        The request leaves at the end of this turn of the event loop, with
        every other request submitted in it: one TLS record and one send for
        a burst of installs (issue 9), and one wake-up of the server.
        """
        identifier = self.ids.next_identifier()
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self.waiting.append((identifier, fut))
        self._unsent.append(encode_container(identifier, content))
        if len(self._unsent) == 1:
            self.loop.call_soon(self._send)
        return fut

    def _send(self) -> None:
        out, self._unsent = self._unsent, []
        if self.failed or not out:
            return  # their futures failed with the connection
        try:
            self.tls.write(b"".join(out))
        except BaseException as exc:
            self.fail(exc)

    def _on_event(self) -> None:
        # take() may pump records held back, which calls back here: loop
        # instead of recursing.
        if self._busy:
            self._again = True
            return
        self._busy = True
        try:
            self._again = True
            while self._again and not self.failed:
                self._again = False
                self._take()
        except BaseException as exc:
            self.fail(exc)
        finally:
            self._busy = False

    def _take(self) -> None:
        data = self.tls.take()
        if data:
            for c in self.decoder.feed(data):
                if not self.waiting:
                    raise ContainerError("identifier", "a response to no request")
                identifier, fut = self.waiting.popleft()
                self.ids.check_response(c.identifier, identifier)
                if not fut.done():  # not given up on (its caller's timeout)
                    fut.set_result(c.content)
                self.on_change()
        if self.tls.error is not None:
            raise self.tls.error
        if self.tls.eof and not self.tls.buffered:
            self.decoder.eof()  # TruncatedError if it ended inside a container
            if self.waiting:
                raise ConnectionResetError("closed by the peer without a response")

    def fail(self, exc: BaseException) -> None:
        """The connection is unusable: close it; every request still waiting
        on it fails with ``exc``."""
        first = not self.failed
        self.failed = True
        self.close()
        while self.waiting:
            _, fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if first:
            self.on_change()

    def close(self) -> None:
        self.tls.close()  # close_notify, then TCP close; not awaited on error paths


# A cancellation this long before a request's deadline is its caller's, not
# the request's own timeout (asyncio runs a timer up to its clock's
# resolution early).
CANCEL_MARGIN = 0.01  # seconds


class ConnectionFailed(ProvisioningFailed):
    """The connection or its handshake failed before any request was sent
    (not a certificate refusal): the request may try once more."""


class ProvisioningClient:
    """Client of a :class:`ProvisioningServer`: pipelined requests on kept connections.

    A request goes on the open connection with the fewest requests in
    flight, written at once even while earlier ones wait for their answers
    (up to ``pipeline`` per connection: issue 9, one HA connection carries a
    burst of installs without a round trip each); a new connection is made
    only when none is open or all are full, ``max_connections`` at most.
    Connections are kept for the next request (``keep_idle``), since a TLS
    handshake costs far more than an exchange.  A request waits for room
    within its timeout.  A request that finds its kept connection closed by
    the server meanwhile (its idle timeout) is sent once more on a fresh
    connection -- every operation is idempotent (install of the same SA,
    withdraw, pull) -- and so is one whose fresh connection failed before
    its handshake completed (the server may have evicted it for a newcomer);
    once per request in all.  ``pipeline = 1`` is lockstep, for a server that reads
    one request at a time.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        server_name: str | None,
        ssl_context: ssl.SSLContext,
        peer_label: str = "HA",
        max_connections: int = MAX_CONNECTIONS,
        keep_idle: bool = True,
        pipeline: int = PIPELINE,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections: must be at least 1")
        if pipeline < 1:
            raise ValueError("pipeline: must be at least 1")
        self.host = host
        self.port = port
        self.server_name = server_name
        self.ssl_context = ssl_context
        self.peer_label = peer_label
        self.max_connections = max_connections
        self.keep_idle = keep_idle
        self.pipeline = pipeline
        self._conns: list[_Connection] = []
        self._dialing = 0  # connections being made
        self._joining = 0  # requests waiting for one of them
        self._room: list[asyncio.Future[None]] = []  # requests waiting for room
        self.stats = {"connects": 0, "requests": 0, "retries": 0}

    async def request(self, content: bytes, timeout: float) -> ProvResponse:
        """Send one request and return the decoded response.

        Raises ``TimeoutError`` when no response came within ``timeout``
        (connect and handshake included) and :class:`ProvisioningFailed`
        (a ``ConnectionError``) for a refused or failed connection, a TLS or
        certificate failure, or a malformed response.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        async with asyncio.timeout(timeout):
            self.stats["requests"] += 1
            retry = True
            while True:
                conn = self._pick()
                fresh = conn is None
                if conn is None:
                    if self._joining < self._dialing * self.pipeline:
                        # A connection is on its way with room: wait for it.
                        self._joining += 1
                        try:
                            await self._wait_for_room()
                        finally:
                            self._joining -= 1
                        continue
                    if len(self._open()) + self._dialing >= self.max_connections:
                        await self._wait_for_room()
                        continue
                    try:
                        conn = await self._connect()
                    except ConnectionFailed:
                        # Nothing was sent: e.g. the server evicted the
                        # handshake to make room (a connect flood).  Once more.
                        if not retry:
                            raise
                        retry = False
                        self.stats["retries"] += 1
                        continue
                try:
                    return await self._exchange(conn, content, deadline)
                except ProvisioningFailed as exc:
                    if (
                        fresh
                        or not retry
                        or not isinstance(exc.__cause__, ConnectionError | ssl.SSLError)
                    ):
                        raise
                    # The server closed the kept connection meanwhile (or an
                    # earlier request on it failed): once more, on another.
                    retry = False
                    self.stats["retries"] += 1

    def snapshot(self) -> dict[str, int]:
        """Counters and connection state, for an operator (``mipsec status``)."""
        return {
            **self.stats,
            "open": sum(1 for c in self._conns if c.accepting()),
            "in_flight": sum(len(c.waiting) for c in self._conns),
        }

    async def aclose(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.tls.closed, 1)

    def _open(self) -> list[_Connection]:
        """The connections that take requests; the others are closed once drained."""
        open_ = [c for c in self._conns if c.accepting()]
        if len(open_) < len(self._conns):
            for c in self._conns:
                if not c.accepting() and not c.waiting:
                    c.close()
            self._conns = [c for c in self._conns if c.accepting() or c.waiting]
        return open_

    def _pick(self) -> _Connection | None:
        best: _Connection | None = None
        for conn in self._open():
            if len(conn.waiting) < self.pipeline and (
                best is None or len(conn.waiting) < len(best.waiting)
            ):
                best = conn
        return best

    async def _wait_for_room(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room.append(fut)
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._room.remove(fut)

    def _changed(self) -> None:
        """A request finished or a connection failed or came: let waiters look again."""
        room, self._room = self._room, []
        for fut in room:
            if not fut.done():
                fut.set_result(None)

    async def _exchange(self, conn: _Connection, content: bytes, deadline: float) -> ProvResponse:
        fut = conn.submit(content)
        try:
            raw = await fut
            response = decode_response(raw)
        except BaseException as exc:
            if (
                isinstance(exc, asyncio.CancelledError)
                and asyncio.get_running_loop().time() < deadline - CANCEL_MARGIN
            ):
                # The caller gave up before this request's own timeout (its
                # MN went away, a revoke): the connection is sound, and its
                # answer, when it comes, is skipped in its place (``_take``).
                # Failing the connection failed every other request on it --
                # the one that opened it with no retry, its MN's older SA
                # withdrawn -- which any MN could cause by leaving at the
                # right moment (found in review).
                raise
            # Its own timeout, a failed connection or a malformed response:
            # this connection is done (an HA that does not answer in time,
            # or whose order of answers can no longer be trusted).
            conn.fail(ConnectionResetError("an earlier request on this connection failed"))
            if isinstance(exc, ConnectionError | ssl.SSLError | OSError):
                raise ProvisioningFailed(f"{self._who()}: connection failed: {exc!r}") from exc
            if isinstance(exc, WireError):
                raise ProvisioningFailed(f"{self._who()}: malformed response: {exc}") from exc
            raise
        if not self.keep_idle and not conn.waiting:
            conn.close()
        return response

    async def _connect(self) -> _Connection:
        self.stats["connects"] += 1
        self._dialing += 1
        try:
            try:
                tls = await TlsClient.connect(
                    self.host, self.port, self.ssl_context, self.server_name or self.host
                )
            except (ssl.SSLError, OSError) as exc:
                # ssl.SSLCertVerificationError included: chain or stdlib name check.
                failed = (
                    ProvisioningFailed
                    if isinstance(exc, ssl.SSLCertVerificationError)
                    else ConnectionFailed
                )
                raise failed(f"{self._who()}: cannot connect: {exc!r}") from None
            conn = _Connection(tls, self._changed)
            try:
                der = tls.peercert_der()
                if not der:
                    raise CertificateError("the server sent no certificate")
                peername = tls.peername
                # PROFILE §1 SAN rules, checked by hand whatever the stdlib checked.
                check_hac_certificate(
                    der,
                    server_name=self.server_name,
                    connected_ip=peername[0] if peername else None,
                )
            except CertificateError as exc:
                conn.close()
                why = str(exc).removeprefix("HAC certificate: ")
                raise ProvisioningFailed(f"{self._who()}: certificate refused: {why}") from None
        finally:
            self._dialing -= 1
            self._changed()
        self._conns.append(conn)
        return conn

    def _who(self) -> str:
        return f"{self.peer_label} {self.host}:{self.port}"


# --------------------------------------------------------------------- pull


# The HA's pull contexts: (ca, cert, key) -> what the files held when it was
# built, and the context.  A handful at most (one [pull] table, changed by
# reloads); past PULL_CONTEXTS_MAX they are all dropped and built again.
_pull_contexts: dict[tuple[str, str, str], tuple[FileDigests, ssl.SSLContext]] = {}
PULL_CONTEXTS_MAX = 4


def _pull_context(cfg: PullConfig) -> ssl.SSLContext:
    """The TLS client context of a pull, built again only when ``ca``,
    ``cert`` or ``key`` hold something else than it was built from.

    Each pull reads its files as they are now, as before (a renewed
    certificate is used from the next pull on), but hashes them instead of
    building a context from them: a build (chain, key, CA bundle parsed)
    cost ~1.3 ms of the HA's event loop per pull, against a few tens of µs
    for the digest -- what bounds how fast an HA that lost its store pulls
    its MNs back ([pull] rate).  A file that cannot be read fails the pull,
    naming the key, as the build did."""
    entries = (("pull.ca", cfg.ca), ("pull.cert", cfg.cert), ("pull.key", cfg.key))
    key = (os.fspath(cfg.ca), os.fspath(cfg.cert), os.fspath(cfg.key))
    held = _pull_contexts.get(key)
    if held is not None and not held[0].changed():
        return held[1]
    digests = FileDigests(entries)  # before the build: see core/filedigest.py
    context = client_context(cfg.ca, cfg.cert, cfg.key)
    if len(_pull_contexts) >= PULL_CONTEXTS_MAX:
        _pull_contexts.clear()
    _pull_contexts[key] = (digests, context)
    return context


async def pull_sa(cfg: PullConfig, spi: int, ha_id: str) -> IssuedSA | None:
    """The HA's pull of an SPI it does not know (PROFILE §9).

    Returns the SA, or None when the HAC answers ``unknown-spi`` (it holds no
    live SA of that SPI for ``ha_id``).  Raises ``TimeoutError`` or
    :class:`ProvisioningFailed` (a ``ConnectionError``).  One connection per
    pull: pulls are rare (an HA restarted without a shared store).
    """
    client = ProvisioningClient(
        cfg.host,
        cfg.port,
        server_name=cfg.server_name,
        ssl_context=_pull_context(cfg),
        peer_label="HAC",
        max_connections=1,
        keep_idle=False,
    )
    try:
        response = await client.request(encode_pull(spi, ha_id), cfg.timeout)
    finally:
        await client.aclose()
    if response.status == OK:
        if response.issued is None or response.issued.sa.spi != spi:
            raise ProvisioningFailed(f"HAC answered a pull of spi={spi} without that SA")
        return response.issued
    if response.status == BAD_REQUEST and response.reason == REASON_UNKNOWN_SPI:
        return None
    raise ProvisioningFailed(
        f"HAC refused the pull of spi={spi}: {response.status} {response.reason or ''}".strip(),
        response.status,
    )
