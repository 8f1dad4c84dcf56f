"""An asyncio RADIUS client: UDP sockets, Identifiers, retransmission, failover.

Packets are built and verified by ``codec.py`` (sans-I/O); this module only
moves them, for every MN at once -- one MN waiting on RADIUS never delays
another, because each exchange is its own coroutine and every reply is
routed by (socket, Identifier) to the future waiting for it.

* **Identifiers** (RFC 2865 §3, RFC 5080 §2.2.1): a request keeps its
  Identifier and Request Authenticator -- the identical octets -- across
  retransmissions; an Identifier is free again only once its request is
  answered or abandoned, and they are handed out round-robin, so one is
  reused as late as possible.  Each UDP socket (its own source port) has 256
  of them; more outstanding requests open more sockets, up to
  ``max_sockets`` per server, beyond which a request waits for a free one.
* **Retransmission**: ``retries`` more sends of the same packet, ``timeout``
  seconds apart; no valid reply by then is "no answer" from that server.
* **Failover and hold-off**: a server that does not answer is marked dead
  for ``dead_time`` seconds and the request moves on to the next live server
  in configuration order; while every server is dead, requests fail at once
  (:class:`RadiusUnavailable`, with the time until the first one revives).
  A conversation that holds a server's State is *pinned* to that server:
  State means nothing to another one.
* **Unverifiable replies** are dropped (the exchange keeps waiting: a forged
  reply must not abort it) but counted per server and logged -- one line
  naming the server, at most every ``WARN_INTERVAL`` seconds -- and the
  eventual error says the server answered but nothing verified, which is
  what a wrong shared secret looks like.  A reply that verifies against
  the request its Identifier carried *before* (a late duplicate, landing
  once the Identifier was reused) is no such evidence: it is counted as
  ``unexpected`` and logged at DEBUG, as a reply to no outstanding request.

Sockets are *connected* UDP sockets: datagrams from any other address never
reach this code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from pyrad.dictionary import Dictionary

from mipsec.aaa.codec import (
    HEADER_LEN,
    RadiusWireError,
    Reply,
    ReplyVerifyError,
    Request,
    answers_authenticator,
    decode_reply,
    encode_status_server,
)
from mipsec.aaa.dictionary import check_dictionary, load_dictionary
from mipsec.core.errors import LocalProtocolError, MipsecError
from mipsec.core.outage import cause

__all__ = [
    "RadiusClient",
    "RadiusError",
    "RadiusServer",
    "RadiusTimeout",
    "RadiusUnavailable",
    "RequestBuilder",
    "ServerStats",
]

log = logging.getLogger("mipsec.aaa.radius")

IDENTIFIERS = 256
RCVBUF = 1 << 20  # bytes asked for each socket's receive buffer (the kernel may cap it)
WARN_INTERVAL = 60.0  # seconds between two "unverifiable replies" lines per server

# (shared secret, Identifier) -> the request to send: the packet depends on
# both, and the client picks the server and the Identifier.
RequestBuilder = Callable[[bytes, int], Request]


@dataclass(frozen=True)
class RadiusServer:
    """One RADIUS server and the secret shared with it (never in repr or logs)."""

    host: str
    port: int
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.secret:
            raise LocalProtocolError("radius server: an empty shared secret")
        if not 1 <= self.port <= 65535:
            raise LocalProtocolError("radius server: port outside 1..65535")

    @property
    def label(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class ServerStats:
    requests: int = 0  # first transmissions
    retransmissions: int = 0
    replies: int = 0  # verified replies
    unverifiable: int = 0  # replies dropped by the authenticator checks
    malformed: int = 0  # replies that could not be parsed at all
    unexpected: int = 0  # replies to no outstanding request (late duplicates, reused Ids too)
    timeouts: int = 0  # requests that got no verified reply
    stalled: int = 0  # of those, while the server answered other requests (not held off)
    probes: int = 0  # Status-Server probes sent (RFC 5997): before a hold-off, of it or another
    probes_answered: int = 0  # ... that the server answered (evidence of life)
    sockets: int = 0  # UDP sockets (source ports) opened
    socket_errors: int = 0  # requests that found no socket (name unresolved, no route)


class RadiusError(MipsecError):
    """A RADIUS exchange could not be completed."""


class RadiusTimeout(RadiusError):
    """No verified reply from ``server`` after every retransmission."""

    def __init__(
        self,
        server: str,
        tries: int,
        timeout: float,
        rejected: Counter[str],
        *,
        reason: str | None = None,
    ) -> None:
        self.server = server
        self.tries = tries
        self.rejected = rejected  # kind -> count of replies dropped for this request
        self.sent_at = -math.inf  # when the request was first sent (client clock)
        if reason is not None:  # never sent: no socket (``send``)
            pass
        elif rejected:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(rejected.items()))
            reason = (
                f"RADIUS server {server} answered but no reply verified ({kinds}): "
                "wrong shared secret?"
            )
        else:
            # FreeRADIUS and hostapd drop a request whose Message-Authenticator
            # does not verify without a word: a wrong secret can look like this.
            reason = (
                f"no answer from RADIUS server {server} ({tries} tries, {timeout:g} s apart; "
                "down, unreachable, or not sharing our secret)"
            )
        super().__init__(reason)


class RadiusUnavailable(RadiusError):
    """Every server is in its dead-server hold-off; ``retry_after`` seconds from now."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(0.0, retry_after)
        super().__init__(
            f"every RADIUS server is marked dead (next retry in {self.retry_after:.0f} s)"
        )


class _Pending:
    __slots__ = ("future", "rejected", "request")

    def __init__(self, future: asyncio.Future[Reply], request: Request) -> None:
        self.future = future
        self.request = request
        self.rejected: Counter[str] = Counter()


class _Channel(asyncio.DatagramProtocol):
    """One connected UDP socket to one server: 256 Identifiers."""

    def __init__(self, server: _ServerState) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, _Pending | None] = {}  # None: allocated, not sent yet
        # Identifier -> the Request Authenticator of the last request released
        # on it (at most 256: each release replaces its Identifier's entry).
        # A late duplicate reply to that request, landing once the Identifier
        # carries a new one (RFC 5080 §2.2.1), verifies against it: said as
        # a late reply, not as a wrong secret.
        self.previous: dict[int, bytes] = {}
        self._next = secrets.randbelow(IDENTIFIERS)
        self.closed = False

    # ---- identifiers

    def has_free(self) -> bool:
        return not self.closed and len(self.pending) < IDENTIFIERS

    def allocate(self) -> int | None:
        if not self.has_free():
            return None
        for _ in range(IDENTIFIERS):
            ident = self._next
            self._next = (self._next + 1) % IDENTIFIERS
            if ident not in self.pending:
                self.pending[ident] = None
                return ident
        return None  # unreachable: has_free() said there is one

    def release(self, ident: int) -> None:
        p = self.pending.pop(ident, None)
        if p is not None:
            self.previous[ident] = p.request.authenticator

    def late_reply(self, data: bytes, secret: bytes) -> bool:
        """A reply to the request its Identifier carried before (a late duplicate)."""
        before = self.previous.get(data[1])
        return before is not None and answers_authenticator(data, before, secret)

    # ---- datagrams

    def send(self, raw: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.sendto(raw)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.server.received(self, data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) on a connected socket: the
        # retransmission timer decides, as for a silent server.
        log.debug("RADIUS server %s: socket error %s", self.server.config.label, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for p in self.pending.values():
            if p is not None and not p.future.done():
                p.future.set_exception(ConnectionError("RADIUS socket closed"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _ServerState:
    def __init__(self, config: RadiusServer, dictionary: Dictionary) -> None:
        self.config = config
        self.dictionary = dictionary
        self.stats = ServerStats()
        self.channels: list[_Channel] = []
        self.opening = asyncio.Lock()
        self.waiters: list[asyncio.Future[None]] = []
        self.dead_until = 0.0
        self.dead = False
        self.found_dead = -math.inf  # when it was last held off
        # When the server last sent a verified reply (to any request): a
        # server that answers others is alive, even if one conversation
        # stalls behind it (a proxied realm whose upstream did not answer).
        self.last_reply = -math.inf
        self._last_warn = -WARN_INTERVAL
        self.clock: Callable[[], float] = time.monotonic

    def received(self, channel: _Channel, data: bytes) -> None:
        label = self.config.label
        if len(data) < HEADER_LEN:
            self.stats.malformed += 1
            self._warn(f"a {len(data)}-octet datagram dropped")
            return
        p = channel.pending.get(data[1])
        if p is None or p.future.done():
            self.stats.unexpected += 1
            log.debug("RADIUS server %s: a reply to no outstanding request (dropped)", label)
            return
        try:
            reply = decode_reply(data, p.request, self.config.secret, dictionary=self.dictionary)
        except ReplyVerifyError as exc:
            if channel.late_reply(data, self.config.secret):
                # Its Identifier was reused meanwhile: a genuine reply, too
                # late -- not a forgery nor a wrong secret (found in review,
                # twenty-ninth session: it was counted unverifiable, and the
                # new request's timeout blamed the shared secret).
                self.stats.unexpected += 1
                log.debug("RADIUS server %s: a late reply to an earlier request (dropped)", label)
                return
            self.stats.unverifiable += 1
            p.rejected[exc.kind] += 1
            self._warn(f"reply dropped: {exc.reason}")
            return
        except RadiusWireError as exc:
            self.stats.malformed += 1
            p.rejected["malformed"] += 1
            self._warn(f"malformed reply dropped: {exc}")
            return
        self.stats.replies += 1
        self.last_reply = self.clock()
        p.future.set_result(reply)

    def _warn(self, what: str) -> None:
        now = self.clock()
        if now - self._last_warn >= WARN_INTERVAL:
            self._last_warn = now
            s = self.stats
            log.warning(
                "RADIUS server %s: %s (%d unverifiable, %d malformed so far; shared secret?)",
                self.config.label,
                what,
                s.unverifiable,
                s.malformed,
            )

    def wake_one(self) -> None:
        while self.waiters:
            w = self.waiters.pop(0)
            if not w.done():
                w.set_result(None)
                return


class RadiusClient:
    """Sends requests to a group of servers (in order, with failover).

    ``timeout``: seconds to wait for a verified reply before each
    retransmission; ``retries``: retransmissions after the first send;
    ``dead_time``: hold-off of a server that did not answer (0 = none).
    ``status_server``: before holding a server off, ask it with one
    Status-Server (RFC 5997) and hold it off only if that goes unanswered
    too (an authentication server answers Access-Accept).
    Create it anywhere; sockets are opened on first use, in the running loop.
    """

    def __init__(
        self,
        servers: Sequence[RadiusServer],
        *,
        timeout: float = 2.0,
        retries: int = 1,
        dead_time: float = 30.0,
        max_sockets: int = 16,
        dictionary: Dictionary | None = None,
        clock: Callable[[], float] = time.monotonic,
        status_server: bool = False,
    ) -> None:
        if not servers:
            raise LocalProtocolError("radius client: no server")
        if timeout <= 0 or retries < 0 or dead_time < 0 or max_sockets < 1:
            raise LocalProtocolError("radius client: bad timing or socket limits")
        d = load_dictionary() if dictionary is None else check_dictionary(dictionary)
        self._servers = [_ServerState(s, d) for s in servers]
        for st in self._servers:
            st.clock = clock
        self._by_label = {st.config.label: st for st in self._servers}
        self.timeout = timeout
        self.retries = retries
        self.dead_time = dead_time
        self.max_sockets = max_sockets
        self._clock = clock
        self._closed = False
        self.status_server = status_server
        self._probes: dict[str, asyncio.Task[None]] = {}  # server label -> its probe

    def __repr__(self) -> str:
        return f"RadiusClient({', '.join(self._by_label)})"

    @property
    def servers(self) -> list[str]:
        return list(self._by_label)

    @property
    def configs(self) -> list[RadiusServer]:
        """The servers as configured (their secrets included: never log them)."""
        return [st.config for st in self._servers]

    def stats(self) -> dict[str, ServerStats]:
        return {label: st.stats for label, st in self._by_label.items()}

    def is_dead(self, label: str) -> bool:
        st = self._by_label[label]
        return st.dead and st.dead_until > self._clock()

    # ------------------------------------------------------------ requests

    async def send(self, build: RequestBuilder, *, server: str | None = None) -> tuple[str, Reply]:
        """Send one request; return (server label, verified reply).

        ``server`` pins the request to one server (a conversation holding
        its State).  Raises :class:`RadiusTimeout` when no server that was
        tried answered, :class:`RadiusUnavailable` when every server is in
        hold-off, and ``LocalProtocolError`` when the request cannot be built.
        """
        if self._closed:
            raise RadiusError("RADIUS client closed")
        if server is not None:
            candidates = [self._by_label[server]]
        else:
            now = self._clock()
            candidates = [st for st in self._servers if not self._held_off(st, now)]
            if not candidates:
                raise RadiusUnavailable(min(st.dead_until for st in self._servers) - now)
        last: RadiusTimeout | None = None
        for st in candidates:
            if last is not None and self._held_off(st, self._clock()):
                continue  # marked dead by another request meanwhile
            try:
                reply = await self._exchange(st, build)
            except RadiusTimeout as exc:
                self._mark_dead(st, exc, exc.sent_at)
                last = exc
                continue
            except OSError as exc:
                # No socket to the server (its name does not resolve, no
                # route): as good as no answer -- the next server is tried,
                # and this one is held off like a silent one.  Raised out
                # of send() before, no other server was ever tried (found
                # in review).
                if self._closed:
                    raise RadiusError("RADIUS client closed") from None
                st.stats.socket_errors += 1
                why = f"no socket to RADIUS server {st.config.label}: {cause(exc)}"
                err = RadiusTimeout(st.config.label, 0, self.timeout, Counter(), reason=why)
                err.sent_at = self._clock()
                self._mark_dead(st, err, err.sent_at)
                last = err
                continue
            self._mark_alive(st)
            return st.config.label, reply
        if last is None:  # every other candidate went into hold-off meanwhile
            now = self._clock()
            raise RadiusUnavailable(min(st.dead_until for st in self._servers) - now)
        raise last

    async def _exchange(self, st: _ServerState, build: RequestBuilder) -> Reply:
        channel, ident = await self._acquire(st)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        try:
            request = build(st.config.secret, ident)
            pending = _Pending(future, request)
            channel.pending[ident] = pending
            tries = self.retries + 1
            silent = 0  # timeouts so far without a verified reply
            sent_at = self._clock()
            for attempt in range(tries):
                if attempt:
                    st.stats.retransmissions += 1
                else:
                    st.stats.requests += 1
                channel.send(request.raw)  # identical octets every time
                try:
                    done, _ = await asyncio.wait((future,), timeout=self.timeout)
                except asyncio.CancelledError:
                    # The caller gave up (its own deadline, e.g. the HAC's EAP
                    # timeout) while this server had already let a whole
                    # timeout pass: hold it off, or every later MN would wait
                    # on it too and never reach the next server.
                    if silent and not self._closed:
                        st.stats.timeouts += 1
                        self._mark_dead(
                            st,
                            RadiusTimeout(st.config.label, silent, self.timeout, pending.rejected),
                            sent_at,
                        )
                    raise
                if done:
                    try:
                        return future.result()
                    except ConnectionError:
                        break  # the socket went away: as good as no answer
                silent += 1
            if self._closed:
                raise RadiusError("RADIUS client closed")
            st.stats.timeouts += 1
            err = RadiusTimeout(st.config.label, tries, self.timeout, pending.rejected)
            err.sent_at = sent_at
            raise err
        finally:
            if not future.done():
                future.cancel()
            channel.release(ident)
            st.wake_one()

    async def _acquire(self, st: _ServerState) -> tuple[_Channel, int]:
        while True:
            if self._closed:
                raise RadiusError("RADIUS client closed")
            if any(c.closed for c in st.channels):
                st.channels[:] = [c for c in st.channels if not c.closed]
            for channel in st.channels:
                ident = channel.allocate()
                if ident is not None:
                    return channel, ident
            if len(st.channels) < self.max_sockets:
                async with st.opening:  # one socket opened at a time, and only if needed
                    # Both checked again once the lock is ours: the requests
                    # queued on it each opened one more socket, past
                    # max_sockets, when the server was silent (found in review).
                    if len(st.channels) < self.max_sockets and not any(
                        c.has_free() for c in st.channels
                    ):
                        channel = await self._open(st)
                        if self._closed:  # closed while the socket was being opened
                            channel.close()
                            raise RadiusError("RADIUS client closed")
                        st.channels.append(channel)
                continue
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            st.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # Woken for a freed Identifier, then cancelled before it
                    # ran: the wake-up goes to the next waiter, or that
                    # Identifier waited for the next release (found in review).
                    st.wake_one()
                raise
            finally:
                if waiter in st.waiters:
                    st.waiters.remove(waiter)

    async def _open(self, st: _ServerState) -> _Channel:
        loop = asyncio.get_running_loop()
        transport, channel = await loop.create_datagram_endpoint(
            lambda: _Channel(st), remote_addr=(st.config.host, st.config.port)
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Up to 256 replies can arrive in one burst; the default buffer
            # (about 200 KiB of kernel accounting, ~1 KiB per datagram) drops
            # some, which costs a whole retransmission timeout.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        st.stats.sockets += 1
        return channel

    # ------------------------------------------------------------ server state

    def _held_off(self, st: _ServerState, now: float) -> bool:
        return st.dead and st.dead_until > now

    def _mark_dead(self, st: _ServerState, exc: RadiusTimeout, sent_at: float) -> None:
        if self.dead_time <= 0 or self._closed:
            return
        if st.last_reply >= sent_at:
            # It answered other requests since this one left: alive, only this
            # conversation stalled (e.g. upstream of a proxy).  Holding it off
            # would turn one lost conversation into 503s for every MN
            # (the "zombie" rule of FreeRADIUS's home servers, in spirit).
            st.stats.stalled += 1
            log.info("RADIUS server %s: a request went unanswered (%s)", st.config.label, exc)
            return
        if self.status_server and not self._held_off(st, self._clock()):
            # On a quiet HAC "no reply since" is no evidence: one MN naming a
            # realm whose upstream is slow -- or one that leaves after a
            # retransmission timeout -- held the only server off for
            # dead_time, every RADIUS bootstrap 503 meanwhile (found in
            # review).  Ask the server itself first (RFC 5997).
            label = st.config.label
            if label not in self._probes:
                task = asyncio.get_running_loop().create_task(self._probe(st, exc))
                self._probes[label] = task
                # Gone from the table however it ends, cancelled before its
                # first step included (then its own ``finally`` never ran).
                task.add_done_callback(functools.partial(self._drop_probe, label))
            return
        self._hold_off(st, exc)

    def _shows_life(self, st: _ServerState, now: float) -> bool:
        """Evidence that ``st`` serves: not held off, and a verified reply
        (an answered Status-Server included) within ``dead_time`` and since
        it was last found dead.  A server nobody has heard from -- a backup
        never tried, or one whose hold-off merely ran out -- shows none."""
        return (
            not self._held_off(st, now)
            and st.last_reply > st.found_dead
            and now - st.last_reply <= self.dead_time
        )

    def _hold_off(self, st: _ServerState, exc: RadiusTimeout, why: str = "") -> None:
        now = self._clock()
        if not self._held_off(st, now):
            log.warning(
                "RADIUS server %s marked dead for %g s: %s%s",
                st.config.label,
                self.dead_time,
                exc,
                why,
            )
        st.dead = True
        st.dead_until = now + self.dead_time
        st.found_dead = now

    async def _ask(self, st: _ServerState) -> bool:
        """One Status-Server to ``st``, ``timeout`` seconds for its verified
        Access-Accept (RFC 5997 §4: not retransmitted): answered?"""
        st.stats.probes += 1
        try:
            channel, ident = await self._acquire(st)
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            try:
                request = encode_status_server(ident, st.config.secret, dictionary=st.dictionary)
                channel.pending[ident] = _Pending(future, request)
                channel.send(request.raw)
                done, _ = await asyncio.wait((future,), timeout=self.timeout)
                return bool(done) and future.exception() is None
            finally:
                if not future.done():
                    future.cancel()
                channel.release(ident)
                st.wake_one()
        except (OSError, LocalProtocolError, RadiusError):
            return False  # the socket or the packet failed: no evidence of life

    async def _another_serves(self, st: _ServerState) -> str | None:
        """The label of another server that shows life (``_shows_life``), or
        answers a Status-Server now; None if none does.  Each one not held
        off and not heard from lately is asked at once (in parallel)."""
        now = self._clock()
        others = [o for o in self._servers if o is not st and not self._held_off(o, now)]
        for o in others:
            if self._shows_life(o, now):
                return o.config.label
        if not others:
            return None
        answers = await asyncio.gather(*(self._ask(o) for o in others))
        for o, answered in zip(others, answers, strict=True):
            if answered:
                o.stats.probes_answered += 1
                return o.config.label
        return None

    async def _probe(self, st: _ServerState, exc: RadiusTimeout) -> None:
        """Ask ``st`` (one Status-Server); hold it off if it does not answer,
        or if it answers while another server shows life."""
        probe_sent = self._clock()
        answered = await self._ask(st)
        if self._closed:
            return
        # A verified reply to any other request since the probe left is
        # evidence of life too: a server that does not implement
        # Status-Server (RFC 5997 makes it optional), or a lost probe, no
        # longer held off a server that kept answering (found in review).
        answered = answered or st.last_reply >= probe_sent
        if not answered:
            self._hold_off(st, exc)
            return
        st.stats.probes_answered += 1
        # A server whose requests go unanswered while it answers
        # Status-Server (a stuck back end) would keep every conversation
        # waiting out its timeouts before failing over: held off, but only
        # in favour of another server with evidence of life.  A client
        # cannot tell a dead next hop from a stalled upstream behind it
        # (RFC 5997 §1, §4): an answering server is not held off for one
        # stalled conversation when the alternative is a server nobody has
        # heard from.  Before the twenty-ninth session a never-tried backup
        # counted as "in service": one MN of a slow realm had an answering
        # primary held off, the request failed over to a dead backup, and
        # every MN got 503 for dead_time (found in review).
        other = await self._another_serves(st)
        if self._closed:
            return
        if other is not None:
            self._hold_off(st, exc, f" (it answers Status-Server, but {other} serves)")
            return
        log.info(
            "RADIUS server %s: a request went unanswered (%s), but it answers "
            "Status-Server and no other server is known to serve: not held off",
            st.config.label,
            exc,
        )

    def _drop_probe(self, label: str, task: asyncio.Task[None]) -> None:
        if self._probes.get(label) is task:
            del self._probes[label]

    async def probes_done(self) -> None:
        """Until the Status-Server probes under way have ended (tests, shutdown)."""
        while self._probes:
            await asyncio.gather(*list(self._probes.values()), return_exceptions=True)
            await asyncio.sleep(0)  # their done callbacks

    def _mark_alive(self, st: _ServerState) -> None:
        if st.dead:
            st.dead = False
            log.info("RADIUS server %s answers again", st.config.label)

    async def aclose(self) -> None:
        """Close every socket; outstanding requests end as unanswered."""
        self._closed = True
        for task in list(self._probes.values()):
            task.cancel()
        self._probes.clear()
        for st in self._servers:
            for channel in st.channels:
                with contextlib.suppress(Exception):
                    channel.close()
            st.channels.clear()
            for w in st.waiters:
                if not w.done():
                    # Woken, not cancelled: the waiter's _acquire sees the
                    # client closed and raises RadiusError -- an unanswered
                    # request, as the docstring says.  Cancelled, the
                    # caller's task ended cancelled though nobody cancelled it.
                    w.set_result(None)
