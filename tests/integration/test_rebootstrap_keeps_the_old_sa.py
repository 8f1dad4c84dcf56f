"""A re-bootstrap that fails or is abandoned before its 200 leaves the MN
the SA it holds (twenty-ninth session, found in review).

Real HAC and HA processes (TLS provisioning, SQLite stores), the raw MN of
tests/integration/rawmn.py.  The MN holds SA W, registered with its HA;
then it bootstraps again and the new SA X never reaches it: the MN leaves
right after its Done, breaks the lockstep with a stray octet (400), or the
HA stalls past the HAC's provisioning deadline (504).  Each time W is still
live on the HAC and on the HA, the MN still registers with it (a BU gets a
BA), nothing of W is owed a withdrawal, and X is live nowhere.

Until then X's store write retired W and X's install carried W's
withdrawal (``prov-withdraw``); any outcome but a definite refusal left W
withdrawn for good, everywhere, while the MN -- told 400, 504 or nothing --
still held it.  A successful re-bootstrap still withdraws W, once X's 200
has left: the last test holds X's install up at the HA and looks at W then.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Lab, edit_toml
from rawmn import RawMN, container, lines, psk_init, with_auth
from test_crash_points import (  # noqa: F401  (hac, ha_proc: fixtures)
    HacProcess,
    ha_proc,
    hac,
    held_by_ha,
    live_on_hac,
    unconfirmed,
    wait_for,
)
from test_ha_restart_replay import MN_ID, SUITE, HaProcess, Mn, silent


def _done(raw: RawMN, lab: Lab) -> bytes:
    """The PSK exchange up to its Done request, which is returned, unsent."""
    mn_rand, r1 = psk_init(raw, MN_ID)
    body = lines(
        [
            ("mn-rand", mn_rand),
            ("hac-rand", r1.headers["hac-rand"]),
            ("mip6-sas", "1"),
            ("mip6-suitelist", SUITE),
        ]
    )
    return container(raw.next_id, with_auth(body, lab.psk, b"MN", raw.cb))


@pytest.fixture
def holding_w(lab: Lab, hac: HacProcess, ha_proc: HaProcess) -> Iterator[Mn]:  # noqa: F811
    """The HA and the HAC running, the MN registered with its first SA W."""
    ha_proc.start()
    hac.start()
    first = Mn(lab)
    try:
        assert first.register(first.bu(10))["status"] == 0
        assert live_on_hac(lab) == [first.spi] and held_by_ha(lab) == [first.spi]
        yield first
    finally:
        first.close()
    assert "Traceback" not in hac.log_text()


@pytest.fixture
def slow_deadline(lab: Lab, hac: HacProcess) -> None:  # noqa: F811
    """A provisioning deadline an install held up for a while meets (in
    place of the 1 s the ``hac`` fixture writes)."""
    config = Path(lab.info["hac"]["config"])
    edit_toml(config, "provisioning_timeout = 1.0\n", "provisioning_timeout = 5.0\n")


@contextlib.contextmanager
def _stalled(ha_proc: HaProcess) -> Iterator[None]:  # noqa: F811
    """The HA wedged (SIGSTOP: its sockets open, nothing served) inside."""
    assert ha_proc.proc is not None
    ha_proc.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        ha_proc.proc.send_signal(signal.SIGCONT)


def _alone(lab: Lab, spi: int) -> bool:
    """``spi`` alone live on the HAC and the HA, and no withdrawal owed."""
    return live_on_hac(lab) == [spi] and held_by_ha(lab) == [spi] and unconfirmed(lab) == []


def _w_kept(lab: Lab, first: Mn, seq: int) -> None:
    """Once settled: W alone live on the HAC and the HA, nothing owed (the
    new SA's withdrawal confirmed), and W still registers."""
    wait_for("the new SA taken back, W alone live", lambda: _alone(lab, first.spi))
    assert first.register(first.bu(seq))["status"] == 0
    assert live_on_hac(lab) == [first.spi] and held_by_ha(lab) == [first.spi]


def _x_in_flight(lab: Lab, first: Mn) -> None:
    """Wait until X is stored (its install then waits at the stalled HA)."""
    wait_for("X stored", lambda: set(live_on_hac(lab)) - {first.spi}, timeout=3.0)


def test_an_mn_gone_right_after_its_done_keeps_its_sa(
    lab: Lab,
    slow_deadline: None,
    holding_w: Mn,
    ha_proc: HaProcess,  # noqa: F811
) -> None:
    """The MN sends its Done and, while the HA has X's install in hand,
    closes TCP (no close_notify): the HAC abandons X, and W stays."""
    first = holding_w
    raw = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
    done = _done(raw, lab)
    with _stalled(ha_proc):
        raw.send_raw(done)
        _x_in_flight(lab, first)
        socket.socket(fileno=raw.sock.detach()).close()  # TCP close, no close_notify
        time.sleep(0.3)
    _w_kept(lab, first, 11)


def test_a_stray_octet_after_the_done_is_400_and_keeps_the_sa(
    lab: Lab,
    slow_deadline: None,
    holding_w: Mn,
    ha_proc: HaProcess,  # noqa: F811
) -> None:
    """The MN breaks the lockstep: one octet after its Done, while X's
    install is in the HA's hands.  It gets 400, X is abandoned, W stays."""
    first = holding_w
    raw = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
    try:
        done = _done(raw, lab)
        with _stalled(ha_proc):
            raw.send_raw(done)
            _x_in_flight(lab, first)
            raw.send_raw(b"\x00")
            status = raw.recv().headers.get("status-code")
    finally:
        raw.close()
    assert status == "400"
    _w_kept(lab, first, 11)


def test_an_ha_stalled_past_the_deadline_is_504_and_keeps_the_sa(
    lab: Lab,
    holding_w: Mn,
    ha_proc: HaProcess,  # noqa: F811
) -> None:
    """The HA wedged while the MN bootstraps again: X's install waits in
    its socket past the HAC's 1-s provisioning deadline, and the MN gets
    504.  The HA resumes and carries the stale install out from its socket
    buffer; the HAC, which owes X's withdrawal since the 504, has it
    withdrawn.  Once settled W is the MN's SA as before, on both.  (Until
    the twenty-ninth session the install carried W's withdrawal, so the HAC
    called neither SA live and withdrew both.)"""
    first = holding_w
    with _stalled(ha_proc):
        raw = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
        try:
            raw.send_raw(_done(raw, lab))
            final = raw.recv().headers
        finally:
            raw.close()
        assert final.get("status-code") == "504"
        assert live_on_hac(lab) == [first.spi]  # W never retired
        (stale,) = unconfirmed(lab)  # X, owed until the HA confirms
    _w_kept(lab, first, 11)
    assert ha_proc.log is not None
    assert f"SA installed spi={stale} " in ha_proc.log.read_text()


def test_a_successful_rebootstrap_withdraws_w_only_after_the_200(
    lab: Lab,
    slow_deadline: None,
    holding_w: Mn,
    ha_proc: HaProcess,  # noqa: F811
) -> None:
    """max_sas_per_mn = 1 (the default): the MN's second SA supersedes W.
    While X's install is held up at the HA, W is still live on the HAC (and
    the HA); once X's 200 has left, W is withdrawn from both and its BUs go
    unanswered, and X registers."""
    first = holding_w
    got: list[Mn] = []
    with _stalled(ha_proc):
        bootstrap = threading.Thread(target=lambda: got.append(Mn(lab)))
        bootstrap.start()
        _x_in_flight(lab, first)
        assert first.spi in live_on_hac(lab) and unconfirmed(lab) == []
    bootstrap.join(10)
    (second,) = got
    try:
        wait_for("W withdrawn from the HAC and the HA", lambda: _alone(lab, second.spi))
        assert silent(first.bu(11), first.ha)
        assert second.register(second.bu(12))["status"] == 0
    finally:
        second.close()
