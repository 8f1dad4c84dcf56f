"""SA keys at rest in the SQLite SA store: wrapped by default (AES-256-GCM), bound to
their row, a wrong key file refused at start, clear only on request, conversion of
clear stores (plugins/sa_store_sqlite.py, plugins/_sa_keys.py, core/keywrap.py)."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from test_sa_store import EK1, EK2, IK1, IK2, T0, full_issued, issued

from mipsec.core.hookspecs import PluginContext
from mipsec.core.keywrap import KEY_FILE_LEN, KeyWrapper, UnwrapError
from mipsec.plugins import sa_store_sqlite
from mipsec.plugins._sa_keys import row_aad
from mipsec.plugins.sa_store_sqlite import (
    MemoryStoreFactory,
    SQLiteSAStore,
    SQLiteStoreFactory,
    default_key_file,
)

KEYS = (IK1, IK2, EK1, EK2)


def raw(path: Path) -> bytes:
    """Every octet SQLite keeps for the store: the file, its WAL and shared memory."""
    out = b""
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            out += p.read_bytes()
    return out


def holds_a_key(data: bytes) -> bool:
    return any(k in data for k in KEYS)


def ctx(tmp_path: Path, **extra: object) -> PluginContext:
    return PluginContext(role="hac", base_dir=tmp_path, extra=extra)


def make(tmp_path: Path, **options: object) -> SQLiteSAStore:
    return SQLiteStoreFactory().create({"path": "sa.db", **options}, ctx(tmp_path))


# ---------------------------------------------------------------- wrapped by default


def test_wrapped_rows_hold_no_key_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as s:
        assert s.key_mode == "aes-256-gcm"
        for spi in range(1, 50):
            assert s.add(issued(spi), T0)
        assert not holds_a_key(raw(path))  # WAL included, while open
    assert not holds_a_key(raw(path))
    assert default_key_file(path) == tmp_path / "sa.db.key"
    assert len((tmp_path / "sa.db.key").read_bytes()) == KEY_FILE_LEN


def test_wrapped_blob_opens_only_with_the_key_and_its_row(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as s:
        s.add(full_issued(), T0)
    conn = sqlite3.connect(path)
    # Every column but ``pending`` (not bound to the keys: cleared after the 200).
    row = conn.execute(f"SELECT {sa_store_sqlite._COLS} FROM issued_sa").fetchone()  # noqa: S608
    conn.close()
    head, blob = row[:-1], row[-1]
    material = (tmp_path / "sa.db.key").read_bytes()
    # With the key and the row: the keys.
    plain = KeyWrapper(material).open(blob[1:], row_aad(head))
    assert plain == bytes((16, 16, 16, 16)) + IK1[:16] + IK2[:16] + EK1 + EK2
    # Another key, or the same key with another row: nothing.
    with pytest.raises(UnwrapError):
        KeyWrapper(os.urandom(KEY_FILE_LEN)).open(blob[1:], row_aad(head))
    moved = (head[0] - 1, *head[1:])
    with pytest.raises(UnwrapError):
        KeyWrapper(material).open(blob[1:], row_aad(moved))


def test_each_row_has_its_own_nonce(tmp_path: Path) -> None:
    with SQLiteSAStore(tmp_path / "sa.db") as s:
        for spi in range(1, 20):
            s.add(issued(spi), T0)
    conn = sqlite3.connect(tmp_path / "sa.db")
    nonces = [r[0][1:13] for r in conn.execute("SELECT sa_keys FROM issued_sa")]
    conn.close()
    assert len(set(nonces)) == len(nonces) == 19


# ---------------------------------------------------------------- tampering


def _edit(path: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql, args)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "edit",
    [
        # keys of SPI 2 pasted into SPI 1's row (same MN, same everything else)
        "UPDATE issued_sa SET sa_keys = (SELECT sa_keys FROM issued_sa WHERE spi = 2) "
        "WHERE spi = 1",
        # validity end pushed back: the SA would outlive its lifetime
        "UPDATE issued_sa SET validity_end = validity_end + 86400 WHERE spi = 1",
        # another home address for the same keys
        "UPDATE issued_sa SET ip6_hoa = '2001:db8:1::99' WHERE spi = 1",
        # a changed ciphertext octet (never the octet it was: 0x00 was, one
        # run in 256, and the "tampered" row was then intact)
        "UPDATE issued_sa SET sa_keys = substr(sa_keys, 1, 20) || "
        "CASE WHEN substr(sa_keys, 21, 1) = x'00' THEN x'01' ELSE x'00' END || "
        "substr(sa_keys, 22) WHERE spi = 1",
        # a forged row in clear format (0x00, lengths, keys of the forger's choice)
        "UPDATE issued_sa SET sa_keys = x'0010101010' || zeroblob(64) WHERE spi = 1",
    ],
    ids=["swapped-keys", "validity-end", "hoa", "bit-flip", "clear-forgery"],
)
def test_tampered_row_is_refused_and_logged_once(
    tmp_path: Path, edit: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as s:
        s.add(issued(1, hoa6="2001:db8:1::1"), T0)
        s.add(issued(2, hoa6="2001:db8:1::2"), T0)
    _edit(path, edit)
    caplog.set_level(logging.ERROR, logger="mipsec.plugins.sa_store")
    with SQLiteSAStore(path) as s:
        assert s.get(1, T0) is None
        assert s.get(1, T0) is None
        assert [x.sa.spi for x in s.live(T0)] == [2]  # the other row is untouched
        assert s.remove(1) is None  # removed, but never handed out
        assert s.get(2, T0) is not None
    lines = [r for r in caplog.records if "spi=1 " in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "refused" in lines[0].getMessage() and str(path) in lines[0].getMessage()


def test_tampered_row_skipped_by_expire(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as s:
        s.add(issued(1, end=T0 + timedelta(seconds=5)), T0)
        s.add(issued(2, end=T0 + timedelta(seconds=6)), T0)
    _edit(path, "UPDATE issued_sa SET mn_id = 'mallory@x' WHERE spi = 1")
    with SQLiteSAStore(path) as s:
        gone = s.expire(T0 + timedelta(seconds=10))
        assert [x.sa.spi for x in gone] == [2]
        assert s.live(T0) == []  # the tampered row left the store too


# ---------------------------------------------------------------- the key file


def test_wrong_key_file_refused_at_start_naming_it(tmp_path: Path) -> None:
    with make(tmp_path, key_file="a.key") as s:
        s.add(issued(1), T0)
    other = tmp_path / "b.key"
    other.write_bytes(os.urandom(KEY_FILE_LEN))
    other.chmod(0o600)
    with pytest.raises(ValueError, match=r"^key_file: .*b\.key is not the key the SA keys in"):
        make(tmp_path, key_file="b.key")


def test_missing_key_file_of_a_wrapped_store_refused(tmp_path: Path) -> None:
    with make(tmp_path) as s:
        s.add(issued(1), T0)
    (tmp_path / "sa.db.key").unlink()
    with pytest.raises(ValueError, match=r"^key_file: .*sa\.db\.key: no such file, and the SA"):
        make(tmp_path)
    assert not (tmp_path / "sa.db.key").exists()  # never silently replaced


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_key_file_of_wrong_size_refused(tmp_path: Path, size: int) -> None:
    kf = tmp_path / "k.key"
    kf.write_bytes(b"\x01" * size)
    kf.chmod(0o600)
    with pytest.raises(ValueError, match=r"^key_file: .*k\.key: must hold exactly 32 octets"):
        make(tmp_path, key_file="k.key")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_key_file_open_to_others_refused_with_chmod_hint(tmp_path: Path, mode: int) -> None:
    with make(tmp_path, key_file="k.key"):
        pass
    kf = tmp_path / "k.key"
    kf.chmod(mode)
    with pytest.raises(ValueError, match=r"^key_file: ") as ei:
        make(tmp_path, key_file="k.key")
    assert f"(mode {mode:04o})" in str(ei.value)
    assert str(ei.value).endswith(f"fix: chmod 600 {kf}")


def test_store_file_open_to_others_refused_with_chmod_hint(tmp_path: Path) -> None:
    with make(tmp_path):
        pass
    (tmp_path / "sa.db").chmod(0o644)
    with pytest.raises(ValueError, match=r"^path: .*sa\.db: secret file open to group and others"):
        make(tmp_path)


def test_key_file_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with make(tmp_path, key_file="sub.key"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub.key").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_shared_store_shares_the_key_file(tmp_path: Path) -> None:
    # Deployment model 1 may point the HAC and its in-process HA at one store.
    with make(tmp_path, key_file="k.key") as hac, make(tmp_path, key_file="k.key") as ha:
        assert hac.add(full_issued(), T0)
        assert ha.get(full_issued().sa.spi, T0) == full_issued()


# ---------------------------------------------------------------- clear on request


def test_clear_keys_option(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    with make(tmp_path, clear_keys=True) as s:
        assert s.key_mode == "clear"
        assert s.add(full_issued(), T0)
    assert holds_a_key(raw(path))  # what the operator asked for
    assert not (tmp_path / "sa.db.key").exists()
    with make(tmp_path, clear_keys=True) as s:
        assert s.get(full_issued().sa.spi, T0) == full_issued()


def test_clear_keys_and_key_file_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clear_keys = true and key_file exclude each other"):
        make(tmp_path, clear_keys=True, key_file="k.key")


def test_wrapped_store_never_reopened_in_clear(tmp_path: Path) -> None:
    with make(tmp_path) as s:
        s.add(issued(1), T0)
    with pytest.raises(ValueError, match=r"^clear_keys: .*holds wrapped SA keys"):
        make(tmp_path, clear_keys=True)


def test_clear_store_converted_when_wrapping_is_turned_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sa.db"
    with make(tmp_path, clear_keys=True) as s:
        s.add(full_issued(), T0)
        s.add(issued(5), T0)
    caplog.set_level(logging.WARNING, logger="mipsec.plugins.sa_store")
    with make(tmp_path) as s:
        assert s.key_mode == "aes-256-gcm"
        assert s.get(full_issued().sa.spi, T0) == full_issued()
        assert s.get(5, T0) == issued(5)
    assert not holds_a_key(raw(path))
    assert "2 SAs converted from schema 2, keys now aes-256-gcm" in caplog.text


def test_a_wrapped_store_edited_to_say_clear_is_not_converted(tmp_path: Path) -> None:
    """Someone who can write the store file but not read its key file sets
    ``key_mode`` to clear, drops ``key_check`` and puts keys and validity
    ends of their choosing in the rows.  The next start refuses, naming the
    key file and what to do, instead of wrapping the forged rows and
    serving them (found in review).  A store really written in clear is
    converted once the key file is moved away (a new key is made); an
    empty one is converted at once."""
    path = tmp_path / "sa.db"
    with make(tmp_path) as s:
        assert s.add(full_issued(), T0)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE store_meta SET value = 'clear' WHERE name = 'key_mode'")
    conn.execute("DELETE FROM store_meta WHERE name = 'key_check'")
    forged = bytes((0, 16, 16, 16, 16)) + b"\x41" * 64
    conn.execute(
        "UPDATE issued_sa SET sa_keys = ?, validity_end = validity_end + 31536000", (forged,)
    )
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match=r"^key_file: .* already exists: not converted") as err:
        make(tmp_path)
    assert "4141" not in str(err.value)
    (tmp_path / "sa.db.key").rename(tmp_path / "old.key")  # the operator's way out
    with make(tmp_path) as s:
        assert s.key_mode == "aes-256-gcm"
    empty = tmp_path / "empty"
    empty.mkdir()
    with make(empty, clear_keys=True):
        pass
    old_key = (tmp_path / "old.key").read_bytes()
    fd = os.open(empty / "sa.db.key", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, old_key)
    os.close(fd)
    with make(empty) as s:  # a key file that existed, but no row to trust
        assert s.key_mode == "aes-256-gcm"


def test_a_conversion_cut_short_leaves_no_key_file_in_the_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A clear store's conversion fails (a full disk, a kill): its new key
    waits beside its final name until the rows are committed, so the next
    start converts again instead of finding a key file and refusing the
    store as edited (found in review of the refusal).  Killed between the
    commit and the rename, the next start puts that key in place."""
    path = tmp_path / "sa.db"
    with make(tmp_path, clear_keys=True) as s:
        s.add(full_issued(), T0)
    real = SQLiteSAStore._convert

    def full_disk(self: SQLiteSAStore, *args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(SQLiteSAStore, "_convert", full_disk)
    with pytest.raises(ValueError, match="database or disk is full"):
        make(tmp_path)
    assert not (tmp_path / "sa.db.key").exists()
    monkeypatch.setattr(SQLiteSAStore, "_convert", real)
    with make(tmp_path) as s:
        assert s.key_mode == "aes-256-gcm"
        assert s.get(full_issued().sa.spi, T0) == full_issued()
    # As if killed after the commit, before the key was put in place.
    (tmp_path / "sa.db.key").rename(tmp_path / "sa.db.key.converting")
    caplog.set_level(logging.WARNING)
    with make(tmp_path) as s:
        assert s.get(full_issued().sa.spi, T0) == full_issued()
    assert (tmp_path / "sa.db.key").exists()
    assert "conversion cut short put in place" in caplog.text
    assert not holds_a_key(raw(path))


# ---------------------------------------------------------------- schema 1


_V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE issued_sa (
    spi INTEGER PRIMARY KEY, mn_id TEXT NOT NULL, suite INTEGER NOT NULL,
    scope INTEGER NOT NULL, validity_end INTEGER NOT NULL,
    mn_to_ha_ikey BLOB NOT NULL, ha_to_mn_ikey BLOB NOT NULL,
    mn_to_ha_ekey BLOB NOT NULL, ha_to_mn_ekey BLOB NOT NULL,
    ha_id TEXT NOT NULL, haa_ip6 TEXT, haa_ip4 TEXT, port INTEGER NOT NULL,
    ip6_hoa TEXT, ip4_hoa TEXT, ip6_hnp TEXT, ip4_hnp TEXT, dns_ip6 TEXT, dns_ip4 TEXT);
CREATE INDEX issued_sa_validity_end ON issued_sa (validity_end);
"""


def _v1_store(path: Path, n: int) -> None:
    """A store as mipsec wrote it before key wrapping (schema 1, WAL)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(_V1_SCHEMA)
    end = int((T0 + timedelta(hours=1)).timestamp())
    for spi in range(1, n + 1):
        conn.execute(
            "INSERT INTO issued_sa VALUES (?, ?, 47, 1, ?, ?, ?, ?, ?, 'ha1', "
            "'2001:db8:1::1', NULL, 7872, ?, NULL, '2001:db8:1::/64', NULL, NULL, NULL)",
            (spi, f"mn{spi}@x", end, IK1, IK2, EK1, EK2, f"2001:db8:1::{spi:x}"),
        )
    conn.commit()
    conn.close()


def test_schema_1_store_converted_and_clear_keys_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sa.db"
    _v1_store(path, 300)  # several pages of clear keys
    assert holds_a_key(raw(path))
    caplog.set_level(logging.WARNING, logger="mipsec.plugins.sa_store")
    with make(tmp_path) as s:
        got = s.get(7, T0)
        assert got is not None and got.sa.mn_id == "mn7@x"
        assert (got.sa.mn_to_ha_ikey, got.sa.ha_to_mn_ekey) == (IK1, EK2)
        assert len(s.live(T0)) == 300
        assert not holds_a_key(raw(path))  # zeroed pages, WAL truncated
    assert not holds_a_key(raw(path))
    assert "300 SAs converted from schema 1" in caplog.text
    with make(tmp_path) as s:  # and it opens as a wrapped store from now on
        assert len(s.live(T0)) == 300


def test_schema_1_store_with_retired_sas_converted(tmp_path: Path) -> None:
    # Schema 1 as the lifecycle change left it: an mn_id index and retired_sa.
    path = tmp_path / "sa.db"
    _v1_store(path, 3)
    end = int((T0 + timedelta(hours=1)).timestamp())
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE INDEX issued_sa_mn_id ON issued_sa (mn_id);"
        "CREATE TABLE retired_sa (spi INTEGER PRIMARY KEY, mn_id TEXT NOT NULL, "
        "ha_id TEXT NOT NULL, validity_end INTEGER NOT NULL, reason TEXT NOT NULL, "
        "confirmed INTEGER NOT NULL DEFAULT 0);"
        f"INSERT INTO retired_sa VALUES (99, 'old@x', 'ha1', {end}, 'superseded', 0);"
    )
    conn.close()
    with make(tmp_path) as s:
        assert s.key_mode == "aes-256-gcm"
        assert [x.sa.spi for x in s.live_for_mn("mn2@x", T0)] == [2]
        assert [r[0] for r in s.retired_unconfirmed(T0)] == [99]
        assert not s.add(issued(99), T0)  # still reserved
    assert not holds_a_key(raw(path))


def test_schema_1_store_kept_in_clear_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    _v1_store(path, 3)
    with make(tmp_path, clear_keys=True) as s:
        assert s.key_mode == "clear" and len(s.live(T0)) == 3
    assert not (tmp_path / "sa.db.key").exists()


# ---------------------------------------------------------------- check-only


def test_check_only_creates_nothing(tmp_path: Path) -> None:
    s = SQLiteStoreFactory().create({"path": "new.db"}, ctx(tmp_path, check_only=True))
    s.close()
    assert list(tmp_path.iterdir()) == []


def test_check_only_finds_a_wrong_key_and_converts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    _v1_store(path, 2)
    before = path.read_bytes()
    s = SQLiteStoreFactory().create({"path": "sa.db"}, ctx(tmp_path, check_only=True))
    s.close()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sa.db"]
    path.unlink()
    with make(tmp_path) as s:
        s.add(issued(1), T0)
    (tmp_path / "sa.db.key").write_bytes(os.urandom(KEY_FILE_LEN))
    with pytest.raises(ValueError, match=r"^key_file: .*is not the key"):
        SQLiteStoreFactory().create({"path": "sa.db"}, ctx(tmp_path, check_only=True))


def test_check_only_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^path: cannot create .*is not a writable directory"):
        SQLiteStoreFactory().create({"path": "no/dir/sa.db"}, ctx(tmp_path, check_only=True))


# ---------------------------------------------------------------- memory store


def test_memory_store_wraps_with_a_key_of_its_own() -> None:
    m = MemoryStoreFactory().create({}, PluginContext(role="hac", base_dir=Path.cwd()))
    assert m.key_mode == "aes-256-gcm"
    assert m.add(full_issued(), T0) and m.get(full_issued().sa.spi, T0) == full_issued()
    blob = m._conn.execute("SELECT sa_keys FROM issued_sa").fetchone()[0]
    assert blob[0] == 1 and not holds_a_key(blob)
    m.close()
    c = MemoryStoreFactory().create({"clear_keys": True}, ctx(Path.cwd()))
    assert c.key_mode == "clear"
    c.close()
    with pytest.raises(ValueError, match=r"^key_file: extra inputs"):
        MemoryStoreFactory().create({"key_file": "k"}, ctx(Path.cwd()))


def test_live_page_reads_in_spi_order_and_passes_a_tampered_row(tmp_path: Path) -> None:
    """The HA's start reads its SAs page by page (``live_page``): SPI order,
    ended SAs left out, a row that fails authentication skipped but passed
    by the cursor (a page of only bad rows does not end the load)."""
    path = tmp_path / "sa.db"
    with SQLiteSAStore(path) as s:
        for spi in (7, 3, 5, 9, 4):
            s.add(issued(spi, end=T0 + timedelta(seconds=spi)), T0)
    _edit(path, "UPDATE issued_sa SET mn_id = 'mallory@x' WHERE spi = 7")
    now = T0 + timedelta(seconds=6)  # 3, 4 and 5 have ended by then
    with SQLiteSAStore(path) as s:
        assert s.live_page(now, 0, 2) == ([], 4)  # 3 and 4: ended; the cursor passes them
        assert s.live_page(now, 4, 2) == ([], 7)  # 5 ended, 7 tampered: skipped, passed
        page = s.live_page(now, 7, 2)
        assert [x.sa.spi for x in page[0]] == [9] and page[1] is None  # short: the last
        assert s.live_page(now, 9, 2) == ([], None)
        assert [x.sa.spi for x in s.live_page(T0, 0, 10)[0]] == [3, 4, 5, 9]
