"""TOML text from a file's octets (core/tomltext.py): one error, where and why."""

from __future__ import annotations

import pytest

from mipsec.core.tomltext import TomlTextError, parse_toml


def test_a_document() -> None:
    assert parse_toml(b'[hac]\nport = 7872\nname = "h\xc3\xa9"\n') == {
        "hac": {"port": 7872, "name": "hé"}
    }


@pytest.mark.parametrize(
    ("raw", "where", "reason"),
    [
        (b'name = "\xff"\n', "file", "not UTF-8 text"),
        (b"[hac\nport = 1\n", "syntax", "Expected ']'"),
        (b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "syntax", "nested too deep"),
    ],
)
def test_bad_input_says_where_and_why(raw: bytes, where: str, reason: str) -> None:
    with pytest.raises(TomlTextError) as info:
        parse_toml(raw)
    assert info.value.where == where and info.value.reason.startswith(reason), info.value.reason
