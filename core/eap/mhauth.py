"""The ``eap`` authentication method of MHAuth (RFC 6618 §5.9, PROFILE §4 "EAP").

HAC side (:class:`EapServer`), for each exchange:

1. Init (``mn-id``, ``mn-rand``, ``auth-method: eap``) -> ``auth-method: eap``
   and ``eap-payload`` = EAP-Request/Identity, keyed with ``1``.
2. The MN's Identity must match ``mn-id`` under the identity policy (default
   ``nai``: equal, realm case-insensitive; item 8); the identity is routed to
   a back end (``local`` EAP methods, or a pass-through such as ``radius``)
   and EAP packets are relayed both ways (Mid rounds, keyed with ``1``).
   Each Response must echo the last Request's Identifier; EAP packets are at
   most ``max_packet`` octets (item 9).  A back end that must wait for the
   network answers with an awaitable: the step becomes PENDING and the
   exchange's shell awaits it (one MN waiting on AAA never delays another).
3. Done requests (``mip6-sas`` + ``mip6-suitelist``) are kept until the key
   is known (item 5): each must verify with ``1`` or with the MSK, and the one
   the final response answers with the MSK (for a method that derives one).
4. Final: a 200 carries the EAP-Success and is keyed with the 64-octet MSK;
   every other final carries EAP-Failure and is keyed with ``1`` (item 6).
   MSK-less methods are refused (401) unless ``allow_msk_less`` (item 7).

MN side (:class:`EapPeer`): the Init carries ``mn-rand``; every response is
checked with key ``1``; EAP goes through :class:`~mipsec.core.eap.peer.
EapPeerMachine`; the Done parameters ride on the first Response built once
the method's decision is COND_SUCC/UNCOND_SUCC (item 4) and on every later
one, keyed with the MSK; a final 200 must carry EAP-Success *and* find the
method finished (an early Success is refused), keyed with the MSK.

Configuration -- HAC ``[methods.eap]`` (validated at start):

``types``           local EAP methods offered, in the HAC's order (e.g. ``["tls"]``)
``realms``          NAI / realm / ``"*"`` -> local types allowed for it (default: ``types``)
``routes``          ``[{match, backend}]``: identities sent to a named back end
                    (first match wins; default ``local``); ``match`` is ``"*"``, a
                    realm, ``"*.suffix"`` or an NAI
``backends``        named back-end instances: ``{NAME = {backend = "radius", ...}}``
``max_packet``      1400; ``allow_msk_less`` false; ``identity`` ``"nai"`` | ``"exact"``;
``timeout``         longest wait for a back end's answer (seconds, default 10)
any other key       the options table of the local EAP method of that name

MN ``[eap]``: ``methods`` (in preference order), ``identity`` (default
``mn_id``), ``max_packet``, ``allow_msk_less``, and a table per method.
"""

from __future__ import annotations

import dataclasses
import hmac
import inspect
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mipsec.core import pluginmanager
from mipsec.core.authmethod import (
    FinalShape,
    Outcome,
    Overloaded,
    PeerMethodContext,
    PeerStep,
    Pending,
    ServerMethodContext,
    ServerStep,
)
from mipsec.core.certexpiry import certificates, merged
from mipsec.core.eap.backend import (
    BackendVerdict,
    EapBackend,
    EapBackendSession,
    EapBackendStep,
    EapSessionContext,
    StepOrPending,
)
from mipsec.core.eap.local import LocalBackend, LocalMethod
from mipsec.core.eap.method import MSK_LEN, EapMethodPlugin, EapPeerContext, EapPeerFactory
from mipsec.core.eap.peer import EapPeerMachine
from mipsec.core.hookspecs import PluginContext
from mipsec.core.nai import nai_key
from mipsec.core.options import error_text
from mipsec.core.reload import stale
from mipsec.core.wire.eap import (
    EapCode,
    EapError,
    EapType,
    MethodKey,
    decode_eap,
    failure,
    identity_request,
    parse_identity,
)
from mipsec.core.wire.message import Message
from mipsec.core.wire.tvheader import LABEL_HAC, LABEL_MN, ParsedContent, verify_auth

__all__ = ["EapMethod", "EapPeer", "EapServer", "nai_match"]

ONE = b"1"  # PROFILE §4: the auth key before the MSK exists (ASCII "1", 0x31)
RAND_LEN = 32
DEFAULT_MAX_PACKET = 1400  # PROFILE §4 item 9
# Item 5 makes the HAC keep Done requests until the key arrives.  Only the
# ones that still need it are kept (the newest, and those that did not verify
# with "1"), at most this many and this many octets in all -- a legitimate
# exchange keeps one or two of a few kilobytes.  Beyond, 400: before, every
# Done request of up to 255 rounds was kept whole, each up to a 64 KiB
# container (its unknown headers are under the MAC too), ~50 MB per
# connection for an attacker without credentials.
MAX_DONES_KEPT = 4
MAX_DONE_OCTETS_KEPT = 32 * 1024
BACKEND_RETRY_AFTER = 30  # seconds, for a 503 when a back end is down

BAD_REQUEST = 400
UNAUTHORIZED = 401
INTERNAL_ERROR = 500
UNAVAILABLE = 503
TIMEOUT = 504

_RESERVED = frozenset(
    {"types", "realms", "routes", "backends", "max_packet", "allow_msk_less", "identity",
     "timeout", "methods"}
)  # fmt: skip


# ------------------------------------------------------------ identity policy


def _split(nai: str) -> tuple[str, str | None]:
    user, at, realm = nai.rpartition("@")
    return (user, realm) if at else (nai, None)


def nai_match(a: str, b: str, policy: str = "nai") -> bool:
    """PROFILE §4 item 8: ``nai`` = equal, realm case-insensitive; ``exact`` = equal."""
    if policy == "exact":
        return hmac.compare_digest(a.encode(), b.encode())
    ua, ra = _split(a)
    ub, rb = _split(b)
    return ua == ub and (ra is None) == (rb is None) and (ra or "").lower() == (rb or "").lower()


def _realm(nai: str) -> str:
    return (_split(nai)[1] or "").lower()


def _pattern_matches(pattern: str, identity: str, policy: str) -> bool:
    if pattern == "*":
        return True
    if "@" in pattern.lstrip("@"):
        return nai_match(pattern, identity, policy)
    realm = _realm(identity)
    p = pattern.lstrip("@").lower()
    if p.startswith("*."):
        return realm.endswith(p[1:])
    return realm == p


# ------------------------------------------------------------ configuration


class _Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    match: str = Field(min_length=1)
    backend: str = Field(min_length=1)


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    max_packet: int = Field(default=DEFAULT_MAX_PACKET, ge=256, le=65535)
    allow_msk_less: bool = False


class _ServerOptions(_Common):
    types: tuple[str, ...] = ()
    realms: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    routes: tuple[_Route, ...] = ()
    backends: dict[str, dict[str, Any]] = Field(default_factory=dict)
    identity: Literal["nai", "exact"] = "nai"
    timeout: float = Field(default=10.0, gt=0, le=600)


class _PeerOptions(_Common):
    methods: tuple[str, ...] = Field(min_length=1)
    identity: str | None = Field(default=None, min_length=1, max_length=253)


def _parse(model: type[Any], options: Mapping[str, Any]) -> Any:
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ValueError(error_text(exc)) from None


def _prefixed(table: str, exc: ValueError) -> str:
    """``key: reason; key2: reason2`` of a sub-table's factory, each key under ``table``."""
    return "; ".join(f"{table}.{part}" for part in str(exc).split("; "))


def _method_tables(opts: _Common, known: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The per-method option tables (keys other than the reserved ones)."""
    out: dict[str, Mapping[str, Any]] = {}
    for key, value in (opts.model_extra or {}).items():
        if key in _RESERVED:
            continue
        if key not in known:
            names = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{key}: no EAP method {key!r} is installed (installed: {names})")
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: must be a table of options for the {key!r} EAP method")
        out[key] = value
    return out


def _eap_plugins(ctx: PluginContext) -> tuple[Any, dict[str, EapMethodPlugin]]:
    pm = ctx.extra.get("pm") or pluginmanager.make_plugin_manager()
    return pm, pluginmanager.registry(pm, "mipsec_eap_methods")


class EapServerConfig:
    """The HAC's EAP configuration, built once at start."""

    def __init__(self, options: Mapping[str, Any], ctx: PluginContext) -> None:
        opts: _ServerOptions = _parse(_ServerOptions, options)
        pm, plugins = _eap_plugins(ctx)
        tables = _method_tables(opts, plugins)
        self.max_packet = opts.max_packet
        self.allow_msk_less = opts.allow_msk_less
        self.identity_policy = opts.identity
        self.timeout = opts.timeout
        self.types = opts.types
        # Local methods: every name the HAC offers anywhere.
        wanted = list(opts.types)
        for names in opts.realms.values():
            wanted += [n for n in names if n not in wanted]
        local: dict[str, LocalMethod] = {}
        for name in wanted:
            key = "types" if name in opts.types else "realms"
            plugin = plugins.get(name)
            if plugin is None:
                known = ", ".join(sorted(plugins)) or "none"
                raise ValueError(f"{key}: no EAP method {name!r} is installed (installed: {known})")
            if not plugin.derives_msk and not opts.allow_msk_less:
                # PROFILE §4 item 7: nothing binds an MSK-less method to the TLS
                # channel beyond "1"; refused unless the operator allows it.
                raise ValueError(
                    f"{key}: EAP method {name!r} derives no MSK; set allow_msk_less = true "
                    "to allow it (PROFILE §4 item 7)"
                )
            try:
                factory = plugin.server(tables.get(name, {}), ctx)
            except ValueError as exc:
                raise ValueError(_prefixed(name, exc)) from None
            if factory is None:
                raise ValueError(f"{key}: EAP method {name!r} has no server (HAC) side")
            local[name] = LocalMethod(name, plugin.eap_type, factory)
        for name in tables:
            if name not in local:
                raise ValueError(f"{name}: options for an EAP method not listed in types")
        # A per-NAI key keeps its user part's case (PROFILE §4 item 8: user
        # parts are case-sensitive); realms, and the realm of an NAI, are
        # matched case-insensitively.  Lower-casing the whole NAI gave
        # "Bob@corp.example"'s methods to "bob@" and "BOB@" too (found in
        # review).
        self.realms = {(nai_key(k) if "@" in k else k.lower()): v for k, v in opts.realms.items()}
        self.backends: dict[str, EapBackend] = {"local": LocalBackend(list(local.values()))}
        backend_factories = pluginmanager.registry(pm, "mipsec_eap_backends")
        for name, table in opts.backends.items():
            if name == "local":
                raise ValueError("backends.local: the name 'local' is reserved")
            table = dict(table)
            kind = table.pop("backend", None)
            factory = backend_factories.get(kind) if isinstance(kind, str) else None
            if factory is None:
                known = ", ".join(sorted(backend_factories)) or "none"
                raise ValueError(
                    f"backends.{name}.backend: no EAP back end {kind!r} is installed "
                    f"(installed: {known})"
                )
            try:
                self.backends[name] = factory.create(table, ctx)
            except ValueError as exc:
                raise ValueError(_prefixed(f"backends.{name}", exc)) from None
        for i, route in enumerate(opts.routes):
            if route.backend not in self.backends:
                raise ValueError(f"routes[{i}].backend: no back end named {route.backend!r}")
        self.routes = opts.routes
        if not local and not opts.routes:
            raise ValueError("types: no local EAP method and no route to a back end (fail closed)")

    def route(self, identity: str) -> str:
        for r in self.routes:
            if _pattern_matches(r.match, identity, self.identity_policy):
                return r.backend
        return "local"

    def allowed_types(self, identity: str) -> tuple[str, ...]:
        """Local EAP types for this identity (PROFILE §4: the HAC picks, in its order)."""
        if self.realms:
            _user, realm = _split(identity)
            for key in (nai_key(identity), (realm or "").lower(), "*"):
                if key in self.realms:
                    return tuple(self.realms[key])
        return self.types

    def stale(self) -> bool:
        """Any back end built from a file that changed since (core/reload.py)."""
        return any(stale(b) for b in self.backends.values())

    def certificates(self) -> dict[str, datetime]:
        """The certificates the back ends present (core/certexpiry.py)."""
        return merged(certificates(b) for b in self.backends.values())

    async def aclose(self) -> None:
        for b in self.backends.values():
            await b.aclose()


# ------------------------------------------------------------ HAC side


class EapServer:
    """HAC side of one EAP exchange (see the module docstring)."""

    def __init__(self, cfg: EapServerConfig, ctx: ServerMethodContext) -> None:
        self._cfg = cfg
        self._ctx = ctx
        self._req_id = secrets.randbelow(256)  # Identifier of the last EAP Request sent
        self._identity: str | None = None
        self._session: EapBackendSession | None = None
        self._backend_name = "-"
        self._dones: list[tuple[ParsedContent, bool]] = []  # (Done request, verified with "1")
        self._cur_is_done = False
        self._msk: bytes | None = None
        self._success: bytes | None = None

    def __repr__(self) -> str:
        return f"EapServer(mn_id={self._ctx.mn_id!r}, backend={self._backend_name!r})"

    # ---- ServerMethod

    def start(self, init: Message, parsed: ParsedContent) -> ServerStep:
        # PROFILE §4 EAP step 1: mn-id, mn-rand, auth-method: eap; no EAP yet.
        if init.mn_rand is None or init.eap_payload is not None or init.hac_rand is not None:
            return self._fail(BAD_REQUEST, "bad-init")
        msg = Message(auth_method=("eap",), eap_payload=identity_request(self._req_id))
        return ServerStep(Outcome.CONTINUE, msg, ONE)

    def step(self, request: Message, parsed: ParsedContent, is_done: bool) -> ServerStep:
        self._cur_is_done = is_done
        if request.mn_rand is not None or request.hac_rand is not None:
            return self._fail(BAD_REQUEST, "psk-headers-in-eap")  # rands belong to PSK only
        if parsed.auth is None:
            return self._fail(BAD_REQUEST, "auth-missing")
        cb = self._ctx.cb_octets
        with_one = verify_auth(ONE, LABEL_MN, parsed, cb)
        if is_done:
            with_msk = self._msk is not None and verify_auth(self._msk, LABEL_MN, parsed, cb)
            if self._msk is not None and not (with_one or with_msk):
                return self._fail(UNAUTHORIZED, "bad-auth")
            if not self._keep_done(parsed, with_one):
                return self._fail(BAD_REQUEST, "too-many-done")
        elif not with_one:
            return self._fail(UNAUTHORIZED, "bad-auth")
        raw = request.eap_payload
        if raw is None:
            return self._fail(BAD_REQUEST, "eap-payload-missing")
        try:
            pkt = decode_eap(raw, max_len=self._cfg.max_packet)
        except EapError as exc:
            return self._fail(BAD_REQUEST, f"bad-eap:{exc.field}")
        if pkt.code is not EapCode.RESPONSE:
            return self._fail(BAD_REQUEST, "unexpected-eap-code")
        if pkt.identifier != self._req_id:
            return self._fail(BAD_REQUEST, "eap-identifier-mismatch")
        if self._session is None:
            return self._on_identity(pkt.type, pkt.data, raw)
        try:
            result = self._session.receive(raw)
        except Exception as exc:
            return self._backend_error(exc)
        return self._handle(result)

    def resume(self, result: Any) -> ServerStep:
        if isinstance(result, EapBackendStep):
            return self._apply(result)
        if isinstance(result, TimeoutError):
            return self._fail(TIMEOUT, "aaa-timeout")
        if isinstance(result, Overloaded):
            return self._fail(UNAVAILABLE, "saturated", retry_after=True)
        if isinstance(result, BaseException):
            return self._backend_error(result)
        return self._fail(INTERNAL_ERROR, "backend-bad-answer")

    def final(self, status: int) -> FinalShape:
        # A 400 answering an Init this method refused (no mn-rand, PSK
        # headers) comes after the method was selected: keyed with "1" and
        # carrying EAP-Failure like every other non-200 final (PROFILE §4,
        # last paragraph: only a 400 or 501 before any method was selected
        # carries no auth).  It had none before the twenty-ninth session
        # (found in review).
        if status == 200 and self._success is not None:
            return FinalShape(Message(eap_payload=self._success), self._msk or ONE)
        # Item 6: every other final carries EAP-Failure and is keyed with "1"
        # (the HAC replaces a back end's Success whenever it refuses).
        return FinalShape(Message(eap_payload=failure(self._req_id)), ONE)

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            try:
                session.close()
            except Exception:  # noqa: S110 -- cleanup must never break the exchange
                pass

    # ---- internals

    def _keep_done(self, parsed: ParsedContent, with_one: bool) -> bool:
        """Keep what item 5 needs of a Done request; False past the caps.

        A kept Done that verified with "1" and is no longer the newest needs
        nothing more (each must verify with "1" or the key; only the newest
        must verify with the key): it goes.  Of the rest only the MAC's
        input is kept, not the parsed headers."""
        self._dones = [d for d in self._dones if not d[1]]
        slim = ParsedContent(headers=(), raw=b"", msg_octets=parsed.msg_octets, auth=parsed.auth)
        self._dones.append((slim, with_one))
        octets = sum(len(d[0].msg_octets) for d in self._dones)
        return len(self._dones) <= MAX_DONES_KEPT and octets <= MAX_DONE_OCTETS_KEPT

    def _on_identity(self, type_: int | None, data: bytes, raw: bytes) -> ServerStep:
        if type_ != EapType.IDENTITY:
            return self._fail(BAD_REQUEST, "unexpected-eap-type")
        try:
            identity = parse_identity(data)
        except EapError:
            return self._fail(BAD_REQUEST, "bad-eap-identity")
        mn_id = self._ctx.mn_id
        if not nai_match(identity, mn_id, self._cfg.identity_policy):
            return self._fail(UNAUTHORIZED, "identity-mismatch")
        self._identity = identity
        self._backend_name = self._cfg.route(identity)
        backend = self._cfg.backends[self._backend_name]
        ctx = EapSessionContext(
            mn_id=mn_id,
            identity=identity,
            peer=self._ctx.peer,
            allowed_types=self._cfg.allowed_types(identity),
            max_packet=self._cfg.max_packet,
        )
        try:
            self._session = backend.session(ctx)
            result = self._session.start(raw)
        except Exception as exc:
            return self._backend_error(exc)
        return self._handle(result)

    def _handle(self, result: StepOrPending) -> ServerStep:
        if isinstance(result, EapBackendStep):
            return self._apply(result)
        if inspect.isawaitable(result):
            return ServerStep(Outcome.PENDING, pending=Pending(result, self._cfg.timeout))
        return self._fail(INTERNAL_ERROR, "backend-bad-answer")

    def _apply(self, step: EapBackendStep) -> ServerStep:
        verdict = step.verdict
        if verdict is BackendVerdict.CONTINUE:
            try:
                pkt = decode_eap(step.eap, max_len=self._cfg.max_packet)
            except EapError as exc:
                # Cannot be relayed within PROFILE §4 item 9 (or malformed).
                reason = "eap-too-large" if exc.field == "eap.length" else "bad-eap-from-backend"
                return self._fail(UNAUTHORIZED, reason)
            if pkt.code is not EapCode.REQUEST:
                return self._fail(UNAUTHORIZED, "backend-sent-no-request")
            self._req_id = pkt.identifier
            return ServerStep(Outcome.CONTINUE, Message(eap_payload=step.eap), ONE)
        if verdict is BackendVerdict.FAILURE:
            return self._fail(UNAUTHORIZED, step.reason or "eap-failure")
        if verdict is BackendVerdict.UNAVAILABLE:
            status = step.status if step.status in (UNAVAILABLE, TIMEOUT) else UNAVAILABLE
            return self._fail(
                status, step.reason or "backend-unavailable", retry_after=step.retry_after or True
            )
        # SUCCESS
        if step.identity is not None and not nai_match(
            step.identity, self._ctx.mn_id, self._cfg.identity_policy
        ):
            return self._fail(UNAUTHORIZED, "identity-mismatch")
        msk = step.msk
        if msk is not None and len(msk) < MSK_LEN:
            return self._fail(UNAUTHORIZED, "short-msk")
        if msk is None and not self._cfg.allow_msk_less:
            return self._fail(UNAUTHORIZED, "no-msk")
        try:
            ok = decode_eap(step.eap).code is EapCode.SUCCESS
        except EapError:
            ok = False
        if not ok:
            return self._fail(UNAUTHORIZED, "backend-success-without-eap-success")
        key = msk[:MSK_LEN] if msk is not None else ONE
        if self._cur_is_done:
            # Item 5: every Done request verifies with "1" or the key; the one
            # this final answers verifies with the key itself.
            cb = self._ctx.cb_octets
            for i, (parsed, with_one) in enumerate(self._dones):
                with_key = verify_auth(key, LABEL_MN, parsed, cb)
                last = i == len(self._dones) - 1
                if not with_key and (last or not with_one):
                    return self._fail(UNAUTHORIZED, "bad-auth")
        self._msk = key if msk is not None else None
        self._success = step.eap
        # Without Done parameters the exchange answers 400 (+ EAP-Failure).
        return ServerStep(Outcome.SUCCESS, reason=step.reason)

    def _backend_error(self, exc: BaseException) -> ServerStep:
        # A raising back end (plugin) is an outage for the MN: 503 (PROFILE §6),
        # one line in the audit log via the reason -- no traceback, no message
        # (it could quote a secret).
        return self._fail(UNAVAILABLE, f"backend-error:{type(exc).__name__}", retry_after=True)

    def _fail(self, status: int, reason: str, *, retry_after: Any = None) -> ServerStep:
        after: datetime | None = None
        if status == UNAVAILABLE and retry_after is not None:
            after = (
                retry_after
                if isinstance(retry_after, datetime)
                else (datetime.now(UTC) + timedelta(seconds=BACKEND_RETRY_AFTER)).replace(
                    microsecond=0
                )
            )
        return ServerStep(Outcome.FAILURE, status=status, reason=reason, retry_after=after)


class _ServerFactory:
    def __init__(self, cfg: EapServerConfig) -> None:
        self.cfg = cfg

    def new(self, ctx: ServerMethodContext) -> EapServer:
        return EapServer(self.cfg, ctx)

    def stale(self) -> bool:
        return self.cfg.stale()

    def certificates(self) -> dict[str, datetime]:
        return self.cfg.certificates()

    async def aclose(self) -> None:
        await self.cfg.aclose()


# ------------------------------------------------------------ MN side


def _sibling_context(
    ctx: PluginContext, methods: tuple[str, ...], built: Mapping[str, EapPeerFactory]
) -> PluginContext:
    """``ctx`` plus ``extra["eap_methods"]`` (the MN's ``methods``) and
    ``extra["eap_peers"]`` (the peer factories built before, by name).  A
    method learns its siblings there: EAP-AKA checks AT_BIDDING when
    EAP-AKA' is configured too (RFC 5448 §4), and both run on one USIM, whose
    SQN array TS 33.102 Annex C makes one per subscriber."""
    extra = {**ctx.extra, "eap_methods": methods, "eap_peers": MappingProxyType(dict(built))}
    return dataclasses.replace(ctx, extra=extra)


class EapPeerConfig:
    """The MN's EAP configuration, built once at start."""

    def __init__(self, options: Mapping[str, Any], ctx: PluginContext) -> None:
        opts: _PeerOptions = _parse(_PeerOptions, options)
        _, plugins = _eap_plugins(ctx)
        tables = _method_tables(opts, plugins)
        self.max_packet = opts.max_packet
        self.allow_msk_less = opts.allow_msk_less
        self.identity = opts.identity
        self.methods: dict[MethodKey, tuple[str, EapPeerFactory]] = {}
        built: dict[str, EapPeerFactory] = {}
        for name in opts.methods:
            plugin = plugins.get(name)
            if plugin is None:
                names = ", ".join(sorted(plugins)) or "none"
                raise ValueError(
                    f"methods: no EAP method {name!r} is installed (installed: {names})"
                )
            if not plugin.derives_msk and not opts.allow_msk_less:
                raise ValueError(
                    f"methods: EAP method {name!r} derives no MSK; set allow_msk_less = true "
                    "to allow it (PROFILE §4 item 7)"
                )
            try:
                sibling_ctx = _sibling_context(ctx, opts.methods, built)
                factory = plugin.peer(tables.get(name, {}), sibling_ctx)
            except ValueError as exc:
                raise ValueError(_prefixed(name, exc)) from None
            if factory is None:
                raise ValueError(f"methods: EAP method {name!r} has no mobile-node side")
            self.methods[plugin.eap_type] = (name, factory)
            built[name] = factory
        for name in tables:
            if name not in opts.methods:
                raise ValueError(f"{name}: options for an EAP method not listed in methods")

    def stale(self) -> bool:
        """Any method's peer factory built from a file that changed since --
        a renewed EAP-TLS client certificate (core/reload.py)."""
        return any(stale(f) for _, f in self.methods.values())


class EapPeer:
    """MN side of one EAP exchange (see the module docstring)."""

    def __init__(self, cfg: EapPeerConfig, ctx: PeerMethodContext) -> None:
        self._cfg = cfg
        self._ctx = ctx
        self._mn_rand = secrets.token_bytes(RAND_LEN)
        self._first = True
        self._done = False  # the Done parameters have been sent
        identity = cfg.identity or ctx.mn_id
        self.machine = EapPeerMachine(
            identity=identity,
            methods=cfg.methods,
            ctx=EapPeerContext(
                mn_id=ctx.mn_id, extra={"max_packet": cfg.max_packet}, identity=identity
            ),
            max_packet=cfg.max_packet,
        )

    def __repr__(self) -> str:
        return f"EapPeer(mn_id={self._ctx.mn_id!r}, method={self.machine.method_name!r})"

    def init_headers(self) -> Message:
        return Message(mn_rand=self._mn_rand)

    def _key(self) -> bytes | None:
        """The Done/200 key: the MSK once the method allows success; None if refused."""
        msk = self.machine.msk()
        if msk is not None and len(msk) >= MSK_LEN:
            return msk[:MSK_LEN]
        return ONE if self._cfg.allow_msk_less else None

    def on_response(self, response: Message, parsed: ParsedContent) -> PeerStep:
        if not verify_auth(ONE, LABEL_HAC, parsed, self._ctx.cb_octets):
            return PeerStep(Outcome.FAILURE, reason="HAC auth does not verify (key 1)")
        if self._first and response.auth_method != ("eap",):
            return PeerStep(Outcome.FAILURE, reason="auth-method in the HAC's response is not eap")
        self._first = False
        if response.mn_rand is not None or response.hac_rand is not None:
            return PeerStep(Outcome.FAILURE, reason="PSK rands in an EAP response")
        if response.eap_payload is None:
            return PeerStep(Outcome.FAILURE, reason="eap-payload missing in the HAC's response")
        reply = self.machine.process(response.eap_payload)
        if reply.response is None:
            return PeerStep(Outcome.FAILURE, reason=reply.reason or "EAP request discarded")
        msg = Message(eap_payload=reply.response)
        if not (self._done or self.machine.ready):
            return PeerStep(Outcome.CONTINUE, msg, ONE)
        # From the first Response built with the decision COND_SUCC/UNCOND_SUCC
        # on, every request carries the identical Done parameters (item 4),
        # keyed with the MSK -- even if a later notification changes the
        # method's mind (the HAC then answers with the failure).
        self._done = True
        key = self._key()
        if key is None:
            return PeerStep(Outcome.FAILURE, reason="the EAP method derived no MSK")
        return PeerStep(Outcome.CONTINUE, msg, key, ready_for_done=True)

    def final_key(self, response: Message) -> bytes | None:
        if response.status_code == 200:
            return self._key() if self.machine.succeeded else ONE
        return ONE

    def check_final(self, response: Message) -> str | None:
        payload = response.eap_payload
        if response.status_code == 200:
            if payload is None:
                return "a 200 without EAP-Success"
            try:
                code = decode_eap(payload).code
            except EapError as exc:
                return f"malformed EAP in the final response: {exc}"
            if code is not EapCode.SUCCESS:
                return "a 200 without EAP-Success"
            if not self.machine.succeeded:
                # RFC 4137 §4.1: never believe a Success the method did not allow.
                return "EAP-Success before the EAP method finished"
            return None
        if payload is not None:
            try:
                if decode_eap(payload).code is not EapCode.FAILURE:
                    return "a non-200 final response without EAP-Failure"
            except EapError as exc:
                return f"malformed EAP in the final response: {exc}"
        return None


class _PeerFactory:
    def __init__(self, cfg: EapPeerConfig) -> None:
        self.cfg = cfg

    def new(self, ctx: PeerMethodContext) -> EapPeer:
        return EapPeer(self.cfg, ctx)

    def stale(self) -> bool:
        return self.cfg.stale()


class EapMethod:
    """The ``eap`` AuthMethod (registered by ``plugins/eap_auth.py``)."""

    name = "eap"

    def server(self, options: Mapping[str, Any], ctx: PluginContext) -> _ServerFactory:
        return _ServerFactory(EapServerConfig(options, ctx))

    def peer(self, options: Mapping[str, Any], ctx: PluginContext) -> _PeerFactory:
        return _PeerFactory(EapPeerConfig(options, ctx))
