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
import logging
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from mipsec.core.authmethod import (
    AuthMethod,
    FinalShape,
    Outcome,
    PeerMethod,
    PeerMethodContext,
    PeerStep,
    ServerMethod,
    ServerMethodContext,
    ServerStep,
)
from mipsec.core.errors import LocalProtocolError
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.wire.message import Message
from mipsec.core.wire.tvheader import LABEL_HAC, LABEL_MN, ParsedContent, verify_auth

log = logging.getLogger("mipsec.psk")

RAND_LEN = 32  # mn-rand / hac-rand: 32 octets (RFC 6618 §5.5.6)
STATUS_BAD_REQUEST = 400
STATUS_UNAUTHORIZED = 401
STATUS_UNAVAILABLE = 503
BACKEND_RETRY_AFTER = 30  # seconds: a failing credential backend is an outage (PROFILE §6 503)


class PskServer:
    """HAC side of one PSK exchange."""

    def __init__(self, ctx: ServerMethodContext) -> None:
        self._ctx = ctx
        # Until the credentials are looked up (start), only the stand-in key.
        self._key = ctx.standin_key
        self._known = False
        self._mn_rand: bytes | None = None
        self._hac_rand = secrets.token_bytes(RAND_LEN)
        self._hac_rand_sent = False

    def __repr__(self) -> str:
        return f"PskServer(mn_id={self._ctx.mn_id!r})"

    def _rands(self) -> Message:
        return Message(
            mn_rand=self._mn_rand, hac_rand=self._hac_rand if self._hac_rand_sent else None
        )

    def start(self, init: Message, parsed: ParsedContent) -> ServerStep:
        if init.mn_rand is None:
            return ServerStep(Outcome.FAILURE, status=STATUS_BAD_REQUEST, reason="bad-request")
        self._mn_rand = init.mn_rand
        credentials = self._ctx.credentials
        try:
            psk = credentials.get_psk(self._ctx.mn_id) if credentials is not None else None
        except Exception as exc:
            # A backend outage is not the MN's fault: 503 with retry-after
            # (PROFILE §6), one log line, never a traceback.  Only the class
            # name: a backend's message could quote a secret.
            log.error(
                "mn_id=%s: credential backend failed: %s", self._ctx.mn_id, type(exc).__name__
            )
            return ServerStep(
                Outcome.FAILURE,
                status=STATUS_UNAVAILABLE,
                reason="credential-backend-failure",
                retry_after=(datetime.now(UTC) + timedelta(seconds=BACKEND_RETRY_AFTER)).replace(
                    microsecond=0
                ),
            )
        # Unknown identity: same code path, stand-in key, failure only at Done.
        if psk:
            self._key = psk
            self._known = True
        self._hac_rand_sent = True
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
            return ServerStep(Outcome.FAILURE, status=STATUS_BAD_REQUEST, reason="bad-request")
        ok = verify_auth(self._key, LABEL_MN, parsed, self._ctx.cb_octets)
        if not self._known:
            # The wire says 401 either way; the log knows which (issue 6 item 7).
            return ServerStep(
                Outcome.FAILURE, status=STATUS_UNAUTHORIZED, reason="unknown-identity"
            )
        if not ok:
            return ServerStep(Outcome.FAILURE, status=STATUS_UNAUTHORIZED, reason="bad-auth")
        return ServerStep(Outcome.SUCCESS)

    def resume(self, result: Any) -> ServerStep:
        raise LocalProtocolError("the PSK method never waits for I/O")

    def final(self, status: int) -> FinalShape:
        # PROFILE §4 step 4: the final response echoes both rands and is keyed
        # with the key the HAC holds (the PSK or the stand-in), whatever the
        # status -- so a wrong-PSK MN cannot verify a 401 and treats it as
        # unauthenticated.  An Init without mn-rand: the method was selected
        # before it refused the Init, so its 400 carries auth too (PROFILE §4,
        # last paragraph: "from the first response on"), keyed with the key
        # held then -- the stand-in, no credential looked up for a malformed
        # Init -- and echoes no rand (there is none).  It had no auth before
        # the twenty-ninth session (found in review).
        return FinalShape(self._rands(), self._key)

    def close(self) -> None:
        pass


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
        # PROFILE §4 PSK step 2: the HAC's first response names the method it
        # chose; anything but exactly "psk" is not this exchange.
        if response.auth_method != ("psk",):
            return PeerStep(Outcome.FAILURE, reason="auth-method in the HAC's response is not psk")
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


class _ServerFactory:
    def new(self, ctx: ServerMethodContext) -> ServerMethod:
        return PskServer(ctx)


class _PeerFactory:
    def new(self, ctx: PeerMethodContext) -> PeerMethod:
        return PskPeer(ctx)


def _no_options(options: Mapping[str, Any]) -> None:
    if options:
        raise ValueError(f"{sorted(options)[0]}: the psk method takes no options")


class PskMethod:
    name = "psk"

    def server(self, options: Mapping[str, Any], ctx: PluginContext) -> _ServerFactory:
        _no_options(options)
        return _ServerFactory()

    def peer(self, options: Mapping[str, Any], ctx: PluginContext) -> _PeerFactory:
        _no_options(options)
        return _PeerFactory()


@hookimpl
def mipsec_auth_methods() -> Sequence[Any]:
    method: AuthMethod = PskMethod()
    return [method]
