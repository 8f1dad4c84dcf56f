"""HAC side of the MHAuth exchange, sans-I/O (RFC 6618 §5.3, PROFILE §2-§4).

Feed it the octets read from the TLS stream; it returns events:

* ``Send(data, close)`` -- write ``data``; close the connection after it when
  ``close`` is set (final responses, PROFILE §1 "closing").
* ``IssueSA(...)`` -- the MN is authenticated and chose a suite: the caller
  allocates/provisions the SA and then calls ``complete(issued)`` or
  ``fail(status)``, each returning the final ``Send``.
* ``AwaitMethod(pending)`` -- the method must wait for I/O (an AAA round
  trip): the caller awaits ``pending.awaitable`` and hands the result (or
  the exception) to ``method_result``, which returns the next events.
* ``Close(reason)`` -- close without a response (Identifier 0 cannot be
  answered, or the stream was truncated).

While an ``IssueSA`` or ``AwaitMethod`` is outstanding the MN must wait
(lockstep): data arriving meanwhile ends the exchange with 400 and the
outstanding work is void -- ``complete`` then refuses to build a 200, and
the caller rolls the SA back.  ``finished``/``final_status``/``reason`` tell
the caller how the exchange ended (``reason`` is for the audit log only).

Time and I/O stay with the caller (the asyncio shell in ``roles/hac.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mipsec.core.authmethod import (
    FinalShape,
    Outcome,
    Pending,
    ServerMethod,
    ServerMethodContext,
    ServerMethodFactory,
    ServerStep,
)
from mipsec.core.errors import ContainerError, HeaderError, LocalProtocolError, TruncatedError
from mipsec.core.hookspecs import CredentialBackend
from mipsec.core.issuer import sa_headers, select_suite
from mipsec.core.model import IssuedSA
from mipsec.core.nai import nai_key
from mipsec.core.suites import DEFAULT_ALLOWED, Suite
from mipsec.core.wire.container import (
    IDENTIFIER_MAX,
    ContainerDecoder,
    IdentifierSequence,
    encode_container,
)
from mipsec.core.wire.message import (
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


@dataclass(frozen=True)
class HacPolicy:
    """What the HAC allows (PROFILE §4 method choice, §5 suites and scope)."""

    method_order: tuple[str, ...] = ("psk",)
    # realm (lower case) -> allowed methods; "*" applies to every other realm.
    realm_methods: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {"*": ("psk",)})
    allowed_suites: tuple[Suite, ...] = DEFAULT_ALLOWED
    # Highest scope granted: 1 = signalling and data, 0 = signalling only.
    max_scope: int = 1

    def methods_for(self, mn_id: str) -> tuple[str, ...]:
        realm = mn_id.rpartition("@")[2].lower() if "@" in mn_id else ""
        return self.realm_methods.get(realm, self.realm_methods.get("*", ()))

    def choose_method(
        self, mn_id: str, offered: Sequence[str], installed: Mapping[str, Any] | None = None
    ) -> str | None:
        # The choice depends only on the realm, the offer and what is
        # installed, never on whether the identity is known: no enumeration
        # oracle (PROFILE §4).  Fail closed: a method nothing provides is
        # never chosen.
        allowed = self.methods_for(mn_id)
        for name in self.method_order:
            if name in offered and name in allowed and (installed is None or name in installed):
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


@dataclass(frozen=True)
class AwaitMethod:
    pending: Pending


Event = Send | Close | IssueSA | AwaitMethod


class HacExchange:
    """One MN's MHAuth exchange on one TLS connection."""

    def __init__(
        self,
        *,
        cb_octets: bytes,
        methods: Mapping[str, ServerMethodFactory],
        credentials: CredentialBackend | None,
        standin_key: bytes,
        policy: HacPolicy,
        peer: str = "?",
    ) -> None:
        self._cb = cb_octets
        self._methods = methods
        self._credentials = credentials
        self._standin = standin_key
        self.policy = policy
        self._peer = peer
        self._decoder = ContainerDecoder()
        self._sequence = IdentifierSequence()
        self._identifier = 0  # Identifier of the request being answered
        self._method: ServerMethod | None = None
        self._pending_issue: IssueSA | None = None
        self._pending_method = False
        self._pending_is_done = False  # the request waiting on the method carried Done params
        # PROFILE §4 EAP item 4: the first Done request's parameters; every
        # later request must repeat them unchanged.
        self._done_params: tuple[int, tuple[int, ...]] | None = None
        self.mn_id: str | None = None
        self.method_name: str | None = None
        self.finished = False
        self.final_status: int | None = None
        self.reason = ""  # why the exchange failed (audit log; never on the wire)

    def __repr__(self) -> str:
        return f"HacExchange(mn_id={self.mn_id!r}, method={self.method_name!r})"

    @property
    def waiting(self) -> str | None:
        """``"issue"`` or ``"method"`` while the exchange waits for the caller, else None."""
        if self._pending_issue is not None:
            return "issue"
        if self._pending_method:
            return "method"
        return None

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[Event]:
        if self.finished:
            return []
        if self.waiting is not None:
            # The MN must wait for the answer to its request (lockstep); more
            # data breaks the sequence.  The outstanding work is void: no 200
            # can follow this 400 (``complete`` refuses), the caller rolls back.
            self._pending_issue = None
            self._pending_method = False
            return [self._final(BAD_REQUEST, reason="data-while-pending")]
        try:
            containers = self._decoder.feed(data)
        except ContainerError as exc:
            return [self._container_error(exc)]
        events: list[Event] = []
        for i, container in enumerate(containers):
            events.extend(self._on_request(container.identifier, container.content))
            if self.finished:
                break
            if self.waiting is not None:
                if i + 1 < len(containers) or self._decoder.buffered:
                    # More came in the same read behind a request that must
                    # be answered first: the lockstep broken, as when it
                    # comes later -- 400, the work void.  It was dropped
                    # without a word (found in review).
                    self._pending_issue = None
                    self._pending_method = False
                    for e in events:
                        if isinstance(e, AwaitMethod):  # never awaited: closed, no warning
                            close = getattr(e.pending.awaitable, "close", None)
                            if close is not None:
                                close()
                    events = [e for e in events if not isinstance(e, IssueSA | AwaitMethod)]
                    events.append(self._final(BAD_REQUEST, reason="data-while-pending"))
                break
        return events

    def receive_eof(self) -> list[Event]:
        if self.finished:
            return []
        self.finished = True
        self._pending_issue = None
        self._pending_method = False
        self._close_method()
        try:
            self._decoder.eof()
        except TruncatedError:
            self.reason = "truncated"
            return [Close("stream ended inside a container")]
        self.reason = "peer-closed"
        return [Close("peer closed")]

    def abort(self, reason: str) -> None:
        """The caller ends the exchange without a response (timeout, eviction, stop)."""
        if not self.finished:
            self.finished = True
            self.reason = reason
            self._pending_issue = None
            self._pending_method = False
            self._close_method()

    @property
    def request_in_progress(self) -> bool:
        """Octets of a request have arrived but not the whole request yet."""
        return self._decoder.buffered > 0

    # ------------------------------------------------------------ SA outcome

    def complete(self, issued: IssuedSA) -> Send:
        """The SA is live and confirmed by its HA: answer 200."""
        if self._pending_issue is None:
            raise LocalProtocolError("complete() without a pending IssueSA")
        self._pending_issue = None
        return self._final(200, sa_headers(issued))

    def fail(self, status: int, retry_after: datetime | None = None, reason: str = "") -> Send:
        """Issuing failed (503/504/500...): answer ``status``, nothing provisioned."""
        if self._pending_issue is None:
            raise LocalProtocolError("fail() without a pending IssueSA")
        if status not in FINAL_STATUSES or status == 200:
            raise LocalProtocolError(f"fail() with status {status}")
        self._pending_issue = None
        extra = Message(retry_after=retry_after) if status == UNAVAILABLE else None
        return self._final(status, extra, reason=reason or "issue-failed")

    # ------------------------------------------------------------ method I/O outcome

    def method_result(self, result: Any) -> list[Event]:
        """The awaited result of an ``AwaitMethod`` (or the exception it raised)."""
        if not self._pending_method:
            raise LocalProtocolError("method_result() without a pending AwaitMethod")
        self._pending_method = False
        assert self._method is not None
        try:
            step = self._method.resume(result)
        except Exception as exc:
            return [self._method_bug(exc)]
        return [self._outcome(step, self._pending_is_done)]

    # ------------------------------------------------------------ internals

    def _container_error(self, exc: ContainerError) -> Event:
        if exc.identifier is None:
            self.finished = True
            self.reason = "bad-container"
            self._close_method()
            return Close(f"unanswerable container: {exc}")
        self._identifier = exc.identifier
        return self._final(BAD_REQUEST, reason="bad-container")

    def _on_request(self, identifier: int, content: bytes) -> list[Event]:
        try:
            self._sequence.check_request(identifier)
        except ContainerError:
            self._identifier = identifier
            return [self._final(BAD_REQUEST, reason="bad-identifier")]
        self._identifier = identifier
        try:
            parsed = parse_content(content)
            msg = decode_message(parsed)
        except HeaderError:
            return [self._final(BAD_REQUEST, reason="bad-request")]
        if self._method is None:
            return [self._on_init(msg, parsed)]
        return [self._on_next(msg, parsed)]

    def _on_init(self, msg: Message, parsed: ParsedContent) -> Event:
        # PROFILE §4: Init carries mn-id, mn-rand (PSK) and auth-method, never auth.
        if msg.mn_id is None or msg.auth_method is None or parsed.auth is not None:
            return self._final(BAD_REQUEST, reason="bad-init")
        if msg.mip6_sas is not None or msg.suitelist is not None:
            return self._final(BAD_REQUEST, reason="done-before-init")
        # Everything per MN is bound to the NAI's canonical form (PROFILE §4
        # item 8, RFC 7542 §2.4: the realm is case-insensitive), so a change
        # of case is the same MN -- its cap, its home address, a revocation.
        # The method sees mn-id as sent: its identity checks apply the
        # configured policy (``exact`` or ``nai``) to what the MN said.
        self.mn_id = nai_key(msg.mn_id)
        name = self.policy.choose_method(msg.mn_id, msg.auth_method, self._methods)
        if name is None:
            return self._final(NOT_IMPLEMENTED, reason="no-acceptable-method")
        self.method_name = name
        ctx = ServerMethodContext(
            mn_id=msg.mn_id,
            cb_octets=self._cb,
            credentials=self._credentials,
            standin_key=self._standin,
            peer=self._peer,
        )
        try:
            self._method = self._methods[name].new(ctx)
            step = self._method.start(msg, parsed)
        except Exception as exc:
            return self._method_bug(exc)
        return self._outcome(step, False)

    def _on_next(self, msg: Message, parsed: ParsedContent) -> Event:
        assert self._method is not None
        has_sas = msg.mip6_sas is not None
        if has_sas != (msg.suitelist is not None):
            return self._final(BAD_REQUEST, reason="half-done")  # half a Done request
        if has_sas:
            assert msg.mip6_sas is not None and msg.suitelist is not None
            params = (msg.mip6_sas, msg.suitelist)
            if self._done_params is None:
                self._done_params = params
            elif params != self._done_params:
                return self._final(BAD_REQUEST, reason="done-changed")
        elif self._done_params is not None:
            return self._final(BAD_REQUEST, reason="done-missing")
        try:
            step = self._method.step(msg, parsed, has_sas)
        except Exception as exc:
            return self._method_bug(exc)
        return self._outcome(step, has_sas)

    def _outcome(self, step: ServerStep, is_done: bool) -> Event:
        """Turn a method's step for the current request into the next event."""
        if step.outcome is Outcome.PENDING:
            if step.pending is None:
                return self._method_bug(LocalProtocolError("PENDING step without an awaitable"))
            self._pending_method = True
            self._pending_is_done = is_done
            return AwaitMethod(step.pending)
        if step.outcome is Outcome.CONTINUE:
            if self._identifier >= IDENTIFIER_MAX:
                # A non-final answer to request 255 would force a 256th
                # exchange (PROFILE §2): the conversation did not finish.
                return self._final(UNAUTHORIZED, reason="255-exchanges")
            return self._send(step.headers, step.auth_key, close=False)
        if step.outcome is Outcome.FAILURE:
            extra = None
            if step.status == UNAVAILABLE and step.retry_after is not None:
                extra = Message(retry_after=step.retry_after)
            return self._final(step.status or UNAUTHORIZED, extra, reason=step.reason)
        # SUCCESS: only a request carrying the Done parameters can end in a
        # 200 (PROFILE §4 EAP item 6: a success without them -> 400).
        if not is_done or self._done_params is None:
            return self._final(BAD_REQUEST, reason="success-without-done")
        sas, suitelist = self._done_params
        suite = select_suite(suitelist, self.policy.allowed_suites)
        if suite is None:
            return self._final(NOT_IMPLEMENTED, reason="no-acceptable-suite")
        assert self.mn_id is not None and self.method_name is not None
        self._pending_issue = IssueSA(
            self.mn_id, self.method_name, suite, min(sas, self.policy.max_scope)
        )
        return self._pending_issue

    def _method_bug(self, exc: Exception) -> Send:
        # A method (plugin) raised: a bug, not the MN's fault.  500, nothing
        # provisioned (PROFILE §6); the shell logs one line with the reason.
        return self._final(INTERNAL_ERROR, reason=f"method-error:{type(exc).__name__}")

    def _close_method(self) -> None:
        if self._method is not None:
            try:
                self._method.close()
            except Exception:  # noqa: S110 -- cleanup of a plugin must never break the exchange
                pass

    def _final(self, status: int, extra: Message | None = None, *, reason: str = "") -> Send:
        shape = self._final_shape(status)
        base = shape.headers
        if status != 200:
            # Error responses carry no SA or bootstrap headers (PROFILE §4):
            # only the method's rands/payload and, for 503, retry-after.
            x = extra if extra is not None else _NO_HEADERS
            msg = Message(
                mn_rand=base.mn_rand,
                hac_rand=base.hac_rand,
                eap_payload=base.eap_payload,
                status_code=status,
                retry_after=x.retry_after,
            )
        else:
            # The method's final headers, overlaid by the SA data.
            values = list(message_values(base))
            if extra is not None:
                values = [
                    v if v is not None else b
                    for v, b in zip(message_values(extra), values, strict=True)
                ]
            msg = Message(*values)
            msg.auth_method = None
            msg.status_code = status
        self.finished = True
        self.final_status = status
        if status != 200 and not self.reason:
            self.reason = reason or f"status-{status}"
        self._close_method()
        return self._send(msg, shape.auth_key, close=True, status=status)

    def _final_shape(self, status: int) -> FinalShape:
        if self._method is None:
            # Before a method was chosen (PROFILE §4: a 400 or 501 answering
            # an Init) there is no key: no auth.
            return FinalShape(_NO_HEADERS, None)
        try:
            return self._method.final(status)
        except Exception:
            # A broken method cannot shape its final: answer without its
            # headers and without auth (the MN will treat it as unauthenticated).
            return FinalShape(_NO_HEADERS, None)

    def _send(
        self, msg: Message, key: bytes | None, *, close: bool, status: int | None = None
    ) -> Send:
        headers = encode_message(msg)
        if key is not None:
            content = encode_content_with_auth(headers, key, LABEL_HAC, self._cb)
        else:
            content = encode_content(headers)
        return Send(encode_container(self._identifier, content), close, status)
