"""Event hooks -> one ``key=value`` line each on the ``mipsec.events`` logger.

Example: ``event=sa_issued spi=4660 mn_id=alice@home.example
suite=AES_128_CBC_SHA256 scope=1 ha=ha1 validity_end=2025-01-01T00:00:00Z
peer=[2001:db8::5]:4433``.

The hooks never receive key material (core/hookspecs.py), so none can be
logged.  ``mn_id`` and ``peer`` come from the network: a value with spaces,
quotes, ``=`` or control characters is written as a JSON string, so a
crafted identity cannot forge a second field or line.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

from mipsec.core.hookspecs import hookimpl

log = logging.getLogger("mipsec.events")

# Printable ASCII without space, '"', '=' or '\\': written as it is.  One C
# call; other values take the general rule in _value().
_PLAIN_RE = re.compile(r"[!#-<>-\[\]-~]+")


def _value(v: object) -> str:
    if type(v) is str and _PLAIN_RE.fullmatch(v) is not None:
        return v
    if type(v) is int:
        return str(v)  # digits and maybe '-': always plain
    if isinstance(v, datetime):
        if v.tzinfo is not None:
            v = v.astimezone(UTC)
            return v.replace(tzinfo=None).isoformat() + "Z"
        return v.isoformat()
    s = str(v)
    if s and s.isprintable() and not any(c in s for c in ' ="\\'):
        return s
    return json.dumps(s)  # ensure_ascii: escapes every control and non-ASCII character


def _emit(level: int, event: str, **fields: object) -> None:
    if log.isEnabledFor(level):
        # Lazy %-formatting: the line is joined only if a handler formats it.
        if fields:
            log.log(level, "event=%s %s", event, _Fields(fields))
        else:
            log.log(level, "event=%s", event)


class _Fields:
    """``k=v k=v ...`` of one event, built when the log record is formatted."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, object]) -> None:
        self._fields = fields

    def __str__(self) -> str:
        return " ".join([f"{k}={_value(v)}" for k, v in self._fields.items()])


@hookimpl
def mipsec_mn_authenticated(mn_id: str, method: str, peer: str) -> None:
    # DEBUG: a successful bootstrap is one INFO line (sa_issued), not two.
    _emit(logging.DEBUG, "mn_authenticated", mn_id=mn_id, method=method, peer=peer)


@hookimpl
def mipsec_auth_failed(mn_id: str, method: str, status: int | None, peer: str, reason: str) -> None:
    _emit(
        logging.WARNING,
        "auth_failed",
        mn_id=mn_id,
        peer=peer,
        method=method,
        status="-" if status is None else status,
        reason=reason,
    )


@hookimpl
def mipsec_provisioning_failed(
    mn_id: str, ha_id: str, spi: int | None, status: int, reason: str, peer: str
) -> None:
    _emit(
        logging.WARNING,
        "provisioning_failed",
        mn_id=mn_id,
        peer=peer,
        ha=ha_id,
        spi="-" if spi is None else spi,
        status=status or "-",
        reason=reason,
    )


@hookimpl
def mipsec_sa_issued(
    spi: int,
    mn_id: str,
    suite: str,
    scope: int,
    validity_end: datetime,
    ha_id: str,
    peer: str,
) -> None:
    _emit(
        logging.INFO,
        "sa_issued",
        spi=spi,
        mn_id=mn_id,
        suite=suite,
        scope=scope,
        ha=ha_id,
        validity_end=validity_end,
        peer=peer,
    )


@hookimpl
def mipsec_sa_expired(spi: int, mn_id: str, validity_end: datetime) -> None:
    _emit(logging.INFO, "sa_expired", spi=spi, mn_id=mn_id, validity_end=validity_end)


@hookimpl
def mipsec_sa_withdrawn(spi: int, mn_id: str, ha_id: str, reason: str) -> None:
    # A superseded SA is the normal end of every re-bootstrap: DEBUG, so a
    # successful bootstrap stays one INFO line (issue 9); revoked and every
    # other reason are what an operator looks for: INFO.
    level = logging.DEBUG if reason == "superseded" else logging.INFO
    _emit(level, "sa_withdrawn", spi=spi, mn_id=mn_id, ha=ha_id, reason=reason)
