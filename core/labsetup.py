"""``mipsec init``: a working lab on loopback.

Writes a test PKI, a credentials file with one demo MN and random PSK, and
``hac.toml``, ``ha.toml``, ``mn.toml``.  The lab HAC policy enables all five
ciphersuites so each can be exercised -- unlike the built-in default of
PROFILE §5, which offers only the encrypting ones.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from mipsec.core.pki import init_pki

DEMO_MN_ID = "demo@mipsec.test"
HAC_NAME = "hac.mipsec.test"
LAB_SUITES = [
    "AES_128_CBC_SHA256",
    "AES_128_CBC_SHA",
    "DES3_EDE_CBC_SHA",
    "NULL_SHA256",
    "NULL_SHA",
]


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def init_lab(directory: Path, *, hac_port: int = 7872, ha_port: int = 7873) -> dict[str, Any]:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    pki = init_pki(directory / "pki")
    psk = secrets.token_bytes(32)

    def rel(p: Path) -> str:
        return os.path.relpath(p, directory)

    _write(
        directory / "credentials.toml",
        "# MN credentials for the HAC (credential backend 'toml').\n"
        f'[[mn]]\nmn_id = "{DEMO_MN_ID}"\npsk_hex = "{psk.hex()}"\n',
        0o600,
    )
    hac_toml = f"""# HAC of the mipsec lab (mipsec init).
log_level = "info"

[hac]
listen = ["127.0.0.1", "::1"]
port = {hac_port}
cert = "{rel(pki.hac_cert)}"
key = "{rel(pki.hac_key)}"
strict_rfc6618 = false      # true pins TLS 1.2 (RFC 6618 as written)
handshake_timeout = 10     # from the TCP accept
request_timeout = 10       # each request, from its first octet to its last
max_connections = 1024     # all held, handshakes included; the longest waiting is evicted
max_in_progress = 128      # SA issues at once; beyond, 503 with retry-after

[policy]
methods = ["psk", "eap"]
# Lab policy: all five suites, so each can be exercised. The built-in default
# offers only the encrypting suites (PROFILE §5).
suites = {_toml_list(LAB_SUITES)}
max_scope = 1
sa_lifetime = 3600

[credentials]
backend = "toml"
path = "credentials.toml"

[sa_store]
backend = "sqlite"
path = "hac-sa.sqlite"

[home_addresses]
allocator = "pool"
ip6_prefix = "2001:db8:1::/64"
ip4_pool = "192.0.2.0/24"

[ha_selection]
selector = "fewest-sas"

# The HA is a separate process; SAs reach it over mutually authenticated
# TLS (PROFILE §9) before the MN gets its 200.
[[ha]]
id = "ha1"
address6 = "::1"          # mip6-haa-ip6
address4 = "127.0.0.1"    # mip6-haa-ip4
port = {ha_port}              # MN-HA UDP port (mip6-port)
transport = "tls"

[ha.options]              # the HA's provisioning listener (TCP, same number)
host = "127.0.0.1"
port = {ha_port}
server_name = "ha.mipsec.test"
ca = "{rel(pki.ca_cert)}"
cert = "{rel(pki.hac_client_cert)}"
key = "{rel(pki.hac_client_key)}"

[bootstrap]
dns_ip6 = "2001:db8:1::53"
dns_ip4 = "192.0.2.53"
"""
    _write(directory / "hac.toml", hac_toml)
    ha_toml = f"""# HA of the mipsec lab (mipsec init).
log_level = "info"

[ha]
id = "ha1"
listen = ["127.0.0.1", "::1"]
port = {ha_port}              # MN-HA UDP (PROFILE §7)
address6 = "::1"          # as provisioned to MNs: the MH checksum uses it (PROFILE §8)
address4 = "127.0.0.1"
replay_window = 64
max_binding_lifetime = 3600

[sa_store]                # SAs survive an HA restart
backend = "sqlite"
path = "ha-sa.sqlite"

[bindings]                # so does the binding cache
path = "ha-bindings.sqlite"

[provisioning]            # the HAC hands SAs over mutually authenticated TLS
listen = ["127.0.0.1"]
port = {ha_port}
cert = "{rel(pki.ha_cert)}"
key = "{rel(pki.ha_key)}"
client_ca = "{rel(pki.ca_cert)}"
client_names = ["hac.mipsec.test"]
timeout = 10
max_connections = 64      # all held, handshakes included; the longest waiting is evicted
"""
    _write(directory / "ha.toml", ha_toml)
    mn_toml = f"""# Mobile node of the mipsec lab (mipsec init).
log_level = "info"

[mn]
mn_id = "{DEMO_MN_ID}"
method = "psk"
psk_file = "mn.psk"

[hac]
host = "127.0.0.1"
port = {hac_port}
server_name = "{HAC_NAME}"
ca = "{rel(pki.ca_cert)}"
timeout = 10

[sa]
scope = 1
suites = ["AES_128_CBC_SHA256", "AES_128_CBC_SHA"]

[registration]            # Binding Update to the HA after bootstrap
enabled = true
lifetime = 600
transport = "auto"        # IPv6 to mip6-haa-ip6 when provisioned, else IPv4
"""
    _write(directory / "mn.psk", psk.hex() + "\n", 0o600)
    _write(directory / "mn.toml", mn_toml)
    return {
        "ca": str(pki.ca_cert),
        "hac": {
            "host": "127.0.0.1",
            "port": hac_port,
            "server_name": HAC_NAME,
            "config": str(directory / "hac.toml"),
        },
        "ha": {"host": "127.0.0.1", "port": ha_port, "config": str(directory / "ha.toml")},
        "mn": {"mn_id": DEMO_MN_ID, "psk_hex": psk.hex(), "config": str(directory / "mn.toml")},
    }
