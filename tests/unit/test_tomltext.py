"""TOML text from a file's octets (core/tomltext.py): one error, where and why; TOML
values written out."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.tomltext import TomlTextError, parse_toml, toml_value


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


@pytest.mark.parametrize(
    "value", ["plain", 'q"uote', "back\\slash", "new\nline\ttab\x00\x1f\x7f", "é€😀", ""]
)
def test_a_string_written_reads_back_as_written(value: str) -> None:
    """What ``mipsec init`` writes paths and hosts with (core/labsetup.py)."""
    assert tomllib.loads(f"k = {toml_value(value)}\n") == {"k": value}
    assert tomllib.loads(f"k = {toml_value([value, 1, True])}\n") == {"k": [value, 1, True]}


def test_a_string_toml_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        toml_value("name\udcff")  # a file name that is not UTF-8 (surrogateescape)


@given(st.text(st.characters(exclude_categories=("Cs",))))
def test_any_text_reads_back(value: str) -> None:
    text = toml_value(value)
    assert text.isascii() and tomllib.loads(f"k = {text}\n") == {"k": value}
