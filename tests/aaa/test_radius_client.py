"""The asyncio RADIUS client against fake neighbour servers (crafted replies, held
requests, silence).  No wall-clock assertions: concurrency is shown by a
server that answers nothing until it has seen every request."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from radfake import (
    ACCESS_ACCEPT,
    ACCESS_CHALLENGE,
    FakeServer,
    attr,
    build_reply,
    eap_attrs,
    eap_request,
    fake_server,
    request_attrs,
)

from mipsec.aaa.codec import RadiusCode, Request, encode_access_request
from mipsec.aaa.radius import (
    RadiusClient,
    RadiusError,
    RadiusServer,
    RadiusTimeout,
    RadiusUnavailable,
)

SECRET = b"fake-secret"


def builder(user: str = "alice") -> Any:
    def build(secret: bytes, identifier: int) -> Request:
        return encode_access_request(
            identifier, secret, [("User-Name", user)], eap=b"\x02\x01\x00\x06\x01a"
        )

    return build


def challenge(srv: FakeServer, data: bytes, addr: Any) -> bytes:
    """Access-Challenge whose Reply-Message echoes the request's User-Name."""
    user = dict(request_attrs(data))[1]
    return build_reply(
        ACCESS_CHALLENGE, data, srv.secret, eap_attrs(eap_request(2, 4, b"\x01x")) + attr(18, user)
    )


def server(fake: FakeServer, secret: bytes = SECRET) -> RadiusServer:
    return RadiusServer("127.0.0.1", fake.port, secret)


async def silent() -> FakeServer:
    return await fake_server(lambda s, d, a: None)


async def served_by(client: RadiusClient, user: str) -> str:
    """The label of the server that answered ``user``'s request."""
    return (await client.send(builder(user)))[0]


def probing(*fakes: FakeServer, **kw: Any) -> RadiusClient:
    """A client of ``fakes`` (in order) that asks Status-Server before a hold-off."""
    opts: dict[str, Any] = {"timeout": 0.2, "retries": 0, "dead_time": 60, **kw}
    return RadiusClient([server(f) for f in fakes], status_server=True, **opts)


async def shut(client: RadiusClient, *fakes: FakeServer) -> None:
    await client.aclose()
    for fake in fakes:
        fake.close()


def test_retransmission_is_the_same_packet() -> None:
    async def main() -> None:
        def second_copy_only(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
            return challenge(srv, data, addr) if len(srv.received) == 2 else None

        fake = await fake_server(second_copy_only)
        client = RadiusClient([server(fake)], timeout=0.3, retries=3)
        label, reply = await client.send(builder())
        assert reply.code is RadiusCode.ACCESS_CHALLENGE
        first, second = fake.received[0], fake.received[1]
        # RFC 5080 §2.2.1: same source port, Identifier and Request Authenticator.
        assert first == second
        assert client.stats()[label].retransmissions >= 1
        await client.aclose()
        fake.close()

    asyncio.run(main())


def _held(count: int):  # type: ignore[no-untyped-def]
    """A server that answers nothing until it holds ``count`` requests, then all."""

    def handler(srv: FakeServer, data: bytes, addr: Any) -> list[bytes] | None:
        if srv.state.get("released"):
            return [challenge(srv, data, addr)]
        held = srv.state.setdefault("held", {})
        held[(addr, data[1])] = data  # a retransmission replaces its first copy
        if len(held) < count:
            return None
        srv.state["released"] = True
        for (a, _), d in held.items():
            srv.send(challenge(srv, d, a), a)
        return None

    return handler


def test_more_than_256_outstanding_use_several_source_ports() -> None:
    n = 300

    async def main() -> None:
        fake = await fake_server(_held(n))
        client = RadiusClient([server(fake)], timeout=30, retries=1)
        results = await asyncio.gather(*(client.send(builder(f"mn{i}")) for i in range(n)))
        # Every reply reached the request it answers (Reply-Message echo).
        for i, (_, reply) in enumerate(results):
            assert reply.packet["Reply-Message"] == [f"mn{i}"]
        held = fake.state["held"]
        assert len(held) == n, "the server held every request before answering any"
        ports = {addr[1] for addr, _ in held}
        assert len(ports) >= 2
        assert client.stats()[client.servers[0]].sockets == len(ports)
        await client.aclose()
        fake.close()

    asyncio.run(main())


def test_one_socket_limit_queues_requests() -> None:
    async def main() -> None:
        fake = await fake_server(challenge)
        client = RadiusClient([server(fake)], timeout=30, retries=0, max_sockets=1)
        results = await asyncio.gather(*(client.send(builder(f"u{i}")) for i in range(300)))
        assert [r.packet["Reply-Message"][0] for _, r in results] == [f"u{i}" for i in range(300)]
        assert {addr for addr, _ in fake.received} == {fake.received[0][0]}
        assert client.stats()[client.servers[0]].sockets == 1
        await client.aclose()
        fake.close()

    asyncio.run(main())


def test_unverifiable_replies_are_dropped_and_the_valid_one_taken() -> None:
    async def main() -> None:
        def forged_first(srv: FakeServer, data: bytes, addr: Any) -> list[bytes]:
            ok = eap_attrs(b"\x03\x01\x00\x04")
            return [
                build_reply(ACCESS_ACCEPT, data, srv.secret, ok, ma="none"),
                build_reply(ACCESS_ACCEPT, data, srv.secret, ok, ma="bad"),
                build_reply(ACCESS_ACCEPT, data, b"other-secret", ok),
                challenge(srv, data, addr),
            ]

        fake = await fake_server(forged_first)
        client = RadiusClient([server(fake)], timeout=30, retries=0)
        label, reply = await client.send(builder())
        assert reply.code is RadiusCode.ACCESS_CHALLENGE  # not the forged Accepts
        stats = client.stats()[label]
        assert stats.unverifiable == 3 and stats.replies == 1
        await client.aclose()
        fake.close()

    asyncio.run(main())


def test_wrong_shared_secret_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        fake = await fake_server(challenge, secret=b"the-servers-secret")
        client = RadiusClient([server(fake, b"our-wrong-secret")], timeout=0.5, retries=2)
        with pytest.raises(RadiusTimeout) as exc:
            await client.send(builder())
        text = str(exc.value)
        assert "answered but no reply verified" in text and "wrong shared secret" in text
        assert f"127.0.0.1:{fake.port}" in text
        rejected = exc.value.rejected["response-authenticator"]
        assert 1 <= rejected <= 3  # one per send (a very late one counts as unexpected)
        assert client.stats()[exc.value.server].unverifiable == rejected
        await client.aclose()
        fake.close()

    with caplog.at_level(logging.WARNING, logger="mipsec.aaa.radius"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "reply dropped" in r.getMessage()]
    assert len(lines) == 1, "one line per server, not one per reply"
    assert "127.0.0.1:" in lines[0] and "shared secret" in lines[0]
    for r in caplog.records:
        assert "our-wrong-secret" not in r.getMessage()
        assert "the-servers-secret" not in r.getMessage()


def test_failover_and_dead_server_hold_off() -> None:
    now = [1000.0]

    async def main() -> None:
        dead, alive = await silent(), await fake_server(challenge)
        client = RadiusClient(
            [server(dead), server(alive)],
            timeout=1,
            retries=1,
            dead_time=60,
            clock=lambda: now[0],
        )
        label, _ = await client.send(builder())
        assert label == f"127.0.0.1:{alive.port}"
        assert len(dead.received) == 2  # first send + one retransmission
        assert client.is_dead(f"127.0.0.1:{dead.port}")
        # Hold-off: the next requests skip the dead server entirely.
        for _ in range(3):
            label, _ = await client.send(builder())
            assert label == f"127.0.0.1:{alive.port}"
        assert len(dead.received) == 2
        # After dead_time it is tried again (and found still dead).
        now[0] += 61
        label, _ = await client.send(builder())
        assert label == f"127.0.0.1:{alive.port}" and len(dead.received) == 4
        await client.aclose()
        dead.close()
        alive.close()

    asyncio.run(main())


def test_caller_deadline_still_holds_off_a_silent_server() -> None:
    """The HAC's EAP timeout may cancel a request before its retransmissions
    are spent: a server that already let a whole timeout pass is held off
    anyway, so the next MN goes to the next server."""

    async def main() -> None:
        dead, alive = await silent(), await fake_server(challenge)
        client = RadiusClient([server(dead), server(alive)], timeout=0.5, retries=5, dead_time=60)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.send(builder()), 1.2)  # gives up on the dead server
        assert client.is_dead(f"127.0.0.1:{dead.port}")
        sent = len(dead.received)
        label, _ = await client.send(builder())
        assert label == f"127.0.0.1:{alive.port}" and len(dead.received) == sent
        await client.aclose()
        dead.close()
        alive.close()

    asyncio.run(main())


def test_a_server_answering_others_is_not_held_off_for_one_stalled_request() -> None:
    """A proxy whose upstream lost one conversation still answers everyone
    else: that one request times out, the server is not marked dead."""

    def selective(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
        user = dict(request_attrs(data))[1]
        return None if user == b"stalled" else challenge(srv, data, addr)

    async def main() -> None:
        srv = await fake_server(selective)
        client = RadiusClient([server(srv)], timeout=0.3, retries=1, dead_time=60)
        stalled = asyncio.create_task(client.send(builder("stalled")))
        await asyncio.sleep(0.05)
        for _ in range(3):  # answered while the stalled request waits
            await client.send(builder("alice"))
        with pytest.raises(RadiusTimeout):
            await stalled
        label = f"127.0.0.1:{srv.port}"
        assert not client.is_dead(label)
        assert client.stats()[label].stalled == 1
        await client.send(builder("bob"))  # still served: no 503 for everyone
        # A server that answers nobody is held off as before.
        quiet = await silent()
        c2 = RadiusClient([server(quiet)], timeout=0.2, retries=0, dead_time=60)
        with pytest.raises(RadiusTimeout):
            await c2.send(builder())
        assert c2.is_dead(f"127.0.0.1:{quiet.port}")
        for c in (client, c2):
            await c.aclose()
        srv.close()
        quiet.close()

    asyncio.run(main())


def test_every_server_dead_is_unavailable_with_retry_after() -> None:
    now = [0.0]

    async def main() -> None:
        a, b = await silent(), await silent()
        client = RadiusClient(
            [server(a), server(b)], timeout=0.2, retries=0, dead_time=30, clock=lambda: now[0]
        )
        with pytest.raises(RadiusTimeout):
            await client.send(builder())
        assert len(a.received) == 1 and len(b.received) == 1
        now[0] += 10
        with pytest.raises(RadiusUnavailable) as exc:
            await client.send(builder())
        assert exc.value.retry_after == pytest.approx(20)
        assert len(a.received) == 1 and len(b.received) == 1, "nothing sent while held off"
        await client.aclose()
        a.close()
        b.close()

    asyncio.run(main())


def test_pinned_request_goes_only_to_its_server() -> None:
    async def main() -> None:
        a, b = await fake_server(challenge), await fake_server(challenge)
        client = RadiusClient([server(a), server(b)], timeout=5, retries=0)
        label, _ = await client.send(builder(), server=f"127.0.0.1:{b.port}")
        assert label == f"127.0.0.1:{b.port}" and not a.received and len(b.received) == 1
        await client.aclose()
        a.close()
        b.close()

    asyncio.run(main())


def test_duplicate_reply_counted_unexpected() -> None:
    async def main() -> None:
        fake = await fake_server(lambda s, d, a: [challenge(s, d, a)] * 2)
        client = RadiusClient([server(fake)], timeout=5, retries=0)
        label, _ = await client.send(builder())
        for _ in range(50):  # let the duplicate arrive
            if client.stats()[label].unexpected:
                break
            await asyncio.sleep(0.01)
        assert client.stats()[label].unexpected == 1
        assert client.stats()[label].unverifiable == 0
        await client.aclose()
        fake.close()

    asyncio.run(main())


def test_a_late_duplicate_on_a_reused_identifier_is_not_blamed_on_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server answers every request, and a copy of each answer arrives
    late.  All 256 Identifiers of the one socket were used, so the next
    requests reuse them and the late copies land on them.  They verify
    against the request each Identifier carried before: counted as late
    (``unexpected``), not ``unverifiable``, and the new requests' timeout
    does not say "wrong shared secret?" (found in review, twenty-ninth
    session: it did, on a server sharing our secret)."""
    answering = {"on": True}
    copies: list[tuple[bytes, Any]] = []

    def answer_and_keep_a_copy(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
        if not answering["on"]:
            return None
        reply = challenge(srv, data, addr)
        copies.append((reply, addr))
        return reply

    async def main() -> None:
        fake = await fake_server(answer_and_keep_a_copy)
        client = RadiusClient([server(fake)], timeout=1.0, retries=0, dead_time=0, max_sockets=1)
        await asyncio.gather(*(client.send(builder()) for _ in range(256)))
        answering["on"] = False
        pending = [asyncio.ensure_future(client.send(builder())) for _ in range(5)]
        # The copies once the new requests are out on the reused Identifiers
        # (not on a timer: a loaded machine let them all arrive before).
        while len(fake.received) < 256 + 5:
            await asyncio.sleep(0.01)
        for reply, addr in copies:
            fake.send(reply, addr)
        results = await asyncio.gather(*pending, return_exceptions=True)
        stats = client.stats()[f"127.0.0.1:{fake.port}"]
        assert all(isinstance(r, RadiusTimeout) for r in results), results
        assert all(not r.rejected and "secret?" not in str(r) for r in results)  # type: ignore[union-attr]
        assert stats.unverifiable == 0 and stats.unexpected >= 5
        await shut(client, fake)

    with caplog.at_level(logging.DEBUG, logger="mipsec.aaa.radius"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("late reply" in r.getMessage() for r in caplog.records)


def test_closed_client_refuses() -> None:
    async def main() -> None:
        fake = await silent()
        client = RadiusClient([server(fake)], timeout=30, retries=0)
        pending = asyncio.ensure_future(client.send(builder()))
        while not fake.received:
            await asyncio.sleep(0.01)
        await client.aclose()
        with pytest.raises(RadiusError):
            await pending
        with pytest.raises(RadiusError):
            await client.send(builder())
        fake.close()

    asyncio.run(main())


def test_secret_never_in_repr() -> None:
    s = RadiusServer("127.0.0.1", 1812, b"top-secret-value")
    c = RadiusClient([s])
    assert "top-secret" not in repr(s) and "top-secret" not in repr(c)


def _status_server_aware(stalls: set[bytes]):  # type: ignore[no-untyped-def]
    """A server (a proxy) that never answers the users in ``stalls`` (their
    realm's upstream is slow) but answers everyone else, and Status-Server
    with Access-Accept (RFC 5997 §3)."""

    def handler(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
        if data[0] == RadiusCode.STATUS_SERVER:  # as FreeRADIUS: no Message-Authenticator
            return build_reply(ACCESS_ACCEPT, data, srv.secret, ma="none")
        user = dict(request_attrs(data))[1]
        return None if user in stalls else challenge(srv, data, addr)

    return handler


def test_a_quiet_server_that_answers_status_server_is_not_held_off() -> None:
    """One MN naming a realm whose upstream never answers, on a quiet HAC (no
    other request meanwhile): before, "no reply since it left" held the only
    server off for dead_time -- every RADIUS bootstrap 503 -- so any MN
    could take the AAA path down every 30 s.  Now one Status-Server asks
    the server, which answers: not held off, the next MN is served."""

    async def main() -> None:
        srv = await fake_server(_status_server_aware({b"slow@upstream"}))
        client = RadiusClient(
            [server(srv)], timeout=0.2, retries=1, dead_time=60, status_server=True
        )
        with pytest.raises(RadiusTimeout):
            await client.send(builder("slow@upstream"))
        await client.probes_done()
        label = f"127.0.0.1:{srv.port}"
        stats = client.stats()[label]
        assert not client.is_dead(label)
        assert stats.probes == 1 and stats.probes_answered == 1
        assert [raw[0] for _, raw in srv.received] == [1, 1, 12]  # the request twice, a probe
        _, reply = await client.send(builder("alice"))
        assert reply.code is RadiusCode.ACCESS_CHALLENGE
        await client.aclose()
        srv.close()

    asyncio.run(main())


def test_a_caller_leaving_does_not_hold_off_a_server_that_answers_status_server() -> None:
    """The MN disconnects after one retransmission timeout (the caller's
    cancellation): the server is asked, answers, and stays in service."""

    async def main() -> None:
        srv = await fake_server(_status_server_aware({b"slow@upstream"}))
        client = RadiusClient(
            [server(srv)], timeout=0.2, retries=5, dead_time=60, status_server=True
        )
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.send(builder("slow@upstream")), 0.3)
        await client.probes_done()
        assert not client.is_dead(f"127.0.0.1:{srv.port}")
        await client.send(builder("alice"))
        await client.aclose()
        srv.close()

    asyncio.run(main())


async def _timed_out_on_a_silent_server() -> tuple[FakeServer, RadiusClient]:
    """A client with Status-Server probes whose one request a silent server
    left unanswered (its probe now under way)."""
    quiet = await silent()
    client = RadiusClient([server(quiet)], timeout=0.2, retries=0, dead_time=60, status_server=True)
    with pytest.raises(RadiusTimeout):
        await client.send(builder())
    return quiet, client


def test_a_silent_server_is_held_off_once_its_status_server_goes_unanswered() -> None:
    async def main() -> None:
        quiet, client = await _timed_out_on_a_silent_server()
        label = f"127.0.0.1:{quiet.port}"
        assert not client.is_dead(label)  # not yet: its probe is under way
        await client.probes_done()
        assert client.is_dead(label)
        assert client.stats()[label].probes == 1 and client.stats()[label].probes_answered == 0
        with pytest.raises(RadiusUnavailable):
            await client.send(builder())
        assert [raw[0] for _, raw in quiet.received] == [1, 12]
        await client.aclose()
        quiet.close()

    asyncio.run(main())


@pytest.mark.parametrize("forgery", ["other-secret", "bad-message-authenticator"])
def test_a_forged_answer_to_status_server_keeps_nobody_in_service(forgery: str) -> None:
    """An Access-Accept to the probe under another secret, or with a wrong
    Message-Authenticator, is no evidence of life."""

    async def main() -> None:
        def forged(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
            if data[0] != RadiusCode.STATUS_SERVER:
                return None
            if forgery == "other-secret":
                return build_reply(ACCESS_ACCEPT, data, b"not the shared secret")
            return build_reply(ACCESS_ACCEPT, data, srv.secret, ma="bad")

        srv = await fake_server(forged)
        client = RadiusClient(
            [server(srv)], timeout=0.2, retries=0, dead_time=60, status_server=True
        )
        with pytest.raises(RadiusTimeout):
            await client.send(builder())
        await client.probes_done()
        assert client.is_dead(f"127.0.0.1:{srv.port}")
        await client.aclose()
        srv.close()

    asyncio.run(main())


def test_a_server_answering_only_status_server_is_held_off_while_another_serves() -> None:
    """A stuck back end answers Status-Server but no Access-Request: with
    another server in service it is held off all the same (found in review:
    every conversation waited out its timeouts on it before failing over).
    The probe spares only the last server in service."""

    async def main() -> None:
        stuck = await fake_server(_status_server_aware({b"alice", b"bob"}))
        healthy = await fake_server(challenge)
        client = probing(stuck, healthy)
        label, _ = await client.send(builder("alice"))
        assert label == f"127.0.0.1:{healthy.port}"
        await client.probes_done()
        assert client.is_dead(f"127.0.0.1:{stuck.port}")
        before = len(stuck.received)
        label, _ = await client.send(builder("bob"))
        assert label == f"127.0.0.1:{healthy.port}" and len(stuck.received) == before
        await client.aclose()
        stuck.close()
        healthy.close()

    asyncio.run(main())


def test_aclose_ends_the_probes_under_way() -> None:
    async def main() -> None:
        quiet, client = await _timed_out_on_a_silent_server()
        await client.aclose()  # its probe is under way
        await asyncio.wait_for(client.probes_done(), 1.0)
        quiet.close()

    asyncio.run(main())


def test_a_backup_whose_hold_off_ran_out_is_not_a_server_in_service() -> None:
    """Backup B was found dead once and nobody has tried it since its
    hold-off ran out (A serves everything); then one MN's slow realm times
    out on A, which answers Status-Server.  A stays in service: B, not
    heard from since it was found dead, is no server in service to fail
    over to.  Before, B counted as one, A was held off, the request failed
    over to B, B's probe went unanswered, and every MN got 503 for
    dead_time (found in review)."""

    async def main() -> None:
        now = [0.0]
        a = await fake_server(_status_server_aware({b"slow@upstream"}))
        b = await silent()
        client = RadiusClient(
            [server(a), server(b)],
            timeout=0.2,
            retries=0,
            dead_time=30,
            status_server=True,
            clock=lambda: time.monotonic() + now[0],
        )
        la, lb = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
        with pytest.raises(RadiusTimeout):
            await client.send(builder("x"), server=lb)
        await client.probes_done()
        assert client.is_dead(lb)
        now[0] += 31  # B's hold-off runs out; A serves everyone
        assert (await client.send(builder("alice")))[0] == la
        with pytest.raises(RadiusTimeout):
            await client.send(builder("slow@upstream"), server=la)
        await client.probes_done()
        assert not client.is_dead(la)
        assert client.stats()[la].probes_answered == 1
        assert (await client.send(builder("bob")))[0] == la
        await client.aclose()
        a.close()
        b.close()

    asyncio.run(main())


def test_an_answering_server_is_not_held_off_for_a_backup_nobody_has_heard_from() -> None:
    """The reviewer's scenario (twenty-ninth session): primary A answers
    Status-Server and every MN but one of a slow realm; backup B is dead
    and was never tried.  That MN times out on A, then on B.  A stays in
    service: B has shown no life, so it is no alternative.  Before, B
    counted as in service (never found dead), A was held off, B then was
    too, and every MN got 503 for dead_time."""

    async def main() -> None:
        a = await fake_server(_status_server_aware({b"slow@upstream"}))
        b = await silent()
        client = probing(a, b, retries=1)
        la, lb = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
        with pytest.raises(RadiusTimeout):
            await client.send(builder("slow@upstream"))
        await client.probes_done()
        assert not client.is_dead(la) and client.is_dead(lb)
        assert client.stats()[la].probes_answered == 1
        assert client.stats()[lb].probes_answered == 0
        assert [await served_by(client, u) for u in ("alice", "bob", "carol")] == [la] * 3
        await shut(client, a, b)

    asyncio.run(main())


def test_a_stuck_server_is_held_off_once_an_untried_backup_answers_status_server() -> None:
    """A stuck back end (answers Status-Server, no Access-Request) and a
    backup no request has reached yet: the backup is asked too, answers,
    and so the stuck one is held off -- the next MN goes to the backup."""

    async def main() -> None:
        stuck = await fake_server(_status_server_aware({b"alice", b"bob"}))
        backup = await fake_server(_status_server_aware(set()))
        client = probing(stuck, backup)
        ls, lb = f"127.0.0.1:{stuck.port}", f"127.0.0.1:{backup.port}"
        with pytest.raises(RadiusTimeout):
            await client.send(builder("alice"), server=ls)  # a conversation pinned to it
        await client.probes_done()
        assert client.is_dead(ls)
        assert [raw[0] for _, raw in backup.received] == [RadiusCode.STATUS_SERVER]
        assert client.stats()[lb].probes_answered == 1
        assert await served_by(client, "bob") == lb
        await shut(client, stuck, backup)

    asyncio.run(main())


def test_a_reply_to_another_request_during_the_probe_is_evidence_of_life() -> None:
    """A server that does not answer Status-Server (RFC 5997 makes it
    optional) but keeps answering other MNs: one MN's slow realm times
    out, the probe goes unanswered -- and bob, served while the probe
    waited, proves the server alive: not held off.  Before, it was held
    off, and the next MN got 503 for dead_time (found in review)."""

    def handler(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
        if data[0] == RadiusCode.STATUS_SERVER or dict(request_attrs(data))[1] == b"slow@x":
            return None
        return challenge(srv, data, addr)

    async def main() -> None:
        srv = await fake_server(handler)
        client = RadiusClient(
            [server(srv)], timeout=0.3, retries=0, dead_time=30, status_server=True
        )
        label = f"127.0.0.1:{srv.port}"
        with pytest.raises(RadiusTimeout):
            await client.send(builder("slow@x"))
        assert (await client.send(builder("bob")))[0] == label  # the probe under way
        await client.probes_done()
        assert not client.is_dead(label)
        assert client.stats()[label].probes_answered == 1
        assert (await client.send(builder("carol")))[0] == label
        await client.aclose()
        srv.close()

    asyncio.run(main())


def test_a_server_without_a_socket_fails_over_and_is_held_off() -> None:
    """The first server's name does not resolve: the request goes to the
    second, the first is held off (a line naming it and why), and the
    error is counted.  Before, the OSError escaped ``send`` and the
    healthy second server was never tried (found in review)."""

    async def main() -> None:
        good = await fake_server(challenge)
        client = RadiusClient(
            [RadiusServer("radius1.nonexistent.invalid", 1812, SECRET), server(good)],
            timeout=0.2,
            retries=0,
            dead_time=30,
        )
        bad = "radius1.nonexistent.invalid:1812"
        assert (await client.send(builder()))[0] == f"127.0.0.1:{good.port}"
        assert client.is_dead(bad) and client.stats()[bad].socket_errors == 1
        assert (await client.send(builder()))[0] == f"127.0.0.1:{good.port}"
        assert client.stats()[bad].socket_errors == 1  # held off: not tried again
        await client.aclose()
        good.close()

    asyncio.run(main())


def test_a_lone_server_without_a_socket_is_an_unanswered_request() -> None:
    async def main() -> None:
        client = RadiusClient([RadiusServer("radius1.nonexistent.invalid", 1812, SECRET)])
        with pytest.raises(RadiusTimeout, match="no socket to RADIUS server"):
            await client.send(builder())
        await client.aclose()

    asyncio.run(main())


def test_max_sockets_holds_while_requests_queue_on_a_silent_server() -> None:
    """1,000 requests at once to a silent server, max_sockets 1: one socket
    (256 Identifiers), the rest wait for an Identifier.  Before, each
    request queued on the socket-opening lock opened one more socket once
    the lock was its: 4 sockets for 1,000 (found in review)."""

    async def main() -> None:
        quiet = await silent()
        client = RadiusClient([server(quiet)], timeout=0.3, retries=0, max_sockets=1, dead_time=0)
        tasks = [asyncio.create_task(client.send(builder())) for _ in range(1000)]
        await asyncio.sleep(0.1)
        assert client.stats()[f"127.0.0.1:{quiet.port}"].sockets == 1
        await client.aclose()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RadiusError) for r in results)
        quiet.close()

    asyncio.run(main())


def test_close_ends_a_request_waiting_for_an_identifier_as_unanswered() -> None:
    """257 requests on one socket to a silent server: the 257th waits for an
    Identifier.  ``aclose`` ends it with RadiusError, like the others --
    before, it ended cancelled, though nobody had cancelled its task
    (found in review)."""

    async def main() -> None:
        quiet = await silent()
        client = RadiusClient([server(quiet)], timeout=5, retries=0, max_sockets=1)
        tasks = [asyncio.create_task(client.send(builder()))]
        await asyncio.sleep(0.05)  # its socket open: the next 256 share it
        tasks += [asyncio.create_task(client.send(builder())) for _ in range(256)]
        await asyncio.sleep(0.1)
        assert client.stats()[f"127.0.0.1:{quiet.port}"].sockets == 1
        await client.aclose()
        await asyncio.wait(tasks)
        assert not any(t.cancelled() for t in tasks)
        assert all(isinstance(t.exception(), RadiusError) for t in tasks)
        quiet.close()

    asyncio.run(main())


def test_a_waiter_woken_then_cancelled_passes_the_wake_up_on() -> None:
    """Two requests wait for an Identifier; one is freed and the first
    waiter woken -- and cancelled (its MN gone) before it runs.  The second
    waiter gets the Identifier; before, the wake-up was lost with the
    cancelled one and the Identifier waited for the next release (found in
    review)."""

    class Channel:
        closed = False

        def __init__(self) -> None:
            self.free = 0

        def allocate(self) -> int | None:
            if self.free:
                self.free -= 1
                return 7
            return None

        def has_free(self) -> bool:
            return self.free > 0

    async def main() -> Any:
        client = RadiusClient([RadiusServer("127.0.0.1", 1, SECRET)], max_sockets=1)
        st = client._servers[0]
        channel = Channel()
        st.channels.append(channel)  # type: ignore[arg-type]
        first = asyncio.create_task(client._acquire(st))
        second = asyncio.create_task(client._acquire(st))
        await asyncio.sleep(0)
        assert len(st.waiters) == 2
        channel.free = 1
        st.wake_one()  # the first is woken ...
        first.cancel()  # ... and cancelled before it runs
        for _ in range(3):
            await asyncio.sleep(0)
        assert first.cancelled()
        got = await asyncio.wait_for(second, 1)
        await client.aclose()
        return got

    channel, ident = asyncio.run(main())
    assert ident == 7
