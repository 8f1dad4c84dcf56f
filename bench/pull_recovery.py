"""An HA that lost its store pulls its MNs back from the HAC (PROFILE §9).

Measured, not assumed: a ``mipsec init`` lab in the default deployment (HA
in its own process), its HAC holding N live SAs provisioned to HA ``ha1``
and serving pulls (``[provisioning]`` on the HAC), its HA started with an
empty store (a replaced disk) and ``[pull]`` towards the HAC.  N raw MNs
(tests/integration/rawha.py) then do what an MN does when its BU goes
unanswered (RFC 6275 §11.8): each sends its first BU at a random instant of
the first ``--spread`` seconds, and retransmits after 1.5 s, then doubling
(at most 32 s), until a BA with status 0 arrives.

Printed per run: seconds until 50 %, 90 % and 100 % of the MNs were
registered again, the HA's pull counters (``mipsec status``: pulls, found,
deferred, limited), BUs sent, and HAC and HA CPU per pulled MN.  Two runs
by default: the ``[pull]`` defaults (20 a second, bursts of 50, 16 at
once) -- the baseline -- and the limits of ``--rate``/``--burst``/
``--max-in-flight``; the ratio is the time to 100 %.

    python bench/pull_recovery.py [--n 2000] [--rate 500] [--burst 1000]
        [--max-in-flight 64] [--spread 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import selectors
import socket
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from bootstrap import _mipsec_cmd, _proc_cpu, _spawn, _stop, _wait_for, precompile
from rawha import RawSA, binding_update, parse_ba
from scale import _fill_credentials, _live_sas, _make_lab

from mipsec.core.labsetup import free_port
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

RETRANSMIT_FIRST = 1.5  # s: RFC 6275 InitialBindackTimeoutFirstReg
RETRANSMIT_MAX = 32.0  # s: MAX_BINDACK_TIMEOUT
GIVE_UP = 600.0  # s: a run that has not finished by then is reported as such


@dataclass
class _Mn:
    sa: RawSA
    hoa: str
    due: float  # next BU at (loop time)
    wait: float = RETRANSMIT_FIRST
    seq: int = 1
    done_at: float | None = None
    sent: int = 0


def _configure(lab: Path, pull_port: int, limits: dict[str, int | float]) -> None:
    """The HAC's pull listener and the HA's ``[pull]`` (the lab's own PKI)."""
    hac = lab / "hac.toml"
    hac.write_text(
        hac.read_text() + "\n[provisioning]            # HAs pull SAs of SPIs they do not know\n"
        f'listen = ["127.0.0.1"]\nport = {pull_port}\n'
        'cert = "pki/hac.pem"\nkey = "pki/hac.key"\nclient_ca = "pki/ca.pem"\n'
        'client_names = ["ha.mipsec.test"]\nmax_connections = 256\n'
    )
    extra = "".join(f"{k} = {v}\n" for k, v in limits.items())
    ha = lab / "ha.toml"
    ha.write_text(
        ha.read_text()
        + f'\n[pull]\nhost = "127.0.0.1"\nport = {pull_port}\nserver_name = "hac.mipsec.test"\n'
        'ca = "pki/ca.pem"\ncert = "pki/ha.pem"\nkey = "pki/ha.key"\ntimeout = 5\n' + extra
    )


def _ha_counters(metrics_url: str) -> dict[str, Any]:
    """The HA's pull counters from its Prometheus endpoint
    (``mipsec_ha_pulls_total{outcome}``; a control socket may be off: a
    lab under a long temporary directory has no room for its path)."""
    with urllib.request.urlopen(metrics_url, timeout=30) as resp:
        text = resp.read().decode()
    got = dict(re.findall(r'^mipsec_ha_pulls_total\{outcome="(\w+)"\} ([\d.e+]+)$', text, re.M))
    names = {"started": "pulls", "found": "pulls_found", "deferred": "pulls_deferred",
             "limited": "pulls_limited", "refused": "pulls_refused"}  # fmt: skip
    return {names[k]: int(float(v)) for k, v in got.items() if k in names}


def _source(i: int) -> str:
    """MN ``i``'s own source address on loopback (127.1.0.1 ...): the HA's
    per-source pull buckets see N MNs, as they would behind N care-of
    addresses, not one source asking for N SPIs."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


async def _mns(mns: dict[int, _Mn], ha: tuple[str, int], spread: float) -> float:
    """Drive the MNs until every one has its BA 0 (or GIVE_UP); the elapsed seconds."""
    loop = asyncio.get_running_loop()
    sel = selectors.DefaultSelector()
    socks: dict[int, socket.socket] = {}
    t0 = loop.time()
    try:
        for i, (spi, mn) in enumerate(mns.items()):
            s = socks[spi] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((_source(i), 0))
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, mn)
            mn.due = t0 + random.uniform(0, spread)
        left = len(mns)
        while left and loop.time() - t0 < GIVE_UP:
            now = loop.time()
            for spi, mn in mns.items():
                if mn.done_at is None and mn.due <= now:
                    bu = mn.sa.protect(binding_update(mn.seq, 25, mn.hoa, "::1"))
                    socks[spi].sendto(bu, ha)
                    mn.seq += 1
                    mn.sent += 1
                    mn.due = now + mn.wait
                    mn.wait = min(2 * mn.wait, RETRANSMIT_MAX)
            for key, _ in sel.select(0):
                mn = key.data
                try:
                    pkt = key.fileobj.recv(2048)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                if mn.done_at is not None:
                    continue
                _, nh, mh = mn.sa.unprotect(pkt)
                if nh == 135 and parse_ba(mh)["status"] == 0:
                    mn.done_at = loop.time() - t0
                    left -= 1
            await asyncio.sleep(0.01)
    finally:
        sel.close()
        for s in socks.values():
            s.close()
    return loop.time() - t0


def _at(done: list[float], n: int, share: float) -> str:
    k = int(n * share + 0.999999) - 1
    return f"{done[k]:.1f}" if k < len(done) else "-"


async def one_run(root: Path, name: str, n: int, limits: dict[str, int | float], spread: float):
    """One lab, one HA recovery; the figures as a dict."""
    lab, info = _make_lab(root, name, local_provisioning=False)
    _fill_credentials(lab / "creds.sqlite", iter([]))  # the HAC's backend; no MN bootstraps
    sas = list(_live_sas(n, timedelta(hours=6)))
    with SQLiteSAStore(lab / "hac-sa.sqlite", key_file=lab / "hac-sa.key") as store:
        store.add_bulk(sas)
    _configure(lab, free_port(), limits)
    ha_port = int(info["ha"]["port"])
    ha_proc = _spawn([*_mipsec_cmd(None), "--role", "ha", "--config", str(lab / "ha.toml")],
                     lab / "ha.log")  # fmt: skip
    hac_proc = _spawn([*_mipsec_cmd(None), "--role", "hac", "--config", str(lab / "hac.toml")],
                      lab / "hac.log")  # fmt: skip
    try:
        _wait_for(r"(\d+) SAs from the store", (lab / "ha.log").read_text, ha_proc)
        _wait_for(r"HAC listening on 127\.0\.0\.1 port (\d+)", (lab / "hac.log").read_text,
                  hac_proc)  # fmt: skip
        mns = {
            x.sa.spi: _Mn(
                RawSA(
                    "{00,3C}",  # Suite.AES_128_CBC_SHA256, as _live_sas issues them
                    x.sa.spi,
                    x.sa.mn_to_ha_ikey,
                    x.sa.mn_to_ha_ekey,
                    x.sa.ha_to_mn_ikey,
                    x.sa.ha_to_mn_ekey,
                ),
                str(x.bootstrap.ip6_hoa),
                0.0,
            )
            for x in sas
        }
        cpu0 = (_proc_cpu(hac_proc.pid), _proc_cpu(ha_proc.pid))
        elapsed = await _mns(mns, ("127.0.0.1", ha_port), spread)
        cpu1 = (_proc_cpu(hac_proc.pid), _proc_cpu(ha_proc.pid))
        counters = _ha_counters(str(info["ha"]["metrics"]))
    finally:
        _stop(hac_proc)
        _stop(ha_proc)
    done = sorted(m.done_at for m in mns.values() if m.done_at is not None)
    found = max(1, int(counters.get("pulls_found", len(done)) or 1))
    return {
        "name": name,
        "limits": limits,
        "registered": len(done),
        "elapsed": elapsed,
        "t50": _at(done, n, 0.5),
        "t90": _at(done, n, 0.9),
        "t100": _at(done, n, 1.0),
        "t100_s": done[-1] if len(done) == n else float("inf"),
        "bus": sum(m.sent for m in mns.values()),
        "counters": {k: counters.get(k, "?") for k in
                     ("pulls", "pulls_found", "pulls_deferred", "pulls_limited", "pulls_refused")},
        "hac_ms": 1000 * (cpu1[0] - cpu0[0]) / found,
        "ha_ms": 1000 * (cpu1[1] - cpu0[1]) / found,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="MNs whose SAs the HA lost (2000)")
    ap.add_argument("--rate", type=float, default=500.0, help="[pull] rate of the second run")
    ap.add_argument("--burst", type=int, default=1000, help="[pull] burst of the second run")
    ap.add_argument("--max-in-flight", type=int, default=64, help="[pull] max_in_flight (64)")
    ap.add_argument("--spread", type=float, default=5.0, help="s over which first BUs start (5)")
    ap.add_argument("--quick", action="store_true", help="N = 200, spread 1 s (CI)")
    args = ap.parse_args(argv)
    n, spread = (200, 1.0) if args.quick else (args.n, args.spread)
    precompile()
    configured = {"rate": args.rate, "burst": args.burst, "max_in_flight": args.max_in_flight}
    with tempfile.TemporaryDirectory(prefix="mipsec-pull-") as tmp:
        runs = [
            asyncio.run(one_run(Path(tmp), "defaults", n, {}, spread)),
            asyncio.run(one_run(Path(tmp), "configured", n, configured, spread)),
        ]
    print(f"mipsec pull recovery bench: an HA that lost its store, {n} MNs re-registering "
          f"(first BUs over {spread:g} s, RFC 6275 retransmissions), "
          "HAC serving pulls")  # fmt: skip
    print("note: each MN sends from an address of its own (127.1.x.y), as MNs behind their own "
          "care-of addresses; per-source limits stay at their defaults in both runs")  # fmt: skip
    print(f"\n{'[pull] limits':<44} | registered | 50 % s | 90 % s | 100 % s | BUs sent | "
          "pulls / found / deferred / limited | HAC ms/MN | HA ms/MN")  # fmt: skip
    for r in runs:
        lim = r["limits"] or {"rate": 20, "burst": 50, "max_in_flight": 16}
        label = ", ".join(f"{k}={v:g}" for k, v in lim.items())
        c = r["counters"]
        print(f"{r['name'] + ': ' + label:<44} | {r['registered']:>10} | {r['t50']:>6} | "
              f"{r['t90']:>6} | {r['t100']:>7} | {r['bus']:>8} | "
              f"{c['pulls']} / {c['pulls_found']} / {c['pulls_deferred']} / {c['pulls_limited']}"
              f" | {r['hac_ms']:9.2f} | {r['ha_ms']:8.2f}")  # fmt: skip
    base, conf = runs
    if base["t100_s"] != float("inf") and conf["t100_s"] != float("inf"):
        print(f"\ntime to 100 %: configured / defaults = {conf['t100_s'] / base['t100_s']:.2f}")
    bad = [r["name"] for r in runs if r["registered"] != n]
    if bad:
        print(f"not every MN registered again within {GIVE_UP:.0f} s: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
