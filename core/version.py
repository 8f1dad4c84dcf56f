"""The installed package's version, from its metadata (``mipsec --version``, status)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version


def version() -> str:
    try:
        return _dist_version("mipsec")
    except PackageNotFoundError:  # pragma: no cover - imported from a bare source tree
        return "unknown"
