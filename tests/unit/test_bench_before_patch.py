"""bench/tools/before_patch.py: the earlier bench gets exactly the current bench's in-process HA."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


before_patch = _load("before_patch", ROOT / "bench" / "tools" / "before_patch.py")

# bench/bootstrap.py's _local_provisioning as it was before issue 6 (6012946):
# no HA in the process.
EARLIER = '''
def _local_provisioning(text: str) -> str:
    """hac.toml with every HA on the in-process ``local`` transport.

    The HAC then confirms each SA without a network round trip.
    """
    text = re.sub(r'(?m)^(transport\\s*=\\s*)"[^"]*"', r'\\1"local"', text)
    # The [ha.options] table belongs to the network transport: drop it.
    return re.sub(r"(?ms)^\\[ha\\.options\\][^\\[]*", "", text)


def make_lab() -> None:
    return None
'''

HAC_TOML = '[[ha]]\nid = "ha1"\ntransport = "tls"\n\n[ha.options]\nport = 1\n'


def _run(src: str) -> str:
    ns: dict[str, object] = {}
    exec(compile("import re\n" + src, "<bench>", "exec"), ns)  # noqa: S102 (test input)
    fn = ns["_local_provisioning"]
    assert callable(fn)
    out = fn(HAC_TOML)
    assert isinstance(out, str)
    return out


def test_patch_adds_the_same_in_process_ha_as_the_current_bench() -> None:
    patched = before_patch.patch(EARLIER)
    ast.parse(patched)
    assert "def make_lab" in patched  # the rest of the file is kept
    cfg = tomllib.loads(_run(patched))
    assert cfg["ha"] == [{"id": "ha1", "transport": "local"}]
    assert cfg["local_ha"] == {
        "ha": {"id": "ha1", "listen": ["127.0.0.1"], "port": 0},
        "sa_store": {"backend": "memory"},
    }
    # The current bench writes the same tables (the comparison is like for like).
    bench = _load("bench_bootstrap", ROOT / "bench" / "bootstrap.py")
    assert tomllib.loads(bench._local_provisioning(HAC_TOML))["local_ha"] == cfg["local_ha"]
    current = (ROOT / "bench" / "bootstrap.py").read_text()
    assert before_patch.patch(patched) == patched  # idempotent
    assert before_patch.patch(current) == current  # already has one


def test_patch_refuses_a_bench_without_local_provisioning(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="_local_provisioning"):
        before_patch.patch("def other() -> None:\n    return None\n")
    f = tmp_path / "bootstrap.py"
    f.write_text("x = 1\n")
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tools" / "before_patch.py"), str(f)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "no _local_provisioning()" in r.stderr
    assert f.read_text() == "x = 1\n"
