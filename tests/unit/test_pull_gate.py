"""core/pullgate.py: which unknown SPIs an HA pulls while made-up ones flood it.

Found in review (twenty-ninth session): one global bucket, kept empty by a
flood of random SPIs from any (spoofable) source, meant that an MN whose SA
the HA lacked was never pulled while the flood lasted.
"""

from __future__ import annotations

import random

from mipsec.core.pullgate import PullGate, Verdict

RATE, BURST, FLIGHTS = 20.0, 50, 16  # as roles/ha.py
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
