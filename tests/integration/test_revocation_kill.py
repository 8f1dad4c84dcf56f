"""Three HACs sharing one revocation list, killed (SIGKILL) at random instants
while they append and fold, with a fourth process reading all along.

What must hold (core/revocation.py): every change a process acknowledged is
in the files afterwards, whoever folded or was killed since; a change cut by
the kill is applied whole or not at all; a restarted process starts on the
files as the kill left them; a reader never fails to read the list (it never
sees a fold or an append half-done) -- so no HAC ever turns stale, refuses
every MN, or forgets a revocation because another one died.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mipsec.core import revocation
from mipsec.core.revocation import RevocationList

# Each worker owns its identities (so the last change it acknowledged for one
# is that identity's state, whatever the others do) and toggles them at
# random; COMPACT_MIN = 4: a fold every few changes, so kills land in folds.
WORKER = """
import random, sys
from pathlib import Path
from mipsec.core import revocation
from mipsec.core.revocation import RevocationList
revocation.COMPACT_MIN = 4
path, tag, log = Path(sys.argv[1]), sys.argv[2], open(sys.argv[3], "a", buffering=1)
rl = RevocationList(path)
mine = [f"{tag}{i}@x.test" for i in range(12)]
while True:
    mn = random.choice(mine)
    if mn in rl:
        log.write(f"T remove {mn}\\n")
        assert rl.remove(mn)
        log.write(f"A remove {mn}\\n")
    else:
        log.write(f"T add {mn}\\n")
        assert rl.add(mn)
        log.write(f"A add {mn}\\n")
"""

# The reader: lookups of every identity, as a HAC's bootstraps make them.
READER = """
import sys
from pathlib import Path
from mipsec.core.revocation import RevocationList
rl = RevocationList(Path(sys.argv[1]))
ids = [f"{t}{i}@x.test" for t in "pqr" for i in range(12)]
n = 0
while True:
    for mn in ids:
        mn in rl
    n += 1
    if n % 50 == 0:
        print(n, len(rl), flush=True)
"""

TAGS = ("p", "q", "r")


def _spawn(script: str, *args: str, stderr: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE if script is READER else subprocess.DEVNULL,
        stderr=stderr.open("ab"),
    )


def _expected(logs: list[Path]) -> tuple[dict[str, bool], set[str]]:
    """Per identity: its state after the last acknowledged change, and the
    identities whose last change was cut by a kill (either state is right)."""
    state: dict[str, bool] = {}
    cut: set[str] = set()
    for log in logs:
        for line in log.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] not in ("T", "A"):
                continue  # a line the kill cut
            kind, op, mn = parts
            if kind == "T":
                cut.add(mn)
            else:
                cut.discard(mn)
                state[mn] = op == "add"
    return state, cut


def test_kills_during_appends_and_folds_lose_no_acknowledged_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "revoked.json"
    logs = {tag: tmp_path / f"{tag}.log" for tag in TAGS}
    errs = tmp_path / "stderr.txt"
    rng = random.Random(6618)
    workers = {tag: _spawn(WORKER, str(path), tag, str(logs[tag]), stderr=errs) for tag in TAGS}
    reader = _spawn(READER, str(path), stderr=errs)
    kills = 0
    try:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.02, 0.25))
            tag = rng.choice(TAGS)
            proc = workers[tag]
            assert proc.poll() is None, f"worker {tag} died on its own: {errs.read_text()}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            kills += 1
            # Restarted on the files as the kill left them.
            workers[tag] = _spawn(WORKER, str(path), tag, str(logs[tag]), stderr=errs)
        time.sleep(0.3)
        assert reader.poll() is None, f"the reader died: {errs.read_text()}"
        for tag, proc in workers.items():
            assert proc.poll() is None, f"worker {tag} died on its own: {errs.read_text()}"
    finally:
        for proc in (*workers.values(), reader):
            proc.kill()
            proc.wait(timeout=10)
    assert reader.stdout is not None
    reads = reader.stdout.read().decode().split()
    assert kills >= 15
    assert len(reads) >= 2, "the reader made too few lookups to mean anything"
    # No process ever failed to read the list again (no stale turn, no error).
    assert "cannot read" not in errs.read_text(), errs.read_text()
    assert "Traceback" not in errs.read_text(), errs.read_text()

    state, cut = _expected(list(logs.values()))
    assert len(state) >= 30  # most identities were changed, and acknowledged
    final = set(RevocationList(path).items())
    for mn, revoked in state.items():
        if mn in cut:
            continue  # its last change was cut by a kill: applied whole or not at all
        assert (mn in final) == revoked, f"{mn}: acknowledged {'add' if revoked else 'remove'}"
    assert final <= set(state) | cut  # nothing that nobody asked for

    # The next fold removes the temporary snapshots of the folds the kills
    # cut short (without it, each such crash left one for good).
    monkeypatch.setattr(revocation, "COMPACT_MIN", 1)
    rl = RevocationList(path)
    for i in range(3):
        rl.add(f"after{i}@x.test")
    assert not list(tmp_path.glob(".revoked.json.*.tmp"))
    assert set(RevocationList(path).items()) == final | {f"after{i}@x.test" for i in range(3)}
