"""The MN's bootstrap client and registrar: thin asyncio shells.

``bootstrap`` opens TLS to the HAC, checks the HAC certificate by hand after
the handshake (PROFILE §1: SAN only, no wildcard, no CN, IP SAN for an IP
connection), derives the channel binding and runs one MHAuth exchange.

``Registrar`` drives ``MnRegistration`` over one UDP socket connected to the
HA (so the kernel only lets the HA's address and port in).  It reads what
the socket holds whenever the event loop says it is readable: Binding
Acknowledgements go to the registration machine, user data (PType 1 and 0)
to ``on_data`` (the data plane, ``roles/mn_data.py``).  With movement
detection on, it checks every ``movement_check`` seconds which source
address the host would now use towards the HA; when that care-of address
changed (or a send fails because it disappeared), it opens a new socket and
sends a Binding Update at once (RFC 6275 §11.5-§11.7.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pluggy

from mipsec.core import pluginmanager
from mipsec.core.authmethod import PeerMethodContext, PeerMethodFactory
from mipsec.core.clockstep import ClockWatch, step_text
from mipsec.core.config import MNConfig
from mipsec.core.errors import CertificateError, ConfigError
from mipsec.core.filedigest import read_regular
from mipsec.core.hookspecs import PluginContext
from mipsec.core.mn_exchange import BootstrapResult, Finished, MnExchange, SendRequest
from mipsec.core.mn_registration import (
    Action,
    Failed,
    MnRegistration,
    Rebootstrap,
    Registered,
    Transmit,
)
from mipsec.core.model import IssuedSA
from mipsec.core.tls import check_hac_certificate, mn_cb_octets, mn_client_context
from mipsec.core.tlsclient import TlsClient
from mipsec.core.udpgso import GsoSender

log = logging.getLogger("mipsec.mn")


def mn_secret(cfg: MNConfig, config_file: str = "<memory>") -> bytes | None:
    if cfg.mn.psk_hex is not None:
        return bytes.fromhex(cfg.mn.psk_hex)
    if cfg.mn.psk_file is not None:
        try:
            text = read_regular(cfg.mn.psk_file, 4096).decode("ascii").strip()
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
    cfg: MNConfig,
    pm: pluggy.PluginManager,
    config_file: str = "<memory>",
    *,
    check_only: bool = False,
) -> PeerMethodFactory:
    """Build the configured method's peer factory once (options validated at start).

    The method's options are the MN's table named after it (``[eap]`` for
    ``eap``; ``psk`` takes none): a wrong option is a ConfigError naming
    the file and the key.  ``check_only`` (``mipsec check-config``): the
    plugins validate and create nothing (``extra["check_only"]``, as the
    HAC's and the HA's plugins are told).
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
    extra: dict[str, Any] = {"pm": pm}
    if check_only:
        extra["check_only"] = True
    ctx = PluginContext(role="mn", base_dir=base, config_file=config_file, extra=extra)
    key = "eap" if cfg.mn.method == "eap" else "mn.method"
    with pluginmanager.building(config_file, key, cfg.mn.method):
        factory = method.peer(options, ctx)
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
    loop = asyncio.get_running_loop()
    # Every wait below ends by this deadline too: a HAC trickling one octet
    # per ``timeout`` would otherwise hold the MN for 65,535 of them.
    deadline = loop.time() + hac.exchange_timeout
    try:
        # Memory-BIO TLS client (core/tlsclient.py): the MHAuth messages are
        # small and lockstep, asyncio's SSL streams cost more than they do.
        async with asyncio.timeout(min(hac.timeout, hac.exchange_timeout)):
            tls = await TlsClient.connect(hac.host, hac.port, ctx, tls_name)
    except TimeoutError:
        return BootstrapResult(None, False, reason="timeout connecting to the HAC")
    except (OSError, ConnectionError) as exc:  # ssl.SSLError is an OSError
        return BootstrapResult(None, False, reason=f"cannot connect to the HAC: {exc}")
    try:
        der = tls.peercert_der()
        peername = tls.peername
        peer_ip = peername[0] if peername else None
        if der is None:
            return BootstrapResult(None, False, reason="HAC sent no certificate")
        try:
            check_hac_certificate(
                der, server_name=tls_name, connected_ip=peer_ip if by_ip else None
            )
            cb = mn_cb_octets(der)
        except CertificateError as exc:
            return BootstrapResult(None, False, reason=f"HAC certificate refused: {exc}")
        log.debug("TLS %s with %s", tls.version() or "?", tls_name)
        peer = factory.new(PeerMethodContext(mn_id=cfg.mn.mn_id, cb_octets=cb, secret=secret))
        exch = MnExchange(
            mn_id=cfg.mn.mn_id,
            method_name=cfg.mn.method,
            method=peer,
            cb_octets=cb,
            scope=cfg.sa.scope,
            suitelist=[int(s) for s in cfg.sa.suites],
        )
        tls.write(exch.start())
        while True:
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(min(hac.timeout, max(left, 0.0))):
                    data = await tls.read()
            except TimeoutError:
                if loop.time() >= deadline:
                    return BootstrapResult(
                        None,
                        False,
                        reason=f"the HAC did not finish within exchange_timeout "
                        f"({hac.exchange_timeout:g} s)",
                    )
                return BootstrapResult(None, False, reason="timeout waiting for the HAC")
            events = exch.receive_data(data) if data else exch.receive_eof()
            for ev in events:
                if isinstance(ev, SendRequest):
                    tls.write(ev.data)
                elif isinstance(ev, Finished):
                    return ev.result
    except (OSError, ConnectionError) as exc:
        return BootstrapResult(None, False, reason=f"connection to the HAC failed: {exc}")
    finally:
        tls.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tls.closed, 2)


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


RECV_BUDGET = 256  # datagrams read per wake-up
RECV_SIZE = 65535
SOCKET_BUFFER = 4 << 20  # absorbs bursts of tunnelled data
# A send that fails with one of these means the care-of address is gone.
_MOVED_ERRNOS = frozenset((errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH))
# Opening the socket to an IPv6 HA failed with one of these: this host has no
# IPv6 (EAFNOSUPPORT), not on the path to the HA (no ::1 with IPv6 off on the
# loopback: EADDRNOTAVAIL), or no route there (ENETUNREACH; since the
# twenty-eighth session also an `unreachable` route's EHOSTUNREACH and a
# `prohibit` route's EACCES -- found in review).
_NO_IP6_ERRNOS = frozenset(
    (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES)
)


def source_address_for(host: str, port: int) -> str | None:
    """The source address the host would use towards ``host`` now (None: no route).

    A UDP ``connect`` only asks the routing table: no packet leaves.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
        except OSError:
            return None
        return str(s.getsockname()[0])


def ha_destination(issued: IssuedSA, transport: str) -> tuple[str, int]:
    bs = issued.bootstrap
    if transport == "ip4" or (transport == "auto" and bs.haa_ip6 is None):
        if bs.haa_ip4 is None:
            raise LookupError("the HAC provisioned no IPv4 HA address")
        return str(bs.haa_ip4), bs.port
    if bs.haa_ip6 is None:
        raise LookupError("the HAC provisioned no IPv6 HA address")
    return str(bs.haa_ip6), bs.port


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def mn_clock() -> float:
    """The clock of the MN's registration timers: Linux's CLOCK_BOOTTIME,
    which goes on counting while the host is suspended (the monotonic clock
    elsewhere).  A laptop that slept through its binding's refresh or its
    SA's end acts on waking, as the HA's clock has moved on; on the
    monotonic clock, which stops during a suspend, it kept its old
    schedule and sent BUs under an SA the HA had let go, until the BU
    timeouts sent it back to its HAC."""
    return time.clock_gettime(_BOOTTIME) if _BOOTTIME is not None else time.monotonic()


def mn_step_line(step: float, spi: int, moved: float | None, left: float) -> str:
    """The MN's one line for a step of its wall clock while it holds an SA."""
    size = step_text(step)
    if step > 0 and moved is not None:
        what = f"by it the SA (spi={spi}) is near its end: bootstrapping again in {moved:.0f} s"
    else:
        what = f"the SA (spi={spi}) keeps its schedule: bootstrapping again in {left:.0f} s"
    way = "ahead" if step > 0 else "back"
    return f"wall clock stepped {size} {way}: {what} -- is NTP in step?"


class Registrar:
    """Asyncio shell around ``MnRegistration`` for one SA.

    ``clock`` (seconds) drives the machine's timers, ``wall`` (epoch
    seconds) is the wall clock watched for steps; both injectable for tests.
    """

    def __init__(
        self,
        issued: IssuedSA,
        cfg: MNConfig,
        *,
        rebootstrap_at: float = 0.8,
        rebootstrap_after: float | None = None,
        clock: Callable[[], float] = mn_clock,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.issued = issued
        self.cfg = cfg
        self._clock, self._wall = clock, wall
        # A step of the wall clock (NTP, ``date -s``) is said once and may
        # bring the re-bootstrap forward (``MnRegistration.clock_stepped``);
        # a suspend is no step on this clock pair.
        self._clock_watch = ClockWatch(wall=wall, mono=clock)
        loop_now = clock()
        data = cfg.dataplane
        self.machine = MnRegistration(
            issued,
            now=loop_now,
            wall_now=datetime.fromtimestamp(wall(), UTC),
            lifetime=cfg.registration.lifetime,
            rebootstrap_at=rebootstrap_at,
            rebootstrap_after=rebootstrap_after,
            window=cfg.registration.replay_window,
            request_ip4_hoa=cfg.registration.request_ip4_hoa,
            keepalive=data.keepalive_interval if data.enabled else 0.0,
        )
        # What each BA asked for, for run(): the BA itself is opened on
        # arrival (``_readable``), in order with the data around it.
        self.queue: asyncio.Queue[list[Action]] = asyncio.Queue(maxsize=256)
        # The uplink used up its SA's numbers but for PROFILE §7's last 2**20:
        # run() is woken (nothing to do but look at its timers, now due).
        self.machine.on_reinit = self._wake
        # User data from the HA (PType 1/0), raw; set by the data plane.
        self.on_data: Callable[[bytes], None] | None = None
        self.sock: socket.socket | None = None
        self._gso: GsoSender | None = None
        self.ha: tuple[str, int] | None = None
        self.moves = 0
        self.send_errors = 0
        self._movement_task: asyncio.Task[None] | None = None
        self._check_now = asyncio.Event()

    async def open(self) -> None:
        self.ha = ha_destination(self.issued, self.cfg.registration.transport)
        try:
            self._open_socket()
        except OSError as exc:
            ip4 = self.issued.bootstrap.haa_ip4
            if not (
                self.cfg.registration.transport == "auto"
                and ":" in self.ha[0]
                and ip4 is not None
                and exc.errno in _NO_IP6_ERRNOS
            ):
                raise
            # "auto" prefers IPv6; a host that cannot send IPv6 to the HA at
            # all takes its IPv4 address (RFC 5555).  The MH checksum still
            # uses mip6-haa-ip6 (PROFILE §8).
            log.info("no IPv6 path to the HA at %s (%s): using %s", self.ha[0], exc, ip4)
            self.ha = (str(ip4), self.ha[1])
            self._open_socket()
        data = self.cfg.dataplane
        if data.enabled and data.movement_check > 0:
            self._movement_task = asyncio.create_task(self._watch_movement(data.movement_check))

    def _open_socket(self) -> None:
        assert self.ha is not None
        host, port = self.ha
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            sock.connect((host, port))
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._gso = GsoSender(sock)

    def _close_socket(self) -> None:
        sock, self.sock = self.sock, None
        self._gso = None
        if sock is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def close(self) -> None:
        if self._movement_task is not None:
            self._movement_task.cancel()
            self._movement_task = None
        self._close_socket()

    def _wake(self) -> None:
        """run() looks at its timers now (an empty list of actions)."""
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait([])

    def _readable(self, sock: socket.socket) -> None:
        """Drain the socket: BAs to the queue, user data to ``on_data``."""
        recv = sock.recv
        queue = self.queue
        for _ in range(RECV_BUDGET):
            try:
                data = recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                # ECONNREFUSED: an ICMP error for an earlier send (the HA is
                # restarting, say); the socket stays usable.
                continue
            if not data:
                continue
            if data[0] >> 4 <= 1:  # PType 0 or 1: user data (RFC 6618 §6.4)
                on_data = self.on_data
                if on_data is not None:
                    on_data(data)
            else:
                # Opened now, not when run() gets to it: BAs and data share
                # one replay window (one HA counter), and 64 data packets
                # behind a BA in one drain slid the window past it -- the
                # refresh BA dropped as a replay under a bulk download, the
                # binding taken for lost (found in review).
                ignored = self.machine.ignored["unrequested_ip4_ack"]
                actions = self.machine.receive(data, self._clock())
                if ignored == 0 and self.machine.ignored["unrequested_ip4_ack"]:
                    # Once per SA: an HA acknowledging an IPv4 home address
                    # its BU did not request is broken or hostile (the ack is
                    # ignored, core/mn_registration.py).
                    log.warning(
                        "HA %s sent an IPv4 Address Acknowledgement its BU did not ask for "
                        "(spi=%d); ignored",
                        self.ha[0] if self.ha is not None else "?",
                        self.machine.issued.sa.spi,
                    )
                if actions:
                    with contextlib.suppress(asyncio.QueueFull):
                        queue.put_nowait(actions)

    def send(self, datagram: bytes) -> None:
        """One datagram to the HA; a send the care-of address cannot make triggers a check."""
        sock = self.sock
        if sock is None:
            return
        try:
            sock.send(datagram)
        except BlockingIOError:
            self.send_errors += 1  # send buffer full: dropped, as a router would
        except OSError as exc:
            self.send_errors += 1
            if exc.errno in _MOVED_ERRNOS:
                self._check_now.set()

    def send_all(self, datagrams: list[bytes]) -> None:
        """Many datagrams to the HA, runs of them per system call (``udpgso.py``)."""
        gso = self._gso
        if gso is None or not datagrams:
            return
        try:
            gso.send(datagrams)
        except BlockingIOError:
            self.send_errors += 1
        except OSError as exc:
            self.send_errors += 1
            if exc.errno in _MOVED_ERRNOS:
                self._check_now.set()

    def _send(self, actions: list[Any]) -> list[Any]:
        rest = []
        for a in actions:
            if isinstance(a, Transmit):
                self.send(a.datagram)
            else:
                rest.append(a)
        return rest

    # ------------------------------------------------------------ movement (RFC 6275 §11.5)

    async def _watch_movement(self, interval: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), interval)
            self._check_now.clear()
            self.check_movement()

    def check_movement(self) -> bool:
        """Re-open the socket and send a BU when the care-of address changed."""
        if self.ha is None or self.sock is None:
            return False
        now_src = source_address_for(*self.ha)
        try:
            old_src = self.sock.getsockname()[0]
        except OSError:
            old_src = None
        if now_src is None or now_src == old_src:
            return False
        log.info("care-of address changed: %s -> %s; sending a binding update", old_src, now_src)
        self.moves += 1
        self._close_socket()
        try:
            self._open_socket()
        except OSError as exc:
            log.warning("cannot re-open the socket to the HA: %s", exc)
            return False
        self._send(self.machine.moved(self._clock()))
        return True

    async def run_more(self, *, stop: asyncio.Event) -> RegistrationOutcome:
        """Keep the binding fresh after the first BA until a re-bootstrap is
        due, the HA refuses, or ``stop`` is set."""
        return await self.run(until_registered=False, stop=stop, start=False)

    async def run(
        self,
        *,
        until_registered: bool,
        timeout: float | None = None,
        stop: asyncio.Event | None = None,
        start: bool = True,
    ) -> RegistrationOutcome:
        """Drive the machine; return at the first BA (``until_registered``),
        on failure, on a re-bootstrap request, when ``stop`` is set, or
        ``timeout`` seconds from now (measured on the machine's clock: a
        deadline from another clock -- the monotonic one lags CLOCK_BOOTTIME
        by every suspend since boot -- would have already passed)."""
        deadline = None if timeout is None else self._clock() + timeout
        outcome = RegistrationOutcome(None, reason="no binding acknowledgement")
        pending = self._send(self.machine.start(self._clock())) if start else []
        while True:
            # Every action of one step is read before returning: a BA with
            # status 176 is a Registered and a Rebootstrap at once, and the
            # machine sends its Rebootstrap only once -- returning at the
            # Registered dropped it, and the MN never bootstrapped again,
            # refreshing past its SA's end (found in review).
            registered = False
            for a in pending:
                if isinstance(a, Registered):
                    outcome = RegistrationOutcome(
                        a.status,
                        a.lifetime,
                        a.sequence,
                        str(a.ip4_hoa) if a.ip4_hoa else None,
                        "",
                    )
                    registered = True
                    log.info(
                        "binding registered: status %d lifetime %d s sequence %d",
                        a.status,
                        a.lifetime,
                        a.sequence,
                    )
                elif isinstance(a, Failed):
                    outcome.status, outcome.reason = a.status, a.reason
                    return outcome
                elif isinstance(a, Rebootstrap):
                    outcome.rebootstrap = a.reason
                    if outcome.status is None:  # no BA registered: say why
                        outcome.reason = a.reason
            if outcome.rebootstrap is not None or (registered and until_registered):
                return outcome
            self._check_clock()
            now = self._clock()
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
                # At most an hour: with nothing due (a Rebootstrap sent, no
                # refresh) the wait is endless -- and a look at the clock
                # once an hour costs nothing.
                got = await asyncio.wait_for(self.queue.get(), min(max(0.0, wake - now), 3600.0))
                pending = self._send(got)
            except TimeoutError:
                pending = self._send(self.machine.timer(self._clock()))

    def _check_clock(self) -> None:
        step = self._clock_watch.check()
        if step is None:
            return
        now = self._clock()
        moved = None
        if step > 0:
            wall_now = datetime.fromtimestamp(self._wall(), UTC)
            moved = self.machine.clock_stepped(now, step, wall_now)
        left = max(self.machine.rebootstrap_deadline - now, 0.0)
        log.warning("%s", mn_step_line(step, self.issued.sa.spi, moved, left))

    async def deregister(self, timeout: float = 2.0) -> RegistrationOutcome:
        pending = self._send(self.machine.deregister(self._clock()))
        del pending
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                got = await asyncio.wait_for(self.queue.get(), end - time.monotonic())
            except TimeoutError:
                break
            for a in got:
                if isinstance(a, Registered):
                    log.info("binding deregistered (status %d)", a.status)
                    return RegistrationOutcome(a.status, a.lifetime, a.sequence)
        return RegistrationOutcome(None, reason="no acknowledgement of the de-registration")
