"""One revocation list shared by several HACs (the same ``[revocations] path``).

Each ``RevocationList`` here stands for one HAC process: a change made by one
is seen by the others at their next lookup, through appends and folds alike,
and every process's changes end up in the files (core/revocation.py).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mipsec.core import revocation
from mipsec.core.revocation import RevocationList, journal_path


def test_a_change_by_one_is_seen_by_the_other_at_its_next_lookup(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    a, b = RevocationList(path), RevocationList(path)
    assert a.add("mn1@example.net")
    assert "mn1@EXAMPLE.net" in b  # read from the journal's end, canonical form
    assert not b.add("mn1@example.net")  # already revoked: by the other
    assert b.remove("mn1@example.net")
    assert "mn1@example.net" not in a
    assert not a.remove("mn1@example.net")
    assert len(a) == len(b) == 0


def test_a_fold_by_one_is_read_whole_by_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process folds the journal into a new snapshot (and removes
    the journal): the next lookup reads the new files whole."""
    monkeypatch.setattr(revocation, "COMPACT_MIN", 3)
    path = tmp_path / "revoked.json"
    a, b = RevocationList(path), RevocationList(path)
    for i in range(3):
        assert a.add(f"mn{i}@x")
    assert "mn0@x" in b and len(b) == 3  # three journal lines read
    assert a.add("mn3@x")  # the fold: a new snapshot, no journal
    assert not journal_path(path).exists()
    assert sorted(b.items()) == ["mn0@x", "mn1@x", "mn2@x", "mn3@x"]
    assert a.remove("mn0@x")  # a journal line after the fold
    assert "mn0@x" not in b and len(b) == 3


def test_interleaved_changes_of_two_lists_all_reach_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each change first takes in the other's (so its line count, and the
    fold it decides on, are the files'): folds and appends of both, in any
    order, replay to one list."""
    monkeypatch.setattr(revocation, "COMPACT_MIN", 4)
    path = tmp_path / "revoked.json"
    a, b = RevocationList(path), RevocationList(path)
    expected: set[str] = set()
    for i in range(40):
        who = a if i % 3 else b
        mn_id = f"mn{i}@x"
        assert who.add(mn_id)
        expected.add(mn_id)
        if i % 7 == 6:
            gone = f"mn{i - 5}@x"
            assert (b if who is a else a).remove(gone)
            expected.discard(gone)
    fresh = RevocationList(path)
    assert set(fresh.items()) == set(a.items()) == set(b.items()) == expected


def test_two_processes_revoking_at_once_lose_no_change(tmp_path: Path) -> None:
    """Two processes append and fold concurrently (the exclusive lock):
    every revocation of both is in the files afterwards."""
    path = tmp_path / "revoked.json"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mipsec.core import revocation\n"
        "from mipsec.core.revocation import RevocationList\n"
        "revocation.COMPACT_MIN = 16\n"
        "rl = RevocationList(Path(sys.argv[1]))\n"
        "for i in range(150):\n"
        "    assert rl.add(f'{sys.argv[2]}{i}@x')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), tag]) for tag in ("p", "q")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    got = set(RevocationList(path).items())
    assert got == {f"{tag}{i}@x" for tag in ("p", "q") for i in range(150)}


def test_a_bad_line_written_later_keeps_the_list_read_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The files become unreadable as a list after start (a line that is not
    a change): the list last read stays in force -- nothing is forgotten and
    no MN is refused for it -- with one line; repaired, it is read again."""
    path = tmp_path / "revoked.json"
    a, b = RevocationList(path), RevocationList(path)
    assert a.add("kept@x")
    assert "kept@x" in b
    journal = journal_path(path)
    good = journal.read_bytes()
    journal.write_bytes(good + b"not json\n")
    with caplog.at_level(logging.INFO):
        assert "kept@x" in b and "other@x" not in b
        assert "kept@x" in b  # one line per outage, not one per lookup
        journal.write_bytes(good + b'{"add": "later@x", "since": "2026-12-05T00:00:00+00:00"}\n')
        assert "later@x" in b
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "cannot read it again" in errors[0].getMessage()
    assert "line 2: not a revocation change" in errors[0].getMessage()
    assert "read again (2 revoked)" in caplog.text


def test_a_cut_line_of_another_process_is_not_applied_and_the_next_change_folds(
    tmp_path: Path,
) -> None:
    """A journal line cut by a crash of another process (appends are made
    under the lock: a reader never sees one half-written by a live one): not
    applied, and the next change, by anyone, folds the journal away."""
    path = tmp_path / "revoked.json"
    a, b = RevocationList(path), RevocationList(path)
    assert a.add("one@x")
    journal = journal_path(path)
    with journal.open("ab") as f:
        f.write(b'{"add": "cut@x", "sin')  # the crash
    assert "one@x" in b and "cut@x" not in b
    assert b.add("two@x")
    assert not journal.exists()  # folded: the cut octets are gone
    assert set(RevocationList(path).items()) == set(a.items()) == {"one@x", "two@x"}


def test_a_fold_removes_the_temporary_snapshot_a_killed_fold_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fold killed before its rename leaves ``.revoked.json.HEX.tmp``
    (core/fsutil.write_file): the next fold, under the exclusive lock that
    every fold holds, removes it -- and nothing else."""
    monkeypatch.setattr(revocation, "COMPACT_MIN", 2)
    path = tmp_path / "revoked.json"
    dead = tmp_path / ".revoked.json.0123456789ab.tmp"
    dead.write_bytes(b'{"version": 1, "revo')  # cut short by the kill
    others = [tmp_path / ".revoked.json.mine.tmp", tmp_path / ".other.json.0123456789ab.tmp"]
    for f in others:
        f.write_bytes(b"x")
    rl = RevocationList(path)
    assert rl.add("a@x") and rl.add("b@x")
    assert dead.exists()  # appends only: no fold yet
    with caplog.at_level(logging.INFO, logger="mipsec.revocation"):
        assert rl.add("c@x")  # the journal holds 2 lines: this change folds
    assert not journal_path(path).exists()
    assert not dead.exists()
    assert all(f.exists() for f in others)
    assert "removed .revoked.json.0123456789ab.tmp, left by a fold cut short" in caplog.text
    assert set(RevocationList(path).items()) == {"a@x", "b@x", "c@x"}


@pytest.mark.parametrize("how", ["unlink-fails", "unlink-undone"])
def test_a_change_that_folds_survives_the_old_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """x revoked and unrevoked, then other changes, then x revoked again by
    the change that folds.  The old journal outlives the fold -- its unlink
    fails, or a power loss undoes it -- and another HAC, or a restart,
    replays it onto the new snapshot: x is revoked.  Before, the change was
    written into the snapshot alone, and the journal's older "remove x"
    undid an acknowledged revoke (found in review)."""
    import os
    import shutil

    monkeypatch.setattr(revocation, "COMPACT_MIN", 4)
    path = tmp_path / "revoked.json"
    journal = journal_path(path)
    a = RevocationList(path)
    a.add("x@home.example")
    a.remove("x@home.example")
    a.add("y@home.example")
    a.remove("y@home.example")  # 4 lines: the next change folds
    real_unlink = os.unlink
    kept = tmp_path / "journal-as-it-was"

    def unlink(target: object, *args: object, **kwargs: object) -> None:
        if str(target) == str(journal):
            shutil.copyfile(journal, kept)  # as it was on disk at the unlink
            if how == "unlink-fails":
                raise PermissionError(1, "Operation not permitted")
        real_unlink(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(revocation.os, "unlink", unlink)
    assert a.add("x@home.example") is True
    monkeypatch.setattr(revocation.os, "unlink", real_unlink)
    if how == "unlink-undone":
        shutil.copyfile(kept, journal)  # the power loss brought it back
    assert "x@home.example" in a
    assert "x@home.example" in RevocationList(path)
