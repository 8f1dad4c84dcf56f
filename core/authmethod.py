"""The authentication-method plugin interface (sans-I/O).

An ``AuthMethod`` (returned by the ``mipsec_auth_methods`` hook) is named by
its ``auth-method`` token (``psk``, ``eap``) and builds, once at start and
from its validated options, a *factory* per role -- the pattern every other
hook uses, so a wrong option fails at start naming the file and the key.
Each factory makes one sans-I/O machine per exchange, in the
strongSwan/hostapd mould: the machine never touches a socket, it turns a
decoded request (or response) into the method's headers, the key for this
message's ``auth`` (RFC 6618 §5.8/§5.9) and a decision.

The generic exchanges (``hac_exchange``/``mn_exchange``) own the container,
the Identifier sequence, the Done parameters (``mip6-sas``,
``mip6-suitelist``: remembered and compared on resends, PROFILE §4 EAP item
4), suite choice and SA data; a method owns only what is specific to it
(rands, EAP payloads, keys) -- including the shape of every *final* response
(``ServerMethod.final``), because PROFILE §4 keys and fills a 200 and an
error differently per method (EAP: only a 200 carries the MSK and
EAP-Success; every other final is keyed with ``1`` and carries EAP-Failure).

A server step may be *pending*: the method must wait for I/O (an AAA round
trip) before it can answer.  It returns ``Outcome.PENDING`` with an
awaitable; the exchange hands it to its asyncio shell as an event and, once
the shell has the result, calls ``ServerMethod.resume(result)`` -- the
exchange itself never awaits anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from mipsec.core.hookspecs import CredentialBackend, PluginContext
from mipsec.core.wire.message import Message
from mipsec.core.wire.tvheader import ParsedContent

__all__ = [
    "AuthMethod",
    "FinalShape",
    "Outcome",
    "Overloaded",
    "PeerMethod",
    "PeerMethodContext",
    "PeerMethodFactory",
    "PeerStep",
    "Pending",
    "ServerMethod",
    "ServerMethodContext",
    "ServerMethodFactory",
    "ServerStep",
]


class Overloaded(Exception):
    """Handed to ``ServerMethod.resume`` when the shell refused a PENDING step's
    I/O because the HAC is saturated: the method answers 503 (PROFILE §6)."""


class Outcome(Enum):
    CONTINUE = "continue"  # send the headers, wait for the next request
    SUCCESS = "success"  # authenticated: the exchange issues the SA (200)
    FAILURE = "failure"  # end with ``status``
    PENDING = "pending"  # wait for ``pending`` (I/O), then ``resume(result)``


@dataclass(frozen=True)
class Pending:
    """An awaitable the shell runs for the method (e.g. a RADIUS round trip).

    ``timeout``: the longest the shell waits before it gives up with
    ``TimeoutError`` passed to ``resume`` (None: the shell's default).
    """

    awaitable: Awaitable[Any] = field(repr=False)
    timeout: float | None = None


@dataclass
class ServerStep:
    """What a server method decided for one request.

    CONTINUE: ``headers`` and ``auth_key`` make the (non-final) response.
    SUCCESS / FAILURE: the exchange ends; the final response's headers and
    key come from ``ServerMethod.final`` (FAILURE: with ``status``).
    ``reason`` says why a failure happened, for the one-line audit log
    (``bad-auth``, ``unknown-identity``, ``bad-request``...): the wire never
    reveals it (PROFILE §4 PSK step 2), the log does.
    """

    outcome: Outcome
    headers: Message = field(default_factory=Message)  # CONTINUE: the response's method headers
    auth_key: bytes | None = field(default=None, repr=False)  # CONTINUE: None = no auth
    status: int = 0  # with FAILURE
    reason: str = ""
    pending: Pending | None = None  # with PENDING
    retry_after: Any = None  # with FAILURE 503 (datetime)


@dataclass(frozen=True)
class FinalShape:
    """The method's part of a final response: headers and the ``auth`` key (None: no auth)."""

    headers: Message
    auth_key: bytes | None = field(repr=False, default=None)


@dataclass
class ServerMethodContext:
    mn_id: str
    cb_octets: bytes = field(repr=False)
    credentials: CredentialBackend | None
    # PROFILE §4: unknown identities continue with a per-process random
    # stand-in key so the failure shows only at Done, exactly like a wrong PSK.
    standin_key: bytes = field(repr=False)
    peer: str = "?"  # the MN's transport address (logs, RADIUS Calling-Station-Id)


class ServerMethod(Protocol):
    def start(self, init: Message, parsed: ParsedContent) -> ServerStep:
        """Answer the Init request (auth-method already chosen by the HAC)."""
        ...

    def step(self, request: Message, parsed: ParsedContent, is_done: bool) -> ServerStep:
        """Answer a Mid (``is_done`` False) or Done (``is_done`` True) request."""
        ...

    def resume(self, result: Any) -> ServerStep:
        """The result of the last PENDING step's awaitable (an exception instance
        when it raised or timed out): answer the request that is waiting."""
        ...

    def final(self, status: int) -> FinalShape:
        """Headers and key of the final response carrying ``status`` (PROFILE §4).

        Called for every final response once the method exists, whatever
        ended the exchange (the method, a malformed request, SA issuing).
        """
        ...

    def close(self) -> None:
        """The exchange is over: release per-exchange state (back-end sessions)."""
        ...


@dataclass
class PeerStep:
    """What a peer method decided for one response."""

    outcome: Outcome  # CONTINUE: send ``headers``; FAILURE: stop (``reason``)
    headers: Message = field(default_factory=Message)
    auth_key: bytes | None = field(default=None, repr=False)
    ready_for_done: bool = False  # add the Done parameters to this request
    reason: str = ""


@dataclass
class PeerMethodContext:
    mn_id: str
    cb_octets: bytes = field(repr=False)
    secret: bytes | None = field(default=None, repr=False)  # e.g. the PSK


class PeerMethod(Protocol):
    def init_headers(self) -> Message:
        """Headers of the Init request besides ``mn-id`` and ``auth-method`` (no auth)."""
        ...

    def on_response(self, response: Message, parsed: ParsedContent) -> PeerStep:
        """Handle a response without ``status-code``."""
        ...

    def final_key(self, response: Message) -> bytes | None:
        """Key the final response's ``auth`` must verify with (None: none expected)."""
        ...

    def check_final(self, response: Message) -> str | None:
        """Method checks of the final response; a reason string rejects it."""
        ...


class ServerMethodFactory(Protocol):
    """Built once per start or reload.  Optional: ``stale() -> bool``, True
    when a file it read at build time changed (core/reload.py ``stale``):
    the next reload then builds it again."""

    def new(self, ctx: ServerMethodContext) -> ServerMethod: ...


class PeerMethodFactory(Protocol):
    """Built once per MN start.  Optional: ``stale() -> bool``, True when a
    file it read at build time changed (a renewed client certificate): a
    long-running MN builds it again before its next bootstrap."""

    def new(self, ctx: PeerMethodContext) -> PeerMethod: ...


class AuthMethod(Protocol):
    """What ``mipsec_auth_methods`` returns.

    ``server``/``peer`` validate ``options`` (the HAC's ``[methods.NAME]``
    table; on the MN, the method's table, e.g. ``[eap]``) and build the
    role's factory once at start; ``ValueError("key: reason")`` on bad
    options; None when the method does not implement that role.
    """

    name: str  # the ``auth-method`` token on the wire

    def server(
        self, options: Mapping[str, Any], ctx: PluginContext
    ) -> ServerMethodFactory | None: ...

    def peer(self, options: Mapping[str, Any], ctx: PluginContext) -> PeerMethodFactory | None: ...
