"""A TLS client connection on memory BIOs (``ssl.SSLObject``), not asyncio's SSL transport.

Both of mipsec's TLS clients send a few small lockstep messages per
connection: the MN's MHAuth exchange with the HAC, and the HAC's provisioning
requests to an HA.  asyncio's SSL layer (an SSL protocol, a transport on top
of it, a stream reader and writer on top of that, a buffer copy at each of
them) cost more CPU per message than mipsec's own encoding and decoding
(issue 9: "the MN client trimmed", "the HAC's provisioning client").  Here
received octets go straight into the incoming BIO, TLS records come out of
the outgoing one into the socket transport, and plaintext collects for the
one reader waiting on it -- the same shape as the server side,
core/roles/tlsserver.py.

The caller bounds every wait (``asyncio.timeout``): :meth:`TlsClient.connect`
returns once the handshake is done, :meth:`TlsClient.read` once plaintext,
EOF or an error is there.  Errors are those asyncio's streams would raise:
``OSError`` for the socket, ``ssl.SSLError`` (an ``OSError``) for TLS,
including ``ssl.SSLCertVerificationError`` from the stdlib chain and name
checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

from mipsec.core.tls import set_nodelay

__all__ = ["READ_MAX", "TlsClient"]

# Plaintext held for a reader at most (one maximal MHAuth container, PROFILE
# §2, with room): a lockstep peer sends one response at a time, and a peer
# that floods gets no further reads until the reader has taken what is there.
READ_MAX = 65540 + 16384


class TlsClient(asyncio.Protocol):
    """One TLS client connection; build it with :meth:`connect`."""

    def __init__(self, ctx: ssl.SSLContext, server_hostname: str | None) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self.transport: asyncio.Transport | None = None
        self.handshaken = False
        self.eof = False  # the peer closed (close_notify or TCP), or we did
        self.error: BaseException | None = None
        self._plain = bytearray()
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        # Called (instead of waking a reader) whenever plaintext, EOF or an
        # error arrives: a caller that takes what is there with ``take``
        # rather than awaiting ``read`` (the pipelined provisioning client).
        self.on_event: Callable[[], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(
        cls, host: str, port: int, ctx: ssl.SSLContext, server_hostname: str | None
    ) -> TlsClient:
        """TCP connect (TCP_NODELAY set) and TLS handshake; raises ``OSError``
        (``ssl.SSLError`` included) or ``ConnectionResetError``."""
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(ctx, server_hostname), host, port)
        try:
            while not conn.handshaken:
                if conn.error is not None:
                    raise conn.error
                if conn.eof:
                    raise ConnectionResetError("closed by the peer during the TLS handshake")
                await conn._wait()
        except BaseException:
            conn.close()
            raise
        sock = conn.get_extra_info("socket")
        if sock is not None:
            set_nodelay(sock)
        return conn

    # ------------------------------------------------------------ the caller's side

    @property
    def open(self) -> bool:
        """Still usable: handshake done, no EOF, no error, transport open."""
        t = self.transport
        return (
            self.handshaken
            and not self.eof
            and self.error is None
            and t is not None
            and not t.is_closing()
        )

    @property
    def peername(self) -> Any:
        return self.get_extra_info("peername")

    def get_extra_info(self, name: str) -> Any:
        return None if self.transport is None else self.transport.get_extra_info(name)

    def peercert_der(self) -> bytes | None:
        return self.tls.getpeercert(binary_form=True)

    def version(self) -> str | None:
        return self.tls.version()

    def write(self, data: bytes) -> None:
        """Send ``data`` (no renegotiation, PROFILE §1: a write never needs a read)."""
        if self.error is not None:
            raise self.error
        if self.eof or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the TLS connection is closed")
        self.tls.write(data)
        self._flush()

    @property
    def buffered(self) -> bool:
        """Plaintext is waiting to be taken."""
        return bool(self._plain)

    def take(self) -> bytes:
        """The plaintext received so far, without waiting (``b""``: none yet;
        then see ``eof`` and ``error``)."""
        if not self._plain:
            return b""
        data = bytes(self._plain)
        self._plain.clear()
        if self._in.pending:
            self._pump()  # records held back while the buffer was full
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        """The plaintext received so far (waiting for some); ``b""`` at EOF."""
        while True:
            if self._plain:
                return self.take()
            if self.error is not None:
                raise self.error
            if self.eof:
                return b""
            await self._wait()

    def close(self) -> None:
        """close_notify (the peer's answer is not awaited), then TCP close."""
        t = self.transport
        if t is None or t.is_closing():
            self.eof = True
            return
        if self.handshaken and self.error is None:
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()
            self._flush()
        self.eof = True
        t.close()

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._pump()  # the ClientHello

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        self._pump()
        if self._in.pending > READ_MAX and not self._paused and self.transport is not None:
            # A reader that does not keep up (or a flooding peer): stop reading
            # until it takes the plaintext, so what is held stays bounded.
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._in.write_eof()
        self._pump()
        self.eof = True
        self._wake()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    # ------------------------------------------------------------ internals

    def _pump(self) -> None:
        try:
            if not self.handshaken:
                try:
                    self.tls.do_handshake()
                except ssl.SSLWantReadError:
                    self._flush()
                    return
                self.handshaken = True
            while len(self._plain) < READ_MAX:
                try:
                    chunk = self.tls.read(16384)  # one TLS record at most
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:  # close_notify
                    self.eof = True
                    break
                if not chunk:
                    self.eof = True
                    break
                self._plain += chunk
        except (ssl.SSLError, OSError) as exc:
            # Certificate refused, an alert, garbage: the waiting caller raises it.
            self.error = exc
            self._flush()  # our alert, if any
            if self.transport is not None:
                self.transport.close()
        else:
            self._flush()
        self._wake()

    def _flush(self) -> None:
        data = self._out.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        elif self.on_event is not None and self.handshaken:
            self.on_event()
