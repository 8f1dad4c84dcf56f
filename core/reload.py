"""Reloading a role's configuration (SIGHUP or ``mipsec reload``): the shared part.

Each role says which top-level keys it can apply live and how
(``roles/hac_ops.py``, ``roles/ha_ops.py``); this module compares the
running configuration with the new one, names every key whose change needs
a restart, serialises reloads, and logs one line when a reload starts and
one with its result.  A refused reload changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from mipsec.core.errors import ConfigError, PluginError

log = logging.getLogger("mipsec.reload")


def _leaves(a: Any, b: Any, prefix: str) -> list[str]:
    """Dotted keys under which ``a`` and ``b`` (model dumps) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            out += _leaves(a.get(k), b.get(k), key)
        return out
    return [] if a == b else [prefix]


def restart_keys(
    old: BaseModel,
    new: BaseModel,
    live: frozenset[str],
    live_leaves: frozenset[str] = frozenset(),
) -> tuple[list[str], list[str]]:
    """(keys that changed, dotted keys whose change needs a restart).

    ``live``: top-level keys a reload applies; ``live_leaves``: dotted keys
    it applies inside a table that otherwise needs a restart (the HAC's
    ``hac.cert``).  A changed top-level key in ``live`` is named as such; a
    changed live leaf by its dotted name."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    changed: list[str] = []
    restart: list[str] = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k):
            continue
        if k in live:
            changed.append(k)
            continue
        for leaf in _leaves(a.get(k), b.get(k), k):
            (changed if leaf in live_leaves else restart).append(leaf)
    return changed, restart


def stale(obj: object) -> bool:
    """Whether a plugin object says a file it was built from changed.

    Optional for plugins (a method factory, an EAP back end): ``stale()``
    returns True when something read at build time -- a RADIUS shared
    secret in a ``secret_file`` -- is no longer what the file holds, so that
    a reload builds the object again even though its options did not
    change.  Objects without it are never stale.
    """
    check = getattr(obj, "stale", None)
    return bool(check()) if callable(check) else False


def set_log_level(cfg: Any) -> None:
    """Apply the new ``log_level``, ``log_format`` and ``log_levels`` (all live)."""
    from mipsec.core.logsetup import configure_from

    configure_from(cfg)


class ReloadRunner:
    """One reload at a time; ``apply`` validates and swaps, or raises ``ConfigError``."""

    def __init__(self, role: str, config_file: str, apply: Callable[[], list[str]]) -> None:
        self.role = role
        self.config_file = config_file
        self.apply = apply
        self.last: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def run(self, source: str) -> dict[str, Any]:
        async with self._lock:
            from mipsec.core import sdnotify

            sdnotify.reloading()
            try:
                return await self._run(source)
            finally:
                sdnotify.ready()

    async def _run(self, source: str) -> dict[str, Any]:
        log.info("%s reload of %s requested (%s)", self.role, self.config_file, source)
        at = datetime.now(UTC).replace(microsecond=0).isoformat()
        try:
            changed = self.apply()
        except (ConfigError, PluginError) as exc:
            # One line: file, key, reason; the running configuration stays.
            log.error("%s reload refused, running configuration kept: %s", self.role, exc)
            self.last = {"at": at, "applied": False, "error": str(exc)}
            return dict(self.last)
        except Exception as exc:  # a plugin bug while building: refuse, keep running
            log.error(
                "%s reload refused, running configuration kept: %s: internal error: %s",
                self.role,
                self.config_file,
                type(exc).__name__,
            )
            self.last = {
                "at": at,
                "applied": False,
                "error": f"internal error: {type(exc).__name__}",
            }
            return dict(self.last)
        from mipsec.core.version import version

        log.info(
            "%s reload of %s applied: %s (mipsec %s)",
            self.role,
            self.config_file,
            ("changed " + ", ".join(changed)) if changed else "no change",
            version(),
        )
        self.last = {"at": at, "applied": True, "changed": changed}
        return dict(self.last)

    async def via_control(self) -> dict[str, Any]:
        """``mipsec reload``: the result, or ``ControlError`` when refused."""
        from mipsec.core.control import ControlError

        result = await self.run("control socket")
        if not result["applied"]:
            raise ControlError(f"reload refused: {result['error']}")
        return result

    def on_signal(self) -> None:
        """SIGHUP handler (``loop.add_signal_handler``): reload in the background."""
        task = asyncio.get_running_loop().create_task(self.run("SIGHUP"))
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[Any]] = set()
