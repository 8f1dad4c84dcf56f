"""Tunnel throughput: iperf3 TCP through mipsec and through OpenVPN 2.6, same pair, same run.

Run (root):  python bench/tunnel.py            (about 45 s)
             python bench/tunnel.py --quick    (CI, about 15 s; noisier)
             python bench/tunnel.py --json     (prints only the JSON object)

One pair of network namespaces (``mipsec.core.netlab``: ``mn`` and ``ha``,
joined by a veth link, MTU 1500) carries three tunnels at once, each idle
while another is measured:

* mipsec: the real roles -- HAC and HA (data plane on) in ``ha``, the MN in
  ``mn`` -- with the SA suite AES_128_CBC_SHA (AES-128-CBC + HMAC-SHA1-96),
  IPv4 outside, TUN MTU 1400;
* OpenVPN 2.6, TLS mode (a test PKI made here), ``--data-ciphers AES-128-CBC
  --auth SHA1`` (HMAC-SHA1), TUN MTU 1400;
* OpenVPN 2.6, TLS mode, ``--data-ciphers AES-128-GCM``, TUN MTU 1400.

Both OpenVPN instances run with ``--disable-dco`` (user space, like mipsec;
the kernel's DCO module would be a different comparison) and ``--mssfix 0``,
so TCP's segment size comes from the TUN MTU in all three tunnels, and with
the same UDP socket buffers mipsec asks for.  The bench checks each
OpenVPN log for the data-channel cipher it asked for.

Measured: iperf3 TCP from the ``mn`` side to an iperf3 server in ``ha`` on
the far end of each tunnel, the runs interleaved (mipsec, CBC, GCM, mipsec,
...) so load from other users of the machine falls on all three alike;
Mbit/s is the median over the rounds (receiver side).  "CPU s/Gbit" is the
CPU time (user + system, from /proc) of the tunnel's two processes -- the MN
and the HA, or OpenVPN client and server -- per Gbit delivered; it includes
the kernel work those processes do in their system calls (TUN reads and
writes, UDP sends, the packet's way through the veth link).  The ratios are
mipsec / OpenVPN Mbit/s.  Target (issue 11): ratio_cbc >= 1.0.

iperf3 and openvpn are installed from Debian (apt-get) when missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mipsec.core.netlab import CN_LINK_HA4, HA4, LabError, NetLab, lab_configs, no_net_admin
from mipsec.core.pki import make_ca, make_leaf, write_cert, write_key

MTU = 1400
SOCKET_BUFFER = 4 << 20  # what mipsec's MN and HA ask for (roles/mn.py, roles/ha.py)
CLK_TCK = 100


@dataclass
class Tunnel:
    key: str
    label: str
    server: str  # iperf3 server address (far end, in "ha")
    client: str  # iperf3 client source address (in "mn")
    port: int  # iperf3 port
    pids: list[int] = field(default_factory=list)
    mbit: list[float] = field(default_factory=list)
    cpu_per_gbit: list[float] = field(default_factory=list)
    user_share: list[float] = field(default_factory=list)  # user / (user + system)
    retransmits: list[int] = field(default_factory=list)


def _apt_install(tools: dict[str, str]) -> None:
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SystemExit(f"bench/tunnel.py: install {', '.join(missing)} first")
    print(f"installing {', '.join(missing)} from Debian (apt-get)", file=sys.stderr)
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime


def _openvpn_pki(d: Path) -> dict[str, Path]:
    ca_key, ca = make_ca("mipsec bench OpenVPN CA")
    skey, scert = make_leaf(ca_key, ca, common_name="ovpn-server")
    ckey, ccert = make_leaf(ca_key, ca, common_name="ovpn-client", client=True, server=False)
    paths = {k: d / f"ovpn-{k}.pem" for k in ("ca", "scert", "skey", "ccert", "ckey")}
    write_cert(paths["ca"], ca)
    write_cert(paths["scert"], scert)
    write_key(paths["skey"], skey)
    write_cert(paths["ccert"], ccert)
    write_key(paths["ckey"], ckey)
    return paths


def _start_openvpn(
    lab: NetLab, pki: dict[str, Path], name: str, cipher: str, port: int, net: str
) -> tuple[int, int]:
    common = [
        "openvpn",
        "--dev",
        f"{name}0",
        "--dev-type",
        "tun",
        "--proto",
        "udp",
        "--tun-mtu",
        str(MTU),
        "--mssfix",
        "0",
        "--disable-dco",
        "--data-ciphers",
        cipher,
        "--cipher",
        cipher,
        "--auth",
        "SHA1",
        "--sndbuf",
        str(SOCKET_BUFFER),
        "--rcvbuf",
        str(SOCKET_BUFFER),
        "--ca",
        str(pki["ca"]),
        "--verb",
        "3",
    ]
    srv = lab.start(
        "ha",
        f"{name}-server",
        *common,
        "--tls-server",
        "--dh",
        "none",
        "--cert",
        str(pki["scert"]),
        "--key",
        str(pki["skey"]),
        "--local",
        HA4,
        "--lport",
        str(port),
        "--ifconfig",
        f"{net}.1",
        f"{net}.2",
    )
    cli = lab.start(
        "mn",
        f"{name}-client",
        *common,
        "--tls-client",
        "--remote-cert-tls",
        "server",
        "--cert",
        str(pki["ccert"]),
        "--key",
        str(pki["ckey"]),
        "--nobind",
        "--remote",
        HA4,
        str(port),
        "--ifconfig",
        f"{net}.2",
        f"{net}.1",
    )
    for side in ("server", "client"):
        lab.wait_log(f"{name}-{side}", "Initialization Sequence Completed", 60)
        line = lab.wait_log(f"{name}-{side}", "Data Channel: cipher", 10)
        if f"'{cipher}'" not in line or (cipher.endswith("CBC") and "'SHA1'" not in line):
            raise LabError(f"{name}-{side}: wrong data channel: {line}")
    return srv.pid, cli.pid


def _iperf(lab: NetLab, t: Tunnel, seconds: float, omit: int) -> None:
    cmd = ["iperf3", "-c", t.server, "-B", t.client, "-p", str(t.port), "-J"]
    cmd += ["-t", f"{seconds:g}", "-O", str(omit)]
    before = [_cpu_seconds(p) for p in t.pids]
    out = lab.run("mn", *cmd, timeout=seconds + omit + 30)
    after = [_cpu_seconds(p) for p in t.pids]
    user = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    try:
        end = json.loads(out.stdout)["end"]
        received = end["sum_received"]
    except (ValueError, KeyError):
        raise LabError(f"iperf3 through {t.label}: {out.stdout[-300:]} {out.stderr[-300:]}")
    bits = received["bytes"] * 8.0
    t.mbit.append(received["bits_per_second"] / 1e6)
    t.retransmits.append(int(end.get("sum_sent", {}).get("retransmits", 0)))
    # CPU over the whole iperf3 run (omitted seconds included), bits likewise.
    total_bits = bits * (seconds + omit) / seconds
    t.cpu_per_gbit.append((user + system) / (total_bits / 1e9) if total_bits else float("nan"))
    t.user_share.append(user / (user + system) if user + system else float("nan"))


def run(quick: bool) -> dict[str, Any]:
    seconds, omit, rounds = (3.0, 0, 1) if quick else (5.0, 1, 2)
    with tempfile.TemporaryDirectory(prefix="mipsec-bench-tunnel-") as tmp:
        base = Path(tmp)
        info = lab_configs(base / "lab", outer="ip4", suites=("AES_128_CBC_SHA",), mtu=MTU)
        with NetLab(base) as lab:
            ha = lab.mipsec("ha", "ha", info["ha"]["config"])
            lab.wait_log("ha", "listening on", 60)
            lab.mipsec("ha", "hac", info["hac"]["config"])
            lab.wait_log("hac", "HAC listening", 60)
            mn = lab.mipsec("mn", "mn", info["mn"]["config"], "--json")
            result = json.loads(lab.wait_log("mn", '"status"', 60))
            if not result.get("ok") or result["sa"]["suite"] != "AES_128_CBC_SHA":
                raise LabError(f"mipsec MN: {result}")
            lab.wait_log("mn", "data plane on", 30)
            hoa4 = result["ba"]["ip4_hoa"]
            pki = _openvpn_pki(base)
            cbc = _start_openvpn(lab, pki, "ovcbc", "AES-128-CBC", 1194, "10.8.0")
            gcm = _start_openvpn(lab, pki, "ovgcm", "AES-128-GCM", 1195, "10.9.0")
            tunnels = [
                Tunnel("mipsec", "mipsec AES_128_CBC_SHA", CN_LINK_HA4, hoa4, 5201),
                Tunnel("openvpn_cbc", "OpenVPN AES-128-CBC + SHA1", "10.8.0.1", "10.8.0.2", 5202),
                Tunnel("openvpn_gcm", "OpenVPN AES-128-GCM", "10.9.0.1", "10.9.0.2", 5203),
            ]
            for t, pids in zip(tunnels, ([mn.pid, ha.pid], list(cbc), list(gcm)), strict=True):
                t.pids = pids
            for t in tunnels:
                lab.start("ha", f"iperf-{t.key}", "iperf3", "-s", "-B", t.server, "-p", str(t.port))
            time.sleep(0.5)
            for _ in range(rounds):
                for t in tunnels:
                    _iperf(lab, t, seconds, omit)
    return {
        "tunnels": tunnels,
        "seconds": seconds,
        "rounds": rounds,
    }


def summary(res: dict[str, Any]) -> dict[str, float]:
    med = {t.key: statistics.median(t.mbit) for t in res["tunnels"]}
    return {
        "mipsec_mbit": round(med["mipsec"], 1),
        "openvpn_cbc_mbit": round(med["openvpn_cbc"], 1),
        "openvpn_gcm_mbit": round(med["openvpn_gcm"], 1),
        "ratio_cbc": round(med["mipsec"] / med["openvpn_cbc"], 3),
        "ratio_gcm": round(med["mipsec"] / med["openvpn_gcm"], 3),
    }


def render(res: dict[str, Any]) -> str:
    s = summary(res)
    lines = [
        f"iperf3 TCP through each tunnel, {res['rounds']} round(s) of {res['seconds']:g} s, "
        f"interleaved; TUN MTU {MTU}; median Mbit/s (receiver)",
        "CPU s/Gbit: user + system CPU of the tunnel's two processes per Gbit delivered;"
        " user: the share of it in user space",
        "",
        f"{'tunnel':30s} {'Mbit/s':>8s} {'CPU s/Gbit':>11s} {'user':>5s} {'retrans':>8s}"
        "   runs (Mbit/s)",
        "-" * 80,
    ]
    for t in res["tunnels"]:
        runs = " ".join(f"{m:.0f}" for m in t.mbit)
        lines.append(
            f"{t.label:30s} {statistics.median(t.mbit):8.0f} "
            f"{statistics.median(t.cpu_per_gbit):11.2f} {statistics.median(t.user_share):5.0%} "
            f"{sum(t.retransmits):8d}   {runs}"
        )
    verdict = "met" if s["ratio_cbc"] >= 1.0 else "NOT met"
    lines += [
        "",
        f"ratio mipsec / OpenVPN AES-128-CBC+SHA1: {s['ratio_cbc']:.2f}   "
        f"(target >= 1.0: {verdict})",
        f"ratio mipsec / OpenVPN AES-128-GCM:      {s['ratio_gcm']:.2f}   (moonshot >= 1.0)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short CI run (one round of 3 s)")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args(argv)
    reason = no_net_admin()
    if reason is not None:
        # Like the system tests: no figures without CAP_NET_ADMIN, and say why.
        print(f"bench/tunnel.py: skipped: {reason}; run it as root", file=sys.stderr)
        return 0
    _apt_install({"iperf3": "iperf3", "openvpn": "openvpn", "ip": "iproute2"})
    started = time.monotonic()
    try:
        res = run(args.quick)
    except LabError as exc:
        print(f"bench/tunnel.py: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary(res)))
    else:
        print(render(res))
        print(f"\n(elapsed {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
