"""JSON and TOML nested past Python's recursion limit is bad input like any other.

``json.loads`` raises ``RecursionError`` (not ``ValueError``) for arrays
nested some thousands deep: a control request line of 64 KiB, a revocation
list or journal line, the MN's SQN state file.  Each parser must refuse it
as it refuses malformed JSON -- a typed error naming the input -- not let
the ``RecursionError`` escape (for the revocation list: into every
bootstrap's lookup; for a configuration or credential file: a traceback at
start, or a small credential file's reload failing on the event loop)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mipsec.core.config import load_toml
from mipsec.core.control import ControlError, NotRunning, parse_request, parse_response
from mipsec.core.eap.usim import SqnPolicy, SqnStore, UsimStateError
from mipsec.core.errors import ConfigError
from mipsec.core.revocation import RevocationList, journal_path
from mipsec.plugins.cred_toml import load_credentials

DEEP = b"[" * 30000 + b"]" * 30000


def test_control_request_and_response() -> None:
    with pytest.raises(ControlError, match="request: not a JSON object"):
        parse_request(DEEP + b"\n")
    with pytest.raises(ControlError, match="request: not a JSON object"):
        parse_request(b'{"cmd": "status", "args": ' + DEEP + b"}\n")
    with pytest.raises(NotRunning, match="not JSON"):
        parse_response(DEEP + b"\n")


def test_revocation_snapshot_at_start_and_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "revoked.json"
    path.write_bytes(DEEP)
    with pytest.raises(ConfigError, match="is not a revocation list"):
        RevocationList(path, config_file="hac.toml")
    path.unlink()
    revoked = RevocationList(path)
    assert revoked.add("mallory@home.example")
    path.write_bytes(DEEP)  # replaced under it: the next lookup re-reads
    with caplog.at_level(logging.INFO, logger="mipsec.revocation"):
        assert "mallory@home.example" in revoked  # the list read before stays
    assert "is not a revocation list" in caplog.text


def test_revocation_journal_line(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    journal_path(path).write_bytes(DEEP + b"\n")
    with pytest.raises(ConfigError, match="line 1: not a revocation change"):
        RevocationList(path, config_file="hac.toml")


def test_usim_sqn_state_file(tmp_path: Path) -> None:
    path = tmp_path / "sqn.json"
    path.write_bytes(DEEP)
    with pytest.raises(UsimStateError, match="cannot read"):
        SqnStore(path, 0, SqnPolicy())


@pytest.mark.parametrize("value", ["[" * 30000 + "]" * 30000, "{b = " * 30000 + "1" + "}" * 30000])
def test_toml_configuration_and_credentials(tmp_path: Path, value: str) -> None:
    path = tmp_path / "hac.toml"
    path.write_text(f"a = {value}\n")
    with pytest.raises(ConfigError, match=r"hac\.toml: \(syntax\): nested too deep"):
        load_toml(path)
    creds = tmp_path / "credentials.toml"
    creds.write_text(f"a = {value}\n")
    with pytest.raises(ValueError, match="credentials.toml: nested too deep"):
        load_credentials(creds)
