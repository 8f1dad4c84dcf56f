"""Credential backend ``toml``: MN pre-shared keys in a TOML file.

File format (one table per MN)::

    [[mn]]
    mn_id = "alice@home.example"
    psk_hex = "00112233..."        # the key as hexadecimal, or
    # psk = "a passphrase"          # the key as UTF-8 text -- exactly one of the two

A passphrase (``psk``) shorter than ``MIN_PASSPHRASE`` characters is refused
unless the backend option ``allow_short_passphrase = true`` is set: in RFC
6618's PSK exchange the HAC's first response is already keyed with the PSK
over values anyone sees (the MN's own mn-rand, the hac-rand, the channel
binding), so anyone who asks for an Init can test passphrase guesses
offline, as fast as they can compute HMACs.  Only entropy defends it.

The file holds secrets: it is refused at start when group or others may
access it (core/secretfiles.py).

Identities are NAIs (RFC 7542): the username part is opaque to everyone but
its home domain (§2.4), so it is compared case-sensitively; an ASCII realm
is compared case-insensitively, the practice §3 allows.  Both sides are put
in Unicode NFC first (§2.1).

The file is re-read when its modification time, size or inode changes, so
operators add users without a restart.  A file that breaks after start is
logged and the last good contents stay in force (an editor's half-written
save must not lock every MN out).  A file of more than ``INLINE_RELOAD_MAX``
octets is re-read in a worker thread when an event loop is running (parsing
100,000 entries takes over a second: the HAC must keep serving meanwhile);
the last contents stay in force until the new ones are parsed.  Past some
ten thousand MNs the ``sqlite`` backend (plugins/cred_sqlite.py) is the
better choice: it looks up one row per bootstrap and never re-reads a file.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from mipsec.core.filedigest import read_regular
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.nai import nai_key  # re-exported: the lookup key (was defined here)
from mipsec.core.secretfiles import check_private
from mipsec.core.tomltext import TomlTextError, parse_toml
from mipsec.plugins._options import error_text, parse_options, resolve_path

log = logging.getLogger("mipsec.plugins.cred_toml")

_UNREADABLE = (-1, -1, -1)  # stamp remembered while the file cannot be stat()ed

# Above this size a reload is parsed off the event loop (module docstring);
# below it (~500 entries) parsing inline costs a few milliseconds at most.
INLINE_RELOAD_MAX = 64 * 1024
# A file larger than this is refused (~2.5 million entries; README points
# past 10,000 MNs to the SQLite backend): it is read whole into memory.
MAX_CREDENTIAL_FILE = 256 << 20

# Characters a passphrase needs unless the operator opts out: a passphrase
# faces offline guessing (module docstring), so it must carry entropy.
MIN_PASSPHRASE = 20


def short_passphrase(passphrase: str, mn_id: str) -> str | None:
    """Why ``passphrase`` is too short to use, or None (the message has no secret)."""
    if len(passphrase) >= MIN_PASSPHRASE:
        return None
    return (
        f"passphrase for {mn_id!r} has {len(passphrase)} characters, fewer than "
        f"{MIN_PASSPHRASE}: RFC 6618's PSK exchange lets anyone who asks for an Init "
        "test guesses offline; use psk_hex with 32 random octets, or set "
        "allow_short_passphrase = true in [credentials]"
    )


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mn_id: str = Field(min_length=1)
    psk_hex: str | None = None
    psk: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> _Entry:
        if (self.psk_hex is None) == (self.psk is None):
            raise ValueError("exactly one of psk_hex and psk is required")
        return self

    def key(self) -> bytes:
        if self.psk is not None:
            return self.psk.encode("utf-8")
        assert self.psk_hex is not None
        return bytes.fromhex(self.psk_hex)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mn: list[dict[str, Any]] = Field(default_factory=list)


def load_credentials(path: Path, *, allow_short_passphrase: bool = False) -> dict[str, bytes]:
    """Parse a credential file into ``nai_key(mn_id) -> psk``.

    Raises ``ValueError`` naming the file, the entry index and the key
    (``creds.toml: mn[2].psk_hex: not valid hexadecimal``); never the key value.
    """
    try:
        # Not a blocking open: a FIFO put at the path would stop the event
        # loop a small file is re-read on (core/filedigest.py).
        data = read_regular(path, MAX_CREDENTIAL_FILE)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = parse_toml(data)
    except TomlTextError as exc:
        raise ValueError(f"{path}: {exc.reason}") from None
    try:
        top = _File.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(f"{path}: {error_text(exc)}") from None
    table: dict[str, bytes] = {}
    first_index: dict[str, int] = {}
    for i, raw in enumerate(top.mn):
        where = f"{path}: mn[{i}]"
        try:
            entry = _Entry.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"{path}: {error_text(exc, f'mn[{i}]')}") from None
        try:
            key = entry.key()
        except ValueError:
            raise ValueError(f"{where}.psk_hex: not valid hexadecimal") from None
        if not key:
            name = "psk" if entry.psk is not None else "psk_hex"
            raise ValueError(f"{where}.{name}: empty key")
        if entry.psk is not None and not allow_short_passphrase:
            short = short_passphrase(entry.psk, entry.mn_id)
            if short is not None:
                raise ValueError(f"{where}.psk: {short}")
        k = nai_key(entry.mn_id)
        if k in first_index:
            raise ValueError(f"{where}.mn_id: duplicate of mn[{first_index[k]}]")
        first_index[k] = i
        table[k] = key
    return table


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TomlCredentials:
    """``CredentialBackend`` over a TOML file, reloaded when the file changes."""

    def __init__(self, path: Path, *, allow_short_passphrase: bool = False) -> None:
        self.path = path
        self.allow_short_passphrase = allow_short_passphrase
        self._stamp = _stamp(path)
        self._table = load_credentials(path, allow_short_passphrase=allow_short_passphrase)
        self._bad_stamp: tuple[int, int, int] | None = None
        self._pending: asyncio.Future[dict[str, bytes]] | None = None  # a reload in a thread
        self._closed = False

    def __repr__(self) -> str:
        return f"TomlCredentials(path={str(self.path)!r}, entries={len(self._table)})"

    def _refresh(self) -> None:
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            if self._bad_stamp != _UNREADABLE:
                log.error(
                    "credential file %s unreadable, keeping last contents: %s", self.path, exc
                )
                self._bad_stamp = _UNREADABLE
            return
        if stamp == self._stamp or stamp == self._bad_stamp or self._pending is not None:
            return
        try:
            # A new version open to group or others (``mv new.toml creds.toml``
            # of a file made 0644) is refused as at start; before the
            # twenty-seventh session it was loaded with an INFO line (found
            # in review; the SQLite backend refused the same replacement).
            check_private(self.path)
        except ValueError as exc:
            self._failed(stamp, exc)
            return
        loop = _running_loop()
        if loop is not None and stamp[1] > INLINE_RELOAD_MAX:
            # Parsed in a worker thread; the last contents answer meanwhile.
            fut = loop.run_in_executor(
                None,
                functools.partial(
                    load_credentials, self.path, allow_short_passphrase=self.allow_short_passphrase
                ),
            )
            self._pending = fut
            fut.add_done_callback(functools.partial(self._reloaded, stamp))
            return
        try:
            table = load_credentials(self.path, allow_short_passphrase=self.allow_short_passphrase)
        except ValueError as exc:
            self._failed(stamp, exc)
            return
        self._apply(stamp, table)

    def _reloaded(self, stamp: tuple[int, int, int], fut: asyncio.Future[dict[str, bytes]]) -> None:
        self._pending = None
        if fut.cancelled() or self._closed:
            return  # the loop is shutting down (the next lookup tries again), or closed
        exc = fut.exception()
        if isinstance(exc, ValueError):
            self._failed(stamp, exc)
        elif exc is not None:
            log.error(
                "credential file %s not reloaded, keeping last contents: %s",
                self.path,
                type(exc).__name__,
            )
            self._bad_stamp = stamp
        else:
            self._apply(stamp, fut.result())

    def _failed(self, stamp: tuple[int, int, int], exc: ValueError) -> None:
        # Log once per broken version of the file; the message never holds a key.
        log.error("credential file not reloaded, keeping last contents: %s", exc)
        self._bad_stamp = stamp

    def _apply(self, stamp: tuple[int, int, int], table: dict[str, bytes]) -> None:
        self._table, self._stamp, self._bad_stamp = table, stamp, None
        log.info("credential file %s reloaded: %d entries", self.path, len(table))

    def get_psk(self, mn_id: str) -> bytes | None:
        self._refresh()
        return self._table.get(nai_key(mn_id))

    def close(self) -> None:
        self._closed = True
        self._table = {}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(min_length=1)
    allow_short_passphrase: StrictBool = False  # an opt-out: TOML true only


class TomlCredentialsFactory:
    name = "toml"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> TomlCredentials:
        opts = parse_options(_Options, options)
        path = resolve_path(opts.path, ctx.base_dir)
        try:
            check_private(path)
            return TomlCredentials(path, allow_short_passphrase=opts.allow_short_passphrase)
        except OSError as exc:
            raise ValueError(f"path: cannot read {str(path)!r}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"path: {exc}") from None


@hookimpl
def mipsec_credential_backends() -> list[TomlCredentialsFactory]:
    return [TomlCredentialsFactory()]
