"""PSK and EAP-TLS bootstraps per second against ``mipsec --role hac`` vs bare TLS handshakes.

    python bench/bootstrap.py [--duration S] [--quick] [--tls12] [--concurrency 1,32]
                              [--provisioning local|tls] [--profile-hac FILE.prof]
                              [--profile-ha FILE.prof] [--psk-only]

What is measured, all in one run, on one lab made in a temp dir (``mipsec init``):

* bootstrap/s -- each bootstrap is what a real MN does (core/roles/mn.py): a new
  TCP + TLS connection to a separate ``mipsec --role hac`` process, the HAC
  certificate checks of PROFILE §1 (chain to the lab CA, then SAN by hand), the
  channel binding, the full PSK exchange (Init, Done; HMACs both ways), the SA
  checks of the 200 response, and close.  Each of the N concurrent MNs has its
  own identity (credentials appended to the lab's credentials.toml).
* handshake/s -- bare TLS against a small asyncio server in another process
  (asyncio's own TLS transport: a Protocol on ``create_server`` with ssl, the
  stdlib reference; the HAC runs TLS in core/roles/tlsserver.py since issue 6),
  same certificate, same contexts (``hac_server_context`` / ``mn_client_context``):
  connect, handshake, close.
* ratio = bootstrap/s / handshake/s at each concurrency: how much of the
  bare-TLS capacity survives the protocol work on top of it (target >= 0.7).

Each figure is measured in slices (5, or 2 with ``--quick``) alternating with
the other bench's, after a warm-up, so other load on the machine skews both
alike.  Server and client CPU per operation come from /proc and
``time.process_time``.

The clients run as asyncio tasks in this process; the machine this was written
for has 2 cores, so the client and the server compete for the CPU (said in
the output).  The HAs are put on the ``local`` provisioning transport, so the
bootstrap figure is the HAC's own; ``--provisioning tls`` keeps the lab's TLS
provisioning and also runs ``mipsec --role ha``.  Exit status 1 if any
bootstrap or handshake failed.  ``--profile-hac`` (``--profile-ha``) runs the HAC (the HA)
under cProfile and writes its stats to a file when it stops (the figures are then not
representative).  With ``--provisioning tls`` the server CPU is also split per process.
``--psk-only`` skips the EAP-TLS figures (to profile or compare the PSK path alone).
The bench stops by itself and always terminates the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mipsec.core.authmethod import PeerMethodContext, PeerMethodFactory
from mipsec.core.hookspecs import PluginContext
from mipsec.core.labsetup import free_port, port_open
from mipsec.core.mn_exchange import Finished, MnExchange, SendRequest
from mipsec.core.tls import (
    check_hac_certificate,
    hac_server_context,
    mn_cb_octets,
    mn_client_context,
    set_nodelay,
)
from mipsec.core.tlsclient import TlsClient
from mipsec.plugins.psk_auth import PskMethod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rawclient import EapTlsPeers, RawClient

HOST = "127.0.0.1"
TIMEOUT = 10.0
READY_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# AES_128_CBC_SHA256 {00,3C}, AES_128_CBC_SHA {00,2F}: what the lab MN offers
# (wire codes, not enum positions: (1, 2) would offer nothing the default
# policy allows).
SUITES = (0x003C, 0x002F)

# ---------------------------------------------------------------- bare TLS server


async def _serve_tls(cert: str, key: str, strict: bool) -> None:
    ctx = hac_server_context(cert, key, strict_rfc6618=strict)

    class BareTLS(asyncio.Protocol):
        # asyncio's TLS transport, the stdlib reference (a Protocol, no stream
        # or task per connection): the handshake is done before
        # connection_made runs; close() sends close_notify.
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                set_nodelay(sock)
            transport.close()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        BareTLS,
        host=HOST,
        port=0,
        ssl=ctx,
        ssl_handshake_timeout=TIMEOUT,
        reuse_address=True,
    )
    await serve_until_signal(server)


async def serve_until_signal(server: asyncio.Server) -> None:
    """Print ``READY <port>`` for the parent bench, serve until SIGINT/SIGTERM."""
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


# ---------------------------------------------------------------- clients


@dataclass
class Client:
    ctx: ssl.SSLContext
    port: int
    server_name: str
    method: PeerMethodFactory = field(
        default_factory=lambda: PskMethod().peer({}, PluginContext("mn", Path(".")))
    )
    # EAP: one peer factory per MN identity (each has its own certificate).
    per_mn: dict[str, PeerMethodFactory] | None = None
    method_name: str = "psk"
    tls_info: str = ""

    async def _connect(self) -> TlsClient:
        # The MN's own TLS client (core/tlsclient.py, as core/roles/mn.py uses
        # it), for the bare handshakes as for the bootstraps.
        async with asyncio.timeout(TIMEOUT):
            tls = await TlsClient.connect(HOST, self.port, self.ctx, self.server_name)
        if not self.tls_info:
            cipher = tls.tls.cipher()
            self.tls_info = f"{tls.version()} {cipher[0] if cipher else '?'}"
        return tls

    async def handshake(self, mn: tuple[str, bytes]) -> None:
        """Connect, handshake, close."""
        await _close(await self._connect())

    async def bootstrap(self, mn: tuple[str, bytes]) -> None:
        """One bootstrap as core/roles/mn.py runs it; raises unless status 200 + SA."""
        mn_id, psk = mn
        tls = await self._connect()
        try:
            der = tls.peercert_der()
            if der is None:
                raise RuntimeError("HAC sent no certificate")
            check_hac_certificate(der, server_name=self.server_name, connected_ip=None)
            cb = mn_cb_octets(der)
            factory = self.per_mn[mn_id] if self.per_mn is not None else self.method
            peer = factory.new(PeerMethodContext(mn_id=mn_id, cb_octets=cb, secret=psk))
            exch = MnExchange(
                mn_id=mn_id,
                method_name=self.method_name,
                method=peer,
                cb_octets=cb,
                scope=1,
                suitelist=SUITES,
            )
            tls.write(exch.start())
            while True:
                async with asyncio.timeout(TIMEOUT):
                    data = await tls.read()
                events = exch.receive_data(data) if data else exch.receive_eof()
                for ev in events:
                    if isinstance(ev, SendRequest):
                        tls.write(ev.data)
                    elif isinstance(ev, Finished):
                        if not ev.result.ok:
                            raise RuntimeError(
                                f"bootstrap failed: {ev.result.status} {ev.result.reason}"
                            )
                        return
        finally:
            await _close(tls)


async def _close(tls: TlsClient) -> None:
    tls.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await tls.closed


@dataclass
class Result:
    ops: int = 0  # completed within the measured duration
    seconds: float = 0.0
    errors: int = 0
    client_cpu: float = 0.0  # seconds of this process's CPU during the measurement
    server_cpu: float = 0.0  # seconds of the server processes' CPU
    first_error: str = ""
    completed: int = 0  # ops + those still in flight at the deadline (they used the CPU too)
    server_split: list[float] = field(default_factory=list)  # per server process, same order

    def __iadd__(self, other: Result) -> Result:
        self.ops += other.ops
        self.seconds += other.seconds
        self.errors += other.errors
        self.client_cpu += other.client_cpu
        self.server_cpu += other.server_cpu
        self.first_error = self.first_error or other.first_error
        self.completed += other.completed
        if not self.server_split:
            self.server_split = [0.0] * len(other.server_split)
        self.server_split = [
            a + b for a, b in zip(self.server_split, other.server_split, strict=True)
        ]
        return self

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def cpu_us(self, cpu: float) -> float:
        n = max(self.completed, self.ops)
        return 1e6 * cpu / n if n else float("nan")


def _proc_cpu(pid: int) -> float:
    """user + system CPU seconds of ``pid`` (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    op: Callable[[tuple[str, bytes]], Awaitable[None]],
    mns: list[tuple[str, bytes]],
    concurrency: int,
    duration: float,
    warmup: float,
    server_pids: list[int],
) -> Result:
    counting = False
    ops = errors = completed = 0
    first_error = ""
    max_errors = max(10, concurrency * 4)

    async def worker(i: int, deadline: float) -> None:
        nonlocal ops, errors, completed, first_error
        mn = mns[i % len(mns)]
        while time.monotonic() < deadline and errors < max_errors:
            try:
                await op(mn)
            except Exception as exc:  # reported, and bounded by max_errors
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                continue
            if counting:
                completed += 1
                if time.monotonic() <= deadline:
                    ops += 1

    if warmup > 0:
        end = time.monotonic() + warmup
        await asyncio.gather(*(worker(i, end) for i in range(concurrency)))
    ops = errors = completed = 0
    counting = True
    split0, c_cpu0 = [_proc_cpu(p) for p in server_pids], time.process_time()
    t0 = time.monotonic()
    deadline = t0 + duration
    await asyncio.gather(*(worker(i, deadline) for i in range(concurrency)))
    c_cpu = time.process_time() - c_cpu0
    split = [_proc_cpu(p) - c0 for p, c0 in zip(server_pids, split0, strict=True)]
    return Result(ops, duration, errors, c_cpu, sum(split), first_error, completed, split)


# ---------------------------------------------------------------- processes


def precompile() -> None:
    """Byte-compile mipsec's modules (``__pycache__``) before a start is timed.

    An installed wheel has its bytecode; a source tree run with
    ``PYTHONDONTWRITEBYTECODE`` (CI sets it) has none, and every role
    process would compile each module it imports -- 0.3-0.4 s of a HAC's
    start on the 2-core machine of README, which a "first bootstrap after
    start" figure would count as the HAC's.  ``compileall`` writes the files
    whatever that variable says."""
    import compileall

    import mipsec.aaa
    import mipsec.core
    import mipsec.plugins

    for pkg in (mipsec.core, mipsec.plugins, mipsec.aaa):
        for d in pkg.__path__:
            compileall.compile_dir(d, quiet=1)


def _mipsec_cmd(profile: Path | None) -> list[str]:
    if profile is not None:
        return [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "mipsec.core.cli"]
    script = Path(sys.executable).with_name("mipsec")
    if script.exists():
        return [str(script)]
    found = shutil.which("mipsec")
    return [found] if found else [sys.executable, "-m", "mipsec.core.cli"]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as logf:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def _wait_for(pattern: str, read: Callable[[], str], proc: subprocess.Popen[bytes]) -> int:
    end = time.monotonic() + READY_TIMEOUT
    rx = re.compile(pattern)
    while time.monotonic() < end:
        m = rx.search(read())
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {read()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT:.0f} s: {read()[-2000:]}")


async def _wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    end = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{log.stem} process exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
        if port_open(HOST, port, 0.2):  # never a connection to itself
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(
        f"{log.stem} process not listening on port {port} after {READY_TIMEOUT:.0f} s"
    )


def _local_provisioning(text: str) -> str:
    """hac.toml with the HA in the HAC's own process (deployment model 1).

    The HAC then hands each SA to an in-memory HA without a network round
    trip, so the figures are the HAC's own plus an in-process install
    (``--provisioning tls`` keeps the lab's TLS provisioning and runs
    ``mipsec --role ha`` as well).  The ``local`` transport fails closed
    without an HA in the process, hence the ``[local_ha]`` table.
    """
    text = re.sub(r'(?m)^(transport\s*=\s*)"[^"]*"', r'\1"local"', text)
    # The [ha.options] table belongs to the network transport: drop it.
    text = re.sub(r"(?ms)^\[ha\.options\][^\[]*", "", text)
    return text + (
        '\n[local_ha.ha]\nid = "ha1"\nlisten = ["127.0.0.1"]\nport = 0\n'
        '\n[local_ha.sa_store]\nbackend = "memory"\n'
    )


def make_lab(
    root: Path, mns: int, strict: bool, provisioning: str
) -> tuple[dict[str, object], list[tuple[str, bytes]]]:
    lab = root / "lab"
    hac_port, ha_port = free_port(), free_port()
    out = subprocess.run(
        [
            *_mipsec_cmd(None),
            "init",
            str(lab),
            "--hac-port",
            str(hac_port),
            "--ha-port",
            str(ha_port),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    info: dict[str, object] = json.loads(out.stdout)
    # One identity per concurrent MN, as a real population would be.
    creds = [(f"bench-{i:03d}@mipsec.test", secrets.token_bytes(32)) for i in range(mns)]
    with (lab / "credentials.toml").open("a") as f:
        for mn_id, psk in creds:
            f.write(f'\n[[mn]]\nmn_id = "{mn_id}"\npsk_hex = "{psk.hex()}"\n')
    hac_toml = lab / "hac.toml"
    text = hac_toml.read_text()
    if strict:
        new = re.sub(r"(?m)^strict_rfc6618\s*=\s*false", "strict_rfc6618 = true", text)
        if new == text:
            raise RuntimeError("hac.toml: no strict_rfc6618 setting to switch on")
        text = new
    if provisioning == "local":
        text = _local_provisioning(text)
    hac_toml.write_text(text)
    return info, creds


def issue_mn_certs(lab: Path, creds: list[tuple[str, bytes]]) -> dict[str, tuple[str, str]]:
    """A client certificate per bench MN (certificate and key files), issued
    by the lab CA with the rfc822Name SAN = its mn_id (the HAC's identity policy)."""
    from cryptography.hazmat.primitives import serialization

    from mipsec.core.pki import make_leaf, write_cert, write_key

    pki = lab / "pki"
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key: Any = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    out: dict[str, tuple[str, str]] = {}
    for i, (mn_id, _) in enumerate(creds):
        key, cert = make_leaf(
            ca_key, ca_cert, common_name=mn_id, email_addresses=(mn_id,), client=True, server=False
        )
        write_cert(pki / f"bench-{i}.pem", cert)
        write_key(pki / f"bench-{i}.key", key)
        out[mn_id] = (str(pki / f"bench-{i}.pem"), str(pki / f"bench-{i}.key"))
    return out


def eap_tls_factories(lab: Path, peers: EapTlsPeers) -> dict[str, PeerMethodFactory]:
    """mipsec's EAP-TLS peer factory per bench MN, on its certificate."""
    from mipsec.core.eap.mhauth import EapMethod
    from mipsec.core.pluginmanager import make_plugin_manager

    ctx = PluginContext("mn", lab, extra={"pm": make_plugin_manager()})
    out: dict[str, PeerMethodFactory] = {}
    for mn_id, (cert, key) in peers.certs.items():
        options = {
            "methods": ["tls"],
            "tls": {
                "cert": cert,
                "key": key,
                "ca": peers.ca,
                "server_name": peers.server_name,
            },
        }
        out[mn_id] = EapMethod().peer(options, ctx)
    return out


# ---------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> int:
    duration = 1.0 if args.quick else args.duration
    warmup = 0.2 if args.quick else min(1.0, duration / 5)
    levels = [int(x) for x in args.concurrency.split(",")]
    strict = args.tls12
    procs: list[subprocess.Popen[bytes]] = []
    pools: list[ThreadPoolExecutor] = []
    with tempfile.TemporaryDirectory(prefix="mipsec-bench-") as tmp:
        root = Path(tmp)
        try:
            info, creds = make_lab(root, max(levels), strict, args.provisioning)
            lab = root / "lab"
            hac_info = info["hac"]
            assert isinstance(hac_info, dict)
            cert, key = str(lab / "pki" / "hac.pem"), str(lab / "pki" / "hac.key")
            ca, server_name = str(info["ca"]), str(hac_info["server_name"])

            server_pids: list[int] = []
            if args.provisioning == "tls":
                ha_info = info["ha"]
                assert isinstance(ha_info, dict)
                ha_toml = Path(str(ha_info["config"]))
                ha_cmd = [*_mipsec_cmd(args.profile_ha), "--role", "ha", "--config", str(ha_toml)]
                ha = _spawn(ha_cmd, root / "ha.log")
                procs.append(ha)
                server_pids.append(ha.pid)
                with ha_toml.open("rb") as f:
                    prov_port = int(tomllib.load(f)["provisioning"]["port"])
                await _wait_tcp(prov_port, ha, root / "ha.log")

            hac_log, tls_log = root / "hac.log", root / "tls.log"
            hac_cmd = [*_mipsec_cmd(args.profile_hac), "--role", "hac", "--config"]
            hac = _spawn([*hac_cmd, str(hac_info["config"])], hac_log)
            procs.append(hac)
            server_pids.append(hac.pid)
            tls_cmd = [sys.executable, __file__, "--serve-tls", cert, key]
            bare = _spawn(tls_cmd + (["--tls12"] if strict else []), tls_log)
            procs.append(bare)
            hac_port = _wait_for(
                r"HAC listening on 127\.0\.0\.1 port (\d+)", hac_log.read_text, hac
            )
            tls_port = _wait_for(r"READY (\d+)", tls_log.read_text, bare)

            ctx = mn_client_context(ca, strict_rfc6618=strict)
            boot: Client | RawClient
            tls: Client | RawClient
            eap: Client | RawClient
            eap_info = info["eap"]
            assert isinstance(eap_info, dict)
            peers = EapTlsPeers(
                issue_mn_certs(lab, creds), str(eap_info["ca"]), str(eap_info["server_name"])
            )
            if args.client == "raw":
                pool = ThreadPoolExecutor(max(levels), thread_name_prefix="raw-mn")
                pools.append(pool)
                boot = RawClient(ca, hac_port, server_name, pool)
                tls = RawClient(ca, tls_port, server_name, pool)
                eap = RawClient(ca, hac_port, server_name, pool, eap=peers)
            else:
                boot = Client(ctx, hac_port, server_name)
                tls = Client(ctx, tls_port, server_name)
                eap = Client(
                    ctx,
                    hac_port,
                    server_name,
                    per_mn=eap_tls_factories(lab, peers),
                    method_name="eap",
                )
            rows = []
            slices = 2 if args.quick else 5
            for n in levels:
                # Alternate short slices of the two benches, so that a burst of
                # other load on the machine hits both figures alike.
                r_tls, r_boot, r_eap = Result(), Result(), Result()
                for i in range(slices):
                    w = warmup if i == 0 else 0.0
                    part = duration / slices
                    r_tls += await measure(tls.handshake, creds, n, part, w, [bare.pid])
                    r_boot += await measure(boot.bootstrap, creds, n, part, w, server_pids)
                    if not args.psk_only:
                        r_eap += await measure(
                            eap.eap_bootstrap if isinstance(eap, RawClient) else eap.bootstrap,
                            creds,
                            n,
                            part,
                            w,
                            server_pids,
                        )
                rows.append((n, r_tls, r_boot, r_eap))
            _report(args, duration, boot.tls_info or tls.tls_info, cert, rows)
            bad = [r for _, *rs in rows for r in rs if r.errors]
            for r in bad:
                print(f"errors: {r.errors} (first: {r.first_error})", file=sys.stderr)
            if bad or any(r.ops == 0 for _, *rs in rows for r in rs[: 2 if args.psk_only else 3]):
                print(f"HAC log tail:\n{hac_log.read_text()[-3000:]}", file=sys.stderr)
                return 1
            return 0
        finally:
            for pool in pools:
                pool.shutdown(wait=True)
            for p in procs:
                _stop(p)


def _key_info(cert_file: str) -> str:
    key = x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__


def _report(
    args: argparse.Namespace,
    duration: float,
    tls_info: str,
    cert_file: str,
    rows: list[tuple[int, Result, Result, Result]],
) -> None:
    cores = os.cpu_count() or 0
    load = os.getloadavg()[0]
    print(
        f"mipsec bootstrap bench: {tls_info}, {_key_info(cert_file)} server certificate, "
        f"{duration:g} s per figure"
    )
    clients = (
        "tests/integration/rawmn.py, the independent MN, one thread each"
        if args.client == "raw"
        else "asyncio, core/tlsclient.py + core/mn_exchange.py"
    )
    print(
        f"note: {cores} CPU cores; the clients ({clients}; this process) and the server "
        "process compete for them, so every figure is client+server bound "
        f"(1-min load average at the end: {load:.2f})."
    )
    if args.provisioning == "tls":
        print(
            "note: SAs provisioned over TLS to a mipsec --role ha process; "
            "bootstrap server CPU = HAC + HA"
        )
    else:
        print("note: HA in the HAC's process (local transport, in-memory store): no HA round trip")
    if args.profile_hac:
        print(f"note: HAC runs under cProfile ({args.profile_hac}): figures not representative")
    if args.profile_ha:
        print(f"note: HA runs under cProfile ({args.profile_ha}): figures not representative")
    print()
    head = (
        f"{'MNs':>4} | {'handshake/s':>11} | {'bootstrap/s':>11} | {'ratio':>5} | "
        f"{'bootstrap/s':>11} | {'ratio':>5} | {'server CPU µs/op':>24} | "
        f"{'client CPU µs/op':>24}"
    )
    print(head)
    print(
        f"{'':>4} | {'(bare TLS)':>11} | {'(PSK)':>11} | {'':>5} | {'(EAP-TLS)':>11} | "
        f"{'':>5} | {'TLS / PSK / EAP-TLS':>24} | {'TLS / PSK / EAP-TLS':>24}"
    )
    print("-" * len(head))
    for n, t, b, e in rows:
        ratio = b.rate / t.rate if t.rate else float("nan")
        eap_ratio = e.rate / t.rate if t.rate else float("nan")
        flags = ("" if ratio >= 0.7 else "  (PSK < 0.7)") + (
            "" if args.psk_only or eap_ratio >= 0.4 else "  (EAP-TLS < 0.4)"
        )
        server = f"{t.cpu_us(t.server_cpu):.0f} / {b.cpu_us(b.server_cpu):.0f} / " + (
            f"{e.cpu_us(e.server_cpu):.0f}"
        )
        client = f"{t.cpu_us(t.client_cpu):.0f} / {b.cpu_us(b.client_cpu):.0f} / " + (
            f"{e.cpu_us(e.client_cpu):.0f}"
        )
        eap_rate = "-" if args.psk_only else f"{e.rate:.1f}"
        eap_shown = "-" if args.psk_only else f"{eap_ratio:.2f}"
        print(
            f"{n:>4} | {t.rate:>11.1f} | {b.rate:>11.1f} | {ratio:>5.2f} | {eap_rate:>11} | "
            f"{eap_shown:>5} | {server:>24} | {client:>24}{flags}"
        )
    if args.provisioning == "tls":
        print()
        for n, _t, b, e in rows:
            ha_psk, hac_psk = (b.cpu_us(c) for c in b.server_split)
            line = f"{n:>4} MNs: server CPU µs/op split HAC + HA: PSK {hac_psk:.0f} + {ha_psk:.0f}"
            if e.server_split:
                ha_eap, hac_eap = (e.cpu_us(c) for c in e.server_split)
                line += f", EAP-TLS {hac_eap:.0f} + {ha_eap:.0f}"
            print(line)
    print()
    print(
        "ratio = bootstrap/s / handshake/s (targets: PSK >= 0.70, EAP-TLS >= 0.40); a "
        "bootstrap = TCP + TLS + cert checks + PSK exchange or EAP-TLS inside it + close."
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_interruptible(main: Callable[[argparse.Namespace], Awaitable[int]], args: Any) -> int:
    """``asyncio.run(main(args))``; SIGTERM ends it like Ctrl-C (exit 130), so
    the benches' finally clauses always stop the processes they started."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(main(args))
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per figure (5)")
    p.add_argument("--quick", action="store_true", help="1 s per figure (CI)")
    p.add_argument("--tls12", action="store_true", help="strict RFC 6618 mode: TLS 1.2 only")
    p.add_argument("--concurrency", default="1,32", help="comma-separated MN counts (1,32)")
    p.add_argument(
        "--provisioning",
        choices=("local", "tls"),
        default="local",
        help="HA provisioning: local (HAC only, default) or tls (also runs mipsec --role ha)",
    )
    p.add_argument(
        "--profile-hac",
        type=Path,
        default=None,
        metavar="FILE",
        help="run the HAC under cProfile, stats to FILE",
    )
    p.add_argument(
        "--profile-ha",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --provisioning tls: run the HA under cProfile, stats to FILE",
    )
    p.add_argument(
        "--psk-only",
        action="store_true",
        help="skip the EAP-TLS figures (e.g. to profile the PSK path alone)",
    )
    p.add_argument(
        "--client",
        choices=("mipsec", "raw"),
        default="mipsec",
        help="the MN client: mipsec's own (default) or the test suite's independent "
        "raw MN (tests/integration/rawmn.py, EAP-TLS by raweap.py) for handshakes and "
        "bootstraps alike",
    )
    p.add_argument("--serve-tls", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_tls:
        asyncio.run(_serve_tls(args.serve_tls[0], args.serve_tls[1], args.tls12))
        return 0
    if args.duration <= 0:
        p.error("--duration must be positive")
    try:
        levels = [int(x) for x in args.concurrency.split(",")]
    except ValueError:
        p.error("--concurrency: comma-separated integers")
    if not levels or min(levels) < 1 or max(levels) > 200:
        p.error("--concurrency: each between 1 and 200")
    if args.profile_hac is not None:
        args.profile_hac = args.profile_hac.resolve()
    if args.profile_ha is not None:
        args.profile_ha = args.profile_ha.resolve()
    return run_interruptible(run, args)


if __name__ == "__main__":
    sys.exit(main())
