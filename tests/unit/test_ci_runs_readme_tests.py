"""CI must run the test command that README.md gives (and nothing weaker)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"Run the tests \(after the setup above\):\s*```sh\n(.+?)\n```", text)
    assert m is not None, "README.md: no 'Run the tests' block"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    command = _readme_test_command()
    assert command.startswith(".venv/bin/python -m pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run README's test command {command!r}"
    # The suite runs in parallel workers; xdist must be one of the test extras.
    if " -n " in f" {command} ":
        assert '"pytest-xdist' in (ROOT / "pyproject.toml").read_text()
