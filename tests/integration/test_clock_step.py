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
import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import LAUNCHER, Lab, debian_tool, edit_toml, wait_port

STEP = re.compile(r"WARNING mipsec\.(hac|ha): (HA ha1: )?wall clock stepped ([0-9.]+ \w+) (\w+)")


def _faketime(offset: Path) -> dict[str, str]:
    """The environment of a process whose wall clock runs ``offset``'s
    offset (rewritten by the test, "+0s" to begin), its monotonic clock true."""
    debian_tool("faketime", "faketime")
    (lib,) = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    offset.write_text("+0s\n")
    return dict(
        os.environ,
        LD_PRELOAD=lib,
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )


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
    offset = lab.dir / "faketime"
    env = _faketime(offset)
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


def _result(proc: subprocess.Popen[str], timeout: float) -> Any:
    """The MN's next JSON result line, or a failure after ``timeout`` s."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no bootstrap result within {timeout} s"
    return json.loads(proc.stdout.readline())


def _mn_under_faketime(lab: Lab, start_hac: Any) -> tuple[subprocess.Popen[str], Path, Path]:
    """The lab's HAC on the true time, and its MN daemon under libfaketime:
    the process, its offset file ("+0s" to begin) and its stderr's file."""
    offset = lab.dir / "faketime-mn"
    env = _faketime(offset)
    start_hac(lab)
    err_log = lab.dir / "mn.err"
    with err_log.open("w") as err:
        mn = subprocess.Popen(
            [*LAUNCHER, "--role", "mn", "--config", lab.info["mn"]["config"], "--json"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    return mn, offset, err_log


def _stopped(mn: subprocess.Popen[str], err_log: Path) -> tuple[str, list[str]]:
    """SIGTERM; the MN must exit 0.  Its log, and the lines saying its clock
    stepped 2 h ahead."""
    mn.send_signal(signal.SIGTERM)
    mn.wait(timeout=20)
    text = err_log.read_text()
    assert mn.returncode == 0, text[-2000:]
    return text, [line for line in text.splitlines() if "wall clock stepped 2.0 h ahead" in line]


def test_an_mn_holding_an_sa_through_a_step_says_so_and_goes_back_to_its_hac(
    lab: Lab, start_hac: Any
) -> None:
    """A real MN daemon under libfaketime, its HAC and HA on the true time.
    Its clock stepped 2 h ahead: by it, the 1-h SA it holds has ended, so it
    says so in one WARNING and bootstraps again at once (before: nothing
    said, and BUs under the SA until the re-bootstrap the old time had
    fixed, 48 min on).  The new SA looks short by the wrong clock (one
    WARNING, backed off) and is used: the MN stays registered.  Stepped
    back, it says so again and keeps its schedule."""
    mn, offset, err_log = _mn_under_faketime(lab, start_hac)
    try:
        first = _result(mn, 30)
        assert first["status"] == 200 and first["ba"]["status"] == 0, first
        offset.write_text("+2h\n")
        second = _result(mn, 10)  # at once, not in 48 min
        assert second["status"] == 200 and second["ba"]["status"] == 0, second
        assert second["sa"]["spi"] != first["sa"]["spi"]
        offset.write_text("+0s\n")
        end = time.monotonic() + 10
        while "stepped 2.0 h back" not in err_log.read_text() and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        text, ahead = _stopped(mn, err_log)
    back = [line for line in text.splitlines() if "wall clock stepped 2.0 h back" in line]
    assert len(ahead) == 1 and "WARNING" in ahead[0], text[-2000:]
    assert f"the SA (spi={first['sa']['spi']}) is near its end" in ahead[0]
    assert len(back) == 1 and "keeps its schedule" in back[0], text[-2000:]
    assert "under [sa] min_lifetime" in text  # the new SA, judged by the wrong clock
    assert "Traceback" not in text and "deregistered" in text


def test_an_mn_without_registration_cuts_its_wait_on_a_step_ahead(lab: Lab, start_hac: Any) -> None:
    """Registration off: the MN only holds its SA and bootstraps again at
    80 % of it (48 min for the lab's 1-h SA).  Its clock stepped 2 h ahead:
    by the corrected time the SA has ended, so the wait is cut -- one
    WARNING, and a new bootstrap within seconds.  Before, that wait ignored
    steps: a clock 2 h behind when a 3-h SA came left the MN an hour past
    its SA's end before it went back to its HAC (found in review)."""
    edit_toml(Path(lab.info["mn"]["config"]), "enabled = true\n", "enabled = false\n")
    mn, offset, err_log = _mn_under_faketime(lab, start_hac)
    try:
        first = _result(mn, 30)
        assert first["status"] == 200 and "ba" not in first, first
        end = time.monotonic() + 10  # its wait begun (the result is printed before)
        while "next bootstrap in" not in err_log.read_text() and time.monotonic() < end:
            time.sleep(0.05)
        offset.write_text("+2h\n")
        second = _result(mn, 10)  # at once, not in 48 min
        assert second["status"] == 200 and second["sa"]["spi"] != first["sa"]["spi"]
    finally:
        text, ahead = _stopped(mn, err_log)
    assert len(ahead) == 1 and "WARNING" in ahead[0], text[-2000:]
    assert "Traceback" not in text
