"""core/linkwatch.py: rtnetlink link notifications read from crafted octets,
folded into what changed; roles/tunrevive.py ``LinkKeeper`` acting on it.

A TUN device taken down and up keeps its descriptor, but the kernel deleted
its routes and IPv6 addresses at the down: the data plane hears of it here,
not from its traffic.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from mipsec.core import linkwatch
from mipsec.core.errors import ConfigError
from mipsec.core.linkwatch import (
    IFF_UP,
    RTM_DELLINK,
    RTM_NEWLINK,
    Change,
    Link,
    LinkState,
    LinkWatcher,
    interface_up,
    link_events,
)
from mipsec.core.roles import tunrevive
from mipsec.core.roles.tunrevive import LinkKeeper
from mipsec.core.tun import IpCommandError, TunGoneError

_IFF_RUNNING = 0x40
_RTM_NEWADDR = 20
_NLMSG_DONE = 3


def nlmsg(kind: int, index: int, flags: int = 0, attrs: bytes = b"") -> bytes:
    """One netlink message as the kernel sends it: nlmsghdr, ifinfomsg, attributes."""
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 65534, index, flags, 0xFFFFFFFF) + attrs
    head = struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0)
    msg = head + body
    return msg + bytes(-len(msg) % 4)  # NLMSG_ALIGN


# An IFLA_IFNAME attribute of 7 octets: the message's length is not a multiple of 4.
_NAME_ATTR = struct.pack("=HH", 4 + 7, 3) + b"mip0\0\0\0" + b"\0"


def test_up_down_and_removal_of_the_watched_index() -> None:
    data = (
        nlmsg(RTM_NEWLINK, 7, IFF_UP | _IFF_RUNNING)
        + nlmsg(RTM_NEWLINK, 7, _IFF_RUNNING, _NAME_ATTR)
        + nlmsg(RTM_DELLINK, 7)
    )
    assert link_events(data, 7) == [Link.UP, Link.DOWN, Link.GONE]


def test_other_interfaces_and_other_messages_are_skipped() -> None:
    data = (
        nlmsg(RTM_NEWLINK, 8, 0)  # another interface down
        + nlmsg(RTM_DELLINK, 9)
        + nlmsg(_RTM_NEWADDR, 7, 0)  # not a link message, whatever its octets
        + nlmsg(_NLMSG_DONE, 7, 0)
        + nlmsg(RTM_NEWLINK, 7, IFF_UP, _NAME_ATTR)
    )
    assert link_events(data, 7) == [Link.UP]


def test_a_link_message_too_short_for_its_ifinfomsg_is_skipped() -> None:
    short = struct.pack("=IHHII", 16 + 8, RTM_NEWLINK, 0, 0, 0) + struct.pack("=BxHi", 0, 0, 7)
    assert link_events(short + nlmsg(RTM_NEWLINK, 7, 0), 7) == [Link.DOWN]


@pytest.mark.parametrize(
    "broken",
    [
        struct.pack("=IHHII", 0, RTM_NEWLINK, 0, 0, 0),  # length 0: would never advance
        struct.pack("=IHHII", 15, RTM_NEWLINK, 0, 0, 0),  # shorter than its own header
        struct.pack("=IHHII", 4096, RTM_NEWLINK, 0, 0, 0),  # runs past the datagram
    ],
)
def test_a_malformed_header_ends_the_parse(broken: bytes) -> None:
    assert link_events(nlmsg(RTM_NEWLINK, 7, IFF_UP) + broken + nlmsg(RTM_DELLINK, 7), 7) == [
        Link.UP
    ]


@pytest.mark.parametrize(
    "tail",
    [
        nlmsg(RTM_DELLINK, 7)[:-4],  # a truncated read (MSG_TRUNC)
        nlmsg(RTM_DELLINK, 7)[:12],  # not even a whole header
    ],
)
def test_a_truncated_last_message_is_not_read(tail: bytes) -> None:
    assert link_events(nlmsg(RTM_NEWLINK, 7, IFF_UP) + tail, 7) == [Link.UP]


def test_one_datagram_is_read_up_to_the_limit() -> None:
    data = nlmsg(RTM_NEWLINK, 7, 0) * 5 + nlmsg(RTM_DELLINK, 7)
    assert link_events(data, 7, limit=5) == [Link.DOWN] * 5
    many = nlmsg(RTM_NEWLINK, 7, 0) * (linkwatch.MAX_MESSAGES + 10)
    assert link_events(many, 7) == [Link.DOWN] * linkwatch.MAX_MESSAGES
    assert link_events(b"", 7) == []


def test_the_state_says_each_transition_once() -> None:
    state = LinkState(up=True)
    assert state.feed([]) is None
    assert state.feed([Link.UP]) is None  # another flag changed, still up
    assert state.feed([Link.DOWN]) == Change(down=True)
    assert state.feed([Link.DOWN]) is None and not state.up
    assert state.feed([Link.UP]) == Change(up=True)
    assert state.feed([Link.DOWN, Link.UP]) == Change(down=True, up=True)  # one read
    assert state.feed([Link.DOWN, Link.UP, Link.DOWN]) == Change(down=True)
    # Up and down again inside one read: down it stays, nothing to say or do yet.
    assert state.feed([Link.UP, Link.DOWN]) is None
    assert state.feed([Link.UP, Link.DOWN, Link.UP]) == Change(up=True)
    assert state.feed([Link.UP, Link.GONE]) == Change(gone=True)
    assert state.feed([Link.UP]) is None and state.resync(True) is None  # gone for good


def test_a_state_found_down_at_the_start_is_restored_when_it_comes_up() -> None:
    state = LinkState(up=False)
    assert state.feed([Link.UP]) == Change(up=True)


def test_after_lost_notifications_the_state_is_the_kernels() -> None:
    state = LinkState(up=True)
    # Up now: it may have gone down and up unseen, what is on it is put back.
    assert state.resync(True) == Change(up=True, missed=True)
    assert state.resync(False) == Change(down=True, missed=True)
    assert state.resync(False) is None
    assert state.resync(True) == Change(up=True, missed=True)
    assert state.resync(None) == Change(gone=True, missed=True) and state.gone


class _Opts:
    def __init__(self, refused: set[int]) -> None:
        self.refused = refused
        self.set: list[tuple[int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if option in self.refused:
            raise PermissionError(errno.EPERM, "not permitted")
        self.set.append((option, value))


def test_the_receive_queue_is_enlarged_as_far_as_allowed() -> None:
    """Lost notifications (ENOBUFS) from a default queue of about 200 KB
    when a few hundred interfaces came and went (found in review)."""
    sock = _Opts(set())
    linkwatch.enlarge_rcvbuf(cast(Any, sock))
    assert sock.set == [(linkwatch._SO_RCVBUFFORCE, linkwatch.RCVBUF)]
    sock = _Opts({linkwatch._SO_RCVBUFFORCE})  # no CAP_NET_ADMIN: up to rmem_max
    linkwatch.enlarge_rcvbuf(cast(Any, sock))
    assert sock.set == [(socket.SO_RCVBUF, linkwatch.RCVBUF)]
    linkwatch.enlarge_rcvbuf(cast(Any, _Opts({linkwatch._SO_RCVBUFFORCE, socket.SO_RCVBUF})))


def test_interface_flags_from_the_kernel() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert isinstance(interface_up(sock, "lo"), bool)
        with pytest.raises(OSError) as info:
            interface_up(sock, "mipnone0")
        assert info.value.errno == errno.ENODEV


# ---------------------------------------------------------------- LinkWatcher's reads


class _Sock:
    """recv() hands out queued datagrams (or raises queued errors), then EAGAIN."""

    def __init__(self, queue: list[bytes | OSError]) -> None:
        self.queue = queue
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "again")
        item = self.queue.pop(0)
        if isinstance(item, OSError):
            raise item
        return item


def _watcher(queue: list[bytes | OSError], now: bool | None = True) -> tuple[Any, list[Change]]:
    changes: list[Change] = []
    w = LinkWatcher("mip0", changes.append)
    w.ifindex = 7
    w._sock = cast(Any, _Sock(queue))
    w._now = lambda: now  # type: ignore[method-assign]
    return w, changes


def _wake(w: Any) -> None:
    """One wake-up of the watcher's reader, on a loop that records reader changes."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader = lambda fd, cb: None  # type: ignore[method-assign,assignment,misc]
        loop.remove_reader = lambda fd: True  # type: ignore[method-assign,assignment,misc]
        if w._sock is not None:
            w._sock.fileno = lambda: 99
        w._readable()

    asyncio.run(body())


def test_one_wake_up_reads_a_bounded_number_of_datagrams_then_pauses() -> None:
    """More than a wake-up's worth waiting (a flap storm): the rest is read
    unparsed, the state asked of the kernel, and the reader taken off the
    loop for PAUSE_S -- the loop woke for each of ~10,000 notifications a
    second before (review).  A wake-up within PAUSE_S of the last does the
    same, so a storm wakes the loop at most 1/PAUSE_S times a second."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        readers: list[str] = []
        loop.add_reader = lambda fd, cb: readers.append("add")  # type: ignore[method-assign,assignment,misc]
        loop.remove_reader = lambda fd: readers.append("remove") or True  # type: ignore[method-assign,assignment,misc]
        others = [nlmsg(RTM_NEWLINK, 8, IFF_UP)] * (linkwatch.READS_PER_WAKE + 3)
        w, changes = _watcher([*others, nlmsg(RTM_NEWLINK, 7, 0)], now=False)
        w._sock.fileno = lambda: 99
        w._readable()
        assert w._sock.queue == [] and readers == ["remove"] and w.pauses == 1
        # Not the backlog's last word: the kernel's (down, here).
        assert changes == [Change(down=True, missed=True)]
        await asyncio.sleep(linkwatch.PAUSE_S * 3)
        assert readers == ["remove", "add"] and w._paused is None
        w._sock.queue.append(nlmsg(RTM_NEWLINK, 7, IFF_UP))
        w._readable()  # long after the last: parsed as it comes
        assert changes[-1] == Change(up=True) and w.pauses == 1
        w._sock.queue.append(nlmsg(RTM_NEWLINK, 7, 0))
        w._readable()  # within PAUSE_S of the last: the kernel asked, a pause
        assert readers[-1] == "remove" and w.pauses == 2
        assert changes[-1] == Change(down=True, missed=True)

    asyncio.run(body())


def test_a_watcher_closed_while_paused_stays_closed() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        added: list[int] = []
        loop.add_reader = lambda fd, cb: added.append(fd)  # type: ignore[method-assign,assignment,misc]
        loop.remove_reader = lambda fd: True  # type: ignore[method-assign,assignment,misc]
        w, _ = _watcher([nlmsg(RTM_NEWLINK, 8, IFF_UP)] * (linkwatch.READS_PER_WAKE + 1))
        w._sock.fileno = lambda: 99
        w._sock.close = lambda: None
        w._readable()
        w.close()
        await asyncio.sleep(linkwatch.PAUSE_S * 3)
        assert added == [] and w._paused is None and not w.running

    asyncio.run(body())


def test_a_down_and_the_removal_read_together_are_the_removal() -> None:
    # `ip link del` sends a down, then RTM_DELLINK: one ERROR, not a WARNING first.
    w, changes = _watcher([nlmsg(RTM_NEWLINK, 7, 0), nlmsg(RTM_DELLINK, 7)])
    _wake(w)
    assert changes == [Change(gone=True)]


def test_an_overflowed_queue_asks_the_kernel() -> None:
    lost = OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
    w, changes = _watcher([nlmsg(RTM_NEWLINK, 7, 0), lost, nlmsg(RTM_NEWLINK, 8, 0)], now=True)
    _wake(w)
    assert changes == [Change(up=True, missed=True)] and w.state.up
    w, changes = _watcher([lost], now=None)
    _wake(w)
    assert changes == [Change(gone=True, missed=True)]


def test_a_closed_watcher_reads_nothing() -> None:
    w, changes = _watcher([nlmsg(RTM_NEWLINK, 7, 0)])
    w._sock = None
    _wake(w)
    assert changes == []


def test_the_watcher_on_a_real_socket_starts_and_closes() -> None:
    async def body() -> None:
        w = LinkWatcher("lo", lambda change: None)
        try:
            w.start()
        except PermissionError:  # pragma: no cover - a sandbox without netlink
            pytest.skip("no AF_NETLINK socket here")
        assert w.running and w.ifindex == socket.if_nametoindex("lo")
        assert w._sock is not None
        got = w._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if os.geteuid() == 0:  # SO_RCVBUFFORCE (the kernel doubles what is asked)
            assert got >= linkwatch.RCVBUF, got
        w.close()
        w.close()
        assert not w.running
        with pytest.raises(OSError):
            LinkWatcher("mipnone0", lambda change: None).start()

    asyncio.run(body())


# ---------------------------------------------------------------- LinkKeeper (the roles' part)


def _keeper(
    restore: Any = None,
) -> tuple[LinkKeeper, list[TunGoneError], dict[str, int]]:
    gone: list[TunGoneError] = []
    counts: dict[str, int] = {}
    keeper = LinkKeeper(
        restore or (lambda tun: "addresses 2001:db8::1/128, routes 2001:db8::/64"),
        gone.append,
        counts,
        logging.getLogger("mipsec.test.link"),
        "MN traffic",
    )
    keeper._tun = cast(Any, SimpleNamespace(name="mip0"))
    return keeper, gone, counts


def _recorder() -> tuple[list[object], Callable[[object], str]]:
    """A restore that records the devices it is called with."""
    restored: list[object] = []

    def restore(tun: object) -> str:
        restored.append(tun)
        return "addresses 2001:db8::1/128, routes 2001:db8::/64"

    return restored, restore


def _said(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_down_then_up_is_one_warning_each_and_a_restore(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mipsec.test.link")
    restored, restore = _recorder()

    async def body() -> None:
        keeper, gone, counts = _keeper(restore)
        keeper._changed(Change(down=True))
        assert counts == {"link_down": 1, "link_restored": 0} and restored == []
        keeper._changed(Change(up=True))
        assert restored == []  # not before the link settled
        await asyncio.sleep(tunrevive.SETTLE_S + 0.1)
        assert counts == {"link_down": 1, "link_restored": 1} and len(restored) == 1
        assert gone == []

    asyncio.run(body())
    assert _said(caplog) == [
        (
            "WARNING",
            "data plane: TUN device mip0 is down (its routes and IPv6 addresses went with it): "
            "MN traffic is dropped until it is up",
        ),
        (
            "WARNING",
            "data plane: TUN device mip0 is up again: "
            "addresses 2001:db8::1/128, routes 2001:db8::/64 restored",
        ),
    ]


def test_a_down_and_up_storm_is_one_restore_and_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """500 flaps in a row (a script, a flapping link): before, a restore
    of synchronous ``ip`` commands and two WARNINGs per flap (about 200
    lines a second and 70 % of a core, found in review).  Now one restore
    once the link settled, and a few lines with a count of the rest."""
    caplog.set_level(logging.INFO, logger="mipsec.test.link")
    restored, restore = _recorder()

    async def body() -> None:
        keeper, _, counts = _keeper(restore)
        keeper._lines.window = 0.3
        for _ in range(500):
            keeper._changed(Change(down=True))
            keeper._changed(Change(up=True))
        assert restored == []
        await asyncio.sleep(tunrevive.SETTLE_S + 0.1)
        assert counts == {"link_down": 500, "link_restored": 1} and len(restored) == 1

    asyncio.run(body())
    said = [line for level, line in _said(caplog) if level != "DEBUG"]
    assert len(said) <= tunrevive.LINES + 2, said
    assert any(line.startswith("496 more lines about the TUN device's link") for line in said)
    assert said[-1].endswith("restored")


@pytest.mark.parametrize("fails", [False, True])
def test_a_storm_without_end_still_restores_once_per_settle_deadline(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """A link that flaps without end -- never up SETTLE_S in a row: before,
    each up restarted the settle and the routes never came back while it
    lasted (found in review).  Now the first up left unrestored starts a
    deadline; once SETTLE_MAX_S has passed the next up restores at once,
    and the deadline starts again after each restore, failed or not --
    about one ``ip`` run per SETTLE_MAX_S, not one per flap."""
    monkeypatch.setattr(tunrevive, "SETTLE_MAX_S", 0.3)
    monkeypatch.setattr(tunrevive, "RECREATE_S", 60.0)
    tries: list[float] = []

    def restore(tun: object) -> str:
        tries.append(asyncio.get_running_loop().time())
        if fails:
            raise IpCommandError("ip -6 route replace ...: Network is down")
        return "addresses 2001:db8::1/128, routes none"

    async def body() -> None:
        keeper, _, counts = _keeper(restore)
        keeper._failing = tunrevive.Outage(keeper.log, "putting back", "tried again")
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 1.5:  # up 0.1 s at a time, far below SETTLE_S
            keeper._changed(Change(up=True))
            await asyncio.sleep(0.1)
            keeper._changed(Change(down=True))
        assert 3 <= len(tries) <= 1.5 / 0.3 + 1, tries
        gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
        assert min(gaps) >= 0.3 - 0.02, gaps
        assert counts["link_restored"] == (0 if fails else len(tries))

    asyncio.run(body())


def test_a_down_before_the_link_settled_cancels_the_restore() -> None:
    restored: list[object] = []

    async def body() -> None:
        keeper, _, counts = _keeper(lambda tun: restored.append(tun) or "x")
        keeper._changed(Change(up=True))
        keeper._changed(Change(down=True))
        await asyncio.sleep(tunrevive.SETTLE_S + 0.1)
        assert restored == [] and counts["link_restored"] == 0

    asyncio.run(body())


@pytest.mark.parametrize(
    ("exc", "why"),
    [
        (IpCommandError("ip -6 route replace ...: Network is down"), "ip -6 route replace"),
        (ConfigError("ha.toml", "dataplane.routes", "Network is down"), "dataplane.routes: "),
    ],
)
def test_a_restore_that_fails_is_one_warning_and_tried_again_until_it_works(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, exc: Exception, why: str
) -> None:
    """A transient failure (ENOBUFS from the kernel, a busy ``ip``): before,
    never tried again until the next down and up (found in review)."""
    caplog.set_level(logging.INFO, logger="mipsec.test.link")
    monkeypatch.setattr(tunrevive, "RECREATE_S", 0.05)
    tries: list[object] = []

    def restore(tun: object) -> str:
        tries.append(tun)
        if len(tries) <= 3:
            raise exc
        return "addresses 2001:db8::1/128, routes none"

    async def body() -> None:
        keeper, _, counts = _keeper(restore)
        keeper._failing = tunrevive.Outage(keeper.log, "putting back", "tried again")
        keeper._changed(Change(up=True))
        await asyncio.sleep(tunrevive.SETTLE_S + 0.5)
        assert len(tries) == 4 and counts["link_restored"] == 1
        assert keeper._timer is None

    asyncio.run(body())
    [(level, line), (level2, line2)] = _said(caplog)
    assert level == "WARNING" and line.startswith("putting back failed: ") and why in line
    assert "\n" not in line and line.endswith("; tried again")
    assert level2 == "WARNING" and line2.endswith("routes none restored")


def test_the_retries_stop_when_the_device_goes_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunrevive, "RECREATE_S", 0.05)
    tries: list[object] = []

    def restore(tun: object) -> str:
        tries.append(tun)
        raise IpCommandError("ip route replace ...: No buffer space available")

    async def body() -> None:
        keeper, _, _ = _keeper(restore)
        keeper.restore_now()
        assert keeper._timer is not None and len(tries) == 1
        keeper._changed(Change(down=True))
        assert keeper._timer is None
        await asyncio.sleep(0.2)
        assert len(tries) == 1

    asyncio.run(body())


def test_many_items_are_counted_in_a_line_not_listed() -> None:
    assert tunrevive.listed([]) == "none"
    assert tunrevive.listed(["a", "b"]) == "a, b"
    line = tunrevive.listed([f"2001:db8:{i:x}::/64" for i in range(200)])
    assert line == "200 (2001:db8:0::/64, 2001:db8:1::/64, 2001:db8:2::/64, ...)"


def test_lost_notifications_say_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mipsec.test.link")
    keeper, _, counts = _keeper()

    async def body() -> None:
        keeper._changed(Change(up=True, missed=True))
        keeper._cancel()
        keeper.restore_now()

    asyncio.run(body())
    assert counts["link_restored"] == 1
    assert "link notifications lost" in _said(caplog)[0][1]


def test_a_removal_goes_the_revivers_way() -> None:
    keeper, gone, counts = _keeper()
    keeper._changed(Change(gone=True))
    assert [e.errno for e in gone] == [errno.ENODEV] and keeper._tun is None
    keeper._changed(Change(up=True))  # closed: nothing more
    assert counts == {"link_down": 0, "link_restored": 0} and len(gone) == 1
    assert not keeper.down


def test_a_device_that_cannot_be_watched_is_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="mipsec.test.link")

    def refuse(self: LinkWatcher) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(LinkWatcher, "start", refuse)
    keeper, _, _ = _keeper()
    keeper.watch(cast(Any, SimpleNamespace(name="mip0")))
    [(level, line)] = _said(caplog)
    assert level == "WARNING" and "not watched (Operation not permitted)" in line
    assert not keeper.down and keeper._watcher is None
