"""Test helpers for EAP-TLS: a small PKI on disk and an in-memory EAP driver.

The driver moves real EAP packets (encoded and decoded with core/wire/eap.py)
between an EAP-TLS server machine and a peer machine, playing the part of
the MHAuth framework: it owns the Identifier and the EAP header.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mipsec.core.eap.eaptls import EapTlsPeer, EapTlsServer
from mipsec.core.eap.method import EapPeerContext, EapServerContext, PeerOutput, ServerOutput
from mipsec.core.hookspecs import PluginContext
from mipsec.core.pki import make_ca, make_leaf, write_cert, write_key
from mipsec.core.wire.eap import EapCode, EapPacket, EapType, decode_eap, encode_eap
from mipsec.plugins.eap_tls import EapTlsMethod

MN_ID = "mn1@example.net"
SERVER_NAME = "eap.example.net"


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)


def make_pki(directory: Path) -> Pki:
    """ca.pem (the lab CA), eap.pem/key (EAP server), mn.pem/key (MN, SAN email = MN_ID),
    plus: other-ca.pem with mn-other.pem/key and eap-other.pem/key (unknown CA),
    mn-expired.pem/key, mn-wrongid.pem/key, eap-wrongname.pem/key, and the wrong
    extended key usage: mn-serveronly.pem/key, eap-clientonly.pem/key."""
    ca_key, ca = make_ca("EAP lab CA")
    other_key, other = make_ca("someone else's CA")
    now = datetime.datetime.now(datetime.UTC)

    def leaf(name: str, issuer: tuple[Any, Any], **kw: Any) -> None:
        key, cert = make_leaf(issuer[0], issuer[1], common_name=name, **kw)
        write_cert(directory / f"{name}.pem", cert)
        write_key(directory / f"{name}.key", key)

    write_cert(directory / "ca.pem", ca)
    write_cert(directory / "other-ca.pem", other)
    mn = {"client": True, "server": False}
    leaf("eap", (ca_key, ca), dns_names=[SERVER_NAME])
    leaf("eap-wrongname", (ca_key, ca), dns_names=["elsewhere.example.net"])
    leaf("eap-other", (other_key, other), dns_names=[SERVER_NAME])
    leaf("mn", (ca_key, ca), email_addresses=["mn1@Example.NET"], **mn)
    leaf("mn-wrongid", (ca_key, ca), email_addresses=["mn2@example.net"], **mn)
    leaf("mn-other", (other_key, other), email_addresses=[MN_ID], **mn)
    past = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
    leaf("mn-expired", (ca_key, ca), email_addresses=[MN_ID], validity=past, **mn)
    # Wrong extended key usage: a server-only MN cert, a client-only EAP server cert.
    leaf("mn-serveronly", (ca_key, ca), email_addresses=[MN_ID])
    leaf("eap-clientonly", (ca_key, ca), dns_names=[SERVER_NAME], client=True, server=False)
    return Pki(directory)


def server_options(pki: Pki, **over: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"cert": "eap.pem", "key": "eap.key", "ca": "ca.pem"}
    opts.update(over)
    return opts


def peer_options(pki: Pki, **over: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "cert": "mn.pem",
        "key": "mn.key",
        "ca": "ca.pem",
        "server_name": SERVER_NAME,
    }
    opts.update(over)
    return opts


def machines(
    pki: Pki,
    *,
    server: dict[str, Any] | None = None,
    peer: dict[str, Any] | None = None,
    mn_id: str = MN_ID,
    pm: Any = None,
) -> tuple[EapTlsServer, EapTlsPeer]:
    method = EapTlsMethod()
    extra = {"pm": pm} if pm is not None else {}
    sf = method.server(
        server_options(pki, **(server or {})), PluginContext("hac", pki.dir, extra=extra)
    )
    pf = method.peer(peer_options(pki, **(peer or {})), PluginContext("mn", pki.dir))
    return (
        sf.new(EapServerContext(mn_id=mn_id, identity=mn_id, peer="test")),
        pf.new(EapPeerContext(mn_id=mn_id)),
    )


@dataclass
class Step:
    """One round trip: the Request the server built and what both sides made of it."""

    request: bytes  # whole EAP packet
    peer: PeerOutput
    peer_msk: bytes | None  # peer.msk() right after it answered
    response: bytes | None  # whole EAP packet, None if the peer ignored the Request
    server: ServerOutput | None
    server_msk: bytes | None


@dataclass
class Run:
    steps: list[Step] = field(default_factory=list)

    @property
    def last(self) -> Step:
        return self.steps[-1]

    @property
    def final(self) -> ServerOutput | None:
        return self.last.server

    def packet_sizes(self) -> list[int]:
        sizes = [len(s.request) for s in self.steps]
        sizes += [len(s.response) for s in self.steps if s.response is not None]
        return sizes


Tamper = Callable[[int, bytes], bytes]


def drive(
    server: EapTlsServer,
    peer: EapTlsPeer,
    *,
    first_identifier: int = 7,
    max_rounds: int = 5000,
    tamper_request: Tamper | None = None,
    tamper_response: Tamper | None = None,
) -> Run:
    """Run the conversation until the server decides or the peer goes silent.

    ``tamper_*(round, type_data) -> type_data`` rewrite a message on the way.
    """
    run = Run()
    identifier = first_identifier
    type_data = server.initiate()
    for n in range(max_rounds):
        if tamper_request is not None:
            type_data = tamper_request(n, type_data)
        raw = encode_eap(EapPacket(EapCode.REQUEST, identifier, EapType.TLS, type_data))
        request = decode_eap(raw)
        assert request.identifier == identifier
        out = peer.process(request)
        step = Step(raw, out, peer.msk(), None, None, None)
        run.steps.append(step)
        if out.data is None:
            return run
        answer = out.data if tamper_response is None else tamper_response(n, out.data)
        step.response = encode_eap(EapPacket(EapCode.RESPONSE, identifier, EapType.TLS, answer))
        step.server = server.process(decode_eap(step.response))
        step.server_msk = server.msk()
        if step.server.done:
            return run
        assert step.server.data is not None
        type_data = step.server.data
        identifier = (identifier + 1) & 0xFF  # RFC 3748 §4.1: a new Request, a new Identifier
    raise AssertionError("the conversation did not end")
