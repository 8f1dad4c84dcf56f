"""The lab's ICMP echo probe (core/echo.py) against a responder that answers
late or not at all, in a network namespace of its own.

The responder is a TUN device served by a thread of this test: it answers
echo requests by sequence number -- at once, after a delay, or never -- so
the probe's count is checked against a known truth.  ping(8) counts a reply
that comes 500 ms late as lost once an earlier one came back (seen in CI as
"3 transmitted, 1 received"); the probe must not, and must still count a
reply that never comes.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from labfix import needs_net_admin

from mipsec.core.echo import checksum

pytestmark = [pytest.mark.system, needs_net_admin]

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
LOCAL, PEER = "10.99.0.1", "10.99.0.2"


def _answer(packet: bytes) -> bytes:
    """The echo reply to an IPv4 echo request."""
    ihl = (packet[0] & 0x0F) * 4
    ip, icmp = bytearray(packet[:ihl]), bytearray(packet[ihl:])
    ip[12:16], ip[16:20] = packet[16:20], packet[12:16]
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", checksum(bytes(ip)))
    icmp[0], icmp[2:4] = 0, b"\0\0"
    icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
    return bytes(ip + icmp)


class Responder:
    """Answers echo number N after ``delays[N]`` seconds; None: never."""

    def __init__(self, ns: str, delays: dict[int, float | None]) -> None:
        self.delays = delays
        self.stop = threading.Event()
        # Made here (a random name: parallel workers), then moved into the
        # namespace; this process keeps serving it through its descriptor.
        self.name = f"echo{secrets.token_hex(4)}"
        self.fd = os.open("/dev/net/tun", os.O_RDWR)
        ifreq = struct.pack("16sH", self.name.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(self.fd, TUNSETIFF, ifreq)
        subprocess.run(["ip", "link", "set", self.name, "netns", ns], check=True)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        timers: list[threading.Timer] = []
        while not self.stop.is_set():
            if not select.select([self.fd], [], [], 0.1)[0]:
                continue
            packet = os.read(self.fd, 65535)
            ihl = (packet[0] & 0x0F) * 4
            if packet[0] >> 4 != 4 or packet[9] != 1 or packet[ihl] != 8:
                continue
            seq = struct.unpack_from("!H", packet, ihl + 6)[0]
            delay = self.delays.get(seq, 0.0)
            if delay is not None:
                t = threading.Timer(delay, os.write, (self.fd, _answer(packet)))
                timers.append(t)
                t.start()
        for t in timers:
            t.join()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        os.close(self.fd)


@pytest.fixture
def netns() -> Iterator[str]:
    ns = f"mipsec-echo-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _probe(ns: str, delays: dict[int, float | None], **opts: float) -> dict[str, object]:
    responder = Responder(ns, delays)
    try:
        for cmd in (
            ["ip", "addr", "add", f"{LOCAL}/24", "dev", responder.name],
            ["ip", "link", "set", responder.name, "up"],
        ):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        args = [f"--{k}={v}" for k, v in opts.items()]
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "mipsec.core.echo"]
            + ["--bind", LOCAL, "--to", PEER, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        report: dict[str, object] = json.loads(out.stdout)
        report["exit"] = out.returncode
        return report
    finally:
        responder.close()


def test_late_replies_are_answers_not_losses(netns: str) -> None:
    # The first at once, the next two 0.5 s late: more than ping's linger.
    report = _probe(netns, {2: 0.5, 3: 0.5}, count=3, interval=0.2, wait=3)
    assert report["transmitted"] == 3 and report["received"] == 3 and report["exit"] == 0
    rtt = report["rtt_ms"]
    assert isinstance(rtt, list) and rtt[-1] >= 500


def test_a_reply_that_never_comes_is_counted_lost(netns: str) -> None:
    started = time.monotonic()
    report = _probe(netns, {2: None}, count=3, interval=0.2, wait=1)
    assert (report["transmitted"], report["received"], report["exit"]) == (3, 2, 1)
    assert time.monotonic() - started >= 1.0  # it waited the whole ``wait`` for it


def test_a_reply_after_the_wait_is_lost(netns: str) -> None:
    report = _probe(netns, {3: 2.0}, count=3, interval=0.1, wait=0.5)
    assert (report["transmitted"], report["received"]) == (3, 2)
