"""New connections per source address: a token bucket each, with a bounded table.

A TLS handshake costs the server a key exchange and a signature (~0.9 ms of
CPU measured on the HAC), so one host opening connections in a loop can
starve every MN of CPU although the connection cap keeps their slots.  The
HAC's listener can admit at most ``rate`` new connections per second per
source (``burst`` at once) and close the rest as they are accepted, before
any TLS work -- OpenSSH's ``PerSourcePenalties`` idea, reduced to a bucket.

A "source" is an IPv4 address, or an IPv6 /64 (one host usually owns a
whole /64).  The table holds at most ``max_sources`` buckets; past it the
one used least recently is dropped (its host starts again with a full
bucket), so memory is bounded whatever the number of sources -- and a flood
spread over more sources than that is not slowed down by this: drop it at
the firewall.  Pure and clock-injected, so tests need no sleeping.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["SourceBuckets", "bucket_key", "peer_ip", "source_key"]

MAX_SOURCES = 65_536

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_ip(peername: Any) -> IPAddress | None:
    """A socket peer's address (``getpeername()``): an IPv4 peer on a
    dual-stack socket (``::ffff:a.b.c.d``) as the IPv4 address it is, a
    scope id dropped; None without a parsable address (a socket gone)."""
    if not peername:
        return None
    try:
        addr = ipaddress.ip_address(str(peername[0]).partition("%")[0])
    except (ValueError, IndexError):
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def bucket_key(addr: IPAddress) -> int:
    """An IPv4 address as itself, an IPv6 one as its /64 (tagged so the two
    families never share a key)."""
    if isinstance(addr, ipaddress.IPv6Address):
        return (1 << 64) | (int(addr) >> 64)
    return int(addr)


def source_key(peername: Any) -> int | None:
    """The bucket key of a socket peer; None without a parsable address."""
    addr = peer_ip(peername)
    return None if addr is None else bucket_key(addr)


class SourceBuckets:
    """``allow(key)``: True while ``key``'s bucket holds a token (and takes it)."""

    __slots__ = ("_buckets", "burst", "clock", "max_sources", "rate")

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate > 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate > 0, burst >= 1 and max_sources >= 1 are required")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self.clock = clock
        # key -> (tokens, time of the last refill); insertion order is the
        # order of last use (each use re-inserts), so the first key is the
        # least recently used.
        # Least recently used first.  An OrderedDict: a plain dict's
        # ``next(iter(d))`` walks the deleted slots piling up at its front,
        # ~23 µs per new source past the cap against 0.6 below it (found
        # in review) -- a flood spread over many /64s paid it per accept.
        self._buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def configure(self, rate: float, burst: int) -> None:
        """A new ``rate`` and ``burst`` for every source from now on, in
        place: each bucket keeps its tokens (refilled at the old rate up to
        now, then held to the new burst) and its place in the table."""
        if not rate > 0 or burst < 1:
            raise ValueError("rate > 0 and burst >= 1 are required")
        now = self.clock()
        for key, (tokens, at) in list(self._buckets.items()):
            held = self._refilled(tokens, at, now)  # earned at the old rate
            self._buckets[key] = (min(float(burst), held), now)  # an update: no move
        self.rate = rate
        self.burst = burst

    def _refilled(self, tokens: float, at: float, now: float) -> float:
        """A bucket's tokens at ``now``: those it held at ``at`` plus what it
        earned since, up to ``burst``."""
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def allow(self, key: int) -> bool:
        now = self.clock()
        buckets = self._buckets
        held = buckets.get(key)
        if held is None:
            tokens = float(self.burst)
            if len(buckets) >= self.max_sources:
                buckets.popitem(last=False)  # the least recently used
        else:
            tokens = self._refilled(held[0], held[1], now)
            buckets.move_to_end(key)
        if tokens >= 1.0:
            buckets[key] = (tokens - 1.0, now)
            return True
        buckets[key] = (tokens, now)
        return False
