"""Secrets at rest and start-time errors, through the real launcher (issue 6, items 6 and 8).

Each refusal is checked twice where it applies: a start (``--role ...``) and
``check-config`` exit 2 with the same one line naming the file, the key and the
reason -- check-config validates exactly what a start does, short of sockets.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import LAUNCHER, Lab, edit_toml, make_lab, mipsec

from mipsec.core.keywrap import KEY_FILE_LEN
from mipsec.plugins.sa_store_sqlite import SQLiteSAStore


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def refused_alike(lab_config: str, role: str) -> str:
    """Start and check-config both exit 2 with the same error line; that line."""
    start = mipsec("--role", role, "--config", lab_config, timeout=60)
    check = mipsec("check-config", lab_config, timeout=60)
    assert start.returncode == 2, start.stderr
    assert check.returncode == 2, check.stderr
    for out in (start, check):
        assert "Traceback" not in out.stderr, out.stderr
    line = [ln for ln in start.stderr.splitlines() if ln.startswith("mipsec:")]
    assert len(line) == 1, start.stderr
    assert line[0] in check.stderr, (start.stderr, check.stderr)
    assert check.stdout == ""  # nothing printed as if it were valid
    return line[0]


# ---------------------------------------------------------------- file modes


@pytest.mark.parametrize(
    ("role", "rel", "key", "mode"),
    [
        ("hac", "pki/hac.key", "hac.key", 0o644),
        ("hac", "credentials.toml", "credentials.backend: path", 0o640),
        ("hac", "hac-sa.key", "sa_store.backend: key_file", 0o604),
        ("hac", "pki/hac-client.key", "ha[0]: key", 0o660),
        ("ha", "pki/ha.key", "provisioning.key", 0o644),
        ("ha", "ha-sa.key", "sa_store.backend: key_file", 0o644),
        ("mn", "mn.psk", "mn.psk_file", 0o644),
    ],
)
def test_secret_file_open_to_others_refused_with_chmod_hint(
    lab: Lab, role: str, rel: str, key: str, mode: int
) -> None:
    secret = lab.dir / rel
    secret.chmod(mode)
    config = lab.info[role]["config"]
    line = refused_alike(config, role)
    assert line.startswith(f"mipsec: configuration error: {config}: {key}: ")
    assert f"{secret}: secret file open to" in line and f"(mode {mode:04o})" in line
    assert line.endswith(f"fix: chmod 600 {secret}")
    secret.chmod(0o600)  # the hint fixes it
    assert mipsec("check-config", config).returncode == 0


def test_world_readable_stores_and_binding_cache_refused(lab: Lab) -> None:
    ha_toml = lab.info["ha"]["config"]
    # A binding cache in a file of its own (mipsec init keeps it in the store's).
    edit_toml(Path(ha_toml), "in_sa_store = true", 'path = "ha-bindings.sqlite"')
    for name in ("ha-sa.sqlite", "ha-bindings.sqlite"):
        (lab.dir / name).write_bytes(b"")
        (lab.dir / name).chmod(0o644)
    line = refused_alike(ha_toml, "ha")
    assert f"{ha_toml}: bindings.path: {lab.dir / 'ha-bindings.sqlite'}: secret file" in line
    (lab.dir / "ha-bindings.sqlite").chmod(0o600)
    line = refused_alike(ha_toml, "ha")
    assert f"{ha_toml}: sa_store.backend: path: {lab.dir / 'ha-sa.sqlite'}: secret file" in line


def test_init_under_umask_000_sets_every_mode(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    out = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$@"', "sh", *LAUNCHER, "init", str(lab), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    found = {str(p.relative_to(lab)) for p in lab.rglob("*") if p.is_file()}
    # Secrets: private keys, key-wrapping keys, the credentials and the MN's PSK.
    secrets = {f for f in found if f.endswith(".key") or f in ("credentials.toml", "mn.psk")}
    public = found - secrets
    assert {"credentials.toml", "mn.psk", "hac-sa.key", "ha-sa.key", "pki/hac.key"} <= secrets
    assert {"hac.toml", "ha.toml", "mn.toml", "pki/ca.pem", "pki/hac.pem"} <= public
    # Nothing else (no temporary file left behind): certificates and configs only.
    assert all(f.endswith((".pem", ".toml")) for f in public), public
    for rel in secrets:
        assert _mode(lab / rel) == 0o600, rel
    for rel in public:
        assert _mode(lab / rel) == 0o644, rel
    assert _mode(lab) == 0o700 and _mode(lab / "pki") == 0o700
    for name in ("hac-sa.key", "ha-sa.key"):
        assert len((lab / name).read_bytes()) == KEY_FILE_LEN
    assert (lab / "hac-sa.key").read_bytes() != (lab / "ha-sa.key").read_bytes()
    info = json.loads(out.stdout)
    for role in ("hac", "ha", "mn"):
        assert mipsec("check-config", info[role]["config"]).returncode == 0


# ---------------------------------------------------------------- key wrapping


def test_wrong_key_wrapping_key_refused_naming_the_file(lab: Lab) -> None:
    hac_toml = lab.info["hac"]["config"]
    key_file = lab.dir / "hac-sa.key"
    SQLiteSAStore(lab.dir / "hac-sa.sqlite", key_file=key_file).close()  # a store exists
    key_file.unlink()
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(KEY_FILE_LEN))
    os.close(fd)
    line = refused_alike(hac_toml, "hac")
    assert f"{hac_toml}: sa_store.backend: key_file: {key_file} is not the key" in line
    key_file.unlink()
    line = refused_alike(hac_toml, "hac")
    assert f"key_file: {key_file}: no such file, and the SA keys in" in line


def test_sa_keys_wrapped_on_disk_after_real_bootstrap(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    out = mipsec("--role", "mn", "--config", lab.info["mn"]["config"], "--once", "--json")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["status"] == 200 and res["ba"]["status"] == 0, res
    out = mipsec(
        "--role", "mn", "--config", lab.info["mn"]["config"], "--once", "--json", "--show-keys"
    )
    keys = json.loads(out.stdout.strip().splitlines()[-1])["sa"]["keys"]
    for store in ("hac-sa.sqlite", "ha-sa.sqlite"):
        data = b"".join(
            p.read_bytes() for p in lab.dir.glob(store + "*") if not p.name.endswith(".key")
        )
        assert data, store
        for k in keys.values():
            assert bytes.fromhex(k) not in data, store
        assert _mode(lab.dir / store) == 0o600


# ---------------------------------------------------------------- passphrases


def _add_passphrase_user(lab: Lab, passphrase: str) -> None:
    with (lab.dir / "credentials.toml").open("a") as f:
        f.write(f'\n[[mn]]\nmn_id = "eve@mipsec.test"\npsk = "{passphrase}"\n')


def test_short_passphrase_refused(lab: Lab) -> None:
    _add_passphrase_user(lab, "hunter2")
    line = refused_alike(lab.info["hac"]["config"], "hac")
    creds = lab.dir / "credentials.toml"
    assert (
        f"credentials.backend: path: {creds}: mn[1].psk: passphrase for 'eve@mipsec.test'" in line
    )
    assert "7 characters, fewer than 20" in line and "allow_short_passphrase" in line
    assert "hunter2" not in line


def test_short_passphrase_accepted_with_opt_in(lab: Lab, start_hac: Any) -> None:
    _add_passphrase_user(lab, "hunter2")
    hac_toml = Path(lab.info["hac"]["config"])
    edit_toml(
        hac_toml,
        'path = "credentials.toml"',
        'path = "credentials.toml"\nallow_short_passphrase = true',
    )
    assert mipsec("check-config", str(hac_toml)).returncode == 0
    start_hac(lab)
    # The MN holds the passphrase's UTF-8 octets as its key.
    mn_toml = Path(lab.info["mn"]["config"])
    edit_toml(mn_toml, 'mn_id = "demo@mipsec.test"', 'mn_id = "eve@mipsec.test"')
    edit_toml(mn_toml, 'psk_file = "mn.psk"', f'psk_hex = "{b"hunter2".hex()}"')
    out = mipsec("--role", "mn", "--config", str(mn_toml), "--once", "--json")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and res["status"] == 200, (res, out.stderr)


# ---------------------------------------------------------------- errors name file and key


@pytest.mark.parametrize(
    ("role", "old", "new", "expect"),
    [
        (
            "hac",
            'cert = "pki/hac.pem"',
            'cert = "pki/nope.pem"',
            "hac.cert: cannot read {d}/pki/nope.pem",
        ),
        (
            "hac",
            'key = "pki/hac.key"',
            'key = "pki/missing.key"',
            "hac.key: cannot read {d}/pki/missing.key",
        ),
        (
            "hac",
            'key = "pki/hac.key"',
            'key = "pki/ha.key"',
            "hac.cert: {d}/pki/hac.pem: leaf certificate does not match",
        ),
        (
            "hac",
            'backend = "toml"',
            'backend = "ldap"',
            "credentials.backend: no plugin provides 'ldap'",
        ),
        (
            "hac",
            'allocator = "pool"',
            'allocator = "pool"\nbogus = 1',
            "home_addresses.allocator: bogus: extra inputs",
        ),
        (
            "hac",
            'backend = "sqlite"',
            'backend = "sqlite"\nclear_keys = "yes"',
            "sa_store.backend: clear_keys: input should be a valid boolean",
        ),
        ("hac", 'ca = "pki/ca.pem"', 'ca = "pki/none.pem"', "ha[0]: ca: "),
        (
            "ha",
            'client_ca = "pki/ca.pem"',
            'client_ca = "pki/hac.key"',
            "provisioning.client_ca: {d}/pki/hac.key: cannot load CA",
        ),
        (
            "ha",
            'cert = "pki/ha.pem"',
            'cert = "pki/gone.pem"',
            "provisioning.cert: cannot read {d}/pki/gone.pem",
        ),
        ("mn", 'ca = "pki/ca.pem"', 'ca = "pki/nope.pem"', "hac.ca: cannot read {d}/pki/nope.pem"),
        ("mn", 'method = "psk"', 'method = "sim"', "mn.method: no plugin provides 'sim'"),
        (
            "mn",
            'psk_file = "mn.psk"',
            'psk_file = "mn.psk"\npsk_hex = "00"',
            "mn: psk_hex and psk_file exclude each other",
        ),
    ],
    ids=[
        "cert-missing",
        "key-missing",
        "key-mismatch",
        "missing-plugin",
        "bad-plugin-option",
        "bad-store-option",
        "transport-ca",
        "client-ca-not-a-ca",
        "provisioning-cert",
        "mn-ca",
        "mn-method",
        "psk-twice",
    ],
)
def test_errors_name_file_and_key(lab: Lab, role: str, old: str, new: str, expect: str) -> None:
    config = Path(lab.info[role]["config"])
    edit_toml(config, old, new)
    line = refused_alike(str(config), role)
    assert line.startswith(f"mipsec: configuration error: {config}: "), line
    assert expect.format(d=lab.dir) in line, line


# ---------------------------------------------------------------- ports in use


def _occupy(kind: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        s.listen()
    return s


@pytest.mark.parametrize(
    ("role", "kind", "key"),
    [
        ("hac", socket.SOCK_STREAM, "hac.port"),
        ("ha", socket.SOCK_DGRAM, "ha.port"),
        ("ha", socket.SOCK_STREAM, "provisioning.port"),
    ],
)
def test_port_in_use_names_address_port_and_key(lab: Lab, role: str, kind: int, key: str) -> None:
    port = int(lab.info[role]["port"])
    config = lab.info[role]["config"]
    with _occupy(kind, port):
        out = mipsec("--role", role, "--config", config, timeout=60)
        # check-config binds nothing: the port in use is no error for it.
        assert mipsec("check-config", config).returncode == 0
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert (
        f"mipsec: configuration error: {config}: {key}: cannot listen on 127.0.0.1 port {port}: "
        "Address already in use"
    ) in out.stderr, out.stderr


def test_port_in_use_by_colocated_ha_names_local_ha_key(tmp_path: Path) -> None:
    lab = make_lab(tmp_path / "lab")
    hac_toml = Path(lab.info["hac"]["config"])
    ha_port = int(lab.info["ha"]["port"])
    text = hac_toml.read_text().replace('transport = "tls"', 'transport = "local"')
    text += f"""
[local_ha.ha]
id = "ha1"
listen = ["127.0.0.1"]
port = {ha_port}
[local_ha.sa_store]
backend = "memory"
"""
    hac_toml.write_text(text)
    with _occupy(socket.SOCK_DGRAM, ha_port):
        out = mipsec("--role", "hac", "--config", str(hac_toml), timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"{hac_toml}: local_ha.ha.port: cannot listen on 127.0.0.1 port {ha_port}" in out.stderr
