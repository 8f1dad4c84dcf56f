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
from pathlib import Path

import pluggy

from mipsec.core import pluginmanager
from mipsec.core.authmethod import PeerMethodContext
from mipsec.core.config import MNConfig
from mipsec.core.errors import CertificateError, ConfigError
from mipsec.core.mn_exchange import BootstrapResult, Finished, MnExchange, SendRequest
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


async def bootstrap(
    cfg: MNConfig, *, pm: pluggy.PluginManager | None = None, config_file: str = "<memory>"
) -> BootstrapResult:
    """Run one bootstrap with the HAC; never raises for network or peer faults."""
    pm = pm or pluginmanager.make_plugin_manager(cfg.plugins.disable)
    methods = pluginmanager.registry(pm, "mipsec_auth_methods")
    method = methods.get(cfg.mn.method)
    if method is None:
        raise ConfigError(config_file, "mn.method", f"no plugin provides {cfg.mn.method!r}")
    secret = mn_secret(cfg, config_file)
    hac = cfg.hac
    ctx = mn_client_context(str(hac.ca), strict_rfc6618=hac.strict_rfc6618)
    server_name = hac.server_name
    if server_name is not None and _is_ip(server_name):
        server_name = None
    tls_name = server_name or hac.host
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                hac.host, hac.port, ssl=ctx, server_hostname=tls_name,
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
                der, server_name=server_name, connected_ip=None if server_name else peer_ip
            )
            cb = mn_cb_octets(der)
        except CertificateError as exc:
            return BootstrapResult(None, False, reason=f"HAC certificate refused: {exc}")
        log.debug("TLS %s with %s", ssl_obj.version() if ssl_obj else "?", tls_name)
        peer = method.peer(PeerMethodContext(mn_id=cfg.mn.mn_id, cb_octets=cb, secret=secret))
        exch = MnExchange(
            mn_id=cfg.mn.mn_id, method_name=method.name, method=peer, cb_octets=cb,
            scope=cfg.sa.scope, suitelist=[int(s) for s in cfg.sa.suites],
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
