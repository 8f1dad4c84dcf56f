"""Bootstrap rate as the default deployment fills up: at ~1,000 live SAs and at ~N.

    python bench/growth.py [--n 10000] [--concurrency 16] [--window 1000] [--quick]

Issue 9's check "from outside": one ``mipsec init`` lab as an operator gets it
(HAC and HA in their own processes, SAs provisioned over mutual TLS), with
two changes an operator past a few thousand MNs makes (README "Scale"): the
credentials in the SQLite backend and the IPv4 home-address pool widened to
10.0.0.0/12.  The HAC and HA are real ``mipsec`` processes.  The client is
bench/bootstrap.py's (what core/roles/mn.py does: TCP + TLS + certificate
checks + PSK exchange + close), or with ``--client raw`` the independent MN
of the test suite (tests/integration/rawmn.py: stdlib ``ssl``, ``hmac`` and
hand-built octets, no mipsec code), one blocking connection per thread,
``--concurrency`` threads; each of its bootstraps must end in a 200 whose
``auth`` verifies under the MN's PSK.

Then, with ``--concurrency`` MNs at a time:

1. new MNs bootstrap until ~1,000 SAs are live; the next ``--window`` new MNs
   give "new MNs/s at ~1,000";
2. returning MNs (the first 1,000, each superseding its own SA) bootstrap for
   the same number of bootstraps: "returning MNs/s at ~1,000";
3. new MNs bootstrap until ~N SAs are live, then (1) and (2) again at ~N.

Figures and the ratios (at N / at 1,000) are printed, never judged; with the
HAC's and HA's CPU per bootstrap.  ``--quick`` (CI) is N = 2,500 with a
window of 500.  The clients share the machine's cores with both servers.
Exit status 1 if any bootstrap failed.  The processes it starts are always
stopped and its temp dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import (  # a sibling script, not a package
    Client,
    _mipsec_cmd,
    _proc_cpu,
    _spawn,
    _stop,
    _wait_for,
    _wait_tcp,
    run_interruptible,
)
from rawclient import RawClient
from scale import IP4_POOL, _fill_credentials, _make_lab  # the same lab changes

from mipsec.core.tls import mn_client_context

REALM = "@mipsec.test"
BASE = 1_000  # the "~1,000 live SAs" reference point

MN = tuple[str, bytes]


@dataclass
class Figure:
    ops: int = 0
    seconds: float = 0.0
    hac_cpu: float = 0.0
    ha_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def cpu_ms(self, cpu: float) -> float:
        return 1e3 * cpu / self.ops if self.ops else float("nan")


class Failed(Exception):
    pass


async def _bootstrap_all(
    client: Client | RawClient, mns: Sequence[MN], concurrency: int, pids: tuple[int, int]
) -> Figure:
    """Bootstrap each of ``mns`` once, ``concurrency`` at a time."""
    it = iter(mns)
    failures: list[str] = []

    async def worker() -> None:
        for mn in it:
            try:
                await client.bootstrap(mn)
            except Exception as exc:  # reported below
                failures.append(f"{mn[0]}: {type(exc).__name__}: {exc}")
                return

    cpu0 = [_proc_cpu(p) for p in pids]
    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    dt = time.monotonic() - t0
    cpu = [_proc_cpu(p) - c for p, c in zip(pids, cpu0, strict=True)]
    if failures:
        raise Failed(f"{len(failures)} bootstraps failed, first: {failures[0]}")
    return Figure(len(mns), dt, cpu[0], cpu[1])


async def run(args: argparse.Namespace) -> int:
    n, window = (2_500, 500) if args.quick else (args.n, args.window)
    if n < 2 * BASE or window > BASE:
        print("--n must be >= 2000 and --window <= 1000", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    pools: list[ThreadPoolExecutor] = []
    with tempfile.TemporaryDirectory(prefix="mipsec-growth-") as tmp:
        root = Path(tmp)
        try:
            # The default lab's TLS provisioning is kept (HA in its own process).
            lab, info = _make_lab(root, "lab", local_provisioning=False)
            # Credentials for every new MN the run uses (N + two windows), made up front.
            total = n + 2 * window
            mns = [(f"growth-{i:07d}{REALM}", secrets.token_bytes(32)) for i in range(total)]
            _fill_credentials(lab / "creds.sqlite", iter(mns))
            ha_info, hac_info = info["ha"], info["hac"]
            assert isinstance(ha_info, dict) and isinstance(hac_info, dict)
            ha_toml = Path(str(ha_info["config"]))
            ha_log, hac_log = root / "ha.log", root / "hac.log"
            ha = _spawn([*_mipsec_cmd(None), "--role", "ha", "--config", str(ha_toml)], ha_log)
            procs.append(ha)
            with ha_toml.open("rb") as f:
                await _wait_tcp(int(tomllib.load(f)["provisioning"]["port"]), ha, ha_log)
            hac_cmd = [*_mipsec_cmd(None), "--role", "hac", "--config", str(hac_info["config"])]
            hac = _spawn(hac_cmd, hac_log)
            procs.append(hac)
            port = _wait_for(r"HAC listening on 127\.0\.0\.1 port (\d+)", hac_log.read_text, hac)
            client: Client | RawClient
            if args.client == "raw":
                pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="raw-mn")
                pools.append(pool)
                client = RawClient(str(info["ca"]), port, str(hac_info["server_name"]), pool)
            else:
                ctx = mn_client_context(str(info["ca"]), strict_rfc6618=False)
                client = Client(ctx, port, str(hac_info["server_name"]))
            pids = (hac.pid, ha.pid)
            c = args.concurrency

            async def point(live: int, fresh: Sequence[MN]) -> tuple[Figure, Figure]:
                new = await _bootstrap_all(client, fresh, c, pids)
                # The first window of MNs again: each supersedes its own SA.
                returning = await _bootstrap_all(client, mns[:window], c, pids)
                return new, returning

            t_fill = time.monotonic()
            await _bootstrap_all(client, mns[: BASE - window], c, pids)
            at_base = await point(BASE, mns[BASE - window : BASE])
            await _bootstrap_all(client, mns[BASE : n - window], c, pids)
            at_n = await point(n, mns[n - window : n])
            fill_s = time.monotonic() - t_fill
            _report(n, window, c, fill_s, at_base, at_n, args.client)
            return 0
        except Failed as exc:
            print(f"error: {exc}", file=sys.stderr)
            for name in ("hac.log", "ha.log"):
                log = root / name
                if log.exists():
                    print(f"{name} tail:\n{log.read_text()[-2000:]}", file=sys.stderr)
            return 1
        finally:
            for pool in pools:
                pool.shutdown(wait=True)
            for p in procs:
                _stop(p)


def _report(
    n: int,
    window: int,
    concurrency: int,
    fill_s: float,
    at_base: tuple[Figure, Figure],
    at_n: tuple[Figure, Figure],
    client: str,
) -> None:
    who = "tests/integration/rawmn.py (independent)" if client == "raw" else "bench/bootstrap.py's"
    print(
        f"mipsec growth bench: default mipsec init lab (HA in its own process, TLS "
        f"provisioning), SQLite credentials, IPv4 pool {IP4_POOL}; {concurrency} MNs at a "
        f"time, {window} bootstraps per figure; {n} MNs bootstrapped in {fill_s:.1f} s; "
        f"client: {who}"
    )
    print(
        f"note: {os.cpu_count()} CPU cores shared by the clients (this process), the HAC and "
        f"the HA; 1-min load average {os.getloadavg()[0]:.2f}"
    )
    print()
    head = f"{'figure':<44} | {f'~{BASE} live':>10} | {f'~{n} live':>10} | {'ratio':>5}"
    print(head)
    print("-" * len(head))
    for i, kind in enumerate(("new", "returning")):
        a, b = at_base[i], at_n[i]
        ratio = f"{b.rate / a.rate:.2f}" if a.rate else "-"
        print(f"{f'bootstraps/s, {kind} MNs':<44} | {a.rate:>10.1f} | {b.rate:>10.1f} | {ratio:>5}")
        for who, ca, cb in (
            ("HAC", a.cpu_ms(a.hac_cpu), b.cpu_ms(b.hac_cpu)),
            ("HA", a.cpu_ms(a.ha_cpu), b.cpu_ms(b.ha_cpu)),
        ):
            label = f"{who} CPU ms/bootstrap, {kind} MNs"
            print(f"{label:<44} | {ca:>10.2f} | {cb:>10.2f} | {cb / ca if ca else 0:>5.2f}")
    print()
    print("ratio = at ~N live SAs / at ~1,000 (issue 9 asks >= 0.8 for new and returning MNs)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="MNs (live SAs) at the end (10000)")
    p.add_argument("--concurrency", type=int, default=16, help="MNs at a time (16)")
    p.add_argument("--window", type=int, default=1_000, help="bootstraps per figure (1000)")
    p.add_argument("--quick", action="store_true", help="N = 2500, window 500 (CI)")
    p.add_argument(
        "--client",
        choices=("mipsec", "raw"),
        default="mipsec",
        help="bench/bootstrap.py's client (default) or the independent raw MN of the tests",
    )
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= 200:
        p.error("--concurrency: between 1 and 200")
    if not 1 <= args.window <= BASE:
        p.error(f"--window: between 1 and {BASE}")
    if not 2 * BASE <= args.n <= 1_000_000:
        p.error("--n: between 2000 and 1000000")
    return run_interruptible(run, args)


if __name__ == "__main__":
    sys.exit(main())
