"""Server CPU per ClientHello of a flood, with and without the protection:
the HA's provisioning port with and without ``allowed_clients`` (``--role
ha``, the default), or the HAC's MN port with and without ``[hac]
per_source_rate`` (``--role hac``: 10 per second, burst 20).

    python bench/hello_flood.py [--role ha|hac] [--rate 600] [--duration 10] [--quick]

The attack the listener's ``allowed_clients`` is for: processes that replay
one complete, canned ClientHello (no crypto of their own) from 127.0.0.2 at
``--rate`` connections per second in total, each read until the server's
first flight or a reset.  Without the list the HA answers every one with a
key exchange and a signature; with it the connection is closed as it is
accepted.  The HA is a real ``mipsec --role ha`` of a ``mipsec init`` lab
(the list removed for the baseline, as ``mipsec init`` writes it otherwise),
started afresh for each mode; no HAC or MN runs, so its CPU is the flood's.

Prints, per mode: connections made, how many got a server flight, the HA's
CPU seconds and µs per connection, and the ratio to the baseline (the HA
without the list) measured in the same run.  Never asserts.  ``--quick``:
2 s per mode (CI).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import ssl
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import _mipsec_cmd, _proc_cpu, _spawn, _stop, _wait_tcp  # sibling scripts
from scale import mipsec_init

ATTACKERS = 2
SOURCE = "127.0.0.2"  # loopback, but outside the lab's allowed_clients
LIST = 'allowed_clients = ["127.0.0.1"]'


def canned_hello() -> bytes:
    """One ClientHello (TLS 1.3 and 1.2 offered), made once and replayed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(bio_in, bio_out, server_hostname="ha.mipsec.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return bio_out.read()


def attacker(port: int, rate: float, until: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    hello = canned_hello()
    made = answered = 0
    t0 = time.monotonic()
    while time.monotonic() < until:
        if made >= (time.monotonic() - t0) * rate:
            time.sleep(0.001)
            continue
        s = socket.socket()
        try:
            s.settimeout(2)
            s.bind((SOURCE, 0))
            s.connect(("127.0.0.1", port))
            made += 1
            s.sendall(hello)
            if s.recv(4096):
                answered += 1  # the server's flight: it did the key exchange and signed
        except OSError:
            pass  # reset at accept (the list), or before the hello left
        finally:
            s.close()
    out.put((made, answered))


PER_SOURCE = "per_source_rate = 10\nper_source_burst = 20\n"


def one_mode(
    root: Path, role: str, protected: bool, rate: float, duration: float
) -> tuple[int, int, float]:
    """Flood ``role``'s port (the HA's provisioning port, or the HAC's MN
    port), with or without its protection; (connections, flights, CPU s)."""
    lab = root / ("protected" if protected else "open")
    info = mipsec_init(lab)
    toml = Path(info[role]["config"])
    text = toml.read_text()
    if role == "ha":
        if LIST not in text:
            raise RuntimeError(f"{toml}: no {LIST!r}")
        if not protected:
            toml.write_text(text.replace(LIST, ""))
        with toml.open("rb") as f:
            port = int(tomllib.load(f)["provisioning"]["port"])
    else:
        if protected:
            toml.write_text(text.replace("[hac]\n", "[hac]\n" + PER_SOURCE, 1))
        port = int(info["hac"]["port"])
    log = root / f"{role}.log"
    proc = _spawn([*_mipsec_cmd(None), "--role", role, "--config", str(toml)], log)
    try:
        asyncio.run(_wait_tcp(port, proc, log))
        time.sleep(0.5)  # past its start-up work
        queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        until = time.monotonic() + duration
        cpu0 = _proc_cpu(proc.pid)
        procs = [
            mp.Process(target=attacker, args=(port, rate / ATTACKERS, until, queue))
            for _ in range(ATTACKERS)
        ]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        cpu = _proc_cpu(proc.pid) - cpu0
    finally:
        _stop(proc)
    return sum(r[0] for r in results), sum(r[1] for r in results), cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=600.0, help="connections/s in total (600)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per mode (10)")
    ap.add_argument("--quick", action="store_true", help="2 s per mode (CI)")
    ap.add_argument(
        "--role",
        choices=("ha", "hac"),
        default="ha",
        help="ha: its provisioning port, allowed_clients; hac: its MN port, per_source_rate",
    )
    args = ap.parse_args(argv)
    duration = 2.0 if args.quick else args.duration
    if args.role == "ha":
        where, key, name = "the HA's provisioning port", "allowed_clients", '["127.0.0.1"]'
    else:
        where, key, name = "the HAC's MN port", "per_source_rate", "10/s, burst 20"
    print(
        f"mipsec ClientHello flood bench: {ATTACKERS} processes replaying one ClientHello "
        f"from {SOURCE} at {args.rate:.0f} connections/s for {duration:.0f} s against {where}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="mipsec-flood-") as tmp:
        for protected in (False, True):
            got = one_mode(Path(tmp) / str(protected), args.role, protected, args.rate, duration)
            rows.append((protected, *got))
    base = rows[0][3] / rows[0][1] if rows[0][1] else float("nan")
    who = args.role.upper()
    print(f"{key:>16} | connections | server flights | {who} CPU s | µs/conn | ratio")
    for protected, made, answered, cpu in rows:
        per = cpu / made if made else float("nan")
        print(
            f"{name if protected else '(none)':>16} | {made:11d} | {answered:14d} | "
            f"{cpu:{len(who) + 6}.2f} | {1e6 * per:7.0f} | {per / base:5.2f}"
        )
    print(f"ratio = {who} CPU per connection / the same without {key}, this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
