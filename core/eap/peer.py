"""The MN's EAP peer state machine (RFC 3748 §2-§5, RFC 4137 §4), sans-I/O.

It answers one EAP-Request at a time: Identity with the configured identity,
Notification with an empty Notification Response (RFC 3748 §5.2), a Request
for a method the MN is not configured for with a Nak naming what it would
use (legacy Nak, or the expanded Nak for an expanded Request, §5.3), and
everything of the selected method's Type goes to that method's machine
(``core/eap/method.py``), whose answer goes back in the Request's Type form
(legacy or expanded, RFC 3748 §5.7).  It keeps the method state and decision of RFC 4137
§4.1 so the MHAuth layer knows when to add the Done parameters and whether an
EAP-Success may be believed.

Rules (RFC 4137 §4.1 and RFC 3748 §2.1): once a method has answered a
Request, a Request of any other method Type is silently discarded (and, MHAuth
being lockstep, ends the exchange); so is a Request whose Identifier repeats
the previous one with different content (a retransmission with the same
content gets the same Response again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mipsec.core.eap.method import (
    Decision,
    EapPeerContext,
    EapPeerFactory,
    EapPeerMethod,
    MethodState,
)
from mipsec.core.wire.eap import (
    EXPANDED_NAK,
    EapCode,
    EapError,
    EapPacket,
    EapType,
    MethodKey,
    decode_eap,
    encode_eap,
    expanded_nak_data,
    legacy_nak_data,
    method_response,
)

__all__ = ["EapPeerMachine", "PeerReply"]


@dataclass(frozen=True, slots=True)
class PeerReply:
    """The peer's answer to one Request: ``response`` (a whole EAP packet) or
    None with ``reason`` (the Request was discarded or the method failed)."""

    response: bytes | None
    reason: str = ""


class EapPeerMachine:
    """One MN's EAP conversation.

    ``methods`` maps each configured method's wire key (Type, or expanded
    pair) to ``(name, factory)``, in the MN's order of preference (that order
    is what a Nak proposes).
    """

    def __init__(
        self,
        *,
        identity: str,
        methods: Mapping[MethodKey, tuple[str, EapPeerFactory]],
        ctx: EapPeerContext,
        max_packet: int = 1400,
    ) -> None:
        self.identity = identity
        self._methods = dict(methods)
        self._ctx = ctx
        self.max_packet = max_packet
        self.method: EapPeerMethod | None = None
        self.method_name: str | None = None
        self._method_key: MethodKey | None = None
        self.state = MethodState.INIT
        self.decision = Decision.FAIL
        self._last: tuple[int, bytes, bytes] | None = None  # (id, request, response)
        self.notifications: list[str] = []

    def __repr__(self) -> str:
        return f"EapPeerMachine(identity={self.identity!r}, method={self.method_name!r})"

    @property
    def ready(self) -> bool:
        """PROFILE §4 item 4: the decision is COND_SUCC or UNCOND_SUCC (the MSK
        exists): the Done parameters go on the Response just built."""
        return self.decision in (Decision.COND_SUCC, Decision.UNCOND_SUCC)

    @property
    def succeeded(self) -> bool:
        """RFC 4137 §4.1: an EAP-Success may be believed -- the decision allows
        it and the method is not waiting for more (methodState not CONT, e.g.
        an EAP-AKA result indication still to come, RFC 4187 §6.3.4)."""
        return self.ready and self.state is not MethodState.CONT

    def msk(self) -> bytes | None:
        return self.method.msk() if self.method is not None else None

    def process(self, packet: bytes) -> PeerReply:
        """Answer one EAP-Request (whole packet)."""
        try:
            req = decode_eap(packet, max_len=self.max_packet)
        except EapError as exc:
            return PeerReply(None, f"malformed EAP request: {exc}")
        if req.code is not EapCode.REQUEST:
            # Success/Failure come only with the final response (PROFILE §4).
            return PeerReply(None, f"EAP {req.code.name} where a Request was expected")
        if self._last is not None and req.identifier == self._last[0]:
            if packet == self._last[1]:
                return PeerReply(self._last[2])  # retransmission: same answer
            return PeerReply(None, "EAP Request reuses the previous Identifier")
        reply = self._answer(req)
        if reply.response is not None:
            if len(reply.response) > self.max_packet:
                return PeerReply(None, f"EAP response of {len(reply.response)} octets too large")
            self._last = (req.identifier, bytes(packet), reply.response)
        return reply

    def _respond(self, req: EapPacket, type_: int, data: bytes = b"") -> PeerReply:
        pkt = EapPacket(EapCode.RESPONSE, req.identifier, type_, data)
        return PeerReply(encode_eap(pkt))

    def _answer(self, req: EapPacket) -> PeerReply:
        assert req.type is not None
        if req.type == EapType.IDENTITY:
            if self.method is not None:
                return PeerReply(None, "EAP Identity request after the method started")
            return self._respond(req, EapType.IDENTITY, self.identity.encode("utf-8"))
        if req.type == EapType.NOTIFICATION:
            # RFC 3748 §5.2: acknowledge; it changes no state.  The text is
            # kept (bounded) for the log.
            if len(self.notifications) < 8:
                self.notifications.append(req.data[:200].decode("utf-8", "replace"))
            return self._respond(req, EapType.NOTIFICATION)
        key = req.method
        assert key is not None
        if self.method is not None:
            if key != self._method_key:
                return PeerReply(None, "EAP Request for another method after the method started")
            return self._run(req)
        entry = self._methods.get(key)
        if entry is None:
            return self._nak(req)
        name, factory = entry
        # The method learns the identity this machine sent (RFC 4187 §7: an
        # AKA master key is bound to it), whatever its context said.
        self.method = factory.new(dataclasses.replace(self._ctx, identity=self.identity))
        self.method_name = name
        self._method_key = key
        return self._run(req)

    def _nak(self, req: EapPacket) -> PeerReply:
        """RFC 3748 §5.3: propose the methods this MN is configured for."""
        wanted: Sequence[MethodKey] = list(self._methods)
        if req.type == EapType.EXPANDED:
            return PeerReply(
                encode_eap(
                    EapPacket(
                        EapCode.RESPONSE,
                        req.identifier,
                        EapType.EXPANDED,
                        expanded_nak_data(list(wanted)),
                        expanded=EXPANDED_NAK,
                    )
                )
            )
        legacy = [k for k in wanted if isinstance(k, int)]
        if any(not isinstance(k, int) for k in wanted):
            legacy.append(EapType.EXPANDED)  # "I would use expanded types" (§5.3.1)
        return self._respond(req, EapType.NAK, legacy_nak_data(legacy))

    def _run(self, req: EapPacket) -> PeerReply:
        assert self.method is not None and self._method_key is not None
        out = self.method.process(req)
        self.state, self.decision = out.state, out.decision
        if out.data is None:
            return PeerReply(None, out.reason or f"EAP method {self.method_name} discarded")
        # In the Request's Type form (RFC 3748 §5.7): what the method's own
        # integrity check, if any, was computed over (RFC 4187 §10.15).
        return PeerReply(encode_eap(method_response(req, out.data)), out.reason)
