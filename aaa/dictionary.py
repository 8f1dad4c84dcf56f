"""The RADIUS dictionary shipped with the package (pyrad format) and its check.

The HAC reads binary attributes by code, never through a dictionary type,
but it encodes the others by name; a dictionary that declares a binary
attribute as ``string`` would make pyrad turn EAP octets into text, so one
is refused before any packet is built with it.
"""

from __future__ import annotations

import functools
import io
from importlib.resources import files

from pyrad.dictionary import Dictionary

__all__ = ["BINARY_ATTRIBUTES", "check_dictionary", "load_dictionary"]

# Attributes whose values are arbitrary octets (RFC 2865 §5.24, §5.25, §5.33;
# RFC 3579 §3.1, §3.2; RFC 2548 §2.4.2-§2.4.3).
BINARY_ATTRIBUTES = (
    "EAP-Message",
    "Message-Authenticator",
    "State",
    "Class",
    "Proxy-State",
    "MS-MPPE-Send-Key",
    "MS-MPPE-Recv-Key",
)
# Attributes the HAC encodes by name: they must exist with these types.
_NAMED = {
    "User-Name": "string",
    "NAS-IP-Address": "ipaddr",
    "NAS-IPv6-Address": "ipv6addr",
    "NAS-Identifier": "string",
    "Calling-Station-Id": "string",
    "Service-Type": "integer",
    "NAS-Port-Type": "integer",
    "Framed-MTU": "integer",
    "Acct-Status-Type": "integer",
    "Acct-Session-Id": "string",
    "Acct-Session-Time": "integer",
    "Acct-Delay-Time": "integer",
    "Acct-Terminate-Cause": "integer",
    "Event-Timestamp": "date",
}


def check_dictionary(d: Dictionary) -> Dictionary:
    """Return ``d`` or raise ``ValueError`` naming the attribute it gets wrong."""
    for name in BINARY_ATTRIBUTES:
        if name not in d:
            raise ValueError(f"dictionary: {name} is not defined")
        if d[name].type != "octets":
            raise ValueError(f"dictionary: {name} must be octets, not {d[name].type}")
    for name, type_ in _NAMED.items():
        if name not in d:
            raise ValueError(f"dictionary: {name} is not defined")
        if d[name].type != type_:
            raise ValueError(f"dictionary: {name} must be {type_}, not {d[name].type}")
    return d


@functools.cache
def load_dictionary() -> Dictionary:
    """The packaged dictionary (``dictionary.radius``), checked, parsed once."""
    text = files("mipsec.aaa").joinpath("dictionary.radius").read_text("utf-8")
    return check_dictionary(Dictionary(io.StringIO(text)))
