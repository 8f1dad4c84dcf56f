"""Home-address allocator ``pool`` (bootstrap data of RFC 6618 §5.7.3).

Options (all optional, at least one pool required)::

    ip6_prefix   = "2001:db8:1::/64"     # home link prefix; HoAs come from it
    ip6_first    = "2001:db8:1::100"     # optional range inside ip6_prefix
    ip6_last     = "2001:db8:1::1ff"
    ip6_hnp_pool = "2001:db8:100::/48"   # per-MN home network prefixes ...
    ip6_hnp_len  = 64                    # ... of this length
    ip4_pool     = "192.0.2.0/24"        # IPv4 HoAs (DSMIP6, RFC 5555)
    ip4_subnet_len = 24                  # home subnet length (default: the pool's)
    exclude      = ["2001:db8:1::1"]     # e.g. the HA's own addresses

The allocator keeps no state of its own: ``in_use`` (every HoA of a live
SA -> mn_id, from the SA store) is the truth -- the allocator only keeps an
index of it, followed change by change (see ``PoolAllocator``) -- so a
restart or a second HAC sharing the store never hands one address to two
MNs.  An MN that already holds an address of a pool gets it again;
otherwise the lowest free one.

IPv6 HNP: without a per-MN pool, ``ip6_hnp`` is ``ip6_prefix`` (the home
link).  With ``ip6_hnp_pool`` and ``ip6_prefix``, the HoA at offset k of the
range gets the k-th prefix, so unique HoAs imply unique prefixes.  With
``ip6_hnp_pool`` alone, each MN gets a free prefix and the HoA is its
``::1`` address.

Never handed out: the Subnet-Router anycast address (interface identifier
zero, RFC 4291 §2.6.1), the reserved subnet anycast addresses (RFC 2526 §2:
the highest 128 interface identifiers), the IPv4 network and broadcast
addresses of the home subnet, ``exclude``, and on a HAC every HA and DNS
server address it provisions (``ctx.extra["reserved_addresses"]``, listed in
``exclude`` or not: the first MN used to get the HA's ``prefix::1``).
"""

from __future__ import annotations

import heapq
import socket
from collections.abc import Callable, Container, Iterable, Mapping
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
)
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

from mipsec.core.confvalues import IPv4NetText, IPv6NetText, IPv6Text
from mipsec.core.hoa_table import HoATable
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.model import HomeAssignment
from mipsec.plugins._options import parse_options

# RFC 2526 §2: in a /64 (EUI-64 format) the reserved subnet anycast
# interface identifiers are FDFF:FFFF:FFFF:FF80 .. FDFF:FFFF:FFFF:FFFF;
# in other prefixes the highest 128 addresses.
_EUI64_ANYCAST_LOW = 0xFDFF_FFFF_FFFF_FF80
_EUI64_ANYCAST_HIGH = 0xFDFF_FFFF_FFFF_FFFF


def _ip6_reserved(addr: int, net: IPv6Network) -> bool:
    base = int(net.network_address)
    iid = addr - base
    if iid == 0:
        return True  # Subnet-Router anycast (RFC 4291 §2.6.1)
    if net.prefixlen == 64:
        return _EUI64_ANYCAST_LOW <= iid <= _EUI64_ANYCAST_HIGH
    if net.prefixlen <= 120:
        return iid >= net.num_addresses - 128
    return False


def _any_ip(value: object) -> IPv4Address | IPv6Address:
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    if not isinstance(value, str):
        raise ValueError("not an IP address")
    try:
        return ip_address(value)
    except ValueError:
        raise ValueError("not an IP address") from None


_AnyIP = Annotated[IPv4Address | IPv6Address, PlainValidator(_any_ip)]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ip6_prefix: IPv6NetText | None = None
    ip6_first: IPv6Text | None = None
    ip6_last: IPv6Text | None = None
    ip6_hnp_pool: IPv6NetText | None = None
    ip6_hnp_len: int | None = Field(default=None, ge=1, le=127)
    ip4_pool: IPv4NetText | None = None
    ip4_subnet_len: int | None = Field(default=None, ge=0, le=32)
    exclude: list[_AnyIP] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> _Options:
        if self.ip6_prefix is None and self.ip6_hnp_pool is None and self.ip4_pool is None:
            raise ValueError("one of ip6_prefix, ip6_hnp_pool, ip4_pool is required")
        for name in ("ip6_first", "ip6_last"):
            a = getattr(self, name)
            if a is not None and (self.ip6_prefix is None or a not in self.ip6_prefix):
                raise ValueError(f"{name}: not inside ip6_prefix")
        if self.ip6_first and self.ip6_last and self.ip6_first > self.ip6_last:
            raise ValueError("ip6_first: greater than ip6_last")
        if (self.ip6_hnp_len is None) != (self.ip6_hnp_pool is None):
            raise ValueError("ip6_hnp_len: ip6_hnp_len and ip6_hnp_pool go together")
        if self.ip6_hnp_pool is not None and self.ip6_hnp_len is not None:
            if self.ip6_hnp_len < self.ip6_hnp_pool.prefixlen:
                raise ValueError("ip6_hnp_len: shorter than the prefix of ip6_hnp_pool")
        if self.ip4_subnet_len is not None:
            if self.ip4_pool is None:
                raise ValueError("ip4_subnet_len: needs ip4_pool")
            if self.ip4_subnet_len > self.ip4_pool.prefixlen:
                raise ValueError("ip4_subnet_len: longer than the prefix of ip4_pool")
        return self


def _parse(text: str) -> tuple[int, int] | None:
    """``(version, int)`` of an address text; None when it is not an address."""
    # inet_pton first: about ten times faster than ip_address() on the
    # canonical texts the store holds (a start-up indexes every live HoA).
    # Anything it refuses goes to ip_address(), the reference.
    try:
        if ":" in text:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text))
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        pass
    try:
        ip = ip_address(text)
    except ValueError:
        return None
    return ip.version, int(ip)


class _Slots:
    """The lowest free slot in ``[lo, hi]``, found in amortised O(1).

    ``occ`` tells which slots are in use (kept by the owner, who calls
    :meth:`freed` when one leaves use); ``blocked`` the slots never handed
    out.  Every slot below ``hw`` is known to be occupied or blocked, except
    those in ``holes`` (a min-heap; an entry may have been taken again since,
    and is dropped lazily).  So the answer is the lowest valid hole, else the
    first free slot from ``hw`` on -- and ``hw`` only moves forward.
    """

    __slots__ = ("blocked", "hi", "holes", "hw", "in_holes", "occ")

    def __init__(
        self, lo: int, hi: int, occ: Container[int], blocked: Callable[[int], bool]
    ) -> None:
        self.hi = hi
        self.hw = lo
        self.occ = occ
        self.blocked = blocked
        self.holes: list[int] = []
        self.in_holes: set[int] = set()

    def freed(self, s: int) -> None:
        if s < self.hw and s not in self.in_holes and not self.blocked(s):
            heapq.heappush(self.holes, s)
            self.in_holes.add(s)

    def first(self) -> int | None:
        holes, occ = self.holes, self.occ
        while holes:
            s = holes[0]
            if s not in occ:
                return s
            heapq.heappop(holes)
            self.in_holes.discard(s)
        s, hi, blocked = self.hw, self.hi, self.blocked
        while s <= hi and (s in occ or blocked(s)):
            s += 1
        self.hw = s
        return s if s <= hi else None


class _Family:
    """The live addresses of one IP version: address -> holder, holder -> addresses.

    Several texts may spell one address (only from a hand-edited store: the
    store writes canonical texts); ``extra`` counts the further spellings so
    the address stays in use until the last one goes.
    """

    __slots__ = ("extra", "on_free", "on_take", "own", "used")

    def __init__(self) -> None:
        self.used: dict[int, str] = {}
        self.own: dict[str, list[int]] = {}
        self.extra: dict[int, int] = {}
        # Per-pool hooks: a slot structure learns takes and frees (O(1) each).
        self.on_take: list[Callable[[int], None]] = []
        self.on_free: list[Callable[[int], None]] = []

    def _own_add(self, mn_id: str, a: int) -> None:
        self.own.setdefault(mn_id, []).append(a)

    def _own_remove(self, mn_id: str, a: int) -> None:
        mine = self.own.get(mn_id)
        if mine is not None and a in mine:
            mine.remove(a)
            if not mine:
                del self.own[mn_id]

    def add(self, a: int, mn_id: str) -> None:
        holder = self.used.get(a)
        if holder is not None:
            self.extra[a] = self.extra.get(a, 0) + 1
            self.change(a, mn_id)
            return
        self.used[a] = mn_id
        self._own_add(mn_id, a)
        for f in self.on_take:
            f(a)

    def change(self, a: int, mn_id: str) -> None:
        holder = self.used.get(a)
        if holder is None:
            self.add(a, mn_id)
        elif holder != mn_id:
            self._own_remove(holder, a)
            self.used[a] = mn_id
            self._own_add(mn_id, a)

    def remove(self, a: int) -> None:
        n = self.extra.get(a)
        if n:
            if n == 1:
                del self.extra[a]
            else:
                self.extra[a] = n - 1
            return
        holder = self.used.pop(a, None)
        if holder is None:
            return
        self._own_remove(holder, a)
        for f in self.on_free:
            f(a)

    def lowest_own(self, mn_id: str, lo: int, hi: int) -> int | None:
        """The lowest address in [lo, hi] that ``mn_id`` already holds."""
        mine = [a for a in self.own.get(mn_id, ()) if lo <= a <= hi]
        return min(mine) if mine else None


class PoolAllocator:
    """``HoAAllocator`` over configured address pools.

    The truth stays ``in_use`` (from the SA store); what the allocator keeps
    is an index of it -- addresses as integers per family, each MN's
    addresses, and per pool the lowest free candidate (``_Slots``) -- brought
    up to date from the changes since the last call when ``in_use`` is a
    ``HoATable`` (the SQLite store's), so an assignment costs O(changes), not
    O(live SAs).  Any other mapping is indexed whole when it differs from the
    previous one.
    """

    def __init__(
        self,
        *,
        ip6_prefix: IPv6Network | None = None,
        ip6_first: IPv6Address | None = None,
        ip6_last: IPv6Address | None = None,
        ip6_hnp_pool: IPv6Network | None = None,
        ip6_hnp_len: int | None = None,
        ip4_pool: IPv4Network | None = None,
        ip4_subnet_len: int | None = None,
        exclude: Iterable[IPv6Address | IPv4Address] = (),
    ) -> None:
        self.ip6_prefix = ip6_prefix
        self.ip6_hnp_pool = ip6_hnp_pool
        self.ip6_hnp_len = ip6_hnp_len
        self.ip4_pool = ip4_pool
        self.exclude = frozenset(exclude)
        # Per family: an IPv4 address and an IPv6 one can share an integer value.
        self._ex6 = {int(a) for a in self.exclude if a.version == 6}
        self._ex4 = {int(a) for a in self.exclude if a.version == 4}
        if ip6_prefix is not None:
            self._ip6_lo = int(ip6_first or ip6_prefix.network_address)
            self._ip6_hi = int(ip6_last or ip6_prefix.broadcast_address)
        if ip4_pool is not None:
            plen = ip4_pool.prefixlen if ip4_subnet_len is None else ip4_subnet_len
            self.ip4_subnet = IPv4Network((ip4_pool.network_address, plen), strict=False)
            self._ip4_lo = int(ip4_pool.network_address)
            self._ip4_hi = int(ip4_pool.broadcast_address)
            # /31 and /32 have no network or broadcast address (RFC 3021).
            subnet = self.ip4_subnet
            self._ip4_skip = (
                {int(subnet.network_address), int(subnet.broadcast_address)} | self._ex4
                if subnet.prefixlen < 31
                else set(self._ex4)
            )
        # The index of in_use and where it came from.
        self._v6 = self._v4 = _Family()
        self._slots6: _Slots | None = None
        self._slots_hnp: _Slots | None = None
        self._slots4: _Slots | None = None
        self._src_token: object | None = None  # HoATable.token indexed
        self._src_seq = 0
        self._last: dict[str, str] | None = None  # a plain mapping indexed (a copy)
        self._reset()

    def __repr__(self) -> str:
        return (
            f"PoolAllocator(ip6_prefix={self.ip6_prefix}, ip6_hnp_pool={self.ip6_hnp_pool}, "
            f"ip4_pool={self.ip4_pool})"
        )

    # ------------------------------------------------------------ index

    def _hnp_offsets_excluded(self) -> frozenset[int]:
        """Indexes k of the HNP pool's prefixes that hold an excluded address."""
        pool, plen = self.ip6_hnp_pool, self.ip6_hnp_len
        if pool is None or plen is None:
            return frozenset()
        plo, phi, shift = int(pool.network_address), int(pool.broadcast_address), 128 - plen
        return frozenset((a - plo) >> shift for a in self._ex6 if plo <= a <= phi)

    def _reset(self) -> None:
        v6, v4 = _Family(), _Family()
        self._v6, self._v4 = v6, v4
        self._slots6 = self._slots_hnp = self._slots4 = None
        if self.ip6_prefix is not None:
            net, ex6, lo, hi = self.ip6_prefix, self._ex6, self._ip6_lo, self._ip6_hi
            # With an HNP pool, the HoA at offset k brings the k-th prefix:
            # an offset whose prefix holds an excluded address is skipped too.
            hnp_ex = self._hnp_offsets_excluded()
            s6 = _Slots(
                lo,
                hi,
                v6.used,
                lambda a: _ip6_reserved(a, net) or a in ex6 or (a - lo) in hnp_ex,
            )
            v6.on_free.append(lambda a: s6.freed(a) if lo <= a <= hi else None)
            self._slots6 = s6
        elif self.ip6_hnp_pool is not None and self.ip6_hnp_len is not None:
            pool, shift = self.ip6_hnp_pool, 128 - self.ip6_hnp_len
            plo, phi = int(pool.network_address), int(pool.broadcast_address)
            count: dict[int, int] = {}  # prefix index -> live addresses inside it
            ex_k = {(a - plo) >> shift for a in self._ex6 if plo <= a <= phi}
            n_k = 1 << (self.ip6_hnp_len - pool.prefixlen)
            sh = _Slots(0, n_k - 1, count, ex_k.__contains__)

            def take(a: int) -> None:
                if plo <= a <= phi:
                    k = (a - plo) >> shift
                    count[k] = count.get(k, 0) + 1

            def free(a: int) -> None:
                if plo <= a <= phi:
                    k = (a - plo) >> shift
                    n = count[k] - 1
                    if n:
                        count[k] = n
                    else:
                        del count[k]
                        sh.freed(k)

            v6.on_take.append(take)
            v6.on_free.append(free)
            self._slots_hnp = sh
        if self.ip4_pool is not None:
            skip, lo4, hi4 = self._ip4_skip, self._ip4_lo, self._ip4_hi
            s4 = _Slots(lo4, hi4, v4.used, skip.__contains__)
            v4.on_free.append(lambda a: s4.freed(a) if lo4 <= a <= hi4 else None)
            self._slots4 = s4

    def _apply(self, text: str, old: str | None, new: str | None) -> None:
        p = _parse(text)
        if p is None:
            return  # not an address: cannot collide with one we hand out
        fam = self._v6 if p[0] == 6 else self._v4
        if new is None:
            fam.remove(p[1])
        elif old is None:
            fam.add(p[1], new)
        else:
            fam.change(p[1], new)

    def _rebuild(self, in_use: Mapping[str, str]) -> None:
        if not self._rebuild_bulk(in_use):
            self._reset()
            for text, mn_id in in_use.items():
                self._apply(text, None, mn_id)

    def _rebuild_bulk(self, in_use: Mapping[str, str]) -> bool:
        """``_rebuild`` in one tight loop, for what the SQLite store holds:
        canonical texts, each address once (a start with 100k live SAs
        indexes 200k addresses: issue 9, first bootstrap within 2 s).  False
        -- nothing kept -- on any text it cannot index that way (another
        spelling of an address, not an address): the caller's per-item path
        is the reference, in the table's order."""
        self._reset()
        v6, v4 = self._v6, self._v4
        pton, af6, af4, from_bytes = (
            socket.inet_pton,
            socket.AF_INET6,
            socket.AF_INET,
            int.from_bytes,
        )
        used6, own6, take6 = v6.used, v6.own, v6.on_take
        used4, own4, take4 = v4.used, v4.own, v4.on_take
        try:
            for text, mn_id in in_use.items():
                if ":" in text:
                    a = from_bytes(pton(af6, text))
                    used, own, take = used6, own6, take6
                else:
                    a = from_bytes(pton(af4, text))
                    used, own, take = used4, own4, take4
                if a in used:
                    return False  # a second spelling: counted by _Family.add
                used[a] = mn_id
                mine = own.get(mn_id)
                if mine is None:
                    own[mn_id] = [a]
                else:
                    mine.append(a)
                for f in take:
                    f(a)
        except (OSError, ValueError, TypeError):
            return False
        return True

    def _sync(self, in_use: Mapping[str, str]) -> None:
        """Bring the index up to ``in_use``."""
        if isinstance(in_use, HoATable):
            if self._src_token is in_use.token:
                changes = in_use.changes_since(self._src_seq)
                if changes is not None:
                    for change in changes:
                        self._apply(*change)
                    self._src_seq = in_use.seq
                    return
            self._rebuild(in_use)
            self._src_token, self._src_seq, self._last = in_use.token, in_use.seq, None
            return
        # Any other mapping: comparing two dicts runs in C; indexing is a Python loop.
        if self._last is not None and self._last == in_use:
            return
        self._rebuild(in_use)
        self._src_token, self._last = None, dict(in_use)

    def prime(self, in_use: Mapping[str, str]) -> None:
        """Index ``in_use`` now (at start, so the first bootstrap does not pay for it)."""
        self._sync(in_use)
        # And walk each pool's cursor past the addresses in use (O(live)
        # once), which the first new MN would otherwise do.
        for slots in (self._slots6, self._slots_hnp, self._slots4):
            if slots is not None:
                slots.first()

    # ------------------------------------------------------------ pools

    def _ip6_hoa(self, mn_id: str) -> IPv6Address:
        assert self._slots6 is not None
        own = self._v6.lowest_own(mn_id, self._ip6_lo, self._ip6_hi)
        if own is not None and not self._slots6.blocked(own):  # excluded since it was given
            return IPv6Address(own)
        a = self._slots6.first()
        if a is None:
            raise LookupError("ip6 pool exhausted")
        return IPv6Address(a)

    def _hnp_at(self, k: int) -> IPv6Network:
        assert self.ip6_hnp_pool is not None and self.ip6_hnp_len is not None
        size = 1 << (128 - self.ip6_hnp_len)
        if k >= 1 << (self.ip6_hnp_len - self.ip6_hnp_pool.prefixlen):
            raise LookupError("ip6 hnp pool exhausted")
        return IPv6Network((int(self.ip6_hnp_pool.network_address) + k * size, self.ip6_hnp_len))

    def _ip6_from_hnp(self, mn_id: str) -> tuple[IPv6Address, IPv6Network]:
        """No ip6_prefix: each MN gets a free prefix, HoA = prefix::1."""
        assert self.ip6_hnp_pool is not None and self.ip6_hnp_len is not None
        assert self._slots_hnp is not None
        pool, shift = self.ip6_hnp_pool, 128 - self.ip6_hnp_len
        lo, hi = int(pool.network_address), int(pool.broadcast_address)
        own = self._v6.lowest_own(mn_id, lo, hi)
        if own is not None and not self._slots_hnp.blocked((own - lo) >> shift):
            return IPv6Address(own), self._hnp_at((own - lo) >> shift)
        k = self._slots_hnp.first()
        if k is None:
            raise LookupError("ip6 hnp pool exhausted")
        hnp = self._hnp_at(k)
        return IPv6Address(int(hnp.network_address) + 1), hnp

    def _ip4_hoa(self, mn_id: str) -> IPv4Address:
        assert self._slots4 is not None
        own = self._v4.lowest_own(mn_id, self._ip4_lo, self._ip4_hi)
        if own is not None and not self._slots4.blocked(own):  # excluded since it was given
            return IPv4Address(own)
        a = self._slots4.first()
        if a is None:
            raise LookupError("ip4 pool exhausted")
        return IPv4Address(a)

    # ------------------------------------------------------------ HoAAllocator

    def assign(self, mn_id: str, in_use: Mapping[str, str]) -> HomeAssignment:
        self._sync(in_use)
        ip6_hoa: IPv6Address | None = None
        ip6_hnp: IPv6Network | None = None
        if self.ip6_prefix is not None:
            ip6_hoa = self._ip6_hoa(mn_id)
            if self.ip6_hnp_pool is not None:
                ip6_hnp = self._hnp_at(int(ip6_hoa) - self._ip6_lo)
            else:
                ip6_hnp = self.ip6_prefix
        elif self.ip6_hnp_pool is not None:
            ip6_hoa, ip6_hnp = self._ip6_from_hnp(mn_id)
        ip4_hoa: IPv4Address | None = None
        ip4_hnp: IPv4Network | None = None
        if self.ip4_pool is not None:
            ip4_hoa = self._ip4_hoa(mn_id)
            ip4_hnp = self.ip4_subnet
        return HomeAssignment(ip6_hoa=ip6_hoa, ip4_hoa=ip4_hoa, ip6_hnp=ip6_hnp, ip4_hnp=ip4_hnp)


class PoolAllocatorFactory:
    name = "pool"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> PoolAllocator:
        o = parse_options(_Options, options)
        return PoolAllocator(
            ip6_prefix=o.ip6_prefix,
            ip6_first=o.ip6_first,
            ip6_last=o.ip6_last,
            ip6_hnp_pool=o.ip6_hnp_pool,
            ip6_hnp_len=o.ip6_hnp_len,
            ip4_pool=o.ip4_pool,
            ip4_subnet_len=o.ip4_subnet_len,
            # The HAs' and DNS servers' addresses the HAC provisions
            # (core/hookspecs.py mipsec_hoa_allocators), whether listed or not.
            exclude=[*o.exclude, *ctx.extra.get("reserved_addresses", ())],
        )


@hookimpl
def mipsec_hoa_allocators() -> list[PoolAllocatorFactory]:
    return [PoolAllocatorFactory()]
