"""EAP-AKA and EAP-TLS bootstraps/s through the AAA lab vs eapol_test's rate.

    python bench/aaa.py [--duration S] [--concurrency 1,4] [--quick]

One run, one AAA lab (``../shared/aaa-lab``: FreeRADIUS 3.2, which runs
EAP-TLS itself and proxies the 3GPP realm to hostapd's EAP-AKA server with a
Milenage AuC).  ``MIPSEC_AAA_LAB_ENV`` names a running lab's ``lab.env``;
otherwise the bench starts one (ports 0) and stops it at the end.

* mipsec: ``mipsec init --radius ... --usim ...``, a real ``mipsec --role ha``
  and ``--role hac``; each bootstrap is what ``mipsec --role mn --once`` does
  without the BU (TCP + TLS to the HAC, the MHAuth EAP exchange relayed by the
  HAC to RADIUS, MSK from the MPPE keys keying Done and the 200, SA issued and
  provisioned to the HA).  EAP-AKA with the lab subscriber's software USIM,
  EAP-TLS with the lab's client certificate (FreeRADIUS is the EAP server).
* eapol_test: hostapd's RADIUS/EAP test peer against the same FreeRADIUS, one
  process per authentication (that is how it is used), the USIM answered by the
  lab's ``usim_ctrl.py`` for AKA.  Same concurrency levels.

ratio = mipsec bootstraps/s / eapol_test authentications/s (target >= 1.0).
Exit status 1 if any bootstrap or authentication failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mipsec.core.labsetup import free_port, port_open

REPO = Path(__file__).resolve().parents[1]
LAB = REPO.parent / "shared" / "aaa-lab"
KI, OPC, AMF, SQN = (
    "465b5ce8b199b49faa5f0a2ee238a6bc",
    "cd63cb71954a9f4e48a5994e37a02baf",
    "b9b9",
    "ff9bb4d0b607",
)
IMSI = "001010000000001"


def _mipsec() -> list[str]:
    script = Path(sys.executable).with_name("mipsec")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mipsec.core.cli"]


def start_lab(root: Path) -> tuple[dict[str, str], Path | None]:
    env_file = os.environ.get("MIPSEC_AAA_LAB_ENV")
    if env_file:
        text = Path(env_file).read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line), None
    lab = root / "aaa"
    env = dict(os.environ, AAA_LAB_AUTH_PORT="0", AAA_LAB_ACCT_PORT="0", AAA_LAB_AKA_PORT="0")
    out = subprocess.run(
        ["bash", str(LAB / "start-freeradius.sh"), "start", str(lab)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"AAA lab did not start: {out.stderr[-2000:]}")
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line), lab


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if port_open("127.0.0.1", port):  # never a connection to itself
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def _proc_cpu(pid: int) -> float:
    """user + system CPU seconds of ``pid`` (Linux /proc); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {name: _proc_cpu(pid) for name, pid in pids.items()}
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # eapol_test, usim_ctrl.py (reaped)
    out["client"] = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return out


class Rate:
    def __init__(self) -> None:
        self.ops = 0
        self.errors = 0
        self.seconds = 0.0
        self.first_error = ""
        self.cpu: dict[str, float] = {}  # component -> CPU seconds during the run

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def cpu_ms(self) -> str:
        n = max(self.ops, 1)
        return " ".join(f"{k}={1000 * v / n:.1f}" for k, v in self.cpu.items() if v > 0)


PIDS: dict[str, int] = {}  # the server processes whose CPU is measured


async def measure(op: Callable[[], Awaitable[None]], n: int, duration: float) -> Rate:
    r = Rate()
    cpu0 = _cpu(PIDS)
    t0 = time.monotonic()
    end = t0 + duration

    async def worker() -> None:
        while time.monotonic() < end and r.errors < 20:
            try:
                await op()
                r.ops += 1
            except Exception as exc:  # counted and reported
                r.errors += 1
                r.first_error = r.first_error or f"{type(exc).__name__}: {exc}"

    await asyncio.gather(*(worker() for _ in range(n)))
    r.seconds = time.monotonic() - t0
    cpu1 = _cpu(PIDS)
    r.cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    return r


# ------------------------------------------------------------ mipsec clients


def mipsec_op(config: Path) -> Callable[[], Awaitable[None]]:
    from mipsec.core import pluginmanager
    from mipsec.core.config import MNConfig, load_config
    from mipsec.core.roles.mn import bootstrap, peer_factory

    cfg = load_config(config, "mn")
    assert isinstance(cfg, MNConfig)
    factory = peer_factory(cfg, pluginmanager.make_plugin_manager(), str(config))

    async def op() -> None:
        result = await bootstrap(cfg, config_file=str(config), factory=factory)
        if not result.ok:
            raise RuntimeError(f"status {result.status}: {result.reason}")

    return op


def write_tls_mn(lab: Path, aaa: dict[str, str]) -> Path:
    """An MN authenticating with EAP-TLS to FreeRADIUS (through the HAC)."""
    text = (lab / "mn-aka.toml").read_text()
    head = text.split("\n[eap]")[0]
    head = head.replace(
        'mn_id = "0001010000000001@wlan.mnc001.mcc001.3gppnetwork.org"', 'mn_id = "mn1@lab.test"'
    )
    pki = Path(aaa["CA_CERT"]).parent
    path = lab / "mn-tls-radius.toml"
    path.write_text(
        head + f'\n[eap]\nmethods = ["tls"]\n\n[eap.tls]\ncert = "{pki / "client.pem"}"\n'
        f'key = "{pki / "client.key"}"\nca = "{pki / "ca.pem"}"\n'
        'server_name = "radius.lab.test"\n'
    )
    os.chmod(pki / "client.key", 0o600)
    return path


# ------------------------------------------------------------ eapol_test


def eapol_op(method: str, aaa: dict[str, str], work: Path) -> Callable[[], Awaitable[None]]:
    counter = [0]
    pki = Path(aaa["CA_CERT"]).parent

    async def op() -> None:
        counter[0] += 1
        d = work / f"{method}-{counter[0]}"
        d.mkdir(parents=True)
        conf = d / "eapol.conf"
        template = (LAB / "eapol_test" / f"eap-{method}.conf").read_text()
        conf.write_text(template.replace("@PKI@", str(pki)).replace("@CTRL@", str(d / "ctrl")))
        cmd = ["eapol_test", "-c", str(conf), "-a", "127.0.0.1", "-p", aaa["AUTH_PORT"],
               "-s", aaa["SECRET"], "-t", "15"]  # fmt: skip
        if method == "aka":
            cmd.append("-W")
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        usim = None
        if method == "aka":
            usim = await asyncio.create_subprocess_exec(
                sys.executable, str(LAB / "usim_ctrl.py"), "--ctrl", str(d / "ctrl" / "test"),
                "--ki", KI, "--opc", OPC, "--sqn", SQN, "--timeout", "15",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        out, _ = await proc.communicate()
        if usim is not None:
            await usim.wait()
        shutil.rmtree(d, ignore_errors=True)
        if proc.returncode != 0 or not out.strip().endswith(b"SUCCESS"):
            raise RuntimeError(f"eapol_test {method}: {out[-300:]!r}")

    return op


# ------------------------------------------------------------ main


async def run(args: argparse.Namespace) -> int:
    duration = 2.0 if args.quick else args.duration
    levels = [int(x) for x in args.concurrency.split(",")]
    procs: list[subprocess.Popen[bytes]] = []
    lab_dir: Path | None = None
    with tempfile.TemporaryDirectory(prefix="mipsec-bench-aaa-") as tmp:
        root = Path(tmp)
        try:
            aaa, lab_dir = start_lab(root)
            secret = root / "radius.secret"
            secret.write_text(aaa["SECRET"])
            secret.chmod(0o600)
            lab = root / "lab"
            out = subprocess.run(
                [*_mipsec(), "init", str(lab), "--hac-port", str(free_port()),
                 "--ha-port", str(free_port()), "--radius", f"127.0.0.1:{aaa['AUTH_PORT']}",
                 "--radius-secret-file", str(secret),
                 "--usim", f"{IMSI},{KI},{OPC},{AMF},{SQN}", "--json"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            info: dict[str, Any] = json.loads(out.stdout)
            for role in ("ha", "hac"):
                log = (root / f"{role}.log").open("wb")
                p = subprocess.Popen(
                    [*_mipsec(), "--role", role, "--config", info[role]["config"]],
                    stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
                procs.append(p)
                PIDS[role] = p.pid
                wait_port(int(info[role]["port"]), p, role)
            for name, key in (
                ("freeradius", "PID"),
                ("hostapd", "AKA_PID"),
                ("auc", "AKA_HLR_PID"),
            ):
                if aaa.get(key, "").isdigit():
                    PIDS[name] = int(aaa[key])
            ops = {
                "EAP-AKA": (
                    mipsec_op(Path(info["mn_aka"]["config"])),
                    eapol_op("aka", aaa, root / "eapol"),
                ),
                "EAP-TLS": (
                    mipsec_op(write_tls_mn(lab, aaa)),
                    eapol_op("tls", aaa, root / "eapol"),
                ),
            }
            rows = []
            for name, (ours, theirs) in ops.items():
                # One subscriber in the lab's AuC: hostapd's eap_sim_db does not
                # serve concurrent authentications of one IMSI reliably (a
                # second one in flight may go unanswered), so EAP-AKA runs one
                # MN at a time -- as a real USIM does.
                for n in [1] if name == "EAP-AKA" else levels:
                    a = await measure(ours, n, duration)
                    b = await measure(theirs, n, duration)
                    rows.append((name, n, a, b))
            print(
                f"mipsec AAA bench: {duration:g} s per figure, FreeRADIUS "
                f"127.0.0.1:{aaa['AUTH_PORT']} (AKA proxied to hostapd), "
                f"{os.cpu_count()} cores shared by everything, load {os.getloadavg()[0]:.2f}"
            )
            head = f"{'method':<8} | {'MNs':>3} | {'mipsec /s':>9} | {'eapol_test /s':>13} | ratio"
            print(head)
            print("-" * len(head))
            failed = False
            for name, n, a, b in rows:
                ratio = a.rate / b.rate if b.rate else float("nan")
                flag = "" if ratio >= 1.0 else "  (< 1.0)"
                print(f"{name:<8} | {n:>3} | {a.rate:>9.1f} | {b.rate:>13.1f} | {ratio:5.2f}{flag}")
                print(f"{'':<8} |     | CPU ms/op mipsec:     {a.cpu_ms()}")
                print(f"{'':<8} |     | CPU ms/op eapol_test: {b.cpu_ms()}")
                for who, r in (("mipsec", a), ("eapol_test", b)):
                    if r.errors or r.ops == 0:
                        failed = True
                        print(
                            f"  {who}: {r.errors} errors (first: {r.first_error})", file=sys.stderr
                        )
            if failed:
                for role in ("hac", "ha"):
                    lines = (root / f"{role}.log").read_text().splitlines()
                    bad = [x for x in lines if "WARNING" in x or "ERROR" in x][-10:]
                    print(f"{role} log (warnings):", *bad, sep="\n  ", file=sys.stderr)
            print(
                "\nratio = mipsec bootstraps/s (TLS to the HAC + EAP relayed to RADIUS + SA "
                "provisioned to the HA) / eapol_test authentications/s (target >= 1.0)"
            )
            return 1 if failed else 0
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            if lab_dir is not None:
                subprocess.run(
                    ["bash", str(LAB / "start-freeradius.sh"), "stop", str(lab_dir)],
                    capture_output=True, timeout=60,
                )  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per figure (8)")
    p.add_argument("--concurrency", default="1,4", help="comma-separated levels (1,4)")
    p.add_argument("--quick", action="store_true", help="2 s per figure (CI)")
    args = p.parse_args()
    if shutil.which("eapol_test") is None and not os.environ.get("MIPSEC_AAA_LAB_ENV"):
        pass  # the lab script installs eapoltest with the rest
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
