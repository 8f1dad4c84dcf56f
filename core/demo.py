"""``mipsec demo``: a lab in a temporary directory, a real HA process, a real
HAC process and one real MN process talking TLS on loopback, narrated step
by step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mipsec.core.labsetup import free_port, init_lab, port_open


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if port_open(host, port):
            return True
        time.sleep(0.1)
    return False


def _launcher() -> list[str]:
    return [sys.executable, "-m", "mipsec.core.cli"]


def _start(role: str, config: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*_launcher(), "--role", role, "--config", config, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if role != "mn" else subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


# The signals that end the demo (cli.cmd_demo turns SIGTERM and SIGHUP into
# SystemExit, Python SIGINT into KeyboardInterrupt).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP ignored inside (main thread only: elsewhere
    no Python handler runs anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _clean_up(procs: dict[str, subprocess.Popen[str]], lab: Path, dump: bool) -> None:
    """Stop every role still running and remove the lab, whatever signals come.

    Runs with the stop signals ignored: a second SIGTERM or Ctrl-C during the
    cleanup raised out of its loop before, and left the HAC running in a
    deleted lab.  One that lands before they are set aside only starts the
    cleanup over (stopping a stopped role is harmless); it is raised once
    all is done.  ``dump``: each role's output goes to stderr (a failure).
    """
    interrupted: BaseException | None = None
    while True:
        try:
            with _stop_signals_ignored():
                while procs:
                    name, proc = next(iter(procs.items()))
                    out = _stop(proc)
                    del procs[name]
                    if dump or os.environ.get("MIPSEC_DEMO_VERBOSE"):
                        with contextlib.suppress(OSError, ValueError):
                            print(f"--- {name}", file=sys.stderr)
                            print(out, file=sys.stderr)
                shutil.rmtree(lab, ignore_errors=True)
            break
        except (KeyboardInterrupt, SystemExit) as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def run_demo(auth: str = "psk") -> int:
    """``auth``: ``psk`` (the lab MN's PSK) or ``eap-tls`` (its client
    certificate, EAP-TLS served by the HAC itself)."""
    lab = Path(tempfile.mkdtemp(prefix="mipsec-demo-"))
    procs: dict[str, subprocess.Popen[str]] = {}
    failed: list[str] = []  # a role did not start: its output is shown
    try:
        return _run(lab, procs, failed, auth)
    finally:
        _clean_up(procs, lab, dump=bool(failed))


def _run(lab: Path, procs: dict[str, subprocess.Popen[str]], failed: list[str], auth: str) -> int:
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        print(f"[{step}] {text}", flush=True)

    def did_not_start(what: str) -> int:
        print(f"demo: {what}:", file=sys.stderr)
        failed.append(what)
        return 1

    hac_port, ha_port = free_port(), free_port()
    info = init_lab(lab, hac_port=hac_port, ha_port=ha_port)
    eap = auth == "eap-tls"
    credential = (
        "a client certificate (rfc822Name SAN = its mn_id) and the HAC's EAP server "
        f"certificate for {info['eap']['server_name']}"
        if eap
        else "a random 32-octet PSK"
    )
    say(
        f"lab created in {lab}: test CA, HAC certificate for {info['hac']['server_name']}"
        f" and 127.0.0.1, MN {info['mn']['mn_id']} with {credential}"
    )
    procs["ha"] = _start("ha", info["ha"]["config"])
    say(
        f"HA starting (pid {procs['ha'].pid}): Binding Updates on UDP {ha_port}, "
        f"SA provisioning over mutually authenticated TLS on TCP {ha_port}"
    )
    if not wait_for_port("127.0.0.1", ha_port, 20, procs["ha"]):
        return did_not_start("the HA did not start")
    procs["hac"] = _start("hac", info["hac"]["config"])
    say(
        f"HAC starting (pid {procs['hac'].pid}): TLS on 127.0.0.1:{hac_port}; "
        "it provisions SAs to the HA with the 'tls' transport"
    )
    if not wait_for_port("127.0.0.1", hac_port, 20, procs["hac"]):
        return did_not_start("the HAC did not start")
    say(
        "MN bootstrapping: TLS to the HAC, certificate checked (SAN, CA), "
        + (
            "then EAP inside it: Identity, EAP-TLS with client certificates "
            "run by the HAC, auth keyed with the MSK and bound to "
            "tls-server-end-point"
            if eap
            else "PSK exchange bound to tls-server-end-point"
        )
    )
    # Kept in ``procs`` until it exits, so that a signal meanwhile stops it too.
    config = str(lab / "mn-eap-tls.toml") if eap else info["mn"]["config"]
    procs["mn"] = _start("mn", config, "--once", "--json")
    try:
        stdout, stderr = procs["mn"].communicate(timeout=90)
    except subprocess.TimeoutExpired:
        stdout, stderr = "", "the MN did not finish within 90 s"
    else:
        del procs["mn"]
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print("demo: the MN printed no result:", stdout, stderr, file=sys.stderr)
        return 1
    if result.get("status") != 200:
        say(f"bootstrap FAILED: status {result.get('status')}: {result.get('reason')}")
        return 1
    sa = result["sa"]
    say(
        f"HAC answered status 200 once the HA had confirmed the SA: SPI {sa['spi']}, "
        f"suite {sa['suite']} {sa['suite_id']}, scope {sa['scope']} "
        f"({'signalling and data' if sa['scope'] else 'signalling only'}), "
        f"valid until {sa['validity_end']}"
    )
    say("bootstrap data received:")
    for k, v in result["bootstrap"].items():
        print(f"      {k}: {v}")
    ba = result.get("ba") or {}
    say(f"MN sent a protected Binding Update (PType 8, SPI {sa['spi']}) to the HA")
    if ba.get("status") is None:
        say(f"no Binding Acknowledgement: {ba.get('reason')}")
        return 1
    say(
        f"HA answered a protected Binding Acknowledgement: status {ba['status']}, "
        f"lifetime {ba['lifetime']} s, sequence {ba['sequence']}"
    )
    ha_log = _stop(procs["ha"])  # stays listed until stopped: a signal meanwhile stops it
    del procs["ha"]
    if os.environ.get("MIPSEC_DEMO_VERBOSE"):
        print(ha_log)
    for line in ha_log.splitlines():
        if "binding" in line and "added" in line:
            say("HA log: " + line.split(": ", 1)[-1])
    if ba["status"] != 0:
        return 1
    say("done: the MN holds its SA and is registered with its HA")
    return 0
