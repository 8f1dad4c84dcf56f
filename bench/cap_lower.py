"""A reload that lowers ``[hac] max_connections`` under many held connections:
how long the HAC's loop stalls while it closes the ones over the new cap.

    python bench/cap_lower.py [--connections 15000] [--cap 100] [--quick]

A real ``mipsec --role hac`` (and its HA) of a ``mipsec init`` lab, its cap
raised above ``--connections`` and its handshake timeout to 600 s; this
process opens that many idle TCP connections to it, then a probe thread
makes TLS handshakes to it back to back while the configuration is edited
to ``--cap`` and the HAC gets SIGHUP.  Prints the probe's handshake times
before the reload (the baseline) and in the 2 s from it, their ratio, how
many of the held connections the HAC closed, and the HAC's own reload
lines.  Never asserts.  The connections are bounded by this process's
open-file limit (raised to its hard limit).  ``--quick``: 2,000 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import _mipsec_cmd, _spawn, _stop, _wait_tcp  # sibling scripts
from scale import mipsec_init


def _probe(port: int, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    while not stop.is_set():
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), 5) as raw:
                with ctx.wrap_socket(raw):
                    pass
            out.append((started, time.monotonic() - started))
        except OSError:
            out.append((started, -1.0))
        stop.wait(0.005)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=15000)
    ap.add_argument("--cap", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 2000 if args.quick else args.connections
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if n + 100 > hard:
        sys.exit(f"--connections {n}: the open-file limit is {hard}")
    with tempfile.TemporaryDirectory(prefix="mipsec-bench-") as tmp:
        info = mipsec_init(Path(tmp) / "lab")
        hac_toml = Path(info["hac"]["config"])
        text = re.sub(r"handshake_timeout = \d+", "handshake_timeout = 600", hac_toml.read_text())
        text = re.sub(r"max_connections = \d+", f"max_connections = {n + 100}", text, count=1)
        hac_toml.write_text(text)
        port = int(info["hac"]["port"])
        log = Path(tmp) / "hac.log"
        cmd = _mipsec_cmd(None)
        ha_log = Path(tmp) / "ha.log"
        ha = _spawn([*cmd, "--role", "ha", "--config", info["ha"]["config"]], ha_log)
        hac = None
        held: list[socket.socket] = []
        try:
            asyncio.run(_wait_tcp(int(info["ha"]["port"]), ha, ha_log))
            hac = _spawn([*cmd, "--role", "hac", "--config", str(hac_toml)], log)
            asyncio.run(_wait_tcp(port, hac, log))
            started = time.monotonic()
            for _ in range(n):
                held.append(socket.create_connection(("127.0.0.1", port), 5))
            print(f"{n} idle connections held ({time.monotonic() - started:.1f} s to open)")
            time.sleep(2.0)
            lat: list[tuple[float, float]] = []
            stop = threading.Event()
            probe = threading.Thread(target=_probe, args=(port, stop, lat))
            probe.start()
            time.sleep(1.0)
            hac_toml.write_text(
                hac_toml.read_text().replace(
                    f"max_connections = {n + 100}", f"max_connections = {args.cap}"
                )
            )
            hup = time.monotonic()
            hac.send_signal(signal.SIGHUP)
            time.sleep(2.5)
            stop.set()
            probe.join()
            before = [x for t, x in lat if t < hup and x >= 0]
            around = [x for t, x in lat if hup - 0.2 <= t < hup + 2 and x >= 0]
            failed = sum(1 for _, x in lat if x < 0)
            closed = 0
            for s in held:
                s.setblocking(False)
                try:
                    closed += s.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
            b, a = max(before) * 1e3, max(around) * 1e3
            print(f"probe TLS handshake, worst: before the reload {b:.1f} ms ({len(before)})")
            print(f"                            in the 2 s from it {a:.1f} ms ({len(around)})")
            print(f"ratio {a / b:.1f}x; {failed} probe handshakes failed")
            print(f"held connections closed by the HAC: {closed} of {n} (cap {args.cap})")
            for line in log.read_text().splitlines():
                if "reload" in line or "max_connections" in line:
                    print("  HAC:", line[:240])
        finally:
            for s in held:
                s.close()
            if hac is not None:
                _stop(hac)
            _stop(ha)


if __name__ == "__main__":
    main()
