"""Who gets a place on a listener, and who leaves to make room (sans-I/O).

Issue 6 item 2: one cap counts every connection a listener holds, pending TLS
handshakes included.  When the cap is reached, the connection that has waited
longest without completing a request makes room for the newcomer, so an MN
that completes its exchange in milliseconds always gets in and slow or idle
connections are what leaves.  A connection the server is working for (a
complete request being processed: an SA issue, an AAA round trip) is never
evicted; a separate cap bounds how many requests are worked on at once, so
the caller can answer "busy" (PROFILE §6: 503 with ``retry-after``) instead
of queueing without end.

Ordering needs no clock: a connection joins the queue of evictable
connections when it is accepted and rejoins it at the back each time it has
been answered and waits for its next request (:meth:`waiting`), so the front
is always the one that has waited longest.  A connection that is closing
(close_notify written, TCP not yet gone) goes to the front: it has nothing
left to say.  Every operation is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from mipsec.core.errors import LocalProtocolError

K = TypeVar("K", bound=Hashable)

__all__ = ["ConnectionTable"]


class ConnectionTable(Generic[K]):
    """The connections of one listener: cap, eviction order, work slots."""

    def __init__(self, max_connections: int, max_in_progress: int | None = None) -> None:
        if max_connections < 1:
            raise LocalProtocolError("max_connections must be at least 1")
        if max_in_progress is not None and max_in_progress < 1:
            raise LocalProtocolError("max_in_progress must be at least 1 (or None)")
        self.max_connections = max_connections
        self.max_in_progress = max_in_progress
        # Evictable connections, the one that has waited longest first.
        self._evictable: OrderedDict[K, None] = OrderedDict()
        self._working: set[K] = set()

    def __len__(self) -> int:
        return len(self._evictable) + len(self._working)

    def __contains__(self, key: object) -> bool:
        return key in self._evictable or key in self._working

    def __iter__(self) -> Iterator[K]:
        yield from list(self._working)
        yield from list(self._evictable)

    @property
    def in_progress(self) -> int:
        """Requests being worked on now."""
        return len(self._working)

    def admit(self, key: K) -> tuple[bool, K | None]:
        """A new connection: ``(admitted, victim)``.

        Under the cap: admitted, no victim.  At the cap: the connection that
        has waited longest is the victim (already removed here; the caller
        closes it) and ``key`` is admitted in its place.  When every held
        connection is being worked for there is no victim and ``key`` is
        refused.
        """
        if key in self:
            raise LocalProtocolError("admit() of a connection already held")
        victim: K | None = None
        if len(self) >= self.max_connections:
            if not self._evictable:
                return False, None
            victim, _ = self._evictable.popitem(last=False)
        self._evictable[key] = None
        return True, victim

    def waiting(self, key: K) -> None:
        """``key`` was answered (or its work ended) and waits for its next request."""
        self._working.discard(key)
        self._evictable[key] = None
        self._evictable.move_to_end(key)

    def begin_work(self, key: K) -> bool:
        """``key`` sent a complete request the server now works on.

        False when ``max_in_progress`` requests are already worked on: the
        caller answers busy and ``key`` stays evictable.
        """
        if key in self._working:
            return True
        if key not in self._evictable:
            raise LocalProtocolError("begin_work() of a connection not held")
        if self.max_in_progress is not None and len(self._working) >= self.max_in_progress:
            return False
        del self._evictable[key]
        self._working.add(key)
        return True

    def closing(self, key: K) -> None:
        """``key`` is closing: first in line when room is needed."""
        if key not in self:
            return
        self._working.discard(key)
        self._evictable[key] = None
        self._evictable.move_to_end(key, last=False)

    def remove(self, key: K) -> None:
        """``key`` is gone (idempotent)."""
        self._evictable.pop(key, None)
        self._working.discard(key)

    def oldest(self) -> K | None:
        """The connection that would be evicted next, if any."""
        return next(iter(self._evictable), None)
