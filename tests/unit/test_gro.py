"""TCP segment coalescing (mipsec.core.gro) against segments scapy builds.

A merged frame is checked the way the kernel uses it: its virtio_net_hdr
fields, its IP header (length, checksum), and its TCP checksum completed the
CHECKSUM_PARTIAL way (one's complement sum from csum_start, stored at
csum_offset) must equal the checksum scapy computes for the merged packet.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import UDP, IPv6

from mipsec.core.gro import (
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    PLAIN_HDR,
    VNET_HDR,
    VNET_HDR_LEN,
    TcpCoalescer,
    ip_checksum,
)

MSS = 1348


def v4(seq: int, size: int = MSS, flags: str = "A", **kw: object) -> bytes:
    ip = IP(src="192.0.2.1", dst="203.0.113.2", id=seq & 0xFFFF, flags="DF")
    tcp = TCP(sport=40000, dport=5201, seq=seq, ack=777, flags=flags, window=500, **kw)  # type: ignore[arg-type]
    return bytes(ip / tcp / (bytes([seq & 0xFF]) * size))


def v6(seq: int, size: int = MSS, flags: str = "A") -> bytes:
    ip = IPv6(src="2001:db8:1::1", dst="2001:db8:c0::2", fl=5)
    tcp = TCP(sport=40000, dport=5201, seq=seq, ack=777, flags=flags, window=500)
    return bytes(ip / tcp / (bytes([seq & 0xFF]) * size))


def run(packets: list[bytes]) -> list[bytes]:
    g = TcpCoalescer()
    out: list[bytes] = []
    for p in packets:
        out += g.push(p)
    out += g.flush()
    assert not g.pending
    return out


def complete_checksum(packet: bytes, start: int, offset: int) -> bytes:
    """What the kernel does with CHECKSUM_PARTIAL (skb_checksum_help)."""
    data = packet[start:] + (b"\0" if (len(packet) - start) & 1 else b"")
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    check = (~s & 0xFFFF) or 0xFFFF
    at = start + offset
    return packet[:at] + check.to_bytes(2, "big") + packet[at + 2 :]


def check_merged(frame: bytes, originals: list[bytes]) -> bytes:
    flags, gso, hdr_len, gso_size, start, offset = VNET_HDR.unpack_from(frame)
    packet = frame[VNET_HDR_LEN:]
    v6_ = packet[0] >> 4 == 6
    ihl = 40 if v6_ else 20
    assert (flags, gso, start, offset) == (NEEDS_CSUM, GSO_TCPV6 if v6_ else GSO_TCPV4, ihl, 16)
    assert hdr_len == ihl + 20 and gso_size == len(originals[0]) - hdr_len
    # The payloads, in order, and the first segment's headers.
    assert packet[hdr_len:] == b"".join(p[hdr_len:] for p in originals)
    done = complete_checksum(packet, start, offset)
    ref = (IPv6 if v6_ else IP)(done)
    if not v6_:
        assert ip_checksum(packet[:10] + b"\0\0" + packet[12:20]) == ref.chksum
        assert ref.len == len(packet) and ref.id == IP(originals[0]).id
    else:
        assert ref.plen == len(packet) - 40
    tcp = ref[TCP]
    want = tcp.chksum
    del tcp.chksum
    assert (IPv6 if v6_ else IP)(bytes(ref))[TCP].chksum == want
    assert tcp.seq == TCP(originals[0][ihl:]).seq
    return packet


@pytest.mark.parametrize("make", [v4, v6])
def test_a_run_becomes_one_gso_packet(make: object) -> None:
    segs = [make(1000 + i * MSS) for i in range(10)]  # type: ignore[operator]
    [frame] = run(segs)
    check_merged(frame, segs)


def test_short_last_segment_and_psh_end_the_run() -> None:
    segs = [v4(1000), v4(1000 + MSS), v4(1000 + 2 * MSS, size=100, flags="PA")]
    after = v4(1000 + 2 * MSS + 100)
    frames = run([*segs, after])
    assert len(frames) == 2
    merged = check_merged(frames[0], segs)
    assert TCP(merged[20:]).flags == "PA"  # PSH kept on the merged packet
    assert frames[1] == PLAIN_HDR + after


def test_a_gap_or_another_flow_starts_a_new_run() -> None:
    a = [v4(1000), v4(1000 + MSS)]
    gap = [v4(1000 + 3 * MSS), v4(1000 + 4 * MSS)]
    frames = run(a + gap)
    assert len(frames) == 2
    check_merged(frames[0], a)
    check_merged(frames[1], gap)
    other = bytes(
        IP(src="192.0.2.1", dst="203.0.113.2") / TCP(sport=1, dport=2, flags="A") / (b"x" * MSS)
    )
    frames = run([a[0], other, a[1]])
    assert frames == [PLAIN_HDR + a[0], PLAIN_HDR + other, PLAIN_HDR + a[1]]


@pytest.mark.parametrize(
    "odd",
    [
        v4(5000, flags="SA"),  # SYN
        v4(5000, flags="FA"),  # FIN
        v4(5000, size=0),  # a pure ACK
        bytes(IP(src="192.0.2.1", dst="203.0.113.2", flags="MF") / TCP(flags="A") / (b"f" * 64)),
        bytes(IP(src="192.0.2.1", dst="203.0.113.2", options=b"\x01\x01\x01\x00") / TCP() / b"o"),
        bytes(IP(src="192.0.2.1", dst="203.0.113.2") / UDP() / (b"u" * 64)),
        bytes(IP(src="192.0.2.1", dst="203.0.113.2") / ICMP()),
        bytes(IPv6(src="::1", dst="::2") / UDP() / (b"u" * 64)),
        b"\x50" * 60,
    ],
)
def test_what_is_never_merged_passes_unchanged(odd: bytes) -> None:
    assert run([odd]) == [PLAIN_HDR + odd]
    assert run([v4(1000), v4(1000 + MSS), odd])[-1] == PLAIN_HDR + odd


def test_changed_window_ack_or_ttl_splits() -> None:
    base = v4(1000)
    for change in (dict(window=501), dict(ack=778)):
        nxt = bytes(
            IP(src="192.0.2.1", dst="203.0.113.2", flags="DF", id=9)
            / TCP(
                sport=40000,
                dport=5201,
                seq=1000 + MSS,
                flags="A",
                **{"ack": 777, "window": 500, **change},
            )  # type: ignore[arg-type]
            / (b"z" * MSS)
        )
        assert run([base, nxt]) == [PLAIN_HDR + base, PLAIN_HDR + nxt]


def test_never_past_65535_octets() -> None:
    segs = [v4(1000 + i * MSS) for i in range(60)]
    frames = run(segs)
    assert len(frames) >= 2
    assert all(len(f) - VNET_HDR_LEN <= 65535 for f in frames)
    total = b"".join(f[VNET_HDR_LEN + 40 :] for f in frames)
    assert total == b"".join(s[40:] for s in segs)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, MSS), st.sampled_from(["A", "PA", "SA"])),
        max_size=12,
    )
)
def test_payload_octets_survive_in_order(steps: list[tuple[int, int, str]]) -> None:
    # Whatever mix of gaps, sizes and flags: every packet's payload leaves
    # exactly once, in order, and every merged frame is consistent.
    seq, packets = 1000, []
    for gap, size, flags in steps:
        seq += gap * MSS
        packets.append(v4(seq, size=size, flags=flags))
        seq += size
    out = run(packets)
    payload = b""
    for frame in out:
        hdr = VNET_HDR.unpack_from(frame)
        packet = frame[VNET_HDR_LEN:]
        payload += packet[40:]
        if hdr[1]:
            assert hdr[0] == NEEDS_CSUM and len(packet) <= 65535
    assert payload == b"".join(p[40:] for p in packets)
