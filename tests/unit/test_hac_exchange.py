"""HacExchange rules beyond the PSK happy path (PROFILE §2, §4; issue 6 items 3-5).

A small test-only method (``Rounds``) stands in for a multi-round method such
as EAP: it continues for a set number of Mid/Done rounds, may wait for I/O
(PENDING), and shapes its final responses the EAP way (key ``1`` unless 200).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any

import pytest

from mipsec.core.authmethod import (
    FinalShape,
    Outcome,
    PeerMethodContext,
    Pending,
    ServerMethodContext,
    ServerStep,
)
from mipsec.core.errors import HeaderError, LocalProtocolError
from mipsec.core.hac_exchange import AwaitMethod, HacExchange, HacPolicy, IssueSA, Send
from mipsec.core.hookspecs import PluginContext
from mipsec.core.mn_exchange import Finished, MnExchange
from mipsec.core.suites import Suite
from mipsec.core.wire.container import encode_container
from mipsec.core.wire.message import Message, decode_message
from mipsec.core.wire.tvheader import LABEL_HAC, parse_content, verify_auth
from mipsec.core.wire.values import parse_nai
from mipsec.plugins.psk_auth import PskMethod

CB = hashlib.sha256(b"cert").digest()
ONE = b"1"
MN_ID = "alice@home.example"
PSK = secrets.token_bytes(32)
CTX = PluginContext("test", Path("."))


class Rounds:
    """Continues ``rounds`` times after Init, then succeeds (on a Done request)."""

    def __init__(self, rounds: int, *, pending: bool = False, raise_in: str = "") -> None:
        self.rounds = rounds
        self.pending = pending
        self.raise_in = raise_in
        self.seen = 0
        self.closed = False

    def new(self, ctx: ServerMethodContext) -> Rounds:
        return self

    def start(self, init: Message, parsed: Any) -> ServerStep:
        if self.raise_in == "start":
            raise RuntimeError("plugin bug")
        return ServerStep(Outcome.CONTINUE, Message(auth_method=("x",)), ONE)

    def step(self, request: Message, parsed: Any, is_done: bool) -> ServerStep:
        if self.raise_in == "step":
            raise RuntimeError("plugin bug")
        self.seen += 1
        if self.pending:
            return ServerStep(Outcome.PENDING, pending=Pending(_never()))
        return self._next()

    def _next(self) -> ServerStep:
        if self.seen >= self.rounds:
            return ServerStep(Outcome.SUCCESS)
        return ServerStep(Outcome.CONTINUE, Message(), ONE)

    def resume(self, result: Any) -> ServerStep:
        if isinstance(result, Exception):
            return ServerStep(Outcome.FAILURE, status=504, reason="aaa-timeout")
        return self._next()

    def final(self, status: int) -> FinalShape:
        return FinalShape(Message(), b"MSK" if status == 200 else ONE)

    def close(self) -> None:
        self.closed = True


async def _never() -> None:  # pragma: no cover -- closed, never awaited
    pass


def hac(methods: dict[str, Any], policy: HacPolicy | None = None) -> HacExchange:
    return HacExchange(
        cb_octets=CB,
        methods=methods,
        credentials=None,
        standin_key=secrets.token_bytes(32),
        policy=policy or HacPolicy(method_order=("x",), realm_methods={"*": ("x",)},
                                   allowed_suites=tuple(Suite)),
    )  # fmt: skip


def req(identifier: int, body: bytes) -> bytes:
    return encode_container(identifier, body + b"\r\n")


INIT = b"mn-id: alice@home.example\r\nmn-rand: " + b"00" * 32 + b"\r\nauth-method: x\r\n"
MID = b"x-data: 1\r\n"
DONE = b"mip6-sas: 1\r\nmip6-suitelist: {00,3C}\r\n"


def final_of(events: list[Any]) -> Send:
    assert len(events) == 1 and isinstance(events[0], Send) and events[0].close
    return events[0]


def status_key_ok(ev: Send, key: bytes) -> tuple[int | None, bool]:
    parsed = parse_content(ev.data[4:])
    return decode_message(parsed).status_code, verify_auth(key, LABEL_HAC, parsed, CB)


def test_done_parameters_are_remembered_and_must_not_change() -> None:
    m = Rounds(3)
    h = hac({"x": m})
    assert isinstance(h.receive_data(req(1, INIT))[0], Send)
    assert not h.receive_data(req(2, DONE))[0].close  # type: ignore[union-attr]
    changed = DONE.replace(b"{00,3C}", b"{00,2F}")
    ev = final_of(h.receive_data(req(3, changed)))
    assert status_key_ok(ev, ONE) == (400, True) and h.reason == "done-changed"
    assert m.closed


def test_a_request_without_done_parameters_after_the_first_done_is_400() -> None:
    h = hac({"x": Rounds(3)})
    h.receive_data(req(1, INIT))
    h.receive_data(req(2, DONE))
    ev = final_of(h.receive_data(req(3, MID)))
    assert status_key_ok(ev, ONE) == (400, True) and h.reason == "done-missing"


def test_identical_done_resend_reaches_success() -> None:
    h = hac({"x": Rounds(2)})
    h.receive_data(req(1, INIT))
    h.receive_data(req(2, DONE))
    ev = h.receive_data(req(3, DONE))[0]
    assert isinstance(ev, IssueSA) and ev.suite is Suite.AES_128_CBC_SHA256


def test_success_without_done_parameters_is_400() -> None:
    h = hac({"x": Rounds(1)})
    h.receive_data(req(1, INIT))
    ev = final_of(h.receive_data(req(2, MID)))
    assert status_key_ok(ev, ONE) == (400, True) and h.reason == "success-without-done"


def test_data_while_an_issue_is_pending_voids_it() -> None:
    h = hac({"x": Rounds(1)})
    h.receive_data(req(1, INIT))
    assert isinstance(h.receive_data(req(2, DONE))[0], IssueSA)
    assert h.waiting == "issue"
    ev = final_of(h.receive_data(req(3, MID)))
    assert status_key_ok(ev, ONE) == (400, True)  # keyed: a method was selected
    assert h.waiting is None and h.reason == "data-while-pending"
    with pytest.raises(LocalProtocolError):
        h.complete(object())  # type: ignore[arg-type]  # no 200 can follow the 400


def test_data_in_the_same_read_behind_a_done_voids_the_issue() -> None:
    """The Done and another request (or the start of one) arrive in one read:
    the lockstep is broken as when the second comes later -- 400, no SA is
    issued (no IssueSA event), no 200 can follow.  Before, what came behind
    the Done was dropped without a word (found in review)."""
    for behind in (req(3, MID), req(3, MID)[:7]):
        h = hac({"x": Rounds(1)})
        h.receive_data(req(1, INIT))
        events = h.receive_data(req(2, DONE) + behind)
        assert not any(isinstance(e, IssueSA) for e in events)
        ev = final_of(events)
        assert status_key_ok(ev, ONE) == (400, True)
        assert h.waiting is None and h.reason == "data-while-pending"


def test_data_in_the_same_read_behind_a_pending_method_step_closes_its_awaitable() -> None:
    m = Rounds(2, pending=True)
    h = hac({"x": m})
    h.receive_data(req(1, INIT))
    events = h.receive_data(req(2, MID) + req(3, MID))
    assert not any(isinstance(e, AwaitMethod) for e in events)
    assert status_key_ok(final_of(events), ONE)[0] == 400
    assert h.reason == "data-while-pending"


def test_pending_method_io_and_its_result() -> None:
    m = Rounds(2, pending=True)
    h = hac({"x": m})
    h.receive_data(req(1, INIT))
    ev = h.receive_data(req(2, MID))[0]
    assert isinstance(ev, AwaitMethod) and h.waiting == "method"
    ev.pending.awaitable.close()  # type: ignore[attr-defined]
    nxt = h.method_result(None)[0]
    assert isinstance(nxt, Send) and not nxt.close
    ev = h.receive_data(req(3, DONE))[0]
    assert isinstance(ev, AwaitMethod)
    ev.pending.awaitable.close()  # type: ignore[attr-defined]
    assert isinstance(h.method_result(None)[0], IssueSA)


def test_pending_method_failure_and_data_meanwhile() -> None:
    m = Rounds(2, pending=True)
    h = hac({"x": m})
    h.receive_data(req(1, INIT))
    ev = h.receive_data(req(2, MID))[0]
    assert isinstance(ev, AwaitMethod)
    ev.pending.awaitable.close()  # type: ignore[attr-defined]
    final = final_of(h.method_result(TimeoutError()))
    assert status_key_ok(final, ONE) == (504, True) and h.reason == "aaa-timeout"
    # Data while waiting: 400, and the late result is refused.
    h2 = hac({"x": Rounds(2, pending=True)})
    h2.receive_data(req(1, INIT))
    ev2 = h2.receive_data(req(2, MID))[0]
    assert isinstance(ev2, AwaitMethod)
    ev2.pending.awaitable.close()  # type: ignore[attr-defined]
    assert status_key_ok(final_of(h2.receive_data(req(3, MID))), ONE)[0] == 400
    with pytest.raises(LocalProtocolError):
        h2.method_result(None)


@pytest.mark.parametrize("where", ["start", "step"])
def test_a_raising_method_gives_500(where: str) -> None:
    h = hac({"x": Rounds(2, raise_in=where)})
    events = h.receive_data(req(1, INIT))
    if where == "step":
        events = h.receive_data(req(2, MID))
    ev = final_of(events)
    assert decode_message(parse_content(ev.data[4:])).status_code == 500
    assert h.reason == "method-error:RuntimeError"


def test_the_255th_request_is_never_answered_with_a_non_final_response() -> None:
    h = hac({"x": Rounds(10_000)})
    h.receive_data(req(1, INIT))
    for i in range(2, 255):
        ev = h.receive_data(req(i, MID))[0]
        assert isinstance(ev, Send) and not ev.close
    ev = final_of(h.receive_data(req(255, MID)))
    assert status_key_ok(ev, ONE) == (401, True) and h.reason == "255-exchanges"


def test_method_choice_only_considers_installed_methods() -> None:
    policy = HacPolicy(method_order=("eap", "x"), realm_methods={"*": ("eap", "x")})
    h = hac({"x": Rounds(1)}, policy)  # "eap" allowed by policy, but not installed
    init = INIT.replace(b"auth-method: x", b"auth-method: eap,x")
    ev = h.receive_data(req(1, init))[0]
    assert isinstance(ev, Send) and not ev.close and h.method_name == "x"
    h2 = hac({"x": Rounds(1)}, policy)
    ev2 = final_of(h2.receive_data(req(1, INIT.replace(b"auth-method: x", b"auth-method: eap"))))
    parsed = parse_content(ev2.data[4:])
    assert decode_message(parsed).status_code == 501 and parsed.auth is None


# ------------------------------------------------------------ PSK specifics


def psk_hac() -> HacExchange:
    class Creds:
        def get_psk(self, mn_id: str) -> bytes | None:
            return PSK if mn_id == MN_ID else None

        def close(self) -> None:
            pass

    return HacExchange(
        cb_octets=CB,
        methods={"psk": PskMethod().server({}, CTX)},
        credentials=Creds(),
        standin_key=secrets.token_bytes(32),
        policy=HacPolicy(allowed_suites=tuple(Suite)),
    )


def test_psk_400_after_the_method_was_selected_carries_auth() -> None:
    """PROFILE §4 last paragraph: once a key exists every final carries auth."""
    h = psk_hac()
    init = b"mn-id: alice@home.example\r\nmn-rand: " + b"11" * 32 + b"\r\nauth-method: psk\r\n"
    first = h.receive_data(req(1, init))[0]
    assert isinstance(first, Send)
    hac_rand = decode_message(parse_content(first.data[4:])).hac_rand
    assert hac_rand is not None
    bad = b"mn-rand: " + b"22" * 32 + b"\r\nhac-rand: " + hac_rand.hex().encode() + b"\r\n" + DONE
    mac = hmac.new(PSK, b"MN" + bad + CB, hashlib.sha256).hexdigest()
    ev = final_of(h.receive_data(encode_container(2, bad + f"auth: {mac}\r\n\r\n".encode())))
    assert status_key_ok(ev, PSK) == (400, True)


def mn_exchange() -> tuple[MnExchange, Any]:
    peer = PskMethod().peer({}, CTX).new(PeerMethodContext(MN_ID, CB, PSK))
    mn = MnExchange(
        mn_id=MN_ID, method_name="psk", method=peer, cb_octets=CB, scope=1, suitelist=[0x003C]
    )
    return mn, peer


def test_mn_refuses_a_final_status_100() -> None:
    mn, _ = mn_exchange()
    mn.start()
    body = b"status-code: 100\r\n"
    mac = hmac.new(PSK, b"HAC" + body + CB, hashlib.sha256).hexdigest()
    ev = mn.receive_data(encode_container(1, body + f"auth: {mac}\r\n\r\n".encode()))[0]
    assert isinstance(ev, Finished)
    assert ev.result.status is None and not ev.result.ok and "100" in ev.result.reason


@pytest.mark.parametrize("method", [b"eap", b"psk,eap", None])
def test_mn_checks_auth_method_in_the_first_psk_response(method: bytes | None) -> None:
    mn, peer = mn_exchange()
    start = mn.start()
    mn_rand = decode_message(parse_content(start[4:])).mn_rand
    assert mn_rand is not None
    body = b"mn-rand: " + mn_rand.hex().encode() + b"\r\nhac-rand: " + b"33" * 32 + b"\r\n"
    if method is not None:
        body += b"auth-method: " + method + b"\r\n"
    mac = hmac.new(PSK, b"HAC" + body + CB, hashlib.sha256).hexdigest()
    ev = mn.receive_data(encode_container(1, body + f"auth: {mac}\r\n\r\n".encode()))[0]
    assert isinstance(ev, Finished) and not ev.result.ok
    assert "auth-method" in ev.result.reason


@pytest.mark.parametrize(
    "nai",
    [
        "alice\u202e@home.example",  # RIGHT-TO-LEFT OVERRIDE
        "al\u200bice@home.example",  # ZERO WIDTH SPACE
        "alice@home\u2028.example",  # LINE SEPARATOR
        "alice@home.example\u200d",  # ZERO WIDTH JOINER
        "\ufeffalice@home.example",  # BOM / ZERO WIDTH NO-BREAK SPACE
    ],
)
def test_nai_with_format_characters_is_refused(nai: str) -> None:
    with pytest.raises(HeaderError, match="mn-id: control, format"):
        parse_nai(nai)
    h = psk_hac()
    init = f"mn-id: {nai}\r\nmn-rand: {'00' * 32}\r\nauth-method: psk\r\n".encode()
    ev = final_of(h.receive_data(req(1, init)))
    assert decode_message(parse_content(ev.data[4:])).status_code == 400


def test_utf8_nai_without_format_characters_is_fine() -> None:
    assert parse_nai("jöran@bücher.example") == "jöran@bücher.example"
