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

Authenticated connections (:meth:`authenticated`: the provisioning listener's
mutual TLS proved the peer) wait in a queue of their own and are evicted only
when nothing unauthenticated is left to evict.  Otherwise anyone who can
reach the port evicts a HAC's kept connections to its HA with a flood of
bare TCP connects (measured: 3 flooders at ~3,700 connects/s made 20 of
1,446 bootstraps fail with 504).  Ranking unauthenticated connections among
themselves (e.g. bare connects before those that sent octets) was tried and
dropped: a legitimate newcomer is a bare connect until its ClientHello is
read, so concurrent newcomers evicted each other (tests/integration/test_flood.py).
A newcomer always gets in while anything is evictable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from mipsec.core.errors import LocalProtocolError

K = TypeVar("K", bound=Hashable)

__all__ = ["ConnectionTable"]

# Ranks, evicted lowest first.
_UNPROVEN = 0
_AUTHENTICATED = 1  # its peer proved who it is


class ConnectionTable(Generic[K]):
    """The connections of one listener: cap, eviction order, work slots."""

    def __init__(self, max_connections: int, max_in_progress: int | None = None) -> None:
        if max_connections < 1:
            raise LocalProtocolError("max_connections must be at least 1")
        if max_in_progress is not None and max_in_progress < 1:
            raise LocalProtocolError("max_in_progress must be at least 1 (or None)")
        self.max_connections = max_connections
        self.max_in_progress = max_in_progress
        # Evictable connections per rank, the one that has waited longest first.
        self._queues: tuple[OrderedDict[K, None], ...] = (OrderedDict(), OrderedDict())
        self._rank: dict[K, int] = {}  # every connection held
        self._working: set[K] = set()
        self._closing: set[K] = set()  # first in line for good: never promoted

    def __len__(self) -> int:
        return len(self._rank)

    def __contains__(self, key: object) -> bool:
        return key in self._rank

    def __iter__(self) -> Iterator[K]:
        yield from list(self._working)
        for q in self._queues:
            yield from list(q)

    @property
    def in_progress(self) -> int:
        """Requests being worked on now."""
        return len(self._working)

    def admit(self, key: K) -> tuple[bool, list[K]]:
        """A new connection: ``(admitted, victims)``.

        Under the cap: admitted, no victim.  At the cap: the lowest-ranked
        connection that has waited longest is the victim (already removed
        here; the caller closes it) and ``key`` is admitted in its place.
        Over it (a lowered cap that ``resize`` could not reach because
        those connections were being worked for): as many victims as bring
        the table back under it -- one per admission kept the table over a
        lowered cap for good (found in review).  When every held connection
        is being worked for there is no victim left and ``key`` is refused.
        """
        if key in self._rank:
            raise LocalProtocolError("admit() of a connection already held")
        victims: list[K] = []
        while len(self._rank) >= self.max_connections:
            victim = self.oldest()
            if victim is None:
                return False, victims
            self.remove(victim)
            victims.append(victim)
        self._rank[key] = _UNPROVEN
        self._queues[_UNPROVEN][key] = None
        return True, victims

    def authenticated(self, key: K) -> None:
        """``key``'s peer proved who it is: from now on it is evicted only
        when nothing unauthenticated is left (a closing one stays first)."""
        old = self._rank.get(key)
        if old is None:
            raise LocalProtocolError("authenticated() of a connection not held")
        if old == _AUTHENTICATED or key in self._closing:
            return
        self._rank[key] = _AUTHENTICATED
        q = self._queues[old]
        if key in q:  # else being worked for: waiting() queues it by rank
            # At the back of its new queue: within a rank, the order is that
            # of reaching it (or of the last answer).
            del q[key]
            self._queues[_AUTHENTICATED][key] = None

    def waiting(self, key: K) -> None:
        """``key`` was answered (or its work ended) and waits for its next request."""
        self._working.discard(key)
        q = self._queues[self._rank[key]]
        q[key] = None
        q.move_to_end(key)

    def begin_work(self, key: K) -> bool:
        """``key`` sent a complete request the server now works on.

        False when ``max_in_progress`` requests are already worked on: the
        caller answers busy and ``key`` stays evictable.
        """
        if key in self._working:
            return True
        rank = self._rank.get(key)
        if rank is None or key not in self._queues[rank]:
            raise LocalProtocolError("begin_work() of a connection not held")
        if self.max_in_progress is not None and len(self._working) >= self.max_in_progress:
            return False
        del self._queues[rank][key]
        self._working.add(key)
        return True

    def closing(self, key: K) -> None:
        """``key`` is closing: first in line when room is needed."""
        rank = self._rank.get(key)
        if rank is None:
            return
        self._working.discard(key)
        self._queues[rank].pop(key, None)
        self._rank[key] = _UNPROVEN
        self._closing.add(key)
        q = self._queues[_UNPROVEN]
        q[key] = None
        q.move_to_end(key, last=False)

    def remove(self, key: K) -> None:
        """``key`` is gone (idempotent)."""
        rank = self._rank.pop(key, None)
        if rank is not None:
            self._queues[rank].pop(key, None)
        self._working.discard(key)
        self._closing.discard(key)

    def resize(self, max_connections: int) -> list[K]:
        """A new cap (a reload): the connections over it, removed here for
        the caller to close -- those ``admit`` would evict first (lowest
        rank, longest waiting); never one being worked for, so the table may
        stay over a lowered cap until that work ends (then the next
        ``admit`` evicts down to the cap)."""
        if max_connections < 1:
            raise LocalProtocolError("max_connections must be at least 1")
        self.max_connections = max_connections
        victims: list[K] = []
        while len(self._rank) > max_connections:
            victim = self.oldest()
            if victim is None:
                break
            self.remove(victim)
            victims.append(victim)
        return victims

    def oldest(self) -> K | None:
        """The connection that would be evicted next, if any."""
        for q in self._queues:
            if q:
                return next(iter(q))
        return None
