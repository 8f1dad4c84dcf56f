from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aaalab import (
    aaa_lab,  # noqa: F401  (the real AAA lab, a session fixture: tests/aaalab.py)
    in_ci,
    stop_shared_lab,
)
from hypothesis import HealthCheck, settings

from mipsec.core import labsetup
from mipsec.core.labsetup import port_open

LAUNCHER = [sys.executable, "-m", "mipsec.core.cli"]

# Tests assert no wall-clock times: hypothesis's per-example deadline and its
# "too slow" health check are timings, and the suite runs its tests in
# parallel workers (README), so a loaded machine would fail them at random.
settings.register_profile("mipsec", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mipsec")


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker draws lab ports from a slice of its own
    (``MIPSEC_LAB_PORTS``, inherited by the processes it starts): two workers
    that each found a port free could otherwise both take it, and one's MN
    would talk to the other's HAC."""
    info = getattr(config, "workerinput", None)
    if info is None or labsetup.PORTS_ENV in os.environ:
        return
    index, count = int(info["workerid"].removeprefix("gw")), int(info["workercount"])
    low, high = labsetup.lab_port_range()
    width = (high - low + 1) // count
    os.environ[labsetup.PORTS_ENV] = f"{low + index * width}-{low + (index + 1) * width - 1}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The xdist controller (not a worker) stops the lab its workers shared."""
    if hasattr(session.config, "workerinput"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and os.environ.get("MIPSEC_AAA_LAB_ENV") is None:
        stop_shared_lab(factory.getbasetemp())


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP (the HA uses one number for both),
    below the kernel's ephemeral range (core/labsetup.py says why)."""
    return labsetup.free_port(kind)


def mipsec(
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAUNCHER, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@dataclass
class Lab:
    dir: Path
    info: dict[str, Any]

    @property
    def psk(self) -> bytes:
        return bytes.fromhex(self.info["mn"]["psk_hex"])

    @property
    def hac_port(self) -> int:
        return int(self.info["hac"]["port"])


def make_lab(tmp: Path) -> Lab:
    out = mipsec(
        "init",
        str(tmp),
        "--hac-port",
        str(free_port()),
        "--ha-port",
        str(free_port(socket.SOCK_DGRAM)),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    # The metrics ports were drawn by the init process, and are bound only
    # when the roles start: this process must not hand them out meanwhile
    # (a second HA's metrics port once took a lab HAC's, in CI).
    labsetup.taken_elsewhere(
        int(info[role]["metrics"].rsplit(":", 1)[1].split("/")[0])
        for role in ("hac", "ha")
        if info.get(role, {}).get("metrics")
    )
    return Lab(tmp, info)


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.communicate()}")
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.05)
    raise RuntimeError("port never opened")


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return make_lab(tmp_path / "lab")


def edit_toml(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def start_hac() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(
        lab: Lab, env: dict[str, str] | None = None, with_ha: bool = True
    ) -> subprocess.Popen[str]:
        """Start the lab's HA (it confirms the SAs the HAC provisions), then the HAC."""
        if with_ha and not any(getattr(p, "mipsec_role", "") == "ha" for p in procs):
            ha = subprocess.Popen(
                [*LAUNCHER, "--role", "ha", "--config", lab.info["ha"]["config"]],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env or dict(os.environ),
            )
            ha.mipsec_role = "ha"  # type: ignore[attr-defined]
            procs.append(ha)
            wait_port(int(lab.info["ha"]["port"]), ha)
        p = subprocess.Popen(
            [*LAUNCHER, "--role", "hac", "--config", lab.info["hac"]["config"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or dict(os.environ),
        )
        procs.append(p)
        wait_port(lab.hac_port, p)
        return p

    yield start
    for p in procs:
        p.terminate()
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (a bench's temp dir: all stopped?)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian ``package`` when it is
    missing and we are root; a failure in CI, a skip only locally."""
    import shutil

    found = shutil.which(command)
    if found is not None:
        return found
    reason = f"{command} missing and cannot be installed (needs root and apt-get)"
    if os.geteuid() == 0 and shutil.which("apt-get") is not None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
            subprocess.run(cmd, env=env, capture_output=True, timeout=400)
        found = shutil.which(command)
        if found is not None:
            return found
        reason = f"apt-get could not install {package}"
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)
