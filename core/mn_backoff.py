"""The MN daemon's backoff, kept across a restart.

Until the twenty-fourth session the failures-in-a-row count and the wait of
:func:`mipsec.core.mn_retry.next_wait` lived in the process only.  An MN
that a supervisor restarts (``Restart=on-failure``, ``RestartSec=2``), or
that an operator's script restarts in a loop, therefore came back to its
HAC at once each time, whatever it had been told: a 503's ``retry-after``
and ten minutes of doubled waits were gone with the process.  Every timer
is a deadline that survives a restart: the wait is written down as a date
(``not_before``, UTC) with the count, and a new process waits out what is
left of it -- within ``retry_max`` (a clock set back must not park the MN
for days) -- before its first bootstrap.  A success removes the file.

The file is ``[hac] backoff_file``, by default ``<config name>.backoff`` in
``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``) or, without one, next
to the configuration file.  Deleting it makes the next start bootstrap at
once; a damaged file is reported (file and reason) and ignored -- it only
ever delays, so ignoring it can cost the HAC one early attempt, never the
MN its service.  A directory the MN may not write to costs one WARNING and
the persistence, nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mipsec.core.filedigest import read_regular
from mipsec.core.fsutil import write_file
from mipsec.core.mn_retry import next_wait

__all__ = [
    "Backoff",
    "BackoffFileError",
    "Kept",
    "backoff_path",
    "decode_kept",
    "default_path",
    "encode_kept",
]

# The file holds two small fields; anything larger is not one of ours.
MAX_FILE = 4096
# Failures in a row beyond this add nothing (the wait is at retry_max long
# before); a larger count in the file is damage, not history.
MAX_FAILURES = 1_000_000
FILE_MODE = 0o600


class BackoffFileError(ValueError):
    """The backoff file cannot be used: names the file, the field and why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Kept:
    failures: int  # bootstraps or registrations failed in a row, >= 1
    not_before: datetime  # aware, UTC: no bootstrap before this
    # Whose: two MNs given one file (a shared state directory, the same
    # config name) must not inherit each other's waits.
    mn_id: str
    # Aware, UTC: the part of the wait a 503's retry-after asked for (at
    # most ``not_before``), which SIGUSR1 does not cut (core/mn_wait.py) --
    # in the process that was told, and in the one that resumes the wait
    # after a restart.  None: no retry-after (files written before it).
    hac_not_before: datetime | None = None


def encode_kept(kept: Kept) -> bytes:
    obj: dict[str, object] = {
        "mn_id": kept.mn_id,
        "failures": kept.failures,
        "not_before": kept.not_before.astimezone(UTC).isoformat(),
    }
    if kept.hac_not_before is not None:
        obj["hac_not_before"] = kept.hac_not_before.astimezone(UTC).isoformat()
    return (json.dumps(obj) + "\n").encode()


def _date(obj: dict[str, Any], name: str, path: Path | str) -> datetime:
    text = obj.get(name)
    if not isinstance(text, str):
        raise BackoffFileError(path, f"{name}: {text!r} is not an ISO 8601 date")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BackoffFileError(path, f"{name}: {text!r} is not an ISO 8601 date") from None
    if when.tzinfo is None:
        raise BackoffFileError(path, f"{name}: {text!r} has no UTC offset")
    return when.astimezone(UTC)


def decode_kept(data: bytes, path: Path | str = "<backoff>") -> Kept:
    """Parse a backoff file's octets; ``BackoffFileError`` names what is wrong."""
    if len(data) > MAX_FILE:
        raise BackoffFileError(path, f"{len(data)} octets, more than a backoff file holds")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackoffFileError(path, f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BackoffFileError(path, "not a JSON object")
    mn_id = obj.get("mn_id")
    if not isinstance(mn_id, str) or not 1 <= len(mn_id) <= 253:
        raise BackoffFileError(path, f"mn_id: {mn_id!r} is not an NAI")
    failures = obj.get("failures")
    if type(failures) is not int or not 1 <= failures <= MAX_FAILURES:
        raise BackoffFileError(
            path, f"failures: {failures!r} is not a count from 1 to {MAX_FAILURES}"
        )
    when = _date(obj, "not_before", path)
    hac = None if obj.get("hac_not_before") is None else _date(obj, "hac_not_before", path)
    return Kept(failures, when, mn_id, hac)


def default_path(config_file: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """``<config name>.backoff`` in ``$STATE_DIRECTORY`` (the first, if systemd
    lists several), else in the configuration file's directory."""
    config = Path(config_file)
    name = f"{config.stem or 'mn'}.backoff"
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / name
    return config.resolve().parent / name


def backoff_path(cfg: Any, config_file: str) -> Path:
    """``[hac] backoff_file`` (already resolved against the configuration
    file's directory), else :func:`default_path`."""
    configured = cfg.hac.backoff_file
    return Path(configured) if configured is not None else default_path(config_file)


class Backoff:
    """Failures in a row and the next allowed bootstrap, in memory and on disk.

    ``path`` None: nothing is kept (``--once``, ``[hac] keep_backoff = false``).
    """

    def __init__(
        self,
        path: Path | None,
        *,
        mn_id: str,
        retry_min: float,
        retry_max: float,
        log: logging.Logger,
        uniform: Callable[[float, float], float] = random.uniform,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = path
        self.mn_id = mn_id
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.failures = 0
        self._log = log
        self._uniform = uniform
        self._clock = clock
        self._write_failed = False
        # Set by ``resume``: of the seconds it returns, those a 503's
        # retry-after asked for (SIGUSR1 cuts the wait no lower).
        self.hac_left = 0.0

    def resume(self) -> float:
        """What the last process left: sets ``failures`` and returns the
        seconds still to wait (0: bootstrap now), at most ``retry_max``."""
        if self.path is None:
            return 0.0
        try:
            # Opened without blocking, refused unless a regular file of at
            # most MAX_FILE octets: a FIFO put at the path must not hold the
            # MN before its first bootstrap.
            kept = decode_kept(read_regular(self.path, MAX_FILE), self.path)
        except FileNotFoundError:
            return 0.0
        except OSError as exc:
            self._log.warning(
                "mn: backoff file %s not read, ignored: %s", self.path, exc.strerror or exc
            )
            return 0.0
        except BackoffFileError as exc:
            self._log.warning("mn: backoff file %s ignored: %s", exc.path, exc.reason)
            return 0.0
        if kept.mn_id != self.mn_id:
            self._log.warning(
                "mn: backoff file %s ignored: kept for mn_id=%s, not this MN's %s",
                self.path,
                kept.mn_id,
                self.mn_id,
            )
            return 0.0
        self.failures = kept.failures
        now = self._clock()
        left = min(max((kept.not_before - now).total_seconds(), 0.0), self.retry_max)
        if kept.hac_not_before is not None:
            self.hac_left = min(max((kept.hac_not_before - now).total_seconds(), 0.0), left)
        return left

    def failed(self, retry_after: datetime | None = None) -> float:
        """One more failure in a row: the seconds to wait, written down as a date."""
        self.failures = min(self.failures + 1, MAX_FAILURES)
        now = self._clock()
        wait = next_wait(
            self.failures,
            retry_min=self.retry_min,
            retry_max=self.retry_max,
            retry_after=retry_after,
            now=now,
            uniform=self._uniform,
        )
        not_before = now + timedelta(seconds=wait)
        hac = None if retry_after is None or retry_after <= now else min(retry_after, not_before)
        self._keep(Kept(self.failures, not_before, self.mn_id, hac))
        return wait

    def succeeded(self) -> None:
        """A bootstrap and registration went through: the count starts again."""
        self.failures = 0
        if self.path is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._warn_once(exc)

    def _keep(self, kept: Kept) -> None:
        if self.path is None:
            return
        try:
            # Renamed into place: a kill at any instant leaves the old file
            # or the new one, never half of one.
            write_file(self.path, encode_kept(kept), FILE_MODE)
        except OSError as exc:
            self._warn_once(exc)
        else:
            self._written_again()

    def _written_again(self) -> None:
        # One line when the file works again (a disk that was full has room,
        # a directory was fixed): the operator who read the warning learns
        # that the backoff survives a restart again, without a line per write.
        if self._write_failed:
            self._write_failed = False
            self._log.info("mn: backoff file %s written again: kept across restarts", self.path)

    def _warn_once(self, exc: OSError) -> None:
        if not self._write_failed:
            self._write_failed = True
            self._log.warning(
                "mn: the backoff is not kept across restarts: cannot write %s: %s",
                self.path,
                exc.strerror or exc,
            )
