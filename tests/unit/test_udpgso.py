"""UDP GSO sends (mipsec.core.udpgso): run splitting, and real sends on loopback."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.udpgso import MAX_DECLINED, MAX_RUN_BYTES, MAX_SEGMENTS, GsoSender, runs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 1500), max_size=200))
def test_runs_keep_order_and_obey_the_kernels_rules(sizes: list[int]) -> None:
    datagrams = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    out = runs(datagrams)
    assert [d for run in out for d in run] == datagrams
    for run in out:
        seg = len(run[0])
        assert all(len(d) == seg for d in run[:-1]) and len(run[-1]) <= seg
        assert len(run) <= MAX_SEGMENTS and sum(map(len, run)) <= MAX_RUN_BYTES


def test_equal_sizes_make_few_runs() -> None:
    out = runs([b"x" * 1444] * 100 + [b"y" * 60])
    assert [len(r) for r in out] == [45, 45, 11]  # 45 * 1444 octets fit one IP packet


def _receiver(family: int, host: str) -> socket.socket:
    r = socket.socket(family, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    r.bind((host, 0))
    r.settimeout(5)
    return r


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
@pytest.mark.parametrize("connected", [True, False])
def test_loopback_receiver_sees_every_datagram_in_order(
    family: int, host: str, connected: bool
) -> None:
    try:
        r = _receiver(family, host)
    except OSError:
        pytest.skip(f"no {host} on this host")
    with r, socket.socket(family, socket.SOCK_DGRAM) as s:
        dst = r.getsockname()[:2]
        if connected:
            s.connect(dst)
        sizes = [1444] * 70 + [900, 1444, 1444, 77, 5, 5]
        datagrams = [os.urandom(n) for n in sizes]
        sender = GsoSender(s)
        calls = sender.send(datagrams, None if connected else dst)
        got = [r.recv(65535) for _ in datagrams]
        assert got == datagrams
        if sender.enabled:  # this kernel does UDP GSO: far fewer system calls
            assert calls < len(datagrams) // 4 and sender.runs_sent >= 2


class _NoGsoSocket:
    """A socket whose kernel refuses UDP_SEGMENT (old kernel, or a route
    through a device without checksum offload): sendmsg fails, send works."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendmsg(self, *args: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


def test_falls_back_to_one_datagram_per_call() -> None:
    sock = _NoGsoSocket()
    sender = GsoSender(sock)  # type: ignore[arg-type]
    datagrams = [bytes([i]) * 100 for i in range(10)]
    sender.send(datagrams)
    assert sock.sent == datagrams and not sender.enabled
    sender.send(datagrams[:3])  # no further sendmsg attempts
    assert sock.sent == datagrams + datagrams[:3]


def test_a_failing_path_is_reported_and_gso_kept() -> None:
    class Gone(_NoGsoSocket):
        def send(self, data: bytes) -> int:
            raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

    sender = GsoSender(Gone())  # type: ignore[arg-type]
    with pytest.raises(OSError) as info:
        sender.send([b"a" * 10, b"b" * 10])
    assert info.value.errno == errno.EADDRNOTAVAIL and sender.enabled


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EMSGSIZE, errno.ECONNREFUSED])
def test_one_destinations_refusal_keeps_gso_for_the_others(err: int) -> None:
    """EINVAL (a path MTU below the segment size), EMSGSIZE, a pending ICMP
    error: that run goes one datagram at a time and GSO stays on for the
    next -- on the HA's socket, one MN behind a small MTU turned it off for
    every MN (found in review).  A long series of them alone gives up."""

    class Refusing(_NoGsoSocket):
        def sendmsg(self, *args: Any) -> int:
            raise OSError(err, os.strerror(err))

    sock = Refusing()
    sender = GsoSender(sock)  # type: ignore[arg-type]
    datagrams = [bytes([i]) * 100 for i in range(10)]
    sender.send(datagrams)
    assert sock.sent == datagrams and sender.enabled
    for _ in range(2 * MAX_DECLINED):  # one MN's whole download: never given up
        sender.send(datagrams[:2])
    assert sender.enabled


def test_a_long_series_of_other_refusals_gives_up() -> None:
    class Odd(_NoGsoSocket):
        def sendmsg(self, *args: Any) -> int:
            raise OSError(errno.ENOBUFS, "No buffer space available")

    sender = GsoSender(Odd())  # type: ignore[arg-type]
    for _ in range(MAX_DECLINED - 1):
        sender.send([b"a" * 10, b"b" * 10])
    assert sender.enabled
    sender.send([b"a" * 10, b"b" * 10])
    assert not sender.enabled
