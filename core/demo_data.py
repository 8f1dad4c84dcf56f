"""``mipsec demo --data``: the demo in network namespaces, then user data through the HA.

Needs root (CAP_NET_ADMIN) and iproute2.  Builds a lab of namespaces
(``netlab.NetLab``: MN, HA, correspondent), starts a real HA (data plane on a
TUN device) and a real HAC in the HA's namespace and a real MN in its own,
then sends pings and a short TCP transfer from the MN's home addresses to
the correspondent through the HA, narrating each step.  Everything it made
is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mipsec.core.netlab import (
    CN4,
    CN6,
    CN_LINK_HA4,
    CN_LINK_HA6,
    HA4,
    HA6,
    HA_PORT,
    HAC_PORT,
    HOME4,
    HOME6,
    MN4,
    MN6,
    LabError,
    NetLab,
    lab_configs,
    no_net_admin,
)

TCP_BYTES = 1 << 20


def run_data_demo() -> int:
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        print(f"[{step}] {text}", flush=True)

    reason = no_net_admin()
    if reason is not None:
        print(f"demo --data: {reason}; run it as root (mipsec demo works without)")
        return 1
    with tempfile.TemporaryDirectory(prefix="mipsec-demo-data-") as tmp:
        base = Path(tmp)
        info = lab_configs(base / "lab", outer="ip6")
        say(
            f"lab created in {base / 'lab'}: test CA, HAC certificate for "
            f"{info['hac']['server_name']}, MN {info['mn']['mn_id']} with a random 32-octet PSK"
        )
        try:
            with NetLab(base) as lab:
                return _run(lab, info, say)
        except LabError as exc:
            say(f"FAILED: {exc}")
            return 1
        finally:
            print(f"[{step + 1}] namespaces, TUN devices and processes removed", flush=True)


def _run(lab: NetLab, info: dict[str, Any], say: Any) -> int:
    ns = lab.ns
    say(
        f"network namespaces: {ns['mn']} (MN, {MN6} and {MN4}) -- {ns['ha']} (HA and HAC, "
        f"{HA6} and {HA4}; {CN_LINK_HA6} and {CN_LINK_HA4}) -- {ns['cn']} "
        f"(correspondent, {CN6} and {CN4})"
    )
    ha = lab.mipsec("ha", "ha", info["ha"]["config"])
    line = lab.wait_log("ha", "data plane on", 30)
    lab.wait_log("ha", "listening on", 30)
    say(
        f"HA started in {ns['ha']} (pid {ha.pid}): Binding Updates and user data on UDP "
        f"{HA_PORT}; {line.split(': ', 1)[-1].replace('data plane on ', 'TUN ')} "
        f"-- the home prefixes {HOME6} and {HOME4} lead into it"
    )
    hac = lab.mipsec("ha", "hac", info["hac"]["config"])
    lab.wait_log("hac", "HAC listening", 30)
    say(
        f"HAC started in {ns['ha']} (pid {hac.pid}): TLS on [{HA6}]:{HAC_PORT} and "
        f"{HA4}:{HAC_PORT}; it provisions SAs to the HA over mutually authenticated TLS"
    )
    say(
        "MN starting in its namespace: TLS to the HAC, certificate checked (SAN, CA), "
        "PSK exchange bound to tls-server-end-point, then a protected Binding Update"
    )
    lab.mipsec("mn", "mn", info["mn"]["config"], "--json")
    result = json.loads(lab.wait_log("mn", '"status"', 60))
    if result.get("status") != 200 or not result.get("ok"):
        say(f"bootstrap or registration FAILED: {result.get('reason') or result.get('ba')}")
        return 1
    sa, ba = result["sa"], result["ba"]
    say(
        f"HAC answered status 200: SPI {sa['spi']}, suite {sa['suite']} {sa['suite_id']}, "
        f"scope {sa['scope']} (signalling and data), valid until {sa['validity_end']}"
    )
    hoa6, hoa4 = result["bootstrap"]["ip6_hoa"], ba.get("ip4_hoa")
    bound = lab.wait_log("ha", "binding added", 10).split(": ", 1)[-1]
    say(f"HA answered Binding Acknowledgement status {ba['status']}; HA log: {bound}")
    dp = lab.wait_log("mn", "data plane on", 30).split(": ", 1)[-1]
    say(
        f"MN {dp.replace('data plane on ', 'TUN ')}; routes to {CN6.rsplit(':', 1)[0]}:/64 and "
        f"{CN4.rsplit('.', 1)[0]}.0/24 lead into the tunnel"
    )
    ok = True
    pings = [(hoa6, CN6, "IPv6 in IPv6")]
    if hoa4:
        pings.append((hoa4, CN4, "IPv4 home address in IPv6, DSMIP6"))
    for src, dst, what in pings:
        received, summary = lab.ping(src, dst)
        say(f"ICMP echo {src} -> {dst} ({what}): {summary}")
        ok = ok and received > 0
    report = lab.tcp_transfer(hoa6, CN6, TCP_BYTES)
    if report.get("ok"):
        say(
            f"TCP: {TCP_BYTES >> 10} KiB from [{hoa6}] to [{CN6}]:5001 in {report['seconds']} s; "
            "the correspondent's SHA-256 of what it received matches"
        )
    else:
        say(f"TCP transfer FAILED: {report.get('error')}")
        ok = False
    mn_log = lab.stop("mn")
    ha_log = lab.stop("ha")
    for log, who in ((mn_log, "MN"), (ha_log, "HA")):
        for ln in log.splitlines():
            if "data plane on" in ln and "stopped:" in ln:
                say(f"{who} data plane counters: {ln.split('stopped: ', 1)[-1]}")
    if ok:
        say("done: the MN's home addresses reached the correspondent through its HA")
    return 0 if ok else 1
