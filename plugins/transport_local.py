"""``local`` HA provisioning transport: HAC and HA in one process (model 1).

An in-process HA registers a receiver under its ``ha_id``; the HAC's
``provision`` hands the SA to it directly.  When no HA of that id runs in the
process, the transport confirms without delivery: the co-located HA then
reads the SA from the shared SA store (same SQLite file), which already holds
it.  The asynchronous network transport is ``tls`` (PROFILE §9).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from mipsec.core.hookspecs import Factory, PluginContext, hookimpl
from mipsec.core.model import HomeAgentInfo, IssuedSA

Receiver = Callable[[IssuedSA], Awaitable[None]]
Withdrawer = Callable[[int], Awaitable[None]]

_RECEIVERS: dict[str, tuple[Receiver, Withdrawer]] = {}


def register_local_ha(ha_id: str, receive: Receiver, withdraw: Withdrawer) -> None:
    _RECEIVERS[ha_id] = (receive, withdraw)


def unregister_local_ha(ha_id: str) -> None:
    _RECEIVERS.pop(ha_id, None)


class LocalTransport:
    async def provision(self, ha: HomeAgentInfo, issued: IssuedSA, timeout: float) -> None:
        entry = _RECEIVERS.get(ha.ha_id)
        if entry is not None:
            await entry[0](issued)

    async def withdraw(self, ha: HomeAgentInfo, spi: int, timeout: float) -> None:
        entry = _RECEIVERS.get(ha.ha_id)
        if entry is not None:
            await entry[1](spi)


class LocalTransportFactory:
    name = "local"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> LocalTransport:
        if options:
            raise ValueError(f"{sorted(options)[0]}: the local transport takes no options")
        return LocalTransport()


@hookimpl
def mipsec_provisioning_transports() -> Sequence[Factory]:
    return [LocalTransportFactory()]
