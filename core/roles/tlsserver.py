"""Server-side TLS connections that slow and idle clients cannot starve.

Issue 6 item 2.  asyncio's own TLS layer (``create_server(ssl=...)``) keeps a
256 KiB receive buffer per connection from the moment TCP is accepted and
bounds only the gap between octets, so a few hundred idle or trickling
clients hold the listener and a few hundred MB.  Here each connection is a
plain-TCP :class:`asyncio.BufferedProtocol` that runs TLS itself with an
``ssl.SSLObject`` over two ``ssl.MemoryBIO`` (the same ``SSLContext`` from
``core/tls.py``, so the PROFILE §1 policy is unchanged):

* memory: nothing TLS exists before the first octet (the ``SSLObject`` is
  made then); every connection of a listener reads into one shared 16 KiB
  buffer, so what a held connection costs is OpenSSL's own state.
* deadlines, not idle timers (PROFILE §1 "timeouts"): the handshake must end
  within ``handshake_timeout`` of the accept; then, while waiting for a
  request, its first octet must come within ``idle_timeout``; from that first
  octet the whole request must arrive within ``request_timeout`` -- octets
  trickled in do not extend it.  While the server works on a complete request
  no deadline runs, and reading is paused (the exchanges are lockstep) or,
  if the handler asks, goes on so it sees a peer that breaks the lockstep.
* one cap (``max_connections``) counts every connection, pending handshakes
  included; at the cap the connection that has waited longest without
  completing a request is evicted for the newcomer, an authenticated one
  (``protect_authenticated``) only when nothing else is left
  (:mod:`mipsec.core.conntable`);
  connections being worked for are never evicted.
* ``max_in_progress`` bounds the requests worked on at once:
  :meth:`TlsConnection.begin_work` says False beyond it and the caller answers
  busy (PROFILE §6: 503 with ``retry-after``) instead of queueing.
* evictions, refusals, deadlines and failed handshakes are counted
  (``TlsListener.stats``) and logged as one summary line per second at most,
  so a flood cannot flood the log.

The upper layer is a :class:`TlsHandler`, made by a factory once the
handshake is done.  It gets the decrypted octets and tells the connection
where the exchange stands:

=====================  ====================================================
``write(data)``        send octets (a response)
``await_request()``    the response is out; wait for the next request
``begin_work()``       the request is complete; the server works on it
``close(data=b"")``    send ``data``, close_notify, then close TCP
``abort()``            close TCP now, nothing more sent
=====================  ====================================================

Until the handler calls :meth:`~TlsConnection.await_request` or
:meth:`~TlsConnection.begin_work`, octets received belong to the request in
progress and its deadline keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import resource
import ssl
import typing
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mipsec.core.conntable import ConnectionTable
from mipsec.core.errors import LocalProtocolError
from mipsec.core.pacing import in_paced_batches
from mipsec.core.ratelimit import SourceBuckets, bucket_key, peer_ip
from mipsec.core.tls import set_nodelay

__all__ = [
    "ADDRESS_REFUSED",
    "CLOSED",
    "EVICTED",
    "EXCHANGE_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "PEER_CLOSED",
    "PEER_RESET",
    "RATE_LIMITED",
    "REFUSED",
    "REQUEST_TIMEOUT",
    "STOPPED",
    "TLS_ERROR",
    "HandlerFactory",
    "Limits",
    "TlsConnection",
    "TlsHandler",
    "TlsListener",
]

log = logging.getLogger("mipsec.tls")

# One TLS record (2^14 octets of plaintext) plus its overhead fits; larger
# reads would only let one connection's MemoryBIO grow further.
READ_SIZE = 16 * 1024 + 512
BACKLOG = 1024  # a burst of real MNs must not wait for SYN retransmits
# Connections over a lowered cap aborted per batch (core/pacing.py): ~8 ms.
EVICT_BATCH = 500
SUMMARY_INTERVAL = 1.0  # seconds between two summary log lines, at least

# Why a connection ended: TlsHandler.connection_lost(reason).
CLOSED = "closed"  # the handler closed it
PEER_CLOSED = "peer-closed"  # close_notify or TCP FIN from the peer
PEER_RESET = "peer-reset"  # TCP error (reset, ...)
EVICTED = "evicted"  # made room for a newcomer at the cap
REFUSED = "refused"  # at the cap with nothing evictable, or the handler factory refused
ADDRESS_REFUSED = "address-refused"  # from outside Limits.allowed_peers: closed at accept
RATE_LIMITED = "rate-limited"  # its source opened too many connections lately (per_source_rate)
HANDSHAKE_TIMEOUT = "handshake-timeout"
IDLE_TIMEOUT = "idle-timeout"
REQUEST_TIMEOUT = "request-timeout"
EXCHANGE_TIMEOUT = "exchange-timeout"  # Limits.exchange_timeout after the accept
TLS_ERROR = "tls-error"
STOPPED = "stopped"  # the listener was closed

# Connection states.  Deadline that runs in each: HANDSHAKE handshake_timeout
# from the accept, IDLE idle_timeout, REQUEST request_timeout from the first
# octet, WORKING none, CLOSING a grace to flush (then abort).
_HANDSHAKE, _IDLE, _REQUEST, _WORKING, _CLOSING, _CLOSED = range(6)
_STATE_REASON = {_HANDSHAKE: HANDSHAKE_TIMEOUT, _IDLE: IDLE_TIMEOUT, _REQUEST: REQUEST_TIMEOUT}


@dataclass(frozen=True)
class Limits:
    """Deadlines (seconds) and caps of one listener."""

    handshake_timeout: float
    request_timeout: float  # first octet of a request -> the complete request
    idle_timeout: float  # ready for a request -> its first octet
    max_connections: int  # every connection held, pending handshakes included
    max_in_progress: int | None = None  # requests worked on at once (None: no cap)
    close_timeout: float = 5.0  # a closing connection that does not drain is aborted
    # Mutual TLS: a connection whose handler factory accepted its (verified)
    # client certificate is evicted only when no unauthenticated one is left
    # (core/conntable.py), so a connect flood cannot evict a proven peer.
    protect_authenticated: bool = False
    # Source networks a connection may come from (None: any).  Checked as
    # the connection is accepted, before any TLS state exists and before it
    # takes a slot: a ClientHello from elsewhere costs an accept and a close
    # (150-230 µs of CPU in bench/hello_flood.py), not a handshake's key
    # exchange and signature (740-870 µs), and can never evict a proven client.
    allowed_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    # New connections per second per source (core/ratelimit.py), at most
    # per_source_burst at once; beyond it closed as accepted.  None: no limit.
    per_source_rate: float | None = None
    per_source_burst: int = 20
    # The whole connection, from the accept: every later deadline (handshake,
    # idle, request) ends by then, so a peer that keeps completing requests
    # slowly -- 255 one-octet EAP fragments, each within request_timeout --
    # holds its slot this long at most.  Work in progress runs on its own
    # deadline (AAA, provisioning); once it answers, the connection closes if
    # this one has passed.  None: no bound.
    exchange_timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "request_timeout", "idle_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"{name} must be positive")
        if self.exchange_timeout is not None and not self.exchange_timeout > 0:
            raise LocalProtocolError("exchange_timeout must be positive")


class TlsHandler(typing.Protocol):
    """The upper layer of one connection (e.g. the HAC's MHAuth session).

    Each call is made from the event loop, never re-entered.
    """

    def data_received(self, data: bytes) -> None:
        """Decrypted octets from the peer."""

    def eof_received(self) -> None:
        """The peer closed its side (close_notify or TCP FIN without one: a
        framing decoder tells whether that cut a message).  The connection is
        closed after this call unless the handler began work."""

    def connection_lost(self, reason: str) -> None:
        """The connection is gone; ``reason`` is one of the module's reason
        constants (:data:`CLOSED`, :data:`REQUEST_TIMEOUT`, ...)."""


# Called once the handshake is done; None refuses the peer (closed at once).
HandlerFactory = Callable[["TlsConnection"], TlsHandler | None]


class TlsConnection(asyncio.BufferedProtocol):
    """One accepted TCP connection running server-side TLS over memory BIOs."""

    __slots__ = (
        "_deadline",
        "_eof",
        "_expires",
        "_handler",
        "_in",
        "_in_pump",
        "_lst",
        "_out",
        "_reason",
        "_sslobj",
        "_state",
        "_timer",
        "_transport",
        "_watch",
    )

    def __init__(self, listener: TlsListener) -> None:
        self._lst = listener
        self._transport: asyncio.Transport | None = None
        self._sslobj: ssl.SSLObject | None = None
        self._in: ssl.MemoryBIO | None = None
        self._out: ssl.MemoryBIO | None = None
        self._handler: TlsHandler | None = None
        self._state = _HANDSHAKE
        self._deadline: float | None = None
        self._expires: float | None = None  # Limits.exchange_timeout after the accept
        self._timer: asyncio.TimerHandle | None = None
        self._reason: str | None = None
        self._eof = False  # the peer's end of stream was handed to the handler
        self._in_pump = False
        self._watch = False  # working, and still reading (begin_work(watch_peer=True))

    # ------------------------------------------------------------ for handlers

    @property
    def peername(self) -> Any:
        return self._transport.get_extra_info("peername") if self._transport else None

    @property
    def peer(self) -> str:
        """``host:port`` or ``[v6]:port`` of the peer, for log lines."""
        addr = self.peername
        if not addr:
            return "?"
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._sslobj

    def peercert_der(self) -> bytes | None:
        """The peer's certificate (DER) once the handshake is done, else None."""
        if self._sslobj is None or self._state == _HANDSHAKE:
            return None
        return self._sslobj.getpeercert(binary_form=True)

    @property
    def closing(self) -> bool:
        return self._state >= _CLOSING

    @property
    def working(self) -> bool:
        return self._state == _WORKING

    def write(self, data: bytes) -> None:
        """Send ``data`` (ignored once the connection is closing)."""
        if self._state >= _CLOSING or self._sslobj is None or self._state == _HANDSHAKE:
            return
        self._sslobj.write(data)
        self._flush()

    def await_request(self) -> None:
        """The response is out: wait for the next request (``idle_timeout``).

        Ends the work begun with :meth:`begin_work` (reading resumes) and puts
        the connection at the back of the eviction queue.
        """
        state = self._state
        if state >= _CLOSING or state == _HANDSHAKE:
            return
        if self._eof:
            self.close()  # the peer has closed its side: no request can follow
            return
        paused = state == _WORKING and not self._watch
        self._watch = False
        self._lst.table.waiting(self)
        assert self._transport is not None and self._in is not None
        if paused:
            self._transport.resume_reading()
        lst = self._lst
        now = lst.loop.time()
        if self._in.pending or (self._sslobj is not None and self._sslobj.pending()):
            # The next request has begun already (it arrived while we worked).
            self._state = _REQUEST
            self._set_deadline(now + lst.limits.request_timeout)
        else:
            self._state = _IDLE
            self._set_deadline(now + lst.limits.idle_timeout)
        if paused and not self._in_pump:
            lst.loop.call_soon(self._pump)  # octets or EOF held back while working

    def begin_work(self, *, watch_peer: bool = False) -> bool:
        """The request is complete and the server works on it.

        No deadline runs and the connection cannot be evicted.  Reading is
        paused (lockstep: the peer must wait for the response), unless
        ``watch_peer``: then octets and EOF the peer sends meanwhile still
        reach the handler, which can void the work of a peer that broke the
        lockstep or went away.  False when ``max_in_progress`` requests are
        worked on already: answer busy (PROFILE §6: 503 with ``retry-after``)
        and close.
        """
        state = self._state
        if state == _WORKING:
            return True
        if state not in (_IDLE, _REQUEST):
            return False
        if not self._lst.table.begin_work(self):
            self._lst._count("busy")
            return False
        self._state = _WORKING
        self._deadline = None
        self._watch = watch_peer
        if not watch_peer:
            assert self._transport is not None
            self._transport.pause_reading()
        return True

    def close(self, data: bytes = b"") -> None:
        """Send ``data``, then close_notify, then close TCP (PROFILE §1 "closing").

        The three leave in one write, so a final response and the close_notify
        after it reach the peer in one TCP segment.
        """
        if self._state >= _CLOSING:
            return
        if self._reason is None:
            self._reason = CLOSED
        out = b""
        if self._sslobj is not None and self._state != _HANDSHAKE:
            if data:
                self._sslobj.write(data)
            with contextlib.suppress(ssl.SSLError, ValueError):
                # Writes close_notify, then wants the peer's: SSLWantReadError.
                self._sslobj.unwrap()
            assert self._out is not None
            out = self._out.read()
        self._state = _CLOSING
        lst = self._lst
        lst.table.closing(self)
        self._set_deadline(lst.loop.time() + lst.limits.close_timeout)
        assert self._transport is not None
        if out:
            self._transport.write(out)
        self._transport.close()

    def evict_later(self) -> None:
        """Over a lowered cap: out of the table and deaf from now on (nothing
        more is read, no timer runs), its TCP aborted by the listener's
        paced closing (``TlsListener.apply_limits``)."""
        self._deafen(EVICTED)

    def abort(self, reason: str = CLOSED) -> None:
        """Close TCP now; nothing more is sent."""
        if self._deafen(reason) and self._transport is not None:
            self._transport.abort()

    def _deafen(self, reason: str) -> bool:
        """Closed for this listener (``reason`` unless one is set already):
        out of the table, no timer.  False if it was closed already."""
        if self._state == _CLOSED:
            return False
        if self._reason is None:
            self._reason = reason
        self._state = _CLOSED
        self._lst.table.remove(self)
        self._cancel_timer()
        return True

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._lst._accepted(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._lst._rview

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state >= _CLOSING:
            return  # nothing more is read from a closing connection
        if self._in is None:
            # Created on the first octet: an idle TCP connection costs no TLS state.
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._sslobj = self._lst.ssl_context.wrap_bio(self._in, self._out, server_side=True)
        self._in.write(self._lst._rview[:nbytes])
        if state == _IDLE:
            # The first octet of a request: its deadline starts now and is not
            # pushed back by the octets that follow.
            self._state = _REQUEST
            self._set_deadline(self._lst.loop.time() + self._lst.limits.request_timeout)
        if state != _WORKING or self._watch:
            self._pump()

    def eof_received(self) -> bool:
        if self._state == _CLOSED:
            return False  # evicted, its abort still to come: let it go now
        if self._state == _HANDSHAKE or self._in is None:
            self.abort(PEER_CLOSED)
            return False
        self._in.write_eof()
        if self._reading():
            self._pump()
        # Keep the transport: we close it, after any last response.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._reason is None:
            self._reason = PEER_RESET if exc is not None else PEER_CLOSED
        self._state = _CLOSED
        self._cancel_timer()
        self._lst._lost(self)
        handler, self._handler = self._handler, None
        # Drop the TLS state now rather than when the transport goes.
        self._sslobj = self._in = self._out = None
        if handler is not None:
            self._call(handler.connection_lost, self._reason)

    # ------------------------------------------------------------ internals

    def _pump(self) -> None:
        """Advance the handshake, then hand decrypted octets to the handler."""
        if self._in_pump or self._sslobj is None:
            return
        self._in_pump = True
        try:
            if self._state == _HANDSHAKE and not self._handshake():
                return
            sslobj = self._sslobj
            while self._reading() and not self._eof:
                try:
                    data = sslobj.read(READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLError as exc:
                    assert self._in is not None
                    if isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError) or self._in.eof:
                        self._peer_eof()
                    else:
                        self._tls_error(exc)
                    break
                if not data:
                    self._peer_eof()
                    break
                assert self._handler is not None
                self._call(self._handler.data_received, data)
            if self._state < _CLOSING:
                self._flush()  # e.g. a TLS 1.3 KeyUpdate answer
        finally:
            self._in_pump = False

    def _reading(self) -> bool:
        """Whether received octets go to the handler now."""
        state = self._state
        return state in (_IDLE, _REQUEST) or (state == _WORKING and self._watch)

    def _handshake(self) -> bool:
        assert self._sslobj is not None and self._in is not None
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ValueError) as exc:
            self._flush()  # the alert, if OpenSSL wrote one
            self._tls_error(exc)
            return False
        self._flush()
        lst = self._lst
        now = lst.loop.time()
        if self._in.pending or self._sslobj.pending():
            self._state = _REQUEST  # the request came with the client's Finished
            self._set_deadline(now + lst.limits.request_timeout)
        else:
            self._state = _IDLE
            self._set_deadline(now + lst.limits.idle_timeout)
        handler = self._call(lst.factory, self)
        if handler is None:
            if self._state < _CLOSING:
                self._reason = REFUSED
                self.close()
            return False
        self._handler = handler
        if lst.limits.protect_authenticated and self._state < _CLOSING:
            lst.table.authenticated(self)
        return self._state < _CLOSING

    def _peer_eof(self) -> None:
        self._eof = True
        if self._reason is None:
            self._reason = PEER_CLOSED
        assert self._handler is not None
        self._call(self._handler.eof_received)
        if self._state in (_IDLE, _REQUEST):
            self.close()

    def _tls_error(self, exc: Exception) -> None:
        self._lst._count(TLS_ERROR)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s: TLS failed: %s", self._lst.name, self.peer, exc)
        self._reason = TLS_ERROR
        # An alert may be in flight (flushed above): close TCP after it.
        self._state = _CLOSING
        self._lst.table.closing(self)
        self._set_deadline(self._lst.loop.time() + self._lst.limits.close_timeout)
        assert self._transport is not None
        self._transport.close()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run upper-layer code; a bug there ends this connection, not the listener."""
        try:
            return fn(*args)
        except Exception as exc:
            log.error(
                "%s: %s: connection handler failed: %s",
                self._lst.name,
                self.peer,
                exc.__class__.__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            self.abort(CLOSED)
            return None

    def _flush(self) -> None:
        out = self._out
        if out is not None and out.pending:
            assert self._transport is not None
            self._transport.write(out.read())

    # Deadlines: one timer per connection, re-armed lazily.  A deadline moved
    # later keeps the armed timer, which re-arms itself when it fires early;
    # a fast exchange thus costs one call_at and one cancel in all.
    def _set_deadline(self, when: float) -> None:
        expires = self._expires
        if expires is not None and when > expires and self._state < _CLOSING:
            when = expires  # a closing connection keeps its grace to flush
        self._deadline = when
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._lst.loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        state = self._state
        if deadline is None or state == _CLOSED:
            return
        loop = self._lst.loop
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._on_timer)
            return
        if state == _CLOSING:
            self.abort()  # did not drain in time
            return
        reason = EXCHANGE_TIMEOUT if deadline == self._expires else _STATE_REASON[state]
        self._lst._count(reason)
        self._reason = reason
        if state == _HANDSHAKE:
            self.abort(reason)
        else:
            self.close()  # close_notify, no answer


class TlsListener:
    """TLS listeners on one or more addresses sharing one cap and one limit set.

    ``factory(conn)`` is called once a connection's handshake is done and
    returns its :class:`TlsHandler` (or None to refuse it).
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        factory: HandlerFactory,
        limits: Limits,
        *,
        name: str = "tls",
    ) -> None:
        self.ssl_context = ssl_context
        self.factory = factory
        self.limits = limits
        self.name = name
        self.table: ConnectionTable[TlsConnection] = ConnectionTable(
            limits.max_connections, limits.max_in_progress
        )
        self.addresses: list[tuple[str, int]] = []
        self.stats: Counter[str] = Counter()
        self._servers: list[asyncio.Server] = []
        # Shared by every connection: each read is copied into that
        # connection's MemoryBIO before the next read can happen.
        self._rview = memoryview(bytearray(READ_SIZE))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._summary: Counter[str] = Counter()
        self._summary_handle: asyncio.TimerHandle | None = None
        self._summary_last = float("-inf")
        self._drained: asyncio.Future[None] | None = None
        self._buckets = _source_buckets(limits)
        # Connections over a lowered cap, out of the table, their TCP to abort.
        self._evicting: deque[TlsConnection] = deque()
        self._evict_task: asyncio.Task[None] | None = None
        self._fds_given_back = False  # this listener's cap, out of _fds_reserved at aclose

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "TlsListener.listen() not called"
        return self._loop

    def apply_limits(self, limits: Limits) -> int:
        """A reload's limits, in force from now on: timeouts for new
        connections and for open ones from their next step (a step under way
        keeps its deadline); a changed per-source rate starts every source
        with a full bucket; a raised cap makes room under the open-file
        limit; a lowered one closes the connections over it at once, those a
        newcomer would evict first (unauthenticated, longest waiting; never
        one whose request is being worked on).  Returns how many closed."""
        old, self.limits = self.limits, limits
        if self._loop is not None:
            # Up and down: a lowered cap gives its share back (it only ever
            # grew, and reloads up and down drove the figure past the hard
            # limit: a false WARNING, found in review).
            _reserve_fds(limits.max_connections - old.max_connections)
        self.table.max_in_progress = limits.max_in_progress
        if (limits.per_source_rate, limits.per_source_burst) != (
            old.per_source_rate,
            old.per_source_burst,
        ):
            self._buckets = _source_buckets(limits)
        # Those closing already finish their close (``_accepted``): a final
        # answer in a write buffer is not thrown away (found in review).
        victims = [v for v in self.table.resize(limits.max_connections) if not v.closing]
        for victim in victims:
            self._count(EVICTED)  # in the listener's summary line, as any eviction
            victim.evict_later()
        # The cap is in force at once (out of the table, deaf), but their
        # TCP goes in paced batches: aborting 14,900 in one call stalled the
        # loop for ~230 ms, every handshake and request waiting behind it.
        self._evicting.extend(victims)
        if self._evicting and self._evict_task is None:
            self._evict_task = self.loop.create_task(self._close_evicted())
        return len(victims)

    async def _close_evicted(self) -> None:
        try:
            await in_paced_batches(lambda: self._abort_evicted(EVICT_BATCH), EVICT_BATCH)
        finally:
            self._evict_task = None

    def _abort_evicted(self, most: int) -> int:
        """Abort the TCP of up to ``most`` evicted connections; how many."""
        done = 0
        while self._evicting and done < most:
            transport = self._evicting.popleft()._transport
            if transport is not None:
                transport.abort()
            done += 1
        return done

    @property
    def connections(self) -> int:
        """Connections held now (handshakes, idle, in a request, worked for, closing)."""
        return len(self.table)

    async def listen(self, host: str, port: int, *, serve: bool = True) -> list[tuple[str, int]]:
        """Listen on ``host``/``port`` (0: ephemeral); returns the bound addresses.

        ``serve=False``: bound, but nobody is accepted until
        :meth:`start_serving` (a role that has more to set up first, which
        may still fail, serves no one before it can).  Raises ``OSError`` as
        ``loop.create_server`` does (address in use, ...).
        """
        if self._loop is None:  # one cap, however many addresses
            _reserve_fds(self.limits.max_connections)
        self._loop = asyncio.get_running_loop()
        server = await self._loop.create_server(
            lambda: TlsConnection(self),
            host=host,
            port=port,
            reuse_address=True,
            backlog=BACKLOG,
            start_serving=serve,
        )
        self._servers.append(server)
        bound = []
        for sock in server.sockets:
            addr = sock.getsockname()
            bound.append((addr[0], addr[1]))
        self.addresses.extend(bound)
        return bound

    async def start_serving(self) -> None:
        """Accept connections on every address bound with ``serve=False``."""
        for s in self._servers:
            await s.start_serving()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    def close(self) -> None:
        """Stop accepting; held connections stay (see :meth:`aclose`)."""
        for s in self._servers:
            s.close()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop accepting, close every connection (close_notify) and wait for
        them to go, aborting what is left after ``timeout``."""
        self.close()
        for conn in list(self.table):
            conn._reason = conn._reason or STOPPED
            conn.close()
        if len(self.table):
            self._drained = self.loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            self._drained = None
        for conn in list(self.table):
            conn.abort(STOPPED)
        if self._evict_task is not None:
            self._evict_task.cancel()
        self._abort_evicted(len(self._evicting))
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), timeout)
        self._servers.clear()
        if self._loop is not None and not self._fds_given_back:
            self._fds_given_back = True
            _reserve_fds(-self.limits.max_connections)
        self._flush_summary()

    # ------------------------------------------------------------ internals

    def _accepted(self, conn: TlsConnection) -> None:
        self.stats["accepted"] += 1
        allowed, buckets = self.limits.allowed_peers, self._buckets
        if allowed is not None or buckets is not None:
            addr = peer_ip(conn.peername)  # parsed once for both checks
            if allowed is not None and not _in_networks(addr, allowed):
                self._count(ADDRESS_REFUSED)
                conn.abort(ADDRESS_REFUSED)
                return
            if buckets is not None and addr is not None and not buckets.allow(bucket_key(addr)):
                self._count(RATE_LIMITED)
                conn.abort(RATE_LIMITED)
                return
        admitted, victims = self.table.admit(conn)
        for victim in victims:
            if victim.closing:
                # Closing already: out of the table, its close (and any final
                # answer still in its write buffer) left to finish, bounded
                # by its close timer -- not aborted, not counted as evicted.
                continue
            self._count(EVICTED)
            victim.abort(EVICTED)
        if not admitted:
            self._count(REFUSED)
            conn.abort(REFUSED)
            return
        assert conn._transport is not None
        sock = conn._transport.get_extra_info("socket")
        if sock is not None:
            set_nodelay(sock)  # lockstep small messages (DESIGN.md "Library traps")
        now = self.loop.time()
        if self.limits.exchange_timeout is not None:
            conn._expires = now + self.limits.exchange_timeout
        conn._set_deadline(now + self.limits.handshake_timeout)

    def _lost(self, conn: TlsConnection) -> None:
        self.table.remove(conn)
        if self._drained is not None and not len(self.table) and not self._drained.done():
            self._drained.set_result(None)

    def _count(self, what: str) -> None:
        """Count ``what`` and log a summary, one line per SUMMARY_INTERVAL at most."""
        self.stats[what] += 1
        self._summary[what] += 1
        if self._summary_handle is None:
            delay = max(0.0, self._summary_last + SUMMARY_INTERVAL - self.loop.time())
            self._summary_handle = self.loop.call_later(delay, self._flush_summary)

    def _flush_summary(self) -> None:
        if self._summary_handle is not None:
            self._summary_handle.cancel()
            self._summary_handle = None
        counts, self._summary = self._summary, Counter()
        if not counts:
            return
        now = self.loop.time()
        since = now - self._summary_last
        self._summary_last = now
        if counts.keys() & {EVICTED, REFUSED, ADDRESS_REFUSED, RATE_LIMITED}:
            level = logging.WARNING  # the cap is reached: the operator should know
        elif counts.keys() - {IDLE_TIMEOUT}:
            level = logging.INFO
        else:
            level = logging.DEBUG  # idle kept-alive connections closing is routine
        log.log(
            level,
            "%s: %s%s (%d/%d connections held)",
            self.name,
            ", ".join(f"{what} {n}" for what, n in sorted(counts.items())),
            f" in the last {since:.1f} s" if since < 3600 else "",
            len(self.table),
            self.limits.max_connections,
        )


def _source_buckets(limits: Limits) -> SourceBuckets | None:
    """The per-source token buckets ``limits`` ask for (None: no rate)."""
    rate = limits.per_source_rate
    return SourceBuckets(rate, limits.per_source_burst) if rate else None


def peer_allowed(
    peername: Any, allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    """Whether a socket's peer address lies in one of ``allowed`` (an IPv4
    peer on a dual-stack socket matched as IPv4; no address: not allowed)."""
    return _in_networks(peer_ip(peername), allowed)


def _in_networks(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> bool:
    return addr is not None and any(addr in net for net in allowed)


_fds_reserved = 0


def _reserve_fds(count: int) -> None:
    """Make room for ``count`` more sockets under RLIMIT_NOFILE if the hard limit allows
    (negative: a listener gives its share back, nothing else changes).

    An accept() that fails with EMFILE makes asyncio stop accepting for a
    second: every MN would wait.  The cap must be the limit, never the fds.
    """
    global _fds_reserved
    _fds_reserved = max(0, _fds_reserved + count)
    if count <= 0:
        return
    want = _fds_reserved + 256  # files, stores, outgoing connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    if soft < want:
        log.warning(
            "open-file limit %d is below the %d the connection caps need: "
            "lower max_connections or raise the limit (ulimit -n)",
            soft,
            want,
        )
