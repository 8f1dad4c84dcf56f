"""The HAC's EAP back-end interface (RFC 4137 full vs. pass-through authenticator).

The MHAuth ``eap`` method (``core/eap/mhauth.py``) is the same whoever runs
the EAP conversation: it sends EAP-Request/Identity itself (PROFILE §4 EAP
step 2), checks the Identity against ``mn-id``, then routes the identity to
one *back end* and relays EAP packets between the MN and it.  Two kinds, as
hostapd splits them (``eap_server`` vs. RFC 4137's pass-through states):

* ``local`` (``core/eap/local.py``): EAP server methods running in the HAC
  (EAP-TLS ...), with method proposal and Nak handled there;
* ``radius`` (``aaa/passthrough.py``): every EAP packet goes to an AAA server
  in Access-Requests (RFC 3579) and its answers come back.

A back end answers each step with an :class:`EapBackendStep` or, when it must
wait for the network (an AAA round trip), with an *awaitable* of one.  The
MHAuth exchange stays sans-I/O: it hands the awaitable to its asyncio shell
(``roles/hac.py``) as a pending outcome and resumes with the result, so one
MN waiting on RADIUS never delays another.

Back ends are plugins (``mipsec_eap_backends``): a factory with a ``name``
and ``create(options, ctx)`` returning an :class:`EapBackend`, built at start.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

__all__ = [
    "BackendVerdict",
    "EapBackend",
    "EapBackendSession",
    "EapBackendStep",
    "EapSessionContext",
    "StepOrPending",
]


class BackendVerdict(enum.Enum):
    CONTINUE = "continue"  # ``eap`` is the next EAP-Request for the MN
    SUCCESS = "success"  # ``eap`` is EAP-Success; ``msk`` holds the key when derived
    FAILURE = "failure"  # ``eap`` is EAP-Failure (authentication failed: 401)
    UNAVAILABLE = "unavailable"  # the back end could not decide: ``status`` 503/504


@dataclass(frozen=True)
class EapBackendStep:
    """What a back end answers to one EAP packet from the MN.

    ``identity``: the identity the back end authenticated, when it says
    (RADIUS: the Access-Accept's User-Name); the HAC matches it with
    ``mn-id`` (PROFILE §4 item 8).  ``status`` (503 or 504) and
    ``retry_after`` go with UNAVAILABLE.  ``reason`` is for the one-line
    audit log: short, no secrets.
    """

    verdict: BackendVerdict
    eap: bytes = b""
    msk: bytes | None = field(default=None, repr=False)
    identity: str | None = None
    status: int | None = None
    retry_after: datetime | None = None
    reason: str = ""


StepOrPending = EapBackendStep | Awaitable[EapBackendStep]


@dataclass(frozen=True)
class EapSessionContext:
    """One MN's EAP conversation, as the back end sees it."""

    mn_id: str
    identity: str  # the EAP Identity (already matched to mn_id)
    peer: str  # the MN's transport address (Calling-Station-Id, logs)
    # Local EAP types this identity may use, in the HAC's order (policy);
    # a pass-through back end ignores it (the AAA server decides).
    allowed_types: Sequence[str] = ()
    max_packet: int = 1400  # PROFILE §4 item 9


@runtime_checkable
class EapBackendSession(Protocol):
    """One MN's conversation with a back end."""

    def start(self, identity_response: bytes) -> StepOrPending:
        """The MN's EAP-Response/Identity (whole packet): begin the method."""
        ...

    def receive(self, eap_response: bytes) -> StepOrPending:
        """The MN's next EAP-Response (whole packet, Identifier already checked)."""
        ...

    def close(self) -> None:
        """The exchange ended (any outcome): drop per-conversation state."""
        ...


@runtime_checkable
class EapBackend(Protocol):
    """A configured back end; ``session`` is called once per EAP conversation.

    Optional: ``stale() -> bool`` as for a server method factory
    (core/authmethod.py): the EAP method asks it at each HAC reload."""

    def session(self, ctx: EapSessionContext) -> EapBackendSession: ...

    async def aclose(self) -> None:
        """Service stop: release sockets and pending requests."""
        ...
