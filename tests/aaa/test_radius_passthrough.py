"""The ``radius`` EAP back end against fake neighbour servers: every reply shape a
real server must not be trusted with (crafted replies cannot come from
FreeRADIUS), options, and concurrency without timing assertions."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from radfake import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    ACCESS_REJECT,
    FakeServer,
    attr,
    build_reply,
    eap_attrs,
    eap_request,
    fake_server,
    hide_mppe,
    identity_response,
    request_attrs,
    request_eap,
    request_ma_ok,
    vsa,
)

from mipsec.aaa.options import MAX_SECRET_FILE
from mipsec.aaa.passthrough import RadiusBackendFactory, RadiusEapBackend
from mipsec.core import pluginmanager
from mipsec.core.eap.backend import (
    BackendVerdict,
    EapBackend,
    EapBackendSession,
    EapBackendStep,
    EapSessionContext,
)
from mipsec.core.errors import ConfigError, LocalProtocolError
from mipsec.core.hookspecs import PluginContext
from mipsec.core.wire.eap import EapCode, EapPacket, decode_eap, encode_eap

SECRET = "fake-secret"
CTX = PluginContext(role="hac", base_dir=Path("."), config_file="hac.toml")
MD5_CHALLENGE = eap_request(2, 4, b"\x10" + bytes(16))
MD5_RESPONSE = encode_eap(EapPacket(EapCode.RESPONSE, 2, 4, b"\x10" + bytes(16)))


def backend(*ports: int, **opts: Any) -> RadiusEapBackend:
    options = {
        "servers": [{"host": "127.0.0.1", "port": p, "secret": SECRET} for p in ports],
        "timeout": 5,
        "retries": 0,
        **opts,
    }
    return RadiusBackendFactory().create(options, CTX)


def ctx(mn_id: str = "alice@example.net", **kw: Any) -> EapSessionContext:
    return EapSessionContext(mn_id=mn_id, identity=mn_id, peer="[2001:db8::5]:40000", **kw)


def script(*replies: Any):  # type: ignore[no-untyped-def]
    """A server that answers the n-th request with ``replies[n](srv, data)``."""

    def handler(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
        i = len(srv.received) - 1
        if i >= len(replies) or replies[i] is None:
            return None
        return replies[i](srv, data)  # type: ignore[no-any-return]

    return handler


def challenge(eap: bytes = MD5_CHALLENGE, state: bytes | None = b"state-1", **kw: Any):  # type: ignore[no-untyped-def]
    def reply(srv: FakeServer, data: bytes) -> bytes:
        extra = attr(24, state) if state is not None else b""
        return build_reply(ACCESS_CHALLENGE, data, srv.secret, eap_attrs(eap) + extra, **kw)

    return reply


def accept(
    eap: bytes | None = b"\x03\x02\x00\x04", keys: bool = True, user: str | None = None, **kw: Any
):  # type: ignore[no-untyped-def]
    def reply(srv: FakeServer, data: bytes) -> bytes:
        attrs = eap_attrs(eap) if eap is not None else b""
        if keys:
            srv.state["recv"], srv.state["send"] = os.urandom(32), os.urandom(32)
            attrs += vsa(311, 17, hide_mppe(srv.state["recv"], srv.secret, data[4:20]))
            attrs += vsa(311, 16, hide_mppe(srv.state["send"], srv.secret, data[4:20]))
        if user is not None:
            attrs += attr(1, user.encode())
        return build_reply(ACCESS_ACCEPT, data, srv.secret, attrs, **kw)

    return reply


def reject(eap: bytes | None = b"\x04\x02\x00\x04"):  # type: ignore[no-untyped-def]
    def reply(srv: FakeServer, data: bytes) -> bytes:
        return build_reply(ACCESS_REJECT, data, srv.secret, eap_attrs(eap) if eap else b"")

    return reply


async def converse(
    b: RadiusEapBackend, *responses: bytes, c: EapSessionContext | None = None
) -> list[EapBackendStep]:
    """Identity, then ``responses`` while the back end says CONTINUE."""
    s = b.session(c or ctx())
    steps = [await s.start(identity_response((c or ctx()).identity))]
    for r in responses:
        if steps[-1].verdict is not BackendVerdict.CONTINUE:
            break
        steps.append(await s.receive(r))
    s.close()
    return steps


def run(
    handler: Any, *responses: bytes, c: EapSessionContext | None = None, **opts: Any
) -> tuple[list[EapBackendStep], FakeServer]:
    async def main() -> tuple[list[EapBackendStep], FakeServer]:
        fake = await fake_server(handler, secret=SECRET.encode())
        b = backend(fake.port, **opts)
        try:
            return await converse(b, *responses, c=c), fake
        finally:
            await b.aclose()
            fake.close()

    return asyncio.run(main())


# ------------------------------------------------------------------ the happy path


def test_challenge_then_accept_with_msk() -> None:
    steps, fake = run(script(challenge(), accept(user="alice@example.net")), MD5_RESPONSE)
    assert [s.verdict for s in steps] == [BackendVerdict.CONTINUE, BackendVerdict.SUCCESS]
    assert steps[0].eap == MD5_CHALLENGE
    done = steps[1]
    assert done.eap == b"\x03\x02\x00\x04"
    assert done.msk == fake.state["recv"] + fake.state["send"] and len(done.msk) == 64
    assert done.identity == "alice@example.net"
    assert done.msk.hex() not in repr(done)

    first, second = fake.received[0][1], fake.received[1][1]
    for raw in (first, second):
        assert request_ma_ok(raw, SECRET.encode()), "Message-Authenticator on every request"
        a = request_attrs(raw)
        assert (1, b"alice@example.net") in a  # User-Name = the EAP identity, every time
        assert (31, b"[2001:db8::5]:40000") in a  # Calling-Station-Id
        assert (32, b"mipsec-hac") in a  # NAS-Identifier
        assert (6, (2).to_bytes(4, "big")) in a  # Service-Type Framed-User
        assert (61, (5).to_bytes(4, "big")) in a  # NAS-Port-Type Virtual
        assert (12, (1400).to_bytes(4, "big")) in a  # Framed-MTU = max_packet
    assert request_eap(first) == identity_response("alice@example.net")
    assert 24 not in dict(request_attrs(first))
    assert request_eap(second) == MD5_RESPONSE
    assert (24, b"state-1") in request_attrs(second)  # State echoed


def test_nas_addresses_and_optional_attributes() -> None:
    steps, fake = run(
        script(challenge()),
        nas_ip_address="192.0.2.7",
        nas_ipv6_address="2001:db8::7",
        nas_identifier="hac-west",
        calling_station_id=False,
        service_type=0,
        nas_port_type=0,
        framed_mtu=False,
    )
    a = dict(request_attrs(fake.received[0][1]))
    assert a[4] == bytes([192, 0, 2, 7]) and a[32] == b"hac-west"
    assert a[95] == bytes.fromhex("20010db8000000000000000000000007")
    assert not {31, 6, 61, 12} & a.keys()


def test_accept_without_mppe_keys_has_no_msk() -> None:
    steps, _ = run(script(challenge(), accept(keys=False)), MD5_RESPONSE)
    assert steps[-1].verdict is BackendVerdict.SUCCESS
    assert steps[-1].msk is None and "no MSK" in steps[-1].reason
    assert steps[-1].identity is None


def test_accept_user_name_differs_is_returned_as_identity() -> None:
    steps, _ = run(script(challenge(), accept(user="mallory@example.net")), MD5_RESPONSE)
    assert steps[-1].verdict is BackendVerdict.SUCCESS
    assert steps[-1].identity == "mallory@example.net"  # the MHAuth layer compares with mn-id


def test_accept_without_eap_message_is_refused() -> None:
    """RFC 3579 §2.6.3: an Access-Accept without EAP-Message is a combination
    a server SHOULD NOT send, and the NAS MUST NOT manufacture the EAP
    packet it lacks.  It is refused with the HAC's EAP-Failure (401,
    PROFILE §4 item 6), naming the server.  This test expected the HAC's
    own EAP-Success until the twenty-ninth session, when a review found the
    comment citing §2.6.3 for the opposite of what it says."""
    steps, fake = run(script(challenge(), accept(eap=None)), MD5_RESPONSE)
    assert steps[-1].verdict is BackendVerdict.FAILURE and steps[-1].msk is None
    assert steps[-1].eap == b"\x04\x02\x00\x04"  # EAP-Failure, Identifier of the last response
    assert f"Access-Accept from 127.0.0.1:{fake.port} without EAP-Message" in steps[-1].reason


def test_accept_to_the_first_request_is_a_failure() -> None:
    steps, _ = run(script(accept()))
    assert steps[0].verdict is BackendVerdict.FAILURE
    assert steps[0].msk is None
    assert decode_eap(steps[0].eap).code is EapCode.FAILURE
    assert "first Access-Request" in steps[0].reason


def test_accept_carrying_eap_failure_is_a_failure() -> None:
    steps, _ = run(script(challenge(), accept(eap=b"\x04\x02\x00\x04")), MD5_RESPONSE)
    assert steps[-1].verdict is BackendVerdict.FAILURE and steps[-1].msk is None


def test_accept_with_broken_mppe_keys_is_a_failure() -> None:
    def broken(srv: FakeServer, data: bytes) -> bytes:
        junk = b"\x80\x01" + os.urandom(47)
        return build_reply(
            ACCESS_ACCEPT,
            data,
            srv.secret,
            eap_attrs(b"\x03\x02\x00\x04") + vsa(311, 17, junk) + vsa(311, 16, junk),
        )

    steps, _ = run(script(challenge(), broken), MD5_RESPONSE)
    assert steps[-1].verdict is BackendVerdict.FAILURE and "MS-MPPE" in steps[-1].reason


def test_reject() -> None:
    steps, _ = run(script(challenge(), reject()), MD5_RESPONSE)
    assert steps[-1].verdict is BackendVerdict.FAILURE
    assert steps[-1].eap == b"\x04\x02\x00\x04" and "Access-Reject" in steps[-1].reason
    steps, _ = run(script(challenge(), reject(eap=None)), MD5_RESPONSE)
    assert steps[-1].eap == b"\x04\x02\x00\x04"  # built for the last response's Identifier


# ------------------------------------------------------------------ bad replies


def _eap_request_of(total: int) -> bytes:
    return bytes([1, 2]) + total.to_bytes(2, "big") + bytes([13]) + bytes(total - 5)


def test_challenge_over_1400_octets_is_a_failure() -> None:
    steps, _ = run(script(challenge(eap=_eap_request_of(1401))))
    assert steps[0].verdict is BackendVerdict.FAILURE
    assert "1401-octet" in steps[0].reason and "1400-octet limit" in steps[0].reason
    assert decode_eap(steps[0].eap).code is EapCode.FAILURE
    steps, _ = run(script(challenge(eap=_eap_request_of(1400))))
    assert steps[0].verdict is BackendVerdict.CONTINUE and len(steps[0].eap) == 1400
    steps, _ = run(script(challenge(eap=_eap_request_of(1001))), c=ctx(max_packet=1000))
    assert steps[0].verdict is BackendVerdict.FAILURE and "1000-octet limit" in steps[0].reason


@pytest.mark.parametrize(
    ("eap", "why"),
    [
        (b"\x01\x02\x00\x09\x04ab", "malformed EAP"),  # Length says 9, 7 octets
        (b"\x02\x02\x00\x05\x04", "carries EAP RESPONSE"),
        (b"\x03\x02\x00\x04", "carries EAP SUCCESS"),
    ],
)
def test_challenge_with_bad_eap_is_a_failure(eap: bytes, why: str) -> None:
    steps, _ = run(script(challenge(eap=eap)))
    assert steps[0].verdict is BackendVerdict.FAILURE and why in steps[0].reason


def test_challenge_without_eap_message_is_a_failure() -> None:
    def bare(srv: FakeServer, data: bytes) -> bytes:
        return build_reply(ACCESS_CHALLENGE, data, srv.secret, attr(24, b"s"))

    steps, _ = run(script(bare))
    assert steps[0].verdict is BackendVerdict.FAILURE and "without EAP-Message" in steps[0].reason


@pytest.mark.parametrize("ma", ["none", "bad"])
def test_reply_without_or_with_wrong_message_authenticator_is_dropped(ma: str) -> None:
    # A forged Accept (the Blast-RADIUS shape) is dropped; nothing verified
    # arrives, so the conversation ends unanswered (504), never in SUCCESS.
    steps, fake = run(script(challenge(), accept(ma=ma)), MD5_RESPONSE, timeout=1)
    assert steps[0].verdict is BackendVerdict.CONTINUE
    assert steps[1].verdict is BackendVerdict.UNAVAILABLE and steps[1].status == 504
    assert "no reply verified" in steps[1].reason
    assert ("no-message-authenticator" if ma == "none" else "message-authenticator") in (
        steps[1].reason
    )


def test_identity_too_long_for_user_name_is_a_failure() -> None:
    long_id = "u" * 250 + "@example.net"  # 262 octets: User-Name holds 253
    steps, fake = run(script(challenge()), c=ctx(long_id))
    assert steps[0].verdict is BackendVerdict.FAILURE and "cannot build" in steps[0].reason
    assert not fake.received


def test_server_that_stops_answering_mid_conversation_is_504() -> None:
    steps, fake = run(script(challenge(), None), MD5_RESPONSE, timeout=1, retries=1)
    assert [s.verdict for s in steps] == [BackendVerdict.CONTINUE, BackendVerdict.UNAVAILABLE]
    assert steps[1].status == 504 and "no answer" in steps[1].reason
    assert len(fake.received) == 3  # the Identity, then the MD5 response twice
    assert fake.received[1] == fake.received[2]


def test_every_server_dead_is_503_with_retry_after() -> None:
    async def main() -> None:
        fake = await fake_server(lambda s, d, a: None, secret=SECRET.encode())
        b = backend(fake.port, timeout=0.2, dead_time=120)
        first = await converse(b)
        assert first[0].status == 504
        await b.client.probes_done()  # its Status-Server went unanswered too
        second = await converse(b)
        step = second[0]
        assert step.verdict is BackendVerdict.UNAVAILABLE and step.status == 503
        assert step.retry_after is not None and step.retry_after > datetime.now(UTC)
        assert (step.retry_after - datetime.now(UTC)).total_seconds() <= 121
        assert [raw[0] for _, raw in fake.received] == [1, 12], "nothing sent during the hold-off"
        await b.aclose()
        fake.close()

    asyncio.run(main())


# ------------------------------------------------------------------ sessions


def test_conversation_is_pinned_to_its_server() -> None:
    async def main() -> None:
        a = await fake_server(script(challenge(), accept()), secret=SECRET.encode())
        b_ = await fake_server(script(challenge(), accept()), secret=SECRET.encode())
        b = backend(a.port, b_.port)
        steps = await converse(b, MD5_RESPONSE)
        assert steps[-1].verdict is BackendVerdict.SUCCESS
        assert len(a.received) == 2 and not b_.received
        await b.aclose()
        a.close()
        b_.close()

    asyncio.run(main())


def test_close_drops_state_and_ends_the_session() -> None:
    async def main() -> None:
        fake = await fake_server(script(challenge()), secret=SECRET.encode())
        b = backend(fake.port)
        s = b.session(ctx())
        assert (await s.start(identity_response("alice@example.net"))).verdict is (
            BackendVerdict.CONTINUE
        )
        assert s._state == b"state-1" and s.server == f"127.0.0.1:{fake.port}"
        s.close()
        assert s._state is None and s.server is None
        with pytest.raises(LocalProtocolError):
            await s.receive(MD5_RESPONSE)
        await b.aclose()
        fake.close()

    asyncio.run(main())


def test_close_while_waiting_gives_a_failure() -> None:
    async def main() -> None:
        fake = await fake_server(lambda s, d, a: None, secret=SECRET.encode())
        b = backend(fake.port, timeout=30)
        s = b.session(ctx())
        pending = asyncio.ensure_future(s.start(identity_response("alice@example.net")))
        while not fake.received:
            await asyncio.sleep(0.01)
        s.close()
        await b.aclose()  # the service stops: the request ends unanswered
        step = await pending
        assert step.verdict in (BackendVerdict.FAILURE, BackendVerdict.UNAVAILABLE)
        fake.close()

    asyncio.run(main())


def test_fifty_mns_wait_on_radius_at_once() -> None:
    """The server answers nothing until it has seen all 50 Access-Requests:
    if one MN's wait delayed another, this would never finish."""
    n = 50

    def held(srv: FakeServer, data: bytes, addr: Any) -> None:
        srv.state.setdefault("held", {})[(addr, data[1])] = data
        if len(srv.state["held"]) == n:
            for (a, _), d in srv.state["held"].items():
                srv.send(challenge(state=d[4:8])(srv, d), a)

    async def main() -> None:
        fake = await fake_server(held, secret=SECRET.encode())
        b = backend(fake.port, timeout=60)
        sessions = [b.session(ctx(f"mn{i}@example.net")) for i in range(n)]
        steps = await asyncio.gather(
            *(s.start(identity_response(f"mn{i}@example.net")) for i, s in enumerate(sessions))
        )
        assert all(st.verdict is BackendVerdict.CONTINUE for st in steps)
        assert len(fake.state["held"]) == n and len(fake.received) == n
        users = {dict(request_attrs(d))[1] for _, d in fake.received}
        assert users == {f"mn{i}@example.net".encode() for i in range(n)}
        for s in sessions:
            s.close()
        await b.aclose()
        fake.close()

    asyncio.run(main())


def test_protocols_and_repr() -> None:
    b = backend(1812, servers=[{"host": "127.0.0.1", "port": 1812, "secret": "hunter2-xyz"}])
    s = b.session(ctx())
    assert isinstance(b, EapBackend) and isinstance(s, EapBackendSession)
    assert "hunter2" not in repr(b) + repr(s) + repr(b.client) + repr(b.opts)


def test_no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        run(script(challenge(), None), MD5_RESPONSE, timeout=0.2, retries=0)
    assert caplog.records, "the dead server was logged"
    assert all(SECRET not in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ options


def test_registered_through_the_entry_point() -> None:
    pm = pluginmanager.make_plugin_manager()
    assert "radius" in pluginmanager.registry(pm, "mipsec_eap_backends")
    b = pluginmanager.create(
        pm,
        "mipsec_eap_backends",
        "radius",
        {"servers": [{"host": "127.0.0.1", "secret": "x"}]},
        CTX,
        key="eap.backends.radius",
    )
    assert b.client.servers == ["127.0.0.1:1812"]  # the default port


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "servers: field required"),
        ({"servers": []}, "servers: list should have at least 1 item"),
        ({"servers": [{"host": "h"}]}, "servers[0]: exactly one of secret, secret_env"),
        (
            {"servers": [{"host": "h", "secret": "hunter2", "secret_env": "X"}]},
            "servers[0]: exactly one of",
        ),
        ({"servers": [{"host": "h", "port": 0, "secret": "s"}]}, "servers[0].port:"),
        ({"servers": [{"host": "h", "secret": "s"}], "timeout": 0}, "timeout: input should be"),
        ({"servers": [{"host": "h", "secret": "s"}], "retries": -1}, "retries:"),
        ({"servers": [{"host": "h", "secret": "s"}], "bogus": 1}, "bogus: extra inputs"),
        ({"servers": [{"host": "h", "secret": "s"}], "nas_ip_address": "::1"}, "nas_ip_address:"),
        (
            {"servers": [{"host": "h", "secret": ""}]},
            "servers[0].secret: the shared secret is empty",
        ),
        (
            {"servers": [{"host": "h", "secret": "a"}, {"host": "h", "secret": "b"}]},
            "servers: the same host and port appear twice",
        ),
        (
            {"servers": [{"host": "h", "secret_env": "MIPSEC_TEST_UNSET_VAR"}]},
            "servers[0].secret_env: environment variable MIPSEC_TEST_UNSET_VAR is not set",
        ),
        (
            {"servers": [{"host": "h", "secret_file": "/nonexistent/secret"}]},
            "servers[0].secret_file: cannot read /nonexistent/secret",
        ),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        RadiusBackendFactory().create(options, CTX)
    assert message in str(exc.value)
    assert "hunter2" not in str(exc.value)
    pm = pluginmanager.make_plugin_manager()
    with pytest.raises(ConfigError) as cexc:
        pluginmanager.create(pm, "mipsec_eap_backends", "radius", options, CTX, key="radius")
    assert "hac.toml" in str(cexc.value) and message in str(cexc.value)


def test_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIPSEC_TEST_RADIUS_SECRET", "from-env")
    (tmp_path / "radius.secret").write_text("from-file\n")
    (tmp_path / "radius.secret").chmod(0o600)  # a secret file
    (tmp_path / "empty.secret").write_text("\n")
    (tmp_path / "empty.secret").chmod(0o600)
    ctx_ = PluginContext(role="hac", base_dir=tmp_path, config_file="hac.toml")
    b = RadiusBackendFactory().create(
        {
            "servers": [
                {"host": "127.0.0.1", "port": 1, "secret_env": "MIPSEC_TEST_RADIUS_SECRET"},
                {"host": "127.0.0.1", "port": 2, "secret_file": "radius.secret"},  # relative
            ]
        },
        ctx_,
    )
    secrets_ = [st.config.secret for st in b.client._servers]
    assert secrets_ == [b"from-env", b"from-file"]
    with pytest.raises(ValueError, match=r"servers\[0\].secret_file: the shared secret is empty"):
        RadiusBackendFactory().create(
            {"servers": [{"host": "h", "secret_file": "empty.secret"}]}, ctx_
        )


def test_a_rotated_secret_file_makes_the_back_end_stale(tmp_path: Path) -> None:
    """``stale()`` (core/reload.py): True once a ``secret_file`` holds another
    secret than the one the back end was built with, or cannot be read (the
    rebuild then says why); False for the same secret rewritten and for an
    inline ``secret``, which changes with the configuration file itself."""
    path = tmp_path / "radius.secret"
    path.write_text("first-secret\n")
    path.chmod(0o600)
    ctx = PluginContext(role="hac", base_dir=tmp_path, config_file="hac.toml")
    options = {
        "servers": [
            {"host": "127.0.0.1", "port": 1812, "secret": SECRET},
            {"host": "127.0.0.2", "port": 1812, "secret_file": "radius.secret"},
        ]
    }
    b = RadiusBackendFactory().create(options, ctx)
    assert b.stale() is False
    path.write_text("first-secret\nignored second line\n")  # the first line is the secret
    assert b.stale() is False
    path.write_text("second-secret\n")
    assert b.stale() is True
    rebuilt = RadiusBackendFactory().create(options, ctx)
    assert rebuilt.stale() is False
    assert [s.secret for s in rebuilt.client.configs][1] == b"second-secret"
    path.unlink()
    assert rebuilt.stale() is True
    with pytest.raises(ValueError, match=r"servers\[1\]\.secret_file: cannot read"):
        RadiusBackendFactory().create(options, ctx)
    # A FIFO at the path is refused at once (a blocking open would hang the
    # event loop a reload checks on), and so is a file above the cap.
    os.mkfifo(path)
    assert rebuilt.stale() is True
    with pytest.raises(ValueError, match=r"secret_file: cannot read .*: not a regular file"):
        RadiusBackendFactory().create(options, ctx)
    path.unlink()
    path.write_bytes(b"x" * (MAX_SECRET_FILE + 1))
    path.chmod(0o600)
    with pytest.raises(
        ValueError, match=f"secret_file: cannot read .*: larger than {MAX_SECRET_FILE}"
    ):
        RadiusBackendFactory().create(options, ctx)
    assert backend(1812).stale() is False
    assert "second-secret" not in repr(rebuilt) + repr(rebuilt.client)


def test_require_user_name_refuses_an_accept_that_names_nobody() -> None:
    """``require_user_name``: the Accept must name the identity the server
    authenticated (the HAC then matches it with mn-id); one without
    User-Name is a failure.  Off (the default), it is accepted."""
    steps, _ = run(script(challenge(), accept()), MD5_RESPONSE, require_user_name=True)
    assert steps[-1].verdict is BackendVerdict.FAILURE
    assert "names no User-Name (require_user_name)" in steps[-1].reason
    assert decode_eap(steps[-1].eap).code is EapCode.FAILURE
    steps, _ = run(
        script(challenge(), accept(user="alice@example.net")),
        MD5_RESPONSE,
        require_user_name=True,
    )
    assert steps[-1].verdict is BackendVerdict.SUCCESS and steps[-1].identity == "alice@example.net"
    steps, _ = run(script(challenge(), accept()), MD5_RESPONSE)
    assert steps[-1].verdict is BackendVerdict.SUCCESS and steps[-1].identity is None


def test_a_secret_file_open_to_others_is_refused_naming_the_option(tmp_path: Path) -> None:
    """The shared secret forges Access-Accepts and opens the MPPE keys that
    carry the MSK: its ``secret_file`` is a secret file, refused when group
    or others may read it, with the chmod that fixes it.  Before the
    twenty-seventh session it was read at any mode (found in review)."""
    path = tmp_path / "radius.secret"
    path.write_text("a-secret\n")
    path.chmod(0o644)
    ctx = PluginContext(role="hac", base_dir=tmp_path, config_file="hac.toml")
    options = {"servers": [{"host": "127.0.0.1", "port": 1812, "secret_file": "radius.secret"}]}
    with pytest.raises(ValueError, match=r"^servers\[0\]\.secret_file: .*secret file open to"):
        RadiusBackendFactory().create(options, ctx)
    path.chmod(0o600)
    assert RadiusBackendFactory().create(options, ctx).stale() is False
