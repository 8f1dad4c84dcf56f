"""Secret files (core/secretfiles.py), explicit file modes (core/fsutil.py), key wrapping
(core/keywrap.py) and the small config/launcher pieces of issue 6 items 6 and 8."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mipsec.core.config import redacted, validate_config
from mipsec.core.errors import ConfigError, ListenError
from mipsec.core.fsutil import make_dir, write_file, write_private_atomic
from mipsec.core.keywrap import (
    KEY_FILE_LEN,
    KeyFileError,
    KeyWrapper,
    UnwrapError,
    create_key_file,
    read_key_file,
)
from mipsec.core.secretfiles import InsecureFileError, check_private, check_private_sqlite


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------- check_private


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o200])
def test_private_modes_pass(tmp_path: Path, mode: int) -> None:
    p = tmp_path / "k"
    p.write_bytes(b"x")
    p.chmod(mode)
    check_private(p)


@pytest.mark.parametrize(
    ("mode", "who"),
    [
        (0o644, "group and others"),
        (0o640, "group"),
        (0o604, "others"),
        (0o620, "group"),
        (0o602, "others"),
        (0o610, "group"),
        (0o666, "group and others"),
    ],
)
def test_open_modes_refused_with_the_fix(tmp_path: Path, mode: int, who: str) -> None:
    p = tmp_path / "my key"  # a space: the hint must still be a valid command
    p.write_bytes(b"x")
    p.chmod(mode)
    with pytest.raises(InsecureFileError) as ei:
        check_private(p)
    assert str(ei.value) == (
        f"{p}: secret file open to {who} (mode {mode:04o}); fix: chmod 600 '{p}'"
    )
    assert isinstance(ei.value, ValueError) and ei.value.mode == mode


def test_missing_file_and_directories_pass(tmp_path: Path) -> None:
    check_private(tmp_path / "will-be-created")
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    check_private(d)  # not a secret file: whoever opens it reports the error


def test_sqlite_companions_checked(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    db.write_bytes(b"")
    db.chmod(0o600)
    wal = tmp_path / "s.db-wal"
    wal.write_bytes(b"")
    wal.chmod(0o644)
    with pytest.raises(InsecureFileError, match=r"s\.db-wal: secret file open"):
        check_private_sqlite(db)


# ---------------------------------------------------------------- fsutil


def test_write_file_exact_mode_whatever_the_umask(tmp_path: Path, umask0: None) -> None:
    for mode in (0o600, 0o644):
        p = tmp_path / f"f{mode:o}"
        write_file(p, b"data", mode)
        assert _mode(p) == mode and p.read_bytes() == b"data"
    # Replacing an open file yields a fresh private one.
    p = tmp_path / "old"
    p.write_bytes(b"old")
    p.chmod(0o666)
    write_file(p, b"new", 0o600)
    assert _mode(p) == 0o600 and p.read_bytes() == b"new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f600", "f644", "old"]


def test_write_private_atomic_never_replaces(tmp_path: Path, umask0: None) -> None:
    p = tmp_path / "k"
    write_private_atomic(p, b"first")
    assert _mode(p) == 0o600
    with pytest.raises(FileExistsError):
        write_private_atomic(p, b"second")
    assert p.read_bytes() == b"first"
    assert [x.name for x in tmp_path.iterdir()] == ["k"]


def test_make_dir(tmp_path: Path, umask0: None) -> None:
    d = tmp_path / "a" / "b"
    assert make_dir(d, 0o700)
    assert _mode(d) == 0o700
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    assert not make_dir(mine, 0o700)
    assert _mode(mine) == 0o755  # the operator's own directory is left alone


# ---------------------------------------------------------------- keywrap


def test_wrap_roundtrip_and_refusals() -> None:
    w = KeyWrapper(os.urandom(KEY_FILE_LEN))
    sealed = w.seal(b"keys", b"row 1")
    assert len(sealed) == 12 + 4 + 16 and w.seal(b"keys", b"row 1") != sealed
    assert w.open(sealed, b"row 1") == b"keys"
    with pytest.raises(UnwrapError):
        w.open(sealed, b"row 2")
    with pytest.raises(UnwrapError):
        KeyWrapper(os.urandom(KEY_FILE_LEN)).open(sealed, b"row 1")
    with pytest.raises(UnwrapError, match="too short"):
        w.open(sealed[:27], b"row 1")
    v = w.verifier()
    assert w.matches(v) and not KeyWrapper(os.urandom(KEY_FILE_LEN)).matches(v)
    assert repr(w) == "KeyWrapper(<key>)"
    with pytest.raises(KeyFileError):
        KeyWrapper(b"short")


def test_key_derivation_is_not_the_file_octets() -> None:
    # The file's octets never key AES-GCM directly (HKDF with a label first).
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    material = bytes(range(32))
    sealed = KeyWrapper(material).seal(b"k", b"")
    with pytest.raises(InvalidTag):
        AESGCM(material).decrypt(sealed[:12], sealed[12:], b"")


def test_key_files(tmp_path: Path, umask0: None) -> None:
    kf = tmp_path / "w.key"
    material = create_key_file(kf)
    assert len(material) == KEY_FILE_LEN and _mode(kf) == 0o600
    assert read_key_file(kf) == material
    with pytest.raises(FileExistsError):
        create_key_file(kf)
    kf.chmod(0o640)
    with pytest.raises(InsecureFileError):
        read_key_file(kf)
    kf.chmod(0o600)
    kf.write_bytes(material + b"\n")
    with pytest.raises(KeyFileError, match="exactly 32 octets"):
        read_key_file(kf)


# ---------------------------------------------------------------- config and errors


def test_psk_hex_and_psk_file_together_refused(tmp_path: Path) -> None:
    data = {
        "mn": {"mn_id": "a@x", "psk_hex": "00", "psk_file": "mn.psk"},
        "hac": {"host": "127.0.0.1", "ca": "ca.pem"},
    }
    with pytest.raises(ConfigError) as ei:
        validate_config(data, "mn", file="mn.toml", base=tmp_path)
    assert str(ei.value) == "mn.toml: mn: psk_hex and psk_file exclude each other: keep one"


def test_redacted_keeps_booleans_of_secret_sounding_options(tmp_path: Path) -> None:
    cfg = validate_config(
        {
            "hac": {"cert": "c.pem", "key": "k.pem"},
            "ha": [{"id": "ha1", "address6": "::1", "transport": "tls"}],
            "credentials": {"path": "c.toml", "allow_short_passphrase": True, "psk": "x"},
        },
        "hac",
        base=tmp_path,
    )
    creds = redacted(cfg)["credentials"]
    assert creds["allow_short_passphrase"] is True and creds["psk"] == "<redacted>"


def test_key_file_resolved_against_the_config_file(tmp_path: Path) -> None:
    cfg = validate_config(
        {
            "hac": {"cert": "pki/c.pem", "key": "pki/k.pem"},
            "ha": [{"id": "ha1", "address6": "::1", "transport": "tls"}],
            "sa_store": {"path": "sa.sqlite", "key_file": "keys/sa.key"},
        },
        "hac",
        base=tmp_path,
    )
    assert cfg.sa_store.options["key_file"] == str(tmp_path / "keys" / "sa.key")  # type: ignore[attr-defined]


def test_listen_error_words() -> None:
    exc = OSError(errno.EADDRINUSE, "error while attempting to bind on address ...")
    e = ListenError.from_oserror("ha.port", "::1", 7872, exc)
    assert str(e) == "ha.port: cannot listen on [::1] port 7872: Address already in use"
    u = e.under("local_ha.")
    assert u.key == "local_ha.ha.port" and u.reason == e.reason
    assert str(ListenError.from_oserror("hac.port", "127.0.0.1", 1, OSError("odd"))).endswith(
        "cannot listen on 127.0.0.1 port 1: odd"
    )
