"""HAC <-> HA provisioning messages (PROFILE §9), sans-I/O.

PROFILE §9 leaves the HAC -> HA channel to this project: the built-in network
transport reuses the MHAuth framing of PROFILE §2-3 -- one container per
message, TV-header content -- over mutually authenticated TLS (HAC = client,
HA = server for install/withdraw; HA = client, HAC = server for pull).

Framing.  A connection carries any number of lockstep request/response pairs:
requests carry Identifier 1, 2, 3, ... exactly as in PROFILE §2, each response
echoes its request's Identifier, and the client opens a new connection after
the 255th exchange (the Identifier is one octet).  A client may just as well
send one request per connection.

Operations (header ``prov-op``; unknown names are allowed by PROFILE §3):

=========  ==================================================  ===========================
op         request headers                                     200 response
=========  ==================================================  ===========================
install    ``mn-id``, SA + bootstrap headers exactly as in the  ``status-code: 200``,
           MN's 200 (:func:`mipsec.core.issuer.sa_headers`),   ``prov-withdrawn`` (echo
           ``ha-id`` (the HA the HAC chose), optionally         of ``prov-withdraw``, once
           ``prov-withdraw`` (SPIs the new SA supersedes)       all are withdrawn)
withdraw   ``mip6-spi``                                         ``status-code: 200``
pull       ``mip6-spi``, ``ha-id`` (the asking HA)              ``status-code: 200`` + the
                                                                install headers
=========  ==================================================  ===========================

``prov-withdraw`` (1 to 16 decimal SPIs separated by single spaces) asks the HA
to withdraw those SPIs in the same step as it installs the new SA -- the older
SAs the new one supersedes (issue 6 item 3: withdrawn once the new SA is
confirmed).  It saves the HAC a withdraw round trip per re-bootstrap.  The HA
confirms with ``prov-withdrawn`` carrying the same list; a 200 without it
(e.g. an HA that ignores the unknown header, PROFILE §3) confirms the install
only, and the HAC then withdraws those SPIs with ``withdraw`` as before.

Failures: ``400`` malformed request (then the server closes) or an operation
the server does not serve, ``500`` internal failure of the server; a pull of
an SPI the HAC will not hand out is ``400`` with ``prov-reason: unknown-spi``.
Status codes stay within PROFILE §6's set.

No ``auth`` header: the TLS channel already gives integrity, confidentiality
and mutual authentication of HAC and HA (RFC 6618 §4.2 asks exactly that of
the HAC-HA channel), and there is no per-MN key to bind a MAC to.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from mipsec.core.confvalues import HA_ID_MAX, ha_id_problem
from mipsec.core.errors import HeaderError, LocalProtocolError, RemoteProtocolError
from mipsec.core.issuer import sa_from_message, sa_headers
from mipsec.core.model import IssuedSA
from mipsec.core.wire.message import Message, decode_message, encode_message
from mipsec.core.wire.tvheader import ParsedContent, encode_content, parse_content
from mipsec.core.wire.values import format_spi, format_status, parse_spi, parse_status

__all__ = [
    "BAD_REQUEST",
    "HA_ID_HEADER",
    "HA_ID_MAX",
    "INTERNAL_ERROR",
    "MAX_PIGGYBACK",
    "OK",
    "PROV_OP_HEADER",
    "PROV_REASON_HEADER",
    "PROV_WITHDRAWN_HEADER",
    "PROV_WITHDRAW_HEADER",
    "REASON_INTERNAL",
    "REASON_MALFORMED",
    "REASON_REFUSED",
    "REASON_UNKNOWN_SPI",
    "REASON_UNSUPPORTED_OP",
    "ProvOp",
    "ProvRequest",
    "ProvResponse",
    "ProvisioningFailed",
    "ProvisioningRefused",
    "decode_request",
    "decode_response",
    "encode_install",
    "encode_pull",
    "encode_response",
    "encode_withdraw",
]

PROV_OP_HEADER = "prov-op"
HA_ID_HEADER = "ha-id"
PROV_REASON_HEADER = "prov-reason"
PROV_WITHDRAW_HEADER = "prov-withdraw"
PROV_WITHDRAWN_HEADER = "prov-withdrawn"
MAX_PIGGYBACK = 16  # SPIs one install may withdraw (max_sas_per_mn is small)

OK = 200
BAD_REQUEST = 400
INTERNAL_ERROR = 500

REASON_MALFORMED = "malformed"
REASON_UNSUPPORTED_OP = "unsupported-op"
REASON_UNKNOWN_SPI = "unknown-spi"
REASON_INTERNAL = "internal"
REASON_REFUSED = "refused"

_REASON = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_REASON_MAX = 64


class ProvOp(enum.StrEnum):
    INSTALL = "install"
    WITHDRAW = "withdraw"
    PULL = "pull"


@dataclass(frozen=True, slots=True)
class ProvRequest:
    """A decoded request.  ``issued`` (install) carries keys, which its repr hides."""

    op: ProvOp
    issued: IssuedSA | None = None  # install
    spi: int | None = None  # every op (install: the SA's SPI)
    ha_id: str = ""  # install: chosen HA; pull: asking HA; withdraw: ""
    withdraw: tuple[int, ...] = ()  # install: SPIs the new SA supersedes (prov-withdraw)


@dataclass(frozen=True, slots=True)
class ProvResponse:
    status: int
    issued: IssuedSA | None = None  # a 200 answer to pull
    reason: str | None = None  # prov-reason
    withdrawn: tuple[int, ...] = ()  # a 200 answer to install: prov-withdrawn


class ProvisioningFailed(ConnectionError):
    """The peer did not confirm: it refused, closed, or answered something unusable.

    A ``ConnectionError`` because that is what ``ProvisioningTransport`` promises
    its caller (core/hookspecs.py): the HAC turns it into 504 with nothing left
    provisioned (PROFILE §9).  ``status`` is the peer's status code, if any.
    """

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


class ProvisioningRefused(ValueError):
    """An HA's deliberate refusal of an install or withdrawal, raised before
    it changed anything (an SA for another HA, one already expired, one
    withdrawn earlier).

    The network transport answers it with 400 and ``prov-reason: refused``;
    any other exception of an HA's callback is 500 (``internal``): its outcome
    is unknown.  The HAC tells them apart where it matters: after a refused
    install that carried ``prov-withdraw`` the older SAs are still live on the
    HA, after a 500 they may not be, so the HAC retires them too and withdraws
    them until the HA confirms (fail closed).  A third-party HA callback
    raises this, with the reason in its message, only when nothing happened.
    """


# ------------------------------------------------------------------ helpers


def _format_ha_id(ha_id: str) -> str:
    problem = ha_id_problem(ha_id)  # the rule [ha] id is checked by at start
    if problem is not None:
        raise LocalProtocolError(f"{HA_ID_HEADER}: {problem}")
    return ha_id


def _parse_ha_id(parsed: ParsedContent) -> str:
    value = parsed.get(HA_ID_HEADER)
    if value is None:
        raise HeaderError(HA_ID_HEADER, "missing")
    # parse_content already refused non-printable octets and stripped spaces.
    if not 1 <= len(value) <= HA_ID_MAX:
        raise HeaderError(HA_ID_HEADER, f"length {len(value)} outside 1..{HA_ID_MAX}")
    return value


def _install_headers(issued: IssuedSA) -> list[tuple[str, str]]:
    msg = sa_headers(issued)  # the exact SA + bootstrap headers of the MN's 200
    msg.mn_id = issued.sa.mn_id
    return [*encode_message(msg), (HA_ID_HEADER, _format_ha_id(issued.sa.ha_id))]


def _format_spis(spis: tuple[int, ...], header: str) -> str:
    if not 1 <= len(spis) <= MAX_PIGGYBACK:
        raise LocalProtocolError(f"{header}: {len(spis)} SPIs, 1..{MAX_PIGGYBACK} allowed")
    if len(set(spis)) != len(spis):
        raise LocalProtocolError(f"{header}: an SPI twice")
    return " ".join(format_spi(spi) for spi in spis)


def _parse_spis(value: str, header: str) -> tuple[int, ...]:
    items = value.split(" ")
    if not 1 <= len(items) <= MAX_PIGGYBACK:
        raise HeaderError(header, f"{len(items)} SPIs, 1..{MAX_PIGGYBACK} allowed")
    spis = tuple(parse_spi(item, field=header) for item in items)
    if len(set(spis)) != len(spis):
        raise HeaderError(header, "an SPI twice")
    return spis


def _issued_from(parsed: ParsedContent, msg: Message) -> IssuedSA:
    """Rebuild the SA of an install request or a pull answer, checking every field."""
    if msg.mn_id is None:
        raise HeaderError("mn-id", "missing")
    for name, value in (
        ("mip6-spi", msg.mip6_spi),
        ("mip6-ciphersuite", msg.ciphersuite),
        ("mip6-sas", msg.mip6_sas),
        ("mip6-sa-validity-end", msg.sa_validity_end),
        ("mip6-mn-to-ha-ikey", msg.mn_to_ha_ikey),
        ("mip6-ha-to-mn-ikey", msg.ha_to_mn_ikey),
    ):
        if value is None:
            raise HeaderError(name, "missing")
    ha_id = _parse_ha_id(parsed)
    try:
        # Same suite and key-length checks as the MN applies to its 200.
        return sa_from_message(msg, msg.mn_id, ha_id)
    except RemoteProtocolError as exc:
        field, _, why = exc.reason.partition(": ")
        raise HeaderError(field, why or exc.reason) from None


# ------------------------------------------------------------------ requests


def encode_install(issued: IssuedSA, withdraw: tuple[int, ...] = ()) -> bytes:
    """Content of an install request; ``issued.sa.ha_id`` names the chosen HA,
    ``withdraw`` the SPIs the new SA supersedes on that HA (``prov-withdraw``)."""
    headers = [(PROV_OP_HEADER, ProvOp.INSTALL.value), *_install_headers(issued)]
    if withdraw:
        if issued.sa.spi in withdraw:
            raise LocalProtocolError(f"{PROV_WITHDRAW_HEADER}: names the SPI being installed")
        headers.append((PROV_WITHDRAW_HEADER, _format_spis(withdraw, PROV_WITHDRAW_HEADER)))
    return encode_content(headers)


def encode_withdraw(spi: int) -> bytes:
    return encode_content([(PROV_OP_HEADER, ProvOp.WITHDRAW.value), ("mip6-spi", format_spi(spi))])


def encode_pull(spi: int, ha_id: str) -> bytes:
    return encode_content(
        [
            (PROV_OP_HEADER, ProvOp.PULL.value),
            ("mip6-spi", format_spi(spi)),
            (HA_ID_HEADER, _format_ha_id(ha_id)),
        ]
    )


def decode_request(content: bytes) -> ProvRequest:
    """Parse one request content.  Raises ``HeaderError`` naming the field."""
    parsed = parse_content(content)
    op_text = parsed.get(PROV_OP_HEADER)
    if op_text is None:
        raise HeaderError(PROV_OP_HEADER, "missing")
    try:
        op = ProvOp(op_text.lower())
    except ValueError:
        raise HeaderError(PROV_OP_HEADER, "unknown operation") from None
    msg = decode_message(parsed)  # every known header through its value codec
    if op is ProvOp.INSTALL:
        issued = _issued_from(parsed, msg)
        value = parsed.get(PROV_WITHDRAW_HEADER)
        withdraw = () if value is None else _parse_spis(value, PROV_WITHDRAW_HEADER)
        if issued.sa.spi in withdraw:
            raise HeaderError(PROV_WITHDRAW_HEADER, "names the SPI being installed")
        return ProvRequest(
            op, issued=issued, spi=issued.sa.spi, ha_id=issued.sa.ha_id, withdraw=withdraw
        )
    if msg.mip6_spi is None:
        raise HeaderError("mip6-spi", "missing")
    if op is ProvOp.WITHDRAW:
        return ProvRequest(op, spi=msg.mip6_spi)
    return ProvRequest(op, spi=msg.mip6_spi, ha_id=_parse_ha_id(parsed))


# ----------------------------------------------------------------- responses


def encode_response(
    status: int,
    issued: IssuedSA | None = None,
    reason: str | None = None,
    withdrawn: tuple[int, ...] = (),
) -> bytes:
    """``status-code`` first, then ``prov-reason``, then (pull, 200) the SA,
    or (install, 200) ``prov-withdrawn``."""
    headers = [("status-code", format_status(status))]
    if reason is not None:
        if not (len(reason) <= _REASON_MAX and _REASON.fullmatch(reason)):
            raise LocalProtocolError(f"{PROV_REASON_HEADER}: not a lower-case token")
        headers.append((PROV_REASON_HEADER, reason))
    if withdrawn:
        if status != OK:
            raise LocalProtocolError(f"{PROV_WITHDRAWN_HEADER} only in a 200 response")
        headers.append((PROV_WITHDRAWN_HEADER, _format_spis(withdrawn, PROV_WITHDRAWN_HEADER)))
    if issued is not None:
        if status != OK:
            raise LocalProtocolError("SA data only in a 200 response")
        headers += _install_headers(issued)
    return encode_content(headers)


def decode_response(content: bytes) -> ProvResponse:
    """Parse one response content.  Raises ``HeaderError`` naming the field."""
    parsed = parse_content(content)
    value = parsed.get("status-code")
    if value is None:
        raise HeaderError("status-code", "missing")
    status = parse_status(value)
    reason = parsed.get(PROV_REASON_HEADER)
    if reason is not None:
        reason = reason.lower()
        if not (len(reason) <= _REASON_MAX and _REASON.fullmatch(reason)):
            raise HeaderError(PROV_REASON_HEADER, "not a token")
    issued: IssuedSA | None = None
    if "mip6-spi" in parsed:
        if status != OK:
            raise HeaderError("mip6-spi", f"SA data in a {status} response")
        issued = _issued_from(parsed, decode_message(parsed))
    withdrawn: tuple[int, ...] = ()
    value = parsed.get(PROV_WITHDRAWN_HEADER)
    if value is not None:
        if status != OK:
            raise HeaderError(PROV_WITHDRAWN_HEADER, f"in a {status} response")
        withdrawn = _parse_spis(value, PROV_WITHDRAWN_HEADER)
    return ProvResponse(status, issued, reason, withdrawn)
