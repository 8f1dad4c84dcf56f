"""Which certificates a role presents, and until when they are valid.

A role presents several certificates, each from its own file: the HAC its
MHAuth certificate (``hac.cert``), the EAP-TLS server certificate, its
client certificate towards each HA, its pull listener's; the HA its
provisioning listener's.  An operator renews them in place and reloads
(README "Reload"); this module tells which one is due.

Objects that load a certificate may offer ``certificates() -> Mapping[str,
datetime]``: the leaf's notAfter (aware, UTC) by a name relative to their
own configuration table (``"cert"``, or ``"tls.cert"`` for the EAP
method's ``tls`` entry).  Containers pass the question on and prefix the
names, so that the role reports each under its configuration key
(``methods.eap.tls.cert``, ``ha[0].options.cert``): the file to renew.
Optional, like ``stale()`` (core/reload.py): an object without it presents
no certificate.

The role logs each certificate that has expired or expires within
``WARN_DAYS`` at start and at each reload (one line each), shows them in
``mipsec status`` and exports ``mipsec_certificate_not_after_seconds``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

__all__ = ["WARN_DAYS", "certificates", "prefixed", "report", "status_rows"]

# Left to run before a certificate's notAfter at which start and reload warn.
WARN_DAYS = 14


def certificates(obj: object) -> dict[str, datetime]:
    """``obj.certificates()`` when it offers it, else nothing."""
    get = getattr(obj, "certificates", None)
    if not callable(get):
        return {}
    return dict(get())


def prefixed(prefix: str, found: Mapping[str, datetime]) -> dict[str, datetime]:
    return {f"{prefix}{name}": end for name, end in found.items()}


def merged(parts: Iterable[Mapping[str, datetime]]) -> dict[str, datetime]:
    out: dict[str, datetime] = {}
    for part in parts:
        out.update(part)
    return out


def report(log: logging.Logger, role: str, found: Mapping[str, datetime], now: datetime) -> None:
    """One line per certificate that has expired (ERROR) or expires within
    ``WARN_DAYS`` (WARNING); nothing for the others."""
    for key, end in sorted(found.items()):
        left = end - now
        if left <= timedelta(0):
            log.error("%s certificate %s expired at %s", role, key, end.isoformat())
        elif left <= timedelta(days=WARN_DAYS):
            log.warning(
                "%s certificate %s expires at %s (in %d days): renew it in place and reload",
                role,
                key,
                end.isoformat(),
                left.days,
            )


def status_rows(found: Mapping[str, datetime], now: datetime) -> dict[str, dict[str, object]]:
    """``mipsec status``: per configuration key, notAfter and whole days left."""
    return {
        key: {"not_after": end.isoformat(), "days_left": (end - now).days}
        for key, end in sorted(found.items())
    }
