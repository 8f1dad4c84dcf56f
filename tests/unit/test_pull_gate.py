"""core/pullgate.py: which unknown SPIs an HA pulls while made-up ones flood it.

Found in review (twenty-ninth session): one global bucket, kept empty by a
flood of random SPIs from any (spoofable) source, meant that an MN whose SA
the HA lacked was never pulled while the flood lasted.
"""

from __future__ import annotations

import random

from mipsec.core.pullgate import PullGate, Verdict

RATE, BURST, FLIGHTS = 20.0, 50, 16  # the [pull] defaults (core/pullgate.py)
MN_SPI = 0x0ABCDE
MN_SOURCE = 1
ATTACKER = 2


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gate(clock: Clock, **kw: object) -> PullGate:
    return PullGate(RATE, BURST, FLIGHTS, clock=clock, **kw)  # type: ignore[arg-type]


def flood(g: PullGate, clock: Clock, rng: random.Random, rate: int, seconds: float) -> int:
    """``rate`` made-up SPIs a second for ``seconds``, each from a source of
    its own (spoofed); returns how many the gate let through."""
    pulled = 0
    n = int(rate * seconds)
    for _ in range(n):
        clock.t += 1.0 / rate
        source = rng.randrange(1 << 32)
        pulled += g.admit(rng.randrange(1, 1 << 28), source, 0) is Verdict.PULL
    return pulled


def test_without_a_flood_an_unknown_spi_is_pulled_at_its_first_sighting() -> None:
    g = gate(Clock())
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.PULL
    assert len(g) == 0  # nothing remembered


def test_a_flood_of_made_up_spis_cannot_starve_an_mns_pull() -> None:
    """40,000 made-up SPIs a second from spoofed sources: the MN's first BU
    is deferred, its retransmission 1.5 s later (a first registration,
    RFC 6275 §13) is pulled -- and the HAC still pays the global rate only."""
    clock, rng = Clock(), random.Random(7)
    g = gate(clock)
    pulled = flood(g, clock, rng, 40_000, 1.0)
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.DEFERRED
    pulled += flood(g, clock, rng, 40_000, 1.5)
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.PULL
    # Burst (50) plus 2.5 s at 20 a second, the MN's included.
    assert pulled + 1 <= BURST + RATE * 2.5 + 1
    assert len(g) <= 2 * 65_536


def test_a_sighting_survives_one_generation_of_new_spis_then_goes() -> None:
    """The eviction rule: two generations of ``generation`` SPIs each; a
    sighting survives at least ``generation`` newer ones (the number quoted
    in the README: 65,536 over an MN's 1.5-s retransmission gap)."""
    clock = Clock()
    g = gate(clock, generation=100)
    flood(g, clock, random.Random(1), 1000, 0.2)  # the bucket down to its reserve
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.DEFERRED
    for spi in range(1, 101):
        g.admit(spi, ATTACKER, 0)
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.PULL  # survived 100 newer ones
    assert g.admit(MN_SPI + 1, MN_SOURCE, 0) is Verdict.DEFERRED
    for spi in range(1, 202):
        g.admit(spi + 1000, ATTACKER, 0)
    assert g.admit(MN_SPI + 1, MN_SOURCE, 0) is Verdict.DEFERRED  # forgotten: a first again
    assert len(g) <= 200


def test_a_sighting_waits_for_its_second_within_the_window() -> None:
    """A retransmission up to ``window`` (30 s) after the first sighting
    finds it -- the MN's gaps of 1.5, 3, 6, 12, 24 s -- a sighting older
    than two windows is gone."""
    clock, rng = Clock(), random.Random(2)
    g = gate(clock, window=30.0)
    flood(g, clock, rng, 1000, 0.2)
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.DEFERRED
    flood(g, clock, rng, 1000, 24.0)
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.PULL
    assert g.admit(MN_SPI + 1, MN_SOURCE, 0) is Verdict.DEFERRED
    clock.t += 61.0  # quiet for two windows: every sighting is gone
    flood(g, clock, rng, 1000, 0.2)
    assert g.admit(MN_SPI + 1, MN_SOURCE, 0) is Verdict.DEFERRED


def test_one_source_repeating_its_spis_gets_its_share_not_the_reserve() -> None:
    """A source that sends each made-up SPI twice passes the sighting
    filter; its own bucket (5 a second) stops it, and an MN elsewhere is
    pulled at its retransmission."""
    clock, rng = Clock(), random.Random(3)
    g = gate(clock)
    flood(g, clock, rng, 1000, 0.1)  # spoofed made-up SPIs keep the pressure on
    repeats_pulled = 0
    for spi in range(1, 2001):  # and one source: 1,000 a second for 2 s, each twice
        flood(g, clock, rng, 1000, 0.001)
        if g.admit(spi, ATTACKER, 0) is Verdict.DEFERRED:
            repeats_pulled += g.admit(spi, ATTACKER, 0) is Verdict.PULL
        if spi == 1000:
            assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.DEFERRED
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.PULL
    # Its repeats: the source's burst (10) and rate (5 a second), no more.
    assert repeats_pulled <= 10 + 5 * 2


def test_first_sightings_leave_half_the_flight_slots() -> None:
    """A HAC that answers slowly: first sightings hold at most half of the
    concurrent pulls, so an MN's repeated sighting still finds a slot."""
    g = gate(Clock())
    assert g.admit(1, ATTACKER, FLIGHTS // 2) is Verdict.DEFERRED
    assert g.admit(1, ATTACKER, FLIGHTS // 2) is Verdict.PULL
    assert g.admit(2, ATTACKER, FLIGHTS - 1) is Verdict.DEFERRED
    assert g.admit(2, ATTACKER, FLIGHTS) is Verdict.LIMITED  # every slot taken
    assert g.admit(2, ATTACKER, FLIGHTS - 1) is Verdict.PULL  # kept: tried again


# ------------------------------------------------- [pull] limits (configured, reloaded)


def test_a_configured_rate_and_burst_are_what_the_gate_admits() -> None:
    """[pull] rate = 500, burst = 1000, max_in_flight = 64 (an HA that
    lost its store, recovering its MNs): half the burst at once at the
    first sighting, then 500 a second -- where the defaults let 25 and 20."""
    clock, rng = Clock(), random.Random(11)
    g = PullGate(500.0, 1000, 64, clock=clock)
    at_once = [g.admit(spi, ATTACKER, 0) for spi in range(1, 1001)]
    assert at_once.count(Verdict.PULL) == 500  # the half above the reserve
    assert at_once.count(Verdict.DEFERRED) == 500
    assert 998 <= flood(g, clock, rng, 2000, 2.0) <= 1000  # 500 a second for 2 s
    d_clock = Clock()
    default = gate(d_clock)
    assert [default.admit(spi, ATTACKER, 0) for spi in range(1, 1001)].count(Verdict.PULL) == 25
    assert 38 <= flood(default, d_clock, rng, 2000, 2.0) <= 40  # 20 a second


def test_configured_source_limits_bound_a_sources_repeated_sightings() -> None:
    """source_rate / source_burst: one source's repeated sightings under
    pressure get its burst at once, then its rate."""
    clock = Clock()
    g = PullGate(500.0, 1000, 64, source_rate=50.0, source_burst=100, clock=clock)
    for spi in range(1, 501):  # the first sightings spend the tokens above the reserve
        g.admit(spi, ATTACKER, 0)
    repeats = [g.admit(spi, ATTACKER, 0) for spi in range(1000, 1300) for _ in (0, 1)]
    assert repeats[1::2].count(Verdict.PULL) == 100  # the source's burst
    clock.t += 1.0
    for spi in range(3000, 3600):  # the pressure back: first sightings spend the refill
        g.admit(spi, ATTACKER, 0)
    again = [g.admit(spi, ATTACKER, 0) for spi in range(2000, 2300) for _ in (0, 1)]
    assert again[1::2].count(Verdict.PULL) == 50  # a second at the source's rate


def test_new_limits_in_place_keep_the_sightings() -> None:
    """A reload's limits (``configure``): an MN deferred before it is
    pulled at its next BU after it, under the new limits."""
    clock = Clock()
    g = PullGate(500.0, 1000, 64, clock=clock)
    for spi in range(1, 501):
        g.admit(spi, ATTACKER, 0)
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.DEFERRED
    held = len(g)
    g.configure(RATE, BURST, FLIGHTS, source_rate=5.0, source_burst=10)
    assert len(g) == held
    assert g.limits() == {
        "rate": RATE,
        "burst": BURST,
        "max_in_flight": FLIGHTS,
        "source_rate": 5.0,
        "source_burst": 10,
    }
    assert g.admit(MN_SPI, MN_SOURCE, FLIGHTS - 1) is Verdict.PULL  # from the new reserve
    # The new flight cap (64 before): half of 16 taken defers a first
    # sighting, all of them refuse its repeat.
    assert g.admit(MN_SPI + 1, MN_SOURCE, FLIGHTS // 2) is Verdict.DEFERRED
    assert g.admit(MN_SPI + 1, MN_SOURCE, FLIGHTS) is Verdict.LIMITED


def test_a_lowered_burst_clamps_the_tokens_at_once() -> None:
    """Tokens held beyond a lowered burst go at the reload -- a raise
    right after (another reload) does not bring them back -- and those
    earned before it were earned at the old rate."""
    clock = Clock()
    g = PullGate(500.0, 1000, 64, clock=clock)
    g.configure(500.0, 40, 64, source_rate=5.0, source_burst=10)
    assert g.tokens == 40.0
    g.configure(500.0, 1000, 64, source_rate=5.0, source_burst=10)
    # Repeated sightings from many sources (their own buckets full): 40 tokens.
    sighted = [g.admit(spi, spi, 0) for spi in range(1, 201) for _ in (0, 1)]
    assert sighted[1::2].count(Verdict.PULL) == 40
    # 0.1 s at 500 a second earns 50 tokens, then a reload to 1 a second.
    clock.t += 0.1
    g.configure(1.0, 1000, 64, source_rate=1.0, source_burst=10)
    sighted = [g.admit(spi, spi, 0) for spi in range(1001, 1201) for _ in (0, 1)]
    assert sighted[1::2].count(Verdict.PULL) == 50


def test_a_sources_bucket_is_clamped_in_place() -> None:
    """A source with its full bucket (10) keeps at most a lowered
    source_burst (2) of it, and its sighting table stays."""
    clock = Clock()
    g = gate(clock)
    for spi in range(1, 26):  # the tokens above the reserve spent
        g.admit(spi, ATTACKER, 0)
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.DEFERRED
    assert g.admit(MN_SPI, MN_SOURCE, 0) is Verdict.PULL  # MN_SOURCE has a bucket now: 9 left
    g.configure(RATE, BURST, FLIGHTS, source_rate=1.0, source_burst=2)
    assert len(g.sources) == 1
    repeats = [g.admit(spi, MN_SOURCE, 0) for spi in range(100, 110) for _ in (0, 1)]
    assert repeats[1::2].count(Verdict.PULL) == 2
