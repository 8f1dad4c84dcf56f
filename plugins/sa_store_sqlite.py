"""SA stores: ``sqlite`` (a file, survives restarts) and ``memory`` (tests, demos).

Both keep every field of an ``IssuedSA`` (the SA of RFC 6618 §5.6 and the
bootstrap data of §5.7) in one SQLite table keyed by SPI.  The SPI is the
PRIMARY KEY and ``add`` runs in one ``BEGIN IMMEDIATE`` transaction, so SPI
uniqueness among live SAs (PROFILE §5) holds across restarts and across every
HAC process sharing the file.

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

import math
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mipsec.core.errors import LocalProtocolError
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
"""

_T = TypeVar("_T")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp(dt: datetime, name: str) -> float:
    # A naive datetime would be read as local time: refuse it rather than
    # silently shift every validity end (model: "timezone-aware UTC").
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise LocalProtocolError(f"{name}: naive datetime, timezone-aware UTC expected")
    return dt.timestamp()


def _text(value: object | None) -> str | None:
    return None if value is None else str(value)


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


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (it will hold keys)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # independent of the process umask
    finally:
        os.close(fd)


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
            _create_private(path)
            conn = sqlite3.connect(path, isolation_level=None)
        try:
            # busy_timeout: several HAC processes may share one store.
            conn.execute("PRAGMA busy_timeout = 5000")
            if path is not None:
                # WAL: readers never block the writer.  synchronous stays at
                # its FULL default: a committed SA survives a power loss, so
                # its SPI is never handed out twice.
                conn.execute("PRAGMA journal_mode = WAL")
            self._conn = conn
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
        with self._tx() as c:
            # An expired SA no longer holds its SPI (PROFILE §5: unique among live SAs).
            c.execute("DELETE FROM issued_sa WHERE spi = ? AND validity_end <= ?", (spi, t))
            cur = c.execute(
                f"INSERT INTO issued_sa ({_COLS}) VALUES ({_MARKS}) "  # noqa: S608 (constants)
                "ON CONFLICT (spi) DO NOTHING",
                row,
            )
            return cur.rowcount == 1

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
        return _from_row(rows[0]) if rows else None

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
        return _sorted(rows)

    def hoas_in_use(self, now: datetime) -> dict[str, str]:
        """Every home address (``str``) of a live SA -> its ``mn_id``."""
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

    def count_by_ha(self, now: datetime) -> dict[str, int]:
        """Number of live SAs per ``ha_id``."""
        rows = self._conn.execute(
            "SELECT ha_id, COUNT(*) FROM issued_sa WHERE validity_end > ? GROUP BY ha_id",
            (_timestamp(now, "now"),),
        ).fetchall()
        return {ha_id: n for ha_id, n in rows}

    def close(self) -> None:
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
