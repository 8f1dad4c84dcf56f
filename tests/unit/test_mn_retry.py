"""The MN's waits after failures (core/mn_retry.py)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.mn_retry import next_wait

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def low(a: float, b: float) -> float:
    return a


def high(a: float, b: float) -> float:
    return b


def test_doubles_from_retry_min_up_to_retry_max() -> None:
    waits = [next_wait(n, retry_min=10, retry_max=600, uniform=high) for n in range(1, 10)]
    assert waits == [10, 20, 40, 80, 160, 320, 600, 600, 600]
    # Equal jitter: each wait from the upper half of its backoff.
    assert [next_wait(n, retry_min=10, retry_max=600, uniform=low) for n in (1, 2, 7)] == [
        5,
        10,
        300,
    ]


def test_retry_after_is_honoured_with_a_spread_within_retry_max() -> None:
    later = NOW + timedelta(seconds=30)
    # The backoff (10 s) is shorter than what the HAC asked: the HAC wins,
    # plus up to retry_min so a crowd told the same date spreads out.
    assert next_wait(1, retry_min=10, retry_max=600, retry_after=later, now=NOW, uniform=low) == 30
    assert next_wait(1, retry_min=10, retry_max=600, retry_after=later, now=NOW, uniform=high) == 40
    # A date in the past, or a backoff already longer: the backoff.
    past = NOW - timedelta(seconds=5)
    assert next_wait(1, retry_min=10, retry_max=600, retry_after=past, now=NOW, uniform=high) == 10
    assert (
        next_wait(5, retry_min=10, retry_max=600, retry_after=later, now=NOW, uniform=high) == 160
    )
    # A HAC (or a clock) saying next year: retry_max all the same.
    far = NOW + timedelta(days=365)
    assert next_wait(1, retry_min=10, retry_max=600, retry_after=far, now=NOW, uniform=high) == 600


def test_the_count_starts_at_one() -> None:
    with pytest.raises(ValueError, match="failures: 0"):
        next_wait(0, retry_min=10, retry_max=600, uniform=high)


@given(
    failures=st.integers(1, 10_000),
    retry_min=st.floats(1, 3600),
    span=st.floats(1, 100),
    after=st.one_of(st.none(), st.floats(-1e6, 1e9)),
    seed=st.integers(0, 2**32),
)
def test_every_wait_lies_between_half_the_first_and_retry_max(
    failures: int, retry_min: float, span: float, after: float | None, seed: int
) -> None:
    retry_max = retry_min * span
    rng = random.Random(seed)
    retry_after = None if after is None else NOW + timedelta(seconds=after)
    wait = next_wait(
        failures,
        retry_min=retry_min,
        retry_max=retry_max,
        retry_after=retry_after,
        now=NOW,
        uniform=rng.uniform,
    )
    assert retry_min / 2 <= wait <= retry_max
    if retry_after is not None and after is not None and 0 < after <= retry_max:
        assert wait >= min(after, retry_max)  # never before the HAC's date
    jitterless = min(retry_max, retry_min * 2.0 ** min(failures - 1, 62))
    assert wait >= jitterless / 2


def test_config_defaults_and_errors_name_the_file_and_key(tmp_path: object) -> None:
    from pathlib import Path

    from mipsec.core.config import validate_config
    from mipsec.core.errors import ConfigError

    base = Path(str(tmp_path))
    mn = {"mn_id": "a@x", "psk_hex": "00"}
    cfg = validate_config(
        {"mn": mn, "hac": {"host": "127.0.0.1", "ca": "ca.pem"}}, "mn", file="mn.toml", base=base
    )
    assert (cfg.hac.retry_min, cfg.hac.retry_max) == (10.0, 600.0)
    for hac, says in (
        (
            {"retry_min": 60, "retry_max": 30},
            "mn.toml: hac: retry_max (30) is below retry_min (60)",
        ),
        ({"retry_min": 0}, "mn.toml: hac.retry_min: "),
        ({"retry_max": 100_000}, "mn.toml: hac.retry_max: "),
    ):
        with pytest.raises(ConfigError) as ei:
            validate_config(
                {"mn": mn, "hac": {"host": "127.0.0.1", "ca": "ca.pem", **hac}},
                "mn",
                file="mn.toml",
                base=base,
            )
        assert str(ei.value).startswith(says), str(ei.value)


def _first_back(crowd: int, outage: float, rng: random.Random) -> list[float]:
    """When each of ``crowd`` MNs, all failing at 0 while their HAC is down
    until ``outage``, first reaches it again (defaults: 10 s .. 600 s)."""
    back = []
    for _ in range(crowd):
        t, failures = 0.0, 0
        while t < outage:
            failures += 1
            t += next_wait(failures, retry_min=10, retry_max=600, uniform=rng.uniform)
        back.append(t)
    return back


def _busiest_second(times: list[float]) -> int:
    from collections import Counter

    return max(Counter(int(t) for t in times).values())


def test_ten_thousand_mns_failing_together_come_back_spread_out() -> None:
    """The thundering herd, counted: 10,000 MNs lose their HAC at the same
    instant for 5 minutes.  With the old fixed 10-s wait all 10,000 came
    back within the same second (and every 10 s during the outage); with
    the doubling, jittered waits no second of their return holds more than
    2 % of them (0.8 % with this seed), spread over more than a minute."""
    rng = random.Random(20261206)
    back = _first_back(10_000, 300.0, rng)
    assert min(back) >= 300.0
    assert _busiest_second(back) <= 200, _busiest_second(back)
    assert max(back) - min(back) > 60  # spread over minutes, not seconds


def test_a_crowd_told_the_same_retry_after_spreads_over_retry_min() -> None:
    """10,000 MNs answered 503 with the same ``retry-after`` (30 s): none
    comes back before that date, and the extra draw of up to ``retry_min``
    (10 s) spreads them -- no second holds more than 15 % of them (all of
    them, had the date been honoured to the second)."""
    rng = random.Random(6122026)
    later = NOW + timedelta(seconds=30)
    waits = [
        next_wait(1, retry_min=10, retry_max=600, retry_after=later, now=NOW, uniform=rng.uniform)
        for _ in range(10_000)
    ]
    assert min(waits) >= 30 and max(waits) <= 40
    assert _busiest_second(waits) <= 1_500, _busiest_second(waits)
