"""Option validation and file paths for plugin factories (built-in and core).

Factories receive the plain mapping of a TOML table; core/hookspecs.py asks
them to raise ``ValueError`` naming the key, which the loader turns into a
``ConfigError`` carrying the configuration file name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

_KEY = re.compile(r"[A-Za-z0-9_-]+")


def error_text(exc: ValidationError, prefix: str = "") -> str:
    """``key: reason`` for each pydantic error, without the offending value
    (an option may be a secret, e.g. a passphrase).  ``prefix`` is prepended
    to every key (``mn[2]`` gives ``mn[2].psk_hex: ...``)."""
    parts: list[str] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = prefix
        for item in err["loc"]:
            if isinstance(item, int):
                loc += f"[{item}]"
            elif _KEY.fullmatch(item):
                loc += f".{item}" if loc else item
            # else: a union-branch tag such as "lax-or-strict[...]": not a key
        msg = str(err["msg"]).removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        # A model-level check has no location: its message names the keys itself.
        text = f"{loc}: {msg}" if loc else msg
        if text not in parts:
            parts.append(text)
    return "; ".join(parts)


BOOL_FOR_NUMBER = "a boolean (true/false) where a number or a text is expected"


def takes_bool(annotation: Any) -> bool:
    """Whether a field's type admits a TOML ``true``/``false``.

    pydantic's lax mode reads true as 1 and false as 0, so `port = true` or
    `max_scope = false` passed check-config (found in review); the
    configuration models and ``parse_options`` refuse a boolean where the
    type has no ``bool`` in it."""
    if annotation is bool or annotation is Any:
        return True
    return any(takes_bool(a) for a in get_args(annotation) if not isinstance(a, int | str))


def parse_options(model: type[M], options: Mapping[str, Any]) -> M:
    """Validate ``options`` against ``model`` or raise ``ValueError("key: reason")``."""
    for key, value in options.items():
        field = model.model_fields.get(key) if isinstance(value, bool) else None
        if field is not None and not takes_bool(field.annotation):
            raise ValueError(f"{key}: {BOOL_FOR_NUMBER}")
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ValueError(error_text(exc)) from None


def resolve_path(path: str, base_dir: Path) -> Path:
    """Relative paths resolve against the configuration file's directory."""
    p = Path(path)
    return p if p.is_absolute() else base_dir / p
