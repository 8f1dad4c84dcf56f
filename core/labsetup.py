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
cert = "{os.path.relpath(pki.hac_cert, directory)}"
key = "{os.path.relpath(pki.hac_key, directory)}"
strict_rfc6618 = false      # true pins TLS 1.2 (RFC 6618 as written)
handshake_timeout = 10
request_timeout = 10
max_sessions = 256

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

[[ha]]
id = "ha1"
address6 = "::1"
address4 = "127.0.0.1"
port = {ha_port}
transport = "local"

[bootstrap]
dns_ip6 = "2001:db8:1::53"
dns_ip4 = "192.0.2.53"
"""
    _write(directory / "hac.toml", hac_toml)
    ha_toml = f"""# HA of the mipsec lab (mipsec init).
log_level = "info"

[ha]
listen = ["127.0.0.1", "::1"]
port = {ha_port}
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
ca = "{os.path.relpath(pki.ca_cert, directory)}"
timeout = 10

[sa]
scope = 1
suites = ["AES_128_CBC_SHA256", "AES_128_CBC_SHA"]
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
