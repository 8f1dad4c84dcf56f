"""SA stores: ``sqlite`` (a file, survives restarts) and ``memory`` (tests, demos).

Both keep every field of an ``IssuedSA`` (the SA of RFC 6618 §5.6 and the
bootstrap data of §5.7) in one SQLite table keyed by SPI.  The SPI is the
PRIMARY KEY and ``add`` is one atomic ``INSERT ... ON CONFLICT DO NOTHING``
(or, when the SPI is taken, one ``BEGIN IMMEDIATE`` transaction that clears an
expired holder first), so SPI uniqueness among live SAs (PROFILE §5) holds
across restarts and across every HAC process sharing the file.

SA keys at rest (plugins/_sa_keys.py, core/keywrap.py): the four keys of a
row are one ``sa_keys`` BLOB, wrapped with AES-256-GCM under a key-wrapping
key read from ``key_file`` (default: the store's path + ``.key``; created
with 32 random octets, mode 0600, together with a new store), one random
nonce per row, the row's other columns as additional authenticated data.  A
verifier in ``store_meta`` tells a wrong key file at start.  A row that fails
authentication (edited, or keys moved from another row) is never returned:
it is logged once and treated as absent.  ``clear_keys = true`` stores them
in clear instead (the operator's explicit choice); a store is one or the
other for its whole life.

Conversion: a store that holds keys in clear -- schema 1 (mipsec before key
wrapping) or a ``clear_keys`` store -- opened with wrapping on is converted
once, in one transaction, with SQLite's ``secure_delete`` on (freed pages are
zeroed) and the WAL truncated afterwards, and the conversion is logged.  Its
rows are trusted as they are found.  The opposite (wrapped -> clear) is
refused: it would write keys in clear.

The file and the key file are refused at start when group or others may
access them (core/secretfiles.py); the file is created 0600 and SQLite gives
its ``-wal``/``-shm`` companions the same mode.

Storage format: datetimes as integer epoch seconds (UTC), addresses and
prefixes as text (``str(ipaddress object)``), the suite as its 16-bit code.  A
``validity_end`` with a fraction of a second is rounded *down*: the SA then
ends slightly early, never late.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from mipsec.core.addrtext import ip4_from_text, ip6_from_text, ip_text
from mipsec.core.errors import LocalProtocolError, StoreBusyError
from mipsec.core.fsutil import create_private
from mipsec.core.hoa_table import HoATable
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.keywrap import (
    KeyWrapper,
    UnwrapError,
    create_key_file,
    read_key_file,
)
from mipsec.core.model import SPI_MAX, SPI_MIN, BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.nai import nai_key
from mipsec.core.secretfiles import check_private, check_private_sqlite
from mipsec.core.sqlitetx import BUSY_TIMEOUT_MS, table_exists
from mipsec.core.sqlitetx import transaction as sqlite_transaction
from mipsec.core.suites import Suite
from mipsec.core.walcheckpoint import WalCheckpointer, limit_wal
from mipsec.plugins._options import parse_options, resolve_path
from mipsec.plugins._sa_keys import (
    MODE_CLEAR,
    MODE_WRAPPED,
    ClearKeys,
    KeyCodec,
    WrappedKeys,
    clear_blob_keys,
)

log = logging.getLogger("mipsec.plugins.sa_store")

SCHEMA_VERSION = 2

# Column order of the issued_sa table; _to_row/_from_row follow it.  Every
# column but the last is the "head" that authenticates the wrapped keys.
_HEAD = (
    "spi",
    "mn_id",
    "suite",
    "scope",
    "validity_end",
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
_COLUMNS = (*_HEAD, "sa_keys")
_COLS = ", ".join(_COLUMNS)
# What SELECT and RETURNING read: the keys always as a BLOB, so that a value
# edited into TEXT (invalid UTF-8) is refused like any other bad value rather
# than failing the query.
_READ = ", ".join((*_HEAD, "CAST(sa_keys AS BLOB)"))
_MARKS = ", ".join("?" for _ in _COLUMNS)
_N_HEAD = len(_HEAD)
# Indexes into a row, for the live view.
_SPI, _MN_ID, _END, _HA_ID, _IP6_HOA, _IP4_HOA = 0, 1, 4, 5, 9, 10

_TABLE = """
CREATE TABLE IF NOT EXISTS issued_sa (
    spi            INTEGER PRIMARY KEY CHECK (spi BETWEEN 1 AND 268435455),
    mn_id          TEXT    NOT NULL,
    suite          INTEGER NOT NULL,
    scope          INTEGER NOT NULL,
    validity_end   INTEGER NOT NULL,   -- epoch seconds, UTC
    ha_id          TEXT    NOT NULL,
    haa_ip6        TEXT,
    haa_ip4        TEXT,
    port           INTEGER NOT NULL,
    ip6_hoa        TEXT,
    ip4_hoa        TEXT,
    ip6_hnp        TEXT,
    ip4_hnp        TEXT,
    dns_ip6        TEXT,
    dns_ip4        TEXT,
    sa_keys        BLOB    NOT NULL,   -- plugins/_sa_keys.py
    pending        REAL                -- see _PENDING
)"""
# ``pending``: when an HAC that tracks delivery (``track_delivery``) stored
# the SA, epoch seconds; NULL once the MN has its 200 (``delivered_many``,
# batched) and for every SA stored otherwise.  An SA still pending long after
# any issuing could have finished was stored by an HAC that died before it
# answered: the MN never got it, so it is taken back (``undelivered``).  Not
# part of the head: the keys are not bound to it.  Older stores get the
# column added (NULL: delivered).
_PENDING_INDEX = (
    "CREATE INDEX IF NOT EXISTS issued_sa_pending ON issued_sa (pending) WHERE pending IS NOT NULL"
)
# One MN's rows: ``mn_id = ? COLLATE NOCASE`` is what this index serves, so
# an operator's lookup of any spelling of a realm (``live_for_nai``: revoke,
# ``sas --mn-id``) is a seek, not a scan of every live SA; the exact-case
# lookups add ``AND mn_id = ?`` and take the same index.  It replaces the
# binary index on mn_id (dropped when a store is opened): one index, not two,
# on every insert of a bootstrap.
_MN_INDEX = "CREATE INDEX IF NOT EXISTS issued_sa_mn_nocase ON issued_sa (mn_id COLLATE NOCASE)"
# SAs taken back before their validity end (superseded, revoked, never
# delivered).  A row keeps its SPI out of use until the old validity end (an
# HA may still hold a tombstone for it) and, while ``confirmed`` is 0, tells
# the HAC to keep withdrawing it from its HA -- across restarts.  No keys.
_RETIRED = """
CREATE TABLE IF NOT EXISTS retired_sa (
    spi            INTEGER PRIMARY KEY,
    mn_id          TEXT    NOT NULL,
    ha_id          TEXT    NOT NULL,
    validity_end   INTEGER NOT NULL,
    reason         TEXT    NOT NULL,
    confirmed      INTEGER NOT NULL DEFAULT 0,
    owner          TEXT                -- see _ALIVE
)"""
# Which HAC sharing the store owes each withdrawal (``owner``: the HAC that
# retired the SA or took the withdrawal over) and which HACs are alive: each
# one writes ``until`` (epoch seconds) at every sweep, a few sweeps ahead,
# and ``has``, the HAs it has configured (each between two newlines, which
# no HA id contains).  A withdrawal whose owner is alive and has its HA is
# left to it -- it retries until the HA confirms -- so during an HA outage N
# HACs do not all send, and warn about, what each of them owes; one whose
# owner stopped being alive (killed, or gone for good), or cannot reach its
# HA (not configured there), is taken over by the others' sweeps.  NULL
# owner: written by a store user that does not say who it is (a tool, an
# older mipsec): anyone's.
#
# ``beat`` is the writer's clock at the write.  A heartbeat whose ``beat``
# lies more than BEAT_SKEW ahead of the reader's clock is not believed: it
# was written by a clock running ahead, or before this host's clock was
# stepped back, and its ``until`` could otherwise keep a dead HAC's
# withdrawals unsent for as long as the step.  Not believing it errs towards
# sending a withdrawal twice (idempotent, confirmed by the HA either way)
# rather than late.  The owner's next sweep writes a heartbeat that is
# believed again.
#
# ``issuing`` is the writer's issuing bound (seconds): how long after its
# store write it may still be provisioning an SA and answering its MN (its
# ``provisioning_timeout`` and slack).  The sweep of undelivered SAs of
# every HAC waits the longest bound of any HAC that could still be issuing
# (``issuing_bound``), not only its own: with its own alone, a HAC
# configured with a shorter timeout took back SAs another one was still
# waiting for its HA to confirm (found in review).  0: written by a mipsec
# that did not say.
_ALIVE = (
    "CREATE TABLE IF NOT EXISTS hac_alive (owner TEXT PRIMARY KEY, until REAL NOT NULL, "
    "has TEXT NOT NULL DEFAULT '', beat REAL NOT NULL DEFAULT 0, "
    "issuing REAL NOT NULL DEFAULT 0)"
)
BEAT_SKEW = 5.0  # seconds a heartbeat may lie ahead of the reader's clock
# The owed withdrawals a HAC may take over: not those another live HAC can send.
_ORPHANED = (
    " AND (owner IS NULL OR owner = ? OR NOT EXISTS "
    "(SELECT 1 FROM hac_alive a WHERE a.owner = retired_sa.owner "
    "AND a.until > ? AND a.beat <= ? "  # believed: see _ALIVE
    "AND instr(a.has, char(10) || retired_sa.ha_id || char(10)) > 0))"
)
# The withdrawals still owed (``retired_unconfirmed``), and the columns a
# sweep's read in a worker thread needs of them.
_OWED_WHERE = " FROM retired_sa WHERE confirmed = 0 AND validity_end > ?"
_OWED_ROWS = "SELECT spi, mn_id, ha_id, validity_end" + _OWED_WHERE
_OWED_APART = "SELECT spi, ha_id, validity_end" + _OWED_WHERE
_OWED_ORDER = " ORDER BY validity_end, spi"
_RETIRE = (
    "INSERT INTO retired_sa (spi, mn_id, ha_id, validity_end, reason, confirmed, owner) "
    "VALUES (?, ?, ?, ?, ?, 0, ?) "
    "ON CONFLICT (spi) DO UPDATE SET confirmed = 0, owner = excluded.owner"
)
# The withdrawals still owed: read at every sweep of every HAC (adoption,
# core/roles/hac.py), while retired_sa holds every SA superseded in the
# last lifetime, nearly all confirmed -- 200,000 rows at 100,000 MNs: a scan
# of 32 ms per sweep without it, nothing with it.
_UNCONFIRMED_INDEX = (
    "CREATE INDEX IF NOT EXISTS retired_sa_unconfirmed "
    "ON retired_sa (validity_end, spi) WHERE confirmed = 0"
)
# Every statement may run on a schema 1 store being converted (IF NOT EXISTS).
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS store_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    _TABLE,
    "CREATE INDEX IF NOT EXISTS issued_sa_validity_end ON issued_sa (validity_end)",
    _MN_INDEX,
    _PENDING_INDEX,
    _RETIRED,
    _UNCONFIRMED_INDEX,
    _ALIVE,
)
# issued_sa_mn_id: the binary index of stores made before 2026-12-05.
_INDEXES = ("issued_sa_validity_end", "issued_sa_mn_nocase", "issued_sa_mn_id", "issued_sa_pending")
# Change log of issued_sa, written by triggers (so every writer, any version
# of mipsec with these triggers, any tool, logs its changes): another HAC
# sharing the file follows it to update its live view in O(changes) instead
# of re-reading the whole table after each foreign commit.  Only the SPI is
# logged; the reader fetches the row's current state.  seq is the rowid
# (AUTOINCREMENT cost ~10 µs more per write): expire() always keeps the newest
# entry, so the largest seq never goes back and seqs are never reused; a
# reader detects entries trimmed before it saw them by the gap.  ~10 µs per
# SA write for the trigger.
_LOG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS issued_sa_log (seq INTEGER PRIMARY KEY, spi INTEGER NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS issued_sa_log_ins AFTER INSERT ON issued_sa "
    "BEGIN INSERT INTO issued_sa_log (spi) VALUES (NEW.spi); END",
    "CREATE TRIGGER IF NOT EXISTS issued_sa_log_del AFTER DELETE ON issued_sa "
    "BEGIN INSERT INTO issued_sa_log (spi) VALUES (OLD.spi); END",
    # Only updates of the SA itself: clearing ``pending`` changes nothing a
    # reader's view holds.  (Stores made before ``pending`` had the trigger
    # on every column: replaced.)
    "DROP TRIGGER IF EXISTS issued_sa_log_upd",
    f"CREATE TRIGGER IF NOT EXISTS issued_sa_log_upd AFTER UPDATE OF {_COLS} ON issued_sa "  # noqa: S608
    "BEGIN INSERT INTO issued_sa_log (spi) VALUES (OLD.spi); "
    "INSERT INTO issued_sa_log (spi) VALUES (NEW.spi); END",
)
_LOG_KEEP = 1 << 17  # entries kept by expire() (>= 1); a reader further behind rebuilds
_CATCH_UP_MAX = 1 << 14  # more changes than this at once: rebuilding is as cheap
# Insert unless the SPI is retired (still reserved): one statement, atomic in
# autocommit mode; ON CONFLICT keeps a live holder of the SPI.
_INSERT = (
    f"INSERT INTO issued_sa ({_COLS}, pending) SELECT {_MARKS}, ? "  # noqa: S608 (constants)
    "WHERE NOT EXISTS (SELECT 1 FROM retired_sa WHERE spi = ?) "
    "ON CONFLICT (spi) DO NOTHING"
)
# Schema 1 (keys in four clear BLOB columns): read once, to convert it.
_V1_COLS = (
    "spi, mn_id, suite, scope, validity_end, ha_id, haa_ip6, haa_ip4, port, ip6_hoa, "
    "ip4_hoa, ip6_hnp, ip4_hnp, dns_ip6, dns_ip4, "
    "mn_to_ha_ikey, ha_to_mn_ikey, mn_to_ha_ekey, ha_to_mn_ekey"
)

_T = TypeVar("_T")


_DISCARD_ONE = "DELETE FROM issued_sa WHERE spi = ?"
# The undelivered sweep reads the partial index of pending rows only, so it
# costs what the pending SAs cost, not what the live ones do (issue 9).
_UNDELIVERED = "SELECT spi FROM issued_sa WHERE pending IS NOT NULL AND pending < ? ORDER BY spi"


def _converting(key_file: Path) -> Path:
    """Where a conversion's new key waits until its rows are committed."""
    return key_file.with_name(key_file.name + ".converting")


class StoreOptionError(ValueError):
    """A problem with one store option; ``option`` names it (``path``, ``key_file``, ...)."""

    def __init__(self, option: str, reason: str) -> None:
        self.option = option
        super().__init__(reason)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp(dt: datetime, name: str) -> float:
    # A naive datetime would be read as local time: refuse it rather than
    # silently shift every validity end (model: "timezone-aware UTC").
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise LocalProtocolError(f"{name}: naive datetime, timezone-aware UTC expected")
    return dt.timestamp()


_CACHE_MAX = 4096  # entries per memo below; a full memo starts over
_text_cache: dict[object, str] = {}
_addr_cache: dict[tuple[object, str], Any] = {}


def _memo(cache: dict[Any, Any], key: object, make: Callable[[], Any]) -> Any:
    value = cache.get(key)
    if value is None:
        value = make()
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = value
    return value


_text_by_id: dict[int, tuple[object, str]] = {}


def _text(value: object | None) -> str | None:
    # str() of an IPv6 address (RFC 5952 compression) is slow and the same few
    # addresses (HA, DNS, home prefix, each MN's HoA) recur in every SA: keep
    # the texts.  Keyed by the value: ipaddress objects compare by version too.
    # Mostly the very same objects recur (the configuration's): found first
    # by identity, which skips ipaddress's hash and equality (Python code).
    # The entry holds the object, so its id cannot be reused while cached.
    if value is None:
        return None
    hit = _text_by_id.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    text: str = _memo(
        _text_cache,
        value,
        lambda: ip_text(value) if isinstance(value, IPv4Address | IPv6Address) else str(value),
    )
    if len(_text_by_id) >= _CACHE_MAX:
        _text_by_id.clear()
    _text_by_id[id(value)] = (value, text)
    return text


def _opt(parse: Callable[[str], _T], value: str | None) -> _T | None:
    # Parsing an address text costs ~2 us in ipaddress (under 1 us with
    # core/addrtext.py) and every row holds up to eight of them, mostly the
    # same few (HA, DNS, home prefix): reading an SA back (supersede, retire,
    # withdraw) would spend more on parsing than on SQL.  The objects are
    # immutable, so one may be shared by many SAs.
    if value is None:
        return None
    return _memo(_addr_cache, (parse, value), lambda: parse(value))  # type: ignore[no-any-return]


def _head(issued: IssuedSA) -> tuple[Any, ...]:
    sa, bs = issued.sa, issued.bootstrap
    return (
        sa.spi,
        sa.mn_id,
        int(sa.suite),
        sa.scope,
        math.floor(_timestamp(sa.validity_end, "validity_end")),
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


def _from_row(row: tuple[Any, ...], keys: tuple[bytes, bytes, bytes, bytes]) -> IssuedSA:
    (
        spi,
        mn_id,
        suite,
        scope,
        validity_end,
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
    ) = row[:_N_HEAD]
    sa = SecurityAssociation(
        spi=spi,
        mn_id=mn_id,
        suite=Suite(suite),
        scope=scope,
        validity_end=datetime.fromtimestamp(validity_end, tz=UTC),
        mn_to_ha_ikey=keys[0],
        ha_to_mn_ikey=keys[1],
        mn_to_ha_ekey=keys[2],
        ha_to_mn_ekey=keys[3],
        ha_id=ha_id,
    )
    bootstrap = BootstrapData(
        haa_ip6=_opt(ip6_from_text, haa_ip6),
        haa_ip4=_opt(ip4_from_text, haa_ip4),
        port=port,
        ip6_hoa=_opt(ip6_from_text, ip6_hoa),
        ip4_hoa=_opt(ip4_from_text, ip4_hoa),
        ip6_hnp=_opt(IPv6Network, ip6_hnp),
        ip4_hnp=_opt(IPv4Network, ip4_hnp),
        dns_ip6=_opt(ip6_from_text, dns_ip6),
        dns_ip4=_opt(ip4_from_text, dns_ip4),
    )
    return IssuedSA(sa=sa, bootstrap=bootstrap)


# Columns the live view needs, in _LiveView.insert's argument order.
_VIEW_COLS = "spi, validity_end, mn_id, ha_id, ip6_hoa, ip4_hoa"
_ViewRow = tuple[int, int, str, str, str | None, str | None]
# A catch-up's read: the changes logged after a position, each with its
# SPI's current row (_VIEW_COLS; all NULL when the row is gone).
_CATCH_UP_SQL = (
    "SELECT l.seq, l.spi, "  # noqa: S608
    + ", ".join(f"i.{c}" for c in _VIEW_COLS.split(", "))
    + " FROM issued_sa_log l LEFT JOIN issued_sa i ON i.spi = l.spi "
    "WHERE l.seq > ? ORDER BY l.seq LIMIT ?"
)


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
        self.log_seq: int | None = None  # last issued_sa_log entry reflected (None: no log)
        self.floor = -math.inf
        self._rows: dict[int, tuple[int, str, str, str | None, str | None]] = {}
        self._heap: list[tuple[int, int]] = []  # (validity_end, spi), stale entries allowed
        self._by_ha: dict[str, int] = {}
        # hoa -> (validity_end, spi, mn_id) of its newest live SA: the holder the
        # SQL answer (rows ordered by validity_end, spi; later rows win) reports.
        self._best: dict[str, tuple[int, int, str]] = {}
        # hoa -> spi -> (end, mn_id) of every holder, only for the (rare) HoAs
        # with more than one live SA: a dict per HoA cost ~300 B per live SA.
        self._holders: dict[str, dict[int, tuple[int, str]]] = {}
        # hoa -> mn_id of _best[hoa], kept alongside with a journal of its
        # changes: the HoA allocator reads only those (core/hoa_table.py), so
        # a bootstrap never copies or walks the whole table.
        self._hoa_mn = HoATable()
        # mn_id -> its live SPIs (an int for the usual single SA, a tuple
        # otherwise: a set per MN would cost ~200 B per live SA).  The
        # supersede step asks for one MN's SAs on every bootstrap (issue 9).
        self._by_mn: dict[str, int | tuple[int, ...]] = {}
        self._max_end = -math.inf  # the latest validity_end ever inserted
        self._load(rows)

    def _load(self, rows: Iterable[_ViewRow]) -> None:
        """``insert`` of every row, in bulk (a start with 100k SAs waits for it).

        ``rows`` come ordered by (validity_end, spi): the heap is then the
        list itself, and for each HoA the last row seen is its newest holder.
        """
        # One tight pass (a start with 100k live SAs waits for it: issue 9).
        # ``setdefault`` looks up and stores in one call; what it returns
        # tells the usual row (an MN's only SA, addresses nobody else holds)
        # from the rare ones, handled as insert() would.
        rows_d, heap, by_mn = self._rows, self._heap, self._by_mn
        best_d, add_holder = self._best, self._add_holder
        hoa_mn: dict[str, str] = {}
        ha_ids: list[str] = []
        for spi, end, mn_id, ha_id, ip6, ip4 in rows:
            rows_d[spi] = (end, mn_id, ha_id, ip6, ip4)
            held = by_mn.setdefault(mn_id, spi)
            if held != spi:  # the MN's second (third...) live SA
                by_mn[mn_id] = (held, spi) if isinstance(held, int) else (*held, spi)
            heap.append((end, spi))
            ha_ids.append(ha_id)
            best = (end, spi, mn_id)
            for hoa in (ip6, ip4):
                if hoa is not None:
                    prev = best_d.setdefault(hoa, best)
                    if prev is not best:  # a second holder: the newest wins
                        add_holder(hoa, prev, spi, end, mn_id)
                        best_d[hoa] = best
                    hoa_mn[hoa] = mn_id  # rows come oldest first: the newest holder's
        self._by_ha.update(Counter(ha_ids))
        self._hoa_mn.load(hoa_mn)
        if heap:
            self._max_end = heap[-1][0]  # ordered by validity_end

    def _add_holder(
        self, hoa: str, best: tuple[int, int, str], spi: int, end: int, mn_id: str
    ) -> None:
        """A second (or further) live SA holds ``hoa``: keep every holder."""
        holders = self._holders.get(hoa)
        if holders is None:
            holders = self._holders[hoa] = {best[1]: (best[0], best[2])}
        holders[spi] = (end, mn_id)

    def insert(
        self, spi: int, end: int, mn_id: str, ha_id: str, ip6: str | None, ip4: str | None
    ) -> None:
        if end <= self.floor:
            return  # already expired for every instant the view answers for
        if spi in self._rows:
            self.discard(spi)  # a changed row: never counted twice
        self._rows[spi] = (end, mn_id, ha_id, ip6, ip4)
        self._mn_add(mn_id, spi)
        heapq.heappush(self._heap, (end, spi))
        if end > self._max_end:
            self._max_end = end
        self._by_ha[ha_id] = self._by_ha.get(ha_id, 0) + 1
        for hoa in (ip6, ip4):
            if hoa is None:
                continue
            best = self._best.get(hoa)
            if best is not None:
                self._add_holder(hoa, best, spi, end, mn_id)
            if best is None or (end, spi) > best[:2]:
                self._best[hoa] = (end, spi, mn_id)
                self._hoa_mn.set(hoa, mn_id)

    def discard(self, spi: int) -> None:
        row = self._rows.pop(spi, None)
        if row is None:
            return
        _, mn_id, ha_id, ip6, ip4 = row
        self._mn_remove(mn_id, spi)
        n = self._by_ha[ha_id] - 1
        if n:
            self._by_ha[ha_id] = n
        else:
            del self._by_ha[ha_id]
        for hoa in (ip6, ip4):
            if hoa is None:
                continue
            best = self._best.get(hoa)
            if best is None:
                continue
            holders = self._holders.get(hoa)
            if holders is None:  # the only holder
                if best[1] == spi:
                    del self._best[hoa]
                    self._hoa_mn.delete(hoa)
                continue
            if holders.pop(spi, None) is None:
                continue
            if best[1] == spi:
                end, s, mn_id = max((e, s, m) for s, (e, m) in holders.items())
                self._best[hoa] = (end, s, mn_id)
                self._hoa_mn.set(hoa, mn_id)
            if len(holders) == 1:
                del self._holders[hoa]  # back to a single holder: _best says it all

    def _mn_add(self, mn_id: str, spi: int) -> None:
        held = self._by_mn.get(mn_id)
        if held is None:
            self._by_mn[mn_id] = spi
        elif isinstance(held, int):
            self._by_mn[mn_id] = (held, spi)
        else:
            self._by_mn[mn_id] = (*held, spi)

    def _mn_remove(self, mn_id: str, spi: int) -> None:
        held = self._by_mn.get(mn_id)
        if held is None:
            return
        if isinstance(held, int):
            if held == spi:
                del self._by_mn[mn_id]
            return
        rest = tuple(s for s in held if s != spi)
        self._by_mn[mn_id] = rest[0] if len(rest) == 1 else rest

    def spis_for_mn(self, mn_id: str) -> list[tuple[int, float, str]]:
        """``(spi, validity_end, ha_id)`` of the MN's SAs in the view, oldest first."""
        held = self._by_mn.get(mn_id)
        if held is None:
            return []
        rows = self._rows
        if isinstance(held, int):
            row = rows[held]
            return [(held, row[0], row[2])]
        out: list[tuple[int, float, str]] = [(s, rows[s][0], rows[s][2]) for s in held]
        out.sort(key=lambda x: (x[1], x[0]))  # ORDER BY validity_end, spi
        return out

    def advance(self, t: float) -> bool:
        """Drop every SA with ``validity_end <= t``; False if ``t`` is before the floor."""
        if t < self.floor:
            return False
        if self._rows and self._max_end <= t:
            # Every SA has ended: a wall clock stepped past all of them (NTP
            # after a boot with a wrong clock, a suspended host).  One pass
            # per SA held a HAC with 100,000 of them ~300 ms, serving no one.
            self._clear()
        heap = self._heap
        while heap and heap[0][0] <= t:
            end, spi = heapq.heappop(heap)
            row = self._rows.get(spi)
            if row is not None and row[0] == end:
                self.discard(spi)
        self.floor = t
        return True

    def _clear(self) -> None:
        """Drop every row at once (the HoA table's readers rebuild, from nothing)."""
        for part in (self._rows, self._by_ha, self._best, self._holders, self._by_mn):
            part.clear()
        self._heap.clear()
        self._hoa_mn.clear()

    def count_by_ha(self) -> dict[str, int]:
        return dict(sorted(self._by_ha.items()))

    def hoas_in_use(self) -> dict[str, str]:
        return self._hoa_mn.copy()

    def hoa_table(self) -> HoATable:
        return self._hoa_mn


def default_key_file(path: Path) -> Path:
    """Where the key-wrapping key of the store at ``path`` lives when ``key_file`` is unset."""
    return path.with_name(path.name + ".key")


_REPORTED_MAX = 4096


class SQLiteSAStore:
    """``SAStore`` over SQLite; ``path=None`` keeps it in memory only.

    Keys are wrapped (see the module docstring) under the key in ``key_file``
    (default :func:`default_key_file`); a memory store wraps them under a
    random key of its own.  ``clear_keys=True`` stores them in clear.
    ``check_only=True`` validates an existing file (schema, key file) without
    writing anything, and creates nothing when the file is missing.

    ``clock`` gives "now" for ``add`` (which has no ``now`` argument in the
    protocol) when it clears an expired SA holding the same SPI.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        key_file: Path | None = None,
        clear_keys: bool = False,
        check_only: bool = False,
        clock: Callable[[], datetime] = _utcnow,
        checkpoint_interval: float = 0.0,
        synchronous: Literal["normal", "full"] = "normal",
    ) -> None:
        if clear_keys and key_file is not None:
            raise StoreOptionError(
                "clear_keys", "clear_keys = true and key_file exclude each other"
            )
        if path is None and key_file is not None:
            raise StoreOptionError("key_file", "a memory store has no key file")
        if synchronous not in ("normal", "full"):  # it goes into a PRAGMA's text
            raise StoreOptionError("synchronous", f'{synchronous!r}: "normal" or "full"')
        self.path = path
        self.key_file = None if clear_keys or path is None else key_file or default_key_file(path)
        self._clock = clock
        # Set by the HAC: SAs it stores are pending until ``delivered_many``.
        self.track_delivery = False
        # Set by the HAC: who it is among the HACs sharing the store (_ALIVE).
        self.owner: str | None = None
        self._reported: set[int] = set()
        self._view: _LiveView | None = None
        self._outer = False  # inside transaction(): _tx joins it
        self._checkpointer: WalCheckpointer | None = None
        if path is not None:
            self._check_modes(path)
        conn = self._connect(path, check_only)
        try:
            # busy_timeout: several HAC processes may share one store.
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if path is not None and not check_only:
                # WAL: readers never block the writer.  synchronous = NORMAL
                # (default): no fsync per commit (it stalled the HAC's event
                # loop on every SA).  A commit still survives a process crash;
                # a power loss can drop the commits since the last checkpoint
                # -- SAs an HA may already hold, whose SPIs and home addresses
                # the HAC could then hand out again.  FULL: an fsync per
                # commit (one per group commit on the HAC), power-loss-safe.
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
                limit_wal(conn)
            self._conn = conn
            self._codec: KeyCodec = self._init_schema(clear_keys, check_only)
            if isinstance(self._codec, ClearKeys):
                # Keys in clear: at least do not leave deleted ones in free pages.
                conn.execute("PRAGMA secure_delete = ON")
            if checkpoint_interval > 0 and path is not None and not check_only:
                # core/walcheckpoint.py: the WAL's copies and fsyncs off the
                # thread that commits (the HAC's event loop).
                self._checkpointer = WalCheckpointer.attach(
                    conn, path, checkpoint_interval, log, f"SA store checkpoint of {str(path)!r}"
                )
        except BaseException:
            conn.close()
            raise

    def __repr__(self) -> str:
        where = str(self.path) if self.path else ":memory:"
        return f"SQLiteSAStore(path={where!r}, keys={self._codec.mode!r})"

    @property
    def key_mode(self) -> str:
        """``"aes-256-gcm"`` (wrapped) or ``"clear"``."""
        return self._codec.mode

    # ------------------------------------------------------------ opening

    def _check_modes(self, path: Path) -> None:
        try:
            check_private_sqlite(path)
        except ValueError as exc:
            raise StoreOptionError("path", str(exc)) from None
        if self.key_file is not None:
            try:
                check_private(self.key_file)
            except ValueError as exc:
                raise StoreOptionError("key_file", str(exc)) from None

    @staticmethod
    def _connect(path: Path | None, check_only: bool) -> sqlite3.Connection:
        if path is None:
            return sqlite3.connect(":memory:", isolation_level=None)
        if check_only:
            if path.exists():
                # Read-write but never written: closing the last connection
                # then removes the -wal/-shm files it opened (a read-only one
                # would leave them behind).
                return sqlite3.connect(path, isolation_level=None)
            # A start would create it here: say now whether it could.
            parent = path.parent
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise StoreOptionError(
                    "path", f"cannot create {str(path)!r}: {parent} is not a writable directory"
                )
            return sqlite3.connect(":memory:", isolation_level=None)
        create_private(path)
        return sqlite3.connect(path, isolation_level=None)

    @contextmanager
    def transaction(self, *, wait: float | None = None) -> Iterator[None]:
        """Everything written inside -- by this store and on
        ``shared_connection()`` -- in one transaction, one commit.

        The HA stores a burst of installs and their binding-cache records this
        way (``[bindings] in_sa_store``; issue 9).  On an error everything is
        rolled back, the live view is dropped (it may list rolled-back rows;
        it is rebuilt at the next look), and the error propagates.  Optional:
        not part of the ``SAStore`` protocol.

        ``wait``: how long (seconds) to wait for the write lock if another
        process holds it, instead of the connection's 5 s; ``StoreBusyError``
        when it is still held -- nothing was written.  The HAC's group commit
        passes 0 and retries from its event loop, which a 5 s wait inside
        SQLite would stall for every MN.
        """
        if self._outer:
            raise LocalProtocolError("transaction: already inside one")
        self._outer = True
        try:
            with sqlite_transaction(self._conn, wait=wait):
                yield
        except StoreBusyError:
            raise  # nothing begun: the view is still right (a rebuild costs O(live SAs))
        except BaseException:
            self._view = None
            raise
        finally:
            self._outer = False

    def shared_connection(self) -> sqlite3.Connection:
        """This store's connection, for a component of the same process that
        keeps its own tables in this file and writes them inside
        ``transaction()`` (the HA's binding cache, ``[bindings] in_sa_store``).

        Only for a store with a file: a memory store's rows do not survive a
        restart, so neither should anything joined to them.  Optional: not
        part of the ``SAStore`` protocol.
        """
        if self.path is None:
            raise StoreOptionError("path", "a memory store cannot hold another component's tables")
        return self._conn

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE (core/sqlitetx.py): check-then-insert in add() cannot
        # interleave with another process.
        conn = self._conn
        if self._outer:
            yield conn  # transaction() commits, or rolls back, everything
            return
        with sqlite_transaction(conn, "BEGIN IMMEDIATE" if write else "BEGIN"):
            yield conn

    def _init_schema(self, clear_keys: bool, check_only: bool) -> KeyCodec:
        """Create, check or convert the schema; the codec for this store's keys."""
        codec = self._init_tables(clear_keys, check_only)
        self._has_log = False
        if not check_only:
            with self._tx() as c:
                columns = {r[1] for r in c.execute("PRAGMA table_info(issued_sa)")}
                if "pending" not in columns:  # a store made before ``pending``
                    c.execute("ALTER TABLE issued_sa ADD COLUMN pending REAL")
                    c.execute(_PENDING_INDEX)
                retired_columns = {r[1] for r in c.execute("PRAGMA table_info(retired_sa)")}
                if "owner" not in retired_columns:  # a store made before owners
                    c.execute("ALTER TABLE retired_sa ADD COLUMN owner TEXT")
                c.execute(_ALIVE)
                alive_columns = {r[1] for r in c.execute("PRAGMA table_info(hac_alive)")}
                if "beat" not in alive_columns:  # a store made before 2026-12-06
                    c.execute("ALTER TABLE hac_alive ADD COLUMN beat REAL NOT NULL DEFAULT 0")
                if "issuing" not in alive_columns:  # a store made before 2026-12-07
                    c.execute("ALTER TABLE hac_alive ADD COLUMN issuing REAL NOT NULL DEFAULT 0")
                indexes = {
                    r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
                }
                if "issued_sa_mn_nocase" not in indexes:  # a store made before 2026-12-05
                    c.execute(_MN_INDEX)
                if "issued_sa_mn_id" in indexes:
                    c.execute("DROP INDEX issued_sa_mn_id")
                if "retired_sa_unconfirmed" not in indexes:  # a store made before 2026-12-05
                    c.execute(_UNCONFIRMED_INDEX)
        if not check_only and self.path is not None:  # a memory store has no other reader
            # Also on stores made before the log existed (no version change:
            # an older mipsec just ignores the table; its triggers keep logging).
            with self._tx() as c:
                for stmt in _LOG_SCHEMA:
                    c.execute(stmt)
            self._has_log = True
        return codec

    def _init_tables(self, clear_keys: bool, check_only: bool) -> KeyCodec:
        write = not check_only
        with self._tx(write=write) as c:
            version = self._schema_version(c)
            if version is None:  # a new store
                codec = self._fresh_codec(clear_keys, create=write)
                if write:
                    for stmt in _SCHEMA:
                        c.execute(stmt)
                    c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                    self._write_meta(c, codec)
                return codec
            mode = MODE_CLEAR if version == 1 else self._meta(c, "key_mode")
            if mode == MODE_WRAPPED:
                return self._wrapped_codec(c, clear_keys)
            if mode != MODE_CLEAR:
                raise ValueError(f"key_mode {mode!r} not supported")
            kf = self.key_file
            key_existed = kf is not None and kf.exists()
            pending: Path | None = None
            if write and not clear_keys and kf is not None and not key_existed:
                # The key for a conversion is made beside its final name and
                # put in place only once the rows it wraps are committed: a
                # conversion cut short (killed, disk full) leaves no key file
                # behind that the next start would take for an edited
                # store's (found in review).
                pending = _converting(kf)
                pending.unlink(missing_ok=True)
                codec = WrappedKeys(KeyWrapper(create_key_file(pending)))
            else:
                codec = self._fresh_codec(clear_keys, create=write)
            converted = write and (version == 1 or isinstance(codec, WrappedKeys))
            if isinstance(codec, WrappedKeys) and key_existed and (converted or not write):
                self._refuse_conversion(c)  # check-config says it too
            if converted:
                self._convert(c, version, codec)
        if pending is not None and kf is not None:
            os.replace(pending, kf)
            log.info("SA store %s: new key-wrapping key %s (mode 0600)", self.path, kf)
        if converted:
            self._after_conversion()
        return codec

    @staticmethod
    def _schema_version(c: sqlite3.Connection) -> int | None:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables and "issued_sa" not in tables:
            return None
        rows = (
            c.execute("SELECT version FROM schema_version").fetchall()
            if "schema_version" in tables
            else []
        )
        if len(rows) != 1 or rows[0][0] not in (1, SCHEMA_VERSION):
            found = ", ".join(str(r[0]) for r in rows) or "none"
            raise ValueError(f"schema version {found} not supported (expected {SCHEMA_VERSION})")
        return int(rows[0][0])

    @staticmethod
    def _meta(c: sqlite3.Connection, name: str) -> Any:
        row = c.execute("SELECT value FROM store_meta WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ValueError(f"store_meta: {name} missing")
        return row[0]

    @staticmethod
    def _write_meta(c: sqlite3.Connection, codec: KeyCodec) -> None:
        c.execute("DELETE FROM store_meta")
        c.execute("INSERT INTO store_meta (name, value) VALUES ('key_mode', ?)", (codec.mode,))
        if isinstance(codec, WrappedKeys):
            c.execute(
                "INSERT INTO store_meta (name, value) VALUES ('key_check', ?)",
                (codec.wrapper.verifier(),),
            )

    def _refuse_conversion(self, c: sqlite3.Connection) -> None:
        """A store that says it holds keys in clear, opened with a key file
        that existed already: not converted.  The conversion trusts every row
        it finds, so whoever could write the store file but not read the key
        file could set ``key_mode`` to clear, drop ``key_check``, and have
        rows of keys and validity ends of their choosing wrapped and served
        at the next start (found in review).  A store really written in
        clear (an older mipsec, ``clear_keys``) holds no key wrapped under
        that file: it is converted when the key file is made for it."""
        if c.execute("SELECT 1 FROM issued_sa LIMIT 1").fetchone() is None:
            return  # no row to trust
        raise StoreOptionError(
            "key_file",
            f"{self.path} says its SA keys are in clear while {self.key_file} already exists: "
            "not converted (a store written with that key holds its keys wrapped, so this "
            "one was written in clear -- or edited); if it was written in clear by an older "
            "mipsec or with clear_keys, move the key file away and start again: a new key "
            "is made and the store converted",
        )

    def _fresh_codec(self, clear_keys: bool, *, create: bool) -> KeyCodec:
        """The codec for a store that holds no wrapped key yet (its key file may be new)."""
        if clear_keys:
            return ClearKeys()
        kf = self.key_file
        if kf is None:  # memory store: a key of its own, gone with the process
            return WrappedKeys(KeyWrapper(os.urandom(32)))
        if kf.exists():
            return WrappedKeys(KeyWrapper(self._read_key(kf)))
        if not create:  # check_only: a start would create it
            return WrappedKeys(KeyWrapper(os.urandom(32)))
        try:
            material = create_key_file(kf)
        except FileExistsError:
            material = self._read_key(kf)
        except OSError as exc:
            raise StoreOptionError(
                "key_file", f"cannot create {str(kf)!r}: {exc.strerror or exc}"
            ) from None
        else:
            log.info("SA store %s: new key-wrapping key %s (mode 0600)", self.path, kf)
        return WrappedKeys(KeyWrapper(material))

    def _wrapped_codec(self, c: sqlite3.Connection, clear_keys: bool) -> WrappedKeys:
        if clear_keys:
            raise StoreOptionError(
                "clear_keys",
                f"{self.path} holds wrapped SA keys: clear_keys = true would write new ones "
                "in clear beside them; remove it and give the store's key_file",
            )
        kf = self.key_file
        assert kf is not None
        if not kf.exists() and _converting(kf).exists():
            # Killed between a conversion's commit and putting its key in
            # place: the key is beside it (key_check below proves it).
            os.replace(_converting(kf), kf)
            log.warning(
                "SA store %s: key file %s of a conversion cut short put in place", self.path, kf
            )
        if not kf.exists():
            raise StoreOptionError(
                "key_file",
                f"{kf}: no such file, and the SA keys in {self.path} are wrapped with it",
            )
        wrapper = KeyWrapper(self._read_key(kf))
        if not wrapper.matches(self._meta(c, "key_check")):
            raise StoreOptionError(
                "key_file", f"{kf} is not the key the SA keys in {self.path} were wrapped with"
            )
        return WrappedKeys(wrapper)

    @staticmethod
    def _read_key(kf: Path) -> bytes:
        try:
            return read_key_file(kf)
        except ValueError as exc:
            raise StoreOptionError("key_file", str(exc)) from None

    def _convert(self, c: sqlite3.Connection, version: int, codec: KeyCodec) -> None:
        """Rewrite every row with ``codec`` (schema 1, or clear -> wrapped), in ``c``'s
        transaction; freed pages are zeroed (``secure_delete``)."""
        c.execute("PRAGMA secure_delete = ON")
        if version == 1:
            rows = [
                (r[:_N_HEAD], (r[15], r[16], r[17], r[18]))
                for r in c.execute(f"SELECT {_V1_COLS} FROM issued_sa")  # noqa: S608
            ]
        else:
            rows = [
                (r[:_N_HEAD], clear_blob_keys(r[_N_HEAD]))
                for r in c.execute(f"SELECT {_READ} FROM issued_sa")  # noqa: S608
            ]
        c.execute("ALTER TABLE issued_sa RENAME TO issued_sa_old")
        for index in _INDEXES:  # index names are global: free them for the new table
            c.execute(f"DROP INDEX IF EXISTS {index}")
        for stmt in _SCHEMA:
            c.execute(stmt)
        c.executemany(
            f"INSERT INTO issued_sa ({_COLS}) VALUES ({_MARKS})",  # noqa: S608 (constants)
            [(*head, codec.seal(head, keys)) for head, keys in rows],
        )
        c.execute("DROP TABLE issued_sa_old")
        c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        self._write_meta(c, codec)
        log.warning(
            "SA store %s: %d SAs converted from schema %d, keys now %s",
            self.path,
            len(rows),
            version,
            codec.mode,
        )

    def _after_conversion(self) -> None:
        # The old rows may still sit in WAL frames: copy the zeroed pages
        # into the file and truncate the WAL.
        if self.path is not None:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self._conn.execute("PRAGMA secure_delete = OFF")

    def _now(self, now: datetime | None) -> float:
        return _timestamp(self._clock() if now is None else now, "now")

    def _decode(self, row: tuple[Any, ...]) -> IssuedSA | None:
        head = row[:_N_HEAD]
        try:
            keys = self._codec.open(head, row[_N_HEAD])
        except UnwrapError as exc:
            spi = row[_SPI]
            if spi not in self._reported:  # once per SPI: no log flood from a bad row
                if len(self._reported) >= _REPORTED_MAX:
                    self._reported.clear()
                self._reported.add(spi)
                log.error(
                    "SA store %s: spi=%d mn_id=%r refused: %s (row altered, or not written "
                    "by this store)",
                    self.path or ":memory:",
                    spi,
                    row[_MN_ID],
                    exc,
                )
            return None
        return _from_row(head, keys)

    def _decoded(self, rows: Iterable[tuple[Any, ...]]) -> list[IssuedSA]:
        out = []
        for r in rows:
            x = self._decode(r)
            if x is not None:
                out.append(x)
        return out

    def _sorted(self, rows: list[tuple[Any, ...]]) -> list[IssuedSA]:
        # RETURNING gives no order guarantee: sort by (validity_end, spi).
        return self._decoded(sorted(rows, key=lambda r: (r[_END], r[_SPI])))

    # ------------------------------------------------------------ SAStore

    def _sealed_row(self, issued: IssuedSA) -> tuple[int, tuple[Any, ...], tuple[Any, ...]]:
        """``(spi, head, row)`` of ``issued``: its columns and its sealed keys."""
        sa = issued.sa
        spi = sa.spi
        if not SPI_MIN <= spi <= SPI_MAX:
            raise LocalProtocolError(f"spi: {spi} outside {SPI_MIN}..{SPI_MAX} (RFC 6618 §5.6.1)")
        head = _head(issued)
        blob = self._codec.seal(
            head, (sa.mn_to_ha_ikey, sa.ha_to_mn_ikey, sa.mn_to_ha_ekey, sa.ha_to_mn_ekey)
        )
        return spi, head, (*head, blob)

    def add(self, issued: IssuedSA, now: datetime | None = None) -> bool:
        """Store ``issued``; False (nothing stored) if a live SA holds its SPI
        or the SPI is retired (``retire``) and not yet past its old validity end."""
        spi, head, row = self._sealed_row(issued)
        t = self._now(now)
        pending = t if self.track_delivery else None
        # Nearly always the SPI is free: one INSERT, atomic on its own (the
        # connection is in autocommit mode), instead of a four-statement
        # transaction.  Only when the SPI is taken is an expired holder cleared.
        cur = self._conn.execute(_INSERT, (*row, pending, spi))
        if cur.rowcount == 1:
            if self._view is not None:
                self._view_insert(self._view, head)
            return True
        with self._tx() as c:
            # An expired SA no longer holds its SPI (PROFILE §5: unique among live SAs).
            cur = c.execute("DELETE FROM issued_sa WHERE spi = ? AND validity_end <= ?", (spi, t))
            deleted = cur.rowcount > 0
            cur = c.execute(_INSERT, (*row, pending, spi))
            inserted = cur.rowcount == 1
        view = self._view  # updated only once the transaction committed
        if view is not None:
            if deleted:
                view.discard(spi)
            if inserted:
                self._view_insert(view, head)
        return inserted

    def add_bulk(self, issued: Iterable[IssuedSA]) -> int:
        """Store many SAs in one transaction (filling a store: benches, migrations).

        All or nothing: an SPI already held (live or retired) fails the whole
        batch with ``sqlite3.IntegrityError``.  Returns how many were stored.
        """
        rows = []
        for x in issued:
            sa = x.sa
            if not SPI_MIN <= sa.spi <= SPI_MAX:
                raise LocalProtocolError(
                    f"spi: {sa.spi} outside {SPI_MIN}..{SPI_MAX} (RFC 6618 §5.6.1)"
                )
            head = _head(x)
            keys = (sa.mn_to_ha_ikey, sa.ha_to_mn_ikey, sa.mn_to_ha_ekey, sa.ha_to_mn_ekey)
            rows.append((*head, self._codec.seal(head, keys)))
        with self._tx() as c:
            spis = [(r[_SPI],) for r in rows]
            c.execute("CREATE TEMP TABLE IF NOT EXISTS bulk_spi (spi INTEGER PRIMARY KEY)")
            c.execute("DELETE FROM bulk_spi")
            c.executemany("INSERT INTO bulk_spi (spi) VALUES (?)", spis)
            if c.execute("SELECT 1 FROM retired_sa JOIN bulk_spi USING (spi) LIMIT 1").fetchone():
                raise sqlite3.IntegrityError("add_bulk: an SPI is retired")
            c.execute("DELETE FROM bulk_spi")
            c.executemany(
                f"INSERT INTO issued_sa ({_COLS}) VALUES ({_MARKS})",  # noqa: S608 (constants)
                rows,
            )
        self._view = None  # rebuilt from the table at the next look
        return len(rows)

    def add_many(self, group: Sequence[IssuedSA], now: datetime | None = None) -> list[bool]:
        """``add`` of each SA of ``group`` in one transaction (one commit).

        The HA's group commit of a burst of installs (issue 9).  False for an
        SA whose SPI is held or retired: nothing stored for that one -- the
        caller calls ``add`` for it, whose own path clears an expired holder.
        A failure rolls back the whole group.  Optional fast path: not part of
        the ``SAStore`` protocol.
        """
        rows = [self._sealed_row(issued) for issued in group]  # refuses bad SPIs first
        t = self._now(now)
        pending = t if self.track_delivery else None
        with self._tx() as c:
            added = [
                c.execute(_INSERT, (*row, pending, spi)).rowcount == 1 for spi, _h, row in rows
            ]
        view = self._view  # updated only once the transaction committed
        if view is not None:
            for (_spi, head, _row), ok in zip(rows, added, strict=True):
                if ok:
                    self._view_insert(view, head)
        return added

    @staticmethod
    def _view_insert(view: _LiveView, head: tuple[Any, ...]) -> None:
        view.insert(
            head[_SPI], head[_END], head[_MN_ID], head[_HA_ID], head[_IP6_HOA], head[_IP4_HOA]
        )

    def get(self, spi: int, now: datetime) -> IssuedSA | None:
        row = self._conn.execute(
            f"SELECT {_READ} FROM issued_sa WHERE spi = ? AND validity_end > ?",  # noqa: S608
            (spi, _timestamp(now, "now")),
        ).fetchone()
        return None if row is None else self._decode(row)

    def remove(self, spi: int) -> IssuedSA | None:
        with self._tx() as c:
            rows = c.execute(
                f"DELETE FROM issued_sa WHERE spi = ? RETURNING {_READ}",  # noqa: S608
                (spi,),
            ).fetchall()
        if rows and self._view is not None:
            self._view.discard(spi)
        return self._decode(rows[0]) if rows else None

    def discard(self, spi: int) -> bool:
        """``remove`` without reading the SA back: True if a row held ``spi``.

        Optional fast path (the HA's withdrawal, which has no use for the SA's
        keys): not part of the ``SAStore`` protocol, callers fall back to
        ``remove``.
        """
        return self.discard_many((spi,)) > 0

    def discard_many(self, spis: Iterable[int]) -> int:
        """``discard`` of many SPIs in one transaction (one commit): how many
        rows held one.  Optional fast path, like ``discard``."""
        spis = list(spis)
        if not spis:
            return 0
        if len(spis) == 1:  # the common case: one statement, its own commit
            gone = self._conn.execute(_DISCARD_ONE, spis).rowcount
        else:
            with self._tx() as c:
                gone = 0
                for i in range(0, len(spis), 500):  # SQLite's bound-parameter limit
                    part = spis[i : i + 500]
                    marks = ", ".join("?" for _ in part)
                    gone += c.execute(
                        f"DELETE FROM issued_sa WHERE spi IN ({marks})",  # noqa: S608
                        part,
                    ).rowcount
        view = self._view  # updated only once the transaction committed
        if view is not None:
            for spi in spis:
                view.discard(spi)
        return gone

    def live_spis_for_mn(self, mn_id: str, now: datetime) -> list[tuple[int, float, str]]:
        """``(spi, validity_end, ha_id)`` of one MN's live SAs, oldest first.

        Optional fast path of ``live_for_mn`` for the HAC's supersede step,
        which only orders the SAs: no key unwrapping, no address parsing, and
        no SQL when the live view is current (one dict lookup).
        """
        view = self._live_view(now)
        if view is not None:
            return view.spis_for_mn(mn_id)
        return self._conn.execute(
            "SELECT spi, validity_end, ha_id FROM issued_sa WHERE mn_id = ? COLLATE NOCASE "
            "AND mn_id = ? AND validity_end > ? ORDER BY validity_end, spi",
            (mn_id, mn_id, _timestamp(now, "now")),
        ).fetchall()

    def live_listing(
        self, now: datetime, mn_id: str | None = None
    ) -> list[tuple[int, str, str, int, int, float, str | None, str | None]]:
        """``(spi, mn_id, ha_id, suite, scope, validity_end, ip6_hoa, ip4_hoa)``
        of the live SAs (of one MN), for an operator's listing.

        Optional fast path of ``live`` (``mipsec sas``/``status``): the columns as
        stored, no key unwrapping -- at 100,000 SAs that would hold the event
        loop for seconds.  A row altered on disk is listed as it reads; it is
        still refused wherever the SA is used (its keys fail to unwrap).
        """
        if mn_id is not None:
            return self._live_rows_of_nai(self._LISTING, 1, mn_id, now)  # any spelling
        return self._conn.execute(self._LIVE_LISTING, (_timestamp(now, "now"),)).fetchall()

    _LISTING = "spi, mn_id, ha_id, suite, scope, validity_end, ip6_hoa, ip4_hoa"
    _LIVE_LISTING = f"SELECT {_LISTING} FROM issued_sa WHERE validity_end > ?"  # noqa: S608
    _LIVE_COUNTS = (
        "SELECT ha_id, suite, COUNT(*) FROM issued_sa WHERE validity_end > ? GROUP BY ha_id, suite"
    )

    def live_listing_apart(
        self, now: datetime
    ) -> list[tuple[int, str, str, int, int, float, str | None, str | None]] | None:
        """:meth:`live_listing` of every live SA on a connection of its own, for
        a worker thread (``mipsec sas``: 100,000 rows held the event loop for
        0.16 s); None for a memory store.  One MN's listing is an index seek
        and stays on the loop."""
        return self._read_apart(self._LIVE_LISTING, now)

    def _read_apart(self, sql: str, *args: datetime | str) -> list[Any] | None:
        """The rows of ``sql`` (its parameters ``args``, a ``datetime`` bound
        as epoch seconds) read on a connection of its own to this store's
        file, for a worker thread (a WAL reader never waits for a writer,
        and sqlite3 releases the GIL while a statement runs); None for a
        memory store (no file to open again)."""
        if self.path is None:
            return None
        params = [_timestamp(a, "now") if isinstance(a, datetime) else a for a in args]
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def live_counts(self, now: datetime) -> list[tuple[str, int, int]]:
        """``(ha_id, suite, count)`` of the live SAs: ``status`` without a listing."""
        return self._conn.execute(self._LIVE_COUNTS, (_timestamp(now, "now"),)).fetchall()

    def live_counts_apart(self, now: datetime) -> list[tuple[str, int, int]] | None:
        """:meth:`live_counts` on a connection of its own, for a worker thread;
        None for a memory store (no file to open again).

        The count reads every live row: 92 ms at 100,000 SAs on the bench
        machine, which ``mipsec status`` (a liveness probe may run it every
        few seconds) held the HAC's event loop for.  In a thread, on its own
        connection, it leaves the loop free: sqlite3 releases the GIL while
        the statement runs, and a WAL reader never waits for a writer.
        """
        return self._read_apart(self._LIVE_COUNTS, now)

    def live_for_nai(self, mn_id: str, now: datetime) -> list[IssuedSA]:
        """The live SAs stored under any spelling of the NAI ``mn_id``: every
        ``mn_id`` whose canonical form (core/nai.py) is ``mn_id``'s, oldest first.

        Optional, for operator commands (``mipsec revoke``, ``sas --mn-id``):
        SAs issued before the HAC bound them to the canonical NAI (2026-12-04)
        may be stored under another case of the realm, and a revocation must
        reach them too.  ASCII case is folded in SQL (``COLLATE NOCASE``, a
        seek in ``issued_sa_mn_nocase``), then the user part is held to its
        exact case again here.  Not on a bootstrap's path.
        """
        return self._decoded(self._live_rows_of_nai(_READ, _MN_ID, mn_id, now))

    def _live_rows_of_nai(self, columns: str, mn_col: int, mn_id: str, now: datetime) -> list[Any]:
        """``columns`` of the live rows whose ``mn_id`` (at ``mn_col``) is a
        spelling of the NAI ``mn_id``, oldest first (see :meth:`live_for_nai`)."""
        key = nai_key(mn_id)
        rows = self._conn.execute(
            f"SELECT {columns} FROM issued_sa WHERE mn_id = ? COLLATE NOCASE "  # noqa: S608
            "AND validity_end > ? ORDER BY validity_end, spi",
            (key, _timestamp(now, "now")),
        )
        return [r for r in rows if nai_key(r[mn_col]) == key]

    def live_for_mn(self, mn_id: str, now: datetime) -> list[IssuedSA]:
        """The live SAs of one MN, oldest first (validity end, then SPI)."""
        rows = self._conn.execute(
            f"SELECT {_READ} FROM issued_sa WHERE mn_id = ? COLLATE NOCASE "  # noqa: S608
            "AND mn_id = ? AND validity_end > ? ORDER BY validity_end, spi",
            (mn_id, mn_id, _timestamp(now, "now")),
        ).fetchall()
        return self._decoded(rows)

    def retire(self, spi: int, reason: str) -> IssuedSA | None:
        """Take a live SA back: remove it and record it as retired, atomically.

        The record keeps the SPI from being issued again until the SA's old
        validity end and lists it in ``retired_unconfirmed`` until
        ``confirm_retired``: the HAC keeps withdrawing it from its HA, across
        restarts.  None when no SA holds ``spi`` (or its row fails
        authentication: it is retired all the same, but never handed out).
        """
        row = self._retire_row(spi, reason, _READ)
        return None if row is None else self._decode(row)

    def retire_record(self, spi: int, reason: str) -> tuple[str, str, datetime] | None:
        """``retire``, answering ``(mn_id, ha_id, validity_end)`` of the SA it
        took back instead of the SA itself: no key unwrapping (AES-GCM) for
        what the HAC only withdraws -- on every re-bootstrap, issue 9.

        Optional fast path of ``retire``.  Unlike ``retire``, a row whose
        keys fail authentication is still answered for, so its SPI is
        withdrawn from the HA the row names rather than left there.
        """
        row = self._retire_row(spi, reason, "mn_id, ha_id, validity_end")
        if row is None:
            return None
        mn_id, ha_id, end = row
        return mn_id, ha_id, datetime.fromtimestamp(end, tz=UTC)

    def _retire_row(self, spi: int, reason: str, columns: str) -> tuple[Any, ...] | None:
        """Delete ``spi``'s row and record it retired, in one transaction;
        its ``columns`` as they were (None: no such row)."""
        with self._tx() as c:
            rows = c.execute(
                "DELETE FROM issued_sa WHERE spi = ? "  # noqa: S608
                f"RETURNING spi, mn_id, ha_id, validity_end, {columns}",
                (spi,),
            ).fetchall()
            if rows:
                r = rows[0]
                c.execute(_RETIRE, (r[0], r[1], r[2], r[3], reason, self.owner))
        if not rows:
            return None
        if self._view is not None:
            self._view.discard(spi)
        return tuple(rows[0][4:])

    def confirm_retired_many(self, spis: Iterable[int]) -> None:
        """``confirm_retired`` of many SPIs in one statement (one commit)."""
        self._update_spis("UPDATE retired_sa SET confirmed = 1", spis)

    def _update_spis(
        self, update: str, spis: Iterable[int], where: str = "", params: tuple[Any, ...] = ()
    ) -> None:
        """``update WHERE <where>spi IN (...)``, 500 SPIs per statement
        (SQLite's bound-parameter limit); ``update`` and ``where`` are this
        module's constants, ``params`` bound before the SPIs."""
        spis = list(spis)
        for i in range(0, len(spis), 500):
            part = spis[i : i + 500]
            marks = ", ".join("?" for _ in part)
            self._conn.execute(f"{update} WHERE {where}spi IN ({marks})", (*params, *part))

    def delivered_many(self, spis: Iterable[int]) -> None:
        """The MNs got their 200s: these SAs are no longer pending (``track_delivery``).

        Batched by the HAC; a batch lost in a crash makes those SAs look
        undelivered, so they are withdrawn -- the safe side: their MNs
        bootstrap again, and no SA stays live that its MN may not hold.
        """
        self._update_spis("UPDATE issued_sa SET pending = NULL", spis)

    def undelivered(self, stored_before: datetime) -> list[int]:
        """SPIs of SAs stored (with ``track_delivery``) before ``stored_before``
        and never marked delivered: their HAC stopped between the store write
        and the 200.  Any HAC sharing the store may take them back."""
        rows = self._conn.execute(
            _UNDELIVERED, (_timestamp(stored_before, "stored_before"),)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def retired_unconfirmed(self, now: datetime) -> list[tuple[int, str, str, datetime]]:
        """``(spi, mn_id, ha_id, validity_end)`` of retired SAs whose HA has not
        confirmed the withdrawal and that are not yet past their validity end."""
        return self._owed(_OWED_ROWS + _OWED_ORDER, (_timestamp(now, "now"),))

    def _owed(self, sql: str, args: tuple[Any, ...]) -> list[tuple[int, str, str, datetime]]:
        rows = self._conn.execute(sql, args).fetchall()
        return [(s, m, h, datetime.fromtimestamp(e, tz=UTC)) for s, m, h, e in rows]

    def orphaned_unconfirmed(self, now: datetime) -> list[tuple[int, str, str, datetime]]:
        """:meth:`retired_unconfirmed` but for the withdrawals another live
        HAC owes (``owner``, see ``_ALIVE``): those a HAC may take over.  All
        of them while ``owner`` is unset."""
        if self.owner is None:
            return self.retired_unconfirmed(now)
        t = _timestamp(now, "now")
        args = (t, self.owner, t, t + BEAT_SKEW)
        return self._owed(_OWED_ROWS + _ORPHANED + _OWED_ORDER, args)

    def retired_unconfirmed_apart(self, now: datetime) -> list[tuple[int, str, int]] | None:
        """``(spi, ha_id, validity_end)`` -- epoch seconds -- of
        :meth:`orphaned_unconfirmed`, read on a connection of its own, for a
        worker thread: a HAC's sweep looks at every withdrawal still owed
        (100,000 after a mass revocation while an HA was down: about 1 s of
        the event loop, with the ``datetime`` of each); None for a memory
        store."""
        if self.owner is None:
            return self._read_apart(_OWED_APART, now)
        ahead = now + timedelta(seconds=BEAT_SKEW)
        return self._read_apart(_OWED_APART + _ORPHANED, now, self.owner, now, ahead)

    def heartbeat(
        self,
        until: float,
        has: Iterable[str] = (),
        now: datetime | None = None,
        *,
        issuing: float = 0.0,
    ) -> None:
        """This HAC (``owner``) counts as alive until ``until`` (epoch
        seconds), can withdraw from the HAs ``has`` and may still be issuing
        an SA ``issuing`` seconds after storing it (see ``_ALIVE``); entries
        dead for a day are dropped."""
        if self.owner is None:
            return
        if not (isinstance(issuing, float | int) and 0 <= issuing < math.inf):
            raise LocalProtocolError(f"sa store: heartbeat issuing {issuing!r}: not a bound")
        t = self._now(now)
        listed = "".join(f"\n{ha_id}" for ha_id in sorted(has)) + "\n"
        with self._tx() as c:
            c.execute(
                "INSERT INTO hac_alive (owner, until, has, beat, issuing) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (owner) DO UPDATE SET until = excluded.until, has = excluded.has, "
                "beat = excluded.beat, issuing = excluded.issuing",
                (self.owner, until, listed, t, float(issuing)),
            )
            c.execute("DELETE FROM hac_alive WHERE until < ?", (t - 86400,))

    def issuing_bound(self, now: datetime) -> float:
        """The longest issuing bound (seconds) of the HACs sharing the store
        that could still be issuing an SA they stored: alive, or dead less
        than their bound ago (``until + issuing`` ahead of ``now``).  0.0
        when none said one."""
        t = _timestamp(now, "now")
        row = self._conn.execute(
            "SELECT MAX(issuing) FROM hac_alive WHERE until + issuing > ?", (t,)
        ).fetchone()
        return float(row[0] or 0.0)

    def leave(self) -> None:
        """This HAC (``owner``) stops: it no longer counts as alive, so the
        withdrawals it still owes are the other HACs' to take over at once
        rather than when its heartbeat would have lapsed (a HAC stopped for
        good, or started again under another config file name).  Started
        again under the same name, it resumes its own (``claim``)."""
        if self.owner is None:
            return
        with self._tx() as c:
            c.execute("DELETE FROM hac_alive WHERE owner = ?", (self.owner,))

    def alive_owners(self, now: datetime) -> list[tuple[str, float]]:
        """``(owner, until)`` of the HACs sharing the store that count as alive
        (a heartbeat from more than ``BEAT_SKEW`` ahead is not believed)."""
        t = _timestamp(now, "now")
        return self._conn.execute(
            "SELECT owner, until FROM hac_alive WHERE until > ? AND beat <= ? ORDER BY owner",
            (t, t + BEAT_SKEW),
        ).fetchall()

    def claim(self, spis: Iterable[int]) -> None:
        """This HAC (``owner``) now owes the withdrawals of ``spis`` (taken
        over from a dead HAC, or resumed at its start)."""
        if self.owner is None:
            return
        with self._tx():
            # Rows already this HAC's (a restart resuming its own) are not
            # written again.
            self._update_spis(
                "UPDATE retired_sa SET owner = ?",
                spis,
                "confirmed = 0 AND owner IS NOT ? AND ",
                (self.owner, self.owner),
            )

    def confirm_retired(self, spi: int) -> None:
        """The HA confirmed the withdrawal of ``spi``: stop retrying (the SPI stays reserved)."""
        self._conn.execute("UPDATE retired_sa SET confirmed = 1 WHERE spi = ?", (spi,))

    def live(self, now: datetime) -> list[IssuedSA]:
        rows = self._conn.execute(
            f"SELECT {_READ} FROM issued_sa WHERE validity_end > ? "  # noqa: S608
            "ORDER BY validity_end, spi",
            (_timestamp(now, "now"),),
        ).fetchall()
        return self._decoded(rows)

    def live_page(self, now: datetime, after: int, limit: int) -> tuple[list[IssuedSA], int | None]:
        """Up to ``limit`` rows with an SPI above ``after``, in SPI order: the
        live SAs among them, and the last SPI read (None: no row left).

        The HA's start reads its SAs with it page by page, serving between
        pages (``after`` is its cursor); a row that fails authentication is
        skipped (and reported once, as ``live`` does), the cursor passes it.
        """
        rows = self._conn.execute(
            f"SELECT {_READ} FROM issued_sa WHERE spi > ? ORDER BY spi LIMIT ?",  # noqa: S608
            (after, limit),
        ).fetchall()
        if not rows:
            return [], None
        t = _timestamp(now, "now")
        live = [r for r in rows if r[_END] > t]
        return self._decoded(live), rows[-1][_SPI] if len(rows) == limit else None

    def expire(self, now: datetime) -> list[IssuedSA]:
        """Delete and return every SA whose validity end is <= now."""
        t = _timestamp(now, "now")
        with self._tx() as c:
            rows = c.execute(
                f"DELETE FROM issued_sa WHERE validity_end <= ? RETURNING {_READ}",  # noqa: S608
                (t,),
            ).fetchall()
            # A retired SA's SPI is free again once its old validity end passed.
            self._after_expiry(c, t, None)
        self._discard_from_view(r[_SPI] for r in rows)
        return self._sorted(rows)

    def _after_expiry(self, c: sqlite3.Connection, t: float, limit: int | None) -> None:
        """In expiry's transaction: free retired SPIs whose old validity end
        passed (at most ``limit``), and trim the change log."""
        if limit is None:
            c.execute("DELETE FROM retired_sa WHERE validity_end <= ?", (t,))
        else:
            c.execute(
                "DELETE FROM retired_sa WHERE spi IN (SELECT spi FROM retired_sa "
                "WHERE validity_end <= ? LIMIT ?)",
                (t, limit),
            )
        if self._has_log:
            c.execute(
                "DELETE FROM issued_sa_log WHERE seq <= (SELECT MAX(seq) FROM issued_sa_log) - ?",
                (max(1, _LOG_KEEP),),
            )

    def _discard_from_view(self, spis: Iterable[int]) -> None:
        if self._view is not None:
            for spi in spis:
                self._view.discard(spi)

    def expire_some(self, now: datetime, limit: int) -> list[tuple[int, str, datetime]]:
        """Delete at most ``limit`` SAs whose validity end is <= now, the
        oldest first; return ``(spi, mn_id, validity_end)`` of each.

        What the roles' expiry timers call: ``expire`` deletes every expired
        SA in one call and unwraps each one's keys to return it -- 6.4 s on
        the event loop, holding the write lock, for 100,000 SAs that expired
        together (a HAC that was down past their lifetime, or MNs that all
        bootstrapped in the same minute).  Here a call costs O(limit), no
        key is unwrapped, and the caller yields between calls.  Retired
        SPIs whose validity end passed are freed in batches of ``limit`` too.
        """
        t = _timestamp(now, "now")
        with self._tx() as c:
            rows = c.execute(
                "DELETE FROM issued_sa WHERE spi IN (SELECT spi FROM issued_sa "
                "WHERE validity_end <= ? ORDER BY validity_end LIMIT ?) "
                "RETURNING spi, mn_id, validity_end",
                (t, limit),
            ).fetchall()
            # A retired SA's SPI is free again once its old validity end passed.
            self._after_expiry(c, t, limit)
        self._discard_from_view(r[0] for r in rows)
        rows.sort(key=lambda r: (r[2], r[0]))
        return [(spi, mn_id, datetime.fromtimestamp(end, tz=UTC)) for spi, mn_id, end in rows]

    def _live_view(self, now: datetime) -> _LiveView | None:
        """The live view advanced to ``now``; None when SQL must answer."""
        t = _timestamp(now, "now")
        # data_version first: a commit landing before the SELECT below then
        # only causes one more rebuild, never a missed change.
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        view = self._view
        if view is None:
            view = self._build_view(version, t)
        elif view.data_version != version:
            # Another connection committed: follow its changes, or rebuild.
            if not self._catch_up(view):
                view = self._build_view(version, t)
            view.data_version = version
        return view if view.advance(t) else None

    def _log_seq(self) -> int | None:
        if not self._has_log:
            return None
        row = self._conn.execute("SELECT MAX(seq) FROM issued_sa_log").fetchone()
        return int(row[0] or 0)

    def _build_view(self, version: int, t: float) -> _LiveView:
        # The log position first: a commit landing before the SELECT is then
        # replayed once more at the next catch-up (harmless), never missed.
        seq = self._log_seq()
        # Only the rows live at t, and the floor at t (the view answers for
        # no earlier instant): SAs that ended while the HAC was down are not
        # loaded to be dropped at once -- 1.2 s of a start with 100,000 of them.
        rows = self._conn.execute(
            f"SELECT {_VIEW_COLS} FROM issued_sa WHERE validity_end > ? "  # noqa: S608
            "ORDER BY validity_end, spi",
            (t,),
        ).fetchall()
        view = self._view = _LiveView(rows, version)
        view.floor = t
        view.log_seq = seq
        return view

    def _catch_up(self, view: _LiveView) -> bool:
        """Apply the logged changes after ``view.log_seq``; False when a rebuild is needed."""
        if view.log_seq is None:
            return False
        # Each change with its SPI's row as it is now (NULL columns: the row
        # is gone) -- one query, not the log and then the rows: a HAC
        # sharing the store does this after every commit of another HAC.
        changes = self._conn.execute(_CATCH_UP_SQL, (view.log_seq, _CATCH_UP_MAX + 1)).fetchall()
        if not changes:
            return True  # a commit that did not touch issued_sa (retired_sa, ...)
        if len(changes) > _CATCH_UP_MAX or changes[0][0] != view.log_seq + 1:
            return False  # too many, or trimmed before this view saw them
        now_rows: dict[int, tuple[Any, ...]] = {change[1]: change[2:] for change in changes}
        for spi in now_rows:
            view.discard(spi)
        # The rows as they are now (own writes among the changes are replayed
        # the same way: discard + current row is idempotent).
        for row in now_rows.values():
            if row[0] is not None:
                view.insert(*row)
        view.log_seq = changes[-1][0]
        return True

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

    def live_summary(self, now: datetime) -> tuple[dict[str, int], Mapping[str, str]]:
        """``(count_by_ha(now), hoas_in_use(now))`` from one look at the store.

        The HAC needs both on every bootstrap; each alone checks the live
        view against the file (``PRAGMA data_version``) first.  The second is
        the live view's own table (not a copy; read it before the store
        changes): a ``HoATable`` whose journal lets the allocator follow it
        in O(changes).
        """
        view = self._live_view(now)
        if view is not None:
            return view.count_by_ha(), view.hoa_table()
        return self._count_by_ha_sql(now), self._hoas_in_use_sql(now)

    def count_by_ha(self, now: datetime) -> dict[str, int]:
        """Number of live SAs per ``ha_id``."""
        view = self._live_view(now)
        if view is not None:
            return view.count_by_ha()
        return self._count_by_ha_sql(now)

    def has_live(self, now: datetime, ha_ids: Sequence[str]) -> bool:
        """Whether a live SA is stored for one of ``ha_ids``: one indexed
        look, no live view built (the HA asks it once, at start).  False for
        a store check-config has not created (no table yet)."""
        if not table_exists(self._conn, "issued_sa"):
            return False
        marks = ", ".join("?" for _ in ha_ids)
        row = self._conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM issued_sa WHERE validity_end > ? "  # noqa: S608
            f"AND ha_id IN ({marks}))",
            (_timestamp(now, "now"), *ha_ids),
        ).fetchone()
        return bool(row[0])

    def _count_by_ha_sql(self, now: datetime) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT ha_id, COUNT(*) FROM issued_sa WHERE validity_end > ? GROUP BY ha_id",
            (_timestamp(now, "now"),),
        ).fetchall()
        return {ha_id: n for ha_id, n in rows}

    @property
    def checkpointer(self) -> WalCheckpointer | None:
        """The thread checkpointing this store's WAL, if it has one."""
        return self._checkpointer

    def close(self) -> None:
        self._view = None
        if self._checkpointer is not None:
            self._checkpointer.close()  # first: the last connection to close checkpoints
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
    key_file: str | None = Field(default=None, min_length=1)
    clear_keys: StrictBool = False  # an opt-out of protection: TOML true, nothing looser
    # Seconds between WAL checkpoints in a thread of the role's own
    # (core/walcheckpoint.py); 0: SQLite's, on the commit that fills 1,000 pages.
    checkpoint_interval: float = Field(default=1.0, ge=0, le=60, allow_inf_nan=False)
    # "normal": every commit survives a crash of the role; "full": also a
    # power loss, at an fsync per commit (see SQLiteSAStore).
    synchronous: Literal["normal", "full"] = "normal"

    @model_validator(mode="after")
    def _one_way(self) -> _SQLiteOptions:
        if self.clear_keys and self.key_file is not None:
            raise ValueError("clear_keys = true and key_file exclude each other")
        return self


class _MemoryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    clear_keys: StrictBool = False  # an opt-out of protection: TOML true, nothing looser


def _check_only(ctx: PluginContext) -> bool:
    # mipsec check-config: validate, create nothing (core/roles/preflight.py).
    return bool(ctx.extra.get("check_only", False))


class SQLiteStoreFactory:
    name = "sqlite"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> SQLiteSAStore:
        opts = parse_options(_SQLiteOptions, options)
        path = resolve_path(opts.path, ctx.base_dir)
        key_file = resolve_path(opts.key_file, ctx.base_dir) if opts.key_file else None
        try:
            return SQLiteSAStore(
                path,
                key_file=key_file,
                clear_keys=opts.clear_keys,
                check_only=_check_only(ctx),
                checkpoint_interval=opts.checkpoint_interval,
                synchronous=opts.synchronous,
            )
        except StoreOptionError as exc:
            raise ValueError(f"{exc.option}: {exc}") from None
        except (OSError, sqlite3.Error, ValueError) as exc:
            raise ValueError(f"path: cannot open SA store {str(path)!r}: {exc}") from None


class MemoryStoreFactory:
    name = "memory"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> SQLiteSAStore:
        opts = parse_options(_MemoryOptions, options)
        return SQLiteSAStore(None, clear_keys=opts.clear_keys)


@hookimpl
def mipsec_sa_stores() -> list[SQLiteStoreFactory | MemoryStoreFactory]:
    return [SQLiteStoreFactory(), MemoryStoreFactory()]
