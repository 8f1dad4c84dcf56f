"""The MN daemon's wait before its next bootstrap, and SIGUSR1 cutting it.

Asyncio shell, clock injected.  The wait runs on the MN's registration
clock (``mipsec.core.roles.mn.mn_clock``: CLOCK_BOOTTIME on Linux), which
counts a suspended host's sleep: a laptop that slept through the wait
bootstraps on waking, within ``SLICE`` seconds.  asyncio's own timers run on
the monotonic clock, which stops during a suspend: a wait of 48 min (80 %
of an SA, when registration is off) or a backoff that a suspend
interrupted ran on for its whole monotonic length after the host woke,
with the SA already ended at the HA.

SIGUSR1 is the operator's "bootstrap now" (an MN whose HAC was fixed need
not wait out its backoff).  Two limits keep a flood of signals (a link-up
hook on a flapping link, a script in a loop) from turning the backoff off:
a wait is cut at most once per ``min_gap`` ([hac] retry_min), and never
below a 503's retry-after -- the HAC asked for that wait because it is
overloaded, and a thousand MNs told to "bootstrap now" must not all come
back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

__all__ = ["SLICE", "BootstrapWait"]

# Longest sleep between two looks at the clock: how late a wait may end
# after the host woke from a suspend.
SLICE = 1.0


class BootstrapWait:
    """``pause`` waits; ``cut`` (SIGUSR1) and ``stop`` end a wait early."""

    def __init__(self, clock: Callable[[], float], min_gap: float) -> None:
        self._clock = clock
        self.min_gap = min_gap
        self._wake = asyncio.Event()  # a cut or the stop
        self._stop = asyncio.Event()
        self.waiting = False
        self._hac_until = 0.0  # clock time before which the HAC's retry-after holds
        self._last_cut = float("-inf")  # clock time of the last cut

    def stop(self) -> None:
        """End the wait under way and every later one at once (SIGTERM)."""
        self._stop.set()
        self._wake.set()

    def cut(self) -> str:
        """SIGUSR1: cut the wait under way if the limits allow; the line to log."""
        now = self._clock()
        if not self.waiting:
            return "mn: SIGUSR1 ignored: not waiting to bootstrap (nothing to cut)"
        if now - self._last_cut < self.min_gap:
            return (
                f"mn: SIGUSR1 ignored: the last one cut a wait {now - self._last_cut:.1f} s "
                f"ago (one per [hac] retry_min, {self.min_gap:g} s)"
            )
        self._last_cut = now
        self._wake.set()
        if now < self._hac_until:
            return (
                "mn: SIGUSR1: the wait is cut to the HAC's retry-after: bootstrapping in "
                f"{self._hac_until - now:.1f} s"
            )
        return "mn: SIGUSR1: the wait is cut, bootstrapping now"

    async def pause(
        self,
        seconds: float,
        hac_seconds: float = 0.0,
        *,
        stepped: Callable[[], float] | None = None,
    ) -> None:
        """Wait ``seconds`` before the next bootstrap, less after ``stop`` or
        ``cut`` -- but, ``stop`` aside, never less than ``hac_seconds`` (the
        part of the wait the HAC's retry-after asked for).  ``stepped``,
        called at every look at the clock: seconds to take off the wait now
        (a wall-clock step that brought an SA's end nearer), 0 if none."""
        if self._stop.is_set():
            return
        self._wake.clear()
        start = self._clock()
        self._hac_until = start + min(hac_seconds, seconds)
        self.waiting = True
        try:
            await self._until(start + seconds, self._wake, stepped)
            await self._until(self._hac_until, self._stop)
        finally:
            self.waiting = False
            self._hac_until = 0.0

    async def _until(
        self, end: float, event: asyncio.Event, stepped: Callable[[], float] | None = None
    ) -> None:
        """Until ``end`` on the clock or ``event``, looking at the clock at
        least every SLICE seconds (``stepped``: see ``pause``)."""
        while not event.is_set():
            if stepped is not None:
                end -= max(0.0, stepped())
            left = end - self._clock()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, SLICE))
