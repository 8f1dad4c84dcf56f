"""The HA's binding cache (RFC 6275 §9.1, §10.3.1) and its replay state, optionally in SQLite.

One entry per home address (PROFILE §8: "the binding cache keys on HoA"); the
home agent marks every entry as a home registration, so there is no cache
replacement policy (RFC 6275 §10.3.1: home registrations "MUST NOT be removed
from the Binding Cache until the expiration of the Lifetime period").

Persistence (``path`` given): the cache is loaded again on start, so bindings
survive an HA restart (entries whose lifetime ended while the HA was down are
loaded as they are; the next expiry run reports them as expired).  The same
file keeps what a restart must not lose for replay protection (issue 6):

* per SPI (``spi_state``), for the SA that holds it (its validity end and a
  truncated SHA-256 digest of its keys, so a later SA under the same SPI
  never inherits the record): ``out_mark``, a reservation of the HA's own
  outbound ESP sequence numbers -- after a restart the HA->MN counter resumes
  at it, never below a number already sent, else the MN's anti-replay window
  (PROFILE §7) would drop every Binding Acknowledgement; ``in_floor``, the
  highest MN->HA sequence number of an accepted Mobility Header packet
  (exact); ``data_mark``, a number no accepted MN->HA data packet reached
  (reserved ahead, see ``ha_core``); and ``dead``: the HAC withdrew the SA,
  so it is never taken back, nor its packets accepted, until its validity
  end (a withdrawn SPI the HA never knew is refused whatever the keys);
* deleted-binding records (``deleted_binding``): the last BU Sequence # of a
  de-registered home address, kept MAX_DELETE_BCE_TIMEOUT (RFC 6275 §10.3.2).

Every record ends (``purge``): an SPI's at its SA's validity end, a
deleted binding's after MAX_DELETE_BCE_TIMEOUT, so the file does not grow
without bound.

Writes: write-through (the default: each change is its own commit) or, with
``write_behind=True``, collected and written by ``flush()`` in one
transaction.  The HA role uses write-behind as a group commit: it processes a
burst of datagrams, calls ``flush()`` once, and only then sends the burst's
replies (``dirty`` says whether anything waits).  So whatever a reply
acknowledges is on disk before the reply leaves.

Durability: WAL journal.  ``synchronous="normal"`` (default): a commit
survives a crash or kill of the HA process (it is in the OS page cache); a
power loss or kernel crash may lose the commits since the last checkpoint,
which a checkpoint every second bounds to about a second: made by a thread
of its own (``checkpoint_interval``, what the HA gives; core/walcheckpoint.py
-- the copy and its fsyncs stay off the HA's event loop), by the SA store's
thread for a shared file, or else by ``checkpoint()``, which the HA calls
every second.  ``synchronous="full"``: every commit is fsynced and survives power
loss too, at about 0.45 ms per commit instead of ~20 µs on the test machine.

Shared file (``shared=`` a connection, the HA's ``[bindings] in_sa_store``):
the tables live in the SA store's own SQLite file, on its connection, and the
HA writes a burst's SA rows and their records in one transaction (issue 9:
"the HA's SA row + out-mark in one transaction").  SQLite cannot commit two
WAL files atomically, so one file is the only way to make them one commit.
The version table is then ``binding_cache_version`` (the store has a
``schema_version`` of its own) and records the HA id that owns the tables, so
a second HA pointed at the same store file is refused instead of sharing
replay state.  ``held()`` re-queues what a flush wrote into a transaction its
owner then rolled back.

The file holds no key material (truncated SHA-256 digests of SA keys, which
reveal nothing of them), but it maps home addresses to care-of addresses
(where a user is), so it is created with mode 0600 like the SA store.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar

from mipsec.core.addrtext import packed_from_text
from mipsec.core.errors import LocalProtocolError
from mipsec.core.fsutil import create_private
from mipsec.core.sqlitetx import BUSY_TIMEOUT_MS, begin_now, table_exists
from mipsec.core.sqlitetx import transaction as sqlite_transaction
from mipsec.core.walcheckpoint import WalCheckpointer, limit_wal

log = logging.getLogger("mipsec.bindings")

__all__ = ["SCHEMA_VERSION", "Binding", "BindingCache", "DeadSpi", "DeletedBinding"]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS binding (
    hoa         TEXT    PRIMARY KEY,
    coa_host    TEXT    NOT NULL,
    coa_port    INTEGER NOT NULL,
    spi         INTEGER NOT NULL,
    sequence    INTEGER NOT NULL,   -- last accepted BU Sequence # (RFC 6275 §9.5.1)
    lifetime    INTEGER NOT NULL,   -- granted seconds
    expires_at  REAL    NOT NULL,   -- epoch seconds, UTC
    ip4_hoa     TEXT,
    mn_seq      INTEGER NOT NULL    -- ESP sequence of that BU
);
CREATE TABLE IF NOT EXISTS spi_state (
    spi        INTEGER PRIMARY KEY,
    until      REAL    NOT NULL,    -- the SA's validity end (epoch seconds): the record ends then
    key_digest BLOB,                -- which SA (truncated SHA-256 of its keys), NULL: unknown
    dead       INTEGER NOT NULL,    -- 1: withdrawn, never accepted again
    out_mark   INTEGER NOT NULL,    -- HA->MN sequence numbers below this may have been sent
    in_floor   INTEGER NOT NULL,    -- highest MN->HA ESP sequence of an accepted MH packet
    data_mark  INTEGER NOT NULL     -- no MN->HA data packet numbered >= this was accepted
);
CREATE INDEX IF NOT EXISTS spi_state_until ON spi_state (until);
CREATE TABLE IF NOT EXISTS deleted_binding (
    hoa       TEXT    PRIMARY KEY,
    sequence  INTEGER NOT NULL,     -- BU Sequence # of the de-registration (RFC 6275 §10.3.2)
    until     REAL    NOT NULL      -- epoch seconds, UTC
);
"""

# The version table of a file of its own, and of tables in the SA store's file.
_VERSION_OWN = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
_VERSION_SHARED = (
    "CREATE TABLE IF NOT EXISTS binding_cache_version "
    "(version INTEGER NOT NULL, ha_id TEXT NOT NULL)"
)

# Version 1 kept (spi, out_mark, in_floor) in sa_counter, with no SA identity
# and no end, and a BU's ESP number only in its binding row.  Its rows become
# records of unknown identity (they match the SA installed under the SPI)
# that end a week after the upgrade; data packets were not tracked at all,
# so the best guess for data_mark is the floor + 1.
_MIGRATE_1_TO_2 = (
    "INSERT INTO spi_state (spi, until, key_digest, dead, out_mark, in_floor, data_mark) "
    "SELECT spi, unixepoch() + 7 * 86400, NULL, 0, out_mark, "
    "MAX(in_floor, COALESCE((SELECT MAX(mn_seq) FROM binding WHERE binding.spi = c.spi), -1)), "
    "0 FROM sa_counter AS c",
    "UPDATE spi_state SET data_mark = in_floor + 1",
    "DROP TABLE sa_counter",
    "UPDATE schema_version SET version = 2",
)

_UPSERT = (
    "INSERT INTO binding (hoa, coa_host, coa_port, spi, sequence, lifetime, expires_at, "
    "ip4_hoa, mn_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hoa) DO UPDATE SET "
    "coa_host = excluded.coa_host, coa_port = excluded.coa_port, spi = excluded.spi, "
    "sequence = excluded.sequence, lifetime = excluded.lifetime, "
    "expires_at = excluded.expires_at, ip4_hoa = excluded.ip4_hoa, mn_seq = excluded.mn_seq"
)
_SPI_COLUMNS = "spi, until, key_digest, dead, out_mark, in_floor, data_mark"
_UPSERT_SPI = (
    f"INSERT INTO spi_state ({_SPI_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
    "ON CONFLICT (spi) DO UPDATE SET until = excluded.until, key_digest = excluded.key_digest, "
    "dead = excluded.dead, out_mark = excluded.out_mark, in_floor = excluded.in_floor, "
    "data_mark = excluded.data_mark"
)
_UPSERT_DELETED = (
    "INSERT INTO deleted_binding (hoa, sequence, until) VALUES (?, ?, ?) "
    "ON CONFLICT (hoa) DO UPDATE SET sequence = excluded.sequence, until = excluded.until"
)
_SELECT = (
    "SELECT hoa, coa_host, coa_port, spi, sequence, lifetime, expires_at, ip4_hoa, mn_seq "
    "FROM binding"
)


def _create_tables(conn: sqlite3.Connection) -> None:
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)


_K = TypeVar("_K", int, str)
_V = TypeVar("_V")


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


@dataclass(frozen=True, slots=True)
class DeletedBinding:
    """A de-registered home address's last BU Sequence #, guarded until ``until``."""

    sequence: int
    until: float


@dataclass(frozen=True, slots=True)
class DeadSpi:
    """A withdrawn SPI: dead until ``until``; ``key_digest`` None = whatever the keys."""

    until: float
    key_digest: bytes | None = None


class _SpiRecord:
    """One ``spi_state`` row."""

    __slots__ = ("data_mark", "dead", "in_floor", "key_digest", "out_mark", "until")

    def __init__(
        self,
        until: float = math.inf,
        key_digest: bytes | None = None,
        dead: bool = False,
        out_mark: int = 0,
        in_floor: int = -1,
        data_mark: int = 0,
    ) -> None:
        self.until = until
        self.key_digest = key_digest
        self.dead = dead
        self.out_mark = out_mark
        self.in_floor = in_floor
        self.data_mark = data_mark

    def row(self, spi: int) -> tuple[object, ...]:
        return (
            spi,
            self.until,
            self.key_digest,
            int(self.dead),
            self.out_mark,
            self.in_floor,
            self.data_mark,
        )


class _Ending(Generic[_K, _V]):
    """key -> value that ends at an instant; a heap finds the ended (stale entries skipped)."""

    def __init__(self) -> None:
        self.items: dict[_K, _V] = {}
        self._until: dict[_K, float] = {}
        self._heap: list[tuple[float, _K]] = []

    def __len__(self) -> int:
        return len(self.items)

    def set(self, key: _K, value: _V, until: float) -> None:
        self.items[key] = value
        if self._until.get(key) != until:
            self._until[key] = until
            if until != math.inf:
                heapq.heappush(self._heap, (until, key))
                if len(self._heap) > 2 * len(self.items) + 64:
                    self._heap = [(u, k) for k, u in self._until.items() if u != math.inf]
                    heapq.heapify(self._heap)

    def pop(self, key: _K) -> _V | None:
        self._until.pop(key, None)
        value = self.items.pop(key, None)  # its heap entry goes stale
        if value is not None:
            self._gone(value)
        return value

    def _gone(self, value: _V) -> None:
        """``value`` left the map (``pop``, ``pop_ended``): for subclasses that count."""

    def until(self, key: _K) -> float:
        return self._until[key]

    def due(self, now: float) -> bool:
        return bool(self._heap) and self._heap[0][0] <= now

    def pop_ended(self, now: float, limit: int | None = None) -> list[_K]:
        out: list[_K] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(out) < limit):
            until, key = heapq.heappop(heap)
            if self._until.get(key) == until:
                del self._until[key]
                self._gone(self.items.pop(key))
                out.append(key)
        return out


class _SpiRecords(_Ending[int, _SpiRecord]):
    """The per-SPI records, counting the dead ones as they come and go: the
    HA's stats (every ``status`` and metrics scrape) read the count instead
    of a pass over every record (7 ms at 100,000 SAs).  A record's ``dead``
    never changes once it is in the map (a withdrawal puts a new record)."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = 0

    def set(self, key: int, value: _SpiRecord, until: float) -> None:
        old = self.items.get(key)
        if old is not None:
            self._gone(old)  # replaced
        super().set(key, value, until)
        if value.dead:
            self.dead += 1

    def _gone(self, value: _SpiRecord) -> None:
        if value.dead:
            self.dead -= 1


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
    return packed_from_text(address)


class BindingCache:
    """In-memory binding cache keyed by HoA (``str``), with optional SQLite persistence.

    ``by_address`` looks a binding up by the packed IPv6 *or* IPv4 home
    address (16 or 4 octets): the HA's check of a PType 0 packet's inner
    source (PROFILE §7) reads those octets straight from the packet.

    Expiry uses a heap of ``(expires_at, hoa)`` with stale entries skipped
    when popped; the heap is rebuilt when stale entries outnumber live ones,
    so frequent refreshes cannot grow it without bound.  SPI records and
    deleted-binding records end the same way (``purge``).
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        write_behind: bool = False,
        synchronous: Literal["normal", "full"] = "normal",
        shared: sqlite3.Connection | None = None,
        owner: str = "",
        checkpoint_interval: float = 0.0,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise LocalProtocolError(f"synchronous: {synchronous!r} is not 'normal' or 'full'")
        if shared is not None and (path is not None or not owner):
            raise LocalProtocolError("shared: give no path, and the owner (HA id)")
        self.path = Path(path) if path is not None else None
        # True: the tables live on another component's connection (see the
        # module docstring); close() flushes but leaves it open.
        self.shared = shared is not None
        # True when a thread checkpoints this file -- the SA store's (set by
        # the HA, with a shared connection) or this cache's own
        # (``checkpoint_interval``, with ``path``): checkpoint() does nothing.
        self.checkpointed_elsewhere = False
        self._checkpoint_interval = checkpoint_interval
        self._checkpointer: WalCheckpointer | None = None
        self._owner = owner
        # What flush() wrote inside held(): re-queued if the transaction fails.
        self._held: list[tuple[dict[str, Binding | None], set[int], set[str], set[int]]] | None = (
            None
        )
        self.write_behind = write_behind
        self.synchronous = synchronous
        # True while a change waits for flush() (write-behind); the HA reads it
        # per datagram, so it is a plain attribute.
        self.dirty = False
        self._dirty: dict[str, Binding | None] = {}  # hoa -> row to write, None = delete
        self._dirty_spis: set[int] = set()  # written from _spis, deleted when absent
        self._dirty_deleted: set[str] = set()  # likewise from _deleted
        # SPIs whose HA->MN out-mark was raised and is not yet on disk: a
        # datagram numbered at or above a mark must not leave before its
        # write (``marks_unwritten``).  Tracked apart from the other
        # records, which must not hold the downlink (core/roles/ha_data.py).
        self._unwritten_marks: set[int] = set()
        self._entries: dict[str, Binding] = {}
        self._by_packed: dict[bytes, str] = {}
        # hoa -> (the ip4_hoa it was indexed with, its keys in _by_packed)
        self._indexed: dict[str, tuple[str | None, tuple[bytes, ...]]] = {}
        self._heap: list[tuple[float, str]] = []
        self._spis = _SpiRecords()
        self._deleted: _Ending[str, int] = _Ending()  # hoa -> BU Sequence #
        self._conn: sqlite3.Connection | None = None
        if self.path is not None:
            self._open(self.path)
        elif shared is not None:
            if synchronous == "full":
                # Stricter for the store too, never weaker than it asked.
                shared.execute("PRAGMA synchronous = FULL")
            self._load(shared)

    # ------------------------------------------------------------ storage

    def _open(self, path: Path) -> None:
        create_private(path)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            # See the module docstring: NORMAL is crash-safe, FULL power-loss-safe.
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            limit_wal(conn)
            self._load(conn)
            if self._checkpoint_interval > 0:
                # core/walcheckpoint.py: the copy and its fsyncs off the HA's
                # event loop, which forwards every MN's packets.
                self._checkpointer = WalCheckpointer.attach(
                    conn,
                    path,
                    self._checkpoint_interval,
                    log,
                    f"binding cache checkpoint of {str(path)!r}",
                )
                self.checkpointed_elsewhere = True
        except BaseException:
            conn.close()
            raise

    def _load(self, conn: sqlite3.Connection) -> None:
        """Create or check the schema on ``conn``, read every row, keep ``conn``."""
        with sqlite_transaction(conn):
            self._init_schema(conn)
        for row in conn.execute(_SELECT).fetchall():
            self._index(Binding(*row))
        for spi, until, digest, dead, out_mark, in_floor, data_mark in conn.execute(
            f"SELECT {_SPI_COLUMNS} FROM spi_state"  # noqa: S608 (constants)
        ).fetchall():
            rec = _SpiRecord(
                until,
                None if digest is None else bytes(digest),
                bool(dead),
                out_mark,
                in_floor,
                data_mark,
            )
            self._spis.set(spi, rec, until)
        for hoa, sequence, until in conn.execute(
            "SELECT hoa, sequence, until FROM deleted_binding"
        ).fetchall():
            self._deleted.set(hoa, sequence, until)
        self._conn = conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        if self.shared:
            self._init_shared_schema(conn)
            return
        conn.execute(_VERSION_OWN)
        _create_tables(conn)
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
        if not rows:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif len(rows) == 1 and rows[0][0] == 1:
            for stmt in _MIGRATE_1_TO_2:
                conn.execute(stmt)
        elif len(rows) != 1 or rows[0][0] != SCHEMA_VERSION:
            found = ", ".join(str(r[0]) for r in rows)
            raise ValueError(
                f"binding cache schema version {found} not supported (expected {SCHEMA_VERSION})"
            )

    @staticmethod
    def exists_in(conn: sqlite3.Connection) -> bool:
        """Whether ``conn``'s file already holds a shared binding cache."""
        return table_exists(conn, "binding_cache_version")

    def _init_shared_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute(_VERSION_SHARED)
        rows = conn.execute("SELECT version, ha_id FROM binding_cache_version").fetchall()
        if not rows:
            _create_tables(conn)
            conn.execute(
                "INSERT INTO binding_cache_version (version, ha_id) VALUES (?, ?)",
                (SCHEMA_VERSION, self._owner),
            )
            return
        if len(rows) != 1 or rows[0][0] != SCHEMA_VERSION:
            found = ", ".join(str(r[0]) for r in rows)
            raise ValueError(
                f"binding cache schema version {found} not supported (expected {SCHEMA_VERSION})"
            )
        if rows[0][1] != self._owner:
            # Two HAs on one store file would share (and corrupt) replay state.
            raise ValueError(
                f"the binding cache in this file belongs to HA {rows[0][1]!r}, not {self._owner!r}"
            )

    def close(self) -> None:
        """Flush what is pending and close the file (a shared connection stays open)."""
        if self._conn is not None:
            try:
                self.flush()
            finally:
                if self._checkpointer is not None:
                    self._checkpointer.close()  # first: the last connection checkpoints
                if not self.shared:
                    self._conn.close()
                self._conn = None

    @property
    def checkpointer(self) -> WalCheckpointer | None:
        """The thread checkpointing this cache's own file, if it has one."""
        return self._checkpointer

    @property
    def pending(self) -> int:
        """Changes not yet written (write-behind mode)."""
        return len(self._dirty) + len(self._dirty_spis) + len(self._dirty_deleted)

    def _changed(self) -> None:
        # Called once a change is queued (persistent caches only).
        self.dirty = True
        if not self.write_behind:
            self.flush()

    def flush(self, *, wait: float | None = None) -> None:
        """Write every pending change in one transaction (no-op when none).

        Inside ``transaction()`` the changes join the open transaction.  On an
        error nothing leaves the queue: the next flush tries again.
        ``wait``: how long to wait for a write lock another process holds
        (default: the connection's 5 s); still held: ``StoreBusyError``.
        """
        conn = self._conn
        if conn is None or not self.dirty:
            return
        dirty, self._dirty = self._dirty, {}
        spis, self._dirty_spis = self._dirty_spis, set()
        deleted, self._dirty_deleted = self._dirty_deleted, set()
        marks, self._unwritten_marks = self._unwritten_marks, set()
        self.dirty = False
        own = not conn.in_transaction
        try:
            if own:
                begin_now(conn, "BEGIN IMMEDIATE", wait)
            self._write(conn, dirty, spis, deleted)
            if own:
                conn.execute("COMMIT")
            elif self._held is not None:
                self._held.append((dirty, spis, deleted, marks))
        except BaseException:
            if own and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._requeue(dirty, spis, deleted, marks)  # for the next try
            raise

    @property
    def unwritten_marks(self) -> frozenset[int]:
        """The SPIs whose HA->MN out-mark was raised and not yet written (a
        flush failed, or none ran since): their numbers at or above the mark
        on disk must not be sent until one succeeds."""
        return frozenset(self._unwritten_marks)

    @property
    def marks_unwritten(self) -> bool:
        """:attr:`unwritten_marks` is not empty (cheap: read per TUN drain)."""
        return bool(self._unwritten_marks)

    def _write(
        self,
        conn: sqlite3.Connection,
        dirty: dict[str, Binding | None],
        spis: set[int],
        deleted: set[str],
    ) -> None:
        if dirty:
            gone = [(hoa,) for hoa, b in dirty.items() if b is None]
            if gone:
                conn.executemany("DELETE FROM binding WHERE hoa = ?", gone)
            conn.executemany(_UPSERT, [_row(b) for b in dirty.values() if b is not None])
        if spis:
            records = self._spis.items
            rows = []
            gone_spis = []
            for spi in spis:
                rec = records.get(spi)
                if rec is None:
                    gone_spis.append((spi,))
                else:
                    rows.append(rec.row(spi))
            if gone_spis:
                conn.executemany("DELETE FROM spi_state WHERE spi = ?", gone_spis)
            conn.executemany(_UPSERT_SPI, rows)
        if deleted:
            seqs = self._deleted.items
            gone = [(h,) for h in deleted if h not in seqs]
            if gone:
                conn.executemany("DELETE FROM deleted_binding WHERE hoa = ?", gone)
            conn.executemany(
                _UPSERT_DELETED,
                [(h, seqs[h], self._deleted.until(h)) for h in deleted if h in seqs],
            )

    def checkpoint(self) -> None:
        """Copy the WAL into the database file, with the fsyncs that go with it.

        With ``synchronous="normal"`` this bounds what a power loss can take
        (the commits since the last checkpoint).  PASSIVE: it never waits.
        """
        if self.checkpointed_elsewhere:
            return
        if self._conn is not None and not self._conn.in_transaction:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Around a transaction that another component owns and flushes join
        (a shared connection): if it fails, what they wrote is queued again,
        so the next flush writes it (nothing acknowledged that is not on disk)."""
        outer, self._held = self._held, []
        try:
            yield
        except BaseException:
            for dirty, spis, deleted, marks in reversed(self._held):
                self._requeue(dirty, spis, deleted, marks)
            raise
        finally:
            self._held = outer

    def _requeue(
        self,
        dirty: dict[str, Binding | None],
        spis: set[int],
        deleted: set[str],
        marks: set[int],
    ) -> None:
        # Newer changes win over these.
        self._dirty = dirty | self._dirty
        self._dirty_spis |= spis
        self._dirty_deleted |= deleted
        self._unwritten_marks |= marks
        self.dirty = True

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Group many write-through changes in one commit (e.g. installing every SA at start)."""
        return self._transaction()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        conn = self._conn
        if conn is None or conn.in_transaction:
            yield
            return
        with sqlite_transaction(conn):
            yield

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else ":memory:"
        if self.shared:
            where = "in the SA store's file"
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
        """Add or replace the binding for ``b.hoa``.

        The caller may have mutated the object it got from ``get``: ``put`` is
        what records (and persists) the change.
        """
        if not b.hoa:
            raise LocalProtocolError("hoa: a binding needs a home address")
        self._index(b)
        if self._conn is not None:
            self._dirty[b.hoa] = b
            self._changed()

    def delete(self, hoa: str) -> Binding | None:
        b = self._entries.pop(hoa, None)
        if b is None:
            return None
        for k in self._indexed.pop(hoa, (None, ()))[1]:
            if self._by_packed.get(k) == hoa:
                del self._by_packed[k]
        # The heap entry goes stale and is skipped by pop_expired.  The SPI's
        # in_floor already covers b.mn_seq (raise_floor runs for every BU).
        if self._conn is not None:
            self._dirty[hoa] = None
            self._changed()
        return b

    def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` in the cache (stale heap entries may make it early)."""
        return self._heap[0][0] if self._heap else None

    def purge_due(self, now: float) -> bool:
        """Are records due to end at ``now`` (stale heap entries may say so early)?"""
        return self._spis.due(now) or self._deleted.due(now)

    def pop_expired(self, now: float, limit: int | None = None) -> list[Binding]:
        """Delete and return every binding with ``expires_at <= now`` (at most
        ``limit``), earliest first."""
        out: list[Binding] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(out) < limit):
            expires_at, hoa = heapq.heappop(heap)
            b = self._entries.get(hoa)
            if b is not None and b.expires_at == expires_at:
                self.delete(hoa)
                out.append(b)
        return out

    # ------------------------------------------------------------ per-SPI records

    def _record(self, spi: int) -> _SpiRecord:
        rec = self._spis.items.get(spi)
        if rec is None:
            rec = _SpiRecord()
            self._spis.set(spi, rec, rec.until)
        return rec

    def _spi_changed(self, spi: int) -> None:
        if self._conn is not None:
            self._dirty_spis.add(spi)
            self._changed()

    def claim_spi(self, spi: int, until: float, key_digest: bytes) -> bool:
        """Tie ``spi``'s record to the SA ending at ``until`` with keys ``key_digest``.

        True: the record is this SA's (or of unknown identity, schema 1) and its
        counters stand -- a restart.  False: there was none, or it belonged to
        another SA: it starts afresh (the caller reserves what it needs).  A dead
        record must be checked (``dead``) before: claiming replaces it too.
        """
        rec = self._spis.items.get(spi)
        same = (
            rec is not None
            and not rec.dead
            and (rec.key_digest is None or rec.key_digest == key_digest)
        )
        if same:
            assert rec is not None
            if rec.until == until and rec.key_digest == key_digest:
                return True  # a restart: nothing to write
        else:
            rec = _SpiRecord()
        rec.until = until
        rec.key_digest = key_digest
        self._spis.set(spi, rec, until)
        self._spi_changed(spi)
        return same

    def out_mark(self, spi: int) -> int | None:
        """First HA->MN sequence number surely never sent for ``spi`` (None: no record)."""
        rec = self._spis.items.get(spi)
        return None if rec is None else rec.out_mark

    def set_out_mark(self, spi: int, mark: int) -> None:
        """Record that HA->MN numbers up to ``mark - 1`` may be used.

        Write-behind: queued like every change, so the sender flushes before
        it sends a packet numbered at or above the previous mark.
        """
        self._record(spi).out_mark = mark
        if self._conn is not None:  # cleared by the flush that writes it
            self._unwritten_marks.add(spi)
        self._spi_changed(spi)

    def replay_floor(self, spi: int, hoa: str | None = None) -> int:
        """Highest MN->HA ESP sequence number of an accepted MH packet on ``spi`` (-1: none).

        ``hoa``: the SA's home address, whose binding (when made under this SPI)
        holds the number of the BU that made it -- covered by the SPI's own
        record since schema version 2, still read for older files.
        """
        rec = self._spis.items.get(spi)
        floor = -1 if rec is None else rec.in_floor
        b = self._entries.get(hoa) if hoa is not None else None
        if b is not None and b.spi == spi and b.mn_seq > floor:
            floor = b.mn_seq
        return floor

    def raise_floor(self, spi: int, seq: int) -> None:
        """Record that MN->HA ESP number ``seq`` was used by an MH packet on ``spi``."""
        rec = self._spis.items.get(spi) or self._record(spi)
        if seq > rec.in_floor:
            rec.in_floor = seq
            self._spi_changed(spi)

    def data_mark(self, spi: int) -> int | None:
        """A number no accepted MN->HA data packet on ``spi`` reached (None: no record)."""
        rec = self._spis.items.get(spi)
        return None if rec is None else rec.data_mark

    def set_data_mark(self, spi: int, mark: int) -> None:
        """Record that no data packet numbered ``mark`` or above was accepted on ``spi``."""
        self._record(spi).data_mark = mark
        self._spi_changed(spi)

    def forget_spi(self, spi: int) -> None:
        """Drop the record of an SPI whose SA is gone (ended, or replaced by another SA)."""
        if self._spis.pop(spi) is not None:
            self._spi_changed(spi)

    def has_spi_record(self, spi: int) -> bool:
        """Does ``spi`` have a record (a live SA's counters, or a withdrawal)?"""
        return spi in self._spis.items

    def spi_record_count(self) -> int:
        """SPI records held: what ``[ha] max_spi_records`` caps."""
        return len(self._spis)

    def dead(self, spi: int) -> DeadSpi | None:
        """The withdrawal record of ``spi``; None when it was not withdrawn (or it ended)."""
        rec = self._spis.items.get(spi)
        if rec is None or not rec.dead:
            return None
        return DeadSpi(rec.until, rec.key_digest)

    def bury_spi(self, spi: int, until: float, key_digest: bytes | None) -> None:
        """Record ``spi`` as withdrawn until ``until`` (``key_digest`` None: any keys).

        Its counters go: nothing under it is accepted any more.
        """
        rec = _SpiRecord(until, key_digest, dead=True)
        self._spis.set(spi, rec, until)
        self._spi_changed(spi)

    def unbury_spi(self, spi: int) -> bool:
        """Forget ``spi``'s withdrawal record if it is one for any keys (an
        SPI withdrawn that this HA never held); True if one went."""
        rec = self._spis.items.get(spi)
        if rec is None or not rec.dead or rec.key_digest is not None:
            return False
        self._spis.pop(spi)
        self._spi_changed(spi)
        return True

    # ------------------------------------------------------------ deleted bindings

    def deleted(self, hoa: str) -> DeletedBinding | None:
        """The de-registration record of ``hoa`` (RFC 6275 §10.3.2), None when there is none."""
        seq = self._deleted.items.get(hoa)
        return None if seq is None else DeletedBinding(seq, self._deleted.until(hoa))

    def set_deleted(self, hoa: str, sequence: int, until: float) -> None:
        """Keep ``sequence`` as ``hoa``'s last accepted BU Sequence # until ``until``."""
        self._deleted.set(hoa, sequence, until)
        if self._conn is not None:
            self._dirty_deleted.add(hoa)
            self._changed()

    def clear_deleted(self, hoa: str) -> None:
        if self._deleted.pop(hoa) is not None and self._conn is not None:
            self._dirty_deleted.add(hoa)
            self._changed()

    # ------------------------------------------------------------ ends

    def purge(self, now: float, limit: int | None = None) -> int:
        """End SPI records past their SA's validity end and old deleted-binding
        records (at most ``limit`` of each).

        Returns how many ended.
        """
        spis = self._spis.pop_ended(now, limit)
        hoas = self._deleted.pop_ended(now, limit)
        if (spis or hoas) and self._conn is not None:
            self._dirty_spis.update(spis)
            self._dirty_deleted.update(hoas)
            self._changed()
        return len(spis) + len(hoas)

    def records(self) -> dict[str, int]:
        """How many records of each kind are held (for stats)."""
        return {
            "spi_records": len(self._spis),
            "withdrawn_spis": self._spis.dead,
            "deleted_bindings": len(self._deleted),
        }
