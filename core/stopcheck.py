"""Whether a role was told to stop while its event loop was blocked.

A role's start loads its store synchronously (100,000 SAs take a second).
A SIGTERM meanwhile waits in asyncio's signal pipe: its handler, which sets
the role's stop event, runs only once the loop has turned a few times, so a
check of the event right after the load misses it -- and the role opened
its ports, said ready and only then stopped.
"""

from __future__ import annotations

import asyncio

__all__ = ["stop_requested"]

# asyncio queues the signal pipe's reader behind the caller's next step and
# the reader queues the handler behind the step after: three turns.
_TURNS = 3


async def stop_requested(stop: asyncio.Event) -> bool:
    """``stop.is_set()``, counting a signal that came while the loop was
    blocked (up to three loop turns; nothing else of the caller's runs)."""
    for _ in range(_TURNS):
        if stop.is_set():
            return True
        await asyncio.sleep(0)
    return stop.is_set()
