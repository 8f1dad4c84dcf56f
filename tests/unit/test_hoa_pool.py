"""Home-address allocator ``pool`` (plugins/hoa_pool.py), RFC 6618 §5.7.3."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.hookspecs import HoAAllocator, MipsecSpec, PluginContext
from mipsec.core.model import HomeAssignment
from mipsec.plugins import hoa_pool
from mipsec.plugins.hoa_pool import PoolAllocator, PoolAllocatorFactory

CTX = PluginContext(role="hac", base_dir=Path("."))


def pool(**options: Any) -> PoolAllocator:
    return PoolAllocatorFactory().create(options, CTX)


def held(a: HomeAssignment, mn_id: str, in_use: dict[str, str]) -> None:
    """Record an assignment the way the SA store reports it (hoas_in_use)."""
    for hoa in (a.ip6_hoa, a.ip4_hoa):
        if hoa is not None:
            in_use[str(hoa)] = mn_id


def test_lowest_free_skips_subnet_router_anycast_and_exclude() -> None:
    p = pool(ip6_prefix="2001:db8:1::/64", exclude=["2001:db8:1::1"])
    assert isinstance(p, HoAAllocator)
    in_use: dict[str, str] = {}
    a = p.assign("a@x", in_use)
    # ::0 is the Subnet-Router anycast address, ::1 the (excluded) HA address.
    assert a == HomeAssignment(
        ip6_hoa=IPv6Address("2001:db8:1::2"), ip6_hnp=IPv6Network("2001:db8:1::/64")
    )
    held(a, "a@x", in_use)
    assert p.assign("b@x", in_use).ip6_hoa == IPv6Address("2001:db8:1::3")


def test_sticky_per_mn() -> None:
    p = pool(ip6_prefix="2001:db8:1::/64")
    in_use = {"2001:db8:1::1": "a@x", "2001:db8:1::7": "b@x", "2001:db8:1:0:0:0:0:5": "c@x"}
    assert p.assign("b@x", in_use).ip6_hoa == IPv6Address("2001:db8:1::7")
    assert p.assign("c@x", in_use).ip6_hoa == IPv6Address("2001:db8:1::5")  # any spelling
    assert p.assign("d@x", in_use).ip6_hoa == IPv6Address("2001:db8:1::2")
    # An address the MN holds outside the pool (old configuration) is not reused.
    assert p.assign("e@x", {"2001:db8:9::1": "e@x"}).ip6_hoa == IPv6Address("2001:db8:1::1")


def test_range_and_exhaustion() -> None:
    p = pool(ip6_prefix="2001:db8:1::/64", ip6_first="2001:db8:1::10", ip6_last="2001:db8:1::12")
    in_use: dict[str, str] = {}
    got = []
    for mn in ("a@x", "b@x", "c@x"):
        a = p.assign(mn, in_use)
        held(a, mn, in_use)
        got.append(str(a.ip6_hoa))
    assert got == ["2001:db8:1::10", "2001:db8:1::11", "2001:db8:1::12"]
    with pytest.raises(LookupError, match="ip6 pool exhausted"):
        p.assign("d@x", in_use)
    # ... but a holder still gets its own address back.
    assert p.assign("b@x", in_use).ip6_hoa == IPv6Address("2001:db8:1::11")
    # An expired SA frees its address (the store no longer lists it).
    del in_use["2001:db8:1::11"]
    assert p.assign("d@x", in_use).ip6_hoa == IPv6Address("2001:db8:1::11")


def test_rfc2526_reserved_anycast_never_assigned() -> None:
    p = pool(
        ip6_prefix="2001:db8:1::/64",
        ip6_first="2001:db8:1:0:fdff:ffff:ffff:ff7f",
        ip6_last="2001:db8:1:0:fdff:ffff:ffff:ff81",
    )
    a = p.assign("a@x", {})
    assert a.ip6_hoa == IPv6Address("2001:db8:1:0:fdff:ffff:ffff:ff7f")
    with pytest.raises(LookupError):
        p.assign("b@x", {str(a.ip6_hoa): "a@x"})
    # Non-/64: the highest 128 addresses are reserved.
    q = pool(ip6_prefix="2001:db8::/120", ip6_first="2001:db8::7f")
    assert q.assign("a@x", {}).ip6_hoa == IPv6Address("2001:db8::7f")
    with pytest.raises(LookupError):
        q.assign("b@x", {"2001:db8::7f": "a@x"})


def test_ip4_pool_skips_network_and_broadcast() -> None:
    p = pool(ip4_pool="192.0.2.0/30")
    in_use: dict[str, str] = {}
    a = p.assign("a@x", in_use)
    assert a == HomeAssignment(
        ip4_hoa=IPv4Address("192.0.2.1"), ip4_hnp=IPv4Network("192.0.2.0/30")
    )
    held(a, "a@x", in_use)
    assert p.assign("b@x", in_use).ip4_hoa == IPv4Address("192.0.2.2")
    held(p.assign("b@x", in_use), "b@x", in_use)
    with pytest.raises(LookupError, match="ip4 pool exhausted"):
        p.assign("c@x", in_use)


def test_ip4_pool_inside_larger_subnet() -> None:
    # The pool's own first address is a host address of the /24 home subnet.
    p = pool(ip4_pool="192.0.2.128/25", ip4_subnet_len=24, exclude=["192.0.2.129"])
    a = p.assign("a@x", {})
    assert a.ip4_hoa == IPv4Address("192.0.2.128")
    assert a.ip4_hnp == IPv4Network("192.0.2.0/24")
    in_use = {str(IPv4Address(x)): "o@x" for x in range(0xC0000280, 0xC00002FE + 1)}
    with pytest.raises(LookupError):  # .255 is the subnet broadcast
        p.assign("b@x", in_use)


def test_dual_stack_and_same_integer_value_in_both_families() -> None:
    p = pool(ip6_prefix="::/96", ip4_pool="0.0.0.0/29", exclude=["0.0.0.1"])
    a = p.assign("a@x", {})
    # Excluding IPv4 0.0.0.1 must not exclude IPv6 ::1 (same integer value).
    assert a.ip6_hoa == IPv6Address("::1")
    assert a.ip4_hoa == IPv4Address("0.0.0.2")
    in_use: dict[str, str] = {}
    held(a, "a@x", in_use)
    b = p.assign("b@x", in_use)
    assert (b.ip6_hoa, b.ip4_hoa) == (IPv6Address("::2"), IPv4Address("0.0.0.3"))


def test_per_mn_hnp_with_home_link_prefix() -> None:
    p = pool(ip6_prefix="2001:db8:1::/64", ip6_hnp_pool="2001:db8:100::/62", ip6_hnp_len=64)
    in_use: dict[str, str] = {}
    prefixes = []
    for mn in ("a@x", "b@x", "c@x"):
        a = p.assign(mn, in_use)
        held(a, mn, in_use)
        prefixes.append(str(a.ip6_hnp))
    # HoA ::1 -> prefix 1, ::2 -> prefix 2 ... (index = offset in the HoA range)
    assert prefixes == ["2001:db8:100:1::/64", "2001:db8:100:2::/64", "2001:db8:100:3::/64"]
    assert p.assign("b@x", in_use).ip6_hnp == IPv6Network("2001:db8:100:2::/64")
    with pytest.raises(LookupError, match="ip6 hnp pool exhausted"):
        p.assign("d@x", in_use)


def test_per_mn_hnp_only() -> None:
    p = pool(ip6_hnp_pool="2001:db8:100::/63", ip6_hnp_len=64, exclude=["2001:db8:100::1"])
    a = p.assign("a@x", {})
    # Prefix 0 holds an excluded address (e.g. the HA's): skipped entirely.
    assert a.ip6_hnp == IPv6Network("2001:db8:100:1::/64")
    assert a.ip6_hoa == IPv6Address("2001:db8:100:1::1")
    in_use = {str(a.ip6_hoa): "a@x"}
    assert p.assign("a@x", in_use) == a
    with pytest.raises(LookupError, match="ip6 hnp pool exhausted"):
        p.assign("b@x", in_use)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "one of ip6_prefix, ip6_hnp_pool, ip4_pool is required"),
        ({"ip6_prefix": "2001:db8::1/64"}, "^ip6_prefix: "),
        ({"ip6_prefix": "2001:db8::/64", "ip6_first": "2001:db9::"}, "^ip6_first: not inside"),
        (
            {"ip6_prefix": "2001:db8::/64", "ip6_first": "2001:db8::9", "ip6_last": "2001:db8::8"},
            "^ip6_first: greater",
        ),
        ({"ip6_prefix": "2001:db8::/64", "ip6_hnp_len": 64}, "^ip6_hnp_len: "),
        ({"ip6_hnp_pool": "2001:db8::/48", "ip6_hnp_len": 40}, "^ip6_hnp_len: shorter"),
        ({"ip4_pool": "192.0.2.0/24", "ip4_subnet_len": 25}, "^ip4_subnet_len: longer"),
        (
            {"ip4_pool": "192.0.2.0/24", "exclude": ["192.0.2.1", "nope"]},
            r"^exclude\[1\]: not an IP address$",
        ),
        ({"ip4_pool": "192.0.2.0/24", "ip4_pol": "x"}, "^ip4_pol: extra inputs"),
    ],
)
def test_option_errors_name_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pool(**options)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefghij"), st.booleans()), max_size=40))
def test_never_one_address_to_two_mns(ops: list[tuple[str, bool]]) -> None:
    """Assign / release in any order: every address in use has exactly one MN."""
    p = pool(ip6_prefix="2001:db8::/125", ip4_pool="192.0.2.0/29")
    in_use: dict[str, str] = {}
    for mn, release in ops:
        if release:
            for k in [k for k, v in in_use.items() if v == mn]:
                del in_use[k]
            continue
        before = {k: v for k, v in in_use.items() if v == mn}
        try:
            a = p.assign(mn, in_use)
        except LookupError:
            assert len(set(in_use.values())) >= 6  # 6 usable v4 addresses in a /29
            continue
        for hoa in (str(a.ip6_hoa), str(a.ip4_hoa)):
            assert in_use.get(hoa, mn) == mn
            if before:
                assert hoa in before  # sticky
            in_use[hoa] = mn


def test_through_pluggy() -> None:
    pm = pluggy.PluginManager("mipsec")
    pm.add_hookspecs(MipsecSpec)
    pm.register(hoa_pool)
    factories = {f.name: f for group in pm.hook.mipsec_hoa_allocators() for f in group}
    assert set(factories) == {"pool"}
    p = factories["pool"].create({"ip4_pool": "192.0.2.0/24"}, CTX)
    assert p.assign("a@x", {}).ip4_hoa == IPv4Address("192.0.2.1")


def test_the_addresses_a_hac_provisions_as_servers_are_never_home_addresses() -> None:
    """``ctx.extra["reserved_addresses"]`` (the HAC's HAs and DNS servers)
    are excluded whether ``exclude`` lists them or not."""
    ctx = PluginContext(
        role="hac",
        base_dir=Path("."),
        extra={"reserved_addresses": (IPv6Address("2001:db8:1::1"), IPv4Address("192.0.2.1"))},
    )
    p = PoolAllocatorFactory().create(
        {"ip6_prefix": "2001:db8:1::/64", "ip4_pool": "192.0.2.0/29"}, ctx
    )
    a = p.assign("a@x", {})
    assert a.ip6_hoa == IPv6Address("2001:db8:1::2") and a.ip4_hoa == IPv4Address("192.0.2.2")


def test_an_mn_holding_an_address_excluded_since_gets_another() -> None:
    """An MN given the DNS server's address before it was reserved (an older
    HAC, or before an upgrade) does not keep getting it back."""
    ctx = PluginContext(
        role="hac", base_dir=Path("."), extra={"reserved_addresses": (IPv4Address("192.0.2.1"),)}
    )
    p = PoolAllocatorFactory().create({"ip4_pool": "192.0.2.0/29"}, ctx)
    a = p.assign("alice@x", {"192.0.2.1": "alice@x"})
    assert a.ip4_hoa == IPv4Address("192.0.2.2")


def test_a_home_prefix_holding_a_reserved_address_is_never_given() -> None:
    """HoA range plus a per-MN prefix pool: the HoA at offset k brings the
    k-th prefix, so an offset whose prefix holds the DNS server is skipped."""
    ctx = PluginContext(
        role="hac",
        base_dir=Path("."),
        extra={"reserved_addresses": (IPv6Address("2001:db8:100:1::53"),)},
    )
    p = PoolAllocatorFactory().create(
        {
            "ip6_prefix": "2001:db8:1::/64",
            "ip6_first": "2001:db8:1::1",
            "ip6_last": "2001:db8:1::10",
            "ip6_hnp_pool": "2001:db8:100::/48",
            "ip6_hnp_len": 64,
        },
        ctx,
    )
    in_use: dict[str, str] = {}
    hnps = []
    for i in range(3):
        a = p.assign(f"mn{i}@x", in_use)
        held(a, f"mn{i}@x", in_use)
        hnps.append(str(a.ip6_hnp))
    assert "2001:db8:100:1::/64" not in hnps, hnps
