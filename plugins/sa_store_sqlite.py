"""SA stores: ``sqlite`` (a file, survives restarts) and ``memory`` (tests, demos).

Both keep every field of an ``IssuedSA`` (the SA of RFC 6618 §5.6 and the
bootstrap data of §5.7) in one SQLite table keyed by SPI.  The SPI is the
PRIMARY KEY and ``add`` is one atomic ``INSERT ... ON CONFLICT DO NOTHING``
(or, when the SPI is taken, one ``BEGIN IMMEDIATE`` transaction that clears an
expired holder first), so SPI uniqueness among live SAs (PROFILE §5) holds
across restarts and across every HAC process sharing the file.

Security note: the four SA keys are stored **in clear** (BLOB columns) -- the
HAC must hand them to an HA after a restart, so it needs them back.  The file
is created with mode 0600 and SQLite gives its ``-wal``/``-shm`` companions
the same mode; protecting the directory and backups is the operator's job.

Storage format: keys as BLOBs, datetimes as integer epoch seconds (UTC),
addresses and prefixes as text (``str(ipaddress object)``), the suite as its
16-bit code.  A ``validity_end`` with a fraction of a second is rounded
*down*: the SA then ends slightly early, never late.
"""

from __future__ import annotations

import heapq
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mipsec.core.errors import LocalProtocolError
from mipsec.core.fsutil import create_private
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.model import SPI_MAX, SPI_MIN, BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import Suite
from mipsec.plugins._options import parse_options, resolve_path

SCHEMA_VERSION = 1

# Column order of the issued_sa table; _to_row/_from_row follow it.
_COLUMNS = (
    "spi",
    "mn_id",
    "suite",
    "scope",
    "validity_end",
    "mn_to_ha_ikey",
    "ha_to_mn_ikey",
    "mn_to_ha_ekey",
    "ha_to_mn_ekey",
    "ha_id",
    "haa_ip6",
    "haa_ip4",
    "port",
    "ip6_hoa",
    "ip4_hoa",
    "ip6_hnp",
    "ip4_hnp",
    "dns_ip6",
    "dns_ip4",
)
_COLS = ", ".join(_COLUMNS)
_MARKS = ", ".join("?" for _ in _COLUMNS)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS issued_sa (
    spi            INTEGER PRIMARY KEY CHECK (spi BETWEEN 1 AND 268435455),
    mn_id          TEXT    NOT NULL,
    suite          INTEGER NOT NULL,
    scope          INTEGER NOT NULL,
    validity_end   INTEGER NOT NULL,   -- epoch seconds, UTC
    mn_to_ha_ikey  BLOB    NOT NULL,
    ha_to_mn_ikey  BLOB    NOT NULL,
    mn_to_ha_ekey  BLOB    NOT NULL,
    ha_to_mn_ekey  BLOB    NOT NULL,
    ha_id          TEXT    NOT NULL,
    haa_ip6        TEXT,
    haa_ip4        TEXT,
    port           INTEGER NOT NULL,
    ip6_hoa        TEXT,
    ip4_hoa        TEXT,
    ip6_hnp        TEXT,
    ip4_hnp        TEXT,
    dns_ip6        TEXT,
    dns_ip4        TEXT
);
CREATE INDEX IF NOT EXISTS issued_sa_validity_end ON issued_sa (validity_end);
CREATE INDEX IF NOT EXISTS issued_sa_mn_id ON issued_sa (mn_id);
-- SAs taken back before their validity end (superseded, revoked, never
-- delivered).  A row keeps its SPI out of use until the old validity end
-- (an HA may still hold a tombstone for it) and, while ``confirmed`` is 0,
-- tells the HAC to keep withdrawing it from its HA -- across restarts.
CREATE TABLE IF NOT EXISTS retired_sa (
    spi            INTEGER PRIMARY KEY,
    mn_id          TEXT    NOT NULL,
    ha_id          TEXT    NOT NULL,
    validity_end   INTEGER NOT NULL,
    reason         TEXT    NOT NULL,
    confirmed      INTEGER NOT NULL DEFAULT 0
);
"""

# Insert unless the SPI is retired (still reserved): one statement, atomic in
# autocommit mode; ON CONFLICT keeps a live holder of the SPI.
_INSERT = (
    f"INSERT INTO issued_sa ({_COLS}) SELECT {_MARKS} "  # noqa: S608 (constants)
    "WHERE NOT EXISTS (SELECT 1 FROM retired_sa WHERE spi = ?) "
    "ON CONFLICT (spi) DO NOTHING"
)

_T = TypeVar("_T")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp(dt: datetime, name: str) -> float:
    # A naive datetime would be read as local time: refuse it rather than
    # silently shift every validity end (model: "timezone-aware UTC").
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise LocalProtocolError(f"{name}: naive datetime, timezone-aware UTC expected")
    return dt.timestamp()


_TEXT_CACHE_MAX = 4096
_text_cache: dict[object, str] = {}


def _text(value: object | None) -> str | None:
    if value is None:
        return None
    # str() of an IPv6 address (RFC 5952 compression) is slow and the same few
    # addresses (HA, DNS, home prefix, each MN's HoA) recur in every SA: keep
    # the texts.  Keyed by the value: ipaddress objects compare by version too.
    text = _text_cache.get(value)
    if text is None:
        text = str(value)
        if len(_text_cache) >= _TEXT_CACHE_MAX:
            _text_cache.clear()
        _text_cache[value] = text
    return text


def _opt(cls: Callable[[str], _T], value: str | None) -> _T | None:
    return None if value is None else cls(value)


def _to_row(issued: IssuedSA) -> tuple[Any, ...]:
    sa, bs = issued.sa, issued.bootstrap
    return (
        sa.spi,
        sa.mn_id,
        int(sa.suite),
        sa.scope,
        math.floor(_timestamp(sa.validity_end, "validity_end")),
        bytes(sa.mn_to_ha_ikey),
        bytes(sa.ha_to_mn_ikey),
        bytes(sa.mn_to_ha_ekey),
        bytes(sa.ha_to_mn_ekey),
        sa.ha_id,
        _text(bs.haa_ip6),
        _text(bs.haa_ip4),
        bs.port,
        _text(bs.ip6_hoa),
        _text(bs.ip4_hoa),
        _text(bs.ip6_hnp),
        _text(bs.ip4_hnp),
        _text(bs.dns_ip6),
        _text(bs.dns_ip4),
    )


def _from_row(row: tuple[Any, ...]) -> IssuedSA:
    (
        spi,
        mn_id,
        suite,
        scope,
        validity_end,
        mn_to_ha_ikey,
        ha_to_mn_ikey,
        mn_to_ha_ekey,
        ha_to_mn_ekey,
        ha_id,
        haa_ip6,
        haa_ip4,
        port,
        ip6_hoa,
        ip4_hoa,
        ip6_hnp,
        ip4_hnp,
        dns_ip6,
        dns_ip4,
    ) = row
    sa = SecurityAssociation(
        spi=spi,
        mn_id=mn_id,
        suite=Suite(suite),
        scope=scope,
        validity_end=datetime.fromtimestamp(validity_end, tz=UTC),
        mn_to_ha_ikey=bytes(mn_to_ha_ikey),
        ha_to_mn_ikey=bytes(ha_to_mn_ikey),
        mn_to_ha_ekey=bytes(mn_to_ha_ekey),
        ha_to_mn_ekey=bytes(ha_to_mn_ekey),
        ha_id=ha_id,
    )
    bootstrap = BootstrapData(
        haa_ip6=_opt(IPv6Address, haa_ip6),
        haa_ip4=_opt(IPv4Address, haa_ip4),
        port=port,
        ip6_hoa=_opt(IPv6Address, ip6_hoa),
        ip4_hoa=_opt(IPv4Address, ip4_hoa),
        ip6_hnp=_opt(IPv6Network, ip6_hnp),
        ip4_hnp=_opt(IPv4Network, ip4_hnp),
        dns_ip6=_opt(IPv6Address, dns_ip6),
        dns_ip4=_opt(IPv4Address, dns_ip4),
    )
    return IssuedSA(sa=sa, bootstrap=bootstrap)


def _sorted(rows: list[tuple[Any, ...]]) -> list[IssuedSA]:
    # RETURNING gives no order guarantee: sort by (validity_end, spi).
    return [_from_row(r) for r in sorted(rows, key=lambda r: (r[4], r[0]))]


# Columns the live view needs, in _LiveView.insert's argument order.
_VIEW_COLS = "spi, validity_end, mn_id, ha_id, ip6_hoa, ip4_hoa"
_ViewRow = tuple[int, int, str, str, str | None, str | None]


class _LiveView:
    """SAs per HA and the newest holder of each HoA, kept in memory.

    The HAC asks for both on every bootstrap (HA selection, HoA allocation);
    answering with a table scan made each bootstrap cost O(live SAs).  The
    view follows this connection's own writes and is rebuilt when ``PRAGMA
    data_version`` shows that another connection (another HAC process sharing
    the file) committed.  Rows with ``validity_end <= floor`` have been dropped,
    so it answers only for instants ``>= floor``; earlier ones go to SQL.
    """

    def __init__(self, rows: Iterable[_ViewRow], data_version: int) -> None:
        self.data_version = data_version
        self.floor = -math.inf
        self._rows: dict[int, tuple[int, str, str, str | None, str | None]] = {}
        self._heap: list[tuple[int, int]] = []  # (validity_end, spi), stale entries allowed
        self._by_ha: dict[str, int] = {}
        self._holders: dict[str, dict[int, tuple[int, str]]] = {}  # hoa -> spi -> (end, mn_id)
        # hoa -> (validity_end, spi, mn_id) of its newest live SA: the holder the
        # SQL answer (rows ordered by validity_end, spi; later rows win) reports.
        self._best: dict[str, tuple[int, int, str]] = {}
        # hoa -> mn_id of _best[hoa], kept alongside: hoas_in_use() is then a
        # C-level dict copy rather than a Python loop over every live HoA.
        self._hoa_mn: dict[str, str] = {}
        for row in rows:
            self.insert(*row)

    def insert(
        self, spi: int, end: int, mn_id: str, ha_id: str, ip6: str | None, ip4: str | None
    ) -> None:
        if end <= self.floor:
            return  # already expired for every instant the view answers for
        self._rows[spi] = (end, mn_id, ha_id, ip6, ip4)
        heapq.heappush(self._heap, (end, spi))
        self._by_ha[ha_id] = self._by_ha.get(ha_id, 0) + 1
        for hoa in (ip6, ip4):
            if hoa is None:
                continue
            self._holders.setdefault(hoa, {})[spi] = (end, mn_id)
            best = self._best.get(hoa)
            if best is None or (end, spi) > best[:2]:
                self._best[hoa] = (end, spi, mn_id)
                self._hoa_mn[hoa] = mn_id

    def discard(self, spi: int) -> None:
        row = self._rows.pop(spi, None)
        if row is None:
            return
        _, _, ha_id, ip6, ip4 = row
        n = self._by_ha[ha_id] - 1
        if n:
            self._by_ha[ha_id] = n
        else:
            del self._by_ha[ha_id]
        for hoa in (ip6, ip4):
            holders = self._holders.get(hoa) if hoa is not None else None
            if holders is None or spi not in holders:
                continue
            assert hoa is not None
            del holders[spi]
            if not holders:
                del self._holders[hoa], self._best[hoa], self._hoa_mn[hoa]
            elif self._best[hoa][1] == spi:
                end, s, mn_id = max((e, s, m) for s, (e, m) in holders.items())
                self._best[hoa] = (end, s, mn_id)
                self._hoa_mn[hoa] = mn_id

    def advance(self, t: float) -> bool:
        """Drop every SA with ``validity_end <= t``; False if ``t`` is before the floor."""
        if t < self.floor:
            return False
        heap = self._heap
        while heap and heap[0][0] <= t:
            end, spi = heapq.heappop(heap)
            row = self._rows.get(spi)
            if row is not None and row[0] == end:
                self.discard(spi)
        self.floor = t
        return True

    def count_by_ha(self) -> dict[str, int]:
        return dict(sorted(self._by_ha.items()))

    def hoas_in_use(self) -> dict[str, str]:
        return self._hoa_mn.copy()


class SQLiteSAStore:
    """``SAStore`` over SQLite; ``path=None`` keeps it in memory only.

    ``clock`` gives "now" for ``add`` (which has no ``now`` argument in the
    protocol) when it clears an expired SA holding the same SPI.
    """

    def __init__(self, path: Path | None, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.path = path
        self._clock = clock
        if path is None:
            conn = sqlite3.connect(":memory:", isolation_level=None)
        else:
            create_private(path)
            conn = sqlite3.connect(path, isolation_level=None)
        try:
            # busy_timeout: several HAC processes may share one store.
            conn.execute("PRAGMA busy_timeout = 5000")
            if path is not None:
                # WAL: readers never block the writer.  synchronous = NORMAL:
                # no fsync per commit (it stalled the HAC's event loop on every
                # SA).  A commit still survives a process crash; a power loss
                # can drop the last commits, and SPI uniqueness never depends
                # on durability: add() checks it in the same transaction.
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
            self._view: _LiveView | None = None
            self._init_schema()
        except BaseException:
            conn.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteSAStore(path={str(self.path) if self.path else ':memory:'!r})"

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so check-then-insert in
        # add() cannot interleave with another process.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _init_schema(self) -> None:
        with self._tx() as c:
            # One statement at a time: executescript() would COMMIT our transaction.
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            rows = c.execute("SELECT version FROM schema_version").fetchall()
            if not rows:
                c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif len(rows) != 1 or rows[0][0] != SCHEMA_VERSION:
                found = ", ".join(str(r[0]) for r in rows)
                raise ValueError(
                    f"schema version {found} not supported (expected {SCHEMA_VERSION})"
                )

    def _now(self, now: datetime | None) -> float:
        return _timestamp(self._clock() if now is None else now, "now")

    # ------------------------------------------------------------ SAStore

    def add(self, issued: IssuedSA, now: datetime | None = None) -> bool:
        """Store ``issued``; False (nothing stored) if a live SA holds its SPI."""
        spi = issued.sa.spi
        if not SPI_MIN <= spi <= SPI_MAX:
            raise LocalProtocolError(f"spi: {spi} outside {SPI_MIN}..{SPI_MAX} (RFC 6618 §5.6.1)")
        row = _to_row(issued)
        t = self._now(now)
        # Nearly always the SPI is free: one INSERT, atomic on its own (the
        # connection is in autocommit mode), instead of a four-statement
        # transaction.  Only when the SPI is taken is an expired holder cleared.
        cur = self._conn.execute(_INSERT, (*row, spi))
        if cur.rowcount == 1:
            if self._view is not None:
                self._view.insert(row[0], row[4], row[1], row[9], row[13], row[14])
            return True
        with self._tx() as c:
            # An expired SA no longer holds its SPI (PROFILE §5: unique among live SAs).
            cur = c.execute("DELETE FROM issued_sa WHERE spi = ? AND validity_end <= ?", (spi, t))
            deleted = cur.rowcount > 0
            cur = c.execute(_INSERT, (*row, spi))
            inserted = cur.rowcount == 1
        view = self._view  # updated only once the transaction committed
        if view is not None:
            if deleted:
                view.discard(spi)
            if inserted:
                view.insert(row[0], row[4], row[1], row[9], row[13], row[14])
        return inserted

    def get(self, spi: int, now: datetime) -> IssuedSA | None:
        row = self._conn.execute(
            f"SELECT {_COLS} FROM issued_sa WHERE spi = ? AND validity_end > ?",  # noqa: S608
            (spi, _timestamp(now, "now")),
        ).fetchone()
        return None if row is None else _from_row(row)

    def remove(self, spi: int) -> IssuedSA | None:
        with self._tx() as c:
            rows = c.execute(
                f"DELETE FROM issued_sa WHERE spi = ? RETURNING {_COLS}",  # noqa: S608
                (spi,),
            ).fetchall()
        if rows and self._view is not None:
            self._view.discard(spi)
        return _from_row(rows[0]) if rows else None

    def live_for_mn(self, mn_id: str, now: datetime) -> list[IssuedSA]:
        """The live SAs of one MN, oldest first (validity end, then SPI)."""
        rows = self._conn.execute(
            f"SELECT {_COLS} FROM issued_sa WHERE mn_id = ? AND validity_end > ? "  # noqa: S608
            "ORDER BY validity_end, spi",
            (mn_id, _timestamp(now, "now")),
        ).fetchall()
        return [_from_row(r) for r in rows]

    def retire(self, spi: int, reason: str) -> IssuedSA | None:
        """Take a live SA back: remove it and record it as retired, atomically.

        The record keeps the SPI from being issued again until the SA's old
        validity end and lists it in ``retired_unconfirmed`` until
        ``confirm_retired``: the HAC keeps withdrawing it from its HA,
        across restarts.  None when no SA holds ``spi``.
        """
        with self._tx() as c:
            rows = c.execute(
                f"DELETE FROM issued_sa WHERE spi = ? RETURNING {_COLS}",  # noqa: S608
                (spi,),
            ).fetchall()
            if rows:
                r = rows[0]
                c.execute(
                    "INSERT INTO retired_sa (spi, mn_id, ha_id, validity_end, reason, confirmed) "
                    "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (spi) DO UPDATE SET confirmed = 0",
                    (r[0], r[1], r[9], r[4], reason),
                )
        if not rows:
            return None
        if self._view is not None:
            self._view.discard(spi)
        return _from_row(rows[0])

    def retired_unconfirmed(self, now: datetime) -> list[tuple[int, str, str, datetime]]:
        """``(spi, mn_id, ha_id, validity_end)`` of retired SAs whose HA has not
        confirmed the withdrawal and that are not yet past their validity end."""
        rows = self._conn.execute(
            "SELECT spi, mn_id, ha_id, validity_end FROM retired_sa "
            "WHERE confirmed = 0 AND validity_end > ? ORDER BY validity_end, spi",
            (_timestamp(now, "now"),),
        ).fetchall()
        return [(s, m, h, datetime.fromtimestamp(e, tz=UTC)) for s, m, h, e in rows]

    def confirm_retired(self, spi: int) -> None:
        """The HA confirmed the withdrawal of ``spi``: stop retrying (the SPI stays reserved)."""
        self._conn.execute("UPDATE retired_sa SET confirmed = 1 WHERE spi = ?", (spi,))

    def live(self, now: datetime) -> list[IssuedSA]:
        rows = self._conn.execute(
            f"SELECT {_COLS} FROM issued_sa WHERE validity_end > ? "  # noqa: S608
            "ORDER BY validity_end, spi",
            (_timestamp(now, "now"),),
        ).fetchall()
        return [_from_row(r) for r in rows]

    def expire(self, now: datetime) -> list[IssuedSA]:
        """Delete and return every SA whose validity end is <= now."""
        t = _timestamp(now, "now")
        with self._tx() as c:
            rows = c.execute(
                f"DELETE FROM issued_sa WHERE validity_end <= ? RETURNING {_COLS}",  # noqa: S608
                (t,),
            ).fetchall()
            # A retired SA's SPI is free again once its old validity end passed.
            c.execute("DELETE FROM retired_sa WHERE validity_end <= ?", (t,))
        if self._view is not None:
            for r in rows:
                self._view.discard(r[0])
        return _sorted(rows)

    def _live_view(self, now: datetime) -> _LiveView | None:
        """The live view advanced to ``now``; None when SQL must answer."""
        t = _timestamp(now, "now")
        # data_version first: a commit landing before the SELECT below then
        # only causes one more rebuild, never a missed change.
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        view = self._view
        if view is None or view.data_version != version:
            rows = self._conn.execute(f"SELECT {_VIEW_COLS} FROM issued_sa").fetchall()  # noqa: S608
            view = self._view = _LiveView(rows, version)
        return view if view.advance(t) else None

    def hoas_in_use(self, now: datetime) -> dict[str, str]:
        """Every home address (``str``) of a live SA -> its ``mn_id``.

        An address held by several live SAs maps to the ``mn_id`` of the newest
        (latest validity end, then highest SPI).
        """
        view = self._live_view(now)
        if view is not None:
            return view.hoas_in_use()
        return self._hoas_in_use_sql(now)

    def _hoas_in_use_sql(self, now: datetime) -> dict[str, str]:
        rows = self._conn.execute(
            "SELECT mn_id, ip6_hoa, ip4_hoa FROM issued_sa WHERE validity_end > ? "
            "ORDER BY validity_end, spi",
            (_timestamp(now, "now"),),
        ).fetchall()
        out: dict[str, str] = {}
        for mn_id, ip6_hoa, ip4_hoa in rows:
            for hoa in (ip6_hoa, ip4_hoa):
                if hoa is not None:
                    out[hoa] = mn_id
        return out

    def live_summary(self, now: datetime) -> tuple[dict[str, int], dict[str, str]]:
        """``(count_by_ha(now), hoas_in_use(now))`` from one look at the store.

        The HAC needs both on every bootstrap; each alone checks the live
        view against the file (``PRAGMA data_version``) first.
        """
        view = self._live_view(now)
        if view is not None:
            return view.count_by_ha(), view.hoas_in_use()
        return self._count_by_ha_sql(now), self._hoas_in_use_sql(now)

    def count_by_ha(self, now: datetime) -> dict[str, int]:
        """Number of live SAs per ``ha_id``."""
        view = self._live_view(now)
        if view is not None:
            return view.count_by_ha()
        return self._count_by_ha_sql(now)

    def _count_by_ha_sql(self, now: datetime) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT ha_id, COUNT(*) FROM issued_sa WHERE validity_end > ? GROUP BY ha_id",
            (_timestamp(now, "now"),),
        ).fetchall()
        return {ha_id: n for ha_id, n in rows}

    def close(self) -> None:
        self._view = None
        self._conn.close()

    def __enter__(self) -> SQLiteSAStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ------------------------------------------------------------ factories


class _SQLiteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1)


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SQLiteStoreFactory:
    name = "sqlite"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> SQLiteSAStore:
        opts = parse_options(_SQLiteOptions, options)
        path = resolve_path(opts.path, ctx.base_dir)
        try:
            return SQLiteSAStore(path)
        except (OSError, sqlite3.Error, ValueError) as exc:
            raise ValueError(f"path: cannot open SA store {str(path)!r}: {exc}") from None


class MemoryStoreFactory:
    name = "memory"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> SQLiteSAStore:
        parse_options(_NoOptions, options)
        return SQLiteSAStore(None)


@hookimpl
def mipsec_sa_stores() -> list[SQLiteStoreFactory | MemoryStoreFactory]:
    return [SQLiteStoreFactory(), MemoryStoreFactory()]
