"""systemd's notify protocol (sd_notify(3)), written to ``$NOTIFY_SOCKET`` directly.

A role started by a ``Type=notify`` unit (conf/systemd/) says ``READY=1`` once
it serves, ``RELOADING=1`` then ``READY=1`` around a reload, ``STOPPING=1``
when it begins to stop.  Outside systemd (no ``NOTIFY_SOCKET``) every call is
a no-op.  No dependency: one datagram on an ``AF_UNIX`` socket; a name that
starts with ``@`` is in the abstract namespace (leading NUL).  A failure to
notify is logged at DEBUG and never stops the role: systemd times the unit
out on its own if READY never arrives.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["notify", "ready", "reloading", "stopping"]

log = logging.getLogger("mipsec.sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines); True when a datagram was sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(1.0)
            s.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", path, exc.strerror or exc)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    # MONOTONIC_USEC: what Type=notify-reload units (systemd 253+) require.
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")
