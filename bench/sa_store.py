"""SA store benchmark: µs per ``add`` (the HAC's bootstrap hot path) and per ``get``.

Run:  python bench/sa_store.py            (about 10 s)
      python bench/sa_store.py --quick    (CI smoke run, < 5 s; noisier)

Times ``SQLiteSAStore.add`` of fresh SAs (random SPIs, distinct HoAs, the
shapes the HAC issues) into a file store (WAL, synchronous = NORMAL, as the
HAC runs it) and into the memory store, then ``get`` of stored SPIs.  Each
figure is the median of several rounds.  The default store wraps the four SA
keys with AES-256-GCM; ``clear`` is the same store with ``clear_keys = true``,
measured in the same run, so "wrap cost" = default - clear is the price of
keeping SA keys out of the file in clear.  Last line: the same ``add`` with 8
SAs per transaction (one commit) against one commit each, alternated -- the
most a group commit per event-loop tick could save.
"""

from __future__ import annotations

import argparse
import inspect
import secrets
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import Suite
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

NOW = datetime.now(UTC)


def _issued(spi: int, i: int) -> IssuedSA:
    sa = SecurityAssociation(
        spi=spi,
        mn_id=f"mn{i}@bench.example",
        suite=Suite.AES_128_CBC_SHA256,
        scope=1,
        validity_end=NOW + timedelta(hours=1),
        mn_to_ha_ikey=secrets.token_bytes(16),
        ha_to_mn_ikey=secrets.token_bytes(16),
        mn_to_ha_ekey=secrets.token_bytes(16),
        ha_to_mn_ekey=secrets.token_bytes(16),
        ha_id="ha1",
    )
    bs = BootstrapData(
        haa_ip6=IPv6Address("2001:db8:1::1"),
        port=7872,
        ip6_hoa=IPv6Address(0x20010DB8000100000000000000000000 + i + 16),
        ip6_hnp=IPv6Network("2001:db8:1::/64"),
        dns_ip6=IPv6Address("2001:db8:1::53"),
    )
    return IssuedSA(sa, bs)


def _open(path: Path | None, clear: bool, synchronous: str = "normal") -> SQLiteSAStore:
    params = inspect.signature(SQLiteSAStore).parameters
    kwargs: dict[str, Any] = {}
    if synchronous != "normal":
        if "synchronous" not in params:
            raise LookupError("this store has no synchronous option")
        kwargs["synchronous"] = synchronous
    if "clear_keys" in params:  # the store before key wrapping had no such option
        kwargs["clear_keys"] = clear
    elif not clear:
        raise LookupError("this store cannot wrap keys")
    return SQLiteSAStore(path, **kwargs)


# Distinct random SPIs, as the HAC draws them: each add lands on a random page
# of the table (sequential SPIs would make the inserts, and grouping them,
# look cheaper than they are).  A fixed permutation of the SPI space, so no
# two SAs of a run collide.
_SPI_A = 2654435761 | 1  # odd: multiplication is a bijection mod 2**28


def _spi(i: int) -> int:
    return (i * _SPI_A + 12345) % (1 << 28) or (1 << 28) - 1


def _round(store: SQLiteSAStore, n: int, base: int) -> tuple[float, float]:
    items = [_issued(_spi(base + i), base + i) for i in range(n)]
    t0 = time.perf_counter()
    for x in items:
        if not store.add(x, NOW):
            raise RuntimeError("SPI collision in the benchmark")
    t1 = time.perf_counter()
    for x in items:
        if store.get(x.sa.spi, NOW) is None:
            raise RuntimeError("stored SA not found")
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def _grouped_round(store: SQLiteSAStore, n: int, base: int, group: int) -> float:
    """µs per ``add`` when ``group`` adds share one transaction (one commit):
    what a group commit per event-loop tick could save at most (issue 9)."""
    items = [_issued(_spi(base + i), base + i) for i in range(n)]
    conn = store._conn  # the bench's view inside: the store has no batch API
    t0 = time.perf_counter()
    for i in range(0, n, group):
        conn.execute("BEGIN IMMEDIATE")
        for x in items[i : i + group]:
            if not store.add(x, NOW):
                raise RuntimeError("SPI collision in the benchmark")
        conn.execute("COMMIT")
    return (time.perf_counter() - t0) / n * 1e6


def measure_grouped(n: int, rounds: int, group: int) -> tuple[float, float]:
    """Median µs per ``add`` into a file store: one commit each, and ``group``
    per commit, rounds alternated."""
    with tempfile.TemporaryDirectory() as d:
        store = _open(Path(d) / "sa.sqlite", False)
        try:
            single, grouped = [], []
            for r in range(rounds):
                single.append(_round(store, n, 2 * r * n)[0])
                grouped.append(_grouped_round(store, n, (2 * r + 1) * n, group))
        finally:
            store.close()
    return statistics.median(single), statistics.median(grouped)


def measure_synchronous(n: int, rounds: int, group: int) -> dict[tuple[str, int], float] | None:
    """Median µs per ``add`` into a file store under ``synchronous`` NORMAL
    and FULL (an fsync per commit: ``[sa_store] synchronous = "full"``), one
    commit each and ``group`` per commit (the HAC's group commit), all four
    alternated round by round."""
    with tempfile.TemporaryDirectory() as d:
        try:
            stores = {
                sync: _open(Path(d) / f"{sync}.sqlite", False, sync) for sync in ("normal", "full")
            }
        except LookupError:
            return None
        try:
            got: dict[tuple[str, int], list[float]] = {}
            for r in range(rounds):
                for i, (sync, store) in enumerate(stores.items()):
                    base = (4 * r + 2 * i) * n
                    got.setdefault((sync, 1), []).append(_round(store, n, base)[0])
                    got.setdefault((sync, group), []).append(
                        _grouped_round(store, n, base + n, group)
                    )
        finally:
            for store in stores.values():
                store.close()
    return {k: statistics.median(v) for k, v in got.items()}


def measure(kind: str, clear: bool, n: int, rounds: int) -> tuple[float, float] | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sa.sqlite" if kind == "file" else None
        try:
            store = _open(path, clear)
        except LookupError:
            return None
        try:
            adds, gets = [], []
            for r in range(rounds):
                a, g = _round(store, n, r * n)
                adds.append(a)
                gets.append(g)
        finally:
            store.close()
    return statistics.median(adds), statistics.median(gets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short CI run")
    args = parser.parse_args(argv)
    n, rounds = (1000, 3) if args.quick else (5000, 7)
    print(f"SA store, {n} SAs per round, median of {rounds} rounds (µs per call)")
    print(f"{'store':<8}{'keys':<9}{'add':>8}{'get':>8}")
    for kind in ("file", "memory"):
        figures: dict[bool, tuple[float, float]] = {}
        for clear in (True, False):
            got = measure(kind, clear, n, rounds)
            label = "clear" if clear else "wrapped"
            if got is None:
                print(f"{kind:<8}{label:<9}{'n/a':>8}{'n/a':>8}")
                continue
            figures[clear] = got
            print(f"{kind:<8}{label:<9}{got[0]:8.1f}{got[1]:8.1f}")
        if len(figures) == 2:
            d_add = figures[False][0] - figures[True][0]
            d_get = figures[False][1] - figures[True][1]
            print(f"{kind:<8}{'wrap cost':<9}{d_add:+8.1f}{d_get:+8.1f}")
    group = 8
    single, grouped = measure_grouped(n, rounds, group)
    print(
        f"file store, wrapped keys: add {single:.1f} µs with one commit each, "
        f"{grouped:.1f} µs with {group} per commit (ratio {grouped / single:.2f}: "
        f"the most a group commit per loop tick could save is {single - grouped:.1f} µs per SA)"
    )
    # An fsync per commit costs what the disk says: fewer SAs per round.
    sync = measure_synchronous(max(100, n // 10), rounds, group)
    if sync is None:
        print("synchronous = FULL: n/a (this store has no synchronous option)")
    else:
        for per in (1, group):
            normal, full = sync[("normal", per)], sync[("full", per)]
            print(
                f"file store, {per} SA(s) per commit: add {full:.1f} µs with synchronous = FULL "
                f"(power-loss-safe) against {normal:.1f} µs with NORMAL (ratio {full / normal:.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
