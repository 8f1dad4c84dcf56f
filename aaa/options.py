"""Options shared by the RADIUS plugins: servers, shared secrets, timing, NAS identity.

A server's shared secret comes from exactly one of ``secret`` (in the
configuration), ``secret_env`` (the name of an environment variable) or
``secret_file`` (a file whose first line is the secret; relative paths
resolve against the configuration directory).  Secrets never appear in an
error message, a repr or a log line.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from mipsec.aaa.radius import RadiusClient, RadiusServer
from mipsec.core.filedigest import read_regular
from mipsec.core.secretfiles import check_private_option
from mipsec.plugins._options import resolve_path

__all__ = ["ClientOptions", "ServerOptions", "make_client", "nas_attributes"]

MAX_SECRET_FILE = 4096


class ServerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: Annotated[int, Field(ge=1, le=65535)] | None = None  # default: the service's port
    secret: SecretStr | None = None
    secret_env: str | None = Field(default=None, min_length=1)
    secret_file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_secret(self) -> ServerOptions:
        given = [self.secret, self.secret_env, self.secret_file]
        if sum(v is not None for v in given) != 1:
            raise ValueError("exactly one of secret, secret_env and secret_file is required")
        return self


class ClientOptions(BaseModel):
    """Keys every RADIUS plugin table accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    servers: list[ServerOptions] = Field(min_length=1)
    # Worst case per server: (1 + retries) x timeout; with the defaults two
    # servers fit in the HAC's default 10 s EAP timeout ([methods.eap] timeout).
    timeout: Annotated[float, Field(gt=0, le=60)] = 2.0  # seconds before each retransmission
    retries: Annotated[int, Field(ge=0, le=10)] = 1  # retransmissions after the first send
    dead_time: Annotated[float, Field(ge=0, le=86400)] = 30.0  # hold-off of a silent server
    max_sockets: Annotated[int, Field(ge=1, le=256)] = 16  # per server: 256 requests each
    # RFC 2865 §5.4/§5.32: an Access-Request carries NAS-IP-Address or
    # NAS-Identifier; NAS-IPv6-Address is RFC 3162's.
    nas_identifier: str | None = Field(default="mipsec-hac", min_length=1, max_length=253)
    nas_ip_address: ipaddress.IPv4Address | None = None
    nas_ipv6_address: ipaddress.IPv6Address | None = None


def _secret(s: ServerOptions, key: str, base_dir: Path) -> bytes:
    if s.secret is not None:
        value = s.secret.get_secret_value().encode("utf-8")
        where = f"{key}.secret"
    elif s.secret_env is not None:
        where = f"{key}.secret_env"
        env = os.environ.get(s.secret_env)
        if env is None:
            raise ValueError(f"{where}: environment variable {s.secret_env} is not set")
        value = env.encode("utf-8")
    else:
        assert s.secret_file is not None
        where = f"{key}.secret_file"
        path = resolve_path(s.secret_file, base_dir)
        # The shared secret forges Access-Accepts and opens the MPPE keys
        # that carry the MSK: a secret file (core/secretfiles.py).
        check_private_option(path, where)
        try:
            # A regular file only: a FIFO would block the event loop a
            # reload's stale() check runs on (core/filedigest.py).
            data = read_regular(path, MAX_SECRET_FILE)
        except OSError as exc:
            raise ValueError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
        value = data.splitlines()[0] if data.strip(b"\r\n") else b""
    if not value:
        raise ValueError(f"{where}: the shared secret is empty")
    return value


def secrets_changed(opts: ClientOptions, base_dir: Path, client: RadiusClient) -> bool:
    """Whether a ``secret_file`` now holds another secret than ``client`` was
    built with, or cannot be read (a rebuild then names the file and why).
    ``secret`` changes with the configuration file, ``secret_env`` only
    with a restart."""
    for i, (s, server) in enumerate(zip(opts.servers, client.configs, strict=True)):
        if s.secret_file is None:
            continue
        try:
            now = _secret(s, f"servers[{i}]", base_dir)
        except ValueError:
            return True
        if not hmac.compare_digest(now, server.secret):
            return True
    return False


def make_client(
    opts: ClientOptions, base_dir: Path, default_port: int, *, status_server: bool = False
) -> RadiusClient:
    """The servers with their secrets loaded, as one client; ValueError("key: reason").
    ``status_server``: probe a silent server before holding it off (RadiusClient)."""
    servers: list[RadiusServer] = []
    for i, s in enumerate(opts.servers):
        key = f"servers[{i}]"
        servers.append(RadiusServer(s.host, s.port or default_port, _secret(s, key, base_dir)))
    labels = [s.label for s in servers]
    if len(set(labels)) != len(labels):
        raise ValueError("servers: the same host and port appear twice")
    return RadiusClient(
        servers,
        timeout=opts.timeout,
        retries=opts.retries,
        dead_time=opts.dead_time,
        max_sockets=opts.max_sockets,
        status_server=status_server,
    )


def nas_attributes(opts: ClientOptions) -> list[tuple[str, Any]]:
    """NAS-Identifier / NAS-IP-Address / NAS-IPv6-Address as configured."""
    out: list[tuple[str, Any]] = []
    if opts.nas_identifier is not None:
        out.append(("NAS-Identifier", opts.nas_identifier))
    if opts.nas_ip_address is not None:
        out.append(("NAS-IP-Address", str(opts.nas_ip_address)))
    if opts.nas_ipv6_address is not None:
        out.append(("NAS-IPv6-Address", str(opts.nas_ipv6_address)))
    return out
