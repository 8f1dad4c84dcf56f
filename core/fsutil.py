"""Small filesystem helpers: files created with an explicit mode, whatever the umask."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

PRIVATE_FILE = 0o600  # secrets: keys, credentials, stores
PRIVATE_DIR = 0o700  # directories created to hold secrets
PUBLIC_FILE = 0o644  # certificates, configuration without secrets


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (it will hold keys)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, PRIVATE_FILE)  # independent of the process umask
    finally:
        os.close(fd)


_TMP_HEX = 6  # random octets in a temporary name: ``.NAME.HEX.tmp``


def _temporary(path: Path) -> Path:
    """A new temporary name beside ``path`` (``write_file``, ``write_private_atomic``)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(_TMP_HEX)}.tmp")


def left_temporaries(path: Path) -> list[Path]:
    """The temporary files of ``path`` in its directory: those of writes
    cut short by a crash, unless a write of ``path`` is going on (the caller
    knows none is, e.g. under the lock every writer holds).  [] when the
    directory cannot be listed."""
    prefix, suffix = f".{path.name}.", ".tmp"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    hexdigits = set("0123456789abcdef")
    return [
        path.parent / name
        for name in names
        if name.startswith(prefix)
        and name.endswith(suffix)
        and len(middle := name[len(prefix) : -len(suffix)]) == 2 * _TMP_HEX
        and set(middle) <= hexdigits
    ]


def _write_new(path: Path, data: bytes, mode: int, *, sync: bool) -> None:
    # O_EXCL: never follow or reuse a file someone else put there.  fchmod
    # before the first octet: the mode never depends on the umask, not even
    # for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def write_file(path: Path, data: bytes, mode: int, *, sync: bool = False) -> None:
    """Write ``path`` (new or replaced) with exactly ``mode``, whatever the umask.

    The octets go to a temporary file in the same directory first, which is
    then renamed over ``path``: nobody ever sees a half-written file, and a
    replaced file's old mode (or an open descriptor on it) gains nothing.
    ``sync``: the octets and the rename are on disk before this returns
    (fsync of the file, then of its directory).
    """
    tmp = _temporary(path)
    _write_new(tmp, data, mode, sync=sync)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    """fsync a directory: the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_atomic(path: Path, data: bytes) -> None:
    """Publish ``data`` at ``path`` (mode 0600) all at once, or raise ``FileExistsError``.

    The octets go to a temporary file first (fsynced), which is then
    hard-linked to ``path``: a concurrent reader sees either no file or the
    whole file, never a half-written key, and an existing ``path`` is never
    replaced.
    """
    tmp = _temporary(path)
    _write_new(tmp, data, PRIVATE_FILE, sync=True)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def make_dir(path: Path, mode: int) -> bool:
    """Create directory ``path`` (and missing parents) with exactly ``mode``.

    Returns False, changing nothing, when it already exists: the operator's
    own directory keeps the mode they gave it.
    """
    if path.is_dir():
        return False
    path.mkdir(parents=True, mode=mode)
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    return True
