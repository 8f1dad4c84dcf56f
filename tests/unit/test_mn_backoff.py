"""The MN's backoff kept across a restart (core/mn_backoff.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tmpfs import mount_tmpfs

from mipsec.core.mn_backoff import (
    MAX_FAILURES,
    Backoff,
    BackoffFileError,
    Kept,
    decode_kept,
    default_path,
    encode_kept,
)

NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
LOG = logging.getLogger("test.mn_backoff")
MN_ID = "mn1@example.net"


def high(a: float, b: float) -> float:
    return b


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make(path: Path | None, clock: Clock, retry_max: float = 600) -> Backoff:
    return Backoff(
        path, mn_id=MN_ID, retry_min=10, retry_max=retry_max, log=LOG, uniform=high, clock=clock
    )


@given(
    st.integers(1, MAX_FAILURES),
    st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
)
def test_a_kept_backoff_reads_back_as_written(failures: int, when: datetime) -> None:
    kept = Kept(failures, when, MN_ID)
    assert decode_kept(encode_kept(kept)) == kept
    told = Kept(failures, when, MN_ID, when - timedelta(seconds=1))
    assert decode_kept(encode_kept(told)) == told


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"failures": 3, "not_before": "2026-12-06T12:00:00+00:00"}', "mn_id"),
        (b'{"mn_id": 7, "failures": 3, "not_before": "2026-12-06T12:00:00+00:00"}', "mn_id"),
        (b'{"mn_id": "a@b", "failures": 0, "not_before": "2026-12-06T12:00:00+00:00"}', "failures"),
        (
            b'{"mn_id": "a@b", "failures": -3, "not_before": "2026-12-06T12:00:00+00:00"}',
            "failures",
        ),
        (
            b'{"mn_id": "a@b", "failures": "3", "not_before": "2026-12-06T12:00:00+00:00"}',
            "failures",
        ),
        (
            b'{"mn_id": "a@b", "failures": true, "not_before": "2026-12-06T12:00:00+00:00"}',
            "failures",
        ),
        (
            b'{"mn_id": "a@b", "failures": 10000001, "not_before": "2026-12-06T12:00:00+00:00"}',
            "failures",
        ),
        (b'{"mn_id": "a@b", "failures": 3}', "not_before"),
        (b'{"mn_id": "a@b", "failures": 3, "not_before": "soon"}', "not_before"),
        (
            b'{"mn_id": "a@b", "failures": 3, "not_before": "2026-12-06T12:00:00"}',
            "not_before",
        ),  # no offset
        (b" " * 5000, "octets"),
        (
            b'{"mn_id": "a@b", "failures": 3, "not_before": "2026-12-06T12:00:00+00:00", '
            b'"hac_not_before": "later"}',
            "hac_not_before",
        ),
        (
            b'{"mn_id": "a@b", "failures": 3, "not_before": "2026-12-06T12:00:00+00:00", '
            b'"hac_not_before": "2026-12-06T11:00:00"}',
            "hac_not_before",
        ),  # no offset
    ],
)
def test_a_damaged_file_is_refused_naming_the_file_and_the_field(data: bytes, field: str) -> None:
    with pytest.raises(BackoffFileError) as err:
        decode_kept(data, "/var/lib/mipsec/mn.backoff")
    assert err.value.path == "/var/lib/mipsec/mn.backoff"
    assert field in err.value.reason and field in str(err.value)


def test_the_wait_is_written_down_as_a_date_and_a_new_process_waits_out_the_rest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mn.backoff"
    clock = Clock()
    first = make(path, clock)
    assert first.resume() == 0 and first.failures == 0  # no file: bootstrap now
    assert [first.failed(), first.failed(), first.failed()] == [10, 20, 40]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert decode_kept(path.read_bytes()) == Kept(3, NOW + timedelta(seconds=40), MN_ID)
    # The process dies 15 s into its 40-s wait; the next one waits 25 s
    # more, and its next failure doubles on from the third.
    clock.now = NOW + timedelta(seconds=15)
    second = make(path, clock)
    assert second.resume() == 25 and second.failures == 3
    assert second.failed() == 80


def test_a_503s_retry_after_is_kept_as_the_part_sigusr1_does_not_cut(tmp_path: Path) -> None:
    """A 503 with retry-after 300 s: the wait (309 s here) and the part of it
    the HAC asked for are written down.  A process started again 100 s
    later resumes both -- 209 s to wait, 200 of them the HAC's, which
    SIGUSR1 does not cut (core/mn_wait.py).  Before, the resumed wait had
    no floor, and an MN restarted by its supervisor with a link-up hook
    sending SIGUSR1 came back to an overloaded HAC at once (found in
    review).  A failure without retry-after keeps no floor."""
    path = tmp_path / "mn.backoff"
    clock = Clock()
    first = make(path, clock)
    wait = first.failed(NOW + timedelta(seconds=300))
    assert wait == pytest.approx(310)  # retry-after plus up to retry_min (here: all of it)
    kept = decode_kept(path.read_bytes())
    assert kept.hac_not_before == NOW + timedelta(seconds=300)
    clock.now = NOW + timedelta(seconds=100)
    second = make(path, clock)
    assert second.resume() == pytest.approx(210)
    assert second.hac_left == pytest.approx(200)
    second.failed()  # a failure of its own, no retry-after: no floor kept
    third = make(path, clock)
    third.resume()
    assert decode_kept(path.read_bytes()).hac_not_before is None and third.hac_left == 0
    # A retry-after beyond retry_max is held to the wait it got.
    clock.now = NOW
    fourth = make(path, clock, retry_max=60)
    assert fourth.failed(NOW + timedelta(seconds=3600)) == 60
    assert decode_kept(path.read_bytes()).hac_not_before == NOW + timedelta(seconds=60)


def test_an_elapsed_wait_lets_the_mn_bootstrap_at_once_but_keeps_the_count(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mn.backoff"
    path.write_bytes(encode_kept(Kept(4, NOW - timedelta(seconds=1), MN_ID)))
    later = make(path, Clock())
    assert later.resume() == 0 and later.failures == 4
    assert later.failed() == 160


def test_a_date_far_ahead_waits_retry_max_at_most(tmp_path: Path) -> None:
    """A clock set back (or a file from another host) must not park the MN
    for days: the new process waits ``retry_max`` at most -- the one it is
    configured with now, even if it was larger when the file was written."""
    path = tmp_path / "mn.backoff"
    path.write_bytes(encode_kept(Kept(9, NOW + timedelta(days=30), MN_ID)))
    assert make(path, Clock(), retry_max=120).resume() == 120


def test_a_file_kept_for_another_mn_is_reported_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two MNs given one file (one state directory, one config name): the
    other's waits are not this MN's."""
    path = tmp_path / "mn.backoff"
    path.write_bytes(encode_kept(Kept(6, NOW + timedelta(seconds=300), "other@example.net")))
    backoff = make(path, Clock())
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert backoff.resume() == 0 and backoff.failures == 0
    (record,) = caplog.records
    assert "mn_id=other@example.net" in record.getMessage() and MN_ID in record.getMessage()
    backoff.failed()
    assert decode_kept(path.read_bytes()).mn_id == MN_ID


def test_a_success_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mn.backoff"
    backoff = make(path, Clock())
    backoff.failed()
    assert path.exists()
    backoff.succeeded()
    assert not path.exists() and backoff.failures == 0
    backoff.succeeded()  # no file: nothing to do, no error
    assert make(path, Clock()).resume() == 0


def test_a_damaged_file_is_reported_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mn.backoff"
    path.write_bytes(b'{"mn_id": "a@b", "failures": 3, "not_before": "soon"}')
    backoff = make(path, Clock())
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert backoff.resume() == 0 and backoff.failures == 0
    (record,) = caplog.records
    assert str(path) in record.getMessage() and "not_before" in record.getMessage()
    assert backoff.failed() == 10  # and it is replaced by a good one
    assert decode_kept(path.read_bytes()).failures == 1


def test_an_unwritable_file_costs_one_warning_and_the_persistence_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs as root too: the file's place is a directory, which no rename replaces."""
    path = tmp_path / "mn.backoff"
    path.mkdir()
    backoff = make(path, Clock())
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert backoff.resume() == 0  # a directory is not read: one warning
        assert [backoff.failed(), backoff.failed()] == [10, 20]
        backoff.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "not read, ignored" in messages[0]
    assert "not kept across restarts" in messages[1] and str(path) in messages[1]
    assert backoff.failures == 0


def test_nothing_is_kept_without_a_path(tmp_path: Path) -> None:
    backoff = make(None, Clock())
    assert backoff.resume() == 0
    assert backoff.failed() == 10
    backoff.succeeded()
    assert list(tmp_path.iterdir()) == []


def test_the_default_file_is_in_systemds_state_directory_else_next_to_the_config(
    tmp_path: Path,
) -> None:
    config = tmp_path / "etc" / "mn.toml"
    env = {"STATE_DIRECTORY": "/var/lib/mipsec:/var/lib/other"}
    assert default_path(str(config), env) == Path("/var/lib/mipsec/mn.backoff")
    assert default_path(str(config), {}) == tmp_path / "etc" / "mn.backoff"


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs filled to its last block (root: mount), and its filler file."""
    disk = tmp_path / "disk"
    disk.mkdir()
    reason = mount_tmpfs(disk, "64k")
    if reason is not None:
        pytest.skip(reason)
    try:
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * 4096):
                    pass
        finally:
            os.close(fd)
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)


def test_a_full_disk_costs_one_warning_leaves_no_debris_and_the_file_comes_back(
    full_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The backoff file's disk fills up while the MN keeps failing: the MN
    goes on backing off from memory (one warning, no temporary file left
    behind), and once there is room the next failure writes the file again
    -- said in one line -- for a restart to resume from."""
    disk = full_disk.parent
    path = disk / "mn.backoff"
    clock = Clock()
    backoff = make(path, clock)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        assert [backoff.failed(), backoff.failed()] == [10, 20]
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no debris
        full_disk.unlink()  # room again
        assert backoff.failed() == 40
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0][0] == "WARNING" and "No space left on device" in messages[0][1]
    assert messages[1][0] == "INFO" and "written again" in messages[1][1]
    assert str(path) in messages[0][1] and str(path) in messages[1][1]
    kept = decode_kept(path.read_bytes())
    assert (kept.failures, kept.not_before) == (3, NOW + timedelta(seconds=40))
    restarted = make(path, clock)
    assert restarted.resume() == 40 and restarted.failures == 3
