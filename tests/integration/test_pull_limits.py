"""The HA's ``[pull]`` limits on a real HA process (``mipsec init``'s lab):
a raised ``rate`` lets more unknown SPIs be pulled a second than the
defaults, a reload lowering it applies from the next packet, ``mipsec
status`` shows the limits in force, and adding or removing the whole
``[pull]`` table still needs a restart.

Measured by the HA's counters, never by how fast anything went: a bound
such as "at most 25 + 20 a second of the time the packets took" is a count
against the most the default limits could have let through meanwhile.

The HAC's pull port is left closed: each pull the gate starts fails at
once (``pulls`` and ``pulls_refused``), costing no TLS handshake anywhere,
and what is counted is how many the gate starts -- the HAC's cost.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LAUNCHER, Lab, free_port, mipsec, wait_port

DEFAULTS = {"rate": 20.0, "burst": 50, "max_in_flight": 16, "source_rate": 5.0, "source_burst": 10}


class Ha:
    """The lab's HA as a process, its output in a file."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.cfg = Path(lab.info["ha"]["config"])
        self.port = int(lab.info["ha"]["port"])
        self.log = lab.dir / "ha.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sent = 0  # made-up SPIs sent so far (each a new one)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*LAUNCHER, "--role", "ha", "--config", str(self.cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.port, self.proc)
        ctl = self.lab.dir / "ha.ctl"
        deadline = time.monotonic() + 10
        while not ctl.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=20) == 0
        self.proc = None

    def status(self) -> dict[str, Any]:
        out = mipsec("status", "--config", str(self.cfg), "--json", timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def counters(self) -> dict[str, Any]:
        return self.status()["counters"]  # type: ignore[no-any-return]

    def reload(self) -> subprocess.CompletedProcess[str]:
        return mipsec("reload", "--config", str(self.cfg), timeout=30)

    def set_pull(self, table: str | None) -> None:
        """The config file with ``table`` as its [pull] (None: without one)."""
        text = self.cfg.read_text().split("\n[pull]\n")[0].rstrip("\n") + "\n"
        self.cfg.write_text(text if table is None else f"{text}\n[pull]\n{table}")

    def flood(self, count: int, gap: float = 0.0) -> tuple[dict[str, Any], float]:
        """``count`` packets under made-up SPIs never sent before, ``gap``
        seconds apart; the counters once the HA has read them all and no
        pull is in flight, and the seconds from the first send to then
        (an upper bound on the time the gate refilled in)."""
        before = self.counters()
        t0 = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(count):
                self.sent += 1
                spi = (8 << 28) | self.sent
                s.sendto(spi.to_bytes(4, "big") + bytes(60), ("127.0.0.1", self.port))
                if gap:
                    time.sleep(gap)
        deadline = time.monotonic() + 30
        while True:
            now = self.counters()
            if now["packets"] - before["packets"] >= count and not now["pulls_in_flight"]:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        took = time.monotonic() - t0
        delta = {k: now[k] - before[k] for k in ("packets", "pulls", "pulls_deferred")}
        delta["pulls_limited"] = now["pulls_limited"] - before["pulls_limited"]
        delta["pull_sightings"] = now["pull_sightings"]
        return delta, took

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def ha(lab: Lab) -> Iterator[Ha]:
    h = Ha(lab)
    yield h
    h.close()


def pull_table(lab: Lab, port: int, limits: str = "") -> str:
    """[pull] toward ``port`` (nothing listens there), with ``limits``."""
    return (
        f'host = "127.0.0.1"\nport = {port}\nserver_name = "hac.mipsec.test"\n'
        f'ca = "pki/ca.pem"\ncert = "pki/ha.pem"\nkey = "pki/ha.key"\n{limits}'
    )


def test_a_raised_pull_rate_pulls_more_and_a_lowered_one_applies_at_a_reload(
    lab: Lab, ha: Ha
) -> None:
    closed = free_port()
    ha.set_pull(pull_table(lab, closed))
    ha.start()
    assert ha.counters()["pull_limits"] == DEFAULTS

    # The defaults: 400 new SPIs over a second or more.  First sightings
    # are pulled from the half of the burst above the reserve (25), then at
    # 20 a second; the rest are deferred (each is sent once: never pulled).
    got, took = ha.flood(400, gap=0.0025)
    assert got["packets"] == 400 and got["pulls"] + got["pulls_deferred"] == 400, got
    assert 1 <= got["pulls"] <= 25 + 20 * took + 1, (got, took)
    default_pulls, default_took = got["pulls"], took

    # A reload raises them (an HA recovering its MNs after losing its store).
    ha.set_pull(pull_table(lab, closed, "rate = 5000\nburst = 1000\nmax_in_flight = 256\n"))
    out = ha.reload()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": pull.burst, pull.max_in_flight, pull.rate"), out.stdout
    raised = {**DEFAULTS, "rate": 5000.0, "burst": 1000, "max_in_flight": 256}
    assert ha.counters()["pull_limits"] == raised
    time.sleep(0.3)  # the bucket refills at the new rate: 1,000 tokens in 0.2 s
    # The same again: pulled at their first sighting -- more than the
    # defaults let through in the same time, or did above.  (Not all of
    # them on a busy machine: each pull costs the HA's loop its TLS context
    # and connect, and past half of max_in_flight first sightings wait.)
    got, took = ha.flood(400, gap=0.0025)
    assert got["packets"] == 400 and got["pulls"] + got["pulls_deferred"] == 400, got
    assert got["pulls"] > 25 + 20 * took + 1, (got, took)
    assert got["pulls"] / took > default_pulls / default_took, (got, took, default_pulls)

    # A reload lowers them: the tokens held to the new burst, the sightings
    # (the deferred SPIs above) kept.
    sightings = ha.counters()["pull_sightings"]
    assert sightings > 0
    ha.set_pull(
        pull_table(
            lab,
            closed,
            "rate = 1\nburst = 4\nmax_in_flight = 2\nsource_rate = 1\nsource_burst = 2\n",
        )
    )
    out = ha.reload()
    assert out.returncode == 0, out.stderr
    lowered = {"rate": 1.0, "burst": 4, "max_in_flight": 2, "source_rate": 1.0, "source_burst": 2}
    st = ha.counters()
    assert st["pull_limits"] == lowered and st["pull_sightings"] == sightings, st
    got, took = ha.flood(200)
    # 2 above the reserve (half of 4), then 1 a second.
    assert got["pulls"] + got["pulls_deferred"] == 200, got
    assert got["pulls"] <= 2 + 1 * took + 1, (got, took)
    log = ha.log.read_text()
    assert (
        "ha pull limits from now on: 1 a second, bursts of 4, 2 at once; per source 1 a "
        "second, bursts of 2 (sightings kept): pull.burst, pull.max_in_flight, pull.rate, "
        "pull.source_burst, pull.source_rate"
    ) in log, log
    assert "ha pull limits from now on: 5000 a second, bursts of 1000, 256 at once" in log
    assert "ha pulls from" not in log  # where it pulls from did not change

    # Removing [pull] still needs a restart: refused, the limits stay.
    ha.set_pull(None)
    out = ha.reload()
    assert out.returncode == 1 and "pull: changes only with a restart" in out.stderr, out
    assert ha.counters()["pull_limits"] == lowered
    assert ha.proc is not None and ha.proc.poll() is None
    assert "Traceback" not in ha.log.read_text()
    ha.stop()


def test_adding_pull_at_a_reload_needs_a_restart(lab: Lab, ha: Ha) -> None:
    """An HA started without [pull] (the lab's) shows the default limits;
    a reload adding [pull] is refused as before (the table decides what the
    binding cache must keep), a restart takes it with its limits."""
    ha.start()
    st = ha.status()
    assert st["provisioning"]["pull"] is False and st["counters"]["pull_limits"] == DEFAULTS
    ha.set_pull(pull_table(lab, free_port(), "rate = 500\nburst = 1000\n"))
    out = ha.reload()
    assert out.returncode == 1 and "pull: changes only with a restart" in out.stderr, out
    assert ha.counters()["pull_limits"] == DEFAULTS
    ha.stop()
    ha.start()
    st = ha.status()
    assert st["provisioning"]["pull"] is True
    assert st["counters"]["pull_limits"] == {**DEFAULTS, "rate": 500.0, "burst": 1000}
    ha.stop()
