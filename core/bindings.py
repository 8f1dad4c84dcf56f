"""The HA's binding cache (RFC 6275 §9.1, §10.3.1), optionally persisted in SQLite.

One entry per home address (PROFILE §8: "the binding cache keys on HoA"); the
home agent marks every entry as a home registration, so there is no cache
replacement policy (RFC 6275 §10.3.1: home registrations "MUST NOT be removed
from the Binding Cache until the expiration of the Lifetime period").

Persistence (``path`` given): every change is written to SQLite -- at once
(write-through, the default), or, with ``write_behind=True``, collected and
written by ``flush()`` in one transaction (the HA role flushes within 50 ms
and on stop) -- and the cache is loaded again on start, so bindings survive
an HA restart.  Entries whose lifetime ended while the HA was down are loaded as
they are; the next expiry run reports them as expired.  The same file keeps
one more piece of state a restart must not lose: per SPI, a reservation of
the HA's outbound ESP sequence numbers (``out_mark``).  After a restart the
HA's HA->MN counter resumes at the reservation, never below a number it has
already sent -- otherwise the MN's anti-replay window (PROFILE §7) would drop
every Binding Acknowledgement until the SA is re-bootstrapped.

Durability: WAL journal with ``synchronous=NORMAL`` -- a commit survives a
crash of the HA process; a power loss may lose the last few commits.  That is
the trade for ~12-25 µs per write instead of an fsync per Binding Update; in
write-behind mode a crash also loses the changes not yet flushed (at most the
flush delay's worth).  Acceptable for bindings: they are soft state the MN
refreshes anyway (RFC 6275 §11.7.1).  Not for the out-mark reservation, so
``set_out_mark`` always writes at once: a BA numbered at or above a mark is
only sent once that mark's successor is committed.

The file holds no key material, but it does map home addresses to care-of
addresses (where a user is), so it is created with mode 0600 like the SA store.
"""

from __future__ import annotations

import contextlib
import heapq
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from mipsec.core.errors import LocalProtocolError
from mipsec.core.fsutil import create_private

__all__ = ["SCHEMA_VERSION", "Binding", "BindingCache"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS binding (
    hoa         TEXT    PRIMARY KEY,
    coa_host    TEXT    NOT NULL,
    coa_port    INTEGER NOT NULL,
    spi         INTEGER NOT NULL,
    sequence    INTEGER NOT NULL,   -- last accepted BU Sequence # (RFC 6275 §9.5.1)
    lifetime    INTEGER NOT NULL,   -- granted seconds
    expires_at  REAL    NOT NULL,   -- epoch seconds, UTC
    ip4_hoa     TEXT,
    mn_seq      INTEGER NOT NULL    -- ESP sequence of that BU: replay floor after restart
);
CREATE TABLE IF NOT EXISTS sa_counter (
    spi       INTEGER PRIMARY KEY,
    out_mark  INTEGER NOT NULL,     -- HA->MN sequence numbers below this may have been sent
    in_floor  INTEGER NOT NULL      -- MN->HA ESP sequence of the last BU of a deleted binding
);
"""

_UPSERT = (
    "INSERT INTO binding (hoa, coa_host, coa_port, spi, sequence, lifetime, expires_at, "
    "ip4_hoa, mn_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hoa) DO UPDATE SET "
    "coa_host = excluded.coa_host, coa_port = excluded.coa_port, spi = excluded.spi, "
    "sequence = excluded.sequence, lifetime = excluded.lifetime, "
    "expires_at = excluded.expires_at, ip4_hoa = excluded.ip4_hoa, mn_seq = excluded.mn_seq"
)
_UPSERT_COUNTER = (
    "INSERT INTO sa_counter (spi, out_mark, in_floor) VALUES (?, ?, ?) "
    "ON CONFLICT (spi) DO UPDATE SET out_mark = excluded.out_mark, in_floor = excluded.in_floor"
)
_SELECT = (
    "SELECT hoa, coa_host, coa_port, spi, sequence, lifetime, expires_at, ip4_hoa, mn_seq "
    "FROM binding"
)


@dataclass(slots=True)
class Binding:
    """One home registration (RFC 6275 §10.3.1).

    ``coa_host``/``coa_port`` are where the BU came from (or the Alternate
    Care-of Address option's address, PROFILE §8); ``lifetime`` is the granted
    lifetime in seconds, ``expires_at`` its end in epoch seconds.  ``mn_seq``
    is the ESP sequence number of the BU that last wrote the entry.
    """

    hoa: str
    coa_host: str
    coa_port: int
    spi: int
    sequence: int
    lifetime: int
    expires_at: float
    ip4_hoa: str | None = None
    mn_seq: int = -1

    @property
    def coa(self) -> tuple[str, int]:
        return (self.coa_host, self.coa_port)


def _row(b: Binding) -> tuple[object, ...]:
    return (
        b.hoa,
        b.coa_host,
        b.coa_port,
        b.spi,
        b.sequence,
        b.lifetime,
        b.expires_at,
        b.ip4_hoa,
        b.mn_seq,
    )


def _packed(address: str) -> bytes:
    return ip_address(address).packed


class BindingCache:
    """In-memory binding cache keyed by HoA (``str``), with optional SQLite write-through.

    ``by_address`` looks a binding up by the packed IPv6 *or* IPv4 home
    address (16 or 4 octets): the HA's check of a PType 0 packet's inner
    source (PROFILE §7) reads those octets straight from the packet.

    Expiry uses a heap of ``(expires_at, hoa)`` with stale entries skipped
    when popped; the heap is rebuilt when stale entries outnumber live ones,
    so frequent refreshes cannot grow it without bound.
    """

    def __init__(self, path: Path | str | None = None, *, write_behind: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.write_behind = write_behind
        self._dirty: dict[str, Binding | None] = {}  # hoa -> row to write, None = delete
        self._dirty_spis: set[int] = set()
        self._entries: dict[str, Binding] = {}
        self._by_packed: dict[bytes, str] = {}
        # hoa -> (the ip4_hoa it was indexed with, its keys in _by_packed)
        self._indexed: dict[str, tuple[str | None, tuple[bytes, ...]]] = {}
        self._heap: list[tuple[float, str]] = []
        self._counters: dict[int, int] = {}
        self._floors: dict[int, int] = {}
        self._conn: sqlite3.Connection | None = None
        if self.path is not None:
            self._open(self.path)

    # ------------------------------------------------------------ storage

    def _open(self, path: Path) -> None:
        create_private(path)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            # See the module docstring: crash-safe, not power-loss-safe.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                rows = conn.execute("SELECT version FROM schema_version").fetchall()
                if not rows:
                    conn.execute(
                        "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
                    )
                elif len(rows) != 1 or rows[0][0] != SCHEMA_VERSION:
                    found = ", ".join(str(r[0]) for r in rows)
                    raise ValueError(
                        f"binding cache schema version {found} not supported "
                        f"(expected {SCHEMA_VERSION})"
                    )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            for row in conn.execute(_SELECT).fetchall():
                self._index(Binding(*row))
            for spi, mark, floor in conn.execute(
                "SELECT spi, out_mark, in_floor FROM sa_counter"
            ).fetchall():
                self._counters[spi] = mark
                self._floors[spi] = floor
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        """Flush what is pending and close the file."""
        if self._conn is not None:
            try:
                self.flush()
            finally:
                self._conn.close()
                self._conn = None

    @property
    def pending(self) -> int:
        """Changes not yet written (write-behind mode)."""
        return len(self._dirty) + len(self._dirty_spis)

    def flush(self) -> None:
        """Write every pending change in one transaction (no-op when none)."""
        conn = self._conn
        if conn is None or not (self._dirty or self._dirty_spis):
            return
        dirty, self._dirty = self._dirty, {}
        spis, self._dirty_spis = self._dirty_spis, set()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for hoa, b in dirty.items():
                if b is None:
                    conn.execute("DELETE FROM binding WHERE hoa = ?", (hoa,))
                else:
                    conn.execute(_UPSERT, _row(b))
            for spi in spis:
                conn.execute(_UPSERT_COUNTER, self._counter_row(spi))
        except BaseException:
            conn.execute("ROLLBACK")
            # Keep them for the next try; newer changes win over these.
            self._dirty = dirty | self._dirty
            self._dirty_spis |= spis
            raise
        conn.execute("COMMIT")

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Group many write-through changes in one commit (e.g. installing every SA at start)."""
        return self._transaction()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        conn = self._conn
        if conn is None or conn.in_transaction:
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else ":memory:"
        return f"BindingCache({where!r}, {len(self._entries)} bindings)"

    # ------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Binding]:
        return iter(list(self._entries.values()))

    def __contains__(self, hoa: object) -> bool:
        return hoa in self._entries

    def get(self, hoa: str) -> Binding | None:
        return self._entries.get(hoa)

    def by_address(self, packed: bytes) -> Binding | None:
        """The binding whose IPv6 or IPv4 home address is ``packed`` (16 or 4 octets)."""
        hoa = self._by_packed.get(packed)
        return None if hoa is None else self._entries.get(hoa)

    # ------------------------------------------------------------ changes

    def _index(self, b: Binding) -> None:
        # The caller may have mutated the stored object itself, so the old
        # addresses come from what was indexed, not from the entry.
        prev = self._indexed.get(b.hoa)
        if prev is None or prev[0] != b.ip4_hoa:
            for k in prev[1] if prev is not None else ():
                if self._by_packed.get(k) == b.hoa:
                    del self._by_packed[k]
            keys: tuple[bytes, ...] = (_packed(b.hoa),)
            if b.ip4_hoa is not None:
                keys += (_packed(b.ip4_hoa),)
            for k in keys:
                self._by_packed[k] = b.hoa
            self._indexed[b.hoa] = (b.ip4_hoa, keys)
        self._entries[b.hoa] = b
        heapq.heappush(self._heap, (b.expires_at, b.hoa))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(e.expires_at, e.hoa) for e in self._entries.values()]
            heapq.heapify(self._heap)

    def put(self, b: Binding) -> None:
        """Add or replace the binding for ``b.hoa`` (write-through when persistent).

        The caller may have mutated the object it got from ``get``: ``put`` is
        what records (and persists) the change.
        """
        if not b.hoa:
            raise LocalProtocolError("hoa: a binding needs a home address")
        self._index(b)
        if self._conn is not None:
            if self.write_behind:
                self._dirty[b.hoa] = b
            else:
                self._conn.execute(_UPSERT, _row(b))

    def delete(self, hoa: str) -> Binding | None:
        b = self._entries.pop(hoa, None)
        if b is None:
            return None
        for k in self._indexed.pop(hoa, (None, ()))[1]:
            if self._by_packed.get(k) == hoa:
                del self._by_packed[k]
        # The heap entry goes stale and is skipped by pop_expired.
        self.raise_floor(b.spi, b.mn_seq)
        if self._conn is not None:
            if self.write_behind:
                self._dirty[hoa] = None
            else:
                self._conn.execute("DELETE FROM binding WHERE hoa = ?", (hoa,))
        return b

    def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` in the cache (stale heap entries may make it early)."""
        return self._heap[0][0] if self._heap else None

    def pop_expired(self, now: float) -> list[Binding]:
        """Delete and return every binding with ``expires_at <= now``, earliest first."""
        out: list[Binding] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires_at, hoa = heapq.heappop(heap)
            b = self._entries.get(hoa)
            if b is not None and b.expires_at == expires_at:
                self.delete(hoa)
                out.append(b)
        return out

    # ------------------------------------------------------------ sequence state per SPI

    def _counter_row(self, spi: int) -> tuple[int, int, int]:
        return (spi, self._counters.get(spi, 0), self._floors.get(spi, -1))

    def _save_counter(self, spi: int) -> None:
        if self._conn is not None:
            self._dirty_spis.discard(spi)
            self._conn.execute(_UPSERT_COUNTER, self._counter_row(spi))

    def out_mark(self, spi: int) -> int | None:
        """First HA->MN sequence number surely never sent for ``spi`` (None: no record)."""
        return self._counters.get(spi)

    def set_out_mark(self, spi: int, mark: int) -> None:
        """Record that HA->MN numbers up to ``mark - 1`` may be used (always written at once)."""
        self._counters[spi] = mark
        self._save_counter(spi)

    def replay_floor(self, spi: int, hoa: str | None) -> int:
        """Highest MN->HA ESP sequence number known to be used on ``spi`` (-1: none).

        ``hoa`` is the SA's home address: its binding, when made under this
        SPI, holds the newest number; the SPI's own row covers deleted ones.
        """
        floor = self._floors.get(spi, -1)
        b = self._entries.get(hoa) if hoa is not None else None
        if b is not None and b.spi == spi and b.mn_seq > floor:
            floor = b.mn_seq
        return floor

    def raise_floor(self, spi: int, seq: int) -> None:
        """Record that MN->HA ESP number ``seq`` was used on ``spi`` (write-through)."""
        if seq > self._floors.get(spi, -1):
            self._floors[spi] = seq
            if self.write_behind:
                self._dirty_spis.add(spi)
            else:
                self._save_counter(spi)

    def forget_spi(self, spi: int) -> None:
        """Drop the per-SPI state of an SA that is gone."""
        self._counters.pop(spi, None)
        self._floors.pop(spi, None)
        self._dirty_spis.discard(spi)
        if self._conn is not None:
            self._conn.execute("DELETE FROM sa_counter WHERE spi = ?", (spi,))
