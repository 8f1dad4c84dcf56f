"""The authentication-method plugin interface (sans-I/O).

An ``AuthMethod`` (returned by the ``mipsec_auth_methods`` hook) is a
factory of per-exchange machines, one per role, in the strongSwan/hostapd
mould: the machine never touches a socket, it turns a decoded request (or
response) into the method's headers, the key for this message's ``auth``
(RFC 6618 §5.8/§5.9) and a decision.

The generic exchanges (``hac_exchange``/``mn_exchange``) own the container,
the Identifier sequence, the Done parameters (``mip6-sas``,
``mip6-suitelist``), suite choice and SA data; a method owns only what is
specific to it (rands, EAP payloads, keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from mipsec.core.hookspecs import CredentialBackend
from mipsec.core.wire.message import Message
from mipsec.core.wire.tvheader import ParsedContent


class Outcome(Enum):
    CONTINUE = "continue"  # send the headers, wait for the next request
    SUCCESS = "success"  # authenticated: the exchange issues the SA (200)
    FAILURE = "failure"  # end with ``status``


@dataclass
class ServerStep:
    """What a server method decided for one request."""

    outcome: Outcome
    headers: Message = field(default_factory=Message)  # method headers of the response
    auth_key: bytes | None = field(default=None, repr=False)  # None: response carries no auth
    status: int = 0  # with FAILURE


@dataclass
class ServerMethodContext:
    mn_id: str
    cb_octets: bytes = field(repr=False)
    credentials: CredentialBackend | None
    # PROFILE §4: unknown identities continue with a per-process random
    # stand-in key so the failure shows only at Done, exactly like a wrong PSK.
    standin_key: bytes = field(repr=False)
    options: Mapping[str, Any] = field(default_factory=dict)


class ServerMethod(Protocol):
    def start(self, init: Message, parsed: ParsedContent) -> ServerStep:
        """Answer the Init request (auth-method already chosen by the HAC)."""
        ...

    def step(self, request: Message, parsed: ParsedContent, is_done: bool) -> ServerStep:
        """Answer a Mid (``is_done`` False) or Done (``is_done`` True) request."""
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
    options: Mapping[str, Any] = field(default_factory=dict)


class PeerMethod(Protocol):
    def init_headers(self) -> Message:
        """Headers of the Init request besides ``auth-method`` (no auth)."""
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


class AuthMethod(Protocol):
    name: str  # the ``auth-method`` token on the wire

    def server(self, ctx: ServerMethodContext) -> ServerMethod: ...

    def peer(self, ctx: PeerMethodContext) -> PeerMethod: ...
