"""What a set of files held when something was built from them.

A reload (core/reload.py) must notice a certificate, key or CA file written
anew under the same path -- a renewed certificate -- although the
configuration naming it did not change.  ``FileDigests`` keeps one SHA-256
over the files' contents, taken *before* the object is built from them: a
file replaced between the digest and the build leaves the object newer than
the digest, so the next reload builds it once more (harmless), never the
other way round (a renewal missed).  Only the digest is kept, never a key's
contents, and it is compared in constant time.

Reads refuse anything but a regular file (a FIFO would block the event
loop the reload runs on) and files above ``MAX_FILE`` octets.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "MAX_FILE",
    "FileDigests",
    "UnreadableFileError",
    "check_regular_fd",
    "open_regular",
    "read_regular",
    "regular_path",
]

StrPath = str | os.PathLike[str]

# Far above any certificate chain, key or CA bundle a role is given.
MAX_FILE = 1 << 20


def check_regular_fd(fd: int) -> None:
    """``OSError`` (``strerror`` "not a regular file") unless ``fd`` is a
    regular file: for a file opened ``O_NONBLOCK`` by its own flags (a lock,
    an append) that must not be a FIFO."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise OSError(errno.EINVAL, "not a regular file")


def open_regular(path: StrPath) -> BinaryIO:
    """``path`` opened for reading; ``OSError`` (``strerror`` "not a regular
    file") for a FIFO, device, socket or directory.

    Opened non-blocking, so a FIFO is refused instead of waiting for a
    writer (O_NONBLOCK changes nothing for a regular file's reads)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        check_regular_fd(fd)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def regular_path(path: StrPath) -> Iterator[str]:
    """A path to hand a library that opens the file itself (OpenSSL's
    ``load_cert_chain``, ``load_verify_locations``), valid inside the block;
    ``OSError`` as :func:`open_regular` when ``path`` is not a regular file.

    The file is opened and checked here (non-blocking, ``fstat``), and the
    library gets ``/proc/self/fd/N``, which opens that same file whatever
    happens at ``path`` meanwhile: a check by name, then an open by name,
    left a window in which a FIFO swapped in made OpenSSL's open wait for a
    writer -- on the event loop, at a reload.  Without ``/proc``: ``path``
    itself, checked the same way (the window is back)."""
    with open_regular(path) as f:
        proc = f"/proc/self/fd/{f.fileno()}"
        yield proc if os.path.exists(proc) else os.fspath(path)


def read_regular(path: StrPath, limit: int = MAX_FILE) -> bytes:
    """``path``'s contents; ``OSError`` naming the reason (its ``strerror``)
    for a file that is not a regular file (FIFO, device, directory) or is
    larger than ``limit``: see :func:`open_regular`."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} octets")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} octets")
    return data


class UnreadableFileError(ValueError):
    """A file named by ``key`` cannot be read: ``"key: path: reason"``, the
    form a plugin's option errors take (the caller adds the config file)."""

    def __init__(self, key: str, path: Path, reason: str) -> None:
        super().__init__(f"{key}: {path}: cannot read ({reason})")
        self.key = key
        self.path = path


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _digest(entries: tuple[tuple[str, Path], ...]) -> bytes:
    h = hashlib.sha256()
    for key, p in entries:
        try:
            data = read_regular(p)
        except OSError as exc:
            raise UnreadableFileError(key, p, _reason(exc)) from None
        # Length-prefixed: moving octets from one file to the next changes it.
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.digest()


class FileDigests:
    """One digest of the contents of ``entries`` (config key, path), taken
    now; ``changed()`` later.

    Raises ``UnreadableFileError`` naming the key if a file cannot be read
    now: the caller was about to build from it."""

    __slots__ = ("_digest", "entries")

    def __init__(self, entries: Iterable[tuple[str, Path]]) -> None:
        self.entries = tuple(entries)
        self._digest = _digest(self.entries)

    def __repr__(self) -> str:
        return f"FileDigests({[str(p) for _, p in self.entries]!r})"

    def changed(self) -> bool:
        """Whether any file now holds something else, or cannot be read
        (then a rebuild names the file and why)."""
        try:
            now = _digest(self.entries)
        except UnreadableFileError:
            return True
        return not hmac.compare_digest(now, self._digest)
