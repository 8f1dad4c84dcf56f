"""What the HAC's control socket serves: status, SAs, revocation, reload.

Kept out of ``roles/hac.py`` on purpose: this module only reads the
service's state and, for ``revoke`` and ``reload``, uses the paths the
service already has (``retire`` withdraws an SA from its HA; a reload
swaps the objects new exchanges are built from).  Nothing here ever puts
key material in a response: SA rows are built field by field.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import logging
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mipsec.core import certexpiry, pluginmanager, servercert
from mipsec.core.config import HACConfig, load_config
from mipsec.core.control import ControlError, Dispatcher, arg_str
from mipsec.core.errors import CertificateError, ConfigError, HeaderError
from mipsec.core.filedigest import UnreadableFileError
from mipsec.core.hookspecs import hookimpl
from mipsec.core.issuer import utcnow
from mipsec.core.model import IssuedSA
from mipsec.core.nai import nai_key
from mipsec.core.outage import cause
from mipsec.core.reload import (
    ReloadRunner,
    restart_keys,
    set_log_level,
    stale,
)
from mipsec.core.roles.hac import LISTENER_LIMITS, HacService, hac_policy
from mipsec.core.roles.provserver import ACCESS_LEAVES, CAP_LEAF, TIMEOUT_LEAF
from mipsec.core.servercert import ServerCert
from mipsec.core.suites import Suite
from mipsec.core.version import version
from mipsec.core.wire.values import parse_nai

if TYPE_CHECKING:
    from mipsec.core.roles.ha_ops import HaOps

log = logging.getLogger("mipsec.hac")

# Top-level keys a reload applies; any other change needs a restart.
LIVE_KEYS = frozenset(
    {
        "policy",
        "credentials",
        "methods",
        "home_addresses",
        "ha_selection",
        "bootstrap",
        "log_level",
        "log_format",
        "log_levels",
    }
)
# Keys inside [hac] a reload applies: the MHAuth certificate and its key
# (a renewal), paths and contents alike; the listener's timeouts, caps and
# per-source rate (an operator tightens them under a slow-connection flood,
# or raises a cap under load, without dropping every MN mid-exchange); the
# timers read where they are used; and who may connect to the pull
# listener ([provisioning], ACCESS_LEAVES), its timeout and its cap.
LIMIT_LEAVES = frozenset(f"hac.{k}" for k in LISTENER_LIMITS)
# Read from the configuration where they are used: live once it is swapped.
READ_LIVE_LEAVES = frozenset(
    {"hac.provisioning_timeout", "hac.expiry_interval", "hac.drain_timeout"}
)
LIVE_LEAVES = (
    frozenset({"hac.cert", "hac.key", TIMEOUT_LEAF, CAP_LEAF})
    | ACCESS_LEAVES
    | LIMIT_LEAVES
    | READ_LIVE_LEAVES
)
TRACKER = "mipsec-control-tracker"


def _load_cert(cfg: HACConfig, file: str) -> ServerCert:
    """``cfg``'s MHAuth certificate, or ``ConfigError`` naming the key."""
    from mipsec.core.roles.preflight import file_error

    hac = cfg.hac
    try:
        return servercert.load(hac.cert, hac.key, strict_rfc6618=hac.strict_rfc6618)
    except (UnreadableFileError, CertificateError) as exc:
        raise file_error(file, exc, [("hac.cert", hac.cert), ("hac.key", hac.key)]) from None


class _MethodTracker:
    """Remembers which method authenticated the MN an SA was issued to.

    The SA record has no method; status counts SAs by method from what this
    process saw (SAs issued before a restart count as ``-``).
    """

    def __init__(self) -> None:
        self.authenticated: dict[str, str] = {}
        self.by_spi: dict[int, str] = {}
        # Each SPI's validity end, and a heap of them: an entry goes at its
        # SA's end whoever ended the SA -- with HACs sharing a store, another
        # HAC expires or supersedes most of this one's SAs, and the entries
        # stayed for good (found in review).
        self._end_of: dict[int, float] = {}
        self._ends: list[tuple[float, int]] = []
        # Per HA since start: SAs provisioned, provisioning failures, the last reason.
        self.provisioning: dict[str, dict[str, Any]] = {}

    def _ha(self, ha_id: str) -> dict[str, Any]:
        return self.provisioning.setdefault(ha_id, {"issued": 0, "failed": 0, "last_failure": None})

    @hookimpl
    def mipsec_mn_authenticated(self, mn_id: str, method: str) -> None:
        self.authenticated[mn_id] = method

    @hookimpl
    def mipsec_provisioning_failed(self, mn_id: str, ha_id: str, reason: str) -> None:
        self.authenticated.pop(mn_id, None)
        if ha_id != "-":  # "-": no HA was chosen (none available, saturated)
            row = self._ha(ha_id)
            row["failed"] += 1
            row["last_failure"] = reason

    @hookimpl
    def mipsec_sa_issued(self, spi: int, mn_id: str, ha_id: str, validity_end: datetime) -> None:
        self.prune(time.time())
        self.by_spi[spi] = self.authenticated.pop(mn_id, "-")
        end = validity_end.timestamp()
        self._end_of[spi] = end
        heapq.heappush(self._ends, (end, spi))
        self._ha(ha_id)["issued"] += 1

    @hookimpl
    def mipsec_sa_expired(self, spi: int) -> None:
        self.by_spi.pop(spi, None)
        self._end_of.pop(spi, None)

    @hookimpl
    def mipsec_sa_withdrawn(self, spi: int) -> None:
        self.by_spi.pop(spi, None)
        self._end_of.pop(spi, None)

    def prune(self, now: float) -> None:
        """Forget the SPIs whose SA has reached its validity end."""
        ends = self._ends
        while ends and ends[0][0] <= now:
            end, spi = heapq.heappop(ends)
            if self._end_of.get(spi) == end:
                del self._end_of[spi]
                self.by_spi.pop(spi, None)


def sa_row(issued: IssuedSA, method: str | None = None) -> dict[str, Any]:
    """One SA for an operator: identifiers and validity, never a key."""
    sa, bs = issued.sa, issued.bootstrap
    row: dict[str, Any] = {
        "spi": sa.spi,
        "mn_id": sa.mn_id,
        "ha": sa.ha_id or "-",
        "suite": sa.suite.name,
        "scope": sa.scope,
        "validity_end": sa.validity_end.isoformat(),
        "hoa": str(bs.ip6_hoa) if bs.ip6_hoa is not None else None,
        "ip4_hoa": str(bs.ip4_hoa) if bs.ip4_hoa is not None else None,
    }
    if method is not None:
        row["method"] = method
    return row


def _suite_name(suite: int) -> str:
    try:
        return Suite(suite).name
    except ValueError:  # a row altered on disk: shown, not trusted
        return str(suite)


def _listing_row(
    row: tuple[int, str, str, int, int, float, str | None, str | None], method: str
) -> dict[str, Any]:
    """``sa_row`` of a store listing row (``SQLiteSAStore.live_listing``)."""
    spi, mn_id, ha_id, suite, scope, end, ip6_hoa, ip4_hoa = row
    return {
        "spi": spi,
        "mn_id": mn_id,
        "ha": ha_id or "-",
        "suite": _suite_name(suite),
        "scope": scope,
        "validity_end": datetime.fromtimestamp(end, UTC).isoformat(),
        "hoa": ip6_hoa,
        "ip4_hoa": ip4_hoa,
        "method": method,
    }


def _listing_rows(
    raw: list[tuple[int, str, str, int, int, float, str | None, str | None]],
    methods: Mapping[int, str],
) -> list[dict[str, Any]]:
    # In a worker thread while the loop may add to ``methods``: only single
    # lookups (atomic under the GIL), never an iteration over it.
    rows = [_listing_row(r, methods.get(r[0], "-")) for r in raw]
    rows.sort(key=lambda r: (r["mn_id"], r["validity_end"], r["spi"]))
    return rows


def transport_connections(transport: Any) -> dict[str, Any] | None:
    """A provisioning transport's connection figures, for status and metrics.

    Optional (``stats()``: the ``tls`` transport gives its counters, open
    connections and requests in flight; a third party's may give none):
    None without it, ``{"error": class name}`` when it raises -- a plugin's
    bug never breaks status or a scrape.
    """
    stats = getattr(transport, "stats", None)
    if not callable(stats):
        return None
    try:
        return dict(stats())
    except Exception as exc:
        return {"error": type(exc).__name__}


def aaa_health(methods: Mapping[str, Any]) -> dict[str, Any]:
    """Per AAA server: its counters and whether it is held off as dead.

    Read from the EAP method's back ends that carry a RADIUS client
    (``aaa/passthrough.py``); methods without one add nothing.
    """
    out: dict[str, Any] = {}
    for factory in methods.values():
        # The eap method keeps its back ends in its configuration (core/eap/mhauth.py).
        backends = getattr(factory, "backends", None) or getattr(
            getattr(factory, "cfg", None), "backends", None
        )
        for name, backend in (backends or {}).items():
            client = getattr(backend, "client", None)
            stats = getattr(client, "stats", None)
            if client is None or not callable(stats):
                continue
            servers: dict[str, Any] = {}
            for label, st in stats().items():
                row: dict[str, Any] = (
                    dataclasses.asdict(st)
                    if dataclasses.is_dataclass(st) and not isinstance(st, type)
                    else {}
                )
                is_dead = getattr(client, "is_dead", None)
                row["dead"] = bool(is_dead(label)) if callable(is_dead) else None
                servers[label] = row
            out[name] = servers
    return out


def _listener_status(svc: HacService) -> dict[str, Any]:
    """The MHAuth listener's connections against its limits now (a reload
    may have changed them: "Listener limits" in README)."""
    lst = svc._listener
    if lst is None:
        return {}
    limits = lst.limits
    return {
        "connections": lst.connections,
        "in_progress": lst.table.in_progress,
        "max_connections": limits.max_connections,
        "max_in_progress": limits.max_in_progress,
        "handshake_timeout_s": limits.handshake_timeout,
        "request_timeout_s": limits.request_timeout,
        "idle_timeout_s": limits.idle_timeout,
        "exchange_timeout_s": limits.exchange_timeout,
        "per_source_rate": limits.per_source_rate or 0,
        "per_source_burst": limits.per_source_burst,
    }


class HacOps:
    def __init__(
        self, service: HacService, config_file: str, local_ha: HaOps | None = None
    ) -> None:
        self.svc = service
        self.config_file = config_file
        self.local_ha = local_ha
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC).replace(microsecond=0)
        self.tracker = _MethodTracker()
        service.pm.register(self.tracker, name=TRACKER)
        self.reloader = ReloadRunner("hac", config_file, self._reload)
        self._closing: set[asyncio.Task[None]] = set()

    def dispatcher(self) -> Dispatcher:
        handlers = {
            "status": self.status,
            "sas": self.sas,
            "revoke": self.revoke,
            "unrevoke": self.unrevoke,
            "reload": self.reload,
        }
        if self.local_ha is not None:  # model 1: the in-process HA's bindings
            handlers["bindings"] = self.local_ha.bindings
        return Dispatcher("hac", handlers, listings=("sas", "bindings"))

    # ------------------------------------------------------------ reading

    async def _live_counts(self) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
        """Live SAs in all, by HA, by suite, by method -- without reading each SA
        back when the store can count (the SQLite store's ``live_counts``), and
        off the event loop when it can count apart (``live_counts_apart``)."""
        now = utcnow()
        by_ha: Counter[str] = Counter()
        by_suite: Counter[str] = Counter()
        store = self.svc.store
        apart = getattr(store, "live_counts_apart", None)
        rows = await asyncio.to_thread(apart, now) if apart is not None else None
        counts = getattr(store, "live_counts", None)
        if rows is None and counts is not None:
            rows = counts(now)
        if rows is not None:
            for ha_id, suite, n in rows:
                by_ha[ha_id or "-"] += n
                by_suite[_suite_name(suite)] += n
            total = sum(by_ha.values())
            # The tracker holds the SPIs issued since start that are still
            # live; the others were issued before it (method unknown: "-").
            self.tracker.prune(time.time())
            by_method = Counter(self.tracker.by_spi.values())
            by_method["-"] += max(0, total - sum(by_method.values()))
            return total, by_ha, by_suite, +by_method
        live = self.svc.store.live(now)
        by_ha.update(i.sa.ha_id or "-" for i in live)
        by_suite.update(i.sa.suite.name for i in live)
        return (
            len(live),
            by_ha,
            by_suite,
            Counter(self.tracker.by_spi.get(i.sa.spi, "-") for i in live),
        )

    def _ha_status(self, ha_id: str, transport_name: str) -> dict[str, Any]:
        row: dict[str, Any] = {"transport": transport_name, **self.tracker._ha(ha_id)}
        connections = transport_connections(self.svc.transports.get(ha_id))
        if connections is not None:
            row["connections"] = connections
        return row

    async def status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        svc = self.svc
        total, by_ha, by_suite, by_method = await self._live_counts()
        out: dict[str, Any] = {
            "role": "hac",
            "version": version(),
            "config": str(Path(self.config_file).resolve()),
            "started": self.started_at.isoformat(),
            "uptime_s": int(time.monotonic() - self.started),
            "listen": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in svc.addresses],
            "plugins": sorted(n for n, p in svc.pm.list_name_plugin() if p and n != TRACKER),
            "methods": sorted(svc.methods),
            "sas": {
                "live": total,
                "by_ha": dict(by_ha),
                "by_suite": dict(by_suite),
                "by_method": dict(by_method),
            },
            "exchanges_in_progress": len(svc._sessions),
            "listener": _listener_status(svc),
            "issuing": len(svc._issuing_spis),
            "revoked": len(svc.revocations),
            "counters": dict(svc.stats),
            "provisioning": {
                "has": {h.ha_id: self._ha_status(h.ha_id, h.transport) for h in svc.has},
                "withdrawals_pending": len(svc._withdrawing),
            },
            "last_reload": self.reloader.last,
            "certificates": certexpiry.status_rows(svc.certificates(), utcnow()),
        }
        if svc._owns:
            # The HACs sharing the SA store that count as alive (each leaves
            # the others' withdrawals to them: core/roles/hac.py).
            store: Any = svc.store
            out["store"] = {
                "owner": store.owner,
                "hacs_alive": [o for o, _ in store.alive_owners(utcnow())],
            }
        checkpointer = getattr(svc.store, "checkpointer", None)
        if checkpointer is not None:  # core/walcheckpoint.py
            out["store_checkpoint"] = checkpointer.status()
        aaa = aaa_health(svc.methods)
        if aaa:
            out["aaa"] = aaa
        accounting = getattr(svc.accounting, "stats", None)
        if dataclasses.is_dataclass(accounting) and not isinstance(accounting, type):
            out["accounting"] = dataclasses.asdict(accounting)
        if self.local_ha is not None:
            ha = await self.local_ha.status(args)
            out["local_ha"] = ha
            out["bindings"] = ha["bindings"]
        return out

    async def sas(self, args: Mapping[str, Any]) -> dict[str, Any]:
        mn_id = None
        if args.get("mn_id") is not None:
            # Checked as revoke checks it: a lone surrogate gave "internal
            # error: UnicodeEncodeError" (found in review).  The canonical
            # form is the one SAs are bound to (core/nai.py).
            _, mn_id = mn_id_arg(args)
        now = utcnow()
        by_spi = self.tracker.by_spi
        listing = getattr(self.svc.store, "live_listing", None)
        if listing is not None:
            # Columns only: no key is unwrapped to list SAs (100k SAs would
            # hold the event loop for seconds), and the rows are built and
            # sorted in a worker thread; every live SA is also read there, on
            # a connection of its own, when the store can (one MN's are an
            # index seek, read here).
            apart = getattr(self.svc.store, "live_listing_apart", None)
            raw = None
            if mn_id is None and apart is not None:
                raw = await asyncio.to_thread(apart, now)
            if raw is None:
                raw = listing(now, mn_id)
            return {"role": "hac", "sas": await asyncio.to_thread(_listing_rows, raw, by_spi)}
        store = self.svc.store
        live = store.live_for_mn(mn_id, now) if mn_id is not None else store.live(now)
        rows = [sa_row(i, by_spi.get(i.sa.spi, "-")) for i in live]
        rows.sort(key=lambda r: (r["mn_id"], r["validity_end"], r["spi"]))
        return {"role": "hac", "sas": rows}

    # ------------------------------------------------------------ revocation

    async def revoke(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Refuse the MN from now on (persisted first), end its exchanges in
        progress, and withdraw every live SA it holds from its HA."""
        given, mn_id = mn_id_arg(args)
        svc = self.svc
        try:
            added = svc.revocations.add(mn_id)
        except OSError as exc:
            raise ControlError(f"revocations.path: cannot write: {exc.strerror}") from None
        except ConfigError as exc:
            # The shared list cannot be read back (another writer's bad
            # line): said, not "internal error: ConfigError" (found in review).
            raise ControlError(f"revocations.path: {exc.reason}") from None
        # An exchange of this MN already past authentication would otherwise
        # still end in a 200: cancelling rolls its SA back (roles/hac.py).
        ended = 0
        for session in list(svc._sessions):
            if session._exch.mn_id == mn_id:
                session.cancel("revoked")  # the audit line says why, not "service-stopped"
                ended += 1
        withdrawn = []
        unrecorded = []
        now = utcnow()
        by_nai = getattr(svc.store, "live_for_nai", None)
        if by_nai is not None:
            # Every spelling of its realm, those stored before the canonical
            # binding included (plugins/sa_store_sqlite.py).
            held = by_nai(mn_id, now)
        else:
            keys = dict.fromkeys((mn_id, given))
            held = [i for key in keys for i in svc.store.live_for_mn(key, now)]
        for issued in held:
            sa = issued.sa
            try:
                # Another process's write lock is waited out from the event
                # loop, which serves every MN meanwhile (not inside SQLite).
                if await svc.write_soon(functools.partial(svc.retire, sa.spi, "revoked")):
                    withdrawn.append(sa.spi)
            except Exception as exc:
                # The store cannot record the retirement now (full disk, the
                # write lock held for STORE_BUSY_LIMIT):
                # the HA is told all the same -- a withdrawal there is for
                # good, and it never installs the SA again -- so a revoked
                # MN keeps no working SA; the row expires in the store.
                log.error(
                    "mn_id=%s spi=%d: cannot record the revocation's withdrawal (%s); "
                    "withdrawn from HA %s all the same",
                    mn_id,
                    sa.spi,
                    cause(exc),
                    sa.ha_id,
                )
                svc.withdraw_unrecorded(sa.ha_id, sa.spi, sa.validity_end)
                withdrawn.append(sa.spi)
                unrecorded.append(sa.spi)
        log.warning(
            "mn_id=%s revoked%s: %d SA(s) withdrawn (spi=%s), %d exchange(s) ended",
            mn_id,
            "" if added else " (already)",
            len(withdrawn),
            ",".join(map(str, withdrawn)) or "-",
            ended,
        )
        out: dict[str, Any] = {
            "mn_id": mn_id,
            "revoked": True,
            "withdrawn": withdrawn,
            "exchanges_ended": ended,
        }
        if unrecorded:
            out["not_recorded"] = unrecorded  # withdrawn from the HA, still rows in the store
        return out

    async def unrevoke(self, args: Mapping[str, Any]) -> dict[str, Any]:
        try:
            _, mn_id = mn_id_arg(args)
        except ControlError:
            # An entry listed before the NAI grammar was checked this
            # strictly (twenty-eighth session) can still be taken off.
            given = arg_str(args, "mn_id")
            if given is None or given not in self.svc.revocations:
                raise
            mn_id = nai_key(given)
        try:
            removed = self.svc.revocations.remove(mn_id)
        except OSError as exc:
            raise ControlError(f"revocations.path: cannot write: {exc.strerror}") from None
        except ConfigError as exc:
            raise ControlError(f"revocations.path: {exc.reason}") from None
        log.warning("mn_id=%s unrevoked%s", mn_id, "" if removed else " (was not revoked)")
        return {"mn_id": mn_id, "revoked": False, "was_revoked": removed}

    # ------------------------------------------------------------ reload

    async def reload(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return await self.reloader.via_control()

    def _reload(self) -> list[str]:
        changed = self._apply()
        # The certificates now presented: any due for renewal, once per reload.
        certexpiry.report(log, "hac", self.svc.certificates(), utcnow())
        return changed

    def _apply(self) -> list[str]:
        """Validate the file as a start does, then swap what new exchanges use.

        Raises ``ConfigError`` (nothing changed) or returns the keys changed.
        Exchanges in progress keep the policy, methods and credentials they
        started with (each holds its own references); the objects replaced
        are closed once those exchanges are over.
        """
        from mipsec.core.roles.preflight import preflight

        svc, file = self.svc, self.config_file
        new = load_config(file, "hac")
        assert isinstance(new, HACConfig)
        preflight(new, file)
        changed, restart = restart_keys(svc.cfg, new, LIVE_KEYS, LIVE_LEAVES)
        if restart:
            raise ConfigError(file, ", ".join(restart), "changes only with a restart")
        if stale(svc.accounting):
            # Accounting is built at start only: a rotated secret_file would
            # go unnoticed -- every Accounting-Response then fails to verify,
            # each record retried for an hour and dropped (found in review).
            raise ConfigError(
                file,
                "accounting",
                "a RADIUS secret_file now holds another secret: accounting takes it "
                "only with a restart",
            )
        if "methods" not in changed and any(stale(f) for f in svc.methods.values()):
            # A file a method was built from changed (a rotated RADIUS
            # secret_file, a renewed EAP-TLS server certificate): built
            # again as if its options had changed.
            changed = sorted([*changed, "methods"])
        cert: ServerCert | None = None
        if {"hac.cert", "hac.key"} & set(changed) or svc.bindings.current.files.changed():
            # A renewed MHAuth certificate (new paths, or new contents under
            # the same ones): loaded now, served once everything else built.
            cert = _load_cert(new, file)
            changed = sorted({*changed, "hac.cert"} - {"hac.key"})
        # Provisioning TLS renewed in place: the pull listener's certificate
        # ([provisioning]) and each HA transport's client certificate and CA
        # (an [[ha]] entry's options, which otherwise change only with a
        # restart).
        prov = svc._prov_server
        renew_listener = prov.renewal(file, "provisioning.") if prov else None
        if renew_listener is not None:
            changed = sorted({*changed, "provisioning.cert"})
        stale_has = [(i, h) for i, h in enumerate(new.ha) if stale(svc.transports.get(h.id))]
        changed = sorted({*changed, *(f"ha[{i}]" for i, _ in stale_has)})
        if not changed:
            return []
        ctx = svc.plugin_ctx
        built: list[Any] = []
        try:
            methods = svc.methods
            if {"methods", "policy"} & set(changed):
                methods = svc._method_factories(ctx, new)
                built += [f for n, f in methods.items() if svc.methods.get(n) is not f]
            credentials = svc.credentials
            if "credentials" in changed:
                credentials = svc.create_plugin("credentials", new)
                built.append(credentials)
            allocator = svc.allocator
            if "home_addresses" in changed:
                allocator = svc.create_plugin("home_addresses", new)
            selector = svc.selector
            if "ha_selection" in changed:
                selector = svc.create_plugin("ha_selection", new)
            transports = dict(svc.transports)
            for i, h in stale_has:
                transports[h.id] = pluginmanager.create(
                    svc.pm,
                    "mipsec_provisioning_transports",
                    h.transport,
                    dict(h.options),
                    ctx,
                    key=f"ha[{i}]",
                )
                built.append(transports[h.id])
        except BaseException:
            self._close_later(built, set())
            raise
        old: list[Any] = [f for n, f in svc.methods.items() if methods.get(n) is not f]
        if credentials is not svc.credentials:
            old.append(svc.credentials)
        in_flight = set(svc._sessions)
        # A replaced transport may still carry a request begun before the
        # swap (an install, a background withdrawal): it is closed once the
        # exchanges in flight are over and a provisioning timeout has passed.
        old_transports = [t for k, t in svc.transports.items() if transports[k] is not t]
        svc.transports = transports
        old_timeout = svc.cfg.hac.provisioning_timeout
        svc.cfg = new
        if new.hac.provisioning_timeout != old_timeout:
            svc.provisioning_timeout_changed(old_timeout)
        svc.policy = hac_policy(new)
        svc.methods = methods
        svc.credentials = credentials
        svc.allocator = allocator
        svc.selector = selector
        if cert is not None:
            svc.use_cert(cert)
            log.info(
                "hac now serves the certificate in %s (valid until %s) to new connections",
                new.hac.cert,
                cert.not_after.isoformat(),
            )
        if prov is not None and new.provisioning is not None and ACCESS_LEAVES & set(changed):
            prov.apply_access(new.provisioning)
        if prov is not None and new.provisioning is not None and TIMEOUT_LEAF in changed:
            prov.apply_timeout(new.provisioning)
        if prov is not None and new.provisioning is not None and CAP_LEAF in changed:
            prov.apply_max_connections(new.provisioning)
        if LIMIT_LEAVES & set(changed):
            svc.apply_limits(new)
        if renew_listener is not None and new.provisioning is not None:
            renew_listener()
            log.info(
                "hac provisioning listener now presents the certificate in %s to new connections",
                new.provisioning.cert,
            )
        for i, h in stale_has:
            log.info(
                "hac provisioning to HA %s: ha[%d] transport built again from its "
                "renewed files (new connections)",
                h.id,
                i,
            )
        set_log_level(new)
        self._close_later(old, in_flight)
        self._close_later(old_transports, in_flight, grace=new.hac.provisioning_timeout)
        return changed

    def _close_later(self, objs: list[Any], sessions: set[Any], grace: float = 0.0) -> None:
        """Close replaced plugin objects once the exchanges that hold them
        are over, and ``grace`` seconds have passed."""
        if not objs:
            return

        async def close() -> None:
            await asyncio.sleep(grace)
            while sessions & self.svc._sessions:
                await asyncio.sleep(1.0)
            for obj in objs:
                with contextlib.suppress(Exception):
                    aclose = getattr(obj, "aclose", None)
                    if aclose is not None:
                        await aclose()
                    else:
                        closer = getattr(obj, "close", None)
                        if closer is not None:
                            closer()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        for t in list(self._closing):
            t.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.svc.pm.unregister(self.tracker)


def mn_id_arg(args: Mapping[str, Any]) -> tuple[str, str]:
    """``mn_id`` as given and in its canonical form, if an MN can send it (PROFILE §3):
    SAs and exchanges are bound to that (core/nai.py), and an SA stored
    before under the spelling given is found too.  An identity no MN can
    send (a stray CR from a pasted line, a space) is refused -- it was
    persisted and acknowledged, and never matched the MN (found in review)."""
    given = arg_str(args, "mn_id")
    assert given is not None
    try:
        parse_nai(given)
    except HeaderError as exc:
        raise ControlError(f"mn_id: {exc.reason}") from None
    return given, nai_key(given)
