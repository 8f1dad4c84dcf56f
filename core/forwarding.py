"""Which tunnelled packets may pass, and where they go: the data path's rules, sans-I/O.

RFC 6618 §6.4 reverse tunnelling between the MN and its HA, with the
profile's scope rules (PROFILE §7) and DSMIP6's IPv4 home addresses (RFC
5555).  The asyncio shells (``roles/ha_data.py``, ``roles/mn_data.py``) move
octets between a TUN device and the UDP socket; every decision is made here
from octets in and octets out, so each rule is tested without a device.

HA (``HaForwarder``):

* into the home network (``inbound``, a ``DataIn`` from ``HaCore``): the SA
  or the PType 0 rule already authenticated the sender; what is left is
  the ingress filter.  The packet must fit the TUN MTU, its inner header
  must be whole (``wire/inner.py``), the MN must hold a live binding made
  under that very SA (RFC 6275 §10.3.1: the binding cache entry is what
  makes an MN "at home" behind this HA; a superseded SA of the same home
  address is not it), and the inner source must be a home address of that
  binding: its IPv6 HoA, or the IPv4 HoA that the last BU registered (RFC
  5555 §4.5) -- never any other address the MN might make up.
* out of the home network (``outbound``, a packet the TUN device gave): the
  inner destination selects the binding (IPv6 or IPv4 HoA); the packet goes
  to that binding's current care-of address and port, as observed on the
  MN's last BU (PROFILE §7, NAT-friendly), under that binding's SA: PType 1
  for ``mip6-sas`` 1, PType 0 for 0 (``HaCore.protect_data``).

MN (``MnForwarder``): packets from its TUN device leave only with one of its
home addresses as source (RFC 6618 §6.4: the inner header "uses the home
address of the MN"); packets from the HA are accepted only as the SA's scope
allows (``open_data``) and only for one of its home addresses.

Drops are silent and counted in ``drops`` by reason: ``too_big`` (larger
than the TUN MTU), ``inner_truncated``, ``inner_malformed``, ``no_binding``,
``not_hoa`` (the inner source, or on the MN the inner destination, is not a
home address of this MN), ``no_sa`` (the binding's SA ended), plus on the MN
the ESP reasons of ``wire/esp.py`` and ``scope``.
"""

from __future__ import annotations

import functools
from collections import Counter
from ipaddress import ip_address
from typing import Any, Protocol, TypeAlias

from mipsec.core.errors import PacketError
from mipsec.core.ha_core import DataIn, HaCore
from mipsec.core.wire.esp import SequenceExhausted
from mipsec.core.wire.inner import InnerHeader, parse_inner

__all__ = ["DataSA", "HaForwarder", "MnForwarder", "packed_address", "stats_line"]

Address: TypeAlias = tuple[str, int]


@functools.lru_cache(maxsize=4096)
def packed_address(address: str) -> bytes:
    """``ip_address(address).packed``, cached: bindings keep addresses as text."""
    return ip_address(address).packed


def _local_packet(packet: bytes, mtu: int, drops: Counter[str]) -> InnerHeader | None:
    """The header of a packet the local TUN device gave, or None (dropped, counted)."""
    if len(packet) > mtu:
        drops["too_big"] += 1
        return None
    try:
        return parse_inner(packet)
    except PacketError as exc:
        drops[exc.drop_reason] += 1
        return None


class HaForwarder:
    """The HA's half (see the module docstring); ``mtu`` is the TUN device's."""

    def __init__(self, core: HaCore, *, mtu: int) -> None:
        self.core = core
        self.mtu = mtu
        self.drops: Counter[str] = Counter()
        self.packets_in = 0  # into the home network
        self.packets_out = 0  # towards MNs
        self.plain_in = 0  # ... of which PType 0 (mip6-sas 0)
        self.plain_out = 0

    def inbound(self, data: DataIn, now: float) -> bytes | None:
        """The packet to write into the home network, or None (dropped, counted)."""
        payload = data.payload
        drops = self.drops
        if len(payload) > self.mtu:
            drops["too_big"] += 1
            return None
        try:
            src = parse_inner(payload, data.next_header).src
        except PacketError as exc:
            drops[exc.drop_reason] += 1
            return None
        hoa = data.hoa
        b = self.core.bindings.get(hoa) if hoa is not None else None
        # PType 1: the binding must have been made under this SA (data.spi);
        # PType 0 (spi 0): HaCore matched the binding by source and CoA.
        if b is None or b.expires_at <= now or (data.protected and b.spi != data.spi):
            drops["no_binding"] += 1
            return None
        if src != packed_address(b.hoa) and (b.ip4_hoa is None or src != packed_address(b.ip4_hoa)):
            drops["not_hoa"] += 1
            return None
        self.packets_in += 1
        if not data.protected:
            self.plain_in += 1
        return payload

    def outbound(self, packet: bytes, now: float) -> tuple[bytes, Address] | None:
        """(datagram, care-of address and port) for a home-network packet, or None."""
        drops = self.drops
        hdr = _local_packet(packet, self.mtu, drops)
        if hdr is None:
            return None
        b = self.core.bindings.by_address(hdr.dst)
        if b is None or b.expires_at <= now:
            drops["no_binding"] += 1
            return None
        try:
            datagram = self.core.protect_data(b.spi, hdr.next_header, packet, now)
        except SequenceExhausted:
            drops["seq_exhausted"] += 1  # counted as no_sa before (review)
            return None
        if datagram is None:
            drops["no_sa"] += 1
            return None
        self.packets_out += 1
        if datagram[0] < 0x10:  # PType 0
            self.plain_out += 1
        return datagram, (b.coa_host, b.coa_port)

    def stats(self) -> dict[str, object]:
        return {
            "in": self.packets_in,
            "out": self.packets_out,
            "plain_in": self.plain_in,
            "plain_out": self.plain_out,
            "drops": dict(self.drops),
        }


class DataSA(Protocol):
    """The MN's SA as the data path uses it (``MnRegistration`` implements it)."""

    def seal_data(self, next_header: int, packet: bytes) -> bytes: ...

    def open_data(self, datagram: bytes) -> tuple[int, bytes]: ...


class MnForwarder:
    """The MN's half (see the module docstring).

    ``home_addresses`` are the packed HoAs the MN may use: its IPv6 HoA and,
    once a BA acknowledged it (RFC 5555 §3.2.1), its IPv4 HoA.
    """

    def __init__(self, sa: DataSA, home_addresses: frozenset[bytes], *, mtu: int) -> None:
        self.sa = sa
        self.home_addresses = home_addresses
        self.mtu = mtu
        self.drops: Counter[str] = Counter()
        self.packets_up = 0
        self.packets_down = 0
        self.plain_up = 0  # ... of which PType 0 (mip6-sas 0)
        self.plain_down = 0

    def uplink(self, packet: bytes) -> bytes | None:
        """The datagram for the HA that carries ``packet`` (from the TUN), or None."""
        drops = self.drops
        hdr = _local_packet(packet, self.mtu, drops)
        if hdr is None:
            return None
        if hdr.src not in self.home_addresses:
            drops["not_hoa"] += 1
            return None
        try:
            datagram = self.sa.seal_data(hdr.next_header, packet)
        except SequenceExhausted:
            drops["seq_exhausted"] += 1
            return None
        self.packets_up += 1
        if datagram[0] < 0x10:  # PType 0
            self.plain_up += 1
        return datagram

    def downlink(self, datagram: bytes) -> bytes | None:
        """The packet for the TUN device inside a datagram from the HA, or None."""
        drops = self.drops
        try:
            next_header, packet = self.sa.open_data(datagram)
        except PacketError as exc:
            drops[exc.drop_reason] += 1
            return None
        if len(packet) > self.mtu:
            drops["too_big"] += 1
            return None
        try:
            dst = parse_inner(packet, next_header).dst
        except PacketError as exc:
            drops[exc.drop_reason] += 1
            return None
        if dst not in self.home_addresses:
            drops["not_hoa"] += 1
            return None
        self.packets_down += 1
        if datagram[0] < 0x10:
            self.plain_down += 1
        return packet

    def stats(self) -> dict[str, object]:
        return {
            "up": self.packets_up,
            "down": self.packets_down,
            "plain_up": self.plain_up,
            "plain_down": self.plain_down,
            "drops": dict(self.drops),
        }


def stats_line(stats: dict[str, Any]) -> str:
    """One log line's worth of counters: ``in=.. out=.. drops=reason:n,..`` (zeros left out)."""
    drops = stats.get("drops") or {}
    parts = [f"{k}={v}" for k, v in stats.items() if k != "drops" and v]
    parts.append("drops=" + (",".join(f"{k}:{v}" for k, v in sorted(drops.items())) or "none"))
    return " ".join(parts)
