"""TCP segment coalescing for writes to a TUN device (GRO in user space), sans-I/O.

Why: every packet written to a TUN device runs through the host's IP stack on
its own -- routing, then TCP receive processing (or forwarding), and one ACK
for every second segment, which the tunnel then carries back.  Linux's NIC
drivers avoid that with GRO: in-order segments of one TCP flow are merged
into one large packet before the stack sees them.  A TUN device opened with
``IFF_VNET_HDR`` accepts such a merged packet from user space, described by a
``struct virtio_net_hdr`` in front of it (include/uapi/linux/virtio_net.h):
``gso_type`` TCPV4/TCPV6, ``gso_size`` = the segments' payload size, and
``NEEDS_CSUM`` with ``csum_start``/``csum_offset`` pointing at the TCP
checksum, which then holds only the pseudo-header sum (the kernel's
CHECKSUM_PARTIAL convention).  The stack treats it as the GRO packet it
would have built itself, and splits it again (GSO) if it forwards it.

What is merged (the rules of the kernel's own tcp_gro_receive, stricter where
simpler): consecutive packets of one run, each IPv4 without options or
fragmentation, or IPv6 with TCP as its first Next Header; TCP with ACK and
nothing else but PSH, carrying data; the same addresses, ports, TOS/traffic
class, flow label, TTL/hop limit, DF, ACK number, window and options;
sequence numbers following on exactly; every segment as long as the first,
except the last, which may be shorter (as may one with PSH, which also ends
the run).  Anything else is written as it came, with an all-zero header.  A
run never grows past 65535 octets (the IP length fields).

Every tunnelled packet was authenticated by the SA's ICV before it gets
here, so the per-segment TCP checksums are not re-verified: the merged
packet's checksum is left to the kernel (``NEEDS_CSUM``), as a NIC's GRO
leaves it to the NIC's checksum offload.
"""

from __future__ import annotations

import struct

__all__ = [
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "NEEDS_CSUM",
    "PLAIN_HDR",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "TcpCoalescer",
    "ip_checksum",
]

# include/uapi/linux/virtio_net.h: flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset; little-endian (virtio 1.0, and native on the x86
# and arm64 hosts this runs on; TUNSETVNETLE is not needed there).
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size  # 10
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
PLAIN_HDR = bytes(VNET_HDR_LEN)
MAX_PACKET = 65535
_ACK, _PSH = 0x10, 0x08
_TCP_CSUM_OFFSET = 16  # RFC 9293 §3.1: Checksum at octet 16 of the TCP header


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum16(data: bytes) -> int:
    """One's complement sum (RFC 1071) of an even number of octets, unfolded."""
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def ip_checksum(header: bytes) -> int:
    """RFC 791 header checksum of ``header`` (its checksum field zeroed)."""
    return ~_fold(_sum16(header)) & 0xFFFF


class TcpCoalescer:
    """Merges runs of in-order TCP segments (see the module docstring).

    ``push(packet)`` returns the frames (virtio_net_hdr + packet) to write now,
    in order; ``flush()`` the one still being built.  Call ``flush`` at the
    end of every burst: a run is only held while more of it may follow.
    """

    __slots__ = ("_first", "_hl", "_ihl", "_key", "_mss", "_next_seq", "_parts", "_psh", "_size")

    def __init__(self) -> None:
        self._first: bytes | None = None
        self._parts: list[bytes] = []  # payloads after the first segment's
        self._key = b""
        self._next_seq = 0
        self._mss = 0
        self._size = 0
        self._hl = 0
        self._ihl = 0
        self._psh = False

    @property
    def pending(self) -> bool:
        return self._first is not None

    def push(self, packet: bytes) -> list[bytes]:
        n = len(packet)
        version = packet[0] >> 4 if n else 0
        if version == 4:
            # No options (IHL 5), TCP, neither MF nor a fragment offset.
            if n <= 40 or packet[0] != 0x45 or packet[9] != 6 or packet[6] & 0x3F or packet[7]:
                return self._pass(packet)
            ihl = 20
            ip_key = packet[1:2] + packet[6:10] + packet[12:20]
        elif version == 6:
            if n <= 60 or packet[6] != 6:
                return self._pass(packet)
            ihl = 40
            ip_key = packet[0:4] + packet[6:40]
        else:
            return self._pass(packet)
        hl = ihl + (packet[ihl + 12] >> 4) * 4
        flags = packet[ihl + 13]
        if hl < ihl + 20 or hl >= n or flags & ~_PSH != _ACK:
            return self._pass(packet)
        # Ports, ACK number, data offset, window, urgent pointer and options;
        # not the sequence number, the flags or the checksum.
        key = (
            ip_key
            + packet[ihl : ihl + 4]
            + packet[ihl + 8 : ihl + 13]
            + packet[ihl + 14 : ihl + 16]
            + packet[ihl + 18 : hl]
        )
        seq = int.from_bytes(packet[ihl + 4 : ihl + 8], "big")
        plen = n - hl
        psh = bool(flags & _PSH)
        out: list[bytes] = []
        if self._first is not None:
            if (
                key == self._key
                and seq == self._next_seq
                and plen <= self._mss
                and self._size + plen <= MAX_PACKET
            ):
                self._parts.append(packet[hl:])
                self._size += plen
                self._next_seq = (seq + plen) & 0xFFFFFFFF
                if plen < self._mss or psh:
                    self._psh = psh
                    return self.flush()
                return out
            out = self.flush()
        if psh:
            out.append(PLAIN_HDR + packet)
            return out
        self._first = packet
        self._key = key
        self._next_seq = (seq + plen) & 0xFFFFFFFF
        self._mss = plen
        self._size = n
        self._hl = hl
        self._ihl = ihl
        self._psh = False
        return out

    def _pass(self, packet: bytes) -> list[bytes]:
        out = self.flush()
        out.append(PLAIN_HDR + packet)
        return out

    def flush(self) -> list[bytes]:
        first = self._first
        if first is None:
            return []
        self._first = None
        parts = self._parts
        if not parts:
            return [PLAIN_HDR + first]
        self._parts = []
        hl, ihl = self._hl, self._ihl
        hdr = bytearray(first[:hl])
        total = self._size
        if ihl == 40:
            hdr[4:6] = (total - 40).to_bytes(2, "big")
            pseudo = _sum16(bytes(hdr[8:40]))
            gso = GSO_TCPV6
        else:
            hdr[2:4] = total.to_bytes(2, "big")
            hdr[10:12] = b"\0\0"
            hdr[10:12] = ip_checksum(bytes(hdr[:20])).to_bytes(2, "big")
            pseudo = _sum16(bytes(hdr[12:20]))
            gso = GSO_TCPV4
        if self._psh:
            hdr[ihl + 13] |= _PSH
        # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum
        # (protocol 6 and the TCP length), not its complement.
        hdr[ihl + 16 : ihl + 18] = _fold(pseudo + 6 + total - ihl).to_bytes(2, "big")
        vnet = VNET_HDR.pack(NEEDS_CSUM, gso, hl, self._mss, ihl, _TCP_CSUM_OFFSET)
        return [b"".join((vnet, hdr, first[hl:], *parts))]
