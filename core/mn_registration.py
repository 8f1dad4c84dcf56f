"""MN home registration with its HA, sans-I/O (RFC 6618 §6, RFC 6275 §11.7).

One object per SA.  Time is injected (``now`` in seconds, monotonic), so the
retransmission backoff, refresh and re-bootstrap decisions are tested
without sleeping; the asyncio shell in ``roles/mn.py`` moves the datagrams.

Outputs:
* ``Transmit(datagram)`` -- send to the HA (address/port from bootstrap data);
* ``Registered(status, lifetime, sequence, ip4_hoa)`` -- a BA accepted the binding;
* ``Rebootstrap(reason)`` -- bootstrap again with the HAC (BA status 176,
  RFC 6618 §8.2, or the SA's validity end is near, PROFILE §5);
* ``Failed(status, reason)`` -- the HA refused, or no BA came in time.

Replays (issue 6: the MN side's guarantee): a BA is accepted at most once.
Within one SA the ESP anti-replay window (PROFILE §7) drops a copy before
its BU Sequence # is even looked at -- so a BA captured one 2**16 lap of
BU numbers earlier cannot complete a later BU with the same number -- and
drops are counted in ``drops``.  Across SAs nothing carries over: every
``MnRegistration`` is built for one SA and the MN role bootstraps a new SA
(new SPI, new keys) whenever it starts or re-bootstraps, so a BA from an
earlier SA or an earlier run fails the SPI/ICV check.

User data (RFC 6618 §6.4) shares the SA -- its sequence numbers, its replay
window, its CBC contexts -- so the machine also seals and opens it
(``seal_data``, ``open_data``); ``forwarding.MnForwarder`` decides which
packets may use them.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address

from mipsec.core.errors import MobilityHeaderError, PacketError
from mipsec.core.model import IssuedSA
from mipsec.core.suites import SUITES
from mipsec.core.wire import mh
from mipsec.core.wire.esp import (
    NEXT_HEADER_MH,
    PTYPE_DATA,
    PTYPE_MH,
    PTYPE_PLAIN,
    InboundSA,
    OutboundSA,
    SequenceExhausted,
    encode_plain,
    peek_header,
)
from mipsec.core.wire.inner import next_header_of

# The reason of the Rebootstrap sent at ``rebootstrap_at`` of the SA: the SA
# is still good, so the MN keeps its binding until a new one is registered
# (core/mn_keep.py).
NEAR_END = "SA validity end is near"

# ... and the one sent once the SA's outbound counter passes PROFILE §7's
# threshold: the SA cannot be kept (its numbers run out).
COUNTER_NEAR_END = "the SA's sequence numbers are nearly used up"

# RFC 6275 §12 / §13: protocol constants for BU retransmission.
INITIAL_BINDACK_TIMEOUT_FIRST_REG = 1.5  # InitialBindackTimeoutFirstReg (§13)
INITIAL_BINDACK_TIMEOUT = 1.0  # INITIAL_BINDACK_TIMEOUT (§12)
MAX_BINDACK_TIMEOUT = 32.0  # MAX_BINDACK_TIMEOUT (§12)
MAX_UPDATE_RATE = 3  # BUs to the HA within any second at most (§11.8, §12)
# BAs with status 135 (Sequence # out of window) in a row before the
# registration fails (and the caller backs off): an HA that answers every BU
# so is broken or hostile (found in review: 195,000 BUs in 60 s).
MAX_OUT_OF_WINDOW = 5
UNSPECIFIED = IPv6Address("::")


@dataclass(frozen=True)
class Transmit:
    datagram: bytes


@dataclass(frozen=True)
class Registered:
    status: int
    lifetime: int  # seconds granted
    sequence: int
    ip4_hoa: IPv4Address | None = None


@dataclass(frozen=True)
class Rebootstrap:
    reason: str


@dataclass(frozen=True)
class Failed:
    status: int | None
    reason: str


Action = Transmit | Registered | Rebootstrap | Failed


class MnRegistration:
    def __init__(
        self,
        issued: IssuedSA,
        *,
        now: float,
        wall_now: datetime,
        lifetime: int = 600,
        rebootstrap_at: float = 0.8,
        rebootstrap_after: float | None = None,
        refresh_at: float = 0.8,
        window: int = 64,
        request_ip4_hoa: bool = True,
        first_sequence: int | None = None,
        keepalive: float = 0.0,
    ) -> None:
        """``keepalive`` > 0: refresh the binding at least this often (seconds),
        so a NAT between MN and HA keeps its mapping (RFC 5555 §4.3 does it
        with the BU/BA pair, which also moves the binding to a new mapping)."""
        sa, bs = issued.sa, issued.bootstrap
        info = SUITES[sa.suite]
        self.issued = issued
        self.hoa = bs.ip6_hoa or UNSPECIFIED
        # PROFILE §8: pseudo-header uses the provisioned mip6-haa-ip6 even over IPv4.
        self.ha_addr = bs.haa_ip6 or UNSPECIFIED
        self._out = OutboundSA(info, sa.mn_to_ha_ikey, sa.mn_to_ha_ekey, sa.spi)
        self._in = InboundSA(info, sa.ha_to_mn_ikey, sa.ha_to_mn_ekey, sa.spi, window=window)
        self.scope = sa.scope
        self._keepalive = keepalive
        self._lifetime_units = mh.lifetime_units(lifetime)
        self._refresh_at = refresh_at
        self._rebootstrap_at = rebootstrap_at
        self._validity_end = sa.validity_end
        # False for an SA this MN's clock already could not place: its
        # re-bootstrap is the caller's backoff, which a step must not cut.
        self._placed_by_wall = rebootstrap_after is None
        # The SA's end, measured on the monotonic clock from now -- or, for
        # an SA the MN's clock cannot place (``rebootstrap_after``: the
        # caller's backoff), that many seconds from now.
        remaining = (sa.validity_end - wall_now).total_seconds()
        total = max(remaining, 1.0)
        self._rebootstrap_deadline = (
            now + total * rebootstrap_at if rebootstrap_after is None else now + rebootstrap_after
        )
        self._request_ip4 = request_ip4_hoa and bs.ip4_hoa is not None
        self.sequence = secrets.randbelow(1 << 16) if first_sequence is None else first_sequence
        self._pending: bytes | None = None  # the BU awaiting its BA
        self._pending_lifetime = self._lifetime_units
        self._timeout = INITIAL_BINDACK_TIMEOUT_FIRST_REG
        self._retransmit_at: float | None = None
        # The pending BU waits for the rate limit (RFC 6275 §11.8): it is sent
        # as it is at ``_retransmit_at``, not as a retransmission.
        self._deferred = False
        self._sent_at: deque[float] = deque(maxlen=MAX_UPDATE_RATE)
        self._out_of_window = 0  # BAs with status 135 in a row
        self._refresh_deadline: float | None = None
        self._rebootstrap_sent = False
        self._reinit_told = False
        # Called (by ``seal_data``) when the uplink crosses PROFILE §7's
        # threshold; the shell wakes its registration with it.
        self.on_reinit: Callable[[], None] | None = None
        self.registered = False
        self.drops: Counter[str] = Counter()  # BAs dropped before decoding, per reason
        # What an accepted BA carried that the MN did not act on, per reason.
        self.ignored: Counter[str] = Counter()
        # The IPv4 home address the pending BU requested (option 29), if any.
        self._pending_ip4: IPv4Address | None = None
        self.last_status: int | None = None
        self.granted_lifetime = 0
        self.retransmissions = 0

    def __repr__(self) -> str:
        return f"MnRegistration(spi={self.issued.sa.spi}, hoa={self.hoa})"

    # ------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Action]:
        """Send the first BU (home registration)."""
        return self._send_bu(now, self._lifetime_units, first=True)

    def deregister(self, now: float) -> list[Action]:
        """BU with lifetime 0 (RFC 6275 §11.7.2), e.g. at shutdown.

        Sent at once even past MAX_UPDATE_RATE: it is the last BU of the SA
        (the shell waits for its BA, running no timer)."""
        self.sequence = (self.sequence + 1) & 0xFFFF
        return self._send_bu(now, 0, first=False, limited=False)

    def receive(self, datagram: bytes, now: float) -> list[Action]:
        try:
            plain = self._in.unprotect(datagram)
        except PacketError as exc:
            self.drops[exc.drop_reason] += 1
            return []  # silently dropped, like the HA does (PROFILE §7)
        if plain.ptype != PTYPE_MH or plain.next_header != NEXT_HEADER_MH:
            return []
        try:
            decoded = mh.decode_mh(plain.payload, src=self.ha_addr, dst=self.hoa)
        except MobilityHeaderError:
            return []
        ba = decoded.message
        if not isinstance(ba, mh.BindingAck) or self._pending is None:
            return []
        if ba.status == mh.SEQUENCE_OUT_OF_WINDOW:
            return self._out_of_window_ba(ba, now)
        if ba.sequence != self.sequence:
            return []  # a BA for another BU
        self._out_of_window = 0
        self._pending = None
        self._retransmit_at = None
        self._deferred = False
        self.last_status = ba.status
        if ba.status >= 128 and ba.status != mh.REINIT_SA_WITH_HAC:
            self.registered = False
            return [Failed(ba.status, f"HA refused the binding update (status {ba.status})")]
        if ba.status < 128 and self._pending_lifetime > 0 and ba.lifetime == 0:
            # RFC 6275 §11.7.3: the binding lives for the lifetime granted --
            # none.  Not a registration (it was taken as one before the
            # twenty-eighth session: no refresh, no BU for the rest of the
            # SA; found in review).  Our HA answers so when less than 4 s of
            # the SA are left by its clock (core/ha_core.py): the SA is of
            # no more use, so bootstrap again -- the caller backs off when
            # the SA is that young (core/cli.py, [sa] min_lifetime).
            self.registered = False
            self.granted_lifetime = 0
            self.ignored["lifetime_zero"] += 1
            if self._rebootstrap_sent:
                return []
            self._rebootstrap_sent = True
            return [Rebootstrap(f"HA granted lifetime 0 (BA status {ba.status}): no binding")]
        self.granted_lifetime = ba.lifetime_seconds
        self.registered = self._pending_lifetime > 0 and ba.lifetime > 0
        ip4 = None
        for opt in ba.options:
            if not isinstance(opt, mh.IPv4AddressAck) or not opt.accepted:
                continue
            # RFC 5555 §3.2.1/§4.2, PROFILE §8: an IPv4 Address Acknowledgement
            # answers the BU's IPv4 Home Address Request; one this BU did not
            # ask for (no option 29, or another address) is ignored -- taken,
            # the shell put e.g. 8.8.8.8/32 on the TUN device and the kernel
            # delivered all traffic to it locally (found in review).
            if self._pending_ip4 is None or opt.home_address != self._pending_ip4:
                self.ignored["unrequested_ip4_ack"] += 1
                continue
            ip4 = opt.home_address
        out: list[Action] = [Registered(ba.status, ba.lifetime_seconds, ba.sequence, ip4)]
        if self.registered:
            refresh = ba.lifetime_seconds * self._refresh_at
            if self._keepalive > 0:
                refresh = min(refresh, self._keepalive)
            self._refresh_deadline = now + refresh
        if ba.status == mh.REINIT_SA_WITH_HAC and not self._rebootstrap_sent:
            self._rebootstrap_sent = True
            out.append(Rebootstrap("HA answered REINIT_SA_WITH_HAC (176)"))
        return out

    def timer(self, now: float) -> list[Action]:
        if self.needs_reinit and not self._rebootstrap_sent:
            # PROFILE §7: past 2**32 - 2**20 the SA must be replaced; the HA
            # says so (176) only in a BA, which may come too late for a fast
            # uplink (2**20 packets: ~20 s at 50,000 a second).  Nothing
            # else is sent under it now.
            self._rebootstrap_sent = True
            return [Rebootstrap(COUNTER_NEAR_END)]
        out: list[Action] = []
        if self._retransmit_at is not None and now >= self._retransmit_at and self._deferred:
            # Held back by the rate limit: sent now, as it is.
            out.extend(self._transmit(now))
        elif self._retransmit_at is not None and now >= self._retransmit_at:
            if self._timeout * 2 > MAX_BINDACK_TIMEOUT:
                self._pending = None
                self._retransmit_at = None
                out.append(Failed(None, "no binding acknowledgement from the HA"))
            else:
                self._timeout *= 2  # RFC 6275 §11.8 exponential backoff
                assert self._pending is not None
                self.retransmissions += 1
                # RFC 6275 §11.8: a retransmitted BU MUST use a greater Sequence
                # Number; it is also a new ESP packet, as the HA's replay window
                # would drop a copy.
                self.sequence = (self.sequence + 1) & 0xFFFF
                self._pending = self._bu(self._pending_lifetime)
                out.extend(self._transmit(now))
        if (
            self._refresh_deadline is not None
            and now >= self._refresh_deadline
            and self._pending is None
        ):
            self._refresh_deadline = None
            self.sequence = (self.sequence + 1) & 0xFFFF
            out.extend(self._send_bu(now, self._lifetime_units, first=False))
        if now >= self._rebootstrap_deadline and not self._rebootstrap_sent:
            self._rebootstrap_sent = True
            out.append(Rebootstrap(NEAR_END))
        return out

    def clock_stepped(self, now: float, step: float, wall_now: datetime) -> float | None:
        """The MN's wall clock was stepped ``step`` seconds ahead (NTP
        correcting a clock that ran behind, ``date -s``): place the SA's end
        again by it.

        The re-bootstrap time was fixed at the SA's arrival from the wall
        clock of that instant; a clock that ran behind then put it too late,
        and the HA, which judges the SA by its own clock, would start
        dropping the BUs before the MN came back (an outage of several BU
        timeouts).  Where the clock stepped to would have put it: ``step``
        times ``rebootstrap_at`` earlier -- now, if that has passed (a step
        noticed late, or one beyond the SA's end).  Never later than 80 %
        of what is left by the new time.  The re-bootstrap only ever moves
        earlier: if the new time is the wrong one, the early bootstrap's SA
        looks short by it and the next is backed off as after a failure
        (core/cli.py); an SA already on that backoff keeps it.  Returns the
        seconds until the re-bootstrap when it moved, else None.
        """
        if self._rebootstrap_sent or not self._placed_by_wall or step <= 0:
            return None
        remaining = max((self._validity_end - wall_now).total_seconds(), 0.0)
        r = self._rebootstrap_at
        at = max(now, min(self._rebootstrap_deadline - step * r, now + remaining * r))
        if at >= self._rebootstrap_deadline:
            return None
        self._rebootstrap_deadline = at
        return at - now

    @property
    def rebootstrap_deadline(self) -> float:
        """When the machine asks for the next bootstrap (its ``now`` clock)."""
        return self._rebootstrap_deadline

    def next_timer(self) -> float:
        # The re-bootstrap deadline once its Rebootstrap was sent is no
        # timer: kept, a past deadline woke the caller at once, for ever.
        if self.needs_reinit and not self._rebootstrap_sent:
            return -math.inf  # due now: timer() sends the Rebootstrap
        times = [math.inf if self._rebootstrap_sent else self._rebootstrap_deadline]
        if self._retransmit_at is not None:
            times.append(self._retransmit_at)
        if self._refresh_deadline is not None:
            times.append(self._refresh_deadline)
        return min(times)

    @property
    def needs_reinit(self) -> bool:
        """Either direction passed SEQ_REINIT_THRESHOLD (PROFILE §7).

        The inbound one too since the twenty-eighth session: a heavy
        downlink ran the HA's counter out while the MN, whose own counter
        was far from it, waited for a BA 176 that its next refresh (minutes
        away) would bring -- the downlink dead meanwhile (found in review)."""
        return self._out.needs_reinit or self._in.needs_reinit

    def moved(self, now: float) -> list[Action]:
        """The care-of address (or the NAT's port) changed: a BU at once (RFC 6275 §11.7.1).

        Nothing while a de-registration is pending: the MN is leaving anyway.
        """
        if self._pending is not None and self._pending_lifetime == 0:
            return []
        self.sequence = (self.sequence + 1) & 0xFFFF
        return self._send_bu(now, self._lifetime_units, first=False)

    # ------------------------------------------------------------ user data (RFC 6618 §6.4)

    def seal_data(self, next_header: int, packet: bytes) -> bytes:
        """One datagram for the HA carrying ``packet`` (an IPv6 or IPv4 packet).

        ``mip6-sas`` 1: PType 1 under the SA; 0: PType 0 in the clear, as the
        SA does not cover data (RFC 6618 §5.6.4, PROFILE §7).  Raises
        ``SequenceExhausted`` once the SA's counter is used up.
        """
        if self.scope == 0:
            return encode_plain(packet)
        datagram = self._out.protect(PTYPE_DATA, next_header, packet)
        if self._out.needs_reinit and not self._reinit_told:
            # The data plane crossed the threshold: wake the registration,
            # whose next timer is now due (``next_timer``).
            self._reinit_told = True
            if self.on_reinit is not None:
                self.on_reinit()
        return datagram

    def open_data(self, datagram: bytes) -> tuple[int, bytes]:
        """(Next Header, packet) of a user-data datagram from the HA.

        Raises ``PacketError`` (``drop_reason`` = the counter) for anything
        else: a PType that does not match the scope (RFC 6618 §6.4: with
        ``mip6-sas`` 1 "the receiver MUST silently discard any packet with
        the PType set to 0"), a BA, or an ESP failure (ICV, replay, padding).
        PType 0 is only ever read from the HA's own address and port: the
        shell's socket is connected to it.
        """
        ptype, _ = peek_header(datagram)
        if ptype == PTYPE_PLAIN:
            if self.scope != 0:
                raise PacketError("ptype", "PType 0 under an SA of mip6-sas 1", "scope")
            packet = datagram[8:]
            return next_header_of(packet), packet
        if ptype != PTYPE_DATA:
            raise PacketError("ptype", f"PType {ptype} is not user data")
        if self.scope == 0:
            raise PacketError("ptype", "PType 1 under an SA of mip6-sas 0", "scope")
        u = self._in.unprotect(datagram)
        if self._in.needs_reinit and not self._reinit_told:
            self._reinit_told = True  # as seal_data: the registration's timer is due
            if self.on_reinit is not None:
                self.on_reinit()
        return u.next_header, u.payload

    # ------------------------------------------------------------ internals

    def _bu(self, lifetime_units: int) -> bytes:
        options: tuple[mh.MobilityOption, ...] = ()
        bs = self.issued.bootstrap
        self._pending_ip4 = None
        if self._request_ip4 and lifetime_units and bs.ip4_hoa is not None:
            plen = bs.ip4_hnp.prefixlen if bs.ip4_hnp is not None else 32
            options = (mh.IPv4HomeAddressRequest(plen, bs.ip4_hoa),)
            self._pending_ip4 = bs.ip4_hoa
        bu = mh.BindingUpdate(
            sequence=self.sequence, a=True, h=True, lifetime=lifetime_units, options=options
        )
        return mh.encode_mh(bu, src=self.hoa, dst=self.ha_addr)

    def _send_bu(
        self, now: float, lifetime_units: int, *, first: bool, limited: bool = True
    ) -> list[Action]:
        self._out_of_window = 0
        self._pending = self._bu(lifetime_units)
        self._pending_lifetime = lifetime_units
        self._timeout = INITIAL_BINDACK_TIMEOUT_FIRST_REG if first else INITIAL_BINDACK_TIMEOUT
        return self._transmit(now, limited=limited)

    def _out_of_window_ba(self, ba: mh.BindingAck, now: float) -> list[Action]:
        """RFC 6275 §11.7.3: status 135 -- the BU again, numbered above the
        HA's last one, under the rate limit (§11.8) and on the running
        exponential timer (a 135 does not start it again); MAX_OUT_OF_WINDOW
        of them in a row fail the registration.  Before the twenty-eighth
        session each 135 sent a BU at once, unbounded (found in review)."""
        self._out_of_window += 1
        if self._out_of_window >= MAX_OUT_OF_WINDOW:
            self._pending = None
            self._retransmit_at = None
            self._deferred = False
            self.registered = False
            self.last_status = ba.status
            return [
                Failed(
                    ba.status,
                    f"HA answered {self._out_of_window} BUs in a row with status 135 "
                    "(sequence number out of window)",
                )
            ]
        self.sequence = (ba.sequence + 1) & 0xFFFF
        self._pending = self._bu(self._pending_lifetime)
        self._timeout = min(self._timeout * 2, MAX_BINDACK_TIMEOUT)  # one more try (§11.8)
        return self._transmit(now)

    def _transmit(self, now: float, *, limited: bool = True) -> list[Action]:
        """The pending BU now, or -- past MAX_UPDATE_RATE in the last second
        (RFC 6275 §11.8: MUST NOT) -- once the limit allows it."""
        sent = self._sent_at
        if limited and len(sent) == MAX_UPDATE_RATE and now < sent[0] + 1.0:
            self._deferred = True
            self._retransmit_at = sent[0] + 1.0
            return []
        self._deferred = False
        sent.append(now)
        self._retransmit_at = now + self._timeout
        act = self._protect_pending()
        return [act]

    def _protect_pending(self) -> Transmit | Failed:
        assert self._pending is not None
        try:
            return Transmit(self._out.protect(PTYPE_MH, NEXT_HEADER_MH, self._pending))
        except SequenceExhausted:
            # Every number of the SA is used (a fast uplink, a long SA): no
            # BU can go under it.  A failure the caller acts on -- it raised
            # out of the machine and ended the MN before (found in review).
            self._pending = None
            self._retransmit_at = None
            self._deferred = False
            self.registered = False
            return Failed(None, "the SA's sequence numbers are used up")
