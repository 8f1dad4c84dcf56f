"""The local EAP back end's Identifier sequence (RFC 3748 §4.1).

Regression: the back end once drew its own random starting Identifier, so
about one session in 256 sent its first method Request with the Identity
Request's Identifier and a correct peer refused it ("reuses the previous
Identifier").  It must count on from the Identity Request's Identifier.
"""

from __future__ import annotations

from typing import Any

from mipsec.core.eap.backend import BackendVerdict, EapBackendStep, EapSessionContext
from mipsec.core.eap.local import LocalBackend, LocalMethod
from mipsec.core.eap.method import EapServerContext
from mipsec.core.wire.eap import EapCode, EapPacket, EapType, decode_eap, encode_eap

_MD5 = 4  # any legacy type: the fake method below never looks at it


class _OneRound:
    def initiate(self) -> bytes:
        return b"\x01"

    def process(self, response: EapPacket) -> Any:
        raise AssertionError("not reached")

    def msk(self) -> bytes | None:
        return None


class _Factory:
    def new(self, ctx: EapServerContext) -> _OneRound:
        return _OneRound()


def _ctx() -> EapSessionContext:
    return EapSessionContext(
        mn_id="a@b.test", identity="a@b.test", peer="192.0.2.1:1", allowed_types=("m",)
    )


def test_first_method_request_follows_the_identity_identifier() -> None:
    backend = LocalBackend([LocalMethod("m", _MD5, _Factory())])
    for ident in range(256):
        identity = encode_eap(EapPacket(EapCode.RESPONSE, ident, EapType.IDENTITY, b"a@b.test"))
        step = backend.session(_ctx()).start(identity)
        assert isinstance(step, EapBackendStep)
        assert step.verdict is BackendVerdict.CONTINUE
        req = decode_eap(step.eap)
        assert req.code is EapCode.REQUEST
        assert req.identifier == (ident + 1) & 0xFF


def test_malformed_identity_response_fails_naming_the_field() -> None:
    step = LocalBackend([LocalMethod("m", _MD5, _Factory())]).session(_ctx()).start(b"\x02")
    assert isinstance(step, EapBackendStep)
    assert step.verdict is BackendVerdict.FAILURE
    assert step.reason is not None and step.reason.startswith("malformed-eap:")
