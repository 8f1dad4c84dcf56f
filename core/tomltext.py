"""TOML text from a file's octets, with one error type for what can go wrong.

The configuration loader (core/config.py) and the TOML credential backend
(plugins/cred_toml.py) read files an operator writes; both refuse the same
three things the same way, each in its own error type: octets that are not
UTF-8, TOML syntax, and nesting so deep that the parser recurses out
(``RecursionError``: arrays or tables thousands deep -- bad input, not a
crash).
"""

from __future__ import annotations

import tomllib
from typing import Any, Literal

__all__ = ["TomlTextError", "parse_toml"]


class TomlTextError(ValueError):
    """``where``: "file" (not UTF-8 text) or "syntax"; ``reason``: what is wrong."""

    def __init__(self, where: Literal["file", "syntax"], reason: str) -> None:
        super().__init__(reason)
        self.where = where
        self.reason = reason


def parse_toml(raw: bytes) -> dict[str, Any]:
    """The document ``raw`` holds; :class:`TomlTextError` naming why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TomlTextError("file", "not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TomlTextError("syntax", str(exc)) from None
    except RecursionError:  # arrays or tables nested thousands deep
        raise TomlTextError("syntax", "nested too deep") from None
