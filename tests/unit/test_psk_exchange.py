"""MN and HAC PSK machines driven against each other in memory (PROFILE §4)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipsec.core.authmethod import PeerMethodContext
from mipsec.core.hac_exchange import Close, HacExchange, HacPolicy, IssueSA, Send
from mipsec.core.hookspecs import PluginContext
from mipsec.core.issuer import new_sa, utcnow
from mipsec.core.mn_exchange import BootstrapResult, Finished, MnExchange, SendRequest
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.nai import nai_key
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire.container import encode_container
from mipsec.core.wire.message import decode_message
from mipsec.core.wire.tvheader import (
    LABEL_HAC,
    encode_content_with_auth,
    parse_content,
    verify_auth,
)
from mipsec.plugins.psk_auth import PskMethod

CB = hashlib.sha256(b"certificate").digest()
MN_ID = "alice@home.example"
PSK = secrets.token_bytes(32)
ALL = tuple(Suite)


class Creds:
    def __init__(self, table: dict[str, bytes]) -> None:
        self.table = table

    def get_psk(self, mn_id: str) -> bytes | None:
        return self.table.get(mn_id)

    def close(self) -> None:
        pass


CTX = PluginContext(role="test", base_dir=Path("."))
PSK_SERVER = PskMethod().server({}, CTX)
PSK_PEER = PskMethod().peer({}, CTX)


def make_hac(policy: HacPolicy | None = None, creds: dict[str, bytes] | None = None) -> HacExchange:
    return HacExchange(
        cb_octets=CB,
        methods={"psk": PSK_SERVER},
        credentials=Creds({MN_ID: PSK} if creds is None else creds),
        standin_key=secrets.token_bytes(32),
        policy=policy or HacPolicy(allowed_suites=ALL),
    )


def make_mn(psk: bytes = PSK, mn_id: str = MN_ID, suites=(0x003C,), cb: bytes = CB) -> MnExchange:
    peer = PSK_PEER.new(PeerMethodContext(mn_id=mn_id, cb_octets=cb, secret=psk))
    return MnExchange(
        mn_id=mn_id, method_name="psk", method=peer, cb_octets=cb, scope=1, suitelist=suites
    )


def issued_for(ev: IssueSA) -> IssuedSA:
    sa = new_sa(
        spi=4242, mn_id=ev.mn_id, suite=ev.suite, scope=ev.scope, lifetime=600, now=utcnow()
    )
    return IssuedSA(sa, BootstrapData(port=7872))


def run(hac: HacExchange, mn: MnExchange):
    """Drive both machines; return (MN result, final status the HAC sent, IssueSA)."""
    data = mn.start()
    issue = None
    for _ in range(10):
        events = hac.receive_data(data)
        assert len(events) == 1
        ev = events[0]
        if isinstance(ev, IssueSA):
            issue = ev
            ev = hac.complete(issued_for(ev))
        assert isinstance(ev, Send)
        mn_events = mn.receive_data(ev.data)
        assert len(mn_events) == 1
        if isinstance(mn_events[0], Finished):
            return mn_events[0].result, hac.final_status, issue
        assert isinstance(mn_events[0], SendRequest)
        data = mn_events[0].data
    raise AssertionError("exchange did not finish")


def test_psk_success_every_suite() -> None:
    for suite in Suite:
        result, status, issue = run(make_hac(), make_mn(suites=(int(suite),)))
        assert status == 200 and result.ok, result.reason
        assert issue is not None and issue.suite is suite
        sa = result.issued.sa
        info = SUITES[suite]
        assert sa.spi == 4242 and sa.suite is suite and sa.scope == 1
        assert len(sa.mn_to_ha_ikey) == info.ikey_len
        assert len(sa.mn_to_ha_ekey) == info.ekey_len


def test_wrong_psk_gets_401_at_done_and_cannot_verify_it() -> None:
    result, status, issue = run(make_hac(), make_mn(psk=secrets.token_bytes(32)))
    # The HAC's step-2 auth does not verify with the wrong PSK: the MN stops.
    assert issue is None and status is None and not result.ok
    assert "auth" in result.reason


def test_unknown_identity_same_shape_as_wrong_psk() -> None:
    """PROFILE §4: no enumeration oracle -- step 2 looks the same, 401 at Done."""
    hac_known, hac_unknown = make_hac(), make_hac()
    mn_a, mn_b = make_mn(), make_mn(mn_id="mallory@home.example")
    r_known = hac_known.receive_data(mn_a.start())[0]
    r_unknown = hac_unknown.receive_data(mn_b.start())[0]
    assert isinstance(r_known, Send) and isinstance(r_unknown, Send)
    assert not r_known.close and not r_unknown.close
    names = lambda s: [n for n, _ in parse_content(s.data[4:]).headers]  # noqa: E731
    assert names(r_known) == names(r_unknown)
    assert len(r_known.data) == len(r_unknown.data)
    # An attacker completing Done with a guessed key gets 401 (not earlier).
    msg = decode_message(parse_content(r_unknown.data[4:]))
    body = (
        f"mn-rand: {msg.mn_rand.hex()}\r\nhac-rand: {msg.hac_rand.hex()}\r\n"
        "mip6-sas: 1\r\nmip6-suitelist: {00,3C}\r\n"
    ).encode()
    mac = hmac.new(b"guess", b"MN" + body + CB, hashlib.sha256).hexdigest()
    done = encode_container(2, body + f"auth: {mac}\r\n\r\n".encode())
    final = hac_unknown.receive_data(done)[0]
    assert isinstance(final, Send) and final.close and final.status == 401
    fmsg = decode_message(parse_content(final.data[4:]))
    assert fmsg.mn_rand == msg.mn_rand and fmsg.hac_rand == msg.hac_rand
    assert fmsg.mip6_spi is None


def test_channel_binding_mismatch_fails() -> None:
    """A MITM terminating TLS has another certificate: the MN's CB differs."""
    result, status, _ = run(make_hac(), make_mn(cb=hashlib.sha256(b"other").digest()))
    assert not result.ok and status is None


def test_only_reserved_suites_gets_501() -> None:
    result, status, issue = run(make_hac(), make_mn(suites=(0x0035, 0x0001)))
    assert status == 501 and result.status == 501 and result.authenticated
    assert issue is None and result.issued is None


def test_default_policy_refuses_null_suites() -> None:
    result, status, _ = run(make_hac(HacPolicy()), make_mn(suites=(0x0002, 0x003B)))
    assert status == 501
    result, status, _ = run(make_hac(HacPolicy()), make_mn(suites=(0x0002, 0x002F)))
    assert status == 200 and result.issued.sa.suite is Suite.AES_128_CBC_SHA


def test_method_not_allowed_501_without_auth() -> None:
    hac = make_hac(HacPolicy(realm_methods={"*": ("eap",)}))
    ev = hac.receive_data(make_mn().start())[0]
    assert isinstance(ev, Send) and ev.status == 501 and ev.close
    assert parse_content(ev.data[4:]).auth is None


def test_mn_rand_mismatch_400() -> None:
    hac = make_hac()
    mn = make_mn()
    r1 = hac.receive_data(mn.start())[0]
    msg = decode_message(parse_content(r1.data[4:]))
    body = (
        f"mn-rand: {secrets.token_hex(32)}\r\nhac-rand: {msg.hac_rand.hex()}\r\n"
        "mip6-sas: 1\r\nmip6-suitelist: {00,3C}\r\n"
    ).encode()
    mac = hmac.new(PSK, b"MN" + body + CB, hashlib.sha256).hexdigest()
    ev = hac.receive_data(encode_container(2, body + f"auth: {mac}\r\n\r\n".encode()))[0]
    assert isinstance(ev, Send) and ev.status == 400 and ev.close
    assert parse_content(ev.data[4:]).auth is not None  # a key exists: keyed (PROFILE §4)


@pytest.mark.parametrize(
    "data, expect",
    [
        (b"\x20\x01\x00\x05ab\r\n\r\n", 400),  # Ver != 0
        (b"\x01\x01\x00\x05ab\r\n\r\n", 400),  # Rsrvd != 0
        (b"\x00\x00\x00\x02\r\n", None),  # Identifier 0: close, no answer
        (b"\x00\x01\x00\x00", 400),  # Length 0
        (b"\x00\x02\x00\x02\r\n", 400),  # Identifier out of sequence
        (encode_container(1, b"mn-id: a@b\r\nmn-id: a@b\r\nauth-method: psk\r\n\r\n"), 400),
        (encode_container(1, b"mn-id: a@b\r\nmn-rand: zz\r\nauth-method: psk\r\n\r\n"), 400),
        # rand of the wrong length (31 octets)
        (
            encode_container(
                1, b"mn-id: a@b\r\nmn-rand: " + b"ab" * 31 + b"\r\nauth-method: psk\r\n\r\n"
            ),
            400,
        ),
        (encode_container(1, b"mn-rand: " + b"00" * 32 + b"\r\nauth-method: psk\r\n\r\n"), 400),
        (encode_container(1, "mn-id: a@b\r\nx: \u00e9\r\n\r\n".encode()), 400),  # non-ASCII
    ],
)
def test_bad_init(data: bytes, expect: int | None) -> None:
    hac = make_hac()
    events = hac.receive_data(data)
    assert len(events) == 1
    if expect is None:
        assert isinstance(events[0], Close)
    else:
        ev = events[0]
        assert isinstance(ev, Send) and ev.status == expect and ev.close
        assert ev.data[1] == data[1]  # answered with the request's Identifier
        assert parse_content(ev.data[4:]).auth is None  # no method selected yet
    assert hac.finished


def test_an_init_the_psk_method_refuses_gets_a_keyed_400() -> None:
    """An Init without mn-rand: the HAC selected PSK before the method
    refused it, so the 400 carries auth (PROFILE §4, last paragraph: only a
    400 or 501 answering an Init before any method was selected carries
    none), keyed with the stand-in -- no credential is looked up for a
    malformed Init.  It had no auth before the twenty-ninth session (found
    in review)."""
    hac = make_hac()
    [ev] = hac.receive_data(encode_container(1, b"mn-id: a@b\r\nauth-method: psk\r\n\r\n"))
    assert isinstance(ev, Send) and ev.status == 400 and ev.close and hac.finished
    parsed = parse_content(ev.data[4:])
    assert parsed.names() == ("status-code", "auth")
    assert verify_auth(hac._standin, LABEL_HAC, parsed, CB)


def test_truncated_stream_closes() -> None:
    hac = make_hac()
    assert hac.receive_data(b"\x00\x01\x00\x50mn-id") == []
    events = hac.receive_eof()
    assert isinstance(events[0], Close) and "inside" in events[0].reason


def test_any_chunking_of_requests() -> None:
    hac = make_hac()
    mn = make_mn()
    data = mn.start()
    events = []
    for i in range(len(data)):
        events += hac.receive_data(data[i : i + 1])
    assert len(events) == 1 and isinstance(events[0], Send) and not events[0].close


def test_issue_failure_504_keyed_and_nothing_else() -> None:
    hac = make_hac()
    mn = make_mn()
    r1 = hac.receive_data(mn.start())[0]
    req = mn.receive_data(r1.data)[0]
    ev = hac.receive_data(req.data)[0]
    assert isinstance(ev, IssueSA)
    final = hac.fail(504)
    assert final.status == 504 and final.close
    result = mn.receive_data(final.data)[0].result
    assert result.status == 504 and result.authenticated and result.issued is None


def test_503_carries_retry_after() -> None:
    hac = make_hac()
    mn = make_mn()
    req = mn.receive_data(hac.receive_data(mn.start())[0].data)[0]
    assert isinstance(hac.receive_data(req.data)[0], IssueSA)
    when = utcnow().replace(microsecond=0)
    result = mn.receive_data(hac.fail(503, when).data)[0].result
    assert result.status == 503 and result.retry_after == when


def test_retry_after_on_an_authenticated_final_other_than_503_is_not_honoured() -> None:
    """PROFILE §3: retry-after comes only with 503.  An authenticated 504
    carrying one (a HAC outside the profile) does not set the MN's wait;
    the MN honoured it before (review, 2026-12-06)."""
    hac = make_hac()
    mn = make_mn()
    req = mn.receive_data(hac.receive_data(mn.start())[0].data)[0]
    assert isinstance(hac.receive_data(req.data)[0], IssueSA)
    when = utcnow().replace(microsecond=0)
    # The HAC's own 503, turned into a 504 that keeps its retry-after and
    # re-keyed with the PSK as a HAC outside the profile would send it.
    final503 = hac.fail(503, when).data
    parsed = parse_content(final503[4:])
    headers = [(n, "504" if n == "status-code" else v) for n, v in parsed.headers if n != "auth"]
    content = encode_content_with_auth(headers, PSK, LABEL_HAC, CB)
    result = mn.receive_data(encode_container(final503[1], content))[0].result
    assert result.status == 504 and result.authenticated and result.retry_after is None


def _standin_final(body: str) -> BootstrapResult:
    """An MN's result for a final response ``body`` to its Init, keyed with
    a HAC stand-in key (one the MN cannot verify)."""
    mn = make_mn()
    mn.start()
    mac = hmac.new(b"stand-in", b"HAC" + body.encode() + CB, hashlib.sha256).hexdigest()
    (done,) = mn.receive_data(encode_container(1, body.encode() + f"auth: {mac}\r\n\r\n".encode()))
    assert isinstance(done, Finished)
    return done.result


def test_an_unverifiable_503_still_gives_its_retry_after_and_nothing_else() -> None:
    """A 503 answering the Init (the HAC's credential backend down) is keyed
    with the HAC's stand-in key, which the MN cannot verify.  Its
    ``retry-after`` still reaches the caller -- it came over the verified
    TLS channel and can only delay the next attempt (core/mn_retry.py) --
    while the result stays unauthenticated and carries no SA; an
    unverifiable 401 gives no retry-after even if it carries one."""
    when = utcnow().replace(microsecond=0)
    for status, kept in ((503, when), (401, None)):
        when_text = f"{when:%a, %d %b %Y %H:%M:%S} GMT"
        result = _standin_final(f"status-code: {status}\r\nretry-after: {when_text}\r\n")
        assert result.status == status and not result.authenticated and not result.ok
        assert result.issued is None and result.retry_after == kept


@pytest.mark.parametrize(
    "value",
    [
        "tomorrow",
        "30",  # delta-seconds: HTTP allows it, PROFILE §2 says an RFC 1123 date only
        "Sun, 06 Nov 1994 08:49:37 PST",  # not GMT
        "Sun, 31 Feb 2026 08:49:37 GMT",  # no such day
        "Sun, 06 Nov 1994 25:49:37 GMT",  # no such hour
        "Sun,  6 Nov 1994 08:49:37 GMT",  # two digits for the day
        "",
    ],
)
def test_a_malformed_retry_after_is_a_malformed_response_naming_it(value: str) -> None:
    """A 503 whose ``retry-after`` is not an RFC 1123 date (PROFILE §2) ends
    the bootstrap as a malformed response naming the header, with no
    retry-after for the MN's backoff (it falls back to its own doubling
    wait, core/mn_retry.py) -- never a crash, never a date guessed."""
    result = _standin_final(f"status-code: 503\r\nretry-after: {value}\r\n")
    assert result.status is None and not result.ok and result.retry_after is None
    assert "malformed response" in result.reason and "retry-after" in result.reason


def test_sa_keys_not_in_repr() -> None:
    result, _, _ = run(make_hac(), make_mn())
    text = repr(result)
    assert result.issued.sa.mn_to_ha_ikey.hex() not in text
    assert PSK.hex() not in repr(make_mn()) + repr(make_hac())


def test_des3_degenerate_keys_detected() -> None:
    from mipsec.core.issuer import _des3_degenerate

    k = bytes(range(24))
    assert not _des3_degenerate(k)
    assert _des3_degenerate(k[:8] + bytes(b ^ 1 for b in k[:8]) + k[16:])  # k1 == k2 mod parity
    assert _des3_degenerate(k[:8] + k[8:16] + k[8:16])  # k2 == k3


# ------------------------------------------------- tampering, as properties


def _tamper(data: bytes, at: int, mask: int, cut: bool) -> bytes:
    """``data`` with one octet XORed with ``mask`` (nonzero) or, with ``cut``,
    truncated just before that octet."""
    at %= len(data)
    if cut:
        return data[:at]
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


def hac_reads(data: bytes, *, ignore: tuple[str, ...] = ()) -> tuple[bytes, object] | None:
    """The first request as the HAC reads it from ``data``: its Ver/Rsrvd and
    Identifier octets and its message (the fields named in ``ignore`` blanked);
    None if it is incomplete or malformed.  PROFILE §2: the container's Length
    delimits the content, and the content's final empty line is optional."""
    if len(data) < 4:
        return None
    end = 4 + int.from_bytes(data[2:4], "big")
    if len(data) < end:
        return None
    try:
        msg = decode_message(parse_content(data[4:end]))
    except Exception:
        return None
    for name in ignore:
        setattr(msg, name, None)
    if msg.mn_id is not None:
        # The HAC binds the MN by the NAI's canonical form (core/nai.py):
        # ``alice@Home.example`` is ``alice@home.example`` (RFC 7542 §2.4).
        msg.mn_id = nai_key(msg.mn_id)
    return data[:2], msg


def same_meaning(tampered: bytes, genuine: bytes, *, ignore: tuple[str, ...] = ()) -> bool:
    """Does the HAC read the same request from ``tampered`` as from ``genuine``?"""
    read = hac_reads(tampered, ignore=ignore)
    return read is not None and read == hac_reads(genuine, ignore=ignore)


def _hac_events(hac: HacExchange, data: bytes) -> list[object]:
    """What the HAC does with ``data`` followed by the end of the stream."""
    events: list[object] = list(hac.receive_data(data))
    if not hac.finished and not any(isinstance(e, IssueSA) for e in events):
        events += hac.receive_eof()
    return events


TAMPER = dict(
    at=st.integers(min_value=0, max_value=10_000),
    mask=st.integers(min_value=1, max_value=255),
    cut=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(**TAMPER)
def test_a_tampered_init_is_answered_or_closed_never_raises(at: int, mask: int, cut: bool) -> None:
    """Any one-octet change or truncation of a genuine Init: the HAC answers a
    final 4xx/5xx on the request's own terms, continues the exchange (a change
    that keeps the Init well-formed, e.g. in ``mn-rand``), or closes -- never
    an exception, never an SA."""
    data = _tamper(make_mn().start(), at, mask, cut)
    hac = make_hac()
    for ev in _hac_events(hac, data):
        assert not isinstance(ev, IssueSA)
        if isinstance(ev, Send) and ev.close:
            assert ev.status is not None and 400 <= ev.status < 600, ev.status
        else:
            assert isinstance(ev, Close | Send), ev


@settings(max_examples=300, deadline=None)
@given(**TAMPER)
def test_a_tampered_done_never_gets_an_sa(at: int, mask: int, cut: bool) -> None:
    """PROFILE §4: the Done is authenticated with the PSK over every header.
    Any one-octet change or truncation of a genuine Done gets a final
    4xx (keyed: the method was selected) or a close -- never an SA, unless
    the change left the request meaning exactly what the MN sent."""
    hac, mn = make_hac(), make_mn()
    first = hac.receive_data(mn.start())
    assert len(first) == 1 and isinstance(first[0], Send) and not first[0].close
    done = mn.receive_data(first[0].data)
    assert len(done) == 1 and isinstance(done[0], SendRequest)
    genuine = done[0].data
    data = _tamper(genuine, at, mask, cut)
    for ev in _hac_events(hac, data):
        if isinstance(ev, IssueSA):  # only if the HAC read what the MN sent
            assert same_meaning(data, genuine)
            continue
        if isinstance(ev, Send):
            assert ev.close and ev.status is not None and 400 <= ev.status < 500, ev.status
            assert parse_content(ev.data[4:]).auth is not None  # keyed (PROFILE §4)
        else:
            assert isinstance(ev, Close), ev


@settings(max_examples=300, deadline=None)
@given(k=st.sampled_from([1, 2]), **TAMPER)
def test_a_tampered_hac_response_never_gives_the_mn_an_sa(
    k: int, at: int, mask: int, cut: bool
) -> None:
    """The MN's side of the same property: one octet of the HAC's first
    response (k=1) or of its final 200 (k=2) changed, or the stream cut
    there.  The MN ends without an SA (PROFILE §4: it verifies the HAC's
    ``auth`` and the echoed ``mn-rand``), never raises, and holds an SA only
    if it read what the HAC sent."""
    hac, mn = make_hac(), make_mn()
    data, n = mn.start(), 0
    while True:
        events = hac.receive_data(data)
        assert len(events) == 1
        ev = events[0]
        if isinstance(ev, IssueSA):
            ev = hac.complete(issued_for(ev))
        assert isinstance(ev, Send)
        n += 1
        answer = ev.data
        changed = False
        if n == k:
            answer = _tamper(ev.data, at, mask, cut)
            changed = not same_meaning(answer, ev.data)
        out = mn.receive_data(answer)
        if not out:
            out = mn.receive_eof()  # incomplete: the stream ends there
        assert len(out) == 1
        if isinstance(out[0], Finished):
            result = out[0].result
            # Unchanged in meaning need not pass: the auth covers the octets
            # as sent (PROFILE §2), so a changed hex case fails it too.
            assert not (changed and result.ok), result
            return
        assert isinstance(out[0], SendRequest)
        assert n == 1  # the Done; only after a first response it accepted
        data = out[0].data


def test_the_sa_is_bound_to_the_canonical_nai() -> None:
    """PROFILE §4 item 8 and RFC 7542 §2.4: a realm spelt in another case is
    the same MN -- its credential is found under the same key, and the SA
    (with everything the HAC keys per MN) is bound to the canonical form, so
    that a spelling cannot buy a second SA, home address or a way past a
    revocation."""

    class NaiCreds(Creds):  # as the credential back ends look identities up
        def get_psk(self, mn_id: str) -> bytes | None:
            return self.table.get(nai_key(mn_id))

    mn = make_mn(mn_id="alice@HOME.Example")
    hac = HacExchange(
        cb_octets=CB,
        methods={"psk": PSK_SERVER},
        credentials=NaiCreds({MN_ID: PSK}),
        standin_key=secrets.token_bytes(32),
        policy=HacPolicy(allowed_suites=ALL),
    )
    events = hac.receive_data(mn.start())
    step = [e for e in events if isinstance(e, Send)]
    assert step and not step[0].close
    for ev in mn.receive_data(step[0].data):
        assert isinstance(ev, SendRequest)
        issue = [e for e in hac.receive_data(ev.data) if isinstance(e, IssueSA)]
        assert len(issue) == 1 and issue[0].mn_id == MN_ID  # alice@home.example
    assert hac.mn_id == MN_ID
