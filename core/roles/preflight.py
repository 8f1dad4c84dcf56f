"""What a role validates before it serves, in one place for the start and ``check-config``.

``preflight(cfg, role, file)`` runs first on every start (core/cli.py) and in
``mipsec check-config``: every file a core config key names is readable, the
secret ones are private (core/secretfiles.py), certificates and keys load and
match, and an error names the file and the key that points to the problem
(``hac.toml: hac.cert: cannot read /etc/mipsec/hac.pem: No such file or
directory``).  ``check_services`` then builds the role's services exactly as a
start does -- plugins and their options, stores, credential backends,
provisioning transports -- with ``check_only`` set, so that nothing is created
and no socket is bound, and closes them again.  A start and ``check-config``
therefore fail (exit 2) on the same configurations, short of a port in use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mipsec.core import certexpiry, pluginmanager
from mipsec.core.config import HACConfig, HAConfig, MNConfig, ProvisioningListener
from mipsec.core.control import check_place, place_reason, revocations_path, socket_path
from mipsec.core.errors import CertificateError, ConfigError, LocalProtocolError
from mipsec.core.filedigest import UnreadableFileError, read_regular
from mipsec.core.secretfiles import InsecureFileError, check_private, check_private_sqlite
from mipsec.core.tls import hac_server_context, mn_client_context, server_cb_octets

__all__ = ["check_services", "file_error", "preflight"]

_Entry = tuple[str, Path]  # (config key, path)


def preflight(cfg: BaseModel, config_file: str) -> None:
    """Validate the files ``cfg`` names; raise :class:`ConfigError` naming file and key."""
    if isinstance(cfg, HACConfig):
        _hac(cfg, config_file)
    elif isinstance(cfg, HAConfig):
        _ha(cfg, config_file, "")
    elif isinstance(cfg, MNConfig):
        _mn(cfg, config_file)
    else:  # pragma: no cover - load_config only returns the three models
        raise LocalProtocolError(f"preflight: unknown config model {type(cfg).__name__}")


def check_services(cfg: BaseModel, config_file: str) -> None:
    """Build the role's services as a start would (check-only: create nothing), then close."""
    from mipsec.core.roles.ha import HaService
    from mipsec.core.roles.hac import HacService

    built: list[Any] = []
    try:
        if isinstance(cfg, HACConfig):
            if cfg.local_ha is not None:
                built.append(HaService(cfg.local_ha, config_file, check_only=True))
            built.append(HacService(cfg, config_file=config_file, check_only=True))
        elif isinstance(cfg, HAConfig):
            built.append(HaService(cfg, config_file, check_only=True))
        else:
            # The MN builds nothing ahead of a bootstrap (preflight covered
            # it), but its daemon opens a control socket: checked here, not
            # in preflight, which its start runs too -- with --once it opens
            # none, and without, ``start_control`` checks the same place.
            assert isinstance(cfg, MNConfig)
            _control(cfg, config_file, "mn")
        # What a start would warn about: certificates expired or due soon.
        now = datetime.now(UTC)
        for svc in built:
            role = "hac" if isinstance(svc, HacService) else "ha"
            certexpiry.report(logging.getLogger(f"mipsec.{role}"), role, svc.certificates(), now)
    finally:
        if built:
            asyncio.run(_stop(built))


async def _stop(services: Sequence[Any]) -> None:
    for svc in reversed(services):
        await svc.stop()


# ---------------------------------------------------------------- roles


def _hac(cfg: HACConfig, file: str) -> None:
    svc = cfg.hac
    _tls(
        file,
        [("hac.cert", svc.cert), ("hac.key", svc.key)],
        lambda: (
            hac_server_context(svc.cert, svc.key, strict_rfc6618=svc.strict_rfc6618),
            server_cb_octets(svc.cert),
        ),
    )
    if cfg.provisioning is not None:
        _listener(file, "provisioning.", cfg.provisioning)
    if cfg.local_ha is not None:
        _ha(cfg.local_ha, file, "local_ha.")
    _control(cfg, file, "hac")
    # The revocation list is written only when an operator revokes: an
    # unwritable directory passed the start and failed `mipsec revoke`, the
    # emergency action, when it was needed (found in review).
    _writable_place(file, "revocations.path", revocations_path(cfg, file))


def _ha(cfg: HAConfig, file: str, prefix: str) -> None:
    if cfg.provisioning is not None:
        _listener(file, f"{prefix}provisioning.", cfg.provisioning)
    pull = cfg.pull
    if pull is not None:
        from mipsec.core.roles.provserver import client_context

        _tls(
            file,
            [(f"{prefix}pull.cert", pull.cert), (f"{prefix}pull.key", pull.key)],
            lambda: client_context(pull.ca, pull.cert, pull.key),
            public=[(f"{prefix}pull.ca", pull.ca)],
        )
    if cfg.bindings.path is not None:
        _writable_place(file, f"{prefix}bindings.path", cfg.bindings.path)
        _private(file, f"{prefix}bindings.path", cfg.bindings.path, sqlite=True)
    if not prefix:  # an HA in the HAC's process has no control socket of its own
        _control(cfg, file, "ha")


def _mn(cfg: MNConfig, file: str) -> None:
    hac = cfg.hac
    _tls(file, [], lambda: mn_client_context(hac.ca), public=[("hac.ca", hac.ca)])
    pm = pluginmanager.make_plugin_manager(cfg.plugins.disable)
    # What the MN's start builds: the method's peer factory from its options
    # ([eap] for eap), so a wrong option fails here too, naming the key.
    # Imported here: the HAC's and the HA's starts run this module too, and
    # the MN role's code is a tenth of a second of imports they do not need.
    from mipsec.core.roles.mn import mn_secret, peer_factory

    peer_factory(cfg, pm, file, check_only=True)
    if cfg.mn.psk_file is not None:
        _readable(file, "mn.psk_file", cfg.mn.psk_file)
        _private(file, "mn.psk_file", cfg.mn.psk_file)
    secret = mn_secret(cfg, file)  # ConfigError naming mn.psk_file when it is not hex
    if cfg.mn.method == "psk" and not secret:
        if cfg.mn.psk_file is not None:
            raise ConfigError(file, "mn.psk_file", f"{cfg.mn.psk_file} holds no key")
        raise ConfigError(file, "mn.psk_hex", "method psk needs psk_hex or psk_file")


# ---------------------------------------------------------------- helpers


def _control(cfg: HACConfig | HAConfig | MNConfig, file: str, role: str) -> None:
    """The control socket's place, as ``start_control`` will use it, with its
    check (``check_place``) and its words: found in review, a missing
    directory or a path naming a regular file passed check-config and failed
    the start (and an MN's configured path was not looked at).

    The MN's default path is no error (its start warns and runs without a
    socket), and neither is a configured path's missing directory: that is a
    WARNING, since the example unit's ``RuntimeDirectory`` (``/run/mipsec-mn``)
    exists only while the MN runs."""
    if not cfg.control.enabled:
        return
    try:
        path = socket_path(cfg, role, file)
    except ConfigError:
        if cfg.control.path is not None:
            raise
        return  # only the default is too long: the start warns and runs without
    if role == "mn" and cfg.control.path is None:
        return
    try:
        check_place(path)
    except FileNotFoundError as exc:
        if role != "mn":
            raise ConfigError(file, "control.path", place_reason(path, exc)) from None
        logging.getLogger("mipsec.mn").warning(
            "%s: control.path: %s: the MN's start fails unless it exists by then "
            "(systemd creates a RuntimeDirectory at start)",
            file,
            place_reason(path, exc),
        )
    except OSError as exc:
        raise ConfigError(file, "control.path", place_reason(path, exc)) from None


def _writable_place(file: str, key: str, path: Path) -> None:
    """``path`` can be created (or written) by this process: its directory exists."""
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(file, key, f"no such directory {str(parent)!r}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(file, key, f"cannot create files in {str(parent)!r}: permission denied")


def _listener(file: str, prefix: str, cfg: ProvisioningListener) -> None:
    _tls(
        file,
        [(f"{prefix}cert", cfg.cert), (f"{prefix}key", cfg.key)],
        lambda: hac_server_context(
            cfg.cert, cfg.key, client_ca_file=cfg.client_ca, require_client_cert=True
        ),
        public=[(f"{prefix}client_ca", cfg.client_ca)],
    )


def _tls(
    file: str,
    pair: list[_Entry],
    build: Callable[[], object],
    *,
    public: Sequence[_Entry] = (),
) -> None:
    """``pair`` = [(cert key, path), (private key key, path)] or []; ``build`` loads them."""
    entries = [*pair, *public]
    for key, path in entries:
        _readable(file, key, path)
    if pair:
        _private(file, pair[1][0], pair[1][1])
    try:
        build()
    except CertificateError as exc:
        raise ConfigError(file, _blame(str(exc), entries), str(exc)) from None
    except (ssl.SSLError, OSError) as exc:  # anything core.tls did not already word
        raise ConfigError(file, entries[0][0], f"cannot load: {exc}") from None


def file_error(file: str, exc: Exception, entries: Sequence[_Entry]) -> ConfigError:
    """``ConfigError`` naming the key of ``entries`` (config key, path) whose
    file ``exc`` -- an ``UnreadableFileError`` (keyed by its last dotted
    part) or a ``CertificateError`` (whose message starts with the path) --
    is about: for what a reload loads after ``preflight`` checked it."""
    if isinstance(exc, UnreadableFileError):
        key = next((k for k, _ in entries if k.rsplit(".", 1)[-1] == exc.key), entries[0][0])
        return ConfigError(file, key, str(exc).split(": ", 1)[1])
    return ConfigError(file, _blame(str(exc), entries), str(exc))


def _blame(message: str, entries: Sequence[_Entry]) -> str:
    """The config key whose file a core.tls message starts with (it names the file first)."""
    best = ""
    key = entries[0][0]
    for k, path in entries:
        text = os.fspath(path)
        if message.startswith(text) and len(text) > len(best):
            best, key = text, k
    return key


def _readable(file: str, key: str, path: Path) -> None:
    # A regular file of sane size: a FIFO named by mistake would otherwise
    # block the start -- or a running role's event loop, at a reload.
    try:
        read_regular(path)
    except OSError as exc:
        raise ConfigError(file, key, f"cannot read {path}: {exc.strerror or exc}") from None


def _private(file: str, key: str, path: Path, *, sqlite: bool = False) -> None:
    try:
        (check_private_sqlite if sqlite else check_private)(path)
    except InsecureFileError as exc:
        raise ConfigError(file, key, str(exc)) from None
