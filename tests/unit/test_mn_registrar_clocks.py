"""The MN's registration shell (``Registrar``) when its host is suspended
and when its wall clock is stepped, against an HA answering on a real UDP
socket; the clocks are injected.

A suspend moves the wall clock and CLOCK_BOOTTIME together (the monotonic
clock stops): the timers act at once on waking, and nothing is said.  A
step moves the wall clock alone: one WARNING, and a step ahead brings the
re-bootstrap forward when, by the new time, the SA is near its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from mipsec.core.config import MNConfig, validate_config
from mipsec.core.forwarding import MnForwarder
from mipsec.core.issuer import new_sa
from mipsec.core.model import BootstrapData, IssuedSA
from mipsec.core.roles.mn import Registrar, mn_clock
from mipsec.core.suites import SUITES, Suite
from mipsec.core.wire import mh
from mipsec.core.wire.esp import NEXT_HEADER_MH, PTYPE_DATA, PTYPE_MH, InboundSA, OutboundSA

HOA = IPv6Address("2001:db8:1::7")
HAA = IPv6Address("::1")


class Clocks:
    """The real clocks plus offsets a test moves: ``suspend`` moves both,
    ``step`` the wall clock alone."""

    def __init__(self) -> None:
        self.boot = 0.0
        self.wall_offset = 0.0

    def clock(self) -> float:
        return time.monotonic() + self.boot

    def wall(self) -> float:
        return time.time() + self.wall_offset

    def suspend(self, seconds: float) -> None:
        self.boot += seconds
        self.wall_offset += seconds

    def step(self, seconds: float) -> None:
        self.wall_offset += seconds


class UdpHA:
    """An HA on ::1 that answers every BU under ``iss`` with BA status 0
    for the lifetime asked."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.bind(("::1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.bus: list[mh.BindingUpdate] = []
        self.status = 0  # of every BA
        self.data_after = 0  # protected data packets sent right behind each BA
        self.lifetime: int | None = None  # of every BA; None: the lifetime asked
        self.options: tuple[mh.MobilityOption, ...] = ()  # of every BA

    def keys(self, iss: IssuedSA) -> None:
        sa = iss.sa
        info = SUITES[sa.suite]
        self.inb = InboundSA(info, sa.mn_to_ha_ikey, sa.mn_to_ha_ekey, sa.spi)
        self.out = OutboundSA(info, sa.ha_to_mn_ikey, sa.ha_to_mn_ekey, sa.spi)

    def serve(self) -> None:
        while True:
            try:
                datagram, peer = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            plain = self.inb.unprotect(datagram)
            assert plain.ptype == PTYPE_MH and plain.next_header == NEXT_HEADER_MH
            bu = mh.decode_mh(plain.payload, src=HOA, dst=HAA).message
            assert isinstance(bu, mh.BindingUpdate)
            self.bus.append(bu)
            lifetime = bu.lifetime if self.lifetime is None else self.lifetime
            ba = mh.BindingAck(
                status=self.status, sequence=bu.sequence, lifetime=lifetime, options=self.options
            )
            packet = mh.encode_mh(ba, src=HAA, dst=HOA)
            self.sock.sendto(self.out.protect(PTYPE_MH, NEXT_HEADER_MH, packet), peer)
            inner = bytes((0x60, 0, 0, 0, 0, 0, 59, 64)) + IPv6Address("2001:db8:9::1").packed
            for _ in range(self.data_after):  # a bulk download, numbered behind the BA
                self.sock.sendto(self.out.protect(PTYPE_DATA, 41, inner + HOA.packed), peer)


def _issued(port: int, lifetime: float = 3600) -> IssuedSA:
    sa = new_sa(
        spi=4242,
        mn_id="alice@mipsec.test",
        suite=Suite.AES_128_CBC_SHA256,
        scope=1,
        lifetime=lifetime,
        now=datetime.now(UTC),
    )
    return IssuedSA(sa, BootstrapData(haa_ip6=HAA, ip6_hoa=HOA, port=port))


def _config(tmp_path: Path) -> MNConfig:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    data = {
        "mn": {"mn_id": "alice@mipsec.test", "psk_hex": "00" * 32},
        "hac": {"host": "127.0.0.1", "port": 1, "server_name": "hac.mipsec.test",
                "ca": str(ca)},
        "registration": {"transport": "ip6", "lifetime": 600},
    }  # fmt: skip
    cfg = validate_config(data, "mn")
    assert isinstance(cfg, MNConfig)
    return cfg


@contextlib.asynccontextmanager
async def _registered(tmp_path: Path, clocks: Clocks) -> AsyncIterator[tuple[Registrar, UdpHA]]:
    """A Registrar on ``clocks`` with its socket open to an answering UdpHA."""
    ha = UdpHA()
    iss = _issued(ha.port)
    ha.keys(iss)
    loop = asyncio.get_running_loop()
    loop.add_reader(ha.sock.fileno(), ha.serve)
    reg = Registrar(iss, _config(tmp_path), clock=clocks.clock, wall=clocks.wall)
    try:
        await reg.open()
        yield reg, ha
    finally:
        loop.remove_reader(ha.sock.fileno())
        reg.close()
        ha.sock.close()


async def _drive(
    tmp_path: Path, move: str, seconds: float
) -> tuple[str | None, list[mh.BindingUpdate], float]:
    """Register, move the clocks, run on; the re-bootstrap reason (None: the
    SA was kept for 1.5 s), the BUs the HA saw, and how long after the
    move the run returned."""
    clocks = Clocks()
    async with _registered(tmp_path, clocks) as (reg, ha):
        stop = asyncio.Event()
        first = await reg.run(until_registered=True, stop=stop)
        assert first.status == 0 and len(ha.bus) == 1
        getattr(clocks, move)(seconds)
        moved_at = time.monotonic()
        task = asyncio.create_task(reg.run_more(stop=stop))
        done, _ = await asyncio.wait({task}, timeout=1.5)
        stop.set()
        outcome = await task
        return outcome.rebootstrap, ha.bus, time.monotonic() - moved_at if done else 1.5


def test_a_timeout_runs_on_the_registration_clock(tmp_path: Path) -> None:
    """``--once`` on a host that slept an hour since boot (CLOCK_BOOTTIME an
    hour ahead of the monotonic clock): the BA is waited for.  A deadline
    taken on the monotonic clock had passed before the first BU left."""

    async def main() -> int | None:
        clocks = Clocks()
        clocks.boot = 3600.0
        async with _registered(tmp_path, clocks) as (reg, _):
            return (await reg.run(until_registered=True, timeout=5.0)).status

    assert asyncio.run(main()) == 0


def test_the_registration_clock_is_clock_boottime(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Linux ``mn_clock`` reads CLOCK_BOOTTIME (which counts a suspend),
    not CLOCK_MONOTONIC (which stops during one)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        pytest.skip("no CLOCK_BOOTTIME on this platform (the monotonic clock is used)")
    read: list[int] = []

    def fake(clock_id: int) -> float:
        read.append(clock_id)
        return 12345.0

    monkeypatch.setattr(time, "clock_gettime", fake)
    assert mn_clock() == 12345.0 and read == [boottime]


def test_a_suspend_past_the_refresh_sends_a_bu_on_waking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """600-s binding refreshed at 80 %: 500 s asleep, the refresh goes at once."""
    caplog.set_level(logging.INFO, "mipsec.mn")
    reason, bus, _ = asyncio.run(_drive(tmp_path, "suspend", 500))
    assert reason is None
    assert len(bus) == 2 and bus[1].lifetime == bus[0].lifetime  # the refresh
    assert "wall clock stepped" not in caplog.text


def test_a_suspend_past_the_sas_end_bootstraps_on_waking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1-h SA, 50 min asleep (past its 80 %): the MN goes back to its HAC at once."""
    caplog.set_level(logging.INFO, "mipsec.mn")
    reason, _, after = asyncio.run(_drive(tmp_path, "suspend", 3000))
    assert reason == "SA validity end is near" and after < 1.0
    assert "wall clock stepped" not in caplog.text


def test_a_step_ahead_past_the_sas_end_is_said_and_bootstraps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The MN's clock ran 2 h behind when the SA came (NTP corrects it now):
    by the true time the SA is past its end, so the MN goes back to its HAC
    instead of sending BUs the HA drops; said in one WARNING."""
    caplog.set_level(logging.INFO, "mipsec.mn")
    reason, bus, after = asyncio.run(_drive(tmp_path, "step", 7200))
    assert reason == "SA validity end is near" and after < 1.0
    assert len(bus) == 1  # no refresh: the timers did not move
    [line] = [r for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == (
        "wall clock stepped 2.0 h ahead: by it the SA (spi=4242) is near its end: "
        "bootstrapping again in 0 s -- is NTP in step?"
    )


def test_a_step_ahead_within_the_sas_life_moves_the_rebootstrap_earlier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """+30 min on a 1-h SA: the re-bootstrap at 80 % (48 min) moves to 80 %
    of the 30 min left (24 min); the binding's timers stay."""
    caplog.set_level(logging.INFO, "mipsec.mn")
    reason, bus, _ = asyncio.run(_drive(tmp_path, "step", 1800))
    assert reason is None and len(bus) == 1
    [line] = [r.getMessage() for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert line.startswith("wall clock stepped 30 min ahead: by it the SA (spi=4242) is near")
    assert "bootstrapping again in 1440 s" in line or "bootstrapping again in 1439 s" in line


def test_a_step_back_keeps_the_schedule_and_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mipsec.mn")
    reason, bus, _ = asyncio.run(_drive(tmp_path, "step", -3 * 3600))
    assert reason is None and len(bus) == 1
    [line] = [r.getMessage() for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert line.startswith("wall clock stepped 3.0 h back: the SA (spi=4242) keeps its schedule")
    assert "bootstrapping again in 2880 s" in line or "bootstrapping again in 2879 s" in line


@pytest.mark.parametrize("lifetime", [None, 0])
def test_176_on_the_first_ba_is_a_rebootstrap(tmp_path: Path, lifetime: int | None) -> None:
    """An HA answering the SA's first BU with 176 (REINIT_SA_WITH_HAC), with
    the lifetime asked or 0: the first run returns the status and the
    re-bootstrap together, so the daemon backs off and goes back to its
    HAC.  Before, the run returned at the BA and the re-bootstrap --
    which the machine sends only once -- was lost: the MN refreshed under
    that SA past its end and never bootstrapped again (with lifetime 0, it
    spun at 100 % CPU instead; found in review)."""

    async def main() -> tuple[int | None, str | None]:
        clocks = Clocks()
        async with _registered(tmp_path, clocks) as (reg, ha):
            ha.status, ha.lifetime = mh.REINIT_SA_WITH_HAC, lifetime
            first = await reg.run(until_registered=True, stop=asyncio.Event())
            return first.status, first.rebootstrap

    status, rebootstrap = asyncio.run(main())
    assert status == mh.REINIT_SA_WITH_HAC
    assert rebootstrap is not None and "176" in rebootstrap


def test_a_ba_with_a_burst_of_data_behind_it_is_not_a_replay(tmp_path: Path) -> None:
    """BAs and data share the SA's one replay window.  The HA sends a BA and
    then 100 data packets (a bulk download under way): the BA is accepted
    -- it is opened on arrival, in order with the data -- and the data is
    delivered.  Before, BAs waited in a queue for the run while the data
    behind them slid the 64-packet window past them: a refresh BA was
    dropped as a replay, and the MN took its binding for lost (found in
    review)."""

    async def main() -> tuple[int | None, int, dict[str, int]]:
        clocks = Clocks()
        async with _registered(tmp_path, clocks) as (reg, ha):
            ha.data_after = 100
            forwarder = MnForwarder(reg.machine, frozenset({HOA.packed}), mtu=1500)
            delivered: list[bytes | None] = []
            reg.on_data = lambda d: delivered.append(forwarder.downlink(d))
            first = await reg.run(until_registered=True, timeout=4.0)
            await asyncio.sleep(0.05)
            return first.status, sum(1 for d in delivered if d), dict(reg.machine.drops)

    status, delivered, drops = asyncio.run(main())
    assert status == 0
    assert delivered == 100
    assert "replay" not in drops


def test_an_unrequested_ipv4_ack_is_ignored_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An HA acknowledging an IPv4 home address the BU did not ask for (none
    was provisioned): the registration stands without it, and one WARNING
    names the HA and the SA (the ack put 8.8.8.8 on the MN's TUN device
    before: found in review)."""
    from ipaddress import IPv4Address

    caplog.set_level(logging.INFO, "mipsec.mn")

    async def main() -> tuple[object, int]:
        clocks = Clocks()
        async with _registered(tmp_path, clocks) as (reg, ha):
            ha.options = (mh.IPv4AddressAck(0, 32, IPv4Address("8.8.8.8")),)
            first = await reg.run(until_registered=True, timeout=5.0)
            return first.ip4_hoa, first.status or 0

    ip4, status = asyncio.run(main())
    assert ip4 is None and status == 0
    lines = [r.getMessage() for r in caplog.records if "did not ask for" in r.getMessage()]
    assert len(lines) == 1 and "spi=4242" in lines[0] and "::1" in lines[0]
