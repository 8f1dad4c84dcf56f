"""WAL checkpoints of a SQLite file, in a thread of their own.

SQLite checkpoints a WAL database on the connection whose commit takes the
log past ``wal_autocheckpoint`` pages (1,000 by default): that commit then
copies the log's pages into the database file and fsyncs both files before
it returns.  On the HAC that commit runs on the event loop, which serves
every MN.  At 100,000 live SAs a bootstrap dirties ~8 pages spread over the
whole file (the old SA's row and index entries, its ``retired_sa`` row, the
new row), so a checkpoint came every ~125 bootstraps and held the loop for
its copy and its fsyncs (issue 9: 3.3 ms per fdatasync, measured under
strace; the spread-MN rate at 100k rose from 0.85-0.86x to 0.88-0.91x of
the empty lab's when the checkpoints left the loop).

:class:`WalCheckpointer` runs PASSIVE checkpoints every ``interval`` seconds
on a connection of its own, in a daemon thread.  PASSIVE never waits for a
reader or writer and never blocks one (SQLite's WAL allows a checkpoint
beside a writer), and SQLite releases the GIL while it copies.  The owner
keeps ``wal_autocheckpoint`` at :data:`BACKSTOP_PAGES` on its own
connection, so the log stays bounded if this thread falls behind or fails.
With ``synchronous = NORMAL`` a power loss takes the commits since the last
checkpoint: now about one interval's, where it was up to 1,000 pages' worth
(hours at a quiet HAC).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from mipsec.core.outage import Outage, cause

__all__ = ["BACKSTOP_PAGES", "WAL_SIZE_LIMIT", "WalCheckpointer", "limit_wal"]

# The owner's own wal_autocheckpoint while a checkpointer runs: ~32 MB of
# log (4 KiB pages).  Reached only if the thread falls behind or fails.
BACKSTOP_PAGES = 8192
_JOIN_S = 5.0  # close(): how long to wait for a checkpoint under way
# What the WAL file is cut back to once a checkpoint has emptied it: ~1,000
# pages, more than a second's commits at the busiest HAC measured.
WAL_SIZE_LIMIT = 4 * 1024 * 1024


def limit_wal(conn: sqlite3.Connection) -> None:
    """Let the WAL file of ``conn`` (the writer's connection) shrink again.

    SQLite reuses its WAL from the start after a checkpoint and never
    shrinks it: one burst (a mass revocation, an HA loading 100k SAs, a
    checkpoint thread that fell behind) left the file at its high-water
    size for good.  With ``journal_size_limit`` the first commit after the
    log was emptied cuts the file back to :data:`WAL_SIZE_LIMIT`.
    """
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")


class WalCheckpointer:
    """PASSIVE checkpoints of ``path`` every ``interval`` seconds, off the caller's thread.

    ``start()`` once; ``close()`` stops the thread (waiting for a checkpoint
    under way) before the owner closes its own connection.  A failure is
    logged once at WARNING (``what``, e.g. "SA store checkpoint") and once
    when it works again, never per retry; a checkpoint that meets a lock
    (another process recovering the file) is tried again at the next tick,
    silently.
    """

    def __init__(self, path: Path, interval: float, log: logging.Logger, what: str) -> None:
        if not interval > 0:
            raise ValueError(f"interval: {interval!r} is not a positive number of seconds")
        self.path = path
        self.interval = interval
        # The last checkpoint's (frames in the log, frames checkpointed).
        self.last: tuple[int, int] | None = None
        self.rounds = 0  # checkpoints run
        self._log, self._what = log, what
        self._outage = Outage(
            log,
            what,
            f"the log grows meanwhile (its writer checkpoints it past {BACKSTOP_PAGES:,} pages)",
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"checkpoint {path.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @classmethod
    def attach(
        cls, conn: sqlite3.Connection, path: Path, interval: float, log: logging.Logger, what: str
    ) -> WalCheckpointer:
        """Started for the file ``conn`` (the owner's connection) writes:
        ``conn`` keeps only the backstop checkpoint (:data:`BACKSTOP_PAGES`)."""
        conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
        checkpointer = cls(path, interval, log, what)
        checkpointer.start()
        return checkpointer

    def status(self) -> dict[str, Any]:
        """For ``mipsec status``: the interval, whether the thread runs and
        is failing, and the last checkpoint's frames (in the log, copied)."""
        last = self.last
        return {
            "interval_s": self.interval,
            "running": self.running,
            "failing": self._outage.failing,
            "rounds": self.rounds,
            "log_frames": None if last is None else last[0],
            "checkpointed": None if last is None else last[1],
        }

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(_JOIN_S)
            if self._thread.is_alive():
                # Stuck in I/O (a failing disk, a hung network file system).
                # Not waited for: the owner's connection closes on its own,
                # a checkpoint cut by the process's exit is recovered by
                # SQLite like a crash's, and no commit is in the thread.
                self._log.warning(
                    "%s: still under way after %g s at close, not waited for "
                    "(the disk may be failing)",
                    self._what,
                    _JOIN_S,
                )

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:  # the owner opened it a moment ago: rare
            self._outage.failed(cause(exc), logging.WARNING)
            return
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.checkpoint(conn)
                except Exception as exc:  # a bug, not the file: said once, the thread goes on
                    self._outage.failed(cause(exc), logging.ERROR)
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        """One PASSIVE checkpoint on ``conn`` (this thread's connection)."""
        try:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return  # held for a moment by another connection: next tick
            self._outage.failed(cause(exc), logging.WARNING)
        except (sqlite3.Error, OSError) as exc:
            self._outage.failed(cause(exc), logging.WARNING)
        else:
            self._outage.worked()
            if row is not None:  # (busy, frames in the log, frames checkpointed)
                self.last = (row[1], row[2])
            self.rounds += 1
