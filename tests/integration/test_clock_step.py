"""A running HAC's and HA's wall clock steps (NTP after a boot with a wrong
clock, ``date -s``, a suspended host): each says so in one WARNING line.

Real processes of a lab made by ``mipsec init``, with libfaketime preloaded
and reading its offset from a file (``FAKETIME_TIMESTAMP_FILE``) that the
test rewrites while they run; the monotonic clock stays true, as in a real
step.  Before, nothing was said: SA validity ends are wall-clock dates, so a
step of hours made every live SA end at once -- 100,000 ``sa_expired`` lines
from a HAC holding 100,000 SAs -- with no line saying why.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import LAUNCHER, Lab, debian_tool, edit_toml, wait_port

STEP = re.compile(r"WARNING mipsec\.(hac|ha): (HA ha1: )?wall clock stepped ([0-9.]+ \w+) (\w+)")


def _start(lab: Lab, role: str, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*LAUNCHER, "--role", role, "--config", lab.info[role]["config"]],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    port = int(lab.info["ha"]["port"]) if role == "ha" else lab.hac_port
    wait_port(port, proc)
    return proc


def _steps(logs: list[Path], want: int, deadline: float = 15.0) -> list[tuple[str, str, str]]:
    end = time.monotonic() + deadline
    while True:
        found = [
            (m.group(1), m.group(3), m.group(4))
            for log in logs
            for m in STEP.finditer(log.read_text())
        ]
        if len(found) >= want or time.monotonic() > end:
            return found
        time.sleep(0.2)


def test_a_wall_clock_step_is_said_once_by_the_hac_and_by_the_ha(lab: Lab) -> None:
    debian_tool("faketime", "faketime")
    (lib,) = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    offset = lab.dir / "faketime"
    offset.write_text("+0s\n")
    env = dict(
        os.environ,
        LD_PRELOAD=lib,
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    hac_toml = Path(lab.info["hac"]["config"])
    edit_toml(hac_toml, "[hac]\n", "[hac]\nexpiry_interval = 1\n")
    logs = [lab.dir / "ha.log", lab.dir / "hac.log"]
    procs = [_start(lab, "ha", env, logs[0]), _start(lab, "hac", env, logs[1])]
    try:
        time.sleep(2.5)  # a few timer runs at the true time: nothing to say
        assert _steps(logs, 0, deadline=0) == []
        offset.write_text("+2h\n")
        ahead = _steps(logs, 2)
        offset.write_text("-1h\n")
        back = _steps(logs, 4)
        time.sleep(2.5)  # and no more lines after them
        final = _steps(logs, 5, deadline=0)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=20) for p in procs]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert sorted(ahead) == [("ha", "2.0 h", "ahead"), ("hac", "2.0 h", "ahead")], ahead
    assert sorted(set(back) - set(ahead)) == [("ha", "3.0 h", "back"), ("hac", "3.0 h", "back")]
    assert len(final) == 4, final
    text = logs[1].read_text()
    assert "every live SA now ends 2.0 h sooner" in text and "Traceback" not in text
