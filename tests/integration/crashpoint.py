"""Run ``mipsec`` with a crash point: SIGKILL at the Nth call of one function.

    python crashpoint.py MODULE:QUALNAME N[+] -- ARGS...

Issue 6's faults are kills "at the worst instant"; a kill from outside hits
an instant by luck.  This wrapper replaces ``QUALNAME`` in ``MODULE`` (a
function or a method, async ones included: the kill comes at the call, before
the body runs) with one that kills the process with SIGKILL -- no cleanup, no
``finally``, no flush -- at its Nth call, then runs ``mipsec.core.cli.main``
with ``ARGS``.  ``N+`` kills right after the Nth call returns instead (for a
plain function: its effects are done, whatever its caller does next is not).
The role is otherwise the real one, on real sockets and files.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any


def arm(target: str, nth: int, after: bool = False) -> None:
    module_name, _, qualname = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for name in path:
        owner = getattr(owner, name)
    original = getattr(owner, attr)
    calls = 0

    def crash(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls >= nth and not after:
            print(f"crashpoint: SIGKILL at call {calls} of {target}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls >= nth:
            print(f"crashpoint: SIGKILL after call {calls} of {target}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, attr, crash)


def main() -> int:
    target, nth, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: crashpoint.py MODULE:QUALNAME N[+] -- ARGS..."
    arm(target, int(nth.rstrip("+")), after=nth.endswith("+"))
    from mipsec.core.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
