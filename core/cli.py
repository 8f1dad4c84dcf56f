"""The ``mipsec`` launcher.

    mipsec --role hac|ha|mn --config FILE [--once] [--json] [--show-keys]
    mipsec check-config FILE [--role R]
    mipsec plugins
    mipsec init DIR [--hac-port N] [--ha-port N] [--radius HOST:PORT
                    --radius-secret-file FILE [--usim IMSI,KI,OPC,AMF,SQN]] [--json]
    mipsec demo [--auth psk|eap-tls] [--data]
    mipsec status|sas|bindings|reload --config FILE [--json]   (core/ctlcli.py)
    mipsec revoke|unrevoke --config FILE MN_ID
    mipsec --version

Errors a user can fix (configuration, plugins, certificates) print one line
naming the file, the key and the reason -- never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sqlite3
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mipsec.core import ctlcli, pluginmanager
from mipsec.core.config import HACConfig, HAConfig, MNConfig, load_config, load_toml, redacted
from mipsec.core.errors import (
    CertificateError,
    ConfigError,
    ListenError,
    LocalProtocolError,
    PluginError,
)
from mipsec.core.logburst import LineBurst
from mipsec.core.mn_backoff import Backoff, backoff_path
from mipsec.core.stopcheck import stop_requested
from mipsec.core.version import version

if TYPE_CHECKING:  # annotations only: a HAC or HA never imports the MN's exchange
    from mipsec.core.mn_exchange import BootstrapResult

_T = TypeVar("_T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
# A floor under every gap between two bootstraps.  The waits after failures
# (a HAC down, an HA answering 176 to every BU) back off from [hac]
# retry_min (core/mn_retry.py); this only keeps a tight loop impossible.
MIN_REBOOTSTRAP_INTERVAL = 1.0  # seconds
# The MN stopped (SIGTERM) during a bootstrap: how long the bootstrap may
# still finish (then the MN registers and de-registers at once, as when
# stopped between bootstraps) before it is cut.  Far below systemd's
# TimeoutStopSec (20 in conf/systemd), where the exchange's own deadline
# ([hac] exchange_timeout, 120 s) is not.
STOP_GRACE = 5.0  # seconds


def _setup_logging(cfg: Any) -> None:
    from mipsec.core.logsetup import configure_from

    configure_from(cfg)  # one event per line, UTC (core/logsetup.py)


def result_json(result: BootstrapResult, *, show_keys: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": result.status,
        "authenticated": result.authenticated,
        "ok": result.ok,
    }
    if result.reason:
        out["reason"] = result.reason
    if result.retry_after is not None:
        out["retry_after"] = result.retry_after.isoformat()
    if result.issued is not None:
        sa, bs = result.issued.sa, result.issued.bootstrap
        from mipsec.core.suites import SUITES

        out["sa"] = {
            "spi": sa.spi,
            "suite": sa.suite.name,
            "suite_id": SUITES[sa.suite].token,
            "scope": sa.scope,
            "validity_end": sa.validity_end.isoformat(),
        }
        if show_keys:
            out["sa"]["keys"] = {
                "mn_to_ha_ikey": sa.mn_to_ha_ikey.hex(),
                "ha_to_mn_ikey": sa.ha_to_mn_ikey.hex(),
                "mn_to_ha_ekey": sa.mn_to_ha_ekey.hex(),
                "ha_to_mn_ekey": sa.ha_to_mn_ekey.hex(),
            }
        out["bootstrap"] = {
            k: (str(v) if v is not None and not isinstance(v, int) else v)
            for k, v in (
                ("haa_ip6", bs.haa_ip6),
                ("haa_ip4", bs.haa_ip4),
                ("port", bs.port),
                ("ip6_hoa", bs.ip6_hoa),
                ("ip4_hoa", bs.ip4_hoa),
                ("ip6_hnp", bs.ip6_hnp),
                ("ip4_hnp", bs.ip4_hnp),
                ("dns_ip6", bs.dns_ip6),
                ("dns_ip4", bs.dns_ip4),
            )
            if v is not None
        }
    return out


# ---------------------------------------------------------------- roles


def _hold_sighup(loop: asyncio.AbstractEventLoop) -> Callable[[Callable[[], None]], None]:
    """A SIGHUP during a role's start must neither end the process (the
    default action) nor reload a service half built: remembered until the
    returned function installs ``reload`` as the handler, which then runs
    once for a SIGHUP that came meanwhile."""
    early: list[bool] = []
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, early.append, True)

    def release(reload: Callable[[], None]) -> None:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, reload)
        if early:
            reload()

    return release


async def _run_hac(cfg: HACConfig, config_file: str) -> int:
    from mipsec.core.control import start_control
    from mipsec.core.roles.hac import HacService
    from mipsec.core.roles.hac_ops import HacOps

    loop = asyncio.get_running_loop()
    release_sighup = _hold_sighup(loop)
    # Stop handlers before the listener opens: a SIGTERM right after
    # "listening" (a supervisor that stops what it just saw start) must still
    # stop cleanly, not kill the process by the default action.
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    _ignore_sigusr1(loop, "hac")
    local_ha = None
    if cfg.local_ha is not None:
        # Deployment model 1: the HA runs in this process; the ``local``
        # transport hands it each SA directly.
        from mipsec.core.roles.ha import HaService

        local_ha = HaService(cfg.local_ha, config_file=config_file)
        try:
            await local_ha.start()
        except ListenError as exc:
            raise exc.under("local_ha.") from None
    service = HacService(cfg, config_file=config_file)
    # Bound, not yet serving: the control socket and the metrics listener
    # below may still fail the start, and a start that fails must not have
    # served an MN.
    await service.start(serve=False)
    ha_ops = None
    if local_ha is not None:
        from mipsec.core.roles.ha_ops import HaOps  # the HA's commands: model 1 only

        ha_ops = HaOps(local_ha, config_file)
    ops = HacOps(service, config_file, ha_ops)
    release_sighup(ops.reloader.on_signal)
    metrics = None
    control = None
    try:
        control = await start_control(cfg, "hac", config_file, ops.dispatcher())
        if cfg.metrics is not None:
            from mipsec.core.metrics import HacMetrics, start_metrics

            service.metrics = HacMetrics(service, ops.tracker, local_ha)
            metrics = await start_metrics(
                cfg, service.metrics.registry, lambda: service._listener is not None, "hac"
            )
        # A SIGTERM during the start (100,000 SAs take a second or two):
        # stop without ever serving an MN, rather than open the port to cut
        # or drain exchanges a moment later.
        stopped_early = await stop_requested(stop)
        if not stopped_early:
            await service.serve()
    except BaseException:
        if metrics is not None:
            await metrics.stop()
        if control is not None:
            await control.stop()
        await service.stop()
        if local_ha is not None:
            await local_ha.stop()
        raise
    if not stopped_early:
        _ready("hac", config_file)
        await stop.wait()
    # Refuse new connections before STOPPING=1 and the "stopping" line say
    # so: a supervisor (or a test) that acts on them finds the port closed.
    service.stop_accepting()
    _stopping("hac")
    drain_timeout = service.cfg.hac.drain_timeout  # a reload may have changed it
    left = await service.drain(drain_timeout)
    if left:
        logging.getLogger("mipsec.hac").warning(
            "hac drain: %d exchange(s) still under way after %.1f s are cut",
            left,
            drain_timeout,
        )
    if control is not None:
        await control.stop()
    if metrics is not None:
        await metrics.stop()
    await ops.aclose()
    await service.stop()
    if local_ha is not None:
        await local_ha.stop()
    logging.getLogger("mipsec").info("hac stopped (mipsec %s)", version())
    return EXIT_OK


def _ready(role: str, config_file: str) -> None:
    from mipsec.core import sdnotify

    logging.getLogger("mipsec").info(
        "%s ready (mipsec %s, config %s)", role, version(), config_file
    )
    sdnotify.ready(f"{role} serving")


def _stopping(role: str) -> None:
    from mipsec.core import sdnotify

    logging.getLogger("mipsec").info("%s stopping (mipsec %s)", role, version())
    sdnotify.stopping()


async def _run_ha(cfg: HAConfig, config_file: str) -> int:
    from mipsec.core.control import start_control
    from mipsec.core.roles.ha import HaService, StartAborted
    from mipsec.core.roles.ha_ops import HaOps

    service = HaService(cfg, config_file)
    ops = HaOps(service, config_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM right after "listening" must still stop cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    _ignore_sigusr1(loop, "ha")
    # Held until the HA runs: a reload of a service half built -- its
    # provisioning listener being opened -- would miss new client_names
    # while the configuration said them applied.
    release_sighup = _hold_sighup(loop)
    # Control socket and metrics listener first: either may fail the start
    # (a port in use), and a start that fails must not have taken a HAC's
    # install or an MN's BU.  Until the HA has started, the control socket
    # answers "starting" and the health check says not ready.
    metrics = None
    control = None
    try:
        control = await start_control(
            cfg, "ha", config_file, ops.dispatcher().gated(lambda: service.started)
        )
        if cfg.metrics is not None:
            from mipsec.core.metrics import HaMetrics, start_metrics

            metrics = await start_metrics(
                cfg, HaMetrics(service).registry, lambda: service.started, "ha"
            )
    except BaseException:
        if control is not None:
            await control.stop()
        await service.stop()  # closes the store the constructor opened
        raise
    try:
        # A SIGTERM during the store's load (100,000 SAs take a second):
        # stopped before any port opens, as the HAC does.
        await service.start(stop)  # cleans up after itself if it fails
        stopped_early = False
    except StartAborted:
        stopped_early = True
    except BaseException:
        if metrics is not None:
            await metrics.stop()
        if control is not None:
            await control.stop()
        raise
    if not stopped_early:
        release_sighup(ops.reloader.on_signal)
        _ready("ha", config_file)
        await stop.wait()
    # Nothing to drain on the HA: each BU is answered only after its state
    # is committed (issue 6), so stopping between packets loses nothing.
    # As on the HAC: the provisioning listener is closed before STOPPING=1
    # says so (tests/integration/stopprobe.py).
    service.stop_accepting()
    _stopping("ha")
    if control is not None:
        await control.stop()
    if metrics is not None:
        await metrics.stop()
    await service.stop()
    logging.getLogger("mipsec").info("ha stopped (mipsec %s)", version())
    return EXIT_OK


def _renewed(factory: Any, cfg: MNConfig, pm: Any, config_file: str, log: logging.Logger) -> Any:
    """The MN's method built again when a file it was built from changed
    (core/reload.py ``stale``: a renewed EAP-TLS client certificate, key or
    CA), before a re-bootstrap; the one it has when the files do not load
    (one ERROR naming the key), so a renewal half-written now is taken at
    the next bootstrap."""
    from mipsec.core.reload import stale
    from mipsec.core.roles.mn import peer_factory

    if not stale(factory):
        return factory
    try:
        new = peer_factory(cfg, pm, config_file)
    except ConfigError as exc:
        log.error("mn method files changed but refused, keeping the ones loaded: %s", exc)
        return factory
    log.info("mn method files changed on disk: built again for this bootstrap")
    return new


def _ignore_sigusr1(loop: asyncio.AbstractEventLoop, role: str) -> None:
    """SIGUSR1 is the MN's "bootstrap now"; its default action would end a
    HAC or HA that a ``pkill -USR1 -f mipsec`` meant for the MNs reached."""

    # A flood of signals (a hook run in a loop) is a few lines, then a count.
    lines = LineBurst(logging.getLogger(f"mipsec.{role}"), "SIGUSR1 lines", limit=4, window=10.0)

    def ignored() -> None:
        lines.line(logging.INFO, "%s: SIGUSR1 ignored (it tells an MN to bootstrap now)", role)

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGUSR1, ignored)


async def _run_mn(cfg: MNConfig, config_file: str, once: bool, as_json: bool, keys: bool) -> int:
    from mipsec.core.control import start_control
    from mipsec.core.mn_status import MnStatus
    from mipsec.core.mn_wait import BootstrapWait
    from mipsec.core.roles.mn import RegistrationOutcome, mn_clock, peer_factory

    log = logging.getLogger("mipsec.mn")
    # The method's options are validated once, at start (a wrong one is a
    # configuration error naming the key, not a failure at each bootstrap).
    pm = pluginmanager.make_plugin_manager(cfg.plugins.disable)
    factory = peer_factory(cfg, pm, config_file)
    stop = asyncio.Event()
    # The wait before each next bootstrap: on the registration clock (a
    # suspend counts), ended by SIGTERM, and cut by SIGUSR1 within limits
    # that keep a flood of signals from turning the backoff off
    # (core/mn_wait.py).
    waits = BootstrapWait(mn_clock, cfg.hac.retry_min)
    loop = asyncio.get_running_loop()
    usr1_lines = LineBurst(log, "SIGUSR1 lines", limit=4, window=10.0)

    def stop_now() -> None:
        stop.set()
        waits.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop_now)

    def bootstrap_now() -> None:
        usr1_lines.line(logging.INFO, "%s", waits.cut())

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGUSR1, bootstrap_now)

    def no_reload() -> None:
        # The MN has no reload; without a handler SIGHUP's default action
        # ended it (and its data plane) -- a `kill -HUP` sent to every
        # mipsec process must not.
        log.info(
            "mn: SIGHUP ignored: the MN has no reload (its CA, PSK and EAP files are "
            "read again at each bootstrap; a changed %s needs a restart)",
            config_file,
        )

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, no_reload)

    def report(result: BootstrapResult, reg: RegistrationOutcome | None) -> None:
        data = result_json(result, show_keys=keys)
        if reg is not None:
            data["ba"] = {
                "status": reg.status,
                "lifetime": reg.lifetime,
                "sequence": reg.sequence,
            }
            if reg.ip4_hoa:
                data["ba"]["ip4_hoa"] = reg.ip4_hoa
            if reg.reason:
                data["ba"]["reason"] = reg.reason
            data["ok"] = data["ok"] and reg.accepted
        if as_json:
            print(json.dumps(data), flush=True)
        else:
            _print_result(result, reg)

    # What `mipsec status` shows (core/mn_status.py): told below what the
    # loop does; the daemon only -- --once ends before anyone could ask.
    status = MnStatus(cfg.mn.mn_id, config_file)
    control = (
        None
        if once
        else await start_control(cfg, "mn", config_file, status.dispatcher(), default_optional=True)
    )
    try:
        return await _mn_loop(
            cfg, config_file, once, status, pm, factory, stop, waits, report, log, loop
        )
    finally:
        status.stopping()
        if control is not None:
            await control.stop()


async def _mn_loop(
    cfg: MNConfig,
    config_file: str,
    once: bool,
    status: Any,
    pm: Any,
    factory: Any,
    stop: asyncio.Event,
    waits: Any,
    report: Callable[..., None],
    log: logging.Logger,
    loop: asyncio.AbstractEventLoop,
) -> int:
    """The MN daemon's loop (``_run_mn``'s signals, control socket and
    reporting set up around it): bootstrap, register, keep, again."""
    from mipsec.core.issuer import utcnow
    from mipsec.core.mn_keep import KeptBinding
    from mipsec.core.mn_registration import NEAR_END
    from mipsec.core.model import IssuedSA
    from mipsec.core.roles.mn import Registrar, RegistrationOutcome, bootstrap, mn_clock

    pause = waits.pause
    dataplane = None
    if cfg.dataplane.enabled and not once:
        # The TUN device lives across re-bootstraps; each registered SA is
        # attached to it (roles/mn_data.py).  It goes with the process.
        from mipsec.core.roles.mn_data import MnDataPlane

        dataplane = MnDataPlane(cfg.dataplane, config_file)
        dataplane.open()
        status.dataplane = dataplane
    last_bootstrap = -1e9
    # Failures in a row and the next allowed bootstrap (core/mn_retry.py),
    # kept across a restart (core/mn_backoff.py); --once keeps nothing.
    backoff = Backoff(
        None if once or not cfg.hac.keep_backoff else backoff_path(cfg, config_file),
        mn_id=cfg.mn.mn_id,
        retry_min=cfg.hac.retry_min,
        retry_max=cfg.hac.retry_max,
        log=log,
    )

    async def after_failure(why: str, retry_after: datetime | None = None) -> None:
        wait = backoff.failed(retry_after)
        status.waiting(wait, why, backoff.failures)
        asked = 0.0 if retry_after is None else (retry_after - utcnow()).total_seconds()
        # One line says it all: the wait, how many failures, and why.
        log.info(
            "next bootstrap in %.1f s (failure %d in a row%s): %s",
            wait,
            backoff.failures,
            "; the HAC's retry-after honoured" if retry_after is not None else "",
            why,
        )
        await pause(wait, max(asked, 0.0))

    def short_sa(issued: IssuedSA) -> float | None:
        """An SA with less than [sa] min_lifetime left by this MN's clock:
        the backed-off wait before the next bootstrap, one WARNING saying
        why.  Without it an MN whose clock runs an SA lifetime ahead of the
        HAC's re-bootstrapped every second, each time "successfully", for
        ever.  None: a normal SA."""
        left = (issued.sa.validity_end - utcnow()).total_seconds()
        if left >= cfg.sa.min_lifetime:
            return None
        cause = (
            "mn: SA spi=%d arrived with %.0f s left by this MN's clock (validity end %s), "
            "under [sa] min_lifetime (%g s): this MN's clock is probably ahead of the HAC's "
            "(check NTP), or the HAC issues SAs that short"
        )
        what = (issued.sa.spi, left, issued.sa.validity_end.isoformat(), cfg.sa.min_lifetime)
        if once:  # no next bootstrap to put off: the cause alone
            log.warning(cause, *what)
            return None
        wait = backoff.failed()
        status.waiting(
            wait, f"SA spi={issued.sa.spi} arrived with {left:.0f} s left", backoff.failures
        )
        log.warning(
            cause + "; it is used, and the next bootstrap is in %.1f s (failure %d in a row)",
            *what,
            wait,
            backoff.failures,
        )
        return wait

    left = backoff.resume()
    if left > 0:
        status.waiting(left, "a wait kept from before the restart", backoff.failures)
        log.info(
            "next bootstrap in %.1f s (failure %d in a row, kept from before the restart "
            "in %s; %s)",
            left,
            backoff.failures,
            backoff.path,
            f"the HAC's retry-after holds {backoff.hac_left:.1f} s of it, SIGUSR1 cuts the rest"
            if backoff.hac_left > 0
            else "SIGUSR1 bootstraps at once",
        )
        # Not cut by SIGUSR1 below a 503's retry-after, as in the process
        # that was told (core/mn_backoff.py ``hac_not_before``).
        await pause(left, backoff.hac_left)

    # The previous SA's binding, kept while the MN bootstraps again (make
    # before break, core/mn_keep.py).
    kept: KeptBinding | None = None
    status.kept_of = lambda: kept
    # backoff.succeeded() once the SA registered has lived [sa] min_lifetime.
    succeed_later: asyncio.TimerHandle | None = None
    while not stop.is_set():
        if kept is not None and not kept.live:
            kept = None
        # Never bootstrap more often than every MIN_REBOOTSTRAP_INTERVAL.
        gap = _monotonic() - last_bootstrap
        if gap < MIN_REBOOTSTRAP_INTERVAL:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), MIN_REBOOTSTRAP_INTERVAL - gap)
            if stop.is_set():
                break
        last_bootstrap = _monotonic()
        status.bootstrapping()
        factory = _renewed(factory, cfg, pm, config_file, log)
        boot = await _unless_stopped(
            bootstrap(cfg, config_file=config_file, factory=factory), stop, STOP_GRACE
        )
        if boot is None:
            log.info("mn: stopped during a bootstrap, which was cut after %.0f s", STOP_GRACE)
            if kept is not None:
                await kept.end(deregister=True)
            return EXIT_FAILED if once else EXIT_OK
        result = boot
        status.bootstrapped(
            result.status,
            result.ok,
            result.reason,
            None if result.issued is None else result.issued.sa.spi,
        )
        boot_at = mn_clock()  # the SA's age is measured from here (suspends count)
        if not result.ok or result.issued is None or not cfg.registration.enabled:
            report(result, None)
            if once:
                if result.ok and result.issued is not None:
                    short_sa(result.issued)  # the WARNING, if the clocks disagree
                return EXIT_OK if result.ok else EXIT_FAILED
            if not (result.ok and result.issued is not None):
                why = result.reason or "bootstrap failed"
                if result.status is not None and str(result.status) not in why:
                    why = f"status {result.status}: {why}"
                await after_failure(why, result.retry_after)
                continue
            short = short_sa(result.issued)
            if short is None:
                backoff.succeeded()
                # Watched from before the wall clock is read for the wait: a
                # step in between would go unseen.
                stepped = _sa_clock_watch(cfg.sa.rebootstrap_at, log)
                lifetime = (result.issued.sa.validity_end - utcnow()).total_seconds()
                wait = max(1.0, lifetime * cfg.sa.rebootstrap_at)
                status.waiting(wait, "", backoff.failures)
                log.info("next bootstrap in %.0f s", wait)
                await pause(wait, stepped=stepped)
            else:
                await pause(short)
            continue
        if kept is not None:
            # A new SA: the old binding's refreshes stop before the new SA's
            # first BU leaves -- one still in flight after it would take the
            # home address's binding back to the old SA where the HA keeps
            # both (max_sas_per_mn > 1; found in review).  The old binding
            # stays at the HA for its lifetime meanwhile.
            await kept.end(deregister=False)
            kept = None
        short = short_sa(result.issued)  # None with --once (the WARNING alone)
        try:
            registrar = Registrar(
                result.issued, cfg, rebootstrap_at=cfg.sa.rebootstrap_at, rebootstrap_after=short
            )
        except LocalProtocolError as exc:
            # The SA cannot be used (keys its ciphers refuse, e.g. a 3DES key
            # RFC 2451 §2.3 says MUST be rejected, should one pass the 200's
            # checks): a failed bootstrap, backed off.  It was a traceback, and
            # with no backoff written a supervisor's restarts hammered the
            # HAC (found in review).
            report(result, RegistrationOutcome(None, reason=f"unusable SA: {exc}"))
            if once:
                return EXIT_FAILED
            await after_failure(f"unusable SA spi={result.issued.sa.spi}: {exc}")
            continue
        status.registering(registrar)
        try:
            await registrar.open()
        except (OSError, LookupError) as exc:
            report(result, RegistrationOutcome(None, reason=f"cannot reach the HA: {exc}"))
            if once:
                return EXIT_FAILED
            await after_failure(f"cannot reach the HA: {exc}")
            continue
        try:
            if once:
                outcome = await registrar.run(
                    until_registered=True,
                    timeout=cfg.registration.once_timeout,
                )
                report(result, outcome)
                return EXIT_OK if outcome.accepted else EXIT_FAILED
            first = await registrar.run(until_registered=True, stop=stop)
            report(result, first)
            if first.accepted:
                status.registered()
            if dataplane is not None and first.accepted:
                dataplane.attach(registrar, first.ip4_hoa)
            if first.accepted and first.rebootstrap is None and short is None:
                # The count of failures starts again only once the SA has
                # lived [sa] min_lifetime (the floor below): the HA can
                # send an SA back at any time (176 on a refresh, a counter
                # near its end on the first BA), and a reset at the first BA
                # let such an HA drive a re-bootstrap every 1-3 s for ever
                # (found in review; since the twenty-eighth session).
                succeed_later = loop.call_later(
                    max(0.0, cfg.sa.min_lifetime - (mn_clock() - boot_at)), backoff.succeeded
                )
            outcome = first
            if first.accepted and first.rebootstrap is None:
                outcome = await registrar.run_more(stop=stop)
            if succeed_later is not None:
                succeed_later.cancel()
                succeed_later = None
            if stop.is_set():
                await registrar.deregister()
                break
            if outcome.rebootstrap:
                log.info("bootstrapping again: %s", outcome.rebootstrap)
                lived = mn_clock() - boot_at
                if outcome.rebootstrap == NEAR_END and first.rebootstrap is None:
                    # Make before break (core/mn_keep.py): the SA is still
                    # good; its binding and data plane stay until a new SA
                    # is registered or it ends.  The SA's normal end: a
                    # success, whatever its length.
                    if short is None:
                        backoff.succeeded()
                    if kept is not None:
                        await kept.end(deregister=False)
                    kept = KeptBinding(registrar, _detach_from(dataplane))
                elif first.rebootstrap is not None:
                    # Sent back by the SA's very first BA (an HA answering
                    # 176 to every BU): a failure, backed off -- the MN
                    # must not hammer its HAC.
                    await after_failure(f"sent back by the SA's first BA: {outcome.rebootstrap}")
                elif lived < cfg.sa.min_lifetime:
                    # Sent back before it lived [sa] min_lifetime (RFC 6618
                    # §8.2's 176 on a refresh, PROFILE §7's counter already
                    # near its end): a failure too, backed off.
                    await after_failure(
                        f"SA spi={result.issued.sa.spi} sent back after {lived:.0f} s, "
                        f"under [sa] min_lifetime ({cfg.sa.min_lifetime:g} s): "
                        f"{outcome.rebootstrap}"
                    )
            elif not outcome.accepted:
                why = outcome.reason or f"BA status {outcome.status}"
                log.warning("registration failed: %s", why)
                await after_failure(f"registration failed: {why}")
        finally:
            if succeed_later is not None:
                succeed_later.cancel()
                succeed_later = None
            if kept is None or kept.registrar is not registrar:
                if dataplane is not None and dataplane.registrar is registrar:
                    dataplane.detach()
                registrar.close()
            status.unregistered(registrar)
    if kept is not None:
        await kept.end(deregister=stop.is_set())  # a stop de-registers it
    if dataplane is not None:
        dataplane.close()
    return EXIT_OK


def _detach_from(dataplane: Any) -> Callable[[Any], None]:
    """For a kept binding that ends: the data plane lets go of it, if it
    still carries it (a new SA's attach moved it on already)."""

    def detach(registrar: Any) -> None:
        if dataplane is not None and dataplane.registrar is registrar:
            dataplane.detach()

    return detach


def _sa_clock_watch(rebootstrap_at: float, log: logging.Logger) -> Callable[[], float]:
    """For the wait to an SA's re-bootstrap with registration off: a wall-clock
    step ahead (NTP correcting a clock that ran behind when the SA came)
    brings the SA's end nearer, so the wait is cut by the step times
    ``rebootstrap_at`` -- where the correct time would have put it, as the
    Registrar does with registration on (core/mn_registration.py
    ``clock_stepped``); a step back keeps the wait.  One WARNING per step.
    Before the twenty-seventh session this wait ignored steps: a clock 2 h
    behind when a 3-h SA came left the MN re-bootstrapping an hour after
    the SA's end (found in review)."""
    import time

    from mipsec.core.clockstep import ClockWatch, step_line
    from mipsec.core.roles.mn import mn_clock

    watch = ClockWatch(wall=time.time, mono=mn_clock)  # a suspend is no step

    def stepped() -> float:
        step = watch.check()
        if step is None:
            return 0.0
        log.warning("%s", step_line(step, "mn: "))
        return max(0.0, step) * rebootstrap_at

    return stepped


async def _unless_stopped(
    work: Coroutine[Any, Any, _T], stop: asyncio.Event, grace: float
) -> _T | None:
    """``work``'s result; once ``stop`` is set, ``grace`` seconds more at
    most, then ``work`` is cancelled and None returned."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()
    finally:
        stopped.cancel()
        if not task.done():  # this coroutine itself cancelled: work goes too
            task.cancel()


def _monotonic() -> float:
    import time

    return time.monotonic()


def _print_result(result: BootstrapResult, reg: Any = None) -> None:
    data = result_json(result)
    if result.ok:
        sa = data["sa"]
        print(
            f"status 200: SPI {sa['spi']} suite {sa['suite']} {sa['suite_id']} "
            f"scope {sa['scope']} valid until {sa['validity_end']}"
        )
        for k, v in data["bootstrap"].items():
            print(f"  {k}: {v}")
    else:
        print(f"bootstrap failed: status {result.status}: {result.reason}")
    if reg is not None:
        if reg.status is None:
            print(f"binding update: no acknowledgement ({reg.reason})")
        else:
            print(f"binding acknowledgement: status {reg.status}, lifetime {reg.lifetime} s")


# ---------------------------------------------------------------- commands


def cmd_role(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.role)
    _setup_logging(cfg)
    from mipsec.core.roles.preflight import preflight

    preflight(cfg, args.config)  # the same checks as check-config (core/roles/preflight.py)
    try:
        if args.role == "hac":
            assert isinstance(cfg, HACConfig)
            return asyncio.run(_run_hac(cfg, args.config))
        if args.role == "mn":
            assert isinstance(cfg, MNConfig)
            return asyncio.run(_run_mn(cfg, args.config, args.once, args.json, args.show_keys))
        assert isinstance(cfg, HAConfig)
        return asyncio.run(_run_ha(cfg, args.config))
    except ListenError as exc:
        # e.g. a port in use: the address, the port and the key that set it.
        raise ConfigError(args.config, exc.key, exc.reason) from None


def _guess_role(data: dict[str, Any], path: str) -> str:
    # mn.toml also has a [hac] table, hac.toml an [[ha]] array: test in this order.
    for role in ("mn", "hac", "ha"):
        if role in data:
            return role
    raise ConfigError(path, "(top level)", "cannot tell the role: no [hac], [mn] or [ha] table")


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate what a start validates (files, certificates and keys, file modes,
    plugins and their options), short of binding sockets; exit 2 where it would.

    ``-``: the configuration from standard input (a pipe from a template
    renderer), its relative paths taken from the working directory."""
    from mipsec.core.config import STDIN_NAME, read_stdin_toml, validate_config

    if args.file == "-":
        file = STDIN_NAME
        data = read_stdin_toml(sys.stdin.buffer)
        role = args.role or _guess_role(data, file)
        cfg = validate_config(data, role, file=file, base=Path.cwd())
    else:
        file = args.file
        role = args.role or _guess_role(load_toml(file), file)
        cfg = load_config(file, role)
    from mipsec.core.roles.preflight import check_services, preflight

    preflight(cfg, file)
    check_services(cfg, file)
    print(json.dumps({"role": role, "config": redacted(cfg)}, indent=2))
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    pm = pluginmanager.make_plugin_manager()
    rows = pluginmanager.describe(pm)
    if args.json:
        print(json.dumps([r.__dict__ | {"provides": dict(r.provides)} for r in rows], indent=2))
        return EXIT_OK
    for r in rows:
        print(f"{r.name}  ({r.distribution} {r.version}, {r.module})")
        for hook in r.hooks:
            names = r.provides.get(hook)
            print(f"    {hook}" + (f": {', '.join(names)}" if names else ""))
    return EXIT_OK


def _option_error(exc: ValueError) -> ConfigError:
    """``"--opt: why"`` from the lab setup, as the one-line error naming the option."""
    opt, _, why = str(exc).partition(": ")
    return (
        ConfigError("(command line)", opt, why)
        if why
        else ConfigError("(command line)", "(options)", opt)
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_init(args: argparse.Namespace) -> int:
    from mipsec.core.labsetup import LabExistsError, Usim, init_lab

    radius: tuple[str, int] | None = None
    secret_file: Path | None = None
    usim: Usim | None = None
    try:
        if args.radius is not None:
            host, _, port = args.radius.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError("--radius: expected HOST:PORT")
            radius = (host.strip("[]"), int(port))
        if args.radius_secret_file is not None:
            secret_file = Path(args.radius_secret_file).resolve()
            if not secret_file.is_file():
                raise ValueError(f"--radius-secret-file: no such file {str(secret_file)!r}")
        if args.usim is not None:
            usim = Usim.parse(args.usim, args.mnc_digits)
        # SIGTERM and SIGHUP end init as Ctrl-C does, through its
        # all-or-nothing cleanup: by the default action they left the staging
        # directory, keys included, and half the lab (found in review).
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        info = init_lab(
            Path(args.dir),
            hac_port=args.hac_port,
            ha_port=args.ha_port,
            radius=radius,
            radius_secret_file=secret_file,
            usim=usim,
            notice=lambda line: print(f"mipsec init: {line}", file=sys.stderr),
        )
    except LabExistsError as exc:
        # Nothing was written.  Re-keying an existing CA would silently break
        # every MN configured for it; any other file may be the operator's.
        raise ConfigError(args.dir, "(directory)", f"{exc}; init overwrites no file") from None
    except ValueError as exc:
        raise _option_error(exc) from None
    if args.json:
        print(json.dumps(info, indent=2))
    else:  # the HA first: the HAC's 200 waits for the HA to confirm the SA
        print(f"lab written to {args.dir}")
        print(f"  HA:  mipsec --role ha --config {info['ha']['config']}")
        print(f"  HAC: mipsec --role hac --config {info['hac']['config']}")
        print(f"  MN:  mipsec --role mn --config {info['mn']['config']} --once")
    return EXIT_OK


_DEMO_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _exit_on_signal(signum: int, frame: object) -> None:
    # The first ends the demo; the ones after it are ignored, so that they
    # cannot cut its cleanup short (a second SIGTERM raised out of the loop
    # stopping the roles, and left the HAC running in a deleted lab).
    for sig in _DEMO_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo's HA and HAC (and, with --data, its namespaces) are removed
    # by its ``finally``: a SIGTERM or SIGHUP (``timeout 60 mipsec demo``, a
    # closed terminal) must run it too, not end the demo by the default
    # action and leave both daemons running on their ports.
    for sig in _DEMO_SIGNALS:
        signal.signal(sig, _exit_on_signal)
    if getattr(args, "data", False):
        from mipsec.core.demo_data import run_data_demo

        return run_data_demo()
    from mipsec.core.demo import run_demo

    return run_demo(auth=args.auth)


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    role = argparse.ArgumentParser(
        prog="mipsec",
        description="RFC 6618 TLS-based Mobile IPv6 security: MN, HAC and HA.",
        epilog="other commands: mipsec check-config FILE | plugins | init DIR | demo | "
        "status | sas | bindings | revoke | unrevoke | reload (mipsec COMMAND --help)",
    )
    role.add_argument("--version", action="version", version=f"mipsec {version()}")
    role.add_argument(
        "--role", choices=("hac", "ha", "mn"), required=True, help="which role this process runs"
    )
    role.add_argument(
        "--config", required=True, metavar="FILE", help="the role's TOML configuration file"
    )
    role.add_argument("--once", action="store_true", help="MN: bootstrap once and exit")
    role.add_argument("--json", action="store_true", help="MN: print the outcome as JSON")
    role.add_argument("--show-keys", action="store_true", help="MN: include SA keys in output")

    cmds = argparse.ArgumentParser(prog="mipsec")
    sub = cmds.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "check-config",
        help="validate a config file as a start would (no socket bound), print it redacted",
    )
    p.add_argument("file", help="the configuration file to check; - reads it from standard input")
    p.add_argument(
        "--role", choices=("hac", "ha", "mn"), help="the file's role (default: guessed from it)"
    )
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("plugins", help="list loaded plugins and the hooks they provide")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("init", help="create a lab: test PKI, hac.toml, ha.toml, mn.toml")
    p.add_argument("dir", help="a new directory for the lab")
    p.add_argument("--hac-port", type=int, default=7872, help="HAC TCP port (default 7872)")
    p.add_argument("--ha-port", type=int, default=7873, help="HA UDP and TCP port (default 7873)")
    p.add_argument(
        "--radius",
        metavar="HOST:PORT",
        help="pass EAP of every realm but mipsec.test through to this RADIUS server",
    )
    p.add_argument(
        "--radius-secret-file", metavar="FILE", help="the RADIUS shared secret (with --radius)"
    )
    p.add_argument(
        "--usim",
        metavar="IMSI,KI,OPC,AMF,SQN",
        help="also write mn-aka.toml and mn-aka-prime.toml for this USIM subscriber",
    )
    p.add_argument(
        "--mnc-digits", type=int, choices=(2, 3), default=2, help="MNC length in the IMSI"
    )
    p.add_argument("--json", action="store_true", help="print the lab's facts as JSON")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser(
        "demo",
        help="init a lab in a temp dir, run an HA, a HAC and one MN through it",
        description="Init a lab in a temporary directory, start a real HA and a real HAC on "
        "loopback, run one MN through bootstrap and Binding Update, then stop both roles and "
        "remove the lab (also when ended by a signal).",
    )
    p.add_argument(
        "--data",
        action="store_true",
        help="(root) in network namespaces, then ping and TCP from the MN's home address",
    )
    p.add_argument(
        "--auth",
        choices=("psk", "eap-tls"),
        default="psk",
        help="how the MN authenticates: its PSK (default) or EAP-TLS with its certificate",
    )
    p.set_defaults(func=cmd_demo)
    ctlcli.add_parsers(sub)
    return role, cmds


BUILT_IN = ("check-config", "plugins", "init", "demo", *ctlcli.VERBS)


def plugin_commands(pm: Any = None) -> dict[str, Any]:
    """name -> ``CliCommand`` of every loaded plugin (``mipsec_cli_commands``)."""
    pm = pm if pm is not None else pluginmanager.make_plugin_manager()
    commands = pluginmanager.registry(pm, "mipsec_cli_commands")
    for name in commands:
        if name in BUILT_IN or name.startswith("-"):
            raise PluginError(f"mipsec_cli_commands: {name!r} is a built-in command or option")
    return commands


def run_plugin_command(command: Any, argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"mipsec {command.name}", description=command.help)
    command.add_arguments(parser)
    rc: int = command.run(parser.parse_args(argv))
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    role_parser, cmd_parser = build_parser()
    try:
        if argv and argv[0] == "--version":
            print(f"mipsec {version()}")
            return EXIT_OK
        if argv and argv[0] in BUILT_IN:
            args = cmd_parser.parse_args(argv)
            rc: int = args.func(args)
            return rc
        if argv and not argv[0].startswith("-"):
            command = plugin_commands().get(argv[0])
            if command is not None:
                return run_plugin_command(command, argv[1:])
        if not argv or argv[0] in ("-h", "--help"):
            role_parser.print_help()
            print()
            cmd_parser.print_help()
            try:
                extra = plugin_commands()
            except PluginError as exc:  # the help still shows; the broken plugin is named
                print(f"\ncommands added by plugins: unavailable: {exc}")
                extra = {}
            if extra:
                print("\ncommands added by plugins:")
                for name, command in sorted(extra.items()):
                    print(f"  {name:<20}{command.help}")
            return EXIT_OK if argv else EXIT_CONFIG
        return cmd_role(role_parser.parse_args(argv))
    except ConfigError as exc:
        print(f"mipsec: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (PluginError, CertificateError) as exc:
        print(f"mipsec: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        # e.g. a listener port already in use: say which, no traceback.
        print(f"mipsec: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except sqlite3.Error as exc:
        # A store or binding cache that cannot be written at start or stop
        # (full disk, I/O error): one line -- such messages carry no secret.
        print(f"mipsec: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
