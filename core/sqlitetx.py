"""SQLite helpers shared by the stores: one transaction on an autocommit
connection, never left open; whether a table exists."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

__all__ = ["table_exists", "transaction"]


@contextlib.contextmanager
def transaction(
    conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE"
) -> Iterator[sqlite3.Connection]:
    """``begin`` ... ``COMMIT``; on any error, a failed COMMIT included, ROLLBACK
    and re-raise.

    IMMEDIATE takes the write lock up front, so a check-then-write inside
    cannot interleave with another process.  The ROLLBACK after a failed
    COMMIT matters: SQLite may leave the transaction open (SQLITE_FULL,
    SQLITE_IOERR), and every later BEGIN would then fail ("within a
    transaction") even after the disk came back.
    """
    conn.execute(begin)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def table_exists(conn: sqlite3.Connection, name: str) -> bool:
    """Whether ``conn``'s main database has a table ``name``."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None
