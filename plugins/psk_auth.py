"""PSK authentication: RFC 6618 §5.8, a simplified GPSK exchange (PROFILE §4).

    MN  -> mn-id, mn-rand, auth-method: psk                    (Init, no auth)
    HAC -> mn-rand, hac-rand, auth-method: psk, auth(HAC)
    MN  -> mn-rand, hac-rand, mip6-sas, mip6-suitelist, auth(MN)   (Done)
    HAC -> ... status-code, auth(HAC)

Both ``auth`` keys are the MN's PSK.  An unknown ``mn-id`` is not revealed
at step 2: the HAC continues with the per-process stand-in key and fails at
Done with 401, exactly like a wrong PSK (no enumeration oracle).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from typing import Any

from mipsec.core.authmethod import (
    AuthMethod,
    Outcome,
    PeerMethod,
    PeerMethodContext,
    PeerStep,
    ServerMethod,
    ServerMethodContext,
    ServerStep,
)
from mipsec.core.errors import LocalProtocolError
from mipsec.core.hookspecs import hookimpl
from mipsec.core.wire.message import Message
from mipsec.core.wire.tvheader import LABEL_HAC, LABEL_MN, ParsedContent, verify_auth

RAND_LEN = 32  # mn-rand / hac-rand: 32 octets (RFC 6618 §5.5.6)
STATUS_BAD_REQUEST = 400
STATUS_UNAUTHORIZED = 401


class PskServer:
    """HAC side of one PSK exchange."""

    def __init__(self, ctx: ServerMethodContext) -> None:
        self._ctx = ctx
        psk = ctx.credentials.get_psk(ctx.mn_id) if ctx.credentials is not None else None
        # Unknown identity: same code path, stand-in key, failure only at Done.
        self._key = psk if psk else ctx.standin_key
        self._known = bool(psk)
        self._mn_rand: bytes | None = None
        self._hac_rand = secrets.token_bytes(RAND_LEN)

    def __repr__(self) -> str:
        return f"PskServer(mn_id={self._ctx.mn_id!r})"

    def _rands(self) -> Message:
        return Message(mn_rand=self._mn_rand, hac_rand=self._hac_rand)

    def start(self, init: Message, parsed: ParsedContent) -> ServerStep:
        if init.mn_rand is None:
            return ServerStep(Outcome.FAILURE, status=STATUS_BAD_REQUEST)
        self._mn_rand = init.mn_rand
        msg = self._rands()
        msg.auth_method = ("psk",)
        return ServerStep(Outcome.CONTINUE, msg, self._key)

    def step(self, request: Message, parsed: ParsedContent, is_done: bool) -> ServerStep:
        # PSK has no Mid round: anything but Done breaks the sequence (400).
        if (
            not is_done
            or request.mn_rand is None
            or request.hac_rand is None
            or self._mn_rand is None
            or not hmac.compare_digest(request.mn_rand, self._mn_rand)
            or not hmac.compare_digest(request.hac_rand, self._hac_rand)
            or request.eap_payload is not None
        ):
            return ServerStep(Outcome.FAILURE, self._rands(), self._key, STATUS_BAD_REQUEST)
        ok = verify_auth(self._key, LABEL_MN, parsed, self._ctx.cb_octets)
        if not ok or not self._known:
            return ServerStep(Outcome.FAILURE, self._rands(), self._key, STATUS_UNAUTHORIZED)
        return ServerStep(Outcome.SUCCESS, self._rands(), self._key)


class PskPeer:
    """MN side of one PSK exchange."""

    def __init__(self, ctx: PeerMethodContext) -> None:
        if not ctx.secret:
            raise LocalProtocolError("PSK peer needs a non-empty PSK")
        self._ctx = ctx
        self._psk = ctx.secret
        self._mn_rand = secrets.token_bytes(RAND_LEN)
        self._hac_rand: bytes | None = None

    def __repr__(self) -> str:
        return f"PskPeer(mn_id={self._ctx.mn_id!r})"

    def init_headers(self) -> Message:
        return Message(mn_id=self._ctx.mn_id, mn_rand=self._mn_rand)

    def on_response(self, response: Message, parsed: ParsedContent) -> PeerStep:
        if self._hac_rand is not None:
            return PeerStep(Outcome.FAILURE, reason="unexpected second PSK response")
        if not verify_auth(self._psk, LABEL_HAC, parsed, self._ctx.cb_octets):
            return PeerStep(Outcome.FAILURE, reason="HAC auth does not verify")
        if response.mn_rand is None or not hmac.compare_digest(response.mn_rand, self._mn_rand):
            return PeerStep(Outcome.FAILURE, reason="mn-rand not echoed")
        if response.hac_rand is None:
            return PeerStep(Outcome.FAILURE, reason="hac-rand missing")
        self._hac_rand = response.hac_rand
        return PeerStep(
            Outcome.CONTINUE,
            Message(mn_rand=self._mn_rand, hac_rand=self._hac_rand),
            self._psk,
            ready_for_done=True,
        )

    def final_key(self, response: Message) -> bytes | None:
        return self._psk

    def check_final(self, response: Message) -> str | None:
        """PSK final responses echo both rands (PROFILE §4 step 4)."""
        if response.mn_rand is None or not hmac.compare_digest(response.mn_rand, self._mn_rand):
            return "mn-rand not echoed in the final response"
        if self._hac_rand is None or response.hac_rand is None:
            return "hac-rand missing in the final response"
        if not hmac.compare_digest(response.hac_rand, self._hac_rand):
            return "hac-rand not echoed in the final response"
        return None


class PskMethod:
    name = "psk"

    def server(self, ctx: ServerMethodContext) -> ServerMethod:
        return PskServer(ctx)

    def peer(self, ctx: PeerMethodContext) -> PeerMethod:
        return PskPeer(ctx)


@hookimpl
def mipsec_auth_methods() -> Sequence[Any]:
    method: AuthMethod = PskMethod()
    return [method]
