"""The MN registration machine against a hand-driven HA side (no sockets)."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from mipsec.core.issuer import new_sa
from mipsec.core.mn_registration import (
    MAX_BINDACK_TIMEOUT,
    MAX_OUT_OF_WINDOW,
    MAX_UPDATE_RATE,
    Failed,
    MnRegistration,
    Rebootstrap,
    Registered,
    Transmit,
)
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire import mh
from mipsec.core.wire.esp import NEXT_HEADER_MH, PTYPE_MH, InboundSA, OutboundSA

HOA = IPv6Address("2001:db8:1::7")
HAA = IPv6Address("2001:db8:1::1")
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def issued(
    suite: Suite = Suite.AES_128_CBC_SHA256, lifetime: float = 3600, ip4: bool = False
) -> IssuedSA:
    sa = new_sa(spi=77, mn_id="a@b", suite=suite, scope=1, lifetime=lifetime, now=NOW)
    bs = BootstrapData(
        haa_ip6=HAA,
        ip6_hoa=HOA,
        port=7872,
        ip4_hoa=IPv4Address("192.0.2.9") if ip4 else None,
        ip4_hnp=IPv4Network("192.0.2.0/24") if ip4 else None,
    )
    return IssuedSA(sa, bs)


class FakeHA:
    """The HA side written from the spec with the same codecs."""

    def __init__(self, iss: IssuedSA) -> None:
        sa = iss.sa
        info = SUITES[sa.suite]
        self.inb = InboundSA(info, sa.mn_to_ha_ikey, sa.mn_to_ha_ekey, sa.spi)
        self.out = OutboundSA(info, sa.ha_to_mn_ikey, sa.ha_to_mn_ekey, sa.spi)

    def bu(self, datagram: bytes) -> mh.BindingUpdate:
        plain = self.inb.unprotect(datagram)
        assert plain.ptype == PTYPE_MH and plain.next_header == NEXT_HEADER_MH
        dec = mh.decode_mh(plain.payload, src=HOA, dst=HAA)
        assert dec.checksum_ok
        assert isinstance(dec.message, mh.BindingUpdate)
        return dec.message

    def ba(self, status: int, seq: int, lifetime: int, options=()) -> bytes:
        ba = mh.BindingAck(status=status, sequence=seq, lifetime=lifetime, options=options)
        return self.out.protect(PTYPE_MH, NEXT_HEADER_MH, mh.encode_mh(ba, src=HAA, dst=HOA))


@pytest.mark.parametrize("suite", list(Suite))
def test_register_every_suite(suite: Suite) -> None:
    iss = issued(suite)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, lifetime=400)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    assert isinstance(tx, Transmit)
    bu = ha.bu(tx.datagram)
    assert bu.a and bu.h and bu.lifetime == 100 and bu.sequence == reg.sequence
    acts = reg.receive(ha.ba(0, bu.sequence, 100), 0.1)
    assert acts == [Registered(0, 400, bu.sequence, None)]
    assert reg.registered


def test_retransmission_backoff_then_failure() -> None:
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [first] = reg.start(0.0)
    t, timeout, sent = 0.0, 1.5, [first]
    assert reg.timer(1.4) == []
    while True:
        t += timeout
        acts = reg.timer(t)
        if any(isinstance(a, Failed) for a in acts):
            break
        [tx] = [a for a in acts if isinstance(a, Transmit)]
        sent.append(tx)
        timeout *= 2
        assert timeout <= MAX_BINDACK_TIMEOUT
    # RFC 6275 §11.8: each retransmission carries a greater BU sequence number,
    # in a fresh ESP packet.
    bus = [ha.bu(s.datagram) for s in sent]
    assert [b.sequence for b in bus] == [(bus[0].sequence + i) & 0xFFFF for i in range(5)]
    assert len(sent) == 5
    assert len({s.datagram for s in sent}) == len(sent)


def test_status_135_retries_with_higher_sequence() -> None:
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, first_sequence=5)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    acts = reg.receive(ha.ba(mh.SEQUENCE_OUT_OF_WINDOW, 900, 0), 0.1)
    [retry] = acts
    assert ha.bu(tx.datagram).sequence == 5 and ha.bu(retry.datagram).sequence == 901
    assert reg.receive(ha.ba(0, 901, 10), 0.2)[0] == Registered(0, 40, 901, None)


def test_status_135_storm_is_rate_limited_and_fails() -> None:
    """RFC 6275 §11.8: at most MAX_UPDATE_RATE (3) BUs within a second; an
    HA answering every BU with 135 at once gets MAX_OUT_OF_WINDOW BUs in
    all, then the registration fails (the caller backs off).  Found in
    review: each 135 sent a BU at once, 195,000 in 60 s."""
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    now = 0.0
    [tx] = reg.start(now)
    sent = [now]
    acts: list = [tx]
    failed = None
    for _ in range(100):
        txs = [a for a in acts if isinstance(a, Transmit)]
        failed = next((a for a in acts if isinstance(a, Failed)), None)
        if failed is not None:
            break
        if txs:
            bu = ha.bu(txs[-1].datagram)
            acts = reg.receive(ha.ba(mh.SEQUENCE_OUT_OF_WINDOW, (bu.sequence + 7) & 0xFFFF, 0), now)
        else:
            now = reg.next_timer()
            acts = reg.timer(now)
        sent += [now for a in acts if isinstance(a, Transmit)]
    assert failed is not None and failed.status == mh.SEQUENCE_OUT_OF_WINDOW
    assert len(sent) == MAX_OUT_OF_WINDOW
    assert all(b - a >= 1.0 for a, b in zip(sent, sent[MAX_UPDATE_RATE:], strict=False))
    assert not reg.registered and reg.next_timer() == reg.rebootstrap_deadline  # no BU due


def test_status_135_keeps_the_exponential_timer() -> None:
    """A 135 is answered by the BU again, but on the running exponential
    timer (doubled, as for a retransmission), not a fresh 1 s one; a BA that
    then accepts starts the count of 135s again."""
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, first_sequence=5)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    [retry] = reg.timer(1.5)  # timeout 1.5 s -> 3 s
    assert reg.next_timer() == pytest.approx(4.5)
    [again] = reg.receive(ha.ba(mh.SEQUENCE_OUT_OF_WINDOW, 900, 0), 2.0)
    assert ha.bu(again.datagram).sequence == 901
    assert reg.next_timer() == pytest.approx(2.0 + 6.0)
    [ok] = reg.receive(ha.ba(0, 901, 10), 2.1)
    assert isinstance(ok, Registered)
    for i in range(MAX_OUT_OF_WINDOW - 1):  # the count started again
        t = 100.0 + 10 * i
        [tx] = reg.moved(t)
        [act] = reg.receive(ha.ba(mh.SEQUENCE_OUT_OF_WINDOW, 2000 + i, 0), t + 0.1)
        assert isinstance(act, Transmit)


@pytest.mark.parametrize("status", [0, 1])
def test_accepted_with_lifetime_zero_is_no_registration(status: int) -> None:
    """RFC 6275 §11.7.3: a BA accepting a BU of lifetime > 0 with lifetime 0
    leaves no binding: no registration but a re-bootstrap (the SA is of no
    more use; the caller backs off when the SA is young), not a registration
    with no refresh for the rest of the SA (found in review)."""
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    [act] = reg.receive(ha.ba(status, ha.bu(tx.datagram).sequence, 0), 0.1)
    assert isinstance(act, Rebootstrap) and "lifetime 0" in act.reason
    assert not reg.registered and reg.next_timer() == float("inf")
    assert reg.ignored == {"lifetime_zero": 1}


def test_status_133_fails() -> None:
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    [act] = reg.receive(ha.ba(mh.NOT_HOME_AGENT, ha.bu(tx.datagram).sequence, 0), 0.1)
    assert isinstance(act, Failed) and act.status == 133 and not reg.registered


def test_status_176_asks_for_rebootstrap() -> None:
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    acts = reg.receive(ha.ba(mh.REINIT_SA_WITH_HAC, ha.bu(tx.datagram).sequence, 10), 0.1)
    assert isinstance(acts[0], Registered) and acts[0].status == 176
    assert isinstance(acts[1], Rebootstrap) and "176" in acts[1].reason


def test_a_rebootstrap_once_asked_for_leaves_no_timer_in_the_past() -> None:
    """176 with lifetime 0 (the HA's "stale SA, dead from now on"): nothing
    registered, the Rebootstrap sent.  Past the 80 % deadline the machine
    has nothing due: its next timer is not in the past, and a timer call
    sends nothing -- before, the spent deadline stayed the next timer, and
    a caller woken by it called ``timer`` 150,000 times a second (found in
    review)."""
    iss = issued(lifetime=1000)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    acts = reg.receive(ha.ba(mh.REINIT_SA_WITH_HAC, ha.bu(tx.datagram).sequence, 0), 0.1)
    assert [type(a) for a in acts] == [Registered, Rebootstrap] and not reg.registered
    late = 900.0  # past 80 % of the SA
    assert reg.next_timer() > late
    assert reg.timer(late) == []


def test_refresh_and_rebootstrap_timers() -> None:
    iss = issued(lifetime=1000)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, lifetime=100)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    seq = ha.bu(tx.datagram).sequence
    reg.receive(ha.ba(0, seq, 25), 0.0)
    assert reg.next_timer() == pytest.approx(80.0)
    [refresh] = reg.timer(80.0)
    assert ha.bu(refresh.datagram).sequence == (seq + 1) & 0xFFFF
    reg.receive(ha.ba(0, (seq + 1) & 0xFFFF, 25), 80.1)
    acts = reg.timer(800.0)  # 80 % of the SA's 1000 s validity
    assert any(isinstance(a, Rebootstrap) for a in acts)


def test_an_sa_past_its_end_by_the_mns_clock_rebootstraps_after_the_callers_wait() -> None:
    """An SA whose validity end lies two hours behind the MN's clock: by the
    SA's end alone the machine would ask for a new bootstrap after 0.8 s
    (its 1-s floor); ``rebootstrap_after`` (the MN's backoff, core/cli.py)
    puts it that many seconds away instead, and the SA is used meanwhile."""
    iss = issued(lifetime=3600)
    ahead = NOW.replace(hour=NOW.hour + 2)
    bare = MnRegistration(iss, now=0.0, wall_now=ahead)
    assert bare.next_timer() == pytest.approx(0.8)
    reg = MnRegistration(iss, now=0.0, wall_now=ahead, lifetime=100, rebootstrap_after=40.0)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    seq = ha.bu(tx.datagram).sequence
    assert isinstance(reg.receive(ha.ba(0, seq, 25), 0.1)[0], Registered)
    assert not any(isinstance(a, Rebootstrap) for a in reg.timer(39.9))
    assert any(isinstance(a, Rebootstrap) for a in reg.timer(40.0))


def test_forged_or_replayed_ba_ignored() -> None:
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    seq = ha.bu(tx.datagram).sequence
    ba = ha.ba(0, seq, 10)
    flipped = bytearray(ba)
    flipped[-1] ^= 1
    assert reg.receive(bytes(flipped), 0.1) == []
    assert reg.receive(ha.ba(0, (seq + 7) & 0xFFFF, 10), 0.1) == []  # other BU
    assert isinstance(reg.receive(ba, 0.2)[0], Registered)
    assert reg.receive(ba, 0.3) == []  # replay


def test_a_ba_is_accepted_once_even_when_its_sequence_matches_again() -> None:
    """Issue 6, MN side: 2**16 BUs later the BU Sequence # comes round again; a BA
    captured at the earlier lap then names the pending BU, and only the ESP
    anti-replay window (PROFILE §7) stands between it and a false registration."""
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, first_sequence=41)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    captured = ha.ba(0, ha.bu(tx.datagram).sequence, 10)
    assert isinstance(reg.receive(captured, 0.1)[0], Registered)
    for _ in range(69):  # more refreshes than the window (64) is wide
        t = reg.next_timer()
        [refresh] = reg.timer(t)
        assert isinstance(
            reg.receive(ha.ba(0, ha.bu(refresh.datagram).sequence, 10), t + 0.1)[0], Registered
        )
    reg.sequence = 40  # the next BU carries 41 again, as after a wrap
    t = reg.next_timer()
    [again] = reg.timer(t)
    assert ha.bu(again.datagram).sequence == 41
    assert reg.receive(captured, t + 0.1) == []  # not the BA of this BU
    assert reg.drops == {"replay": 1}
    # The BU was still pending: the HA's genuine answer completes it.
    assert isinstance(reg.receive(ha.ba(0, 41, 10), t + 0.2)[0], Registered)


def test_a_ba_of_another_sa_is_dropped() -> None:
    """Across re-bootstraps and MN runs: each run registers under a new SA."""
    first, second = issued(), issued()
    ha_first = FakeHA(first)
    reg = MnRegistration(second, now=0.0, wall_now=NOW, first_sequence=9)
    reg.start(0.0)
    assert reg.receive(ha_first.ba(0, 9, 10), 0.1) == []
    assert reg.drops == {"bad_icv": 1}


def test_ipv4_hoa_request_and_ack() -> None:
    iss = issued(ip4=True)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    bu = ha.bu(tx.datagram)
    [req] = bu.options
    assert isinstance(req, mh.IPv4HomeAddressRequest)
    assert req.home_address == IPv4Address("192.0.2.9") and req.prefix_len == 24
    ack = mh.IPv4AddressAck(0, 24, IPv4Address("192.0.2.9"))
    [reg_act] = reg.receive(ha.ba(0, bu.sequence, 10, (ack,)), 0.1)
    assert reg_act.ip4_hoa == IPv4Address("192.0.2.9")


@pytest.mark.parametrize("ip4", [False, True])
def test_unrequested_ipv4_address_ack_is_ignored(ip4: bool) -> None:
    """RFC 5555 §4.2, PROFILE §8: an IPv4 Address Ack is taken only for the
    address this BU requested (option 29); none asked for, or another
    address acked, is ignored and counted (found in review: 8.8.8.8/32 went
    on the TUN device)."""
    iss = issued(ip4=ip4)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    bu = ha.bu(tx.datagram)
    ack = mh.IPv4AddressAck(0, 32, IPv4Address("8.8.8.8"))
    [act] = reg.receive(ha.ba(0, bu.sequence, 10, (ack,)), 0.1)
    assert isinstance(act, Registered) and act.ip4_hoa is None and reg.registered
    assert reg.ignored == {"unrequested_ip4_ack": 1}


def test_ipv4_address_ack_without_request_when_not_asked() -> None:
    """request_ip4_hoa off: the BU carries no option 29, so the provisioned
    address acked is not taken either."""
    iss = issued(ip4=True)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, request_ip4_hoa=False)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    bu = ha.bu(tx.datagram)
    assert bu.options == ()
    ack = mh.IPv4AddressAck(0, 24, IPv4Address("192.0.2.9"))
    [act] = reg.receive(ha.ba(0, bu.sequence, 10, (ack,)), 0.1)
    assert isinstance(act, Registered) and act.ip4_hoa is None
    assert reg.ignored == {"unrequested_ip4_ack": 1}


def test_deregistration_lifetime_zero() -> None:
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    reg.receive(ha.ba(0, ha.bu(tx.datagram).sequence, 10), 0.1)
    [d] = reg.deregister(1.0)
    bu = ha.bu(d.datagram)
    assert bu.lifetime == 0 and bu.options == ()
    [act] = reg.receive(ha.ba(0, bu.sequence, 0), 1.1)
    assert isinstance(act, Registered) and not reg.registered


# ------------------------------------------------------------ data plane support


def test_nat_keepalive_refreshes_the_binding_early() -> None:
    # RFC 5555 §4.3: a BU/BA pair at least every keepalive seconds.
    iss = issued(lifetime=1000)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, lifetime=400, keepalive=30.0)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    reg.receive(ha.ba(0, ha.bu(tx.datagram).sequence, 100), 0.0)
    assert reg.next_timer() == pytest.approx(30.0)
    [refresh] = reg.timer(30.0)
    assert isinstance(refresh, Transmit) and ha.bu(refresh.datagram).lifetime == 100


def test_moved_sends_a_fresh_bu_at_once() -> None:
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, first_sequence=10)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    reg.receive(ha.ba(0, 10, 100), 0.1)
    [moved] = reg.moved(5.0)
    assert isinstance(moved, Transmit)
    bu = ha.bu(moved.datagram)
    assert bu.sequence == 11 and bu.lifetime == 150 and bu.h
    assert reg.receive(ha.ba(0, 11, 100), 5.1)[0] == Registered(0, 400, 11, None)
    # While de-registering, a move changes nothing.
    reg.deregister(6.0)
    assert reg.moved(6.5) == []


def test_user_data_follows_the_scope() -> None:
    from mipsec.core.errors import PacketError
    from mipsec.core.wire.esp import PTYPE_DATA, encode_plain, peek_header

    packet = bytes([0x60, 0, 0, 0, 0, 0, 59, 64]) + HOA.packed + HAA.packed
    iss = issued()
    reg = MnRegistration(iss, now=0.0, wall_now=NOW)
    ha = FakeHA(iss)
    sealed = reg.seal_data(41, packet)
    assert peek_header(sealed)[0] == PTYPE_DATA
    assert ha.inb.unprotect(sealed).payload == packet
    assert reg.open_data(ha.out.protect(PTYPE_DATA, 41, packet)) == (41, packet)
    with pytest.raises(PacketError) as info:
        reg.open_data(encode_plain(packet))
    assert info.value.drop_reason == "scope"
    with pytest.raises(PacketError) as info:
        reg.open_data(ha.ba(0, 1, 1))  # a BA is not user data
    assert info.value.field == "ptype"


def test_a_clock_step_ahead_only_ever_brings_the_rebootstrap_forward() -> None:
    """The SA came while the MN's clock ran 2 h behind: placed at 80 % of
    3 h.  After the step it is where the true time would have put it (80 %
    of 1 h); a later step back never moves it later."""
    from datetime import timedelta

    iss = issued(lifetime=3600)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW - timedelta(hours=2))
    assert reg.rebootstrap_deadline == pytest.approx(8640.0)
    assert reg.clock_stepped(100.0, 7200.0, NOW + timedelta(seconds=100)) == pytest.approx(2780.0)
    assert reg.rebootstrap_deadline == pytest.approx(2880.0)
    assert reg.clock_stepped(200.0, -3600.0, NOW - timedelta(hours=1)) is None
    assert not any(isinstance(a, Rebootstrap) for a in reg.timer(2879.0))
    assert any(isinstance(a, Rebootstrap) for a in reg.timer(2880.0))
    assert reg.clock_stepped(3000.0, 7200.0, NOW + timedelta(hours=5)) is None  # already asked


def test_a_step_noticed_late_bootstraps_at_once_if_its_time_has_passed() -> None:
    """A 1-h SA, the MN's clock 50 min behind: placed at 80 % of 110 min
    (88 min).  NTP steps it at 55 min: the true re-bootstrap time (48 min)
    has passed, so now -- not 80 % of the 5 min left (59 min, a minute
    before the SA's end at the HA)."""
    from datetime import timedelta

    iss = issued(lifetime=3600)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW - timedelta(minutes=50))
    assert reg.rebootstrap_deadline == pytest.approx(5280.0)
    assert reg.clock_stepped(3300.0, 3000.0, NOW + timedelta(minutes=55)) == 0.0
    assert any(isinstance(a, Rebootstrap) for a in reg.timer(3300.0))


def test_a_clock_step_leaves_an_sa_on_the_callers_backoff_alone() -> None:
    """An SA this MN's clock could not place already waits for the MN's
    backoff (``rebootstrap_after``); a step must not cut that wait."""
    from datetime import timedelta

    iss = issued(lifetime=3600)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, rebootstrap_after=40.0)
    assert reg.clock_stepped(1.0, 10800.0, NOW + timedelta(hours=3)) is None
    assert reg.rebootstrap_deadline == pytest.approx(40.0)


def _registered_machine() -> tuple[MnRegistration, FakeHA]:
    iss = issued(lifetime=86400)
    reg = MnRegistration(iss, now=0.0, wall_now=NOW, lifetime=600)
    ha = FakeHA(iss)
    [tx] = reg.start(0.0)
    [act] = reg.receive(ha.ba(0, ha.bu(tx.datagram).sequence, 150), 0.1)
    assert isinstance(act, Registered) and reg.registered
    return reg, ha


def test_an_uplink_past_the_reinit_threshold_asks_for_a_new_sa_at_once() -> None:
    """PROFILE §7: once the SA's outbound counter passes 2**32 - 2**20 the
    SA must be replaced.  The HA says so (176) only in a BA, which a fast
    uplink may not live to see (2**20 packets: ~20 s at 50,000/s, the
    refresh minutes away): the uplink that crosses the threshold wakes the
    registration (``on_reinit``, once), whose timer is due at once and asks
    for a re-bootstrap -- sending no BU under the nearly spent SA."""
    from mipsec.core.wire.esp import SEQ_REINIT_THRESHOLD

    reg, _ = _registered_machine()
    woken: list[bool] = []
    reg.on_reinit = lambda: woken.append(True)
    reg._out._seq = SEQ_REINIT_THRESHOLD  # as after that many packets
    inner = bytes((0x60, 0, 0, 0, 0, 0, 59, 64)) + HOA.packed + HAA.packed
    reg.seal_data(41, inner)
    reg.seal_data(41, inner)
    assert woken == [True]  # once
    assert reg.next_timer() < 1.0
    acts = reg.timer(1.0)
    assert len(acts) == 1 and isinstance(acts[0], Rebootstrap)
    assert "sequence numbers" in acts[0].reason
    assert reg.timer(2.0) == []  # asked once


def test_a_downlink_past_the_reinit_threshold_asks_for_a_new_sa_at_once() -> None:
    """The same for the HA's counter, read on the MN's inbound SA: a heavy
    downlink ran it out while the MN waited for a BA 176 its next refresh
    would bring, minutes later (found in review)."""
    from mipsec.core.wire.esp import PTYPE_DATA, SEQ_REINIT_THRESHOLD

    reg, ha = _registered_machine()
    woken: list[bool] = []
    reg.on_reinit = lambda: woken.append(True)
    ha.out._seq = SEQ_REINIT_THRESHOLD  # as after that many packets to the MN
    inner = bytes((0x60, 0, 0, 0, 0, 0, 59, 64)) + HAA.packed + HOA.packed
    for _ in range(2):
        assert reg.open_data(ha.out.protect(PTYPE_DATA, 41, inner)) == (41, inner)
    assert woken == [True]  # once
    assert reg.next_timer() < 1.0
    acts = reg.timer(1.0)
    assert len(acts) == 1 and isinstance(acts[0], Rebootstrap)


def test_a_bu_with_the_counter_used_up_is_a_failure_not_an_exception() -> None:
    """Every number of the SA used (the re-bootstrap it asked for did not
    come in time): a BU -- a refresh, a move, the de-registration at a stop
    -- cannot be sent.  A Failed action, not an exception out of the machine
    (it ended the MN with a traceback; found in review)."""
    from mipsec.core.wire.esp import SEQ_MAX

    reg, _ = _registered_machine()
    reg._rebootstrap_sent = True  # asked already, as the threshold made it
    reg._out._seq = SEQ_MAX + 1
    for acts in (reg.timer(500.0), reg.moved(501.0), reg.deregister(502.0)):
        assert len(acts) == 1 and isinstance(acts[0], Failed), acts
        assert "used up" in acts[0].reason
    assert not reg.registered
