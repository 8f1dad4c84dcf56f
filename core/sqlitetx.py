"""SQLite helpers shared by the stores: one transaction on an autocommit
connection, never left open; whether a table exists."""

from __future__ import annotations

import contextlib
import inspect
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

from mipsec.core.errors import StoreBusyError

__all__ = [
    "BUSY_TIMEOUT_MS",
    "LOOP_LOCK_WAIT",
    "begin_now",
    "loop_writer",
    "table_exists",
    "takes_wait",
    "transaction",
]

# The wait for a write lock another connection holds, on the connections of
# the SA store and the binding cache (several HACs may share one file).
BUSY_TIMEOUT_MS = 5000

# The longest a role's event loop waits inside SQLite for another
# connection's write lock before a write that can be retried later gives up
# (``StoreBusyError``): long enough for another process's commit (a HAC
# sharing the file), far below the connections' 5 s ``busy_timeout``, which
# would hold every MN of the role.
LOOP_LOCK_WAIT = 0.05


@contextlib.contextmanager
def transaction(
    conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE", *, wait: float | None = None
) -> Iterator[sqlite3.Connection]:
    """``begin`` ... ``COMMIT``; on any error, a failed COMMIT included, ROLLBACK
    and re-raise.

    IMMEDIATE takes the write lock up front, so a check-then-write inside
    cannot interleave with another process.  The ROLLBACK after a failed
    COMMIT matters: SQLite may leave the transaction open (SQLITE_FULL,
    SQLITE_IOERR), and every later BEGIN would then fail ("within a
    transaction") even after the disk came back.

    ``wait``: seconds the BEGIN may wait for a write lock another connection
    holds (the connection's ``busy_timeout`` for this BEGIN only, restored
    after); still held then: ``StoreBusyError``, nothing begun.
    """
    begin_now(conn, begin, wait)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def begin_now(conn: sqlite3.Connection, begin: str, wait: float | None) -> None:
    """Execute ``begin``; with ``wait``, waiting at most that long (seconds)
    for a write lock another connection holds -- the connection's
    ``busy_timeout`` for this statement only, then ``BUSY_TIMEOUT_MS`` again,
    which every connection this is used on was opened with -- and raising
    ``StoreBusyError`` if it is still held: nothing begun."""
    if wait is None:
        conn.execute(begin)
        return
    conn.execute(f"PRAGMA busy_timeout = {max(0, round(wait * 1000))}")
    try:
        conn.execute(begin)
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise
        raise StoreBusyError("the write lock is held by another process") from None
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def takes_wait(transaction: Callable[..., Any] | None) -> bool:
    """Whether a store's optional ``transaction()`` takes ``wait=`` (the
    SQLite store's does; a third party's may not)."""
    if transaction is None:
        return False
    try:
        return "wait" in inspect.signature(transaction).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def loop_writer(store: object) -> Callable[[], contextlib.AbstractContextManager[None]] | None:
    """For a role's store: what begins a transaction for a write its event
    loop may retry later -- waiting at most ``LOOP_LOCK_WAIT`` for another
    process's write lock, then ``StoreBusyError``, nothing begun -- or None
    when the store's optional ``transaction()`` cannot bound its wait (a
    third party's store, which then writes as it always did).  Looked up
    once, at start: ``takes_wait`` reads a signature."""
    tx = getattr(store, "transaction", None)
    if not takes_wait(tx):
        return None
    assert tx is not None
    return lambda: tx(wait=LOOP_LOCK_WAIT)  # type: ignore[no-any-return]


def table_exists(conn: sqlite3.Connection, name: str) -> bool:
    """Whether ``conn``'s main database has a table ``name``."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None
