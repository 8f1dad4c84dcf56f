"""A step of the wall clock, told apart from time passing.

SA validity ends are wall-clock dates (PROFILE §3 ``mip6-sa-validity-end``,
RFC 1123), while every timer of mipsec runs on the monotonic clock.  When
NTP steps a clock that booted hours wrong (no RTC, a VM restored from a
snapshot), an operator runs ``date -s``, or the host was suspended, every SA
may end at once -- or live that much longer -- and nothing said why: a HAC
with 100,000 live SAs then logged 100,000 ``sa_expired`` lines, and its MNs
came back together (measured 2026-12-06, libfaketime stepping a running
HAC's clock 2 h ahead).

``ClockWatch.check``, called from a role's periodic timer, returns the step
-- wall-clock progress minus monotonic progress since the previous call --
when it is at least ``threshold``; the role says it in one line.  NTP's
slewing (at most 500 ppm: 15 ms over a 30 s timer) never comes near it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["STEP_THRESHOLD", "ClockWatch", "step_line", "step_text"]

STEP_THRESHOLD = 10.0  # seconds


class ClockWatch:
    __slots__ = ("_mono", "_seen_mono", "_seen_wall", "_wall", "threshold")

    def __init__(
        self,
        threshold: float = STEP_THRESHOLD,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold: {threshold!r} is not a positive number of seconds")
        self.threshold = threshold
        self._wall, self._mono = wall, mono
        self._seen_wall, self._seen_mono = wall(), mono()

    def check(self) -> float | None:
        """The wall clock's step since the last call (seconds, negative:
        back), or None when it kept pace with the monotonic clock."""
        wall, mono = self._wall(), self._mono()
        step = (wall - self._seen_wall) - (mono - self._seen_mono)
        self._seen_wall, self._seen_mono = wall, mono
        return step if abs(step) >= self.threshold else None


def step_text(step: float) -> str:
    """``"2.0 h"``, ``"40 s"``: the size of a step for a log line."""
    size = abs(step)
    if size >= 5400:
        return f"{size / 3600:.1f} h"
    if size >= 120:
        return f"{size / 60:.0f} min"
    return f"{size:.0f} s"


def step_line(step: float, who: str) -> str:
    """The one line a role logs for ``step`` (``who``: e.g. "HA ha1: ")."""
    size = step_text(step)
    if step > 0:
        return (
            f"{who}wall clock stepped {size} ahead (or the host was suspended): SA validity "
            f"ends are wall-clock dates, so every live SA now ends {size} sooner; those "
            "past their end expire in the next runs, paced -- is NTP in step?"
        )
    return (
        f"{who}wall clock stepped {size} back: SA validity ends are wall-clock dates, so "
        f"every live SA now ends {size} later -- is NTP in step?"
    )
