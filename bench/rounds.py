"""HAC CPU per MHAuth round trip, against a bare TLS echo round trip.

    python bench/rounds.py [--duration S] [--quick] [--concurrency 1,16] [--rounds R]

Why: an EAP method costs the HAC one MHAuth round trip per EAP round (EAP-TLS
takes 5: Identity, Start, the two flights, the commitment), on top of its
crypto.  This bench isolates that per-round cost.

What is measured, in one run, on one ``mipsec init`` lab in a temp dir:

* the HAC (``mipsec --role hac``, HA in its process) serving EAP bootstraps of
  the test-suite's third-party method (tests/fixtures/mipsec-eap-example,
  installed into the temp dir: exactly what a plugin author's method gets),
  once with 0 and once with R extra ping rounds (``rounds`` option); the
  same MNs, the same client code as ``bench/bootstrap.py`` (core/tlsclient.py,
  core/mn_exchange.py).  HAC CPU per round = the difference of HAC CPU per
  bootstrap / R;
* baseline: a minimal asyncio TLS server (stdlib ``ssl`` on memory BIOs, as
  core/roles/tlsserver.py uses it, echoing each record and nothing else) with
  0 and with R echo round trips of 200 octets per connection, same
  certificate, same client TLS code: its CPU per round trip, the same way.

ratio = HAC CPU per round / echo server CPU per round: how many bare round
trips one MHAuth round costs (parsing, the two HMACs, the EAP framing, the
method, the response and the timers).  Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bootstrap as b  # a sibling script, not a package

from mipsec.core.hookspecs import PluginContext
from mipsec.core.tls import hac_server_context, mn_client_context, set_nodelay
from mipsec.core.tlsclient import TlsClient

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mipsec-eap-example"
SECRET = "b7" * 16
PAYLOAD = 200  # octets per echo round trip: about one MHAuth ping round's record


# ------------------------------------------------------------ echo server


async def _serve_echo(cert: str, key: str) -> None:
    ctx = hac_server_context(cert, key)

    class Echo(asyncio.Protocol):
        """TLS on memory BIOs, each record echoed: the floor of a round trip."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.t = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                set_nodelay(sock)
            self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
            self.up = False

        def data_received(self, data: bytes) -> None:
            self.inc.write(data)
            try:
                if not self.up:
                    self.obj.do_handshake()
                    self.up = True
                while chunk := self.obj.read(65536):
                    self.obj.write(chunk)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                self._flush()
                self.t.close()
                return
            self._flush()

        def _flush(self) -> None:
            out = self.out.read()
            if out:
                self.t.write(out)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host=b.HOST, port=0, reuse_address=True)
    await b.serve_until_signal(server)


class EchoClient:
    def __init__(self, ctx: ssl.SSLContext, port: int, server_name: str, rounds: int) -> None:
        self.ctx, self.port, self.server_name, self.rounds = ctx, port, server_name, rounds

    async def op(self, mn: tuple[str, bytes]) -> None:
        async with asyncio.timeout(b.TIMEOUT):
            tls = await TlsClient.connect(b.HOST, self.port, self.ctx, self.server_name)
        try:
            for _ in range(self.rounds):
                tls.write(b"x" * PAYLOAD)
                got = 0
                while got < PAYLOAD:
                    async with asyncio.timeout(b.TIMEOUT):
                        data = await tls.read()
                    if not data:
                        raise ConnectionError("echo server closed")
                    got += len(data)
        finally:
            await b._close(tls)


# ------------------------------------------------------------ the HAC side


def _install_fixture(site: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "--target", str(site), str(FIXTURE)], check=True, timeout=300)


def _hac_toml(path: Path, rounds: int) -> None:
    text = path.read_text()
    if "[methods.eap.example]" not in text:
        new = text.replace('types = ["tls"]', 'types = ["example", "tls"]', 1)
        if new == text:
            raise RuntimeError(f"{path}: no EAP types line to extend")
        text = new + f'\n[methods.eap.example]\nsecret_hex = "{SECRET}"\nrounds = 0\n'
    head, _, _ = text.rpartition("rounds = ")
    path.write_text(f"{head}rounds = {rounds}\n")


async def _hac_cpu(
    lab: Path,
    hac_toml: Path,
    rounds: int,
    client: b.Client,
    creds: list[tuple[str, bytes]],
    levels: list[int],
    duration: float,
    warmup: float,
) -> dict[int, b.Result]:
    _hac_toml(hac_toml, rounds)
    log = lab.parent / f"hac-{rounds}.log"
    hac = b._spawn([*b._mipsec_cmd(None), "--role", "hac", "--config", str(hac_toml)], log)
    try:
        client.port = b._wait_for(r"HAC listening on 127\.0\.0\.1 port (\d+)", log.read_text, hac)
        out: dict[int, b.Result] = {}
        for n in levels:
            out[n] = await b.measure(client.bootstrap, creds, n, duration, warmup, [hac.pid])
            if out[n].errors:
                raise RuntimeError(f"bootstraps failed: {out[n].first_error}\n{log.read_text()}")
        return out
    finally:
        b._stop(hac)


async def run(args: argparse.Namespace) -> int:
    duration = 1.0 if args.quick else args.duration
    warmup = 0.2 if args.quick else min(1.0, duration / 5)
    rounds = 4 if args.quick else args.rounds
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="mipsec-bench-") as tmp:
        root = Path(tmp)
        site = root / "site"
        _install_fixture(site)
        sys.path.insert(0, str(site))
        # The HAC process finds the plugin the way an operator's would.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p
        )
        info, creds = b.make_lab(root, max(levels), False, "local")
        lab = root / "lab"
        hac_info = info["hac"]
        assert isinstance(hac_info, dict)
        ca, server_name = str(info["ca"]), str(hac_info["server_name"])
        cert, key = str(lab / "pki" / "hac.pem"), str(lab / "pki" / "hac.key")
        ctx = mn_client_context(ca)

        from mipsec.core.eap.mhauth import EapMethod
        from mipsec.core.pluginmanager import make_plugin_manager

        pctx = PluginContext("mn", lab, extra={"pm": make_plugin_manager()})
        peer = EapMethod().peer({"methods": ["example"], "example": {"secret_hex": SECRET}}, pctx)
        client = b.Client(
            ctx, 0, server_name, per_mn={m: peer for m, _ in creds}, method_name="eap"
        )
        hac_toml = Path(str(hac_info["config"]))
        hac0 = await _hac_cpu(lab, hac_toml, 0, client, creds, levels, duration, warmup)
        hac_r = await _hac_cpu(lab, hac_toml, rounds, client, creds, levels, duration, warmup)

        log = root / "echo.log"
        echo = b._spawn([sys.executable, __file__, "--serve-echo", cert, key], log)
        try:
            port = b._wait_for(r"READY (\d+)", log.read_text, echo)
            echo0: dict[int, b.Result] = {}
            echo_r: dict[int, b.Result] = {}
            for n in levels:
                for k, out in ((0, echo0), (rounds, echo_r)):
                    op = EchoClient(ctx, port, server_name, k).op
                    out[n] = await b.measure(op, creds, n, duration, warmup, [echo.pid])
        finally:
            b._stop(echo)

    print(
        f"mipsec rounds bench: HAC CPU per MHAuth round trip (EAP-Example, 0 vs {rounds} "
        f"extra ping rounds) vs a bare TLS echo round trip ({PAYLOAD} octets), "
        f"{duration:g} s per figure"
    )
    print(
        f"note: {os.cpu_count()} CPU cores shared by the clients (this process) and the "
        "server; per-round figures are differences of two runs, so expect noise"
    )
    print()
    print(" MNs | HAC µs/bootstrap (0 / R) | HAC µs/round | echo µs/round | ratio")
    print("-" * 76)
    for n in levels:
        h0, hr = (r.cpu_us(r.server_cpu) for r in (hac0[n], hac_r[n]))
        e0, er = (r.cpu_us(r.server_cpu) for r in (echo0[n], echo_r[n]))
        per_hac, per_echo = (hr - h0) / rounds, (er - e0) / rounds
        ratio = per_hac / per_echo if per_echo > 0 else float("nan")
        both = f"{h0:.0f} / {hr:.0f}"
        print(f"{n:>4} | {both:>24} | {per_hac:>12.0f} | {per_echo:>13.0f} | {ratio:>5.1f}")
    print()
    print("ratio = HAC CPU per MHAuth round / echo server CPU per round trip")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per figure (4)")
    p.add_argument("--quick", action="store_true", help="1 s per figure, 4 rounds (CI)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated MN counts (1,16)")
    p.add_argument("--rounds", type=int, default=16, help="extra ping rounds (16)")
    p.add_argument("--serve-echo", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_echo:
        asyncio.run(_serve_echo(*args.serve_echo))
        return 0
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    return int(b.run_interruptible(run, args))


if __name__ == "__main__":
    sys.exit(main())
