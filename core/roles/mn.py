"""The MN's bootstrap client: a thin asyncio shell around ``MnExchange``.

It opens TLS to the HAC, checks the HAC certificate by hand after the
handshake (PROFILE §1: SAN only, no wildcard, no CN, IP SAN for an IP
connection), derives the channel binding and runs one MHAuth exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pluggy

from mipsec.core import pluginmanager
from mipsec.core.authmethod import PeerMethodContext, PeerMethodFactory
from mipsec.core.config import MNConfig
from mipsec.core.errors import CertificateError, ConfigError
from mipsec.core.hookspecs import PluginContext
from mipsec.core.issuer import utcnow
from mipsec.core.mn_exchange import BootstrapResult, Finished, MnExchange, SendRequest
from mipsec.core.mn_registration import Failed, MnRegistration, Rebootstrap, Registered, Transmit
from mipsec.core.model import IssuedSA
from mipsec.core.tls import check_hac_certificate, mn_cb_octets, mn_client_context, set_nodelay

log = logging.getLogger("mipsec.mn")


def mn_secret(cfg: MNConfig, config_file: str = "<memory>") -> bytes | None:
    if cfg.mn.psk_hex is not None:
        return bytes.fromhex(cfg.mn.psk_hex)
    if cfg.mn.psk_file is not None:
        try:
            text = Path(cfg.mn.psk_file).read_text().strip()
            return bytes.fromhex(text)
        except (OSError, ValueError) as exc:
            raise ConfigError(config_file, "mn.psk_file", f"unreadable hex PSK: {exc}") from None
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def peer_factory(
    cfg: MNConfig, pm: pluggy.PluginManager, config_file: str = "<memory>"
) -> PeerMethodFactory:
    """Build the configured method's peer factory once (options validated at start).

    The method's options are the MN's table named after it (``[eap]`` for
    ``eap``; ``psk`` takes none): a wrong option is a ConfigError naming
    the file and the key.
    """
    methods = pluginmanager.registry(pm, "mipsec_auth_methods")
    method = methods.get(cfg.mn.method)
    if method is None:
        known = ", ".join(sorted(methods)) or "none"
        raise ConfigError(
            config_file, "mn.method", f"no plugin provides {cfg.mn.method!r} (known: {known})"
        )
    options = cfg.eap if cfg.mn.method == "eap" else {}
    base = Path(config_file).resolve().parent if config_file != "<memory>" else Path.cwd()
    ctx = PluginContext(role="mn", base_dir=base, config_file=config_file, extra={"pm": pm})
    key = "eap" if cfg.mn.method == "eap" else "mn.method"
    try:
        factory = method.peer(options, ctx)
    except ValueError as exc:
        raise ConfigError(config_file, key, str(exc)) from None
    if factory is None:
        raise ConfigError(config_file, "mn.method", f"{cfg.mn.method!r} has no mobile-node side")
    return cast(PeerMethodFactory, factory)


def hac_identity(cfg: MNConfig) -> tuple[str, bool]:
    """(the name the HAC certificate must carry, whether it is an IP address).

    PROFILE §1: by name, a dNSName equals ``server_name`` -- or, when none is
    configured and ``host`` is a DNS name, ``host`` itself; by address, an
    iPAddress SAN equals the address.
    """
    name = cfg.hac.server_name if cfg.hac.server_name is not None else cfg.hac.host
    return name, _is_ip(name)


async def bootstrap(
    cfg: MNConfig,
    *,
    pm: pluggy.PluginManager | None = None,
    config_file: str = "<memory>",
    factory: PeerMethodFactory | None = None,
) -> BootstrapResult:
    """Run one bootstrap with the HAC; never raises for network or peer faults."""
    if factory is None:
        pm = pm or pluginmanager.make_plugin_manager(cfg.plugins.disable)
        factory = peer_factory(cfg, pm, config_file)
    secret = mn_secret(cfg, config_file)
    hac = cfg.hac
    ctx = mn_client_context(str(hac.ca), strict_rfc6618=hac.strict_rfc6618)
    tls_name, by_ip = hac_identity(cfg)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                hac.host,
                hac.port,
                ssl=ctx,
                server_hostname=tls_name,
                ssl_handshake_timeout=hac.timeout,
            ),
            hac.timeout,
        )
    except TimeoutError:
        return BootstrapResult(None, False, reason="timeout connecting to the HAC")
    except (OSError, ConnectionError) as exc:  # ssl.SSLError is an OSError
        return BootstrapResult(None, False, reason=f"cannot connect to the HAC: {exc}")
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            set_nodelay(sock)
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        peer_ip = writer.get_extra_info("peername")[0]
        if der is None:
            return BootstrapResult(None, False, reason="HAC sent no certificate")
        try:
            check_hac_certificate(
                der, server_name=tls_name, connected_ip=peer_ip if by_ip else None
            )
            cb = mn_cb_octets(der)
        except CertificateError as exc:
            return BootstrapResult(None, False, reason=f"HAC certificate refused: {exc}")
        log.debug("TLS %s with %s", ssl_obj.version() if ssl_obj else "?", tls_name)
        peer = factory.new(PeerMethodContext(mn_id=cfg.mn.mn_id, cb_octets=cb, secret=secret))
        exch = MnExchange(
            mn_id=cfg.mn.mn_id,
            method_name=cfg.mn.method,
            method=peer,
            cb_octets=cb,
            scope=cfg.sa.scope,
            suitelist=[int(s) for s in cfg.sa.suites],
        )
        writer.write(exch.start())
        await writer.drain()
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65540), hac.timeout)
            except TimeoutError:
                return BootstrapResult(None, False, reason="timeout waiting for the HAC")
            events = exch.receive_data(data) if data else exch.receive_eof()
            for ev in events:
                if isinstance(ev, SendRequest):
                    writer.write(ev.data)
                    await writer.drain()
                elif isinstance(ev, Finished):
                    return ev.result
    except (OSError, ConnectionError) as exc:
        return BootstrapResult(None, False, reason=f"connection to the HAC failed: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)


# ---------------------------------------------------------------- registration


@dataclass
class RegistrationOutcome:
    status: int | None  # BA status; None: no BA
    lifetime: int = 0
    sequence: int | None = None
    ip4_hoa: str | None = None
    reason: str = ""
    rebootstrap: str | None = None

    @property
    def accepted(self) -> bool:
        # 176 (REINIT_SA_WITH_HAC, RFC 6618 §8.2) still accepts the binding; it
        # only asks the MN to bootstrap again soon.
        return self.status is not None and (self.status < 128 or self.status == 176)


class _UdpQueue(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(data)


def ha_destination(issued: IssuedSA, transport: str) -> tuple[str, int]:
    bs = issued.bootstrap
    if transport == "ip4" or (transport == "auto" and bs.haa_ip6 is None):
        if bs.haa_ip4 is None:
            raise LookupError("the HAC provisioned no IPv4 HA address")
        return str(bs.haa_ip4), bs.port
    if bs.haa_ip6 is None:
        raise LookupError("the HAC provisioned no IPv6 HA address")
    return str(bs.haa_ip6), bs.port


class Registrar:
    """Asyncio shell around ``MnRegistration`` for one SA."""

    def __init__(self, issued: IssuedSA, cfg: MNConfig, *, rebootstrap_at: float = 0.8) -> None:
        self.issued = issued
        self.cfg = cfg
        loop_now = time.monotonic()
        self.machine = MnRegistration(
            issued,
            now=loop_now,
            wall_now=utcnow(),
            lifetime=cfg.registration.lifetime,
            rebootstrap_at=rebootstrap_at,
            window=cfg.registration.replay_window,
            request_ip4_hoa=cfg.registration.request_ip4_hoa,
        )
        self._transport: asyncio.DatagramTransport | None = None
        self._proto: _UdpQueue | None = None

    async def open(self) -> None:
        host, port = ha_destination(self.issued, self.cfg.registration.transport)
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(_UdpQueue, remote_addr=(host, port))
        self._transport, self._proto = transport, proto

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _send(self, actions: list[Any]) -> list[Any]:
        rest = []
        for a in actions:
            if isinstance(a, Transmit):
                assert self._transport is not None
                self._transport.sendto(a.datagram)
            else:
                rest.append(a)
        return rest

    async def run_more(self, *, stop: asyncio.Event) -> RegistrationOutcome:
        """Keep the binding fresh after the first BA until a re-bootstrap is
        due, the HA refuses, or ``stop`` is set."""
        return await self.run(until_registered=False, stop=stop, start=False)

    async def run(
        self,
        *,
        until_registered: bool,
        deadline: float | None = None,
        stop: asyncio.Event | None = None,
        start: bool = True,
    ) -> RegistrationOutcome:
        """Drive the machine; return at the first BA (``until_registered``),
        on failure, on a re-bootstrap request, or when ``stop`` is set."""
        assert self._proto is not None
        outcome = RegistrationOutcome(None, reason="no binding acknowledgement")
        pending = self._send(self.machine.start(time.monotonic())) if start else []
        while True:
            for a in pending:
                if isinstance(a, Registered):
                    outcome = RegistrationOutcome(
                        a.status,
                        a.lifetime,
                        a.sequence,
                        str(a.ip4_hoa) if a.ip4_hoa else None,
                        "",
                    )
                    log.info(
                        "binding registered: status %d lifetime %d s sequence %d",
                        a.status,
                        a.lifetime,
                        a.sequence,
                    )
                    if until_registered:
                        return outcome
                elif isinstance(a, Failed):
                    outcome.status, outcome.reason = a.status, a.reason
                    return outcome
                elif isinstance(a, Rebootstrap):
                    outcome.rebootstrap = a.reason
                    return outcome
            now = time.monotonic()
            wake = self.machine.next_timer()
            if deadline is not None:
                wake = min(wake, deadline)
            if stop is not None:
                wake = min(wake, now + 0.25)  # notice a shutdown request promptly
            if deadline is not None and now >= deadline:
                return outcome
            if stop is not None and stop.is_set():
                return outcome
            try:
                data = await asyncio.wait_for(self._proto.queue.get(), max(0.0, wake - now))
                pending = self._send(self.machine.receive(data, time.monotonic()))
            except TimeoutError:
                pending = self._send(self.machine.timer(time.monotonic()))

    async def deregister(self, timeout: float = 2.0) -> RegistrationOutcome:
        assert self._proto is not None
        pending = self._send(self.machine.deregister(time.monotonic()))
        del pending
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data = await asyncio.wait_for(self._proto.queue.get(), end - time.monotonic())
            except TimeoutError:
                break
            for a in self.machine.receive(data, time.monotonic()):
                if isinstance(a, Registered):
                    log.info("binding deregistered (status %d)", a.status)
                    return RegistrationOutcome(a.status, a.lifetime, a.sequence)
        return RegistrationOutcome(None, reason="no acknowledgement of the de-registration")
