"""EAP methods ``aka`` (EAP-AKA, Type 23) and ``aka-prime`` (EAP-AKA', Type 50): MN side.

Both run on a software USIM (Milenage, TS 35.206) built once at start from
the method's table in the MN's configuration (``[eap.aka]`` /
``[eap.aka-prime]``); relative paths resolve against the configuration
file's directory.  Options:

=====================  =========================================================
``ki`` / ``ki_file``   subscriber key K, 32 hex digits (inline or in a file);
                       exactly one
``opc`` / ``op``       OPc, or OP from which OPc = OP xor E_K(OP) is computed;
(or ``*_file``)        exactly one of the four
``amf``                4 hex digits; when set, an AUTN with another AMF is
                       rejected (aka-prime: the separation bit 8000 must be set)
``sqn``                initial SQN_MS (12 hex digits, default 000000000000),
                       used only when ``sqn_file`` does not exist yet
``sqn_file``           the USIM's persisted SQN state (required; mode 0600);
                       with both methods configured, the same file in both
``ind_bits``           IND length of TS 33.102 Annex C (default 5: 32 slots)
``sqn_delta``          Annex C.3.1 Delta: the furthest jump ahead accepted
                       (default 2^28)
``sqn_age_limit``      Annex C.3.3 L: how far behind the highest SEQ a fresh
                       slot may be (default: no limit)
``result_ind``         answer the server's AT_RESULT_IND (default false)
``network_name``       aka-prime only: the access network name expected in
                       AT_KDF_INPUT (RFC 5448 §3.1 prefix match; unset = no
                       check); a mismatch fails as AKA'-Authentication-Reject
``aka_prime_supported`` aka only: this MN would rather use EAP-AKA', so an
                       AT_BIDDING with the D bit fails (RFC 5448 §4); default:
                       whether ``aka-prime`` is in the MN's ``methods``, and
                       ``false`` with ``aka-prime`` there is refused
=====================  =========================================================

An MN that configures both methods has one subscriber (one EAP identity)
and so one USIM, with one SQN array (TS 33.102 Annex C): both tables must
give the same K, OPc, ``sqn_file`` and SQN options, and the method built
second shares the first one's SQN store (:class:`Subscriber`).

The EAP identity -- and so the MK identity of RFC 4187 §7 -- is the MN's
``mn-id`` (``0<IMSI>@wlan.mnc<MNC>.mcc<MCC>.3gppnetwork.org`` for EAP-AKA,
``6<IMSI>@...`` for EAP-AKA').  No server role: the HAC reaches EAP-AKA
servers through RADIUS.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mipsec.core.eap.method import EapMethodPlugin, EapPeerContext
from mipsec.core.filedigest import read_regular
from mipsec.core.hookspecs import PluginContext, hookimpl
from mipsec.core.secretfiles import check_private_option
from mipsec.core.wire.eap import EapType, MethodKey
from mipsec.plugins._options import parse_options, resolve_path

if TYPE_CHECKING:
    from mipsec.core.eap.aka_peer import AkaPeer, AkaPeerConfig
    from mipsec.core.eap.usim import SqnStore, Usim

__all__ = ["AKA", "AKA_PRIME", "AkaMethod", "AkaPeerFactory", "Subscriber", "mipsec_eap_methods"]

_HEX = re.compile(r"[0-9a-fA-F]+")


def _hex_of(n: int) -> Any:
    def check(v: str | None) -> str | None:
        if v is not None and (len(v) != 2 * n or not _HEX.fullmatch(v)):
            raise ValueError(f"must be {2 * n} hexadecimal digits")
        return v

    return check


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ki: str | None = Field(default=None, repr=False)
    ki_file: str | None = None
    opc: str | None = Field(default=None, repr=False)
    op: str | None = Field(default=None, repr=False)
    opc_file: str | None = None
    op_file: str | None = None
    amf: str | None = None
    sqn: str = "000000000000"
    sqn_file: Annotated[str, Field(min_length=1)]
    ind_bits: Annotated[int, Field(ge=0, le=10)] = 5
    sqn_delta: Annotated[int, Field(ge=1, lt=1 << 48)] = 1 << 28
    sqn_age_limit: Annotated[int | None, Field(ge=0, lt=1 << 48)] = None
    result_ind: bool = False

    _k = field_validator("ki", "opc", "op")(_hex_of(16))
    _a = field_validator("amf")(_hex_of(2))
    _s = field_validator("sqn")(_hex_of(6))

    @model_validator(mode="after")
    def _exactly_one(self) -> _Options:
        if (self.ki is None) == (self.ki_file is None):
            raise ValueError("exactly one of ki and ki_file is required")
        given = [k for k in ("opc", "op", "opc_file", "op_file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of opc, op, opc_file and op_file is required")
        return self


class _AkaOptions(_Options):
    aka_prime_supported: bool | None = None  # None: derived from the MN's methods


class _AkaPrimeOptions(_Options):
    network_name: Annotated[str | None, Field(min_length=1, max_length=1000)] = None

    @model_validator(mode="after")
    def _separation_bit(self) -> _AkaPrimeOptions:
        if self.amf is not None and not int(self.amf, 16) & 0x8000:
            raise ValueError("amf: EAP-AKA' needs the AMF separation bit (8000) set")
        return self


def _key(inline: str | None, file: str | None, name: str, base: Path) -> bytes:
    if inline is not None:
        return bytes.fromhex(inline)
    assert file is not None
    path = resolve_path(file, base)
    check_private_option(path, f"{name}_file")  # K, OP, OPc: the subscriber's secrets
    try:
        text = read_regular(path, 4096).decode("ascii").strip()  # a FIFO: refused
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not ASCII"
        raise ValueError(f"{name}_file: cannot read {path}: {reason}") from None
    if len(text) != 32 or not _HEX.fullmatch(text):
        raise ValueError(f"{name}_file: {path} must hold 32 hexadecimal digits")
    return bytes.fromhex(text)


@dataclass(frozen=True)
class Subscriber:
    """The USIM behind an MN's ``aka`` and ``aka-prime`` tables.

    Both methods run for the one EAP identity of the MN, so for one
    subscriber, and TS 33.102 Annex C gives a USIM one SQN array: the method
    built second reuses this :class:`SqnStore` (and must name the same K,
    OPc, ``sqn_file`` and SQN options).  Two arrays let an AUTN accepted by
    one method be accepted again by the other (found in review).
    """

    method: str  # the method whose table built it
    k: bytes = field(repr=False)
    opc: bytes = field(repr=False)
    k_key: str  # the option that gave K (``ki`` or ``ki_file``), for errors
    opc_key: str  # likewise for OPc
    sqn_options: tuple[tuple[str, Any], ...]  # (key, value) of the SQN options
    store: SqnStore


class AkaPeerFactory:
    """Built once per MN process: the USIM (and its SQN state) outlives exchanges."""

    def __init__(self, usim: Usim, config: AkaPeerConfig, subscriber: Subscriber) -> None:
        self._usim = usim
        self._config = config
        self.subscriber = subscriber

    def __repr__(self) -> str:
        return f"AkaPeerFactory({self._usim!r}, {self._config!r})"

    def new(self, ctx: EapPeerContext) -> AkaPeer:
        from mipsec.core.eap.aka_peer import AkaPeer

        # The identity of EAP-Response/Identity: the master key is bound to
        # it (RFC 4187 §7), and it may differ from mn_id in realm case.
        return AkaPeer(self._usim, ctx.eap_identity, self._config)


def _sqn_options(opts: _Options, sqn_path: Path) -> tuple[tuple[str, Any], ...]:
    return (
        ("sqn_file", sqn_path.resolve()),  # one file, however it is spelt
        ("sqn", int(opts.sqn, 16)),
        ("ind_bits", opts.ind_bits),
        ("sqn_delta", opts.sqn_delta),
        ("sqn_age_limit", opts.sqn_age_limit),
    )


def _given(opts: _Options, *keys: str) -> str:
    return next(k for k in keys if getattr(opts, k) is not None)


def _sibling(ctx: PluginContext) -> Subscriber | None:
    """The subscriber of the AKA method this MN built before this one, if any."""
    for factory in ctx.extra.get("eap_peers", {}).values():
        if isinstance(factory, AkaPeerFactory):
            return factory.subscriber
    return None


def _same_subscriber(mine: Subscriber, other: Subscriber) -> None:
    """One EAP identity, one subscriber: K, OPc and the SQN state must agree."""
    why = (
        f"{other.method} and {mine.method} authenticate the one EAP identity of this MN, "
        "one subscriber whose USIM has one K, one OPc and one SQN array "
        "(TS 33.102 Annex C): give both the same"
    )
    if not hmac.compare_digest(mine.k, other.k):
        raise ValueError(f"{mine.k_key}: not the K of {other.method}.{other.k_key}: {why}")
    if not hmac.compare_digest(mine.opc, other.opc):
        raise ValueError(f"{mine.opc_key}: not the OPc of {other.method}.{other.opc_key}: {why}")
    for (key, value), (_, theirs) in zip(mine.sqn_options, other.sqn_options, strict=True):
        if value != theirs:
            shown = f" {value} is not {theirs}" if key == "sqn_file" else ""
            raise ValueError(f"{key}: differs from {other.method}.{key}{shown}: {why}")


def _aka_prime_supported(opts: _Options, ctx: PluginContext) -> bool:
    """RFC 5448 §4: a peer that supports EAP-AKA' checks AT_BIDDING in
    EAP-AKA.  An MN supports it when ``aka-prime`` is among its methods; it
    cannot then opt out, which would leave bidding down undetected (the
    option defaulted to false, whatever the methods, before the
    twenty-ninth session; found in review)."""
    configured = AKA_PRIME.name in ctx.extra.get("eap_methods", ())
    explicit = getattr(opts, "aka_prime_supported", None)
    if explicit is False and configured:
        raise ValueError(
            f"aka_prime_supported: false, but {AKA_PRIME.name} is in methods: an MN that "
            "supports EAP-AKA' must refuse an EAP-AKA challenge whose AT_BIDDING has the "
            "D bit (RFC 5448 §4): remove the option"
        )
    return configured if explicit is None else explicit


class AkaMethod:
    """The ``mipsec_eap_methods`` entry for EAP-AKA or EAP-AKA' (peer role only)."""

    def __init__(self, name: str, eap_type: EapType, *, prime: bool) -> None:
        self.name = name
        self.eap_type: MethodKey = eap_type
        self.prime = prime
        self.derives_msk = True  # RFC 4187 §7 / RFC 5448 §3.3: MSK and EMSK

    def __repr__(self) -> str:
        return f"AkaMethod({self.name!r}, eap_type={self.eap_type!r})"

    def peer(self, options: Mapping[str, Any], ctx: PluginContext) -> AkaPeerFactory:
        # The peer's machinery only where a peer is built (an MN): a HAC,
        # which loads every plugin module, does not import it (start time).
        from mipsec.core.eap.aka_peer import AkaPeerConfig
        from mipsec.core.eap.milenage import Milenage
        from mipsec.core.eap.usim import Usim

        opts: _Options = parse_options(_AkaPrimeOptions if self.prime else _AkaOptions, options)
        subscriber = self._subscriber(opts, ctx)
        amf = bytes.fromhex(opts.amf) if opts.amf is not None else None
        usim = Usim(Milenage(subscriber.k, subscriber.opc), subscriber.store, amf)
        config = AkaPeerConfig(
            prime=self.prime,
            network_name=getattr(opts, "network_name", None),
            result_ind=opts.result_ind,
            aka_prime_supported=not self.prime and _aka_prime_supported(opts, ctx),
        )
        return AkaPeerFactory(usim, config, subscriber)

    def _subscriber(self, opts: _Options, ctx: PluginContext) -> Subscriber:
        """K, OPc and the SQN store: the sibling method's store when it has one."""
        from mipsec.core.eap.milenage import opc_from_op
        from mipsec.core.eap.usim import SqnPolicy, SqnStore, UsimStateError

        k = _key(opts.ki, opts.ki_file, "ki", ctx.base_dir)
        if opts.op is not None or opts.op_file is not None:
            opc = opc_from_op(k, _key(opts.op, opts.op_file, "op", ctx.base_dir))
        else:
            opc = _key(opts.opc, opts.opc_file, "opc", ctx.base_dir)
        sqn_path = resolve_path(opts.sqn_file, ctx.base_dir)
        k_key = _given(opts, "ki", "ki_file")
        opc_key = _given(opts, "opc", "op", "opc_file", "op_file")
        options = _sqn_options(opts, sqn_path)
        other = _sibling(ctx)
        if other is not None:
            mine = Subscriber(self.name, k, opc, k_key, opc_key, options, other.store)
            _same_subscriber(mine, other)
            return mine
        policy = SqnPolicy(opts.ind_bits, opts.sqn_delta, opts.sqn_age_limit)
        try:
            # check-config (``check_only``) creates nothing: a start would.
            create = not ctx.extra.get("check_only", False)
            store = SqnStore(sqn_path, int(opts.sqn, 16), policy, create=create)
        except UsimStateError as exc:
            raise ValueError(f"sqn_file: {exc}") from None
        return Subscriber(self.name, k, opc, k_key, opc_key, options, store)

    def server(self, options: Mapping[str, Any], ctx: PluginContext) -> None:
        return None  # EAP-AKA servers are reached through RADIUS (hostapd, ...)


AKA = AkaMethod("aka", EapType.AKA, prime=False)
AKA_PRIME = AkaMethod("aka-prime", EapType.AKA_PRIME, prime=True)


@hookimpl
def mipsec_eap_methods() -> list[AkaMethod]:
    return [AKA, AKA_PRIME]


if TYPE_CHECKING:  # both objects satisfy the method-plugin protocol
    _aka: EapMethodPlugin = AKA
    _aka_prime: EapMethodPlugin = AKA_PRIME
