"""Operator log lines (core/logsetup.py): one line, UTC, JSON mode, levels."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core import logsetup, sdnotify

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    yield buf
    logsetup.configure("info", "text", {}, stream=io.StringIO())  # drop overrides
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def _boom() -> None:
    raise ValueError("bad value\nsecond line")


def test_text_is_one_line_utc_and_keeps_no_traceback_at_info(stream: io.StringIO) -> None:
    logsetup.configure("info", "text", {}, stream=stream)
    log = logging.getLogger("mipsec.t1")
    log.info("two\nlines")
    try:
        _boom()
    except ValueError:
        log.exception("failed for mn_id=%s", "a@b.test")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert all(TS.match(x) for x in lines)
    assert lines[0].endswith("INFO mipsec.t1: two\\nlines")
    assert "error=ValueError: bad value\\nsecond line" in lines[1]
    assert "Traceback" not in stream.getvalue()


def test_traceback_only_when_the_logger_is_at_debug(stream: io.StringIO) -> None:
    logsetup.configure("info", "text", {"mipsec.t2": "debug"}, stream=stream)
    try:
        _boom()
    except ValueError:
        logging.getLogger("mipsec.t2").exception("x")
        logging.getLogger("mipsec.other").exception("y")
    out = stream.getvalue()
    assert out.count("Traceback") == 1
    # A reload without the override: the logger follows the root again.
    logsetup.configure("info", "text", {}, stream=stream)
    assert logging.getLogger("mipsec.t2").getEffectiveLevel() == logging.INFO


def test_json_one_object_per_line_with_event_fields(stream: io.StringIO) -> None:
    logsetup.configure("info", "json", {}, stream=stream)
    log = logging.getLogger("mipsec.events")
    log.info("event=sa_issued spi=7 mn_id=a@b.test peer=127.0.0.1:5")
    try:
        _boom()
    except ValueError:
        log.exception("oops")
    recs = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert len(recs) == 2
    assert recs[0]["event"] == "sa_issued" and recs[0]["mn_id"] == "a@b.test"
    assert recs[0]["ts"].endswith("Z") and recs[0]["level"] == "INFO"
    assert recs[1]["error"] == "ValueError: bad value\nsecond line"
    assert "traceback" not in recs[1]


def test_json_event_values_with_spaces_stay_one_field(stream: io.StringIO) -> None:
    # The event plugin writes a value with spaces, quotes or '=' as a JSON
    # string; split at spaces it gave reason='"no' and a forged field
    # admin='true"' (found in review).
    from mipsec.plugins import event_log

    logsetup.configure("info", "json", {}, stream=stream)
    event_log.mipsec_auth_failed(
        mn_id="a=b@x.test",
        method="eap",
        status=401,
        peer="[::1]:5",
        reason='no answer from HA within 5 s admin=true "q" \x1b',
    )
    (rec,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert rec["reason"] == 'no answer from HA within 5 s admin=true "q" \x1b'
    assert rec["mn_id"] == "a=b@x.test" and rec["peer"] == "[::1]:5"
    assert rec["status"] == "401" and "admin" not in rec
    assert logsetup.event_fields('event=x r="cut k=v') == {"event": "x", "k": "v"}


def test_records_skip_the_caller_thread_and_process_lookups(stream: io.StringIO) -> None:
    """Neither format prints them; a record made after ``configure`` does not
    pay for them (a stack walk per line on the hot path, issue 9)."""
    logsetup.configure("info", "text", {}, stream=stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append(record)
            return True

    log = logging.getLogger("mipsec.test.lookups")
    log.addFilter(keep := Keep())
    try:
        log.info("event=sa_issued spi=%d", 7)
    finally:
        log.removeFilter(keep)
    (rec,) = seen
    assert rec.lineno == 0 and rec.thread is None and rec.process is None
    assert stream.getvalue().endswith("INFO mipsec.test.lookups: event=sa_issued spi=7\n")


def test_level_and_per_component_levels(stream: io.StringIO) -> None:
    logsetup.configure("warning", "text", {"mipsec.loud": "debug"}, stream=stream)
    logging.getLogger("mipsec.quiet").info("hidden")
    logging.getLogger("mipsec.loud").debug("shown")
    out = stream.getvalue()
    assert "hidden" not in out and "shown" in out


def test_sd_notify_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False  # outside systemd: nothing, no error
    for name in (str(tmp_path / "n.sock"), f"@mipsec-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind("\0" + name[1:] if name.startswith("@") else name)
            s.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", name)
            assert sdnotify.ready("hac serving")
            assert s.recv(512) == b"READY=1\nSTATUS=hac serving"
            assert sdnotify.reloading()
            assert s.recv(512).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
            assert sdnotify.stopping()
            assert s.recv(512) == b"STOPPING=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    assert sdnotify.ready() is False  # a dead socket never stops the role


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True).filter(lambda k: k != "event"),
        st.text(max_size=40),
        max_size=6,
    )
)
def test_event_fields_reads_back_what_the_event_plugin_writes(fields: dict[str, str]) -> None:
    """Whatever the values (spaces, quotes, '=', backslashes, controls,
    non-ASCII), the JSON formatter's fields are the event's own."""
    from mipsec.plugins.event_log import _Fields

    line = f"event=x {_Fields(dict(fields))}" if fields else "event=x"
    got = logsetup.event_fields(line)
    assert got == {"event": "x", **{k: v for k, v in fields.items()}}
