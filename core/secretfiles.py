"""Secret files at rest: a role refuses to start with one that others can read or write.

A secret file is anything that gives away or forges an identity or an SA:
TLS private keys, the HAC's credential file or database, an MN's PSK file,
the SA stores and their key-wrapping key, the binding cache.  Like OpenSSH
with a private key, a role refuses to start when such a file grants group or
others any access, and says which file and the ``chmod`` that fixes it.  A
file that does not exist yet is fine: whoever creates it creates it 0600
(``mipsec.core.fsutil``).

The check is a ``stat`` at start, done where the file is loaded (config
validation in ``mipsec.core.roles.preflight``, each plugin's factory for the
files its options name); it is not repeated on every read.
"""

from __future__ import annotations

import os
import shlex
import stat

StrPath = str | os.PathLike[str]

_OPEN_BITS = stat.S_IRWXG | stat.S_IRWXO  # 0o077


class InsecureFileError(ValueError):
    """A secret file is readable or writable by group or others.

    A ``ValueError``, so a plugin factory may let it through and the loader
    names the option (core/hookspecs.py: factories raise ``ValueError``).
    """

    def __init__(self, path: StrPath, mode: int) -> None:
        self.path = os.fspath(path)
        self.mode = mode
        who = " and ".join(
            w for w, bits in (("group", stat.S_IRWXG), ("others", stat.S_IRWXO)) if mode & bits
        )
        super().__init__(
            f"{self.path}: secret file open to {who} (mode {mode:04o}); "
            f"fix: chmod 600 {shlex.quote(self.path)}"
        )


def check_private(path: StrPath) -> None:
    """Raise :class:`InsecureFileError` when ``path`` grants group/others any access.

    A missing file passes (it will be created 0600), and so does anything
    ``stat`` cannot look at: whoever opens it next reports that error.
    """
    try:
        st = os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & _OPEN_BITS:
        raise InsecureFileError(path, stat.S_IMODE(st.st_mode))


def check_private_option(path: StrPath, option: str) -> None:
    """:func:`check_private` for a plugin factory: the error names the option
    (``ValueError("key: /etc/... secret file open to others ...")``)."""
    try:
        check_private(path)
    except InsecureFileError as exc:
        raise ValueError(f"{option}: {exc}") from None


def check_private_sqlite(path: StrPath) -> None:
    """:func:`check_private` for an SQLite file and its ``-wal``/``-shm`` companions."""
    base = os.fspath(path)
    for p in (base, base + "-wal", base + "-shm"):
        check_private(p)
