"""``mipsec demo``: a lab in a temporary directory, a real HAC process and one
real MN process talking TLS on loopback, narrated step by step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mipsec.core.labsetup import init_lab


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _launcher() -> list[str]:
    return [sys.executable, "-m", "mipsec.core.cli"]


def run_demo() -> int:
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        print(f"[{step}] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mipsec-demo-") as tmp:
        lab = Path(tmp)
        hac_port = free_port()
        info = init_lab(lab, hac_port=hac_port, ha_port=free_port(socket.SOCK_DGRAM))
        say(
            f"lab created in {lab}: test CA, HAC certificate for {info['hac']['server_name']}"
            f" and 127.0.0.1, MN {info['mn']['mn_id']} with a random 32-octet PSK"
        )
        env = dict(os.environ)
        hac = subprocess.Popen(
            [*_launcher(), "--role", "hac", "--config", info["hac"]["config"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            say(f"HAC starting: TLS on 127.0.0.1:{hac_port} (pid {hac.pid})")
            if not wait_for_port("127.0.0.1", hac_port, 20, hac):
                print("demo: the HAC did not start:", file=sys.stderr)
                hac.kill()
                print(hac.communicate()[0], file=sys.stderr)
                return 1
            say(
                "MN bootstrapping: TLS to the HAC, certificate checked (SAN, CA), "
                "PSK exchange bound to tls-server-end-point"
            )
            mn = subprocess.run(
                [
                    *_launcher(),
                    "--role",
                    "mn",
                    "--config",
                    info["mn"]["config"],
                    "--once",
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            try:
                result = json.loads(mn.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                print("demo: the MN printed no result:", mn.stdout, mn.stderr, file=sys.stderr)
                return 1
            if not result.get("ok"):
                say(f"bootstrap FAILED: status {result.get('status')}: {result.get('reason')}")
                return 1
            sa = result["sa"]
            say(f"HAC answered status {result['status']}: SA issued")
            print(
                f"      SPI {sa['spi']}, suite {sa['suite']} {sa['suite_id']}, "
                f"scope {sa['scope']} ({'signalling and data' if sa['scope'] else 'signalling'})"
                f", valid until {sa['validity_end']}"
            )
            say("bootstrap data received:")
            for k, v in result["bootstrap"].items():
                print(f"      {k}: {v}")
            say("done: the MN holds its SA and bootstrap data")
            return 0
        finally:
            hac.terminate()
            try:
                out = hac.communicate(timeout=10)[0]
            except subprocess.TimeoutExpired:
                hac.kill()
                out = hac.communicate()[0]
            if os.environ.get("MIPSEC_DEMO_VERBOSE"):
                print(out)
