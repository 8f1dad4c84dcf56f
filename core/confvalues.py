"""Value types of configuration files, shared by core and plugins.

pydantic's lax mode reads some values a config file never means: an integer
as an address (``address4 = 10`` becomes 0.0.0.10, ``ip6_prefix = 7``
becomes ``::7/128``).  And a bare ``str`` takes anything, so a host name
with a control character, an empty HA id or an empty ``listen`` list used
to pass ``check-config`` and fail later -- at the first connection, or
never visibly.  These types refuse such values at start, where the error
names the file and the key (core/config.py).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, IPvAnyInterface, IPvAnyNetwork

__all__ = [
    "HA_ID_MAX",
    "DnsName",
    "HaId",
    "Host",
    "IPv4NetText",
    "IPv4Text",
    "IPv6NetText",
    "IPv6Text",
    "InterfaceText",
    "ListenAddresses",
    "NetworkText",
    "dns_name",
    "ha_id_problem",
    "host",
    "not_a_number",
]

HA_ID_MAX = 253  # same bound as an NAI (PROFILE §3): an HA id is a name, not a payload

# RFC 1123 §2.1 host names (letters, digits, hyphens; labels of 1..63), at
# most 253 octets, an optional final dot.
_DNS_NAME = re.compile(
    r"(?=.{1,253}\.?$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?"
)


def not_a_number(value: Any) -> Any:
    """Refuse a number where an address or a network is written as text."""
    if isinstance(value, bool | int | float):
        raise ValueError('write the address as a string, e.g. "192.0.2.1" or "2001:db8::1"')
    return value


IPv4Text = Annotated[ipaddress.IPv4Address, BeforeValidator(not_a_number)]
IPv6Text = Annotated[ipaddress.IPv6Address, BeforeValidator(not_a_number)]
IPv4NetText = Annotated[ipaddress.IPv4Network, BeforeValidator(not_a_number)]
IPv6NetText = Annotated[ipaddress.IPv6Network, BeforeValidator(not_a_number)]
NetworkText = Annotated[IPvAnyNetwork, BeforeValidator(not_a_number)]
InterfaceText = Annotated[IPvAnyInterface, BeforeValidator(not_a_number)]


def dns_name(value: str) -> str:
    """A host name (IDNA allowed), not an IP address, no wildcard."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        raise ValueError("must be a DNS name, not an IP address")
    if "*" in value:
        raise ValueError("must not hold a wildcard")
    try:
        ascii_name = value.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("not a valid host name") from None
    if not _DNS_NAME.fullmatch(ascii_name):
        raise ValueError(f"{value!r} is not a valid host name")
    return value


def host(value: str) -> str:
    """An IP address literal or a host name to connect to.

    Unlike :func:`dns_name` (a certificate's dNSName), an underscore is
    allowed: resolvers accept such names and some networks use them."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        dns_name(value.replace("_", "-"))  # the same rules, "_" counted as a letter
    return value


def _ip_literals(values: tuple[str, ...]) -> tuple[str, ...]:
    for a in values:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise ValueError(f"{a!r} is not an IP address") from None
    return values


def ha_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an HA id (it travels in provisioning's ``ha-id``), or None."""
    if not 1 <= len(value) <= HA_ID_MAX:
        return f"length {len(value)} outside 1..{HA_ID_MAX}"
    if not all(0x20 <= ord(c) <= 0x7E for c in value) or value != value.strip():
        return "not printable ASCII without outer spaces"
    return None


def _ha_id(value: str) -> str:
    problem = ha_id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


DnsName = Annotated[str, AfterValidator(dns_name)]
Host = Annotated[str, AfterValidator(host)]
HaId = Annotated[str, AfterValidator(_ha_id)]
# Addresses to listen on: IP literals, at least one (an empty list would
# leave a role serving nothing, and saying nothing about it).
ListenAddresses = Annotated[tuple[str, ...], Field(min_length=1), AfterValidator(_ip_literals)]
