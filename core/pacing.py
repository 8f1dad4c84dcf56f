"""Background work in batches that leave the event loop to everyone else.

A timer that finds a mass of work at once (100,000 SAs that ended in the
same minute) must neither do it in one call -- seconds in which no MN, BU or
handshake is served -- nor hog the loop with back-to-back batches: with only
a turn between them, a bootstrap (about 18 turns) waited behind one batch at
each turn and took 0.9 s instead of a few ms (measured on the HAC with 100k
expiring SAs, 2026-12-05).  After each full batch the caller sleeps as long
as the batch took, so background work gets at most half of the loop's time
while it lasts and everything else runs at full pace in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["in_paced_batches"]


async def in_paced_batches(step: Callable[[], int], batch: int) -> int:
    """Call ``step`` (one batch, returns how many it did) until it does fewer
    than ``batch``; after each full batch, sleep as long as it took.  Returns
    the total; an exception from ``step`` ends it (the caller's to report)."""
    total = 0
    while True:
        started = time.monotonic()
        done = step()
        total += done
        if done < batch:
            return total
        await asyncio.sleep(time.monotonic() - started)
