"""``mipsec credentials`` (plugins/cred_tool.py): an operator moves a lab's
``credentials.toml`` into the ``sqlite`` backend, then adds and removes MNs
while the HAC runs.  Real ``mipsec`` processes (HAC, HA) and the raw MN.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pluggy
import pytest
from conftest import LAUNCHER, Lab, edit_toml
from rawmn import RawMN, psk_bootstrap, psk_init
from test_crash_points import HacProcess
from test_ha_restart_replay import MN_ID, SUITE, HaProcess

from mipsec.core import cli, pluginmanager
from mipsec.core.errors import PluginError
from mipsec.core.hookspecs import hookimpl


def credentials(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCHER, "credentials", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def status(lab: Lab, mn_id: str, psk: bytes) -> str:
    raw = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
    try:
        _, final = psk_bootstrap(raw, mn_id, psk, suites=SUITE)
    finally:
        raw.close()
    return str(final.headers["status-code"])


def use_sqlite_credentials(lab: Lab) -> Path:
    """The lab's credentials.toml imported into ``creds.sqlite`` and the
    HAC configured to use that database; its path."""
    db = lab.dir / "creds.sqlite"
    out = credentials("import", str(lab.dir / "credentials.toml"), str(db))
    assert out.returncode == 0, out.stderr
    edit_toml(
        Path(lab.info["hac"]["config"]),
        'backend = "toml"\npath = "credentials.toml"',
        'backend = "sqlite"\npath = "creds.sqlite"',
    )
    return db


def test_import_add_remove_against_a_running_hac(lab: Lab) -> None:
    db = lab.dir / "creds.sqlite"
    out = credentials("import", str(lab.dir / "credentials.toml"), str(db))
    assert out.returncode == 0, out.stderr
    assert "1 entries" in out.stdout and "(1 new, 0 replaced); 1 in all" in out.stdout
    assert lab.psk.hex() not in out.stdout + out.stderr
    assert os.stat(db).st_mode & 0o777 == 0o600
    edit_toml(
        Path(lab.info["hac"]["config"]),
        'backend = "toml"\npath = "credentials.toml"',
        'backend = "sqlite"\npath = "creds.sqlite"',
    )
    (lab.dir / "credentials.toml").unlink()  # the HAC uses the database alone now
    ha, hac = HaProcess(lab), HacProcess(lab)
    try:
        ha.start()
        hac.start()
        assert status(lab, MN_ID, lab.psk) == "200"
        # A new MN while the HAC runs: no reload, no restart.
        new = credentials("add", str(db), "new@mipsec.test", "--generate")
        assert new.returncode == 0, new.stderr
        key = bytes.fromhex(new.stdout.strip())
        assert len(key) == 32 and "added" in new.stderr
        assert status(lab, "new@mipsec.test", key) == "200"
        # A key given on standard input replaces it.
        other = bytes(range(32))
        out = credentials("add", str(db), "new@mipsec.test", stdin=other.hex() + "\n")
        assert out.returncode == 0 and "replaced" in out.stderr and out.stdout == ""
        assert status(lab, "new@mipsec.test", key) == "401"
        assert status(lab, "new@mipsec.test", other) == "200"
        # Removed: refused at its next bootstrap, like an unknown identity.
        out = credentials("remove", str(db), "new@mipsec.test")
        assert out.returncode == 0, out.stderr
        assert status(lab, "new@mipsec.test", other) == "401"
        assert credentials("count", str(db)).stdout.strip() == "1"
        # A database rebuilt elsewhere and moved into place (a new inode)
        # without the lab's MN: refused at its next bootstrap, no restart.
        rebuilt = lab.dir / "creds.sqlite.new"
        assert credentials("add", str(rebuilt), "new@mipsec.test", "--generate").returncode == 0
        os.replace(rebuilt, db)
        assert status(lab, MN_ID, lab.psk) == "401"
        assert "creds.sqlite replaced on disk" in hac.log_text()
    finally:
        hac.close()
        ha.close()


def test_a_database_locked_by_another_process_gets_503_and_holds_no_one(lab: Lab) -> None:
    """An operator's SQL client holds the credential database locked
    (``BEGIN EXCLUSIVE``) while the HAC serves.  Six MNs bootstrap at once:
    each gets 503 with ``retry-after`` within the raw MN's 10-s socket
    timeout -- before, each lookup held the HAC's event loop for SQLite's
    5-s busy timeout, so the later MNs' answers came 10-30 s late and their
    sockets timed out.  Once the lock is gone, the MN bootstraps (200)."""
    import sqlite3
    import time
    from concurrent.futures import ThreadPoolExecutor

    db = use_sqlite_credentials(lab)
    ha, hac = HaProcess(lab), HacProcess(lab)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        ha.start()
        hac.start()
        assert status(lab, MN_ID, lab.psk) == "200"
        holder.execute("BEGIN EXCLUSIVE")

        def one(_: int) -> dict[str, str]:
            raw = RawMN("127.0.0.1", lab.hac_port, lab.info["ca"], "hac.mipsec.test")
            try:
                return dict(psk_init(raw, MN_ID)[1].headers)  # the final answer to Init
            finally:
                raw.close()

        with ThreadPoolExecutor(6) as pool:
            finals = list(pool.map(one, range(6)))
        assert [f["status-code"] for f in finals] == ["503"] * 6
        assert all(f["retry-after"].endswith(" GMT") for f in finals)
        holder.execute("ROLLBACK")
        time.sleep(0.6)  # past the half second in which lookups fail at once
        assert status(lab, MN_ID, lab.psk) == "200"
        text = hac.log_text()
        assert "creds.sqlite failed: locked by another process" in text
        assert "creds.sqlite works again" in text
        assert "Traceback" not in text and lab.psk.hex() not in text
    finally:
        holder.close()
        hac.close()
        ha.close()


@pytest.mark.parametrize(
    "args, stdin, says",
    [
        (["add", "{db}", "x@mipsec.test"], "not hex\n", "standard input: not hexadecimal"),
        (["add", "{db}", "x@mipsec.test"], "\n", "standard input: empty key"),
        (["remove", "{db}", "nobody@mipsec.test"], "", "no key for 'nobody@mipsec.test'"),
        (["count", "{dir}/missing.sqlite"], "", "no such file"),
        (["import", "{dir}/bad.toml", "{db}"], "", "bad.toml: mn[1].psk_hex: not valid hex"),
        (["import", "{dir}/short.toml", "{db}"], "", "mn[0].psk: passphrase for 's@x' has 5"),
        (["import", "{dir}/dup.toml", "{db}"], "", "mn[1].mn_id: duplicate of mn[0]"),
        (["add", "{open}", "x@mipsec.test", "--generate"], "", "chmod 600"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    tmp_path: Path, args: list[str], stdin: str, says: str
) -> None:
    key = "ab" * 32
    db = tmp_path / "db.sqlite"
    (tmp_path / "ok.toml").write_text(f'[[mn]]\nmn_id = "a@x"\npsk_hex = "{key}"\n')
    assert credentials("import", str(tmp_path / "ok.toml"), str(db)).returncode == 0
    (tmp_path / "bad.toml").write_text(
        f'[[mn]]\nmn_id = "b@x"\npsk_hex = "{key}"\n[[mn]]\nmn_id = "c@x"\npsk_hex = "zz{key}"\n'
    )
    (tmp_path / "short.toml").write_text('[[mn]]\nmn_id = "s@x"\npsk = "short"\n')
    (tmp_path / "dup.toml").write_text(
        f'[[mn]]\nmn_id = "d@X"\npsk_hex = "{key}"\n[[mn]]\nmn_id = "d@x"\npsk_hex = "{key}"\n'
    )
    opened = tmp_path / "open.sqlite"
    opened.write_bytes(b"")
    opened.chmod(0o644)
    values = {"db": str(db), "dir": str(tmp_path), "open": str(opened)}
    out = credentials(*(a.format(**values) for a in args), stdin=stdin)
    assert out.returncode in (1, 2), out
    assert out.stderr.count("\n") == 1 and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and key not in out.stderr + out.stdout
    assert out.stdout == ""
    # All or nothing: the database still holds just what the first import put there.
    assert credentials("count", str(db)).stdout.strip() == "1"


class _Clash:
    class Command:
        name = "init"
        help = "shadows a built-in"

        def add_arguments(self, parser: Any) -> None:
            pass

        def run(self, args: Any) -> int:
            return 0

    @hookimpl
    def mipsec_cli_commands(self) -> list[Any]:
        return [self.Command()]


def test_a_plugin_command_cannot_take_a_built_in_name() -> None:
    pm: pluggy.PluginManager = pluginmanager.make_plugin_manager()
    assert "credentials" in cli.plugin_commands(pm)
    pm.register(_Clash())
    with pytest.raises(PluginError, match="'init' is a built-in"):
        cli.plugin_commands(pm)
