"""How long ``mipsec --role ha`` takes to start with N SAs and N bindings, against an empty HA.

    python bench/ha_start.py [--n 100000] [--quick] [--runs 2]

Two labs are made in a temp dir (``mipsec init``: the HA keeps its binding
cache in its SA store's SQLite file, ``[bindings] in_sa_store``).  Before the
HA starts, one store is filled with a single SA (the probe) and the other
with the probe and N - 1 more, each with its binding (registered, BU
Sequence # 1) and its replay records (``spi_state``) -- what an HA holding N
registered MNs leaves on disk.  They are written the way the HA writes them
(``SQLiteSAStore.add_bulk``, then ``HaCore.install_sa`` and one flush of the
``BindingCache`` on the store's connection).

Measured for each, alternately (``--runs`` times, best kept):

* start -> first BA: from spawning ``mipsec --role ha`` until the probe MN's
  refresh BU (Sequence # 2, protected under its SA) gets a BA that passes the
  MN's checks (ESP, MH checksum, status 0, its sequence).  The BU is re-sent
  every 10 ms until then, so this is the time until the HA serves that MN.
  The probe's SA has the highest SPI: the HA opens its sockets after its
  first LOAD_FIRST SAs and loads the rest while it serves, so this SA is the
  last one the load reaches -- its BU is served by loading it on demand;
* start -> all loaded: until the HA's "N SAs from the store" line;
* RSS of the HA at that moment.

Figures and the ratio N / empty are printed, never judged.  ``--quick`` (CI)
is N = 5,000 and one start each.

``--kill F[,F...]``: after the measurement, the N-SA HA is killed (SIGKILL,
no cleanup) at each fraction F of its measured start time -- while it loads
its rows, flushes their records or opens its sockets -- and then started
again on the same files.  For each kill the bench prints the restart's start
-> first BA and what the restarted HA reports holding ("N SAs from the
store, N bindings from the cache"); a restart that does not serve, or holds
fewer than N, ends the bench with an error.  The bench stops the HAs it started and
removes its temp dir.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import _mipsec_cmd, precompile
from ha import HAA, _issue, _Mn  # a sibling script: the same SAs, MNs and BA checks
from scale import _rss, fill_ha_store, mipsec_init

from mipsec.core.model import IssuedSA
from mipsec.core.suites import Suite

SPI_BASE = 4096
RESEND = 0.01  # seconds between the probe's BUs while the HA starts
START_LIMIT = 300.0  # seconds: an HA not serving by then is a failure


def make_lab(root: Path, n: int) -> tuple[Path, IssuedSA, int]:
    """A ``mipsec init`` lab whose HA store holds ``n`` SAs and bindings; the
    probe's SA (the last in SPI order: the last one the HA's load reaches,
    so its first BA takes the path of an SA not loaded yet) and the HA's UDP port."""
    lab = root / f"ha-{n}"
    info = mipsec_init(lab)
    ha_toml = lab / "ha.toml"
    text = ha_toml.read_text()
    # The bench's SAs name HAA as their HA address (the MH checksum uses it).
    old = 'address6 = "::1"'
    if old not in text:
        raise RuntimeError(f"{ha_toml}: no {old!r} to replace")
    ha_toml.write_text(text.replace(old, f'address6 = "{HAA}"'))
    issued = _issue(Suite.AES_128_CBC_SHA256, n, SPI_BASE)
    fill_ha_store(lab, issued)
    return lab, issued[-1], int(info["ha"]["port"])


def start_to_ba(lab: Path, probe_sa: IssuedSA, port: int) -> tuple[float, float, int]:
    """Seconds from spawning the HA to the probe's first valid BA, and to the
    end of its load (its "N SAs from the store" line); its RSS then."""
    # A new MN end each start: every start begins from the same files, so the
    # HA's HA->MN ESP counter resumes at the same mark, and an MN end that
    # saw the previous start's BA would take this one for a replay.
    probe = _Mn(probe_sa)
    log = (lab / "ha-bench.log").open("wb")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(RESEND)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*_mipsec_cmd(None), "--role", "ha", "--config", str(lab / "ha.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while True:
            if proc.poll() is not None:
                tail = (lab / "ha-bench.log").read_text()[-2000:]
                raise RuntimeError(f"the HA exited ({proc.returncode}): {tail}")
            if time.monotonic() - t0 > START_LIMIT:
                raise RuntimeError(f"no BA within {START_LIMIT:.0f} s")
            sock.sendto(probe.bu(2), ("127.0.0.1", port))
            try:
                datagram = sock.recv(2048)
            except (TimeoutError, ConnectionRefusedError):
                continue
            if probe.ba_ok(datagram, 2):
                first_ba = time.monotonic() - t0
                break
            raise RuntimeError("the probe's BU got an answer that is not a valid BA")
        # The HA serves before it has loaded every SA: wait for the end of the load.
        while not re.search(
            r"\d+ SAs from the store, \d+ bindings", (lab / "ha-bench.log").read_text()
        ):
            if proc.poll() is not None or time.monotonic() - t0 > START_LIMIT:
                raise RuntimeError("the HA never reported the end of its load")
            time.sleep(0.01)
        return first_ba, time.monotonic() - t0, _rss(proc.pid)
    finally:
        sock.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _held(lab: Path) -> tuple[int, int]:
    """The SAs and bindings the last HA start in ``lab`` reported loading."""
    text = (lab / "ha-bench.log").read_text()
    found = re.findall(r": (\d+) SAs from the store, (\d+) bindings from the cache", text)
    if not found:
        raise RuntimeError(f"no start report in the HA's log: {text[-2000:]}")
    sas, bindings = found[-1]
    return int(sas), int(bindings)


def killed_starts(
    lab: Path, probe: IssuedSA, port: int, n: int, start: float, fractions: list[float]
) -> None:
    """SIGKILL the N-SA HA at each fraction of its start, then start it again."""
    print(f"SIGKILL during the start of the {n:,}-SA HA, then a restart on the same files:")
    print(f"{'kill at (s)':>12} | {'restart -> first BA (s)':>23} | {'SAs held':>9} | bindings")
    for fraction in fractions:
        run = lab.parent / "killed"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(lab, run)
        with (run / "ha-bench.log").open("wb") as log:
            proc = subprocess.Popen(
                [*_mipsec_cmd(None), "--role", "ha", "--config", str(run / "ha.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        at = fraction * start
        time.sleep(at)
        if proc.poll() is not None:
            raise RuntimeError(f"the HA exited ({proc.returncode}) before its kill at {at:.2f} s")
        proc.kill()
        proc.wait(timeout=30)
        seconds, _, _ = start_to_ba(run, probe, port)
        sas, bindings = _held(run)
        print(f"{at:12.2f} | {seconds:23.2f} | {sas:9,} | {bindings:,}")
        if sas != n or bindings != n:
            raise RuntimeError(f"the restart after a kill at {at:.2f} s holds {sas} SAs, "
                               f"{bindings} bindings, not {n}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="SAs and bindings (100000)")
    p.add_argument("--quick", action="store_true", help="N = 5000, one start each (CI)")
    p.add_argument("--runs", type=int, default=2, help="starts of each HA, best kept (2)")
    p.add_argument(
        "--kill",
        default="",
        help="SIGKILL the N-SA HA at these fractions of its start time, then restart it "
        "(e.g. 0.2,0.5,0.8,0.95)",
    )
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.kill.split(",") if f.strip()]
    n = 5_000 if args.quick else args.n
    runs = 1 if args.quick else args.runs
    precompile()  # the HA's start is timed: as an installed wheel, with bytecode
    root = Path(tempfile.mkdtemp(prefix="mipsec-ha-start-"))
    try:
        t = time.monotonic()
        labs = {size: make_lab(root, size) for size in (1, n)}
        print(f"filled the HA stores (1 and {n:,} SAs + bindings) in {time.monotonic() - t:.1f} s")
        best: dict[int, tuple[float, float, int]] = {}
        for _ in range(runs):
            for size, (lab, probe, port) in labs.items():
                # Each start is a fresh copy: a start rewrites nothing it
                # loads, but the previous run's refresh would change the probe.
                run = root / "run"
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(lab, run)
                seconds, loaded, rss = start_to_ba(run, probe, port)
                if size not in best or seconds < best[size][0]:
                    best[size] = (seconds, loaded, rss)
        (s0, l0, r0), (sn, ln, rn) = best[1], best[n]
        print(f"{'':>22} | {'empty (1 SA)':>14} | {f'{n:,} SAs':>14} | ratio")
        print(f"{'start -> first BA (s)':>22} | {s0:14.2f} | {sn:14.2f} | {sn / s0:5.2f}")
        print(f"{'start -> all loaded (s)':>22} | {l0:14.2f} | {ln:14.2f} | {ln / l0:5.2f}")
        print(f"{'HA RSS then (MB)':>22} | {r0 / 1e6:14.1f} | {rn / 1e6:14.1f} | {rn / r0:5.2f}")
        per = (rn - r0) / (n - 1) / 1024
        print(f"RSS per SA + binding: {per:.2f} KB; best of {runs} starts")
        if fractions:
            lab, probe, port = labs[n]
            killed_starts(lab, probe, port, n, sn, fractions)
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
