"""MN side of the MHAuth exchange, sans-I/O (RFC 6618 §5.3, PROFILE §2-§4).

``start()`` gives the Init request; ``receive_data()`` turns response octets
into events: ``SendRequest(data)`` or ``Finished(result)``.  A final response
whose ``auth`` does not verify is reported as unauthenticated: the MN cannot
tell a forged failure from a real one and never uses such a response's SA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from mipsec.core.authmethod import Outcome, PeerMethod
from mipsec.core.errors import (
    ContainerError,
    HeaderError,
    LocalProtocolError,
    RemoteProtocolError,
    TruncatedError,
)
from mipsec.core.issuer import sa_from_message
from mipsec.core.model import IssuedSA
from mipsec.core.wire.container import ContainerDecoder, IdentifierSequence, encode_container
from mipsec.core.wire.message import Message, decode_message, encode_message, message_values
from mipsec.core.wire.tvheader import (
    LABEL_HAC,
    LABEL_MN,
    encode_content,
    encode_content_with_auth,
    parse_content,
    verify_auth,
)


def _copy(msg: Message) -> Message:
    """A shallow copy (``dataclasses.replace`` without its per-call field walk)."""
    return Message(*message_values(msg))


@dataclass(frozen=True)
class BootstrapResult:
    status: int | None  # status-code of the final response; None: no valid final response
    authenticated: bool  # the final response's auth verified
    issued: IssuedSA | None = None  # only with an authenticated 200
    retry_after: datetime | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.authenticated and self.issued is not None


@dataclass(frozen=True)
class SendRequest:
    data: bytes


@dataclass(frozen=True)
class Finished:
    result: BootstrapResult


MnEvent = SendRequest | Finished


class MnExchange:
    def __init__(
        self,
        *,
        mn_id: str,
        method_name: str,
        method: PeerMethod,
        cb_octets: bytes,
        scope: int,
        suitelist: Sequence[int],
    ) -> None:
        if scope not in (0, 1):
            raise LocalProtocolError("scope must be 0 or 1")
        if not suitelist:
            raise LocalProtocolError("suitelist must not be empty")
        self.mn_id = mn_id
        self._method_name = method_name
        self._method = method
        self._cb = cb_octets
        self._scope = scope
        self._suitelist = tuple(suitelist)
        self._decoder = ContainerDecoder()
        self._sequence = IdentifierSequence()
        self._identifier = 0
        self._started = False
        self.finished = False

    def __repr__(self) -> str:
        return f"MnExchange(mn_id={self.mn_id!r}, method={self._method_name!r})"

    def start(self) -> bytes:
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = True
        msg = self._method.init_headers()
        msg.mn_id = self.mn_id
        msg.auth_method = (self._method_name,)
        return self._request(msg, None)  # Init never carries auth (PROFILE §4)

    def receive_data(self, data: bytes) -> list[MnEvent]:
        if self.finished:
            return []
        try:
            containers = self._decoder.feed(data)
        except ContainerError as exc:
            return [self._finish(None, False, f"bad container from HAC: {exc}")]
        events: list[MnEvent] = []
        for c in containers:
            events.append(self._on_response(c.identifier, c.content))
            if self.finished:
                break
        return events

    def receive_eof(self) -> list[MnEvent]:
        if self.finished:
            return []
        try:
            self._decoder.eof()
            reason = "HAC closed the connection before the final response"
        except TruncatedError:
            reason = "HAC response truncated"
        return [self._finish(None, False, reason)]

    # ------------------------------------------------------------ internals

    def _request(self, msg: Message, key: bytes | None) -> bytes:
        self._identifier = self._sequence.next_identifier()
        headers = encode_message(msg)
        if key is None:
            content = encode_content(headers)
        else:
            content = encode_content_with_auth(headers, key, LABEL_MN, self._cb)
        return encode_container(self._identifier, content)

    def _finish(
        self,
        status: int | None,
        authenticated: bool,
        reason: str = "",
        issued: IssuedSA | None = None,
        retry_after: datetime | None = None,
    ) -> Finished:
        self.finished = True
        return Finished(BootstrapResult(status, authenticated, issued, retry_after, reason))

    def _on_response(self, identifier: int, content: bytes) -> MnEvent:
        try:
            self._sequence.check_response(identifier, self._identifier)
        except ContainerError:
            return self._finish(None, False, f"response Identifier {identifier} != request's")
        try:
            parsed = parse_content(content)
            msg = decode_message(parsed)
        except HeaderError as exc:
            return self._finish(None, False, f"malformed response: {exc}")

        if msg.status_code == 100:
            # PROFILE §6: 100 is listed by the RFC but never sent; status-code
            # appears only in a final response, and 100 is not one.
            return self._finish(None, False, "status-code 100 in a response (never a final status)")
        if msg.status_code is not None:
            key = self._method.final_key(msg)
            authenticated = (
                key is not None
                and parsed.auth is not None
                and verify_auth(key, LABEL_HAC, parsed, self._cb)
            )
            status = msg.status_code
            if not authenticated:
                # A 503's retry-after is kept all the same: it came over the
                # TLS channel whose HAC certificate the MN checked (PROFILE
                # §1), and it can only delay the next attempt, within [hac]
                # retry_max (core/mn_retry.py).  PSK's 503 to an Init (a
                # credential backend down) is keyed with the HAC's stand-in
                # key, which the MN can never verify.
                after = msg.retry_after if status == 503 else None
                return self._finish(status, False, "final response not authenticated", None, after)
            problem = self._method.check_final(msg)
            if problem:
                return self._finish(status, False, problem)
            if status != 200:
                # PROFILE §3: retry-after comes only with 503; on any other
                # status it is not a HAC's request to wait (review, 2026-12-06).
                after = msg.retry_after if status == 503 else None
                return self._finish(status, True, f"HAC answered {status}", None, after)
            if msg.mip6_sas is not None and msg.mip6_sas > self._scope:
                return self._finish(None, True, "HAC granted a wider scope than requested")
            if msg.ciphersuite not in self._suitelist:
                return self._finish(None, True, "HAC chose a suite the MN did not offer")
            try:
                issued = sa_from_message(msg, self.mn_id)
            except RemoteProtocolError as exc:
                return self._finish(None, True, exc.reason)
            return self._finish(200, True, "", issued)

        step = self._method.on_response(msg, parsed)
        if step.outcome is not Outcome.CONTINUE:
            return self._finish(None, False, step.reason or "method failed")
        out = _copy(step.headers)  # the method's object stays untouched
        if step.ready_for_done:
            out.mip6_sas = self._scope
            out.suitelist = self._suitelist
        try:
            return SendRequest(self._request(out, step.auth_key))
        except LocalProtocolError:
            # Identifier space exhausted: a 256th exchange is impossible (§2).
            return self._finish(None, False, "255 exchanges without a final response")
