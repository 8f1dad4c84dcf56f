"""Run ``mipsec`` and look at its ports at the instant it announces STOPPING=1.

    MIPSEC_STOP_PROBE=HOST:PORT python stopprobe.py ARGS...

A supervisor (systemd, a load balancer's health check, a test) that acts on
STOPPING=1 or on the "stopping" log line must find the role's listener
closed already: a connection accepted after that is cut by the stop.  The
window between the two is a few instructions wide, so a test from outside
hits it only on a loaded machine (it did, once, for the HAC).  This wrapper
makes the instant exact: ``mipsec.core.sdnotify.stopping`` is replaced by one
that first tries a TCP connection to ``HOST:PORT`` and prints
``stop-probe: refused`` or ``stop-probe: accepted``, then runs
``mipsec.core.cli.main`` with ``ARGS``.  The role is otherwise the real one.

With ``MIPSEC_TERM_AFTER_START=1`` as well, the role sends itself SIGTERM the
instant its service's ``start()`` returns (its port open, "listening"
logged): what a supervisor does that stops a unit it just saw start.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any


def arm(host: str, port: int) -> None:
    from mipsec.core import sdnotify

    original = sdnotify.stopping

    def stopping() -> bool:
        try:
            socket.create_connection((host, port), timeout=2).close()
            verdict = "accepted"
        except OSError:
            verdict = "refused"
        print(f"stop-probe: {verdict}", flush=True)
        return original()

    sdnotify.stopping = stopping  # type: ignore[assignment]


def term_after_start() -> None:
    from mipsec.core.roles.ha import HaService
    from mipsec.core.roles.hac import HacService

    for cls in (HacService, HaService):
        original = cls.start

        async def start(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            result = await _original(self, *args, **kwargs)
            print("stop-probe: SIGTERM after start", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return result

        cls.start = start  # type: ignore[method-assign]


def main() -> int:
    host, _, port = os.environ["MIPSEC_STOP_PROBE"].rpartition(":")
    arm(host, int(port))
    if os.environ.get("MIPSEC_TERM_AFTER_START") == "1":
        term_after_start()
    from mipsec.core.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
