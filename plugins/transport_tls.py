"""``tls`` HA provisioning transport: the network transport of PROFILE §9.

The HAC (TLS client, with its client certificate) hands each new SA to the
chosen HA (TLS server) as an ``install`` request and waits for
``status-code: 200`` before it answers the MN; ``withdraw`` makes the HA
forget an SA that must not stay live.  Messages: core/provisioning.py;
connections: ``ProvisioningClient`` in core/roles/provserver.py (idle
connections are kept and reused, one TLS handshake per burst rather than per
SA).

Options (the ``options`` table of an ``[[ha]]`` entry)::

    host        = "192.0.2.10"       # the HA's provisioning listener
    port        = 7873
    server_name = "ha.example.net"   # optional: absent = the HA cert is checked by IP SAN
    ca          = "ca.pem"           # CA of the HA's certificate (the only trust anchor)
    cert        = "hac-client.pem"   # the HAC's client certificate ...
    key         = "hac-client.key"   # ... and its key
    timeout     = 5                  # seconds; the HAC's provisioning_timeout also bounds it
    pipeline    = 16                 # requests in flight per connection; 1 = lockstep

A client certificate, key or CA renewed in place is taken by the HAC's next
reload (``stale()``): the transport is built again for new connections, and
the one it replaces is closed once its requests are over.

Requests are pipelined (issue 9): written on a kept connection while earlier
ones still wait for their answers, which the HA gives in order.  An HA
implementation that reads one request at a time still works (TCP holds the
next one); ``pipeline = 1`` is for one that cannot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from mipsec.core.confvalues import Host
from mipsec.core.errors import CertificateError
from mipsec.core.filedigest import FileDigests
from mipsec.core.hookspecs import Factory, PluginContext, hookimpl
from mipsec.core.model import HomeAgentInfo, IssuedSA
from mipsec.core.provisioning import (
    OK,
    ProvisioningFailed,
    ProvResponse,
    encode_install,
    encode_withdraw,
)
from mipsec.core.roles.provserver import PIPELINE, ProvisioningClient, client_context
from mipsec.core.secretfiles import InsecureFileError, check_private
from mipsec.core.tls import load_server_chain
from mipsec.plugins._options import parse_options, resolve_path


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Host
    port: Annotated[int, Field(ge=1, le=65535)]
    server_name: Host | None = None
    ca: str = Field(min_length=1)
    cert: str = Field(min_length=1)
    key: str = Field(min_length=1)
    timeout: Annotated[float, Field(gt=0, le=3600)] = 5.0
    pipeline: Annotated[int, Field(ge=1, le=128)] = PIPELINE


def _for_ha(issued: IssuedSA, ha: HomeAgentInfo) -> IssuedSA:
    """The install names the HA it is meant for: the one this transport
    serves.  The HAC's SAs name it already (no copy per bootstrap)."""
    if issued.sa.ha_id == ha.ha_id:
        return issued
    return IssuedSA(dataclasses.replace(issued.sa, ha_id=ha.ha_id), issued.bootstrap)


class TlsTransport:
    """One HA's provisioning client (the HAC builds one per ``[[ha]]`` entry)."""

    def __init__(
        self,
        client: ProvisioningClient,
        timeout: float,
        files: FileDigests | None = None,
        not_after: datetime | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.files = files
        self.not_after = not_after

    def certificates(self) -> dict[str, datetime]:
        """The HAC's client certificate's notAfter (core/certexpiry.py)."""
        return {"cert": self.not_after} if self.not_after is not None else {}

    def stale(self) -> bool:
        """Whether ``ca``, ``cert`` or ``key`` hold something else now than
        this transport was built from (a renewed client certificate), or
        cannot be read: the HAC's next reload builds it again
        (core/reload.py)."""
        return self.files is not None and self.files.changed()

    def __repr__(self) -> str:
        return f"TlsTransport({self.client.host}:{self.client.port})"

    async def provision(self, ha: HomeAgentInfo, issued: IssuedSA, timeout: float) -> None:
        content = encode_install(_for_ha(issued, ha))
        await self._confirm(ha, "install", issued.sa.spi, content, timeout)

    async def withdraw(self, ha: HomeAgentInfo, spi: int, timeout: float) -> None:
        await self._confirm(ha, "withdraw", spi, encode_withdraw(spi), timeout)

    def stats(self) -> dict[str, int]:
        """Connections to this HA, for ``mipsec status``: ``connects``,
        ``requests``, ``retries`` since start; ``open`` connections and
        requests ``in_flight`` now."""
        return self.client.snapshot()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _confirm(
        self, ha: HomeAgentInfo, op: str, spi: int, content: bytes, timeout: float
    ) -> ProvResponse:
        response = await self.client.request(content, min(timeout, self.timeout))
        if response.status != OK:
            reason = f" ({response.reason})" if response.reason else ""
            raise ProvisioningFailed(
                f"HA {ha.ha_id} refused {op} of spi={spi}: {response.status}{reason}",
                response.status,
            )
        return response


class TlsTransportFactory:
    name = "tls"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> TlsTransport:
        opts = parse_options(_Options, options)
        paths: dict[str, Path] = {
            k: resolve_path(getattr(opts, k), ctx.base_dir) for k in ("ca", "cert", "key")
        }
        try:
            check_private(paths["key"])  # the HAC's private key
        except InsecureFileError as exc:
            raise ValueError(f"key: {exc}") from None
        files = FileDigests(paths.items())  # before the context: core/filedigest.py
        try:
            ssl_context = client_context(paths["ca"], paths["cert"], paths["key"])
            not_after = load_server_chain(paths["cert"])[0].not_valid_after_utc
        except CertificateError as exc:
            key = "ca" if str(exc).startswith(str(paths["ca"])) else "cert"
            raise ValueError(f"{key}: {exc}") from None
        client = ProvisioningClient(
            opts.host,
            opts.port,
            server_name=opts.server_name,
            ssl_context=ssl_context,
            pipeline=opts.pipeline,
        )
        return TlsTransport(client, opts.timeout, files, not_after)


@hookimpl
def mipsec_provisioning_transports() -> Sequence[Factory]:
    return [TlsTransportFactory()]
