"""Operator logs: one event per line, UTC ISO 8601 timestamps, text or JSON.

Every role logs through the root handler installed here (``configure``),
called at start and again on reload (the level, per-component levels and the
format may change live).  Rules (issue 10 item 4):

* one record is one line, always: newlines inside a message are escaped, and
  an exception attached to a record becomes ``error=Type: message`` on the
  same line; the traceback is added (as further lines) only when the
  record's logger is at DEBUG -- a developer's setting, never an operator's;
* timestamps are UTC, ``2026-12-03T06:58:14.123Z``, whatever the host's zone;
* ``json``: exactly one JSON object per line, ``{"ts", "level", "logger",
  "msg"}``; an event line (``event=sa_issued mn_id=... peer=...``, see
  plugins/event_log.py) also has its ``key=value`` pairs as fields, so a log
  shipper needs no parsing rules.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, Literal, TextIO

__all__ = ["LEVELS", "configure", "event_fields"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip

LogFormat = Literal["text", "json"]

# Per-component levels set by the last configure(): reset to NOTSET when a
# reload drops them, so a removed override stops applying.
_overridden: set[str] = set()
_HANDLER_NAME = "mipsec"


def _utc(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _error(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[1] is None:
        return None
    exc = record.exc_info[1]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _traceback(record: logging.LogRecord) -> str | None:
    # Only a logger at DEBUG gets the stack: it is for developers, and it may
    # quote local values an operator's log must not keep.
    if record.exc_info and logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
        return "".join(traceback.format_exception(*record.exc_info)).rstrip()
    return None


# A JSON string as json.dumps writes one: no raw control character, escapes
# of a backslash and one character (\uXXXX checked by json.loads).
_JSON_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"')


def event_fields(msg: str) -> dict[str, str]:
    """``key=value`` fields of an event line (plugins/event_log.py writes them).

    A value is either plain (no space, quote, ``=`` or backslash) or a JSON
    string; the JSON string is decoded whole, so a reason with spaces is one
    field, not a stray quote plus whatever ``k=v`` its words spell (found in
    review: ``reason="no answer ... admin=true"`` gave a field ``admin``).
    """
    out: dict[str, str] = {}
    i, n = 0, len(msg)
    while i < n:
        end = msg.find(" ", i)
        if end < 0:
            end = n
        eq = msg.find("=", i, end)
        if eq < 0:
            i = end + 1
            continue
        key = msg[i:eq]
        if eq + 1 < n and msg[eq + 1] == '"':
            # The string's extent by a regex (linear), decoded only if whole:
            # a failed raw_decode counts lines from the start of the message,
            # quadratic over a crafted line (review of the change).
            m = _JSON_STRING.match(msg, eq + 1)
            if m is not None and (m.end() == n or msg[m.end()] == " "):
                try:
                    value = json.loads(m.group())
                except ValueError:
                    value = None
                if isinstance(value, str):
                    if key.isidentifier():
                        out.setdefault(key, value)
                    i = m.end() + 1
                    continue
            stop = m.end() if m is not None else end
            end = msg.find(" ", stop) if stop < n else n
            end = n if end < 0 else end
            i = end + 1
            continue
        if key.isidentifier():
            out.setdefault(key, msg[eq + 1 : end])
        i = end + 1
    return out


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record)} {record.levelname} {record.name}: {_one_line(record.getMessage())}"
        err = _error(record)
        if err is not None:
            line += f" error={_one_line(err)}"
        tb = _traceback(record)
        return line if tb is None else f"{line}\n{tb}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        obj: dict[str, Any] = {
            "ts": _utc(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": msg,
        }
        if msg.startswith("event="):
            for k, v in event_fields(msg).items():
                obj.setdefault(k, v)
        err = _error(record)
        if err is not None:
            obj["error"] = err
        tb = _traceback(record)
        if tb is not None:
            obj["traceback"] = tb  # still one line: json.dumps escapes the newlines
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def configure(
    level: str = "info",
    fmt: LogFormat = "text",
    levels: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Install (or update) the one root handler on stderr (``stream``: tests)."""
    # Neither formatter prints the caller's file/line, thread or process: not
    # looking them up saves a stack walk and three lookups on every record
    # (the logging HOWTO's "Optimization"; issue 9: one line per bootstrap).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None or stream is not None:
        for h in list(root.handlers):  # e.g. an earlier basicConfig
            root.removeHandler(h)
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.set_name(_HANDLER_NAME)
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.setLevel(LEVELS.get(level.lower(), logging.INFO))
    wanted = dict(levels or {})
    for name in _overridden - set(wanted):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, lvl in wanted.items():
        logging.getLogger(name).setLevel(LEVELS.get(lvl.lower(), logging.INFO))
    _overridden.clear()
    _overridden.update(wanted)


def configure_from(cfg: Any) -> None:
    """``configure`` from a role's validated configuration."""
    configure(
        getattr(cfg, "log_level", "info"),
        getattr(cfg, "log_format", "text"),
        getattr(cfg, "log_levels", None),
    )
