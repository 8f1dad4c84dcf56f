"""core/ratelimit.py: a token bucket per source, a bounded table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.ratelimit import SourceBuckets, source_key


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_rate() -> None:
    clock = Clock()
    b = SourceBuckets(2.0, 3, clock=clock)
    assert [b.allow(1) for _ in range(5)] == [True, True, True, False, False]
    assert b.allow(2)  # another source has its own bucket
    clock.t += 0.5  # one token back (2 per second)
    assert b.allow(1) and not b.allow(1)
    clock.t += 10  # never more than the burst
    assert [b.allow(1) for _ in range(4)] == [True, True, True, False]


def test_refused_attempts_do_not_earn_tokens_and_the_table_is_bounded() -> None:
    clock = Clock()
    b = SourceBuckets(1.0, 1, max_sources=3, clock=clock)
    assert b.allow(1) and not b.allow(1)
    clock.t += 0.5
    assert not b.allow(1)  # half a token: still refused
    clock.t += 0.5
    assert b.allow(1)
    for key in (2, 3, 4):  # 4 evicts the least recently used: 1
        b.allow(key)
    assert len(b) == 3
    assert b.allow(1)  # forgotten, so a full bucket again: the documented price
    with pytest.raises(ValueError):
        SourceBuckets(0, 1)


@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 2)), max_size=200))
def test_never_more_than_burst_plus_rate_times_elapsed(steps: list[tuple[int, float]]) -> None:
    clock = Clock()
    rate, burst = 3.0, 4
    b = SourceBuckets(rate, burst, max_sources=1_000, clock=clock)
    start = clock.t
    allowed: dict[int, int] = {}
    for key, dt in steps:
        clock.t += dt
        if b.allow(key):
            allowed[key] = allowed.get(key, 0) + 1
    for n in allowed.values():
        assert n <= burst + rate * (clock.t - start) + 1e-9


def test_source_keys() -> None:
    assert source_key(("192.0.2.7", 1)) == source_key(("::ffff:192.0.2.7", 1, 0, 0))
    # One /64: one source; the next /64: another.
    assert source_key(("2001:db8::1", 1, 0, 0)) == source_key(("2001:db8::ffff:1", 2, 0, 0))
    assert source_key(("2001:db8::1", 1, 0, 0)) != source_key(("2001:db8:0:1::1", 1, 0, 0))
    assert source_key(("fe80::1%eth0", 1, 0, 2)) == source_key(("fe80::2", 1, 0, 2))
    # An IPv4 address and an IPv6 /64 of the same integer value never share a bucket.
    assert source_key(("0.0.0.1", 1)) != source_key(("0:0:0:1::", 1, 0, 0))
    assert source_key(None) is None and source_key(("nonsense", 1)) is None


def test_configure_in_place_clamps_tokens_and_keeps_the_table() -> None:
    """A reload's per-source limits: each bucket keeps its tokens up to the
    new burst, and its place in the least-recently-used order."""
    clock = Clock()
    b = SourceBuckets(1.0, 10, max_sources=2, clock=clock)
    assert b.allow(1) and b.allow(2)  # 9 tokens each; 1 the least recently used
    b.configure(2.0, 3)
    assert (b.rate, b.burst, len(b)) == (2.0, 3, 2)
    assert [b.allow(2) for _ in range(4)] == [True, True, True, False]  # 9 held to 3
    assert b.allow(3)  # evicts 1, still the least recently used: 2 stays, empty
    assert not b.allow(2)
    clock.t += 0.5  # one token back at the new rate
    assert b.allow(2) and not b.allow(2)
    with pytest.raises(ValueError):
        b.configure(0, 1)


def test_configure_credits_the_time_before_it_at_the_old_rate() -> None:
    clock = Clock()
    b = SourceBuckets(1.0, 10, clock=clock)
    assert all(b.allow(1) for _ in range(10)) and not b.allow(1)
    clock.t += 2.0  # two tokens earned at 1 a second ...
    b.configure(100.0, 10)  # ... not 200 at the new rate
    assert [b.allow(1) for _ in range(3)] == [True, True, False]
