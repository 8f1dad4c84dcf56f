"""The MN's wait before its next bootstrap (core/mn_wait.py): on a clock that
counts a suspend, cut by SIGUSR1 within its limits, ended by the stop.

The clock is injected: the real monotonic clock plus what a test adds, as a
suspend adds to CLOCK_BOOTTIME while asyncio's timers stand still.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from mipsec.core import mn_wait
from mipsec.core.mn_wait import BootstrapWait


class Clock:
    def __init__(self) -> None:
        self.slept = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.slept


def _timed(coro_fn: Callable[[], Awaitable[None]]) -> float:
    async def main() -> float:
        started = time.monotonic()
        await coro_fn()
        return time.monotonic() - started

    return asyncio.run(main())


def test_a_suspend_through_the_wait_ends_it_on_waking(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-h wait; the host sleeps 2 h of it: the wait ends within one slice
    of the clock jump (before: asyncio's monotonic timer ran its whole hour)."""
    monkeypatch.setattr(mn_wait, "SLICE", 0.05)
    clock = Clock()
    waits = BootstrapWait(clock, min_gap=5.0)

    async def body() -> None:
        task = asyncio.create_task(waits.pause(3600.0))
        await asyncio.sleep(0.1)
        assert not task.done() and waits.waiting
        clock.slept += 7200.0
        await asyncio.wait_for(task, 2.0)
        assert not waits.waiting

    assert _timed(body) < 1.0


def test_without_a_suspend_the_wait_runs_its_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mn_wait, "SLICE", 0.05)
    waits = BootstrapWait(Clock(), min_gap=5.0)
    assert _timed(lambda: waits.pause(0.3)) >= 0.3


def test_sigusr1_cuts_once_per_min_gap_and_never_below_the_hacs_retry_after() -> None:
    clock = Clock()
    waits = BootstrapWait(clock, min_gap=5.0)
    lines: list[str] = []

    async def body() -> None:
        lines.append(waits.cut())  # not waiting: nothing to cut
        task = asyncio.create_task(waits.pause(60.0, hac_seconds=0.4))
        await asyncio.sleep(0.05)
        lines.append(waits.cut())  # cut to the HAC's retry-after
        lines.append(waits.cut())  # within min_gap: ignored
        started = time.monotonic()
        await asyncio.wait_for(task, 5.0)
        assert time.monotonic() - started >= 0.3  # the retry-after held
        task = asyncio.create_task(waits.pause(60.0))
        await asyncio.sleep(0.05)
        lines.append(waits.cut())  # still within min_gap of the first cut
        clock.slept += 5.0  # min_gap later (a suspend counts, too)
        lines.append(waits.cut())
        await asyncio.wait_for(task, 2.0)

    asyncio.run(body())
    assert lines[0] == "mn: SIGUSR1 ignored: not waiting to bootstrap (nothing to cut)"
    assert lines[1].startswith("mn: SIGUSR1: the wait is cut to the HAC's retry-after")
    assert lines[2].startswith("mn: SIGUSR1 ignored: the last one cut a wait 0.0 s ago")
    assert lines[3].startswith("mn: SIGUSR1 ignored: the last one cut a wait")
    assert lines[4] == "mn: SIGUSR1: the wait is cut, bootstrapping now"


def test_the_stop_ends_the_wait_and_the_retry_after_and_every_later_wait() -> None:
    waits = BootstrapWait(Clock(), min_gap=5.0)

    async def body() -> None:
        task = asyncio.create_task(waits.pause(60.0, hac_seconds=60.0))
        await asyncio.sleep(0.05)
        waits.stop()
        await asyncio.wait_for(task, 2.0)
        await asyncio.wait_for(waits.pause(60.0), 0.5)  # returns at once

    assert _timed(body) < 1.0


def test_a_step_callback_cuts_the_wait_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """``stepped`` is asked at every look at the clock: what it returns comes
    off the wait (a step ahead that brought the SA's end nearer); 0 or a
    negative figure (a step back) changes nothing, and the HAC's
    retry-after floor is never cut by it."""
    monkeypatch.setattr(mn_wait, "SLICE", 0.05)
    waits = BootstrapWait(Clock(), min_gap=5.0)
    cuts = iter([0.0, -3600.0, 3599.8])

    async def body() -> None:
        await waits.pause(3600.0, stepped=lambda: next(cuts, 0.0))

    assert _timed(body) < 1.0
    floor = BootstrapWait(Clock(), min_gap=5.0)
    assert _timed(lambda: floor.pause(0.3, 0.3, stepped=lambda: 3600.0)) >= 0.3
