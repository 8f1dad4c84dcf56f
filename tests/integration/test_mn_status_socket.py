"""``mipsec status --config mn.toml``: the MN daemon's control socket
(core/mn_status.py), since the twenty-ninth session.  Before, an MN had no
socket and its counters (BAs it dropped or ignored, its data plane's) were
seen by nobody."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import Lab, edit_toml, mipsec
from test_mn_daemon import _daemon, _retry_bounds

from mipsec.core.control import MAX_CLIENTS


def _status(lab: Lab, timeout: float = 20.0, until: Any = None) -> dict[str, Any]:
    """The MN's status once ``until(status)`` holds (or the socket answers)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        out = mipsec("status", "--config", lab.info["mn"]["config"], "--json")
        if out.returncode == 0:
            last = json.loads(out.stdout)
            if until is None or until(last):
                return dict(last)
        time.sleep(0.2)
    raise AssertionError(f"no such status within {timeout} s: last {last}, {out.stderr}")


def _stop(mn: subprocess.Popen[str]) -> str:
    mn.send_signal(signal.SIGTERM)
    _, err = mn.communicate(timeout=20)
    assert mn.returncode == 0, err
    return err


def test_a_registered_mn_shows_its_sa_and_binding_and_no_key(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    mn = _daemon(lab)
    try:
        assert mn.stdout is not None
        first = json.loads(mn.stdout.readline())  # registered
        st = _status(lab, until=lambda s: s["state"] == "registered")
        raw = mipsec("status", "--config", lab.info["mn"]["config"], "--json").stdout
        text = mipsec("status", "--config", lab.info["mn"]["config"]).stdout
    finally:
        _stop(mn)
    assert st["role"] == "mn" and st["mn_id"] == lab.info["mn"]["mn_id"]
    assert st["sa"]["spi"] == first["sa"]["spi"]
    assert st["sa"]["hoa"] == first["bootstrap"]["ip6_hoa"]
    assert st["binding"]["registered"] is True and st["binding"]["last_status"] == 0
    assert st["binding"]["lifetime_s"] > 0
    assert st["binding"]["ignored"] == {} and st["binding"]["drops"] == {}
    assert st["bootstraps"]["ok"] == 1 and st["bootstraps"]["failed"] == 0
    assert st["bootstraps"]["last"]["status"] == 200 and st["bootstraps"]["next_in_s"] is None
    assert st["kept"] is None and st["data"] is None
    # The status shows counts and names, never a key.
    for key in ("mn_to_ha", "ha_to_mn", "ikey", "ekey", "psk"):
        assert key not in raw, key
    # Human-readable too, one "key: value" per line.
    assert "state: registered" in text and f"spi={first['sa']['spi']}" in text, text


def test_an_mn_that_cannot_reach_its_hac_says_it_is_waiting_and_why(lab: Lab) -> None:
    _retry_bounds(lab, 5, 10)
    mn = _daemon(lab)  # the lab's HAC is not started
    try:
        st = _status(lab, until=lambda s: s["state"] == "waiting")
    finally:
        _stop(mn)
    boots = st["bootstraps"]
    assert boots["ok"] == 0 and boots["failed"] >= 1 and boots["failures_in_a_row"] >= 1
    assert boots["last"]["ok"] is False and boots["last"]["status"] is None
    assert boots["last_failure"]["reason"].startswith("cannot connect to the HAC")
    assert 0 < boots["next_in_s"] <= 10
    assert st["sa"] is None and st["binding"] is None


def test_the_socket_goes_with_the_mn_and_once_opens_none(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    sock = Path(lab.info["mn"]["config"]).with_suffix(".ctl")
    out = mipsec("--role", "mn", "--config", lab.info["mn"]["config"], "--once", "--json")
    assert out.returncode == 0, out.stderr
    assert not sock.exists()
    mn = _daemon(lab)
    try:
        _status(lab, until=lambda s: s["state"] == "registered")
        assert sock.is_socket()
    finally:
        _stop(mn)
    assert not sock.exists()
    gone = mipsec("status", "--config", lab.info["mn"]["config"])
    assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr


def test_a_default_socket_that_cannot_be_opened_is_a_warning_not_a_failed_start(
    lab: Lab, start_hac: Any
) -> None:
    """The MN's default socket sits beside its configuration, which a
    systemd unit (ProtectSystem=strict) may not write: the MN runs, without
    a socket, and says so in one line.  A configured ``[control] path``
    must work (a failed start naming the key)."""
    start_hac(lab)
    sock = Path(lab.info["mn"]["config"]).with_suffix(".ctl")
    sock.mkdir()  # the name taken by something that is not a socket
    mn = _daemon(lab)
    try:
        assert mn.stdout is not None
        first = json.loads(mn.stdout.readline())
    finally:
        err = _stop(mn)
    assert first["ba"]["status"] == 0
    [line] = [ln for ln in err.splitlines() if "no control socket" in ln]
    assert "exists and is not a socket" in line and "set [control] path" in line
    edit_toml(
        Path(lab.info["mn"]["config"]),
        "[registration]",
        f'[control]\npath = "{sock.parent / "nowhere" / "mn.ctl"}"\n\n[registration]',
    )
    out = mipsec("--role", "mn", "--config", lab.info["mn"]["config"])
    assert out.returncode == 2 and "control.path" in out.stderr, out.stderr


def test_clients_that_hold_the_socket_never_stall_the_mn_and_are_dropped_at_the_timeout(
    lab: Lab, start_hac: Any
) -> None:
    """An attacker (or a stuck script) with access to the socket opens
    ``MAX_CLIENTS`` connections and sends half a request on each.  The next
    client reads "busy" at once; the MN meanwhile re-bootstraps on time (at
    80 % of a 10-s SA) and registers, its loop untouched; each held
    connection is closed at ``[control] timeout`` (15 s here, past the
    re-bootstrap), and ``mipsec status`` then answers again."""
    edit_toml(Path(lab.info["mn"]["config"]), "[hac]", "[control]\ntimeout = 15.0\n\n[hac]")
    edit_toml(Path(lab.info["hac"]["config"]), "sa_lifetime = 3600", "sa_lifetime = 10")
    edit_toml(Path(lab.info["mn"]["config"]), "lifetime = 600", "lifetime = 8")
    edit_toml(Path(lab.info["mn"]["config"]), "[sa]\n", "[sa]\nmin_lifetime = 5\n")
    start_hac(lab)
    path = Path(lab.info["mn"]["config"]).with_suffix(".ctl")
    mn = _daemon(lab)
    held: list[socket.socket] = []
    try:
        assert mn.stdout is not None
        assert json.loads(mn.stdout.readline())["ba"]["status"] == 0
        _status(lab, until=lambda s: s["state"] == "registered")
        for _ in range(MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b'{"verb": "sta')  # never finished
            held.append(s)
        time.sleep(0.2)  # all accepted before the next one
        busy = mipsec("status", "--config", lab.info["mn"]["config"], "--json")
        assert busy.returncode != 0 and "busy" in busy.stderr, busy.stderr
        assert "Traceback" not in busy.stderr
        again = json.loads(mn.stdout.readline())  # the re-bootstrap, on time
        assert again["status"] == 200 and again["ba"]["status"] == 0
        for s in held:  # each one closed by the MN at its timeout, no answer
            s.settimeout(30)
            assert s.recv(4096) == b""
        # Answering again, and every bootstrap meanwhile a success.
        st = _status(lab, until=lambda s: s["bootstraps"]["ok"] >= 2)
        assert st["state"] == "registered" and st["bootstraps"]["failed"] == 0
    finally:
        for s in held:
            s.close()
        err = _stop(mn)
    assert "Traceback" not in err
