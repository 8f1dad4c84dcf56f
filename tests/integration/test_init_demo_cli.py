"""``mipsec init`` and ``mipsec demo`` as a user runs them: one-line errors
naming the option, the variable or the file, never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import mipsec

from mipsec.core import labsetup


def _one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


@pytest.mark.parametrize("command", [["demo"]])
def test_a_malformed_lab_port_range_is_one_line(tmp_path: Path, command: list[str]) -> None:
    """``MIPSEC_LAB_PORTS=abc`` ended both in a ValueError traceback."""
    args = [str(tmp_path / "lab") if a == "LAB" else a for a in command]
    out = mipsec(*args, env={**os.environ, labsetup.PORTS_ENV: "abc"})
    _one_line_error(out, labsetup.PORTS_ENV, "'abc'")
    assert not (tmp_path / "lab").exists()
