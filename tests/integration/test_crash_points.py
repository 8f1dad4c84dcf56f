"""Issue 6, "killed at the worst instant": SIGKILL at a chosen call, not by luck.

tests/integration/crashpoint.py runs the real role with one function replaced
by a SIGKILL at its first call.  The instants chosen are the ones between two
durable facts of a re-bootstrap (an MN's second SA supersedes its first):

* the HA, after its binding-cache flush has made the withdrawal of the old
  SPI durable but before its SA store forgot that SA and before it answered
  the HAC (``HaService._withdrawn``);
* the HAC, after one transaction stored the new SA and retired the old one
  but before the install left for the HA (``TlsTransport.provision_superseding``).

After each crash the role is started again on the same files.  What must
hold: the MN was never told of an SA it cannot use (no 200, so it bootstraps
again), the HAC finishes every withdrawal it owes (retried until the HA
confirms, across its own restart), no SPI of the crashed bootstrap -- the old
one or the new one -- is ever accepted by the HA, and the MN's next bootstrap
registers with BA 0.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LAUNCHER, Lab, edit_toml, wait_port
from rawmn import RawMN, psk_bootstrap
from test_ha_restart_replay import MN_ID, SUITE, HaProcess, Mn, silent

CRASHPOINT = [sys.executable, str(Path(__file__).with_name("crashpoint.py"))]
SETTLE = 30.0  # seconds for retried withdrawals (0.5, 1, 2, 4... s apart) and the sweep


def crash_at(target: str) -> list[str]:
    return [*CRASHPOINT, target, "1", "--"]


def final_status(lab: Lab) -> str | None:
    """The status of one PSK bootstrap by the raw MN; None if the HAC closed without one."""
    raw = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
    try:
        _, final = psk_bootstrap(raw, MN_ID, lab.psk, suites=SUITE)
    except (ConnectionError, EOFError, OSError, ValueError):
        return None
    finally:
        raw.close()
    return final.headers["status-code"]


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def unconfirmed(lab: Lab) -> list[int]:
    rows = query(lab.dir / "hac-sa.sqlite", "SELECT spi FROM retired_sa WHERE confirmed = 0")
    return sorted(int(r[0]) for r in rows)  # type: ignore[call-overload]


def live_on_hac(lab: Lab) -> list[int]:
    rows = query(lab.dir / "hac-sa.sqlite", "SELECT spi FROM issued_sa")
    return sorted(int(r[0]) for r in rows)  # type: ignore[call-overload]


def held_by_ha(lab: Lab) -> list[int]:
    rows = query(lab.dir / "ha-sa.sqlite", "SELECT spi FROM issued_sa")
    return sorted(int(r[0]) for r in rows)  # type: ignore[call-overload]


def wait_for(what: str, check: object, timeout: float = SETTLE) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


class HacProcess:
    """``mipsec --role hac`` on the lab's config, with an optional crash point."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self, launcher: list[str] = LAUNCHER) -> None:
        self.runs += 1
        log = self.lab.dir / f"hac-run{self.runs}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*launcher, "--role", "hac", "--config", self.lab.info["hac"]["config"]],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_port(self.lab.hac_port, self.proc)

    def log_text(self) -> str:
        return (self.lab.dir / f"hac-run{self.runs}.log").read_text()

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        assert self.proc.wait(timeout=20) == 0
        self.proc = None

    def wait_killed(self) -> None:
        assert self.proc is not None
        assert self.proc.wait(timeout=20) == -9  # the crash point's SIGKILL, not an exit
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def hac(lab: Lab) -> Iterator[HacProcess]:
    # A short provisioning deadline: the sweep of undelivered SAs waits for
    # it (plus the delivery batch and slack) before it takes anything back.
    edit_toml(Path(lab.info["hac"]["config"]), "[hac]\n", "[hac]\nprovisioning_timeout = 1.0\n")
    proc = HacProcess(lab)
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def ha_proc(lab: Lab) -> Iterator[HaProcess]:
    proc = HaProcess(lab)
    try:
        yield proc
    finally:
        proc.close()


def test_ha_killed_between_its_withdrawal_flush_and_its_answer(
    lab: Lab, hac: HacProcess, ha_proc: HaProcess
) -> None:
    ha_proc.launcher = crash_at("mipsec.core.roles.ha:HaService._withdrawn")
    ha_proc.start()
    hac.start()
    first = Mn(lab)
    try:
        captured = first.bu(10)
        assert first.register(captured)["status"] == 0
        # The re-bootstrap: the HA installs the new SA, withdraws the first
        # (durable: one flush) and dies before it answers.  The HAC heard
        # nothing: 504, and the MN keeps no SA from this try.
        assert final_status(lab) == "504"
        assert ha_proc.proc is not None and ha_proc.proc.wait(timeout=20) == -9
        ha_proc.proc = None
        # Both SPIs of that bootstrap are owed a withdrawal: the first SA
        # (superseded) and the new one (its install was never confirmed).
        owed = unconfirmed(lab)
        assert first.spi in owed and len(owed) == 2, owed
        assert live_on_hac(lab) == []
        ha_proc.launcher = list(LAUNCHER)
        ha_proc.start()
        # The HAC keeps at them until the restarted HA confirms.
        wait_for("withdrawals confirmed", lambda: unconfirmed(lab) == [])
        assert held_by_ha(lab) == []
        # Neither SA is ever accepted again: a captured BU, a fresh one.
        assert silent(captured, first.ha)
        assert silent(first.bu(11), first.ha)
        # The MN bootstraps again and registers.
        again = Mn(lab)
        try:
            assert again.spi not in owed
            assert again.register(again.bu(12))["status"] == 0
            assert held_by_ha(lab) == [again.spi] and live_on_hac(lab) == [again.spi]
        finally:
            again.close()
    finally:
        first.close()


def test_hac_killed_between_its_store_commit_and_the_install(
    lab: Lab, hac: HacProcess, ha_proc: HaProcess
) -> None:
    ha_proc.start()
    hac.start(crash_at("mipsec.plugins.transport_tls:TlsTransport.provision_superseding"))
    first = Mn(lab)
    try:
        captured = first.bu(10)
        assert first.register(captured)["status"] == 0
        # The re-bootstrap: the new SA is stored and the first retired in one
        # transaction, then the HAC dies before the install leaves.
        assert final_status(lab) is None  # the connection dies: no 200, no SA for the MN
        hac.wait_killed()
        stranded = [s for s in live_on_hac(lab) if s != first.spi]
        assert unconfirmed(lab) == [first.spi]
        hac.start()
        # After the restart: the first SA's withdrawal is finished; the SA
        # stored for the crashed bootstrap, never delivered to the MN, is
        # retired and withdrawn as well.
        # (The sweep runs once no HAC could still be issuing it: the
        # provisioning timeout and the delivery batch after the start.)
        wait_for(
            "stranded SA taken back, every withdrawal confirmed",
            lambda: live_on_hac(lab) == [] and unconfirmed(lab) == [],
        )
        assert held_by_ha(lab) == []
        assert "1 SA(s) stored but never answered with" in hac.log_text()
        confirmed = query(lab.dir / "hac-sa.sqlite", "SELECT spi FROM retired_sa")
        assert sorted(int(r[0]) for r in confirmed) == sorted([first.spi, *stranded])  # type: ignore[call-overload]
        assert silent(captured, first.ha)
        assert silent(first.bu(11), first.ha)
        again = Mn(lab)
        try:
            assert again.register(again.bu(12))["status"] == 0
            assert live_on_hac(lab) == [again.spi] and held_by_ha(lab) == [again.spi]
        finally:
            again.close()
    finally:
        first.close()


def test_a_clean_stop_right_after_a_200_keeps_the_sa(
    lab: Lab, hac: HacProcess, ha_proc: HaProcess
) -> None:
    """The other side of the sweep: the 200 left and the HAC stops (SIGTERM)
    before its delivery batch was due -- the stop writes it, so the restarted
    HAC takes nothing back, and the MN keeps registering."""
    ha_proc.start()
    hac.start()
    mn = Mn(lab)
    try:
        hac.stop()  # well inside the one-second batch
        hac.start()
        assert mn.register(mn.bu(1))["status"] == 0
        time.sleep(1.0 + 2 * 1.0 + 2.0 + 1.5)  # past the sweep (see the hac fixture)
        assert live_on_hac(lab) == [mn.spi] and unconfirmed(lab) == []
        assert held_by_ha(lab) == [mn.spi]
        assert mn.register(mn.bu(2))["status"] == 0
        assert "never answered with" not in hac.log_text()
    finally:
        mn.close()
