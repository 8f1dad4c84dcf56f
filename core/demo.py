"""``mipsec demo``: a lab in a temporary directory, a real HAC process and one
real MN process talking TLS on loopback, narrated step by step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
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


def _start(role: str, config: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*_launcher(), "--role", role, "--config", config],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
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


def run_demo(auth: str = "psk") -> int:
    """``auth``: ``psk`` (the lab MN's PSK) or ``eap-tls`` (its client
    certificate, EAP-TLS served by the HAC itself)."""
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        print(f"[{step}] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mipsec-demo-") as tmp:
        lab = Path(tmp)
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
        procs: dict[str, subprocess.Popen[str]] = {}
        try:
            procs["ha"] = _start("ha", info["ha"]["config"])
            say(
                f"HA starting (pid {procs['ha'].pid}): Binding Updates on UDP {ha_port}, "
                f"SA provisioning over mutually authenticated TLS on TCP {ha_port}"
            )
            if not wait_for_port("127.0.0.1", ha_port, 20, procs["ha"]):
                return _failed("the HA did not start", procs)
            procs["hac"] = _start("hac", info["hac"]["config"])
            say(
                f"HAC starting (pid {procs['hac'].pid}): TLS on 127.0.0.1:{hac_port}; "
                "it provisions SAs to the HA with the 'tls' transport"
            )
            if not wait_for_port("127.0.0.1", hac_port, 20, procs["hac"]):
                return _failed("the HAC did not start", procs)
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
            mn = subprocess.run(
                [
                    *_launcher(),
                    "--role",
                    "mn",
                    "--config",
                    str(lab / "mn-eap-tls.toml") if eap else info["mn"]["config"],
                    "--once",
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=90,
                env=dict(os.environ),
            )
            try:
                result = json.loads(mn.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                print("demo: the MN printed no result:", mn.stdout, mn.stderr, file=sys.stderr)
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
            ha_log = _stop(procs.pop("ha"))
            for line in ha_log.splitlines():
                if "binding" in line and "added" in line:
                    say("HA log: " + line.split(": ", 1)[-1])
            if ba["status"] != 0:
                return 1
            say("done: the MN holds its SA and is registered with its HA")
            return 0
        finally:
            for p in procs.values():
                out = _stop(p)
                if os.environ.get("MIPSEC_DEMO_VERBOSE"):
                    print(out)


def _failed(what: str, procs: dict[str, subprocess.Popen[str]]) -> int:
    print(f"demo: {what}:", file=sys.stderr)
    for name, p in procs.items():
        print(f"--- {name}", file=sys.stderr)
        print(_stop(p), file=sys.stderr)
    procs.clear()
    return 1
