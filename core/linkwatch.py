"""An interface's link state, from the kernel's rtnetlink notifications.

``ip link set DEV down`` (an operator, a network manager) makes the kernel
delete every route through the device and its IPv6 addresses; ``up``
gives neither back.  A TUN device's descriptor stays valid meanwhile, so
nothing the data plane reads or writes says so (core/tun.py's
``TunGoneError`` is only for a device removed).  :class:`LinkWatcher`
listens on an ``AF_NETLINK`` / ``NETLINK_ROUTE`` socket bound to the
``RTMGRP_LINK`` group -- the kernel sends an ``RTM_NEWLINK`` on every change
of any interface's flags and an ``RTM_DELLINK`` when one is removed -- and
tells its owner about one interface, whether traffic flows or not.

The parsing is sans-I/O: :func:`link_events` reads the octets of one
``recv`` (``struct nlmsghdr``, 16 octets, then ``struct ifinfomsg``, whose
``ifi_index`` and ``ifi_flags`` are all that is read), and
:class:`LinkState` folds the events into what changed.  One wake-up reads at
most ``READS_PER_WAKE`` datagrams (the socket hears every interface of the
namespace; a busy host must not hold the event loop), the rest waits for
the next.  A full receive queue (``ENOBUFS``: notifications lost) is
answered by asking the kernel for the interface's flags now; the queue is
asked to hold ``RCVBUF`` octets (best effort) to make that rarer.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import math
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "MAX_MESSAGES",
    "RCVBUF",
    "READS_PER_WAKE",
    "Change",
    "Link",
    "LinkState",
    "LinkWatcher",
    "enlarge_rcvbuf",
    "interface_up",
    "link_events",
]

RTMGRP_LINK = 0x1  # linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFF_UP = 0x1  # linux/if.h: administratively up (what `ip link set down` clears)
NLMSG_HDRLEN = 16  # struct nlmsghdr: u32 len, u16 type, u16 flags, u32 seq, u32 pid
IFINFOMSG_LEN = 16  # struct ifinfomsg: u8 family, pad, u16 type, s32 index, u32 flags, u32 change
_SIOCGIFFLAGS = 0x8913
MAX_MESSAGES = 64  # netlink messages read from one datagram
READS_PER_WAKE = 32  # datagrams read per wake-up
PAUSE_S = 0.05  # at most one wake-up per PAUSE_S while notifications keep coming
MAX_DRAIN = 4096  # datagrams read unparsed at a busy wake-up
_RECV_SIZE = 65536
RCVBUF = 1 << 20  # octets of receive queue asked for (best effort): fewer ENOBUFS
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # past rmem_max, with CAP_NET_ADMIN


def enlarge_rcvbuf(sock: socket.socket, size: int = RCVBUF) -> None:
    """Ask for a ``size`` receive queue: ``SO_RCVBUFFORCE`` (the data plane
    runs with ``CAP_NET_ADMIN``), else ``SO_RCVBUF`` (capped by
    ``net.core.rmem_max``).  Best effort: the default (about 200 KB) overflowed
    when another process made and removed a few hundred interfaces while the
    loop was busy (found in review)."""
    for option in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            continue
        return


class Link(Enum):
    """One notification about the watched interface."""

    UP = "up"
    DOWN = "down"
    GONE = "gone"


def link_events(data: bytes, ifindex: int, limit: int = MAX_MESSAGES) -> list[Link]:
    """The notifications about interface ``ifindex`` in one datagram, in order.

    Netlink is host byte order.  Other message types and other interfaces
    are skipped; a header whose length is short or runs past the datagram
    (a truncated read) ends the parse, as do ``limit`` messages.
    """
    out: list[Link] = []
    off, end = 0, len(data)
    for _ in range(limit):
        if off + NLMSG_HDRLEN > end:
            break
        length, kind = struct.unpack_from("=IH", data, off)
        if length < NLMSG_HDRLEN or off + length > end:
            break
        if kind in (RTM_NEWLINK, RTM_DELLINK) and length >= NLMSG_HDRLEN + IFINFOMSG_LEN:
            index, flags = struct.unpack_from("=iI", data, off + NLMSG_HDRLEN + 4)
            if index == ifindex:
                if kind == RTM_DELLINK:
                    out.append(Link.GONE)
                else:
                    out.append(Link.UP if flags & IFF_UP else Link.DOWN)
        off += (length + 3) & ~3  # NLMSG_ALIGN
    return out


@dataclass(frozen=True)
class Change:
    """What happened to the interface since the last change told.

    ``down``: it went down (its routes and IPv6 addresses are gone).
    ``up``: it is up after being down -- or, with ``missed``, up after
    notifications were lost, so it may have gone down and up unseen.
    ``gone``: it was removed.
    """

    down: bool = False
    up: bool = False
    gone: bool = False
    missed: bool = False


class LinkState:
    """Up or down, from the notifications; :meth:`feed` says what changed."""

    def __init__(self, up: bool) -> None:
        self.up = up
        self.gone = False

    def feed(self, events: Iterable[Link]) -> Change | None:
        """Fold one read's events; None if nothing changed (another flag,
        an up while up).  A down and up inside one read is both; from down,
        an up and down again is nothing (it was never restored)."""
        if self.gone:
            return None
        was_up, downs = self.up, False
        for event in events:
            if event is Link.GONE:
                self.gone = True
                return Change(gone=True)
            downs = downs or event is Link.DOWN
            self.up = event is Link.UP
        went_down = was_up and downs
        came_up = self.up and (not was_up or downs)
        return Change(down=went_down, up=came_up) if went_down or came_up else None

    def resync(self, up: bool | None) -> Change | None:
        """Notifications were lost: ``up`` is the state now (None: gone)."""
        if self.gone:
            return None
        if up is None:
            self.gone = True
            return Change(gone=True, missed=True)
        went_down = self.up and not up
        self.up = up
        return Change(down=went_down, up=up, missed=True) if went_down or up else None


def interface_up(sock: socket.socket, name: str) -> bool:
    """Whether ``name`` is administratively up (SIOCGIFFLAGS); OSError
    (ENODEV) if there is no such interface."""
    ifr = struct.pack("16s24x", name.encode())  # struct ifreq, 40 octets
    got = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, ifr)
    return bool(struct.unpack_from("h", got, 16)[0] & IFF_UP)


class LinkWatcher:
    """Tells ``on_change`` what happens to interface ``name`` (its index now).

    ``start`` opens the socket (``OSError`` if it cannot) and reads the
    interface's state; ``close`` stops.  ``on_change`` is called from the
    event loop, at most once per wake-up; after a ``gone`` it is not called
    again.
    """

    def __init__(self, name: str, on_change: Callable[[Change], None]) -> None:
        self.name = name
        self._on_change = on_change
        self._sock: socket.socket | None = None
        self._paused: asyncio.TimerHandle | None = None
        self._last_wake = -math.inf
        self.pauses = 0  # wake-ups that found more than READS_PER_WAKE waiting
        self.ifindex = 0
        self.state = LinkState(up=True)

    def start(self) -> None:
        kind = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        sock = socket.socket(socket.AF_NETLINK, kind, socket.NETLINK_ROUTE)
        try:
            enlarge_rcvbuf(sock)
            sock.bind((0, RTMGRP_LINK))  # subscribed before the state is read: nothing missed
            self.ifindex = socket.if_nametoindex(self.name)
            self.state = LinkState(up=interface_up(sock, self.name))
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    @property
    def running(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def _resume(self) -> None:
        self._paused = None
        sock = self._sock
        if sock is not None:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        events: list[Link] = []
        missed = False
        drained = False
        for _ in range(READS_PER_WAKE):
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                drained = True
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    break  # nothing else is expected of a netlink read: next wake-up
                missed = True  # the queue overflowed; reads go on after it
                continue
            events.extend(link_events(data, self.ifindex))
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not drained or now - self._last_wake < PAUSE_S:
            # More than a wake-up's worth waiting, or the second wake-up
            # within PAUSE_S (a flap storm, a host adding hundreds of
            # interfaces): the rest is read without being parsed, the state
            # asked of the kernel (as after an overflow), and the socket
            # left alone for PAUSE_S.  The loop no longer wakes for each of
            # ~10,000 notifications a second (44 % of a core in review), and
            # what it learns at each wake-up is the state now, not a backlog.
            self.pauses += 1
            for _ in range(MAX_DRAIN):
                try:
                    sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # ENOBUFS: an overflow -- the state is asked anyway
            missed = True
            loop.remove_reader(sock.fileno())
            self._paused = loop.call_later(PAUSE_S, self._resume)
        self._last_wake = now
        before = self.state.up
        change = self.state.feed(events)
        if missed and not self.state.gone:
            # What was read is not all that happened: the kernel says how it is now.
            self.state.up = before
            change = self.state.resync(self._now())
        if change is not None:
            self._on_change(change)

    def _now(self) -> bool | None:
        """The interface's state asked of the kernel (None: gone)."""
        sock = self._sock
        if sock is None:
            return None
        try:
            if socket.if_nametoindex(self.name) != self.ifindex:
                return None  # another interface took the name
            return interface_up(sock, self.name)
        except OSError:
            return None
