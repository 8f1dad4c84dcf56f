"""The HAC's ``local`` EAP back end: EAP server methods run in the HAC (RFC 4137 §5).

The full-authenticator half of hostapd's split: after the MHAuth layer has
the peer's Identity, this back end proposes the first EAP method the policy
allows for that identity (the HAC picks; the MN's Nak only limits, PROFILE
§4 method choice applied to EAP types), switches once to a method the MN's
Nak names if the policy allows it, runs the method's server machine
(``core/eap/method.py``) and ends with EAP-Success (carrying the method's MSK)
or EAP-Failure.  Everything is synchronous: local methods need no I/O.

EAP Identifiers count on by one per Request from the Identity Request's
(random) one (RFC 3748 §4.1); the MHAuth layer checks that each Response echoes the last
Request's Identifier before it gets here.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from mipsec.core.certexpiry import certificates, merged, prefixed
from mipsec.core.eap.backend import (
    BackendVerdict,
    EapBackendStep,
    EapSessionContext,
    StepOrPending,
)
from mipsec.core.eap.method import EapServerContext, EapServerFactory, EapServerMethod
from mipsec.core.reload import stale
from mipsec.core.wire.eap import (
    EapCode,
    EapError,
    EapPacket,
    EapType,
    MethodKey,
    decode_eap,
    encode_eap,
    failure,
    parse_expanded_nak,
    parse_legacy_nak,
    success,
)

__all__ = ["LocalBackend", "LocalMethod"]


@dataclass(frozen=True)
class LocalMethod:
    """One configured local EAP method: its name, wire key and server factory."""

    name: str
    key: MethodKey
    factory: EapServerFactory


class LocalBackend:
    """Local EAP server methods, in the HAC's order of preference."""

    def __init__(self, methods: Sequence[LocalMethod]) -> None:
        self.methods = {m.name: m for m in methods}

    def session(self, ctx: EapSessionContext) -> _LocalSession:
        allowed = [self.methods[n] for n in ctx.allowed_types if n in self.methods]
        return _LocalSession(ctx, allowed)

    def stale(self) -> bool:
        """Any local method's server factory built from a file that changed
        since -- a renewed EAP-TLS server certificate (core/reload.py)."""
        return any(stale(m.factory) for m in self.methods.values())

    def certificates(self) -> dict[str, datetime]:
        """Each local method's certificates, as ``NAME.cert`` (core/certexpiry.py)."""
        return merged(prefixed(f"{n}.", certificates(m.factory)) for n, m in self.methods.items())

    async def aclose(self) -> None:
        pass


class _LocalSession:
    def __init__(self, ctx: EapSessionContext, allowed: Sequence[LocalMethod]) -> None:
        self._ctx = ctx
        self._allowed = list(allowed)
        self._identifier = secrets.randbelow(256)
        self._current: LocalMethod | None = None
        self._method: EapServerMethod | None = None
        self._answered = False  # the peer answered the method with its own Type
        self._tried: set[str] = set()

    def __repr__(self) -> str:
        return f"_LocalSession(identity={self._ctx.identity!r}, method={self._name()!r})"

    def _name(self) -> str | None:
        return self._current.name if self._current is not None else None

    # ------------------------------------------------------------ back-end API

    def start(self, identity_response: bytes) -> StepOrPending:
        # RFC 3748 §4.1: the next Request's Identifier must differ from the
        # last one; that was the Identity Request's, which the Identity
        # Response echoes (the exchange already checked it), so count on
        # from it rather than from an independent random start that
        # collides with it once in 256 sessions.
        try:
            identity = decode_eap(identity_response, max_len=self._ctx.max_packet)
        except EapError as exc:
            return self._fail(0, f"malformed-eap:{exc.field}")
        self._identifier = identity.identifier
        if not self._allowed:
            return self._fail(self._identifier, "no-eap-method-allowed")
        return self._propose(self._allowed[0])

    def receive(self, eap_response: bytes) -> StepOrPending:
        try:
            resp = decode_eap(eap_response, max_len=self._ctx.max_packet)
        except EapError as exc:
            return self._fail(0, f"malformed-eap:{exc.field}")
        if resp.code is not EapCode.RESPONSE or resp.type is None:
            return self._fail(resp.identifier, "not-an-eap-response")
        if self._current is None or self._method is None:
            return self._fail(resp.identifier, "no-method-running")
        if resp.type == EapType.NAK or resp.method == EapType.NAK:
            return self._on_nak(resp)
        if resp.method != self._current.key:
            return self._fail(resp.identifier, "unexpected-eap-type")
        self._answered = True
        out = self._method.process(resp)
        if not out.done:
            if out.data is None:
                return self._fail(resp.identifier, out.reason or "method-produced-nothing")
            return self._request(out.data)
        if not out.success:
            return self._fail(resp.identifier, out.reason or f"{self._current.name}-failed")
        return EapBackendStep(
            BackendVerdict.SUCCESS,
            success(resp.identifier),
            msk=self._method.msk(),
            reason=f"eap-{self._current.name}",
        )

    def close(self) -> None:
        self._method = None

    # ------------------------------------------------------------ internals

    def _on_nak(self, resp: EapPacket) -> EapBackendStep:
        # RFC 3748 §5.3: a Nak answers only the method's first Request.
        if self._answered:
            return self._fail(resp.identifier, "nak-after-method-started")
        try:
            if resp.type == EapType.EXPANDED:
                wanted: list[MethodKey] = parse_expanded_nak(resp.data)
            else:
                wanted = list(parse_legacy_nak(resp.data))
        except EapError:
            return self._fail(resp.identifier, "malformed-nak")
        for m in self._allowed:  # the HAC's order; the MN's list only limits
            if m.key in wanted and m.name not in self._tried:
                return self._propose(m)
        return self._fail(resp.identifier, "nak-names-nothing-offered")

    def _propose(self, m: LocalMethod) -> EapBackendStep:
        self._current = m
        self._tried.add(m.name)
        self._answered = False
        ctx = EapServerContext(
            mn_id=self._ctx.mn_id,
            identity=self._ctx.identity,
            peer=self._ctx.peer,
            extra={"max_packet": self._ctx.max_packet},  # methods fragment to fit it
        )
        self._method = m.factory.new(ctx)
        return self._request(self._method.initiate())

    def _request(self, data: bytes) -> EapBackendStep:
        assert self._current is not None
        self._identifier = (self._identifier + 1) & 0xFF
        key = self._current.key
        if isinstance(key, int):
            pkt = EapPacket(EapCode.REQUEST, self._identifier, key, data)
        else:
            pkt = EapPacket(EapCode.REQUEST, self._identifier, EapType.EXPANDED, data, key)
        return EapBackendStep(BackendVerdict.CONTINUE, encode_eap(pkt))

    def _fail(self, identifier: int, reason: str) -> EapBackendStep:
        return EapBackendStep(BackendVerdict.FAILURE, failure(identifier), reason=reason)


def local_methods(
    order: Sequence[str], factories: Mapping[str, tuple[MethodKey, EapServerFactory]]
) -> LocalBackend:
    """A ``LocalBackend`` from names in the HAC's order and their factories."""
    return LocalBackend([LocalMethod(n, factories[n][0], factories[n][1]) for n in order])
