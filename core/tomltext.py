"""TOML text from a file's octets, with one error type for what can go wrong;
and TOML values written out (``toml_value``).

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

__all__ = ["TomlTextError", "parse_toml", "toml_value"]


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


_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _basic_string(v: str) -> str:
    """A TOML basic string of ASCII only: quote, backslash, control and
    non-ASCII characters escaped (``\\uXXXX``, ``\\UXXXXXXXX`` above the BMP:
    a JSON string's surrogate pairs are no TOML).  ``ValueError`` for a lone
    surrogate (a file name that is not UTF-8): no TOML string holds it."""
    out = ['"']
    for ch in v:
        code = ord(ch)
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{v!r}: not UTF-8 text (TOML holds only Unicode)")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def toml_value(v: Any) -> str:
    """``v`` (a bool, number, string or list of them) as TOML text; a string
    reads back exactly as written, whatever it holds (``_basic_string``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _basic_string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
