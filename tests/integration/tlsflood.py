"""Misbehaving TLS clients for the connection-starvation tests (issue 6 item 2).

Each client runs TLS itself over ``ssl.MemoryBIO`` on a raw asyncio stream,
so a test controls every octet that goes out: a ClientHello trickled one
octet at a time, a request record trickled likewise, or nothing at all.
Stdlib only; shares no code with mipsec.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time


def client_context(
    ca: str, cert: str | None = None, key: str | None = None, *, tls12: bool = False
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (/proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class RawTls:
    """One client connection whose TLS records the test writes octet by octet."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed_at: float | None = None  # monotonic time the server's close was seen
        self.sent = 0  # octets written
        self.tls: ssl.SSLObject | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawTls:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    def start_tls(self, ctx: ssl.SSLContext, server_name: str) -> bytes:
        """Begin the handshake; the ClientHello octets (not yet sent)."""
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=server_name)
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self._out.read()

    async def handshake(self, ctx: ssl.SSLContext, server_name: str, timeout: float = 30) -> None:
        self.writer.write(self.start_tls(ctx, server_name))
        assert self.tls is not None
        async with asyncio.timeout(timeout):
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    out = self._out.read()
                    if out:
                        self.writer.write(out)
                    data = await self.reader.read(65536)
                    if not data:
                        raise ConnectionResetError("closed during the handshake") from None
                    self._in.write(data)
        out = self._out.read()
        if out:
            self.writer.write(out)

    def record(self, data: bytes) -> bytes:
        """The TLS record(s) carrying ``data`` (not yet sent)."""
        assert self.tls is not None
        self.tls.write(data)
        return self._out.read()

    async def send(self, octets: bytes) -> None:
        self.writer.write(octets)
        self.sent += len(octets)
        await self.writer.drain()

    def recv_plain(self, data: bytes) -> bytes:
        """Decrypt ``data`` read from the server (empty at close_notify)."""
        assert self.tls is not None
        self._in.write(data)
        out = b""
        with contextlib.suppress(ssl.SSLWantReadError):
            while chunk := self.tls.read(65536):
                out += chunk
        return out

    async def trickle(self, octets: bytes, interval: float) -> None:
        """Send ``octets`` one at a time, ``interval`` apart, until the server closes."""
        for i in range(len(octets)):
            if self.writer.is_closing() or self.reader.at_eof():
                return
            try:
                await self.send(octets[i : i + 1])
            except (ConnectionError, OSError):
                return
            await asyncio.sleep(interval)

    async def wait_closed_by_server(self, timeout: float) -> bool:
        """True once the server closed (EOF or reset), False after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            pass
        self.closed_at = time.monotonic()
        return True

    def close(self) -> None:
        self.writer.transport.abort()
