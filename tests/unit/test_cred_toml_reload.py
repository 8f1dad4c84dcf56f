"""A large credentials.toml is re-read off the event loop (plugins/cred_toml.py, issue 9)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from mipsec.core.hookspecs import PluginContext
from mipsec.plugins import cred_toml
from mipsec.plugins.cred_toml import TomlCredentialsFactory


def _write(path: Path, entries: dict[str, str], mtime_ns: int) -> None:
    body = "".join(f'[[mn]]\nmn_id = "{m}"\npsk_hex = "{k}"\n' for m, k in entries.items())
    path.write_text(body)
    os.chmod(path, 0o600)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_large_file_reloaded_in_a_thread_last_contents_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cred_toml, "INLINE_RELOAD_MAX", 10)  # every file counts as large
    path = tmp_path / "creds.toml"
    _write(path, {"alice@x": "aa"}, 1_000_000_000_000_000_000)
    backend = TomlCredentialsFactory().create({"path": str(path)}, PluginContext("hac", tmp_path))
    parsed_in: list[int] = []
    gate = threading.Event()
    real_load = cred_toml.load_credentials

    def slow_load(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        parsed_in.append(threading.get_ident())
        assert gate.wait(10)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cred_toml, "load_credentials", slow_load)

    async def scenario() -> None:
        _write(path, {"alice@x": "bb", "carol@x": "cc"}, 1_000_000_001_000_000_000)
        # The lookup does not wait for the parse: the last contents answer.
        assert backend.get_psk("alice@x") == b"\xaa"
        assert backend.get_psk("carol@x") is None
        gate.set()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if backend.get_psk("carol@x") is not None:
                break
        assert backend.get_psk("carol@x") == b"\xcc"
        assert backend.get_psk("alice@x") == b"\xbb"

    asyncio.run(scenario())
    assert len(parsed_in) == 1  # one parse, however many lookups came meanwhile
    assert parsed_in[0] != threading.get_ident()


def test_broken_large_file_keeps_last_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cred_toml, "INLINE_RELOAD_MAX", 10)
    path = tmp_path / "creds.toml"
    _write(path, {"alice@x": "aa"}, 1_000_000_000_000_000_000)
    backend = TomlCredentialsFactory().create({"path": str(path)}, PluginContext("hac", tmp_path))

    async def scenario() -> None:
        path.write_text("[[mn]\n")
        os.utime(path, ns=(1_000_000_002_000_000_000,) * 2)
        assert backend.get_psk("alice@x") == b"\xaa"
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "not reloaded" in caplog.text:
                break
        assert backend.get_psk("alice@x") == b"\xaa"

    asyncio.run(scenario())
    assert caplog.text.count("not reloaded") == 1
    assert "creds.toml" in caplog.text


def test_small_file_or_no_loop_reloads_at_once(tmp_path: Path) -> None:
    path = tmp_path / "creds.toml"
    _write(path, {"alice@x": "aa"}, 1_000_000_000_000_000_000)
    backend = TomlCredentialsFactory().create({"path": str(path)}, PluginContext("hac", tmp_path))

    async def scenario() -> None:
        _write(path, {"alice@x": "bb"}, 1_000_000_001_000_000_000)
        assert backend.get_psk("alice@x") == b"\xbb"  # a few octets: parsed inline

    asyncio.run(scenario())


def test_reload_finishing_after_close_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cred_toml, "INLINE_RELOAD_MAX", 10)
    path = tmp_path / "creds.toml"
    _write(path, {"alice@x": "aa"}, 1_000_000_000_000_000_000)
    backend = TomlCredentialsFactory().create({"path": str(path)}, PluginContext("hac", tmp_path))

    async def scenario() -> None:
        _write(path, {"alice@x": "bb"}, 1_000_000_001_000_000_000)
        assert backend.get_psk("alice@x") == b"\xaa"  # the reload runs in a thread
        backend.close()
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    assert backend._table == {}  # a closed backend holds no keys


def test_a_new_file_open_to_others_is_not_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The credential file replaced by one that group or others may read
    (``mv new.toml creds.toml`` of a 0644 file): refused as at start --
    the last contents stay, one ERROR says why and how to fix it.  Before,
    it was loaded with an INFO line (found in review)."""
    path = tmp_path / "creds.toml"
    _write(path, {"alice@x": "aa"}, 1_000_000_000_000_000_000)
    backend = TomlCredentialsFactory().create({"path": str(path)}, PluginContext("hac", tmp_path))
    _write(path, {"alice@x": "bb"}, 1_000_000_001_000_000_000)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.ERROR):
        assert backend.get_psk("alice@x") == b"\xaa"
        assert backend.get_psk("alice@x") == b"\xaa"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "secret file open to" in errors[0], errors
    os.chmod(path, 0o600)
    os.utime(path, ns=(1_000_000_002_000_000_000,) * 2)
    assert backend.get_psk("alice@x") == b"\xbb"  # fixed: loaded
