"""Every key of every file ``mipsec init`` writes, given a wrong value: the
launcher's ``check-config`` (what a start validates, short of sockets)
exits 2 with one line naming the file, the key and a reason -- never a
traceback, never a line that leaves the operator guessing which key is
wrong -- unless the value is one of the few a start knowingly accepts
(``acceptable``).

Run in-process through ``cli.main`` (the same code path as the command),
so that an unexpected exception fails the test with its traceback."""

from __future__ import annotations

import contextlib
import io
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Lab, make_lab

from mipsec.core import cli
from mipsec.core.netlab import toml_dump as dump

FILES = ("hac.toml", "ha.toml", "mn.toml", "mn-eap-tls.toml")


def _is_table(v: Any) -> bool:
    return isinstance(v, dict)


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def leaves(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if _is_table(data):
        for k, v in data.items():
            yield from leaves(v, (*path, k))
    elif _is_table_list(data):
        for i, v in enumerate(data):
            yield from leaves(v, (*path, i))
    else:
        yield path, data


def dotted(path: tuple[Any, ...]) -> str:
    """The key as errors name it: ``ha[0].options.host``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def wrong_values(value: Any) -> list[Any]:
    """Values of the wrong type, and of the right type but out of range."""
    if isinstance(value, bool):
        return ["yes", 2]
    # true for a number: pydantic's lax mode read it as 1 (found in review).
    if isinstance(value, int):
        return [-1, 10**12, "seven", True]
    if isinstance(value, float):
        return [-1.0, "soon", True]
    if isinstance(value, str):
        return ["", "\x01", 7, ["x"]]
    if isinstance(value, list):
        return [[], ["\x01"], [7], "x"]
    return [7]


def with_value(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    copy = tomllib.loads(dump(data))
    node: Any = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return copy


def acceptable(path: tuple[Any, ...], bad: Any) -> bool:
    """The wrong values a start may accept, knowingly: pydantic's spellings
    of a boolean ("yes" is true), and any octet but NUL and "/" in a file
    name (POSIX allows them).  Every other value the sweep tries must be
    refused -- a number for an address, an empty listen list or method
    list, a host name or an HA id or an NAI with a control character, a
    plugin option, ... (each was accepted before this test)."""
    if bad == "yes":
        return True
    return bad == "\x01" and str(path[-1]) in ("path", "key_file")


def check_config(path: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(["check-config", str(path)])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


def cases(lab_dir: Path) -> Iterator[tuple[str, tuple[Any, ...], Any]]:
    for name in FILES:
        data = tomllib.loads((lab_dir / name).read_text())
        for path, value in leaves(data):
            for bad in wrong_values(value):
                yield name, path, bad


@pytest.fixture(scope="module")
def lab_once(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return make_lab(tmp_path_factory.mktemp("sweep") / "lab")


def test_every_key_with_a_wrong_value_is_named(lab_once: Lab) -> None:
    lab_dir = lab_once.dir
    for name in FILES:  # the files as written pass, and through dump() too
        original = tomllib.loads((lab_dir / name).read_text())
        probe = lab_dir / f"sweep-{name}"
        probe.write_text(dump(original))
        probe.chmod(0o600)
        assert check_config(probe) == (0, ""), name
    problems: list[str] = []
    tried = named = 0
    for name, path, bad in cases(lab_dir):
        original = tomllib.loads((lab_dir / name).read_text())
        probe = lab_dir / f"sweep-{name}"
        probe.write_text(dump(with_value(original, path, bad)))
        probe.chmod(0o600)
        code, err = check_config(probe)
        tried += 1
        key = dotted(path)
        if code == 0:
            if not acceptable(path, bad):
                problems.append(f"{name} {key} = {bad!r}: accepted")
            continue
        lines = err.strip().splitlines()
        # The error names the key itself or, for a key inside a plugin's
        # options or a value that only fails together with its table, a
        # parent of it: never none.
        parents = [dotted(path[:i]) for i in range(len(path), 0, -1)]
        ok = (
            code == 2
            and len(lines) == 1
            and str(probe) in lines[0]
            and "Traceback" not in err
            and any(
                re.search(rf"(^|[\s:(']){re.escape(p)}([\s:.\[)']|$)", lines[0]) for p in parents
            )
        )
        if ok:
            named += 1
        else:
            problems.append(f"{name} {key} = {bad!r}: exit {code}: {err.strip()[:300]}")
    assert not problems, f"{len(problems)} of {tried}:\n" + "\n".join(problems)
    assert named > 100  # the sweep did refuse values, and named them
