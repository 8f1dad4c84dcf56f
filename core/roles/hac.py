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
import heapq
import itertools
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, TypeVar

import pluggy

from mipsec.core import certexpiry, pluginmanager, servercert
from mipsec.core.authmethod import AuthMethod, Overloaded, ServerMethodFactory
from mipsec.core.certexpiry import certificates, merged, prefixed
from mipsec.core.clockstep import ClockWatch, step_line
from mipsec.core.config import HACConfig
from mipsec.core.control import revocations_path
from mipsec.core.errors import ConfigError, ListenError, StoreBusyError
from mipsec.core.hac_exchange import (
    INTERNAL_ERROR,
    TIMEOUT,
    UNAUTHORIZED,
    UNAVAILABLE,
    AwaitMethod,
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
from mipsec.core.outage import Outage, cause
from mipsec.core.pacing import in_paced_batches
from mipsec.core.provisioning import ProvisioningRefused
from mipsec.core.revocation import RevocationList
from mipsec.core.roles.provserver import ProvisioningServer
from mipsec.core.roles.tlsserver import Limits, TlsConnection, TlsListener
from mipsec.core.servercert import ChannelBindings, ServerCert
from mipsec.core.sqlitetx import loop_writer
from mipsec.core.startup_heap import collection_paused, freeze_heap, warm_hac_views

_T = TypeVar("_T")
log = logging.getLogger("mipsec.hac")

# Withdrawals an HA confirmed with the install of their successor are
# recorded in one batch per this many seconds (core/roles/hac.py _confirm_later).
CONFIRM_BATCH_S = 1.0
SPI_DRAWS = 32  # collisions among 2^28 SPIs are rare; this bounds a pathological store
BUSY_RETRY_AFTER = 2  # seconds: saturation passes quickly, unlike "no HA available"
# A group commit finding the store's write lock held by another process (a
# second HAC on the file, an operator's sqlite3 shell) tries again from the
# event loop -- after 2 ms, doubling up to 50 ms -- for up to 5 s (the wait a
# write had inside SQLite, which stalled every MN meanwhile), then answers
# its MNs 503.
STORE_BUSY_LIMIT = 5.0
STORE_BUSY_PAUSES = (0.002, 0.05)
# Another HAC's commits hold the lock for a millisecond now and then: only a
# lock held this long (or until the group fails) is worth a log line.
STORE_BUSY_QUIET = 1.0


class IssueFailure(Exception):
    def __init__(self, status: int, reason: str, retry_after: datetime | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


@dataclass(slots=True)
class _Prepared:
    """What an SA needs before its store write (``HacService._prepare``)."""

    ha: HomeAgentInfo
    bootstrap: BootstrapData
    transport: Any
    # The MN's SAs (on any HA) the new SA supersedes, as the store showed them
    # when it was prepared: withdrawn once its 200 has left (``deliver``),
    # left alone if it has not.
    supersedes: tuple[int, ...] = ()


class _Owed:
    """The withdrawals this HAC owes one HA (``spi`` -> validity end, oldest
    first) and the one task that sends them (None when none runs)."""

    __slots__ = ("outage", "spis", "task")

    def __init__(self, ha_id: str) -> None:
        self.spis: dict[int, datetime] = {}
        self.task: asyncio.Task[None] | None = None
        self.outage = Outage(
            log,
            f"withdrawal from HA {ha_id}",
            f"retried with backoff up to {WITHDRAW_RETRY_MAX:g} s until it confirms",
        )


@dataclass(slots=True)
class _Stored:
    """An SA in the store, not yet provisioned (``HacService._store_now``)."""

    issued: IssuedSA
    ha: HomeAgentInfo
    transport: Any
    supersedes: tuple[int, ...]  # see _Prepared: touched only after its 200


# Withdrawals of retired SAs (superseded, revoked) are sent to each HA by one
# task per HA, up to WITHDRAW_BATCH at once on its pipelined connection,
# until the HA confirms or the SA's validity end passes.  A round in which
# every one failed (the HA unreachable) backs off, 0.5 s doubling up to
# WITHDRAW_RETRY_MAX, for the whole HA: 100,000 withdrawals owed to an HA
# that is down cost one attempt per interval and one log line per outage, not
# a task, a connection attempt and a line per SPI each interval.
WITHDRAW_RETRY_MIN = 0.5
WITHDRAW_RETRY_MAX = 30.0
WITHDRAW_BATCH = 64
# SAs expired per store call (``expire_some``): ~10-20 ms of the loop, then as
# long again for everything else before the next batch (core/pacing.py).
EXPIRE_BATCH = 500
# Withdrawals another HAC sharing the store owes and may never finish, taken
# over per sweep (``adopt_owed_withdrawals``); the rest at the next ones.
ADOPT_MAX = 4096


# The [hac] keys that make the MHAuth listener's Limits (a reload applies
# them: HacService.apply_limits); idle_timeout unset is request_timeout.
LISTENER_LIMITS = (
    "handshake_timeout",
    "request_timeout",
    "idle_timeout",
    "exchange_timeout",
    "max_connections",
    "max_in_progress",
    "per_source_rate",
    "per_source_burst",
)


def _limits(svc: Any) -> Limits:
    """The MHAuth listener's limits from ``[hac]``."""
    return Limits(
        handshake_timeout=svc.handshake_timeout,
        request_timeout=svc.request_timeout,
        idle_timeout=svc.idle_timeout or svc.request_timeout,
        max_connections=svc.max_connections,
        max_in_progress=svc.max_in_progress,
        per_source_rate=svc.per_source_rate or None,
        per_source_burst=svc.per_source_burst,
        exchange_timeout=svc.exchange_timeout,
    )


def reserved_addresses(cfg: HACConfig) -> tuple[IPv6Address | IPv4Address, ...]:
    """The addresses the HAC provisions to MNs as servers: HAs and DNS."""
    texts = [a for h in cfg.ha for a in (h.address6, h.address4)]
    texts += [cfg.bootstrap.dns_ip6, cfg.bootstrap.dns_ip4]
    return tuple(ip_address(t) for t in dict.fromkeys(texts) if t is not None)


class HacService:
    def __init__(
        self,
        cfg: HACConfig,
        *,
        config_file: str = "<memory>",
        pm: pluggy.PluginManager | None = None,
        check_only: bool = False,
    ) -> None:
        """``check_only``: build everything for ``mipsec check-config`` (plugins
        create no files); such a service is only ever stopped, never started."""
        self.cfg = cfg
        self.config_file = config_file
        self.pm = pm or pluginmanager.make_plugin_manager(cfg.plugins.disable)
        svc = cfg.hac
        # The MHAuth TLS certificate, its channel binding and what its files
        # held: a reload may swap it (``use_cert``) for new connections.
        self.bindings = ChannelBindings(
            servercert.load(svc.cert, svc.key, strict_rfc6618=svc.strict_rfc6618)
        )
        base = Path(config_file).resolve().parent if config_file != "<memory>" else svc.cert.parent
        # expiry_interval: read live (a reload may change it), e.g. by the
        # accounting back end, which waits that long for an expired SA's Stop.
        extra: dict[str, Any] = {"pm": self.pm, "expiry_interval": self._expiry_interval}
        if check_only:
            extra["check_only"] = True  # mipsec check-config: plugins create nothing
        ctx = PluginContext(role="hac", base_dir=base, config_file=config_file, extra=extra)
        self.plugin_ctx = ctx  # a reload builds the new plugin objects with it
        self.methods = self._method_factories(ctx)
        self.credentials: CredentialBackend = self.create_plugin("credentials", cfg)
        self.store: SAStore = pluginmanager.create(
            self.pm,
            "mipsec_sa_stores",
            cfg.sa_store.backend,
            cfg.sa_store.options,
            ctx,
            key="sa_store.backend",
        )
        self.allocator: HoAAllocator = self.create_plugin("home_addresses", cfg)
        self.selector: HASelector = self.create_plugin("ha_selection", cfg)
        self.has = tuple(
            HomeAgentInfo(h.id, h.address6, h.address4, h.port, h.transport, dict(h.options))
            for h in cfg.ha
        )
        self._ha_by_id = {h.ha_id: h for h in self.has}
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
        # Optional accounting: its @hookimpl event methods receive the SA events.
        self.accounting: Any = None
        if cfg.accounting is not None:
            self.accounting = pluginmanager.create(
                self.pm,
                "mipsec_accounting_backends",
                cfg.accounting.backend,
                cfg.accounting.options,
                ctx,
                key="accounting.backend",
            )
            self.pm.register(self.accounting, name="accounting")
        # HAs pull SAs for SPIs they do not know here (PROFILE §9).
        self._prov_server = (
            ProvisioningServer(
                cfg.provisioning, on_pull=self._on_pull, pull_names=self._ha_cert_names
            )
            if cfg.provisioning is not None
            else None
        )
        self.policy = hac_policy(cfg)
        # MNs refused with 401 after authenticating (``mipsec revoke``); read
        # once here, so a list that cannot be read fails the start.
        self.revocations = RevocationList(
            revocations_path(cfg, config_file), config_file=config_file
        )
        # PROFILE §4: one random stand-in key per process for unknown mn-ids.
        self._standin = secrets.token_bytes(32)
        self._listener: TlsListener | None = None
        self._sessions: set[_Session] = set()
        self._expiry_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # background withdraws
        self._withdrawing: set[int] = set()  # SPIs owed a withdrawal by this HAC now
        self._owed: dict[str, _Owed] = {}  # per HA id: its withdrawals and their task
        self._stopping = False
        self._issuing_spis: set[int] = set()  # SAs stored but not yet delivered (200)
        # Issuing SAs a newer SA of their MN superseded when its 200 left:
        # withdrawn once their own 200 has (``_supersede``), forgotten if
        # their issue fails.  Each is in ``_issuing_spis`` when added.
        self._withdraw_when_delivered: set[int] = set()
        # Issued SAs (installed, 200 not yet sent) -> the MN's SAs each
        # supersedes (``_prepare``): withdrawn by ``deliver``, dropped by a
        # rollback.
        self._supersedes: dict[int, tuple[int, ...]] = {}
        # Issue 9: the SAs issued in one event-loop turn are stored in one
        # transaction, one commit (``_commit_group``), with a store that can
        # group writes (``transaction()``: the SQLite and memory stores).
        self._grouped = callable(getattr(self.store, "transaction", None))
        # ... whose transaction() can be told not to wait for the write lock.
        self._loop_tx = loop_writer(self.store)
        # Looked up once: the SQLite store retires without unwrapping keys.
        self._retire_fast = getattr(self.store, "retire_record", None)
        self._group: list[tuple[str, Any, int, asyncio.Future[_Stored]]] = []
        self._group_handle: asyncio.Handle | None = None
        self._busy_since: float | None = None  # loop time the lock was first found held
        self._owed_seen: set[int] = set()  # unconfirmed withdrawals at the last sweep
        self._adopting: asyncio.Task[None] | None = None  # the sweep's adoption, in a thread
        self._busy_pause = STORE_BUSY_PAUSES[0]
        self._lock_outage = Outage(
            log,
            "SA store write",
            f"bootstraps wait up to {STORE_BUSY_LIMIT:g} s for the lock, then get 503",
        )
        self._to_confirm: set[int] = set()  # withdrawals the HA confirmed, to record
        self._to_mark_delivered: set[int] = set()  # 200s sent, to record (same batch)
        self._confirm_timer: asyncio.TimerHandle | None = None
        # One line when a retried store write starts failing (full disk,
        # a store locked by another HAC), one when it works again.
        every = "retried every expiry interval"
        self._expiry_outage = Outage(log, "expiry run", every)
        self._clock_watch = ClockWatch()
        self._sweep_outage = Outage(log, "sweep of undelivered SAs", every)
        self._batch_outage = Outage(
            log, "store write of delivered SAs and confirmed withdrawals", "retried every second"
        )
        # SAs are "pending" in the store until their 200 has left (optional
        # store methods; the SQLite and memory stores have them): a crash
        # between the store write and the 200 cannot leave one live.
        self._tracks_delivery = all(
            hasattr(self.store, m) for m in ("track_delivery", "delivered_many", "undelivered")
        )
        if self._tracks_delivery:
            self.store.track_delivery = True  # type: ignore[attr-defined]
        # Who this HAC is among those sharing the store: the withdrawals it
        # owes are left to it while it is alive (``heartbeat`` at each sweep),
        # and taken over by the others once it is not.  Its config file names
        # it, so a restart resumes its own at once.  A HAC built without a
        # config file (embedded, tests) takes no part: what it owes is
        # anyone's, as before owners.
        self._owns = config_file != "<memory>" and all(
            hasattr(self.store, m) for m in ("owner", "heartbeat", "claim", "orphaned_unconfirmed")
        )
        if self._owns:
            self.store.owner = (  # type: ignore[attr-defined]
                f"{socket.gethostname()}:{Path(config_file).resolve()}"
            )
        self._sweep_timer: asyncio.TimerHandle | None = None
        # (bound, monotonic until): see _issuing_bound.
        self._bound_floor: tuple[float, float] = (0.0, 0.0)
        # spi -> delivery order in this process: "older" among SAs whose
        # validity ends fall in the same second (max_sas_per_mn).
        # spi -> (delivery order, validity end in whole seconds): an entry
        # speaks for that SA only (an SPI drawn again later is another SA),
        # and goes at its validity end (``_forget_delivered``) -- with HACs
        # sharing the store, another HAC supersedes or expires most of
        # this one's SAs, and the entries stayed for good (found in review).
        self._delivered: dict[int, tuple[int, int]] = {}
        self._delivered_ends: list[tuple[int, int]] = []  # heap of (end, spi)
        self._delivery_seq = 0
        self.addresses: list[tuple[str, int]] = []
        # ``mipsec_bootstraps_total`` and the latency histogram (core/metrics.py):
        # set by the launcher when ``[metrics]`` is configured.
        self.metrics: Any = None
        self.stats: dict[str, int] = {
            "sessions": 0,
            "status_200": 0,
            "saturated": 0,
            "too_soon": 0,  # 503: [policy] min_rebootstrap_interval
            "store_busy": 0,  # MNs answered 503: the store's write lock stayed held
            "withdrawn": 0,
            "hook_errors": 0,
            # Connections closed without an answer: a container the HAC could
            # not even answer 400 to (PROFILE §2: no Identifier to answer).
            # Logged at DEBUG only (a flood must not flood the log), but no
            # counter moved at all before (found in review).
            "unanswerable": 0,
        }

    # Config table -> (hook, key naming the plugin): the plugin objects a
    # start and a reload (roles/hac_ops.py) build the same way.
    _PLUGIN_TABLES = {
        "credentials": ("mipsec_credential_backends", "backend"),
        "home_addresses": ("mipsec_hoa_allocators", "allocator"),
        "ha_selection": ("mipsec_ha_selectors", "selector"),
    }

    def create_plugin(self, table: str, cfg: HACConfig) -> Any:
        hook, field = self._PLUGIN_TABLES[table]
        ref = getattr(cfg, table)
        ctx = self.plugin_ctx
        if table == "home_addresses":
            # What the HAC hands MNs as servers is never a home address: the
            # lab's DNS server 192.0.2.53 lay in its pool 192.0.2.0/24, and an
            # HA on its home link at prefix::1 would have been the first
            # MN's address (found in review).  See mipsec_hoa_allocators.
            reserved = reserved_addresses(cfg)
            ctx = replace(ctx, extra={**ctx.extra, "reserved_addresses": reserved})
        return pluginmanager.create(
            self.pm, hook, getattr(ref, field), ref.options, ctx, key=f"{table}.{field}"
        )

    def _method_factories(
        self, ctx: PluginContext, cfg: HACConfig | None = None
    ) -> dict[str, ServerMethodFactory]:
        """Build the server factory of every method the policy names, at start.

        Fail closed (issue 6 item 4): a method the policy lists that no plugin
        provides is a configuration error, not a silent 501; options
        (``[methods.NAME]``) are validated here, so a wrong one fails at start.
        ``cfg``: a reloaded configuration (core/roles/hac_ops.py) instead of ours.
        """
        cfg = cfg or self.cfg
        installed: Mapping[str, AuthMethod] = pluginmanager.registry(self.pm, "mipsec_auth_methods")
        named: list[tuple[str, str]] = [(m, "policy.methods") for m in cfg.policy.methods]
        for realm, realm_methods in cfg.policy.realms.items():
            named += [(m, f"policy.realms.{realm}") for m in realm_methods]
        in_use = {m for m, _ in named}
        for name in cfg.methods:
            if name not in installed:
                raise ConfigError(
                    self.config_file, f"methods.{name}", f"no plugin provides method {name!r}"
                )
            if name not in in_use:
                # Its options were never read, so a typo in them passed
                # check-config (found in review); fail closed, as for a
                # method the policy names that no plugin provides.
                raise ConfigError(
                    self.config_file,
                    f"methods.{name}",
                    f"method {name!r} is in neither policy.methods nor policy.realms, so these "
                    "options would be ignored: add it there, or remove the table",
                )
        out: dict[str, ServerMethodFactory] = {}
        for name, key in named:
            if name in out:
                continue
            method = installed.get(name)
            if method is None:
                known = ", ".join(sorted(installed)) or "none"
                raise ConfigError(
                    self.config_file, key, f"no plugin provides method {name!r} (known: {known})"
                )
            with pluginmanager.building(self.config_file, f"methods.{name}", name):
                factory = method.server(cfg.methods.get(name, {}), ctx)
            if factory is None:
                raise ConfigError(self.config_file, key, f"method {name!r} has no HAC side")
            out[name] = factory
        return out

    def certificates(self) -> dict[str, datetime]:
        """notAfter of every certificate this HAC presents, by config key
        (core/certexpiry.py): MHAuth, each method's, each HA transport's,
        the pull listener's."""
        parts = [{"hac.cert": self.bindings.current.not_after}]
        parts += [prefixed(f"methods.{n}.", certificates(f)) for n, f in self.methods.items()]
        parts += [
            prefixed(f"ha[{i}].options.", certificates(self.transports.get(h.id)))
            for i, h in enumerate(self.cfg.ha)
        ]
        if self._prov_server is not None:
            parts.append(prefixed("provisioning.", certificates(self._prov_server)))
        return merged(parts)

    def use_cert(self, cert: ServerCert) -> None:
        """Serve ``cert`` to the connections accepted from now on (a reload).

        A connection whose TLS began with the old certificate keeps it and
        its channel binding to the end (``bindings.of``)."""
        self.bindings.use(cert)
        if self._listener is not None:
            self._listener.ssl_context = cert.context

    def apply_limits(self, cfg: HACConfig) -> None:
        """A reload's ``[hac]`` listener limits: the timeouts (new
        connections' handshakes and exchanges; open connections from their
        next step, a step under way keeping its deadline), the per-source
        rate (its buckets start afresh), and the caps -- raised, they admit
        more at once; a lowered connection cap closes the connections over
        it now (``TlsListener.apply_limits``); a lowered
        ``max_in_progress`` lets the requests under way finish and answers
        busy (503) until fewer are.  One line names what changed."""
        lst = self._listener
        if lst is None:
            return
        old, new = lst.limits, _limits(cfg.hac)
        closed = lst.apply_limits(new)
        said = [
            f"{name} {getattr(old, name)} -> {getattr(new, name)}"
            for name in LISTENER_LIMITS
            if getattr(old, name) != getattr(new, name)
        ]
        if not said:
            return
        log.info(
            "hac listener: %s from now on%s",
            ", ".join(said),
            f" ({closed} connection(s) over the cap closed, the longest waiting)" if closed else "",
        )

    # ------------------------------------------------------------ lifecycle

    async def start(self, *, serve: bool = True) -> list[tuple[str, int]]:
        """Bind, load, sweep; then accept MNs -- or, with ``serve=False``,
        only once :meth:`serve` is called: ``mipsec --role hac`` first opens
        its control socket and metrics listener, either of which may fail
        the start, and a start that fails must not have served an MN (its
        SA would be stored, its exchange cut, the store closed under it)."""
        svc = self.cfg.hac
        port = svc.port
        self._listener = TlsListener(
            self.bindings.current.context,
            lambda conn: _Session(self, conn),
            _limits(svc),
            name="hac",
        )
        for host in svc.listen:
            try:
                bound = await self._listener.listen(host, port, serve=serve)
            except OSError as exc:
                if ":" in host and len(svc.listen) > 1:
                    log.warning("cannot listen on [%s]:%d: %s (skipped)", host, port, exc)
                    continue
                raise ListenError.from_oserror("hac.port", host, port, exc) from None
            self.addresses.extend(bound)
            if port == 0 and bound:
                port = bound[0][1]  # same ephemeral port on every address if possible
        self._expiry_task = asyncio.create_task(self._expiry_loop())
        if self._prov_server is not None:
            await self._prov_server.start()
        certexpiry.report(log, "hac", self.certificates(), utcnow())
        # Withdrawals a previous run did not see confirmed: keep at them --
        # this HAC's own and those of HACs sharing the store that are no
        # longer alive, not those another live HAC is retrying.  Those for an
        # HA only another HAC sharing the store has configured are its to
        # finish: one line for them all, not one per SPI.
        elsewhere: dict[str, int] = {}
        if self._owns:
            try:
                self._heartbeat()
            except Exception as exc:  # the first sweep writes it again
                log.warning("cannot record this HAC as alive in the SA store: %s", cause(exc))
        resumed: list[int] = []
        for spi, _mn_id, ha_id, end in self._owed_rows():
            if ha_id in self._ha_by_id:
                self._schedule_withdraw(ha_id, spi, end)
                resumed.append(spi)
            else:
                elsewhere[ha_id] = elsewhere.get(ha_id, 0) + 1
        if resumed:
            self._claim(resumed)
        for ha_id, n in sorted(elsewhere.items()):
            log.info(
                "%d withdrawal(s) owed to HA %s, not configured here: left to the HACs "
                "that have it",
                n,
                ha_id,
            )
        # SAs a previous run stored but may not have answered with: taken
        # back once no HAC can still be issuing them (also every expiry run).
        if self._tracks_delivery:
            self._sweep_timer = asyncio.get_running_loop().call_later(
                self._issuing_bound(), self._sweep_now
            )
        with collection_paused():  # core/startup_heap.py (issue 9)
            warm_hac_views(self.store, self.allocator)
            freeze_heap("HAC")
        if serve:
            self._say_listening()
        return self.addresses

    async def serve(self) -> None:
        """Accept MNs on the addresses ``start(serve=False)`` bound."""
        assert self._listener is not None, "HacService.start() not called"
        await self._listener.start_serving()
        self._say_listening()

    def _say_listening(self) -> None:
        for host, p in self.addresses:
            log.info("HAC listening on %s port %d (TLS)", host, p)

    async def serve_forever(self) -> None:
        if self._listener is not None:
            await self._listener.serve_forever()

    def stop_accepting(self) -> None:
        """Close the listening sockets (new connections are refused); the
        connections held go on.  Idempotent."""
        if self._listener is not None:
            self._listener.close()

    async def drain(self, timeout: float) -> int:
        """SIGTERM: stop accepting, let exchanges under way finish (up to
        ``timeout`` seconds), then return how many were still open.

        Only exchanges that have begun (an Init was read) are waited for; an
        idle connection would only hold the stop for the whole bound.
        """
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def busy() -> int:
            return sum(
                1 for s in self._sessions if s._exch.mn_id is not None and not s._exch.finished
            )

        while busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return busy()

    async def stop(self) -> None:
        self._stopping = True  # withdrawals left owed resume at the next start
        if self._listener is not None:
            self._listener.close()
        issuing = [t for t in (session.cancel() for session in list(self._sessions)) if t]
        if issuing:  # let cancelled issues clean up (store, withdraw) before the store closes
            await asyncio.wait(issuing, timeout=self.cfg.hac.provisioning_timeout)
        if self._group_handle is not None:  # a group waiting for the store's lock: never stored
            self._group_handle.cancel()
            self._group_handle = None
            stopping = IssueFailure(UNAVAILABLE, "hac-stopping", _retry_after(BUSY_RETRY_AFTER))
            for *_, fut in self._group:
                if not fut.done():
                    fut.set_exception(stopping)
            self._group = []
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        if self._tasks:
            # Give withdrawals in flight one chance to finish; unconfirmed
            # ones stay recorded in the store and resume at the next start.
            await asyncio.wait(list(self._tasks), timeout=self.cfg.hac.provisioning_timeout)
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._confirm_timer is not None:
            self._confirm_timer.cancel()
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        # Before the store closes, waiting as long as SQLite would for a lock
        # held elsewhere: a mark not written here makes the next run's sweep
        # take back SAs whose 200 left (the price of a crash, not of a stop).
        self._confirm_now(final=True)
        if self._confirm_timer is not None:  # it failed: the next run's sweep decides
            self._confirm_timer.cancel()
            self._confirm_timer = None
        self._leave()
        if self._listener is not None:
            await self._listener.aclose()
        if self._prov_server is not None:
            await self._prov_server.stop()
        for transport in self.transports.values():
            aclose = getattr(transport, "aclose", None)  # optional: pooled connections
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        for factory in self.methods.values():
            aclose = getattr(factory, "aclose", None)  # optional: e.g. RADIUS sockets
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if self.accounting is not None:  # after the last SA event: flush, then unhook
            with contextlib.suppress(Exception):
                await self.accounting.aclose()
            self.pm.unregister(self.accounting)
        self.store.close()
        self.credentials.close()

    # ------------------------------------------------------------ events

    def emit(self, hook: str, **kwargs: Any) -> None:
        """Call an event hook after the fact; a raising plugin never breaks anything."""
        pluginmanager.emit(self.pm, hook, self.stats, log, **kwargs)

    def exchange_ended(self, exch: HacExchange, peer: str, started: float | None = None) -> None:
        """One audit event per finished exchange (issue 6 item 7)."""
        status = exch.final_status
        if self.metrics is not None and (exch.mn_id is not None or status is not None):
            self.metrics.bootstrap(
                exch.method_name or "-",
                status,
                time.monotonic() - started if started is not None else None,
            )
        if status == 200:
            self.stats["status_200"] += 1
            return  # sa_issued was emitted when the 200 left
        if exch.mn_id is None and status is None:
            if exch.reason == "bad-container":
                self.stats["unanswerable"] += 1
            # Nothing was asked (idle/handshake-only connection): not an
            # exchange worth a line at INFO; attackers could flood the log.
            log.debug("peer=%s closed before any request: %s", peer, exch.reason or "-")
            return
        if exch.reason.startswith("issue:"):
            return  # reported as provisioning_failed
        self.emit(
            "mipsec_auth_failed",
            mn_id=exch.mn_id or "-",
            method=exch.method_name or "-",
            status=status,
            peer=peer,
            reason=exch.reason or "-",
        )

    # ------------------------------------------------------------ SA issuing

    async def issue(
        self,
        exch: HacExchange,
        req: IssueSA,
        peer: str,
        on_stored: Callable[[IssuedSA], None] | None = None,
    ) -> IssuedSA | Send:
        """Allocate, store and provision one SA: the issued SA (not yet
        delivered: see ``deliver``/``rollback``), or the failure response."""
        if req.mn_id in self.revocations:
            # Only after authentication: an unauthenticated peer learns nothing
            # about which identities are revoked (PROFILE §4: no oracle).
            return exch.fail(UNAUTHORIZED, reason="revoked")
        self.emit("mipsec_mn_authenticated", mn_id=req.mn_id, method=req.method, peer=peer)
        wait = self._too_soon(req.mn_id)
        if wait is not None:
            self.stats["too_soon"] += 1
            failure = IssueFailure(UNAVAILABLE, "rebootstrap-too-soon", _retry_after(wait))
            return self._issue_failed(exch, req, peer, failure, None, None)
        try:
            issued = await self.issue_sa(req.mn_id, req.suite, req.scope, on_stored=on_stored)
        except IssueFailure as exc:
            return self._issue_failed(exch, req, peer, exc, None, None)
        except Exception as exc:
            failure = IssueFailure(INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            return self._issue_failed(exch, req, peer, failure, None, None)
        if req.mn_id in self.revocations:
            # Revoked while its SA was being issued -- by another HAC sharing
            # the list (this HAC's own revoke ends the exchange instead): that
            # HAC appended the revocation before it looked for the MN's SAs,
            # and this one stored the SA before looking again here, so either
            # that HAC withdraws the SA or this check takes it back.
            self.rollback(issued, peer, "revoked")
            return exch.fail(UNAUTHORIZED, reason="revoked")
        return issued

    def _too_soon(self, mn_id: str) -> int | None:
        """Seconds the MN must wait before another SA ([policy]
        min_rebootstrap_interval), or None.  Its newest live SA's issue time
        is read from the store (validity end minus sa_lifetime), so HACs
        sharing the store agree and a restart forgets nothing."""
        policy = self.cfg.policy
        if policy.min_rebootstrap_interval <= 0:
            return None
        now = utcnow()
        ends = [end for _, end, _ in self._held(mn_id, now)]
        if len(ends) < policy.max_sas_per_mn:
            return None  # another SA supersedes nothing: no retired SPI, no record
        since = now.timestamp() - (max(ends) - policy.sa_lifetime)
        left = policy.min_rebootstrap_interval - since
        if left <= 0:
            return None
        # Never longer than the interval: the estimate moves with a lowered
        # sa_lifetime (a reload) and with another HAC's clock running ahead.
        return max(1, math.ceil(min(left, policy.min_rebootstrap_interval)))

    def issue_saturated(self, exch: HacExchange, req: IssueSA, peer: str) -> Send:
        """``max_in_progress`` requests are worked on already: 503 with
        ``retry-after`` (PROFILE §6) rather than a queue."""
        self.stats["saturated"] += 1
        self.emit("mipsec_mn_authenticated", mn_id=req.mn_id, method=req.method, peer=peer)
        failure = IssueFailure(UNAVAILABLE, "saturated", _retry_after(BUSY_RETRY_AFTER))
        return self._issue_failed(exch, req, peer, failure, None, None)

    def _issue_failed(
        self,
        exch: HacExchange,
        req: IssueSA,
        peer: str,
        exc: IssueFailure,
        ha_id: str | None,
        spi: int | None,
    ) -> Send:
        reason = str(exc)
        self.emit(
            "mipsec_provisioning_failed",
            mn_id=req.mn_id,
            ha_id=ha_id or getattr(exc, "ha_id", None) or "-",
            spi=spi if spi is not None else getattr(exc, "spi", None),
            status=exc.status,
            reason=reason,
            peer=peer,
        )
        return exch.fail(exc.status, exc.retry_after, reason=f"issue:{reason}")

    def deliver(self, issued: IssuedSA, peer: str) -> None:
        """The 200 carrying ``issued`` has left: it is the MN's now.

        Events run after the fact; then older SAs of the same MN beyond
        ``max_sas_per_mn`` are withdrawn (issue 6 item 3) -- never before
        this point, and in the background, so a withdrawal never delays the
        MN's 200.
        """
        sa = issued.sa
        self._issuing_spis.discard(sa.spi)
        supersedes = self._supersedes.pop(sa.spi, ())
        if self._tracks_delivery:
            self._to_mark_delivered.add(sa.spi)
            self._batch_soon()
        self.emit(
            "mipsec_sa_issued",
            spi=sa.spi,
            mn_id=sa.mn_id,
            suite=sa.suite.name,
            scope=sa.scope,
            validity_end=sa.validity_end,
            ha_id=sa.ha_id,
            peer=peer,
        )
        try:
            with self._write_now():
                marked = self._supersede(sa.mn_id, sa.spi, sa.validity_end, supersedes)
        except StoreBusyError:
            # Another process holds the write lock: retried from the loop
            # (not a wait of up to 5 s inside SQLite, serving nobody).
            self._background(self._supersede_soon(sa.mn_id, sa.spi, sa.validity_end, supersedes))
        except Exception as exc:  # the store failed: the next bootstrap tries again
            log.error("mn_id=%s: cannot withdraw older SAs: %s", sa.mn_id, cause(exc))
        else:
            if marked:  # committed with the retirement: nothing left for the batch
                self._to_mark_delivered.discard(sa.spi)

    async def _supersede_soon(
        self, mn_id: str, keep: int, end: datetime, supersedes: tuple[int, ...]
    ) -> None:
        try:
            await self.write_soon(lambda: self._supersede(mn_id, keep, end, supersedes))
        except Exception as exc:  # still held after STORE_BUSY_LIMIT, or failed
            log.error("mn_id=%s: cannot withdraw older SAs: %s", mn_id, cause(exc))

    async def write_soon(self, write: Callable[[], _T]) -> _T:
        """``write()`` in a transaction begun within ``LOOP_LOCK_WAIT``; while
        another process holds the store's write lock, tried again from the
        event loop (pauses of 2 ms doubling to 50 ms), which serves everyone
        else meanwhile; ``StoreBusyError`` once it has been held for
        ``STORE_BUSY_LIMIT``.  For a write that must happen but need not
        happen in this turn (``mipsec revoke``, a withdrawal past
        ``max_sas_per_mn``)."""
        loop = asyncio.get_running_loop()
        start, pause = loop.time(), STORE_BUSY_PAUSES[0]
        while True:
            try:
                with self._write_now():
                    return write()
            except StoreBusyError:
                if loop.time() - start >= STORE_BUSY_LIMIT:
                    raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, STORE_BUSY_PAUSES[1])

    def rollback(self, issued: IssuedSA, peer: str, reason: str, *, report: bool = True) -> None:
        """The MN did not get the 200 (it went away, or broke the sequence):
        take the SA back everywhere -- nothing stays live unannounced.
        ``report``: False when the failure was reported already (its 500)."""
        sa = issued.sa
        if sa.spi in self._issuing_spis:  # else issue_sa's own failure path took it back
            self._issuing_spis.discard(sa.spi)
            self._withdraw_when_delivered.discard(sa.spi)
            self._take_back(sa.spi, sa.mn_id, "provisioning-failed")
        self._supersedes.pop(sa.spi, None)  # the MN's older SAs stay as they are
        if not report:
            return
        self.emit(
            "mipsec_provisioning_failed",
            mn_id=sa.mn_id,
            ha_id=sa.ha_id,
            spi=sa.spi,
            status=0,
            reason=reason,
            peer=peer,
        )

    def _supersede(
        self, mn_id: str, keep: int, end: datetime, supersedes: tuple[int, ...] = ()
    ) -> bool:
        """Retire the MN's SAs that ``keep``, just delivered, supersedes: those
        older beyond ``max_sas_per_mn``, and ``supersedes`` (what its store
        write would have superseded, see ``_prepare``).  True when ``keep``'s
        delivery mark was written with them, in this transaction."""
        if keep in self._withdraw_when_delivered:
            # A newer SA of the MN had its 200 while this one was being
            # issued here: its excess, spared then, goes now.
            self.retire(keep, "superseded")  # a busy store: retried with the flag kept
            self._withdraw_when_delivered.discard(keep)
            return False
        self._delivery_seq += 1
        end_s = int(end.timestamp())
        self._delivered[keep] = (self._delivery_seq, end_s)
        heapq.heappush(self._delivered_ends, (end_s, keep))
        now_excess, spared = self._excess_split(mn_id, keep, also=supersedes)
        marked = False
        if now_excess and self._tracks_delivery:
            # The new SA's delivery mark in the same commit as the retirement
            # of those it supersedes: a kill between the two cannot leave the
            # MN without either (the new one swept as undelivered, the older
            # withdrawn), only with both or with the new one.
            self.store.delivered_many([keep])  # type: ignore[attr-defined]
            marked = True
        for spi, _ha_id in now_excess:
            self.retire(spi, "superseded")
        # Older SAs of the MN still being issued by this HAC (their install
        # under way) are not withdrawn under their feet: each goes once its
        # own 200 has left.  Without this, of two bootstraps of one MN here,
        # the older finishing last stayed live beside the newer: the newer's
        # 200 spared it, and its own 200 withdraws only older SAs.
        self._withdraw_when_delivered.update(spi for spi, _ in spared)
        return marked

    def _excess(
        self, mn_id: str, keep: int | None, now: datetime | None = None
    ) -> list[tuple[int, str]]:
        """``(spi, ha_id)`` of the MN's SAs beyond ``max_sas_per_mn`` once
        ``keep`` is counted: the oldest first, SAs still being issued spared.

        ``now``: the instant the caller read the store at.  A later one here
        would move the store's live view past the caller's instant, and a
        view asked about an instant it has passed answers with SQL over every
        live SA (the next SA of a group commit would pay that).
        """
        return self._excess_split(mn_id, keep, now)[0]

    def _held(self, mn_id: str, now: datetime) -> list[tuple[int, float, str]]:
        """(spi, validity end, ha_id) of the MN's live SAs; the SQLite store
        gives them without unwrapping keys (this runs on every bootstrap)."""
        fast = getattr(self.store, "live_spis_for_mn", None)
        if fast is not None:
            return fast(mn_id, now)  # type: ignore[no-any-return]
        return [
            (i.sa.spi, i.sa.validity_end.timestamp(), i.sa.ha_id)
            for i in self.store.live_for_mn(mn_id, now)
        ]

    def _excess_split(
        self,
        mn_id: str,
        keep: int | None,
        now: datetime | None = None,
        *,
        also: tuple[int, ...] = (),
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """``_excess``, and the excess SAs it spared because this HAC is still
        issuing them.  With ``keep`` (a delivered SA) those count towards the
        limit like any older SA of the MN; without (at issue time) they are
        left out of the count, as before.  ``also``: SAs of the MN counted as
        older than ``keep`` whatever their age (those its store write found
        live: see ``_prepare``)."""
        delivered = self._delivered

        def order(spi: int, end: float) -> int | None:
            # This process's delivery order of that very SA, if it has one.
            entry = delivered.get(spi)
            return entry[0] if entry is not None and entry[1] == int(end) else None

        now = now or utcnow()
        held = self._held(mn_id, now)
        issuing = self._issuing_spis
        others = [x for x in held if x[0] != keep and (keep is not None or x[0] not in issuing)]
        if keep is not None:
            kept = [x for x in held if x[0] == keep]
            if not kept:
                # ``keep`` was superseded already, by another HAC sharing the
                # store: that HAC's SA is the MN's newest, and withdrawing it
                # from here would leave the MN nothing (each HAC withdrawing
                # the other's SA).  The newest SA's HAC does the rest.
                return [], []
            # Only SAs older than ``keep``: an earlier validity end, or the
            # same second and delivered before it by this process -- or, for
            # an SA this process did not deliver (another HAC's, or its own
            # from before a restart), a smaller SPI.  Every HAC sharing the
            # store applies that same rule to the same two SAs, so of one
            # MN's SAs in one second from two HACs, exactly one is the newer
            # for both: each HAC withdraws the older one, or nothing, and
            # one SA survives -- never neither, never both.
            end = kept[0][1]
            mine = order(keep, end)

            def older(x: tuple[int, float, str]) -> bool:
                if x[1] != end:
                    return x[1] < end
                seq = order(x[0], x[1])
                return seq < mine if seq is not None and mine is not None else x[0] < keep

            others = [x for x in others if x[0] in also or older(x)]
        live = sorted(
            others,
            # Oldest first: validity end (whole seconds), then the order of
            # delivery in this process (SAs it did not deliver first, by SPI).
            key=lambda x: (x[1], _or_first(order(x[0], x[1])), x[0]),
        )
        # Keep ``keep`` and the newest limit-1 others.
        excess = len(live) - (self.cfg.policy.max_sas_per_mn - 1)
        out = live[: max(0, excess)]
        return (
            [(spi, ha_id) for spi, _end, ha_id in out if spi not in issuing],
            [(spi, ha_id) for spi, _end, ha_id in out if spi in issuing],
        )

    def retire(self, spi: int, reason: str) -> bool:
        """Withdraw a live SA for good: out of the store now, off its HA soon."""
        record = self._retire_record(spi, reason)
        self._delivered.pop(spi, None)
        if record is None:
            return False
        mn_id, ha_id, validity_end = record
        self.stats["withdrawn"] += 1
        if reason not in ("provisioning-failed", "undelivered"):  # the MN never held it
            self.emit("mipsec_sa_withdrawn", spi=spi, mn_id=mn_id, ha_id=ha_id, reason=reason)
        self._schedule_withdraw(ha_id, spi, validity_end)
        return True

    def _retire_record(self, spi: int, reason: str) -> tuple[str, str, datetime] | None:
        """The store's ``retire``: ``(mn_id, ha_id, validity_end)`` of the SA
        taken back.  The SQLite store answers without unwrapping the SA's
        keys (``retire_record``); a third party's store returns the SA."""
        fast = self._retire_fast
        if fast is not None:
            return fast(spi, reason)  # type: ignore[no-any-return]
        issued = self.store.retire(spi, reason)
        if issued is None:
            return None
        return issued.sa.mn_id, issued.sa.ha_id, issued.sa.validity_end

    def _take_back(self, spi: int, mn_id: str, reason: str) -> None:
        """``retire`` on a failure path, which must not raise (it runs in an
        ``except`` or a cancelled task).  A store that cannot write now (full
        disk) leaves the SA stored: an SA never delivered is still marked
        pending, so the sweep of undelivered SAs retires it -- and withdraws
        it from its HA -- once the store works; an older, superseded one is
        retired by the MN's next bootstrap."""
        try:
            # At most LOOP_LOCK_WAIT for another process's write lock: the
            # fallbacks above take over, and the loop serves everyone else.
            with self._write_now():
                self.retire(spi, reason)
        except Exception as exc:
            log.error(
                "mn_id=%s spi=%d: cannot retire it now (%s, reason=%s); retried later",
                mn_id,
                spi,
                cause(exc),
                reason,
            )

    def withdraw_unrecorded(self, ha_id: str, spi: int, validity_end: datetime) -> None:
        """Withdraw an SA from its HA although the store could not retire it
        (an outage): retried until the HA confirms, in this process only."""
        self.stats["withdrawn"] += 1
        self._schedule_withdraw(ha_id, spi, validity_end)

    def _schedule_withdraw(self, ha_id: str, spi: int, validity_end: datetime) -> None:
        if spi in self._withdrawing:
            return
        ha = self._ha_by_id.get(ha_id)
        if ha is None:
            log.warning("spi=%d: cannot withdraw, HA %s is not configured", spi, ha_id)
            return
        self._withdrawing.add(spi)
        owed = self._owed.get(ha_id)
        if owed is None:
            owed = self._owed[ha_id] = _Owed(ha_id)
        owed.spis[spi] = validity_end
        if owed.task is None:
            task = asyncio.create_task(self._withdraw_owed(ha, owed))
            owed.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _withdraw_owed(self, ha: HomeAgentInfo, owed: _Owed) -> None:
        """Withdraw from ``ha`` every SPI owed to it, oldest first, in rounds
        of ``WITHDRAW_BATCH``; a failed one goes to the back of the queue.
        Ends when nothing is owed (a later one starts a new task)."""
        timeout = self.cfg.hac.provisioning_timeout
        delay = WITHDRAW_RETRY_MIN
        spis = owed.spis
        try:
            while spis:
                # Looked up each round: a reload may have built the HA's
                # transport again (a renewed client certificate).
                transport = self.transports[ha.ha_id]
                now = utcnow()
                batch: list[int] = []
                for spi, validity_end in list(itertools.islice(spis.items(), WITHDRAW_BATCH)):
                    if validity_end <= now:
                        # Past its validity end the HA drops it by itself.
                        del spis[spi]
                        self._withdrawing.discard(spi)
                    else:
                        batch.append(spi)
                if not batch:
                    continue
                results = await asyncio.gather(
                    *(asyncio.wait_for(transport.withdraw(ha, s, timeout), timeout) for s in batch),
                    return_exceptions=True,
                )
                failed: list[tuple[int, BaseException]] = []
                for spi, result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        failed.append((spi, result))
                        end = spis.pop(spi, None)
                        if end is not None:
                            spis[spi] = end  # to the back: the others go first
                        continue
                    # Recorded with the next batch, which keeps it through a
                    # store outage; lost in a crash, the next run withdraws again.
                    spis.pop(spi, None)
                    self._withdrawing.discard(spi)
                    self._confirm_later(spi)
                    log.debug("spi=%d withdrawn from HA %s", spi, ha.ha_id)
                if len(failed) < len(batch):
                    owed.outage.worked()
                    delay = WITHDRAW_RETRY_MIN
                    continue
                spi, exc = failed[0]
                owed.outage.failed(f"spi={spi}: {cause(exc)} ({len(spis)} owed)", logging.WARNING)
                log.debug("withdrawals from HA %s: retrying in %.1f s", ha.ha_id, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WITHDRAW_RETRY_MAX)
        finally:
            owed.task = None
            if spis and not self._stopping:
                # Ended by something unforeseen: the owed SPIs keep a worker.
                for spi, end in list(spis.items()):
                    del spis[spi]
                    self._withdrawing.discard(spi)
                    self._schedule_withdraw(ha.ha_id, spi, end)

    async def issue_sa(
        self,
        mn_id: str,
        suite: Any,
        scope: int,
        *,
        on_stored: Callable[[IssuedSA], None] | None = None,
    ) -> IssuedSA:
        """Allocate, store and provision one SA; nothing survives a failure.

        The SA is left *undelivered*: the caller either sends the 200 and calls
        ``deliver``, or calls ``rollback``.  ``on_stored`` learns the SA as soon
        as it is in the store, so a caller cancelled at any instant can still
        take it back.
        """
        if self._grouped:
            stored = await self._store_in_group(mn_id, suite, scope)
        else:
            now = utcnow()
            stored = self._store_now(self._prepare(mn_id, now), mn_id, suite, scope, now)
        issued, ha, transport = stored.issued, stored.ha, stored.transport
        spi = issued.sa.spi
        self._issuing_spis.add(spi)
        if on_stored is not None:
            on_stored(issued)
        timeout = self.cfg.hac.provisioning_timeout
        # An in-process HA answers before the call returns (no I/O): no
        # deadline timer to arm and cancel on every bootstrap (issue 9).
        deadline: Any = (
            contextlib.nullcontext()
            if getattr(transport, "in_process", False)
            else asyncio.timeout(timeout)
        )
        try:
            async with deadline:
                await transport.provision(ha, issued, timeout)
        except BaseException as exc:
            # Nothing half-provisioned survives: out of the store, and the HA
            # told to forget it in case it did install it (retried until it
            # confirms, also across restarts: the store records it).  The
            # MN's older SAs were never touched: still live, here and on
            # their HAs, as before this bootstrap.
            self._undo_stored(stored)
            # An in-process HA's refusal is the same to the MN as a network
            # HA's 400: not confirmed, 504 (PROFILE §9).
            if isinstance(exc, TimeoutError | ConnectionError | OSError | ProvisioningRefused):
                # The operator's line says which: the HA refused (it answered;
                # its own log says why), or it never confirmed.
                status = getattr(exc, "status", None)
                why = (
                    (f"ha-refused:{status}" if isinstance(status, int) else "ha-refused")
                    if _refused(exc)
                    else f"ha-no-confirmation:{type(exc).__name__}"
                )
                failure = IssueFailure(TIMEOUT, why)
                failure.ha_id = ha.ha_id  # type: ignore[attr-defined]
                failure.spi = spi  # type: ignore[attr-defined]
                raise failure from None
            raise
        if stored.supersedes and spi in self._issuing_spis:
            self._supersedes[spi] = stored.supersedes  # for deliver; rollback drops it
        return issued

    def _prepare(self, mn_id: str, now: datetime) -> _Prepared:
        """Everything an SA needs before its store write, reading only: the
        HA, the home address, the older SAs it supersedes on that HA."""
        store: Any = self.store
        summary = getattr(store, "live_summary", None)
        if summary is not None:
            # Both views of the live SAs in one look at the store.
            live_by_ha, in_use = summary(now)
        else:
            live_by_ha, in_use = store.count_by_ha(now), None
        ha = self.selector.select(mn_id, self.has, live_by_ha)
        if ha is None:
            raise IssueFailure(UNAVAILABLE, "no-ha-available", _retry_after())
        if in_use is None:
            in_use = store.hoas_in_use(now)
        try:
            home = self.allocator.assign(mn_id, in_use)
        except LookupError:
            raise IssueFailure(UNAVAILABLE, "home-address-pool-exhausted", _retry_after()) from None
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
        transport = self.transports[ha.ha_id]
        # Issue 6 item 3: the MN's older SAs beyond max_sas_per_mn, on any HA,
        # as the store shows them now (SAs this HAC is still issuing left
        # out).  Nothing happens to them before the new SA's 200 has left
        # (``deliver``): a bootstrap that fails or is abandoned before that
        # leaves the MN the SA it holds.  Until the twenty-ninth session the
        # install withdrew those on its HA (``prov-withdraw``) and the store
        # write retired them all, so a 504, a 5xx or an MN gone before its
        # 200 cost the MN its still valid SA on the HAC and the HA (found in
        # review).  Recorded here, they also keep "the later stored wins" of
        # two HACs issuing to one MN at once: the later one withdraws the
        # earlier's SA after its 200 even where the rule of ``_excess_split``
        # alone would call the earlier one newer.
        supersedes = tuple(s for s, _h in self._excess(mn_id, None, now))
        return _Prepared(ha, bootstrap, transport, supersedes)

    def _store_now(
        self, prep: _Prepared, mn_id: str, suite: Any, scope: int, now: datetime
    ) -> _Stored:
        """Draw an SPI and store the SA."""
        for _ in range(SPI_DRAWS):
            sa = new_sa(
                spi=random_spi(),
                mn_id=mn_id,
                suite=suite,
                scope=scope,
                lifetime=self.cfg.policy.sa_lifetime,
                now=now,
                ha_id=prep.ha.ha_id,
            )
            candidate = IssuedSA(sa, prep.bootstrap)
            if self.store.add(candidate):
                return _Stored(candidate, prep.ha, prep.transport, prep.supersedes)
        raise IssueFailure(INTERNAL_ERROR, "no-free-spi")

    async def _store_in_group(self, mn_id: str, suite: Any, scope: int) -> _Stored:
        """``_store_now`` in the group of this event-loop turn: one
        transaction, one commit, for every SA issued in the turn (issue 9)."""
        fut: asyncio.Future[_Stored] = asyncio.get_running_loop().create_future()
        self._group.append((mn_id, suite, scope, fut))
        if self._group_handle is None:
            self._group_handle = asyncio.get_running_loop().call_soon(self._commit_group)
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancelled after the commit stored it (the task had not resumed
            # yet): nobody will provision it, so it goes.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._undo_stored(fut.result())
            raise

    def _commit_group(self) -> None:
        """Store every SA queued in this turn in one transaction.

        Each one is prepared (HA, home address: reading the store, which
        shows the group's earlier rows) and written in turn; a failure of
        the preparation fails that MN alone.  A failed write or COMMIT rolls
        the whole group back and fails every MN in it: the store then holds
        none of them, and no HA was told of any.
        """
        group, self._group, self._group_handle = self._group, [], None
        queued = [q for q in group if not q[3].done()]  # a cancelled caller: nothing stored
        if not queued:
            return
        # One instant for the whole group, taken now: a time from when an SA
        # was queued may lie before what the store's view has seen since
        # (``deliver`` reads it at the current time), and a view asked about
        # the past answers with SQL over every live SA instead.
        now = utcnow()
        results: list[_Stored | BaseException] = []
        store: Any = self.store
        # Each SA stored counts as being issued at once, not when its task
        # resumes: a later SA of the same MN in this group must not take it
        # for an older live SA and retire it (its failure then put back an
        # SA never delivered, marked delivered; found in review).
        issuing: list[int] = []
        try:
            try:
                with store.transaction(wait=0.0) if self._loop_tx else store.transaction():
                    for mn_id, suite, scope, _fut in queued:
                        try:
                            prep = self._prepare(mn_id, now)
                        except Exception as exc:  # handed to that caller alone
                            results.append(exc)
                            continue
                        try:
                            stored = self._store_now(prep, mn_id, suite, scope, now)
                        except IssueFailure as exc:  # no free SPI: nothing written
                            results.append(exc)
                            continue
                        issuing.append(stored.issued.sa.spi)
                        self._issuing_spis.add(issuing[-1])
                        results.append(stored)
            except BaseException:
                self._issuing_spis.difference_update(issuing)  # rolled back: none stored
                raise
        except StoreBusyError as exc:
            if self._wait_for_lock(queued, exc):
                return
            busy = IssueFailure(UNAVAILABLE, "sa-store-busy", _retry_after(BUSY_RETRY_AFTER))
            for *_, fut in queued:
                fut.set_exception(busy)
            return
        except Exception as exc:
            self._busy_since = None
            for *_, fut in queued:
                fut.set_exception(exc)
            return
        self._busy_since = None
        self._lock_outage.worked()  # a line if the lock had been found held
        for (*_, fut), result in zip(queued, results, strict=True):
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def _write_now(self) -> contextlib.AbstractContextManager[None]:
        """A transaction for a background write (expiry, sweep, the delivery
        batch) that waits at most ``LOOP_LOCK_WAIT`` for another process's
        write lock -- enough for another HAC's commit -- then raises
        ``StoreBusyError``: they all retry later, which beats a wait of up
        to 5 s inside SQLite, during which the event loop serves nobody."""
        begin = self._loop_tx
        return contextlib.nullcontext() if begin is None else begin()

    def _wait_for_lock(
        self, queued: list[tuple[str, Any, int, asyncio.Future[_Stored]]], exc: Exception
    ) -> bool:
        """The group found the store's write lock held (nothing was written):
        queue it again for a later turn, unless the lock has been held for
        ``STORE_BUSY_LIMIT`` already (then False: the group fails).  MNs
        issued meanwhile join the waiting group."""
        loop = asyncio.get_running_loop()
        t = loop.time()
        if self._busy_since is None:
            self._busy_since, self._busy_pause = t, STORE_BUSY_PAUSES[0]
        elif t - self._busy_since >= STORE_BUSY_LIMIT:
            self._busy_since = None  # the next group waits afresh
            self.stats["store_busy"] += len(queued)
            self._lock_outage.failed(exc, logging.WARNING)
            return False
        elif t - self._busy_since >= STORE_BUSY_QUIET:
            self._lock_outage.failed(exc, logging.WARNING)  # once per outage
        self._group = queued + self._group
        self._group_handle = loop.call_later(self._busy_pause, self._commit_group)
        self._busy_pause = min(2 * self._busy_pause, STORE_BUSY_PAUSES[1])
        return True

    def _undo_stored(self, stored: _Stored) -> None:
        """Take back a stored SA whose install failed or never went out (the
        MN's older SAs stay as they are: they go only after a 200)."""
        spi, mn_id = stored.issued.sa.spi, stored.issued.sa.mn_id
        self._issuing_spis.discard(spi)
        self._withdraw_when_delivered.discard(spi)
        self._supersedes.pop(spi, None)
        self._take_back(spi, mn_id, "provisioning-failed")

    def _confirm_later(self, spi: int) -> None:
        # Confirmations are batched (one UPDATE per CONFIRM_BATCH_S): losing a
        # batch in a crash only makes the next run withdraw those SPIs again,
        # which the HA confirms at once (a withdrawal is idempotent).
        self._to_confirm.add(spi)
        self._batch_soon()

    def _batch_soon(self) -> None:
        if self._confirm_timer is None:
            loop = asyncio.get_running_loop()
            self._confirm_timer = loop.call_later(CONFIRM_BATCH_S, self._confirm_now)

    def _confirm_now(self, *, final: bool = False) -> None:
        """Write the batch: confirmed withdrawals, and SAs whose 200 left.
        ``final`` (the stop): no bound on the wait for the store's lock."""
        self._confirm_timer = None
        delivered, self._to_mark_delivered = self._to_mark_delivered, set()
        spis, self._to_confirm = self._to_confirm, set()
        if not delivered and not spis:
            return
        try:
            with contextlib.nullcontext() if final else self._write_now():  # one commit
                if delivered:
                    self.store.delivered_many(sorted(delivered))  # type: ignore[attr-defined]
                if spis:
                    many = getattr(self.store, "confirm_retired_many", None)
                    if many is not None:
                        many(sorted(spis))
                    else:
                        for s in spis:
                            self.store.confirm_retired(s)
        except Exception as exc:
            # A full disk, a store locked by another HAC: kept and written
            # with the next batch.  Dropping the delivered marks would let
            # the sweep take back SAs whose 200 did leave -- the MN would
            # lose an SA it was told it holds; the sweep spares the SPIs
            # still waiting here (``sweep_undelivered``).  One line per
            # outage, not one per second.
            self._to_mark_delivered |= delivered
            self._to_confirm |= spis
            self._batch_outage.failed(
                f"{cause(exc)} ({len(delivered)} delivered SAs, {len(spis)} confirmed withdrawals)"
            )
            self._batch_soon()
            return
        self._batch_outage.worked()

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ha_cert_names(self, ha_id: str) -> list[str] | None:
        """The name an HA proves with its certificate: what the HAC checks
        when it provisions to that HA (PROFILE §9 pull) -- its
        ``server_name``, else the address it is reached at (an iPAddress
        SAN).  Before the twenty-seventh session an HA without
        ``server_name`` fell back to the pull listener's whole
        ``client_names``: any admitted HA could pull another's SAs, keys
        included (found in review)."""
        for h in self.cfg.ha:
            if h.id == ha_id:
                name = h.options.get("server_name") or h.options.get("host")
                return [str(name)] if name else []
        return None

    async def _on_pull(self, spi: int, ha_id: str) -> IssuedSA | None:
        """PROFILE §9 pull: a live SA (its 200 may have left before its
        delivery mark is written: pending ones too), only to the HA it was
        provisioned to, and never one of a revoked MN -- a revoke lists the
        MN before it retires its SAs, and a pull in between must not hand one
        out again (defence in depth, found in review)."""
        issued = self.store.get(spi, utcnow())
        if issued is not None and issued.sa.mn_id in self.revocations:
            log.warning("pull of spi=%d by ha_id=%s refused: its MN is revoked", spi, ha_id)
            return None
        if issued is not None and issued.sa.ha_id != ha_id:
            # Answered exactly like an unknown SPI: no oracle for other HAs' SPIs.
            log.warning(
                "pull of spi=%d by ha_id=%s refused: held by %s", spi, ha_id, issued.sa.ha_id
            )
            return None
        return issued

    def _expiry_interval(self) -> float:
        return self.cfg.hac.expiry_interval

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.hac.expiry_interval)
            step = self._clock_watch.check()
            if step is not None:
                log.warning("%s", step_line(step, ""))
            try:
                self._sweep_safely()  # a failing sweep must not skip the expiry
                # SAs that ended together: batch after batch, paced (core/pacing.py).
                await in_paced_batches(lambda: self.expire_now(sweep=False), EXPIRE_BATCH)
            except Exception as exc:  # a failing store must not end expiry for good
                self._expiry_outage.failed(cause(exc))
            else:
                self._expiry_outage.worked()

    def _issuing_bound(self) -> float:
        """Seconds after which no HAC still issues an SA it stored: the
        provisioning deadline, the batch that records delivery, and slack
        -- after a reload that lowered the deadline, the old one while an
        issue begun before it may still run (``provisioning_timeout_changed``)."""
        bound = self.cfg.hac.provisioning_timeout + 2 * CONFIRM_BATCH_S + 2.0
        floor, until = self._bound_floor
        return max(bound, floor) if time.monotonic() < until else bound

    def provisioning_timeout_changed(self, old_timeout: float) -> None:
        """A reload changed ``[hac] provisioning_timeout``: the HACs sharing
        the store hear this HAC's issuing bound at once, not at its next
        sweep (up to ``expiry_interval`` later), so none takes back an SA
        this one may now wait longer for (found in review).  Lowered, the
        old bound holds until the issues begun under it are over."""
        old = old_timeout + 2 * CONFIRM_BATCH_S + 2.0
        floor, until = self._bound_floor
        now = time.monotonic()
        if now >= until:
            floor, until = 0.0, 0.0
        # The larger of the floor still in force (a reload shortly before)
        # and this one: a second reload must not lower it under issues begun
        # two reloads ago (found in review).
        self._bound_floor = (max(floor, old), max(until, now + old))
        if self._owns:
            try:
                self._heartbeat()
            except Exception as exc:  # the next sweep writes it again
                log.warning(
                    "cannot record this HAC's issuing bound in the SA store: %s", cause(exc)
                )

    def _sweep_now(self) -> None:
        self._sweep_timer = None
        self._sweep_safely()

    def _owed_rows(self) -> list[tuple[int, str, str, datetime]]:
        """The unconfirmed withdrawals this HAC may send: with owners, all
        but those another live HAC that has their HA owes."""
        if self._owns:
            return self.store.orphaned_unconfirmed(utcnow())  # type: ignore[attr-defined,no-any-return]
        return self.store.retired_unconfirmed(utcnow())

    def _heartbeat(self) -> None:
        """Alive for three more sweeps (and slack), with these HAs: the
        others leave what this HAC owes to them to it until then (not a
        withdrawal from an HA it does not have: that one is theirs)."""
        grace = 3 * self.cfg.hac.expiry_interval + 5.0
        self.store.heartbeat(  # type: ignore[attr-defined]
            time.time() + grace, self._ha_by_id, issuing=self._issuing_bound()
        )

    def _leave(self) -> None:
        """At a stop: no longer alive in the store, so the other HACs take
        over what this one still owes at their next sweeps instead of after
        its heartbeat lapses (three intervals) -- it will not send it."""
        leave = getattr(self.store, "leave", None)
        if not self._owns or leave is None or self._listener is None:
            # Never started (``mipsec check-config``, a start that failed
            # before it served): never marked alive, nothing to undo.
            return
        try:
            leave()
        except Exception as exc:  # store busy or failing: the heartbeat lapses instead
            log.warning(
                "could not mark this HAC stopped in the SA store (%s): the other HACs "
                "take over its owed withdrawals once its heartbeat lapses",
                cause(exc),
            )

    def _claim(self, spis: list[int]) -> None:
        """Record that this HAC now owes these withdrawals (best effort: if
        the store is busy, another HAC may send them too -- a withdrawal is
        idempotent)."""
        if not self._owns:
            return
        try:
            with self._write_now():
                self.store.claim(spis)  # type: ignore[attr-defined]
        except Exception as exc:
            log.debug("cannot record %d withdrawal(s) as this HAC's: %s", len(spis), cause(exc))

    def _sweep_safely(self) -> None:
        try:
            with self._write_now():
                if self._owns:
                    self._heartbeat()
                self.sweep_undelivered()
            apart = getattr(self.store, "retired_unconfirmed_apart", None)
            if apart is None or self._stopping:
                self.adopt_owed_withdrawals()
            elif self._adopting is None:
                # The owed list read, and sifted, in a worker thread: it can
                # hold 100,000 rows, and this is the event loop.
                self._adopting = asyncio.create_task(self._adopt_apart(apart))
                self._tasks.add(self._adopting)
                self._adopting.add_done_callback(self._tasks.discard)
        except Exception as exc:  # the next expiry run tries again
            self._sweep_outage.failed(cause(exc))
        else:
            self._sweep_outage.worked()

    async def _adopt_apart(self, apart: Callable[[datetime], list[Any] | None]) -> None:
        try:
            now = utcnow()
            sifted = await asyncio.to_thread(self._sift_owed, apart, now)
            if sifted is None:
                self.adopt_owed_withdrawals()
                return
            owed, adopt = sifted
            self._owed_seen = owed
            self._adopt(
                [(spi, ha_id, datetime.fromtimestamp(end, tz=UTC)) for spi, ha_id, end in adopt]
            )
        except Exception as exc:  # the next sweep tries again
            self._sweep_outage.failed(cause(exc))
        finally:
            self._adopting = None

    def _sift_owed(
        self, apart: Callable[[datetime], list[Any] | None], now: datetime
    ) -> tuple[set[int], list[tuple[int, str, int]]] | None:
        """In a worker thread: the SPIs owed that this HAC could adopt, and
        those of them to adopt now (seen at the last sweep too).  Reads only
        membership of the loop's sets (atomic under the GIL), and
        ``_owed_seen``, which the loop replaces, never changes."""
        rows = apart(now)
        return None if rows is None else self._sift(rows)

    def _sift(
        self, rows: Iterable[tuple[int, str, _T]]
    ) -> tuple[set[int], list[tuple[int, str, _T]]]:
        """Of the unconfirmed withdrawals ``(spi, ha_id, end)``: the SPIs this
        HAC could adopt -- not its own, for an HA it has -- and those to adopt
        now, seen at the last sweep too (at most ``ADOPT_MAX``)."""
        withdrawing, to_confirm, has = self._withdrawing, self._to_confirm, self._ha_by_id
        seen = self._owed_seen
        owed: set[int] = set()
        adopt: list[tuple[int, str, _T]] = []
        for spi, ha_id, end in rows:
            if spi in withdrawing or spi in to_confirm or ha_id not in has:
                continue  # another HAC's own HA: not ours to reach
            owed.add(spi)
            if spi in seen and len(adopt) < ADOPT_MAX:
                adopt.append((spi, ha_id, end))
        return owed, adopt

    def sweep_undelivered(self) -> int:
        """Take back SAs stored but never answered with (issue 6: nothing stays
        live that the MN was not told of): an HAC -- this one before a crash,
        or another sharing the store -- stopped between its store write and
        its 200.  The MN bootstraps again; the HA is told to forget the SA."""
        if not self._tracks_delivery:
            return 0
        now = utcnow()
        bound = self._issuing_bound()
        shared = getattr(self.store, "issuing_bound", None)
        if shared is not None:
            # Another HAC sharing the store may wait longer for its HAs
            # (its provisioning_timeout): its SAs still being issued are
            # not undelivered yet (plugins/sa_store_sqlite.py, _ALIVE).
            bound = max(bound, shared(now))
        cutoff = now - timedelta(seconds=bound)
        spis = [
            s
            for s in self.store.undelivered(cutoff)  # type: ignore[attr-defined]
            # Their 200 left; only the record of it waits (``_confirm_now``).
            if s not in self._issuing_spis and s not in self._to_mark_delivered
        ]
        taken = [s for s in spis if self.retire(s, "undelivered")]
        if taken:
            log.info(
                "%d SA(s) stored but never answered with (an HAC stopped before its 200): "
                "withdrawn spi=%s",
                len(taken),
                _spi_list(taken),
            )
        return len(taken)

    def adopt_owed_withdrawals(self) -> int:
        """Withdraw, from here too, what another HAC sharing the store owes
        and may never finish: it retired the SA (superseded, revoked) and
        died before its HA confirmed -- a SIGKILL in the middle of
        ``mipsec revoke`` -- and only a start reads the owed list, so until
        some HAC restarts, the HA would keep the SA live.

        An SPI still unconfirmed, and not being withdrawn by this HAC, at two
        sweeps in a row (an expiry interval apart) is adopted -- with a store
        that records owners (the SQLite store's ``hac_alive``), only if the
        HAC that owes it is no longer alive: one that is retries it itself,
        and N HACs waiting out one HA outage then send and warn about their
        own withdrawals only.  Adopted SPIs are recorded as this HAC's.  A
        withdrawal is idempotent, so adopting one a live HAC still works on
        (a store without owners, a heartbeat missed) costs a duplicate
        request, never a wrong state.  At most ``ADOPT_MAX`` per sweep; how
        many were adopted."""
        rows = self._owed_rows()
        self._owed_seen, adopt = self._sift((spi, h, end) for spi, _m, h, end in rows)
        return self._adopt(adopt)

    def _adopt(self, adopt: list[tuple[int, str, datetime]]) -> int:
        adopted = []
        for spi, ha_id, end in adopt:
            # Checked again on the loop: a sift in a thread may be a moment old.
            if spi in self._withdrawing or spi in self._to_confirm:
                continue
            self._schedule_withdraw(ha_id, spi, end)
            adopted.append(spi)
        if adopted:
            self._claim(adopted)
            log.warning(
                "%d withdrawal(s) owed by a HAC sharing the store that is no longer alive "
                "or does not have their HA (or by a tool) and still not confirmed: "
                "withdrawing them from here too, spi=%s",
                len(adopted),
                _spi_list(adopted),
            )
        return len(adopted)

    def expire_now(self, *, sweep: bool = True) -> int:
        """Expire SAs whose validity ended: at most EXPIRE_BATCH when the
        store can bound its work (``expire_some``; the timer calls again at
        once, after a turn of the loop, while batches come back full), else
        all of them.  Returns how many."""
        if sweep:
            self._sweep_safely()  # a failing sweep must not skip the expiry
        expire_some = getattr(self.store, "expire_some", None)
        with self._write_now():
            if expire_some is not None:
                gone = expire_some(utcnow(), EXPIRE_BATCH)
            else:
                gone = [
                    (x.sa.spi, x.sa.mn_id, x.sa.validity_end) for x in self.store.expire(utcnow())
                ]
        for spi, mn_id, validity_end in gone:
            self._delivered.pop(spi, None)
            self.emit("mipsec_sa_expired", spi=spi, mn_id=mn_id, validity_end=validity_end)
        self._forget_delivered(time.time())
        return len(gone)

    def _forget_delivered(self, now: float) -> None:
        """Drop the delivery order of SAs past their validity end, whoever
        ended them (this HAC, another sharing the store, a tool)."""
        ends, delivered = self._delivered_ends, self._delivered
        while ends and ends[0][0] <= now:
            end, spi = heapq.heappop(ends)
            entry = delivered.get(spi)
            if entry is not None and entry[1] == end:
                del delivered[spi]


def _or_first(seq: int | None) -> int:
    """A delivery order for sorting: SAs this process did not deliver first."""
    return -1 if seq is None else seq


def hac_policy(cfg: HACConfig) -> HacPolicy:
    """The exchange's view of ``[policy]`` (built at start and at each reload)."""
    return HacPolicy(
        method_order=cfg.policy.methods,
        realm_methods={k.lower(): v for k, v in cfg.policy.realms.items()}
        or {"*": cfg.policy.methods},
        allowed_suites=cfg.policy.suites,
        max_scope=cfg.policy.max_scope,
    )


def _refused(exc: BaseException) -> bool:
    """The HA refused a provisioning operation before changing anything: a
    4xx answer, or ``ProvisioningRefused`` from an in-process HA.  No answer
    or a 5xx (e.g. the HA's binding cache could not commit) leaves the
    outcome unknown."""
    if isinstance(exc, ProvisioningRefused):
        return True
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500


def _spi_list(spis: list[int]) -> str:
    """SPIs for a log line: the first 20, then "..."."""
    return ",".join(str(s) for s in spis[:20]) + (",..." if len(spis) > 20 else "")


def _retry_after(seconds: int = 30) -> datetime:
    return (utcnow() + timedelta(seconds=seconds)).replace(microsecond=0)


def _busy(exch: HacExchange) -> Send:
    """The final response when ``max_in_progress`` requests are worked on
    already: 503 with ``retry-after`` (PROFILE §6) rather than a queue."""
    return exch.fail(UNAVAILABLE, _retry_after(BUSY_RETRY_AFTER))


class _Session:
    """One MN's MHAuth exchange on one TLS connection (a :class:`TlsHandler`).

    Made once the TLS handshake is done; the connection layer
    (core/roles/tlsserver.py) owns the socket, the deadlines and the cap.
    The session tells it where the exchange stands: a response sent means the
    next request is awaited; an SA issue or a method's I/O means the server
    is working (no deadline, not evictable).  Reading goes on while it works
    (``watch_peer``): the MN must wait (lockstep), so data or EOF then means
    it broke the sequence or went away, and the exchange voids the work --
    no SA stays live that the MN was not told about.
    """

    def __init__(self, service: HacService, conn: TlsConnection) -> None:
        self._svc = service
        self._conn = conn
        self._work: asyncio.Task[None] | None = None  # SA issue or method I/O
        self._peer = conn.peer
        self._done = False  # answered or closing: further input is ignored
        self._reported = False
        self._exch = HacExchange(
            cb_octets=service.bindings.of(conn.ssl_object),
            methods=service.methods,
            credentials=service.credentials,
            standin_key=service._standin,
            policy=service.policy,
            peer=self._peer,
        )
        service._sessions.add(self)
        service.stats["sessions"] += 1
        self._started = time.monotonic()

    # ------------------------------------------------------------ TlsHandler

    def data_received(self, data: bytes) -> None:
        if not self._done:
            self._handle(self._exch.receive_data(data))

    def eof_received(self) -> None:
        if not self._done:
            self._handle(self._exch.receive_eof())

    def connection_lost(self, reason: str) -> None:
        if not self._exch.finished:
            # Ended before the final response: a timeout, an eviction, a reset.
            self._exch.abort(_REASONS.get(reason, reason))
        if self._work is not None:
            self._work.cancel()  # void: nothing of it stays live (see _issue)
        self._done = True
        self._svc._sessions.discard(self)
        self._report()

    # ------------------------------------------------------------ internals

    def _report(self) -> None:
        if not self._reported and self._exch.finished:
            self._reported = True
            self._svc.exchange_ended(self._exch, self._peer, self._started)

    def cancel(self, reason: str = "service-stopped") -> asyncio.Task[None] | None:
        """Service stop (or ``reason``: a revoke): abandon work in progress
        (returned) and close."""
        task = self._work
        if task is not None:
            task.cancel()
        self._exch.abort(reason)
        self._close()
        return task

    def _close(self) -> None:
        self._done = True
        self._conn.close()  # close_notify, then TCP close (PROFILE §1 "closing")

    def _alive(self) -> bool:
        return not (self._done or self._conn.closing)

    def _handle(self, events: list[Send | Close | IssueSA | AwaitMethod]) -> None:
        for ev in events:
            if isinstance(ev, IssueSA | AwaitMethod):
                # The exchange stops here (nothing follows) until the work is done.
                if not self._conn.begin_work(watch_peer=True):
                    # max_in_progress reached: 503 + retry-after, not a queue.
                    if isinstance(ev, IssueSA):
                        self._send(self._svc.issue_saturated(self._exch, ev, self._peer))
                        return
                    close_awaitable(ev.pending.awaitable)
                    self._svc.stats["saturated"] += 1
                    self._handle(self._exch.method_result(Overloaded("HAC saturated")))
                    return
                work = self._issue(ev) if isinstance(ev, IssueSA) else self._await_method(ev)
                self._work = asyncio.create_task(work)
                return
            if self._work is not None and (isinstance(ev, Close) or ev.close):
                # The exchange ended while work is outstanding: the work is
                # void; its task takes back whatever it provisioned.
                self._work.cancel()
            if isinstance(ev, Send):
                if self._send(ev):
                    return
            else:
                log.debug("%s: closing without response: %s", self._peer, ev.reason)
                self._close()
                self._report()
                return

    def _send(self, ev: Send) -> bool:
        """Write one response; True when the connection closes after it."""
        if not ev.close:
            self._conn.write(ev.data)
            self._conn.await_request()  # the request deadline starts again at its first octet
            return False
        # Final response and close_notify leave together, in one TCP segment.
        self._done = True
        self._conn.close(ev.data)
        # Reported once the response is on its way: the MN need not wait for it.
        self._report()
        return True

    async def _issue(self, req: IssueSA) -> None:
        exch, svc = self._exch, self._svc
        issued: IssuedSA | None = None

        def stored(sa: IssuedSA) -> None:
            nonlocal issued
            issued = sa

        try:
            result = await svc.issue(exch, req, self._peer, on_stored=stored)
            if isinstance(result, Send):
                if issued is not None and issued.sa.spi in svc._issuing_spis:
                    # A failure answered without having taken the SA back
                    # (once: a retire of the older SAs that raised after
                    # the install, found in review; that retire follows
                    # the 200 since the twenty-ninth session): taken back
                    # here, so nothing stays live that the MN was not told
                    # of.  Every failure path of the issue takes back what
                    # it stored already.
                    svc.rollback(issued, self._peer, "internal-error", report=False)
                issued = None
                if self._alive():
                    self._send(result)
                else:
                    self._report()
                return
            if not self._alive() or exch.waiting != "issue":
                # The MN went away, or broke the lockstep, while its SA was being
                # issued: it never gets this SA, so nothing of it stays live.
                issued = None
                svc.rollback(result, self._peer, exch.reason or "peer-gone-before-200")
                self._report()
                return
            response = exch.complete(result)
            issued = None
            self._send(response)
            svc.deliver(result, self._peer)
        except asyncio.CancelledError:
            if issued is not None:
                svc.rollback(issued, self._peer, exch.reason or "cancelled")
            raise
        except Exception as exc:  # a bug in the issue path: answer 500, nothing stays live
            log.error(
                "mn_id=%s peer=%s: SA issue failed: %s", req.mn_id, self._peer, type(exc).__name__
            )
            if issued is not None:
                svc.rollback(issued, self._peer, "internal-error")
                issued = None
            if exch.waiting == "issue" and self._alive():
                self._send(exch.fail(INTERNAL_ERROR, reason="internal-error"))
            else:
                self._close()
                self._report()
        finally:
            self._work = None

    async def _await_method(self, ev: AwaitMethod) -> None:
        exch, svc = self._exch, self._svc
        timeout = ev.pending.timeout or svc.cfg.hac.request_timeout
        result: Any
        try:
            async with asyncio.timeout(timeout):
                result = await ev.pending.awaitable
        except asyncio.CancelledError:
            self._work = None
            raise
        except Exception as exc:  # handed to the method, which decides (504...)
            result = exc
        self._work = None
        if exch.waiting != "method" or not self._alive():
            self._report()
            return
        self._handle(exch.method_result(result))


# Connection-layer reasons (core/roles/tlsserver.py) -> audit reasons.
_REASONS = {
    "request-timeout": "timeout",
    "idle-timeout": "timeout",
    "handshake-timeout": "timeout",
    "closed": "peer-closed",
}


def close_awaitable(awaitable: Any) -> None:
    """Discard an awaitable that will never be awaited (no 'never awaited' warning)."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()
