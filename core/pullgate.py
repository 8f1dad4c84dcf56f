"""Which unknown SPIs an HA pulls from its HAC (PROFILE §9), under a flood.

A packet under an SPI the HA does not hold may be an MN whose SA the HA
missed (pull it) or an attacker's made-up SPI (anyone can send one, from
any spoofed source).  One global token bucket bounded what a flood costs
the HAC, but the flood kept it empty: an MN whose SA the HA lacked was
never pulled while it lasted (found in review, twenty-ninth session).

:class:`PullGate` tells the two apart by what a real MN does and an
attacker's random SPIs do not: an MN retransmits its BU under the same SPI
(RFC 6275 §11.8: after 1.5 s for a first registration, 1 s otherwise, then
doubling).  So:

* while pulls are quiet -- the global bucket holds more than ``reserve``
  tokens and fewer than half of ``max_in_flight`` pulls run -- an SPI is
  pulled at its first sighting, as before (no added delay without a flood);
* under pressure, a first sighting is only remembered (``DEFERRED``); the
  SPI is pulled at its next sighting within ``window`` seconds, from the
  tokens and flight slots the first sightings may not touch (the reserve),
  and through a per-source bucket (``core/ratelimit.py``: an IPv4 address
  or an IPv6 /64), so one source that repeats its SPIs gets its share, not
  the reserve;
* sightings live in two generations of at most ``generation`` SPIs each;
  the older is dropped when the newer is full or ``window`` old.  A
  sighting thus survives at least ``generation / N`` seconds under a flood
  of N new SPIs a second (65,536 / 1.5 s: an MN's first retransmission
  finds it under a flood of up to ~43,000 made-up SPIs a second), and at
  most ~4 MB per generation.

What it does not stop: an attacker who sends each made-up SPI twice from
spoofed sources spends the reserve as an MN would; the global bucket still
bounds what the HAC pays.  Every call is O(1), whatever the number of MNs.
Pure and clock-injected.

The limits -- ``rate``, ``burst``, ``max_in_flight`` and the per-source
``source_rate``, ``source_burst`` -- are the HA's ``[pull]`` keys (defaults
below); a reload changes them in place (:meth:`PullGate.configure`), the
sightings kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

from mipsec.core.ratelimit import SourceBuckets

__all__ = ["PullGate", "Verdict"]

SIGHTING_WINDOW = 30.0  # seconds a first sighting waits for the second
SIGHTINGS_PER_GENERATION = 65_536
# The defaults of the HA's [pull] rate, burst, max_in_flight, source_rate and
# source_burst (core/config.py PullConfig, which also bounds them).  PROFILE
# §9 pull is for the rare SA the HA missed, not for every random SPI an
# attacker sends: an HA that lost its store recovers its MNs at ``rate``.
RATE = 20.0  # pulls a second on average ...
BURST = 50  # ... with bursts of this many (half kept for repeated sightings)
MAX_IN_FLIGHT = 16  # pulls at once (half kept for repeated sightings)
SOURCE_RATE = 5.0  # repeated sightings pulled a second per source (IPv4 address, IPv6 /64) ...
SOURCE_BURST = 10  # ... with bursts of this many
MAX_SOURCES = 4096
# Upper bounds of those keys (PullConfig says why).
MAX_RATE = 10_000.0
MAX_BURST = 100_000
MAX_MAX_IN_FLIGHT = 256


class Verdict(Enum):
    PULL = "pull"
    DEFERRED = "deferred"  # a first sighting under pressure: pulled at its next one
    LIMITED = "limited"  # a repeated sighting refused by a bucket or the flight cap


class PullGate:
    __slots__ = (
        "_at",
        "_clock",
        "_cur",
        "_cur_since",
        "_prev",
        "burst",
        "generation",
        "max_in_flight",
        "rate",
        "reserve",
        "sources",
        "tokens",
        "window",
    )

    def __init__(
        self,
        rate: float,
        burst: int,
        max_in_flight: int,
        *,
        source_rate: float = SOURCE_RATE,
        source_burst: int = SOURCE_BURST,
        max_sources: int = MAX_SOURCES,
        generation: int = SIGHTINGS_PER_GENERATION,
        window: float = SIGHTING_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if generation < 1 or not window > 0:
            raise ValueError("generation >= 1 and window > 0")
        self._check(rate, burst, max_in_flight)
        self.rate = rate
        self.burst = float(burst)
        self.reserve = float(burst // 2)  # tokens first sightings leave to repeated ones
        self.max_in_flight = max_in_flight
        self.generation = generation
        self.window = window
        self._clock = clock
        self.tokens = float(burst)
        self._at = clock()
        self.sources = SourceBuckets(
            source_rate, source_burst, max_sources=max_sources, clock=clock
        )
        self._cur: set[int] = set()
        self._prev: set[int] = set()
        self._cur_since = self._at

    @staticmethod
    def _check(rate: float, burst: int, max_in_flight: int) -> None:
        if not rate > 0 or burst < 2 or max_in_flight < 2:
            raise ValueError("rate > 0, burst >= 2 and max_in_flight >= 2")

    def __len__(self) -> int:
        """SPIs remembered as sighted (both generations)."""
        return len(self._cur) + len(self._prev)

    def configure(
        self,
        rate: float,
        burst: int,
        max_in_flight: int,
        *,
        source_rate: float,
        source_burst: int,
    ) -> None:
        """New limits from now on (a reload), in place: the sightings stay
        (an MN deferred before the reload is pulled at its next BU), the
        tokens earned so far at the old rate are kept up to the new burst,
        and each source keeps its bucket the same way."""
        self._check(rate, burst, max_in_flight)
        self.sources.configure(source_rate, source_burst)  # may raise: nothing changed yet
        self._refill(self._clock())  # earned at the old rate
        self.rate = rate
        self.burst = float(burst)
        self.reserve = float(burst // 2)
        self.tokens = min(self.tokens, self.burst)
        self.max_in_flight = max_in_flight

    def _refill(self, now: float) -> None:
        """The global bucket's tokens earned since the last look, up to ``burst``."""
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def limits(self) -> dict[str, float | int]:
        """The limits in force (``mipsec status``)."""
        return {
            "rate": self.rate,
            "burst": int(self.burst),
            "max_in_flight": self.max_in_flight,
            "source_rate": self.sources.rate,
            "source_burst": self.sources.burst,
        }

    def admit(self, spi: int, source: int | None, in_flight: int) -> Verdict:
        """May ``spi``, seen now from ``source`` (``ratelimit.bucket_key``;
        None: unknown), be pulled while ``in_flight`` pulls run?  PULL takes
        a token (and one of the source's, for a repeated sighting)."""
        now = self._clock()
        self._refill(now)
        self._age(now)
        if spi not in self._cur and spi not in self._prev:
            if self.tokens >= 1.0 + self.reserve and 2 * in_flight < self.max_in_flight:
                self.tokens -= 1.0
                return Verdict.PULL
            self._sight(spi)
            return Verdict.DEFERRED
        if (
            self.tokens < 1.0
            or in_flight >= self.max_in_flight
            or (source is not None and not self.sources.allow(source))
        ):
            self._sight(spi)  # kept fresh: its next sighting tries again
            return Verdict.LIMITED
        self.tokens -= 1.0
        self._cur.discard(spi)
        self._prev.discard(spi)
        return Verdict.PULL

    def _age(self, now: float) -> None:
        age = now - self._cur_since
        if age >= 2 * self.window:
            self._prev = set()
            self._cur = set()
            self._cur_since = now
        elif age >= self.window or len(self._cur) >= self.generation:
            self._rotate(now)

    def _rotate(self, now: float) -> None:
        """The current generation becomes the previous one (the older goes)."""
        self._prev = self._cur
        self._cur = set()
        self._cur_since = now

    def _sight(self, spi: int) -> None:
        if spi in self._cur:
            return
        if len(self._cur) >= self.generation:
            self._rotate(self._clock())
        self._cur.add(spi)
