"""Credential backend ``sqlite``: MN pre-shared keys in an SQLite table.

Table ``mn_credentials(mn_id TEXT PRIMARY KEY, psk BLOB)``; a TEXT ``psk``
(a row typed in by hand) is taken as a UTF-8 passphrase, like ``psk`` in the
TOML backend.  The HAC opens the file read-only; ``add_psks`` (the
``mipsec credentials`` command, plugins/cred_tool.py) writes it.

NAI matching follows the TOML backend (RFC 7542 §2.4, §3): ``add_psk``
stores ``nai_key(mn_id)`` (realm lower-cased when ASCII, NFC), and a lookup
tries the identity exactly as sent, then its ``nai_key``.  Rows inserted by
other tools should therefore carry a lower-case ASCII realm.

A TEXT passphrase shorter than 20 characters is refused unless the option
``allow_short_passphrase = true`` is set (plugins/cred_toml.py says why): at
start every such row is an error naming the file and the row; a row added
later is ignored (that MN fails as an unknown one) and logged once.

Keys are stored in clear; ``add_psk`` creates the file with mode 0600, and
the HAC refuses to start when group or others may access it.

Lookups run on the HAC's event loop.  A file locked by another process (an
SQL client's ``BEGIN EXCLUSIVE``, the commit of a large import in rollback-
journal mode) held each lookup for SQLite's 5-s busy timeout, and every MN
of the HAC with it.  A lookup now waits at most ``LOOP_LOCK_WAIT`` (50 ms);
a lock still held then fails it with :class:`CredentialsBusyError` -- the
MN gets 503 with ``retry-after`` -- and the lookups of the next
``BUSY_BACKOFF`` seconds fail at once without waiting, so a lock held for
minutes costs the loop 50 ms per half second, not 5 s per MN.  One WARNING
when the lock is met, one when lookups work again.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from mipsec.core.fsutil import create_private
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.nai import nai_key
from mipsec.core.outage import Outage
from mipsec.core.secretfiles import check_private_sqlite
from mipsec.core.sqlitetx import BUSY_TIMEOUT_MS, LOOP_LOCK_WAIT
from mipsec.plugins._options import parse_options, resolve_path
from mipsec.plugins.cred_toml import MIN_PASSPHRASE, short_passphrase

log = logging.getLogger("mipsec.plugins.cred_sqlite")

# After a lookup met the file locked: lookups fail at once for this long.
BUSY_BACKOFF = 0.5


class CredentialsBusyError(Exception):
    """The credential database is locked by another process (its name is
    what the HAC's log line says: the message never reaches a log)."""


_SCHEMA = "CREATE TABLE IF NOT EXISTS mn_credentials (mn_id TEXT PRIMARY KEY, psk BLOB NOT NULL)"


def _as_key(value: object) -> bytes | None:
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, str) and value:
        return value.encode("utf-8")
    return None  # NULL, empty or a number: no usable credential


def add_psk(path: str | os.PathLike[str], mn_id: str, psk: bytes) -> None:
    """Insert or replace ``mn_id``'s key in the database at ``path`` (created 0600)."""
    add_psks(path, [(mn_id, psk)])


def add_psks(path: str | os.PathLike[str], items: Iterable[tuple[str, bytes]]) -> tuple[int, int]:
    """Insert or replace many keys in one transaction: ``(new, replaced)``.

    The file is created with mode 0600; an existing one must be private
    (the HAC refuses to start on one that is not).  All or nothing: an
    empty ``mn_id`` or key rolls the whole batch back (``ValueError`` naming
    the entry, never the key).
    """
    p = Path(path)
    create_private(p)  # 0600 whatever the umask: the file holds keys
    check_private_sqlite(p)
    conn = sqlite3.connect(p, isolation_level=None)
    new = replaced = 0
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_SCHEMA)
            for i, (mn_id, psk) in enumerate(items):
                if not mn_id:
                    raise ValueError(f"entry {i}: mn_id: empty")
                if not psk:
                    raise ValueError(f"entry {i} ({mn_id!r}): psk: empty key")
                key = nai_key(mn_id)
                held = conn.execute(
                    "SELECT 1 FROM mn_credentials WHERE mn_id = ?", (key,)
                ).fetchone()
                conn.execute(
                    "INSERT INTO mn_credentials (mn_id, psk) VALUES (?, ?) "
                    "ON CONFLICT (mn_id) DO UPDATE SET psk = excluded.psk",
                    (key, bytes(psk)),
                )
                if held:
                    replaced += 1
                else:
                    new += 1
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return new, replaced


def remove_psk(path: str | os.PathLike[str], mn_id: str) -> bool:
    """Delete ``mn_id``'s key -- every row the backend would find it under:
    any spelling of its realm's case, its user part as written; True if one
    was there.  (Only the exact and canonical spellings went before: a row
    written by another tool as ``alice@HOME.example`` survived ``remove
    alice@home.example``, which said it was gone -- found in review.)"""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{str(p)!r}: no such file")
    check_private_sqlite(p)
    conn = sqlite3.connect(p, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        want = nai_key(mn_id)
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(
                "SELECT mn_id FROM mn_credentials WHERE mn_id = ? COLLATE NOCASE", (mn_id,)
            ).fetchall()
            keys = [r[0] for r in rows if isinstance(r[0], str) and nai_key(r[0]) == want]
            gone = sum(
                conn.execute("DELETE FROM mn_credentials WHERE mn_id = ?", (k,)).rowcount
                for k in keys
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return gone > 0
    finally:
        conn.close()


def count_psks(path: str | os.PathLike[str]) -> int:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{str(p)!r}: no such file")
    conn = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM mn_credentials").fetchone()[0])
    finally:
        conn.close()


def _file_id(path: Path) -> tuple[int, int]:
    """(device, inode) of the regular file at ``path``; ``OSError`` for
    anything else -- a FIFO would block the event loop in SQLite's open."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    return (st.st_dev, st.st_ino)


_GONE = (-1, -1)  # remembered while the path cannot be stat()ed


class SQLiteCredentials:
    """``CredentialBackend`` over ``mn_credentials``, opened read-only.

    Changes made in the file (``mipsec credentials``, any SQL client) are
    seen at the next lookup through the open connection.  A file *replaced*
    at the path (a database built elsewhere and moved into place: a new
    inode) would not be: the connection would go on reading the old,
    unlinked one, and an MN removed that way would keep authenticating
    until a restart.  So each lookup compares the path's device and inode
    with the open file's (one ``stat``) and opens the new file, checked as
    at start; one that a start would refuse is logged once and the open one
    kept, as the TOML backend keeps its last contents.
    """

    def __init__(self, path: Path, *, allow_short_passphrase: bool = False) -> None:
        self.path = path
        self.allow_short_passphrase = allow_short_passphrase
        self._reported: set[str] = set()
        if not path.is_file():
            raise ValueError(f"{str(path)!r}: no such file")
        self._file = _file_id(path)
        self._conn = self._open(BUSY_TIMEOUT_MS)  # at start, nobody waits on the loop yet
        self._conn.execute(f"PRAGMA busy_timeout = {round(LOOP_LOCK_WAIT * 1000)}")
        self._bad_file: tuple[int, int] | None = None
        self._busy_until = 0.0  # monotonic: lookups fail at once until then
        self._lock = Outage(
            log, f"lookup in credential database {path}", "its MNs get 503 with retry-after"
        )

    def _open(self, wait_ms: int) -> sqlite3.Connection:
        """The file at ``path`` opened read-only and checked, waiting up to
        ``wait_ms`` for a lock; ValueError if refused."""
        path = self.path
        uri = path.resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
            # Fail at start, not at the first MN, when the table is missing.
            conn.execute("SELECT mn_id, psk FROM mn_credentials LIMIT 1").fetchall()
            # The first (by mn_id) passphrase that is too short, if any.
            short = (
                None
                if self.allow_short_passphrase
                else conn.execute(
                    "SELECT mn_id, psk FROM mn_credentials WHERE typeof(psk) = 'text' "
                    "AND length(psk) BETWEEN 1 AND ? ORDER BY mn_id LIMIT 1",
                    (MIN_PASSPHRASE - 1,),
                ).fetchone()
            )
        except sqlite3.Error as exc:
            conn.close()
            raise ValueError(f"{str(path)!r}: {exc}") from None
        if short is not None:
            mn_id, psk = short
            why = short_passphrase(psk, str(mn_id))
            if why is not None:
                conn.close()
                raise ValueError(f"{str(path)!r}: mn_credentials[mn_id={mn_id!r}].psk: {why}")
        return conn

    def _follow(self) -> None:
        """Open the file now at ``path`` if it is another one (see the class)."""
        try:
            now = _file_id(self.path)
        except OSError as exc:
            if self._bad_file != _GONE:
                self._bad_file = _GONE
                log.error(
                    "credential database %s unreadable, keeping the one open: %s",
                    self.path,
                    exc.strerror or type(exc).__name__,
                )
            return
        if now == self._file or now == self._bad_file:
            return
        try:
            check_private_sqlite(self.path)
            conn = self._open(round(LOOP_LOCK_WAIT * 1000))  # on the event loop
        except (OSError, ValueError) as exc:
            # Once per refused file; the message never holds a key.
            self._bad_file = now
            log.error(
                "credential database %s replaced by one that is refused, keeping the one open: %s",
                self.path,
                exc,
            )
            return
        old, self._conn, self._file, self._bad_file = self._conn, conn, now, None
        old.close()
        self._reported.clear()
        log.info("credential database %s replaced on disk: the new file is used", self.path)

    def __repr__(self) -> str:
        return f"SQLiteCredentials(path={str(self.path)!r})"

    def _lookup(self, key: str) -> bytes | None:
        row = self._conn.execute(
            "SELECT psk FROM mn_credentials WHERE mn_id = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        value = row[0]
        if isinstance(value, str) and value and not self.allow_short_passphrase:
            why = short_passphrase(value, key)
            if why is not None:
                if key not in self._reported:  # once per entry, not once per attempt
                    self._reported.add(key)
                    log.error("%s: mn_credentials[mn_id=%r].psk ignored: %s", self.path, key, why)
                return None
        return _as_key(value)

    def get_psk(self, mn_id: str) -> bytes | None:
        if self._busy_until and time.monotonic() < self._busy_until:
            raise CredentialsBusyError("credential database locked by another process")
        self._follow()
        try:
            psk = self._lookup(mn_id)
            if psk is None:
                norm = nai_key(mn_id)
                if norm != mn_id:
                    psk = self._lookup(norm)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            self._busy_until = time.monotonic() + BUSY_BACKOFF
            self._lock.failed("locked by another process", logging.WARNING)
            raise CredentialsBusyError("credential database locked by another process") from None
        if self._busy_until:
            self._busy_until = 0.0
            self._lock.worked()
        return psk

    def close(self) -> None:
        self._conn.close()


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1)
    allow_short_passphrase: StrictBool = False  # an opt-out: TOML true only


class SQLiteCredentialsFactory:
    name = "sqlite"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> SQLiteCredentials:
        opts = parse_options(_Options, options)
        path = resolve_path(opts.path, ctx.base_dir)
        try:
            check_private_sqlite(path)
            return SQLiteCredentials(path, allow_short_passphrase=opts.allow_short_passphrase)
        except (OSError, ValueError) as exc:
            raise ValueError(f"path: {exc}") from None


@hookimpl
def mipsec_credential_backends() -> list[SQLiteCredentialsFactory]:
    return [SQLiteCredentialsFactory()]
