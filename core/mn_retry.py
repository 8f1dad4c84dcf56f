"""When an MN tries again after a bootstrap or registration that failed.

Until the twenty-third session the MN daemon waited a fixed 10 s after any
failure and ignored ``retry-after``.  After a HAC outage every MN it serves
came back in the same 10-s beat, again and again, and an overloaded HAC
that asked for 30 s (503, PROFILE §6) got its MNs back after 10.

:func:`next_wait` is what an operator expects of a client of a shared
server: the wait doubles with each failure in a row from ``retry_min`` up
to ``retry_max``, each wait drawn from its upper half ("equal jitter") so
that MNs failing together spread out, and a 503's ``retry-after`` is
honoured -- plus up to ``retry_min`` more, so a crowd told the same date
does not return in the same second -- within ``retry_max`` all the same
(a wrong clock on either side must not park the MN for days).  A success
resets the count (the caller's job).  Sans-I/O: the caller passes the time
and the random draw.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

__all__ = ["next_wait"]


def next_wait(
    failures: int,
    *,
    retry_min: float,
    retry_max: float,
    retry_after: datetime | None = None,
    now: datetime | None = None,
    uniform: Callable[[float, float], float],
) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 or more).

    ``retry_after``/``now``: the 503's date and the MN's clock (aware
    datetimes); ``uniform(a, b)``: a draw in ``[a, b]`` (``random.uniform``).
    """
    if failures < 1:
        raise ValueError(f"failures: {failures} (the first failure is 1)")
    backoff = min(retry_max, retry_min * 2.0 ** min(failures - 1, 62))
    wait = uniform(backoff / 2, backoff)
    if retry_after is not None and now is not None:
        asked = (retry_after - now).total_seconds()
        if asked > 0:
            wait = max(wait, asked + uniform(0.0, retry_min))
    return min(wait, retry_max)
