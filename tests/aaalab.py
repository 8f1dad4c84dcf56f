"""The real AAA lab (FreeRADIUS 3.2 on loopback): the session fixture ``aaa_lab``.

tests/conftest.py imports the fixture, so it is defined once for the whole
run (one lab per session, whichever test directory asks for it); a
``conftest.py`` in a sub-directory would shadow ``tests/conftest.py`` for
the ``from conftest import ...`` the other tests use.

``MIPSEC_AAA_LAB_ENV`` names the ``lab.env`` of a lab that is already
running (CI starts one for the whole run); otherwise the first test that
needs it starts one with ``../shared/aaa-lab/start-freeradius.sh`` (every
port 0) and the session stops it at the end.  In CI (``CI=true``) a lab that
cannot start is a failure; locally the tests skip only when the lab's
packages cannot be installed (not root, no apt-get, apt-get failing).

Under pytest-xdist (README's test command runs 4 workers) the workers share
one lab: the first to need it starts it under a file lock (so apt-get, when
the packages are missing, runs once and never in parallel with itself), the
others read its ``lab.env``, and the controller stops it when the whole run
ends (``stop_shared_lab``, called from tests/conftest.py).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAB_DIR = REPO.parent / "shared" / "aaa-lab"
LAB_SCRIPT = LAB_DIR / "start-freeradius.sh"
PACKAGES = ("freeradius", "freeradius-utils", "eapoltest", "openssl")


@dataclass(frozen=True)
class AaaLab:
    env: dict[str, str]

    @property
    def auth_port(self) -> int:
        return int(self.env["AUTH_PORT"])

    @property
    def acct_port(self) -> int:
        return int(self.env["ACCT_PORT"])

    @property
    def secret(self) -> str:
        return self.env["SECRET"]

    def server(self, **extra: object) -> dict[str, object]:
        return {"host": "127.0.0.1", "port": self.auth_port, "secret": self.secret, **extra}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _missing_packages() -> list[str]:
    missing = []
    for p in PACKAGES:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
        )
        if "install ok installed" not in out.stdout:
            missing.append(p)
    return missing


def _cannot_install() -> str | None:
    """Why the lab's packages cannot be installed here, or None."""
    if shutil.which("dpkg-query") is None:
        return "not a Debian system (no dpkg-query)"
    missing = _missing_packages()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"packages {' '.join(missing)} missing and not root"
    if shutil.which("apt-get") is None:
        return f"packages {' '.join(missing)} missing and no apt-get"
    return None


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"AAA lab unavailable in CI: {reason}")
    pytest.skip(f"AAA lab unavailable: {reason}")


START_ATTEMPTS = 3
SHARED = "aaa-lab-shared"  # under the run's base temp dir, above the workers' own


def _start_lab(d: Path) -> dict[str, str]:
    """Start the lab in ``d``; its ``lab.env`` contents (skip/fail when it cannot start)."""
    if not LAB_SCRIPT.is_file():
        _unavailable(f"{LAB_SCRIPT} not found")
    why = _cannot_install()
    if why is not None:
        _unavailable(why)
    env = dict(os.environ, AAA_LAB_AUTH_PORT="0", AAA_LAB_ACCT_PORT="0", AAA_LAB_AKA_PORT="0")
    # Up to three attempts, as .ci/run makes: the lab's hostapd has been seen
    # to exit during its start-up now and then, and started on a re-run.
    for attempt in range(1, START_ATTEMPTS + 1):
        out = subprocess.run(
            ["bash", str(LAB_SCRIPT), "start", str(d)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if out.returncode == 0:
            return _parse_env(out.stdout)
        if "apt-get failed" in out.stderr:
            if not in_ci():
                pytest.skip(f"AAA lab packages could not be installed: {out.stderr[-500:]}")
            break
        if attempt < START_ATTEMPTS:
            _stop_lab(d)
    pytest.fail(f"AAA lab did not start (exit {out.returncode}):\n{out.stderr[-2000:]}")


def _stop_lab(d: Path) -> None:
    subprocess.run(["bash", str(LAB_SCRIPT), "stop", str(d)], capture_output=True, timeout=120)


def _shared_lab(base: Path) -> AaaLab:
    """The lab of every xdist worker of this run, started by the first to ask."""
    d = base / SHARED
    d.mkdir(exist_ok=True)
    with (d / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        ready = d / "env"
        if ready.is_file():
            return AaaLab(_parse_env(ready.read_text()))
        lab = d / "lab"
        lab.mkdir(exist_ok=True)
        env = _start_lab(lab)
        ready.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        return AaaLab(env)


def stop_shared_lab(base: Path) -> None:
    """The controller's end of a parallel run: stop the workers' shared lab, if one started."""
    lab = base / SHARED / "lab"
    if (base / SHARED / "env").is_file():
        _stop_lab(lab)


@pytest.fixture(scope="session")
def aaa_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AaaLab]:
    given = os.environ.get("MIPSEC_AAA_LAB_ENV")
    if given:
        path = Path(given)
        if not path.is_file():
            pytest.fail(f"MIPSEC_AAA_LAB_ENV={given}: no such file")
        yield AaaLab(_parse_env(path.read_text()))
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The run's base temp dir is the parent of this worker's own.
        yield _shared_lab(tmp_path_factory.getbasetemp().parent)
        return
    d = tmp_path_factory.mktemp("aaa-lab")
    try:
        yield AaaLab(_start_lab(d))
    finally:
        _stop_lab(d)
