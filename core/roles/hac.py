"""The HAC service: a thin asyncio shell around ``HacExchange``.

TLS per PROFILE §1 (context from ``mipsec.core.tls``), one exchange per
connection, and SA issuing + HA provisioning in between the Done request and
the final response.  One MN's bad input ends only its own connection.

Connections, their deadlines (handshake, idle, per request) and the cap on
them belong to the connection layer, core/roles/tlsserver.py; each one's
exchange is a :class:`_Session` that feeds the sans-I/O exchange straight
from ``data_received``: no stream reader, writer or task per connection.
Only the SA issue (which may wait for an HA) runs as a task, with reading
paused meanwhile; ``[hac] max_in_progress`` such issues at once, beyond
which the MN gets 503 with ``retry-after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pluggy

from mipsec.core import pluginmanager
from mipsec.core.authmethod import AuthMethod
from mipsec.core.config import HACConfig
from mipsec.core.hac_exchange import (
    INTERNAL_ERROR,
    TIMEOUT,
    UNAVAILABLE,
    Close,
    HacExchange,
    HacPolicy,
    IssueSA,
    Send,
)
from mipsec.core.hookspecs import (
    CredentialBackend,
    HASelector,
    HoAAllocator,
    PluginContext,
    ProvisioningTransport,
    SAStore,
)
from mipsec.core.issuer import new_sa, random_spi, utcnow
from mipsec.core.model import BootstrapData, HomeAgentInfo, IssuedSA
from mipsec.core.roles.provserver import ProvisioningServer
from mipsec.core.roles.tlsserver import Limits, TlsConnection, TlsListener
from mipsec.core.tls import hac_server_context, server_cb_octets

log = logging.getLogger("mipsec.hac")

SPI_DRAWS = 32  # collisions among 2^28 SPIs are rare; this bounds a pathological store
BUSY_RETRY_AFTER = 2  # seconds: saturation passes quickly, unlike "no HA available"


class IssueFailure(Exception):
    def __init__(self, status: int, reason: str, retry_after: datetime | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


class HacService:
    def __init__(
        self,
        cfg: HACConfig,
        *,
        config_file: str = "<memory>",
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        self.cfg = cfg
        self.pm = pm or pluginmanager.make_plugin_manager(cfg.plugins.disable)
        svc = cfg.hac
        self.ssl_context = hac_server_context(
            str(svc.cert), str(svc.key), strict_rfc6618=svc.strict_rfc6618
        )
        self.cb_octets = server_cb_octets(str(svc.cert))
        base = cfg.hac.cert.parent
        ctx = PluginContext(role="hac", base_dir=base, config_file=config_file)
        self.methods: Mapping[str, AuthMethod] = pluginmanager.registry(
            self.pm, "mipsec_auth_methods"
        )
        self.credentials: CredentialBackend = pluginmanager.create(
            self.pm,
            "mipsec_credential_backends",
            cfg.credentials.backend,
            cfg.credentials.options,
            ctx,
            key="credentials.backend",
        )
        self.store: SAStore = pluginmanager.create(
            self.pm,
            "mipsec_sa_stores",
            cfg.sa_store.backend,
            cfg.sa_store.options,
            ctx,
            key="sa_store.backend",
        )
        self.allocator: HoAAllocator = pluginmanager.create(
            self.pm,
            "mipsec_hoa_allocators",
            cfg.home_addresses.allocator,
            cfg.home_addresses.options,
            ctx,
            key="home_addresses.allocator",
        )
        self.selector: HASelector = pluginmanager.create(
            self.pm,
            "mipsec_ha_selectors",
            cfg.ha_selection.selector,
            cfg.ha_selection.options,
            ctx,
            key="ha_selection.selector",
        )
        self.has = tuple(
            HomeAgentInfo(h.id, h.address6, h.address4, h.port, h.transport, dict(h.options))
            for h in cfg.ha
        )
        # One transport per HA entry, keyed by ha_id: its options (address,
        # certificates) belong to that HA (PROFILE §9).
        self.transports: dict[str, ProvisioningTransport] = {}
        for i, h in enumerate(cfg.ha):
            self.transports[h.id] = pluginmanager.create(
                self.pm,
                "mipsec_provisioning_transports",
                h.transport,
                dict(h.options),
                ctx,
                key=f"ha[{i}]",
            )
        # HAs pull SAs for SPIs they do not know here (PROFILE §9).
        self._prov_server = (
            ProvisioningServer(
                cfg.provisioning, on_pull=self._on_pull, pull_names=self._ha_cert_names
            )
            if cfg.provisioning is not None
            else None
        )
        self.policy = HacPolicy(
            method_order=cfg.policy.methods,
            realm_methods={k.lower(): v for k, v in cfg.policy.realms.items()}
            or {"*": cfg.policy.methods},
            allowed_suites=cfg.policy.suites,
            max_scope=cfg.policy.max_scope,
        )
        # PROFILE §4: one random stand-in key per process for unknown mn-ids.
        self._standin = secrets.token_bytes(32)
        self._listener: TlsListener | None = None
        self._sessions: set[_Session] = set()
        self._expiry_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # background withdraws
        self.addresses: list[tuple[str, int]] = []
        self.stats: dict[str, int] = {"sessions": 0, "status_200": 0}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> list[tuple[str, int]]:
        svc = self.cfg.hac
        port = svc.port
        self._listener = TlsListener(
            self.ssl_context,
            lambda conn: _Session(self, conn),
            Limits(
                handshake_timeout=svc.handshake_timeout,
                request_timeout=svc.request_timeout,
                idle_timeout=svc.idle_timeout or svc.request_timeout,
                max_connections=svc.max_connections,
                max_in_progress=svc.max_in_progress,
            ),
            name="hac",
        )
        for host in svc.listen:
            try:
                bound = await self._listener.listen(host, port)
            except OSError as exc:
                if ":" in host and len(svc.listen) > 1:
                    log.warning("cannot listen on [%s]:%d: %s (skipped)", host, port, exc)
                    continue
                raise
            self.addresses.extend(bound)
            if port == 0 and bound:
                port = bound[0][1]  # same ephemeral port on every address if possible
        self._expiry_task = asyncio.create_task(self._expiry_loop())
        if self._prov_server is not None:
            await self._prov_server.start()
        for host, p in self.addresses:
            log.info("HAC listening on %s port %d (TLS)", host, p)
        return self.addresses

    async def serve_forever(self) -> None:
        if self._listener is not None:
            await self._listener.serve_forever()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        issuing = [t for t in (session.cancel() for session in list(self._sessions)) if t]
        if issuing:  # let cancelled issues clean up (store, withdraw) before the store closes
            await asyncio.wait(issuing, timeout=self.cfg.hac.provisioning_timeout)
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        if self._tasks:  # let pending withdraws finish: nothing half-provisioned
            await asyncio.wait(list(self._tasks), timeout=self.cfg.hac.provisioning_timeout)
        if self._listener is not None:
            await self._listener.aclose()
        if self._prov_server is not None:
            await self._prov_server.stop()
        for transport in self.transports.values():
            aclose = getattr(transport, "aclose", None)  # optional: pooled connections
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        self.store.close()
        self.credentials.close()

    # ------------------------------------------------------------ sessions

    def _final_logged(self, exch: HacExchange, status: int, peer: str) -> None:
        mn_id = exch.mn_id or "-"
        method = exch.method_name or "-"
        log.info("mn_id=%s peer=%s method=%s status=%d", mn_id, peer, method, status)
        if status == 200:
            self.stats["status_200"] += 1
        else:
            self.pm.hook.mipsec_auth_failed(mn_id=mn_id, method=method, status=status, peer=peer)

    # ------------------------------------------------------------ SA issuing

    async def _issue(self, exch: HacExchange, req: IssueSA, peer: str) -> Send:
        self.pm.hook.mipsec_mn_authenticated(mn_id=req.mn_id, method=req.method, peer=peer)
        try:
            issued = await self.issue_sa(req.mn_id, req.suite, req.scope)
        except IssueFailure as exc:
            log.warning("mn_id=%s: no SA: %s", req.mn_id, exc)
            return exch.fail(exc.status, exc.retry_after)
        except Exception:
            log.exception("mn_id=%s: internal error while issuing an SA", req.mn_id)
            return exch.fail(INTERNAL_ERROR)
        sa = issued.sa
        self.pm.hook.mipsec_sa_issued(
            spi=sa.spi,
            mn_id=sa.mn_id,
            suite=sa.suite.name,
            scope=sa.scope,
            validity_end=sa.validity_end,
            ha_id=sa.ha_id,
            peer=peer,
        )
        return exch.complete(issued)

    async def issue_sa(self, mn_id: str, suite: Any, scope: int) -> IssuedSA:
        """Allocate, store and provision one SA; nothing survives a failure."""
        now = utcnow()
        store: Any = self.store
        summary = getattr(store, "live_summary", None)
        if summary is not None:
            # Both views of the live SAs in one look at the store.
            live_by_ha, in_use = summary(now)
        else:
            live_by_ha, in_use = store.count_by_ha(now), None
        ha = self.selector.select(mn_id, self.has, live_by_ha)
        if ha is None:
            raise IssueFailure(UNAVAILABLE, "no HA available", _retry_after())
        if in_use is None:
            in_use = store.hoas_in_use(now)
        try:
            home = self.allocator.assign(mn_id, in_use)
        except LookupError as exc:
            raise IssueFailure(UNAVAILABLE, f"home address pool: {exc}", _retry_after()) from None
        bootstrap = BootstrapData(
            haa_ip6=ha.haa_ip6,
            haa_ip4=ha.haa_ip4,
            port=ha.port,
            ip6_hoa=home.ip6_hoa,
            ip4_hoa=home.ip4_hoa,
            ip6_hnp=home.ip6_hnp,
            ip4_hnp=home.ip4_hnp,
            dns_ip6=self.cfg.bootstrap.dns_ip6,
            dns_ip4=self.cfg.bootstrap.dns_ip4,
        )
        issued: IssuedSA | None = None
        for _ in range(SPI_DRAWS):
            sa = new_sa(
                spi=random_spi(),
                mn_id=mn_id,
                suite=suite,
                scope=scope,
                lifetime=self.cfg.policy.sa_lifetime,
                now=now,
                ha_id=ha.ha_id,
            )
            candidate = IssuedSA(sa, bootstrap)
            if self.store.add(candidate):
                issued = candidate
                break
        if issued is None:
            raise IssueFailure(INTERNAL_ERROR, "no free SPI")
        transport = self.transports[ha.ha_id]
        timeout = self.cfg.hac.provisioning_timeout
        try:
            async with asyncio.timeout(timeout):
                await transport.provision(ha, issued, timeout)
        except BaseException as exc:
            # Nothing half-provisioned survives: drop it from the store and
            # tell the HA to forget it in case it did install it.
            self.store.remove(issued.sa.spi)
            # The withdraw runs in the background so the MN's 504 is not
            # delayed by a second timeout against an HA that is already slow.
            self._background(self._withdraw(transport, ha, issued.sa.spi, timeout))
            if isinstance(exc, TimeoutError | ConnectionError | OSError):
                raise IssueFailure(TIMEOUT, f"HA {ha.ha_id} did not confirm: {exc!r}") from None
            raise
        return issued

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _withdraw(
        self, transport: ProvisioningTransport, ha: HomeAgentInfo, spi: int, timeout: float
    ) -> None:
        try:
            await asyncio.wait_for(transport.withdraw(ha, spi, timeout), timeout)
        except Exception as exc:
            log.info("withdraw of spi=%d from HA %s failed: %r", spi, ha.ha_id, exc)

    def _ha_cert_names(self, ha_id: str) -> list[str] | None:
        """The names an HA proves with its certificate: the ``server_name`` the
        HAC checks when it provisions to that HA (PROFILE §9 pull)."""
        for h in self.cfg.ha:
            if h.id == ha_id:
                name = h.options.get("server_name")
                return (
                    [str(name)]
                    if name
                    else list(self.cfg.provisioning.client_names if self.cfg.provisioning else [])
                )
        return None

    async def _on_pull(self, spi: int, ha_id: str) -> IssuedSA | None:
        """PROFILE §9 pull: a live SA, and only to the HA it was provisioned to."""
        issued = self.store.get(spi, utcnow())
        if issued is not None and issued.sa.ha_id != ha_id:
            # Answered exactly like an unknown SPI: no oracle for other HAs' SPIs.
            log.warning(
                "pull of spi=%d by ha_id=%s refused: held by %s", spi, ha_id, issued.sa.ha_id
            )
            return None
        return issued

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.hac.expiry_interval)
            self.expire_now()

    def expire_now(self) -> int:
        expired = self.store.expire(utcnow())
        for issued in expired:
            sa = issued.sa
            self.pm.hook.mipsec_sa_expired(spi=sa.spi, mn_id=sa.mn_id, validity_end=sa.validity_end)
        return len(expired)


def _retry_after(seconds: int = 30) -> datetime:
    from datetime import timedelta

    return (utcnow() + timedelta(seconds=seconds)).replace(microsecond=0)


def _busy(exch: HacExchange) -> Send:
    """The final response when ``max_in_progress`` requests are worked on
    already: 503 with ``retry-after`` (PROFILE §6) rather than a queue."""
    return exch.fail(UNAVAILABLE, _retry_after(BUSY_RETRY_AFTER))


class _Session:
    """One MN's MHAuth exchange on one TLS connection (a :class:`TlsHandler`).

    Made once the TLS handshake is done; the connection layer
    (core/roles/tlsserver.py) owns the socket, the deadlines and the cap.
    The session tells it where the exchange stands: a response sent means
    the next request is awaited, an SA issue means the server is working
    (no deadline, no eviction, reading paused: the MN must wait).
    """

    def __init__(self, service: HacService, conn: TlsConnection) -> None:
        self._svc = service
        self._conn = conn
        self._issuing: asyncio.Task[None] | None = None
        self._peer = conn.peer
        self._done = False  # answered or closing: further input is ignored
        self._exch = HacExchange(
            cb_octets=service.cb_octets,
            methods=service.methods,
            credentials=service.credentials,
            standin_key=service._standin,
            policy=service.policy,
            method_options=service.cfg.methods,
        )
        service._sessions.add(self)
        service.stats["sessions"] += 1

    # ------------------------------------------------------------ TlsHandler

    def data_received(self, data: bytes) -> None:
        if not self._done:
            self._handle(self._exch.receive_data(data))

    def eof_received(self) -> None:
        if not self._done:
            self._handle(self._exch.receive_eof())

    def connection_lost(self, reason: str) -> None:
        if not self._done:
            # Ended before the final response: a timeout, an eviction, a reset.
            level = logging.INFO if self._exch.mn_id is not None else logging.DEBUG
            log.log(
                level, "mn_id=%s peer=%s ended: %s", self._exch.mn_id or "-", self._peer, reason
            )
        self._done = True
        self._svc._sessions.discard(self)

    # ------------------------------------------------------------ internals

    def cancel(self) -> asyncio.Task[None] | None:
        """Service stop: abandon an SA issue in progress (returned) and close."""
        task = self._issuing
        if task is not None:
            task.cancel()
        self._close()
        return task

    def _close(self) -> None:
        self._done = True
        self._conn.close()  # close_notify, then TCP close (PROFILE §1 "closing")

    def _handle(self, events: list[Send | Close | IssueSA]) -> None:
        for ev in events:
            if isinstance(ev, IssueSA):
                # The exchange stops at IssueSA (nothing follows it).
                if not self._conn.begin_work():
                    self._send(_busy(self._exch))
                    return
                self._issuing = asyncio.create_task(self._issue(ev))
                return
            if isinstance(ev, Send):
                if self._send(ev):
                    return
            else:
                log.info("%s: closing without response: %s", self._peer, ev.reason)
                self._close()
                return

    def _send(self, ev: Send) -> bool:
        """Write one response; True when the connection closes after it."""
        if not ev.close:
            self._conn.write(ev.data)
            self._conn.await_request()  # the request deadline starts again at its first octet
            if ev.status is not None:
                self._svc._final_logged(self._exch, ev.status, self._peer)
            return False
        # Final response and close_notify leave together, in one TCP segment.
        self._done = True
        self._conn.close(ev.data)
        # Logged once the response is on its way: the MN need not wait for it.
        if ev.status is not None:
            self._svc._final_logged(self._exch, ev.status, self._peer)
        return True

    async def _issue(self, req: IssueSA) -> None:
        try:
            ev = await self._svc._issue(self._exch, req, self._peer)
        except Exception:  # _issue answers every failure itself; this is a bug
            log.exception("%s: SA issue failed", self._peer)
            self._close()
            return
        finally:
            self._issuing = None
        if self._done or self._conn.closing:
            # The MN went away meanwhile (the SA stays issued, as before).
            log.info("connection from %s ended before the final response", self._peer)
            return
        self._send(ev)
