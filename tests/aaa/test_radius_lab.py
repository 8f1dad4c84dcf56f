"""The RADIUS client, the ``radius`` back end and accounting against the real lab
(FreeRADIUS 3.2 on loopback, ``../shared/aaa-lab``).  The EAP peers are
test-only (EAP-MD5, an EAP-TLS peer on pyOpenSSL); fake neighbours stand in
only where FreeRADIUS cannot be made to misbehave (a dead port, a relay that
stops forwarding)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from aaalab import AaaLab
from eaptls_peer import EapTlsPeer
from pyrad.packet import AuthPacket
from radfake import identity_response, md5_peer

from mipsec.aaa.accounting import AccountingFactory, RadiusAccounting
from mipsec.aaa.codec import encode_access_request
from mipsec.aaa.dictionary import load_dictionary
from mipsec.aaa.passthrough import RadiusBackendFactory, RadiusEapBackend
from mipsec.core.eap.backend import BackendVerdict, EapBackendStep, EapSessionContext
from mipsec.core.hookspecs import PluginContext
from mipsec.core.wire.eap import EapCode, decode_eap

pytestmark = pytest.mark.timeout(900)  # the first test may install and start the lab

CTX = PluginContext(role="hac", base_dir=Path("."), config_file="hac.toml")
USER, PASSWORD = "lab-eap", b"lab-eap-secret"


def make_backend(servers: list[dict[str, Any]], **opts: Any) -> RadiusEapBackend:
    return RadiusBackendFactory().create({"servers": servers, **opts}, CTX)


async def conversation(b: RadiusEapBackend, identity: str, peer: Any) -> list[EapBackendStep]:
    """A whole EAP conversation through one back-end session."""
    c = EapSessionContext(mn_id=identity, identity=identity, peer="127.0.0.1:40000")
    s = b.session(c)
    steps = [await s.start(identity_response(identity))]
    while steps[-1].verdict is BackendVerdict.CONTINUE and len(steps) < 40:
        steps.append(await s.receive(peer(steps[-1].eap)))
    s.close()
    return steps


def dead_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ EAP-MD5


def test_eap_md5_success(aaa_lab: AaaLab) -> None:
    async def main() -> list[EapBackendStep]:
        b = make_backend([aaa_lab.server()], timeout=2)
        try:
            return await conversation(b, USER, md5_peer(PASSWORD))
        finally:
            await b.aclose()

    steps = asyncio.run(main())
    # Identity -> EAP-TLS Start (the lab's default) -> Nak -> MD5-Challenge -> Accept.
    assert [s.verdict for s in steps[:-1]] == [BackendVerdict.CONTINUE] * (len(steps) - 1)
    assert any(decode_eap(s.eap).type == 4 for s in steps[:-1])
    done = steps[-1]
    assert done.verdict is BackendVerdict.SUCCESS, done.reason
    assert decode_eap(done.eap).code is EapCode.SUCCESS
    assert done.identity == USER  # FreeRADIUS returns the User-Name
    assert done.msk is None  # EAP-MD5 derives no key: the MHAuth layer refuses it by default


def test_eap_md5_wrong_password_is_rejected(aaa_lab: AaaLab) -> None:
    async def main() -> list[EapBackendStep]:
        b = make_backend([aaa_lab.server()], timeout=2)
        try:
            return await conversation(b, USER, md5_peer(b"not-the-password"))
        finally:
            await b.aclose()

    done = asyncio.run(main())[-1]
    assert done.verdict is BackendVerdict.FAILURE and "Access-Reject" in done.reason
    assert decode_eap(done.eap).code is EapCode.FAILURE


def test_fifty_concurrent_conversations(aaa_lab: AaaLab) -> None:
    """50 MNs at once through one back end: every one gets its own answer."""

    async def main() -> list[list[EapBackendStep]]:
        b = make_backend([aaa_lab.server()], timeout=5)
        try:
            return await asyncio.gather(
                *(
                    conversation(b, USER, md5_peer(PASSWORD if i % 5 else b"wrong"))
                    for i in range(50)
                )
            )
        finally:
            await b.aclose()

    results = asyncio.run(main())
    verdicts = [steps[-1].verdict for steps in results]
    assert verdicts == [
        BackendVerdict.FAILURE if i % 5 == 0 else BackendVerdict.SUCCESS for i in range(50)
    ]


# ------------------------------------------------------------------ EAP-TLS: a real MSK


def test_eap_tls_msk_from_mppe_keys_matches_the_peer(aaa_lab: AaaLab) -> None:
    env = aaa_lab.env
    peer = EapTlsPeer(env["CA_CERT"], env["CLIENT_CERT"], env["CLIENT_KEY"])

    async def main() -> list[EapBackendStep]:
        b = make_backend([aaa_lab.server()], timeout=3)
        try:
            return await conversation(b, "mn1@lab.test", peer.answer)
        finally:
            await b.aclose()

    steps = asyncio.run(main())
    done = steps[-1]
    assert done.verdict is BackendVerdict.SUCCESS, done.reason
    assert peer.done
    # FreeRADIUS split its certificate flight over several EAP-Requests, each
    # carried in several EAP-Message attributes that were joined in order.
    assert max(peer.requests_seen) > 253 and max(peer.requests_seen) <= 1400
    assert done.msk is not None and len(done.msk) == 64
    assert done.msk == peer.msk()  # MS-MPPE-Recv-Key || MS-MPPE-Send-Key, all 64 octets


def test_aka_identity_is_proxied_to_the_aka_server(aaa_lab: AaaLab) -> None:
    """The full NAI goes out as User-Name, so FreeRADIUS proxies the 3GPP realm
    to hostapd, whose EAP-AKA server answers with an AKA request (type 23)."""
    if "AKA_AUTH_PORT" not in aaa_lab.env:
        pytest.skip("this lab runs without its EAP-AKA server (AAA_LAB_AKA=0)")
    nai = f"0001010000000001@{aaa_lab.env['AKA_REALM']}"

    async def main() -> EapBackendStep:
        b = make_backend([aaa_lab.server()], timeout=3)
        s = b.session(EapSessionContext(mn_id=nai, identity=nai, peer="127.0.0.1:40000"))
        try:
            return await s.start(identity_response(nai))
        finally:
            s.close()
            await b.aclose()

    step = asyncio.run(main())
    assert step.verdict is BackendVerdict.CONTINUE, step.reason
    assert decode_eap(step.eap).type == 23  # EAP-AKA (AKA-Challenge or AKA-Identity)


# ------------------------------------------------------------------ what the server requires


def test_server_drops_eap_without_message_authenticator(aaa_lab: AaaLab) -> None:
    eap = identity_response(USER)
    bare = AuthPacket(
        code=1,
        id=1,
        secret=aaa_lab.secret.encode(),
        authenticator=os.urandom(16),
        dict=load_dictionary(),
    )
    bare["User-Name"] = USER
    bare[79] = [eap]  # EAP-Message and no Message-Authenticator
    signed = encode_access_request(2, aaa_lab.secret.encode(), [("User-Name", USER)], eap=eap)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", aaa_lab.auth_port))
        s.settimeout(10)
        s.send(bare.RequestPacket())
        s.send(signed.raw)
        first = s.recv(4096)
        s.settimeout(0.5)
        late = []
        try:
            late.append(s.recv(4096))
        except TimeoutError:
            pass
    # The signed request was answered; the unsigned one, sent before it, never.
    assert first[1] == 2 and first[0] == 11
    assert all(r[1] != 1 for r in late)


def test_wrong_shared_secret_is_504_and_says_why(aaa_lab: AaaLab) -> None:
    async def main() -> list[EapBackendStep]:
        b = make_backend([aaa_lab.server(secret="not-testing123")], timeout=0.5, retries=1)
        try:
            return await conversation(b, USER, md5_peer(PASSWORD))
        finally:
            await b.aclose()

    step = asyncio.run(main())[0]
    # FreeRADIUS drops a request whose Message-Authenticator does not verify.
    assert step.verdict is BackendVerdict.UNAVAILABLE and step.status == 504
    assert "not sharing our secret" in step.reason


# ------------------------------------------------------------------ faults and failover


class _Relay(asyncio.DatagramProtocol):
    """A UDP relay in front of FreeRADIUS that forwards only the first ``limit``
    requests (the server "stops answering" mid-conversation)."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.upstream_port, self.limit = upstream_port, limit
        self.seen: set[bytes] = set()
        self.transport: Any = None
        self.upstream: Any = None
        self.client: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        key = data[:2] + data[4:20]  # a retransmission is the same request
        if key not in self.seen and len(self.seen) >= self.limit:
            return
        self.seen.add(key)
        self.client = addr
        self.upstream.sendto(data)

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        relay = self

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay.transport.sendto(data, relay.client)

        self.upstream, _ = await loop.create_datagram_endpoint(
            Up, remote_addr=("127.0.0.1", self.upstream_port)
        )
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        return int(self.transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        self.transport.close()
        self.upstream.close()


def test_server_stops_answering_mid_conversation_is_504(aaa_lab: AaaLab) -> None:
    async def main() -> list[EapBackendStep]:
        relay = _Relay(aaa_lab.auth_port, limit=2)
        port = await relay.start()
        b = make_backend([aaa_lab.server(port=port)], timeout=1, retries=1)
        try:
            return await conversation(b, USER, md5_peer(PASSWORD))
        finally:
            await b.aclose()
            relay.close()

    steps = asyncio.run(main())
    assert [s.verdict for s in steps] == [
        BackendVerdict.CONTINUE,
        BackendVerdict.CONTINUE,
        BackendVerdict.UNAVAILABLE,
    ]
    assert steps[-1].status == 504 and "no answer" in steps[-1].reason
    assert decode_eap(steps[-1].eap).code is EapCode.FAILURE


def test_failover_to_second_server_and_hold_off(aaa_lab: AaaLab) -> None:
    dead = dead_udp_port()

    async def main() -> None:
        b = make_backend(
            [aaa_lab.server(port=dead), aaa_lab.server()], timeout=1, retries=1, dead_time=300
        )
        try:
            done = (await conversation(b, USER, md5_peer(PASSWORD)))[-1]
            assert done.verdict is BackendVerdict.SUCCESS, done.reason
            dead_label, lab_label = b.client.servers
            stats = b.client.stats()
            assert stats[dead_label].requests == 1 and stats[dead_label].retransmissions == 1
            await b.client.probes_done()  # its Status-Server went unanswered too
            assert b.client.is_dead(dead_label) and stats[dead_label].probes == 1
            # Hold-off: the next conversation goes straight to the live server.
            done = (await conversation(b, USER, md5_peer(PASSWORD)))[-1]
            assert done.verdict is BackendVerdict.SUCCESS
            assert stats[dead_label].requests == 1 and stats[dead_label].retransmissions == 1
            assert stats[lab_label].timeouts == 0 and stats[lab_label].replies >= 6
        finally:
            await b.aclose()

    asyncio.run(main())


def test_freeradius_answers_our_status_server_and_it_verifies(aaa_lab: AaaLab) -> None:
    """The probe a silent server gets before it is held off (RFC 5997):
    FreeRADIUS (``status_server = yes``, its default) answers it with an
    Access-Accept whose Response Authenticator verifies (it carries no
    Message-Authenticator: verify_reply does not ask one of a Status-Server's
    answer), so a live server is never held off for one conversation its
    proxied upstream lost."""
    import socket

    from mipsec.aaa.codec import RadiusCode, encode_status_server, verify_reply

    request = encode_status_server(42, aaa_lab.secret.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(request.raw, ("127.0.0.1", aaa_lab.auth_port))
        raw = sock.recv(4096)
    reply = verify_reply(raw, request, aaa_lab.secret.encode())
    assert reply[0] == RadiusCode.ACCESS_ACCEPT and reply[1] == 42
    with pytest.raises(Exception, match="Response Authenticator"):
        verify_reply(raw, request, b"another secret")


def test_every_server_dead_is_503(aaa_lab: AaaLab) -> None:
    async def main() -> list[EapBackendStep]:
        b = make_backend(
            [aaa_lab.server(port=dead_udp_port()), aaa_lab.server(port=dead_udp_port())],
            timeout=0.2,
            retries=0,
            dead_time=60,
        )
        try:
            first = await conversation(b, USER, md5_peer(PASSWORD))
            await b.client.probes_done()
            second = await conversation(b, USER, md5_peer(PASSWORD))
            return first + second
        finally:
            await b.aclose()

    first, second = asyncio.run(main())
    assert first.status == 504
    assert second.status == 503 and second.retry_after is not None


# ------------------------------------------------------------------ accounting


def test_accounting_start_interim_stop(aaa_lab: AaaLab) -> None:
    from datetime import UTC, datetime

    async def main() -> RadiusAccounting:
        acct = AccountingFactory().create(
            {
                "servers": [
                    {"host": "127.0.0.1", "port": aaa_lab.acct_port, "secret": aaa_lab.secret}
                ],
                "timeout": 2,
            },
            CTX,
        )
        end = datetime.now(UTC)
        acct.mipsec_sa_issued(
            spi=0x1234ABCD,
            mn_id="lab-eap",
            suite="AES_128_CBC_SHA256",
            scope=1,
            validity_end=end,
            ha_id="ha1",
            peer="127.0.0.1:4000",
        )
        acct._queue_record(3, 0x1234ABCD)  # an Interim-Update, as the interval timer does
        acct.mipsec_sa_expired(spi=0x1234ABCD, mn_id="lab-eap", validity_end=end)
        await acct.flush(30)
        await acct.aclose()
        return acct

    acct = asyncio.run(main())
    assert acct.stats.sent == 3 and acct.stats.dropped == 0  # three Accounting-Responses
    st = next(iter(acct.client.stats().values()))
    assert st.replies == 3 and st.unverifiable == 0
