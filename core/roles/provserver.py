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
import logging
import os
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from cryptography import x509

from mipsec.core.config import ProvisioningListener, PullConfig
from mipsec.core.errors import (
    CertificateError,
    ContainerError,
    ListenError,
    TruncatedError,
    WireError,
)
from mipsec.core.model import IssuedSA
from mipsec.core.provisioning import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    OK,
    REASON_INTERNAL,
    REASON_MALFORMED,
    REASON_UNKNOWN_SPI,
    REASON_UNSUPPORTED_OP,
    ProvisioningFailed,
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
)
from mipsec.core.tls import (
    check_hac_certificate,
    hac_server_context,
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

# (issued, ha_id), and with ``install_withdraws`` a third argument: the SPIs
# of the request's prov-withdraw (core/provisioning.py), if it has any.
OnInstall = Callable[..., Awaitable[None]]
OnWithdraw = Callable[[int], Awaitable[None]]
OnPull = Callable[[int, str], Awaitable[IssuedSA | None]]

StrPath = str | os.PathLike[str]

__all__ = [
    "MAX_CONNECTIONS",
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
    if not wanted.intersection(dns):
        raise CertificateError(f"client certificate: no dNSName in {sorted(wanted)} (has {dns})")


# ------------------------------------------------------------------- server


class ProvisioningServer:
    """Mutual-TLS listener serving the operations it has a callback for.

    An operation without a callback (e.g. install on the HAC's pull server)
    gets 400 ``unsupported-op``; a malformed request gets 400 ``malformed``
    and the connection is closed; other connections are unaffected.
    Callbacks are bounded by ``cfg.timeout`` and a failing one gives 500.

    Connections are those of core/roles/tlsserver.py: ``cfg.timeout`` bounds
    the handshake, the wait for a request and each request (first octet to
    last), and ``cfg.max_connections`` caps them all, the longest-waiting one
    evicted for a newcomer, so idle or trickling peers cannot lock the HAC out.
    """

    def __init__(
        self,
        cfg: ProvisioningListener,
        *,
        on_install: OnInstall | None = None,
        on_withdraw: OnWithdraw | None = None,
        on_pull: OnPull | None = None,
        pull_names: Callable[[str], Sequence[str] | None] | None = None,
        install_withdraws: bool = False,
    ) -> None:
        """``pull_names(ha_id)`` gives the dNSName SANs the client certificate
        must carry to pull for that HA (None: no such HA): it binds the
        ``ha-id`` a puller claims to the certificate it authenticated with.
        ``install_withdraws``: ``on_install`` takes the SPIs of an install's
        ``prov-withdraw``; without it the header is ignored (and not echoed),
        so the HAC withdraws them one by one."""
        self.cfg = cfg
        self.install_withdraws = install_withdraws
        self.pull_names = pull_names
        self.on_install = on_install
        self.on_withdraw = on_withdraw
        self.on_pull = on_pull
        self.ssl_context = server_context(cfg)
        self.listener = TlsListener(
            self.ssl_context,
            self._session,
            Limits(
                handshake_timeout=cfg.timeout,
                request_timeout=cfg.timeout,
                idle_timeout=cfg.timeout,
                max_connections=cfg.max_connections,
            ),
            name="provisioning",
        )
        self.addresses: list[tuple[str, int]] = []
        self._sessions: set[_ProvSession] = set()

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
        if self.cfg.client_names:
            try:
                check_client_names(der, self.cfg.client_names)
            except CertificateError as exc:
                log.warning("provisioning peer=%s refused: %s", peer, exc)
                return None
        return _ProvSession(self, conn, der)

    async def _dispatch(self, req: ProvRequest, peer: str, peer_der: bytes = b"") -> bytes:
        spi, op = req.spi, req.op.value
        mn_id = req.issued.sa.mn_id if req.issued is not None else "-"

        def done(status: int, reason: str | None = None, note: str = "") -> None:
            # A confirmed operation at DEBUG: the HA already writes one INFO
            # line per installed SA (issue 9: one line per bootstrap);
            # every refusal and failure at INFO.
            log.log(
                logging.DEBUG if status == OK else logging.INFO,
                "provisioning peer=%s op=%s spi=%s mn_id=%s ha_id=%s result=%d%s%s",
                peer,
                op,
                spi,
                mn_id,
                req.ha_id or "-",
                status,
                f" reason={reason}" if reason else "",
                f" ({note})" if note else "",
            )

        try:
            # asyncio.timeout, not wait_for: no Task (and no extra turn of the
            # loop) around callbacks that nearly always complete at once.
            if req.op is ProvOp.INSTALL and self.on_install is not None:
                assert req.issued is not None
                withdraw = req.withdraw if self.install_withdraws else ()
                async with asyncio.timeout(self.cfg.timeout):
                    if withdraw:
                        await self.on_install(req.issued, req.ha_id, withdraw)
                    else:
                        await self.on_install(req.issued, req.ha_id)
                done(OK, note=f"withdrew {len(withdraw)}" if withdraw else "")
                return encode_response(OK, withdrawn=withdraw)
            if req.op is ProvOp.WITHDRAW and self.on_withdraw is not None:
                assert spi is not None
                async with asyncio.timeout(self.cfg.timeout):
                    await self.on_withdraw(spi)
                done(OK)
                return encode_response(OK)
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
            # Only the class name: a careless callback's message could hold a key.
            done(INTERNAL_ERROR, REASON_INTERNAL, type(exc).__name__)
            return encode_response(INTERNAL_ERROR, reason=REASON_INTERNAL)
        done(BAD_REQUEST, REASON_UNSUPPORTED_OP)
        return encode_response(BAD_REQUEST, reason=REASON_UNSUPPORTED_OP)


class _ProvSession:
    """One client's lockstep requests on one connection (a ``TlsHandler``).

    Requests are answered in order, one at a time: while an operation's
    callback runs the connection is working (reading paused, no deadline,
    not evictable); a request that arrived with the previous one waits here.
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
        server._sessions.add(self)

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
        """Answer the next queued request, or wait for one."""
        if not self._queue:
            self._conn.await_request()
            return
        c = self._queue.popleft()
        try:
            self._ids.check_request(c.identifier)
            req = decode_request(c.content)
        except WireError as exc:
            log.info("provisioning peer=%s op=? result=400 (%s)", self._peer, exc)
            self._queue.clear()
            self._conn.close(encode_container(c.identifier, _malformed()))
            return
        self._conn.begin_work()  # no in-progress cap here: always True
        self._task = asyncio.create_task(self._answer(c.identifier, req))

    async def _answer(self, identifier: int, req: ProvRequest) -> None:
        try:
            content = await self._server._dispatch(req, self._peer, self._der)
        finally:
            self._task = None
        if self._conn.closing:
            return
        self._conn.write(encode_container(identifier, content))
        self._next()


def _malformed() -> bytes:
    return encode_response(BAD_REQUEST, reason=REASON_MALFORMED)


# ------------------------------------------------------------------- client


class _Connection:
    """One client TLS connection: lockstep exchanges, Identifier 1, 2, 3, ..."""

    def __init__(self, tls: TlsClient) -> None:
        self.tls = tls
        self.ids = IdentifierSequence()
        self.decoder = ContainerDecoder()
        self.loop = asyncio.get_running_loop()

    def reusable(self) -> bool:
        return (
            self.loop is asyncio.get_running_loop()  # a transport is bound to its loop
            and self.ids.last < IDENTIFIER_MAX
            and self.tls.open
        )

    async def exchange(self, content: bytes) -> bytes:
        identifier = self.ids.next_identifier()
        self.tls.write(encode_container(identifier, content))
        while True:
            data = await self.tls.read()
            if not data:
                self.decoder.eof()  # TruncatedError if it ended inside a container
                raise ConnectionResetError("closed by the peer without a response")
            containers = self.decoder.feed(data)
            if containers:
                if len(containers) > 1 or self.decoder.buffered:
                    raise ContainerError("identifier", "more than one response to one request")
                self.ids.check_response(containers[0].identifier, identifier)
                return containers[0].content

    def close(self) -> None:
        self.tls.close()  # close_notify, then TCP close; not awaited on error paths


class ProvisioningClient:
    """Client of a :class:`ProvisioningServer` with a small connection pool.

    At most ``max_connections`` connections run at once, each carrying one
    lockstep exchange at a time; finished connections are kept for the next
    request (``keep_idle``), since a TLS handshake costs far more than an
    exchange.  A request waits for a free connection within its timeout.  A
    kept connection the server has meanwhile closed (its idle timeout) is
    detected and the request is sent once more on a fresh connection -- every
    operation is idempotent (install of the same SA, withdraw, pull).
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
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections: must be at least 1")
        self.host = host
        self.port = port
        self.server_name = server_name
        self.ssl_context = ssl_context
        self.peer_label = peer_label
        self.max_connections = max_connections
        self.keep_idle = keep_idle
        self._idle: list[_Connection] = []
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self.stats = {"connects": 0, "requests": 0, "retries": 0}

    async def request(self, content: bytes, timeout: float) -> ProvResponse:
        """Send one request and return the decoded response.

        Raises ``TimeoutError`` when no response came within ``timeout``
        (connect and handshake included) and :class:`ProvisioningFailed`
        (a ``ConnectionError``) for a refused or failed connection, a TLS or
        certificate failure, or a malformed response.
        """
        async with asyncio.timeout(timeout), self._semaphore():
            self.stats["requests"] += 1
            conn = self._take_idle()
            if conn is not None:
                try:
                    return await self._exchange(conn, content)
                except ProvisioningFailed as exc:
                    if not isinstance(exc.__cause__, ConnectionError | ssl.SSLError):
                        raise
                    # The server closed the idle connection meanwhile: retry fresh.
                    self.stats["retries"] += 1
            return await self._exchange(await self._connect(), content)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.tls.closed, 1)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:  # a semaphore binds to its loop
            self._slots = (loop, asyncio.Semaphore(self.max_connections))
        return self._slots[1]

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable():
                return conn
            conn.close()
        return None

    async def _exchange(self, conn: _Connection, content: bytes) -> ProvResponse:
        try:
            raw = await conn.exchange(content)
            response = decode_response(raw)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, ConnectionError | ssl.SSLError | OSError):
                raise ProvisioningFailed(f"{self._who()}: connection failed: {exc!r}") from exc
            if isinstance(exc, WireError):
                raise ProvisioningFailed(f"{self._who()}: malformed response: {exc}") from exc
            raise
        if self.keep_idle and conn.reusable():
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def _connect(self) -> _Connection:
        self.stats["connects"] += 1
        try:
            tls = await TlsClient.connect(
                self.host, self.port, self.ssl_context, self.server_name or self.host
            )
        except (ssl.SSLError, OSError) as exc:
            # ssl.SSLCertVerificationError included: chain or stdlib name check.
            raise ProvisioningFailed(f"{self._who()}: cannot connect: {exc!r}") from None
        conn = _Connection(tls)
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
        return conn

    def _who(self) -> str:
        return f"{self.peer_label} {self.host}:{self.port}"


# --------------------------------------------------------------------- pull


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
        ssl_context=client_context(cfg.ca, cfg.cert, cfg.key),
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
