"""Plain data shared by the layers: security associations and bootstrap data.

Keys never appear in ``repr`` (field(repr=False)) so an SA can be logged or
put in an exception without leaking secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from mipsec.core.suites import Suite

SPI_MIN = 1
SPI_MAX = 268_435_455  # 28 bits, RFC 6618 §5.6.1; 0 is reserved
DEFAULT_MIP6_PORT = 7872  # PROFILE §3: absent mip6-port means 7872


@dataclass(frozen=True, slots=True)
class SecurityAssociation:
    """An MN-HA SA (RFC 6618 §5.6)."""

    spi: int
    mn_id: str
    suite: Suite
    scope: int  # mip6-sas: 0 = signalling only, 1 = signalling and data
    validity_end: datetime  # timezone-aware UTC, whole seconds
    mn_to_ha_ikey: bytes = field(repr=False)
    ha_to_mn_ikey: bytes = field(repr=False)
    mn_to_ha_ekey: bytes = field(repr=False, default=b"")
    ha_to_mn_ekey: bytes = field(repr=False, default=b"")
    ha_id: str = ""  # which HA holds it (HAC side bookkeeping)


@dataclass(frozen=True, slots=True)
class BootstrapData:
    """Mobile IPv6 bootstrap data (RFC 6618 §5.7)."""

    haa_ip6: IPv6Address | None = None
    haa_ip4: IPv4Address | None = None
    port: int = DEFAULT_MIP6_PORT
    ip6_hoa: IPv6Address | None = None
    ip4_hoa: IPv4Address | None = None
    ip6_hnp: IPv6Network | None = None
    ip4_hnp: IPv4Network | None = None
    dns_ip6: IPv6Address | None = None
    dns_ip4: IPv4Address | None = None


@dataclass(frozen=True, slots=True)
class HomeAssignment:
    """What a home-address allocator hands out for one MN."""

    ip6_hoa: IPv6Address | None = None
    ip4_hoa: IPv4Address | None = None
    ip6_hnp: IPv6Network | None = None
    ip4_hnp: IPv4Network | None = None


@dataclass(frozen=True, slots=True)
class HomeAgentInfo:
    """A Home Agent the HAC may choose (from configuration)."""

    ha_id: str
    haa_ip6: IPv6Address | None = None
    haa_ip4: IPv4Address | None = None
    port: int = DEFAULT_MIP6_PORT
    transport: str = "local"  # provisioning transport plugin name
    options: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IssuedSA:
    """An SA together with the bootstrap data issued with it (HAC side)."""

    sa: SecurityAssociation
    bootstrap: BootstrapData
