"""EAP method interfaces: what an EAP method plugin provides (RFC 4137 model).

An EAP method plugin (``mipsec_eap_methods`` hook) is registered per EAP
type, in the strongSwan/hostapd mould: a *factory* per role, built once at
start from validated options (a wrong option raises ``ValueError("key:
reason")``, which the loader reports with the file name), and a fresh
sans-I/O *machine* per exchange:

* MN side: :class:`EapPeerMethod` -- ``process(request) -> PeerOutput``,
  the type-data of the Response plus the method state and decision of
  RFC 4137 §4.1 (so a key-deriving method can refuse EAP-Success until it
  holds an MSK), and ``msk()``;
* HAC side: :class:`EapServerMethod` -- ``initiate()`` builds the first
  Request's type-data, ``process(response) -> ServerOutput`` the next one or
  the verdict, and ``msk()``.

Machines never see the EAP header: the frameworks (``core/eap/peer.py`` on
the MN, ``core/eap/local.py`` on the HAC) own Code, Identifier, Length and
Type, Identity, Notification and Nak, and hand each method only the packets
of its own Type (``EapPacket`` with ``data`` = type-data).  They never touch
a socket or a clock; a method that needs persistent state (an AKA USIM's
SQN) keeps it in its factory, which lives as long as the process.

Secrets: a method's repr and its ``reason`` strings never carry key
material; ``msk()`` is the only way keys leave a machine.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mipsec.core.hookspecs import PluginContext
from mipsec.core.wire.eap import EapPacket, MethodKey

__all__ = [
    "MSK_LEN",
    "Decision",
    "EapMethodPlugin",
    "EapPeerContext",
    "EapPeerFactory",
    "EapPeerMethod",
    "EapServerContext",
    "EapServerFactory",
    "EapServerMethod",
    "MethodState",
    "PeerOutput",
    "ServerOutput",
]

MSK_LEN = 64  # RFC 5247 §1.2: the MSK is at least 64 octets; PROFILE §4 keys auth with 64


class MethodState(enum.Enum):
    """RFC 4137 §4.1 ``methodState`` of a peer method."""

    INIT = "init"
    CONT = "cont"  # needs more requests
    MAY_CONT = "may_cont"  # could be done; the server may still send requests
    DONE = "done"  # the method has finished


class Decision(enum.Enum):
    """RFC 4137 §4.1 ``decision`` of a peer method.

    PROFILE §4 item 4: the MN adds the Done parameters to the first Response
    built once the decision is COND_SUCC or UNCOND_SUCC.  The MN accepts
    EAP-Success only with one of those two (RFC 4137 §4.1: a peer that
    decided FAIL refuses Success).
    """

    FAIL = "fail"
    COND_SUCC = "cond_succ"
    UNCOND_SUCC = "uncond_succ"


@dataclass(frozen=True, slots=True)
class PeerOutput:
    """A peer method's answer to one Request of its Type.

    ``data`` is the type-data of the Response (the framework adds Code,
    Identifier, Length and Type); ``None`` means "silently discard the
    Request" (RFC 4137 ``ignore``) -- the MN then sends nothing and ends the
    exchange, since MHAuth is lockstep.  ``reason`` says why a method failed
    or ignored (for the log; never secrets).
    """

    data: bytes | None
    state: MethodState
    decision: Decision
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ServerOutput:
    """A server method's answer to one Response of its Type.

    Not ``done``: ``data`` is the type-data of the next Request.  ``done``:
    ``success`` is the verdict (the framework sends EAP-Success or
    EAP-Failure); ``data`` is None.  ``reason`` explains a failure (log only).
    """

    data: bytes | None
    done: bool = False
    success: bool = False
    reason: str = ""


@dataclass(frozen=True)
class EapPeerContext:
    """What a peer machine knows of its exchange."""

    mn_id: str  # the MHAuth mn-id (PROFILE §4 item 8)
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The identity the MN sent in EAP-Response/Identity ("": ``mn_id``).  It
    # may differ from ``mn_id`` in its realm's case ([eap] identity), and a
    # method that binds keys to it (EAP-AKA's master key, RFC 4187 §7) must
    # use this one (found in review: AT_MAC failed).
    identity: str = ""

    @property
    def eap_identity(self) -> str:
        return self.identity or self.mn_id


@dataclass(frozen=True)
class EapServerContext:
    """What a server machine knows of its exchange."""

    mn_id: str  # the MHAuth mn-id: what the method's own proof of identity must match
    identity: str  # the EAP Identity the peer sent (already matched to mn_id)
    peer: str = "?"  # the MN's transport address, for logs
    extra: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class EapPeerMethod(Protocol):
    """One exchange's peer side of one EAP method (MN)."""

    def process(self, request: EapPacket) -> PeerOutput:
        """Handle one EAP-Request of this method's Type."""
        ...

    def msk(self) -> bytes | None:
        """The MSK (>= 64 octets) once derived; None before or for MSK-less methods."""
        ...


@runtime_checkable
class EapServerMethod(Protocol):
    """One exchange's server side of one EAP method (HAC, local methods)."""

    def initiate(self) -> bytes:
        """Type-data of the first Request of this method."""
        ...

    def process(self, response: EapPacket) -> ServerOutput:
        """Handle one EAP-Response of this method's Type."""
        ...

    def msk(self) -> bytes | None:
        """The MSK once derived (after a successful ``done``); None for MSK-less methods."""
        ...


class EapPeerFactory(Protocol):
    """Built once per MN start.  Optional: ``stale() -> bool`` (see
    ``EapServerFactory``): a long-running MN builds the method again before
    its next bootstrap."""

    def new(self, ctx: EapPeerContext) -> EapPeerMethod: ...


class EapServerFactory(Protocol):
    """Built once per start or reload.  Optional: ``stale() -> bool``, True
    when a file it read at build time (a certificate, a key) now holds
    something else or cannot be read; the HAC's next reload then builds the
    EAP method again (core/reload.py ``stale``)."""

    def new(self, ctx: EapServerContext) -> EapServerMethod: ...


class EapMethodPlugin(Protocol):
    """What ``mipsec_eap_methods`` returns: one EAP method for either or both roles.

    ``name`` selects it in configuration (``"tls"``, ``"aka"``,
    ``"aka-prime"``); ``eap_type`` is its wire Type (an ``int`` 4..253 or an
    :class:`~mipsec.core.wire.eap.ExpandedType`); ``derives_msk`` says
    whether it is a key-deriving method (PROFILE §4 item 7: MSK-less methods
    are refused by default).  ``peer``/``server`` validate ``options`` (the
    method's table in the role's configuration, without selecting keys) and
    return the role's factory, or None when the plugin does not implement
    that role.  On the MN, ``ctx.extra["eap_methods"]`` is the MN's ``[eap]
    methods`` and ``ctx.extra["eap_peers"]`` maps the names of the methods
    built before this one to their factories, for methods that depend on
    their siblings (EAP-AKA's AT_BIDDING check, the USIM EAP-AKA and
    EAP-AKA' share).
    """

    name: str
    eap_type: MethodKey
    derives_msk: bool

    def peer(self, options: Mapping[str, Any], ctx: PluginContext) -> EapPeerFactory | None: ...

    def server(self, options: Mapping[str, Any], ctx: PluginContext) -> EapServerFactory | None: ...
