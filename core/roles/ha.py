"""The HA service: a thin asyncio shell around ``HaCore`` (RFC 6618 §6, PROFILE §7-§9).

What it adds to the sans-I/O core:

* UDP sockets on ``[ha] listen``/``port`` (IPv4 and IPv6; an IPv6 address the
  host cannot bind is skipped with a warning; port 0 = ephemeral, the bound
  addresses are in ``self.addresses``);
* its SA store (plugin from ``[sa_store]``): every live SA in it is installed
  at start, and ``install_sa`` writes there before the core accepts the SPI,
  so SAs survive a restart; the binding cache (``[bindings] path``) does the
  same for bindings, sequence counters, replay floors and withdrawal records
  (required whenever SAs outlive the process: a persistent store or pull);
* group commit (issue 6): a burst of datagrams is processed, the binding
  cache's changes are committed once, and only then do the burst's replies
  leave and its data go on -- so no BA ever acknowledges a state that a crash
  could lose, and a replay after a restart at any instant is refused
  (``ha_core``'s module docstring).  When the commit fails, the burst's
  replies and data are withheld (fail closed) and the next burst retries;
* withdrawal (``withdraw_sa``, from the HAC's provisioning): the SPI becomes
  dead for good -- committed before the withdrawal is confirmed -- and
  leaves the store;
* the provisioning listener (``[provisioning]``, PROFILE §9) and the
  in-process receiver for a co-located HAC (``transport_local``, model 1);
* pulling unknown SPIs from the HAC (``[pull]``), rate-limited, with a
  negative cache, so a flood of random SPIs cannot become a flood of pulls,
  nor starve an MN's pull (``core/pullgate.py``: under pressure an SPI is
  pulled at its second sighting, from a reserve, per source);
* a periodic expiry task and one log line per binding change;
* with ``[dataplane] enabled``, the data plane (``roles/ha_data.py``): a TUN
  device that takes the ``DataIn`` actions (``on_data``) and sends the home
  network's answers from this service's sockets.

Per packet the work is one ``HaCore.receive`` call and a ``sendto`` (held
to the end of the burst when something waits for the commit): no logging,
no allocation beyond what the core needs and one tuple per held reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pluggy

from mipsec.core import certexpiry, pluginmanager, pullgate
from mipsec.core.bindings import BindingCache
from mipsec.core.certexpiry import certificates, prefixed
from mipsec.core.clockstep import ClockWatch, step_line
from mipsec.core.config import HAConfig, PullConfig
from mipsec.core.errors import ConfigError, ListenError, StoreBusyError
from mipsec.core.ha_core import (
    REFRESHED,
    AddressTaken,
    BindingChanged,
    DataIn,
    HaCore,
    NeedSA,
    Reply,
    SpiWithdrawn,
    same_sa,
)
from mipsec.core.hookspecs import PluginContext, SAStore
from mipsec.core.issuer import utcnow
from mipsec.core.logburst import LineBurst
from mipsec.core.model import IssuedSA
from mipsec.core.outage import Outage, cause
from mipsec.core.pacing import in_paced_batches
from mipsec.core.provisioning import ProvisioningRefused
from mipsec.core.pullgate import PullGate, Verdict
from mipsec.core.ratelimit import source_key
from mipsec.core.sqlitetx import LOOP_LOCK_WAIT, loop_writer
from mipsec.core.startup_heap import collection_paused, freeze_heap
from mipsec.core.stopcheck import stop_requested
from mipsec.core.tls import load_server_chain

log = logging.getLogger("mipsec.ha")

# One install of a burst: (issued, ha_id, SPIs of its prov-withdraw).
InstallItem = tuple[IssuedSA, str | None, Sequence[int]]

Puller = Callable[[int], Awaitable[IssuedSA | None]]

# Clock skew between a HAC and this HA tolerated by max_sa_lifetime.
CLOCK_SLACK = 300.0
EXPIRY_INTERVAL = 1.0  # seconds between HaCore.expire runs (binding lifetimes are 4-s units)
STORE_EXPIRY_EVERY = 30  # ... and every this many runs, expired SAs leave the store
# Expired SAs per store call (``expire_some``), and bindings, SAs and records
# per in-memory round (``HaCore.expire``): batches paced by core/pacing.py.
EXPIRE_BATCH = 500
# Start: SAs loaded before the sockets open; the rest in pages, paced, while
# the HA serves (100,000 SAs kept it deaf for 8.8 s).
LOAD_FIRST = 5000
LOAD_PAGE = 1000
# SAs loaded by their first packet meanwhile, per second (100,000 MNs over a
# 15-s load are ~7,000/s), with bursts: a bound on what a flood of made-up
# SPIs costs in store reads (at most ~70 ms of the loop per second).
LOAD_ON_DEMAND_RATE = 5000.0
LOAD_ON_DEMAND_BURST = 1000
RCVBUF = 4 << 20  # socket receive buffer: absorbs bursts of BUs
RECV_SIZE = 65535  # largest UDP payload
DRAIN_BUDGET = 256  # datagrams read per wake-up beyond the one asyncio delivered
# The pull limits are [pull] rate, burst, max_in_flight, source_rate and
# source_burst (defaults in core/pullgate.py).
MAX_QUEUED_PER_SPI = 8  # datagrams kept while their SPI is being pulled
EXPIRED_LINES_MAX = 16  # bindings expiring at once logged one line each; more: one line in all
NEGATIVE_TTL = 10.0  # seconds an SPI the HAC did not know stays "unknown"
NEGATIVE_MAX = 4096


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _counts(counter: dict[Any, int]) -> str:
    """``{"replay": 2, "bad_icv": 1}`` -> ``bad_icv:1,replay:2`` (one log token)."""
    return ",".join(f"{k}:{v}" for k, v in sorted(counter.items(), key=str)) or "-"


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _ExpiryLines:
    """The log of one expiry run, which may take several rounds: every
    binding change to the hooks; a line each at INFO when the run is one
    round of a few (up to EXPIRED_LINES_MAX), else each at DEBUG and one
    line in all when it ends (100,000 bindings ended while the HA was down
    were 100,000 lines and 40 % of its start)."""

    __slots__ = ("first", "ha_id", "log_binding", "rounds", "total", "when")

    def __init__(
        self,
        ha_id: str,
        log_binding: Callable[[BindingChanged, int | None], None],
        when: str,
    ) -> None:
        self.ha_id, self.log_binding, self.when = ha_id, log_binding, when
        self.total = self.rounds = 0
        self.first: BindingChanged | None = None

    def take(self, events: Sequence[BindingChanged], more: bool) -> None:
        """One round's events; ``more``: other rounds follow."""
        if self.rounds == 0 and not more and len(events) <= EXPIRED_LINES_MAX:
            for ev in events:
                self.log_binding(ev, None)
        else:
            for ev in events:
                self.log_binding(ev, logging.DEBUG)
            if self.first is None and events:
                self.first = events[0]
        self.total += len(events)
        self.rounds += 1

    def close(self) -> None:
        if self.first is not None:
            log.info(
                "HA %s: %d bindings expired %s (the first: hoa=%s spi=%d; one line each at DEBUG)",
                self.ha_id,
                self.total,
                self.when,
                self.first.hoa,
                self.first.spi,
            )


class _Protocol(asyncio.DatagramProtocol):
    """Hands datagrams to the service and drains the socket while it has more.

    asyncio delivers one datagram per event-loop iteration (an epoll round
    trip each: ~27k datagrams/s here, DESIGN "Library traps"); after the one
    it delivered we read what else is queued straight from the socket, up to
    ``DRAIN_BUDGET``, which measured ~8x faster.  The socket is non-blocking
    (asyncio set it so), and the transport's own next read simply finds it
    empty.  Replies still go through the transport, which buffers them if the
    kernel's send buffer is full.
    """

    def __init__(self, service: HaService, sock: socket.socket) -> None:
        self.service = service
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport is not a DatagramTransport
        # subclass on every Python version: no isinstance check here.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        transport = self.transport
        assert transport is not None
        handle = self.service.handle
        handle(data, addr, transport)
        recvfrom = self.sock.recvfrom
        for _ in range(DRAIN_BUDGET):
            if transport.is_closing():
                break
            try:
                data, addr = recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.service.counts["socket_errors"] += 1
                break
            handle(data, addr, transport)
        self.service.burst_done()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier sends (e.g. port unreachable at an MN that
        # left): nothing to do, and not worth a line per packet.
        self.service.counts["socket_errors"] += 1


class StartAborted(Exception):
    """The HA was told to stop while it loaded its store: it opened no port."""


class HaService:
    """The Home Agent role (see the module docstring)."""

    def __init__(
        self,
        cfg: HAConfig,
        config_file: str = "<memory>",
        pm: pluggy.PluginManager | None = None,
        *,
        puller: Puller | None = None,
        expiry_interval: float = EXPIRY_INTERVAL,
        check_only: bool = False,
    ) -> None:
        """``check_only``: build everything for ``mipsec check-config`` without
        creating a file; such a service is only ever stopped, never started."""
        # Loading the binding cache (here) and the SAs (start) is what an HA
        # with many MNs spends its start on: the ready line says how long.
        self._created = time.monotonic()
        self.cfg = cfg
        self.config_file = config_file
        self.pm = pm or pluginmanager.make_plugin_manager(cfg.plugins.disable)
        base = Path(config_file).resolve().parent if config_file != "<memory>" else Path.cwd()
        ctx = PluginContext(
            role="ha",
            base_dir=base,
            config_file=config_file,
            extra={"check_only": True} if check_only else {},
        )
        self.store: SAStore = pluginmanager.create(
            self.pm,
            "mipsec_sa_stores",
            cfg.sa_store.backend,
            cfg.sa_store.options,
            ctx,
            key="sa_store.backend",
        )
        if puller is None and cfg.pull is not None:
            puller = self._pull_from_hac
        in_store = cfg.bindings.in_sa_store
        if (
            cfg.bindings.path is None
            and not in_store
            and (cfg.sa_store.backend != "memory" or puller is not None)
        ):
            # SAs would come back after a restart (from the store, or pulled)
            # without their replay floors: replays would be accepted.
            self.store.close()
            why = "[pull]" if puller is not None else f"sa_store backend {cfg.sa_store.backend!r}"
            raise ConfigError(
                config_file,
                "bindings.path",
                f"required: with {why} SAs outlive the process, and so must their replay state",
            )
        # [bindings] in_sa_store: the store's transaction() when the binding
        # cache shares its file (one commit per burst of installs), else None.
        self._one_commit: Callable[[], AbstractContextManager[None]] | None = None
        # An SA store whose transaction() bounds its wait for the write lock
        # (the SQLite store): an install burst waits at most LOOP_LOCK_WAIT.
        self._bounded_tx = loop_writer(self.store)
        try:
            # Write-behind: one SQLite commit per burst of datagrams, made
            # before the burst's replies leave (burst_done; see bindings.py).
            if in_store:
                self.bindings = self._bindings_in_store(config_file, check_only)
            else:
                bindings_path = cfg.bindings.path
                if bindings_path is not None and (
                    not bindings_path.exists() or bindings_path.stat().st_size == 0
                ):
                    self._no_replay_state(config_file, "bindings.path")
                if check_only and bindings_path is not None and not bindings_path.exists():
                    bindings_path = None  # a start creates it: check-config does not
                self.bindings = BindingCache(
                    bindings_path,
                    write_behind=True,
                    synchronous=cfg.bindings.synchronous,
                    # A thread checkpoints the file once a second (bounding
                    # what a power loss takes, module docstring of bindings.py).
                    checkpoint_interval=0.0 if check_only else 1.0,
                )
        except (OSError, sqlite3.Error, ValueError) as exc:
            self.store.close()
            key = "bindings.in_sa_store" if in_store else "bindings.path"
            raise ConfigError(config_file, key, f"cannot open: {exc}") from None
        except ConfigError:
            self.store.close()
            raise
        svc = cfg.ha
        self._puller = puller
        self.core = HaCore(
            svc.id,
            svc.address6,
            svc.address4,
            window=svc.replay_window,
            max_binding_lifetime=svc.max_binding_lifetime,
            bindings=self.bindings,
            pull=puller is not None,
            max_spi_records=svc.max_spi_records,
        )
        self.expiry_interval = expiry_interval
        self.addresses: list[tuple[str, int]] = []
        self.counts: dict[str, int] = {
            "socket_errors": 0,
            "pulls": 0,
            "pulls_found": 0,
            "pulls_refused": 0,
            # Unknown SPIs not pulled (core/pullgate.py, since the twenty-
            # ninth session): a first sighting under pressure, pulled at its
            # next; a repeated one past its source's share or the global cap.
            "pulls_deferred": 0,
            "pulls_limited": 0,
            "loaded_on_demand": 0,  # SAs loaded by their first packet during the start's load
            "load_on_demand_limited": 0,  # ... refused past LOAD_ON_DEMAND_RATE (a flood)
            "internal_errors": 0,
            "store_errors": 0,
            "withheld": 0,
            "hook_errors": 0,
            "address_taken": 0,  # two MNs' SAs for one address (ha_core._one_mn_per_address)
            "installs_refused_full": 0,  # at [ha] max_spi_records (twenty-ninth session)
        }
        self.on_data: Callable[[DataIn], None] | None = None  # the data plane plugs in here
        self.sockets: list[socket.socket] = []  # the UDP sockets (the data plane sends from them)
        self.dataplane: Any = None  # roles.ha_data.HaDataPlane when [dataplane] enabled
        self._transports: list[asyncio.DatagramTransport] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry_task: asyncio.Task[None] | None = None
        self._loader: asyncio.Task[None] | None = None  # SAs loaded after the sockets opened
        # The start's expiry when more was due: the expiry timer's first run
        # finishes it.
        self._expired_at_start: _ExpiryLines | None = None
        self._load_cursor = 0  # SPIs up to this one: read from the store by the start
        self._installed = 0
        self._provisioning: Any = None
        self._pending: dict[int, list[tuple[bytes, tuple[Any, ...], Any]]] = {}
        self._negative: dict[int, float] = {}
        # [pull]'s limits; without it (a puller given by a test) the defaults.
        pull = cfg.pull
        self._pull_gate = (
            PullGate(
                pull.rate,
                pull.burst,
                pull.max_in_flight,
                source_rate=pull.source_rate,
                source_burst=pull.source_burst,
            )
            if pull is not None
            else PullGate(pullgate.RATE, pullgate.BURST, pullgate.MAX_IN_FLIGHT)
        )
        self._load_bucket = _TokenBucket(LOAD_ON_DEMAND_RATE, LOAD_ON_DEMAND_BURST)
        self._local_registered = False
        self._started = False
        # Replies and data waiting for the burst's commit (burst_done).
        self._held: list[tuple[asyncio.DatagramTransport, Reply | DataIn]] = []
        # One line when the binding cache's commits start failing (full
        # disk), one when they work again -- whichever path retries them.
        self._write_outage = Outage(log, "binding cache write", "replies withheld until it works")
        self._checkpoint_outage = Outage(log, "binding cache checkpoint")
        self._expiry_outage = Outage(log, "expiry run")
        self._clock_watch = ClockWatch()
        self._unknown_withdrawals = LineBurst(log, "withdrawals of SPIs unknown here")
        # A HAC filling the cap sends installs in bursts: one line per 10 s.
        self._full_refusals = LineBurst(
            log, "installs refused at [ha] max_spi_records", limit=1, window=10.0
        )
        # Pulls are rate-limited ([pull] rate) but a HAC that is down would
        # still have cost a WARNING line per pull, 20 a second by default.
        self._pull_outage = Outage(log, "pull from the HAC", "packets of unknown SPIs dropped")
        self._to_discard: list[int] = []  # withdrawn, out of the store soon (_withdrawn)
        # A delete that failed (full disk) is retried by the expiry run until
        # it works, not left to the next start: the store then holds only
        # what is live here once the outage ends.
        self._discard_outage = Outage(
            log, "removing withdrawn SAs from the store", "they are withdrawn already; retried"
        )

    def _bindings_in_store(self, config_file: str, check_only: bool) -> BindingCache:
        """The binding cache in the SA store's own file (``[bindings] in_sa_store``)."""
        shared = getattr(self.store, "shared_connection", None)
        begin = getattr(self.store, "transaction", None)
        if shared is None or begin is None:
            raise ConfigError(
                config_file,
                "bindings.in_sa_store",
                f"sa_store backend {self.cfg.sa_store.backend!r} cannot hold the binding "
                'cache (it takes "sqlite" with a path); give [bindings] path instead',
            )
        try:
            conn = shared()
        except ValueError as exc:  # StoreOptionError: a memory store
            why = f"sa_store backend {self.cfg.sa_store.backend!r}: {exc}"
            raise ConfigError(config_file, "bindings.in_sa_store", why) from None
        if not BindingCache.exists_in(conn):
            self._no_replay_state(config_file, "bindings.in_sa_store")
        if check_only:
            return BindingCache()  # check-config creates no tables
        self._one_commit = begin
        cache = BindingCache(
            write_behind=True,
            synchronous=self.cfg.bindings.synchronous,
            shared=conn,
            owner=self.cfg.ha.id,
        )
        # The store's own thread checkpoints the shared file (core/
        # walcheckpoint.py): the cache's once-a-second checkpoint would put
        # the copy and its fsyncs back on the event loop.
        cache.checkpointed_elsewhere = getattr(self.store, "checkpointer", None) is not None
        return cache

    def _no_replay_state(self, config_file: str, key: str) -> None:
        """The binding cache is about to be created, empty: refuse if the SA
        store already holds live SAs of this HA.

        Their replay state (sequence floors, out-marks, withdrawals) lived in
        the binding cache they were stored with -- a file lost, or a switch
        between ``path`` and ``in_sa_store``.  Starting anyway would take
        them back as new SAs: packets captured before would be accepted
        again (issue 6: every anti-replay fact survives a restart).
        """
        now = utcnow()
        mine = (self.cfg.ha.id, "")  # "" : an SA stored without an HA id
        has_live = getattr(self.store, "has_live", None)
        if has_live is not None:
            held = bool(has_live(now, mine))
        else:
            held = any(n for ha_id, n in self.store.count_by_ha(now).items() if ha_id in mine)
        if held:
            raise ConfigError(
                config_file,
                key,
                "the SA store holds live SAs of this HA, but their binding cache (replay "
                "state) is not there: restore the binding cache they were stored with, or "
                "start with an empty SA store",
            )

    # ------------------------------------------------------------ lifecycle

    @property
    def started(self) -> bool:
        """Serving: sockets open, SAs loaded (or loading in the background)."""
        return self._started

    async def start(self, stop: asyncio.Event | None = None) -> list[tuple[str, int]]:
        """Load the store, open the ports, serve; the UDP addresses.

        ``stop``: the launcher's stop event.  Set by a SIGTERM that came
        while the store was loading, it ends the start before any port
        opens (:class:`StartAborted`): an HA told to stop never serves."""
        # Loading every SA and binding, then freezing them: without the
        # collector's passes over what was loaded so far (core/startup_heap.py).
        with collection_paused():
            return await self._start(stop)

    async def _start(self, stop: asyncio.Event | None = None) -> list[tuple[str, int]]:
        self._installed = 0
        now = time.time()
        page = getattr(self.store, "live_page", None)
        if page is None:
            for issued in self.store.live(utcnow()):
                self._install_loaded(issued, now)
            more = False
        else:
            # The first LOAD_FIRST SAs before the sockets open (a small
            # store: all of them); the rest after, in paced pages, each SA
            # loaded at once by its first packet meanwhile (``_load_missing``).
            more = self._load_pages(page, now, LOAD_FIRST)
            if more:
                self.core.load_missing = self._load_missing
        # Bindings, SAs and records that ended while the HA was down: the
        # first LOAD_FIRST of each kind now; a mass of them (100,000 bindings
        # were 4.2 s of the start) is finished by the expiry timer's first
        # run, in paced rounds, while the HA serves -- as between two ticks,
        # a binding past its lifetime may meet a BU before it is removed.
        lines = self._expiry_lines("while the HA was down")
        events = self.core.expire(now, LOAD_FIRST)
        due = self.core.expiry_due(now)
        lines.take(events, more=due)
        if due:
            self._expired_at_start = lines
        else:
            lines.close()
        self.bindings.flush()  # one commit for every SA's records
        if stop is not None and await stop_requested(stop):
            raise StartAborted  # a SIGTERM during the load: no port opened
        try:
            await self._open_sockets()
            await self._start_provisioning()
            certexpiry.report(log, "ha", self.certificates(), datetime.now(UTC))
            if self.cfg.dataplane.enabled:
                from mipsec.core.roles.ha_data import HaDataPlane

                self.dataplane = HaDataPlane(self, self.cfg.dataplane)
                self.dataplane.start()
        except BaseException:
            await self.stop()
            raise
        from mipsec.plugins.transport_local import register_local_ha

        register_local_ha(self.cfg.ha.id, self._install_in_process, self.withdraw_sa)
        self._local_registered = True
        self._expiry_task = asyncio.create_task(self._expiry_loop())
        self._started = True
        for host, port in self.addresses:
            log.info("HA %s listening on %s (UDP)", self.cfg.ha.id, _fmt((host, port)))
        if more:
            assert page is not None
            log.info(
                "HA %s: serving after %.1f s; loading the rest of its SAs from the store "
                "(%d so far; an SA not loaded yet is loaded by its first packet)",
                self.cfg.ha.id,
                time.monotonic() - self._created,
                self._installed,
            )
            self._loader = asyncio.create_task(self._load_rest(page))
        else:
            self._loaded_all()
        return self.addresses

    # ------------------------------------------------------------ loading at start

    def _install_loaded(self, issued: IssuedSA, now: float) -> None:
        """One SA read from the store at start into the core."""
        # A store shared with the HAC (model 1) holds every HA's SAs.
        if issued.sa.ha_id not in ("", self.cfg.ha.id):
            return
        try:
            # Held here already: loaded whatever [ha] max_spi_records says.
            if self.core.install_sa(issued, now=now, capped=False):
                self._installed += 1
        except SpiWithdrawn:
            # Withdrawn, then the HA stopped before the store forgot it.
            self.store.remove(issued.sa.spi)
            log.info("SA spi=%d withdrawn earlier: removed from the store", issued.sa.spi)

    def _load_pages(self, page: Callable[..., Any], now: float, budget: int) -> bool:
        """Load up to ``budget`` SAs in pages of LOAD_PAGE, in SPI order from
        ``_load_cursor``; True while the store holds more.  Each page is read
        and installed within one turn of the loop: nothing (an install, a
        withdrawal) can come between a row's read and its install."""
        loaded = 0
        when = utcnow()
        while loaded < budget:
            sas, last = page(when, self._load_cursor, LOAD_PAGE)
            for issued in sas:
                self._install_loaded(issued, now)
            if last is None:
                return False
            self._load_cursor = last
            loaded += LOAD_PAGE
        return True

    def _load_missing(self, spi: int) -> None:
        """The core met an SPI it does not hold while the load goes on: if
        the store holds its SA (an SPI the loader has not reached), load it
        now, so its MN is served at once rather than after the whole load."""
        if spi <= self._load_cursor or self.bindings.dead(spi) is not None:
            return  # passed by the loader (loaded, or not there), or withdrawn
        if not self._load_bucket.take(time.monotonic()):
            # A flood of made-up SPIs would cost a store read each (~14 µs,
            # against ~3 µs to drop an unknown SPI): past the rate, the
            # packet is dropped as unknown and its SA waits for the loader.
            self.counts["load_on_demand_limited"] += 1
            return
        try:
            issued = self.store.get(spi, utcnow())
        except Exception as exc:  # a store error: the packet is dropped, counted
            self.counts["store_errors"] += 1
            log.debug("loading spi=%d on its first packet failed: %s", spi, cause(exc))
            return
        if issued is not None:
            self.counts["loaded_on_demand"] += 1
            self._install_loaded(issued, time.time())

    async def _load_rest(self, page: Callable[..., Any]) -> None:
        """The SAs the start left, in paced pages (core/pacing.py)."""
        try:
            with collection_paused():
                # One page a step; 1 while the store holds more.
                await in_paced_batches(
                    lambda: int(self._load_pages(page, time.time(), LOAD_PAGE)), 1
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # SAs not loaded yet stay loadable by their first packet.
            log.error(
                "HA %s: loading SAs from the store stopped after spi %d: %s; an SA not "
                "loaded yet is still loaded by its first packet",
                self.cfg.ha.id,
                self._load_cursor,
                cause(exc),
            )
            return
        finally:
            self._loader = None
        self.core.load_missing = None
        self._loaded_all()

    def _loaded_all(self) -> None:
        freeze_heap("HA")  # SAs and bindings loaded: out of the collector's sight (issue 9)
        log.info(
            "HA %s: %d SAs from the store, %d bindings from the cache (start took %.1f s)",
            self.cfg.ha.id,
            self._installed,
            len(self.bindings),
            time.monotonic() - self._created,
        )

    async def _open_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        port = self.cfg.ha.port
        for host in self.cfg.ha.listen:
            v6 = ":" in host
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            try:
                if v6:
                    # Separate v4 and v6 sockets on one port: no v4-mapped
                    # addresses in the binding cache, no EADDRINUSE.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                if v6 and len(self.cfg.ha.listen) > 1:
                    log.warning("cannot listen on [%s]:%d: %s (skipped)", host, port, exc)
                    continue
                raise ListenError.from_oserror("ha.port", host, port, exc) from None
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Protocol, self, sock), sock=sock
            )
            self._transports.append(transport)
            self.sockets.append(sock)
            addr = sock.getsockname()
            self.addresses.append((addr[0], addr[1]))
            if port == 0:
                port = addr[1]  # the same ephemeral port on every address if possible

    def certificates(self) -> dict[str, datetime]:
        """notAfter of the provisioning listener's certificate, by config
        key (core/certexpiry.py); nothing without one."""
        prov = self._provisioning
        if prov is not None:
            return prefixed("provisioning.", certificates(prov))
        listener = self.cfg.provisioning
        if listener is None:
            return {}
        # Not started (``mipsec check-config``): read from the file.
        return {"provisioning.cert": load_server_chain(listener.cert)[0].not_valid_after_utc}

    async def _start_provisioning(self) -> None:
        if self.cfg.provisioning is None:
            return
        from mipsec.core.roles.provserver import ProvisioningServer

        server = ProvisioningServer(
            self.cfg.provisioning,
            # The synchronous forms: an install or withdrawal completes at
            # once, so the provisioning server answers it without a Task.
            on_install=self.install_sa_now,
            on_install_many=self.install_many_now,
            on_withdraw=self.withdraw_sa_now,
            on_withdraw_many=self.withdraw_many_now,
            install_withdraws=True,
            on_pull=None,
        )
        await server.start()
        self._provisioning = server

    def stop_accepting(self) -> None:
        """Close the provisioning listener (a HAC's new connection is
        refused); connections held and the data plane go on.  Idempotent."""
        if self._provisioning is not None:
            self._provisioning.listener.close()

    async def stop(self) -> None:
        if self.dataplane is not None:
            self.dataplane.stop()
            self.dataplane = None
        if self._local_registered:
            from mipsec.plugins.transport_local import unregister_local_ha

            unregister_local_ha(self.cfg.ha.id)
            self._local_registered = False
        if self._provisioning is not None:
            await self._provisioning.stop()
            self._provisioning = None
        self._unknown_withdrawals.close()  # the count of a burst still open
        self._full_refusals.close()
        for t in self._transports:
            t.close()
        self._transports.clear()
        self.sockets.clear()
        tasks = [
            *self._tasks,
            *([self._expiry_task] if self._expiry_task else []),
            *([self._loader] if self._loader else []),
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._expiry_task = None
        # Exact data marks: a clean restart loses no data packet (ha_core).
        self.core.settle()
        pending = self.bindings.pending
        try:
            self.bindings.close()  # flushes what is pending
        except (sqlite3.Error, OSError) as exc:
            # A store outage (full disk): what waits belongs to replies that
            # were withheld, never sent -- the MNs retransmit -- and to
            # withdrawals the HAC never heard confirmed (it sends them again).
            log.error(
                "binding cache: %d change(s) not written at stop (%s); their replies "
                "were never sent",
                pending,
                cause(exc),
            )
        self._discard_now()
        self.store.close()
        if self._started:
            st = self.core.stats()
            log.info(
                "HA %s stopped: packets=%d bu=%d data_in=%d ba=%s drops=%s",
                self.cfg.ha.id,
                st["packets"],
                st["bu"],
                st["data_in"],
                _counts(st["ba"]),
                _counts(st["drops"]),
            )
        self._started = False

    # ------------------------------------------------------------ packets

    def handle(
        self,
        data: bytes,
        addr: tuple[Any, ...],
        transport: asyncio.DatagramTransport,
        *,
        allow_pull: bool = True,
    ) -> None:
        """One datagram through the core; replies go out of the socket it came in on.

        A reply or data that depends on a change not yet committed waits in
        ``_held`` for ``burst_done`` -- and so does everything after it, to
        keep the order.  The caller calls ``burst_done`` after each burst.
        """
        try:
            actions = self.core.receive(data, addr, time.time(), allow_pull=allow_pull)
        except Exception:
            # A bug, not the peer's fault (the core drops bad input): keep
            # serving, count it, and log only the first of a kind.
            self.counts["internal_errors"] += 1
            if self.counts["internal_errors"] == 1:
                log.exception("internal error on a datagram from %s (logged once)", addr[0])
            return
        if not actions:
            return
        hold = self._held or self.bindings.dirty
        for action in actions:
            if isinstance(action, Reply):
                if hold:
                    self._held.append((transport, action))
                else:
                    transport.sendto(action.datagram, action.dst)
            elif isinstance(action, BindingChanged):
                self._log_binding(action)
            elif isinstance(action, NeedSA):
                self._need_sa(action.spi, data, addr, transport)
            elif isinstance(action, AddressTaken):
                self._address_taken(action)
            elif self.on_data is not None:
                if hold:
                    self._held.append((transport, action))
                else:
                    self.on_data(action)

    def _address_taken(self, ev: AddressTaken) -> None:
        # ha_core._one_mn_per_address: rare, and the operator must hear of it.
        self.counts["address_taken"] += 1
        log.warning(
            "hoa=%s named by two MNs' live SAs: spi=%d mn_id=%s (issued later) keeps it, "
            "spi=%d mn_id=%s is withdrawn -- a HAC gave the address again (its last commits "
            'lost in a power loss? [sa_store] synchronous = "full" prevents that)',
            ev.hoa,
            ev.kept_spi,
            ev.kept_mn_id,
            ev.withdrawn_spi,
            ev.withdrawn_mn_id,
        )

    def burst_done(self) -> None:
        """After a burst of datagrams: commit its changes once, then release what waited."""
        if self.bindings.dirty:
            try:
                # At most LOOP_LOCK_WAIT for a write lock another process
                # holds (a HAC's commit on a shared file passes; an operator's
                # sqlite3 shell does not): SQLite's 5 s wait would stall every
                # MN's BUs and data on this loop; the burst's replies are
                # withheld instead, and the next burst tries again.
                self.bindings.flush(wait=LOOP_LOCK_WAIT)
            except Exception as exc:  # sqlite3.Error, or a full disk's OSError
                # Fail closed: nothing leaves that acknowledges a state the
                # disk does not hold.  The changes stay queued; the next
                # burst (an MN's retransmission) tries again.
                self.counts["store_errors"] += 1
                self.counts["withheld"] += len(self._held)
                self._held.clear()
                self._write_outage.failed(exc)
                return
            self._write_outage.worked()
        if self._held:
            held, self._held = self._held, []
            for transport, action in held:
                if isinstance(action, Reply):
                    if not transport.is_closing():
                        transport.sendto(action.datagram, action.dst)
                elif self.on_data is not None:
                    self.on_data(action)

    def flush_bindings(self) -> bool:
        """Commit outside the packet path (expiry, the data plane's reservations);
        a failure is logged, retried later.  True: nothing is left unwritten."""
        try:
            self.bindings.flush(wait=LOOP_LOCK_WAIT)  # retried later: no 5 s wait on the loop
        except (sqlite3.Error, OSError, StoreBusyError) as exc:
            self.counts["store_errors"] += 1
            self._write_outage.failed(exc)
            return False
        self._write_outage.worked()
        return True

    def emit(self, hook: str, **kwargs: Any) -> None:
        """HA event hooks (``mipsec_ha_*``); a raising plugin never breaks the HA."""
        pluginmanager.emit(self.pm, hook, self.counts, log, ha_id=self.cfg.ha.id, **kwargs)

    def _log_binding(self, ev: BindingChanged, level: int | None = None) -> None:
        self.emit(
            "mipsec_ha_binding_changed",
            event=ev.event,
            hoa=ev.hoa,
            coa=_fmt(ev.coa),
            lifetime=ev.lifetime,
            spi=ev.spi,
        )
        # One line per binding change; a refresh from the same care-of
        # address changes nothing worth a line at INFO.
        if level is None:
            level = (
                logging.DEBUG
                if ev.event == REFRESHED and ev.previous_coa == ev.coa
                else logging.INFO
            )
        if log.isEnabledFor(level):
            log.log(
                level,
                "binding %s hoa=%s coa=%s lifetime=%d spi=%d",
                ev.event,
                ev.hoa,
                _fmt(ev.coa),
                ev.lifetime,
                ev.spi,
            )

    # ------------------------------------------------------------ pull (PROFILE §9)

    def _need_sa(
        self, spi: int, data: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport
    ) -> None:
        now = time.monotonic()
        pending = self._pending.get(spi)
        if pending is not None:
            if len(pending) < MAX_QUEUED_PER_SPI:
                pending.append((data, addr, transport))
                return
        elif self._negative.get(spi, 0.0) <= now:
            # core/pullgate.py: a flood of made-up SPIs cannot starve the
            # pull of an MN's SPI, which it sees again at the MN's
            # retransmission.
            verdict = self._pull_gate.admit(spi, source_key(addr), len(self._pending))
            if verdict is Verdict.PULL:
                self._negative.pop(spi, None)
                self._pending[spi] = [(data, addr, transport)]
                task = asyncio.create_task(self._pull(spi))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            self.counts["pulls_deferred" if verdict is Verdict.DEFERRED else "pulls_limited"] += 1
        # Known-unknown, deferred, rate limit or queue full: drop it (counted
        # as unknown_spi); an MN sends it again.
        self.handle(data, addr, transport, allow_pull=False)

    async def _pull(self, spi: int) -> None:
        assert self._puller is not None
        self.counts["pulls"] += 1
        issued: IssuedSA | None = None
        try:
            issued = await self._puller(spi)
            if issued is not None:
                await self.install_sa(issued)
                self.counts["pulls_found"] += 1
        except asyncio.CancelledError:
            raise
        except ProvisioningRefused:
            # This HA's own refusal (its line said why, e.g. max_spi_records):
            # the HAC answered, nothing failed.
            issued = None
            self._pull_outage.worked()
        except Exception as exc:
            if not self._pull_outage.failed(f"spi={spi}: {cause(exc)}", logging.WARNING):
                log.debug("pull of spi=%d failed: %s", spi, cause(exc))
            issued = None
        else:
            self._pull_outage.worked()  # answered (found or not): the HAC is there
        if issued is None:
            self.counts["pulls_refused"] += 1
            if len(self._negative) >= NEGATIVE_MAX:
                now = time.monotonic()
                self._negative = {s: t for s, t in self._negative.items() if t > now}
                while len(self._negative) >= NEGATIVE_MAX:  # oldest first (insertion order)
                    del self._negative[next(iter(self._negative))]
            self._negative[spi] = time.monotonic() + NEGATIVE_TTL
        for data, addr, transport in self._pending.pop(spi, []):
            if not transport.is_closing():
                self.handle(data, addr, transport, allow_pull=False)
        self.burst_done()

    def apply_pull_limits(self, cfg: PullConfig) -> None:
        """A reload's ``[pull]`` limits, in force from the next unknown SPI on
        (``PullGate.configure``: sightings and earned tokens kept)."""
        self._pull_gate.configure(
            cfg.rate,
            cfg.burst,
            cfg.max_in_flight,
            source_rate=cfg.source_rate,
            source_burst=cfg.source_burst,
        )

    async def _pull_from_hac(self, spi: int) -> IssuedSA | None:
        from mipsec.core.roles.provserver import pull_sa

        assert self.cfg.pull is not None
        return await pull_sa(self.cfg.pull, spi, self.cfg.ha.id)

    # ------------------------------------------------------------ provisioning

    async def _install_in_process(self, issued: IssuedSA) -> None:
        # From a HAC in this process (local transport): its event_log line
        # (sa_issued) already tells the operator, so the install's own line is
        # DEBUG -- one INFO line per bootstrap (issue 9).
        self.install_sa_now(issued, log_level=logging.DEBUG)

    async def install_sa(
        self,
        issued: IssuedSA,
        ha_id: str | None = None,
        withdraw: Sequence[int] = (),
        *,
        log_level: int = logging.INFO,
    ) -> None:
        """:meth:`install_sa_now`, as a coroutine (the in-process transport awaits it)."""
        self.install_sa_now(issued, ha_id, withdraw, log_level=log_level)

    def install_sa_now(
        self,
        issued: IssuedSA,
        ha_id: str | None = None,
        withdraw: Sequence[int] = (),
        *,
        log_level: int = logging.INFO,
    ) -> None:
        """Persist ``issued`` in the SA store, then accept its SPI (PROFILE §9).

        Raises ``ProvisioningRefused`` (a ``ValueError``), before changing
        anything, for an SA this HA must not take: one chosen for another HA
        id, one already past its validity end, or one withdrawn earlier (dead
        for good: a repeated install or a pull cannot revive it).  Any other
        failure (e.g. the binding cache cannot commit) leaves the new SA dead
        here and propagates; the older SAs of ``withdraw`` may be gone.

        ``withdraw``: SPIs the new SA supersedes (``prov-withdraw``), withdrawn
        exactly as ``withdraw_sa`` does, once the new SA is installed and in
        the same flush of the binding cache -- all durable before the HAC
        hears "installed".  A refused install withdraws nothing.
        """
        exc = self._install_group([(issued, ha_id, withdraw)], log_level)[0]
        if exc is not None:
            raise exc

    def install_many_now(
        self, items: Sequence[InstallItem], *, log_level: int = logging.INFO
    ) -> list[Exception | None]:
        """``install_sa_now`` of each ``(issued, ha_id, withdraw)``, in order,
        with one SA store transaction and one binding-cache commit for them all.

        The provisioning server hands a pipelined burst of installs here
        (issue 9: group commit -- two commits per burst instead of two per
        SA).  Per item: None (installed, durable) or the exception
        ``install_sa_now`` would have raised.  The records of the whole burst
        are durable before any answer leaves; a failed commit fails every
        install of the burst (500: each new SA dead here).  Items that touch
        each other's SPIs (one withdraws or repeats another's) are installed
        one by one, so the outcome is always that of installing them in order.
        """
        spis = [item[0].sa.spi for item in items]
        touched = set(spis)
        if len(touched) == len(spis) and not any(s in touched for it in items for s in it[2]):
            return self._install_group(items, log_level)
        return [r for item in items for r in self._install_group([item], log_level)]

    def _refusal(self, issued: IssuedSA, ha_id: str | None, now: datetime) -> None:
        """Raise ``ProvisioningRefused`` if this HA must not take ``issued``."""
        sa = issued.sa
        mine = self.cfg.ha.id
        for who in (ha_id, sa.ha_id):
            if who and who != mine:
                log.warning("spi=%d refused: provisioned for HA %s, this is %s", sa.spi, who, mine)
                raise ProvisioningRefused(f"ha_id: SA is for HA {who!r}, this HA is {mine!r}")
        if sa.validity_end <= now:
            # The HAC issued it for sa_lifetime from its own clock: an SA
            # ended on arrival says the two clocks disagree (or the install
            # sat in a queue for a lifetime) -- the operator's one line.
            behind = (now - sa.validity_end).total_seconds()
            log.warning(
                "spi=%d mn_id=%s refused: its validity end %s is %.0f s behind this HA's "
                "clock -- are the HAC's and this HA's clocks in step (NTP)?",
                sa.spi,
                sa.mn_id,
                sa.validity_end.isoformat(),
                behind,
            )
            raise ProvisioningRefused(
                f"validity_end: SA spi={sa.spi} already expired by this HA's clock "
                f"({behind:.0f} s ago)"
            )
        ahead = (sa.validity_end - now).total_seconds()
        if ahead > self.cfg.ha.max_sa_lifetime + CLOCK_SLACK:
            log.warning(
                "spi=%d mn_id=%s refused: its validity end %s is %.0f s ahead, beyond [ha] "
                "max_sa_lifetime (%g s)",
                sa.spi,
                sa.mn_id,
                sa.validity_end.isoformat(),
                ahead,
                self.cfg.ha.max_sa_lifetime,
            )
            raise ProvisioningRefused(
                f"validity_end: SA spi={sa.spi} ends {ahead:.0f} s from now, beyond "
                f"max_sa_lifetime ({self.cfg.ha.max_sa_lifetime:g} s)"
            )
        held = self.core.installed_sa(sa.spi)
        if held is None and self._loader is not None and sa.spi > self._load_cursor:
            # The start's load has not reached this SPI yet: a live SA under
            # it is in the store only.  Not looked at, another SA took the
            # SPI over -- and the binding of the SA it replaced -- while the
            # HA loaded (found in review).  (Sharing the HAC's store, model
            # 1, the row is this very SA: the same, accepted.)
            held = self.store.get(sa.spi, now)
        if held is not None and not same_sa(held, issued):
            # The HAC re-uses an SPI only once its SA was withdrawn here.  A
            # different SA under a live SPI replaced it, and the old SA's
            # binding stayed attached: the MN's home address then travelled
            # under keys the newcomer chose (found in review).
            log.warning(
                "spi=%d mn_id=%s refused: the SPI is live here with another SA (mn_id=%s); "
                "a HAC withdraws an SA before it re-uses its SPI",
                sa.spi,
                sa.mn_id,
                held.sa.mn_id,
            )
            raise ProvisioningRefused(f"spi: {sa.spi} is live here with another SA")
        if self.core.is_withdrawn(issued):
            log.warning("spi=%d mn_id=%s refused: withdrawn earlier", sa.spi, sa.mn_id)
            raise ProvisioningRefused(f"spi: {sa.spi} was withdrawn; it is not accepted again")

    def _room(self, issued: IssuedSA, withdraw: Sequence[int], promised: int) -> int:
        """Refuse ``issued`` if its SPI would be a record beyond ``[ha]
        max_spi_records`` (``promised``: new records of the burst so far);
        else how many new records it may add -- its own and, counted to be
        safe, those of its ``prov-withdraw`` SPIs held nowhere here (a
        withdrawal is never refused, so its record must not later make the
        core refuse an install this check let through)."""
        core, has = self.core, self.bindings.has_spi_record
        spi = issued.sa.spi
        if not core.room_for(spi, promised):
            self.counts["installs_refused_full"] += 1
            cap = core.max_spi_records
            self._full_refusals.line(
                logging.WARNING,
                "spi=%d mn_id=%s refused: this HA holds %d SPI records (live SAs and "
                "withdrawal records), [ha] max_spi_records = %s; raise it, or find the "
                "HAC that fills it",
                spi,
                issued.sa.mn_id,
                self.bindings.spi_record_count(),
                cap,
            )
            raise ProvisioningRefused(f"spi: {spi} refused: [ha] max_spi_records ({cap}) reached")
        return int(not has(spi)) + sum(1 for w in withdraw if w != spi and not has(w))

    def _store_all(self, group: list[IssuedSA], now: datetime) -> None:
        """Store the SAs of ``group``: one transaction where the store can."""
        # One SA: ``add``'s single autocommitted INSERT is cheaper than a transaction.
        many = getattr(self.store, "add_many", None) if len(group) > 1 else None
        added = many(group) if many is not None else [self.store.add(x) for x in group]
        for issued, ok in zip(group, added, strict=True):
            if ok or self.store.add(issued):  # add's own path clears an expired holder
                continue
            # Model 1 shares the HAC's store: the SA is already there.  A
            # different SA under a live SPI means the HAC re-used it (it only
            # does so after withdrawing the old one): the HAC's word wins.
            spi = issued.sa.spi
            held = self.store.get(spi, now)
            if held is None or not same_sa(held, issued):
                log.warning("spi=%d re-provisioned with a different SA: replacing", spi)
                self.store.remove(spi)
                if not self.store.add(issued):
                    raise RuntimeError(f"spi={spi}: SA store refused the SA")

    def _install_group(
        self, items: Sequence[InstallItem], log_level: int
    ) -> list[Exception | None]:
        """Install independent items (see ``install_many_now``)."""
        results: list[Exception | None] = [None] * len(items)
        now = utcnow()
        accepted: list[int] = []
        promised = 0  # new SPI records of the burst's accepted items
        for i, (issued, ha_id, withdraw) in enumerate(items):
            try:
                self._refusal(issued, ha_id, now)
                promised += self._room(issued, withdraw, promised)
            except ProvisioningRefused as exc:
                results[i] = exc
            else:
                accepted.append(i)
        if not accepted:
            return results
        if self._to_discard and any(items[i][0].sa.spi in self._to_discard for i in accepted):
            # A withdrawn SA's row still waits for its delete (``_withdrawn``):
            # delete it now, not after this SA's row under the same SPI.
            self._discard_now()
        new: list[bool] = []  # per accepted item: installed now (not already held)
        gone: list[list[bool]] = []
        try:
            with self._burst_commit():
                with self._rows_commit():
                    self._store_all([items[i][0] for i in accepted], now)
                for i in accepted:
                    issued, _ha_id, withdraw = items[i]
                    new.append(self.core.install_sa(issued))
                    gone.append([self._withdraw_in_core(spi) for spi in withdraw])
                if any(new) or any(items[i][2] for i in accepted):
                    # Its records, before the HAC hears "installed".
                    self.bindings.flush(wait=LOOP_LOCK_WAIT)
                if self._one_commit is not None:
                    # Same transaction: the superseded rows go with their
                    # withdrawal records (no later commit of their own).
                    discarded = [spi for i in accepted for spi in items[i][2]]
                    if discarded:
                        self._discard(discarded)
        except BaseException as exc:
            # Nothing half-provisioned stays live: the HAC hears 500 and
            # withdraws these SAs (and, not knowing whether the older ones
            # went, retires them too), so they are dead here at once.  Their
            # records wait in the binding cache for the next flush that succeeds.
            for i, fresh in zip(accepted, new, strict=False):  # new may stop short
                if fresh:
                    held = items[i][0]
                    for ev in self.core.remove_sa(held.sa.spi, issued=held):
                        self._log_binding(ev)
            if not isinstance(exc, Exception):
                raise
            for i in accepted:
                results[i] = exc
            return results
        if self._to_discard:
            # A withdrawn SA's delete that failed above (it stays queued) was
            # done by the store write itself, which replaced the row: the
            # queued delete would now remove the SA just installed under
            # that SPI -- acknowledged to the HAC as durable (found in review).
            stored = {items[i][0].sa.spi for i in accepted}
            self._to_discard = [spi for spi in self._to_discard if spi not in stored]
        for i, fresh, known_list in zip(accepted, new, gone, strict=True):
            issued, _ha_id, withdraw = items[i]
            for spi, known in zip(withdraw, known_list, strict=True):
                self._withdrawn(spi, known, discarded=self._one_commit is not None)
            if not fresh:
                continue
            sa = issued.sa
            self.emit(
                "mipsec_ha_sa_installed",
                spi=sa.spi,
                mn_id=sa.mn_id,
                suite=sa.suite.name,
                scope=sa.scope,
                validity_end=sa.validity_end,
            )
            log.log(
                log_level,
                "SA installed spi=%d mn_id=%s suite=%s scope=%d validity_end=%s",
                sa.spi,
                sa.mn_id,
                sa.suite.name,
                sa.scope,
                sa.validity_end.isoformat(),
            )
        return results

    @contextlib.contextmanager
    def _burst_commit(self) -> Iterator[None]:
        """One commit for a burst's SA rows and their binding-cache records
        when they share a file (``[bindings] in_sa_store``); else each its own."""
        begin = self._one_commit
        if begin is None:
            yield
            return
        bounded = self._bounded_tx
        # held(): a rollback queues the records again; the core's state for
        # the new SAs is undone by the caller (remove_sa), as for any failure.
        with self.bindings.held(), bounded() if bounded is not None else begin():
            yield

    def _rows_commit(self) -> AbstractContextManager[None]:
        """The burst's SA rows in one transaction of their own, committed
        before the core installs them and the records are flushed (the order
        a crash test holds), begun within LOOP_LOCK_WAIT or StoreBusyError:
        another process's lock must not hold every MN on this loop for
        SQLite's 5 s; the HAC hears 500 and withdraws, as for any failure.
        Inside ``_burst_commit``'s one transaction (``in_sa_store``): nothing
        more to begin."""
        if self._one_commit is not None:
            return contextlib.nullcontext()
        return self._bounded_commit()

    def _bounded_commit(self) -> AbstractContextManager[None]:
        """A store transaction begun within LOOP_LOCK_WAIT (``StoreBusyError``
        after), for a write that may fail now and be retried; a plain
        context for a store that cannot bound its wait."""
        bounded = self._bounded_tx
        return contextlib.nullcontext() if bounded is None else bounded()

    async def withdraw_sa(self, spi: int) -> None:
        """:meth:`withdraw_sa_now`, as a coroutine."""
        self.withdraw_sa_now(spi)

    def withdraw_sa_now(self, spi: int) -> None:
        """The HAC withdrew the SA (superseded, revoked, provisioning failed): dead for good.

        The withdrawal record is committed before the store forgets the SA
        and before this returns (the HAC's confirmation), so a crash at any
        point leaves the SPI dead, never live again.

        The row's delete waits for the end of the turn (``_withdrawn``),
        shared by every withdrawal of the turn: withdrawals handed over one
        by one (the local transport) would pay one each in their own
        transaction (measured 61 -> 110 µs each, six per turn).
        """
        known = self._withdraw_in_core(spi)
        # Raises (also after LOOP_LOCK_WAIT for a lock held elsewhere): the
        # HAC gets no confirmation, and retries.
        self.bindings.flush(wait=LOOP_LOCK_WAIT)
        self._withdrawn(spi, known)

    def withdraw_many_now(self, spis: Sequence[int]) -> list[Exception | None]:
        """``withdraw_sa_now`` of each SPI, in order, with one commit for them all.

        The provisioning server hands a pipelined burst of withdrawals here
        (the HAC sends those it owes an HA together): one binding-cache
        commit per burst instead of one per SA -- measured ~5.6 withdrawals
        per read when the bench re-bootstraps its MNs back to back.  Per SPI:
        None (withdrawn, its record durable) or the exception
        ``withdraw_sa_now`` would have raised.  Every record of the burst is
        committed before this returns, so no confirmation leaves before its
        withdrawal is durable; a failed commit fails them all (the HAC
        retries each).  With ``[bindings] in_sa_store`` the withdrawn rows
        are deleted in that same transaction (no later commit of their own:
        six per burst measured 38 µs each so, 48 with the delete deferred).
        """
        results: list[Exception | None] = [None] * len(spis)
        done: list[tuple[int, bool]] = []  # (spi, known) of those the core let go
        for i, spi in enumerate(spis):
            try:
                done.append((spi, self._withdraw_in_core(spi)))
            except Exception as exc:  # that SPI alone: its HAC retries it
                results[i] = exc
        if not done:
            return results
        one_commit = self._one_commit is not None
        try:
            with self._burst_commit():
                # Also after LOOP_LOCK_WAIT for a lock held elsewhere: the
                # HAC gets no confirmation, and retries.
                self.bindings.flush(wait=LOOP_LOCK_WAIT)
                if one_commit:
                    self._discard([spi for spi, _ in done])
        except Exception as exc:
            # The core let them go already (dead here either way); their
            # records wait in the binding cache for the next flush.
            return [exc if r is None else r for r in results]
        for spi, known in done:
            self._withdrawn(spi, known, discarded=one_commit)
        return results

    def _withdraw_in_core(self, spi: int) -> bool:
        """The core's half of a withdrawal (its records wait for the next
        flush); True if this HA held the SA, in its core or its store."""
        known = self.core.has_spi(spi)
        # The stored SA is only needed when the core does not hold it (to
        # record its MN's tombstone); otherwise no key unwrapping here.
        held = None if known else self.store.get(spi, utcnow())
        for ev in self.core.remove_sa(spi, issued=held):
            self._log_binding(ev)
        return known or held is not None

    def _withdrawn(self, spi: int, known: bool, *, discarded: bool = False) -> None:
        """After the flush: the store forgets the SA (soon); log and hook.

        The store's delete waits for the end of this turn of the event loop,
        after the answer to the HAC has left, and is written for every SA
        withdrawn meanwhile in one transaction (issue 9: no commit on the
        critical path that safety does not need).  Safe to lose in a crash:
        the withdrawal record is durable already (the flush before this call),
        so a restart finds the row withdrawn and removes it (``start``).
        ``discarded``: the row went already, in the withdrawal's own
        transaction (``[bindings] in_sa_store``).
        """
        if not discarded:
            self._to_discard.append(spi)
            if len(self._to_discard) == 1:
                asyncio.get_running_loop().call_soon(self._discard_now)
        # DEBUG: a superseded SA is withdrawn on every re-bootstrap, and the
        # HAC logs each withdrawal with its reason (issue 9: one INFO line per
        # bootstrap); an SPI this HA never held is worth a line.
        if known:
            log.debug("SA withdrawn spi=%d", spi)
        else:
            # A burst of them (an HA that lost its store, then a mass
            # revocation): a few lines, then one that counts the rest.
            self._unknown_withdrawals.line(logging.INFO, "SA withdrawn spi=%d (unknown here)", spi)
        self.emit("mipsec_ha_sa_withdrawn", spi=spi)

    def _discard(self, spis: list[int]) -> None:
        many = getattr(self.store, "discard_many", None)
        if many is not None:
            many(spis)
        else:
            for spi in spis:
                self.store.remove(spi)

    def _discard_now(self) -> None:
        """The store forgets the SAs withdrawn since the last call (see ``_withdrawn``).

        On a failure they are withdrawn already (durable record), so nothing
        is at risk: they stay queued for the next expiry run (or an install
        under one of their SPIs, which deletes first); a restart removes them
        too.
        """
        spis, self._to_discard = self._to_discard, []
        if not spis:
            return
        try:
            with self._bounded_commit():  # retried later: no 5 s wait on the loop
                self._discard(spis)
        except Exception as exc:
            self._to_discard = spis + self._to_discard
            self._discard_outage.failed(cause(exc), logging.WARNING)
        else:
            self._discard_outage.worked()

    # ------------------------------------------------------------ timers

    async def _expiry_loop(self) -> None:
        runs = 0
        backlog, self._expired_at_start = self._expired_at_start, None
        if backlog is not None:
            # What ended while the HA was down and the start left: now, paced.
            try:
                await self._expire_paced(backlog)
            except Exception as exc:
                self._expiry_outage.failed(cause(exc))
        while True:
            await asyncio.sleep(self.expiry_interval)
            runs += 1
            step = self._clock_watch.check()
            if step is not None:
                log.warning("%s", step_line(step, f"HA {self.cfg.ha.id}: "))
            try:
                await self._expire_paced()
                if runs % STORE_EXPIRY_EVERY == 0:
                    # Bounded batches, paced (core/pacing.py): no stall
                    # however many SAs ended together.
                    await in_paced_batches(self._expire_store, EXPIRE_BATCH)
            except Exception as exc:  # a failing store must not end expiry for good
                # One line, no traceback; a store plugin's own message
                # could hold anything (``cause``).
                self._expiry_outage.failed(cause(exc))
            else:
                self._expiry_outage.worked()

    async def _expire_paced(self, lines: _ExpiryLines | None = None) -> None:
        """The timer's expiry: rounds of at most EXPIRE_BATCH bindings, SAs
        and records, each committed, paced (core/pacing.py).  100,000 that
        ended together cost 4.2 s of ``HaCore.expire`` and a 3.2 s commit in
        one call.  ``lines``: the start's run, to go on with."""
        run = lines if lines is not None else self._expiry_lines("at once")

        def round_() -> int:
            now = time.time()
            events = self.core.expire(now, EXPIRE_BATCH)
            more = self.core.expiry_due(now)
            run.take(events, more)
            self.flush_bindings()
            return int(more)

        await in_paced_batches(round_, 1)
        run.close()
        self._after_expiry()

    def _expiry_lines(self, when: str) -> _ExpiryLines:
        return _ExpiryLines(self.cfg.ha.id, self._log_binding, when)

    def expire_now(self, *, store: bool = True) -> int:
        """Expire bindings and SAs now, all of them in one call; returns the
        number of binding events (the timer goes in rounds: ``_expire_paced``).

        Also checkpoints the binding cache's WAL, which bounds what a power
        loss can take with ``synchronous = "normal"`` (bindings.py).
        """
        events = self.core.expire(time.time())
        lines = self._expiry_lines("at once")
        lines.take(events, more=False)
        lines.close()
        self.flush_bindings()
        self._after_expiry()
        if store:
            self._expire_store()
        return len(events)

    def _after_expiry(self) -> None:
        self._discard_now()  # a delete that failed earlier (see _discard_now)
        try:
            self.bindings.checkpoint()
        except (sqlite3.Error, OSError) as exc:
            self._checkpoint_outage.failed(exc, logging.WARNING)
        else:
            self._checkpoint_outage.worked()

    def _expire_store(self) -> int:
        """Expired SAs leave the store: one batch of EXPIRE_BATCH when the
        store can bound its work (``expire_some``, no key unwrapped), else
        all at once.  Returns how many went."""
        expire_some = getattr(self.store, "expire_some", None)
        if expire_some is not None:
            return len(expire_some(utcnow(), EXPIRE_BATCH))
        return len(self.store.expire(utcnow()))

    # ------------------------------------------------------------ inspection

    def stats(self) -> dict[str, Any]:
        out = self.core.stats()
        out.update(self.counts)
        out["pulls_in_flight"] = len(self._pending)
        out["pull_sightings"] = len(self._pull_gate)
        out["pull_sources"] = len(self._pull_gate.sources)  # at most pullgate.MAX_SOURCES
        out["pull_limits"] = self._pull_gate.limits()  # [pull]'s, as a reload left them
        out["max_spi_records"] = self.core.max_spi_records
        if self.dataplane is not None:
            out["data"] = self.dataplane.stats()
        return out
