"""A data-plane lab in network namespaces: MN, HA, correspondent, optionally a NAT.

Used by ``mipsec demo --data``, the system tests (``tests/system``) and
``bench/tunnel.py``; needs root (CAP_NET_ADMIN) and iproute2, plus nftables for
the NAT.  Every name carries a random tag, so parallel runs never meet, and
``close`` (also on failure, as a context manager) stops what the lab started
and deletes its namespaces -- the veth links, TUN devices and NAT rules live
inside them and go with them.  Nothing is configured in the caller's own
namespace.

Topology (documentation prefixes, RFC 3849 / RFC 5737)::

    mn 2001:db8:f0::10  198.51.100.10        (behind the NAT: 10.77.0.10,
       |                                      nat 10.77.0.1 | 198.51.100.2)
    ha 2001:db8:f0::1   198.51.100.1   -- HAC, HA; TUN routes the home prefixes
       |                                  2001:db8:1::/64 and 192.0.2.0/24
    ha 2001:db8:c0::1   203.0.113.1
    cn 2001:db8:c0::2   203.0.113.2          (default routes via the HA)

``python -m mipsec.core.netlab tcp-sink|tcp-send`` are the two ends of the
TCP check the demo and the tests run through the tunnel.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mipsec.core.errors import MipsecError
from mipsec.core.labsetup import init_lab
from mipsec.core.tomltext import toml_value

__all__ = ["LabError", "NetLab", "lab_configs", "mn_variant", "no_net_admin", "toml_dump"]

HA6, HA4 = "2001:db8:f0::1", "198.51.100.1"
MN6, MN4 = "2001:db8:f0::10", "198.51.100.10"
MOVED6, MOVED4 = "2001:db8:f0::11", "198.51.100.11"
NAT_IN, NAT_OUT = "10.77.0.1", "198.51.100.2"
NATTED4, NATTED_MOVED4 = "10.77.0.10", "10.77.0.11"
CN_LINK_HA6, CN_LINK_HA4 = "2001:db8:c0::1", "203.0.113.1"
CN6, CN4 = "2001:db8:c0::2", "203.0.113.2"
CN_NET6, CN_NET4 = "2001:db8:c0::/64", "203.0.113.0/24"
HOME6, HOME4 = "2001:db8:1::/64", "192.0.2.0/24"  # the lab pool (labsetup.py)
HA_PORT, HAC_PORT = 7872, 7873  # fixed: every lab has namespaces of its own
_CMD_TIMEOUT = 30.0


class LabError(MipsecError):
    """The lab could not be built or a process in it failed (says which)."""


def no_net_admin() -> str | None:
    """Why a namespace lab cannot run here: None when this process holds
    CAP_NET_ADMIN (capability 12, linux/capability.h), which namespaces, veth
    links and TUN devices need.  Missing tools are not a reason to skip: the
    lab fails naming them."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return "cannot read /proc/self/status to check for CAP_NET_ADMIN"
    for line in status.splitlines():
        if line.startswith("CapEff:") and int(line.split()[1], 16) >> 12 & 1:
            return None
    return "this process lacks CAP_NET_ADMIN (network namespaces and TUN devices need it)"


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(cmd)}: {exc}") from None
    if check and out.returncode != 0:
        why = " ".join((out.stderr or out.stdout).split()) or f"exit status {out.returncode}"
        raise LabError(f"{' '.join(cmd)}: {why}")
    return out.stdout


# ---------------------------------------------------------------- TOML out


def toml_dump(data: dict[str, Any], prefix: str = "") -> str:
    """TOML text for ``data`` (scalars, lists, tables, arrays of tables)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    for k, v in tables:
        name = f"{prefix}{k}"
        for item in v if isinstance(v, list) else [v]:
            head = f"[[{name}]]" if isinstance(v, list) else f"[{name}]"
            lines.append(f"\n{head}")
            lines.append(toml_dump(item, f"{name}.").rstrip("\n"))
    return "\n".join(line for line in lines if line) + "\n"


def _edit(path: Path, changes: dict[str, Any]) -> None:
    data = tomllib.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if isinstance(node, list):  # an array of tables: its first one
                node = node[0]
        node[last] = value
    path.write_text(toml_dump(data))


def lab_configs(
    directory: Path,
    *,
    outer: str = "ip6",
    scope: int = 1,
    keepalive: float = 110.0,
    movement_check: float = 0.5,
    suites: Sequence[str] = ("AES_128_CBC_SHA256", "AES_128_CBC_SHA"),
    mtu: int = 1400,
) -> dict[str, Any]:
    """``mipsec init`` in ``directory``, then the configs adapted to the namespaces.

    ``outer``: how the MN reaches the HAC and the HA, ``ip6`` or ``ip4``.
    Returns init_lab's description (config paths, MN identity).
    """
    info = init_lab(directory, hac_port=HAC_PORT, ha_port=HA_PORT)
    ha_toml, hac_toml, mn_toml = (Path(info[r]["config"]) for r in ("ha", "hac", "mn"))
    _edit(
        ha_toml,
        {
            "ha.listen": [HA6, HA4],
            "ha.address6": HA6,
            "ha.address4": HA4,
            "dataplane": {"enabled": True, "tun": "mipha0", "mtu": mtu, "routes": [HOME6, HOME4]},
        },
    )
    _edit(
        hac_toml,
        {"hac.listen": [HA4, HA6], "ha.address6": HA6, "ha.address4": HA4, "ha.port": HA_PORT},
    )
    _edit(
        mn_toml,
        {
            "hac.host": HA6 if outer == "ip6" else HA4,
            "sa.scope": scope,
            "sa.suites": list(suites),
            "registration.transport": outer,
            "dataplane": {
                "enabled": True,
                "tun": "mip0",
                "mtu": mtu,
                "routes": [CN_NET6, CN_NET4],
                "keepalive_interval": keepalive,
                "movement_check": movement_check,
            },
        },
    )
    return info


def mn_variant(info: dict[str, Any], name: str, **changes: Any) -> str:
    """A copy of the lab's ``mn.toml`` with dotted-key ``changes``; its path.

    E.g. ``mn_variant(info, "mn-v4", **{"registration.transport": "ip4"})``.
    """
    base = Path(info["mn"]["config"])
    path = base.with_name(f"{name}.toml")
    path.write_text(base.read_text())
    _edit(path, changes)
    return str(path)


# ---------------------------------------------------------------- the namespaces


class NetLab:
    """The namespaces of one lab (see the module docstring); a context manager."""

    def __init__(self, directory: Path, *, nat: bool = False, tag: str | None = None) -> None:
        self.dir = Path(directory)
        self.nat = nat
        self.tag = tag or secrets.token_hex(3)
        roles = ("mn", "ha", "cn", *(("nat",) if nat else ()))
        self.ns = {r: f"mipsec-{self.tag}-{r}" for r in roles}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Path] = {}
        self._created: list[str] = []
        self.mn4 = NATTED4 if nat else MN4
        self.mn6: str | None = None if nat else MN6

    def _if(self, name: str) -> str:
        return f"m{self.tag}{name}"  # <= 15 octets

    # ------------------------------------------------------------ build / tear down

    def __enter__(self) -> NetLab:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        for ns in self.ns.values():
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            self._in(ns, "ip", "link", "set", "lo", "up")
        ha, cn, mn = self.ns["ha"], self.ns["cn"], self.ns["mn"]
        self._veth(ha, self._if("h0"), cn, self._if("c0"))
        self._addr(ha, self._if("h0"), f"{CN_LINK_HA6}/64", f"{CN_LINK_HA4}/24")
        self._addr(cn, self._if("c0"), f"{CN6}/64", f"{CN4}/24")
        self.exec("cn", "ip", "-6", "route", "add", "default", "via", CN_LINK_HA6)
        self.exec("cn", "ip", "-4", "route", "add", "default", "via", CN_LINK_HA4)
        self._sysctl("ha", "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1")
        if self.nat:
            nat = self.ns["nat"]
            self._veth(ha, self._if("h1"), nat, self._if("n1"))
            self._addr(ha, self._if("h1"), f"{HA6}/64", f"{HA4}/24")
            self._addr(nat, self._if("n1"), f"{NAT_OUT}/24")
            self._veth(nat, self._if("n0"), mn, self._if("m0"))
            self._addr(nat, self._if("n0"), f"{NAT_IN}/24")
            self._addr(mn, self._if("m0"), f"{NATTED4}/24")
            self.exec("mn", "ip", "-4", "route", "add", "default", "via", NAT_IN)
            self._sysctl("nat", "net.ipv4.ip_forward=1")
            rules = (
                "table ip mipsec_nat {\n chain post {\n"
                "  type nat hook postrouting priority srcnat; policy accept;\n"
                f'  oifname "{self._if("n1")}" masquerade\n }}\n}}\n'
            )
            self._nft(rules)
        else:
            self._veth(ha, self._if("h1"), mn, self._if("m0"))
            self._addr(ha, self._if("h1"), f"{HA6}/64", f"{HA4}/24")
            self._addr(mn, self._if("m0"), f"{MN6}/64", f"{MN4}/24")

    def _nft(self, rules: str) -> None:
        if shutil.which("nft") is None:
            raise LabError("nft: nftables is not installed (apt-get install nftables)")
        path = self.dir / f"nat-{self.tag}.nft"
        path.write_text(rules)
        self.exec("nat", "nft", "-f", str(path))

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        for ns in reversed(self._created):
            with contextlib.suppress(LabError):
                _run(["ip", "netns", "del", ns], timeout=10)
        self._created.clear()

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        # Both ends are made inside their namespaces: nothing ever sits in ours.
        veth = ("type", "veth", "peer", "name", if_b, "netns", ns_b)
        _run(["ip", "link", "add", if_a, "netns", ns_a, *veth])
        for ns, name in ((ns_a, if_a), (ns_b, if_b)):
            self._in(ns, "ip", "link", "set", name, "up")

    def _addr(self, ns: str, dev: str, *cidrs: str) -> None:
        for cidr in cidrs:
            extra = ["nodad"] if ":" in cidr else []  # usable at once, no DAD wait
            self._in(ns, "ip", "addr", "add", cidr, "dev", dev, *extra)

    def _sysctl(self, role: str, *settings: str) -> None:
        self.exec(role, "sysctl", "-q", "-w", *settings)

    def _in(self, ns: str, *cmd: str) -> str:
        return _run(["ip", "netns", "exec", ns, *cmd])

    # ------------------------------------------------------------ use

    def exec(self, role: str, *cmd: str, check: bool = True, timeout: float = _CMD_TIMEOUT) -> str:
        """Run ``cmd`` in the role's namespace; its standard output."""
        return _run(["ip", "netns", "exec", self.ns[role], *cmd], check=check, timeout=timeout)

    def run(
        self, role: str, *cmd: str, timeout: float = _CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the role's namespace; the whole result, whatever the exit status."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns[role], *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, role: str, name: str, *cmd: str) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in the role's namespace; output to ``DIR/NAME.log``."""
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[role], *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs[name] = proc
        self._logs[name] = log
        return proc

    def mipsec(
        self, where: str, role: str, config: str, *extra: str, name: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``mipsec --role ROLE --config CONFIG`` in the namespace ``where``;
        ``name`` (default: the role) names its log and ``stop`` takes it."""
        cmd = [sys.executable, "-m", "mipsec.core.cli", "--role", role, "--config", config]
        return self.start(where, name or role, *cmd, *extra)

    def log(self, name: str) -> str:
        path = self._logs.get(name)
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def wait_log(self, name: str, needle: str, timeout: float = 30.0, *, after: int = 0) -> str:
        """Wait until ``name``'s log holds ``needle`` (past offset ``after``); that line."""
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        while True:
            text = self.log(name)
            at = text.find(needle, after)
            if at >= 0:
                end = text.find("\n", at)
                start = text.rfind("\n", 0, at) + 1
                return text[start : end if end >= 0 else None]
            if proc.poll() is not None:
                raise LabError(f"{name} exited ({proc.returncode}): {_tail(text)}")
            if time.monotonic() >= deadline:
                raise LabError(f"{name}: no {needle!r} within {timeout:.0f} s: {_tail(text)}")
            time.sleep(0.05)

    def stop(self, name: str, timeout: float = 10.0) -> str:
        """SIGTERM (then SIGKILL) the process; its log."""
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return self.log(name)

    def move_mn(self) -> str:
        """Move the MN to its other care-of address (the old one goes first:
        deleting a primary IPv4 address also deletes the secondaries of its
        subnet); returns the new IPv4 one.  Called twice, the MN is back."""
        dev = self._if("m0")
        if self.nat:
            old, new = self.mn4, NATTED_MOVED4 if self.mn4 == NATTED4 else NATTED4
            self.exec("mn", "ip", "addr", "del", f"{old}/24", "dev", dev)
            self.exec("mn", "ip", "addr", "add", f"{new}/24", "dev", dev)
            self.exec("mn", "ip", "-4", "route", "replace", "default", "via", NAT_IN)
            self.mn4 = new
            return new
        moved = self.mn4 == MN4
        old6, old4 = (MN6, MN4) if moved else (MOVED6, MOVED4)
        new6, new4 = (MOVED6, MOVED4) if moved else (MN6, MN4)
        self.exec("mn", "ip", "addr", "del", f"{old6}/64", "dev", dev)
        self.exec("mn", "ip", "addr", "del", f"{old4}/24", "dev", dev)
        self.exec("mn", "ip", "addr", "add", f"{new6}/64", "dev", dev, "nodad")
        self.exec("mn", "ip", "addr", "add", f"{new4}/24", "dev", dev)
        self.mn6, self.mn4 = new6, new4
        return new4

    def nat_udp_timeout(self, seconds: int) -> None:
        """How long the NAT keeps an idle UDP mapping (both conntrack timeouts)."""
        self._sysctl(
            "nat",
            f"net.netfilter.nf_conntrack_udp_timeout={seconds}",
            f"net.netfilter.nf_conntrack_udp_timeout_stream={seconds}",
        )

    # ------------------------------------------------------------ checks through the tunnel

    def ping(
        self,
        src: str,
        dst: str,
        *,
        count: int = 3,
        interval: float = 0.2,
        wait: float = 5.0,
        role: str = "mn",
    ) -> tuple[int, str]:
        """(replies received, a summary) for ``count`` ICMP echoes from ``src``
        to ``dst``, each answered in time when its reply arrives within
        ``wait`` seconds of the last echo (``core/echo.py`` says why not
        ping(8))."""
        out = self.run(
            role,
            sys.executable,
            "-m",
            "mipsec.core.echo",
            "--bind",
            src,
            "--to",
            dst,
            "--count",
            str(count),
            "--interval",
            f"{interval:g}",
            "--wait",
            f"{wait:g}",
            timeout=10 + interval * count + wait,
        )
        try:
            report = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):  # never sent: say why (bind, route, namespace)
            return 0, f"echo exited {out.returncode}: {_tail(out.stderr + out.stdout)}"
        summary = f"{report['transmitted']} echoes, {report['received']} answered"
        if report["rtt_ms"]:
            rtt = report["rtt_ms"]
            summary += f"; rtt min/max {rtt[0]:g}/{rtt[-1]:g} ms"
        return int(report["received"]), summary

    def tcp_transfer(
        self,
        src: str,
        dst: str,
        size: int = 1 << 20,
        port: int = 5001,
        *,
        sender: str = "mn",
        sink: str = "cn",
    ) -> dict[str, Any]:
        """Send ``size`` octets from ``src`` (in ``sender``'s namespace) to ``dst`` (in
        ``sink``'s) over TCP; the sink answers with the SHA-256 of what it
        received.  Returns tcp-send's report (``ok``, ``seconds``)."""
        name = f"sink-{port}-{secrets.token_hex(2)}"
        me = [sys.executable, "-m", "mipsec.core.netlab"]
        self.start(sink, name, *me, "tcp-sink", "--listen", dst, "--port", str(port))
        try:
            self.wait_log(name, "listening", 20)
            out = self.run(
                sender,
                *me,
                "tcp-send",
                "--bind",
                src,
                "--to",
                dst,
                "--port",
                str(port),
                "--bytes",
                str(size),
                timeout=60,
            )
            try:
                report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                report = {"ok": False, "error": _tail(out.stdout + out.stderr)}
            return report
        finally:
            self.stop(name)


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------- tcp-sink / tcp-send


def _tcp_sink(listen: str, port: int, timeout: float) -> int:
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((listen, port))
        srv.listen(4)
        srv.settimeout(timeout)
        print("listening", flush=True)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout)
            digest = hashlib.sha256()
            n = 0
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
                n += len(chunk)
            conn.sendall(json.dumps({"bytes": n, "sha256": digest.hexdigest()}).encode())
    return 0


def _tcp_send(bind: str, to: str, port: int, size: int, timeout: float) -> int:
    family = socket.AF_INET6 if ":" in to else socket.AF_INET
    data = os.urandom(size)
    started = time.monotonic()
    report: dict[str, Any] = {"bytes": size}
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.bind((bind, 0))
            s.connect((to, port))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        got = json.loads(answer)
        report["seconds"] = round(time.monotonic() - started, 3)
        report["ok"] = got == {"bytes": size, "sha256": hashlib.sha256(data).hexdigest()}
    except (OSError, ValueError) as exc:
        report.update(ok=False, error=str(exc))
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipsec.core.netlab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tcp-sink", help="accept one connection, answer the SHA-256 of its octets")
    p.add_argument("--listen", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("tcp-send", help="send random octets, check the sink's SHA-256")
    p.add_argument("--bind", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.cmd == "tcp-sink":
        return _tcp_sink(args.listen, args.port, args.timeout)
    return _tcp_send(args.bind, args.to, args.port, args.bytes, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
