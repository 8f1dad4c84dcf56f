"""HAC side of the MHAuth exchange, sans-I/O (RFC 6618 §5.3, PROFILE §2-§4).

Feed it the octets read from the TLS stream; it returns events:

* ``Send(data, close)`` -- write ``data``; close the connection after it when
  ``close`` is set (final responses, PROFILE §1 "closing").
* ``IssueSA(...)`` -- the MN is authenticated and chose a suite: the caller
  allocates/provisions the SA and then calls ``complete(issued)`` or
  ``fail(status)``, each returning the final ``Send``.
* ``Close(reason)`` -- close without a response (Identifier 0 cannot be
  answered, or the stream was truncated).

Time and I/O stay with the caller (the asyncio shell in ``roles/hac.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from mipsec.core.authmethod import (
    AuthMethod,
    Outcome,
    ServerMethod,
    ServerMethodContext,
    ServerStep,
)
from mipsec.core.errors import ContainerError, HeaderError, LocalProtocolError, TruncatedError
from mipsec.core.hookspecs import CredentialBackend
from mipsec.core.issuer import sa_headers, select_suite
from mipsec.core.model import IssuedSA
from mipsec.core.suites import DEFAULT_ALLOWED, Suite
from mipsec.core.wire.container import ContainerDecoder, IdentifierSequence, encode_container
from mipsec.core.wire.message import (
    MESSAGE_FIELDS,
    Message,
    decode_message,
    encode_message,
    message_values,
)
from mipsec.core.wire.tvheader import (
    LABEL_HAC,
    ParsedContent,
    encode_content,
    encode_content_with_auth,
    parse_content,
)

BAD_REQUEST = 400
UNAUTHORIZED = 401
INTERNAL_ERROR = 500
NOT_IMPLEMENTED = 501
UNAVAILABLE = 503
TIMEOUT = 504
FINAL_STATUSES = frozenset({200, BAD_REQUEST, UNAUTHORIZED, 500, NOT_IMPLEMENTED, 503, 504})
_NO_HEADERS = Message()  # never mutated
_AUTH_METHOD = MESSAGE_FIELDS.index("auth_method")


@dataclass(frozen=True)
class HacPolicy:
    """What the HAC allows (PROFILE §4 method choice, §5 suites and scope)."""

    method_order: tuple[str, ...] = ("psk", "eap")
    # realm (lower case) -> allowed methods; "*" applies to every other realm.
    realm_methods: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {"*": ("psk", "eap")}
    )
    allowed_suites: tuple[Suite, ...] = DEFAULT_ALLOWED
    # Highest scope granted: 1 = signalling and data, 0 = signalling only.
    max_scope: int = 1

    def methods_for(self, mn_id: str) -> tuple[str, ...]:
        realm = mn_id.rpartition("@")[2].lower() if "@" in mn_id else ""
        return self.realm_methods.get(realm, self.realm_methods.get("*", ()))

    def choose_method(self, mn_id: str, offered: Sequence[str]) -> str | None:
        # The choice depends only on the realm and the offer, never on whether
        # the identity is known: no enumeration oracle (PROFILE §4).
        allowed = self.methods_for(mn_id)
        for name in self.method_order:
            if name in offered and name in allowed:
                return name
        return None


@dataclass(frozen=True)
class Send:
    data: bytes
    close: bool = False
    status: int | None = None  # the status-code carried, for final responses


@dataclass(frozen=True)
class Close:
    reason: str


@dataclass(frozen=True)
class IssueSA:
    mn_id: str
    method: str
    suite: Suite
    scope: int


Event = Send | Close | IssueSA


class HacExchange:
    """One MN's MHAuth exchange on one TLS connection."""

    def __init__(
        self,
        *,
        cb_octets: bytes,
        methods: Mapping[str, AuthMethod],
        credentials: CredentialBackend | None,
        standin_key: bytes,
        policy: HacPolicy,
        method_options: Mapping[str, Mapping[str, object]] | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._cb = cb_octets
        self._methods = methods
        self._credentials = credentials
        self._standin = standin_key
        self.policy = policy
        self._method_options = method_options or {}
        self._decoder = ContainerDecoder()
        self._sequence = IdentifierSequence()
        self._identifier = 0  # Identifier of the request being answered
        self._method: ServerMethod | None = None
        self._key: bytes | None = None  # key of the latest response auth
        self._method_headers = Message()
        self._pending: IssueSA | None = None
        self.mn_id: str | None = None
        self.method_name: str | None = None
        self.finished = False
        self.final_status: int | None = None

    def __repr__(self) -> str:
        return f"HacExchange(mn_id={self.mn_id!r}, method={self.method_name!r})"

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[Event]:
        if self.finished:
            return []
        if self._pending is not None:
            # The MN must wait for the final response; more data breaks the
            # lockstep request/response rule.
            return [self._final(BAD_REQUEST)]
        try:
            containers = self._decoder.feed(data)
        except ContainerError as exc:
            return [self._container_error(exc)]
        events: list[Event] = []
        for container in containers:
            events.extend(self._on_request(container.identifier, container.content))
            if self.finished or self._pending is not None:
                break
        return events

    def receive_eof(self) -> list[Event]:
        if self.finished:
            return []
        self.finished = True
        try:
            self._decoder.eof()
        except TruncatedError:
            return [Close("stream ended inside a container")]
        return [Close("peer closed")]

    # ------------------------------------------------------------ SA outcome

    def complete(self, issued: IssuedSA) -> Send:
        """The SA is live and confirmed by its HA: answer 200."""
        if self._pending is None:
            raise LocalProtocolError("complete() without a pending IssueSA")
        self._pending = None
        return self._final(200, sa_headers(issued))

    def fail(self, status: int, retry_after: datetime | None = None) -> Send:
        """Issuing failed (503/504/500...): answer ``status``, nothing provisioned."""
        if self._pending is None:
            raise LocalProtocolError("fail() without a pending IssueSA")
        if status not in FINAL_STATUSES or status == 200:
            raise LocalProtocolError(f"fail() with status {status}")
        self._pending = None
        extra = Message(retry_after=retry_after) if status == UNAVAILABLE else None
        return self._final(status, extra)

    # ------------------------------------------------------------ internals

    def _container_error(self, exc: ContainerError) -> Event:
        if exc.identifier is None:
            self.finished = True
            return Close(f"unanswerable container: {exc}")
        self._identifier = exc.identifier
        return self._final(BAD_REQUEST)

    def _on_request(self, identifier: int, content: bytes) -> list[Event]:
        try:
            self._sequence.check_request(identifier)
        except ContainerError:
            self._identifier = identifier
            return [self._final(BAD_REQUEST)]
        self._identifier = identifier
        try:
            parsed = parse_content(content)
            msg = decode_message(parsed)
        except HeaderError:
            return [self._final(BAD_REQUEST)]
        if self._method is None:
            return [self._on_init(msg, parsed)]
        return [self._on_next(msg, parsed)]

    def _on_init(self, msg: Message, parsed: ParsedContent) -> Event:
        # PROFILE §4: Init carries mn-id, mn-rand (PSK) and auth-method, never auth.
        if msg.mn_id is None or msg.auth_method is None or parsed.auth is not None:
            return self._final(BAD_REQUEST)
        if msg.mip6_sas is not None or msg.suitelist is not None:
            return self._final(BAD_REQUEST)  # Done before Init
        self.mn_id = msg.mn_id
        name = self.policy.choose_method(msg.mn_id, msg.auth_method)
        if name is None or name not in self._methods:
            return self._final(NOT_IMPLEMENTED)
        self.method_name = name
        ctx = ServerMethodContext(
            mn_id=msg.mn_id,
            cb_octets=self._cb,
            credentials=self._credentials,
            standin_key=self._standin,
            options=self._method_options.get(name, {}),
        )
        self._method = self._methods[name].server(ctx)
        return self._apply(self._method.start(msg, parsed))

    def _on_next(self, msg: Message, parsed: ParsedContent) -> Event:
        assert self._method is not None
        has_sas = msg.mip6_sas is not None
        has_list = msg.suitelist is not None
        if has_sas != has_list:
            return self._final(BAD_REQUEST)  # half a Done request
        step = self._method.step(msg, parsed, has_sas)
        if step.outcome is Outcome.SUCCESS:
            if not has_sas:
                self._remember(step)
                return self._final(BAD_REQUEST)  # success needs the Done parameters
            self._remember(step)
            assert msg.suitelist is not None and msg.mip6_sas is not None
            suite = select_suite(msg.suitelist, self.policy.allowed_suites)
            if suite is None:
                return self._final(NOT_IMPLEMENTED)
            assert self.mn_id is not None and self.method_name is not None
            self._pending = IssueSA(
                self.mn_id, self.method_name, suite, min(msg.mip6_sas, self.policy.max_scope)
            )
            return self._pending
        return self._apply(step)

    def _remember(self, step: ServerStep) -> None:
        self._method_headers = step.headers
        self._key = step.auth_key

    def _apply(self, step: ServerStep) -> Event:
        self._remember(step)
        if step.outcome is Outcome.CONTINUE:
            return self._send(step.headers, close=False)
        return self._final(step.status or UNAUTHORIZED)

    def _final(self, status: int, extra: Message | None = None) -> Send:
        base = self._method_headers
        if status != 200:
            # Error responses carry no SA or bootstrap headers (PROFILE §4):
            # only the method's rands/payload and, for 503, retry-after.
            x = extra if extra is not None else _NO_HEADERS
            msg = Message(
                mn_rand=x.mn_rand if x.mn_rand is not None else base.mn_rand,
                hac_rand=x.hac_rand if x.hac_rand is not None else base.hac_rand,
                eap_payload=x.eap_payload if x.eap_payload is not None else base.eap_payload,
                status_code=status,
                retry_after=x.retry_after if x.retry_after is not None else base.retry_after,
            )
        else:
            # The method's headers (without auth-method), overlaid by ``extra``.
            values = list(message_values(base))
            values[_AUTH_METHOD] = None
            if extra is not None:
                values = [
                    v if v is not None else b
                    for v, b in zip(message_values(extra), values, strict=True)
                ]
            msg = Message(*values)
            msg.status_code = status
        self.finished = True
        self.final_status = status
        return self._send(msg, close=True, status=status)

    def _send(self, msg: Message, *, close: bool, status: int | None = None) -> Send:
        headers = encode_message(msg)
        if self._key is not None:
            content = encode_content_with_auth(headers, self._key, LABEL_HAC, self._cb)
        else:
            content = encode_content(headers)
        return Send(encode_container(self._identifier, content), close, status)
