"""Credential backends (plugins/cred_toml.py, plugins/cred_sqlite.py)."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from pathlib import Path

import pluggy
import pytest

from mipsec.core.hookspecs import CredentialBackend, MipsecSpec, PluginContext
from mipsec.plugins import cred_sqlite, cred_toml
from mipsec.plugins.cred_sqlite import SQLiteCredentialsFactory, add_psk
from mipsec.plugins.cred_toml import TomlCredentialsFactory, load_credentials, nai_key

ALICE_KEY = bytes.fromhex("00112233445566778899aabbccddeeff")

GOOD = """
[[mn]]
mn_id = "alice@home.example"
psk_hex = "00112233445566778899aabbccddeeff"

[[mn]]
mn_id = "Bob@Home.Example"
psk = "correct horse battery staple"
"""


def ctx(tmp_path: Path) -> PluginContext:
    return PluginContext(role="hac", base_dir=tmp_path)


def put(path: Path, text: str) -> None:
    """A credential file as an operator keeps it: mode 0600."""
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)


def write(path: Path, text: str, mtime_ns: int) -> None:
    put(path, text)
    # Set the modification time explicitly: the test never depends on the clock.
    os.utime(path, ns=(mtime_ns, mtime_ns))


# ---------------------------------------------------------------- NAI


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ("alice@Home.EXAMPLE", "alice@home.example"),
        ("Alice@home.example", "Alice@home.example"),  # username stays case-sensitive
        ("NoRealm", "NoRealm"),
        ("a@b@Realm.Example", "a@b@realm.example"),  # the realm follows the last "@"
        ("u@BÜCHER.example", "u@BÜCHER.example"),  # non-ASCII realm: compared as is
        ("cafe\u0301@x.example", "caf\u00e9@x.example"),  # NFC (RFC 7542 §2.1)
    ],
)
def test_nai_key(given: str, key: str) -> None:
    assert nai_key(given) == key


# ---------------------------------------------------------------- TOML


def test_toml_psk_hex_and_psk(tmp_path: Path) -> None:
    put(tmp_path / "creds.toml", GOOD)
    b = TomlCredentialsFactory().create({"path": "creds.toml"}, ctx(tmp_path))
    assert isinstance(b, CredentialBackend)
    assert b.get_psk("alice@home.example") == ALICE_KEY
    assert b.get_psk("Bob@Home.Example") == b"correct horse battery staple"
    assert b.get_psk("nobody@home.example") is None
    b.close()


def test_toml_realm_case_insensitive_user_case_sensitive(tmp_path: Path) -> None:
    put(tmp_path / "creds.toml", GOOD)
    b = TomlCredentialsFactory().create({"path": "creds.toml"}, ctx(tmp_path))
    assert b.get_psk("alice@HOME.example") == ALICE_KEY
    assert b.get_psk("Bob@home.example") == b"correct horse battery staple"
    assert b.get_psk("ALICE@home.example") is None
    assert b.get_psk("bob@home.example") is None


def test_toml_repr_has_no_key(tmp_path: Path) -> None:
    put(tmp_path / "creds.toml", GOOD)
    b = TomlCredentialsFactory().create({"path": "creds.toml"}, ctx(tmp_path))
    text = repr(b) + str(b)
    assert ALICE_KEY.hex() not in text and "horse" not in text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[[mn]]\nmn_id = "a@x"\npsk_hex = "zz"\n', r"mn\[0\]\.psk_hex: not valid hexadecimal"),
        ('[[mn]]\nmn_id = "a@x"\npsk_hex = "00"\n[[mn]]\nmn_id = "b@x"\n', r"mn\[1\]: exactly one"),
        ('[[mn]]\nmn_id = "a@x"\npsk = "p"\npsk_hex = "00"\n', r"mn\[0\]: exactly one"),
        ('[[mn]]\npsk = "p"\n', r"mn\[0\]\.mn_id: field required"),
        ('[[mn]]\nmn_id = ""\npsk = "p"\n', r"mn\[0\]\.mn_id: string should have at least"),
        ('[[mn]]\nmn_id = "a@x"\npsk = ""\n', r"mn\[0\]\.psk: empty key"),
        ('[[mn]]\nmn_id = "a@x"\npsk = 5\n', r"mn\[0\]\.psk: input should be a valid string"),
        ('[[mn]]\nmn_id = "a@x"\npsk = "p"\nkey = "q"\n', r"mn\[0\]\.key: extra inputs"),
        (
            f'[[mn]]\nmn_id = "a@X"\npsk = "{"p" * 20}"\n'
            f'[[mn]]\nmn_id = "a@x"\npsk = "{"q" * 20}"\n',
            r"mn\[1\]\.mn_id: duplicate of mn\[0\]",
        ),
        ("users = 1\n", r"users: extra inputs"),
        ("[[mn]\n", r"line 1"),
    ],
)
def test_toml_errors_name_file_and_key(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / "creds.toml"
    put(path, body)
    with pytest.raises(ValueError, match=expected) as ei:
        load_credentials(path)
    assert str(ei.value).startswith(f"{path}: ")
    # Through the factory the config key comes first.
    with pytest.raises(ValueError, match=r"^path: .*creds\.toml: ") as ei2:
        TomlCredentialsFactory().create({"path": str(path)}, ctx(tmp_path))
    # A secret value never appears in an error.
    assert '"p"' not in str(ei2.value) and "'p'" not in str(ei2.value)


def test_toml_factory_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^path: field required$"):
        TomlCredentialsFactory().create({}, ctx(tmp_path))
    with pytest.raises(ValueError, match=r"^path: cannot read .*missing\.toml"):
        TomlCredentialsFactory().create({"path": "missing.toml"}, ctx(tmp_path))
    with pytest.raises(ValueError, match=r"^extra: extra inputs"):
        TomlCredentialsFactory().create({"path": "x", "extra": 1}, ctx(tmp_path))


def test_toml_reload_on_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "creds.toml"
    write(path, GOOD, 1_000_000_000_000_000_000)
    b = TomlCredentialsFactory().create({"path": "creds.toml"}, ctx(tmp_path))
    assert b.get_psk("carol@home.example") is None
    added = GOOD + '\n[[mn]]\nmn_id = "carol@home.example"\npsk_hex = "abcd"\n'
    write(path, added, 1_000_000_001_000_000_000)
    assert b.get_psk("carol@home.example") == b"\xab\xcd"
    # A broken edit is logged once and the last good contents stay in force.
    with caplog.at_level(logging.ERROR, logger="mipsec.plugins.cred_toml"):
        write(path, added + "[[mn]\n", 1_000_000_002_000_000_000)
        assert b.get_psk("carol@home.example") == b"\xab\xcd"
        assert b.get_psk("alice@home.example") == ALICE_KEY
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "creds.toml" in errors[0].getMessage()
    assert "abcd" not in caplog.text and ALICE_KEY.hex() not in caplog.text
    # Fixed file: a user removed by the operator is gone.
    new = "a new passphrase, long enough"
    write(path, f'[[mn]]\nmn_id = "carol@home.example"\npsk = "{new}"\n', 1_000_000_003_000_000_000)
    assert b.get_psk("carol@home.example") == new.encode()
    assert b.get_psk("alice@home.example") is None
    # A deleted file keeps the last contents too.
    path.unlink()
    assert b.get_psk("carol@home.example") == new.encode()


def test_toml_same_mtime_different_size_reloads(tmp_path: Path) -> None:
    path = tmp_path / "creds.toml"
    write(path, GOOD, 5_000_000_000)
    b = TomlCredentialsFactory().create({"path": str(path)}, ctx(tmp_path))
    write(path, GOOD.replace("00112233445566778899aabbccddeeff", "01"), 5_000_000_000)
    assert b.get_psk("alice@home.example") == b"\x01"


def test_toml_empty_file(tmp_path: Path) -> None:
    put(tmp_path / "c.toml", "")
    b = TomlCredentialsFactory().create({"path": "c.toml"}, ctx(tmp_path))
    assert b.get_psk("a@x") is None


# ---------------------------------------------------------------- SQLite


def test_sqlite_add_get(tmp_path: Path) -> None:
    db = tmp_path / "creds.db"
    add_psk(db, "alice@Home.Example", ALICE_KEY)
    add_psk(db, "bob@home.example", b"one")
    add_psk(db, "bob@home.example", b"two")  # replaces
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    b = SQLiteCredentialsFactory().create({"path": "creds.db"}, ctx(tmp_path))
    assert isinstance(b, CredentialBackend)
    assert b.get_psk("alice@home.example") == ALICE_KEY
    assert b.get_psk("alice@HOME.EXAMPLE") == ALICE_KEY
    assert b.get_psk("Alice@home.example") is None
    assert b.get_psk("bob@home.example") == b"two"
    assert b.get_psk("nobody@home.example") is None
    assert ALICE_KEY.hex() not in repr(b)
    # Rows added while the HAC runs are visible without a restart.
    add_psk(db, "carol@home.example", b"c")
    assert b.get_psk("carol@home.example") == b"c"
    b.close()


def test_sqlite_remove_takes_every_spelling_the_backend_would_find(tmp_path: Path) -> None:
    """Rows written by another tool under other cases of the realm
    (``alice@HOME.example``) are found by a lookup of any spelling: ``remove``
    of any spelling takes them all, and the MN no longer authenticates.
    Another user part (``Alice@``) is another user and stays.  Before, only
    the exact and canonical spellings went, and ``remove`` said True while
    the MN still got its key (found in review)."""
    from mipsec.plugins.cred_sqlite import remove_psk

    db = tmp_path / "creds.db"
    add_psk(db, "bob@home.example", b"bob")
    conn = sqlite3.connect(db)
    conn.executemany(
        "INSERT INTO mn_credentials (mn_id, psk) VALUES (?, ?)",
        [("alice@HOME.example", ALICE_KEY), ("alice@Home.Example", ALICE_KEY),
         ("Alice@home.example", b"other")],
    )  # fmt: skip
    conn.commit()
    conn.close()
    b = SQLiteCredentialsFactory().create({"path": "creds.db"}, ctx(tmp_path))
    assert b.get_psk("alice@HOME.example") == ALICE_KEY
    assert remove_psk(db, "alice@home.example") is True
    for spelling in ("alice@HOME.example", "alice@Home.Example", "alice@home.example"):
        assert b.get_psk(spelling) is None, spelling
    assert b.get_psk("Alice@home.example") == b"other"
    assert b.get_psk("bob@home.example") == b"bob"
    assert remove_psk(db, "alice@home.example") is False
    b.close()


def test_sqlite_hand_made_rows(tmp_path: Path) -> None:
    db = tmp_path / "creds.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE mn_credentials (mn_id TEXT PRIMARY KEY, psk BLOB)")
    conn.executemany(
        "INSERT INTO mn_credentials VALUES (?, ?)",
        [("text@x", "a passphrase typed by hand"), ("null@x", None), ("empty@x", b"")],
    )
    conn.commit()
    conn.close()
    db.chmod(0o600)
    b = SQLiteCredentialsFactory().create({"path": str(db)}, ctx(tmp_path))
    assert b.get_psk("text@x") == b"a passphrase typed by hand"
    assert b.get_psk("null@x") is None
    assert b.get_psk("empty@x") is None
    b.close()


def test_sqlite_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^path: .*missing\.db.*no such file"):
        SQLiteCredentialsFactory().create({"path": "missing.db"}, ctx(tmp_path))
    sqlite3.connect(tmp_path / "empty.db").close()
    (tmp_path / "empty.db").write_bytes(b"")
    (tmp_path / "empty.db").chmod(0o600)
    with pytest.raises(ValueError, match=r"^path: .*empty\.db.*no such table"):
        SQLiteCredentialsFactory().create({"path": "empty.db"}, ctx(tmp_path))
    with pytest.raises(ValueError, match=r"^path: field required$"):
        SQLiteCredentialsFactory().create({}, ctx(tmp_path))
    with pytest.raises(ValueError, match="psk: empty key"):
        add_psk(tmp_path / "x.db", "a@x", b"")
    with pytest.raises(ValueError, match="mn_id: empty"):
        add_psk(tmp_path / "x.db", "", b"k")


def test_sqlite_file_replaced_on_disk_is_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator who builds a new database and moves it into place (a new
    inode: the open connection would go on reading the old, unlinked file)
    is followed at the next lookup -- an MN removed that way must not keep
    authenticating until a restart."""
    db = tmp_path / "creds.db"
    add_psk(db, "alice@home.example", ALICE_KEY)
    add_psk(db, "bob@home.example", b"bob")
    b = SQLiteCredentialsFactory().create({"path": "creds.db"}, ctx(tmp_path))
    assert b.get_psk("alice@home.example") == ALICE_KEY
    fresh = tmp_path / "creds.db.new"
    add_psk(fresh, "bob@home.example", b"bob2")  # alice removed, bob re-keyed
    os.replace(fresh, db)
    with caplog.at_level(logging.INFO, logger="mipsec.plugins.cred_sqlite"):
        assert b.get_psk("alice@home.example") is None
        assert b.get_psk("bob@home.example") == b"bob2"
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "replaced on disk" in caplog.text and ALICE_KEY.hex() not in caplog.text
    b.close()


def test_sqlite_locked_by_another_process_fails_fast_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the file locked (an SQL client's ``BEGIN
    EXCLUSIVE``): a lookup, on the HAC's event loop, waits at most 50 ms
    (SQLite's busy timeout on the connection; it was 5 s, every MN held
    with it), then fails with ``CredentialsBusyError`` (the MN gets 503);
    the lookups of the next half second fail without asking SQLite at all;
    once the lock is gone lookups work again.  One WARNING each way."""
    db = tmp_path / "creds.db"
    add_psk(db, "alice@home.example", ALICE_KEY)
    b = SQLiteCredentialsFactory().create({"path": "creds.db"}, ctx(tmp_path))
    assert b._conn.execute("PRAGMA busy_timeout").fetchone() == (50,)
    asked: list[str] = []
    b._conn.set_trace_callback(asked.append)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.INFO, logger="mipsec.plugins.cred_sqlite"):
            with pytest.raises(cred_sqlite.CredentialsBusyError):
                b.get_psk("alice@home.example")
            assert len(asked) == 1  # the one lookup that met the lock
            for _ in range(3):  # within the backoff: not even asked
                with pytest.raises(cred_sqlite.CredentialsBusyError):
                    b.get_psk("alice@home.example")
            assert len(asked) == 1
            holder.execute("ROLLBACK")
            monkeypatch.setattr(b, "_busy_until", 1e-9)  # the backoff over
            assert b.get_psk("alice@home.example") == ALICE_KEY
            assert b.get_psk("alice@home.example") == ALICE_KEY
    finally:
        holder.close()
        b.close()
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "locked by another process; its MNs get 503" in caplog.records[0].getMessage()
    assert caplog.records[1].getMessage().endswith("works again")
    assert ALICE_KEY.hex() not in caplog.text


@pytest.mark.parametrize("fault", ["no table", "open to others", "removed", "fifo"])
def test_sqlite_replacement_refused_keeps_the_open_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """A replacement that a start would refuse (no table, readable by others)
    or a file gone: one ERROR naming the file and why, and the database
    opened last keeps answering (as the TOML backend keeps its last
    contents); a good replacement after it is taken."""
    db = tmp_path / "creds.db"
    add_psk(db, "alice@home.example", ALICE_KEY)
    b = SQLiteCredentialsFactory().create({"path": "creds.db"}, ctx(tmp_path))
    if fault == "removed":
        db.unlink()
    elif fault == "fifo":  # refused by its type: SQLite's open would block the loop
        db.unlink()
        os.mkfifo(db, 0o600)
    else:
        bad = tmp_path / "bad.db"
        if fault == "no table":
            sqlite3.connect(bad).close()
            bad.write_bytes(b"")
            bad.chmod(0o600)
        else:
            add_psk(bad, "alice@home.example", b"other")
            bad.chmod(0o644)
        os.replace(bad, db)
    with caplog.at_level(logging.INFO, logger="mipsec.plugins.cred_sqlite"):
        for _ in range(3):  # logged once, not once per lookup
            assert b.get_psk("alice@home.example") == ALICE_KEY
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and len(caplog.records) == 1, caplog.text
    assert "creds.db" in caplog.text and "keeping" in caplog.text
    if fault == "fifo":
        assert "not a regular file" in caplog.text
        db.unlink()
    good = tmp_path / "good.db"
    add_psk(good, "alice@home.example", b"new")
    os.replace(good, db)
    assert b.get_psk("alice@home.example") == b"new"
    b.close()


# ---------------------------------------------------------------- pluggy


def test_through_pluggy(tmp_path: Path) -> None:
    pm = pluggy.PluginManager("mipsec")
    pm.add_hookspecs(MipsecSpec)
    pm.register(cred_toml)
    pm.register(cred_sqlite)
    factories = {f.name: f for group in pm.hook.mipsec_credential_backends() for f in group}
    assert set(factories) == {"toml", "sqlite"}
    put(tmp_path / "c.toml", GOOD)
    b = factories["toml"].create({"path": "c.toml"}, ctx(tmp_path))
    assert b.get_psk("alice@home.example") == ALICE_KEY
    add_psk(tmp_path / "c.db", "alice@home.example", ALICE_KEY)
    b2 = factories["sqlite"].create({"path": "c.db"}, ctx(tmp_path))
    assert b2.get_psk("alice@home.example") == ALICE_KEY
    b2.close()


# ---------------------------------------------------------------- secrets at rest


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o606])
def test_toml_file_open_to_others_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "creds.toml"
    put(path, GOOD)
    path.chmod(mode)
    with pytest.raises(ValueError, match=r"^path: .*creds\.toml: secret file open to") as ei:
        TomlCredentialsFactory().create({"path": "creds.toml"}, ctx(tmp_path))
    assert str(ei.value).endswith(f"fix: chmod 600 {path}")


def test_sqlite_file_open_to_others_refused(tmp_path: Path) -> None:
    db = tmp_path / "creds.db"
    add_psk(db, "alice@home.example", ALICE_KEY)
    db.chmod(0o604)
    with pytest.raises(ValueError, match=r"^path: .*creds\.db: secret file open to others"):
        SQLiteCredentialsFactory().create({"path": "creds.db"}, ctx(tmp_path))


def test_add_psk_creates_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        add_psk(tmp_path / "creds.db", "alice@home.example", ALICE_KEY)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "creds.db").stat().st_mode) == 0o600


# ---------------------------------------------------------------- passphrases


SHORT = (
    '[[mn]]\nmn_id = "alice@home.example"\npsk_hex = "00"\n\n[[mn]]\nmn_id = "eve@x"\npsk = "{p}"\n'
)


@pytest.mark.parametrize(
    ("passphrase", "ok"), [("x" * 19, False), ("x" * 20, True), ("é" * 20, True)]
)
def test_toml_short_passphrase_refused(tmp_path: Path, passphrase: str, ok: bool) -> None:
    put(tmp_path / "creds.toml", SHORT.format(p=passphrase))
    factory = TomlCredentialsFactory()
    if ok:
        b = factory.create({"path": "creds.toml"}, ctx(tmp_path))
        assert b.get_psk("eve@x") == passphrase.encode()
        return
    with pytest.raises(ValueError) as ei:
        factory.create({"path": "creds.toml"}, ctx(tmp_path))
    text = str(ei.value)
    # file, key and entry named; the passphrase itself never is
    assert text.startswith(f"path: {tmp_path / 'creds.toml'}: mn[1].psk: passphrase for 'eve@x'")
    assert "19 characters, fewer than 20" in text and "allow_short_passphrase" in text
    assert passphrase not in text


def test_toml_short_passphrase_accepted_with_opt_in(tmp_path: Path) -> None:
    put(tmp_path / "creds.toml", SHORT.format(p="hunter2"))
    b = TomlCredentialsFactory().create(
        {"path": "creds.toml", "allow_short_passphrase": True}, ctx(tmp_path)
    )
    assert b.get_psk("eve@x") == b"hunter2"


def test_toml_reload_with_short_passphrase_keeps_last_contents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "creds.toml"
    write(path, GOOD, 1_000_000_000_000_000_000)
    b = TomlCredentialsFactory().create({"path": "creds.toml"}, ctx(tmp_path))
    with caplog.at_level(logging.ERROR, logger="mipsec.plugins.cred_toml"):
        write(
            path, GOOD + SHORT.format(p="hunter2").replace("alice", "al"), 2_000_000_000_000_000_000
        )
        assert b.get_psk("eve@x") is None
        assert b.get_psk("alice@home.example") == ALICE_KEY
    assert "mn[3].psk: passphrase for 'eve@x' has 7 characters" in caplog.text
    assert "hunter2" not in caplog.text


def _hand_made(db: Path, rows: list[tuple[str, object]]) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE IF NOT EXISTS mn_credentials (mn_id TEXT PRIMARY KEY, psk BLOB)")
    conn.executemany("INSERT INTO mn_credentials VALUES (?, ?)", rows)
    conn.commit()
    conn.close()
    db.chmod(0o600)


def test_sqlite_short_passphrase_refused_at_start(tmp_path: Path) -> None:
    db = tmp_path / "creds.db"
    # A short BLOB is a key, not a passphrase: only TEXT rows are checked.
    _hand_made(db, [("key@x", b"\x01\x02"), ("eve@x", "hunter2"), ("ok@x", "y" * 20)])
    with pytest.raises(ValueError) as ei:
        SQLiteCredentialsFactory().create({"path": "creds.db"}, ctx(tmp_path))
    text = str(ei.value)
    assert "creds.db" in text and "mn_credentials[mn_id='eve@x'].psk" in text
    assert "7 characters" in text and "hunter2" not in text
    b = SQLiteCredentialsFactory().create(
        {"path": "creds.db", "allow_short_passphrase": True}, ctx(tmp_path)
    )
    assert b.get_psk("eve@x") == b"hunter2"
    b.close()


def test_sqlite_short_passphrase_added_later_ignored_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "creds.db"
    _hand_made(db, [("ok@x", "y" * 20)])
    b = SQLiteCredentialsFactory().create({"path": "creds.db"}, ctx(tmp_path))
    _hand_made(db, [("eve@x", "hunter2")])
    with caplog.at_level(logging.ERROR, logger="mipsec.plugins.cred_sqlite"):
        assert b.get_psk("eve@x") is None
        assert b.get_psk("eve@x") is None
    assert b.get_psk("ok@x") == b"y" * 20
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and "mn_credentials[mn_id='eve@x'].psk ignored" in errors[0]
    assert "hunter2" not in caplog.text
    b.close()
