"""One log line when a repeated operation starts failing, one when it works again.

A role retries what fails on a full or broken disk (the HA's binding-cache
commit, its WAL checkpoint, an expiry run) on every burst or every second.
An operator needs to see the outage begin and end, not a line per retry
(issue 9 item 3: one line, never a traceback): :class:`Outage` keeps that state.
"""

from __future__ import annotations

import logging
import sqlite3

from mipsec.core.errors import StoreBusyError

__all__ = ["Outage", "cause"]


def cause(exc: BaseException) -> str:
    """What to say of ``exc`` in a log line, without risking a secret.

    ``sqlite3`` and ``OSError`` messages name the cause ("database or disk
    is full") and never carry key material, nor does ``StoreBusyError``;
    any other exception may come from a third-party plugin whose message
    could hold anything (a connection string with its password): its class
    name only.
    """
    name = type(exc).__name__
    if isinstance(exc, sqlite3.Error | OSError | StoreBusyError):
        text = str(exc)
        # TimeoutError (an OSError) from asyncio.timeout carries no text.
        return f"{name}: {text}" if text else name
    return name


class Outage:
    """State of one retried operation: failing or not, logged on each change."""

    __slots__ = ("failing", "log", "note", "what")

    def __init__(self, log: logging.Logger, what: str, note: str = "") -> None:
        self.log = log
        self.what = what  # e.g. "binding cache write"
        self.note = note  # what happens meanwhile, e.g. "replies withheld until it works"
        self.failing = False

    def failed(self, why: object, level: int = logging.ERROR) -> bool:
        """Record a failure (``why``: the exception, or what to say of it);
        log it if it begins an outage.  True if it did."""
        if self.failing:
            return False
        self.failing = True
        # str() of a sqlite3/OSError names the cause ("database or disk is
        # full"); such errors never carry a key.
        self.log.log(
            level, "%s failed: %s%s", self.what, why, f"; {self.note}" if self.note else ""
        )
        return True

    def worked(self) -> None:
        """Record a success; log the end of an outage."""
        if self.failing:
            self.failing = False
            self.log.warning("%s works again", self.what)
