"""The launcher as a user runs it: init, check-config, plugins, mn --once."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LAUNCHER, Lab, edit_toml, make_lab, mipsec, wait_port
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fsaccess import not_writable_dir

from mipsec.core import pki


def run_mn(lab: Lab, *extra: str) -> tuple[int, dict[str, Any]]:
    out = mipsec("--role", "mn", "--config", lab.info["mn"]["config"], "--once", "--json", *extra)
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr
    return out.returncode, json.loads(lines[-1])


def test_help() -> None:
    out = mipsec("--help")
    assert out.returncode == 0 and "--role" in out.stdout and "check-config" in out.stdout


def test_init_json_and_files(lab: Lab) -> None:
    info = lab.info
    assert set(info) == {"ca", "hac", "ha", "mn", "eap"}
    assert set(info["hac"]) == {"host", "port", "server_name", "config", "metrics", "control"}
    assert set(info["ha"]) == {"host", "port", "config", "metrics", "control"}
    for role in ("hac", "ha"):  # what the roles will use: the control socket next to the store
        assert info[role]["control"] == str(lab.dir / f"{role}.ctl")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", info[role]["metrics"])
    assert set(info["mn"]) == {"mn_id", "psk_hex", "config", "cert", "key"}
    assert info["eap"] == {"ca": info["ca"], "server_name": "eap.mipsec.test"}
    # EAP-TLS: the MN's client certificate names its mn_id as an rfc822Name
    # SAN; the EAP server certificate carries the advertised dNSName.
    mn_cert = x509.load_pem_x509_certificate(Path(info["mn"]["cert"]).read_bytes())
    mn_san = mn_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert mn_san.get_values_for_type(x509.RFC822Name) == ["demo@mipsec.test"]
    eap_cert = x509.load_pem_x509_certificate((lab.dir / "pki" / "eap.pem").read_bytes())
    eap_san = eap_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert eap_san.get_values_for_type(x509.DNSName) == ["eap.mipsec.test"]
    assert stat.S_IMODE(Path(info["mn"]["key"]).stat().st_mode) == 0o600
    assert mipsec("check-config", str(lab.dir / "mn-eap-tls.toml")).returncode == 0
    assert info["hac"]["server_name"] == "hac.mipsec.test"
    assert len(bytes.fromhex(info["mn"]["psk_hex"])) == 32
    for key in ("hac", "ha", "mn"):
        assert Path(info[key]["config"]).is_file()
    cert = x509.load_pem_x509_certificate((lab.dir / "pki" / "hac.pem").read_bytes())
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hac.mipsec.test"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for secret in (lab.dir / "pki" / "hac.key", lab.dir / "credentials.toml", lab.dir / "mn.psk"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    # The lab HAC policy enables all five suites (unlike the built-in default).
    out = mipsec("check-config", info["hac"]["config"])
    assert out.returncode == 0
    assert len(json.loads(out.stdout)["config"]["policy"]["suites"]) == 5
    # A valid configuration is checked in silence: the check's HAC, never
    # started, does not try to mark itself stopped in a store it never made.
    assert out.stderr == "", out.stderr
    for role in ("ha", "mn"):
        out = mipsec("check-config", info[role]["config"])
        assert out.returncode == 0 and out.stderr == "", (role, out.stderr)


def test_check_config_warns_of_a_certificate_due_soon(lab: Lab) -> None:
    """What a start would warn about, check-config says too: the HA's
    provisioning certificate due in 5 days, one line naming the setting."""
    from cryptography.hazmat.primitives import serialization

    d = lab.dir / "pki"
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key, cert = pki.make_leaf(
        ca_key, ca, common_name="ha.mipsec.test", dns_names=["ha.mipsec.test"],
        ip_addresses=["127.0.0.1"], client=True, days=5,
    )  # fmt: skip
    pki.write_cert(d / "ha.pem", cert)
    pki.write_key(d / "ha.key", key)
    out = mipsec("check-config", lab.info["ha"]["config"])
    assert out.returncode == 0
    assert out.stderr.count("\n") == 1, out.stderr
    assert "ha certificate provisioning.cert expires at" in out.stderr
    assert "(in 4 days)" in out.stderr


def _check_piped(text: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCHER, "check-config", "-", *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_check_config_reads_a_configuration_piped_in(lab: Lab) -> None:
    """``mipsec check-config -``: a configuration from a template renderer,
    checked before it is written anywhere.  Its relative paths are taken
    from the working directory; errors name ``<stdin>``, the key and why;
    a pipe of absurd size is refused, not read to the end.  Before, the
    file argument had to be a regular file (a pipe as /dev/stdin was
    refused) and nothing said how relative paths were meant."""
    for role in ("hac", "ha", "mn"):
        text = Path(lab.info[role]["config"]).read_text()
        out = _check_piped(text, lab.dir)
        assert out.returncode == 0 and out.stderr == "", (role, out.stderr)
        assert json.loads(out.stdout)["role"] == role
    hac = Path(lab.info["hac"]["config"]).read_text()
    elsewhere = _check_piped(hac, lab.dir / "pki")  # pki/pki/hac.pem: not there
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.startswith("mipsec: configuration error: <stdin>: hac.cert: "), (
        elsewhere.stderr
    )
    assert str(lab.dir / "pki" / "pki" / "hac.pem") in elsewhere.stderr
    bad = _check_piped(hac.replace("max_connections = 1024", "max_connections = 0"), lab.dir)
    assert bad.returncode == 2 and "<stdin>: hac.max_connections: " in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    huge = _check_piped("# " + "x" * (16 << 20) + "\n", lab.dir)
    assert huge.returncode == 2 and "<stdin>: (file): larger than" in huge.stderr, huge.stderr
    wrong = _check_piped(hac, lab.dir, "--role", "mn")
    assert wrong.returncode == 2 and "<stdin>: " in wrong.stderr, wrong.stderr


def test_init_refuses_existing_lab(lab: Lab) -> None:
    out = mipsec("init", str(lab.dir))
    assert out.returncode == 2 and "already" in out.stderr and "Traceback" not in out.stderr


def test_check_config_redacts_secrets(lab: Lab) -> None:
    mn_toml = Path(lab.info["mn"]["config"])
    edit_toml(mn_toml, 'psk_file = "mn.psk"', f'psk_hex = "{lab.info["mn"]["psk_hex"]}"')
    out = mipsec("check-config", str(mn_toml))
    assert out.returncode == 0, out.stderr
    assert lab.info["mn"]["psk_hex"] not in out.stdout
    assert json.loads(out.stdout)["config"]["mn"]["psk_hex"] == "<redacted>"


@pytest.mark.parametrize(
    "old, new, key, reason",
    [
        ("port = ", "prot = 1\nport = ", "hac.prot", "Extra inputs"),
        ("max_connections = 1024", "max_connections = 0", "hac.max_connections", "greater than"),
        ("max_connections = 1024", 'max_connections = "many"', "hac.max_connections", "integer"),
        # The old name is still accepted, and errors name it as written ...
        ("max_connections = 1024", "max_sessions = 0", "hac.max_sessions", "greater than"),
        # ... but not together with the new one.
        (
            "max_connections = 1024",
            "max_connections = 1\nmax_sessions = 2",
            "max_sessions",
            "old name",
        ),
        ('"AES_128_CBC_SHA",', '"AES_256_GCM",', "policy.suites", "unknown ciphersuite"),
        ('address6 = "::1"', 'address6 = "::1::"', "ha[0].address6", "IPv6"),
        ('backend = "toml"', 'backend = "ldap"', "credentials.backend", "no plugin provides"),
        ('path = "credentials.toml"', 'path = "nope.toml"', "credentials", "nope.toml"),
        ("[hac]", "[hac\n", "(syntax)", "line"),
        # Options of a method no policy names were never read (review).
        ('methods = ["psk", "eap"]', 'methods = ["psk"]', "methods.eap", "neither"),
        # pydantic read true as 1 (review).
        ("max_connections = 1024", "max_connections = true", "hac.max_connections", "boolean"),
    ],
)
def test_config_errors_name_file_key_reason(
    lab: Lab, old: str, new: str, key: str, reason: str
) -> None:
    hac_toml = Path(lab.info["hac"]["config"])
    edit_toml(hac_toml, old, new)
    out = mipsec("--role", "hac", "--config", str(hac_toml))
    assert out.returncode == 2, out.stderr
    err = out.stderr
    assert str(hac_toml) in err and key in err and reason in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "role, table, key",
    [
        ("hac", '[control]\npath = "/nonexistent/dir/x.ctl"', "control.path"),
        ("hac", '[control]\npath = "hac.toml"', "control.path"),
        ("hac", '[revocations]\npath = "/nonexistent/dir/rev.json"', "revocations.path"),
        ("ha", '[control]\npath = "/nonexistent/dir/x.ctl"', "control.path"),
    ],
)
def test_check_config_refuses_what_the_start_or_a_revoke_would(
    lab: Lab, role: str, table: str, key: str
) -> None:
    """Found in review: these passed check-config (and, for the revocation
    list, the start) and failed the start or the first `mipsec revoke`."""
    path = Path(lab.info[role]["config"])
    path.write_text(path.read_text() + "\n" + table + "\n")
    out = mipsec("check-config", str(path))
    assert out.returncode == 2 and key in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("case", ["too long", "not a socket", "a directory", "not writable"])
def test_check_config_of_an_mn_refuses_its_control_path(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A configured ``[control] path`` the MN daemon's start would refuse
    (exit 2 naming the key) fails check-config too, in one line naming the
    file and ``control.path`` (before, check-config of an MN never looked)."""
    mn_toml = Path(lab.info["mn"]["config"])
    if case == "too long":
        path = lab.dir / ("x" * 100)
    elif case == "not a socket":
        path = mn_toml
    elif case == "a directory":
        path = lab.dir / "mn.ctl"
        path.mkdir()
    else:  # checked in this process: as root only a patched os.access refuses
        path = not_writable_dir(lab.dir / "ro", monkeypatch) / "mn.ctl"
    mn_toml.write_text(mn_toml.read_text() + f'\n[control]\npath = "{path}"\n')
    if case == "not writable":
        code, err = _check_config_here(mn_toml)
    else:
        out = mipsec("check-config", str(mn_toml))
        code, err = out.returncode, out.stderr
    assert code == 2, err
    [line] = err.splitlines()
    assert line.startswith(f"mipsec: configuration error: {mn_toml}: control.path: "), line


def _check_config_here(path: Path) -> tuple[int, str]:
    """``mipsec check-config PATH`` in this process: exit status, stderr."""
    import contextlib
    import io

    from mipsec.core import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["check-config", str(path)])
    return code, err.getvalue()


def test_check_config_of_an_mn_passes_a_usable_control_path(lab: Lab) -> None:
    """A path in a directory it can write, and a missing directory (the
    example unit's RuntimeDirectory, made at start): a WARNING naming the
    key, exit 0."""
    mn_toml = Path(lab.info["mn"]["config"])
    text = mn_toml.read_text()
    mn_toml.write_text(text + f'\n[control]\npath = "{lab.dir / "run-mn.ctl"}"\n')
    out = mipsec("check-config", str(mn_toml))
    assert out.returncode == 0 and "control.path" not in out.stderr, out.stderr
    missing = lab.dir / "run" / "mn.ctl"
    mn_toml.write_text(text + f'\n[control]\npath = "{missing}"\n')
    out = mipsec("check-config", str(mn_toml))
    assert out.returncode == 0, out.stderr
    [line] = [ln for ln in out.stderr.splitlines() if "control.path" in ln]
    assert f"{mn_toml}: control.path: no such directory" in line, line


def test_an_eap_table_of_a_psk_mn_is_refused(lab: Lab) -> None:
    mn_toml = Path(lab.info["mn"]["config"])
    mn_toml.write_text(mn_toml.read_text() + '\n[eap]\nmethods = ["tls"]\n')
    out = mipsec("check-config", str(mn_toml))
    assert out.returncode == 2 and "eap: read only with" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    out = mipsec("--role", "mn", "--config", str(tmp_path / "none.toml"))
    assert out.returncode == 2 and "none.toml" in out.stderr and "no such file" in out.stderr


def test_plugins_lists_builtins() -> None:
    out = mipsec("plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["psk"]["distribution"] == "mipsec"
    assert rows["psk"]["provides"]["mipsec_auth_methods"] == ["psk"]
    assert "toml" in rows["credentials_toml"]["provides"]["mipsec_credential_backends"]
    assert "sqlite" in rows["sa_store_sqlite"]["provides"]["mipsec_sa_stores"]
    assert "mipsec_sa_issued" in rows["event_log"]["hooks"]
    text = mipsec("plugins").stdout
    assert "psk" in text and "mipsec_auth_methods" in text


def test_mn_once_json_exit_codes(lab: Lab, start_hac: Any) -> None:
    start_hac(lab)
    rc, res = run_mn(lab)
    assert rc == 0 and res["status"] == 200 and res["ok"]
    assert "keys" not in res["sa"]
    assert res["sa"]["suite"] == "AES_128_CBC_SHA256" and res["sa"]["suite_id"] == "{00,3C}"
    assert res["bootstrap"]["ip6_hoa"].startswith("2001:db8:1::")
    rc, res = run_mn(lab, "--show-keys")
    assert rc == 0 and len(bytes.fromhex(res["sa"]["keys"]["mn_to_ha_ikey"])) == 16
    (lab.dir / "mn.psk").write_text(os.urandom(32).hex())
    rc, res = run_mn(lab)
    assert rc != 0 and not res["ok"] and res["status"] in (None, 401)


def test_mn_without_hac_fails_cleanly(lab: Lab) -> None:
    rc, res = run_mn(lab)
    assert rc != 0 and res["status"] is None and "connect" in res["reason"]


def _replace_hac_cert(lab: Lab, ca: str = "lab", **leaf: Any) -> None:
    d = lab.dir / "pki"
    if ca == "lab":
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        ca_key = load_pem_private_key((d / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    else:
        ca_key, ca_cert = pki.make_ca("rogue CA")
    key, cert = pki.make_leaf(
        ca_key, ca_cert, common_name=leaf.pop("common_name", "hac.mipsec.test"), **leaf
    )
    pki.write_cert(d / "hac.pem", cert)
    pki.write_key(d / "hac.key", key)


@pytest.mark.parametrize(
    "variant",
    ["wildcard", "cn_only", "unknown_ca", "other_name"],
)
def test_mn_refuses_bad_hac_certificates(lab: Lab, start_hac: Any, variant: str) -> None:
    if variant == "wildcard":
        _replace_hac_cert(
            lab, dns_names=["*.mipsec.test", "hac.mipsec.test"], ip_addresses=["127.0.0.1"]
        )
    elif variant == "cn_only":
        _replace_hac_cert(lab, include_san=False)
    elif variant == "unknown_ca":
        _replace_hac_cert(lab, ca="rogue", dns_names=["hac.mipsec.test"])
    else:
        _replace_hac_cert(lab, dns_names=["evil.mipsec.test"], ip_addresses=["127.0.0.1"])
    start_hac(lab)
    rc, res = run_mn(lab)
    assert rc != 0 and res["status"] is None and not res["ok"]
    assert "certificate" in res["reason"].lower() or "CERTIFICATE" in res["reason"], res


def test_hac_refuses_ed25519_certificate(lab: Lab) -> None:
    _replace_hac_cert(lab, dns_names=["hac.mipsec.test"], key_type="ed25519")
    out = mipsec("--role", "hac", "--config", lab.info["hac"]["config"])
    assert out.returncode == 2 and "hac.pem" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_third_party_plugin_discovered_listed_used(
    lab: Lab, start_hac: Any, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    src = Path(__file__).parent.parent / "fixtures" / "mipsec-plugin-example"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    env = dict(os.environ, PYTHONPATH=str(target))
    out = mipsec("plugins", "--json", env=env)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["example_static"]["distribution"] == "mipsec-plugin-example"
    assert rows["example_static"]["version"] == "1.2.3"
    assert rows["example_static"]["provides"]["mipsec_credential_backends"] == ["static"]
    other = os.urandom(32)
    edit_toml(
        Path(lab.info["hac"]["config"]),
        'backend = "toml"\npath = "credentials.toml"',
        f'backend = "static"\nmn_id = "demo@mipsec.test"\npsk_hex = "{other.hex()}"',
    )
    start_hac(lab, env=env)
    (lab.dir / "mn.psk").write_text(other.hex())
    rc, res = run_mn(lab)
    assert rc == 0 and res["status"] == 200


def test_hoa_persists_across_restart_and_returns_to_pool(tmp_path: Path, start_hac: Any) -> None:
    lab = make_lab(tmp_path / "lab")
    hac_toml = Path(lab.info["hac"]["config"])
    bob_psk = os.urandom(32)
    with (lab.dir / "credentials.toml").open("a") as f:
        f.write(f'\n[[mn]]\nmn_id = "bob@mipsec.test"\npsk_hex = "{bob_psk.hex()}"\n')
    p = start_hac(lab)
    rc, alice = run_mn(lab)
    assert rc == 0
    p.terminate()
    p.communicate(timeout=10)
    start_hac(lab)  # restart: the SA store survives, so the HoA stays Alice's
    rc, again = run_mn(lab)
    assert again["bootstrap"]["ip6_hoa"] == alice["bootstrap"]["ip6_hoa"]
    assert again["sa"]["spi"] != alice["sa"]["spi"]
    # Bob gets another address while Alice's SA is live.
    edit_toml(
        Path(lab.info["mn"]["config"]), 'mn_id = "demo@mipsec.test"', 'mn_id = "bob@mipsec.test"'
    )
    (lab.dir / "mn.psk").write_text(bob_psk.hex())
    rc, bob = run_mn(lab)
    assert rc == 0 and bob["bootstrap"]["ip6_hoa"] != alice["bootstrap"]["ip6_hoa"]
    del hac_toml


def test_expired_sa_releases_home_address(tmp_path: Path, start_hac: Any) -> None:
    lab = make_lab(tmp_path / "lab")
    hac_toml = Path(lab.info["hac"]["config"])
    edit_toml(hac_toml, "sa_lifetime = 3600", "sa_lifetime = 2")
    edit_toml(hac_toml, "max_connections = 1024", "max_connections = 1024\nexpiry_interval = 0.5")
    bob_psk = os.urandom(32)
    with (lab.dir / "credentials.toml").open("a") as f:
        f.write(f'\n[[mn]]\nmn_id = "bob@mipsec.test"\npsk_hex = "{bob_psk.hex()}"\n')
    p = start_hac(lab)
    # A 2-s SA: the bootstrap is what counts here.  The HA grants no binding
    # with under 4 s of the SA left (a BA of lifetime 0), which the MN takes
    # as not registered since the twenty-eighth session: exit 1 with --once.
    rc, alice = run_mn(lab)
    assert alice["status"] == 200, alice
    time.sleep(3.5)
    edit_toml(
        Path(lab.info["mn"]["config"]), 'mn_id = "demo@mipsec.test"', 'mn_id = "bob@mipsec.test"'
    )
    (lab.dir / "mn.psk").write_text(bob_psk.hex())
    rc, bob = run_mn(lab)
    assert bob["status"] == 200, bob
    # Alice's SA expired, so her address went back to the pool and Bob gets it.
    assert bob["bootstrap"]["ip6_hoa"] == alice["bootstrap"]["ip6_hoa"]
    p.terminate()
    log = p.communicate(timeout=10)[0]
    assert "sa_expired" in log and str(alice["sa"]["spi"]) in log


def test_a_store_error_out_of_a_role_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store or binding cache that cannot be written when a role starts or
    stops (full disk) ends the launcher with one line and status 1, never a
    traceback."""
    import sqlite3

    from mipsec.core import cli

    def full(args: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(cli, "cmd_role", full)
    assert cli.main(["--role", "ha", "--config", "ha.toml"]) == 1
    err = capsys.readouterr().err
    assert err == "mipsec: OperationalError: database or disk is full\n"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_demo_ended_by_a_signal_leaves_no_role_running(sig: str) -> None:
    """``timeout 60 mipsec demo``, a closed terminal: the demo's HA and HAC
    stop with it and its lab directory goes.  Before, the signal's default
    action ended the demo alone and both daemons ran on, on their ports."""
    demo = subprocess.Popen(
        [*LAUNCHER, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    lab_dir = ""
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if m := re.search(r"lab created in (\S+):", line):
                lab_dir = m.group(1)
            if m := re.search(r"(HA|HAC) starting \(pid (\d+)\)", line):
                pids.append(int(m.group(2)))
            if line.startswith("[") and "HAC starting" in line:
                break
        assert len(pids) == 2 and lab_dir, pids
        demo.send_signal(getattr(signal, sig))
        code = demo.wait(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.05)
        for p in alive:  # left by the demo: the test fails, after cleaning up
            os.kill(p, signal.SIGKILL)
    assert alive == [], f"still running after the demo ended: {alive}"
    assert code == 128 + getattr(signal, sig)
    assert not Path(lab_dir).exists()


def test_power_loss_safe_stores_serve_a_bootstrap(lab: Lab, start_hac: Any) -> None:
    """``[sa_store] synchronous = "full"`` on the HAC and the HA (whose
    binding cache shares its store's file, ``in_sa_store``): check-config
    takes it, both roles start on it and an MN bootstraps and registers
    (the PRAGMA itself: tests/unit/test_sa_store.py); a wrong value is a
    configuration error naming the key."""
    for role in ("hac", "ha"):
        edit_toml(
            Path(lab.info[role]["config"]),
            f'path = "{role}-sa.sqlite"',
            f'path = "{role}-sa.sqlite"\nsynchronous = "full"',
        )
        checked = mipsec("check-config", lab.info[role]["config"])
        assert checked.returncode == 0, checked.stderr
        assert '"synchronous": "full"' in checked.stdout
    start_hac(lab)
    rc, res = run_mn(lab)
    assert rc == 0 and res["status"] == 200 and res["ba"]["status"] == 0, res
    edit_toml(Path(lab.info["hac"]["config"]), 'synchronous = "full"', 'synchronous = "off"')
    wrong = mipsec("check-config", lab.info["hac"]["config"])
    assert wrong.returncode == 2
    assert "sa_store.backend: synchronous: input should be 'normal' or 'full'" in wrong.stderr


def test_sigusr1_meant_for_the_mns_neither_ends_the_hac_nor_the_ha(lab: Lab) -> None:
    """SIGUSR1 is the MN's "bootstrap now".  A ``pkill -USR1 -f mipsec``
    reaches the HAC and the HA too, whose default action was to end: now
    each logs one line, ignores it, and serves on."""
    roles: dict[str, subprocess.Popen[str]] = {}
    try:
        for role, port in (("ha", int(lab.info["ha"]["port"])), ("hac", lab.hac_port)):
            roles[role] = subprocess.Popen(
                [*LAUNCHER, "--role", role, "--config", lab.info[role]["config"]],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            wait_port(port, roles[role])
        for proc in roles.values():
            proc.send_signal(signal.SIGUSR1)
        rc, res = run_mn(lab)
        assert rc == 0 and res["status"] == 200 and res["ba"]["status"] == 0, res
        assert all(proc.poll() is None for proc in roles.values())
    finally:
        logs = {}
        for role, proc in roles.items():
            proc.send_signal(signal.SIGTERM)
            logs[role] = proc.communicate(timeout=20)[0]
    for role, proc in roles.items():
        assert proc.returncode == 0, logs[role]
        assert f"{role}: SIGUSR1 ignored (it tells an MN to bootstrap now)" in logs[role]
