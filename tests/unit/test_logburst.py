"""core/logburst.py: a few lines per window, the rest counted in one."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mipsec.core.logburst import LineBurst

log = logging.getLogger("mipsec.test.burst")


def test_a_burst_gets_limit_lines_then_one_that_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [0.0]
    burst = LineBurst(log, "odd events", limit=3, window=1.0, clock=lambda: clock[0])
    with caplog.at_level(logging.DEBUG, logger="mipsec.test.burst"):
        for i in range(10):
            burst.line(logging.INFO, "odd event n=%d", i)
        clock[0] = 1.5  # the next window: the count of the last one first
        burst.line(logging.INFO, "odd event n=%d", 10)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info == [
        "odd event n=0",
        "odd event n=1",
        "odd event n=2",
        "7 more odd events in 1 s (one line each at DEBUG)",
        "odd event n=10",
    ]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug == [f"odd event n={i}" for i in range(3, 10)]  # none lost


def test_the_count_is_said_when_the_window_closes_even_if_nothing_follows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        burst = LineBurst(log, "odd events", limit=2, window=0.05)
        for i in range(5):
            burst.line(logging.WARNING, "odd event n=%d", i)
        await asyncio.sleep(0.2)  # the loop's timer closes the window

    with caplog.at_level(logging.INFO, logger="mipsec.test.burst"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records][-1] == (
        "3 more odd events in 0.05 s (one line each at DEBUG)"
    )
    assert caplog.records[-1].levelno == logging.WARNING
