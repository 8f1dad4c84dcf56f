"""SIGKILL while the SA store's checkpoint thread copies the WAL (core/walcheckpoint.py).

A writer process commits SAs one by one and reports each commit on stdout,
with a checkpoint every millisecond in its thread, so the kills land inside
checkpoints as well as commits.  After each kill the store must open, pass
``PRAGMA integrity_check`` and hold every SA whose commit was reported:
``synchronous = NORMAL`` keeps every commit through a process crash, and a
checkpoint cut in the middle is redone from the WAL at the next open.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

WRITER = textwrap.dedent(
    """
    import sys
    import time
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from mipsec.core.model import BootstrapData, IssuedSA, SecurityAssociation
    from mipsec.core.suites import Suite
    from mipsec.plugins.sa_store_sqlite import SQLiteSAStore

    path, first = Path(sys.argv[1]), int(sys.argv[2])
    now = datetime.now(UTC)
    store = SQLiteSAStore(path, checkpoint_interval=0.001)
    assert store.checkpointer is not None
    print("ready", flush=True)
    spi = first
    while True:
        sa = SecurityAssociation(
            spi=spi, mn_id=f"mn{spi}@home.example", suite=Suite.AES_128_CBC_SHA, scope=1,
            validity_end=now + timedelta(hours=1), mn_to_ha_ikey=bytes(20),
            ha_to_mn_ikey=bytes(20), mn_to_ha_ekey=bytes(16), ha_to_mn_ekey=bytes(16),
            ha_id="ha1",
        )
        assert store.add(IssuedSA(sa=sa, bootstrap=BootstrapData()), now)
        print(spi, flush=True)
        spi += 1
        # Paced: a round's log stays far under the writer's own backstop
        # (8,192 pages), so only the thread can have copied it.
        time.sleep(0.0005)
    """
)


def _spis(path: Path) -> set[int]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {r[0] for r in conn.execute("SELECT spi FROM issued_sa")}
    finally:
        conn.close()


def _in_file(path: Path, first: int) -> int:
    """SAs from ``first`` on in the database file alone: a copy without its WAL."""
    alone = path.with_name("alone.db")
    alone.write_bytes(path.read_bytes())
    ro = sqlite3.connect(alone)
    try:
        return int(
            ro.execute("SELECT COUNT(*) FROM issued_sa WHERE spi >= ?", (first,)).fetchone()[0]
        )
    finally:
        ro.close()
        for p in path.parent.glob("alone.db*"):
            p.unlink()


def test_kill_during_checkpoints_loses_no_commit(tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    rnd = random.Random(6618)
    acked: set[int] = set()
    first = 1
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(first)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        lines = proc.stdout.read().split()
        proc.stdout.close()
        done = [int(x) for x in lines]
        assert done, "the writer committed nothing before the kill"
        acked.update(done)
        # The thread had been copying the log into the file all along: most
        # of this round's commits are in the database file itself (read
        # without the WAL), not only in the log.
        assert _in_file(path, first) > len(done) // 2
        held = _spis(path)
        missing = acked - held
        assert not missing, f"{len(missing)} reported commits lost, e.g. {sorted(missing)[:5]}"
        first = max(held) + 1
