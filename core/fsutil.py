"""Small filesystem helpers shared by the stores."""

from __future__ import annotations

import os
from pathlib import Path


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (it will hold keys)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # independent of the process umask
    finally:
        os.close(fd)
