"""The ``radius`` EAP back end: EAP pass-through to an AAA server (RFC 3579).

The HAC's MHAuth ``eap`` method has already asked for and checked the MN's
identity; this back end relays the rest of the conversation (RFC 4137's
pass-through authenticator, strongSwan's eap-radius):

* the MN's EAP-Response/Identity goes in the first Access-Request, with
  User-Name = that identity (RFC 3579 §2.1) -- every later Access-Request
  repeats it and echoes the last State (RFC 2865 §5.24);
* Access-Challenge -> CONTINUE with the joined EAP-Message, which must be one
  well-formed EAP-Request of at most ``ctx.max_packet`` octets (PROFILE §4
  item 9) -- anything else ends the conversation with FAILURE;
* Access-Accept -> SUCCESS with its EAP-Success, the
  MSK = MS-MPPE-Recv-Key || MS-MPPE-Send-Key (None when absent: the MHAuth
  layer decides) and ``identity`` = the Accept's User-Name when present.
  An Access-Accept to the very first Access-Request is a FAILURE: no EAP
  method ran (strongSwan's rule); so is one without EAP-Message, or whose
  EAP packet is no EAP-Success (RFC 3579 §2.6.3: never manufactured);
* Access-Reject -> FAILURE with its EAP-Failure (or the HAC's own, which
  every refusal carries: PROFILE §4 item 6);
* no verified answer -> UNAVAILABLE 504; every server in hold-off ->
  UNAVAILABLE 503 with ``retry_after``.

One back end instance is one server group (its own sockets and
dead-server state); a conversation stays with the server that answered its
first request, because State means nothing to any other server.

Options (the back end's table in the HAC configuration)::

    servers = [{ host = "127.0.0.1", port = 1812, secret_file = "radius.secret" }]
    timeout = 2.0           # seconds before each retransmission
    retries = 1             # retransmissions after the first send
    dead_time = 30.0        # hold-off of a server that did not answer
    nas_identifier = "mipsec-hac"
    nas_ip_address = "192.0.2.1"      # optional; nas_ipv6_address too
    service_type = 2        # Framed-User (0 = do not send)
    nas_port_type = 5       # Virtual (0 = do not send)
    calling_station_id = true         # the MN's address and port
    framed_mtu = true       # Framed-MTU = the largest EAP packet the MN takes
    status_server = true    # RFC 5997 probe before a silent server is held off
    require_user_name = false         # an Accept must name the identity in User-Name
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from mipsec.aaa.codec import RadiusCode, RadiusWireError, Reply, Request, encode_access_request
from mipsec.aaa.options import ClientOptions, make_client, nas_attributes, secrets_changed
from mipsec.aaa.radius import RadiusClient, RadiusError, RadiusTimeout, RadiusUnavailable
from mipsec.core.eap.backend import (
    BackendVerdict,
    EapBackendStep,
    EapSessionContext,
)
from mipsec.core.errors import LocalProtocolError
from mipsec.core.hookspecs import Factory, PluginContext, hookimpl
from mipsec.core.issuer import utcnow
from mipsec.core.wire.eap import EapCode, EapError, decode_eap, failure
from mipsec.plugins._options import parse_options

__all__ = ["RadiusBackendFactory", "RadiusEapBackend", "RadiusEapSession"]

AUTH_PORT = 1812  # RFC 2865 §3 (IANA "radius")
MSK_MIN = 64  # RFC 5247 §1.2
NO_ANSWER = 504
UNAVAILABLE = 503


class PassthroughOptions(ClientOptions):
    service_type: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 2  # Framed-User
    nas_port_type: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] = 5  # Virtual
    calling_station_id: bool = True
    framed_mtu: bool = True
    # Before a silent server is held off for dead_time, one Status-Server
    # (RFC 5997) asks it; answered, it is not (FreeRADIUS answers it with its
    # default status_server = yes).  false: held off at the first request
    # that went unanswered while it answered nothing else.
    status_server: bool = True
    # The Access-Accept must name the identity the server authenticated in
    # User-Name (the HAC then matches it with mn-id, PROFILE §4 item 8); an
    # Accept without one is refused.  For a server set up to put the
    # method's identity there (a certificate's SAN, an AKA permanent
    # identity): without it, only the EAP Identity the HAC checked itself
    # ties the MN's credential to mn-id -- and that is the AAA server's
    # policy to enforce (README "Which identity the AAA server vouches for").
    require_user_name: bool = False


class RadiusEapBackend:
    """A configured server group; ``session`` is called once per conversation."""

    def __init__(
        self, client: RadiusClient, opts: PassthroughOptions, base_dir: Path | None = None
    ) -> None:
        self.client = client
        self.opts = opts
        self._nas = nas_attributes(opts)
        self._base_dir = base_dir  # where relative secret_file paths resolve

    def stale(self) -> bool:
        """A ``secret_file`` was rewritten (a rotated secret): the HAC's next
        reload builds this back end again, though its options did not change."""
        return self._base_dir is not None and secrets_changed(
            self.opts, self._base_dir, self.client
        )

    def __repr__(self) -> str:
        return f"RadiusEapBackend({', '.join(self.client.servers)})"

    def session(self, ctx: EapSessionContext) -> RadiusEapSession:
        return RadiusEapSession(self, ctx)

    def request_attributes(self, ctx: EapSessionContext) -> list[tuple[str, Any]]:
        """What every Access-Request of ``ctx``'s conversation carries besides EAP and State."""
        o = self.opts
        attrs: list[tuple[str, Any]] = [("User-Name", ctx.identity), *self._nas]
        if o.calling_station_id:
            attrs.append(("Calling-Station-Id", ctx.peer))
        if o.service_type:
            attrs.append(("Service-Type", o.service_type))
        if o.nas_port_type:
            attrs.append(("NAS-Port-Type", o.nas_port_type))
        if o.framed_mtu:
            # RFC 3579 §2.4: the largest EAP packet the NAS can carry to the
            # peer; EAP-TLS servers fragment to fit it.
            attrs.append(("Framed-MTU", ctx.max_packet))
        return attrs

    async def aclose(self) -> None:
        await self.client.aclose()


class RadiusEapSession:
    """One MN's conversation: lockstep, one Access-Request at a time."""

    def __init__(self, backend: RadiusEapBackend, ctx: EapSessionContext) -> None:
        self._backend = backend
        self._ctx = ctx
        self._attrs = backend.request_attributes(ctx)
        self._state: bytes | None = None  # the last Access-Challenge's State
        self._server: str | None = None  # the server this conversation is pinned to
        self._rounds = 0  # Access-Requests answered so far
        self._busy = False
        self._closed = False
        self._last_id = 0  # Identifier of the MN's last EAP-Response

    def __repr__(self) -> str:
        return f"RadiusEapSession(mn_id={self._ctx.mn_id!r}, server={self._server})"

    @property
    def server(self) -> str | None:
        """The server the conversation is pinned to (after its first answer)."""
        return self._server

    def start(self, identity_response: bytes) -> Awaitable[EapBackendStep]:
        if self._rounds or self._busy:
            raise LocalProtocolError("radius session: start() once, before receive()")
        return self._round(identity_response)

    def receive(self, eap_response: bytes) -> Awaitable[EapBackendStep]:
        if not self._rounds:
            raise LocalProtocolError("radius session: receive() before start() was answered")
        return self._round(eap_response)

    def close(self) -> None:
        self._closed = True
        self._state = None
        self._server = None

    # ------------------------------------------------------------ one round

    def _fail(self, reason: str, eap: bytes | None = None) -> EapBackendStep:
        self._end()
        return EapBackendStep(BackendVerdict.FAILURE, eap or failure(self._last_id), reason=reason)

    def _end(self) -> None:
        self._state = None  # nothing more to echo: the conversation is over

    async def _round(self, eap: bytes) -> EapBackendStep:
        if self._closed:
            raise LocalProtocolError("radius session: closed")
        if self._busy:
            raise LocalProtocolError("radius session: one EAP response at a time")
        if len(eap) < 2:
            raise LocalProtocolError("radius session: not an EAP packet")
        self._last_id = eap[1]
        state = self._state
        attrs = self._attrs

        def build(secret: bytes, identifier: int) -> Request:
            return encode_access_request(identifier, secret, attrs, eap=eap, state=state)

        self._busy = True
        try:
            server, reply = await self._backend.client.send(build, server=self._server)
        except RadiusUnavailable as exc:
            self._end()
            retry = utcnow() + timedelta(seconds=max(1, math.ceil(exc.retry_after)))
            return EapBackendStep(
                BackendVerdict.UNAVAILABLE,
                failure(self._last_id),
                status=UNAVAILABLE,
                retry_after=retry.replace(microsecond=0),
                reason=str(exc),
            )
        except RadiusTimeout as exc:
            self._end()
            return EapBackendStep(
                BackendVerdict.UNAVAILABLE,
                failure(self._last_id),
                status=NO_ANSWER,
                reason=str(exc),
            )
        except RadiusError as exc:  # the client is closing (service stop)
            self._end()
            return EapBackendStep(
                BackendVerdict.UNAVAILABLE,
                failure(self._last_id),
                status=UNAVAILABLE,
                retry_after=_soon(),
                reason=str(exc),
            )
        except (LocalProtocolError, ValueError) as exc:  # an attribute that cannot be sent
            return self._fail(f"cannot build the Access-Request: {exc}")
        finally:
            self._busy = False
        if self._closed:  # close() while the request was out: nothing to continue
            return self._fail("conversation closed while RADIUS was answering")
        self._server = server
        self._rounds += 1
        if reply.code is RadiusCode.ACCESS_CHALLENGE:
            return self._challenge(reply, server)
        if reply.code is RadiusCode.ACCESS_ACCEPT:
            return self._accept(reply, server)
        return self._reject(reply, server)

    def _challenge(self, reply: Reply, server: str) -> EapBackendStep:
        eap = reply.eap_message
        limit = self._ctx.max_packet
        if eap is None:
            return self._fail(f"Access-Challenge from {server} without EAP-Message")
        if len(eap) > limit:
            return self._fail(
                f"Access-Challenge from {server}: a {len(eap)}-octet EAP packet "
                f"exceeds the {limit}-octet limit"
            )
        try:
            pkt = decode_eap(eap, max_len=limit)
        except EapError as exc:
            return self._fail(f"Access-Challenge from {server}: malformed EAP ({exc})")
        if pkt.code is not EapCode.REQUEST:
            return self._fail(f"Access-Challenge from {server} carries EAP {pkt.code.name}")
        self._state = reply.state
        return EapBackendStep(BackendVerdict.CONTINUE, eap)

    def _accept(self, reply: Reply, server: str) -> EapBackendStep:
        if self._rounds == 1:
            # strongSwan's eap-radius rule: no EAP method ran, so nothing
            # was proven; an Accept here is a misconfigured or forged one.
            return self._fail(f"Access-Accept from {server} to the first Access-Request")
        eap = reply.eap_message
        if eap is None:
            # RFC 3579 §2.6.3: "Access-Accept/no EAP-Message attribute" is a
            # combination a server SHOULD NOT send, and the NAS "MUST NOT
            # 'manufacture' EAP packets in order to correct contradictory
            # messages".  A 200 carries the server's EAP-Success (PROFILE §4
            # item 6): without one the HAC cannot grant, so it refuses -- 401
            # with the EAP-Failure every refusal carries (fail closed; until
            # the twenty-ninth session the HAC built an EAP-Success itself,
            # citing this section for the opposite of what it says).
            return self._fail(
                f"Access-Accept from {server} without EAP-Message: refused "
                "(RFC 3579 §2.6.3, no EAP-Success to give the MN)"
            )
        try:
            pkt = decode_eap(eap, max_len=self._ctx.max_packet)
        except EapError as exc:
            return self._fail(f"Access-Accept from {server}: malformed EAP ({exc})")
        if pkt.code is not EapCode.SUCCESS:
            return self._fail(f"Access-Accept from {server} carries EAP {pkt.code.name}")
        if reply.mppe_error is not None:
            return self._fail(f"Access-Accept from {server}: {reply.mppe_error}")
        try:
            identity = reply.user_name()
        except RadiusWireError as exc:
            return self._fail(f"Access-Accept from {server}: {exc}")
        if identity is None and self._backend.opts.require_user_name:
            return self._fail(f"Access-Accept from {server} names no User-Name (require_user_name)")
        msk, note = _msk(reply)
        self._end()
        return EapBackendStep(
            BackendVerdict.SUCCESS,
            eap,
            msk=msk,
            identity=identity,
            reason=f"Access-Accept from {server}{note}",
        )

    def _reject(self, reply: Reply, server: str) -> EapBackendStep:
        eap = reply.eap_message
        reason = f"Access-Reject from {server}"
        if eap is not None:
            try:
                if decode_eap(eap, max_len=self._ctx.max_packet).code is EapCode.FAILURE:
                    return self._fail(reason, eap)
            except EapError:
                pass
        return self._fail(reason)  # with an EAP-Failure of our own


def _msk(reply: Reply) -> tuple[bytes | None, str]:
    """MSK = MS-MPPE-Recv-Key || MS-MPPE-Send-Key (RFC 3579 §2.4, RFC 5216 §2.3)."""
    recv, send = reply.mppe_recv_key, reply.mppe_send_key
    if recv is None or send is None:
        return None, " (no MS-MPPE keys: no MSK)"
    msk = recv + send
    if len(msk) < MSK_MIN:
        return None, f" (MS-MPPE keys of {len(msk)} octets: too short for an MSK)"
    return msk, ""


def _soon() -> datetime:
    return (utcnow() + timedelta(seconds=30)).replace(microsecond=0)


class RadiusBackendFactory:
    """``mipsec_eap_backends`` factory ``radius``."""

    name = "radius"

    def create(self, options: Mapping[str, Any], ctx: PluginContext) -> RadiusEapBackend:
        opts = parse_options(PassthroughOptions, options)
        client = make_client(opts, ctx.base_dir, AUTH_PORT, status_server=opts.status_server)
        return RadiusEapBackend(client, opts, ctx.base_dir)


@hookimpl
def mipsec_eap_backends() -> Sequence[Factory]:
    return [RadiusBackendFactory()]
