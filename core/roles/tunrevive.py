"""A TUN device removed under a running data plane, created again.

After ``ip link del`` (an operator, a network manager) the device's
descriptor polls readable for ever and every read or write fails with
EBADFD (core/tun.py ``TunGoneError``).  Both data planes -- the HA's
(roles/ha_data.py) and the MN's (roles/mn_data.py) -- stop reading it and
hand it to :class:`TunReviver`, which closes it (the writer first: its
descriptor number is the next open's), logs one ERROR, and creates the
device again every ``RECREATE_S`` seconds with what the data plane puts on
it; a failed attempt is one WARNING per outage, not one per try.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mipsec.core.errors import ConfigError
from mipsec.core.outage import Outage
from mipsec.core.tun import TunDevice, TunGoneError, TunWriter

__all__ = ["RECREATE_S", "TunReviver"]

RECREATE_S = 5.0  # seconds between two attempts to create the device again


class TunReviver:
    """``lost`` a device, then ``open_device()`` every ``RECREATE_S`` until it
    works; ``on_back(tun)`` then puts the data plane on it.  ``counts``
    gets ``tun_lost``; ``dropped`` says what is dropped meanwhile."""

    def __init__(
        self,
        name: str,
        open_device: Callable[[], TunDevice],
        on_back: Callable[[TunDevice], None],
        counts: dict[str, int],
        log: logging.Logger,
        dropped: str,
    ) -> None:
        self._open_device, self._on_back = open_device, on_back
        self.counts, self.log, self.dropped = counts, log, dropped
        counts["tun_lost"] = 0
        self._timer: asyncio.TimerHandle | None = None
        self._failing = Outage(
            log, f"creating the TUN device {name} again", f"retried every {RECREATE_S:g} s"
        )

    def lost(self, tun: TunDevice, writer: TunWriter | None, exc: TunGoneError) -> None:
        """``tun`` is gone (its reader already removed by the caller)."""
        if writer is not None:
            writer.close()  # a flush it has scheduled must not write to a reused fd
        tun.close()
        self.counts["tun_lost"] += 1
        self.log.error(
            "data plane: TUN device %s is gone (%s): %s is dropped; creating it again every %g s",
            tun.name,
            exc.strerror,
            self.dropped,
            RECREATE_S,
        )
        self._schedule()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(RECREATE_S, self.try_now)

    def try_now(self) -> None:
        """One attempt (the timer's; a test may call it)."""
        self._timer = None
        try:
            tun = self._open_device()
        except ConfigError as exc:  # e.g. the name taken by another process meanwhile
            self._failing.failed(f"{exc.key}: {exc.reason}", logging.WARNING)
            self._schedule()
            return
        self._failing.failing = False  # the line below says it works again
        self.log.warning("data plane on %s again: the device was created anew", tun.name)
        self._on_back(tun)
