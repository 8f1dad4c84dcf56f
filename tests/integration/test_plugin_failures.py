"""Broken or clashing third-party plugins (core/pluginmanager.py), as an
operator meets them through the launcher: one line naming the plugin, the
hook or the configuration key, exit 2 -- never a traceback (found in review:
a registry hook or a factory raising anything but ValueError gave one at
every start and even at ``mipsec --help``; a distribution reusing a
built-in's entry-point name silently took its place or was skipped).

Each plugin is a module plus a ``.dist-info`` directory on PYTHONPATH: what
``importlib.metadata`` finds for an installed distribution.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Lab, edit_toml, mipsec


def _plugin(site: Path, dist: str, entry: str, module: str, code: str) -> dict[str, str]:
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(code)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[mipsec]\n{entry} = {module}\n")
    return dict(os.environ, PYTHONPATH=str(site))


RAISING_REGISTRY = """
from mipsec.core.hookspecs import hookimpl

@hookimpl
def mipsec_credential_backends():
    raise RuntimeError("secret-in-message")

@hookimpl
def mipsec_cli_commands():
    raise RuntimeError("secret-in-message")
"""

RAISING_FACTORY = """
from mipsec.core.hookspecs import hookimpl

class Factory:
    name = "broken"

    def create(self, options, ctx):
        return options["secret-in-message"]  # KeyError: a plugin's own bug

@hookimpl
def mipsec_credential_backends():
    return [Factory()]
"""


def _one_line_error(out: object, *needles: str) -> None:
    stderr = getattr(out, "stderr", "")
    assert getattr(out, "returncode", None) == 2, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "secret-in-message" not in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr


def test_a_raising_registry_hook_is_one_line_naming_the_plugin(tmp_path: Path) -> None:
    env = _plugin(tmp_path / "site", "rvbad", "rvbad", "rvbad_mod", RAISING_REGISTRY)
    _one_line_error(mipsec("plugins", env=env), "'rvbad'", "failed", "RuntimeError")
    out = mipsec("--help", env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert out.stdout.startswith("usage:") and "unavailable" in out.stdout


def test_a_factory_bug_names_the_key_and_the_plugin(lab: Lab, tmp_path: Path) -> None:
    env = _plugin(tmp_path / "site", "rvfact", "rvfact", "rvfact_mod", RAISING_FACTORY)
    edit_toml(
        Path(lab.info["hac"]["config"]),
        'backend = "toml"\npath = "credentials.toml"',
        'backend = "broken"',
    )
    out = mipsec("check-config", lab.info["hac"]["config"], env=env)
    _one_line_error(out, "credentials", "'broken'", "KeyError")


def test_an_entry_point_reusing_a_builtin_name_is_refused(tmp_path: Path) -> None:
    env = _plugin(tmp_path / "site", "rvshadow", "psk", "rvshadow_mod", "")
    _one_line_error(mipsec("plugins", env=env), "'psk'", "rvshadow_mod", "two entry points")
