"""A TUN device removed under a running data plane, created again.

After ``ip link del`` (an operator, a network manager) the device's
descriptor polls readable for ever and every read or write fails with
EBADFD (core/tun.py ``TunGoneError``).  Both data planes -- the HA's
(roles/ha_data.py) and the MN's (roles/mn_data.py) -- stop reading it and
hand it to :class:`TunReviver`, which closes it (the writer first: its
descriptor number is the next open's), logs one ERROR, and creates the
device again every ``RECREATE_S`` seconds with what the data plane puts on
it; a failed attempt is one WARNING per outage, not one per try.

A device taken down and up again (``ip link set DEV down; ... up``) keeps
its descriptor, but the kernel deleted its routes and IPv6 addresses at the
down, and the up gives them back to nobody.  :class:`LinkKeeper` watches its
link state (core/linkwatch.py) and, once it is up again, puts back what the
data plane put on it; a removal it hears of goes the reviver's way.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Sequence

from mipsec.core.errors import ConfigError
from mipsec.core.linkwatch import Change, LinkWatcher
from mipsec.core.logburst import LineBurst
from mipsec.core.outage import Outage
from mipsec.core.tun import IpCommandError, TunDevice, TunGoneError, TunWriter

__all__ = [
    "LINES",
    "LINES_WINDOW",
    "RECREATE_S",
    "SETTLE_MAX_S",
    "SETTLE_S",
    "LinkKeeper",
    "TunReviver",
    "listed",
]

RECREATE_S = 5.0  # seconds between two attempts to create the device again (or to restore it)
SETTLE_S = 0.5  # seconds a device stays up before what was on it is put back
# A link that never stays up SETTLE_S (flapping without end) still gets its
# routes back: SETTLE_MAX_S after the first up left unrestored, the next up
# restores at once.  The settle is a debounce, and a debounce needs a deadline.
SETTLE_MAX_S = 5.0
LINES = 4  # link lines logged per LINES_WINDOW seconds; the rest counted in one
LINES_WINDOW = 10.0


class TunReviver:
    """``lost`` a device, then ``open_device()`` every ``RECREATE_S`` until it
    works; ``on_back(tun)`` then puts the data plane on it.  ``counts``
    gets ``tun_lost``; ``dropped`` says what is dropped meanwhile."""

    def __init__(
        self,
        name: str,
        open_device: Callable[[], TunDevice],
        on_back: Callable[[TunDevice], None],
        counts: dict[str, int],
        log: logging.Logger,
        dropped: str,
    ) -> None:
        self._open_device, self._on_back = open_device, on_back
        self.counts, self.log, self.dropped = counts, log, dropped
        counts["tun_lost"] = 0
        self._timer: asyncio.TimerHandle | None = None
        self._failing = Outage(
            log, f"creating the TUN device {name} again", f"retried every {RECREATE_S:g} s"
        )

    def lost(self, tun: TunDevice, writer: TunWriter | None, exc: TunGoneError) -> None:
        """``tun`` is gone (its reader already removed by the caller)."""
        if writer is not None:
            writer.close()  # a flush it has scheduled must not write to a reused fd
        tun.close()
        self.counts["tun_lost"] += 1
        self.log.error(
            "data plane: TUN device %s is gone (%s): %s is dropped; creating it again every %g s",
            tun.name,
            exc.strerror,
            self.dropped,
            RECREATE_S,
        )
        self._schedule()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(RECREATE_S, self.try_now)

    def try_now(self) -> None:
        """One attempt (the timer's; a test may call it)."""
        self._timer = None
        try:
            tun = self._open_device()
        except ConfigError as exc:  # e.g. the name taken by another process meanwhile
            self._failing.failed(f"{exc.key}: {exc.reason}", logging.WARNING)
            self._schedule()
            return
        self._failing.failing = False  # the line below says it works again
        self.log.warning("data plane on %s again: the device was created anew", tun.name)
        self._on_back(tun)


class LinkKeeper:
    """The link state of the data plane's device, watched (``watch(tun)``).

    Down: a WARNING, and the data plane drops what it would write (``down``
    is true; the kernel would refuse it with EIO).  Up again: once it has
    stayed up ``SETTLE_S`` seconds (a down meanwhile cancels it),
    ``restore(tun)`` puts back what the data plane put on it and says what,
    then a WARNING.  A restore that fails -- after trying every address and
    route -- is one WARNING per outage and tried again every ``RECREATE_S``
    seconds until it works or the device goes down or away.  The device is
    never brought up here: an operator who took it down means it.  Removed:
    ``gone`` (the data plane's loss handler, then the reviver).  ``counts``
    gets ``link_down`` and ``link_restored``.

    A down and up storm (a flapping link, a script) is not a restore and two
    lines per flap: the restore waits for the link to settle (at most one
    restore per ``SETTLE_MAX_S`` while it never does), and the lines go
    through a :class:`LineBurst` (``LINES`` per ``LINES_WINDOW``
    seconds, the rest counted in one line).
    """

    def __init__(
        self,
        restore: Callable[[TunDevice], str],
        gone: Callable[[TunGoneError], None],
        counts: dict[str, int],
        log: logging.Logger,
        dropped: str,
    ) -> None:
        self._restore, self._gone = restore, gone
        self.counts, self.log, self.dropped = counts, log, dropped
        counts["link_down"] = 0
        counts["link_restored"] = 0
        self._watcher: LinkWatcher | None = None
        self._tun: TunDevice | None = None
        self._timer: asyncio.TimerHandle | None = None  # the settled restore, or its retry
        self._missed = False  # the pending restore is for lost notifications only
        # loop time of the first up not yet restored (the settle's deadline
        # runs from it); None when nothing waits to be put back
        self._unsettled_since: float | None = None
        self._lines = LineBurst(
            log, "lines about the TUN device's link", limit=LINES, window=LINES_WINDOW
        )
        self._failing = Outage(log, "data plane: putting back what was on the TUN device")

    @property
    def down(self) -> bool:
        watcher = self._watcher
        return watcher is not None and not watcher.state.up

    def watch(self, tun: TunDevice) -> None:
        """Watch ``tun`` (a device created anew has a new index)."""
        self.close()
        watcher = LinkWatcher(tun.name, self._changed)
        try:
            watcher.start()
        except OSError as exc:
            self.log.warning(
                "data plane: link state of TUN device %s not watched (%s): after a down and up "
                "its addresses and routes stay gone until a restart",
                tun.name,
                exc.strerror or exc,
            )
            return
        self._watcher, self._tun = watcher, tun
        self._failing = Outage(
            self.log,
            f"data plane: TUN device {tun.name} is up again but putting back what was on it",
            f"tried again every {RECREATE_S:g} s; {self.dropped} goes nowhere meanwhile",
        )
        if not watcher.state.up:  # taken down while it was being set up
            self._changed(Change(down=True))

    def close(self) -> None:
        watcher, self._watcher, self._tun = self._watcher, None, None
        self._cancel()
        self._unsettled_since = None
        if watcher is not None:
            watcher.close()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _later(self, delay: float) -> None:
        self._cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self.restore_now)

    def _changed(self, change: Change) -> None:
        tun = self._tun
        if tun is None:
            return
        if change.gone:
            self.close()
            self._gone(TunGoneError(errno.ENODEV, os.strerror(errno.ENODEV)))
            return
        if change.down:
            self._cancel()  # nothing to put back on a device that is down
            self.counts["link_down"] += 1
            self._lines.line(
                logging.WARNING,
                "data plane: TUN device %s is down (its routes and IPv6 addresses went with it): "
                "%s is dropped until it is up",
                tun.name,
                self.dropped,
            )
        if change.up:
            self._missed = change.missed and not change.down
            now = asyncio.get_running_loop().time()
            if self._unsettled_since is None:
                self._unsettled_since = now
            self._later(min(SETTLE_S, max(0.0, self._unsettled_since + SETTLE_MAX_S - now)))

    def restore_now(self) -> None:
        """Put back what was on the device (the timer's; a test may call it)."""
        self._timer = None
        tun = self._tun
        if tun is None or self.down:
            return
        try:
            what = self._restore(tun)
        except ConfigError as exc:
            why = f"{exc.key}: {exc.reason}"
        except IpCommandError as exc:
            why = str(exc)
        else:
            self._unsettled_since = None
            self._failing.failing = False  # the line below says it works again
            self.counts["link_restored"] += 1
            if self._missed:
                self._lines.line(
                    logging.WARNING,
                    "data plane: TUN device %s: link notifications lost (receive queue full): "
                    "what was missing of %s put back in case it went down and up meanwhile",
                    tun.name,
                    what,
                )
            else:
                self._lines.line(
                    logging.WARNING,
                    "data plane: TUN device %s is up again: %s restored",
                    tun.name,
                    what,
                )
            return
        self._failing.failed(why, logging.WARNING)
        # the deadline starts again: a storm whose restores fail (the device
        # down again under the commands) is not an ``ip`` run per flap
        self._unsettled_since = asyncio.get_running_loop().time()
        self._later(RECREATE_S)


def listed(items: Sequence[object], limit: int = 4) -> str:
    """``items`` for a log line: all of a few, the first ones and a count of many."""
    if not items:
        return "none"
    if len(items) <= limit:
        return ", ".join(str(i) for i in items)
    shown = ", ".join(str(i) for i in items[: limit - 1])
    return f"{len(items)} ({shown}, ...)"
