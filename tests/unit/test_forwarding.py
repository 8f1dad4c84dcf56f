"""The data path's rules (mipsec.core.forwarding) between a real HaCore and a real
MnRegistration, no sockets, no devices: RFC 6618 §6.4, PROFILE §7, RFC 5555.

Every bad input of issue 11 has its test here: PType 1 under an SA with no
binding, an inner source that is not the bound HoA, PType 0 under
``mip6-sas`` 1, PType 0 from an unregistered address, a packet larger than
the TUN MTU, a truncated inner header, data replayed (also across an HA
restart).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet6 import UDP, IPv6
from test_ha_core import HAA, HOA, NOW, SPI
from test_ha_core import issue as ha_core_issue

from mipsec.core.bindings import BindingCache
from mipsec.core.forwarding import HaForwarder, MnForwarder
from mipsec.core.ha_core import DataIn, HaCore, Reply
from mipsec.core.mn_registration import MnRegistration, Registered, Transmit
from mipsec.core.model import IssuedSA
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire.esp import (
    NEXT_HEADER_IPV4,
    NEXT_HEADER_IPV6,
    PTYPE_DATA,
    PTYPE_PLAIN,
    InboundSA,
    OutboundSA,
    encode_plain,
    peek_header,
)

IP4_HOA = IPv4Address("192.0.2.10")
CN6, CN4 = "2001:db8:c0::2", "203.0.113.2"
MN_ADDR = ("198.51.100.10", 40000)
MOVED_ADDR = ("198.51.100.77", 40123)
MTU = 1400


def issue(
    suite: Suite = Suite.AES_128_CBC_SHA, *, scope: int = 1, spi: int = SPI, lifetime: float = 3600
) -> IssuedSA:
    return ha_core_issue(suite, spi=spi, scope=scope, lifetime=lifetime, ip4_hoa=IP4_HOA)


def up6(src: str = str(HOA), dst: str = CN6, size: int = 20) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / UDP(sport=5000, dport=7) / (b"u" * size))


def up4(src: str = str(IP4_HOA), dst: str = CN4, size: int = 20) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP() / (b"v" * size))


class Pair:
    """One MN (MnRegistration + MnForwarder) and its HA (HaCore + HaForwarder)."""

    def __init__(
        self,
        issued: IssuedSA | None = None,
        *,
        scope: int = 1,
        suite: Suite = Suite.AES_128_CBC_SHA,
        ip4: bool = True,
        ha: HaCore | None = None,
        mtu: int = MTU,
        first_sequence: int = 100,
    ) -> None:
        self.issued = issued or issue(suite, scope=scope)
        self.ha = ha or HaCore("ha1", HAA)
        self.ha.install_sa(self.issued, now=NOW)
        self.hf = HaForwarder(self.ha, mtu=mtu)
        self.mn = MnRegistration(
            self.issued,
            now=0.0,
            wall_now=datetime.fromtimestamp(NOW, UTC),
            request_ip4_hoa=ip4,
            first_sequence=first_sequence,  # not random: BU numbers must be newer (RFC 6275)
        )
        self.mf: MnForwarder | None = None
        self.t = 0.0

    def register(self, src: tuple[str, int] = MN_ADDR, *, moved: bool = False) -> Registered:
        self.t += 1
        sent = self.mn.moved(self.t) if moved else self.mn.start(self.t)
        assert isinstance(sent[0], Transmit)
        replies = [a for a in self.ha.receive(sent[0].datagram, src, NOW) if isinstance(a, Reply)]
        assert len(replies) == 1 and replies[0].dst == src
        [reg] = self.mn.receive(replies[0].datagram, self.t)
        assert isinstance(reg, Registered) and reg.status == 0
        hoas = {HOA.packed} | ({reg.ip4_hoa.packed} if reg.ip4_hoa else set())
        self.mf = MnForwarder(self.mn, frozenset(hoas), mtu=MTU)
        return reg

    def to_ha(self, datagram: bytes, src: tuple[str, int] = MN_ADDR) -> bytes | None:
        """What the HA would write into the home network for ``datagram``."""
        data = [a for a in self.ha.receive(datagram, src, NOW) if isinstance(a, DataIn)]
        assert len(data) <= 1
        return self.hf.inbound(data[0], NOW) if data else None

    def up(self, packet: bytes, src: tuple[str, int] = MN_ADDR) -> bytes | None:
        assert self.mf is not None
        datagram = self.mf.uplink(packet)
        return None if datagram is None else self.to_ha(datagram, src)

    def down(self, packet: bytes) -> tuple[bytes | None, tuple[str, int] | None]:
        assert self.mf is not None
        out = self.hf.outbound(packet, NOW)
        if out is None:
            return None, None
        datagram, dst = out
        return self.mf.downlink(datagram), dst


# ------------------------------------------------------------ the happy path


@pytest.mark.parametrize("suite", list(Suite))
@pytest.mark.parametrize("scope", [0, 1])
def test_ipv6_and_ipv4_both_ways(suite: Suite, scope: int) -> None:
    p = Pair(suite=suite, scope=scope)
    reg = p.register()
    assert reg.ip4_hoa == IP4_HOA
    for packet in (up6(), up4(), up6(size=MTU - 48)):
        assert p.up(packet) == packet
    for back in (up6(src=CN6, dst=str(HOA)), up4(src=CN4, dst=str(IP4_HOA))):
        assert p.down(back) == (back, MN_ADDR)
    # The wire carries what the scope says (RFC 6618 §6.4, PROFILE §7).
    assert p.mf is not None
    ptype, _ = peek_header(p.mf.uplink(up6()) or b"")
    assert ptype == (PTYPE_DATA if scope else PTYPE_PLAIN)
    assert p.hf.stats()["drops"] == {} and p.mf.stats()["drops"] == {}


def test_data_and_bas_share_one_sequence_space() -> None:
    p = Pair()
    p.register()
    for _ in range(100):
        assert p.down(up6(src=CN6, dst=str(HOA)))[0] is not None
    # A refresh BU after 100 data packets: its BA verifies at the MN (the HA
    # numbers BAs and data from one counter, the MN's window takes both).
    p.register(moved=True)
    assert p.mn.registered


# ------------------------------------------------------------ bad input (issue 11)


def test_protected_data_under_an_sa_without_binding() -> None:
    p = Pair()
    assert p.to_ha(p.mn.seal_data(NEXT_HEADER_IPV6, up6())) is None
    assert p.hf.drops["no_binding"] == 1


def test_protected_data_after_the_binding_expired() -> None:
    p = Pair()
    reg = p.register()
    datagram = p.mn.seal_data(NEXT_HEADER_IPV6, up6())
    data = [a for a in p.ha.receive(datagram, MN_ADDR, NOW) if isinstance(a, DataIn)]
    assert p.hf.inbound(data[0], NOW + reg.lifetime + 1) is None
    assert p.hf.drops["no_binding"] == 1


def test_protected_data_under_a_superseded_sa_of_the_same_home_address() -> None:
    ha = HaCore("ha1", HAA)
    old = Pair(issue(spi=0x111), ha=ha)
    old.register()
    new = Pair(issue(spi=0x222), ha=ha, first_sequence=200)
    new.register(src=MOVED_ADDR)
    # The binding now belongs to the new SA: the old one cannot inject data.
    assert old.to_ha(old.mn.seal_data(NEXT_HEADER_IPV6, up6())) is None
    assert old.hf.drops["no_binding"] == 1
    assert new.up(up6(), MOVED_ADDR) is not None


@pytest.mark.parametrize(
    ("next_header", "packet"),
    [
        (NEXT_HEADER_IPV6, up6(src="2001:db8:1::99")),  # another HoA of the home link
        (NEXT_HEADER_IPV6, up6(src="fe80::1")),
        (NEXT_HEADER_IPV4, up4(src="192.0.2.11")),
        (NEXT_HEADER_IPV4, up4(src="10.0.0.1")),
    ],
)
def test_inner_source_not_the_bound_home_address(next_header: int, packet: bytes) -> None:
    p = Pair()
    p.register()
    # Sealed by the SA itself (an MN that lies), past the MN's own filter.
    assert p.to_ha(p.mn.seal_data(next_header, packet)) is None
    assert p.hf.drops == {"not_hoa": 1}


def test_ipv4_home_address_only_once_a_bu_registered_it() -> None:
    p = Pair(ip4=False)
    reg = p.register()
    assert reg.ip4_hoa is None
    assert p.to_ha(p.mn.seal_data(NEXT_HEADER_IPV4, up4())) is None
    assert p.hf.drops["not_hoa"] == 1
    # Nor does the home network's answer go anywhere.
    assert p.hf.outbound(up4(src=CN4, dst=str(IP4_HOA)), NOW) is None
    assert p.hf.drops["no_binding"] == 1


def test_plain_data_under_scope_1() -> None:
    p = Pair(scope=1)
    p.register()
    assert p.to_ha(encode_plain(up6())) is None
    assert p.ha.drops["scope"] == 1
    # ... and at the MN, a PType 0 "from the HA" is dropped too.
    assert p.mf is not None
    assert p.mf.downlink(encode_plain(up6(src=CN6, dst=str(HOA)))) is None
    assert p.mf.drops["scope"] == 1


def test_protected_data_under_scope_0() -> None:
    p = Pair(scope=0)
    p.register()
    sa = p.issued.sa
    info = SUITES[sa.suite]
    out = OutboundSA(info, sa.mn_to_ha_ikey, sa.mn_to_ha_ekey, sa.spi, initial_seq=50)
    assert p.to_ha(out.protect(PTYPE_DATA, NEXT_HEADER_IPV6, up6())) is None
    assert p.ha.drops["scope"] == 1
    # The MN, likewise, takes no PType 1 under a scope-0 SA.
    back = OutboundSA(info, sa.ha_to_mn_ikey, sa.ha_to_mn_ekey, sa.spi, initial_seq=50)
    assert p.mf is not None
    assert p.mf.downlink(back.protect(PTYPE_DATA, 41, up6(src=CN6, dst=str(HOA)))) is None
    assert p.mf.drops["scope"] == 1


def test_plain_data_from_an_unregistered_address() -> None:
    p = Pair(scope=0)
    assert p.to_ha(encode_plain(up6())) is None  # nothing registered yet
    p.register()
    assert p.to_ha(encode_plain(up6()), MOVED_ADDR) is None  # not the binding's CoA
    assert p.to_ha(encode_plain(up6()), (MN_ADDR[0], MN_ADDR[1] + 1)) is None  # nor its port
    assert p.to_ha(encode_plain(up6(src="2001:db8:1::99"))) is None  # nor its HoA
    assert p.ha.drops["scope"] == 4
    assert p.to_ha(encode_plain(up6())) == up6()


def test_packet_larger_than_the_tun_mtu() -> None:
    small = Pair(mtu=1280)
    small.register()
    big = up6(size=1300)
    assert small.to_ha(small.mn.seal_data(NEXT_HEADER_IPV6, big)) is None
    assert small.hf.drops["too_big"] == 1
    assert small.hf.outbound(up6(src=CN6, dst=str(HOA), size=1300), NOW) is None
    assert small.hf.drops["too_big"] == 2
    # The MN's own MTU, both ways.
    p = Pair()
    p.register()
    assert p.mf is not None
    assert p.mf.uplink(up6(size=MTU)) is None
    assert p.mf.drops["too_big"] == 1
    big_hf = HaForwarder(p.ha, mtu=9000)
    out = big_hf.outbound(up6(src=CN6, dst=str(HOA), size=MTU), NOW)
    assert out is not None
    assert p.mf.downlink(out[0]) is None
    assert p.mf.drops["too_big"] == 2


@pytest.mark.parametrize(
    ("next_header", "packet", "why"),
    [
        (NEXT_HEADER_IPV6, up6()[:30], "inner_truncated"),
        (NEXT_HEADER_IPV4, up4()[:12], "inner_truncated"),
        (NEXT_HEADER_IPV6, b"", "inner_truncated"),
        (NEXT_HEADER_IPV6, up6()[:-3], "inner_malformed"),  # Payload Length lies
        (NEXT_HEADER_IPV6, up4(), "inner_malformed"),  # Next Header says IPv6
    ],
)
def test_truncated_or_inconsistent_inner_header(next_header: int, packet: bytes, why: str) -> None:
    p = Pair()
    p.register()
    assert p.to_ha(p.mn.seal_data(next_header, packet)) is None
    assert p.hf.drops == {why: 1}


def test_data_replayed() -> None:
    p = Pair()
    p.register()
    datagram = p.mn.seal_data(NEXT_HEADER_IPV6, up6())
    assert p.to_ha(datagram) == up6()
    assert p.to_ha(datagram) is None
    assert p.to_ha(datagram, MOVED_ADDR) is None  # from elsewhere: the same replay
    assert p.ha.drops["replay"] == 2
    # The MN's window guards the other direction.
    out = p.hf.outbound(up6(src=CN6, dst=str(HOA)), NOW)
    assert out is not None and p.mf is not None
    assert p.mf.downlink(out[0]) is not None
    assert p.mf.downlink(out[0]) is None
    assert p.mf.drops["replay"] == 1


def _restart(path: Path, issued: IssuedSA) -> HaCore:
    ha = HaCore("ha1", HAA, bindings=BindingCache(path))
    ha.install_sa(issued, now=NOW)
    return ha


def test_data_sent_before_the_last_bu_is_replayed_after_an_ha_restart(tmp_path: Path) -> None:
    path = tmp_path / "bindings.sqlite"
    p = Pair(ha=HaCore("ha1", HAA, bindings=BindingCache(path)))
    p.register()
    early = p.mn.seal_data(NEXT_HEADER_IPV6, up6())
    assert p.to_ha(early) == up6()
    p.register(moved=True)  # a BU after the data: its ESP number is persisted
    p.ha.bindings.close()
    ha = _restart(path, p.issued)
    assert [a for a in ha.receive(early, MN_ADDR, NOW) if isinstance(a, DataIn)] == []
    assert ha.drops["replay"] == 1


def test_data_sent_after_the_last_bu_is_replayed_after_an_ha_restart(tmp_path: Path) -> None:
    path = tmp_path / "bindings.sqlite"
    p = Pair(ha=HaCore("ha1", HAA, bindings=BindingCache(path)))
    p.register()
    late = p.mn.seal_data(NEXT_HEADER_IPV6, up6())
    assert p.to_ha(late) == up6()
    p.ha.bindings.close()
    ha = _restart(path, p.issued)
    assert [a for a in ha.receive(late, MN_ADDR, NOW) if isinstance(a, DataIn)] == []


# ------------------------------------------------------------ where return traffic goes


def test_home_network_packet_without_a_binding() -> None:
    p = Pair()
    assert p.hf.outbound(up6(src=CN6, dst=str(HOA)), NOW) is None
    reg = p.register()
    assert p.hf.outbound(up6(src=CN6, dst="2001:db8:1::99"), NOW) is None  # nobody's HoA
    assert p.hf.outbound(up6(src=CN6, dst=str(HOA)), NOW + reg.lifetime + 1) is None  # expired
    assert p.hf.drops["no_binding"] == 3


def test_return_traffic_follows_the_care_of_address_after_the_next_bu() -> None:
    p = Pair()
    p.register()
    back = up6(src=CN6, dst=str(HOA))
    # Data from a new address (a NAT rebinding, say) is accepted -- the SA
    # authenticates it -- but the binding moves only with a BU (PROFILE §8).
    assert p.up(up6(), MOVED_ADDR) == up6()
    assert p.down(back) == (back, MN_ADDR)
    p.register(MOVED_ADDR, moved=True)
    assert p.down(back) == (back, MOVED_ADDR)


def test_mn_sends_only_from_its_home_addresses() -> None:
    p = Pair(ip4=False)
    p.register()
    assert p.mf is not None
    assert p.mf.uplink(up6(src="fe80::1", dst="ff02::2")) is None  # e.g. a router solicitation
    assert p.mf.uplink(up4()) is None  # the IPv4 HoA was not acknowledged
    assert p.mf.uplink(up6()[:39]) is None
    assert p.mf.drops == {"not_hoa": 2, "inner_truncated": 1}


def test_mn_accepts_only_packets_for_its_home_addresses() -> None:
    p = Pair()
    p.register()
    assert p.mf is not None
    stray = p.ha.protect_data(SPI, NEXT_HEADER_IPV6, up6(src=CN6, dst="2001:db8:1::99"), NOW)
    assert stray is not None
    assert p.mf.downlink(stray) is None
    assert p.mf.drops["not_hoa"] == 1


def test_mn_drops_a_forged_datagram() -> None:
    p = Pair()
    p.register()
    assert p.mf is not None
    sa = p.issued.sa
    forged = OutboundSA(
        SUITES[sa.suite], os.urandom(20), os.urandom(16), sa.spi, initial_seq=9
    ).protect(PTYPE_DATA, 41, up6(src=CN6, dst=str(HOA)))
    assert p.mf.downlink(forged) is None
    assert p.mf.drops["bad_icv"] == 1


def test_ha_protect_data_refuses_unknown_and_ended_sas() -> None:
    p = Pair()
    assert p.ha.protect_data(0x999, NEXT_HEADER_IPV6, up6(), NOW) is None
    assert p.ha.protect_data(SPI, NEXT_HEADER_IPV6, up6(), NOW + 7200) is None
    datagram = p.ha.protect_data(SPI, NEXT_HEADER_IPV6, up6(), NOW)
    assert datagram is not None
    sa = p.issued.sa
    inb = InboundSA(SUITES[sa.suite], sa.ha_to_mn_ikey, sa.ha_to_mn_ekey, sa.spi)
    assert inb.unprotect(datagram).payload == up6()


@pytest.mark.parametrize("direction", ["down", "up"])
def test_an_sa_not_loaded_yet_is_loaded_by_its_first_data_packet(
    tmp_path: Path, direction: str
) -> None:
    """An HA restarted with many SAs serves before it has loaded them all:
    the core asks ``load_missing`` for an SPI it does not hold -- on the
    home-network side (return traffic to a bound MN) as on the MN's side --
    and the packet goes through once that SA is installed."""
    path = tmp_path / "bindings.sqlite"
    p = Pair(ha=HaCore("ha1", HAA, bindings=BindingCache(path)))
    p.register()
    p.ha.bindings.close()
    ha = HaCore("ha1", HAA, bindings=BindingCache(path))  # restarted: the SA not loaded
    asked: list[int] = []

    def load_missing(spi: int) -> None:
        asked.append(spi)
        ha.install_sa(p.issued, now=NOW)

    ha.load_missing = load_missing
    p.ha, p.hf = ha, HaForwarder(ha, mtu=MTU)
    if direction == "down":
        assert p.down(up6(src=CN6, dst=str(HOA)))[0] == up6(src=CN6, dst=str(HOA))
    else:
        # The MN's BU from a new address (its data right after a restart is
        # refused below the reserved mark, by design: test_..._replayed_...).
        assert p.register(MOVED_ADDR, moved=True).status == 0
    assert asked == [p.issued.sa.spi]
    ha.load_missing = None  # the load is over: an unknown SPI is unknown
    assert ha.protect_data(p.issued.sa.spi + 1, NEXT_HEADER_IPV6, up6(), NOW) is None
