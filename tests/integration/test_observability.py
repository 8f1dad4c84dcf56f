"""Metrics, JSON logs, sd_notify and the SIGTERM drain, on real role processes (issue 10).

One lab from ``mipsec init`` (which gives each role a ``[metrics]`` address),
switched to ``log_format = "json"``; the HA and the HAC run as processes with
``NOTIFY_SOCKET`` pointing at a datagram socket of the test, the MN bootstraps
and registers, garbage goes to the HA's UDP port; then both stop on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import LAUNCHER, Lab, edit_toml, mipsec, wait_port

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text format."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        got = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


class Notify:
    """A datagram socket standing in for systemd's ``NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[str] = []

    def wait_for(self, state: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(state in m.split("\n") for m in self.got):
                return
            try:
                self.got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"{state} never notified: {self.got}")


@pytest.fixture
def json_lab(lab: Lab) -> Lab:
    for role in ("hac", "ha"):
        edit_toml(
            Path(lab.info[role]["config"]),
            'log_level = "info"',
            'log_level = "info"\nlog_format = "json"',
        )
    return lab


def _start(lab: Lab, role: str, notify: Notify) -> subprocess.Popen[bytes]:
    out = (lab.dir / f"{role}.log").open("ab")
    p = subprocess.Popen(
        [*LAUNCHER, "--role", role, "--config", lab.info[role]["config"]],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, NOTIFY_SOCKET=str(notify.path)),
    )
    out.close()
    wait_port(int(lab.info[role]["port"]), p)
    return p


@pytest.fixture
def running(json_lab: Lab, tmp_path: Path) -> Iterator[tuple[Lab, dict[str, Any]]]:
    notes = {r: Notify(tmp_path / f"{r}.notify") for r in ("ha", "hac")}
    procs = {}
    try:
        for role in ("ha", "hac"):
            procs[role] = _start(json_lab, role, notes[role])
            notes[role].wait_for("READY=1")
        yield json_lab, {"procs": procs, "notify": notes}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_metrics_json_logs_notify_and_stop(running: tuple[Lab, dict[str, Any]]) -> None:
    lab, ctx = running
    procs, notes = ctx["procs"], ctx["notify"]
    hac_metrics, ha_metrics = lab.info["hac"]["metrics"], lab.info["ha"]["metrics"]

    out = mipsec("--role", "mn", "--config", lab.info["mn"]["config"], "--once", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == 200

    # Garbage at the HA's MIP6 port: counted as drops by reason.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(5):
            s.sendto(b"\x00\x01garbage", ("127.0.0.1", int(lab.info["ha"]["port"])))
    time.sleep(0.5)

    status, text = _get(hac_metrics)
    assert status == 200
    assert _sample(text, "mipsec_bootstraps_total", method="psk", status="200") == 1.0
    assert _sample(text, "mipsec_bootstrap_duration_seconds_count", method="psk") == 1.0
    assert _sample(text, "mipsec_live_sas", ha="ha1") == 1.0
    assert _sample(text, "mipsec_provisioning_total", ha="ha1", outcome="issued") == 1.0
    # The kept, pipelined provisioning connection to the HA.
    assert (
        _sample(text, "mipsec_provisioning_connection_events_total", ha="ha1", event="connects")
        == 1.0
    )
    assert (
        _sample(text, "mipsec_provisioning_connection_events_total", ha="ha1", event="requests")
        == 1.0
    )
    assert _sample(text, "mipsec_provisioning_connections", ha="ha1", state="open") == 1.0
    assert _sample(text, "mipsec_provisioning_connections", ha="ha1", state="in_flight") == 0.0

    status, text = _get(ha_metrics)
    assert status == 200
    drops = [
        float(v)
        for v in re.findall(
            r'^mipsec_ha_packets_dropped_total\{reason="[^"]+"\} (\S+)$', text, re.M
        )
    ]
    assert sum(drops) == 5.0, text
    assert _sample(text, "mipsec_ha_bindings") == 1.0
    assert _sample(text, "mipsec_ha_sas") == 1.0
    for url in (hac_metrics, ha_metrics):
        assert _get(url.replace("/metrics", "/healthz")) == (200, "ok\n")
        assert _get(url.replace("/metrics", "/nothing"))[0] == 404
    # No key material in an export: the SA's keys never reach a metric.
    assert "key" not in text.lower().replace("keepalive", "")

    for role in ("hac", "ha"):
        procs[role].send_signal(signal.SIGTERM)
        assert procs[role].wait(timeout=30) == 0
        notes[role].wait_for("STOPPING=1")

    for role in ("hac", "ha"):
        lines = (lab.dir / f"{role}.log").read_text().splitlines()
        assert lines, role
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        for rec in records:
            assert set(rec) >= {"ts", "level", "logger", "msg"}
            assert TS.match(rec["ts"]), rec["ts"]
        msgs = [r["msg"] for r in records]
        assert any(m.startswith(f"{role} ready (mipsec ") for m in msgs), msgs
        assert any(m.startswith(f"{role} stopped (mipsec ") for m in msgs), msgs
    hac_records = [json.loads(x) for x in (lab.dir / "hac.log").read_text().splitlines()]
    issued = [r for r in hac_records if r.get("event") == "sa_issued"]
    assert issued and issued[0]["mn_id"] == "demo@mipsec.test"  # event fields as JSON fields


def test_metrics_port_in_use_names_the_key(json_lab: Lab) -> None:
    port = int(json_lab.info["ha"]["metrics"].rsplit(":", 1)[1].split("/")[0])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        out = mipsec("--role", "ha", "--config", json_lab.info["ha"]["config"], timeout=30)
    assert out.returncode != 0
    assert "metrics.port" in out.stderr and str(port) in out.stderr
    assert "Traceback" not in out.stderr


@dataclass
class _Probed:
    out: subprocess.CompletedProcess[str]
    times: list[float]  # when a probe's connection was accepted


def _probe_during(
    target: int, taken: int, run: Callable[[], subprocess.CompletedProcess[str]]
) -> _Probed:
    """``run()`` while this process holds port ``taken``, connecting to port
    ``target`` every millisecond meanwhile, as an MN or a HAC would."""
    import threading

    accepted: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", target), timeout=1):
                    accepted.append(time.monotonic())
            except OSError:
                pass
            time.sleep(0.001)

    prober = threading.Thread(target=probe)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        prober.start()
        try:
            out = run()
        finally:
            done.set()
            prober.join()
    return _Probed(out, accepted)


@pytest.mark.parametrize("role", ["hac", "ha"])
def test_a_start_that_fails_late_served_no_one(lab: Lab, role: str) -> None:
    """The role's metrics port is taken: the start fails, naming the key --
    and its port (the HAC's for MNs, the HA's for HACs' installs) never
    accepted a connection meanwhile.  The HAC used to accept MNs before
    opening its control socket and metrics listener: a start that failed
    there cut exchanges it had begun, with their SAs stored, and logged
    internal errors on the store it had closed (found by a CI run where a
    lab's metrics port was taken); the HA took installs likewise."""
    port = int(lab.info[role]["metrics"].rsplit(":", 1)[1].split("/")[0])
    probed = _probe_during(
        lab.hac_port if role == "hac" else lab.info["ha"]["port"],
        port,
        lambda: mipsec("--role", role, "--config", lab.info[role]["config"], timeout=60),
    )
    out = probed.out
    assert out.returncode != 0
    assert "metrics.port" in out.stderr and str(port) in out.stderr
    assert "Traceback" not in out.stderr
    assert probed.times == []
    assert "listening" not in out.stderr


# The HAC with its control socket slow to open (1.5 s): a window inside its
# start, after its MN port is bound and before it serves.
_SLOW_CONTROL = """
import asyncio, sys
from mipsec.core import control
real = control.start_control
async def slow(*args, **kwargs):
    print("control: opening slowly", flush=True)
    await asyncio.sleep(1.5)
    return await real(*args, **kwargs)
control.start_control = slow
from mipsec.core.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _sigterm_in_window(
    script: str, role: str, config: str, log: Path, marker: str, port: int
) -> tuple[str, list[float]]:
    """Run ``mipsec --role`` through ``script`` (which slows a step of the
    start and prints ``marker`` as it enters it), SIGTERM it in that window
    while a prober connects to ``port`` every millisecond; wait for exit 0.
    The log's text and when a probe's connection was accepted."""
    import threading

    with log.open("ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, "--role", role, "--config", config],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    accepted: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    accepted.append(time.monotonic())
            except OSError:
                pass
            time.sleep(0.001)

    prober = threading.Thread(target=probe)
    try:
        deadline = time.monotonic() + 30
        while marker not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        prober.start()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        done.set()
        if prober.is_alive():
            prober.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text(), accepted


def test_a_sigterm_during_the_hac_start_serves_no_one(lab: Lab) -> None:
    """SIGTERM while the HAC starts (its MN port bound, its control socket
    opening): it stops, exit 0, without ever saying "ready" or accepting a
    connection on its MN port.  Before, it finished its start, served, said
    ready, and only then stopped."""
    text, accepted = _sigterm_in_window(
        _SLOW_CONTROL,
        "hac",
        lab.info["hac"]["config"],
        lab.dir / "hac.log",
        "control: opening slowly",
        lab.hac_port,
    )
    assert "hac ready" not in text and "hac stopped (mipsec " in text, text
    assert accepted == []
    assert "Traceback" not in text


# The HA with its store's load slowed (1.5 s, blocking, as a big store's
# load is): a window inside its start, before any port opens.
_SLOW_LOAD = """
import sys, time
from mipsec.core.roles import ha
real = ha.HaService._load_pages
def slow(self, *args, **kwargs):
    print("store: loading slowly", flush=True)
    time.sleep(1.5)
    return real(self, *args, **kwargs)
ha.HaService._load_pages = slow
from mipsec.core.cli import main
sys.exit(main(sys.argv[1:]))
"""


# The HAC with its views' warm-up slowed (1.5 s, blocking, as 100,000 SAs'
# is): the last step of its start before it serves.
_SLOW_WARM = """
import sys, time
from mipsec.core.roles import hac
real = hac.warm_hac_views
def slow(*args, **kwargs):
    print("store: loading slowly", flush=True)
    time.sleep(1.5)
    return real(*args, **kwargs)
hac.warm_hac_views = slow
from mipsec.core.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("role", ["ha", "hac"])
def test_a_sigterm_during_the_store_load_serves_no_one(lab: Lab, role: str) -> None:
    """SIGTERM while the role loads its store (the loop blocked, the signal
    waiting in asyncio's pipe): it stops, exit 0, without ever accepting on
    its port (the HA: provisioning, the HAC: MNs), opening the HA's UDP port
    or saying "ready".  Before, the HA's load ran on and its ports opened;
    the HAC checked its stop event before the loop had run the signal's
    handler: both served, said ready, and only then stopped."""
    script = _SLOW_LOAD if role == "ha" else _SLOW_WARM
    port = lab.info["ha"]["port"] if role == "ha" else lab.hac_port
    config = Path(lab.info[role]["config"])
    if role == "hac":
        # No control socket, no metrics listener: nothing of the start yields
        # between the blocking load and the check of the stop event.
        text = config.read_text()
        metrics = text.index("\n[metrics]")
        end = text.find("\n[", metrics + 1)
        text = text[:metrics] + ("" if end < 0 else text[end:])
        config = config.with_name("hac-quiet.toml")
        config.write_text(text + "\n[control]\nenabled = false\n")
    text, accepted = _sigterm_in_window(
        script, role, str(config), lab.dir / f"{role}.log", "store: loading slowly", port
    )
    assert f"{role} ready" not in text and f"{role} stopped (mipsec " in text, text
    assert "listening" not in text.split("store: loading slowly", 1)[1], text
    assert accepted == []
    assert "Traceback" not in text


def test_sigterm_drains_an_exchange_in_flight(lab: Lab, tmp_path: Path) -> None:
    """SIGTERM between Init and Done: the HAC stops accepting, the MN's Done
    still gets its 200, then the HAC exits 0."""
    from rawmn import RawMN, psk_done, psk_init

    notes = {r: Notify(tmp_path / f"{r}.notify") for r in ("ha", "hac")}
    procs = {}
    try:
        for role in ("ha", "hac"):
            procs[role] = _start(lab, role, notes[role])
            notes[role].wait_for("READY=1")
        mn = RawMN("127.0.0.1", lab.hac_port, str(lab.dir / "pki" / "ca.pem"), "hac.mipsec.test")
        try:
            mn_rand, r1 = psk_init(mn, "demo@mipsec.test")
            procs["hac"].send_signal(signal.SIGTERM)
            notes["hac"].wait_for("STOPPING=1")
            # Not accepting any more: a new connection is refused.
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", lab.hac_port), timeout=2).close()
            final = psk_done(mn, mn_rand, r1, lab.psk)
            assert final.headers.get("status-code") == "200"
        finally:
            mn.close()
        assert procs["hac"].wait(timeout=30) == 0
        log = (lab.dir / "hac.log").read_text()
        assert "hac stopping (mipsec " in log and "hac stopped (mipsec " in log
        assert "still under way" not in log
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


STOPPROBE = [sys.executable, str(Path(__file__).with_name("stopprobe.py"))]


@pytest.mark.parametrize("at_start", [False, True], ids=["serving", "at-start"])
@pytest.mark.parametrize("role", ["hac", "ha"])
def test_stopping_is_announced_with_the_listener_closed(
    lab: Lab, role: str, at_start: bool
) -> None:
    """At the instant a role says STOPPING=1 (and "stopping" in its log) its
    listening port already refuses connections: the HAC's MN port, the HA's
    provisioning port.  tests/integration/stopprobe.py probes the port at
    that instant exactly; without ``stop_accepting()`` first, the probe is
    accepted.  ``at-start``: the SIGTERM comes the instant the port opened;
    the role still stops cleanly (exit 0), not by the signal's default
    action (the HAC did, once, with its handlers set after its listener)."""
    port = int(lab.info[role]["port"])
    out = lab.dir / f"{role}.probe.log"
    env = dict(os.environ, MIPSEC_STOP_PROBE=f"127.0.0.1:{port}")
    if at_start:
        env["MIPSEC_TERM_AFTER_START"] = "1"
    with out.open("ab") as f:
        p = subprocess.Popen(
            [*STOPPROBE, "--role", role, "--config", lab.info[role]["config"]],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        if not at_start:
            wait_port(port, p)
            p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, out.read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = out.read_text()
    assert "stop-probe: refused" in text, text
    assert f"{role} stopped (mipsec " in text, text
