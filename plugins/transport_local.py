"""``local`` HA provisioning transport: HAC and HA in one process (model 1).

An in-process HA registers a receiver under its ``ha_id``; the HAC's
``provision`` hands the SA to it directly.  When no HA of that id runs in the
process, provisioning fails (the MN gets 504): an SPI no HA knows is never
announced as live.  The network transport is ``tls`` (PROFILE §9).
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
    """Fail closed: with no HA of that id running in this process, nothing is
    confirmed (the HAC answers 504 and takes the SA back)."""

    # The HA's install runs to completion inside the call (no I/O, no wait):
    # the HAC arms no provisioning deadline around it.
    in_process = True

    def _entry(self, ha: HomeAgentInfo) -> tuple[Receiver, Withdrawer]:
        entry = _RECEIVERS.get(ha.ha_id)
        if entry is None:
            raise ConnectionRefusedError(f"no HA {ha.ha_id!r} runs in this process")
        return entry

    async def provision(self, ha: HomeAgentInfo, issued: IssuedSA, timeout: float) -> None:
        await self._entry(ha)[0](issued)

    async def withdraw(self, ha: HomeAgentInfo, spi: int, timeout: float) -> None:
        await self._entry(ha)[1](spi)


class LocalTransportFactory:
    name = "local"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> LocalTransport:
        if options:
            raise ValueError(f"{sorted(options)[0]}: the local transport takes no options")
        return LocalTransport()


@hookimpl
def mipsec_provisioning_transports() -> Sequence[Factory]:
    return [LocalTransportFactory()]
