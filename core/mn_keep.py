"""The MN's old binding, kept while it bootstraps again (make before break).

At ``[sa] rebootstrap_at`` of an SA (80 % by default) the MN goes back to
its HAC for a new SA while the old one still has a fifth of its life.
Until the twenty-seventh session the MN dropped the old binding first --
refreshes stopped, the data plane detached -- so a HAC that was down or
refusing at that moment left the MN without service for its whole backoff,
though its SA and binding at the HA were good for minutes more (found in
review).  Now the old registration keeps refreshing, and the data plane
stays on it, until one of:

* a new SA is registered (the caller ends it with :meth:`KeptBinding.end`
  -- no de-registration: the new SA's binding has the same home address,
  and the HAC withdraws the old SA itself);
* the old SA reaches its validity end, or the HA stops answering it (the
  HAC withdrew it): the registration ends by itself, and the data plane
  detaches from it;
* the MN stops (:meth:`KeptBinding.end` with ``deregister``: lifetime 0,
  as for any binding at a stop).

A BA status 176 or a re-bootstrap demanded by the SA's first BA is no such
case: the HA no longer wants that SA, and the MN lets it go at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mipsec.core.roles.mn import Registrar, RegistrationOutcome

__all__ = ["KeptBinding"]

log = logging.getLogger("mipsec.mn")


class KeptBinding:
    """``registrar``'s binding, refreshed in a task of its own until its SA
    ends, its registration fails or :meth:`end`; ``detach`` is called once
    when it ends by itself (the data plane lets go of it)."""

    def __init__(
        self,
        registrar: Registrar,
        detach: Callable[[Registrar], None],
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.registrar = registrar
        self._detach = detach
        self._now = now
        self._stop = asyncio.Event()
        self._ended = False
        sa = registrar.issued.sa
        left = max(0.0, (sa.validity_end - now()).total_seconds())
        log.info(
            "mn: keeping the binding of SA spi=%d until a new SA is registered or it ends "
            "(in %.0f s)",
            sa.spi,
            left,
        )
        self.task = asyncio.get_running_loop().create_task(
            registrar.run(until_registered=False, timeout=left, stop=self._stop, start=False)
        )
        self.task.add_done_callback(self._done)

    @property
    def live(self) -> bool:
        return not self._ended

    def _done(self, task: asyncio.Task[RegistrationOutcome]) -> None:
        if self._stop.is_set():
            return  # ended by end(), which cleans up
        self._ended = True
        sa = self.registrar.issued.sa
        if task.cancelled() or task.exception() is not None:
            why = "its registration stopped"
        elif self._now() >= sa.validity_end:
            why = "its SA ended"
        else:  # the HA refused a refresh, or stopped answering (the SA withdrawn)
            why = task.result().reason or f"BA status {task.result().status}"
        log.info("mn: the kept binding of SA spi=%d is gone: %s", sa.spi, why)
        self._detach(self.registrar)
        self.registrar.close()

    async def end(self, *, deregister: bool) -> None:
        """Stop refreshing; with ``deregister``, send lifetime 0 (the MN
        stops).  Then close its socket.  Idempotent."""
        if self._ended:
            return
        self._ended = True
        self._stop.set()
        with contextlib.suppress(Exception):
            await self.task
        if deregister:
            await self.registrar.deregister()
        self._detach(self.registrar)
        self.registrar.close()
