"""The HAC's list of revoked MNs (``mipsec revoke`` / ``unrevoke``), kept in a file.

A small JSON object ``{"version": 1, "revoked": {mn_id: since}}``, replaced
atomically (temporary file + rename, mode 0600) on every change, so a crash
leaves either the old list or the new one, never half of either; it is read
once at start.  A file that cannot be read is an error at start (fail
closed: a HAC that forgot its revocations would let revoked MNs back in).

Identities are kept and looked up under their canonical form
(:func:`mipsec.core.nai.nai_key`: the realm is case-insensitive), so a revoked
MN does not come back by changing the case of its realm; a file written
before that is read the same way.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from mipsec.core.errors import ConfigError
from mipsec.core.fsutil import PRIVATE_FILE, write_file
from mipsec.core.nai import nai_key

VERSION = 1


class RevocationList:
    def __init__(self, path: Path, *, config_file: str = "<memory>") -> None:
        self.path = path
        self._revoked: dict[str, str] = {}
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(config_file, "revocations.path", f"cannot read: {exc.strerror}")
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError
            revoked = data["revoked"]
            if not isinstance(revoked, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in revoked.items()
            ):
                raise ValueError
        except (ValueError, KeyError):
            raise ConfigError(
                config_file, "revocations.path", f"{str(path)!r} is not a revocation list"
            ) from None
        canonical: dict[str, str] = {}
        for k, v in sorted(revoked.items(), key=lambda kv: kv[1]):
            canonical.setdefault(nai_key(k), v)  # spellings of one MN: the earliest
        self._revoked = canonical

    def __contains__(self, mn_id: object) -> bool:
        return isinstance(mn_id, str) and nai_key(mn_id) in self._revoked

    def __len__(self) -> int:
        return len(self._revoked)

    def items(self) -> dict[str, str]:
        return dict(self._revoked)

    def add(self, mn_id: str) -> bool:
        """Revoke ``mn_id`` (persisted before this returns); False if it already was."""
        mn_id = nai_key(mn_id)
        if mn_id in self._revoked:
            return False
        since = datetime.now(UTC).replace(microsecond=0).isoformat()
        self._save({**self._revoked, mn_id: since})
        return True

    def remove(self, mn_id: str) -> bool:
        mn_id = nai_key(mn_id)
        if mn_id not in self._revoked:
            return False
        self._save({k: v for k, v in self._revoked.items() if k != mn_id})
        return True

    def _save(self, revoked: dict[str, str]) -> None:
        data = json.dumps({"version": VERSION, "revoked": revoked}, indent=1, sort_keys=True)
        write_file(self.path, data.encode() + b"\n", PRIVATE_FILE)  # raises: nothing changed
        self._revoked = revoked
