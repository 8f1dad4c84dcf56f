"""``port_open``: readiness polling that can never connect a socket to itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mipsec.core import labsetup
from mipsec.core.errors import ConfigError
from mipsec.core.labsetup import port_open

REAL_CLAIMS_DIR = labsetup._claims_dir


@pytest.fixture(autouse=True)
def claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test claims its drawn ports in a directory of its own: the
    fixed ranges below are drawn again by every run (claims last CLAIM_S)."""
    where = tmp_path / "claims"
    where.mkdir(mode=0o700)
    monkeypatch.setattr(labsetup, "_claims_dir", lambda: where)
    return where


def test_open_only_while_something_listens() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert port_open("127.0.0.1", port)
    assert not port_open("127.0.0.1", port)


def test_never_connects_to_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race found in a full-suite run: polling a lab port (ephemeral range)
    before its role listened drew that port as the source port, connected to
    itself, and the role then failed to bind it.  Forced here: the source port
    drawn is the target port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    real = socket.socket

    class SamePort(real):  # type: ignore[misc,valid-type]
        def bind(self, address: object) -> None:
            super().bind(("127.0.0.1", port))

    monkeypatch.setattr(labsetup.socket, "socket", SamePort)
    # A plain connect from that source port to itself would succeed (TCP
    # simultaneous open on Linux); port_open refuses to try it.
    assert not port_open("127.0.0.1", port)


def test_lab_ports_come_from_below_the_ephemeral_range() -> None:
    """A lab port is never one the kernel hands out on its own (a bind to 0,
    the source port of an outgoing connection), so nothing takes it between
    its choice and the role's bind; successive ports differ, and each is
    free for TCP and UDP."""
    low = labsetup._ephemeral_low()
    ports = [labsetup.free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(labsetup._LAB_PORTS_LOW <= p < low for p in ports)
    for p in ports[:5]:
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", p))
            u.bind(("127.0.0.1", p))
    with socket.socket() as s:  # what the kernel draws is in the ephemeral range
        s.bind(("127.0.0.1", 0))
        assert s.getsockname()[1] >= low


def test_lab_ports_from_the_kernel_when_no_room_below(monkeypatch: pytest.MonkeyPatch) -> None:
    real_low = labsetup._ephemeral_low()
    monkeypatch.delenv(labsetup.PORTS_ENV, raising=False)  # a test worker's own slice
    monkeypatch.setattr(labsetup, "_ephemeral_low", lambda: labsetup._LAB_PORTS_LOW + 10)
    assert labsetup.free_port() >= real_low  # drawn by the kernel (bind to 0)


def test_lab_ports_from_the_range_a_process_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel drawers (test workers) each given a range of their own never
    draw the same port, however many they draw."""
    monkeypatch.setenv(labsetup.PORTS_ENV, "21000-22999")
    ports = {labsetup.free_port() for _ in range(60)}
    assert all(21000 <= p <= 22999 for p in ports) and len(ports) == 60


@pytest.mark.parametrize("text", ["", "21000", "22000-21000", "80-2000", "2000-70000", "a-b"])
def test_a_malformed_lab_port_range_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """A ConfigError naming the variable: ``mipsec init`` and ``mipsec demo``
    print it on one line and exit 2 (a traceback before)."""
    monkeypatch.setenv(labsetup.PORTS_ENV, text)
    with pytest.raises(ConfigError, match=f"^\\(environment\\): {labsetup.PORTS_ENV}: .*LOW-HIGH"):
        labsetup.free_port()


@pytest.mark.parametrize("width", [1, 4, 200, 1000])
def test_a_small_lab_port_range_is_honoured(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """Every port comes from the range given, however narrow (at 1,000 ports
    or fewer it was ignored, and ports came from the kernel: a parallel
    drawer's range); each once, then a ConfigError naming the variable."""
    low = 46000
    monkeypatch.setenv(labsetup.PORTS_ENV, f"{low}-{low + width - 1}")
    monkeypatch.setattr(labsetup, "_RECENT", [])
    count = min(width, 4)
    ports = [labsetup.free_port() for _ in range(count)]
    assert len(set(ports)) == count and all(low <= p < low + width for p in ports)
    if width <= 4:
        with pytest.raises(ConfigError, match=f"{labsetup.PORTS_ENV}: no port free .* {low}-"):
            labsetup.free_port()


def test_each_test_worker_has_a_slice_of_its_own(request: pytest.FixtureRequest) -> None:
    """tests/conftest.py gives each xdist worker a disjoint slice; in a run
    without workers nothing is set and the default range applies."""
    info = getattr(request.config, "workerinput", None)
    if info is None:
        pytest.skip("run without xdist workers: no slices to check")
    low, high = labsetup.lab_port_range()
    index, count = int(info["workerid"][2:]), int(info["workercount"])
    width = high - low + 1
    base = labsetup._LAB_PORTS_LOW + index * width
    assert (low, high) == (base, base + width - 1)
    assert high < labsetup._LAB_PORTS_LOW + count * width <= labsetup._ephemeral_low()


def test_ports_taken_elsewhere_are_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # mipsec init, run as a command, draws the lab's metrics ports itself;
    # the test process must not draw one of them before the roles bind them.
    monkeypatch.setenv(labsetup.PORTS_ENV, "41000-42000")
    monkeypatch.setattr(labsetup, "_RECENT", [])
    draws = iter([41500, 41500, 41501])
    monkeypatch.setattr(labsetup.secrets, "choice", lambda _r: next(draws))
    labsetup.taken_elsewhere([41500])
    assert labsetup.free_port() == 41501


def test_a_port_another_process_drew_is_not_drawn_until_its_claim_is_stale(
    monkeypatch: pytest.MonkeyPatch, claims: Path
) -> None:
    """Every process draws with its own ``_RECENT``: a port another process
    drew and has not bound yet looked free (a bench's second ``mipsec init``
    drew the first lab's metrics port; its HAC then failed with "Address
    already in use", in CI).  The claim is a file: another process's draw of
    the one port of a range leaves none for this one, until the claim is
    ``CLAIM_S`` old."""
    monkeypatch.setenv(labsetup.PORTS_ENV, "46100-46100")
    monkeypatch.setattr(labsetup, "_RECENT", [])
    code = (
        "from pathlib import Path\n"
        "from mipsec.core import labsetup\n"
        f"labsetup._claims_dir = lambda: Path({str(claims)!r})\n"
        "print(labsetup.free_port())\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert other.stdout.strip() == "46100"
    with pytest.raises(ConfigError, match="no port free"):
        labsetup.free_port()
    old = time.time() - labsetup.CLAIM_S - 1
    os.utime(claims / "46100", (old, old))
    assert labsetup.free_port() == 46100  # a stale claim is taken over


def test_claims_are_kept_only_in_a_directory_of_this_users_alone(tmp_path: Path) -> None:
    """/tmp is shared: a claims directory another user could write (or a
    symlink planted there) is not used -- ports are drawn unclaimed, as
    before claims existed."""
    target = tmp_path / f"mipsec-lab-ports-{os.getuid()}"
    assert REAL_CLAIMS_DIR(tmp_path) == target  # made, mode 0700
    assert target.stat().st_mode & 0o777 == 0o700
    target.chmod(0o777)
    assert REAL_CLAIMS_DIR(tmp_path) is None  # others may write it
    target.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    target.symlink_to(tmp_path / "elsewhere")
    assert REAL_CLAIMS_DIR(tmp_path) is None  # a symlink
