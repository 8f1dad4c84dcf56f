"""The Home Agent's packet and binding logic, sans-I/O (RFC 6618 §6, PROFILE §7-§8).

``HaCore.receive(datagram, src, now)`` takes one UDP payload that arrived on
the ``mip6-port`` and returns what to do: ``Reply`` (a protected Binding
Acknowledgement for the observed source address and port, PROFILE §7),
``BindingChanged`` (for the log and, later, routing), ``NeedSA`` (an unknown
SPI the shell may pull from the HAC, PROFILE §9) or ``DataIn`` (tunnelled user
data, which ``forwarding.HaForwarder`` filters before the TUN device gets it).
Time is injected as epoch seconds (``now``): SA validity ends and binding
lifetimes are wall-clock instants, and both are tested without sleeping.

Drops are silent (PROFILE §7: never answer) and counted in ``drops`` under
the reason: ``malformed``, ``unknown_spi``, ``bad_icv``, ``replay``,
``bad_padding``, ``scope``, ``expired_sa``, ``withdrawn_spi`` (an SPI the
HAC withdrew, see below), plus ``not_home_registration``
(a BU without the H flag and no binding: RFC 6275 §9.5.1 requires nonce
indices and authorization data there, which this HA never has, so the packet
"MUST be silently discarded") and ``seq_exhausted`` (the HA->MN counter is
used up; PROFILE §7 forbids sending past 2**32 - 1).

Binding Update processing follows RFC 6275 §9.5.1, §10.3.1 and §10.3.2 with
the profile's rules (PROFILE §8):

* the home address is the one the SA was provisioned for (RFC 6275 §10.3.1:
  "the home address unequivocally identifying the security association");
  a Home Address destination option that names another one -> BA 133;
* sequence numbers compare modulo 2**16 (``seq_newer``); the first BU for a
  home address is accepted with any number; an old one -> BA 135 carrying the
  last accepted number.  After a de-registration the last number is kept for
  MAX_DELETE_BCE_TIMEOUT (RFC 6275 §10.3.2, §12) so a delayed BU cannot
  re-create the binding;
* H flag clear: BA 139 when a binding exists (RFC 6275 §9.5.1: the flag may
  not change), otherwise a silent drop (see above);
* lifetime granted = min(requested, ``max_binding_lifetime``, the SA's
  remaining validity), in 4-second units rounded down; the BA is sent
  whatever the A flag says (RFC 6275 §10.3.1 "Regardless of the setting of
  the Acknowledge (A) bit");
* lifetime 0 = de-registration: the binding is deleted and BA 0 (lifetime 0)
  answers; with no binding (and no recent de-registration) the answer is 133
  as RFC 6275 §10.3.2 asks;
* less than one 4-s unit grantable (SA about to end): BA with lifetime 0 and
  no binding change; a Nonce Indices option with H set is dropped as
  malformed (RFC 6275 §9.5.1);
* care-of address = the outer source address and port, or the Alternate
  Care-of Address option's address with the outer source port;
* BA status 176 REINIT_SA_WITH_HAC (RFC 6618 §8.2) instead of 0 -- the binding
  is still made -- when either direction's sequence number passed
  SEQ_REINIT_THRESHOLD (PROFILE §7) or less than ``reinit_margin`` seconds
  (default 60) of the SA's validity are left.  Choice: a fixed margin rather
  than a fraction of the SA lifetime, because the HA learns only the validity
  end, not when the HAC issued the SA; the MN re-bootstraps on its own at 80 %
  of the lifetime (PROFILE §5), so 176 is the backstop for an MN that did not;
* DSMIP6 (RFC 5555 §3.1.1, §3.2.1, §4.5): an IPv4 Home Address option is
  answered with an IPv4 Address Acknowledgement -- status 0 and the
  provisioned IPv4 HoA when the SA has one and the request names it or
  0.0.0.0; 130/132/133/128 otherwise (the IPv6 binding stands either way).
  NAT detection (RFC 5555 §4.2) is not signalled: every MN-HA packet of this
  profile is UDP-encapsulated anyway, and the HA always answers the source
  address and port it observed.
* The MH checksum uses the pseudo-header (SA's HoA -> provisioned HA address,
  ``::`` when unknown); a mismatch is counted (``checksum_mismatch``), not
  dropped: the ICV already protects the octets (PROFILE §8).

Replay protection across restarts (issue 6): no packet the HA accepted is
accepted again after a restart at any instant.  What must survive lives in
the binding cache (``bindings.py``) and is on disk before any answer leaves
-- the HA role commits each burst's changes, then sends its replies and
delivers its data (a caller of ``receive`` with a write-behind cache must
do the same: ``bindings.flush()`` before sending).  One MN->HA sequence space
per SA is shared by BUs and data, but the two are guarded differently:

* Mobility Header packets (BUs): an exact floor.  Every verified PType 8
  packet raises its SPI's ``in_floor`` to its number before the reply; after
  a restart a PType 8 packet at or below the floor is a replay.  The binding
  (with its BU Sequence #) and the §10.3.2 deleted-binding records are
  committed with it.  So a fresh BU after a restart is accepted at once
  (BA 0): its number is above every BU the HA ever answered.
* Data packets (PType 1): a high-water mark reserved ahead, ``data_mark``:
  no data packet numbered at or above it has been accepted.  A data packet
  that reaches it raises it (to its number + a reserve) and is delivered only
  once that is committed; below it, nothing is written.  After a restart,
  data numbered below the persisted mark is dropped as a replay.  The
  reserve adapts to each SA's rate -- about ``DATA_RESERVE_PERIOD`` (1 s) of
  its traffic, at least ``DATA_RESERVE_MIN`` (32) and at most
  ``DATA_RESERVE_MAX`` (65,536) numbers -- so an SA commits its mark about
  once a second while it sends; a reservation that outlives that second
  (the sender slowed or stopped) shrinks back at the SA's next packet or
  the next ``expire`` tick.  Cost: after a crash (SIGKILL, power loss), an
  SA loses the data packets its MN numbers between the last one the HA
  accepted and the mark -- 32 for a slow sender; within about a second of
  the end of a fast burst, up to about a second of the burst's rate
  (at most 65,536), which an MN that then sends slowly takes long to pass.
  After a clean stop (``settle``) the marks are exact and nothing is lost.
  A fresh BU does not lower the mark: a BU that was held back (never
  delivered before the restart) would look just as fresh, and
  accepting data below the mark on its strength could replay data the HA
  had accepted.  The BU's own number is not affected by the mark, so
  registration works at once; data resumes when the MN's counter passes the
  mark (the MN's next packets, for an MN that kept sending).
* A withdrawn SPI (``remove_sa``: the HAC superseded or revoked the SA) is
  dead until the SA's validity end: its packets are dropped
  (``withdrawn_spi``) without asking the HAC (no ``NeedSA``), and
  ``install_sa`` refuses any SA under it (``SpiWithdrawn``), whatever its
  keys.  Until the twenty-ninth session an SA with other keys was taken
  for a new SA and its record replaced the withdrawal record -- which then
  no longer named the withdrawn SA: once the second SA was withdrawn in
  turn, the first installed again with fresh replay floors and its
  captured BUs were answered (found in review).  A HAC never issues an
  SPI again before the end of the SA it retired.  An SPI withdrawn before
  the HA knew it is refused for ``WITHDRAWN_UNKNOWN_TTL``.
* Records are capped (``max_spi_records``: live SAs plus withdrawal
  records): ``install_sa`` of an SPI without a record refuses past it
  (``SpiRecordsFull``); a withdrawal is never refused (its record is what
  keeps the SA dead).  Until the twenty-ninth session only withdrawals of
  SPIs never held were capped (``MAX_UNKNOWN_WITHDRAWN``), and an admitted
  HAC's install + withdraw pairs each left a record until the SA's end, up
  to a year away (found in review).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any, TypeAlias

from mipsec.core.addrtext import ip_text
from mipsec.core.bindings import Binding, BindingCache
from mipsec.core.errors import LocalProtocolError, MobilityHeaderError, PacketError
from mipsec.core.model import IssuedSA
from mipsec.core.nai import nai_key
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire.esp import (
    NEXT_HEADER_DSTOPTS,
    NEXT_HEADER_IPV4,
    NEXT_HEADER_IPV6,
    NEXT_HEADER_MH,
    PTYPE_DATA,
    PTYPE_MH,
    PTYPE_PLAIN,
    SEQ_MAX,
    SEQ_REINIT_THRESHOLD,
    InboundSA,
    OutboundSA,
    SequenceExhausted,
    Unprotected,
    encode_plain,
    peek_header,
)
from mipsec.core.wire.mh import (
    ACCEPTED,
    IPV4_ACK_DYNAMIC_NOT_AVAILABLE,
    IPV4_ACK_INCORRECT_HOA,
    IPV4_ACK_PREFIX_UNAUTHORIZED,
    IPV4_ACK_REASON_UNSPECIFIED,
    IPV4_ACK_SUCCESS,
    NOT_HOME_AGENT,
    REINIT_SA_WITH_HAC,
    SEQUENCE_OUT_OF_WINDOW,
    AlternateCareOfAddress,
    BindingAck,
    BindingUpdate,
    IPv4AddressAck,
    IPv4HomeAddressRequest,
    MobilityOption,
    UnknownOption,
    decode_mh,
    encode_mh,
    seq_newer,
)

__all__ = [
    "ADDED",
    "DATA_RESERVE_MAX",
    "DATA_RESERVE_MIN",
    "DATA_RESERVE_PERIOD",
    "DELETED",
    "EXPIRED",
    "MAX_DELETE_BCE_TIMEOUT",
    "MAX_SPI_RECORDS",
    "OUT_SEQ_RESERVE",
    "REFRESHED",
    "REGISTRATION_TYPE_CHANGE_DISALLOWED",
    "REINIT_MARGIN",
    "WITHDRAWN_UNKNOWN_TTL",
    "Action",
    "BindingChanged",
    "DataIn",
    "HaCore",
    "NeedSA",
    "Reply",
    "SpiRecordsFull",
    "SpiWithdrawn",
    "key_digest",
    "same_sa",
]

ADDED = "added"
REFRESHED = "refreshed"
DELETED = "deleted"
EXPIRED = "expired"

# RFC 6275 §6.1.8 status 139; not among mh.py's constants.
REGISTRATION_TYPE_CHANGE_DISALLOWED = 139
# RFC 6275 §12: how long a de-registered entry still guards its sequence number.
MAX_DELETE_BCE_TIMEOUT = 10.0
# Seconds of SA validity below which a BA says 176 (see the module docstring).
REINIT_MARGIN = 60.0
# HA->MN numbers kept for BAs at the end of an SA's sequence space: user data
# stops short of them, so a BA (176 above all, PROFILE §7) can always be sent.
BA_SEQ_KEEP = 2**16
DATA_SEQ_END = SEQ_MAX + 1 - BA_SEQ_KEEP
# HA->MN sequence numbers reserved (persisted) at a time; a restart skips at
# most this many, out of 2**32.
OUT_SEQ_RESERVE = 4096
# MN->HA data sequence numbers reserved ahead (see the module docstring): the
# reserve aims at DATA_RESERVE_PERIOD seconds of the SA's traffic.
DATA_RESERVE_MIN = 32
DATA_RESERVE_MAX = 1 << 16
DATA_RESERVE_PERIOD = 1.0
# How long an SPI withdrawn before the HA knew its SA stays dead (its
# validity end is unknown; an SA lives an hour by default).
WITHDRAWN_UNKNOWN_TTL = 86400.0
# Withdrawal records of SPIs this HA never held kept per process, at most.
MAX_UNKNOWN_WITHDRAWN = 65536
# SPI records (live SAs and withdrawal records) at most, by default: the
# default of [ha] max_spi_records (core/config.py).
MAX_SPI_RECORDS = 1_000_000

_HOME_ADDRESS_OPTION = 201  # RFC 6275 §6.3, in a Destination Options header
_NONCE_INDICES_OPTION = 5  # RFC 6275 §6.2.6: must not appear with H set (§9.5.1)
_UNSPECIFIED6 = IPv6Address("::")
_UNSPECIFIED4 = IPv4Address("0.0.0.0")  # noqa: S104 -- RFC 5555 "request an address" value
Address: TypeAlias = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``datagram`` to ``dst`` (the source address and port the BU came from)."""

    datagram: bytes
    dst: Address


@dataclass(frozen=True, slots=True)
class BindingChanged:
    """A binding cache change; ``lifetime`` is the granted lifetime in seconds."""

    event: str  # "added" | "refreshed" | "deleted" | "expired"
    hoa: str
    coa: Address
    lifetime: int
    spi: int
    previous_coa: Address | None = None  # "refreshed": the care-of address before


@dataclass(frozen=True, slots=True)
class NeedSA:
    """Unknown SPI with pulling enabled: fetch the SA, then ``receive`` again."""

    spi: int


@dataclass(frozen=True, slots=True)
class DataIn:
    """Tunnelled user data (PType 1 protected, PType 0 plain) for the data plane.

    ``hoa`` is the SA's home address (PType 1) or the binding that matched the
    inner source (PType 0).  For PType 1 the inner source has NOT been checked
    against the MN's home addresses: whoever forwards the packet must do that
    ingress filtering.
    """

    spi: int
    hoa: str | None
    next_header: int
    payload: bytes
    src: Address
    protected: bool


@dataclass(frozen=True, slots=True)
class AddressTaken:
    """Two MNs' live SAs named one home address: the newer SA kept it and
    the older was withdrawn (see ``HaCore._one_mn_per_address``)."""

    hoa: str
    kept_spi: int
    kept_mn_id: str
    withdrawn_spi: int
    withdrawn_mn_id: str


Action: TypeAlias = Reply | BindingChanged | NeedSA | DataIn | AddressTaken


def _routable_coa(address: IPv6Address, haa: IPv6Address | None) -> bool:
    """Whether an Alternate Care-of Address may be bound (RFC 6275 §6.1.7):
    not multicast, unspecified, loopback, link- or site-local, IPv4-mapped
    or -compatible (::/96), nor this HA's own address."""
    return not (
        address.is_multicast
        or address.is_link_local
        or address.is_site_local
        or address.ipv4_mapped is not None
        or address.packed[:12] == bytes(12)  # ::, ::1, IPv4-compatible
        or address == haa
    )


class SpiWithdrawn(LocalProtocolError):
    """``install_sa`` of an SA whose SPI the HAC withdrew: it is dead for good."""


class SpiRecordsFull(LocalProtocolError):
    """``install_sa`` of a new SPI while ``max_spi_records`` are held."""


def key_digest(issued: IssuedSA) -> bytes:
    """Which SA this is, without its keys: 16 octets of SHA-256 over suite, SPI and keys.

    Kept in the binding cache's SPI records (a digest reveals nothing of the
    random keys) so a withdrawn SA is recognised, and a later SA under the
    same SPI does not inherit another's counters.
    """
    sa = issued.sa
    h = hashlib.sha256(b"mipsec spi record\x00")
    h.update(int(sa.suite).to_bytes(2, "big") + sa.spi.to_bytes(4, "big"))
    for key in (sa.mn_to_ha_ikey, sa.ha_to_mn_ikey, sa.mn_to_ha_ekey, sa.ha_to_mn_ekey):
        h.update(len(key).to_bytes(2, "big") + bytes(key))
    return h.digest()[:16]


def same_sa(a: IssuedSA, b: IssuedSA) -> bool:
    """Equal SAs, keys compared in constant time (they are secrets)."""
    sa, sb = a.sa, b.sa
    keys_a = sa.mn_to_ha_ikey + sa.ha_to_mn_ikey + sa.mn_to_ha_ekey + sa.ha_to_mn_ekey
    keys_b = sb.mn_to_ha_ikey + sb.ha_to_mn_ikey + sb.mn_to_ha_ekey + sb.ha_to_mn_ekey
    same_keys = hmac.compare_digest(keys_a, keys_b)
    rest_a = (sa.spi, sa.mn_id, sa.suite, sa.scope, sa.validity_end, a.bootstrap)
    rest_b = (sb.spi, sb.mn_id, sb.suite, sb.scope, sb.validity_end, b.bootstrap)
    return same_keys and len(sa.mn_to_ha_ikey) == len(sb.mn_to_ha_ikey) and rest_a == rest_b


def _parse_dstopts(data: bytes) -> tuple[bytes | None, bytes] | None:
    """(Home Address option's 16 octets or None, the Mobility Header) or None if malformed.

    RFC 2460 §4.6 Destination Options header (Next Header, Hdr Ext Len in
    8-octet units not counting the first 8, options) carrying RFC 6275 §6.3's
    Home Address option (type 201, length 16).  An unrecognised option whose
    two high-order type bits are not 00 means "discard the packet" (RFC 2460
    §4.2).  What follows must be the Mobility Header (Next Header 135).
    """
    if len(data) < 8:
        return None
    ext_len = (data[1] + 1) * 8
    if data[0] != NEXT_HEADER_MH or len(data) < ext_len:
        return None
    hoa: bytes | None = None
    i = 2
    while i < ext_len:
        opt = data[i]
        if opt == 0:  # Pad1
            i += 1
            continue
        if i + 2 > ext_len:
            return None
        end = i + 2 + data[i + 1]
        if end > ext_len:
            return None
        if opt == _HOME_ADDRESS_OPTION:
            if data[i + 1] != 16 or hoa is not None:
                return None
            hoa = data[i + 2 : end]
        elif opt != 1 and opt >> 6:  # not PadN, and "skip" is not its action
            return None
        i = end
    return hoa, data[ext_len:]


class _SAEntry:
    """One installed SA with its crypto prepared once (DESIGN "Library traps")."""

    __slots__ = (
        "_inbound",
        "_out_seq",
        "_outbound",
        "_window",
        "ba_dst",
        "ba_src",
        "bu_dst",
        "bu_src",
        "data_floor",
        "data_mark",
        "data_raised_at",
        "data_reserve",
        "guard",
        "hoa",
        "in_floor",
        "ip4_hnp",
        "ip4_hoa",
        "ip6_hoa",
        "issued",
        "out_mark",
        "reinit_at",
        "scope",
        "spi",
        "validity_end",
    )

    def __init__(
        self,
        issued: IssuedSA,
        haa_ip6: IPv6Address | None,
        window: int,
        out_seq: int,
        out_mark: int,
        in_floor: int,
        data_mark: int,
        data_floor: int,
        now: float,
    ) -> None:
        sa, bs = issued.sa, issued.bootstrap
        self.issued = issued
        self.spi = sa.spi
        self.scope = sa.scope
        self.validity_end = sa.validity_end.timestamp()
        self.reinit_at = self.validity_end  # set by HaCore.install_sa
        # The ESP contexts are built at the SA's first packet (``inbound``,
        # ``outbound``): an install, and each SA restored at start, then costs
        # no key schedule, and an SA that never carries a packet none at all.
        self._inbound: InboundSA | None = None
        self._outbound: OutboundSA | None = None
        self._window = window
        self._out_seq = out_seq
        self.out_mark = out_mark  # numbers below it are reserved (persisted)
        # Restored at install (-1: nothing to guard): MH packets numbered
        # <= in_floor and data packets <= data_floor were accepted in an
        # earlier run, which this run's fresh window cannot know.
        self.in_floor = in_floor
        self.data_floor = data_floor
        self.guard = in_floor >= 0 or data_floor >= 0
        self.data_mark = data_mark  # persisted: no data packet >= it accepted
        self.data_reserve = DATA_RESERVE_MIN
        self.data_raised_at = now
        self.ip6_hoa = bs.ip6_hoa
        self.ip4_hoa = bs.ip4_hoa
        self.ip4_hnp: IPv4Network | None = bs.ip4_hnp
        hoa = bs.ip6_hoa if bs.ip6_hoa is not None else bs.ip4_hoa
        self.hoa: str | None = None if hoa is None else ip_text(hoa)
        # PROFILE §8: pseudo-header of the equivalent native packet, with the
        # provisioned mip6-haa-ip6 and "::" where an address is unknown --
        # never the HA's own configured address: the MN computes the checksum
        # from what the HAC provisioned, and so must the HA.
        haa = bs.haa_ip6 or _UNSPECIFIED6
        mn = bs.ip6_hoa or _UNSPECIFIED6
        self.bu_src, self.bu_dst = mn, haa
        self.ba_src, self.ba_dst = haa, mn

    # RFC 6618 §6.1: one SPI for both directions; MN->HA keys verify what we
    # receive, HA->MN keys protect what we send.
    @property
    def inbound(self) -> InboundSA:
        sa_in = self._inbound
        if sa_in is None:
            sa = self.issued.sa
            sa_in = self._inbound = InboundSA(
                SUITES[sa.suite], sa.mn_to_ha_ikey, sa.mn_to_ha_ekey, sa.spi, window=self._window
            )
        return sa_in

    @property
    def outbound(self) -> OutboundSA:
        sa_out = self._outbound
        if sa_out is None:
            sa = self.issued.sa
            sa_out = self._outbound = OutboundSA(
                SUITES[sa.suite],
                sa.ha_to_mn_ikey,
                sa.ha_to_mn_ekey,
                sa.spi,
                initial_seq=self._out_seq,
            )
        return sa_out

    @property
    def highest_in(self) -> int:
        """``inbound.highest_seq`` without building the context: -1 before any packet."""
        return -1 if self._inbound is None else self._inbound.highest_seq

    @property
    def out_seq(self) -> int:
        """``outbound.seq`` without building the context."""
        return self._out_seq if self._outbound is None else self._outbound.seq


class HaCore:
    """Sans-I/O Home Agent: SAs, BU/BA processing, binding cache, counters.

    ``bindings`` is the binding cache (in memory unless the caller passes a
    persistent one); ``pull`` makes an unknown SPI produce ``NeedSA``.
    """

    def __init__(
        self,
        ha_id: str,
        haa_ip6: IPv6Address | None = None,
        haa_ip4: IPv4Address | None = None,
        *,
        window: int = 64,
        max_binding_lifetime: float = 3600.0,
        reinit_margin: float = REINIT_MARGIN,
        bindings: BindingCache | None = None,
        pull: bool = False,
        max_spi_records: int | None = MAX_SPI_RECORDS,
    ) -> None:
        if max_binding_lifetime <= 0:
            raise LocalProtocolError("max_binding_lifetime: must be > 0 seconds")
        self.ha_id = ha_id
        self.haa_ip6 = haa_ip6
        self.haa_ip4 = haa_ip4
        self.window = window
        self.max_binding_lifetime = float(max_binding_lifetime)
        self.reinit_margin = float(reinit_margin)
        self.bindings = bindings if bindings is not None else BindingCache()
        self.pull = pull
        # SPI records (live SAs and withdrawal records) at most: ``install_sa``
        # of an SPI without one refuses past it (``SpiRecordsFull``); None: no cap.
        self.max_spi_records = max_spi_records
        # Set by the service while it loads its SAs after opening its sockets:
        # called with an SPI this core does not hold before that SPI is
        # judged unknown (it loads the SA now if the store has it).
        self.load_missing: Callable[[int], None] | None = None
        self._sas: dict[int, _SAEntry] = {}
        # Installed SAs per suite, kept with _sas: ``mipsec status`` at 100,000
        # SAs counted them with a pass over every SA, 55 ms of the loop that
        # forwards the MNs' packets.
        self._per_suite: dict[Suite, int] = {}
        self._sa_heap: list[tuple[float, int]] = []  # (validity_end, spi), stale allowed
        # SPIs whose data reservation is above the minimum: expire() trims
        # those that went quiet.
        self._big_reserves: set[int] = set()
        self.drops: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()  # packets, bu, data_in, need_sa, ...
        self.out_blocks = 0  # HA->MN number blocks reserved so far (write-behind)
        self._unknown_withdrawn: dict[int, None] = {}  # oldest first (_remember_unknown)
        self.ba_status: Counter[int] = Counter()

    # ------------------------------------------------------------ SAs

    def install_sa(
        self,
        issued: IssuedSA,
        *,
        initial_out_seq: int | None = None,
        now: float | None = None,
        capped: bool = True,
    ) -> bool:
        """Prepare the SA's crypto once and start accepting its SPI.

        Returns False when the very same SA is already installed (nothing
        changes: its replay window and counters stay).  A different SA under
        an installed SPI replaces it -- the provisioning side (HAC) decides
        which SA an SPI means.  Raises ``SpiWithdrawn`` for any SA under an
        SPI withdrawn earlier (``remove_sa``) whose record is in force.  The
        SPI's persisted record, when it is this SA's, restores the counters
        and replay floors (a restart).  Raises ``SpiRecordsFull`` for an SPI
        without a record while ``max_spi_records`` are held (``capped``
        False: an SA this HA held already, read from its store at start).
        ``initial_out_seq`` overrides the HA->MN counter (tests).
        """
        spi = issued.sa.spi
        t = time.time() if now is None else now
        digest = key_digest(issued)
        if self.is_withdrawn(issued, now=t, digest=digest):
            raise SpiWithdrawn(f"spi: {spi} was withdrawn; its SA is not accepted again")
        old = self._sas.get(spi)
        if old is not None and same_sa(old.issued, issued):
            return False
        if capped and not self.room_for(spi):
            raise SpiRecordsFull(
                f"spi: {spi} refused: {self.bindings.spi_record_count()} SPI records held "
                f"(live SAs and withdrawal records), max_spi_records {self.max_spi_records}"
            )
        if old is not None:
            self._uncount(self._sas.pop(spi))
            self._big_reserves.discard(spi)
        if initial_out_seq is not None and not 0 <= initial_out_seq <= SEQ_MAX + 1:
            raise LocalProtocolError(f"initial_out_seq: {initial_out_seq} outside 0..2**32")
        validity_end = issued.sa.validity_end.timestamp()
        bindings = self.bindings
        if bindings.claim_spi(spi, validity_end, digest):
            # This SA's record: a restart.  Resume the HA->MN counter at its
            # reservation and guard what the earlier run accepted.
            out_seq = out_mark = bindings.out_mark(spi) or 0
            hoa = issued.bootstrap.ip6_hoa or issued.bootstrap.ip4_hoa
            in_floor = bindings.replay_floor(spi, None if hoa is None else ip_text(hoa))
            data_mark = bindings.data_mark(spi) or 0
            data_floor = data_mark - 1
        else:
            # A new SA (or one replacing another SA's record): reserve its first
            # blocks of numbers now, on the (slow) provisioning path, rather
            # than on its first packets.
            out_seq, out_mark = 0, OUT_SEQ_RESERVE
            bindings.set_out_mark(spi, OUT_SEQ_RESERVE)
            in_floor = data_floor = -1
            data_mark = DATA_RESERVE_MIN
            bindings.set_data_mark(spi, data_mark)
        if initial_out_seq is not None:
            out_seq = out_mark = initial_out_seq
        entry = _SAEntry(
            issued, self.haa_ip6, self.window, out_seq, out_mark, in_floor, data_mark, data_floor, t
        )
        # 176 once less than reinit_margin of validity is left -- but never
        # more than a fifth of the SA's remaining life at install, so a short
        # SA (labs, tests) is not answered 176 from its first BU on, which
        # would send the MN into a re-bootstrap loop.
        margin = min(self.reinit_margin, 0.2 * max(0.0, entry.validity_end - t))
        entry.reinit_at = entry.validity_end - margin
        self._sas[spi] = entry
        suite = issued.sa.suite
        self._per_suite[suite] = self._per_suite.get(suite, 0) + 1
        heapq.heappush(self._sa_heap, (entry.validity_end, spi))
        if len(self._sa_heap) > 2 * len(self._sas) + 64:
            self._sa_heap = [(e.validity_end, e.spi) for e in self._sas.values()]
            heapq.heapify(self._sa_heap)
        return True

    def room_for(self, spi: int, more: int = 0) -> bool:
        """May an SA under ``spi`` be installed with ``more`` new records
        already promised (a burst)?  An SPI with a record takes no more room."""
        cap = self.max_spi_records
        return (
            cap is None
            or self.bindings.has_spi_record(spi)
            or self.bindings.spi_record_count() + more < cap
        )

    def is_withdrawn(
        self, issued: IssuedSA, *, now: float | None = None, digest: bytes | None = None
    ) -> bool:
        """Is ``issued``'s SPI withdrawn (a withdrawal record still in force)?

        Whatever the keys: the record must keep naming the SA it buried, so
        no other SA may claim the SPI before it ends (module docstring).
        ``digest`` is accepted for the callers' convenience and not needed."""
        dead = self.bindings.dead(issued.sa.spi)
        return dead is not None and dead.until > (time.time() if now is None else now)

    def remove_sa(
        self, spi: int, *, now: float | None = None, issued: IssuedSA | None = None
    ) -> list[BindingChanged]:
        """Withdraw an SA (the HAC superseded or revoked it): dead for good.

        Its binding goes with it, and the SPI's record becomes a withdrawal
        record until the SA's validity end, so neither its packets nor the
        same SA (a pull, a repeated install) are accepted again.  ``issued``
        names the SA when this core does not hold it (e.g. it was only in
        the store); with neither, the SPI is refused whatever the keys for
        ``WITHDRAWN_UNKNOWN_TTL``.
        """
        t = time.time() if now is None else now
        entry = self._sas.pop(spi, None)
        self._big_reserves.discard(spi)
        if entry is not None:
            self._uncount(entry)
        known = entry.issued if entry is not None else issued
        digest: bytes | None
        if known is not None:
            until, digest = known.sa.validity_end.timestamp(), key_digest(known)
        else:
            until, digest = t + WITHDRAWN_UNKNOWN_TTL, None
        prev = self.bindings.dead(spi)
        if known is None and prev is None:
            self._remember_unknown(spi)  # a record for an SPI never held here
        if prev is not None:
            # Withdrawn before: keep the longer end, and "any keys" when the
            # two records do not name the same SA.
            until = max(until, prev.until)
            if prev.key_digest is None or digest is None or prev.key_digest != digest:
                digest = None
        self.bindings.bury_spi(spi, until, digest)
        return [] if entry is None else self._unbind(entry, DELETED, t)

    def _remember_unknown(self, spi: int) -> None:
        """Withdrawals of SPIs this HA never held, each a record for any keys
        (24 h): at most MAX_UNKNOWN_WITHDRAWN in this process, the oldest
        forgotten.  Unbounded, a HAC withdrawing made-up SPIs grew the HA by
        ~300 B each (200,000: 58 MB, found in review)."""
        unknown = self._unknown_withdrawn
        unknown.pop(spi, None)
        unknown[spi] = None
        while len(unknown) > MAX_UNKNOWN_WITHDRAWN:
            oldest = next(iter(unknown))
            del unknown[oldest]
            if self.bindings.unbury_spi(oldest):  # still that record (not reinstalled)
                self.counts["unknown_withdrawals_forgotten"] += 1

    def has_spi(self, spi: int) -> bool:
        return spi in self._sas

    def installed_sa(self, spi: int) -> IssuedSA | None:
        """The SA installed under ``spi``, if any."""
        entry = self._sas.get(spi)
        return None if entry is None else entry.issued

    def spis(self) -> list[int]:
        return list(self._sas)

    def installed(self) -> list[IssuedSA]:
        """The SAs installed now (for inspection: ``mipsec sas``)."""
        return [e.issued for e in self._sas.values()]

    def sa_count(self) -> int:
        return len(self._sas)

    def per_suite(self) -> dict[Suite, int]:
        """Installed SAs per suite, without a pass over them (``mipsec status``)."""
        return dict(self._per_suite)

    def _uncount(self, entry: _SAEntry) -> None:
        suite = entry.issued.sa.suite
        n = self._per_suite[suite] - 1
        if n:
            self._per_suite[suite] = n
        else:
            del self._per_suite[suite]

    def _unbind(self, entry: _SAEntry, event: str, now: float) -> list[BindingChanged]:
        if entry.hoa is None:
            return []
        b = self.bindings.get(entry.hoa)
        if b is None or b.spi != entry.spi:
            return []
        self.bindings.delete(entry.hoa)
        # As after a de-registration (RFC 6275 §10.3.2): a delayed BU under
        # another SA of this HoA cannot re-create the binding with an old number.
        self.bindings.set_deleted(b.hoa, b.sequence, now + MAX_DELETE_BCE_TIMEOUT)
        return [BindingChanged(event, b.hoa, b.coa, b.lifetime, b.spi)]

    def settle(self) -> int:
        """Make every data reservation exact (before a clean stop); how many changed.

        After it, a restart loses no data packet: the persisted marks are
        just above what each SA accepted.
        """
        changed = 0
        for entry in self._sas.values():
            exact = max(entry.highest_in, entry.data_floor) + 1
            if exact < entry.data_mark:
                entry.data_mark = exact
                entry.data_reserve = DATA_RESERVE_MIN
                self.bindings.set_data_mark(entry.spi, exact)
                changed += 1
        self._big_reserves.clear()
        return changed

    # ------------------------------------------------------------ timers

    def next_expiry(self) -> float | None:
        """Earliest instant at which ``expire`` may have something to do."""
        times = [t for t in (self.bindings.next_expiry(),) if t is not None]
        if self._sa_heap:
            times.append(self._sa_heap[0][0])
        return min(times) if times else None

    def expire(self, now: float, limit: int | None = None) -> list[BindingChanged]:
        """End bindings whose lifetime passed and SAs past their validity end.

        Also ends the records that prevent replays once they have nothing
        left to guard, and shrinks the data reservation of SAs that went quiet.
        ``limit``: at most that many bindings, SAs and records of each kind
        (the rest stay due: ``expiry_due``), so that 100,000 of them ending
        together do not hold the event loop for seconds in one call.
        """
        events = [
            BindingChanged(EXPIRED, b.hoa, b.coa, b.lifetime, b.spi)
            for b in self.bindings.pop_expired(now, limit)
        ]
        heap = self._sa_heap
        ended = 0
        while heap and heap[0][0] <= now and (limit is None or ended < limit):
            ended += 1
            end, spi = heapq.heappop(heap)
            entry = self._sas.get(spi)
            if entry is None or entry.validity_end != end:
                continue  # removed or replaced since
            del self._sas[spi]
            self._uncount(entry)
            self._big_reserves.discard(spi)
            # Bindings never outlive their SA (lifetime is capped by it), but
            # a clock step could leave one behind.
            events.extend(self._unbind(entry, EXPIRED, now))
            self.bindings.forget_spi(spi)
        self.bindings.purge(now, limit)
        if self._big_reserves:
            self._trim_reserves(now)
        return events

    def expiry_due(self, now: float) -> bool:
        """Is anything left for ``expire`` at ``now`` (after a limited call)?"""
        nxt = self.next_expiry()
        return (nxt is not None and nxt <= now) or self.bindings.purge_due(now)

    def _missing(self, spi: int) -> _SAEntry | None:
        """An SPI this core does not hold: while the service loads its SAs,
        it may load this one now (``load_missing``)."""
        if self.load_missing is None:
            return None
        self.load_missing(spi)
        return self._sas.get(spi)

    def _trim_reserves(self, now: float) -> None:
        # A reservation sized for a fast sender that stopped would cost that
        # many packets after a crash: bring it back to the minimum above
        # what was accepted (lowering the mark is safe -- nothing at or
        # above the new one was accepted).
        for spi in list(self._big_reserves):
            entry = self._sas.get(spi)
            if entry is None:
                self._big_reserves.discard(spi)
                continue
            if now - entry.data_raised_at > DATA_RESERVE_PERIOD:
                self._trim_reserve(entry, now)

    def _trim_reserve(self, entry: _SAEntry, now: float) -> None:
        """The reservation back to the minimum above what was accepted.

        Called once a reservation has outlived the DATA_RESERVE_PERIOD it
        was sized for (the sender slowed or stopped): from the expiry tick
        and from the SA's next data packet, whichever comes first.  The tick
        waited two periods before, and no packet looked: a crash 1.4 s after
        a 40,000-packet/s burst left the mark 39,000 numbers ahead, 2 hours
        of an MN that went on at 5 packets/s (found in review)."""
        self._big_reserves.discard(entry.spi)
        mark = max(entry.highest_in, entry.data_floor) + 1 + DATA_RESERVE_MIN
        if mark < entry.data_mark:
            entry.data_mark = mark
            entry.data_reserve = DATA_RESERVE_MIN
            entry.data_raised_at = now
            self.bindings.set_data_mark(entry.spi, mark)

    def _reserve_data(self, entry: _SAEntry, seq: int, now: float) -> None:
        """Data packet ``seq`` reached the mark: reserve the next block beyond it.

        The block holds about DATA_RESERVE_PERIOD of the SA's traffic at the
        rate it used the previous block.
        """
        used = seq + 1 - (entry.data_mark - entry.data_reserve)
        elapsed = now - entry.data_raised_at
        # At most twice the last reserve: a rate measured over a burst's
        # first microseconds (the 33 packets after a trim) claimed the whole
        # 65,536 at once, so a bursty sender's mark sat ~65,000 ahead most of
        # the time (found in review).  A sender that keeps the rate up
        # doubles its way there in a few raises.
        ceiling = min(2 * entry.data_reserve, DATA_RESERVE_MAX)
        if elapsed > 0:
            want = int(used * DATA_RESERVE_PERIOD / elapsed)
            reserve = min(max(want, DATA_RESERVE_MIN), ceiling)
        else:
            reserve = ceiling
        entry.data_reserve = reserve
        entry.data_raised_at = now
        entry.data_mark = min(seq + 1 + reserve, SEQ_MAX + 1)
        self.bindings.set_data_mark(entry.spi, entry.data_mark)
        if reserve > DATA_RESERVE_MIN:
            self._big_reserves.add(entry.spi)

    # ------------------------------------------------------------ packets

    def _drop(self, reason: str) -> list[Action]:
        self.drops[reason] += 1
        return []

    def receive(
        self, datagram: bytes, src: tuple[Any, ...], now: float, *, allow_pull: bool = True
    ) -> list[Action]:
        """Process one datagram from ``src`` = (host, port, ...).

        ``allow_pull=False`` is for the second pass after a pull: an SPI that
        is still unknown is then dropped and counted instead of asked for (the
        datagram was counted as a packet on its first pass).
        """
        if allow_pull:
            self.counts["packets"] += 1
        try:
            ptype, spi = peek_header(datagram)
        except PacketError as exc:
            return self._drop(exc.drop_reason)
        if ptype == PTYPE_PLAIN:
            return self._plain(datagram, src, now)
        entry = self._sas.get(spi)
        if entry is None:
            entry = self._missing(spi)
        if entry is None:
            if self.bindings.dead(spi) is not None:
                return self._drop("withdrawn_spi")  # never pulled back either
            if self.pull and allow_pull:
                self.counts["need_sa"] += 1
                return [NeedSA(spi)]
            return self._drop("unknown_spi")
        if now >= entry.validity_end:
            return self._drop("expired_sa")
        if ptype == PTYPE_DATA and entry.scope == 0:
            # PROFILE §7: user data under an SA of mip6-sas 0 goes as PType 0;
            # PType 1 is the wrong PType for that scope (RFC 6618 §5.6.4).
            return self._drop("scope")
        # After a restart, numbers the previous run accepted are replays even
        # though the fresh window has not seen them (module docstring).
        if (
            entry.guard
            and len(datagram) >= 8
            and int.from_bytes(datagram[4:8], "big")
            <= (entry.in_floor if ptype == PTYPE_MH else entry.data_floor)
        ):
            return self._drop("replay")
        try:
            u = entry.inbound.unprotect(datagram)
        except PacketError as exc:
            return self._drop(exc.drop_reason)
        if u.ptype == PTYPE_DATA:
            if u.seq >= entry.data_mark:
                self._reserve_data(entry, u.seq, now)
            elif (
                entry.data_reserve > DATA_RESERVE_MIN
                and now - entry.data_raised_at > DATA_RESERVE_PERIOD
            ):
                self._trim_reserve(entry, now)  # the sender slowed: see _trim_reserve
            self.counts["data_in"] += 1
            return [DataIn(entry.spi, entry.hoa, u.next_header, u.payload, (src[0], src[1]), True)]
        # Whatever the BU leads to, its number is used: exact floor, committed
        # before any reply (module docstring).
        self.bindings.raise_floor(entry.spi, u.seq)
        return self._mobility(entry, u, (src[0], src[1]), now)

    def _plain(self, datagram: bytes, src: tuple[Any, ...], now: float) -> list[Action]:
        """PType 0 (PROFILE §7): only from a registered HoA of a scope-0 SA at its CoA."""
        payload = bytes(datagram[8:])
        if not payload:
            return self._drop("malformed")
        version = payload[0] >> 4
        if version == 6 and len(payload) >= 40:
            inner, nh = payload[8:24], NEXT_HEADER_IPV6
        elif version == 4 and len(payload) >= 20:
            inner, nh = payload[12:16], NEXT_HEADER_IPV4
        else:
            return self._drop("malformed")
        b = self.bindings.by_address(inner)
        if b is None or src[0] != b.coa_host or src[1] != b.coa_port:
            return self._drop("scope")
        entry = self._sas.get(b.spi)
        if entry is None:
            entry = self._missing(b.spi)
        if entry is None or entry.scope != 0:
            # RFC 6618 §6.4: with mip6-sas 1 the receiver MUST silently
            # discard PType 0.
            return self._drop("scope")
        if now >= entry.validity_end:
            return self._drop("expired_sa")
        self.counts["data_in"] += 1
        return [DataIn(0, b.hoa, nh, payload, (src[0], src[1]), False)]

    # ------------------------------------------------------------ binding updates

    def _mobility(self, entry: _SAEntry, u: Unprotected, src: Address, now: float) -> list[Action]:
        hoa_option: bytes | None = None
        if u.next_header == NEXT_HEADER_MH:
            mh_octets = u.payload
        elif u.next_header == NEXT_HEADER_DSTOPTS:
            parsed = _parse_dstopts(u.payload)
            if parsed is None:
                return self._drop("malformed")
            hoa_option, mh_octets = parsed
        else:
            return self._drop("malformed")
        try:
            decoded = decode_mh(mh_octets, src=entry.bu_src, dst=entry.bu_dst)
        except MobilityHeaderError:
            return self._drop("malformed")
        bu = decoded.message
        if not isinstance(bu, BindingUpdate):
            return self._drop("malformed")  # an MN never sends a BA
        self.counts["bu"] += 1
        if not decoded.checksum_ok:
            self.counts["checksum_mismatch"] += 1
        hoa = entry.hoa
        if hoa is None or (
            hoa_option is not None and (entry.ip6_hoa is None or hoa_option != entry.ip6_hoa.packed)
        ):
            # PROFILE §8: the HoA is the SA's; RFC 6275 §10.3.1 status 133.
            return self._ba(entry, src, NOT_HOME_AGENT, bu.sequence, 0)
        binding = self.bindings.get(hoa)
        taken: list[Action] = []
        if (binding is not None and binding.spi != entry.spi) or entry.ip4_hoa is not None:
            taken, stale = self._one_mn_per_address(entry, binding, hoa, now)
            if stale:
                # This SA is the stale one: 176 sends its MN to the HAC for a
                # new SA (and a new address); the SA is dead from now on.
                out = self._ba(entry, src, REINIT_SA_WITH_HAC, bu.sequence, 0)
                self.remove_sa(entry.spi, now=now)
                return [*out, *taken]
            if taken:  # another MN's binding went with its SA
                binding = self.bindings.get(hoa)
        return taken + self._bind(entry, u, src, now, bu, hoa_option, hoa, binding)

    def _bind(
        self,
        entry: _SAEntry,
        u: Unprotected,
        src: Address,
        now: float,
        bu: BindingUpdate,
        hoa_option: bytes | None,
        hoa: str,
        binding: Binding | None,
    ) -> list[Action]:
        """The BU of a verified SA for its own address: RFC 6275 §10.3."""
        last: int | None = None
        if binding is not None:
            last = binding.sequence
        else:
            tomb = self.bindings.deleted(hoa)
            if tomb is not None and tomb.until > now:
                last = tomb.sequence
        if last is not None and not seq_newer(bu.sequence, last):
            # RFC 6275 §9.5.1: 135 with the last accepted sequence number.
            return self._ba(entry, src, SEQUENCE_OUT_OF_WINDOW, last, 0)
        if not bu.h:
            if binding is not None:
                return self._ba(entry, src, REGISTRATION_TYPE_CHANGE_DISALLOWED, bu.sequence, 0)
            return self._drop("not_home_registration")
        coa_host = src[0]
        ip4_request: IPv4HomeAddressRequest | None = None
        for opt in bu.options:
            if isinstance(opt, AlternateCareOfAddress):
                if not _routable_coa(opt.address, self.haa_ip6):
                    # RFC 6275 §6.1.7: a care-of address that is not unicast
                    # routable MUST be silently discarded.  Taken before
                    # (found in review): the MN's downlink went to ff02::1,
                    # ::1, or this HA's own address and a port of its choice.
                    return self._drop("bad_coa")
                coa_host = str(opt.address)
            elif isinstance(opt, IPv4HomeAddressRequest):
                if ip4_request is None:
                    ip4_request = opt
            elif isinstance(opt, UnknownOption) and opt.option_type == _NONCE_INDICES_OPTION:
                return self._drop("malformed")  # RFC 6275 §9.5.1: not with H set
        if bu.lifetime == 0:
            return self._deregister(entry, src, bu, binding, hoa, now)
        remaining = entry.validity_end - now
        units = int(min(bu.lifetime * 4, self.max_binding_lifetime, remaining) // 4)
        reinit = (
            now >= entry.reinit_at
            or entry.out_seq >= SEQ_REINIT_THRESHOLD
            or entry.inbound.needs_reinit
        )
        status = REINIT_SA_WITH_HAC if reinit else ACCEPTED
        options: tuple[MobilityOption, ...] = ()
        ip4_hoa: str | None = None
        if ip4_request is not None:
            ack = self._ipv4_ack(entry, ip4_request)
            options = (ack,)
            if ack.accepted:
                ip4_hoa = str(ack.home_address)
        if units == 0:
            # Less than one 4-s unit of SA validity left (or a policy cap
            # below 4 s): nothing to bind; the status (176) says why.
            return self._ba(entry, src, status, bu.sequence, 0, options)
        out = self._ba(entry, src, status, bu.sequence, units, options)
        lifetime = units * 4
        if binding is None:
            binding = Binding(
                hoa, coa_host, src[1], entry.spi, bu.sequence, lifetime, now + lifetime,
                ip4_hoa, u.seq,
            )  # fmt: skip
            event = ADDED
            previous = None
            self.bindings.clear_deleted(hoa)
        else:
            previous = binding.coa
            binding.coa_host = coa_host
            binding.coa_port = src[1]
            binding.spi = entry.spi
            binding.sequence = bu.sequence
            binding.lifetime = lifetime
            binding.expires_at = now + lifetime
            binding.ip4_hoa = ip4_hoa
            binding.mn_seq = u.seq
            event = REFRESHED
        self.bindings.put(binding)
        out.append(BindingChanged(event, hoa, (coa_host, src[1]), lifetime, entry.spi, previous))
        return out

    def _one_mn_per_address(
        self, entry: _SAEntry, binding: Binding | None, hoa: str, now: float
    ) -> tuple[list[Action], bool]:
        """One MN per home address, whatever a HAC says.

        A HAC hands an address to one MN at a time, but a HAC that lost its
        last commits (a power loss under ``[sa_store] synchronous =
        "normal"``) may hand an address again while this HA still holds the
        older MN's SA for it; the two MNs' BUs would then take the binding
        from each other.  The SA with the later validity end (issued later)
        keeps the address; the other is withdrawn here (dead until its end,
        as if its HAC had withdrawn it).  Another SA of the *same* MN is the
        normal case of a re-bootstrap and is left alone.  Returns what was
        decided (``AddressTaken`` and the binding events; nothing when
        nothing was) and whether ``entry`` itself is the stale SA.
        """
        holders: list[int] = []
        if binding is not None and binding.spi != entry.spi:
            holders.append(binding.spi)
        if entry.ip4_hoa is not None:
            b4 = self.bindings.by_address(entry.ip4_hoa.packed)
            if b4 is not None and b4.hoa != hoa and b4.spi != entry.spi:
                holders.append(b4.spi)
        if not holders:  # every BU of a DSMIP6 MN comes here: keep it cheap
            return [], False
        out: list[Action] = []
        mine = nai_key(entry.issued.sa.mn_id)
        for spi in holders:
            holder = self._sas.get(spi)
            if holder is None or nai_key(holder.issued.sa.mn_id) == mine:
                continue
            if entry.validity_end > holder.validity_end:
                kept, stale = entry, holder
            else:
                kept, stale = holder, entry
            sa_k, sa_s = kept.issued.sa, stale.issued.sa
            out.append(AddressTaken(hoa, sa_k.spi, sa_k.mn_id, sa_s.spi, sa_s.mn_id))
            if stale is entry:
                return out, True
            out.extend(self.remove_sa(stale.spi, now=now))
            # The tomb its binding left guards the old MN's numbers, not the
            # new one's (whose own SA's replay checks hold).
            self.bindings.clear_deleted(stale.hoa or hoa)
        return out, False

    def _deregister(
        self,
        entry: _SAEntry,
        src: Address,
        bu: BindingUpdate,
        binding: Binding | None,
        hoa: str,
        now: float,
    ) -> list[Action]:
        """RFC 6275 §10.3.2: delete the home registration, BA 0 with lifetime 0."""
        if binding is None:
            if self.bindings.deleted(hoa) is None:
                return self._ba(entry, src, NOT_HOME_AGENT, bu.sequence, 0)
            # A newer de-registration right after one that succeeded (its BA
            # was lost): still success.
            self.bindings.set_deleted(hoa, bu.sequence, now + MAX_DELETE_BCE_TIMEOUT)
            return self._ba(entry, src, ACCEPTED, bu.sequence, 0)
        self.bindings.delete(hoa)
        self.bindings.set_deleted(hoa, bu.sequence, now + MAX_DELETE_BCE_TIMEOUT)
        out = self._ba(entry, src, ACCEPTED, bu.sequence, 0)
        out.append(BindingChanged(DELETED, hoa, binding.coa, 0, binding.spi))
        return out

    def _ipv4_ack(self, entry: _SAEntry, req: IPv4HomeAddressRequest) -> IPv4AddressAck:
        """RFC 5555 §4.5 checks, answered with §3.2.1's option."""
        mine = entry.ip4_hoa
        asked = req.home_address
        if req.prefix_len == 0:  # §3.1.1: "A value of zero is invalid"
            return IPv4AddressAck(IPV4_ACK_REASON_UNSPECIFIED, 0, asked)
        if req.p and entry.ip4_hnp is None:
            return IPv4AddressAck(IPV4_ACK_PREFIX_UNAUTHORIZED, 0, asked)
        if mine is None:
            if asked == _UNSPECIFIED4:
                return IPv4AddressAck(IPV4_ACK_DYNAMIC_NOT_AVAILABLE, 0, asked)
            return IPv4AddressAck(IPV4_ACK_INCORRECT_HOA, 0, asked)
        if asked != _UNSPECIFIED4 and asked != mine:
            # §4.5: the address must be the one allocated to this MN.
            return IPv4AddressAck(IPV4_ACK_INCORRECT_HOA, 0, asked)
        hnp = entry.ip4_hnp
        plen = hnp.prefixlen if hnp is not None and mine in hnp else 32
        return IPv4AddressAck(IPV4_ACK_SUCCESS, plen, mine)

    def _ba(
        self,
        entry: _SAEntry,
        dst: Address,
        status: int,
        sequence: int,
        lifetime_units: int,
        options: tuple[MobilityOption, ...] = (),
    ) -> list[Action]:
        """A BA protected with the SA (PType 8, Next Header 135) for ``dst``."""
        ba = BindingAck(status=status, sequence=sequence, lifetime=lifetime_units, options=options)
        octets = encode_mh(ba, src=entry.ba_src, dst=entry.ba_dst)
        self._reserve_out(entry)
        try:
            datagram = entry.outbound.protect(PTYPE_MH, NEXT_HEADER_MH, octets)
        except SequenceExhausted:
            return self._drop("seq_exhausted")
        self.ba_status[status] += 1
        return [Reply(datagram, dst)]

    def _reserve_out(self, entry: _SAEntry) -> None:
        if entry.outbound.seq >= entry.out_mark:
            # Reserve the next block of numbers before using the first of
            # them, so a restart resumes above anything sent (bindings.py).
            entry.out_mark = min(entry.outbound.seq + OUT_SEQ_RESERVE, SEQ_MAX + 1)
            self.bindings.set_out_mark(entry.spi, entry.out_mark)
            self.out_blocks += 1  # the data plane commits before sending (ha_data.py)

    # ------------------------------------------------------------ user data out

    def protect_data(self, spi: int, next_header: int, packet: bytes, now: float) -> bytes | None:
        """A home-network packet for the MN of ``spi`` as one datagram (RFC 6618 §6.4).

        PType 1 under an SA of ``mip6-sas`` 1, PType 0 (plaintext) under 0
        (PROFILE §7).  It shares the SA's HA->MN sequence numbers with the
        BAs, reserved the same way.  None: no such SA or it has ended;
        ``SequenceExhausted``: its numbers for data are used up (the last
        ``BA_SEQ_KEEP`` are kept for BAs) -- the caller
        (``forwarding.HaForwarder``) decides which binding the packet belongs
        to and counts the drop.
        """
        entry = self._sas.get(spi)
        if entry is None:
            entry = self._missing(spi)
        if entry is None or now >= entry.validity_end:
            return None
        if entry.scope == 0:
            return encode_plain(packet)
        if entry.outbound.seq >= DATA_SEQ_END:
            # The last BA_SEQ_KEEP numbers are the BAs': data used them up to
            # 2**32 - 1 before, and the BA 176 that PROFILE §7 requires past
            # SEQ_REINIT_THRESHOLD could then no longer be sent (found in
            # review).  The MN re-bootstraps on its own inbound counter too
            # (mn_registration.py), so the downlink resumes under a new SA.
            raise SequenceExhausted("data numbers of this SA used up: the rest are the BAs'")
        self._reserve_out(entry)
        return entry.outbound.protect(PTYPE_DATA, next_header, packet)

    # ------------------------------------------------------------ inspection

    def binding(self, hoa: str) -> Binding | None:
        return self.bindings.get(hoa)

    def stats(self) -> dict[str, Any]:
        """Counters: packets, BUs, BAs per status, drops per reason, sizes."""
        return {
            "packets": self.counts["packets"],
            "bu": self.counts["bu"],
            "ba": dict(self.ba_status),
            "drops": dict(self.drops),
            "checksum_mismatch": self.counts["checksum_mismatch"],
            "data_in": self.counts["data_in"],
            "need_sa": self.counts["need_sa"],
            "sas": len(self._sas),
            "bindings": len(self.bindings),
            **self.bindings.records(),
        }
