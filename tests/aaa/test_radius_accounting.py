"""RADIUS accounting (mipsec.aaa.accounting) against fake neighbour servers, and its
wiring into the HAC (``[accounting]`` table -> registered on the plugin manager)."""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from radfake import ACCOUNTING_RESPONSE, FakeServer, build_reply, fake_server, request_attrs

from mipsec.aaa import accounting as accounting_module
from mipsec.aaa.accounting import AccountingFactory, RadiusAccounting
from mipsec.core import pluginmanager
from mipsec.core.config import validate_config
from mipsec.core.errors import ConfigError
from mipsec.core.hookspecs import PluginContext
from mipsec.core.labsetup import init_lab
from mipsec.core.roles.hac import HacService

SECRET = "acct-secret"
CTX = PluginContext(role="hac", base_dir=Path("."), config_file="hac.toml")
END = datetime(2030, 1, 1, tzinfo=UTC)


def answer(srv: FakeServer, data: bytes, addr: Any) -> bytes:
    return build_reply(ACCOUNTING_RESPONSE, data, srv.secret, ma="none")


def accounting(port: int, **opts: Any) -> RadiusAccounting:
    return AccountingFactory().create(
        {"servers": [{"host": "127.0.0.1", "port": port, "secret": SECRET}], "timeout": 5, **opts},
        CTX,
    )


def records(fake: FakeServer) -> list[dict[int, bytes]]:
    return [dict(request_attrs(d)) for _, d in fake.received]


def status(a: dict[int, bytes]) -> int:
    return int.from_bytes(a[40], "big")


def issue(acct: RadiusAccounting, spi: int = 0x1234ABCD, end: datetime = END) -> None:
    acct.mipsec_sa_issued(
        spi=spi,
        mn_id="alice@example.net",
        suite="AES_128_CBC_SHA256",
        scope=1,
        validity_end=end,
        ha_id="ha1",
        peer="[2001:db8::5]:40000",
    )


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_start_and_stop_attributes() -> None:
    async def main() -> list[dict[int, bytes]]:
        fake = await fake_server(answer, secret=SECRET.encode())
        acct = accounting(fake.port, nas_ip_address="192.0.2.1")
        issue(acct, 0x1234ABCD)
        issue(acct, 0x00000042)
        issue(acct, 0x00000043)
        issue(acct, 0x00000044)
        acct.mipsec_sa_expired(spi=0x1234ABCD, mn_id="alice@example.net", validity_end=END)
        acct.mipsec_sa_withdrawn(
            spi=0x42, mn_id="alice@example.net", ha_id="ha1", reason="superseded"
        )
        acct.mipsec_sa_withdrawn(spi=0x43, mn_id="alice@example.net", ha_id="ha1", reason="revoked")
        acct.mipsec_sa_withdrawn(
            spi=0x99, mn_id="bob", ha_id="ha1", reason="provisioning-failed"
        )  # never started: no Stop
        await acct.flush(20)
        assert acct.stats.sent == 7 and acct.stats.dropped == 0
        await acct.aclose()
        fake.close()
        return records(fake)

    recs = asyncio.run(main())
    starts = [r for r in recs if status(r) == 1]
    stops = {r[44]: r for r in recs if status(r) == 2}
    assert len(starts) == 4 and len(stops) == 3
    s = next(r for r in starts if r[44] == b"1234abcd")  # Acct-Session-Id = the SPI in hex
    assert s[1] == b"alice@example.net" and s[32] == b"mipsec-hac" and s[4] == bytes([192, 0, 2, 1])
    assert s[31] == b"[2001:db8::5]:40000" and s[30] == b"ha1"
    assert 55 in s and 46 not in s and 49 not in s
    cause = {k: int.from_bytes(v[49], "big") for k, v in stops.items()}
    assert cause == {b"1234abcd": 5, b"00000042": 10, b"00000043": 6}
    assert all(46 in r for r in stops.values())  # Acct-Session-Time


def test_hooks_never_block_and_wait_for_a_loop() -> None:
    # Called with no event loop at all (as a synchronous caller would): queued only.
    acct = accounting(9)  # nothing listens there; nothing is sent yet either
    issue(acct)
    assert acct.stats.queued == 1 and acct.client.stats()["127.0.0.1:9"].requests == 0

    async def main() -> RadiusAccounting:
        fake = await fake_server(answer, secret=SECRET.encode())
        a = accounting(fake.port)
        issue(a)  # outside a loop task would be the same: hooks only queue
        a.mipsec_sa_expired(spi=0x1234ABCD, mn_id="alice@example.net", validity_end=END)
        assert a.stats.sent == 0  # returned before anything was sent
        await a.flush(20)
        await a.aclose()
        fake.close()
        return a

    assert asyncio.run(main()).stats.sent == 2


def test_records_of_one_sa_in_order() -> None:
    def slow_start(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
        if status(dict(request_attrs(data))) == 1 and not srv.state.get("dropped"):
            srv.state["dropped"] = True  # the Start's first copy is lost
            return None
        srv.state.setdefault("answered", []).append(status(dict(request_attrs(data))))
        return answer(srv, data, addr)

    async def main() -> list[int]:
        fake = await fake_server(slow_start, secret=SECRET.encode())
        acct = accounting(fake.port, timeout=0.2, retries=3)
        issue(acct)
        acct.mipsec_sa_expired(spi=0x1234ABCD, mn_id="alice@example.net", validity_end=END)
        await acct.flush(20)
        await acct.aclose()
        fake.close()
        return [status(r) for r in records(fake)]

    seen = asyncio.run(main())
    # The Start went out at least twice (its first copy was lost) and the
    # Stop only after the Start was answered.
    assert seen.count(1) >= 2 and seen.count(2) >= 1
    assert max(i for i, s in enumerate(seen) if s == 1) < seen.index(2)


def test_retry_after_an_outage_with_acct_delay_time() -> None:
    def outage(srv: FakeServer, data: bytes, addr: Any) -> bytes | None:
        return None if len(srv.received) == 1 else answer(srv, data, addr)

    async def main() -> list[tuple[Any, bytes]]:
        fake = await fake_server(outage, secret=SECRET.encode())
        acct = accounting(fake.port, timeout=0.2, retries=0, dead_time=0.5)
        issue(acct)
        await acct.flush(30)
        assert acct.stats.sent == 1
        await acct.aclose()
        fake.close()
        return fake.received

    received = asyncio.run(main())
    first, last = received[0][1], received[-1][1]
    assert 41 not in dict(request_attrs(first))
    delay = int.from_bytes(dict(request_attrs(last))[41], "big")  # Acct-Delay-Time
    assert delay >= 1
    assert first[4:20] != last[4:20]  # a new packet, not a retransmission


def test_give_up_after(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> RadiusAccounting:
        fake = await fake_server(lambda s, d, a: None, secret=SECRET.encode())
        acct = accounting(fake.port, timeout=0.2, retries=0, give_up_after=0.5)
        issue(acct)
        await acct.flush(30)
        await acct.aclose()
        fake.close()
        return acct

    with caplog.at_level(logging.WARNING, logger="mipsec.aaa.accounting"):
        acct = asyncio.run(main())
    assert acct.stats.dropped == 1 and acct.stats.sent == 0
    assert any("spi=1234abcd dropped" in r.getMessage() for r in caplog.records)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_records_unsent_at_stop_are_counted_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Every server silent at stop: after one request's budget the records
    still queued are lost (no spool), and the operator reads how many."""

    async def main() -> RadiusAccounting:
        fake = await fake_server(lambda s, d, a: None, secret=SECRET.encode())
        acct = accounting(fake.port, timeout=0.2, retries=0, give_up_after=3600)
        for spi in (1, 2, 3):
            issue(acct, spi)
        await acct.aclose()
        fake.close()
        return acct

    with caplog.at_level(logging.WARNING, logger="mipsec.aaa.accounting"):
        acct = asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "not sent at stop" in r.getMessage()]
    assert lines == ["accounting: 3 record(s) not sent at stop (no server answered within "
                     "1 s): lost, there is no spool on disk"]  # fmt: skip
    assert acct.stats.dropped == 3 and acct.stats.sent == 0


def test_queue_limit_drops_the_oldest() -> None:
    acct = accounting(9, queue_limit=2)
    for spi in (1, 2, 3):
        issue(acct, spi)
    assert acct.stats.dropped == 1 and [r.spi for r in acct._queue] == [2, 3]


class _DeadClient:
    """A RADIUS client whose every server is held off (the accounting
    server down): each record is retried until given up."""

    timeout = 2.0
    retries = 1
    servers = ["x"]

    async def send(self, build: Any) -> Any:
        from mipsec.aaa.radius import RadiusUnavailable

        raise RadiusUnavailable(30)

    async def aclose(self) -> None:
        pass


def test_a_down_server_holds_at_most_queue_limit_records() -> None:
    """The accounting server down, 5,000 Starts against ``queue_limit`` 1,000:
    at most 1,000 records are held -- 256 being retried, the rest waiting
    -- and the rest dropped, counted, in a few log lines.  Before, every
    record became a retrying task at once and the limit bounded nothing
    (50,000 Starts held 176 MB; found in review)."""
    from mipsec.aaa.accounting import IN_FLIGHT, AccountingOptions

    async def main() -> tuple[int, int, int]:
        opts = AccountingOptions(servers=[{"host": "h", "secret": "s"}], queue_limit=1000)
        acct = RadiusAccounting(_DeadClient(), opts)  # type: ignore[arg-type]
        for spi in range(1, 5001):
            issue(acct, spi)
            if spi % 500 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        held = (len(acct._queue), len(acct._tasks), acct.stats.dropped)
        for task in [*acct._tasks, acct._runner]:
            if task is not None:
                task.cancel()
        return held

    waiting, in_flight, dropped = asyncio.run(main())
    assert in_flight == IN_FLIGHT and waiting + in_flight == 1000
    assert dropped == 4000


def test_records_given_up_during_an_outage_log_a_few_lines_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every server down longer than give_up_after: 300 records given up.
    A few WARNING lines, then one that counts the rest (the LineBurst of the
    queue-full drops); before the twenty-ninth session, one line each."""

    async def main() -> RadiusAccounting:
        quiet = await fake_server(lambda s, d, a: None, secret=SECRET.encode())
        acct = accounting(quiet.port, timeout=0.1, retries=0, dead_time=1.0, give_up_after=0.5)
        for spi in range(1, 301):
            issue(acct, spi)
        for _ in range(200):
            if acct.stats.dropped == 300:
                break
            await asyncio.sleep(0.05)
        await acct.aclose()  # says the count of a burst still open
        quiet.close()
        return acct

    with caplog.at_level(logging.WARNING, logger="mipsec.aaa.accounting"):
        acct = asyncio.run(main())
    assert acct.stats.dropped == 300 and acct.stats.sent == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "mipsec.aaa.accounting"]
    given_up = [m for m in lines if "spi=" in m]  # one line per record
    counted = [m for m in lines if "more accounting records dropped" in m]
    assert 1 <= len(given_up) <= 48 and counted  # at most 16 a second, then a count
    assert len(given_up) + sum(int(m.split()[0]) for m in counted) == 300


def test_a_full_queue_drops_an_interim_before_a_start() -> None:
    acct = accounting(9, queue_limit=3)
    issue(acct, 1)
    acct._queue_record(3, 1)  # an Interim-Update
    issue(acct, 2)
    issue(acct, 3)  # full: the interim goes, not the oldest Start
    assert [(r.status, r.spi) for r in acct._queue] == [(1, 1), (1, 2), (1, 3)]
    assert acct.stats.dropped == 1


def test_interims_stop_at_the_sas_end_when_another_hac_ended_it() -> None:
    """HACs sharing a store: another HAC superseded or expired this one's SA
    and sent its Stop.  Past the SA's validity end this HAC sends no more
    Interim-Updates for it, and once the grace for its own Stop has passed
    too it forgets the session; before, it sent them for good (found in
    review).  Since the twenty-ninth session the session waits out that
    grace first (here 0.3 s instead of two expiry intervals and 10 s):
    until then it was forgotten at the first tick past the end."""

    async def main() -> tuple[list[int], int]:
        fake = await fake_server(answer, secret=SECRET.encode())
        acct = accounting(fake.port, interim_interval=0.05)
        acct._grace = lambda: 0.3
        issue(acct, 7, soon(0.3))
        await asyncio.sleep(1.0)
        sent = [status(r) for r in records(fake)]
        left = len(acct._sessions)
        await acct.aclose()
        fake.close()
        return sent, left

    sent, left = asyncio.run(main())
    assert sent[0] == 1 and 3 in sent and 2 not in sent
    assert 3 <= len(sent) <= 12  # interims while it lived, then none: ~0.3 s of 0.05-s ticks
    assert left == 0


def test_a_stop_after_an_interim_tick_past_the_end_keeps_every_attribute() -> None:
    """The reviewer's scenario: the SA's validity end passes, an interim tick
    comes, and only then the HAC's expiry sweep (every expiry_interval)
    says the SA expired.  The session waited for that Stop, which carries
    Acct-Session-Time and both station ids; before the twenty-ninth
    session the tick had forgotten it, and the Stop carried neither."""

    async def main() -> tuple[list[int], dict[int, bytes], int]:
        fake = await fake_server(answer, secret=SECRET.encode())
        acct = accounting(fake.port, interim_interval=0.1)
        issue(acct, 9, soon(0.25))
        await asyncio.sleep(0.6)  # ticks past the end; the sweep has not run yet
        waiting = len(acct._sessions)
        acct.mipsec_sa_expired(spi=9, mn_id="alice@example.net", validity_end=END)
        await acct.flush(20)
        await acct.aclose()
        fake.close()
        recs = records(fake)
        return [status(r) for r in recs], recs[-1], waiting

    sent, stop, waiting = asyncio.run(main())
    assert waiting == 1 and sent[0] == 1 and sent[-1] == 2
    assert stop[31] == b"[2001:db8::5]:40000" and stop[30] == b"ha1"
    assert int.from_bytes(stop[46], "big") == 0  # up to the validity end (0.25 s), not the sweep
    assert int.from_bytes(stop[49], "big") == 5


def test_acct_session_time_counts_up_to_the_validity_end() -> None:
    """RFC 2866 §5.7: the service ended at the SA's validity end; the sweep
    that sends the Stop comes up to an expiry_interval later.  Started 100 s
    ago, ended 40 s ago: 60 s of service (it said 100 before the
    twenty-ninth session)."""
    acct = accounting(9)
    t = [1000.0]
    acct._clock = lambda: t[0]
    issue(acct, 5, datetime.now(UTC) - timedelta(seconds=40))
    t[0] += 100
    acct.mipsec_sa_expired(spi=5, mn_id="alice@example.net", validity_end=END)
    assert dict(acct._queue[-1].attrs)["Acct-Session-Time"] in (59, 60)  # whole seconds


def test_without_interims_ended_sessions_are_forgotten_after_the_grace() -> None:
    """interim_interval = 0: the sessions of SAs another HAC ended are still
    forgotten, a grace after their end (before the twenty-ninth session
    only the interim loop forgot them, and without interims they stayed)."""

    async def main() -> int:
        fake = await fake_server(answer, secret=SECRET.encode())
        acct = accounting(fake.port)
        acct._grace = lambda: 0.2
        issue(acct, 11, soon(0.1))
        issue(acct, 12)  # lives on
        await asyncio.sleep(0.8)
        left = sorted(acct._sessions)
        await acct.aclose()
        fake.close()
        return left  # type: ignore[return-value]

    assert asyncio.run(main()) == [12]


def test_ended_sessions_waiting_for_their_stop_are_capped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At most ENDED_KEEP sessions past their end wait for a Stop; beyond,
    those that ended first are forgotten, in one WARNING with the count."""
    monkeypatch.setattr(accounting_module, "ENDED_KEEP", 2)
    acct = accounting(9)
    now = datetime.now(UTC)
    for spi, ago in ((1, 4), (2, 1), (3, 3), (4, 2)):
        issue(acct, spi, now - timedelta(seconds=ago))
    issue(acct, 5)  # lives on
    with caplog.at_level(logging.WARNING, logger="mipsec.aaa.accounting"):
        acct._forget_ended(time.time())
    assert sorted(acct._sessions) == [2, 4, 5]  # 1 and 3 ended first
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "the 2 that ended first forgotten" in lines[0]


def test_a_rotated_secret_file_makes_accounting_stale(tmp_path: Path) -> None:
    """Accounting is built at start; a ``secret_file`` rotated since is said
    (``stale``), and a HAC reload refuses naming ``accounting`` -- before,
    the reload reported no change and every record then failed to verify
    (found in review)."""
    secret = tmp_path / "acct.secret"
    secret.write_text("first\n")
    secret.chmod(0o600)
    ctx = PluginContext(role="hac", base_dir=tmp_path, config_file="hac.toml")
    options = {"servers": [{"host": "127.0.0.1", "secret_file": "acct.secret"}]}
    acct = AccountingFactory().create(options, ctx)
    assert acct.stale() is False
    secret.write_text("rotated\n")
    assert acct.stale() is True


def test_interim_updates() -> None:
    async def main() -> list[int]:
        fake = await fake_server(answer, secret=SECRET.encode())
        acct = accounting(fake.port, interim_interval=0.05)
        issue(acct)
        for _ in range(400):
            if 3 in [status(r) for r in records(fake)]:
                break
            await asyncio.sleep(0.05)
        acct.mipsec_sa_expired(spi=0x1234ABCD, mn_id="alice@example.net", validity_end=END)
        await acct.flush(20)
        await acct.aclose()
        fake.close()
        return [status(r) for r in records(fake)]

    seen = asyncio.run(main())
    assert seen[0] == 1 and 3 in seen and seen[-1] == 2
    assert all(r == 3 for r in seen[1:-1])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"servers": [{"host": "h", "secret": "s"}], "interim_interval": -1}, "interim_interval:"),
        ({"servers": [{"host": "h", "secret": "s"}], "give_up_after": 0}, "give_up_after:"),
        ({"servers": [{"host": "h"}]}, "servers[0]: exactly one of"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        AccountingFactory().create(options, CTX)
    assert message in str(exc.value)


def test_default_port_is_1813() -> None:
    acct = AccountingFactory().create({"servers": [{"host": "127.0.0.1", "secret": "s"}]}, CTX)
    assert acct.client.servers == ["127.0.0.1:1813"]


# ------------------------------------------------------------------ HAC wiring


def _hac_data(tmp_path: Path) -> dict[str, Any]:
    info = init_lab(tmp_path / "lab", hac_port=1, ha_port=2)
    path = Path(info["hac"]["config"])
    return tomllib.loads(path.read_text()), path  # type: ignore[return-value]


def test_hac_registers_the_accounting_backend(tmp_path: Path) -> None:
    data, path = _hac_data(tmp_path)  # type: ignore[misc]

    async def main() -> list[dict[int, bytes]]:
        fake = await fake_server(answer, secret=SECRET.encode())
        data["accounting"] = {
            "backend": "radius",
            "servers": [{"host": "127.0.0.1", "port": fake.port, "secret": SECRET}],
        }
        cfg = validate_config(data, "hac", file=str(path), base=path.parent)
        svc = HacService(cfg, config_file=str(path))  # type: ignore[arg-type]
        assert isinstance(svc.accounting, RadiusAccounting)
        assert svc.pm.get_plugin("accounting") is svc.accounting
        # The event reaches the accounting object through the plugin manager.
        svc.pm.hook.mipsec_sa_issued(
            spi=7,
            mn_id="alice@example.net",
            suite="x",
            scope=1,
            validity_end=END,
            ha_id="ha1",
            peer="127.0.0.1:1",
        )
        await svc.stop()  # flushes the Start, then unregisters
        assert svc.pm.get_plugin("accounting") is None
        fake.close()
        return records(fake)

    recs = asyncio.run(main())
    assert len(recs) == 1 and status(recs[0]) == 1 and recs[0][44] == b"00000007"


def test_the_stop_grace_follows_the_hacs_expiry_interval(tmp_path: Path) -> None:
    """An expired SA's Stop comes from the HAC's sweep, every
    ``[hac] expiry_interval``: accounting waits two of them and 10 s, read
    live (a reload may change the interval)."""
    data, path = _hac_data(tmp_path)  # type: ignore[misc]
    data["hac"]["expiry_interval"] = 7
    data["accounting"] = {"backend": "radius", "servers": [{"host": "127.0.0.1", "secret": "s"}]}
    cfg = validate_config(data, "hac", file=str(path), base=path.parent)
    svc = HacService(cfg, config_file=str(path))  # type: ignore[arg-type]
    try:
        assert svc.accounting._grace() == 24
        data["hac"]["expiry_interval"] = 20  # what a reload swaps in
        svc.cfg = validate_config(data, "hac", file=str(path), base=path.parent)  # type: ignore[assignment]
        assert svc.accounting._grace() == 50
    finally:
        asyncio.run(svc.stop())


def test_hac_without_or_with_unknown_accounting(tmp_path: Path) -> None:
    data, path = _hac_data(tmp_path)  # type: ignore[misc]
    cfg = validate_config(data, "hac", file=str(path), base=path.parent)
    svc = HacService(cfg, config_file=str(path))  # type: ignore[arg-type]
    assert svc.accounting is None and svc.pm.get_plugin("accounting") is None
    svc.store.close()
    svc.credentials.close()
    data["accounting"] = {"backend": "nope"}
    cfg = validate_config(data, "hac", file=str(path), base=path.parent)
    with pytest.raises(ConfigError) as exc:
        HacService(cfg, config_file=str(path))  # type: ignore[arg-type]
    assert "accounting.backend" in str(exc.value) and "nope" in str(exc.value)
    data["accounting"] = {"backend": "radius", "servers": [{"host": "h"}]}
    cfg = validate_config(data, "hac", file=str(path), base=path.parent)
    with pytest.raises(ConfigError) as exc:
        HacService(cfg, config_file=str(path))  # type: ignore[arg-type]
    assert str(path) in str(exc.value) and "servers[0]: exactly one of" in str(exc.value)


def test_accounting_registry() -> None:
    pm = pluginmanager.make_plugin_manager()
    assert "radius" in pluginmanager.registry(pm, "mipsec_accounting_backends")


def test_a_reload_after_the_accounting_secret_was_rotated_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """The accounting ``secret_file`` rewritten with another secret: the
    HAC's reload is refused, naming ``accounting`` and why (accounting is
    built at start only), and the HAC goes on; before, the reload said
    nothing changed (found in review)."""
    from mipsec.core.roles.hac_ops import HacOps

    text = Path(_hac_data(tmp_path)[1]).read_text()  # type: ignore[index]
    path = tmp_path / "lab" / "hac.toml"
    secret = tmp_path / "lab" / "acct.secret"
    secret.write_text("first\n")
    secret.chmod(0o600)
    path.write_text(
        text + '\n[accounting]\nbackend = "radius"\n'
        'servers = [{ host = "127.0.0.1", port = 1813, secret_file = "acct.secret" }]\n'
    )
    data = tomllib.loads(path.read_text())

    async def main() -> str:
        cfg = validate_config(data, "hac", file=str(path), base=path.parent)
        svc = HacService(cfg, config_file=str(path))  # type: ignore[arg-type]
        ops = HacOps(svc, str(path))
        try:
            assert ops._apply() == []  # nothing changed yet
            secret.write_text("rotated\n")
            with pytest.raises(ConfigError) as err:
                ops._apply()
            return str(err.value)
        finally:
            await svc.stop()

    message = asyncio.run(main())
    assert "accounting" in message and "only with a restart" in message
