"""Cost of the per-source rate limiter's table (core/ratelimit.py) past its cap.

    python bench/ratelimit.py [--sources N] [--quick]

The HAC keeps a token bucket per source (an IPv4 address, an IPv6 /64) for
``[hac] per_source_rate``, at most ``max_sources`` (65,536) of them, the least
recently used dropped first.  A flood spread over more sources than that
adds a source and drops one on every accepted connection.  This prints the
cost of ``allow`` for a new source below the cap (the baseline, measured in
the same run) and past it, and their ratio.  Until the twenty-seventh
session the table was a plain dict whose oldest entry was found with
``next(iter(d))``, which walks the deleted slots piling up at the front:
~19 µs per new source past the cap against ~0.5 below it.
"""

from __future__ import annotations

import argparse
import time

from mipsec.core.ratelimit import SourceBuckets


def per_call(buckets: SourceBuckets, first: int, count: int) -> float:
    t0 = time.perf_counter()
    for key in range(first, first + count):
        buckets.allow(key)
    return (time.perf_counter() - t0) / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=200_000, help="new sources past the cap")
    p.add_argument("--quick", action="store_true", help="20,000 new sources (CI)")
    args = p.parse_args()
    if args.quick:
        args.sources = 20_000
    cap = 65_536
    buckets = SourceBuckets(10.0, 20, max_sources=cap)
    below = per_call(buckets, 0, cap)  # filling: no eviction
    past = per_call(buckets, cap, args.sources)  # each evicts the least recently used
    print(f"allow(), a new source below the cap ({cap:,} sources): {below * 1e6:.2f} µs")
    print(f"allow(), a new source past the cap ({args.sources:,} more): {past * 1e6:.2f} µs")
    print(f"ratio past / below: {past / below:.2f}")


if __name__ == "__main__":
    main()
