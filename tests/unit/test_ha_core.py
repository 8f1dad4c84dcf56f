"""HaCore (mipsec.core.ha_core) and BindingCache (mipsec.core.bindings), no sockets.

The MN side is built from the codecs alone (OutboundSA/InboundSA + encode_mh,
decode_mh) so every BA is checked the way an MN would check it: ICV, replay
window, decryption, padding, MH checksum with the BA pseudo-header (PROFILE
§7-§8).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.bindings import Binding, BindingCache
from mipsec.core.crypto import SuiteCrypto
from mipsec.core.errors import PacketError
from mipsec.core.ha_core import (
    MAX_DELETE_BCE_TIMEOUT,
    OUT_SEQ_RESERVE,
    AddressTaken,
    BindingChanged,
    DataIn,
    HaCore,
    NeedSA,
    Reply,
    SpiWithdrawn,
)
from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire.esp import (
    NEXT_HEADER_DSTOPTS,
    NEXT_HEADER_IPV4,
    NEXT_HEADER_IPV6,
    NEXT_HEADER_MH,
    PTYPE_DATA,
    PTYPE_MH,
    SEQ_REINIT_THRESHOLD,
    InboundSA,
    OutboundSA,
    encode_plain,
)
from mipsec.core.wire.mh import (
    AlternateCareOfAddress,
    BindingAck,
    BindingUpdate,
    IPv4AddressAck,
    IPv4HomeAddressRequest,
    MobilityOption,
    UnknownOption,
    decode_mh,
    encode_mh,
)

NOW = 1_800_000_000.0
HAA = IPv6Address("2001:db8::1")
HOA = IPv6Address("2001:db8:1::10")
OTHER_HOA = IPv6Address("2001:db8:1::99")
IP4_HOA = IPv4Address("10.1.0.10")
MN_ADDR = ("192.0.2.7", 40000)
SPI = 0x0123456


def issue(
    suite: Suite = Suite.AES_128_CBC_SHA256,
    *,
    spi: int = SPI,
    scope: int = 1,
    lifetime: float = 3600,
    hoa: IPv6Address | None = HOA,
    ip4_hoa: IPv4Address | None = IP4_HOA,
    ip4_hnp: IPv4Network | None = None,
) -> IssuedSA:
    info = SUITES[suite]
    sa = SecurityAssociation(
        spi=spi,
        mn_id="alice@home.example",
        suite=suite,
        scope=scope,
        validity_end=datetime.fromtimestamp(NOW + lifetime, UTC),
        mn_to_ha_ikey=os.urandom(info.ikey_len),
        ha_to_mn_ikey=os.urandom(info.ikey_len),
        mn_to_ha_ekey=os.urandom(info.ekey_len),
        ha_to_mn_ekey=os.urandom(info.ekey_len),
        ha_id="ha1",
    )
    bs = BootstrapData(haa_ip6=HAA, ip6_hoa=hoa, ip4_hoa=ip4_hoa, ip4_hnp=ip4_hnp)
    return IssuedSA(sa, bs)


class MN:
    """The MN end of one SA, from the codecs only."""

    def __init__(self, issued: IssuedSA, *, initial_seq: int = 0) -> None:
        sa = issued.sa
        info = SUITES[sa.suite]
        self.issued = issued
        self.out = OutboundSA(
            info, sa.mn_to_ha_ikey, sa.mn_to_ha_ekey, sa.spi, initial_seq=initial_seq
        )
        self.inb = InboundSA(info, sa.ha_to_mn_ikey, sa.ha_to_mn_ekey, sa.spi)
        self.hoa = issued.bootstrap.ip6_hoa or IPv6Address("::")
        self.haa = issued.bootstrap.haa_ip6 or IPv6Address("::")

    def mh(self, seq: int, lifetime: int = 100, *, h: bool = True, **kw: object) -> bytes:
        bu = BindingUpdate(sequence=seq, a=True, h=h, lifetime=lifetime, **kw)  # type: ignore[arg-type]
        return encode_mh(bu, src=self.hoa, dst=self.haa)

    def bu(
        self,
        seq: int,
        lifetime: int = 100,
        *,
        h: bool = True,
        options: tuple[MobilityOption, ...] = (),
    ) -> bytes:
        return self.out.protect(
            PTYPE_MH, NEXT_HEADER_MH, self.mh(seq, lifetime, h=h, options=options)
        )

    def ba(self, actions: Sequence[object]) -> BindingAck:
        replies = [a for a in actions if isinstance(a, Reply)]
        assert len(replies) == 1, actions
        u = self.inb.unprotect(replies[0].datagram)
        assert (u.ptype, u.next_header) == (PTYPE_MH, NEXT_HEADER_MH)
        decoded = decode_mh(u.payload, src=self.haa, dst=self.hoa)
        assert decoded.checksum_ok  # the HA used the BA pseudo-header (PROFILE §8)
        assert isinstance(decoded.message, BindingAck)
        return decoded.message


def core(**kw: object) -> HaCore:
    return HaCore("ha1", HAA, None, **kw)  # type: ignore[arg-type]


def setup(suite: Suite = Suite.AES_128_CBC_SHA256, **kw: object) -> tuple[HaCore, MN]:
    ha_kw = {k: kw.pop(k) for k in ("pull", "max_binding_lifetime", "bindings") if k in kw}
    ha = core(**ha_kw)
    issued = issue(suite, **kw)  # type: ignore[arg-type]
    assert ha.install_sa(issued)
    return ha, MN(issued)


def events(actions: Sequence[object]) -> list[BindingChanged]:
    return [a for a in actions if isinstance(a, BindingChanged)]


def ipv6_packet(src: IPv6Address, dst: IPv6Address = IPv6Address("2001:db8:99::1")) -> bytes:
    # Version 6, payload length 0, Next Header 59 (none), hop limit 64.
    return bytes([0x60, 0, 0, 0, 0, 0, 59, 64]) + src.packed + dst.packed


def ipv4_packet(src: IPv4Address, dst: IPv4Address = IPv4Address("198.51.100.1")) -> bytes:
    return bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, 59, 0, 0]) + src.packed + dst.packed


def dstopts_hoa(hoa: IPv6Address) -> bytes:
    # RFC 2460 §4.6 header, Next Header 135, Hdr Ext Len 2 (24 octets): PadN(4)
    # puts the Home Address option (RFC 6275 §6.3) at its 8n+6 alignment.
    return bytes([NEXT_HEADER_MH, 2, 1, 2, 0, 0, 201, 16]) + hoa.packed


# ------------------------------------------------------------ registration


@pytest.mark.parametrize("suite", list(Suite))
def test_bu_accepted_and_ba_verifies_at_the_mn(suite: Suite) -> None:
    ha, mn = setup(suite)
    actions = ha.receive(mn.bu(7, lifetime=100), MN_ADDR, NOW)
    ba = mn.ba(actions)
    assert (ba.status, ba.sequence, ba.lifetime, ba.k) == (0, 7, 100, False)
    assert [a.dst for a in actions if isinstance(a, Reply)] == [MN_ADDR]
    assert events(actions) == [BindingChanged("added", str(HOA), MN_ADDR, 400, SPI)]
    b = ha.binding(str(HOA))
    assert b is not None
    assert (b.coa, b.spi, b.sequence, b.lifetime, b.expires_at) == (MN_ADDR, SPI, 7, 400, NOW + 400)
    # A refresh from a new care-of address (the MN moved, or a NAT rebound).
    moved = ("198.51.100.3", 5555)
    actions = ha.receive(mn.bu(8, lifetime=100), moved, NOW + 10)
    assert mn.ba(actions).status == 0
    assert [a.dst for a in actions if isinstance(a, Reply)] == [moved]
    assert events(actions) == [BindingChanged("refreshed", str(HOA), moved, 400, SPI, MN_ADDR)]
    assert ha.stats()["ba"] == {0: 2}
    assert ha.stats()["bu"] == 2 and ha.stats()["bindings"] == 1


def test_ba_sent_whatever_the_a_flag_says() -> None:
    ha, mn = setup()
    octets = encode_mh(BindingUpdate(sequence=1, a=False, h=True, lifetime=10), src=HOA, dst=HAA)
    ba = mn.ba(ha.receive(mn.out.protect(PTYPE_MH, NEXT_HEADER_MH, octets), MN_ADDR, NOW))
    assert ba.status == 0  # RFC 6275 §10.3.1 "Regardless of the setting of the A bit"


def test_lifetime_capped_by_policy_and_sa_validity() -> None:
    ha, mn = setup(max_binding_lifetime=60.0)
    assert mn.ba(ha.receive(mn.bu(1, lifetime=1000), MN_ADDR, NOW)).lifetime == 15
    ha, mn = setup(lifetime=1000.0)  # 1000 s of SA left at NOW
    ba = mn.ba(ha.receive(mn.bu(1, lifetime=0xFFFF), MN_ADDR, NOW + 1))
    assert ba.lifetime == 999 // 4  # rounded down: never past the SA's validity end
    b = ha.binding(str(HOA))
    assert b is not None and b.expires_at <= NOW + 1000


def test_alternate_care_of_address_option() -> None:
    ha, mn = setup()
    alt = IPv6Address("2001:db8:77::5")
    actions = ha.receive(mn.bu(1, options=(AlternateCareOfAddress(alt),)), MN_ADDR, NOW)
    assert mn.ba(actions).status == 0
    assert events(actions)[0].coa == (str(alt), MN_ADDR[1])
    # The BA still goes where the BU came from (PROFILE §7).
    assert [a.dst for a in actions if isinstance(a, Reply)] == [MN_ADDR]


def test_ipv6_source_tuple_with_flowinfo_and_scope() -> None:
    ha, mn = setup()
    actions = ha.receive(mn.bu(1), ("2001:db8:5::1", 4000, 0, 0), NOW)
    assert [a.dst for a in actions if isinstance(a, Reply)] == [("2001:db8:5::1", 4000)]


# ------------------------------------------------------------ sequence numbers


def test_old_sequence_gets_135_with_last_accepted() -> None:
    ha, mn = setup()
    assert mn.ba(ha.receive(mn.bu(10), MN_ADDR, NOW)).status == 0
    for stale in (10, 9, 0, (10 + 32768) & 0xFFFF):  # RFC 6275 §9.5.1 modulo 2**16
        ba = mn.ba(ha.receive(mn.bu(stale), MN_ADDR, NOW))
        assert (ba.status, ba.sequence) == (135, 10), stale
    b = ha.binding(str(HOA))
    assert b is not None and b.sequence == 10
    assert mn.ba(ha.receive(mn.bu(11), MN_ADDR, NOW)).status == 0
    assert ha.stats()["ba"] == {0: 2, 135: 4}


def test_sequence_wraps_modulo_2_16() -> None:
    ha, mn = setup()
    assert mn.ba(ha.receive(mn.bu(0xFFFF), MN_ADDR, NOW)).status == 0
    assert mn.ba(ha.receive(mn.bu(0), MN_ADDR, NOW)).status == 0
    b = ha.binding(str(HOA))
    assert b is not None and b.sequence == 0


# ------------------------------------------------------------ home address


def test_home_address_option_for_another_hoa_gets_133() -> None:
    ha, mn = setup()
    payload = dstopts_hoa(OTHER_HOA) + mn.mh(1)
    actions = ha.receive(mn.out.protect(PTYPE_MH, NEXT_HEADER_DSTOPTS, payload), MN_ADDR, NOW)
    ba = mn.ba(actions)
    assert (ba.status, ba.sequence) == (133, 1)
    assert events(actions) == [] and len(ha.bindings) == 0


def test_home_address_option_equal_to_the_sas_is_accepted() -> None:
    ha, mn = setup()
    payload = dstopts_hoa(HOA) + mn.mh(1)
    actions = ha.receive(mn.out.protect(PTYPE_MH, NEXT_HEADER_DSTOPTS, payload), MN_ADDR, NOW)
    assert mn.ba(actions).status == 0
    assert ha.binding(str(HOA)) is not None


def test_destination_options_that_must_discard_are_malformed() -> None:
    ha, mn = setup()
    # Option type 0xC2 (action bits 11: discard) that this HA does not know.
    bad = bytes([NEXT_HEADER_MH, 0, 0xC2, 4, 0, 0, 0, 0])
    actions = ha.receive(
        mn.out.protect(PTYPE_MH, NEXT_HEADER_DSTOPTS, bad + mn.mh(1)), MN_ADDR, NOW
    )
    assert actions == [] and ha.drops["malformed"] == 1


def test_sa_without_home_address_gets_133() -> None:
    ha, mn = setup(hoa=None, ip4_hoa=None)
    assert mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW)).status == 133


def test_h_flag_clear() -> None:
    ha, mn = setup()
    # No binding: RFC 6275 §9.5.1 demands RR data this HA never has -> silent drop.
    assert ha.receive(mn.bu(1, h=False), MN_ADDR, NOW) == []
    assert ha.drops["not_home_registration"] == 1
    assert mn.ba(ha.receive(mn.bu(2), MN_ADDR, NOW)).status == 0
    # With a home registration in place the flag may not change: 139.
    assert mn.ba(ha.receive(mn.bu(3, h=False), MN_ADDR, NOW)).status == 139


def test_nonce_indices_with_h_flag_dropped() -> None:
    ha, mn = setup()
    nonce = UnknownOption(5, bytes(4))
    assert ha.receive(mn.bu(1, options=(nonce,)), MN_ADDR, NOW) == []
    assert ha.drops["malformed"] == 1


# ------------------------------------------------------------ de-registration and expiry


def test_deregistration_deletes_the_binding() -> None:
    ha, mn = setup()
    mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW))
    actions = ha.receive(mn.bu(2, lifetime=0), MN_ADDR, NOW + 5)
    ba = mn.ba(actions)
    assert (ba.status, ba.sequence, ba.lifetime) == (0, 2, 0)
    assert events(actions) == [BindingChanged("deleted", str(HOA), MN_ADDR, 0, SPI)]
    assert ha.binding(str(HOA)) is None and len(ha.bindings) == 0
    # RFC 6275 §10.3.2: a delayed older BU must not re-create the binding.
    ba = mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW + 6))
    assert (ba.status, ba.sequence) == (135, 2)
    # A newer de-registration while the entry is still guarded: success again.
    assert mn.ba(ha.receive(mn.bu(3, lifetime=0), MN_ADDR, NOW + 7)).status == 0
    # Once MAX_DELETE_BCE_TIMEOUT passed there is nothing to de-register: 133.
    ha.expire(NOW + 7 + MAX_DELETE_BCE_TIMEOUT)
    assert mn.ba(ha.receive(mn.bu(4, lifetime=0), MN_ADDR, NOW + 30)).status == 133
    # And any sequence number may start a new registration.
    assert mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW + 31)).status == 0


def test_binding_expiry() -> None:
    ha, mn = setup()
    mn.ba(ha.receive(mn.bu(1, lifetime=25), MN_ADDR, NOW))  # 100 s
    assert ha.expire(NOW + 99) == []
    assert ha.next_expiry() == NOW + 100
    assert ha.expire(NOW + 100) == [BindingChanged("expired", str(HOA), MN_ADDR, 100, SPI)]
    assert len(ha.bindings) == 0 and ha.has_spi(SPI)


def test_refresh_moves_the_expiry() -> None:
    ha, mn = setup()
    mn.ba(ha.receive(mn.bu(1, lifetime=25), MN_ADDR, NOW))
    mn.ba(ha.receive(mn.bu(2, lifetime=25), MN_ADDR, NOW + 50))
    assert ha.expire(NOW + 100) == []
    assert [e.event for e in ha.expire(NOW + 150)] == ["expired"]


def test_expired_sa_is_dropped_and_removed() -> None:
    ha, mn = setup(lifetime=100.0)
    mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW))
    assert ha.receive(mn.bu(2), MN_ADDR, NOW + 100) == []
    assert ha.drops["expired_sa"] == 1
    evs = ha.expire(NOW + 100)
    assert not ha.has_spi(SPI)
    assert [e.event for e in evs] == ["expired"]  # its binding ended with it


def test_remove_sa_deletes_its_binding() -> None:
    ha, mn = setup()
    mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW))
    assert [e.event for e in ha.remove_sa(SPI)] == ["deleted"]
    assert not ha.has_spi(SPI) and len(ha.bindings) == 0
    assert ha.remove_sa(SPI) == []


# ------------------------------------------------------------ 176 REINIT_SA_WITH_HAC


def test_176_when_sa_validity_end_is_near() -> None:
    ha, mn = setup(lifetime=3600.0)
    assert mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW + 3600 - 61)).status == 0
    actions = ha.receive(mn.bu(2), MN_ADDR, NOW + 3600 - 59)
    ba = mn.ba(actions)
    assert (ba.status, ba.lifetime) == (176, 59 // 4)
    assert [e.event for e in events(actions)] == ["refreshed"]  # still processed


def test_176_when_mn_sequence_passed_threshold() -> None:
    ha = core()
    issued = issue()
    ha.install_sa(issued)
    mn = MN(issued, initial_seq=SEQ_REINIT_THRESHOLD - 1)
    assert mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW)).status == 0
    actions = ha.receive(mn.bu(2), MN_ADDR, NOW)  # ESP sequence 2**32 - 2**20
    assert mn.ba(actions).status == 176
    assert events(actions)[0].event == "refreshed"


def test_176_when_ha_sequence_passed_threshold() -> None:
    ha = core()
    issued = issue(Suite.AES_128_CBC_SHA)
    ha.install_sa(issued, initial_out_seq=SEQ_REINIT_THRESHOLD)
    mn = MN(issued)
    actions = ha.receive(mn.bu(1), MN_ADDR, NOW)
    assert mn.ba(actions).status == 176
    assert mn.inb.highest_seq == SEQ_REINIT_THRESHOLD
    assert ha.binding(str(HOA)) is not None


def test_data_leaves_the_last_numbers_to_the_bas() -> None:
    """User data stops BA_SEQ_KEEP numbers short of 2**32 - 1, so the BA 176
    of PROFILE §7 can still be sent; before, a heavy downlink used every
    number and the MN's next BU refreshed its binding but got no BA at all
    (found in review)."""
    from mipsec.core.ha_core import DATA_SEQ_END
    from mipsec.core.wire.esp import SequenceExhausted

    ha = core()
    issued = issue(Suite.AES_128_CBC_SHA)
    ha.install_sa(issued, initial_out_seq=DATA_SEQ_END - 2)  # the BA takes one
    mn = MN(issued)
    assert mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW)).status == 176  # past the threshold
    spi = issued.sa.spi
    inner = bytes((0x60, 0, 0, 0, 0, 0, 59, 64)) + bytes(32)
    assert ha.protect_data(spi, 59, inner, NOW) is not None  # DATA_SEQ_END - 1, then no more
    with pytest.raises(SequenceExhausted):
        ha.protect_data(spi, 59, inner, NOW)
    ba = mn.ba(ha.receive(mn.bu(2), MN_ADDR, NOW))
    assert ba.status == 176 and mn.inb.highest_seq > DATA_SEQ_END - 1


def test_no_binding_when_less_than_one_unit_of_validity_left() -> None:
    ha, mn = setup(lifetime=3.0)
    actions = ha.receive(mn.bu(1), MN_ADDR, NOW)
    ba = mn.ba(actions)
    assert (ba.status, ba.lifetime) == (176, 0)
    assert events(actions) == [] and len(ha.bindings) == 0


# ------------------------------------------------------------ DSMIP6


def test_ipv4_home_address_request_acknowledged() -> None:
    ha, mn = setup()
    actions = ha.receive(mn.bu(1, options=(IPv4HomeAddressRequest(32, IP4_HOA),)), MN_ADDR, NOW)
    ba = mn.ba(actions)
    assert ba.status == 0
    assert ba.options == (IPv4AddressAck(0, 32, IP4_HOA),)
    b = ha.binding(str(HOA))
    assert b is not None and b.ip4_hoa == str(IP4_HOA)
    # 0.0.0.0 asks the HA to assign: it answers with the provisioned one.
    req = IPv4HomeAddressRequest(32, IPv4Address("0.0.0.0"))
    assert mn.ba(ha.receive(mn.bu(2, options=(req,)), MN_ADDR, NOW)).options == (
        IPv4AddressAck(0, 32, IP4_HOA),
    )


def test_ipv4_ack_prefix_length_from_home_network_prefix() -> None:
    ha, mn = setup(ip4_hnp=IPv4Network("10.1.0.0/24"))
    req = IPv4HomeAddressRequest(24, IP4_HOA)
    assert mn.ba(ha.receive(mn.bu(1, options=(req,)), MN_ADDR, NOW)).options == (
        IPv4AddressAck(0, 24, IP4_HOA),
    )


@pytest.mark.parametrize(
    ("sa_ip4", "asked", "plen", "p", "status"),
    [
        (IP4_HOA, IPv4Address("10.1.0.99"), 32, False, 130),  # not this MN's
        (None, IPv4Address("0.0.0.0"), 32, False, 132),  # nothing to assign
        (None, IP4_HOA, 32, False, 130),
        (IP4_HOA, IP4_HOA, 0, False, 128),  # prefix length 0 is an error
        (IP4_HOA, IPv4Address("0.0.0.0"), 24, True, 133),  # no prefix provisioned
    ],
)
def test_ipv4_home_address_refused(
    sa_ip4: IPv4Address | None, asked: IPv4Address, plen: int, p: bool, status: int
) -> None:
    ha, mn = setup(ip4_hoa=sa_ip4)
    actions = ha.receive(mn.bu(1, options=(IPv4HomeAddressRequest(plen, asked, p),)), MN_ADDR, NOW)
    ba = mn.ba(actions)
    assert ba.status == 0  # the IPv6 binding stands (RFC 5555 §4.5)
    assert ba.options == (IPv4AddressAck(status, 0, asked),)
    b = ha.binding(str(HOA))
    assert b is not None and b.ip4_hoa is None


# ------------------------------------------------------------ MH checksum


def test_checksum_mismatch_counted_not_dropped() -> None:
    ha, mn = setup()
    wrong = encode_mh(
        BindingUpdate(sequence=1, a=True, h=True, lifetime=10), src=IPv6Address("::"), dst=HAA
    )
    actions = ha.receive(mn.out.protect(PTYPE_MH, NEXT_HEADER_MH, wrong), MN_ADDR, NOW)
    assert mn.ba(actions).status == 0
    assert ha.stats()["checksum_mismatch"] == 1
    assert sum(ha.drops.values()) == 0


def test_checksum_uses_provisioned_haa_and_unspecified_hoa() -> None:
    # An SA with no IPv6 HoA (IPv4-only bootstrap): both pseudo-headers use "::".
    ha, mn = setup(hoa=None)
    actions = ha.receive(mn.bu(1), MN_ADDR, NOW)
    assert mn.ba(actions).status == 0
    assert ha.stats()["checksum_mismatch"] == 0
    assert events(actions)[0].hoa == str(IP4_HOA)


def test_checksum_uses_unspecified_when_no_haa_ip6_was_provisioned() -> None:
    """PROFILE §8: "::" where an address is unknown -- never the HA's own address6."""
    ha = core()  # the HA itself knows its IPv6 address (HAA) ...
    plain = issue()
    issued = IssuedSA(plain.sa, dataclasses.replace(plain.bootstrap, haa_ip6=None))
    assert ha.install_sa(issued)  # ... but the HAC provisioned none to the MN
    mn = MN(issued)
    assert mn.haa == IPv6Address("::")  # the MN's pseudo-header
    actions = ha.receive(mn.bu(1), MN_ADDR, NOW)
    assert mn.ba(actions).status == 0  # the BA's checksum verifies with "::" too
    assert ha.stats()["checksum_mismatch"] == 0


# ------------------------------------------------------------ drops


def test_replayed_bu_is_dropped_silently() -> None:
    ha, mn = setup()
    datagram = mn.bu(1)
    mn.ba(ha.receive(datagram, MN_ADDR, NOW))
    before = ha.binding(str(HOA))
    assert before is not None
    snapshot = (before.coa, before.sequence, before.expires_at)
    assert ha.receive(datagram, ("203.0.113.9", 1), NOW + 50) == []
    assert ha.drops["replay"] == 1
    after = ha.binding(str(HOA))
    assert after is not None and (after.coa, after.sequence, after.expires_at) == snapshot
    assert ha.stats()["ba"] == {0: 1}


def test_packet_left_of_the_window_is_a_replay() -> None:
    ha, mn = setup()
    old = mn.bu(1)  # ESP sequence 0, never delivered
    sa = mn.issued.sa
    info = SUITES[sa.suite]
    later = OutboundSA(info, sa.mn_to_ha_ikey, sa.mn_to_ha_ekey, SPI, initial_seq=100)
    bu = encode_mh(BindingUpdate(sequence=2, a=True, h=True, lifetime=10), src=HOA, dst=HAA)
    mn.ba(ha.receive(later.protect(PTYPE_MH, NEXT_HEADER_MH, bu), MN_ADDR, NOW))
    assert ha.receive(old, MN_ADDR, NOW) == []
    assert ha.drops["replay"] == 1


def test_flipped_bit_is_bad_icv() -> None:
    ha, mn = setup()
    datagram = bytearray(mn.bu(1))
    datagram[20] ^= 0x01
    assert ha.receive(bytes(datagram), MN_ADDR, NOW) == []
    assert ha.drops["bad_icv"] == 1 and len(ha.bindings) == 0
    # The window did not move: the intact packet with the same number still works.
    mn2 = MN(mn.issued)
    assert mn.ba(ha.receive(mn2.bu(1), MN_ADDR, NOW)).status == 0


def test_unknown_spi() -> None:
    ha, _ = setup()
    stranger = MN(issue(spi=SPI + 1))
    assert ha.receive(stranger.bu(1), MN_ADDR, NOW) == []
    assert ha.drops["unknown_spi"] == 1


def test_unknown_spi_with_pull_asks_for_the_sa() -> None:
    ha = core(pull=True)
    issued = issue()
    mn = MN(issued)
    datagram = mn.bu(1)
    assert ha.receive(datagram, MN_ADDR, NOW) == [NeedSA(SPI)]
    assert sum(ha.drops.values()) == 0 and ha.stats()["need_sa"] == 1
    # The pull failed: the second pass drops and counts.
    assert ha.receive(datagram, MN_ADDR, NOW, allow_pull=False) == []
    assert ha.drops["unknown_spi"] == 1
    # The pull succeeded: the same datagram is processed.
    ha.install_sa(issued)
    assert mn.ba(ha.receive(datagram, MN_ADDR, NOW, allow_pull=False)).status == 0


def test_truncated_packets_are_malformed() -> None:
    ha, mn = setup()
    datagram = mn.bu(1)
    for n in (0, 3, 10, len(datagram) - 13):
        assert ha.receive(datagram[:n], MN_ADDR, NOW) == []
    assert ha.drops["malformed"] == 4
    assert len(ha.drops) == 1


def test_wrong_padding_octets() -> None:
    ha = core()
    issued = issue(Suite.NULL_SHA)
    ha.install_sa(issued)
    sa = issued.sa
    mh = encode_mh(BindingUpdate(sequence=1, a=True, h=True, lifetime=10), src=HOA, dst=HAA)
    assert len(mh) % 4 == 0  # so NULL needs padding 01 02 before Pad Length, Next Header
    header = ((PTYPE_MH << 28) | SPI).to_bytes(4, "big") + bytes(4)  # sequence 0
    authed = header + mh + bytes([1, 3, 2, NEXT_HEADER_MH])  # padding 01 03, not 01 02
    icv = SuiteCrypto(SUITES[sa.suite], sa.mn_to_ha_ikey, b"").mac(authed)
    assert ha.receive(authed + icv, MN_ADDR, NOW) == []
    assert ha.drops["bad_padding"] == 1


def test_spi_zero_with_ptype_8_is_malformed() -> None:
    ha, _ = setup()
    assert ha.receive(bytes([0x80, 0, 0, 0]) + bytes(40), MN_ADDR, NOW) == []
    assert ha.drops["malformed"] == 1


def test_ba_from_the_mn_is_malformed() -> None:
    ha, mn = setup()
    ba = encode_mh(BindingAck(status=0, sequence=1), src=HOA, dst=HAA)
    assert ha.receive(mn.out.protect(PTYPE_MH, NEXT_HEADER_MH, ba), MN_ADDR, NOW) == []
    assert ha.drops["malformed"] == 1


# ------------------------------------------------------------ user data


def test_protected_data_delivered() -> None:
    ha, mn = setup()
    inner = ipv6_packet(HOA)
    actions = ha.receive(mn.out.protect(PTYPE_DATA, NEXT_HEADER_IPV6, inner), MN_ADDR, NOW)
    assert actions == [DataIn(SPI, str(HOA), NEXT_HEADER_IPV6, inner, MN_ADDR, True)]
    assert ha.stats()["data_in"] == 1


def test_plain_data_under_scope_1_is_a_scope_drop() -> None:
    ha, mn = setup(scope=1)
    mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW))
    assert ha.receive(encode_plain(ipv6_packet(HOA)), MN_ADDR, NOW) == []
    assert ha.drops["scope"] == 1


def test_plain_data_under_scope_0() -> None:
    ha, mn = setup(scope=0)
    inner = ipv6_packet(HOA)
    # No binding yet: nobody registered this source.
    assert ha.receive(encode_plain(inner), MN_ADDR, NOW) == []
    mn.ba(ha.receive(mn.bu(1, options=(IPv4HomeAddressRequest(32, IP4_HOA),)), MN_ADDR, NOW))
    assert ha.receive(encode_plain(inner), MN_ADDR, NOW) == [
        DataIn(0, str(HOA), NEXT_HEADER_IPV6, inner, MN_ADDR, False)
    ]
    inner4 = ipv4_packet(IP4_HOA)
    assert ha.receive(encode_plain(inner4), MN_ADDR, NOW) == [
        DataIn(0, str(HOA), NEXT_HEADER_IPV4, inner4, MN_ADDR, False)
    ]
    # Not from the binding's care-of address and port.
    assert ha.receive(encode_plain(inner), ("192.0.2.7", 40001), NOW) == []
    assert ha.receive(encode_plain(inner), ("192.0.2.8", 40000), NOW) == []
    # An inner source that is not a registered home address.
    assert ha.receive(encode_plain(ipv6_packet(OTHER_HOA)), MN_ADDR, NOW) == []
    assert ha.drops["scope"] == 4
    # Not an IP packet at all.
    assert ha.receive(encode_plain(b"\x10" + bytes(50)), MN_ADDR, NOW) == []
    assert ha.drops["malformed"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"", b"\x80\x12\x34\x56", b"\x00" * 8]))
def test_garbage_never_answered_never_raises(data: bytes, prefix: bytes) -> None:
    ha = HaCore("ha1", HAA)
    ha.install_sa(issue(spi=0x0123456, scope=0))
    assert not any(isinstance(a, Reply) for a in ha.receive(prefix + data, MN_ADDR, NOW))


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=120),
    st.sampled_from([NEXT_HEADER_MH, NEXT_HEADER_DSTOPTS, NEXT_HEADER_IPV6, 0, 255]),
)
def test_authenticated_garbage_never_raises(payload: bytes, next_header: int) -> None:
    # Past the ICV the payload is the MN's: a buggy MN must not crash the HA.
    ha = HaCore("ha1", HAA)
    issued = issue(Suite.NULL_SHA)
    ha.install_sa(issued)
    mn = MN(issued)
    for mh_prefix in (b"", mn.mh(1)[:12]):
        datagram = mn.out.protect(PTYPE_MH, next_header, mh_prefix + payload)
        for action in ha.receive(datagram, MN_ADDR, NOW):
            if isinstance(action, Reply):
                mn.ba([action])  # any answer is a well-formed, verifiable BA


# ------------------------------------------------------------ install / persistence


def test_installing_the_same_sa_again_keeps_its_state() -> None:
    ha, mn = setup()
    datagram = mn.bu(1)
    mn.ba(ha.receive(datagram, MN_ADDR, NOW))
    assert ha.install_sa(mn.issued) is False
    assert ha.receive(datagram, MN_ADDR, NOW) == []  # the window was kept
    assert ha.drops["replay"] == 1


def test_a_different_sa_under_the_same_spi_replaces_it() -> None:
    ha, old = setup()
    new = issue()
    assert ha.install_sa(new) is True
    assert ha.receive(old.bu(1), MN_ADDR, NOW) == []
    assert ha.drops["bad_icv"] == 1
    assert MN(new).ba(ha.receive(MN(new).bu(1), MN_ADDR, NOW)).status == 0


def test_restart_keeps_bindings_and_counters(tmp_path: Path) -> None:
    path = tmp_path / "bindings.sqlite"
    cache = BindingCache(path)
    ha = core(bindings=cache)
    issued = issue()
    ha.install_sa(issued)
    mn = MN(issued)
    first = mn.bu(1)
    assert mn.ba(ha.receive(first, MN_ADDR, NOW)).status == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cache.close()

    cache2 = BindingCache(path)
    ha2 = core(bindings=cache2)
    ha2.install_sa(issued)
    b = ha2.binding(str(HOA))
    assert b is not None and (b.coa, b.sequence, b.spi) == (MN_ADDR, 1, SPI)
    # The recorded BU is a replay for the restarted HA too.
    assert ha2.receive(first, MN_ADDR, NOW + 1) == []
    assert ha2.drops["replay"] == 1
    # The MN's next BU is accepted, and its BA gets past the MN's replay window:
    # the HA->MN counter resumed above every number the first run sent.
    actions = ha2.receive(mn.bu(2), MN_ADDR, NOW + 2)
    assert mn.ba(actions).status == 0
    assert mn.inb.highest_seq == OUT_SEQ_RESERVE
    assert [e.event for e in events(actions)] == ["refreshed"]
    cache2.close()


def test_restart_after_deregistration_still_refuses_replays(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    cache = BindingCache(path)
    ha = core(bindings=cache)
    issued = issue()
    ha.install_sa(issued)
    mn = MN(issued)
    reg = mn.bu(1)
    mn.ba(ha.receive(reg, MN_ADDR, NOW))
    mn.ba(ha.receive(mn.bu(2, lifetime=0), MN_ADDR, NOW))
    cache.close()
    ha2 = core(bindings=BindingCache(path))
    ha2.install_sa(issued)
    assert ha2.receive(reg, MN_ADDR, NOW + 1) == []
    assert ha2.drops["replay"] == 1 and len(ha2.bindings) == 0


def test_binding_cache_indexes_and_expiry(tmp_path: Path) -> None:
    cache = BindingCache(tmp_path / "c.sqlite")
    b = Binding(str(HOA), "192.0.2.1", 1, SPI, 5, 40, NOW + 40, str(IP4_HOA), 3)
    cache.put(b)
    assert cache.by_address(HOA.packed) is b and cache.by_address(IP4_HOA.packed) is b
    b.ip4_hoa = None
    cache.put(b)
    assert cache.by_address(IP4_HOA.packed) is None
    for i in range(500):  # many refreshes must not grow the expiry heap unboundedly
        b.expires_at = NOW + 40 + i
        cache.put(b)
    assert len(cache._heap) < 200
    assert cache.pop_expired(NOW + 538) == []
    assert cache.pop_expired(NOW + 539) == [b]
    assert len(cache) == 0 and cache.by_address(HOA.packed) is None
    cache.close()
    assert len(BindingCache(tmp_path / "c.sqlite")) == 0


def test_binding_cache_write_behind(tmp_path: Path) -> None:
    """Write-behind queues every change, the SA's records too, until flush (group commit)."""
    path = tmp_path / "wb.sqlite"
    cache = BindingCache(path, write_behind=True)
    ha = core(bindings=cache)
    issued = issue()
    ha.install_sa(issued)
    assert cache.dirty and cache.pending == 1  # the SPI's record (its reservations)
    cache.flush()
    assert not cache.dirty and cache.pending == 0
    mn = MN(issued)
    mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW))
    assert cache.pending == 2  # the binding and the SPI's replay floor
    on_disk = BindingCache(path)
    assert len(on_disk) == 0 and on_disk.out_mark(SPI) == OUT_SEQ_RESERVE
    assert on_disk.replay_floor(SPI) == -1
    on_disk.close()
    cache.flush()
    assert cache.pending == 0
    on_disk = BindingCache(path)
    b = on_disk.get(str(HOA))
    assert b is not None and b.sequence == 1 and on_disk.replay_floor(SPI) == 0
    on_disk.close()
    # Changes coalesce per home address; a delete after a put writes the delete.
    mn.ba(ha.receive(mn.bu(2), MN_ADDR, NOW))
    mn.ba(ha.receive(mn.bu(3, lifetime=0), MN_ADDR, NOW))
    # The binding row (deleted), the SPI's floor, the deleted-binding record.
    assert cache.pending == 3
    cache.close()  # close flushes
    again = BindingCache(path)
    assert len(again) == 0 and again.replay_floor(SPI, str(HOA)) == 2
    deleted = again.deleted(str(HOA))
    assert deleted is not None and deleted.sequence == 3
    again.close()


def test_binding_cache_transaction_groups_writes(tmp_path: Path) -> None:
    cache = BindingCache(tmp_path / "t.sqlite")
    with cache.transaction():
        for spi in range(1, 50):
            cache.set_out_mark(spi, 10)
        with cache.transaction():  # nested: part of the outer one
            cache.set_out_mark(99, 20)
    cache.close()
    again = BindingCache(tmp_path / "t.sqlite")
    assert again.out_mark(49) == 10 and again.out_mark(99) == 20 and again.out_mark(50) is None
    again.close()


def test_binding_cache_rejects_unknown_schema(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    BindingCache(path).close()
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="schema version 99"):
        BindingCache(path)


def test_stats_shape() -> None:
    ha, mn = setup()
    mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW))
    ha.receive(b"\x01", MN_ADDR, NOW)
    s = ha.stats()
    assert s["packets"] == 2 and s["bu"] == 1 and s["ba"] == {0: 1}
    assert s["drops"] == {"malformed": 1} and s["sas"] == 1 and s["bindings"] == 1


def test_codec_errors_are_packet_errors() -> None:
    # Sanity for the test helpers: the MN side refuses a BA protected with the
    # wrong direction's keys, so a passing ``MN.ba`` really verified the ICV.
    ha, mn = setup()
    reply = [a for a in ha.receive(mn.bu(1), MN_ADDR, NOW) if isinstance(a, Reply)][0]
    sa = mn.issued.sa
    wrong = InboundSA(SUITES[sa.suite], sa.mn_to_ha_ikey, sa.mn_to_ha_ekey, SPI)
    with pytest.raises(PacketError):
        wrong.unprotect(reply.datagram)


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["install", "remove", "expire"]),
            st.integers(min_value=0x1000, max_value=0x1007),
            st.sampled_from(list(SUITES)),
            st.sampled_from([60.0, 3600.0]),
        ),
        max_size=40,
    )
)
def test_status_counts_follow_every_install_replace_removal_and_expiry(
    ops: list[tuple[str, int, Suite, float]],
) -> None:
    """``sa_count``/``per_suite`` (``mipsec status``, no pass over the SAs)
    always equal a count over ``installed()``: installs, an SPI's install
    with other keys or suite (a replacement), removals, expiries."""
    c = core()
    t = NOW
    for op, spi, suite, lifetime in ops:
        t += 30
        if op == "install":
            try:
                c.install_sa(issue(suite, spi=spi, lifetime=lifetime + t - NOW), now=t)
            except SpiWithdrawn:
                pass
        elif op == "remove":
            c.remove_sa(spi, now=t)
        else:
            c.expire(t)
        installed = c.installed()
        want: dict[Suite, int] = {}
        for i in installed:
            want[i.sa.suite] = want.get(i.sa.suite, 0) + 1
        assert c.per_suite() == want and c.sa_count() == len(installed)


# ------------------------------------------------------------ one MN per address


def _of(mn_id: str, spi: int, lifetime: float, **kw: object) -> IssuedSA:
    base = issue(spi=spi, lifetime=lifetime, **kw)  # type: ignore[arg-type]
    return IssuedSA(dataclasses.replace(base.sa, mn_id=mn_id), base.bootstrap)


def _taken(actions: Sequence[object]) -> list[AddressTaken]:
    return [a for a in actions if isinstance(a, AddressTaken)]


def test_two_mns_sas_for_one_address_the_later_issued_keeps_it() -> None:
    """A HAC that lost its last commits (power loss) gives alice's address
    to bob while this HA still holds alice's SA.  Before, the two MNs' BUs
    took the binding from each other for as long as both SAs lived.  Now
    bob's SA (the later validity end) takes the address at his BU, alice's
    SA is withdrawn (its packets dropped from then on), and the core says
    so once."""
    ha = core()
    alice, bob = _of("alice@home.example", 101, 3000), _of("bob@home.example", 202, 3600)
    assert ha.install_sa(alice) and ha.install_sa(bob)
    ma, mb = MN(alice), MN(bob)
    assert ma.ba(ha.receive(ma.bu(10), MN_ADDR, NOW)).status == 0
    acts = ha.receive(mb.bu(11), ("192.0.2.8", 1), NOW + 1)
    assert mb.ba(acts).status == 0 and ha.bindings.get(str(HOA)).spi == 202
    (taken,) = _taken(acts)
    assert (taken.kept_spi, taken.kept_mn_id) == (202, "bob@home.example")
    assert (taken.withdrawn_spi, taken.withdrawn_mn_id) == (101, "alice@home.example")
    assert [(e.event, e.spi) for e in events(acts)] == [("deleted", 101), ("added", 202)]
    assert not ha.has_spi(101)
    # Alice's next BU under her withdrawn SA gets nothing: the binding stays bob's.
    assert ha.receive(ma.bu(12), MN_ADDR, NOW + 2) == []
    assert ha.bindings.get(str(HOA)).spi == 202


def test_the_older_sa_of_another_mn_is_sent_to_its_hac_with_176() -> None:
    """The other order: bob (later) registered first; alice's BU under her
    older SA gets 176 (go back to the HAC: a new SA, a new address) and
    her SA is withdrawn; bob keeps the binding."""
    ha = core()
    alice, bob = _of("alice@home.example", 101, 3000), _of("bob@home.example", 202, 3600)
    assert ha.install_sa(alice) and ha.install_sa(bob)
    ma, mb = MN(alice), MN(bob)
    assert mb.ba(ha.receive(mb.bu(11), ("192.0.2.8", 1), NOW)).status == 0
    acts = ha.receive(ma.bu(10), MN_ADDR, NOW + 1)
    ba = ma.ba(acts)
    assert (ba.status, ba.lifetime) == (176, 0)
    (taken,) = _taken(acts)
    assert (taken.kept_spi, taken.withdrawn_spi) == (202, 101)
    assert events(acts) == [] and ha.bindings.get(str(HOA)).spi == 202
    assert not ha.has_spi(101) and ha.has_spi(202)


def test_another_sa_of_the_same_mn_takes_its_binding_as_before() -> None:
    """A re-bootstrap: the same MN (NAI realm case aside) under a new SA,
    the old one still live until the HAC withdraws it -- no conflict."""
    ha = core()
    old, new = _of("alice@home.example", 101, 3000), _of("alice@HOME.example", 202, 3600)
    assert ha.install_sa(old) and ha.install_sa(new)
    mo, mn = MN(old), MN(new)
    assert mo.ba(ha.receive(mo.bu(10), MN_ADDR, NOW)).status == 0
    acts = ha.receive(mn.bu(11), MN_ADDR, NOW + 1)
    assert mn.ba(acts).status == 0 and _taken(acts) == []
    assert ha.has_spi(101) and ha.bindings.get(str(HOA)).spi == 202


def test_two_mns_sas_for_one_ipv4_home_address() -> None:
    """The same rule for the IPv4 home address (DSMIP6): bob's SA names
    alice's IPv4 address with an IPv6 address of its own."""
    ha = core()
    alice = _of("alice@home.example", 101, 3000)
    bob = _of("bob@home.example", 202, 3600, hoa=OTHER_HOA)
    assert ha.install_sa(alice) and ha.install_sa(bob)
    ma, mb = MN(alice), MN(bob)
    ask = (IPv4HomeAddressRequest(home_address=IP4_HOA, prefix_len=32),)
    assert ma.ba(ha.receive(ma.bu(10, options=ask), MN_ADDR, NOW)).status == 0
    acts = ha.receive(mb.bu(11, options=ask), ("192.0.2.8", 1), NOW + 1)
    assert mb.ba(acts).status == 0
    (taken,) = _taken(acts)
    assert (taken.kept_spi, taken.withdrawn_spi) == (202, 101)
    assert ha.bindings.by_address(IP4_HOA.packed).spi == 202
    assert ha.bindings.get(str(HOA)) is None and not ha.has_spi(101)


@pytest.mark.parametrize(
    "coa",
    ["ff02::1", "::", "::1", "fe80::1", "fec0::1", "::ffff:127.0.0.1", "::7f00:1", str(HAA)],
)
def test_an_alternate_care_of_address_that_is_not_unicast_routable_is_discarded(coa: str) -> None:
    """RFC 6275 §6.1.7: silently discarded.  Taken before (found in review):
    an MN could bind multicast, loopback, link-local, a v4-mapped address or
    the HA's own address, and have its downlink sent there, to a port of its
    choice."""
    ha, mn = setup()
    assert mn.ba(ha.receive(mn.bu(1), MN_ADDR, NOW)).status == 0
    bad = (AlternateCareOfAddress(IPv6Address(coa)),)
    assert ha.receive(mn.bu(2, options=bad), MN_ADDR, NOW + 1) == []
    assert ha.drops["bad_coa"] == 1
    b = ha.binding(str(HOA))
    assert b is not None and (b.coa_host, b.coa_port) == MN_ADDR  # unchanged
    # A routable one is taken, as before.
    good = (AlternateCareOfAddress(IPv6Address("2001:db8:ffff::5")),)
    assert mn.ba(ha.receive(mn.bu(3, options=good), MN_ADDR, NOW + 2)).status == 0
    b = ha.binding(str(HOA))
    assert b is not None and b.coa_host == "2001:db8:ffff::5"
