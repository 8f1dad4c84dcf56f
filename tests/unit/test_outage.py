"""core/outage.py: one line when an outage begins, one when it ends."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from mipsec.core.outage import Outage, cause


def test_one_line_per_outage_and_one_per_recovery(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("mipsec.test.outage")
    caplog.set_level(logging.INFO, logger="mipsec.test.outage")
    o = Outage(log, "binding cache write", "replies withheld until it works")
    o.worked()  # nothing was failing: nothing to say
    full = sqlite3.OperationalError("database or disk is full")
    assert o.failed(full) and not o.failed(full) and not o.failed(full)
    o.worked()
    o.worked()
    assert o.failed(full, logging.WARNING)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "ERROR",
            "binding cache write failed: database or disk is full; replies withheld until it works",
        ),
        ("WARNING", "binding cache write works again"),
        (
            "WARNING",
            "binding cache write failed: database or disk is full; replies withheld until it works",
        ),
    ]


def test_cause_names_a_store_error_but_only_the_class_of_anything_else() -> None:
    assert cause(sqlite3.OperationalError("database or disk is full")) == (
        "OperationalError: database or disk is full"
    )
    assert cause(OSError(28, "No space left on device")) == (
        "OSError: [Errno 28] No space left on device"
    )
    # A third-party store's own exception may carry anything.
    assert cause(RuntimeError("connect failed: postgres://mipsec:s3cret@db/sa")) == "RuntimeError"
    assert cause(TimeoutError()) == "TimeoutError"  # no "TimeoutError: " with nothing after
