"""A directory a test's process may not write in, also as root.

Its own module (not ``conftest``): unit tests import it by name, and in a
whole-suite run ``conftest`` may name another directory's (tests/system)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def not_writable_dir(path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``path`` made, a directory this process may not create files in: mode
    0555, and as root, whom a mode does not stop, ``os.access`` says so."""
    path.mkdir()
    path.chmod(0o555)
    if os.access(path, os.W_OK):
        real = os.access

        def access(p: Any, mode: int, **kw: Any) -> bool:
            return False if Path(p) == path and mode & os.W_OK else real(p, mode, **kw)

        monkeypatch.setattr(os, "access", access)
    return path
