"""A small tmpfs for tests that need a full disk (root: mount)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` (e.g. "2m") at the existing directory
    ``where`` (mode 0700); the reason it cannot be (no root), or None.  The
    caller unmounts it (``umount -l``)."""
    try:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except FileNotFoundError:
        return "no mount command"
    if out.returncode != 0:
        return f"cannot mount a tmpfs (needs CAP_SYS_ADMIN): {out.stderr.strip()}"
    return None
