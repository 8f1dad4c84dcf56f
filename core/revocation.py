"""The HAC's list of revoked MNs (``mipsec revoke`` / ``unrevoke``), kept in two files.

* The **snapshot**, ``path``: a JSON object ``{"version": 1, "revoked":
  {mn_id: since}}``, replaced atomically (temporary file + rename, mode 0600,
  fsynced), so a crash leaves either the old list or the new one.
* The **journal**, ``path`` + ``.journal``: one JSON object per line, each
  change since the snapshot (``{"add": mn_id, "since": ...}`` or
  ``{"remove": mn_id}``), appended and fsynced before the change is
  acknowledged.

A change costs one appended line, whatever the number of MNs revoked: with
the snapshot alone every ``revoke`` rewrote the whole list on the event loop
(209 ms per command at 100,000 revoked MNs, measured 2026-12-05), and a
mass revocation cost the square of its size.  The journal is folded into a
new snapshot once it holds as many lines as the snapshot has entries (and
at least ``COMPACT_MIN``): the rewrites cost O(1) per change amortized, and
the journal never outgrows the snapshot, so a start reads O(list) lines.
Folding writes the snapshot first and empties the journal after: a crash
between the two replays changes the snapshot already holds, which gives the
same list (each line sets one identity's state; the last line about an
identity wins either way).

Both are read once at start.  A file that cannot be read, or a journal line
that is not a change, is an error at start naming the file (fail closed: a
HAC that forgot its revocations would let revoked MNs back in) -- except a
last line without its newline: a change whose append was cut by a crash was
never acknowledged, so it is dropped, and the next change folds the journal
rather than append after the torn octets.

**Several HACs may share one list** (the same ``path``, e.g. HACs that
share an SA store): every change is made under an exclusive ``flock`` of
``path`` + ``.lock``, after reading what the others changed, and every
lookup first compares the two files' identity and size with what this
process read (two ``stat`` calls): a grown journal is read from where this
process stopped, a new snapshot (another process folded) or a new journal is
read whole, under a shared lock, so no reader sees an append or a fold
half-done.  A revocation made on one HAC therefore refuses the MN on every
HAC from its next lookup on.  If the files cannot be read again later, the
list last read stays in force and one line says so (a HAC does not refuse
every MN, nor forget a revocation, because of a file it read before).

Identities are kept and looked up under their canonical form
(:func:`mipsec.core.nai.nai_key`: the realm is case-insensitive), so a revoked
MN does not come back by changing the case of its realm; a file written
before that is read the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mipsec.core.errors import ConfigError
from mipsec.core.filedigest import check_regular_fd, open_regular, read_regular
from mipsec.core.fsutil import PRIVATE_FILE, left_temporaries, sync_dir, write_file
from mipsec.core.nai import nai_key

__all__ = ["COMPACT_MIN", "RevocationList", "journal_path", "lock_path"]

log = logging.getLogger("mipsec.revocation")

VERSION = 1
COMPACT_MIN = 1024  # journal lines always allowed before a fold
MAX_LIST_FILE = 1 << 30  # the snapshot or the journal: far above millions of MNs


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


# What a lookup compares to notice another process's change: the file's
# identity and size (None: absent).  A fold replaces the snapshot (a new
# inode) and removes the journal; an append grows the journal.
_Ident = tuple[int, int, int, int] | None


def _same_file(now: _Ident, seen: _Ident) -> bool:
    """The journal read before, perhaps grown (not replaced, removed, or cut)."""
    if now is None or seen is None:
        return now is seen
    return now[:2] == seen[:2] and now[2] >= seen[2]


def _ident(path: Path | str) -> _Ident:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class RevocationList:
    def __init__(self, path: Path, *, config_file: str = "<memory>") -> None:
        self.path = path
        self.journal = journal_path(path)
        self.lock = lock_path(path)
        self._path_s, self._journal_s = os.fspath(path), os.fspath(self.journal)
        self._config_file = config_file
        self._revoked: dict[str, str] = {}
        self._lines = 0  # complete lines in the journal
        self._folded = 0  # entries in the snapshot
        self._torn = False  # the journal ends in a cut line: fold before appending
        self._snap_id: _Ident = None  # the snapshot as last read
        self._journal_id: _Ident = None  # the journal as last read (its size: up to _offset)
        self._offset = 0  # octets of the journal applied (complete lines)
        self._stale = False  # a re-read failed: the list last read stays in force
        with self._locked(fcntl.LOCK_SH):
            self._load()

    def __contains__(self, mn_id: object) -> bool:
        self.refresh()
        return isinstance(mn_id, str) and nai_key(mn_id) in self._revoked

    def __len__(self) -> int:
        self.refresh()
        return len(self._revoked)

    def items(self) -> dict[str, str]:
        self.refresh()
        return dict(self._revoked)

    def add(self, mn_id: str) -> bool:
        """Revoke ``mn_id`` (persisted before this returns); False if it already was."""
        mn_id = nai_key(mn_id)
        with self._locked(fcntl.LOCK_EX):
            self._catch_up()  # another HAC's changes first: the journal's end, the fold due
            if mn_id in self._revoked:
                return False
            since = datetime.now(UTC).replace(microsecond=0).isoformat()
            self._change({"add": mn_id, "since": since})  # raises: nothing changed
            self._revoked[mn_id] = since
            return True

    def remove(self, mn_id: str) -> bool:
        mn_id = nai_key(mn_id)
        with self._locked(fcntl.LOCK_EX):
            self._catch_up()
            if mn_id not in self._revoked:
                return False
            self._change({"remove": mn_id})
            del self._revoked[mn_id]
            return True

    # ------------------------------------------------------------ sharing

    def refresh(self) -> None:
        """Take in what another process sharing the files changed since this
        one last read them (nothing to do, the usual case: two ``stat``)."""
        # Two stat calls on every lookup, twice per bootstrap: the paths as
        # str, ready (a Path converts itself each time).
        if _ident(self._path_s) == self._snap_id and _ident(self._journal_s) == self._journal_id:
            return
        try:
            with self._locked(fcntl.LOCK_SH):
                self._catch_up()
        except (ConfigError, OSError) as exc:
            if not self._stale:
                self._stale = True
                reason = exc.reason if isinstance(exc, ConfigError) else exc.strerror
                log.error(
                    "revocation list %s: cannot read it again (%s); the %d revocation(s) "
                    "read before stay in force",
                    self.path,
                    reason,
                    len(self._revoked),
                )
            return
        if self._stale:
            self._stale = False
            log.warning(
                "revocation list %s: read again (%d revoked)", self.path, len(self._revoked)
            )

    def _catch_up(self) -> None:
        """Under the lock: bring the list up to the files."""
        snap, jour = _ident(self.path), _ident(self.journal)
        if snap != self._snap_id or not _same_file(jour, self._journal_id):
            self._load()  # a fold (new snapshot), a new journal: read both whole
            return
        if jour is not None and jour[2] > self._offset:
            try:
                with open_regular(self.journal) as f:  # a FIFO: refused, not waited on
                    f.seek(self._offset)  # only what this process has not read
                    raw = f.read()
            except OSError as exc:
                raise self._error(f"{str(self.journal)!r}: cannot read: {exc.strerror}") from None
            self._replay(raw, first_line=self._lines + 1)
        self._journal_id = _ident(self.journal)

    def _load(self) -> None:
        """Read the snapshot and the journal whole (at start, after a fold)."""
        snap_id = _ident(self.path)
        snapshot = self._read(self.path)
        revoked = self._parse_snapshot(snapshot) if snapshot is not None else {}
        jour_id = _ident(self.journal)
        raw = self._read(self.journal) or b""
        self._revoked, self._folded = revoked, len(revoked)
        self._lines = self._offset = 0
        self._torn = False
        self._replay(raw)
        self._snap_id, self._journal_id = snap_id, jour_id

    @contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        """``flock`` of the lock file, shared by every process using ``path``
        (created 0600 beside it); held for a change or a re-read, never longer."""
        try:
            # O_NONBLOCK: a FIFO put at the lock's path would make a
            # read-only open wait for a writer, on the event loop.
            if how == fcntl.LOCK_SH:
                # A read creates nothing (``mipsec --check`` reads the list).
                fd = os.open(self.lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            else:
                fd = os.open(
                    self.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, PRIVATE_FILE
                )
        except FileNotFoundError:
            if how == fcntl.LOCK_SH:
                # No process ever changed the list under the lock: nothing to
                # wait for (a change starting now reads the files again under
                # its own lock first, so a half-appended line seen here is
                # read again whole).
                yield
                return
            raise
        except OSError as exc:
            if how != fcntl.LOCK_SH:
                raise  # a change: refused (the caller says why)
            if exc.errno in (errno.EACCES, errno.EROFS):
                # A list made read-only for this HAC: it can read, not change.
                yield
                return
            raise self._error(f"{str(self.lock)!r}: cannot open: {exc.strerror}") from None
        try:
            try:
                check_regular_fd(fd)
            except OSError as exc:
                raise self._error(f"{str(self.lock)!r}: {exc.strerror}") from None
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------ reading

    def _read(self, path: Path) -> bytes | None:
        try:
            # Read on the event loop (every lookup may re-read the list): a
            # FIFO put at the path is refused at once, not waited on.
            return read_regular(path, MAX_LIST_FILE)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(f"{str(path)!r}: cannot read: {exc.strerror}") from None

    def _error(self, reason: str) -> ConfigError:
        return ConfigError(self._config_file, "revocations.path", reason)

    def _parse_snapshot(self, raw: bytes) -> dict[str, str]:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError
            revoked = data["revoked"]
            # JSON object keys are strings; the values are checked in C.
            if not isinstance(revoked, dict) or not set(map(type, revoked.values())) <= {str}:
                raise ValueError
        except (ValueError, KeyError, RecursionError):  # RecursionError: nested too deep
            raise self._error(f"{str(self.path)!r} is not a revocation list") from None
        canonical: dict[str, str] = {}
        for k, v in revoked.items():
            key = nai_key(k)
            held = canonical.get(key)
            if held is None or v < held:  # spellings of one MN: the earliest
                canonical[key] = v
        return canonical

    def _replay(self, raw: bytes, first_line: int = 1) -> None:
        """Apply the journal's complete lines in ``raw`` (read from ``_offset``)."""
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the journal ends with its newline
        # A cut last line: an append cut by a crash (appends are made under
        # the exclusive lock, and this is read under a lock too), a change
        # never acknowledged.
        self._torn = bool(tail)
        for number, line in enumerate(lines, first_line):
            change = self._parse_line(line)
            if change is None:
                raise self._error(f"{str(self.journal)!r} line {number}: not a revocation change")
            op, mn_id, since = change
            if op == "add":
                self._revoked.setdefault(mn_id, since)
            else:
                self._revoked.pop(mn_id, None)
        self._lines += len(lines)
        self._offset += len(raw) - len(tail)

    @staticmethod
    def _parse_line(line: bytes) -> tuple[str, str, str] | None:
        try:
            obj: Any = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        if set(obj) == {"add", "since"} and isinstance(obj["add"], str):
            if isinstance(obj["since"], str):
                return "add", nai_key(obj["add"]), obj["since"]
        if set(obj) == {"remove"} and isinstance(obj["remove"], str):
            return "remove", nai_key(obj["remove"]), ""
        return None

    # ------------------------------------------------------------ writing

    def _change(self, change: dict[str, str]) -> None:
        """Persist one change: appended to the journal, and, when the journal
        is due for a fold (or ends torn), a new snapshot holding it too.

        Appended first in either case, so the journal always ends with the
        change: a journal that outlives its fold (an unlink that failed, or
        one a power loss undid) replays onto the new snapshot to the same
        list.  Written into the snapshot alone, the change was undone by the
        older lines of such a journal -- an acknowledged revoke lost (found
        in review)."""
        fold = self._torn or self._lines >= max(COMPACT_MIN, self._folded)
        line = json.dumps(change, ensure_ascii=False, sort_keys=True).encode() + b"\n"
        self._append(line, cut_torn=self._torn)
        if not fold:
            return
        revoked = dict(self._revoked)
        if "add" in change:
            revoked[change["add"]] = change["since"]
        else:
            revoked.pop(change["remove"], None)
        self._fold(revoked)

    def _append(self, line: bytes, *, cut_torn: bool) -> None:
        """``line`` at the journal's end, fsynced (``cut_torn``: a torn tail
        cut off first, so the line follows the last whole change)."""
        created = not self.journal.exists()
        fd = os.open(
            self.journal,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
            PRIVATE_FILE,
        )
        try:
            check_regular_fd(fd)  # a FIFO: never waited on
            if self._lines == 0:
                os.fchmod(fd, PRIVATE_FILE)  # independent of the process umask
            if cut_torn:
                os.ftruncate(fd, self._offset)  # raises: the change is refused
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                # A full disk: the change is refused, so no part of its line
                # may stay (a restart would apply it, or find a cut line in
                # the middle of the journal).  Cut back; failing that, the
                # next change folds the journal away.
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    self._torn = True
                raise
        finally:
            os.close(fd)
        if created:
            sync_dir(self.journal.parent)  # the new journal's name survives a power loss
        self._torn = False
        self._lines += 1
        self._offset = size + len(line)
        self._journal_id = _ident(self.journal)  # our own append: nothing to re-read

    def _remove_dead_temporaries(self) -> None:
        """Under the exclusive lock: the temporary snapshots of folds killed
        before their rename.  Only a fold writes one, and folds hold this
        lock, so none belongs to a live one; without this, every crash
        mid-fold would leave one for good."""
        for tmp in left_temporaries(self.path):
            try:
                tmp.unlink()
            except OSError:
                continue
            log.info(
                "revocation list %s: removed %s, left by a fold cut short", self.path, tmp.name
            )

    def _fold(self, revoked: dict[str, str]) -> None:
        """A new snapshot holding ``revoked``, then an empty journal."""
        data = json.dumps({"version": VERSION, "revoked": revoked}, indent=1, sort_keys=True)
        self._remove_dead_temporaries()
        write_file(self.path, data.encode() + b"\n", PRIVATE_FILE, sync=True)
        self._folded = len(revoked)
        self._snap_id = _ident(self.path)
        # Only now: a crash before this line replays changes the snapshot
        # already holds (the same list).
        try:
            os.unlink(self.journal)
        except FileNotFoundError:
            pass
        except OSError:
            # The change is durable in the snapshot, and the journal ends with
            # it (``_change``): its lines replay to the same list, and the
            # next change folds again.
            return
        with contextlib.suppress(OSError):
            sync_dir(self.journal.parent)  # the unlink survives a power loss
        self._lines = self._offset = 0
        self._torn = False
        self._journal_id = None
