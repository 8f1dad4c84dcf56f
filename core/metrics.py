"""Prometheus metrics: ``/metrics`` and ``/healthz`` per role (issue 10 item 3).

Each role owns one ``CollectorRegistry`` (not prometheus_client's global one,
so several roles -- or tests -- can share a process).  Two kinds of series:

* counted as they happen: ``mipsec_bootstraps_total{method,status}`` and the
  ``mipsec_bootstrap_duration_seconds`` histogram, fed by the HAC once per
  finished exchange (``HacService.exchange_ended``);
* read at scrape time from counters the roles keep anyway (the HA core's drops
  by reason, the listeners' connection counters, provisioning per HA, the
  RADIUS client's per-server counters): nothing extra on the hot path, and the
  figures cannot drift from what ``mipsec status`` shows.

The HTTP side is a deliberately small HTTP/1.0 server on the role's own event
loop: one request per connection, a 4 KiB request head read within 5 s, GET
only, two paths.  Exporting must never become a way to hold the role's memory
or loop (the same rules as the HAC's TLS listener, at a smaller scale), and it
needs no thread.  Bind it to a management address: it tells counts, never an
identity or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mipsec.core.certexpiry import prefixed
from mipsec.core.ratelimit import peer_ip

__all__ = ["HaMetrics", "HacMetrics", "MetricsServer", "start_metrics"]

log = logging.getLogger("mipsec.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 4096
READ_TIMEOUT = 5.0
# Connections held at once.  At the cap, the one that has waited longest for
# its request head is closed to make room (the TLS listeners' eviction rule,
# core/conntable.py): a scraper's GET arrives at once, so connections held
# open without a request cannot keep it out.
MAX_CLIENTS = 16


class _ReadAtScrape(Collector):
    """Builds metric families from a function called at each scrape."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._build()
        except Exception as exc:  # a scrape must not take the role down
            log.warning("metrics collection failed: %s", type(exc).__name__)


def _counter(name: str, doc: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in sorted(values.items()):
        fam.add_metric([str(k)], float(v))
    return fam


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _certificate_family(found: Mapping[str, datetime]) -> GaugeMetricFamily:
    """notAfter (Unix time) of each certificate the role presents, labelled
    with the configuration setting naming its file (core/certexpiry.py):
    alert on ``value - time()``.  (No "key" in the text: the observability
    test keeps that word out of every scrape.)"""
    fam = GaugeMetricFamily(
        "mipsec_certificate_not_after_seconds",
        "notAfter of each certificate the role presents (Unix time), by setting",
        labels=["cert"],
    )
    for key, end in sorted(found.items()):
        fam.add_metric([key], end.timestamp())
    return fam


def _listener_families(prefix: str, listener: Any) -> Iterator[Metric]:
    if listener is None:
        return
    yield _gauge(f"{prefix}_connections", "TLS connections held now", listener.connections)
    yield _counter(
        f"{prefix}_connection_events",
        "TLS connection events: accepted, evicted, refused, deadlines, failed handshakes",
        "event",
        dict(listener.stats),
    )


class HacMetrics:
    """The HAC's registry; ``bootstrap()`` is called once per finished exchange."""

    def __init__(self, service: Any, tracker: Any = None, local_ha: Any = None) -> None:
        self.svc = service
        self.tracker = tracker  # roles/hac_ops.py: SAs issued / failures per HA
        # Model 1: the HA in this process has no listener of its own; its
        # series come on the HAC's /metrics (found in review: none did).
        self.local_ha = local_ha
        self.registry = CollectorRegistry(auto_describe=True)
        self.bootstraps = Counter(
            "mipsec_bootstraps",
            "Finished MN exchanges by method and final status ('none': no final response)",
            ["method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mipsec_bootstrap_duration_seconds",
            "From the TLS connection's accept to the exchange's end",
            ["method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.registry.register(_ReadAtScrape(self._collect))

    def bootstrap(self, method: str, status: int | None, seconds: float | None) -> None:
        self.bootstraps.labels(method, str(status) if status is not None else "none").inc()
        if seconds is not None:
            self.latency.labels(method).observe(seconds)

    def _collect(self) -> Iterator[Metric]:
        from mipsec.core.issuer import utcnow

        svc = self.svc
        by_ha = svc.store.count_by_ha(utcnow())
        live = GaugeMetricFamily("mipsec_live_sas", "Live SAs by HA", labels=["ha"])
        for ha_id in sorted({h.ha_id for h in svc.has} | set(by_ha)):
            live.add_metric([ha_id], float(by_ha.get(ha_id, 0)))
        yield live
        certs = dict(svc.certificates())
        if self.local_ha is not None:
            certs.update(prefixed("local_ha.", self.local_ha.certificates()))
        yield _certificate_family(certs)
        yield _counter(
            "mipsec_hac_events", "HAC counters (sessions, saturated, withdrawn, ...)", "event",
            dict(svc.stats),
        )  # fmt: skip
        yield _gauge("mipsec_exchanges_in_progress", "MN exchanges open", len(svc._sessions))
        yield _gauge("mipsec_revoked_mns", "MNs on the revocation list", len(svc.revocations))
        yield from _listener_families("mipsec_hac", svc._listener)
        prov = getattr(self.tracker, "provisioning", None)
        if prov:
            ok = CounterMetricFamily(
                "mipsec_provisioning", "SA installs per HA by outcome", labels=["ha", "outcome"]
            )
            for ha_id, row in sorted(prov.items()):
                ok.add_metric([ha_id, "issued"], float(row.get("issued", 0)))
                ok.add_metric([ha_id, "failed"], float(row.get("failed", 0)))
            yield ok
        yield from _transport_families(svc)
        from mipsec.core.roles.hac_ops import aaa_health

        yield from _radius_families(aaa_health(svc.methods))
        if self.local_ha is not None:
            yield from _ha_families(self.local_ha)


def _transport_families(svc: Any) -> Iterator[Metric]:
    """Per HA, a transport's connections when it reports them (``tls``):
    counters since start, and what is open and in flight now."""
    counters = CounterMetricFamily(
        "mipsec_provisioning_connection_events",
        "HAC->HA provisioning client counters (connects, requests, retries)",
        labels=["ha", "event"],
    )
    now = GaugeMetricFamily(
        "mipsec_provisioning_connections",
        "HAC->HA provisioning connections open, and requests in flight",
        labels=["ha", "state"],
    )
    from mipsec.core.roles.hac_ops import transport_connections

    seen = False
    for ha_id, transport in sorted(svc.transports.items()):
        row = transport_connections(transport)
        if row is None:
            continue
        seen = True  # a failing stats() ({"error": ...}) gives no samples
        for k in ("connects", "requests", "retries"):
            if isinstance(row.get(k), int | float):
                counters.add_metric([ha_id, k], float(row[k]))
        for k in ("open", "in_flight"):
            if isinstance(row.get(k), int | float):
                now.add_metric([ha_id, k], float(row[k]))
    if seen:
        yield counters
        yield now


def _radius_families(servers: Mapping[str, Any]) -> Iterator[Metric]:
    """``aaa_health``'s counters: per back end and server."""
    if not servers:
        return
    rt = CounterMetricFamily(
        "mipsec_radius",
        "RADIUS client counters per back end and server",
        labels=["backend", "server", "counter"],
    )
    dead = GaugeMetricFamily(
        "mipsec_radius_server_dead", "1 while a server is held off as dead",
        labels=["backend", "server"],
    )  # fmt: skip
    for backend, server, row in _radius_rows(servers):
        for k, v in row.items():
            if isinstance(v, bool):
                if k == "dead":
                    dead.add_metric([backend, server], float(v))
            elif isinstance(v, int | float):
                rt.add_metric([backend, server, k], float(v))
    yield rt
    yield dead


def _radius_rows(health: Mapping[str, Any]) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """``aaa_health`` is {back end: {server: counters}}: one row per back end
    and server.  Two back ends may name the same server, each with a client
    and counters of its own: labelled by server alone they gave the same
    series twice (found in review), so the back end is a label too."""
    for backend, servers in sorted(health.items()):
        for name, row in servers.items():
            yield str(backend), str(name), row


class HaMetrics:
    """The HA's registry: everything is read at scrape time from its counters."""

    def __init__(self, service: Any) -> None:
        self.svc = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ReadAtScrape(self._collect))

    def _collect(self) -> Iterator[Metric]:
        yield from _ha_families(self.svc)
        yield _certificate_family(self.svc.certificates())


# The HA data plane's counters (roles/ha_data.py): packets by direction, the
# forwarder's drops by reason, and those it counts on its own.
_DATA_DIRECTIONS = ("in", "out", "plain_in", "plain_out")
_DATA_DROP_COUNTS = {
    "reserve_unwritten": "reserve_unwritten",
    "tun_gone_drops": "tun_gone",
    "tun_down_drops": "tun_down",
}
_DATA_NOT_EVENTS = frozenset(("drops", *_DATA_DIRECTIONS, *_DATA_DROP_COUNTS))


# HA gauges added in the twenty-ninth session: what [ha] max_spi_records
# caps, the cap, and the unknown SPIs the pull gate remembers.
_HA_GAUGES = (
    ("mipsec_ha_spi_records", "SPI records held: live SAs and withdrawal records", "spi_records"),
    ("mipsec_ha_withdrawn_spis", "Withdrawal records held", "withdrawn_spis"),
    ("mipsec_ha_spi_records_max", "[ha] max_spi_records", "max_spi_records"),
    ("mipsec_ha_pull_sightings", "Unknown SPIs remembered for a second sighting", "pull_sightings"),
    ("mipsec_ha_pull_sources", "Sources with a pull bucket (LRU evicted)", "pull_sources"),
)
_PULL_OUTCOMES = {
    "started": "pulls",
    "found": "pulls_found",
    "refused": "pulls_refused",
    "deferred": "pulls_deferred",
    "limited": "pulls_limited",
}


def _ha_families(svc: Any) -> Iterator[Metric]:
    """An HA's series (its own /metrics, or the HAC's for an HA in its process)."""
    st = svc.stats()
    yield _counter(
        "mipsec_ha_packets_dropped", "Packets dropped by reason", "reason", st.get("drops", {})
    )
    yield CounterMetricFamily(
        "mipsec_ha_packets", "Packets received on the MIP6 port", value=st.get("packets", 0)
    )
    yield CounterMetricFamily("mipsec_ha_binding_updates", "BUs accepted", value=st.get("bu", 0))
    yield _counter(
        "mipsec_ha_binding_acks", "BAs sent by status", "status",
        {str(k): v for k, v in st.get("ba", {}).items()},
    )  # fmt: skip
    yield _gauge("mipsec_ha_sas", "SAs installed", st.get("sas", 0))
    for name, doc, key in _HA_GAUGES:
        if isinstance(st.get(key), int):
            yield _gauge(name, doc, st[key])
    limits = st.get("pull_limits")
    if isinstance(limits, dict):
        # [pull]'s limits in force (a reload changes them in place): a
        # dashboard sets pulls_total against what was allowed (thirtieth session).
        fam = GaugeMetricFamily("mipsec_ha_pull_limit", "[pull] limits in force", labels=["limit"])
        for limit, v in limits.items():
            fam.add_metric([limit], float(v))
        yield fam
    yield CounterMetricFamily(
        "mipsec_ha_installs_refused_full", "Installs refused at [ha] max_spi_records",
        value=st.get("installs_refused_full", 0),
    )  # fmt: skip
    # Pulls of unknown SPIs ([pull], core/pullgate.py): until the twenty-
    # ninth session only `mipsec status` showed them.
    yield _counter(
        "mipsec_ha_pulls", "Pulls of unknown SPIs from the HAC, and SPIs not pulled", "outcome",
        {out: st[key] for out, key in _PULL_OUTCOMES.items() if isinstance(st.get(key), int)},
    )  # fmt: skip
    yield _gauge("mipsec_ha_bindings", "Bindings in the cache", st.get("bindings", 0))
    data = st.get("data")
    if isinstance(data, Mapping):
        # The tunnel ([dataplane]): its drops were only in `mipsec status`
        # (found in review: no_binding, not_hoa -- a spoofed inner source --,
        # too_big... never reached /metrics).
        drops = dict(data.get("drops", {}))
        for key, reason in _DATA_DROP_COUNTS.items():
            if isinstance(data.get(key), int):
                drops[reason] = drops.get(reason, 0) + data[key]
        yield _counter(
            "mipsec_ha_data_packets_dropped", "Tunnelled packets dropped by reason", "reason",
            drops,
        )  # fmt: skip
        yield _counter(
            "mipsec_ha_data_packets", "Tunnelled packets by direction", "direction",
            {k: v for k, v in data.items() if k in _DATA_DIRECTIONS},
        )  # fmt: skip
        yield _counter(
            "mipsec_ha_data_events", "Tunnel device and socket events", "event",
            {k: v for k, v in data.items()
             if k not in _DATA_NOT_EVENTS and type(v) is int},
        )  # fmt: skip
    prov = getattr(svc, "_provisioning", None)
    yield from _listener_families("mipsec_ha_provisioning", getattr(prov, "listener", None))


def _source(writer: asyncio.StreamWriter) -> Any:
    """The network a connection comes from: an IPv4 /24, an IPv6 /64.  By
    address alone, 16 addresses of one /64 (or of 127/8, from a local
    process) tied at one connection each and the oldest wait went again:
    the scraper (found in review).  Sources in 16 networks still tie."""
    peer = writer.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return peer[0]
    if ip.version == 4:
        return ipaddress.ip_network(f"{ip}/24", strict=False)
    return ipaddress.ip_network(f"{ip}/64", strict=False)


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` over HTTP/1.0 on the role's loop."""

    def __init__(
        self,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
    ) -> None:
        self.registry = registry
        self.healthy = healthy
        # ``[metrics] allowed_clients``: None, any source.
        self.allowed = None if allowed is None else tuple(allowed)
        self.refused = 0  # connections closed at accept: source not allowed
        self._server: asyncio.Server | None = None
        # Held connections in arrival order; True while the request head is
        # still awaited (evictable), False once it is being answered.
        self._held: dict[asyncio.StreamWriter, bool] = {}
        self.evicted = 0
        self.addresses: list[tuple[str, int]] = []

    async def listen(self, host: str, port: int) -> list[tuple[str, int]]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        self.addresses = [s.getsockname()[:2] for s in self._server.sockets]
        return self.addresses

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Hold ``writer``; at the cap evict the longest wait for a head from
        the source address holding the most connections.

        The longest wait overall was the rule: a flood from one address then
        evicted the scraper's own connection now and then, when the flood's
        next connection came in before the scraper's head was read (3 of 60
        scrapes failed in review).  A scraper holds one connection; a flood
        holds many, and pays for its own."""
        if len(self._held) >= MAX_CLIENTS:
            waiting: dict[Any, list[asyncio.StreamWriter]] = {}
            for w, is_waiting in self._held.items():  # arrival order: oldest first
                if is_waiting:
                    waiting.setdefault(_source(w), []).append(w)
            if not waiting:  # every slot is answering a complete request
                return False
            mine = _source(writer)
            # The busiest source (this connection's own counted with it);
            # a tie goes to the source with the oldest wait.
            victim_source = max(waiting, key=lambda src: len(waiting[src]) + (src == mine))
            oldest = waiting[victim_source][0]
            del self._held[oldest]
            oldest.transport.abort()  # its read ends at once; its task cleans up
            self.evicted += 1
        self._held[writer] = True
        return True

    def _allowed(self, writer: asyncio.StreamWriter) -> bool:
        if self.allowed is None:
            return True
        addr = peer_ip(writer.get_extra_info("peername"))
        return addr is not None and any(addr in net for net in self.allowed)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._allowed(writer):
            # Before _admit: a stranger never holds a slot nor evicts anyone.
            # No line per connection (a flood would flood the log).
            self.refused += 1
            writer.transport.abort()
            return
        if not self._admit(writer):
            writer.close()
            return
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            except OSError:
                return
            if writer not in self._held:
                return  # evicted just as its head arrived
            self._held[writer] = False
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                await self._answer(writer, 400, b"bad request\n")
            elif parts[0] not in (b"GET", b"HEAD"):
                await self._answer(writer, 405, b"GET only\n")
            else:
                path = parts[1].split(b"?", 1)[0]
                body_only = parts[0] == b"GET"
                if path == b"/metrics":
                    await self._answer(
                        writer, 200, generate_latest(self.registry), CONTENT_TYPE, body_only
                    )
                elif path == b"/healthz":
                    ok = self.healthy()
                    await self._answer(
                        writer, 200 if ok else 503, b"ok\n" if ok else b"unhealthy\n",
                        send_body=body_only,
                    )  # fmt: skip
                else:
                    await self._answer(writer, 404, b"not found\n")
        finally:
            self._held.pop(writer, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), READ_TIMEOUT)

    @staticmethod
    async def _answer(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str = "text/plain; charset=utf-8",
        send_body: bool = True,
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[status]  # fmt: skip
        head = (
            f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head + (body if send_body else b""))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)


async def start_metrics(
    cfg: Any, registry: CollectorRegistry, healthy: Callable[[], bool], role: str
) -> MetricsServer | None:
    """Serve ``[metrics]`` when configured; a bind failure names the key."""
    mc = getattr(cfg, "metrics", None)
    if mc is None:
        return None
    from mipsec.core.errors import ListenError

    server = MetricsServer(registry, healthy, mc.allowed_clients)
    try:
        bound = await server.listen(mc.address, mc.port)
    except OSError as exc:
        raise ListenError.from_oserror("metrics.port", mc.address, mc.port, exc) from None
    for host, port in bound:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("%s metrics on http://%s/metrics", role, where)
    return server
