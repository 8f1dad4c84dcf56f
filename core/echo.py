"""ICMP echo probes for the namespace lab (``netlab.NetLab.ping``).

``ping(8)`` counts a reply as lost when it comes later than about one
interval after the last echo, as soon as any earlier reply came back:
``-W`` only applies while nothing has been answered, and ``-w`` sends more
echoes instead of waiting for the ones sent.  Through a tunnel run by user
space processes on a loaded machine, a reply 300 ms late is late, not lost;
the lab's checks want "every echo answered within ``wait`` seconds".  So:
``count`` echoes, ``interval`` apart, each answered when a reply with its
identifier and sequence number arrives before ``wait`` seconds after the
last echo was sent; done as soon as all are answered.

Raw sockets (root: the lab needs CAP_NET_ADMIN anyway); ICMPv4 checksums are
computed here, ICMPv6 ones by the kernel (RFC 3542 §3.1).

``python -m mipsec.core.echo --bind SRC --to DST [--count N] [--interval S]
[--wait S]`` prints one JSON line: ``transmitted``, ``received``, ``rtt_ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

ECHO_REQUEST: dict[int, int] = {socket.AF_INET: 8, socket.AF_INET6: 128}
ECHO_REPLY: dict[int, int] = {socket.AF_INET: 0, socket.AF_INET6: 129}


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(family: int, ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", ECHO_REQUEST[family], 0, 0, ident, seq)
    if family == socket.AF_INET6:
        return head + payload  # the kernel fills the ICMPv6 checksum in
    return (
        struct.pack("!BBHHH", ECHO_REQUEST[family], 0, checksum(head + payload), ident, seq)
        + payload
    )


def parse_reply(family: int, packet: bytes) -> tuple[int, int] | None:
    """(identifier, sequence) of an echo reply; None for anything else.

    An IPv4 raw socket delivers the IP header too, an IPv6 one does not."""
    if family == socket.AF_INET:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4 :]
    if len(packet) < 8 or packet[0] != ECHO_REPLY[family] or packet[1] != 0:
        return None
    ident, seq = struct.unpack_from("!HH", packet, 4)
    return ident, seq


def ping(bind: str, to: str, count: int, interval: float, wait: float) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in to else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    ident = int.from_bytes(os.urandom(2), "big")
    sent: dict[int, float] = {}
    rtt_ms: dict[int, float] = {}
    with socket.socket(family, socket.SOCK_RAW, proto) as s:
        s.bind((bind, 0))
        next_send = time.monotonic()
        deadline = None
        while len(rtt_ms) < count:
            now = time.monotonic()
            if len(sent) < count and now >= next_send:
                seq = len(sent) + 1
                s.sendto(echo_request(family, ident, seq, os.urandom(24)), (to, 0))
                sent[seq] = now
                next_send = now + interval
                if len(sent) == count:
                    deadline = now + wait
                continue
            until = next_send if deadline is None else deadline
            if deadline is not None and now >= deadline:
                break
            ready, _, _ = select.select([s], [], [], max(0.0, until - now))
            if not ready:
                continue
            packet, addr = s.recvfrom(65535)
            got = parse_reply(family, packet)
            if got is None or got[0] != ident or addr[0] != to or got[1] not in sent:
                continue  # someone else's ICMP: raw sockets see it all
            rtt_ms.setdefault(got[1], round((time.monotonic() - sent[got[1]]) * 1000, 3))
    return {"transmitted": len(sent), "received": len(rtt_ms), "rtt_ms": sorted(rtt_ms.values())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipsec.core.echo")
    parser.add_argument("--bind", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--wait", type=float, default=5.0)
    args = parser.parse_args(argv)
    report = ping(args.bind, args.to, args.count, args.interval, args.wait)
    print(json.dumps(report), flush=True)
    return 0 if report["received"] == report["transmitted"] else 1


if __name__ == "__main__":
    sys.exit(main())
