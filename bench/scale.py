"""HAC cost with N live SAs against an empty-state HAC, in one run.

    python bench/scale.py [--n 100000] [--duration S] [--quick] [--hacs K]

Two labs are made in a temp dir (``mipsec init``), each run by a real
``mipsec --role hac`` process with the HA in the HAC's process (``local``
provisioning, as bench/bootstrap.py has it by default), so the figures are the
HAC's own.  Credentials are in the SQLite backend (plugins/cred_sqlite.py);
the IPv4 pool is widened to 10.0.0.0/12 so that N MNs fit.

* "empty": an empty SA store; its credentials hold only the MNs the bench uses.
* "N live": before the HAC starts, the SA store is filled with N live SAs of N
  distinct MNs (each with its own IPv6 and IPv4 home address, in one bulk
  transaction: ``SQLiteSAStore.add_bulk``) and the credential table with
  those N MNs.

Measured on each HAC, in slices alternating between the two so that other
load on the machine hits both alike:

* bootstraps/s of returning MNs (they hold a live SA; each bootstrap
  supersedes it) and of new MNs (each bootstrap a fresh identity, so a new
  home address), at 1 and 32 concurrent MNs -- the PSK bootstrap of
  bench/bootstrap.py (TCP + TLS + certificate checks + PSK exchange + close).
  Returning MNs come in two kinds: "returning" is the same 32 MNs again and
  again (their rows stay in SQLite's page cache), "spread" is any of the N,
  in a shuffled order, each once (as a real population returns: most of
  its rows are cold); the empty lab has only its 32 returning MNs for both;
* HAC CPU per bootstrap (/proc/PID/stat of the HAC, user + system);
* HAC RSS, and (RSS of the N-live HAC - RSS of the empty one) / N per live SA;
* time from starting the HAC process to its first served bootstrap (a new MN);
* HA memory: RSS per installed SA and per binding of an in-memory ``HaCore``
  holding N SAs and N bindings (in a child process, so nothing else counts).
* HA BU -> BA transactions/s of a ``HaCore`` holding N SAs and N bindings
  against one holding only the 1,000 that send the BUs, each in its own child
  process (best of three alternating runs): protected refresh BUs from 1,000
  MNs, the binding cache in a SQLite file flushed (committed) every 32 BUs as
  the HA does per burst, every BA checked the way an MN checks it.

``--kill F[,F...]``: afterwards the N-live HAC is stopped and, for each F,
started again and SIGKILLed (no cleanup) at F times its measured time to
first bootstrap -- while it opens the store, loads its live view, sweeps,
opens its listener -- then started once more on the same files: the bench
prints that start's time to its first bootstrap and the live SAs the store
then holds (N and the bootstraps made so far; fewer is an error).

``--hacs K`` (2 to 6): each lab runs K HAC processes on its one SA store
file (each with its own port, metrics port and control socket), and every
worker spreads its bootstraps over them in turn, so nearly every bootstrap
follows another HAC's commits first (the store's change log,
``issued_sa_log``).  HAC CPU is then the sum over the K processes; the first
bootstrap and RSS figures are the first HAC's.

``--revoked R``: the N-live HAC also starts with R other MNs in its list of
revoked MNs (``mipsec revoke``; the snapshot file, written before the
start), so its time to first bootstrap includes reading that list.  One of
them holds credentials, and its bootstrap must be refused (401) -- proof
that the list was read.

Figures and ratios (N live / empty) are printed, never judged.  ``--quick``
is N = 10,000 and short slices (CI).  The clients run in this process and
compete with the HACs for the CPU.  Exit status 1 if a bootstrap failed.
The bench always stops the processes it started and removes its temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import itertools
import json
import os
import random
import re
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bootstrap import (  # a sibling script, not a package
    Client,
    _local_provisioning,
    _mipsec_cmd,
    _proc_cpu,
    _spawn,
    _stop,
    _wait_for,
    precompile,
    run_interruptible,
)

from mipsec.core.fsutil import PRIVATE_FILE, create_private, write_file
from mipsec.core.labsetup import free_port
from mipsec.core.model import SPI_MAX, SPI_MIN, BootstrapData, IssuedSA, SecurityAssociation
from mipsec.core.suites import SUITES, Suite
from mipsec.core.tls import mn_client_context
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

LEVELS = (1, 32)
IP6_BASE = int(IPv6Address("2001:db8:1::"))
IP4_POOL = IPv4Network("10.0.0.0/12")
REALM = "@mipsec.test"
SPI_BASE = 4096

MN = tuple[str, bytes]


@dataclass
class Lab:
    name: str
    root: Path
    config: Path
    returning: list[MN]
    new: Iterator[MN]
    # Returning MNs drawn from the whole live population (see the docstring).
    spread: Iterator[MN]
    ca: str
    server_name: str
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    first_bootstrap_s: float = float("nan")
    rss_start: int = 0
    log: Path | None = None
    # --hacs K: the other K-1 HACs on the same store (process, port).
    others: list[tuple[subprocess.Popen[bytes], int]] = field(default_factory=list)
    # --provisioning tls: the lab's ``mipsec --role ha`` process.
    ha_proc: subprocess.Popen[bytes] | None = None

    @property
    def pids(self) -> list[int]:
        """The server processes whose CPU a figure counts: the HACs, and the HA
        when it runs in a process of its own."""
        assert self.proc is not None
        ha = [] if self.ha_proc is None else [self.ha_proc.pid]
        return [self.proc.pid, *(p.pid for p, _ in self.others), *ha]


def mipsec_init(lab: Path) -> dict[str, Any]:
    """``mipsec init LAB --json`` on free ports: what it printed."""
    out = subprocess.run(
        [
            *_mipsec_cmd(None),
            "init",
            str(lab),
            "--hac-port",
            str(free_port()),
            "--ha-port",
            str(free_port()),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def _make_lab(
    root: Path, name: str, *, local_provisioning: bool = True
) -> tuple[Path, dict[str, object]]:
    """``mipsec init`` with SQLite credentials and the IPv4 pool widened (and,
    by default, the HA moved into the HAC's process)."""
    lab = root / name
    info = mipsec_init(lab)
    hac_toml = lab / "hac.toml"
    text = hac_toml.read_text()
    for old, new in (
        (
            'backend = "toml"\npath = "credentials.toml"',
            'backend = "sqlite"\npath = "creds.sqlite"',
        ),
        ('ip4_pool = "192.0.2.0/24"', f'ip4_pool = "{IP4_POOL}"'),
    ):
        if old not in text:
            raise RuntimeError(f"{hac_toml}: no {old!r} to replace")
        text = text.replace(old, new)
    hac_toml.write_text(_local_provisioning(text) if local_provisioning else text)
    return lab, info


def fill_ha_store(lab_dir: Path, sas: list[IssuedSA]) -> None:
    """The lab HA's store (``ha-sa.sqlite``, the binding cache in its file, as
    ``mipsec init`` writes it) holding the same SAs as the HAC's, each with a
    binding: what the HA of a HAC with N live MNs holds, so that a returning
    MN's bootstrap withdraws an SA the HA has (and its binding), not an SPI
    unknown there (bench/ha_start.py fills its HA the same way)."""
    from mipsec.core.bindings import Binding, BindingCache
    from mipsec.core.ha_core import HaCore

    store = SQLiteSAStore(lab_dir / "ha-sa.sqlite", key_file=lab_dir / "ha-sa.key")
    try:
        store.add_bulk(sas)
        cache = BindingCache(shared=store.shared_connection(), owner="ha1")
        core = HaCore("ha1", IPv6Address("::1"), IPv4Address("127.0.0.1"), bindings=cache)
        now = time.time()
        for x in sas:
            core.install_sa(x, now=now)
            cache.put(
                Binding(str(x.bootstrap.ip6_hoa), "127.0.0.1", 20000, x.sa.spi, 1, 3600,
                        now + 3600, None, 0)
            )  # fmt: skip
        with store.transaction():
            cache.flush()
        cache.close()
    finally:
        store.close()


async def _start_ha(lab: Lab) -> None:
    """``mipsec --role ha`` on the lab's ha.toml, until it has loaded its store."""
    log = lab.root / "ha.log"
    lab.ha_proc = _spawn(
        [*_mipsec_cmd(None), "--role", "ha", "--config", str(lab.root / "ha.toml")], log
    )
    await asyncio.to_thread(
        _wait_for, r"(\d+) SAs from the store, \d+ bindings", log.read_text, lab.ha_proc
    )


def _fill_credentials(path: Path, creds: Iterator[MN]) -> int:
    create_private(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS mn_credentials (mn_id TEXT PRIMARY KEY, psk BLOB NOT NULL)"
        )
        cur = conn.executemany("INSERT INTO mn_credentials (mn_id, psk) VALUES (?, ?)", creds)
        conn.execute("COMMIT")
        return cur.rowcount
    finally:
        conn.close()


def _spread(key: bytes, live: int, first: int) -> Iterator[MN]:
    """The live MNs ``first``..``live - 1`` in a shuffled order, over and over,
    each with its PSK (``_filler_psk``)."""
    order = list(range(first, live))
    random.shuffle(order)
    for i in itertools.cycle(order):
        mn_id = _mn_id("live", i)
        yield mn_id, _filler_psk(key, mn_id)


def _filler_psk(key: bytes, mn_id: str) -> bytes:
    # Derived, so that the bench can bootstrap any of the N live MNs
    # without keeping N keys (a bench key, made fresh per run).
    return hmac.digest(key, mn_id.encode(), "sha256")


def _live_sas(n: int, lifetime: timedelta) -> Iterator[IssuedSA]:
    """N live SAs as a HAC that has run for a while holds them: SPIs drawn at
    random (core/issuer.py ``random_spi``) and validity ends spread over the
    second half of ``lifetime``.  Consecutive SPIs and one validity end (as
    filled before 2026-12-06) kept a bootstrap's B-tree pages far hotter
    than a real store's: every new SA landed in one corner of the table."""
    now = datetime.now(UTC).replace(microsecond=0)
    half = int(lifetime.total_seconds()) // 2
    spis = random.sample(range(SPI_MIN, SPI_MAX + 1), n)
    hnp6 = IPv6Network("2001:db8:1::/64")
    info = SUITES[Suite.AES_128_CBC_SHA256]
    for i in range(n):
        sa = SecurityAssociation(
            spi=spis[i],
            mn_id=_mn_id("live", i),
            suite=Suite.AES_128_CBC_SHA256,
            scope=1,
            validity_end=now + timedelta(seconds=half + random.randrange(half)),
            mn_to_ha_ikey=secrets.token_bytes(info.ikey_len),
            ha_to_mn_ikey=secrets.token_bytes(info.ikey_len),
            mn_to_ha_ekey=secrets.token_bytes(info.ekey_len),
            ha_to_mn_ekey=secrets.token_bytes(info.ekey_len),
            ha_id="ha1",
        )
        bs = BootstrapData(
            haa_ip6=IPv6Address("::1"),
            haa_ip4=IPv4Address("127.0.0.1"),
            ip6_hoa=IPv6Address(IP6_BASE + 1 + i),
            ip4_hoa=IPv4Address(int(IP4_POOL.network_address) + 1 + i),
            ip6_hnp=hnp6,
            ip4_hnp=IP4_POOL,
        )
        yield IssuedSA(sa=sa, bootstrap=bs)


def _revoke(lab_dir: Path, config: Path, count: int) -> None:
    """``count`` MNs in a revocation list snapshot (core/revocation.py's
    format), and ``[revocations] path`` pointing the HAC at it."""
    since = datetime.now(UTC).isoformat()
    path = lab_dir / "revoked.json"
    listed = {_mn_id("revoked", i): since for i in range(count)}
    write_file(path, json.dumps({"version": 1, "revoked": listed}).encode(), PRIVATE_FILE)
    with config.open("a") as f:
        f.write(f'\n[revocations]\npath = "{path}"\n')


def _mn_id(kind: str, i: int) -> str:
    return f"scale-{kind}-{i:06d}{REALM}"


def _rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (Linux /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Result:
    ops: int = 0
    seconds: float = 0.0
    errors: int = 0
    server_cpu: float = 0.0
    last_cpu: float = 0.0  # of the last process measured: the HA's with --provisioning tls
    first_error: str = ""
    exhausted: bool = False
    per_hac: list[int] = field(default_factory=list)  # completed bootstraps per HAC

    def add(self, other: Result) -> None:
        self.per_hac += [0] * (len(other.per_hac) - len(self.per_hac))
        for j, count in enumerate(other.per_hac):
            self.per_hac[j] += count
        self.ops += other.ops
        self.seconds += other.seconds
        self.errors += other.errors
        self.server_cpu += other.server_cpu
        self.last_cpu += other.last_cpu
        self.first_error = self.first_error or other.first_error
        self.exhausted = self.exhausted or other.exhausted

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else float("nan")

    @property
    def cpu_ms(self) -> float:
        return 1e3 * self.server_cpu / self.ops if self.ops else float("nan")

    @property
    def last_cpu_ms(self) -> float:
        return 1e3 * self.last_cpu / self.ops if self.ops else float("nan")


async def measure(
    ops: list[Callable[[MN], Awaitable[None]]],
    pick: Callable[[int], MN | None],
    concurrency: int,
    duration: float,
    pids: list[int],
) -> Result:
    """Bootstraps by ``concurrency`` workers for ``duration`` s (or until
    ``pick`` runs dry); with several ``ops`` (HACs), each worker takes them
    in turn."""
    res = Result(per_hac=[0] * len(ops))
    max_errors = max(10, 4 * concurrency)

    async def worker(i: int, deadline: float) -> None:
        k = i
        while time.monotonic() < deadline and res.errors < max_errors:
            mn = pick(i)
            if mn is None:
                res.exhausted = True
                return
            j = k % len(ops)
            k += 1
            try:
                await ops[j](mn)
            except Exception as exc:  # reported, and bounded by max_errors
                res.errors += 1
                res.first_error = res.first_error or f"{type(exc).__name__}: {exc}"
                continue
            res.ops += 1
            res.per_hac[j] += 1

    cpu0, t0 = [_proc_cpu(p) for p in pids], time.monotonic()
    await asyncio.gather(*(worker(i, t0 + duration) for i in range(concurrency)))
    res.seconds = time.monotonic() - t0
    cpu = [_proc_cpu(p) - c for p, c in zip(pids, cpu0, strict=True)]
    res.server_cpu = sum(cpu)
    res.last_cpu = cpu[-1]
    return res


async def _start(lab: Lab, client_for: Callable[[int], Client]) -> None:
    """Start the HAC; time until it served its first bootstrap (a new MN)."""
    lab.log = lab.root / "hac.log"
    t0 = time.monotonic()
    lab.proc = _spawn([*_mipsec_cmd(None), "--role", "hac", "--config", str(lab.config)], lab.log)
    log = lab.log
    lab.port = await asyncio.to_thread(
        _wait_for, r"HAC listening on 127\.0\.0\.1 port (\d+)", log.read_text, lab.proc
    )
    client = client_for(lab.port)
    mn = next(lab.new)
    deadline = t0 + 120
    while True:
        try:
            await client.bootstrap(mn)
            break
        except ConnectionError:  # not yet accepting: anything else is a failure
            if lab.proc.poll() is not None:
                tail = log.read_text()[-2000:]
                raise RuntimeError(f"the HAC exited ({lab.proc.returncode}): {tail}") from None
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)
    lab.first_bootstrap_s = time.monotonic() - t0
    lab.rss_start = _rss(lab.proc.pid)


async def _start_others(lab: Lab, k: int) -> None:
    """``k`` more HACs on the lab's store: copies of its config with their
    own port and metrics port (the control socket follows the file name)."""
    text = lab.config.read_text()
    for j in range(k):
        port = free_port()
        other = re.sub(r"(?m)^port = \d+$", f"port = {port}", text, count=1)
        other = re.sub(r"(\[metrics\][^\[]*?port = )\d+", rf"\g<1>{free_port()}", other)
        config = lab.root / f"hac-{j + 2}.toml"
        config.write_text(other)
        log = lab.root / f"hac-{j + 2}.log"
        proc = _spawn([*_mipsec_cmd(None), "--role", "hac", "--config", str(config)], log)
        lab.others.append((proc, port))
        got = await asyncio.to_thread(
            _wait_for, r"HAC listening on 127\.0\.0\.1 port (\d+)", log.read_text, proc
        )
        if got != port:
            raise RuntimeError(f"{config}: listening on {got}, not {port}")


async def run(args: argparse.Namespace) -> int:
    n = 10_000 if args.quick else args.n
    duration = 1.0 if args.quick else args.duration
    slices = 2 if args.quick else 3
    warmup = 0.2 if args.quick else 0.5
    new_pool = 4_000 if args.quick else max(4_000, int(duration * 1_500))
    tls = args.provisioning == "tls"
    precompile()  # the HAC's start is timed: as an installed wheel, with bytecode
    with tempfile.TemporaryDirectory(prefix="mipsec-scale-") as tmp:
        root = Path(tmp)
        labs: list[Lab] = []
        try:
            fill_s = 0.0
            revoked_mn: MN | None = None
            for name, live in (("empty", 0), ("full", n)):
                lab_dir, info = _make_lab(root, name, local_provisioning=not tls)
                hac = info["hac"]
                assert isinstance(hac, dict)
                returning_ids = (
                    [_mn_id("live", i) for i in range(max(LEVELS))]
                    if live
                    else [_mn_id("ret", i) for i in range(max(LEVELS))]
                )
                new = [(_mn_id(f"new-{name}", i), secrets.token_bytes(32)) for i in range(new_pool)]
                returning = [(m, secrets.token_bytes(32)) for m in returning_ids]
                t0 = time.monotonic()
                filler_key = secrets.token_bytes(32)
                filler = (
                    (m, _filler_psk(filler_key, m))
                    for m in (_mn_id("live", i) for i in range(max(LEVELS), live))
                )
                revoked: list[MN] = []
                if live and args.revoked:
                    revoked = [(_mn_id("revoked", 0), secrets.token_bytes(32))]
                    revoked_mn = revoked[0]
                    _revoke(lab_dir, Path(str(hac["config"])), args.revoked)
                _fill_credentials(
                    lab_dir / "creds.sqlite", iter([*returning, *new, *revoked, *filler])
                )
                if live:
                    sas = list(_live_sas(live, timedelta(hours=1)))
                    with SQLiteSAStore(
                        lab_dir / "hac-sa.sqlite", key_file=lab_dir / "hac-sa.key"
                    ) as store:
                        store.add_bulk(sas)
                    if tls:
                        fill_ha_store(lab_dir, sas)
                    del sas
                    fill_s = time.monotonic() - t0
                labs.append(
                    Lab(
                        name,
                        lab_dir,
                        Path(str(hac["config"])),
                        returning,
                        iter(new),
                        _spread(filler_key, live, max(LEVELS))
                        if live > max(LEVELS)
                        else itertools.cycle(returning),
                        str(info["ca"]),  # each lab has its own CA
                        str(hac["server_name"]),
                    )
                )
            clients: dict[str, Client] = {}
            hac_clients: dict[str, list[Client]] = {}
            for lab in labs:
                ctx = mn_client_context(lab.ca, strict_rfc6618=False)
                if tls:
                    await _start_ha(lab)
                await _start(lab, lambda port, c=ctx, sn=lab.server_name: Client(c, port, sn))
                clients[lab.name] = Client(ctx, lab.port, lab.server_name)
                await _start_others(lab, args.hacs - 1)
                hac_clients[lab.name] = [
                    clients[lab.name],
                    *(Client(ctx, port, lab.server_name) for _, port in lab.others),
                ]

            if args.revoked:
                full = labs[1]
                assert revoked_mn is not None
                try:
                    await clients[full.name].bootstrap(revoked_mn)
                except RuntimeError as exc:
                    if "401" not in str(exc):
                        raise
                else:
                    raise RuntimeError("a revoked MN got a 200: the revocation list was not read")
                print(
                    f"N-live HAC started with {args.revoked:,} revoked MNs "
                    f"(first bootstrap {full.first_bootstrap_s:.2f} s); a revoked MN got 401"
                )

            rows: list[tuple[str, int, Result, Result]] = []
            for kind in ("returning", "spread", "new"):
                for level in LEVELS:
                    results = {lab.name: Result() for lab in labs}
                    for s in range(slices):
                        for lab in labs:
                            assert lab.proc is not None
                            if kind == "returning":
                                mns = lab.returning

                                def pick(i: int, mns: list[MN] = mns) -> MN | None:
                                    return mns[i % len(mns)]

                            else:
                                it = lab.spread if kind == "spread" else lab.new

                                def pick(i: int, it: Iterator[MN] = it) -> MN | None:
                                    return next(it, None)

                            ops = [c.bootstrap for c in hac_clients[lab.name]]
                            if s == 0:  # warm-up: returning MNs bootstrap once first
                                await measure(ops, pick, level, warmup, lab.pids)
                            r = await measure(ops, pick, level, duration / slices, lab.pids)
                            results[lab.name].add(r)
                    rows.append((kind, level, results["empty"], results["full"]))
            rss = {lab.name: _rss(lab.proc.pid) if lab.proc else 0 for lab in labs}
            _report(n, fill_s, duration, labs, rows, rss, args.hacs, tls)
            if tls:  # the fill's proof: every superseded SA was one the HA held
                unknown = (labs[1].root / "ha.log").read_text().count("unknown here")
                print(f"HA of the N-live lab: {unknown} withdrawals of SPIs unknown there logged")
            if args.kill:
                full = labs[1]
                await _killed_starts(full, clients[full.name], args.kill, n)
            bad = [r for *_, e, f in rows for r in (e, f) if r.errors or r.ops == 0]
            for r in bad:
                print(f"errors: {r.errors} (first: {r.first_error})", file=sys.stderr)
            if bad:
                for lab in labs:
                    if lab.log is not None:
                        print(f"{lab.name} HAC log tail:\n{lab.log.read_text()[-2000:]}")
                return 1
            return 0
        finally:
            for lab in labs:
                if lab.proc is not None:
                    _stop(lab.proc)
                for proc, _port in lab.others:
                    _stop(proc)
                if lab.ha_proc is not None:
                    _stop(lab.ha_proc)


def _live_rows(lab: Lab) -> int:
    """Live SAs in the lab's store, read on a connection of the bench's own."""
    conn = sqlite3.connect(lab.root / "hac-sa.sqlite")
    try:
        row = conn.execute(
            "SELECT COUNT(*) FROM issued_sa WHERE validity_end > ?", (int(time.time()),)
        ).fetchone()
        return int(row[0])
    finally:
        conn.close()


async def _killed_starts(lab: Lab, client: Client, fractions: list[float], n: int) -> None:
    """SIGKILL the N-live HAC during its start at each fraction, then start it again."""
    assert lab.proc is not None
    start_s = lab.first_bootstrap_s
    _stop(lab.proc)
    print(f"\nSIGKILL during the start of the {n:,}-SA HAC, then a start on the same files:")
    print(f"{'kill at (s)':>12} | {'start -> first bootstrap (s)':>28} | live SAs after")
    for fraction in fractions:
        at = fraction * start_s
        proc = _spawn(
            [*_mipsec_cmd(None), "--role", "hac", "--config", str(lab.config)],
            lab.root / "hac-killed.log",
        )
        await asyncio.sleep(at)
        if proc.poll() is not None:
            tail = (lab.root / "hac-killed.log").read_text()[-2000:]
            raise RuntimeError(f"the HAC exited ({proc.returncode}) before its kill: {tail}")
        proc.kill()
        proc.wait(timeout=30)
        await _start(lab, lambda port: Client(client.ctx, port, client.server_name))
        live = _live_rows(lab)
        print(f"{at:12.2f} | {lab.first_bootstrap_s:28.2f} | {live:,}")
        assert lab.proc is not None
        _stop(lab.proc)
        lab.proc = None
        if live < n:
            raise RuntimeError(f"after a kill at {at:.2f} s: {live} live SAs in the store, not {n}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and b == b and a == a else "-"


def _report(
    n: int,
    fill_s: float,
    duration: float,
    labs: list[Lab],
    rows: list[tuple[str, int, Result, Result]],
    rss: dict[str, int],
    hacs: int = 1,
    tls: bool = False,
) -> None:
    empty, full = labs
    print(
        f"mipsec scale bench: HAC with {n} live SAs ({n} distinct MNs, SQLite SA store and "
        f"credentials) vs an empty-state HAC, {duration:g} s per figure"
    )
    if hacs > 1:
        print(
            f"note: {hacs} HAC processes per lab on its one SA store, each worker's bootstraps "
            f"spread over them in turn; HAC CPU = the sum over the {hacs}"
        )
    if tls:
        print(
            "note: each lab's HA in a process of its own, SAs provisioned over TLS (the "
            f"default deployment); the N-live HA's store holds the same {n} SAs, each with "
            "a binding; server CPU = HAC + HA"
        )
    else:
        print(
            "note: the HA in the HAC's process (local provisioning, memory store): it holds "
            "none of the N, so a spread MN's old SA is an SPI unknown there"
        )
    print(
        f"note: {os.cpu_count()} CPU cores shared by the clients (this process) and the "
        f"servers of both labs; 1-min load average {os.getloadavg()[0]:.2f}; stores filled "
        f"in {fill_s:.1f} s"
    )
    print()
    head = f"{'figure':<53} | {'empty':>10} | {f'{n} live':>10} | {'ratio':>5}"
    print(head)
    print("-" * len(head))

    def line(label: str, a: float, b: float, fmt: str) -> None:
        print(f"{label:<53} | {a:>10{fmt}} | {b:>10{fmt}} | {_ratio(b, a):>5}")

    for kind, level, e, f in rows:
        mark = " (pool ran dry)" if e.exhausted or f.exhausted else ""
        line(f"bootstraps/s, {kind} MN, {level} concurrent{mark}", e.rate, f.rate, ".1f")
    for kind, level, e, f in rows:
        who = "HAC+HA" if tls else "HAC"
        line(f"{who} CPU ms/bootstrap, {kind} MN, {level} concurrent", e.cpu_ms, f.cpu_ms, ".2f")
    if tls:
        for kind, level, e, f in rows:
            label = f"of which HA, {kind} MN, {level} concurrent"
            line(label, e.last_cpu_ms, f.last_cpu_ms, ".2f")
    line(
        "first bootstrap after HAC start, s",
        empty.first_bootstrap_s,
        full.first_bootstrap_s,
        ".2f",
    )
    line("HAC RSS after first bootstrap, MB", empty.rss_start / 1e6, full.rss_start / 1e6, ".1f")
    line("HAC RSS at the end, MB", rss["empty"] / 1e6, rss["full"] / 1e6, ".1f")
    per_sa = (full.rss_start - empty.rss_start) / n if n else float("nan")
    print()
    print(f"HAC RSS per live SA (after first bootstrap, full - empty) / N: {per_sa:.0f} bytes")
    ha_sa, ha_binding = _ha_figures(n)
    print(
        f"HA RSS per SA: {ha_sa:.0f} bytes (target <= 6144); per binding: {ha_binding:.0f} bytes"
        f" ({n} of each in an in-memory HaCore)"
    )
    with tempfile.TemporaryDirectory(prefix="mipsec-scale-bu-") as tmp:
        bu_small, bu_full, bu_ok = _bu_figures(n, Path(tmp))
    print(
        f"HA BU -> BA/s ({BU_ACTIVE} MNs refreshing, SQLite binding cache flushed every "
        f"{BU_BURST} BUs): {bu_small:.0f} with {BU_ACTIVE} bindings, {bu_full:.0f} with {n} "
        f"bindings, ratio {_ratio(bu_full, bu_small)}"
        + ("" if bu_ok else "  (INVALID BAs: see the child)")
    )
    if hacs > 1:
        totals = {"empty": Result(), "full": Result()}
        for *_, e, f in rows:
            totals["empty"].add(e)
            totals["full"].add(f)
        for name, total in totals.items():
            print(f"bootstraps per HAC process, {name} lab: {' / '.join(map(str, total.per_hac))}")
    print("ratio = N live / empty (1.00: the cost does not depend on the number of live SAs)")


def ha_memory(n: int) -> None:
    """In a child process: RSS per SA and per binding of an in-memory ``HaCore``."""
    import gc

    from mipsec.core.bindings import Binding
    from mipsec.core.ha_core import HaCore

    items = list(_live_sas(n, timedelta(hours=2)))
    core = HaCore("ha1", IPv6Address("::1"), IPv4Address("127.0.0.1"))
    gc.collect()
    r0 = _rss(os.getpid())
    now = time.time()
    for x in items:
        core.install_sa(x, now=now)
    gc.collect()
    r1 = _rss(os.getpid())
    for x in items:
        hoa = str(x.bootstrap.ip6_hoa)
        core.bindings.put(
            Binding(hoa, "2001:db8:99::1", 7873, x.sa.spi, 1, 3600, now + 3600, None, 0)
        )
    gc.collect()
    r2 = _rss(os.getpid())
    print(f"HA {(r1 - r0) / n:.0f} {(r2 - r1) / n:.0f}", flush=True)


BU_ACTIVE = 1_000  # MNs sending BUs in the BU -> BA figure
BU_ROUNDS = 6  # one registration round, then refreshes (timed)
BU_BURST = 32  # BUs per binding-cache flush, as HaService flushes per burst


def bu_rate(n: int, rounds: int, db: str) -> None:
    """In a child process: BU -> BA transactions/s of a ``HaCore`` holding ``n``
    SAs and ``n`` bindings (the first ``BU_ACTIVE`` send the BUs, the others
    are registered already), its binding cache in the SQLite file ``db`` and
    flushed every ``BU_BURST`` BUs (the HA commits a burst's records before
    its BAs leave).  Prints ``BU <tx/s> <valid BAs>``."""
    import gc

    from ha import HAA, _issue, _Mn  # the sibling bench: same SAs, MNs and checks

    from mipsec.core.bindings import Binding, BindingCache
    from mipsec.core.ha_core import HaCore, Reply

    active = min(BU_ACTIVE, n)
    issued = _issue(Suite.AES_128_CBC_SHA256, n, SPI_BASE)
    core = HaCore("ha1", HAA, bindings=BindingCache(db))
    now = time.time()
    for x in issued:
        core.install_sa(x, now=now)
    for x in issued[active:]:  # the idle MNs' bindings: what a full HA holds
        core.bindings.put(
            Binding(str(x.bootstrap.ip6_hoa), "2001:db8:99::1", 7873, x.sa.spi, 1, 3600,
                    now + 3600, None, 0)
        )  # fmt: skip
    core.bindings.flush()
    mns = [_Mn(x) for x in issued[:active]]
    del issued
    gc.collect()
    gc.freeze()  # as the HA does after loading (core/startup_heap.py)
    srcs = [("192.0.2.1", 20000 + i) for i in range(active)]
    receive, flush = core.receive, core.bindings.flush
    seconds, txs, valid = 0.0, 0, 0
    for r in range(rounds):
        bus = [mn.bu(r + 1) for mn in mns]
        t0 = time.perf_counter()
        results = []
        for i in range(0, active, BU_BURST):
            results += [
                receive(d, s, now)
                for d, s in zip(bus[i : i + BU_BURST], srcs[i : i + BU_BURST], strict=True)
            ]
            flush()
        dt = time.perf_counter() - t0
        if r:  # round 0 registers; the timed rounds refresh
            seconds += dt
            txs += active
        for mn, actions in zip(mns, results, strict=True):
            replies = [a for a in actions if isinstance(a, Reply)]
            valid += len(replies) == 1 and mn.ba_ok(replies[0].datagram, r + 1)
    print(f"BU {txs / seconds:.1f} {valid}", flush=True)


def _bu_figures(n: int, root: Path) -> tuple[float, float, bool]:
    """BU -> BA/s with ``BU_ACTIVE`` bindings and with ``n``, best of three
    alternating child runs each; and whether every BA was valid."""
    best = {BU_ACTIVE: 0.0, n: 0.0}
    ok = True
    for run_no in range(3):
        for size in (BU_ACTIVE, n):
            db = root / f"bindings-{size}-{run_no}.sqlite"
            out = subprocess.run(
                [sys.executable, __file__, "--bu-child", str(size), str(db)],
                capture_output=True,
                text=True,
                timeout=900,
                check=True,
            ).stdout
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "BU":
                    best[size] = max(best[size], float(parts[1]))
                    ok = ok and int(parts[2]) == min(BU_ACTIVE, size) * BU_ROUNDS
                    break
            else:
                raise RuntimeError(f"BU child: unexpected output {out[-500:]!r}")
    return best[BU_ACTIVE], best[n], ok


def _ha_figures(n: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--ha-memory", str(n)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "HA":
            return float(parts[1]), float(parts[2])
    raise RuntimeError(f"HA memory child: unexpected output {out[-500:]!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="live SAs / MNs (100000)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per figure (3)")
    p.add_argument("--quick", action="store_true", help="N = 10000, 1 s per figure (CI)")
    p.add_argument(
        "--kill",
        type=lambda v: [float(f) for f in v.split(",") if f.strip()],
        default=[],
        help="then SIGKILL the N-live HAC at these fractions of its start and restart it",
    )
    p.add_argument(
        "--revoked",
        type=int,
        default=0,
        help="the N-live HAC also starts with this many MNs revoked (0)",
    )
    p.add_argument(
        "--hacs",
        type=int,
        default=1,
        help="HAC processes per lab sharing its SA store, the bootstraps spread over them (1)",
    )
    p.add_argument(
        "--provisioning",
        choices=("local", "tls"),
        default="local",
        help="local: the HA in the HAC's process, holding none of the N (default); "
        "tls: the lab's own HA process, its store holding the same N SAs with a binding each",
    )
    p.add_argument("--ha-memory", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--bu-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ha_memory:
        ha_memory(args.ha_memory)
        return 0
    if args.bu_child:
        bu_rate(int(args.bu_child[0]), BU_ROUNDS, args.bu_child[1])
        return 0
    if args.n < 1 or args.n > 1_000_000:
        p.error("--n: between 1 and 1000000")
    if not 0 <= args.revoked <= 1_000_000:
        p.error("--revoked: between 0 and 1000000")
    if args.duration <= 0:
        p.error("--duration must be positive")
    if not 1 <= args.hacs <= 6:
        p.error("--hacs: 1 to 6")
    return run_interruptible(run, args)


if __name__ == "__main__":
    sys.exit(main())
