"""A few lines per second for one kind of event; the rest summed up in one.

Some events are worth a line each when they are rare and a flood when they
come in a mass: an HA that lost its store and is then sent 100,000
withdrawals of SPIs it never held logged 100,000 "unknown here" lines
(measured 2026-12-05).  :class:`LineBurst` lets ``limit`` lines through per
``window`` seconds; the others go to DEBUG, and one line says how many there
were when the window closes (on the event loop's timer, so the count is
said even when the burst is over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

__all__ = ["LineBurst"]


class LineBurst:
    __slots__ = (
        "_clock",
        "_end",
        "_held",
        "_level",
        "_lines",
        "_timer",
        "limit",
        "log",
        "what",
        "window",
    )

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        limit: int = 16,
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.what, self.limit, self.window = log, what, limit, window
        self._clock = clock
        self._end = -1.0  # the current window ends then
        self._lines = 0  # events in the current window
        self._held = 0  # of which not logged at their own level
        self._level = logging.INFO
        self._timer: asyncio.TimerHandle | None = None

    def line(self, level: int, msg: str, *args: object) -> None:
        now = self._clock()
        if now >= self._end:
            self.close()
            self._end = now + self.window
        self._lines += 1
        if self._lines <= self.limit:
            self.log.log(level, msg, *args)
            return
        self.log.debug(msg, *args)
        self._held += 1
        self._level = max(self._level, level) if self._held > 1 else level
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: said at the next event after the window
            self._timer = loop.call_later(max(0.0, self._end - now), self.close)

    def close(self) -> None:
        """Say how many lines the window held back (the timer, or a stop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self.log.log(
                self._level,
                "%d more %s in %g s (one line each at DEBUG)",
                self._held,
                self.what,
                self.window,
            )
        self._held = 0
        self._lines = 0
        self._end = -1.0
