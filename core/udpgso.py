"""Sending many datagrams in one system call: Linux UDP GSO (``UDP_SEGMENT``).

A burst of tunnelled packets is mostly a run of datagrams of one size: full
TCP segments, sealed under one SA with one padding.  ``sendmsg`` with the
``UDP_SEGMENT`` control message (linux/udp.h, Linux 4.18) hands the kernel
such a run as one buffer; the stack routes it, builds its headers and queues
it once, and splits it into datagrams as late as the device allows (or in
software).  The receiver sees ordinary datagrams, byte for byte what
separate sends would have produced.  Measured on the project's machine (1444
octets, loopback, sender CPU including the receive softirq): 3.9 µs per
datagram with one ``send`` each, 0.9 µs as runs of 32.

The kernel's rules, which ``runs`` follows: every datagram of a run has the
run's segment size except the last, which may be shorter; at most
``MAX_SEGMENTS`` datagrams (UDP_MAX_SEGMENTS was 64 before Linux 6.9); the
whole run fits one IP packet's length field.  A kernel or route that cannot
do it answers the first such send with an error (EIO, ENOPROTOOPT...): the
sender then sends that run, and every later one, one datagram at a time.
An error about one destination (EINVAL: its path MTU is below the segment
size) or one moment (a pending ICMP error) costs that run only.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_RUN_BYTES", "MAX_SEGMENTS", "UDP_SEGMENT", "GsoSender", "runs"]

UDP_SEGMENT = 103  # linux/udp.h: SOL_UDP option and control message type
MAX_SEGMENTS = 64
MAX_RUN_BYTES = 65535 - 40 - 8  # IPv6 Payload Length / IPv4 Total Length, minus the headers
_SEGMENT = struct.Struct("=H")
_NO_GSO = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
# About one destination or one moment: never turn GSO off for everyone.
_ONE_DESTINATION = frozenset(
    {errno.EINVAL, errno.EMSGSIZE, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}
)
MAX_DECLINED = 64  # runs refused in a row (any other errno) before GSO is given up


def runs(datagrams: Sequence[bytes]) -> list[list[bytes]]:
    """Split ``datagrams`` (in order) into runs one GSO send can carry."""
    out: list[list[bytes]] = []
    run: list[bytes] = []
    size = total = 0
    for d in datagrams:
        n = len(d)
        if run and n <= size and len(run) < MAX_SEGMENTS and total + n <= MAX_RUN_BYTES:
            run.append(d)
            total += n
            if n < size:  # a shorter datagram ends the run
                out.append(run)
                run = []
            continue
        if run:
            out.append(run)
        run, size, total = [d], n, n
    if run:
        out.append(run)
    return out


class GsoSender:
    """Sends datagrams on one UDP socket, runs of them per ``sendmsg`` when it can.

    ``send(datagrams, dst)``: ``dst`` None for a connected socket.  Raises
    the ``OSError`` of a failed send after trying the rest (the caller
    counts it and decides, e.g. that its care-of address went away).
    """

    __slots__ = ("declined", "enabled", "runs_sent", "sock")

    def __init__(self, sock: socket.socket, *, enabled: bool = True) -> None:
        self.sock = sock
        self.enabled = enabled
        self.runs_sent = 0
        self.declined = 0  # runs refused in a row whose datagrams then went one by one

    def send(self, datagrams: Sequence[bytes], dst: Any = None) -> int:
        """Send them all, in order; returns the number of system calls made."""
        calls = 0
        error: OSError | None = None
        for run in runs(datagrams) if self.enabled else [[d] for d in datagrams]:
            try:
                if len(run) == 1:
                    calls += 1
                    self._one(run[0], dst)
                    continue
                calls += 1
                cmsg = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(len(run[0])))]
                if dst is None:
                    self.sock.sendmsg([b"".join(run)], cmsg)
                else:
                    self.sock.sendmsg([b"".join(run)], cmsg, 0, dst)
                self.runs_sent += 1
                self.declined = 0
            except BlockingIOError as exc:
                error = exc  # the send buffer is full: this run is dropped
            except OSError as exc:
                if len(run) == 1:
                    error = exc
                    continue
                # The run again, one datagram at a time: if that works, the
                # kernel or the route cannot do UDP GSO -- stop asking.
                try:
                    for d in run:
                        calls += 1
                        self._one(d, dst)
                except OSError as again:
                    error = again  # the path itself failed (e.g. the address went away)
                else:
                    self._declined(exc)
        if error is not None:
            raise error
        return calls

    def _declined(self, exc: OSError) -> None:
        """A run failed where its datagrams one by one went through.

        Only what says the kernel or the device cannot do UDP GSO turns it
        off for good (EIO: no checksum offload; ENOPROTOOPT, EOPNOTSUPP).
        EINVAL (this destination's path MTU below the segment size),
        EMSGSIZE or a pending ICMP error (ECONNREFUSED) are about one
        destination or one moment: on the HA's socket, shared by every MN,
        one MN behind a small MTU turned GSO off for all of them (found in
        review).  Those runs go one datagram at a time, however many there
        are (one MN's download alone made 64 in a row); only a long series of
        refusals of any other kind, with no run sent between, gives up."""
        if exc.errno in _ONE_DESTINATION:
            return  # never held against the others (a count in a row was: review)
        self.declined += 1
        if exc.errno in _NO_GSO or self.declined >= MAX_DECLINED:
            self.enabled = False

    def _one(self, datagram: bytes, dst: Any) -> None:
        if dst is None:
            self.sock.send(datagram)
        else:
            self.sock.sendto(datagram, dst)
