"""RADIUS accounting (RFC 2866) of the SAs a HAC issues: the ``radius`` accounting back end.

Selected by the HAC's optional ``[accounting]`` table (``backend =
"radius"``); the HAC registers the object this factory builds on its plugin
manager, so its event hooks receive:

* ``mipsec_sa_issued``  -> Accounting-Request Start (Acct-Status-Type 1);
* every ``interim_interval`` seconds, per live SA -> Interim-Update (3);
* ``mipsec_sa_expired`` -> Stop (2), Acct-Terminate-Cause Session-Timeout;
* ``mipsec_sa_withdrawn`` -> Stop, cause NAS-Request (superseded),
  Admin-Reset (revoked) or NAS-Error; an SA whose provisioning failed was
  never started, so it gets no Stop.

One SA is one accounting session: Acct-Session-Id is its SPI as 8 hex
digits, User-Name its ``mn_id``, Calling-Station-Id the MN's address,
Called-Station-Id the HA's id; Acct-Session-Time counts from the Start up
to now or the SA's validity end, whichever is first.  Past that end a
session gets no more Interim-Updates and waits ``stop_grace`` (two of the
HAC's ``expiry_interval`` and 10 s) for its Stop, then is forgotten (another
HAC sharing the store ended it); at most ``ENDED_KEEP`` wait.

Hooks never block: they queue a record and return.  A sender task (started
in the running loop on the first event) delivers each record with the
client's retransmission and failover; while every server is down a record is
retried until ``give_up_after`` seconds after its event, with Acct-Delay-Time
telling the server how late it is (RFC 2866 §5.2: a new value, so a new
Identifier -- each retry after a failover is a new packet).  Records of one
SA are delivered in order.  ``aclose()`` flushes what it can within one
request's retransmission budget.

Options: those of every RADIUS client (``servers``, ``timeout``,
``retries``, ``dead_time``, ``nas_*``; the port defaults to 1813) plus
``interim_interval`` (seconds, 0 = none), ``give_up_after`` (seconds) and
``queue_limit`` (records waiting; beyond it the oldest is dropped and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from mipsec.aaa.codec import Request, encode_accounting_request
from mipsec.aaa.options import ClientOptions, make_client, nas_attributes, secrets_changed
from mipsec.aaa.radius import RadiusClient, RadiusError, RadiusTimeout, RadiusUnavailable
from mipsec.core.hookspecs import Factory, PluginContext, hookimpl
from mipsec.core.logburst import LineBurst
from mipsec.plugins._options import parse_options

__all__ = ["AccountingFactory", "RadiusAccounting"]

log = logging.getLogger("mipsec.aaa.accounting")

ACCT_PORT = 1813  # RFC 2866 §3 (IANA "radius-acct")
START, STOP, INTERIM = 1, 2, 3  # Acct-Status-Type (RFC 2866 §5.1)
# Acct-Terminate-Cause (RFC 2866 §5.10)
_CAUSES = {"expired": 5, "superseded": 10, "revoked": 6, "provisioning-failed": 9}
_DEFAULT_CAUSE = 10  # NAS-Request


class AccountingOptions(ClientOptions):
    interim_interval: Annotated[float, Field(ge=0, le=86400 * 7)] = 0.0
    give_up_after: Annotated[float, Field(gt=0, le=86400 * 7)] = 3600.0
    queue_limit: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000


@dataclass
class _Session:
    mn_id: str
    started: float  # monotonic
    peer: str
    ha_id: str
    # The SA's validity end (epoch seconds): past it no more Interim-Updates;
    # the session waits ``stop_grace`` for its Stop (the HAC's expiry sweep
    # comes up to an expiry_interval later), then is forgotten -- another
    # HAC sharing the store ended the SA and sent it (the interims went on
    # for good before the twenty-seventh session; found in review).
    end: float = float("inf")


# Records being sent at once (each retried until ``give_up_after``); the rest
# wait in the queue, so ``queue_limit`` bounds what is held -- it bounded
# nothing while a server was down (every record became a retrying task at
# once: 50,000 Starts, 176 MB; found in review).
IN_FLIGHT = 256
# How far into the queue a full one looks for an Interim-Update to drop
# before a Start or a Stop.
INTERIM_SCAN = 64
# A session past its SA's validity end waits for its Stop two of the HAC's
# expiry_interval (its sweep sends the Stop up to one interval late, and a
# paced or failed sweep one later still) and this much slack, seconds.
STOP_SLACK = 10.0
DEFAULT_EXPIRY_INTERVAL = 30.0  # [hac] expiry_interval's default (core/config.py)
# At most this many sessions past their validity end wait for their Stop;
# beyond, those that ended first are forgotten (a Stop that still comes for
# one is sent as after a restart: no Acct-Session-Time, no station ids).
ENDED_KEEP = 100_000


def stop_grace(expiry_interval: float) -> float:
    """Seconds a session past its validity end waits for its Stop."""
    return 2 * expiry_interval + STOP_SLACK


@dataclass
class _Record:
    status: int
    spi: int
    attrs: list[tuple[str, Any]]
    created: float  # monotonic: Acct-Delay-Time counts from here
    done: asyncio.Event | None = field(default=None, repr=False)


@dataclass
class AccountingStats:
    queued: int = 0
    sent: int = 0  # Accounting-Responses received
    dropped: int = 0  # given up or pushed out of a full queue


class RadiusAccounting:
    """The accounting back end: event hooks in, Accounting-Requests out."""

    def __init__(
        self,
        client: RadiusClient,
        opts: AccountingOptions,
        *,
        clock: Any = time.monotonic,
        grace: Callable[[], float] = lambda: stop_grace(DEFAULT_EXPIRY_INTERVAL),
    ) -> None:
        self.client = client
        self._grace = grace  # -> seconds an ended session waits for its Stop (read live)
        self.opts = opts
        self.stats = AccountingStats()
        self._nas = nas_attributes(opts)
        self._clock = clock
        self._sessions: dict[int, _Session] = {}
        self._queue: deque[_Record] = deque()
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._interim: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tail: dict[int, asyncio.Task[None]] = {}  # spi -> its last delivery
        self._room: asyncio.Event | None = None  # set when a delivery ends
        # Every dropped record -- pushed out of a full queue, or given up
        # while every server was down -- goes through one burst limiter:
        # a few lines, then a count (core/logburst.py).
        self._drops = LineBurst(log, "accounting records dropped")
        self._base_dir: Path | None = None  # set by the factory: secret_file paths resolve here
        self._closed = False

    def stale(self) -> bool:
        """A ``secret_file`` now holds another secret than the one the
        servers were built with (a rotated secret); a reload says so."""
        return self._base_dir is not None and secrets_changed(
            self.opts, self._base_dir, self.client
        )

    def __repr__(self) -> str:
        return f"RadiusAccounting({', '.join(self.client.servers)})"

    # ------------------------------------------------------------ event hooks

    @hookimpl
    def mipsec_sa_issued(
        self,
        spi: int,
        mn_id: str,
        suite: str,
        scope: int,
        validity_end: datetime,
        ha_id: str,
        peer: str,
    ) -> None:
        self._sessions[spi] = _Session(mn_id, self._clock(), peer, ha_id, validity_end.timestamp())
        self._queue_record(START, spi)

    @hookimpl
    def mipsec_sa_expired(self, spi: int, mn_id: str, validity_end: datetime) -> None:
        self._stop(spi, mn_id, "expired")

    @hookimpl
    def mipsec_sa_withdrawn(self, spi: int, mn_id: str, ha_id: str, reason: str) -> None:
        if reason == "provisioning-failed" and spi not in self._sessions:
            return  # never started: nothing to stop
        self._stop(spi, mn_id, reason)

    def _stop(self, spi: int, mn_id: str, reason: str) -> None:
        if spi not in self._sessions:
            # A Stop for an SA started before a restart: the server matches
            # it by Acct-Session-Id; there is no start time to count from.
            self._sessions[spi] = _Session(mn_id, -1.0, "", "")
        self._queue_record(STOP, spi, cause=_CAUSES.get(reason, _DEFAULT_CAUSE))
        del self._sessions[spi]

    # ------------------------------------------------------------ records

    def _attributes(self, status: int, spi: int, cause: int | None) -> list[tuple[str, Any]]:
        s = self._sessions[spi]
        attrs: list[tuple[str, Any]] = [
            ("Acct-Status-Type", status),
            ("Acct-Session-Id", f"{spi:08x}"),
            ("User-Name", s.mn_id),
            *self._nas,
            ("Event-Timestamp", int(time.time())),
        ]
        if s.peer:
            attrs.append(("Calling-Station-Id", s.peer))
        if s.ha_id:
            attrs.append(("Called-Station-Id", s.ha_id))
        if status != START and s.started >= 0:
            attrs.append(("Acct-Session-Time", self._session_time(s)))
        if cause is not None:
            attrs.append(("Acct-Terminate-Cause", cause))
        return attrs

    def _session_time(self, s: _Session) -> int:
        """RFC 2866 §5.7: seconds of service, from the Start up to now or
        the SA's validity end, whichever is first -- an expired SA's Stop
        comes from the HAC's sweep, up to an expiry_interval later."""
        overrun = max(0.0, time.time() - s.end)
        return max(0, int(self._clock() - s.started - overrun))

    def _queue_record(self, status: int, spi: int, cause: int | None = None) -> None:
        if self._closed:
            return
        if len(self._queue) + len(self._tasks) >= self.opts.queue_limit and not self._drop_one():
            self._dropped(spi)  # everything held is being sent: the new one goes
            return
        self._queue.append(
            _Record(status, spi, self._attributes(status, spi, cause), self._clock())
        )
        self.stats.queued += 1
        self._kick()

    def _drop_one(self) -> bool:
        """Make room: an Interim-Update near the front if there is one (a
        Start or Stop matters more), else the oldest waiting record."""
        q = self._queue
        if not q:
            return False
        for i, rec in enumerate(itertools.islice(q, INTERIM_SCAN)):
            if rec.status == INTERIM:
                del q[i]
                break
        else:
            rec = q.popleft()
        self._dropped(rec.spi)
        return True

    def _dropped(self, spi: int) -> None:
        self.stats.dropped += 1
        # A few lines, then one that counts the rest (core/logburst.py).
        self._drops.line(
            logging.WARNING,
            "accounting queue full (%d): dropped a record for spi=%08x",
            self.opts.queue_limit,
            spi,
        )

    def _given_up(self, rec: _Record, why: str) -> None:
        """No server took ``rec`` within ``give_up_after``: dropped.  Through
        the burst limiter -- one WARNING per record flooded the log during
        an outage (300 lines for 300 records; found in review, twenty-ninth
        session)."""
        self.stats.dropped += 1
        self._drops.line(
            logging.WARNING,
            "accounting record status=%d spi=%08x dropped after %.0f s: %s",
            rec.status,
            rec.spi,
            self._clock() - rec.created,
            why,
        )

    def _kick(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the records wait for the first event in one
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._room = asyncio.Event()
            self._runner = loop.create_task(self._run())
            self._interim = loop.create_task(self._session_loop())
        assert self._wake is not None
        self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        cap = min(IN_FLIGHT, self.opts.queue_limit)
        while True:
            while self._queue and len(self._tasks) < cap:
                rec = self._queue.popleft()
                prev = self._tail.get(rec.spi)
                task = asyncio.create_task(self._deliver(rec, prev))
                self._tasks.add(task)
                self._tail[rec.spi] = task
                task.add_done_callback(self._finished(rec.spi))
            self._wake.clear()
            await self._wake.wait()

    def _finished(self, spi: int) -> Any:
        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if self._tail.get(spi) is task:
                del self._tail[spi]
            if self._wake is not None:
                self._wake.set()  # room for the next waiting record
            if self._room is not None:
                self._room.set()

        return done

    async def _deliver(self, rec: _Record, prev: asyncio.Task[None] | None) -> None:
        if prev is not None:  # one SA's records in order: Start before Stop
            with contextlib.suppress(BaseException):
                await asyncio.shield(prev)
        while True:
            delay = max(0, int(self._clock() - rec.created))

            def build(secret: bytes, identifier: int, delay: int = delay) -> Request:
                attrs = [*rec.attrs, ("Acct-Delay-Time", delay)] if delay else rec.attrs
                return encode_accounting_request(identifier, secret, attrs)

            try:
                server, _ = await self.client.send(build)
            except RadiusUnavailable as exc:
                wait = exc.retry_after
                why = str(exc)
            except RadiusTimeout as exc:
                wait = self.client.timeout
                why = str(exc)
            except RadiusError:
                return  # closed
            else:
                self.stats.sent += 1
                log.debug(
                    "accounting status=%d spi=%08x acknowledged by %s", rec.status, rec.spi, server
                )
                return
            if self._closed or self._clock() - rec.created + wait > self.opts.give_up_after:
                self._given_up(rec, why)
                return
            await asyncio.sleep(max(wait, 1.0))

    async def _session_loop(self) -> None:
        """Every ``interim_interval`` (without interims: every grace): forget
        the sessions that ended long enough ago, then the Interim-Updates."""
        while True:
            interval = self.opts.interim_interval
            await asyncio.sleep(interval if interval > 0 else self._grace())
            now = time.time()
            self._forget_ended(now)
            if interval > 0:
                await self._interims(now)

    def _forget_ended(self, now: float) -> None:
        """Sessions past their validity end wait ``grace`` seconds for their
        Stop, which the HAC's expiry sweep sends up to an expiry_interval
        late: forgotten before, an interim tick in between made that Stop
        one with no Acct-Session-Time nor station ids (found in review,
        twenty-ninth session).  Past the grace, another HAC ended the SA and
        sent the Stop: the session goes.  At most ENDED_KEEP wait; beyond,
        those that ended first go."""
        grace = self._grace()
        waiting: list[tuple[float, int]] = []
        gone = 0
        for spi, s in list(self._sessions.items()):
            if s.end + grace <= now:
                del self._sessions[spi]
                gone += 1
            elif s.end <= now:
                waiting.append((s.end, spi))
        if gone:
            log.debug(
                "accounting: %d session(s) past validity end + %g s, no Stop: forgotten",
                gone,
                grace,
            )
        over = len(waiting) - ENDED_KEEP
        if over > 0:
            for _, spi in heapq.nsmallest(over, waiting):
                del self._sessions[spi]
            log.warning(
                "accounting: %d sessions past their validity end await a Stop, over %d: "
                "the %d that ended first forgotten (a Stop for them carries no session time)",
                len(waiting),
                ENDED_KEEP,
                over,
            )

    async def _interims(self, now: float) -> None:
        for spi, session in list(self._sessions.items()):
            if session.end <= now:
                continue  # ended: its Stop comes from the expiry sweep, or from elsewhere
            # Queued as room comes, not dropped by the thousand in one
            # burst (100k SAs against the default queue_limit: 90k
            # interims and log lines lost per interval; found in review).
            while len(self._queue) + len(self._tasks) >= self.opts.queue_limit:
                assert self._room is not None
                self._room.clear()
                await self._room.wait()
            if self._sessions.get(spi) is session:
                self._queue_record(INTERIM, spi)

    # ------------------------------------------------------------ lifecycle

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued record was delivered or given up (tests, stop)."""
        self._kick()
        budget = timeout if timeout is not None else self._budget()
        async with asyncio.timeout(budget):
            while self._queue or self._tasks:
                if self._tasks:
                    await asyncio.wait(list(self._tasks))
                else:
                    await asyncio.sleep(0)

    def _budget(self) -> float:
        return self.client.timeout * (self.client.retries + 1) * len(self.client.servers) + 1

    async def aclose(self) -> None:
        """Service stop: deliver what is queued within one request's budget, then close.

        What is still unsent then is lost (the queue is in memory, README
        "Not (yet) done"): said in one WARNING with the count."""
        budget = self._budget()
        with contextlib.suppress(TimeoutError):
            await self.flush(budget)
        left = len(self._queue) + len(self._tasks)
        if left:
            self.stats.dropped += left
            log.warning(
                "accounting: %d record(s) not sent at stop (no server answered within "
                "%.0f s): lost, there is no spool on disk",
                left,
                budget,
            )
        self._closed = True
        self._drops.close()  # the count of a burst still open
        for task in (self._runner, self._interim, *self._tasks):
            if task is not None:
                task.cancel()
        await self.client.aclose()


class AccountingFactory:
    """``mipsec_accounting_backends`` factory ``radius``."""

    name = "radius"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> RadiusAccounting:
        opts = parse_options(AccountingOptions, options)
        # The HAC's [hac] expiry_interval, read live (a reload may change it).
        expiry = ctx.extra.get("expiry_interval")
        interval: Callable[[], float] = (
            expiry if callable(expiry) else lambda: DEFAULT_EXPIRY_INTERVAL
        )
        backend = RadiusAccounting(
            make_client(opts, ctx.base_dir, ACCT_PORT),
            opts,
            grace=lambda: stop_grace(interval()),
        )
        backend._base_dir = ctx.base_dir
        return backend


@hookimpl
def mipsec_accounting_backends() -> Sequence[Factory]:
    return [AccountingFactory()]
