"""core/pacing.py: background batches leave the loop to everyone else."""

from __future__ import annotations

import asyncio

import pytest

from mipsec.core import pacing


def test_each_full_batch_is_followed_by_a_pause_as_long_as_it_took(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    pauses: list[float] = []
    sizes = iter([5, 5, 5, 2, 5])  # the fourth batch comes back short: done

    async def fake_sleep(seconds: float) -> None:
        pauses.append(seconds)
        clock[0] += seconds

    def step() -> int:
        clock[0] += 0.25 * (len(pauses) + 1)  # each batch a bit slower
        return next(sizes)

    monkeypatch.setattr(pacing.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(pacing.asyncio, "sleep", fake_sleep)
    assert asyncio.run(pacing.in_paced_batches(step, 5)) == 17
    assert pauses == [0.25, 0.5, 0.75]  # none after the short batch


def test_an_error_in_a_batch_ends_it_for_the_caller_to_report() -> None:
    calls = []

    def step() -> int:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk I/O error")
        return 3

    with pytest.raises(OSError, match="disk I/O error"):
        asyncio.run(pacing.in_paced_batches(step, 3))
    assert len(calls) == 2
