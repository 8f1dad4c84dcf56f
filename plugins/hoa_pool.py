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

The allocator keeps no state: ``in_use`` (every HoA of a live SA -> mn_id,
from the SA store) is the truth, so a restart or a second HAC sharing the
store never hands one address to two MNs.  An MN that already holds an
address of a pool gets it again; otherwise the lowest free one.

IPv6 HNP: without a per-MN pool, ``ip6_hnp`` is ``ip6_prefix`` (the home
link).  With ``ip6_hnp_pool`` and ``ip6_prefix``, the HoA at offset k of the
range gets the k-th prefix, so unique HoAs imply unique prefixes.  With
``ip6_hnp_pool`` alone, each MN gets a free prefix and the HoA is its
``::1`` address.

Never handed out: the Subnet-Router anycast address (interface identifier
zero, RFC 4291 §2.6.1), the reserved subnet anycast addresses (RFC 2526 §2:
the highest 128 interface identifiers), the IPv4 network and broadcast
addresses of the home subnet, and ``exclude``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
)
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

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

    ip6_prefix: IPv6Network | None = None
    ip6_first: IPv6Address | None = None
    ip6_last: IPv6Address | None = None
    ip6_hnp_pool: IPv6Network | None = None
    ip6_hnp_len: int | None = Field(default=None, ge=1, le=127)
    ip4_pool: IPv4Network | None = None
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


_PARSED_MAX = 1 << 16  # bound on the parse cache (texts of live HoAs)
_UNPARSED = (0, 0)


class _Used:
    """``in_use`` parsed per family, with each MN's addresses indexed."""

    __slots__ = ("own4", "own6", "v4", "v6")

    def __init__(self, v6: dict[int, str], v4: dict[int, str]) -> None:
        self.v6 = v6
        self.v4 = v4
        self.own6 = _by_mn(v6)
        self.own4 = _by_mn(v4)


def _by_mn(used: dict[int, str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for a, mn in used.items():
        out.setdefault(mn, []).append(a)
    return out


class PoolAllocator:
    """``HoAAllocator`` over configured address pools (stateless)."""

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
        self._parsed: dict[str, tuple[int, int] | None] = {}  # text -> (version, int)
        # The last in_use seen (a copy) and its parse: between two bootstraps
        # it rarely changes (a returning MN keeps its HoA), and comparing two
        # dicts runs in C, where parsing and indexing it is a Python loop.
        self._last: tuple[dict[str, str], _Used] | None = None
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

    def __repr__(self) -> str:
        return (
            f"PoolAllocator(ip6_prefix={self.ip6_prefix}, ip6_hnp_pool={self.ip6_hnp_pool}, "
            f"ip4_pool={self.ip4_pool})"
        )

    # ------------------------------------------------------------ helpers

    def _parse_in_use(
        self,
        in_use: Mapping[str, str],
    ) -> tuple[dict[int, str], dict[int, str]]:
        v6: dict[int, str] = {}
        v4: dict[int, str] = {}
        parsed = self._parsed
        for text, mn in in_use.items():
            # in_use holds every live HoA and comes on every bootstrap: parse
            # each text once (ip_address() dominated the HAC's per-SA cost).
            a = parsed.get(text, _UNPARSED)
            if a is _UNPARSED:
                try:
                    ip = ip_address(text)
                    a = (ip.version, int(ip))
                except ValueError:
                    a = None
                if len(parsed) >= _PARSED_MAX:
                    parsed.clear()
                parsed[text] = a
            if a is None:
                continue  # not an address: cannot collide with one we hand out
            (v6 if a[0] == 6 else v4)[a[1]] = mn
        return v6, v4

    def _used(self, in_use: Mapping[str, str]) -> _Used:
        last = self._last
        if last is not None and last[0] == in_use:
            return last[1]
        used = _Used(*self._parse_in_use(in_use))
        self._last = (dict(in_use), used)
        return used

    @staticmethod
    def _own(own: dict[str, list[int]], mn_id: str, lo: int, hi: int) -> int | None:
        """The lowest address in [lo, hi] that ``mn_id`` already holds."""
        mine = [a for a in own.get(mn_id, ()) if lo <= a <= hi]
        return min(mine) if mine else None

    def _ip6_hoa(self, mn_id: str, used: dict[int, str], own6: dict[str, list[int]]) -> IPv6Address:
        assert self.ip6_prefix is not None
        lo, hi, net = self._ip6_lo, self._ip6_hi, self.ip6_prefix
        own = self._own(own6, mn_id, lo, hi)
        if own is not None:
            return IPv6Address(own)
        # Scanning stops at the first free address: at most
        # len(used) + len(exclude) + reserved steps before it.
        a = lo
        while a <= hi:
            if not _ip6_reserved(a, net) and a not in used and a not in self._ex6:
                return IPv6Address(a)
            a += 1
        raise LookupError("ip6 pool exhausted")

    def _hnp_at(self, k: int) -> IPv6Network:
        assert self.ip6_hnp_pool is not None and self.ip6_hnp_len is not None
        size = 1 << (128 - self.ip6_hnp_len)
        if k >= 1 << (self.ip6_hnp_len - self.ip6_hnp_pool.prefixlen):
            raise LookupError("ip6 hnp pool exhausted")
        return IPv6Network((int(self.ip6_hnp_pool.network_address) + k * size, self.ip6_hnp_len))

    def _ip6_from_hnp(
        self, mn_id: str, used: dict[int, str], own6: dict[str, list[int]]
    ) -> tuple[IPv6Address, IPv6Network]:
        """No ip6_prefix: each MN gets a free prefix, HoA = prefix::1."""
        assert self.ip6_hnp_pool is not None and self.ip6_hnp_len is not None
        pool, shift = self.ip6_hnp_pool, 128 - self.ip6_hnp_len
        lo, hi = int(pool.network_address), int(pool.broadcast_address)
        own = self._own(own6, mn_id, lo, hi)
        if own is not None:
            return IPv6Address(own), self._hnp_at((own - lo) >> shift)
        taken = {(a - lo) >> shift for a in used if lo <= a <= hi}
        taken |= {(a - lo) >> shift for a in self._ex6 if lo <= a <= hi}
        k = 0
        while k in taken:
            k += 1
        hnp = self._hnp_at(k)
        return IPv6Address(int(hnp.network_address) + 1), hnp

    def _ip4_hoa(self, mn_id: str, used: dict[int, str], own4: dict[str, list[int]]) -> IPv4Address:
        assert self.ip4_pool is not None
        lo, hi = self._ip4_lo, self._ip4_hi
        own = self._own(own4, mn_id, lo, hi)
        if own is not None:
            return IPv4Address(own)
        subnet = self.ip4_subnet
        # /31 and /32 have no network or broadcast address (RFC 3021).
        skip = (
            {int(subnet.network_address), int(subnet.broadcast_address)}
            if subnet.prefixlen < 31
            else set()
        )
        for a in range(lo, hi + 1):
            if a not in skip and a not in used and a not in self._ex4:
                return IPv4Address(a)
        raise LookupError("ip4 pool exhausted")

    # ------------------------------------------------------------ HoAAllocator

    def assign(self, mn_id: str, in_use: Mapping[str, str]) -> HomeAssignment:
        used = self._used(in_use)
        ip6_hoa: IPv6Address | None = None
        ip6_hnp: IPv6Network | None = None
        if self.ip6_prefix is not None:
            ip6_hoa = self._ip6_hoa(mn_id, used.v6, used.own6)
            if self.ip6_hnp_pool is not None:
                ip6_hnp = self._hnp_at(int(ip6_hoa) - self._ip6_lo)
            else:
                ip6_hnp = self.ip6_prefix
        elif self.ip6_hnp_pool is not None:
            ip6_hoa, ip6_hnp = self._ip6_from_hnp(mn_id, used.v6, used.own6)
        ip4_hoa: IPv4Address | None = None
        ip4_hnp: IPv4Network | None = None
        if self.ip4_pool is not None:
            ip4_hoa = self._ip4_hoa(mn_id, used.v4, used.own4)
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
            exclude=o.exclude,
        )


@hookimpl
def mipsec_hoa_allocators() -> list[PoolAllocatorFactory]:
    return [PoolAllocatorFactory()]
